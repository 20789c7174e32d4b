//! Validated domain types: parse, don't validate.
//!
//! Every type in this module can only be constructed through a `parse`
//! function (or `generate` for [`CipherPass`]), so holding a value is proof
//! that it satisfied every rule. Each rule failure carries its own precise
//! message in a [`ValidationError`], suitable for a problem+json response.

mod bucket;
mod cipher;
mod labels;
mod names;
mod region;

pub use bucket::{
    BucketName, DEFAULT_BUCKET_PATTERN, IAM_GROUP_NAME_MAX, IAM_POLICY_NAME_MAX, IAM_USER_NAME_MAX,
    default_bucket_for,
};
pub use cipher::{CIPHER_PASS_ALPHABET, CIPHER_PASS_LEN, CipherPass};
pub use labels::{LABEL_VALUE_MAX, Labels, MAX_LABELS};
pub use names::{DNS1123_LABEL_MAX, Namespace, RepositoryName};
pub use region::{DEFAULT_REGION, Region};

/// A single rule violation on a single input field.
///
/// `field` names the input (e.g. `bucket`, `namespace`, `labels`); `message`
/// says precisely which rule failed. Secret inputs are never echoed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, utoipa::ToSchema)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Rename the field, e.g. when the API exposes `spec.bucket` rather than `bucket`.
    #[must_use]
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = field.into();
        self
    }
}

/// Validates an RFC 1123 label as Kubernetes uses it for namespaces and most
/// object names: 1 to 63 characters, `[a-z0-9]([-a-z0-9]*[a-z0-9])?`.
///
/// `what` starts each message (e.g. "namespace", "repository name").
pub(crate) fn check_dns1123_label(
    field: &str,
    what: &str,
    value: &str,
) -> Result<(), ValidationError> {
    let err = |message: String| Err(ValidationError::new(field, message));
    let len = value.chars().count();
    if len == 0 {
        return err(format!("{what} must not be empty"));
    }
    if len > DNS1123_LABEL_MAX {
        return err(format!(
            "{what} must be at most {DNS1123_LABEL_MAX} characters long (got {len})"
        ));
    }
    if let Some((pos, c)) = value
        .chars()
        .enumerate()
        .find(|(_, c)| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return err(format!(
            "{what} may contain only lowercase letters, digits and '-' (found {c:?} at position {pos})"
        ));
    }
    if value.starts_with('-') {
        return err(format!(
            "{what} must start with a lowercase letter or digit"
        ));
    }
    if value.ends_with('-') {
        return err(format!("{what} must end with a lowercase letter or digit"));
    }
    Ok(())
}
