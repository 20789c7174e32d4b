//! One test's Kubernetes: its own namespaces on the shared real kube-apiserver
//! ([`KubeApiserver::shared`]), the service's identity (the ServiceAccount of `deploy/base/rbac.yaml`,
//! its Role bound in each namespace, a TokenRequest token), a recording/fault proxy the service
//! reaches the server through, and an admin client for set-up and assertions.
//!
//! Tests name namespaces as the service sees them in production (`zitadel`); the real names get a
//! random suffix (`zitadel-1a2b3c4d`) so tests sharing the server never meet. [`KubeEnv::ns`]
//! maps one to the other.
#![allow(dead_code)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::api::rbac::v1::PolicyRule;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use super::kube_apiserver::{KubeApiserver, client_for};
use super::kube_proxy::{Fault, KubeProxy, RequestRecord};
use super::rbac::{Rbac, apply};

/// What differs from the default (the shipped Role bound in every namespace).
#[derive(Debug, Clone, Default)]
pub struct KubeOptions {
    /// Bind the service's Role only in these (logical) namespaces.
    pub bound_in: Option<Vec<String>>,
    /// Rules of the service's Role instead of the shipped ones, per (logical) namespace.
    pub rules: BTreeMap<String, Vec<PolicyRule>>,
}

/// See the module doc. Call [`KubeEnv::start`] inside the test's runtime (its clients belong
/// to it).
pub struct KubeEnv {
    pub server: &'static KubeApiserver,
    /// Logical name → real name.
    namespaces: BTreeMap<String, String>,
    /// The service's way in: records its requests, injects faults.
    pub proxy: KubeProxy,
    /// `system:serviceaccount:backup-provisioner:backup-provisioner`
    pub service_user: String,
    pub service_token: String,
    admin: kube::Client,
}

impl KubeEnv {
    /// Namespaces for `logical` names with the shipped Role bound in each.
    pub async fn start(logical: &[&str]) -> KubeEnv {
        Self::start_with(logical, KubeOptions::default()).await
    }

    pub async fn start_with(logical: &[&str], options: KubeOptions) -> KubeEnv {
        let server = KubeApiserver::shared();
        let admin = server.admin_client();
        let rbac = Rbac::shipped();
        rbac.install_service_account(&admin).await;
        let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let namespaces: BTreeMap<String, String> = logical
            .iter()
            .map(|n| ((*n).to_owned(), format!("{n}-{suffix}")))
            .collect();
        let namespace_api = Api::<Namespace>::all(admin.clone());
        for (name, real) in &namespaces {
            namespace_api
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(json!({"metadata": {"name": real}})).expect("ns"),
                )
                .await
                .unwrap_or_else(|e| panic!("creating namespace {real} (for {name}): {e}"));
        }
        for (name, real) in &namespaces {
            let bound = options
                .bound_in
                .as_ref()
                .is_none_or(|only| only.contains(name));
            if bound {
                rbac.bind(&admin, real, options.rules.get(name).cloned())
                    .await;
            }
        }
        let service_token = rbac.token(&admin).await;
        KubeEnv {
            server,
            namespaces,
            proxy: KubeProxy::start(server),
            service_user: rbac.user(),
            service_token,
            admin,
        }
    }

    /// The real name of the namespace the test calls `logical`.
    pub fn ns(&self, logical: &str) -> &str {
        self.namespaces
            .get(logical)
            .unwrap_or_else(|| panic!("no namespace {logical} in this test's environment"))
    }

    /// The admin client (`system:masters`, straight to the server, not recorded).
    pub fn admin(&self) -> kube::Client {
        self.admin.clone()
    }

    /// A client as the service builds it: through the proxy, with the ServiceAccount's token.
    pub fn service_client(&self) -> kube::Client {
        client_for(
            &self.proxy.url,
            &self.server.ca_pem,
            Some(&self.service_token),
        )
    }

    /// A client through the proxy with any (or no) bearer token.
    pub fn client_with_token(&self, token: Option<&str>) -> kube::Client {
        client_for(&self.proxy.url, &self.server.ca_pem, token)
    }

    /// A kubeconfig for the service (proxy, CA, ServiceAccount token) with `namespace`
    /// (logical) as its default.
    pub fn service_kubeconfig(&self, namespace: &str) -> String {
        self.server
            .kubeconfig(&self.proxy.url, &self.service_token, self.ns(namespace))
    }

    /// Admin API for Secrets in the real namespace `namespace`.
    pub fn secrets(&self, namespace: &str) -> Api<Secret> {
        Api::namespaced(self.admin.clone(), namespace)
    }

    /// The Secret as the API returns it (with `managedFields`), read as admin.
    pub async fn secret(&self, namespace: &str, name: &str) -> Option<Value> {
        let secret = self
            .secrets(namespace)
            .get_opt(name)
            .await
            .unwrap_or_else(|e| panic!("reading Secret {namespace}/{name}: {e}"))?;
        Some(serde_json::to_value(secret).expect("json"))
    }

    /// The decoded `data` of a Secret.
    pub async fn secret_data(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<BTreeMap<String, Vec<u8>>> {
        let secret = self
            .secrets(namespace)
            .get_opt(name)
            .await
            .unwrap_or_else(|e| panic!("reading Secret {namespace}/{name}: {e}"))?;
        Some(
            secret
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect(),
        )
    }

    /// The Secret's `s3.conf` text.
    pub async fn s3_conf(&self, namespace: &str, name: &str) -> Option<String> {
        let data = self.secret_data(namespace, name).await?;
        data.get("s3.conf")
            .map(|v| String::from_utf8(v.clone()).expect("utf8"))
    }

    /// Creates a Secret (`secret` is its JSON; `apiVersion`, `kind` and `metadata.namespace` are
    /// set here) the way `kubectl create` does: a POST with field manager `manager`, into the
    /// real namespace `namespace`. Returns it as stored.
    pub async fn create_secret_as(
        &self,
        manager: &str,
        namespace: &str,
        mut secret: Value,
    ) -> Value {
        secret["apiVersion"] = "v1".into();
        secret["kind"] = "Secret".into();
        secret["metadata"]["namespace"] = namespace.into();
        let secret: Secret = serde_json::from_value(secret).expect("a Secret");
        let params = PostParams {
            field_manager: Some(manager.to_owned()),
            ..Default::default()
        };
        let created = self
            .secrets(namespace)
            .create(&params, &secret)
            .await
            .unwrap_or_else(|e| panic!("creating Secret in {namespace}: {e}"));
        serde_json::to_value(created).expect("json")
    }

    /// Deletes a Secret (as admin); false if there was none.
    pub async fn delete_secret(&self, namespace: &str, name: &str) -> bool {
        match self
            .secrets(namespace)
            .delete(name, &DeleteParams::default())
            .await
        {
            Ok(_) => true,
            Err(kube::Error::Api(status)) if status.code == 404 => false,
            Err(e) => panic!("deleting Secret {namespace}/{name}: {e}"),
        }
    }

    /// Applies a Secret with server-side apply as field manager `manager` (as `kubectl apply
    /// --server-side` or an ExternalSecret controller does). Returns it as stored.
    pub async fn apply_secret_as(
        &self,
        manager: &str,
        namespace: &str,
        mut secret: Value,
    ) -> Value {
        secret["apiVersion"] = "v1".into();
        secret["kind"] = "Secret".into();
        let name = secret["metadata"]["name"]
            .as_str()
            .expect("metadata.name")
            .to_owned();
        let applied: Secret = self
            .secrets(namespace)
            .patch(&name, &PatchParams::apply(manager), &Patch::Apply(&secret))
            .await
            .unwrap_or_else(|e| panic!("applying Secret {namespace}/{name} as {manager}: {e}"));
        serde_json::to_value(applied).expect("json")
    }

    /// Replaces the service's Role rules in the real namespace `namespace` (e.g. to remove a
    /// verb mid-test); returns once the verbs left are granted.
    pub async fn set_service_rules(&self, namespace: &str, rules: Vec<PolicyRule>) {
        Rbac::shipped()
            .bind(&self.admin, namespace, Some(rules))
            .await;
    }

    /// Applies any object as admin (e.g. a Role for the `tester` identity).
    pub async fn apply_as_admin<K>(&self, api: &Api<K>, name: &str, object: &Value)
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        apply(api, name, object).await;
    }

    /// The service's requests so far (through the proxy).
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.proxy.requests()
    }

    pub fn mutating_requests(&self) -> Vec<RequestRecord> {
        self.proxy.mutating_requests()
    }

    pub fn mutating_count(&self) -> usize {
        self.proxy.mutating_count()
    }

    pub fn clear_requests(&self) {
        self.proxy.clear_requests();
    }

    pub fn inject_fault(&self, fault: Fault) {
        self.proxy.inject_fault(fault);
    }
}
