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
pub mod cloud;
pub mod config;
pub mod crypto;
pub mod db;
pub mod domain;
pub mod http;
pub mod jobs;
pub mod provision;
pub mod repository;
pub mod startup;
pub mod telemetry;
