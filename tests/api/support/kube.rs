//! Kubernetes emulator launcher: an in-process `kube-emulator` on `127.0.0.1:0`, served from
//! its own thread (so it outlives any one test's runtime and works from sync code too), with a
//! bearer token, and real `kube::Client`s for it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use kube_emulator::{Emulator, Grant};
use secrecy::SecretString;

/// The token of the provisioner's own identity (full access).
pub const ADMIN_TOKEN: &str = "backup-provisioner-test-token";
/// The user the admin token authenticates as.
pub const ADMIN_USER: &str = "system:serviceaccount:backup-provisioner:backup-provisioner";

const START_DEADLINE: Duration = Duration::from_secs(10);

/// A running emulator; the server stops when this is dropped.
pub struct KubeEmulator {
    pub emulator: Emulator,
    pub url: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl KubeEmulator {
    /// Starts an emulator that requires [`ADMIN_TOKEN`] and has the namespaces given (and
    /// `default`).
    pub fn start(namespaces: &[&str]) -> KubeEmulator {
        let emulator = Emulator::new();
        for ns in namespaces {
            emulator.create_namespace(ns).expect("create namespace");
        }
        emulator.add_token(ADMIN_TOKEN, Grant::cluster_admin(ADMIN_USER));

        let (addr_tx, addr_rx) = mpsc::channel();
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let served = emulator.clone();
        let thread = std::thread::Builder::new()
            .name("kube-emulator".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("emulator runtime");
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                        .await
                        .expect("bind the emulator");
                    addr_tx
                        .send(listener.local_addr().expect("local addr"))
                        .expect("report the address");
                    let shutdown = async {
                        let _ = shutdown_rx.await;
                    };
                    kube_emulator::serve_with_shutdown(listener, served, shutdown)
                        .await
                        .expect("serve the emulator");
                });
            })
            .expect("spawn the emulator thread");
        let addr = addr_rx
            .recv_timeout(START_DEADLINE)
            .expect("the emulator started");
        KubeEmulator {
            emulator,
            url: format!("http://{addr}"),
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        }
    }

    /// A client authenticated with [`ADMIN_TOKEN`] (call inside a tokio runtime).
    pub fn client(&self) -> kube::Client {
        self.client_with_token(Some(ADMIN_TOKEN))
    }

    /// A client with any (or no) bearer token, built like the service builds its own.
    pub fn client_with_token(&self, token: Option<&str>) -> kube::Client {
        let mut config = kube::Config::new(self.url.parse().expect("emulator url"));
        config.auth_info.token = token.map(|t| SecretString::from(t.to_owned()));
        backup_provisioner::cloud::kube::client_from_config(config).expect("kube client")
    }

    /// Registers a token limited to `namespaces` (optionally to some verbs) and returns a
    /// client using it.
    pub fn restricted_client(
        &self,
        user: &str,
        namespaces: &[&str],
        verbs: Option<&[&str]>,
    ) -> kube::Client {
        let token = format!("restricted-{}", uuid::Uuid::new_v4().simple());
        let mut grant = Grant::namespaced(user, namespaces.iter().copied());
        if let Some(verbs) = verbs {
            grant = grant.with_verbs(verbs.iter().copied());
        }
        self.emulator.add_token(&token, grant);
        self.client_with_token(Some(&token))
    }

    /// Writes a kubeconfig for the admin token into `dir` (for `KUBECONFIG` in a child
    /// process) and returns its path.
    pub fn write_kubeconfig(&self, dir: &Path, namespace: &str) -> PathBuf {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            kube_emulator::kubeconfig(&self.url, Some(ADMIN_TOKEN), namespace),
        )
        .expect("write kubeconfig");
        path
    }

    /// The number of POST/PUT/PATCH/DELETE requests served so far.
    pub fn mutating_count(&self) -> usize {
        self.emulator.mutating_requests().len()
    }
}

impl Drop for KubeEmulator {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        // Not joined: graceful shutdown waits for open client connections, and a test must
        // never hang on teardown. The thread ends once its connections close.
        drop(self.thread.take());
    }
}
