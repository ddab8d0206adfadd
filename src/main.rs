//! The `pgsluice` command: parse flags, load the configuration, start logging, serve.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use pgsluice::config::{Config, LogFormat};

/// A PostgreSQL connection pooler that keeps a fleet below max_connections / 2.
///
/// Every flag is also a config key and a PGSLUICE_… environment variable
/// (precedence: flag, then environment, then file).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Configuration file (TOML). Also PGSLUICE_CONFIG.
    #[arg(short, long, env = "PGSLUICE_CONFIG")]
    config: Option<PathBuf>,
    /// Validate this configuration file and exit.
    #[arg(long, value_name = "FILE")]
    check_config: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:6432.
    #[arg(long)]
    listen: Option<String>,
    /// Also listen on a Unix socket in this directory (DIR/.s.PGSQL.PORT, PORT from --listen).
    #[arg(long, value_name = "DIR")]
    listen_unix: Option<String>,
    /// 1: set SO_REUSEPORT, so that several pgsluice processes share the listen port.
    #[arg(long, value_name = "0|1")]
    so_reuseport: Option<String>,
    /// 1: client and server sockets through io_uring (needs worker_threads = 1).
    #[arg(long, value_name = "0|1")]
    io_uring: Option<String>,
    /// This process's number among peered processes (1-16383; 0: no peering), so that a
    /// cancel request reaching another process is sent on to this one.
    #[arg(long, value_name = "ID")]
    peer_id: Option<String>,
    /// Quick mode: the one upstream database, postgres://USER:PASSWORD@HOST:PORT/DBNAME.
    #[arg(long)]
    upstream: Option<String>,
    /// transaction or session.
    #[arg(long)]
    pool_mode: Option<String>,
    /// Server connections per (database, user) pool.
    #[arg(long)]
    pool_size: Option<String>,
    /// Server connections each pool keeps open.
    #[arg(long)]
    min_pool_size: Option<String>,
    /// Client connections accepted at once.
    #[arg(long)]
    max_client_conn: Option<String>,
    /// How long a client waits for a server, e.g. 120s.
    #[arg(long)]
    query_wait_timeout: Option<String>,
    /// Client authentication: scram-sha-256, md5 or trust.
    #[arg(long)]
    auth_type: Option<String>,
    /// Log format: text or json.
    #[arg(long)]
    log_format: Option<String>,
    /// Fleet name: proxies with the same name share the database's budget.
    #[arg(long)]
    fleet: Option<String>,
    /// Share of max_connections the whole fleet may use (default 0.5).
    #[arg(long)]
    budget_fraction: Option<String>,
    /// Connections kept out of the fleet budget (admin tools, migrations).
    #[arg(long)]
    budget_reserve: Option<String>,
    /// How often the budget is re-read from the database, e.g. 30s.
    #[arg(long)]
    budget_refresh_interval: Option<String>,
    /// Fixed budget: server connections this proxy may hold (instead of reading max_connections).
    #[arg(long)]
    budget_max_server_connections: Option<String>,
    /// Serve /metrics, /healthz and /readyz over HTTP on this address, e.g. 127.0.0.1:9127.
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Users allowed on the admin console, comma-separated (quick mode: the upstream user).
    #[arg(long)]
    admin_users: Option<String>,
    /// PEM certificate chain for TLS with clients (client_tls.cert_file).
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<String>,
    /// PEM private key for TLS with clients (client_tls.key_file).
    #[arg(long, value_name = "FILE")]
    tls_key: Option<String>,
    /// TLS with clients: disable, allow or require (client_tls.mode).
    #[arg(long, value_name = "MODE")]
    client_tls_mode: Option<String>,
    /// TLS to PostgreSQL: disable, prefer, require, verify-ca or verify-full (server_tls.mode).
    #[arg(long, value_name = "MODE")]
    server_tls_mode: Option<String>,
    /// PEM file of CA certificates the server's certificate must chain to (server_tls.ca_file).
    #[arg(long, value_name = "FILE")]
    server_tls_ca: Option<String>,
}

impl Cli {
    fn flags(&self) -> Vec<(&'static str, String)> {
        let pairs = [
            ("listen", &self.listen),
            ("listen_unix", &self.listen_unix),
            ("so_reuseport", &self.so_reuseport),
            ("io_uring", &self.io_uring),
            ("peer_id", &self.peer_id),
            ("upstream", &self.upstream),
            ("pool_mode", &self.pool_mode),
            ("pool_size", &self.pool_size),
            ("min_pool_size", &self.min_pool_size),
            ("max_client_conn", &self.max_client_conn),
            ("query_wait_timeout", &self.query_wait_timeout),
            ("auth_type", &self.auth_type),
            ("log_format", &self.log_format),
            ("fleet.name", &self.fleet),
            ("budget.fraction", &self.budget_fraction),
            ("budget.reserve", &self.budget_reserve),
            ("budget.refresh_interval", &self.budget_refresh_interval),
            (
                "budget.max_server_connections",
                &self.budget_max_server_connections,
            ),
            ("metrics.listen", &self.metrics_listen),
            ("admin_users", &self.admin_users),
            ("client_tls.cert_file", &self.tls_cert),
            ("client_tls.key_file", &self.tls_key),
            ("client_tls.mode", &self.client_tls_mode),
            ("server_tls.mode", &self.server_tls_mode),
            ("server_tls.ca_file", &self.server_tls_ca),
        ];
        pairs
            .into_iter()
            .filter_map(|(k, v)| v.clone().map(|v| (k, v)))
            .collect()
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGSLUICE_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
        LogFormat::Text => builder.init(),
    }
}

/// Commands besides running the proxy (which needs none).
#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Start a throwaway PostgreSQL and pgsluice, and watch many app workers share a few
    /// connections: first holding them during a slow API call, then releasing them.
    Demo(pgsluice::demo::DemoArgs),
    /// Print the live connection budget of a database; with --plan, check a fleet's plan.
    Budget(pgsluice::budget::report::BudgetArgs),
    /// Print the SCRAM-SHA-256 verifier of a password read from standard input (for
    /// auth_file or [users], and for ALTER ROLE … PASSWORD on the server: docs/authentication.md).
    Verifier,
    /// Exit 0 when the proxy's HTTP endpoint answers 200 (for container health checks).
    Health {
        /// The URL to check.
        #[arg(long, default_value = "http://127.0.0.1:9127/readyz")]
        url: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Budget(args)) = &cli.command {
        if !cli.flags().is_empty() || cli.check_config.is_some() {
            eprintln!("pgsluice budget: put the command's options after `budget` (see pgsluice budget --help)");
            return ExitCode::from(2);
        }
        return pgsluice::budget::report::run(args);
    }
    if let Some(Command::Demo(args)) = &cli.command {
        if !cli.flags().is_empty() || cli.check_config.is_some() || cli.config.is_some() {
            eprintln!("pgsluice demo: it takes no configuration; put its options after `demo` (see pgsluice demo --help)");
            return ExitCode::from(2);
        }
        return pgsluice::demo::run(args);
    }
    if let Some(Command::Verifier) = &cli.command {
        return verifier();
    }
    if let Some(Command::Health { url }) = &cli.command {
        return match health(url) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("pgsluice health: {url}: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(path) = &cli.check_config {
        return match Config::load(Some(path), &[]) {
            Ok(c) => {
                println!(
                    "{}: ok ({} databases, {} users)",
                    path.display(),
                    c.databases.len(),
                    c.users.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", path.display());
                ExitCode::from(2)
            }
        };
    }
    let config = match Config::load(cli.config.as_deref(), &cli.flags()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pgsluice: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(config.log_format);
    let runtime = match config.worker_threads {
        // One thread: no work stealing and no cross-thread wake-ups.
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        0 => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pgsluice: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let source = pgsluice::reload::ConfigSource {
        file: cli.config.clone(),
        flags: cli
            .flags()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
    };
    let served = runtime.block_on(serve(config, source));
    // What the last clients were sent (a shutdown's ErrorResponse) may still be queued.
    #[cfg(feature = "io-uring")]
    pgsluice::uring::finish(std::time::Duration::from_secs(1));
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config, source: pgsluice::reload::ConfigSource) -> anyhow::Result<()> {
    #[cfg(feature = "io-uring")]
    if config.io_uring == 1 {
        // Refused by old kernels and by seccomp filters (Docker's default profile among
        // them): say so and serve over epoll rather than not at all.
        match pgsluice::uring::start() {
            Ok(()) => tracing::info!("client and server sockets go through io_uring"),
            Err(e) => tracing::warn!(error = %e, "io_uring is not available: using epoll"),
        }
    }
    let listener = pgsluice::listener::bind(&config.listen, config.so_reuseport == 1)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    // Bound here, once: a failure stops the start (exit 1) instead of leaving a proxy
    // without its endpoint.
    let metrics = match &config.metrics.listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on metrics.listen {addr}"))?,
        ),
        None => None,
    };
    let unix = pgsluice::listener::bind_unix_for(&config, &listener)
        .await
        .with_context(|| format!("cannot listen on listen_unix {}", config.listen_unix))?;
    match &unix {
        Some(u) => {
            tracing::info!(listen = %listener.local_addr()?, listen_unix = %u.path().display(), databases = config.databases.len(), "pgsluice is ready")
        }
        None => {
            tracing::info!(listen = %listener.local_addr()?, databases = config.databases.len(), "pgsluice is ready")
        }
    }
    let shared = pgsluice::app::Shared::with_source(config, source);
    // SIGHUP reloads the configuration.
    let on_hup = shared.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the configuration");
            let _ = pgsluice::reload::reload(&on_hup);
        }
    });
    let listeners = pgsluice::listener::Listeners {
        tcp: listener,
        unix,
        metrics,
    };
    pgsluice::app::serve_on(listeners, shared, shutdown_signal()).await;
    Ok(())
}

/// Completes at the first SIGTERM or SIGINT: pgsluice drains. A second one exits at once.
async fn shutdown_signal() {
    signal().await;
    tracing::info!("draining: a second SIGTERM or SIGINT exits at once");
    tokio::spawn(async {
        signal().await;
        tracing::warn!("second signal: exiting without waiting");
        std::process::exit(1);
    });
}

async fn signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Reads a password from stdin (one trailing newline dropped) and prints its verifier.
fn verifier() -> ExitCode {
    use std::io::Read;
    let mut text = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut text) {
        eprintln!("pgsluice verifier: cannot read the password from standard input: {e}");
        return ExitCode::from(2);
    }
    let password = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(&text);
    if password.is_empty() {
        eprintln!("pgsluice verifier: give the password on standard input, e.g. printf '%s' \"$PW\" | pgsluice verifier");
        return ExitCode::from(2);
    }
    println!(
        "{}",
        postgres_protocol::password::scram_sha_256(password.as_bytes())
    );
    ExitCode::SUCCESS
}

/// A GET over plain HTTP/1.0 with a short timeout; Ok when the status is 200. Enough for a
/// health check in an image that has no curl.
fn health(url: &str) -> Result<(), String> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    use std::time::Duration;
    let rest = url.strip_prefix("http://").ok_or("only http:// URLs")?;
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let addr = host
        .to_socket_addrs()
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("no address")?;
    let timeout = Duration::from_secs(3);
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    // The status line may come in pieces (a server writing it in several sends): read until
    // its end, the connection's end, or 64 bytes.
    let mut head = [0u8; 64];
    let mut n = 0;
    while n < head.len() && !head[..n].contains(&b'\n') {
        match s.read(&mut head[n..]).map_err(|e| e.to_string())? {
            0 => break,
            got => n += got,
        }
    }
    let status = String::from_utf8_lossy(&head[..n]);
    match status.split_whitespace().nth(1) {
        Some("200") => Ok(()),
        Some(code) => Err(format!("status {code}")),
        None => Err("no HTTP status".into()),
    }
}

/// jemalloc, not the system's malloc: a task's memory (a client's, 1.1 KiB, aligned to 128
/// bytes) comes from its thread's cache instead of glibc's `memalign`, and a client that parks
/// gives it back for the next one. With glibc, a storm of short connections ran 16 % more
/// instructions per connection and an idle client took 0.2 KiB more (docs/performance.md).
/// `cargo build --no-default-features` builds with the system's.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
