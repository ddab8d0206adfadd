//! What the demo shows: a reading of pgsluice's own figures (the pools, the budget, the
//! clients and the metrics) and the text made from it, live and at the end.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::app::Shared;
use crate::metrics::{clients_by_pool, ServerCounts};

/// pgsluice's figures at one moment, all pools and upstreams summed.
#[derive(Debug, Clone, Default)]
pub struct Reading {
    /// Server connections the budget allows this proxy (control connection included).
    pub budget: u32,
    pub budget_in_use: u32,
    pub max_connections: u32,
    /// Servers the pools hold, by state.
    pub servers: ServerCounts,
    pub clients_active: u32,
    pub clients_waiting: u32,
    pub clients_idle: u32,
    pub max_wait: Duration,
    /// Counters (since pgsluice started).
    pub checkout_timeouts: u64,
    pub transactions: u64,
    pub wait_sum: f64,
    pub wait_count: u64,
    /// Seconds servers sat idle inside transactions (the hoarding metric).
    pub hoarding: f64,
}

impl Reading {
    /// Reads the figures. Runs a metrics scrape first, as a Prometheus server would, so the
    /// hoarding counter includes transactions still open.
    pub fn take(shared: &Shared) -> Reading {
        let _ = crate::metrics::scrape(shared);
        let mut r = Reading::default();
        let now = Instant::now();
        let by_pool = clients_by_pool(&shared.clients.all(), now);
        for p in shared.pools.stats() {
            let c = by_pool
                .get(&(p.database.as_str().into(), p.user.as_str().into()))
                .cloned()
                .unwrap_or_default();
            let s = ServerCounts::of(&p, &c);
            r.servers.active += s.active;
            r.servers.idle += s.idle;
            r.servers.idle_in_transaction += s.idle_in_transaction;
            r.servers.login += s.login;
            r.clients_active += c.active;
            r.clients_waiting += c.waiting;
            r.clients_idle += c.idle;
            r.max_wait = r.max_wait.max(c.max_wait);
        }
        for (_, b) in shared.pools.budget_snapshots() {
            r.budget += b.limit;
            r.budget_in_use += b.in_use;
            r.max_connections += b.upstream.max_connections;
        }
        for p in shared.metrics.pool_handles() {
            r.checkout_timeouts += p.checkout_timeouts.get();
            r.transactions += p.transactions.get();
            r.wait_sum += p.client_wait.get_sample_sum();
            r.wait_count += p.client_wait.get_sample_count();
        }
        for a in shared.metrics.apps() {
            r.hoarding += a.idle_in_transaction.get();
        }
        r
    }

    /// Servers the pools hold (open or opening).
    pub fn servers_open(&self) -> u32 {
        let s = &self.servers;
        s.active + s.idle + s.idle_in_transaction + s.login
    }
}

/// What one phase did, from pgsluice's counters and the workers' own counts.
#[derive(Debug, Clone, Default)]
pub struct PhaseFigures {
    pub seconds: f64,
    pub products: u64,
    /// Requests refused with 53300 (pgsluice_checkout_timeouts_total).
    pub checkout_timeouts: u64,
    /// Other failures the workers saw.
    pub errors: u64,
    pub average_wait: f64,
    pub longest_wait: Duration,
    pub hoarding: f64,
    pub peak_in_use: u32,
    pub peak_waiting: u32,
    pub last_error: Option<String>,
}

impl PhaseFigures {
    /// The counters' growth from `start` to `end`; the peaks are tracked by the caller.
    pub fn between(start: &Reading, end: &Reading, seconds: f64) -> PhaseFigures {
        let waits = end.wait_count.saturating_sub(start.wait_count);
        PhaseFigures {
            seconds,
            checkout_timeouts: end
                .checkout_timeouts
                .saturating_sub(start.checkout_timeouts),
            average_wait: if waits == 0 {
                0.0
            } else {
                (end.wait_sum - start.wait_sum).max(0.0) / waits as f64
            },
            hoarding: (end.hoarding - start.hoarding).max(0.0),
            ..PhaseFigures::default()
        }
    }

    /// Keeps the highest figures seen while the phase runs.
    pub fn track_peaks(&mut self, r: &Reading) {
        self.longest_wait = self.longest_wait.max(r.max_wait);
        self.peak_in_use = self.peak_in_use.max(r.budget_in_use);
        self.peak_waiting = self.peak_waiting.max(r.clients_waiting);
    }

    pub fn per_minute(&self) -> f64 {
        if self.seconds <= 0.0 {
            0.0
        } else {
            self.products as f64 * 60.0 / self.seconds
        }
    }
}

/// A bar of `total` cells: `#` hoarding (idle in transaction), `=` working, `-` idle in the
/// pool, `.` not open.
fn bar(r: &Reading, total: u32) -> String {
    let s = &r.servers;
    let mut out = String::new();
    for (n, c) in [
        (s.idle_in_transaction, '#'),
        (s.active + s.login, '='),
        (s.idle, '-'),
    ] {
        out.extend(std::iter::repeat_n(c, n as usize));
    }
    let shown = out.chars().count() as u32;
    out.extend(std::iter::repeat_n(
        '.',
        total.saturating_sub(shown) as usize,
    ));
    out
}

/// Servers the pools may hold: the budget less the control connection.
pub fn pool_room(r: &Reading) -> u32 {
    r.budget.saturating_sub(1).max(r.servers_open())
}

/// The live block shown on a terminal, one line per entry; every line fits 80 columns
/// (a wrapped line would break the redraw).
pub fn live_block(
    title: &str,
    elapsed: Duration,
    length: Duration,
    r: &Reading,
    phase: &PhaseFigures,
    products: u64,
) -> Vec<String> {
    let room = pool_room(r);
    vec![
        format!(
            "{title}   {:.1} s of {:.0} s",
            elapsed.as_secs_f64(),
            length.as_secs_f64()
        ),
        format!(
            "  budget   {} of max_connections {}, {} in use (1 is pgsluice's own)",
            r.budget, r.max_connections, r.budget_in_use
        ),
        format!(
            "  servers  [{}] {} hoarding, {} working, {} idle",
            bar(r, room),
            r.servers.idle_in_transaction,
            r.servers.active + r.servers.login,
            r.servers.idle
        ),
        "           (# idle in a transaction, = running a query, - idle in the pool)".into(),
        format!(
            "  clients  {} with a server, {} waiting (longest {:.1} s), {} between jobs",
            r.clients_active,
            r.clients_waiting,
            r.max_wait.as_secs_f64(),
            r.clients_idle
        ),
        format!(
            "  so far   {products} products, {} checkout timeouts (53300), {:.0} s hoarded",
            phase.checkout_timeouts, phase.hoarding
        ),
    ]
}

/// One line for a log or a pipe.
pub fn plain_line(
    phase_no: usize,
    elapsed: Duration,
    r: &Reading,
    phase: &PhaseFigures,
    products: u64,
) -> String {
    format!(
        "[phase {phase_no} {:>5.1}s] servers {}/{} (idle in transaction {}), clients waiting {} (longest {:.1}s), checkout timeouts {}, products {}, hoarding {:.0}s",
        elapsed.as_secs_f64(),
        r.servers_open(),
        pool_room(r),
        r.servers.idle_in_transaction,
        r.clients_waiting,
        r.max_wait.as_secs_f64(),
        phase.checkout_timeouts,
        products,
        phase.hoarding
    )
}

/// The summary of one phase.
pub fn phase_summary(title: &str, f: &PhaseFigures, pool_servers: u32) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "  {title} ({:.0} s)", f.seconds);
    let _ = writeln!(
        s,
        "    products done       {:>6}   ({:.0} per minute)",
        f.products,
        f.per_minute()
    );
    let _ = writeln!(
        s,
        "    checkout timeouts   {:>6}   (ERROR 53300: waited query_wait_timeout for a connection)",
        f.checkout_timeouts
    );
    let _ = writeln!(
        s,
        "    average wait        {:>8.3} s (longest seen {:.1} s, at most {} clients queued)",
        f.average_wait,
        f.longest_wait.as_secs_f64(),
        f.peak_waiting
    );
    let avg_hoarded = if f.seconds > 0.0 {
        f.hoarding / f.seconds
    } else {
        0.0
    };
    let _ = writeln!(
        s,
        "    hoarding            {:>6.0} s  (server time idle inside transactions: {:.1} of {} servers on average)",
        f.hoarding, avg_hoarded, pool_servers
    );
    if f.errors > 0 {
        let _ = writeln!(
            s,
            "    other errors        {:>6}   (last: {})",
            f.errors,
            f.last_error.as_deref().unwrap_or("?")
        );
    }
    s
}
