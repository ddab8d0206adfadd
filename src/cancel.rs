//! CancelRequest routing. Each client gets its own random BackendKeyData; a cancel carrying
//! it reaches the server currently serving that client (with that server's real key), or
//! takes the client out of the queue if it is still waiting. Wrong keys are ignored, as
//! PostgreSQL does, and the secret is compared in constant time.
//!
//! Peering (`peer_id`, `[peers]`): processes that share a port (`so_reuseport`) or sit behind
//! one load balancer each write their `peer_id` into the keys they hand out, so a cancel
//! request that reaches the wrong process is sent on to the right one, once. A key's
//! process id is then: bit 31 zero (positive, as PostgreSQL's), bits 30–17 the `peer_id`,
//! bit 16 set on a request already sent on by a peer (it is never sent on again: a
//! misconfigured `[peers]` cannot make a loop), bits 15–0 random. The secret stays 32
//! random bits.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use atomic_waker::AtomicWaker;
use rand::RngExt;
use subtle::ConstantTimeEq;

use crate::config::{Config, Peer};
use crate::server::{cancel_over, send_cancel, ServerKey};
use crate::socket;

/// Where a key's `peer_id` starts in its process id.
const PEER_SHIFT: u32 = 17;
/// Marks a cancel request a peer has sent on.
const SENT_ON: i32 = 1 << 16;
/// The random part of a peered process's ids.
const PEERED_RANDOM: i32 = SENT_ON - 1;
/// How long forwarding a cancel request may take, to a peer or to a server (connect, send,
/// its answer).
const PEER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// Between transactions: nothing to cancel.
    Idle,
    /// Queued for a server.
    Queued,
    /// Running on this server.
    Server(ServerKey),
}

/// One client's cancel state.
#[derive(Debug)]
pub struct ClientCancel {
    pub pid: i32,
    pub secret: i32,
    target: Mutex<Target>,
    /// Cancels forwarded to this client's server and not yet handled by PostgreSQL.
    in_flight: AtomicU32,
    /// The process id of a server a cancel was given up for (no answer in
    /// [`PEER_TIMEOUT`], an error, or its task dropped) after it may have reached the
    /// postmaster, which may still act on it; 0: none. That server must not serve anyone
    /// else (see [`CancelHandle::idle`]).
    abandoned: AtomicI32,
    /// Set, and `queued_waker` woken, when a cancel arrives while the client is queued
    /// (atomics, not a `Notify`: the queued wait polls this at every wake-up).
    queued_cancel: AtomicBool,
    queued_waker: AtomicWaker,
}

/// All clients' keys.
#[derive(Debug, Default)]
pub struct Cancels {
    map: Mutex<crate::Map<i32, Arc<ClientCancel>>>,
    /// This process's `peer_id` (0: not peered), fixed for its life.
    peer_id: u32,
}

/// What became of a cancel request (`pgsluice_cancel_requests_total{result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// Sent to the server running the client's query.
    Server,
    /// The client was waiting for a server: it stops waiting.
    Queued,
    /// The client was between transactions: nothing to cancel.
    Idle,
    /// No client has this key here, or the secret was wrong.
    Unknown,
    /// Sent on to the peered process whose `peer_id` the key carries.
    Peer,
    /// That process is not in `[peers]`, or could not be reached.
    PeerFailed,
}

impl Handled {
    pub fn label(self) -> &'static str {
        match self {
            Handled::Server => "server",
            Handled::Queued => "queued",
            Handled::Idle => "idle",
            Handled::Unknown => "unknown",
            Handled::Peer => "peer",
            Handled::PeerFailed => "peer_failed",
        }
    }

    pub const ALL: [Handled; 6] = [
        Handled::Server,
        Handled::Queued,
        Handled::Idle,
        Handled::Unknown,
        Handled::Peer,
        Handled::PeerFailed,
    ];
}

/// Where a cancel request with process id `pid` goes, in a process whose `peer_id` is `own`.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// One of this process's clients, under this id.
    Here(i32),
    /// To peer `id`, with this process id (marked sent on).
    Peer { id: u32, pid: i32 },
    /// Nobody's: a negative id, or one a peer sent on already that is not this process's.
    Nowhere,
}

fn route(own: u32, pid: i32) -> Route {
    if own == 0 {
        return Route::Here(pid);
    }
    if pid < 0 {
        return Route::Nowhere;
    }
    let id = (pid >> PEER_SHIFT) as u32;
    if id == own {
        Route::Here(pid & !SENT_ON)
    } else if pid & SENT_ON != 0 || id == 0 {
        Route::Nowhere
    } else {
        Route::Peer {
            id,
            pid: pid | SENT_ON,
        }
    }
}

/// A client's registration; dropping it forgets the key.
#[derive(Debug)]
pub struct CancelHandle {
    cancels: Arc<Cancels>,
    pub client: Arc<ClientCancel>,
}

impl Cancels {
    /// The keys of a process whose `peer_id` is `peer_id` (0: not peered).
    pub fn new(peer_id: u32) -> Cancels {
        Cancels {
            map: Mutex::default(),
            peer_id,
        }
    }

    pub fn register(self: &Arc<Self>) -> CancelHandle {
        let mut rng = rand::rng();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let pid = loop {
            let pid = if self.peer_id == 0 {
                rng.random_range(1..i32::MAX)
            } else {
                // Positive and never 0: peer_id is at least 1. At most MAX_PEERED_CLIENTS
                // (60,000) of the 65,536 ids are ever taken, so this loop ends.
                ((self.peer_id as i32) << PEER_SHIFT) | (rng.random::<i32>() & PEERED_RANDOM)
            };
            if !map.contains_key(&pid) {
                break pid;
            }
        };
        let client = Arc::new(ClientCancel {
            pid,
            secret: rng.random(),
            target: Mutex::new(Target::Idle),
            in_flight: AtomicU32::new(0),
            abandoned: AtomicI32::new(0),
            queued_cancel: AtomicBool::new(false),
            queued_waker: AtomicWaker::new(),
        });
        map.insert(pid, client.clone());
        CancelHandle {
            cancels: self.clone(),
            client,
        }
    }

    /// Handles a CancelRequest: for one of this process's clients, or sent on to the peer
    /// whose `peer_id` the key carries (`config`'s `[peers]`). Unknown keys do nothing.
    pub async fn cancel(&self, pid: i32, secret: i32, config: &Config) -> Handled {
        match route(self.peer_id, pid) {
            Route::Here(pid) => self.cancel_here(pid, secret).await,
            Route::Nowhere => Handled::Unknown,
            Route::Peer { id, pid } => match config.peer(id) {
                None => {
                    tracing::debug!(peer_id = id, "cancel request for a peer not in [peers]");
                    Handled::PeerFailed
                }
                Some(peer) => match send_on(peer, pid, secret).await {
                    Ok(()) => Handled::Peer,
                    Err(e) => {
                        tracing::warn!(peer_id = id, host = %peer.host, port = peer.port, error = %e, "could not send a cancel request on to its peer");
                        Handled::PeerFailed
                    }
                },
            },
        }
    }

    async fn cancel_here(&self, pid: i32, secret: i32) -> Handled {
        let client = self
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&pid)
            .cloned();
        let Some(client) = client else {
            return Handled::Unknown;
        };
        if !bool::from(client.secret.to_be_bytes().ct_eq(&secret.to_be_bytes())) {
            return Handled::Unknown;
        }
        let key = {
            let target = client.target.lock().unwrap_or_else(|p| p.into_inner());
            match *target {
                Target::Idle => return Handled::Idle,
                Target::Queued => {
                    client.queued_cancel.store(true, Ordering::Release);
                    client.queued_waker.wake();
                    return Handled::Queued;
                }
                Target::Server(key) => {
                    // Counted under the lock, so the client sees it when it finishes.
                    client.in_flight.fetch_add(1, Ordering::SeqCst);
                    key
                }
            }
        };
        // Uncounted however this ends: a cancel cut off (its connection's task dropped) left
        // the count up, and its client took every server it used for one in doubt.
        let mut in_flight = InFlight {
            client: &client,
            pid: key.pid,
            handled: false,
        };
        let sent = tokio::time::timeout(PEER_TIMEOUT, send_cancel(key)).await;
        match sent {
            Ok(Ok(())) => in_flight.handled = true,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not forward a cancel request to the server")
            }
            Err(_) => tracing::warn!(
                "could not forward a cancel request to the server: no answer in {PEER_TIMEOUT:?}"
            ),
        }
        Handled::Server
    }
}

/// A cancel on its way to a client's server (process `pid`), counted in the client's
/// `in_flight` until dropped; unless `handled` (PostgreSQL closed the cancel connection),
/// the server is marked `abandoned` first.
struct InFlight<'a> {
    client: &'a ClientCancel,
    pid: i32,
    handled: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        // Before the count drops: `idle` reads the count first, then this.
        if !self.handled {
            self.client.abandoned.store(self.pid, Ordering::SeqCst);
        }
        self.client.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Sends a cancel request on to `peer` and waits until it has handled it (it closes the
/// connection once the cancel reached the server), bounded by [`PEER_TIMEOUT`].
async fn send_on(peer: &Peer, pid: i32, secret: i32) -> std::io::Result<()> {
    let sent = tokio::time::timeout(PEER_TIMEOUT, async {
        let stream = socket::connect(&peer.host, peer.port).await?;
        cancel_over(stream, pid, secret).await
    });
    sent.await.unwrap_or_else(|_| {
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the peer did not answer in 5 s",
        ))
    })
}

impl CancelHandle {
    fn set(&self, t: Target) {
        *self.client.target.lock().unwrap_or_else(|p| p.into_inner()) = t;
    }

    /// The client runs on `key` until [`CancelHandle::idle`].
    pub fn serving(&self, key: ServerKey) {
        self.set(Target::Server(key));
    }

    /// The client holds no server any more. Returns false when a cancel for the server it
    /// held may still be on its way: that server must not serve anyone else, or the late
    /// cancel could hit another client's query.
    pub fn idle(&self) -> bool {
        let held = std::mem::replace(
            &mut *self.client.target.lock().unwrap_or_else(|p| p.into_inner()),
            Target::Idle,
        );
        if self.client.in_flight.load(Ordering::SeqCst) != 0 {
            return false;
        }
        // A cancel given up may still be acted on. Its server is this one, or one closed
        // already (a transaction ending with the cancel in flight closes its server).
        if self.client.abandoned.load(Ordering::SeqCst) != 0 {
            let pid = self.client.abandoned.swap(0, Ordering::SeqCst);
            return !matches!(held, Target::Server(k) if k.pid == pid);
        }
        true
    }

    /// Waits for a cancel while the client is queued. Marks the client queued first, so a
    /// cancel that arrives at any point after this call is seen.
    pub async fn cancelled_while_queued(&self) {
        self.client.queued_cancel.store(false, Ordering::Release);
        self.set(Target::Queued);
        std::future::poll_fn(|cx| {
            self.client.queued_waker.register(cx.waker());
            if self.client.queued_cancel.load(Ordering::Acquire) {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await
    }
}

impl Drop for CancelHandle {
    fn drop(&mut self) {
        self.cancels
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.client.pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpeered_keys_stay_here() {
        assert_eq!(route(0, 12345), Route::Here(12345));
        assert_eq!(route(0, SENT_ON | 7), Route::Here(SENT_ON | 7));
    }

    #[test]
    fn peered_keys_carry_the_peer_id() {
        let cancels = Arc::new(Cancels::new(16_383));
        let handles: Vec<_> = (0..2000).map(|_| cancels.register()).collect();
        for h in &handles {
            let pid = h.client.pid;
            assert!(pid > 0, "{pid}");
            assert_eq!(pid >> PEER_SHIFT, 16_383);
            assert_eq!(pid & SENT_ON, 0);
            assert_eq!(route(16_383, pid), Route::Here(pid));
        }
        let mut pids: Vec<_> = handles.iter().map(|h| h.client.pid).collect();
        pids.sort();
        pids.dedup();
        assert_eq!(pids.len(), 2000, "two clients got one id");
    }

    #[test]
    fn a_peers_key_is_sent_on_once() {
        let pid = (2 << PEER_SHIFT) | 0x1234;
        // At process 1: sent on to peer 2, marked.
        let Route::Peer { id, pid: sent } = route(1, pid) else {
            panic!("not sent on")
        };
        assert_eq!((id, sent), (2, pid | SENT_ON));
        // At process 2: its own, found under the unmarked id.
        assert_eq!(route(2, sent), Route::Here(pid));
        // At process 3 (a [peers] entry pointing at the wrong process): not sent on again.
        assert_eq!(route(3, sent), Route::Nowhere);
        // Ids no peer hands out.
        assert_eq!(route(1, -5), Route::Nowhere);
        assert_eq!(route(1, 0x1234), Route::Nowhere);
    }
}
