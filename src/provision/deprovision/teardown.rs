//! What one deprovision step found and did (or, in a dry run, would do) to its resource: the
//! resource's `action` (`delete`, `update`, `none`, `leave`) and, setting by setting, what was
//! expected after the teardown, what was found, and the action. The same shape as a
//! provisioning step's report (`provision::report`), so a dry run's plan reads alike.

use serde_json::{Map, Value, json};

use crate::jobs::StepDone;
use crate::provision::report::Action;

/// Whether a step changes anything or only reports what it would change (a dry run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Read calls only: the report says what would be done.
    Plan,
    /// Read, then change what differs.
    Apply,
}

impl Mode {
    pub fn applies(self) -> bool {
        self == Mode::Apply
    }
}

/// The report on one resource.
#[derive(Debug, Clone)]
pub struct Teardown {
    kind: &'static str,
    name: String,
    action: Action,
    settings: Vec<Value>,
    reason: Option<String>,
    request_id: Option<String>,
}

impl Teardown {
    /// A report on the resource `name` of `kind` (e.g. `iam-user`); nothing done yet.
    pub fn new(kind: &'static str, name: impl Into<String>) -> Self {
        Teardown {
            kind,
            name: name.into(),
            action: Action::None,
            settings: Vec::new(),
            reason: None,
            request_id: None,
        }
    }

    /// The resource itself is (or would be) deleted.
    pub fn deleted(&mut self, request_id: Option<String>) {
        self.action = Action::Delete;
        self.request(request_id);
    }

    /// The resource is left in place, for `reason`.
    pub fn left(&mut self, reason: impl Into<String>) {
        self.action = Action::Leave;
        self.reason = Some(reason.into());
    }

    /// The resource was not there (already deleted, or never made).
    pub fn absent(&mut self) {
        self.action = Action::None;
        self.reason = Some("absent".into());
    }

    /// One setting of the resource: `expected` after the teardown, `actual` as found.
    pub fn setting(&mut self, setting: &str, expected: Value, actual: Value, action: Action) {
        self.settings.push(json!({
            "setting": setting, "expected": expected, "actual": actual, "action": action,
        }));
        if action.changes() && self.action == Action::None {
            self.action = Action::Update;
        }
    }

    /// Remembers the request id of a mutating call (the last one wins).
    pub fn request(&mut self, request_id: Option<String>) {
        if request_id.is_some() {
            self.request_id = request_id;
        }
    }

    pub fn action(&self) -> Action {
        self.action
    }

    /// The plan entry / audit detail: `resource {kind, name, action}`, `settings`, and the
    /// reason a resource is left or absent.
    pub fn to_json(&self) -> Value {
        let mut resource = Map::new();
        resource.insert("kind".into(), json!(self.kind));
        resource.insert("name".into(), json!(self.name));
        resource.insert("action".into(), json!(self.action));
        if let Some(reason) = &self.reason {
            resource.insert("reason".into(), json!(reason));
        }
        json!({ "resource": resource, "settings": self.settings })
    }

    /// The audit outcome of a step that applied this report.
    pub fn outcome(&self) -> &'static str {
        match self.action {
            Action::Delete => "deleted",
            Action::Update | Action::Create => "updated",
            Action::Leave => "left",
            Action::None => "already-absent",
        }
    }

    /// The finished step: `output` stored, this report as the audit detail.
    pub fn done<T>(self, output: T) -> StepDone<T> {
        let mut done = StepDone::new(output, self.outcome(), self.to_json());
        done.upstream_request_id = self.request_id;
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_setting_makes_an_update_and_a_deletion_wins() {
        let mut t = Teardown::new("iam-user", "u");
        assert_eq!(t.outcome(), "already-absent");
        t.setting(
            "login_profile",
            json!("absent"),
            json!("present"),
            Action::Delete,
        );
        assert_eq!(t.action(), Action::Update);
        t.deleted(Some("R1".into()));
        let json = t.to_json();
        assert_eq!(
            json["resource"],
            json!({"kind": "iam-user", "name": "u", "action": "delete"})
        );
        assert_eq!(json["settings"][0]["action"], "delete");
        let done = t.done(());
        assert_eq!(done.outcome, "deleted");
        assert_eq!(done.upstream_request_id.as_deref(), Some("R1"));
    }

    #[test]
    fn a_resource_left_in_place_says_why() {
        let mut t = Teardown::new("kube-secret", "ns/s");
        t.left("not managed by backup-provisioner");
        assert_eq!(t.to_json()["resource"]["action"], "leave");
        assert_eq!(t.outcome(), "left");
    }
}
