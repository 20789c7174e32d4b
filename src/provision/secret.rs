//! Runbook section "Create the Secret":
//!
//! > Create a `Secret` in the holos management cluster usable by pgbackrest.  This is a secret
//! > with a single key, `s3.conf` with the following format:
//! > ```text
//! > [global]
//! > repo2-cipher-pass=
//! > repo2-s3-key=
//! > repo2-s3-key-secret=
//! > repo3-cipher-pass=
//! > repo3-s3-key=
//! > repo3-s3-key-secret=
//! > ```
//! > Use the same values for repo2 and repo3.  The purpose is to make space for migrating if
//! > need be in the future.
//! >
//! > Store the secret into the management cluster:
//! > `holos create secret --namespace zitadel holos-zitadel-backups --append-hash=false --from-file .`
//!
//! (The cipher pass itself, generated with the runbook's `tr -dc` line, is in `cipher_pass.rs`.)
//!
//! [`S3Conf`] renders and parses that text. [`s3_conf`] gathers its values: the cipher pass and
//! the access key's secret from wherever a copy is held. [`apply`] writes the Secret: named
//! after the bucket, in the repository's namespace, `Opaque`, exactly one data key `s3.conf`,
//! written with server-side apply (field manager [`FIELD_MANAGER`]) and labelled
//! `app.kubernetes.io/managed-by: backup-provisioner`. A Secret without that label is someone
//! else's and is only taken over when asked to (`adopt_existing_secret`, see
//! [`refuse_unmanaged`]).

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{ObjectMeta, Patch, PatchParams};
use secrecy::zeroize::Zeroize as _;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value, json};
use sqlx::PgPool;

use super::report::{Action, Mode, Report};
use super::sealed::{self, SealedError};
use crate::cloud::kube::{SERVICE, classify};
use crate::cloud::{CloudError, StepReport};
use crate::domain::{BucketName, Namespace, RepositoryName};
use crate::jobs::{JobContext, JobError};

/// The server-side apply field manager of every write.
pub const FIELD_MANAGER: &str = "backup-provisioner";
/// The one data key of the Secret.
pub const S3_CONF_KEY: &str = "s3.conf";
/// Marks a Secret as ours; its value is [`FIELD_MANAGER`].
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Repeats the Secret's name (Holos convention).
pub const SECRET_NAME_LABEL: &str = "holos.run/secret.name";
/// The Secret type.
pub const SECRET_TYPE: &str = "Opaque";

/// The credentials pgBackRest reads from `s3.conf` (the same values for repo2 and repo3).
#[derive(Clone)]
pub struct S3Conf {
    pub cipher_pass: SecretString,
    pub access_key_id: String,
    pub secret_access_key: SecretString,
}

impl fmt::Debug for S3Conf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Conf")
            .field("cipher_pass", &"[REDACTED]")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"[REDACTED]")
            .finish()
    }
}

/// `s3.conf` text that lacks a required setting (values are never included).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("s3.conf has no value for {}", missing.join(", "))]
pub struct S3ConfError {
    pub missing: Vec<&'static str>,
}

const CIPHER_PASS: &str = "repo2-cipher-pass";
const S3_KEY: &str = "repo2-s3-key";
const S3_KEY_SECRET: &str = "repo2-s3-key-secret";

impl S3Conf {
    /// The exact `s3.conf` text (with a trailing newline).
    pub fn render(&self) -> SecretString {
        let cipher = self.cipher_pass.expose_secret();
        let key = &self.access_key_id;
        let secret = self.secret_access_key.expose_secret();
        let mut text = String::with_capacity(256);
        text.push_str("[global]\n");
        for repo in ["repo2", "repo3"] {
            text.push_str(&format!("{repo}-cipher-pass={cipher}\n"));
            text.push_str(&format!("{repo}-s3-key={key}\n"));
            text.push_str(&format!("{repo}-s3-key-secret={secret}\n"));
        }
        SecretString::from(text)
    }

    /// Reads the repo2 settings of an `s3.conf` (spacing around `=` and blank lines, comments
    /// and section headers are tolerated). Empty values count as missing.
    pub fn parse(text: &str) -> Result<S3Conf, S3ConfError> {
        let (cipher_pass, access_key_id, secret_access_key) = read_fields(text);
        match (cipher_pass, access_key_id, secret_access_key) {
            (Some(cipher_pass), Some(access_key_id), Some(secret_access_key)) => Ok(S3Conf {
                cipher_pass,
                access_key_id,
                secret_access_key,
            }),
            (c, k, s) => Err(S3ConfError {
                missing: [
                    (c.is_none(), CIPHER_PASS),
                    (k.is_none(), S3_KEY),
                    (s.is_none(), S3_KEY_SECRET),
                ]
                .into_iter()
                .filter_map(|(m, name)| m.then_some(name))
                .collect(),
            }),
        }
    }
}

/// The repo2 cipher pass, key id and key secret of an `s3.conf`, each if present and non-empty.
fn read_fields(text: &str) -> (Option<SecretString>, Option<String>, Option<SecretString>) {
    let (mut cipher_pass, mut access_key_id, mut secret_access_key) = (None, None, None);
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with(['#', ';', '[']) {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim();
        if value.is_empty() {
            continue;
        }
        match key.trim() {
            CIPHER_PASS => cipher_pass = Some(SecretString::from(value.to_owned())),
            S3_KEY => access_key_id = Some(value.to_owned()),
            S3_KEY_SECRET => secret_access_key = Some(SecretString::from(value.to_owned())),
            _ => {}
        }
    }
    (cipher_pass, access_key_id, secret_access_key)
}

/// The Secret as found in the cluster.
#[derive(Debug, Clone)]
pub struct ExistingSecret {
    /// Labelled `app.kubernetes.io/managed-by: backup-provisioner`.
    pub managed_by_us: bool,
    /// Its `s3.conf`, when present and complete.
    pub conf: Option<S3Conf>,
    /// The cipher pass in its `s3.conf`, even when the rest is incomplete: backups are
    /// encrypted with it, so it is reused whenever a copy exists.
    pub cipher_pass: Option<SecretString>,
    /// The access key id in its `s3.conf`, even when the rest is incomplete: workload
    /// clusters may still use that key.
    pub access_key_id: Option<String>,
    pub resource_version: Option<String>,
}

fn s3_conf_bytes(secret: &Secret) -> Option<&[u8]> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(S3_CONF_KEY))
        .map(|b| b.0.as_slice())
}

fn is_managed_by_us(secret: &Secret) -> bool {
    secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .is_some_and(|v| v == FIELD_MANAGER)
}

fn existing_from(secret: &Secret) -> ExistingSecret {
    let text = s3_conf_bytes(secret).and_then(|b| std::str::from_utf8(b).ok());
    ExistingSecret {
        managed_by_us: is_managed_by_us(secret),
        conf: text.and_then(|text| S3Conf::parse(text).ok()),
        cipher_pass: text.and_then(|text| read_fields(text).0),
        access_key_id: text.and_then(|text| read_fields(text).1),
        resource_version: secret.metadata.resource_version.clone(),
    }
}

fn secrets(client: &kube::Client, namespace: &str) -> Api<Secret> {
    Api::namespaced(client.clone(), namespace)
}

/// Reads the Secret `namespace/name`; `None` when it does not exist.
pub async fn read(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<Option<ExistingSecret>, CloudError> {
    let secret = secrets(client, namespace)
        .get_opt(name)
        .await
        .map_err(|e| classify("get secret", e))?;
    Ok(secret.as_ref().map(existing_from))
}

fn desired_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (SECRET_NAME_LABEL.to_owned(), name.to_owned()),
        (MANAGED_BY_LABEL.to_owned(), FIELD_MANAGER.to_owned()),
    ])
}

fn data_keys(secret: &Secret) -> Vec<String> {
    secret
        .data
        .as_ref()
        .map(|d| d.keys().cloned().collect())
        .unwrap_or_default()
}

fn secret_type(secret: &Secret) -> &str {
    secret.type_.as_deref().unwrap_or(SECRET_TYPE)
}

/// Labels, type, keys and `s3.conf` text all as we would write them.
fn is_up_to_date(secret: &Secret, name: &str, text: &str) -> bool {
    let labels = secret.metadata.labels.clone().unwrap_or_default();
    desired_labels(name)
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
        && secret_type(secret) == SECRET_TYPE
        && data_keys(secret) == [S3_CONF_KEY]
        && s3_conf_bytes(secret) == Some(text.as_bytes())
}

/// The audit detail: identifiers and key names only, never values.
fn detail(
    namespace: &str,
    name: &str,
    secret: &Secret,
    extra: serde_json::Value,
) -> serde_json::Value {
    let mut detail = json!({
        "namespace": namespace,
        "name": name,
        "resource_version": secret.metadata.resource_version,
        "keys": data_keys(secret),
    });
    if let (Some(d), Some(e)) = (detail.as_object_mut(), extra.as_object()) {
        d.extend(e.clone());
    }
    detail
}

fn permanent(message: String) -> CloudError {
    CloudError::permanent(SERVICE, "apply secret", message)
}

/// The resource kind in the step's report.
pub const KIND: &str = "kube-secret";

/// The Secret of one repository: named after its bucket, in its namespace.
#[derive(Debug, Clone, Copy)]
pub struct RepositorySecret<'a> {
    pub repository: &'a RepositoryName,
    pub namespace: &'a Namespace,
    pub bucket: &'a BucketName,
}

/// Stops the job before anything is changed when the Secret exists and is someone else's,
/// unless the request asked to adopt it.
pub fn refuse_unmanaged(
    existing: Option<&ExistingSecret>,
    secret: RepositorySecret<'_>,
    adopt: bool,
) -> Result<(), JobError> {
    match existing {
        Some(s) if !s.managed_by_us && !adopt => Err(JobError::Permanent(format!(
            "Secret {}/{} exists and is not managed by backup-provisioner; it was left untouched. \
             Remove it, or create the repository with \"adopt_existing_secret\": true to take it over \
             (its cipher pass is kept)",
            secret.namespace, secret.bucket
        ))),
        _ => Ok(()),
    }
}

/// The field manager of [`preflight`]'s dry run: not [`FIELD_MANAGER`], so that applying
/// only the labels does not give up our other fields (which, even in a dry run, would remove
/// `s3.conf` and fail on an immutable Secret).
const PREFLIGHT_FIELD_MANAGER: &str = "backup-provisioner-preflight";

/// Proves, before the first AWS change, that the Secret can be written: a server-side apply
/// of its labels with `dryRun=All`, which changes nothing. A missing namespace answers
/// NotFound and a missing `patch`/`create` permission Forbidden, both permanent errors that
/// name what to fix; nothing cluster-scoped is read (the service's Role is namespaced).
pub async fn preflight(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<(), CloudError> {
    let labels_only = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(desired_labels(name)),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut params = PatchParams::apply(PREFLIGHT_FIELD_MANAGER).force();
    params.dry_run = true;
    secrets(client, namespace)
        .patch(name, &params, &Patch::Apply(&labels_only))
        .await
        .map_err(|e| classify("apply secret (dry run)", e))?;
    Ok(())
}

/// Why the Secret's content cannot be put together.
#[derive(Debug)]
pub enum NotAssembled {
    /// The access key's secret is held nowhere: the key steps must run again and make a key.
    KeySecretGone(JobError),
    /// Anything else (e.g. the cipher pass is lost): the error says what to do.
    Failed(JobError),
}

impl From<SealedError> for NotAssembled {
    fn from(err: SealedError) -> Self {
        NotAssembled::Failed(err.into())
    }
}

/// The Secret's content: the cipher pass and the secret of access key `access_key_id`, each
/// from wherever we hold it (the existing Secret, or sealed in Postgres).
pub async fn s3_conf(
    db: &PgPool,
    sealed: sealed::Store<'_>,
    existing: Option<&ExistingSecret>,
    access_key_id: &str,
    secret: RepositorySecret<'_>,
) -> Result<S3Conf, NotAssembled> {
    let cipher_pass = cipher_pass_held(db, sealed, existing, secret).await?;
    let secret_access_key = key_secret_held(db, sealed, existing, access_key_id).await?;
    Ok(S3Conf {
        cipher_pass,
        access_key_id: access_key_id.to_owned(),
        secret_access_key,
    })
}

/// [`s3_conf`] for the job `ctx`: when the key's secret is held nowhere, its `key_steps` are
/// reset, so that the next attempt runs them again and makes a new key.
pub async fn s3_conf_in_job(
    ctx: &JobContext,
    sealed: sealed::Store<'_>,
    existing: Option<&ExistingSecret>,
    access_key_id: &str,
    secret: RepositorySecret<'_>,
    key_steps: &[&str],
) -> Result<S3Conf, JobError> {
    match s3_conf(ctx.pool(), sealed, existing, access_key_id, secret).await {
        Ok(conf) => Ok(conf),
        Err(NotAssembled::Failed(err)) => Err(err),
        Err(NotAssembled::KeySecretGone(err)) => {
            ctx.reset_steps(key_steps).await?;
            Err(err)
        }
    }
}

/// The cipher pass in the Secret, else the one sealed in Postgres.
async fn cipher_pass_held(
    db: &PgPool,
    sealed: sealed::Store<'_>,
    existing: Option<&ExistingSecret>,
    secret: RepositorySecret<'_>,
) -> Result<SecretString, NotAssembled> {
    // The Secret's pass first: a sealed copy no configured key opens does not matter then.
    if let Some(pass) = existing.and_then(|s| s.cipher_pass.clone()) {
        return Ok(pass);
    }
    match sealed.get(db, sealed::Kind::CipherPass).await? {
        Some(held) => Ok(held.secret),
        None => Err(NotAssembled::Failed(JobError::Permanent(format!(
            "the cipher pass for {} is no longer available: the Secret {}/{} disappeared after it was read. \
             Restore the Secret (backups are encrypted with its cipher pass), then retry",
            secret.repository, secret.namespace, secret.bucket
        )))),
    }
}

/// The key's secret sealed in Postgres, else the one in the Secret (same key id only).
async fn key_secret_held(
    db: &PgPool,
    sealed: sealed::Store<'_>,
    existing: Option<&ExistingSecret>,
    access_key_id: &str,
) -> Result<SecretString, NotAssembled> {
    let current = existing.and_then(|s| s.conf.as_ref());
    match sealed.get(db, sealed::Kind::AccessKey).await? {
        Some(held) if held.key_id == access_key_id => Ok(held.secret),
        _ => match current {
            Some(conf) if conf.access_key_id == access_key_id => Ok(conf.secret_access_key.clone()),
            // The key's secret is gone (e.g. the Secret changed meanwhile): make a new key.
            _ => Err(NotAssembled::KeySecretGone(JobError::Retryable(format!(
                "no secret is held for access key {access_key_id}; a new key will be made on the next attempt"
            )))),
        },
    }
}

/// The version of the Secret an `s3.conf` was built from (its cipher pass, the key it
/// references): [`apply_built_from`] never writes over a later one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basis<'a> {
    /// Whatever the apply itself reads (the content does not depend on an earlier read).
    Current,
    /// The Secret as an earlier [`read`] found it: its `resourceVersion`, `None` when it did
    /// not exist.
    Read(Option<&'a str>),
}

impl<'a> Basis<'a> {
    /// The basis of content built from what [`read`] returned.
    pub fn of(read: Option<&'a ExistingSecret>) -> Basis<'a> {
        match read {
            None => Basis::Read(None),
            Some(secret) => secret
                .resource_version
                .as_deref()
                .map_or(Basis::Current, |version| Basis::Read(Some(version))),
        }
    }
}

/// Makes the Secret `namespace/name` hold exactly `conf` (see [`apply_built_from`]), whatever
/// version of it is there.
pub async fn apply(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    conf: &S3Conf,
    adopt: bool,
) -> Result<StepReport, CloudError> {
    apply_built_from(client, namespace, name, conf, adopt, Basis::Current).await
}

/// Makes the Secret `namespace/name` hold exactly `conf`, which was built from the version
/// `basis` of it.
///
/// Reads first: a Secret we do not manage is refused unless `adopt`; one we manage that
/// already matches is `AlreadyPresent` with no write at all. A Secret that changed since
/// `basis` (someone else wrote it; it may hold a newer cipher pass) is not written over: a
/// retryable error, and the next attempt builds `s3.conf` from it. Otherwise it is written
/// with server-side apply (forced, field manager [`FIELD_MANAGER`]) carrying the
/// `resourceVersion` just read, so a write by someone else in between makes the server refuse
/// ours (409, retryable) instead of our apply overwriting it; other data keys are removed, and
/// the Secret is read back to check that `s3.conf` holds what was written.
pub async fn apply_built_from(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    conf: &S3Conf,
    adopt: bool,
    basis: Basis<'_>,
) -> Result<StepReport, CloudError> {
    let api = secrets(client, namespace);
    let current = api
        .get_opt(name)
        .await
        .map_err(|e| classify("get secret", e))?;
    let text = conf.render();
    let text = text.expose_secret();
    let mut report = Report::new(KIND, format!("{namespace}/{name}"));
    let adopted = match &current {
        None => {
            record_new(name, &conf.access_key_id, &mut report);
            false
        }
        Some(existing) => {
            let ours = admit(existing, namespace, name, adopt)?;
            compare(existing, name, text, &conf.access_key_id, &mut report);
            if ours && is_up_to_date(existing, name, text) {
                let detail = detail(namespace, name, existing, json!({}));
                return Ok(report.into_step_report(detail));
            }
            check_unchanged(existing, basis, namespace, name)?;
            check_writable(existing, namespace, name)?;
            !ours
        }
    };
    // A Secret deleted since `basis` is made again: there is nothing newer to keep.
    let version = current
        .as_ref()
        .and_then(|c| c.metadata.resource_version.clone());
    let written = write(&api, namespace, name, text, version).await?;
    let removed = remove_other_keys(&api, name, &written).await?;
    let back = read_back(&api, namespace, name, text).await?;
    let facts = json!({ "adopted": adopted, "removed_keys": removed });
    Ok(report.into_step_report(detail(namespace, name, &back, facts)))
}

/// A Secret we do not manage is refused unless `adopt`. Returns whether it is ours.
fn admit(existing: &Secret, namespace: &str, name: &str, adopt: bool) -> Result<bool, CloudError> {
    let ours = is_managed_by_us(existing);
    if !ours && !adopt {
        return Err(permanent(format!(
            "Secret {namespace}/{name} exists and is not managed by backup-provisioner (no \
             label {MANAGED_BY_LABEL}={FIELD_MANAGER}); it was left untouched. Remove it, or \
             set adopt_existing_secret: true to take it over"
        )));
    }
    Ok(ours)
}

/// A Secret that changed since the version `basis` the content was built from is newer than
/// what we would write: it is left as it is, and the retry builds from it.
fn check_unchanged(
    existing: &Secret,
    basis: Basis<'_>,
    namespace: &str,
    name: &str,
) -> Result<(), CloudError> {
    let Basis::Read(read) = basis else {
        return Ok(());
    };
    let now = existing.metadata.resource_version.as_deref();
    if read.is_some() && read == now {
        return Ok(());
    }
    let since = match read {
        Some(version) => format!(
            "resourceVersion {version}, now {}",
            now.unwrap_or("unknown")
        ),
        None => "it did not exist then".to_owned(),
    };
    Err(CloudError::retryable(
        SERVICE,
        "apply secret",
        format!(
            "Secret {namespace}/{name} changed after this attempt read it ({since}); it was not \
             overwritten: the next attempt builds s3.conf from it"
        ),
    ))
}

/// A Secret of another type, or an immutable one, cannot be made to hold our `s3.conf`.
fn check_writable(existing: &Secret, namespace: &str, name: &str) -> Result<(), CloudError> {
    if secret_type(existing) != SECRET_TYPE {
        return Err(permanent(format!(
            "Secret {namespace}/{name} has type {:?}, but pgBackRest's s3.conf needs an \
             {SECRET_TYPE} Secret and a Secret's type cannot be changed; delete it, then retry",
            secret_type(existing)
        )));
    }
    if existing.immutable == Some(true) {
        return Err(permanent(format!(
            "Secret {namespace}/{name} is immutable and does not hold the expected s3.conf; \
             delete it, then retry"
        )));
    }
    Ok(())
}

/// A new Secret gets every setting at once.
fn record_new(name: &str, access_key_id: &str, report: &mut Report) {
    report.created(None);
    report.made("labels", json!(desired_labels(name)), None);
    report.made("type", json!(SECRET_TYPE), None);
    report.made("keys", json!([S3_CONF_KEY]), None);
    report.made(S3_CONF_KEY, json!(s3_conf_for(access_key_id)), None);
}

/// Records each setting of an existing Secret against what [`apply`] writes.
fn compare(existing: &Secret, name: &str, text: &str, access_key_id: &str, report: &mut Report) {
    compare_metadata(existing, name, report);
    compare_s3_conf(existing, text, access_key_id, report);
}

/// Records the labels, type and data keys of an existing Secret against the runbook's.
pub fn compare_metadata(existing: &Secret, name: &str, report: &mut Report) {
    compare_labels(existing, name, report);
    compare_type(existing, report);
    compare_keys(existing, report);
}

/// What [`apply`] would do to the Secret `namespace/name`, read-only (plan mode): `conf` is
/// the content it would write when known (the key and cipher pass the Secret already holds);
/// `None` stands for an `s3.conf` with a new access key (not made in a plan). A Secret the
/// apply would refuse (someone else's without `adopt`, another type, immutable) is the same
/// error here.
pub async fn plan(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    conf: Option<&S3Conf>,
    adopt: bool,
) -> Result<StepReport, CloudError> {
    let current = secrets(client, namespace)
        .get_opt(name)
        .await
        .map_err(|e| classify("get secret", e))?;
    let mut report = Report::with_mode(KIND, format!("{namespace}/{name}"), Mode::Plan);
    let key_id = conf.map_or("(new access key)", |c| c.access_key_id.as_str());
    let Some(existing) = current else {
        record_new(name, key_id, &mut report);
        return Ok(report.into_step_report(json!({ "namespace": namespace, "name": name })));
    };
    let ours = admit(&existing, namespace, name, adopt)?;
    let text = conf.map(S3Conf::render);
    let text = text.as_ref().map_or("", |t| t.expose_secret());
    compare(&existing, name, text, key_id, &mut report);
    if !(ours && is_up_to_date(&existing, name, text)) {
        check_writable(&existing, namespace, name)?;
    }
    let facts = json!({ "adopted": !ours });
    Ok(report.into_step_report(detail(namespace, name, &existing, facts)))
}

/// Puts our labels back on the Secret `namespace/name` (merge patch guarded by `version`, the
/// `resourceVersion` read); other labels and the data are left as they are. Returns nothing
/// useful as a request id (Kubernetes has none).
pub async fn restore_labels(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    version: Option<String>,
) -> Result<Option<String>, CloudError> {
    let patch = json!({
        "metadata": { "labels": desired_labels(name), "resourceVersion": version },
    });
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..Default::default()
    };
    secrets(client, namespace)
        .patch(name, &params, &Patch::Merge(&patch))
        .await
        .map_err(|e| classify("restore secret labels", e))?;
    Ok(None)
}

/// `app.kubernetes.io/managed-by: backup-provisioner` and `holos.run/secret.name: <name>`
/// (labels of others are kept).
pub fn compare_labels(existing: &Secret, name: &str, report: &mut Report) {
    let labels = existing.metadata.labels.clone().unwrap_or_default();
    let desired = desired_labels(name);
    let expected = json!(desired);
    if desired.iter().all(|(k, v)| labels.get(k) == Some(v)) {
        return report.unchanged("labels", expected);
    }
    let found: Map<String, Value> = desired
        .keys()
        .map(|k| (k.clone(), json!(labels.get(k))))
        .collect();
    let action = Action::create_or_update(found.values().all(Value::is_null));
    report.repaired("labels", Value::Object(found), expected, action, None);
}

/// `Opaque` (a Secret's type cannot be changed: see [`check_writable`]).
pub fn compare_type(existing: &Secret, report: &mut Report) {
    match secret_type(existing) {
        SECRET_TYPE => report.unchanged("type", json!(SECRET_TYPE)),
        other => report.left(
            "type",
            json!(other),
            json!(SECRET_TYPE),
            "a Secret's type cannot be changed",
        ),
    }
}

/// "a secret with a single key, `s3.conf`": other keys are removed.
fn compare_keys(existing: &Secret, report: &mut Report) {
    let keys = data_keys(existing);
    let expected = json!([S3_CONF_KEY]);
    if keys == [S3_CONF_KEY] {
        return report.unchanged("keys", expected);
    }
    let action = if keys.iter().any(|k| k != S3_CONF_KEY) {
        Action::Delete
    } else {
        Action::Create
    };
    report.repaired("keys", json!(keys), expected, action, None);
}

/// The `s3.conf` text, byte for byte. Only the access key id is shown, never a value.
fn compare_s3_conf(existing: &Secret, text: &str, access_key_id: &str, report: &mut Report) {
    let expected = json!(s3_conf_for(access_key_id));
    match s3_conf_bytes(existing) {
        Some(found) if found == text.as_bytes() => report.unchanged(S3_CONF_KEY, expected),
        None => {
            report.repaired(S3_CONF_KEY, Value::Null, expected, Action::Create, None);
        }
        Some(found) => {
            let found = json!(describe_s3_conf(found, access_key_id));
            report.repaired(S3_CONF_KEY, found, expected, Action::Update, None);
        }
    }
}

/// How the report names an `s3.conf` (no values).
fn s3_conf_for(access_key_id: &str) -> String {
    format!("s3.conf for access key {access_key_id}")
}

/// An `s3.conf` found in a Secret that differs from ours, described without its values.
fn describe_s3_conf(found: &[u8], access_key_id: &str) -> String {
    let parsed = std::str::from_utf8(found)
        .ok()
        .and_then(|text| S3Conf::parse(text).ok());
    match parsed {
        Some(conf) if conf.access_key_id == access_key_id => {
            format!("{} (other values or layout)", s3_conf_for(access_key_id))
        }
        Some(conf) => s3_conf_for(&conf.access_key_id),
        None => "s3.conf without a complete repo2 section".to_owned(),
    }
}

/// Server-side apply (forced) of the whole Secret; the copy of `text` sent is zeroed after.
/// With `version` (the `resourceVersion` read), the server refuses the apply with 409 when the
/// Secret changed since.
async fn write(
    api: &Api<Secret>,
    namespace: &str,
    name: &str,
    text: &str,
    version: Option<String>,
) -> Result<Secret, CloudError> {
    let mut desired = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(desired_labels(name)),
            resource_version: version,
            ..Default::default()
        },
        type_: Some(SECRET_TYPE.to_owned()),
        data: Some(BTreeMap::from([(
            S3_CONF_KEY.to_owned(),
            ByteString(text.as_bytes().to_vec()),
        )])),
        ..Default::default()
    };
    // Forced only over the Secret just read (its resourceVersion guards it). When none was
    // read, the apply creates it unforced: a Secret someone made in between conflicts (409)
    // instead of having its s3.conf, and the cipher pass in it, taken over.
    let creating = desired.metadata.resource_version.is_none();
    let params = match creating {
        true => PatchParams::apply(FIELD_MANAGER),
        false => PatchParams::apply(FIELD_MANAGER).force(),
    };
    let written = api.patch(name, &params, &Patch::Apply(&desired)).await;
    if let Some(data) = desired.data.as_mut() {
        data.values_mut().for_each(|v| v.0.zeroize());
    }
    written.map_err(|e| match e {
        kube::Error::Api(status) if creating && status.code == 409 => CloudError::retryable(
            SERVICE,
            "apply secret",
            format!(
                "Secret {namespace}/{name} was created by someone else after this attempt found \
                 none; it was not overwritten, and the next attempt reads it"
            ),
        ),
        other => classify("apply secret", other),
    })
}

/// Server-side apply cannot drop keys other managers own (e.g. from an adopted Secret): they
/// are removed with a merge patch. Returns their names.
async fn remove_other_keys(
    api: &Api<Secret>,
    name: &str,
    written: &Secret,
) -> Result<Vec<String>, CloudError> {
    let extra: Vec<String> = data_keys(written)
        .into_iter()
        .filter(|k| k != S3_CONF_KEY)
        .collect();
    if extra.is_empty() {
        return Ok(extra);
    }
    let nulls: Map<String, Value> = extra.iter().map(|k| (k.clone(), Value::Null)).collect();
    let patch = json!({
        "metadata": {"resourceVersion": written.metadata.resource_version},
        "data": nulls,
    });
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..Default::default()
    };
    api.patch(name, &params, &Patch::Merge(&patch))
        .await
        .map_err(|e| classify("remove extra secret keys", e))?;
    Ok(extra)
}

/// Reads the Secret back and checks it holds exactly what was written.
async fn read_back(
    api: &Api<Secret>,
    namespace: &str,
    name: &str,
    text: &str,
) -> Result<Secret, CloudError> {
    let back = api
        .get_opt(name)
        .await
        .map_err(|e| classify("read back secret", e))?
        .ok_or_else(|| {
            CloudError::retryable(
                SERVICE,
                "read back secret",
                format!("Secret {namespace}/{name} disappeared right after it was written"),
            )
        })?;
    if !is_up_to_date(&back, name, text) {
        return Err(CloudError::retryable(
            SERVICE,
            "read back secret",
            format!(
                "Secret {namespace}/{name} does not hold what was written (changed concurrently?)"
            ),
        ));
    }
    Ok(back)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf() -> S3Conf {
        S3Conf {
            cipher_pass: SecretString::from("c1pherPASS".to_owned()),
            access_key_id: "AKIAEXAMPLE".into(),
            secret_access_key: SecretString::from("s3cr3t/KEY+x".to_owned()),
        }
    }

    #[test]
    fn render_is_exact() {
        assert_eq!(
            conf().render().expose_secret(),
            "[global]\n\
             repo2-cipher-pass=c1pherPASS\n\
             repo2-s3-key=AKIAEXAMPLE\n\
             repo2-s3-key-secret=s3cr3t/KEY+x\n\
             repo3-cipher-pass=c1pherPASS\n\
             repo3-s3-key=AKIAEXAMPLE\n\
             repo3-s3-key-secret=s3cr3t/KEY+x\n"
        );
    }

    #[test]
    fn parse_round_trips_and_tolerates_spacing() {
        let parsed = S3Conf::parse(conf().render().expose_secret()).unwrap();
        assert_eq!(parsed.cipher_pass.expose_secret(), "c1pherPASS");
        assert_eq!(parsed.access_key_id, "AKIAEXAMPLE");
        assert_eq!(parsed.secret_access_key.expose_secret(), "s3cr3t/KEY+x");
        assert_eq!(
            parsed.render().expose_secret(),
            conf().render().expose_secret()
        );

        let loose = "\r\n# comment\n[global]\r\n  repo2-cipher-pass = p \r\nrepo2-s3-key=  AKIA\n\
                     repo2-s3-key-secret =s=with=equals\n";
        let parsed = S3Conf::parse(loose).unwrap();
        assert_eq!(parsed.cipher_pass.expose_secret(), "p");
        assert_eq!(parsed.access_key_id, "AKIA");
        assert_eq!(parsed.secret_access_key.expose_secret(), "s=with=equals");
    }

    #[test]
    fn parse_reports_missing_settings_without_values() {
        let template = "[global]\nrepo2-cipher-pass=\nrepo2-s3-key=AKIA\nrepo2-s3-key-secret=\n";
        let err = S3Conf::parse(template).unwrap_err();
        assert_eq!(err.missing, ["repo2-cipher-pass", "repo2-s3-key-secret"]);
        assert_eq!(
            err.to_string(),
            "s3.conf has no value for repo2-cipher-pass, repo2-s3-key-secret"
        );
        assert!(S3Conf::parse("").is_err());
    }

    #[test]
    fn a_secret_changed_since_its_read_is_not_written_over() {
        let at = |version: &str| Secret {
            metadata: ObjectMeta {
                resource_version: Some(version.to_owned()),
                ..Default::default()
            },
            ..Default::default()
        };
        let check = |basis| check_unchanged(&at("7"), basis, "ns", "s");
        assert!(check(Basis::Current).is_ok());
        assert!(check(Basis::Read(Some("7"))).is_ok());
        for basis in [Basis::Read(Some("6")), Basis::Read(None)] {
            let err = check(basis).unwrap_err();
            assert!(err.is_retryable(), "{err}");
            assert!(err.to_string().contains("not overwritten"), "{err}");
        }
        let read = ExistingSecret {
            managed_by_us: true,
            conf: None,
            cipher_pass: None,
            access_key_id: None,
            resource_version: Some("7".into()),
        };
        assert_eq!(Basis::of(Some(&read)), Basis::Read(Some("7")));
        assert_eq!(Basis::of(None), Basis::Read(None));
        let unversioned = ExistingSecret {
            resource_version: None,
            ..read
        };
        assert_eq!(Basis::of(Some(&unversioned)), Basis::Current);
    }

    #[test]
    fn debug_is_redacted() {
        let (pass, key, secret) =
            read_fields("[global]\nrepo2-cipher-pass=c1pherPASS\nrepo2-s3-key=\n");
        assert_eq!(
            pass.map(|p| p.expose_secret().to_owned()).as_deref(),
            Some("c1pherPASS")
        );
        assert!(
            key.is_none() && secret.is_none(),
            "an incomplete conf still yields its cipher pass"
        );
        let shown = format!("{:?}", conf());
        assert!(!shown.contains("c1pherPASS"), "{shown}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("AKIAEXAMPLE"));
        let existing = ExistingSecret {
            managed_by_us: true,
            conf: Some(conf()),
            cipher_pass: Some(conf().cipher_pass),
            access_key_id: Some(conf().access_key_id),
            resource_version: Some("1".into()),
        };
        let shown = format!("{existing:?}");
        assert!(
            !shown.contains("c1pherPASS") && !shown.contains("s3cr3t"),
            "{shown}"
        );
    }
}
