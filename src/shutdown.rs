//! Graceful shutdown, shaped for ECS: on SIGTERM (or the console's SHUTDOWN) pgsluice stops
//! accepting clients, lets every transaction in flight finish, closes each client at its next
//! transaction boundary with 57P01, and exits; whatever still runs after `shutdown_timeout`
//! is cancelled on the server and closed.

use std::sync::atomic::{AtomicBool, Ordering};
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
    /// `drain` is cancelled: read without the token's lock, on every request.
    draining: AtomicBool,
    /// `abort` is cancelled.
    aborting: AtomicBool,
}

/// What one client task watches: the shutdown flags, its own flag that a reload removed
/// its database or user (it then leaves as at a drain), and its own waker slot, which
/// [`drain`] and that reload wake. Polling it costs a few atomics and no lock: the tokens'
/// futures lock a mutex shared by every client on every thread at each poll.
#[derive(Debug, Clone, Copy)]
pub struct Watch<'a> {
    pub stop: &'a Stop,
    pub waker: &'a atomic_waker::AtomicWaker,
    pub removed: &'a AtomicBool,
}

impl<'a> Watch<'a> {
    /// What a logged-in client watches.
    pub fn client(stop: &'a Stop, client: &'a crate::clients::Client) -> Watch<'a> {
        Watch {
            stop,
            waker: &client.stop_waker,
            removed: &client.removed,
        }
    }

    /// True once draining began, or once the client's pool was removed.
    #[inline]
    pub fn is_draining(&self) -> bool {
        self.stop.is_draining() || self.removed.load(Ordering::Acquire)
    }

    /// Ready once draining began (or the client's pool was removed).
    pub fn poll_draining(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.waker.register(cx.waker());
        if self.is_draining() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    }

    /// Ready once `shutdown_timeout` passed.
    pub fn poll_aborting(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.waker.register(cx.waker());
        if self.stop.aborting.load(Ordering::Acquire) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    }

    pub async fn draining(&self) {
        std::future::poll_fn(|cx| self.poll_draining(cx)).await
    }

    pub async fn aborting(&self) {
        std::future::poll_fn(|cx| self.poll_aborting(cx)).await
    }
}

impl Stop {
    /// Begins draining: clients leave at their next transaction boundary.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::Release);
        self.drain.cancel();
    }

    /// True once draining began (a load, where `drain.is_cancelled()` takes a lock).
    #[inline]
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

/// Wakes every logged-in client's task, to see the shutdown flags.
fn wake_clients(shared: &Shared) {
    for c in shared.clients.all() {
        c.stop_waker.wake();
    }
}

/// Drains after the listener stopped: waits for clients up to `shutdown_timeout`, then cuts
/// what is left, then closes the idle servers.
pub async fn drain(shared: &Shared) {
    let stop = &shared.stop;
    shared.console.begin_drain();
    stop.begin_drain();
    wake_clients(shared);
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
        stop.aborting.store(true, Ordering::Release);
        stop.abort.cancel();
        wake_clients(shared);
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
