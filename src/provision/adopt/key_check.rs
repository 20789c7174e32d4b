//! The access key an adoption found in the Secret, checked against IAM: the user named after
//! the bucket exists, lists the key among its own (so the key belongs to it), and the key is
//! `Active`. Read calls only (GetUser, ListAccessKeys). Anything else is a permanent error that
//! names the key and the user and says what to do: adopt never makes or changes a key.

use aws_sdk_iam::Client;
use aws_sdk_iam::error::ProvideErrorMetadata;
use serde_json::json;

use crate::cloud::aws::classify;
use crate::cloud::{CloudError, StepReport};
use crate::jobs::JobError;
use crate::provision::access_key::{self, KeyInfo};
use crate::provision::report::Report;

/// The resource kind in the step's report.
const KIND: &str = "iam-access-key";

/// Why the key cannot be adopted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyProblem {
    #[error(
        "IAM user {user} does not exist, so access key {key} in Secret {secret} cannot be its key; adopt never \
         creates a user or a key: create the repository without \"adopt\" to make them"
    )]
    NoUser {
        user: String,
        key: String,
        secret: String,
    },
    #[error(
        "access key {key} in Secret {secret} is not a key of IAM user {user} (its keys: {}); adopt never makes \
         a key: put the user's key in the Secret, or create the repository without \"adopt\" (a new key is made), \
         or adopt it once its Secret is right and then POST .../rotate-key", if listed.is_empty() { "none".to_owned() } else { listed.join(", ") }
    )]
    NotListed {
        key: String,
        user: String,
        secret: String,
        listed: Vec<String>,
    },
    #[error(
        "access key {key} of IAM user {user} (in Secret {secret}) is {status}: pgBackRest cannot use it. \
         Activate it in IAM if it is still the one in use, or put an active key of the user in the Secret; \
         adopt never makes a key (create the repository without \"adopt\", or rotate the key once adopted)"
    )]
    NotActive {
        key: String,
        user: String,
        secret: String,
        status: String,
    },
}

impl From<KeyProblem> for JobError {
    fn from(problem: KeyProblem) -> Self {
        JobError::Permanent(problem.to_string())
    }
}

/// What was found: the user's keys, or why the key is not usable.
pub enum Checked {
    Usable(StepReport),
    Problem(KeyProblem),
}

/// Checks access key `key` (from Secret `secret`, for messages) against IAM user `user`.
pub async fn check(
    iam: &Client,
    user: &str,
    key: &str,
    secret: &str,
) -> Result<Checked, CloudError> {
    if !user_exists(iam, user).await? {
        return Ok(Checked::Problem(KeyProblem::NoUser {
            user: user.to_owned(),
            key: key.to_owned(),
            secret: secret.to_owned(),
        }));
    }
    let listed = access_key::list(iam, user).await?;
    Ok(match judge(&listed, user, key, secret) {
        Ok(report) => Checked::Usable(report),
        Err(problem) => Checked::Problem(problem),
    })
}

async fn user_exists(iam: &Client, user: &str) -> Result<bool, CloudError> {
    match iam.get_user().user_name(user).send().await {
        Ok(_) => Ok(true),
        Err(err) if err.code() == Some("NoSuchEntity") => Ok(false),
        Err(err) => Err(classify("iam", "GetUser", err)),
    }
}

/// The verdict on `key` among the user's keys `listed`. Another key of the user is reported
/// and left: the Secret does not reference it (rotate-key deletes it when it makes room).
pub fn judge(
    listed: &[KeyInfo],
    user: &str,
    key: &str,
    secret: &str,
) -> Result<StepReport, KeyProblem> {
    let Some(found) = listed.iter().find(|k| k.id == key) else {
        return Err(KeyProblem::NotListed {
            key: key.to_owned(),
            user: user.to_owned(),
            secret: secret.to_owned(),
            listed: listed.iter().map(|k| k.id.clone()).collect(),
        });
    };
    if !found.is_active() {
        return Err(KeyProblem::NotActive {
            key: key.to_owned(),
            user: user.to_owned(),
            secret: secret.to_owned(),
            status: found.status.clone(),
        });
    }
    let mut report = Report::new(KIND, format!("{user}/{key}"));
    report.unchanged("user", json!(user));
    report.unchanged("status", json!("Active"));
    let others: Vec<&str> = listed
        .iter()
        .filter(|k| k.id != key)
        .map(|k| k.id.as_str())
        .collect();
    if others.is_empty() {
        report.unchanged("other_keys", json!([]));
    } else {
        report.left(
            "other_keys",
            json!(others),
            json!([]),
            "the Secret does not reference these keys; they are left as they are (rotate-key deletes \
             a key the Secret does not reference)",
        );
    }
    let detail = json!({
        "user_name": user,
        "access_key_id": key,
        "secret": secret,
        "created": found.created,
    });
    Ok(report.into_step_report(detail))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, status: &str) -> KeyInfo {
        KeyInfo {
            id: id.to_owned(),
            status: status.to_owned(),
            created: None,
        }
    }

    #[test]
    fn the_key_must_be_the_users_and_active() {
        let listed = [key("AKIA1", "Active"), key("AKIA2", "Inactive")];
        let report = judge(&listed, "u", "AKIA1", "ns/s").unwrap();
        assert_eq!(report.detail["differences"][0]["setting"], "other_keys");
        let err = judge(&listed, "u", "AKIA2", "ns/s").unwrap_err();
        assert!(
            err.to_string()
                .contains("AKIA2 of IAM user u (in Secret ns/s) is Inactive"),
            "{err}"
        );
        let err = judge(&listed, "u", "AKIA9", "ns/s").unwrap_err();
        assert!(err.to_string().contains("its keys: AKIA1, AKIA2"), "{err}");
        let err = judge(&[], "u", "AKIA9", "ns/s").unwrap_err();
        assert!(err.to_string().contains("its keys: none"), "{err}");
        assert!(
            judge(&listed[..1], "u", "AKIA1", "ns/s").unwrap().detail["differences"]
                .as_array()
                .unwrap()
                .is_empty()
        );
    }
}
