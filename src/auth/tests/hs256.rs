//! HS256 mode: tokens minted by the service itself.

use super::*;

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
        max_lifetime: None,
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
        max_lifetime: None,
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
        max_lifetime: None,
    };
    assert!(!format!("{config:?}").contains("0123456789abcdef"));
}

#[tokio::test]
async fn hs256_issuer_must_be_one_string() {
    // RFC 7519 §4.1.1: `iss` is a StringOrURI. An array is refused even when it holds ours.
    let auth = hs_auth().await;
    for iss in [json!([TOKEN_ISSUER]), json!(["someone-else", TOKEN_ISSUER])] {
        let token = hs_sign(&with(hs_claims(), "iss", iss.clone()));
        let err = auth.authenticate(&token).await.unwrap_err();
        assert_eq!(err.to_string(), "token claim iss is invalid", "iss {iss}");
    }
}

#[tokio::test]
async fn hs256_a_token_issued_in_the_future_is_refused() {
    let auth = hs_auth().await;
    let now = now();
    // Beyond the clock leeway, even with `nbf` now and `exp` later.
    let future = hs_sign(&with(hs_claims(), "iat", json!(now + 120)));
    let err = auth.authenticate(&future).await.unwrap_err();
    assert_eq!(err.to_string(), "token issued in the future");
    // Within the leeway: fine.
    let skewed = hs_sign(&with(hs_claims(), "iat", json!(now + 10)));
    auth.authenticate(&skewed).await.unwrap();
    // A non-numeric `iat` is invalid.
    let text = hs_sign(&with(hs_claims(), "iat", json!("yesterday")));
    let err = auth.authenticate(&text).await.unwrap_err();
    assert_eq!(err.to_string(), "token claim iat is invalid");
    // Without a maximum lifetime `iat` is optional.
    auth.authenticate(&hs_sign(&without(hs_claims(), "iat")))
        .await
        .unwrap();
}

#[tokio::test]
async fn hs256_maximum_token_lifetime() {
    let auth = Authenticator::new(AuthConfig {
        settings: AuthSettings::Hs256 {
            secret: secret(),
            audience: DEFAULT_AUDIENCE.into(),
        },
        roles_claim: DEFAULT_ROLES_CLAIM.into(),
        max_lifetime: Some(Duration::from_secs(3600)),
    })
    .await
    .unwrap();
    let now = now();
    let lives = |iat: u64, exp: u64| with(with(hs_claims(), "iat", json!(iat)), "exp", json!(exp));
    // Exactly the maximum, and shorter: fine (also when issued a while ago).
    auth.authenticate(&hs_sign(&lives(now, now + 3600)))
        .await
        .unwrap();
    auth.authenticate(&hs_sign(&lives(now - 3000, now + 500)))
        .await
        .unwrap();
    // Longer: refused, although not expired.
    let err = auth
        .authenticate(&hs_sign(&lives(now, now + 3601)))
        .await
        .unwrap_err();
    assert!(matches!(err, AuthError::LifetimeTooLong { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "token lifetime (exp - iat) exceeds the maximum of 1h"
    );
    // `iat` is then required; a future one is still refused.
    let err = auth
        .authenticate(&hs_sign(&without(hs_claims(), "iat")))
        .await
        .unwrap_err();
    assert!(matches!(err, AuthError::MissingClaim("iat")), "{err:?}");
    assert_eq!(err.to_string(), "token has no iat claim");
    let err = auth
        .authenticate(&hs_sign(&lives(now + 600, now + 900)))
        .await
        .unwrap_err();
    assert!(matches!(err, AuthError::IssuedInFuture), "{err:?}");
    // Without a maximum a long-lived token is accepted.
    let lenient = hs_auth().await;
    lenient
        .authenticate(&hs_sign(&lives(now, now + 30 * 86_400)))
        .await
        .unwrap();
}

#[tokio::test]
async fn hs256_a_zero_maximum_lifetime_is_a_configuration_error() {
    let err = Authenticator::new(AuthConfig {
        settings: AuthSettings::Hs256 {
            secret: secret(),
            audience: DEFAULT_AUDIENCE.into(),
        },
        roles_claim: DEFAULT_ROLES_CLAIM.into(),
        max_lifetime: Some(Duration::ZERO),
    })
    .await
    .unwrap_err();
    assert!(matches!(err, AuthError::Config(_)), "{err:?}");
}
