//! One integration-test binary: every module below drives real components
//! (Postgres, moto, the Kubernetes emulator, pgBackRest) through real clients.

mod support;
mod smoke;
mod aws_steps;
mod job_queue;
mod http_common;
mod http_validation;
mod http_repositories;
mod http_idempotency;
mod http_auth;
mod http_jobs;
mod audit_log;
mod openapi_spec;
mod kube_secret;
mod provisioning;
mod crash_safety;
mod provisioning_cases;
mod cli;
mod secret_hygiene;
mod pgbackrest_e2e;
