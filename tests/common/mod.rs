//! Test harness: a throwaway PostgreSQL per test binary, pgsluice in-process or as the built
//! binary, and small client helpers.
#![allow(dead_code)]

pub mod child;
pub mod fake_pg;
pub mod fault;
pub mod leaks;
pub mod pg;
pub mod wire;

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

#[allow(unused_imports)]
pub use child::ProxyProcess;
#[allow(unused_imports)]
pub use fault::Fault;
#[allow(unused_imports)]
pub use leaks::Leaks;
pub use pg::TestPostgres;
use tokio_postgres::{Client, NoTls};

static PG: OnceLock<TestPostgres> = OnceLock::new();

/// `TEST_IO_URING=1`: in-process proxies serve their sockets through io_uring
/// (see [`Proxy::start`]); `.ci/run` runs the suite once more that way.
pub fn io_uring_mode() -> bool {
    std::env::var_os("TEST_IO_URING").is_some_and(|v| v == "1")
}

/// The PostgreSQL server shared by the tests of one binary.
pub fn pg() -> &'static TestPostgres {
    PG.get_or_init(|| TestPostgres::start(&[]))
}

/// Connects with tokio-postgres and drives the connection in the background.
pub async fn connect(conn: &str) -> Client {
    try_connect(conn)
        .await
        .unwrap_or_else(|e| panic!("connect {conn}: {e}"))
}

pub async fn try_connect(conn: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conn, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// pgsluice running inside the test process; stops when dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    /// The proxy's state, to read its pools and budget.
    pub shared: std::sync::Arc<pgsluice::app::Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Proxy {
    /// Starts pgsluice with a TOML configuration (the listen key is ignored; `listen_unix`
    /// is bound with the TCP listener's port).
    pub async fn start(toml: &str) -> Proxy {
        let config = pgsluice::Config::from_toml(toml)
            .unwrap_or_else(|e| panic!("test config: {e}\n{toml}"));
        Self::run(config, None).await
    }

    /// Binds the listeners and serves `config`: on this runtime, or, with
    /// `TEST_IO_URING=1`, as the binary serves `io_uring = 1`: on a thread of its own
    /// with a current-thread runtime and an io_uring ring.
    async fn run(
        config: pgsluice::Config,
        source: Option<pgsluice::reload::ConfigSource>,
    ) -> Proxy {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let stopped = async move {
            let _ = stopped.await;
        };
        #[cfg(feature = "io-uring")]
        if io_uring_mode() {
            let (up_tx, up_rx) = tokio::sync::oneshot::channel();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    pgsluice::uring::start().expect("io_uring (TEST_IO_URING=1)");
                    let (listeners, addr) = Self::listeners(&config).await;
                    let shared = match source {
                        Some(source) => pgsluice::app::Shared::with_source(config, source),
                        None => pgsluice::app::Shared::new(config),
                    };
                    let _ = up_tx.send((addr, shared.clone()));
                    pgsluice::app::serve_on(listeners, shared, stopped).await;
                });
                pgsluice::uring::finish(Duration::from_secs(1));
            });
            let (addr, shared) = up_rx.await.expect("the io_uring proxy thread started");
            return Proxy {
                addr,
                shared,
                stop: Some(stop),
            };
        }
        let (listeners, addr) = Self::listeners(&config).await;
        let shared = match source {
            Some(source) => pgsluice::app::Shared::with_source(config, source),
            None => pgsluice::app::Shared::new(config),
        };
        tokio::spawn(pgsluice::app::serve_on(listeners, shared.clone(), stopped));
        Proxy {
            addr,
            shared,
            stop: Some(stop),
        }
    }

    /// The TCP listener on a free port and, when configured, `listen_unix` with its port.
    async fn listeners(config: &pgsluice::Config) -> (pgsluice::listener::Listeners, SocketAddr) {
        // Bound as pgsluice binds its own (a backlog of 4,096): with tokio's 1,024, a burst
        // of thousands of connections overflows the accept queue and some wait for SYN
        // retransmits, seconds that no proxy could save.
        let listener = pgsluice::listener::bind("127.0.0.1:0", false)
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let unix = pgsluice::listener::bind_unix_for(config, &listener)
            .await
            .unwrap_or_else(|e| panic!("listen_unix: {e}"));
        let listeners = pgsluice::listener::Listeners {
            tcp: listener,
            unix,
            metrics: None,
        };
        (listeners, addr)
    }

    /// Starts pgsluice from a configuration file, which a reload reads again.
    pub async fn start_file(path: &std::path::Path) -> Proxy {
        let source = pgsluice::reload::ConfigSource {
            file: Some(path.to_owned()),
            flags: vec![],
        };
        let config = source.load().unwrap_or_else(|e| panic!("test config: {e}"));
        Self::run(config, Some(source)).await
    }

    /// A tokio-postgres connection string to the proxy.
    pub fn conn(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} password={password} dbname={db}",
            self.addr.port()
        )
    }

    /// Connects as `name` (password `name`-pw) to database `name`.
    pub async fn client(&self, name: &str) -> Client {
        connect(&self.conn(name, &format!("{name}-pw"), name)).await
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Config for one app database `name` on the test server, plus extra top-level keys.
/// Unless `top` sets a budget, a fixed one: the tests of a binary share one PostgreSQL, and
/// an auto budget would split its max_connections between every proxy they start.
pub fn app_config(pg: &TestPostgres, name: &str, top: &str) -> String {
    app_config_at(pg.port, name, top)
}

/// `app_config` with the database at another port on 127.0.0.1 (a `Fault` in front of
/// PostgreSQL, say).
pub fn app_config_at(port: u16, name: &str, top: &str) -> String {
    let budget = if top.contains("budget") {
        ""
    } else {
        "[budget]\nmax_server_connections = 80\n"
    };
    format!(
        "{top}\n{budget}[databases.{name}]\nhost = \"127.0.0.1\"\nport = {port}\n[users.{name}]\npassword = \"{name}-pw\"\n"
    )
}

/// Creates the app role and database and starts a proxy for it.
pub async fn app(name: &str, top: &str) -> Proxy {
    let pg = pg();
    pg.create_app(name).await;
    Proxy::start(&app_config(pg, name, top)).await
}

/// Pool server connections the proxy holds for a role (from pg_stat_activity), not
/// counting budget control connections.
pub async fn server_conns(admin: &Client, role: &str) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND backend_type = 'client backend' \
             AND application_name NOT LIKE 'pgsluice:fleet=%'",
            &[&role],
        )
        .await
        .unwrap()
        .get(0)
}

/// The SQLSTATE of an error, for assertions.
pub fn code(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.code().code().to_owned())
        .unwrap_or_else(|| format!("not a database error: {e}"))
}

pub fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_else(|| e.to_string())
}

/// Polls `f` until it returns true or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The first column of the first row of a simple query, as text.
pub async fn scalar(client: &Client, sql: &str) -> String {
    for m in client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
    {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            return r.get(0).unwrap_or("NULL").to_owned();
        }
    }
    panic!("{sql}: no rows")
}
