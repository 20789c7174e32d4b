//! How each kind of answer reads as a table: repositories, jobs, audit events and plans.

use serde_json::Value;

use super::table::{Table, cell, cells, fields, page};

const REPOSITORY_FIELDS: &[&str] = &[
    "name",
    "namespace",
    "bucket",
    "region",
    "state",
    "last_error",
    "verified_at",
    "drift_count",
    "created_by",
    "created_at",
    "updated_at",
];

/// One repository: its fields, its last job, then its resources.
pub fn repository(body: &Value) -> String {
    let mut out = fields(body, REPOSITORY_FIELDS);
    let job = &body["last_job"];
    if job.is_object() {
        out.push_str(&format!(
            "last_job    {} {} {}\n",
            cell(&job["id"]),
            cell(&job["kind"]),
            cell(&job["state"])
        ));
    }
    if let Some(resources) = body["resources"].as_object() {
        let mut table = Table::new(&["resource", "identifier"]);
        for (name, value) in resources {
            table.row(vec![name.clone(), cell(value)]);
        }
        out.push('\n');
        out.push_str(&table.render());
    }
    out
}

pub fn repository_page(body: &Value) -> String {
    page(
        body,
        &[
            "name",
            "namespace",
            "bucket",
            "region",
            "state",
            "updated_at",
        ],
    )
}

pub fn job_page(body: &Value) -> String {
    page(
        body,
        &[
            "id",
            "kind",
            "repository",
            "state",
            "attempts",
            "created_by",
            "created_at",
        ],
    )
}

pub fn audit_page(body: &Value) -> String {
    page(
        body,
        &["at", "actor", "repository", "action", "step", "outcome"],
    )
}

/// One job: its fields, then one row per step.
pub fn job(body: &Value) -> String {
    let mut out = fields(
        body,
        &[
            "id",
            "kind",
            "repository",
            "state",
            "attempts",
            "last_error",
            "created_by",
            "created_at",
            "finished_at",
        ],
    );
    let mut steps = Table::new(&["step", "state", "attempts", "duration_ms", "last_error"]);
    for step in body["steps"].as_array().into_iter().flatten() {
        steps.row(cells(
            step,
            &["name", "state", "attempts", "duration_ms", "last_error"],
        ));
    }
    out.push('\n');
    out.push_str(&steps.render());
    out
}

/// A created/queued answer (`{repository, job}`): the repository's state and the job queued.
pub fn queued(body: &Value) -> String {
    let repository = &body["repository"];
    let job = &body["job"];
    format!(
        "repository {} ({})\njob        {} {} {}\n",
        cell(&repository["name"]),
        cell(&repository["state"]),
        cell(&job["id"]),
        cell(&job["kind"]),
        cell(&job["state"])
    )
}

/// A dry run's plan: one row per setting of every resource report found in it.
pub fn plan(body: &Value) -> String {
    let mut table = Table::new(&["resource", "setting", "expected", "actual", "action"]);
    let mut reports = Vec::new();
    collect_reports(&body["plan"], &mut reports);
    for report in reports {
        plan_rows(report, &mut table);
    }
    format!(
        "dry run of {} (nothing changed)\n{}",
        cell(&body["kind"]),
        table.render()
    )
}

fn plan_rows(report: &Value, table: &mut Table) {
    let resource = &report["resource"];
    let name = match (resource["kind"].as_str(), resource["name"].as_str()) {
        (Some(kind), Some(name)) => format!("{kind} {name}"),
        (Some(kind), None) => kind.to_owned(),
        _ => cell(resource),
    };
    let settings = report["settings"].as_array().filter(|s| !s.is_empty());
    let Some(settings) = settings else {
        table.row(vec![
            name,
            "-".into(),
            "-".into(),
            "-".into(),
            cell(&resource["action"]),
        ]);
        return;
    };
    for setting in settings {
        let mut row = vec![name.clone()];
        row.extend(cells(setting, &["setting", "expected", "actual", "action"]));
        table.row(row);
    }
}

/// Every object of `value` (searched depth first) that carries a `resource` report.
fn collect_reports<'a>(value: &'a Value, out: &mut Vec<&'a Value>) {
    match value {
        Value::Object(map) if map.contains_key("resource") => out.push(value),
        Value::Object(map) => map.values().for_each(|v| collect_reports(v, out)),
        Value::Array(items) => items.iter().for_each(|v| collect_reports(v, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_plan_has_one_row_per_setting_and_one_per_resource_without_settings() {
        let body = json!({"dry_run": true, "kind": "verify-repository", "plan": [
            {"resource": {"kind": "bucket", "name": "holos-x-backups", "action": "update"},
             "settings": [{"setting": "versioning", "expected": "Suspended", "actual": null, "action": "none"},
                          {"setting": "tags", "expected": {"a": "b"}, "actual": {}, "action": "update"}]},
            {"nested": {"resource": {"kind": "secret", "name": "s", "action": "create"}, "settings": []}}
        ]});
        let text = plan(&body);
        assert!(text.starts_with("dry run of verify-repository"), "{text}");
        assert!(
            text.contains("bucket holos-x-backups  versioning  Suspended"),
            "{text}"
        );
        assert!(text.contains("{\"a\":\"b\"}"), "{text}");
        assert!(text.contains("secret s"), "{text}");
        assert_eq!(text.lines().count(), 5, "{text}");
    }
}
