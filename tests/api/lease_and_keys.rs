//! Issue 8, "Behave on real AWS, Kubernetes and Postgres": no database transaction or row lock
//! is held across an AWS call, a worker that cannot renew its lease stops before it expires, and
//! an access key the Secret references is deleted only once its replacement is in the Secret.
//!
//! The service's IAM calls pass an [`IamGate`]: a chosen call waits, before it is sent, until the
//! test has looked at the world (Postgres locks, IAM keys, the Secret) at exactly that moment.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpClient,
    SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::HttpRequest;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_runtime_api::shared::IntoShared;
use backup_provisioner::cloud::aws::AwsClients;
use backup_provisioner::crypto::EncryptionKey;
use backup_provisioner::provision::{access_key, sealed};
use serde_json::json;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::support::env::{Env, bucket_for, conf_value, unique_name};
use crate::support::tcp_proxy::Forwarder;

const NAMESPACE: &str = "lease-keys";
const DEADLINE: Duration = Duration::from_secs(90);
/// How long a held call may show a lock or an open transaction before the test fails: less
/// than the service sessions' `idle_in_transaction_session_timeout` (`db::SESSION_SETTINGS`).
const PROBE_WINDOW: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// The IAM gate
// ---------------------------------------------------------------------------------------------

/// An IAM call held by the gate before it is sent; dropping the event lets the call go on.
struct GateEvent {
    action: String,
    access_key_id: Option<String>,
    _release: oneshot::Sender<()>,
}

/// Holds the service's IAM requests of the given actions (while armed) until the test drops
/// the [`GateEvent`] it receives for each. It wraps the SDK's HTTP client, so a held request is
/// a future awaiting the test: the job's other steps (branches of the same task) go on running,
/// as they would while a real request is in flight.
#[derive(Debug, Clone)]
struct IamGate {
    actions: &'static [&'static str],
    armed: Arc<AtomicBool>,
    events: UnboundedSender<GateEvent>,
    inner: SharedHttpClient,
}

impl IamGate {
    /// The event for `request` if the gate holds it: armed, and one of the gated actions.
    fn hold(&self, request: &HttpRequest) -> Option<(GateEvent, oneshot::Receiver<()>)> {
        if !self.armed.load(Ordering::SeqCst) {
            return None;
        }
        let body = request.body().bytes()?;
        let form: Vec<(String, String)> = url::form_urlencoded::parse(body).into_owned().collect();
        let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let action = field("Action").filter(|a| self.actions.contains(&a.as_str()))?;
        let (release, released) = oneshot::channel();
        let event = GateEvent {
            action,
            access_key_id: field("AccessKeyId"),
            _release: release,
        };
        Some((event, released))
    }
}

impl HttpClient for IamGate {
    fn http_connector(
        &self,
        settings: &HttpConnectorSettings,
        components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        SharedHttpConnector::new(GatedConnector {
            gate: self.clone(),
            inner: self.inner.http_connector(settings, components),
        })
    }
}

#[derive(Debug)]
struct GatedConnector {
    gate: IamGate,
    inner: SharedHttpConnector,
}

impl HttpConnector for GatedConnector {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let held = self.gate.hold(&request);
        let events = self.gate.events.clone();
        let inner = self.inner.clone();
        HttpConnectorFuture::new(async move {
            if let Some((event, released)) = held
                && events.send(event).is_ok()
            {
                // Err once the test drops the event: that is the release.
                let _ = released.await;
            }
            inner.call(request).await
        })
    }
}

/// The test's side of an [`IamGate`].
struct Gate {
    armed: Arc<AtomicBool>,
    events: UnboundedReceiver<GateEvent>,
}

impl Gate {
    /// A gate for `actions` (disarmed) and the map that puts it on the service's IAM client.
    fn new(
        actions: &'static [&'static str],
    ) -> (Gate, impl FnOnce(AwsClients) -> AwsClients + 'static) {
        let (events, receiver) = unbounded_channel();
        let armed = Arc::new(AtomicBool::new(false));
        let armed_for_client = armed.clone();
        let map = move |mut aws: AwsClients| {
            let inner = aws
                .iam
                .config()
                .http_client()
                .unwrap_or_else(backup_provisioner::cloud::rate_limit::default_https_client);
            let gate = IamGate {
                actions,
                armed: armed_for_client,
                events,
                inner,
            };
            let gate: SharedHttpClient = gate.into_shared();
            let config = aws.iam.config().to_builder().http_client(gate);
            aws.iam = aws_sdk_iam::Client::from_conf(config.build());
            aws
        };
        let gate = Gate {
            armed,
            events: receiver,
        };
        (gate, map)
    }

    fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Drives `job` to its end; every gated call meanwhile waits until `check` has seen it.
    async fn run<T>(
        &mut self,
        job: impl Future<Output = T>,
        mut check: impl AsyncFnMut(&GateEvent),
    ) -> T {
        let mut job = std::pin::pin!(job);
        loop {
            tokio::select! {
                out = &mut job => return out,
                Some(event) = self.events.recv() => check(&event).await,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Defect 2: no transaction or row lock across an AWS call
// ---------------------------------------------------------------------------------------------

/// While the access-key step is inside CreateAccessKey, the job's row is not locked (cancel,
/// the rescuer and heartbeats can take it) and no connection of the service sits idle in a
/// transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_row_lock_or_transaction_is_held_across_create_access_key() {
    let (mut gate, map) = Gate::new(&["CreateAccessKey"]);
    let env = Env::builder(&[NAMESPACE])
        .workers(1)
        .map_service_aws(map)
        .start()
        .await;
    gate.arm();
    let name = unique_name("lock");
    let job_id = queue_repository(&env, &name).await;
    let mut probed = 0;
    let job = gate
        .run(
            env.app.wait_for_job(&job_id.to_string(), DEADLINE),
            async |_| {
                probed += 1;
                assert_row_lockable(&env, job_id).await;
            },
        )
        .await;
    assert_eq!(probed, 1, "the step made one CreateAccessKey call");
    assert_eq!(job["state"], "succeeded", "{job}");
    env.app.stop().await;
}

/// Queues a repository through the API; returns its job id.
async fn queue_repository(env: &Env, name: &str) -> Uuid {
    let body = json!({ "name": name, "namespace": env.ns(NAMESPACE) });
    let response = env
        .app
        .post_json("/v1/backup-repositories", &env.app.operator(), &body)
        .await;
    assert_eq!(response.status(), 202);
    let created: serde_json::Value = response.json().await.expect("json");
    Uuid::parse_str(created["job"]["id"].as_str().expect("job id")).expect("uuid")
}

/// While the call is held, a moment comes when another connection can lock the job's row at
/// once and no other session of the test's database is idle inside a transaction. The job's
/// other steps run on meanwhile (their short transactions may be seen open at any one instant),
/// but a transaction or lock held across the call would last as long as the gate holds it,
/// so it would never let that moment come. The wait stays well under the service's
/// `idle_in_transaction_session_timeout` (10 s), which would otherwise end such a transaction
/// and let the moment come after all.
async fn assert_row_lockable(env: &Env, job_id: Uuid) {
    let until = tokio::time::Instant::now() + PROBE_WINDOW;
    loop {
        let Err(holder) = probe_row_and_transactions(env, job_id).await else {
            return;
        };
        assert!(
            tokio::time::Instant::now() < until,
            "held across CreateAccessKey for the whole of the call: {holder}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One look: Err names the row lock or the idle transactions seen.
async fn probe_row_and_transactions(env: &Env, job_id: Uuid) -> Result<(), String> {
    let mut probe = env.app.db.begin().await.expect("begin");
    let locked = sqlx::query("SELECT id FROM jobs WHERE id = $1 FOR UPDATE NOWAIT")
        .bind(job_id)
        .fetch_one(&mut *probe)
        .await;
    if let Err(e) = &locked {
        let code = e.as_database_error().and_then(|d| d.code());
        return Err(format!("the job's row is locked ({code:?}): {e}"));
    }
    let idle_in_tx: Vec<String> = sqlx::query_scalar(
        "SELECT coalesce(query, '') FROM pg_stat_activity
          WHERE datname = current_database() AND pid <> pg_backend_pid()
            AND state LIKE 'idle in transaction%'",
    )
    .fetch_all(&mut *probe)
    .await
    .expect("pg_stat_activity");
    probe.rollback().await.expect("rollback");
    match idle_in_tx.is_empty() {
        true => Ok(()),
        false => Err(format!("sessions idle in a transaction: {idle_in_tx:?}")),
    }
}

// ---------------------------------------------------------------------------------------------
// Defect 4: make before break
// ---------------------------------------------------------------------------------------------

/// A provisioned repository (its Secret references key A) whose IAM calls pass a gate on
/// CreateAccessKey and DeleteAccessKey, armed after the first provisioning.
struct Replacement {
    env: Env,
    gate: Gate,
    name: String,
    bucket: String,
    old_key: String,
}

/// What the gate saw of one IAM call.
#[derive(Debug, Clone)]
struct Seen {
    action: String,
    /// The key a DeleteAccessKey named.
    key: Option<String>,
    /// The user's keys in IAM at that moment.
    keys_in_iam: Vec<String>,
    /// The key the Secret referenced at that moment.
    secret_key: String,
}

impl Replacement {
    async fn start(prefix: &str) -> Replacement {
        let (gate, map) = Gate::new(&["CreateAccessKey", "DeleteAccessKey"]);
        let env = Env::builder(&[NAMESPACE])
            .workers(1)
            .map_service_aws(map)
            .start()
            .await;
        let name = unique_name(prefix);
        let bucket = bucket_for(&name);
        let job = env
            .provision(json!({ "name": name, "namespace": env.ns(NAMESPACE) }))
            .await;
        assert_eq!(job["state"], "succeeded", "{job}");
        gate.arm();
        let mut r = Replacement {
            env,
            gate,
            name,
            bucket,
            old_key: String::new(),
        };
        r.old_key = r.secret_key().await;
        assert_eq!(r.keys_in_iam().await, vec![r.old_key.clone()]);
        r
    }

    async fn secret_key(&self) -> String {
        let conf = self
            .env
            .s3_conf(NAMESPACE, &self.bucket)
            .await
            .expect("s3.conf");
        conf_value(&conf, "repo2-s3-key")
    }

    async fn keys_in_iam(&self) -> Vec<String> {
        access_key::list(&self.env.admin.iam, &self.bucket)
            .await
            .expect("list keys")
            .into_iter()
            .map(|k| k.id)
            .collect()
    }

    /// Reconciles the repository and records every gated call.
    async fn reconcile(&mut self) -> Vec<Seen> {
        let mut seen = Vec::new();
        let (env, gate, bucket) = (&self.env, &mut self.gate, &self.bucket);
        let job = gate
            .run(env.reconcile(&self.name), async |event: &GateEvent| {
                let conf = env.s3_conf(NAMESPACE, bucket).await.expect("s3.conf");
                let keys = access_key::list(&env.admin.iam, bucket)
                    .await
                    .expect("list");
                seen.push(Seen {
                    action: event.action.clone(),
                    key: event.access_key_id.clone(),
                    keys_in_iam: keys.into_iter().map(|k| k.id).collect(),
                    secret_key: conf_value(&conf, "repo2-s3-key"),
                });
            })
            .await;
        assert_eq!(job["state"], "succeeded", "{job}");
        seen
    }

    /// After the job: only the new key is left, the Secret references it, and only its
    /// description tag remains.
    async fn assert_only_new_key(&self) -> String {
        let new_key = self.secret_key().await;
        assert_ne!(new_key, self.old_key, "the key was not replaced");
        assert_eq!(self.keys_in_iam().await, vec![new_key.clone()]);
        let tags: Vec<String> =
            backup_provisioner::provision::user::list_tags(&self.env.admin.iam, &self.bucket)
                .await
                .expect("tags")
                .into_iter()
                .filter(|(_, v)| v == access_key::DESCRIPTION)
                .map(|(k, _)| k)
                .collect();
        assert_eq!(tags, vec![new_key.clone()], "description tags");
        new_key
    }
}

/// No DeleteAccessKey ever names the key the Secret references at that moment.
fn assert_no_referenced_key_deleted(seen: &[Seen]) {
    for call in seen.iter().filter(|s| s.action == "DeleteAccessKey") {
        assert_ne!(
            call.key.as_deref(),
            Some(call.secret_key.as_str()),
            "DeleteAccessKey of the key the Secret still references; calls: {seen:#?}"
        );
    }
}

/// The Secret references key A; A is deactivated by hand, so it must be replaced. The new key
/// is created while A still exists, and A is deleted only once the Secret references the new
/// key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deactivated_key_is_replaced_make_before_break() {
    let mut r = Replacement::start("mbb-inactive").await;
    r.env
        .admin
        .iam
        .update_access_key()
        .user_name(&r.bucket)
        .access_key_id(&r.old_key)
        .status(aws_sdk_iam::types::StatusType::Inactive)
        .send()
        .await
        .expect("deactivate key A");
    let seen = r.reconcile().await;
    let creates: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.action == "CreateAccessKey")
        .collect();
    assert_eq!(
        creates.len(),
        1,
        "one new key replaces the deactivated one; calls: {seen:#?}"
    );
    assert_eq!(
        creates[0].keys_in_iam,
        vec![r.old_key.clone()],
        "key A still exists when the new key is created"
    );
    assert_eq!(creates[0].secret_key, r.old_key);
    assert_no_referenced_key_deleted(&seen);
    let new_key = r.assert_only_new_key().await;
    let deletes: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.action == "DeleteAccessKey")
        .collect();
    assert_eq!(deletes.len(), 1, "{seen:#?}");
    assert_eq!(deletes[0].key.as_deref(), Some(r.old_key.as_str()));
    assert_eq!(deletes[0].secret_key, new_key);
    r.env.app.stop().await;
}

/// The Secret references key A, and a key B made by an earlier attempt is held (sealed) but
/// has not reached the Secret yet. B is delivered, and A is deleted only after the Secret
/// references B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_key_reaches_the_secret_before_the_referenced_key_is_deleted() {
    let mut r = Replacement::start("mbb-held").await;
    let held = access_key::create(&r.env.admin.iam, &r.bucket)
        .await
        .expect("create key B");
    let repository_id: Uuid =
        sqlx::query_scalar("SELECT id FROM backup_repositories WHERE name = $1")
            .bind(&r.name)
            .fetch_one(&r.env.app.db)
            .await
            .expect("repository");
    let key = EncryptionKey::from_base64(&r.env.encryption_key).expect("key");
    let mut conn = r.env.app.db.acquire().await.expect("connection");
    sealed::put(
        &mut conn,
        // `into`: the keyring the sealed store takes (or the key itself).
        &key.into(),
        repository_id,
        sealed::Kind::AccessKey,
        &held.id,
        &held.secret,
    )
    .await
    .expect("seal key B");
    drop(conn);
    let seen = r.reconcile().await;
    assert!(
        seen.iter().all(|s| s.action != "CreateAccessKey"),
        "the held key is used, no key is made: {seen:#?}"
    );
    assert_no_referenced_key_deleted(&seen);
    assert_eq!(r.assert_only_new_key().await, held.id);
    r.env.app.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Defect 3: a worker that cannot renew its lease stops before it expires
// ---------------------------------------------------------------------------------------------

const TICKER: &str = "lease-ticker";

/// A job kind that works until it is stopped: every tick stands for one AWS call and leaves a
/// row in `lease_ticks`; when the job's future is dropped, its attempt and the time are sent.
struct Ticker {
    stopped: UnboundedSender<(i32, chrono::DateTime<chrono::Utc>)>,
}

struct StopGuard {
    attempt: i32,
    stopped: UnboundedSender<(i32, chrono::DateTime<chrono::Utc>)>,
}

impl Drop for StopGuard {
    fn drop(&mut self) {
        let _ = self.stopped.send((self.attempt, chrono::Utc::now()));
    }
}

#[async_trait::async_trait]
impl backup_provisioner::jobs::JobHandler for Ticker {
    fn kind(&self) -> &'static str {
        TICKER
    }

    async fn run(
        &self,
        ctx: &backup_provisioner::jobs::JobContext,
    ) -> Result<(), backup_provisioner::jobs::JobError> {
        let attempt = ctx.job().attempts;
        let _guard = StopGuard {
            attempt,
            stopped: self.stopped.clone(),
        };
        loop {
            sqlx::query("INSERT INTO lease_ticks (attempt, at) VALUES ($1, clock_timestamp())")
                .bind(attempt)
                .execute(ctx.pool())
                .await?;
            // The pace of the work, not a synchronisation.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The heartbeats of a worker go through a forwarder that is then black-holed (its jobs' own
/// connections still work): the job must be stopped before its lease expires, so no work (no
/// AWS call) happens once the rescuer may hand the job to another worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_cannot_renew_its_lease_stops_before_it_expires() {
    let lease = Duration::from_secs(6);
    let mut cut = CutOffWorker::start(lease).await;
    let job_id = enqueue_ticker(&cut.db.pool).await;
    let lease_at_claim = lease_expiry_once_running(&cut.db.pool, job_id).await;
    // A renewal went through the forwarder: heartbeats use it.
    crate::support::app::eventually(DEADLINE, "a heartbeat to renew the lease", || async {
        (lease_expiry(&cut.db.pool, job_id).await > lease_at_claim).then_some(())
    })
    .await;
    cut.forwarder.pause(true);
    let paused_at = chrono::Utc::now();

    let stop = tokio::time::timeout(2 * lease, cut.stops.recv()).await;
    let Ok(Some((attempt, stopped_at))) = stop else {
        panic!(
            "the job kept working although its lease could not be renewed for {:?}",
            2 * lease
        );
    };
    assert_eq!(attempt, 1);
    let expiry = lease_expiry(&cut.db.pool, job_id).await;
    let last_tick: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT max(at) FROM lease_ticks WHERE attempt = 1")
            .fetch_one(&cut.db.pool)
            .await
            .expect("ticks");
    assert!(
        stopped_at > paused_at,
        "stopped before the heartbeats were cut off"
    );
    assert!(
        stopped_at < expiry && last_tick < expiry,
        "work after the lease expired at {expiry}: stopped at {stopped_at}, last tick at {last_tick}"
    );
    let (state, locked_by): (String, Option<String>) =
        sqlx::query_as("SELECT state, locked_by FROM jobs WHERE id = $1")
            .bind(job_id)
            .fetch_one(&cut.db.pool)
            .await
            .expect("job");
    assert_eq!(
        (state.as_str(), locked_by.as_deref()),
        ("running", Some("cut-off")),
        "the worker wrote nothing after it stopped; the rescuer takes the job once the lease expires"
    );
    eprintln!(
        "lease {lease:?}: heartbeats cut off at {paused_at}, job stopped at {stopped_at}, \
         last tick {last_tick}, lease expired at {expiry}"
    );
    cut.stop().await;
}

/// A worker pool running [`Ticker`] jobs whose heartbeats pass a [`Forwarder`].
struct CutOffWorker {
    db: crate::support::app::TestDb,
    forwarder: Forwarder,
    stops: UnboundedReceiver<(i32, chrono::DateTime<chrono::Utc>)>,
    shutdown: tokio_util::sync::CancellationToken,
    workers: tokio::task::JoinHandle<Result<(), sqlx::Error>>,
}

impl CutOffWorker {
    async fn start(lease: Duration) -> CutOffWorker {
        use backup_provisioner::jobs::{Registry, WorkerConfig, WorkerPool};
        let db = crate::support::app::migrated_db().await;
        sqlx::query("CREATE TABLE lease_ticks (attempt integer NOT NULL, at timestamptz NOT NULL)")
            .execute(&db.pool)
            .await
            .expect("ticks table");
        let (forwarder, heartbeats) = heartbeats_through_forwarder(&db.url).await;
        let config = WorkerConfig {
            concurrency: 1,
            lease,
            // No rescue or polling while the test looks: the lease stays as the worker left it.
            poll_interval: Duration::from_secs(120),
            retry_base: Duration::from_millis(50),
            shutdown_grace: Duration::from_secs(1),
            worker_id: "cut-off".to_owned(),
        };
        let (stopped, stops) = unbounded_channel();
        let registry = Registry::new().register(Ticker { stopped });
        let shutdown = tokio_util::sync::CancellationToken::new();
        let workers = tokio::spawn(
            WorkerPool::new(db.pool.clone(), registry, config)
                .with_heartbeat_pool(heartbeats)
                .run(shutdown.clone()),
        );
        CutOffWorker {
            db,
            forwarder,
            stops,
            shutdown,
            workers,
        }
    }

    async fn stop(self) {
        self.forwarder.pause(false);
        self.shutdown.cancel();
        let stopped = tokio::time::timeout(Duration::from_secs(30), self.workers).await;
        assert!(
            matches!(stopped, Ok(Ok(Ok(())))),
            "the worker pool stopped: {stopped:?}"
        );
    }
}

/// A forwarder to the database at `database_url` and a pool of two connections through it.
async fn heartbeats_through_forwarder(database_url: &str) -> (Forwarder, sqlx::PgPool) {
    let (forwarder, url) = Forwarder::for_database(database_url).await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(1))
        .connect(&url)
        .await
        .expect("heartbeat pool through the forwarder");
    (forwarder, pool)
}

async fn enqueue_ticker(db: &sqlx::PgPool) -> Uuid {
    use backup_provisioner::jobs::queue::{self, NewJob};
    let mut tx = db.begin().await.expect("begin");
    let job = NewJob {
        kind: TICKER,
        subject: None,
        payload: json!({}),
        max_attempts: 5,
        created_by: "test@lease",
    };
    let id = queue::enqueue(&mut tx, job).await.expect("enqueue");
    tx.commit().await.expect("commit");
    id
}

async fn lease_expiry(db: &sqlx::PgPool, job_id: Uuid) -> chrono::DateTime<chrono::Utc> {
    sqlx::query_scalar("SELECT lease_expires_at FROM jobs WHERE id = $1")
        .bind(job_id)
        .fetch_one(db)
        .await
        .expect("lease")
}

/// Waits until the job is claimed; returns the expiry of the lease its claim set.
async fn lease_expiry_once_running(
    db: &sqlx::PgPool,
    job_id: Uuid,
) -> chrono::DateTime<chrono::Utc> {
    crate::support::app::eventually(DEADLINE, "the job to be claimed", || async {
        let row: (String, Option<chrono::DateTime<chrono::Utc>>) =
            sqlx::query_as("SELECT state, lease_expires_at FROM jobs WHERE id = $1")
                .bind(job_id)
                .fetch_one(db)
                .await
                .expect("job");
        (row.0 == "running").then_some(row.1).flatten()
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// The pool: bounded transactions, locks, statements; dead peers noticed
// ---------------------------------------------------------------------------------------------

/// Every connection of the service's pool starts with bounds on idle transactions, lock waits
/// and statements, and server-side TCP keepalives; the pool is sized from the worker count.
#[tokio::test]
async fn the_pool_bounds_idle_transactions_lock_waits_and_statements() {
    let db = crate::support::app::migrated_db().await;
    let url = secrecy::SecretString::from(db.url.clone());
    let options = backup_provisioner::db::options(&url).expect("url");
    let pool = backup_provisioner::db::connect(options, 8)
        .await
        .expect("pool");
    let settings: std::collections::BTreeMap<String, String> = sqlx::query_as(
        "SELECT name, current_setting(name) FROM pg_settings
          WHERE name IN ('idle_in_transaction_session_timeout', 'lock_timeout',
                         'statement_timeout', 'tcp_keepalives_idle',
                         'tcp_keepalives_interval', 'tcp_keepalives_count', 'tcp_user_timeout')",
    )
    .fetch_all(&pool)
    .await
    .expect("settings")
    .into_iter()
    .collect();
    eprintln!(
        "pool: max {} connections; session settings {settings:?}",
        pool.options().get_max_connections()
    );
    for (name, value) in &settings {
        assert!(
            !["0", "0ms"].contains(&value.as_str()),
            "{name} is not set: {settings:?}"
        );
    }
    assert_eq!(settings.len(), 7, "{settings:?}");
    assert_eq!(
        pool.options().get_max_connections(),
        backup_provisioner::db::pool_size(8)
    );
    pool.close().await;
}

/// A session that sits idle inside a transaction (a client that hung or was cut off) is ended
/// by the server, and its row lock with it. The URL shortens the timeout for the test.
#[tokio::test]
async fn a_session_idle_in_a_transaction_loses_its_row_lock() {
    let db = crate::support::app::migrated_db().await;
    sqlx::query("CREATE TABLE lease_rows (id integer PRIMARY KEY)")
        .execute(&db.pool)
        .await
        .expect("table");
    sqlx::query("INSERT INTO lease_rows VALUES (1)")
        .execute(&db.pool)
        .await
        .expect("row");
    let url = format!(
        "{}?options=-c%20idle_in_transaction_session_timeout%3D300ms",
        db.url
    );
    let options = backup_provisioner::db::options(&secrecy::SecretString::from(url)).expect("url");
    let pool = backup_provisioner::db::connect(options, 1)
        .await
        .expect("pool");
    let mut stuck = pool.begin().await.expect("begin");
    sqlx::query("SELECT id FROM lease_rows WHERE id = 1 FOR UPDATE")
        .execute(&mut *stuck)
        .await
        .expect("lock");
    crate::support::app::eventually(DEADLINE, "the idle session's lock to go", || async {
        let mut probe = db.pool.begin().await.expect("begin");
        let free = sqlx::query("SELECT id FROM lease_rows WHERE id = 1 FOR UPDATE NOWAIT")
            .execute(&mut *probe)
            .await
            .is_ok();
        free.then_some(())
    })
    .await;
    assert!(
        stuck.commit().await.is_err(),
        "the server ended the idle session"
    );
}
