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

pub async fn connect(options: PgConnectOptions) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await
}

pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
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
