//! An in-memory emulator of the Kubernetes API subset backup-provisioner uses: core/v1
//! Namespaces and Secrets (get, list with label/field selectors, create, update, delete, JSON
//! merge patch, JSON patch and server-side apply with field ownership), `metav1.Status` errors
//! and bearer-token authentication (every valid token may do everything).
//!
//! It is `make demo`'s Kubernetes on a fresh machine, where building the real kube-apiserver
//! first would take minutes. The tests run against the real kube-apiserver
//! (`tests/api/support/kube_apiserver.rs`), which also proves the service's RBAC; faults are
//! injected by a proxy in front of it. It speaks plain HTTP, so the real `kube` client can talk
//! to it with a `kube::Config` whose `cluster_url` is `http://127.0.0.1:PORT`.
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
//! YAML), type-specific Secret validation (e.g. `kubernetes.io/tls` keys) is not done, a
//! manager's apply never conflicts with the same manager's updates, and there is no RBAC.

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

#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) store: Store,
    /// The bearer tokens accepted (each with every permission).
    pub(crate) tokens: BTreeSet<String>,
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
    /// An emulator with the `default` namespace (as every cluster has) and no tokens (every
    /// request is allowed).
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

    pub fn namespace_exists(&self, name: &str) -> bool {
        self.lock().store.namespace_exists(name)
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

    /// Requires a bearer token from now on and accepts `token` (with every permission).
    /// Without any token registered, every request is allowed.
    pub fn add_token(&self, token: &str) {
        self.lock().tokens.insert(token.to_string());
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
