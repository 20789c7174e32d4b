//! Postgres pool and migrations.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Parses DATABASE_URL without connecting, so a malformed URL is a configuration error.
pub fn options(
    database_url: &SecretString,
) -> Result<PgConnectOptions, crate::config::ConfigError> {
    database_url
        .expose_secret()
        .parse::<PgConnectOptions>()
        .map_err(|e| {
            // The URL may hold a password: never echo it.
            let reason = if matches!(e, sqlx::Error::Configuration(_)) {
                "not a valid postgres:// URL"
            } else {
                "unusable"
            };
            crate::config::ConfigError::new("DATABASE_URL", reason)
        })
}

/// Settings every session of the service starts with (sent in the startup packet, so no extra
/// round trip; a value already set in DATABASE_URL's `options` wins):
/// - `idle_in_transaction_session_timeout`: no transaction is open across an AWS or Kubernetes
///   call, so one idle this long belongs to a client that hung or was cut off; the server ends
///   its session and releases its row locks, which the rescuer, cancel and heartbeats need.
/// - `lock_timeout`: a statement waiting this long for a lock fails (and is retried) instead of
///   queueing behind a stuck session.
/// - `statement_timeout`: none of our statements runs this long (long polls use NOTIFY).
/// - `tcp_keepalives_*`, `tcp_user_timeout`: the server notices within about a minute, not the
///   OS default of two hours, that a client vanished (host down, partition), and ends its
///   session. sqlx 0.9's `PgConnectOptions` has no client-side TCP keepalive (libpq's
///   `keepalives` parameters are not supported); a worker cut off from Postgres stops its jobs
///   through its lease deadline instead (`jobs::runner`).
pub const SESSION_SETTINGS: [(&str, &str); 7] = [
    ("idle_in_transaction_session_timeout", "10s"),
    ("lock_timeout", "10s"),
    ("statement_timeout", "30s"),
    ("tcp_keepalives_idle", "30"),
    ("tcp_keepalives_interval", "10"),
    ("tcp_keepalives_count", "3"),
    ("tcp_user_timeout", "60000"),
];

/// Connections for `workers` concurrent jobs: two per job (the bucket step runs alongside the
/// IAM chain), plus the worker loop and its LISTEN connection, the API's job-state LISTEN
/// connection and seven for API requests. Heartbeats have their own pool ([`heartbeat_pool`]).
pub fn pool_size(workers: usize) -> u32 {
    let workers = u32::try_from(workers).unwrap_or(u32::MAX);
    workers.saturating_mul(2).saturating_add(10)
}

/// The service's pool, sized for `workers` jobs ([`pool_size`]), every session starting with
/// [`SESSION_SETTINGS`].
pub async fn connect(options: PgConnectOptions, workers: usize) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(pool_size(workers))
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(with_session_settings(options))
        .await
}

fn with_session_settings(options: PgConnectOptions) -> PgConnectOptions {
    let given = options.get_options().unwrap_or_default().to_owned();
    let unset = SESSION_SETTINGS
        .into_iter()
        .filter(|(name, _)| !given.contains(&format!("{name}=")));
    options.options(unset)
}

/// Two connections of their own for the workers' heartbeats, with `pool`'s settings: jobs that
/// hold every connection of `pool` cannot delay a lease renewal. Connects on first use.
pub fn heartbeat_pool(pool: &PgPool) -> PgPool {
    PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with((*pool.connect_options()).clone())
}

/// Applies the migrations on a connection of its own without the statement and lock bounds of
/// [`SESSION_SETTINGS`]: a migration may wait for other sessions' locks and rewrite a table.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    let mut conn = pool.acquire().await?;
    // The session's settings change: the connection is closed, not returned to the pool.
    conn.close_on_drop();
    sqlx::raw_sql("SET lock_timeout = 0; SET statement_timeout = 0")
        .execute(&mut *conn)
        .await?;
    MIGRATOR.run(&mut *conn).await
}

/// True when every migration this binary knows has been applied (used by /readyz).
pub async fn migrations_applied(pool: &PgPool) -> Result<bool, sqlx::Error> {
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(pool)
            .await?;
    Ok(MIGRATOR.iter().all(|m| applied.contains(&m.version)))
}

/// Name of the unique constraint or index a database error violated, if any.
pub fn violated_constraint(err: &sqlx::Error) -> Option<&str> {
    match err {
        sqlx::Error::Database(db) if db.is_unique_violation() => db.constraint(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_grows_with_the_workers() {
        assert_eq!(pool_size(0), 10);
        assert_eq!(pool_size(4), 18);
        assert_eq!(pool_size(8), 26);
        assert_eq!(pool_size(usize::MAX), u32::MAX);
    }

    #[test]
    fn a_setting_in_the_url_wins() {
        let url = "postgres://u@h/d?options=-c%20statement_timeout%3D5min";
        let options = with_session_settings(url.parse().unwrap());
        let text = options.get_options().unwrap();
        assert!(text.contains("statement_timeout=5min"), "{text}");
        assert!(!text.contains("statement_timeout=30s"), "{text}");
        assert!(text.contains("lock_timeout=10s"), "{text}");
    }
}
