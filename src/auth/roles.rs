//! Roles, the authenticated principal, and reading roles out of a claim.

use std::fmt;
use std::str::FromStr;

use serde_json::{Map, Value};

/// A role, ordered by power: `Viewer < Operator < Admin`. A higher role implies every lower one.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads.
    Viewer,
    /// Creates, retries and cancels.
    Operator,
    /// Everything.
    Admin,
}

impl Role {
    /// Every role, lowest first.
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    /// The role's name as it appears in tokens.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of [`Role::from_str`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role (expected viewer, operator or admin)")]
pub struct UnknownRole;

impl FromStr for Role {
    type Err = UnknownRole;

    /// Exact, lowercase names only: `viewer`, `operator`, `admin`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            _ => Err(UnknownRole),
        }
    }
}

/// Who made the request, as proven by a verified token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The token's `sub`.
    pub subject: String,
    /// Known roles from the roles claim, sorted and de-duplicated (unknown names dropped).
    pub roles: Vec<Role>,
}

impl Principal {
    /// Whether the principal holds `needed` or a higher role (admin ⊇ operator ⊇ viewer).
    pub fn has(&self, needed: Role) -> bool {
        self.roles.iter().any(|held| *held >= needed)
    }

    /// The highest role held, if any.
    pub fn highest_role(&self) -> Option<Role> {
        self.roles.iter().copied().max()
    }
}

/// Finds the roles claim in `claims`: first by its exact name (claim names such as
/// `urn:zitadel:iam:org:project:roles` or `https://example.com/roles` are used as they are), then,
/// if the name contains dots and no such top-level claim exists, as a path of nested objects
/// (`realm_access.roles`).
pub(crate) fn find_claim<'a>(claims: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    if let Some(value) = claims.get(name) {
        return Some(value);
    }
    if !name.contains('.') {
        return None;
    }
    let mut parts = name.split('.');
    let mut current = claims.get(parts.next()?)?;
    for part in parts {
        current = current.as_object()?.get(part)?;
    }
    Some(current)
}

/// Reads roles from a claim value: an array of strings (`["operator"]`) or an object whose keys
/// are role names (ZITADEL: `{"operator": {"<org id>": "<domain>"}}`). Unknown names and
/// non-string array items are ignored; any other shape, a string too (`"viewer admin"`: split on
/// spaces it would grant what an IdP meant as one name), gives no roles. The result is sorted and
/// de-duplicated.
pub(crate) fn roles_from_claim(value: Option<&Value>) -> Vec<Role> {
    let mut roles: Vec<Role> = match value {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .filter_map(|name| name.parse().ok())
            .collect(),
        Some(Value::Object(map)) => map.keys().filter_map(|name| name.parse().ok()).collect(),
        _ => Vec::new(),
    };
    roles.sort_unstable();
    roles.dedup();
    roles
}
