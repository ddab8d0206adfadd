//! A throwaway PostgreSQL from the installed binaries: `initdb` in a temp dir, a free port,
//! `pg_ctl start`. As root, the binaries run as the `postgres` user (they refuse root).
//! A watchdog stops the server and removes its directory when the test process exits.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Password of the `postgres` superuser in every test cluster.
pub const SUPERUSER_PASSWORD: &str = "postgres-pw";

pub struct TestPostgres {
    pub port: u16,
    pub dir: PathBuf,
    pub bin: PathBuf,
}

fn bin_dir() -> PathBuf {
    if let Ok(p) = std::env::var("PG_BIN") {
        return PathBuf::from(p);
    }
    for v in ["17", "16", "15", "14"] {
        let p = PathBuf::from(format!("/usr/lib/postgresql/{v}/bin"));
        if p.join("initdb").exists() {
            return p;
        }
    }
    panic!("PostgreSQL binaries not found: install postgresql (Debian: /usr/lib/postgresql/N/bin) or set PG_BIN");
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

/// Runs a PostgreSQL binary, as `postgres` when we are root.
fn pg_command(bin: &Path, name: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(name));
        c
    } else {
        Command::new(bin.join(name))
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
    /// Starts a cluster with the given extra `postgresql.conf` lines.
    pub fn start(extra_conf: &[&str]) -> TestPostgres {
        let bin = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("pgsluice-test-")
            .tempdir()
            .unwrap()
            .keep();
        if is_root() {
            run(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&dir),
                "chown",
            );
        }
        let pwfile = dir.join("pw");
        std::fs::write(&pwfile, SUPERUSER_PASSWORD).unwrap();
        if is_root() {
            run(
                Command::new("chown")
                    .args(["postgres:postgres"])
                    .arg(&pwfile),
                "chown",
            );
        }
        let data = dir.join("data");
        let mut initdb = pg_command(&bin, "initdb");
        initdb
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=scram-sha-256",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .arg(format!("--pwfile={}", pwfile.display()));
        run(&mut initdb, "initdb");
        let port = free_port();
        let mut conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 100\nshared_buffers = 32MB\n",
            dir.display()
        );
        for line in extra_conf {
            conf.push_str(line);
            conf.push('\n');
        }
        let conf_path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).unwrap();
        text.push_str(&conf);
        std::fs::write(&conf_path, text).unwrap();
        let pg = TestPostgres {
            port,
            dir: dir.clone(),
            bin: bin.clone(),
        };
        pg.ctl_start();
        // Stop the server and remove its files once this test process has exited.
        let me = std::process::id();
        let stop = format!(
            "while kill -0 {me} 2>/dev/null; do sleep 0.5; done; {} -D {} -m immediate stop >/dev/null 2>&1; rm -rf {}",
            if is_root() { format!("runuser -u postgres -- {}", bin.join("pg_ctl").display()) } else { bin.join("pg_ctl").display().to_string() },
            data.display(),
            dir.display()
        );
        Command::new("sh")
            .arg("-c")
            .arg(stop)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        pg
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
