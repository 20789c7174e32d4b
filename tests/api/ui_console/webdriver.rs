//! The few W3C WebDriver commands the console tests use, over reqwest, against a chromedriver
//! this module starts on a free port with a headless Chromium of a fresh profile.
//!
//! Conditions are waited for with a deadline ([`Browser::wait_for`]); nothing sleeps.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};

use crate::support::app::{eventually, free_port};

/// How long a condition in the page may take (a provisioning job included).
pub const DEADLINE: Duration = Duration::from_secs(90);

/// Chromium and its driver, found on `PATH`.
#[derive(Debug, Clone)]
pub struct Tools {
    pub chromium: PathBuf,
    pub chromedriver: PathBuf,
}

fn on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    })
}

/// The browser and its driver; `None` (with a message) when they are not installed outside
/// CI. In CI (`CI=true`) a missing browser fails the test.
pub fn tools() -> Option<Tools> {
    let chromium = on_path("chromium").or_else(|| on_path("chromium-browser"));
    let chromedriver = on_path("chromedriver");
    match (chromium, chromedriver) {
        (Some(chromium), Some(chromedriver)) => Some(Tools {
            chromium,
            chromedriver,
        }),
        _ => {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true");
            assert!(
                !ci,
                "the console tests need chromium and chromedriver (Debian: chromium, \
                 chromium-driver); scripts/install-deps.sh installs them"
            );
            eprintln!(
                "SKIPPED: chromium or chromedriver is not installed (scripts/install-deps.sh \
                 installs them; with CI=true this test fails instead)"
            );
            None
        }
    }
}

/// One browser session. Dropping it ends chromedriver (and with it the browser).
pub struct Browser {
    http: reqwest::Client,
    session: String,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    /// Also after a failed assertion: the session is ended as on a normal quit (Chromium
    /// exits), then chromedriver's whole process group, whatever is left of the browser in it.
    fn drop(&mut self) {
        let session = self.session.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let delete = reqwest::Client::new().delete(&session).send();
                tokio::time::timeout(Duration::from_secs(10), delete)
                    .await
                    .ok()
            });
            Some(())
        })
        .join();
        if let Ok(group) = i32::try_from(self.driver.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(group),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Browser {
    pub async fn launch(tools: &Tools) -> Browser {
        let port = free_port();
        let driver = Command::new(&tools.chromedriver)
            .arg(format!("--port={port}"))
            // A group of its own, so that dropping the browser ends every process of it.
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        eventually(Duration::from_secs(30), "chromedriver to be ready", || {
            let http = http.clone();
            let status = format!("{base}/status");
            async move {
                let answer: Value = http.get(status).send().await.ok()?.json().await.ok()?;
                answer["value"]["ready"].as_bool().filter(|ready| *ready)
            }
        })
        .await;
        let profile = tempfile::tempdir().expect("a profile directory");
        let session = new_session(&http, &base, tools, profile.path()).await;
        Browser {
            http,
            session: format!("{base}/session/{session}"),
            driver,
            _profile: profile,
        }
    }

    async fn command(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.session);
        let mut request = self.http.request(method.clone(), &url);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("a WebDriver answer");
        let status = response.status();
        let answer: Value = response.json().await.expect("WebDriver JSON");
        assert!(
            status.is_success(),
            "WebDriver {method} {path}: {status} {answer}"
        );
        answer["value"].clone()
    }

    pub async fn goto(&self, url: &str) {
        self.command(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    /// Runs `script` (a function body; `arguments[i]` are `args`) and returns its value.
    pub async fn eval(&self, script: &str, args: Value) -> Value {
        let body = json!({ "script": script, "args": args });
        self.command(reqwest::Method::POST, "/execute/sync", Some(body))
            .await
    }

    /// Waits until `script` returns something other than null, false or undefined.
    pub async fn wait_for(&self, what: &str, script: &str, args: Value) -> Value {
        eventually(DEADLINE, what, || {
            let args = args.clone();
            async move {
                let value = self.eval(script, args).await;
                (!value.is_null() && value != Value::Bool(false)).then_some(value)
            }
        })
        .await
    }

    /// The first element matching `css`, if any.
    pub async fn find(&self, css: &str) -> Option<String> {
        let body = json!({ "using": "css selector", "value": css });
        let found = self
            .command(reqwest::Method::POST, "/elements", Some(body))
            .await;
        found.as_array()?.first().and_then(element_id)
    }

    async fn element(&self, css: &str) -> String {
        self.find(css)
            .await
            .unwrap_or_else(|| panic!("no element matches {css}"))
    }

    pub async fn click(&self, css: &str) {
        let id = self.element(css).await;
        self.command(
            reqwest::Method::POST,
            &format!("/element/{id}/click"),
            Some(json!({})),
        )
        .await;
    }

    /// Types `text` into the element, as keystrokes.
    pub async fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css).await;
        self.command(
            reqwest::Method::POST,
            &format!("/element/{id}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    pub async fn set_window_size(&self, width: u32, height: u32) {
        let body = json!({ "width": width, "height": height });
        self.command(reqwest::Method::POST, "/window/rect", Some(body))
            .await;
    }

    /// Saves the viewport as a PNG file `name.png` in `dir`.
    pub async fn screenshot(&self, dir: &Path, name: &str) -> PathBuf {
        let encoded = self
            .command(reqwest::Method::GET, "/screenshot", None)
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().expect("base64 text"))
            .expect("a base64 PNG");
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::create_dir_all(dir).expect("the screenshot directory");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write the screenshot");
        path
    }

    /// Ends the session (dropping the browser does the same, and more, also after a panic).
    pub async fn quit(self) {
        let _ = self.http.delete(&self.session).send().await;
    }
}

fn element_id(element: &Value) -> Option<String> {
    element["element-6066-11e4-a52e-4f735466cecf"]
        .as_str()
        .map(str::to_owned)
}

async fn new_session(http: &reqwest::Client, base: &str, tools: &Tools, profile: &Path) -> String {
    // As root in a container, without the machine's GPU and with a closed network: these flags
    // keep Chromium from reaching out (and from failing at it).
    let args = [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--disable-breakpad",
        "--window-size=1280,900",
        &format!("--user-data-dir={}", profile.display()),
    ];
    let capabilities = json!({ "capabilities": { "alwaysMatch": {
        "browserName": "chrome",
        "goog:chromeOptions": { "binary": tools.chromium, "args": args },
    }}});
    let response = http
        .post(format!("{base}/session"))
        .json(&capabilities)
        .send()
        .await
        .expect("a new session");
    let answer: Value = response.json().await.expect("session JSON");
    answer["value"]["sessionId"]
        .as_str()
        .unwrap_or_else(|| panic!("no session: {answer}"))
        .to_owned()
}
