//! Runbook section "Create the Bucket":
//!
//! > Name: `holos-zitadel-backups` for `zitadel`
//! >
//! > Object Ownership: `ACLs disabled` (recommended) Checked.
//! > Block Public Access settings for this bucket: **`Block all public access`** Checked.
//! > Bucket Versioning: `Disable`
//! > Default encryption: `Server-side encryption with Amazon S3 managed keys (SSE-S3)`
//! > Bucket Key: `Enable`
//! > Object Lock: `Disable`
//!
//! The bucket exists in the requested region with those settings and our tags; one function
//! per setting, each reading the setting, changing it only when it differs, and recording it in
//! the step's [`Report`]:
//!
//! | runbook setting                 | function                       | when it differs      |
//! |---------------------------------|--------------------------------|----------------------|
//! | Object Ownership                | `ensure_ownership`             | repaired             |
//! | Block all public access         | `ensure_public_access_block`   | repaired             |
//! | Default encryption, Bucket Key  | `ensure_encryption`            | repaired             |
//! | Bucket Versioning               | `check_versioning`             | reported, left as is |
//! | Object Lock                     | `check_object_lock`            | permanent error      |
//! | (our tags)                      | `ensure_tags`                  | repaired             |
//!
//! Versioning cannot be undone safely on a bucket that holds data, so it is only reported.
//! Object Lock cannot be turned off at all, and under a default retention pgBackRest's expire
//! cannot delete old backups: such a bucket is refused before anything is changed, by
//! [`preflight`] (which the job runs before any AWS change) and again by [`ensure`].

use aws_sdk_s3::Client;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::create_bucket::CreateBucketError;
use aws_sdk_s3::types::{
    BucketLocationConstraint, BucketVersioningStatus, CreateBucketConfiguration, ObjectLockEnabled,
    ObjectOwnership, OwnershipControls, OwnershipControlsRule, PublicAccessBlockConfiguration,
    ServerSideEncryption, ServerSideEncryptionByDefault, ServerSideEncryptionConfiguration,
    ServerSideEncryptionRule, Tag, Tagging,
};
use serde_json::{Map, Value, json};

use super::report::{Action, Mode, Report};
use crate::cloud::aws::{classify, error_request_id, output_request_id, response_header};
use crate::cloud::{CloudError, StepReport};

/// Tag marking resources this service manages.
pub const MANAGED_BY_KEY: &str = "managed-by";
pub const MANAGED_BY_VALUE: &str = "backup-provisioner";
/// Tag naming the repository a resource belongs to.
pub const REPOSITORY_TAG_KEY: &str = "backup-provisioner/repository";

const S3: &str = "s3";
/// The resource kind in the step's report.
const KIND: &str = "s3-bucket";

/// `arn:aws:s3:::<bucket>`.
pub fn arn(bucket: &str) -> String {
    format!("arn:aws:s3:::{bucket}")
}

/// Ensures the bucket exists in `region` with the runbook's settings and our tags.
///
/// `s3` must be a client for `region` (see `AwsClients::s3_for_region`). Versioning found
/// enabled on an existing bucket is reported under `differences` and left as is (it cannot be
/// undone safely); Object Lock is a permanent error, raised before any setting is changed.
pub async fn ensure(
    s3: &Client,
    bucket: &str,
    region: &str,
    repository: &str,
) -> Result<StepReport, CloudError> {
    ensure_with(s3, bucket, region, repository, Mode::Apply).await
}

/// [`ensure`] in `mode`: in plan mode every setting is read and what would change is
/// recorded, with no mutating call; a missing bucket is planned as `create` (its settings are
/// not read). Outside apply mode, Object Lock found enabled is reported (`leave`) rather than
/// refused: the caller (a verification, or a plan after [`preflight`]) decides.
pub async fn ensure_with(
    s3: &Client,
    bucket: &str,
    region: &str,
    repository: &str,
    mode: Mode,
) -> Result<StepReport, CloudError> {
    let observed = observe(s3, bucket, region, true).await?;
    let target = (bucket, region, repository);
    ensure_observed(s3, target, mode, observed, async {}).await
}

/// What one wave of concurrent reads found: whether the bucket exists (in `region`, ours to
/// use) and, if so, every setting the runbook names.
#[derive(Debug, Clone)]
pub struct Observed {
    settings: Option<Settings>,
}

/// The bucket's settings as read.
#[derive(Debug, Clone, Default)]
struct Settings {
    /// Object Lock's default retention, described, and the read's request id.
    object_lock: Option<(String, Option<String>)>,
    ownership: Vec<String>,
    public_access: Option<PublicAccessFlags>,
    encryption: Vec<Value>,
    versioning: Option<BucketVersioningStatus>,
    tags: Vec<(String, String)>,
}

impl Observed {
    pub fn exists(&self) -> bool {
        self.settings.is_some()
    }

    /// The check of [`preflight`] on what was read: an existing bucket with Object Lock is
    /// refused (its region was checked by [`observe`]).
    pub fn refuse_unusable(&self, bucket: &str) -> Result<(), CloudError> {
        match self.settings.as_ref().and_then(|s| s.object_lock.clone()) {
            None => Ok(()),
            Some((retention, request_id)) => Err(object_lock_error(bucket, &retention, request_id)),
        }
    }
}

/// Reads the bucket in one concurrent wave: HeadBucket (which answers its region) and every
/// setting. When
/// `expect_exists` is false (a first provisioning), HeadBucket goes alone first, so that a
/// missing bucket costs one read instead of seven failing ones. Fails like [`preflight`] on a
/// bucket of another account or region.
pub async fn observe(
    s3: &Client,
    bucket: &str,
    region: &str,
    expect_exists: bool,
) -> Result<Observed, CloudError> {
    let absent = Observed { settings: None };
    if !expect_exists {
        let Some(found) = head(s3, bucket, region).await? else {
            return Ok(absent);
        };
        found.check_region(s3, bucket, region).await?;
        let settings = read_settings(s3, bucket).await?;
        return Ok(Observed {
            settings: Some(settings),
        });
    }
    let (found, settings) = tokio::join!(
        Box::pin(head(s3, bucket, region)),
        Box::pin(read_settings(s3, bucket))
    );
    // HeadBucket's answer comes first: the other reads fail on a missing or foreign bucket.
    let Some(found) = found? else {
        return Ok(absent);
    };
    found.check_region(s3, bucket, region).await?;
    Ok(Observed {
        settings: Some(settings?),
    })
}

/// Every setting of an existing bucket, read concurrently.
async fn read_settings(s3: &Client, bucket: &str) -> Result<Settings, CloudError> {
    let (object_lock, ownership, public_access, encryption, versioning, tags) = tokio::try_join!(
        Box::pin(object_lock_retention(s3, bucket)),
        Box::pin(read_ownership(s3, bucket)),
        Box::pin(read_public_access_block(s3, bucket)),
        Box::pin(read_encryption(s3, bucket)),
        Box::pin(versioning_status(s3, bucket)),
        Box::pin(read_tags(s3, bucket)),
    )?;
    Ok(Settings {
        object_lock,
        ownership,
        public_access,
        encryption,
        versioning,
        tags,
    })
}

/// [`ensure_with`] on what [`observe`] read: creates a missing bucket (apply mode), then
/// changes every setting that differs, the writes concurrently. A bucket this call created
/// gets every setting without reading it first (a new bucket has none of ours). `exists` is
/// awaited once the bucket exists, before its settings are written.
pub async fn ensure_observed(
    s3: &Client,
    (bucket, region, repository): (&str, &str, &str),
    mode: Mode,
    observed: Observed,
    exists: impl Future<Output = ()>,
) -> Result<StepReport, CloudError> {
    let mut report = Report::with_mode(KIND, bucket, mode);
    let identifiers = json!({
        "bucket": bucket,
        "region": region,
        "arn": arn(bucket),
        "repository": repository,
    });
    let found = match observed.settings {
        Some(found) => found,
        None if report.creates() => {
            if create(s3, bucket, region, &mut report).await? {
                Settings::default()
            } else {
                // Ours already (an earlier attempt, or a resent request): read like any other.
                read_settings(s3, bucket).await?
            }
        }
        None => {
            report.planned_new(&new_bucket_settings(repository));
            return Ok(report.into_step_report(identifiers));
        }
    };
    check_object_lock(bucket, found.object_lock.clone(), &mut report)?;
    exists.await;
    ensure_settings(s3, bucket, repository, found, &mut report).await?;
    Ok(report.into_step_report(identifiers))
}

/// Ownership, public access block, encryption and tags: each compared with the runbook, the
/// ones that differ written concurrently; then versioning, reported only.
async fn ensure_settings(
    s3: &Client,
    bucket: &str,
    repository: &str,
    found: Settings,
    report: &mut Report,
) -> Result<(), CloudError> {
    let wanted = [
        (MANAGED_BY_KEY, MANAGED_BY_VALUE),
        (REPOSITORY_TAG_KEY, repository),
    ];
    let [ownership, public, encryption] = compare(&found);
    let mut tags = found.tags.clone();
    let tags_found = merge_tags(&mut tags, &wanted);
    let mode = report.mode();
    let (ownership_id, public_id, encryption_id, tagged) = tokio::try_join!(
        Box::pin(write_unless(mode, ownership.ok, put_ownership(s3, bucket))),
        Box::pin(write_unless(
            mode,
            public.ok,
            put_public_access_block(s3, bucket)
        )),
        Box::pin(write_unless(
            mode,
            encryption.ok,
            put_encryption(s3, bucket)
        )),
        Box::pin(write_unless(
            mode,
            tags_found.is_empty(),
            put_tags(s3, bucket, &tags)
        )),
    )?;
    ownership.record(report, ownership_id);
    public.record(report, public_id);
    encryption.record(report, encryption_id);
    check_versioning(found.versioning, report);
    record_tags(report, &wanted, tags_found, tagged);
    Ok(())
}

/// One setting compared with the runbook.
struct Compared {
    setting: &'static str,
    ok: bool,
    found: Value,
    expected: Value,
    /// Not set at all (a repair creates it).
    absent: bool,
}

impl Compared {
    /// Records it: unchanged, made with a bucket this step created, or repaired.
    fn record(self, report: &mut Report, request_id: Option<String>) {
        if self.ok {
            report.unchanged(self.setting, self.expected);
        } else if report.was_created() {
            report.made(self.setting, self.expected, request_id);
        } else {
            let action = Action::create_or_update(self.absent);
            report.repaired(self.setting, self.found, self.expected, action, request_id);
        }
    }
}

/// Ownership, public access block and encryption as found, against the runbook.
fn compare(found: &Settings) -> [Compared; 3] {
    let ownership = ObjectOwnership::BucketOwnerEnforced.as_str();
    let public = found.public_access;
    [
        Compared {
            setting: "object_ownership",
            ok: found.ownership.len() == 1 && found.ownership[0] == ownership,
            found: list_or_null(&found.ownership),
            expected: json!(ownership),
            absent: found.ownership.is_empty(),
        },
        Compared {
            setting: "public_access_block",
            ok: public.is_some_and(|flags| flags.iter().all(|f| *f == Some(true))),
            found: public.map(public_access_json).unwrap_or(Value::Null),
            expected: public_access_json([Some(true); 4]),
            absent: public.is_none(),
        },
        Compared {
            setting: "default_encryption",
            ok: found.encryption.len() == 1 && found.encryption[0] == expected_encryption(),
            found: list_or_null(&found.encryption),
            expected: expected_encryption(),
            absent: found.encryption.is_empty(),
        },
    ]
}

/// Sends `write` unless the setting is as expected (`ok`) or the mode changes nothing.
async fn write_unless(
    mode: Mode,
    ok: bool,
    write: impl Future<Output = Result<Option<String>, CloudError>>,
) -> Result<Option<String>, CloudError> {
    if ok {
        Ok(None)
    } else {
        mode.perform(write).await
    }
}

/// Our tags (`managed-by`, the repository), next to any tags of others: `found` holds the
/// previous value of each of ours that differed (written by the caller).
fn record_tags(
    report: &mut Report,
    wanted: &[(&str, &str)],
    found: Map<String, Value>,
    request_id: Option<String>,
) {
    const SETTING: &str = "tags";
    if found.is_empty() {
        report.unchanged(SETTING, tags_json(wanted, |_| true));
    } else if report.was_created() {
        report.made(SETTING, tags_json(wanted, |_| true), request_id);
    } else {
        let expected = tags_json(wanted, |key| found.contains_key(key));
        let action = Action::create_or_update(found.values().all(Value::is_null));
        report.repaired(SETTING, Value::Object(found), expected, action, request_id);
    }
}

/// Every setting a new bucket gets, as the report shows them.
fn new_bucket_settings(repository: &str) -> [(&'static str, Value); 6] {
    let wanted = [
        (MANAGED_BY_KEY, MANAGED_BY_VALUE),
        (REPOSITORY_TAG_KEY, repository),
    ];
    [
        ("object_lock", json!("Disabled")),
        (
            "object_ownership",
            json!(ObjectOwnership::BucketOwnerEnforced.as_str()),
        ),
        ("public_access_block", public_access_json([Some(true); 4])),
        ("default_encryption", expected_encryption()),
        ("versioning", json!("Disabled")),
        ("tags", tags_json(&wanted, |_| true)),
    ]
}

/// The read-only part of [`ensure`] that can refuse an existing bucket (another account's,
/// another region, Object Lock), run before any AWS change so that a bucket we cannot use
/// fails the job before the IAM entities are made. A missing bucket passes.
pub async fn preflight(s3: &Client, bucket: &str, region: &str) -> Result<(), CloudError> {
    if let Some(found) = head(s3, bucket, region).await? {
        found.check_region(s3, bucket, region).await?;
        refuse_object_lock(s3, bucket).await?;
    }
    Ok(())
}

/// [`has_objects`], known without a call for a bucket that did not exist when observed.
pub async fn has_objects_unless_new(
    s3: &Client,
    bucket: &str,
    observed_absent: bool,
) -> Result<bool, CloudError> {
    if observed_absent {
        // Made by this attempt (or absent still): nothing has written to it yet.
        return Ok(false);
    }
    has_objects(s3, bucket).await
}

/// Whether the bucket holds at least one object (one ListObjectsV2 page).
///
/// Probe objects (the credential check's, left by an interrupted attempt) are not backups and
/// do not count.
pub async fn has_objects(s3: &Client, bucket: &str) -> Result<bool, CloudError> {
    let out = s3
        .list_objects_v2()
        .bucket(bucket)
        .max_keys(100)
        .send()
        .await
        .map_err(|e| classify(S3, "ListObjectsV2", e))?;
    let probe = super::credential_check::PROBE_PREFIX;
    let real = out
        .contents()
        .iter()
        .any(|o| !o.key().unwrap_or_default().starts_with(probe));
    // A full page of probes alone is implausible; treat it as data rather than guess.
    Ok(real || out.is_truncated().unwrap_or(false))
}

/// Maps a CreateBucket failure to a [`CloudError`] whose message names the bucket.
pub fn create_error(bucket: &str, region: &str, err: SdkError<CreateBucketError>) -> CloudError {
    let message = match err.code() {
        Some("BucketAlreadyExists") => Some(format!(
            "bucket name {bucket} is owned by another AWS account; choose another bucket name"
        )),
        Some("InvalidBucketName") => Some(format!(
            "{bucket:?} is not a valid S3 bucket name; use 3-63 characters of lowercase \
             letters, digits, dots and hyphens, starting and ending with a letter or digit"
        )),
        Some("IllegalLocationConstraintException") | Some("InvalidLocationConstraint") => {
            Some(format!(
                "bucket {bucket} cannot be created in region {region:?}: the region is invalid \
                 or does not match the S3 endpoint used"
            ))
        }
        _ => None,
    };
    match message {
        Some(message) => CloudError::Permanent {
            service: S3,
            operation: "CreateBucket",
            message: match (err.code(), err.message()) {
                (Some(code), Some(said)) => format!("{message} [{code}: {said}]"),
                (Some(code), None) => format!("{message} [{code}]"),
                _ => message,
            },
            request_id: error_request_id(&err),
        },
        None => classify(S3, "CreateBucket", err),
    }
}

/// Normalises a `GetBucketLocation` answer to a region name.
pub fn location_to_region(location: Option<&str>) -> String {
    match location {
        None | Some("") => "us-east-1".to_owned(),
        Some("EU") => "eu-west-1".to_owned(),
        Some(region) => region.to_owned(),
    }
}

/// What HeadBucket answered for a bucket that exists and that we can access.
struct Found {
    /// `x-amz-bucket-region`, which S3 sends on every HeadBucket answer.
    region: Option<String>,
    request_id: Option<String>,
}

impl Found {
    /// Fails unless the bucket is in `region`: from HeadBucket's answer, or (an answer without
    /// the header) from GetBucketLocation.
    async fn check_region(self, s3: &Client, bucket: &str, region: &str) -> Result<(), CloudError> {
        match self.region {
            Some(found) if found == region => Ok(()),
            Some(found) => Err(wrong_region(
                bucket,
                &found,
                region,
                self.request_id,
                "HeadBucket",
            )),
            None => check_location(s3, bucket, region).await,
        }
    }
}

/// Some if the bucket exists and we can access it, None if it does not exist.
async fn head(s3: &Client, bucket: &str, region: &str) -> Result<Option<Found>, CloudError> {
    match s3.head_bucket().bucket(bucket).send().await {
        Ok(out) => Ok(Some(Found {
            region: out.bucket_region().map(str::to_owned),
            request_id: output_request_id(&out),
        })),
        Err(err) => {
            let status = crate::cloud::aws::http_status(&err);
            if err.as_service_error().is_some_and(|e| e.is_not_found()) || status == Some(404) {
                return Ok(None);
            }
            let request_id = error_request_id(&err);
            match status {
                Some(301) | Some(400) if response_header(&err, "x-amz-bucket-region").is_some() => {
                    let found = response_header(&err, "x-amz-bucket-region").unwrap_or_default();
                    Err(wrong_region(
                        bucket,
                        found,
                        region,
                        request_id,
                        "HeadBucket",
                    ))
                }
                Some(403) => Err(CloudError::Permanent {
                    service: S3,
                    operation: "HeadBucket",
                    message: format!(
                        "bucket {bucket} exists but is not accessible to the provisioner: it is \
                         owned by another AWS account (choose another bucket name) or the \
                         provisioner lacks s3:ListBucket on it"
                    ),
                    request_id,
                }),
                _ => Err(classify(S3, "HeadBucket", err)),
            }
        }
    }
}

fn wrong_region(
    bucket: &str,
    found: &str,
    requested: &str,
    request_id: Option<String>,
    operation: &'static str,
) -> CloudError {
    CloudError::Permanent {
        service: S3,
        operation,
        message: format!(
            "bucket {bucket} already exists in region {found}, not in the requested region \
             {requested}; request region {found} or choose another bucket name"
        ),
        request_id,
    }
}

async fn check_location(s3: &Client, bucket: &str, region: &str) -> Result<(), CloudError> {
    let out = s3
        .get_bucket_location()
        .bucket(bucket)
        .send()
        .await
        .map_err(|e| classify(S3, "GetBucketLocation", e))?;
    let found = location_to_region(out.location_constraint().map(|l| l.as_str()));
    if found != region {
        return Err(wrong_region(
            bucket,
            &found,
            region,
            output_request_id(&out),
            "GetBucketLocation",
        ));
    }
    Ok(())
}

/// Creates the bucket; finding it already ours (same region) is not a creation. Returns
/// whether this call made it.
async fn create(
    s3: &Client,
    bucket: &str,
    region: &str,
    report: &mut Report,
) -> Result<bool, CloudError> {
    let mut request = s3.create_bucket().bucket(bucket);
    if region != "us-east-1" {
        request = request.create_bucket_configuration(
            CreateBucketConfiguration::builder()
                .location_constraint(BucketLocationConstraint::from(region))
                .build(),
        );
    }
    match request.send().await {
        Ok(out) => {
            report.created(output_request_id(&out));
            Ok(true)
        }
        Err(err) if err.code() == Some("BucketAlreadyOwnedByYou") => {
            check_location(s3, bucket, region).await?;
            Ok(false)
        }
        Err(err) => Err(create_error(bucket, region, err)),
    }
}

fn is_code<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>, codes: &[&str]) -> bool {
    err.code().is_some_and(|code| codes.contains(&code))
}

/// A list found on the bucket, `null` when there was none.
fn list_or_null(found: &[impl serde::Serialize]) -> Value {
    if found.is_empty() {
        Value::Null
    } else {
        json!(found)
    }
}

async fn read_ownership(s3: &Client, bucket: &str) -> Result<Vec<String>, CloudError> {
    match s3
        .get_bucket_ownership_controls()
        .bucket(bucket)
        .send()
        .await
    {
        Ok(out) => Ok(out
            .ownership_controls()
            .map(|c| {
                c.rules()
                    .iter()
                    .map(|r| r.object_ownership().as_str().to_owned())
                    .collect()
            })
            .unwrap_or_default()),
        Err(err) if is_code(&err, &["OwnershipControlsNotFoundError"]) => Ok(Vec::new()),
        Err(err) => Err(classify(S3, "GetBucketOwnershipControls", err)),
    }
}

async fn put_ownership(s3: &Client, bucket: &str) -> Result<Option<String>, CloudError> {
    let rule = OwnershipControlsRule::builder()
        .object_ownership(ObjectOwnership::BucketOwnerEnforced)
        .build()
        .map_err(|e| build_error("PutBucketOwnershipControls", e))?;
    let controls = OwnershipControls::builder()
        .rules(rule)
        .build()
        .map_err(|e| build_error("PutBucketOwnershipControls", e))?;
    let out = s3
        .put_bucket_ownership_controls()
        .bucket(bucket)
        .ownership_controls(controls)
        .send()
        .await
        .map_err(|e| classify(S3, "PutBucketOwnershipControls", e))?;
    Ok(output_request_id(&out))
}

/// The four public access block flags, in AWS's order.
type PublicAccessFlags = [Option<bool>; 4];

fn public_access_json(flags: PublicAccessFlags) -> Value {
    json!({
        "block_public_acls": flags[0].unwrap_or(false),
        "ignore_public_acls": flags[1].unwrap_or(false),
        "block_public_policy": flags[2].unwrap_or(false),
        "restrict_public_buckets": flags[3].unwrap_or(false),
    })
}

async fn read_public_access_block(
    s3: &Client,
    bucket: &str,
) -> Result<Option<PublicAccessFlags>, CloudError> {
    match s3.get_public_access_block().bucket(bucket).send().await {
        Ok(out) => Ok(out.public_access_block_configuration().map(|c| {
            [
                c.block_public_acls(),
                c.ignore_public_acls(),
                c.block_public_policy(),
                c.restrict_public_buckets(),
            ]
        })),
        Err(err) if is_code(&err, &["NoSuchPublicAccessBlockConfiguration"]) => Ok(None),
        Err(err) => Err(classify(S3, "GetPublicAccessBlock", err)),
    }
}

async fn put_public_access_block(s3: &Client, bucket: &str) -> Result<Option<String>, CloudError> {
    let out = s3
        .put_public_access_block()
        .bucket(bucket)
        .public_access_block_configuration(
            PublicAccessBlockConfiguration::builder()
                .block_public_acls(true)
                .ignore_public_acls(true)
                .block_public_policy(true)
                .restrict_public_buckets(true)
                .build(),
        )
        .send()
        .await
        .map_err(|e| classify(S3, "PutPublicAccessBlock", e))?;
    Ok(output_request_id(&out))
}

fn expected_encryption() -> Value {
    json!({
        "sse_algorithm": ServerSideEncryption::Aes256.as_str(),
        "kms_master_key_id": null,
        "bucket_key_enabled": true,
    })
}

/// The bucket's default encryption rules, in the shape of the expected value.
async fn read_encryption(s3: &Client, bucket: &str) -> Result<Vec<Value>, CloudError> {
    let rule_json = |r: &ServerSideEncryptionRule| {
        let default = r.apply_server_side_encryption_by_default();
        json!({
            "sse_algorithm": default.map(|d| d.sse_algorithm().as_str()),
            "kms_master_key_id": default.and_then(|d| d.kms_master_key_id()),
            "bucket_key_enabled": r.bucket_key_enabled().unwrap_or(false),
        })
    };
    match s3.get_bucket_encryption().bucket(bucket).send().await {
        Ok(out) => Ok(out
            .server_side_encryption_configuration()
            .map(|c| c.rules().iter().map(rule_json).collect())
            .unwrap_or_default()),
        Err(err) if is_code(&err, &["ServerSideEncryptionConfigurationNotFoundError"]) => {
            Ok(Vec::new())
        }
        Err(err) => Err(classify(S3, "GetBucketEncryption", err)),
    }
}

async fn put_encryption(s3: &Client, bucket: &str) -> Result<Option<String>, CloudError> {
    let by_default = ServerSideEncryptionByDefault::builder()
        .sse_algorithm(ServerSideEncryption::Aes256)
        .build()
        .map_err(|e| build_error("PutBucketEncryption", e))?;
    let configuration = ServerSideEncryptionConfiguration::builder()
        .rules(
            ServerSideEncryptionRule::builder()
                .apply_server_side_encryption_by_default(by_default)
                .bucket_key_enabled(true)
                .build(),
        )
        .build()
        .map_err(|e| build_error("PutBucketEncryption", e))?;
    let out = s3
        .put_bucket_encryption()
        .bucket(bucket)
        .server_side_encryption_configuration(configuration)
        .send()
        .await
        .map_err(|e| classify(S3, "PutBucketEncryption", e))?;
    Ok(output_request_id(&out))
}

/// The bucket's versioning status (`None`: never enabled).
pub async fn versioning_status(
    s3: &Client,
    bucket: &str,
) -> Result<Option<BucketVersioningStatus>, CloudError> {
    match s3.get_bucket_versioning().bucket(bucket).send().await {
        Ok(out) => Ok(out.status().cloned()),
        // moto answers a 200 whose root element is not `VersioningConfiguration`, which the SDK
        // cannot parse; read the status from the body in that case.
        Err(err) if crate::cloud::aws::http_status(&err) == Some(200) && err.code().is_none() => {
            let body = crate::cloud::aws::response_body(&err)
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            if body.contains("<Status>Enabled</Status>") {
                Ok(Some(BucketVersioningStatus::Enabled))
            } else if body.contains("<Status>Suspended</Status>") {
                Ok(Some(BucketVersioningStatus::Suspended))
            } else if body.contains("Status>") {
                Err(classify(S3, "GetBucketVersioning", err))
            } else {
                Ok(None)
            }
        }
        Err(err) => Err(classify(S3, "GetBucketVersioning", err)),
    }
}

/// Bucket Versioning: `Disable` (never enabled). Enabled or suspended is reported only.
fn check_versioning(found: Option<BucketVersioningStatus>, report: &mut Report) {
    const SETTING: &str = "versioning";
    let expected = json!("Disabled");
    match found {
        None => report.unchanged(SETTING, expected),
        Some(status @ (BucketVersioningStatus::Enabled | BucketVersioningStatus::Suspended)) => {
            report.left(
                SETTING,
                json!(status.as_str()),
                expected,
                "versioning cannot be turned off once enabled; suspending it is an operator \
                 decision",
            )
        }
        Some(other) => report.left(
            SETTING,
            json!(other.as_str()),
            expected,
            "unknown versioning status",
        ),
    }
}

/// Object Lock: `Disable`. Enabled is a permanent error ([`refuse_object_lock`]) in apply
/// mode; otherwise it is reported and left (it cannot be turned off).
fn check_object_lock(
    bucket: &str,
    found: Option<(String, Option<String>)>,
    report: &mut Report,
) -> Result<(), CloudError> {
    const SETTING: &str = "object_lock";
    let expected = json!("Disabled");
    match found {
        None => report.unchanged(SETTING, expected),
        Some((retention, request_id)) if report.mode() == Mode::Apply => {
            return Err(object_lock_error(bucket, &retention, request_id));
        }
        Some((retention, _)) => report.left(
            SETTING,
            json!(format!("Enabled ({retention})")),
            expected,
            "Object Lock cannot be turned off; under a default retention pgBackRest's expire \
             cannot delete old backups",
        ),
    }
    Ok(())
}

/// Fails when the bucket has Object Lock enabled: it cannot be turned off, and under a default
/// retention pgBackRest's expire cannot delete the backups it retires, so the repository would
/// grow forever (and a retention set later would do the same).
async fn refuse_object_lock(s3: &Client, bucket: &str) -> Result<(), CloudError> {
    match object_lock_retention(s3, bucket).await? {
        None => Ok(()),
        Some((retention, request_id)) => Err(object_lock_error(bucket, &retention, request_id)),
    }
}

fn object_lock_error(bucket: &str, retention: &str, request_id: Option<String>) -> CloudError {
    CloudError::Permanent {
        service: S3,
        operation: "GetObjectLockConfiguration",
        message: format!(
            "bucket {bucket} has S3 Object Lock enabled ({retention}); the runbook requires it \
             disabled: under a default retention pgBackRest's expire cannot delete old backups, \
             and Object Lock cannot be turned off. Choose another bucket name, or delete the \
             bucket and let it be created again"
        ),
        request_id,
    }
}

/// `None` when Object Lock is not enabled; else its default retention, described, and the
/// request id of the read.
async fn object_lock_retention(
    s3: &Client,
    bucket: &str,
) -> Result<Option<(String, Option<String>)>, CloudError> {
    const OPERATION: &str = "GetObjectLockConfiguration";
    let out = match s3
        .get_object_lock_configuration()
        .bucket(bucket)
        .send()
        .await
    {
        Ok(out) => out,
        Err(err) if is_code(&err, &["ObjectLockConfigurationNotFoundError"]) => return Ok(None),
        Err(err) => return Err(classify(S3, OPERATION, err)),
    };
    let Some(config) = out
        .object_lock_configuration()
        .filter(|c| c.object_lock_enabled() == Some(&ObjectLockEnabled::Enabled))
    else {
        return Ok(None);
    };
    let retention = config
        .rule()
        .and_then(|r| r.default_retention())
        .map(|r| {
            let mode = r.mode().map(|m| m.as_str()).unwrap_or("?");
            match (r.days(), r.years()) {
                (Some(days), _) => format!("a default retention of {days} days ({mode})"),
                (_, Some(years)) => format!("a default retention of {years} years ({mode})"),
                _ => format!("a default retention ({mode})"),
            }
        })
        .unwrap_or_else(|| "no default retention yet".to_owned());
    Ok(Some((retention, output_request_id(&out))))
}

async fn read_tags(s3: &Client, bucket: &str) -> Result<Vec<(String, String)>, CloudError> {
    match s3.get_bucket_tagging().bucket(bucket).send().await {
        Ok(out) => Ok(out
            .tag_set()
            .iter()
            .map(|t| (t.key().to_owned(), t.value().to_owned()))
            .collect()),
        Err(err) if is_code(&err, &["NoSuchTagSet"]) => Ok(Vec::new()),
        Err(err) => Err(classify(S3, "GetBucketTagging", err)),
    }
}

/// Sets the `wanted` tags in `tags`; returns the previous value (`null`: absent) of each tag
/// that differed.
fn merge_tags(tags: &mut Vec<(String, String)>, wanted: &[(&str, &str)]) -> Map<String, Value> {
    let mut found = Map::new();
    for (key, value) in wanted {
        match tags.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) if v == value => {}
            Some((_, v)) => {
                found.insert((*key).to_owned(), json!(v.clone()));
                *v = (*value).to_owned();
            }
            None => {
                found.insert((*key).to_owned(), Value::Null);
                tags.push(((*key).to_owned(), (*value).to_owned()));
            }
        }
    }
    found
}

fn tags_json(wanted: &[(&str, &str)], include: impl Fn(&str) -> bool) -> Value {
    let tags: Map<String, Value> = wanted
        .iter()
        .filter(|(k, _)| include(k))
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect();
    Value::Object(tags)
}

async fn put_tags(
    s3: &Client,
    bucket: &str,
    tags: &[(String, String)],
) -> Result<Option<String>, CloudError> {
    let tag_set = tags
        .iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| build_error("PutBucketTagging", e))?;
    let tagging = Tagging::builder()
        .set_tag_set(Some(tag_set))
        .build()
        .map_err(|e| build_error("PutBucketTagging", e))?;
    let out = s3
        .put_bucket_tagging()
        .bucket(bucket)
        .tagging(tagging)
        .send()
        .await
        .map_err(|e| classify(S3, "PutBucketTagging", e))?;
    Ok(output_request_id(&out))
}

fn build_error(operation: &'static str, err: aws_sdk_s3::error::BuildError) -> CloudError {
    CloudError::permanent(S3, operation, format!("could not build the request: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        assert_eq!(location_to_region(None), "us-east-1");
        assert_eq!(location_to_region(Some("")), "us-east-1");
        assert_eq!(location_to_region(Some("EU")), "eu-west-1");
        assert_eq!(location_to_region(Some("eu-west-1")), "eu-west-1");
        assert_eq!(arn("b"), "arn:aws:s3:::b");
    }
}
