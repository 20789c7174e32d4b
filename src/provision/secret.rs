//! The runbook's last step: the Kubernetes Secret holding pgBackRest's `s3.conf`.
//!
//! The Secret is named after the bucket, lives in the repository's namespace, is `Opaque`, and
//! has exactly one data key, `s3.conf`:
//!
//! ```text
//! [global]
//! repo2-cipher-pass=<cipher pass>
//! repo2-s3-key=<access key id>
//! repo2-s3-key-secret=<secret access key>
//! repo3-cipher-pass=<same>
//! repo3-s3-key=<same>
//! repo3-s3-key-secret=<same>
//! ```
//!
//! It is written with server-side apply (field manager [`FIELD_MANAGER`]) and labelled
//! `app.kubernetes.io/managed-by: backup-provisioner`; a Secret without that label is someone
//! else's and is only taken over when asked to (`adopt_existing_secret`).

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{ObjectMeta, Patch, PatchParams};
use secrecy::zeroize::Zeroize as _;
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;

use crate::cloud::kube::{SERVICE, classify};
use crate::cloud::{CloudError, Outcome, StepReport};

/// The server-side apply field manager of every write.
pub const FIELD_MANAGER: &str = "backup-provisioner";
/// The one data key of the Secret.
pub const S3_CONF_KEY: &str = "s3.conf";
/// Marks a Secret as ours; its value is [`FIELD_MANAGER`].
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Repeats the Secret's name (Holos convention).
pub const SECRET_NAME_LABEL: &str = "holos.run/secret.name";
/// The Secret type.
pub const SECRET_TYPE: &str = "Opaque";

/// The credentials pgBackRest reads from `s3.conf` (the same values for repo2 and repo3).
#[derive(Clone)]
pub struct S3Conf {
    pub cipher_pass: SecretString,
    pub access_key_id: String,
    pub secret_access_key: SecretString,
}

impl fmt::Debug for S3Conf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Conf")
            .field("cipher_pass", &"[REDACTED]")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"[REDACTED]")
            .finish()
    }
}

/// `s3.conf` text that lacks a required setting (values are never included).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("s3.conf has no value for {}", missing.join(", "))]
pub struct S3ConfError {
    pub missing: Vec<&'static str>,
}

const CIPHER_PASS: &str = "repo2-cipher-pass";
const S3_KEY: &str = "repo2-s3-key";
const S3_KEY_SECRET: &str = "repo2-s3-key-secret";

impl S3Conf {
    /// The exact `s3.conf` text (with a trailing newline).
    pub fn render(&self) -> SecretString {
        let cipher = self.cipher_pass.expose_secret();
        let key = &self.access_key_id;
        let secret = self.secret_access_key.expose_secret();
        let mut text = String::with_capacity(256);
        text.push_str("[global]\n");
        for repo in ["repo2", "repo3"] {
            text.push_str(&format!("{repo}-cipher-pass={cipher}\n"));
            text.push_str(&format!("{repo}-s3-key={key}\n"));
            text.push_str(&format!("{repo}-s3-key-secret={secret}\n"));
        }
        SecretString::from(text)
    }

    /// Reads the repo2 settings of an `s3.conf` (spacing around `=` and blank lines, comments
    /// and section headers are tolerated). Empty values count as missing.
    pub fn parse(text: &str) -> Result<S3Conf, S3ConfError> {
        let (cipher_pass, access_key_id, secret_access_key) = read_fields(text);
        match (cipher_pass, access_key_id, secret_access_key) {
            (Some(cipher_pass), Some(access_key_id), Some(secret_access_key)) => Ok(S3Conf {
                cipher_pass,
                access_key_id,
                secret_access_key,
            }),
            (c, k, s) => Err(S3ConfError {
                missing: [
                    (c.is_none(), CIPHER_PASS),
                    (k.is_none(), S3_KEY),
                    (s.is_none(), S3_KEY_SECRET),
                ]
                .into_iter()
                .filter_map(|(m, name)| m.then_some(name))
                .collect(),
            }),
        }
    }
}

/// The repo2 cipher pass, key id and key secret of an `s3.conf`, each if present and non-empty.
fn read_fields(text: &str) -> (Option<SecretString>, Option<String>, Option<SecretString>) {
    let (mut cipher_pass, mut access_key_id, mut secret_access_key) = (None, None, None);
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with(['#', ';', '[']) {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim();
        if value.is_empty() {
            continue;
        }
        match key.trim() {
            CIPHER_PASS => cipher_pass = Some(SecretString::from(value.to_owned())),
            S3_KEY => access_key_id = Some(value.to_owned()),
            S3_KEY_SECRET => secret_access_key = Some(SecretString::from(value.to_owned())),
            _ => {}
        }
    }
    (cipher_pass, access_key_id, secret_access_key)
}

/// The Secret as found in the cluster.
#[derive(Debug, Clone)]
pub struct ExistingSecret {
    /// Labelled `app.kubernetes.io/managed-by: backup-provisioner`.
    pub managed_by_us: bool,
    /// Its `s3.conf`, when present and complete.
    pub conf: Option<S3Conf>,
    /// The cipher pass in its `s3.conf`, even when the rest is incomplete: backups are
    /// encrypted with it, so it is reused whenever a copy exists.
    pub cipher_pass: Option<SecretString>,
    pub resource_version: Option<String>,
}

fn s3_conf_bytes(secret: &Secret) -> Option<&[u8]> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(S3_CONF_KEY))
        .map(|b| b.0.as_slice())
}

fn is_managed_by_us(secret: &Secret) -> bool {
    secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .is_some_and(|v| v == FIELD_MANAGER)
}

fn existing_from(secret: &Secret) -> ExistingSecret {
    let text = s3_conf_bytes(secret).and_then(|b| std::str::from_utf8(b).ok());
    ExistingSecret {
        managed_by_us: is_managed_by_us(secret),
        conf: text.and_then(|text| S3Conf::parse(text).ok()),
        cipher_pass: text.and_then(|text| read_fields(text).0),
        resource_version: secret.metadata.resource_version.clone(),
    }
}

fn secrets(client: &kube::Client, namespace: &str) -> Api<Secret> {
    Api::namespaced(client.clone(), namespace)
}

/// Reads the Secret `namespace/name`; `None` when it does not exist.
pub async fn read(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<Option<ExistingSecret>, CloudError> {
    let secret = secrets(client, namespace)
        .get_opt(name)
        .await
        .map_err(|e| classify("get secret", e))?;
    Ok(secret.as_ref().map(existing_from))
}

fn desired_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (SECRET_NAME_LABEL.to_owned(), name.to_owned()),
        (MANAGED_BY_LABEL.to_owned(), FIELD_MANAGER.to_owned()),
    ])
}

fn data_keys(secret: &Secret) -> Vec<String> {
    secret
        .data
        .as_ref()
        .map(|d| d.keys().cloned().collect())
        .unwrap_or_default()
}

fn secret_type(secret: &Secret) -> &str {
    secret.type_.as_deref().unwrap_or(SECRET_TYPE)
}

/// Labels, type, keys and `s3.conf` text all as we would write them.
fn is_up_to_date(secret: &Secret, name: &str, text: &str) -> bool {
    let labels = secret.metadata.labels.clone().unwrap_or_default();
    desired_labels(name)
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
        && secret_type(secret) == SECRET_TYPE
        && data_keys(secret) == [S3_CONF_KEY]
        && s3_conf_bytes(secret) == Some(text.as_bytes())
}

/// The audit detail: identifiers and key names only, never values.
fn detail(
    namespace: &str,
    name: &str,
    secret: &Secret,
    extra: serde_json::Value,
) -> serde_json::Value {
    let mut detail = json!({
        "namespace": namespace,
        "name": name,
        "resource_version": secret.metadata.resource_version,
        "keys": data_keys(secret),
    });
    if let (Some(d), Some(e)) = (detail.as_object_mut(), extra.as_object()) {
        d.extend(e.clone());
    }
    detail
}

fn permanent(message: String) -> CloudError {
    CloudError::permanent(SERVICE, "apply secret", message)
}

/// Makes the Secret `namespace/name` hold exactly `conf`.
///
/// Reads first: a Secret we do not manage is refused unless `adopt`; one we manage that
/// already matches is [`Outcome::AlreadyPresent`] with no write at all. Otherwise it is written
/// with server-side apply (forced, field manager [`FIELD_MANAGER`]), other data keys are
/// removed, and the Secret is read back to check that `s3.conf` holds what was written.
pub async fn apply(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    conf: &S3Conf,
    adopt: bool,
) -> Result<StepReport, CloudError> {
    let api = secrets(client, namespace);
    let current = api
        .get_opt(name)
        .await
        .map_err(|e| classify("get secret", e))?;
    let text = conf.render();
    let text = text.expose_secret();

    let mut adopted = false;
    if let Some(existing) = &current {
        let ours = is_managed_by_us(existing);
        if !ours && !adopt {
            return Err(permanent(format!(
                "Secret {namespace}/{name} exists and is not managed by backup-provisioner (no \
                 label {MANAGED_BY_LABEL}={FIELD_MANAGER}); it was left untouched. Remove it, or \
                 set adopt_existing_secret: true to take it over"
            )));
        }
        if ours && is_up_to_date(existing, name, text) {
            return Ok(StepReport::new(
                Outcome::AlreadyPresent,
                detail(namespace, name, existing, json!({})),
            ));
        }
        if secret_type(existing) != SECRET_TYPE {
            return Err(permanent(format!(
                "Secret {namespace}/{name} has type {:?}, but pgBackRest's s3.conf needs an \
                 {SECRET_TYPE} Secret and a Secret's type cannot be changed; delete it, then retry",
                secret_type(existing)
            )));
        }
        if existing.immutable == Some(true) {
            return Err(permanent(format!(
                "Secret {namespace}/{name} is immutable and does not hold the expected s3.conf; \
                 delete it, then retry"
            )));
        }
        adopted = !ours;
    }

    let mut desired = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(desired_labels(name)),
            ..Default::default()
        },
        type_: Some(SECRET_TYPE.to_owned()),
        data: Some(BTreeMap::from([(
            S3_CONF_KEY.to_owned(),
            ByteString(text.as_bytes().to_vec()),
        )])),
        ..Default::default()
    };
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let written = api.patch(name, &params, &Patch::Apply(&desired)).await;
    if let Some(data) = desired.data.as_mut() {
        data.values_mut().for_each(|v| v.0.zeroize());
    }
    let written = written.map_err(|e| classify("apply secret", e))?;

    // Server-side apply cannot drop keys other managers own (e.g. from an adopted Secret).
    let extra: Vec<String> = data_keys(&written)
        .into_iter()
        .filter(|k| k != S3_CONF_KEY)
        .collect();
    if !extra.is_empty() {
        let nulls: serde_json::Map<String, serde_json::Value> = extra
            .iter()
            .map(|k| (k.clone(), serde_json::Value::Null))
            .collect();
        let patch = json!({
            "metadata": {"resourceVersion": written.metadata.resource_version},
            "data": nulls,
        });
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..Default::default()
        };
        api.patch(name, &params, &Patch::Merge(&patch))
            .await
            .map_err(|e| classify("remove extra secret keys", e))?;
    }

    let back = api
        .get_opt(name)
        .await
        .map_err(|e| classify("read back secret", e))?
        .ok_or_else(|| {
            CloudError::retryable(
                SERVICE,
                "read back secret",
                format!("Secret {namespace}/{name} disappeared right after it was written"),
            )
        })?;
    if !is_up_to_date(&back, name, text) {
        return Err(CloudError::retryable(
            SERVICE,
            "read back secret",
            format!(
                "Secret {namespace}/{name} does not hold what was written (changed concurrently?)"
            ),
        ));
    }
    let outcome = if current.is_some() {
        Outcome::Updated
    } else {
        Outcome::Created
    };
    Ok(StepReport::new(
        outcome,
        detail(
            namespace,
            name,
            &back,
            json!({ "adopted": adopted, "removed_keys": extra }),
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf() -> S3Conf {
        S3Conf {
            cipher_pass: SecretString::from("c1pherPASS".to_owned()),
            access_key_id: "AKIAEXAMPLE".into(),
            secret_access_key: SecretString::from("s3cr3t/KEY+x".to_owned()),
        }
    }

    #[test]
    fn render_is_exact() {
        assert_eq!(
            conf().render().expose_secret(),
            "[global]\n\
             repo2-cipher-pass=c1pherPASS\n\
             repo2-s3-key=AKIAEXAMPLE\n\
             repo2-s3-key-secret=s3cr3t/KEY+x\n\
             repo3-cipher-pass=c1pherPASS\n\
             repo3-s3-key=AKIAEXAMPLE\n\
             repo3-s3-key-secret=s3cr3t/KEY+x\n"
        );
    }

    #[test]
    fn parse_round_trips_and_tolerates_spacing() {
        let parsed = S3Conf::parse(conf().render().expose_secret()).unwrap();
        assert_eq!(parsed.cipher_pass.expose_secret(), "c1pherPASS");
        assert_eq!(parsed.access_key_id, "AKIAEXAMPLE");
        assert_eq!(parsed.secret_access_key.expose_secret(), "s3cr3t/KEY+x");
        assert_eq!(
            parsed.render().expose_secret(),
            conf().render().expose_secret()
        );

        let loose = "\r\n# comment\n[global]\r\n  repo2-cipher-pass = p \r\nrepo2-s3-key=  AKIA\n\
                     repo2-s3-key-secret =s=with=equals\n";
        let parsed = S3Conf::parse(loose).unwrap();
        assert_eq!(parsed.cipher_pass.expose_secret(), "p");
        assert_eq!(parsed.access_key_id, "AKIA");
        assert_eq!(parsed.secret_access_key.expose_secret(), "s=with=equals");
    }

    #[test]
    fn parse_reports_missing_settings_without_values() {
        let template = "[global]\nrepo2-cipher-pass=\nrepo2-s3-key=AKIA\nrepo2-s3-key-secret=\n";
        let err = S3Conf::parse(template).unwrap_err();
        assert_eq!(err.missing, ["repo2-cipher-pass", "repo2-s3-key-secret"]);
        assert_eq!(
            err.to_string(),
            "s3.conf has no value for repo2-cipher-pass, repo2-s3-key-secret"
        );
        assert!(S3Conf::parse("").is_err());
    }

    #[test]
    fn debug_is_redacted() {
        let (pass, key, secret) =
            read_fields("[global]\nrepo2-cipher-pass=c1pherPASS\nrepo2-s3-key=\n");
        assert_eq!(
            pass.map(|p| p.expose_secret().to_owned()).as_deref(),
            Some("c1pherPASS")
        );
        assert!(
            key.is_none() && secret.is_none(),
            "an incomplete conf still yields its cipher pass"
        );
        let shown = format!("{:?}", conf());
        assert!(!shown.contains("c1pherPASS"), "{shown}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("AKIAEXAMPLE"));
        let existing = ExistingSecret {
            managed_by_us: true,
            conf: Some(conf()),
            cipher_pass: Some(conf().cipher_pass),
            resource_version: Some("1".into()),
        };
        let shown = format!("{existing:?}");
        assert!(
            !shown.contains("c1pherPASS") && !shown.contains("s3cr3t"),
            "{shown}"
        );
    }
}
