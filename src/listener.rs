//! The client accept loop: enforces `max_client_conn` and spawns one task per client.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::app::Shared;
use crate::client;
use crate::protocol::messages::{ErrorFields, Severity};

/// Accepts clients forever.
pub async fn run(listener: TcpListener, shared: Arc<Shared>) {
    let max = shared.pools.config().max_client_conn as usize;
    let slots = Arc::new(Semaphore::new(max));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::error!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                let shared = shared.clone();
                let tracker = shared.stop.clients.clone();
                tracker.spawn(async move {
                    client::handle(stream, shared).await;
                    drop(permit);
                });
            }
            Err(_) => {
                shared
                    .metrics
                    .error(crate::metrics::ErrorKind::TooManyClients);
                tokio::spawn(refuse(stream, max));
            }
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
