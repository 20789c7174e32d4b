//! Postgres pool, migrations and the two database roles.
//!
//! The **owner** role owns the schema and applies the migrations (`backup-provisioner migrate`);
//! the **runtime** role the service runs as gets only what it needs ([`grant_runtime`]): on the
//! append-only tables ([`APPEND_ONLY_TABLES`]) only SELECT and INSERT, so it cannot UPDATE,
//! DELETE, TRUNCATE, disable their triggers or drop them. A service whose role may migrate
//! (tests, installs with one role) still migrates at start; any other checks that the schema is
//! current and refuses to start otherwise ([`prepare_schema`]).

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Parses DATABASE_URL without connecting, so a malformed URL is a configuration error.
pub fn options(
    database_url: &SecretString,
) -> Result<PgConnectOptions, crate::config::ConfigError> {
    options_from("DATABASE_URL", database_url)
}

/// [`options`] for the URL in `variable` (named by the error).
pub fn options_from(
    variable: &str,
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
            crate::config::ConfigError::new(variable, reason)
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
    let pool = PgPoolOptions::new()
        .max_connections(pool_size(workers))
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(with_session_settings(options));
    // Two connections, opened at once: the LISTEN connection takes one out of the pool for
    // good, and `/readyz` must not wait for another to be made only when it asks. Opened one
    // after the other (as `min_connections` does), each TLS handshake adds its own wait (and
    // without TCP_NODELAY, which sqlx-core 0.9.0 lost, see vendor/README.md, a handshake
    // stalled on delayed ACKs: ~130 ms here).
    let (first, second) = tokio::try_join!(pool.acquire(), pool.acquire())?;
    drop((first, second));
    Ok(pool)
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
    Ok(missing_migrations(pool).await?.is_empty())
}

/// The migrations this binary knows that the database has not applied, as `version
/// (description)`.
async fn missing_migrations(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(pool)
            .await?;
    Ok(MIGRATOR
        .iter()
        .filter(|m| !applied.contains(&m.version))
        .map(|m| format!("{} ({})", m.version, m.description))
        .collect())
}

/// True when the database has applied every migration this binary knows, each with the same
/// checksum (what [`migrate`] would check before doing nothing). Any doubt (an error, a failed
/// or edited migration) is false: [`migrate`] then runs and says what is wrong.
async fn schema_is_current(pool: &PgPool) -> bool {
    let applied: Vec<(i64, Vec<u8>)> = match sqlx::query_as(
        "SELECT version, checksum FROM _sqlx_migrations WHERE success ORDER BY version",
    )
    .fetch_all(pool)
    .await
    {
        Ok(applied) => applied,
        Err(_) => return false,
    };
    let known: Vec<(i64, &[u8])> = MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .map(|m| (m.version, &*m.checksum))
        .collect();
    applied.len() == known.len()
        && applied
            .iter()
            .zip(&known)
            .all(|((version, sum), (known_version, known_sum))| {
                version == known_version && sum.as_slice() == *known_sum
            })
}

/// Why the service does not start on a database's schema.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The schema is older than this binary (or absent, or unreadable) and the session's role
    /// may not migrate it: `main` exits with code 3.
    #[error("{0}")]
    Stale(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Whether the session's role may apply migrations: a superuser, or a member of the role that
/// owns the migrations table (before the first migration: of the database's owner).
pub async fn can_migrate(pool: &PgPool) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT r.rolsuper OR pg_has_role(current_user, COALESCE(
                    (SELECT relowner FROM pg_class WHERE oid = to_regclass('_sqlx_migrations')),
                    (SELECT datdba FROM pg_database WHERE datname = current_database())), 'MEMBER')
           FROM pg_roles r WHERE r.rolname = current_user",
    )
    .fetch_one(pool)
    .await
}

/// Before the service starts: a role that may migrate ([`can_migrate`]) applies the migrations
/// (with a warning: that role could also rewrite the audit log); any other role only checks that
/// every migration this binary knows is applied, and [`SchemaError::Stale`] says what to run.
pub async fn prepare_schema(pool: &PgPool) -> Result<(), SchemaError> {
    let may_migrate = can_migrate(pool).await?;
    if may_migrate {
        tracing::warn!(
            "the service's database role owns the schema and migrates it, so it could also \
             rewrite the audit log: run the service as a runtime role (README: Database roles)"
        );
    }
    // The common start, on a current schema: both checks ran on the pool's first connection,
    // and the migration's own connection (closed after use, so a second connection set-up at
    // every start, with TLS the costliest part of starting) is not needed.
    if may_migrate && schema_is_current(pool).await {
        return Ok(());
    }
    if may_migrate {
        migrate(pool).await?;
        return Ok(());
    }
    let role: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(pool)
        .await?;
    let missing = match missing_migrations(pool).await {
        Ok(missing) => missing,
        Err(e) => {
            return Err(match sqlstate(&e).as_deref() {
                Some("42P01") => SchemaError::Stale(format!(
                    "the database has no schema yet and role {role} may not create it: run \
                     `backup-provisioner migrate --grant-to {role}` as the owner role first"
                )),
                Some("42501") => SchemaError::Stale(format!(
                    "role {role} may not read the schema version: run \
                     `backup-provisioner migrate --grant-to {role}` as the owner role"
                )),
                _ => e.into(),
            });
        }
    };
    if missing.is_empty() {
        return Ok(());
    }
    Err(SchemaError::Stale(format!(
        "the schema lacks migration {} of this binary and role {role} may not apply it: run \
         `backup-provisioner migrate` as the owner role first",
        missing.join(", ")
    )))
}

/// Tables the runtime role may only read and append to (SELECT, INSERT). `job_events` is
/// written only by the triggers on `jobs` and `job_steps` (INSERT, as the role changing the
/// job); its rows go only with their job (ON DELETE CASCADE, run as the table's owner).
pub const APPEND_ONLY_TABLES: [&str; 2] = ["audit_events", "job_events"];

/// Why `migrate --grant-to` did not grant.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    /// The role cannot be the runtime role: a configuration error (`BP_RUNTIME_DB_ROLE`).
    #[error("{0}")]
    Role(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// Checks, before anything is migrated, that `role` can be the runtime role: it exists, is no
/// superuser (no privilege binds one), and neither is nor belongs to the role migrating (the
/// schema's objects' owner) or the owner of the database or the schema (an owner can drop them
/// with the audit log inside).
pub async fn check_runtime_role(pool: &PgPool, role: &str) -> Result<(), GrantError> {
    let row: Option<(bool, bool, bool)> = sqlx::query_as(
        "SELECT r.rolsuper,
                pg_has_role(r.oid, (SELECT oid FROM pg_roles WHERE rolname = current_user), 'MEMBER'),
                pg_has_role(r.oid, (SELECT nspowner FROM pg_namespace WHERE nspname = current_schema()), 'MEMBER')
                 OR pg_has_role(r.oid, (SELECT datdba FROM pg_database WHERE datname = current_database()), 'MEMBER')
           FROM pg_roles r WHERE r.rolname = $1",
    )
    .bind(role)
    .fetch_optional(pool)
    .await?;
    let refusal = match row {
        None => "does not exist: create it first (CREATE ROLE … LOGIN PASSWORD '…')",
        Some((true, _, _)) => "is a superuser, which no privilege binds: use an ordinary role",
        Some((_, true, _)) => {
            "is (or belongs to) the role that migrates: the runtime role must be another"
        }
        Some((_, _, true)) => {
            "owns (or belongs to the owner of) the database or its schema and could drop them \
             with the audit log: the runtime role must own nothing"
        }
        Some(_) => return Ok(()),
    };
    Err(GrantError::Role(format!("role '{role}' {refusal}")))
}

/// Grants the runtime role what the service needs, again on every call (tables a migration
/// added get their grants): USAGE on the schema; SELECT, INSERT, UPDATE and DELETE on every
/// table but the append-only ones ([`APPEND_ONLY_TABLES`]: SELECT and INSERT) and the migrations
/// table (SELECT); USAGE and SELECT on every sequence; and the same by default on tables and
/// sequences the migrating role creates later. Never TRUNCATE, REFERENCES or TRIGGER; ownership
/// (ALTER, DISABLE TRIGGER, DROP) stays with the migrating role.
pub async fn grant_runtime(pool: &PgPool, role: &str) -> Result<(), GrantError> {
    check_runtime_role(pool, role).await?;
    let schema: String = sqlx::query_scalar("SELECT current_schema()::text")
        .fetch_one(pool)
        .await?;
    let (schema, role) = (quote_ident(&schema), quote_ident(role));
    let append_only = APPEND_ONLY_TABLES
        .iter()
        .map(|table| format!("{schema}.{}", quote_ident(table)))
        .collect::<Vec<_>>()
        .join(", ");
    let grants = format!(
        "GRANT USAGE ON SCHEMA {schema} TO {role};
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {role};
         GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {schema} TO {role};
         REVOKE ALL ON {append_only}, {schema}._sqlx_migrations FROM {role};
         GRANT SELECT, INSERT ON {append_only} TO {role};
         GRANT SELECT ON {schema}._sqlx_migrations TO {role};
         ALTER DEFAULT PRIVILEGES IN SCHEMA {schema}
             GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {role};
         ALTER DEFAULT PRIVILEGES IN SCHEMA {schema} GRANT USAGE, SELECT ON SEQUENCES TO {role};"
    );
    let mut tx = pool.begin().await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(grants))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// `name` as a quoted SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn sqlstate(err: &sqlx::Error) -> Option<String> {
    err.as_database_error()
        .and_then(|db| db.code())
        .map(|code| code.into_owned())
}

/// Runs `work` only if this replica wins the session advisory lock `key` (`None` when another
/// holds it), then releases the lock. The lock's connection is closed instead of going back
/// to the pool should the unlock fail: pooled while still holding the session lock, no
/// replica could win it until the connection is recycled.
pub async fn with_advisory_lock<T, E, F, Fut>(
    db: &PgPool,
    key: i64,
    work: F,
) -> Result<Option<T>, E>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: From<sqlx::Error>,
{
    let mut lock = db.acquire().await?;
    let won: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(key)
        .fetch_one(&mut *lock)
        .await?;
    if !won {
        return Ok(None);
    }
    lock.close_on_drop();
    let result = work().await;
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(key)
        .execute(&mut *lock)
        .await?;
    result.map(Some)
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
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("bp_runtime"), "\"bp_runtime\"");
        assert_eq!(
            quote_ident("a\"; DROP TABLE x; --"),
            "\"a\"\"; DROP TABLE x; --\""
        );
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
