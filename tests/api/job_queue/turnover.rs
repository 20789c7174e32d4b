//! A slot's end and its next job in one statement (`queue::finish_and_claim`, what the worker
//! pool's turnover sends under load).

use std::collections::BTreeSet;
use std::time::Duration;

use backup_provisioner::jobs::queue::{self, Ending, Finish};
use uuid::Uuid;

use crate::support::app::TestDb;
use crate::support::test_jobs::{self as tj, StepSpec};

use super::setup;

const LEASE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn one_statement_records_ends_and_claims_only_jobs_queued_before_it() {
    let TestDb {
        pool: db,
        guard: _guard,
        ..
    } = setup().await;
    let first = tj::enqueue(&db, vec![StepSpec::new("a")], 3).await;
    let running = queue::claim(&db, &[tj::KIND], "slot", LEASE)
        .await
        .unwrap()
        .expect("the first job is claimed");
    assert_eq!(running.id, first);
    let waiting: BTreeSet<Uuid> = [
        tj::enqueue(&db, vec![StepSpec::new("a")], 3).await,
        tj::enqueue(&db, vec![StepSpec::new("a")], 3).await,
    ]
    .into();

    // The first job's attempt ends in a retry due at once; a second ending carries a token
    // that holds no lease (a fenced worker's).
    let retry_now = Finish::Retry {
        error: "try again",
        delay: Duration::ZERO,
    };
    let endings = [
        Ending::new(first, running.lease_token.unwrap(), retry_now),
        Ending::new(first, Uuid::new_v4(), Finish::Succeeded),
    ];
    let claims = (&[tj::KIND][..], "slot", LEASE);
    let (held, claimed) = queue::finish_and_claim(&db, &endings, claims, 5)
        .await
        .unwrap();

    assert_eq!(held, vec![first], "only the lease holder's end is recorded");
    let claimed_ids: BTreeSet<Uuid> = claimed.iter().map(|job| job.id).collect();
    assert_eq!(
        claimed_ids, waiting,
        "the statement claims the jobs that were waiting, not the one it queued again"
    );
    for job in &claimed {
        assert_eq!((job.state.as_str(), job.attempts), ("running", 1));
        assert!(job.lease_token.is_some() && job.lease_expires_at.is_some());
    }
    assert_ne!(claimed[0].lease_token, claimed[1].lease_token);
    let again = tj::job(&db, first).await;
    assert_eq!(
        (again.state.as_str(), again.last_error.as_deref()),
        ("queued", Some("try again"))
    );

    // The retry is claimable by the next statement; nothing else is left.
    let (held, claimed) = queue::finish_and_claim(&db, &[], claims, 5).await.unwrap();
    assert!(held.is_empty());
    assert_eq!(
        claimed
            .iter()
            .map(|job| (job.id, job.attempts))
            .collect::<Vec<_>>(),
        vec![(first, 2)]
    );
}
