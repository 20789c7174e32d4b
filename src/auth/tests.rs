//! Tests of both modes, with an in-process identity provider for OIDC.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use secrecy::SecretString;
use serde_json::{Value, json};

use super::*;

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

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn secret() -> SecretString {
    SecretString::from("test-only-secret-0123456789abcdef")
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

/// Signs `claims` with `key` and a header of `alg` and `kid`.
fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

/// Valid claims for `iss`/`aud` with five minutes to live.
fn claims(iss: &str, aud: &str) -> Value {
    let now = now();
    json!({
        "iss": iss,
        "sub": "alice",
        "aud": aud,
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "roles": ["operator"],
    })
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

fn without(mut claims: Value, key: &str) -> Value {
    claims.as_object_mut().unwrap().remove(key);
    claims
}

/// A token assembled by hand from a header and claims, with the given signature part.
fn hand_made(header: &Value, claims: &Value, signature: &str) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        signature
    )
}

// ---------------------------------------------------------------------------------------------
// HS256 mode

async fn hs_auth() -> Authenticator {
    Authenticator::new(AuthConfig {
        settings: AuthSettings::Hs256 {
            secret: secret(),
            audience: DEFAULT_AUDIENCE.into(),
        },
        roles_claim: DEFAULT_ROLES_CLAIM.into(),
    })
    .await
    .unwrap()
}

fn hs_sign(claims: &Value) -> String {
    sign(
        Algorithm::HS256,
        None,
        &EncodingKey::from_secret(b"test-only-secret-0123456789abcdef"),
        claims,
    )
}

fn hs_claims() -> Value {
    claims(TOKEN_ISSUER, DEFAULT_AUDIENCE)
}

#[tokio::test]
async fn hs256_minted_token_is_accepted() {
    let auth = hs_auth().await;
    let token = mint_hs256(
        &secret(),
        "ci-bot",
        &[Role::Operator, Role::Viewer],
        Duration::from_secs(600),
        DEFAULT_AUDIENCE,
    )
    .unwrap();
    let principal = auth.authenticate(&token).await.unwrap();
    assert_eq!(principal.subject, "ci-bot");
    assert_eq!(principal.roles, vec![Role::Viewer, Role::Operator]);
    // A `Bearer ` prefix and surrounding whitespace are tolerated.
    let principal = auth
        .authenticate(&format!("  Bearer {token} "))
        .await
        .unwrap();
    assert_eq!(principal.subject, "ci-bot");
}

#[tokio::test]
async fn hs256_minted_token_has_the_documented_claims() {
    let token = mint_hs256(
        &secret(),
        "ci-bot",
        &[Role::Admin, Role::Admin],
        Duration::from_millis(90_500),
        "custom-aud",
    )
    .unwrap();
    let header = jsonwebtoken::decode_header(&token).unwrap();
    assert_eq!(header.alg, Algorithm::HS256);
    let claims: Value = jsonwebtoken::dangerous::insecure_decode_claims(&token).unwrap();
    assert_eq!(claims["iss"], "backup-provisioner");
    assert_eq!(claims["sub"], "ci-bot");
    assert_eq!(claims["aud"], "custom-aud");
    assert_eq!(claims["roles"], json!(["admin"]));
    let iat = claims["iat"].as_u64().unwrap();
    assert_eq!(claims["nbf"].as_u64().unwrap(), iat);
    assert_eq!(claims["exp"].as_u64().unwrap(), iat + 91);
    assert!(iat.abs_diff(now()) <= 5);
}

#[tokio::test]
async fn hs256_mint_and_new_reject_bad_settings() {
    let short = SecretString::from("too-short");
    let err = mint_hs256(&short, "a", &[], Duration::from_secs(60), "aud").unwrap_err();
    assert!(matches!(err, AuthError::Mint(_)), "{err:?}");
    assert!(err.to_string().contains("at least 32 bytes"), "{err}");
    for (subject, ttl, audience) in [
        ("", Duration::from_secs(60), "aud"),
        ("a", Duration::ZERO, "aud"),
        ("a", Duration::from_secs(60), ""),
    ] {
        let err = mint_hs256(&secret(), subject, &[], ttl, audience).unwrap_err();
        assert!(matches!(err, AuthError::Mint(_)), "{err:?}");
    }

    let err = Authenticator::new(AuthConfig {
        settings: AuthSettings::Hs256 {
            secret: short,
            audience: DEFAULT_AUDIENCE.into(),
        },
        roles_claim: DEFAULT_ROLES_CLAIM.into(),
    })
    .await
    .unwrap_err();
    assert!(matches!(err, AuthError::Config(_)), "{err:?}");
    assert!(
        !err.to_string().contains("too-short"),
        "leaks the secret: {err}"
    );

    let err = Authenticator::new(AuthConfig {
        settings: AuthSettings::Hs256 {
            secret: secret(),
            audience: String::new(),
        },
        roles_claim: DEFAULT_ROLES_CLAIM.into(),
    })
    .await
    .unwrap_err();
    assert!(matches!(err, AuthError::Config(_)), "{err:?}");
}

#[tokio::test]
async fn hs256_missing_and_malformed_tokens() {
    let auth = hs_auth().await;
    for missing in ["", "   ", "Bearer ", "bearer    "] {
        let err = auth.authenticate(missing).await.unwrap_err();
        assert!(
            matches!(err, AuthError::MissingToken),
            "{missing:?}: {err:?}"
        );
        assert_eq!(err.to_string(), "missing bearer token");
    }
    let good = hs_sign(&hs_claims());
    let (head, rest) = good.split_once('.').unwrap();
    let too_long = format!("{good}{}", "A".repeat(20_000));
    let not_json = format!("{}.{rest}", URL_SAFE_NO_PAD.encode("this is not json"));
    let array_header = format!("{}.{rest}", URL_SAFE_NO_PAD.encode("[1,2]"));
    let numeric_alg = format!("{}.{rest}", URL_SAFE_NO_PAD.encode(r#"{"alg":256}"#));
    let no_alg = format!("{}.{rest}", URL_SAFE_NO_PAD.encode(r#"{"typ":"JWT"}"#));
    let payload_not_json = format!(
        "{head}.{}.{}",
        URL_SAFE_NO_PAD.encode("garbage"),
        good.rsplit('.').next().unwrap()
    );
    for malformed in [
        "abc",
        "a.b",
        "a.b.c.d",
        "!!!.???.###",
        ".payload.sig",
        "header..sig",
        good.replacen('.', "+", 1).as_str(),
        not_json.as_str(),
        array_header.as_str(),
        numeric_alg.as_str(),
        no_alg.as_str(),
        too_long.as_str(),
    ] {
        let err = auth.authenticate(malformed).await.unwrap_err();
        assert!(
            matches!(err, AuthError::Malformed),
            "{malformed:?}: {err:?}"
        );
        assert_eq!(err.to_string(), "malformed token");
    }
    // A payload that is not JSON fails the signature first (the signature covers it).
    let err = auth.authenticate(&payload_not_json).await.unwrap_err();
    assert!(matches!(err, AuthError::InvalidSignature), "{err:?}");
}

#[tokio::test]
async fn hs256_expiry_and_not_before_with_leeway() {
    let auth = hs_auth().await;
    let now = now();

    let expired = hs_sign(&with(hs_claims(), "exp", json!(now - 120)));
    let err = auth.authenticate(&expired).await.unwrap_err();
    assert!(matches!(err, AuthError::Expired), "{err:?}");
    assert_eq!(err.to_string(), "token expired");

    let just_expired = hs_sign(&with(hs_claims(), "exp", json!(now - 10)));
    auth.authenticate(&just_expired).await.unwrap();

    let early = hs_sign(&with(hs_claims(), "nbf", json!(now + 120)));
    let err = auth.authenticate(&early).await.unwrap_err();
    assert!(matches!(err, AuthError::NotYetValid), "{err:?}");
    assert_eq!(err.to_string(), "token not yet valid");

    let slightly_early = hs_sign(&with(hs_claims(), "nbf", json!(now + 10)));
    auth.authenticate(&slightly_early).await.unwrap();

    let no_nbf = hs_sign(&without(hs_claims(), "nbf"));
    auth.authenticate(&no_nbf).await.unwrap();

    let no_exp = hs_sign(&without(hs_claims(), "exp"));
    let err = auth.authenticate(&no_exp).await.unwrap_err();
    assert!(matches!(err, AuthError::MissingClaim("exp")), "{err:?}");
    assert_eq!(err.to_string(), "token has no exp claim");

    let string_exp = hs_sign(&with(hs_claims(), "exp", json!("tomorrow")));
    let err = auth.authenticate(&string_exp).await.unwrap_err();
    assert!(
        matches!(
            err,
            AuthError::MissingClaim("exp") | AuthError::InvalidClaim("exp")
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn hs256_wrong_issuer_and_audience() {
    let auth = hs_auth().await;

    let token = hs_sign(&with(hs_claims(), "iss", json!("someone-else")));
    let err = auth.authenticate(&token).await.unwrap_err();
    assert!(matches!(err, AuthError::WrongIssuer { .. }), "{err:?}");
    assert_eq!(err.to_string(), "wrong issuer: expected backup-provisioner");

    let token = hs_sign(&without(hs_claims(), "iss"));
    let err = auth.authenticate(&token).await.unwrap_err();
    assert!(matches!(err, AuthError::MissingClaim("iss")), "{err:?}");

    let token = hs_sign(&with(hs_claims(), "aud", json!("another-service")));
    let err = auth.authenticate(&token).await.unwrap_err();
    assert!(matches!(err, AuthError::WrongAudience), "{err:?}");
    assert_eq!(err.to_string(), "wrong audience");

    let token = hs_sign(&without(hs_claims(), "aud"));
    let err = auth.authenticate(&token).await.unwrap_err();
    assert!(matches!(err, AuthError::MissingClaim("aud")), "{err:?}");

    // An audience array containing ours is fine.
    let token = hs_sign(&with(
        hs_claims(),
        "aud",
        json!(["other", DEFAULT_AUDIENCE]),
    ));
    auth.authenticate(&token).await.unwrap();

    let token = hs_sign(&without(hs_claims(), "sub"));
    let err = auth.authenticate(&token).await.unwrap_err();
    assert!(matches!(err, AuthError::MissingClaim("sub")), "{err:?}");
    let token = hs_sign(&with(hs_claims(), "sub", json!("")));
    let err = auth.authenticate(&token).await.unwrap_err();
    assert!(matches!(err, AuthError::MissingClaim("sub")), "{err:?}");
}

#[tokio::test]
async fn hs256_wrong_secret_is_an_invalid_signature() {
    let auth = hs_auth().await;
    let token = sign(
        Algorithm::HS256,
        None,
        &EncodingKey::from_secret(b"another-secret-of-enough-length-00"),
        &hs_claims(),
    );
    let err = auth.authenticate(&token).await.unwrap_err();
    assert!(matches!(err, AuthError::InvalidSignature), "{err:?}");
    assert_eq!(err.to_string(), "invalid signature");

    // Tampered payload (roles raised to admin) with the original signature.
    let good = hs_sign(&hs_claims());
    let parts: Vec<&str> = good.split('.').collect();
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(with(hs_claims(), "roles", json!(["admin"])).to_string()),
        parts[2]
    );
    let err = auth.authenticate(&forged).await.unwrap_err();
    assert!(matches!(err, AuthError::InvalidSignature), "{err:?}");

    // No signature at all.
    let unsigned = format!("{}.{}.", parts[0], parts[1]);
    let err = auth.authenticate(&unsigned).await.unwrap_err();
    assert!(matches!(err, AuthError::InvalidSignature), "{err:?}");
}

#[tokio::test]
async fn hs256_rejects_alg_none() {
    let auth = hs_auth().await;
    for alg in ["none", "None", "NONE"] {
        let token = hand_made(&json!({"alg": alg, "typ": "JWT"}), &hs_claims(), "");
        let err = auth.authenticate(&token).await.unwrap_err();
        assert!(matches!(err, AuthError::AlgorithmNone), "{alg}: {err:?}");
        assert_eq!(err.to_string(), "algorithm none is not accepted");
    }
}

#[tokio::test]
async fn hs256_rejects_other_algorithms() {
    let auth = hs_auth().await;
    let token = sign(Algorithm::RS256, None, &rsa_a(), &hs_claims());
    let err = auth.authenticate(&token).await.unwrap_err();
    assert!(
        matches!(err, AuthError::AlgorithmNotAccepted { .. }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "algorithm RS256 is not accepted by this server (accepted: HS256)"
    );

    let token = sign(
        Algorithm::HS512,
        None,
        &EncodingKey::from_secret(b"test-only-secret-0123456789abcdef"),
        &hs_claims(),
    );
    let err = auth.authenticate(&token).await.unwrap_err();
    assert!(
        matches!(err, AuthError::AlgorithmNotAccepted { .. }),
        "{err:?}"
    );

    // Caller-chosen junk is not echoed.
    let token = hand_made(
        &json!({"alg": "<script>alert(1)</script>"}),
        &hs_claims(),
        "c2ln",
    );
    let err = auth.authenticate(&token).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "algorithm (unrecognised) is not accepted by this server (accepted: HS256)"
    );
}

#[tokio::test]
async fn critical_header_parameters_are_rejected() {
    let auth = hs_auth().await;
    let mut header = Header::new(Algorithm::HS256);
    header.crit = Some(vec!["exp".into()]);
    let token = jsonwebtoken::encode(
        &header,
        &hs_claims(),
        &EncodingKey::from_secret(b"test-only-secret-0123456789abcdef"),
    )
    .unwrap();
    let err = auth.authenticate(&token).await.unwrap_err();
    assert!(
        matches!(err, AuthError::UnsupportedCriticalHeader),
        "{err:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Roles

#[tokio::test]
async fn roles_from_an_array_and_unknown_names_ignored() {
    let auth = hs_auth().await;
    let token = hs_sign(&with(
        hs_claims(),
        "roles",
        json!(["viewer", "superuser", 42, "Admin", "operator", "viewer"]),
    ));
    let principal = auth.authenticate(&token).await.unwrap();
    assert_eq!(principal.roles, vec![Role::Viewer, Role::Operator]);

    let token = hs_sign(&without(hs_claims(), "roles"));
    let principal = auth.authenticate(&token).await.unwrap();
    assert!(principal.roles.is_empty());
    assert!(!principal.has(Role::Viewer));

    let token = hs_sign(&with(hs_claims(), "roles", json!(17)));
    let principal = auth.authenticate(&token).await.unwrap();
    assert!(principal.roles.is_empty());

    let token = hs_sign(&with(hs_claims(), "roles", json!("viewer admin")));
    let principal = auth.authenticate(&token).await.unwrap();
    assert_eq!(principal.roles, vec![Role::Viewer, Role::Admin]);
}

#[tokio::test]
async fn roles_from_a_zitadel_object_under_a_custom_claim() {
    let auth = Authenticator::new(AuthConfig {
        settings: AuthSettings::Hs256 {
            secret: secret(),
            audience: DEFAULT_AUDIENCE.into(),
        },
        roles_claim: ZITADEL_ROLES.into(),
    })
    .await
    .unwrap();
    let claims = with(
        without(hs_claims(), "roles"),
        ZITADEL_ROLES,
        json!({
            "operator": {"248289761001": "acme.zitadel.cloud"},
            "billing": {"248289761001": "acme.zitadel.cloud"},
        }),
    );
    let principal = auth.authenticate(&hs_sign(&claims)).await.unwrap();
    assert_eq!(principal.subject, "alice");
    assert_eq!(principal.roles, vec![Role::Operator]);
    assert!(principal.has(Role::Viewer));
    assert!(principal.has(Role::Operator));
    assert!(!principal.has(Role::Admin));

    // The default `roles` claim is not consulted when another claim is configured.
    let claims = with(hs_claims(), "roles", json!(["admin"]));
    let principal = auth.authenticate(&hs_sign(&claims)).await.unwrap();
    assert!(principal.roles.is_empty());
}

#[tokio::test]
async fn roles_from_a_nested_claim_path() {
    let auth = Authenticator::new(AuthConfig {
        settings: AuthSettings::Hs256 {
            secret: secret(),
            audience: DEFAULT_AUDIENCE.into(),
        },
        roles_claim: "realm_access.roles".into(),
    })
    .await
    .unwrap();
    let claims = with(
        hs_claims(),
        "realm_access",
        json!({"roles": ["admin", "offline_access"]}),
    );
    let principal = auth.authenticate(&hs_sign(&claims)).await.unwrap();
    assert_eq!(principal.roles, vec![Role::Admin]);
}

#[test]
fn role_hierarchy_names_and_serde() {
    let principal = |roles: Vec<Role>| Principal {
        subject: "s".into(),
        roles,
    };
    let admin = principal(vec![Role::Admin]);
    assert!(admin.has(Role::Viewer) && admin.has(Role::Operator) && admin.has(Role::Admin));
    let operator = principal(vec![Role::Operator]);
    assert!(operator.has(Role::Viewer) && operator.has(Role::Operator));
    assert!(!operator.has(Role::Admin));
    let viewer = principal(vec![Role::Viewer]);
    assert!(viewer.has(Role::Viewer));
    assert!(!viewer.has(Role::Operator) && !viewer.has(Role::Admin));
    let nobody = principal(vec![]);
    assert!(Role::ALL.iter().all(|role| !nobody.has(*role)));
    assert_eq!(nobody.highest_role(), None);
    assert_eq!(
        principal(vec![Role::Viewer, Role::Admin]).highest_role(),
        Some(Role::Admin)
    );

    assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin);
    for role in Role::ALL {
        assert_eq!(role.as_str().parse::<Role>().unwrap(), role);
        assert_eq!(role.to_string(), role.as_str());
        assert_eq!(
            serde_json::to_value(role).unwrap(),
            Value::String(role.as_str().into())
        );
        assert_eq!(
            serde_json::from_value::<Role>(json!(role.as_str())).unwrap(),
            role
        );
    }
    assert!("Admin".parse::<Role>().is_err());
    assert!("root".parse::<Role>().is_err());
    assert!("".parse::<Role>().is_err());
}

// ---------------------------------------------------------------------------------------------
// OIDC mode: an identity provider served from the test

#[derive(Clone)]
struct IdpState {
    issuer: Arc<Mutex<String>>,
    jwks_path: &'static str,
    jwks: Arc<Mutex<Value>>,
    up: Arc<AtomicBool>,
    discovery_hits: Arc<AtomicUsize>,
    jwks_hits: Arc<AtomicUsize>,
}

struct Idp {
    issuer: String,
    state: IdpState,
}

impl Idp {
    async fn start(jwks: Value) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let issuer = format!("http://{}", listener.local_addr().unwrap());
        let state = IdpState {
            issuer: Arc::new(Mutex::new(issuer.clone())),
            jwks_path: "/oauth/v2/keys",
            jwks: Arc::new(Mutex::new(jwks)),
            up: Arc::new(AtomicBool::new(true)),
            discovery_hits: Arc::default(),
            jwks_hits: Arc::default(),
        };
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(serve_discovery))
            .route(state.jwks_path, get(serve_jwks))
            .with_state(state.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { issuer, state }
    }

    fn set_jwks(&self, jwks: Value) {
        *self.state.jwks.lock().unwrap() = jwks;
    }

    fn set_up(&self, up: bool) {
        self.state.up.store(up, Ordering::SeqCst);
    }

    fn jwks_hits(&self) -> usize {
        self.state.jwks_hits.load(Ordering::SeqCst)
    }

    fn discovery_hits(&self) -> usize {
        self.state.discovery_hits.load(Ordering::SeqCst)
    }

    fn config(&self, audience: Option<&str>, floor: Duration) -> AuthConfig {
        AuthConfig {
            settings: AuthSettings::Oidc {
                issuer: self.issuer.parse().unwrap(),
                audience: audience.map(str::to_owned),
                jwks_refetch_floor: floor,
            },
            roles_claim: DEFAULT_ROLES_CLAIM.into(),
        }
    }

    async fn authenticator(&self, audience: Option<&str>, floor: Duration) -> Authenticator {
        Authenticator::new(self.config(audience, floor))
            .await
            .unwrap()
    }

    fn claims(&self) -> Value {
        claims(&self.issuer, "backup-provisioner")
    }
}

async fn serve_discovery(State(state): State<IdpState>) -> Response {
    state.discovery_hits.fetch_add(1, Ordering::SeqCst);
    if !state.up.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let issuer = state.issuer.lock().unwrap().clone();
    Json(json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{issuer}/oauth/v2/authorize"),
        "jwks_uri": format!("{issuer}{}", state.jwks_path),
        "id_token_signing_alg_values_supported": ["RS256", "ES256"],
    }))
    .into_response()
}

async fn serve_jwks(State(state): State<IdpState>) -> Response {
    state.jwks_hits.fetch_add(1, Ordering::SeqCst);
    if !state.up.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    Json(state.jwks.lock().unwrap().clone()).into_response()
}

/// A JWKS holding the fixture keys with these ids (`rsa-a`, `rsa-b`, `ec-a`).
fn jwks_of(kids: &[&str]) -> Value {
    let fixture: Value = serde_json::from_slice(JWKS_FIXTURE).unwrap();
    let keys: Vec<Value> = kids
        .iter()
        .map(|kid| {
            fixture["keys"]
                .as_array()
                .unwrap()
                .iter()
                .find(|key| key["kid"] == *kid)
                .unwrap_or_else(|| panic!("no fixture key {kid}"))
                .clone()
        })
        .collect();
    json!({ "keys": keys })
}

/// The fixture key `kid` with some members replaced.
fn fixture_key_with(kid: &str, changes: Value) -> Value {
    let mut key = jwks_of(&[kid])["keys"][0].clone();
    for (name, value) in changes.as_object().unwrap() {
        if value.is_null() {
            key.as_object_mut().unwrap().remove(name);
        } else {
            key[name] = value.clone();
        }
    }
    key
}

const FLOOR_NONE: Duration = Duration::ZERO;
const FLOOR_LONG: Duration = Duration::from_secs(3600);

#[test]
fn jwks_fixture_matches_the_pem_keys() {
    // The JWKS fixture was computed with openssl; check it against jsonwebtoken's own view.
    for (kid, key, alg) in [
        ("rsa-a", rsa_a(), Algorithm::RS256),
        ("rsa-b", rsa_b(), Algorithm::RS256),
        ("ec-a", ec_a(), Algorithm::ES256),
    ] {
        let derived = serde_json::to_value(Jwk::from_encoding_key(&key, alg).unwrap()).unwrap();
        let stored = &jwks_of(&[kid])["keys"][0];
        for member in ["kty", "n", "e", "crv", "x", "y", "alg"] {
            assert_eq!(derived.get(member), stored.get(member), "{kid}: {member}");
        }
    }
    let public = jsonwebtoken::DecodingKey::from_rsa_pem(RSA_A_PUBLIC).unwrap();
    let derived = serde_json::to_value(Jwk::from_decoding_key(&public, None).unwrap()).unwrap();
    assert_eq!(derived["n"], jwks_of(&["rsa-a"])["keys"][0]["n"]);
}

#[tokio::test]
async fn oidc_valid_rs256_and_es256_tokens_are_accepted() {
    let idp = Idp::start(jwks_of(&["rsa-a", "ec-a"])).await;
    let auth = idp
        .authenticator(Some("backup-provisioner"), FLOOR_LONG)
        .await;
    assert_eq!(idp.discovery_hits(), 1);
    assert_eq!(idp.jwks_hits(), 1, "keys are loaded at start-up");

    let token = sign(Algorithm::RS256, Some("rsa-a"), &rsa_a(), &idp.claims());
    let principal = auth.authenticate(&token).await.unwrap();
    assert_eq!(principal.subject, "alice");
    assert_eq!(principal.roles, vec![Role::Operator]);

    let token = sign(Algorithm::ES256, Some("ec-a"), &ec_a(), &idp.claims());
    auth.authenticate(&token).await.unwrap();

    // The issuer with a trailing slash is the same issuer.
    let claims = with(idp.claims(), "iss", json!(format!("{}/", idp.issuer)));
    let token = sign(Algorithm::RS256, Some("rsa-a"), &rsa_a(), &claims);
    auth.authenticate(&token).await.unwrap();

    // Clones share the cache: nothing more was fetched.
    let clone = auth.clone();
    clone.authenticate(&token).await.unwrap();
    assert_eq!(idp.jwks_hits(), 1);
    assert_eq!(idp.discovery_hits(), 1);
}

#[tokio::test]
async fn oidc_expired_and_not_yet_valid() {
    let idp = Idp::start(jwks_of(&["rsa-a"])).await;
    let auth = idp.authenticator(None, FLOOR_LONG).await;
    let now = now();

    let token = sign(
        Algorithm::RS256,
        Some("rsa-a"),
        &rsa_a(),
        &with(idp.claims(), "exp", json!(now - 120)),
    );
    let err = auth.authenticate(&token).await.unwrap_err();
    assert!(matches!(err, AuthError::Expired), "{err:?}");

    let token = sign(
        Algorithm::RS256,
        Some("rsa-a"),
        &rsa_a(),
        &with(idp.claims(), "nbf", json!(now + 120)),
    );
    let err = auth.authenticate(&token).await.unwrap_err();
    assert!(matches!(err, AuthError::NotYetValid), "{err:?}");
}

#[tokio::test]
async fn oidc_wrong_issuer_and_audience() {
    let idp = Idp::start(jwks_of(&["rsa-a"])).await;
    let auth = idp
        .authenticator(Some("backup-provisioner"), FLOOR_LONG)
        .await;

    let token = sign(
        Algorithm::RS256,
        Some("rsa-a"),
        &rsa_a(),
        &with(idp.claims(), "iss", json!("https://evil.example")),
    );
    let err = auth.authenticate(&token).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("wrong issuer: expected {}", idp.issuer)
    );

    let token = sign(
        Algorithm::RS256,
        Some("rsa-a"),
        &rsa_a(),
        &with(idp.claims(), "aud", json!("grafana")),
    );
    let err = auth.authenticate(&token).await.unwrap_err();
    assert!(matches!(err, AuthError::WrongAudience), "{err:?}");

    let token = sign(
        Algorithm::RS256,
        Some("rsa-a"),
        &rsa_a(),
        &without(idp.claims(), "aud"),
    );
    let err = auth.authenticate(&token).await.unwrap_err();
    assert!(matches!(err, AuthError::MissingClaim("aud")), "{err:?}");

    // Without a configured audience, any (or no) audience is accepted.
    let lenient = idp.authenticator(None, FLOOR_LONG).await;
    for claims in [
        with(idp.claims(), "aud", json!("grafana")),
        with(idp.claims(), "aud", json!(["a", "b"])),
        without(idp.claims(), "aud"),
    ] {
        let token = sign(Algorithm::RS256, Some("rsa-a"), &rsa_a(), &claims);
        lenient.authenticate(&token).await.unwrap();
    }
}

#[tokio::test]
async fn oidc_wrong_key_is_an_invalid_signature() {
    let idp = Idp::start(jwks_of(&["rsa-a", "ec-a"])).await;
    let auth = idp.authenticator(None, FLOOR_LONG).await;
    // Signed with key B but claiming to be key A.
    let token = sign(Algorithm::RS256, Some("rsa-a"), &rsa_b(), &idp.claims());
    let err = auth.authenticate(&token).await.unwrap_err();
    assert!(matches!(err, AuthError::InvalidSignature), "{err:?}");

    // An ES256 signature of the right length made by another EC key.
    let other_ec = EncodingKey::from_ec_pem(EC_B_PRIVATE).unwrap();
    let token = sign(Algorithm::ES256, Some("ec-a"), &other_ec, &idp.claims());
    let err = auth.authenticate(&token).await.unwrap_err();
    assert!(matches!(err, AuthError::InvalidSignature), "{err:?}");
}

#[tokio::test]
async fn oidc_rejects_alg_none() {
    let idp = Idp::start(jwks_of(&["rsa-a"])).await;
    let auth = idp.authenticator(None, FLOOR_LONG).await;
    let token = hand_made(
        &json!({"alg": "none", "typ": "JWT", "kid": "rsa-a"}),
        &idp.claims(),
        "",
    );
    let err = auth.authenticate(&token).await.unwrap_err();
    assert!(matches!(err, AuthError::AlgorithmNone), "{err:?}");
}

#[tokio::test]
async fn oidc_rejects_hs256_signed_with_the_rsa_public_key() {
    let idp = Idp::start(jwks_of(&["rsa-a"])).await;
    let auth = idp.authenticator(None, FLOOR_LONG).await;
    // The classic confusion attack: the public key (which anyone has) used as an HMAC secret.
    let token = sign(
        Algorithm::HS256,
        Some("rsa-a"),
        &EncodingKey::from_secret(RSA_A_PUBLIC),
        &with(idp.claims(), "roles", json!(["admin"])),
    );
    let err = auth.authenticate(&token).await.unwrap_err();
    assert!(
        matches!(err, AuthError::AlgorithmNotAccepted { .. }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "algorithm HS256 is not accepted by this server (accepted: RS256, ES256)"
    );
    assert!(!err.is_unavailable());

    // Other algorithms of the RSA family are not accepted either.
    let token = sign(Algorithm::PS256, Some("rsa-a"), &rsa_a(), &idp.claims());
    let err = auth.authenticate(&token).await.unwrap_err();
    assert!(
        matches!(err, AuthError::AlgorithmNotAccepted { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn oidc_key_type_and_key_alg_must_match_the_header() {
    let idp = Idp::start(json!({ "keys": [
        jwks_of(&["rsa-a"])["keys"][0].clone(),
        jwks_of(&["ec-a"])["keys"][0].clone(),
        // rsa-b published without `alg`: usable for RS256 by its type alone.
        fixture_key_with("rsa-b", json!({"alg": null})),
    ]}))
    .await;
    let auth = idp.authenticator(None, FLOOR_LONG).await;

    // ES256 header naming an RSA key.
    let token = sign(Algorithm::ES256, Some("rsa-a"), &ec_a(), &idp.claims());
    let err = auth.authenticate(&token).await.unwrap_err();
    assert!(
        matches!(err, AuthError::KeyAlgorithmMismatch { .. }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "signing key rsa-a cannot be used with algorithm ES256"
    );

    // RS256 header naming an EC key.
    let token = sign(Algorithm::RS256, Some("ec-a"), &rsa_a(), &idp.claims());
    let err = auth.authenticate(&token).await.unwrap_err();
    assert!(
        matches!(err, AuthError::KeyAlgorithmMismatch { .. }),
        "{err:?}"
    );

    let token = sign(Algorithm::RS256, Some("rsa-b"), &rsa_b(), &idp.claims());
    auth.authenticate(&token).await.unwrap();
    assert_eq!(idp.jwks_hits(), 1, "a mismatch does not trigger a refetch");
}

#[tokio::test]
async fn oidc_keys_for_other_uses_or_algorithms_are_ignored() {
    let idp = Idp::start(json!({ "keys": [
        fixture_key_with("rsa-a", json!({"use": "enc"})),
        fixture_key_with("rsa-b", json!({"alg": "RS512"})),
        fixture_key_with("ec-a", json!({"kid": "ec-384", "crv": "P-384"})),
        {"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
        {"kty": "weird"},
        fixture_key_with("ec-a", json!({})),
    ]}))
    .await;
    let auth = idp.authenticator(None, FLOOR_LONG).await;
    for (kid, key, alg) in [
        ("rsa-a", rsa_a(), Algorithm::RS256),
        ("rsa-b", rsa_b(), Algorithm::RS256),
    ] {
        let token = sign(alg, Some(kid), &key, &idp.claims());
        let err = auth.authenticate(&token).await.unwrap_err();
        assert!(matches!(err, AuthError::UnknownKeyId), "{kid}: {err:?}");
    }
    let token = sign(Algorithm::ES256, Some("ec-a"), &ec_a(), &idp.claims());
    auth.authenticate(&token).await.unwrap();
}

#[tokio::test]
async fn oidc_token_without_kid() {
    let idp = Idp::start(jwks_of(&["rsa-a", "ec-a"])).await;
    let auth = idp.authenticator(None, FLOOR_LONG).await;
    // One RSA key in the set: a token without kid uses it.
    let token = sign(Algorithm::RS256, None, &rsa_a(), &idp.claims());
    auth.authenticate(&token).await.unwrap();

    let idp = Idp::start(jwks_of(&["rsa-a", "rsa-b"])).await;
    let auth = idp.authenticator(None, FLOOR_LONG).await;
    let token = sign(Algorithm::RS256, None, &rsa_a(), &idp.claims());
    let err = auth.authenticate(&token).await.unwrap_err();
    assert!(matches!(err, AuthError::MissingKeyId), "{err:?}");
    let token = sign(Algorithm::ES256, None, &ec_a(), &idp.claims());
    let err = auth.authenticate(&token).await.unwrap_err();
    assert!(matches!(err, AuthError::MissingKeyId), "{err:?}");
    assert_eq!(idp.jwks_hits(), 1);
}

#[tokio::test]
async fn oidc_roles_from_zitadel_object() {
    let idp = Idp::start(jwks_of(&["rsa-a"])).await;
    let mut config = idp.config(Some("backup-provisioner"), FLOOR_LONG);
    config.roles_claim = ZITADEL_ROLES.into();
    let auth = Authenticator::new(config).await.unwrap();
    let claims = with(
        without(idp.claims(), "roles"),
        ZITADEL_ROLES,
        json!({"admin": {"2480": "acme.example"}}),
    );
    let token = sign(Algorithm::RS256, Some("rsa-a"), &rsa_a(), &claims);
    let principal = auth.authenticate(&token).await.unwrap();
    assert_eq!(principal.roles, vec![Role::Admin]);
    assert!(principal.has(Role::Viewer));
}

#[tokio::test]
async fn oidc_jwks_rotation_is_picked_up_on_unknown_kid() {
    let idp = Idp::start(jwks_of(&["rsa-a"])).await;
    let auth = idp.authenticator(None, FLOOR_NONE).await;
    let token_a = sign(Algorithm::RS256, Some("rsa-a"), &rsa_a(), &idp.claims());
    auth.authenticate(&token_a).await.unwrap();
    assert_eq!(idp.jwks_hits(), 1);

    // The IdP rotates: key A is withdrawn, key B published.
    idp.set_jwks(jwks_of(&["rsa-b"]));
    let token_b = sign(Algorithm::RS256, Some("rsa-b"), &rsa_b(), &idp.claims());
    let principal = auth.authenticate(&token_b).await.unwrap();
    assert_eq!(principal.subject, "alice");
    assert_eq!(idp.jwks_hits(), 2);
    assert_eq!(idp.discovery_hits(), 1, "discovery is cached");

    // Key A is no longer trusted: the cache was replaced, not merged.
    let err = auth.authenticate(&token_a).await.unwrap_err();
    assert!(matches!(err, AuthError::UnknownKeyId), "{err:?}");
    assert_eq!(err.to_string(), "unknown signing key id");
    assert_eq!(idp.jwks_hits(), 3, "floor zero: every miss refetches");
}

#[tokio::test]
async fn oidc_refetch_floor_limits_fetches_for_unknown_kids() {
    let idp = Idp::start(jwks_of(&["rsa-a"])).await;
    let auth = idp.authenticator(None, FLOOR_LONG).await;
    assert_eq!(idp.jwks_hits(), 1);

    // The first unknown kid refetches (the start-up load does not count against the floor).
    idp.set_jwks(jwks_of(&["rsa-a", "rsa-b"]));
    let token_b = sign(Algorithm::RS256, Some("rsa-b"), &rsa_b(), &idp.claims());
    auth.authenticate(&token_b).await.unwrap();
    assert_eq!(idp.jwks_hits(), 2);

    // Another unknown kid within the floor: no fetch, rejected.
    for kid in ["garbage-1", "garbage-2", "rsa-c"] {
        let token = sign(Algorithm::RS256, Some(kid), &rsa_a(), &idp.claims());
        let err = auth.authenticate(&token).await.unwrap_err();
        assert!(matches!(err, AuthError::UnknownKeyId), "{err:?}");
        assert!(!err.is_unavailable());
    }
    assert_eq!(idp.jwks_hits(), 2);

    // Known keys keep working meanwhile.
    let token_a = sign(Algorithm::RS256, Some("rsa-a"), &rsa_a(), &idp.claims());
    auth.authenticate(&token_a).await.unwrap();
    auth.authenticate(&token_b).await.unwrap();
    assert_eq!(idp.jwks_hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_concurrent_misses_for_a_new_kid_fetch_once() {
    let idp = Idp::start(jwks_of(&["rsa-a"])).await;
    let auth = idp.authenticator(None, FLOOR_LONG).await;
    idp.set_jwks(jwks_of(&["rsa-b"]));
    let token_b = sign(Algorithm::RS256, Some("rsa-b"), &rsa_b(), &idp.claims());
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let auth = auth.clone();
            let token = token_b.clone();
            tokio::spawn(async move { auth.authenticate(&token).await })
        })
        .collect();
    for task in futures::future::join_all(tasks).await {
        task.unwrap().unwrap();
    }
    assert_eq!(idp.jwks_hits(), 2);
}

#[tokio::test]
async fn oidc_idp_down_at_start_is_fetched_lazily() {
    let idp = Idp::start(jwks_of(&["rsa-a"])).await;
    idp.set_up(false);
    let auth = idp.authenticator(None, FLOOR_NONE).await; // does not fail
    assert_eq!(idp.discovery_hits(), 1);

    let token = sign(Algorithm::RS256, Some("rsa-a"), &rsa_a(), &idp.claims());
    let err = auth.authenticate(&token).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert_eq!(
        err.to_string(),
        "identity provider unavailable: the discovery document request returned HTTP 503"
    );

    idp.set_up(true);
    let principal = auth.authenticate(&token).await.unwrap();
    assert_eq!(principal.subject, "alice");
    assert_eq!(idp.discovery_hits(), 3);
    assert_eq!(idp.jwks_hits(), 1);
}

#[tokio::test]
async fn oidc_idp_down_respects_the_floor() {
    let idp = Idp::start(jwks_of(&["rsa-a"])).await;
    idp.set_up(false);
    let auth = idp.authenticator(None, FLOOR_LONG).await;
    let token = sign(Algorithm::RS256, Some("rsa-a"), &rsa_a(), &idp.claims());
    for _ in 0..3 {
        let err = auth.authenticate(&token).await.unwrap_err();
        assert!(err.is_unavailable(), "{err:?}");
    }
    // Start-up attempt plus one attempt for the first request; the rest wait for the floor.
    assert_eq!(idp.discovery_hits(), 2);
}

#[tokio::test]
async fn oidc_unreachable_idp_is_unavailable() {
    // A port with nobody listening.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let issuer = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let auth = Authenticator::new(AuthConfig {
        settings: AuthSettings::Oidc {
            issuer: issuer.parse().unwrap(),
            audience: None,
            jwks_refetch_floor: FLOOR_NONE,
        },
        roles_claim: DEFAULT_ROLES_CLAIM.into(),
    })
    .await
    .unwrap();
    let token = sign(
        Algorithm::RS256,
        Some("rsa-a"),
        &rsa_a(),
        &claims(&issuer, "x"),
    );
    let err = auth.authenticate(&token).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert_eq!(
        err.to_string(),
        "identity provider unavailable: could not fetch the discovery document"
    );
}

#[tokio::test]
async fn oidc_discovery_for_another_issuer_is_refused() {
    let idp = Idp::start(jwks_of(&["rsa-a"])).await;
    *idp.state.issuer.lock().unwrap() = "https://impostor.example".into();
    let auth = idp.authenticator(None, FLOOR_NONE).await;
    let token = sign(Algorithm::RS256, Some("rsa-a"), &rsa_a(), &idp.claims());
    let err = auth.authenticate(&token).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert_eq!(idp.jwks_hits(), 0);
}

#[tokio::test]
async fn oidc_jwks_without_usable_keys_keeps_the_old_keys() {
    let idp = Idp::start(jwks_of(&["rsa-a"])).await;
    let auth = idp.authenticator(None, FLOOR_NONE).await;
    idp.set_jwks(json!({"keys": []}));
    let token = sign(Algorithm::RS256, Some("rsa-x"), &rsa_a(), &idp.claims());
    let err = auth.authenticate(&token).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    let token_a = sign(Algorithm::RS256, Some("rsa-a"), &rsa_a(), &idp.claims());
    auth.authenticate(&token_a).await.unwrap();
}

#[tokio::test]
async fn oidc_config_is_validated() {
    for issuer in [
        "ftp://idp.example",
        "https://idp.example/?tenant=1",
        "https://user:pw@idp.example",
    ] {
        let err = Authenticator::new(AuthConfig {
            settings: AuthSettings::Oidc {
                issuer: issuer.parse().unwrap(),
                audience: None,
                jwks_refetch_floor: FLOOR_NONE,
            },
            roles_claim: DEFAULT_ROLES_CLAIM.into(),
        })
        .await
        .unwrap_err();
        assert!(matches!(err, AuthError::Config(_)), "{issuer}: {err:?}");
        assert!(!err.to_string().contains("pw"), "{err}");
    }
    let err = Authenticator::new(AuthConfig {
        settings: AuthSettings::Oidc {
            issuer: "https://idp.example".parse().unwrap(),
            audience: Some(String::new()),
            jwks_refetch_floor: FLOOR_NONE,
        },
        roles_claim: DEFAULT_ROLES_CLAIM.into(),
    })
    .await
    .unwrap_err();
    assert!(matches!(err, AuthError::Config(_)), "{err:?}");
}

#[tokio::test]
async fn debug_output_does_not_leak_the_secret() {
    let auth = hs_auth().await;
    let text = format!("{auth:?}");
    assert!(!text.contains("0123456789abcdef"), "{text}");
    let config = AuthConfig {
        settings: AuthSettings::Hs256 {
            secret: secret(),
            audience: DEFAULT_AUDIENCE.into(),
        },
        roles_claim: DEFAULT_ROLES_CLAIM.into(),
    };
    assert!(!format!("{config:?}").contains("0123456789abcdef"));
}

#[tokio::test]
async fn oidc_over_age_key_set_is_refreshed_and_kept_when_the_idp_is_down() {
    let idp = Idp::start(jwks_of(&["rsa-a"])).await;
    // Maximum age zero: every request finds the cached set over age.
    let auth = Authenticator::build(idp.config(None, FLOOR_NONE), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(idp.jwks_hits(), 1);
    let token_a = sign(Algorithm::RS256, Some("rsa-a"), &rsa_a(), &idp.claims());
    auth.authenticate(&token_a).await.unwrap();
    assert_eq!(
        idp.jwks_hits(),
        2,
        "an over-age set is refetched before use"
    );

    // The IdP is down: the refresh fails and the cached keys stay in use.
    idp.set_up(false);
    auth.authenticate(&token_a).await.unwrap();
    assert_eq!(idp.jwks_hits(), 3);

    // Back up, with key A withdrawn: the refresh drops it.
    idp.set_up(true);
    idp.set_jwks(jwks_of(&["rsa-b"]));
    let err = auth.authenticate(&token_a).await.unwrap_err();
    assert!(matches!(err, AuthError::UnknownKeyId), "{err:?}");
}
