//! Kubernetes namespaces and repository names (both RFC 1123 labels).

use std::fmt;

use super::{ValidationError, check_dns1123_label};

/// Maximum length of an RFC 1123 label.
pub const DNS1123_LABEL_MAX: usize = 63;

/// The cluster's own namespaces: a Secret is never written there, allow list or not.
pub const RESERVED_NAMESPACES: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];

/// A Kubernetes namespace the provisioner is allowed to write Secrets into.
///
/// Deserializing checks the syntax and refuses [`RESERVED_NAMESPACES`], but not the allowed
/// list: that is a rule for new requests, checked by [`Namespace::parse`], not for values stored
/// earlier (job payloads).
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
#[serde(try_from = "String", into = "String")]
#[schema(value_type = String, example = "zitadel")]
pub struct Namespace(String);

impl Namespace {
    /// Parses an RFC 1123 label that is not one of [`RESERVED_NAMESPACES`]; when `allowed` is
    /// non-empty the namespace must also be one of its entries. An empty `allowed` list allows
    /// any other syntactically valid namespace (production sets the list: README).
    pub fn parse(value: &str, allowed: &[String]) -> Result<Self, ValidationError> {
        check_dns1123_label("namespace", "namespace", value)?;
        if RESERVED_NAMESPACES.contains(&value) {
            return Err(ValidationError::new(
                "namespace",
                format!(
                    "namespace '{value}' belongs to the cluster itself and is never written to"
                ),
            ));
        }
        if !allowed.is_empty() && !allowed.iter().any(|a| a == value) {
            return Err(ValidationError::new(
                "namespace",
                format!(
                    "namespace '{value}' is not in the allowed list: {}",
                    allowed.join(", ")
                ),
            ));
        }
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl TryFrom<String> for Namespace {
    type Error = ValidationError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value, &[])
    }
}

impl From<Namespace> for String {
    fn from(value: Namespace) -> Self {
        value.0
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Namespace {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// The name of a backup repository (e.g. `zitadel`, `holos-server`), an RFC
/// 1123 label so it can name Kubernetes objects and appear in bucket names.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
#[serde(try_from = "String", into = "String")]
#[schema(value_type = String, example = "zitadel")]
pub struct RepositoryName(String);

impl RepositoryName {
    pub fn parse(value: &str) -> Result<Self, ValidationError> {
        check_dns1123_label("name", "repository name", value)?;
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl TryFrom<String> for RepositoryName {
    type Error = ValidationError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<RepositoryName> for String {
    fn from(value: RepositoryName) -> Self {
        value.0
    }
}

impl fmt::Display for RepositoryName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for RepositoryName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn good_namespaces() {
        let long = "a".repeat(63);
        for ns in [
            "zitadel",
            "holos",
            "a",
            "0",
            "kube",
            "kube-systems",
            "a1-b2",
            long.as_str(),
        ] {
            let parsed = Namespace::parse(ns, &[]).unwrap();
            assert_eq!(parsed.as_str(), ns);
            assert_eq!(parsed.to_string(), ns);
        }
    }

    #[test]
    fn bad_namespaces() {
        let long = "a".repeat(64);
        let cases: &[(&str, &str)] = &[
            ("", "namespace must not be empty"),
            (
                long.as_str(),
                "namespace must be at most 63 characters long (got 64)",
            ),
            ("Zitadel", "(found 'Z' at position 0)"),
            ("my_ns", "(found '_' at position 2)"),
            ("my.ns", "(found '.' at position 2)"),
            ("-ns", "must start with a lowercase letter or digit"),
            ("ns-", "must end with a lowercase letter or digit"),
        ];
        for (ns, expected) in cases {
            let e = Namespace::parse(ns, &[]).unwrap_err();
            assert_eq!(e.field, "namespace");
            assert!(e.message.contains(expected), "{ns:?}: {:?}", e.message);
        }
    }

    #[test]
    fn the_clusters_own_namespaces_are_always_refused() {
        for ns in RESERVED_NAMESPACES {
            // With no allow list, and even when an allow list names them.
            for allowed in [vec![], list(&[ns, "zitadel"])] {
                let e = Namespace::parse(ns, &allowed).unwrap_err();
                assert_eq!(e.field, "namespace");
                assert_eq!(
                    e.message,
                    format!(
                        "namespace '{ns}' belongs to the cluster itself and is never written to"
                    )
                );
            }
            // Stored values (job payloads) are refused too.
            let e = serde_json::from_str::<Namespace>(&format!("\"{ns}\"")).unwrap_err();
            assert!(e.to_string().contains("belongs to the cluster"), "{e}");
        }
        assert_eq!(
            RESERVED_NAMESPACES,
            ["kube-system", "kube-public", "kube-node-lease"]
        );
    }

    #[test]
    fn namespace_allow_list() {
        let allowed = list(&["zitadel", "holos"]);
        assert!(Namespace::parse("zitadel", &allowed).is_ok());
        assert!(Namespace::parse("holos", &allowed).is_ok());
        let e = Namespace::parse("x", &allowed).unwrap_err();
        assert_eq!(
            e.message,
            "namespace 'x' is not in the allowed list: zitadel, holos"
        );
        // Syntax is checked before the allow list.
        let e = Namespace::parse("X", &list(&["X"])).unwrap_err();
        assert!(e.message.contains("may contain only"));
    }

    #[test]
    fn repository_names() {
        for name in ["zitadel", "holos-server", "a"] {
            assert_eq!(RepositoryName::parse(name).unwrap().as_str(), name);
        }
        for name in ["", "Holos", "holos_server", "-x", "x-", &"a".repeat(64)] {
            let e = RepositoryName::parse(name).unwrap_err();
            assert_eq!(e.field, "name");
            assert!(e.message.starts_with("repository name "), "{}", e.message);
        }
    }

    #[test]
    fn repository_name_serde_validates() {
        let n: RepositoryName = serde_json::from_str("\"holos-server\"").unwrap();
        assert_eq!(n.as_str(), "holos-server");
        assert_eq!(serde_json::to_string(&n).unwrap(), "\"holos-server\"");
        let e = serde_json::from_str::<RepositoryName>("\"Bad_Name\"").unwrap_err();
        assert!(e.to_string().contains("repository name may contain only"));
    }
}
