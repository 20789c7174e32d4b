//! The proxy itself: HTTP/1.1 (hyper) on 127.0.0.1:0, one thread and runtime of its own, each
//! request read whole, judged, forwarded to moto (a fresh connection each time) and answered.
//! A reset drops the client's connection with `SO_LINGER` 0, so the client sees a TCP RST.

use std::convert::Infallible;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONNECTION, CONTENT_LENGTH, HeaderValue, TRANSFER_ENCODING};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot};

use super::operation::{Operation, identify};
use super::responses::{self, Body, iam_error, no_such_entity, s3_error};
use super::{Fault, LostResponse, Shared};

type Upstream = Client<HttpConnector, Full<Bytes>>;

/// Binds, starts the proxy thread, and returns its endpoint and the sender whose drop stops it.
pub(super) fn spawn(upstream: &str, shared: Arc<Shared>) -> (String, oneshot::Sender<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the realism proxy");
    listener.set_nonblocking(true).expect("nonblocking");
    let endpoint = format!("http://{}", listener.local_addr().expect("local addr"));
    let upstream = upstream.trim_end_matches('/').to_owned();
    let (stop, stopped) = oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("aws-realism-proxy".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("proxy runtime");
            runtime.block_on(async move {
                let listener = TcpListener::from_std(listener).expect("tokio listener");
                // No pooling: moto may close an idle connection under a reused one.
                let client: Upstream = Client::builder(TokioExecutor::new())
                    .pool_max_idle_per_host(0)
                    .build_http();
                let context = Arc::new(Context {
                    shared,
                    client,
                    upstream,
                });
                accept(listener, context, stopped).await;
            });
        })
        .expect("realism proxy thread");
    (endpoint, stop)
}

struct Context {
    shared: Arc<Shared>,
    client: Upstream,
    upstream: String,
}

async fn accept(listener: TcpListener, context: Arc<Context>, mut stopped: oneshot::Receiver<()>) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            _ = &mut stopped => return,
        };
        let _ = stream.set_nodelay(true);
        // A second descriptor of the socket: set SO_LINGER 0 on it to make the close a reset.
        let Ok(socket) = stream.as_fd().try_clone_to_owned() else {
            continue;
        };
        let context = context.clone();
        tokio::spawn(async move {
            let reset = Arc::new(Notify::new());
            let service = {
                let reset = reset.clone();
                service_fn(move |request| handle(context.clone(), reset.clone(), request))
            };
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                _ = reset.notified() => abort(&socket),
            }
            drop(socket);
        });
    }
}

/// The last close of the socket sends RST instead of FIN.
fn abort(socket: &OwnedFd) {
    let _ = socket2::SockRef::from(socket).set_linger(Some(Duration::ZERO));
}

/// Resets the connection: the answer never comes.
async fn reset_connection(reset: &Notify) -> Result<Response<Body>, Infallible> {
    reset.notify_one();
    std::future::pending().await
}

/// What the proxy does with a request: answer it, or reset its connection.
enum Answer {
    Respond(Response<Body>),
    Reset,
}

async fn handle(
    context: Arc<Context>,
    reset: Arc<Notify>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let (parts, body) = request.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        return reset_connection(&reset).await;
    };
    let op = identify(&parts.method, &parts.uri, &parts.headers, &body);
    if parts.uri.path().starts_with("/moto-api") {
        return Ok(forward(&context, &op, parts, body).await.0);
    }
    let draws = context.shared.receive(&op);
    let seq = draws.seq;
    let answer = judge(&context, draws, op, parts, body).await;
    context.shared.answered(seq);
    match answer {
        Answer::Respond(response) => Ok(response),
        Answer::Reset => reset_connection(&reset).await,
    }
}

/// Applies the draws, rules and the consistency window to a request, forwarding it to moto
/// when it gets through.
async fn judge(
    context: &Context,
    draws: super::Draws,
    op: Operation,
    parts: hyper::http::request::Parts,
    body: Bytes,
) -> Answer {
    let shared = &context.shared;
    if let Some(delay) = draws.latency {
        shared.count_injected("latency", &op);
        tokio::time::sleep(delay).await;
    }
    if let Some(fault) = draws.fault {
        shared.count_injected(fault.label(), &op);
        return match fault {
            Fault::Reset => Answer::Reset,
            fault => Answer::Respond(fault_response(fault, &op)),
        };
    }
    if let Some(answer) = shared.rule_for(&op) {
        shared.count_injected("canned", &op);
        return Answer::Respond(answer.respond(&op));
    }
    if let Some(response) = not_visible_yet(shared, &op) {
        return Answer::Respond(response);
    }
    let (response, text) = forward(context, &op, parts, body).await;
    let ok = response.status().is_success();
    let code = responses::tag_value(&text, "Code").unwrap_or_default();
    shared.note(&op, &format!("moto {} {code}", response.status().as_u16()));
    if ok && op.is_create() {
        shared.record_created(&op, &text);
        if draws.lose_response {
            shared.count_injected("lost-response", &op);
            if let LostResponse::Stall(stall) = shared.lost_response() {
                tokio::time::sleep(stall).await;
            }
            return Answer::Reset;
        }
    }
    if ok && op.is_iam_read() && !shared.window().is_zero() {
        let (stripped, removed) = responses::strip_hidden_members(&text, shared.hidden_check());
        if removed > 0 {
            shared.count_injected("hidden-member", &op);
            return Answer::Respond(with_body(response, stripped));
        }
    }
    Answer::Respond(response)
}

/// The answer of a request signed with a new key, or naming a new entity, inside the window.
fn not_visible_yet(shared: &Shared, op: &Operation) -> Option<Response<Body>> {
    if shared.window().is_zero() {
        return None;
    }
    let hidden = shared.hidden_check();
    if let Some(key) = &op.access_key_id
        && hidden(&super::operation::entity_key("key", key))
    {
        shared.count_injected("invalid-key", op);
        return Some(if op.is_s3() {
            s3_error(
                op,
                403,
                "InvalidAccessKeyId",
                "The AWS Access Key Id you provided does not exist in our records.",
            )
        } else {
            iam_error(
                403,
                "InvalidClientTokenId",
                "The security token included in the request is invalid.",
            )
        });
    }
    let (_, param, value) = op
        .referenced_entities()
        .into_iter()
        .find(|(key, _, _)| hidden(key))?;
    shared.count_injected("hidden", op);
    Some(no_such_entity(param, value))
}

fn fault_response(fault: Fault, op: &Operation) -> Response<Body> {
    let (status, code, message) = match (fault, op.is_s3()) {
        (Fault::Throttle, true) => (503, "SlowDown", "Please reduce your request rate."),
        (Fault::Throttle, false) => (400, "Throttling", "Rate exceeded"),
        (Fault::Unavailable, _) => (
            503,
            "ServiceUnavailable",
            "The request has failed due to a temporary failure of the server.",
        ),
        (Fault::ServerError, true) => (
            500,
            "InternalError",
            "We encountered an internal error. Please try again.",
        ),
        (Fault::ServerError, false) => (
            500,
            "ServiceFailure",
            "The request processing has failed because of an unknown error.",
        ),
        (Fault::Reset | Fault::LoseResponse, _) => unreachable!("not an answer"),
    };
    if op.is_s3() {
        s3_error(op, status, code, message)
    } else {
        iam_error(status, code, message)
    }
}

/// Sends the request to moto; returns its answer (read whole) and the answer's text. A
/// transport failure becomes a 502.
async fn forward(
    context: &Context,
    op: &Operation,
    mut parts: hyper::http::request::Parts,
    body: Bytes,
) -> (Response<Body>, String) {
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    parts.uri = format!("{}{path}", context.upstream)
        .parse()
        .expect("upstream uri");
    parts.headers.remove(TRANSFER_ENCODING);
    parts.headers.remove(CONNECTION);
    parts
        .headers
        .insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    context.shared.count_forwarded(op);
    let request = Request::from_parts(parts, Full::new(body));
    let answered = match context.client.request(request).await {
        Ok(response) => {
            let (parts, body) = response.into_parts();
            body.collect()
                .await
                .map(|b| (parts, b.to_bytes()))
                .map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    };
    match answered {
        Ok((mut parts, body)) => {
            parts.headers.remove(TRANSFER_ENCODING);
            parts.headers.remove(CONNECTION);
            let text = String::from_utf8_lossy(&body).into_owned();
            (Response::from_parts(parts, Full::new(body)), text)
        }
        Err(e) => {
            context.shared.count_injected("upstream-error", op);
            let response = Response::builder()
                .status(502)
                .body(Full::new(Bytes::from(format!("realism proxy: moto: {e}"))))
                .expect("response");
            (response, String::new())
        }
    }
}

/// `response` with another body (and its length).
fn with_body(response: Response<Body>, text: String) -> Response<Body> {
    let (mut parts, _) = response.into_parts();
    parts
        .headers
        .insert(CONTENT_LENGTH, HeaderValue::from(text.len()));
    Response::from_parts(parts, Full::new(Bytes::from(text)))
}
