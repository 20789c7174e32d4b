//! An identity provider for the console's OIDC login, inside the test: discovery, JWKS, an
//! authorization endpoint that signs the user in at once (302 back with a code) and a token
//! endpoint that checks the PKCE verifier (S256) before it issues an RS256 access token. It
//! answers cross-origin reads (`Access-Control-Allow-Origin: *`): the console, on another
//! origin, reads the discovery document and posts to the token endpoint from the browser.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Form, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::support::app::AUDIENCE;

const JWKS: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/jwt/jwks.json"
));
const RSA_A_PRIVATE: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/jwt/rsa_a_private.pem"
));

/// The console's client id at this provider.
pub const CLIENT_ID: &str = "console";
/// Who signs in.
pub const SUBJECT: &str = "oidc-operator@test";

#[derive(Default)]
struct Pending {
    /// code → (code_challenge, redirect_uri)
    codes: HashMap<String, (String, String)>,
    /// What the authorization requests asked, for assertions.
    authorizations: Vec<HashMap<String, String>>,
    /// The token endpoint's answers (status).
    exchanges: Vec<u16>,
}

#[derive(Clone)]
struct IdpState {
    issuer: String,
    pending: Arc<Mutex<Pending>>,
}

pub struct Idp {
    pub issuer: String,
    state: IdpState,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Idp {
    pub async fn start() -> Idp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the identity provider");
        let issuer = format!("http://{}", listener.local_addr().unwrap());
        let state = IdpState {
            issuer: issuer.clone(),
            pending: Arc::default(),
        };
        let router = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/keys", get(keys))
            .route("/authorize", get(authorize))
            .route("/token", post(token))
            .layer(axum::middleware::map_response(
                |mut response: Response| async {
                    response.headers_mut().insert(
                        header::ACCESS_CONTROL_ALLOW_ORIGIN,
                        HeaderValue::from_static("*"),
                    );
                    response
                },
            ))
            .with_state(state.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Idp {
            issuer,
            state,
            server,
        }
    }

    /// The query of each authorization request.
    pub fn authorizations(&self) -> Vec<HashMap<String, String>> {
        self.state.pending.lock().unwrap().authorizations.clone()
    }

    /// The status of each token request.
    pub fn exchanges(&self) -> Vec<u16> {
        self.state.pending.lock().unwrap().exchanges.clone()
    }
}

async fn discovery(State(state): State<IdpState>) -> Json<Value> {
    Json(json!({
        "issuer": state.issuer,
        "jwks_uri": format!("{}/keys", state.issuer),
        "authorization_endpoint": format!("{}/authorize", state.issuer),
        "token_endpoint": format!("{}/token", state.issuer),
        "code_challenge_methods_supported": ["S256"],
    }))
}

async fn keys() -> Json<Value> {
    let all: Value = serde_json::from_slice(JWKS).expect("the JWKS fixture");
    let rsa_a: Vec<Value> = all["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter(|key| key["kid"] == "rsa-a")
        .cloned()
        .collect();
    Json(json!({ "keys": rsa_a }))
}

/// Signs the user in at once: back to `redirect_uri` with a code for this challenge.
async fn authorize(
    State(state): State<IdpState>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let mut pending = state.pending.lock().unwrap();
    pending.authorizations.push(query.clone());
    let (Some(redirect), Some(challenge), Some(client_state)) = (
        query.get("redirect_uri"),
        query.get("code_challenge"),
        query.get("state"),
    ) else {
        return (StatusCode::BAD_REQUEST, "missing parameters").into_response();
    };
    let code = uuid::Uuid::new_v4().simple().to_string();
    pending
        .codes
        .insert(code.clone(), (challenge.clone(), redirect.clone()));
    let back = format!("{redirect}?code={code}&state={client_state}");
    Redirect::to(&back).into_response()
}

/// The code for an access token, if the verifier hashes to the code's challenge.
async fn token(
    State(state): State<IdpState>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let mut pending = state.pending.lock().unwrap();
    let field = |name: &str| form.get(name).cloned().unwrap_or_default();
    let known = pending.codes.remove(&field("code"));
    let verified = known.is_some_and(|(challenge, redirect)| {
        let hashed = URL_SAFE_NO_PAD.encode(Sha256::digest(field("code_verifier").as_bytes()));
        hashed == challenge
            && redirect == field("redirect_uri")
            && field("client_id") == CLIENT_ID
            && field("grant_type") == "authorization_code"
    });
    if !verified {
        pending.exchanges.push(400);
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": "invalid_grant" })),
        )
            .into_response();
    }
    pending.exchanges.push(200);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let claims = json!({
        "iss": state.issuer, "sub": SUBJECT, "aud": AUDIENCE,
        "iat": now, "exp": now + 600, "roles": ["operator"],
    });
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rsa-a".into());
    let key = EncodingKey::from_rsa_pem(RSA_A_PRIVATE).expect("the RSA fixture");
    let access_token = jsonwebtoken::encode(&header, &claims, &key).expect("sign");
    Json(json!({ "access_token": access_token, "token_type": "Bearer", "expires_in": 600 }))
        .into_response()
}
