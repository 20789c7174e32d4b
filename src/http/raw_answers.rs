//! hyper answers a request it cannot parse by itself, before the router sees it: 400 (bad
//! request line or header), 431 (head over the size or header-count limit), 414 (URI over 64 KiB,
//! unreachable below our head limit). Its answer is a bare head with `content-length: 0`, and
//! hyper offers no hook to change it. [`ProblemIo`] sits between hyper and the socket and swaps
//! exactly that head for an RFC 9457 problem+json answer.
//!
//! Recognised by its shape: a 4xx/5xx head alone in one write, with `content-length: 0` and
//! neither `content-type` nor `x-request-id`. Every answer of the router carries both (and a
//! problem body), so none of ours can match.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::error::{PROBLEM_JSON, Problem};

/// A connection whose hyper-made error answers become problem+json.
pub struct ProblemIo<S> {
    inner: S,
    /// The replacement answer still to write, and how much of it is written.
    pending: Option<(Vec<u8>, usize)>,
}

impl<S> ProblemIo<S> {
    pub fn new(inner: S) -> Self {
        ProblemIo {
            inner,
            pending: None,
        }
    }
}

impl<S: AsyncWrite + Unpin> ProblemIo<S> {
    /// Writes what is left of a replacement answer.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, written)) = &mut self.pending {
            if *written == bytes.len() {
                self.pending = None;
                break;
            }
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ProblemIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ProblemIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_pending(cx))?;
        if let Some(answer) = problem_for(buf) {
            self.pending = Some((answer, 0));
            // Taken whole: hyper goes on to flush and close, which write the answer.
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_pending(cx))?;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total <= MAX_HEAD_LEN {
            let joined: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            if let Some(answer) = problem_for(&joined) {
                self.pending = Some((answer, 0));
                return Poll::Ready(Ok(total));
            }
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// hyper's bare error heads are short; longer writes are never inspected.
const MAX_HEAD_LEN: usize = 512;

/// The problem+json answer replacing `written`, if it is one of hyper's bare error heads.
fn problem_for(written: &[u8]) -> Option<Vec<u8>> {
    if written.len() > MAX_HEAD_LEN || !written.ends_with(b"\r\n\r\n") {
        return None;
    }
    let head = std::str::from_utf8(written).ok()?.to_ascii_lowercase();
    let mut status_line = head.lines().next()?.split(' ');
    if !status_line.next()?.starts_with("http/1.") {
        return None;
    }
    let status = StatusCode::from_bytes(status_line.next()?.as_bytes()).ok()?;
    let bare = head.contains("\r\ncontent-length: 0\r\n")
        && !head.contains("\r\ncontent-type:")
        && !head.contains("\r\nx-request-id:");
    if !(status.is_client_error() || status.is_server_error()) || !bare {
        return None;
    }
    Some(answer(status))
}

fn answer(status: StatusCode) -> Vec<u8> {
    let (slug, detail) = match status {
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => (
            "headers-too-large",
            "the request line and headers are larger than the configured limit \
             (BP_MAX_HEADER_BYTES) or there are more than 100 headers",
        ),
        StatusCode::URI_TOO_LONG => ("uri-too-long", "the request URI is too long"),
        _ => ("bad-request", "the request is not valid HTTP/1.1"),
    };
    let problem = Problem {
        problem_type: format!("https://backup-provisioner.holos.run/problems/{slug}"),
        title: status.canonical_reason().unwrap_or("Error").to_owned(),
        status: status.as_u16(),
        detail: detail.to_owned(),
        errors: Vec::new(),
    };
    let body = serde_json::to_string(&problem).expect("a problem serializes");
    let request_id = uuid::Uuid::new_v4();
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: {PROBLEM_JSON}\r\ncontent-length: {}\r\n\
         connection: close\r\nx-request-id: {request_id}\r\ncache-control: no-store\r\n\
         x-content-type-options: nosniff\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYPER_431: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Mon, 01 Dec 2026 00:00:00 GMT\r\n\r\n";

    #[test]
    fn hypers_bare_error_heads_become_problems() {
        let answer = String::from_utf8(problem_for(HYPER_431).unwrap()).unwrap();
        assert!(answer.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
        assert!(answer.contains("\r\ncontent-type: application/problem+json\r\n"));
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let problem: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(problem["status"], 431);
        let bad = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n";
        assert!(problem_for(bad).is_some());
    }

    #[test]
    fn answers_of_the_router_are_left_alone() {
        let ours = [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 404 Not Found\r\ncontent-type: application/problem+json\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 404 Not Found\r\nx-request-id: a\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 120\r\n\r\n",
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n{}",
        ];
        for written in ours {
            assert!(
                problem_for(written).is_none(),
                "{}",
                String::from_utf8_lossy(written)
            );
        }
    }
}
