//! OIDC mode: the identity provider's discovery and key set: fetching, rotation, refetch
//! floor, the provider being down, and configuration checks.

use super::idp::*;
use super::*;

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
        max_lifetime: None,
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
            max_lifetime: None,
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
        max_lifetime: None,
    })
    .await
    .unwrap_err();
    assert!(matches!(err, AuthError::Config(_)), "{err:?}");
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
