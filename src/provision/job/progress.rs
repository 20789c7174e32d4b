//! What the concurrent steps of one provisioning attempt wait for from each other: milestones
//! inside a step (the policy's ARN is known, the group exists, the user exists), which let the
//! next call start before the step that made it has recorded, and steps settled (recorded as
//! succeeded or failed), which a step waits for before recording its own success where the
//! job's order of records matters (policy → group → user; the key's proof after all of them).

use std::collections::{HashMap, HashSet};

use tokio::sync::watch;

#[derive(Default)]
struct State {
    /// (barrier, step) for every step that reached a barrier.
    arrived: HashSet<(&'static str, &'static str)>,
    /// Every settled step, and whether it succeeded.
    settled: HashMap<&'static str, bool>,
    /// `None`: the step that was to reach it failed first.
    reached: HashMap<&'static str, Option<String>>,
}

/// Shared by the steps of one attempt.
pub struct Progress {
    state: watch::Sender<State>,
}

impl Progress {
    pub fn new() -> Self {
        Progress {
            state: watch::Sender::new(State::default()),
        }
    }

    /// `step` reached `barrier`: its next call is ready to go.
    pub fn arrive(&self, barrier: &'static str, step: &'static str) {
        self.state.send_modify(|s| {
            s.arrived.insert((barrier, step));
        });
    }

    /// Waits until every step of `steps` reached `barrier` or is settled: independent calls of
    /// several steps then go out together, as one wave, instead of each after its own step's
    /// bookkeeping or its own inputs (a wave that straggles costs sequential round trips).
    pub async fn gather<const N: usize>(&self, barrier: &'static str, steps: [&'static str; N]) {
        let mut seen = self.state.subscribe();
        let _ = seen
            .wait_for(|s| {
                steps.iter().all(|step| {
                    s.arrived.contains(&(barrier, step)) || s.settled.contains_key(step)
                })
            })
            .await;
    }

    /// The step is recorded (`succeeded`: as a success), or will never run in this attempt.
    pub fn settle(&self, step: &'static str, succeeded: bool) {
        self.state.send_modify(|s| {
            s.settled.entry(step).or_insert(succeeded);
        });
    }

    /// `milestone` is reached with `value` (the first report wins).
    pub fn reach(&self, milestone: &'static str, value: String) {
        self.state.send_modify(|s| {
            s.reached.entry(milestone).or_insert(Some(value));
        });
    }

    /// `milestone` is reached (with no value) when `reached`, else missed (unless it already
    /// was either).
    pub fn conclude(&self, milestone: &'static str, reached: bool) {
        match reached {
            true => self.reach(milestone, String::new()),
            false => self.miss(milestone),
        }
    }

    /// `milestone` will not be reached in this attempt (unless it already was).
    pub fn miss(&self, milestone: &'static str) {
        self.state.send_modify(|s| {
            s.reached.entry(milestone).or_insert(None);
        });
    }

    /// Waits until every step of `steps` is settled.
    pub async fn settled<const N: usize>(&self, steps: [&'static str; N]) {
        self.succeeded(steps).await;
    }

    /// Waits until every step of `steps` is settled: whether all of them succeeded.
    pub async fn succeeded<const N: usize>(&self, steps: [&'static str; N]) -> bool {
        let mut seen = self.state.subscribe();
        // The sender lives as long as `self`: the wait ends when the condition holds.
        let state = seen
            .wait_for(|s| steps.iter().all(|step| s.settled.contains_key(step)))
            .await;
        state.is_ok_and(|s| steps.iter().all(|step| s.settled.get(step) == Some(&true)))
    }

    /// Waits for `milestone`: its value, or `None` when it was missed.
    pub async fn reached(&self, milestone: &'static str) -> Option<String> {
        let mut seen = self.state.subscribe();
        let state = seen.wait_for(|s| s.reached.contains_key(milestone)).await;
        state
            .ok()
            .and_then(|s| s.reached.get(milestone).cloned().flatten())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_end_when_reached_missed_or_settled() {
        let progress = Progress::new();
        let (reached, missed, settled, succeeded, failed, _) = tokio::join!(
            progress.reached("arn"),
            progress.reached("user"),
            progress.settled(["policy", "group"]),
            progress.succeeded(["policy"]),
            progress.succeeded(["policy", "group"]),
            async {
                progress.reach("arn", "A".into());
                progress.reach("arn", "B".into());
                progress.miss("user");
                progress.settle("policy", true);
                progress.settle("group", false);
                progress.settle("group", true);
            }
        );
        assert_eq!((reached.as_deref(), missed), (Some("A"), None));
        assert_eq!((succeeded, failed), (true, false), "the first settle wins");
        settled
    }
}
