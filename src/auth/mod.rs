//! Bearer-token (JWT) authentication.
//!
//! Two modes, chosen by configuration:
//! - **HS256**: a shared secret (`BP_JWT_HS256_SECRET`). Tokens are minted by our `token`
//!   command ([`mint_hs256`]) with issuer [`TOKEN_ISSUER`] and the configured audience.
//! - **OIDC**: RS256/ES256 tokens from an identity provider (`BP_OIDC_ISSUER`), verified with the
//!   keys of its JWKS (see [`oidc`] for fetching and caching). The audience is checked when
//!   configured.
//!
//! Both modes check the signature with exactly the header's algorithm, which must be one the mode
//! accepts (HS256, or RS256/ES256), so `alg: none` and algorithm confusion are refused; then `exp`
//! and `nbf` with [`CLOCK_LEEWAY_SECS`] of leeway, `iss` (one string), `aud`, `sub`, and `iat`
//! (never in the future; with [`AuthConfig::max_lifetime`], required and at most that long
//! before `exp`). Roles come from a configurable claim, as an array of names or an object keyed
//! by names (ZITADEL); any other shape, a string too, grants no role.

mod error;
pub mod oidc;
mod roles;
mod token;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey};
use secrecy::{ExposeSecret as _, SecretString};

pub use error::AuthError;
pub use roles::{Principal, Role, UnknownRole};
pub use token::{CLOCK_LEEWAY_SECS, MIN_HS256_SECRET_BYTES, TOKEN_ISSUER, mint_hs256};

/// The default audience (HS256 mode).
pub const DEFAULT_AUDIENCE: &str = "backup-provisioner";
/// The default roles claim.
pub const DEFAULT_ROLES_CLAIM: &str = "roles";
/// The default minimum time between two JWKS refetches caused by unknown key ids.
pub const DEFAULT_JWKS_REFETCH_FLOOR: Duration = Duration::from_secs(30);

const HS256_ACCEPTED: &[Algorithm] = &[Algorithm::HS256];
const HS256_ACCEPTED_TEXT: &str = "HS256";

/// How tokens are verified.
#[derive(Clone, Debug)]
pub enum AuthSettings {
    /// Shared secret; the issuer must be [`TOKEN_ISSUER`].
    Hs256 {
        /// At least [`MIN_HS256_SECRET_BYTES`] bytes.
        secret: SecretString,
        /// Required in `aud` (usually [`DEFAULT_AUDIENCE`]).
        audience: String,
    },
    /// Keys from the identity provider's JWKS.
    Oidc {
        /// Must equal the tokens' `iss` (a trailing slash is ignored).
        issuer: url::Url,
        /// When set, required in `aud`.
        audience: Option<String>,
        /// Minimum time between JWKS refetches triggered by unknown key ids
        /// (usually [`DEFAULT_JWKS_REFETCH_FLOOR`]; zero disables the floor).
        jwks_refetch_floor: Duration,
    },
}

/// Authentication configuration.
#[derive(Clone, Debug)]
pub struct AuthConfig {
    /// The mode and its settings.
    pub settings: AuthSettings,
    /// The claim holding roles (usually [`DEFAULT_ROLES_CLAIM`]; ZITADEL:
    /// `urn:zitadel:iam:org:project:roles`). A dotted name that is not a top-level claim is
    /// looked up as a path (`realm_access.roles`).
    pub roles_claim: String,
    /// When set, tokens must carry `iat` and live at most this long (`exp - iat`).
    pub max_lifetime: Option<Duration>,
}

/// Verifies bearer tokens. Cheap to clone: clones share the key cache.
#[derive(Clone, Debug)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    mode: Mode,
    roles_claim: String,
    max_lifetime: Option<Duration>,
}

enum Mode {
    Hs256 {
        key: DecodingKey,
        issuers: [String; 1],
        audience: String,
    },
    Oidc(Box<oidc::OidcVerifier>),
}

impl std::fmt::Debug for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mode::Hs256 { audience, .. } => f
                .debug_struct("Hs256")
                .field("audience", audience)
                .finish_non_exhaustive(),
            Mode::Oidc(verifier) => verifier.fmt(f),
        }
    }
}

impl Authenticator {
    /// Validates the configuration and, in OIDC mode, tries to load the signing keys. If the
    /// identity provider cannot be reached now, a warning is logged and the keys are fetched on
    /// the first request instead: start-up does not fail.
    pub async fn new(config: AuthConfig) -> Result<Self, AuthError> {
        Self::build(config, oidc::JWKS_MAX_AGE).await
    }

    /// [`Authenticator::new`] with another maximum age of the cached key set.
    pub(crate) async fn build(
        config: AuthConfig,
        jwks_max_age: Duration,
    ) -> Result<Self, AuthError> {
        if config.roles_claim.trim().is_empty() {
            return Err(AuthError::Config("the roles claim name is empty".into()));
        }
        if config.max_lifetime.is_some_and(|max| max.is_zero()) {
            return Err(AuthError::Config(
                "the maximum token lifetime must be more than 0s".into(),
            ));
        }
        let mode = match config.settings {
            AuthSettings::Hs256 { secret, audience } => {
                token::check_hs256_secret(&secret).map_err(AuthError::Config)?;
                if audience.is_empty() {
                    return Err(AuthError::Config("the JWT audience is empty".into()));
                }
                Mode::Hs256 {
                    key: DecodingKey::from_secret(secret.expose_secret().as_bytes()),
                    issuers: [TOKEN_ISSUER.to_owned()],
                    audience,
                }
            }
            AuthSettings::Oidc {
                issuer,
                audience,
                jwks_refetch_floor,
            } => {
                let verifier =
                    oidc::OidcVerifier::new(issuer, audience, jwks_refetch_floor, jwks_max_age)?;
                verifier.preload().await;
                Mode::Oidc(Box::new(verifier))
            }
        };
        Ok(Self {
            inner: Arc::new(Inner {
                mode,
                roles_claim: config.roles_claim,
                max_lifetime: config.max_lifetime,
            }),
        })
    }

    /// Verifies a bearer token (the part after `Bearer `; a leading `Bearer ` is tolerated) and
    /// returns who it names and their roles.
    pub async fn authenticate(&self, bearer_token: &str) -> Result<Principal, AuthError> {
        let token = token::normalise(bearer_token)?;
        let claims = match &self.inner.mode {
            Mode::Hs256 {
                key,
                issuers,
                audience,
            } => {
                let header = token::check_header(token, HS256_ACCEPTED, HS256_ACCEPTED_TEXT)?;
                let expect = token::Expectations {
                    issuers,
                    issuer_display: TOKEN_ISSUER,
                    audience: Some(audience),
                    max_lifetime: self.inner.max_lifetime,
                };
                token::verify(token, header.alg, key, &expect)?
            }
            Mode::Oidc(verifier) => {
                let header = token::check_header(token, oidc::ACCEPTED, oidc::ACCEPTED_TEXT)?;
                let key = verifier.key_for(&header).await?;
                let expect = token::Expectations {
                    issuers: &verifier.issuers,
                    issuer_display: &verifier.issuer_display,
                    audience: verifier.audience.as_deref(),
                    max_lifetime: self.inner.max_lifetime,
                };
                token::verify(token, header.alg, &key.key, &expect)?
            }
        };
        let subject = token::subject(&claims)?;
        let roles = roles::roles_from_claim(roles::find_claim(&claims, &self.inner.roles_claim));
        Ok(Principal { subject, roles })
    }
}
