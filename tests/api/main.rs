//! One integration-test binary: every module below drives real components
//! (Postgres, moto, the real kube-apiserver on etcd, pgBackRest) through real clients.

mod adopt;
mod audit_log;
mod aws_realism;
mod aws_steps;
mod cli;
mod crash_safety;
mod database_roles;
mod day_to_day_defects;
mod deprovision;
mod faults_beyond_aws;
mod http_auth;
mod http_common;
mod http_hardening;
mod http_idempotency;
mod http_jobs;
mod http_oidc;
mod http_repositories;
mod http_validation;
mod job_queue;
mod kube_rbac;
mod kube_secret;
mod lease_and_keys;
mod listing;
mod openapi_spec;
mod pgbackrest_e2e;
mod provisioning;
mod provisioning_cases;
mod real_aws_defects;
mod rotate_key;
mod schemathesis;
mod secret_hygiene;
mod smoke;
mod support;
mod test_databases;
mod verify_sweep;
