//! pgsluice asks each server to probe its connection (`server_tcp_keepalive`, startup
//! `options`): a pgsluice whose host vanishes without closing its sockets (a lost instance)
//! would otherwise keep its server connections counted in `max_connections`, and in every
//! other proxy's budget, for the kernel's two hours. What the server is asked shows in
//! `SHOW tcp_keepalives_idle` on its session. A pooler in between that refuses `options`
//! (PgBouncer) is logged into without them; another pgsluice in between takes them.

mod common;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

/// The keepalive settings of the server session a pooled client runs on.
async fn server_keepalive(client: &tokio_postgres::Client) -> (String, String, String) {
    let row = client
        .query_one(
            "SELECT current_setting('tcp_keepalives_idle'), \
             current_setting('tcp_keepalives_interval'), current_setting('tcp_keepalives_count')",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

#[tokio::test]
async fn servers_are_asked_to_probe_with_the_keepalive_settings() {
    let on = app(
        "sk_on",
        "tcp_keepidle = \"37s\"\ntcp_keepintvl = \"4s\"\ntcp_keepcnt = 5",
    )
    .await;
    let c = on.client("sk_on").await;
    assert_eq!(
        server_keepalive(&c).await,
        ("37".into(), "4".into(), "5".into())
    );

    // Off: the server's own settings (the kernel's, on this machine's loopback).
    let off = app("sk_off", "server_tcp_keepalive = 0\ntcp_keepidle = \"37s\"").await;
    let c = off.client("sk_off").await;
    let (idle, _, _) = server_keepalive(&c).await;
    assert_ne!(idle, "37");
    let direct = connect(&format!(
        "host=127.0.0.1 port={} user=sk_off password=sk_off-pw dbname=sk_off",
        pg().port
    ))
    .await;
    assert_eq!(server_keepalive(&c).await, server_keepalive(&direct).await);
}

/// The sidecar in front of a standalone pgsluice: the front one's `options` reach the
/// back one, which takes them (its own keepalive settings rule its client sockets) and asks
/// its own servers with its own settings.
#[tokio::test]
async fn a_pgsluice_in_between_takes_the_options() {
    let back = app("sk_chain", "tcp_keepidle = \"41s\"").await;
    let front = Proxy::start(&app_config_at(
        back.addr.port(),
        "sk_chain",
        "tcp_keepidle = \"13s\"",
    ))
    .await;
    let c = front.client("sk_chain").await;
    assert_eq!(server_keepalive(&c).await.0, "41");
    let upstream = format!("127.0.0.1:{}", back.addr.port());
    assert!(!front.shared.pools.keys.refuses_options(&upstream));
}

/// PgBouncer, run as the `postgres` user (it refuses root), in front of the test server.
struct Bouncer {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Bouncer {
    fn start(db: &str) -> Bouncer {
        let bin = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("PgBouncer is not installed (apt-get install pgbouncer; .ci/run does)");
        let dir = tempfile::tempdir().unwrap();
        let port = pg::free_port();
        let ini = dir.path().join("pgbouncer.ini");
        std::fs::write(
            dir.path().join("users.txt"),
            format!("\"{db}\" \"{db}-pw\"\n"),
        )
        .unwrap();
        std::fs::write(
            &ini,
            format!(
                "[databases]\n{db} = host=127.0.0.1 port={pg} dbname={db}\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
                 auth_type = trust\nauth_file = {users}\npool_mode = transaction\n\
                 logfile = {log}\n",
                pg = pg().port,
                users = dir.path().join("users.txt").display(),
                log = dir.path().join("pgbouncer.log").display(),
            ),
        )
        .unwrap();
        let mut cmd = if pgsluice::demo::postgres::is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(status.success(), "chown the PgBouncer directory");
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", bin]);
            c
        } else {
            Command::new(bin)
        };
        let child = cmd
            .arg(&ini)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start PgBouncer");
        // Owned at once: dropped (a failed start included), it is stopped.
        let bouncer = Bouncer {
            port,
            child,
            _dir: dir,
        };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return bouncer;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("PgBouncer did not listen on {port}: {}", bouncer.log());
    }
}

impl Bouncer {
    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        // Its process group, runuser and PgBouncer, at once: from 1.23 PgBouncer waits for
        // its clients on SIGTERM. (`kill -s SIG -- -PGID`: procps reads `-TERM -PGID` as
        // options.)
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
    }
}

/// PgBouncer refuses the startup parameter `options`: the login is tried again without,
/// the upstream is remembered, and later servers go straight without.
#[tokio::test]
async fn a_pooler_that_refuses_options_is_logged_into_without() {
    let name = "sk_bouncer";
    pg().create_app(name).await;
    let bouncer = Bouncer::start(name);
    let proxy = Proxy::start(&app_config_at(bouncer.port, name, "pool_size = 3")).await;
    let upstream = format!("127.0.0.1:{}", bouncer.port);
    let c = proxy.client(name).await;
    let one: i32 = c.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    assert!(proxy.shared.pools.keys.refuses_options(&upstream));
    // Three at once: more servers, logged in at the first try.
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(proxy.client(name).await);
    }
    let runs = clients
        .iter()
        .map(|c| c.batch_execute("SELECT pg_sleep(0.2)"));
    for r in futures_util::future::join_all(runs).await {
        r.unwrap();
    }
    let log = bouncer.log();
    assert_eq!(
        log.matches("closing because: unsupported startup parameter")
            .count(),
        1,
        "one refused login: {log}"
    );
    // At least three servers (three transactions at once), the first one's login tried twice.
    assert!(
        log.matches("login attempt").count() >= 3,
        "three logins: {log}"
    );
}
