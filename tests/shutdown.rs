//! SIGTERM on the real binary: transactions in flight finish, every client is closed at its
//! next transaction boundary with 57P01, the process exits 0 within shutdown_timeout; a
//! transaction that does not finish is cut at the timeout.

mod common;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

struct Binary {
    child: Child,
    port: u16,
}

impl Binary {
    async fn start(name: &str, shutdown_timeout: &str, mode: &str) -> Binary {
        let pg = pg();
        pg.create_app(name).await;
        let port = pg::free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_pgsluice"))
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--pool-mode",
                mode,
            ])
            .args(["--upstream", &pg.url(name, &format!("{name}-pw"), name)])
            .args(["--budget-max-server-connections", "10"])
            .env("PGSLUICE_SHUTDOWN_TIMEOUT", shutdown_timeout)
            .env("PGSLUICE_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        assert!(
            eventually(Duration::from_secs(10), || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            })
            .await
        );
        Binary { child, port }
    }

    fn conn(&self, name: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={name} password={name}-pw dbname={name}",
            self.port
        )
    }

    fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    /// Waits for the process to exit; its exit code and when.
    async fn exit(&mut self, within: Duration) -> (Option<i32>, Instant) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.code(), Instant::now());
            }
            assert!(
                Instant::now() < deadline,
                "pgsluice did not exit within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn sigterm_lets_transactions_finish() {
    let mut proxy = Binary::start("sd_drain", "10s", "transaction").await;
    let setup = connect(&proxy.conn("sd_drain")).await;
    setup.batch_execute("CREATE TABLE t (v int)").await.unwrap();
    drop(setup);
    let a = connect(&proxy.conn("sd_drain")).await;
    let b = connect(&proxy.conn("sd_drain")).await;
    assert_eq!(scalar(&b, "SELECT 1").await, "1");
    a.batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    proxy.sigterm();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // No new clients.
    assert!(
        try_connect(&proxy.conn("sd_drain")).await.is_err(),
        "new connections are refused while draining"
    );
    // The idle client was closed with 57P01.
    let e = b.simple_query("SELECT 1").await.unwrap_err();
    assert!(
        e.as_db_error().is_none_or(|d| d.code().code() == "57P01"),
        "{e}"
    );
    // The open transaction finishes and commits.
    a.batch_execute("INSERT INTO t VALUES (2); COMMIT")
        .await
        .unwrap();
    let e = a.simple_query("SELECT 1").await.unwrap_err();
    assert!(
        e.as_db_error().is_none_or(|d| d.code().code() == "57P01"),
        "{e}"
    );
    let (code, _) = proxy.exit(Duration::from_secs(8)).await;
    assert_eq!(code, Some(0));
    let direct = connect(&format!(
        "host=127.0.0.1 port={} user=sd_drain password=sd_drain-pw dbname=sd_drain",
        pg().port
    ))
    .await;
    assert_eq!(
        scalar(&direct, "SELECT count(*) FROM t").await,
        "2",
        "the transaction committed"
    );
}

#[tokio::test]
async fn a_stuck_transaction_is_cut_at_the_timeout() {
    let mut proxy = Binary::start("sd_stuck", "2s", "transaction").await;
    let setup = connect(&proxy.conn("sd_stuck")).await;
    setup.batch_execute("CREATE TABLE t (v int)").await.unwrap();
    drop(setup);
    let a = connect(&proxy.conn("sd_stuck")).await;
    a.batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let started = Instant::now();
    proxy.sigterm();
    let (code, at) = proxy.exit(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0));
    let took = at.duration_since(started);
    assert!(
        took >= Duration::from_millis(1800) && took < Duration::from_secs(6),
        "exited after {took:?}"
    );
    assert!(a.simple_query("SELECT 1").await.is_err());
    let direct = connect(&format!(
        "host=127.0.0.1 port={} user=sd_stuck password=sd_stuck-pw dbname=sd_stuck",
        pg().port
    ))
    .await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            scalar(&direct, "SELECT count(*) FROM t").await == "0"
        })
        .await,
        "the cut transaction rolled back"
    );
}

#[tokio::test]
async fn session_mode_clients_leave_between_transactions() {
    let mut proxy = Binary::start("sd_sess", "10s", "session").await;
    let a = connect(&proxy.conn("sd_sess")).await;
    a.batch_execute("CREATE TABLE t (v int); BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    proxy.sigterm();
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.batch_execute("COMMIT").await.unwrap();
    let (code, _) = proxy.exit(Duration::from_secs(8)).await;
    assert_eq!(code, Some(0));
    assert!(a.simple_query("SELECT 1").await.is_err());
}

/// An open admin console (an exporter's, an operator's psql) does not hold the shutdown
/// until shutdown_timeout: it is closed, as PgBouncer closes it, and the process exits at
/// once when nothing else runs.
#[tokio::test]
async fn an_open_admin_console_does_not_hold_the_shutdown() {
    let mut proxy = Binary::start("sd_console", "20s", "transaction").await;
    let console = connect(
        &proxy
            .conn("sd_console")
            .replace("dbname=sd_console", "dbname=pgsluice"),
    )
    .await;
    console.simple_query("SHOW POOLS").await.unwrap();
    let began = Instant::now();
    proxy.sigterm();
    let (code, at) = proxy.exit(Duration::from_secs(15)).await;
    assert_eq!(code, Some(0));
    assert!(
        at.duration_since(began) < Duration::from_secs(5),
        "exited after {:?}",
        at.duration_since(began)
    );
    assert!(
        console.simple_query("SHOW POOLS").await.is_err(),
        "the console was closed"
    );
}

/// A PAUSE still waiting when pgsluice begins to shut down is given up at once: its console
/// is closed (57P01) without waiting for the transaction the PAUSE waited for, and the
/// pause is taken back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_pause_does_not_hold_the_drain() {
    let mut proxy = Binary::start("sd_pause", "20s", "transaction").await;
    let holder = connect(&proxy.conn("sd_pause")).await;
    let queued = connect(&proxy.conn("sd_pause")).await;
    let console = connect(
        &proxy
            .conn("sd_pause")
            .replace("dbname=sd_pause", "dbname=pgsluice"),
    )
    .await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let pause =
        tokio::spawn(async move { console.simple_query("PAUSE sd_pause").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let queued = tokio::spawn(async move { queued.simple_query("SELECT 1").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pause.is_finished() && !queued.is_finished(), "paused");
    let began = Instant::now();
    proxy.sigterm();
    let e = tokio::time::timeout(Duration::from_secs(5), pause)
        .await
        .expect("the console is closed at once")
        .unwrap()
        .unwrap_err();
    assert_eq!(code(&e), "57P01", "{e}");
    // The request it held back is told to go elsewhere, as every queued one in a drain.
    let e = tokio::time::timeout(Duration::from_secs(5), queued)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(code(&e), "57P01", "{e}");
    holder.batch_execute("COMMIT").await.unwrap();
    let (status, at) = proxy.exit(Duration::from_secs(15)).await;
    assert_eq!(status, Some(0));
    assert!(
        at.duration_since(began) < Duration::from_secs(5),
        "exited after {:?}",
        at.duration_since(began)
    );
}
