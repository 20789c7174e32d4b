//! Requests as the realism proxy saw them, and the length of the longest chain of them that
//! ran one after another: the sequential round trips a piece of work cost, whatever its total
//! number of calls. Free of test-only imports so that `benches/` can include it with `#[path]`.

use backup_provisioner::cloud::aws::CallCounter;

/// One request as the proxy received it (each SDK attempt is one), with the wall-clock times
/// of its arrival and of the end of its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub at: chrono::DateTime<chrono::Utc>,
    /// When the answer was handed back (or the connection reset); `None` while in flight, or
    /// for a request whose answer never came.
    pub done_at: Option<chrono::DateTime<chrono::Utc>>,
    /// `service:Operation`
    pub operation: String,
    /// The entity or bucket it is about (see `Operation::subject`).
    pub subject: String,
    /// Its parameters but `Action` and `Version`, and an S3 request's object key as `object`,
    /// sorted, as `k=v&k=v`: two requests with the same operation, subject and parameters ask
    /// for the same change.
    pub parameters: String,
}

impl Received {
    /// See `CallCounter::is_mutating`.
    pub fn is_mutating(&self) -> bool {
        CallCounter::is_mutating(&self.operation)
    }
}

/// The longest chain of requests each received after the previous one's answer ended: the
/// most pairwise non-overlapping request intervals (greedy by earliest end, which is optimal
/// for interval scheduling). A request without an end counts as ending when it arrived.
pub fn sequential_round_trips(received: &[Received]) -> usize {
    round_trip_chain(received).len()
}

/// The requests of one longest chain (see [`sequential_round_trips`]), in order, as
/// `service:Operation` names: what a failure message shows.
pub fn round_trip_chain(received: &[Received]) -> Vec<String> {
    let mut intervals: Vec<_> = received
        .iter()
        .map(|r| (r.at, r.done_at.unwrap_or(r.at).max(r.at), &r.operation))
        .collect();
    intervals.sort_by_key(|(start, end, _)| (*end, *start));
    let mut chain = Vec::new();
    let mut last_end = None;
    for (start, end, operation) in intervals {
        if last_end.is_none_or(|last| start > last) {
            chain.push(operation.clone());
            last_end = Some(end);
        }
    }
    chain
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(operation: &str, start_ms: i64, end_ms: i64) -> Received {
        let zero = chrono::DateTime::<chrono::Utc>::UNIX_EPOCH;
        Received {
            at: zero + chrono::Duration::milliseconds(start_ms),
            done_at: Some(zero + chrono::Duration::milliseconds(end_ms)),
            operation: operation.to_owned(),
            subject: String::new(),
            parameters: String::new(),
        }
    }

    #[test]
    fn overlapping_requests_are_one_round_trip() {
        let wave = [
            request("a", 0, 20),
            request("b", 1, 22),
            request("c", 2, 21),
        ];
        assert_eq!(sequential_round_trips(&wave), 1);
        assert_eq!(sequential_round_trips(&[]), 0);
    }

    #[test]
    fn a_chain_counts_each_request_after_the_previous_answer() {
        let requests = [
            request("a", 0, 20),
            request("b", 1, 40),
            request("c", 21, 41),
            request("d", 42, 60),
        ];
        assert_eq!(round_trip_chain(&requests), ["a", "c", "d"]);
    }
}
