//! Two database roles: the owner migrates (`backup-provisioner migrate --grant-to <runtime>`),
//! the service runs as the runtime role, which may append to the audit log but not rewrite it
//! (UPDATE, DELETE, TRUNCATE, DISABLE TRIGGER and DROP fail on permissions, not on the trigger's
//! courtesy), and which refuses to start on a schema older than the binary instead of migrating.
//!
//! Roles are cluster-wide: every test makes its own pair (`bp_role_<unix seconds>_<random>_…`)
//! and drops it after its database.

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection};
use tokio::sync::OnceCell;

use crate::support::app::{
    HS256_SECRET, STALE_DATABASE_AGE, TestDb, fresh_database, postgres_base_url,
};
use crate::support::env::{Env, unique_name};

const ROLE_PREFIX: &str = "bp_role_";

/// A login role of the test's own, with a random password.
struct DbRole {
    name: String,
    password: String,
}

impl DbRole {
    /// A URL for `database` as this role.
    fn url(&self, database: &str) -> String {
        let mut url = url::Url::parse(&postgres_base_url()).expect("TEST_POSTGRES_URL");
        url.set_username(&self.name).unwrap();
        url.set_password(Some(&self.password)).unwrap();
        url.set_path(database);
        url.to_string()
    }
}

/// The owner and the runtime role of one test. Declare it before the test's database: it is
/// dropped after it (a role that owns a database or holds privileges in one cannot be dropped).
struct DbRoles {
    owner: DbRole,
    runtime: DbRole,
}

async fn admin() -> PgConnection {
    PgConnection::connect(&format!("{}/postgres", postgres_base_url()))
        .await
        .expect("connect to Postgres as its administrator")
}

impl DbRoles {
    async fn create() -> DbRoles {
        static SWEPT: OnceCell<()> = OnceCell::const_new();
        SWEPT.get_or_init(sweep_stale_roles).await;
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let random = &uuid::Uuid::new_v4().simple().to_string()[..12];
        let mut admin = admin().await;
        let role = |kind: &str| DbRole {
            name: format!("{ROLE_PREFIX}{unix}_{random}_{kind}"),
            password: uuid::Uuid::new_v4().simple().to_string(),
        };
        let (owner, runtime) = (role("owner"), role("runtime"));
        for role in [&owner, &runtime] {
            // Names and passwords are of our own making (letters, digits, '_').
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD '{}'",
                role.name, role.password
            )))
            .execute(&mut admin)
            .await
            .expect("create role");
        }
        let _ = admin.close().await;
        DbRoles { owner, runtime }
    }

    /// Makes the owner role the owner of `db` (and so, from Postgres 15 on, of its `public`
    /// schema), as an administrator would for a new installation.
    async fn own(&self, db: &TestDb) {
        let mut admin = admin().await;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "ALTER DATABASE {} OWNER TO {}",
            db.guard.name(),
            self.owner.name
        )))
        .execute(&mut admin)
        .await
        .expect("alter database owner");
        let _ = admin.close().await;
    }
}

impl Drop for DbRoles {
    fn drop(&mut self) {
        let names = format!("{}, {}", self.owner.name, self.runtime.name);
        let statement = format!("DROP ROLE IF EXISTS {names}");
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let mut admin = admin().await;
                sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
                    .execute(&mut admin)
                    .await
                    .map_err(|e| e.to_string())?;
                admin.close().await.map_err(|e| e.to_string())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("test roles {names}: could not drop them: {dropped:?}");
        }
    }
}

/// Drops test roles left by killed runs (their databases are swept by `fresh_database`); a role
/// still owning something is kept (the drop fails) until a later run.
async fn sweep_stale_roles() {
    let mut admin = admin().await;
    let names: Vec<String> =
        sqlx::query_scalar("SELECT rolname::text FROM pg_roles WHERE starts_with(rolname, $1)")
            .bind(ROLE_PREFIX)
            .fetch_all(&mut admin)
            .await
            .unwrap_or_default();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for name in names {
        let made = name[ROLE_PREFIX.len()..]
            .split('_')
            .next()
            .and_then(|secs| secs.parse::<u64>().ok());
        let ours = name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if ours && made.is_some_and(|made| now.saturating_sub(made) > STALE_DATABASE_AGE.as_secs())
        {
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP ROLE IF EXISTS {name}")))
                .execute(&mut admin)
                .await;
        }
    }
    let _ = admin.close().await;
}

fn binary(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_backup-provisioner"));
    command.args(args).env_clear().env("RUST_LOG", "off");
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("run backup-provisioner")
}

/// `backup-provisioner migrate --grant-to <runtime>` as the owner; panics unless it succeeds.
fn migrate_as_owner(roles: &DbRoles, db: &TestDb) {
    let owner_url = roles.owner.url(db.guard.name());
    let output = binary(
        &["migrate", "--grant-to", &roles.runtime.name],
        &[("BP_MIGRATION_DATABASE_URL", &owner_url)],
    );
    assert!(
        output.status.success(),
        "migrate as the owner: {:?} {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `statement` fails as `conn`'s role for lack of a privilege (SQLSTATE 42501 from the
/// permission system: "permission denied" or "must be owner"), not because of a trigger.
async fn assert_denied(conn: &mut PgConnection, statement: &str) {
    let err = sqlx::raw_sql(sqlx::AssertSqlSafe(statement.to_owned()))
        .execute(&mut *conn)
        .await
        .expect_err(statement);
    let db = err.as_database_error().expect("a database error");
    assert_eq!(db.code().as_deref(), Some("42501"), "{statement}: {db}");
    assert!(
        db.message().contains("permission denied") || db.message().contains("must be owner"),
        "{statement}: refused by the permission system, not the trigger: {db}"
    );
}

#[tokio::test]
async fn the_runtime_role_cannot_rewrite_the_audit_log() {
    let roles = DbRoles::create().await;
    let db = fresh_database().await;
    roles.own(&db).await;
    migrate_as_owner(&roles, &db);

    let mut runtime = PgConnection::connect(&roles.runtime.url(db.guard.name()))
        .await
        .expect("connect as the runtime role");
    // It appends (INSERT with the id sequence) and reads.
    sqlx::query("INSERT INTO audit_events (actor, action, outcome) VALUES ('t', 'test', 'ok')")
        .execute(&mut runtime)
        .await
        .expect("the runtime role appends to the audit log");
    for statement in [
        "UPDATE audit_events SET actor = 'someone else'",
        "DELETE FROM audit_events",
        "TRUNCATE audit_events",
        "ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_update_delete",
        "ALTER TABLE audit_events DISABLE TRIGGER ALL",
        "DROP TRIGGER audit_events_no_update_delete ON audit_events",
        "DROP TABLE audit_events",
        "ALTER TABLE audit_events RENAME TO audit_events_old",
        // Nor can it fake the schema version or change the schema.
        "DELETE FROM _sqlx_migrations",
        "TRUNCATE jobs",
        "DROP TABLE jobs",
        "DROP SCHEMA public CASCADE",
    ] {
        assert_denied(&mut runtime, statement).await;
    }
    let entries: Vec<(String, String)> = sqlx::query_as("SELECT actor, action FROM audit_events")
        .fetch_all(&mut runtime)
        .await
        .unwrap();
    assert_eq!(entries, vec![("t".to_owned(), "test".to_owned())]);
    // What it may do, in the catalogue's words.
    let audit: Vec<String> = sqlx::query_scalar(
        "SELECT privilege_type::text FROM information_schema.role_table_grants
          WHERE grantee = current_user AND table_name = 'audit_events' ORDER BY 1",
    )
    .fetch_all(&mut runtime)
    .await
    .unwrap();
    assert_eq!(audit, ["INSERT", "SELECT"]);
    let _ = runtime.close().await;
}

#[tokio::test]
async fn the_service_provisions_as_the_runtime_role() {
    let roles = DbRoles::create().await;
    let db = fresh_database().await;
    roles.own(&db).await;
    migrate_as_owner(&roles, &db);
    let url = roles.runtime.url(db.guard.name());
    let pool = PgPoolOptions::new()
        .max_connections(20)
        .connect(&url)
        .await
        .expect("connect as the runtime role");
    db.pool.close().await;
    let env = Env::builder(&["zitadel"])
        .database(TestDb {
            pool,
            url,
            guard: db.guard,
        })
        .start()
        .await;
    let role: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&env.app.db)
        .await
        .unwrap();
    assert_eq!(role, roles.runtime.name);

    let name = unique_name("rt");
    let body = json!({"name": name, "namespace": env.ns("zitadel")});
    let token = env.app.operator();
    let post = || {
        env.app
            .client
            .post(env.app.url("/v1/backup-repositories"))
            .bearer_auth(&token)
            .header("idempotency-key", format!("key-{name}"))
            .json(&body)
            .send()
    };
    let created = post().await.expect("create");
    assert_eq!(created.status(), 202);
    let replay = post().await.expect("replay");
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let created: serde_json::Value = created.json().await.unwrap();
    let job_id = created["job"]["id"].as_str().unwrap();
    let job = env.app.wait_for_job(job_id, Duration::from_secs(90)).await;
    assert_eq!(job["state"], "succeeded", "job: {job:#}");
    // Again: the stored steps are read and updated, the sealed material wiped.
    let job = env.reconcile(&name).await;
    assert_eq!(job["state"], "succeeded", "job: {job:#}");
    assert!(
        env.s3_conf("zitadel", &format!("holos-{name}-backups"))
            .await
            .is_some()
    );
    let sealed: i64 = sqlx::query_scalar("SELECT count(*) FROM secret_material")
        .fetch_one(&env.app.db)
        .await
        .unwrap();
    assert_eq!(
        sealed, 0,
        "the sealed material was wiped (DELETE as the runtime role)"
    );
    let audit: serde_json::Value = env
        .app
        .get(
            &format!("/v1/audit?repository={name}&limit=200"),
            &env.app.viewer(),
        )
        .await
        .json()
        .await
        .unwrap();
    assert!(audit["items"].as_array().unwrap().len() > 10, "{audit:#}");
    env.app.stop().await;
}

fn serve_as(url: &str) -> Output {
    binary(
        &["serve", "--workers", "0"],
        &[
            ("DATABASE_URL", url),
            ("BP_JWT_HS256_SECRET", HS256_SECRET),
            ("BP_LISTEN_ADDR", "127.0.0.1:0"),
        ],
    )
}

fn assert_refused_as_stale(output: &Output, mentions: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "stderr: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("backup-provisioner migrate"), "{stderr}");
    assert!(
        stderr.contains(mentions),
        "{stderr} should mention {mentions}"
    );
}

#[tokio::test]
async fn serve_as_the_runtime_role_refuses_a_stale_schema() {
    let roles = DbRoles::create().await;
    let db = fresh_database().await;
    roles.own(&db).await;
    let url = roles.runtime.url(db.guard.name());

    // Nothing migrated yet: the runtime role cannot migrate, so it does not try.
    assert_refused_as_stale(&serve_as(&url), "no schema");

    // One migration behind the binary, as after deploying a new version before its migrate:
    // the latest migration's row is set aside (its changes stay, so it cannot run again).
    migrate_as_owner(&roles, &db);
    let mut owner = PgConnection::connect(&roles.owner.url(db.guard.name()))
        .await
        .unwrap();
    sqlx::raw_sql(
        "CREATE TEMP TABLE latest AS SELECT * FROM _sqlx_migrations
          WHERE version = (SELECT max(version) FROM _sqlx_migrations)",
    )
    .execute(&mut owner)
    .await
    .unwrap();
    let latest: i64 = sqlx::query_scalar(
        "DELETE FROM _sqlx_migrations WHERE version IN (SELECT version FROM latest)
         RETURNING version",
    )
    .fetch_one(&mut owner)
    .await
    .unwrap();
    assert_refused_as_stale(&serve_as(&url), &latest.to_string());
    let versions: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&mut owner)
        .await
        .unwrap();
    let known = backup_provisioner::db::MIGRATOR.iter().count() as i64;
    assert_eq!(versions, known - 1, "serve did not migrate");

    // Once the schema is current the runtime role starts (and stops at once: the listen
    // address is taken).
    sqlx::raw_sql("INSERT INTO _sqlx_migrations SELECT * FROM latest")
        .execute(&mut owner)
        .await
        .unwrap();
    let _ = owner.close().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let output = binary(
        &["serve", "--workers", "0", "--listen-addr", &addr],
        &[
            ("DATABASE_URL", &url),
            ("BP_JWT_HS256_SECRET", HS256_SECRET),
        ],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("listen"),
        "it got as far as listening: {stderr}"
    );
}

#[tokio::test]
async fn migrate_refuses_a_runtime_role_that_cannot_be_one() {
    let roles = DbRoles::create().await;
    let db = fresh_database().await;
    roles.own(&db).await;
    let superuser: String =
        sqlx::query_scalar("SELECT rolname::text FROM pg_roles WHERE rolsuper LIMIT 1")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let owner_url = roles.owner.url(db.guard.name());
    for (role, says) in [
        ("bp_role_that_does_not_exist", "does not exist"),
        (superuser.as_str(), "superuser"),
        (roles.owner.name.as_str(), "the role that migrates"),
    ] {
        let output = binary(
            &["migrate", "--grant-to", role],
            &[("BP_MIGRATION_DATABASE_URL", &owner_url)],
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{role}: {stderr}");
        assert!(stderr.contains("BP_RUNTIME_DB_ROLE"), "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
    }
    let migrated: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations')::text")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(migrated, None, "nothing was migrated");
}
