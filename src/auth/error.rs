//! Authentication errors.
//!
//! Every `Display` text is meant to be shown to the caller as the `detail` of a 401 (or, for
//! [`AuthError::IdpUnavailable`], 503) problem document: it is precise but never contains token
//! contents chosen by the caller beyond a sanitised algorithm name, nor any secret.

/// Why a bearer token was not accepted (or, for configuration errors, why the
/// [`Authenticator`](super::Authenticator) could not be built).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No token at all (empty string after trimming).
    #[error("missing bearer token")]
    MissingToken,

    /// Not three base64url parts, a header or payload that is not JSON, an oversized token...
    #[error("malformed token")]
    Malformed,

    /// The header says `alg: none` (an unsigned token).
    #[error("algorithm none is not accepted")]
    AlgorithmNone,

    /// The header algorithm is not in the set this server accepts in its mode.
    #[error("algorithm {alg} is not accepted by this server (accepted: {accepted})")]
    AlgorithmNotAccepted {
        /// The header's algorithm, sanitised (see `token::display_alg`).
        alg: String,
        /// The accepted algorithms, comma separated.
        accepted: &'static str,
    },

    /// The header lists `crit` extensions, none of which this server understands.
    #[error("token uses critical header parameters this server does not understand")]
    UnsupportedCriticalHeader,

    /// OIDC mode: the header has no `kid` and the key set has no single key that fits.
    #[error("token header has no key id (kid)")]
    MissingKeyId,

    /// OIDC mode: no key with the header's `kid`, even after refetching the JWKS.
    #[error("unknown signing key id")]
    UnknownKeyId,

    /// OIDC mode: the key named by `kid` is not usable with the header algorithm (key type, curve
    /// or the key's own `alg` differ), e.g. an ES256 header naming an RSA key.
    #[error("signing key {kid} cannot be used with algorithm {alg}")]
    KeyAlgorithmMismatch {
        /// The key id (comes from our own JWKS cache, so it is a known key's id).
        kid: String,
        /// The header's algorithm (an accepted one, so safe to echo).
        alg: &'static str,
    },

    /// The signature does not verify with the key.
    #[error("invalid signature")]
    InvalidSignature,

    /// `exp` is in the past (beyond the leeway).
    #[error("token expired")]
    Expired,

    /// `nbf` is in the future (beyond the leeway).
    #[error("token not yet valid")]
    NotYetValid,

    /// `iat` is in the future (beyond the leeway).
    #[error("token issued in the future")]
    IssuedInFuture,

    /// `exp - iat` exceeds the configured maximum token lifetime.
    #[error("token lifetime (exp - iat) exceeds the maximum of {max}")]
    LifetimeTooLong {
        /// The configured maximum, e.g. `1h`.
        max: String,
    },

    /// `iss` is not the expected issuer.
    #[error("wrong issuer: expected {expected}")]
    WrongIssuer {
        /// The issuer this server expects.
        expected: String,
    },

    /// `aud` does not contain the expected audience.
    #[error("wrong audience")]
    WrongAudience,

    /// A required registered claim is absent.
    #[error("token has no {0} claim")]
    MissingClaim(&'static str),

    /// A registered claim has the wrong type (e.g. `exp` is a string).
    #[error("token claim {0} is invalid")]
    InvalidClaim(&'static str),

    /// OIDC mode: the identity provider (discovery document or JWKS) could not be fetched or
    /// understood, and no cached key could be used. The HTTP layer answers 503.
    #[error("identity provider unavailable: {reason}")]
    IdpUnavailable {
        /// What failed, written by us (no upstream error text).
        reason: String,
    },

    /// The authentication configuration is unusable (only from `Authenticator::new`).
    #[error("invalid authentication configuration: {0}")]
    Config(String),

    /// `mint_hs256` failed.
    #[error("could not mint token: {0}")]
    Mint(String),
}

impl AuthError {
    /// True when the identity provider could not be reached or answered nonsense: the request
    /// may succeed later, so the HTTP layer answers 503 rather than 401.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, AuthError::IdpUnavailable { .. })
    }

    pub(crate) fn idp(reason: impl Into<String>) -> Self {
        AuthError::IdpUnavailable {
            reason: reason.into(),
        }
    }
}
