//! Configuration: a TOML file, overridden by `PGSLUICE_…` environment variables, overridden by
//! command-line flags. Every key is documented in `docs/configuration.md` and shown with its
//! default in `config/pgsluice.toml`.
//!
//! Overrides are merged into the TOML table before it is deserialised, so a value has one
//! meaning whatever its source: `PGSLUICE_POOL_SIZE=30`, `--pool-size 30` and `pool_size = 30`
//! are the same setting. Nested keys use `__`: `PGSLUICE_DATABASES__APP__HOST=db.internal`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use thiserror::Error;

pub use crate::secrets::Password;

/// Environment variables with this prefix override config keys.
pub const ENV_PREFIX: &str = "PGSLUICE_";
/// Environment variables with the prefix that are not config keys.
const ENV_NOT_KEYS: [&str; 2] = ["PGSLUICE_CONFIG", "PGSLUICE_LOG"];

/// PgBouncer's default `auth_query` (1.24.1 and later: an expired role gets no password),
/// with every name and operator qualified by `pg_catalog` so that nothing on the lookup
/// connection's `search_path` can stand in for them (CVE-2025-12819).
pub const DEFAULT_AUTH_QUERY: &str = "SELECT rolname, CASE WHEN rolvaliduntil OPERATOR(pg_catalog.<) pg_catalog.now() THEN NULL ELSE rolpassword END FROM pg_catalog.pg_authid WHERE rolname OPERATOR(pg_catalog.=) $1 AND rolcanlogin";

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Syntax { origin: String, message: String },
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// How long a client keeps a server connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// A server is lent for one transaction; idle clients hold none.
    Transaction,
    /// A server is lent for the client's whole connection, then reset.
    Session,
}

/// What a pool needs of its servers (libpq's `target_session_attrs`, two of its values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetSessionAttrs {
    /// The pool is for writes: a standby or read-only server is not used (see
    /// `crate::pool::health`).
    ReadWrite,
    /// Any server will do (a replica endpoint).
    Any,
}

/// How clients prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum AuthType {
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    #[serde(rename = "md5")]
    Md5,
    /// No password: for sidecars listening on loopback only.
    #[serde(rename = "trust")]
    Trust,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// The whole configuration. Field docs are the one-line summaries of `docs/configuration.md`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address clients connect to.
    #[serde(default = "defaults::listen")]
    pub listen: String,
    /// Directory of a Unix socket clients may connect to as well, `DIR/.s.PGSQL.PORT` with
    /// `listen`'s port; empty (the default): none.
    #[serde(default)]
    pub listen_unix: String,
    /// Permissions of the `listen_unix` socket file, octal digits in a string.
    #[serde(
        default = "defaults::unix_socket_mode",
        deserialize_with = "de::octal_mode"
    )]
    pub unix_socket_mode: u32,
    /// `SO_REUSEPORT` on the TCP listener (1) or not (0, the default): several pgsluice
    /// processes on one host may then listen on the same port, the kernel spreading clients.
    #[serde(default, deserialize_with = "de::num")]
    pub so_reuseport: u32,
    /// This process's number among peered pgsluice processes, 1 to 16,383, written into
    /// every cancel key it hands out; 0 (the default): no peering.
    #[serde(default, deserialize_with = "de::num")]
    pub peer_id: u32,
    /// Where each peered process takes cancel requests (`[peers.ID]`, ID its `peer_id`).
    #[serde(default)]
    pub peers: BTreeMap<String, Peer>,
    /// Quick mode: one upstream database as a URL `postgres://USER:PASSWORD@HOST:PORT/DBNAME`.
    #[serde(default)]
    pub upstream: Option<Password>,
    #[serde(default = "defaults::pool_mode")]
    pub pool_mode: PoolMode,
    /// Server connections per (database, user) pool.
    #[serde(default = "defaults::pool_size", deserialize_with = "de::num")]
    pub pool_size: u32,
    /// Server connections each pool keeps open even when idle.
    #[serde(default, deserialize_with = "de::num")]
    pub min_pool_size: u32,
    /// Client connections accepted at once.
    #[serde(default = "defaults::max_client_conn", deserialize_with = "de::num")]
    pub max_client_conn: u32,
    /// How long a client waits for a server before it gets SQLSTATE 53300.
    #[serde(
        default = "defaults::query_wait_timeout",
        deserialize_with = "de::duration"
    )]
    pub query_wait_timeout: Duration,
    /// How long a client may take to log in.
    #[serde(
        default = "defaults::client_login_timeout",
        deserialize_with = "de::duration"
    )]
    pub client_login_timeout: Duration,
    /// A request the server has not finished answering after this long ends the client
    /// (57014) and its server (cancelled, closed). 0: off.
    #[serde(default, deserialize_with = "de::duration")]
    pub query_timeout: Duration,
    /// A client that holds a server inside a transaction and sends nothing for this long is
    /// closed (25P03); its transaction is rolled back. 0: off.
    #[serde(default, deserialize_with = "de::duration")]
    pub idle_transaction_timeout: Duration,
    /// How long opening and logging into a server connection may take.
    #[serde(
        default = "defaults::server_connect_timeout",
        deserialize_with = "de::duration"
    )]
    pub server_connect_timeout: Duration,
    /// An idle server connection unused this long is closed (down to `min_pool_size`).
    #[serde(
        default = "defaults::server_idle_timeout",
        deserialize_with = "de::duration"
    )]
    pub server_idle_timeout: Duration,
    /// A server connection older than this is closed when next idle.
    #[serde(
        default = "defaults::server_lifetime",
        deserialize_with = "de::duration"
    )]
    pub server_lifetime: Duration,
    /// How long a shutdown waits for transactions to finish before cutting them.
    #[serde(
        default = "defaults::shutdown_timeout",
        deserialize_with = "de::duration"
    )]
    pub shutdown_timeout: Duration,
    /// How long a client keeps retrying a server connection that fails for a passing
    /// reason (the database restarts, is full) before it gets the error.
    #[serde(
        default = "defaults::server_login_retry",
        deserialize_with = "de::duration"
    )]
    pub server_login_retry: Duration,
    /// How long the proxy spends cleaning a server a client left mid-transaction before closing it.
    #[serde(
        default = "defaults::server_cleanup_timeout",
        deserialize_with = "de::duration"
    )]
    pub server_cleanup_timeout: Duration,
    /// Run on a session-mode server before it goes back to the pool; empty for none.
    #[serde(default = "defaults::server_reset_query")]
    pub server_reset_query: String,
    /// TCP keepalive on client sockets (1, the default) or not (0), so that a client host
    /// that vanished without closing its connections is found and its connections closed.
    #[serde(default = "defaults::tcp_keepalive", deserialize_with = "de::num")]
    pub tcp_keepalive: u32,
    /// Idle time of a client socket before the first keepalive probe.
    #[serde(default = "defaults::tcp_keepidle", deserialize_with = "de::duration")]
    pub tcp_keepidle: Duration,
    /// Time between keepalive probes.
    #[serde(default = "defaults::tcp_keepintvl", deserialize_with = "de::duration")]
    pub tcp_keepintvl: Duration,
    /// Unanswered probes after which the client's connection is closed.
    #[serde(default = "defaults::tcp_keepcnt", deserialize_with = "de::num")]
    pub tcp_keepcnt: u32,
    /// TCP_USER_TIMEOUT on pgsluice's TCP sockets, to clients and to servers: data sent and
    /// still unacknowledged this long fails the connection (a peer that vanished while
    /// being sent to is found in that time, not after the kernel's ~15 minutes of
    /// retransmissions). 0: the kernel's default.
    #[serde(default, deserialize_with = "de::duration")]
    pub tcp_user_timeout: Duration,
    /// Ask each server (1, the default) to probe its connection from pgsluice with the
    /// keepalive times above (startup `options`: `tcp_keepalives_idle` and its kin), so that
    /// the connections of a pgsluice whose host vanished leave `max_connections` within
    /// minutes, not the kernel's two hours. 0: leave the server's settings alone.
    #[serde(default = "defaults::tcp_keepalive", deserialize_with = "de::num")]
    pub server_tcp_keepalive: u32,
    /// An idle server unused this long runs `server_check_query` before it is handed out
    /// (0: every time).
    #[serde(
        default = "defaults::server_check_delay",
        deserialize_with = "de::duration"
    )]
    pub server_check_delay: Duration,
    /// The health check of a server idle longer than `server_check_delay`; empty for none.
    #[serde(default = "defaults::server_check_query")]
    pub server_check_query: String,
    /// Default client authentication method.
    #[serde(default = "defaults::auth_type")]
    pub auth_type: AuthType,
    /// A file of `"user" "password"` lines (PgBouncer's userlist.txt format).
    #[serde(default)]
    pub auth_file: Option<String>,
    /// The user whose connection looks up unlisted users' passwords with `auth_query`.
    #[serde(default)]
    pub auth_user: Option<String>,
    /// Password of `auth_user` (else its plain password in `[users]` or `auth_file`).
    #[serde(default)]
    pub auth_password: Option<Password>,
    /// The lookup: `$1` is the user name; returns (name, SCRAM verifier or md5 hash).
    #[serde(default = "defaults::auth_query")]
    pub auth_query: String,
    /// Database the lookup runs in; default: the database the client asked for.
    #[serde(default)]
    pub auth_dbname: Option<String>,
    /// How long a lookup's answer (found or not) is reused.
    #[serde(
        default = "defaults::auth_query_cache_ttl",
        deserialize_with = "de::duration"
    )]
    pub auth_query_cache_ttl: Duration,
    /// Failed logins allowed per client address per minute (0: no limit).
    #[serde(default, deserialize_with = "de::num")]
    pub login_rate_limit: u32,
    /// Named statements each server connection keeps prepared in transaction mode (0: named
    /// statements are refused there).
    #[serde(
        default = "defaults::max_prepared_statements",
        deserialize_with = "de::num"
    )]
    pub max_prepared_statements: usize,
    /// Largest Query or Parse message (bytes) the proxy buffers to inspect.
    #[serde(default = "defaults::max_query_size", deserialize_with = "de::num")]
    pub max_query_size: usize,
    /// Startup parameters accepted and dropped.
    #[serde(default, deserialize_with = "de::list")]
    pub ignore_startup_parameters: Vec<String>,
    /// Startup parameters accepted and kept per client, beyond the built-in list.
    #[serde(default, deserialize_with = "de::list")]
    pub track_extra_parameters: Vec<String>,
    #[serde(default = "defaults::log_format")]
    pub log_format: LogFormat,
    /// Threads serving connections; 0: one per core. Restart to change.
    #[serde(default, deserialize_with = "de::num")]
    pub worker_threads: usize,
    /// 1: client and server sockets go through io_uring (feature `io-uring`, Linux, with
    /// `worker_threads = 1`); 0 (the default): epoll. Restart to change.
    #[serde(default, deserialize_with = "de::num")]
    pub io_uring: u32,
    /// A client queued this long gets a NOTICE that it waits for a server (0: never).
    #[serde(
        default = "defaults::query_wait_notify",
        deserialize_with = "de::duration"
    )]
    pub query_wait_notify: Duration,
    /// Users allowed on the admin console (databases `pgbouncer` and `pgsluice`).
    #[serde(default, deserialize_with = "de::list")]
    pub admin_users: Vec<String>,
    /// The HTTP endpoint for metrics and health checks (`[metrics]`).
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Most server connections to one database across all its pools (0: no cap).
    #[serde(default, deserialize_with = "de::num")]
    pub max_db_connections: u32,
    /// Most server connections for one user across all its pools (0: no cap).
    #[serde(default, deserialize_with = "de::num")]
    pub max_user_connections: u32,
    /// The global connection budget (`[budget]`).
    #[serde(default)]
    pub budget: BudgetConfig,
    /// The fleet this proxy belongs to (`[fleet]`).
    #[serde(default)]
    pub fleet: FleetConfig,
    /// TLS between clients and pgsluice (`[client_tls]`).
    #[serde(default)]
    pub client_tls: crate::tls::ClientTlsConfig,
    /// TLS between pgsluice and PostgreSQL (`[server_tls]`).
    #[serde(default)]
    pub server_tls: crate::tls::ServerTlsConfig,
    /// The rustls configurations read from the TLS files when this configuration loaded.
    #[serde(skip)]
    pub tls: Arc<crate::tls::Contexts>,
    /// Client-facing database name → upstream.
    #[serde(default)]
    pub databases: BTreeMap<String, Database>,
    /// Client user name → credentials and overrides.
    #[serde(default)]
    pub users: BTreeMap<String, User>,
    /// Users and passwords read from `auth_file` (at each load).
    #[serde(skip)]
    pub auth_file_users: BTreeMap<String, Password>,
}

/// How the budget is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetMode {
    /// Read from the database: `floor(max_connections × fraction) − reserve`, shared by the fleet.
    Auto,
    /// `max_server_connections`, for this proxy alone.
    Fixed,
}

/// `[budget]`: the cap on server connections shared by every pool (see docs/budget.md).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// `auto`, or `fixed`; defaults to `fixed` when `max_server_connections` is set.
    #[serde(default)]
    pub mode: Option<BudgetMode>,
    /// Fixed mode: server connections this proxy may hold.
    #[serde(default, deserialize_with = "de::opt_num")]
    pub max_server_connections: Option<u32>,
    /// Share of `max_connections` the whole fleet may use.
    #[serde(default = "defaults::fraction", deserialize_with = "de::float")]
    pub fraction: f64,
    /// Connections kept out of the fleet budget (admin tools, migrations).
    #[serde(default, deserialize_with = "de::num")]
    pub reserve: u32,
    /// How often the control connection re-reads the figures.
    #[serde(
        default = "defaults::refresh_interval",
        deserialize_with = "de::duration"
    )]
    pub refresh_interval: Duration,
    /// Budget used while the figures cannot be read; unset: clients get an error instead.
    #[serde(default, deserialize_with = "de::opt_num")]
    pub fallback: Option<u32>,
    /// Control connection login; defaults to the first database's upstream credentials.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub password: Option<Password>,
    #[serde(default)]
    pub dbname: Option<String>,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            mode: None,
            max_server_connections: None,
            fraction: defaults::fraction(),
            reserve: 0,
            refresh_interval: defaults::refresh_interval(),
            fallback: None,
            user: None,
            password: None,
            dbname: None,
        }
    }
}

impl BudgetConfig {
    pub fn mode(&self) -> BudgetMode {
        self.mode
            .unwrap_or(if self.max_server_connections.is_some() {
                BudgetMode::Fixed
            } else {
                BudgetMode::Auto
            })
    }
}

/// `[fleet]`: proxies that share a database and its budget.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    #[serde(default = "defaults::fleet_name")]
    pub name: String,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            name: defaults::fleet_name(),
        }
    }
}

/// `[metrics]`: the HTTP endpoint serving `/metrics`, `/healthz` and `/readyz`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `HOST:PORT` of the HTTP endpoint; off when unset.
    #[serde(default)]
    pub listen: Option<String>,
    /// Distinct `application_name` values that get their own metric label; later ones
    /// share the label `other`.
    #[serde(default = "defaults::max_applications", deserialize_with = "de::num")]
    pub max_applications: u32,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: None,
            max_applications: defaults::max_applications(),
        }
    }
}

/// A peered pgsluice process: a cancel request carrying its `peer_id` is sent on to it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    /// Host name, IP address, or the directory of its Unix socket (a path).
    pub host: String,
    #[serde(default = "defaults::peer_port", deserialize_with = "de::num")]
    pub port: u16,
}

/// The highest `peer_id`: 14 bits of a cancel key's 31-bit process id.
pub const MAX_PEER_ID: u32 = 16_383;

/// Most clients of one peered process: the rest of the process id (16 bits) tells them
/// apart.
pub const MAX_PEERED_CLIENTS: u32 = 60_000;

/// One client-facing database.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Database {
    #[serde(default = "defaults::host")]
    pub host: String,
    #[serde(default = "defaults::port", deserialize_with = "de::num")]
    pub port: u16,
    /// Upstream database name; defaults to the client-facing name.
    #[serde(default)]
    pub dbname: Option<String>,
    /// Log in upstream as this user instead of the client's user.
    #[serde(default)]
    pub user: Option<String>,
    /// Upstream password for `user` (or for the client's user).
    #[serde(default)]
    pub password: Option<Password>,
    #[serde(default)]
    pub pool_mode: Option<PoolMode>,
    #[serde(default, deserialize_with = "de::opt_num")]
    pub pool_size: Option<u32>,
    #[serde(default, deserialize_with = "de::opt_num")]
    pub min_pool_size: Option<u32>,
    /// Cap on this database's server connections across its pools.
    #[serde(default, deserialize_with = "de::opt_num")]
    pub max_db_connections: Option<u32>,
    /// `read-write` (a pool for writes: standby or read-only servers are not used) or `any`.
    #[serde(default = "defaults::target_session_attrs")]
    pub target_session_attrs: TargetSessionAttrs,
}

/// One client user.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// Plain text, an md5 hash (`md5…`) or a SCRAM verifier (`SCRAM-SHA-256$…`).
    #[serde(default)]
    pub password: Option<Password>,
    #[serde(default)]
    pub auth_type: Option<AuthType>,
    #[serde(default)]
    pub pool_mode: Option<PoolMode>,
    #[serde(default, deserialize_with = "de::opt_num")]
    pub pool_size: Option<u32>,
    /// Cap on this user's server connections across its pools.
    #[serde(default, deserialize_with = "de::opt_num")]
    pub max_user_connections: Option<u32>,
}

/// Everything one pool needs, resolved from the database, user and global keys.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSettings {
    pub database: String,
    pub user: String,
    pub mode: PoolMode,
    pub pool_size: u32,
    pub min_pool_size: u32,
    pub host: String,
    pub port: u16,
    pub upstream_dbname: String,
    pub upstream_user: String,
    pub upstream_password: Option<Password>,
    /// Cap on server connections to this database across pools (0: none).
    pub max_db_connections: u32,
    /// Cap on server connections for this user across pools (0: none).
    pub max_user_connections: u32,
    /// TLS towards the upstream.
    pub tls: crate::tls::UpstreamTls,
    pub target_session_attrs: TargetSessionAttrs,
    /// The startup `options` that ask the server to probe the connection
    /// (`server_tcp_keepalive`); `None` when off or over a Unix socket.
    pub server_keepalive: Option<String>,
    /// `tcp_user_timeout`, for the server's TCP socket (zero: the kernel's default).
    pub tcp_user_timeout: Duration,
}

mod defaults {
    use super::*;
    pub fn listen() -> String {
        "127.0.0.1:6432".into()
    }
    pub fn unix_socket_mode() -> u32 {
        0o777
    }
    pub fn pool_mode() -> PoolMode {
        PoolMode::Transaction
    }
    pub fn pool_size() -> u32 {
        20
    }
    pub fn max_client_conn() -> u32 {
        10_000
    }
    pub fn query_wait_timeout() -> Duration {
        Duration::from_secs(120)
    }
    pub fn client_login_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn server_connect_timeout() -> Duration {
        Duration::from_secs(15)
    }
    pub fn server_idle_timeout() -> Duration {
        Duration::from_secs(600)
    }
    pub fn server_lifetime() -> Duration {
        Duration::from_secs(3600)
    }
    pub fn shutdown_timeout() -> Duration {
        Duration::from_secs(25)
    }
    pub fn server_login_retry() -> Duration {
        Duration::from_secs(15)
    }
    pub fn server_cleanup_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn server_reset_query() -> String {
        "DISCARD ALL".into()
    }
    pub fn server_check_delay() -> Duration {
        Duration::from_secs(30)
    }
    pub fn tcp_keepalive() -> u32 {
        1
    }
    pub fn tcp_keepidle() -> Duration {
        Duration::from_secs(60)
    }
    pub fn tcp_keepintvl() -> Duration {
        Duration::from_secs(10)
    }
    pub fn tcp_keepcnt() -> u32 {
        6
    }
    pub fn server_check_query() -> String {
        "select 1".into()
    }
    pub fn target_session_attrs() -> TargetSessionAttrs {
        TargetSessionAttrs::ReadWrite
    }
    pub fn auth_type() -> AuthType {
        AuthType::ScramSha256
    }
    pub fn auth_query() -> String {
        super::DEFAULT_AUTH_QUERY.into()
    }
    pub fn auth_query_cache_ttl() -> Duration {
        Duration::from_secs(10)
    }
    pub fn max_prepared_statements() -> usize {
        200
    }
    pub fn max_query_size() -> usize {
        32 << 20
    }
    pub fn log_format() -> LogFormat {
        LogFormat::Text
    }
    pub fn query_wait_notify() -> Duration {
        Duration::from_secs(5)
    }
    pub fn max_applications() -> u32 {
        100
    }
    pub fn fraction() -> f64 {
        0.5
    }
    pub fn refresh_interval() -> Duration {
        Duration::from_secs(30)
    }
    pub fn fleet_name() -> String {
        "default".into()
    }
    pub fn host() -> String {
        "127.0.0.1".into()
    }
    pub fn port() -> u16 {
        5432
    }
    pub fn peer_port() -> u16 {
        6432
    }
}

/// Lenient deserialisers: values from the environment and flags arrive as strings.
mod de {
    use super::*;
    use serde::de::Error;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumOrStr {
        Num(i64),
        Str(String),
    }

    pub fn num<'de, D: Deserializer<'de>, T: TryFrom<i64> + std::str::FromStr>(
        d: D,
    ) -> Result<T, D::Error> {
        match NumOrStr::deserialize(d)? {
            NumOrStr::Num(n) => {
                T::try_from(n).map_err(|_| D::Error::custom(format!("{n} is out of range")))
            }
            NumOrStr::Str(s) => s
                .trim()
                .parse()
                .map_err(|_| D::Error::custom(format!("{s:?} is not a valid number"))),
        }
    }

    /// File permissions as octal digits in a string (`"0777"`, `"660"`), as PgBouncer's
    /// `unix_socket_mode`. A TOML integer is refused: `777` would not mean what it looks like.
    pub fn octal_mode<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        match NumOrStr::deserialize(d)? {
            NumOrStr::Num(n) => Err(D::Error::custom(format!(
                "{n}: give the mode as a string of octal digits, e.g. \"0660\""
            ))),
            NumOrStr::Str(s) => {
                let t = s.trim();
                let digits = t.strip_prefix("0o").unwrap_or(t);
                match u32::from_str_radix(digits, 8) {
                    Ok(m) if !digits.is_empty() && m <= 0o777 => Ok(m),
                    _ => Err(D::Error::custom(format!(
                        "{s:?} is not a file mode (octal digits, at most \"0777\")"
                    ))),
                }
            }
        }
    }

    pub fn opt_num<'de, D: Deserializer<'de>, T: TryFrom<i64> + std::str::FromStr>(
        d: D,
    ) -> Result<Option<T>, D::Error> {
        num(d).map(Some)
    }

    pub fn float<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum FloatOrStr {
            Float(f64),
            Str(String),
        }
        match FloatOrStr::deserialize(d)? {
            FloatOrStr::Float(f) => Ok(f),
            FloatOrStr::Str(s) => s
                .trim()
                .parse()
                .map_err(|_| D::Error::custom(format!("{s:?} is not a valid number"))),
        }
    }

    pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        match NumOrStr::deserialize(d)? {
            NumOrStr::Num(n) if n >= 0 => parse_duration(&n.to_string()).map_err(D::Error::custom),
            NumOrStr::Num(n) => Err(D::Error::custom(format!("{n} is negative"))),
            NumOrStr::Str(s) => parse_duration(&s).map_err(D::Error::custom),
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrStr {
        List(Vec<String>),
        Str(String),
    }

    pub fn list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        Ok(match ListOrStr::deserialize(d)? {
            ListOrStr::List(v) => v,
            ListOrStr::Str(s) => s
                .split(',')
                .map(|p| p.trim().to_owned())
                .filter(|p| !p.is_empty())
                .collect(),
        })
    }
}

/// Longest duration accepted (10 years): timers stay far from overflow.
const MAX_DURATION_SECS: f64 = 10.0 * 365.0 * 86400.0;

/// Parses `"250ms"`, `"30s"`, `"5m"`, `"2h"`, `"1d"`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (try \"30s\", \"5m\", \"250ms\")"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        u => return Err(format!("{s:?}: unknown unit {u:?} (use ms, s, m, h or d)")),
    };
    if secs > MAX_DURATION_SECS {
        return Err(format!("{s:?} is too long (at most 10 years)"));
    }
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{s:?} is not a valid duration"))
}

/// An upstream URL, as in `DATABASE_URL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub user: String,
    pub password: Option<Password>,
    pub host: String,
    pub port: u16,
    pub dbname: String,
}

impl UpstreamUrl {
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .ok_or("must start with postgres:// or postgresql://")?;
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        // libpq's `host` and `port` parameters override the URL's: `host=/var/run/postgresql`
        // is how a URL names a Unix socket directory (or `%2Fvar%2Frun%2Fpostgresql` as host).
        let (mut query_host, mut query_port) = (None, None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("sslmode", "disable" | "allow" | "prefer"))
                | Some(("application_name", _)) => {}
                Some(("host", h)) => query_host = Some(percent_decode(h)?),
                Some(("port", p)) => query_port = Some(p),
                _ => return Err(format!("unsupported URL parameter {pair:?}")),
            }
        }
        let (userinfo, hostpart) = rest.rsplit_once('@').ok_or("needs USER@HOST")?;
        let (user, password) = match userinfo.split_once(':') {
            Some((u, p)) => (percent_decode(u)?, Some(Password::new(percent_decode(p)?))),
            None => (percent_decode(userinfo)?, None),
        };
        let (hostport, dbname) = hostpart.split_once('/').unwrap_or((hostpart, ""));
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, p) = v6.split_once(']').ok_or("unclosed [ in host")?;
            (h.to_owned(), p.strip_prefix(':').unwrap_or(""))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (percent_decode(h)?, p),
                None => (percent_decode(hostport)?, ""),
            }
        };
        let host = query_host.unwrap_or(host);
        let port = query_port.unwrap_or(port);
        let port = if port.is_empty() {
            5432
        } else {
            port.parse().map_err(|_| format!("bad port {port:?}"))?
        };
        if user.is_empty() || host.is_empty() {
            return Err("needs a user and a host".into());
        }
        let dbname = if dbname.is_empty() {
            user.clone()
        } else {
            percent_decode(dbname)?
        };
        Ok(UpstreamUrl {
            user,
            password,
            host,
            port,
            dbname,
        })
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or("bad %-escape")?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| "bad %-escape")?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "URL part is not UTF-8".into())
}

impl Config {
    /// The peer whose `peer_id` is `id`, if `[peers]` has it.
    pub fn peer(&self, id: u32) -> Option<&Peer> {
        self.peers.get(id.to_string().as_str())
    }

    /// Loads from an optional file, then the process environment, then `flags` (key, value).
    pub fn load(file: Option<&Path>, flags: &[(&str, String)]) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(file, &env, flags)
    }

    /// [`Config::load`] with an explicit environment (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: &[(String, String)],
        flags: &[(&str, String)],
    ) -> Result<Config, ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Syntax {
                        origin: path.display().to_string(),
                        message: e.to_string(),
                    })?
            }
            None => toml::Table::new(),
        };
        for (name, value) in env {
            if let Some(key) = name.strip_prefix(ENV_PREFIX) {
                if ENV_NOT_KEYS.contains(&name.as_str()) {
                    continue;
                }
                let path: Vec<String> = key.split("__").map(|p| p.to_ascii_lowercase()).collect();
                overlay(&mut table, &path, value)
                    .map_err(|reason| invalid(name.clone(), reason))?;
            }
        }
        for (key, value) in flags {
            let path: Vec<String> = key.split('.').map(str::to_owned).collect();
            overlay(&mut table, &path, value).map_err(|reason| invalid(*key, reason))?;
        }
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let key = e.path().to_string();
                invalid(
                    if key == "." { "config".to_owned() } else { key },
                    e.into_inner().to_string(),
                )
            })?;
        let lookup = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        config.finish(&lookup)
    }

    /// Parses a TOML text (no environment); for tests and `--check-config`.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let table = text
            .parse::<toml::Table>()
            .map_err(|e| ConfigError::Syntax {
                origin: "config".into(),
                message: e.to_string(),
            })?;
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| invalid(e.path().to_string(), e.into_inner().to_string()))?;
        config.finish(&|name| std::env::var(name).ok())
    }

    /// Resolves `env:`/`file:` secrets, folds quick mode into the tables, reads `auth_file`
    /// and validates.
    fn finish(mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        self.resolve_secrets(env)?;
        if let Some(url) = &self.upstream {
            let mut u = UpstreamUrl::parse(url).map_err(|r| invalid("upstream", r))?;
            if let Some(p) = &mut u.password {
                p.resolve("upstream", env)
                    .map_err(|e| invalid("upstream", e.trim_start_matches("upstream: ")))?;
            }
            // Quick mode: the upstream user may use the admin console unless told otherwise.
            if self.admin_users.is_empty() {
                self.admin_users.push(u.user.clone());
            }
            self.databases.entry(u.dbname.clone()).or_insert(Database {
                host: u.host,
                port: u.port,
                dbname: Some(u.dbname.clone()),
                user: None,
                password: None,
                pool_mode: None,
                pool_size: None,
                min_pool_size: None,
                max_db_connections: None,
                target_session_attrs: defaults::target_session_attrs(),
            });
            self.users.entry(u.user).or_insert(User {
                password: u.password,
                auth_type: None,
                pool_mode: None,
                pool_size: None,
                max_user_connections: None,
            });
        }
        if let Some(path) = &self.auth_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| invalid("auth_file", format!("cannot read {path}: {e}")))?;
            self.auth_file_users = crate::auth::auth_file::parse(&text)
                .map_err(|e| invalid("auth_file", format!("{path}: {e}")))?;
        }
        self.validate()?;
        let tls = crate::tls::load(&self.client_tls, &self.server_tls)
            .map_err(|(key, reason)| invalid(key, reason))?;
        self.tls = Arc::new(tls);
        Ok(self)
    }

    /// Replaces every `env:NAME` / `file:PATH` password by its value.
    fn resolve_secrets(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let fail = |e: String| match e.split_once(": ") {
            Some((key, reason)) => invalid(key, reason),
            None => invalid("config", e),
        };
        if let Some(p) = &mut self.upstream {
            p.resolve("upstream", env).map_err(fail)?;
        }
        if let Some(p) = &mut self.auth_password {
            p.resolve("auth_password", env).map_err(fail)?;
        }
        if let Some(p) = &mut self.budget.password {
            p.resolve("budget.password", env).map_err(fail)?;
        }
        for (name, db) in &mut self.databases {
            if let Some(p) = &mut db.password {
                p.resolve(&format!("databases.{name}.password"), env)
                    .map_err(fail)?;
            }
        }
        for (name, u) in &mut self.users {
            if let Some(p) = &mut u.password {
                p.resolve(&format!("users.{name}.password"), env)
                    .map_err(fail)?;
            }
        }
        Ok(())
    }

    /// How a client user logs in: `users.NAME.auth_type`, else the top-level `auth_type`.
    pub fn auth_type_of(&self, user: &str) -> AuthType {
        self.users
            .get(user)
            .and_then(|u| u.auth_type)
            .unwrap_or(self.auth_type)
    }

    /// The password a client user is checked against: `[users.NAME]`, else `auth_file`.
    pub fn user_password(&self, user: &str) -> Option<&Password> {
        self.users
            .get(user)
            .and_then(|u| u.password.as_ref())
            .or_else(|| self.auth_file_users.get(user))
            .filter(|p| !p.is_empty())
    }

    /// True when `user` is listed in `[users]` or `auth_file`.
    pub fn lists_user(&self, user: &str) -> bool {
        self.users.contains_key(user) || self.auth_file_users.contains_key(user)
    }

    /// Login settings of the `auth_query` lookup connection for client-facing database
    /// `database` (its upstream server); `None` without `auth_user` or for an unknown database.
    pub fn auth_query_settings(&self, database: &str) -> Option<PoolSettings> {
        let auth_user = self.auth_user.as_ref()?;
        let mut s = self.pool_settings(database, auth_user)?;
        let db = &self.databases[database];
        s.database = format!("auth_query ({}:{})", db.host, db.port);
        s.upstream_user = auth_user.clone();
        s.upstream_password = self.auth_password.clone().or_else(|| {
            self.user_password(auth_user)
                .filter(|p| is_plain_password(p))
                .cloned()
        });
        if let Some(d) = &self.auth_dbname {
            s.upstream_dbname = d.clone();
        }
        Some(s)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.databases.is_empty() {
            return Err(invalid(
                "databases",
                "no database configured: add a [databases.NAME] table or set upstream",
            ));
        }
        if self.users.is_empty() && self.auth_file_users.is_empty() && self.auth_user.is_none() {
            return Err(invalid(
                "users",
                "no user configured: add a [users.NAME] table, set auth_file or auth_user, or set upstream",
            ));
        }
        if self.pool_size == 0 {
            return Err(invalid("pool_size", "must be at least 1"));
        }
        if self.so_reuseport > 1 {
            return Err(invalid("so_reuseport", "must be 0 (off) or 1 (on)"));
        }
        if self.io_uring > 1 {
            return Err(invalid("io_uring", "must be 0 (off) or 1 (on)"));
        }
        if self.io_uring == 1 && !cfg!(feature = "io-uring") {
            return Err(invalid(
                "io_uring",
                "this pgsluice was built without the io-uring feature",
            ));
        }
        if self.io_uring == 1 && self.worker_threads != 1 {
            return Err(invalid(
                "io_uring",
                "needs worker_threads = 1 (one ring per process; run several processes with so_reuseport to use more cores)",
            ));
        }
        if self.peer_id > MAX_PEER_ID {
            return Err(invalid(
                "peer_id",
                format!("must be 0 (no peering) to {MAX_PEER_ID}"),
            ));
        }
        if self.peer_id != 0 && self.max_client_conn > MAX_PEERED_CLIENTS {
            return Err(invalid(
                "max_client_conn",
                format!("at most {MAX_PEERED_CLIENTS} with peer_id set: a peered process's cancel keys have 16 bits to tell its clients apart"),
            ));
        }
        for (name, peer) in &self.peers {
            let canonical = name.parse::<u32>().map(|n| n.to_string() == *name);
            if !matches!(name.parse::<u32>(), Ok(1..=MAX_PEER_ID)) || canonical != Ok(true) {
                return Err(invalid(
                    format!("peers.{name}"),
                    format!("a peer is named by its peer_id, 1 to {MAX_PEER_ID}"),
                ));
            }
            if peer.host.is_empty() {
                return Err(invalid(format!("peers.{name}.host"), "must not be empty"));
            }
        }
        if self.tcp_keepalive > 1 {
            return Err(invalid("tcp_keepalive", "must be 0 (off) or 1 (on)"));
        }
        if self.server_tcp_keepalive > 1 {
            return Err(invalid("server_tcp_keepalive", "must be 0 (off) or 1 (on)"));
        }
        if self.tcp_keepalive == 1
            && (self.tcp_keepidle.as_secs() == 0
                || self.tcp_keepintvl.as_secs() == 0
                || self.tcp_keepcnt == 0)
        {
            return Err(invalid(
                "tcp_keepidle",
                "tcp_keepidle and tcp_keepintvl must be at least 1s and tcp_keepcnt at least 1 (or set tcp_keepalive = 0)",
            ));
        }
        // The kernel takes whole milliseconds as a non-negative C int (up to ~24.8 days).
        let ms = self.tcp_user_timeout.as_millis();
        if !self.tcp_user_timeout.is_zero() && (ms == 0 || ms > i32::MAX as u128) {
            return Err(invalid(
                "tcp_user_timeout",
                "must be 0 (the kernel's default) or from 1ms to 24 days",
            ));
        }
        if self.min_pool_size > self.pool_size {
            return Err(invalid("min_pool_size", "must not exceed pool_size"));
        }
        if self.max_client_conn == 0 {
            return Err(invalid("max_client_conn", "must be at least 1"));
        }
        if self.max_query_size < 1024 {
            return Err(invalid("max_query_size", "must be at least 1024 bytes"));
        }
        for admin in &self.admin_users {
            if !self.lists_user(admin) {
                return Err(invalid(
                    "admin_users",
                    format!("{admin:?} is not a user: admin users log in with the password in [users.{admin}] or auth_file"),
                ));
            }
        }
        if self.auth_user.is_some() && !self.auth_query.contains("$1") {
            return Err(invalid(
                "auth_query",
                "must use $1 for the user name being looked up",
            ));
        }
        if self.auth_user.as_deref() == Some("") {
            return Err(invalid("auth_user", "must not be empty"));
        }
        for (name, pw) in &self.auth_file_users {
            if self.users.get(name).is_some_and(|u| u.password.is_some()) {
                return Err(invalid(
                    format!("users.{name}.password"),
                    "the user's password is also in auth_file: keep one of them",
                ));
            }
            let method = self.auth_type_of(name);
            if method == AuthType::ScramSha256 && is_md5_hash(pw) {
                return Err(invalid(
                    "auth_file",
                    format!("user {name:?}: an md5 hash cannot check SCRAM logins: give the plain password or a SCRAM verifier, or auth_type = \"md5\""),
                ));
            }
            if pw.starts_with("SCRAM-SHA-256$") && crate::auth::scram::Verifier::parse(pw).is_none()
            {
                return Err(invalid(
                    "auth_file",
                    format!("user {name:?}: malformed SCRAM verifier (expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>)"),
                ));
            }
        }
        if self.metrics.max_applications == 0 {
            return Err(invalid("metrics.max_applications", "must be at least 1"));
        }
        if let Some(addr) = &self.metrics.listen {
            if addr
                .rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            {
                return Err(invalid(
                    "metrics.listen",
                    format!("{addr:?} is not HOST:PORT"),
                ));
            }
        }
        let b = &self.budget;
        if !(b.fraction > 0.0 && b.fraction <= 1.0) {
            return Err(invalid("budget.fraction", "must be above 0 and at most 1"));
        }
        if b.mode == Some(BudgetMode::Auto) && b.max_server_connections.is_some() {
            // Silently ignored before: a proxy meant to hold N held what the database said.
            return Err(invalid(
                "budget.max_server_connections",
                "is for fixed mode: remove it, or set budget.mode = \"fixed\"",
            ));
        }
        if b.mode() == BudgetMode::Fixed && b.max_server_connections.unwrap_or(0) == 0 {
            return Err(invalid(
                "budget.max_server_connections",
                "fixed mode needs at least 1",
            ));
        }
        if b.fallback == Some(0) {
            return Err(invalid(
                "budget.fallback",
                "must be at least 1 (leave it unset for none)",
            ));
        }
        crate::budget::check_fleet_name(&self.fleet.name).map_err(|r| invalid("fleet.name", r))?;
        for (key, d) in [
            ("budget.refresh_interval", self.budget.refresh_interval),
            ("query_wait_timeout", self.query_wait_timeout),
            ("client_login_timeout", self.client_login_timeout),
            ("server_connect_timeout", self.server_connect_timeout),
            ("server_cleanup_timeout", self.server_cleanup_timeout),
            ("auth_query_cache_ttl", self.auth_query_cache_ttl),
        ] {
            if d.is_zero() {
                return Err(invalid(key, "must be longer than 0"));
            }
        }
        for (name, db) in &self.databases {
            let key = |k: &str| format!("databases.{name}.{k}");
            if db.pool_size == Some(0) {
                return Err(invalid(key("pool_size"), "must be at least 1"));
            }
            if db.host.is_empty() {
                return Err(invalid(key("host"), "must not be empty"));
            }
            if crate::socket::is_unix_host(&db.host)
                && self.server_tls.mode != crate::tls::ServerTlsMode::Prefer
                && self.server_tls.mode != crate::tls::ServerTlsMode::Disable
            {
                return Err(invalid(
                    key("host"),
                    format!(
                        "{} is a Unix socket directory, and PostgreSQL offers no TLS over a Unix socket: server_tls.mode = \"{}\" cannot be met (use \"prefer\" or \"disable\", or a TCP host)",
                        db.host,
                        self.server_tls.mode.as_str()
                    ),
                ));
            }
            if name == "pgsluice" || name == "pgbouncer" {
                return Err(invalid(
                    format!("databases.{name}"),
                    "this name is reserved for the admin console",
                ));
            }
        }
        for (name, user) in &self.users {
            let auth = user.auth_type.unwrap_or(self.auth_type);
            let pw = user.password.as_deref();
            let key = format!("users.{name}.password");
            match (auth, pw) {
                (AuthType::Trust, _) => {}
                (_, None) if self.auth_file_users.contains_key(name) || self.auth_user.is_some() => {}
                (_, None) => return Err(invalid(key, "required unless auth_type is \"trust\", the user is in auth_file, or auth_user looks it up")),
                (_, Some(p)) if p.starts_with("SCRAM-SHA-256$") && crate::auth::scram::Verifier::parse(p).is_none() => {
                    return Err(invalid(key, "malformed SCRAM verifier (expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>)"))
                }
                (AuthType::ScramSha256, Some(p)) if is_md5_hash(p) => {
                    return Err(invalid(key, "an md5 hash cannot check SCRAM logins: give the plain password or a SCRAM verifier"))
                }
                _ => {}
            }
            if user.pool_size == Some(0) {
                return Err(invalid(
                    format!("users.{name}.pool_size"),
                    "must be at least 1",
                ));
            }
        }
        if self.budget.mode() == BudgetMode::Auto {
            for db in self.databases.values() {
                if self.control_settings(&db.host, db.port).is_none() {
                    return Err(invalid(
                        "budget",
                        format!(
                            "no credentials for the budget's control connection to {}:{}: set budget.user and budget.password, a plain user password, or budget.mode = \"fixed\"",
                            db.host, db.port
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Resolves the settings of the pool for a client-facing database and user.
    pub fn pool_settings(&self, database: &str, user: &str) -> Option<PoolSettings> {
        let db = self.databases.get(database)?;
        let u = self.users.get(user);
        let upstream_user = db.user.clone().unwrap_or_else(|| user.to_owned());
        let upstream_password = if db.user.is_some() {
            db.password.clone()
        } else {
            db.password.clone().or_else(|| {
                self.user_password(user)
                    .filter(|p| is_plain_password(p))
                    .cloned()
            })
        };
        Some(PoolSettings {
            database: database.to_owned(),
            user: user.to_owned(),
            mode: u
                .and_then(|u| u.pool_mode)
                .or(db.pool_mode)
                .unwrap_or(self.pool_mode),
            pool_size: u
                .and_then(|u| u.pool_size)
                .or(db.pool_size)
                .unwrap_or(self.pool_size),
            min_pool_size: db.min_pool_size.unwrap_or(self.min_pool_size),
            host: db.host.clone(),
            port: db.port,
            upstream_dbname: db.dbname.clone().unwrap_or_else(|| database.to_owned()),
            upstream_user,
            upstream_password,
            max_db_connections: db.max_db_connections.unwrap_or(self.max_db_connections),
            max_user_connections: u
                .and_then(|u| u.max_user_connections)
                .unwrap_or(self.max_user_connections),
            tls: self.tls.server.clone(),
            target_session_attrs: db.target_session_attrs,
            server_keepalive: self.server_keepalive(&db.host),
            tcp_user_timeout: self.tcp_user_timeout,
        })
    }

    /// [`PoolSettings::server_keepalive`] for an upstream at `host`.
    fn server_keepalive(&self, host: &str) -> Option<String> {
        (self.server_tcp_keepalive == 1 && !crate::socket::is_unix_host(host)).then(|| {
            format!(
                "-c tcp_keepalives_idle={} -c tcp_keepalives_interval={} -c tcp_keepalives_count={}",
                self.tcp_keepidle.as_secs(),
                self.tcp_keepintvl.as_secs(),
                self.tcp_keepcnt
            )
        })
    }

    /// Login settings of the budget's control connection to the upstream `host:port`:
    /// `[budget]` user/password/dbname, else the first database there with usable credentials.
    pub fn control_settings(&self, host: &str, port: u16) -> Option<PoolSettings> {
        let b = &self.budget;
        let (name, db) = self
            .databases
            .iter()
            .find(|(_, d)| d.host == host && d.port == port)?;
        let user = match (&b.user, &db.user) {
            (Some(u), _) | (None, Some(u)) => u.clone(),
            (None, None) => self
                .users
                .keys()
                .chain(self.auth_file_users.keys())
                .find(|n| {
                    db.password.is_some()
                        || self.user_password(n).is_some_and(|p| is_plain_password(p))
                })
                .or(self.auth_password.as_ref().and(self.auth_user.as_ref()))
                .cloned()?,
        };
        let mut s = self.pool_settings(name, &user)?;
        s.database = format!("budget control ({host}:{port})");
        if s.upstream_password.is_none() && self.auth_user.as_ref() == Some(&user) {
            s.upstream_password = self.auth_password.clone();
        }
        s.upstream_user = user;
        if let Some(p) = &b.password {
            s.upstream_password = Some(p.clone());
        }
        if let Some(d) = &b.dbname {
            s.upstream_dbname = d.clone();
        }
        Some(s)
    }
}

/// Sets `path` in `table` to the string `value`, creating tables on the way.
fn overlay(table: &mut toml::Table, path: &[String], value: &str) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty key")?;
    let mut t = table;
    for p in parents {
        let entry = t
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = entry
            .as_table_mut()
            .ok_or_else(|| format!("{p} is not a table"))?;
    }
    t.insert(last.clone(), toml::Value::String(value.to_owned()));
    Ok(())
}

pub fn is_md5_hash(p: &str) -> bool {
    p.len() == 35 && p.starts_with("md5") && p[3..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// A password given in clear text (not a hash or verifier).
pub fn is_plain_password(p: &str) -> bool {
    !is_md5_hash(p) && !p.starts_with("SCRAM-SHA-256$")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "[databases.app]\nhost = \"db\"\n[users.app]\npassword = \"pw\"\n";

    /// `server_tcp_keepalive`: the startup options a server login sends, from the keepalive
    /// times; none when off or over a Unix socket.
    #[test]
    fn server_keepalive_options() {
        let options = |toml: &str| {
            let c = Config::from_toml(toml).unwrap();
            c.pool_settings("app", "app").unwrap().server_keepalive
        };
        let sent = |idle: u32, count: u32| {
            Some(format!(
                "-c tcp_keepalives_idle={idle} -c tcp_keepalives_interval=10 -c tcp_keepalives_count={count}"
            ))
        };
        assert_eq!(
            options(&format!("tcp_keepidle = \"37s\"\ntcp_keepcnt = 2\n{MIN}")),
            sent(37, 2)
        );
        assert_eq!(options(&format!("server_tcp_keepalive = 0\n{MIN}")), None);
        let unix = "[databases.app]\nhost = \"/run/postgresql\"\n[users.app]\npassword = \"pw\"\n";
        assert_eq!(options(unix), None);
        let e = Config::from_toml(&format!("server_tcp_keepalive = 2\n{MIN}")).unwrap_err();
        assert!(e.to_string().starts_with("server_tcp_keepalive:"), "{e}");
        // tcp_user_timeout reaches the pools' settings, in whole milliseconds the kernel takes.
        let user_timeout = |t: &str| {
            Config::from_toml(&format!("tcp_user_timeout = {t}\n{MIN}"))
                .map(|c| c.pool_settings("app", "app").unwrap().tcp_user_timeout)
                .map_err(|e| e.to_string())
        };
        assert_eq!(user_timeout("\"2500ms\""), Ok(Duration::from_millis(2500)));
        assert_eq!(user_timeout("0"), Ok(Duration::ZERO));
        assert_eq!(user_timeout("\"24d\""), Ok(Duration::from_secs(24 * 86400)));
        for bad in ["\"0.5ms\"", "\"25d\""] {
            let e = user_timeout(bad).unwrap_err();
            assert!(e.starts_with("tcp_user_timeout:"), "{bad}: {e}");
        }
        // With client keepalive off, a 0 may stay (as in PgBouncer): the server's default.
        assert_eq!(
            options(&format!("tcp_keepalive = 0\ntcp_keepidle = \"0s\"\n{MIN}")),
            sent(0, 6)
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5 weeks").is_err());
        assert!(parse_duration("99999999999999999999").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn urls() {
        let u = UpstreamUrl::parse("postgres://app:p%40ss@db.internal:5433/shop").unwrap();
        assert_eq!(
            u,
            UpstreamUrl {
                user: "app".into(),
                password: Some("p@ss".into()),
                host: "db.internal".into(),
                port: 5433,
                dbname: "shop".into()
            }
        );
        let u = UpstreamUrl::parse("postgresql://app@[::1]/x").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.password), ("::1", 5432, None));
        assert!(UpstreamUrl::parse("mysql://a@b/c").is_err());
        assert!(UpstreamUrl::parse("postgres://a@b:notaport/c").is_err());
        assert!(UpstreamUrl::parse("postgres://a@b/c?sslmode=verify-full").is_err());
    }

    #[test]
    fn peering() {
        let c = Config::from_toml(MIN).unwrap();
        assert_eq!((c.peer_id, c.peers.len()), (0, 0));
        let c = Config::from_toml(&format!(
            "peer_id = 2\n{MIN}\n[peers.1]\nhost = \"/run/p1\"\n[peers.2]\nhost = \"10.0.0.2\"\nport = 6000\n"
        ))
        .unwrap();
        assert_eq!(c.peer_id, 2);
        assert_eq!(
            c.peer(1).map(|p| (p.host.as_str(), p.port)),
            Some(("/run/p1", 6432))
        );
        assert_eq!(
            c.peer(2).map(|p| (p.host.as_str(), p.port)),
            Some(("10.0.0.2", 6000))
        );
        assert_eq!(c.peer(3), None);
        let err = |toml: String| Config::from_toml(&toml).unwrap_err().to_string();
        assert!(err(format!("peer_id = 16384\n{MIN}")).starts_with("peer_id:"));
        for bad in ["0", "16384", "01", "x"] {
            let e = err(format!("{MIN}\n[peers.\"{bad}\"]\nhost = \"h\"\n"));
            assert!(e.starts_with(&format!("peers.{bad}:")), "{bad}: {e}");
        }
        assert!(err(format!("{MIN}\n[peers.1]\nhost = \"\"\n")).starts_with("peers.1.host:"));
        let e = err(format!("peer_id = 1\nmax_client_conn = 60001\n{MIN}"));
        assert!(e.starts_with("max_client_conn:"), "{e}");
        assert!(Config::from_toml(&format!("peer_id = 1\nmax_client_conn = 60000\n{MIN}")).is_ok());
    }

    #[test]
    fn so_reuseport() {
        assert_eq!(Config::from_toml(MIN).unwrap().so_reuseport, 0);
        let c = Config::from_toml(&format!("so_reuseport = 1\n{MIN}")).unwrap();
        assert_eq!(c.so_reuseport, 1);
        for bad in ["2", "-1", "\"yes\""] {
            let e = Config::from_toml(&format!("so_reuseport = {bad}\n{MIN}"))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("so_reuseport:"), "{bad}: {e}");
        }
    }

    /// `mode = "auto"` with a number for fixed mode is a contradiction, not a choice.
    #[test]
    fn auto_mode_refuses_max_server_connections() {
        let e = Config::from_toml(&format!(
            "[budget]\nmode = \"auto\"\nmax_server_connections = 5\n{MIN}"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("budget.max_server_connections") && e.contains("fixed"),
            "{e}"
        );
        let c = Config::from_toml(&format!("[budget]\nmax_server_connections = 5\n{MIN}")).unwrap();
        assert_eq!(c.budget.mode(), BudgetMode::Fixed);
    }

    #[test]
    fn io_uring_needs_one_worker_thread() {
        assert_eq!(Config::from_toml(MIN).unwrap().io_uring, 0);
        let c = Config::from_toml(&format!("io_uring = 1\nworker_threads = 1\n{MIN}"));
        if cfg!(feature = "io-uring") {
            assert_eq!(c.unwrap().io_uring, 1);
        } else {
            let e = c.unwrap_err().to_string();
            assert!(e.contains("without the io-uring feature"), "{e}");
        }
        for top in [
            "io_uring = 1",
            "io_uring = 1\nworker_threads = 2",
            "io_uring = 2\nworker_threads = 1",
        ] {
            let e = Config::from_toml(&format!("{top}\n{MIN}"))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("io_uring:"), "{top}: {e}");
        }
    }

    #[test]
    fn unix_sockets() {
        let err = |t: &str| Config::from_toml(t).unwrap_err().to_string();
        // A URL names a socket directory as libpq does: a host parameter, or an escaped host.
        let u =
            UpstreamUrl::parse("postgres://app@/shop?host=/var/run/postgresql&port=5433").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.dbname.as_str()),
            ("/var/run/postgresql", 5433, "shop")
        );
        let u = UpstreamUrl::parse("postgres://app:pw@%2Ftmp%2Fpg:6000/shop").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("/tmp/pg", 6000));
        // listen_unix: none by default; the socket's mode as octal digits.
        let c = Config::from_toml(MIN).unwrap();
        assert_eq!((c.listen_unix.as_str(), c.unix_socket_mode), ("", 0o777));
        let c = Config::from_toml(&format!(
            "listen_unix = \"/run/pgsluice\"\nunix_socket_mode = \"0660\"\n{MIN}"
        ))
        .unwrap();
        assert_eq!(
            (c.listen_unix.as_str(), c.unix_socket_mode),
            ("/run/pgsluice", 0o660)
        );
        for bad in ["\"0999\"", "\"01777\"", "\"\"", "777"] {
            let e = err(&format!("unix_socket_mode = {bad}\n{MIN}"));
            assert!(e.starts_with("unix_socket_mode:"), "{bad}: {e}");
        }
        // No TLS over a Unix socket: a mode that requires it is refused, naming the database.
        let unix_db =
            "[databases.app]\nhost = \"/var/run/postgresql\"\n[users.app]\npassword = \"pw\"\n";
        assert!(Config::from_toml(unix_db).is_ok());
        let e = err(&format!("[server_tls]\nmode = \"require\"\n{unix_db}"));
        assert!(
            e.starts_with("databases.app.host:") && e.contains("no TLS over a Unix socket"),
            "{e}"
        );
    }

    #[test]
    fn defaults_and_overrides() {
        let c = Config::from_toml(MIN).unwrap();
        assert_eq!(c.pool_size, 20);
        assert_eq!(c.query_wait_timeout, Duration::from_secs(120));
        let env = vec![
            ("PGSLUICE_POOL_SIZE".to_owned(), "7".to_owned()),
            (
                "PGSLUICE_DATABASES__APP__PORT".to_owned(),
                "6000".to_owned(),
            ),
            ("PGSLUICE_CONFIG".to_owned(), "ignored".to_owned()),
            ("HOME".to_owned(), "/root".to_owned()),
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, MIN).unwrap();
        let c = Config::load_from(Some(&path), &env, &[("pool_size", "9".into())]).unwrap();
        assert_eq!(c.pool_size, 9, "flags beat the environment");
        assert_eq!(c.databases["app"].port, 6000);
    }

    #[test]
    fn errors_name_the_key() {
        let err = |t: &str| Config::from_toml(t).unwrap_err().to_string();
        assert!(err(&format!("pool_size = 0\n{MIN}")).starts_with("pool_size:"));
        assert!(err(&format!("query_wait_timeout = \"soon\"\n{MIN}"))
            .starts_with("query_wait_timeout:"));
        assert!(err(&format!("pool_mode = \"statement\"\n{MIN}")).starts_with("pool_mode:"));
        assert!(err(&format!("pool_sise = 3\n{MIN}")).contains("pool_sise"));
        assert!(
            err("[databases.app]\nport = \"x\"\n[users.a]\npassword=\"p\"")
                .starts_with("databases.app.port:")
        );
        assert!(err("[databases.app]\n[users.a]\n").starts_with("users.a.password:"));
        assert!(err("").starts_with("databases:"));
        assert!(
            err("[databases.a]\n[users.a]\npassword = \"SCRAM-SHA-256$4096:bad\"")
                .contains("malformed SCRAM verifier")
        );
        let env = vec![("PGSLUICE_NOPE".to_owned(), "1".to_owned())];
        assert!(
            Config::load_from(None, &env, &[("upstream", "postgres://a:b@h/d".into())])
                .unwrap_err()
                .to_string()
                .contains("nope")
        );
    }

    #[test]
    fn quick_mode() {
        let c = Config::load_from(
            None,
            &[],
            &[(
                "upstream",
                "postgres://app:secret@10.0.0.5:5433/shop".into(),
            )],
        )
        .unwrap();
        let s = c.pool_settings("shop", "app").unwrap();
        assert_eq!(
            (s.host.as_str(), s.port, s.upstream_dbname.as_str()),
            ("10.0.0.5", 5433, "shop")
        );
        assert_eq!(s.upstream_password.as_deref(), Some("secret"));
        assert!(c.pool_settings("other", "app").is_none());
    }

    #[test]
    fn admin_users_and_metrics() {
        let c = Config::load_from(
            None,
            &[],
            &[("upstream", "postgres://app:pw@db/shop".into())],
        )
        .unwrap();
        assert_eq!(
            c.admin_users,
            ["app"],
            "quick mode: the upstream user is the admin"
        );
        assert_eq!(c.metrics.listen, None);
        assert_eq!(c.query_wait_notify, Duration::from_secs(5));
        let c = Config::load_from(
            None,
            &[("PGSLUICE_METRICS__LISTEN".into(), "127.0.0.1:9127".into())],
            &[
                ("upstream", "postgres://app:pw@db/shop".into()),
                ("admin_users", "".into()),
            ],
        )
        .unwrap();
        assert_eq!(c.metrics.listen.as_deref(), Some("127.0.0.1:9127"));
        assert_eq!(
            c.admin_users,
            ["app"],
            "an empty list still gets the default"
        );
        let err = |t: &str| Config::from_toml(t).unwrap_err().to_string();
        assert!(err(&format!("admin_users = [\"nobody\"]\n{MIN}")).starts_with("admin_users:"));
        assert!(err(&format!("[metrics]\nlisten = \"9127\"\n{MIN}")).starts_with("metrics.listen:"));
        assert!(err(&format!("[metrics]\nmax_applications = 0\n{MIN}"))
            .starts_with("metrics.max_applications:"));
    }

    #[test]
    fn secrets_from_env_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "from-file\n").unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            format!(
                "auth_user = \"lookup\"\nauth_password = \"env:LOOKUP_PW\"\n[budget]\npassword = \"file:{p}\"\nuser = \"b\"\n[databases.app]\nhost = \"db\"\npassword = \"env:DB_PW\"\n[users.app]\npassword = \"file:{p}\"\n",
                p = pw.display()
            ),
        )
        .unwrap();
        let env = vec![
            ("DB_PW".to_owned(), "from-env".to_owned()),
            ("LOOKUP_PW".to_owned(), "lookup-env".to_owned()),
        ];
        let c = Config::load_from(Some(&path), &env, &[]).unwrap();
        assert_eq!(c.users["app"].password.as_deref(), Some("from-file"));
        assert_eq!(c.databases["app"].password.as_deref(), Some("from-env"));
        assert_eq!(c.budget.password.as_deref(), Some("from-file"));
        assert_eq!(c.auth_password.as_deref(), Some("lookup-env"));
        // A missing variable names the key, never a value.
        let err = Config::load_from(Some(&path), &env[1..], &[])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "databases.app.password: environment variable DB_PW is not set"
        );
        // The environment may itself point a password at a secret.
        let env = vec![
            ("DB_PW".to_owned(), "x".to_owned()),
            ("LOOKUP_PW".to_owned(), "y".to_owned()),
            (
                "PGSLUICE_USERS__APP__PASSWORD".to_owned(),
                "env:APP_PW".to_owned(),
            ),
            ("APP_PW".to_owned(), "app-env".to_owned()),
        ];
        let c = Config::load_from(Some(&path), &env, &[]).unwrap();
        assert_eq!(c.users["app"].password.as_deref(), Some("app-env"));
        // Quick mode: the URL and its password.
        let env = vec![(
            "DATABASE_URL".to_owned(),
            "postgres://u:p%40ss@h/d".to_owned(),
        )];
        let c = Config::load_from(None, &env, &[("upstream", "env:DATABASE_URL".into())]).unwrap();
        assert_eq!(
            c.pool_settings("d", "u")
                .unwrap()
                .upstream_password
                .as_deref(),
            Some("p@ss")
        );
        // Debug output never shows a password.
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("p@ss") && !debug.contains("p%40ss"),
            "{debug}"
        );
    }

    #[test]
    fn auth_file_and_auth_query_keys() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("userlist.txt");
        std::fs::write(
            &list,
            "\"app\" \"pw\"\n\"ro\" \"md5ad1b1d8d3a4d4e8f9f1a2b3c4d5e6f70\"\n",
        )
        .unwrap();
        let db = "[databases.app]\nhost = \"db\"\n";
        let file = format!("auth_file = {:?}\n", list.display().to_string());
        let md5_user = "[users.ro]\nauth_type = \"md5\"\n";
        assert!(Config::from_toml(&format!("{file}{db}"))
            .unwrap_err()
            .to_string()
            .contains("user \"ro\": an md5 hash cannot check SCRAM logins"));
        let c =
            Config::from_toml(&format!("{file}admin_users = [\"app\"]\n{db}{md5_user}")).unwrap();
        assert_eq!(c.auth_file_users.len(), 2);
        assert_eq!(
            c.pool_settings("app", "app")
                .unwrap()
                .upstream_password
                .as_deref(),
            Some("pw")
        );
        assert_eq!(
            c.pool_settings("app", "ro").unwrap().upstream_password,
            None,
            "a hash is no password"
        );
        assert_eq!(c.control_settings("db", 5432).unwrap().upstream_user, "app");
        let err = |t: &str| Config::from_toml(t).unwrap_err().to_string();
        assert!(err(&format!(
            "{file}{db}{md5_user}[users.app]\npassword = \"x\"\n"
        ))
        .starts_with("users.app.password: the user's password is also in auth_file"));
        assert!(err(&format!("auth_file = \"/nonexistent/userlist\"\n{db}"))
            .starts_with("auth_file: cannot read /nonexistent/userlist"));
        std::fs::write(&list, "app pw\n").unwrap();
        assert!(err(&format!("{file}{db}")).contains("line 1: expected \"user\" \"password\""));
        // auth_user alone is enough: users come from the lookup.
        let c = Config::from_toml(&format!("auth_user = \"lookup\"\nauth_password = \"lp\"\nauth_dbname = \"postgres\"\n[budget]\nmode = \"fixed\"\nmax_server_connections = 5\n{db}")).unwrap();
        let s = c.auth_query_settings("app").unwrap();
        assert_eq!(
            (s.upstream_user.as_str(), s.upstream_dbname.as_str()),
            ("lookup", "postgres")
        );
        assert_eq!(s.upstream_password.as_deref(), Some("lp"));
        assert!(c.auth_query_settings("other").is_none());
        assert!(
            c.auth_query.contains("pg_catalog.pg_authid") && c.auth_query.contains("rolvaliduntil")
        );
        // ... and gives the budget's control connection its login.
        let c = Config::from_toml(&format!(
            "auth_user = \"lookup\"\nauth_password = \"lp\"\n{db}"
        ))
        .unwrap();
        assert_eq!(
            c.control_settings("db", 5432).unwrap().upstream_user,
            "lookup"
        );
        assert!(err(&format!(
            "auth_user = \"l\"\nauth_query = \"SELECT 1\"\n{db}"
        ))
        .starts_with("auth_query: must use $1"));
        assert!(err(&format!(
            "auth_user = \"l\"\nauth_query_cache_ttl = \"0s\"\n{db}"
        ))
        .starts_with("auth_query_cache_ttl:"));
        assert!(err(&format!("login_rate_limit = -1\n{MIN}")).starts_with("login_rate_limit:"));
    }

    /// Every file in `config/` parses, so the examples cannot rot.
    #[test]
    fn shipped_examples_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if path.extension().is_some_and(|e| e == "toml") && !name.starts_with("plan") {
                Config::load_from(Some(&path), &[], &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
                n += 1;
            }
        }
        assert!(n >= 2, "config/ holds the example files");
    }
}
