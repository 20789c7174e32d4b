//! The process-wide limit on AWS requests (`BP_AWS_MAX_RPS`), so that a fleet of thousands of
//! repositories verified by the periodic sweep, plus whatever jobs run meanwhile, never makes
//! AWS throttle the account (IAM's request quotas are account-wide and shared with people).
//!
//! It sits under the SDK as its HTTP client ([`AwsRateLimit::wrap`]): every attempt the SDK
//! sends, retries included, first waits for a permit. Permits come from one GCRA limiter
//! (`governor`) at `per_second` evenly spaced, with a burst of [`burst_for`] `per_second`
//! (the rate itself: a provisioning job sends its reads, and then its independent writes, as
//! concurrent waves of up to ~20 requests, which a smaller burst would spread out into
//! sequential round trips), so any sliding second sees at most `per_second + burst` requests. Waiters are served first come, first served (a fair mutex in front of the limiter),
//! so no request starves behind a busy sweep.

use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;

use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpClient,
    SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::HttpRequest;
use aws_smithy_runtime_api::client::runtime_components::{
    RuntimeComponents, RuntimeComponentsBuilder,
};
use aws_smithy_runtime_api::shared::IntoShared;
use aws_smithy_types::config_bag::ConfigBag;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// AWS requests per second when `BP_AWS_MAX_RPS` is unset or 0. IAM's documented request
/// quotas are a few dozen requests per second per account for most write APIs; 20 leaves room
/// for people and other tools using the same account.
pub const DEFAULT_AWS_MAX_RPS: u32 = 20;

/// The burst allowed on top of the steady rate: the rate itself, so that one job's concurrent
/// wave of reads (or of independent writes) goes out at once instead of being spaced by the
/// limiter. Over any sliding second the account still sees at most twice the rate, and over a
/// longer run the rate.
pub fn burst_for(per_second: NonZeroU32) -> NonZeroU32 {
    per_second
}

/// A shared limit on AWS requests. Cheap to clone: clones share the permits.
#[derive(Clone)]
pub struct AwsRateLimit {
    per_second: NonZeroU32,
    limiter: Arc<DefaultDirectRateLimiter>,
    /// Waiters queue here first (tokio's mutex is fair), then wait for the limiter alone.
    turn: Arc<tokio::sync::Mutex<()>>,
}

impl fmt::Debug for AwsRateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsRateLimit")
            .field("per_second", &self.per_second)
            .field("burst", &burst_for(self.per_second))
            .finish()
    }
}

impl AwsRateLimit {
    /// `per_second` requests a second; 0 means [`DEFAULT_AWS_MAX_RPS`] (never unlimited).
    pub fn per_second(per_second: u32) -> Self {
        let per_second = NonZeroU32::new(per_second)
            .unwrap_or(NonZeroU32::new(DEFAULT_AWS_MAX_RPS).expect("non-zero default"));
        let quota = Quota::per_second(per_second).allow_burst(burst_for(per_second));
        AwsRateLimit {
            per_second,
            limiter: Arc::new(RateLimiter::direct(quota)),
            turn: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// The limit of this process for `per_second` (0: the default): every call with the same
    /// rate shares one set of permits, so clients built at different places of the composition
    /// root (the job kinds, the sweep) count against one limit.
    pub fn process_wide(per_second: u32) -> Self {
        static LIMITS: std::sync::Mutex<Vec<AwsRateLimit>> = std::sync::Mutex::new(Vec::new());
        let wanted = Self::per_second(per_second);
        let mut limits = LIMITS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(existing) = limits.iter().find(|l| l.per_second == wanted.per_second) {
            return existing.clone();
        }
        limits.push(wanted.clone());
        wanted
    }

    /// The steady rate.
    pub fn rate(&self) -> NonZeroU32 {
        self.per_second
    }

    /// Waits for one permit, in arrival order.
    pub async fn acquire(&self) {
        let _turn = self.turn.lock().await;
        loop {
            match self.limiter.check() {
                Ok(()) => return,
                Err(not_until) => {
                    let wait = not_until.wait_time_from(DefaultClock::default().now());
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// `inner` with every request it sends waiting for a permit first.
    pub fn wrap(&self, inner: SharedHttpClient) -> SharedHttpClient {
        RateLimitedClient {
            inner,
            limit: self.clone(),
        }
        .into_shared()
    }
}

/// The HTTPS client the SDK would use by default (hyper 1, rustls with aws-lc, proxy settings
/// from the environment), built the way `aws-smithy-runtime` builds it for
/// `BehaviorVersion::latest()`, for wrapping when the config names no client of its own.
pub fn default_https_client() -> SharedHttpClient {
    use aws_smithy_http_client::proxy::ProxyConfig;
    use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
    use aws_smithy_http_client::{Builder, ConnectorBuilder};
    Builder::new().build_with_connector_fn(|settings, components| {
        let mut connector =
            ConnectorBuilder::default().tls_provider(tls::Provider::Rustls(CryptoMode::AwsLc));
        connector.set_connector_settings(settings.cloned());
        if let Some(components) = components {
            connector.set_sleep_impl(components.sleep_impl());
        }
        connector.set_proxy_config(Some(ProxyConfig::from_env()));
        connector.build()
    })
}

#[derive(Debug)]
struct RateLimitedClient {
    inner: SharedHttpClient,
    limit: AwsRateLimit,
}

impl HttpClient for RateLimitedClient {
    fn http_connector(
        &self,
        settings: &HttpConnectorSettings,
        components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        SharedHttpConnector::new(RateLimitedConnector {
            inner: self.inner.http_connector(settings, components),
            limit: self.limit.clone(),
        })
    }

    fn validate_base_client_config(
        &self,
        runtime_components: &RuntimeComponentsBuilder,
        cfg: &ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        self.inner
            .validate_base_client_config(runtime_components, cfg)
    }

    fn validate_final_config(
        &self,
        runtime_components: &RuntimeComponents,
        cfg: &ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        self.inner.validate_final_config(runtime_components, cfg)
    }

    fn connector_metadata(
        &self,
    ) -> Option<aws_smithy_runtime_api::client::connector_metadata::ConnectorMetadata> {
        self.inner.connector_metadata()
    }
}

#[derive(Debug)]
struct RateLimitedConnector {
    inner: SharedHttpConnector,
    limit: AwsRateLimit,
}

impl HttpConnector for RateLimitedConnector {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let inner = self.inner.clone();
        let limit = self.limit.clone();
        HttpConnectorFuture::new(async move {
            limit.acquire().await;
            inner.call(request).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Permits granted within `window` by many concurrent waiters.
    async fn permits_within(limit: &AwsRateLimit, window: Duration) -> usize {
        let start = Instant::now();
        let granted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let waiters: Vec<_> = (0..200)
            .map(|_| {
                let (limit, granted) = (limit.clone(), granted.clone());
                tokio::spawn(async move {
                    limit.acquire().await;
                    if start.elapsed() < window {
                        granted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                })
            })
            .collect();
        tokio::time::sleep(window).await;
        for waiter in waiters {
            waiter.abort();
        }
        granted.load(std::sync::atomic::Ordering::SeqCst)
    }

    #[tokio::test]
    async fn grants_the_rate_plus_the_burst_per_second() {
        let limit = AwsRateLimit::per_second(20);
        let granted = permits_within(&limit, Duration::from_millis(2000)).await;
        // 2 s at 20/s after a burst of 20: 60 (a few more or less for timer granularity).
        assert!((55..=61).contains(&granted), "granted {granted}");
    }

    #[tokio::test]
    async fn zero_means_the_default_not_unlimited() {
        let limit = AwsRateLimit::per_second(0);
        assert_eq!(limit.rate().get(), DEFAULT_AWS_MAX_RPS);
        let granted = permits_within(&limit, Duration::from_millis(500)).await;
        assert!(granted <= 20 + 11, "granted {granted}");
    }

    #[test]
    fn the_process_wide_limit_of_a_rate_is_shared() {
        let a = AwsRateLimit::process_wide(7);
        let b = AwsRateLimit::process_wide(7);
        assert!(Arc::ptr_eq(&a.limiter, &b.limiter));
        assert!(!Arc::ptr_eq(
            &a.limiter,
            &AwsRateLimit::process_wide(8).limiter
        ));
    }

    #[test]
    fn the_burst_is_the_rate() {
        let burst = |n| burst_for(NonZeroU32::new(n).unwrap()).get();
        assert_eq!(
            (burst(1), burst(5), burst(20), burst(1000)),
            (1, 5, 20, 1000)
        );
    }
}
