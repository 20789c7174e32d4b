//! Logging and Prometheus metrics.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

/// Initialises logging once per process (`RUST_LOG` filters, default `info`).
pub fn init_tracing(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal: escape codes in a log file or a log shipper's
    // input are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal())
        .with_span_events(FmtSpan::NONE);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    pub kind: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RepositoryLabels {
    pub repository: String,
    pub namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    pub step: String,
    pub outcome: String,
}

/// The methods recorded by name; any other is `other`.
const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// `method` if it is one of [`METHODS`], else `other`.
pub fn method_label(method: &str) -> &'static str {
    METHODS
        .iter()
        .find(|known| **known == method)
        .copied()
        .unwrap_or("other")
}

/// The service's metrics. Job counts by state and queue lag are gauges refreshed from Postgres
/// at scrape time, so every replica reports the same truth.
pub struct Metrics {
    registry: Mutex<Registry>,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_duration: Family<HttpLabels, Histogram>,
    pub job_duration: Family<JobLabels, Histogram>,
    pub step_duration: Family<StepLabels, Histogram>,
    pub jobs_by_state: Family<StateLabels, Gauge>,
    pub queue_lag_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub repositories_with_drift: Gauge,
    pub drift_settings: Gauge,
    pub repositories_never_verified: Gauge,
    pub oldest_verification_age_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Webhook deliveries `pending` (still retried) and `failed` (given up), from the outbox.
    pub webhook_deliveries: Family<StateLabels, Gauge>,
    /// Backup freshness per ready repository (see [`FreshnessAges`]).
    pub freshness: FreshnessGauges,
}

type AgeFamily = Family<RepositoryLabels, Gauge<f64, std::sync::atomic::AtomicU64>>;

/// Per ready repository: the ages of what the last freshness check found
/// (`provision::freshness`). A repository has a series only for what was found: no full
/// backup ever found means no `newest_full_backup_age_seconds` series (alert on it with
/// `freshness_checked_age_seconds unless newest_full_backup_age_seconds`), never NaN.
#[derive(Default)]
pub struct FreshnessGauges {
    pub newest_backup_age_seconds: AgeFamily,
    pub newest_full_backup_age_seconds: AgeFamily,
    pub newest_wal_age_seconds: AgeFamily,
    pub checked_age_seconds: AgeFamily,
    pub check_failing: Family<RepositoryLabels, Gauge>,
    /// The series of the last refresh; held for the whole of one (one refresh at a time).
    series: Mutex<std::collections::HashSet<RepositoryLabels>>,
}

/// One ready repository's freshness ages in seconds, from `backup_freshness` (see
/// [`freshness_ages`]); None where nothing was found.
#[derive(Debug, Clone, Default, PartialEq, sqlx::FromRow)]
pub struct FreshnessAges {
    pub repository: String,
    pub namespace: String,
    pub newest_backup: Option<f64>,
    pub newest_full_backup: Option<f64>,
    pub newest_wal: Option<f64>,
    /// Since the last successful check.
    pub checked: Option<f64>,
    /// The last attempt failed.
    pub failing: bool,
}

/// Reads [`FreshnessAges`] of every ready repository checked at least once.
pub async fn freshness_ages(db: &sqlx::PgPool) -> Result<Vec<FreshnessAges>, sqlx::Error> {
    sqlx::query_as(
        "SELECT r.name AS repository, r.namespace,
                extract(epoch FROM now() - f.newest_backup_at)::float8 AS newest_backup,
                extract(epoch FROM now() - f.newest_full_backup_at)::float8 AS newest_full_backup,
                extract(epoch FROM now() - f.newest_wal_at)::float8 AS newest_wal,
                extract(epoch FROM now() - f.checked_at)::float8 AS checked,
                f.error IS NOT NULL AS failing
           FROM backup_repositories r JOIN backup_freshness f ON f.repository_id = r.id
          WHERE r.state = 'ready'",
    )
    .fetch_all(db)
    .await
}

impl FreshnessGauges {
    fn register(&self, r: &mut Registry) {
        let ages = [
            (
                "newest_backup_age_seconds",
                "Age of the newest completed backup (full, differential or incremental) of a ready repository",
                &self.newest_backup_age_seconds,
            ),
            (
                "newest_full_backup_age_seconds",
                "Age of the newest completed full backup of a ready repository",
                &self.newest_full_backup_age_seconds,
            ),
            (
                "newest_wal_age_seconds",
                "Age of the newest archived WAL of a ready repository",
                &self.newest_wal_age_seconds,
            ),
            (
                "freshness_checked_age_seconds",
                "Time since the last successful freshness check of a ready repository",
                &self.checked_age_seconds,
            ),
        ];
        for (name, help, family) in ages {
            r.register(name, help, family.clone());
        }
        r.register(
            "freshness_check_failing",
            "1 when the last freshness check of a ready repository failed",
            self.check_failing.clone(),
        );
    }

    /// Replaces every series with `ages` (a repository no longer ready loses its series).
    pub fn set(&self, ages: &[FreshnessAges]) {
        // Replaced in place, stale series removed, never cleared first: a scrape encoding
        // meanwhile still sees every current series.
        let mut previous = self.series.lock().expect("freshness gauges");
        let families = [
            &self.newest_backup_age_seconds,
            &self.newest_full_backup_age_seconds,
            &self.newest_wal_age_seconds,
            &self.checked_age_seconds,
        ];
        let mut current = std::collections::HashSet::new();
        for age in ages {
            let labels = RepositoryLabels {
                repository: age.repository.clone(),
                namespace: age.namespace.clone(),
            };
            let values = [
                age.newest_backup,
                age.newest_full_backup,
                age.newest_wal,
                age.checked,
            ];
            for (family, value) in families.into_iter().zip(values) {
                if let Some(seconds) = value {
                    family.get_or_create(&labels).set(seconds);
                } else {
                    family.remove(&labels);
                }
            }
            self.check_failing
                .get_or_create(&labels)
                .set(i64::from(age.failing));
            current.insert(labels);
        }
        for gone in previous.difference(&current) {
            for family in families {
                family.remove(gone);
            }
            self.check_failing.remove(gone);
        }
        *previous = current;
    }
}

/// What the verifications stored on the repositories say (see [`verification_stats`]).
#[derive(Debug, Clone, Default, PartialEq, sqlx::FromRow)]
pub struct VerificationStats {
    /// Live repositories whose last verification found at least one difference.
    pub repositories_with_drift: i64,
    /// Differences found by the last verification of every live repository, summed.
    pub drift_settings: i64,
    /// Ready repositories never verified.
    pub never_verified: i64,
    /// Age of the oldest verification among ready repositories (a never verified one counts
    /// from its last change, as the periodic verification counts it); 0 without any.
    pub oldest_age_seconds: f64,
}

/// Reads [`VerificationStats`] from the repositories table. Live: neither deleted nor being
/// deprovisioned.
pub async fn verification_stats(db: &sqlx::PgPool) -> Result<VerificationStats, sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE drift_count > 0 AND live) AS repositories_with_drift,
                coalesce(sum(drift_count) FILTER (WHERE live), 0)::bigint AS drift_settings,
                count(*) FILTER (WHERE verified_at IS NULL AND state = 'ready') AS never_verified,
                coalesce(extract(epoch FROM now() - min(coalesce(verified_at, updated_at))
                                 FILTER (WHERE state = 'ready')), 0)::float8 AS oldest_age_seconds
           FROM (SELECT *, state NOT IN ('deleted', 'deprovisioning') AS live
                   FROM backup_repositories) r",
    )
    .fetch_one(db)
    .await
}

fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let metrics = Metrics {
            registry: Mutex::new(Registry::with_prefix("backup_provisioner")),
            http_requests: Family::default(),
            http_duration: Family::new_with_constructor(seconds_histogram),
            job_duration: Family::new_with_constructor(seconds_histogram),
            step_duration: Family::new_with_constructor(seconds_histogram),
            jobs_by_state: Family::default(),
            queue_lag_seconds: Gauge::default(),
            repositories_with_drift: Gauge::default(),
            drift_settings: Gauge::default(),
            repositories_never_verified: Gauge::default(),
            oldest_verification_age_seconds: Gauge::default(),
            webhook_deliveries: Family::default(),
            freshness: FreshnessGauges::default(),
        };
        {
            let mut r = metrics.registry.lock().expect("metrics registry");
            r.register(
                "http_requests",
                "HTTP requests by route and status",
                metrics.http_requests.clone(),
            );
            r.register(
                "http_request_duration_seconds",
                "HTTP request latency",
                metrics.http_duration.clone(),
            );
            r.register(
                "job_duration_seconds",
                "Duration of job attempts",
                metrics.job_duration.clone(),
            );
            r.register(
                "step_duration_seconds",
                "Duration of job step attempts",
                metrics.step_duration.clone(),
            );
            r.register("jobs", "Jobs by state", metrics.jobs_by_state.clone());
            r.register(
                "queue_lag_seconds",
                "Age of the oldest runnable queued job",
                metrics.queue_lag_seconds.clone(),
            );
            metrics.register_verification(&mut r);
            r.register(
                "webhook_deliveries",
                "Webhook deliveries pending (still retried) or failed (given up)",
                metrics.webhook_deliveries.clone(),
            );
            metrics.freshness.register(&mut r);
        }
        metrics
    }

    /// One HTTP request. `route` must be a route template (or one fixed word for requests no
    /// route matched); the method is recorded as itself only when it is a standard one, else
    /// as `other`, so that no client can add label values.
    pub fn observe_http(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let labels = HttpLabels {
            method: method_label(method).to_owned(),
            route: route.to_owned(),
            status,
        };
        self.http_requests.get_or_create(&labels).inc();
        self.http_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    pub fn observe_job(&self, kind: &str, outcome: &str, elapsed: Duration) {
        let labels = JobLabels {
            kind: kind.to_owned(),
            outcome: outcome.to_owned(),
        };
        self.job_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    pub fn observe_step(&self, step: &str, outcome: &str, elapsed: Duration) {
        let labels = StepLabels {
            step: step.to_owned(),
            outcome: outcome.to_owned(),
        };
        self.step_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    pub fn set_job_states(&self, counts: &[(String, i64)], lag_seconds: f64) {
        for state in ["queued", "running", "succeeded", "failed", "cancelled"] {
            let n = counts
                .iter()
                .find(|(s, _)| s == state)
                .map(|(_, n)| *n)
                .unwrap_or(0);
            self.jobs_by_state
                .get_or_create(&StateLabels {
                    state: state.to_owned(),
                })
                .set(n);
        }
        self.queue_lag_seconds.set(lag_seconds);
    }

    fn register_verification(&self, r: &mut Registry) {
        r.register(
            "repositories_with_drift",
            "Repositories whose last verification found differences from the runbook",
            self.repositories_with_drift.clone(),
        );
        r.register(
            "drift_settings",
            "Differences from the runbook found by the last verification of every repository",
            self.drift_settings.clone(),
        );
        r.register(
            "repositories_never_verified",
            "Ready repositories not verified yet",
            self.repositories_never_verified.clone(),
        );
        r.register(
            "oldest_verification_age_seconds",
            "Age of the oldest verification of a ready repository (never verified: since its last change)",
            self.oldest_verification_age_seconds.clone(),
        );
    }

    pub fn set_webhook_deliveries(&self, pending: i64, failed: i64) {
        for (state, count) in [("pending", pending), ("failed", failed)] {
            let labels = StateLabels {
                state: state.to_owned(),
            };
            self.webhook_deliveries.get_or_create(&labels).set(count);
        }
    }

    pub fn set_verification(&self, stats: &VerificationStats) {
        self.repositories_with_drift
            .set(stats.repositories_with_drift);
        self.drift_settings.set(stats.drift_settings);
        self.repositories_never_verified.set(stats.never_verified);
        self.oldest_verification_age_seconds
            .set(stats.oldest_age_seconds);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().expect("metrics registry");
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("encoding to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_methods_are_labelled_from_a_closed_set() {
        let metrics = Metrics::new();
        let odd = "X".repeat(10_000);
        for method in ["GET", "POST", "get", "BREW", odd.as_str()] {
            metrics.observe_http(method, "/healthz", 405, Duration::from_millis(1));
        }
        let text = metrics.encode();
        assert!(!text.contains("XXXX") && !text.contains("BREW") && !text.contains("\"get\""));
        assert!(text.contains("method=\"other\""), "{text}");
        assert!(text.contains("method=\"GET\"") && text.contains("method=\"POST\""));
        assert_eq!(method_label("DELETE"), "DELETE");
    }

    #[test]
    fn freshness_series_exist_only_for_what_was_found_and_for_ready_repositories() {
        let metrics = Metrics::new();
        let found = FreshnessAges {
            repository: "zitadel".into(),
            namespace: "zitadel".into(),
            newest_backup: Some(60.0),
            newest_full_backup: Some(3600.0),
            newest_wal: Some(30.0),
            checked: Some(5.0),
            failing: false,
        };
        let series = |text: &str, name: &str| {
            text.lines()
                .filter(|l| l.starts_with(&format!("backup_provisioner_{name}{{")))
                .count()
        };
        metrics.freshness.set(std::slice::from_ref(&found));
        let text = metrics.encode();
        assert!(text.contains(
            "backup_provisioner_newest_full_backup_age_seconds{repository=\"zitadel\",namespace=\"zitadel\"} 3600"
        ), "{text}");
        let emptied = FreshnessAges {
            newest_backup: None,
            newest_full_backup: None,
            ..found.clone()
        };
        metrics.freshness.set(&[emptied]);
        let text = metrics.encode();
        assert_eq!(series(&text, "newest_full_backup_age_seconds"), 0, "{text}");
        assert_eq!(series(&text, "newest_wal_age_seconds"), 1, "{text}");
        assert!(!text.contains("NaN"), "{text}");
        metrics.freshness.set(&[]);
        let text = metrics.encode();
        for name in [
            "newest_wal_age_seconds",
            "freshness_checked_age_seconds",
            "freshness_check_failing",
        ] {
            assert_eq!(series(&text, name), 0, "{name}: {text}");
        }
    }
}
