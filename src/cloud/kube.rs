//! The Kubernetes client (from `KUBECONFIG` or the in-cluster service account) and the
//! classification of its errors into [`CloudError`].

use std::borrow::Cow;
use std::time::Duration;

use kube::core::Status;

use super::{CloudError, Retry};

/// The `service` of every Kubernetes [`CloudError`].
pub const SERVICE: &str = "kubernetes";

/// Read timeout applied when the configuration sets none (kube's default is to wait forever).
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A client from the standard sources, in kube's order: `KUBECONFIG` (or `~/.kube/config`),
/// then the in-cluster service account (`KUBERNETES_SERVICE_HOST` and the mounted token).
pub async fn client_from_env() -> Result<kube::Client, CloudError> {
    let config = kube::Config::infer().await.map_err(|e| {
        CloudError::permanent(
            SERVICE,
            "load configuration",
            format!(
                "no usable Kubernetes configuration: set KUBECONFIG to a kubeconfig file, or run \
                 in a pod with a service account ({e})"
            ),
        )
    })?;
    client_from_config(config)
}

/// A client for an explicit configuration (tests, the emulator). Sets a read timeout when the
/// configuration has none, so a hung API server becomes a retryable error instead of a hang.
pub fn client_from_config(mut config: kube::Config) -> Result<kube::Client, CloudError> {
    // One process-wide rustls provider (aws-lc-rs); a second install is a harmless no-op.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    if config.read_timeout.is_none() {
        config.read_timeout = Some(DEFAULT_READ_TIMEOUT);
    }
    // The client's own retry of 429/503/504 (up to 15 tries, backing off to minutes) would hide
    // throttling from the job engine, whose backoff, attempt budget and audit log should see it.
    config.default_retry = false;
    kube::Client::try_from(config).map_err(|e| classify("build client", e))
}

/// Classifies a kube client error for the retry policy.
///
/// Retryable: 429, 5xx, timeouts, connection failures, unreadable responses, a stale
/// `resourceVersion` (409 Conflict) and AlreadyExists (a concurrent create).
/// Permanent: 401/403 (naming the missing permission), 404 (e.g. a missing namespace),
/// 400/422 (invalid object), server-side apply field conflicts, and configuration errors.
pub fn classify(operation: &'static str, err: kube::Error) -> CloudError {
    match err {
        kube::Error::Api(status) => classify_status(operation, &status),
        kube::Error::HyperError(e) => transport(operation, &e),
        kube::Error::Service(e) => transport(operation, e.as_ref()),
        kube::Error::ReadEvents(e) => transport(operation, &e),
        kube::Error::SerdeError(e) => CloudError::retryable(
            SERVICE,
            operation,
            format!("the Kubernetes API answered with an unexpected body: {e}"),
        ),
        kube::Error::FromUtf8(e) => CloudError::retryable(
            SERVICE,
            operation,
            format!("the Kubernetes API answered with a body that is not UTF-8: {e}"),
        ),
        kube::Error::Auth(e) => CloudError::permanent(
            SERVICE,
            operation,
            format!(
                "could not obtain Kubernetes credentials: {e}; check the kubeconfig user or the \
                 service account token"
            ),
        ),
        kube::Error::BuildRequest(e) => CloudError::permanent(
            SERVICE,
            operation,
            format!("invalid Kubernetes request: {e}"),
        ),
        other => CloudError::permanent(
            SERVICE,
            operation,
            format!("Kubernetes client configuration error: {other}"),
        ),
    }
}

/// True if an error (or one of its sources) is a timeout.
fn is_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
        {
            return true;
        }
        if e.is::<tokio::time::error::Elapsed>() {
            return true;
        }
        let text = e.to_string().to_ascii_lowercase();
        if text.contains("timed out") || text.contains("timeout") {
            return true;
        }
        current = e.source();
    }
    false
}

/// rustls' words for a server certificate that does not chain to a trusted CA or is not for
/// this server.
fn is_untrusted_certificate(detail: &str) -> bool {
    [
        "invalid peer certificate",
        "UnknownIssuer",
        "NotValidForName",
        "certificate verify failed",
    ]
    .iter()
    .any(|words| detail.contains(words))
}

/// The full error chain, `a: b: c`.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![err.to_string()];
    let mut current = err.source();
    while let Some(e) = current {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        current = e.source();
    }
    parts.join(": ")
}

fn transport(operation: &'static str, err: &(dyn std::error::Error + 'static)) -> CloudError {
    let detail = chain(err);
    if is_untrusted_certificate(&detail) {
        // A certificate we do not trust will not become trusted by waiting: the kubeconfig's
        // CA (or the server's certificate) is wrong.
        return CloudError::permanent(
            SERVICE,
            operation,
            format!(
                "the Kubernetes API's TLS certificate is not trusted ({detail}); check the \
                 kubeconfig's certificate-authority data or the in-cluster CA"
            ),
        );
    }
    let message = if is_timeout(err) {
        format!("the request to the Kubernetes API timed out ({detail})")
    } else {
        format!("could not reach the Kubernetes API ({detail})")
    };
    CloudError::retryable(SERVICE, operation, message)
}

/// What a Forbidden message says: `User "u" cannot VERB resource "R" in API group "G" in the
/// namespace "NS"` (or `at the cluster scope`).
#[derive(Debug, PartialEq, Eq)]
struct Denied<'a> {
    user: &'a str,
    verb: &'a str,
    resource: &'a str,
    group: &'a str,
    namespace: Option<&'a str>,
}

fn quoted_after<'a>(text: &'a str, marker: &str) -> Option<&'a str> {
    let start = text.find(marker)? + marker.len();
    let rest = text[start..].strip_prefix('"')?;
    Some(&rest[..rest.find('"')?])
}

fn parse_denied(message: &str) -> Option<Denied<'_>> {
    let user = quoted_after(message, "User ")?;
    let after_user = &message[message.find("cannot ")? + "cannot ".len()..];
    let verb = after_user.split_whitespace().next()?;
    Some(Denied {
        user,
        verb,
        resource: quoted_after(message, "resource ")?,
        group: quoted_after(message, "API group ").unwrap_or(""),
        namespace: quoted_after(message, "in the namespace "),
    })
}

fn classify_status(operation: &'static str, status: &Status) -> CloudError {
    let (retry, what) = diagnose(status);
    let said = if status.message.is_empty() {
        format!("HTTP {} {}", status.code, status.reason)
    } else {
        format!("HTTP {} {}: {}", status.code, status.reason, status.message)
    };
    CloudError::classified(retry, SERVICE, operation, format!("{what} ({said})"), None)
}

/// What a failure `Status` means: whether a retry can help, and what happened or what to fix.
fn diagnose(status: &Status) -> (Retry, Cow<'static, str>) {
    let retry = |what: &'static str| (Retry::Yes, Cow::Borrowed(what));
    let fix = |what: &'static str| (Retry::No, Cow::Borrowed(what));
    match (status.code, status.reason.as_str()) {
        (429, _) | (_, "TooManyRequests") => retry("the Kubernetes API is throttling requests"),
        (500..=599, _)
        | (_, "InternalError" | "ServiceUnavailable" | "ServerTimeout" | "Timeout") => {
            retry("the Kubernetes API failed or timed out")
        }
        (401, _) | (_, "Unauthorized") => fix(
            "the Kubernetes API rejected the provisioner's credentials; check the kubeconfig \
             user or the service account token",
        ),
        (403, _) | (_, "Forbidden") => (Retry::No, forbidden(&status.message)),
        (404, _) | (_, "NotFound") => (Retry::No, not_found(status)),
        (409, "AlreadyExists") => retry("the object was created concurrently"),
        (409, _) | (_, "Conflict") if is_field_conflict(status) => {
            fix("other field managers own fields this apply would change")
        }
        (409, _) | (_, "Conflict") => {
            retry("the object changed concurrently (stale resourceVersion)")
        }
        (410, _) | (_, "Expired" | "Gone") => retry("the resourceVersion expired"),
        (422, _) | (_, "Invalid") => fix("the Kubernetes API rejected the object as invalid"),
        (400, _) | (_, "BadRequest") => fix("the Kubernetes API rejected the request"),
        (400..=499, _) => fix("the Kubernetes API refused the request"),
        _ => retry("unexpected answer from the Kubernetes API"),
    }
}

/// A 403: names the missing permission when the message says which one.
fn forbidden(message: &str) -> Cow<'static, str> {
    match parse_denied(message) {
        Some(d) => {
            let group = if d.group.is_empty() { "core" } else { d.group };
            // A namespace that does not exist has no RoleBinding either, so a namespace-scoped
            // Role answers 403 for it too.
            let scope = match d.namespace {
                Some(ns) => format!(
                    "in namespace {ns:?} (a Role and RoleBinding there), or create the \
                     namespace if it does not exist yet"
                ),
                None => "cluster-wide (a ClusterRole and ClusterRoleBinding)".into(),
            };
            format!(
                "permission denied: grant {:?} the {:?} verb on {:?} (API group {group}) {scope}",
                d.user, d.verb, d.resource
            )
            .into()
        }
        None if message.contains("being terminated") => {
            "the namespace is being deleted; recreate it, then retry".into()
        }
        None => "permission denied by the Kubernetes API".into(),
    }
}

/// A 404: a missing namespace is named, since creating it is the fix.
fn not_found(status: &Status) -> Cow<'static, str> {
    let details = status.details.as_ref();
    let is_namespace = details.is_some_and(|d| d.kind == "namespaces")
        || status.message.starts_with("namespaces ");
    if !is_namespace {
        return "the Kubernetes API has no such resource".into();
    }
    let ns = match details.map(|d| d.name.as_str()).unwrap_or("") {
        "" => quoted_after(&status.message, "namespaces ").unwrap_or(""),
        name => name,
    };
    format!(
        "namespace {ns:?} does not exist; create it (or fix the repository's namespace), then \
         retry"
    )
    .into()
}

/// A 409 from server-side apply: other field managers own fields the apply would change.
fn is_field_conflict(status: &Status) -> bool {
    status.message.starts_with("Apply failed")
        || status
            .details
            .as_ref()
            .is_some_and(|d| d.causes.iter().any(|c| c.reason == "FieldManagerConflict"))
}

#[cfg(test)]
mod tests {
    use kube::core::response::{StatusCause, StatusDetails};

    use super::*;

    fn api(code: u16, reason: &str, message: &str) -> kube::Error {
        kube::Error::Api(Status::failure(message, reason).with_code(code).boxed())
    }

    fn with_details(code: u16, reason: &str, message: &str, kind: &str, name: &str) -> kube::Error {
        kube::Error::Api(
            Status::failure(message, reason)
                .with_code(code)
                .with_details(StatusDetails {
                    name: name.into(),
                    group: String::new(),
                    kind: kind.into(),
                    uid: String::new(),
                    causes: Vec::new(),
                    retry_after_seconds: 0,
                })
                .boxed(),
        )
    }

    fn message(e: &CloudError) -> String {
        e.to_string()
    }

    #[test]
    fn throttling_and_server_errors_are_retryable() {
        for (code, reason) in [
            (429, "TooManyRequests"),
            (500, "InternalError"),
            (503, "ServiceUnavailable"),
            (504, "Timeout"),
            (502, ""),
        ] {
            let e = classify("get secret", api(code, reason, "x"));
            assert!(e.is_retryable(), "{code} {reason}: {e}");
        }
    }

    #[test]
    fn unauthorized_is_permanent() {
        let e = classify("get secret", api(401, "Unauthorized", "Unauthorized"));
        assert!(!e.is_retryable());
        assert!(message(&e).contains("credentials"), "{e}");
    }

    #[test]
    fn forbidden_names_the_missing_permission() {
        let e = classify(
            "apply secret",
            api(
                403,
                "Forbidden",
                "secrets \"b\" is forbidden: User \"system:serviceaccount:ops:bp\" cannot patch \
                 resource \"secrets\" in API group \"\" in the namespace \"zitadel\"",
            ),
        );
        assert!(!e.is_retryable());
        let m = message(&e);
        assert!(
            m.starts_with("kubernetes apply secret: permission denied"),
            "{m}"
        );
        assert!(
            m.contains("\"patch\" verb on \"secrets\" (API group core)"),
            "{m}"
        );
        assert!(m.contains("in namespace \"zitadel\""), "{m}");
        assert!(m.contains("system:serviceaccount:ops:bp"), "{m}");

        let cluster = classify(
            "list secrets",
            api(
                403,
                "Forbidden",
                "secrets is forbidden: User \"u\" cannot list resource \"secrets\" in API group \"\" at the cluster scope",
            ),
        );
        assert!(message(&cluster).contains("cluster-wide"), "{cluster}");
    }

    #[test]
    fn missing_namespace_is_permanent() {
        let e = classify(
            "apply secret",
            with_details(
                404,
                "NotFound",
                "namespaces \"nope\" not found",
                "namespaces",
                "nope",
            ),
        );
        assert!(!e.is_retryable());
        assert!(
            message(&e).contains("namespace \"nope\" does not exist"),
            "{e}"
        );
    }

    #[test]
    fn conflicts() {
        let stale = classify(
            "update secret",
            api(
                409,
                "Conflict",
                "Operation cannot be fulfilled on secrets \"a\": the object has been modified; please apply your changes to the latest version and try again",
            ),
        );
        assert!(stale.is_retryable());
        let exists = classify(
            "create secret",
            api(409, "AlreadyExists", "secrets \"a\" already exists"),
        );
        assert!(exists.is_retryable());
        let mut status = Status::failure(
            "Apply failed with 1 conflict: conflict with \"kubectl\" using v1: .data.s3.conf",
            "Conflict",
        )
        .with_code(409);
        status.details = Some(StatusDetails {
            name: "a".into(),
            group: String::new(),
            kind: "secrets".into(),
            uid: String::new(),
            causes: vec![StatusCause {
                reason: "FieldManagerConflict".into(),
                message: "conflict with \"kubectl\" using v1".into(),
                field: ".data.s3.conf".into(),
            }],
            retry_after_seconds: 0,
        });
        let apply = classify("apply secret", kube::Error::Api(status.boxed()));
        assert!(!apply.is_retryable());
    }

    #[test]
    fn invalid_and_bad_request_are_permanent() {
        assert!(
            !classify(
                "apply secret",
                api(422, "Invalid", "Secret \"A\" is invalid")
            )
            .is_retryable()
        );
        assert!(!classify("apply secret", api(400, "BadRequest", "bad")).is_retryable());
    }

    #[test]
    fn unparsable_bodies_are_retryable() {
        let err = serde_json::from_str::<serde_json::Value>("<html>").unwrap_err();
        assert!(classify("get secret", kube::Error::SerdeError(err)).is_retryable());
    }

    #[tokio::test]
    async fn timeouts_are_retryable() {
        let elapsed = tokio::time::timeout(Duration::ZERO, std::future::pending::<()>())
            .await
            .unwrap_err();
        let e = classify("get secret", kube::Error::Service(Box::new(elapsed)));
        assert!(e.is_retryable());
        assert!(message(&e).contains("timed out"), "{e}");
    }

    #[test]
    fn denied_parser() {
        let d = parse_denied(
            "secrets \"x\" is forbidden: User \"u\" cannot get resource \"secrets\" in API group \"\" in the namespace \"y\"",
        )
        .unwrap();
        assert_eq!(
            d,
            Denied {
                user: "u",
                verb: "get",
                resource: "secrets",
                group: "",
                namespace: Some("y")
            }
        );
        assert!(parse_denied("forbidden").is_none());
    }

    #[test]
    fn an_untrusted_server_certificate_is_permanent_and_says_so() {
        let err = std::io::Error::other("invalid peer certificate: UnknownIssuer");
        let e = transport("get secret", &err);
        assert!(!e.is_retryable(), "{e}");
        assert!(e.to_string().contains("certificate-authority"), "{e}");
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(transport("get secret", &refused).is_retryable());
    }
}
