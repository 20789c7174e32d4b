//! Test harness: launchers for moto and the real kube-apiserver (a recording/fault proxy in
//! front of it, the shipped RBAC), and `spawn_app`.
#![allow(dead_code)]
pub mod app;
pub mod aws_realism;
pub mod crash_child;
pub mod env;
pub mod kube_apiserver;
pub mod kube_env;
pub mod kube_proxy;
pub mod moto;
pub mod pgbackrest;
pub mod private_postgres;
pub mod rbac;
pub mod service_process;
pub mod tcp_proxy;
pub mod test_jobs;
