//! `deploy/base/rbac.yaml`, the service's Kubernetes identity as the deploy manifests ship it, read
//! by the tests so that the Role the tests run under IS the shipped one: its ServiceAccount is
//! installed once per kube-apiserver, and its Role and RoleBinding are instantiated in each test
//! namespace (the file's pairs differ only in their namespace, which [`Rbac::shipped`] checks).
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding};
use kube::Api;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::Value;

/// The field manager the harness applies RBAC objects with.
const MANAGER: &str = "test-harness";
/// How long a new RoleBinding may take to reach the RBAC authorizer's cache.
const RBAC_DEADLINE: Duration = Duration::from_secs(30);

/// The parsed manifest.
#[derive(Debug, Clone)]
pub struct Rbac {
    pub service_account: ServiceAccount,
    /// The Role of the first allowed namespace (all are the same but for the namespace).
    pub role: Role,
    /// Its RoleBinding.
    pub binding: RoleBinding,
    /// The namespaces the file binds the Role in.
    pub namespaces: Vec<String>,
}

pub fn manifest_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/base/rbac.yaml")
}

fn without_namespace(mut meta: ObjectMeta) -> ObjectMeta {
    meta.namespace = None;
    meta
}

impl Rbac {
    /// `deploy/base/rbac.yaml`, parsed and checked once per process.
    pub fn shipped() -> &'static Rbac {
        static SHIPPED: OnceLock<Rbac> = OnceLock::new();
        SHIPPED.get_or_init(|| {
            let path = manifest_path();
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            Rbac::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
    }

    /// Parses the manifest: exactly one ServiceAccount, and per namespace one Role and one
    /// RoleBinding of that ServiceAccount to that Role, all alike but for their namespace.
    pub fn parse(text: &str) -> Result<Rbac, String> {
        let documents: Vec<Value> =
            serde_saphyr::from_multiple(text).map_err(|e| format!("not YAML: {e}"))?;
        let of_kind = |kind: &str| -> Vec<&Value> {
            documents.iter().filter(|d| d["kind"] == kind).collect()
        };
        for d in &documents {
            let kind = d["kind"].as_str().unwrap_or_default();
            if !["ServiceAccount", "Role", "RoleBinding"].contains(&kind) {
                return Err(format!(
                    "unexpected {kind:?} document: the service needs a ServiceAccount, Roles and \
                     RoleBindings only (nothing cluster-wide)"
                ));
            }
        }
        let accounts = of_kind("ServiceAccount");
        let [account] = accounts.as_slice() else {
            return Err(format!("{} ServiceAccounts, expected 1", accounts.len()));
        };
        let service_account: ServiceAccount =
            serde_json::from_value((*account).clone()).map_err(|e| e.to_string())?;
        let roles: Vec<Role> = of_kind("Role")
            .into_iter()
            .map(|v| serde_json::from_value(v.clone()).map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        let bindings: Vec<RoleBinding> = of_kind("RoleBinding")
            .into_iter()
            .map(|v| serde_json::from_value(v.clone()).map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        let Some(first) = roles.first() else {
            return Err("no Role".into());
        };
        let namespaces: Vec<String> = roles
            .iter()
            .map(|r| r.metadata.namespace.clone().unwrap_or_default())
            .collect();
        let sa_name = service_account.metadata.name.clone().unwrap_or_default();
        let sa_namespace = service_account
            .metadata
            .namespace
            .clone()
            .unwrap_or_default();
        let mut first_binding = None;
        for role in &roles {
            let ns = role.metadata.namespace.as_deref().unwrap_or_default();
            if ns.is_empty() {
                return Err("a Role without a namespace".into());
            }
            if role.rules != first.rules
                || without_namespace(role.metadata.clone())
                    != without_namespace(first.metadata.clone())
            {
                return Err(format!(
                    "the Role in {ns} differs from the one in {}",
                    namespaces[0]
                ));
            }
            let binding = bindings
                .iter()
                .find(|b| b.metadata.namespace.as_deref() == Some(ns))
                .ok_or_else(|| format!("no RoleBinding in {ns}"))?;
            let role_ref = &binding.role_ref;
            if role_ref.kind != "Role" || Some(&role_ref.name) != role.metadata.name.as_ref() {
                return Err(format!("the RoleBinding in {ns} does not bind the Role"));
            }
            let subjects = binding.subjects.clone().unwrap_or_default();
            let binds_the_account = subjects.len() == 1
                && subjects[0].kind == "ServiceAccount"
                && subjects[0].name == sa_name
                && subjects[0].namespace.as_deref() == Some(sa_namespace.as_str());
            if !binds_the_account {
                return Err(format!(
                    "the RoleBinding in {ns} must bind exactly the ServiceAccount {sa_namespace}/{sa_name}"
                ));
            }
            let first_binding: &RoleBinding = first_binding.get_or_insert(binding);
            if binding.role_ref != first_binding.role_ref
                || binding.subjects != first_binding.subjects
                || without_namespace(binding.metadata.clone())
                    != without_namespace(first_binding.metadata.clone())
            {
                return Err(format!(
                    "the RoleBinding in {ns} differs from the first one"
                ));
            }
        }
        if bindings.len() != roles.len() {
            return Err(format!(
                "{} RoleBindings for {} Roles",
                bindings.len(),
                roles.len()
            ));
        }
        Ok(Rbac {
            service_account,
            role: first.clone(),
            binding: first_binding.cloned().expect("at least one Role"),
            namespaces,
        })
    }

    /// `system:serviceaccount:<namespace>:<name>`
    pub fn user(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.account_namespace(),
            self.account_name()
        )
    }

    pub fn account_name(&self) -> &str {
        self.service_account
            .metadata
            .name
            .as_deref()
            .unwrap_or_default()
    }

    pub fn account_namespace(&self) -> &str {
        self.service_account
            .metadata
            .namespace
            .as_deref()
            .unwrap_or_default()
    }

    /// The Role's rules as shipped.
    pub fn rules(&self) -> Vec<PolicyRule> {
        self.role.rules.clone().unwrap_or_default()
    }

    /// Every verb the Role grants on `secrets`.
    pub fn secret_verbs(&self) -> Vec<String> {
        self.rules()
            .iter()
            .filter(|r| {
                r.resources
                    .as_ref()
                    .is_some_and(|rs| rs.iter().any(|r| r == "secrets"))
            })
            .flat_map(|r| r.verbs.clone())
            .collect()
    }

    /// The shipped rules with `verb` removed.
    pub fn rules_without(&self, verb: &str) -> Vec<PolicyRule> {
        let mut rules = self.rules();
        for rule in &mut rules {
            rule.verbs.retain(|v| v != verb);
        }
        rules.retain(|r| !r.verbs.is_empty());
        rules
    }

    /// Creates the ServiceAccount (and its namespace); a second call changes nothing.
    pub async fn install_service_account(&self, admin: &kube::Client) {
        let ns = self.account_namespace();
        apply(
            &Api::<Namespace>::all(admin.clone()),
            ns,
            &serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
        )
        .await;
        let mut account = serde_json::to_value(&self.service_account).expect("json");
        account["apiVersion"] = "v1".into();
        account["kind"] = "ServiceAccount".into();
        apply(
            &Api::<ServiceAccount>::namespaced(admin.clone(), ns),
            self.account_name(),
            &account,
        )
        .await;
    }

    /// The shipped Role (with `rules` instead of the shipped rules when given) and RoleBinding
    /// in `namespace`; returns once the authorizer grants every verb of the rules there.
    pub async fn bind(
        &self,
        admin: &kube::Client,
        namespace: &str,
        rules: Option<Vec<PolicyRule>>,
    ) {
        let mut role = self.role.clone();
        role.metadata.namespace = Some(namespace.to_owned());
        if let Some(rules) = rules {
            role.rules = Some(rules);
        }
        let mut binding = self.binding.clone();
        binding.metadata.namespace = Some(namespace.to_owned());
        let mut role_json = serde_json::to_value(&role).expect("json");
        role_json["apiVersion"] = "rbac.authorization.k8s.io/v1".into();
        role_json["kind"] = "Role".into();
        let mut binding_json = serde_json::to_value(&binding).expect("json");
        binding_json["apiVersion"] = "rbac.authorization.k8s.io/v1".into();
        binding_json["kind"] = "RoleBinding".into();
        let role_name = role.metadata.name.clone().expect("Role name");
        let binding_name = binding.metadata.name.clone().expect("RoleBinding name");
        apply(
            &Api::<Role>::namespaced(admin.clone(), namespace),
            &role_name,
            &role_json,
        )
        .await;
        apply(
            &Api::<RoleBinding>::namespaced(admin.clone(), namespace),
            &binding_name,
            &binding_json,
        )
        .await;
        for rule in role.rules.unwrap_or_default() {
            let groups = rule.api_groups.clone().unwrap_or_default();
            for resource in rule.resources.clone().unwrap_or_default() {
                for verb in &rule.verbs {
                    for group in &groups {
                        let resource = (group.as_str(), resource.as_str());
                        wait_until_allowed_in(admin, &self.user(), verb, resource, namespace).await;
                    }
                }
            }
        }
    }

    /// A token for the ServiceAccount (TokenRequest API, valid for 3 hours).
    pub async fn token(&self, admin: &kube::Client) -> String {
        let request = TokenRequest {
            metadata: ObjectMeta::default(),
            spec: TokenRequestSpec {
                audiences: vec![],
                expiration_seconds: Some(3 * 3600),
                bound_object_ref: None,
            },
            status: None,
        };
        let created = Api::<ServiceAccount>::namespaced(admin.clone(), self.account_namespace())
            .create_token_request(self.account_name(), &PostParams::default(), &request)
            .await
            .unwrap_or_else(|e| panic!("TokenRequest for {}: {e}", self.user()));
        created.status.expect("TokenRequest status").token
    }
}

/// Server-side apply as the harness (forced).
pub async fn apply<K>(api: &Api<K>, name: &str, object: &Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .unwrap_or_else(|e| panic!("applying {name}: {e}"));
}

/// Waits until the RBAC authorizer lets `user` do `verb` on `resource` in `namespace` (a new
/// RoleBinding reaches its cache within milliseconds, but not at once).
pub async fn wait_until_allowed(
    admin: &kube::Client,
    user: &str,
    verb: &str,
    resource: &str,
    namespace: &str,
) {
    wait_until_allowed_in(admin, user, verb, ("", resource), namespace).await
}

/// [`wait_until_allowed`] for a resource of an API group (`("events.k8s.io", "events")`).
pub async fn wait_until_allowed_in(
    admin: &kube::Client,
    user: &str,
    verb: &str,
    (group, resource): (&str, &str),
    namespace: &str,
) {
    let reviews = Api::<SubjectAccessReview>::all(admin.clone());
    let review = SubjectAccessReview {
        metadata: ObjectMeta::default(),
        spec: SubjectAccessReviewSpec {
            user: Some(user.to_owned()),
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(namespace.to_owned()),
                verb: Some(verb.to_owned()),
                group: Some(group.to_owned()),
                resource: Some(resource.to_owned()),
                ..Default::default()
            }),
            ..Default::default()
        },
        status: None,
    };
    let until = Instant::now() + RBAC_DEADLINE;
    loop {
        let answer = reviews
            .create(&PostParams::default(), &review)
            .await
            .unwrap_or_else(|e| panic!("SubjectAccessReview: {e}"));
        if answer.status.is_some_and(|s| s.allowed) {
            return;
        }
        assert!(
            Instant::now() < until,
            "{user} may still not {verb} {resource} ({group:?}) in {namespace} after {RBAC_DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
