//! The HTTP/1.1 server: our own accept loop over hyper, because `axum::serve` has none of the
//! knobs a public listener needs.
//!
//! - **Connection limit** (`BP_MAX_CONNECTIONS`): a connection is accepted only with a permit;
//!   beyond the limit, clients wait in the listen backlog until a connection ends.
//! - **Header-read timeout** (`BP_HEADER_READ_TIMEOUT`): a client that has not sent a whole
//!   request head within it is disconnected. hyper starts the same timer whenever it waits for
//!   a request head, so an idle keep-alive connection is closed after it too.
//! - **Head size** (`BP_MAX_HEADER_BYTES`, at most 100 headers): a larger head is answered 431.
//! - **hyper's own answers** (400 for an unparsable request, 431) are problem+json
//!   ([`super::raw_answers`]).
//!
//! HTTP/1.1 only: hyper-util's auto (HTTP/2 prior knowledge) builder first reads the
//! connection preface without any timeout, so a client that sends nothing would be held
//! forever. Graceful shutdown: on the token, accepting stops, idle connections close, requests
//! in flight finish, and `serve` returns once every connection has ended.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::raw_answers::ProblemIo;

/// Limits on connections and request heads, from configuration.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    pub max_header_bytes: usize,
}

/// hyper refuses a head with more headers than this (431).
pub const MAX_HEADERS: usize = 100;

/// Serves `app` on `listener` until `shutdown` fires, then drains connections and returns.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: &ConnectionLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let builder = Arc::new(http1_builder(limits));
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let connections = TaskTracker::new();
    while let Some((stream, permit)) = next_connection(&listener, &permits, &shutdown).await {
        connections.spawn(serve_connection(
            builder.clone(),
            stream,
            app.clone(),
            shutdown.clone(),
            permit,
        ));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}

fn http1_builder(limits: &ConnectionLimits) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true)
        .max_headers(MAX_HEADERS)
        .max_header_size(limits.max_header_bytes)
        // The read buffer holds the head while it is parsed: no larger than the head may be
        // (hyper's floor is 8192).
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
}

/// The next accepted connection with its permit; None once `shutdown` fires.
async fn next_connection(
    listener: &TcpListener,
    permits: &Arc<Semaphore>,
    shutdown: &CancellationToken,
) -> Option<(TcpStream, OwnedSemaphorePermit)> {
    let permit = tokio::select! {
        biased;
        _ = shutdown.cancelled() => return None,
        permit = permits.clone().acquire_owned() => permit.ok()?,
    };
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return None,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => return Some((stream, permit)),
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of file descriptors or memory: wait a little instead of spinning.
                tracing::error!(error = %e, "accepting a connection failed");
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
    }
}

/// Errors of one connection (it went away before it was accepted), not of the listener.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

async fn serve_connection(
    builder: Arc<http1::Builder>,
    stream: TcpStream,
    app: Router,
    shutdown: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(ProblemIo::new(stream));
    let connection = builder.serve_connection(io, TowerToHyperService::new(app));
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        // Timeouts, resets and unparsable requests are the client's doing.
        tracing::debug!(error = %e, "connection ended with an error");
    }
}
