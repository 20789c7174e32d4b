//! Roles: where they are read from in a token, and how they rank.

use super::*;

#[tokio::test]
async fn roles_from_an_array_and_unknown_names_ignored() {
    let auth = hs_auth().await;
    let token = hs_sign(&with(
        hs_claims(),
        "roles",
        json!(["viewer", "superuser", 42, "Admin", "operator", "viewer"]),
    ));
    let principal = auth.authenticate(&token).await.unwrap();
    assert_eq!(principal.roles, vec![Role::Viewer, Role::Operator]);

    let token = hs_sign(&without(hs_claims(), "roles"));
    let principal = auth.authenticate(&token).await.unwrap();
    assert!(principal.roles.is_empty());
    assert!(!principal.has(Role::Viewer));

    let token = hs_sign(&with(hs_claims(), "roles", json!(17)));
    let principal = auth.authenticate(&token).await.unwrap();
    assert!(principal.roles.is_empty());

    // The claim is an array or an object (README): a string, space-separated or not, grants
    // nothing.
    for names in ["viewer admin", "admin", "operator,admin"] {
        let token = hs_sign(&with(hs_claims(), "roles", json!(names)));
        let principal = auth.authenticate(&token).await.unwrap();
        assert!(
            principal.roles.is_empty(),
            "{names:?}: {:?}",
            principal.roles
        );
    }
}

#[tokio::test]
async fn roles_from_a_zitadel_object_under_a_custom_claim() {
    let auth = Authenticator::new(AuthConfig {
        settings: AuthSettings::Hs256 {
            secret: secret(),
            audience: DEFAULT_AUDIENCE.into(),
        },
        roles_claim: ZITADEL_ROLES.into(),
        max_lifetime: None,
    })
    .await
    .unwrap();
    let claims = with(
        without(hs_claims(), "roles"),
        ZITADEL_ROLES,
        json!({
            "operator": {"248289761001": "acme.zitadel.cloud"},
            "billing": {"248289761001": "acme.zitadel.cloud"},
        }),
    );
    let principal = auth.authenticate(&hs_sign(&claims)).await.unwrap();
    assert_eq!(principal.subject, "alice");
    assert_eq!(principal.roles, vec![Role::Operator]);
    assert!(principal.has(Role::Viewer));
    assert!(principal.has(Role::Operator));
    assert!(!principal.has(Role::Admin));

    // The default `roles` claim is not consulted when another claim is configured.
    let claims = with(hs_claims(), "roles", json!(["admin"]));
    let principal = auth.authenticate(&hs_sign(&claims)).await.unwrap();
    assert!(principal.roles.is_empty());
}

#[tokio::test]
async fn roles_from_a_nested_claim_path() {
    let auth = Authenticator::new(AuthConfig {
        settings: AuthSettings::Hs256 {
            secret: secret(),
            audience: DEFAULT_AUDIENCE.into(),
        },
        roles_claim: "realm_access.roles".into(),
        max_lifetime: None,
    })
    .await
    .unwrap();
    let claims = with(
        hs_claims(),
        "realm_access",
        json!({"roles": ["admin", "offline_access"]}),
    );
    let principal = auth.authenticate(&hs_sign(&claims)).await.unwrap();
    assert_eq!(principal.roles, vec![Role::Admin]);
}

#[test]
fn role_hierarchy_names_and_serde() {
    let principal = |roles: Vec<Role>| Principal {
        subject: "s".into(),
        roles,
    };
    let admin = principal(vec![Role::Admin]);
    assert!(admin.has(Role::Viewer) && admin.has(Role::Operator) && admin.has(Role::Admin));
    let operator = principal(vec![Role::Operator]);
    assert!(operator.has(Role::Viewer) && operator.has(Role::Operator));
    assert!(!operator.has(Role::Admin));
    let viewer = principal(vec![Role::Viewer]);
    assert!(viewer.has(Role::Viewer));
    assert!(!viewer.has(Role::Operator) && !viewer.has(Role::Admin));
    let nobody = principal(vec![]);
    assert!(Role::ALL.iter().all(|role| !nobody.has(*role)));
    assert_eq!(nobody.highest_role(), None);
    assert_eq!(
        principal(vec![Role::Viewer, Role::Admin]).highest_role(),
        Some(Role::Admin)
    );

    assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin);
    for role in Role::ALL {
        assert_eq!(role.as_str().parse::<Role>().unwrap(), role);
        assert_eq!(role.to_string(), role.as_str());
        assert_eq!(
            serde_json::to_value(role).unwrap(),
            Value::String(role.as_str().into())
        );
        assert_eq!(
            serde_json::from_value::<Role>(json!(role.as_str())).unwrap(),
            role
        );
    }
    assert!("Admin".parse::<Role>().is_err());
    assert!("root".parse::<Role>().is_err());
    assert!("".parse::<Role>().is_err());
}
