//! What both benches (`load.rs`, `provisioning.rs`) share: settings from the environment, the
//! runtime and the report's frame, the scratch databases a run makes, and the statistics.
//! Included by `#[path]` as each bench includes the test harness's `support` files (a bench is
//! a crate of its own); it uses the harness's `app` module, which each bench declares.

use std::future::Future;
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::app;

/// A size of the run from the environment variable `name` (`default` when unset or unparsable),
/// to shrink a run for a smoke test.
pub fn setting<T: FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Whether `BENCH_SECTIONS` (a comma-separated list; every section when unset) names
/// `section`: to re-run one part of a bench while working on it.
pub fn section_wanted(section: &str) -> bool {
    std::env::var("BENCH_SECTIONS")
        .map(|wanted| wanted.split(',').any(|s| s.trim() == section))
        .unwrap_or(true)
}

/// Runs the bench `name` on a multi-threaded runtime, between the report's header (which build,
/// how many CPUs) and its total time.
pub fn main_of<F: Future<Output = ()>>(name: &str, bench: F) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let started = Instant::now();
        backup_provisioner::install_crypto_provider();
        println!(
            "backup-provisioner {name} benchmarks (release build, {} CPUs)",
            cpus()
        );
        println!();
        bench.await;
        println!();
        println!("total bench time: {:.1} s", started.elapsed().as_secs_f64());
    });
}

/// The databases this run made; dropped at the end.
#[derive(Default)]
pub struct Databases(Vec<String>);

impl Databases {
    /// Keeps a test database past its guard, to drop it at the end.
    pub fn keep(&mut self, guard: app::DatabaseGuard) {
        self.0.push(guard.keep());
    }

    /// Drops the database of `url` at the end.
    pub fn keep_url(&mut self, url: &str) {
        self.0
            .push(url.rsplit('/').next().unwrap_or_default().to_owned());
    }

    /// Drops them (only test databases, by their prefix).
    pub async fn drop_all(&self) {
        let Ok(admin) = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&format!("{}/postgres", app::postgres_base_url()))
            .await
        else {
            return;
        };
        let mut dropped = 0;
        for name in self
            .0
            .iter()
            .filter(|n| n.starts_with(app::DATABASE_PREFIX))
        {
            match sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&admin)
            .await
            {
                Ok(_) => dropped += 1,
                Err(e) => eprintln!("dropping {name}: {e}"),
            }
        }
        eprintln!("dropped the {dropped} databases this run created");
        admin.close().await;
    }
}

/// Nearest-rank percentile (0 = min, 100 = max).
pub fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn ms(d: Duration) -> String {
    let v = d.as_secs_f64() * 1000.0;
    if v < 10.0 {
        format!("{v:.2} ms")
    } else {
        format!("{v:.0} ms")
    }
}

pub fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
