//! The Secret an adoption reads its credentials from: the runbook's `s3.conf`, or another layout
//! someone made by hand (e.g. PGO's documented `pgo-s3-creds`, whose `s3.conf` holds `repo1-`
//! settings).
//!
//! What is accepted, in every data key of the Secret (values are taken byte for byte, only
//! surrounding whitespace and line ends are dropped):
//! - INI-style lines `name=value` (blank lines, `#`/`;` comments and `[section]` headers are
//!   skipped), as in pgBackRest's `s3.conf`;
//! - a data key that is itself a setting's name, holding only its value.
//!
//! Setting names, case-insensitive: pgBackRest's `repoN-s3-key`, `repoN-s3-key-secret`,
//! `repoN-cipher-pass` (any `N`), their environment forms `PGBACKREST_REPON_S3_KEY`, ...,
//! and, for any repository, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `cipher-pass` /
//! `cipher_pass`. The repository used is repo2 when the Secret has any repo2 setting (the
//! runbook's), else the lowest-numbered one; a setting it lacks is taken from the
//! repository-less names. Nothing is ever generated: a Secret without an access key id, its
//! secret or a cipher pass is an error that names what is missing (never a value).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

use crate::cloud::CloudError;
use crate::cloud::kube::classify;
use crate::provision::secret::{
    ExistingSecret, FIELD_MANAGER, MANAGED_BY_LABEL, S3_CONF_KEY, S3Conf, SECRET_TYPE,
};

/// One of the three credentials of `s3.conf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Field {
    S3Key,
    S3KeySecret,
    CipherPass,
}

impl Field {
    const ALL: [Field; 3] = [Field::S3Key, Field::S3KeySecret, Field::CipherPass];

    /// pgBackRest's option suffix (`repoN-<suffix>`).
    pub fn suffix(self) -> &'static str {
        match self {
            Field::S3Key => "s3-key",
            Field::S3KeySecret => "s3-key-secret",
            Field::CipherPass => "cipher-pass",
        }
    }
}

/// How the Secret lays its credentials out. Serialized into the adoption's report (no values).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Layout {
    /// Exactly the runbook's: one data key `s3.conf` whose repo2 and repo3 settings are
    /// complete and equal, and nothing else.
    pub runbook: bool,
    /// The repository whose settings were used (`None`: repository-less names only).
    pub repo: Option<u32>,
    /// The Secret's data keys.
    pub data_keys: Vec<String>,
    /// Every setting name found, as `repoN-<suffix>` or the repository-less name.
    pub settings: Vec<String>,
    /// Repositories whose settings differ from the one used (the runbook wants them equal).
    pub differing_repos: Vec<u32>,
    /// The Secret's type (`Opaque` for pgBackRest's `s3.conf`).
    #[serde(rename = "type")]
    pub secret_type: String,
    /// Labelled `app.kubernetes.io/managed-by: backup-provisioner`.
    pub managed_by_us: bool,
    /// What rewriting the Secret into the runbook's `s3.conf` (the values used, as repo2 and
    /// repo3 of one data key) would drop, by name (never a value): settings holding another
    /// value, other settings and lines, data keys with anything else in them. `repair` refuses
    /// the rewrite while this is not empty ([`Layout::refuse_lossy_rewrite`]).
    pub lost_by_rewrite: Vec<String>,
}

impl Layout {
    /// A short description for messages and reports.
    pub fn describe(&self) -> String {
        if self.runbook {
            return "the runbook's s3.conf (repo2 and repo3 equal)".to_owned();
        }
        let from = match self.repo {
            Some(n) => format!("repo{n} settings"),
            None => "repository-less settings".to_owned(),
        };
        format!("{from} in data keys {}", self.data_keys.join(", "))
    }

    /// Why the Secret `secret` must not be rewritten: the rewrite would lose what
    /// [`Layout::lost_by_rewrite`] names (another repository's key or cipher pass, credentials
    /// for something else), and a Secret is the only copy of its values.
    pub fn refuse_lossy_rewrite(&self, secret: &str) -> Result<(), String> {
        if self.lost_by_rewrite.is_empty() {
            return Ok(());
        }
        let used = match self.repo {
            Some(n) => format!("repo{n}'s"),
            None => "the repository-less".to_owned(),
        };
        Err(format!(
            "Secret {secret} is not rewritten: \"repair\" rewrites it into the runbook's s3.conf, \
             which keeps only {used} access key, its secret and the cipher pass (as repo2 and repo3 \
             of one data key s3.conf), and would erase {}. Nothing was changed. Move those settings \
             to another Secret (or make them equal to the ones kept), then adopt with \"repair\" \
             again or reconcile; without \"repair\" the Secret is adopted as it is",
            self.lost_by_rewrite.join(", ")
        ))
    }
}

/// The credentials found and how they were laid out. `Debug` shows no value.
pub struct Found {
    pub conf: S3Conf,
    pub layout: Layout,
    pub resource_version: Option<String>,
}

impl std::fmt::Debug for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Found")
            .field("conf", &self.conf)
            .field("layout", &self.layout)
            .field("resource_version", &self.resource_version)
            .finish()
    }
}

impl Found {
    /// The Secret as the Secret step's guards know it (its `resourceVersion`: a Secret changed
    /// since this read is never written over).
    pub fn as_existing(&self) -> ExistingSecret {
        ExistingSecret {
            managed_by_us: self.layout.managed_by_us,
            conf: Some(self.conf.clone()),
            cipher_pass: Some(self.conf.cipher_pass.clone()),
            access_key_id: Some(self.conf.access_key_id.clone()),
            resource_version: self.resource_version.clone(),
        }
    }
}

/// Why the Secret cannot be adopted. Messages name settings and keys, never values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unusable {
    #[error(
        "Secret {0} does not exist; adopt reads the access key and cipher pass from it and never makes them. \
         Name the Secret that holds them with \"secret_name\", or create the repository without \"adopt\""
    )]
    Missing(String),
    #[error(
        "Secret {secret} has no {} (found: {}); adopt never makes credentials: add them to the Secret, \
         or create the repository without \"adopt\"",
        missing.join(", "), if found.is_empty() { "no recognised setting".to_owned() } else { found.join(", ") }
    )]
    Incomplete {
        secret: String,
        missing: Vec<String>,
        found: Vec<String>,
    },
    #[error(
        "Secret {secret} holds different values for {setting} (in data keys {}); say which one is right by \
         editing the Secret, then adopt again", keys.join(", ")
    )]
    Ambiguous {
        secret: String,
        setting: String,
        keys: Vec<String>,
    },
}

/// Reads the Secret `namespace/name` and the credentials in it.
pub async fn read(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<Result<Found, Unusable>, CloudError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = api
        .get_opt(name)
        .await
        .map_err(|e| classify("get secret", e))?;
    let full_name = format!("{namespace}/{name}");
    Ok(match secret {
        None => Err(Unusable::Missing(full_name)),
        Some(secret) => parse(&full_name, &secret),
    })
}

/// A setting's place: its repository (`None`: a repository-less name) and field.
type Place = (Option<u32>, Field);

/// A value found, and the data keys it was found in.
struct Seen {
    value: SecretString,
    keys: Vec<String>,
}

/// The credentials in `secret` (see the module doc).
pub fn parse(full_name: &str, secret: &Secret) -> Result<Found, Unusable> {
    let data: BTreeMap<String, Vec<u8>> = secret
        .data
        .as_ref()
        .map(|d| d.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect())
        .unwrap_or_default();
    let seen = collect(full_name, &data)?;
    let repo = chosen_repo(&seen);
    let pick = |field| {
        seen.get(&(repo, field))
            .or_else(|| seen.get(&(None, field)))
            .map(|s| s.value.clone())
    };
    let (key, key_secret, pass) = (
        pick(Field::S3Key),
        pick(Field::S3KeySecret),
        pick(Field::CipherPass),
    );
    let settings: Vec<String> = seen.keys().map(|p| place_name(*p)).collect();
    let (Some(key), Some(key_secret), Some(pass)) = (key, key_secret, pass) else {
        return Err(incomplete(full_name, repo, &seen, settings));
    };
    let conf = S3Conf {
        cipher_pass: pass,
        access_key_id: key.expose_secret().to_owned(),
        secret_access_key: key_secret,
    };
    let mut layout = layout(secret, repo, &seen, &data, settings);
    layout.lost_by_rewrite = lost_by_rewrite(&data, &conf);
    Ok(Found {
        conf,
        layout,
        resource_version: secret.metadata.resource_version.clone(),
    })
}

fn incomplete(
    full_name: &str,
    repo: Option<u32>,
    seen: &BTreeMap<Place, Seen>,
    found: Vec<String>,
) -> Unusable {
    let missing = Field::ALL
        .into_iter()
        .filter(|f| !seen.contains_key(&(repo, *f)) && !seen.contains_key(&(None, *f)))
        .map(|f| place_name((Some(repo.unwrap_or(2)), f)))
        .collect();
    Unusable::Incomplete {
        secret: full_name.to_owned(),
        missing,
        found,
    }
}

/// Every setting in every data key. The same setting with two different values is ambiguous.
fn collect(
    full_name: &str,
    data: &BTreeMap<String, Vec<u8>>,
) -> Result<BTreeMap<Place, Seen>, Unusable> {
    let mut seen: BTreeMap<Place, Seen> = BTreeMap::new();
    for (data_key, bytes) in data {
        let Ok(text) = std::str::from_utf8(bytes) else {
            continue;
        };
        for (place, value) in settings_in(data_key, text) {
            match seen.get_mut(&place) {
                Some(s) if s.value.expose_secret() != value.expose_secret() => {
                    let mut keys = s.keys.clone();
                    keys.push(data_key.clone());
                    return Err(Unusable::Ambiguous {
                        secret: full_name.to_owned(),
                        setting: place_name(place),
                        keys,
                    });
                }
                Some(s) => s.keys.push(data_key.clone()),
                None => {
                    let keys = vec![data_key.clone()];
                    seen.insert(place, Seen { value, keys });
                }
            }
        }
    }
    Ok(seen)
}

/// The settings in one data key: the key itself when it names a setting, else its lines.
fn settings_in(data_key: &str, text: &str) -> Vec<(Place, SecretString)> {
    if let Some(place) = setting_place(data_key) {
        let value = text.trim();
        return match value.is_empty() {
            true => Vec::new(),
            false => vec![(place, SecretString::from(value.to_owned()))],
        };
    }
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with(['#', ';', '[']))
        .filter_map(|line| line.split_once('='))
        .filter_map(|(name, value)| {
            let value = value.trim();
            let place = setting_place(name)?;
            (!value.is_empty()).then(|| (place, SecretString::from(value.to_owned())))
        })
        .collect()
}

/// Where a setting name belongs (see the module doc), `None` for any other name.
fn setting_place(name: &str) -> Option<Place> {
    let name = name.trim().to_ascii_lowercase().replace('_', "-");
    let name = name.strip_prefix("export ").unwrap_or(&name).trim();
    let generic = match name {
        "aws-access-key-id" => Some(Field::S3Key),
        "aws-secret-access-key" => Some(Field::S3KeySecret),
        "cipher-pass" => Some(Field::CipherPass),
        _ => None,
    };
    if let Some(field) = generic {
        return Some((None, field));
    }
    let rest = name.strip_prefix("pgbackrest-").unwrap_or(name);
    let rest = rest.strip_prefix("repo")?;
    let digits = rest.find(|c: char| !c.is_ascii_digit())?;
    let repo: u32 = rest[..digits].parse().ok()?;
    let field = Field::ALL
        .into_iter()
        .find(|f| rest[digits..] == format!("-{}", f.suffix()))?;
    Some((Some(repo), field))
}

fn place_name((repo, field): Place) -> String {
    match (repo, field) {
        (Some(n), f) => format!("repo{n}-{}", f.suffix()),
        (None, Field::S3Key) => "AWS_ACCESS_KEY_ID".to_owned(),
        (None, Field::S3KeySecret) => "AWS_SECRET_ACCESS_KEY".to_owned(),
        (None, Field::CipherPass) => "cipher-pass".to_owned(),
    }
}

/// repo2 when any repo2 setting is present, else the lowest repository with a setting.
fn chosen_repo(seen: &BTreeMap<Place, Seen>) -> Option<u32> {
    let repos: Vec<u32> = seen.keys().filter_map(|(repo, _)| *repo).collect();
    if repos.contains(&2) {
        return Some(2);
    }
    repos.into_iter().min()
}

/// Repositories (other than `repo`) holding a value that differs from `repo`'s.
fn differing_repos(seen: &BTreeMap<Place, Seen>, repo: Option<u32>) -> Vec<u32> {
    let mut differ: Vec<u32> = seen
        .iter()
        .filter_map(|((r, field), s)| {
            let other = (*r)?;
            let ours = seen.get(&(repo, *field))?;
            (Some(other) != repo && ours.value.expose_secret() != s.value.expose_secret())
                .then_some(other)
        })
        .collect();
    differ.dedup();
    differ
}

fn layout(
    secret: &Secret,
    repo: Option<u32>,
    seen: &BTreeMap<Place, Seen>,
    data: &BTreeMap<String, Vec<u8>>,
    settings: Vec<String>,
) -> Layout {
    let differing_repos = differing_repos(seen, repo);
    let data_keys: Vec<String> = data.keys().cloned().collect();
    let only_repo2_and_3 = Field::ALL
        .into_iter()
        .all(|f| seen.contains_key(&(Some(2), f)) && seen.contains_key(&(Some(3), f)))
        && seen.len() == 6;
    let secret_type = secret
        .type_
        .clone()
        .unwrap_or_else(|| SECRET_TYPE.to_owned());
    Layout {
        runbook: data_keys == [S3_CONF_KEY]
            && only_repo2_and_3
            && differing_repos.is_empty()
            && secret_type == SECRET_TYPE,
        repo,
        data_keys,
        settings,
        differing_repos,
        secret_type,
        managed_by_us: secret
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(MANAGED_BY_LABEL))
            .is_some_and(|v| v == FIELD_MANAGER),
        lost_by_rewrite: Vec::new(),
    }
}

/// What rewriting into the runbook's `s3.conf` with `conf` would drop from `data` (see
/// [`Layout::lost_by_rewrite`]): names of settings and data keys, never a value.
fn lost_by_rewrite(data: &BTreeMap<String, Vec<u8>>, conf: &S3Conf) -> Vec<String> {
    let mut lost = Vec::new();
    for (data_key, bytes) in data {
        match std::str::from_utf8(bytes) {
            Ok(text) => lost.extend(lost_in(data_key, text, conf)),
            Err(_) => lost.push(format!("data key {data_key} (not text)")),
        }
    }
    lost.dedup();
    lost
}

/// What the rewrite would drop from one data key: recognised settings with another value than
/// the one kept, and every other line (an unrecognised line may be anyone's credential).
fn lost_in(data_key: &str, text: &str, conf: &S3Conf) -> Vec<String> {
    let another_value = |place| {
        format!(
            "{} in data key {data_key} (another value)",
            place_name(place)
        )
    };
    if let Some(place) = setting_place(data_key) {
        let value = text.trim();
        return match value.is_empty() || kept(place.1, value, conf) {
            true => Vec::new(),
            false => vec![another_value(place)],
        };
    }
    let lines = text.lines().map(str::trim);
    let lines = lines.filter(|line| !line.is_empty() && !line.starts_with(['#', ';', '[']));
    lines
        .filter_map(|line| match line.split_once('=') {
            Some((name, value)) => match setting_place(name) {
                Some(place) if value.trim().is_empty() || kept(place.1, value.trim(), conf) => None,
                Some(place) => Some(another_value(place)),
                None => Some(other_line(data_key, name.trim())),
            },
            None => Some(other_line(data_key, "")),
        })
        .collect()
}

/// Whether `value` of `field` is the one the rewrite keeps.
fn kept(field: Field, value: &str, conf: &S3Conf) -> bool {
    let keeps = match field {
        Field::S3Key => conf.access_key_id.as_str(),
        Field::S3KeySecret => conf.secret_access_key.expose_secret(),
        Field::CipherPass => conf.cipher_pass.expose_secret(),
    };
    keeps == value
}

/// A line that is no credential the rewrite keeps, named when its name looks like an option's
/// (`repo1-path`); any other text is never shown (it may be a value).
fn other_line(data_key: &str, name: &str) -> String {
    let option_like = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.contains('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    match option_like {
        true => format!("{name} in data key {data_key}"),
        false => format!("other content in data key {data_key}"),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::ByteString;
    use kube::api::ObjectMeta;

    use super::*;

    fn secret(data: &[(&str, &str)]) -> Secret {
        Secret {
            metadata: ObjectMeta {
                resource_version: Some("5".into()),
                ..Default::default()
            },
            data: Some(
                data.iter()
                    .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    const RUNBOOK: &str = "[global]\nrepo2-cipher-pass=P4ss\nrepo2-s3-key=AKIA1\n\
        repo2-s3-key-secret=s/3+c\nrepo3-cipher-pass=P4ss\nrepo3-s3-key=AKIA1\n\
        repo3-s3-key-secret=s/3+c\n";

    fn values(found: &Found) -> (String, String, String) {
        (
            found.conf.access_key_id.clone(),
            found.conf.secret_access_key.expose_secret().to_owned(),
            found.conf.cipher_pass.expose_secret().to_owned(),
        )
    }

    #[test]
    fn the_runbook_s3_conf_is_recognised() {
        let found = parse("ns/s", &secret(&[("s3.conf", RUNBOOK)])).unwrap();
        assert!(found.layout.runbook, "{:?}", found.layout);
        assert_eq!(found.layout.repo, Some(2));
        assert_eq!(
            values(&found),
            ("AKIA1".into(), "s/3+c".into(), "P4ss".into())
        );
        assert_eq!(found.as_existing().resource_version.as_deref(), Some("5"));
    }

    #[test]
    fn pgo_s3_creds_with_repo1_settings_is_accepted_as_another_layout() {
        let text = "[global]\nrepo1-s3-key=AKIA2\nrepo1-s3-key-secret=x=y\nrepo1-cipher-pass=Q\n";
        let found = parse("ns/pgo-s3-creds", &secret(&[("s3.conf", text)])).unwrap();
        assert!(!found.layout.runbook);
        assert_eq!(found.layout.repo, Some(1));
        assert_eq!(values(&found), ("AKIA2".into(), "x=y".into(), "Q".into()));
        assert!(
            found.layout.describe().contains("repo1"),
            "{}",
            found.layout.describe()
        );
    }

    #[test]
    fn values_under_their_own_data_keys_are_accepted() {
        let found = parse(
            "ns/s",
            &secret(&[
                ("AWS_ACCESS_KEY_ID", "AKIA3\n"),
                ("AWS_SECRET_ACCESS_KEY", "sec"),
                ("repo1-cipher-pass", "R"),
            ]),
        )
        .unwrap();
        assert_eq!(values(&found), ("AKIA3".into(), "sec".into(), "R".into()));
        let env = "PGBACKREST_REPO1_S3_KEY=AKIA4\nexport PGBACKREST_REPO1_S3_KEY_SECRET=t\n\
                   PGBACKREST_REPO1_CIPHER_PASS=S\n";
        let found = parse("ns/s", &secret(&[("env", env)])).unwrap();
        assert_eq!(values(&found), ("AKIA4".into(), "t".into(), "S".into()));
    }

    #[test]
    fn repo3_differing_from_repo2_is_not_the_runbook_layout() {
        let text = RUNBOOK.replace("repo3-cipher-pass=P4ss", "repo3-cipher-pass=Other");
        let found = parse("ns/s", &secret(&[("s3.conf", &text)])).unwrap();
        assert!(!found.layout.runbook);
        assert_eq!(found.layout.differing_repos, vec![3]);
        assert_eq!(values(&found).2, "P4ss", "repo2 is the runbook's and wins");
        let extra = secret(&[("s3.conf", RUNBOOK), ("other", "x")]);
        assert!(!parse("ns/s", &extra).unwrap().layout.runbook);
    }

    #[test]
    fn missing_and_ambiguous_settings_are_named_without_values() {
        let err = parse("ns/s", &secret(&[("s3.conf", "repo1-s3-key=AKIA5\n")])).unwrap_err();
        let shown = err.to_string();
        assert!(
            shown.contains("repo1-s3-key-secret, repo1-cipher-pass"),
            "{shown}"
        );
        assert!(!shown.contains("AKIA5"), "{shown}");
        let err = parse("ns/s", &secret(&[])).unwrap_err();
        assert!(err.to_string().contains("no recognised setting"), "{err}");
        let err = parse(
            "ns/s",
            &secret(&[("a", "repo1-cipher-pass=A"), ("b", "repo1-cipher-pass=B")]),
        )
        .unwrap_err();
        let shown = err.to_string();
        assert!(
            shown.contains("repo1-cipher-pass") && shown.contains("a, b"),
            "{shown}"
        );
        assert!(!shown.contains("=A") && !shown.contains("=B"), "{shown}");
    }

    #[test]
    fn what_a_rewrite_would_erase_is_named_without_values() {
        let runbook = parse("ns/s", &secret(&[("s3.conf", RUNBOOK)])).unwrap();
        assert!(runbook.layout.lost_by_rewrite.is_empty());
        assert!(runbook.layout.refuse_lossy_rewrite("ns/s").is_ok());
        let pgo = "[global]\nrepo1-s3-key=AKIA2\nrepo1-s3-key-secret=x=y\nrepo1-cipher-pass=Q\n";
        let pgo = parse("ns/p", &secret(&[("s3.conf", pgo)])).unwrap();
        assert!(pgo.layout.lost_by_rewrite.is_empty(), "same values, kept");

        let text = RUNBOOK.replace("repo3-cipher-pass=P4ss", "repo3-cipher-pass=Other");
        let extra = [
            ("s3.conf", text.as_str()),
            ("gcs.json", "{\"private_key\": \"TOKEN\"}"),
            ("env", "repo1-s3-key=AKIA1\nrepo1-path=/pg\nSeCrEt=V4l\n"),
        ];
        let found = parse("ns/s", &secret(&extra)).unwrap();
        let lost = &found.layout.lost_by_rewrite;
        assert_eq!(
            lost,
            &[
                "repo1-path in data key env",
                "other content in data key env",
                "other content in data key gcs.json",
                "repo3-cipher-pass in data key s3.conf (another value)",
            ],
        );
        let refused = found.layout.refuse_lossy_rewrite("ns/s").unwrap_err();
        assert!(refused.contains("Move those settings"), "{refused}");
        for value in ["Other", "TOKEN", "V4l", "P4ss", "SeCrEt"] {
            assert!(!refused.contains(value), "{value} in {refused}");
        }
    }

    #[test]
    fn debug_shows_no_value() {
        let found = parse("ns/s", &secret(&[("s3.conf", RUNBOOK)])).unwrap();
        let shown = format!("{found:?}");
        assert!(
            !shown.contains("P4ss") && !shown.contains("s/3+c"),
            "{shown}"
        );
    }
}
