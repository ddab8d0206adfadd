//! A throwaway PostgreSQL per test binary or test, from the library's
//! [`pgsluice::demo::postgres`] (the one `pgsluice demo` starts): `initdb` in a temp dir, a
//! free port, `pg_ctl start`; as root, run as the `postgres` user. A watchdog stops the
//! server and removes its directory when the test process exits.

use std::path::{Path, PathBuf};
use std::process::Command;

use pgsluice::demo::postgres;

/// Password of the `postgres` superuser in every test cluster.
pub const SUPERUSER_PASSWORD: &str = "postgres-pw";

pub struct TestPostgres {
    pub port: u16,
    pub dir: PathBuf,
    pub bin: PathBuf,
}

fn pg_command(bin: &Path, name: &str) -> Command {
    postgres::pg_command(bin, name)
}

pub fn free_port() -> u16 {
    postgres::free_port().unwrap()
}

fn run(c: &mut Command, what: &str) {
    let out = c.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestPostgres {
    /// Starts a cluster with the given extra `postgresql.conf` lines. It runs until the
    /// test process exits.
    pub fn start(extra_conf: &[&str]) -> TestPostgres {
        let bin = postgres::find_binaries().unwrap_or_else(|e| panic!("{e}"));
        let opts = postgres::Options {
            prefix: "pgsluice-test-".into(),
            superuser_password: SUPERUSER_PASSWORD.into(),
            conf: extra_conf.iter().map(|l| l.to_string()).collect(),
        };
        let pg = postgres::Throwaway::start(&bin, &opts).unwrap_or_else(|e| panic!("{e}"));
        let (port, dir, bin) = pg.keep_until_exit();
        TestPostgres { port, dir, bin }
    }

    pub fn ctl_start(&self) {
        let mut c = pg_command(&self.bin, "pg_ctl");
        c.arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("log"))
            .args(["-w", "-t", "60", "start"]);
        run(&mut c, "pg_ctl start");
    }

    pub fn ctl_stop(&self) {
        let mut c = pg_command(&self.bin, "pg_ctl");
        c.arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "fast", "-w", "stop"]);
        run(&mut c, "pg_ctl stop");
    }

    /// `pg_ctl stop -m mode` (`smart`, `fast`, `immediate`); `wait` for it to finish.
    pub fn ctl_stop_mode(&self, mode: &str, wait: bool) {
        let mut c = pg_command(&self.bin, "pg_ctl");
        c.arg("-D").arg(self.dir.join("data")).args([
            "-m",
            mode,
            if wait { "-w" } else { "-W" },
            "stop",
        ]);
        run(&mut c, "pg_ctl stop");
    }

    /// A handle on the same cluster, to start or stop it from another task.
    pub fn handle(&self) -> TestPostgres {
        TestPostgres {
            port: self.port,
            dir: self.dir.clone(),
            bin: self.bin.clone(),
        }
    }

    /// `ctl_start` without blocking the runtime (the proxy keeps running meanwhile).
    pub async fn start_async(&self) {
        let h = self.handle();
        tokio::task::spawn_blocking(move || h.ctl_start())
            .await
            .unwrap();
    }

    /// `ctl_stop_mode` without blocking the runtime.
    pub async fn stop_async(&self, mode: &'static str) {
        let h = self.handle();
        tokio::task::spawn_blocking(move || h.ctl_stop_mode(mode, true))
            .await
            .unwrap();
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// A libpq-style connection string to the server itself.
    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        format!("postgres://{user}:{password}@127.0.0.1:{}/{db}", self.port)
    }

    /// Connects directly (not through the proxy) as the superuser.
    pub async fn admin(&self) -> tokio_postgres::Client {
        super::connect(&format!(
            "host=127.0.0.1 port={} user=postgres password={SUPERUSER_PASSWORD} dbname=postgres",
            self.port
        ))
        .await
    }

    /// Creates a role `name` (password `name`-pw) and a database `name` it owns.
    pub async fn create_app(&self, name: &str) {
        let admin = self.admin().await;
        admin
            .batch_execute(&format!("CREATE ROLE {name} LOGIN PASSWORD '{name}-pw'"))
            .await
            .unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {name} OWNER {name}"))
            .await
            .unwrap();
    }

    /// Path of a PostgreSQL client binary (psql, pgbench).
    pub fn client_bin(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }
}
