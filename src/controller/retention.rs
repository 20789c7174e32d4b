//! Deleting a PostgresCluster deletes nothing: the repository, its bucket (the backups), IAM
//! and the Secret stay, as the runbook's retention asks. What the controller owes is the
//! record: an audit entry `postgrescluster.deleted` ("postgrescluster deleted, repository
//! retained"), once per cluster.
//!
//! Why no finalizer: one would make every deletion wait for the controller (a controller that
//! is down, uninstalled or no longer allowed in the namespace would leave PostgresClusters
//! stuck terminating, PGO's cleanup included) only to write an audit entry. Instead the
//! controller records which cluster (by uid) it linked to which repository (`postgrescluster.link`,
//! once per cluster), and compares the links with the clusters the watch holds: when a watch
//! delete arrives, and every `BP_CONTROLLER_RESYNC_INTERVAL` (which also covers deletions that
//! happened while the controller was stopped or its watch was broken and relisted). A cluster
//! linked and no longer there is recorded as deleted, once (the audit log is the memory; the
//! check and the write hold a transaction-scoped advisory lock on the cluster's uid).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::Context;
use super::postgrescluster::PostgresCluster;
use crate::audit::{self, AuditEntry};

pub const LINK_ACTION: &str = "postgrescluster.link";
pub const DELETED_ACTION: &str = "postgrescluster.deleted";

/// Records (once per cluster uid) that `cluster` asks for the repository `repository_id`.
pub async fn link(
    ctx: &Context,
    cluster: &PostgresCluster,
    repository_id: Uuid,
) -> Result<(), sqlx::Error> {
    let Some(uid) = cluster.uid() else {
        return Ok(());
    };
    if ctx.linked_uids().contains(&uid) {
        return Ok(());
    }
    let entry = AuditEntry {
        actor: ctx.actor.clone(),
        subject: cluster.metadata.name.clone(),
        action: LINK_ACTION.into(),
        outcome: "linked".into(),
        detail: json!({
            "uid": uid, "namespace": cluster.namespace(), "name": cluster.name_any(),
            "repository_id": repository_id,
            "kind": PostgresCluster::kind(&()), "api_version": PostgresCluster::api_version(&()),
        }),
        ..Default::default()
    };
    once_per_uid(ctx, &uid, &entry).await?;
    ctx.linked_uids().insert(uid);
    Ok(())
}

/// Appends `entry` unless this controller already recorded its action for the cluster `uid`.
async fn once_per_uid(ctx: &Context, uid: &str, entry: &AuditEntry) -> Result<bool, sqlx::Error> {
    let mut tx = ctx.db.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('bp-postgrescluster:' || $1))")
        .bind(uid)
        .execute(&mut *tx)
        .await?;
    let recorded: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM audit_events
                         WHERE actor = $1 AND action = $2 AND detail->>'uid' = $3)",
    )
    .bind(&entry.actor)
    .bind(&entry.action)
    .bind(uid)
    .fetch_one(&mut *tx)
    .await?;
    if !recorded {
        audit::record(&mut *tx, entry).await?;
    }
    tx.commit().await?;
    Ok(!recorded)
}

/// A cluster this controller linked and has not recorded as deleted.
#[derive(Debug, sqlx::FromRow)]
struct Link {
    repository: Option<String>,
    detail: serde_json::Value,
}

/// Records as deleted every cluster linked in `namespace` (None: any) that `present` (the uids
/// the watch holds) no longer has; returns how many it recorded.
pub async fn audit_deletions(
    ctx: &Context,
    namespace: Option<&str>,
    present: &HashSet<String>,
) -> Result<usize, sqlx::Error> {
    let links: Vec<Link> = sqlx::query_as(
        "SELECT l.repository, l.detail FROM audit_events l
          WHERE l.actor = $1 AND l.action = $2
            AND ($3::text IS NULL OR l.detail->>'namespace' = $3)
            AND NOT EXISTS (SELECT 1 FROM audit_events d
                             WHERE d.actor = $1 AND d.action = $4
                               AND d.detail->>'uid' = l.detail->>'uid')
          ORDER BY l.id",
    )
    .bind(&ctx.actor)
    .bind(LINK_ACTION)
    .bind(namespace)
    .bind(DELETED_ACTION)
    .fetch_all(&ctx.db)
    .await?;
    let mut recorded = 0;
    for link in links {
        let uid = link.detail["uid"].as_str().unwrap_or_default().to_owned();
        if uid.is_empty() || present.contains(&uid) {
            continue;
        }
        let mut detail = link.detail.clone();
        detail["note"] = "postgrescluster deleted, repository retained".into();
        let entry = AuditEntry {
            actor: ctx.actor.clone(),
            subject: link.repository,
            action: DELETED_ACTION.into(),
            outcome: "repository-retained".into(),
            detail,
            ..Default::default()
        };
        if once_per_uid(ctx, &uid, &entry).await? {
            tracing::info!(%uid, cluster = %link.detail["name"], "postgrescluster deleted, repository retained");
            recorded += 1;
        }
        ctx.linked_uids().remove(&uid);
    }
    Ok(recorded)
}

/// Compares links with `store` on every `wake` (the watch's first and every later complete
/// listing, and its delete events) and every `every` after the first listing, until
/// `shutdown`. (Not `Store::wait_until_ready`: its readiness wakes one waiter only, the
/// Controller's.)
pub async fn run(
    ctx: Arc<Context>,
    store: Store<PostgresCluster>,
    namespace: Option<String>,
    wake: Arc<Notify>,
    every: Duration,
    shutdown: CancellationToken,
) {
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = wake.notified() => {}
    }
    loop {
        let present: HashSet<String> = store.state().iter().filter_map(|c| c.uid()).collect();
        if let Err(e) = audit_deletions(&ctx, namespace.as_deref(), &present).await {
            tracing::warn!(error = %e, "recording deleted postgresclusters failed; retrying later");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(every) => {}
        }
    }
}
