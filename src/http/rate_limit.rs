//! Rate limits on `/v1`, in this process (GCRA, the `governor` crate): mutating requests (POST,
//! PUT, PATCH, DELETE) per token subject (`BP_RATE_LIMIT_PER_SUBJECT`) and of all subjects
//! together (`BP_RATE_LIMIT_GLOBAL`); reads per subject only when
//! `BP_RATE_LIMIT_READS_PER_SUBJECT` is set. Beyond a limit: 429 problem+json with
//! `Retry-After`. Requests without a valid token are not counted (they are refused 401 anyway
//! and do no work), so nobody can spend another subject's budget or the global one without one.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, NotUntil, Quota, RateLimiter};

use super::extract::Caller;
use super::{ApiError, AppState};
use crate::config::RateLimit;

/// Subjects remembered before idle ones are forgotten.
const SUBJECTS_KEPT: usize = 10_000;

type Keyed = DefaultKeyedRateLimiter<String>;

/// The limiters of one process (replicas each have their own).
pub struct RateLimits {
    per_subject: Option<Keyed>,
    global: Option<DefaultDirectRateLimiter>,
    reads_per_subject: Option<Keyed>,
    clock: DefaultClock,
}

/// The configured limits.
#[derive(Debug, Clone, Copy)]
pub struct RateLimitSettings {
    pub per_subject: RateLimit,
    pub global: RateLimit,
    pub reads_per_subject: RateLimit,
}

fn quota(limit: RateLimit) -> Option<Quota> {
    let (count, period) = limit.0?;
    let every = (period / count.get()).max(Duration::from_nanos(1));
    Some(Quota::with_period(every)?.allow_burst(count))
}

impl RateLimits {
    pub fn new(settings: RateLimitSettings) -> Self {
        RateLimits {
            per_subject: quota(settings.per_subject).map(RateLimiter::keyed),
            global: quota(settings.global).map(RateLimiter::direct),
            reads_per_subject: quota(settings.reads_per_subject).map(RateLimiter::keyed),
            clock: DefaultClock::default(),
        }
    }

    /// Counts one request of `subject`; the error says when to come back.
    fn check(&self, subject: &str, mutating: bool) -> Result<(), ApiError> {
        let (keyed, global) = if mutating {
            (self.per_subject.as_ref(), self.global.as_ref())
        } else {
            (self.reads_per_subject.as_ref(), None)
        };
        if let Some(limiter) = keyed {
            let key = subject.to_owned();
            if limiter.len() > SUBJECTS_KEPT {
                limiter.retain_recent();
            }
            limiter
                .check_key(&key)
                .map_err(|until| self.refused(&until, "for this token's subject"))?;
        }
        if let Some(limiter) = global {
            limiter
                .check()
                .map_err(|until| self.refused(&until, "for this service"))?;
        }
        Ok(())
    }

    fn refused(&self, until: &NotUntil<<DefaultClock as Clock>::Instant>, whose: &str) -> ApiError {
        let wait = until.wait_time_from(self.clock.now());
        let retry_after = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        ApiError::TooManyRequests {
            detail: format!("too many requests {whose}; try again in {retry_after} s"),
            retry_after: retry_after.max(1),
        }
    }

    fn applies(&self, method: &Method, path: &str) -> Option<bool> {
        if !(path == "/v1" || path.starts_with("/v1/")) {
            return None;
        }
        let mutating = matches!(
            *method,
            Method::POST | Method::PUT | Method::PATCH | Method::DELETE
        );
        let reads = matches!(*method, Method::GET | Method::HEAD);
        if mutating && (self.per_subject.is_some() || self.global.is_some())
            || reads && self.reads_per_subject.is_some()
        {
            return Some(mutating);
        }
        None
    }
}

/// The middleware: authenticates a limited request (the handler reuses the result) and counts
/// it against the limits.
pub async fn rate_limit(
    State((state, limits)): State<(AppState, Arc<RateLimits>)>,
    request: Request,
    next: Next,
) -> Response {
    let Some(mutating) = limits.applies(request.method(), request.uri().path()) else {
        return next.run(request).await;
    };
    let (mut parts, body) = request.into_parts();
    // An invalid token is answered by the handler, as without limits.
    if let Ok(caller) = Caller::from_request_parts(&mut parts, &state).await
        && let Err(refused) = limits.check(&caller.principal.subject, mutating)
    {
        tracing::warn!(subject = %caller.principal.subject, "rate limited");
        return refused.into_response();
    }
    next.run(Request::from_parts(parts, body)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_subject: &str, global: &str) -> RateLimits {
        RateLimits::new(RateLimitSettings {
            per_subject: per_subject.parse().unwrap(),
            global: global.parse().unwrap(),
            reads_per_subject: "off".parse().unwrap(),
        })
    }

    #[test]
    fn a_subject_gets_its_burst_then_waits() {
        let limits = limits("3/min", "off");
        for _ in 0..3 {
            limits.check("alice", true).unwrap();
        }
        match limits.check("alice", true) {
            Err(ApiError::TooManyRequests { retry_after, .. }) => {
                assert!((1..=20).contains(&retry_after), "{retry_after}")
            }
            other => panic!("{other:?}"),
        }
        limits.check("bob", true).unwrap();
        // Reads are not limited unless configured.
        assert_eq!(limits.applies(&Method::GET, "/v1/jobs/x"), None);
        assert_eq!(
            limits.applies(&Method::POST, "/v1/jobs/x/cancel"),
            Some(true)
        );
        assert_eq!(limits.applies(&Method::POST, "/metrics"), None);
    }

    #[test]
    fn the_global_limit_counts_every_subject() {
        let limits = limits("off", "2/s");
        limits.check("a", true).unwrap();
        limits.check("b", true).unwrap();
        assert!(limits.check("c", true).is_err());
    }

    #[test]
    fn rates_parse() {
        assert_eq!("off".parse::<RateLimit>().unwrap(), RateLimit(None));
        let parsed: RateLimit = "30/min".parse().unwrap();
        assert_eq!(parsed.0.unwrap().0.get(), 30);
        assert_eq!(parsed.0.unwrap().1, Duration::from_secs(60));
        for bad in ["", "30", "0/min", "x/min", "30/day", "-1/s"] {
            assert!(bad.parse::<RateLimit>().is_err(), "{bad}");
        }
    }
}
