//! Runbook step "Create an Access Key": primitives to list, create and delete the user's access
//! keys and to record the key's description the way the AWS console does (a user tag whose key
//! is the access key id). The orchestrator decides which keys to keep.

use std::fmt;

use aws_sdk_iam::Client;
use aws_sdk_iam::error::ProvideErrorMetadata;
use chrono::{DateTime, Utc};
use secrecy::SecretString;
use serde::Serialize;
use serde_json::json;

use crate::cloud::aws::{classify, output_request_id};
use crate::cloud::{CloudError, Outcome, StepReport};
use crate::provision::user::{list_tags, tags};

/// The runbook's access key description, verbatim (including its typo).
pub const DESCRIPTION: &str = "Used by pgbackrest associated with the PostgresCluster resource.  \
Refer to the PostgresCluster resource pgbackrest.cofiguration.secret.name for the stored \
location of the access key.  Synced from the Management Cluster using an ExternalSecret.";

/// IAM's limit on tag values, in characters.
pub const MAX_TAG_VALUE_CHARS: usize = 256;

const IAM: &str = "iam";

/// An existing access key (no secret: IAM only reveals it at creation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    pub id: String,
    /// `Active` or `Inactive`.
    pub status: String,
    pub created: Option<DateTime<Utc>>,
}

impl KeyInfo {
    pub fn is_active(&self) -> bool {
        self.status == "Active"
    }
}

/// A freshly created access key. `Debug` never shows the secret.
pub struct NewAccessKey {
    pub id: String,
    pub secret: SecretString,
    pub request_id: Option<String>,
}

impl fmt::Debug for NewAccessKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewAccessKey")
            .field("id", &self.id)
            .field("secret", &"[REDACTED]")
            .field("request_id", &self.request_id)
            .finish()
    }
}

/// The user's access keys, oldest first.
pub async fn list(iam: &Client, user: &str) -> Result<Vec<KeyInfo>, CloudError> {
    let mut keys = Vec::new();
    let mut marker: Option<String> = None;
    loop {
        let out = iam
            .list_access_keys()
            .user_name(user)
            .set_marker(marker.take())
            .send()
            .await
            .map_err(|e| classify(IAM, "ListAccessKeys", e))?;
        keys.extend(out.access_key_metadata().iter().filter_map(|k| {
            Some(KeyInfo {
                id: k.access_key_id()?.to_owned(),
                status: k
                    .status()
                    .map(|s| s.as_str().to_owned())
                    .unwrap_or_default(),
                created: k
                    .create_date()
                    .and_then(|d| DateTime::from_timestamp(d.secs(), d.subsec_nanos())),
            })
        }));
        match out.marker() {
            Some(next) if out.is_truncated() => marker = Some(next.to_owned()),
            _ => break,
        }
    }
    keys.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.id.cmp(&b.id)));
    Ok(keys)
}

/// Creates a new access key for the user. IAM allows two keys per user (`LimitExceeded`).
pub async fn create(iam: &Client, user: &str) -> Result<NewAccessKey, CloudError> {
    let out = iam
        .create_access_key()
        .user_name(user)
        .send()
        .await
        .map_err(|e| classify(IAM, "CreateAccessKey", e))?;
    let request_id = output_request_id(&out);
    let key = out.access_key().ok_or_else(|| {
        CloudError::retryable(IAM, "CreateAccessKey", "the response carried no access key")
    })?;
    Ok(NewAccessKey {
        id: key.access_key_id().to_owned(),
        secret: SecretString::from(key.secret_access_key().to_owned()),
        request_id,
    })
}

/// Deletes an access key. A key that is already gone counts as deleted
/// (`Outcome::AlreadyPresent` with `"already_absent": true`).
pub async fn delete(iam: &Client, user: &str, key_id: &str) -> Result<StepReport, CloudError> {
    match iam
        .delete_access_key()
        .user_name(user)
        .access_key_id(key_id)
        .send()
        .await
    {
        Ok(out) => {
            let mut report = StepReport::new(
                Outcome::Deleted,
                json!({ "user_name": user, "access_key_id": key_id }),
            );
            report.upstream_request_id = output_request_id(&out);
            Ok(report)
        }
        Err(err) if err.code() == Some("NoSuchEntity") => Ok(StepReport::new(
            Outcome::AlreadyPresent,
            json!({ "user_name": user, "access_key_id": key_id, "already_absent": true }),
        )),
        Err(err) => Err(classify(IAM, "DeleteAccessKey", err)),
    }
}

/// The tag value recording [`DESCRIPTION`], cut to IAM's limit on a char boundary if needed.
/// Returns the value and whether it was truncated.
pub fn description_tag_value() -> (String, bool) {
    truncate_chars(DESCRIPTION, MAX_TAG_VALUE_CHARS)
}

fn truncate_chars(text: &str, max: usize) -> (String, bool) {
    match text.char_indices().nth(max) {
        Some((cut, _)) => (text[..cut].to_owned(), true),
        None => (text.to_owned(), false),
    }
}

/// Records the access key description as the user tag `<key id> = DESCRIPTION`, as the AWS
/// console does. Reads the user's tags first; writes only if the tag is missing or different.
pub async fn ensure_description_tag(
    iam: &Client,
    user: &str,
    key_id: &str,
) -> Result<StepReport, CloudError> {
    let (value, truncated) = description_tag_value();
    let current = list_tags(iam, user).await?;
    let found = current
        .iter()
        .find(|(k, _)| k == key_id)
        .map(|(_, v)| v.clone());
    let mut detail = json!({
        "user_name": user,
        "access_key_id": key_id,
        "tag_key": key_id,
        "description_chars": value.chars().count(),
        "truncated": truncated,
    });
    if truncated {
        detail["note"] = json!(format!(
            "the description is longer than IAM's {MAX_TAG_VALUE_CHARS}-character tag value \
             limit and was truncated"
        ));
    }
    if found.as_deref() == Some(value.as_str()) {
        return Ok(StepReport::new(Outcome::AlreadyPresent, detail));
    }
    let out = iam
        .tag_user()
        .user_name(user)
        .set_tags(Some(tags(&[(key_id, value.as_str())])?))
        .send()
        .await
        .map_err(|e| classify(IAM, "TagUser", e))?;
    let outcome = if found.is_some() {
        detail["differences"] = json!([{
            "setting": "description_tag",
            "found": found,
            "expected": value,
            "action": "repaired",
        }]);
        Outcome::Updated
    } else {
        Outcome::Created
    };
    let mut report = StepReport::new(outcome, detail);
    report.upstream_request_id = output_request_id(&out);
    Ok(report)
}

/// Removes the description tag of an access key (after the key is deleted). Absent tag: no
/// write, `Outcome::AlreadyPresent` with `"already_absent": true`.
pub async fn remove_description_tag(
    iam: &Client,
    user: &str,
    key_id: &str,
) -> Result<StepReport, CloudError> {
    let current = list_tags(iam, user).await?;
    if !current.iter().any(|(k, _)| k == key_id) {
        return Ok(StepReport::new(
            Outcome::AlreadyPresent,
            json!({ "user_name": user, "tag_key": key_id, "already_absent": true }),
        ));
    }
    let out = match iam
        .untag_user()
        .user_name(user)
        .tag_keys(key_id)
        .send()
        .await
    {
        Ok(out) => out,
        Err(err) if err.code() == Some("NoSuchEntity") => {
            return Ok(StepReport::new(
                Outcome::AlreadyPresent,
                json!({ "user_name": user, "tag_key": key_id, "already_absent": true }),
            ));
        }
        Err(err) => return Err(classify(IAM, "UntagUser", err)),
    };
    let mut report = StepReport::new(
        Outcome::Deleted,
        json!({ "user_name": user, "tag_key": key_id }),
    );
    report.upstream_request_id = output_request_id(&out);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn description_fits_a_tag_value() {
        let (value, truncated) = description_tag_value();
        assert!(!truncated);
        assert_eq!(value, DESCRIPTION);
        assert!(DESCRIPTION.contains("pgbackrest.cofiguration.secret.name"));
    }

    #[test]
    fn truncates_on_char_boundary() {
        let long = "é".repeat(300);
        let (value, truncated) = truncate_chars(&long, MAX_TAG_VALUE_CHARS);
        assert!(truncated);
        assert_eq!(value.chars().count(), MAX_TAG_VALUE_CHARS);
    }

    #[test]
    fn debug_hides_secret() {
        let key = NewAccessKey {
            id: "AKIAEXAMPLE".into(),
            secret: SecretString::from("very-secret".to_owned()),
            request_id: None,
        };
        assert!(!format!("{key:?}").contains("very-secret"));
    }
}
