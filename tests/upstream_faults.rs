//! The upstream fails under pgsluice (catalogue §3 A): crashes, shutdowns, killed and hung
//! backends, slow logins, silent network loss, resets mid-result, a full server, rotated
//! credentials, an endpoint flip, a reconnect storm. Faults come from `common::fault` (a TCP
//! forwarder between pgsluice and PostgreSQL) and from pg_ctl / signals. The first tests
//! check the forwarder itself against an echo server.

mod common;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An echo server on 127.0.0.1:0 that prefixes every reply with `tag`.
async fn echo(tag: u8) -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            let mut out = vec![tag];
                            out.extend_from_slice(&buf[..n]);
                            if s.write_all(&out).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

/// Sends `msg` and reads `msg.len() + 1` bytes back, within `within`.
async fn ask(s: &mut TcpStream, msg: &[u8], within: Duration) -> std::io::Result<Vec<u8>> {
    s.write_all(msg).await?;
    let mut back = vec![0u8; msg.len() + 1];
    match tokio::time::timeout(within, s.read_exact(&mut back)).await {
        Ok(r) => r.map(|_| back),
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

#[tokio::test]
async fn fault_forwarder_modes() {
    let a = echo(b'a').await;
    let b = echo(b'b').await;
    let f = Fault::start(a).await;
    let long = Duration::from_secs(5);
    let mut s = TcpStream::connect(f.addr).await.unwrap();
    assert_eq!(ask(&mut s, b"hi", long).await.unwrap(), b"ahi");

    // Latency: each chunk is held before it is forwarded (there and back).
    f.latency(Duration::from_millis(150));
    let t = Instant::now();
    ask(&mut s, b"x", long).await.unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );

    // Drip: 1 byte every 30 ms (the echo server answers each byte on its own).
    f.drip(1, Duration::from_millis(30));
    let t = Instant::now();
    s.write_all(b"123").await.unwrap();
    let mut back = [0u8; 6];
    tokio::time::timeout(long, s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"a1a2a3");
    assert!(
        t.elapsed() >= Duration::from_millis(90),
        "{:?}",
        t.elapsed()
    );

    // Stall: nothing moves, the socket stays open; pass again and the bytes arrive.
    f.stall();
    s.write_all(b"zz").await.unwrap();
    let mut back = [0u8; 3];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), s.read_exact(&mut back))
            .await
            .is_err(),
        "stalled"
    );
    f.pass();
    tokio::time::timeout(long, s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"azz");

    // Close after N bytes: 3 bytes go through (1 up, 2 down), then FIN.
    f.close_after(3);
    let mut back = [0u8; 16];
    s.write_all(b"q").await.unwrap();
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(long, s.read(&mut back)).await.unwrap() {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&back[..n]),
            Err(e) => panic!("FIN expected, got {e}"),
        }
    }
    assert_eq!(got, b"aq");
    f.pass();

    // Reset existing: RST for open connections; a new one passes.
    let mut s = TcpStream::connect(f.addr).await.unwrap();
    ask(&mut s, b"1", long).await.unwrap();
    f.reset_existing();
    let mut one = [0u8; 1];
    let r = tokio::time::timeout(long, s.read(&mut one)).await.unwrap();
    assert_eq!(
        r.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset)
    );
    let mut s = TcpStream::connect(f.addr).await.unwrap();
    assert_eq!(ask(&mut s, b"2", long).await.unwrap(), b"a2");

    // Blackhole: a new connection is accepted and never answered; existing ones still work.
    f.blackhole();
    let mut hole = TcpStream::connect(f.addr).await.unwrap();
    assert!(ask(&mut hole, b"3", Duration::from_millis(300))
        .await
        .is_err());
    assert_eq!(ask(&mut s, b"4", long).await.unwrap(), b"a4");

    // Refuse: the listener is closed; accept again and it listens on the same port.
    f.refuse();
    assert!(
        eventually(long, || async {
            matches!(TcpStream::connect(f.addr).await, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
        })
        .await
    );
    f.accept();
    assert!(eventually(long, || async { TcpStream::connect(f.addr).await.is_ok() }).await);

    // Retarget: new connections go to b, open ones stay on a.
    f.retarget(b);
    let mut new = TcpStream::connect(f.addr).await.unwrap();
    assert_eq!(ask(&mut new, b"5", long).await.unwrap(), b"b5");
    assert_eq!(ask(&mut s, b"6", long).await.unwrap(), b"a6");

    // Reset mode: every connection, open and new, is reset.
    f.reset();
    let r = tokio::time::timeout(long, s.read(&mut one)).await.unwrap();
    assert!(r.is_err() || r.unwrap() == 0);
    let mut s = TcpStream::connect(f.addr).await.unwrap();
    let r = ask(&mut s, b"7", long).await;
    assert!(r.is_err(), "{r:?}");
    assert!(f.accepted() >= 6);
    drop(hole);
}

/// A proxy for app `name` whose database is reached through a `Fault` in front of the
/// binary's PostgreSQL.
async fn behind_fault(name: &str, top: &str) -> (Proxy, Fault) {
    let pg = pg();
    pg.create_app(name).await;
    let fault = Fault::start(("127.0.0.1", pg.port)).await;
    let proxy = Proxy::start(&app_config_at(fault.port(), name, top)).await;
    (proxy, fault)
}

/// Scenario 4 (variant): every pooled server connection is reset on the wire while the
/// clients are idle; each client's next query runs on a new backend with no error.
#[tokio::test]
async fn pooled_servers_reset_on_the_wire_are_replaced_unseen() {
    let (proxy, fault) = behind_fault("uf_rst_idle", "pool_size = 4").await;
    let leaks = Leaks::with(
        &proxy,
        &["uf_rst_idle"],
        fault.port(),
        "uf_rst_idle",
        "uf_rst_idle",
        "uf_rst_idle-pw",
    )
    .await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(proxy.client("uf_rst_idle").await);
    }
    // Four servers in the pool: four clients in transactions at once.
    for c in &clients {
        c.batch_execute("BEGIN").await.unwrap();
    }
    let mut before = Vec::new();
    for c in &clients {
        before.push(scalar(c, "SELECT pg_backend_pid()").await);
        c.batch_execute("COMMIT").await.unwrap();
    }
    fault.reset_existing();
    assert!(eventually(Duration::from_secs(5), || async { fault.open() == 0 }).await);
    for c in &clients {
        let pid = scalar(c, "SELECT pg_backend_pid()").await;
        assert!(!before.contains(&pid), "a new backend, not {pid}");
    }
    drop(clients);
    leaks.check().await;
}

/// Scenario 4, nobody querying afterwards: servers that died while idle leave the pool
/// (and its gauge, and the budget) within a janitor round or two, not at the next checkout.
#[tokio::test]
async fn servers_that_die_while_idle_leave_the_pool() {
    let name = "uf_dead_idle";
    let proxy = app(name, "pool_size = 3").await;
    let leaks = Leaks::new(&proxy, name).await;
    let clients = [
        proxy.client(name).await,
        proxy.client(name).await,
        proxy.client(name).await,
    ];
    for c in &clients {
        c.batch_execute("BEGIN").await.unwrap();
    }
    for c in &clients {
        c.batch_execute("COMMIT").await.unwrap();
    }
    let admin = pg().admin().await;
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
            &[&name],
        )
        .await
        .unwrap();
    let idle = || async {
        let text = String::from_utf8(pgsluice::metrics::scrape(&proxy.shared)).unwrap();
        common::leaks::Metrics::parse(&text).sum("pgsluice_server_connections", &[])
    };
    assert!(
        eventually(Duration::from_secs(3), || async { idle().await == 0.0 }).await,
        "dead idle servers still counted: {}",
        idle().await
    );
    leaks.holding(3).check().await;
}

/// Scenario 4: the proxy's backends are terminated out of band while every client is
/// idle. Each client's next query runs on a new backend with no error, and the dead
/// servers do not linger in the pool (the leak check compares the pool's gauge with
/// pg_stat_activity).
#[tokio::test]
async fn backends_terminated_out_of_band_are_replaced_unseen() {
    let name = "uf_terminated";
    let proxy = app(name, "pool_size = 4").await;
    let leaks = Leaks::new(&proxy, name).await;
    let clients = [proxy.client(name).await, proxy.client(name).await];
    // Four servers in the pool (four transactions at once), two clients left using it.
    let extra = [proxy.client(name).await, proxy.client(name).await];
    for c in clients.iter().chain(&extra) {
        c.batch_execute("BEGIN").await.unwrap();
    }
    let mut before = Vec::new();
    for c in clients.iter().chain(&extra) {
        before.push(scalar(c, "SELECT pg_backend_pid()").await);
        c.batch_execute("COMMIT").await.unwrap();
    }
    drop(extra);
    let admin = pg().admin().await;
    let killed: i64 = admin
        .query_one(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE usename = $1 AND pid <> pg_backend_pid()) k",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 4);
    // Once the backends are gone (their FATAL and EOF wait in the proxy's idle sockets)...
    assert!(
        eventually(Duration::from_secs(5), || async {
            server_conns(&admin, name).await == 0
        })
        .await
    );
    // ...no client sees an error: a dead idle server is never handed out. (A query that
    // races the termination itself, sent before the server's FATAL arrives, gets that
    // FATAL: see docs/reliability.md.)
    for c in &clients {
        let pid = scalar(c, "SELECT pg_backend_pid()").await;
        assert!(!before.contains(&pid), "a new backend, not {pid}");
    }
    drop(clients);
    leaks.check().await;
}

/// The leak check itself sees what it is meant to see.
#[tokio::test]
async fn leak_check_sees_dirty_states() {
    let proxy = app("uf_leakcheck", "pool_size = 2").await;
    let leaks = Leaks::new(&proxy, "uf_leakcheck").await;
    let admin = pg().admin().await;
    let c = proxy.client("uf_leakcheck").await;
    c.batch_execute("BEGIN; SELECT 1").await.unwrap();
    // A backend idle in a transaction, and a client more than the baseline.
    let found = leaks.problems(&admin).await;
    assert!(found.iter().any(|p| p.starts_with("2:")), "{found:?}");
    assert!(found.iter().any(|p| p.starts_with("4:")), "{found:?}");
    assert!(found.iter().any(|p| p.starts_with("5:")), "{found:?}");
    // A backend of the role that is not the proxy's.
    let direct = connect(&format!(
        "host=127.0.0.1 port={} user=uf_leakcheck password=uf_leakcheck-pw dbname=uf_leakcheck",
        pg().port
    ))
    .await;
    let found = leaks.problems(&admin).await;
    assert!(found.iter().any(|p| p.starts_with("1:")), "{found:?}");
    drop(direct);
    c.batch_execute("COMMIT").await.unwrap();
    leaks.clone_holding(1).check().await;
    drop(c);
    leaks.check().await;
}

// ---------------------------------------------------------------------------------------
// Scenarios with their own PostgreSQL (they stop or reconfigure it).
// ---------------------------------------------------------------------------------------

/// Its own PostgreSQL with app `name` and a proxy in front of it.
async fn own_pg(name: &str, conf: &[&str], top: &str) -> (TestPostgres, Proxy) {
    let pg = TestPostgres::start(conf);
    pg.create_app(name).await;
    let proxy = Proxy::start(&app_config(&pg, name, top)).await;
    (pg, proxy)
}

/// The baseline of the leak check for app `name` on its own PostgreSQL.
async fn own_leaks<'a>(proxy: &'a Proxy, pg: &TestPostgres, name: &str) -> Leaks<'a> {
    Leaks::with(proxy, &[name], pg.port, name, name, &format!("{name}-pw")).await
}

/// A raw client logged in with the app's password.
async fn wire(proxy: &Proxy, name: &str) -> wire::Wire {
    wire::Wire::connect_password(proxy.addr.port(), name, name, &format!("{name}-pw")).await
}

/// Reads messages until the proxy closes; the error codes seen, in order. Every message
/// read is whole (a cut frame fails the read).
async fn errors_until_closed(w: &mut wire::Wire) -> Vec<String> {
    let mut codes = Vec::new();
    for _ in 0..100 {
        match wire::read_msg_within(&mut w.stream, Duration::from_secs(15)).await {
            None => return codes,
            Some(m) if m.tag == b'E' => codes.push(m.code().unwrap_or_default()),
            Some(_) => {}
        }
    }
    panic!("the connection was not closed");
}

fn errors_total(proxy: &Proxy, kind: &str) -> f64 {
    let text = String::from_utf8(pgsluice::metrics::scrape(&proxy.shared)).unwrap();
    common::leaks::Metrics::parse(&text).sum("pgsluice_errors_total", &[("kind", kind)])
}

/// Scenario 1: PostgreSQL crashes (immediate stop) while client A is inside a transaction
/// and client B is idle. A gets FATAL 08006 and is closed; its INSERT is gone; B's next
/// query after the restart succeeds on the same client connection.
#[tokio::test]
async fn crash_mid_transaction() {
    let name = "uf_crash";
    let (pg, proxy) = own_pg(name, &[], "pool_size = 4").await;
    let leaks = own_leaks(&proxy, &pg, name).await;
    let b = proxy.client(name).await;
    b.batch_execute("CREATE TABLE t (v int)").await.unwrap();
    // The test cluster runs with synchronous_commit off: make the table survive the crash.
    pg.admin().await.batch_execute("CHECKPOINT").await.unwrap();
    let mut a = wire(&proxy, name).await;
    let (tags, _) = a
        .round(&[wire::query("BEGIN; INSERT INTO t VALUES (1)")])
        .await;
    assert!(!tags.contains('E'), "{tags}");
    let lost = errors_total(&proxy, "connection_lost");
    pg.ctl_stop_mode("immediate", true);
    let codes = errors_until_closed(&mut a).await;
    assert_eq!(codes.last().map(String::as_str), Some("08006"), "{codes:?}");
    pg.start_async().await;
    assert_eq!(
        scalar(&b, "SELECT count(*) FROM t").await,
        "0",
        "the INSERT was lost"
    );
    assert_eq!(errors_total(&proxy, "connection_lost"), lost + 1.0);
    drop(b);
    leaks.check_with(&pg.admin().await).await;
}

/// Scenario 2: fast shutdown with a query in flight and five idle clients. The running
/// client gets the server's own 57P01; the idle ones see nothing until their next query,
/// which succeeds once PostgreSQL is back.
#[tokio::test]
async fn fast_shutdown_mid_query() {
    let name = "uf_fast";
    let (pg, proxy) = own_pg(name, &[], "pool_size = 6").await;
    let leaks = own_leaks(&proxy, &pg, name).await;
    let mut idle = Vec::new();
    for _ in 0..5 {
        let c = proxy.client(name).await;
        assert_eq!(scalar(&c, "SELECT 1").await, "1");
        idle.push(c);
    }
    let mut busy = wire(&proxy, name).await;
    busy.send(&[wire::query("SELECT pg_sleep(60)")]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    pg.stop_async("fast").await;
    let codes = errors_until_closed(&mut busy).await;
    assert_eq!(
        codes.first().map(String::as_str),
        Some("57P01"),
        "{codes:?}"
    );
    pg.start_async().await;
    for c in &idle {
        assert_eq!(scalar(c, "SELECT 2").await, "2");
    }
    drop(idle);
    leaks.check_with(&pg.admin().await).await;
}

/// Scenario 3: smart shutdown while a transaction is open: it can still commit, and a
/// client that needs a new server gets PostgreSQL's 57P03 (after the login retries) on a
/// connection that stays usable.
#[tokio::test]
async fn smart_shutdown_lets_the_open_transaction_commit() {
    let name = "uf_smart";
    let (pg, proxy) = own_pg(
        name,
        &[],
        "pool_size = 2\nserver_login_retry = \"1s\"\nquery_wait_timeout = \"10s\"",
    )
    .await;
    let a = proxy.client(name).await;
    a.batch_execute("CREATE TABLE t (v int); BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let b = proxy.client(name).await;
    pg.ctl_stop_mode("smart", false);
    // PostgreSQL refuses new sessions once the smart shutdown has begun.
    let admin_probe = pg.url(name, &format!("{name}-pw"), name);
    assert!(
        eventually(Duration::from_secs(10), || {
            let url = admin_probe.clone();
            async move { try_connect(&url).await.is_err() }
        })
        .await
    );
    let started = Instant::now();
    let e = b.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(code(&e), "57P03", "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let attempts = pg
        .log()
        .matches("the database system is shutting down")
        .count();
    assert!(
        attempts <= 12,
        "{attempts} login attempts in 1 s of server_login_retry: retries back off"
    );
    a.batch_execute("INSERT INTO t VALUES (2); COMMIT")
        .await
        .unwrap();
    drop(a);
    drop(b);
    // A fast stop ends the smart one; started again, both rows are there.
    pg.stop_async("fast").await;
    pg.start_async().await;
    let direct = connect(&pg.url(name, &format!("{name}-pw"), name)).await;
    assert_eq!(scalar(&direct, "SELECT count(*) FROM t").await, "2");
}

/// Scenario 6: logins that hang (a blackhole that accepts and never answers). Each attempt
/// is abandoned at server_connect_timeout and its socket closed; waiting clients get an
/// error within their bounds on connections that stay usable; once the upstream answers
/// again they are served. No socket is left behind.
#[tokio::test]
async fn hung_logins_time_out_and_leave_nothing_behind() {
    let name = "uf_hung_login";
    let (proxy, fault) = behind_fault(
        name,
        "pool_size = 3\nserver_connect_timeout = \"300ms\"\nserver_login_retry = \"1s\"\nquery_wait_timeout = \"2s\"",
    )
    .await;
    let leaks = Leaks::with(
        &proxy,
        &[name],
        fault.port(),
        name,
        name,
        &format!("{name}-pw"),
    )
    .await;
    let mut clients = Vec::new();
    for _ in 0..12 {
        clients.push(proxy.client(name).await);
    }
    // The pool's idle server dies and new ones cannot log in.
    fault.blackhole();
    fault.reset_existing();
    let started = Instant::now();
    let mut runs = Vec::new();
    for c in &clients {
        runs.push(c.simple_query("SELECT 1"));
    }
    let results = futures_join(runs).await;
    let took = started.elapsed();
    for r in &results {
        let e = r.as_ref().expect_err("no server can be had");
        assert!(
            ["08006", "53300"].contains(&code(e).as_str()),
            "{e}: {} {}",
            code(e),
            message(e)
        );
    }
    assert!(
        took < Duration::from_secs(8),
        "errors within the bounds: {took:?}"
    );
    let held = fault.accepted();
    assert!(held >= 3, "logins were attempted: {held}");
    // Every abandoned login's socket is closed by the proxy.
    assert!(
        eventually(Duration::from_secs(3), || async { fault.open() == 0 }).await,
        "{} sockets still open",
        fault.open()
    );
    fault.accept();
    for c in &clients {
        assert_eq!(scalar(c, "SELECT 1").await, "1");
    }
    drop(clients);
    leaks.check().await;
}

/// Awaits every future (they run concurrently on this task).
async fn futures_join<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut out = Vec::new();
    let mut handles = Vec::new();
    for f in futs {
        handles.push(Box::pin(f));
    }
    // Poll them all together: a simple join_all.
    let mut pending: Vec<Option<std::pin::Pin<Box<F>>>> = handles.into_iter().map(Some).collect();
    let mut results: Vec<Option<F::Output>> = (0..pending.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (i, slot) in pending.iter_mut().enumerate() {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        results[i] = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => all = false,
                }
            }
        }
        if all {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    for r in results {
        out.push(r.unwrap());
    }
    out
}

/// Scenario 8: the upstream connection is reset in the middle of a large result. The client
/// receives only whole messages, then FATAL 08006, then the close; the broken server is
/// discarded and the proxy did not buffer the result.
#[tokio::test]
async fn reset_mid_result_sends_whole_messages_then_08006() {
    let name = "uf_rst_result";
    let (proxy, fault) = behind_fault(name, "pool_size = 2\nauth_type = \"trust\"").await;
    let leaks = Leaks::with(
        &proxy,
        &[name],
        fault.port(),
        name,
        name,
        &format!("{name}-pw"),
    )
    .await;
    let mut w = wire::Wire::connect(proxy.addr.port(), name, name).await;
    // About 100 MB of rows; the upstream connection is cut after 5 MB of it.
    fault.reset_after(5 << 20);
    w.send(&[wire::query(
        "SELECT repeat('x', 1000) FROM generate_series(1, 100000)",
    )])
    .await;
    let (mut rows, mut codes) = (0usize, Vec::new());
    loop {
        match wire::read_msg_within(&mut w.stream, Duration::from_secs(15)).await {
            None => break,
            Some(m) if m.tag == b'D' => {
                assert_eq!(m.row()[0].as_deref().map(str::len), Some(1000));
                rows += 1;
            }
            Some(m) if m.tag == b'E' => codes.push(m.code().unwrap_or_default()),
            Some(m) => assert_eq!(m.tag, b'T', "{m:?}"),
        }
    }
    assert!(rows > 1000 && rows < 100_000, "{rows} rows before the cut");
    assert_eq!(codes, ["08006"]);
    fault.pass();
    drop(w);
    leaks.check().await;
}

/// Scenario 9: PostgreSQL is full (its max_connections taken by other sessions). The
/// client that needs a new server gets PostgreSQL's 53300 after a few spaced retries,
/// on a connection that stays usable; once the slots free up, it is served with no restart.
#[tokio::test]
async fn upstream_full_then_recovered() {
    let name = "uf_full";
    let (pg, proxy) = own_pg(
        name,
        &["max_connections = 8", "superuser_reserved_connections = 2"],
        "pool_size = 4\nserver_login_retry = \"1s\"",
    )
    .await;
    let admin = pg.admin().await;
    admin
        .batch_execute("CREATE ROLE filler LOGIN PASSWORD 'filler-pw'")
        .await
        .unwrap();
    let c = proxy.client(name).await;
    assert_eq!(scalar(&c, "SELECT 1").await, "1");
    c.batch_execute("BEGIN").await.unwrap();
    let leaks = own_leaks(&proxy, &pg, name).await;
    // Fill every other slot.
    let mut fillers = Vec::new();
    while let Ok(f) = try_connect(&format!(
        "host=127.0.0.1 port={} user=filler password=filler-pw dbname=postgres",
        pg.port
    ))
    .await
    {
        fillers.push(f);
        assert!(fillers.len() < 20);
    }
    // PostgreSQL logs each refusal ("too many clients", or the slots left are reserved).
    let refusals = || {
        let log = pg.log();
        log.matches("too many clients").count()
            + log
                .matches("remaining connection slots are reserved")
                .count()
    };
    let before = refusals();
    let d = proxy.client(name).await;
    let e = d.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(code(&e), "53300", "{e}");
    let attempts = refusals() - before;
    assert!(
        (1..=12).contains(&attempts),
        "{attempts} login attempts in 1 s of server_login_retry"
    );
    drop(fillers);
    assert!(
        eventually(Duration::from_secs(5), || async {
            d.simple_query("SELECT 1").await.is_ok()
        })
        .await
    );
    c.batch_execute("COMMIT").await.unwrap();
    drop(d);
    leaks.holding(0).check_with(&admin).await;
    drop(c);
}

/// Scenario 5 (what holds without a proxy query_timeout, see docs/reliability.md): a
/// backend hangs (SIGSTOP) under a client. The other clients keep being served by the
/// pool's other servers; when the stuck client gives up and leaves, its server is cancelled
/// and closed (not pooled), the pool opens a new one, and nothing is left behind once the
/// backend runs again.
#[tokio::test]
async fn hung_backend_holds_only_its_own_client() {
    let name = "uf_sigstop";
    let proxy = app(name, "pool_size = 2").await;
    let leaks = Leaks::new(&proxy, name).await;
    let mut stuck = wire(&proxy, name).await;
    let (_, msgs) = stuck
        .round(&[wire::query("BEGIN; SELECT pg_backend_pid()")])
        .await;
    let pid: i32 = msgs
        .iter()
        .find(|m| m.tag == b'D')
        .and_then(|m| m.row()[0].clone())
        .unwrap()
        .parse()
        .unwrap();
    let stop = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid}");
    };
    stop("-STOP");
    let hung = tokio::spawn(async move {
        stuck.send(&[wire::query("SELECT 1")]).await;
        let r = tokio::time::timeout(Duration::from_secs(1), stuck.recv()).await;
        assert!(r.is_err(), "a stopped backend cannot answer");
        // The client gives up: its socket closes.
        drop(stuck);
    });
    // Everyone else is served by the other server, one after another.
    let others = [proxy.client(name).await, proxy.client(name).await];
    for round in 0..5 {
        for c in &others {
            assert_eq!(
                scalar(c, &format!("SELECT {round}")).await,
                round.to_string()
            );
        }
    }
    hung.await.unwrap();
    // The stuck server was not returned to the pool: two transactions at once still work.
    others[0].batch_execute("BEGIN").await.unwrap();
    others[1].batch_execute("BEGIN").await.unwrap();
    let a = scalar(&others[0], "SELECT pg_backend_pid()").await;
    let b = scalar(&others[1], "SELECT pg_backend_pid()").await;
    assert!(a != pid.to_string() && b != pid.to_string());
    others[0].batch_execute("COMMIT").await.unwrap();
    others[1].batch_execute("COMMIT").await.unwrap();
    stop("-CONT");
    drop(others);
    leaks.check().await;
}

/// Scenario 7 (what holds without a proxy query_timeout, see docs/reliability.md): the
/// network to a linked server goes silent (a stall: the sockets stay open, nothing moves).
/// Nothing tells pgsluice (on loopback the stalled path still answers TCP keepalives), so
/// the client waits; when it gives up and leaves, its server is closed, not pooled, and
/// once the network moves again new servers serve and nothing is left behind.
#[tokio::test]
async fn silent_network_loss_holds_only_its_client() {
    let name = "uf_stall";
    let (proxy, fault) = behind_fault(name, "auth_type = \"trust\"\npool_size = 2").await;
    let leaks = Leaks::with(&proxy, &[name], fault.port(), name, name, "x").await;
    let mut w = wire::Wire::connect(proxy.addr.port(), name, name).await;
    let (tags, _) = w.round(&[wire::query("SELECT 1")]).await;
    assert_eq!(tags, "TDCZ");
    fault.stall();
    w.send(&[wire::query("SELECT 2")]).await;
    let r = tokio::time::timeout(Duration::from_secs(1), w.recv()).await;
    assert!(r.is_err(), "nothing comes back over a stalled network");
    drop(w);
    // The proxy gives the server up (its cancel goes unanswered for a bounded time).
    assert!(
        eventually(Duration::from_secs(10), || async {
            let m = common::leaks::metrics(&proxy).await;
            m.sum("pgsluice_server_connections", &[]) == 0.0
        })
        .await,
        "the stalled server is closed, not pooled"
    );
    fault.pass();
    let c = proxy.client(name).await;
    assert_eq!(scalar(&c, "SELECT 3").await, "3");
    drop(c);
    leaks.check().await;
}

/// Scenario 5 with query_timeout: a backend hangs (SIGSTOP) under a query. At
/// query_timeout the client gets FATAL 57014; the server is cancelled and closed, never
/// pooled; the others are served throughout, and a new server replaces the hung one.
#[tokio::test]
async fn hung_backend_hits_query_timeout() {
    let name = "uf_sigstop_qt";
    let proxy = app(
        name,
        "pool_size = 2\nquery_timeout = \"1s\"\nauth_type = \"trust\"",
    )
    .await;
    let leaks = Leaks::new(&proxy, name).await;
    let before = errors_total(&proxy, "query_timeout");
    let mut stuck = wire::Wire::connect(proxy.addr.port(), name, name).await;
    let (_, msgs) = stuck.round(&[wire::query("SELECT pg_backend_pid()")]).await;
    let pid = msgs
        .iter()
        .find(|m| m.tag == b'D')
        .and_then(|m| m.row()[0].clone())
        .unwrap();
    let kill = |sig: &str| {
        assert!(std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
    };
    kill("-STOP");
    let started = Instant::now();
    stuck.send(&[wire::query("SELECT 1")]).await;
    let codes = errors_until_closed(&mut stuck).await;
    let took = started.elapsed();
    assert_eq!(codes, ["57014"]);
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert_eq!(errors_total(&proxy, "query_timeout"), before + 1.0);
    // Two transactions at once: neither gets the hung server.
    let others = [proxy.client(name).await, proxy.client(name).await];
    for c in &others {
        c.batch_execute("BEGIN").await.unwrap();
    }
    for c in &others {
        assert_ne!(scalar(c, "SELECT pg_backend_pid()").await, pid);
        c.batch_execute("COMMIT").await.unwrap();
    }
    kill("-CONT");
    drop(others);
    leaks.check().await;
}

/// Scenario 7 with query_timeout: the network to a linked server goes silent mid-query.
/// The client gets FATAL 57014 at query_timeout instead of waiting for TCP to give up
/// (minutes); the server is discarded; once the network moves again all is well.
#[tokio::test]
async fn silent_network_loss_hits_query_timeout() {
    let name = "uf_stall_qt";
    let (proxy, fault) = behind_fault(
        name,
        "auth_type = \"trust\"\npool_size = 2\nquery_timeout = \"1s\"",
    )
    .await;
    let leaks = Leaks::with(&proxy, &[name], fault.port(), name, name, "x").await;
    let mut w = wire::Wire::connect(proxy.addr.port(), name, name).await;
    let (tags, _) = w.round(&[wire::query("BEGIN; SELECT 1")]).await;
    assert_eq!(tags, "CTDCZ");
    fault.stall();
    let started = Instant::now();
    w.send(&[wire::query("SELECT 2")]).await;
    let codes = errors_until_closed(&mut w).await;
    assert_eq!(codes, ["57014"]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            common::leaks::metrics(&proxy)
                .await
                .sum("pgsluice_server_connections", &[])
                == 0.0
        })
        .await,
        "the stalled server is discarded"
    );
    fault.pass();
    let c = proxy.client(name).await;
    assert_eq!(scalar(&c, "SELECT 3").await, "3");
    drop(c);
    leaks.check().await;
}

/// Scenario 10: the upstream password is rotated while the proxy runs (the Secrets Manager
/// case). Pooled servers keep working; a new server login fails with 28P01 at once (no
/// retry loop); once the new secret is in the configuration and it is reloaded, new
/// servers log in again with no restart.
#[tokio::test]
async fn credential_rotation() {
    let name = "uf_rotate";
    let pg = pg();
    pg.create_app(name).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgsluice.toml");
    let config = |password: &str| {
        format!(
            "pool_size = 3\n[budget]\nmax_server_connections = 10\n[databases.{name}]\nhost = \"127.0.0.1\"\nport = {}\npassword = \"{password}\"\n[users.{name}]\npassword = \"{name}-pw\"\n",
            pg.port
        )
    };
    std::fs::write(&path, config(&format!("{name}-pw"))).unwrap();
    let proxy = Proxy::start_file(&path).await;
    let leaks = Leaks::new(&proxy, name).await;
    let a = proxy.client(name).await;
    let b = proxy.client(name).await;
    assert_eq!(scalar(&a, "SELECT 1").await, "1");
    let admin = pg.admin().await;
    admin
        .batch_execute(&format!("ALTER ROLE {name} PASSWORD 'rotated-pw'"))
        .await
        .unwrap();
    // The pooled server still serves.
    a.batch_execute("BEGIN").await.unwrap();
    assert_eq!(scalar(&a, "SELECT 2").await, "2");
    // A second server is needed: its login fails, at once.
    let started = Instant::now();
    let e = b.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(code(&e), "28P01", "{e}");
    assert!(started.elapsed() < Duration::from_secs(2));
    a.batch_execute("COMMIT").await.unwrap();
    // The new secret arrives; a reload picks it up.
    std::fs::write(&path, config("rotated-pw")).unwrap();
    pgsluice::reload::reload(&proxy.shared).expect("reload");
    a.batch_execute("BEGIN").await.unwrap();
    assert_eq!(
        scalar(&b, "SELECT 3").await,
        "3",
        "a new server with the new password"
    );
    a.batch_execute("COMMIT").await.unwrap();
    drop((a, b));
    leaks.check().await;
}

/// Scenario 11: the upstream role's password expires (VALID UNTIL in the past). New server
/// logins are refused with PostgreSQL's 28P01, told to the client that needed one.
#[tokio::test]
async fn expired_upstream_password_refuses_new_servers() {
    let name = "uf_expired";
    let proxy = app(name, "pool_size = 2").await;
    let leaks = Leaks::new(&proxy, name).await;
    let a = proxy.client(name).await;
    let b = proxy.client(name).await;
    assert_eq!(scalar(&a, "SELECT 1").await, "1");
    let admin = pg().admin().await;
    admin
        .batch_execute(&format!("ALTER ROLE {name} VALID UNTIL '2000-01-01'"))
        .await
        .unwrap();
    a.batch_execute("BEGIN").await.unwrap();
    let e = b.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(code(&e), "28P01", "{e}");
    a.batch_execute("COMMIT").await.unwrap();
    admin
        .batch_execute(&format!("ALTER ROLE {name} VALID UNTIL 'infinity'"))
        .await
        .unwrap();
    drop((a, b));
    leaks.check().await;
}

/// Scenario 12: an endpoint flip, as an RDS Multi-AZ failover does it. A crashes, the
/// endpoint (a forwarder) turns to B. Clients idle at the time keep their connections and
/// are served by B at their next query, within 2 s of the flip; clients inside a
/// transaction get 08006; B never gets more than the pool.
#[tokio::test]
async fn failover_with_an_endpoint_flip() {
    let name = "uf_flip";
    let a = TestPostgres::start(&[]);
    let b = TestPostgres::start(&[]);
    a.create_app(name).await;
    b.create_app(name).await;
    let endpoint = Fault::start(("127.0.0.1", a.port)).await;
    let proxy = Proxy::start(&app_config_at(
        endpoint.port(),
        name,
        "auth_type = \"trust\"\npool_size = 5\nserver_login_retry = \"10s\"",
    ))
    .await;
    let leaks = Leaks::with(
        &proxy,
        &[name],
        endpoint.port(),
        name,
        name,
        &format!("{name}-pw"),
    )
    .await;
    let mut idle = Vec::new();
    for _ in 0..20 {
        let c = proxy.client(name).await;
        assert_eq!(
            scalar(&c, "SELECT inet_server_port()").await,
            a.port.to_string()
        );
        idle.push(c);
    }
    let mut busy = Vec::new();
    for _ in 0..2 {
        let mut w = wire(&proxy, name).await;
        let (tags, _) = w.round(&[wire::query("BEGIN")]).await;
        assert!(!tags.contains('E'));
        busy.push(w);
    }
    a.ctl_stop_mode("immediate", true);
    for w in &mut busy {
        let codes = errors_until_closed(w).await;
        assert_eq!(codes.last().map(String::as_str), Some("08006"), "{codes:?}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    endpoint.retarget(("127.0.0.1", b.port));
    let flipped = Instant::now();
    let mut runs = Vec::new();
    for c in &idle {
        runs.push(c.simple_query("SELECT inet_server_port()"));
    }
    let results = futures_join(runs).await;
    let took = flipped.elapsed();
    for r in results {
        let rows = r.expect("an idle client is served after the flip");
        let port = rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        });
        assert_eq!(port, Some(b.port.to_string()));
    }
    assert!(
        took < Duration::from_secs(2),
        "all served {took:?} after the flip"
    );
    let admin = b.admin().await;
    assert!(server_conns(&admin, name).await <= 5);
    drop(idle);
    leaks.check_with(&admin).await;
}

/// Scenario 14: PostgreSQL goes away for 3 s under 100 clients issuing queries, then comes
/// back. Every client is served again after the restart (reconnecting if its connection was
/// cut mid-transaction), the proxy never holds more than its budget, and PostgreSQL never
/// refuses a login for lack of slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_storm_after_an_outage() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let name = "uf_storm";
    let (pg, proxy) = own_pg(
        name,
        &["max_connections = 30"],
        "auth_type = \"trust\"\npool_size = 10\nserver_login_retry = \"20s\"\nquery_wait_timeout = \"30s\"\n[budget]\nmax_server_connections = 10",
    )
    .await;
    let proxy = Arc::new(proxy);
    let leaks = own_leaks(&proxy, &pg, name).await;
    let stop = Arc::new(AtomicBool::new(false));
    let back = Arc::new(AtomicBool::new(false));
    let served_after = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for i in 0..100 {
        let (proxy, stop, back, served_after) = (
            proxy.clone(),
            stop.clone(),
            back.clone(),
            served_after.clone(),
        );
        workers.push(tokio::spawn(async move {
            let conn = proxy.conn(name, &format!("{name}-pw"), name);
            let mut client = try_connect(&conn).await.ok();
            let mut counted = false;
            for _ in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let Some(c) = &client else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    client = try_connect(&conn).await.ok();
                    continue;
                };
                let was_back = back.load(Ordering::Relaxed);
                match c.simple_query(&format!("SELECT {i}")).await {
                    Ok(_) if was_back && !counted => {
                        counted = true;
                        served_after.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) if c.is_closed() => client = None,
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    pg.stop_async("fast").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    pg.start_async().await;
    back.store(true, Ordering::Relaxed);
    let admin = pg.admin().await;
    let mut most = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    let all = loop {
        most = most.max(server_conns(&admin, name).await);
        if served_after.load(Ordering::Relaxed) == 100 {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        all,
        "{} of 100 clients served after the outage",
        served_after.load(Ordering::Relaxed)
    );
    assert!(
        most <= 10,
        "{most} server connections, over the budget of 10"
    );
    assert_eq!(
        pg.log().matches("too many clients").count(),
        0,
        "PostgreSQL refused logins"
    );
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    leaks.check_with(&admin).await;
}

/// The pooled server stops answering (a failover that drops packets) just as a client with
/// its own parameters is given it: setting them is bounded by server_connect_timeout, the
/// server is taken for lost, and the client, tried on a new server while the path is black
/// (no login retry here), gets an error within seconds instead of waiting for TCP to give
/// up. Once the path is back, it is served.
#[tokio::test]
async fn a_server_that_stops_answering_while_parameters_are_set_is_given_up() {
    let name = "uf_params_hang";
    let (proxy, fault) = behind_fault(
        name,
        "pool_size = 1\nserver_connect_timeout = \"1s\"\nserver_login_retry = \"0s\"\nquery_wait_timeout = \"30s\"",
    )
    .await;
    let plain = proxy.client(name).await;
    assert_eq!(scalar(&plain, "SELECT 1").await, "1");
    let own = connect(&format!(
        "{} options='-c TimeZone=Asia/Tokyo'",
        proxy.conn(name, &format!("{name}-pw"), name)
    ))
    .await;
    fault.stall();
    let started = std::time::Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        own.simple_query("SELECT current_setting('TimeZone')"),
    )
    .await
    .expect("an answer within 20 s");
    assert!(r.is_err(), "served through a black path: {r:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "given up after {:?}",
        started.elapsed()
    );
    fault.pass();
    let c = connect(&format!(
        "{} options='-c TimeZone=Asia/Tokyo'",
        proxy.conn(name, &format!("{name}-pw"), name)
    ))
    .await;
    assert_eq!(
        scalar(&c, "SELECT current_setting('TimeZone')").await,
        "Asia/Tokyo"
    );
}
