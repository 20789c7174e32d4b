//! Property tests for the validators and the `s3.conf` format: each validator is checked
//! against an independent statement of its rules, on arbitrary strings (which must never make
//! it panic) and on strings built to follow the rules.

use backup_provisioner::domain::{BucketName, CipherPass, Namespace, Region, RepositoryName};
use backup_provisioner::provision::secret::S3Conf;
use proptest::prelude::*;
use regex::Regex;
use secrecy::{ExposeSecret, SecretString};

/// Kubernetes' RFC 1123 label, as its own documentation states it.
fn dns1123_label(value: &str) -> bool {
    let re = Regex::new(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$").unwrap();
    value.len() <= 63 && re.is_match(value)
}

/// Namespaces the service never writes to, whatever the allow list says.
const SYSTEM_NAMESPACES: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];

/// The S3 general-purpose bucket naming rules, as AWS documents them.
fn s3_bucket_rules(value: &str) -> bool {
    let shape = Regex::new(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$").unwrap();
    let ip = Regex::new(r"^\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}$").unwrap();
    let reserved_prefix = ["xn--", "sthree-", "amzn-s3-demo-"];
    let reserved_suffix = ["-s3alias", "--ol-s3", ".mrap", "--x-s3"];
    shape.is_match(value)
        && !value.contains("..")
        && !ip.is_match(value)
        && !reserved_prefix.iter().any(|p| value.starts_with(p))
        && !reserved_suffix.iter().any(|s| value.ends_with(s))
}

fn any_pattern() -> Regex {
    Regex::new("^.*$").unwrap()
}

/// Strings from the characters the validators care about, plus some they reject.
fn name_like() -> impl Strategy<Value = String> {
    "[a-z0-9.-]{0,70}|[a-zA-Z0-9 _.:/@-]{0,20}|\\PC{0,10}"
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn a_repository_name_is_accepted_exactly_when_it_is_a_dns1123_label(value in name_like()) {
        prop_assert_eq!(RepositoryName::parse(&value).is_ok(), dns1123_label(&value));
    }

    #[test]
    fn a_namespace_is_a_dns1123_label_and_never_a_system_namespace(value in name_like()) {
        let accepted = Namespace::parse(&value, &[]).is_ok();
        if accepted {
            prop_assert!(dns1123_label(&value));
            prop_assert!(!SYSTEM_NAMESPACES.contains(&value.as_str()));
        } else {
            prop_assert!(!dns1123_label(&value) || SYSTEM_NAMESPACES.contains(&value.as_str()));
        }
    }

    #[test]
    fn an_allow_list_admits_only_its_members(value in "[a-z]{1,8}", allowed in proptest::collection::vec("[a-z]{1,8}", 1..4)) {
        let accepted = Namespace::parse(&value, &allowed).is_ok();
        prop_assert_eq!(accepted, allowed.contains(&value));
    }

    #[test]
    fn an_accepted_bucket_follows_the_s3_rules(value in name_like()) {
        if BucketName::parse(&value, &any_pattern()).is_ok() {
            prop_assert!(s3_bucket_rules(&value), "accepted {value:?}");
        }
    }

    #[test]
    fn a_bucket_following_the_s3_rules_is_accepted(value in "[a-z0-9]([a-z0-9-]{1,40}\\.?[a-z0-9-]{0,15})[a-z0-9]") {
        prop_assume!(s3_bucket_rules(&value));
        prop_assert!(BucketName::parse(&value, &any_pattern()).is_ok(), "refused {value:?}");
    }

    #[test]
    fn a_stored_bucket_reads_back_as_it_was_written(value in "holos-[a-z0-9]{1,30}-backups") {
        let bucket = BucketName::parse(&value, &any_pattern()).unwrap();
        let json = serde_json::to_string(&bucket).unwrap();
        let back: BucketName = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(back, bucket);
    }

    #[test]
    fn an_accepted_region_is_an_aws_partition_region_code(value in "[a-z]{2}(-[a-z]{2,10}){1,3}-[0-9]{1,2}|\\PC{0,16}") {
        if Region::parse(&value).is_ok() {
            let shape = Regex::new(r"^[a-z]{2}(-[a-z]+)+-\d+$").unwrap();
            prop_assert!(shape.is_match(&value), "accepted {value:?}");
            for other in ["cn-", "us-gov-", "us-iso", "eu-isoe-"] {
                prop_assert!(!value.starts_with(other), "accepted {value:?}");
            }
        }
    }

    #[test]
    fn s3_conf_renders_and_parses_back_to_the_same_values(
        cipher in "[A-Za-z0-9]{64}",
        key_id in "AKIA[A-Z0-9]{16}",
        secret in "[A-Za-z0-9/+]{40}",
    ) {
        let conf = S3Conf {
            cipher_pass: SecretString::from(cipher.clone()),
            access_key_id: key_id.clone(),
            secret_access_key: SecretString::from(secret.clone()),
        };
        let text = conf.render();
        let back = S3Conf::parse(text.expose_secret()).expect("parses what it rendered");
        prop_assert_eq!(back.cipher_pass.expose_secret(), cipher.as_str());
        prop_assert_eq!(back.access_key_id, key_id);
        prop_assert_eq!(back.secret_access_key.expose_secret(), secret.as_str());
    }

    #[test]
    fn parsing_any_text_as_s3_conf_never_panics(text in "\\PC{0,300}|(\\[global\\]\n)?([a-z0-9-]{1,20}=[^\n]{0,20}\n){0,8}") {
        let _ = S3Conf::parse(&text);
    }
}

#[test]
fn a_generated_cipher_pass_is_64_characters_of_the_runbook_alphabet() {
    for _ in 0..200 {
        let pass = CipherPass::generate();
        let text = pass.expose();
        assert_eq!(text.len(), 64);
        assert!(
            text.chars().all(|c| c.is_ascii_alphanumeric()),
            "{}",
            text.len()
        );
        assert!(CipherPass::parse(text).is_ok());
    }
}
