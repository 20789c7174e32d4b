//! Kubernetes labels for the generated Secret.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use regex::Regex;

use super::ValidationError;

/// Most labels accepted on one repository.
pub const MAX_LABELS: usize = 32;
/// Maximum length of a label value and of a key's name part.
pub const LABEL_VALUE_MAX: usize = 63;
const PREFIX_MAX: usize = 253;
const FIELD: &str = "labels";

/// Qualified name part of a key, and a non-empty value.
static NAME_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$").expect("valid label name regex")
});
/// RFC 1123 subdomain, for the optional key prefix.
static PREFIX_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
        .expect("valid label prefix regex")
});

/// A label set valid for Kubernetes metadata, with at most [`MAX_LABELS`] entries.
#[derive(
    Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(
    try_from = "BTreeMap<String, String>",
    into = "BTreeMap<String, String>"
)]
#[schema(value_type = BTreeMap<String, String>)]
pub struct Labels(BTreeMap<String, String>);

impl Labels {
    pub fn parse(labels: BTreeMap<String, String>) -> Result<Self, ValidationError> {
        if labels.len() > MAX_LABELS {
            return Err(ValidationError::new(
                FIELD,
                format!(
                    "at most {MAX_LABELS} labels are allowed (got {})",
                    labels.len()
                ),
            ));
        }
        for (key, value) in &labels {
            check_key(key)?;
            check_value(key, value)?;
        }
        Ok(Self(labels))
    }

    pub fn empty() -> Self {
        Self::default()
    }

    pub fn as_map(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    pub fn into_map(self) -> BTreeMap<String, String> {
        self.0
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl TryFrom<BTreeMap<String, String>> for Labels {
    type Error = ValidationError;

    fn try_from(value: BTreeMap<String, String>) -> Result<Self, Self::Error> {
        Self::parse(value)
    }
}

impl From<Labels> for BTreeMap<String, String> {
    fn from(value: Labels) -> Self {
        value.0
    }
}

fn err(message: String) -> ValidationError {
    ValidationError::new(FIELD, message)
}

fn check_key(key: &str) -> Result<(), ValidationError> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        if prefix.is_empty() {
            return Err(err(format!("label key {key:?} has an empty prefix")));
        }
        if prefix.chars().count() > PREFIX_MAX {
            return Err(err(format!(
                "label key {key:?}: prefix must be at most {PREFIX_MAX} characters long (got {})",
                prefix.chars().count()
            )));
        }
        if !PREFIX_RE.is_match(prefix) {
            return Err(err(format!(
                "label key {key:?}: prefix must be a DNS subdomain (lowercase letters, digits, '-' and '.', each part starting and ending with a letter or digit)"
            )));
        }
    }
    if name.is_empty() {
        return Err(err(format!("label key {key:?} has an empty name")));
    }
    if name.chars().count() > LABEL_VALUE_MAX {
        return Err(err(format!(
            "label key {key:?}: name must be at most {LABEL_VALUE_MAX} characters long (got {})",
            name.chars().count()
        )));
    }
    if !NAME_RE.is_match(name) {
        return Err(err(format!(
            "label key {key:?}: name must consist of letters, digits, '-', '_' and '.', and start and end with a letter or digit"
        )));
    }
    Ok(())
}

fn check_value(key: &str, value: &str) -> Result<(), ValidationError> {
    if value.chars().count() > LABEL_VALUE_MAX {
        return Err(err(format!(
            "value of label {key:?} must be at most {LABEL_VALUE_MAX} characters long (got {})",
            value.chars().count()
        )));
    }
    if !value.is_empty() && !NAME_RE.is_match(value) {
        return Err(err(format!(
            "value of label {key:?} must be empty or consist of letters, digits, '-', '_' and '.', and start and end with a letter or digit"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn good_labels() {
        let long = "a".repeat(63);
        let long_prefix = format!("{}.example.com", "a".repeat(63));
        let good = map(&[
            ("app", "zitadel"),
            ("app.kubernetes.io/managed-by", "backup-provisioner"),
            ("example.com/Team_Name.x", "A-b_c.d"),
            ("empty", ""),
            (long.as_str(), long.as_str()),
            (&format!("{long_prefix}/k"), "v"),
            ("x", "1"),
        ]);
        let labels = Labels::parse(good.clone()).unwrap();
        assert_eq!(labels.as_map(), &good);
        assert_eq!(labels.get("app"), Some("zitadel"));
        assert_eq!(labels.len(), good.len());
        assert!(Labels::parse(BTreeMap::new()).unwrap().is_empty());
        let full: BTreeMap<String, String> = (0..MAX_LABELS)
            .map(|i| (format!("k{i}"), "v".into()))
            .collect();
        assert!(Labels::parse(full).is_ok());
    }

    #[test]
    fn bad_labels() {
        let long = "a".repeat(64);
        let long_prefix = format!("{}/k", "a".repeat(254));
        let cases: Vec<(BTreeMap<String, String>, &str)> = vec![
            (map(&[("", "v")]), "has an empty name"),
            (map(&[("example.com/", "v")]), "has an empty name"),
            (map(&[("/name", "v")]), "has an empty prefix"),
            (
                map(&[(long.as_str(), "v")]),
                "name must be at most 63 characters long (got 64)",
            ),
            (
                map(&[(long_prefix.as_str(), "v")]),
                "prefix must be at most 253 characters long (got 254)",
            ),
            (
                map(&[("Example.com/k", "v")]),
                "prefix must be a DNS subdomain",
            ),
            (map(&[("a..b/k", "v")]), "prefix must be a DNS subdomain"),
            (map(&[("a/b/c", "v")]), "name must consist of"),
            (map(&[("-app", "v")]), "name must consist of"),
            (map(&[("app_", "v")]), "name must consist of"),
            (map(&[("my key", "v")]), "name must consist of"),
            (
                map(&[("k", long.as_str())]),
                "value of label \"k\" must be at most 63 characters long (got 64)",
            ),
            (
                map(&[("k", "-v")]),
                "value of label \"k\" must be empty or consist of",
            ),
            (map(&[("k", "a b")]), "must be empty or consist of"),
            (map(&[("k", "é")]), "must be empty or consist of"),
        ];
        for (labels, expected) in cases {
            let e = Labels::parse(labels.clone()).unwrap_err();
            assert_eq!(e.field, "labels");
            assert!(e.message.contains(expected), "{labels:?}: {:?}", e.message);
        }
        let too_many: BTreeMap<String, String> = (0..=MAX_LABELS)
            .map(|i| (format!("k{i}"), "v".into()))
            .collect();
        assert_eq!(
            Labels::parse(too_many).unwrap_err().message,
            "at most 32 labels are allowed (got 33)"
        );
    }

    #[test]
    fn serde_validates() {
        let labels: Labels = serde_json::from_str(r#"{"app":"zitadel"}"#).unwrap();
        assert_eq!(
            serde_json::to_string(&labels).unwrap(),
            r#"{"app":"zitadel"}"#
        );
        assert!(serde_json::from_str::<Labels>(r#"{"bad key":"v"}"#).is_err());
    }
}
