//! An in-memory emulator of the Kubernetes API subset backup-provisioner uses: core/v1
//! Namespaces and Secrets (get, list with label/field selectors, create, update, delete, JSON
//! merge patch, JSON patch and server-side apply with field ownership), `metav1.Status` errors,
//! bearer-token authentication and a per-token namespace/verb allow list standing in for RBAC.
//!
//! It speaks plain HTTP, so the real `kube` client can talk to it with a `kube::Config` whose
//! `cluster_url` is `http://127.0.0.1:PORT`. Test and demo tooling only.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! let emulator = kube_emulator::Emulator::new();
//! emulator.create_namespace("zitadel").unwrap();
//! let running = kube_emulator::start(emulator.clone()).await?;
//! println!("{}", running.url());
//! # Ok(())
//! # }
//! ```
//!
//! Known differences from kube-apiserver: no watch, no subresources (`/status`, `/finalize`),
//! namespaces are deleted at once (with their secrets) instead of going through `Terminating`,
//! strategic merge patches are treated as JSON merge patches, apply bodies must be JSON (not
//! YAML), type-specific Secret validation (e.g. `kubernetes.io/tls` keys) is not done, and a
//! manager's apply never conflicts with the same manager's updates.

mod managed;
mod selector;
mod server;
mod status;
mod store;
mod validate;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use base64::Engine as _;
use serde_json::Value;

pub use server::{router, serve, serve_with_shutdown};
pub use status::ApiError;
use store::{Kind, Store, WriteOptions};

/// What a token may do: the user name it authenticates as, and optionally the namespaces and
/// verbs it is limited to (`None`: everything).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub user: String,
    pub namespaces: Option<BTreeSet<String>>,
    pub verbs: Option<BTreeSet<String>>,
}

impl Grant {
    /// Every verb everywhere (like `cluster-admin`).
    pub fn cluster_admin(user: impl Into<String>) -> Self {
        Grant {
            user: user.into(),
            namespaces: None,
            verbs: None,
        }
    }

    /// Every verb, but only inside the given namespaces (like a RoleBinding per namespace).
    /// Cluster-scoped requests (listing all secrets, creating namespaces) are forbidden.
    pub fn namespaced<I, S>(user: impl Into<String>, namespaces: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Grant {
            user: user.into(),
            namespaces: Some(namespaces.into_iter().map(Into::into).collect()),
            verbs: None,
        }
    }

    /// Restricts the grant to these verbs (`get`, `list`, `create`, `update`, `patch`,
    /// `delete`, `deletecollection`).
    pub fn with_verbs<I, S>(mut self, verbs: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.verbs = Some(verbs.into_iter().map(Into::into).collect());
        self
    }

    pub(crate) fn allows(&self, verb: &str, namespace: Option<&str>) -> bool {
        let verb_ok = self.verbs.as_ref().is_none_or(|v| v.contains(verb));
        let ns_ok = match (&self.namespaces, namespace) {
            (None, _) => true,
            (Some(allowed), Some(ns)) => allowed.contains(ns),
            (Some(_), None) => false,
        };
        verb_ok && ns_ok
    }
}

/// One request as the emulator saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: Option<String>,
    /// The authenticated user, when tokens are configured and the token was valid.
    pub user: Option<String>,
    pub status: u16,
}

impl RequestRecord {
    /// POST, PUT, PATCH and DELETE, unless a dry run (`dryRun=All`), which changes nothing.
    pub fn is_mutating(&self) -> bool {
        let dry_run = self.query.split('&').any(|pair| pair == "dryRun=All");
        matches!(self.method.as_str(), "POST" | "PUT" | "PATCH" | "DELETE") && !dry_run
    }
}

/// A failure to answer with instead of serving requests that match, `times` times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub status: u16,
    pub method: Option<String>,
    pub path_prefix: Option<String>,
    pub times: usize,
}

impl Fault {
    /// Answers the next matching request with `status` (a `metav1.Status` with the reason the
    /// apiserver uses for that code, e.g. 500 `InternalError`, 429 `TooManyRequests`).
    pub fn status(status: u16) -> Self {
        Fault {
            status,
            method: None,
            path_prefix: None,
            times: 1,
        }
    }

    pub fn method(mut self, method: &str) -> Self {
        self.method = Some(method.to_ascii_uppercase());
        self
    }

    pub fn path_prefix(mut self, prefix: &str) -> Self {
        self.path_prefix = Some(prefix.to_string());
        self
    }

    pub fn times(mut self, times: usize) -> Self {
        self.times = times;
        self
    }
}

#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) store: Store,
    pub(crate) tokens: BTreeMap<String, Grant>,
    pub(crate) requests: Vec<RequestRecord>,
    pub(crate) faults: Vec<Fault>,
}

/// The emulator: shared in-memory state. Clones share the same state.
#[derive(Debug, Clone)]
pub struct Emulator {
    state: Arc<Mutex<State>>,
}

impl Default for Emulator {
    fn default() -> Self {
        Self::new()
    }
}

const HELPER_MANAGER: &str = "kube-emulator";

impl Emulator {
    /// An emulator with the `default` namespace (as every cluster has), no tokens (every
    /// request is allowed), and an empty request log.
    pub fn new() -> Self {
        let emulator = Emulator {
            state: Arc::new(Mutex::new(State::default())),
        };
        emulator
            .create_namespace("default")
            .expect("default namespace");
        emulator
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates a namespace (Ok if it already exists).
    pub fn create_namespace(&self, name: &str) -> Result<(), ApiError> {
        let body = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name},
        });
        match self.lock().store.create(
            Kind::Namespace,
            "",
            body,
            &WriteOptions {
                manager: HELPER_MANAGER.into(),
                ..Default::default()
            },
        ) {
            Ok(_) => Ok(()),
            Err(e) if e.reason == "AlreadyExists" => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Deletes a namespace and its secrets; false if it did not exist.
    pub fn delete_namespace(&self, name: &str) -> bool {
        self.lock()
            .store
            .delete(Kind::Namespace, "", name, &Value::Null, false)
            .is_ok()
    }

    pub fn namespace_exists(&self, name: &str) -> bool {
        self.lock().store.namespace_exists(name)
    }

    /// Creates a Secret directly (no auth, not logged), as field manager `kube-emulator`.
    /// `secret` is the JSON of a v1 Secret (`apiVersion`/`kind` may be omitted).
    pub fn insert_secret(&self, namespace: &str, secret: Value) -> Result<Value, ApiError> {
        self.insert_secret_as(HELPER_MANAGER, namespace, secret)
    }

    /// [`Emulator::insert_secret`] with a chosen field manager.
    pub fn insert_secret_as(
        &self,
        manager: &str,
        namespace: &str,
        mut secret: Value,
    ) -> Result<Value, ApiError> {
        if let Some(obj) = secret.as_object_mut() {
            obj.entry("apiVersion").or_insert(Value::from("v1"));
            obj.entry("kind").or_insert(Value::from("Secret"));
        }
        let opts = WriteOptions {
            manager: manager.into(),
            ..Default::default()
        };
        self.lock()
            .store
            .create(Kind::Secret, namespace, secret, &opts)
            .map(|w| w.object)
    }

    /// The Secret as the API would return it (with `managedFields`).
    pub fn get_secret(&self, namespace: &str, name: &str) -> Option<Value> {
        self.lock().store.get(Kind::Secret, namespace, name).ok()
    }

    /// The decoded `data` of a Secret.
    pub fn secret_data(&self, namespace: &str, name: &str) -> Option<BTreeMap<String, Vec<u8>>> {
        let secret = self.get_secret(namespace, name)?;
        let mut out = BTreeMap::new();
        if let Some(data) = secret.get("data").and_then(Value::as_object) {
            for (k, v) in data {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(v.as_str().unwrap_or_default())
                    .unwrap_or_default();
                out.insert(k.clone(), bytes);
            }
        }
        Some(out)
    }

    /// Deletes a Secret directly; false if it did not exist.
    pub fn delete_secret(&self, namespace: &str, name: &str) -> bool {
        self.lock()
            .store
            .delete(Kind::Secret, namespace, name, &Value::Null, false)
            .is_ok()
    }

    /// The names of the secrets in a namespace.
    pub fn secret_names(&self, namespace: &str) -> Vec<String> {
        let state = self.lock();
        let list = state
            .store
            .list(
                Kind::Secret,
                Some(namespace),
                &Default::default(),
                &Default::default(),
                None,
                None,
            )
            .unwrap_or_default();
        list["items"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|i| i["metadata"]["name"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Requires a bearer token from now on and registers `token` with `grant`. Without any
    /// token registered, every request is allowed.
    pub fn add_token(&self, token: &str, grant: Grant) {
        self.lock().tokens.insert(token.to_string(), grant);
    }

    pub fn remove_token(&self, token: &str) {
        self.lock().tokens.remove(token);
    }

    /// Answers the next matching requests with an error (see [`Fault`]).
    pub fn inject_fault(&self, fault: Fault) {
        self.lock().faults.push(fault);
    }

    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// Every request served so far (oldest first).
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.lock().requests.clone()
    }

    /// The POST/PUT/PATCH/DELETE requests served so far.
    pub fn mutating_requests(&self) -> Vec<RequestRecord> {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.is_mutating())
            .cloned()
            .collect()
    }

    pub fn clear_requests(&self) {
        self.lock().requests.clear();
    }

    /// The current (global) resource version.
    pub fn resource_version(&self) -> u64 {
        self.lock().store.resource_version()
    }
}

/// A running emulator: its address and state. The server task stops when this is dropped.
#[derive(Debug)]
pub struct RunningEmulator {
    pub addr: SocketAddr,
    pub emulator: Emulator,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningEmulator {
    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig for this emulator (see [`kubeconfig`]).
    pub fn kubeconfig(&self, token: Option<&str>, namespace: &str) -> String {
        kubeconfig(&self.url(), token, namespace)
    }
}

impl Drop for RunningEmulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds `127.0.0.1:0` and serves `emulator` on a spawned task.
pub async fn start(emulator: Emulator) -> std::io::Result<RunningEmulator> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(serve(listener, emulator.clone()));
    Ok(RunningEmulator {
        addr,
        emulator,
        task,
    })
}

fn yaml_quote(s: &str) -> String {
    serde_json::to_string(s).expect("string")
}

/// A kubeconfig (context `kube-emulator`) pointing at `server` with an optional bearer token.
pub fn kubeconfig(server: &str, token: Option<&str>, namespace: &str) -> String {
    let user = match token {
        Some(t) => format!("    token: {}\n", yaml_quote(t)),
        None => "    {}\n".to_string(),
    };
    format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: kube-emulator\n  \
           cluster:\n    \
             server: {server}\n\
         contexts:\n\
         - name: kube-emulator\n  \
           context:\n    \
             cluster: kube-emulator\n    \
             user: kube-emulator\n    \
             namespace: {namespace}\n\
         current-context: kube-emulator\n\
         users:\n\
         - name: kube-emulator\n  \
           user:\n{user}\
         preferences: {{}}\n",
        server = yaml_quote(server),
        namespace = yaml_quote(namespace),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dry_run_is_not_mutating() {
        let record = |method: &str, query: &str| RequestRecord {
            method: method.into(),
            path: "/api/v1/namespaces/a/secrets/b".into(),
            query: query.into(),
            content_type: None,
            user: None,
            status: 200,
        };
        assert!(record("PATCH", "fieldManager=x&force=true").is_mutating());
        assert!(!record("PATCH", "dryRun=All&fieldManager=x&force=true").is_mutating());
        assert!(!record("POST", "dryRun=All").is_mutating());
        assert!(!record("GET", "").is_mutating());
    }
}
