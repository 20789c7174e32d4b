//! Test harness: launchers for moto and the Kubernetes emulator, and `spawn_app`.
#![allow(dead_code)]
pub mod app;
pub mod aws_realism;
pub mod crash_child;
pub mod env;
pub mod kube;
pub mod moto;
pub mod pgbackrest;
pub mod test_jobs;
