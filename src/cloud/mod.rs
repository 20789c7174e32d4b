//! Thin clients for AWS (S3, IAM) and Kubernetes, and the classification of their errors.
//!
//! Every external call made by a provisioning step returns [`CloudError`], which says whether a
//! retry can help. The job engine maps `Retryable` to a backoff retry and `Permanent` to an
//! immediate failure whose message tells the operator what to fix.

pub mod aws;
pub mod kube;
pub mod rate_limit;

use serde::Serialize;

/// A failed call to AWS or Kubernetes, classified for the retry policy.
#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    /// Throttling, 5xx, timeouts, connection errors, eventual consistency: try again later.
    #[error("{service} {operation}: {message}")]
    Retryable {
        service: &'static str,
        operation: &'static str,
        message: String,
        request_id: Option<String>,
    },
    /// Access denied, invalid names, resources owned by someone else: a retry cannot help.
    #[error("{service} {operation}: {message}")]
    Permanent {
        service: &'static str,
        operation: &'static str,
        message: String,
        request_id: Option<String>,
    },
}

/// Whether a retry can help: which of the two [`CloudError`] variants a classification makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    Yes,
    No,
}

impl CloudError {
    /// The error a classification decided on.
    pub(crate) fn classified(
        retry: Retry,
        service: &'static str,
        operation: &'static str,
        message: impl Into<String>,
        request_id: Option<String>,
    ) -> Self {
        let message = message.into();
        match retry {
            Retry::Yes => CloudError::Retryable {
                service,
                operation,
                message,
                request_id,
            },
            Retry::No => CloudError::Permanent {
                service,
                operation,
                message,
                request_id,
            },
        }
    }

    pub fn is_retryable(&self) -> bool {
        matches!(self, CloudError::Retryable { .. })
    }

    pub fn request_id(&self) -> Option<&str> {
        match self {
            CloudError::Retryable { request_id, .. } | CloudError::Permanent { request_id, .. } => {
                request_id.as_deref()
            }
        }
    }

    pub fn permanent(
        service: &'static str,
        operation: &'static str,
        message: impl Into<String>,
    ) -> Self {
        CloudError::Permanent {
            service,
            operation,
            message: message.into(),
            request_id: None,
        }
    }

    pub fn retryable(
        service: &'static str,
        operation: &'static str,
        message: impl Into<String>,
    ) -> Self {
        CloudError::Retryable {
            service,
            operation,
            message: message.into(),
            request_id: None,
        }
    }
}

/// What a step found and did, recorded as one audit outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Created,
    AlreadyPresent,
    Updated,
    Deleted,
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::AlreadyPresent => "already-present",
            Outcome::Updated => "updated",
            Outcome::Deleted => "deleted",
            Outcome::Failed => "failed",
        }
    }
}

/// The result of one idempotent step: its outcome, a secret-free JSON detail for the audit log
/// (differences found, identifiers), and the upstream request id of the last mutating call.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub outcome: Outcome,
    pub detail: serde_json::Value,
    pub upstream_request_id: Option<String>,
}

impl StepReport {
    pub fn new(outcome: Outcome, detail: serde_json::Value) -> Self {
        StepReport {
            outcome,
            detail,
            upstream_request_id: None,
        }
    }
}
