//! A TCP forwarder (e.g. in front of Postgres) that can black-hole its connections: while
//! paused it still accepts and reads, but passes nothing on in either direction, so a query
//! hangs as in a network partition instead of failing. Unpaused, what it held goes through.

use std::net::SocketAddr;
use std::sync::Arc;

/// A running forwarder; stops accepting when dropped (connections already open keep pumping
/// until either side closes).
pub struct Forwarder {
    pub addr: SocketAddr,
    paused: Arc<tokio::sync::watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl Forwarder {
    /// Listens on a free loopback port and forwards every connection to `target`.
    pub async fn start(target: SocketAddr) -> Forwarder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind forwarder");
        let addr = listener.local_addr().expect("forwarder address");
        let paused = Arc::new(tokio::sync::watch::Sender::new(false));
        let state = paused.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                let (from_client, to_client) = inbound.into_split();
                let (from_server, to_server) = outbound.into_split();
                tokio::spawn(pump(from_client, to_server, state.subscribe()));
                tokio::spawn(pump(from_server, to_client, state.subscribe()));
            }
        });
        Forwarder { addr, paused, task }
    }

    /// A forwarder to the host and port of `database_url` and the same URL through it.
    pub async fn for_database(database_url: &str) -> (Forwarder, String) {
        let mut url = url::Url::parse(database_url).expect("database url");
        let target = (url.host_str().expect("host"), url.port().unwrap_or(5432));
        let target = tokio::net::lookup_host(target)
            .await
            .expect("resolve")
            .next()
            .expect("address");
        let forwarder = Forwarder::start(target).await;
        url.set_port(Some(forwarder.addr.port())).expect("port");
        (forwarder, url.to_string())
    }

    /// Black-holes (true) or restores (false) every connection, open or new.
    pub fn pause(&self, paused: bool) {
        self.paused.send_replace(paused);
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies bytes one way, holding them while the forwarder is paused.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut paused: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if paused.wait_for(|p| !*p).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
