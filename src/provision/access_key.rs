//! Runbook section "Create an Access Key":
//!
//! > Create an access key for `pgbackrest` associated with the `PostgresCluster`.
//! >
//! > Description:
//! > > Used by pgbackrest associated with the PostgresCluster resource.  Refer to the
//! > > PostgresCluster resource pgbackrest.cofiguration.secret.name for the stored location of
//! > > the access key.  Synced from the Management Cluster using an ExternalSecret.
//!
//! The user keeps exactly one key whose secret we have ([`reconcile_access_key`]): the one
//! whose secret is sealed in Postgres, else the one the Secret references ([`choose_key`]);
//! every other key is deleted first (IAM allows two per user), and a key is created only when
//! none is usable, its secret sealed in the transaction that records the step
//! ([`create_sealed_key`]). The description is recorded the way the AWS console does: a user
//! tag whose key is the access key id ([`ensure_description_tag`]).
//!
//! Once the key is made, the credential check (`credential_check.rs`, not a runbook
//! step) proves it works before the Secret is written.

use std::fmt;

use aws_sdk_iam::Client;
use aws_sdk_iam::error::ProvideErrorMetadata;
use chrono::{DateTime, Utc};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::{Postgres, Transaction};

use super::report::{Action, Report};
use super::sealed;
use crate::cloud::aws::{classify, output_request_id};
use crate::cloud::{CloudError, Outcome, StepReport};
use crate::domain::BucketName;
use crate::jobs::{JobContext, JobError};
use crate::provision::user::{list_tags, tags};

/// The runbook's access key description, verbatim (including its typo).
pub const DESCRIPTION: &str = "Used by pgbackrest associated with the PostgresCluster resource.  \
Refer to the PostgresCluster resource pgbackrest.cofiguration.secret.name for the stored \
location of the access key.  Synced from the Management Cluster using an ExternalSecret.";

/// IAM's limit on tag values, in characters.
pub const MAX_TAG_VALUE_CHARS: usize = 256;

const IAM: &str = "iam";
/// The resource kind of the description tag in its step's report.
const TAG_KIND: &str = "iam-user-tag";

/// Where the access key's secret comes from. Stored in the step's output: the serialized
/// names never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeySource {
    /// Made by this attempt; its secret is sealed in Postgres until the Secret holds it.
    Created,
    /// Made by an earlier attempt; its secret is still sealed in Postgres.
    #[serde(rename = "held")]
    Sealed,
    /// Referenced by the existing Secret, which holds its secret.
    #[serde(rename = "secret")]
    InSecret,
}

/// The access key step's output: the key the repository uses and where its secret is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyOutput {
    pub access_key_id: String,
    pub source: KeySource,
}

/// The key to keep among the user's keys `in_iam`: the one whose secret is sealed in Postgres
/// (made by an earlier attempt, not yet delivered), else the one the Secret references. A key
/// we hold no secret for is useless: the caller deletes it.
pub fn choose_key(
    in_iam: &[&str],
    sealed: Option<&str>,
    referenced: Option<&str>,
) -> Option<KeyOutput> {
    let present = |id: &&str| in_iam.contains(id);
    let (access_key_id, source) = match (sealed.filter(present), referenced.filter(present)) {
        (Some(id), _) => (id, KeySource::Sealed),
        (None, Some(id)) => (id, KeySource::InSecret),
        (None, None) => return None,
    };
    Some(KeyOutput {
        access_key_id: access_key_id.to_owned(),
        source,
    })
}

/// The IAM user whose keys the step reconciles, and where a new key's secret is sealed.
pub struct UserKeys<'a> {
    pub iam: &'a Client,
    /// The user is named after the bucket ([`BucketName::iam_user_name`]).
    pub user: &'a BucketName,
    pub sealed: sealed::Store<'a>,
}

/// Keeps the one key whose secret we have (sealed, or in the Secret referencing
/// `referenced`), deletes the rest, and creates a key only when none is usable.
///
/// Everything runs inside `tx`, which must come from `ctx.fenced_tx_unless_cancelled()`: it
/// holds the job's row lock, so a worker that lost its lease cannot list, delete or create
/// keys, and no other worker can claim the job until the caller has recorded the step's
/// success in `tx` and committed it together with the new key's sealed secret.
pub async fn reconcile_access_key(
    ctx: &JobContext,
    step: &str,
    tx: &mut Transaction<'static, Postgres>,
    keys: &UserKeys<'_>,
    referenced: Option<&str>,
) -> Result<(KeyOutput, StepReport), JobError> {
    let listed = list(keys.iam, keys.user.iam_user_name()).await?;
    let ids: Vec<&str> = listed.iter().map(|k| k.id.as_str()).collect();
    let sealed = keys.sealed.get(ctx.pool(), sealed::Kind::AccessKey).await?;
    let keep = choose_key(&ids, sealed.as_ref().map(|h| h.key_id.as_str()), referenced);
    let deleted = delete_keys_except(keys, &ids, keep.as_ref()).await?;
    let (output, mut report) = match keep {
        Some(key) => {
            let outcome = if deleted.is_empty() {
                Outcome::AlreadyPresent
            } else {
                Outcome::Updated
            };
            (key, StepReport::new(outcome, json!({})))
        }
        None => {
            keys.sealed
                .forget(&mut **tx, sealed::Kind::AccessKey)
                .await?;
            create_sealed_key(ctx, step, tx, keys).await?
        }
    };
    report.detail = json!({
        "access_key_id": output.access_key_id,
        "source": output.source,
        "deleted": deleted,
    });
    Ok((output, report))
}

/// Deletes every key of the user except `keep` (and its description tag).
async fn delete_keys_except(
    keys: &UserKeys<'_>,
    ids: &[&str],
    keep: Option<&KeyOutput>,
) -> Result<Vec<String>, JobError> {
    let user = keys.user.iam_user_name();
    let mut deleted = Vec::new();
    for id in ids
        .iter()
        .filter(|id| Some(**id) != keep.map(|k| k.access_key_id.as_str()))
    {
        delete(keys.iam, user, id).await?;
        remove_description_tag(keys.iam, user, id).await?;
        deleted.push((*id).to_owned());
    }
    Ok(deleted)
}

/// Creates a key and seals its secret in `tx` (committed with the step's success). The
/// checkpoint `<step>:before-record` lies between the two.
pub async fn create_sealed_key(
    ctx: &JobContext,
    step: &str,
    tx: &mut Transaction<'static, Postgres>,
    keys: &UserKeys<'_>,
) -> Result<(KeyOutput, StepReport), JobError> {
    let new = create(keys.iam, keys.user.iam_user_name()).await?;
    ctx.checkpoint(step, "before-record");
    let kind = sealed::Kind::AccessKey;
    keys.sealed.put(tx, kind, &new.id, &new.secret).await?;
    let mut report = StepReport::new(Outcome::Created, json!({}));
    report.upstream_request_id = new.request_id.clone();
    let output = KeyOutput {
        access_key_id: new.id,
        source: KeySource::Created,
    };
    Ok((output, report))
}

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
    const SETTING: &str = "description_tag";
    let (value, truncated) = description_tag_value();
    let found = list_tags(iam, user)
        .await?
        .into_iter()
        .find(|(k, _)| k == key_id)
        .map(|(_, v)| v);
    let mut report = Report::new(TAG_KIND, format!("{user}/{key_id}"));
    let expected = json!(value);
    match found {
        Some(found) if found == value => report.unchanged(SETTING, expected),
        None => {
            report.created(tag_user(iam, user, key_id, &value).await?);
            report.made(SETTING, expected, None);
        }
        Some(found) => {
            let request_id = tag_user(iam, user, key_id, &value).await?;
            report.repaired(SETTING, json!(found), expected, Action::Update, request_id);
        }
    }
    Ok(report.into_step_report(description_detail(user, key_id, &value, truncated)))
}

/// The description tag's identifiers for the audit log (the text is the runbook's).
fn description_detail(user: &str, key_id: &str, value: &str, truncated: bool) -> serde_json::Value {
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
    detail
}

/// Writes the tag `<key id> = value` on the user; returns the request id.
async fn tag_user(
    iam: &Client,
    user: &str,
    key_id: &str,
    value: &str,
) -> Result<Option<String>, CloudError> {
    let out = iam
        .tag_user()
        .user_name(user)
        .set_tags(Some(tags(&[(key_id, value)])?))
        .send()
        .await
        .map_err(|e| classify(IAM, "TagUser", e))?;
    Ok(output_request_id(&out))
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
    fn a_held_key_wins_then_the_referenced_one_then_none() {
        let chosen = choose_key(&["AKIA1", "AKIA2"], Some("AKIA2"), Some("AKIA1")).unwrap();
        assert_eq!(
            (chosen.access_key_id.as_str(), chosen.source),
            ("AKIA2", KeySource::Sealed)
        );
        let chosen = choose_key(&["AKIA1"], Some("AKIA9"), Some("AKIA1")).unwrap();
        assert_eq!(
            (chosen.access_key_id.as_str(), chosen.source),
            ("AKIA1", KeySource::InSecret)
        );
        assert!(
            choose_key(&["AKIA1"], None, Some("AKIA9")).is_none(),
            "a key gone from IAM is not kept"
        );
        assert!(
            choose_key(&["AKIA1"], None, None).is_none(),
            "an orphan we hold no secret for is not kept"
        );
    }

    #[test]
    fn key_sources_keep_their_stored_names() {
        let names = [
            (KeySource::Created, "created"),
            (KeySource::Sealed, "held"),
            (KeySource::InSecret, "secret"),
        ];
        for (source, name) in names {
            assert_eq!(serde_json::to_value(source).unwrap(), json!(name));
            assert_eq!(
                serde_json::from_value::<KeySource>(json!(name)).unwrap(),
                source
            );
        }
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
