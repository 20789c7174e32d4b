//! What the concurrent steps of one provisioning attempt wait for from each other: milestones
//! inside a step (the policy's ARN is known, the group exists, the user exists), which let the
//! next call start before the step that made it has recorded, and steps settled (recorded as
//! succeeded or failed), which a step waits for before recording its own success, so that the
//! steps are recorded in the job's order even though their calls overlap.

use std::collections::{HashMap, HashSet};

use tokio::sync::watch;

#[derive(Default)]
struct State {
    /// (barrier, step) for every step that reached a barrier.
    arrived: HashSet<(&'static str, &'static str)>,
    settled: HashSet<&'static str>,
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
                steps
                    .iter()
                    .all(|step| s.arrived.contains(&(barrier, step)) || s.settled.contains(step))
            })
            .await;
    }

    /// The step is recorded (or will never run in this attempt).
    pub fn settle(&self, step: &'static str) {
        self.state.send_modify(|s| {
            s.settled.insert(step);
        });
    }

    /// `milestone` is reached with `value` (the first report wins).
    pub fn reach(&self, milestone: &'static str, value: String) {
        self.state.send_modify(|s| {
            s.reached.entry(milestone).or_insert(Some(value));
        });
    }

    /// `milestone` will not be reached in this attempt (unless it already was).
    pub fn miss(&self, milestone: &'static str) {
        self.state.send_modify(|s| {
            s.reached.entry(milestone).or_insert(None);
        });
    }

    /// Waits until every step of `steps` is settled.
    pub async fn settled<const N: usize>(&self, steps: [&'static str; N]) {
        let mut seen = self.state.subscribe();
        // The sender lives as long as `self`: the wait ends when the condition holds.
        let _ = seen
            .wait_for(|s| steps.iter().all(|step| s.settled.contains(step)))
            .await;
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
        let (reached, missed, settled, _) = tokio::join!(
            progress.reached("arn"),
            progress.reached("user"),
            progress.settled(["policy", "group"]),
            async {
                progress.reach("arn", "A".into());
                progress.reach("arn", "B".into());
                progress.miss("user");
                progress.settle("policy");
                progress.settle("group");
            }
        );
        assert_eq!((reached.as_deref(), missed), (Some("A"), None));
        settled
    }
}
