//! Real clients (psql, pgbench) against the built `pgsluice` binary in quick mode.

mod common;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::*;

/// The pgsluice binary, started in quick mode; killed when dropped.
struct Binary {
    child: Child,
    port: u16,
}

impl Binary {
    async fn start(name: &str, extra: &[&str]) -> Binary {
        let pg = pg();
        let port = pg::free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_pgsluice"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--upstream", &pg.url(name, &format!("{name}-pw"), name)])
            .args(extra)
            .env("PGSLUICE_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("start pgsluice");
        let up = eventually(Duration::from_secs(10), || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        assert!(up, "pgsluice listens");
        Binary { child, port }
    }

    fn client(&self, prog: &str, name: &str) -> Command {
        let mut c = Command::new(pg().client_bin(prog));
        c.args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", name])
            .env("PGPASSWORD", format!("{name}-pw"))
            .env("PGCONNECT_TIMEOUT", "10");
        c
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn psql_queries_and_copy() {
    pg().create_app("viapsql").await;
    let proxy = Binary::start("viapsql", &["--pool-size", "2"]).await;
    let out = proxy
        .client("psql", "viapsql")
        .args(["-d", "viapsql", "-AtX", "-c", "SELECT 6 * 7"])
        .output()
        .unwrap();
    assert_eq!(ok(out, "psql -c").trim(), "42");

    // COPY FROM STDIN through the proxy (simple protocol), then COPY TO STDOUT.
    let data: String = (1..=1000).map(|i| format!("{i}\tname {i}\n")).collect();
    let script = "CREATE TABLE people (id int, name text);\n\\copy people FROM STDIN\n";
    let mut child = proxy
        .client("psql", "viapsql")
        .args(["-d", "viapsql", "-X", "-v", "ON_ERROR_STOP=1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(script.as_bytes()).unwrap();
        stdin.write_all(data.as_bytes()).unwrap();
        stdin.write_all(b"\\.\n").unwrap();
    }
    ok(child.wait_with_output().unwrap(), "psql \\copy in");
    let out = proxy
        .client("psql", "viapsql")
        .args([
            "-d",
            "viapsql",
            "-AtX",
            "-c",
            "SELECT count(*), sum(id) FROM people",
        ])
        .output()
        .unwrap();
    assert_eq!(ok(out, "count").trim(), "1000|500500");
    let out = proxy
        .client("psql", "viapsql")
        .args([
            "-d",
            "viapsql",
            "-X",
            "-c",
            "\\copy (SELECT id, name FROM people ORDER BY id) TO STDOUT",
        ])
        .output()
        .unwrap();
    assert_eq!(ok(out, "psql \\copy out"), data);

    // A COPY that fails midway leaves the server clean for the next client.
    let bad = proxy
        .client("psql", "viapsql")
        .args([
            "-d",
            "viapsql",
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            "\\copy people FROM STDIN",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut child = bad;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"1\tok\nnot-a-number\tbad\n\\.\n")
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(!out.status.success(), "a bad row fails the COPY");
        assert!(String::from_utf8_lossy(&out.stderr).contains("invalid input syntax"));
    }
    let out = proxy
        .client("psql", "viapsql")
        .args(["-d", "viapsql", "-AtX", "-c", "SELECT count(*) FROM people"])
        .output()
        .unwrap();
    assert_eq!(ok(out, "count after failed copy").trim(), "1000");
}

/// The load test: 200 pgbench clients over a pool of 10, zero failed transactions,
/// and never more than 10 server connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_200_clients_over_10_servers() {
    let pg = pg();
    pg.create_app("bench").await;
    let init = Command::new(pg.client_bin("pgbench"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port.to_string(),
            "-U",
            "bench",
            "-i",
            "-s",
            "2",
            "-q",
            "bench",
        ])
        .env("PGPASSWORD", "bench-pw")
        .output()
        .unwrap();
    ok(init, "pgbench -i");
    let proxy = Binary::start("bench", &["--pool-size", "10", "--max-client-conn", "400"]).await;
    let admin = pg.admin().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let watcher = tokio::spawn(async move {
        let mut max = 0;
        for _ in 0..400 {
            if stop2.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            max = max.max(server_conns(&admin, "bench").await);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        max
    });
    let mut bench = proxy.client("pgbench", "bench");
    bench.args(["-S", "-c", "200", "-j", "2", "-T", "5", "bench"]);
    let out = tokio::task::spawn_blocking(move || bench.output().unwrap())
        .await
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let text = ok(out, "pgbench -S -c 200");
    let max = watcher.await.unwrap();
    eprintln!("{text}");
    assert!(
        text.contains("number of failed transactions: 0 (0.000%)"),
        "{text}"
    );
    let processed: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split('/').next()?.trim().parse().ok())
        .expect("pgbench reports processed transactions");
    assert!(processed > 1000, "{processed} transactions");
    assert!(max <= 10, "{max} server connections with pool_size 10");

    // The default TPC-B-like script (multi-statement transactions) through the proxy too.
    let mut tpcb = proxy.client("pgbench", "bench");
    tpcb.args(["-c", "20", "-j", "2", "-t", "50", "bench"]);
    let text = ok(
        tokio::task::spawn_blocking(move || tpcb.output().unwrap())
            .await
            .unwrap(),
        "pgbench tpcb",
    );
    assert!(
        text.contains("number of failed transactions: 0 (0.000%)"),
        "{text}"
    );
    assert!(
        text.contains("number of transactions actually processed: 1000/1000"),
        "{text}"
    );
}

#[tokio::test]
async fn check_config_flag() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[databases.a]\n[users.a]\npassword = \"p\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pgsluice"))
        .arg("--check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success());
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "pool_size = 0\n[databases.a]\n[users.a]\npassword = \"p\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pgsluice"))
        .arg("--check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pool_size: must be at least 1"));
}

/// `--log-format json` writes one JSON object per line.
#[tokio::test]
async fn json_logs() {
    pg().create_app("jsonlog").await;
    let port = pg::free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgsluice"))
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--log-format",
            "json",
        ])
        .args(["--upstream", &pg().url("jsonlog", "jsonlog-pw", "jsonlog")])
        .env("PGSLUICE_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut first = String::new();
        std::io::BufReader::new(stderr)
            .read_line(&mut first)
            .unwrap();
        first
    });
    let line = tokio::time::timeout(Duration::from_secs(10), line)
        .await
        .unwrap()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let v: serde_json::Value =
        serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["level"], "INFO", "{line}");
    assert!(v["message"].as_str().is_some(), "{line}");
}
