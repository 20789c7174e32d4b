//! Runbook section "Create an Access Key":
//!
//! > Create an access key for `pgbackrest` associated with the `PostgresCluster`.
//! >
//! > Description:
//! > > Used by pgbackrest associated with the PostgresCluster resource.  Refer to the
//! > > PostgresCluster resource pgbackrest.cofiguration.secret.name for the stored location of
//! > > the access key.  Synced from the Management Cluster using an ExternalSecret.
//!
//! The repository uses one key whose secret we have ([`reconcile_access_key`]): the one whose
//! secret is sealed in Postgres, else the active key the Secret references ([`plan_keys`]).
//! Orphans (no secret held, not referenced by the Secret) are deleted first, which leaves room
//! within IAM's two keys per user; a key is created only when none is usable, outside any
//! transaction, and its secret is sealed by the statement that records the step.
//! Make before break: the key the Secret references is never deleted here, even when it is
//! being replaced; the retire step ([`retire_keys_except`]) deletes it once the new key is
//! proven and in the Secret. The description is recorded the way the AWS console does: a user
//! tag whose key is the access key id ([`ensure_description_tag`]).
//!
//! Once the key is made, the credential check (`credential_check.rs`, not a runbook
//! step) proves it works before the Secret is written.

use std::fmt;

use aws_sdk_iam::Client;
use aws_sdk_iam::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_iam::operation::create_access_key::CreateAccessKeyError;
use chrono::{DateTime, Utc};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::report::{Action, Mode, Report, done};
use super::sealed;
use crate::cloud::aws::{classify, error_request_id, output_request_id};
use crate::cloud::{CloudError, Outcome, StepReport};
use crate::domain::BucketName;
use crate::jobs::{JobContext, JobError, StepDone};
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyOutput {
    pub access_key_id: String,
    pub source: KeySource,
}

/// The key to keep among the user's usable (active) keys `in_iam`: the one whose secret is
/// sealed in Postgres (made by an earlier attempt, not yet delivered), else the one the Secret
/// references. A key we hold no secret for is useless: the caller deletes it.
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

/// What the access key step does with the user's keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPlan {
    /// The key the repository uses from now on; `None`: a new key must be made.
    pub keep: Option<KeyOutput>,
    /// The key the Secret references, when it exists in IAM. It stays, usable or not, until
    /// the Secret holds its replacement (make before break): the retire step deletes it.
    pub in_use: Option<String>,
    /// Keys we hold no secret for that the Secret does not reference: deleted first, which
    /// leaves room for a new key within IAM's two.
    pub orphans: Vec<String>,
}

/// Decides from the user's keys, the key whose secret is sealed and the key the Secret
/// references. An inactive key is never kept (it cannot work), but one the Secret references
/// is not deleted here either.
pub fn plan_keys(in_iam: &[KeyInfo], sealed: Option<&str>, referenced: Option<&str>) -> KeyPlan {
    let active: Vec<&str> = in_iam
        .iter()
        .filter(|k| k.is_active())
        .map(|k| k.id.as_str())
        .collect();
    let keep = choose_key(&active, sealed, referenced);
    let in_use = referenced
        .filter(|id| in_iam.iter().any(|k| k.id == *id))
        .map(str::to_owned);
    let kept = keep.as_ref().map(|k| k.access_key_id.as_str());
    let orphans = in_iam
        .iter()
        .map(|k| k.id.clone())
        .filter(|id| Some(id.as_str()) != kept && Some(id) != in_use.as_ref())
        .collect();
    KeyPlan {
        keep,
        in_use,
        orphans,
    }
}

/// The IAM user whose keys the step reconciles, and where a new key's secret is sealed.
pub struct UserKeys<'a> {
    pub iam: &'a Client,
    /// The user is named after the bucket ([`BucketName::iam_user_name`]).
    pub user: &'a BucketName,
    pub sealed: sealed::Store<'a>,
}

/// Runs the access key step's attempt `attempt`: keeps the one key whose secret we have (sealed,
/// or in the Secret referencing `referenced`), deletes orphans, and creates a key only when
/// none is usable; records the step's success (with a new key's sealed secret).
///
/// No transaction is open during an IAM call: a worker cut off from Postgres must not keep
/// the job's row locked (the rescuer, cancel and heartbeats need it). What keeps a second
/// worker away is the lease, which a worker gives up before it expires (`jobs::runner`), and
/// the fence checked before any key is made and again when the result is recorded.
pub async fn reconcile_access_key(
    ctx: &JobContext,
    step: &str,
    attempt: i32,
    keys: &UserKeys<'_>,
    referenced: Option<&str>,
) -> Result<KeyOutput, JobError> {
    let (listed, ready) = (async { Ok(None) }, async {});
    reconcile_access_key_with(ctx, (step, attempt), keys, referenced, listed, ready).await
}

/// [`reconcile_access_key`] with the user's keys as `listed` (awaited after the step's own
/// reads of Postgres; `None`: listed here), recording the step's success only once
/// `before_record` is ready (for provisioning: the cipher pass is recorded): a new key's secret
/// is sealed then, by the same statement.
pub async fn reconcile_access_key_with(
    ctx: &JobContext,
    (step, attempt): (&str, i32),
    keys: &UserKeys<'_>,
    referenced: Option<&str>,
    listed: impl Future<Output = Result<Option<Vec<KeyInfo>>, JobError>>,
    before_record: impl Future<Output = ()>,
) -> Result<KeyOutput, JobError> {
    // The old key of a rotation in its grace period is neither kept nor deleted here.
    let repository_id = keys.sealed.repository_id;
    let in_grace = super::rotate::retirements::keys_in_grace(ctx.pool(), repository_id).await?;
    let sealed = keys.sealed.get(ctx.pool(), sealed::Kind::AccessKey).await?;
    // Deleting and creating keys is new work: not after a cancel, not without the lease. Checked
    // before the keys are awaited, so that the check does not delay a key the job waits for.
    ctx.check_lease_unless_cancelled().await?;
    let mut listed = match listed.await? {
        Some(listed) => listed,
        None => list(keys.iam, keys.user.iam_user_name()).await?,
    };
    listed.retain(|k| !in_grace.contains(&k.id) || Some(k.id.as_str()) == referenced);
    let plan = plan_keys(
        &listed,
        sealed.as_ref().map(|h| h.key_id.as_str()),
        referenced,
    );
    let deleted = delete_keys(keys, &plan.orphans).await?;
    let (output, mut report, new) = match plan.keep.clone() {
        Some(key) => {
            let outcome = if deleted.is_empty() {
                Outcome::AlreadyPresent
            } else {
                Outcome::Updated
            };
            (key, StepReport::new(outcome, json!({})), None)
        }
        None => {
            let (output, report, new) =
                create_key(ctx, step, keys, &deleted, before_record).await?;
            (output, report, Some(new))
        }
    };
    report.detail = json!({
        "access_key_id": output.access_key_id,
        "source": output.source,
        "deleted": deleted,
        "kept_until_replaced": plan.in_use.filter(|id| *id != output.access_key_id),
    });
    record(
        ctx,
        step,
        attempt,
        keys,
        new.as_ref(),
        done(output.clone(), report),
    )
    .await?;
    Ok(output)
}

/// Records the step's success in one fenced statement, together with the sealed secret of a
/// key this attempt made (one round trip after CreateAccessKey answers). Recorded even after a
/// cancel: the key exists now, and its secret is lost unless sealed.
async fn record(
    ctx: &JobContext,
    step: &str,
    attempt: i32,
    keys: &UserKeys<'_>,
    new: Option<&NewAccessKey>,
    finished: StepDone<KeyOutput>,
) -> Result<(), JobError> {
    let Some(new) = new else {
        return ctx
            .record_success_with(step, attempt, &finished, None, |query| query)
            .await;
    };
    let sealed = keys.sealed.seal_access_key(&new.id, &new.secret);
    let store = sealed::SealedRow::store_with_success();
    ctx.record_success_with(step, attempt, &finished, Some(&store), |query| {
        sealed.bind(query)
    })
    .await
}

/// Deletes the given keys of the user (and their description tags).
async fn delete_keys(keys: &UserKeys<'_>, ids: &[String]) -> Result<Vec<String>, JobError> {
    let user = keys.user.iam_user_name();
    for id in ids {
        delete(keys.iam, user, id).await?;
        remove_description_tag(keys.iam, user, id).await?;
    }
    Ok(ids.to_vec())
}

/// Creates a key; the caller seals its secret with the step's success. The checkpoint
/// `<step>:before-record` lies between the two: a worker that dies there leaves an orphan
/// (no secret held, not in the Secret) that the next attempt deletes before making a key.
async fn create_key(
    ctx: &JobContext,
    step: &str,
    keys: &UserKeys<'_>,
    deleted: &[String],
    before_record: impl Future<Output = ()>,
) -> Result<(KeyOutput, StepReport, NewAccessKey), JobError> {
    let new = create_after_deleting(keys.iam, keys.user.iam_user_name(), deleted).await?;
    before_record.await;
    ctx.checkpoint(step, "before-record");
    let mut report = StepReport::new(Outcome::Created, json!({}));
    report.upstream_request_id = new.request_id.clone();
    let output = KeyOutput {
        access_key_id: new.id.clone(),
        source: KeySource::Created,
    };
    Ok((output, report, new))
}

/// The retire step: deletes every key of the user except `keep`, the key the Secret holds now
/// (and their description tags). Runs after the Secret is written and read back, so the key it
/// replaced is deleted only once workloads can use the new one.
pub async fn retire_keys_except(
    iam: &Client,
    user: &str,
    keep: &str,
) -> Result<StepReport, CloudError> {
    retire_keys_sparing(iam, user, keep, &[]).await
}

/// Like [`retire_keys_except`], but also keeps the keys in `in_grace`: old keys of a rotation
/// whose grace period runs (`rotate::retirements::keys_in_grace`); consumers may still use them,
/// and their own schedule deactivates and deletes them.
pub async fn retire_keys_sparing(
    iam: &Client,
    user: &str,
    keep: &str,
    in_grace: &[String],
) -> Result<StepReport, CloudError> {
    let listed = list(iam, user).await?;
    retire_listed_keys(iam, user, keep, in_grace, &listed).await
}

/// [`retire_keys_sparing`] on the user's keys as `listed` (after the key the Secret holds now
/// was made, so no key is missing from it; one already deleted counts as deleted).
pub async fn retire_listed_keys(
    iam: &Client,
    user: &str,
    keep: &str,
    in_grace: &[String],
    listed: &[KeyInfo],
) -> Result<StepReport, CloudError> {
    let mut deleted = Vec::new();
    for key in listed
        .iter()
        .filter(|k| k.id != keep && !in_grace.contains(&k.id))
    {
        delete(iam, user, &key.id).await?;
        remove_description_tag(iam, user, &key.id).await?;
        deleted.push(key.id.clone());
    }
    let outcome = if deleted.is_empty() {
        Outcome::AlreadyPresent
    } else {
        Outcome::Deleted
    };
    let detail = json!({
        "user_name": user, "kept": keep, "deleted": deleted, "kept_in_grace": in_grace,
    });
    Ok(StepReport::new(outcome, detail))
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

/// Creates a new access key for the user. IAM allows two keys per user (`LimitExceeded`,
/// permanent here: nothing says the user had room).
pub async fn create(iam: &Client, user: &str) -> Result<NewAccessKey, CloudError> {
    create_with_room(iam, user, None).await
}

/// Like [`create`], right after the access key step listed the user's keys and deleted
/// `deleted` (maybe none) so that at most one is left: IAM had room (see [`create_error`]).
pub async fn create_after_deleting(
    iam: &Client,
    user: &str,
    deleted: &[String],
) -> Result<NewAccessKey, CloudError> {
    create_with_room(iam, user, Some(deleted)).await
}

async fn create_with_room(
    iam: &Client,
    user: &str,
    room: Option<&[String]>,
) -> Result<NewAccessKey, CloudError> {
    let out = iam
        .create_access_key()
        .user_name(user)
        .send()
        .await
        .map_err(|e| create_error(e, room))?;
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

/// Classifies a CreateAccessKey failure. `room`: the caller had just listed the user's keys and,
/// after deleting those (maybe none), left at most one. Then `LimitExceeded` is retryable:
/// - IAM keeps counting a deleted key against the limit of two for a while;
/// - keys were made since the listing: a CreateAccessKey whose answer was lost makes a key,
///   and the SDK's retry of it another (two lost answers fill the quota), or a key IAM did not
///   list yet (eventual consistency).
///
/// The next attempt lists again and deletes the keys it holds no secret for before making one.
/// Without `room` it is the quota: permanent, as everywhere else.
pub fn create_error(err: SdkError<CreateAccessKeyError>, room: Option<&[String]>) -> CloudError {
    let limit = matches!(err.code(), Some("LimitExceeded" | "LimitExceededException"));
    let Some(deleted) = room.filter(|_| limit) else {
        return classify(IAM, "CreateAccessKey", err);
    };
    let message = if deleted.is_empty() {
        "the user had at most one access key when this step listed them, so keys were made \
         since (a CreateAccessKey whose answer was lost and that was retried, or a key IAM did \
         not list yet); the next attempt deletes the keys no secret is held for [LimitExceeded]"
            .to_owned()
    } else {
        format!(
            "IAM still counts the access keys just deleted ({}) against the limit of two per \
             user; retrying [LimitExceeded]",
            deleted.join(", ")
        )
    };
    CloudError::Retryable {
        service: IAM,
        operation: "CreateAccessKey",
        message,
        request_id: error_request_id(&err),
    }
}

/// Whether `err` is [`create_error`]'s retryable `LimitExceeded`: the step saw room, but IAM
/// has not shown it the keys made since or still counts the ones it deleted. Both pass within
/// seconds, so a step may list again and retry at once rather than fail its attempt.
pub fn is_room_not_yet_visible(err: &CloudError) -> bool {
    matches!(err, CloudError::Retryable { operation: "CreateAccessKey", message, .. }
        if message.ends_with("[LimitExceeded]"))
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

/// The job step that puts the runbook's description tag on `key_id` (provisioning's
/// `access_key_description`, rotation's `new_key_description`): `step` is its stored name and
/// position.
pub async fn description_step(
    ctx: &JobContext,
    step: (&'static str, i32),
    iam: &Client,
    user: &str,
    key_id: &str,
) -> Result<(), JobError> {
    description_step_with(ctx, step, (iam, user, key_id), None, async {}).await
}

/// [`description_step`] with the user's tags as already read this attempt (`None`: read
/// here), recording the step only once `before_record` is ready.
pub async fn description_step_with(
    ctx: &JobContext,
    step: (&'static str, i32),
    (iam, user, key_id): (&Client, &str, &str),
    tags: Option<Vec<(String, String)>>,
    before_record: impl Future<Output = ()>,
) -> Result<(), JobError> {
    ctx.step(step.0, step.1, async {
        let (value, truncated) = description_tag_value();
        let mut report = Report::with_mode(TAG_KIND, format!("{user}/{key_id}"), Mode::Apply);
        let tags = match tags {
            Some(tags) => tags,
            None => list_tags(iam, user).await?,
        };
        let found = record_description_tag(iam, (user, key_id), tags, &mut report).await?;
        if found.is_none() {
            report.created(None);
        }
        before_record.await;
        let detail = description_detail(user, key_id, &value, truncated);
        Ok(done((), report.into_step_report(detail)))
    })
    .await
}

/// Records the access key description as the user tag `<key id> = DESCRIPTION`, as the AWS
/// console does. Reads the user's tags first; writes only if the tag is missing or different.
pub async fn ensure_description_tag(
    iam: &Client,
    user: &str,
    key_id: &str,
) -> Result<StepReport, CloudError> {
    ensure_description_tag_with(iam, user, key_id, Mode::Apply).await
}

/// [`ensure_description_tag`] in `mode` (plan mode: the tag that would be written, no write).
pub async fn ensure_description_tag_with(
    iam: &Client,
    user: &str,
    key_id: &str,
    mode: Mode,
) -> Result<StepReport, CloudError> {
    let (value, truncated) = description_tag_value();
    let mut report = Report::with_mode(TAG_KIND, format!("{user}/{key_id}"), mode);
    let found = check_description_tag(iam, user, key_id, &mut report).await?;
    if found.is_none() {
        report.created(None);
    }
    Ok(report.into_step_report(description_detail(user, key_id, &value, truncated)))
}

/// Records the setting `description_tag` of key `key_id` in `report` (the report's mode
/// decides whether a missing or different tag is written). A missing tag is recorded as
/// `create`. Returns the value found.
pub async fn check_description_tag(
    iam: &Client,
    user: &str,
    key_id: &str,
    report: &mut Report,
) -> Result<Option<String>, CloudError> {
    let tags = list_tags(iam, user).await?;
    record_description_tag(iam, (user, key_id), tags, report).await
}

/// [`check_description_tag`] on the user's `tags` as read.
async fn record_description_tag(
    iam: &Client,
    (user, key_id): (&str, &str),
    tags: Vec<(String, String)>,
    report: &mut Report,
) -> Result<Option<String>, CloudError> {
    const SETTING: &str = "description_tag";
    let (value, _) = description_tag_value();
    let found = tags.into_iter().find(|(k, _)| k == key_id).map(|(_, v)| v);
    let expected = json!(value);
    match &found {
        Some(found) if *found == value => report.unchanged(SETTING, expected),
        None => {
            let request_id = report.perform(tag_user(iam, user, key_id, &value)).await?;
            report.made(SETTING, expected, request_id);
        }
        Some(found) => {
            let request_id = report.perform(tag_user(iam, user, key_id, &value)).await?;
            report.repaired(SETTING, json!(found), expected, Action::Update, request_id);
        }
    }
    Ok(found)
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
    use aws_sdk_iam::config::http::HttpResponse;
    use aws_sdk_iam::error::ErrorMetadata;
    use aws_smithy_types::body::SdkBody;

    use super::*;

    fn create_failure(code: &str, status: u16) -> SdkError<CreateAccessKeyError> {
        let meta = ErrorMetadata::builder()
            .code(code)
            .message("Cannot exceed quota for AccessKeysPerUser: 2")
            .build();
        let response = HttpResponse::new(status.try_into().unwrap(), SdkBody::empty());
        SdkError::service_error(CreateAccessKeyError::generic(meta), response)
    }

    #[test]
    fn limit_exceeded_when_the_step_saw_room_is_retryable() {
        let deleted = ["AKIAOLD1".to_owned(), "AKIAOLD2".to_owned()];
        let e = create_error(create_failure("LimitExceeded", 409), Some(&deleted));
        assert!(e.is_retryable(), "{e}");
        assert!(e.to_string().contains("AKIAOLD1, AKIAOLD2"), "{e}");
        // Nothing deleted, but the listing left room: keys were made since (lost answers).
        let e = create_error(create_failure("LimitExceeded", 409), Some(&[]));
        assert!(e.is_retryable(), "{e}");
        assert!(e.to_string().contains("answer was lost"), "{e}");
        assert!(is_room_not_yet_visible(&e));
        // Nothing known about the user's keys: the quota itself, permanent.
        let e = create_error(create_failure("LimitExceeded", 409), None);
        assert!(!is_room_not_yet_visible(&e));
        assert!(!e.is_retryable(), "{e}");
        assert!(e.to_string().contains("delete unused keys"), "{e}");
        // Other errors keep their classification.
        let e = create_error(create_failure("AccessDenied", 403), Some(&deleted));
        assert!(!e.is_retryable(), "{e}");
        let e = create_error(create_failure("Throttling", 400), None);
        assert!(e.is_retryable(), "{e}");
    }

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

    fn key(id: &str, active: bool) -> KeyInfo {
        KeyInfo {
            id: id.to_owned(),
            status: if active { "Active" } else { "Inactive" }.to_owned(),
            created: None,
        }
    }

    #[test]
    fn the_key_the_secret_references_is_never_deleted_before_its_replacement() {
        // A held key is delivered; the Secret's key stays until the retire step.
        let plan = plan_keys(&[key("A", true), key("B", true)], Some("B"), Some("A"));
        assert_eq!(
            plan.keep.map(|k| (k.access_key_id, k.source)),
            Some(("B".into(), KeySource::Sealed))
        );
        assert_eq!((plan.in_use.as_deref(), plan.orphans), (Some("A"), vec![]));
        // An inactive key in the Secret is replaced, not deleted first; an orphan makes room.
        let plan = plan_keys(&[key("A", false), key("C", true)], None, Some("A"));
        assert_eq!(plan.keep, None);
        assert_eq!(
            (plan.in_use.as_deref(), plan.orphans),
            (Some("A"), vec!["C".to_owned()])
        );
        // A working key in the Secret is kept; an inactive held key is an orphan.
        let plan = plan_keys(&[key("A", true), key("B", false)], Some("B"), Some("A"));
        assert_eq!(plan.keep.map(|k| k.source), Some(KeySource::InSecret));
        assert_eq!(plan.orphans, vec!["B".to_owned()]);
    }

    #[test]
    fn a_plan_never_needs_more_than_two_keys() {
        let ids = ["A", "B"];
        let choices = [None, Some("A"), Some("B"), Some("Z")];
        for n in 0..=2 {
            for activity in 0..4u8 {
                let in_iam: Vec<KeyInfo> = (0..n)
                    .map(|i| key(ids[i], activity & (1 << i) != 0))
                    .collect();
                for sealed in choices {
                    for referenced in choices {
                        let plan = plan_keys(&in_iam, sealed, referenced);
                        let left = in_iam.len() - plan.orphans.len();
                        let made = usize::from(plan.keep.is_none());
                        assert!(
                            left + made <= 2,
                            "{in_iam:?} {sealed:?} {referenced:?}: {plan:?}"
                        );
                        if let Some(id) = &plan.in_use {
                            assert!(!plan.orphans.contains(id), "{plan:?}");
                        }
                    }
                }
            }
        }
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
