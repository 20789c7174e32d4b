//! Test harness: launchers for moto and the Kubernetes emulator, and `spawn_app`.
#![allow(dead_code)]
pub mod app;
pub mod crash_child;
pub mod kube;
pub mod moto;
pub mod pgbackrest;
pub mod provisioning;
pub mod provisioning_custom;
pub mod test_jobs;
