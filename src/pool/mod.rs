//! Pools of server connections, one per (database, user), behind one lock.
//!
//! One mutex guards every pool's idle list, counts and waiters. It is held only for a few
//! pointer moves per checkout or checkin (never across I/O), and a single lock makes the
//! limits that span pools (the global budget) exact and their queue fair.
//!
//! Rules:
//! - Checkout takes the most recently used idle server (a hot set; the janitor shrinks the
//!   rest), else opens one if the pool is under `pool_size`, else queues the client (FIFO).
//! - Checkin hands the server straight to the oldest waiter, else makes it idle. A closed
//!   server frees its slot for the oldest waiter, who opens a new one.
//! - A [`Checkout`] dropped without [`Checkout::release`] closes its server: a server in
//!   doubt is never reused.

pub mod janitor;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::sync::oneshot;

use crate::config::{Config, PoolSettings};
use crate::server::{ServerConn, ServerError};

#[derive(Debug, Error)]
pub enum PoolError {
    #[error("query_wait_timeout: no server connection became free within {0:?}")]
    WaitTimeout(Duration),
    #[error(transparent)]
    Server(#[from] ServerError),
}

/// How long the janitor waits before topping a pool up again after a failed connect.
const CONNECT_RETRY_DELAY: Duration = Duration::from_secs(5);

/// Identifies a pool for its whole life.
pub type PoolId = usize;

/// What a waiter is handed.
#[derive(Debug)]
enum Grant {
    /// An idle server, ready to use.
    Server(ServerConn),
    /// A reserved slot: the waiter opens the server itself.
    Slot,
}

#[derive(Debug)]
struct Waiter {
    id: u64,
    tx: oneshot::Sender<Grant>,
}

/// One pool's state.
#[derive(Debug)]
struct Pool {
    settings: Arc<PoolSettings>,
    /// Idle servers; the last is the most recently used.
    idle: Vec<ServerConn>,
    /// Servers that exist or are being opened (idle + active + connecting).
    open: u32,
    waiters: VecDeque<Waiter>,
    /// ParameterStatus set of the first server, shown to clients at login.
    params: Option<Arc<Vec<(String, String)>>>,
    /// After a failed connect, the janitor leaves the pool alone until then.
    retry_after: Option<Instant>,
}

#[derive(Debug, Default)]
struct State {
    by_key: HashMap<(String, String), PoolId>,
    pools: Vec<Pool>,
}

/// A snapshot of one pool's counts, for logs, tests and (later) metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStats {
    pub database: String,
    pub user: String,
    pub open: u32,
    pub idle: u32,
    pub waiting: u32,
}

/// All pools of the proxy.
#[derive(Debug)]
pub struct Pools {
    state: Mutex<State>,
    config: Arc<Config>,
    next_id: AtomicU64,
}

impl Pools {
    /// Creates the pools; those with `min_pool_size` start filling at once.
    pub fn new(config: Arc<Config>) -> Arc<Pools> {
        let pools = Arc::new(Pools {
            state: Mutex::new(State::default()),
            config,
            next_id: AtomicU64::new(1),
        });
        for db in pools.config.databases.keys() {
            for user in pools.config.users.keys() {
                if pools
                    .config
                    .pool_settings(db, user)
                    .is_some_and(|s| s.min_pool_size > 0)
                {
                    pools.pool_for(db, user);
                }
            }
        }
        pools
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves counts that are still consistent (every
        // section is a few infallible moves), so a poisoned lock is safe to keep using.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pool for a client-facing database and user; `None` when the database is unknown.
    pub fn pool_for(&self, database: &str, user: &str) -> Option<PoolId> {
        let mut st = self.lock();
        let key = (database.to_owned(), user.to_owned());
        if let Some(&id) = st.by_key.get(&key) {
            return Some(id);
        }
        let settings = self.config.pool_settings(database, user)?;
        let id = st.pools.len();
        st.pools.push(Pool {
            settings: Arc::new(settings),
            idle: Vec::new(),
            open: 0,
            waiters: VecDeque::new(),
            params: None,
            retry_after: None,
        });
        st.by_key.insert(key, id);
        Some(id)
    }

    pub fn settings(&self, pool: PoolId) -> Arc<PoolSettings> {
        self.lock().pools[pool].settings.clone()
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The ParameterStatus set clients of this pool are shown at login, once known.
    pub fn server_params(&self, pool: PoolId) -> Option<Arc<Vec<(String, String)>>> {
        self.lock().pools[pool].params.clone()
    }

    pub fn stats(&self) -> Vec<PoolStats> {
        self.lock()
            .pools
            .iter()
            .map(|p| PoolStats {
                database: p.settings.database.clone(),
                user: p.settings.user.clone(),
                open: p.open,
                idle: p.idle.len() as u32,
                waiting: p.waiters.len() as u32,
            })
            .collect()
    }

    /// Checks a server out, waiting up to `wait` for one. Cancel-safe: dropping the future
    /// gives back anything it was granted.
    pub async fn checkout(
        self: &Arc<Self>,
        pool: PoolId,
        wait: Duration,
    ) -> Result<Checkout, PoolError> {
        let deadline = Instant::now() + wait;
        loop {
            let step = {
                let mut st = self.lock();
                let p = &mut st.pools[pool];
                if let Some(server) = p.idle.pop() {
                    Step::Idle(server)
                } else if p.open < p.settings.pool_size {
                    p.open += 1;
                    Step::Open
                } else {
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    let (tx, rx) = oneshot::channel();
                    p.waiters.push_back(Waiter { id, tx });
                    Step::Wait(WaitGuard {
                        pools: self.clone(),
                        pool,
                        id,
                        rx: Some(rx),
                    })
                }
            };
            let grant = match step {
                Step::Idle(server) => Grant::Server(server),
                Step::Open => Grant::Slot,
                Step::Wait(mut guard) => guard
                    .wait(deadline)
                    .await
                    .ok_or(PoolError::WaitTimeout(wait))?,
            };
            match grant {
                Grant::Server(server) => {
                    // Costs no system call unless the socket was flagged readable: a server
                    // that closed (restart, idle_session_timeout, failover) is caught here.
                    if !server.looks_alive() {
                        tracing::info!(
                            server = server.id,
                            "closing a server found dead or dirty while idle"
                        );
                        self.discard(server);
                        continue;
                    }
                    return Ok(Checkout {
                        server: Some(server),
                        pools: self.clone(),
                    });
                }
                Grant::Slot => {
                    return self.open(pool).await.map(|server| Checkout {
                        server: Some(server),
                        pools: self.clone(),
                    })
                }
            }
        }
    }

    /// Opens a server into a slot already counted in `open`.
    async fn open(self: &Arc<Self>, pool: PoolId) -> Result<ServerConn, PoolError> {
        let slot = SlotGuard {
            pools: self,
            pool,
            armed: true,
        };
        let settings = self.settings(pool);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let server =
            ServerConn::connect(&settings, pool, id, self.config.server_connect_timeout).await;
        let mut slot = slot;
        match server {
            Ok(server) => {
                slot.armed = false;
                let mut st = self.lock();
                let p = &mut st.pools[pool];
                if p.params.is_none() {
                    p.params = Some(Arc::new(server.reported.clone()));
                }
                tracing::debug!(server = id, database = %settings.database, "opened server connection");
                Ok(server)
            }
            Err(e) => {
                self.lock().pools[pool].retry_after = Some(Instant::now() + CONNECT_RETRY_DELAY);
                tracing::warn!(database = %settings.database, user = %settings.user, error = %e, "server connection failed");
                Err(e.into())
            }
        }
    }

    /// Returns a clean, idle server: to the oldest waiter, else to the idle list.
    fn checkin(&self, mut server: ServerConn) {
        server.last_used = Instant::now();
        if server.created.elapsed() >= self.config.server_lifetime {
            return self.discard(server);
        }
        let mut st = self.lock();
        let p = &mut st.pools[server.pool];
        let mut server = server;
        while let Some(w) = p.waiters.pop_front() {
            match w.tx.send(Grant::Server(server)) {
                Ok(()) => return,
                Err(Grant::Server(back)) => server = back,
                Err(Grant::Slot) => unreachable!("sent a server"),
            }
        }
        p.idle.push(server);
    }

    /// Closes a server and gives its slot to the next waiter.
    pub fn discard(&self, server: ServerConn) {
        let pool = server.pool;
        server.close();
        self.free_slot(&mut self.lock(), pool);
    }

    fn free_slot(&self, st: &mut State, pool: PoolId) {
        let p = &mut st.pools[pool];
        p.open -= 1;
        while let Some(w) = p.waiters.pop_front() {
            p.open += 1;
            if w.tx.send(Grant::Slot).is_ok() {
                return;
            }
            p.open -= 1;
        }
    }

    /// Removes idle servers for which `expired` is true, keeping at least `keep` open per
    /// pool; returns them for closing outside the lock. Used by the janitor.
    fn take_expired(&self, now: Instant) -> Vec<ServerConn> {
        let mut st = self.lock();
        let mut out = Vec::new();
        let idle_timeout = self.config.server_idle_timeout;
        let lifetime = self.config.server_lifetime;
        for p in st.pools.iter_mut() {
            let min = p.settings.min_pool_size;
            let mut i = 0;
            while i < p.idle.len() {
                let s = &p.idle[i];
                let too_old = now.duration_since(s.created) >= lifetime;
                let too_idle = !idle_timeout.is_zero()
                    && now.duration_since(s.last_used) >= idle_timeout
                    && p.open > min;
                if too_old || too_idle {
                    out.push(p.idle.remove(i));
                    p.open -= 1;
                } else {
                    i += 1;
                }
            }
        }
        out
    }

    /// Reserves slots to bring pools up to `min_pool_size`; returns the pools to open for.
    fn reserve_minimum(&self) -> Vec<PoolId> {
        let mut st = self.lock();
        let mut out = Vec::new();
        let now = Instant::now();
        for (id, p) in st.pools.iter_mut().enumerate() {
            if p.retry_after.is_some_and(|t| now < t) {
                continue;
            }
            while p.open < p.settings.min_pool_size.min(p.settings.pool_size) {
                p.open += 1;
                out.push(id);
            }
        }
        out
    }

    /// Opens a server into a reserved slot and makes it idle (the janitor's top-up).
    async fn open_idle(self: &Arc<Self>, pool: PoolId) {
        if let Ok(server) = self.open(pool).await {
            self.checkin(server);
        }
    }
}

enum Step {
    Idle(ServerConn),
    Open,
    Wait(WaitGuard),
}

/// A place in a pool's queue. Dropping it leaves the queue and returns anything granted.
struct WaitGuard {
    pools: Arc<Pools>,
    pool: PoolId,
    id: u64,
    rx: Option<oneshot::Receiver<Grant>>,
}

impl WaitGuard {
    async fn wait(&mut self, deadline: Instant) -> Option<Grant> {
        let rx = self.rx.as_mut()?;
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Ok(Ok(grant)) => {
                self.rx = None;
                Some(grant)
            }
            _ => None,
        }
    }
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else { return };
        let mut st = self.pools.lock();
        st.pools[self.pool].waiters.retain(|w| w.id != self.id);
        // A grant sent before we left the queue is still in the channel: give it back.
        rx.close();
        match rx.try_recv() {
            Ok(Grant::Server(server)) => {
                drop(st);
                self.pools.checkin(server);
            }
            Ok(Grant::Slot) => self.pools.free_slot(&mut st, self.pool),
            Err(_) => {}
        }
    }
}

/// A slot counted in `open` while its server is being opened; freed if opening fails or
/// the opener goes away.
struct SlotGuard<'a> {
    pools: &'a Pools,
    pool: PoolId,
    armed: bool,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.pools.free_slot(&mut self.pools.lock(), self.pool);
        }
    }
}

/// A server lent to one client. [`Checkout::release`] returns it clean; dropping closes it.
#[derive(Debug)]
pub struct Checkout {
    server: Option<ServerConn>,
    pools: Arc<Pools>,
}

impl Checkout {
    pub fn server(&mut self) -> &mut ServerConn {
        self.server
            .as_mut()
            .expect("a checkout holds its server until released")
    }

    /// Gives the server back for reuse. Only for a server that is idle, outside any
    /// transaction, with nothing unread.
    pub fn release(mut self) {
        if let Some(server) = self.server.take() {
            debug_assert!(server.buf.is_empty() && server.scanner.at_boundary());
            self.pools.checkin(server);
        }
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            tracing::debug!(server = server.id, "closing server connection in doubt");
            self.pools.discard(server);
        }
    }
}
