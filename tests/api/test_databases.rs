//! The harness's own promise about Postgres: every test database is dropped when its test ends,
//! pass or fail, and stale ones left by killed runs are swept away.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::{Connection, PgConnection};

use crate::support::app::{
    DATABASE_PREFIX, DatabaseGuard, database_created_at, eventually, fresh_database,
    new_database_name, postgres_base_url, sweep_stale_databases,
};

const DEADLINE: Duration = Duration::from_secs(10);

async fn admin() -> PgConnection {
    PgConnection::connect(&format!("{}/postgres", postgres_base_url()))
        .await
        .expect("connect to Postgres")
}

async fn exists(name: &str) -> bool {
    let mut admin = admin().await;
    let found: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&mut admin)
            .await
            .expect("query pg_database");
    let _ = admin.close().await;
    found
}

async fn gone(name: &str) {
    eventually(
        DEADLINE,
        &format!("database {name} to be dropped"),
        || async { (!exists(name).await).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn dropping_the_guard_drops_the_database() {
    let db = fresh_database().await;
    let name = db.guard.name().to_owned();
    assert!(name.starts_with(DATABASE_PREFIX), "{name}");
    // An open connection does not keep it alive: the drop is forced.
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(one, 1);
    assert!(exists(&name).await);
    drop(db);
    gone(&name).await;
}

#[tokio::test]
async fn a_failing_test_drops_its_database_too() {
    let (name_tx, name_rx) = tokio::sync::oneshot::channel();
    let failing = tokio::spawn(async move {
        let db = fresh_database().await;
        name_tx.send(db.guard.name().to_owned()).unwrap();
        panic!("deliberate failure while holding {}", db.url);
    });
    let error = failing.await.expect_err("the task panicked");
    assert!(error.is_panic());
    let name = name_rx.await.expect("the task sent its database's name");
    gone(&name).await;
}

#[tokio::test]
async fn the_sweep_drops_stale_idle_databases_and_keeps_recent_ones() {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let recent = new_database_name();
    let random = &uuid::Uuid::new_v4().simple().to_string()[..12];
    let stale = format!("{DATABASE_PREFIX}{}_{random}", now - 2 * 3600);
    assert_eq!(database_created_at(&stale), Some(now - 2 * 3600));
    assert!(database_created_at(&recent).is_some_and(|t| t >= now));
    assert_eq!(
        database_created_at("bp_test_0123456789abcdef0123456789abcdef"),
        None
    );
    let mut admin = admin().await;
    let mut guards = Vec::new();
    for name in [&recent, &stale] {
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("create database");
        guards.push(DatabaseGuard::new(name.clone()));
    }
    let _ = admin.close().await;

    let dropped = sweep_stale_databases(Duration::from_secs(3600))
        .await
        .expect("sweep");
    assert!(dropped.contains(&stale), "{dropped:?}");
    assert!(!dropped.contains(&recent), "{dropped:?}");
    gone(&stale).await;
    assert!(exists(&recent).await, "a recent database is kept");
    drop(guards);
    gone(&recent).await;
}
