//! pgsluice as a child process (the built binary), for what an in-process proxy cannot show:
//! its own file descriptors and RSS, a lowered `RLIMIT_NOFILE` (through the `prlimit`
//! binary: the crate forbids unsafe code, so no `setrlimit` in `pre_exec`), signals, its log.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::pg::free_port;

pub struct ProxyProcess {
    pub child: Child,
    pub port: u16,
    pub metrics_port: u16,
    dir: tempfile::TempDir,
}

/// How to start the child.
#[derive(Default)]
pub struct Options<'a> {
    /// `RLIMIT_NOFILE` (soft and hard) for the child.
    pub nofile: Option<u64>,
    /// Extra environment variables.
    pub env: &'a [(&'a str, &'a str)],
    /// Listen on this port (a restart on the same address) instead of a free one.
    pub port: Option<u16>,
}

impl ProxyProcess {
    /// Starts pgsluice with a TOML configuration; `listen` and `metrics.listen` are added
    /// (free ports) and must not be in `toml`. Logs (`PGSLUICE_LOG=info` unless `env` says
    /// otherwise) go to a file, read by [`ProxyProcess::log`].
    pub async fn start(toml: &str) -> ProxyProcess {
        Self::start_with(toml, Options::default()).await
    }

    pub async fn start_with(toml: &str, opts: Options<'_>) -> ProxyProcess {
        let dir = tempfile::Builder::new()
            .prefix("pgsluice-child-")
            .tempdir()
            .unwrap();
        let port = opts.port.unwrap_or_else(free_port);
        let metrics_port = free_port();
        let metrics = format!("[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n");
        let body = if toml.contains("[metrics]") {
            toml.replacen("[metrics]\n", &metrics, 1)
        } else {
            format!("{toml}\n{metrics}")
        };
        let config = dir.path().join("pgsluice.toml");
        std::fs::write(&config, format!("listen = \"127.0.0.1:{port}\"\n{body}")).unwrap();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let bin = env!("CARGO_BIN_EXE_pgsluice");
        let mut cmd = match opts.nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg("--").arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.arg("--config")
            .arg(&config)
            .env("PGSLUICE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // TEST_IO_URING=1: the child serves through io_uring (set in its environment, so
        // that a test rewriting the file for a reload keeps it).
        if super::io_uring_mode() {
            cmd.env("PGSLUICE_IO_URING", "1")
                .env("PGSLUICE_WORKER_THREADS", "1");
        }
        for (k, v) in opts.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start pgsluice");
        let p = ProxyProcess {
            child,
            port,
            metrics_port,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let up = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
                && tokio::net::TcpStream::connect(("127.0.0.1", metrics_port))
                    .await
                    .is_ok();
            if up {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "pgsluice did not start:\n{}",
                p.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process id of pgsluice itself (prlimit execs it, so it is the child's).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn conn(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} password={password} dbname={db}",
            self.port
        )
    }

    /// Connects as `name` (password `name`-pw) to database `name`.
    pub async fn client(&self, name: &str) -> tokio_postgres::Client {
        super::connect(&self.conn(name, &format!("{name}-pw"), name)).await
    }

    /// The configuration file (edit it, then `signal("HUP")`).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("pgsluice.toml")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("log")
    }

    /// Everything the process has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The Prometheus text of `/metrics`.
    pub async fn scrape(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_port))
            .await
            .expect("metrics endpoint");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
            .await
            .expect("metrics within 10 s")
            .unwrap();
        let text = String::from_utf8_lossy(&raw).into_owned();
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default()
    }

    /// Sends a signal by name (`TERM`, `HUP`, `KILL`, ...).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }

    /// Still running?
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits for the process to exit; its exit code.
    pub async fn exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "pgsluice did not exit within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
