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
}
