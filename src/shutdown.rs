//! Graceful shutdown, shaped for ECS: on SIGTERM (or the console's SHUTDOWN) pgsluice stops
//! accepting clients, lets every transaction in flight finish, closes each client at its next
//! transaction boundary with 57P01, and exits; whatever still runs after `shutdown_timeout`
//! is cancelled on the server and closed.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::Shared;

/// How long clients get after the hard stop to go away before the process exits anyway.
const AFTER_ABORT: Duration = Duration::from_secs(2);

/// The shutdown signals every client task watches.
#[derive(Debug, Default)]
pub struct Stop {
    /// Cancelled when draining begins: clients leave at their next transaction boundary.
    pub drain: CancellationToken,
    /// Cancelled at `shutdown_timeout`: clients leave now, their queries cancelled.
    pub abort: CancellationToken,
    /// Every client task, to wait for them.
    pub clients: TaskTracker,
}

/// Drains after the listener stopped: waits for clients up to `shutdown_timeout`, then cuts
/// what is left, then closes the idle servers.
pub async fn drain(shared: &Shared) {
    let stop = &shared.stop;
    shared.console.begin_drain();
    stop.drain.cancel();
    stop.clients.close();
    let timeout = shared.pools.config().shutdown_timeout;
    tracing::info!(
        clients = stop.clients.len(),
        ?timeout,
        "draining: waiting for transactions to finish"
    );
    if tokio::time::timeout(timeout, stop.clients.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            clients = stop.clients.len(),
            "shutdown_timeout passed: cancelling what still runs"
        );
        stop.abort.cancel();
        if tokio::time::timeout(AFTER_ABORT, stop.clients.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                clients = stop.clients.len(),
                "clients did not leave; exiting anyway"
            );
        }
    }
    let closed = shared.pools.close_idle();
    tracing::info!(servers_closed = closed, "drained");
}
