//! The IAM side of a rotation that provisioning does not need: which keys to delete to make
//! room for a new one ([`plan_room`], [`plan_new_key`]), the old key's last use
//! (`GetAccessKeyLastUsed`, [`last_used`]) and its deactivation (`UpdateAccessKey`,
//! [`deactivate`]). Errors are classified like every other IAM call ([`classify`]).

use aws_sdk_iam::Client;
use aws_sdk_iam::error::ProvideErrorMetadata;
use aws_sdk_iam::types::StatusType;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;

use super::retirements::Retirement;
use crate::cloud::aws::{classify, output_request_id};
use crate::cloud::{CloudError, Outcome, StepReport};
use crate::provision::access_key::KeyInfo;

const IAM: &str = "iam";

/// What the `make_room` step does with the user's keys before a new one is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomPlan {
    /// Keys the Secret does not reference and nobody holds a secret for (a key made by hand,
    /// an orphan): deleted, so that the new key fits within IAM's two.
    pub delete: Vec<String>,
    /// Inactive keys of earlier rotations waiting for their deletion: deleted early, and their
    /// retirement closed.
    pub retire_early: Vec<(uuid::Uuid, String)>,
}

/// Why a rotation cannot start now: a key of an earlier rotation that consumers may still use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InGrace {
    pub key: String,
    pub message: String,
}

impl InGrace {
    /// The key is active in its grace period.
    pub fn grace(key: &str, deactivate_after: DateTime<Utc>) -> InGrace {
        InGrace {
            key: key.to_owned(),
            message: format!(
                "access key {key} of an earlier rotation is still active in its grace period \
                 (deactivated after {deactivate_after}); consumers may still use it. Rotate \
                 again once it is deactivated"
            ),
        }
    }

    /// The key an earlier rotation moved the Secret to, active, while the Secret references
    /// another key now: consumers that moved to it may still use it.
    pub fn moved_to(key: &str, retirement: &Retirement) -> InGrace {
        InGrace {
            key: key.to_owned(),
            message: format!(
                "access key {key} is the key an earlier rotation moved the Secret to (from access \
                 key {}), and it is still active although the Secret references another key now; \
                 consumers that moved to it may still use it, so it was not deleted. Restore the \
                 Secret with access key {key}, or deactivate or delete {key} by hand once nothing \
                 uses it, then rotate",
                retirement.old_key_id
            ),
        }
    }

    /// The key's retirement halted and the key is still active.
    pub fn halted(key: &str, reason: Option<&str>) -> InGrace {
        InGrace {
            key: key.to_owned(),
            message: format!(
                "the retirement of access key {key} of an earlier rotation halted ({}) and the \
                 key is still active; deactivate or delete it by hand once nothing uses it, \
                 then rotate",
                reason.unwrap_or("no reason recorded")
            ),
        }
    }
}

/// Decides which of the user's keys `in_iam` go before a rotation. Never the key the Secret
/// references (`referenced`), never the key whose secret is sealed (`sealed`: an earlier attempt
/// made it, it becomes the new key), never an active key in a pending retirement (refused).
pub fn plan_room(
    in_iam: &[KeyInfo],
    referenced: &str,
    sealed: Option<&str>,
    pending: &[Retirement],
) -> Result<RoomPlan, InGrace> {
    let mut plan = RoomPlan {
        delete: Vec::new(),
        retire_early: Vec::new(),
    };
    for key in in_iam.iter().filter(|k| k.id != referenced) {
        if let Some(retirement) = pending.iter().find(|r| r.old_key_id == key.id) {
            match (key.is_active(), retirement.halted_at) {
                (true, None) => return Err(InGrace::grace(&key.id, retirement.deactivate_after)),
                (true, Some(_)) => {
                    let reason = retirement.halt_reason.as_deref();
                    return Err(InGrace::halted(&key.id, reason));
                }
                (false, _) => {}
            }
            plan.retire_early.push((retirement.id, key.id.clone()));
        } else if let Some(retirement) = moved_to(pending, key) {
            return Err(InGrace::moved_to(&key.id, retirement));
        } else if Some(key.id.as_str()) == sealed && key.is_active() {
            continue;
        } else {
            plan.delete.push(key.id.clone());
        }
    }
    Ok(plan)
}

/// The pending (or halted) retirement whose rotation moved the Secret to `key`, when `key` is
/// still active: consumers may have moved to it, even if the Secret references another key now
/// (restored by hand).
fn moved_to<'a>(pending: &'a [Retirement], key: &KeyInfo) -> Option<&'a Retirement> {
    pending
        .iter()
        .find(|r| r.new_key_id == key.id)
        .filter(|_| key.is_active())
}

/// What the `new_key` step does: reuse the key whose secret is sealed (an earlier attempt made
/// it), else make one after deleting every key nobody can use (an earlier attempt that died
/// between CreateAccessKey and sealing left one). `spare`: keys never deleted here (the one the
/// Secret references, keys of pending retirements).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewKeyPlan {
    pub reuse: Option<String>,
    pub delete: Vec<String>,
}

pub fn plan_new_key(in_iam: &[KeyInfo], sealed: Option<&str>, spare: &[&str]) -> NewKeyPlan {
    let reuse = sealed
        .filter(|id| !spare.contains(id))
        .filter(|id| in_iam.iter().any(|k| k.id == *id && k.is_active()))
        .map(str::to_owned);
    let delete = in_iam
        .iter()
        .map(|k| k.id.clone())
        .filter(|id| !spare.contains(&id.as_str()) && Some(id) != reuse.as_ref())
        .collect();
    NewKeyPlan { reuse, delete }
}

/// `GetAccessKeyLastUsed` of a key, as reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LastUsed {
    pub access_key_id: String,
    /// `None`: never used (or IAM has not recorded a use yet).
    pub last_used_at: Option<DateTime<Utc>>,
    pub service: Option<String>,
    pub region: Option<String>,
}

impl LastUsed {
    /// Whether the key was used after `since` (the Secret stopped referencing it then).
    pub fn used_after(&self, since: DateTime<Utc>) -> bool {
        self.last_used_at.is_some_and(|at| at > since)
    }
}

/// Reads when the key was last used. A key that is gone reads as `None` (nothing to report).
pub async fn last_used(iam: &Client, key_id: &str) -> Result<Option<LastUsed>, CloudError> {
    let out = match iam
        .get_access_key_last_used()
        .access_key_id(key_id)
        .send()
        .await
    {
        Ok(out) => out,
        Err(err) if err.code() == Some("NoSuchEntity") => return Ok(None),
        Err(err) => return Err(classify(IAM, "GetAccessKeyLastUsed", err)),
    };
    let used = out.access_key_last_used();
    let known = |s: Option<&str>| s.filter(|s| *s != "N/A").map(str::to_owned);
    Ok(Some(LastUsed {
        access_key_id: key_id.to_owned(),
        last_used_at: used
            .and_then(|u| u.last_used_date())
            .and_then(|d| DateTime::from_timestamp(d.secs(), d.subsec_nanos())),
        service: known(used.map(|u| u.service_name())),
        region: known(used.map(|u| u.region())),
    }))
}

/// Makes the key inactive (`UpdateAccessKey`). A key that is gone counts as done.
pub async fn deactivate(iam: &Client, user: &str, key_id: &str) -> Result<StepReport, CloudError> {
    let sent = iam
        .update_access_key()
        .user_name(user)
        .access_key_id(key_id)
        .status(StatusType::Inactive)
        .send()
        .await;
    let detail = json!({ "user_name": user, "access_key_id": key_id, "status": "Inactive" });
    match sent {
        Ok(out) => {
            let mut report = StepReport::new(Outcome::Updated, detail);
            report.upstream_request_id = output_request_id(&out);
            Ok(report)
        }
        Err(err) if err.code() == Some("NoSuchEntity") => {
            let mut report = StepReport::new(Outcome::AlreadyPresent, detail);
            report.detail["already_absent"] = json!(true);
            Ok(report)
        }
        Err(err) => Err(classify(IAM, "UpdateAccessKey", err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, active: bool) -> KeyInfo {
        KeyInfo {
            id: id.to_owned(),
            status: if active { "Active" } else { "Inactive" }.to_owned(),
            created: None,
        }
    }

    fn retiring(id: &str) -> Retirement {
        let now = Utc::now();
        Retirement {
            id: uuid::Uuid::new_v4(),
            repository_id: uuid::Uuid::new_v4(),
            rotation_job_id: uuid::Uuid::new_v4(),
            old_key_id: id.to_owned(),
            new_key_id: "NEW".to_owned(),
            secret_changed_at: now,
            deactivate_after: now,
            delete_after: now,
            deactivated_at: None,
            deleted_at: None,
            last_used: None,
            halted_at: None,
            halt_reason: None,
        }
    }

    #[test]
    fn the_referenced_key_is_never_deleted_to_make_room() {
        let plan = plan_room(&[key("R", true), key("X", true)], "R", None, &[]).unwrap();
        assert_eq!(plan.delete, vec!["X".to_owned()]);
        let plan = plan_room(&[key("X", false), key("R", false)], "R", None, &[]).unwrap();
        assert_eq!(plan.delete, vec!["X".to_owned()]);
        let plan = plan_room(&[key("R", true)], "R", None, &[]).unwrap();
        assert!(plan.delete.is_empty() && plan.retire_early.is_empty());
    }

    #[test]
    fn a_sealed_key_is_kept_and_an_active_key_in_grace_refuses() {
        let plan = plan_room(&[key("R", true), key("S", true)], "R", Some("S"), &[]).unwrap();
        assert!(plan.delete.is_empty());
        let pending = [retiring("O")];
        let refused = plan_room(&[key("O", true), key("R", true)], "R", None, &pending);
        assert_eq!(refused.unwrap_err().key, "O");
        let mut halted = retiring("O");
        halted.halted_at = Some(Utc::now());
        let refused = plan_room(&[key("O", true), key("R", true)], "R", None, &[halted]);
        assert!(refused.unwrap_err().message.contains("halted"));
        // The key the Secret references again (its retirement halted) is no obstacle.
        let plan = plan_room(&[key("O", true)], "O", None, &pending).unwrap();
        assert!(plan.delete.is_empty() && plan.retire_early.is_empty());
        // The key the Secret held before it was restored to the old key is no orphan.
        let refused = plan_room(&[key("O", true), key("NEW", true)], "O", None, &pending);
        assert!(refused.unwrap_err().message.contains("moved the Secret to"));
        let plan = plan_room(&[key("O", true), key("NEW", false)], "O", None, &pending).unwrap();
        assert_eq!(plan.delete, vec!["NEW".to_owned()]);
        let plan = plan_room(&[key("O", false), key("R", true)], "R", None, &pending).unwrap();
        assert_eq!(plan.retire_early, vec![(pending[0].id, "O".to_owned())]);
        assert!(plan.delete.is_empty());
    }

    #[test]
    fn a_new_key_never_needs_more_than_two_keys() {
        // A worker died after CreateAccessKey: its key is deleted before another is made.
        let plan = plan_new_key(&[key("R", true), key("X", true)], None, &["R"]);
        assert_eq!((plan.reuse, plan.delete), (None, vec!["X".to_owned()]));
        // The sealed key is reused, unless it is inactive.
        let plan = plan_new_key(&[key("R", true), key("S", true)], Some("S"), &["R"]);
        assert_eq!((plan.reuse.as_deref(), plan.delete.len()), (Some("S"), 0));
        let plan = plan_new_key(&[key("R", true), key("S", false)], Some("S"), &["R"]);
        assert_eq!((plan.reuse, plan.delete), (None, vec!["S".to_owned()]));
        // Spared keys stay, whatever else holds.
        let plan = plan_new_key(&[key("R", true), key("O", true)], Some("R"), &["R", "O"]);
        assert_eq!((plan.reuse, plan.delete), (None, vec![]));
    }

    #[test]
    fn last_use_after_the_change_is_strictly_later() {
        let at = Utc::now();
        let used = |t: Option<DateTime<Utc>>| LastUsed {
            access_key_id: "O".into(),
            last_used_at: t,
            service: None,
            region: None,
        };
        assert!(used(Some(at + chrono::Duration::seconds(1))).used_after(at));
        assert!(!used(Some(at)).used_after(at));
        assert!(!used(None).used_after(at));
    }
}
