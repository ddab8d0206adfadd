//! Clients waiting for a server: their place in a pool's queue, how a server or a slot
//! reaches them, and the sweeper that enforces `query_wait_timeout` and `query_wait_notify`.
//!
//! At a few hundred clients over a pool of twenty, most transactions wait, so a wait must
//! cost little: no channel, timer or allocation per wait. Each client keeps one
//! [`WaitCell`] for its whole life; the pool's queue holds a pointer to it, and whoever
//! grants (a checkin, a freed slot, the budget, the sweeper) puts the grant in the cell
//! under the pools' lock and wakes the client. Deadlines are kept in the queue and one
//! task per proxy, [`sweeper`], sleeps until the earliest of them (PgBouncer's janitor
//! checks `query_wait_timeout` the same way, once per loop).

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::Poll;
use std::time::Instant;

use atomic_waker::AtomicWaker;

use super::{Grant, PoolId, Pools, State};

/// Where one client's grants arrive; reused from one wait to the next.
#[derive(Debug, Default)]
pub struct WaitCell {
    grant: Mutex<Option<Grant>>,
    /// The client has waited `query_wait_notify`: it should be told why.
    notice: AtomicBool,
    waker: AtomicWaker,
}

impl WaitCell {
    fn put(&self, grant: Grant) {
        *self.grant.lock().unwrap_or_else(|p| p.into_inner()) = Some(grant);
        self.waker.wake();
    }

    fn take(&self) -> Option<Grant> {
        self.grant.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Ready once the client has been queued `query_wait_notify` (once per wait).
    pub async fn notice_due(&self) {
        poll_fn(|cx| {
            self.waker.register(cx.waker());
            if self.notice.swap(false, Ordering::AcqRel) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

/// A client in a pool's queue.
#[derive(Debug)]
pub(super) struct Waiter {
    /// Arrival order across all pools.
    pub seq: u64,
    /// When its request began.
    pub since: Instant,
    cell: Arc<WaitCell>,
    /// `query_wait_timeout` ends the wait then (`None`: never).
    deadline: Option<Instant>,
    /// `query_wait_notify` is due then (`None`: told already, or off).
    notify_at: Option<Instant>,
}

impl Waiter {
    /// Hands the waiter its grant; call under the pools' lock, with the waiter taken out
    /// of its queue.
    pub fn give(self, grant: Grant) {
        self.cell.put(grant);
    }

    /// The next moment the sweeper must look at this waiter.
    fn due(&self) -> Option<Instant> {
        match (self.notify_at, self.deadline) {
            (Some(n), Some(d)) => Some(n.min(d)),
            (n, d) => n.or(d),
        }
    }
}

/// Sweeper state kept in the pools' [`State`].
#[derive(Debug, Default)]
pub(super) struct Sweep {
    /// When the sweeper will look next (`None`: it sleeps until woken).
    next: Option<Instant>,
}

/// A place in a pool's queue. Dropping it leaves the queue and returns anything granted.
pub(super) struct WaitGuard {
    pools: Arc<Pools>,
    pool: PoolId,
    seq: u64,
    cell: Arc<WaitCell>,
    done: bool,
}

impl Pools {
    /// Queues a client of `pool` that waits until `deadline` at most.
    pub(super) fn enqueue(
        self: &Arc<Self>,
        st: &mut State,
        pool: PoolId,
        cell: &Arc<WaitCell>,
        deadline: Option<Instant>,
        began: Instant,
    ) -> WaitGuard {
        let seq = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let notify = st.timing.query_wait_notify;
        let notify_at = (!notify.is_zero()).then(|| began + notify);
        let waiter = Waiter {
            seq,
            since: began,
            cell: cell.clone(),
            deadline,
            notify_at,
        };
        if let Some(due) = waiter.due() {
            if st.sweep.next.is_none_or(|next| due < next) {
                st.sweep.next = Some(due);
                self.sweep_wake.notify_one();
            }
        }
        st.pools[pool].waiters.push_back(waiter);
        WaitGuard {
            pools: self.clone(),
            pool,
            seq,
            cell: cell.clone(),
            done: false,
        }
    }

    /// Ends the waits past `query_wait_timeout`, flags those past `query_wait_notify`,
    /// and returns when to look again.
    fn sweep_waiters(&self, now: Instant) -> Option<Instant> {
        let mut st = self.lock();
        let mut next: Option<Instant> = None;
        for p in st.pools.iter_mut() {
            if p.waiters.is_empty() {
                continue;
            }
            let mut i = 0;
            while i < p.waiters.len() {
                let w = &mut p.waiters[i];
                if w.deadline.is_some_and(|d| d <= now) {
                    let w = p.waiters.remove(i).expect("index in range");
                    w.give(Grant::TimedOut);
                    continue;
                }
                if w.notify_at.is_some_and(|n| n <= now) {
                    w.notify_at = None;
                    w.cell.notice.store(true, Ordering::Release);
                    w.cell.waker.wake();
                }
                if let Some(due) = w.due() {
                    next = Some(next.map_or(due, |n| n.min(due)));
                }
                i += 1;
            }
        }
        st.sweep.next = next;
        next
    }
}

/// Runs while the pools exist: wakes at the earliest deadline in any queue.
pub async fn sweeper(pools: Weak<Pools>) {
    loop {
        let Some(strong) = pools.upgrade() else {
            return;
        };
        let next = strong.sweep_waiters(Instant::now());
        let wake = strong.sweep_wake.clone();
        drop(strong);
        match next {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at.into()) => {}
                    _ = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

impl WaitGuard {
    /// Waits for the grant: a server, a slot to open one, or why not.
    pub async fn wait(&mut self) -> Grant {
        let grant = poll_fn(|cx| {
            self.cell.waker.register(cx.waker());
            match self.cell.take() {
                Some(g) => Poll::Ready(g),
                None => Poll::Pending,
            }
        })
        .await;
        self.done = true;
        // Out of the queue now, so the sweeper cannot flag it again: a notice it flagged
        // that the client did not read yet must not carry over to the next wait.
        self.cell.notice.store(false, Ordering::Relaxed);
        grant
    }
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut st = self.pools.lock();
        st.pools[self.pool].waiters.retain(|w| w.seq != self.seq);
        self.cell.notice.store(false, Ordering::Relaxed);
        // A grant made before we left the queue is in the cell: give it back.
        match self.cell.take() {
            Some(Grant::Server(server)) => {
                drop(st);
                self.pools.checkin(server);
            }
            Some(Grant::Slot) => {
                st.pools[self.pool].connecting -= 1;
                st.release(self.pool);
                st.grant_slots();
            }
            Some(Grant::BudgetUnknown(_) | Grant::TimedOut | Grant::Removed) | None => {}
        }
    }
}
