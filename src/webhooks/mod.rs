//! Signed webhooks (issue 13 item 2): a request that starts a job may name a `callback_url`;
//! when the job ends, the receiver gets one event, signed per the Standard Webhooks
//! specification.
//!
//! - `destinations`: what a `callback_url` may be (an absolute `https` URL whose host is in
//!   `BP_WEBHOOK_ALLOWED_HOSTS`, no user info), checked when the request arrives and again
//!   before every attempt;
//! - the outbox (`outbox`): a trigger on `jobs` (migration `20261203000010`) writes a delivery
//!   in the transaction that ends the job, whoever ends it (a worker, a cancel, the rescuer),
//!   so a job's end and its event cannot part;
//! - `sender`: next to the workers, claims due deliveries (`FOR UPDATE SKIP LOCKED`, woken by
//!   `NOTIFY bp_webhooks` and a timer), POSTs each signed (`signature`) without following
//!   redirects, and retries anything but a 2xx with exponential backoff until
//!   `BP_WEBHOOK_RETRY_WINDOW` has passed, recording every attempt.
//!
//! Delivery is at least once: a sender that dies after the receiver answered sends again, with
//! the same `webhook-id`, which receivers use to drop duplicates.

pub mod destinations;
pub mod outbox;
pub mod sender;
pub mod signature;

pub use destinations::{AllowedHosts, CallbackPolicy};
pub use sender::{Sender, SenderSettings};
pub use signature::SigningKey;
