//! The AWS runbook steps (bucket, policy, group, user, access key, credential check) against
//! moto through the real SDK: first run creates, state read back exactly, second run makes zero
//! mutating calls, drift is repaired, and errors are classified.

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::primitives::SdkBody;
use backup_provisioner::cloud::CloudError;
use backup_provisioner::cloud::aws::{AwsClients, CallCounter};
use serde_json::Value;

use crate::support::moto::Moto;

mod access_key;
mod all_steps;
mod bucket;
mod credential_check;
mod errors;
mod harness;
mod iam;
mod plan_mode;

const EU: &str = "eu-west-1";
const US: &str = "us-east-1";

/// A unique, valid bucket (and IAM) name.
fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("bp-{prefix}-{}", &id[..12])
}

struct Env {
    clients: AwsClients,
    counter: CallCounter,
}

impl Env {
    async fn new(region: &str) -> Env {
        let counter = CallCounter::new();
        let clients = Moto::shared().clients(region, Some(counter.clone())).await;
        Env { clients, counter }
    }

    fn s3(&self, region: &str) -> aws_sdk_s3::Client {
        self.clients.s3_for_region(region)
    }

    fn iam(&self) -> &aws_sdk_iam::Client {
        &self.clients.iam
    }

    fn assert_no_mutations_except(&self, allowed: &[&str]) {
        let unexpected: Vec<String> = self
            .counter
            .mutating()
            .into_keys()
            .filter(|k| !allowed.contains(&k.as_str()))
            .collect();
        assert!(
            unexpected.is_empty(),
            "unexpected mutating calls {unexpected:?}"
        );
    }

    fn assert_no_mutations(&self, what: &str) {
        assert!(
            self.counter.mutating().is_empty(),
            "{what}: expected no mutating calls, got {:?}",
            self.counter.mutating()
        );
    }
}

fn differences(detail: &Value) -> Vec<String> {
    detail["differences"]
        .as_array()
        .map(|d| {
            d.iter()
                .map(|d| {
                    format!(
                        "{}:{}",
                        d["setting"].as_str().unwrap_or("?"),
                        d["action"].as_str().unwrap_or("?")
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// An empty HTTP response with `status`, for errors made by hand.
fn response(status: u16) -> HttpResponse {
    HttpResponse::new(status.try_into().unwrap(), SdkBody::empty())
}

fn expect_permanent(result: Result<impl std::fmt::Debug, CloudError>) -> String {
    match result {
        Err(err @ CloudError::Permanent { .. }) => err.to_string(),
        other => panic!("expected a permanent error, got {other:?}"),
    }
}
