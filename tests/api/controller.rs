//! The PostgresCluster controller (`src/controller`) against the real kube-apiserver of the
//! harness, with PGO's PostgresCluster CRD installed (`tests/fixtures/pgo/postgresclusters-crd.yaml`,
//! trimmed from PGO's published CRD), real moto, and real workers: the controller runs in the
//! test process as the service's ServiceAccount (the Role of `deploy/base/rbac.yaml`), through
//! the recording proxy (`support::kube_proxy`), which also breaks its watches and sends one
//! from a compacted `resourceVersion` so that the server itself answers 410 Gone.

use std::time::Duration;

use backup_provisioner::controller::{
    self, BUCKET_ANNOTATION, JOB_ANNOTATION, PostgresCluster, REGION_ANNOTATION, RequestRules,
    STATE_ANNOTATION, Settings,
};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tokio::sync::OnceCell;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::support::app::eventually;
use crate::support::env::{Env, bucket_for, unique_name};

const DEADLINE: Duration = Duration::from_secs(90);
const ACTOR: &str = "controller:test";

/// Installs the CRD once per kube-apiserver and waits until it is served.
async fn install_crd(admin: &kube::Client) {
    static INSTALLED: OnceCell<()> = OnceCell::const_new();
    INSTALLED
        .get_or_init(|| async {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/pgo/postgresclusters-crd.yaml");
            let text = std::fs::read_to_string(&path).expect("the CRD fixture");
            let crd: Value = serde_saphyr::from_str(&text).expect("CRD YAML");
            let name = crd["metadata"]["name"].as_str().expect("name").to_owned();
            let crds = Api::<CustomResourceDefinition>::all(admin.clone());
            crds.patch(
                &name,
                &PatchParams::apply("test-harness").force(),
                &Patch::Apply(&crd),
            )
            .await
            .expect("installing the PostgresCluster CRD");
            eventually(
                DEADLINE,
                "the PostgresCluster CRD is established",
                || async {
                    let crd = crds.get(&name).await.ok()?;
                    let conditions = crd.status?.conditions?;
                    conditions
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                        .then_some(())
                },
            )
            .await;
        })
        .await;
}

/// An environment with the CRD installed, and the controller it starts and stops.
struct ControllerEnv {
    env: Env,
    running: Option<(CancellationToken, JoinHandle<()>)>,
}

impl ControllerEnv {
    async fn start() -> ControllerEnv {
        let mut this = Self::without_controller().await;
        this.start_controller();
        this
    }

    /// The environment and the CRD; the controller runs elsewhere (the binary).
    async fn without_controller() -> ControllerEnv {
        let env = Env::start(&["zitadel"]).await;
        install_crd(&env.kube.admin()).await;
        ControllerEnv { env, running: None }
    }

    fn settings(&self) -> Settings {
        Settings {
            name: "test".into(),
            rules: RequestRules {
                allowed_namespaces: vec![self.ns().to_owned()],
                bucket_pattern: regex::Regex::new(
                    backup_provisioner::domain::DEFAULT_BUCKET_PATTERN,
                )
                .unwrap(),
                default_region: self.env.region.clone(),
            },
            api_url: Some(self.env.app.url("")),
            follow_interval: Duration::from_millis(200),
            resync_interval: Duration::from_secs(3600),
            max_attempts: 5,
        }
    }

    /// Starts the controller as the service (its ServiceAccount, through the proxy).
    fn start_controller(&mut self) {
        assert!(self.running.is_none(), "already running");
        let shutdown = CancellationToken::new();
        let run = controller::run(
            self.env.app.db.clone(),
            self.env.kube.service_client(),
            self.settings(),
            shutdown.clone(),
        );
        self.running = Some((shutdown, tokio::spawn(run)));
    }

    /// Stops the controller and waits until it has.
    async fn stop_controller(&mut self) {
        let (shutdown, handle) = self.running.take().expect("running");
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), handle)
            .await
            .expect("the controller stopped")
            .expect("the controller did not panic");
    }

    fn ns(&self) -> &str {
        self.env.ns("zitadel")
    }

    fn clusters(&self) -> Api<PostgresCluster> {
        Api::namespaced(self.env.kube.admin(), self.ns())
    }

    /// The path of the namespace's PostgresClusters (what the controller lists and watches).
    fn clusters_path(&self) -> String {
        format!(
            "/apis/postgres-operator.crunchydata.com/v1beta1/namespaces/{}/postgresclusters",
            self.ns()
        )
    }

    /// Creates a PostgresCluster as an administrator would, with `annotations`.
    async fn create_cluster(&self, name: &str, annotations: Value) {
        let cluster: PostgresCluster = serde_json::from_value(json!({
            "apiVersion": "postgres-operator.crunchydata.com/v1beta1",
            "kind": "PostgresCluster",
            "metadata": {"name": name, "namespace": self.ns(), "annotations": annotations},
            "spec": {
                "postgresVersion": 16,
                "instances": [{"name": "pgha1", "replicas": 1}],
                "backups": {"pgbackrest": {"repos": [{"name": "repo1"}]}}
            }
        }))
        .unwrap();
        self.clusters()
            .create(&PostParams::default(), &cluster)
            .await
            .unwrap_or_else(|e| panic!("creating PostgresCluster {name}: {e}"));
    }

    async fn annotations(&self, name: &str) -> std::collections::BTreeMap<String, String> {
        let cluster = self
            .clusters()
            .get(name)
            .await
            .expect("the PostgresCluster");
        cluster.metadata.annotations.unwrap_or_default()
    }

    /// Waits until the cluster's state annotation is `state`; returns its annotations.
    async fn wait_for_state(
        &self,
        name: &str,
        state: &str,
    ) -> std::collections::BTreeMap<String, String> {
        eventually(DEADLINE, &format!("{name} annotated {state}"), || async {
            let annotations = self.annotations(name).await;
            (annotations.get(STATE_ANNOTATION).map(String::as_str) == Some(state))
                .then_some(annotations)
        })
        .await
    }

    /// The Events about the cluster `name` (events.k8s.io/v1).
    async fn events(&self, name: &str) -> Vec<Event> {
        let events: Api<Event> = Api::namespaced(self.env.kube.admin(), self.ns());
        events
            .list(&ListParams::default())
            .await
            .expect("events")
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .collect()
    }

    async fn jobs_of(&self, name: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE subject_name = $1")
            .bind(name)
            .fetch_one(&self.env.app.db)
            .await
            .expect("count jobs")
    }

    async fn audit_actions(&self, name: &str) -> Vec<(String, String)> {
        sqlx::query_as(
            "SELECT action, outcome FROM audit_events
              WHERE repository = $1 AND actor = $2 ORDER BY id",
        )
        .bind(name)
        .bind(ACTOR)
        .fetch_all(&self.env.app.db)
        .await
        .expect("audit entries")
    }
}

fn annotated(bucket: &str) -> Value {
    json!({ BUCKET_ANNOTATION: bucket })
}

#[tokio::test]
async fn an_annotated_postgrescluster_gets_a_ready_repository_and_others_get_none() {
    let env = ControllerEnv::start().await;
    let name = unique_name("pgc");
    let bucket = bucket_for(&name);
    let plain = unique_name("plain");
    let invalid = unique_name("bad");
    env.create_cluster(&name, annotated(&bucket)).await;
    env.create_cluster(&plain, json!({})).await;
    env.create_cluster(
        &invalid,
        json!({ BUCKET_ANNOTATION: "Not_A_Bucket", REGION_ANNOTATION: "mars-1" }),
    )
    .await;

    // A repository of the same name made through the API with another bucket: a conflict.
    let taken = unique_name("taken");
    let response = env
        .env
        .app
        .post_json(
            "/v1/backup-repositories",
            &env.env.app.operator(),
            &json!({"name": taken, "namespace": env.ns()}),
        )
        .await;
    assert_eq!(response.status(), 202);
    env.create_cluster(&taken, annotated(&bucket_for(&format!("{taken}-other"))))
        .await;

    let annotations = env.wait_for_state(&name, "ready").await;
    let repository = env.env.repository(&name).await;
    assert_eq!(repository["state"], "ready", "{repository:#}");
    assert_eq!(repository["namespace"], env.ns());
    assert_eq!(repository["bucket"], bucket.as_str());
    assert_eq!(repository["created_by"], ACTOR);
    let job_id = repository["last_job"]["id"].as_str().expect("a job");
    assert_eq!(
        annotations.get(JOB_ANNOTATION),
        Some(&env.env.app.url(&format!("/v1/jobs/{job_id}")))
    );
    assert!(
        env.env.s3_conf("zitadel", &bucket).await.is_some(),
        "the Secret"
    );
    let audit = env.audit_actions(&name).await;
    assert!(
        audit.contains(&("repository.create".into(), "created".into())),
        "the request is audited as the controller: {audit:?}"
    );
    let events = eventually(DEADLINE, "the RepositoryReady Event", || async {
        let events = env.events(&name).await;
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some("RepositoryReady"))
            .then_some(events)
    })
    .await;
    assert!(
        events.iter().all(|e| e.type_.as_deref() == Some("Normal")),
        "{events:?}"
    );

    // The bad annotations: a Warning naming both, no repository.
    let warning = eventually(DEADLINE, "the InvalidAnnotation Event", || async {
        env.events(&invalid)
            .await
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("InvalidAnnotation"))
    })
    .await;
    assert_eq!(warning.type_.as_deref(), Some("Warning"));
    let note = warning.note.unwrap_or_default();
    assert!(
        note.contains(BUCKET_ANNOTATION) && note.contains(REGION_ANNOTATION),
        "{note}"
    );
    assert_eq!(
        env.wait_for_state(&invalid, "invalid")
            .await
            .get(JOB_ANNOTATION),
        None
    );
    env.wait_for_state(&taken, "conflict").await;
    let conflict = eventually(DEADLINE, "the RepositoryConflict Event", || async {
        env.events(&taken)
            .await
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("RepositoryConflict"))
    })
    .await;
    assert_eq!(conflict.type_.as_deref(), Some("Warning"));
    let note = conflict.note.unwrap_or_default();
    assert!(note.contains("bucket"), "{note}");
    assert_eq!(env.jobs_of(&taken).await, 1, "only the API's job");
    for other in [&plain, &invalid] {
        let response = env
            .env
            .app
            .get(
                &format!("/v1/backup-repositories/{other}"),
                &env.env.app.viewer(),
            )
            .await;
        assert_eq!(response.status(), 404, "{other} has no repository");
        assert_eq!(env.jobs_of(other).await, 0);
    }
    // The unannotated cluster is left alone; PGO's status is never written.
    assert!(!env.annotations(&plain).await.contains_key(STATE_ANNOTATION));
    let requests = env.env.kube.requests();
    let clusters_path = env.clusters_path();
    assert!(
        requests
            .iter()
            .all(|r| !(r.path.starts_with(&clusters_path) && r.path.ends_with("/status"))),
        "the controller never writes status"
    );
    let patched: Vec<_> = requests
        .iter()
        .filter(|r| r.path.starts_with(&clusters_path) && r.method == "PATCH")
        .map(|r| r.path.rsplit('/').next().unwrap_or_default().to_owned())
        .collect();
    assert!(!patched.contains(&plain), "{patched:?}");
}

#[tokio::test]
async fn restarts_midway_and_after_ready_converge_without_duplicates_or_calls() {
    let mut env = ControllerEnv::start().await;
    let name = unique_name("rst");
    let bucket = bucket_for(&name);
    env.create_cluster(&name, annotated(&bucket)).await;
    // Stop the controller while the job runs (the workers go on), then start it again.
    eventually(DEADLINE, "the repository's job started", || async {
        let repository = env.env.repository(&name).await;
        ["pending", "provisioning"]
            .contains(&repository["state"].as_str().unwrap_or_default())
            .then_some(())
    })
    .await;
    env.stop_controller().await;
    env.start_controller();
    env.wait_for_state(&name, "ready").await;
    assert_eq!(env.jobs_of(&name).await, 1, "one job");
    let created = env
        .audit_actions(&name)
        .await
        .into_iter()
        .filter(|(action, _)| action == "repository.create")
        .count();
    assert_eq!(created, 1, "one request");

    // A restart with the repository ready: the controller reconciles the cluster (it writes
    // back the state annotation an administrator removed) and makes no AWS call, no job.
    env.stop_controller().await;
    env.env.counter.reset();
    let removed = json!({"metadata": {"annotations": {STATE_ANNOTATION: null}}});
    env.clusters()
        .patch(&name, &PatchParams::default(), &Patch::Merge(&removed))
        .await
        .expect("removing the state annotation");
    env.start_controller();
    env.wait_for_state(&name, "ready").await;
    assert_eq!(
        env.env.counter.snapshot(),
        Default::default(),
        "no AWS call"
    );
    assert_eq!(env.jobs_of(&name).await, 1, "no new job");
}

#[tokio::test]
async fn a_watch_that_expires_is_relisted_and_what_changed_meanwhile_converges() {
    let env = ControllerEnv::start().await;
    let path = env.clusters_path();
    let proxy = &env.env.kube.proxy;
    eventually(DEADLINE, "the controller watches", || async {
        (!proxy.watches(&path).is_empty()).then_some(())
    })
    .await;
    // Break the watch: the controller's next watch is held while a cluster is created, then
    // sent from a compacted resourceVersion, which the server answers 410 Gone.
    let mut held = proxy.hold(crate::support::kube_proxy::Hold::next("GET", &path));
    proxy.cut_watches();
    let request = tokio::time::timeout(DEADLINE, held.recv())
        .await
        .expect("the controller watches again")
        .expect("a held request");
    let name = unique_name("gap");
    env.create_cluster(&name, annotated(&bucket_for(&name)))
        .await;
    proxy.expire_next_watch(&path);
    let before = proxy.requests().len();
    drop(request);

    env.wait_for_state(&name, "ready").await;
    let after: Vec<_> = proxy.requests().into_iter().skip(before).collect();
    let stale = format!(
        "resourceVersion={}",
        crate::support::kube_proxy::STALE_RESOURCE_VERSION
    );
    let expired = after
        .iter()
        .position(|r| r.path == path && r.query.split('&').any(|p| p == stale))
        .unwrap_or_else(|| panic!("the stale watch was sent: {after:#?}"));
    let expired_record = &after[expired];
    // What the server answers such a watch (here asked directly, as admin): 200 and one
    // ERROR event, 410 Expired ("too old resource version").
    let stale_rv = crate::support::kube_proxy::STALE_RESOURCE_VERSION;
    let first = {
        use futures::StreamExt as _;
        let watch = env
            .clusters()
            .watch(&kube::api::WatchParams::default().timeout(5), stale_rv)
            .await
            .expect("a watch");
        Box::pin(watch).next().await
    };
    match first {
        Some(Ok(kube::api::WatchEvent::Error(status))) => {
            assert_eq!(status.code, 410, "{status:?}")
        }
        Some(Err(kube::Error::Api(status))) => assert_eq!(status.code, 410, "{status:?}"),
        other => panic!("the server did not expire the watch: {other:?}"),
    }
    let relisted = after[expired + 1..].iter().any(|r| {
        r.method == "GET" && r.path == path && !crate::support::kube_proxy::is_watch(&r.query)
    });
    assert!(
        relisted,
        "after the 410 ({expired_record:?}) the controller lists again: {after:#?}"
    );
    assert_eq!(env.jobs_of(&name).await, 1);
}

#[tokio::test]
async fn deleting_a_postgrescluster_keeps_the_repository_and_is_audited() {
    let mut env = ControllerEnv::start().await;
    let watched = unique_name("del");
    let offline = unique_name("off");
    for name in [&watched, &offline] {
        env.create_cluster(name, annotated(&bucket_for(name))).await;
    }
    for name in [&watched, &offline] {
        env.wait_for_state(name, "ready").await;
    }
    let db = env.env.app.db.clone();
    let deleted = |name: String| {
        let db = db.clone();
        move || {
            let (db, name) = (db.clone(), name.clone());
            async move {
                let outcome: Option<String> = sqlx::query_scalar(
                    "SELECT outcome FROM audit_events
                      WHERE repository = $1 AND actor = $2 AND action = 'postgrescluster.deleted'",
                )
                .bind(&name)
                .bind(ACTOR)
                .fetch_optional(&db)
                .await
                .expect("audit");
                outcome
            }
        }
    };
    // Seen on the watch.
    env.clusters()
        .delete(&watched, &DeleteParams::default())
        .await
        .expect("delete");
    let outcome = eventually(DEADLINE, "the deletion audited", deleted(watched.clone())).await;
    assert_eq!(outcome, "repository-retained");
    // Deleted while the controller was stopped: recorded when it starts again.
    env.stop_controller().await;
    env.clusters()
        .delete(&offline, &DeleteParams::default())
        .await
        .expect("delete");
    env.start_controller();
    eventually(
        DEADLINE,
        "the offline deletion audited",
        deleted(offline.clone()),
    )
    .await;

    for name in [&watched, &offline] {
        let repository = env.env.repository(name).await;
        assert_eq!(repository["state"], "ready", "{repository:#}");
        let bucket = bucket_for(name);
        env.env
            .admin
            .s3
            .head_bucket()
            .bucket(&bucket)
            .send()
            .await
            .unwrap_or_else(|e| panic!("bucket {bucket} kept: {e:?}"));
        assert!(
            env.env.s3_conf("zitadel", &bucket).await.is_some(),
            "Secret kept"
        );
        let user = repository["resources"]["user"].as_str().expect("user");
        env.env
            .admin
            .iam
            .get_user()
            .user_name(user)
            .send()
            .await
            .expect("IAM user kept");
        let entries = env
            .audit_actions(name)
            .await
            .into_iter()
            .filter(|(action, _)| action == "postgrescluster.deleted")
            .count();
        assert_eq!(entries, 1, "{name}: audited once");
        assert_eq!(env.jobs_of(name).await, 1, "{name}: no deprovisioning job");
    }
}

/// The binary: `serve` with `BP_WATCH_POSTGRESCLUSTERS=true` runs the controller next to the
/// API and workers (as the ServiceAccount, through the proxy, from a kubeconfig), and
/// `controller` refuses a bad setting naming its variable (exit 2).
#[tokio::test]
async fn serve_runs_the_controller_when_asked_and_the_subcommand_checks_its_settings() {
    use crate::support::service_process::{ServiceProcess, ServiceSpec};
    let env = ControllerEnv::without_controller().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, env.env.kube.service_kubeconfig("zitadel")).expect("kubeconfig");
    let spec = ServiceSpec::new(
        "serve-controller",
        &["serve"],
        &env.env.app.database_url,
        &env.env.encryption_key,
        &env.env.moto_endpoint,
        &kubeconfig,
    )
    .env("BP_WATCH_POSTGRESCLUSTERS", "true")
    .env("BP_ALLOWED_NAMESPACES", env.ns())
    .env(
        "BP_CONTROLLER_API_URL",
        "https://backup-provisioner.example.com",
    );
    let mut service = ServiceProcess::spawn(dir.path(), &spec).await;
    let name = unique_name("srv");
    env.create_cluster(&name, annotated(&bucket_for(&name)))
        .await;
    let annotations = env.wait_for_state(&name, "ready").await;
    let job = annotations.get(JOB_ANNOTATION).expect("the job annotation");
    assert!(
        job.starts_with("https://backup-provisioner.example.com/v1/jobs/"),
        "{job}"
    );
    let repository = env.env.repository(&name).await;
    assert_eq!(repository["created_by"], "controller:backup-provisioner");
    assert!(
        service.log().contains("watching PostgresClusters"),
        "{}",
        service.log()
    );
    service
        .terminate(Duration::from_secs(20))
        .await
        .expect("stopped on SIGTERM");

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_backup-provisioner"))
        .arg("controller")
        .env_clear()
        .env("DATABASE_URL", &env.env.app.database_url)
        .env("BP_CONTROLLER_FOLLOW_INTERVAL", "0s")
        .output()
        .expect("run the binary");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("BP_CONTROLLER_FOLLOW_INTERVAL"), "{stderr}");
}
