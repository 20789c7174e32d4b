//! A small HTTPS proxy in front of the real kube-apiserver, between it and the service: it
//! presents the server's own certificate (so the service's client trusts it exactly as it trusts
//! the server), forwards every request unchanged (the service's bearer token included), records
//! what it forwarded (method, path, status) so tests can count the service's mutating calls, and
//! answers requests that match an injected [`Fault`] itself with the `metav1.Status` the server
//! would send (500, 429, 409, ...), which a real server cannot be made to do on demand: counted
//! ([`KubeProxy::inject_fault`]) or on a seeded share of all requests
//! ([`KubeProxy::fault_share`]). It can also hold a request before forwarding it
//! ([`KubeProxy::hold`]), so a test can change the object between the service's read and its
//! write.
//!
//! Served from a thread and runtime of its own (like every launcher here), so it outlives any
//! one test's runtime and serves a crash child process too; dropping it stops it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::response::Response;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;

use super::kube_apiserver::KubeApiserver;

const START_DEADLINE: Duration = Duration::from_secs(10);
const MAX_BODY: usize = 16 * 1024 * 1024;

/// One request the proxy answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: Option<String>,
    pub status: u16,
    /// Answered by an injected fault instead of the server.
    pub injected: bool,
}

impl RequestRecord {
    /// POST, PUT, PATCH and DELETE, unless a dry run (`dryRun=All`), which changes nothing.
    pub fn is_mutating(&self) -> bool {
        matches!(self.method.as_str(), "POST" | "PUT" | "PATCH" | "DELETE") && !self.is_dry_run()
    }

    pub fn is_dry_run(&self) -> bool {
        self.query.split('&').any(|pair| pair == "dryRun=All")
    }
}

/// An error to answer with instead of forwarding requests that match, `times` times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub status: u16,
    pub method: Option<String>,
    pub path_prefix: Option<String>,
    pub times: usize,
}

impl Fault {
    /// Answers the next matching request with `status` and the reason kube-apiserver uses for
    /// that code (500 `InternalError`, 429 `TooManyRequests`, 409 `Conflict`, ...).
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
        self.path_prefix = Some(prefix.to_owned());
        self
    }

    pub fn times(mut self, times: usize) -> Self {
        self.times = times;
        self
    }

    fn matches(&self, method: &str, path: &str) -> bool {
        self.times > 0
            && self.method.as_deref().is_none_or(|m| m == method)
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|p| path.starts_with(p))
    }

    /// The `metav1.Status` body kube-apiserver sends for this code.
    fn body(&self) -> serde_json::Value {
        let (reason, message) = match self.status {
            409 => (
                "Conflict",
                "Operation cannot be fulfilled: the object has been modified; please apply your \
                 changes to the latest version and try again",
            ),
            429 => (
                "TooManyRequests",
                "Too many requests, please try again later.",
            ),
            500 => ("InternalError", "Internal error occurred: injected fault"),
            503 => (
                "ServiceUnavailable",
                "The server is currently unable to handle the request",
            ),
            504 => (
                "Timeout",
                "The server was unable to return a response in the time allotted",
            ),
            _ => ("", "injected fault"),
        };
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": self.status,
        })
    }
}

#[derive(Default)]
struct Shared {
    requests: Vec<RequestRecord>,
    faults: Vec<Fault>,
    share: Option<FaultShare>,
    /// Requests seen per (method, path with the namespace's suffix removed), for the draws.
    seen: std::collections::HashMap<(String, String), u64>,
    holds: Vec<(Hold, tokio::sync::mpsc::UnboundedSender<Held>)>,
    /// Cancelled to end every watch stream open now ([`KubeProxy::cut_watches`]).
    watch_cut: tokio_util::sync::CancellationToken,
    /// Watches to send with a stale `resourceVersion` ([`KubeProxy::expire_next_watch`]):
    /// (path prefix, how many).
    stale_watches: Vec<(String, usize)>,
}

/// Errors on a share of the requests, drawn from a seeded generator: each draw depends only on
/// the seed, the method, the path (a test namespace's random suffix removed) and how many
/// requests with that method and path came before, so the same seed and names give the same
/// faults however concurrent requests interleave. A read (GET) is answered 500 or 429; a write
/// (not a dry run) 500, 429 or 409 (a stale `resourceVersion`: "the object has been modified");
/// a dry run 500 or 429.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultShare {
    pub rate: f64,
    pub seed: u64,
}

impl FaultShare {
    /// `rate` (0..=1) of the requests fail; the seed is `KUBE_FAULT_SEED` if set, else random.
    pub fn new(rate: f64) -> FaultShare {
        let seed = std::env::var("KUBE_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random);
        FaultShare { rate, seed }
    }

    pub fn seed(mut self, seed: u64) -> FaultShare {
        self.seed = seed;
        self
    }

    /// The status to answer the `index`-th request with this method and path with, if any.
    fn draw(&self, method: &str, path: &str, dry_run: bool, index: u64) -> Option<u16> {
        use rand::{Rng, SeedableRng};
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let parts: [&[u8]; 4] = [
            &self.seed.to_le_bytes(),
            method.as_bytes(),
            path.as_bytes(),
            &index.to_le_bytes(),
        ];
        for part in parts {
            for byte in part.iter().chain(std::iter::once(&0xffu8)) {
                hash ^= u64::from(*byte);
                hash = hash.wrapping_mul(0x0100_0000_01b3);
            }
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(hash);
        let (fails, kind): (f64, f64) = (rng.random(), rng.random());
        if fails >= self.rate {
            return None;
        }
        let write = method != "GET" && !dry_run;
        let statuses: &[u16] = if write { &[500, 429, 409] } else { &[500, 429] };
        let at = ((kind * statuses.len() as f64) as usize).min(statuses.len() - 1);
        Some(statuses[at])
    }
}

/// A request path with the random suffix of a test namespace (`zitadel-1a2b3c4d`) removed, so
/// draws repeat across runs.
fn stable_path(path: &str) -> String {
    path.split('/')
        .map(|segment| match segment.rsplit_once('-') {
            Some((name, suffix))
                if suffix.len() == 8 && suffix.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                name
            }
            _ => segment,
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Which requests to hold (see [`KubeProxy::hold`]): dry runs are never held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub method: String,
    pub path_prefix: String,
    /// Matching requests to let through before holding one.
    pub skip: usize,
    /// How many to hold.
    pub times: usize,
}

impl Hold {
    /// Holds the next `method` request whose path starts with `path_prefix`.
    pub fn next(method: &str, path_prefix: &str) -> Hold {
        Hold {
            method: method.to_ascii_uppercase(),
            path_prefix: path_prefix.to_owned(),
            skip: 0,
            times: 1,
        }
    }

    pub fn skip(mut self, skip: usize) -> Hold {
        self.skip = skip;
        self
    }
}

/// A request held before it is forwarded; dropping it lets the request go on.
#[derive(Debug)]
pub struct Held {
    pub method: String,
    pub path: String,
    _release: tokio::sync::oneshot::Sender<()>,
}

#[derive(Clone)]
struct ProxyState {
    shared: Arc<Mutex<Shared>>,
    upstream: String,
    http: reqwest::Client,
}

/// A running proxy; stops when dropped.
pub struct KubeProxy {
    /// `https://127.0.0.1:PORT`
    pub url: String,
    shared: Arc<Mutex<Shared>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl KubeProxy {
    /// Starts a proxy in front of `server`.
    pub fn start(server: &KubeApiserver) -> KubeProxy {
        backup_provisioner::install_crypto_provider();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let http = reqwest::Client::builder()
            .add_root_certificate(
                reqwest::Certificate::from_pem(server.ca_pem.as_bytes()).expect("CA"),
            )
            .no_proxy()
            .build()
            .expect("upstream client");
        let state = ProxyState {
            shared: shared.clone(),
            upstream: server.url.clone(),
            http,
        };
        let tls = tls_config(&server.serving_cert_pem, &server.serving_key_pem);
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("kube-proxy".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .expect("proxy runtime");
                runtime.block_on(async move {
                    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
                        .await
                        .expect("bind the proxy");
                    let addr = tcp.local_addr().expect("local addr");
                    addr_tx.send(addr).expect("report the address");
                    let listener = TlsListener::spawn(tcp, tls);
                    let router = axum::Router::new().fallback(forward).with_state(state);
                    tokio::select! {
                        _ = axum::serve(listener, router) => {}
                        _ = shutdown_rx => {}
                    }
                });
                // Dropping the runtime here ends every open connection.
            })
            .expect("spawn the proxy thread");
        let addr: SocketAddr = addr_rx
            .recv_timeout(START_DEADLINE)
            .expect("the proxy started");
        KubeProxy {
            url: format!("https://{addr}"),
            shared,
            shutdown: Some(shutdown_tx),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every request answered so far (oldest first).
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.lock().requests.clone()
    }

    /// The POST/PUT/PATCH/DELETE requests answered so far.
    pub fn mutating_requests(&self) -> Vec<RequestRecord> {
        self.requests()
            .into_iter()
            .filter(RequestRecord::is_mutating)
            .collect()
    }

    pub fn mutating_count(&self) -> usize {
        self.mutating_requests().len()
    }

    pub fn clear_requests(&self) {
        self.lock().requests.clear();
    }

    /// Answers the next matching requests with an error (see [`Fault`]).
    pub fn inject_fault(&self, fault: Fault) {
        self.lock().faults.push(fault);
    }

    /// From now on answers a share of the requests with an error (see [`FaultShare`]);
    /// `None` stops. Faults injected with [`KubeProxy::inject_fault`] come first.
    pub fn fault_share(&self, share: Option<FaultShare>) {
        if let Some(share) = &share {
            eprintln!(
                "kube fault proxy {}: {:.0} % of requests fail, seed {} (KUBE_FAULT_SEED={} \
                 repeats the draws)",
                self.url,
                share.rate * 100.0,
                share.seed,
                share.seed
            );
        }
        self.lock().share = share;
    }

    /// Holds matching requests before forwarding them: each is sent to the returned receiver
    /// and forwarded once the test drops it (e.g. after changing the object meanwhile).
    pub fn hold(&self, hold: Hold) -> tokio::sync::mpsc::UnboundedReceiver<Held> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.lock().holds.push((hold, tx));
        rx
    }
}

/// A `resourceVersion` the API server compacted away long ago: a watch from it is answered
/// `410 Gone` ("too old resource version") by the server itself, as when a watch was broken
/// for longer than the server keeps history.
pub const STALE_RESOURCE_VERSION: &str = "1";

impl KubeProxy {
    /// Ends every watch stream open now, as a dropped connection or a restarted API server
    /// would (the client sees its stream end and watches again).
    pub fn cut_watches(&self) {
        let mut shared = self.lock();
        let cut = std::mem::take(&mut shared.watch_cut);
        cut.cancel();
    }

    /// Sends the next watch whose path starts with `path_prefix` from
    /// [`STALE_RESOURCE_VERSION`] instead of the client's: the real server answers it with its
    /// own 410 Gone (Expired), and the client must list again.
    pub fn expire_next_watch(&self, path_prefix: &str) {
        self.lock().stale_watches.push((path_prefix.to_owned(), 1));
    }

    /// The watch requests answered so far whose path starts with `path_prefix`.
    pub fn watches(&self, path_prefix: &str) -> Vec<RequestRecord> {
        self.requests()
            .into_iter()
            .filter(|r| r.path.starts_with(path_prefix) && is_watch(&r.query))
            .collect()
    }
}

/// Whether a request's query asks for a watch (`watch=true` or `watch=1`).
pub fn is_watch(query: &str) -> bool {
    query
        .split('&')
        .any(|pair| pair == "watch=true" || pair == "watch=1")
}

/// `query` with `resourceVersion` replaced by [`STALE_RESOURCE_VERSION`] when a stale-watch
/// rule matches this watch (the rule is used up).
fn stale_query(shared: &mut Shared, path: &str, query: &str) -> Option<String> {
    if !is_watch(query) {
        return None;
    }
    let rule = shared
        .stale_watches
        .iter_mut()
        .find(|(prefix, times)| *times > 0 && path.starts_with(prefix.as_str()))?;
    rule.1 -= 1;
    let pairs = query
        .split('&')
        .filter(|pair| !pair.starts_with("resourceVersion="))
        .chain([format!("resourceVersion={STALE_RESOURCE_VERSION}").as_str()])
        .collect::<Vec<_>>()
        .join("&");
    Some(pairs)
}

impl Drop for KubeProxy {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

fn tls_config(cert_pem: &str, key_pem: &str) -> Arc<rustls::ServerConfig> {
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("serving certificate");
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("serving key");
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("TLS config");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// Accepts TCP connections and hands out those whose TLS handshake completed (handshakes run
/// concurrently, so a stalled client cannot block the others).
struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        SocketAddr,
    )>,
    local: SocketAddr,
}

impl TlsListener {
    fn spawn(tcp: tokio::net::TcpListener, tls: Arc<rustls::ServerConfig>) -> TlsListener {
        let local = tcp.local_addr().expect("local addr");
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            while let Ok((socket, peer)) = tcp.accept().await {
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let handshake =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(socket));
                    if let Ok(Ok(stream)) = handshake.await {
                        let _ = tx.send((stream, peer)).await;
                    }
                });
            }
        });
        TlsListener { ready, local }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The acceptor task ended: never accept again.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Hop-by-hop headers and those the HTTP clients set themselves.
fn forwarded(headers: &HeaderMap) -> HeaderMap {
    let skip: [HeaderName; 5] = [
        header::HOST,
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::CONTENT_LENGTH,
        HeaderName::from_static("keep-alive"),
    ];
    headers
        .iter()
        .filter(|(name, _)| !skip.contains(name))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect()
}

async fn forward(State(state): State<ProxyState>, request: Request) -> Response {
    let method = request.method().as_str().to_owned();
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or_default().to_owned();
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut record = RequestRecord {
        method: method.clone(),
        path: path.clone(),
        query: query.clone(),
        content_type,
        status: 0,
        injected: false,
    };

    let dry_run = record.is_dry_run();
    let held = {
        let mut shared = state.shared.lock().unwrap_or_else(|p| p.into_inner());
        let hold = shared.holds.iter_mut().find(|(h, _)| {
            h.times > 0 && !dry_run && h.method == method && path.starts_with(&h.path_prefix)
        });
        match hold {
            Some((h, _)) if h.skip > 0 => {
                h.skip -= 1;
                None
            }
            Some((h, tx)) => {
                h.times -= 1;
                let (release, released) = tokio::sync::oneshot::channel();
                let held = Held {
                    method: method.clone(),
                    path: path.clone(),
                    _release: release,
                };
                tx.send(held).is_ok().then_some(released)
            }
            None => None,
        }
    };
    if let Some(released) = held {
        // Dropped or released alike: go on.
        let _ = released.await;
    }
    let fault = {
        let mut shared = state.shared.lock().unwrap_or_else(|p| p.into_inner());
        let fault = shared.faults.iter_mut().find(|f| f.matches(&method, &path));
        let fault = fault.map(|f| {
            f.times -= 1;
            f.clone()
        });
        let key = (method.clone(), stable_path(&path));
        let index = {
            let n = shared.seen.entry(key.clone()).or_default();
            *n += 1;
            *n
        };
        let drawn = shared
            .share
            .as_ref()
            .and_then(|share| share.draw(&key.0, &key.1, dry_run, index));
        fault.or_else(|| drawn.map(Fault::status))
    };
    let query = {
        let mut shared = state.shared.lock().unwrap_or_else(|p| p.into_inner());
        stale_query(&mut shared, &path, &query).unwrap_or(query)
    };
    record.query = query.clone();
    let response = match fault {
        Some(fault) => {
            record.injected = true;
            Response::builder()
                .status(fault.status)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(fault.body().to_string()))
                .expect("fault response")
        }
        None => upstream(&state, request, &path, &query).await,
    };
    record.status = response.status().as_u16();
    state
        .shared
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .requests
        .push(record);
    response
}

async fn upstream(state: &ProxyState, request: Request, path: &str, query: &str) -> Response {
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(body) => body,
        Err(e) => return bad_gateway(format!("reading the request body: {e}")),
    };
    let url = if query.is_empty() {
        format!("{}{path}", state.upstream)
    } else {
        format!("{}{path}?{query}", state.upstream)
    };
    let sent = state
        .http
        .request(parts.method, url)
        .headers(forwarded(&parts.headers))
        .body(body)
        .send()
        .await;
    let answer = match sent {
        Ok(answer) => answer,
        Err(e) => return bad_gateway(format!("forwarding to kube-apiserver: {e}")),
    };
    let status = answer.status();
    let headers = forwarded(answer.headers());
    if is_watch(query) {
        let cut = state
            .shared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .watch_cut
            .clone();
        let mut response = Response::new(watch_body(answer, cut));
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        return response;
    }
    let bytes = match answer.bytes().await {
        Ok(bytes) => bytes,
        Err(e) => return bad_gateway(format!("reading kube-apiserver's answer: {e}")),
    };
    let mut response = Response::new(Body::from(bytes));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// A watch's answer passed on as it arrives (a watch is a response that does not end), until
/// the server ends it or `cut` fires.
fn watch_body(answer: reqwest::Response, cut: tokio_util::sync::CancellationToken) -> Body {
    let chunks = futures::stream::unfold(Some(answer), move |answer| {
        let cut = cut.clone();
        async move {
            let mut answer = answer?;
            let chunk = tokio::select! {
                _ = cut.cancelled() => return None,
                chunk = answer.chunk() => chunk,
            };
            match chunk {
                Ok(Some(bytes)) => Some((Ok::<_, reqwest::Error>(bytes), Some(answer))),
                Ok(None) => None,
                Err(e) => Some((Err(e), None)),
            }
        }
    });
    Body::from_stream(chunks)
}

fn bad_gateway(message: String) -> Response {
    Response::builder()
        .status(StatusCode::BAD_GATEWAY)
        .body(Body::from(message))
        .expect("502")
}

#[cfg(test)]
mod tests {
    // No `use super::*`: the benchmark includes this file without the test harness, where
    // the tests are not built and the import would be unused.
    #[test]
    fn a_test_namespace_suffix_is_not_part_of_the_draw() {
        assert_eq!(
            super::stable_path("/api/v1/namespaces/zitadel-1a2b3c4d/secrets/holos-kf-00-backups"),
            "/api/v1/namespaces/zitadel/secrets/holos-kf-00-backups"
        );
        assert_eq!(
            super::stable_path("/api/v1/namespaces/a-b"),
            "/api/v1/namespaces/a-b"
        );
    }

    #[test]
    fn the_share_follows_its_rate_and_a_read_never_conflicts() {
        let share = super::FaultShare::new(0.2).seed(7);
        let path = "/api/v1/namespaces/ns/secrets/s";
        let gets: Vec<Option<u16>> = (1..=1000)
            .map(|i| share.draw("GET", path, false, i))
            .collect();
        let failed = gets.iter().flatten().count();
        assert!((150..=250).contains(&failed), "{failed} of 1000");
        assert!(gets.iter().flatten().all(|s| [500, 429].contains(s)));
        let patches: Vec<u16> = (1..=1000)
            .filter_map(|i| share.draw("PATCH", path, false, i))
            .collect();
        assert!(patches.contains(&409) && patches.contains(&500) && patches.contains(&429));
        assert!(
            (1..=1000)
                .filter_map(|i| share.draw("PATCH", path, true, i))
                .all(|s| s != 409)
        );
        assert_eq!(
            share.draw("GET", path, false, 3),
            super::FaultShare::new(0.2)
                .seed(7)
                .draw("GET", path, false, 3)
        );
    }
}
