//! OIDC mode over real HTTP: the service verifies RS256/ES256 tokens with the keys of an
//! identity provider that runs inside the test (discovery document + JWKS on 127.0.0.1:0). The
//! provider's key set can be swapped and counts how often it is fetched, so key rotation, the
//! refetch floor and an unreachable provider (503, not 401) can be observed from outside.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use backup_provisioner::config::HttpArgs;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::http_common::{REPOSITORIES, assert_problem, count_rows, repository_body};
use crate::support::app::{AUDIENCE, AppOptions, TestApp, http_args, spawn_app_with};

macro_rules! fixture {
    ($name:literal) => {
        include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/jwt/",
            $name
        ))
    };
}

const RSA_A_PRIVATE: &[u8] = fixture!("rsa_a_private.pem");
const RSA_A_PUBLIC: &[u8] = fixture!("rsa_a_public.pem");
const RSA_B_PRIVATE: &[u8] = fixture!("rsa_b_private.pem");
const EC_A_PRIVATE: &[u8] = fixture!("ec_a_private.pem");
const EC_B_PRIVATE: &[u8] = fixture!("ec_b_private.pem");
const JWKS_FIXTURE: &[u8] = fixture!("jwks.json");

const ZITADEL_ROLES: &str = "urn:zitadel:iam:org:project:roles";
const UNAUTHORIZED_TYPE: &str = "https://backup-provisioner.holos.run/problems/unauthorized";
const UNAVAILABLE_TYPE: &str = "https://backup-provisioner.holos.run/problems/unavailable";

// ---------------------------------------------------------------------------------------------
// The in-test identity provider

struct IdpState {
    /// The issuer, without a trailing slash (as in tokens and the discovery document).
    issuer: String,
    jwks: Mutex<Value>,
    discovery_fetches: AtomicUsize,
    jwks_fetches: AtomicUsize,
}

struct Idp {
    issuer: String,
    state: Arc<IdpState>,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

async fn discovery(State(state): State<Arc<IdpState>>) -> Json<Value> {
    state.discovery_fetches.fetch_add(1, Ordering::SeqCst);
    Json(json!({
        "issuer": state.issuer,
        "jwks_uri": format!("{}/oauth/v2/keys", state.issuer),
        "authorization_endpoint": format!("{}/oauth/v2/authorize", state.issuer),
        "token_endpoint": format!("{}/oauth/v2/token", state.issuer),
        "id_token_signing_alg_values_supported": ["RS256", "ES256"],
    }))
}

async fn jwks(State(state): State<Arc<IdpState>>) -> Json<Value> {
    state.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    Json(state.jwks.lock().unwrap().clone())
}

impl Idp {
    /// Starts a provider on 127.0.0.1:0 publishing the fixture keys named by `kids`.
    async fn start(kids: &[&str]) -> Idp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the identity provider");
        let issuer = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(IdpState {
            issuer: issuer.clone(),
            jwks: Mutex::new(jwks_of(kids)),
            discovery_fetches: AtomicUsize::new(0),
            jwks_fetches: AtomicUsize::new(0),
        });
        let router = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/oauth/v2/keys", get(jwks))
            .with_state(state.clone());
        let stop = CancellationToken::new();
        let signal = stop.clone().cancelled_owned();
        let server = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(signal)
                .await
                .expect("identity provider ran");
        });
        Idp {
            issuer,
            state,
            stop,
            server,
        }
    }

    fn issuer_url(&self) -> url::Url {
        self.issuer.parse().expect("issuer URL")
    }

    /// Replaces the published key set (what a provider does when it rotates keys).
    fn publish(&self, kids: &[&str]) {
        *self.state.jwks.lock().unwrap() = jwks_of(kids);
    }

    fn jwks_fetches(&self) -> usize {
        self.state.jwks_fetches.load(Ordering::SeqCst)
    }

    fn discovery_fetches(&self) -> usize {
        self.state.discovery_fetches.load(Ordering::SeqCst)
    }

    /// Stops the server and waits until its port and every connection to it are closed.
    async fn shut_down(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.server)
            .await
            .expect("identity provider stops within 10 s")
            .expect("identity provider task");
    }
}

/// The public JWKS with only the fixture keys named by `kids`, in that order.
fn jwks_of(kids: &[&str]) -> Value {
    let all: Value = serde_json::from_slice(JWKS_FIXTURE).expect("jwks fixture");
    let keys: Vec<Value> = kids
        .iter()
        .map(|kid| {
            all["keys"]
                .as_array()
                .unwrap()
                .iter()
                .find(|key| key["kid"] == *kid)
                .unwrap_or_else(|| panic!("no key {kid} in the JWKS fixture"))
                .clone()
        })
        .collect();
    json!({ "keys": keys })
}

/// A closed local port: bound, then released.
async fn closed_port_issuer() -> url::Url {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}").parse().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Tokens

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn rsa_a() -> EncodingKey {
    EncodingKey::from_rsa_pem(RSA_A_PRIVATE).unwrap()
}

fn rsa_b() -> EncodingKey {
    EncodingKey::from_rsa_pem(RSA_B_PRIVATE).unwrap()
}

fn ec_a() -> EncodingKey {
    EncodingKey::from_ec_pem(EC_A_PRIVATE).unwrap()
}

fn ec_b() -> EncodingKey {
    EncodingKey::from_ec_pem(EC_B_PRIVATE).unwrap()
}

/// Valid claims from `issuer` for our audience, five minutes to live, `roles` as an array.
fn claims(issuer: &str, subject: &str, roles: &[&str]) -> Value {
    json!({
        "iss": issuer,
        "sub": subject,
        "aud": AUDIENCE,
        "iat": now(),
        "nbf": now(),
        "exp": now() + 300,
        "roles": roles,
    })
}

/// `claims` with the given fields replaced (a null value removes the field).
fn with(mut claims: Value, overrides: Value) -> Value {
    for (key, value) in overrides.as_object().unwrap() {
        if value.is_null() {
            claims.as_object_mut().unwrap().remove(key);
        } else {
            claims[key] = value.clone();
        }
    }
    claims
}

fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).expect("sign token")
}

fn rs256(kid: &str, claims: &Value) -> String {
    let key = match kid {
        "rsa-b" => rsa_b(),
        _ => rsa_a(),
    };
    sign(Algorithm::RS256, Some(kid), &key, claims)
}

fn es256(claims: &Value) -> String {
    sign(Algorithm::ES256, Some("ec-a"), &ec_a(), claims)
}

/// A token assembled by hand: any header, any claims, the given signature part.
fn hand_made(header: &Value, claims: &Value, signature: &str) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        signature
    )
}

// ---------------------------------------------------------------------------------------------
// The service in OIDC mode

fn oidc_http(issuer: url::Url, roles_claim: &str) -> HttpArgs {
    HttpArgs {
        jwt_hs256_secret: None,
        oidc_issuer: Some(issuer),
        jwt_audience: Some(AUDIENCE.into()),
        jwt_roles_claim: roles_claim.into(),
        jwt_max_lifetime: None,
        ..http_args()
    }
}

async fn spawn_oidc_app(issuer: url::Url, roles_claim: &str) -> TestApp {
    spawn_app_with(AppOptions {
        http: oidc_http(issuer, roles_claim),
        ..AppOptions::default()
    })
    .await
}

async fn status_of(app: &TestApp, token: &str) -> (u16, String) {
    let response = app.get(REPOSITORIES, token).await;
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

async fn assert_ok(app: &TestApp, what: &str, token: &str) {
    let (status, body) = status_of(app, token).await;
    assert_eq!(status, 200, "{what}: GET {REPOSITORIES}: {body}");
}

/// Asserts a 401 problem whose detail contains `needle`, on a read and on a mutation.
async fn assert_unauthorized(app: &TestApp, what: &str, token: &str, needle: &str) {
    let problem = assert_problem(app.get(REPOSITORIES, token).await, 401).await;
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains(needle),
        "{what}: expected {needle:?} in the detail {detail:?}"
    );
    assert_eq!(problem["type"], UNAUTHORIZED_TYPE, "{what}: {problem}");
    let problem = assert_problem(
        app.post_json(REPOSITORIES, token, &repository_body("zitadel"))
            .await,
        401,
    )
    .await;
    assert!(
        problem["detail"].as_str().unwrap().contains(needle),
        "{what} (POST): expected {needle:?} in {problem}"
    );
}

async fn assert_created(app: &TestApp, what: &str, token: &str, name: &str) {
    let response = app
        .post_json(REPOSITORIES, token, &repository_body(name))
        .await;
    let status = response.status().as_u16();
    let body = response.text().await.unwrap_or_default();
    assert_eq!(status, 202, "{what}: POST {REPOSITORIES}: {body}");
}

async fn assert_forbidden(app: &TestApp, what: &str, token: &str, name: &str) {
    let response = app
        .post_json(REPOSITORIES, token, &repository_body(name))
        .await;
    let problem = assert_problem(response, 403).await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("needs the role 'operator'"),
        "{what}: {problem}"
    );
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn rs256_and_es256_tokens_from_the_idp_are_accepted_with_array_roles() {
    let idp = Idp::start(&["rsa-a", "ec-a"]).await;
    let app = spawn_oidc_app(idp.issuer_url(), "roles").await;
    // The keys were loaded at start-up.
    assert_eq!(idp.discovery_fetches(), 1);
    assert_eq!(idp.jwks_fetches(), 1);

    let iss = idp.issuer.as_str();
    assert_ok(
        &app,
        "RS256 viewer",
        &rs256("rsa-a", &claims(iss, "v@idp", &["viewer"])),
    )
    .await;
    assert_ok(
        &app,
        "ES256 viewer",
        &es256(&claims(iss, "v@idp", &["viewer"])),
    )
    .await;
    // The issuer with a trailing slash is the same issuer.
    let slashed = format!("{iss}/");
    assert_ok(
        &app,
        "iss with slash",
        &rs256("rsa-a", &claims(&slashed, "v@idp", &["viewer"])),
    )
    .await;
    // `aud` may be an array that contains our audience.
    let multi_aud = with(
        claims(iss, "v@idp", &["viewer"]),
        json!({"aud": ["another-api", AUDIENCE]}),
    );
    assert_ok(&app, "aud array", &es256(&multi_aud)).await;

    // Operators create (RS256 and ES256), viewers may only read.
    let rs_operator = rs256("rsa-a", &claims(iss, "op-rs@idp", &["operator"]));
    let es_operator = es256(&claims(iss, "op-es@idp", &["operator", "viewer"]));
    assert_created(&app, "RS256 operator", &rs_operator, "zitadel").await;
    assert_created(&app, "ES256 operator", &es_operator, "holos").await;
    let viewer = es256(&claims(iss, "v@idp", &["viewer"]));
    assert_forbidden(&app, "viewer", &viewer, "nope").await;
    let no_roles = rs256("rsa-a", &claims(iss, "nobody@idp", &[]));
    assert_problem(app.get(REPOSITORIES, &no_roles).await, 403).await;
    assert_eq!(count_rows(&app, "backup_repositories").await, 2);

    // The subject of the token is who the audit log names.
    let audit: Value = app.get("/v1/audit", &viewer).await.json().await.unwrap();
    let text = audit.to_string();
    assert!(
        text.contains("op-rs@idp") && text.contains("op-es@idp"),
        "{text}"
    );

    // Every token used a cached key: no further fetches.
    assert_eq!(idp.jwks_fetches(), 1);
    assert_eq!(idp.discovery_fetches(), 1);
    app.stop().await;
    idp.shut_down().await;
}

#[tokio::test]
async fn zitadel_roles_object_under_a_custom_claim() {
    let idp = Idp::start(&["rsa-a", "ec-a"]).await;
    let app = spawn_oidc_app(idp.issuer_url(), ZITADEL_ROLES).await;
    let iss = idp.issuer.as_str();
    let zitadel = |subject: &str, roles: Value| {
        with(
            claims(iss, subject, &[]),
            json!({"roles": null, ZITADEL_ROLES: roles}),
        )
    };

    let operator = rs256(
        "rsa-a",
        &zitadel(
            "op@idp",
            json!({"operator": {"287000000000000001": "acme.zitadel.cloud"}}),
        ),
    );
    let viewer = es256(&zitadel(
        "v@idp",
        json!({"viewer": {"287000000000000001": "acme.zitadel.cloud"}}),
    ));
    assert_ok(&app, "zitadel operator", &operator).await;
    assert_ok(&app, "zitadel viewer", &viewer).await;
    assert_created(&app, "zitadel operator", &operator, "zitadel").await;
    assert_forbidden(&app, "zitadel viewer", &viewer, "holos").await;

    // With a custom claim configured, a plain `roles` array is not looked at.
    let plain = rs256("rsa-a", &claims(iss, "plain@idp", &["operator"]));
    assert_problem(app.get(REPOSITORIES, &plain).await, 403).await;
    assert_forbidden(&app, "roles under the default claim", &plain, "holos").await;
    assert_eq!(count_rows(&app, "backup_repositories").await, 1);
    app.stop().await;
    idp.shut_down().await;
}

#[tokio::test]
async fn bad_oidc_tokens_are_401_problems_saying_why() {
    let idp = Idp::start(&["rsa-a", "ec-a"]).await;
    let app = spawn_oidc_app(idp.issuer_url(), "roles").await;
    let iss = idp.issuer.as_str();
    let good = claims(iss, "mallory@idp", &["admin"]);
    // The baseline: these claims are fine.
    assert_ok(&app, "baseline", &rs256("rsa-a", &good)).await;

    let expired = with(
        good.clone(),
        json!({"iat": now() - 7200, "nbf": now() - 7200, "exp": now() - 3600}),
    );
    let early = with(good.clone(), json!({"nbf": now() + 3600}));
    let other_issuer = with(good.clone(), json!({"iss": "https://evil.example"}));
    let other_audience = with(good.clone(), json!({"aud": "someone-else"}));
    let no_audience = with(good.clone(), json!({"aud": null}));
    let no_subject = with(good.clone(), json!({"sub": null}));
    let rsa_public_as_secret = EncodingKey::from_secret(RSA_A_PUBLIC);

    let cases: Vec<(&str, String, String)> = vec![
        (
            "expired RS256",
            rs256("rsa-a", &expired),
            "token expired".into(),
        ),
        ("expired ES256", es256(&expired), "token expired".into()),
        ("not yet valid", es256(&early), "token not yet valid".into()),
        (
            "wrong issuer",
            rs256("rsa-a", &other_issuer),
            format!("wrong issuer: expected {iss}"),
        ),
        (
            "wrong audience",
            es256(&other_audience),
            "wrong audience".into(),
        ),
        ("no audience", rs256("rsa-a", &no_audience), "aud".into()),
        ("no subject", es256(&no_subject), "sub".into()),
        (
            "RSA key not in the JWKS, under a published kid",
            sign(Algorithm::RS256, Some("rsa-a"), &rsa_b(), &good),
            "invalid signature".into(),
        ),
        (
            "EC key not in the JWKS, under a published kid",
            sign(Algorithm::ES256, Some("ec-a"), &ec_b(), &good),
            "invalid signature".into(),
        ),
        (
            "ES256 header naming an RSA key",
            sign(Algorithm::ES256, Some("rsa-a"), &ec_a(), &good),
            "cannot be used with algorithm ES256".into(),
        ),
        (
            "alg none",
            hand_made(&json!({"alg": "none", "typ": "JWT"}), &good, ""),
            "algorithm none is not accepted".into(),
        ),
        (
            "alg none with a kid",
            hand_made(&json!({"alg": "none", "kid": "rsa-a"}), &good, ""),
            "algorithm none is not accepted".into(),
        ),
        (
            "alg None",
            hand_made(&json!({"alg": "None"}), &good, "c2ln"),
            "algorithm none is not accepted".into(),
        ),
        (
            "HS256 signed with the RSA public key PEM (algorithm confusion)",
            sign(
                Algorithm::HS256,
                Some("rsa-a"),
                &rsa_public_as_secret,
                &good,
            ),
            "algorithm HS256 is not accepted".into(),
        ),
        (
            "HS256 without kid signed with the RSA public key PEM",
            sign(Algorithm::HS256, None, &rsa_public_as_secret, &good),
            "algorithm HS256 is not accepted".into(),
        ),
        ("not a JWT", "not-a-jwt".into(), "malformed token".into()),
        ("garbage parts", "a.b.c".into(), "malformed token".into()),
        (
            "four parts",
            format!("{}.extra", rs256("rsa-a", &good)),
            "malformed token".into(),
        ),
        (
            "header is not JSON",
            format!(
                "{}.{}.c2ln",
                URL_SAFE_NO_PAD.encode("{oops"),
                URL_SAFE_NO_PAD.encode("{}")
            ),
            "malformed token".into(),
        ),
    ];
    for (what, token, needle) in &cases {
        assert_unauthorized(&app, what, token, needle).await;
    }
    // None of that needed the provider: every kid was known.
    assert_eq!(idp.jwks_fetches(), 1, "no refetch for known key ids");

    // A key the provider never published, under its own kid: one refetch (in case the provider
    // rotated), then 401. Repeating it does not hammer the provider (the refetch floor).
    let unpublished = sign(Algorithm::ES256, Some("ec-b"), &ec_b(), &good);
    for _ in 0..5 {
        assert_unauthorized(
            &app,
            "unpublished kid",
            &unpublished,
            "unknown signing key id",
        )
        .await;
    }
    let made_up = rs256("made-up-kid", &good);
    assert_unauthorized(&app, "made-up kid", &made_up, "unknown signing key id").await;
    assert_eq!(
        idp.jwks_fetches(),
        2,
        "unknown key ids cause one refetch, then the floor holds"
    );

    // Nothing was created, and good tokens still work.
    assert_eq!(count_rows(&app, "backup_repositories").await, 0);
    assert_ok(&app, "after the failures", &es256(&good)).await;
    app.stop().await;
    idp.shut_down().await;
}

#[tokio::test]
async fn rotated_keys_are_picked_up_by_refetching_the_jwks() {
    let idp = Idp::start(&["rsa-a"]).await;
    let app = spawn_oidc_app(idp.issuer_url(), "roles").await;
    let iss = idp.issuer.as_str();
    let old = rs256("rsa-a", &claims(iss, "op@idp", &["operator"]));
    assert_ok(&app, "old key before rotation", &old).await;
    assert_eq!(idp.jwks_fetches(), 1);

    // The provider rotates: the new key (kid rsa-b) replaces the old one.
    idp.publish(&["rsa-b"]);
    let new = rs256("rsa-b", &claims(iss, "op@idp", &["operator"]));
    assert_ok(&app, "new key after rotation", &new).await;
    assert_eq!(idp.jwks_fetches(), 2, "the unknown kid caused one refetch");
    assert_created(&app, "new key", &new, "zitadel").await;
    assert_ok(&app, "new key again", &new).await;
    assert_eq!(idp.jwks_fetches(), 2, "the new key is cached");

    // The withdrawn key is no longer trusted once the new set is loaded.
    assert_unauthorized(&app, "withdrawn key", &old, "unknown signing key id").await;
    app.stop().await;
    idp.shut_down().await;
}

#[tokio::test]
async fn an_unreachable_idp_with_an_unknown_kid_is_503() {
    let idp = Idp::start(&["rsa-a"]).await;
    let app = spawn_oidc_app(idp.issuer_url(), "roles").await;
    let iss = idp.issuer.clone();
    let cached = rs256("rsa-a", &claims(&iss, "v@idp", &["viewer"]));
    assert_ok(&app, "before the outage", &cached).await;

    idp.shut_down().await;
    // Keys already loaded keep working while the provider is down.
    assert_ok(&app, "cached key during the outage", &cached).await;
    // A kid that needs a refetch cannot be decided: 503, not 401 (the token may be fine).
    let rotated = rs256("rsa-b", &claims(&iss, "v@idp", &["viewer"]));
    let problem = assert_problem(app.get(REPOSITORIES, &rotated).await, 503).await;
    assert_eq!(problem["type"], UNAVAILABLE_TYPE, "{problem}");
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("identity provider unavailable"), "{detail}");
    app.stop().await;
}

#[tokio::test]
async fn an_idp_that_was_never_reachable_is_503_for_every_token() {
    let issuer = closed_port_issuer().await;
    // Start-up does not fail when the provider is down.
    let app = spawn_oidc_app(issuer.clone(), "roles").await;
    let iss = issuer.as_str().trim_end_matches('/');
    let operator = claims(iss, "op@idp", &["operator"]);
    for (what, token) in [
        ("RS256", rs256("rsa-a", &operator)),
        ("ES256", es256(&operator)),
        ("unknown kid", rs256("rsa-b", &operator)),
    ] {
        let problem = assert_problem(app.get(REPOSITORIES, &token).await, 503).await;
        assert_eq!(problem["type"], UNAVAILABLE_TYPE, "{what}: {problem}");
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("identity provider unavailable"),
            "{what}: {problem}"
        );
        let response = app
            .post_json(REPOSITORIES, &token, &repository_body("zitadel"))
            .await;
        assert_problem(response, 503).await;
    }
    // Tokens that are bad on their face are still 401: no key is needed to refuse them.
    assert_unauthorized(
        &app,
        "alg none",
        &hand_made(&json!({"alg": "none"}), &operator, ""),
        "algorithm none",
    )
    .await;
    assert_unauthorized(&app, "malformed", "a.b.c", "malformed token").await;
    assert_eq!(count_rows(&app, "backup_repositories").await, 0);
    // The service itself is healthy.
    let health = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    app.stop().await;
}
