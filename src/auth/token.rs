//! Token plumbing shared by both modes: a strict pre-parse of the header, verification with
//! jsonwebtoken, error mapping, and minting of our own HS256 tokens.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::{Map, Value};

use super::{AuthError, Role};

/// The `iss` of tokens minted by [`mint_hs256`] and required in HS256 mode.
pub const TOKEN_ISSUER: &str = "backup-provisioner";

/// Clock skew allowed on `exp` and `nbf`, in seconds.
pub const CLOCK_LEEWAY_SECS: u64 = 30;

/// The shortest HS256 secret accepted (RFC 7518 §3.2: a key of at least the hash size).
pub const MIN_HS256_SECRET_BYTES: usize = 32;

/// Tokens longer than this are rejected before any parsing.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The header fields we look at before handing the token to jsonwebtoken. Parsed by us so that
/// `alg: none` and unknown algorithms get a precise error (jsonwebtoken's `Algorithm` cannot
/// represent them and would only report a JSON error).
#[derive(Debug, serde::Deserialize)]
struct RawHeader {
    alg: Option<Value>,
    kid: Option<Value>,
    crit: Option<Value>,
}

/// A header that passed the pre-checks: the algorithm is one the mode accepts.
#[derive(Debug)]
pub(crate) struct CheckedHeader {
    pub alg: Algorithm,
    pub kid: Option<String>,
}

/// Strips an optional `Bearer ` prefix and surrounding whitespace.
pub(crate) fn normalise(bearer_token: &str) -> Result<&str, AuthError> {
    let trimmed = bearer_token.trim();
    let token = match (trimmed.get(..6), trimmed.get(6..)) {
        (Some(scheme), Some(rest))
            if scheme.eq_ignore_ascii_case("bearer")
                && rest.chars().next().is_none_or(char::is_whitespace) =>
        {
            rest.trim_start()
        }
        _ => trimmed,
    };
    if token.is_empty() {
        return Err(AuthError::MissingToken);
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(AuthError::Malformed);
    }
    Ok(token)
}

/// Checks the token's shape and header: three base64url parts, a JSON object header, an `alg` in
/// `accepted`, no `crit`.
pub(crate) fn check_header(
    token: &str,
    accepted: &[Algorithm],
    accepted_text: &'static str,
) -> Result<CheckedHeader, AuthError> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed);
    };
    if header.is_empty() || payload.is_empty() {
        return Err(AuthError::Malformed);
    }
    let is_b64url = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if !is_b64url(header) || !is_b64url(payload) || !is_b64url(signature) {
        return Err(AuthError::Malformed);
    }
    let header_json = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| AuthError::Malformed)?;
    let raw: RawHeader = serde_json::from_slice(&header_json).map_err(|_| AuthError::Malformed)?;

    let alg_name = match &raw.alg {
        Some(Value::String(name)) => name.as_str(),
        _ => return Err(AuthError::Malformed),
    };
    if alg_name.eq_ignore_ascii_case("none") {
        return Err(AuthError::AlgorithmNone);
    }
    let alg = match alg_name.parse::<Algorithm>() {
        Ok(alg) if accepted.contains(&alg) => alg,
        _ => {
            return Err(AuthError::AlgorithmNotAccepted {
                alg: display_alg(alg_name),
                accepted: accepted_text,
            });
        }
    };
    if raw.crit.is_some() {
        // RFC 7515 §4.1.11: we understand no extension, so any `crit` means reject.
        return Err(AuthError::UnsupportedCriticalHeader);
    }
    if signature.is_empty() {
        return Err(AuthError::InvalidSignature);
    }
    let kid = match raw.kid {
        None | Some(Value::Null) => None,
        Some(Value::String(kid)) => Some(kid),
        Some(_) => return Err(AuthError::Malformed),
    };
    Ok(CheckedHeader { alg, kid })
}

/// The header's algorithm as safe text for an error message: echoed only when it is a short
/// token of letters, digits and `-+_`, otherwise replaced.
fn display_alg(alg: &str) -> String {
    let plain = !alg.is_empty()
        && alg.len() <= 16
        && alg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'+' || b == b'_');
    if plain {
        alg.to_owned()
    } else {
        "(unrecognised)".to_owned()
    }
}

/// What [`verify`] checks besides the signature.
pub(crate) struct Expectations<'a> {
    /// Accepted `iss` values (one issuer, possibly in two spellings).
    pub issuers: &'a [String],
    /// The issuer as shown in the error message.
    pub issuer_display: &'a str,
    /// When set, `aud` must be present and contain it.
    pub audience: Option<&'a str>,
    /// When set, `iat` must be present and `exp - iat` at most this long.
    pub max_lifetime: Option<Duration>,
}

/// Verifies the signature with `key` for exactly `alg`, then `exp`/`nbf` (with leeway), `iss`
/// (one string), `aud`, the presence of `sub`, and `iat` (not in the future; with a maximum
/// lifetime, present and at most that long before `exp`). Returns the claims.
pub(crate) fn verify(
    token: &str,
    alg: Algorithm,
    key: &DecodingKey,
    expect: &Expectations<'_>,
) -> Result<Map<String, Value>, AuthError> {
    let mut validation = Validation::new(alg);
    validation.leeway = CLOCK_LEEWAY_SECS;
    validation.validate_exp = true;
    validation.validate_nbf = true;
    validation.set_issuer(expect.issuers);
    let mut required = vec!["exp", "iss", "sub"];
    match expect.audience {
        Some(audience) => {
            validation.set_audience(&[audience]);
            validation.validate_aud = true;
            required.push("aud");
        }
        None => validation.validate_aud = false,
    }
    validation.set_required_spec_claims(&required);

    let data = jsonwebtoken::decode::<Map<String, Value>>(token, key, &validation)
        .map_err(|err| map_error(err, expect.issuer_display))?;
    // jsonwebtoken accepts an array of issuers when any member matches; RFC 7519 §4.1.1 says
    // `iss` is one StringOrURI.
    if !data.claims.get("iss").is_some_and(Value::is_string) {
        return Err(AuthError::InvalidClaim("iss"));
    }
    check_issued_at(&data.claims, expect.max_lifetime)?;
    Ok(data.claims)
}

/// `iat`, when present, is a number not in the future (beyond [`CLOCK_LEEWAY_SECS`]); with a
/// maximum lifetime it is required and `exp - iat` may not exceed it.
fn check_issued_at(
    claims: &Map<String, Value>,
    max_lifetime: Option<Duration>,
) -> Result<(), AuthError> {
    let iat = match claims.get("iat") {
        None | Some(Value::Null) if max_lifetime.is_none() => return Ok(()),
        None | Some(Value::Null) => return Err(AuthError::MissingClaim("iat")),
        Some(Value::Number(n)) => n.as_f64().ok_or(AuthError::InvalidClaim("iat"))?,
        Some(_) => return Err(AuthError::InvalidClaim("iat")),
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    if iat > now + CLOCK_LEEWAY_SECS as f64 {
        return Err(AuthError::IssuedInFuture);
    }
    if let Some(max) = max_lifetime {
        // `exp` is required and was checked to be a number by jsonwebtoken.
        let exp = claims
            .get("exp")
            .and_then(Value::as_f64)
            .ok_or(AuthError::InvalidClaim("exp"))?;
        if exp - iat > max.as_secs_f64() {
            return Err(AuthError::LifetimeTooLong {
                max: humantime::format_duration(max).to_string(),
            });
        }
    }
    Ok(())
}

fn map_error(err: jsonwebtoken::errors::Error, issuer: &str) -> AuthError {
    match err.into_kind() {
        ErrorKind::InvalidSignature => AuthError::InvalidSignature,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer {
            expected: issuer.to_owned(),
        },
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::MissingRequiredClaim(claim) => AuthError::MissingClaim(claim_name(&claim)),
        ErrorKind::InvalidClaimFormat(claim) => AuthError::InvalidClaim(claim_name(&claim)),
        // Key material that the crypto backend refuses (a JWK with a bad modulus or point): the
        // token cannot be verified with it, which for the caller is a signature failure.
        kind @ (ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat
        | ErrorKind::Provider(_)) => {
            tracing::warn!(error = ?kind, "signing key rejected by the crypto backend");
            AuthError::InvalidSignature
        }
        _ => AuthError::Malformed,
    }
}

fn claim_name(claim: &str) -> &'static str {
    match claim {
        "exp" => "exp",
        "nbf" => "nbf",
        "iss" => "iss",
        "aud" => "aud",
        "sub" => "sub",
        _ => "registered",
    }
}

/// The `sub` claim as a non-empty string.
pub(crate) fn subject(claims: &Map<String, Value>) -> Result<String, AuthError> {
    match claims.get("sub") {
        Some(Value::String(sub)) if !sub.is_empty() => Ok(sub.clone()),
        Some(Value::String(_)) | None | Some(Value::Null) => Err(AuthError::MissingClaim("sub")),
        Some(_) => Err(AuthError::InvalidClaim("sub")),
    }
}

#[derive(serde::Serialize)]
struct MintClaims<'a> {
    iss: &'static str,
    sub: &'a str,
    aud: &'a str,
    iat: u64,
    nbf: u64,
    exp: u64,
    roles: &'a [Role],
}

/// Mints an HS256 token for HS256 mode: `iss = "backup-provisioner"`, `sub`, `aud`, `iat`, `nbf`
/// (both now), `exp` (now + `ttl`, rounded up to a whole second) and `roles` as an array of
/// lowercase names.
pub fn mint_hs256(
    secret: &SecretString,
    subject: &str,
    roles: &[Role],
    ttl: Duration,
    audience: &str,
) -> Result<String, AuthError> {
    check_hs256_secret(secret).map_err(AuthError::Mint)?;
    if subject.is_empty() {
        return Err(AuthError::Mint("subject is empty".into()));
    }
    if audience.is_empty() {
        return Err(AuthError::Mint("audience is empty".into()));
    }
    if ttl.is_zero() {
        return Err(AuthError::Mint("ttl is zero".into()));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| AuthError::Mint("system clock is before 1970".into()))?
        .as_secs();
    let ttl_secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    let exp = now
        .checked_add(ttl_secs)
        .ok_or_else(|| AuthError::Mint("ttl is too long".into()))?;
    let mut roles = roles.to_vec();
    roles.sort_unstable();
    roles.dedup();
    let claims = MintClaims {
        iss: TOKEN_ISSUER,
        sub: subject,
        aud: audience,
        iat: now,
        nbf: now,
        exp,
        roles: &roles,
    };
    let key = EncodingKey::from_secret(secret.expose_secret().as_bytes());
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key)
        .map_err(|_| AuthError::Mint("signing failed".into()))
}

/// Rejects secrets too short for HS256.
pub(crate) fn check_hs256_secret(secret: &SecretString) -> Result<(), String> {
    let len = secret.expose_secret().len();
    if len < MIN_HS256_SECRET_BYTES {
        return Err(format!(
            "the HS256 secret must be at least {MIN_HS256_SECRET_BYTES} bytes long (got {len})"
        ));
    }
    Ok(())
}
