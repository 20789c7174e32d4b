//! The real kube-apiserver and etcd (built by `scripts/build-kube.sh`) on loopback, once per test
//! process: [`KubeApiserver::shared`] starts both when the first test needs them and they stop
//! when the process exits, whether the tests passed or not.
//!
//! - **Start.** A thread of its own (it lives as long as the process) makes a temp work dir,
//!   a CA and a serving certificate for `127.0.0.1` (openssl), a service-account signing key and
//!   a static token file, spawns etcd, waits for its `/health`, spawns kube-apiserver
//!   (`--authorization-mode RBAC`, the flags of `scripts/kube-apiserver-smoke.sh`) and waits for
//!   `/readyz`. Ports are free ports picked just before; a start that fails (a port taken in
//!   between) is retried on new ports. The binaries come from `KUBE_BIN_DIR`, else from
//!   `scripts/build-kube.sh` (instant once built).
//! - **Stop.** Both children are spawned from that thread with `PR_SET_PDEATHSIG` (SIGKILL), so
//!   they die with the test process however it ends; on a normal exit (every test passed, or
//!   libtest's `exit(101)`) an `atexit` hook stops kube-apiserver first (it hangs on SIGTERM
//!   when etcd is gone), then etcd, and removes the work dir. Work dirs of killed runs are swept
//!   at the next start.
//! - **Identities.** `admin` (group `system:masters`) for test set-up and assertions;
//!   `tester`, authenticated but granted nothing unless a test binds a Role to it; the service
//!   runs as the ServiceAccount of `deploy/base/rbac.yaml` with a TokenRequest token
//!   (`support::kube_env`).
//! - **Namespaces.** Every test makes its own (`support::kube_env::KubeEnv`), named after the
//!   namespace the test asks for plus a random suffix; nothing is deleted (there is no namespace
//!   controller), the whole etcd is thrown away at exit.
#![allow(dead_code)]

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use secrecy::SecretString;

/// The static identity with every permission (group `system:masters`).
pub const ADMIN_USER: &str = "admin";
/// A static identity that is authenticated but has no permissions of its own.
pub const TESTER_USER: &str = "tester";

const ETCD_DEADLINE: Duration = Duration::from_secs(30);
const READY_DEADLINE: Duration = Duration::from_secs(90);
const STOP_GRACE: Duration = Duration::from_secs(5);
const START_ATTEMPTS: usize = 3;
/// The prefix of every work dir (`<prefix><pid>-<random>` in the temp dir).
const WORK_DIR_PREFIX: &str = "bp-kube-apiserver-";

/// A running kube-apiserver on etcd; see the module doc.
#[derive(Debug)]
pub struct KubeApiserver {
    /// `https://127.0.0.1:PORT`
    pub url: String,
    /// The CA that signed the serving certificate (PEM).
    pub ca_pem: String,
    /// The serving certificate and key (PEM), for a proxy that presents the same identity.
    pub serving_cert_pem: String,
    pub serving_key_pem: String,
    admin_token: String,
    tester_token: String,
    /// `gitVersion` from `/version`.
    pub version: String,
    /// From the first spawn to `/readyz` answering `ok` (both processes).
    pub started_in: Duration,
    /// Of which etcd (spawn to healthy).
    pub etcd_started_in: Duration,
    pub work_dir: PathBuf,
}

/// The children and the work dir, stopped by the `atexit` hook.
struct Processes {
    apiserver: Option<Child>,
    etcd: Option<Child>,
    work_dir: PathBuf,
}

static PROCESSES: Mutex<Option<Processes>> = Mutex::new(None);

impl KubeApiserver {
    /// The server shared by every test of this process, started on first use. Panics (in every
    /// test that asks, with the same message) if it cannot start.
    pub fn shared() -> &'static KubeApiserver {
        static SHARED: OnceLock<Result<KubeApiserver, String>> = OnceLock::new();
        match SHARED.get_or_init(start_on_own_thread) {
            Ok(server) => server,
            Err(e) => panic!("the real kube-apiserver did not start: {e}"),
        }
    }

    /// The CA certificate, DER, as `kube::Config::root_cert` takes it.
    pub fn ca_der(&self) -> Vec<u8> {
        ca_der(&self.ca_pem)
    }

    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    pub fn tester_token(&self) -> &str {
        &self.tester_token
    }

    /// A client for the server (or a proxy in front of it, `url`) with a bearer token, built
    /// like the service builds its own. Call inside the tokio runtime that will use it.
    pub fn client_at(&self, url: &str, token: Option<&str>) -> kube::Client {
        client_for(url, &self.ca_pem, token)
    }

    /// The admin client (`system:masters`), straight to the server.
    pub fn admin_client(&self) -> kube::Client {
        self.client_at(&self.url, Some(&self.admin_token))
    }

    /// A kubeconfig for `url` (the server or a proxy) with the CA and a bearer token.
    pub fn kubeconfig(&self, url: &str, token: &str, namespace: &str) -> String {
        kubeconfig(url, &self.ca_pem, token, namespace)
    }

    /// The last `lines` lines of kube-apiserver's log (for failure messages).
    pub fn log_tail(&self, lines: usize) -> String {
        tail_file(&self.work_dir.join("kube-apiserver.log"), lines)
    }
}

/// DER of the first certificate in `pem`.
pub fn ca_der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("a PEM certificate")
        .to_vec()
}

/// A kube client for `url` trusting `ca_pem`, with an optional bearer token (also what a crash
/// child builds from its environment).
pub fn client_for(url: &str, ca_pem: &str, token: Option<&str>) -> kube::Client {
    let mut config = kube::Config::new(url.parse().expect("kube-apiserver url"));
    config.root_cert = Some(vec![ca_der(ca_pem)]);
    config.auth_info.token = token.map(|t| SecretString::from(t.to_owned()));
    backup_provisioner::cloud::kube::client_from_config(config).expect("kube client")
}

fn yaml_quote(s: &str) -> String {
    serde_json::to_string(s).expect("string")
}

/// A kubeconfig (context `test`) for `server` with the CA inline and a bearer token.
pub fn kubeconfig(server: &str, ca_pem: &str, token: &str, namespace: &str) -> String {
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\n\
         clusters:\n- name: test\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\n\
         contexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n    namespace: {namespace}\n\
         current-context: test\n\
         users:\n- name: test\n  user:\n    token: {token}\n",
        server = yaml_quote(server),
        namespace = yaml_quote(namespace),
        token = yaml_quote(token),
    )
}

/// Starts the server from a thread that never ends, so the children's `PR_SET_PDEATHSIG` fires
/// only when the process dies.
fn start_on_own_thread() -> Result<KubeApiserver, String> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("kube-apiserver".into())
        .spawn(move || {
            let _ = tx.send(start());
            // The parent thread of etcd and kube-apiserver: must outlive every test.
            loop {
                std::thread::park();
            }
        })
        .map_err(|e| format!("spawning the harness thread: {e}"))?;
    rx.recv()
        .map_err(|_| "the harness thread died while starting".to_owned())?
}

fn start() -> Result<KubeApiserver, String> {
    backup_provisioner::install_crypto_provider();
    sweep_stale_work_dirs();
    let bin = bin_dir()?;
    let mut errors = Vec::new();
    for _ in 0..START_ATTEMPTS {
        match start_once(&bin) {
            Ok(server) => return Ok(server),
            // Most likely a port taken between picking and binding it: new ports, new try.
            Err(e) => errors.push(e),
        }
    }
    Err(errors.join("\n\n--- next attempt ---\n"))
}

/// `KUBE_BIN_DIR`, else the last line `scripts/build-kube.sh` prints (it builds once, ~6 min).
fn bin_dir() -> Result<PathBuf, String> {
    let dir = match std::env::var_os("KUBE_BIN_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-kube.sh");
            eprintln!(
                "KUBE_BIN_DIR is not set: running {} (a first build takes minutes)",
                script.display()
            );
            let output = Command::new("bash")
                .arg(&script)
                .stdin(Stdio::null())
                .stderr(Stdio::inherit())
                .output()
                .map_err(|e| format!("running {}: {e}", script.display()))?;
            if !output.status.success() {
                return Err(format!("{} failed: {}", script.display(), output.status));
            }
            let stdout = String::from_utf8_lossy(&output.stdout);
            PathBuf::from(stdout.lines().last().unwrap_or_default().trim())
        }
    };
    for binary in ["etcd", "kube-apiserver"] {
        if !dir.join(binary).is_file() {
            return Err(format!(
                "no {binary} in {}: run scripts/build-kube.sh (make kube)",
                dir.display()
            ));
        }
    }
    Ok(dir)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

fn random_hex() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn start_once(bin: &Path) -> Result<KubeApiserver, String> {
    let work_dir = tempfile::Builder::new()
        .prefix(&format!("{WORK_DIR_PREFIX}{}-", std::process::id()))
        .tempdir()
        .map_err(|e| format!("work dir: {e}"))?
        .keep();
    match start_in(bin, &work_dir) {
        Ok(server) => Ok(server),
        Err(e) => {
            stop_processes();
            let _ = std::fs::remove_dir_all(&work_dir);
            Err(e)
        }
    }
}

fn start_in(bin: &Path, work: &Path) -> Result<KubeApiserver, String> {
    certificates(work)?;
    let admin_token = random_hex();
    let tester_token = random_hex();
    std::fs::write(
        work.join("tokens.csv"),
        format!(
            "{admin_token},{ADMIN_USER},{ADMIN_USER},system:masters\n\
             {tester_token},{TESTER_USER},{TESTER_USER}\n"
        ),
    )
    .map_err(|e| format!("token file: {e}"))?;

    let (etcd_client, etcd_peer, etcd_http, api_port) =
        (free_port(), free_port(), free_port(), free_port());
    let started = Instant::now();
    let mut etcd = Command::new(bin.join("etcd"));
    etcd.args(["--name", "test", "--data-dir"])
        .arg(work.join("etcd"))
        .args([
            "--listen-client-urls",
            &format!("http://127.0.0.1:{etcd_client}"),
            "--advertise-client-urls",
            &format!("http://127.0.0.1:{etcd_client}"),
            "--listen-client-http-urls",
            &format!("http://127.0.0.1:{etcd_http}"),
            "--listen-peer-urls",
            &format!("http://127.0.0.1:{etcd_peer}"),
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{etcd_peer}"),
            "--initial-cluster",
            &format!("test=http://127.0.0.1:{etcd_peer}"),
            "--unsafe-no-fsync",
            "--log-level",
            "warn",
        ]);
    let etcd = spawn_logged(etcd, &work.join("etcd.log"))?;
    *lock_processes() = Some(Processes {
        apiserver: None,
        etcd: Some(etcd),
        work_dir: work.to_owned(),
    });
    register_stop_at_exit();
    wait_until(ETCD_DEADLINE, "etcd healthy", work, "etcd.log", || {
        if let Some(status) = exited(|p| &mut p.etcd) {
            return Err(format!("etcd exited with {status}"));
        }
        Ok(http_get(etcd_http, "/health").is_some_and(|body| body.contains("\"health\":\"true\"")))
    })?;
    let etcd_started_in = started.elapsed();

    let mut apiserver = Command::new(bin.join("kube-apiserver"));
    let path = |name: &str| work.join(name).display().to_string();
    apiserver.args([
        "--etcd-servers",
        &format!("http://127.0.0.1:{etcd_client}"),
        "--bind-address",
        "127.0.0.1",
        "--advertise-address",
        "127.0.0.1",
        "--secure-port",
        &api_port.to_string(),
        "--tls-cert-file",
        &path("serving.crt"),
        "--tls-private-key-file",
        &path("serving.key"),
        "--token-auth-file",
        &path("tokens.csv"),
        "--authorization-mode",
        "RBAC",
        "--service-account-issuer",
        "https://kubernetes.default.svc.cluster.local",
        "--service-account-key-file",
        &path("sa.pub"),
        "--service-account-signing-key-file",
        &path("sa.key"),
        "--service-cluster-ip-range",
        "10.0.0.0/24",
        "--endpoint-reconciler-type",
        "none",
        "--cert-dir",
        &path("certs"),
    ]);
    let apiserver = spawn_logged(apiserver, &work.join("kube-apiserver.log"))?;
    lock_processes().as_mut().expect("set above").apiserver = Some(apiserver);

    let url = format!("https://127.0.0.1:{api_port}");
    let ca_pem = read(work, "ca.crt")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    // The HTTP client's timers need the runtime, also outside `block_on`.
    let _entered = runtime.enter();
    let http = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(ca_pem.as_bytes()).map_err(|e| e.to_string())?,
        )
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| format!("http client: {e}"))?;
    let get = |path: &str| {
        let request = http
            .get(format!("{url}{path}"))
            .bearer_auth(&admin_token)
            .send();
        runtime.block_on(async {
            let response = request.await.ok()?;
            let ok = response.status().is_success();
            let body = response.text().await.ok()?;
            ok.then_some(body)
        })
    };
    wait_until(
        READY_DEADLINE,
        "kube-apiserver /readyz",
        work,
        "kube-apiserver.log",
        || {
            if let Some(status) = exited(|p| &mut p.apiserver) {
                return Err(format!("kube-apiserver exited with {status}"));
            }
            Ok(get("/readyz").is_some_and(|body| body == "ok"))
        },
    )?;
    let started_in = started.elapsed();
    let version = get("/version")
        .and_then(|body| serde_json::from_str::<serde_json::Value>(&body).ok())
        .and_then(|v| v["gitVersion"].as_str().map(str::to_owned))
        .unwrap_or_default();
    eprintln!(
        "kube-apiserver {version} ready at {url} in {started_in:.2?} (etcd healthy after \
         {etcd_started_in:.2?}); work dir {}",
        work.display()
    );
    Ok(KubeApiserver {
        url,
        ca_pem,
        serving_cert_pem: read(work, "serving.crt")?,
        serving_key_pem: read(work, "serving.key")?,
        admin_token,
        tester_token,
        version,
        started_in,
        etcd_started_in,
        work_dir: work.to_owned(),
    })
}

fn read(work: &Path, name: &str) -> Result<String, String> {
    std::fs::read_to_string(work.join(name)).map_err(|e| format!("reading {name}: {e}"))
}

/// Polls `ready` until it says yes, fails, or the deadline passes (then the log's tail is part
/// of the error).
fn wait_until(
    deadline: Duration,
    what: &str,
    work: &Path,
    log: &str,
    mut ready: impl FnMut() -> Result<bool, String>,
) -> Result<(), String> {
    let until = Instant::now() + deadline;
    loop {
        match ready() {
            Ok(true) => return Ok(()),
            Ok(false) if Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(false) => {
                return Err(format!(
                    "not {what} within {deadline:?}\n--- {log} (tail) ---\n{}",
                    tail_file(&work.join(log), 40)
                ));
            }
            Err(e) => {
                return Err(format!(
                    "{e}\n--- {log} (tail) ---\n{}",
                    tail_file(&work.join(log), 40)
                ));
            }
        }
    }
}

fn lock_processes() -> std::sync::MutexGuard<'static, Option<Processes>> {
    PROCESSES.lock().unwrap_or_else(|p| p.into_inner())
}

/// The exit status of one of the children, if it has exited.
fn exited(
    which: impl FnOnce(&mut Processes) -> &mut Option<Child>,
) -> Option<std::process::ExitStatus> {
    let mut guard = lock_processes();
    let child = which(guard.as_mut()?).as_mut()?;
    child.try_wait().ok().flatten()
}

/// Spawns `command` (from the harness thread) with its output in `log` and SIGKILL as its
/// parent-death signal.
fn spawn_logged(mut command: Command, log: &Path) -> Result<Child, String> {
    use std::os::unix::process::CommandExt as _;
    let out = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    command
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .env_remove("KUBECONFIG");
    // SAFETY: only prctl (async-signal-safe) between fork and exec.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    command
        .spawn()
        .map_err(|e| format!("spawning {:?}: {e}", command.get_program()))
}

/// One plain HTTP GET on loopback; the body when the answer is 200.
fn http_get(port: u16, path: &str) -> Option<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// The CA, the serving certificate for 127.0.0.1 it signs, and the service-account key pair.
fn certificates(work: &Path) -> Result<(), String> {
    std::fs::write(
        work.join("openssl.cnf"),
        "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = unused\n\
         [ca]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n\
         subjectKeyIdentifier = hash\n\
         [server]\nbasicConstraints = critical,CA:FALSE\n\
         keyUsage = critical,digitalSignature,keyEncipherment\nextendedKeyUsage = serverAuth\n\
         subjectAltName = IP:127.0.0.1,DNS:localhost\nsubjectKeyIdentifier = hash\n\
         authorityKeyIdentifier = keyid\n",
    )
    .map_err(|e| format!("openssl.cnf: {e}"))?;
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        work,
        &[
            &[
                "req",
                "-x509",
                "-config",
                "openssl.cnf",
                "-extensions",
                "ca",
            ][..],
            &ec,
            &[
                "-days",
                "7",
                "-subj",
                "/CN=backup-provisioner test CA",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
            ],
        ]
        .concat(),
    )?;
    openssl(
        work,
        &[
            &["req", "-new", "-config", "openssl.cnf"][..],
            &ec,
            &[
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
                "serving.key",
                "-out",
                "serving.csr",
            ],
        ]
        .concat(),
    )?;
    openssl(
        work,
        &[
            "x509",
            "-req",
            "-in",
            "serving.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-set_serial",
            "2",
            "-days",
            "7",
            "-extfile",
            "openssl.cnf",
            "-extensions",
            "server",
            "-out",
            "serving.crt",
        ],
    )?;
    openssl(
        work,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "sa.key",
        ],
    )?;
    openssl(
        work,
        &["pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub"],
    )
}

fn openssl(work: &Path, args: &[&str]) -> Result<(), String> {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(work)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running openssl (is it installed?): {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "openssl {}: {}\n{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

fn tail_file(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn register_stop_at_exit() {
    static REGISTERED: OnceLock<()> = OnceLock::new();
    REGISTERED.get_or_init(|| {
        // SAFETY: registers a plain `extern "C" fn` that catches every panic.
        let rc = unsafe { libc::atexit(stop_at_exit) };
        assert_eq!(rc, 0, "atexit");
    });
}

extern "C" fn stop_at_exit() {
    let _ = std::panic::catch_unwind(stop_processes);
}

/// kube-apiserver first (SIGTERM; it does not exit while etcd is gone), then etcd; SIGKILL
/// after [`STOP_GRACE`]. Then the work dir goes.
fn stop_processes() {
    let Some(mut processes) = lock_processes().take() else {
        return;
    };
    let started = Instant::now();
    for child in [&mut processes.apiserver, &mut processes.etcd]
        .into_iter()
        .flatten()
    {
        stop_child(child);
    }
    let _ = std::fs::remove_dir_all(&processes.work_dir);
    eprintln!(
        "kube-apiserver and etcd stopped in {:.2?}",
        started.elapsed()
    );
}

fn stop_child(child: &mut Child) {
    if child.try_wait().ok().flatten().is_some() {
        return;
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let until = Instant::now() + STOP_GRACE;
    while Instant::now() < until {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Removes work dirs of earlier test processes that no longer run (killed before their
/// `atexit` hook; their children died with them).
fn sweep_stale_work_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(WORK_DIR_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        if !alive {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
