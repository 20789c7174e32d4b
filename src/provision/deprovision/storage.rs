//! The bucket at the end of deprovisioning: kept (with its backups) unless the request asked
//! for `delete_bucket`; a bucket that holds objects is deleted only with `force` (the request
//! confirmed the bucket's name). Emptying deletes every object version and delete marker: the
//! runbook's buckets are unversioned, but one whose versioning was turned on by hand is
//! emptied all the same.

use aws_sdk_s3::Client;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::types::{Delete, ObjectIdentifier};
use serde_json::json;

use super::teardown::{Mode, Teardown};
use crate::cloud::CloudError;
use crate::cloud::aws::{classify, http_status, output_request_id};
use crate::provision::report::Action;

const S3: &str = "s3";
/// One ListObjectVersions page, and one DeleteObjects batch (S3's maximum).
const PAGE: i32 = 1000;

/// What the bucket holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contents {
    Absent,
    /// Object versions and delete markers on the first page (1000 means "at least").
    Objects(usize),
}

fn is_gone<E: ProvideErrorMetadata, R: 'static>(err: &SdkError<E, R>) -> bool {
    err.code() == Some("NoSuchBucket") || http_status(err) == Some(404)
}

/// The first page of the bucket's object versions and delete markers, as identifiers.
async fn first_page(
    s3: &Client,
    bucket: &str,
) -> Result<Option<Vec<ObjectIdentifier>>, CloudError> {
    let out = match s3
        .list_object_versions()
        .bucket(bucket)
        .max_keys(PAGE)
        .send()
        .await
    {
        Ok(out) => out,
        Err(err) if is_gone(&err) => return Ok(None),
        Err(err) => return Err(classify(S3, "ListObjectVersions", err)),
    };
    let versions = out.versions().iter().map(|v| (v.key(), v.version_id()));
    let markers = out
        .delete_markers()
        .iter()
        .map(|m| (m.key(), m.version_id()));
    let ids = versions
        .chain(markers)
        .filter_map(|(key, version)| {
            ObjectIdentifier::builder()
                .key(key?)
                .set_version_id(version.map(str::to_owned))
                .build()
                .ok()
        })
        .collect();
    Ok(Some(ids))
}

/// Whether the bucket exists, and how many objects (versions and delete markers) it holds.
pub async fn contents(s3: &Client, bucket: &str) -> Result<Contents, CloudError> {
    Ok(match first_page(s3, bucket).await? {
        None => Contents::Absent,
        Some(ids) => Contents::Objects(ids.len()),
    })
}

/// Why a bucket that holds objects is not deleted, and what to send to delete it anyway.
pub fn refusal(bucket: &str) -> String {
    format!(
        "bucket {bucket} holds objects (backups); it is deleted with them only when the request \
         carries the body {{\"confirm\": \"{bucket}\", \"force\": true}} with \
         ?delete_bucket=true. Without delete_bucket the bucket and its objects are kept"
    )
}

/// Deletes the bucket when `delete` (emptying it first when `force`), or reports it kept.
pub async fn delete_bucket(
    s3: &Client,
    bucket: &str,
    delete: bool,
    force: bool,
    mode: Mode,
) -> Result<Teardown, CloudError> {
    let mut report = Teardown::new("s3-bucket", bucket);
    if !delete {
        report.left("kept with its backups: deprovisioning deletes the bucket only with ?delete_bucket=true");
        return Ok(report);
    }
    let objects = match contents(s3, bucket).await? {
        Contents::Absent => {
            report.absent();
            return Ok(report);
        }
        Contents::Objects(n) if n > 0 && !force => {
            return Err(CloudError::permanent(S3, "DeleteBucket", refusal(bucket)));
        }
        Contents::Objects(n) => n,
    };
    if mode.applies() {
        let emptied = empty(s3, bucket).await?;
        report.setting("objects", json!(0), json!(emptied), action_for(emptied));
        let sent = s3.delete_bucket().bucket(bucket).send().await;
        report.deleted(match sent {
            Ok(out) => output_request_id(&out),
            Err(err) if is_gone(&err) => None,
            Err(err) => return Err(classify(S3, "DeleteBucket", err)),
        });
    } else {
        let found = if objects >= PAGE as usize {
            json!(format!("{PAGE} or more"))
        } else {
            json!(objects)
        };
        report.setting("objects", json!(0), found, action_for(objects));
        report.deleted(None);
    }
    Ok(report)
}

fn action_for(objects: usize) -> Action {
    if objects == 0 {
        Action::None
    } else {
        Action::Delete
    }
}

/// Deletes every object version and delete marker, a page at a time. Returns how many.
async fn empty(s3: &Client, bucket: &str) -> Result<usize, CloudError> {
    let mut total = 0;
    while let Some(ids) = first_page(s3, bucket).await?.filter(|ids| !ids.is_empty()) {
        let count = ids.len();
        let batch = Delete::builder()
            .set_objects(Some(ids))
            .quiet(true)
            .build()
            .map_err(|e| CloudError::permanent(S3, "DeleteObjects", e.to_string()))?;
        let out = s3
            .delete_objects()
            .bucket(bucket)
            .delete(batch)
            .send()
            .await
            .map_err(|e| classify(S3, "DeleteObjects", e))?;
        if let Some(failed) = out.errors().first() {
            return Err(CloudError::retryable(
                S3,
                "DeleteObjects",
                format!(
                    "{} of {count} objects were not deleted, e.g. {} ({})",
                    out.errors().len(),
                    failed.key().unwrap_or_default(),
                    failed.message().unwrap_or_default()
                ),
            ));
        }
        total += count;
    }
    Ok(total)
}
