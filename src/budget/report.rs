//! `pgsluice budget`: the operator's view of the budget. It reads the live figures from the
//! database (limits, reserved slots, connections by application, user and state, the live
//! members of a fleet), computes the fleet budget, shares and headroom with the same
//! formulas as the proxy, and with `--plan` evaluates an application fleet (`plan.rs`).
//! Output is aligned plain text, or JSON with `--json`.
//!
//! Exit codes: 0 when the figures were read (and the plan, if any, fits), 1 when the plan
//! does not fit, 2 on errors (bad flags or files, unreachable upstream).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;

use super::plan::{Evaluation, Plan};
use super::{fleet_budget, fleet_like_pattern, share, Upstream, FLEET_APPLICATION_PREFIX};
use crate::config::{Config, PoolMode, PoolSettings, UpstreamUrl};
use crate::protocol::messages::quote_literal;
use crate::server::{ServerConn, ServerError};

/// The `application_name` of this command's own connection.
pub const APPLICATION_NAME: &str = "pgsluice budget";

/// Connect timeout when no configuration file gives `server_connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// `pgsluice budget`: print the live connection budget, and evaluate a plan.
///
/// Without --upstream or --config, the proxy's own configuration from the environment is
/// used (PGSLUICE_CONFIG, PGSLUICE_UPSTREAM, …).
#[derive(Debug, Clone, clap::Args)]
pub struct BudgetArgs {
    /// The database, postgres://USER:PASSWORD@HOST:PORT/DBNAME.
    #[arg(long, value_name = "URL", conflicts_with_all = ["config", "database"])]
    pub upstream: Option<String>,
    /// A pgsluice configuration file: its first database's upstream and credentials.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// With --config: this database's upstream instead of the first.
    #[arg(long, value_name = "NAME")]
    pub database: Option<String>,
    /// Fleet whose live members to count [default: the config's fleet.name, else "default"].
    #[arg(long, value_name = "NAME")]
    pub fleet: Option<String>,
    /// Share of max_connections the fleet may use [default: the config's, else 0.5].
    #[arg(long, value_name = "F")]
    pub budget_fraction: Option<f64>,
    /// Connections kept out of the fleet budget [default: the config's, else 0].
    #[arg(long, value_name = "N")]
    pub budget_reserve: Option<u32>,
    /// Evaluate an application fleet's connections (TOML: [[web]], [[batch]], [[sidekiq]]).
    #[arg(long, value_name = "FILE")]
    pub plan: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The live figures, as read from `pg_stat_activity` and the settings.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Live {
    pub server_version: String,
    pub max_connections: u32,
    pub superuser_reserved_connections: u32,
    /// `reserved_connections` (PostgreSQL 16+), 0 where it does not exist.
    pub reserved_connections: u32,
    /// What ordinary roles can open: `max_connections` minus both reserves.
    pub usable: u32,
    pub fraction: f64,
    pub reserve: u32,
    /// `floor(max_connections × fraction) − reserve`.
    pub fleet_budget: u32,
    /// Client backends now, this command's own connection excluded.
    pub connections: u32,
    /// `floor(max_connections × fraction) − connections`: room left under the rule.
    pub headroom: i64,
    /// `usable − connections`: room before the database refuses ordinary roles.
    pub free_slots: i64,
    /// Sessions of other roles whose state this login may not see (no pg_read_all_stats).
    pub hidden_states: u32,
    pub fleet: Fleet,
    /// Connections by application_name, user and state, most first.
    pub groups: Vec<Group>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Fleet {
    pub name: String,
    /// The `application_name` pattern (SQL LIKE) of the fleet's control connections.
    pub pattern: String,
    pub live_members: u32,
    /// Each member's share, `floor(fleet_budget / live_members)` (a first member's with none).
    pub share: u32,
    pub members: Vec<Member>,
}

/// One live proxy of the fleet: its control connection.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Member {
    /// The member id from `pgsluice:fleet=NAME:member=ID`.
    pub member: String,
    pub application_name: String,
    pub pid: i64,
    /// Null when this login may not see it.
    pub client_addr: Option<String>,
    pub connected_seconds: Option<i64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Group {
    pub application_name: String,
    pub user: String,
    /// `active`, `idle`, `idle in transaction`, …; null when this login may not see it.
    pub state: Option<String>,
    pub connections: u32,
}

/// Where the command connects, and the budget settings it reports with.
struct Target {
    settings: PoolSettings,
    timeout: Duration,
}

/// The budget settings from the flags, over the configuration's, over the defaults.
struct Settings {
    fleet: String,
    fraction: f64,
    reserve: u32,
}

#[derive(Serialize)]
struct Report<'a> {
    upstream: Option<UpstreamInfo>,
    live: Option<&'a Live>,
    plan: Option<PlanReport<'a>>,
    /// Whether the plan fits; null without a plan.
    fits: Option<bool>,
}

#[derive(Serialize)]
struct UpstreamInfo {
    host: String,
    port: u16,
    dbname: String,
    user: String,
}

#[derive(Serialize)]
struct PlanReport<'a> {
    file: String,
    #[serde(flatten)]
    evaluation: &'a Evaluation,
}

/// Runs the command; prints the report on stdout and errors on stderr.
pub fn run(args: &BudgetArgs) -> ExitCode {
    match run_inner(args) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("pgsluice budget: {message}");
            ExitCode::from(2)
        }
    }
}

fn run_inner(args: &BudgetArgs) -> Result<ExitCode, String> {
    let (target, defaults) = resolve(args)?;
    let settings = Settings {
        fleet: args.fleet.clone().unwrap_or(defaults.fleet),
        fraction: args.budget_fraction.unwrap_or(defaults.fraction),
        reserve: args.budget_reserve.unwrap_or(defaults.reserve),
    };
    if !(settings.fraction > 0.0 && settings.fraction <= 1.0) {
        return Err(format!(
            "--budget-fraction {}: must be above 0 and at most 1",
            settings.fraction
        ));
    }
    check_fleet_name(&settings.fleet)?;
    let plan = match &args.plan {
        Some(path) => Some(Plan::load(path).map_err(|e| e.to_string())?),
        None => None,
    };
    let plan_database = plan.as_ref().and_then(|p| p.database);
    let live = match &target {
        Some(t) => Some(read(t, &settings)?),
        None if plan_database.is_some() => None,
        None if plan.is_some() => {
            return Err(
                "the plan has no [database] max_connections and no upstream was given: \
                 add --upstream URL or --config FILE"
                    .into(),
            )
        }
        None => {
            return Err("no upstream: give --upstream URL or --config FILE \
                 (or set PGSLUICE_UPSTREAM or PGSLUICE_CONFIG)"
                .into())
        }
    };
    let evaluation = plan.as_ref().map(|p| {
        let (up, source) = match (plan_database, &live) {
            (Some(db), _) => (db.upstream(), "plan"),
            (None, Some(l)) => (l.upstream(), "upstream"),
            (None, None) => unreachable!("checked above: a plan needs a database or an upstream"),
        };
        p.evaluate(&up, source, settings.fraction, settings.reserve)
    });
    let fits = evaluation.as_ref().map(|e| e.fits);
    if args.json {
        let report = Report {
            upstream: target.as_ref().map(|t| UpstreamInfo {
                host: t.settings.host.clone(),
                port: t.settings.port,
                dbname: t.settings.upstream_dbname.clone(),
                user: t.settings.upstream_user.clone(),
            }),
            live: live.as_ref(),
            plan: evaluation.as_ref().map(|e| PlanReport {
                file: args.plan.as_ref().expect("a plan").display().to_string(),
                evaluation: e,
            }),
            fits,
        };
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        println!("{text}");
    } else {
        let mut out = String::new();
        if let (Some(t), Some(l)) = (&target, &live) {
            render_live(&mut out, &t.settings, l);
        }
        if let Some(e) = &evaluation {
            if !out.is_empty() {
                out.push('\n');
            }
            let path = args.plan.as_ref().expect("a plan").display().to_string();
            render_plan(&mut out, &path, e);
        }
        print!("{out}");
    }
    Ok(if fits == Some(false) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// The connection target and the configuration's budget settings (or the defaults).
fn resolve(args: &BudgetArgs) -> Result<(Option<Target>, Settings), String> {
    let defaults = Settings {
        fleet: "default".into(),
        fraction: 0.5,
        reserve: 0,
    };
    if let Some(url) = &args.upstream {
        let u = UpstreamUrl::parse(url).map_err(|e| format!("--upstream: {e}"))?;
        let settings = PoolSettings {
            database: u.dbname.clone(),
            user: u.user.clone(),
            mode: PoolMode::Session,
            pool_size: 1,
            min_pool_size: 0,
            host: u.host,
            port: u.port,
            upstream_dbname: u.dbname,
            upstream_user: u.user,
            upstream_password: u.password,
            max_db_connections: 0,
            max_user_connections: 0,
            tls: crate::tls::UpstreamTls::prefer(),
            // `pgsluice budget` only reads figures: a standby will do.
            target_session_attrs: crate::config::TargetSessionAttrs::Any,
            // A short look: nothing to probe.
            server_keepalive: None,
            tcp_user_timeout: std::time::Duration::ZERO,
        };
        let target = Target {
            settings,
            timeout: CONNECT_TIMEOUT,
        };
        return Ok((Some(target), defaults));
    }
    let from_env = std::env::var_os("PGSLUICE_CONFIG").map(PathBuf::from);
    let file = match (&args.config, from_env) {
        (Some(f), _) => Some(f.clone()),
        (None, f) if f.is_some() || std::env::var_os("PGSLUICE_UPSTREAM").is_some() => f,
        (None, _) => return Ok((None, defaults)),
    };
    let origin = file
        .as_ref()
        .map(|f| f.display().to_string())
        .unwrap_or_else(|| "the environment".into());
    let config =
        Config::load(file.as_deref(), &[]).map_err(|e| format!("configuration error: {e}"))?;
    let name = match &args.database {
        Some(n) => n.clone(),
        None => config
            .databases
            .keys()
            .next()
            .cloned()
            .ok_or_else(|| format!("{origin}: no database configured"))?,
    };
    let db = config.databases.get(&name).ok_or_else(|| {
        let known: Vec<&str> = config.databases.keys().map(String::as_str).collect();
        format!(
            "{origin}: no database {name:?} (configured: {})",
            known.join(", ")
        )
    })?;
    let settings = config.control_settings(&db.host, db.port).ok_or_else(|| {
        format!(
            "{origin}: no credentials to log into {}:{}: set budget.user and budget.password, \
             or give a plain user password",
            db.host, db.port
        )
    })?;
    let defaults = Settings {
        fleet: config.fleet.name.clone(),
        fraction: config.budget.fraction,
        reserve: config.budget.reserve,
    };
    let target = Target {
        settings,
        timeout: config.server_connect_timeout,
    };
    Ok((Some(target), defaults))
}

/// Fleet names as the configuration accepts them (`fleet.name`).
fn check_fleet_name(name: &str) -> Result<(), String> {
    super::check_fleet_name(name).map_err(|r| format!("--fleet {name:?}: {r}"))
}

/// Connects and reads the live figures; errors say where it tried.
fn read(target: &Target, settings: &Settings) -> Result<Live, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let s = &target.settings;
    let result = runtime.block_on(async {
        let mut conn = ServerConn::connect_as(
            s,
            &crate::auth::upstream::UpstreamKeys::default(),
            APPLICATION_NAME,
            0,
            0,
            target.timeout,
        )
        .await?;
        let live = tokio::time::timeout(target.timeout, read_live(&mut conn, settings))
            .await
            .map_err(|_| ServerError::ConnectTimeout(format!("{}:{} (query)", s.host, s.port)));
        conn.close();
        live?
    });
    result.map_err(|e| {
        format!(
            "cannot read the budget from {}:{} (user {:?}, database {:?}): {e}",
            s.host, s.port, s.upstream_user, s.upstream_dbname
        )
    })
}

/// The client backends `pg_stat_activity` shows, this session excluded. A login without
/// `pg_read_all_stats` sees other roles' sessions with a null `backend_type` and `state`;
/// those with a database are client backends too (background workers have none, and
/// parallel workers are rare and short).
const CLIENT_BACKENDS: &str =
    "(backend_type = 'client backend' OR (backend_type IS NULL AND datid IS NOT NULL)) \
     AND pid <> pg_backend_pid()";

async fn read_live(conn: &mut ServerConn, settings: &Settings) -> Result<Live, ServerError> {
    let rows = conn
        .simple_query(
            "SELECT current_setting('max_connections'), \
             current_setting('superuser_reserved_connections'), \
             coalesce(current_setting('reserved_connections', true), '0'), \
             current_setting('server_version')",
        )
        .await?;
    let row = rows.first().ok_or_else(|| protocol("no settings row"))?;
    let max_connections = number(row, 0)?;
    let superuser_reserved_connections = number(row, 1)?;
    let reserved_connections = number(row, 2)?;
    let server_version = text(row, 3).unwrap_or_default();

    let rows = conn
        .simple_query(&format!(
            "SELECT coalesce(application_name, ''), coalesce(usename::text, ''), state, count(*) \
             FROM pg_catalog.pg_stat_activity WHERE {CLIENT_BACKENDS} \
             GROUP BY 1, 2, 3 ORDER BY 4 DESC, 1, 2, 3"
        ))
        .await?;
    let mut groups = Vec::with_capacity(rows.len());
    for row in &rows {
        groups.push(Group {
            application_name: text(row, 0).unwrap_or_default(),
            user: text(row, 1).unwrap_or_default(),
            state: text(row, 2),
            connections: number(row, 3)?,
        });
    }

    let pattern = fleet_like_pattern(&settings.fleet);
    let rows = conn
        .simple_query(&format!(
            "SELECT application_name, pid, host(client_addr), \
             extract(epoch FROM now() - backend_start)::bigint \
             FROM pg_catalog.pg_stat_activity WHERE application_name LIKE {} \
             ORDER BY application_name, pid",
            quote_literal(&pattern)
        ))
        .await?;
    let prefix = format!("{FLEET_APPLICATION_PREFIX}{}:member=", settings.fleet);
    let mut members = Vec::with_capacity(rows.len());
    for row in &rows {
        let application_name = text(row, 0).unwrap_or_default();
        members.push(Member {
            member: application_name
                .strip_prefix(&prefix)
                .unwrap_or(&application_name)
                .to_owned(),
            pid: number(row, 1)?,
            client_addr: text(row, 2),
            connected_seconds: text(row, 3).and_then(|v| v.parse().ok()),
            application_name,
        });
    }

    let connections = groups.iter().map(|g| g.connections).sum();
    let hidden_states = groups
        .iter()
        .filter(|g| g.state.is_none())
        .map(|g| g.connections)
        .sum();
    let mut live = Live {
        server_version,
        max_connections,
        superuser_reserved_connections,
        reserved_connections,
        usable: 0,
        fraction: settings.fraction,
        reserve: settings.reserve,
        fleet_budget: fleet_budget(max_connections, settings.fraction, settings.reserve),
        connections,
        headroom: i64::from(rule_line(max_connections, settings.fraction)) - i64::from(connections),
        free_slots: 0,
        hidden_states,
        fleet: Fleet {
            name: settings.fleet.clone(),
            pattern,
            live_members: members.len() as u32,
            share: 0,
            members,
        },
        groups,
    };
    let up = live.upstream();
    live.usable = up.usable();
    live.free_slots = i64::from(live.usable) - i64::from(connections);
    live.fleet.share = share(live.fleet_budget, up.members);
    Ok(live)
}

impl Live {
    /// The figures in the form the budget formulas take.
    pub fn upstream(&self) -> Upstream {
        Upstream {
            max_connections: self.max_connections,
            superuser_reserved_connections: self.superuser_reserved_connections,
            reserved_connections: self.reserved_connections,
            connections: self.connections,
            members: self.fleet.live_members,
        }
    }
}

/// `floor(max_connections × fraction)`: the rule's line before the reserve.
fn rule_line(max_connections: u32, fraction: f64) -> u32 {
    (f64::from(max_connections) * fraction).floor() as u32
}

fn protocol(what: &str) -> ServerError {
    ServerError::Protocol(format!("budget report: {what}"))
}

fn text(row: &[Option<String>], i: usize) -> Option<String> {
    row.get(i).cloned().flatten()
}

fn number<T: std::str::FromStr>(row: &[Option<String>], i: usize) -> Result<T, ServerError> {
    text(row, i)
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| protocol(&format!("column {} is not a number", i + 1)))
}

/// Aligned columns, two spaces apart and indented by two; `right` marks numeric columns.
fn table(out: &mut String, header: &[&str], right: &[bool], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::from(" ");
        for ((cell, w), r) in row.iter().zip(&widths).zip(right) {
            let pad = " ".repeat(w - cell.chars().count());
            if *r {
                let _ = write!(line, " {pad}{cell} ");
            } else {
                let _ = write!(line, " {cell}{pad} ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

/// `label value note` lines with the values aligned.
fn figures(out: &mut String, lines: &[(&str, String, String)]) {
    let label = lines.iter().map(|l| l.0.len()).max().unwrap_or(0);
    let value = lines.iter().map(|l| l.1.len()).max().unwrap_or(0);
    for (l, v, note) in lines {
        let line = format!("  {l:<label$}  {v:>value$}  {note}");
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

fn duration(secs: i64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

fn render_live(out: &mut String, s: &PoolSettings, l: &Live) {
    let _ = writeln!(
        out,
        "Database {}:{}/{} as {}, PostgreSQL {}\n",
        s.host, s.port, s.upstream_dbname, s.upstream_user, l.server_version
    );
    let line = rule_line(l.max_connections, l.fraction);
    let fraction = format!("floor({} × {})", l.max_connections, l.fraction);
    let over = |n: i64, what: &str| {
        if n < 0 {
            format!("{what}; over by {}", -n)
        } else {
            what.to_owned()
        }
    };
    figures(
        out,
        &[
            (
                "max_connections",
                l.max_connections.to_string(),
                String::new(),
            ),
            (
                "superuser_reserved_connections",
                l.superuser_reserved_connections.to_string(),
                String::new(),
            ),
            (
                "reserved_connections",
                l.reserved_connections.to_string(),
                if l.reserved_connections == 0 {
                    "(PostgreSQL 16+; 0 where absent)".into()
                } else {
                    String::new()
                },
            ),
            (
                "usable",
                l.usable.to_string(),
                "max_connections − reserved slots: what ordinary roles can open".into(),
            ),
            (
                "fleet budget",
                l.fleet_budget.to_string(),
                format!(
                    "{fraction} − reserve {}: all proxies of the fleet together",
                    l.reserve
                ),
            ),
            (
                "connections now",
                l.connections.to_string(),
                "client backends, this command's own excluded".into(),
            ),
            (
                "headroom",
                l.headroom.to_string(),
                over(
                    l.headroom,
                    &format!("{line} − connections now: room left under the rule"),
                ),
            ),
            (
                "free slots",
                l.free_slots.to_string(),
                over(
                    l.free_slots,
                    "usable − connections now: room before the database refuses",
                ),
            ),
        ],
    );
    if l.hidden_states > 0 {
        let _ = writeln!(
            out,
            "  ({} of these belong to other roles and show no state: log in as a member of pg_read_all_stats to see it)",
            l.hidden_states
        );
    }

    let f = &l.fleet;
    if f.members.is_empty() {
        let _ = writeln!(
            out,
            "\nFleet {:?}: no live member (no control connection matches {:?});\n  a first proxy would get the whole fleet budget, {}",
            f.name, f.pattern, f.share
        );
    } else {
        let _ = writeln!(
            out,
            "\nFleet {:?}: {} live member{}, share {} each (floor({} / {}))",
            f.name,
            f.live_members,
            if f.live_members == 1 { "" } else { "s" },
            f.share,
            l.fleet_budget,
            f.live_members
        );
        let rows: Vec<Vec<String>> = f
            .members
            .iter()
            .map(|m| {
                vec![
                    m.member.clone(),
                    m.pid.to_string(),
                    m.client_addr.clone().unwrap_or_else(|| "-".into()),
                    m.connected_seconds
                        .map(duration)
                        .unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        table(
            out,
            &["MEMBER", "PID", "CLIENT", "CONNECTED"],
            &[false, true, false, true],
            &rows,
        );
    }

    let _ = writeln!(out, "\nConnections by application, user and state");
    if l.groups.is_empty() {
        out.push_str("  none but this command's own\n");
        return;
    }
    let rows: Vec<Vec<String>> = l
        .groups
        .iter()
        .map(|g| {
            vec![
                g.application_name.clone(),
                g.user.clone(),
                g.state.clone().unwrap_or_else(|| "(hidden)".into()),
                g.connections.to_string(),
            ]
        })
        .collect();
    table(
        out,
        &["APPLICATION", "USER", "STATE", "CONNECTIONS"],
        &[false, false, false, true],
        &rows,
    );
}

fn margin(n: i64) -> String {
    match n {
        n if n < 0 => format!("over by {}", -n),
        n => format!("{n} to spare"),
    }
}

fn verdict(fits: bool) -> &'static str {
    if fits {
        "fits"
    } else {
        "does not fit"
    }
}

fn render_plan(out: &mut String, path: &str, e: &Evaluation) {
    let source = match e.source {
        "plan" => "from the plan",
        _ => "live",
    };
    let _ = writeln!(
        out,
        "Plan {path}: max_connections {} ({source}), usable {}, fleet budget {} (floor({} × {}) − reserve {})\n",
        e.max_connections, e.usable, e.fleet_budget, e.max_connections, e.fraction, e.reserve
    );
    let mut rows: Vec<Vec<String>> = e
        .services
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.kind.to_owned(),
                s.formula.clone(),
                s.connections.to_string(),
            ]
        })
        .collect();
    rows.push(vec![
        "total".into(),
        String::new(),
        String::new(),
        e.total.to_string(),
    ]);
    table(
        out,
        &["SERVICE", "KIND", "CONNECTIONS PER", "CONNECTIONS"],
        &[false, false, false, true],
        &rows,
    );
    let w = &e.without_proxy;
    let p = &e.with_proxy;
    let _ = writeln!(out, "\nWithout pgsluice (applications connect directly)");
    figures(
        out,
        &[
            (
                "the rule",
                verdict(w.fits_rule).into(),
                format!(
                    "total {}, fleet budget {}: {}",
                    e.total,
                    e.fleet_budget,
                    margin(w.rule_margin)
                ),
            ),
            (
                "a deploy",
                verdict(w.fits_deploy).into(),
                format!(
                    "old and new tasks side by side, 2 × {} = {}, usable {}: {}",
                    e.total,
                    w.deploy_total,
                    e.usable,
                    margin(w.deploy_margin)
                ),
            ),
        ],
    );
    let _ = writeln!(
        out,
        "\nWith pgsluice (the database sees at most the fleet budget)"
    );
    let queue = if p.waiting_at_peak > 0 {
        format!(
            "{:.2} × the fleet budget; at the peak up to {} threads wait for a server",
            p.queueing_ratio, p.waiting_at_peak
        )
    } else {
        format!(
            "{:.2} × the fleet budget; no thread waits for a server",
            p.queueing_ratio
        )
    };
    figures(
        out,
        &[
            (
                "the database",
                verdict(p.fits).into(),
                format!(
                    "at most the fleet budget {}, deploys included, usable {}: {}",
                    p.database_connections,
                    e.usable,
                    margin(p.margin)
                ),
            ),
            (
                "the applications",
                p.demand.to_string(),
                format!("connections asked for: {queue}"),
            ),
        ],
    );
    let with = match (e.fits, p.fits) {
        (_, false) => "; with pgsluice the fleet budget itself is above usable: lower the fraction",
        (true, true) => "",
        (false, true) => {
            "; with pgsluice the database stays within the fleet budget and the excess waits in the proxies"
        }
    };
    let _ = writeln!(
        out,
        "\nResult: the plan {} without pgsluice{with}",
        verdict(e.fits)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let mut out = String::new();
        table(
            &mut out,
            &["NAME", "N"],
            &[false, true],
            &[
                vec!["a".into(), "10".into()],
                vec!["longer".into(), "2".into()],
            ],
        );
        assert_eq!(out, "  NAME     N\n  a       10\n  longer   2\n");
        let mut out = String::new();
        figures(
            &mut out,
            &[
                ("x", "1".into(), "note".into()),
                ("long label", "100".into(), String::new()),
            ],
        );
        assert_eq!(out, "  x             1  note\n  long label  100\n");
    }

    #[test]
    fn fleet_names() {
        assert!(check_fleet_name("web-prod.eu").is_ok());
        for bad in ["", "a_b", "a%", "a:b", "it's", "a b"] {
            assert!(check_fleet_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(duration(5), "5s");
        assert_eq!(duration(312), "5m12s");
        assert_eq!(duration(7260), "2h01m");
        assert_eq!(duration(90000), "1d01h");
    }
}
