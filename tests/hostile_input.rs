//! Malformed and hostile input (catalogue §3 C): nonsense and giant lengths, protocol
//! versions, bad and racing cancel requests, a cancel upstream that hangs, auth message
//! abuse, startup parameter injection, and a hostile upstream (a fake PostgreSQL). Each gets
//! the right SQLSTATE or a quiet close, never a panic; everyone else is still served; each
//! test ends with the leak check.
//!
//! Covered elsewhere: startup lengths 0, 3, -1 and 1 GB, a half startup packet, repeated
//! SSLRequests, unknown and badly sized messages after login, Query over max_query_size
//! (tests/bad_input.rs); protocol 4.0 and 3.5 negotiation, wrong SCRAM proof, unknown user
//! and database, max_client_conn (tests/auth.rs); plaintext after SSLRequest (28), TLS
//! required (30 a), direct TLS without ALPN (29 d) (tests/tls.rs).

mod common;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fake_pg::{self, FakePg};
use common::wire::{self, Wire};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The floods of this file (thousands of connections, megabyte messages, process RSS
/// checks) take turns: run side by side in one test process they starve one another of the
/// two CPUs and add to one another's RSS, and a 10 s reply deadline or an RSS bound then
/// fails for a reason that is not the proxy's.
static FLOODS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn trust_app(name: &str, top: &str) -> Proxy {
    app(name, &format!("auth_type = \"trust\"\n{top}")).await
}

fn metrics(proxy: &Proxy) -> common::leaks::Metrics {
    common::leaks::Metrics::parse(
        &String::from_utf8(pgsluice::metrics::scrape(&proxy.shared)).unwrap(),
    )
}

fn errors_total(proxy: &Proxy, kind: &str) -> f64 {
    metrics(proxy).sum("pgsluice_errors_total", &[("kind", kind)])
}

/// Writes raw bytes on a new connection and expects FATAL `code` and the close.
async fn fatal_for(
    port: u16,
    bytes: &[u8],
    code: &str,
) -> std::collections::BTreeMap<char, String> {
    let mut s = wire::raw_connect(port).await;
    s.write_all(bytes).await.unwrap();
    wire::expect_fatal(&mut s, code).await
}

/// Scenarios 24 and 25: startup lengths that make no sense, and giant declared lengths
/// with 8 bytes sent: each is refused at once with 08P01 (counted as bad_startup), with no
/// wait for a body that will never come and no allocation of its size.
#[tokio::test]
async fn nonsense_and_giant_startup_lengths() {
    let _turn = FLOODS.lock().await;
    let name = "hi_lengths";
    let proxy = trust_app(name, "").await;
    let leaks = Leaks::new(&proxy, name).await;
    let before = errors_total(&proxy, "bad_startup");
    let lengths: [u32; 6] = [4, 7, 0x8000_0000, 0xFFFF_FFFF, 0x7FFF_FFFF, 0x4000_0000];
    for len in lengths {
        let mut bytes = len.to_be_bytes().to_vec();
        bytes.extend_from_slice(&196_608u32.to_be_bytes());
        let started = Instant::now();
        let f = fatal_for(proxy.addr.port(), &bytes, "08P01").await;
        assert!(f[&'M'].contains("length"), "{len:#x}: {f:?}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{len:#x}: waited"
        );
    }
    assert_eq!(
        errors_total(&proxy, "bad_startup"),
        before + lengths.len() as f64
    );
    leaks.check().await;
}

/// Scenario 25 at scale: 1,000 connections at once each declare a 1 GB startup packet and
/// hold their socket. The proxy (a child process, so its RSS is its own) refuses every one
/// and its memory stays flat.
#[tokio::test]
async fn a_thousand_giant_startup_declarations_keep_memory_flat() {
    let _turn = FLOODS.lock().await;
    let name = "hi_giant";
    pg().create_app(name).await;
    let proxy = ProxyProcess::start(&app_config(pg(), name, "max_client_conn = 2000")).await;
    let leaks = Leaks::new(&proxy, name).await;
    let rss = common::leaks::rss_kib(proxy.pid());
    let mut socks = Vec::new();
    for _ in 0..1000 {
        let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
        let mut b = 0x4000_0000u32.to_be_bytes().to_vec();
        b.extend_from_slice(&196_608u32.to_be_bytes());
        s.write_all(&b).await.unwrap();
        socks.push(s);
    }
    for s in &mut socks {
        let m = wire::read_msg_within(s, Duration::from_secs(10)).await;
        assert_eq!(m.and_then(|m| m.code()).as_deref(), Some("08P01"));
    }
    let grown = common::leaks::rss_kib(proxy.pid()).saturating_sub(rss);
    assert!(grown < 16 * 1024, "RSS grew by {grown} KiB");
    drop(socks);
    leaks.check().await;
}

/// Scenario 26: a valid startup packet of 9,999 bytes logs in; 10,001 bytes is refused
/// with 08P01 (PostgreSQL's own limit is 10,000).
#[tokio::test]
async fn startup_size_boundary() {
    let name = "hi_boundary";
    let proxy = trust_app(name, "").await;
    let leaks = Leaks::new(&proxy, name).await;
    let sized = |total: usize| {
        let base =
            wire::startup_packet(&[("user", name), ("database", name), ("application_name", "")]);
        let pad = "a".repeat(total - base.len());
        let p = wire::startup_packet(&[
            ("user", name),
            ("database", name),
            ("application_name", &pad),
        ]);
        assert_eq!(p.len(), total);
        p
    };
    let mut s = wire::raw_connect(proxy.addr.port()).await;
    s.write_all(&sized(9_999)).await.unwrap();
    let msgs = wire::read_until_ready(&mut s).await;
    assert_eq!(msgs.last().unwrap().tag, b'Z');
    drop(s);
    fatal_for(proxy.addr.port(), &sized(10_001), "08P01").await;
    leaks.check().await;
}

/// Scenario 27: protocol 2.0 is refused with 0A000; 3.2 and 3.99 (with an unknown `_pq_.`
/// option) are negotiated down to 3.0 with NegotiateProtocolVersion naming the option,
/// and the session then works with a 4-byte cancel key.
#[tokio::test]
async fn protocol_versions() {
    let name = "hi_versions";
    let proxy = trust_app(name, "").await;
    let leaks = Leaks::new(&proxy, name).await;
    let v2 = wire::startup_packet_version(2, 0, &[("user", name), ("database", name)]);
    fatal_for(proxy.addr.port(), &v2, "0A000").await;
    for minor in [2u16, 99] {
        let mut s = wire::raw_connect(proxy.addr.port()).await;
        s.write_all(&wire::startup_packet_version(
            3,
            minor,
            &[("user", name), ("database", name), ("_pq_.foo", "1")],
        ))
        .await
        .unwrap();
        let msgs = wire::read_until_ready(&mut s).await;
        let v = msgs
            .iter()
            .find(|m| m.tag == b'v')
            .expect("NegotiateProtocolVersion");
        assert_eq!(&v.body[..4], &0i32.to_be_bytes(), "newest minor: 0");
        assert_eq!(&v.body[4..8], &1i32.to_be_bytes(), "one option unknown");
        assert_eq!(&v.body[8..], b"_pq_.foo\0");
        let k = msgs.iter().find(|m| m.tag == b'K').expect("BackendKeyData");
        assert_eq!(k.body.len(), 8, "3.0: a 4-byte key");
        s.write_all(&wire::query("SELECT 1")).await.unwrap();
        let r = wire::read_until_ready(&mut s).await;
        assert!(r.iter().any(|m| m.tag == b'D'));
    }
    leaks.check().await;
}

/// A CancelRequest packet.
fn cancel_packet(pid: i32, secret: i32) -> Vec<u8> {
    let mut b = 16i32.to_be_bytes().to_vec();
    b.extend_from_slice(&80_877_102i32.to_be_bytes());
    b.extend_from_slice(&pid.to_be_bytes());
    b.extend_from_slice(&secret.to_be_bytes());
    b
}

/// Sends a cancel packet on its own connection; true when the proxy closed it without a
/// byte of reply (as PostgreSQL does).
async fn send_cancel(port: u16, packet: &[u8]) -> bool {
    let mut s = wire::raw_connect(port).await;
    if s.write_all(packet).await.is_err() {
        return true;
    }
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// The client's cancel key from its login messages.
fn key_of(login: &[wire::Msg]) -> (i32, i32) {
    let k = login
        .iter()
        .find(|m| m.tag == b'K')
        .expect("BackendKeyData");
    (
        i32::from_be_bytes(k.body[..4].try_into().unwrap()),
        i32::from_be_bytes(k.body[4..8].try_into().unwrap()),
    )
}

/// A raw client logged in (trust), with its cancel key.
async fn login_with_key(port: u16, name: &str) -> (Wire, (i32, i32)) {
    let mut s = wire::raw_connect(port).await;
    s.write_all(&wire::startup_packet(&[("user", name), ("database", name)]))
        .await
        .unwrap();
    let msgs = wire::read_until_ready(&mut s).await;
    (Wire { stream: s }, key_of(&msgs))
}

/// Scenario 31: the right pid with a wrong secret does not cancel a running query and gets
/// no reply; 2,000 random keys open no upstream connection and leave the proxy responsive;
/// a cancel packet of the wrong size is closed; the right key for an idle client is
/// dropped, never forwarded.
#[tokio::test]
async fn bad_cancel_requests() {
    let _turn = FLOODS.lock().await;
    let name = "hi_badcancel";
    pg().create_app(name).await;
    // The database behind a forwarder that counts connections: a forwarded cancel is one.
    let fault = Fault::start(("127.0.0.1", pg().port)).await;
    let proxy = Proxy::start(&app_config_at(
        fault.port(),
        name,
        "auth_type = \"trust\"\npool_size = 2",
    ))
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
    let port = proxy.addr.port();
    let (mut busy, (pid, secret)) = login_with_key(port, name).await;
    let (mut idle, idle_key) = login_with_key(port, name).await;
    busy.send(&[wire::query("SELECT pg_sleep(1.5)")]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let upstream = fault.accepted();
    // (a) The right pid, a wrong secret.
    assert!(send_cancel(port, &cancel_packet(pid, secret.wrapping_add(1))).await);
    // (b) Random keys, many.
    let mut floods = Vec::new();
    for i in 0..2000i32 {
        floods.push(tokio::spawn(async move {
            send_cancel(port, &cancel_packet(i.wrapping_mul(7919), i)).await
        }));
    }
    for f in floods {
        assert!(f.await.unwrap(), "no reply to a bad cancel");
    }
    // (c) Wrong sizes: closed, the declared size never read.
    for len in [12i32, 20, 300] {
        let mut b = len.to_be_bytes().to_vec();
        b.extend_from_slice(&80_877_102i32.to_be_bytes());
        b.resize(len as usize, 0);
        let mut s = wire::raw_connect(port).await;
        s.write_all(&b).await.unwrap();
        let mut buf = [0u8; 256];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        assert!(r.is_ok(), "len {len}: the proxy waited for the rest");
    }
    // (d) The right key of a client with no query running.
    assert!(send_cancel(port, &cancel_packet(idle_key.0, idle_key.1)).await);
    // The query ran to its end, untouched; no cancel went upstream.
    let msgs = busy.until_ready().await;
    assert!(msgs.iter().all(|m| m.tag != b'E'), "{msgs:?}");
    assert_eq!(
        fault.accepted(),
        upstream,
        "a bad cancel reached the server"
    );
    let (tags, _) = idle.round(&[wire::query("SELECT 1")]).await;
    assert_eq!(tags, "TDCZ");
    drop((busy, idle));
    leaks.check().await;
}

/// Scenario 32: with one server, client A runs a long query and B queues behind it; 100
/// cancels for A are fired at once. A gets 57014; B's query completes normally; every time
/// (PgBouncer #717, PgDog #1505: a late cancel must never hit the next client).
#[tokio::test]
async fn cancel_race_never_hits_the_next_client() {
    let name = "hi_cancelrace";
    let proxy = trust_app(name, "pool_size = 1").await;
    let leaks = Leaks::new(&proxy, name).await;
    let port = proxy.addr.port();
    for round in 0..10 {
        let (mut a, (pid, secret)) = login_with_key(port, name).await;
        let (mut b, _) = login_with_key(port, name).await;
        a.send(&[wire::query("SELECT pg_sleep(30)")]).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        b.send(&[wire::query("SELECT pg_sleep(0.3), 'b'")]).await;
        let mut cancels = Vec::new();
        for _ in 0..100 {
            cancels.push(tokio::spawn(async move {
                send_cancel(port, &cancel_packet(pid, secret)).await
            }));
        }
        let a_msgs = a.until_ready().await;
        let code = a_msgs.iter().find(|m| m.tag == b'E').and_then(|m| m.code());
        assert_eq!(code.as_deref(), Some("57014"), "round {round}");
        let b_msgs = b.until_ready().await;
        assert!(
            b_msgs.iter().all(|m| m.tag != b'E'),
            "round {round}: B was hit: {b_msgs:?}"
        );
        assert!(b_msgs.iter().any(|m| m.tag == b'D'));
        for c in cancels {
            c.await.unwrap();
        }
    }
    leaks.check().await;
}

/// App `name` (trust, `pool_size`) behind a forwarder that takes cancel requests and
/// never answers or closes them (Odyssey's cancel-leak evil proxy).
async fn behind_hanging_cancels(name: &str, pool_size: u32) -> (Fault, Proxy) {
    pg().create_app(name).await;
    let fault = Fault::start(("127.0.0.1", pg().port)).await;
    fault.set_accept(common::fault::Accept::HangCancel);
    let proxy = Proxy::start(&app_config_at(
        fault.port(),
        name,
        &format!("auth_type = \"trust\"\npool_size = {pool_size}"),
    ))
    .await;
    (fault, proxy)
}

/// Scenario 33: cancels forwarded upstream reach something that never answers and never
/// closes (Odyssey's cancel-leak). Each is abandoned after a bounded wait and its socket
/// closed; meanwhile logins and queries go on.
#[tokio::test]
async fn cancels_to_a_hanging_upstream_are_abandoned() {
    let name = "hi_cancelhang";
    let (fault, proxy) = behind_hanging_cancels(name, 2).await;
    let leaks = Leaks::with(
        &proxy,
        &[name],
        fault.port(),
        name,
        name,
        &format!("{name}-pw"),
    )
    .await;
    let port = proxy.addr.port();
    let (mut a, (pid, secret)) = login_with_key(port, name).await;
    a.send(&[wire::query("SELECT pg_sleep(1)")]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut cancels = Vec::new();
    for _ in 0..50 {
        cancels.push(tokio::spawn(async move {
            send_cancel(port, &cancel_packet(pid, secret)).await
        }));
    }
    // Logins and queries are served meanwhile.
    for i in 0..5 {
        let c = proxy.client(name).await;
        assert_eq!(scalar(&c, &format!("SELECT {i}")).await, i.to_string());
    }
    let msgs = a.until_ready().await;
    assert!(
        msgs.iter().all(|m| m.tag != b'E'),
        "the hanging cancel did nothing"
    );
    for c in cancels {
        c.await.unwrap();
    }
    // Every hanging cancel connection is given up and closed.
    assert!(
        eventually(Duration::from_secs(15), || async { fault.open() <= 2 }).await,
        "{} connections still open to the upstream",
        fault.open()
    );
    // Given up, they are no longer in flight: the client's servers are not taken for ones
    // a late cancel could still hit (each would be closed after its transaction).
    let mut pids = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let (tags, msgs) = a.round(&[wire::query("SELECT pg_backend_pid()")]).await;
        assert_eq!(tags, "TDCZ", "{msgs:?}");
        pids.insert(msgs.iter().find(|m| m.tag == b'D').unwrap().row());
    }
    assert_eq!(pids.len(), 1, "one server, reused: {pids:?}");
    drop(a);
    leaks.check().await;
}

/// Scenario 33 b: a cancel given up (the upstream took it and never answered) while its
/// query still runs may yet be acted on by a slow postmaster, so its server is closed after
/// the transaction instead of going back to the pool, where the late cancel could hit
/// another client's query.
#[tokio::test]
async fn a_server_whose_cancel_was_given_up_is_not_reused() {
    let name = "hi_cancelgone";
    let (_fault, proxy) = behind_hanging_cancels(name, 1).await;
    let port = proxy.addr.port();
    let (mut a, (pid, secret)) = login_with_key(port, name).await;
    let backend = |msgs: &[wire::Msg]| msgs.iter().find(|m| m.tag == b'D').unwrap().row();
    let (_, msgs) = a.round(&[wire::query("SELECT pg_backend_pid()")]).await;
    let first = backend(&msgs);
    // The cancel is given up after 5 s; the query runs 7 s.
    a.send(&[wire::query("SELECT pg_sleep(7)")]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cancel = tokio::spawn(async move { send_cancel(port, &cancel_packet(pid, secret)).await });
    let msgs = a.until_ready().await;
    assert!(
        msgs.iter().all(|m| m.tag != b'E'),
        "the hanging cancel did nothing: {msgs:?}"
    );
    cancel.await.unwrap();
    let (_, msgs) = a.round(&[wire::query("SELECT pg_backend_pid()")]).await;
    assert_ne!(
        backend(&msgs),
        first,
        "the server a late cancel could still hit was reused"
    );
    // Once: the next transaction keeps its server.
    let second = backend(&msgs);
    let (_, msgs) = a.round(&[wire::query("SELECT pg_backend_pid()")]).await;
    assert_eq!(backend(&msgs), second);
}

/// Scenario 34: authentication message abuse. A password message before the startup
/// packet, SASL messages with a negative or oversized inner length, over 64 KiB, or naming
/// an unknown mechanism: 08P01 and close. A 100 KB user name: 08P01. A database name that
/// is not UTF-8: refused, no crash. A wrong password, an unknown user and an unknown
/// database give the same 28P01 and add no metric series for the names tried.
#[tokio::test]
async fn auth_message_abuse() {
    let name = "hi_authabuse";
    let proxy = app(name, "").await;
    let leaks = Leaks::new(&proxy, name).await;
    let port = proxy.addr.port();
    // (a) A PasswordMessage first.
    fatal_for(port, &wire::tagged(b'p', b"secret\0"), "08P01").await;
    // (b)-(d) SASL abuse after the startup packet.
    let mut bad_inner = b"SCRAM-SHA-256\0".to_vec();
    bad_inner.extend_from_slice(&(-5i32).to_be_bytes());
    bad_inner.extend_from_slice(b"n,,n=,r=abc");
    let mut huge_inner = b"SCRAM-SHA-256\0".to_vec();
    huge_inner.extend_from_slice(&0x7fff_0000i32.to_be_bytes());
    huge_inner.extend_from_slice(b"n,,n=,r=abc");
    let mut unknown = b"SCRAM-SHA-1\0".to_vec();
    unknown.extend_from_slice(&11i32.to_be_bytes());
    unknown.extend_from_slice(b"n,,n=,r=abc");
    let mut oversized = vec![b'p'];
    oversized.extend_from_slice(&(70_000i32 + 4).to_be_bytes());
    oversized.extend(vec![b'x'; 70_000]);
    for (what, bytes) in [
        ("negative inner length", wire::tagged(b'p', &bad_inner)),
        ("inner length past the end", wire::tagged(b'p', &huge_inner)),
        ("unknown mechanism", wire::tagged(b'p', &unknown)),
        ("over 64 KiB", oversized),
    ] {
        let mut s = wire::raw_connect(port).await;
        s.write_all(&wire::startup_packet(&[("user", name), ("database", name)]))
            .await
            .unwrap();
        let m = wire::expect_msg(&mut s).await;
        assert_eq!(m.tag, b'R', "{what}: SASL offered");
        let _ = s.write_all(&bytes).await;
        let m = wire::expect_msg(&mut s).await;
        assert_eq!(m.tag, b'E', "{what}");
        let code = m.code().unwrap();
        assert_eq!(code, "08P01", "{what}");
        wire::expect_closed(&mut s).await;
    }
    // (f) A 100 KB user name; a database name that is not UTF-8.
    let long = "u".repeat(100_000);
    let mut s = wire::raw_connect(port).await;
    let _ = s
        .write_all(&wire::startup_packet(&[
            ("user", &long),
            ("database", name),
        ]))
        .await;
    let m = wire::read_msg_within(&mut s, wire::STEP).await;
    if let Some(m) = m {
        assert_eq!(m.code().as_deref(), Some("08P01"));
    }
    let mut bad_db = wire::startup_packet(&[("user", name), ("database", "dbXX")]);
    let at = bad_db.len() - 4;
    bad_db[at] = 0xff;
    bad_db[at + 1] = 0xfe;
    let mut s = wire::raw_connect(port).await;
    s.write_all(&bad_db).await.unwrap();
    // Whatever comes (an error, or the SASL exchange a valid name would get), the proxy
    // stays up: the leak check at the end finds no panic.
    let _ = wire::read_msg_within(&mut s, wire::STEP).await;
    drop(s);
    // (g) Wrong password, unknown user, unknown database: the same answer.
    let mut answers = Vec::new();
    for (user, db, password) in [
        (name, name, "wrong"),
        ("hi_nobody", name, "wrong"),
        (name, "hi_nodb", "wrong"),
    ] {
        let e = try_connect(&proxy.conn(user, password, db))
            .await
            .expect_err("refused");
        answers.push((code(&e), message(&e).replace(user, "USER")));
    }
    assert_eq!(answers[0].0, "28P01");
    assert!(
        answers.iter().all(|a| *a == answers[0]),
        "the answers tell the cases apart: {answers:?}"
    );
    let text = String::from_utf8(pgsluice::metrics::scrape(&proxy.shared)).unwrap();
    assert!(
        !text.contains("hi_nobody") && !text.contains("hi_nodb"),
        "unknown names became metric labels"
    );
    leaks.check().await;
}

/// Scenario 35 (the rest of it): a backend-only message type from a client is 08P01.
#[tokio::test]
async fn backend_message_from_a_client_is_08p01() {
    let name = "hi_backendmsg";
    let proxy = trust_app(name, "").await;
    let leaks = Leaks::new(&proxy, name).await;
    for tag in [b'Z', b'T', b'K'] {
        let mut s = wire::raw_login(proxy.addr.port(), name).await;
        s.write_all(&wire::tagged(tag, b"I")).await.unwrap();
        wire::expect_fatal(&mut s, "08P01").await;
    }
    leaks.check().await;
}

/// Scenario 36 (CVE-2025-12819): a client's startup parameters cannot reach the proxy's own
/// queries or other clients' sessions. A `search_path` naming a schema that shadows the
/// functions the proxy calls does not hijack them (they are schema-qualified); role and
/// session_authorization cannot be set by startup parameter or options.
#[tokio::test]
async fn startup_parameter_injection() {
    let name = "hi_inject";
    let proxy = trust_app(name, "pool_size = 1").await;
    let leaks = Leaks::new(&proxy, name).await;
    let owner = proxy.client(name).await;
    owner
        .batch_execute(
            "CREATE TABLE hijacked (what text);
             CREATE SCHEMA evil;
             CREATE FUNCTION evil.set_config(text, text, boolean) RETURNS text
               LANGUAGE sql AS $$ INSERT INTO public.hijacked VALUES ('set_config') RETURNING 'x' $$;
             CREATE FUNCTION evil.current_setting(text, boolean) RETURNS text
               LANGUAGE sql AS $$ INSERT INTO public.hijacked VALUES ('current_setting') RETURNING 'x' $$;",
        )
        .await
        .unwrap();
    drop(owner);
    let port = proxy.addr.port();
    // search_path as a startup parameter and inside options.
    for params in [
        vec![
            ("user", name),
            ("database", name),
            ("search_path", "evil, pg_catalog, public"),
        ],
        vec![
            ("user", name),
            ("database", name),
            ("options", "-c search_path=evil,pg_catalog,public"),
        ],
    ] {
        let mut s = wire::raw_connect(port).await;
        s.write_all(&wire::startup_packet(&params)).await.unwrap();
        wire::read_until_ready(&mut s).await;
        // The proxy applies the parameter (set_config) and reads session state back
        // (current_setting) around the client's SET.
        s.write_all(&wire::query("SET application_name = 'x'; SELECT 1"))
            .await
            .unwrap();
        let r = wire::read_until_ready(&mut s).await;
        assert!(r.iter().all(|m| m.tag != b'E'), "{r:?}");
        let mut w = Wire { stream: s };
        let (_, msgs) = w.round(&[wire::query("SHOW search_path")]).await;
        let shown = msgs.iter().find(|m| m.tag == b'D').unwrap().row()[0].clone();
        assert_eq!(
            shown.map(|s| s.replace(' ', "")).as_deref(),
            Some("evil,pg_catalog,public")
        );
    }
    let c = proxy.client(name).await;
    assert_eq!(
        scalar(&c, "SELECT count(*) FROM public.hijacked").await,
        "0",
        "the proxy's own calls were hijacked"
    );
    assert_eq!(
        scalar(&c, "SHOW search_path").await,
        "\"$user\", public",
        "another client's search_path leaked"
    );
    drop(c);
    // Role changes by startup parameter: refused.
    for params in [
        vec![("user", name), ("database", name), ("role", "postgres")],
        vec![
            ("user", name),
            ("database", name),
            ("session_authorization", "postgres"),
        ],
        vec![
            ("user", name),
            ("database", name),
            ("options", "-c session_authorization=postgres"),
        ],
        vec![
            ("user", name),
            ("database", name),
            ("options", "-c role=postgres"),
        ],
    ] {
        fatal_for(port, &wire::startup_packet(&params), "08P01").await;
    }
    leaks.check().await;
}

/// A proxy in front of a fake server; its users log in without a password, so the first
/// client's login opens a server (and gets that server's failure as a FATAL).
async fn fake_upstream(name: &str, fake: &FakePg, top: &str) -> Proxy {
    // Without TLS unless `top` asks for it: the scripts read a StartupMessage first.
    let tls = if top.contains("[server_tls]") {
        ""
    } else {
        "[server_tls]\nmode = \"disable\""
    };
    Proxy::start(&format!(
        "auth_type = \"trust\"\nserver_login_retry = \"0s\"\nserver_connect_timeout = \"3s\"\nquery_wait_timeout = \"3s\"\n{top}\n{tls}\n[budget]\nmax_server_connections = 5\n[databases.{name}]\nhost = \"127.0.0.1\"\nport = {}\npassword = \"pw\"\n[users.{name}]\npassword = \"x\"\n",
        fake.port
    ))
    .await
}

/// Logs in through the proxy; the FATAL's (code, message), or None if the login worked.
async fn login_error(proxy: &Proxy, name: &str) -> Option<(String, String)> {
    let mut s = wire::raw_connect(proxy.addr.port()).await;
    s.write_all(&wire::startup_packet(&[("user", name), ("database", name)]))
        .await
        .unwrap();
    loop {
        let m = wire::read_msg_within(&mut s, Duration::from_secs(15)).await?;
        match m.tag {
            b'E' => {
                let f = m.fields();
                return Some((
                    f.get(&'C').cloned().unwrap_or_default(),
                    f.get(&'M').cloned().unwrap_or_default(),
                ));
            }
            b'Z' => return None,
            _ => {}
        }
    }
}

/// The SCRAM client-first's nonce (`r=`), from a SASLInitialResponse body.
fn client_nonce(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    text.split("r=")
        .nth(1)
        .unwrap_or("")
        .trim_end_matches('\0')
        .to_owned()
}

/// Scenario 37: a hostile upstream. Its errors without a SQLSTATE, its oversized or forged
/// SCRAM messages, its odd answers to SSLRequest, an overlong BackendKeyData, a 2 MB
/// ParameterStatus or an endless stream of them, and a login that skips AuthenticationOk
/// or asks for the password in clear after SCRAM began all end that server's login with an
/// error for the client (no crash, bounded memory, no plaintext fallback); what an
/// unauthenticated server said before TLS is never shown to the client.
#[tokio::test]
async fn hostile_upstream() {
    let _turn = FLOODS.lock().await;
    let name = "hi_hostile";
    // What happens, extra top-level configuration, the words the client's error must hold
    // (so that a case failing for another reason, such as TLS, is seen), the server.
    type Case = (&'static str, &'static str, &'static str, fake_pg::Script);
    fn case<F, Fut>(f: F) -> fake_pg::Script
    where
        F: Fn(common::fake_pg::FakeConn) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        Arc::new(move |c| Box::pin(f(c)))
    }
    let scram_first = |server_first: fn(&str) -> String| {
        case(move |mut c| async move {
            c.read_startup().await;
            c.send(&fake_pg::auth(10, b"SCRAM-SHA-256\0\0")).await;
            let Some((_, body)) = c.read_message().await else {
                return;
            };
            let nonce = client_nonce(&body);
            c.send(&fake_pg::auth(11, server_first(&nonce).as_bytes()))
                .await;
            if let Some((_, _final)) = c.read_message().await {
                c.send(&fake_pg::auth(
                    12,
                    b"v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
                ))
                .await;
                c.send(&fake_pg::login_ok()[9..]).await;
            }
            c.hold().await;
        })
    };
    let cases: Vec<Case> = vec![
        (
            "(a) ErrorResponse without a SQLSTATE",
            "",
            "no code here",
            case(|mut c| async move {
                c.read_startup().await;
                c.send(&fake_pg::error(&[(b'S', "FATAL"), (b'M', "no code here")]))
                    .await;
            }),
        ),
        (
            "(b) SCRAM server-first with a 1 MB nonce",
            "",
            "over the limit of 1048576 bytes",
            scram_first(|nonce| format!("r={nonce}{},s=c2FsdA==,i=4096", "x".repeat(1 << 20))),
        ),
        (
            "(b) SCRAM nonce not extending ours",
            "",
            "nonce does not extend",
            scram_first(|_| "r=someoneelsesnonce,s=c2FsdA==,i=4096".to_owned()),
        ),
        (
            "(b) SCRAM server signature forged",
            "",
            "SCRAM signature is wrong",
            scram_first(|nonce| format!("r={nonce}srv,s=c2FsdA==,i=4096")),
        ),
        (
            "(c) ErrorResponse instead of S/N to SSLRequest",
            "[server_tls]\nmode = \"require\"",
            "unexpected answer 'E' to SSLRequest",
            case(|mut c| async move {
                c.read_startup().await;
                c.send(&fake_pg::error(&[
                    (b'S', "FATAL"),
                    (b'C', "XX000"),
                    (b'M', "UPSTREAM-SECRET-TEXT"),
                ]))
                .await;
            }),
        ),
        (
            "(d) N to SSLRequest when TLS is required",
            "[server_tls]\nmode = \"require\"",
            "does not accept TLS",
            case(|mut c| async move {
                c.read_startup().await;
                c.send(b"N").await;
                c.hold().await;
            }),
        ),
        (
            "(f) bytes after S before the TLS handshake",
            "[server_tls]\nmode = \"require\"",
            "handshake failed",
            case(|mut c| async move {
                c.read_startup().await;
                let mut b = b"S".to_vec();
                b.extend(fake_pg::login_ok());
                c.send(&b).await;
                c.hold().await;
            }),
        ),
        (
            "(i) SCRAM begun, then ReadyForQuery without AuthenticationOk",
            "",
            "before AuthenticationOk",
            case(|mut c| async move {
                c.read_startup().await;
                c.send(&fake_pg::auth(10, b"SCRAM-SHA-256\0\0")).await;
                if c.read_message().await.is_some() {
                    c.send(&fake_pg::login_ok()[9..]).await;
                }
                c.serve_queries().await;
            }),
        ),
        (
            "(j) SCRAM begun, then a request for the password in clear",
            "",
            "code 3 out of turn",
            case(|mut c| async move {
                c.read_startup().await;
                c.send(&fake_pg::auth(10, b"SCRAM-SHA-256\0\0")).await;
                if c.read_message().await.is_some() {
                    c.send(&fake_pg::auth(3, b"")).await;
                    if c.read_message().await.is_some() {
                        c.send(&fake_pg::login_ok()).await;
                    }
                }
                c.serve_queries().await;
            }),
        ),
        (
            "(k) ReadyForQuery with no authentication at all",
            "",
            "before AuthenticationOk",
            case(|mut c| async move {
                c.read_startup().await;
                c.send(&fake_pg::login_ok()[9..]).await;
                c.serve_queries().await;
            }),
        ),
        (
            "(l) ParameterStatus without end during the login",
            "",
            "more than 256 parameters",
            case(|mut c| async move {
                c.read_startup().await;
                c.send(&fake_pg::auth_ok()).await;
                let status = fake_pg::parameter_status("p", &vec![b'x'; 60_000]);
                // Bounded: the proxy gives up long before (1 MB, 256 messages).
                for _ in 0..2_000 {
                    if c.try_send(&status).await.is_err() {
                        return;
                    }
                }
                c.hold().await;
            }),
        ),
        (
            "(g) BackendKeyData with a 300-byte key under 3.0",
            "",
            "BackendKeyData of 304 bytes",
            case(|mut c| async move {
                c.read_startup().await;
                let mut b = fake_pg::auth_ok();
                b.extend(fake_pg::backend_key(&[7u8; 304]));
                b.extend(fake_pg::ready(b'I'));
                c.send(&b).await;
                c.hold().await;
            }),
        ),
        (
            "(h) a 2 MB ParameterStatus",
            "",
            "over the limit of 1048576 bytes",
            case(|mut c| async move {
                c.read_startup().await;
                let mut b = fake_pg::auth_ok();
                b.extend(fake_pg::parameter_status("huge", &vec![b'x'; 2 << 20]));
                b.extend(fake_pg::ready(b'I'));
                c.send(&b).await;
                c.hold().await;
            }),
        ),
    ];
    for (what, top, expected, script) in cases {
        let fake = {
            let script = script.clone();
            FakePg::start(move |c| script(c)).await
        };
        let proxy = fake_upstream(name, &fake, top).await;
        let started = Instant::now();
        let err = login_error(&proxy, name).await;
        let (code, msg) = err.unwrap_or_else(|| panic!("{what}: the login succeeded"));
        assert!(msg.contains(expected), "{what}: {code} {msg}");
        assert!(!code.is_empty(), "{what}: no SQLSTATE for the client");
        assert!(
            ["08006", "08001", "08P01", "XX000"].contains(&code.as_str()),
            "{what}: {code} {msg}"
        );
        assert!(
            !msg.contains("UPSTREAM-SECRET-TEXT"),
            "{what}: relayed {msg}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{what}: took {:?}",
            started.elapsed()
        );
        assert!(fake.accepted() >= 1, "{what}");
        // Nothing is left over: no server counted, no client, no login in progress, no
        // socket stuck, no panic.
        let leaks = Leaks::with(&proxy, &["hi_hostile_none"], fake.port, name, name, "x").await;
        let admin = pg().admin().await;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let problems = leaks.problems(&admin).await;
            if problems.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "{what}: {problems:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
