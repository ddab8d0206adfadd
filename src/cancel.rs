//! CancelRequest routing. Each client gets its own random BackendKeyData; a cancel carrying
//! it reaches the server currently serving that client (with that server's real key), or
//! takes the client out of the queue if it is still waiting. Wrong keys are ignored, as
//! PostgreSQL does, and the secret is compared in constant time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use atomic_waker::AtomicWaker;
use rand::RngExt;
use subtle::ConstantTimeEq;

use crate::server::{send_cancel, ServerKey};

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
    /// Set, and `queued_waker` woken, when a cancel arrives while the client is queued
    /// (atomics, not a `Notify`: the queued wait polls this at every wake-up).
    queued_cancel: AtomicBool,
    queued_waker: AtomicWaker,
}

/// All clients' keys.
#[derive(Debug, Default)]
pub struct Cancels {
    map: Mutex<HashMap<i32, Arc<ClientCancel>>>,
}

/// A client's registration; dropping it forgets the key.
#[derive(Debug)]
pub struct CancelHandle {
    cancels: Arc<Cancels>,
    pub client: Arc<ClientCancel>,
}

impl Cancels {
    pub fn register(self: &Arc<Self>) -> CancelHandle {
        let mut rng = rand::rng();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let pid = loop {
            let pid = rng.random_range(1..i32::MAX);
            if !map.contains_key(&pid) {
                break pid;
            }
        };
        let client = Arc::new(ClientCancel {
            pid,
            secret: rng.random(),
            target: Mutex::new(Target::Idle),
            in_flight: AtomicU32::new(0),
            queued_cancel: AtomicBool::new(false),
            queued_waker: AtomicWaker::new(),
        });
        map.insert(pid, client.clone());
        CancelHandle {
            cancels: self.clone(),
            client,
        }
    }

    /// Handles a CancelRequest. Unknown keys do nothing.
    pub async fn cancel(&self, pid: i32, secret: i32) {
        let client = self
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&pid)
            .cloned();
        let Some(client) = client else { return };
        if !bool::from(client.secret.to_be_bytes().ct_eq(&secret.to_be_bytes())) {
            return;
        }
        let key = {
            let target = client.target.lock().unwrap_or_else(|p| p.into_inner());
            match *target {
                Target::Idle => return,
                Target::Queued => {
                    client.queued_cancel.store(true, Ordering::Release);
                    client.queued_waker.wake();
                    return;
                }
                Target::Server(key) => {
                    // Counted under the lock, so the client sees it when it finishes.
                    client.in_flight.fetch_add(1, Ordering::SeqCst);
                    key
                }
            }
        };
        if let Err(e) = send_cancel(key).await {
            tracing::warn!(error = %e, "could not forward a cancel request to the server");
        }
        client.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
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
        self.set(Target::Idle);
        self.client.in_flight.load(Ordering::SeqCst) == 0
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
