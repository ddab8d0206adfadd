//! Unix sockets on both legs: clients through `listen_unix` (`DIR/.s.PGSQL.PORT`, found by
//! psql, pgbench and tokio-postgres given the directory), and PostgreSQL reached over its
//! own socket directory (a database `host` starting with `/`). The test cluster's socket
//! directory is its temp dir (`unix_socket_directories`).

mod common;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::pg::free_port;
use common::*;
use tokio_postgres::{NoTls, SimpleQueryMessage};

/// A configuration for app `name` that listens on a Unix socket in `listen_dir` too, with
/// the database reached over PostgreSQL's Unix socket when `unix_upstream`.
fn config(
    pg: &TestPostgres,
    name: &str,
    listen_dir: &Path,
    unix_upstream: bool,
    top: &str,
) -> String {
    let host = if unix_upstream {
        pg.dir.display().to_string()
    } else {
        "127.0.0.1".into()
    };
    format!(
        "listen_unix = \"{}\"\nadmin_users = \"{name}\"\n{top}\n[budget]\nmax_server_connections = 80\n[databases.{name}]\nhost = \"{host}\"\nport = {}\n[users.{name}]\npassword = \"{name}-pw\"\n",
        listen_dir.display(),
        pg.port
    )
}

/// tokio-postgres over the proxy's Unix socket.
async fn unix_client(
    dir: &Path,
    port: u16,
    name: &str,
    db: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::Config::new()
        .host_path(dir)
        .port(port)
        .user(name)
        .password(format!("{name}-pw"))
        .dbname(db)
        .connect_timeout(Duration::from_secs(10))
        .connect(NoTls)
        .await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

fn socket_file(dir: &Path, port: u16) -> PathBuf {
    dir.join(format!(".s.PGSQL.{port}"))
}

/// Rows of a SHOW command as maps.
async fn show(c: &tokio_postgres::Client, sql: &str) -> Vec<HashMap<String, Option<String>>> {
    let mut rows = Vec::new();
    for m in c.simple_query(sql).await.unwrap() {
        if let SimpleQueryMessage::Row(r) = m {
            let mut row = HashMap::new();
            for (i, col) in r.columns().iter().enumerate() {
                row.insert(col.name().to_owned(), r.get(i).map(str::to_owned));
            }
            rows.push(row);
        }
    }
    rows
}

/// Backends of `role` that came over a Unix socket (client_addr NULL) and over TCP.
async fn backends_by_transport(admin: &tokio_postgres::Client, role: &str) -> (i64, i64) {
    let row = admin
        .query_one(
            "SELECT count(*) FILTER (WHERE client_addr IS NULL), count(*) FILTER (WHERE client_addr IS NOT NULL) \
             FROM pg_stat_activity WHERE usename = $1 AND backend_type = 'client backend'",
            &[&role],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

async fn run(mut c: Command) -> std::process::Output {
    c.stdin(Stdio::null()).env("PGCONNECT_TIMEOUT", "10");
    tokio::task::spawn_blocking(move || c.output().unwrap())
        .await
        .unwrap()
}

/// psql and tokio-postgres reach the proxy through `-h DIR`; the proxy reaches PostgreSQL
/// over its socket directory; SHOW CLIENTS and SHOW SERVERS say `unix`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_and_servers_over_unix_sockets() {
    let pg = pg();
    pg.create_app("ux_both").await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&config(pg, "ux_both", dir.path(), true, "")).await;
    let port = proxy.addr.port();
    let file = socket_file(dir.path(), port);
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let meta = std::fs::symlink_metadata(&file).expect("the socket file exists");
    assert!(meta.file_type().is_socket());
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o777,
        "unix_socket_mode default"
    );

    // psql -h DIR -p PORT, as with PostgreSQL itself.
    let mut c = Command::new(pg.client_bin("psql"));
    c.args(["-X", "-A", "-t", "-h"])
        .arg(dir.path())
        .args(["-p", &port.to_string(), "-U", "ux_both", "-d", "ux_both"])
        .args(["-c", "SELECT 40 + 2"])
        .env("PGPASSWORD", "ux_both-pw");
    let out = run(c).await;
    assert!(
        out.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");

    // tokio-postgres over the socket; the server it gets came over PostgreSQL's socket.
    let client = unix_client(dir.path(), port, "ux_both", "ux_both")
        .await
        .unwrap();
    client.batch_execute("BEGIN").await.unwrap();
    assert_eq!(scalar(&client, "SELECT 7").await, "7");
    let admin_pg = pg.admin().await;
    let (unix, tcp) = backends_by_transport(&admin_pg, "ux_both").await;
    assert!(unix >= 1 && tcp == 0, "{unix} unix, {tcp} tcp backends");

    // The console (over TCP) lists the Unix client as PgBouncer does: addr `unix`, the port.
    let console = connect(&proxy.conn("ux_both", "ux_both-pw", "pgbouncer")).await;
    let clients = show(&console, "SHOW CLIENTS").await;
    let unix_clients: Vec<_> = clients
        .iter()
        .filter(|r| r["addr"].as_deref() == Some("unix"))
        .collect();
    assert_eq!(unix_clients.len(), 1, "{clients:?}");
    assert_eq!(unix_clients[0]["port"], Some(port.to_string()));
    assert_eq!(unix_clients[0]["state"].as_deref(), Some("active"));
    assert_eq!(unix_clients[0]["local_addr"].as_deref(), Some("unix"));
    // A TCP client next to it shows its IP address.
    let over_tcp = proxy.client("ux_both").await;
    assert_eq!(scalar(&over_tcp, "SELECT 1").await, "1");
    let clients = show(&console, "SHOW CLIENTS").await;
    assert!(
        clients
            .iter()
            .any(|r| r["addr"].as_deref() == Some("127.0.0.1")),
        "the TCP client: {clients:?}"
    );
    let servers = show(&console, "SHOW SERVERS").await;
    assert!(
        !servers.is_empty()
            && servers
                .iter()
                .all(|r| r["addr"].as_deref() == Some("unix")
                    && r["port"] == Some(pg.port.to_string())),
        "{servers:?}"
    );
    client.batch_execute("COMMIT").await.unwrap();
}

/// A client that binds its own socket file before connecting (any directory, any "port")
/// is listed with the listener's address, not the one it chose: no spoofed address in SHOW
/// CLIENTS and the logs, and no directory of its choosing kept by the proxy.
#[tokio::test]
async fn a_unix_client_cannot_choose_its_address() {
    let pg = pg();
    pg.create_app("ux_named").await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&config(pg, "ux_named", dir.path(), false, "")).await;
    let port = proxy.addr.port();

    let own = tempfile::tempdir().unwrap();
    let sock = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
    sock.bind(&socket2::SockAddr::unix(own.path().join(".s.PGSQL.4242")).unwrap())
        .unwrap();
    sock.connect(&socket2::SockAddr::unix(socket_file(dir.path(), port)).unwrap())
        .unwrap();
    let std_stream: std::os::unix::net::UnixStream = sock.into();
    std_stream.set_nonblocking(true).unwrap();
    let stream = tokio::net::UnixStream::from_std(std_stream).unwrap();
    let (client, conn) = tokio_postgres::Config::new()
        .user("ux_named")
        .password("ux_named-pw")
        .dbname("ux_named")
        .connect_raw(stream, NoTls)
        .await
        .expect("logs in over its self-named socket");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    assert_eq!(scalar(&client, "SELECT 1").await, "1");

    let console = connect(&proxy.conn("ux_named", "ux_named-pw", "pgbouncer")).await;
    let clients = show(&console, "SHOW CLIENTS").await;
    let unix_clients: Vec<_> = clients
        .iter()
        .filter(|r| r["addr"].as_deref() == Some("unix"))
        .collect();
    assert_eq!(unix_clients.len(), 1, "{clients:?}");
    assert_eq!(
        unix_clients[0]["port"],
        Some(port.to_string()),
        "the listener's port, not the client's own 4242: {clients:?}"
    );
}

/// `/readyz` probes a database reached over PostgreSQL's Unix socket through that socket
/// (it used to look the directory up as a host name, and was never ready).
#[tokio::test]
async fn readyz_probes_a_unix_upstream_over_its_socket() {
    let pg = pg();
    pg.create_app("ux_ready").await;
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let proxy = Proxy::start(&config(
        pg,
        "ux_ready",
        dir.path(),
        true,
        &format!("[metrics]\nlisten = \"127.0.0.1:{http}\""),
    ))
    .await;
    let status = || async move {
        let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", http)).await else {
            return String::new();
        };
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _ = s
            .write_all(b"GET /readyz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await;
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw).await;
        String::from_utf8_lossy(&raw).into_owned()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = status().await;
    while !last.starts_with("HTTP/1.1 200") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        last = status().await;
    }
    assert!(last.starts_with("HTTP/1.1 200"), "not ready: {last}");
    drop(proxy);
}

/// pgbench over the Unix listener to a Unix upstream: several clients, no failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_over_unix_sockets_end_to_end() {
    let pg = pg();
    pg.create_app("ux_bench").await;
    let mut init = Command::new(pg.client_bin("pgbench"));
    init.arg("-h")
        .arg(&pg.dir)
        .args([
            "-p",
            &pg.port.to_string(),
            "-U",
            "ux_bench",
            "-i",
            "-s",
            "1",
            "-q",
        ])
        .arg("ux_bench")
        .env("PGPASSWORD", "ux_bench-pw");
    let out = run(init).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&config(pg, "ux_bench", dir.path(), true, "pool_size = 4")).await;
    let port = proxy.addr.port().to_string();
    for args in [
        &["-S", "-c", "16", "-j", "2", "-t", "100"][..],
        &["-c", "8", "-j", "2", "-t", "25"][..],
    ] {
        let mut bench = Command::new(pg.client_bin("pgbench"));
        bench
            .arg("-h")
            .arg(dir.path())
            .args(["-p", &port, "-U", "ux_bench"])
            .args(args)
            .arg("ux_bench")
            .env("PGPASSWORD", "ux_bench-pw");
        let out = run(bench).await;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "pgbench {args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let want = if args[0] == "-S" {
            "1600/1600"
        } else {
            "200/200"
        };
        assert!(
            text.contains(&format!(
                "number of transactions actually processed: {want}"
            )) && text.contains("number of failed transactions: 0 (0.000%)"),
            "pgbench {args:?}: {text}"
        );
    }
    let (unix, tcp) = backends_by_transport(&pg.admin().await, "ux_bench").await;
    assert!(
        (1..=4).contains(&unix) && tcp == 0,
        "{unix} unix, {tcp} tcp"
    );
}

/// A query sleeping on a server reached over its Unix socket is cancelled, whether the
/// cancel comes over the proxy's TCP listener or its Unix socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_over_unix_sockets() {
    let pg = pg();
    pg.create_app("ux_cancel").await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&config(pg, "ux_cancel", dir.path(), true, "")).await;
    let port = proxy.addr.port();
    let over_unix = unix_client(dir.path(), port, "ux_cancel", "ux_cancel")
        .await
        .unwrap();
    let over_tcp = proxy.client("ux_cancel").await;
    for (how, client) in [("unix", &over_unix), ("tcp", &over_tcp)] {
        let token = client.cancel_token();
        let started = Instant::now();
        let canceller = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            token.cancel_query(NoTls).await
        });
        let err = client
            .simple_query("SELECT pg_sleep(30)")
            .await
            .expect_err("cancelled");
        canceller.await.unwrap().unwrap();
        assert_eq!(code(&err), "57014", "{how}: {err}");
        assert!(started.elapsed() < Duration::from_secs(20), "{how}");
        // The session goes on.
        assert_eq!(scalar(client, "SELECT 1").await, "1", "{how}");
    }
}

/// A stale socket file (its process died) is replaced at start; the file is removed when
/// the proxy stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_socket_is_replaced_and_removed_at_stop() {
    let pg = pg();
    pg.create_app("ux_stale").await;
    let dir = tempfile::tempdir().unwrap();
    // A TCP port to start on, and a stale socket for it: bound, then the listener dropped.
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = tcp.local_addr().unwrap().port();
    let file = socket_file(dir.path(), port);
    drop(std::os::unix::net::UnixListener::bind(&file).unwrap());
    assert!(file.exists());
    assert!(std::os::unix::net::UnixStream::connect(&file).is_err());

    let config = pgsluice::Config::from_toml(&config(
        pg,
        "ux_stale",
        dir.path(),
        false,
        "unix_socket_mode = \"0660\"",
    ))
    .unwrap();
    let shared = pgsluice::app::Shared::new(config);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(pgsluice::app::serve(tcp, shared, async move {
        let _ = stopped.await;
    }));
    assert!(
        eventually(Duration::from_secs(10), || async {
            unix_client(dir.path(), port, "ux_stale", "ux_stale")
                .await
                .is_ok()
        })
        .await,
        "the proxy took over the stale socket"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o660
    );
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), served)
        .await
        .expect("the proxy stops")
        .unwrap();
    assert!(!file.exists(), "the socket file is removed at stop");
}

/// A socket something answers on is not taken over: the binary refuses to start and says
/// why; started normally, it removes its socket file on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_socket_refuses_start_and_sigterm_removes_the_file() {
    let pg = pg();
    pg.create_app("ux_live").await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let file = socket_file(dir.path(), port);
    let squatter = std::os::unix::net::UnixListener::bind(&file).unwrap();
    let conf = dir.path().join("pgsluice.toml");
    std::fs::write(
        &conf,
        format!(
            "listen = \"127.0.0.1:{port}\"\n{}",
            config(pg, "ux_live", dir.path(), true, "")
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgsluice"))
        .arg("--config")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("pgsluice started over a live socket");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let out = child.wait_with_output().unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!status.success());
    assert!(
        log.contains("listen_unix") && log.contains("in use"),
        "{log}"
    );
    assert!(file.exists(), "the live socket is left alone");
    drop(squatter);
    std::fs::remove_file(&file).unwrap();

    // Quick-mode flag form; started, serving over the socket; SIGTERM removes the file.
    let upstream = format!(
        "postgres://ux_live:ux_live-pw@/ux_live?host={}&port={}",
        pg.dir.display(),
        pg.port
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgsluice"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--listen-unix"])
        .arg(dir.path())
        .args([
            "--upstream",
            &upstream,
            "--budget-max-server-connections",
            "10",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let up = eventually(Duration::from_secs(20), || async {
        unix_client(dir.path(), port, "ux_live", "ux_live")
            .await
            .is_ok()
    })
    .await;
    if !up {
        let _ = child.kill();
        panic!("pgsluice did not serve over its Unix socket");
    }
    let c = unix_client(dir.path(), port, "ux_live", "ux_live")
        .await
        .unwrap();
    assert_eq!(scalar(&c, "SELECT 5").await, "5");
    drop(c);
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "pgsluice did not exit on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
    assert!(!file.exists(), "the socket file is removed on SIGTERM");
}

/// `client_tls.mode = require` refuses plaintext over TCP, and lets Unix-socket clients in
/// without TLS (they are local; PostgreSQL's hostssl never matches a local socket, and libpq
/// does not ask for TLS there): an SSLRequest over the socket is answered 'N'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_required_over_tcp_not_over_unix() {
    let pg = pg();
    pg.create_app("ux_tls").await;
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert_file = dir.path().join("server.crt");
    let key_file = dir.path().join("server.key");
    std::fs::write(&cert_file, cert.cert.pem()).unwrap();
    std::fs::write(&key_file, cert.signing_key.serialize_pem()).unwrap();
    let top = format!(
        "[client_tls]\nmode = \"require\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        cert_file.display(),
        key_file.display()
    );
    // listen_unix is a top-level key: it comes before the [client_tls] table.
    let proxy = Proxy::start(&config(pg, "ux_tls", dir.path(), false, &top)).await;
    let err = try_connect(&proxy.conn("ux_tls", "ux_tls-pw", "ux_tls"))
        .await
        .expect_err("plaintext over TCP is refused");
    assert_eq!(code(&err), "28000", "{err}");
    // psql's default sslmode=prefer sends an SSLRequest first: 'N', then plaintext.
    let mut c = Command::new(pg.client_bin("psql"));
    c.args(["-X", "-A", "-t", "-h"])
        .arg(dir.path())
        .args([
            "-p",
            &proxy.addr.port().to_string(),
            "-U",
            "ux_tls",
            "-d",
            "ux_tls",
        ])
        .args([
            "-c",
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        ])
        .env("PGPASSWORD", "ux_tls-pw")
        .env("PGSSLMODE", "prefer");
    let out = run(c).await;
    assert!(
        out.status.success(),
        "psql over the Unix socket: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // An SSLRequest over the socket (libpq sends none there) gets 'N', and the plaintext
    // login goes on: the next message is an authentication request, not an error.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(socket_file(dir.path(), proxy.addr.port()))
        .await
        .unwrap();
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .unwrap();
    let mut answer = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer[0], b'N');
    s.write_all(&common::wire::startup_packet(&[
        ("user", "ux_tls"),
        ("database", "ux_tls"),
    ]))
    .await
    .unwrap();
    let mut tag = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut tag))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(tag[0], b'R', "an authentication request");
}

/// `server_tls.mode = require` with a socket directory as host is a configuration error
/// naming the database; `prefer` (the default) connects without TLS over the socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_tls_over_a_unix_upstream() {
    let pg = pg();
    pg.create_app("ux_stls").await;
    let dir = tempfile::tempdir().unwrap();
    for mode in ["require", "verify-ca", "verify-full"] {
        let top = format!("[server_tls]\nmode = \"{mode}\"\n");
        let e = pgsluice::Config::from_toml(&config(pg, "ux_stls", dir.path(), true, &top))
            .expect_err(mode)
            .to_string();
        assert!(
            e.starts_with("databases.ux_stls.host:") && e.contains(mode),
            "{mode}: {e}"
        );
    }
    let top = "[server_tls]\nmode = \"prefer\"\n";
    let proxy = Proxy::start(&config(pg, "ux_stls", dir.path(), true, top)).await;
    let c = proxy.client("ux_stls").await;
    assert_eq!(scalar(&c, "SELECT 3").await, "3");
    let (unix, tcp) = backends_by_transport(&pg.admin().await, "ux_stls").await;
    assert!(unix >= 1 && tcp == 0, "{unix} unix, {tcp} tcp");
}

/// The budget's control connection works over the Unix socket and counts the fleet: two
/// proxies on a server with max_connections = 20 share floor(20 × 0.5) = 10.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_counts_over_a_unix_upstream() {
    let pg = TestPostgres::start(&["max_connections = 20"]);
    pg.create_app("ux_budget").await;
    let toml = format!(
        "[budget]\nrefresh_interval = \"1s\"\n[databases.ux_budget]\nhost = \"{}\"\nport = {}\n[users.ux_budget]\npassword = \"ux_budget-pw\"\n",
        pg.dir.display(),
        pg.port
    );
    let budget = |p: &Proxy| p.shared.pools.budget_snapshots().remove(0).1;
    let a = Proxy::start(&toml).await;
    assert!(
        eventually(Duration::from_secs(10), || async { budget(&a).limit == 10 }).await,
        "{:?}",
        budget(&a)
    );
    let b = Proxy::start(&toml).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            let (sa, sb) = (budget(&a), budget(&b));
            sa.upstream.members == 2 && sb.upstream.members == 2 && sa.share + sb.share <= 10
        })
        .await,
        "{:?} {:?}",
        budget(&a),
        budget(&b)
    );
    // Both control connections came over the socket (no client address).
    let admin = pg.admin().await;
    let n: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pgsluice:fleet=%' AND client_addr IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    let c = a.client("ux_budget").await;
    assert_eq!(scalar(&c, "SELECT 1").await, "1");
}
