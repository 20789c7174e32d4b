//! OIDC mode: an identity provider served from the test.

use super::*;

#[derive(Clone)]
pub(super) struct IdpState {
    pub(super) issuer: Arc<Mutex<String>>,
    jwks_path: &'static str,
    jwks: Arc<Mutex<Value>>,
    up: Arc<AtomicBool>,
    discovery_hits: Arc<AtomicUsize>,
    jwks_hits: Arc<AtomicUsize>,
}

pub(super) struct Idp {
    pub(super) issuer: String,
    pub(super) state: IdpState,
}

impl Idp {
    pub(super) async fn start(jwks: Value) -> Self {
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

    pub(super) fn set_jwks(&self, jwks: Value) {
        *self.state.jwks.lock().unwrap() = jwks;
    }

    pub(super) fn set_up(&self, up: bool) {
        self.state.up.store(up, Ordering::SeqCst);
    }

    pub(super) fn jwks_hits(&self) -> usize {
        self.state.jwks_hits.load(Ordering::SeqCst)
    }

    pub(super) fn discovery_hits(&self) -> usize {
        self.state.discovery_hits.load(Ordering::SeqCst)
    }

    pub(super) fn config(&self, audience: Option<&str>, floor: Duration) -> AuthConfig {
        AuthConfig {
            settings: AuthSettings::Oidc {
                issuer: self.issuer.parse().unwrap(),
                audience: audience.map(str::to_owned),
                jwks_refetch_floor: floor,
            },
            roles_claim: DEFAULT_ROLES_CLAIM.into(),
            max_lifetime: None,
        }
    }

    pub(super) async fn authenticator(
        &self,
        audience: Option<&str>,
        floor: Duration,
    ) -> Authenticator {
        Authenticator::new(self.config(audience, floor))
            .await
            .unwrap()
    }

    pub(super) fn claims(&self) -> Value {
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
pub(super) fn jwks_of(kids: &[&str]) -> Value {
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
pub(super) fn fixture_key_with(kid: &str, changes: Value) -> Value {
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

pub(super) const FLOOR_NONE: Duration = Duration::ZERO;
pub(super) const FLOOR_LONG: Duration = Duration::from_secs(3600);
