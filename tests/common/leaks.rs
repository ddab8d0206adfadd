//! The leak checks of the reliability catalogue, as one assertion run after a scenario:
//!
//! ```ignore
//! let leaks = Leaks::new(&proxy, "app").await;   // baseline, before the scenario
//! ... the scenario; then close the scenario's clients ...
//! leaks.check().await;                          // or leaks.holding(2).check() if 2 stay open
//! ```
//!
//! Once activity has stopped (each check is retried for a few seconds):
//! 1. the proxy's server connections in `pg_stat_activity` (backends of its roles) equal its
//!    `pgsluice_server_connections` gauge, and fit `pgsluice_budget_connections`;
//! 2. none of them is idle in a transaction;
//! 3. none is busy waiting for the proxy (`wait_event = 'ClientRead'`, state not idle);
//! 4. the client gauges and logins in progress are back at baseline (plus the clients the
//!    test still holds), and no sample of `/metrics` is negative;
//! 5. file descriptors: for a child process, its fd count is within baseline + 2; in process
//!    (other tests share the process), the proxy's accepted client sockets equal the
//!    clients it should hold, and no socket of the process on the proxy's port or the
//!    upstream's port sits in CLOSE_WAIT (the peer left and the proxy never noticed);
//! 6. RSS is within baseline + 5 MB for a child process; in process only a coarse bound
//!    (64 MB: other tests run alongside), which still catches memory sized by a declared length;
//! 7. a fresh client's `SELECT 1` succeeds within 1 s;
//! 8. no panic: in process, no panic outside the test files since the baseline (a panic
//!    hook counts them); for a child, no "panicked" in its log and it is still running.
//!
//! Backends of the proxy's roles are counted by `usename`: the test must not hold direct
//! connections as those roles when it checks (use the superuser for direct checks).

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::child::ProxyProcess;
use super::Proxy;

/// Panics since the process started whose location is not in a test file.
static PANICS: AtomicUsize = AtomicUsize::new(0);
static PANIC_SITES: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn install_panic_counter() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let site = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            if !site.starts_with("tests/") {
                PANICS.fetch_add(1, Ordering::SeqCst);
                if let Ok(mut s) = PANIC_SITES.lock() {
                    s.push(format!("{site}: {info}"));
                }
            }
            previous(info)
        }));
    });
}

/// The proxy under test: in this process, or a child.
#[derive(Clone, Copy)]
pub enum Target<'a> {
    InProcess(&'a Proxy),
    Child(&'a ProxyProcess),
}

impl<'a> From<&'a Proxy> for Target<'a> {
    fn from(p: &'a Proxy) -> Self {
        Target::InProcess(p)
    }
}

impl<'a> From<&'a ProxyProcess> for Target<'a> {
    fn from(p: &'a ProxyProcess) -> Self {
        Target::Child(p)
    }
}

impl Target<'_> {
    fn port(&self) -> u16 {
        match self {
            Target::InProcess(p) => p.addr.port(),
            Target::Child(p) => p.port,
        }
    }

    async fn scrape(&self) -> Metrics {
        let text = match self {
            Target::InProcess(p) => {
                String::from_utf8(pgsluice::metrics::scrape(&p.shared)).unwrap()
            }
            Target::Child(p) => p.scrape().await,
        };
        Metrics::parse(&text)
    }

    fn pid(&self) -> u32 {
        match self {
            Target::InProcess(_) => std::process::id(),
            Target::Child(p) => p.pid(),
        }
    }
}

/// One sample: the metric's name, its labels and its value.
type Sample = (String, Vec<(String, String)>, f64);

/// Samples of one scrape, by name.
pub struct Metrics(Vec<Sample>);

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
        Metrics(
            scrape
                .samples
                .into_iter()
                .filter_map(|s| {
                    let v = match s.value {
                        prometheus_parse::Value::Counter(v)
                        | prometheus_parse::Value::Gauge(v)
                        | prometheus_parse::Value::Untyped(v) => v,
                        _ => return None,
                    };
                    let labels = s
                        .labels
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    Some((s.metric, labels, v))
                })
                .collect(),
        )
    }

    /// The sum of every sample of `name` whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }

    fn negative(&self) -> Vec<String> {
        self.0
            .iter()
            .filter(|(_, _, v)| *v < 0.0)
            .map(|(n, l, v)| format!("{n}{l:?} = {v}"))
            .collect()
    }
}

/// The in-process or child proxy's metrics now.
pub async fn metrics<'a>(target: impl Into<Target<'a>>) -> Metrics {
    target.into().scrape().await
}

/// A TCP socket from /proc/net/tcp{,6}.
#[derive(Debug)]
struct Socket {
    local_port: u16,
    remote_port: u16,
    state: u8,
    inode: u64,
}

const TCP_LISTEN: u8 = 0x0A;

/// The proxy's accepted client sockets on its listening `port`.
fn proxy_client_sockets(pid: u32, port: u16) -> Vec<Socket> {
    let inodes = socket_inodes(pid);
    sockets()
        .into_iter()
        .filter(|s| s.local_port == port && s.state != TCP_LISTEN && inodes.contains(&s.inode))
        .collect()
}
const TCP_CLOSE_WAIT: u8 = 0x08;

fn sockets() -> Vec<Socket> {
    let mut out = Vec::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 10 {
                continue;
            }
            let port = |a: &str| {
                a.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
                    .unwrap_or(0)
            };
            out.push(Socket {
                local_port: port(cols[1]),
                remote_port: port(cols[2]),
                state: u8::from_str_radix(cols[3], 16).unwrap_or(0),
                inode: cols[9].parse().unwrap_or(0),
            });
        }
    }
    out
}

/// Inodes of the sockets a process holds.
fn socket_inodes(pid: u32) -> HashSet<u64> {
    let mut out = HashSet::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in dir.flatten() {
            if let Ok(link) = std::fs::read_link(e.path()) {
                let l = link.to_string_lossy();
                if let Some(n) = l.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                    if let Ok(n) = n.parse() {
                        out.insert(n);
                    }
                }
            }
        }
    }
    out
}

/// Open file descriptors of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Resident set size of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// Peak resident set size of a process since it started or since [`reset_peak_rss`], in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

/// A figure in KiB from `/proc/PID/status` (0 if absent).
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The fields of `/proc/net/tcp`'s line for the IPv4 connection from `local_port` to
/// `remote_port` on this host (`tr:tm->when` is field 5, the inode field 9).
pub fn tcp_row(local_port: u16, remote_port: u16) -> Option<Vec<String>> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next()?, 16).ok();
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (port(f[1])? == local_port && port(f[2])? == remote_port)
            .then(|| f.iter().map(|s| s.to_string()).collect())
    })
}

/// Starts [`peak_rss_kib`] again from the current resident size.
pub fn reset_peak_rss(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset the peak RSS");
}

/// What the proxy looked like before the scenario.
pub struct Leaks<'a> {
    target: Target<'a>,
    /// Upstream roles whose backends are the proxy's.
    roles: Vec<String>,
    /// Ports of the upstreams (PostgreSQL or a `Fault` in front of it).
    upstream_ports: Vec<u16>,
    /// Connection string for the fresh `SELECT 1`.
    conn: String,
    clients: f64,
    logins: f64,
    servers: f64,
    client_sockets: usize,
    fds: usize,
    rss: u64,
    panics: usize,
    /// Clients the test still holds open at the check, beyond the baseline.
    holding: usize,
    rss_slack_kib: u64,
}

impl<'a> Leaks<'a> {
    /// Takes the baseline for app `name` (role, database `name`, password `name`-pw, as
    /// `common::app` sets up) on the binary's shared PostgreSQL.
    pub async fn new(target: impl Into<Target<'a>>, name: &str) -> Leaks<'a> {
        Self::with(
            target,
            &[name],
            super::pg().port,
            name,
            name,
            &format!("{name}-pw"),
        )
        .await
    }

    /// The baseline with everything spelled out: the proxy's upstream roles, the upstream
    /// port it connects to, and who the fresh client logs in as.
    pub async fn with(
        target: impl Into<Target<'a>>,
        roles: &[&str],
        upstream_port: u16,
        user: &str,
        database: &str,
        password: &str,
    ) -> Leaks<'a> {
        install_panic_counter();
        let target = target.into();
        // A connection just closed (a readiness probe, a setup client) may still be counted,
        // or its socket still be open on the proxy's side (CLOSE_WAIT) for a moment: let the
        // figures settle first, so that the baseline holds only connections that stay.
        let pid = target.pid();
        let port = target.port();
        let mut m = target.scrape().await;
        let mut client_sockets = proxy_client_sockets(pid, port);
        for _ in 0..40 {
            let closing = client_sockets.iter().any(|s| s.state == TCP_CLOSE_WAIT);
            if m.sum("pgsluice_client_logins_in_progress", &[]) == 0.0 && !closing {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            m = target.scrape().await;
            client_sockets = proxy_client_sockets(pid, port);
        }
        let client_sockets = client_sockets.len();
        let child = matches!(target, Target::Child(_));
        Leaks {
            target,
            roles: roles.iter().map(|r| r.to_string()).collect(),
            upstream_ports: vec![upstream_port],
            conn: format!(
                "host=127.0.0.1 port={port} user={user} password={password} dbname={database} connect_timeout=10"
            ),
            clients: m.sum("pgsluice_client_connections", &[]),
            logins: m.sum("pgsluice_client_logins_in_progress", &[]),
            servers: m.sum("pgsluice_server_connections", &[]),
            client_sockets,
            fds: fd_count(pid),
            rss: rss_kib(pid),
            panics: PANICS.load(Ordering::SeqCst),
            holding: 0,
            rss_slack_kib: if child { 5 * 1024 } else { 64 * 1024 },
        }
    }

    /// The test still holds `n` clients (opened after the baseline) at the check.
    pub fn holding(mut self, n: usize) -> Self {
        self.holding = n;
        self
    }

    /// The same baseline, expecting `n` held clients (for a check in the middle of a test).
    pub fn clone_holding(&self, n: usize) -> Leaks<'a> {
        Leaks {
            target: self.target,
            roles: self.roles.clone(),
            upstream_ports: self.upstream_ports.clone(),
            conn: self.conn.clone(),
            holding: n,
            ..*self
        }
    }

    /// Another upstream port whose sockets are checked for CLOSE_WAIT (a second server).
    pub fn upstream(mut self, port: u16) -> Self {
        self.upstream_ports.push(port);
        self
    }

    /// Allowed RSS growth, when a scenario legitimately keeps memory (allocator caches).
    pub fn rss_slack_mib(mut self, mib: u64) -> Self {
        self.rss_slack_kib = mib * 1024;
        self
    }

    /// Runs every check, retrying for up to 5 s until all hold; panics with what failed.
    pub async fn check(&self) {
        let admin = super::pg().admin().await;
        self.check_with(&admin).await
    }

    /// [`Leaks::check`] with a superuser connection to the proxy's PostgreSQL (for a
    /// PostgreSQL other than the binary's shared one).
    pub async fn check_with(&self, admin: &tokio_postgres::Client) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let problems = self.problems(admin).await;
            if problems.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                let log = match self.target {
                    Target::Child(p) => {
                        let l = p.log();
                        let tail: Vec<&str> = l.lines().rev().take(30).collect();
                        format!(
                            "\n--- last log lines ---\n{}",
                            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                        )
                    }
                    Target::InProcess(_) => String::new(),
                };
                panic!("leak check failed:\n  {}{log}", problems.join("\n  "));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // 7: a fresh client is served at once.
        let started = Instant::now();
        let fresh = super::try_connect(&self.conn).await;
        let c = fresh.unwrap_or_else(|e| panic!("leak check: a fresh client cannot log in: {e}"));
        let connected = started.elapsed();
        let r = tokio::time::timeout(Duration::from_secs(1), c.simple_query("SELECT 1")).await;
        assert!(
            matches!(r, Ok(Ok(_))),
            "leak check: a fresh SELECT 1 did not succeed within 1 s: {r:?} (login took {connected:?})"
        );
        drop(c);
    }

    /// One pass of checks 1-6 and 8, without retrying: what is wrong now.
    pub async fn problems(&self, admin: &tokio_postgres::Client) -> Vec<String> {
        let mut out = Vec::new();
        let m = self.target.scrape().await;
        // 1-3: the proxy's backends.
        let rows = admin
            .query(
                "SELECT coalesce(state, ''), coalesce(wait_event, ''), pid FROM pg_stat_activity \
                 WHERE usename = ANY($1) AND backend_type = 'client backend' \
                 AND application_name NOT LIKE 'pgsluice:fleet=%' AND pid <> pg_backend_pid()",
                &[&self.roles],
            )
            .await
            .expect("pg_stat_activity");
        let gauge = m.sum("pgsluice_server_connections", &[]);
        let budget = m.sum("pgsluice_budget_connections", &[]);
        if rows.len() as f64 != gauge {
            out.push(format!(
                "1: {} backends of {:?} in pg_stat_activity, but pgsluice_server_connections = {gauge}",
                rows.len(),
                self.roles
            ));
        }
        if budget > 0.0 && rows.len() as f64 > budget {
            out.push(format!(
                "1: {} backends, over the budget of {budget}",
                rows.len()
            ));
        }
        for r in &rows {
            let (state, wait, pid): (String, String, i32) = (r.get(0), r.get(1), r.get(2));
            if state.starts_with("idle in transaction") {
                out.push(format!("2: backend {pid} is {state}"));
            } else if state != "idle" && wait == "ClientRead" {
                out.push(format!(
                    "3: backend {pid} is {state}, waiting for the proxy (ClientRead)"
                ));
            }
        }
        // 4: client gauges.
        let clients = m.sum("pgsluice_client_connections", &[]);
        let want = self.clients + self.holding as f64;
        if clients != want {
            out.push(format!(
                "4: pgsluice_client_connections = {clients}, expected {want}"
            ));
        }
        let logins = m.sum("pgsluice_client_logins_in_progress", &[]);
        if logins != self.logins {
            out.push(format!(
                "4: pgsluice_client_logins_in_progress = {logins}, expected {}",
                self.logins
            ));
        }
        for n in m.negative() {
            out.push(format!("4: negative sample {n}"));
        }
        // 5: descriptors.
        let pid = self.target.pid();
        let port = self.target.port();
        let inodes = socket_inodes(pid);
        let mine: Vec<Socket> = sockets()
            .into_iter()
            .filter(|s| inodes.contains(&s.inode))
            .collect();
        let client_sockets = mine
            .iter()
            .filter(|s| s.local_port == port && s.state != TCP_LISTEN)
            .count();
        let want_sockets = self.client_sockets + self.holding;
        if client_sockets != want_sockets {
            out.push(format!(
                "5: the proxy holds {client_sockets} client sockets, expected {want_sockets}"
            ));
        }
        let stuck = mine
            .iter()
            .filter(|s| {
                s.state == TCP_CLOSE_WAIT
                    && (s.local_port == port || self.upstream_ports.contains(&s.remote_port))
            })
            .count();
        if stuck > 0 {
            out.push(format!(
                "5: {stuck} sockets in CLOSE_WAIT (peer gone, not closed by the proxy)"
            ));
        }
        match self.target {
            Target::Child(_) => {
                // Each held client and each server opened since the baseline is one more.
                let fds = fd_count(pid);
                let more_servers = (gauge - self.servers).max(0.0) as usize;
                let allowed = self.fds + 2 + self.holding + more_servers;
                if fds > allowed {
                    out.push(format!(
                        "5: {fds} file descriptors, baseline {} (+2, +{} held clients, +{more_servers} servers)",
                        self.fds, self.holding
                    ));
                }
            }
            Target::InProcess(_) => {}
        }
        // 6: memory.
        let rss = rss_kib(pid);
        if rss > self.rss + self.rss_slack_kib {
            out.push(format!(
                "6: RSS {rss} KiB, baseline {} KiB + {} KiB allowed",
                self.rss, self.rss_slack_kib
            ));
        }
        // 8: panics.
        match self.target {
            Target::InProcess(_) => {
                let n = PANICS.load(Ordering::SeqCst);
                if n > self.panics {
                    let sites = PANIC_SITES.lock().map(|s| s.join("\n")).unwrap_or_default();
                    out.push(format!(
                        "8: {} panics outside the tests:\n{sites}",
                        n - self.panics
                    ));
                }
            }
            Target::Child(p) => {
                if p.log().contains("panicked") {
                    out.push("8: the log shows a panic".into());
                }
                let state =
                    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                let alive = state
                    .lines()
                    .find_map(|l| l.strip_prefix("State:"))
                    .is_some_and(|s| !s.trim_start().starts_with('Z'));
                if !alive {
                    out.push("8: the process is gone".into());
                }
            }
        }
        out
    }
}
