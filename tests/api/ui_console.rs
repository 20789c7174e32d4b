//! The operator console (`/ui`) in a real browser: headless Chromium driven over WebDriver
//! against the service with moto and the real kube-apiserver. An operator signs in with a
//! pasted token, sees the fleet, watches a provisioning job's steps complete live (the job is
//! held at its Secret write while the page is open, then let go: the page must follow without
//! a reload), reconciles a repository through the confirmation dialog; a viewer does not get
//! the buttons. Each page is saved as a PNG in `BP_UI_SCREENSHOTS` (default
//! `target/ui-screenshots`).
//!
//! Without the browser (Debian's chromium and chromium-driver) the browser test is skipped
//! with a message, except in CI (`CI=true`), where it fails.

mod idp;
mod webdriver;

use std::path::PathBuf;

use regex::Regex;
use serde_json::{Value, json};

use self::webdriver::{Browser, tools};
use crate::support::app::{AppOptions, TestApp, http_args, spawn_app, spawn_app_with};
use crate::support::env::{Env, bucket_for, unique_name};
use crate::support::kube_proxy::Hold;

const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

fn screenshots() -> PathBuf {
    std::env::var_os("BP_UI_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/ui-screenshots"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_watches_a_job_live_and_reconciles_a_viewer_only_reads() {
    let Some(tools) = tools() else { return };
    let env = Env::start(&["zitadel", "gitea"]).await;
    let alpha = unique_name("alpha");
    let bravo = unique_name("bravo");
    for (name, ns) in [(&alpha, "zitadel"), (&bravo, "gitea")] {
        let job = env
            .provision(json!({ "name": name, "namespace": env.ns(ns) }))
            .await;
        assert_eq!(job["state"], "succeeded", "{job:#}");
    }
    // Verifications, so the pages show drift reports: bravo's bucket lost its public access
    // block by hand.
    env.admin
        .s3_for_region(&env.region)
        .delete_public_access_block()
        .bucket(bucket_for(&bravo))
        .send()
        .await
        .expect("delete the public access block");
    for name in [&alpha, &bravo] {
        verify(&env, name).await;
    }
    let browser = Browser::launch(&tools).await;
    browser.set_window_size(1360, 1000).await;
    let dir = screenshots();

    browser.goto(&env.app.url("/ui/")).await;
    browser
        .wait_for(
            "the sign-in form",
            "return !document.getElementById('login').hidden",
            json!([]),
        )
        .await;
    browser.screenshot(&dir, "login").await;
    sign_in(&browser, &env.app.operator(), "operator").await;
    // Set once: a reload would lose it (and the token with it).
    browser
        .eval("window.__notReloaded = true;", json!([]))
        .await;

    // Fleet: both repositories ready.
    show(&browser, "#/fleet", "fleet").await;
    for name in [&alpha, &bravo] {
        browser
            .wait_for(
                &format!("{name} ready on the fleet page"),
                "return document.querySelector(`#fleet-table tr[data-repository='${arguments[0]}'][data-state='ready']`) !== null",
                json!([name]),
            )
            .await;
    }
    let ready = browser
        .eval(
            "return document.querySelector(\"[data-count='ready'] .number\").textContent",
            json!([]),
        )
        .await;
    assert_eq!(ready, "2", "the count of ready repositories");
    let why = browser
        .wait_for(
            "bravo's drift said in one line",
            "const row = document.querySelector(`tr[data-why-for='${arguments[0]}']`); \
             return row && row.textContent",
            json!([bravo]),
        )
        .await;
    assert!(
        why.as_str().unwrap_or_default().starts_with("Drifting: "),
        "{why}"
    );
    browser.screenshot(&dir, "fleet").await;

    watch_a_job_live(&env, &browser, &dir).await;
    cancel_and_retry_on_the_job_page(&env, &browser).await;
    reconcile_as_operator(&env, &browser, &dir, &alpha).await;

    // Audit: the operator's requests on alpha.
    show(&browser, &format!("#/audit?repository={alpha}"), "audit").await;
    let rows = browser
        .eval(
            "return document.querySelectorAll('#audit-table tbody tr').length",
            json!([]),
        )
        .await;
    assert!(rows.as_u64().unwrap_or(0) > 0, "audit rows: {rows}");
    browser.screenshot(&dir, "audit").await;
    // The whole log runs over more than one page (50 entries): the next page follows the
    // last entry of this one.
    show(&browser, "#/audit", "audit").await;
    let last_of_first = audit_ids(&browser).await.last().copied().expect("entries");
    browser.click("#audit-next").await;
    browser
        .wait_for(
            "the audit log's second page",
            "const view = document.getElementById('view'); \
             return window.location.hash.includes('trail=') && view.dataset.page === 'audit' \
                 && view.dataset.loaded === 'true'",
            json!([]),
        )
        .await;
    let second = audit_ids(&browser).await;
    assert!(
        second.first().is_some_and(|first| *first > last_of_first),
        "page 2 {second:?} after {last_of_first}"
    );
    // The fleet filtered by namespace: gitea's only.
    let gitea = env.ns("gitea").to_owned();
    show(&browser, &format!("#/fleet?namespace={gitea}"), "fleet").await;
    let shown = browser
        .eval(
            "return [...document.querySelectorAll('#fleet-table tr[data-repository]')].map((r) => r.dataset.repository)",
            json!([]),
        )
        .await;
    assert_eq!(shown, json!([bravo]));
    assert_eq!(
        browser
            .eval("return window.__notReloaded === true", json!([]))
            .await,
        true,
        "the console never reloaded"
    );

    // A viewer: the same repository without the buttons.
    browser.click("#sign-out").await;
    sign_in(&browser, &env.app.viewer(), "viewer").await;
    show(&browser, &format!("#/repositories/{alpha}"), "repository").await;
    assert!(browser.find("#repository-actions").await.is_some());
    for button in ["#action-reconcile", "#action-verify", "#action-rotate-key"] {
        assert!(
            browser.find(button).await.is_none(),
            "a viewer sees {button}"
        );
    }
    browser.quit().await;
    env.app.stop().await;
}

/// The ids of the audit entries on the page, in order.
async fn audit_ids(browser: &Browser) -> Vec<i64> {
    let ids = browser
        .eval(
            "return [...document.querySelectorAll('#audit-table tr[data-audit]')].map((r) => Number(r.dataset.audit))",
            json!([]),
        )
        .await;
    serde_json::from_value(ids).expect("ids")
}

async fn verify(env: &Env, name: &str) {
    let path = format!("/v1/backup-repositories/{name}/verify");
    let queued: Value = env
        .app
        .post_json(&path, &env.app.operator(), &json!({}))
        .await
        .json()
        .await
        .expect("json");
    let job_id = queued["job"]["id"].as_str().expect("job id");
    let verified = env.app.wait_for_job(job_id, webdriver::DEADLINE).await;
    assert_eq!(verified["state"], "succeeded", "{verified:#}");
}

async fn sign_in(browser: &Browser, token: &str, role: &str) {
    browser
        .wait_for(
            "the sign-in form",
            "return !document.getElementById('login').hidden",
            json!([]),
        )
        .await;
    browser.type_into("#token", token).await;
    browser.click("#login-token button[type=submit]").await;
    browser
        .wait_for(
            &format!("signed in as {role}"),
            "return document.getElementById('who-role').dataset.role === arguments[0]",
            json!([role]),
        )
        .await;
}

/// Goes to `hash` inside the page (no reload) and waits until the page `name` is loaded.
async fn show(browser: &Browser, hash: &str, name: &str) {
    browser
        .eval("window.location.hash = arguments[0];", json!([hash]))
        .await;
    browser
        .wait_for(
            &format!("the {name} page at {hash}"),
            "const view = document.getElementById('view'); \
             return window.location.hash === arguments[0] && view.dataset.page === arguments[1] \
                 && view.dataset.loaded === 'true'",
            json!([hash, name]),
        )
        .await;
}

/// Whether the service streams a job's events (`text/event-stream`).
async fn streams_events(app: &TestApp, job_id: &str) -> bool {
    let response = app
        .client
        .get(app.url(&format!("/v1/jobs/{job_id}/events")))
        .bearer_auth(app.viewer())
        .header("accept", "text/event-stream")
        .send()
        .await
        .expect("events");
    response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("text/event-stream"))
}

/// A provisioning job held at its Secret write while its page is open, then let go: the page
/// shows the running step, then every step done, without a reload.
async fn watch_a_job_live(env: &Env, browser: &Browser, dir: &std::path::Path) {
    let name = unique_name("live");
    let ns = env.ns("zitadel").to_owned();
    let secret = format!("/api/v1/namespaces/{ns}/secrets/{}", bucket_for(&name));
    let mut held = env.kube.proxy.hold(Hold::next("PATCH", &secret));
    let response = env
        .app
        .post_json(
            "/v1/backup-repositories",
            &env.app.operator(),
            &json!({ "name": name, "namespace": ns }),
        )
        .await;
    assert_eq!(response.status(), 202);
    let created: Value = response.json().await.expect("json");
    let job_id = created["job"]["id"].as_str().expect("job id").to_owned();
    show(browser, &format!("#/jobs/{job_id}"), "job").await;
    let request = tokio::time::timeout(webdriver::DEADLINE, held.recv())
        .await
        .expect("the Secret write reached the proxy")
        .expect("a held request");
    // The page could fall back to polling and still end right: it must be on the stream while
    // the job is held, or this test would pass without SSE.
    assert!(
        streams_events(&env.app, &job_id).await,
        "the service streams job events"
    );
    browser
        .wait_for(
            "the live indicator on, the job still held",
            "return document.getElementById('live').dataset.live === 'on'",
            json!([]),
        )
        .await;
    // Held at the Secret: the job is unfinished, so what the page shows next comes live.
    let view: Value = env
        .app
        .get(&format!("/v1/jobs/{job_id}"), &env.app.viewer())
        .await
        .json()
        .await
        .expect("job");
    assert_eq!(view["state"], "running", "{view:#}");
    browser
        .wait_for(
            "the Secret step running on the page",
            "return document.querySelector(\"#steps li[data-step='secret'][data-state='running']\") !== null",
            json!([]),
        )
        .await;
    assert_eq!(
        browser
            .eval(
                "return document.getElementById('job').dataset.jobState",
                json!([])
            )
            .await,
        "running"
    );
    browser.screenshot(dir, "job").await;
    drop(request);
    browser
        .wait_for(
            "the job and every step done on the page",
            "const job = document.getElementById('job'); \
             const steps = [...document.querySelectorAll('#steps li[data-step]')]; \
             return job && job.dataset.jobState === 'succeeded' && steps.length > 0 \
                 && steps.every((s) => s.dataset.state === 'succeeded') && steps.length",
            json!([]),
        )
        .await;
    let done = env.app.wait_for_job(&job_id, webdriver::DEADLINE).await;
    assert_eq!(done["state"], "succeeded", "{done:#}");
    let shown = browser
        .eval(
            "return document.querySelectorAll('#steps li[data-step]').length",
            json!([]),
        )
        .await;
    assert_eq!(
        shown.as_u64(),
        Some(done["steps"].as_array().unwrap().len() as u64)
    );
    assert_eq!(
        browser
            .eval("return window.__notReloaded === true", json!([]))
            .await,
        true,
        "the job page followed the job without a reload"
    );
    browser.screenshot(dir, "job-ended").await;
}

/// Cancel while the job is held at its Secret write (it stops at the next step boundary),
/// then retry: the page follows both without a reload.
async fn cancel_and_retry_on_the_job_page(env: &Env, browser: &Browser) {
    let name = unique_name("cancel");
    let ns = env.ns("zitadel").to_owned();
    let secret = format!("/api/v1/namespaces/{ns}/secrets/{}", bucket_for(&name));
    let mut held = env.kube.proxy.hold(Hold::next("PATCH", &secret));
    let created: Value = env
        .app
        .post_json(
            "/v1/backup-repositories",
            &env.app.operator(),
            &json!({ "name": name, "namespace": ns }),
        )
        .await
        .json()
        .await
        .expect("json");
    let job_id = created["job"]["id"].as_str().expect("job id").to_owned();
    show(browser, &format!("#/jobs/{job_id}"), "job").await;
    let request = tokio::time::timeout(webdriver::DEADLINE, held.recv())
        .await
        .expect("the Secret write reached the proxy")
        .expect("a held request");
    confirm_with(browser, "#job-cancel").await;
    browser
        .wait_for(
            "the cancel requested on the page",
            "return document.getElementById('job').dataset.cancelRequested === 'true' \
                 && document.getElementById('job-cancel').hidden",
            json!([]),
        )
        .await;
    drop(request);
    browser
        .wait_for(
            "the job cancelled on the page, with a retry button",
            "return document.getElementById('job').dataset.jobState === 'cancelled' \
                 && !document.getElementById('job-retry').hidden",
            json!([]),
        )
        .await;
    confirm_with(browser, "#job-retry").await;
    browser
        .wait_for(
            "the retried job done on the page",
            "return document.getElementById('job').dataset.jobState === 'succeeded'",
            json!([]),
        )
        .await;
    let job = env.app.wait_for_job(&job_id, webdriver::DEADLINE).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
}

/// Presses `button` and confirms in the dialog.
async fn confirm_with(browser: &Browser, button: &str) {
    browser.click(button).await;
    browser
        .wait_for(
            "the confirmation dialog",
            "return document.getElementById('confirm').open",
            json!([]),
        )
        .await;
    browser.click("#confirm-ok").await;
}

/// The reconcile button: a dry run in the confirmation dialog, then a new job.
async fn reconcile_as_operator(env: &Env, browser: &Browser, dir: &std::path::Path, name: &str) {
    show(browser, &format!("#/repositories/{name}"), "repository").await;
    browser.screenshot(dir, "repository").await;
    let before = env.repository(name).await["last_job"]["id"].clone();
    browser.click("#action-reconcile").await;
    browser
        .wait_for(
            "the dry run in the confirmation dialog",
            "return document.getElementById('confirm').open && document.getElementById('dry-run') !== null",
            json!([]),
        )
        .await;
    browser.screenshot(dir, "reconcile-dry-run").await;
    browser.click("#confirm-ok").await;
    let hash = browser
        .wait_for(
            "the new job's page",
            "const m = /^#\\/jobs\\/([0-9a-f-]{36})$/.exec(window.location.hash); return m && m[1] !== arguments[0] ? m[1] : null",
            json!([before]),
        )
        .await;
    let job_id = hash.as_str().expect("job id");
    let job = env.app.wait_for_job(job_id, webdriver::DEADLINE).await;
    assert_eq!(job["kind"], "provision-repository", "{job:#}");
    assert_eq!(job["created_by"], "operator@test");
    assert_eq!(job["state"], "succeeded", "{job:#}");
}

#[tokio::test]
async fn the_console_is_served_with_a_strict_policy_and_no_inline_code() {
    let app = spawn_app().await;
    let page = app.client.get(app.url("/ui")).send().await.expect("/ui");
    assert_eq!(page.status(), 200);
    let headers = page.headers().clone();
    assert_eq!(headers["content-security-policy"], POLICY);
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    assert_eq!(headers["x-frame-options"], "DENY");
    let html = page.text().await.expect("html");
    let script = Regex::new(r"(?is)<script\b([^>]*)>(.*?)</script>").unwrap();
    let scripts: Vec<_> = script.captures_iter(&html).collect();
    assert!(!scripts.is_empty());
    for found in scripts {
        assert!(
            found[1].contains("src=\"/ui/assets/"),
            "a script without src: {}",
            &found[0]
        );
        assert!(found[2].trim().is_empty(), "inline script: {}", &found[0]);
    }
    let inline_style = Regex::new(r"(?i)<style\b|\sstyle\s*=").unwrap();
    assert!(!inline_style.is_match(&html), "inline style in the page");
    let handler = Regex::new(r"(?i)\son[a-z]+\s*=").unwrap();
    assert!(
        !handler.is_match(&html),
        "an inline event handler in the page"
    );

    let mut total = 0;
    for (file, size) in backup_provisioner::http::ui::served_files() {
        let path = if file == "index.html" {
            "/ui/".to_owned()
        } else {
            format!("/ui/assets/{file}")
        };
        let response = app.client.get(app.url(&path)).send().await.expect("asset");
        assert_eq!(response.status(), 200, "{path}");
        let headers = response.headers().clone();
        assert_eq!(headers["content-security-policy"], POLICY, "{path}");
        assert_eq!(headers["cache-control"], "no-cache", "{path}");
        let expected_type = match file.rsplit('.').next() {
            Some("js") => "text/javascript; charset=utf-8",
            Some("css") => "text/css; charset=utf-8",
            Some("svg") => "image/svg+xml",
            _ => "text/html; charset=utf-8",
        };
        assert_eq!(headers["content-type"], expected_type, "{path}");
        let body = response.text().await.expect("body");
        assert_eq!(body.len(), size, "{path}");
        // An SVG names its XML namespace by URL; it is not fetched.
        let body = body.replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
        // Works offline: nothing from another origin; no markup built from strings.
        for forbidden in [
            "https://",
            "http://",
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "localStorage",
        ] {
            assert!(!body.contains(forbidden), "{path} contains {forbidden}");
        }
        let etag = headers["etag"].clone();
        let again = app
            .client
            .get(app.url(&path))
            .header("if-none-match", etag)
            .send()
            .await
            .expect("revalidation");
        assert_eq!(again.status(), 304, "{path}");
        total += size;
    }
    eprintln!("the console's served files: {total} bytes");

    let missing = app
        .client
        .get(app.url("/ui/assets/nope.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(
        missing.headers()["content-type"],
        "application/problem+json"
    );
    let config: Value = app
        .client
        .get(app.url("/ui/config.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(config, json!({ "oidc": null }));

    // The API is unchanged: no console policy on /v1.
    let me = app.get("/v1/me", &app.operator()).await;
    assert_eq!(me.status(), 200);
    assert!(me.headers().get("content-security-policy").is_none());
    assert_eq!(me.headers()["cache-control"], "no-store");
    let me: Value = me.json().await.unwrap();
    assert_eq!(
        me,
        json!({ "subject": "operator@test", "roles": ["operator"], "role": "operator" })
    );
    assert_eq!(
        app.client
            .get(app.url("/v1/me"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    app.stop().await;
}

#[tokio::test]
async fn with_an_oidc_client_the_console_may_reach_the_issuer() {
    let app = spawn_app_with(AppOptions {
        http: backup_provisioner::config::HttpArgs {
            jwt_hs256_secret: None,
            // Nobody listens there: the service starts anyway and fetches keys when asked.
            oidc_issuer: Some("http://127.0.0.1:9/oauth/v2".parse().unwrap()),
            jwt_audience: Some("backup-provisioner".into()),
            ui_oidc_client_id: Some("console".into()),
            ..http_args()
        },
        ..AppOptions::default()
    })
    .await;
    let response = app
        .client
        .get(app.url("/ui/callback"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let policy = response.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        policy.contains("connect-src 'self' http://127.0.0.1:9;"),
        "{policy}"
    );
    let config: Value = app
        .client
        .get(app.url("/ui/config.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        config,
        json!({ "oidc": {
            "issuer": "http://127.0.0.1:9/oauth/v2",
            "client_id": "console",
            "scopes": "openid profile",
            "redirect_path": "/ui/callback",
        }})
    );
    app.stop().await;
}

/// OIDC sign-in in the browser: authorization code with PKCE against the issuer, the code
/// exchanged from the page (the policy lets it reach the issuer), the access token kept in
/// memory only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_signs_in_through_the_identity_provider_with_pkce() {
    let Some(tools) = tools() else { return };
    let idp = idp::Idp::start().await;
    let app = spawn_app_with(AppOptions {
        http: backup_provisioner::config::HttpArgs {
            jwt_hs256_secret: None,
            oidc_issuer: Some(idp.issuer.parse().unwrap()),
            jwt_audience: Some(crate::support::app::AUDIENCE.into()),
            ui_oidc_client_id: Some(idp::CLIENT_ID.into()),
            ..http_args()
        },
        ..AppOptions::default()
    })
    .await;
    let browser = Browser::launch(&tools).await;
    browser.goto(&app.url("/ui/#/audit")).await;
    browser
        .wait_for(
            "the identity provider's button",
            "return !document.getElementById('login-oidc').hidden",
            json!([]),
        )
        .await;
    browser.click("#login-oidc-button").await;
    browser
        .wait_for(
            "signed in through the identity provider",
            "return document.getElementById('who-role').dataset.role === 'operator' \
                 && document.getElementById('who-subject').textContent",
            json!([]),
        )
        .await;
    // Back where the sign-in started, at /ui/ (the code is gone from the address).
    browser
        .wait_for(
            "the audit page after the sign-in",
            "const view = document.getElementById('view'); \
             return window.location.pathname === '/ui/' && window.location.search === '' \
                 && view.dataset.page === 'audit' && view.dataset.loaded === 'true'",
            json!([]),
        )
        .await;
    let subject = browser
        .eval(
            "return document.getElementById('who-subject').textContent",
            json!([]),
        )
        .await;
    assert_eq!(subject, idp::SUBJECT);
    let stored = browser
        .eval(
            "return [localStorage.length, sessionStorage.length]",
            json!([]),
        )
        .await;
    assert_eq!(stored, json!([0, 0]), "nothing is left in web storage");
    let asked = idp.authorizations();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0]["code_challenge_method"], "S256");
    assert_eq!(asked[0]["client_id"], idp::CLIENT_ID);
    assert_eq!(asked[0]["redirect_uri"], app.url("/ui/callback"));
    assert_eq!(idp.exchanges(), vec![200]);
    browser.quit().await;
    app.stop().await;
}
