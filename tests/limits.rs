//! Limits and overload (catalogue §3 D): max_client_conn, 10,000 connections at once, file
//! descriptors running out, the global budget under reloads and cancels, a large stream
//! beside small queries. Memory and descriptor figures come from pgsluice running as a
//! child process; each test ends with the leak check.
//!
//! Covered elsewhere: the third client over `max_client_conn = 2` gets 53300
//! (tests/auth.rs `max_client_conn_refuses_the_third_client_with_53300`); four pools within
//! a budget and budget hand-over between pools (tests/budget.rs).

mod common;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::child::Options;
use common::wire;
use common::*;
use tokio::io::AsyncWriteExt;

/// CPU seconds (user + system) a process has used, from /proc/PID/stat.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// This process's (soft, hard) RLIMIT_NOFILE.
fn nofile() -> (u64, u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let f: Vec<&str> = line.split_whitespace().collect();
    let parse = |v: &str| v.parse().unwrap_or(u64::MAX);
    (parse(f[3]), parse(f[4]))
}

/// Raises this process's soft RLIMIT_NOFILE towards `want` (up to the hard limit, which
/// needs no privilege; the crate forbids unsafe code, so the `prlimit` binary does it).
/// Returns the soft limit now in force.
fn raise_nofile(want: u64) -> u64 {
    let (soft, hard) = nofile();
    let target = want.min(hard);
    if soft < target {
        let _ = std::process::Command::new("prlimit")
            .arg(format!("--pid={}", std::process::id()))
            .arg(format!("--nofile={target}:{hard}"))
            .status();
    }
    nofile().0
}

/// Logs a raw client in (trust) and runs `SELECT 1`; the open socket.
async fn login_and_select(port: u16, name: &str) -> tokio::net::TcpStream {
    let mut s = wire::raw_login(port, name).await;
    select_one(&mut s).await;
    s
}

async fn select_one(s: &mut tokio::net::TcpStream) {
    s.write_all(&wire::query("SELECT 1")).await.unwrap();
    let msgs = wire::read_until_ready(s).await;
    assert!(msgs.iter().any(|m| m.tag == b'D'));
}

/// One of a crowd: connects (a SYN may wait in a full queue and be sent again, so allow
/// a minute), logs in (trust), runs `SELECT 1`.
async fn crowd_member(port: u16, name: &str) -> tokio::net::TcpStream {
    let mut s = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    .expect("connected within a minute")
    .expect("connect");
    s.write_all(&wire::startup_packet(&[("user", name), ("database", name)]))
        .await
        .unwrap();
    // In a crowd a reply may wait its turn for a while: a bound per message of 2 min.
    let mut rows = 0;
    for step in 0..2 {
        if step == 1 {
            s.write_all(&wire::query("SELECT 1")).await.unwrap();
        }
        loop {
            let m = wire::read_msg_within(&mut s, Duration::from_secs(120))
                .await
                .expect("an answer, not a close");
            assert_ne!(m.tag, b'E', "{:?}", m.fields());
            rows += usize::from(m.tag == b'D');
            if m.tag == b'Z' {
                break;
            }
        }
    }
    assert_eq!(rows, 1);
    s
}

/// Scenario 38: at max_client_conn the next client gets 53300 at once, the clients already
/// in are unaffected, and the admin console is still reachable.
#[tokio::test]
async fn max_client_conn_keeps_the_admin_console_reachable() {
    let name = "li_maxconn";
    let proxy = app(
        name,
        &format!("max_client_conn = 5\nadmin_users = [\"{name}\"]"),
    )
    .await;
    let leaks = Leaks::new(&proxy, name).await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(proxy.client(name).await);
    }
    let started = Instant::now();
    let e = try_connect(&proxy.conn(name, &format!("{name}-pw"), name))
        .await
        .expect_err("the sixth client is refused");
    assert_eq!(code(&e), "53300", "{e}");
    assert!(started.elapsed() < Duration::from_secs(2));
    for c in &clients {
        assert_eq!(scalar(c, "SELECT 1").await, "1");
    }
    let console = try_connect(&proxy.conn(name, &format!("{name}-pw"), "pgsluice"))
        .await
        .expect("the admin console is reachable at max_client_conn");
    let rows = console.simple_query("SHOW POOLS").await.unwrap();
    assert!(rows.len() > 1);
    drop(console);
    drop(clients);
    leaks.check().await;
}

/// The admin reserve cannot be held by logins that stall: a connection let in over
/// max_client_conn that starts a console login and never answers the password challenge is
/// refused with 53300 within a few seconds (not client_login_timeout's minute), and the
/// console is reachable again.
#[tokio::test]
async fn a_stalled_login_does_not_hold_the_admin_reserve() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let name = "li_reserve";
    let proxy = app(
        name,
        &format!("max_client_conn = 2\nadmin_users = [\"{name}\"]"),
    )
    .await;
    let clients = vec![proxy.client(name).await, proxy.client(name).await];
    let started = Instant::now();
    let mut stalled = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stalled
        .write_all(&common::wire::startup_packet(&[
            ("user", name),
            ("database", "pgsluice"),
        ]))
        .await
        .unwrap();
    let mut got = Vec::new();
    // The password request, then, after the reserve's deadline, FATAL 53300 and the close.
    tokio::time::timeout(Duration::from_secs(20), stalled.read_to_end(&mut got))
        .await
        .expect("closed within the reserve's deadline")
        .unwrap();
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(10), "held {waited:?}");
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("53300"), "{text}");
    let console = try_connect(&proxy.conn(name, &format!("{name}-pw"), "pgsluice"))
        .await
        .expect("the console is reachable again");
    assert!(console.simple_query("SHOW POOLS").await.unwrap().len() > 1);
    drop(clients);
}

/// Scenario 39: 10,000 clients connect and log in at once, each runs `SELECT 1` and stays;
/// every one succeeds within bounded time, the server connections stay within the pool,
/// memory per idle client is bounded; after all leave, the leak check holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_clients_at_once() {
    // Each side needs a descriptor per client: this process and pgsluice.
    let limit = raise_nofile(12_000);
    let n = 10_000.min(limit.saturating_sub(500) as usize);
    assert!(n >= 2_000, "RLIMIT_NOFILE {limit} is too low for this test");
    if n < 10_000 {
        eprintln!("RLIMIT_NOFILE {limit}: running with {n} clients");
    }
    let name = "li_tenk";
    pg().create_app(name).await;
    let proxy = ProxyProcess::start_with(
        &app_config(
            pg(),
            name,
            "auth_type = \"trust\"\nmax_client_conn = 20000\npool_size = 10\nquery_wait_timeout = \"120s\"\nclient_login_timeout = \"120s\"",
        ),
        Options {
            nofile: Some(nofile().1.min(30_000)),
            ..Default::default()
        },
    )
    .await;
    // The allocator keeps much of the peak (10,000 sessions) mapped after they leave, so the
    // leak test is a second crowd: memory the first one freed must serve most of it.
    let leaks = Leaks::new(&proxy, name).await.rss_slack_mib(128);
    // Warm the pool so that the first logins do not all wait for its first server.
    drop(login_and_select(proxy.port, name).await);
    let rss_before = common::leaks::rss_kib(proxy.pid());
    let started = Instant::now();
    let socks = crowd(proxy.port, name, n).await;
    let took = started.elapsed();
    assert_eq!(socks.len(), n, "every client logged in and was served");
    let rss = common::leaks::rss_kib(proxy.pid()).saturating_sub(rss_before);
    let per_client = rss as f64 * 1024.0 / n as f64;
    eprintln!("{n} clients: {took:?}; proxy RSS +{rss} KiB, {per_client:.0} bytes per client");
    assert!(
        per_client < 32.0 * 1024.0,
        "{per_client:.0} bytes of proxy memory per idle client"
    );
    let admin = pg().admin().await;
    assert!(server_conns(&admin, name).await <= 10);
    drop(socks);
    leaks.check().await;
    let after_first = common::leaks::rss_kib(proxy.pid());
    let socks = crowd(proxy.port, name, n).await;
    assert_eq!(
        socks.len(),
        n,
        "every client of the second crowd was served"
    );
    drop(socks);
    leaks.check().await;
    let after_second = common::leaks::rss_kib(proxy.pid());
    let socks = crowd(proxy.port, name, n).await;
    assert_eq!(socks.len(), n, "every client of the third crowd was served");
    drop(socks);
    leaks.check().await;
    let after_third = common::leaks::rss_kib(proxy.pid());
    eprintln!("RSS after the first crowd {after_first} KiB, after the second {after_second} KiB, after the third {after_third} KiB");
    // Leaked sessions would add about what the first crowd took (`rss`) at every crowd.
    // The allocator settles instead: the second crowd still adds some (where the first
    // one's memory went back to the heap decides what fits; seen with glibc: 11-37 MB of
    // ~75; with jemalloc, which keeps freed pages for 10 s: 16 MB), the third usually less
    // (seen: 3-13 MB, once 19.7 with jemalloc). Both bounds stay far below a leak's ~75 MB
    // per crowd.
    assert!(
        after_second <= after_first + rss / 2,
        "a second crowd of {n} grew RSS from {after_first} to {after_second} KiB (the first took {rss} KiB): memory is not reused"
    );
    assert!(
        after_third <= after_second + rss / 2,
        "a third crowd of {n} grew RSS from {after_second} to {after_third} KiB (the first took {rss} KiB): memory is not reused"
    );
}

/// `n` clients at once, each logged in and served once; their sockets, still open.
async fn crowd(port: u16, name: &'static str, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        tasks.push(tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(180), crowd_member(port, name))
                .await
                .ok()
        }));
    }
    let mut socks = Vec::with_capacity(n);
    for t in tasks {
        if let Some(s) = t.await.unwrap() {
            socks.push(s);
        }
    }
    socks
}

/// Scenario 40: pgsluice runs out of file descriptors (RLIMIT_NOFILE 64). Clients beyond
/// what it can accept wait in the listen queue instead of being served broken; the accept
/// loop backs off instead of spinning; clients already in keep working; the failures are
/// counted; once some clients leave, the waiting ones are served.
#[tokio::test]
async fn file_descriptors_run_out() {
    let name = "li_nofile";
    pg().create_app(name).await;
    let proxy = ProxyProcess::start_with(
        &app_config(
            pg(),
            name,
            "auth_type = \"trust\"\npool_size = 2\nmax_client_conn = 1000",
        ),
        Options {
            nofile: Some(64),
            ..Default::default()
        },
    )
    .await;
    let leaks = Leaks::new(&proxy, name).await;
    let port = proxy.port;
    // Fill the descriptor table with logged-in clients.
    let mut inside = Vec::new();
    for _ in 0..80 {
        match tokio::time::timeout(Duration::from_secs(2), login_and_select(port, name)).await {
            Ok(s) => inside.push(s),
            Err(_) => break,
        }
    }
    assert!(
        inside.len() >= 20 && inside.len() < 64,
        "{} clients got in under RLIMIT_NOFILE 64",
        inside.len()
    );
    // More clients: they connect (the kernel queues them) but are not served yet.
    let mut waiting = Vec::new();
    for _ in 0..5 {
        waiting.push(tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(30), login_and_select(port, name)).await
        }));
    }
    // While out of descriptors the proxy does not spin.
    let cpu = cpu_seconds(proxy.pid());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spent = cpu_seconds(proxy.pid()) - cpu;
    assert!(
        spent < 0.5,
        "{spent} s of CPU in 2 s while out of descriptors"
    );
    // The clients inside keep working.
    for s in inside.iter_mut().take(10) {
        s.write_all(&wire::query("SELECT 2")).await.unwrap();
        let msgs = wire::read_until_ready(s).await;
        assert!(msgs.iter().any(|m| m.tag == b'D'));
    }
    // Some leave: the waiting ones get in.
    inside.truncate(inside.len() - 10);
    let mut admitted = Vec::new();
    for w in waiting {
        admitted.push(w.await.unwrap().expect("served once descriptors are free"));
    }
    // (The metrics endpoint needs a descriptor too: read once some are free.)
    let scrape = common::leaks::Metrics::parse(&proxy.scrape().await);
    assert!(
        scrape.sum("pgsluice_errors_total", &[("kind", "accept_failed")]) > 0.0,
        "accept failures are counted"
    );
    drop(admitted);
    drop(inside);
    leaks.check().await;
}

/// Scenario 41: four pools of 20 share a budget of 30; 100 clients keep every pool busy
/// while the configuration is reloaded 10 times and 50 running queries are cancelled.
/// PostgreSQL never sees more than 30 of the proxy's sessions (sampled every 50 ms), and
/// the only errors clients see are their cancels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_budget_under_reloads_and_cancels() {
    let names = ["li_bud_a", "li_bud_b", "li_bud_c", "li_bud_d"];
    let pg = pg();
    for n in names {
        pg.create_app(n).await;
    }
    let mut config = String::from(
        "auth_type = \"trust\"\npool_size = 20\nquery_wait_timeout = \"60s\"\n[budget]\nmax_server_connections = 30\n",
    );
    for n in names {
        config.push_str(&format!(
            "[databases.{n}]\nhost = \"127.0.0.1\"\nport = {}\n[users.{n}]\npassword = \"{n}-pw\"\n",
            pg.port
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgsluice.toml");
    std::fs::write(&path, &config).unwrap();
    let proxy = Arc::new(Proxy::start_file(&path).await);
    let leaks = Leaks::with(
        &*proxy,
        &names,
        pg.port,
        names[0],
        names[0],
        &format!("{}-pw", names[0]),
    )
    .await;
    let admin = pg.admin().await;
    let stop = Arc::new(AtomicBool::new(false));
    let (done, bad) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let most = Arc::new(AtomicI64::new(0));
    // Sample the proxy's sessions every 50 ms.
    let sampler = {
        let (stop, most) = (stop.clone(), most.clone());
        let roles: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        tokio::spawn(async move {
            let admin = common::pg().admin().await;
            while !stop.load(Ordering::Relaxed) {
                let n: i64 = admin
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE usename = ANY($1) AND backend_type = 'client backend'",
                        &[&roles],
                    )
                    .await
                    .unwrap()
                    .get(0);
                most.fetch_max(n, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let mut workers = Vec::new();
    let mut keys = Vec::new();
    for i in 0..100 {
        let n = names[i % 4];
        let (client, connection) =
            tokio_postgres::connect(&proxy.conn(n, &format!("{n}-pw"), n), tokio_postgres::NoTls)
                .await
                .unwrap();
        tokio::spawn(connection);
        keys.push(client.cancel_token());
        let (stop, done, bad) = (stop.clone(), done.clone(), bad.clone());
        workers.push(tokio::spawn(async move {
            for _ in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match client
                    .batch_execute("BEGIN; SELECT pg_sleep(0.02); COMMIT")
                    .await
                {
                    Ok(()) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) if code(&e) == "57014" => {
                        let _ = client.batch_execute("ROLLBACK").await;
                    }
                    Err(e) => {
                        eprintln!("{e}");
                        bad.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for round in 0..10 {
        // Reload (the pool sizes alternate, so the reload has something to do).
        let size = if round % 2 == 0 { 15 } else { 20 };
        std::fs::write(
            &path,
            config.replace("pool_size = 20", &format!("pool_size = {size}")),
        )
        .unwrap();
        pgsluice::reload::reload(&proxy.shared).expect("reload");
        for k in keys.iter().skip(round * 5).take(5) {
            let _ = k.cancel_query(tokio_postgres::NoTls).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    sampler.await.unwrap();
    assert!(done.load(Ordering::Relaxed) > 100, "work was done");
    assert_eq!(bad.load(Ordering::Relaxed), 0, "errors other than cancels");
    let most = most.load(Ordering::Relaxed);
    assert!(most <= 30, "{most} sessions, over the budget of 30");
    drop(keys);
    let _ = admin;
    leaks.check().await;
}

/// Scenario 42: one client streams 200 MB (COPY TO STDOUT) while 20 others loop on
/// `SELECT 1`; the small queries keep completing (none waits 3 s: no starvation), and the proxy's
/// memory stays flat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_queries_beside_a_large_stream() {
    let name = "li_stream";
    pg().create_app(name).await;
    let proxy = ProxyProcess::start(&app_config(
        pg(),
        name,
        "auth_type = \"trust\"\npool_size = 4",
    ))
    .await;
    let leaks = Leaks::new(&proxy, name).await;
    let rss = common::leaks::rss_kib(proxy.pid());
    let port = proxy.port;
    let stream = tokio::spawn(async move {
        let mut w = wire::Wire::connect(port, name, name).await;
        w.send(&[wire::query(
            "COPY (SELECT repeat('s', 1000) FROM generate_series(1, 200000)) TO STDOUT",
        )])
        .await;
        let mut bytes = 0usize;
        loop {
            let m = w.recv().await;
            match m.tag {
                b'd' => bytes += m.body.len(),
                b'Z' => break,
                b'E' => panic!("{m:?}"),
                _ => {}
            }
        }
        bytes
    });
    let worst = Arc::new(AtomicU64::new(0));
    let mut small = Vec::new();
    for _ in 0..20 {
        let worst = worst.clone();
        small.push(tokio::spawn(async move {
            let mut w = wire::Wire::connect(port, name, name).await;
            for _ in 0..50 {
                let t = Instant::now();
                let (tags, _) = w.round(&[wire::query("SELECT 1")]).await;
                assert_eq!(tags, "TDCZ");
                worst.fetch_max(t.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
        }));
    }
    for s in small {
        s.await.unwrap();
    }
    let bytes = stream.await.unwrap();
    assert_eq!(bytes, 200_000 * 1001);
    let worst = worst.load(Ordering::Relaxed);
    assert!(
        worst < 3000,
        "a SELECT 1 waited {worst} ms beside the stream"
    );
    let grown = common::leaks::rss_kib(proxy.pid()).saturating_sub(rss);
    assert!(grown < 16 * 1024, "RSS grew by {grown} KiB");
    leaks.check().await;
}
