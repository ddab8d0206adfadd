//! Hostile and broken clients on raw sockets: bad startup packets, stalls, bad messages after
//! login. Each gets a precise FATAL error and a closed socket; none may pin a server
//! connection, and the proxy keeps serving everyone else.
mod common;
use common::wire::*;
use common::*;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------
// Fixture and after-checks
// ---------------------------------------------------------------------------------------

/// An app whose users log in without a password, so raw sockets can log in simply.
async fn trust_app(name: &str, top: &str) -> Proxy {
    app(name, &format!("auth_type = \"trust\"\n{top}")).await
}

/// A normal client still gets served through the same proxy.
async fn assert_serves(proxy: &Proxy, name: &str) {
    let c = tokio::time::timeout(
        STEP,
        try_connect(&proxy.conn(name, &format!("{name}-pw"), name)),
    )
    .await
    .expect("login timed out")
    .unwrap_or_else(|e| panic!("a normal client cannot log in: {e}"));
    let v = tokio::time::timeout(STEP, scalar(&c, "SELECT 1"))
        .await
        .expect("SELECT 1 timed out");
    assert_eq!(v, "1");
}

/// Server sessions of `role` in a state other than plain idle.
async fn busy_server_states(admin: &tokio_postgres::Client, role: &str) -> Vec<String> {
    admin
        .query(
            "SELECT coalesce(state, '') FROM pg_stat_activity WHERE usename = $1 AND backend_type = 'client backend' \
             AND state IS DISTINCT FROM 'idle'",
            &[&role],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// No server connection of `role` is stuck active or idle in transaction.
async fn assert_no_stuck_server(role: &str) {
    let admin = pg().admin().await;
    let clean = eventually(Duration::from_secs(5), || {
        let admin = &admin;
        async move { busy_server_states(admin, role).await.is_empty() }
    })
    .await;
    assert!(
        clean,
        "server sessions of {role} not idle: {:?}",
        busy_server_states(&admin, role).await
    );
}

// ---------------------------------------------------------------------------------------
// Before login
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn garbage_instead_of_a_startup_packet() {
    let proxy = trust_app("bi_garbage", "").await;
    let mut s = raw_connect(proxy.addr.port()).await;
    s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let f = expect_fatal(&mut s, "08P01").await;
    assert!(f[&'M'].contains("invalid startup packet"), "{f:?}");

    // Eight bytes of a plausible length but a nonsense body.
    let mut s = raw_connect(proxy.addr.port()).await;
    s.write_all(&[0, 0, 0, 8, 0xde, 0xad, 0xbe, 0xef])
        .await
        .unwrap();
    let f = expect_fatal(&mut s, "08P01").await;
    assert!(f[&'M'].contains("invalid startup packet"), "{f:?}");

    // A startup packet whose parameter list is not terminated.
    let mut p = startup_packet(&[("user", "bi_garbage")]);
    p.pop();
    p[3] -= 1;
    let mut s = raw_connect(proxy.addr.port()).await;
    s.write_all(&p).await.unwrap();
    expect_fatal(&mut s, "08P01").await;

    assert_serves(&proxy, "bi_garbage").await;
    assert_no_stuck_server("bi_garbage").await;
}

#[tokio::test]
async fn bad_startup_lengths_are_08p01() {
    let proxy = trust_app("bi_startlen", "").await;
    for len in [0i32, 3, -1, 0x4000_0000] {
        let mut s = raw_connect(proxy.addr.port()).await;
        s.write_all(&len.to_be_bytes()).await.unwrap();
        let started = Instant::now();
        let f = expect_fatal(&mut s, "08P01").await;
        assert!(
            f[&'M'].contains(&format!(
                "invalid startup packet: length {len} is out of range"
            )),
            "len {len}: {f:?}"
        );
        assert!(
            started.elapsed() < CLOSE_WITHIN,
            "len {len}: answered without waiting for a body"
        );
        assert_serves(&proxy, "bi_startlen").await;
    }
    assert_no_stuck_server("bi_startlen").await;
}

#[tokio::test]
async fn half_startup_packet_times_out_with_client_login_timeout() {
    let proxy = trust_app("bi_halfstart", "client_login_timeout = \"1s\"").await;
    let packet = startup_packet(&[("user", "bi_halfstart"), ("database", "bi_halfstart")]);
    let mut s = raw_connect(proxy.addr.port()).await;
    s.write_all(&packet[..packet.len() / 2]).await.unwrap();
    let started = Instant::now();
    let m = read_msg_within(&mut s, Duration::from_secs(3))
        .await
        .expect("an error before close");
    let waited = started.elapsed();
    assert_eq!(m.tag, b'E', "{m:?}");
    let f = m.fields();
    assert_eq!(f[&'C'], "08P01", "{f:?}");
    assert_eq!(f[&'S'], "FATAL", "{f:?}");
    assert!(f[&'M'].contains("client_login_timeout"), "{f:?}");
    assert!(
        waited >= Duration::from_millis(800),
        "timed out too early: {waited:?}"
    );
    expect_closed(&mut s).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "closed after {:?}",
        started.elapsed()
    );

    // A connection that sends nothing at all is timed out the same way.
    let mut s = raw_connect(proxy.addr.port()).await;
    let m = read_msg_within(&mut s, Duration::from_secs(3))
        .await
        .expect("an error before close");
    assert!(
        m.fields()[&'M'].contains("client_login_timeout"),
        "{:?}",
        m.fields()
    );
    expect_closed(&mut s).await;

    assert_serves(&proxy, "bi_halfstart").await;
    assert_no_stuck_server("bi_halfstart").await;
}

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
const GSSENC_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];

async fn read_byte(s: &mut TcpStream) -> u8 {
    let mut b = [0u8; 1];
    tokio::time::timeout(STEP, s.read_exact(&mut b))
        .await
        .expect("no answer in time")
        .expect("read");
    b[0]
}

/// What libpq does with gssencmode=prefer and sslmode=prefer: both refused with 'N', then
/// the startup packet on the same connection.
#[tokio::test]
async fn encryption_requests_then_startup_log_in() {
    let proxy = trust_app("bi_sslok", "").await;
    let mut s = raw_connect(proxy.addr.port()).await;
    s.write_all(&GSSENC_REQUEST).await.unwrap();
    assert_eq!(read_byte(&mut s).await, b'N');
    s.write_all(&SSL_REQUEST).await.unwrap();
    assert_eq!(read_byte(&mut s).await, b'N');
    s.write_all(&startup_packet(&[
        ("user", "bi_sslok"),
        ("database", "bi_sslok"),
    ]))
    .await
    .unwrap();
    let msgs = read_until_ready(&mut s).await;
    assert_eq!(msgs[0].tag, b'R');
    s.write_all(&query("SELECT 1")).await.unwrap();
    assert!(read_until_ready(&mut s).await.iter().any(|m| m.tag == b'D'));
}

/// A client that keeps sending SSLRequests is cut off at the second, with 08P01.
#[tokio::test]
async fn endless_encryption_requests_are_cut_off_with_08p01() {
    let proxy = trust_app("bi_sslreq", "").await;
    let mut s = raw_connect(proxy.addr.port()).await;
    // All at once: the answers come back in order whatever the proxy does with the rest.
    s.write_all(&SSL_REQUEST.repeat(5)).await.unwrap();
    let mut refusals = 0;
    loop {
        match read_byte(&mut s).await {
            b'N' => {
                refusals += 1;
                assert!(
                    refusals <= 1,
                    "a repeated SSLRequest was answered 'N' again"
                );
            }
            b'E' => break,
            other => panic!("unexpected byte {other:#x}"),
        }
    }
    let mut len = [0u8; 4];
    tokio::time::timeout(STEP, s.read_exact(&mut len))
        .await
        .unwrap()
        .unwrap();
    let mut body = vec![0u8; i32::from_be_bytes(len) as usize - 4];
    tokio::time::timeout(STEP, s.read_exact(&mut body))
        .await
        .unwrap()
        .unwrap();
    let f = Msg { tag: b'E', body }.fields();
    assert_eq!(f[&'C'], "08P01", "{f:?}");
    assert!(f[&'M'].contains("duplicate encryption request"), "{f:?}");
    expect_closed(&mut s).await;
    assert_serves(&proxy, "bi_sslreq").await;
}

/// PostgreSQL answers a second SSLRequest with an error (it treats it as an unknown
/// protocol version), never with a second 'N'.
#[tokio::test]
async fn a_second_ssl_request_is_refused() {
    let proxy = trust_app("bi_ssl2", "").await;
    let mut s = raw_connect(proxy.addr.port()).await;
    s.write_all(&SSL_REQUEST).await.unwrap();
    assert_eq!(read_byte(&mut s).await, b'N');
    s.write_all(&SSL_REQUEST).await.unwrap();
    let b = read_byte(&mut s).await;
    assert_eq!(b, b'E', "second SSLRequest answered with {:?}", b as char);
}

#[tokio::test]
async fn bogus_cancel_request_is_closed_quietly() {
    let proxy = trust_app("bi_cancel", "").await;
    let mut s = raw_connect(proxy.addr.port()).await;
    let mut p = vec![0u8, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
    p.extend_from_slice(&12345i32.to_be_bytes());
    p.extend_from_slice(&(-777i32).to_be_bytes());
    s.write_all(&p).await.unwrap();
    expect_closed(&mut s).await;
    assert_serves(&proxy, "bi_cancel").await;
}

// ---------------------------------------------------------------------------------------
// After login
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn unknown_message_type_after_login_is_08p01() {
    let proxy = trust_app("bi_unknown", "").await;
    let mut s = raw_login(proxy.addr.port(), "bi_unknown").await;
    s.write_all(&[b'!', 0, 0, 0, 4]).await.unwrap();
    let f = expect_fatal(&mut s, "08P01").await;
    assert!(f[&'M'].contains("invalid frontend message type"), "{f:?}");
    assert_serves(&proxy, "bi_unknown").await;

    // The same in the middle of a transaction: the server it held is cleaned, not kept busy.
    let mut s = raw_login(proxy.addr.port(), "bi_unknown").await;
    s.write_all(&query("BEGIN; SELECT 1")).await.unwrap();
    let msgs = read_until_ready(&mut s).await;
    assert_eq!(msgs.last().unwrap().body, b"T", "in a transaction");
    s.write_all(&[b'!', 0, 0, 0, 4]).await.unwrap();
    expect_fatal(&mut s, "08P01").await;
    assert_serves(&proxy, "bi_unknown").await;
    assert_no_stuck_server("bi_unknown").await;
}

#[tokio::test]
async fn bad_message_lengths_after_login_are_08p01() {
    let proxy = trust_app("bi_msglen", "").await;
    for (tag, len) in [(b'Q', 2i32), (b'S', 0), (b'B', -1), (b'Q', 0x4000_0000)] {
        let mut s = raw_login(proxy.addr.port(), "bi_msglen").await;
        let mut m = vec![tag];
        m.extend_from_slice(&len.to_be_bytes());
        s.write_all(&m).await.unwrap();
        let f = expect_fatal(&mut s, "08P01").await;
        assert!(
            f[&'M'].contains(&format!("{len}")),
            "{:?} len {len}: {f:?}",
            tag as char
        );
        assert_serves(&proxy, "bi_msglen").await;
    }
    assert_no_stuck_server("bi_msglen").await;
}

#[tokio::test]
async fn query_over_max_query_size_is_54000_without_waiting_for_the_body() {
    let proxy = trust_app("bi_bigquery", "max_query_size = 4096").await;
    for tag in [b'Q', b'P'] {
        let mut s = raw_login(proxy.addr.port(), "bi_bigquery").await;
        let mut m = vec![tag];
        m.extend_from_slice(&(1i32 << 20).to_be_bytes());
        s.write_all(&m).await.unwrap();
        let started = Instant::now();
        let f = expect_fatal(&mut s, "54000").await;
        assert!(f[&'M'].contains("max_query_size (4096 bytes)"), "{f:?}");
        assert!(started.elapsed() < CLOSE_WITHIN);
        assert_serves(&proxy, "bi_bigquery").await;
    }
    // A query just under the limit runs.
    let mut s = raw_login(proxy.addr.port(), "bi_bigquery").await;
    let sql = format!("SELECT '{}' IS NOT NULL", "x".repeat(3000));
    s.write_all(&query(&sql)).await.unwrap();
    let msgs = read_until_ready(&mut s).await;
    assert!(msgs.iter().any(|m| m.tag == b'D'), "a row");
    assert_no_stuck_server("bi_bigquery").await;
}

#[tokio::test]
async fn half_a_message_then_silence_does_not_pin_the_only_server() {
    let proxy = trust_app("bi_stall", "pool_size = 1\nquery_wait_timeout = \"5s\"").await;
    // Half a Query.
    let mut stalled_query = raw_login(proxy.addr.port(), "bi_stall").await;
    let q = query("SELECT 'a stalled query'");
    stalled_query.write_all(&q[..q.len() - 6]).await.unwrap();
    // Half a Bind (small enough to be held whole).
    let mut stalled_bind = raw_login(proxy.addr.port(), "bi_stall").await;
    let b = tagged(b'B', &[0u8; 64]);
    stalled_bind.write_all(&b[..20]).await.unwrap();
    // Only a header of a Parse.
    let mut stalled_parse = raw_login(proxy.addr.port(), "bi_stall").await;
    stalled_parse.write_all(&[b'P', 0, 0, 0, 40]).await.unwrap();

    // The one server connection is still free for everyone else, several times over.
    let c = tokio::time::timeout(STEP, try_connect(&proxy.conn("bi_stall", "x", "bi_stall")))
        .await
        .expect("login timed out")
        .expect("login");
    for i in 0..5 {
        let v = tokio::time::timeout(STEP, scalar(&c, &format!("SELECT {i}")))
            .await
            .expect("pinned: SELECT timed out");
        assert_eq!(v, i.to_string());
    }
    let admin = pg().admin().await;
    assert!(server_conns(&admin, "bi_stall").await <= 1, "pool_size = 1");
    assert_no_stuck_server("bi_stall").await;

    // The stalled clients were not answered anything meanwhile; finishing the Query runs it.
    stalled_query.write_all(&q[q.len() - 6..]).await.unwrap();
    let msgs = read_until_ready(&mut stalled_query).await;
    let row = msgs.iter().find(|m| m.tag == b'D').expect("a row");
    assert!(row.body.ends_with(b"a stalled query"), "{row:?}");
    // The others just leave.
    drop(stalled_bind);
    drop(stalled_parse);
    assert_serves(&proxy, "bi_stall").await;
    assert_no_stuck_server("bi_stall").await;
}

/// Many hostile clients at once against one proxy; then everyone else is still served and
/// no server session of the role is left active or idle in transaction.
#[tokio::test]
async fn all_hostile_clients_at_once_leave_no_stuck_server() {
    let proxy = trust_app(
        "bi_mix",
        "pool_size = 2\nmax_query_size = 4096\nclient_login_timeout = \"2s\"",
    )
    .await;
    let addr = proxy.addr;
    let mut tasks = tokio::task::JoinSet::new();
    for round in 0..3 {
        // Bad startup lengths and garbage.
        for bytes in [
            vec![0u8, 0, 0, 0],
            (-1i32).to_be_bytes().to_vec(),
            b"\x16\x03\x01garbage".to_vec(),
        ] {
            tasks.spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                s.write_all(&bytes).await.unwrap();
                expect_fatal(&mut s, "08P01").await;
            });
        }
        // Half a startup packet: the login timeout.
        tasks.spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&startup_packet(&[("user", "bi_mix")])[..10])
                .await
                .unwrap();
            let m = read_msg_within(&mut s, Duration::from_secs(5))
                .await
                .expect("an error");
            assert!(
                m.fields()[&'M'].contains("client_login_timeout"),
                "{:?}",
                m.fields()
            );
            expect_closed(&mut s).await;
        });
        // After login: unknown type, bad length, oversized query, and a client vanishing mid-transaction.
        for (i, bad) in [
            vec![b'!', 0, 0, 0, 4],
            vec![b'Q', 0, 0, 0, 2],
            vec![b'Q', 0, 0x10, 0, 0],
        ]
        .into_iter()
        .enumerate()
        {
            tasks.spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                s.write_all(&startup_packet(&[
                    ("user", "bi_mix"),
                    ("database", "bi_mix"),
                ]))
                .await
                .unwrap();
                read_until_ready(&mut s).await;
                if round % 2 == 0 {
                    s.write_all(&query("BEGIN; SELECT 1")).await.unwrap();
                    read_until_ready(&mut s).await;
                }
                s.write_all(&bad).await.unwrap();
                expect_fatal(&mut s, if i == 2 { "54000" } else { "08P01" }).await;
            });
        }
        tasks.spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&startup_packet(&[
                ("user", "bi_mix"),
                ("database", "bi_mix"),
            ]))
            .await
            .unwrap();
            read_until_ready(&mut s).await;
            s.write_all(&query("BEGIN; SELECT 1")).await.unwrap();
            read_until_ready(&mut s).await;
            // Half a query inside the transaction, then gone.
            s.write_all(&query("SELECT 2")[..6]).await.unwrap();
        });
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Some(r) = tokio::time::timeout_at(deadline.into(), tasks.join_next())
        .await
        .expect("hostile clients took too long")
    {
        r.expect("a hostile client's expectations");
    }
    assert_serves(&proxy, "bi_mix").await;
    assert_no_stuck_server("bi_mix").await;
    let admin = pg().admin().await;
    assert!(server_conns(&admin, "bi_mix").await <= 2, "pool_size = 2");
}

/// Sync, Flush and CopyDone are a header alone: with a body each is 08P01, whether the
/// client holds a server or not, and a server it held is cleaned, not kept busy. A Parse
/// that the proxy would answer itself (a statement some server has) followed by a Sync
/// announcing a body is refused the same way (it once made the proxy read past its buffer).
#[tokio::test]
async fn sync_flush_and_copy_done_with_a_body_are_08p01() {
    let proxy = trust_app("bi_nobody", "").await;
    let port = proxy.addr.port();
    for (tag, name) in [(b'S', "Sync"), (b'H', "Flush"), (b'c', "CopyDone")] {
        let bad = tagged(tag, &[0u8; 95]);
        // No server held.
        let mut s = raw_login(port, "bi_nobody").await;
        s.write_all(&bad).await.unwrap();
        let f = expect_fatal(&mut s, "08P01").await;
        assert!(
            f[&'M'].contains(&format!("malformed {name} message")),
            "{f:?}"
        );
        // In a transaction.
        let mut s = raw_login(port, "bi_nobody").await;
        s.write_all(&query("BEGIN")).await.unwrap();
        read_until_ready(&mut s).await;
        s.write_all(&bad).await.unwrap();
        expect_fatal(&mut s, "08P01").await;
    }
    // A statement prepared once, then another client's Parse of it with a Sync that
    // announces 95 bytes of body and sends none.
    let mut s = raw_login(port, "bi_nobody").await;
    let mut m = parse("s1", "SELECT 1");
    m.extend(sync());
    s.write_all(&m).await.unwrap();
    read_until_ready(&mut s).await;
    let mut s = raw_login(port, "bi_nobody").await;
    let mut m = parse("s1", "SELECT 1");
    m.extend_from_slice(&[b'S', 0, 0, 0, 99]);
    s.write_all(&m).await.unwrap();
    let f = expect_fatal(&mut s, "08P01").await;
    assert!(f[&'M'].contains("malformed Sync message"), "{f:?}");
    assert_serves(&proxy, "bi_nobody").await;
    assert_no_stuck_server("bi_nobody").await;
}

/// COPY data with no COPY running is dropped, as PostgreSQL drops it; a long one is dropped
/// as it arrives (never buffered), and the query behind it runs.
#[tokio::test]
async fn stray_copy_data_is_dropped_and_the_next_query_runs() {
    let proxy = trust_app("bi_straycopy", "").await;
    let mut s = raw_login(proxy.addr.port(), "bi_straycopy").await;
    let body = vec![b'x'; 4 << 20];
    let mut m = tagged(b'd', &body);
    m.extend(tagged(b'f', b"never mind\0"));
    m.extend(query("SELECT 'after the stray data'"));
    s.write_all(&m).await.unwrap();
    let msgs = read_until_ready(&mut s).await;
    let row = msgs.iter().find(|m| m.tag == b'D').expect("a row");
    assert!(row.body.ends_with(b"after the stray data"), "{row:?}");
    assert_serves(&proxy, "bi_straycopy").await;
    assert_no_stuck_server("bi_straycopy").await;
}

/// Writes `before`, then `n` Closes of named statements (`s0`…`s9`), then a Sync, from a
/// task of its own (the test reads meanwhile); the task gives the writer back.
fn write_closes(
    mut w: tokio::net::tcp::OwnedWriteHalf,
    before: Vec<u8>,
    n: usize,
) -> tokio::task::JoinHandle<tokio::net::tcp::OwnedWriteHalf> {
    tokio::spawn(async move {
        let mut out = before;
        for i in 0..n {
            out.extend(close_statement(&format!("s{}", i % 10)));
        }
        out.extend(sync());
        w.write_all(&out).await.unwrap();
        w
    })
}

/// Reads `n` CloseCompletes, then ReadyForQuery(idle), each within STEP.
async fn close_completes_then_ready(reader: &mut (impl tokio::io::AsyncRead + Unpin), n: usize) {
    let mut head = [0u8; 5];
    for i in 0..n {
        tokio::time::timeout(STEP, reader.read_exact(&mut head))
            .await
            .unwrap_or_else(|_| panic!("CloseComplete {i} did not come"))
            .unwrap();
        assert_eq!(head, [b'3', 0, 0, 0, 4], "CloseComplete {i}");
    }
    let mut ready = [0u8; 6];
    tokio::time::timeout(STEP, reader.read_exact(&mut ready))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ready, [b'Z', 0, 0, 0, 5, b'I']);
}

/// Closes answered by the proxy pile up behind a slow query (their replies must wait for
/// the query's): past MAX_OWED the proxy stops reading the client instead of keeping a
/// record per Close without bound, and once the query is answered every reply follows,
/// in order, with all of them spliced in behind it.
#[tokio::test]
async fn closes_behind_a_slow_query_wait_for_it() {
    let proxy = trust_app("bi_slowcloses", "").await;
    let s = raw_login(proxy.addr.port(), "bi_slowcloses").await;
    const CLOSES: usize = 300_000; // 2.4 MB in
    let (mut r, w) = s.into_split();
    let writer = write_closes(w, query("SELECT pg_sleep(1)"), CLOSES);
    let mut reader = tokio::io::BufReader::with_capacity(64 * 1024, &mut r);
    let mut head = [0u8; 5];
    let mut body = vec![0u8; 1024];
    for want in [b'T', b'D', b'C', b'Z'] {
        tokio::time::timeout(STEP, reader.read_exact(&mut head))
            .await
            .expect("the slow query's reply")
            .unwrap();
        assert_eq!(head[0], want);
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize - 4;
        reader.read_exact(&mut body[..len]).await.unwrap();
    }
    close_completes_then_ready(&mut reader, CLOSES).await;
    writer.await.unwrap();
    assert_serves(&proxy, "bi_slowcloses").await;
    assert_no_stuck_server("bi_slowcloses").await;
}

/// A client that pipelines Closes of named statements (answered by the proxy, never sent to
/// the server) faster than it reads the CloseCompletes: past the high-water mark the proxy
/// stops reading it until it reads, and every reply arrives, in order.
#[tokio::test]
async fn unread_close_completes_pause_the_client() {
    let proxy = trust_app("bi_closes", "").await;
    let s = raw_login(proxy.addr.port(), "bi_closes").await;
    let (mut r, w) = s.into_split();
    const CLOSES: usize = 100_000; // 800 KB in, 500 KB of CloseComplete out
    let writer = write_closes(w, Vec::new(), CLOSES);
    // Replies are read only once the writer is well ahead.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut reader = tokio::io::BufReader::with_capacity(64 * 1024, &mut r);
    close_completes_then_ready(&mut reader, CLOSES).await;
    writer.await.unwrap();
    assert_serves(&proxy, "bi_closes").await;
    assert_no_stuck_server("bi_closes").await;
}
