//! A throwaway PostgreSQL from the installed binaries: `initdb` in a temp dir, a free port,
//! `pg_ctl start`; stopped and removed when dropped. Used by `pgsluice demo` and by the
//! test harness.
//!
//! - As root, the binaries run as the `postgres` user through `runuser` (PostgreSQL refuses
//!   to run as root), with the temp dir handed to that user.
//! - Every PostgreSQL process runs in its own process group, so a Ctrl-C in the terminal
//!   reaches only pgsluice, which then stops the server in order.
//! - A watchdog (a small `sh` loop) stops the server and removes the directory if this
//!   process dies without doing it (SIGKILL, abort).

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Where the server binaries were looked for, for the message when none are found.
pub const SEARCHED: &str =
    "$PG_BIN, /usr/lib/postgresql/*/bin, /usr/pgsql-*/bin, /usr/local/pgsql/bin and $PATH";

/// Finds a directory holding `initdb`, `pg_ctl` and `postgres`: `$PG_BIN`, else the newest
/// Debian (`/usr/lib/postgresql/N/bin`) or RPM (`/usr/pgsql-N/bin`) install, else
/// `/usr/local/pgsql/bin`, else `$PATH`.
pub fn find_binaries() -> Result<PathBuf, String> {
    let usable = |d: &Path| {
        ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|b| d.join(b).is_file())
    };
    if let Some(dir) = std::env::var_os("PG_BIN") {
        let dir = PathBuf::from(dir);
        return if usable(&dir) {
            Ok(dir)
        } else {
            Err(format!(
                "PG_BIN={} does not hold initdb, pg_ctl and postgres",
                dir.display()
            ))
        };
    }
    let mut versioned: Vec<(u32, PathBuf)> = Vec::new();
    for (parent, prefix) in [("/usr/lib/postgresql", ""), ("/usr", "pgsql-")] {
        let Ok(entries) = std::fs::read_dir(parent) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(v) = name.strip_prefix(prefix) else {
                continue;
            };
            // "15", "9.6": order by the major number.
            let major = v.split('.').next().and_then(|m| m.parse().ok());
            if let Some(major) = major {
                versioned.push((major, e.path().join("bin")));
            }
        }
    }
    versioned.sort();
    let mut candidates: Vec<PathBuf> = versioned.into_iter().rev().map(|(_, p)| p).collect();
    candidates.push(PathBuf::from("/usr/local/pgsql/bin"));
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path));
    }
    candidates.into_iter().find(|d| usable(d)).ok_or_else(|| {
        format!(
            "no PostgreSQL server binaries (initdb, pg_ctl, postgres) found in {SEARCHED}.\n\
             Install PostgreSQL (Debian/Ubuntu: apt install postgresql; Fedora/RHEL: dnf install \
             postgresql-server; macOS: brew install postgresql@16), or set PG_BIN to the \
             directory that holds initdb"
        )
    })
}

/// True when this process runs as root.
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // Linux: /proc/self belongs to the process's user. Elsewhere, ask `id`.
    match std::fs::metadata("/proc/self") {
        Ok(m) => m.uid() == 0,
        Err(_) => Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout.starts_with(b"0\n"))
            .unwrap_or(false),
    }
}

/// A command running the PostgreSQL binary `name` from `bin`: as `postgres` when we are
/// root, in a process group of its own.
pub fn pg_command(bin: &Path, name: &str) -> Command {
    let mut c = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(name));
        c
    } else {
        Command::new(bin.join(name))
    };
    c.process_group(0).stdin(Stdio::null());
    c
}

/// A TCP port free on 127.0.0.1 at the time of asking, and not handed out before by this
/// process. The kernel may give a port it gave a moment ago to the next `bind(0)` once the
/// first is closed: two servers started side by side (the tests run many at once) would
/// then be given the same port, and the second would fail to listen, or a client of it
/// would reach the first.
pub fn free_port() -> std::io::Result<u16> {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if GIVEN.lock().unwrap_or_else(|p| p.into_inner()).insert(port) {
            return Ok(port);
        }
    }
}

fn run(c: &mut Command, what: &str) -> Result<Output, String> {
    let out = c.output().map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(out)
}

/// How to set the cluster up.
#[derive(Debug, Clone)]
pub struct Options {
    /// Prefix of the temp dir's name.
    pub prefix: String,
    /// Password of the `postgres` superuser (SCRAM on every connection).
    pub superuser_password: String,
    /// Extra `postgresql.conf` lines, after the defaults (later lines win).
    pub conf: Vec<String>,
}

/// A running throwaway cluster. Dropping it stops the server and removes its directory,
/// unless [`Throwaway::keep_until_exit`] was called.
#[derive(Debug)]
pub struct Throwaway {
    pub port: u16,
    /// The temp dir: `data/` (the cluster), `log` (the server log), the Unix socket.
    pub dir: PathBuf,
    pub bin: PathBuf,
    /// `pg_ctl --version`, e.g. "pg_ctl (PostgreSQL) 15.8".
    pub version: String,
    cleanup: bool,
}

impl Throwaway {
    /// `initdb` (SCRAM, UTF8, C locale, no fsync), then `pg_ctl start` on a free port of
    /// 127.0.0.1. Blocks for a few seconds.
    pub fn start(bin: &Path, opts: &Options) -> Result<Throwaway, String> {
        let root = is_root();
        if root
            && Command::new("id")
                .arg("postgres")
                .output()
                .map(|o| !o.status.success())
                .unwrap_or(true)
        {
            return Err("running as root, and PostgreSQL refuses to: there is no `postgres` user to run it as (run as an ordinary user, or create that user)".into());
        }
        let version = run(
            Command::new(bin.join("pg_ctl")).arg("--version"),
            "pg_ctl --version",
        )
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())?;
        let dir = tempfile::Builder::new()
            .prefix(&opts.prefix)
            .tempdir()
            .map_err(|e| format!("cannot create a temp dir: {e}"))?
            .keep();
        // From here on, dropping `me` removes the directory (and stops the server).
        let mut me = Throwaway {
            port: 0,
            dir: dir.clone(),
            bin: bin.to_owned(),
            version,
            cleanup: true,
        };
        let pwfile = dir.join("pw");
        std::fs::write(&pwfile, &opts.superuser_password)
            .map_err(|e| format!("{}: {e}", pwfile.display()))?;
        if root {
            run(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&dir),
                "chown",
            )?;
        }
        let data = dir.join("data");
        let mut initdb = pg_command(bin, "initdb");
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
        run(&mut initdb, "initdb")?;
        let _ = std::fs::remove_file(&pwfile);
        me.port = free_port().map_err(|e| format!("no free port: {e}"))?;
        let mut conf = format!(
            "\n# pgsluice throwaway cluster\nport = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 100\nshared_buffers = 32MB\n",
            me.port,
            dir.display()
        );
        for line in &opts.conf {
            conf.push_str(line);
            conf.push('\n');
        }
        let conf_path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path)
            .map_err(|e| format!("{}: {e}", conf_path.display()))?;
        text.push_str(&conf);
        std::fs::write(&conf_path, text).map_err(|e| format!("{}: {e}", conf_path.display()))?;
        me.watchdog()?;
        me.ctl_start()?;
        Ok(me)
    }

    /// Starts a `sh` loop that stops the server and removes the directory once this
    /// process is gone, however it ended.
    fn watchdog(&self) -> Result<(), String> {
        let pg_ctl = if is_root() {
            format!(
                "runuser -u postgres -- '{}'",
                self.bin.join("pg_ctl").display()
            )
        } else {
            format!("'{}'", self.bin.join("pg_ctl").display())
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; if [ -d '{data}' ]; then {pg_ctl} -D '{data}' -m immediate stop; rm -rf '{dir}'; fi",
            pid = std::process::id(),
            data = self.dir.join("data").display(),
            dir = self.dir.display(),
        );
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(drop)
            .map_err(|e| format!("cannot start the cleanup watchdog: {e}"))
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The server log's last lines, to explain a failure.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// `pg_ctl start`, waiting up to 60 s for the server to accept connections.
    pub fn ctl_start(&self) -> Result<(), String> {
        let mut c = pg_command(&self.bin, "pg_ctl");
        c.arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.join("log"))
            .args(["-w", "-t", "60", "start"]);
        run(&mut c, "pg_ctl start").map(drop).map_err(|e| {
            format!(
                "{e}\nserver log ({}):\n{}",
                self.dir.join("log").display(),
                self.log_tail(20)
            )
        })
    }

    /// `pg_ctl stop` in the given mode (`smart`, `fast`, `immediate`), waiting for it.
    pub fn ctl_stop(&self, mode: &str) -> Result<(), String> {
        let mut c = pg_command(&self.bin, "pg_ctl");
        c.arg("-D")
            .arg(self.data())
            .args(["-m", mode, "-w", "-t", "30", "stop"]);
        run(&mut c, "pg_ctl stop").map(drop)
    }

    /// True while the server's postmaster runs (its pid file exists).
    pub fn is_running(&self) -> bool {
        self.data().join("postmaster.pid").exists()
    }

    /// A libpq-style URL to the server itself.
    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        format!("postgres://{user}:{password}@127.0.0.1:{}/{db}", self.port)
    }

    /// Leaves the server running until this process exits (the watchdog then stops it and
    /// removes its directory): for test harnesses that share one server.
    pub fn keep_until_exit(mut self) -> (u16, PathBuf, PathBuf) {
        self.cleanup = false;
        (self.port, self.dir.clone(), self.bin.clone())
    }

    /// Stops the server (fast, else immediate) and removes its directory.
    pub fn remove(mut self) -> Result<(), String> {
        self.cleanup = false;
        self.clean()
    }

    fn clean(&self) -> Result<(), String> {
        let mut stopped = Ok(());
        if self.is_running() {
            if let Err(e) = self.ctl_stop("fast") {
                stopped = self
                    .ctl_stop("immediate")
                    .map_err(|e2| format!("{e}; {e2}"));
            }
        }
        let removed = std::fs::remove_dir_all(&self.dir)
            .map_err(|e| format!("cannot remove {}: {e}", self.dir.display()));
        stopped.and(removed)
    }
}

impl Drop for Throwaway {
    fn drop(&mut self) {
        if self.cleanup {
            if let Err(e) = self.clean() {
                eprintln!("pgsluice: cleaning up the throwaway PostgreSQL: {e}");
            }
        }
    }
}
