//! The PostgresCluster controller: a PostgresCluster (Crunchy PGO,
//! `postgres-operator.crunchydata.com/v1beta1`) annotated with
//! `backup-provisioner.holos.run/bucket` gets its backup repository through the same use case
//! as `POST /v1/backup-repositories` (`provision::request`), as the actor
//! `controller:<BP_CONTROLLER_NAME>`, audited; the repository's progress goes back onto the
//! object as Events and the `…/state` and `…/job` annotations (never `status`: PGO's).
//!
//! Built on kube-rs's runtime: one [`kube::runtime::Controller`] per allowed namespace (the
//! shipped RBAC grants namespaced Roles only; with no allow list, one cluster-wide watch). Its
//! watcher lists, watches, and relists when a watch expires (410 Gone); its reconciles are
//! level-triggered: a start reconciles every object, and a repository that is already as asked
//! answers `Unchanged` (nothing stored, queued, or sent to AWS). Only a change of an object's
//! generation (its spec) or annotations reaches a reconcile: PGO updates `status` often, and
//! each would otherwise cost a reconcile; a repository on its way is followed by the
//! reconcile's own requeue. Jobs run on the workers (`serve` or `worker`), not here.
//! Deletions: [`retention`].
//!
//! One replica runs it: the one holding the session advisory lock [`CONTROLLER_LOCK`] for as
//! long as it watches. The others try again every [`LOCK_RETRY`]; the holder checks its lock's
//! connection as often and stops watching if it is lost (the lock went with it).

mod postgrescluster;
mod reconcile;
pub mod retention;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::{StreamExt as _, TryStreamExt as _};
use kube::Api;
use kube::runtime::controller::{self, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{Predicate as _, PredicateConfig, WatchStreamExt as _, predicates};
use kube::runtime::{reflector, watcher};
use sqlx::PgPool;
use sqlx::pool::PoolConnection;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use postgrescluster::{
    BUCKET_ANNOTATION, GROUP, JOB_ANNOTATION, KIND, PostgresCluster, REGION_ANNOTATION,
    RequestRules, STATE_ANNOTATION, VERSION,
};
pub use reconcile::{ReconcileError, Report};

/// How long the API server keeps one watch open (below the client's read timeout, so a quiet
/// watch ends on the server's terms and is resumed, not cut as a timeout).
const WATCH_TIMEOUT_SECS: u32 = 25;

/// The session advisory lock whose holder runs the controller ("bpctrl01"): two replicas
/// with `BP_WATCH_POSTGRESCLUSTERS=true` would otherwise reconcile, and write Events, twice.
pub const CONTROLLER_LOCK: i64 = 0x6270_6374_726c_3031;

/// How often a replica without [`CONTROLLER_LOCK`] tries to take it, and how often its holder
/// checks that the lock's connection is still there.
pub const LOCK_RETRY: Duration = Duration::from_secs(5);

/// What the controller needs besides its clients.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `BP_CONTROLLER_NAME`: the audit actor is `controller:<name>`; also the field manager of
    /// the annotations and the reporting controller of Events.
    pub name: String,
    /// The namespaces watched (`BP_ALLOWED_NAMESPACES`; empty: every namespace) and the
    /// request rules of the API.
    pub rules: RequestRules,
    /// `BP_CONTROLLER_API_URL`: the API's address as users reach it, for the job annotation
    /// (without it the annotation holds the path `/v1/jobs/<id>`).
    pub api_url: Option<String>,
    /// How often a repository on its way is looked at again.
    pub follow_interval: Duration,
    /// How often links are compared with the clusters the watch holds (deletions missed).
    pub resync_interval: Duration,
    pub max_attempts: i32,
}

impl Settings {
    pub fn actor(&self) -> String {
        format!("controller:{}", self.name)
    }

    pub fn field_manager(&self) -> String {
        format!("{}-controller", self.name)
    }
}

/// Shared by every reconcile.
pub struct Context {
    pub db: PgPool,
    pub client: kube::Client,
    pub recorder: Recorder,
    pub settings: Settings,
    pub actor: String,
    /// Cluster uids whose link is recorded (saves a query per reconcile).
    linked: Mutex<HashSet<String>>,
}

impl Context {
    pub fn new(db: PgPool, client: kube::Client, settings: Settings) -> Self {
        let reporter = Reporter {
            controller: settings.field_manager(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            actor: settings.actor(),
            db,
            client,
            settings,
            linked: Mutex::new(HashSet::new()),
        }
    }

    fn linked_uids(&self) -> MutexGuard<'_, HashSet<String>> {
        self.linked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where a user follows the job `id`.
    pub fn job_url(&self, id: uuid::Uuid) -> String {
        let base = self.settings.api_url.as_deref().unwrap_or_default();
        format!("{}/v1/jobs/{id}", base.trim_end_matches('/'))
    }
}

/// Runs the controller until `shutdown` whenever this replica holds [`CONTROLLER_LOCK`]:
/// one watch per allowed namespace (or one for all).
pub async fn run(
    db: PgPool,
    client: kube::Client,
    settings: Settings,
    shutdown: CancellationToken,
) {
    let ctx = Arc::new(Context::new(db, client, settings));
    let mut waiting_logged = false;
    while !shutdown.is_cancelled() {
        match lead(&ctx, &shutdown).await {
            Ok(true) => waiting_logged = false,
            Ok(false) if !waiting_logged => {
                waiting_logged = true;
                tracing::info!("another replica runs the PostgresCluster controller; waiting");
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "the PostgresCluster controller's lock"),
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(LOCK_RETRY) => {}
        }
    }
}

/// Watches while this replica holds [`CONTROLLER_LOCK`]. `Ok(false)`: another replica holds
/// it; `Ok(true)`: held, then released on shutdown; an error: the lock's connection failed
/// (the session, and so the lock, is gone: the watches stop).
async fn lead(ctx: &Arc<Context>, shutdown: &CancellationToken) -> Result<bool, sqlx::Error> {
    let mut lock = ctx.db.acquire().await?;
    let won: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(CONTROLLER_LOCK)
        .fetch_one(&mut *lock)
        .await?;
    if !won {
        return Ok(false);
    }
    // Never back in the pool holding the lock, should the unlock below not run.
    lock.close_on_drop();
    let stop = shutdown.child_token();
    let watching = tokio::spawn({
        let (ctx, stop) = (ctx.clone(), stop.clone());
        async move {
            // Watches that end on their own (they do not, short of a shutdown) end the hold.
            let _stop_holding = stop.clone().drop_guard();
            watch_all(ctx, stop).await;
        }
    });
    let held = keep_alive(&mut lock, &stop).await;
    stop.cancel();
    let _ = watching.await;
    held?;
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(CONTROLLER_LOCK)
        .execute(&mut *lock)
        .await?;
    Ok(true)
}

/// Until `stop`, checks every [`LOCK_RETRY`] that the lock's session is still there.
async fn keep_alive(
    lock: &mut PoolConnection<sqlx::Postgres>,
    stop: &CancellationToken,
) -> Result<(), sqlx::Error> {
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            () = tokio::time::sleep(LOCK_RETRY) => {}
        }
        sqlx::query("SELECT 1").execute(&mut **lock).await?;
    }
}

/// The watches, until `shutdown`.
async fn watch_all(ctx: Arc<Context>, shutdown: CancellationToken) {
    let namespaces = ctx.settings.rules.allowed_namespaces.clone();
    tracing::info!(
        actor = %ctx.actor,
        namespaces = ?namespaces,
        "watching PostgresClusters"
    );
    let scopes: Vec<Option<String>> = match namespaces.is_empty() {
        true => vec![None],
        false => namespaces.into_iter().map(Some).collect(),
    };
    let watches = scopes
        .into_iter()
        .map(|namespace| watch(ctx.clone(), namespace, shutdown.clone()));
    futures::future::join_all(watches).await;
}

/// One namespace's (or every namespace's) Controller and its retention check. The watch is
/// built here (`watcher` → `reflector`) so that its delete events, which a Controller does not
/// reconcile, and its complete listings wake the retention check; everything else goes to the
/// Controller as usual.
async fn watch(ctx: Arc<Context>, namespace: Option<String>, shutdown: CancellationToken) {
    let api: Api<PostgresCluster> = match &namespace {
        Some(namespace) => Api::namespaced(ctx.client.clone(), namespace),
        None => Api::all(ctx.client.clone()),
    };
    let config = watcher::Config::default().timeout(WATCH_TIMEOUT_SECS);
    let (store, writer) = reflector::store();
    let wake = Arc::new(Notify::new());
    let listed_or_deleted = wake.clone();
    let clusters = watcher(api, config)
        .default_backoff()
        .reflect(writer)
        .inspect_ok(move |event| {
            // A complete listing (the first, or after a relist) or a deletion: compare.
            if let watcher::Event::InitDone | watcher::Event::Delete(_) = event {
                listed_or_deleted.notify_one();
            }
        })
        .applied_objects()
        // A status update (PGO's, often) changes neither: no reconcile. The requeues a
        // reconcile asks for are the Controller's own, and deletions are seen above.
        .predicate_filter(
            predicates::generation.combine(predicates::annotations),
            PredicateConfig::default(),
        );
    let retention = tokio::spawn(retention::run(
        ctx.clone(),
        store.clone(),
        namespace.clone(),
        wake,
        ctx.settings.resync_interval,
        shutdown.clone(),
    ));
    Controller::for_stream(clusters, store)
        .graceful_shutdown_on(shutdown.clone().cancelled_owned())
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|outcome| {
            match outcome {
                // A requeue of an object deleted meanwhile.
                Err(controller::Error::ObjectNotFound(_)) | Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, ?namespace, "postgrescluster controller"),
            }
            std::future::ready(())
        })
        .await;
    let _ = retention.await;
}
