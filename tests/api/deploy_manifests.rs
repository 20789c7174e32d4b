//! The deploy manifests (`deploy/`, README.md there), rendered as an operator renders them
//! (`kubectl kustomize` of the base and of each example overlay, by
//! `scripts/render-manifests.sh`) and checked twice:
//!
//! - **By Kubernetes.** Every rendered object goes through a server-side dry run with strict
//!   field validation on the real kube-apiserver of the tests (its own schemas: an unknown or
//!   misspelt field, a wrong type or an invalid value fails), the ExternalSecrets against a
//!   CustomResourceDefinition of ours (`tests/fixtures/deploy/externalsecret-crd.yaml`). The pod
//!   templates of the Deployment and the Job are also dry-run created as Pods in the service's
//!   namespace, whose Pod Security Admission label enforces the `restricted` profile.
//! - **By reading them.** The security settings (non-root, no privilege escalation, read-only
//!   root, all capabilities dropped, seccomp RuntimeDefault, requests and limits), the probes,
//!   two replicas, the PodDisruptionBudget, the NetworkPolicy, nothing cluster-wide, Roles that
//!   grant exactly the verbs of `deploy/base/rbac.yaml` (those `kube_rbac` proves necessary) in
//!   exactly the namespaces of `BP_ALLOWED_NAMESPACES`, settings the binary reads, and owner
//!   credentials that only the migration Job sees.
//! - **By running them.** The real binary, with the rendered settings and a Secret of the
//!   rendered shape, as the manifests' ServiceAccount, becomes ready and stops on SIGTERM
//!   within the Deployment's termination grace period.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::{Scope, pinned_kind};
use regex::Regex;
use serde_json::{Value, json};

use crate::support::kube_apiserver::KubeApiserver;
use crate::support::rbac::Rbac;
use crate::support::service_process::{ServiceProcess, ServiceSpec};

/// What the tests render, relative to `deploy/`.
const TARGETS: [&str; 3] = ["base", "overlays/example", "overlays/example-plain-secret"];
/// The service's namespace, named by every manifest.
const NAMESPACE: &str = "backup-provisioner";
/// The image every container runs (its tag is an overlay's choice).
const IMAGE: &str = "ghcr.io/holos-run/backup-provisioner:";
/// The field manager of the dry runs.
const MANAGER: &str = "deploy-manifests-test";
/// Keys that hold secrets: never in the ConfigMap.
const SECRET_KEYS: [&str; 5] = [
    "DATABASE_URL",
    "BP_MIGRATION_DATABASE_URL",
    "BP_ENCRYPTION_KEY",
    "BP_PREVIOUS_ENCRYPTION_KEYS",
    "BP_JWT_HS256_SECRET",
];

/// One rendering: the target and its objects.
struct Rendered {
    target: &'static str,
    objects: Vec<Value>,
}

impl Rendered {
    fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.objects.iter().filter(|o| o["kind"] == kind).collect()
    }

    fn one(&self, kind: &str, name: &str) -> &Value {
        let found: Vec<&Value> = self
            .of_kind(kind)
            .into_iter()
            .filter(|o| o["metadata"]["name"] == name)
            .collect();
        assert_eq!(found.len(), 1, "{}: {kind} {name}: {found:?}", self.target);
        found[0]
    }

    fn deployment(&self) -> &Value {
        self.one("Deployment", "backup-provisioner")
    }

    fn job(&self) -> &Value {
        self.one("Job", "backup-provisioner-migrate")
    }

    /// The settings ConfigMap (its name carries kustomize's hash suffix).
    fn settings(&self) -> &Value {
        let maps = self.of_kind("ConfigMap");
        assert_eq!(maps.len(), 1, "{}: {maps:?}", self.target);
        assert!(name(maps[0]).starts_with("backup-provisioner-settings-"));
        maps[0]
    }

    fn setting(&self, key: &str) -> String {
        self.settings()["data"][key]
            .as_str()
            .unwrap_or_else(|| panic!("{}: no {key} in the ConfigMap", self.target))
            .to_owned()
    }
}

fn name(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap_or_default()
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// Every target, rendered once per process.
fn rendered() -> &'static [Rendered] {
    static RENDERED: OnceLock<Vec<Rendered>> = OnceLock::new();
    RENDERED.get_or_init(|| {
        // A copy of deploy/ with the plain-Secret overlay's env files made from its examples,
        // as an operator makes them.
        let copy = tempfile::tempdir().expect("temp dir");
        copy_dir(&deploy_dir(), copy.path());
        let plain = copy.path().join("overlays/example-plain-secret");
        for file in ["runtime.env", "migration.env"] {
            std::fs::copy(plain.join(format!("{file}.example")), plain.join(file))
                .expect("copying an env example");
        }
        TARGETS
            .iter()
            .map(|target| Rendered {
                target,
                objects: kustomize(&copy.path().join(target)),
            })
            .collect()
    })
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// `scripts/render-manifests.sh <dir>` (`kubectl kustomize`, or a pinned kustomize where
/// kubectl is missing), parsed.
fn kustomize(dir: &Path) -> Vec<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/render-manifests.sh");
    let output = Command::new("bash")
        .arg(&script)
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        output.status.success(),
        "rendering {}: {}\n{}",
        dir.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("UTF-8");
    let objects: Vec<Value> = serde_saphyr::from_multiple(&text).expect("YAML");
    assert!(!objects.is_empty(), "{} renders nothing", dir.display());
    objects
}

// ---- read from the rendered objects ----

#[test]
fn every_rendering_has_the_service_objects_and_nothing_cluster_wide() {
    for r in rendered() {
        for (kind, name) in [
            ("Namespace", NAMESPACE),
            ("ServiceAccount", "backup-provisioner"),
            ("Deployment", "backup-provisioner"),
            ("Service", "backup-provisioner"),
            ("PodDisruptionBudget", "backup-provisioner"),
            ("NetworkPolicy", "backup-provisioner"),
            ("NetworkPolicy", "backup-provisioner-migrate"),
            ("Job", "backup-provisioner-migrate"),
        ] {
            r.one(kind, name);
        }
        r.settings();
        for object in &r.objects {
            let kind = object["kind"].as_str().unwrap_or_default();
            assert!(
                !kind.starts_with("Cluster") && kind != "CustomResourceDefinition",
                "{}: {kind} {} is cluster-wide",
                r.target,
                name(object)
            );
            let namespace = object["metadata"]["namespace"].as_str();
            assert_eq!(
                kind == "Namespace",
                namespace.is_none(),
                "{}: {kind} {} must name its namespace (no namespace transformer)",
                r.target,
                name(object)
            );
        }
    }
}

/// The pod specs of a rendering: the Deployment's and the Job's.
fn pod_specs(r: &Rendered) -> Vec<(&'static str, &Value)> {
    vec![
        ("Deployment", &r.deployment()["spec"]["template"]["spec"]),
        ("Job", &r.job()["spec"]["template"]["spec"]),
    ]
}

fn containers(pod: &Value) -> Vec<&Value> {
    ["initContainers", "containers"]
        .iter()
        .flat_map(|k| pod[*k].as_array().into_iter().flatten())
        .collect()
}

#[test]
fn every_container_runs_restricted_with_requests_and_limits() {
    for r in rendered() {
        for (owner, pod) in pod_specs(r) {
            let at = format!("{} {owner}", r.target);
            let pod_context = &pod["securityContext"];
            assert_eq!(pod_context["runAsNonRoot"], true, "{at}");
            assert!(pod_context["runAsUser"].as_i64().unwrap_or(0) > 0, "{at}");
            assert_eq!(
                pod_context["seccompProfile"]["type"], "RuntimeDefault",
                "{at}"
            );
            for key in ["hostNetwork", "hostPID", "hostIPC"] {
                assert!(pod[key].is_null() || pod[key] == false, "{at}: {key}");
            }
            assert!(
                pod["volumes"].is_null(),
                "{at}: the service needs no volume"
            );
            for container in containers(pod) {
                check_container(&format!("{at} {}", container["name"]), container);
            }
        }
    }
}

fn check_container(at: &str, c: &Value) {
    let context = &c["securityContext"];
    assert_eq!(context["runAsNonRoot"], true, "{at}");
    assert_eq!(context["allowPrivilegeEscalation"], false, "{at}");
    assert_eq!(context["readOnlyRootFilesystem"], true, "{at}");
    assert!(
        context["privileged"].is_null() || context["privileged"] == false,
        "{at}"
    );
    assert_eq!(context["capabilities"], json!({"drop": ["ALL"]}), "{at}");
    assert_eq!(context["seccompProfile"]["type"], "RuntimeDefault", "{at}");
    for bound in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                c["resources"][bound][resource].is_string(),
                "{at}: resources.{bound}.{resource}"
            );
        }
    }
    let image = c["image"].as_str().unwrap_or_default();
    let tag = image.strip_prefix(IMAGE).unwrap_or_default();
    assert!(!tag.is_empty() && tag != "latest", "{at}: image {image}");
}

#[test]
fn two_replicas_are_probed_served_spread_and_kept_through_disruptions() {
    for r in rendered() {
        let at = r.target;
        let deployment = r.deployment();
        let labels = &deployment["spec"]["template"]["metadata"]["labels"];
        assert_eq!(deployment["spec"]["replicas"], 2, "{at}");
        assert_eq!(
            &deployment["spec"]["selector"]["matchLabels"], labels,
            "{at}"
        );
        assert_eq!(
            deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0,
            "{at}"
        );
        let pod = &deployment["spec"]["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], "backup-provisioner", "{at}");
        let container = &pod["containers"][0];
        assert_eq!(container["args"], json!(["serve"]), "{at}");
        assert_eq!(
            container["ports"],
            json!([{"name": "http", "containerPort": 8080, "protocol": "TCP"}]),
            "{at}"
        );
        assert_eq!(r.setting("BP_LISTEN_ADDR"), "0.0.0.0:8080", "{at}");
        for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
            let get = &container[probe]["httpGet"];
            assert_eq!(get["path"], path, "{at} {probe}");
            assert_eq!(get["port"], "http", "{at} {probe}");
        }
        let service = r.one("Service", "backup-provisioner");
        assert_eq!(&service["spec"]["selector"], labels, "{at}");
        assert_eq!(service["spec"]["ports"][0]["targetPort"], "http", "{at}");
        assert_eq!(service["spec"]["type"], "ClusterIP", "{at}");
        let budget = r.one("PodDisruptionBudget", "backup-provisioner");
        assert_eq!(budget["spec"]["minAvailable"], 1, "{at}");
        assert_eq!(&budget["spec"]["selector"]["matchLabels"], labels, "{at}");
    }
}

#[test]
fn the_network_policy_admits_callers_to_the_api_and_lets_out_only_what_the_service_reaches() {
    for r in rendered() {
        let at = r.target;
        let policy = &r.one("NetworkPolicy", "backup-provisioner")["spec"];
        let labels = &r.deployment()["spec"]["template"]["metadata"]["labels"];
        assert_eq!(&policy["podSelector"]["matchLabels"], labels, "{at}");
        assert_eq!(policy["policyTypes"], json!(["Ingress", "Egress"]), "{at}");
        let ingress = policy["ingress"].as_array().expect("ingress rules");
        for rule in ingress {
            assert_eq!(
                rule["ports"],
                json!([{"port": "http", "protocol": "TCP"}]),
                "{at}"
            );
            assert!(rule["from"].is_array(), "{at}: ingress from anywhere");
        }
        assert_eq!(
            egress_ports(policy),
            port_set(&[
                (53, "UDP"),
                (53, "TCP"),
                (5432, "TCP"),
                (443, "TCP"),
                (6443, "TCP")
            ]),
            "{at}: DNS, Postgres, AWS and the Kubernetes API only"
        );
    }
}

/// The migration Job holds the owner's credentials: no ingress at all, egress to DNS and
/// Postgres only.
#[test]
fn the_migration_job_is_reachable_by_nothing_and_reaches_only_dns_and_postgres() {
    for r in rendered() {
        let at = r.target;
        let policy = &r.one("NetworkPolicy", "backup-provisioner-migrate")["spec"];
        let job = r.one("Job", "backup-provisioner-migrate");
        let labels = &job["spec"]["template"]["metadata"]["labels"];
        for (key, value) in policy["podSelector"]["matchLabels"]
            .as_object()
            .expect("labels")
        {
            assert_eq!(
                &labels[key], value,
                "{at}: the policy selects the Job's pod"
            );
        }
        assert_eq!(policy["policyTypes"], json!(["Ingress", "Egress"]), "{at}");
        assert_eq!(policy["ingress"], json!([]), "{at}: no ingress");
        assert_eq!(
            egress_ports(policy),
            port_set(&[(53, "UDP"), (53, "TCP"), (5432, "TCP")]),
            "{at}: DNS and Postgres only"
        );
    }
}

/// Every (port, protocol) a NetworkPolicy's egress rules name; each rule must name ports.
fn egress_ports(policy: &Value) -> BTreeSet<(i64, String)> {
    let mut ports = BTreeSet::new();
    for rule in policy["egress"].as_array().expect("egress rules") {
        for port in rule["ports"]
            .as_array()
            .expect("every egress rule names ports")
        {
            ports.insert((
                port["port"].as_i64().expect("numeric"),
                port["protocol"].as_str().unwrap_or_default().to_owned(),
            ));
        }
    }
    ports
}

fn port_set(ports: &[(i64, &str)]) -> BTreeSet<(i64, String)> {
    ports
        .iter()
        .map(|(p, proto)| (*p, (*proto).to_owned()))
        .collect()
}

/// The Roles and RoleBindings of a rendering: each Role grants the rules of
/// `deploy/base/rbac.yaml`, each is bound to the service's ServiceAccount, and their
/// namespaces are exactly those of `BP_ALLOWED_NAMESPACES`.
fn check_roles(r: &Rendered) -> Result<(), String> {
    let expected_rules = serde_json::to_value(Rbac::shipped().rules()).expect("json");
    let allowed: BTreeSet<String> = r
        .setting("BP_ALLOWED_NAMESPACES")
        .split(',')
        .map(|n| n.trim().to_owned())
        .collect();
    let account =
        json!([{"kind": "ServiceAccount", "name": "backup-provisioner", "namespace": NAMESPACE}]);
    let mut role_namespaces = BTreeSet::new();
    for role in r.of_kind("Role") {
        let ns = role["metadata"]["namespace"].as_str().unwrap_or_default();
        if role["rules"] != expected_rules {
            return Err(format!(
                "the Role in {ns} differs from deploy/base/rbac.yaml's"
            ));
        }
        role_namespaces.insert(ns.to_owned());
        let bound = r.of_kind("RoleBinding").into_iter().any(|b| {
            b["metadata"]["namespace"] == ns
                && b["roleRef"]["name"] == role["metadata"]["name"]
                && b["subjects"] == account
        });
        if !bound {
            return Err(format!(
                "no RoleBinding of the Role to the ServiceAccount in {ns}"
            ));
        }
    }
    if role_namespaces != allowed {
        return Err(format!(
            "Roles in {role_namespaces:?}, BP_ALLOWED_NAMESPACES {allowed:?}"
        ));
    }
    if r.of_kind("RoleBinding").len() != role_namespaces.len() || allowed.contains(NAMESPACE) {
        return Err("a RoleBinding without its Role, or the service's own namespace".into());
    }
    Ok(())
}

#[test]
fn roles_grant_the_proven_verbs_on_secrets_exactly_in_the_allowed_namespaces() {
    for r in rendered() {
        check_roles(r).unwrap_or_else(|e| panic!("{}: {e}", r.target));
    }
    let mut verbs = Rbac::shipped().secret_verbs();
    verbs.sort();
    assert_eq!(verbs, ["create", "delete", "get", "patch"]);
}

#[test]
fn a_role_missing_widened_or_not_in_the_allowed_namespaces_is_caught() {
    let example = &rendered()[1];
    let edited = |edit: &dyn Fn(&mut Vec<Value>)| {
        let mut objects = example.objects.clone();
        edit(&mut objects);
        check_roles(&Rendered {
            target: "edited",
            objects,
        })
        .unwrap_err()
    };
    let is_role_in = |o: &Value, ns: &str| o["kind"] == "Role" && o["metadata"]["namespace"] == ns;
    let err = edited(&|objects| objects.retain(|o| !is_role_in(o, "example-app")));
    assert!(err.contains("BP_ALLOWED_NAMESPACES"), "{err}");
    let err = edited(&|objects| {
        let role = objects
            .iter_mut()
            .find(|o| is_role_in(o, "holos"))
            .expect("a Role");
        role["rules"][0]["verbs"]
            .as_array_mut()
            .expect("verbs")
            .push(json!("list"));
    });
    assert!(err.contains("differs"), "{err}");
    let err = edited(&|objects| {
        let binding = objects
            .iter_mut()
            .find(|o| o["kind"] == "RoleBinding" && o["metadata"]["namespace"] == "zitadel")
            .expect("a RoleBinding");
        binding["subjects"][0]["name"] = json!("default");
    });
    assert!(err.contains("no RoleBinding"), "{err}");
}

/// Every environment variable the binary reads (any subcommand), as clap declares them.
fn variables_the_binary_reads() -> BTreeSet<String> {
    use clap::CommandFactory as _;
    fn walk(command: &clap::Command, into: &mut BTreeSet<String>) {
        for arg in command.get_arguments() {
            if let Some(env) = arg.get_env() {
                into.insert(env.to_string_lossy().into_owned());
            }
        }
        for sub in command.get_subcommands() {
            walk(sub, into);
        }
    }
    let mut variables = BTreeSet::new();
    walk(&backup_provisioner::config::Cli::command(), &mut variables);
    // Read by the AWS SDK and the log filter, not by clap.
    variables.extend(["AWS_REGION".to_owned(), "RUST_LOG".to_owned()]);
    variables
}

/// The keys of the runtime and migration Secrets as the rendering makes them: a generated
/// Secret's data, or an ExternalSecret's `data` (its `dataFrom` keys are the remote secret's).
fn secret_keys(r: &Rendered, secret: &str) -> Option<BTreeSet<String>> {
    let prefix = format!("{secret}-");
    if let Some(s) = r
        .of_kind("Secret")
        .into_iter()
        .find(|s| name(s).starts_with(&prefix))
    {
        return Some(s["data"].as_object()?.keys().cloned().collect());
    }
    let external = r
        .of_kind("ExternalSecret")
        .into_iter()
        .find(|e| name(e) == secret)?;
    assert_eq!(external["spec"]["target"]["name"], secret, "{}", r.target);
    let data = external["spec"]["data"].as_array().into_iter().flatten();
    Some(
        data.filter_map(|d| d["secretKey"].as_str().map(str::to_owned))
            .collect(),
    )
}

#[test]
fn settings_and_secrets_are_variables_the_binary_reads_and_secrets_stay_out_of_the_config_map() {
    let known = variables_the_binary_reads();
    assert!(known.contains("BP_ALLOWED_NAMESPACES") && known.contains("BP_RUNTIME_DB_ROLE"));
    for r in rendered() {
        let at = r.target;
        let data = r.settings()["data"].as_object().expect("ConfigMap data");
        for key in data.keys() {
            assert!(
                known.contains(key),
                "{at}: {key} is read by nothing (a typo?)"
            );
            assert!(
                !SECRET_KEYS.contains(&key.as_str()),
                "{at}: {key} in the ConfigMap"
            );
        }
        let runtime = secret_keys(r, "backup-provisioner-runtime");
        let migration = secret_keys(r, "backup-provisioner-migration");
        if r.target == "base" {
            assert!(
                runtime.is_none() && migration.is_none(),
                "the base names no secret"
            );
            continue;
        }
        let (runtime, migration) = (runtime.expect(at), migration.expect(at));
        for key in runtime.iter().chain(&migration) {
            assert!(
                known.contains(key),
                "{at}: Secret key {key} is read by nothing"
            );
        }
        assert_eq!(
            migration,
            BTreeSet::from(["BP_MIGRATION_DATABASE_URL".to_owned()]),
            "{at}"
        );
        if r.target.ends_with("plain-secret") {
            for key in ["DATABASE_URL", "BP_ENCRYPTION_KEY", "BP_JWT_HS256_SECRET"] {
                assert!(runtime.contains(key), "{at}: {key}");
            }
        }
    }
}

/// The Secrets and ConfigMaps a pod spec takes variables from.
fn references(pod: &Value, of: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for container in containers(pod) {
        for from in container["envFrom"].as_array().into_iter().flatten() {
            names.extend(from[format!("{of}Ref")]["name"].as_str().map(str::to_owned));
        }
        for env in container["env"].as_array().into_iter().flatten() {
            let reference = &env["valueFrom"][format!("{of}KeyRef")]["name"];
            names.extend(reference.as_str().map(str::to_owned));
        }
    }
    names
}

/// Drops kustomize's hash suffix (`name-<10 characters>`) when the unsuffixed name is wanted.
fn unhashed(name: &str, wanted: &str) -> String {
    match name
        .strip_prefix(wanted)
        .and_then(|rest| rest.strip_prefix('-'))
    {
        Some(hash) if hash.len() == 10 => wanted.to_owned(),
        _ => name.to_owned(),
    }
}

#[test]
fn the_migration_job_alone_sees_the_owner_role_and_runs_migrate_grant_to() {
    for r in rendered() {
        let at = r.target;
        let job = r.job();
        let pod = &job["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        assert_eq!(
            container["args"],
            json!(["migrate", "--grant-to", "$(BP_RUNTIME_DB_ROLE)"]),
            "{at}"
        );
        let role = container["env"]
            .as_array()
            .and_then(|env| env.iter().find(|e| e["name"] == "BP_RUNTIME_DB_ROLE"))
            .expect("BP_RUNTIME_DB_ROLE in the Job's env");
        assert_eq!(
            role["valueFrom"]["configMapKeyRef"]["key"],
            "BP_RUNTIME_DB_ROLE"
        );
        assert!(!r.setting("BP_RUNTIME_DB_ROLE").is_empty(), "{at}");
        assert_eq!(
            pod["automountServiceAccountToken"], false,
            "{at}: no API token"
        );
        assert!(
            pod["serviceAccountName"].is_null(),
            "{at}: not the service's identity"
        );
        assert_eq!(pod["restartPolicy"], "OnFailure", "{at}");
        let secret_of = |pod: &Value, wanted: &str| -> BTreeSet<String> {
            references(pod, "secret")
                .iter()
                .map(|n| unhashed(n, wanted))
                .collect()
        };
        let migration = "backup-provisioner-migration";
        let runtime = "backup-provisioner-runtime";
        assert_eq!(
            secret_of(pod, migration),
            BTreeSet::from([migration.to_owned()]),
            "{at}"
        );
        let serving = &r.deployment()["spec"]["template"]["spec"];
        assert_eq!(
            secret_of(serving, runtime),
            BTreeSet::from([runtime.to_owned()]),
            "{at}"
        );
        let settings = name(r.settings()).to_owned();
        for pod in [pod, serving] {
            assert_eq!(
                references(pod, "configMap"),
                BTreeSet::from([settings.clone()]),
                "{at}"
            );
        }
    }
}

// ---- checked by the real kube-apiserver ----

/// Server-side apply, dry run (or for real), strict field validation, of one object.
async fn apply(client: &kube::Client, object: &Value, dry_run: bool) -> Result<(), String> {
    let (group, version) = match object["apiVersion"]
        .as_str()
        .unwrap_or_default()
        .split_once('/')
    {
        Some((group, version)) => (group, version),
        None => ("", object["apiVersion"].as_str().unwrap_or_default()),
    };
    let kind = object["kind"].as_str().unwrap_or_default();
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let (resource, capabilities) = pinned_kind(client, &gvk)
        .await
        .map_err(|e| format!("{kind}: not served: {e}"))?;
    let api: Api<DynamicObject> = match capabilities.scope {
        Scope::Cluster => Api::all_with(client.clone(), &resource),
        Scope::Namespaced => {
            let ns = object["metadata"]["namespace"].as_str().unwrap_or_default();
            Api::namespaced_with(client.clone(), ns, &resource)
        }
    };
    let mut params = PatchParams::apply(MANAGER).validation_strict();
    if dry_run {
        params = params.dry_run();
    }
    api.patch(name(object), &params, &Patch::Apply(object))
        .await
        .map(|_| ())
        .map_err(|e| format!("{kind} {}: {e}", name(object)))
}

/// What the dry runs need to exist for real: the CRD (served), the namespaces (the service's
/// with its Pod Security label), and the ServiceAccounts Pods are admitted with.
async fn prepare(client: &kube::Client) {
    for fixture in ["externalsecret-crd.yaml", "prometheusrule-crd.yaml"] {
        let crd_path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/deploy")
            .join(fixture);
        let crd: Value = serde_saphyr::from_str(&std::fs::read_to_string(crd_path).expect("CRD"))
            .expect("CRD YAML");
        apply(client, &crd, false)
            .await
            .expect("installing the CRD");
    }
    let mut namespaces = BTreeSet::new();
    for r in rendered() {
        for object in &r.objects {
            if object["kind"] == "Namespace" {
                apply(client, object, false)
                    .await
                    .expect("the service's namespace");
            }
            namespaces.extend(object["metadata"]["namespace"].as_str().map(str::to_owned));
        }
    }
    // The service's namespace keeps its rendered labels (an apply by the same manager without
    // them would remove them).
    for ns in namespaces.into_iter().filter(|ns| ns != NAMESPACE) {
        let namespace = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
        apply(client, &namespace, false).await.expect("a namespace");
    }
    // The controller manager that makes `default` does not run in the tests.
    Rbac::shipped().install_service_account(client).await;
    let default = json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "default", "namespace": NAMESPACE}});
    apply(client, &default, false)
        .await
        .expect("the default ServiceAccount");
    wait_until_served(client, "external-secrets.io", "v1", "ExternalSecret").await;
    wait_until_served(client, "monitoring.coreos.com", "v1", "PrometheusRule").await;
}

async fn wait_until_served(client: &kube::Client, group: &str, version: &str, kind: &str) {
    let until = Instant::now() + Duration::from_secs(30);
    let gvk = GroupVersionKind::gvk(group, version, kind);
    while let Err(e) = pinned_kind(client, &gvk).await {
        assert!(Instant::now() < until, "{kind} not served within 30 s: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A Pod made of a workload's pod template, created as a dry run (Pod Security Admission
/// enforces the namespace's profile on Pods only).
async fn dry_run_pod(client: &kube::Client, owner: &str, pod_spec: &Value) -> Result<(), String> {
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": format!("{owner}-dry-run").to_lowercase(), "namespace": NAMESPACE},
        "spec": pod_spec,
    });
    let pod: k8s_openapi::api::core::v1::Pod =
        serde_json::from_value(pod).map_err(|e| e.to_string())?;
    let params = PostParams {
        dry_run: true,
        field_manager: Some(MANAGER.into()),
    };
    Api::namespaced(client.clone(), NAMESPACE)
        .create(&params, &pod)
        .await
        .map(|_| ())
        .map_err(|e| format!("{owner}'s pod: {e}"))
}

#[tokio::test]
async fn every_rendered_object_passes_a_strict_server_side_dry_run_and_the_pods_the_restricted_profile()
 {
    let client = KubeApiserver::shared().admin_client();
    prepare(&client).await;
    let mut failures = Vec::new();
    for r in rendered() {
        for object in &r.objects {
            if let Err(e) = apply(&client, object, true).await {
                failures.push(format!("{}: {e}", r.target));
            }
        }
        for (owner, pod) in pod_specs(r) {
            if let Err(e) = dry_run_pod(&client, owner, pod).await {
                failures.push(format!("{}: {e}", r.target));
            }
        }
    }
    assert!(failures.is_empty(), "refused:\n{}", failures.join("\n"));
}

#[tokio::test]
async fn the_dry_runs_refuse_a_misspelt_field_a_wrong_type_and_a_privileged_pod() {
    let client = KubeApiserver::shared().admin_client();
    prepare(&client).await;
    let r = &rendered()[1];
    let mut misspelt = r.deployment().clone();
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] =
        misspelt["spec"]["template"]["spec"]["containers"][0]["readinessProbe"].clone();
    let err = apply(&client, &misspelt, true).await.unwrap_err();
    assert!(err.contains("readinessProbes"), "{err}");
    let mut external = r
        .one("ExternalSecret", "backup-provisioner-runtime")
        .clone();
    external["spec"]["refreshInterval"] = json!(3600);
    let err = apply(&client, &external, true).await.unwrap_err();
    assert!(err.contains("refreshInterval"), "{err}");
    external["spec"]["refreshInterval"] = json!("1h");
    external["spec"]["secretStoreRef"]["nmae"] = json!("typo");
    let err = apply(&client, &external, true).await.unwrap_err();
    assert!(err.contains("nmae"), "{err}");
    let mut pod = r.deployment()["spec"]["template"]["spec"].clone();
    pod["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = json!(true);
    let err = dry_run_pod(&client, "escalating", &pod).await.unwrap_err();
    assert!(err.contains("allowPrivilegeEscalation"), "{err}");
}

// ---- the real binary with the rendered settings ----

/// `terminationGracePeriodSeconds` of the Deployment.
fn termination_grace(r: &Rendered) -> Duration {
    let seconds = r.deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    Duration::from_secs(seconds)
}

#[tokio::test]
async fn the_rendered_settings_and_runtime_secret_make_a_ready_service_that_stops_in_its_grace() {
    let r = rendered()
        .iter()
        .find(|r| r.target.ends_with("plain-secret"))
        .expect("the plain-Secret overlay");
    // The runtime Secret's keys are those a ServiceProcess sets (with working values).
    let runtime = secret_keys(r, "backup-provisioner-runtime").expect("runtime Secret");
    let provided = ["DATABASE_URL", "BP_ENCRYPTION_KEY", "BP_JWT_HS256_SECRET"];
    assert_eq!(runtime, provided.iter().map(|k| (*k).to_owned()).collect());
    // As the ServiceAccount of the manifests, with a token the TokenRequest API issues.
    let server = KubeApiserver::shared();
    let admin = server.admin_client();
    Rbac::shipped().install_service_account(&admin).await;
    let token = Rbac::shipped().token(&admin).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        server.kubeconfig(&server.url, &token, NAMESPACE),
    )
    .expect("kubeconfig");
    let db = crate::support::app::fresh_database().await;
    let key = backup_provisioner::crypto::EncryptionKey::generate_base64();
    let args: Vec<&str> = r.deployment()["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    // No AWS call is made (no job runs); a closed loopback port stands in for AWS.
    let mut spec = ServiceSpec::new(
        "deployed",
        &args,
        &db.url,
        &key,
        "http://127.0.0.1:9",
        &kubeconfig,
    );
    for (variable, value) in r.settings()["data"].as_object().expect("data") {
        // The test's own loopback port instead of 0.0.0.0:8080.
        if variable != "BP_LISTEN_ADDR" {
            spec = spec.env(variable, value.as_str().expect("a string"));
        }
    }
    let mut service = ServiceProcess::spawn(dir.path(), &spec).await;
    let http = reqwest::Client::new();
    let readyz = service.url("/readyz");
    crate::support::app::eventually(Duration::from_secs(30), "/readyz answers 200", || async {
        let answer = http.get(&readyz).send().await.ok()?;
        (answer.status() == 200).then_some(())
    })
    .await;
    let grace = termination_grace(r);
    let status = service.terminate(grace).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "SIGTERM: {status:?} within terminationGracePeriodSeconds ({grace:?})\n{}",
        service.log()
    );
}

// ---- the backup freshness alerts (deploy/components/alerts) ----

/// The rule groups of the example overlay's PrometheusRule, as a Prometheus rule file.
fn alert_rules() -> Value {
    let example = &rendered()[1];
    let rule = example.one("PrometheusRule", "backup-provisioner-backup-freshness");
    json!({"groups": rule["spec"]["groups"].clone()})
}

/// Every metric the binary exports (each freshness family with one series, so it is listed).
fn exported_metrics() -> BTreeSet<String> {
    use backup_provisioner::telemetry::{FreshnessAges, Metrics};
    let metrics = Metrics::new();
    metrics.freshness.set(&[FreshnessAges {
        repository: "r".into(),
        namespace: "n".into(),
        newest_backup: Some(1.0),
        newest_full_backup: Some(1.0),
        newest_wal: Some(1.0),
        checked: Some(1.0),
        failing: false,
    }]);
    metrics
        .encode()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_owned)
        .collect()
}

/// Runs `promtool` (Debian's `prometheus` package, scripts/install-deps.sh) in `dir`.
/// Runs promtool's unit tests `tests` (a tests.yaml) against the shipped alert rules, their
/// annotations left out (templates promtool would compare too).
fn run_alert_tests(tests: &str) {
    let mut rules = alert_rules();
    for rule in rules["groups"][0]["rules"].as_array_mut().expect("rules") {
        rule.as_object_mut().expect("rule").remove("annotations");
    }
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("rules.yaml"), rules.to_string()).expect("rules");
    std::fs::write(dir.path().join("tests.yaml"), tests).expect("tests");
    promtool(dir.path(), &["test", "rules", "tests.yaml"]);
}

fn promtool(dir: &Path, args: &[&str]) -> String {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("promtool (run scripts/install-deps.sh): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?}: {text}");
    text
}

#[test]
fn the_freshness_alerts_name_exported_metrics_and_pass_promtool_check() {
    let rules = alert_rules();
    let exported = exported_metrics();
    let metric = Regex::new(r"backup_provisioner_[a-z_]+").expect("regex");
    let mut alerts = BTreeSet::new();
    for rule in rules["groups"][0]["rules"].as_array().expect("rules") {
        alerts.insert(rule["alert"].as_str().expect("an alert").to_owned());
        let expr = rule["expr"].as_str().expect("expr");
        for name in metric.find_iter(expr).map(|m| m.as_str()) {
            assert!(exported.contains(name), "{name} is exported by nothing");
        }
    }
    for wanted in ["BackupRepositoryNoFullBackup", "BackupRepositoryNoWal"] {
        assert!(alerts.contains(wanted), "{alerts:?}");
    }
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("rules.yaml"), rules.to_string()).expect("rules");
    promtool(dir.path(), &["check", "rules", "rules.yaml"]);
}

/// `promtool test rules`: series of five repositories over a day (annotations left out of
/// the rule file, `promtool check rules` above checks their templates).
const ALERT_TESTS: &str = r#"
rule_files: [rules.yaml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      # Backed up daily, WAL a minute old, checked a minute ago: nothing fires.
      - {series: 'backup_provisioner_newest_full_backup_age_seconds{repository="fresh",namespace="a"}', values: '86400+0x40'}
      - {series: 'backup_provisioner_newest_wal_age_seconds{repository="fresh",namespace="a"}', values: '60+0x40'}
      - {series: 'backup_provisioner_freshness_checked_age_seconds{repository="fresh",namespace="a"}', values: '60+0x40'}
      - {series: 'backup_provisioner_freshness_check_failing{repository="fresh",namespace="a"}', values: '0+0x40'}
      # The last full backup over 8 days old when checked.
      - {series: 'backup_provisioner_newest_full_backup_age_seconds{repository="stale-full",namespace="a"}', values: '700000+0x40'}
      - {series: 'backup_provisioner_newest_wal_age_seconds{repository="stale-full",namespace="a"}', values: '60+0x40'}
      - {series: 'backup_provisioner_freshness_checked_age_seconds{repository="stale-full",namespace="a"}', values: '60+0x40'}
      # No WAL for two hours when checked.
      - {series: 'backup_provisioner_newest_full_backup_age_seconds{repository="no-wal",namespace="a"}', values: '86400+0x40'}
      - {series: 'backup_provisioner_newest_wal_age_seconds{repository="no-wal",namespace="a"}', values: '7200+0x40'}
      - {series: 'backup_provisioner_freshness_checked_age_seconds{repository="no-wal",namespace="a"}', values: '60+0x40'}
      # The WAL looks old only because the last check is old: no WAL alert, but a stale check.
      - {series: 'backup_provisioner_newest_full_backup_age_seconds{repository="late-check",namespace="a"}', values: '90000+60x40'}
      - {series: 'backup_provisioner_newest_wal_age_seconds{repository="late-check",namespace="a"}', values: '4000+60x40'}
      - {series: 'backup_provisioner_freshness_checked_age_seconds{repository="late-check",namespace="a"}', values: '3000+60x40'}
      # Checked for a day, never a full backup.
      - {series: 'backup_provisioner_freshness_checked_age_seconds{repository="never",namespace="b"}', values: '60+0x1500'}
      # The check fails for over an hour.
      - {series: 'backup_provisioner_freshness_check_failing{repository="failing",namespace="b"}', values: '1+0x100'}
    alert_rule_test:
      - eval_time: 20m
        alertname: BackupRepositoryNoFullBackup
        exp_alerts:
          - exp_labels: {severity: critical, repository: stale-full, namespace: a}
      - eval_time: 10m
        alertname: BackupRepositoryNoWal
        exp_alerts:
          - exp_labels: {severity: critical, repository: no-wal, namespace: a}
      - eval_time: 30m
        alertname: BackupFreshnessCheckStale
        exp_alerts:
          - exp_labels: {severity: warning, repository: late-check, namespace: a}
      - eval_time: 30m
        alertname: BackupRepositoryNeverBackedUp
        exp_alerts: []
      - eval_time: 1450m
        alertname: BackupRepositoryNeverBackedUp
        exp_alerts:
          - exp_labels: {severity: warning, repository: never, namespace: b}
      - eval_time: 70m
        alertname: BackupFreshnessCheckFailing
        exp_alerts:
          - exp_labels: {severity: warning, repository: failing, namespace: b}
"#;

#[test]
fn the_freshness_alerts_fire_on_a_stale_full_backup_and_wal_and_not_on_a_late_check() {
    run_alert_tests(ALERT_TESTS);
}

/// Two replicas scraped: each serves the same freshness series under its own instance and pod
/// labels. Unaggregated, `A - on (repository, namespace) B` fails the evaluation (duplicate
/// series for the match group); the rules must fire once per repository, not once per pod.
const TWO_REPLICA_ALERT_TESTS: &str = r#"
rule_files: [rules.yaml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - {series: 'backup_provisioner_newest_full_backup_age_seconds{repository="stale-full",namespace="a",instance="10.0.0.1:8080",pod="bp-0"}', values: '700000+0x40'}
      - {series: 'backup_provisioner_newest_full_backup_age_seconds{repository="stale-full",namespace="a",instance="10.0.0.2:8080",pod="bp-1"}', values: '700000+0x40'}
      - {series: 'backup_provisioner_newest_wal_age_seconds{repository="stale-full",namespace="a",instance="10.0.0.1:8080",pod="bp-0"}', values: '9000+0x40'}
      - {series: 'backup_provisioner_newest_wal_age_seconds{repository="stale-full",namespace="a",instance="10.0.0.2:8080",pod="bp-1"}', values: '9000+0x40'}
      - {series: 'backup_provisioner_freshness_checked_age_seconds{repository="stale-full",namespace="a",instance="10.0.0.1:8080",pod="bp-0"}', values: '3600+0x1500'}
      - {series: 'backup_provisioner_freshness_checked_age_seconds{repository="stale-full",namespace="a",instance="10.0.0.2:8080",pod="bp-1"}', values: '3600+0x1500'}
      - {series: 'backup_provisioner_freshness_check_failing{repository="stale-full",namespace="a",instance="10.0.0.1:8080",pod="bp-0"}', values: '1+0x100'}
      - {series: 'backup_provisioner_freshness_check_failing{repository="stale-full",namespace="a",instance="10.0.0.2:8080",pod="bp-1"}', values: '1+0x100'}
      - {series: 'backup_provisioner_freshness_checked_age_seconds{repository="never",namespace="b",instance="10.0.0.1:8080",pod="bp-0"}', values: '60+0x1500'}
      - {series: 'backup_provisioner_freshness_checked_age_seconds{repository="never",namespace="b",instance="10.0.0.2:8080",pod="bp-1"}', values: '60+0x1500'}
    alert_rule_test:
      - eval_time: 20m
        alertname: BackupRepositoryNoFullBackup
        exp_alerts:
          - exp_labels: {severity: critical, repository: stale-full, namespace: a}
      - eval_time: 10m
        alertname: BackupRepositoryNoWal
        exp_alerts:
          - exp_labels: {severity: critical, repository: stale-full, namespace: a}
      - eval_time: 30m
        alertname: BackupFreshnessCheckStale
        exp_alerts:
          - exp_labels: {severity: warning, repository: stale-full, namespace: a}
      - eval_time: 70m
        alertname: BackupFreshnessCheckFailing
        exp_alerts:
          - exp_labels: {severity: warning, repository: stale-full, namespace: a}
      - eval_time: 1450m
        alertname: BackupRepositoryNeverBackedUp
        exp_alerts:
          - exp_labels: {severity: warning, repository: never, namespace: b}
"#;

#[test]
fn the_freshness_alerts_fire_once_per_repository_when_two_replicas_are_scraped() {
    run_alert_tests(TWO_REPLICA_ALERT_TESTS);
}
