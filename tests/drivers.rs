//! Real drivers of other languages through a transaction-mode pool smaller than the client
//! count: psycopg 3 with `prepare_threshold=0` and node-postgres named queries. The scripts
//! are in tests/drivers/; they check every row and exit non-zero with the reason on any
//! wrong one.
//!
//! The drivers are installed on first use under target/drivers/ (a virtualenv with
//! psycopg[binary] from PyPI, and `pg` from the npm registry); `.ci/run` installs them
//! beforehand.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::*;

/// Client counts of the scripts: well above the pool size.
const CLIENTS: &str = "24";
const ITERATIONS: &str = "30";
const POOL: &str = "pool_size = 4\nmax_prepared_statements = 20";
/// Longest a script may run (it has a watchdog of its own, a little shorter).
const SCRIPT_SECS: u32 = 180;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn drivers_dir() -> PathBuf {
    root().join("target").join("drivers")
}

fn run(c: &mut Command, what: &str) -> String {
    let out = c.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{text}",
        out.status
    );
    text
}

fn works(c: &mut Command) -> bool {
    c.output().map(|o| o.status.success()).unwrap_or(false)
}

/// The virtualenv's python with psycopg 3 importable, created if missing.
fn psycopg_python() -> &'static Path {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        let venv = drivers_dir().join("venv");
        let py = venv.join("bin").join("python");
        let import = |py: &Path| works(Command::new(py).args(["-c", "import psycopg"]));
        if py.exists() && import(&py) {
            return py;
        }
        std::fs::create_dir_all(drivers_dir()).unwrap();
        if !py.exists() {
            run(
                Command::new("python3").args(["-m", "venv"]).arg(&venv),
                "python3 -m venv target/drivers/venv (on Debian's python, install python3-venv; .ci/run does)",
            );
        }
        run(
            Command::new(&py).args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "psycopg[binary]>=3.1,<4"]),
            "pip install psycopg[binary]",
        );
        assert!(import(&py), "psycopg does not import after pip install");
        py
    })
}

/// target/drivers/node/node_modules with `pg` in it, installed if missing.
fn node_modules() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let prefix = drivers_dir().join("node");
        let modules = prefix.join("node_modules");
        let present = |m: &Path| {
            works(
                Command::new("node")
                    .args(["-e", "require('pg')"])
                    .env("NODE_PATH", m),
            )
        };
        if present(&modules) {
            return modules;
        }
        std::fs::create_dir_all(&prefix).unwrap();
        run(
            Command::new("npm")
                .args([
                    "install",
                    "--no-audit",
                    "--no-fund",
                    "--loglevel=error",
                    "--prefix",
                ])
                .arg(&prefix)
                .arg("pg@8"),
            "npm install pg",
        );
        assert!(present(&modules), "pg does not load after npm install");
        modules
    })
}

/// Runs a driver script against the proxy as app `name`, bounded in time; returns its
/// output, after asserting that it succeeded and said `ok_line`.
async fn run_script(
    proxy: &Proxy,
    name: &str,
    program: &Path,
    script: &str,
    args: &[&str],
    env: &[(&str, &Path)],
    ok_line: &str,
) -> String {
    let mut c = Command::new("timeout");
    c.args(["-k", "5", &SCRIPT_SECS.to_string()])
        .arg(program)
        .arg(root().join("tests").join("drivers").join(script))
        .args([CLIENTS, ITERATIONS])
        .args(args)
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", proxy.addr.port().to_string())
        .env("PGUSER", name)
        .env("PGPASSWORD", format!("{name}-pw"))
        .env("PGDATABASE", name)
        .env("PGSSLMODE", "disable")
        .env("PGAPPNAME", script)
        .env("DRIVER_DEADLINE", (SCRIPT_SECS - 10).to_string())
        .stdin(std::process::Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    let out = tokio::task::spawn_blocking(move || c.output().expect("run the driver script"))
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{script} failed ({}):\n{text}",
        out.status
    );
    assert!(
        text.lines().any(|l| l.starts_with(ok_line)),
        "{script} did not report success:\n{text}"
    );
    eprintln!("{}", text.trim_end());
    text
}

/// After a script: the pool never went over its size, and the proxy is still healthy.
async fn after(proxy: &Proxy, name: &str) {
    let admin = pg().admin().await;
    assert!(server_conns(&admin, name).await <= 4);
    let c = proxy.client(name).await;
    assert_eq!(scalar(&c, "SELECT 1").await, "1");
}

/// psycopg 3, every query prepared by name (`_pg3_N`, the same names on every connection),
/// 24 threads then 24 asyncio tasks over 4 servers: ROLLBACK cache flushes (psycopg's own
/// `DEALLOCATE ALL`), failing statements, executemany in pipeline mode, server-side cursors,
/// cursors closed and reopened. Leaves out the application's own `conn.execute("DEALLOCATE
/// ALL")`, which the next test adds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg3_prepare_threshold_0() {
    let py = tokio::task::spawn_blocking(psycopg_python).await.unwrap();
    let proxy = app("drv_psycopg", POOL).await;
    run_script(
        &proxy,
        "drv_psycopg",
        py,
        "psycopg_check.py",
        &["no-sql-deallocate"],
        &[],
        "psycopg OK",
    )
    .await;
    after(&proxy, "drv_psycopg").await;
}

/// The same with `conn.execute("DEALLOCATE ALL")` from the application, which psycopg sends
/// as a named prepared statement (Parse/Bind/Execute), as any driver using the extended
/// protocol does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg3_execute_deallocate_all() {
    let py = tokio::task::spawn_blocking(psycopg_python).await.unwrap();
    let proxy = app("drv_psycopg_dealloc", POOL).await;
    run_script(
        &proxy,
        "drv_psycopg_dealloc",
        py,
        "psycopg_check.py",
        &["full"],
        &[],
        "psycopg OK",
    )
    .await;
    after(&proxy, "drv_psycopg_dealloc").await;
}

/// node-postgres named queries (`{name, text, values}`): Parse once per connection, then
/// only Bind/Execute under the name, from 24 concurrent clients and a pg.Pool over 4 servers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_named_queries() {
    let modules = tokio::task::spawn_blocking(node_modules).await.unwrap();
    let proxy = app("drv_node", POOL).await;
    run_script(
        &proxy,
        "drv_node",
        Path::new("node"),
        "node_pg_check.js",
        &[],
        &[("NODE_PATH", modules)],
        "node-postgres OK",
    )
    .await;
    after(&proxy, "drv_node").await;
}
