//! Label and field selectors (`labelSelector`, `fieldSelector` query parameters).

use std::collections::BTreeMap;

use serde_json::Value;

use crate::status::ApiError;
use crate::store::Kind;
use crate::validate;

#[derive(Debug, Clone, PartialEq)]
enum Requirement {
    Exists(String),
    DoesNotExist(String),
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    GreaterThan(String, i64),
    LessThan(String, i64),
}

/// A parsed label selector: every requirement must hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
}

fn split_top_level(text: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut current = String::new();
    for c in text.chars() {
        match c {
            '(' => {
                depth += 1;
                current.push(c);
            }
            ')' => {
                depth = depth.saturating_sub(1);
                current.push(c);
            }
            ',' if depth == 0 => parts.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    parts.push(current);
    parts
}

fn parse_error(term: &str, why: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("unable to parse requirement: {why} (in {term:?})"))
}

fn check_key(term: &str, key: &str) -> Result<(), ApiError> {
    validate::label_key(key)
        .map_err(|e| parse_error(term, format!("invalid label key {key:?}: {e}")))
}

fn check_value(term: &str, value: &str) -> Result<(), ApiError> {
    validate::label_value(value)
        .map_err(|e| parse_error(term, format!("invalid label value: {value:?}: {e}")))
}

fn parse_set(term: &str, rest: &str) -> Result<Vec<String>, ApiError> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| parse_error(term, "expected a parenthesised set of values"))?;
    let mut values = Vec::new();
    for v in inner.split(',') {
        let v = v.trim();
        check_value(term, v)?;
        values.push(v.to_string());
    }
    Ok(values)
}

impl LabelSelector {
    /// Parses `k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a,b)`, `k>1`, `k<1`,
    /// comma-joined.
    pub fn parse(text: &str) -> Result<Self, ApiError> {
        let mut requirements = Vec::new();
        if text.trim().is_empty() {
            return Ok(LabelSelector { requirements });
        }
        for raw in split_top_level(text) {
            let term = raw.trim();
            if term.is_empty() {
                return Err(parse_error(text, "found '', expected: identifier"));
            }
            if let Some(key) = term.strip_prefix('!') {
                let key = key.trim();
                check_key(term, key)?;
                requirements.push(Requirement::DoesNotExist(key.to_string()));
                continue;
            }
            let key_end = term
                .find(|c: char| c.is_whitespace() || "=!<>(".contains(c))
                .unwrap_or(term.len());
            let key = &term[..key_end];
            check_key(term, key)?;
            let rest = term[key_end..].trim_start();
            let requirement = if rest.is_empty() {
                Requirement::Exists(key.to_string())
            } else if let Some(v) = rest.strip_prefix("==").or_else(|| rest.strip_prefix('=')) {
                let v = v.trim();
                check_value(term, v)?;
                Requirement::Equals(key.to_string(), v.to_string())
            } else if let Some(v) = rest.strip_prefix("!=") {
                let v = v.trim();
                check_value(term, v)?;
                Requirement::NotEquals(key.to_string(), v.to_string())
            } else if let Some(v) = rest.strip_prefix('>') {
                let n = v.trim().parse::<i64>().map_err(|_| {
                    parse_error(
                        term,
                        "for 'Gt', 'Lt' operators, the value must be an integer",
                    )
                })?;
                Requirement::GreaterThan(key.to_string(), n)
            } else if let Some(v) = rest.strip_prefix('<') {
                let n = v.trim().parse::<i64>().map_err(|_| {
                    parse_error(
                        term,
                        "for 'Gt', 'Lt' operators, the value must be an integer",
                    )
                })?;
                Requirement::LessThan(key.to_string(), n)
            } else if let Some(v) = rest.strip_prefix("notin") {
                Requirement::NotIn(key.to_string(), parse_set(term, v)?)
            } else if let Some(v) = rest.strip_prefix("in") {
                Requirement::In(key.to_string(), parse_set(term, v)?)
            } else {
                return Err(parse_error(
                    term,
                    format!("found {rest:?}, expected an operator"),
                ));
            };
            requirements.push(requirement);
        }
        Ok(LabelSelector { requirements })
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|l| !vs.contains(l)),
            Requirement::GreaterThan(k, n) => labels
                .get(k)
                .and_then(|l| l.parse::<i64>().ok())
                .is_some_and(|l| l > *n),
            Requirement::LessThan(k, n) => labels
                .get(k)
                .and_then(|l| l.parse::<i64>().ok())
                .is_some_and(|l| l < *n),
        })
    }
}

/// A parsed field selector (`metadata.name`, `metadata.namespace`, and `type` for secrets or
/// `status.phase` for namespaces), with `=`, `==` and `!=`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldSelector {
    terms: Vec<(Vec<&'static str>, bool, String)>,
}

impl FieldSelector {
    pub fn parse(kind: Kind, text: &str) -> Result<Self, ApiError> {
        let mut terms = Vec::new();
        if text.trim().is_empty() {
            return Ok(FieldSelector { terms });
        }
        for raw in text.split(',') {
            let term = raw.trim();
            let (field, negate, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, true, v)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, false, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: '{text}'; can't understand '{term}'"
                )));
            };
            let path: Vec<&'static str> = match (kind, field.trim()) {
                (_, "metadata.name") => vec!["metadata", "name"],
                (_, "metadata.namespace") => vec!["metadata", "namespace"],
                (Kind::Secret, "type") => vec!["type"],
                (Kind::Namespace, "status.phase") => vec!["status", "phase"],
                (_, other) => {
                    return Err(ApiError::bad_request(format!(
                        "field label not supported: {other}"
                    )));
                }
            };
            terms.push((path, negate, value.trim().to_string()));
        }
        Ok(FieldSelector { terms })
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.terms.iter().all(|(path, negate, value)| {
            let mut cur = object;
            for p in path {
                cur = cur.get(*p).unwrap_or(&Value::Null);
            }
            let actual = cur.as_str().unwrap_or("");
            (actual == value) != *negate
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn label_selector_forms() {
        let l = labels(&[("app", "db"), ("tier", "backend"), ("n", "5")]);
        for (sel, want) in [
            ("app=db", true),
            ("app==db", true),
            ("app!=db", false),
            ("app=web", false),
            ("app", true),
            ("!app", false),
            ("missing!=x", true),
            ("!missing", true),
            ("app=db,tier=backend", true),
            ("app=db, tier=frontend", false),
            ("tier in (frontend, backend)", true),
            ("tier notin (frontend,backend)", false),
            ("missing notin (a)", true),
            ("n>4,n<6", true),
            ("n>5", false),
            ("", true),
        ] {
            assert_eq!(
                LabelSelector::parse(sel).unwrap().matches(&l),
                want,
                "{sel}"
            );
        }
    }

    #[test]
    fn label_selector_errors() {
        for sel in ["app=db,", "a b", "tier in a", "n>x", "bad key!=1", "k=v v"] {
            let err = LabelSelector::parse(sel).unwrap_err();
            assert_eq!(err.code, 400, "{sel}");
        }
    }

    #[test]
    fn field_selector() {
        let obj =
            serde_json::json!({"metadata": {"name": "a", "namespace": "ns"}, "type": "Opaque"});
        assert!(
            FieldSelector::parse(Kind::Secret, "metadata.name=a")
                .unwrap()
                .matches(&obj)
        );
        assert!(
            !FieldSelector::parse(Kind::Secret, "metadata.name!=a")
                .unwrap()
                .matches(&obj)
        );
        assert!(
            FieldSelector::parse(Kind::Secret, "type==Opaque,metadata.namespace=ns")
                .unwrap()
                .matches(&obj)
        );
        assert_eq!(
            FieldSelector::parse(Kind::Secret, "spec.x=1")
                .unwrap_err()
                .code,
            400
        );
    }
}
