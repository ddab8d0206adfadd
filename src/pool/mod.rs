//! Pools of server connections, one per (database, user), behind one lock, drawing on a
//! budget per upstream server.
//!
//! One mutex guards every pool's idle list, counts and waiters. It is held only for a few
//! pointer moves per checkout or checkin (never across I/O), and a single lock makes the
//! limits that span pools (the global budget, `max_db_connections`, `max_user_connections`)
//! exact and their queue fair.
//!
//! Rules:
//! - Checkout takes the most recently used idle server (a hot set; the janitor shrinks the
//!   rest), else opens one if every limit allows, else queues the client (FIFO).
//! - When the budget, `max_db_connections` or `max_user_connections` holds a pool back and
//!   an idle server of another pool counts against the same limit, that server is closed to
//!   make room (least recently used first); the room goes to whoever waited longest for it.
//! - Checkin hands the server straight to the oldest waiter of its pool; else, when a client
//!   of another pool has waited longer for room this server holds (the budget or a cap),
//!   closes it so that client can open one; else makes it idle. A server above a lowered
//!   limit (pool size, cap, budget) closes instead.
//! - A freed slot goes to the oldest waiter, across pools and upstream servers, whose
//!   limits allow it.
//! - A waiter handed a server it cannot use (found dead, or failing `server_check_query`)
//!   keeps its turn: it opens a new server in that slot when its limits allow.
//! - A [`Checkout`] dropped without [`Checkout::release`] closes its server: a server in
//!   doubt is never reused.

pub mod health;
pub mod janitor;
pub mod pause;
pub mod queue;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::sync::Notify;

use crate::budget::Snapshot;
use arc_swap::{ArcSwap, Guard};

use crate::auth::upstream::UpstreamKeys;
use crate::config::{BudgetMode, Config, PoolSettings};
use crate::prepared::KnownStatements;
use crate::server::{ServerConn, ServerError};
use crate::session_params::Reported;
pub use health::Retire;
use queue::{WaitCell, WaitGuard, Waiter};

/// A server connection as pools hold it: boxed, so the pool's lists, hand-overs and
/// checkouts move a pointer instead of the whole connection state.
type Server = Box<ServerConn>;

#[derive(Debug, Error)]
pub enum PoolError {
    #[error("query_wait_timeout: no server connection became free within {0:?}")]
    WaitTimeout(Duration),
    #[error("the connection budget for {upstream} is not known yet: {reason}")]
    BudgetUnknown { upstream: String, reason: String },
    #[error(transparent)]
    Server(#[from] ServerError),
    /// A reload removed the pool's database or user.
    #[error("the database or user was removed from the configuration")]
    Removed,
}

/// How long the janitor waits before topping a pool up again after a failed connect.
const CONNECT_RETRY_DELAY: Duration = Duration::from_secs(5);

/// A returned server closes to give its room (the budget, a cap) to a client of another
/// pool that began before the oldest client of its own pool, only when that client's pool
/// has no server coming back to it or when it began this much earlier: arrival order
/// across pools, within this slack, without closing and opening a server at every other
/// checkin while both pools are busy.
const CROSS_POOL_SLACK: Duration = Duration::from_millis(100);

/// First pause before a client retries a failed server connection; it doubles up to the max.
const FIRST_RETRY_BACKOFF: Duration = Duration::from_millis(50);
/// Longest pause between retries: a database back up is used within this.
const MAX_RETRY_BACKOFF: Duration = Duration::from_millis(500);

/// Identifies a pool for its whole life.
pub type PoolId = usize;
/// Identifies an upstream server's budget.
pub type BudgetId = usize;

/// What a reload did that the rest of the proxy must act on.
#[derive(Debug, Default)]
pub struct Reloaded {
    /// Budgets it created: in auto mode each needs its control connection.
    pub created: Vec<BudgetId>,
    /// Pools it removed (their database or user left the configuration).
    pub removed: Vec<PoolId>,
}

/// What a waiter is handed.
#[derive(Debug)]
enum Grant {
    /// An idle server, ready to use.
    Server(Server),
    /// A reserved slot: the waiter opens the server itself.
    Slot,
    /// The budget could not be read: give up with this reason.
    BudgetUnknown(String),
    /// `query_wait_timeout` passed.
    TimedOut,
    /// A reload removed the pool.
    Removed,
}

/// One pool's state.
#[derive(Debug)]
struct Pool {
    settings: Arc<PoolSettings>,
    budget: BudgetId,
    /// Idle servers; the last is the most recently used.
    idle: Vec<Server>,
    /// Servers that exist or are being opened (idle + active + connecting).
    open: u32,
    /// Servers being opened.
    connecting: u32,
    waiters: VecDeque<Waiter>,
    /// ParameterStatus set of the first server, shown to clients at login.
    params: Option<Arc<Reported>>,
    /// After a failed connect, the janitor leaves the pool alone until then.
    retry_after: Option<Instant>,
    /// Named statements a server of this pool prepared successfully.
    known: Arc<KnownStatements>,
    /// Its database or user left the configuration: its clients leave at their next
    /// transaction boundary and no new client gets it.
    removed: bool,
    /// RECONNECT: servers with a smaller id close as soon as they are idle.
    reconnect_below: u64,
    /// Servers running `server_check_query` before being handed out.
    testing: u32,
    /// Servers closed by the health rules, by [`Retire`] reason.
    retired: [u64; Retire::ALL.len()],
    /// PAUSE: no server is handed out; clients wait in the queue.
    paused: bool,
}

/// The budget of one upstream server, shared by its pools.
#[derive(Debug)]
struct Budget {
    upstream: String,
    /// Servers of all its pools.
    open: u32,
    /// How many servers the pools may hold; `None` until the budget is known.
    limit: Option<u32>,
    /// Control connections held against the budget (0 or 1).
    control: u32,
    /// Other connections of the proxy's own counted against the budget: `auth_query`
    /// lookup connections (see [`Pools::hold_auxiliary`]).
    auxiliary: u32,
    snapshot: Snapshot,
    /// RECONNECTs of any of its pools: its control connection is replaced after each.
    reconnects: u64,
}

impl Budget {
    /// Connections counted against what the pools may hold.
    fn used(&self) -> u32 {
        self.open + self.auxiliary
    }
}

#[derive(Debug, Default)]
struct State {
    /// Pools by database, then user: looked up without building an owned key.
    by_key: crate::Map<String, crate::Map<String, PoolId>>,
    pools: Vec<Pool>,
    budgets: Vec<Budget>,
    sweep: queue::Sweep,
    timing: Timing,
    paused: pause::Paused,
}

/// Settings the hot paths read under the lock (copied from the configuration).
#[derive(Debug, Default)]
struct Timing {
    /// In microseconds, as the servers' stamps count (see [`crate::clock`]).
    server_lifetime_us: u64,
    query_wait_notify: Duration,
}

/// Why a pool may not open a server now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Blocked {
    /// A reload removed the pool: it opens no server again.
    Removed,
    /// PAUSE.
    Paused,
    PoolSize,
    /// `max_db_connections` or `max_user_connections`.
    Cap,
    Budget,
    BudgetUnknown,
}

impl State {
    /// The pool of a database and user, if one was made.
    fn find(&self, database: &str, user: &str) -> Option<PoolId> {
        self.by_key.get(database)?.get(user).copied()
    }

    fn blocked(&self, id: PoolId) -> Option<Blocked> {
        let p = &self.pools[id];
        let s = &p.settings;
        if p.removed {
            return Some(Blocked::Removed);
        }
        if p.paused {
            return Some(Blocked::Paused);
        }
        if p.open >= s.pool_size {
            return Some(Blocked::PoolSize);
        }
        if s.max_db_connections > 0
            && self.sum_open(|q| q.database == s.database) >= s.max_db_connections
        {
            return Some(Blocked::Cap);
        }
        if s.max_user_connections > 0
            && self.sum_open(|q| q.user == s.user) >= s.max_user_connections
        {
            return Some(Blocked::Cap);
        }
        let b = &self.budgets[p.budget];
        match b.limit {
            None => Some(Blocked::BudgetUnknown),
            Some(l) if b.used() >= l => Some(Blocked::Budget),
            Some(_) => None,
        }
    }

    /// Counts a server about to be opened for `id`.
    fn reserve(&mut self, id: PoolId) {
        let p = &mut self.pools[id];
        p.open += 1;
        p.connecting += 1;
        self.budgets[p.budget].open += 1;
    }

    /// Uncounts a server of `id` that is gone.
    fn release(&mut self, id: PoolId) {
        let p = &mut self.pools[id];
        p.open -= 1;
        self.budgets[p.budget].open -= 1;
    }

    /// Counts again a server [`State::release`] uncounted for a look ahead.
    fn unrelease(&mut self, id: PoolId) {
        let p = &mut self.pools[id];
        p.open += 1;
        self.budgets[p.budget].open += 1;
    }

    /// True when `id` holds more servers than a limit now allows (a reload or a new
    /// budget lowered it): such a server closes instead of staying idle. The caps' sums
    /// over pools are only taken when a cap is set.
    fn over_limit(&self, id: PoolId) -> bool {
        let p = &self.pools[id];
        let s = &p.settings;
        let b = &self.budgets[p.budget];
        p.removed
            || p.open > s.pool_size
            || b.limit.is_some_and(|l| b.used() > l)
            || (s.max_db_connections > 0
                && self.sum_open(|q| q.database == s.database) > s.max_db_connections)
            || (s.max_user_connections > 0
                && self.sum_open(|q| q.user == s.user) > s.max_user_connections)
    }

    /// Servers of the pools whose settings match.
    fn sum_open(&self, same: impl Fn(&PoolSettings) -> bool) -> u32 {
        self.pools
            .iter()
            .filter(|q| same(&q.settings))
            .map(|q| q.open)
            .sum()
    }

    /// True when pools `a` and `b` count against a limit in common: the budget, or a
    /// `max_db_connections` or `max_user_connections` that applies to both.
    fn share_room(&self, a: PoolId, b: PoolId) -> bool {
        let (p, q) = (&self.pools[a], &self.pools[b]);
        let (s, t) = (&p.settings, &q.settings);
        p.budget == q.budget
            || (s.database == t.database && (s.max_db_connections > 0 || t.max_db_connections > 0))
            || (s.user == t.user && (s.max_user_connections > 0 || t.max_user_connections > 0))
    }

    /// True when a server of pool `id`, returned at `now`, should close to give its room to
    /// a client of another pool (see [`CROSS_POOL_SLACK`]): one that waits for room that
    /// closing it would give (the budget, `max_db_connections` or `max_user_connections`),
    /// began before `own` (the oldest waiter of `id`, if any, else the present) and either
    /// has no server of its own coming back or began `CROSS_POOL_SLACK` before that.
    fn room_wanted_elsewhere(&mut self, id: PoolId, own: Option<Instant>) -> bool {
        let waits_for_room = |st: &State, i: PoolId| {
            i != id && !st.pools[i].waiters.is_empty() && st.share_room(i, id)
        };
        if !(0..self.pools.len()).any(|i| waits_for_room(self, i)) {
            return false; // the common case: one pass, no look ahead
        }
        let own = own.unwrap_or_else(Instant::now);
        self.release(id);
        let wanted = (0..self.pools.len()).any(|i| {
            let q = &self.pools[i];
            let since = q.waiters.front().map_or(own, |w| w.since);
            waits_for_room(self, i)
                && since < own
                && (!self.coming_back(i) || since + CROSS_POOL_SLACK < own)
                && self.blocked(i).is_none()
        });
        self.unrelease(id);
        wanted
    }

    /// Takes the least recently used idle server of budget `b` outside pool `except`.
    fn steal_idle(&mut self, b: BudgetId, except: Option<PoolId>) -> Option<Server> {
        let (pool, _) = self
            .pools
            .iter()
            .enumerate()
            .filter(|(i, p)| p.budget == b && Some(*i) != except && !p.idle.is_empty())
            .min_by_key(|(_, p)| p.idle[0].last_used)?;
        let server = self.pools[pool].idle.remove(0);
        self.release(pool);
        Some(server)
    }

    /// True when pool `id` has servers lent or being opened: they come back to its waiters.
    fn coming_back(&self, id: PoolId) -> bool {
        let p = &self.pools[id];
        p.open as usize > p.idle.len()
    }

    /// Takes the least recently used idle server, of another pool, whose closing would let
    /// `id` open one (it is held back by the budget or a cap that the two pools share).
    /// Unless `any`, only a server idle `CROSS_POOL_SLACK` or more at `now` is taken: one
    /// used just now is likely to be used again at once by its own pool.
    fn steal_room_for(&mut self, id: PoolId, now: Instant, any: bool) -> Option<Server> {
        let (now, slack) = (
            crate::clock::stamp(now),
            crate::clock::micros(CROSS_POOL_SLACK),
        );
        let mut candidates: Vec<(u64, PoolId)> = self
            .pools
            .iter()
            .enumerate()
            .filter(|(i, p)| *i != id && !p.idle.is_empty())
            .map(|(i, p)| (p.idle[0].last_used, i))
            .filter(|(used, _)| any || now.saturating_sub(*used) >= slack)
            .collect();
        candidates.sort_unstable();
        for (_, victim) in candidates {
            self.release(victim);
            if self.blocked(id).is_none() {
                return Some(self.pools[victim].idle.remove(0));
            }
            self.unrelease(victim);
        }
        None
    }

    /// [`State::grant_slots`], and room for the oldest waiters held back by the budget or a
    /// cap that other pools hold with idle servers: those close (returned, for closing
    /// outside the lock). For waiters that queued while they could not be served (PAUSE).
    fn make_room_for_waiters(&mut self) -> Vec<Server> {
        let mut closing = Vec::new();
        loop {
            self.grant_slots();
            let oldest = (0..self.pools.len())
                .filter(|&i| {
                    !self.pools[i].waiters.is_empty()
                        && matches!(self.blocked(i), Some(Blocked::Budget | Blocked::Cap))
                })
                .min_by_key(|&i| self.pools[i].waiters[0].seq);
            match oldest.and_then(|id| self.steal_room_for(id, Instant::now(), true)) {
                Some(server) => closing.push(server),
                None => return closing,
            }
        }
    }

    /// Gives freed room to the oldest waiters, across pools, whose limits allow it.
    fn grant_slots(&mut self) {
        loop {
            let oldest = self
                .pools
                .iter()
                .enumerate()
                .filter(|(i, p)| !p.waiters.is_empty() && self.blocked(*i).is_none())
                .min_by_key(|(_, p)| p.waiters[0].seq)
                .map(|(i, _)| i);
            let Some(id) = oldest else { return };
            let w = self.pools[id]
                .waiters
                .pop_front()
                .expect("a pool with waiters");
            self.reserve(id);
            w.give(Grant::Slot);
        }
    }
}

/// A snapshot of one pool's counts, read at scrape time by metrics and the admin console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStats {
    pub database: String,
    pub user: String,
    pub pool_size: u32,
    /// Servers that exist or are being opened.
    pub open: u32,
    pub idle: u32,
    /// Servers being opened (login in progress).
    pub connecting: u32,
    /// Clients queued for a server.
    pub waiting: u32,
    /// Idle servers running `server_check_query` before being handed out.
    pub testing: u32,
    /// Servers closed by the health rules so far, by [`Retire`] reason (`Retire::ALL`'s order).
    pub retired: [u64; Retire::ALL.len()],
}

/// An idle server as SHOW SERVERS lists it.
#[derive(Debug, Clone)]
pub struct IdleServer {
    pub id: u64,
    pub database: String,
    /// The user the server is logged in as.
    pub user: String,
    pub addr: crate::socket::Addr,
    pub local: Option<crate::socket::Addr>,
    pub pid: i32,
    pub connect_time: std::time::SystemTime,
    pub last_used: std::time::SystemTime,
}

/// All pools of the proxy.
#[derive(Debug)]
pub struct Pools {
    state: Mutex<State>,
    /// The configuration, swapped whole by a reload.
    config: ArcSwap<Config>,
    next_id: AtomicU64,
    /// Secrets for logging in upstream: cached salted passwords, passthrough keys.
    pub keys: Arc<UpstreamKeys>,
    /// Some reload removed a pool (set under the lock, never cleared).
    any_removed: AtomicBool,
    /// Counts reloads: a client re-reads the settings it caches when this changes.
    generation: AtomicU64,
    /// `server_check_query` runs with a `server_check_delay` under the janitor's period:
    /// every checkout takes the path that checks (see [`Pools::try_idle`]).
    check_often: AtomicBool,
    /// Wakes the queue's [`queue::sweeper`] when a wait ends sooner than it planned.
    sweep_wake: Arc<Notify>,
    /// Wakes the budgets' control tasks: a RECONNECT, or a reload. A watch, not a
    /// `Notify`: a task busy reading when it changes still sees the change afterwards.
    control_wake: tokio::sync::watch::Sender<()>,
}

impl Pools {
    /// Creates a budget per upstream server and the pools with `min_pool_size` (which
    /// start filling at once). In fixed mode the budget is known from the start; in auto
    /// mode it stays unknown until [`Pools::set_budget`].
    pub fn new(config: Arc<Config>) -> Arc<Pools> {
        let pools = Arc::new(Pools {
            state: Mutex::new(State::default()),
            config: config.into(),
            next_id: AtomicU64::new(1),
            keys: Arc::default(),
            any_removed: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            check_often: AtomicBool::new(false),
            sweep_wake: Arc::default(),
            control_wake: tokio::sync::watch::Sender::new(()),
        });
        pools.apply_timing(&pools.config.load());
        for db in pools.config.load().databases.values() {
            pools.budget_for(&db.host, db.port);
        }
        let config = pools.config.load();
        for db in config.databases.keys() {
            for user in config.users.keys().chain(config.auth_file_users.keys()) {
                if pools
                    .config
                    .load()
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

    fn budget_for(&self, host: &str, port: u16) -> BudgetId {
        let mut st = self.lock();
        let upstream = format!("{host}:{port}");
        if let Some(i) = st.budgets.iter().position(|b| b.upstream == upstream) {
            return i;
        }
        let b = &self.config.load().budget;
        let fixed = (b.mode() == BudgetMode::Fixed).then(|| b.max_server_connections.unwrap_or(1));
        st.budgets.push(Budget {
            upstream,
            open: 0,
            limit: fixed,
            control: 0,
            auxiliary: 0,
            reconnects: 0,
            snapshot: Snapshot {
                mode: if fixed.is_some() { "fixed" } else { "auto" },
                limit: fixed.unwrap_or(0),
                share: fixed.unwrap_or(0),
                fleet_budget: fixed.unwrap_or(0),
                refresh_interval: b.refresh_interval,
                ..Snapshot::default()
            },
        });
        st.budgets.len() - 1
    }

    /// The upstream servers with a budget, as `(id, host, port)`.
    pub fn upstreams(&self) -> Vec<(BudgetId, String, u16)> {
        let st = self.lock();
        st.budgets
            .iter()
            .enumerate()
            .filter_map(|(i, b)| {
                let (h, p) = b.upstream.rsplit_once(':')?;
                Some((i, h.to_owned(), p.parse().ok()?))
            })
            .collect()
    }

    /// The pool for a client-facing database and user; `None` when the database is unknown.
    pub fn pool_for(&self, database: &str, user: &str) -> Option<PoolId> {
        let existing = {
            let st = self.lock();
            st.find(database, user).map(|id| (id, st.pools[id].removed))
        };
        if let Some((id, removed)) = existing {
            return (!removed).then_some(id);
        }
        let settings = self.config.load().pool_settings(database, user)?;
        let budget = self.budget_for(&settings.host, settings.port);
        let mut st = self.lock();
        if let Some(id) = st.find(database, user) {
            return Some(id);
        }
        let id = st.pools.len();
        let paused = st.paused.covers(database);
        st.pools.push(Pool {
            settings: Arc::new(settings),
            budget,
            idle: Vec::new(),
            open: 0,
            connecting: 0,
            waiters: VecDeque::new(),
            params: None,
            retry_after: None,
            known: Arc::default(),
            removed: false,
            reconnect_below: 0,
            testing: 0,
            retired: [0; Retire::ALL.len()],
            paused,
        });
        st.by_key
            .entry(database.to_owned())
            .or_default()
            .insert(user.to_owned(), id);
        Some(id)
    }

    pub fn settings(&self, pool: PoolId) -> Arc<PoolSettings> {
        self.lock().pools[pool].settings.clone()
    }

    /// The configuration in force (a cheap guard; a reload swaps it).
    pub fn config(&self) -> Guard<Arc<Config>> {
        self.config.load()
    }

    /// Changes at every reload (one atomic load: cheaper than [`Pools::config`] for a
    /// client that caches settings per transaction).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// True when the pool's database or user left the configuration.
    pub fn is_removed(&self, pool: PoolId) -> bool {
        // A load on every request; the lock only once some reload removed a pool.
        self.any_removed.load(Ordering::Acquire) && self.lock().pools[pool].removed
    }

    /// Applies a new configuration (already validated, see `crate::reload`): pools take
    /// their new sizes and limits, pools whose database or user is gone are removed (their
    /// idle servers close now, their clients leave at their next transaction boundary), a
    /// fixed budget takes its new size, and new upstream servers get a budget. Returns the
    /// budgets it created (in auto mode they need a control connection) and the pools it
    /// removed (their clients are to leave).
    pub fn reload(&self, new: Config) -> Reloaded {
        let new = Arc::new(new);
        // Counted before the new configuration is seen: a login to a database it adds may
        // make that database's budget at once (`pool_for`), and that budget needs its
        // control connection too.
        let before = self.lock().budgets.len();
        self.config.store(new.clone());
        self.generation.fetch_add(1, Ordering::Release);
        self.apply_timing(&new);
        for db in new.databases.values() {
            self.budget_for(&db.host, db.port);
        }
        let mut closing = Vec::new();
        let mut st = self.lock();
        let created: Vec<BudgetId> = (before..st.budgets.len()).collect();
        if new.budget.mode() == BudgetMode::Fixed {
            let max = new.budget.max_server_connections.unwrap_or(1);
            for b in st.budgets.iter_mut() {
                b.limit = Some(max);
                b.snapshot.limit = max;
                b.snapshot.share = max;
                b.snapshot.fleet_budget = max;
            }
        }
        let mut removed = Vec::new();
        for id in 0..st.pools.len() {
            let p = &mut st.pools[id];
            match new.pool_settings(&p.settings.database, &p.settings.user) {
                Some(s) => {
                    p.removed = false;
                    p.settings = Arc::new(s);
                }
                None if !p.removed => {
                    p.removed = true;
                    self.any_removed.store(true, Ordering::Release);
                    removed.push(id);
                    // Its queued clients leave now (told why); no server opens for them.
                    for w in std::mem::take(&mut p.waiters) {
                        w.give(Grant::Removed);
                    }
                }
                None => {}
            }
        }
        // Idle servers above a new limit (the pool size, a cap, a smaller fixed budget; all
        // of them for a removed pool) close now, pool by pool, each pool's least recently
        // used first; busy ones close when returned.
        for id in 0..st.pools.len() {
            while st.over_limit(id) && !st.pools[id].idle.is_empty() {
                let server = st.pools[id].idle.remove(0);
                closing.push(server);
                st.release(id);
            }
        }
        st.grant_slots();
        drop(st);
        for server in closing {
            server.close();
        }
        // A control task whose server no database uses now lets its connection go; one
        // whose server is used again comes back.
        self.control_wake.send_modify(|_| {});
        Reloaded { created, removed }
    }

    /// The first pool whose database a new configuration points at another upstream
    /// server, database or login (`None`: none). A database present in both the old and
    /// the new configuration is checked by `reload::restart_keys`; this also catches one an
    /// earlier reload removed (its pool, and the servers it may still lend, remain).
    pub fn upstream_changed(&self, new: &Config) -> Option<String> {
        let st = self.lock();
        st.pools.iter().find_map(|p| {
            let (old, now) = (
                &p.settings,
                new.pool_settings(&p.settings.database, &p.settings.user)?,
            );
            let same = (
                &old.host,
                old.port,
                &old.upstream_dbname,
                &old.upstream_user,
            ) == (
                &now.host,
                now.port,
                &now.upstream_dbname,
                &now.upstream_user,
            );
            (!same).then(|| format!("databases.{} (host, port, dbname, user)", old.database))
        })
    }

    /// Named statements known to prepare in this pool (its database and user).
    pub fn known_statements(&self, pool: PoolId) -> Arc<KnownStatements> {
        self.lock().pools[pool].known.clone()
    }

    /// The ParameterStatus set clients of this pool are shown at login, once known.
    pub fn server_params(&self, pool: PoolId) -> Option<Arc<Reported>> {
        self.lock().pools[pool].params.clone()
    }

    pub fn stats(&self) -> Vec<PoolStats> {
        self.lock()
            .pools
            .iter()
            .map(|p| PoolStats {
                database: p.settings.database.clone(),
                user: p.settings.user.clone(),
                pool_size: p.settings.pool_size,
                open: p.open,
                idle: p.idle.len() as u32,
                connecting: p.connecting,
                waiting: p.waiters.len() as u32,
                testing: p.testing,
                retired: p.retired,
            })
            .collect()
    }

    /// The budget figures of every upstream server, as `(upstream, figures)`.
    pub fn budget_snapshots(&self) -> Vec<(String, Snapshot)> {
        self.lock()
            .budgets
            .iter()
            .map(|b| {
                let mut s = b.snapshot.clone();
                s.in_use = b.open + b.control + b.auxiliary;
                (b.upstream.clone(), s)
            })
            .collect()
    }

    /// Server connections the pools of budget `b` hold now, with the proxy's own lookup
    /// connections.
    pub fn budget_open(&self, b: BudgetId) -> u32 {
        self.lock().budgets[b].used()
    }

    /// RECONNECTs of budget `b`'s pools so far.
    pub fn control_reconnects(&self, b: BudgetId) -> u64 {
        self.lock().budgets[b].reconnects
    }

    /// Changes when a control task should look again at once (RECONNECT, a reload).
    pub fn control_wake(&self) -> tokio::sync::watch::Receiver<()> {
        self.control_wake.subscribe()
    }

    /// Sets what the pools of budget `b` may hold (`None`: unknown) and its figures; closes
    /// idle servers above a lowered limit and gives new room to waiters.
    pub fn set_budget(&self, b: BudgetId, limit: Option<u32>, control: u32, snapshot: Snapshot) {
        let mut surplus = Vec::new();
        {
            let mut st = self.lock();
            let budget = &mut st.budgets[b];
            budget.limit = limit;
            budget.control = control;
            budget.snapshot = snapshot;
            if let Some(l) = limit {
                while st.budgets[b].used() > l {
                    match st.steal_idle(b, None) {
                        Some(server) => surplus.push(server),
                        None => break,
                    }
                }
            }
            st.grant_slots();
            if limit.is_none() {
                // The reading failed: clients waiting for it get the reason now.
                let reason = st.budgets[b]
                    .snapshot
                    .last_error
                    .clone()
                    .unwrap_or_default();
                for p in st.pools.iter_mut().filter(|p| p.budget == b && !p.paused) {
                    for w in p.waiters.drain(..) {
                        w.give(Grant::BudgetUnknown(reason.clone()));
                    }
                }
            }
        }
        if !surplus.is_empty() {
            tracing::info!(
                closed = surplus.len(),
                "closing idle servers above the lowered budget"
            );
        }
        for server in surplus {
            server.close();
        }
    }

    /// Copies the timing settings checkin and the queue read on every use, so that they
    /// need no configuration load there.
    fn apply_timing(&self, c: &Config) {
        let often = !c.server_check_query.is_empty() && c.server_check_delay < janitor::PERIOD;
        self.check_often.store(often, Ordering::Relaxed);
        self.lock().timing = Timing {
            server_lifetime_us: crate::clock::micros(c.server_lifetime),
            query_wait_notify: c.query_wait_notify,
        };
    }

    /// An idle server of `pool` right away, if there is one that looks alive: the common
    /// case, with no future, timer or queue entry. (Idle servers are handed to waiters as
    /// they come back, so an idle one means nobody waits.)
    /// A server the janitor found due for `server_check_query` is left to
    /// [`Pools::checkout`], which runs the check.
    pub fn try_idle(self: &Arc<Self>, pool: PoolId) -> Option<Checkout> {
        if self.check_often.load(Ordering::Relaxed) {
            return None;
        }
        loop {
            let server = {
                let mut st = self.lock();
                let p = &mut st.pools[pool];
                if p.paused || p.idle.last().is_none_or(|s| s.check_due) {
                    return None;
                }
                p.idle.pop()?
            };
            if server.looks_alive() {
                return Some(Checkout {
                    server: Some(server),
                    pools: self.clone(),
                    retire: None,
                });
            }
            tracing::info!(
                server = server.id,
                "closing a server found dead or dirty while idle"
            );
            self.discard(server);
        }
    }

    /// Checks a server out, waiting up to `wait` from `now` (the caller's clock reading: the
    /// moment the request began) for one; a wait's grants arrive in `cell` (one per client,
    /// reused). Cancel-safe: dropping the future gives back anything it was granted.
    pub async fn checkout(
        self: &Arc<Self>,
        pool: PoolId,
        wait: Duration,
        cell: &Arc<WaitCell>,
        now: Instant,
    ) -> Result<Checkout, PoolError> {
        let deadline = now.checked_add(wait);
        let mut backoff = FIRST_RETRY_BACKOFF;
        // A server this client was handed could not be used and its slot was kept for it.
        let mut reopen = false;
        loop {
            let mut victim = None;
            let step = if std::mem::take(&mut reopen) {
                Step::Open
            } else {
                let mut st = self.lock();
                if st.pools[pool].removed {
                    return Err(PoolError::Removed);
                }
                if st.pools[pool].paused {
                    Step::Wait(self.enqueue(&mut st, pool, cell, deadline, now))
                } else if let Some(server) = st.pools[pool].idle.pop() {
                    Step::Idle(server)
                } else {
                    let b = st.pools[pool].budget;
                    match st.blocked(pool) {
                        None => {
                            st.reserve(pool);
                            Step::Open
                        }
                        Some(Blocked::BudgetUnknown) => match &st.budgets[b].snapshot.last_error {
                            // The first reading is under way (the proxy just started): wait.
                            None => Step::Wait(self.enqueue(&mut st, pool, cell, deadline, now)),
                            Some(reason) => {
                                return Err(PoolError::BudgetUnknown {
                                    upstream: st.budgets[b].upstream.clone(),
                                    reason: reason.clone(),
                                })
                            }
                        },
                        // Held back by room another pool holds idle: close its least
                        // recently used server (one used just now only when no server of
                        // this pool comes back to it). Clients queued longer for that room
                        // get it first; this one opens only if room is left.
                        Some(Blocked::Budget | Blocked::Cap) => {
                            let any = !st.coming_back(pool);
                            match st.steal_room_for(pool, now, any) {
                                Some(server) => {
                                    victim = Some(server);
                                    st.grant_slots();
                                    if st.blocked(pool).is_none() {
                                        st.reserve(pool);
                                        Step::Open
                                    } else {
                                        Step::Wait(self.enqueue(&mut st, pool, cell, deadline, now))
                                    }
                                }
                                None => {
                                    Step::Wait(self.enqueue(&mut st, pool, cell, deadline, now))
                                }
                            }
                        }
                        Some(_) => Step::Wait(self.enqueue(&mut st, pool, cell, deadline, now)),
                    }
                }
            };
            if let Some(server) = victim {
                tracing::debug!(
                    server = server.id,
                    "closing an idle server of another pool to make room"
                );
                server.close();
            }
            // A server handed over in the queue that cannot be used keeps its slot for this
            // client (see `replace`); one it took from the idle list itself does not.
            let queued = matches!(step, Step::Wait(_));
            let grant = match step {
                Step::Idle(server) => Grant::Server(server),
                Step::Open => Grant::Slot,
                Step::Wait(mut guard) => guard.wait().await,
            };
            match grant {
                Grant::TimedOut => return Err(PoolError::WaitTimeout(wait)),
                Grant::Removed => return Err(PoolError::Removed),
                Grant::BudgetUnknown(reason) => {
                    let st = self.lock();
                    let upstream = st.budgets[st.pools[pool].budget].upstream.clone();
                    return Err(PoolError::BudgetUnknown { upstream, reason });
                }
                Grant::Server(server) => {
                    // Costs no system call unless the socket was flagged readable: a server
                    // that closed (restart, idle_session_timeout, failover) is caught here.
                    if !server.looks_alive() {
                        tracing::info!(
                            server = server.id,
                            "closing a server found dead or dirty while idle"
                        );
                        if queued {
                            reopen = self.replace(server, None);
                        } else {
                            self.discard(server);
                        }
                        continue;
                    }
                    let mut checkout = Checkout {
                        server: Some(server),
                        pools: self.clone(),
                        retire: None,
                    };
                    // server_check_query on a server idle longer than server_check_delay.
                    if !self.check_if_due(&mut checkout, now).await {
                        if queued {
                            let server = checkout.server.take().expect("checked out");
                            reopen = self.replace(server, checkout.retire);
                        }
                        continue; // dropping the checkout closed it; try the next one
                    }
                    return Ok(checkout);
                }
                Grant::Slot => {
                    let e = match Box::pin(self.open(pool)).await {
                        Ok(server) => {
                            return Ok(Checkout {
                                server: Some(server),
                                pools: self.clone(),
                                retire: None,
                            })
                        }
                        Err(e) => e,
                    };
                    // The database restarts or is full for a moment: try again shortly,
                    // within server_login_retry and the client's own wait.
                    let retry = matches!(&e, PoolError::Server(se) if se.is_transient()) && {
                        let retry_until = now + self.config.load().server_login_retry;
                        Instant::now() + backoff
                            < deadline.map_or(retry_until, |d| d.min(retry_until))
                    };
                    if !retry {
                        return Err(e);
                    }
                    tracing::debug!(error = %e, "server connection failed; retrying");
                    // The error is not held across the wait, and the wait is boxed: a rare
                    // path, kept out of every queued checkout's room.
                    drop(e);
                    Box::pin(tokio::time::sleep(backoff)).await;
                    backoff = (backoff * 2).min(MAX_RETRY_BACKOFF);
                }
            }
        }
    }

    /// Opens a server into a slot already reserved.
    async fn open(self: &Arc<Self>, pool: PoolId) -> Result<Server, PoolError> {
        let mut slot = SlotGuard {
            pools: self,
            pool,
            armed: true,
        };
        let settings = self.settings(pool);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let server = ServerConn::connect(
            &settings,
            &self.keys,
            pool,
            id,
            self.config.load().server_connect_timeout,
        )
        .await
        .and_then(|server| health::writable(&settings, server));
        match server {
            Ok(server) => {
                slot.armed = false;
                let mut st = self.lock();
                let p = &mut st.pools[pool];
                p.connecting -= 1;
                if p.params.is_none() {
                    p.params = Some(Arc::new(Reported::new(&server.reported)));
                }
                tracing::debug!(server = id, database = %settings.database, "opened server connection");
                Ok(Box::new(server))
            }
            Err(e) => {
                self.lock().pools[pool].retry_after = Some(Instant::now() + CONNECT_RETRY_DELAY);
                tracing::warn!(database = %settings.database, user = %settings.user, error = %e, "server connection failed");
                Err(e.into())
            }
        }
    }

    /// Returns a clean, idle server (see the module rules).
    fn checkin(&self, server: Server) {
        self.checkin_at(server, crate::clock::stamp_now())
    }

    /// [`Pools::checkin`] of a server last used at stamp `now` (a time the caller read
    /// already; see [`crate::clock`]).
    fn checkin_at(&self, mut server: Server, now: u64) {
        server.last_used = now;
        server.check_due = false;
        let mut st = self.lock();
        if now.saturating_sub(server.created) >= st.timing.server_lifetime_us {
            drop(st);
            return self.discard(server);
        }
        let pool = server.pool;
        // Arrival order across pools, within CROSS_POOL_SLACK: a client of another pool
        // that waits for room this server holds (the budget or a cap) may get it: this
        // server closes and that client opens one.
        let p = &st.pools[pool];
        let own = p.waiters.front().filter(|_| !p.paused).map(|w| w.since);
        let reconnect = server.id < st.pools[pool].reconnect_below;
        if reconnect {
            st.pools[pool].retired[Retire::Reconnect as usize] += 1;
        }
        if reconnect || st.over_limit(pool) || st.room_wanted_elsewhere(pool, own) {
            st.release(pool);
            st.grant_slots();
            drop(st);
            server.close();
            return;
        }
        let p = &mut st.pools[pool];
        let next = if p.paused {
            None
        } else {
            p.waiters.pop_front()
        };
        match next {
            Some(w) => w.give(Grant::Server(server)),
            None => p.idle.push(server),
        }
    }

    /// Closes a server handed to a client that cannot use it (found dead, or failing
    /// `server_check_query`, counted under `why`). True when the client keeps its slot to
    /// open a new one (its pool may still open one): it does not go back to the end of the
    /// queue. Otherwise the slot goes to the next waiter.
    fn replace(&self, server: Server, why: Option<Retire>) -> bool {
        let pool = server.pool;
        let mut st = self.closed(server, why);
        if st.blocked(pool).is_none() {
            st.reserve(pool);
            return true;
        }
        st.grant_slots();
        false
    }

    /// Closes a server and gives its slot to the next waiter.
    pub fn discard(&self, server: Server) {
        self.discard_for(server, None)
    }

    /// [`Pools::discard`], counting why when a health rule retires it.
    fn discard_for(&self, server: Server, why: Option<Retire>) {
        self.closed(server, why).grant_slots();
    }

    /// Closes a server and uncounts it (counting why when a health rule retires it);
    /// returns the pools' state, locked, for what its slot becomes.
    fn closed(&self, server: Server, why: Option<Retire>) -> MutexGuard<'_, State> {
        let pool = server.pool;
        server.close();
        let mut st = self.lock();
        if let Some(why) = why {
            st.pools[pool].retired[why as usize] += 1;
        }
        st.release(pool);
        st
    }

    /// Counts one of the proxy's own connections to upstream `host:port` against its budget
    /// until the guard is dropped. When the budget is full, an idle server of a pool is
    /// closed to make room; when none is idle, the connection still opens (the budget is
    /// then exceeded by it, rather than making logins wait for a busy pool).
    pub fn hold_auxiliary(self: &Arc<Self>, host: &str, port: u16) -> Auxiliary {
        let b = self.budget_for(host, port);
        let victim = {
            let mut st = self.lock();
            let full = st.budgets[b]
                .limit
                .is_some_and(|l| st.budgets[b].used() >= l);
            let victim = if full { st.steal_idle(b, None) } else { None };
            st.budgets[b].auxiliary += 1;
            victim
        };
        if let Some(server) = victim {
            tracing::debug!(
                server = server.id,
                "closing an idle server to make room for an auth_query connection"
            );
            server.close();
        }
        Auxiliary {
            pools: self.clone(),
            budget: b,
        }
    }

    /// The idle servers of every pool, for SHOW SERVERS.
    pub fn idle_servers(&self) -> Vec<IdleServer> {
        let st = self.lock();
        let mut out = Vec::new();
        for p in &st.pools {
            for s in &p.idle {
                out.push(IdleServer {
                    id: s.id,
                    database: p.settings.database.clone(),
                    user: p.settings.upstream_user.clone(),
                    addr: s.key.addr,
                    local: s.stream.local(),
                    pid: s.key.pid,
                    connect_time: s.connected,
                    last_used: std::time::SystemTime::now() - crate::clock::since(s.last_used),
                });
            }
        }
        out
    }

    /// Closes every idle server (at shutdown); returns how many.
    pub fn close_idle(&self) -> usize {
        let idle: Vec<Server> = {
            let mut st = self.lock();
            let mut out = Vec::new();
            for id in 0..st.pools.len() {
                while let Some(server) = st.pools[id].idle.pop() {
                    st.release(id);
                    out.push(server);
                }
            }
            out
        };
        let n = idle.len();
        for server in idle {
            server.close();
        }
        n
    }

    /// Removes idle servers past `server_lifetime`, past `server_idle_timeout` above
    /// `min_pool_size`, or found closed by the server (a restart, `pg_terminate_backend`,
    /// `idle_session_timeout`: otherwise they would stay counted as idle, and against the
    /// budget, until a checkout found them); returns them for closing outside the lock.
    /// Used by the janitor. The liveness check costs no system call unless the socket was
    /// flagged readable.
    fn take_expired(&self, now: u64) -> Vec<Server> {
        let mut st = self.lock();
        let mut out = Vec::new();
        let idle_timeout = self.config.load().server_idle_timeout;
        let lifetime = self.config.load().server_lifetime;
        let check_delay = {
            let c = self.config.load();
            (!c.server_check_query.is_empty()).then_some(c.server_check_delay)
        };
        for id in 0..st.pools.len() {
            let mut i = 0;
            while i < st.pools[id].idle.len() {
                if let Some(delay) = check_delay {
                    // Seen by try_idle, which leaves such a server to checkout's check.
                    let s = &mut st.pools[id].idle[i];
                    s.check_due |= crate::clock::between(s.last_used, now) >= delay;
                }
                let p = &st.pools[id];
                let s = &p.idle[i];
                let too_old = crate::clock::between(s.created, now) >= lifetime;
                let too_idle = !idle_timeout.is_zero()
                    && crate::clock::between(s.last_used, now) >= idle_timeout
                    && p.open > p.settings.min_pool_size;
                if too_old || too_idle || !s.looks_alive() {
                    out.push(st.pools[id].idle.remove(i));
                    st.release(id);
                    // The room freed (in the budget, a cap) goes to any client of another
                    // pool waiting for it.
                    st.grant_slots();
                } else {
                    i += 1;
                }
            }
        }
        out
    }

    /// Closes idle servers whose room clients of other pools have been waiting for (the
    /// checkout leaves a server used within `CROSS_POOL_SLACK` to its own pool); returns
    /// them for closing outside the lock. Used by the janitor.
    fn make_room(&self) -> Vec<Server> {
        self.lock().make_room_for_waiters()
    }

    /// Reserves slots to bring pools up to `min_pool_size` within their limits; returns
    /// the pools to open for.
    fn reserve_minimum(&self) -> Vec<PoolId> {
        let mut st = self.lock();
        let mut out = Vec::new();
        let now = Instant::now();
        for id in 0..st.pools.len() {
            let p = &st.pools[id];
            // A removed pool (its database or user gone from the configuration) drains: a
            // server opened for it would be closed at its checkin, every janitor tick.
            if p.removed || p.retry_after.is_some_and(|t| now < t) || !p.waiters.is_empty() {
                continue;
            }
            while st.pools[id].open < st.pools[id].settings.min_pool_size
                && st.blocked(id).is_none()
            {
                st.reserve(id);
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
    Idle(Server),
    Open,
    Wait(WaitGuard),
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
            let mut st = self.pools.lock();
            st.pools[self.pool].connecting -= 1;
            st.release(self.pool);
            st.grant_slots();
        }
    }
}

/// One of the proxy's own connections counted against a budget (see
/// [`Pools::hold_auxiliary`]); dropping it uncounts the connection.
#[derive(Debug)]
pub struct Auxiliary {
    pools: Arc<Pools>,
    budget: BudgetId,
}

impl Drop for Auxiliary {
    fn drop(&mut self) {
        let mut st = self.pools.lock();
        st.budgets[self.budget].auxiliary -= 1;
        st.grant_slots();
    }
}

/// A server lent to one client. [`Checkout::release`] returns it clean; dropping closes it.
#[derive(Debug)]
pub struct Checkout {
    server: Option<Server>,
    pools: Arc<Pools>,
    /// Set when a health rule retires the server: it closes instead of going back.
    retire: Option<Retire>,
}

impl Checkout {
    pub fn server(&mut self) -> &mut ServerConn {
        self.server
            .as_mut()
            .expect("a checkout holds its server until released")
    }

    /// Gives the server back for reuse. Only for a server that is idle, outside any
    /// transaction, with nothing unread. A retired server closes instead.
    pub fn release(self) {
        self.release_at(None)
    }

    /// [`Checkout::release`] of a server whose last transaction ended at `used` (when
    /// known: the relay read the clock then, and a transaction reads it no more).
    pub fn release_at(mut self, used: Option<u64>) {
        if self.retire.is_some() {
            return; // Drop closes it and counts why
        }
        if let Some(server) = self.server.take() {
            debug_assert!(server.buf.is_empty() && server.cursor.at_boundary());
            match used {
                Some(at) => self.pools.checkin_at(server, at),
                None => self.pools.checkin(server),
            }
        }
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            tracing::debug!(server = server.id, "closing server connection in doubt");
            self.pools.discard_for(server, self.retire);
        }
    }
}
