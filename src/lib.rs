//! backup-provisioner: the PostgresCluster backup runbook as a REST API.
//!
//! Layers, from the outside in:
//! - [`http`]: axum routes, auth, problem+json errors, OpenAPI.
//! - [`jobs`]: a Postgres job queue (claim, lease, retry, rescue) that knows nothing of AWS.
//! - [`provision`]: the runbook, one module per step, run as a job kind.
//! - [`cloud`]: thin AWS and Kubernetes clients and error classification.
//! - [`domain`]: validated newtypes (bucket names, namespaces, regions, cipher passes).

pub mod audit;
pub mod auth;
pub mod client;
pub mod cloud;
pub mod config;
pub mod controller;
pub mod crypto;
pub mod db;
pub mod domain;
pub mod http;
pub mod jobs;
pub mod provision;
pub mod repository;
pub mod startup;
pub mod telemetry;
pub mod webhooks;

/// Selects aws-lc-rs as the process-wide rustls provider (reqwest, kube and sqlx share it).
/// Safe to call more than once.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
