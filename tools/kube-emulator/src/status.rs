//! `metav1.Status` failures, shaped exactly like kube-apiserver's.

use serde_json::{Map, Value, json};

use crate::store::Kind;

/// A failed API call: HTTP code, `reason`, `message` and optional `details`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
    /// Extra response headers (for example `Retry-After` on 429).
    pub retry_after_seconds: Option<u32>,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
            retry_after_seconds: None,
        }
    }

    fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    /// `secrets "x" not found`.
    pub fn not_found(kind: Kind, name: &str) -> Self {
        ApiError::new(
            404,
            "NotFound",
            format!("{} \"{}\" not found", kind.plural(), name),
        )
        .with_details(json!({"name": name, "kind": kind.plural()}))
    }

    /// The generic 404 for a path the server does not serve.
    pub fn no_route() -> Self {
        ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
        .with_details(json!({}))
    }

    pub fn method_not_allowed() -> Self {
        ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )
        .with_details(json!({}))
    }

    pub fn already_exists(kind: Kind, name: &str) -> Self {
        ApiError::new(
            409,
            "AlreadyExists",
            format!("{} \"{}\" already exists", kind.plural(), name),
        )
        .with_details(json!({"name": name, "kind": kind.plural()}))
    }

    /// The optimistic-concurrency conflict of an update with a stale `resourceVersion`.
    pub fn stale(kind: Kind, name: &str) -> Self {
        ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{}\": the object has been modified; \
                 please apply your changes to the latest version and try again",
                kind.plural(),
                name
            ),
        )
        .with_details(json!({"name": name, "kind": kind.plural()}))
    }

    /// A precondition (uid or resourceVersion) that does not hold.
    pub fn precondition(kind: Kind, name: &str, what: String) -> Self {
        ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{}\": {}",
                kind.plural(),
                name,
                what
            ),
        )
        .with_details(json!({"name": name, "kind": kind.plural()}))
    }

    /// Server-side apply conflicts: `(manager, field path)` pairs.
    pub fn apply_conflicts(kind: Kind, name: &str, conflicts: &[(String, String)]) -> Self {
        let n = conflicts.len();
        let mut by_manager: Vec<(String, Vec<String>)> = Vec::new();
        for (manager, field) in conflicts {
            match by_manager.iter_mut().find(|(m, _)| m == manager) {
                Some((_, fields)) => fields.push(field.clone()),
                None => by_manager.push((manager.clone(), vec![field.clone()])),
            }
        }
        let mut parts = Vec::new();
        for (manager, fields) in &by_manager {
            if fields.len() == 1 {
                parts.push(format!(
                    "conflict with \"{manager}\" using v1: {}",
                    fields[0]
                ));
            } else {
                let list: Vec<String> = fields.iter().map(|f| format!("- {f}")).collect();
                parts.push(format!(
                    "conflicts with \"{manager}\" using v1:\n{}",
                    list.join("\n")
                ));
            }
        }
        let message = format!(
            "Apply failed with {n} conflict{}: {}",
            if n == 1 { "" } else { "s" },
            parts.join("\n")
        );
        let causes: Vec<Value> = conflicts
            .iter()
            .map(|(manager, field)| {
                json!({
                    "reason": "FieldManagerConflict",
                    "message": format!("conflict with \"{manager}\" using v1"),
                    "field": field,
                })
            })
            .collect();
        ApiError::new(409, "Conflict", message)
            .with_details(json!({"name": name, "kind": kind.plural(), "causes": causes}))
    }

    /// 422 Invalid: `Secret "x" is invalid: field: detail`.
    pub fn invalid(kind: Kind, name: &str, causes: Vec<(String, String)>) -> Self {
        let list: Vec<String> = causes.iter().map(|(f, m)| format!("{f}: {m}")).collect();
        let joined = if list.len() == 1 {
            list[0].clone()
        } else {
            format!("[{}]", list.join(", "))
        };
        let message = format!("{} \"{}\" is invalid: {}", kind.kind_name(), name, joined);
        let causes: Vec<Value> = causes
            .iter()
            .map(|(field, msg)| json!({"reason": "FieldValueInvalid", "message": msg, "field": field}))
            .collect();
        ApiError::new(422, "Invalid", message).with_details(json!({
            "name": name,
            "group": "",
            "kind": kind.kind_name(),
            "causes": causes,
        }))
    }

    /// 422 for invalid request options (`PatchOptions.meta.k8s.io "" is invalid: ...`).
    pub fn invalid_options(options: &str, field: &str, msg: &str) -> Self {
        ApiError::new(
            422,
            "Invalid",
            format!("{options}.meta.k8s.io \"\" is invalid: {field}: {msg}"),
        )
        .with_details(json!({
            "group": "meta.k8s.io",
            "kind": options,
            "causes": [{"reason": "FieldValueRequired", "message": msg, "field": field}],
        }))
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(400, "BadRequest", message)
    }

    pub fn unauthorized() -> Self {
        ApiError::new(401, "Unauthorized", "Unauthorized")
    }

    pub fn unsupported_media_type(content_type: &str) -> Self {
        ApiError::new(
            415,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {content_type:?})"),
        )
        .with_details(json!({}))
    }

    /// The `metav1.Status` body.
    pub fn to_status(&self) -> Value {
        let mut status = Map::new();
        status.insert("kind".into(), Value::from("Status"));
        status.insert("apiVersion".into(), Value::from("v1"));
        status.insert("metadata".into(), json!({}));
        status.insert("status".into(), Value::from("Failure"));
        status.insert("message".into(), Value::from(self.message.clone()));
        if !self.reason.is_empty() {
            status.insert("reason".into(), Value::from(self.reason));
        }
        if let Some(details) = &self.details {
            status.insert("details".into(), details.clone());
        }
        status.insert("code".into(), Value::from(self.code));
        Value::Object(status)
    }
}

/// The `Success` status a delete of a secret answers with.
pub fn success_status(kind: Kind, name: &str, uid: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {"name": name, "kind": kind.plural(), "uid": uid},
    })
}
