//! The client accept loop: enforces `max_client_conn` and spawns one task per client.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::app::Shared;
use crate::client;
use crate::protocol::messages::{ErrorFields, Severity};

/// Length of the queue of connections the kernel completes before pgsluice accepts them
/// (capped by `net.core.somaxconn`). Larger than tokio's 1024: a burst of thousands of
/// clients (every task of a deploy starting at once) would otherwise lose SYNs and wait
/// for their retransmission, 1 s and more.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds the client listener (the first address `addr` resolves to that binds).
pub async fn bind(addr: &str) -> std::io::Result<TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(a).and_then(|()| socket.listen(LISTEN_BACKLOG)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to listen on")
    }))
}

/// Connections beyond `max_client_conn` that may still log in to the admin console, so
/// that an operator can look at a proxy that is full.
pub const ADMIN_RESERVE: usize = 5;

/// TCP keepalive on a client socket as the configuration says now (a reload applies to
/// connections accepted after it): a client host that vanished without closing is found
/// after `tcp_keepidle + tcp_keepintvl × tcp_keepcnt` and its connection closed.
fn set_keepalive(stream: &tokio::net::TcpStream, shared: &Shared) {
    let c = shared.pools.config();
    if c.tcp_keepalive == 1 {
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(c.tcp_keepidle)
            .with_interval(c.tcp_keepintvl)
            .with_retries(c.tcp_keepcnt);
        if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
            tracing::debug!(error = %e, "could not set TCP keepalive on a client socket");
        }
    }
}

/// Accepts clients forever.
pub async fn run(listener: TcpListener, shared: Arc<Shared>) {
    let max = shared.pools.config().max_client_conn as usize;
    let slots = Arc::new(Semaphore::new(max));
    let reserve = Arc::new(Semaphore::new(ADMIN_RESERVE));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                shared
                    .metrics
                    .error(crate::metrics::ErrorKind::AcceptFailed);
                tracing::error!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        set_keepalive(&stream, &shared);
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                let shared = shared.clone();
                let tracker = shared.stop.clients.clone();
                tracker.spawn(async move {
                    client::handle(stream, shared).await;
                    drop(permit);
                });
            }
            Err(_) => match reserve.clone().try_acquire_owned() {
                // It may be an operator: read its startup packet before refusing it.
                Ok(permit) => {
                    let shared = shared.clone();
                    let tracker = shared.stop.clients.clone();
                    tracker.spawn(async move {
                        client::handle_over_limit(stream, shared, max).await;
                        drop(permit);
                    });
                }
                Err(_) => {
                    shared
                        .metrics
                        .error(crate::metrics::ErrorKind::TooManyClients);
                    tokio::spawn(refuse(stream, max));
                }
            },
        }
    }
}

/// Tells a client over `max_client_conn` why it is turned away.
async fn refuse(mut stream: TcpStream, max: usize) {
    use tokio::io::AsyncWriteExt;
    tracing::warn!(max_client_conn = max, "client refused: too many clients");
    let mut buf = bytes::BytesMut::new();
    ErrorFields::new(
        Severity::Fatal,
        "53300",
        format!("no more connections allowed (max_client_conn = {max})"),
    )
    .encode(&mut buf);
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&buf)).await;
}
