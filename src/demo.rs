//! `pgsluice demo`: shows a newcomer the product working on their own machine.
//!
//! It starts a throwaway PostgreSQL with a small `max_connections` ([`postgres`]), starts
//! pgsluice in this process in front of it (budget: half of `max_connections`), and replays
//! the Rails/Sidekiq story ([`load`]): many more workers than the budget allows, first
//! holding a connection during a slow API call inside a transaction, then the fixed version
//! that releases it first. The terminal shows pgsluice's own figures live ([`screen`]); the
//! end shows a summary and where to look next. PostgreSQL is stopped and its directory
//! removed on every way out: the end, an error, Ctrl-C or SIGTERM (and, through a watchdog,
//! a kill).

pub mod postgres;

mod load;
mod screen;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::app::Shared;
use crate::config::parse_duration;
use load::{Counts, Phase, Workers};
use screen::{PhaseFigures, Reading};

/// `max_connections` of the throwaway PostgreSQL: a budget of 10 at the default fraction.
const MAX_CONNECTIONS: u32 = 20;
/// Rows in the products table: more than any run gets through.
const PRODUCTS: u32 = 200_000;
/// The demo's database and user.
const APP: &str = "shop";

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// How long the load runs, in seconds: the first half holds connections during the API
    /// call, the second half releases them. Setting up and cleaning up take a few seconds more.
    #[arg(long, value_name = "SECONDS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(4..=3600))]
    pub duration: u64,
    /// Worker threads of the app, each with its own connection to pgsluice.
    #[arg(long, value_name = "N", default_value_t = 40,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub workers: u32,
    /// How long each "API call" takes (e.g. 2s, 500ms).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_positive_duration)]
    pub api_call: Duration,
    /// How long a worker's statement waits for a connection before it fails with 53300
    /// (pgsluice's query_wait_timeout; ActiveRecord's checkout_timeout is 5 s).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_positive_duration)]
    pub checkout_timeout: Duration,
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err("must be longer than 0".into()),
        d if d > Duration::from_secs(3600) => Err("must be at most 1 hour".into()),
        d => Ok(d),
    }
}

/// Why the demo stopped early.
#[derive(Debug, Clone, Copy)]
enum Interrupt {
    Int,
    Term,
}

impl Interrupt {
    /// 128 + the signal's number, as shells report a process a signal ended.
    fn status(self) -> u8 {
        match self {
            Interrupt::Int => 130,
            Interrupt::Term => 143,
        }
    }
}

/// Runs the demo; the exit status is 0 when it ran to the end.
pub fn run(args: &DemoArgs) -> ExitCode {
    let bin = match postgres::find_binaries() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("pgsluice demo needs PostgreSQL's server programs: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pgsluice demo: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let stop = CancellationToken::new();
        let why = Arc::new(std::sync::Mutex::new(None));
        watch_signals(stop.clone(), why.clone());
        let result = demo(args, bin, stop).await;
        let why = *why.lock().unwrap_or_else(|p| p.into_inner());
        match (result, why) {
            (Err(e), _) => {
                eprintln!("pgsluice demo: {e}");
                ExitCode::FAILURE
            }
            (Ok(()), Some(signal)) => ExitCode::from(signal.status()),
            (Ok(()), None) => ExitCode::SUCCESS,
        }
    })
}

/// Ctrl-C or SIGTERM stops the demo in order; a second one exits at once (the watchdog
/// then stops PostgreSQL and removes its directory).
fn watch_signals(stop: CancellationToken, why: Arc<std::sync::Mutex<Option<Interrupt>>>) {
    use tokio::signal::unix::{signal, SignalKind};
    // Registered now, before any slow step, so that a signal never kills the process
    // with PostgreSQL left running.
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return;
    };
    tokio::spawn(async move {
        let first = tokio::select! {
            _ = int.recv() => Interrupt::Int,
            _ = term.recv() => Interrupt::Term,
        };
        *why.lock().unwrap_or_else(|p| p.into_inner()) = Some(first);
        println!("\nInterrupted: stopping the load and cleaning up (again to quit at once)");
        stop.cancel();
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        eprintln!("pgsluice demo: quitting at once; PostgreSQL is stopped in the background");
        std::process::exit(first.status().into());
    });
}

fn random_password() -> String {
    use rand::RngExt;
    let mut rng = rand::rng();
    (0..20)
        .map(|_| {
            let i = rng.random_range(0..36u8);
            (if i < 10 { b'0' + i } else { b'a' + i - 10 }) as char
        })
        .collect()
}

async fn demo(
    args: &DemoArgs,
    bin: std::path::PathBuf,
    stop: CancellationToken,
) -> Result<(), String> {
    println!("pgsluice demo: many app workers, few database connections, and a slow API call.");
    println!(
        "Starting a throwaway PostgreSQL (max_connections = {MAX_CONNECTIONS}) from {} ...",
        bin.display()
    );
    let superuser_password = random_password();
    let opts = postgres::Options {
        prefix: "pgsluice-demo-".into(),
        superuser_password: superuser_password.clone(),
        conf: vec![
            format!("max_connections = {MAX_CONNECTIONS}"),
            "unix_socket_directories = ''".into(),
        ],
    };
    let pg = tokio::task::spawn_blocking(move || postgres::Throwaway::start(&bin, &opts))
        .await
        .map_err(|e| format!("starting PostgreSQL: {e}"))??;
    println!(
        "PostgreSQL: {} on 127.0.0.1:{}, data in {}",
        pg.version.trim_start_matches("pg_ctl (PostgreSQL) "),
        pg.port,
        pg.dir.display()
    );
    let result = if stop.is_cancelled() {
        Ok(None)
    } else {
        with_postgres(args, &pg, &superuser_password, &stop).await
    };
    let dir = pg.dir.clone();
    let cleaned = tokio::task::spawn_blocking(move || pg.remove())
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
    match &cleaned {
        Ok(()) => println!("Cleaned up: PostgreSQL stopped, {} removed.", dir.display()),
        Err(e) => eprintln!("pgsluice demo: cleaning up: {e}"),
    }
    let report = result?;
    if let Some(report) = report {
        print!("{report}");
    }
    cleaned
}

/// Sets the database up, runs pgsluice and the load; returns the closing text (printed
/// after the cleanup line, so it is the last thing on screen).
async fn with_postgres(
    args: &DemoArgs,
    pg: &postgres::Throwaway,
    superuser_password: &str,
    stop: &CancellationToken,
) -> Result<Option<String>, String> {
    let app_password = random_password();
    setup_database(pg, superuser_password, &app_password).await?;
    let toml = format!(
        "pool_size = 20\n\
         query_wait_timeout = \"{}ms\"\n\
         query_wait_notify = \"0\"\n\
         shutdown_timeout = \"2s\"\n\
         admin_users = [\"{APP}\"]\n\
         [budget]\nfraction = 0.5\n\
         [databases.{APP}]\nhost = \"127.0.0.1\"\nport = {}\n\
         [users.{APP}]\npassword = \"{app_password}\"\n",
        args.checkout_timeout.as_millis(),
        pg.port
    );
    let config = crate::Config::from_toml(&toml).map_err(|e| format!("demo configuration: {e}"))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("cannot listen on 127.0.0.1: {e}"))?;
    let metrics_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("cannot listen on 127.0.0.1: {e}"))?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let metrics_port = metrics_listener
        .local_addr()
        .map_err(|e| e.to_string())?
        .port();
    let shared = Shared::new(config);
    shared.spawn(crate::http::serve(metrics_listener, shared.clone()));
    let proxy_stop = CancellationToken::new();
    let proxy = {
        let (shared, proxy_stop) = (shared.clone(), proxy_stop.clone());
        tokio::spawn(async move {
            crate::app::serve(listener, shared, proxy_stop.cancelled_owned()).await
        })
    };
    let result = async {
        wait_for_budget(&shared, stop).await?;
        if stop.is_cancelled() {
            return Ok(None);
        }
        let r = Reading::take(&shared);
        println!(
            "pgsluice: 127.0.0.1:{port}, budget {} = max_connections {} x 0.5 (its control connection takes 1, the pool gets {})",
            r.budget,
            r.max_connections,
            r.budget.saturating_sub(1)
        );
        println!("  while it runs: curl -s 127.0.0.1:{metrics_port}/metrics | grep idle_in_transaction");
        println!(
            "                 PGPASSWORD={app_password} psql -h 127.0.0.1 -p {port} -U {APP} pgbouncer -c 'SHOW POOLS'"
        );
        let conn = format!(
            "host=127.0.0.1 port={port} user={APP} password={app_password} dbname={APP} application_name=demo-worker"
        );
        // One login first: it opens the pool's first server, whose settings every later
        // login is shown, so the workers' logins need no server.
        drop(Workers::connect(1, &conn).await?);
        run_load(args, &shared, &conn, stop).await.map(Some)
    }
    .await;
    proxy_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), proxy).await;
    result
}

async fn setup_database(
    pg: &postgres::Throwaway,
    superuser_password: &str,
    app_password: &str,
) -> Result<(), String> {
    let connect = |user: &str, password: &str, db: &str| {
        format!(
            "host=127.0.0.1 port={} user={user} password={password} dbname={db}",
            pg.port
        )
    };
    let admin = connect_direct(&connect("postgres", superuser_password, "postgres")).await?;
    for sql in [
        format!("CREATE ROLE {APP} LOGIN PASSWORD '{app_password}'"),
        format!("CREATE DATABASE {APP} OWNER {APP}"),
    ] {
        admin
            .batch_execute(&sql)
            .await
            .map_err(|e| format!("creating the demo database: {}", pg_error(&e)))?;
    }
    let app = connect_direct(&connect(APP, app_password, APP)).await?;
    app.batch_execute(&load::schema_sql(PRODUCTS))
        .await
        .map_err(|e| format!("creating the demo table: {}", pg_error(&e)))?;
    Ok(())
}

/// An error with the server's message, when it sent one.
fn pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{} ({})", d.message(), d.code().code()),
        None => e.to_string(),
    }
}

async fn connect_direct(conn: &str) -> Result<tokio_postgres::Client, String> {
    let (client, connection) = tokio_postgres::connect(conn, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("connecting to the throwaway PostgreSQL: {}", pg_error(&e)))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Waits until pgsluice has read the budget from the database (its first reading).
async fn wait_for_budget(shared: &Shared, stop: &CancellationToken) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let snapshots = shared.pools.budget_snapshots();
        if snapshots.iter().all(|(_, s)| s.limit > 0) {
            return Ok(());
        }
        if Instant::now() > deadline {
            let why = snapshots
                .iter()
                .find_map(|(_, s)| s.last_error.clone())
                .unwrap_or_else(|| "no reading yet".into());
            return Err(format!("pgsluice could not read its budget: {why}"));
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// Where the screen is going: a terminal gets a block redrawn in place, anything else
/// (a pipe, a log) plain lines.
struct Screen {
    tty: bool,
    drawn: usize,
    last_line: Option<Instant>,
}

impl Screen {
    /// How often a terminal is redrawn.
    const REDRAW: Duration = Duration::from_millis(250);
    /// How often a plain line is written.
    const PLAIN: Duration = Duration::from_secs(2);

    fn tick(&self) -> Duration {
        if self.tty {
            Self::REDRAW
        } else {
            Duration::from_millis(500)
        }
    }

    fn draw(&mut self, block: &[String], plain: &str, force_plain: bool) {
        let mut out = std::io::stdout().lock();
        if self.tty {
            if self.drawn > 0 {
                // Up to the block's first line, and clear to the end of the screen.
                let _ = write!(out, "\x1b[{}A\x1b[J", self.drawn);
            }
            for line in block {
                let _ = writeln!(out, "{line}");
            }
            self.drawn = block.len();
        } else if force_plain || self.last_line.is_none_or(|t| t.elapsed() >= Self::PLAIN) {
            let _ = writeln!(out, "{plain}");
            self.last_line = Some(Instant::now());
        }
        let _ = out.flush();
    }

    /// Leaves the current block on screen; the next draw starts below it.
    fn keep(&mut self) {
        self.drawn = 0;
        self.last_line = None;
    }
}

const TITLES: [&str; 2] = [
    "Phase 1 of 2: workers hold their connection during the API call (inside BEGIN ... COMMIT)",
    "Phase 2 of 2: the fix deployed - workers release the connection before the API call",
];

/// Runs both phases and returns the summary.
async fn run_load(
    args: &DemoArgs,
    shared: &Arc<Shared>,
    conn: &str,
    stop: &CancellationToken,
) -> Result<String, String> {
    let total = Duration::from_secs(args.duration);
    let lengths = [total / 2, total - total / 2];
    let mut screen = Screen {
        tty: std::io::stdout().is_terminal(),
        drawn: 0,
        last_line: None,
    };
    println!(
        "\n{} workers, each job: claim a product, call an API for {:.1} s, write its specs.",
        args.workers,
        args.api_call.as_secs_f64()
    );
    let mut figures: Vec<PhaseFigures> = Vec::new();
    for (i, phase) in [Phase::Holding, Phase::Releasing].into_iter().enumerate() {
        if stop.is_cancelled() {
            break;
        }
        println!("\n{}", TITLES[i]);
        let clients = tokio::select! {
            c = Workers::connect(args.workers, conn) => c?,
            _ = stop.cancelled() => break,
        };
        let counts = Arc::new(Counts::default());
        let start = Reading::take(shared);
        let began = Instant::now();
        let workers = Workers::start(clients, conn, phase, args.api_call, counts.clone());
        let mut f = PhaseFigures::default();
        let mut tick = tokio::time::interval(screen.tick());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let deadline = tokio::time::Instant::now() + lengths[i];
        loop {
            let last = tokio::select! {
                _ = tick.tick() => false,
                _ = tokio::time::sleep_until(deadline) => true,
                _ = stop.cancelled() => true,
            };
            let r = Reading::take(shared);
            let elapsed = began.elapsed().min(lengths[i]);
            let mut now = PhaseFigures::between(&start, &r, elapsed.as_secs_f64());
            f.track_peaks(&r);
            now.longest_wait = f.longest_wait;
            let products = counts.products.load(Ordering::Relaxed);
            let block = screen::live_block(
                TITLES[i].split(':').next().unwrap_or(""),
                elapsed,
                lengths[i],
                &r,
                &now,
                products,
            );
            let plain = screen::plain_line(i + 1, elapsed, &r, &now, products);
            screen.draw(&block, &plain, last);
            if last {
                break;
            }
        }
        // As a deploy stops the old processes: jobs in flight are abandoned (pgsluice rolls
        // their transactions back), queued ones leave the queue.
        workers.stop().await;
        let end = Reading::take(shared);
        let peaks = f;
        let mut f =
            PhaseFigures::between(&start, &end, began.elapsed().min(lengths[i]).as_secs_f64());
        f.longest_wait = peaks.longest_wait;
        f.peak_in_use = peaks.peak_in_use;
        f.peak_waiting = peaks.peak_waiting;
        f.products = counts.products.load(Ordering::Relaxed);
        f.errors = counts.errors.load(Ordering::Relaxed);
        f.last_error = counts.last_error();
        figures.push(f);
        screen.keep();
        // Let the abandoned sessions' servers come back before the next phase.
        let settle = Instant::now();
        while Reading::take(shared).clients_active > 0 && settle.elapsed() < Duration::from_secs(5)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(summary(args, shared, &figures, stop.is_cancelled()))
}

fn summary(
    args: &DemoArgs,
    shared: &Shared,
    figures: &[PhaseFigures],
    interrupted: bool,
) -> String {
    use std::fmt::Write as _;
    let r = Reading::take(shared);
    let pool_servers = r.budget.saturating_sub(1);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\nSummary{}",
        if interrupted { " (interrupted)" } else { "" }
    );
    let titles = [
        format!(
            "Phase 1, holding the connection during the {:.1} s API call",
            args.api_call.as_secs_f64()
        ),
        "Phase 2, releasing it before the API call".to_owned(),
    ];
    for (f, title) in figures.iter().zip(&titles) {
        s.push_str(&screen::phase_summary(title, f, pool_servers));
    }
    if let [one, two] = figures {
        if one.per_minute() > 0.0 {
            let _ = writeln!(
                s,
                "  Same {} workers, same {pool_servers} server connections: {:.1}x the products per minute once the API call left the transaction.",
                args.workers,
                two.per_minute() / one.per_minute()
            );
        }
    }
    let peak = figures.iter().map(|f| f.peak_in_use).max().unwrap_or(0);
    let _ = writeln!(
        s,
        "  PostgreSQL never had more than {peak} connections from pgsluice: its budget is {} of max_connections {} (half), so a deploy's second set of tasks still fits.",
        r.budget, r.max_connections
    );
    s.push_str(
        "\nWhere to look next\n\
         \x20 Run it for real      pgsluice --upstream postgres://USER:PASSWORD@HOST:5432/DB --metrics-listen 127.0.0.1:9127\n\
         \x20 Metrics              curl 127.0.0.1:9127/metrics; the hoarding metric is\n\
         \x20                      pgsluice_application_idle_in_transaction_seconds_total (docs/metrics.md, docs/alerts/)\n\
         \x20 The budget           pgsluice budget --upstream postgres://...; plan a fleet with --plan (docs/budget.md)\n\
         \x20 Configuration        docs/configuration.md; config/pgsluice.toml has every key with its default\n\
         \x20 Admin console        psql ... pgbouncer -c 'SHOW POOLS' (docs/admin-console.md)\n\
         \x20 Operations           docs/operations.md (reload, drain, failover); docs/deploy/ (Docker, ECS sidecar)\n",
    );
    s
}
