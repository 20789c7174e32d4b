//! Test harness: launchers for moto and the Kubernetes emulator, and `spawn_app`.
#![allow(dead_code)]
pub mod app;
pub mod kube;
pub mod moto;
pub mod test_jobs;
pub mod pgbackrest;
pub mod provisioning;
pub mod crash_child;
pub mod provisioning_custom;
