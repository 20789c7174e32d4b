//! S3 bucket names, and the IAM names derived from them.

use std::fmt;

use regex::Regex;

use super::{RepositoryName, ValidationError};

/// The default pattern every bucket name must match, on top of the S3 rules.
pub const DEFAULT_BUCKET_PATTERN: &str = "^holos-[a-z0-9-]+-backups$";

/// IAM `UserName` limit.
pub const IAM_USER_NAME_MAX: usize = 64;
/// IAM `GroupName` limit.
pub const IAM_GROUP_NAME_MAX: usize = 128;
/// IAM `PolicyName` limit.
pub const IAM_POLICY_NAME_MAX: usize = 128;

const FIELD: &str = "bucket";
const MIN_LEN: usize = 3;
const MAX_LEN: usize = 63;
const RESERVED_PREFIXES: [&str; 3] = ["xn--", "sthree-", "amzn-s3-demo-"];
const RESERVED_SUFFIXES: [&str; 4] = ["-s3alias", "--ol-s3", ".mrap", "--x-s3"];

/// A general purpose S3 bucket name that satisfies the S3 naming rules, the
/// configured naming pattern, and whose derived IAM names (policy, group and
/// user are all named after the bucket, as in the runbook) satisfy IAM limits.
///
/// Deserializing checks the S3 and IAM rules only: the naming pattern is a rule for new
/// requests, checked by [`BucketName::parse`], not for values stored earlier (job payloads).
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
#[schema(value_type = String, example = "holos-zitadel-backups")]
pub struct BucketName(String);

impl TryFrom<String> for BucketName {
    type Error = ValidationError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        check_s3_rules(&value)?;
        check_iam_names(&value)?;
        Ok(Self(value))
    }
}

impl From<BucketName> for String {
    fn from(value: BucketName) -> Self {
        value.0
    }
}

impl BucketName {
    /// Parses `value` against the S3 bucket naming rules, then `pattern`
    /// (which should be anchored with `^...$`), then the IAM name limits.
    pub fn parse(value: &str, pattern: &Regex) -> Result<Self, ValidationError> {
        check_s3_rules(value)?;
        if !pattern.is_match(value) {
            return Err(err(format!(
                "bucket name must match the configured pattern {}",
                pattern.as_str()
            )));
        }
        check_iam_names(value)?;
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }

    /// Name of the IAM user holding the access key (the bucket name).
    pub fn iam_user_name(&self) -> &str {
        &self.0
    }

    /// Name of the IAM group the user belongs to (the bucket name).
    pub fn iam_group_name(&self) -> &str {
        &self.0
    }

    /// Name of the IAM policy granting access to the bucket (the bucket name).
    pub fn iam_policy_name(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BucketName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for BucketName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// The runbook's default bucket name for a repository: `holos-{name}-backups`.
pub fn default_bucket_for(name: &RepositoryName) -> String {
    format!("holos-{}-backups", name.as_str())
}

fn err(message: String) -> ValidationError {
    ValidationError::new(FIELD, message)
}

/// The IAM user, group and policy are all named after the bucket.
fn check_iam_names(value: &str) -> Result<(), ValidationError> {
    check_iam_name("user", IAM_USER_NAME_MAX, value)?;
    check_iam_name("group", IAM_GROUP_NAME_MAX, value)?;
    check_iam_name("policy", IAM_POLICY_NAME_MAX, value)
}

fn check_s3_rules(value: &str) -> Result<(), ValidationError> {
    let len = value.chars().count();
    if !(MIN_LEN..=MAX_LEN).contains(&len) {
        return Err(err(format!(
            "bucket name must be {MIN_LEN} to {MAX_LEN} characters long (got {len})"
        )));
    }
    if let Some((pos, c)) = value
        .chars()
        .enumerate()
        .find(|(_, c)| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '.' || *c == '-'))
    {
        return Err(err(format!(
            "bucket name may contain only lowercase letters, digits, '.' and '-' (found {c:?} at position {pos})"
        )));
    }
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !alnum(value.chars().next()) {
        return Err(err(
            "bucket name must start with a lowercase letter or digit".into(),
        ));
    }
    if !alnum(value.chars().last()) {
        return Err(err(
            "bucket name must end with a lowercase letter or digit".into()
        ));
    }
    if value.contains("..") {
        return Err(err(
            "bucket name must not contain two adjacent periods ('..')".into(),
        ));
    }
    if looks_like_ipv4(value) {
        return Err(err(
            "bucket name must not be formatted as an IP address (like 192.168.5.4)".into(),
        ));
    }
    if let Some(prefix) = RESERVED_PREFIXES.iter().find(|p| value.starts_with(*p)) {
        return Err(err(format!("bucket name must not start with '{prefix}'")));
    }
    if let Some(suffix) = RESERVED_SUFFIXES.iter().find(|s| value.ends_with(*s)) {
        return Err(err(format!("bucket name must not end with '{suffix}'")));
    }
    Ok(())
}

/// Four dot-separated groups of one to three ASCII digits.
fn looks_like_ipv4(value: &str) -> bool {
    let groups: Vec<&str> = value.split('.').collect();
    groups.len() == 4
        && groups
            .iter()
            .all(|g| (1..=3).contains(&g.len()) && g.bytes().all(|b| b.is_ascii_digit()))
}

/// IAM names allow `[\w+=,.@-]` (ASCII word characters) up to `max` characters.
fn check_iam_name(kind: &str, max: usize, name: &str) -> Result<(), ValidationError> {
    let len = name.chars().count();
    if len == 0 || len > max {
        return Err(err(format!(
            "derived IAM {kind} name must be 1 to {max} characters long (got {len})"
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "_+=,.@-".contains(*c)))
    {
        return Err(err(format!(
            "derived IAM {kind} name may contain only letters, digits and '_+=,.@-' (found {c:?})"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_pattern() -> Regex {
        Regex::new(DEFAULT_BUCKET_PATTERN).unwrap()
    }

    fn any_pattern() -> Regex {
        Regex::new(".*").unwrap()
    }

    #[test]
    fn runbook_buckets_pass_default_pattern() {
        for name in [
            "holos-zitadel-backups",
            "holos-server-backups",
            "holos-a-backups",
        ] {
            let b = BucketName::parse(name, &default_pattern()).unwrap();
            assert_eq!(b.as_str(), name);
            assert_eq!(b.to_string(), name);
            assert_eq!(b.iam_user_name(), name);
            assert_eq!(b.iam_group_name(), name);
            assert_eq!(b.iam_policy_name(), name);
        }
    }

    #[test]
    fn good_buckets_pass_s3_rules() {
        let long = "a".repeat(63);
        for name in [
            "abc",
            "a.b-c",
            "my.bucket.name",
            "1bucket",
            "bucket1",
            "192.168.5",
            "192.168.5.4.5",
            "1234.1.1.1",
            "a-xn--b",
            "my-s3alias-bucket",
            long.as_str(),
        ] {
            assert!(
                BucketName::parse(name, &any_pattern()).is_ok(),
                "{name} should pass"
            );
        }
    }

    #[test]
    fn bad_buckets_fail_with_precise_messages() {
        let too_long = "a".repeat(64);
        let cases: &[(&str, &str)] = &[
            ("ab", "bucket name must be 3 to 63 characters long (got 2)"),
            ("", "bucket name must be 3 to 63 characters long (got 0)"),
            (
                too_long.as_str(),
                "bucket name must be 3 to 63 characters long (got 64)",
            ),
            (
                "My-bucket",
                "may contain only lowercase letters, digits, '.' and '-' (found 'M' at position 0)",
            ),
            ("my_bucket", "(found '_' at position 2)"),
            ("my bucket", "(found ' ' at position 2)"),
            ("bücket", "(found 'ü' at position 1)"),
            ("-bucket", "must start with a lowercase letter or digit"),
            (".bucket", "must start with a lowercase letter or digit"),
            ("bucket-", "must end with a lowercase letter or digit"),
            ("bucket.", "must end with a lowercase letter or digit"),
            ("my..bucket", "must not contain two adjacent periods ('..')"),
            ("192.168.5.4", "must not be formatted as an IP address"),
            ("1.2.3.4", "must not be formatted as an IP address"),
            ("xn--bucket", "must not start with 'xn--'"),
            ("sthree-bucket", "must not start with 'sthree-'"),
            ("amzn-s3-demo-bucket", "must not start with 'amzn-s3-demo-'"),
            ("bucket-s3alias", "must not end with '-s3alias'"),
            ("bucket--ol-s3", "must not end with '--ol-s3'"),
            ("bucket.mrap", "must not end with '.mrap'"),
            ("bucket--x-s3", "must not end with '--x-s3'"),
        ];
        for (name, expected) in cases {
            let e = BucketName::parse(name, &any_pattern()).unwrap_err();
            assert_eq!(e.field, "bucket");
            assert!(
                e.message.contains(expected),
                "{name:?}: expected {expected:?} in {:?}",
                e.message
            );
        }
    }

    #[test]
    fn pattern_is_enforced_after_s3_rules() {
        let e = BucketName::parse("other-bucket", &default_pattern()).unwrap_err();
        assert_eq!(
            e.message,
            "bucket name must match the configured pattern ^holos-[a-z0-9-]+-backups$"
        );
        assert_eq!(
            e.to_string(),
            "bucket: bucket name must match the configured pattern ^holos-[a-z0-9-]+-backups$"
        );
        // Dots are valid for S3 but not for the default pattern.
        assert!(BucketName::parse("holos-a.b-backups", &default_pattern()).is_err());
        // S3 rules come first even when the pattern would allow the name.
        let e = BucketName::parse("holos-x-backups--x-s3", &any_pattern()).unwrap_err();
        assert!(e.message.contains("--x-s3"));
    }

    #[test]
    fn iam_name_check_is_explicit() {
        assert!(check_iam_name("user", IAM_USER_NAME_MAX, &"a".repeat(64)).is_ok());
        let e = check_iam_name("user", IAM_USER_NAME_MAX, &"a".repeat(65)).unwrap_err();
        assert_eq!(
            e.message,
            "derived IAM user name must be 1 to 64 characters long (got 65)"
        );
        assert!(check_iam_name("group", IAM_GROUP_NAME_MAX, &"a".repeat(128)).is_ok());
        assert!(check_iam_name("policy", IAM_POLICY_NAME_MAX, &"a".repeat(129)).is_err());
        assert!(check_iam_name("user", IAM_USER_NAME_MAX, "a_b+c=d,e.f@g-h").is_ok());
        let e = check_iam_name("user", IAM_USER_NAME_MAX, "a/b").unwrap_err();
        assert!(e.message.contains("found '/'"));
        // A 63-character bucket, the S3 maximum, always fits the IAM limits.
        let max = format!("holos-{}-backups", "a".repeat(63 - 14));
        assert_eq!(max.len(), 63);
        assert!(BucketName::parse(&max, &default_pattern()).is_ok());
    }

    #[test]
    fn default_bucket_for_repository() {
        let name = RepositoryName::parse("zitadel").unwrap();
        assert_eq!(default_bucket_for(&name), "holos-zitadel-backups");
        let name = RepositoryName::parse("holos-server").unwrap();
        let bucket = default_bucket_for(&name);
        assert_eq!(bucket, "holos-holos-server-backups");
        assert!(BucketName::parse(&bucket, &default_pattern()).is_ok());
    }

    #[test]
    fn serializes_as_string() {
        let b = BucketName::parse("holos-zitadel-backups", &default_pattern()).unwrap();
        assert_eq!(
            serde_json::to_string(&b).unwrap(),
            "\"holos-zitadel-backups\""
        );
    }
}
