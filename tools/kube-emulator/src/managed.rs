//! Field ownership (`metadata.managedFields`) and server-side apply.
//!
//! A field set is the set of leaf paths of an object (maps are descended, lists and scalars are
//! leaves). Each `(manager, operation)` pair owns a field set. Updates (create, PUT, merge patch)
//! give the updating manager the fields whose values changed and take them from everyone else;
//! an apply owns exactly the fields of its configuration, conflicts with other managers that own
//! a field it would change (unless forced), and removes fields it owned before and no longer
//! applies when nobody else owns them.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

pub type FieldPath = Vec<String>;
pub type FieldSet = BTreeSet<FieldPath>;

/// `(manager, field path)` pairs an apply conflicts on.
pub type Conflicts = Vec<(String, String)>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Apply,
    Update,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Operation::Apply => "Apply",
            Operation::Update => "Update",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ManagedEntry {
    pub manager: String,
    pub operation: Operation,
    pub time: String,
    pub fields: FieldSet,
}

/// Fields the server owns; they never appear in a field set.
const SERVER_FIELDS: &[&[&str]] = &[
    &["apiVersion"],
    &["kind"],
    &["status"],
    &["metadata", "name"],
    &["metadata", "namespace"],
    &["metadata", "uid"],
    &["metadata", "resourceVersion"],
    &["metadata", "generation"],
    &["metadata", "creationTimestamp"],
    &["metadata", "deletionTimestamp"],
    &["metadata", "deletionGracePeriodSeconds"],
    &["metadata", "managedFields"],
    &["metadata", "selfLink"],
];

/// Map-valued fields whose own node is owned (rendered as `".": {}` in `fieldsV1`).
const OWNED_MAPS: &[&[&str]] = &[
    &["data"],
    &["stringData"],
    &["binaryData"],
    &["metadata", "labels"],
    &["metadata", "annotations"],
];

fn is_server_field(path: &[String]) -> bool {
    SERVER_FIELDS
        .iter()
        .any(|f| f.len() == path.len() && f.iter().zip(path).all(|(a, b)| *a == b))
}

/// The leaf paths of an object, server-owned fields excluded.
pub fn leaves(value: &Value) -> FieldSet {
    fn walk(value: &Value, prefix: &mut Vec<String>, out: &mut FieldSet) {
        if is_server_field(prefix) {
            return;
        }
        match value {
            Value::Object(map) if !map.is_empty() => {
                for (k, v) in map {
                    prefix.push(k.clone());
                    walk(v, prefix, out);
                    prefix.pop();
                }
            }
            Value::Null => {}
            _ if prefix.is_empty() => {}
            _ => {
                out.insert(prefix.clone());
            }
        }
    }
    let mut out = FieldSet::new();
    walk(value, &mut Vec::new(), &mut out);
    out
}

pub fn get<'a>(value: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = value;
    for seg in path {
        cur = cur.as_object()?.get(seg)?;
    }
    Some(cur)
}

pub fn set(value: &mut Value, path: &[String], new: Value) {
    let mut cur = value;
    for seg in &path[..path.len() - 1] {
        if !cur.is_object() {
            *cur = Value::Object(Map::new());
        }
        cur = cur
            .as_object_mut()
            .expect("object")
            .entry(seg.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        if !cur.is_object() {
            *cur = Value::Object(Map::new());
        }
    }
    if let Some(map) = cur.as_object_mut() {
        map.insert(path[path.len() - 1].clone(), new);
    }
}

/// Removes a field and then any parent map it leaves empty (but never `metadata`).
pub fn remove(value: &mut Value, path: &[String]) {
    fn rec(value: &mut Value, path: &[String], depth: usize) {
        let Some(map) = value.as_object_mut() else {
            return;
        };
        if path.len() == 1 {
            map.remove(&path[0]);
            return;
        }
        if let Some(child) = map.get_mut(&path[0]) {
            rec(child, &path[1..], depth + 1);
            let empty = child.as_object().is_some_and(|m| m.is_empty());
            let is_metadata = depth == 0 && path[0] == "metadata";
            if empty && !is_metadata {
                map.remove(&path[0]);
            }
        }
    }
    if !path.is_empty() {
        rec(value, path, 0);
    }
}

fn is_prefix(a: &[String], b: &[String]) -> bool {
    a.len() <= b.len() && a.iter().zip(b).all(|(x, y)| x == y)
}

fn overlaps(a: &[String], b: &[String]) -> bool {
    is_prefix(a, b) || is_prefix(b, a)
}

/// `.data.s3.conf`, as the apiserver prints field paths.
pub fn path_string(path: &[String]) -> String {
    path.iter().map(|s| format!(".{s}")).collect()
}

/// Records an update (create, PUT, merge patch) by `manager` from `old` to `new`.
pub fn record_update(
    entries: &mut Vec<ManagedEntry>,
    old: Option<&Value>,
    new: &Value,
    manager: &str,
    now: &str,
) {
    let new_fields = leaves(new);
    let old_fields = old.map(leaves).unwrap_or_default();
    let changed: FieldSet = new_fields
        .iter()
        .filter(|p| old.and_then(|o| get(o, p)) != get(new, p))
        .cloned()
        .collect();
    let removed: FieldSet = old_fields.difference(&new_fields).cloned().collect();
    if changed.is_empty() && removed.is_empty() {
        return;
    }
    for entry in entries.iter_mut() {
        entry.fields.retain(|q| !removed.contains(q));
        let mine = entry.manager == manager && entry.operation == Operation::Update;
        if !mine {
            entry
                .fields
                .retain(|q| !changed.iter().any(|p| overlaps(p, q)));
        }
    }
    match entries
        .iter_mut()
        .find(|e| e.manager == manager && e.operation == Operation::Update)
    {
        Some(entry) => {
            entry.fields.extend(changed);
            entry.time = now.to_string();
        }
        None => entries.push(ManagedEntry {
            manager: manager.to_string(),
            operation: Operation::Update,
            time: now.to_string(),
            fields: changed,
        }),
    }
    entries.retain(|e| !e.fields.is_empty());
}

/// Server-side apply of `config` by `manager` onto `current` (None: create).
///
/// Returns the merged object and its new field ownership, or the conflicts
/// `(manager, field path)` when another manager owns a field this apply would change and
/// `force` is false.
pub fn apply(
    current: Option<(&Value, &[ManagedEntry])>,
    config: &Value,
    manager: &str,
    force: bool,
    now: &str,
) -> Result<(Value, Vec<ManagedEntry>), Conflicts> {
    let applied = leaves(config);
    let Some((current, current_entries)) = current else {
        let mut entries = Vec::new();
        if !applied.is_empty() {
            entries.push(ManagedEntry {
                manager: manager.to_string(),
                operation: Operation::Apply,
                time: now.to_string(),
                fields: applied,
            });
        }
        return Ok((config.clone(), entries));
    };

    let is_self = |e: &ManagedEntry| e.manager == manager && e.operation == Operation::Apply;
    let mut conflicts: Vec<(String, String)> = Vec::new();
    let mut overridden = FieldSet::new();
    for path in &applied {
        if get(current, path) == get(config, path) {
            continue;
        }
        overridden.insert(path.clone());
        for entry in current_entries {
            if entry.manager == manager {
                continue;
            }
            if entry.fields.iter().any(|q| overlaps(q, path)) {
                let conflict = (entry.manager.clone(), path_string(path));
                if !conflicts.contains(&conflict) {
                    conflicts.push(conflict);
                }
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflicts);
    }

    let mut body = current.clone();
    let previous: FieldSet = current_entries
        .iter()
        .find(|e| is_self(e))
        .map(|e| e.fields.clone())
        .unwrap_or_default();
    for path in previous.difference(&applied) {
        let owned_elsewhere = current_entries
            .iter()
            .any(|e| !is_self(e) && e.fields.contains(path));
        let still_applied = applied.iter().any(|a| overlaps(a, path));
        if !owned_elsewhere && !still_applied {
            remove(&mut body, path);
        }
    }
    for path in &applied {
        if let Some(v) = get(config, path) {
            set(&mut body, path, v.clone());
        }
    }

    let mut entries: Vec<ManagedEntry> = current_entries.to_vec();
    for entry in entries.iter_mut().filter(|e| !is_self(e)) {
        entry
            .fields
            .retain(|q| !overridden.iter().any(|p| overlaps(p, q)));
    }
    let unchanged = body == *current && previous == applied;
    match entries.iter_mut().find(|e| is_self(e)) {
        Some(entry) => {
            if !unchanged {
                entry.time = now.to_string();
            }
            entry.fields = applied;
        }
        None => entries.push(ManagedEntry {
            manager: manager.to_string(),
            operation: Operation::Apply,
            time: now.to_string(),
            fields: applied,
        }),
    }
    entries.retain(|e| !e.fields.is_empty());
    Ok((body, entries))
}

fn fields_v1(set: &FieldSet) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut node = &mut root;
        for (i, seg) in path.iter().enumerate() {
            let child = node
                .entry(format!("f:{seg}"))
                .or_insert_with(|| Value::Object(Map::new()));
            let child = child.as_object_mut().expect("fieldsV1 node");
            let prefix = &path[..=i];
            let owned_map = OWNED_MAPS
                .iter()
                .any(|m| m.len() == prefix.len() && m.iter().zip(prefix).all(|(a, b)| *a == b));
            if i + 1 < path.len() && owned_map {
                child.insert(".".into(), json!({}));
            }
            node = child;
        }
    }
    Value::Object(root)
}

/// The `metadata.managedFields` list.
pub fn render(entries: &[ManagedEntry]) -> Value {
    Value::Array(
        entries
            .iter()
            .map(|e| {
                json!({
                    "manager": e.manager,
                    "operation": e.operation.as_str(),
                    "apiVersion": "v1",
                    "time": e.time,
                    "fieldsType": "FieldsV1",
                    "fieldsV1": fields_v1(&e.fields),
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> FieldPath {
        s.split('|').map(String::from).collect()
    }

    #[test]
    fn leaves_skip_server_fields() {
        let v = json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "a", "labels": {"x": "1"}, "resourceVersion": "3"},
            "data": {"k": "dg=="}, "type": "Opaque"});
        let got: Vec<FieldPath> = leaves(&v).into_iter().collect();
        assert_eq!(got, vec![p("data|k"), p("metadata|labels|x"), p("type")]);
    }

    #[test]
    fn apply_conflict_and_force() {
        let cur = json!({"data": {"k": "YQ=="}});
        let entries = vec![ManagedEntry {
            manager: "other".into(),
            operation: Operation::Update,
            time: "t0".into(),
            fields: [p("data|k")].into_iter().collect(),
        }];
        let cfg = json!({"data": {"k": "Yg=="}});
        let err = apply(Some((&cur, &entries)), &cfg, "me", false, "t1").unwrap_err();
        assert_eq!(err, vec![("other".to_string(), ".data.k".to_string())]);
        let (body, entries) = apply(Some((&cur, &entries)), &cfg, "me", true, "t1").unwrap();
        assert_eq!(body, cfg);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].manager, "me");
        // Same value: shared ownership, no conflict.
        let same = json!({"data": {"k": "YQ=="}});
        let shared = vec![ManagedEntry {
            manager: "other".into(),
            operation: Operation::Apply,
            time: "t0".into(),
            fields: [p("data|k")].into_iter().collect(),
        }];
        let (_, entries) = apply(Some((&cur, &shared)), &same, "me", false, "t1").unwrap();
        assert_eq!(entries.len(), 2);
    }

    #[test]
    fn apply_removes_fields_no_longer_applied() {
        let cfg1 = json!({"data": {"a": "YQ==", "b": "Yg=="}});
        let (body, entries) = apply(None, &cfg1, "me", false, "t0").unwrap();
        let cfg2 = json!({"data": {"a": "YQ=="}});
        let (body, entries) = apply(Some((&body, &entries)), &cfg2, "me", false, "t1").unwrap();
        assert_eq!(body, cfg2);
        assert_eq!(entries[0].fields, leaves(&cfg2));
    }

    #[test]
    fn fields_v1_shape() {
        let set: FieldSet = [p("data|s3.conf"), p("metadata|labels|a"), p("type")]
            .into_iter()
            .collect();
        assert_eq!(
            fields_v1(&set),
            json!({"f:data": {".": {}, "f:s3.conf": {}},
                   "f:metadata": {"f:labels": {".": {}, "f:a": {}}},
                   "f:type": {}})
        );
    }

    #[test]
    fn update_moves_ownership() {
        let old = json!({"data": {"a": "YQ=="}});
        let mut entries = Vec::new();
        record_update(&mut entries, None, &old, "creator", "t0");
        let new = json!({"data": {"a": "Yg==", "b": "Yg=="}});
        record_update(&mut entries, Some(&old), &new, "editor", "t1");
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].manager, "editor");
        assert_eq!(entries[0].fields, leaves(&new));
    }
}
