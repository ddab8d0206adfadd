//! TLS on both sides: clients to pgsluice (SSLRequest and PostgreSQL 17's direct TLS, with
//! psql, tokio-postgres and a raw rustls client), and pgsluice to a PostgreSQL that accepts
//! only `hostssl … scram-sha-256`. Certificates are made here with rcgen.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use common::{pg::SUPERUSER_PASSWORD, Proxy, TestPostgres};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// A test certificate authority.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf certificate for `names` (DNS names or IP addresses): (cert PEM, key PEM).
    fn leaf(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "pgsluice test");
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn roots(&self) -> rustls::RootCertStore {
        use rustls::pki_types::{pem::PemObject, CertificateDer};
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(self.pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        roots
    }
}

/// A directory for a test's certificates, removed when the test drops it.
fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("pgsluice-tls-")
        .tempdir()
        .unwrap()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn client_config(ca: &Ca, alpn: bool) -> Arc<rustls::ClientConfig> {
    let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(ca.roots())
    .with_no_client_auth();
    if alpn {
        c.alpn_protocols = vec![b"postgresql".to_vec()];
    }
    Arc::new(c)
}

/// tokio-postgres over rustls, trusting `ca`, to `localhost`.
/// The connection string of app `name`'s user through the proxy on `port`, over TLS.
fn tls_conn(name: &str, port: u16) -> String {
    format!("host=localhost hostaddr=127.0.0.1 port={port} user={name} password={name}-pw dbname={name} sslmode=require")
}

async fn tls_connect(ca: &Ca, conn: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let config = (*client_config(ca, false)).clone();
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(config);
    let (client, connection) = tokio_postgres::connect(conn, tls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

fn startup(user: &str, database: &str) -> Vec<u8> {
    let mut body = 196608i32.to_be_bytes().to_vec();
    for s in ["user", user, "database", database] {
        body.extend_from_slice(s.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    packet.extend(body);
    packet
}

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Reads one message: (tag, body); `None` at end of stream.
async fn recv<S: AsyncRead + Unpin>(s: &mut S) -> Option<(u8, Vec<u8>)> {
    let mut hdr = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut hdr))
        .await
        .expect("an answer within 10 s")
        .ok()?;
    let len = i32::from_be_bytes(hdr[1..5].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len - 4];
    s.read_exact(&mut body).await.ok()?;
    Some((hdr[0], body))
}

/// Logs in as a trust user and runs `SELECT 1` over any stream.
async fn login_and_select<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, user: &str) {
    s.write_all(&startup(user, user)).await.unwrap();
    loop {
        let (tag, body) = recv(s).await.expect("login answer");
        assert_ne!(
            tag,
            b'E',
            "login failed: {}",
            String::from_utf8_lossy(&body)
        );
        if tag == b'Z' {
            break;
        }
    }
    let mut q = vec![b'Q'];
    q.extend_from_slice(&(4 + 9i32).to_be_bytes());
    q.extend_from_slice(b"SELECT 1\0");
    s.write_all(&q).await.unwrap();
    let mut tags = String::new();
    loop {
        let (tag, _) = recv(s).await.expect("query answer");
        tags.push(tag as char);
        if tag == b'Z' {
            break;
        }
    }
    assert_eq!(tags, "TDCZ");
}

/// The error message fields of an ErrorResponse body: (SQLSTATE, message).
fn error_fields(body: &[u8]) -> (String, String) {
    let (mut code, mut msg) = (String::new(), String::new());
    for field in body.split(|b| *b == 0) {
        match field.first() {
            Some(b'C') => code = String::from_utf8_lossy(&field[1..]).into(),
            Some(b'M') => msg = String::from_utf8_lossy(&field[1..]).into(),
            _ => {}
        }
    }
    (code, msg)
}

/// Proxy in front of the shared (plain) test PostgreSQL, with client TLS.
async fn client_tls_proxy(name: &str, ca: &Ca, mode: &str) -> (Proxy, tempfile::TempDir) {
    let pg = common::pg();
    pg.create_app(name).await;
    let dir = temp_dir();
    let (cert, key) = ca.leaf(&["localhost", "127.0.0.1"]);
    let cert = write(dir.path(), "server.crt", &cert);
    let key = write(dir.path(), "server.key", &key);
    write(dir.path(), "ca.crt", &ca.pem);
    let top = format!(
        "[client_tls]\nmode = \"{mode}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let mut config = common::app_config(pg, name, &top);
    config.push_str(&format!(
        "[users.{name}_trust]\nauth_type = \"trust\"\n[databases.{name}_trust]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"{name}\"\nuser = \"{name}\"\npassword = \"{name}-pw\"\n",
        pg.port
    ));
    (Proxy::start(&config).await, dir)
}

/// Runs psql off the runtime's thread (the proxy runs on it).
async fn psql(pg: &TestPostgres, conn: &str, sql: &str) -> std::process::Output {
    let mut c = std::process::Command::new(pg.client_bin("psql"));
    c.args(["-X", "-A", "-t", "-c", sql, conn])
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(std::process::Stdio::null());
    tokio::task::spawn_blocking(move || c.output().unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn clients_connect_with_tls_and_plaintext_is_refused_when_required() {
    let ca = Ca::new("client side CA");
    let (proxy, dir) = client_tls_proxy("tlsreq", &ca, "require").await;
    let port = proxy.addr.port();
    // tokio-postgres with a rustls connector that trusts only our CA and checks the name.
    let client = tls_connect(&ca, &tls_conn("tlsreq", port))
        .await
        .expect("TLS login through pgsluice");
    let n: i32 = client.query_one("SELECT 41 + 1", &[]).await.unwrap().get(0);
    assert_eq!(n, 42);
    // A big result crosses many TLS records both ways.
    let rows = client
        .query(
            "SELECT repeat('x', 1000) FROM generate_series(1, 2000)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 2000);
    let big = "y".repeat(300_000);
    let echoed: String = client
        .query_one("SELECT $1::text", &[&big])
        .await
        .unwrap()
        .get(0);
    assert_eq!(echoed, big);

    // psql, verifying the certificate chain and the name.
    let pg = common::pg();
    let out = psql(
        pg,
        &format!(
            "host=localhost port={port} user=tlsreq password=tlsreq-pw dbname=tlsreq sslmode=verify-full sslrootcert={}",
            dir.path().join("ca.crt").display()
        ),
        "SELECT 'over tls'",
    )
    .await;
    assert!(
        out.status.success(),
        "psql verify-full: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "over tls");

    // Plain TCP is refused with 28000 and a message that says what to do.
    let err = common::try_connect(&proxy.conn("tlsreq", "tlsreq-pw", "tlsreq"))
        .await
        .expect_err("plaintext must be refused");
    assert_eq!(common::code(&err), "28000");
    assert!(common::message(&err).contains("requires TLS"), "{err}");
    let out = psql(
        pg,
        &format!("host=127.0.0.1 port={port} user=tlsreq password=tlsreq-pw dbname=tlsreq sslmode=disable"),
        "SELECT 1",
    )
    .await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("requires TLS"));

    // A client that does not trust the certificate fails; the proxy keeps serving.
    let other = Ca::new("someone else");
    assert!(tls_connect(&other, &tls_conn("tlsreq", port),)
        .await
        .is_err());
    let n: i32 = client.query_one("SELECT 7", &[]).await.unwrap().get(0);
    assert_eq!(n, 7);
}

#[tokio::test]
async fn allow_mode_serves_both() {
    let ca = Ca::new("allow CA");
    let (proxy, _dir) = client_tls_proxy("tlsallow", &ca, "allow").await;
    let port = proxy.addr.port();
    let plain = proxy.client("tlsallow").await;
    let tls = tls_connect(&ca, &tls_conn("tlsallow", port)).await.unwrap();
    for c in [&plain, &tls] {
        let n: i32 = c.query_one("SELECT 3", &[]).await.unwrap().get(0);
        assert_eq!(n, 3);
    }
}

/// A long Query and a long Parse from a TLS client arrive whole: rustls hands them out a
/// record or a few at a time, into a read buffer with room for the rest of the message.
#[tokio::test]
async fn long_queries_over_tls_arrive_whole() {
    let ca = Ca::new("long CA");
    let (proxy, _dir) = client_tls_proxy("tlslong", &ca, "require").await;
    let port = proxy.addr.port();
    let tls = tls_connect(&ca, &tls_conn("tlslong", port)).await.unwrap();
    let text: String = (0..(3 << 20))
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    let answer = tls
        .simple_query(&format!("SELECT md5('{text}'), length('{text}')"))
        .await
        .unwrap();
    let row = answer
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .expect("a row");
    let md5: String = <md5::Md5 as md5::Digest>::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        row.get(0),
        Some(md5.as_str()),
        "the query text arrived intact"
    );
    assert_eq!(row.get(1), Some("3145728"));
    let n: i32 = tls
        .query_one(&format!("SELECT length('{text}') + $1::int"), &[&1])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, (3 << 20) + 1);
    let n: i32 = tls.query_one("SELECT 7", &[]).await.unwrap().get(0);
    assert_eq!(n, 7, "the session goes on");
}

/// A TLS client parks like any other (its next bytes are read through rustls by its parked
/// task) and comes back, with a statement prepared before.
#[tokio::test]
async fn a_tls_client_parks_and_comes_back() {
    let ca = Ca::new("park CA");
    let (proxy, _dir) = client_tls_proxy("tlspark", &ca, "require").await;
    let port = proxy.addr.port();
    let tls = tls_connect(&ca, &tls_conn("tlspark", port)).await.unwrap();
    let stmt = tls.prepare("SELECT $1::int * 2").await.unwrap();
    let mut last = 0;
    for round in 1..=3 {
        let parked = common::eventually(Duration::from_secs(6), || async {
            proxy.shared.clients.parked_count() == 1
        })
        .await;
        assert!(parked, "round {round}: the idle TLS client parks");
        last = tls
            .query_one(&stmt, &[&round])
            .await
            .unwrap()
            .get::<_, i32>(0);
        assert_eq!(last, round * 2);
    }
    assert_eq!(last, 6);
}

#[tokio::test]
async fn plaintext_after_ssl_request_is_rejected() {
    let ca = Ca::new("injection CA");
    let (proxy, _dir) = client_tls_proxy("tlsinject", &ca, "allow").await;
    // SSLRequest and a StartupMessage in one packet: the startup was sent before any
    // encryption, so it may have been injected (CVE-2021-23214).
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let mut both = SSL_REQUEST.to_vec();
    both.extend(startup("tlsinject_trust", "tlsinject_trust"));
    s.write_all(&both).await.unwrap();
    let (tag, body) = recv(&mut s).await.expect("an error, not 'S'");
    assert_eq!(tag, b'E');
    let (code, msg) = error_fields(&body);
    assert_eq!(code, "08P01");
    assert!(msg.contains("unencrypted data after SSL request"), "{msg}");
    assert!(recv(&mut s).await.is_none(), "the connection is closed");

    // The proxy still serves a well-behaved TLS client.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&SSL_REQUEST).await.unwrap();
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"S");
    let connector = tokio_rustls::TlsConnector::from(client_config(&ca, false));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, s).await.unwrap();
    login_and_select(&mut tls, "tlsinject_trust").await;
}

#[tokio::test]
async fn direct_tls_needs_alpn() {
    let ca = Ca::new("direct CA");
    let (proxy, _dir) = client_tls_proxy("tlsdirect", &ca, "require").await;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();

    // PostgreSQL 17 clients start with a ClientHello and ALPN "postgresql".
    let s = TcpStream::connect(proxy.addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(client_config(&ca, true));
    let mut tls = connector.connect(name.clone(), s).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"postgresql"[..]));
    login_and_select(&mut tls, "tlsdirect_trust").await;

    // Without ALPN the proxy refuses, as PostgreSQL 17 does.
    let s = TcpStream::connect(proxy.addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(client_config(&ca, false));
    let mut tls = connector.connect(name, s).await.unwrap();
    tls.write_all(&startup("tlsdirect_trust", "tlsdirect_trust"))
        .await
        .unwrap();
    let (tag, body) = recv(&mut tls).await.expect("an error");
    assert_eq!(tag, b'E');
    let (code, msg) = error_fields(&body);
    assert_eq!(code, "08P01");
    assert!(msg.contains("ALPN"), "{msg}");
}

#[tokio::test]
async fn certificates_reload_without_dropping_clients() {
    let pg = common::pg();
    pg.create_app("tlsreload").await;
    let (ca1, ca2) = (Ca::new("first CA"), Ca::new("second CA"));
    let dir = temp_dir();
    let (cert, key) = ca1.leaf(&["localhost"]);
    let cert_path = write(dir.path(), "server.crt", &cert);
    let key_path = write(dir.path(), "server.key", &key);
    let top = format!(
        "[client_tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        cert_path.display(),
        key_path.display()
    );
    let file = write(
        dir.path(),
        "pgsluice.toml",
        &common::app_config(pg, "tlsreload", &top),
    );
    let proxy = Proxy::start_file(&file).await;
    let conn = format!(
        "host=localhost hostaddr=127.0.0.1 port={} user=tlsreload password=tlsreload-pw dbname=tlsreload sslmode=require",
        proxy.addr.port()
    );
    let before = tls_connect(&ca1, &conn).await.expect("first certificate");
    assert!(tls_connect(&ca2, &conn).await.is_err());

    // A broken key file is refused and the old certificate stays in use.
    std::fs::write(&key_path, "not a key").unwrap();
    let e = pgsluice::reload::reload(&proxy.shared).expect_err("a bad key is refused");
    assert!(e.contains("client_tls.key_file"), "{e}");
    assert!(tls_connect(&ca1, &conn).await.is_ok());

    // Rotate to a certificate from the second CA.
    let (cert, key) = ca2.leaf(&["localhost"]);
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    pgsluice::reload::reload(&proxy.shared).expect("reload with the new certificate");
    let after = tls_connect(&ca2, &conn).await.expect("second certificate");
    assert!(tls_connect(&ca1, &conn).await.is_err());
    // The client from before the rotation was not dropped.
    for c in [&before, &after] {
        let n: i32 = c.query_one("SELECT 5", &[]).await.unwrap().get(0);
        assert_eq!(n, 5);
    }
}

/// A PostgreSQL with `ssl = on` that accepts TCP logins only over TLS with SCRAM; the
/// superuser also logs in over the Unix socket, to set things up.
struct TlsPostgres {
    pg: TestPostgres,
    ca: Ca,
}

static TLS_PG: OnceLock<TlsPostgres> = OnceLock::new();

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

fn tls_pg() -> &'static TlsPostgres {
    TLS_PG.get_or_init(|| {
        let ca = Ca::new("database CA");
        // The certificate goes in the cluster's own directory, which is removed when the
        // test process exits: the cluster starts, gets it, and restarts with SSL on.
        let pg = TestPostgres::start(&[]);
        let (cert, key) = ca.leaf(&["127.0.0.1", "localhost"]);
        let cert = write(&pg.dir, "db.crt", &cert);
        let key = write(&pg.dir, "db.key", &key);
        let mut perms = std::fs::metadata(&key).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o600);
        std::fs::set_permissions(&key, perms).unwrap();
        if is_root() {
            let ok = std::process::Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&cert)
                .arg(&key)
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown");
        }
        let conf = pg.dir.join("data").join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str(&format!(
            "\nssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
            cert.display(),
            key.display()
        ));
        std::fs::write(&conf, text).unwrap();
        pg.ctl_stop();
        pg.ctl_start();
        let hba = pg.dir.join("data").join("pg_hba.conf");
        std::fs::write(
            &hba,
            "local all all scram-sha-256\nhostssl all all 127.0.0.1/32 scram-sha-256\n",
        )
        .unwrap();
        TlsPostgres { pg, ca }
    })
}

impl TlsPostgres {
    /// The superuser over the Unix socket.
    async fn admin(&self) -> tokio_postgres::Client {
        common::connect(&format!(
            "host={} port={} user=postgres password={SUPERUSER_PASSWORD} dbname=postgres",
            self.pg.dir.display(),
            self.pg.port
        ))
        .await
    }

    async fn setup(&self, name: &str) {
        let admin = self.admin().await;
        admin
            .batch_execute("SELECT pg_reload_conf()")
            .await
            .unwrap();
        admin
            .batch_execute(&format!("CREATE ROLE {name} LOGIN PASSWORD '{name}-pw'"))
            .await
            .unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {name} OWNER {name}"))
            .await
            .unwrap();
    }

    /// A proxy for database `name` with the given `[server_tls]` lines.
    async fn proxy(&self, name: &str, server_tls: &str) -> Proxy {
        let top = format!("[server_tls]\n{server_tls}\n");
        Proxy::start(&common::app_config(&self.pg, name, &top)).await
    }
}

#[tokio::test]
async fn server_tls_verify_full() {
    let db = tls_pg();
    db.setup("tlsup").await;
    let dir = temp_dir();
    let ca = write(
        dir.path(),
        "rds-bundle.pem",
        &format!("{}{}", Ca::new("unrelated").pem, db.ca.pem),
    );
    let wrong_ca = write(dir.path(), "wrong.pem", &Ca::new("wrong CA").pem);

    // The right CA (in a bundle of several, as RDS ships it) and the right name.
    let proxy = db
        .proxy(
            "tlsup",
            &format!("mode = \"verify-full\"\nca_file = \"{}\"", ca.display()),
        )
        .await;
    let c = proxy.client("tlsup").await;
    let ssl: bool = c
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl, "the server connection is encrypted");
    let rows = c
        .query("SELECT repeat('z', 500) FROM generate_series(1, 5000)", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 5000);

    // The default (prefer) encrypts when the server offers TLS.
    let proxy = db.proxy("tlsup", "").await;
    let c = proxy.client("tlsup").await;
    let ssl: bool = c
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl);

    // A wrong CA fails, and says why.
    let proxy = db
        .proxy(
            "tlsup",
            &format!(
                "mode = \"verify-full\"\nca_file = \"{}\"",
                wrong_ca.display()
            ),
        )
        .await;
    let e = common::try_connect(&proxy.conn("tlsup", "tlsup-pw", "tlsup"))
        .await
        .expect_err("an unknown CA must fail");
    let m = common::message(&e);
    assert!(m.contains("TLS") && m.contains("UnknownIssuer"), "{m}");
    assert!(m.contains("server_tls.ca_file"), "{m}");

    // A wrong name fails in verify-full, passes in verify-ca.
    let wrong_name = format!(
        "ca_file = \"{}\"\nserver_name = \"db.example.com\"",
        ca.display()
    );
    let proxy = db
        .proxy("tlsup", &format!("mode = \"verify-full\"\n{wrong_name}"))
        .await;
    let e = common::try_connect(&proxy.conn("tlsup", "tlsup-pw", "tlsup"))
        .await
        .expect_err("a wrong name must fail in verify-full");
    let m = common::message(&e);
    assert!(m.contains("not valid for name"), "{m}");
    let proxy = db
        .proxy("tlsup", &format!("mode = \"verify-ca\"\n{wrong_name}"))
        .await;
    let c = proxy.client("tlsup").await;
    let n: i32 = c.query_one("SELECT 9", &[]).await.unwrap().get(0);
    assert_eq!(n, 9);

    // Without TLS the server's hostssl-only rules turn pgsluice away.
    let proxy = db.proxy("tlsup", "mode = \"disable\"").await;
    let e = common::try_connect(&proxy.conn("tlsup", "tlsup-pw", "tlsup"))
        .await
        .expect_err("plaintext to a hostssl-only server fails");
    assert_eq!(common::code(&e), "28000", "{e}");
}

#[tokio::test]
async fn server_tls_require_fails_against_a_server_without_tls() {
    let pg = common::pg();
    pg.create_app("tlsnone").await;
    let proxy = Proxy::start(&common::app_config(
        pg,
        "tlsnone",
        "[server_tls]\nmode = \"require\"\n",
    ))
    .await;
    let e = common::try_connect(&proxy.conn("tlsnone", "tlsnone-pw", "tlsnone"))
        .await
        .expect_err("require against a server without TLS");
    assert!(common::message(&e).contains("does not accept TLS"), "{e}");
}

#[test]
fn bad_tls_settings_name_the_key() {
    let cases = [
        ("[client_tls]\nmode = \"require\"\n", "client_tls.cert_file"),
        (
            "[client_tls]\ncert_file = \"/nonexistent.crt\"\nkey_file = \"/nonexistent.key\"\n",
            "client_tls.cert_file",
        ),
        (
            "[server_tls]\nmode = \"verify-full\"\n",
            "server_tls.ca_file",
        ),
        (
            "[server_tls]\nmode = \"verify-everything\"\n",
            "server_tls.mode",
        ),
    ];
    for (tls, key) in cases {
        let toml = format!("upstream = \"postgres://u:p@127.0.0.1:5432/db\"\n{tls}");
        let e = pgsluice::Config::from_toml(&toml)
            .expect_err(tls)
            .to_string();
        assert!(e.contains(key), "{tls}: {e}");
    }
}
