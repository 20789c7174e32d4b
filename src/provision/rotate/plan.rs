//! The dry run of a rotation ([`Rotator`]'s `JobHandler::plan`): the Secret and the user's keys
//! are read (GetSecret, ListAccessKeys), nothing is changed. One report per resource, as the
//! job would change it: the keys deleted to make room, the new key, the probe, the Secret (new
//! key, cipher pass unchanged) and the old key's retirement dates.
//!
//! What a plan cannot know (it reads no Postgres): a key an unfinished earlier rotation sealed
//! (it would be reused instead of created), and the retirements of earlier rotations. The HTTP
//! handler refuses before planning when an earlier rotation's old key is still active in its
//! grace period; an active key the plan would delete says that the job refuses instead when it
//! is the key an earlier rotation moved the Secret to (the Secret was restored to an older key
//! by hand since, e.g. after a halted retirement).

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::keys::{self, RoomPlan};
use super::{RotatePayload, Rotator, ready_secret};
use crate::jobs::JobError;
use crate::provision::access_key::{self, KeyInfo};
use crate::provision::secret;

/// A resource report in the shape of `provision::report` (`resource`, `settings`).
fn resource(kind: &str, name: &str, action: &str, settings: Vec<Value>) -> Value {
    json!({
        "resource": { "kind": kind, "name": name, "action": action },
        "settings": settings,
    })
}

fn setting(name: &str, expected: Value, actual: Value, action: &str) -> Value {
    json!({ "setting": name, "expected": expected, "actual": actual, "action": action })
}

impl Rotator {
    /// The plan of a `rotate-access-key` job for `payload` (read calls only).
    pub async fn plan_rotation(&self, payload: Value) -> Result<Value, JobError> {
        let payload: RotatePayload = serde_json::from_value(payload)
            .map_err(|e| JobError::Permanent(format!("invalid payload: {e}")))?;
        let (namespace, name) = (payload.namespace.as_str(), payload.secret_name());
        let existing = secret::read(&self.kube, namespace, name).await?;
        let conf = ready_secret(existing.as_ref(), namespace, name)?;
        let old = conf.access_key_id.as_str();
        let user = payload.bucket.iam_user_name();
        let listed = access_key::list(&self.aws.iam, user).await?;
        let room = keys::plan_room(&listed, old, None, &[])
            .map_err(|e| JobError::Permanent(e.to_string()))?;
        let mut plan = plan_make_room(user, &listed, &room);
        plan.push(plan_new_key(user));
        plan.push(resource(
            "s3-probe",
            payload.bucket.as_str(),
            "create",
            vec![setting(
                "put_get_delete_with_new_key",
                json!("the new key writes, reads back and deletes a probe object"),
                Value::Null,
                "create",
            )],
        ));
        plan.push(plan_secret(namespace, name, old));
        let now = Utc::now();
        let deactivate_after =
            now + chrono::Duration::from_std(self.timeline.grace).unwrap_or_default();
        let delete_after = deactivate_after
            + chrono::Duration::from_std(self.timeline.delete_grace).unwrap_or_default();
        let status = listed
            .iter()
            .find(|k| k.id == old)
            .map(|k| k.status.clone());
        plan.push(plan_retirement(
            user,
            old,
            status,
            deactivate_after,
            delete_after,
        ));
        Ok(Value::Array(plan))
    }
}

/// The keys deleted before the new one is made.
fn plan_make_room(user: &str, listed: &[KeyInfo], room: &RoomPlan) -> Vec<Value> {
    let early = room.retire_early.iter().map(|(_, id)| id);
    room.delete
        .iter()
        .chain(early)
        .map(|id| {
            let status = listed
                .iter()
                .find(|k| &k.id == id)
                .map(|k| k.status.clone());
            let active = status.as_deref() == Some("Active");
            let mut deleted = setting("status", Value::Null, json!(status), "delete");
            deleted["reason"] = json!(
                "not referenced by the Secret: deleted to make room for the new key within \
                 IAM's two keys per user"
            );
            if active {
                deleted["unless"] = json!(
                    "it is the key an earlier rotation moved the Secret to (its old key's \
                     retirement pending or halted, the Secret restored by hand since): consumers \
                     may use it, so the rotation refuses; deactivate or delete it by hand once \
                     nothing uses it, or restore the Secret with it"
                );
            }
            resource(
                "iam-access-key",
                &format!("{user}/{id}"),
                "delete",
                vec![deleted],
            )
        })
        .collect()
}

fn plan_new_key(user: &str) -> Value {
    let (description, _) = access_key::description_tag_value();
    resource(
        "iam-access-key",
        &format!("{user}/(new)"),
        "create",
        vec![
            setting("status", json!("Active"), Value::Null, "create"),
            setting("description_tag", json!(description), Value::Null, "create"),
            setting(
                "secret",
                json!("sealed in Postgres until the Secret holds it"),
                Value::Null,
                "create",
            ),
        ],
    )
}

fn plan_secret(namespace: &str, name: &str, old: &str) -> Value {
    resource(
        "kube-secret",
        &format!("{namespace}/{name}"),
        "update",
        vec![
            setting(
                "s3.conf access key (repo2 and repo3)",
                json!("the new access key"),
                json!(old),
                "update",
            ),
            setting(
                "s3.conf cipher pass",
                json!("unchanged"),
                json!("unchanged"),
                "none",
            ),
        ],
    )
}

fn plan_retirement(
    user: &str,
    old: &str,
    status: Option<String>,
    deactivate_after: DateTime<Utc>,
    delete_after: DateTime<Utc>,
) -> Value {
    let mut deactivate = setting("status", json!("Inactive"), json!(status), "update");
    deactivate["after"] = json!(deactivate_after);
    deactivate["reason"] = json!(
        "kept active for BP_KEY_GRACE after the Secret changed; its last use is checked first"
    );
    let mut delete = setting("exists", json!(false), json!(status.is_some()), "delete");
    delete["after"] = json!(delete_after);
    delete["reason"] = json!("deleted BP_KEY_DELETE_GRACE after it was deactivated");
    resource(
        "iam-access-key",
        &format!("{user}/{old}"),
        "update",
        vec![deactivate, delete],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> KeyInfo {
        KeyInfo {
            id: id.to_owned(),
            status: "Active".to_owned(),
            created: None,
        }
    }

    #[test]
    fn the_plan_names_each_key_and_keeps_the_cipher_pass() {
        let listed = [key("R"), key("X")];
        let room = keys::plan_room(&listed, "R", None, &[]).unwrap();
        let deleted = plan_make_room("u", &listed, &room);
        assert_eq!(deleted.len(), 1);
        assert_eq!(deleted[0]["resource"]["name"], "u/X");
        assert_eq!(deleted[0]["resource"]["action"], "delete");
        let unless = &deleted[0]["settings"][0]["unless"];
        assert!(
            unless.as_str().unwrap().contains("rotation refuses"),
            "{unless}"
        );
        assert_eq!(plan_new_key("u")["resource"]["action"], "create");
        let secret = plan_secret("ns", "s", "R");
        let settings = secret["settings"].as_array().unwrap();
        assert_eq!(settings[0]["actual"], "R");
        assert_eq!(settings[1]["action"], "none");
        let now = Utc::now();
        let old = plan_retirement("u", "R", Some("Active".into()), now, now);
        assert_eq!(old["resource"]["name"], "u/R");
        let actions: Vec<&Value> = old["settings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| &s["action"])
            .collect();
        assert_eq!(actions, [&json!("update"), &json!("delete")]);
    }
}
