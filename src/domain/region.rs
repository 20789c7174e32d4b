//! AWS region codes.

use std::fmt;
use std::sync::LazyLock;

use regex::Regex;

use super::ValidationError;

/// The region callers use when none is given.
pub const DEFAULT_REGION: &str = "us-east-1";

const MAX_LEN: usize = 32;

/// `us-east-1`, `us-gov-west-1`, `us-isob-east-1`, `cn-north-1`, ...
/// ASCII classes only: the regex crate's `\d` would accept any Unicode digit.
static REGION_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-[0-9]{1,2}$").expect("valid region regex")
});

/// A syntactically valid AWS region code. Whether the region exists or is
/// enabled for the account is left to AWS.
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
#[schema(value_type = String, example = "us-east-1")]
pub struct Region(String);

impl Region {
    pub fn parse(value: &str) -> Result<Self, ValidationError> {
        if value.len() > MAX_LEN || !REGION_RE.is_match(value) {
            return Err(ValidationError::new(
                "region",
                "region must be an AWS region code like us-east-1, eu-central-2 or us-gov-west-1",
            ));
        }
        Ok(Self(value.to_owned()))
    }

    /// [`DEFAULT_REGION`] as a value.
    pub fn default_region() -> Self {
        Self(DEFAULT_REGION.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl TryFrom<String> for Region {
    type Error = ValidationError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<Region> for String {
    fn from(value: Region) -> Self {
        value.0
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Region {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_regions() {
        for r in [
            DEFAULT_REGION,
            "us-east-1",
            "us-west-2",
            "eu-central-2",
            "us-gov-west-1",
            "us-iso-east-1",
            "us-isob-east-1",
            "ap-southeast-4",
            "cn-north-1",
            "cn-northwest-1",
            "il-central-1",
            "mx-central-1",
        ] {
            assert_eq!(Region::parse(r).unwrap().as_str(), r);
        }
        assert_eq!(Region::default_region().as_str(), "us-east-1");
    }

    #[test]
    fn bad_regions() {
        for r in [
            "",
            "us-east",
            "US-EAST-1",
            "us_east_1",
            "useast1",
            "us-east-1a",
            "us-east-123",
            "u-east-1",
            "usa-east-1",
            "us-foo-west-1",
            " us-east-1",
            "us-east-1\n",
            "us-east-\u{0661}",
        ] {
            let e = Region::parse(r).unwrap_err();
            assert_eq!(e.field, "region");
            assert!(e.message.contains("AWS region code"), "{r:?}");
        }
    }

    #[test]
    fn serde_validates() {
        let r: Region = serde_json::from_str("\"eu-west-1\"").unwrap();
        assert_eq!(r.to_string(), "eu-west-1");
        assert!(serde_json::from_str::<Region>("\"moon-1\"").is_err());
    }
}
