//! The sender: next to the workers, sends due deliveries of the outbox, signed, and records
//! every attempt. Any number of senders may run (one per replica): each claims with
//! `FOR UPDATE SKIP LOCKED`, and a claim holds a delivery for longer than one attempt can take.

use std::time::{Duration, Instant};

use chrono::Utc;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use super::outbox::{self, Attempt, Claimed, Next};
use super::{AllowedHosts, SigningKey};
use crate::jobs::backoff;

/// Deliveries claimed (and sent concurrently) at a time.
const BATCH: i64 = 16;

/// How the sender behaves (`BP_WEBHOOK_*`).
#[derive(Debug, Clone)]
pub struct SenderSettings {
    /// Checked again before every attempt: a destination removed since the request is not sent.
    pub allowed: AllowedHosts,
    /// How long a receiver has to answer (connecting included).
    pub timeout: Duration,
    /// The first retry's delay; doubles per attempt (with jitter), capped at 10 minutes.
    pub retry_base: Duration,
    /// A delivery not delivered this long after the job ended has failed.
    pub retry_window: Duration,
    /// The timer that backs up `NOTIFY`.
    pub poll_interval: Duration,
}

pub struct Sender {
    db: PgPool,
    key: SigningKey,
    settings: SenderSettings,
    client: reqwest::Client,
}

impl Sender {
    pub fn new(db: PgPool, key: SigningKey, settings: SenderSettings) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            // A redirect could lead anywhere: a 3xx is a failed attempt like any non-2xx.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .user_agent(concat!("backup-provisioner/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("webhook HTTP client: {e}"))?;
        Ok(Sender {
            db,
            key,
            settings,
            client,
        })
    }

    /// Sends due deliveries until `shutdown` fires, woken by the outbox's `NOTIFY` and a timer.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut listener = self.listen().await;
        tracing::info!("webhook sender started");
        loop {
            self.send_due().await;
            let due = self.next_due().await;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(due) => {}
                note = wait_for_note(&mut listener) => if let Err(e) = note {
                    tracing::warn!(error = %e, "webhook notification listener failed; relying on the timer");
                    listener = None;
                },
            }
        }
    }

    async fn listen(&self) -> Option<PgListener> {
        let connected = async {
            let mut listener = PgListener::connect_with(&self.db).await?;
            listener.listen(outbox::CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        match connected.await {
            Ok(listener) => Some(listener),
            Err(e) => {
                tracing::warn!(error = %e, "webhook notifications unavailable; relying on the timer");
                None
            }
        }
    }

    async fn next_due(&self) -> Duration {
        let poll = self.settings.poll_interval;
        match outbox::next_due_in(&self.db).await {
            Ok(Some(due)) => due.max(Duration::from_millis(10)).min(poll),
            _ => poll,
        }
    }

    /// Claims and sends batches until none is due.
    async fn send_due(&self) {
        // Longer than one attempt can take: a live sender records before its hold ends.
        let hold = self.settings.timeout * 2 + Duration::from_secs(30);
        loop {
            let claimed = match outbox::claim_due(&self.db, BATCH, hold).await {
                Ok(claimed) if claimed.is_empty() => return,
                Ok(claimed) => claimed,
                Err(e) => {
                    tracing::warn!(error = %e, "claiming webhook deliveries failed");
                    return;
                }
            };
            futures::future::join_all(claimed.iter().map(|d| self.deliver(d))).await;
        }
    }

    /// One attempt at `delivery`, recorded.
    async fn deliver(&self, delivery: &Claimed) {
        let (attempt, next) = self.attempt(delivery).await;
        match &attempt.error {
            None => {
                tracing::info!(delivery = %delivery.id, attempt = delivery.attempts, "webhook delivered")
            }
            Some(error) => {
                tracing::warn!(delivery = %delivery.id, attempt = delivery.attempts, %error, ?next, "webhook attempt failed")
            }
        }
        if let Err(e) = outbox::record(&self.db, delivery, &attempt, next).await {
            tracing::warn!(delivery = %delivery.id, error = %e, "recording a webhook attempt failed; it is sent again");
        }
    }

    async fn attempt(&self, delivery: &Claimed) -> (Attempt, Next) {
        let attempted_at = Utc::now();
        let started = Instant::now();
        let sent = match self.settings.allowed.check(&delivery.url) {
            // Boxed: the HTTP client's futures are large, and a sender shares its thread.
            Ok(url) => Box::pin(self.post(url, delivery)).await,
            Err(why) => Err(Refusal::Destination(why)),
        };
        let status_code = match &sent {
            Ok(status) | Err(Refusal::Status(status)) => Some(*status),
            _ => None,
        };
        let next = match &sent {
            Ok(_) => Next::Delivered,
            Err(Refusal::Destination(_)) => Next::GiveUp,
            Err(_) => Next::Retry {
                delay: backoff::delay(self.settings.retry_base, delivery.attempts),
                window: self.settings.retry_window,
            },
        };
        let attempt = Attempt {
            attempted_at,
            duration: started.elapsed(),
            status_code,
            error: sent.err().map(|refusal| refusal.to_string()),
        };
        (attempt, next)
    }

    /// POSTs the delivery signed; the receiver's status when it is a 2xx.
    async fn post(&self, url: url::Url, delivery: &Claimed) -> Result<u16, Refusal> {
        let id = delivery.id.to_string();
        let timestamp = Utc::now().timestamp();
        let signature = self.key.sign(&id, timestamp, &delivery.body);
        let response = self
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(delivery.body.clone())
            .send()
            .await
            .map_err(|e| Refusal::Transport(describe(e.without_url(), self.settings.timeout)))?;
        let status = response.status();
        match status.is_success() {
            true => Ok(status.as_u16()),
            false => Err(Refusal::Status(status.as_u16())),
        }
    }
}

/// Why an attempt did not deliver.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("callback_url {0}; not sent")]
    Destination(String),
    #[error("{}", status_message(*.0))]
    Status(u16),
    #[error("{0}")]
    Transport(String),
}

fn status_message(status: u16) -> String {
    match status {
        300..=399 => format!(
            "the receiver answered HTTP {status}: redirects are not followed; answer 2xx at the \
             callback URL itself"
        ),
        _ => format!("the receiver answered HTTP {status}, not 2xx"),
    }
}

/// A transport error in a few words, without the URL (the delivery shows it).
fn describe(error: reqwest::Error, timeout: Duration) -> String {
    if error.is_timeout() {
        return format!(
            "no answer within {} (BP_WEBHOOK_TIMEOUT)",
            humantime::format_duration(timeout)
        );
    }
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}

/// The next notification, or forever without a listener (the timer wakes the loop).
async fn wait_for_note(listener: &mut Option<PgListener>) -> Result<(), sqlx::Error> {
    match listener {
        Some(listener) => listener.recv().await.map(drop),
        None => std::future::pending().await,
    }
}
