//! The harness itself: the call counter and a private moto.

use std::time::Duration;

use backup_provisioner::provision::bucket;

use crate::support::moto::Moto;

use super::{EU, Env, unique};

#[tokio::test]
async fn call_counter_splits_mutating_from_reads() {
    let env = Env::new(EU).await;
    let name = unique("counter");
    env.iam()
        .create_group()
        .group_name(&name)
        .send()
        .await
        .unwrap();
    env.iam()
        .get_group()
        .group_name(&name)
        .send()
        .await
        .unwrap();
    env.iam()
        .get_group()
        .group_name(&name)
        .send()
        .await
        .unwrap();
    env.s3(EU).list_buckets().send().await.unwrap();
    let snapshot = env.counter.snapshot();
    assert_eq!(snapshot.get("iam:CreateGroup"), Some(&1));
    assert_eq!(snapshot.get("iam:GetGroup"), Some(&2));
    assert_eq!(snapshot.get("s3:ListBuckets"), Some(&1));
    assert_eq!(env.counter.mutating_count(), 1);
    assert_eq!(env.counter.read_count(), 3);
    env.counter.reset();
    assert!(env.counter.snapshot().is_empty());
}

#[tokio::test]
async fn private_moto_resets_and_stops_on_drop() {
    let moto = Moto::start();
    let clients = moto.clients(EU, None).await;
    let s3 = clients.s3_for_region(EU);
    let name = unique("reset");
    bucket::ensure(&s3, &name, EU, "zitadel").await.unwrap();
    moto.reset().await;
    assert!(
        s3.head_bucket().bucket(&name).send().await.is_err(),
        "reset wipes buckets"
    );
    assert!(moto.log().contains("PUT /"), "moto's log is captured");

    let port = moto.port;
    drop(moto);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    assert!(
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err(),
        "moto stopped"
    );
}
