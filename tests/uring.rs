//! `io_uring = 1`: the binary serves client and server sockets through io_uring
//! (src/uring.rs). Run against the built binary, as a user runs it, with the same bytes
//! checked as a direct connection gets them, and the descriptors and server connections
//! counted once the clients are gone.
//!
//! The whole suite also runs with every in-process proxy on io_uring (`TEST_IO_URING=1
//! cargo test`, as `.ci/run` does); these tests run in the default pass too.
#![cfg(feature = "io-uring")]

mod common;
use std::time::Duration;

use common::leaks::fd_count;
use common::wire::{self, Wire};
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;

const TOP: &str = "worker_threads = 1\nio_uring = 1\npool_mode = \"transaction\"\npool_size = 4";

/// False (with a note) where the machine refuses io_uring: `.ci/run` sets `NO_IO_URING=1`
/// when `io_uring_setup` fails there.
fn available() -> bool {
    let off = std::env::var_os("NO_IO_URING").is_some_and(|v| v == "1");
    if off {
        eprintln!("NO_IO_URING=1: io_uring is not available here, nothing checked");
    }
    !off
}

/// Starts the binary with io_uring for app `name` and checks it is on (not fallen back).
async fn start(name: &str) -> ProxyProcess {
    start_with(name, "").await
}

/// [`start`] with more top-level configuration.
async fn start_with(name: &str, extra: &str) -> ProxyProcess {
    let pg = pg();
    pg.create_app(name).await;
    let top = if io_uring_mode() {
        // The harness adds io_uring and worker_threads itself.
        "pool_mode = \"transaction\"\npool_size = 4"
    } else {
        TOP
    };
    let top = format!("{top}\n{extra}");
    let proxy = ProxyProcess::start(&app_config(pg, name, &top)).await;
    assert!(
        proxy.log().contains("go through io_uring"),
        "io_uring is not on:\n{}",
        proxy.log()
    );
    proxy
}

/// Rows of a result that spans many reads and writes, folded into one checksum.
async fn big_result(c: &tokio_postgres::Client) -> (usize, u64) {
    let rows = c
        .query(
            "SELECT i, repeat(md5(i::text), 30) FROM generate_series(1, 20000) i",
            &[],
        )
        .await
        .unwrap();
    let mut sum = 0u64;
    for r in &rows {
        let i: i32 = r.get(0);
        let s: &str = r.get(1);
        sum = sum
            .wrapping_mul(31)
            .wrapping_add(i as u64 ^ s.bytes().map(u64::from).sum::<u64>());
    }
    (rows.len(), sum)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_results_and_copy_arrive_whole() {
    if !available() {
        return;
    }
    let proxy = start("uring_bytes").await;
    let c = proxy.client("uring_bytes").await;
    let direct = pg().admin().await;
    assert_eq!(big_result(&c).await, big_result(&direct).await);

    // COPY FROM STDIN, 1.6 MB in 16 KiB chunks, then COPY TO STDOUT of the same.
    c.batch_execute("CREATE TABLE IF NOT EXISTS copied (n int, t text); TRUNCATE copied")
        .await
        .unwrap();
    let sink = c.copy_in("COPY copied FROM STDIN").await.unwrap();
    let mut sink = std::pin::pin!(sink);
    let mut chunk = String::new();
    for n in 0..40_000 {
        chunk.push_str(&format!("{n}\t{}\n", "x".repeat(32)));
        if chunk.len() > 16 * 1024 {
            sink.send(bytes::Bytes::from(std::mem::take(&mut chunk)))
                .await
                .unwrap();
        }
    }
    sink.send(bytes::Bytes::from(chunk)).await.unwrap();
    let done = sink.finish().await;
    assert!(done.is_ok(), "{done:?}\n{}", proxy.log());
    assert_eq!(done.unwrap(), 40_000);
    let out = c.copy_out("COPY copied TO STDOUT").await;
    assert!(out.is_ok(), "{:?}\n{}", out.err(), proxy.log());
    let out = out.unwrap();
    let mut out = std::pin::pin!(out);
    let (mut lines, mut bytes) = (0usize, 0usize);
    while let Some(b) = out.next().await {
        let b = b.unwrap();
        lines += b.iter().filter(|&&x| x == b'\n').count();
        bytes += b.len();
    }
    assert_eq!(lines, 40_000);
    let want: usize = (0..40_000).map(|n: i32| n.to_string().len() + 34).sum();
    assert_eq!(bytes, want);
    c.batch_execute("DROP TABLE copied").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_share_four_servers_and_leave_nothing_behind() {
    if !available() {
        return;
    }
    let proxy = start("uring_many").await;
    // Warm: the pool is open and the listener's own descriptors are counted.
    drop(proxy.client("uring_many").await);
    let c = proxy.client("uring_many").await;
    c.batch_execute("CREATE TABLE IF NOT EXISTS hits (n int); TRUNCATE hits")
        .await
        .unwrap();
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fds_before = fd_count(proxy.pid());

    let mut tasks = Vec::new();
    for t in 0..40 {
        let conn = proxy.conn("uring_many", "uring_many-pw", "uring_many");
        tasks.push(tokio::spawn(async move {
            let c = connect(&conn).await;
            for i in 0..50 {
                c.execute("INSERT INTO hits VALUES ($1)", &[&(t * 100 + i)])
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let c = proxy.client("uring_many").await;
    assert_eq!(scalar(&c, "SELECT count(*) FROM hits").await, "2000");
    drop(c);

    // Every client's socket is closed once it left; the pool's servers stay open.
    let settled = eventually(Duration::from_secs(5), || async {
        fd_count(proxy.pid()) <= fds_before + 4
    })
    .await;
    assert!(
        settled,
        "descriptors: {} before, {} after",
        fds_before,
        fd_count(proxy.pid())
    );
    let admin = pg().admin().await;
    let servers: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'uring_many'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(servers <= 4, "{servers} server connections for a pool of 4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_mid_result_leaves_its_server_clean() {
    if !available() {
        return;
    }
    let proxy = start("uring_hangup").await;
    for _ in 0..5 {
        // A result far bigger than the socket buffers, and the client gone after its start.
        let mut w = Wire::connect_password(
            proxy.port,
            "uring_hangup",
            "uring_hangup",
            "uring_hangup-pw",
        )
        .await;
        w.send(&[wire::query(
            "SELECT repeat('x', 1000) FROM generate_series(1, 100000)",
        )])
        .await;
        let first = w.recv().await;
        assert_eq!(first.tag, b'T', "RowDescription first");
        w.stream.shutdown().await.unwrap();
        drop(w);
    }
    // The servers went back to the pool clean (or were closed): the next clients run.
    for _ in 0..8 {
        let c = proxy.client("uring_hangup").await;
        assert_eq!(scalar(&c, "SELECT 41 + 1").await, "42");
        assert_eq!(
            scalar(&c, "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND usename = 'uring_hangup'").await,
            "1",
            "only this query runs: no server still sends the abandoned result"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_client_parks_and_comes_back() {
    if !available() {
        return;
    }
    let proxy = start("uring_park").await;
    let c = proxy.client("uring_park").await;
    c.batch_execute("SET application_name = 'parked-one'")
        .await
        .unwrap();
    // Idle past the parking sweep (a second).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let m = proxy.scrape().await;
    assert!(
        m.lines()
            .any(|l| l.starts_with("pgsluice_clients_parked") && l.ends_with(" 1")),
        "one parked client:\n{m}"
    );
    assert_eq!(
        scalar(&c, "SHOW application_name").await,
        "parked-one",
        "the session came back as it was"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_message_reaches_the_clients() {
    if !available() {
        return;
    }
    let proxy = start("uring_stop").await;
    let mut w =
        Wire::connect_password(proxy.port, "uring_stop", "uring_stop", "uring_stop-pw").await;
    let (tags, _) = w.round(&[wire::query("SELECT 1")]).await;
    assert_eq!(tags, "TDCZ");
    proxy.signal("TERM");
    // An idle client is sent away with 57P01 at once: written, then the socket dropped,
    // and the bytes still reach the client.
    let m = w.recv().await;
    assert_eq!(m.tag, b'E', "an ErrorResponse before the close");
    assert_eq!(m.code().as_deref(), Some("57P01"), "{:?}", m.fields());
}

/// The inode of the proxy's end of a TCP connection (from `/proc/net/tcp`): non-zero while
/// a descriptor holds the socket, 0 once it is closed and the kernel alone finishes it.
fn proxy_side_inode(proxy_port: u16, client_port: u16) -> Option<u64> {
    common::leaks::tcp_row(proxy_port, client_port)?[9]
        .parse()
        .ok()
}

/// A client that stops reading in the middle of a big result, and is then given up on by
/// the proxy (here by query_timeout), leaves output that cannot be sent. Its socket lingers
/// to send it for up to 10 s (LINGER in src/uring.rs), then is closed: it does not hold a
/// descriptor for as long as the client keeps its end open, and others are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_after_the_linger() {
    if !available() {
        return;
    }
    let name = "uring_linger";
    let proxy = start_with(name, "query_timeout = \"1s\"").await;
    let mut w = Wire::connect_password(proxy.port, name, name, "uring_linger-pw").await;
    let client_port = w.stream.local_addr().unwrap().port();
    // About a gigabyte, far beyond the socket buffers; the client reads none of it.
    w.send(&[wire::query(
        "SELECT repeat('x', 1000) FROM generate_series(1, 1000000)",
    )])
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // query_timeout (1 s) ended the transaction: its server is no longer sending.
    let c = proxy.client(name).await;
    assert_eq!(
        scalar(&c, "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND usename = 'uring_linger'").await,
        "1",
        "only this query runs: the stalled client's was cancelled"
    );
    drop(c);
    let inode = proxy_side_inode(proxy.port, client_port);
    assert!(
        inode.is_some_and(|i| i != 0),
        "the proxy's end is still held while its output lingers: {inode:?}"
    );
    let closed = eventually(Duration::from_secs(20), || async {
        proxy_side_inode(proxy.port, client_port).is_none_or(|i| i == 0)
    })
    .await;
    assert!(closed, "the lingering socket was not closed after 10 s");
    // The client kept its end open all along.
    drop(w);
}
