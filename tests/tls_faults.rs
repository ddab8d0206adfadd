//! TLS edge cases (catalogue 29) against the real binary: garbage or a fatal alert where a
//! ClientHello should be, a client that leaves without close_notify, and a thousand failed
//! handshakes. Each ends in a clean close, no panic, no error-level log noise for an
//! abrupt but ordinary close, and flat memory.
//!
//! Covered elsewhere (tests/tls.rs): plaintext sent with the SSLRequest (28), TLS required
//! (30 a), direct TLS with and without ALPN (29 d), certificates reloaded.

mod common;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Sends an SSLRequest; the one-byte answer.
async fn ssl_request(port: u16) -> (TcpStream, u8) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(&SSL_REQUEST).await.unwrap();
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).await.unwrap();
    (s, answer[0])
}

/// The proxy closes the connection within 5 s (whatever it sends first, an alert say).
async fn closes(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// Catalogue 29 (a), (b), (c), (e).
#[tokio::test]
async fn tls_edge_cases() {
    let name = "tf_edges";
    let pg = pg();
    pg.create_app(name).await;
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert_file = dir.path().join("server.crt");
    let key_file = dir.path().join("server.key");
    std::fs::write(&cert_file, key.cert.pem()).unwrap();
    std::fs::write(&key_file, key.signing_key.serialize_pem()).unwrap();
    let top = format!(
        "auth_type = \"trust\"\n[client_tls]\nmode = \"allow\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        cert_file.display(),
        key_file.display()
    );
    let proxy = ProxyProcess::start(&app_config(pg, name, &top)).await;
    let leaks = Leaks::new(&proxy, name).await;
    let port = proxy.port;
    let handshake_errors = || async {
        common::leaks::metrics(&proxy)
            .await
            .sum("pgsluice_errors_total", &[("kind", "tls_handshake")])
    };
    let before = handshake_errors().await;

    // (a) Garbage instead of a ClientHello.
    let (mut s, answer) = ssl_request(port).await;
    assert_eq!(answer, b'S');
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(closes(&mut s).await, "(a) closed");
    // (c) A fatal alert (handshake_failure) instead of a ClientHello.
    let (mut s, _) = ssl_request(port).await;
    s.write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28])
        .await
        .unwrap();
    assert!(closes(&mut s).await, "(c) closed");
    assert!(
        eventually(Duration::from_secs(3), || async {
            handshake_errors().await >= before + 2.0
        })
        .await,
        "failed handshakes are counted"
    );

    // (b) A full TLS session, logged in, then the socket closed without close_notify.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(key.cert.der().clone()).unwrap();
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let (s, _) = ssl_request(port).await;
    let server_name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(server_name, s)
        .await
        .expect("handshake");
    tls.write_all(&common::wire::startup_packet(&[
        ("user", name),
        ("database", name),
    ]))
    .await
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tls.read(&mut buf).await.unwrap();
    assert!(n > 0 && buf[0] == b'R', "logged in over TLS");
    // Drop the TCP socket under the TLS session: no close_notify.
    let (tcp, _) = tls.into_inner();
    drop(tcp);

    // (e) A thousand failed handshakes: memory stays flat.
    let rss = common::leaks::rss_kib(proxy.pid());
    for round in 0..10 {
        let mut batch = Vec::new();
        for _ in 0..100 {
            batch.push(tokio::spawn(async move {
                let (mut s, _) = ssl_request(port).await;
                let _ = s
                    .write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5])
                    .await;
                closes(&mut s).await
            }));
        }
        for b in batch {
            assert!(b.await.unwrap(), "round {round}: closed");
        }
    }
    let grown = common::leaks::rss_kib(proxy.pid()).saturating_sub(rss);
    assert!(
        grown < 8 * 1024,
        "RSS grew by {grown} KiB over 1,000 failed handshakes"
    );
    // Failed handshakes and the abrupt but ordinary close of (b) are logged below
    // warning level: no noise for what any client on the internet may do.
    let log = proxy.log();
    let noisy: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ERROR") || l.contains(" WARN"))
        .collect();
    assert!(noisy.is_empty(), "warnings or errors logged: {noisy:?}");
    leaks.check().await;
}
