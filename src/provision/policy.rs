//! Runbook section "Create an IAM Policy":
//!
//! > Create one IAM Policy for each bucket to grant full access to the bucket.  Replace the
//! > resource with each bucket name.
//! > Name: `holos-zitadel-backups` for `zitadel`
//! > Description: `Read and write access to a specific bucket for pgrest operating within a pgo
//! > PostgresCluster.`
//!
//! ```json
//! { "Version": "2012-10-17",
//!   "Statement": [
//!     { "Effect": "Allow", "Action": ["s3:GetBucketLocation", "s3:ListAllMyBuckets"],
//!       "Resource": "arn:aws:s3:::*" },
//!     { "Effect": "Allow", "Action": "s3:*",
//!       "Resource": ["arn:aws:s3:::holos-zitadel-backups", "arn:aws:s3:::holos-zitadel-backups/*"] } ] }
//! ```
//!
//! A customer managed policy named after the bucket ([`DESCRIPTION`], [`document`]). Per
//! setting: the path (`check_path`) and description (`check_description`) cannot be changed in
//! IAM and are only reported; the document (`ensure_document`) is repaired by adding a new
//! default version, deleting the oldest one first when IAM's limit of [`MAX_VERSIONS`] is
//! reached.

use aws_sdk_iam::Client;
use aws_sdk_iam::error::ProvideErrorMetadata;
use aws_sdk_iam::types::{Policy, PolicyScopeType, PolicyVersion};
use percent_encoding::percent_decode_str;
use serde_json::{Value, json};

use super::report::{Action, Mode, Report};
use crate::cloud::aws::{ENTITY_ALREADY_EXISTS, classify, output_request_id};
use crate::cloud::{CloudError, StepReport};

/// The runbook's policy description, verbatim.
pub const DESCRIPTION: &str =
    "Read and write access to a specific bucket for pgrest operating within a pgo PostgresCluster.";

/// IAM keeps at most this many versions of a managed policy.
pub const MAX_VERSIONS: usize = 5;

const IAM: &str = "iam";
const PATH: &str = "/";
/// The resource kind in the step's report.
const KIND: &str = "iam-policy";

/// The runbook's policy document for `bucket`.
pub fn document(bucket: &str) -> Value {
    json!({
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["s3:GetBucketLocation", "s3:ListAllMyBuckets"],
                "Resource": "arn:aws:s3:::*"
            },
            {
                "Effect": "Allow",
                "Action": "s3:*",
                "Resource": [
                    format!("arn:aws:s3:::{bucket}"),
                    format!("arn:aws:s3:::{bucket}/*")
                ]
            }
        ]
    })
}

/// Parses a policy document as IAM returns it: URL-encoded JSON (AWS) or plain JSON (moto).
pub fn parse_document(raw: &str) -> Option<Value> {
    serde_json::from_str(raw).ok().or_else(|| {
        let decoded = percent_decode_str(raw).decode_utf8().ok()?;
        serde_json::from_str(&decoded).ok()
    })
}

/// Whether two policy documents grant the same thing: a single string equals a one-element
/// array, and the order of actions, resources and statements does not matter.
pub fn documents_equivalent(a: &Value, b: &Value) -> bool {
    normalize(a) == normalize(b)
}

fn normalize(document: &Value) -> Value {
    let Value::Object(map) = document else {
        return document.clone();
    };
    let mut out = serde_json::Map::new();
    for (key, value) in map {
        let value = if key == "Statement" {
            let statements = match value {
                Value::Array(items) => items.clone(),
                single => vec![single.clone()],
            };
            let mut normalized: Vec<Value> = statements.iter().map(normalize_statement).collect();
            normalized.sort_by_key(|s| s.to_string());
            Value::Array(normalized)
        } else {
            value.clone()
        };
        out.insert(key.clone(), value);
    }
    Value::Object(out)
}

fn normalize_statement(statement: &Value) -> Value {
    let Value::Object(map) = statement else {
        return statement.clone();
    };
    let mut out = serde_json::Map::new();
    for (key, value) in map {
        let value = match key.as_str() {
            "Action" | "NotAction" | "Resource" | "NotResource" => string_set(value),
            _ => value.clone(),
        };
        out.insert(key.clone(), value);
    }
    Value::Object(out)
}

fn string_set(value: &Value) -> Value {
    let mut items: Vec<Value> = match value {
        Value::Array(items) => items.clone(),
        single => vec![single.clone()],
    };
    items.sort_by_key(|v| v.to_string());
    items.dedup();
    Value::Array(items)
}

/// Ensures the policy exists with the runbook's document as its default version. Returns the
/// report and the policy ARN.
pub async fn ensure(iam: &Client, bucket: &str) -> Result<(StepReport, String), CloudError> {
    ensure_with(iam, bucket, Mode::Apply).await
}

/// [`ensure`] in `mode`. A policy that does not exist and is not made (plan or repair mode)
/// is planned as `create`; its ARN is then [`planned_arn`], which no group has attached.
pub async fn ensure_with(
    iam: &Client,
    bucket: &str,
    mode: Mode,
) -> Result<(StepReport, String), CloudError> {
    let observed = observe(iam, bucket).await?;
    ensure_observed(iam, bucket, mode, observed).await
}

/// [`ensure_with`], starting from the policy's ARN when a run recorded it ([`observe_at`]).
pub async fn ensure_with_known(
    iam: &Client,
    bucket: &str,
    mode: Mode,
    known_arn: Option<&str>,
) -> Result<(StepReport, String), CloudError> {
    let observed = observe_at(iam, bucket, known_arn).await?;
    ensure_observed(iam, bucket, mode, observed).await
}

/// What the reads found: the policy as listed, and (when it exists) its description and
/// default version's document, read concurrently.
#[derive(Debug, Clone)]
pub struct Observed {
    found: Option<Found>,
}

#[derive(Debug, Clone)]
struct Found {
    listed: Policy,
    /// GetPolicy's answer (ListPolicies does not return descriptions).
    got: Option<Policy>,
    /// The document of the default version ListPolicies named: `None` when unparsable.
    document: Option<Value>,
}

/// ListPolicies, then GetPolicy and GetPolicyVersion together: two sequential round trips.
pub async fn observe(iam: &Client, bucket: &str) -> Result<Observed, CloudError> {
    let Some(listed) = find(iam, bucket).await? else {
        return Ok(Observed { found: None });
    };
    let found = read_found(iam, listed).await?;
    Ok(Observed { found: Some(found) })
}

/// [`observe`] from the ARN an earlier run recorded: GetPolicy, then GetPolicyVersion, and no
/// listing. ListPolicies reads up to 1000 of the account's policies per page to find one, so
/// a fleet's verifications would read the whole fleet's policies each; GetPolicy reads one. A
/// policy no longer at that ARN (deleted, or made again under another path) is looked for by
/// name, as when no ARN is known.
pub async fn observe_at(
    iam: &Client,
    bucket: &str,
    known_arn: Option<&str>,
) -> Result<Observed, CloudError> {
    let Some(arn) = known_arn else {
        return observe(iam, bucket).await;
    };
    let got = match iam.get_policy().policy_arn(arn).send().await {
        Ok(out) => out.policy().cloned(),
        Err(err) if err.code() == Some("NoSuchEntity") => None,
        Err(err) => return Err(classify(IAM, "GetPolicy", err)),
    };
    let Some(policy) = got.filter(|p| p.policy_name() == Some(bucket)) else {
        return observe(iam, bucket).await;
    };
    let document = match policy.default_version_id() {
        Some(version) => read_document(iam, arn, version).await?,
        None => None,
    };
    let found = Found {
        listed: policy.clone(),
        got: Some(policy),
        document,
    };
    Ok(Observed { found: Some(found) })
}

async fn read_found(iam: &Client, listed: Policy) -> Result<Found, CloudError> {
    let arn = listed
        .arn()
        .ok_or_else(|| CloudError::retryable(IAM, "ListPolicies", "a policy without an ARN"))?;
    let get = async {
        iam.get_policy()
            .policy_arn(arn)
            .send()
            .await
            .map_err(|e| classify(IAM, "GetPolicy", e))
    };
    let read = async {
        match listed.default_version_id() {
            Some(version) => read_document(iam, arn, version).await,
            None => Ok(None),
        }
    };
    let (got, document) = tokio::try_join!(Box::pin(get), Box::pin(read))?;
    Ok(Found {
        got: got.policy().cloned(),
        document,
        listed,
    })
}

/// [`ensure_with`] on what [`observe`] read.
pub async fn ensure_observed(
    iam: &Client,
    bucket: &str,
    mode: Mode,
    observed: Observed,
) -> Result<(StepReport, String), CloudError> {
    let mut report = Report::with_mode(KIND, bucket, mode);
    let existing = match observed.found {
        Some(existing) => existing,
        None if !report.creates() => {
            report.planned_new(&[
                ("path", json!(PATH)),
                ("description", json!(DESCRIPTION)),
                ("document", document(bucket)),
            ]);
            return Ok(finish(report, bucket, planned_arn(bucket), None));
        }
        None => match create(iam, bucket, &mut report).await? {
            Some((arn, version)) => return Ok(finish(report, bucket, arn, version)),
            // Made by a resent request whose first answer was lost, or by an earlier attempt
            // the read above lagged behind: it is checked like any existing policy.
            None => read_found(iam, find_after_conflict(iam, bucket).await?).await?,
        },
    };
    let (arn, version) = reconcile(iam, bucket, existing, &mut report).await?;
    Ok(finish(report, bucket, arn, version))
}

/// What a plan names the ARN of a policy it would create (the account id is not known
/// without a call).
pub fn planned_arn(bucket: &str) -> String {
    format!("arn:aws:iam::<account>:policy/{bucket}")
}

/// The step's report (with the policy's identifiers) and the policy ARN.
fn finish(
    report: Report,
    bucket: &str,
    policy_arn: String,
    default_version_id: Option<String>,
) -> (StepReport, String) {
    let report = report.into_step_report(json!({
        "policy_name": bucket,
        "policy_arn": policy_arn,
        "default_version_id": default_version_id,
    }));
    (report, policy_arn)
}

/// Creates the policy with every runbook setting. Returns its ARN and default version id, or
/// `None` when IAM says a policy of that name already exists (`EntityAlreadyExists`).
async fn create(
    iam: &Client,
    bucket: &str,
    report: &mut Report,
) -> Result<Option<(String, Option<String>)>, CloudError> {
    let expected = document(bucket);
    let sent = iam
        .create_policy()
        .policy_name(bucket)
        .path(PATH)
        .description(DESCRIPTION)
        .policy_document(expected.to_string())
        .send()
        .await;
    let out = match sent {
        Ok(out) => out,
        Err(err) if err.code() == Some(ENTITY_ALREADY_EXISTS) => return Ok(None),
        Err(err) => return Err(classify(IAM, "CreatePolicy", err)),
    };
    let policy = out.policy().ok_or_else(|| {
        CloudError::retryable(IAM, "CreatePolicy", "the response carried no policy")
    })?;
    report.created(output_request_id(&out));
    report.made("path", json!(PATH), None);
    report.made("description", json!(DESCRIPTION), None);
    report.made("document", expected, None);
    let arn = policy.arn().unwrap_or_default().to_owned();
    Ok(Some((arn, policy.default_version_id().map(str::to_owned))))
}

/// The policy IAM said exists although the read before the create did not list it. Still
/// unlisted (IAM is eventually consistent): retryable, the next attempt reads again.
async fn find_after_conflict(iam: &Client, bucket: &str) -> Result<Policy, CloudError> {
    find(iam, bucket).await?.ok_or_else(|| {
        CloudError::retryable(
            IAM,
            "CreatePolicy",
            format!(
                "policy {bucket} already exists but is not listed yet (IAM is eventually \
                 consistent); it is read again on the next attempt"
            ),
        )
    })
}

/// Checks an existing policy setting by setting. Returns its ARN and (new) default version id.
async fn reconcile(
    iam: &Client,
    bucket: &str,
    existing: Found,
    report: &mut Report,
) -> Result<(String, Option<String>), CloudError> {
    let listed = &existing.listed;
    let policy_arn = listed
        .arn()
        .ok_or_else(|| CloudError::retryable(IAM, "ListPolicies", "a policy without an ARN"))?
        .to_owned();
    check_path(listed, report);
    let policy = existing.got.as_ref().unwrap_or(listed);
    check_description(policy, report);
    let default_version_id = policy
        .default_version_id()
        .or(listed.default_version_id())
        .ok_or_else(|| {
            CloudError::retryable(IAM, "GetPolicy", "the policy has no default version")
        })?;
    // The document read with GetPolicy was of the version ListPolicies named; a default
    // changed in between is read again.
    let found = if listed.default_version_id() == Some(default_version_id) {
        existing.document.clone()
    } else {
        read_document(iam, &policy_arn, default_version_id).await?
    };
    let version = ensure_document(
        iam,
        &policy_arn,
        default_version_id,
        (found, document(bucket)),
        report,
    )
    .await?;
    Ok((policy_arn, version))
}

/// Path `/` (IAM policy paths are immutable: a difference is reported only).
fn check_path(policy: &Policy, report: &mut Report) {
    match policy.path() {
        Some(PATH) => report.unchanged("path", json!(PATH)),
        found => report.left(
            "path",
            json!(found),
            json!(PATH),
            "IAM policy paths are immutable",
        ),
    }
}

/// Description: [`DESCRIPTION`] (immutable in IAM: a difference is reported only).
fn check_description(policy: &Policy, report: &mut Report) {
    match policy.description() {
        Some(DESCRIPTION) => report.unchanged("description", json!(DESCRIPTION)),
        found => report.left(
            "description",
            json!(found),
            json!(DESCRIPTION),
            "IAM policy descriptions are immutable; delete and recreate the policy to change it",
        ),
    }
}

/// Policy JSON: the default version grants what [`document`] grants, else a new default
/// version is added. Returns the default version id afterwards.
async fn ensure_document(
    iam: &Client,
    policy_arn: &str,
    default_version_id: &str,
    (found, expected): (Option<Value>, Value),
    report: &mut Report,
) -> Result<Option<String>, CloudError> {
    if found
        .as_ref()
        .is_some_and(|doc| documents_equivalent(doc, &expected))
    {
        report.unchanged("document", expected);
        return Ok(Some(default_version_id.to_owned()));
    }
    let deleted_version = make_room_for_a_version(iam, policy_arn, report.mode()).await?;
    let (new_version_id, request_id) = if report.mode().changes_settings() {
        add_default_version(iam, policy_arn, &expected).await?
    } else {
        (None, None)
    };
    let facts = &mut report
        .repaired(
            "document",
            json!(found),
            expected,
            Action::Update,
            request_id,
        )
        .facts;
    facts.insert("found_version_id".into(), json!(default_version_id));
    facts.insert("new_version_id".into(), json!(new_version_id));
    facts.insert("deleted_version_id".into(), json!(deleted_version));
    Ok(new_version_id)
}

/// The document of one version of the policy (`None` when it cannot be parsed).
async fn read_document(
    iam: &Client,
    policy_arn: &str,
    version_id: &str,
) -> Result<Option<Value>, CloudError> {
    let version = iam
        .get_policy_version()
        .policy_arn(policy_arn)
        .version_id(version_id)
        .send()
        .await
        .map_err(|e| classify(IAM, "GetPolicyVersion", e))?;
    Ok(version
        .policy_version()
        .and_then(PolicyVersion::document)
        .and_then(parse_document))
}

/// At IAM's version limit, deletes the oldest non-default version (not in plan mode); returns
/// its id.
async fn make_room_for_a_version(
    iam: &Client,
    policy_arn: &str,
    mode: Mode,
) -> Result<Option<String>, CloudError> {
    let versions = list_versions(iam, policy_arn).await?;
    if versions.len() < MAX_VERSIONS {
        return Ok(None);
    }
    let Some(oldest) = oldest_non_default(&versions) else {
        return Ok(None);
    };
    if !mode.changes_settings() {
        return Ok(Some(oldest));
    }
    match iam
        .delete_policy_version()
        .policy_arn(policy_arn)
        .version_id(&oldest)
        .send()
        .await
    {
        Ok(_) => {}
        Err(err) if err.code() == Some("NoSuchEntity") => {}
        Err(err) => return Err(classify(IAM, "DeletePolicyVersion", err)),
    }
    Ok(Some(oldest))
}

fn oldest_non_default(versions: &[PolicyVersion]) -> Option<String> {
    versions
        .iter()
        .filter(|v| !v.is_default_version())
        .min_by_key(|v| {
            (
                v.create_date().map(|d| (d.secs(), d.subsec_nanos())),
                version_number(v.version_id()),
            )
        })
        .and_then(|v| v.version_id())
        .map(str::to_owned)
}

/// Adds `document` as the new default version; returns its id and the request id.
async fn add_default_version(
    iam: &Client,
    policy_arn: &str,
    document: &Value,
) -> Result<(Option<String>, Option<String>), CloudError> {
    let created = iam
        .create_policy_version()
        .policy_arn(policy_arn)
        .policy_document(document.to_string())
        .set_as_default(true)
        .send()
        .await
        .map_err(|e| classify(IAM, "CreatePolicyVersion", e))?;
    let new_version_id = created
        .policy_version()
        .and_then(|v| v.version_id())
        .map(str::to_owned);
    Ok((new_version_id, output_request_id(&created)))
}

/// Finds the customer managed policy named `name` (names are unique per account, whatever the
/// path). Uses ListPolicies with `Scope=Local`, so it works for users and roles alike without
/// knowing the account id.
pub async fn find(iam: &Client, name: &str) -> Result<Option<Policy>, CloudError> {
    let mut marker: Option<String> = None;
    loop {
        let out = iam
            .list_policies()
            .scope(PolicyScopeType::Local)
            .max_items(1000)
            .set_marker(marker.take())
            .send()
            .await
            .map_err(|e| classify(IAM, "ListPolicies", e))?;
        if let Some(policy) = out
            .policies()
            .iter()
            .find(|p| p.policy_name() == Some(name))
        {
            return Ok(Some(policy.clone()));
        }
        match out.marker() {
            Some(next) if out.is_truncated() => marker = Some(next.to_owned()),
            _ => return Ok(None),
        }
    }
}

/// All versions of a policy (paginated).
pub async fn list_versions(
    iam: &Client,
    policy_arn: &str,
) -> Result<Vec<PolicyVersion>, CloudError> {
    let mut versions = Vec::new();
    let mut marker: Option<String> = None;
    loop {
        let out = iam
            .list_policy_versions()
            .policy_arn(policy_arn)
            .set_marker(marker.take())
            .send()
            .await
            .map_err(|e| classify(IAM, "ListPolicyVersions", e))?;
        versions.extend(out.versions().iter().cloned());
        match out.marker() {
            Some(next) if out.is_truncated() => marker = Some(next.to_owned()),
            _ => return Ok(versions),
        }
    }
}

fn version_number(id: Option<&str>) -> u64 {
    id.and_then(|id| id.trim_start_matches(['v', 'V']).parse().ok())
        .unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equivalence_ignores_shape_and_order() {
        let expected = document("b");
        let reordered = json!({
            "Statement": [
                {"Resource": ["arn:aws:s3:::b/*", "arn:aws:s3:::b"], "Action": ["s3:*"], "Effect": "Allow"},
                {"Effect": "Allow", "Resource": ["arn:aws:s3:::*"],
                 "Action": ["s3:ListAllMyBuckets", "s3:GetBucketLocation"]}
            ],
            "Version": "2012-10-17"
        });
        assert!(documents_equivalent(&expected, &reordered));
        assert!(!documents_equivalent(&expected, &document("c")));
    }

    #[test]
    fn parses_url_encoded_documents() {
        let plain = document("b").to_string();
        let encoded: String =
            percent_encoding::utf8_percent_encode(&plain, percent_encoding::NON_ALPHANUMERIC)
                .to_string();
        assert_eq!(parse_document(&encoded), Some(document("b")));
        assert_eq!(parse_document(&plain), Some(document("b")));
        assert_eq!(parse_document("%%%"), None);
    }
}
