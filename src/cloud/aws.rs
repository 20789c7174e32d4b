//! AWS clients (S3, IAM) built from the standard credential chain, a call counter that proves
//! re-runs are read-only, and the classification of SDK errors into [`CloudError`].

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::interceptors::{
    BeforeSerializationInterceptorContextRef, BeforeTransmitInterceptorContextRef,
};
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{ConfigBag, Credentials, Intercept, Region, RuntimeComponents};
use aws_sdk_s3::error::{BoxError, DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::RequestId;
use aws_smithy_types::config_bag::{Storable, StoreReplace};

use super::rate_limit::AwsRateLimit;
use super::{CloudError, Retry};

/// Region used when neither the settings nor the credential chain name one (IAM is global).
pub const FALLBACK_REGION: &str = "us-east-1";

/// Where to reach AWS. Both fields are optional: the standard chain (`AWS_REGION`,
/// `AWS_ENDPOINT_URL`, profiles) fills in what is missing.
#[derive(Debug, Clone, Default)]
pub struct AwsSettings {
    /// Endpoint override (moto, LocalStack, a VPC endpoint). S3 then uses path-style addressing.
    pub endpoint_url: Option<String>,
    /// Default region for the clients; buckets use [`AwsClients::s3_for_region`].
    pub region: Option<String>,
}

/// The S3 and IAM clients of one AWS identity, plus the shared config they were built from.
#[derive(Debug, Clone)]
pub struct AwsClients {
    pub s3: aws_sdk_s3::Client,
    pub iam: aws_sdk_iam::Client,
    pub sdk_config: SdkConfig,
    counter: Option<CallCounter>,
    path_style: bool,
}

/// Builds the clients from the standard credential chain
/// (`aws_config::defaults(BehaviorVersion::latest())`).
pub async fn clients(settings: &AwsSettings, counter: Option<CallCounter>) -> AwsClients {
    let sdk_config = loader(settings).load().await;
    AwsClients::from_sdk_config(sdk_config, settings, counter)
}

/// Like [`clients`] but with fixed credentials instead of the chain (tests, moto).
pub async fn clients_with_credentials(
    settings: &AwsSettings,
    counter: Option<CallCounter>,
    credentials: Credentials,
) -> AwsClients {
    let sdk_config = loader(settings)
        .credentials_provider(credentials)
        .load()
        .await;
    AwsClients::from_sdk_config(sdk_config, settings, counter)
}

fn loader(settings: &AwsSettings) -> aws_config::ConfigLoader {
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).timeout_config(
        TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(5))
            .operation_attempt_timeout(Duration::from_secs(30))
            .operation_timeout(Duration::from_secs(90))
            .build(),
    );
    if let Some(url) = &settings.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    if let Some(region) = &settings.region {
        loader = loader.region(Region::new(region.clone()));
    }
    loader
}

impl AwsClients {
    /// Builds both clients from an already loaded config. A missing region becomes
    /// [`FALLBACK_REGION`].
    pub fn from_sdk_config(
        sdk_config: SdkConfig,
        settings: &AwsSettings,
        counter: Option<CallCounter>,
    ) -> AwsClients {
        let sdk_config = if sdk_config.region().is_none() {
            sdk_config
                .to_builder()
                .region(Region::from_static(FALLBACK_REGION))
                .build()
        } else {
            sdk_config
        };
        let path_style = settings.endpoint_url.is_some() || sdk_config.endpoint_url().is_some();
        Self::assemble(sdk_config, path_style, counter)
    }

    fn assemble(
        sdk_config: SdkConfig,
        path_style: bool,
        counter: Option<CallCounter>,
    ) -> AwsClients {
        let mut iam = aws_sdk_iam::config::Builder::from(&sdk_config);
        if let Some(counter) = &counter {
            iam = iam.interceptor(counter.interceptor("iam"));
        }
        let s3 = aws_sdk_s3::Client::from_conf(
            s3_builder(&sdk_config, path_style, counter.as_ref(), None).build(),
        );
        AwsClients {
            s3,
            iam: aws_sdk_iam::Client::from_conf(iam.build()),
            sdk_config,
            counter,
            path_style,
        }
    }

    /// These clients, and every client made from them later (S3 per region, S3 with a new
    /// key's static credentials), with each request attempt first waiting for a permit of
    /// `limit` (`BP_AWS_MAX_RPS`, see [`super::rate_limit`]). Apply once: a second limit would
    /// wrap the first.
    pub fn with_rate_limit(self, limit: &AwsRateLimit) -> AwsClients {
        let inner = self
            .sdk_config
            .http_client()
            .unwrap_or_else(super::rate_limit::default_https_client);
        let sdk_config = self
            .sdk_config
            .to_builder()
            .http_client(limit.wrap(inner))
            .build();
        AwsClients::assemble(sdk_config, self.path_style, self.counter)
    }

    /// An S3 client whose requests go to (and whose buckets are created in) `region`.
    pub fn s3_for_region(&self, region: &str) -> aws_sdk_s3::Client {
        aws_sdk_s3::Client::from_conf(self.s3_builder(Some(region)).build())
    }

    /// An S3 client that signs with the given access key instead of the provisioner's identity
    /// (used to prove a freshly created key works).
    pub fn s3_with_static_credentials(
        &self,
        region: &str,
        access_key_id: &str,
        secret: &str,
    ) -> aws_sdk_s3::Client {
        let credentials = Credentials::new(
            access_key_id,
            secret,
            None,
            None,
            "backup-provisioner-new-key",
        );
        aws_sdk_s3::Client::from_conf(
            self.s3_builder(Some(region))
                .credentials_provider(credentials)
                .build(),
        )
    }

    /// The counter registered on these clients, if any.
    pub fn counter(&self) -> Option<&CallCounter> {
        self.counter.as_ref()
    }

    fn s3_builder(&self, region: Option<&str>) -> aws_sdk_s3::config::Builder {
        s3_builder(
            &self.sdk_config,
            self.path_style,
            self.counter.as_ref(),
            region,
        )
    }
}

fn s3_builder(
    sdk_config: &SdkConfig,
    path_style: bool,
    counter: Option<&CallCounter>,
    region: Option<&str>,
) -> aws_sdk_s3::config::Builder {
    let mut builder = aws_sdk_s3::config::Builder::from(sdk_config).force_path_style(path_style);
    if let Some(region) = region {
        builder = builder.region(Region::new(region.to_owned()));
    }
    if let Some(counter) = counter {
        builder = builder.interceptor(counter.interceptor("s3"));
    }
    builder
}

// ---------------------------------------------------------------------------------------------
// Call counting
// ---------------------------------------------------------------------------------------------

/// Counts every request sent by the clients it is registered on, keyed `"service:Operation"`
/// (e.g. `"iam:CreateUser"`). Retried attempts count again. Cheap to clone (shared state).
#[derive(Debug, Clone, Default)]
pub struct CallCounter {
    calls: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl CallCounter {
    pub fn new() -> Self {
        Self::default()
    }

    /// All calls so far.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.lock().clone()
    }

    /// Calls that may change state (everything that is not Get/List/Head/Describe).
    pub fn mutating(&self) -> BTreeMap<String, u64> {
        self.filtered(true)
    }

    /// Read-only calls (Get/List/Head/Describe).
    pub fn reads(&self) -> BTreeMap<String, u64> {
        self.filtered(false)
    }

    pub fn mutating_count(&self) -> u64 {
        self.mutating().values().sum()
    }

    pub fn read_count(&self) -> u64 {
        self.reads().values().sum()
    }

    pub fn reset(&self) {
        self.lock().clear();
    }

    /// Records one call; used by the interceptor, public for other clients.
    pub fn record(&self, service: &str, operation: &str) {
        *self
            .lock()
            .entry(format!("{service}:{operation}"))
            .or_default() += 1;
    }

    /// Whether an operation name (`CreateUser`, or `iam:CreateUser`) changes state. Anything not
    /// known to be a read counts as mutating, so "zero mutating calls" is a safe assertion.
    pub fn is_mutating(operation: &str) -> bool {
        let name = operation.rsplit(':').next().unwrap_or(operation);
        const READS: [&str; 4] = ["Get", "List", "Head", "Describe"];
        !READS.iter().any(|prefix| name.starts_with(prefix))
    }

    fn filtered(&self, mutating: bool) -> BTreeMap<String, u64> {
        self.lock()
            .iter()
            .filter(|(name, _)| Self::is_mutating(name) == mutating)
            .map(|(name, count)| (name.clone(), *count))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, u64>> {
        self.calls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn interceptor(&self, service: &'static str) -> CountingInterceptor {
        CountingInterceptor {
            service,
            counter: self.clone(),
        }
    }
}

#[derive(Debug)]
struct CountingInterceptor {
    service: &'static str,
    counter: CallCounter,
}

/// The operation name of the request in flight, remembered between serialization and transmit.
#[derive(Debug, Clone)]
struct OperationName(String);

impl Storable for OperationName {
    type Storer = StoreReplace<Self>;
}

impl Intercept for CountingInterceptor {
    fn name(&self) -> &'static str {
        "CallCounter"
    }

    fn read_before_serialization(
        &self,
        context: &BeforeSerializationInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        cfg.interceptor_state()
            .store_put(OperationName(operation_name(context.input())));
        Ok(())
    }

    fn read_before_transmit(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let operation = cfg
            .load::<OperationName>()
            .map(|name| name.0.as_str())
            .unwrap_or("Unknown");
        self.counter.record(self.service, operation);
        Ok(())
    }
}

/// The operation name from the type-erased input (`TypeErasedBox[Clone]:CreateUserInput { .. }`).
///
/// The operation `Metadata` in the config bag lives in `aws-smithy-runtime-api`, which is not a
/// direct dependency; every generated input type is named `<Operation>Input`, and its `Debug`
/// output starts with that name. Formatting stops as soon as the name is complete.
fn operation_name(input: &dyn fmt::Debug) -> String {
    struct NameCapture {
        seen: String,
        name: Option<String>,
    }
    impl fmt::Write for NameCapture {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            for c in s.chars() {
                if self.seen.len() > 256 {
                    return Err(fmt::Error);
                }
                self.seen.push(c);
                if let Some(start) = self.seen.find("]:") {
                    let rest = &self.seen[start + 2..];
                    if rest.len() > 1 && !(c.is_ascii_alphanumeric() || c == '_') {
                        self.name = Some(rest[..rest.len() - 1].to_owned());
                        return Err(fmt::Error);
                    }
                }
            }
            Ok(())
        }
    }
    let mut capture = NameCapture {
        seen: String::new(),
        name: None,
    };
    let _ = write!(capture, "{input:?}");
    let name = capture.name.unwrap_or_else(|| {
        // Unit-like input type (no fields): the whole output after the prefix is the name.
        capture
            .seen
            .split_once("]:")
            .map(|(_, rest)| rest.trim().to_owned())
            .unwrap_or_default()
    });
    match name.strip_suffix("Input") {
        Some(operation) if !operation.is_empty() => operation.to_owned(),
        _ if name.is_empty() => "Unknown".to_owned(),
        _ => name,
    }
}

// ---------------------------------------------------------------------------------------------
// Error classification
// ---------------------------------------------------------------------------------------------

/// Error codes that mean "slow down": always worth a retry.
const THROTTLING_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "SlowDown",
    "RequestLimitExceeded",
    "TooManyRequests",
    "TooManyRequestsException",
    "RequestThrottled",
    "RequestThrottledException",
    "BandwidthLimitExceeded",
    "PriorRequestNotComplete",
];

/// Transient server-side or consistency problems.
const TRANSIENT_CODES: &[&str] = &[
    "InternalError",
    "InternalFailure",
    "ServiceFailure",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "RequestTimeout",
    "RequestTimeoutException",
    "OperationAborted",
    "ConcurrentModification",
];

/// Codes that mean the credentials themselves were rejected.
pub const CREDENTIAL_REJECTED_CODES: &[&str] = &[
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "ExpiredToken",
    "ExpiredTokenException",
    "AuthFailure",
];

/// IAM's answer to a create whose entity exists. The steps take it for "go on as for an
/// existing entity": a resent request whose first answer was lost meets it, and so does a
/// create after a read that lagged behind an earlier create.
pub const ENTITY_ALREADY_EXISTS: &str = "EntityAlreadyExists";

/// The error code of an SDK error (`None` for transport failures and body-less errors).
pub fn error_code<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>) -> Option<&str> {
    err.code()
}

/// The HTTP status of the response behind an SDK error, if there was one.
pub fn http_status<E, R: 'static>(err: &SdkError<E, R>) -> Option<u16> {
    raw_response(err).map(|raw| raw.status().as_u16())
}

/// A response header behind an SDK error (e.g. `x-amz-bucket-region` on a 301).
pub fn response_header<'a, E, R: 'static>(err: &'a SdkError<E, R>, name: &str) -> Option<&'a str> {
    raw_response(err).and_then(|raw| raw.headers().get(name))
}

/// The body of the response behind an SDK error, when it was read into memory.
pub fn response_body<E, R: 'static>(err: &SdkError<E, R>) -> Option<&[u8]> {
    raw_response(err).and_then(|raw| raw.body().bytes())
}

fn raw_response<E, R: 'static>(err: &SdkError<E, R>) -> Option<&HttpResponse> {
    let raw: &dyn Any = match err {
        SdkError::ServiceError(ctx) => ctx.raw(),
        SdkError::ResponseError(ctx) => ctx.raw(),
        _ => return None,
    };
    raw.downcast_ref::<HttpResponse>()
}

/// The upstream request id of an SDK error (from the parsed error or the response headers).
pub fn error_request_id<E: ProvideErrorMetadata, R: 'static>(
    err: &SdkError<E, R>,
) -> Option<String> {
    err.meta()
        .request_id()
        .map(str::to_owned)
        .or_else(|| raw_response(err).and_then(|raw| raw.request_id().map(str::to_owned)))
}

/// The upstream request id of a successful output.
pub fn output_request_id<T: RequestId>(output: &T) -> Option<String> {
    output.request_id().map(str::to_owned)
}

/// Classifies an SDK error for the retry policy: throttling, 5xx, timeouts and connection
/// failures are [`CloudError::Retryable`]; everything a retry cannot fix is
/// [`CloudError::Permanent`] with a message that says what to fix. The upstream request id is
/// kept.
pub fn classify<E, R>(
    service: &'static str,
    operation: &'static str,
    err: SdkError<E, R>,
) -> CloudError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: fmt::Debug + 'static,
{
    let request_id = error_request_id(&err);
    let status = http_status(&err);
    if let SdkError::ServiceError(_) = &err {
        return classify_code(
            service,
            operation,
            err.code(),
            status,
            err.message(),
            request_id,
        );
    }
    let (retry, message) = classify_failure(&err, status);
    CloudError::classified(retry, service, operation, message, request_id)
}

/// Whether a retry can help, and what happened, for an SDK error that is not a service error
/// (the request was not sent, or the response could not be read).
fn classify_failure<E, R>(err: &SdkError<E, R>, status: Option<u16>) -> (Retry, String)
where
    E: std::error::Error + Send + Sync + 'static,
    R: fmt::Debug + 'static,
{
    let detail = DisplayErrorContext(err);
    match err {
        SdkError::TimeoutError(_) => (Retry::Yes, "the request to AWS timed out".to_owned()),
        SdkError::DispatchFailure(failure) if failure.is_user() => (
            Retry::No,
            format!(
                "the request could not be sent ({detail}); check the AWS endpoint and \
                 credentials configuration"
            ),
        ),
        SdkError::DispatchFailure(_) => (Retry::Yes, format!("could not reach AWS: {detail}")),
        SdkError::ConstructionFailure(_) => (
            Retry::No,
            format!(
                "the request could not be built ({detail}); check the AWS configuration \
                 (region, credentials) and the input values"
            ),
        ),
        SdkError::ResponseError(_) => (
            Retry::Yes,
            format!(
                "the AWS response could not be read{}: {detail}",
                status.map(|s| format!(" (HTTP {s})")).unwrap_or_default(),
            ),
        ),
        _ => (Retry::No, format!("unexpected AWS SDK error: {detail}")),
    }
}

/// What a service error means for the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Diagnosis {
    /// A retry can help; says what happened.
    Retry(&'static str),
    /// A retry cannot help; says what to fix.
    Fix(&'static str),
    /// Access denied: the message names the missing `service:operation` permission.
    AccessDenied,
}

const THROTTLED: Diagnosis = Diagnosis::Retry("AWS is throttling requests; retry later");

/// Service error codes with a known meaning. The first row whose codes contain the error's
/// code wins; a code in no row is judged by its HTTP status ([`diagnose_status`]).
const KNOWN_CODES: &[(&[&str], Diagnosis)] = &[
    (THROTTLING_CODES, THROTTLED),
    (
        TRANSIENT_CODES,
        Diagnosis::Retry("transient AWS error; retry later"),
    ),
    (
        CREDENTIAL_REJECTED_CODES,
        Diagnosis::Fix(
            "AWS rejected the credentials; check the access key, secret and clock of the \
             provisioner",
        ),
    ),
    (
        &[
            "AccessDenied",
            "AccessDeniedException",
            "Forbidden",
            "AllAccessDisabled",
        ],
        Diagnosis::AccessDenied,
    ),
    (
        &["InvalidBucketName"],
        Diagnosis::Fix(
            "invalid bucket name: use 3-63 characters of lowercase letters, digits, dots and \
             hyphens, starting and ending with a letter or digit",
        ),
    ),
    (
        &["BucketAlreadyExists"],
        Diagnosis::Fix(
            "the bucket name is owned by another AWS account; choose another bucket name",
        ),
    ),
    (
        &[
            "IllegalLocationConstraintException",
            "InvalidLocationConstraint",
        ],
        Diagnosis::Fix(
            "the bucket region does not match the region of the request; check the requested \
             region",
        ),
    ),
    (
        &[
            "MalformedPolicyDocument",
            "MalformedPolicyDocumentException",
        ],
        Diagnosis::Fix("IAM rejected the policy document as malformed; fix the policy template"),
    ),
    (
        &["LimitExceeded", "LimitExceededException"],
        Diagnosis::Fix(
            "an IAM quota was reached (2 access keys per user, 5 versions per policy, 10 \
             managed policies per group, ...); delete unused keys or policy versions, or raise \
             the quota",
        ),
    ),
    (
        &["DeleteConflict"],
        Diagnosis::Fix("the IAM entity is still in use; detach or remove it first"),
    ),
    // Every step reads before it creates, so a retry takes the existing-resource path; the
    // steps handle these codes themselves, this row is for a create that does not.
    (
        &[ENTITY_ALREADY_EXISTS, "BucketAlreadyOwnedByYou"],
        Diagnosis::Retry(
            "the resource already exists but was not seen by the read before the create (a \
             lost response or eventual consistency); it is read again on retry",
        ),
    ),
    // IAM is eventually consistent; a resource created moments ago can be missing.
    (
        &["NoSuchEntity", "NoSuchEntityException", "NoSuchBucket"],
        Diagnosis::Retry("the resource was not found (not yet visible or deleted concurrently)"),
    ),
    (
        &[
            "ValidationError",
            "InvalidInput",
            "InvalidParameterValue",
            "InvalidArgument",
            "InvalidRequest",
            "MalformedXML",
            "InvalidParameterCombination",
        ],
        Diagnosis::Fix(
            "AWS rejected the request as invalid; check the names and settings supplied",
        ),
    ),
];

/// The meaning of a service error: 429 always means throttling, then the code decides, then
/// the HTTP status.
fn diagnose(code: Option<&str>, status: Option<u16>) -> Diagnosis {
    if status == Some(429) {
        return THROTTLED;
    }
    let code = code.unwrap_or("");
    KNOWN_CODES
        .iter()
        .find(|(codes, _)| codes.contains(&code))
        .map(|(_, diagnosis)| *diagnosis)
        .unwrap_or_else(|| diagnose_status(status))
}

/// The meaning of a service error whose code is unknown (or absent), from its HTTP status.
fn diagnose_status(status: Option<u16>) -> Diagnosis {
    match status {
        Some(s) if s >= 500 => Diagnosis::Retry("AWS server error; retry later"),
        Some(403) => Diagnosis::AccessDenied,
        Some(404) => Diagnosis::Retry("the resource was not found (not yet visible or deleted)"),
        _ => Diagnosis::Fix("AWS rejected the request"),
    }
}

/// What AWS said, appended to our message: ` [Code: message]`, ` [Code]`, ` [message]` or
/// ` [HTTP status]`.
fn upstream_said(code: Option<&str>, aws_message: Option<&str>, status: Option<u16>) -> String {
    match (code, aws_message) {
        (Some(code), Some(message)) if !message.is_empty() => format!(" [{code}: {message}]"),
        (Some(code), _) => format!(" [{code}]"),
        (None, Some(message)) if !message.is_empty() => format!(" [{message}]"),
        _ => status.map(|s| format!(" [HTTP {s}]")).unwrap_or_default(),
    }
}

/// Classification of a service error from its code and HTTP status (see [`classify`]).
pub fn classify_code(
    service: &'static str,
    operation: &'static str,
    code: Option<&str>,
    status: Option<u16>,
    aws_message: Option<&str>,
    request_id: Option<String>,
) -> CloudError {
    let (retry, what) = match diagnose(code, status) {
        Diagnosis::Retry(what) => (Retry::Yes, what.to_owned()),
        Diagnosis::Fix(what) => (Retry::No, what.to_owned()),
        Diagnosis::AccessDenied => (
            Retry::No,
            format!(
                "access denied: grant the provisioner's AWS identity permission for \
                 {service}:{operation}"
            ),
        ),
    };
    let message = format!("{what}{}", upstream_said(code, aws_message, status));
    CloudError::classified(retry, service, operation, message, request_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_name_from_input_debug() {
        #[derive(Debug)]
        #[allow(dead_code)]
        struct CreateUserInput {
            user_name: Option<String>,
        }
        struct Erased(CreateUserInput);
        impl fmt::Debug for Erased {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("TypeErasedBox[Clone]:")?;
                fmt::Debug::fmt(&self.0, f)
            }
        }
        let input = Erased(CreateUserInput {
            user_name: Some("x".into()),
        });
        assert_eq!(operation_name(&input), "CreateUser");
    }

    #[test]
    fn mutating_split() {
        for op in [
            "CreateUser",
            "PutBucketTagging",
            "iam:UntagUser",
            "AttachGroupPolicy",
        ] {
            assert!(CallCounter::is_mutating(op), "{op}");
        }
        for op in [
            "GetUser",
            "s3:HeadBucket",
            "ListPolicies",
            "GetBucketLocation",
        ] {
            assert!(!CallCounter::is_mutating(op), "{op}");
        }
    }

    /// (code, HTTP status, AWS message, retryable, our message); `""` and `0` stand for none.
    const SERVICE_ERRORS: &[(&str, u16, &str, bool, &str)] = &[
        (
            "AccessDenied",
            429,
            "",
            true,
            "AWS is throttling requests; retry later [AccessDenied]",
        ),
        (
            "SlowDown",
            503,
            "slow",
            true,
            "AWS is throttling requests; retry later [SlowDown: slow]",
        ),
        (
            "InternalError",
            500,
            "",
            true,
            "transient AWS error; retry later [InternalError]",
        ),
        (
            "ExpiredToken",
            400,
            "",
            false,
            "AWS rejected the credentials; check the access key, secret and clock of the \
             provisioner [ExpiredToken]",
        ),
        (
            "AccessDenied",
            403,
            "",
            false,
            "access denied: grant the provisioner's AWS identity permission for \
             iam:CreateUser [AccessDenied]",
        ),
        (
            "NoSuchEntity",
            404,
            "",
            true,
            "the resource was not found (not yet visible or deleted concurrently) [NoSuchEntity]",
        ),
        (
            "EntityAlreadyExists",
            409,
            "",
            true,
            "the resource already exists but was not seen by the read before the create (a \
             lost response or eventual consistency); it is read again on retry \
             [EntityAlreadyExists]",
        ),
        (
            "MalformedXML",
            400,
            "",
            false,
            "AWS rejected the request as invalid; check the names and settings supplied \
             [MalformedXML]",
        ),
        (
            "Unheard",
            502,
            "",
            true,
            "AWS server error; retry later [Unheard]",
        ),
        (
            "",
            403,
            "",
            false,
            "access denied: grant the provisioner's AWS identity permission for \
             iam:CreateUser [HTTP 403]",
        ),
        (
            "",
            404,
            "gone",
            true,
            "the resource was not found (not yet visible or deleted) [gone]",
        ),
        ("", 0, "", false, "AWS rejected the request"),
    ];

    #[test]
    fn service_errors_by_code_then_status() {
        let some = |s: &'static str| (!s.is_empty()).then_some(s);
        for &(code, status, said, retryable, message) in SERVICE_ERRORS {
            let status = (status != 0).then_some(status);
            let e = classify_code("iam", "CreateUser", some(code), status, some(said), None);
            assert_eq!(e.is_retryable(), retryable, "{code} {status:?}");
            assert_eq!(e.to_string(), format!("iam CreateUser: {message}"));
        }
        let e = classify_code("iam", "CreateUser", None, None, None, Some("r-1".into()));
        assert_eq!(e.request_id(), Some("r-1"));
    }

    #[test]
    fn every_known_code_has_one_meaning() {
        let mut seen = std::collections::BTreeSet::new();
        for (codes, _) in KNOWN_CODES {
            for code in *codes {
                assert!(seen.insert(*code), "{code} is listed twice");
            }
        }
    }
}
