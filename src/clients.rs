//! The connected clients, for `SHOW CLIENTS`, `SHOW SERVERS`, the client gauges and the
//! per-application figures.
//!
//! Each logged-in client has one [`Client`] entry. Its session writes the entry's state
//! with plain atomic stores, once per transaction (waiting, active, idle) and, inside the
//! relay, at the start and end of each stretch in which its server sits idle inside an open
//! transaction. Readers (a scrape, the admin console) walk the registry under its lock,
//! which no client path takes after login.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use crate::clock::stamp;
use crate::metrics::AppMetrics;
use crate::pool::PoolId;

/// Where a client stands (PgBouncer's client states, plus `idle`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    /// Logged in, holding no server, nothing asked.
    Idle = 0,
    /// Sent a request and waits for a server.
    Waiting = 1,
    /// Holds a server.
    Active = 2,
}

impl ClientState {
    pub const ALL: [ClientState; 3] =
        [ClientState::Active, ClientState::Waiting, ClientState::Idle];

    pub fn as_str(self) -> &'static str {
        match self {
            ClientState::Idle => "idle",
            ClientState::Waiting => "waiting",
            ClientState::Active => "active",
        }
    }

    fn from_u8(v: u8) -> ClientState {
        match v {
            1 => ClientState::Waiting,
            2 => ClientState::Active,
            _ => ClientState::Idle,
        }
    }
}

/// The server a client holds, as far as `SHOW SERVERS` shows it.
#[derive(Debug, Clone)]
pub struct ServerLink {
    pub id: u64,
    /// The PostgreSQL server's address.
    pub addr: crate::socket::Addr,
    pub local: Option<crate::socket::Addr>,
    /// The backend's process id (from its BackendKeyData).
    pub pid: i32,
    pub connect_time: SystemTime,
}

/// The application a client belongs to: its `application_name` and the metric handles of
/// the (bounded) label it was given.
#[derive(Debug, Clone)]
pub struct AppSlot {
    pub name: String,
    pub metrics: Arc<AppMetrics>,
}

/// One logged-in client.
#[derive(Debug)]
pub struct Client {
    pub id: u64,
    pub pool: PoolId,
    /// Shared with the other clients of the same name (see [`Clients::name`]).
    pub database: Arc<str>,
    pub user: Arc<str>,
    pub addr: Option<crate::socket::Addr>,
    pub local: Option<crate::socket::Addr>,
    /// TLS protocol and cipher suite, empty for plain TCP (SHOW CLIENTS `tls`).
    pub tls: Box<str>,
    /// The client task's waker while it watches for shutdown (see [`crate::shutdown::Watch`]).
    pub stop_waker: atomic_waker::AtomicWaker,
    /// A reload removed its database or user: it leaves at its next transaction boundary,
    /// as at a drain (set before `stop_waker` is woken).
    pub removed: AtomicBool,
    pub connect_time: SystemTime,
    /// The process id in the BackendKeyData pgsluice gave the client.
    pub pid: i32,
    state: AtomicU8,
    /// When the current wait began (a [`crate::clock`] stamp); 0 when not waiting.
    wait_began: AtomicU64,
    /// Latest request (a [`crate::clock`] stamp); 0 before the first.
    request_time: AtomicU64,
    /// When the server this client holds last became idle inside an open transaction
    /// (a [`crate::clock`] stamp); 0 when it is not idle in a transaction.
    idle_began: AtomicU64,
    /// Up to when that idle stretch has been added to the application's counter (same
    /// unit); moved forward by scrapes, taken by the relay when the stretch ends.
    idle_counted: AtomicU64,
    app: Mutex<AppSlot>,
    /// The server it last held (shared with the server's other clients): current while the
    /// client is active. Not cleared when it goes idle: one lock per transaction, not two.
    server: Mutex<Option<Arc<ServerLink>>>,
    /// Whether it is parked: `RUNNING`, `ASKED` or `PARKED` (see [`Clients::park_idle`]).
    parking: AtomicU8,
}

/// A client is served (it may be asked to park when it has been idle for [`PARK_AFTER`]).
const RUNNING: u8 = 0;
/// The sweep asked the client to park; it does at its idle wait.
const ASKED: u8 = 1;
/// The client is parked: no serving future, its session waits in its connection's task for
/// its next bytes.
const PARKED: u8 = 2;

/// How long a client sits idle (since its latest request, or its login) before it is asked
/// to park: long enough that a client between the statements of a busy loop keeps its serving
/// future, short enough that the idle connections of an app's pool hold little memory.
pub const PARK_AFTER: Duration = Duration::from_secs(1);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Client {
    #[inline]
    fn stamp(&self, at: Instant) -> u64 {
        stamp(at)
    }

    fn since(&self, stamp: u64, now: Instant) -> Duration {
        let now = self.stamp(now);
        Duration::from_micros(now.saturating_sub(stamp))
    }

    pub fn state(&self) -> ClientState {
        ClientState::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// The sweep asked this idle client to park (it wakes `stop_waker` when it does).
    pub fn asked_to_park(&self) -> bool {
        self.parking.load(Ordering::Acquire) == ASKED
    }

    /// The client sent a request at stamp `at` (SHOW CLIENTS `request_time`; see
    /// [`crate::clock`]), turned into wall-clock time only when shown.
    pub fn set_request_time(&self, at: u64) {
        self.request_time.store(at, Ordering::Relaxed);
    }

    /// The client queues for a server since stamp `stamp` (see [`crate::clock`]).
    pub fn set_waiting(&self, stamp: u64) {
        self.request_time.store(stamp, Ordering::Relaxed);
        self.wait_began.store(stamp, Ordering::Relaxed);
        self.state
            .store(ClientState::Waiting as u8, Ordering::Relaxed);
    }

    /// The client got `server`.
    pub fn set_active(&self, server: Arc<ServerLink>) {
        let last = lock(&self.server).replace(server);
        drop(last);
        self.wait_began.store(0, Ordering::Relaxed);
        self.state
            .store(ClientState::Active as u8, Ordering::Relaxed);
    }

    /// The client holds no server and waits for nothing.
    pub fn set_idle(&self) {
        self.wait_began.store(0, Ordering::Relaxed);
        self.idle_began.store(0, Ordering::Relaxed);
        self.state.store(ClientState::Idle as u8, Ordering::Relaxed);
    }

    /// How long the client has been waiting for a server, if it is.
    pub fn waiting_for(&self, now: Instant) -> Option<Duration> {
        match self.wait_began.load(Ordering::Relaxed) {
            0 => None,
            s => Some(self.since(s, now)),
        }
    }

    /// Time since the client's latest request began; `None` before its first.
    pub fn since_request(&self, now: Instant) -> Option<Duration> {
        match self.request_time.load(Ordering::Relaxed) {
            0 => None,
            s => Some(self.since(s, now)),
        }
    }

    pub fn request_time(&self) -> Option<SystemTime> {
        match self.request_time.load(Ordering::Relaxed) {
            0 => None,
            s => Some(SystemTime::now() - self.since(s, Instant::now())),
        }
    }

    /// The server the client holds, if it is active.
    pub fn server(&self) -> Option<Arc<ServerLink>> {
        if self.state() != ClientState::Active {
            return None;
        }
        lock(&self.server).clone()
    }

    pub fn app(&self) -> AppSlot {
        lock(&self.app).clone()
    }

    pub fn set_app(&self, slot: AppSlot) {
        *lock(&self.app) = slot;
    }

    /// The server became idle inside an open transaction at stamp `s` (from the relay).
    #[inline]
    pub fn idle_in_transaction_began(&self, s: u64) {
        self.idle_counted.store(s, Ordering::Relaxed);
        self.idle_began.store(s, Ordering::Relaxed);
    }

    /// The idle stretch ended at stamp `end`; returns the part of it not yet added to the
    /// application's counter by a scrape, in µs.
    #[inline]
    pub fn idle_in_transaction_ended(&self, end: u64) -> u64 {
        self.idle_began.store(0, Ordering::Relaxed);
        match self.idle_counted.swap(0, Ordering::AcqRel) {
            0 => 0,
            s => end.saturating_sub(s),
        }
    }

    /// How long the server has been idle inside the current transaction, if it is.
    pub fn idle_in_transaction_for(&self, now: Instant) -> Option<Duration> {
        match self.idle_began.load(Ordering::Relaxed) {
            0 => None,
            s => Some(self.since(s, now)),
        }
    }

    /// For a scrape: takes the uncounted part of the current idle stretch up to `now`, so
    /// the application's counter grows while a transaction hoards its server.
    pub fn take_idle_in_transaction(&self, now: Instant) -> Duration {
        let s = self.idle_counted.load(Ordering::Acquire);
        if s == 0 {
            return Duration::ZERO;
        }
        let n = self.stamp(now).max(s);
        match self
            .idle_counted
            .compare_exchange(s, n, Ordering::AcqRel, Ordering::Relaxed)
        {
            Ok(_) => Duration::from_micros(n - s),
            // The stretch ended meanwhile; the relay counted it.
            Err(_) => Duration::ZERO,
        }
    }
}

/// Everyone connected.
#[derive(Debug)]
pub struct Clients {
    next_id: AtomicU64,
    /// Database and user names, each kept once for all the clients that use it. Only
    /// names that logged in get here, so the set stays as small as the configuration (or
    /// the `auth_query` users that connect).
    names: Mutex<crate::Set<Arc<str>>>,
    map: Mutex<BTreeMap<u64, Arc<Client>>>,
    /// Connections that have not finished logging in.
    logging_in: AtomicU32,
    /// Clients parked (see [`Clients::park_idle`]).
    parked: AtomicU32,
    /// Woken whenever a client leaves (for draining).
    left: tokio::sync::Notify,
}

impl Default for Clients {
    fn default() -> Self {
        Clients {
            next_id: AtomicU64::new(1),
            names: Mutex::default(),
            map: Mutex::new(BTreeMap::new()),
            logging_in: AtomicU32::new(0),
            parked: AtomicU32::new(0),
            left: tokio::sync::Notify::new(),
        }
    }
}

/// A new client's details, for [`Clients::register`].
#[derive(Debug)]
pub struct NewClient<'a> {
    pub pool: PoolId,
    pub database: &'a str,
    pub user: &'a str,
    pub addr: Option<crate::socket::Addr>,
    pub local: Option<crate::socket::Addr>,
    pub tls: String,
    pub pid: i32,
    pub app: AppSlot,
}

/// A client's place in the registry; dropping it removes the client.
#[derive(Debug)]
pub struct Registration {
    clients: Arc<Clients>,
    pub client: Arc<Client>,
}

impl Registration {
    /// The client's task ends; its session waits in a parked one.
    pub fn park(&self) {
        self.client.parking.store(PARKED, Ordering::Relaxed);
        self.clients.parked.fetch_add(1, Ordering::Relaxed);
    }

    /// The client is served again.
    pub fn resume(&self) {
        if self.client.parking.swap(RUNNING, Ordering::Relaxed) == PARKED {
            self.clients.parked.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.resume();
        lock(&self.clients.map).remove(&self.client.id);
        self.clients.left.notify_waiters();
    }
}

/// A connection still logging in; dropping it ends the count.
#[derive(Debug)]
pub struct LoginGuard(Arc<Clients>);

impl Drop for LoginGuard {
    fn drop(&mut self) {
        self.0.logging_in.fetch_sub(1, Ordering::Relaxed);
        self.0.left.notify_waiters();
    }
}

impl Clients {
    /// `name` as the one shared copy.
    fn name(&self, name: &str) -> Arc<str> {
        let mut names = lock(&self.names);
        if let Some(n) = names.get(name) {
            return n.clone();
        }
        let n: Arc<str> = name.into();
        names.insert(n.clone());
        n
    }

    pub fn register(self: &Arc<Self>, c: NewClient<'_>) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let client = Arc::new(Client {
            id,
            pool: c.pool,
            database: self.name(c.database),
            user: self.name(c.user),
            addr: c.addr,
            local: c.local,
            tls: c.tls.into_boxed_str(),
            stop_waker: Default::default(),
            removed: AtomicBool::new(false),
            connect_time: SystemTime::now(),
            pid: c.pid,
            state: AtomicU8::new(ClientState::Idle as u8),
            wait_began: AtomicU64::new(0),
            request_time: AtomicU64::new(0),
            idle_began: AtomicU64::new(0),
            idle_counted: AtomicU64::new(0),
            app: Mutex::new(c.app),
            server: Mutex::new(None),
            parking: AtomicU8::new(RUNNING),
        });
        lock(&self.map).insert(id, client.clone());
        Registration {
            clients: self.clone(),
            client,
        }
    }

    /// Counts a connection as logging in until the guard drops.
    pub fn logging_in(self: &Arc<Self>) -> LoginGuard {
        self.logging_in.fetch_add(1, Ordering::Relaxed);
        LoginGuard(self.clone())
    }

    pub fn login_count(&self) -> u32 {
        self.logging_in.load(Ordering::Relaxed)
    }

    /// Clients whose task is parked.
    pub fn parked_count(&self) -> u32 {
        self.parked.load(Ordering::Relaxed)
    }

    /// Asks every client idle for `after` (since its latest request, or since it logged in)
    /// to park: to drop its serving future and wait for its next bytes with its session only.
    /// A serving future is sized by its largest state (a queued wait for a server), about
    /// 1.1 KiB that an idle client does not need. Returns how many were asked.
    ///
    /// One walk of the registry under its lock per call (a few µs per thousand clients);
    /// the wake-ups happen after the lock is released.
    pub fn park_idle(&self, now: Instant, after: Duration) -> usize {
        let cutoff = now.checked_sub(after).map_or(0, crate::clock::stamp);
        let login_cutoff = SystemTime::now() - after;
        let asked: Vec<Arc<Client>> = lock(&self.map)
            .values()
            .filter(|c| {
                c.state() == ClientState::Idle
                    && c.parking.load(Ordering::Relaxed) == RUNNING
                    && match c.request_time.load(Ordering::Relaxed) {
                        0 => c.connect_time <= login_cutoff,
                        r => r <= cutoff,
                    }
            })
            .cloned()
            .collect();
        for c in &asked {
            // Only a running client is asked: a parked one must not be woken for nothing.
            if c.parking
                .compare_exchange(RUNNING, ASKED, Ordering::Release, Ordering::Relaxed)
                .is_ok()
            {
                c.stop_waker.wake();
            }
        }
        asked.len()
    }

    /// Every logged-in client, oldest first.
    /// A reload removed these pools: their clients are told to leave at their next
    /// transaction boundary, and woken to see it (an idle, parked or queued client leaves
    /// at once; a session-mode client between transactions too).
    pub fn pools_removed(&self, pools: &[crate::pool::PoolId]) {
        if pools.is_empty() {
            return;
        }
        for c in lock(&self.map).values() {
            if pools.contains(&c.pool) {
                c.removed.store(true, Ordering::Release);
                c.stop_waker.wake();
            }
        }
    }

    pub fn all(&self) -> Vec<Arc<Client>> {
        lock(&self.map).values().cloned().collect()
    }

    /// Whether any client matches `f` (looked at under the registry's lock: `f` must not
    /// take it again).
    pub fn any(&self, f: impl Fn(&Client) -> bool) -> bool {
        lock(&self.map).values().any(|c| f(c))
    }

    pub fn len(&self) -> usize {
        lock(&self.map).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until no client is connected or logging in.
    pub async fn wait_until_empty(&self) {
        loop {
            let left = self.left.notified();
            tokio::pin!(left);
            left.as_mut().enable();
            if self.is_empty() && self.login_count() == 0 {
                return;
            }
            left.await;
        }
    }
}

/// Every second, asks the clients idle for [`PARK_AFTER`] to park (see
/// [`Clients::park_idle`]). Ends when the registry is gone.
pub async fn parker(clients: std::sync::Weak<Clients>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(clients) = clients.upgrade() else {
            return;
        };
        clients.park_idle(Instant::now(), PARK_AFTER);
    }
}
