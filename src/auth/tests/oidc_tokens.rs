//! OIDC mode: which tokens are accepted, and why the others are not.

use super::idp::*;
use super::*;

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
async fn oidc_issuer_must_be_one_string() {
    let idp = Idp::start(jwks_of(&["rsa-a"])).await;
    let auth = idp.authenticator(None, FLOOR_LONG).await;
    for iss in [
        json!([idp.issuer]),
        json!(["https://evil.example", idp.issuer]),
    ] {
        let claims = with(idp.claims(), "iss", iss.clone());
        let token = sign(Algorithm::RS256, Some("rsa-a"), &rsa_a(), &claims);
        let err = auth.authenticate(&token).await.unwrap_err();
        assert_eq!(err.to_string(), "token claim iss is invalid", "iss {iss}");
    }
}
