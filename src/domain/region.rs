//! AWS region codes of the `aws` partition.

use std::fmt;
use std::sync::LazyLock;

use regex::Regex;

use super::ValidationError;

/// The region callers use when none is given.
pub const DEFAULT_REGION: &str = "us-east-1";

const MAX_LEN: usize = 32;

/// `us-east-1`, `us-gov-west-1`, `us-isob-east-1`, `cn-north-1`, ... (any partition; see
/// [`other_partition`]). ASCII classes only: the regex crate's `\d` would accept any Unicode
/// digit.
static REGION_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-[0-9]{1,2}$").expect("valid region regex")
});

/// A syntactically valid AWS region code of the `aws` partition. Whether the region exists or
/// is enabled for the account is left to AWS.
///
/// Regions of other partitions (China, GovCloud, the isolated ones) are refused: every ARN and
/// endpoint the service builds says `arn:aws:` and `amazonaws.com`, which are wrong there.
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
                "region must be an AWS region code like us-east-1, eu-central-2 or ap-southeast-4",
            ));
        }
        if let Some(partition) = other_partition(value) {
            return Err(ValidationError::new(
                "region",
                format!(
                    "region {value} is in the AWS partition {partition}; only the aws \
                     partition is supported"
                ),
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

/// The partition of a well-formed region code outside the `aws` partition: `cn-*` is
/// `aws-cn`; a qualifier between the geography and the direction (`us-gov-west-1`,
/// `us-isob-east-1`) names the partition (`aws-us-gov`, `aws-iso-b`).
fn other_partition(region: &str) -> Option<String> {
    let parts: Vec<&str> = region.split('-').collect();
    let qualifier = (parts.len() == 4).then(|| parts[1]);
    match (parts[0], qualifier) {
        ("cn", _) => Some("aws-cn".to_owned()),
        (geography, Some("gov")) => Some(format!("aws-{geography}-gov")),
        (_, Some("iso")) => Some("aws-iso".to_owned()),
        (_, Some(iso)) => Some(format!("aws-iso-{}", iso.trim_start_matches("iso"))),
        (_, None) => None,
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
            "ap-southeast-4",
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
    fn regions_of_other_partitions_are_refused_naming_the_partition() {
        for (region, partition) in [
            ("cn-north-1", "aws-cn"),
            ("cn-northwest-1", "aws-cn"),
            ("us-gov-west-1", "aws-us-gov"),
            ("us-gov-east-1", "aws-us-gov"),
            ("us-iso-east-1", "aws-iso"),
            ("us-isob-east-1", "aws-iso-b"),
            ("eu-isoe-west-1", "aws-iso-e"),
            ("us-isof-south-1", "aws-iso-f"),
        ] {
            let e = Region::parse(region).unwrap_err();
            assert_eq!(e.field, "region");
            assert_eq!(
                e.message,
                format!(
                    "region {region} is in the AWS partition {partition}; only the aws \
                     partition is supported"
                )
            );
        }
    }

    #[test]
    fn a_payload_with_a_region_of_another_partition_does_not_deserialize() {
        let err = serde_json::from_str::<Region>("\"cn-north-1\"").unwrap_err();
        assert!(err.to_string().contains("aws-cn"), "{err}");
    }

    #[test]
    fn serde_validates() {
        let r: Region = serde_json::from_str("\"eu-west-1\"").unwrap();
        assert_eq!(r.to_string(), "eu-west-1");
        assert!(serde_json::from_str::<Region>("\"moon-1\"").is_err());
    }
}
