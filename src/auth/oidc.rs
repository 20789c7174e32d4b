//! OIDC mode: discovery, the JWKS key cache and key selection.
//!
//! Keys are fetched from `{issuer}/.well-known/openid-configuration` → `jwks_uri` and kept in
//! memory. A token naming an unknown `kid` triggers a refetch, at most once per
//! `jwks_refetch_floor`, so that tokens with made-up key ids cannot make us hammer the identity
//! provider. The set is also refreshed when older than [`JWKS_MAX_AGE`], so keys the provider has
//! withdrawn stop being trusted; if that refresh fails the cached keys stay in use.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;
use url::Url;

use super::AuthError;
use super::token::CheckedHeader;

/// A key set older than this is refetched (when the refetch floor allows) before use.
pub const JWKS_MAX_AGE: Duration = Duration::from_secs(15 * 60);

/// Timeout of one request to the identity provider.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
const HTTP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest discovery document or JWKS we read.
const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

/// Algorithms accepted in OIDC mode.
pub(crate) const ACCEPTED: &[Algorithm] = &[Algorithm::RS256, Algorithm::ES256];
pub(crate) const ACCEPTED_TEXT: &str = "RS256, ES256";

/// The kind of a usable public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    EcP256,
}

/// A public key from the JWKS that we can verify with.
#[derive(Debug)]
pub(crate) struct VerifyKey {
    kid: Option<String>,
    /// The key's own `alg`, when the JWK has one.
    alg: Option<Algorithm>,
    kind: KeyKind,
    pub(crate) key: DecodingKey,
}

impl VerifyKey {
    /// Whether this key may verify a token whose header says `alg`.
    fn fits(&self, alg: Algorithm) -> bool {
        let kind_fits = matches!(
            (alg, self.kind),
            (Algorithm::RS256, KeyKind::Rsa) | (Algorithm::ES256, KeyKind::EcP256)
        );
        kind_fits && self.alg.is_none_or(|own| own == alg)
    }
}

#[derive(Debug, Default)]
struct KeySet {
    keys: Vec<Arc<VerifyKey>>,
    /// When the set was last fetched successfully (`None`: never).
    fetched_at: Option<Instant>,
}

#[derive(Debug, Default)]
struct FetchState {
    /// From the discovery document; cleared when a JWKS fetch fails so discovery is redone.
    jwks_uri: Option<Url>,
    /// The last fetch made for a request (not the one at start-up), successful or not.
    last_attempt: Option<Instant>,
}

impl FetchState {
    fn may_fetch(&self, floor: Duration) -> bool {
        self.last_attempt.is_none_or(|at| at.elapsed() >= floor)
    }
}

/// Settings of OIDC mode, already validated.
pub(crate) struct OidcVerifier {
    issuer: Url,
    /// Accepted `iss` values: the configured issuer with and without a trailing slash.
    pub(crate) issuers: Vec<String>,
    /// The issuer without a trailing slash, for messages.
    pub(crate) issuer_display: String,
    pub(crate) audience: Option<String>,
    floor: Duration,
    /// [`JWKS_MAX_AGE`], shorter in tests.
    max_age: Duration,
    http: reqwest::Client,
    keys: RwLock<Arc<KeySet>>,
    fetch: tokio::sync::Mutex<FetchState>,
}

impl std::fmt::Debug for OidcVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcVerifier")
            .field("issuer", &self.issuer_display)
            .field("audience", &self.audience)
            .field("floor", &self.floor)
            .finish_non_exhaustive()
    }
}

/// An issuer must be a plain http(s) URL with a host (http only with a warning): no query,
/// fragment or credentials.
fn check_issuer(issuer: &Url) -> Result<(), AuthError> {
    match issuer.scheme() {
        "https" => {}
        "http" => tracing::warn!(
            issuer = %issuer,
            "the OIDC issuer uses plain http: signing keys can be tampered with in transit"
        ),
        _ => {
            return Err(AuthError::Config(
                "the OIDC issuer must be an http(s) URL".into(),
            ));
        }
    }
    if issuer.host_str().is_none_or(str::is_empty) {
        return Err(AuthError::Config("the OIDC issuer has no host".into()));
    }
    if issuer.query().is_some() || issuer.fragment().is_some() {
        return Err(AuthError::Config(
            "the OIDC issuer must not have a query or fragment".into(),
        ));
    }
    if !issuer.username().is_empty() || issuer.password().is_some() {
        return Err(AuthError::Config(
            "the OIDC issuer must not contain credentials".into(),
        ));
    }
    Ok(())
}

/// The accepted `iss` values (the issuer without and, if configured so, with a trailing slash)
/// and the form without the slash, for messages.
fn accepted_issuers(issuer: &Url) -> (Vec<String>, String) {
    let with_slash = issuer.as_str().to_owned();
    let display = with_slash.trim_end_matches('/').to_owned();
    let mut issuers = vec![display.clone()];
    if with_slash != display {
        issuers.push(with_slash);
    }
    (issuers, display)
}

/// The client for discovery and JWKS requests.
fn http_client() -> Result<reqwest::Client, AuthError> {
    // reqwest's rustls backend needs a process-wide crypto provider; install aws-lc-rs
    // unless the process already has one (then this is a no-op).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(HTTP_TIMEOUT)
        .connect_timeout(HTTP_CONNECT_TIMEOUT)
        .user_agent(concat!("backup-provisioner/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|_| AuthError::Config("could not build the HTTP client".into()))
}

impl OidcVerifier {
    pub(crate) fn new(
        issuer: Url,
        audience: Option<String>,
        floor: Duration,
        max_age: Duration,
    ) -> Result<Self, AuthError> {
        check_issuer(&issuer)?;
        if audience.as_deref().is_some_and(str::is_empty) {
            return Err(AuthError::Config("the JWT audience is empty".into()));
        }
        let (issuers, issuer_display) = accepted_issuers(&issuer);
        Ok(Self {
            issuer,
            issuers,
            issuer_display,
            audience,
            floor,
            max_age,
            http: http_client()?,
            keys: RwLock::new(Arc::new(KeySet::default())),
            fetch: tokio::sync::Mutex::new(FetchState::default()),
        })
    }

    /// The start-up fetch. Failure is only logged: keys are then fetched on the first request.
    /// It does not count towards the refetch floor.
    pub(crate) async fn preload(&self) {
        let mut state = self.fetch.lock().await;
        if let Err(err) = self.fetch_keys(&mut state).await {
            tracing::warn!(
                issuer = %self.issuer_display,
                error = %err,
                "could not load the OIDC signing keys at start-up; will retry on the first request"
            );
        }
    }

    fn snapshot(&self) -> Arc<KeySet> {
        // A poisoned lock only means a panic while swapping an Arc: the value is still whole.
        self.keys
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn store(&self, set: KeySet) {
        *self
            .keys
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(set);
    }

    /// The key to verify a token with this header.
    pub(crate) async fn key_for(
        &self,
        header: &CheckedHeader,
    ) -> Result<Arc<VerifyKey>, AuthError> {
        let mut set = self.snapshot();
        if set
            .fetched_at
            .is_some_and(|at| at.elapsed() >= self.max_age)
        {
            set = self.refresh_stale().await;
        }
        if let Some(found) = select(&set, header)? {
            return Ok(found);
        }

        // Miss: refetch, one task at a time, no more often than the floor allows.
        let mut state = self.fetch.lock().await;
        let set = self.snapshot();
        if let Some(found) = select(&set, header)? {
            return Ok(found); // another request refetched while we waited
        }
        let must_have_kid = header.kid.is_none() && set.fetched_at.is_some();
        if must_have_kid || !state.may_fetch(self.floor) {
            return Err(if set.fetched_at.is_none() {
                AuthError::idp("signing keys could not be fetched recently; retrying later")
            } else if header.kid.is_none() {
                AuthError::MissingKeyId
            } else {
                AuthError::UnknownKeyId
            });
        }
        state.last_attempt = Some(Instant::now());
        self.fetch_keys(&mut state).await?;
        drop(state);
        match select(&self.snapshot(), header)? {
            Some(found) => Ok(found),
            None if header.kid.is_none() => Err(AuthError::MissingKeyId),
            None => Err(AuthError::UnknownKeyId),
        }
    }

    /// Refreshes an over-age key set if no other task is doing so and the floor allows; on
    /// failure keeps the old set.
    async fn refresh_stale(&self) -> Arc<KeySet> {
        if let Ok(mut state) = self.fetch.try_lock()
            && state.may_fetch(self.floor)
            && self
                .snapshot()
                .fetched_at
                .is_some_and(|at| at.elapsed() >= self.max_age)
        {
            state.last_attempt = Some(Instant::now());
            if let Err(err) = self.fetch_keys(&mut state).await {
                tracing::warn!(
                    issuer = %self.issuer_display,
                    error = %err,
                    "could not refresh the OIDC signing keys; using the cached ones"
                );
            }
        }
        self.snapshot()
    }

    /// Fetches (discovery if needed, then) the JWKS and replaces the key set. The caller holds
    /// the fetch lock.
    async fn fetch_keys(&self, state: &mut FetchState) -> Result<(), AuthError> {
        let jwks_uri = match &state.jwks_uri {
            Some(uri) => uri.clone(),
            None => {
                let uri = self.discover().await?;
                state.jwks_uri = Some(uri.clone());
                uri
            }
        };
        let result = async {
            let document = self.get_json(&jwks_uri, "JWKS").await?;
            parse_jwks(&document)
        }
        .await;
        match result {
            Ok(keys) => {
                tracing::info!(
                    issuer = %self.issuer_display,
                    keys = keys.len(),
                    "loaded OIDC signing keys"
                );
                self.store(KeySet {
                    keys,
                    fetched_at: Some(Instant::now()),
                });
                Ok(())
            }
            Err(err) => {
                state.jwks_uri = None; // rediscover next time: the jwks_uri may have moved
                Err(err)
            }
        }
    }

    /// Reads the discovery document; returns its `jwks_uri`.
    async fn discover(&self) -> Result<Url, AuthError> {
        let url = format!("{}/.well-known/openid-configuration", self.issuer_display);
        let url = Url::parse(&url)
            .map_err(|_| AuthError::idp("the discovery URL derived from the issuer is invalid"))?;
        let document = self.get_json(&url, "discovery document").await?;

        let issuer = document.get("issuer").and_then(Value::as_str);
        if issuer.map(|iss| iss.trim_end_matches('/')) != Some(self.issuer_display.as_str()) {
            tracing::warn!(
                expected = %self.issuer_display,
                got = ?issuer,
                "the discovery document names another issuer"
            );
            return Err(AuthError::idp(
                "the discovery document names a different issuer",
            ));
        }
        let jwks_uri = document
            .get("jwks_uri")
            .and_then(Value::as_str)
            .and_then(|uri| Url::parse(uri).ok())
            .ok_or_else(|| AuthError::idp("the discovery document has no valid jwks_uri"))?;
        let scheme_ok = match jwks_uri.scheme() {
            "https" => true,
            "http" => self.issuer.scheme() == "http",
            _ => false,
        };
        if !scheme_ok {
            return Err(AuthError::idp(
                "the discovery document's jwks_uri is not an https URL",
            ));
        }
        Ok(jwks_uri)
    }

    async fn get_json(&self, url: &Url, what: &str) -> Result<Value, AuthError> {
        let fail = |detail: &dyn std::fmt::Display| {
            tracing::warn!(url = %url, error = %detail, "fetching the OIDC {what} failed");
            AuthError::idp(format!("could not fetch the {what}"))
        };
        let mut response = self
            .http
            .get(url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|err| fail(&err))?;
        let status = response.status();
        if !status.is_success() {
            tracing::warn!(url = %url, %status, "fetching the OIDC {what} failed");
            return Err(AuthError::idp(format!(
                "the {what} request returned HTTP {}",
                status.as_u16()
            )));
        }
        if response
            .content_length()
            .is_some_and(|len| len > MAX_DOCUMENT_BYTES as u64)
        {
            return Err(AuthError::idp(format!("the {what} is too large")));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|err| fail(&err))? {
            if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
                return Err(AuthError::idp(format!("the {what} is too large")));
            }
            body.extend_from_slice(&chunk);
        }
        serde_json::from_slice::<Value>(&body)
            .ok()
            .filter(Value::is_object)
            .ok_or_else(|| AuthError::idp(format!("the {what} is not a JSON object")))
    }
}

/// Chooses the key for a header from a set: `Ok(None)` when there is none (a refetch may help).
fn select(set: &KeySet, header: &CheckedHeader) -> Result<Option<Arc<VerifyKey>>, AuthError> {
    match &header.kid {
        Some(kid) => {
            let mut named = set
                .keys
                .iter()
                .filter(|key| key.kid.as_deref() == Some(kid.as_str()))
                .peekable();
            if named.peek().is_none() {
                return Ok(None);
            }
            let mut named = named.collect::<Vec<_>>();
            match named.iter().position(|key| key.fits(header.alg)) {
                Some(index) => Ok(Some(named.swap_remove(index).clone())),
                None => Err(AuthError::KeyAlgorithmMismatch {
                    kid: kid.clone(),
                    alg: alg_name(header.alg),
                }),
            }
        }
        None => {
            let mut fitting = set.keys.iter().filter(|key| key.fits(header.alg));
            match (fitting.next(), fitting.next()) {
                (Some(only), None) => Ok(Some(only.clone())),
                (Some(_), Some(_)) => Err(AuthError::MissingKeyId),
                (None, _) => Ok(None),
            }
        }
    }
}

fn alg_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::RS256 => "RS256",
        Algorithm::ES256 => "ES256",
        _ => "(other)",
    }
}

/// The usable signing keys of a JWKS document. Keys that are not RSA or EC P-256, that are meant
/// for encryption, or that do not parse are skipped (an identity provider may publish those).
fn parse_jwks(document: &Value) -> Result<Vec<Arc<VerifyKey>>, AuthError> {
    let entries = document
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| AuthError::idp("the JWKS has no keys array"))?;
    let keys: Vec<Arc<VerifyKey>> = entries
        .iter()
        .filter_map(|entry| match serde_json::from_value::<Jwk>(entry.clone()) {
            Ok(jwk) => usable_key(&jwk).map(Arc::new),
            Err(_) => {
                tracing::debug!("skipping a JWKS entry that does not parse");
                None
            }
        })
        .collect();
    if keys.is_empty() {
        return Err(AuthError::idp("the JWKS has no usable signing keys"));
    }
    Ok(keys)
}

fn usable_key(jwk: &Jwk) -> Option<VerifyKey> {
    let common = &jwk.common;
    if let Some(usage) = &common.public_key_use
        && *usage != PublicKeyUse::Signature
    {
        return None;
    }
    if let Some(ops) = &common.key_operations
        && !ops.contains(&KeyOperations::Verify)
    {
        return None;
    }
    let alg = match common.key_algorithm {
        None => None,
        Some(KeyAlgorithm::RS256) => Some(Algorithm::RS256),
        Some(KeyAlgorithm::ES256) => Some(Algorithm::ES256),
        // A key dedicated to another algorithm can never verify an accepted token.
        Some(_) => return None,
    };
    let kind = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => KeyKind::Rsa,
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
            KeyKind::EcP256
        }
        _ => return None,
    };
    let key = DecodingKey::from_jwk(jwk).ok()?;
    if kind == KeyKind::EcP256 && key.try_get_as_bytes().map(<[u8]>::len).ok() != Some(65) {
        return None; // x and y must be 32 bytes each
    }
    Some(VerifyKey {
        kid: common.key_id.clone(),
        alg,
        kind,
        key,
    })
}
