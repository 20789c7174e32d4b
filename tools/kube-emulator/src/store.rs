//! The object store: namespaces and secrets, their resource versions and field ownership, and
//! the semantics of each verb (create, update, patch, apply, delete, list).

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Map, Value, json};

use crate::managed::{self, ManagedEntry};
use crate::selector::{FieldSelector, LabelSelector};
use crate::status::{ApiError, success_status};
use crate::validate;

/// The resource kinds the emulator serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Namespace,
    Secret,
}

impl Kind {
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Namespace => "namespaces",
            Kind::Secret => "secrets",
        }
    }

    pub fn kind_name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Secret => "Secret",
        }
    }

    fn list_kind(self) -> &'static str {
        match self {
            Kind::Namespace => "NamespaceList",
            Kind::Secret => "SecretList",
        }
    }

    fn namespaced(self) -> bool {
        matches!(self, Kind::Secret)
    }

    fn allowed_fields(self) -> &'static [&'static str] {
        match self {
            Kind::Namespace => &["apiVersion", "kind", "metadata", "spec", "status"],
            Kind::Secret => &[
                "apiVersion",
                "kind",
                "metadata",
                "data",
                "stringData",
                "type",
                "immutable",
            ],
        }
    }
}

const METADATA_FIELDS: &[&str] = &[
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
];

const MAX_SECRET_BYTES: usize = 1024 * 1024;

/// A stored object: its JSON (with server fields) and its field ownership.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredObject {
    pub body: Value,
    pub managed: Vec<ManagedEntry>,
}

fn meta_str<'a>(body: &'a Value, field: &str) -> &'a str {
    body.get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn metadata_mut(body: &mut Value) -> &mut Map<String, Value> {
    let obj = body.as_object_mut().expect("object body");
    let meta = obj
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !meta.is_object() {
        *meta = Value::Object(Map::new());
    }
    meta.as_object_mut().expect("metadata object")
}

impl StoredObject {
    /// The object as the API returns it (with `metadata.managedFields`).
    pub fn render(&self) -> Value {
        let mut out = self.body.clone();
        if !self.managed.is_empty() {
            metadata_mut(&mut out).insert("managedFields".into(), managed::render(&self.managed));
        }
        out
    }

    pub fn uid(&self) -> &str {
        meta_str(&self.body, "uid")
    }

    pub fn resource_version(&self) -> &str {
        meta_str(&self.body, "resourceVersion")
    }
}

/// Unknown fields dropped from a request body (reported as warnings, or an error with
/// `fieldValidation=Strict`).
pub type UnknownFields = Vec<String>;

/// Request options shared by the mutating verbs.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    pub manager: String,
    pub dry_run: bool,
    pub strict: bool,
}

pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn new_uid() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    uuid::Uuid::new_v4()
        .as_bytes()
        .iter()
        .take(5)
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

#[derive(Debug, Default)]
pub struct Store {
    objects: BTreeMap<(Kind, String, String), StoredObject>,
    resource_version: u64,
}

fn key(kind: Kind, namespace: &str, name: &str) -> (Kind, String, String) {
    let ns = if kind.namespaced() { namespace } else { "" };
    (kind, ns.to_string(), name.to_string())
}

fn decode_error(path: &str, expected: &str, got: &Value) -> ApiError {
    let found = match got {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    ApiError::bad_request(format!(
        "json: cannot unmarshal {found} into Go struct field {path} of type {expected}"
    ))
}

/// Takes a `map[string]string` field, dropping null values; wrong types are a 400.
fn string_map(
    parent: &mut Map<String, Value>,
    field: &str,
    path: &str,
) -> Result<Option<Map<String, Value>>, ApiError> {
    match parent.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(map)) => {
            let mut out = Map::new();
            for (k, v) in map {
                match v {
                    Value::Null => {}
                    Value::String(_) => {
                        out.insert(k, v);
                    }
                    other => return Err(decode_error(path, "string", &other)),
                }
            }
            Ok(Some(out))
        }
        Some(other) => Err(decode_error(path, "map[string]string", &other)),
    }
}

/// Type checks, unknown-field pruning and `stringData` folding: everything that happens while
/// the real server decodes a request body.
fn decode(kind: Kind, body: &mut Value, unknown: &mut UnknownFields) -> Result<(), ApiError> {
    let Some(obj) = body.as_object_mut() else {
        return Err(ApiError::bad_request(
            "the body of the request must be a JSON object",
        ));
    };
    let top: Vec<String> = obj.keys().cloned().collect();
    for k in top {
        if !kind.allowed_fields().contains(&k.as_str()) {
            obj.remove(&k);
            unknown.push(k);
        }
    }
    match obj.get_mut("metadata") {
        None | Some(Value::Null) => {
            obj.remove("metadata");
        }
        Some(Value::Object(meta)) => {
            let keys: Vec<String> = meta.keys().cloned().collect();
            for k in keys {
                if !METADATA_FIELDS.contains(&k.as_str()) {
                    meta.remove(&k);
                    unknown.push(format!("metadata.{k}"));
                }
            }
            for field in ["labels", "annotations"] {
                if let Some(map) = string_map(meta, field, &format!("ObjectMeta.metadata.{field}"))?
                {
                    meta.insert(field.into(), Value::Object(map));
                }
            }
            for field in [
                "name",
                "generateName",
                "namespace",
                "uid",
                "resourceVersion",
            ] {
                match meta.get(field) {
                    None | Some(Value::String(_)) => {}
                    Some(Value::Null) => {
                        meta.remove(field);
                    }
                    Some(other) => {
                        return Err(decode_error(
                            &format!("ObjectMeta.metadata.{field}"),
                            "string",
                            other,
                        ));
                    }
                }
            }
        }
        Some(other) => return Err(decode_error("Secret.metadata", "v1.ObjectMeta", other)),
    }
    if kind == Kind::Secret {
        let mut data = string_map(obj, "data", "Secret.data")?.unwrap_or_default();
        for (k, v) in data.iter() {
            let text = v.as_str().unwrap_or_default();
            if let Err(e) = B64.decode(text) {
                return Err(ApiError::bad_request(format!(
                    "Secret in version \"v1\" cannot be handled as a Secret: illegal base64 data \
                     at input byte {} (data[{k}])",
                    match e {
                        base64::DecodeError::InvalidByte(i, _) => i,
                        base64::DecodeError::InvalidLastSymbol(i, _) => i,
                        _ => text.len(),
                    }
                )));
            }
        }
        if let Some(string_data) = string_map(obj, "stringData", "Secret.stringData")? {
            for (k, v) in string_data {
                let text = v.as_str().unwrap_or_default();
                data.insert(k, Value::String(B64.encode(text.as_bytes())));
            }
        }
        if !data.is_empty() {
            obj.insert("data".into(), Value::Object(data));
        }
        match obj.get("type") {
            None | Some(Value::String(_)) => {}
            Some(Value::Null) => {
                obj.remove("type");
            }
            Some(other) => return Err(decode_error("Secret.type", "v1.SecretType", other)),
        }
        match obj.get("immutable") {
            None | Some(Value::Bool(_)) => {}
            Some(Value::Null) => {
                obj.remove("immutable");
            }
            Some(other) => return Err(decode_error("Secret.immutable", "bool", other)),
        }
    }
    Ok(())
}

/// Checks `apiVersion` and `kind` of a full object body.
fn check_type_meta(kind: Kind, body: &Value) -> Result<(), ApiError> {
    let api_version = body.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind_field = body.get("kind").and_then(Value::as_str).unwrap_or("");
    if kind_field.is_empty() {
        return Err(ApiError::bad_request(format!(
            "Object 'Kind' is missing in '{body}'"
        )));
    }
    if api_version.is_empty() {
        return Err(ApiError::bad_request(format!(
            "Object 'apiVersion' is missing in '{body}'"
        )));
    }
    if api_version != "v1" {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({api_version}) does not match the expected API version (v1)"
        )));
    }
    if kind_field != kind.kind_name() {
        return Err(ApiError::bad_request(format!(
            "the kind in the data ({kind_field}) does not match the expected kind ({})",
            kind.kind_name()
        )));
    }
    Ok(())
}

/// Checks that `metadata.name`/`metadata.namespace` agree with the URL, filling them in when
/// absent.
fn check_identity(
    kind: Kind,
    namespace: &str,
    name: &str,
    body: &mut Value,
) -> Result<(), ApiError> {
    let body_name = meta_str(body, "name").to_string();
    if !body_name.is_empty() && body_name != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        )));
    }
    let body_ns = meta_str(body, "namespace").to_string();
    if kind.namespaced() && !body_ns.is_empty() && body_ns != namespace {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    metadata_mut(body).insert("name".into(), Value::from(name));
    Ok(())
}

/// Defaults and validation (what admission and the registry strategy do), for the object
/// about to be stored. `old` is the stored version on updates.
fn finalize(
    kind: Kind,
    namespace: &str,
    name: &str,
    body: &mut Value,
    old: Option<&Value>,
) -> Result<(), ApiError> {
    let obj = body.as_object_mut().expect("object body");
    obj.insert("apiVersion".into(), Value::from("v1"));
    obj.insert("kind".into(), Value::from(kind.kind_name()));
    let mut causes: Vec<(String, String)> = Vec::new();
    {
        let meta = metadata_mut(body);
        meta.insert("name".into(), Value::from(name));
        if kind.namespaced() {
            meta.insert("namespace".into(), Value::from(namespace));
        } else {
            meta.remove("namespace");
        }
        meta.remove("managedFields");
        meta.remove("selfLink");
        for field in ["labels", "annotations"] {
            let Some(map) = meta.get(field).and_then(Value::as_object) else {
                continue;
            };
            for (k, v) in map {
                if let Err(e) = validate::label_key(k) {
                    causes.push((
                        format!("metadata.{field}"),
                        format!("Invalid value: {k:?}: {e}"),
                    ));
                }
                if field == "labels" {
                    let v = v.as_str().unwrap_or_default();
                    if let Err(e) = validate::label_value(v) {
                        causes.push((
                            "metadata.labels".to_string(),
                            format!("Invalid value: {v:?}: {e}"),
                        ));
                    }
                }
            }
            if map.is_empty() {
                meta.remove(field);
            }
        }
    }
    match kind {
        Kind::Secret => {
            let obj = body.as_object_mut().expect("object body");
            if !obj.contains_key("type") {
                obj.insert("type".into(), Value::from("Opaque"));
            }
            let mut total = 0usize;
            if let Some(data) = obj.get("data").and_then(Value::as_object) {
                for (k, v) in data {
                    if let Err(e) = validate::config_key(k) {
                        causes.push((format!("data[{k}]"), format!("Invalid value: {k:?}: {e}")));
                    }
                    total += B64
                        .decode(v.as_str().unwrap_or_default())
                        .map(|d| d.len())
                        .unwrap_or(0);
                }
            }
            if total > MAX_SECRET_BYTES {
                causes.push((
                    "data".into(),
                    format!("Too long: must have at most {MAX_SECRET_BYTES} bytes"),
                ));
            }
            if let Some(old) = old {
                let old_type = old.get("type").and_then(Value::as_str).unwrap_or("Opaque");
                let new_type = obj.get("type").and_then(Value::as_str).unwrap_or("Opaque");
                if old_type != new_type {
                    causes.push((
                        "type".into(),
                        format!("Invalid value: {new_type:?}: field is immutable"),
                    ));
                }
                if old.get("immutable") == Some(&Value::Bool(true)) {
                    if obj.get("immutable") != Some(&Value::Bool(true)) {
                        causes.push((
                            "immutable".into(),
                            "Forbidden: field is immutable when `immutable` is set".into(),
                        ));
                    }
                    if obj.get("data") != old.get("data") {
                        causes.push((
                            "data".into(),
                            "Forbidden: field is immutable when `immutable` is set".into(),
                        ));
                    }
                }
            }
        }
        Kind::Namespace => {
            let labels = metadata_mut(body)
                .entry("labels")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Some(labels) = labels.as_object_mut() {
                labels.insert("kubernetes.io/metadata.name".into(), Value::from(name));
            }
            let obj = body.as_object_mut().expect("object body");
            let spec = obj.entry("spec").or_insert_with(|| json!({}));
            if !spec.is_object() {
                *spec = json!({});
            }
            if spec.get("finalizers").is_none() {
                spec["finalizers"] = json!(["kubernetes"]);
            }
            let status = old
                .and_then(|o| o.get("status").cloned())
                .unwrap_or_else(|| json!({"phase": "Active"}));
            obj.insert("status".into(), status);
        }
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(kind, name, causes))
    }
}

fn strict_check(opts: &WriteOptions, unknown: &UnknownFields) -> Result<(), ApiError> {
    if opts.strict && !unknown.is_empty() {
        let list: Vec<String> = unknown
            .iter()
            .map(|f| format!("unknown field \"{f}\""))
            .collect();
        return Err(ApiError::bad_request(format!(
            "strict decoding error: {}",
            list.join(", ")
        )));
    }
    Ok(())
}

fn copy_server_fields(from: &Value, to: &mut Value) {
    let meta = metadata_mut(to);
    for field in ["uid", "creationTimestamp", "resourceVersion"] {
        match from.get("metadata").and_then(|m| m.get(field)) {
            Some(v) => {
                meta.insert(field.into(), v.clone());
            }
            None => {
                meta.remove(field);
            }
        }
    }
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch_map) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let target_map = target.as_object_mut().expect("object");
    for (k, v) in patch_map {
        if v.is_null() {
            target_map.remove(k);
        } else {
            merge_patch(target_map.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

fn pointer_parts(pointer: &str) -> Result<Vec<String>, ApiError> {
    if pointer.is_empty() {
        return Ok(Vec::new());
    }
    let Some(rest) = pointer.strip_prefix('/') else {
        return Err(ApiError::bad_request(format!(
            "invalid JSON pointer {pointer:?}"
        )));
    };
    Ok(rest
        .split('/')
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect())
}

fn pointer_parent<'a>(doc: &'a mut Value, parts: &[String]) -> Option<&'a mut Value> {
    let mut cur = doc;
    for p in &parts[..parts.len().saturating_sub(1)] {
        cur = match cur {
            Value::Object(m) => m.get_mut(p)?,
            Value::Array(a) => a.get_mut(p.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn json_patch_remove(doc: &mut Value, parts: &[String]) -> Option<Value> {
    let last = parts.last()?;
    match pointer_parent(doc, parts)? {
        Value::Object(m) => m.remove(last),
        Value::Array(a) => {
            let i = last.parse::<usize>().ok()?;
            (i < a.len()).then(|| a.remove(i))
        }
        _ => None,
    }
}

fn json_patch_add(doc: &mut Value, parts: &[String], value: Value) -> Option<()> {
    let Some(last) = parts.last() else {
        *doc = value;
        return Some(());
    };
    match pointer_parent(doc, parts)? {
        Value::Object(m) => {
            m.insert(last.clone(), value);
        }
        Value::Array(a) => {
            if last == "-" {
                a.push(value);
            } else {
                let i = last.parse::<usize>().ok()?;
                if i > a.len() {
                    return None;
                }
                a.insert(i, value);
            }
        }
        _ => return None,
    }
    Some(())
}

/// RFC 6902 JSON patch.
fn json_patch(doc: &mut Value, patch: &Value) -> Result<(), ApiError> {
    let Some(ops) = patch.as_array() else {
        return Err(ApiError::bad_request(
            "a JSON patch must be an array of operations",
        ));
    };
    let failed = |what: String| ApiError::new(422, "Invalid", what);
    for op in ops {
        let kind = op.get("op").and_then(Value::as_str).unwrap_or("");
        let path = pointer_parts(op.get("path").and_then(Value::as_str).unwrap_or(""))?;
        let value = op.get("value").cloned();
        match kind {
            "add" => {
                let v =
                    value.ok_or_else(|| ApiError::bad_request("add operation requires a value"))?;
                json_patch_add(doc, &path, v).ok_or_else(|| {
                    failed(format!(
                        "add operation does not apply: doc is missing path: {path:?}"
                    ))
                })?;
            }
            "remove" => {
                json_patch_remove(doc, &path).ok_or_else(|| {
                    failed(format!(
                        "remove operation does not apply: doc is missing path: {path:?}"
                    ))
                })?;
            }
            "replace" => {
                let v = value
                    .ok_or_else(|| ApiError::bad_request("replace operation requires a value"))?;
                json_patch_remove(doc, &path).ok_or_else(|| {
                    failed(format!(
                        "replace operation does not apply: doc is missing key: {path:?}"
                    ))
                })?;
                json_patch_add(doc, &path, v)
                    .ok_or_else(|| failed(format!("replace operation does not apply: {path:?}")))?;
            }
            "test" => {
                let v = value
                    .ok_or_else(|| ApiError::bad_request("test operation requires a value"))?;
                let pointer: String = path
                    .iter()
                    .map(|p| format!("/{}", p.replace('~', "~0").replace('/', "~1")))
                    .collect();
                if doc.pointer(&pointer) != Some(&v) {
                    return Err(failed(format!(
                        "testing value {pointer} failed: test failed"
                    )));
                }
            }
            "move" | "copy" => {
                let from = pointer_parts(op.get("from").and_then(Value::as_str).unwrap_or(""))?;
                let v = if kind == "move" {
                    json_patch_remove(doc, &from)
                } else {
                    let pointer: String = from
                        .iter()
                        .map(|p| format!("/{}", p.replace('~', "~0").replace('/', "~1")))
                        .collect();
                    doc.pointer(&pointer).cloned()
                }
                .ok_or_else(|| {
                    failed(format!(
                        "{kind} operation does not apply: doc is missing from path: {from:?}"
                    ))
                })?;
                json_patch_add(doc, &path, v)
                    .ok_or_else(|| failed(format!("{kind} operation does not apply: {path:?}")))?;
            }
            other => return Err(ApiError::bad_request(format!("Unexpected kind: {other}"))),
        }
    }
    Ok(())
}

/// The patch formats the emulator understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    Merge,
    Json,
}

/// The result of a write: the object returned and the dropped unknown fields.
#[derive(Debug)]
pub struct Written {
    pub object: Value,
    pub created: bool,
    pub warnings: UnknownFields,
}

impl Store {
    pub fn namespace_exists(&self, namespace: &str) -> bool {
        self.objects
            .contains_key(&key(Kind::Namespace, "", namespace))
    }

    pub fn stored(&self, kind: Kind, namespace: &str, name: &str) -> Option<&StoredObject> {
        self.objects.get(&key(kind, namespace, name))
    }

    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Result<Value, ApiError> {
        self.stored(kind, namespace, name)
            .map(StoredObject::render)
            .ok_or_else(|| ApiError::not_found(kind, name))
    }

    fn matching<'a>(
        &'a self,
        kind: Kind,
        namespace: Option<&'a str>,
        labels: &'a LabelSelector,
        fields: &'a FieldSelector,
    ) -> impl Iterator<Item = (&'a (Kind, String, String), &'a StoredObject)> + 'a {
        self.objects.iter().filter(move |((k, ns, _), obj)| {
            if *k != kind || namespace.is_some_and(|want| want != ns) {
                return false;
            }
            let object_labels: BTreeMap<String, String> = obj
                .body
                .get("metadata")
                .and_then(|m| m.get("labels"))
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                        .collect()
                })
                .unwrap_or_default();
            labels.matches(&object_labels) && fields.matches(&obj.body)
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub fn list(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
        limit: Option<usize>,
        continue_token: Option<&str>,
    ) -> Result<Value, ApiError> {
        let start_after: Option<(String, String)> = match continue_token {
            None | Some("") => None,
            Some(token) => {
                let decoded = B64
                    .decode(token)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .and_then(|s| {
                        s.split_once('/')
                            .map(|(a, b)| (a.to_string(), b.to_string()))
                    })
                    .ok_or_else(|| ApiError::bad_request("continue key is not valid"))?;
                Some(decoded)
            }
        };
        let all: Vec<_> = self
            .matching(kind, namespace, labels, fields)
            .filter(|((_, ns, name), _)| match &start_after {
                None => true,
                Some((after_ns, after_name)) => (ns, name) > (after_ns, after_name),
            })
            .collect();
        let take = limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
        let mut items = Vec::new();
        let mut last = None;
        for ((_, ns, name), obj) in all.iter().take(take) {
            let mut item = obj.render();
            if let Some(m) = item.as_object_mut() {
                m.remove("kind");
                m.remove("apiVersion");
            }
            items.push(item);
            last = Some(format!("{ns}/{name}"));
        }
        let mut metadata = json!({"resourceVersion": self.resource_version.to_string()});
        if all.len() > take {
            metadata["continue"] = Value::from(B64.encode(last.unwrap_or_default()));
            metadata["remainingItemCount"] = Value::from(all.len() - take);
        }
        Ok(json!({
            "kind": kind.list_kind(),
            "apiVersion": "v1",
            "metadata": metadata,
            "items": items,
        }))
    }

    /// Stores `body` (or not, when unchanged or dry-run) and returns the rendered object.
    #[allow(clippy::too_many_arguments)]
    fn commit(
        &mut self,
        kind: Kind,
        namespace: &str,
        name: &str,
        old: Option<&StoredObject>,
        mut body: Value,
        managed: Vec<ManagedEntry>,
        dry_run: bool,
    ) -> Value {
        if let Some(old) = old
            && old.body == body
            && old.managed == managed
        {
            return old.render();
        }
        if dry_run {
            return StoredObject { body, managed }.render();
        }
        self.resource_version += 1;
        metadata_mut(&mut body).insert(
            "resourceVersion".into(),
            Value::from(self.resource_version.to_string()),
        );
        let obj = StoredObject { body, managed };
        let out = obj.render();
        self.objects.insert(key(kind, namespace, name), obj);
        out
    }

    fn require_namespace(&self, kind: Kind, namespace: &str) -> Result<(), ApiError> {
        if kind.namespaced() && !self.namespace_exists(namespace) {
            return Err(ApiError::not_found(Kind::Namespace, namespace));
        }
        Ok(())
    }

    fn validate_new_name(kind: Kind, name: &str) -> Result<(), ApiError> {
        let check = match kind {
            Kind::Namespace => validate::dns_label(name),
            Kind::Secret => validate::dns_subdomain(name),
        };
        check.map_err(|e| {
            ApiError::invalid(
                kind,
                name,
                vec![(
                    "metadata.name".into(),
                    format!("Invalid value: {name:?}: {e}"),
                )],
            )
        })
    }

    /// POST: create.
    pub fn create(
        &mut self,
        kind: Kind,
        namespace: &str,
        mut body: Value,
        opts: &WriteOptions,
    ) -> Result<Written, ApiError> {
        if !body.is_object() {
            return Err(ApiError::bad_request(
                "the body of the request must be a JSON object",
            ));
        }
        check_type_meta(kind, &body)?;
        let mut unknown = UnknownFields::new();
        decode(kind, &mut body, &mut unknown)?;
        strict_check(opts, &unknown)?;
        let mut name = meta_str(&body, "name").to_string();
        if name.is_empty() {
            let generate = meta_str(&body, "generateName").to_string();
            if generate.is_empty() {
                return Err(ApiError::invalid(
                    kind,
                    "",
                    vec![(
                        "metadata.name".into(),
                        "Required value: name or generateName is required".into(),
                    )],
                ));
            }
            name = format!("{generate}{}", random_suffix());
        }
        check_identity(kind, namespace, &name, &mut body)?;
        if !meta_str(&body, "resourceVersion").is_empty() {
            return Err(ApiError::new(
                500,
                "InternalError",
                "resourceVersion should not be set on objects to be created",
            ));
        }
        self.require_namespace(kind, namespace)?;
        Self::validate_new_name(kind, &name)?;
        if self.stored(kind, namespace, &name).is_some() {
            return Err(ApiError::already_exists(kind, &name));
        }
        finalize(kind, namespace, &name, &mut body, None)?;
        let meta = metadata_mut(&mut body);
        meta.insert("uid".into(), Value::from(new_uid()));
        meta.insert("creationTimestamp".into(), Value::from(now()));
        meta.remove("resourceVersion");
        let mut managed = Vec::new();
        managed::record_update(&mut managed, None, &body, &opts.manager, &now());
        let object = self.commit(kind, namespace, &name, None, body, managed, opts.dry_run);
        Ok(Written {
            object,
            created: true,
            warnings: unknown,
        })
    }

    fn existing(&self, kind: Kind, namespace: &str, name: &str) -> Result<StoredObject, ApiError> {
        self.stored(kind, namespace, name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(kind, name))
    }

    /// Checks the `resourceVersion`/`uid` preconditions a body carries.
    fn check_preconditions(
        kind: Kind,
        name: &str,
        old: &StoredObject,
        body: &Value,
    ) -> Result<(), ApiError> {
        let rv = meta_str(body, "resourceVersion");
        if !rv.is_empty() && rv != old.resource_version() {
            return Err(ApiError::stale(kind, name));
        }
        let uid = meta_str(body, "uid");
        if !uid.is_empty() && uid != old.uid() {
            return Err(ApiError::precondition(
                kind,
                name,
                format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    old.uid()
                ),
            ));
        }
        Ok(())
    }

    /// The common tail of PUT and PATCH: validate, record ownership, store.
    #[allow(clippy::too_many_arguments)]
    fn finish_update(
        &mut self,
        kind: Kind,
        namespace: &str,
        name: &str,
        old: &StoredObject,
        mut body: Value,
        opts: &WriteOptions,
        unknown: UnknownFields,
    ) -> Result<Written, ApiError> {
        finalize(kind, namespace, name, &mut body, Some(&old.body))?;
        copy_server_fields(&old.body, &mut body);
        if let Some(meta) = body.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("generateName");
            if let Some(g) = old.body.get("metadata").and_then(|m| m.get("generateName")) {
                meta.insert("generateName".into(), g.clone());
            }
        }
        let mut managed = old.managed.clone();
        managed::record_update(&mut managed, Some(&old.body), &body, &opts.manager, &now());
        let object = self.commit(
            kind,
            namespace,
            name,
            Some(old),
            body,
            managed,
            opts.dry_run,
        );
        Ok(Written {
            object,
            created: false,
            warnings: unknown,
        })
    }

    /// PUT: replace, with optimistic concurrency on `metadata.resourceVersion`.
    pub fn update(
        &mut self,
        kind: Kind,
        namespace: &str,
        name: &str,
        mut body: Value,
        opts: &WriteOptions,
    ) -> Result<Written, ApiError> {
        if !body.is_object() {
            return Err(ApiError::bad_request(
                "the body of the request must be a JSON object",
            ));
        }
        check_type_meta(kind, &body)?;
        let mut unknown = UnknownFields::new();
        decode(kind, &mut body, &mut unknown)?;
        strict_check(opts, &unknown)?;
        check_identity(kind, namespace, name, &mut body)?;
        let old = self.existing(kind, namespace, name)?;
        Self::check_preconditions(kind, name, &old, &body)?;
        self.finish_update(kind, namespace, name, &old, body, opts, unknown)
    }

    /// PATCH with a JSON merge patch (also used for strategic merge patches) or a JSON patch.
    pub fn patch(
        &mut self,
        kind: Kind,
        namespace: &str,
        name: &str,
        patch_kind: PatchKind,
        patch: &Value,
        opts: &WriteOptions,
    ) -> Result<Written, ApiError> {
        let old = self.existing(kind, namespace, name)?;
        let mut doc = old.render();
        match patch_kind {
            PatchKind::Merge => {
                if !patch.is_object() {
                    return Err(ApiError::bad_request("a merge patch must be a JSON object"));
                }
                merge_patch(&mut doc, patch);
            }
            PatchKind::Json => json_patch(&mut doc, patch)?,
        }
        if !doc.is_object() {
            return Err(ApiError::bad_request(
                "the patched object is not a JSON object",
            ));
        }
        check_type_meta(kind, &doc)?;
        let mut unknown = UnknownFields::new();
        decode(kind, &mut doc, &mut unknown)?;
        strict_check(opts, &unknown)?;
        check_identity(kind, namespace, name, &mut doc)?;
        Self::check_preconditions(kind, name, &old, &doc)?;
        self.finish_update(kind, namespace, name, &old, doc, opts, unknown)
    }

    /// PATCH with `application/apply-patch+yaml`: server-side apply.
    pub fn apply(
        &mut self,
        kind: Kind,
        namespace: &str,
        name: &str,
        mut config: Value,
        force: bool,
        opts: &WriteOptions,
    ) -> Result<Written, ApiError> {
        if !config.is_object() {
            return Err(ApiError::bad_request(
                "the apply configuration must be a JSON object",
            ));
        }
        check_type_meta(kind, &config)?;
        let mut unknown = UnknownFields::new();
        decode(kind, &mut config, &mut unknown)?;
        strict_check(opts, &unknown)?;
        check_identity(kind, namespace, name, &mut config)?;
        let existing = self.stored(kind, namespace, name).cloned();
        if let Some(old) = &existing {
            Self::check_preconditions(kind, name, old, &config)?;
        } else if !meta_str(&config, "resourceVersion").is_empty() {
            return Err(ApiError::not_found(kind, name));
        }
        if let Some(meta) = config.get_mut("metadata").and_then(Value::as_object_mut) {
            for f in [
                "uid",
                "resourceVersion",
                "creationTimestamp",
                "managedFields",
                "generation",
            ] {
                meta.remove(f);
            }
        }
        let now = now();
        match existing {
            None => {
                self.require_namespace(kind, namespace)?;
                Self::validate_new_name(kind, name)?;
                let (mut body, managed) = managed::apply(None, &config, &opts.manager, force, &now)
                    .expect("create cannot conflict");
                finalize(kind, namespace, name, &mut body, None)?;
                let meta = metadata_mut(&mut body);
                meta.insert("uid".into(), Value::from(new_uid()));
                meta.insert("creationTimestamp".into(), Value::from(now));
                let object = self.commit(kind, namespace, name, None, body, managed, opts.dry_run);
                Ok(Written {
                    object,
                    created: true,
                    warnings: unknown,
                })
            }
            Some(old) => {
                let (mut body, managed) = managed::apply(
                    Some((&old.body, &old.managed)),
                    &config,
                    &opts.manager,
                    force,
                    &now,
                )
                .map_err(|conflicts| ApiError::apply_conflicts(kind, name, &conflicts))?;
                finalize(kind, namespace, name, &mut body, Some(&old.body))?;
                copy_server_fields(&old.body, &mut body);
                let object = self.commit(
                    kind,
                    namespace,
                    name,
                    Some(&old),
                    body,
                    managed,
                    opts.dry_run,
                );
                Ok(Written {
                    object,
                    created: false,
                    warnings: unknown,
                })
            }
        }
    }

    /// DELETE, with optional `uid`/`resourceVersion` preconditions. Secrets answer with a
    /// `Success` status; namespaces (deleted at once, with their secrets) with the object in
    /// phase `Terminating`.
    pub fn delete(
        &mut self,
        kind: Kind,
        namespace: &str,
        name: &str,
        preconditions: &Value,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let old = self.existing(kind, namespace, name)?;
        if let Some(uid) = preconditions.get("uid").and_then(Value::as_str)
            && uid != old.uid()
        {
            return Err(ApiError::precondition(
                kind,
                name,
                format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    old.uid()
                ),
            ));
        }
        if let Some(rv) = preconditions.get("resourceVersion").and_then(Value::as_str)
            && rv != old.resource_version()
        {
            return Err(ApiError::precondition(
                kind,
                name,
                format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in meta: {}",
                    old.resource_version()
                ),
            ));
        }
        match kind {
            Kind::Secret => {
                if !dry_run {
                    self.objects.remove(&key(kind, namespace, name));
                    self.resource_version += 1;
                }
                Ok(success_status(kind, name, old.uid()))
            }
            Kind::Namespace => {
                let mut out = old.render();
                if !dry_run {
                    self.objects.retain(|(k, ns, n), _| {
                        !((*k == Kind::Namespace && n == name) || (k.namespaced() && ns == name))
                    });
                    self.resource_version += 1;
                    metadata_mut(&mut out).insert(
                        "resourceVersion".into(),
                        Value::from(self.resource_version.to_string()),
                    );
                }
                metadata_mut(&mut out).insert("deletionTimestamp".into(), Value::from(now()));
                out["status"] = json!({"phase": "Terminating"});
                Ok(out)
            }
        }
    }

    /// DELETE on a collection: deletes every match and returns them as a list.
    pub fn delete_collection(
        &mut self,
        kind: Kind,
        namespace: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let keys: Vec<(Kind, String, String)> = self
            .matching(kind, namespace, labels, fields)
            .map(|(k, _)| k.clone())
            .collect();
        let mut items = Vec::new();
        for (k, ns, name) in keys {
            let before = self.get(k, &ns, &name)?;
            let answer = self.delete(k, &ns, &name, &Value::Null, dry_run)?;
            items.push(if kind == Kind::Secret { before } else { answer });
        }
        Ok(json!({
            "kind": kind.list_kind(),
            "apiVersion": "v1",
            "metadata": {"resourceVersion": self.resource_version.to_string()},
            "items": items,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(manager: &str) -> WriteOptions {
        WriteOptions {
            manager: manager.into(),
            ..Default::default()
        }
    }

    fn store_with_ns(ns: &str) -> Store {
        let mut store = Store::default();
        store
            .create(
                Kind::Namespace,
                "",
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
                &opts("test"),
            )
            .unwrap();
        store
    }

    #[test]
    fn string_data_is_folded_into_data() {
        let mut store = store_with_ns("ns");
        let w = store
            .create(
                Kind::Secret,
                "ns",
                json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
                       "stringData": {"k": "v"}, "data": {"j": "dg=="}}),
                &opts("test"),
            )
            .unwrap();
        assert_eq!(w.object["data"], json!({"j": "dg==", "k": "dg=="}));
        assert!(w.object.get("stringData").is_none());
        assert_eq!(w.object["type"], "Opaque");
    }

    #[test]
    fn unchanged_update_keeps_resource_version() {
        let mut store = store_with_ns("ns");
        let w = store
            .create(Kind::Secret, "ns", json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "data": {"k": "dg=="}}), &opts("a"))
            .unwrap();
        let rv = w.object["metadata"]["resourceVersion"].clone();
        let again = store
            .update(Kind::Secret, "ns", "s", w.object.clone(), &opts("a"))
            .unwrap();
        assert_eq!(again.object["metadata"]["resourceVersion"], rv);
    }

    #[test]
    fn type_is_immutable() {
        let mut store = store_with_ns("ns");
        store
            .create(
                Kind::Secret,
                "ns",
                json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}}),
                &opts("a"),
            )
            .unwrap();
        let err = store
            .patch(
                Kind::Secret,
                "ns",
                "s",
                PatchKind::Merge,
                &json!({"type": "kubernetes.io/tls"}),
                &opts("a"),
            )
            .unwrap_err();
        assert_eq!(err.code, 422);
        assert!(
            err.message.contains("field is immutable"),
            "{}",
            err.message
        );
    }

    #[test]
    fn json_patch_ops() {
        let mut doc = json!({"a": {"b": 1}, "l": [1, 2]});
        json_patch(
            &mut doc,
            &json!([
                {"op": "add", "path": "/a/c", "value": 2},
                {"op": "replace", "path": "/a/b", "value": 3},
                {"op": "remove", "path": "/l/0"},
                {"op": "add", "path": "/l/-", "value": 9},
                {"op": "test", "path": "/a/c", "value": 2},
                {"op": "copy", "from": "/a/c", "path": "/d"},
            ]),
        )
        .unwrap();
        assert_eq!(doc, json!({"a": {"b": 3, "c": 2}, "l": [2, 9], "d": 2}));
        assert_eq!(
            json_patch(&mut doc, &json!([{"op": "test", "path": "/d", "value": 1}]))
                .unwrap_err()
                .code,
            422
        );
    }

    #[test]
    fn namespace_delete_cascades() {
        let mut store = store_with_ns("ns");
        store
            .create(
                Kind::Secret,
                "ns",
                json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}}),
                &opts("a"),
            )
            .unwrap();
        let out = store
            .delete(Kind::Namespace, "", "ns", &Value::Null, false)
            .unwrap();
        assert_eq!(out["status"]["phase"], "Terminating");
        assert!(store.stored(Kind::Secret, "ns", "s").is_none());
    }
}
