//! Authentication outcomes through the proxy against a real PostgreSQL: SCRAM, md5, trust,
//! stored verifiers, unknown users and databases, `max_client_conn`, startup parameters and
//! protocol versions (the last on raw sockets).
mod common;
use common::*;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::NoTls;

/// Upper bound for any single network step in these tests.
const STEP: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Raw-socket helpers
// ---------------------------------------------------------------------------------------

/// A StartupMessage for protocol `major.minor` with the given parameters.
fn startup_packet(major: u16, minor: u16, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = ((u32::from(major) << 16) | u32::from(minor))
        .to_be_bytes()
        .to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    packet.extend(body);
    packet
}

/// One backend message.
#[derive(Debug)]
struct Msg {
    tag: u8,
    body: Vec<u8>,
}

impl Msg {
    /// Fields of an ErrorResponse / NoticeResponse by field code.
    fn fields(&self) -> BTreeMap<char, String> {
        let mut out = BTreeMap::new();
        let mut rest = &self.body[..];
        while let Some((&code, tail)) = rest.split_first() {
            if code == 0 {
                break;
            }
            let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
            out.insert(
                code as char,
                String::from_utf8_lossy(&tail[..end]).into_owned(),
            );
            rest = tail.get(end + 1..).unwrap_or(&[]);
        }
        out
    }

    /// The authentication request code of an 'R' message.
    fn auth_code(&self) -> i32 {
        assert_eq!(self.tag, b'R', "not an authentication message: {self:?}");
        i32::from_be_bytes(self.body[..4].try_into().unwrap())
    }
}

async fn raw_connect(proxy: &Proxy) -> TcpStream {
    tokio::time::timeout(STEP, TcpStream::connect(proxy.addr))
        .await
        .expect("connect timed out")
        .expect("connect")
}

/// Reads one backend message (tag, length, body) within `STEP`; `None` at end of stream.
async fn read_msg(s: &mut TcpStream) -> Option<Msg> {
    tokio::time::timeout(STEP, async {
        let mut tag = [0u8; 1];
        match s.read_exact(&mut tag).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
            Err(e) => panic!("read: {e}"),
        }
        let mut len = [0u8; 4];
        s.read_exact(&mut len).await.expect("message length");
        let len = i32::from_be_bytes(len);
        assert!(
            (4..=1 << 20).contains(&len),
            "implausible backend message length {len} (tag {:?})",
            tag[0] as char
        );
        let mut body = vec![0u8; len as usize - 4];
        s.read_exact(&mut body).await.expect("message body");
        Some(Msg { tag: tag[0], body })
    })
    .await
    .expect("no backend message within the time limit")
}

async fn expect_msg(s: &mut TcpStream) -> Msg {
    read_msg(s)
        .await
        .expect("connection closed, expected a message")
}

/// The proxy closes the connection (EOF or reset) without sending anything more.
async fn expect_closed(s: &mut TcpStream) {
    let mut buf = [0u8; 256];
    match tokio::time::timeout(STEP, s.read(&mut buf)).await {
        Err(_) => panic!("connection still open after {STEP:?}"),
        Ok(Ok(0)) => {}
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Ok(Ok(n)) => panic!("unexpected bytes before close: {:?}", &buf[..n]),
        Ok(Err(e)) => panic!("read: {e}"),
    }
}

/// Reads an ErrorResponse and then end of stream; returns the error's fields.
async fn expect_fatal(s: &mut TcpStream, sqlstate: &str) -> BTreeMap<char, String> {
    let m = expect_msg(s).await;
    assert_eq!(m.tag, b'E', "expected ErrorResponse, got {m:?}");
    let f = m.fields();
    assert_eq!(f.get(&'C').map(String::as_str), Some(sqlstate), "{f:?}");
    assert_eq!(f.get(&'S').map(String::as_str), Some("FATAL"), "{f:?}");
    expect_closed(s).await;
    f
}

/// Reads messages up to ReadyForQuery (bounded), failing on an ErrorResponse.
async fn read_until_ready(s: &mut TcpStream) -> Vec<Msg> {
    let mut out = Vec::new();
    for _ in 0..200 {
        let m = expect_msg(s).await;
        assert_ne!(m.tag, b'E', "error during login: {:?}", m.fields());
        let done = m.tag == b'Z';
        out.push(m);
        if done {
            return out;
        }
    }
    panic!("no ReadyForQuery within 200 messages");
}

// ---------------------------------------------------------------------------------------
// Client helpers
// ---------------------------------------------------------------------------------------

async fn connect_with(
    cfg: &tokio_postgres::Config,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio::time::timeout(STEP, cfg.connect(NoTls))
        .await
        .expect("login timed out")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

async fn login(conn: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    tokio::time::timeout(STEP, try_connect(conn))
        .await
        .expect("login timed out")
}

async fn login_err(conn: &str) -> tokio_postgres::Error {
    match login(conn).await {
        Ok(_) => panic!("login as {conn} should fail"),
        Err(e) => e,
    }
}

/// The proxy still serves `name` with its right password.
async fn assert_serves(proxy: &Proxy, name: &str) {
    let c = login(&proxy.conn(name, &format!("{name}-pw"), name))
        .await
        .unwrap_or_else(|e| panic!("{name} cannot log in: {e}"));
    assert_eq!(
        tokio::time::timeout(STEP, scalar(&c, "SELECT 1"))
            .await
            .expect("SELECT 1 timed out"),
        "1"
    );
}

async fn current_user(c: &tokio_postgres::Client) -> String {
    tokio::time::timeout(STEP, scalar(c, "SELECT current_user"))
        .await
        .expect("query timed out")
}

// ---------------------------------------------------------------------------------------
// Password methods
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn scram_login_ok() {
    let proxy = app("au_scram", "").await;
    // The method offered is SCRAM-SHA-256.
    let mut s = raw_connect(&proxy).await;
    s.write_all(&startup_packet(
        3,
        0,
        &[("user", "au_scram"), ("database", "au_scram")],
    ))
    .await
    .unwrap();
    let m = expect_msg(&mut s).await;
    assert_eq!(m.auth_code(), 10, "AuthenticationSASL");
    assert!(m.body.windows(13).any(|w| w == b"SCRAM-SHA-256"), "{m:?}");
    drop(s);

    let c = login(&proxy.conn("au_scram", "au_scram-pw", "au_scram"))
        .await
        .unwrap();
    assert_eq!(current_user(&c).await, "au_scram");
    assert_eq!(scalar(&c, "SELECT current_database()").await, "au_scram");
}

#[tokio::test]
async fn scram_wrong_password_is_28p01() {
    let proxy = app("au_wrongpw", "").await;
    let e = login_err(&proxy.conn("au_wrongpw", "not-the-password", "au_wrongpw")).await;
    assert_eq!(code(&e), "28P01", "{e}");
    assert_eq!(
        message(&e),
        "password authentication failed for user \"au_wrongpw\""
    );
    assert_serves(&proxy, "au_wrongpw").await;
}

#[tokio::test]
async fn unknown_user_goes_through_a_mock_scram_exchange_and_gets_28p01() {
    let proxy = app("au_known", "").await;
    // The first answer is the same SASL request a known user gets.
    let mut s = raw_connect(&proxy).await;
    s.write_all(&startup_packet(
        3,
        0,
        &[("user", "au_nobody"), ("database", "au_known")],
    ))
    .await
    .unwrap();
    let m = expect_msg(&mut s).await;
    assert_eq!(
        m.auth_code(),
        10,
        "AuthenticationSASL for an unknown user too"
    );
    drop(s);

    let e = login_err(&proxy.conn("au_nobody", "whatever", "au_known")).await;
    assert_eq!(code(&e), "28P01", "{e}");
    assert_eq!(
        message(&e),
        "password authentication failed for user \"au_nobody\""
    );
    // Even with a password that is right for another user.
    let e = login_err(&proxy.conn("au_nobody", "au_known-pw", "au_known")).await;
    assert_eq!(code(&e), "28P01", "{e}");
    assert_serves(&proxy, "au_known").await;
}

#[tokio::test]
async fn unknown_database_is_3d000() {
    let proxy = app("au_nodb", "").await;
    let e = login_err(&proxy.conn("au_nodb", "au_nodb-pw", "au_no_such_db")).await;
    assert_eq!(code(&e), "3D000", "{e}");
    assert!(
        message(&e).contains("au_no_such_db") && message(&e).contains("does not exist"),
        "{}",
        message(&e)
    );
    assert_serves(&proxy, "au_nodb").await;
}

#[tokio::test]
async fn startup_without_user_is_28000() {
    let proxy = app("au_nouser", "").await;
    let mut s = raw_connect(&proxy).await;
    s.write_all(&startup_packet(3, 0, &[("database", "au_nouser")]))
        .await
        .unwrap();
    let f = expect_fatal(&mut s, "28000").await;
    assert!(f[&'M'].contains("no PostgreSQL user name"), "{f:?}");
    assert_serves(&proxy, "au_nouser").await;
}

#[tokio::test]
async fn md5_user_ok_and_wrong_password_is_28p01() {
    let pg = pg();
    pg.create_app("au_md5").await;
    let proxy = Proxy::start(&format!(
        "{}auth_type = \"md5\"\n",
        app_config(pg, "au_md5", "")
    ))
    .await;
    // The proxy asks for md5 (AuthenticationMD5Password, code 5), not SCRAM.
    let mut s = raw_connect(&proxy).await;
    s.write_all(&startup_packet(
        3,
        0,
        &[("user", "au_md5"), ("database", "au_md5")],
    ))
    .await
    .unwrap();
    let m = expect_msg(&mut s).await;
    assert_eq!(m.auth_code(), 5, "AuthenticationMD5Password");
    assert_eq!(m.body.len(), 8, "code + 4-byte salt");
    drop(s);

    let c = login(&proxy.conn("au_md5", "au_md5-pw", "au_md5"))
        .await
        .unwrap();
    assert_eq!(current_user(&c).await, "au_md5");
    let e = login_err(&proxy.conn("au_md5", "wrong", "au_md5")).await;
    assert_eq!(code(&e), "28P01", "{e}");
    assert_eq!(
        message(&e),
        "password authentication failed for user \"au_md5\""
    );
    assert_serves(&proxy, "au_md5").await;
}

#[tokio::test]
async fn md5_hash_in_config_logs_in() {
    let pg = pg();
    pg.create_app("au_md5hash").await;
    let hash = postgres_protocol::password::md5(b"au_md5hash-pw", "au_md5hash");
    assert!(hash.starts_with("md5") && hash.len() == 35);
    // A hash cannot log in upstream: the database gets the plain password.
    let toml = format!(
        "[budget]\nmax_server_connections = 80\n[databases.au_md5hash]\nhost = \"127.0.0.1\"\nport = {}\npassword = \"au_md5hash-pw\"\n[users.au_md5hash]\nauth_type = \"md5\"\npassword = \"{hash}\"\n",
        pg.port
    );
    let proxy = Proxy::start(&toml).await;
    let c = login(&proxy.conn("au_md5hash", "au_md5hash-pw", "au_md5hash"))
        .await
        .unwrap();
    assert_eq!(current_user(&c).await, "au_md5hash");
    let e = login_err(&proxy.conn("au_md5hash", "nope", "au_md5hash")).await;
    assert_eq!(code(&e), "28P01", "{e}");
}

#[tokio::test]
async fn trust_user_logs_in_with_any_password() {
    let pg = pg();
    pg.create_app("au_trust").await;
    // The config password is still what the proxy uses to log in upstream.
    let proxy = Proxy::start(&format!(
        "{}auth_type = \"trust\"\n",
        app_config(pg, "au_trust", "")
    ))
    .await;
    // No password request at all: AuthenticationOk straight away.
    let mut s = raw_connect(&proxy).await;
    s.write_all(&startup_packet(
        3,
        0,
        &[("user", "au_trust"), ("database", "au_trust")],
    ))
    .await
    .unwrap();
    let msgs = read_until_ready(&mut s).await;
    assert_eq!(msgs[0].auth_code(), 0, "AuthenticationOk first");
    assert!(msgs.iter().any(|m| m.tag == b'K'), "BackendKeyData");
    drop(s);

    for pw in ["au_trust-pw", "anything-at-all", ""] {
        let conn = format!(
            "host=127.0.0.1 port={} user=au_trust password='{pw}' dbname=au_trust",
            proxy.addr.port()
        );
        let c = login(&conn)
            .await
            .unwrap_or_else(|e| panic!("password {pw:?}: {e}"));
        assert_eq!(current_user(&c).await, "au_trust");
    }
    let conn = format!(
        "host=127.0.0.1 port={} user=au_trust dbname=au_trust",
        proxy.addr.port()
    );
    let c = login(&conn).await.unwrap();
    assert_eq!(current_user(&c).await, "au_trust");
}

#[tokio::test]
async fn scram_verifier_in_config_logs_in() {
    let pg = pg();
    pg.create_app("au_verifier").await;
    let verifier = postgres_protocol::password::scram_sha_256(b"au_verifier-pw");
    assert!(verifier.starts_with("SCRAM-SHA-256$"));
    // A verifier cannot log in upstream: the database gets the plain password.
    let toml = format!(
        "[budget]\nmax_server_connections = 80\n[databases.au_verifier]\nhost = \"127.0.0.1\"\nport = {}\npassword = \"au_verifier-pw\"\n[users.au_verifier]\npassword = \"{verifier}\"\n",
        pg.port
    );
    let proxy = Proxy::start(&toml).await;
    let c = login(&proxy.conn("au_verifier", "au_verifier-pw", "au_verifier"))
        .await
        .unwrap();
    assert_eq!(current_user(&c).await, "au_verifier");
    let e = login_err(&proxy.conn("au_verifier", "au_verifier-pw2", "au_verifier")).await;
    assert_eq!(code(&e), "28P01", "{e}");
    // The verifier string itself is not a password.
    let e = login_err(&proxy.conn("au_verifier", &verifier, "au_verifier")).await;
    assert_eq!(code(&e), "28P01", "{e}");
    assert_serves(&proxy, "au_verifier").await;
}

// ---------------------------------------------------------------------------------------
// max_client_conn
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn max_client_conn_refuses_the_third_client_with_53300() {
    let proxy = app("au_maxconn", "max_client_conn = 2").await;
    let conn = proxy.conn("au_maxconn", "au_maxconn-pw", "au_maxconn");
    let first = login(&conn).await.unwrap();
    let second = login(&conn).await.unwrap();

    let e = login_err(&conn).await;
    assert_eq!(code(&e), "53300", "{e}");
    assert!(
        message(&e).contains("max_client_conn = 2"),
        "{}",
        message(&e)
    );
    // A raw client is turned away the same way, without having to send anything.
    let mut s = raw_connect(&proxy).await;
    let f = expect_fatal(&mut s, "53300").await;
    assert!(f[&'M'].contains("no more connections allowed"), "{f:?}");

    // The two admitted clients are unaffected.
    assert_eq!(scalar(&first, "SELECT 1").await, "1");
    assert_eq!(scalar(&second, "SELECT 2").await, "2");

    // When one leaves, its slot is free again.
    drop(second);
    let deadline = Instant::now() + STEP;
    let third = loop {
        match login(&conn).await {
            Ok(c) => break c,
            Err(e) => {
                assert_eq!(code(&e), "53300", "{e}");
                assert!(
                    Instant::now() < deadline,
                    "a slot did not free up after a client left"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(scalar(&third, "SELECT 3").await, "3");
    assert_eq!(scalar(&first, "SELECT 4").await, "4");
}

// ---------------------------------------------------------------------------------------
// Startup parameters
// ---------------------------------------------------------------------------------------

fn config_with_options(proxy: &Proxy, name: &str, options: &str) -> tokio_postgres::Config {
    let mut cfg: tokio_postgres::Config = proxy
        .conn(name, &format!("{name}-pw"), name)
        .parse()
        .unwrap();
    cfg.options(options);
    cfg
}

#[tokio::test]
async fn unsupported_parameter_in_options_is_08p01() {
    let proxy = app("au_opt_bad", "").await;
    let e = connect_with(&config_with_options(&proxy, "au_opt_bad", "-c geqo=off"))
        .await
        .unwrap_err();
    assert_eq!(code(&e), "08P01", "{e}");
    assert_eq!(
        message(&e),
        "unsupported startup parameter in options: geqo"
    );
    let db = e.as_db_error().unwrap();
    assert_eq!(db.severity(), "FATAL");
    // Options that are not settings at all.
    let e = connect_with(&config_with_options(&proxy, "au_opt_bad", "-d 5"))
        .await
        .unwrap_err();
    assert_eq!(code(&e), "08P01", "{e}");
    assert!(message(&e).contains("options"), "{}", message(&e));
    // Tracked parameters are fine in options.
    let c = connect_with(&config_with_options(
        &proxy,
        "au_opt_bad",
        "-c statement_timeout=1234",
    ))
    .await
    .unwrap();
    assert_eq!(scalar(&c, "SHOW statement_timeout").await, "1234ms");
    assert_serves(&proxy, "au_opt_bad").await;
}

#[tokio::test]
async fn track_extra_parameters_applies_them_per_client() {
    let proxy = app(
        "au_opt_track",
        "track_extra_parameters = [\"geqo\"]\npool_size = 1",
    )
    .await;
    let c = connect_with(&config_with_options(&proxy, "au_opt_track", "-c geqo=off"))
        .await
        .unwrap();
    assert_eq!(scalar(&c, "SHOW geqo").await, "off");
    // Another client on the same (single) server connection does not inherit it.
    let other = proxy.client("au_opt_track").await;
    assert_eq!(scalar(&other, "SHOW geqo").await, "on");
    assert_eq!(scalar(&c, "SHOW geqo").await, "off");
    // The long form works too.
    let c2 = connect_with(&config_with_options(&proxy, "au_opt_track", "--geqo=off"))
        .await
        .unwrap();
    assert_eq!(scalar(&c2, "SHOW geqo").await, "off");
}

#[tokio::test]
async fn ignore_startup_parameters_accepts_and_drops_them() {
    let proxy = app(
        "au_opt_ignore",
        "ignore_startup_parameters = [\"geqo\", \"x_custom_param\"]",
    )
    .await;
    let c = connect_with(&config_with_options(&proxy, "au_opt_ignore", "-c geqo=off"))
        .await
        .unwrap();
    assert_eq!(
        scalar(&c, "SHOW geqo").await,
        "on",
        "an ignored parameter is dropped, not applied"
    );

    // As a top-level startup parameter: login proceeds to the password request.
    let mut s = raw_connect(&proxy).await;
    s.write_all(&startup_packet(
        3,
        0,
        &[
            ("user", "au_opt_ignore"),
            ("database", "au_opt_ignore"),
            ("x_custom_param", "1"),
        ],
    ))
    .await
    .unwrap();
    assert_eq!(expect_msg(&mut s).await.auth_code(), 10);
    assert_serves(&proxy, "au_opt_ignore").await;
}

#[tokio::test]
async fn unknown_top_level_startup_parameter_is_08p01() {
    let proxy = app("au_param_bad", "").await;
    let mut s = raw_connect(&proxy).await;
    s.write_all(&startup_packet(
        3,
        0,
        &[
            ("user", "au_param_bad"),
            ("database", "au_param_bad"),
            ("x_custom_param", "1"),
        ],
    ))
    .await
    .unwrap();
    let f = expect_fatal(&mut s, "08P01").await;
    assert_eq!(f[&'M'], "unsupported startup parameter: x_custom_param");
    assert!(
        f.get(&'H')
            .is_some_and(|h| h.contains("ignore_startup_parameters")),
        "{f:?}"
    );

    // replication connections are refused.
    let mut s = raw_connect(&proxy).await;
    s.write_all(&startup_packet(
        3,
        0,
        &[("user", "au_param_bad"), ("replication", "database")],
    ))
    .await
    .unwrap();
    let f = expect_fatal(&mut s, "08P01").await;
    assert!(f[&'M'].contains("replication"), "{f:?}");
    assert_serves(&proxy, "au_param_bad").await;
}

// ---------------------------------------------------------------------------------------
// Protocol versions
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn protocol_4_0_is_0a000() {
    let proxy = app("au_proto4", "").await;
    let mut s = raw_connect(&proxy).await;
    s.write_all(&startup_packet(
        4,
        0,
        &[("user", "au_proto4"), ("database", "au_proto4")],
    ))
    .await
    .unwrap();
    let f = expect_fatal(&mut s, "0A000").await;
    assert!(
        f[&'M'].contains("unsupported frontend protocol 4.0"),
        "{f:?}"
    );
    // Protocol 2.0 likewise.
    let mut s = raw_connect(&proxy).await;
    s.write_all(&startup_packet(
        2,
        0,
        &[("user", "au_proto4"), ("database", "au_proto4")],
    ))
    .await
    .unwrap();
    expect_fatal(&mut s, "0A000").await;
    assert_serves(&proxy, "au_proto4").await;
}

/// Parses a NegotiateProtocolVersion body: newest minor version and the unsupported options.
fn negotiate_body(m: &Msg) -> (i32, Vec<String>) {
    assert_eq!(m.tag, b'v', "expected NegotiateProtocolVersion, got {m:?}");
    let minor = i32::from_be_bytes(m.body[..4].try_into().unwrap());
    let n = i32::from_be_bytes(m.body[4..8].try_into().unwrap());
    let names: Vec<String> = m.body[8..]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    assert_eq!(names.len(), n as usize, "option count matches: {m:?}");
    (minor, names)
}

/// PostgreSQL answers a newer minor version with NegotiateProtocolVersion right after the
/// startup packet, before authentication starts.
#[tokio::test]
async fn protocol_3_5_negotiates_before_the_auth_request() {
    let proxy = app("au_proto35", "").await;
    let mut s = raw_connect(&proxy).await;
    s.write_all(&startup_packet(
        3,
        5,
        &[("user", "au_proto35"), ("database", "au_proto35")],
    ))
    .await
    .unwrap();
    let first = expect_msg(&mut s).await;
    assert_eq!(
        first.tag, b'v',
        "NegotiateProtocolVersion first, got tag {:?}",
        first.tag as char
    );
    let (minor, options) = negotiate_body(&first);
    assert_eq!((minor, options.len()), (0, 0));
    let second = expect_msg(&mut s).await;
    assert_eq!(second.auth_code(), 10, "then the SASL request");
}

/// With no password exchange (trust) the order is right, and the message is well formed:
/// newest minor 0 and the `_pq_.` options it does not know.
#[tokio::test]
async fn protocol_3_5_with_pq_option_negotiates_down_to_3_0() {
    let pg = pg();
    pg.create_app("au_proto35t").await;
    let proxy = Proxy::start(&format!(
        "{}auth_type = \"trust\"\n",
        app_config(pg, "au_proto35t", "")
    ))
    .await;
    let mut s = raw_connect(&proxy).await;
    s.write_all(&startup_packet(
        3,
        5,
        &[
            ("user", "au_proto35t"),
            ("database", "au_proto35t"),
            ("_pq_.test_option", "1"),
        ],
    ))
    .await
    .unwrap();
    let msgs = read_until_ready(&mut s).await;
    let (minor, options) = negotiate_body(&msgs[0]);
    assert_eq!(minor, 0);
    assert_eq!(options, vec!["_pq_.test_option".to_owned()]);
    assert_eq!(msgs[1].auth_code(), 0, "then AuthenticationOk");
    // The session works on protocol 3.0: a simple query.
    let sql = b"SELECT 7\0";
    let mut q = vec![b'Q'];
    q.extend_from_slice(&((sql.len() + 4) as i32).to_be_bytes());
    q.extend_from_slice(sql);
    s.write_all(&q).await.unwrap();
    let answer = read_until_ready(&mut s).await;
    let row = answer.iter().find(|m| m.tag == b'D').expect("a DataRow");
    assert_eq!(&row.body[row.body.len() - 1..], b"7");
    // Terminate politely.
    s.write_all(&[b'X', 0, 0, 0, 4]).await.unwrap();
    expect_closed(&mut s).await;
}

/// A 3.x client with a minor version above 0 can still complete a SCRAM login; the
/// NegotiateProtocolVersion (wherever it comes) says 3.0.
#[tokio::test]
async fn protocol_3_5_scram_login_completes() {
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    let proxy = app("au_proto35s", "").await;
    let started = Instant::now();
    let mut s = raw_connect(&proxy).await;
    s.write_all(&startup_packet(
        3,
        5,
        &[("user", "au_proto35s"), ("database", "au_proto35s")],
    ))
    .await
    .unwrap();
    let mut scram = ScramSha256::new(b"au_proto35s-pw", ChannelBinding::unsupported());
    let mut seen_v = false;
    let mut ok = false;
    for _ in 0..20 {
        let m = expect_msg(&mut s).await;
        match m.tag {
            b'v' => {
                assert_eq!(negotiate_body(&m).0, 0);
                seen_v = true;
            }
            b'R' => match m.auth_code() {
                10 => {
                    let data = scram.message().to_vec();
                    let mut body = b"SCRAM-SHA-256\0".to_vec();
                    body.extend_from_slice(&(data.len() as i32).to_be_bytes());
                    body.extend_from_slice(&data);
                    let mut p = vec![b'p'];
                    p.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
                    p.extend(body);
                    s.write_all(&p).await.unwrap();
                }
                11 => {
                    scram.update(&m.body[4..]).unwrap();
                    let data = scram.message().to_vec();
                    let mut p = vec![b'p'];
                    p.extend_from_slice(&((data.len() + 4) as i32).to_be_bytes());
                    p.extend(data);
                    s.write_all(&p).await.unwrap();
                }
                12 => scram
                    .finish(&m.body[4..])
                    .expect("server signature verifies"),
                0 => {
                    ok = true;
                }
                c => panic!("unexpected auth code {c}"),
            },
            b'E' => panic!("login failed: {:?}", m.fields()),
            b'Z' => break,
            _ => {}
        }
    }
    assert!(ok, "AuthenticationOk seen");
    assert!(seen_v, "NegotiateProtocolVersion seen");
    assert!(started.elapsed() < STEP);
}

// ---------------------------------------------------------------------------------------
// Pipelining: what a client sends right after its last login message
// ---------------------------------------------------------------------------------------

/// A simple Query message.
fn query_msg(sql: &str) -> Vec<u8> {
    let mut m = vec![b'Q'];
    m.extend_from_slice(&((sql.len() + 5) as i32).to_be_bytes());
    m.extend_from_slice(sql.as_bytes());
    m.push(0);
    m
}

/// The first DataRow's first column, from messages up to ReadyForQuery.
fn first_value(msgs: &[Msg]) -> String {
    let row = msgs
        .iter()
        .find(|m| m.tag == b'D')
        .unwrap_or_else(|| panic!("no DataRow in {msgs:?}"));
    let len = i32::from_be_bytes(row.body[2..6].try_into().unwrap()) as usize;
    String::from_utf8(row.body[6..6 + len].to_vec()).unwrap()
}

/// A client that sends its SASLResponse and its first Query in one packet (libpq in
/// pipeline mode may): the login completes, SASLFinal comes before AuthenticationOk, and
/// the Query is answered, not lost with the login's read-ahead.
#[tokio::test]
async fn a_query_in_the_same_packet_as_the_scram_response_is_served() {
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    let proxy = app("au_pipescram", "").await;
    let mut s = raw_connect(&proxy).await;
    s.write_all(&startup_packet(
        3,
        0,
        &[("user", "au_pipescram"), ("database", "au_pipescram")],
    ))
    .await
    .unwrap();
    let mut scram = ScramSha256::new(b"au_pipescram-pw", ChannelBinding::unsupported());
    let m = expect_msg(&mut s).await;
    assert_eq!(m.auth_code(), 10, "AuthenticationSASL");
    let data = scram.message().to_vec();
    let mut body = b"SCRAM-SHA-256\0".to_vec();
    body.extend_from_slice(&(data.len() as i32).to_be_bytes());
    body.extend_from_slice(&data);
    let mut p = vec![b'p'];
    p.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    p.extend(body);
    s.write_all(&p).await.unwrap();
    let m = expect_msg(&mut s).await;
    assert_eq!(m.auth_code(), 11, "AuthenticationSASLContinue");
    scram.update(&m.body[4..]).unwrap();
    let data = scram.message().to_vec();
    let mut p = vec![b'p'];
    p.extend_from_slice(&((data.len() + 4) as i32).to_be_bytes());
    p.extend(data);
    p.extend(query_msg("SELECT 6 * 7"));
    s.write_all(&p).await.unwrap();

    let login = read_until_ready(&mut s).await;
    let codes: Vec<i32> = login
        .iter()
        .filter(|m| m.tag == b'R')
        .map(Msg::auth_code)
        .collect();
    assert_eq!(codes, [12, 0], "SASLFinal, then AuthenticationOk");
    scram
        .finish(&login[0].body[4..])
        .expect("server signature verifies");
    assert!(login.iter().any(|m| m.tag == b'K'), "BackendKeyData");
    let answer = read_until_ready(&mut s).await;
    assert_eq!(first_value(&answer), "42");
    // The session carries on as usual.
    s.write_all(&query_msg("SELECT current_user"))
        .await
        .unwrap();
    assert_eq!(first_value(&read_until_ready(&mut s).await), "au_pipescram");
}

/// The same with trust, where the startup packet is the last login message: startup and
/// Query in one packet are both handled.
#[tokio::test]
async fn a_query_in_the_same_packet_as_the_startup_is_served() {
    let pg = pg();
    pg.create_app("au_pipetrust").await;
    let proxy = Proxy::start(&format!(
        "{}auth_type = \"trust\"\n",
        app_config(pg, "au_pipetrust", "")
    ))
    .await;
    let mut s = raw_connect(&proxy).await;
    let mut p = startup_packet(
        3,
        0,
        &[("user", "au_pipetrust"), ("database", "au_pipetrust")],
    );
    p.extend(query_msg("SELECT 40 + 2"));
    s.write_all(&p).await.unwrap();
    let login = read_until_ready(&mut s).await;
    assert_eq!(login[0].auth_code(), 0, "AuthenticationOk first");
    assert_eq!(first_value(&read_until_ready(&mut s).await), "42");
    s.write_all(&query_msg("SELECT current_user"))
        .await
        .unwrap();
    assert_eq!(first_value(&read_until_ready(&mut s).await), "au_pipetrust");
}

/// The admin console gets what was pipelined after the login too.
#[tokio::test]
async fn a_console_command_in_the_same_packet_as_the_startup_is_served() {
    let pg = pg();
    pg.create_app("au_pipeadmin").await;
    let proxy = Proxy::start(&app_config(
        pg,
        "au_pipeadmin",
        "auth_type = \"trust\"\nadmin_users = \"au_pipeadmin\"",
    ))
    .await;
    let mut s = raw_connect(&proxy).await;
    let mut p = startup_packet(3, 0, &[("user", "au_pipeadmin"), ("database", "pgsluice")]);
    p.extend(query_msg("SHOW VERSION"));
    s.write_all(&p).await.unwrap();
    let login = read_until_ready(&mut s).await;
    assert_eq!(login[0].auth_code(), 0, "AuthenticationOk first");
    let answer = read_until_ready(&mut s).await;
    assert!(first_value(&answer).contains("pgsluice"), "{answer:?}");
}

// ---------------------------------------------------------------------------------------
// Login hardening
// ---------------------------------------------------------------------------------------

fn metric(proxy: &Proxy, line_start: &str) -> f64 {
    let text = String::from_utf8(pgsluice::metrics::scrape(&proxy.shared)).unwrap();
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {line_start}"))
}

#[tokio::test]
async fn login_rate_limit_refuses_an_address_after_its_failures() {
    let proxy = app("au_ratelimit", "login_rate_limit = 3").await;
    let good = proxy.conn("au_ratelimit", "au_ratelimit-pw", "au_ratelimit");
    let bad = proxy.conn("au_ratelimit", "guess", "au_ratelimit");
    // Successful logins do not count.
    for _ in 0..5 {
        login(&good).await.unwrap();
    }
    for _ in 0..3 {
        assert_eq!(code(&login_err(&bad).await), "28P01");
    }
    // The limit is reached: even the right password is refused, before any exchange.
    let e = login_err(&good).await;
    assert_eq!(code(&e), "53300", "{e}");
    assert!(
        message(&e).starts_with("too many failed logins from 127.0.0.1: try again in "),
        "{}",
        message(&e)
    );
    let mut s = raw_connect(&proxy).await;
    s.write_all(&startup_packet(
        3,
        0,
        &[("user", "au_ratelimit"), ("database", "au_ratelimit")],
    ))
    .await
    .unwrap();
    let f = expect_fatal(&mut s, "53300").await;
    assert!(f[&'H'].contains("login_rate_limit"), "{f:?}");
    assert_eq!(
        metric(
            &proxy,
            "pgsluice_errors_total{kind=\"login_rate_limited\",side=\"client\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &proxy,
            "pgsluice_errors_total{kind=\"auth_failed\",side=\"client\"}"
        ),
        3.0
    );
}

/// Guesses sent in parallel are limited too: 12 logins with a wrong password started at
/// once from one address all pass the first check (no failure is counted yet), but only
/// `login_rate_limit` of them get their password checked; the others get 53300.
#[tokio::test]
async fn parallel_guesses_are_limited_too() {
    let proxy = app("au_rl_parallel", "login_rate_limit = 3").await;
    let bad = proxy.conn("au_rl_parallel", "guess", "au_rl_parallel");
    let tries = (0..12).map(|_| {
        let bad = bad.clone();
        async move { code(&login_err(&bad).await) }
    });
    let codes = futures_util::future::join_all(tries).await;
    let checked = codes.iter().filter(|c| *c == "28P01").count();
    let refused = codes.iter().filter(|c| *c == "53300").count();
    assert_eq!(checked + refused, 12, "{codes:?}");
    assert!(checked <= 3, "{checked} passwords checked: {codes:?}");
}

#[tokio::test]
async fn no_login_rate_limit_by_default() {
    let proxy = app("au_nolimit", "").await;
    let bad = proxy.conn("au_nolimit", "guess", "au_nolimit");
    for _ in 0..8 {
        assert_eq!(code(&login_err(&bad).await), "28P01");
    }
    assert_serves(&proxy, "au_nolimit").await;
}

/// PostgreSQL's cap: a startup packet of 10,000 bytes is read, one of 10,001 is refused as
/// soon as its length is read.
#[tokio::test]
async fn startup_packets_are_capped_at_10000_bytes() {
    let proxy = app(
        "au_startcap",
        "auth_type = \"trust\"\nignore_startup_parameters = [\"x_pad\"]",
    )
    .await;
    let base = startup_packet(
        3,
        0,
        &[
            ("user", "au_startcap"),
            ("database", "au_startcap"),
            ("x_pad", ""),
        ],
    )
    .len();
    let pad = "p".repeat(10_000 - base);
    let packet = startup_packet(
        3,
        0,
        &[
            ("user", "au_startcap"),
            ("database", "au_startcap"),
            ("x_pad", &pad),
        ],
    );
    assert_eq!(packet.len(), 10_000);
    let mut s = raw_connect(&proxy).await;
    s.write_all(&packet).await.unwrap();
    read_until_ready(&mut s).await;
    drop(s);

    let pad = "p".repeat(10_001 - base);
    let packet = startup_packet(
        3,
        0,
        &[
            ("user", "au_startcap"),
            ("database", "au_startcap"),
            ("x_pad", &pad),
        ],
    );
    let mut s = raw_connect(&proxy).await;
    // Only the length: the proxy must not wait for (or allocate) the rest.
    s.write_all(&packet[..4]).await.unwrap();
    let f = expect_fatal(&mut s, "08P01").await;
    assert!(f[&'M'].contains("length 10001 is out of range"), "{f:?}");
}

/// A client that stops halfway through the password exchange is closed at
/// `client_login_timeout`, counted from its connect.
#[tokio::test]
async fn a_stalled_password_exchange_ends_at_client_login_timeout() {
    let proxy = app("au_stall", "client_login_timeout = \"1s\"").await;
    let started = Instant::now();
    let mut s = raw_connect(&proxy).await;
    s.write_all(&startup_packet(
        3,
        0,
        &[("user", "au_stall"), ("database", "au_stall")],
    ))
    .await
    .unwrap();
    let m = expect_msg(&mut s).await;
    assert_eq!(m.auth_code(), 10, "AuthenticationSASL");
    // Never answer it.
    let f = expect_fatal(&mut s, "08P01").await;
    assert!(f[&'M'].contains("client_login_timeout"), "{f:?}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "closed after {waited:?}"
    );
    assert_serves(&proxy, "au_stall").await;
}
