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

mod hs256;
mod idp;
mod oidc_provider;
mod oidc_tokens;
mod roles;

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
        max_lifetime: None,
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
