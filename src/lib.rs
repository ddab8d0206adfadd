//! pgsluice: a PostgreSQL connection pooler that keeps a whole fleet of proxies below
//! `max_connections / 2`.
//!
//! # Layout
//! - [`app`]: wiring; [`listener`]: accept loop and `max_client_conn`.
//! - [`client`]: one client's life (handshake, login, the transaction loop).
//! - [`auth`]: client authentication (SCRAM-SHA-256, md5, trust).
//! - [`pool`]: pools of server connections, FIFO waiters, the janitor.
//! - [`server`]: a connection to PostgreSQL (login, the proxy's own queries, cancel).
//! - [`relay`]: one transaction between a client and a server (the hot path);
//!   [`clock`]: the integer microsecond stamps it and the pools keep instead of `Instant`s.
//! - [`protocol`]: framing, startup packets, the few messages built or read whole.
//! - [`prepared`]: named prepared statements under transaction pooling.
//! - [`sql`]: statements that change session state, for transaction pooling.
//! - [`cancel`]: CancelRequest routing.
//! - [`config`]: the configuration file, environment and flags; [`secrets`]: passwords
//!   kept out of logs, given as `env:NAME` or `file:PATH`.
//! - [`metrics`]: Prometheus metrics; [`http`]: `/metrics`, `/healthz`, `/readyz`;
//!   [`clients`]: the registry of connected clients; [`admin`]: the admin console.
//! - [`demo`]: `pgsluice demo`, and the throwaway PostgreSQL it (and the tests) start.

pub mod admin;
pub mod app;
pub mod auth;
pub mod budget;
pub mod cancel;
pub mod client;
pub mod clients;
pub mod clock;
pub mod config;
pub mod demo;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod listener;
pub mod metrics;
pub mod pool;
pub mod prepared;
pub mod protocol;
pub mod relay;
pub mod reload;
pub mod secrets;
pub mod server;
pub mod session_params;
pub mod shutdown;
pub mod socket;
pub mod sql;
pub mod stream;
pub mod tls;
#[cfg(feature = "io-uring")]
pub mod uring;

pub use app::run;
pub use config::Config;

/// A map looked up on every login (pools, credentials, cancel keys, metric handles): hashed
/// with foldhash, seeded per process, instead of the standard library's SipHash, which cost
/// ~150 instructions a lookup and eleven lookups a login.
pub type Map<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// A set of the same kind as [`Map`].
pub type Set<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
