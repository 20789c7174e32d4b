//! `backup-provisioner client` end to end: the real binary's subcommands against a running
//! service (moto, the real kube-apiserver, workers), configured by environment as an operator
//! would (`BP_API_URL`, `BP_TOKEN`). Exit codes: 0 done, 1 job failed, 2 usage, 3 refused (4xx),
//! 4 unavailable.

use std::time::Duration;

use serde_json::Value;

use crate::support::app::free_port;
use crate::support::env::{Env, bucket_for, unique_name};

const NS: &str = "zitadel";

struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!("stdout is not JSON ({e}): {}\n{}", self.stdout, self.stderr)
        })
    }

    fn assert_code(&self, code: i32) -> &Ran {
        assert_eq!(
            self.code,
            Some(code),
            "stdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }
}

/// Runs `backup-provisioner client <args>` against `url` with `token` in the environment.
async fn client(url: &str, token: &str, args: &[&str]) -> Ran {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_backup-provisioner"))
        .arg("client")
        .args(args)
        .env_clear()
        .env("BP_API_URL", url)
        .env("BP_TOKEN", token)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), output)
        .await
        .expect("the client ended in time")
        .expect("run the client");
    let ran = Ran {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    // Whatever happened, a real token (a JWT; not the tests' one-letter stand-ins) is never
    // printed.
    if token.len() >= 20 {
        assert!(
            !ran.stdout.contains(token) && !ran.stderr.contains(token),
            "the client printed its token (args {args:?})"
        );
    }
    ran
}

struct Cli {
    env: Env,
    url: String,
}

impl Cli {
    async fn start() -> Cli {
        let env = Env::start(&[NS]).await;
        let url = format!("http://{}", env.app.addr);
        Cli { env, url }
    }

    async fn operator(&self, args: &[&str]) -> Ran {
        client(&self.url, &self.env.app.operator(), args).await
    }

    async fn viewer(&self, args: &[&str]) -> Ran {
        client(&self.url, &self.env.app.viewer(), args).await
    }
}

/// create --wait provisions with live step progress (exit 0); get and list answer in JSON and
/// as tables; jobs, events and the audit log list what happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_wait_get_and_list_through_the_client() {
    let cli = Cli::start().await;
    let name = unique_name("cli");
    let ns = cli.env.ns(NS).to_owned();
    let created = cli
        .operator(&[
            "create",
            &name,
            "--namespace",
            &ns,
            "--region",
            "us-east-1",
            "--wait",
        ])
        .await;
    created.assert_code(0);
    // "running" lines too: --wait reads the job's event stream, which has every transition (a
    // long poll may see a step only once it ended).
    for step in [
        "… bucket running (attempt 1)",
        "✓ bucket succeeded",
        "✓ secret succeeded",
    ] {
        assert!(
            created.stderr.contains(step),
            "no '{step}' in:\n{}",
            created.stderr
        );
    }
    // The job's own line comes last, after its steps.
    let last = created.stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("job ") && last.contains(" succeeded (provision-repository)"),
        "{}",
        created.stderr
    );
    assert!(created.stdout.contains("succeeded"), "{}", created.stdout);
    assert_get_and_list(&cli, &name, &ns).await;
    assert_jobs_and_audit(&cli, &name).await;
}

async fn assert_get_and_list(cli: &Cli, name: &str, ns: &str) {
    let got = cli.viewer(&["get", name, "--output", "json"]).await;
    let repository = got.assert_code(0).json();
    assert_eq!(repository["state"], "ready", "{repository:#}");
    assert_eq!(repository["bucket"], bucket_for(name));
    let table = cli.viewer(&["get", name]).await;
    table.assert_code(0);
    assert!(
        table
            .stdout
            .lines()
            .any(|l| l.starts_with("state") && l.ends_with("ready")),
        "{}",
        table.stdout
    );
    let listed = cli
        .viewer(&["-o", "json", "list", "--namespace", ns, "--state", "ready"])
        .await;
    let names: Vec<Value> = listed.assert_code(0).json()["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|r| r["name"].clone())
        .collect();
    assert_eq!(names, [Value::from(name)]);
    let table = cli.viewer(&["list", "--namespace", ns]).await;
    table.assert_code(0);
    assert!(table.stdout.starts_with("NAME "), "{}", table.stdout);
    assert!(
        table
            .stdout
            .lines()
            .any(|l| l.starts_with(name) && l.contains("ready")),
        "{}",
        table.stdout
    );
}

async fn assert_jobs_and_audit(cli: &Cli, name: &str) {
    let jobs = cli
        .viewer(&["jobs", "list", "--repository", name, "-o", "json"])
        .await;
    let jobs = jobs.assert_code(0).json();
    let id = jobs["items"][0]["id"].as_str().expect("a job").to_owned();
    let job = cli.viewer(&["jobs", "get", &id]).await;
    job.assert_code(0);
    assert!(
        job.stdout.contains("STEP") && job.stdout.contains("bucket"),
        "{}",
        job.stdout
    );
    let events = cli.viewer(&["jobs", "events", &id, "-o", "json"]).await;
    assert!(
        !events.assert_code(0).json()["items"]
            .as_array()
            .expect("items")
            .is_empty()
    );
    let audit = cli.viewer(&["audit", "--repository", name]).await;
    audit.assert_code(0);
    assert!(
        audit.stdout.contains("repository.create"),
        "{}",
        audit.stdout
    );
}

/// A dry run prints the plan as a table and changes nothing; verify --wait follows the
/// read-only verification to its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_runs_print_plans_and_verify_waits() {
    let cli = Cli::start().await;
    let name = unique_name("cli-plan");
    let ns = cli.env.ns(NS).to_owned();
    let plan = cli
        .operator(&["create", &name, "--namespace", &ns, "--dry-run"])
        .await;
    plan.assert_code(0);
    assert!(
        plan.stdout.starts_with("dry run of provision-repository"),
        "{}",
        plan.stdout
    );
    assert!(
        plan.stdout.contains("RESOURCE") && plan.stdout.contains("ACTION"),
        "{}",
        plan.stdout
    );
    assert!(plan.stdout.contains(&bucket_for(&name)), "{}", plan.stdout);
    let missing = cli.viewer(&["get", &name]).await;
    missing.assert_code(3);
    cli.operator(&["create", &name, "--namespace", &ns, "--wait"])
        .await
        .assert_code(0);
    let verify_plan = cli
        .operator(&["verify", &name, "--dry-run", "-o", "json"])
        .await;
    assert_eq!(verify_plan.assert_code(0).json()["dry_run"], true);
    let verified = cli.operator(&["verify", &name, "--wait"]).await;
    verified.assert_code(0);
    assert!(
        verified.stderr.contains("✓ credential succeeded"),
        "{}",
        verified.stderr
    );
    let repository = cli.viewer(&["get", &name, "-o", "json"]).await.json();
    assert!(repository["verified_at"].is_string(), "{repository:#}");
    assert_eq!(repository["drift_count"], 0, "{repository:#}");
}

/// A job that fails exits 1 with its error; a 4xx exits 3 with the problem's detail (and field
/// errors); a missing token is a usage error (2); no service is exit 4.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_have_their_exit_codes() {
    let cli = Cli::start().await;
    let name = unique_name("cli-fail");
    let ns = cli.env.ns(NS).to_owned();
    // Adopting what was never made fails at once, permanently: nothing to adopt.
    let adopted = cli
        .operator(&["create", &name, "--namespace", &ns, "--adopt", "--wait"])
        .await;
    adopted.assert_code(1);
    assert!(adopted.stderr.contains("failed"), "{}", adopted.stderr);
    assert!(
        adopted.stderr.lines().any(|l| l.starts_with("error: job ")),
        "{}",
        adopted.stderr
    );
    let unknown = cli.viewer(&["get", "no-such-repository"]).await;
    unknown.assert_code(3);
    assert!(
        unknown.stderr.starts_with("error: ") && unknown.stderr.contains("no-such-repository"),
        "{}",
        unknown.stderr
    );
    let invalid = cli
        .operator(&["create", "Not_A_Name", "--namespace", &ns, "--bucket", "x"])
        .await;
    invalid.assert_code(3);
    assert!(
        invalid
            .stderr
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("  ")),
        "field errors expected:\n{}",
        invalid.stderr
    );
    let forbidden = cli.viewer(&["reconcile", &name]).await;
    forbidden.assert_code(3);
    let no_token = client(&cli.url, "", &["list"]).await;
    no_token.assert_code(2);
    assert!(no_token.stderr.contains("BP_TOKEN"), "{}", no_token.stderr);
    let nowhere = client(&format!("http://127.0.0.1:{}", free_port()), "t", &["list"]).await;
    nowhere.assert_code(4);
    assert!(
        nowhere
            .stderr
            .starts_with("error: cannot reach http://127.0.0.1:"),
        "{}",
        nowhere.stderr
    );
}

/// Against an API without workers a queued job never ends: --wait gives up after
/// --wait-timeout with exit 5 and the job's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_that_times_out_exits_5() {
    let env = Env::builder(&[NS]).workers(0).start().await;
    let url = format!("http://{}", env.app.addr);
    let token = env.app.operator();
    let name = unique_name("cli-queued");
    let ns = env.ns(NS).to_owned();
    let create = ["create", &name, "--namespace", &ns];
    let waited = client(
        &url,
        &token,
        &[&create[..], &["--wait", "--wait-timeout", "2s"]].concat(),
    )
    .await;
    waited.assert_code(5);
    assert!(
        waited.stderr.contains("still queued after 2s"),
        "{}",
        waited.stderr
    );
}

/// A 5xx problem (here from a stand-in server) is "unavailable": exit 4 with its detail.
#[tokio::test]
async fn a_5xx_answer_exits_4_with_its_detail() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut request = [0u8; 4096];
            let _ = socket.read(&mut request).await;
            let body = r#"{"type":"about:blank","title":"Service Unavailable","status":503,"detail":"the database is unreachable"}"#;
            let answer = format!(
                "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(answer.as_bytes()).await;
        }
    });
    let listed = client(&url, "t", &["list"]).await;
    listed.assert_code(4);
    assert_eq!(listed.stderr.trim(), "error: the database is unreachable");
}
