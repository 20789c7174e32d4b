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
//! level-triggered: a start or a relist reconciles every object, and a repository that is
//! already as asked answers `Unchanged` (nothing stored, queued, or sent to AWS). Jobs run on
//! the workers (`serve` or `worker`), not here. Deletions: [`retention`].

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
use kube::runtime::{WatchStreamExt as _, reflector, watcher};
use sqlx::PgPool;
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

/// Runs the controller until `shutdown`: one watch per allowed namespace (or one for all).
pub async fn run(
    db: PgPool,
    client: kube::Client,
    settings: Settings,
    shutdown: CancellationToken,
) {
    let namespaces = settings.rules.allowed_namespaces.clone();
    let ctx = Arc::new(Context::new(db, client, settings));
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
        .applied_objects();
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
