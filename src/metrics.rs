//! Prometheus metrics: the registry, the handles the hot path uses, and the scrape.
//!
//! Rules (see `docs/metrics.md` for every metric):
//! - Gauges that describe state (clients by state, servers by state, budget figures) are
//!   computed at scrape time from the pools and the client registry; nothing on the hot
//!   path touches them.
//! - Counters and histograms are updated through handles resolved once per pool
//!   ([`PoolMetrics`]) or per application ([`AppMetrics`]), never by label lookup per
//!   message. The relay counts queries, bytes and idle time in plain integers
//!   ([`TxnCounts`]) and publishes them once per transaction.
//! - Label values come from the configuration (database, user, upstream) or from a bounded
//!   table: at most `metrics.max_applications` distinct `application_name` values get their
//!   own label; the rest share `other`.
//! - One [`prometheus::Registry`] per proxy: two proxies can run in one process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use prometheus::core::Collector;
use prometheus::{
    CounterVec, Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::app::Shared;
use crate::clients::{Client, ClientState};
use crate::pool::PoolId;
use crate::protocol::TransactionStatus;

/// The application label of clients past `metrics.max_applications`.
pub const OTHER_APPLICATION: &str = "other";
/// The application label of clients that set no `application_name`.
pub const UNNAMED_APPLICATION: &str = "unnamed";
/// New application labels one client may add to the table: its startup packet's name and
/// one `SET application_name`. A client that names itself anew again and again (a name per
/// job) counts its further new names as `other` instead of taking every label.
pub const NEW_LABELS_PER_CLIENT: u8 = 2;
/// Longest application label, in bytes (PostgreSQL's own limit, NAMEDATALEN − 1).
pub const MAX_APPLICATION_LABEL: usize = 63;

/// Seconds a client waits for a server.
const WAIT_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0,
];
/// Seconds a transaction holds its server.
const TRANSACTION_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 300.0,
];

/// Errors counted in `pgsluice_errors_total`, by kind and by the side they happened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A client took longer than `client_login_timeout` to log in.
    LoginTimeout,
    /// A client gave a wrong password or an unknown user name.
    AuthFailed,
    /// A malformed or refused startup packet.
    BadStartup,
    /// A client asked for a database that is not configured.
    UnknownDatabase,
    /// A client was turned away by `max_client_conn`.
    TooManyClients,
    /// A non-admin user asked for the admin console.
    AdminDenied,
    /// A client broke the protocol mid-session.
    ProtocolViolation,
    /// A statement refused in transaction mode that ended the client (extended protocol).
    RefusedStatement,
    /// A Query or Parse over `max_query_size`.
    MessageTooLarge,
    /// A client waited longer than `query_wait_timeout`.
    QueryWaitTimeout,
    /// No server could be opened because the upstream's budget is not known yet.
    BudgetUnknown,
    /// Opening or logging in to a server failed.
    ServerConnect,
    /// A server connection broke while a client used it.
    ServerLost,
    /// A client's TLS handshake failed.
    TlsHandshake,
    /// A client address over `login_rate_limit` was refused.
    LoginRateLimited,
    /// An `auth_query` lookup failed (the server, the query or its answer).
    AuthLookup,
    /// Accepting a client connection failed (out of file descriptors, say).
    AcceptFailed,
    /// A client's request ran past `query_timeout`.
    QueryTimeout,
    /// A client held a server idle in a transaction past `idle_transaction_timeout`.
    IdleTransactionTimeout,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 19] = [
        ErrorKind::LoginTimeout,
        ErrorKind::AuthFailed,
        ErrorKind::BadStartup,
        ErrorKind::UnknownDatabase,
        ErrorKind::TooManyClients,
        ErrorKind::AdminDenied,
        ErrorKind::ProtocolViolation,
        ErrorKind::RefusedStatement,
        ErrorKind::MessageTooLarge,
        ErrorKind::QueryWaitTimeout,
        ErrorKind::BudgetUnknown,
        ErrorKind::ServerConnect,
        ErrorKind::ServerLost,
        ErrorKind::TlsHandshake,
        ErrorKind::LoginRateLimited,
        ErrorKind::AuthLookup,
        ErrorKind::AcceptFailed,
        ErrorKind::QueryTimeout,
        ErrorKind::IdleTransactionTimeout,
    ];

    /// `(kind, side)` label values.
    pub fn labels(self) -> (&'static str, &'static str) {
        match self {
            ErrorKind::LoginTimeout => ("login_timeout", "client"),
            ErrorKind::AuthFailed => ("auth_failed", "client"),
            ErrorKind::BadStartup => ("bad_startup", "client"),
            ErrorKind::UnknownDatabase => ("unknown_database", "client"),
            ErrorKind::TooManyClients => ("too_many_clients", "client"),
            ErrorKind::AdminDenied => ("admin_denied", "client"),
            ErrorKind::ProtocolViolation => ("protocol_violation", "client"),
            ErrorKind::RefusedStatement => ("refused_statement", "client"),
            ErrorKind::MessageTooLarge => ("message_too_large", "client"),
            ErrorKind::QueryWaitTimeout => ("query_wait_timeout", "client"),
            ErrorKind::BudgetUnknown => ("budget_unknown", "server"),
            ErrorKind::ServerConnect => ("connect_failed", "server"),
            ErrorKind::ServerLost => ("connection_lost", "server"),
            ErrorKind::TlsHandshake => ("tls_handshake", "client"),
            ErrorKind::LoginRateLimited => ("login_rate_limited", "client"),
            ErrorKind::AuthLookup => ("auth_lookup_failed", "server"),
            ErrorKind::AcceptFailed => ("accept_failed", "client"),
            ErrorKind::QueryTimeout => ("query_timeout", "client"),
            ErrorKind::IdleTransactionTimeout => ("idle_transaction_timeout", "client"),
        }
    }

    /// The kind of a client error, from its SQLSTATE.
    pub fn of_client_error(sqlstate: &str) -> ErrorKind {
        match sqlstate {
            "0A000" => ErrorKind::RefusedStatement,
            "54000" => ErrorKind::MessageTooLarge,
            "57014" => ErrorKind::QueryTimeout,
            "25P03" => ErrorKind::IdleTransactionTimeout,
            _ => ErrorKind::ProtocolViolation,
        }
    }
}

/// Handles of one pool's counters and histograms, resolved once.
#[derive(Debug)]
pub struct PoolMetrics {
    pub database: String,
    pub user: String,
    pub client_wait: Histogram,
    pub checkout_timeouts: IntCounter,
    pub transactions: IntCounter,
    pub queries: IntCounter,
    pub transaction_duration: Histogram,
    pub server_connect_errors: IntCounter,
    pub server_assignments: IntCounter,
    pub received: IntCounter,
    pub sent: IntCounter,
    pub idle_in_transaction: prometheus::Counter,
    /// The part of `idle_in_transaction` spent in transactions that ended, in µs: SHOW
    /// STATS' query time is their duration less this (not exported).
    pub ended_idle_us: std::sync::atomic::AtomicU64,
    pub client_parses: IntCounter,
    pub server_parses: IntCounter,
    pub parse_hits: IntCounter,
    pub evictions: IntCounter,
    pub binds: IntCounter,
}

/// Handles of one (database, user, application) label set, resolved once per client.
#[derive(Debug)]
pub struct AppMetrics {
    pub database: String,
    pub user: String,
    /// The label: the application_name, `unnamed`, or `other`.
    pub label: String,
    pub wait: Histogram,
    pub checkout_timeouts: IntCounter,
    pub idle_in_transaction: prometheus::Counter,
}

/// What one client session publishes through: its pool's and its application's handles
/// and its registry entry (for the live idle-in-transaction figures).
#[derive(Debug)]
pub struct Meter {
    pub pool: Arc<PoolMetrics>,
    pub app: Arc<AppMetrics>,
    pub client: Arc<Client>,
}

/// Counts kept by the relay in plain integers while a transaction runs, published once
/// per transaction.
#[derive(Debug, Default)]
pub struct TxnCounts {
    meter: Option<Arc<Meter>>,
    /// Requests answered with ReadyForQuery since the last publish.
    queries: u64,
    /// Bytes read from the client / from the server (and passed on) since the last publish.
    pub received: u64,
    pub sent: u64,
    /// When the current transaction's first message was passed to the server (or, for the
    /// first transaction of a checkout, when its request arrived: one clock read for both).
    started: Option<u64>,
    /// When the last transaction ended (the server's `last_used` when it goes back).
    /// Both are [`crate::clock`] stamps.
    pub ended: Option<u64>,
    /// When the server last became idle inside the open transaction
    /// ([`crate::clock::stamp`]).
    idle_since: Option<u64>,
    /// Idle-in-transaction time since the last publish (for the pool's counter), in µs.
    idle: u64,
    /// The same, less what scrapes already added to the application's counter, in µs.
    app_idle: u64,
}

impl TxnCounts {
    pub fn new(meter: Option<Arc<Meter>>) -> TxnCounts {
        TxnCounts {
            meter,
            ..TxnCounts::default()
        }
    }

    /// Counts for a transaction whose request arrived at stamp `at`.
    pub fn starting(meter: Arc<Meter>, at: u64) -> TxnCounts {
        TxnCounts {
            meter: Some(meter),
            started: Some(at),
            ..TxnCounts::default()
        }
    }

    /// The client passed a message to the server.
    #[inline]
    pub fn client_message(&mut self) {
        if self.started.is_none() {
            self.started = Some(crate::clock::stamp_now());
        }
        if self.idle_since.is_some() {
            self.end_idle(crate::clock::stamp_now());
        }
    }

    /// The server answered a request with ReadyForQuery(`status`); `quiet` when no other
    /// request is outstanding.
    #[inline]
    pub fn ready(&mut self, status: TransactionStatus, quiet: bool) {
        self.queries += 1;
        match status {
            TransactionStatus::Idle => self.transaction_ended(quiet),
            _ if quiet && self.idle_since.is_none() => {
                let now = crate::clock::stamp_now();
                self.idle_since = Some(now);
                if let Some(m) = &self.meter {
                    m.client.idle_in_transaction_began(now);
                }
            }
            _ => {}
        }
    }

    /// The idle stretch (if any) ended at stamp `now`.
    fn end_idle(&mut self, now: u64) {
        if let Some(since) = self.idle_since.take() {
            self.idle += now.saturating_sub(since);
            if let Some(m) = &self.meter {
                self.app_idle += m.client.idle_in_transaction_ended(now);
            }
        }
    }

    /// `quiet`: no other request is outstanding. Otherwise the next transaction's requests
    /// were sent already (pipelined behind this one's end): it starts now.
    fn transaction_ended(&mut self, quiet: bool) {
        let now = crate::clock::stamp_now();
        self.ended = Some(now);
        if self.idle_since.is_some() {
            self.end_idle(now);
        }
        if let (Some(m), Some(started)) = (&self.meter, self.started.take()) {
            if self.idle > 0 {
                m.pool
                    .ended_idle_us
                    .fetch_add(self.idle, std::sync::atomic::Ordering::Relaxed);
            }
            m.pool.transactions.inc();
            m.pool
                .transaction_duration
                .observe(now.saturating_sub(started) as f64 * 1e-6);
        }
        if !quiet {
            self.started = Some(now);
        }
        self.publish();
    }

    /// Publishes what was counted so far.
    fn publish(&mut self) {
        let Some(m) = &self.meter else { return };
        if self.queries > 0 {
            m.pool.queries.inc_by(std::mem::take(&mut self.queries));
        }
        if self.received > 0 {
            m.pool.received.inc_by(std::mem::take(&mut self.received));
        }
        if self.sent > 0 {
            m.pool.sent.inc_by(std::mem::take(&mut self.sent));
        }
        if self.idle > 0 {
            m.pool
                .idle_in_transaction
                .inc_by(std::mem::take(&mut self.idle) as f64 * 1e-6);
        }
        if self.app_idle > 0 {
            m.app
                .idle_in_transaction
                .inc_by(std::mem::take(&mut self.app_idle) as f64 * 1e-6);
        }
    }

    /// The relay ended (transaction over, or the client or server left): closes an open
    /// idle stretch and publishes the rest.
    /// Lets go of the client's metric handles (the counts stay with the server).
    pub fn detach(&mut self) {
        self.meter = None;
    }

    pub fn finish(&mut self) {
        if self.idle_since.is_some() {
            self.end_idle(crate::clock::stamp_now());
        }
        self.publish();
    }
}

/// The table of application labels: bounded, first come first served.
#[derive(Debug, Default)]
struct Apps {
    names: crate::Set<String>,
    /// Handles by label; each label's few (database, user) pairs are scanned, so that a
    /// login looks its handles up without building an owned key.
    handles: crate::Map<String, Vec<Arc<AppMetrics>>>,
}

/// All metrics of one proxy.
pub struct Metrics {
    /// Reloads refused (the old configuration stayed).
    pub config_reload_errors: IntCounter,
    registry: Registry,
    names: Vec<String>,
    max_applications: usize,
    client_connections: IntGaugeVec,
    server_connections: IntGaugeVec,
    pool_size: IntGaugeVec,
    client_wait: HistogramVec,
    checkout_timeouts: IntCounterVec,
    transactions: IntCounterVec,
    queries: IntCounterVec,
    transaction_duration: HistogramVec,
    server_connect_errors: IntCounterVec,
    server_assignments: IntCounterVec,
    servers_retired: IntCounterVec,
    client_parses: IntCounterVec,
    server_parses: IntCounterVec,
    parse_hits: IntCounterVec,
    evictions: IntCounterVec,
    binds: IntCounterVec,
    received: IntCounterVec,
    sent: IntCounterVec,
    idle_in_transaction: CounterVec,
    max_wait: GaugeVec,
    application_clients: IntGaugeVec,
    application_wait: HistogramVec,
    application_checkout_timeouts: IntCounterVec,
    application_idle_in_transaction: CounterVec,
    application_idle_in_transaction_max: GaugeVec,
    upstream_max_connections: IntGaugeVec,
    fleet_budget: IntGaugeVec,
    budget: IntGaugeVec,
    budget_in_use: IntGaugeVec,
    fleet_members: IntGaugeVec,
    budget_refresh_errors: IntCounterVec,
    budget_last_refresh: GaugeVec,
    errors: Vec<IntCounter>,
    client_logins: IntGauge,
    clients_parked: IntGauge,
    auth_lookups: Vec<IntCounter>,
    cancel_requests: Vec<IntCounter>,
    scram_derivations: IntCounter,
    pools: Mutex<crate::Map<PoolId, Arc<PoolMetrics>>>,
    apps: Mutex<Apps>,
    /// One scrape at a time: a scrape sets gauges, then gathers.
    scrape: Mutex<()>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Registers metrics and remembers their names (for the docs check).
struct Builder {
    registry: Registry,
    names: Vec<String>,
}

impl Builder {
    fn add<C: Collector + Clone + 'static>(&mut self, c: C) -> C {
        self.add_boxed(Box::new(c.clone()));
        c
    }

    fn add_boxed(&mut self, c: Box<dyn Collector>) {
        for d in c.desc() {
            self.names.push(d.fq_name.clone());
        }
        self.registry.register(c).expect("metric names are unique");
    }

    fn counter(&mut self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }

    fn seconds(&mut self, name: &str, help: &str, labels: &[&str]) -> CounterVec {
        self.add(CounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }

    fn gauge(&mut self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }

    fn float_gauge(&mut self, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
        self.add(GaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }

    fn histogram(&mut self, name: &str, help: &str, labels: &[&str], b: &[f64]) -> HistogramVec {
        let opts = HistogramOpts::new(name, help).buckets(b.to_vec());
        self.add(HistogramVec::new(opts, labels).expect("valid metric"))
    }
}

const POOL: &[&str] = &["database", "user"];
const APP: &[&str] = &["database", "user", "application"];
const UPSTREAM: &[&str] = &["upstream"];

impl Metrics {
    pub fn new(max_applications: usize) -> Metrics {
        let mut b = Builder {
            registry: Registry::new(),
            names: Vec::new(),
        };
        let client_connections = b.gauge(
            "pgsluice_client_connections",
            "Logged-in client connections by state (active: holds a server; waiting: queued for one; idle: neither).",
            &["database", "user", "state"],
        );
        let server_connections = b.gauge(
            "pgsluice_server_connections",
            "Server connections by state (active, idle, idle_in_transaction, login, testing).",
            &["database", "user", "state"],
        );
        let pool_size = b.gauge(
            "pgsluice_pool_size",
            "Most server connections the pool may open.",
            POOL,
        );
        let client_wait = b.histogram(
            "pgsluice_client_wait_seconds",
            "Time from a client needing a server to getting one (or giving up).",
            POOL,
            &WAIT_BUCKETS,
        );
        let checkout_timeouts = b.counter(
            "pgsluice_checkout_timeouts_total",
            "Requests that waited query_wait_timeout without getting a server.",
            POOL,
        );
        let transactions = b.counter(
            "pgsluice_transactions_total",
            "Transactions completed (ReadyForQuery with status idle).",
            POOL,
        );
        let queries = b.counter(
            "pgsluice_queries_total",
            "Requests answered by a server (a simple Query, or an extended-protocol batch ending in Sync).",
            POOL,
        );
        let transaction_duration = b.histogram(
            "pgsluice_transaction_duration_seconds",
            "Time from a transaction's first message to the server's ReadyForQuery(idle).",
            POOL,
            &TRANSACTION_BUCKETS,
        );
        let server_connect_errors = b.counter(
            "pgsluice_server_connect_errors_total",
            "Failed attempts to open or log in to a server connection for a client.",
            POOL,
        );
        let server_assignments = b.counter(
            "pgsluice_server_assignments_total",
            "Times a server was lent to a client.",
            POOL,
        );
        let servers_retired = b.counter(
            "pgsluice_servers_retired_total",
            "Server connections closed by a health rule: RECONNECT, read-only (25006) in a pool for writes, failed server_check_query.",
            &["database", "user", "reason"],
        );
        let client_parses = b.counter(
            "pgsluice_prepared_client_parses_total",
            "Named Parse messages from clients in transaction mode.",
            POOL,
        );
        let server_parses = b.counter(
            "pgsluice_prepared_server_parses_total",
            "Parse messages of named statements sent to servers (the client's or pgsluice's own).",
            POOL,
        );
        let parse_hits = b.counter(
            "pgsluice_prepared_hits_total",
            "Client Parses answered by pgsluice because the server already had the statement.",
            POOL,
        );
        let evictions = b.counter(
            "pgsluice_prepared_evictions_total",
            "Statements closed on a server to stay within max_prepared_statements.",
            POOL,
        );
        let binds = b.counter("pgsluice_binds_total", "Bind messages from clients.", POOL);
        let received = b.counter(
            "pgsluice_client_received_bytes_total",
            "Bytes received from clients and passed to servers.",
            POOL,
        );
        let sent = b.counter(
            "pgsluice_client_sent_bytes_total",
            "Bytes received from servers and passed to clients.",
            POOL,
        );
        let idle_in_transaction = b.seconds(
            "pgsluice_idle_in_transaction_seconds_total",
            "Time servers sat idle inside an open transaction, waiting for their client.",
            POOL,
        );
        let max_wait = b.float_gauge(
            "pgsluice_client_max_wait_seconds",
            "How long the longest-waiting client of the pool has waited (0 if none waits).",
            POOL,
        );
        let application_clients = b.gauge(
            "pgsluice_application_clients",
            "Logged-in client connections by application and state.",
            &["database", "user", "application", "state"],
        );
        let application_wait = b.histogram(
            "pgsluice_application_wait_seconds",
            "Time from a client needing a server to getting one, by application.",
            APP,
            &WAIT_BUCKETS,
        );
        let application_checkout_timeouts = b.counter(
            "pgsluice_application_checkout_timeouts_total",
            "Requests that waited query_wait_timeout without getting a server, by application.",
            APP,
        );
        let application_idle_in_transaction = b.seconds(
            "pgsluice_application_idle_in_transaction_seconds_total",
            "Time servers sat idle inside this application's open transactions (hoarding).",
            APP,
        );
        let application_idle_in_transaction_max = b.float_gauge(
            "pgsluice_application_idle_in_transaction_max_seconds",
            "Longest current stretch of a server idle inside one of this application's transactions.",
            APP,
        );
        let upstream_max_connections = b.gauge(
            "pgsluice_upstream_max_connections",
            "max_connections as last read from the upstream server (0 until read; fixed budgets never read it).",
            UPSTREAM,
        );
        let fleet_budget = b.gauge(
            "pgsluice_fleet_budget_connections",
            "Server connections the whole fleet may hold on this upstream.",
            UPSTREAM,
        );
        let budget = b.gauge(
            "pgsluice_budget_connections",
            "Server connections this proxy may hold on this upstream now (its share).",
            UPSTREAM,
        );
        let budget_in_use = b.gauge(
            "pgsluice_budget_in_use_connections",
            "Server connections this proxy holds on this upstream (control connection included).",
            UPSTREAM,
        );
        let fleet_members = b.gauge(
            "pgsluice_fleet_members",
            "Live members of this proxy's fleet on this upstream, itself included.",
            UPSTREAM,
        );
        let config_reload_errors = b
            .counter(
                "pgsluice_config_reload_errors_total",
                "Configuration reloads refused: the file did not load or changed a key that needs a restart.",
                &[],
            )
            .with_label_values(&[] as &[&str]);
        let budget_refresh_errors = b.counter(
            "pgsluice_budget_refresh_errors_total",
            "Failed attempts to read the budget figures from the upstream server.",
            UPSTREAM,
        );
        let budget_last_refresh = b.float_gauge(
            "pgsluice_budget_last_refresh_timestamp_seconds",
            "Unix time of the last successful read of the budget figures (0: never).",
            UPSTREAM,
        );
        let errors_vec = b.counter(
            "pgsluice_errors_total",
            "Errors, by kind and by the side (client or server connection) they happened on.",
            &["kind", "side"],
        );
        let errors = ErrorKind::ALL
            .iter()
            .map(|k| {
                let (kind, side) = k.labels();
                errors_vec.with_label_values(&[kind, side])
            })
            .collect();
        let lookups = b.counter(
            "pgsluice_auth_query_lookups_total",
            "Client logins whose password was looked up with auth_query, by result: cached, found, not_found, failed.",
            &["result"],
        );
        let auth_lookups = crate::auth::query::Outcome::ALL
            .iter()
            .map(|o| lookups.with_label_values(&[o.label()]))
            .collect();
        let cancels = b.counter(
            "pgsluice_cancel_requests_total",
            "Cancel requests received, by what became of them: server, queued, idle, unknown, peer (sent on to the peered process of its key), peer_failed.",
            &["result"],
        );
        let cancel_requests = crate::cancel::Handled::ALL
            .iter()
            .map(|h| cancels.with_label_values(&[h.label()]))
            .collect();
        let scram_derivations = b
            .counter(
                "pgsluice_scram_key_derivations_total",
                "Salted passwords derived (PBKDF2) to log in to servers with SCRAM; once per password, salt and iteration count.",
                &[],
            )
            .with_label_values(&[] as &[&str]);
        let client_logins = b.add(
            IntGauge::with_opts(Opts::new(
                "pgsluice_client_logins_in_progress",
                "Client connections accepted that have not finished logging in.",
            ))
            .expect("valid metric"),
        );
        let clients_parked = b.add(
            IntGauge::with_opts(Opts::new(
                "pgsluice_clients_parked",
                "Logged-in clients idle long enough that their task was parked (they hold their session and socket only).",
            ))
            .expect("valid metric"),
        );
        let build_info = b.gauge(
            "pgsluice_build_info",
            "Always 1; the version label says which pgsluice runs.",
            &["version"],
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        b.add_boxed(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));
        Metrics {
            registry: b.registry,
            names: b.names,
            max_applications,
            client_connections,
            server_connections,
            pool_size,
            client_wait,
            checkout_timeouts,
            transactions,
            queries,
            transaction_duration,
            server_connect_errors,
            server_assignments,
            servers_retired,
            client_parses,
            server_parses,
            parse_hits,
            evictions,
            binds,
            received,
            sent,
            idle_in_transaction,
            max_wait,
            application_clients,
            application_wait,
            application_checkout_timeouts,
            application_idle_in_transaction,
            application_idle_in_transaction_max,
            upstream_max_connections,
            fleet_budget,
            budget,
            budget_in_use,
            fleet_members,
            config_reload_errors,
            budget_refresh_errors,
            budget_last_refresh,
            errors,
            client_logins,
            clients_parked,
            auth_lookups,
            cancel_requests,
            scram_derivations,
            pools: Mutex::default(),
            apps: Mutex::new(Apps::default()),
            scrape: Mutex::new(()),
        }
    }

    /// Every metric name registered (histograms by their base name).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Counts one error.
    pub fn error(&self, kind: ErrorKind) {
        let i = ErrorKind::ALL
            .iter()
            .position(|k| *k == kind)
            .expect("every kind is listed");
        self.errors[i].inc();
    }

    /// Counts one `auth_query` lookup by how it was answered.
    pub fn auth_lookup(&self, outcome: crate::auth::query::Outcome) {
        let i = crate::auth::query::Outcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .expect("every outcome is listed");
        self.auth_lookups[i].inc();
    }

    /// Counts one cancel request by what became of it.
    pub fn cancel_request(&self, handled: crate::cancel::Handled) {
        let i = crate::cancel::Handled::ALL
            .iter()
            .position(|h| *h == handled)
            .expect("every result is listed");
        self.cancel_requests[i].inc();
    }

    /// The handles of a pool (resolved on first use).
    pub fn pool(&self, id: PoolId, database: &str, user: &str) -> Arc<PoolMetrics> {
        let mut pools = lock(&self.pools);
        if let Some(p) = pools.get(&id) {
            return p.clone();
        }
        let l = [database, user];
        let p = Arc::new(PoolMetrics {
            database: database.to_owned(),
            user: user.to_owned(),
            client_wait: self.client_wait.with_label_values(&l),
            checkout_timeouts: self.checkout_timeouts.with_label_values(&l),
            transactions: self.transactions.with_label_values(&l),
            queries: self.queries.with_label_values(&l),
            transaction_duration: self.transaction_duration.with_label_values(&l),
            server_connect_errors: self.server_connect_errors.with_label_values(&l),
            server_assignments: self.server_assignments.with_label_values(&l),
            received: self.received.with_label_values(&l),
            sent: self.sent.with_label_values(&l),
            idle_in_transaction: self.idle_in_transaction.with_label_values(&l),
            ended_idle_us: Default::default(),
            client_parses: self.client_parses.with_label_values(&l),
            server_parses: self.server_parses.with_label_values(&l),
            parse_hits: self.parse_hits.with_label_values(&l),
            evictions: self.evictions.with_label_values(&l),
            binds: self.binds.with_label_values(&l),
        });
        pools.insert(id, p.clone());
        p
    }

    /// The label an `application_name` gets: itself (cut to 63 bytes) when it is in the
    /// table, or when fewer than `max_applications` distinct names have been seen and the
    /// client may add one (`new_labels`, decremented when it does); else `other`.
    fn application_label<'n>(
        &self,
        apps: &mut Apps,
        name: &'n str,
        new_labels: &mut u8,
    ) -> &'n str {
        let mut end = name.len().min(MAX_APPLICATION_LABEL);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        let name = match &name[..end] {
            "" => UNNAMED_APPLICATION,
            n => n,
        };
        if apps.names.contains(name) {
            return name;
        }
        // `unnamed` is no name a client chose: it costs no client its allowance.
        let unnamed = name == UNNAMED_APPLICATION;
        if apps.names.len() < self.max_applications && (*new_labels > 0 || unnamed) {
            if !unnamed {
                *new_labels -= 1;
            }
            apps.names.insert(name.to_owned());
            return name;
        }
        OTHER_APPLICATION
    }

    /// The handles of a client's application (resolved once per client, and again when it
    /// changes its application_name); `new_labels` as in [`NEW_LABELS_PER_CLIENT`].
    pub fn app(
        &self,
        database: &str,
        user: &str,
        application_name: &str,
        new_labels: &mut u8,
    ) -> Arc<AppMetrics> {
        let mut apps = lock(&self.apps);
        let label = self.application_label(&mut apps, application_name, new_labels);
        if let Some(a) = apps
            .handles
            .get(label)
            .and_then(|v| v.iter().find(|a| a.database == database && a.user == user))
        {
            return a.clone();
        }
        let l = [database, user, label];
        let a = Arc::new(AppMetrics {
            database: database.to_owned(),
            user: user.to_owned(),
            label: label.to_owned(),
            wait: self.application_wait.with_label_values(&l),
            checkout_timeouts: self.application_checkout_timeouts.with_label_values(&l),
            idle_in_transaction: self.application_idle_in_transaction.with_label_values(&l),
        });
        apps.handles
            .entry(label.to_owned())
            .or_default()
            .push(a.clone());
        a
    }

    /// Every application label set in use so far.
    pub fn apps(&self) -> Vec<Arc<AppMetrics>> {
        let mut v: Vec<_> = lock(&self.apps)
            .handles
            .values()
            .flatten()
            .cloned()
            .collect();
        v.sort_by(|a, b| (&a.database, &a.user, &a.label).cmp(&(&b.database, &b.user, &b.label)));
        v
    }

    /// The handles of every pool used so far.
    pub fn pool_handles(&self) -> Vec<Arc<PoolMetrics>> {
        lock(&self.pools).values().cloned().collect()
    }
}

/// Per-pool figures computed from the client registry.
#[derive(Debug, Default, Clone)]
pub struct ClientCounts {
    pub active: u32,
    pub waiting: u32,
    pub idle: u32,
    /// Active clients whose server sits idle inside their open transaction.
    pub idle_in_transaction: u32,
    pub max_wait: Duration,
}

impl ClientCounts {
    fn add(&mut self, c: &Client, now: Instant) {
        match c.state() {
            ClientState::Active => self.active += 1,
            ClientState::Waiting => self.waiting += 1,
            ClientState::Idle => self.idle += 1,
        }
        if c.state() == ClientState::Active && c.idle_in_transaction_for(now).is_some() {
            self.idle_in_transaction += 1;
        }
        if let Some(w) = c.waiting_for(now) {
            self.max_wait = self.max_wait.max(w);
        }
    }

    pub fn get(&self, s: ClientState) -> u32 {
        match s {
            ClientState::Active => self.active,
            ClientState::Waiting => self.waiting,
            ClientState::Idle => self.idle,
        }
    }
}

/// Client figures per (database, user) pool.
pub fn clients_by_pool(
    clients: &[Arc<Client>],
    now: Instant,
) -> HashMap<(Arc<str>, Arc<str>), ClientCounts> {
    let mut out: HashMap<(Arc<str>, Arc<str>), ClientCounts> = HashMap::new();
    for c in clients {
        out.entry((c.database.clone(), c.user.clone()))
            .or_default()
            .add(c, now);
    }
    out
}

/// Server figures of one pool, by the states of `pgsluice_server_connections`.
#[derive(Debug, Default, Clone, Copy)]
pub struct ServerCounts {
    pub active: u32,
    pub idle: u32,
    pub idle_in_transaction: u32,
    pub login: u32,
    pub testing: u32,
}

impl ServerCounts {
    pub fn of(p: &crate::pool::PoolStats, clients: &ClientCounts) -> ServerCounts {
        let busy = p.open.saturating_sub(p.idle + p.connecting + p.testing);
        let iit = clients.idle_in_transaction.min(busy);
        ServerCounts {
            active: busy - iit,
            idle: p.idle,
            idle_in_transaction: iit,
            login: p.connecting,
            testing: p.testing,
        }
    }
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Reads the state gauges from the pools and clients, then encodes every metric in the
/// Prometheus text format.
pub fn scrape(shared: &Shared) -> Vec<u8> {
    let m = &shared.metrics;
    let _one = lock(&m.scrape);
    let now = Instant::now();
    let clients = shared.clients.all();
    let by_pool = clients_by_pool(&clients, now);
    for p in shared.pools.stats() {
        let l = [p.database.as_str(), p.user.as_str()];
        let c = by_pool
            .get(&(p.database.as_str().into(), p.user.as_str().into()))
            .cloned()
            .unwrap_or_default();
        for s in ClientState::ALL {
            m.client_connections
                .with_label_values(&[l[0], l[1], s.as_str()])
                .set(c.get(s) as i64);
        }
        let sv = ServerCounts::of(&p, &c);
        for (state, n) in [
            ("active", sv.active),
            ("idle", sv.idle),
            ("idle_in_transaction", sv.idle_in_transaction),
            ("login", sv.login),
            ("testing", sv.testing),
        ] {
            m.server_connections
                .with_label_values(&[l[0], l[1], state])
                .set(n as i64);
        }
        m.pool_size.with_label_values(&l).set(p.pool_size as i64);
        // The pools count retirements under their lock; the counter follows at scrape.
        for (why, n) in crate::pool::Retire::ALL.iter().zip(p.retired) {
            let c = m
                .servers_retired
                .with_label_values(&[l[0], l[1], why.as_str()]);
            if n > c.get() {
                c.inc_by(n - c.get());
            }
        }
        m.max_wait
            .with_label_values(&l)
            .set(c.max_wait.as_secs_f64());
    }
    // Applications: every label set seen so far, zero when none of its clients is left.
    let mut by_app: HashMap<(String, String, String), (ClientCounts, Duration)> = HashMap::new();
    for c in &clients {
        let app = c.app().metrics;
        // Hoarding still going on counts now, not only when its transaction ends.
        let taken = c.take_idle_in_transaction(now);
        if !taken.is_zero() {
            app.idle_in_transaction.inc_by(taken.as_secs_f64());
        }
        let e = by_app
            .entry((app.database.clone(), app.user.clone(), app.label.clone()))
            .or_default();
        e.0.add(c, now);
        if let Some(d) = c.idle_in_transaction_for(now) {
            e.1 = e.1.max(d);
        }
    }
    for a in m.apps() {
        let key = (a.database.clone(), a.user.clone(), a.label.clone());
        let (c, max) = by_app.remove(&key).unwrap_or_default();
        let l = [a.database.as_str(), a.user.as_str(), a.label.as_str()];
        for s in ClientState::ALL {
            m.application_clients
                .with_label_values(&[l[0], l[1], l[2], s.as_str()])
                .set(c.get(s) as i64);
        }
        m.application_idle_in_transaction_max
            .with_label_values(&l)
            .set(max.as_secs_f64());
    }
    for (upstream, s) in shared.pools.budget_snapshots() {
        let l = [upstream.as_str()];
        m.upstream_max_connections
            .with_label_values(&l)
            .set(s.upstream.max_connections as i64);
        m.fleet_budget
            .with_label_values(&l)
            .set(s.fleet_budget as i64);
        m.budget.with_label_values(&l).set(s.limit as i64);
        m.budget_in_use.with_label_values(&l).set(s.in_use as i64);
        m.fleet_members
            .with_label_values(&l)
            .set(s.upstream.members as i64);
        let errors = m.budget_refresh_errors.with_label_values(&l);
        if s.refresh_errors > errors.get() {
            errors.inc_by(s.refresh_errors - errors.get());
        }
        m.budget_last_refresh
            .with_label_values(&l)
            .set(s.last_refresh.map(unix_seconds).unwrap_or(0.0));
    }
    m.client_logins.set(shared.clients.login_count() as i64);
    m.clients_parked.set(shared.clients.parked_count() as i64);
    let derived = shared.pools.keys.derivations();
    if derived > m.scram_derivations.get() {
        m.scram_derivations
            .inc_by(derived - m.scram_derivations.get());
    }
    let mut out = Vec::with_capacity(16 * 1024);
    TextEncoder::new()
        .encode(&m.registry.gather(), &mut out)
        .expect("text encoding into a Vec cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn application_labels_are_bounded() {
        let m = Metrics::new(2);
        let app = |d, name| m.app(d, "u", name, &mut 5).label.clone();
        assert_eq!(app("d", "a"), "a");
        assert_eq!(app("d", ""), UNNAMED_APPLICATION);
        assert_eq!(app("d", "c"), OTHER_APPLICATION);
        assert_eq!(app("d2", "a"), "a", "a known name keeps its label");
        let long = "é".repeat(40);
        let m = Metrics::new(5);
        let label = m.app("d", "u", &long, &mut 1).label.clone();
        assert!(label.len() <= MAX_APPLICATION_LABEL && long.starts_with(&label));
    }

    /// One client adds at most `NEW_LABELS_PER_CLIENT` names; names already in the table
    /// cost it nothing, and other clients still get labels of their own.
    #[test]
    fn one_client_cannot_take_every_label() {
        let m = Metrics::new(100);
        let mut left = NEW_LABELS_PER_CLIENT;
        assert_eq!(m.app("d", "u", "", &mut left).label, UNNAMED_APPLICATION);
        assert_eq!(left, NEW_LABELS_PER_CLIENT, "unnamed costs nothing");
        let labels: Vec<String> = (0..50)
            .map(|i| {
                m.app("d", "u", &format!("job-{i}"), &mut left)
                    .label
                    .clone()
            })
            .collect();
        assert_eq!(labels[..2], ["job-0", "job-1"]);
        assert!(
            labels[2..].iter().all(|l| l == OTHER_APPLICATION),
            "{labels:?}"
        );
        assert_eq!(left, 0);
        assert_eq!(m.app("d", "u", "job-0", &mut left).label, "job-0");
        let mut other = NEW_LABELS_PER_CLIENT;
        assert_eq!(m.app("d", "u", "web", &mut other).label, "web");
    }

    /// A transaction whose requests came behind the previous one's end (COMMIT and the next
    /// BEGIN in one write) starts when that one ends, not at the client's next message.
    #[test]
    fn a_pipelined_transaction_starts_when_the_one_before_ends() {
        let mut t = TxnCounts {
            started: Some(crate::clock::stamp_now()),
            ..TxnCounts::default()
        };
        t.ready(TransactionStatus::Idle, false);
        assert!(t.started.is_some(), "the next one has begun");
        t.ready(TransactionStatus::Idle, true);
        assert!(t.started.is_none(), "nothing behind it");
    }

    #[test]
    fn handles_are_cached() {
        let m = Metrics::new(10);
        assert!(Arc::ptr_eq(&m.pool(0, "d", "u"), &m.pool(0, "d", "u")));
        assert!(Arc::ptr_eq(
            &m.app("d", "u", "x", &mut 1),
            &m.app("d", "u", "x", &mut 1)
        ));
    }

    /// Every metric is in docs/metrics.md, and every metric there is registered.
    #[test]
    fn docs_list_every_metric() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/metrics.md");
        let text = std::fs::read_to_string(&path).expect("docs/metrics.md");
        let mut documented = std::collections::BTreeSet::new();
        for line in text.lines() {
            // Rows of the metric tables: | `name` | type | ...
            if let Some(rest) = line.strip_prefix("| `") {
                if let Some((name, _)) = rest.split_once('`') {
                    if name.starts_with("pgsluice_") || name.starts_with("process_") {
                        documented.insert(name.to_owned());
                    }
                }
            }
        }
        let registered: std::collections::BTreeSet<String> =
            Metrics::new(10).names().iter().cloned().collect();
        let missing: Vec<_> = registered.difference(&documented).collect();
        let stale: Vec<_> = documented.difference(&registered).collect();
        assert!(missing.is_empty(), "not in docs/metrics.md: {missing:?}");
        assert!(
            stale.is_empty(),
            "in docs/metrics.md but not registered: {stale:?}"
        );
    }
}
