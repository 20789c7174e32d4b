//! One integration-test binary: every module below drives real components
//! (Postgres, moto, the Kubernetes emulator, pgBackRest) through real clients.

mod support;
mod smoke;
mod aws_steps;
