//! What a runbook step found and did, setting by setting.
//!
//! Every section module (bucket, policy, group, user, secret, the access key's description)
//! reads each runbook setting of its resource, compares it with what the runbook expects, acts
//! only on a difference, and records one [`Setting`] in a [`Report`]:
//!
//! ```json
//! { "setting": "default_encryption", "expected": {..}, "actual": {..}, "action": "update" }
//! ```
//!
//! [`Report::into_step_report`] turns it into the step's audit detail: the step's identifiers,
//! plus
//! - `resource`: `{ "kind", "name", "action" }` (`create`, `update` or `none`);
//! - `settings`: every setting checked, with `expected`, `actual` and `action`
//!   (`none`, `create`, `update`, `delete`, `leave`);
//! - `differences`: the drift found on a resource that existed before the step, in the shape
//!   the audit log has always had (`setting`, `found`, `expected`, `action` = `repaired` or
//!   `left unchanged`, `reason`).
//!
//! Values are identifiers and settings only, never secrets.
//!
//! A report has a [`Mode`]. In [`Mode::Plan`] a section reads everything and records the action
//! it *would* take, without any mutating call: every mutating call goes through
//! [`Report::perform`] (or [`Report::perform_create`] for the creation of a whole resource),
//! which does not even send it in plan mode (a future that is not awaited is never polled).
//! A resource that does not exist is planned as `create` with every setting `create` (the
//! settings of what does not exist are not read). [`Mode::Repair`] changes settings of what
//! exists but never creates a missing resource (verify's `repair`).

use std::future::Future;

use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::cloud::{CloudError, Outcome, StepReport};
use crate::jobs::StepDone;

/// Whether a section changes what differs, only says what it would change, or repairs settings
/// of existing resources without creating missing ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Observe, then change what differs (the provisioning job).
    #[default]
    Apply,
    /// Observe only: record what would be done, make no mutating call (dry runs, verify).
    Plan,
    /// Change the settings of existing resources; a missing resource is reported, not made.
    Repair,
}

impl Mode {
    /// Whether settings of an existing resource are changed.
    pub fn changes_settings(self) -> bool {
        !matches!(self, Mode::Plan)
    }

    /// Whether a missing resource is made.
    pub fn creates(self) -> bool {
        matches!(self, Mode::Apply)
    }

    /// Runs the mutating `call` when this mode changes settings; otherwise drops it unsent.
    /// Returns its request id (none when not sent).
    pub async fn perform<F>(self, call: F) -> Result<Option<String>, CloudError>
    where
        F: Future<Output = Result<Option<String>, CloudError>>,
    {
        if self.changes_settings() {
            call.await
        } else {
            Ok(None)
        }
    }
}

/// What a step did about one setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Found as expected: nothing done.
    None,
    /// Absent: made.
    Create,
    /// Found different: changed to the expected value.
    Update,
    /// Found but not wanted: removed.
    Delete,
    /// Found different and deliberately left as it is (the setting says why).
    Leave,
}

impl Action {
    /// `Create` for a setting that was absent, `Update` for one that had another value.
    pub fn create_or_update(absent: bool) -> Action {
        if absent {
            Action::Create
        } else {
            Action::Update
        }
    }

    /// Whether the action changed the resource.
    pub fn changes(self) -> bool {
        matches!(self, Action::Create | Action::Update | Action::Delete)
    }

    /// The `action` of a `differences` entry.
    fn difference(self) -> &'static str {
        if self.changes() {
            "repaired"
        } else {
            "left unchanged"
        }
    }
}

/// One setting of a resource: what the runbook expects, what was found, what was done.
#[derive(Debug, Clone, Serialize)]
pub struct Setting {
    pub setting: &'static str,
    pub expected: Value,
    pub actual: Value,
    pub action: Action,
    /// Why a difference was left as it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// More about the change (e.g. the policy versions made and deleted).
    #[serde(flatten)]
    pub facts: Map<String, Value>,
    /// Found different on a resource that existed before the step (listed in `differences`);
    /// settings made together with a new resource are not drift.
    #[serde(skip)]
    drift: bool,
}

impl Setting {
    fn difference(&self) -> Value {
        let mut entry = json!({
            "setting": self.setting,
            "found": self.actual,
            "expected": self.expected,
            "action": self.action.difference(),
        });
        if let Some(reason) = self.reason {
            entry["reason"] = json!(reason);
        }
        if let Some(entry) = entry.as_object_mut() {
            entry.extend(self.facts.clone());
        }
        entry
    }
}

/// What one step found and did to its resource.
#[derive(Debug)]
pub struct Report {
    kind: &'static str,
    name: String,
    created: bool,
    settings: Vec<Setting>,
    request_id: Option<String>,
    mode: Mode,
}

impl Report {
    /// A report on the resource `name` of `kind` (e.g. `iam-user`), in [`Mode::Apply`].
    pub fn new(kind: &'static str, name: impl Into<String>) -> Self {
        Self::with_mode(kind, name, Mode::Apply)
    }

    /// A report whose section runs in `mode`.
    pub fn with_mode(kind: &'static str, name: impl Into<String>, mode: Mode) -> Self {
        Report {
            kind,
            name: name.into(),
            created: false,
            settings: Vec::new(),
            request_id: None,
            mode,
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Whether nothing is changed (plan mode).
    pub fn is_plan(&self) -> bool {
        self.mode == Mode::Plan
    }

    /// Runs the mutating `call` unless in plan mode (see [`Mode::perform`]).
    pub async fn perform<F>(&self, call: F) -> Result<Option<String>, CloudError>
    where
        F: Future<Output = Result<Option<String>, CloudError>>,
    {
        self.mode.perform(call).await
    }

    /// Whether a missing resource is made (only in apply mode); otherwise the caller records
    /// it with [`Report::planned_new`].
    pub fn creates(&self) -> bool {
        self.mode.creates()
    }

    /// A missing resource that this mode does not make: `create`, with every setting it would
    /// get (`create`, never read).
    pub fn planned_new(&mut self, settings: &[(&'static str, Value)]) {
        self.created = true;
        for (setting, expected) in settings {
            self.made(setting, expected.clone(), None);
        }
    }

    /// Settings whose action is not `none` (what a verification counts as drift).
    pub fn drift(&self) -> usize {
        self.settings
            .iter()
            .filter(|s| s.action != Action::None)
            .count()
    }

    /// The resource did not exist and was made by this step.
    pub fn created(&mut self, request_id: Option<String>) {
        self.created = true;
        self.request(request_id);
    }

    pub fn was_created(&self) -> bool {
        self.created
    }

    /// Remembers the request id of a mutating call (the last one wins).
    pub fn request(&mut self, request_id: Option<String>) {
        if request_id.is_some() {
            self.request_id = request_id;
        }
    }

    /// The setting is as expected.
    pub fn unchanged(&mut self, setting: &'static str, expected: Value) {
        self.push(setting, expected.clone(), expected, Action::None, false);
    }

    /// The setting was made together with the resource this step created.
    pub fn made(&mut self, setting: &'static str, expected: Value, request_id: Option<String>) {
        self.push(setting, expected, Value::Null, Action::Create, false);
        self.request(request_id);
    }

    /// The setting differed (or was missing) and was repaired with `action`.
    pub fn repaired(
        &mut self,
        setting: &'static str,
        found: Value,
        expected: Value,
        action: Action,
        request_id: Option<String>,
    ) -> &mut Setting {
        self.request(request_id);
        self.push(setting, expected, found, action, true)
    }

    /// The setting differs and is left as it is, for `reason`.
    pub fn left(
        &mut self,
        setting: &'static str,
        found: Value,
        expected: Value,
        reason: &'static str,
    ) {
        self.push(setting, expected, found, Action::Leave, true)
            .reason = Some(reason);
    }

    fn push(
        &mut self,
        setting: &'static str,
        expected: Value,
        actual: Value,
        action: Action,
        drift: bool,
    ) -> &mut Setting {
        self.settings.push(Setting {
            setting,
            expected,
            actual,
            action,
            reason: None,
            facts: Map::new(),
            drift,
        });
        self.settings.last_mut().expect("just pushed")
    }

    pub fn settings(&self) -> &[Setting] {
        &self.settings
    }

    /// What was done: `Created` for a new resource, `Updated` when a setting changed, else
    /// `AlreadyPresent`. In plan mode nothing is done (`AlreadyPresent`), and a missing resource
    /// that repair mode does not make is not `Created`.
    pub fn outcome(&self) -> Outcome {
        let changed = self.settings.iter().any(|s| s.action.changes());
        match self.mode {
            Mode::Plan => Outcome::AlreadyPresent,
            _ if self.created && self.mode.creates() => Outcome::Created,
            _ if changed && !self.created => Outcome::Updated,
            _ => Outcome::AlreadyPresent,
        }
    }

    /// What was done to the resource, or in plan mode what would be.
    fn resource_action(&self) -> Action {
        if self.created {
            Action::Create
        } else if self.settings.iter().any(|s| s.action.changes()) {
            Action::Update
        } else {
            Action::None
        }
    }

    /// The drift found, as the audit log's `differences` list.
    pub fn differences(&self) -> Vec<Value> {
        self.settings
            .iter()
            .filter(|s| s.drift)
            .map(Setting::difference)
            .collect()
    }

    /// The step's report: `identifiers` (an object) plus `resource`, `settings` and
    /// `differences`.
    pub fn into_step_report(self, identifiers: Value) -> StepReport {
        let mut detail = match identifiers {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        let resource = json!({
            "kind": self.kind,
            "name": self.name,
            "action": self.resource_action(),
        });
        detail.insert("resource".into(), resource);
        detail.insert("settings".into(), json!(self.settings));
        detail.insert("differences".into(), json!(self.differences()));
        if self.mode != Mode::Apply {
            detail.insert("mode".into(), json!(self.mode));
        }
        let mut report = StepReport::new(self.outcome(), Value::Object(detail));
        report.upstream_request_id = self.request_id;
        report
    }
}

/// A finished step: its stored output and its audit record.
pub fn done<T>(output: T, report: StepReport) -> StepDone<T> {
    StepDone {
        output,
        outcome: report.outcome.as_str(),
        detail: report.detail,
        upstream_request_id: report.upstream_request_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_carry_expected_actual_and_action() {
        let mut report = Report::new("s3-bucket", "b");
        report.unchanged("object_ownership", json!("BucketOwnerEnforced"));
        report.repaired(
            "tags",
            json!({"k": null}),
            json!({"k": "v"}),
            Action::Update,
            Some("REQ1".into()),
        );
        report.left("versioning", json!("Enabled"), json!("Disabled"), "why");
        assert_eq!(report.outcome(), Outcome::Updated);
        let step = report.into_step_report(json!({ "bucket": "b" }));
        assert_eq!(step.upstream_request_id.as_deref(), Some("REQ1"));
        let detail = step.detail;
        assert_eq!(detail["bucket"], "b");
        assert_eq!(
            detail["resource"],
            json!({"kind": "s3-bucket", "name": "b", "action": "update"})
        );
        assert_eq!(
            detail["settings"][0],
            json!({"setting": "object_ownership", "expected": "BucketOwnerEnforced",
                   "actual": "BucketOwnerEnforced", "action": "none"})
        );
        assert_eq!(detail["settings"][1]["action"], "update");
        assert_eq!(
            detail["differences"],
            json!([
                {"setting": "tags", "found": {"k": null}, "expected": {"k": "v"},
                 "action": "repaired"},
                {"setting": "versioning", "found": "Enabled", "expected": "Disabled",
                 "action": "left unchanged", "reason": "why"}
            ])
        );
    }

    #[test]
    fn settings_made_with_a_new_resource_are_not_drift() {
        let mut report = Report::new("iam-group", "g");
        report.created(Some("REQ1".into()));
        report.made("attached_policy", json!("arn"), Some("REQ2".into()));
        assert_eq!(report.outcome(), Outcome::Created);
        assert!(report.differences().is_empty());
        let step = report.into_step_report(json!({}));
        assert_eq!(step.upstream_request_id.as_deref(), Some("REQ2"));
        assert_eq!(step.detail["resource"]["action"], "create");
        assert_eq!(step.detail["settings"][0]["action"], "create");
    }

    #[tokio::test]
    async fn plan_mode_never_sends_a_mutating_call() {
        let sent = std::sync::atomic::AtomicBool::new(false);
        let call = || async {
            sent.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok(Some("REQ".to_owned()))
        };
        let plan = Report::with_mode("s3-bucket", "b", Mode::Plan);
        assert_eq!(plan.perform(call()).await.unwrap(), None);
        assert!(!sent.load(std::sync::atomic::Ordering::SeqCst));
        let repair = Report::with_mode("s3-bucket", "b", Mode::Repair);
        assert_eq!(
            repair.perform(call()).await.unwrap().as_deref(),
            Some("REQ")
        );
        assert!(sent.load(std::sync::atomic::Ordering::SeqCst));
        assert!(!repair.creates() && Report::new("k", "n").creates());
    }

    #[test]
    fn a_missing_resource_is_planned_with_every_setting() {
        let mut report = Report::with_mode("iam-group", "g", Mode::Plan);
        report.planned_new(&[("attached_policy", json!("arn"))]);
        assert_eq!(report.drift(), 1);
        let step = report.into_step_report(json!({}));
        assert_eq!(step.detail["resource"]["action"], "create");
        assert_eq!(step.detail["settings"][0]["action"], "create");
        assert_eq!(step.detail["mode"], "plan");
        assert_eq!(step.outcome, Outcome::AlreadyPresent, "nothing was made");
        let mut repair = Report::with_mode("iam-user", "u", Mode::Repair);
        repair.planned_new(&[("tags", json!({}))]);
        assert_eq!(
            repair.outcome(),
            Outcome::AlreadyPresent,
            "repair makes nothing"
        );
        let mut repaired = Report::with_mode("iam-user", "u", Mode::Repair);
        repaired.repaired("tags", json!(null), json!({}), Action::Create, None);
        assert_eq!(repaired.outcome(), Outcome::Updated);
    }

    #[test]
    fn a_difference_left_alone_changes_nothing() {
        let mut report = Report::new("iam-policy", "p");
        report.left("path", json!("/x/"), json!("/"), "immutable");
        assert_eq!(report.outcome(), Outcome::AlreadyPresent);
        let facts = &mut Report::new("iam-policy", "p");
        facts
            .repaired("document", json!(1), json!(2), Action::Update, None)
            .facts
            .insert("new_version_id".into(), json!("v2"));
        assert_eq!(facts.differences()[0]["new_version_id"], "v2");
    }
}
