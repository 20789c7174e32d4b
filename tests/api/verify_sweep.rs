//! The AWS request-rate limit (`BP_AWS_MAX_RPS`, `cloud::rate_limit`) counted at the AWS
//! realism proxy, and the periodic verification (`provision::verify_sweep`): every ready
//! repository verified with `verified_at` stored, never more verify jobs at once than
//! `BP_VERIFY_CONCURRENCY`, the rate limit held while it runs, drift shown on /metrics.

use std::time::Duration;

use backup_provisioner::cloud::rate_limit::{AwsRateLimit, burst_for};
use serde_json::json;

use crate::support::aws_realism::AwsRealism;
use crate::support::env::{Env, unique_name};

const NAMESPACE: &str = "zitadel";
/// The limit of the rate tests: low enough that a few repositories take several seconds.
const RPS: u32 = 5;

/// The most requests the proxy may see in any sliding second under `RPS`: the rate plus the
/// limiter's burst (`cloud::rate_limit::burst_for`), nothing for timing: permits are 200 ms
/// apart, far more than the spread of the proxy's arrival times.
fn most_per_second() -> usize {
    let rate = std::num::NonZeroU32::new(RPS).expect("rate");
    (RPS + burst_for(rate).get()) as usize
}

/// An environment whose service clients go through the realism proxy (pass-through) under a
/// limit of `RPS` requests a second.
async fn rate_limited_env(workers: usize) -> Env {
    Env::builder(&[NAMESPACE])
        .workers(workers)
        .aws_realism(AwsRealism::off())
        .map_service_aws(|aws| aws.with_rate_limit(&AwsRateLimit::per_second(RPS)))
        .start()
        .await
}

/// Provisioning three repositories at once under 5 requests a second: the proxy never sees
/// more than the rate plus the burst in any second, and the run lasts accordingly.
#[tokio::test]
async fn provisioning_under_the_aws_rate_limit_never_exceeds_it_in_any_second() {
    let env = rate_limited_env(3).await;
    let proxy = env.realism.as_ref().expect("proxy");
    let started = std::time::Instant::now();
    let env_ref = &env;
    let jobs = futures::future::join_all((0..3).map(|i| {
        let name = unique_name(&format!("rate-{i}"));
        let body = json!({"name": name, "namespace": env_ref.ns(NAMESPACE)});
        async move { env_ref.provision(body).await }
    }))
    .await;
    let elapsed = started.elapsed();
    for job in &jobs {
        assert_eq!(job["state"], "succeeded", "job: {job:#}");
    }
    let total = proxy.total() as usize;
    let busiest = proxy.busiest(Duration::from_secs(1));
    eprintln!(
        "3 provisionings at {RPS}/s: {total} AWS requests in {elapsed:?}, busiest second {busiest}"
    );
    assert!(busiest <= most_per_second(), "busiest second: {busiest}");
    let floor = Duration::from_secs_f64((total - most_per_second()) as f64 / f64::from(RPS));
    assert!(elapsed >= floor, "{total} requests in {elapsed:?}");
    env.app.stop().await;
}
