//! The identities of the IAM policy proof: moto with AWS-style authorization
//! (`Moto::with_aws_authorization`, one process for the whole binary), a bootstrap administrator
//! made by its only unauthenticated requests, and service users holding nothing but a variant
//! of `deploy/aws/provisioner-iam-policy.json` (the variants the removal loop runs).

use std::sync::OnceLock;

use backup_provisioner::cloud::aws::AwsClients;
use serde_json::{Value, json};

use crate::support::env::{REGION, unique_name};
use crate::support::moto::{Moto, iam_for_enforced_moto};

/// The shipped policy, as deployed.
pub const POLICY: &str = include_str!("../../../deploy/aws/provisioner-iam-policy.json");

/// CreateUser, PutUserPolicy and CreateAccessKey of the administrator; every later request is
/// authorized.
const UNAUTHENTICATED_REQUESTS: u32 = 3;

/// The moto server of every test in this module.
pub fn moto() -> &'static Moto {
    static MOTO: OnceLock<Moto> = OnceLock::new();
    MOTO.get_or_init(|| Moto::with_aws_authorization(UNAUTHENTICATED_REQUESTS))
}

/// The administrator's access key (made once, on a thread of its own: the first requests to
/// moto must be these three, whichever test comes first).
fn admin_key() -> &'static (String, String) {
    static KEY: OnceLock<(String, String)> = OnceLock::new();
    KEY.get_or_init(|| {
        std::thread::spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(bootstrap_admin())
        })
        .join()
        .expect("bootstrap thread")
    })
}

async fn bootstrap_admin() -> (String, String) {
    let open = moto().clients(REGION, None).await;
    let iam = iam_for_enforced_moto(&open.iam);
    let everything = json!({"Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]});
    iam.create_user()
        .user_name("root-admin")
        .send()
        .await
        .expect("admin");
    iam.put_user_policy()
        .user_name("root-admin")
        .policy_name("everything")
        .policy_document(everything.to_string())
        .send()
        .await
        .expect("admin policy");
    access_key(&iam, "root-admin").await
}

async fn access_key(iam: &aws_sdk_iam::Client, user: &str) -> (String, String) {
    let key = iam
        .create_access_key()
        .user_name(user)
        .send()
        .await
        .expect("access key")
        .access_key
        .expect("access key");
    (
        key.access_key_id().to_owned(),
        key.secret_access_key().to_owned(),
    )
}

/// Clients signing as `key`, IAM bodies encoded as moto checks them.
pub async fn clients_as(key: &(String, String)) -> AwsClients {
    let mut clients = moto().clients_as(REGION, None, &key.0, &key.1).await;
    clients.iam = iam_for_enforced_moto(&clients.iam);
    clients
}

/// The administrator's clients (allowed everything): drift, out-of-band changes, assertions.
pub async fn admin() -> AwsClients {
    clients_as(admin_key()).await
}

/// A service identity: an IAM user (named unlike anything the policy grants) whose only
/// permissions are one inline policy, replaced by [`ServiceUser::holds`].
pub struct ServiceUser {
    pub name: String,
    pub key: (String, String),
}

impl ServiceUser {
    pub async fn create(admin: &AwsClients) -> ServiceUser {
        let name = unique_name("backup-provisioner");
        admin
            .iam
            .create_user()
            .user_name(&name)
            .send()
            .await
            .expect("service user");
        let key = access_key(&admin.iam, &name).await;
        let user = ServiceUser { name, key };
        user.holds(admin, &serde_json::from_str(POLICY).expect("policy"))
            .await;
        user
    }

    /// From now on the user holds `document` and nothing else.
    pub async fn holds(&self, admin: &AwsClients, document: &Value) {
        admin
            .iam
            .put_user_policy()
            .user_name(&self.name)
            .policy_name("provisioner")
            .policy_document(document.to_string())
            .send()
            .await
            .expect("service policy");
    }
}

/// One way of taking something out of the policy: its label and the policy without it.
pub struct Removal {
    pub label: String,
    /// The action taken out (`None`: a whole statement).
    pub action: Option<String>,
    pub document: Value,
}

fn statements(policy: &Value) -> &Vec<Value> {
    policy["Statement"].as_array().expect("statements")
}

fn actions(statement: &Value) -> Vec<String> {
    match &statement["Action"] {
        Value::String(one) => vec![one.clone()],
        Value::Array(many) => many
            .iter()
            .filter_map(|a| a.as_str())
            .map(str::to_owned)
            .collect(),
        other => panic!("unexpected Action {other}"),
    }
}

/// Every action of the policy, with its statement's Sid.
pub fn all_actions(policy: &Value) -> Vec<(String, String)> {
    statements(policy)
        .iter()
        .flat_map(|s| {
            let sid = s["Sid"].as_str().unwrap_or_default().to_owned();
            actions(s).into_iter().map(move |a| (sid.clone(), a))
        })
        .collect()
}

/// The policy without each statement (when it has more than one action: a statement of one
/// action is the removal of that action), then without each action.
pub fn removals(policy: &Value) -> Vec<Removal> {
    let mut out = Vec::new();
    for (index, statement) in statements(policy).iter().enumerate() {
        if actions(statement).len() > 1 {
            let mut document = policy.clone();
            document["Statement"].as_array_mut().unwrap().remove(index);
            let label = format!("statement {}", statement["Sid"].as_str().unwrap_or("?"));
            out.push(Removal {
                label,
                action: None,
                document,
            });
        }
    }
    for (sid, action) in all_actions(policy) {
        out.push(Removal {
            document: without_action(policy, &action),
            label: format!("{action} (statement {sid})"),
            action: Some(action),
        });
    }
    out
}

/// The policy without `action` (a statement left without actions is dropped).
pub fn without_action(policy: &Value, action: &str) -> Value {
    let mut document = policy.clone();
    let kept: Vec<Value> = statements(policy)
        .iter()
        .filter_map(|s| {
            let rest: Vec<String> = actions(s).into_iter().filter(|a| a != action).collect();
            let mut s = s.clone();
            s["Action"] = json!(rest);
            (!rest.is_empty()).then_some(s)
        })
        .collect();
    document["Statement"] = json!(kept);
    document
}
