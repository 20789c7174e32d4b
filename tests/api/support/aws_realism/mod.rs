//! AWS realism layer (test-only): an HTTP/1.1 reverse proxy between the service's AWS clients
//! and moto that makes moto behave more like AWS, reproducibly (one seed per proxy):
//!
//! - **IAM eventual consistency**: an entity made through the proxy (CreatePolicy, CreateGroup,
//!   CreateUser, CreateAccessKey) stays invisible for [`AwsRealism::consistency_window`]: IAM
//!   requests naming it (UserName, GroupName, PolicyArn, AccessKeyId; Get*, List*, Attach*,
//!   AddUserToGroup, TagUser, CreateAccessKey, Delete*, ...) answer `NoSuchEntity` (404),
//!   List*/Get* answers drop the `<member>` blocks that name it, and requests signed with a new
//!   access key answer `InvalidAccessKeyId` (S3, 403) or `InvalidClientTokenId` (IAM, 403).
//!   The create call itself still reaches moto, so creating it again answers
//!   `EntityAlreadyExists`, as on AWS.
//! - **Lost responses**: a share of successful IAM Create* and S3 CreateBucket calls is executed
//!   by moto, but the client gets a connection reset (or a stall, then a reset) instead of the
//!   answer; the SDK retries and meets `EntityAlreadyExists` / `BucketAlreadyOwnedByYou` (or,
//!   for CreateAccessKey, makes a second key, as IAM would).
//! - **Faults**: a share of requests is answered, without reaching moto, with throttling (IAM
//!   `Throttling` 400, S3 `SlowDown` 503), `ServiceUnavailable` 503, a 500
//!   (IAM `ServiceFailure`, S3 `InternalError`) or a connection reset; a share is delayed.
//! - **Counting**: every request by operation (`iam:CreateUser`, `s3:PutObject`), as received
//!   (= SDK attempts, like `CallCounter`) and as forwarded to moto, plus every injection.
//!
//! Every random decision is drawn from a generator seeded with (seed, operation, subject,
//! how many times that operation was asked about that subject), so the draws do not depend on
//! how concurrent requests interleave: the same seed and the same names give the same faults.
//! (What happens inside the consistency window still depends on timing.) The seed is printed
//! when the proxy starts; `AWS_REALISM_SEED=<seed>` reruns a test with it unless the test
//! fixes its own.
//!
//! The proxy runs on its own thread and runtime, so it outlives the runtime of the
//! `#[tokio::test]` that started it; it stops when [`AwsProxy`] is dropped.

mod operation;
mod responses;
pub mod round_trips;
mod server;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use backup_provisioner::cloud::aws::{AwsClients, AwsSettings, CallCounter};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::moto::{Moto, TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY};

pub use operation::Operation;
pub use responses::Canned;
pub use round_trips::{Received, round_trip_chain, sequential_round_trips};

/// How a lost response is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostResponse {
    /// The connection is reset (RST) instead of answering.
    Reset,
    /// Nothing is sent for this long (set it past the client's attempt timeout), then the
    /// connection is reset.
    Stall(Duration),
}

/// Added latency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Latency {
    Fixed(Duration),
    /// Uniform between zero and this.
    UpTo(Duration),
}

/// A fault answered instead of forwarding a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    /// IAM `Throttling` (400), S3 `SlowDown` (503).
    Throttle,
    /// `ServiceUnavailable` (503).
    Unavailable,
    /// IAM `ServiceFailure` (500), S3 `InternalError` (500).
    ServerError,
    /// The connection is reset before the request is forwarded.
    Reset,
    /// The request is forwarded; a success is then lost (see [`LostResponse`]). Only for
    /// create calls; scripted with [`AwsProxy::inject_next`] or drawn with the lost-response
    /// rate.
    LoseResponse,
}

impl Fault {
    fn label(self) -> &'static str {
        match self {
            Fault::Throttle => "throttle",
            Fault::Unavailable => "unavailable",
            Fault::ServerError => "server-error",
            Fault::Reset => "reset",
            Fault::LoseResponse => "lost-response",
        }
    }
}

/// Relative weights of the faults drawn for [`AwsRealism::fault_rate`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultMix {
    pub throttle: u32,
    pub unavailable: u32,
    pub server_error: u32,
    pub reset: u32,
}

impl Default for FaultMix {
    /// Throttling 2, 503 1, 500 1, reset 1.
    fn default() -> Self {
        FaultMix {
            throttle: 2,
            unavailable: 1,
            server_error: 1,
            reset: 1,
        }
    }
}

impl FaultMix {
    /// Only this fault.
    pub fn only(fault: Fault) -> FaultMix {
        let mut mix = FaultMix {
            throttle: 0,
            unavailable: 0,
            server_error: 0,
            reset: 0,
        };
        match fault {
            Fault::Throttle => mix.throttle = 1,
            Fault::Unavailable => mix.unavailable = 1,
            Fault::ServerError => mix.server_error = 1,
            Fault::Reset => mix.reset = 1,
            Fault::LoseResponse => panic!("lost responses have their own rate"),
        }
        mix
    }

    fn pick(&self, draw: f64) -> Fault {
        let weights = [
            (Fault::Throttle, self.throttle),
            (Fault::Unavailable, self.unavailable),
            (Fault::ServerError, self.server_error),
            (Fault::Reset, self.reset),
        ];
        let total: u32 = weights.iter().map(|(_, w)| w).sum();
        let mut point = draw * f64::from(total.max(1));
        for (fault, weight) in weights {
            if point < f64::from(weight) {
                return fault;
            }
            point -= f64::from(weight);
        }
        Fault::Throttle
    }
}

/// The realism settings; `AwsRealism::builder()` is AWS as the issue describes it
/// (2 s consistency window, 10 % of create responses lost, no faults, no latency),
/// `AwsRealism::off()` a counting pass-through.
#[derive(Debug, Clone)]
pub struct AwsRealism {
    consistency_window: Duration,
    lost_response_rate: f64,
    lost_response: LostResponse,
    fault_rate: f64,
    fault_mix: FaultMix,
    latency_rate: f64,
    latency: Latency,
    seed: Option<u64>,
    /// The window hides new access keys only (new users, groups, policies are visible at once).
    window_for_keys_only: bool,
}

/// The default consistency window.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(2);
/// The default share of lost create responses.
pub const DEFAULT_LOST_RESPONSE_RATE: f64 = 0.1;

impl AwsRealism {
    pub fn builder() -> AwsRealism {
        AwsRealism {
            consistency_window: DEFAULT_WINDOW,
            lost_response_rate: DEFAULT_LOST_RESPONSE_RATE,
            lost_response: LostResponse::Reset,
            fault_rate: 0.0,
            fault_mix: FaultMix::default(),
            latency_rate: 0.0,
            latency: Latency::Fixed(Duration::ZERO),
            seed: None,
            window_for_keys_only: false,
        }
    }

    /// Pass-through: forwards everything unchanged and counts.
    pub fn off() -> AwsRealism {
        AwsRealism::builder()
            .consistency_window(Duration::ZERO)
            .lost_response_rate(0.0)
    }

    /// How long a new IAM entity or access key stays invisible (zero: never).
    pub fn consistency_window(mut self, window: Duration) -> Self {
        self.consistency_window = window;
        self
    }

    /// The consistency window hides new access keys only: new users, groups and policies are
    /// visible at once (what a credential check waits for, alone).
    pub fn window_for_keys_only(mut self) -> Self {
        self.window_for_keys_only = true;
        self
    }

    /// Share (0..=1) of successful create calls whose answer is lost.
    pub fn lost_response_rate(mut self, rate: f64) -> Self {
        self.lost_response_rate = rate;
        self
    }

    /// How an answer is lost (default [`LostResponse::Reset`]).
    pub fn lost_response(mut self, how: LostResponse) -> Self {
        self.lost_response = how;
        self
    }

    /// Share (0..=1) of requests answered with a fault from the mix instead of being forwarded.
    pub fn fault_rate(mut self, rate: f64) -> Self {
        self.fault_rate = rate;
        self
    }

    pub fn fault_mix(mut self, mix: FaultMix) -> Self {
        self.fault_mix = mix;
        self
    }

    /// Share (0..=1) of requests delayed by `latency` before they are handled.
    pub fn latency(mut self, rate: f64, latency: Latency) -> Self {
        self.latency_rate = rate;
        self.latency = latency;
        self
    }

    /// The seed of every random draw (default: `AWS_REALISM_SEED`, else random).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Starts the proxy in front of `moto`.
    pub fn start(self, moto: &Moto) -> AwsProxy {
        self.start_for(&moto.endpoint)
    }

    /// Starts the proxy in front of any endpoint (`http://host:port`).
    pub fn start_for(self, upstream: &str) -> AwsProxy {
        let seed = self.seed.unwrap_or_else(|| {
            std::env::var("AWS_REALISM_SEED")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(rand::random)
        });
        let shared = Arc::new(Shared {
            realism: self,
            seed,
            started: Instant::now(),
            state: Mutex::default(),
        });
        let (endpoint, shutdown) = server::spawn(upstream, shared.clone());
        eprintln!(
            "aws realism proxy {endpoint} -> {upstream}: seed {seed} (AWS_REALISM_SEED={seed} \
             repeats the draws), {:?}",
            shared.realism
        );
        AwsProxy {
            endpoint,
            seed,
            shared,
            _shutdown: shutdown,
        }
    }
}

/// What the proxy handler reads and writes.
pub(crate) struct Shared {
    realism: AwsRealism,
    seed: u64,
    started: Instant,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Visibility key (`user:NAME`, `arn:ARN`, `key:AKID`, ...) → when moto answered its creation.
    created: HashMap<String, Instant>,
    /// Access keys made through the proxy, in order.
    keys: Vec<String>,
    received: BTreeMap<String, u64>,
    forwarded: BTreeMap<String, u64>,
    /// `"<label> <service:Operation>"` → count.
    injected: BTreeMap<String, u64>,
    /// Draws per (operation, subject), the index of the next one.
    draws: HashMap<(String, String), u64>,
    rules: Vec<Rule>,
    scripted: Vec<(String, Fault)>,
    /// (since start, subject, what happened) for every injection and every answer of moto.
    journal: Vec<(Duration, String, String)>,
    /// Every request as received, in order.
    received_log: Vec<Received>,
    /// The sequence number of each entry of `received_log` (for [`Shared::answered`]).
    received_seq: Vec<u64>,
    next_seq: u64,
}

/// A canned answer for every matching request.
struct Rule {
    operation: String,
    subject: Option<String>,
    answer: Canned,
}

/// Random draws for one request.
pub(crate) struct Draws {
    /// Which request this is, for [`Shared::answered`].
    pub seq: u64,
    pub latency: Option<Duration>,
    pub fault: Option<Fault>,
    pub lose_response: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn window(&self) -> Duration {
        self.realism.consistency_window
    }

    pub(crate) fn lost_response(&self) -> LostResponse {
        self.realism.lost_response
    }

    /// Counts the request and draws what happens to it.
    pub(crate) fn receive(&self, op: &Operation) -> Draws {
        let key = op.key();
        let subject = op.subject();
        let mut parameters: Vec<String> = op
            .params
            .iter()
            .filter(|(k, _)| k != "Action" && k != "Version")
            .map(|(k, v)| format!("{k}={v}"))
            .chain(op.object.iter().map(|object| format!("object={object}")))
            .collect();
        parameters.sort();
        let mut state = self.lock();
        *state.received.entry(key.clone()).or_default() += 1;
        let seq = state.next_seq;
        state.next_seq += 1;
        state.received_seq.push(seq);
        state.received_log.push(Received {
            at: chrono::Utc::now(),
            done_at: None,
            operation: key.clone(),
            subject: subject.clone(),
            parameters: parameters.join("&"),
        });
        let index = {
            let n = state
                .draws
                .entry((key.clone(), subject.clone()))
                .or_default();
            *n += 1;
            *n
        };
        let scripted = state
            .scripted
            .iter()
            .position(|(operation, _)| matches_operation(operation, op))
            .map(|i| state.scripted.remove(i).1);
        drop(state);
        let mut rng = StdRng::seed_from_u64(fnv1a(&[
            &self.seed.to_le_bytes(),
            key.as_bytes(),
            subject.as_bytes(),
            &index.to_le_bytes(),
        ]));
        let r = &self.realism;
        let (u_latency, u_amount, u_fault, u_kind, u_lost): (f64, f64, f64, f64, f64) = (
            rng.random(),
            rng.random(),
            rng.random(),
            rng.random(),
            rng.random(),
        );
        let latency = (u_latency < r.latency_rate).then(|| match r.latency {
            Latency::Fixed(d) => d,
            Latency::UpTo(d) => d.mul_f64(u_amount),
        });
        let drawn_fault = (u_fault < r.fault_rate).then(|| r.fault_mix.pick(u_kind));
        let (fault, scripted_loss) = match scripted {
            Some(Fault::LoseResponse) => (drawn_fault, true),
            Some(fault) => (Some(fault), false),
            None => (drawn_fault, false),
        };
        Draws {
            seq,
            latency,
            fault,
            lose_response: op.is_create() && (scripted_loss || u_lost < r.lost_response_rate),
        }
    }

    /// Notes when the answer to request `seq` ended (or its connection was reset).
    pub(crate) fn answered(&self, seq: u64) {
        let mut state = self.lock();
        if let Some(i) = state.received_seq.iter().rposition(|s| *s == seq) {
            state.received_log[i].done_at = Some(chrono::Utc::now());
        }
    }

    pub(crate) fn count_forwarded(&self, op: &Operation) {
        *self.lock().forwarded.entry(op.key()).or_default() += 1;
    }

    pub(crate) fn count_injected(&self, label: &str, op: &Operation) {
        *self
            .lock()
            .injected
            .entry(format!("{label} {}", op.key()))
            .or_default() += 1;
        self.note(op, label);
    }

    /// Adds a journal line about `op`.
    pub(crate) fn note(&self, op: &Operation, what: &str) {
        let at = self.started.elapsed();
        let line = format!("{} {what}", op.key());
        self.lock().journal.push((at, op.subject(), line));
    }

    /// The canned answer of a rule matching `op`, if any.
    pub(crate) fn rule_for(&self, op: &Operation) -> Option<Canned> {
        let subject = op.subject();
        self.lock()
            .rules
            .iter()
            .find(|rule| {
                matches_operation(&rule.operation, op)
                    && rule.subject.as_ref().is_none_or(|s| *s == subject)
            })
            .map(|rule| rule.answer.clone())
    }

    /// Whether the entity under this visibility key was made less than the window ago.
    pub(crate) fn is_hidden(&self, key: &str) -> bool {
        self.hidden_check()(key)
    }

    /// A snapshot check for many keys (one lock).
    pub(crate) fn hidden_check(&self) -> impl Fn(&str) -> bool + use<> {
        let window = self.window();
        let now = Instant::now();
        let recent: HashMap<String, Instant> = if window.is_zero() {
            HashMap::new()
        } else {
            self.lock()
                .created
                .iter()
                .filter(|(_, t)| now.duration_since(**t) < window)
                .map(|(k, t)| (k.clone(), *t))
                .collect()
        };
        move |key: &str| recent.contains_key(key)
    }

    /// Records the entities a successful create made (from its parameters and its answer).
    pub(crate) fn record_created(&self, op: &Operation, body: &str) {
        if !op.is_iam() {
            return;
        }
        let now = Instant::now();
        let mut keys = Vec::new();
        let arn = responses::tag_value(body, "Arn");
        match op.name.as_str() {
            "CreateUser" | "CreateGroup" | "CreatePolicy" if !self.realism.window_for_keys_only => {
                let (kind, param) = match op.name.as_str() {
                    "CreateUser" => ("user", "UserName"),
                    "CreateGroup" => ("group", "GroupName"),
                    _ => ("policy", "PolicyName"),
                };
                if let Some(name) = op.param(param) {
                    keys.push(operation::entity_key(kind, name));
                }
                if let Some(arn) = arn {
                    keys.push(operation::entity_key("arn", arn));
                }
            }
            "CreateAccessKey" => {
                if let Some(id) = responses::tag_value(body, "AccessKeyId") {
                    keys.push(operation::entity_key("key", id));
                    self.lock().keys.push(id.to_owned());
                }
            }
            _ => {}
        }
        let mut state = self.lock();
        for key in keys {
            state.created.insert(key, now);
        }
    }
}

fn matches_operation(pattern: &str, op: &Operation) -> bool {
    pattern == op.name || pattern == op.key()
}

/// FNV-1a over the parts (with a separator), stable across Rust releases.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.iter().chain(std::iter::once(&0xffu8)) {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

/// A running proxy; stops when dropped.
pub struct AwsProxy {
    /// `http://127.0.0.1:<port>`: point AWS clients here instead of at moto.
    pub endpoint: String,
    /// The seed of this proxy's draws.
    pub seed: u64,
    shared: Arc<Shared>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl AwsProxy {
    /// SDK clients through the proxy with moto's `test`/`test` credentials.
    pub async fn clients(&self, region: &str, counter: Option<CallCounter>) -> AwsClients {
        self.clients_as(region, counter, TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY)
            .await
    }

    /// SDK clients through the proxy signing with the given key.
    pub async fn clients_as(
        &self,
        region: &str,
        counter: Option<CallCounter>,
        access_key_id: &str,
        secret: &str,
    ) -> AwsClients {
        super::moto::clients_at(&self.endpoint, region, counter, access_key_id, secret).await
    }

    /// The same clients (credentials, counter, region) pointed at the proxy.
    pub fn reroute(&self, clients: AwsClients) -> AwsClients {
        let settings = AwsSettings {
            endpoint_url: Some(self.endpoint.clone()),
            region: clients.sdk_config.region().map(|r| r.as_ref().to_owned()),
        };
        let config = clients
            .sdk_config
            .to_builder()
            .endpoint_url(self.endpoint.clone())
            .build();
        AwsClients::from_sdk_config(config, &settings, clients.counter().cloned())
    }

    /// Every request received, by `service:Operation` (each SDK attempt counts).
    pub fn calls(&self) -> BTreeMap<String, u64> {
        self.shared.lock().received.clone()
    }

    /// Requests received for an operation: `"CreateAccessKey"` (any service) or
    /// `"iam:CreateAccessKey"`.
    pub fn count(&self, operation: &str) -> u64 {
        sum_matching(&self.calls(), operation)
    }

    /// Requests that reached moto, by `service:Operation`.
    pub fn forwarded_calls(&self) -> BTreeMap<String, u64> {
        self.shared.lock().forwarded.clone()
    }

    /// Requests of an operation that reached moto.
    pub fn forwarded(&self, operation: &str) -> u64 {
        sum_matching(&self.forwarded_calls(), operation)
    }

    pub fn total(&self) -> u64 {
        self.calls().values().sum()
    }

    /// Calls that may change state (see `CallCounter::is_mutating`).
    pub fn mutating(&self) -> BTreeMap<String, u64> {
        filter_calls(self.calls(), true)
    }

    pub fn reads(&self) -> BTreeMap<String, u64> {
        filter_calls(self.calls(), false)
    }

    pub fn mutating_count(&self) -> u64 {
        self.mutating().values().sum()
    }

    pub fn read_count(&self) -> u64 {
        self.reads().values().sum()
    }

    /// What the proxy did to requests: `"throttle iam:GetUser"`, `"lost-response
    /// iam:CreateUser"`, `"hidden iam:AddUserToGroup"` (NoSuchEntity inside the window),
    /// `"hidden-member iam:ListPolicies"` (members dropped), `"invalid-key s3:PutObject"`,
    /// `"latency ..."`, `"canned ..."`, `"upstream-error ..."`.
    pub fn injected(&self) -> BTreeMap<String, u64> {
        self.shared.lock().injected.clone()
    }

    /// Injections whose label is `label` (`"throttle"`, `"lost-response"`, `"hidden"`, ...).
    pub fn injected_count(&self, label: &str) -> u64 {
        self.injected()
            .iter()
            .filter(|(k, _)| k.split(' ').next() == Some(label))
            .map(|(_, n)| n)
            .sum()
    }

    /// Access key ids made through the proxy (moto answered CreateAccessKey), in order.
    pub fn access_keys_created(&self) -> Vec<String> {
        self.shared.lock().keys.clone()
    }

    /// Every request received so far, oldest first, with when it came.
    pub fn received(&self) -> Vec<Received> {
        self.shared.lock().received_log.clone()
    }

    /// The most requests received within any `window` (sliding: the windows starting at each
    /// request; a request exactly `window` after the first is in the next one).
    pub fn busiest(&self, window: Duration) -> usize {
        let at: Vec<_> = self.received().iter().map(|r| r.at).collect();
        let window = chrono::Duration::from_std(window).expect("window");
        let mut first = 0;
        let mut busiest = 0;
        for last in 0..at.len() {
            while at[last] - at[first] >= window {
                first += 1;
            }
            busiest = busiest.max(last - first + 1);
        }
        busiest
    }

    /// Forgets every count, injection and received request (not the creation times).
    pub fn reset_counts(&self) {
        let mut state = self.shared.lock();
        state.received.clear();
        state.received_log.clear();
        state.received_seq.clear();
        state.forwarded.clear();
        state.injected.clear();
    }

    /// Answers every request of `operation` (about `subject`: bucket, or IAM entity name) with
    /// `answer` instead of forwarding it, after the drawn faults.
    pub fn answer(&self, operation: &str, subject: Option<&str>, answer: Canned) {
        self.shared.lock().rules.push(Rule {
            operation: operation.to_owned(),
            subject: subject.map(str::to_owned),
            answer,
        });
    }

    /// Forgets every rule set by [`Self::answer`]: requests are forwarded again.
    pub fn clear_answers(&self) {
        self.shared.lock().rules.clear();
    }

    /// The next request of `operation` gets `fault` (in addition to the drawn ones).
    pub fn inject_next(&self, operation: &str, fault: Fault) {
        self.shared
            .lock()
            .scripted
            .push((operation.to_owned(), fault));
    }

    /// Whether the entity is still invisible: `kind` is `user`, `group`, `policy`, `arn`, `key`.
    pub fn is_hidden(&self, kind: &str, name: &str) -> bool {
        self.shared.is_hidden(&operation::entity_key(kind, name))
    }

    /// What happened to the requests about `subject` (an IAM entity name or a bucket), in
    /// order: `+1.234s iam:CreateUser moto 200`, `+1.240s iam:CreateUser lost-response`, ...
    pub fn journal(&self, subject: &str) -> Vec<String> {
        self.shared
            .lock()
            .journal
            .iter()
            .filter(|(_, s, _)| s == subject)
            .map(|(at, _, line)| format!("+{:.3}s {line}", at.as_secs_f64()))
            .collect()
    }

    /// Seed, calls and injections, for a failure message.
    pub fn summary(&self) -> String {
        format!(
            "seed {} (AWS_REALISM_SEED={} repeats the draws); {} calls ({} mutating, {} reads), \
             {} forwarded to moto; injected {:?}; calls {:?}",
            self.seed,
            self.seed,
            self.total(),
            self.mutating_count(),
            self.read_count(),
            self.forwarded_calls().values().sum::<u64>(),
            self.injected(),
            self.calls()
        )
    }
}

fn sum_matching(calls: &BTreeMap<String, u64>, operation: &str) -> u64 {
    calls
        .iter()
        .filter(|(key, _)| {
            *key == operation
                || key
                    .split_once(':')
                    .is_some_and(|(_, name)| name == operation)
        })
        .map(|(_, n)| n)
        .sum()
}

fn filter_calls(calls: BTreeMap<String, u64>, mutating: bool) -> BTreeMap<String, u64> {
    calls
        .into_iter()
        .filter(|(name, _)| CallCounter::is_mutating(name) == mutating)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fault_mix_follows_its_weights() {
        let mix = FaultMix::default();
        assert_eq!(mix.pick(0.0), Fault::Throttle);
        assert_eq!(mix.pick(0.39), Fault::Throttle);
        assert_eq!(mix.pick(0.41), Fault::Unavailable);
        assert_eq!(mix.pick(0.61), Fault::ServerError);
        assert_eq!(mix.pick(0.99), Fault::Reset);
        assert_eq!(FaultMix::only(Fault::Reset).pick(0.0), Fault::Reset);
    }

    #[test]
    fn counts_match_by_name_or_key() {
        let calls = BTreeMap::from([("iam:CreateUser".to_owned(), 2), ("s3:PutObject".into(), 1)]);
        assert_eq!(sum_matching(&calls, "CreateUser"), 2);
        assert_eq!(sum_matching(&calls, "iam:CreateUser"), 2);
        assert_eq!(sum_matching(&calls, "User"), 0);
    }
}
