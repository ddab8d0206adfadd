//! Lifecycle under load (catalogue §3 E): SIGHUP while clients work, SIGTERM with clients in
//! every state, kill -9 and a restart. pgsluice runs as the real binary (a child process).
//!
//! Covered elsewhere: a reload that does not load keeps the old configuration (44,
//! tests/reload.rs `a_bad_reload_keeps_the_old_configuration`); SIGTERM lets transactions
//! finish, closes idle clients with 57P01, cuts a stuck one at shutdown_timeout, session
//! mode (45, tests/shutdown.rs); TLS certificates re-read on reload (43,
//! tests/tls.rs `certificates_reload_without_dropping_clients`).

mod common;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::child::Options;
use common::*;

fn config(name: &str, pool_size: u32, port: u16) -> String {
    format!(
        "auth_type = \"trust\"\npool_size = {pool_size}\nshutdown_timeout = \"10s\"\n[budget]\nmax_server_connections = 20\n[databases.{name}]\nhost = \"127.0.0.1\"\nport = {port}\n[users.{name}]\npassword = \"{name}-pw\"\n"
    )
}

/// Writes the child's configuration file (keeping the listen and metrics lines it was
/// started with) and sends SIGHUP.
fn rewrite_and_hup(proxy: &ProxyProcess, body: &str) {
    let path = proxy.config_path();
    let old = std::fs::read_to_string(&path).unwrap();
    let listen = old.lines().next().unwrap().to_owned();
    let metrics: String = old
        .split_once("[metrics]")
        .map(|(_, m)| format!("[metrics]{m}"))
        .unwrap();
    std::fs::write(&path, format!("{listen}\n{body}\n{metrics}")).unwrap();
    proxy.signal("HUP");
}

/// Backend pids of the role, as a sorted list.
async fn backends(admin: &tokio_postgres::Client, role: &str) -> Vec<i32> {
    let mut pids: Vec<i32> = admin
        .query(
            "SELECT pid FROM pg_stat_activity WHERE usename = $1 AND backend_type = 'client backend'",
            &[&role],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    pids.sort();
    pids
}

/// Clients in a loop of short transactions until `stop`; counts successes and errors.
fn workload(
    conn: String,
    clients: usize,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..clients)
        .map(|i| {
            let (conn, stop, done, failed) =
                (conn.clone(), stop.clone(), done.clone(), failed.clone());
            tokio::spawn(async move {
                let c = connect(&conn).await;
                for _ in 0..1_000_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let sql = format!("BEGIN; SELECT {i}, pg_sleep(0.005); COMMIT");
                    match c.batch_execute(&sql).await {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            eprintln!("{e}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect()
}

/// Scenario 43: 50 clients in continuous transactions. Ten SIGHUPs with nothing changed:
/// no error, no disconnect, no server recycled. Then one that halves the pool: it shrinks
/// as servers are released, still with no error. Then one that changes the upstream's
/// port: refused (it needs a restart), counted, and everything goes on as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_under_load() {
    let name = "lc_sighup";
    let pg = pg();
    pg.create_app(name).await;
    let proxy = ProxyProcess::start(&config(name, 10, pg.port)).await;
    let leaks = Leaks::new(&proxy, name).await;
    let admin = pg.admin().await;
    let (stop, done, failed) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let workers = workload(
        proxy.conn(name, "x", name),
        50,
        stop.clone(),
        done.clone(),
        failed.clone(),
    );
    assert!(
        eventually(Duration::from_secs(20), || async {
            backends(&admin, name).await.len() == 10
        })
        .await,
        "the pool fills up"
    );
    let before = backends(&admin, name).await;
    for _ in 0..10 {
        rewrite_and_hup(&proxy, &config(name, 10, pg.port));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        backends(&admin, name).await,
        before,
        "servers were recycled"
    );
    rewrite_and_hup(&proxy, &config(name, 5, pg.port));
    let mut most = 0;
    let shrunk = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n = backends(&admin, name).await.len();
            most = most.max(n);
            if n <= 5 {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert!(shrunk, "the pool shrank to 5");
    assert!(most <= 10, "{most} servers during the resize");
    let refused = |m: &common::leaks::Metrics| m.sum("pgsluice_config_reload_errors_total", &[]);
    let errors_before = refused(&common::leaks::metrics(&proxy).await);
    rewrite_and_hup(&proxy, &config(name, 5, pg.port + 1));
    assert!(
        eventually(Duration::from_secs(5), || async {
            refused(&common::leaks::metrics(&proxy).await) == errors_before + 1.0
        })
        .await,
        "the port change is refused and counted"
    );
    let at = done.load(Ordering::Relaxed);
    assert!(
        eventually(Duration::from_secs(5), || async {
            done.load(Ordering::Relaxed) > at + 50
        })
        .await,
        "work goes on after the refused reload"
    );
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "client-visible errors");
    assert!(done.load(Ordering::Relaxed) > 100);
    leaks.check().await;
}

/// Scenario 45 (what tests/shutdown.rs does not cover): SIGTERM with clients inside
/// transactions, idle, and queued. The open transactions commit; queued and idle clients
/// get 57P01; servers are closed politely (no "unexpected EOF" in PostgreSQL's log); the
/// process exits 0; every acknowledged COMMIT is there. A second SIGTERM exits at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_clients_in_every_state() {
    let name = "lc_sigterm";
    let pg = TestPostgres::start(&["log_min_messages = info"]);
    pg.create_app(name).await;
    let mut proxy = ProxyProcess::start(&config(name, 5, pg.port)).await;
    let conn = proxy.conn(name, "x", name);
    let setup = connect(&conn).await;
    setup.batch_execute("CREATE TABLE t (v int)").await.unwrap();
    drop(setup);
    // Five inside transactions: the pool is full.
    let mut in_txn = Vec::new();
    for i in 0..5 {
        let c = connect(&conn).await;
        c.batch_execute(&format!("BEGIN; INSERT INTO t VALUES ({i})"))
            .await
            .unwrap();
        in_txn.push(c);
    }
    let idle = connect(&conn).await;
    // Five queued behind them.
    let mut queued = Vec::new();
    for _ in 0..5 {
        let c = connect(&conn).await;
        queued.push(tokio::spawn(async move {
            c.simple_query("SELECT 1").await.map(|_| ())
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Transactions go on and commit.
    for (i, c) in in_txn.iter().enumerate() {
        c.batch_execute(&format!("INSERT INTO t VALUES ({})", 10 + i))
            .await
            .unwrap();
        c.batch_execute("COMMIT").await.unwrap();
    }
    for q in queued {
        let r = tokio::time::timeout(Duration::from_secs(10), q)
            .await
            .unwrap()
            .unwrap();
        let e = r.expect_err("a queued client is sent away");
        assert!(
            e.as_db_error().is_none_or(|d| d.code().code() == "57P01"),
            "{e}"
        );
    }
    let e = idle.simple_query("SELECT 1").await.unwrap_err();
    assert!(
        e.as_db_error().is_none_or(|d| d.code().code() == "57P01"),
        "{e}"
    );
    drop(in_txn);
    assert_eq!(proxy.exit(Duration::from_secs(10)).await, Some(0));
    let direct = connect(&pg.url(name, &format!("{name}-pw"), name)).await;
    assert_eq!(scalar(&direct, "SELECT count(*) FROM t").await, "10");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !pg.log().contains("unexpected EOF"),
        "servers were not closed politely:\n{}",
        pg.log()
    );
    // A second signal exits at once, even with a transaction open.
    let mut proxy = ProxyProcess::start(&config(name, 5, pg.port)).await;
    let c = connect(&proxy.conn(name, "x", name)).await;
    c.batch_execute("BEGIN").await.unwrap();
    proxy.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(proxy.running(), "draining while the transaction is open");
    let t = Instant::now();
    proxy.signal("TERM");
    proxy.exit(Duration::from_secs(3)).await;
    assert!(t.elapsed() < Duration::from_secs(3));
}

/// Scenario 46: kill -9 under load, then a restart on the same address. Clients see their
/// connection end and nothing else; PostgreSQL is left with no session of the proxy idle in
/// a transaction (it sees the sockets close); the new process listens and serves at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_only_restart() {
    let name = "lc_kill9";
    let pg = pg();
    pg.create_app(name).await;
    let proxy = ProxyProcess::start(&config(name, 10, pg.port)).await;
    let port = proxy.port;
    let admin = pg.admin().await;
    let conn = proxy.conn(name, "x", name);
    // Fifty clients, ten of them inside transactions when the proxy dies.
    let mut clients = Vec::new();
    for i in 0..50 {
        let c = connect(&conn).await;
        if i < 10 {
            c.batch_execute("BEGIN; SELECT 1").await.unwrap();
        }
        clients.push(c);
    }
    let in_txn = || async {
        admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND state LIKE 'idle in transaction%'",
                &[&name],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    assert_eq!(in_txn().await, 10);
    proxy.signal("KILL");
    let killed = Instant::now();
    for c in &clients {
        let e = c.simple_query("SELECT 1").await.unwrap_err();
        assert!(e.as_db_error().is_none(), "only a closed connection: {e}");
    }
    assert!(
        eventually(Duration::from_secs(1), || async { in_txn().await == 0 }).await,
        "sessions idle in transaction {:?} after the kill",
        killed.elapsed()
    );
    drop(clients);
    drop(proxy);
    let started = Instant::now();
    let proxy = ProxyProcess::start_with(
        &config(name, 10, pg.port),
        Options {
            port: Some(port),
            ..Default::default()
        },
    )
    .await;
    let up = started.elapsed();
    let leaks = Leaks::new(&proxy, name).await;
    let c = connect(&proxy.conn(name, "x", name)).await;
    assert_eq!(scalar(&c, "SELECT 1").await, "1");
    assert!(
        common::leaks::metrics(&proxy)
            .await
            .sum("pgsluice_build_info", &[])
            == 1.0
    );
    eprintln!("restarted and listening in {up:?}");
    assert!(
        up < Duration::from_secs(5),
        "listening {up:?} after the restart"
    );
    drop(c);
    leaks.check().await;
}

/// Catalogue F: passwords, SCRAM proofs and keys never reach the log, at any level, for
/// right and wrong logins, with the upstream password in the configuration.
#[tokio::test]
async fn secrets_stay_out_of_the_log() {
    let name = "lc_secrets";
    let pg = pg();
    pg.create_app(name).await;
    let client_pw = "client-S3cret-x81";
    let proxy = ProxyProcess::start_with(
        &format!(
            "pool_size = 2\n[budget]\nmax_server_connections = 5\n[databases.{name}]\nhost = \"127.0.0.1\"\nport = {}\npassword = \"{name}-pw\"\n[users.{name}]\npassword = \"{client_pw}\"\n",
            pg.port
        ),
        Options {
            env: &[("PGSLUICE_LOG", "trace")],
            ..Default::default()
        },
    )
    .await;
    let c = connect(&proxy.conn(name, client_pw, name)).await;
    assert_eq!(scalar(&c, "SELECT 1").await, "1");
    drop(c);
    let e = try_connect(&proxy.conn(name, "wrong-Pw-7731", name)).await;
    assert!(e.is_err());
    let log = proxy.log();
    assert!(log.len() > 1000, "trace logging is on");
    for secret in [
        client_pw,
        "wrong-Pw-7731",
        &format!("{name}-pw"),
        "c=biws",
        "p=",
    ] {
        assert!(!log.contains(secret), "{secret:?} is in the log");
    }
}

/// Starts a process on `port` (with `so_reuseport`, another may hold it too) and waits
/// until it listens.
async fn start_sharing(toml: &str, port: u16) -> ProxyProcess {
    let mut p = ProxyProcess::start_with(
        toml,
        Options {
            port: Some(port),
            ..Default::default()
        },
    )
    .await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            p.log().contains("pgsluice is ready")
        })
        .await,
        "the process did not listen:\n{}",
        p.log()
    );
    assert!(p.running());
    p
}

/// `so_reuseport = 1`: a second process listens on the same port, and the kernel gives each
/// process some of the clients, which it serves whole. Without the option the port is
/// taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_one_port_with_so_reuseport() {
    let name = "lc_reuseport";
    let pg = pg();
    pg.create_app(name).await;
    let toml = format!(
        "so_reuseport = 1\nworker_threads = 1\n{}",
        config(name, 2, pg.port)
            .replace("max_server_connections = 20", "max_server_connections = 4")
    );
    let a = ProxyProcess::start(&toml).await;
    let taken = pgsluice::listener::bind(&format!("127.0.0.1:{}", a.port), false).await;
    assert_eq!(
        taken.map(|_| ()).unwrap_err().kind(),
        std::io::ErrorKind::AddrInUse,
        "a listener without SO_REUSEPORT bound the port"
    );
    let b = start_sharing(&toml, a.port).await;
    // Each client's connection comes from a new port: the kernel's hash spreads them.
    let mut clients = Vec::new();
    for i in 0..24 {
        let c = connect(&a.conn(name, "x", name)).await;
        assert_eq!(scalar(&c, &format!("SELECT {i}")).await, i.to_string());
        clients.push(c);
    }
    let a_clients = common::leaks::metrics(&a)
        .await
        .sum("pgsluice_client_connections", &[]);
    let b_clients = common::leaks::metrics(&b)
        .await
        .sum("pgsluice_client_connections", &[]);
    assert_eq!(a_clients + b_clients, 24.0, "{a_clients} + {b_clients}");
    assert!(
        a_clients > 0.0 && b_clients > 0.0,
        "all clients went to one process: {a_clients} and {b_clients}"
    );
}

/// Peering: two processes share a port, each with its `peer_id` and its own Unix socket,
/// and the same `[peers]`. A cancel request lands on either process (the kernel's hash
/// picks), yet every running query is cancelled: a process that does not have the key
/// sends the request on to the peer whose id the key carries. Without peering about half
/// of these cancels would be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancels_reach_the_right_process_through_peers() {
    let name = "lc_peers";
    let pg = pg();
    pg.create_app(name).await;
    let port = common::pg::free_port();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let peers: String = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            format!(
                "[peers.{}]\nhost = \"{}\"\nport = {port}\n",
                i + 1,
                d.path().display()
            )
        })
        .collect();
    let start = |id: usize| {
        let toml = format!(
            "so_reuseport = 1\nworker_threads = 1\npeer_id = {id}\nlisten_unix = \"{}\"\n{}{peers}",
            dirs[id - 1].path().display(),
            config(name, 24, pg.port)
                .replace("max_server_connections = 20", "max_server_connections = 24"),
        );
        async move { start_sharing(&toml, port).await }
    };
    let a = start(1).await;
    let b = start(2).await;
    const N: usize = 24;
    let mut clients = Vec::new();
    for _ in 0..N {
        let c = connect(&a.conn(name, "x", name)).await;
        clients.push(Arc::new(c));
    }
    let mut running = Vec::new();
    for c in &clients {
        let c = c.clone();
        running.push(tokio::spawn(async move {
            c.batch_execute("SELECT pg_sleep(60)").await
        }));
    }
    // All 24 queries run on PostgreSQL before any cancel, however the kernel split them.
    let admin = pg.admin().await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            let n: i64 = admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            n == N as i64
        })
        .await,
        "the queries did not all start"
    );
    let started = Instant::now();
    for c in &clients {
        // Each cancel request is a new TCP connection to the shared port.
        c.cancel_token()
            .cancel_query(tokio_postgres::NoTls)
            .await
            .unwrap();
    }
    for r in running {
        let e = tokio::time::timeout(Duration::from_secs(20), r)
            .await
            .expect("a query was not cancelled")
            .unwrap()
            .unwrap_err();
        assert_eq!(code(&e), "57014", "{}", message(&e));
    }
    assert!(started.elapsed() < Duration::from_secs(20));
    // Sums a result over both processes. A request is counted once the server has read
    // it and closed the cancel connection, which may come just after the query's error
    // reached its client: the counts are read until they settle.
    let count = |result: &'static str| {
        let (a, b) = (&a, &b);
        async move {
            let (ma, mb) = (
                common::leaks::metrics(a).await,
                common::leaks::metrics(b).await,
            );
            let n = |m: &common::leaks::Metrics| {
                m.sum("pgsluice_cancel_requests_total", &[("result", result)])
            };
            n(&ma) + n(&mb)
        }
    };
    // Each cancel reached its server once: directly, or sent on and then sent to it.
    assert!(
        eventually(Duration::from_secs(10), || async {
            count("server").await == N as f64
        })
        .await,
        "cancels at a server: {} of {N} ({} sent on)",
        count("server").await,
        count("peer").await
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            count("peer").await > 0.0
        })
        .await,
        "no cancel went to the other process"
    );
    assert_eq!(count("peer_failed").await, 0.0);
    assert_eq!(count("unknown").await, 0.0);
    // The clients carry on.
    for c in &clients {
        assert_eq!(scalar(c, "SELECT 1").await, "1");
    }
}

/// A client's log lines carry its span (peer, user, database) though the span is entered
/// only on the rare paths, not at every wake-up: the line a timeout writes mid-session and
/// the line that ends the client both name it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_log_lines_name_it() {
    let name = "lc_span";
    let pg = pg();
    pg.create_app(name).await;
    let toml = format!("query_timeout = \"1s\"\n{}", config(name, 2, pg.port));
    let proxy = ProxyProcess::start(&toml).await;
    let c = connect(&proxy.conn(name, "x", name)).await;
    assert_eq!(scalar(&c, "SELECT 1").await, "1");
    let e = c.simple_query("SELECT pg_sleep(5)").await.unwrap_err();
    assert_eq!(code(&e), "57014", "{}", message(&e));
    let named = |needle: &str| {
        // Plain text once the terminal colours are taken out.
        let log = String::from_utf8(strip_ansi(proxy.log().as_bytes())).unwrap();
        log.lines().any(|l| {
            l.contains(needle)
                && l.contains("peer=127.0.0.1:")
                && l.contains(&format!("user=\"{name}\""))
                && l.contains(&format!("database=\"{name}\""))
        })
    };
    assert!(
        eventually(Duration::from_secs(10), || async {
            named("client closed at a timeout") && named("client closed")
        })
        .await,
        "log lines without the client's span:\n{}",
        proxy.log()
    );
}

/// `s` without ANSI escape sequences (`ESC [ ... letter`).
fn strip_ansi(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == 0x1b && s.get(i + 1) == Some(&b'[') {
            i += 2;
            while i < s.len() && !s[i].is_ascii_alphabetic() {
                i += 1;
            }
            i += 1;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    out
}
