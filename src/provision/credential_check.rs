//! Not a runbook section: our addition after "Create an Access Key". Before the repository is
//! `ready`, the new access key must write, read back and delete an object in the bucket
//! ([`verify`]); a key already in use is checked read-only ([`verify_read_only`]). IAM is
//! eventually consistent, so a brand-new key may be rejected for a few seconds; rejections are
//! retried with exponential backoff within a time budget.
//!
//! A first provisioning proves its key in one round trip instead of two: the service writes a
//! read probe with its own credentials once the bucket exists ([`put_read_probe`]), and
//! the new key then puts its own probe while it reads the service's back
//! ([`verify_leaving_probe`] with a read probe).

use std::time::{Duration, Instant};

use aws_sdk_s3::Client;
use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::primitives::ByteStream;
use serde_json::json;

use crate::cloud::aws::{CREDENTIAL_REJECTED_CODES, classify, http_status};
use crate::cloud::{CloudError, Outcome, StepReport};

/// Prefix of probe objects: `backup-provisioner/probe-<job id>` (a provisioning's new key),
/// its read probe `…-read`, and `backup-provisioner/probe-<uuid>` (a rotation's new key).
pub const PROBE_PREFIX: &str = "backup-provisioner/probe-";

const S3: &str = "s3";

/// The longest wait between two attempts: a new key becomes usable at an unknown moment
/// within IAM's consistency delay (seconds), and the check should notice it within a fraction
/// of that, so the backoff grows from the initial one (e.g. 50 ms) only up to this. At 100 ms
/// a key is noticed 50 ms after it becomes usable on average, for about 10 S3 requests a
/// second while one job waits (all under the process-wide AWS limit). The verification of a
/// broken key polls as long as its budget lasts, so a shorter wait would cost the fleet's AWS
/// rate more than it saves (50 ms was measured: no difference within the runs' spread).
pub const MAX_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

/// Why one attempt failed.
enum AttemptError {
    /// The key was not (yet) accepted: worth retrying within the budget.
    Rejected {
        operation: &'static str,
        error: CloudError,
        code: String,
    },
    /// Any other failure.
    Other(CloudError),
}

/// Puts, gets (comparing bytes) and deletes a small probe object with `client_with_new_key`.
/// AccessDenied / InvalidAccessKeyId / SignatureDoesNotMatch (and other retryable errors) are
/// retried with exponential backoff starting at `initial_backoff`, capped at [`MAX_BACKOFF`],
/// until `budget` is spent; then the result is a permanent error saying the key does not work.
pub async fn verify(
    client_with_new_key: &Client,
    bucket: &str,
    budget: Duration,
    initial_backoff: Duration,
) -> Result<StepReport, CloudError> {
    let timing = (budget, initial_backoff);
    check(client_with_new_key, bucket, timing, Probing::Full).await
}

/// [`verify`] without the delete: the key has written the probe object `probe` and read one
/// back; the caller deletes `probe` (and `read_probe`) with [`delete_probe`] off the critical
/// path (e.g. alongside the Secret's write). With `read_probe` (written by [`put_read_probe`])
/// the key reads that object back while it puts its own, in one round trip; without, it reads
/// back its own after the put. A probe left by a crash in between is no backup: it does not
/// count as data (the bucket module's `has_objects`), and the next attempt, which writes the
/// same names, deletes it.
pub async fn verify_leaving_probe(
    client_with_new_key: &Client,
    bucket: &str,
    (budget, initial_backoff): (Duration, Duration),
    (probe, read_probe): (&str, Option<&str>),
) -> Result<StepReport, CloudError> {
    let probing = Probing::LeavingProbe { probe, read_probe };
    let mut report = check(
        client_with_new_key,
        bucket,
        (budget, initial_backoff),
        probing,
    )
    .await?;
    if let Some(read_probe) = read_probe {
        report.detail["read_probe_key"] = json!(read_probe);
    }
    Ok(report)
}

/// The probe object a job's new key writes: one name for every try of every attempt of the
/// job, so that an attempt killed after its put is followed by one that writes and deletes the
/// same object instead of leaving it behind.
pub fn job_probe_key(job_id: uuid::Uuid) -> String {
    format!("{PROBE_PREFIX}{job_id}")
}

/// The read probe that goes with the probe object `probe` (see [`put_read_probe`]).
pub fn read_probe_key(probe: &str) -> String {
    format!("{probe}-read")
}

/// Writes the read probe `key` with the service's own credentials (`s3`), for a new key's
/// check to read back (see [`verify_leaving_probe`]). Its content follows from its name.
pub async fn put_read_probe(s3: &Client, bucket: &str, key: &str) -> Result<(), CloudError> {
    s3.put_object()
        .bucket(bucket)
        .key(key)
        .body(ByteStream::from(probe_body(key)))
        .send()
        .await
        .map_err(|e| classify(S3, "PutObject", e))?;
    Ok(())
}

/// What a probe object named `key` holds.
fn probe_body(key: &str) -> Vec<u8> {
    format!("backup-provisioner credential check {key}\n").into_bytes()
}

/// Deletes the probe object `key` (absent: nothing to do, S3's delete is idempotent).
pub async fn delete_probe(s3: &Client, bucket: &str, key: &str) -> Result<(), CloudError> {
    s3.delete_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .map_err(|e| classify(S3, "DeleteObject", e))?;
    Ok(())
}

/// What one attempt of a check does with its probe object.
#[derive(Clone, Copy)]
enum Probing<'a> {
    /// Put, get, delete a probe of a new name.
    Full,
    /// Put `probe` and get it (or `read_probe`, at the same time); the caller deletes.
    LeavingProbe {
        probe: &'a str,
        read_probe: Option<&'a str>,
    },
}

async fn check(
    client_with_new_key: &Client,
    bucket: &str,
    (budget, initial_backoff): (Duration, Duration),
    probing: Probing<'_>,
) -> Result<StepReport, CloudError> {
    let started = Instant::now();
    // One name for every try: a put that succeeded before a rejected read is overwritten by
    // the next try, not left behind.
    let probe_key = match probing {
        Probing::Full => format!("{PROBE_PREFIX}{}", uuid::Uuid::new_v4()),
        Probing::LeavingProbe { probe, .. } => probe.to_owned(),
    };
    let (attempts, request_id) = with_budget(bucket, budget, initial_backoff, || {
        attempt(client_with_new_key, bucket, &probe_key, probing)
    })
    .await?;
    let checked: &[&str] = match probing {
        Probing::Full => &["PutObject", "GetObject", "DeleteObject"],
        Probing::LeavingProbe { .. } => &["PutObject", "GetObject"],
    };
    let mut report = StepReport::new(
        Outcome::Created,
        json!({
            "bucket": bucket,
            "probe_key": probe_key,
            "attempts": attempts,
            "elapsed_ms": started.elapsed().as_millis() as u64,
            "checked": checked,
        }),
    );
    report.upstream_request_id = request_id;
    Ok(report)
}

/// Read-only variant for a key that is already in use (e.g. found in the Secret): lists the
/// bucket (ListObjectsV2, max-keys 1) with the same retry rules as [`verify`]. Makes no mutating
/// call, so a re-run of a ready repository stays read-only. Outcome `AlreadyPresent`.
pub async fn verify_read_only(
    client_with_key: &Client,
    bucket: &str,
    budget: Duration,
    initial_backoff: Duration,
) -> Result<StepReport, CloudError> {
    let started = Instant::now();
    let (attempts, request_id) = with_budget(bucket, budget, initial_backoff, || async {
        let out = client_with_key
            .list_objects_v2()
            .bucket(bucket)
            .max_keys(1)
            .send()
            .await
            .map_err(|e| rejected_or_other("ListObjectsV2", e))?;
        Ok(crate::cloud::aws::output_request_id(&out))
    })
    .await?;
    let mut report = StepReport::new(
        Outcome::AlreadyPresent,
        json!({
            "bucket": bucket,
            "attempts": attempts,
            "elapsed_ms": started.elapsed().as_millis() as u64,
            "checked": ["ListObjectsV2"],
        }),
    );
    report.upstream_request_id = request_id;
    Ok(report)
}

/// Runs `attempt` until it succeeds, fails with a non-retryable error, or `budget` is spent.
/// Returns the number of attempts and the request id of the successful attempt.
async fn with_budget<F, Fut>(
    bucket: &str,
    budget: Duration,
    initial_backoff: Duration,
    mut attempt: F,
) -> Result<(u32, Option<String>), CloudError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<String>, AttemptError>>,
{
    let started = Instant::now();
    let deadline = started + budget;
    let mut backoff = initial_backoff.max(Duration::from_millis(1));
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let last = match attempt().await {
            Ok(request_id) => return Ok((attempts, request_id)),
            Err(AttemptError::Other(error)) if !error.is_retryable() => return Err(error),
            Err(other) => other,
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(give_up(bucket, last, attempts, started.elapsed()));
        }
        tracing::debug!(
            attempts,
            ?backoff,
            "credential check not passing yet; retrying"
        );
        tokio::time::sleep(backoff.min(deadline - now)).await;
        backoff = backoff
            .saturating_mul(2)
            .min(MAX_BACKOFF.max(initial_backoff));
    }
}

fn give_up(bucket: &str, last: AttemptError, attempts: u32, elapsed: Duration) -> CloudError {
    match last {
        AttemptError::Rejected {
            operation,
            error,
            code,
        } => CloudError::Permanent {
            service: S3,
            operation,
            message: format!(
                "the new access key is still rejected by S3 ({code}) after {attempts} attempts \
                 over {:.1}s; check that policy {bucket} grants access to bucket {bucket}, is \
                 attached to group {bucket}, and that the key's user is a member of that group",
                elapsed.as_secs_f64()
            ),
            request_id: error.request_id().map(str::to_owned),
        },
        AttemptError::Other(error) => error,
    }
}

/// One put/get(/delete) round; returns the request id of the last call.
async fn attempt(
    s3: &Client,
    bucket: &str,
    key: &str,
    probing: Probing<'_>,
) -> Result<Option<String>, AttemptError> {
    let body = probe_body(key);
    let put = async {
        let put = s3
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(ByteStream::from(body.clone()))
            .send()
            .await
            .map_err(|e| rejected_or_other("PutObject", e))?;
        Ok(crate::cloud::aws::output_request_id(&put))
    };
    let read_probe = match probing {
        Probing::LeavingProbe { read_probe, .. } => read_probe,
        Probing::Full => None,
    };
    if let Some(read_probe) = read_probe {
        // The service's object exists already: read it while the key writes its own.
        let expected = probe_body(read_probe);
        let read = read_back(s3, bucket, read_probe, &expected);
        let (put, read) = tokio::join!(put, read);
        return both(put, read);
    }
    let put = put.await?;
    let read = read_back(s3, bucket, key, &body).await?;
    if let Probing::LeavingProbe { .. } = probing {
        return Ok(read.or(put));
    }
    let deleted = s3
        .delete_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .map_err(|e| rejected_or_other("DeleteObject", e))?;
    Ok(crate::cloud::aws::output_request_id(&deleted))
}

/// The put's and the read's results as one: the read's request id. Of two failures the one
/// that says the most wins: one retrying cannot mend (e.g. the bytes read back differ), then a
/// rejection of the key (which becomes "still rejected" when the budget is spent), then any
/// other.
// Large like every attempt's error (the async fns' too, where the lint does not look); it is
// moved once per attempt.
#[allow(clippy::result_large_err)]
fn both(
    put: Result<Option<String>, AttemptError>,
    read: Result<Option<String>, AttemptError>,
) -> Result<Option<String>, AttemptError> {
    let rank = |e: &AttemptError| match e {
        AttemptError::Other(e) if !e.is_retryable() => 0,
        AttemptError::Rejected { .. } => 1,
        AttemptError::Other(_) => 2,
    };
    match (put, read) {
        (Ok(put), Ok(read)) => Ok(read.or(put)),
        (Err(e), Ok(_)) | (Ok(_), Err(e)) => Err(e),
        (Err(put), Err(read)) if rank(&read) < rank(&put) => Err(read),
        (Err(put), Err(_)) => Err(put),
    }
}

/// Reads the probe object back and compares its bytes with what was written; returns the
/// read's request id.
async fn read_back(
    s3: &Client,
    bucket: &str,
    key: &str,
    body: &[u8],
) -> Result<Option<String>, AttemptError> {
    let got = s3
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .map_err(|e| rejected_or_other("GetObject", e))?;
    let request_id = crate::cloud::aws::output_request_id(&got);
    let bytes = got
        .body
        .collect()
        .await
        .map_err(|e| {
            AttemptError::Other(CloudError::retryable(
                S3,
                "GetObject",
                format!("reading the probe object failed: {e}"),
            ))
        })?
        .into_bytes();
    if bytes.as_ref() == body {
        return Ok(request_id);
    }
    Err(AttemptError::Other(CloudError::permanent(
        S3,
        "GetObject",
        format!(
            "the probe object {key} read back differs from what was written ({} bytes \
             instead of {}); check for a proxy or object transformation on bucket {bucket}",
            bytes.len(),
            body.len()
        ),
    )))
}

fn rejected_or_other<E>(
    operation: &'static str,
    err: aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> AttemptError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let code = err.code().map(str::to_owned);
    let rejected = match code.as_deref() {
        Some("AccessDenied") => true,
        Some(code) => CREDENTIAL_REJECTED_CODES.contains(&code),
        None => http_status(&err) == Some(403),
    };
    if rejected {
        AttemptError::Rejected {
            operation,
            code: code.unwrap_or_else(|| "HTTP 403".to_owned()),
            error: classify(S3, operation, err),
        }
    } else {
        AttemptError::Other(classify(S3, operation, err))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn of_two_failures_the_one_saying_the_most_wins() {
        let throttled = || AttemptError::Other(CloudError::retryable(S3, "PutObject", "slow"));
        let differs = || AttemptError::Other(CloudError::permanent(S3, "GetObject", "differs"));
        let rejected = || AttemptError::Rejected {
            operation: "GetObject",
            error: CloudError::retryable(S3, "GetObject", "denied"),
            code: "InvalidAccessKeyId".into(),
        };
        let permanent = |r| matches!(r, Err(AttemptError::Other(e)) if !e.is_retryable());
        let rejection = |r| matches!(r, Err(AttemptError::Rejected { .. }));
        assert!(permanent(both(Err(throttled()), Err(differs()))));
        assert!(permanent(both(Err(rejected()), Err(differs()))));
        assert!(rejection(both(Err(throttled()), Err(rejected()))));
        assert!(rejection(both(Err(rejected()), Err(throttled()))));
        assert!(rejection(both(Ok(None), Err(rejected()))));
        let kept = both(Ok(Some("put".into())), Ok(None));
        assert_eq!(kept.ok().flatten().as_deref(), Some("put"));
    }
}
