//! Clients misbehave (catalogue §3 B): they vanish while queued, inside a transaction, in
//! the middle of a query, a COPY or a pipeline; they never read a huge result; they log in
//! one byte at a time. Nothing they started may commit, no server may be left busy or
//! dirty, everyone else keeps being served; each test ends with the leak check.
//!
//! Covered elsewhere: a half-sent message that must not pin a server (scenario 19,
//! tests/bad_input.rs `half_a_message_then_silence_does_not_pin_the_only_server`), a killed
//! client's row locks (tests/pooling.rs `killed_client_releases_its_locks`).

mod common;
use std::time::{Duration, Instant};

use common::wire::{self, Wire};
use common::*;
use tokio::io::AsyncWriteExt;

/// A proxy whose users log in without a password, for raw clients.
async fn trust_app(name: &str, top: &str) -> Proxy {
    app(name, &format!("auth_type = \"trust\"\n{top}")).await
}

fn gauge(proxy: &Proxy, name: &str, labels: &[(&str, &str)]) -> f64 {
    common::leaks::Metrics::parse(
        &String::from_utf8(pgsluice::metrics::scrape(&proxy.shared)).unwrap(),
    )
    .sum(name, labels)
}

/// Rows in the app's table `t`, read as the superuser (not counted as the proxy's).
async fn rows(name: &str) -> i64 {
    let admin = connect(&format!(
        "host=127.0.0.1 port={} user=postgres password={} dbname={name}",
        pg().port,
        common::pg::SUPERUSER_PASSWORD
    ))
    .await;
    admin
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0)
}

/// Scenario 15: a client queued for the only server sends an INSERT and hangs up. The
/// waiting gauge drops at once, the INSERT never runs, and the next client waiting gets
/// the server.
#[tokio::test]
async fn client_gone_while_queued() {
    let name = "cf_queued";
    let proxy = trust_app(name, "pool_size = 1").await;
    let leaks = Leaks::new(&proxy, name).await;
    let setup = proxy.client(name).await;
    setup.batch_execute("CREATE TABLE t (v int)").await.unwrap();
    drop(setup);
    let holder = proxy.client(name).await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let mut quitter = Wire::connect(proxy.addr.port(), name, name).await;
    quitter
        .send(&[wire::query("INSERT INTO t VALUES (1)")])
        .await;
    let waiting = || {
        gauge(
            &proxy,
            "pgsluice_client_connections",
            &[("state", "waiting")],
        )
    };
    assert!(eventually(Duration::from_secs(3), || async { waiting() == 1.0 }).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(quitter);
    assert!(
        eventually(Duration::from_secs(1), || async { waiting() == 0.0 }).await,
        "the waiting gauge drops when the client hangs up"
    );
    // A third client queues, then gets the server.
    let third = proxy.client(name).await;
    let next = tokio::spawn(async move {
        let r = scalar(&third, "SELECT 42").await;
        (r, third)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    holder.batch_execute("COMMIT").await.unwrap();
    let (r, third) = tokio::time::timeout(Duration::from_secs(5), next)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r, "42");
    assert_eq!(
        rows(name).await,
        0,
        "the departed client's INSERT never ran"
    );
    drop((holder, third));
    leaks.check().await;
}

/// Scenario 16: a client inside a transaction (with an INSERT done) hangs up. The INSERT is
/// not committed; the server is rolled back and reused (same backend), never pooled dirty.
/// Also outside a transaction block: extended-protocol work not synced yet runs in an
/// implicit transaction that only a Sync commits (psycopg's pipeline mode in autocommit),
/// so a client that leaves before its Sync has committed nothing, as with PostgreSQL
/// itself, with or without a failed message after it. (The clean-up once sent a Sync
/// before its ROLLBACK, which committed that work.)
#[tokio::test]
async fn client_gone_mid_transaction() {
    let name = "cf_midtxn";
    let proxy = trust_app(name, "pool_size = 1").await;
    let leaks = Leaks::new(&proxy, name).await;
    let setup = proxy.client(name).await;
    setup.batch_execute("CREATE TABLE t (v int)").await.unwrap();
    let before = scalar(&setup, "SELECT pg_backend_pid()").await;
    drop(setup);
    let insert = || {
        vec![
            wire::parse("", "INSERT INTO t VALUES (2)"),
            wire::bind("", "", &[]),
            wire::execute(""),
        ]
    };
    for case in [
        "simple",
        "extended in a block",
        "extended",
        "extended, failed",
    ] {
        let mut w = Wire::connect(proxy.addr.port(), name, name).await;
        if case == "simple" {
            let (tags, _) = w
                .round(&[wire::query("BEGIN; INSERT INTO t VALUES (1)")])
                .await;
            assert!(!tags.contains('E'), "{tags}");
        } else {
            if case == "extended in a block" {
                let (tags, _) = w.round(&[wire::query("BEGIN")]).await;
                assert!(!tags.contains('E'), "{tags}");
            }
            // The last batch not even synced.
            let mut msgs = insert();
            if case == "extended, failed" {
                // The server then skips to a Sync: the clean-up must still end it.
                msgs.extend([
                    wire::parse("", "SELEC broken"),
                    wire::bind("", "", &[]),
                    wire::execute(""),
                ]);
            }
            msgs.push(wire::flush());
            w.send(&msgs).await;
            let want: &[u8] = if case == "extended, failed" {
                b"12CE"
            } else {
                b"12C"
            };
            for &tag in want {
                assert_eq!(w.recv().await.tag, tag, "{case}");
            }
        }
        drop(w);
        let c = proxy.client(name).await;
        assert_eq!(
            scalar(&c, "SELECT pg_backend_pid()").await,
            before,
            "{case}: the same server, rolled back and reused"
        );
        assert_eq!(scalar(&c, "SELECT count(*) FROM t").await, "0", "{case}");
        drop(c);
    }
    leaks.check().await;
}

/// Scenario 17: a client hangs up in the middle of a long query. Within a second the
/// backend no longer runs it (the proxy cancels it and closes that server).
#[tokio::test]
async fn client_gone_mid_query() {
    let name = "cf_midquery";
    let proxy = trust_app(name, "pool_size = 2").await;
    let leaks = Leaks::new(&proxy, name).await;
    let mut w = Wire::connect(proxy.addr.port(), name, name).await;
    w.send(&[wire::query("SELECT pg_sleep(60)")]).await;
    let admin = pg().admin().await;
    let running = || async {
        admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND query = 'SELECT pg_sleep(60)' AND state = 'active'",
                &[&name],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    assert!(eventually(Duration::from_secs(5), || async { running().await == 1 }).await);
    drop(w);
    let left = Instant::now();
    assert!(
        eventually(Duration::from_secs(1), || async { running().await == 0 }).await,
        "the query still runs {:?} after its client left",
        left.elapsed()
    );
    leaks.check().await;
}

/// Scenario 18 (and mid-COPY): fifty clients send an extended-protocol batch with no Sync
/// (some with an error inside), or start COPY FROM STDIN and send half of it, then hang up.
/// No backend is left waiting for the rest (`ClientRead`), none idle in a transaction, and
/// nothing they sent is committed.
#[tokio::test]
async fn clients_gone_mid_pipeline_and_mid_copy() {
    let name = "cf_pipeline";
    let proxy = trust_app(name, "pool_size = 5\nquery_wait_timeout = \"30s\"").await;
    let leaks = Leaks::new(&proxy, name).await;
    let setup = proxy.client(name).await;
    setup.batch_execute("CREATE TABLE t (v int)").await.unwrap();
    drop(setup);
    let mut tasks = Vec::new();
    for i in 0..50 {
        let port = proxy.addr.port();
        tasks.push(tokio::spawn(async move {
            let mut w = Wire::connect(port, name, name).await;
            match i % 3 {
                0 => {
                    w.send(&[
                        wire::parse("", "INSERT INTO t VALUES ($1::int)"),
                        wire::bind("", "", &["1"]),
                        wire::execute(""),
                    ])
                    .await
                }
                1 => {
                    w.send(&[
                        wire::parse("", "SELEC broken"),
                        wire::bind("", "", &[]),
                        wire::execute(""),
                        wire::flush(),
                    ])
                    .await;
                    assert_eq!(w.recv().await.tag, b'E');
                }
                _ => {
                    w.send(&[wire::query("COPY t FROM STDIN")]).await;
                    assert_eq!(w.recv().await.tag, b'G');
                    w.send(&[wire::tagged(b'd', b"1\n2\n")]).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(w);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(rows(name).await, 0);
    leaks.check().await;
}

/// Scenario 20: a client asks for a 500 MB result and never reads it. The proxy's memory
/// stays bounded (it stops reading the server when the client's socket is full), the other
/// clients are served by the other server meanwhile, and when the client finally goes, its
/// server is cancelled and closed. (Without a client write timeout the server stays with
/// the silent client until then: see docs/reliability.md.)
#[tokio::test]
async fn client_that_never_reads_a_huge_result() {
    let name = "cf_noread";
    pg().create_app(name).await;
    let proxy = ProxyProcess::start(&app_config(
        pg(),
        name,
        "pool_size = 2\nauth_type = \"trust\"",
    ))
    .await;
    let leaks = Leaks::new(&proxy, name).await;
    let pid = proxy.pid();
    let rss_before = common::leaks::rss_kib(pid);
    let mut w = Wire::connect(proxy.port, name, name).await;
    w.send(&[wire::query(
        "SELECT repeat('a', 1000000) FROM generate_series(1, 500)",
    )])
    .await;
    // Others are served while the big result sits unread.
    let other = proxy.client(name).await;
    for i in 0..20 {
        assert_eq!(scalar(&other, &format!("SELECT {i}")).await, i.to_string());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let grown = common::leaks::rss_kib(pid).saturating_sub(rss_before);
    assert!(
        grown < 16 * 1024,
        "the proxy grew by {grown} KiB holding an unread result"
    );
    drop(w);
    drop(other);
    leaks.check().await;
}

/// Scenario 21: 200 connections send their startup packet one byte every 100 ms
/// (slowloris), with client_login_timeout 1 s. Each is closed about a second after it was
/// accepted (the timeout runs from accept, not from the last byte); real clients log in
/// meanwhile; afterwards nothing is left over.
#[tokio::test]
async fn slowloris_at_login() {
    let name = "cf_slowloris";
    let proxy = app(
        name,
        "client_login_timeout = \"1s\"\nmax_client_conn = 1000",
    )
    .await;
    let leaks = Leaks::new(&proxy, name).await;
    let packet = wire::startup_packet(&[("user", name), ("database", name)]);
    let mut attackers = Vec::new();
    for _ in 0..200 {
        let port = proxy.addr.port();
        let packet = packet.clone();
        attackers.push(tokio::spawn(async move {
            let mut s = wire::raw_connect(port).await;
            let opened = Instant::now();
            for b in &packet {
                if s.write_all(std::slice::from_ref(b)).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                if opened.elapsed() > Duration::from_secs(4) {
                    break;
                }
            }
            // The proxy said why (login timeout, 08P01) and closed, about 1 s in.
            let mut got = None;
            if let Some(m) = wire::read_msg_within(&mut s, Duration::from_secs(5)).await {
                got = m.code();
            }
            (got, opened.elapsed())
        }));
    }
    // Real clients during the attack.
    for _ in 0..5 {
        let c = proxy.client(name).await;
        assert_eq!(scalar(&c, "SELECT 1").await, "1");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for a in attackers {
        let (code, took) = a.await.unwrap();
        assert!(
            code.is_none() || code.as_deref() == Some("08P01"),
            "{code:?}"
        );
        assert!(took < Duration::from_secs(4), "closed after {took:?}");
    }
    leaks.check().await;
}

/// Scenario 20 with query_timeout: the client that never reads its huge result is closed
/// at query_timeout (with no ErrorResponse, which would land inside a row), and its server
/// is cancelled and closed: nothing is held by the silent client any more.
#[tokio::test]
async fn client_that_never_reads_hits_query_timeout() {
    let name = "cf_noread_qt";
    let proxy = trust_app(name, "pool_size = 2\nquery_timeout = \"2s\"").await;
    let leaks = Leaks::new(&proxy, name).await;
    let mut w = Wire::connect(proxy.addr.port(), name, name).await;
    w.send(&[wire::query(
        "SELECT repeat('a', 1000000) FROM generate_series(1, 500)",
    )])
    .await;
    // The server is given up at the timeout while the client still reads nothing.
    let started = Instant::now();
    assert!(
        eventually(Duration::from_secs(10), || async {
            gauge(&proxy, "pgsluice_client_connections", &[]) == 0.0
                && gauge(&proxy, "pgsluice_server_connections", &[]) == 0.0
        })
        .await,
        "the silent client and its server are let go"
    );
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert_eq!(
        gauge(
            &proxy,
            "pgsluice_errors_total",
            &[("kind", "query_timeout")]
        ),
        1.0
    );
    drop(w);
    leaks.check().await;
}

/// Scenario 22: a client opens a transaction and goes quiet past idle_transaction_timeout.
/// It gets FATAL 25P03; its transaction is rolled back and the server reused (the same
/// backend) by the client that was waiting for it.
#[tokio::test]
async fn idle_in_transaction_hits_its_timeout() {
    let name = "cf_idle_txn";
    let proxy = trust_app(name, "pool_size = 1\nidle_transaction_timeout = \"1s\"").await;
    let leaks = Leaks::new(&proxy, name).await;
    let setup = proxy.client(name).await;
    setup.batch_execute("CREATE TABLE t (v int)").await.unwrap();
    drop(setup);
    let mut idle = Wire::connect(proxy.addr.port(), name, name).await;
    let (_, msgs) = idle
        .round(&[wire::query(
            "BEGIN; INSERT INTO t VALUES (1); SELECT pg_backend_pid()",
        )])
        .await;
    let pid = msgs
        .iter()
        .find(|m| m.tag == b'D')
        .and_then(|m| m.row()[0].clone())
        .unwrap();
    let waiter = proxy.client(name).await;
    let next = tokio::spawn(async move {
        let pid = scalar(&waiter, "SELECT pg_backend_pid()").await;
        (pid, waiter)
    });
    let started = Instant::now();
    let m = wire::read_msg_within(&mut idle.stream, Duration::from_secs(5))
        .await
        .expect("an error before the close");
    assert_eq!(m.code().as_deref(), Some("25P03"), "{m:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    wire::expect_closed(&mut idle.stream).await;
    let (next_pid, waiter) = tokio::time::timeout(Duration::from_secs(5), next)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next_pid, pid, "the server was rolled back and reused");
    assert_eq!(scalar(&waiter, "SELECT count(*) FROM t").await, "0");
    drop(waiter);
    leaks.check().await;
}

/// The kernel's view of the proxy's end of a client connection: (timer kind, jiffies to go)
/// from /proc/net/tcp's `tr:tm->when` (kind 2 is the keepalive timer).
fn proxy_side_timer(proxy_port: u16, client_port: u16) -> Option<(u32, u64)> {
    let f = common::leaks::tcp_row(proxy_port, client_port)?;
    let (tr, when) = f[5].split_once(':')?;
    Some((
        u32::from_str_radix(tr, 16).ok()?,
        u64::from_str_radix(when, 16).ok()?,
    ))
}

/// Scenario 23, case (a): a client host that vanishes without closing (no FIN) is found by
/// TCP keepalive on the client socket (tcp_keepidle, tcp_keepintvl, tcp_keepcnt). What can
/// be checked without a root-only network trick: the kernel runs the keepalive timer on the
/// proxy's end of an idle client connection, with the configured idle time, and does not
/// when `tcp_keepalive = 0`. (Case (b), inside a transaction, is idle_transaction_timeout's.)
#[tokio::test]
async fn client_sockets_run_tcp_keepalive() {
    let on = trust_app(
        "cf_keepalive",
        "tcp_keepidle = \"7s\"\ntcp_keepintvl = \"2s\"\ntcp_keepcnt = 3",
    )
    .await;
    let off = trust_app("cf_nokeepalive", "tcp_keepalive = 0").await;
    for (proxy, name, expect) in [(&on, "cf_keepalive", true), (&off, "cf_nokeepalive", false)] {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(&wire::startup_packet(&[("user", name), ("database", name)]))
            .await
            .unwrap();
        wire::read_until_ready(&mut s).await;
        s.write_all(&wire::query("SELECT 1")).await.unwrap();
        wire::read_until_ready(&mut s).await;
        let client_port = s.local_addr().unwrap().port();
        // Once the reply is acknowledged the retransmit timer (kind 1) gives way.
        let mut timer = (1, 0);
        for _ in 0..40 {
            timer = proxy_side_timer(proxy.addr.port(), client_port)
                .expect("the proxy's end of the connection in /proc/net/tcp");
            if timer.0 != 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if expect {
            assert_eq!(
                timer.0, 2,
                "keepalive timer armed on an idle client connection"
            );
            // tm->when is in jiffies (USER_HZ 100 to 1000): at most the 7 s idle time.
            assert!(timer.1 > 0 && timer.1 <= 7 * 1000, "{timer:?}");
        } else {
            assert_eq!(timer.0, 0, "no timer without keepalive: {timer:?}");
        }
    }
}

/// TCP_USER_TIMEOUT of the socket of this process whose local port is `local` and peer port
/// `peer` (zero: the kernel's default), if there is one. The proxy runs in the test's
/// process: each descriptor is copied with `pidfd_getfd` and asked.
#[cfg(target_os = "linux")]
fn own_socket_user_timeout(local: u16, peer: u16) -> Option<Duration> {
    use rustix::process::{getpid, pidfd_getfd, pidfd_open, PidfdFlags, PidfdGetfdFlags};
    let me = pidfd_open(getpid(), PidfdFlags::empty()).expect("pidfd_open");
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
        let Ok(fd) = entry.file_name().to_string_lossy().parse() else {
            continue;
        };
        if !is_socket {
            continue;
        }
        // Closed meanwhile: skipped.
        let Ok(copy) = pidfd_getfd(&me, fd, PidfdGetfdFlags::empty()) else {
            continue;
        };
        let s = socket2::SockRef::from(&copy);
        let port = |a: std::io::Result<socket2::SockAddr>| a.ok()?.as_socket().map(|a| a.port());
        if port(s.local_addr()) == Some(local) && port(s.peer_addr()) == Some(peer) {
            return Some(s.tcp_user_timeout().unwrap().unwrap_or_default());
        }
    }
    None
}

/// `tcp_user_timeout`: the proxy's end of a client's connection and of the server
/// connection it runs on carry TCP_USER_TIMEOUT, so that a peer that vanished while being
/// sent to is found in that time, not after ~15 minutes of retransmissions. Without the key,
/// the kernel's default (0).
#[cfg(target_os = "linux")]
#[tokio::test]
async fn tcp_user_timeout_is_set_on_both_legs() {
    let set = trust_app("cf_usertimeout", "tcp_user_timeout = \"9s\"").await;
    let unset = trust_app("cf_nousertimeout", "").await;
    let admin = pg().admin().await;
    for (proxy, name, expect) in [
        (&set, "cf_usertimeout", Duration::from_secs(9)),
        (&unset, "cf_nousertimeout", Duration::ZERO),
    ] {
        let mut w = Wire::connect(proxy.addr.port(), name, name).await;
        w.send(&[wire::query("BEGIN; SELECT pg_backend_pid()")])
            .await;
        let msgs = w.until_ready().await;
        let row = msgs.iter().find(|m| m.tag == b'D').expect("a row").row();
        let pid = row[0].clone().expect("a pid");
        let client_port = w.stream.local_addr().unwrap().port();
        let client_leg = own_socket_user_timeout(proxy.addr.port(), client_port);
        assert_eq!(client_leg, Some(expect), "{name}: the client's connection");
        let server_port: i32 = admin
            .query_one(
                "SELECT client_port FROM pg_stat_activity WHERE pid = $1::text::int",
                &[&pid],
            )
            .await
            .unwrap()
            .get(0);
        let server_leg = own_socket_user_timeout(server_port as u16, pg().port);
        assert_eq!(server_leg, Some(expect), "{name}: its server connection");
        w.send(&[wire::query("COMMIT")]).await;
        w.until_ready().await;
    }
}

/// A Query and Terminate in one packet: as PostgreSQL, the Query is answered before the
/// connection closes, and the server goes back to the pool clean. An extended-protocol
/// request without a Sync before Terminate gets no answer (PostgreSQL sends none either),
/// and the proxy does not wait for one.
#[tokio::test]
async fn query_and_terminate_in_one_packet_are_both_honoured() {
    let name = "cf_qx";
    let proxy = trust_app(name, "pool_size = 2").await;
    let leaks = Leaks::new(&proxy, name).await;
    let mut w = Wire::connect(proxy.addr.port(), name, name).await;
    w.send(&[wire::query("SELECT 41 + 1"), wire::tagged(b'X', b"")])
        .await;
    let msgs = w.until_ready().await;
    let tags: String = msgs.iter().map(|m| m.tag as char).collect();
    assert_eq!(tags, "TDCZ");
    assert_eq!(msgs[1].row(), [Some("42".to_string())]);
    let mut s = w.stream;
    wire::expect_closed(&mut s).await;
    // Without a Sync: nothing is owed, and the client is let go at once.
    let mut w = Wire::connect(proxy.addr.port(), name, name).await;
    w.send(&[
        wire::parse("", "SELECT 1"),
        wire::bind("", "", &[]),
        wire::execute(""),
        wire::tagged(b'X', b""),
    ])
    .await;
    let mut s = w.stream;
    let started = Instant::now();
    wire::expect_closed(&mut s).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    leaks.check().await;
}

/// libpq's PQfinish sends Terminate in the middle of a COPY FROM STDIN. PostgreSQL ends
/// the COPY with an error and rolls it back; the proxy, which does not pass Terminate on,
/// must not wait for data that will never come: the client is let go at once, the COPY is
/// rolled back, and its server is not left waiting (`ClientRead`) in the pool.
#[tokio::test]
async fn terminate_in_the_middle_of_a_copy_rolls_it_back() {
    let name = "cf_copyx";
    let proxy = trust_app(name, "pool_size = 1").await;
    let leaks = Leaks::new(&proxy, name).await;
    let setup = proxy.client(name).await;
    setup.batch_execute("CREATE TABLE t (v int)").await.unwrap();
    drop(setup);
    let mut w = Wire::connect(proxy.addr.port(), name, name).await;
    w.send(&[wire::query("COPY t FROM STDIN")]).await;
    assert_eq!(w.recv().await.tag, b'G');
    w.send(&[wire::tagged(b'd', b"1\n2\n"), wire::tagged(b'X', b"")])
        .await;
    let mut s = w.stream;
    let started = Instant::now();
    wire::expect_closed(&mut s).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    // The only server is free again for the next client.
    let c = proxy.client(name).await;
    assert_eq!(scalar(&c, "SELECT count(*) FROM t").await, "0");
    // A COPY the client did end, with Terminate in the same packet, still commits.
    let mut w = Wire::connect(proxy.addr.port(), name, name).await;
    w.send(&[wire::query("COPY t FROM STDIN")]).await;
    assert_eq!(w.recv().await.tag, b'G');
    w.send(&[
        wire::tagged(b'd', b"3\n"),
        wire::tagged(b'c', b""),
        wire::tagged(b'X', b""),
    ])
    .await;
    let tags = w.ready_tags().await;
    assert_eq!(tags, "CZ");
    let mut s = w.stream;
    wire::expect_closed(&mut s).await;
    assert_eq!(scalar(&c, "SELECT count(*) FROM t").await, "1");
    drop(c);
    leaks.check().await;
}

/// PostgreSQL ignores a CopyDone or CopyFail that comes outside a COPY. The proxy must
/// too: taken for the end of a COPY, it once stood in the queue of replies owed, so that an
/// error after it was matched to it and the replies behind it to the wrong requests, and
/// the server went back to the pool still running the client's last query, whose rows the
/// next client then read.
#[tokio::test]
async fn a_stray_copy_done_keeps_every_reply_with_its_request() {
    let name = "cf_straycopy";
    let proxy = trust_app(name, "pool_size = 1").await;
    let leaks = Leaks::new(&proxy, name).await;
    let mut w = Wire::connect(proxy.addr.port(), name, name).await;
    for stray in [wire::tagged(b'c', b""), wire::tagged(b'f', b"oops\0")] {
        w.send(&[
            wire::query("SELECT 1"),
            stray,
            wire::query("SELECT 1/0"),
            wire::query("SELECT 'mine', pg_sleep(0.3)"),
        ])
        .await;
        let first = w.ready_tags().await;
        assert_eq!(first, "TDCZ");
        let second = w.until_ready().await;
        assert_eq!(second[0].tag, b'E');
        assert_eq!(second[0].code().as_deref(), Some("22012"));
        let third = w.until_ready().await;
        let tags: String = third.iter().map(|m| m.tag as char).collect();
        assert_eq!(tags, "TDCZ");
        assert_eq!(third[1].row()[0].as_deref(), Some("mine"));
    }
    // The only server serves the next client its own rows.
    let c = proxy.client(name).await;
    assert_eq!(scalar(&c, "SELECT 'theirs'").await, "theirs");
    // A stray CopyDone between transactions, then Terminate: the client is let go.
    w.send(&[wire::tagged(b'c', b""), wire::tagged(b'X', b"")])
        .await;
    let mut s = w.stream;
    wire::expect_closed(&mut s).await;
    assert_eq!(scalar(&c, "SELECT 'still theirs'").await, "still theirs");
    drop(c);
    leaks.check().await;
}

/// A client sends `SET search_path` and Terminate in one packet: the SET runs, and the
/// client is gone before the proxy reads back what it set. That server's parameters are
/// then unknown to the proxy, so it is closed: the next client must not inherit the
/// setting.
#[tokio::test]
async fn a_setting_changed_by_a_client_that_left_is_not_inherited() {
    let name = "cf_setleave";
    let proxy = trust_app(name, "pool_size = 1").await;
    let leaks = Leaks::new(&proxy, name).await;
    let c = proxy.client(name).await;
    let default = scalar(&c, "SHOW search_path").await;
    drop(c);
    let mut w = Wire::connect(proxy.addr.port(), name, name).await;
    w.send(&[
        wire::query("SET search_path TO somewhere_else"),
        wire::tagged(b'X', b""),
    ])
    .await;
    let tags = w.ready_tags().await;
    assert_eq!(tags, "CZ");
    let mut s = w.stream;
    wire::expect_closed(&mut s).await;
    let c = proxy.client(name).await;
    assert_eq!(scalar(&c, "SHOW search_path").await, default);
    drop(c);
    leaks.check().await;
}

/// A pipeline that ends with a Flush (libpq's PQsendFlushRequest) and finds no server
/// within query_wait_timeout gets its error at once, as PostgreSQL sends an error before
/// the Sync that ends the batch: the client reads it, then sends its Sync, then gets
/// ReadyForQuery. (The error once waited for that Sync, and the client for the error.)
#[tokio::test]
async fn a_refused_pipeline_gets_its_error_before_its_sync() {
    let name = "cf_flushrefused";
    let proxy = trust_app(name, "pool_size = 1\nquery_wait_timeout = \"1s\"").await;
    let leaks = Leaks::new(&proxy, name).await;
    let holder = proxy.client(name).await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let mut w = Wire::connect(proxy.addr.port(), name, name).await;
    w.send(&[
        wire::parse("", "SELECT 1"),
        wire::bind("", "", &[]),
        wire::execute(""),
        wire::flush(),
    ])
    .await;
    let e = w.recv().await;
    assert_eq!(e.tag, b'E');
    assert_eq!(e.code().as_deref(), Some("53300"));
    // What follows up to the Sync is dropped, as after any failed message.
    w.send(&[wire::parse("", "SELECT 2"), wire::sync()]).await;
    let tags = w.ready_tags().await;
    assert_eq!(tags, "Z");
    holder.batch_execute("COMMIT").await.unwrap();
    let (tags, msgs) = w.round(&[wire::query("SELECT 3")]).await;
    assert_eq!(tags, "TDCZ");
    assert_eq!(msgs[1].row(), [Some("3".to_string())]);
    drop((w, holder));
    leaks.check().await;
}

/// Extended-protocol messages without a Sync, then a simple Query: the Query ends their
/// implicit transaction (PostgreSQL commits it with the Query), so once it is answered the
/// transaction is over and the server serves the next client, without waiting for a Sync
/// that may never come.
#[tokio::test]
async fn a_query_after_unsynced_messages_ends_the_transaction() {
    let name = "cf_unsyncedq";
    let proxy = trust_app(name, "pool_size = 1\nquery_wait_timeout = \"3s\"").await;
    let leaks = Leaks::new(&proxy, name).await;
    let mut w = Wire::connect(proxy.addr.port(), name, name).await;
    w.send(&[
        wire::parse("", "SELECT 1"),
        wire::bind("", "", &[]),
        wire::execute(""),
        wire::query("SELECT 2"),
    ])
    .await;
    let tags = w.ready_tags().await;
    assert_eq!(tags, "12DCTDCZ");
    // The only server is free for another client while this one stays connected.
    let c = proxy.client(name).await;
    assert_eq!(scalar(&c, "SELECT 'next'").await, "next");
    let (tags, _) = w.round(&[wire::query("SELECT 3")]).await;
    assert_eq!(tags, "TDCZ");
    drop((w, c));
    leaks.check().await;
}

/// A transaction that sets a parameter and also retires its server (here a DEALLOCATE ALL
/// inside a multi-statement query with a query pipelined behind it: pgsluice no longer
/// trusts its record of that server's statements): the server is closed, and the client's
/// setting follows it to its next server. (It was dropped with the server.)
#[tokio::test]
async fn a_setting_made_on_a_retired_server_follows_the_client() {
    let name = "cf_setretired";
    let proxy = trust_app(name, "pool_size = 1").await;
    let leaks = Leaks::new(&proxy, name).await;
    let mut w = Wire::connect(proxy.addr.port(), name, name).await;
    let (_, msgs) = w.round(&[wire::query("SELECT pg_backend_pid()")]).await;
    let before = msgs[1].row();
    w.send(&[
        wire::query("SET search_path TO elsewhere; DEALLOCATE ALL"),
        wire::query("SELECT 1"),
    ])
    .await;
    assert_eq!(w.ready_tags().await, "CCZ");
    assert_eq!(w.ready_tags().await, "TDCZ");
    let (_, msgs) = w.round(&[wire::query("SELECT pg_backend_pid()")]).await;
    assert_ne!(msgs[1].row(), before, "the retired server was closed");
    let (_, msgs) = w.round(&[wire::query("SHOW search_path")]).await;
    assert_eq!(msgs[1].row(), [Some("elsewhere".to_string())]);
    drop(w);
    leaks.check().await;
}
