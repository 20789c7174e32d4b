//! A TLS proxy (nginx) in front of plain-http moto.

use super::*;

/// nginx terminating TLS on `127.0.0.1:port` and forwarding to a plain-http upstream (moto),
/// with a fresh self-signed certificate (`ca_file`) valid for 127.0.0.1 and localhost.
/// Killed on drop.
pub struct TlsProxy {
    pub port: u16,
    /// The self-signed certificate, usable as `repo2-storage-ca-file` (world-readable).
    pub ca_file: PathBuf,
    pub upstream: String,
    /// How long generating the certificate and starting nginx took.
    pub startup: Duration,
    error_log: PathBuf,
    child: Child,
    dir: tempfile::TempDir,
}

impl TlsProxy {
    /// Starts the proxy in front of `upstream` (`http://127.0.0.1:PORT`) and waits until the
    /// port completes a TLS handshake that verifies against `ca_file`. Panics on failure.
    pub fn start(upstream: &str) -> TlsProxy {
        Self::try_start(upstream).unwrap_or_else(|e| panic!("TLS proxy: {e:#}"))
    }

    pub fn try_start(upstream: &str) -> anyhow::Result<TlsProxy> {
        let started = Instant::now();
        let upstream = upstream.trim_end_matches('/').to_owned();
        if !upstream.starts_with("http://") {
            bail!("upstream must be a plain http:// URL, got {upstream}");
        }
        let dir = tempfile::Builder::new().prefix("tls-proxy-").tempdir()?;
        // Traversable by nginx workers (user nobody) and pgBackRest (user postgres); the key
        // stays 0600 (read by the root master process only).
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))?;
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        let mut openssl = Command::new("openssl");
        openssl
            .args(["req", "-x509", "-nodes", "-days", "2"])
            .args(["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"])
            .args(["-subj", "/CN=127.0.0.1"])
            .args([
                "-addext",
                "subjectAltName=DNS:127.0.0.1,DNS:localhost,IP:127.0.0.1",
            ])
            // A leaf certificate (rustls rejects a CA:TRUE certificate as the server's own:
            // CaUsedAsEndEntity); OpenSSL (pgBackRest, curl) trusts it as its own anchor.
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .args(["-addext", "keyUsage=critical,digitalSignature"])
            .args(["-addext", "extendedKeyUsage=serverAuth"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert);
        run_command(openssl, SHORT_COMMAND_DEADLINE)?;
        fs::set_permissions(&cert, fs::Permissions::from_mode(0o644))?;
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600))?;
        let ca_pem = fs::read(&cert)?;

        let deadline = Instant::now() + PROXY_START_DEADLINE;
        let mut attempts = Vec::new();
        while Instant::now() < deadline {
            let port = free_port();
            let conf = dir.path().join("nginx.conf");
            let error_log = dir.path().join("error.log");
            fs::write(&conf, nginx_conf(dir.path(), port, &upstream, &cert, &key))?;
            let mut command = Command::new("nginx");
            command
                .arg("-p")
                .arg(dir.path())
                .arg("-c")
                .arg(&conf)
                .arg("-e")
                .arg(&error_log)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(fs::File::create(dir.path().join("nginx.stderr"))?);
            // SIGTERM: nginx's fast shutdown, which also stops its worker.
            let mut child = spawn_tied(command, Signal::SIGTERM)
                .context("starting nginx (scripts/install-deps.sh installs nginx-light)")?;
            match wait_tls(&mut child, port, &ca_pem, deadline) {
                Ok(()) => {
                    return Ok(TlsProxy {
                        port,
                        ca_file: cert,
                        upstream,
                        startup: started.elapsed(),
                        error_log,
                        child,
                        dir,
                    });
                }
                Err(e) => {
                    terminate(&mut child, Signal::SIGTERM, Duration::from_secs(5));
                    let stderr =
                        fs::read_to_string(dir.path().join("nginx.stderr")).unwrap_or_default();
                    let log = fs::read_to_string(&error_log).unwrap_or_default();
                    attempts.push(format!("port {port}: {e}\n{stderr}{log}"));
                    // Most likely the port was taken in between: try another one.
                }
            }
        }
        bail!(
            "nginx did not serve TLS within {PROXY_START_DEADLINE:?}:\n{}",
            attempts.join("\n")
        )
    }

    /// `https://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// nginx's error log so far (for failure messages).
    pub fn error_log(&self) -> String {
        fs::read_to_string(&self.error_log).unwrap_or_default()
    }

    /// nginx's access log so far (one line per proxied request).
    pub fn access_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        terminate(&mut self.child, Signal::SIGTERM, Duration::from_secs(5));
    }
}

fn nginx_conf(dir: &Path, port: u16, upstream: &str, cert: &Path, key: &Path) -> String {
    let d = dir.display();
    format!(
        r#"daemon off;
master_process on;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
  access_log {d}/access.log;
  client_body_temp_path {d}/client_body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    client_max_body_size 0;
    location / {{
      proxy_pass {upstream};
      proxy_request_buffering off;
      proxy_buffering off;
      proxy_http_version 1.1;
      proxy_set_header Host $http_host;
      proxy_read_timeout 300s;
      proxy_send_timeout 300s;
    }}
  }}
}}
"#,
        cert = cert.display(),
        key = key.display(),
    )
}

/// Polls until a TLS handshake on `port` verifies against `ca_pem` (as 127.0.0.1), the child
/// exits, or the deadline passes.
fn wait_tls(child: &mut Child, port: u16, ca_pem: &[u8], deadline: Instant) -> anyhow::Result<()> {
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("nginx exited early with {status}");
        }
        let last = match tls_handshake(port, ca_pem) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            bail!("no TLS handshake before the deadline (last: {last:#})");
        }
        std::thread::sleep(POLL);
    }
}

fn tls_handshake(port: u16, ca_pem: &[u8]) -> anyhow::Result<()> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = ServerName::try_from("127.0.0.1")?.to_owned();
    let mut tls = rustls::ClientConnection::new(Arc::new(config), name)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut socket = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    socket.set_write_timeout(Some(Duration::from_secs(2)))?;
    while tls.is_handshaking() {
        tls.complete_io(&mut socket)?;
    }
    Ok(())
}
