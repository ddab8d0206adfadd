//! The plan file of `pgsluice budget --plan`: an application fleet's connection arithmetic
//! (web, batch and Sidekiq services), and whether it fits the budget with and without the
//! proxy. Pure: the figures of the database come in as an [`Upstream`]; reading them live is
//! `report.rs`'s job.
//!
//! The arithmetic is the one in `docs/budget.md`: web = tasks × Puma workers × pool;
//! batch = tasks × pool; Sidekiq = tasks × processes × (concurrency + 1), because a Sidekiq
//! process takes one connection for itself besides one per worker thread.

use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::{fleet_budget, Upstream};

#[derive(Debug, Error)]
pub enum PlanError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Syntax { origin: String, message: String },
    #[error("{origin}: {key}: {reason}")]
    Invalid {
        origin: String,
        key: String,
        reason: String,
    },
}

/// A plan file as written.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// The database the plan is for; absent: the live figures of the upstream.
    #[serde(default)]
    pub database: Option<PlanDatabase>,
    #[serde(default)]
    pub web: Vec<Web>,
    #[serde(default)]
    pub batch: Vec<Batch>,
    #[serde(default)]
    pub sidekiq: Vec<Sidekiq>,
}

/// `[database]`: the limits of the database the plan is for, e.g. an instance not running yet.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PlanDatabase {
    pub max_connections: u32,
    /// PostgreSQL's default is 3.
    #[serde(default = "default_superuser_reserved")]
    pub superuser_reserved_connections: u32,
    #[serde(default)]
    pub reserved_connections: u32,
}

fn default_superuser_reserved() -> u32 {
    3
}

impl PlanDatabase {
    pub fn upstream(&self) -> Upstream {
        Upstream {
            max_connections: self.max_connections,
            superuser_reserved_connections: self.superuser_reserved_connections,
            reserved_connections: self.reserved_connections,
            ..Upstream::default()
        }
    }
}

/// `[[web]]`: Puma (or any pre-forking server) tasks.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Web {
    pub name: String,
    pub tasks: u32,
    pub puma_workers: u32,
    /// ActiveRecord `pool` per worker process (usually `RAILS_MAX_THREADS`).
    pub pool: u32,
}

/// `[[batch]]`: one process per task with a thread pool.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    pub name: String,
    pub tasks: u32,
    pub pool: u32,
}

/// `[[sidekiq]]`: Sidekiq processes; each needs `concurrency + 1` connections.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Sidekiq {
    pub name: String,
    pub tasks: u32,
    pub processes: u32,
    pub concurrency: u32,
}

/// One service's demand.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Service {
    pub name: String,
    /// `web`, `batch` or `sidekiq`.
    pub kind: &'static str,
    /// The formula with the plan's numbers, e.g. `15 tasks × pool 8`.
    pub formula: String,
    pub connections: u64,
}

/// The plan against the budget, without the proxy (applications connect directly) and with
/// it (the database sees at most the fleet budget).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Evaluation {
    /// Where the database figures come from: `plan` or `upstream`.
    pub source: &'static str,
    pub max_connections: u32,
    /// `max_connections − superuser_reserved_connections − reserved_connections`.
    pub usable: u32,
    pub fraction: f64,
    pub reserve: u32,
    /// `floor(max_connections × fraction) − reserve`: the rule's line.
    pub fleet_budget: u32,
    pub services: Vec<Service>,
    /// Connections the applications open, all services together.
    pub total: u64,
    pub without_proxy: WithoutProxy,
    pub with_proxy: WithProxy,
    /// Fits without the proxy: the applications never wait for a connection and a deploy
    /// does not exhaust the database. The command's exit code follows it.
    pub fits: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WithoutProxy {
    /// `total ≤ fleet_budget` (the rule: half of `max_connections` by default).
    pub fits_rule: bool,
    /// `fleet_budget − total`: connections to spare, negative when over.
    pub rule_margin: i64,
    /// `2 × total`: old and new tasks side by side during a deploy.
    pub deploy_total: u64,
    /// `deploy_total ≤ usable`.
    pub fits_deploy: bool,
    /// `usable − deploy_total`: connections to spare, negative when over.
    pub deploy_margin: i64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WithProxy {
    /// The most the database sees from the whole fleet of proxies: the fleet budget.
    pub database_connections: u32,
    /// `fleet_budget ≤ usable`: the database never refuses the fleet, deploys included.
    pub fits: bool,
    /// `usable − fleet_budget`.
    pub margin: i64,
    /// What the applications ask for (`total`): their pools' sum, served by the proxies.
    pub demand: u64,
    /// `demand / fleet_budget`: above 1, threads queue for a server when all of them use
    /// the database at once.
    pub queueing_ratio: f64,
    /// `max(0, demand − fleet_budget)`: threads that wait at the peak.
    pub waiting_at_peak: u64,
}

impl Plan {
    pub fn load(path: &Path) -> Result<Plan, PlanError> {
        let text = std::fs::read_to_string(path).map_err(|source| PlanError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Plan::parse(&text, &path.display().to_string())
    }

    /// Parses and validates a plan; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Plan, PlanError> {
        let table = text.parse::<toml::Table>().map_err(|e| PlanError::Syntax {
            origin: origin.to_owned(),
            message: e.to_string(),
        })?;
        let plan: Plan =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                PlanError::Invalid {
                    origin: origin.to_owned(),
                    key: e.path().to_string(),
                    reason: e.into_inner().to_string(),
                }
            })?;
        let invalid = |key: String, reason: &str| PlanError::Invalid {
            origin: origin.to_owned(),
            key,
            reason: reason.to_owned(),
        };
        if plan.web.is_empty() && plan.batch.is_empty() && plan.sidekiq.is_empty() {
            return Err(invalid(
                "plan".into(),
                "no service: add [[web]], [[batch]] or [[sidekiq]] tables",
            ));
        }
        let names = plan.web.iter().map(|s| ("web", &s.name));
        let names = names.chain(plan.batch.iter().map(|s| ("batch", &s.name)));
        let names = names.chain(plan.sidekiq.iter().map(|s| ("sidekiq", &s.name)));
        for (kind, name) in names {
            if name.trim().is_empty() {
                return Err(invalid(format!("{kind}.name"), "must not be empty"));
            }
        }
        if let Some(db) = &plan.database {
            if db.max_connections == 0 {
                return Err(invalid(
                    "database.max_connections".into(),
                    "must be at least 1",
                ));
            }
        }
        Ok(plan)
    }

    /// Each service's connections, in file order by kind (web, batch, Sidekiq).
    pub fn services(&self) -> Vec<Service> {
        let plural =
            |n: u32, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
        let web = self.web.iter().map(|s| Service {
            name: s.name.clone(),
            kind: "web",
            formula: format!(
                "{} × {} × pool {}",
                plural(s.tasks, "task", "tasks"),
                plural(s.puma_workers, "Puma worker", "Puma workers"),
                s.pool
            ),
            connections: product(&[s.tasks, s.puma_workers, s.pool]),
        });
        let batch = self.batch.iter().map(|s| Service {
            name: s.name.clone(),
            kind: "batch",
            formula: format!("{} × pool {}", plural(s.tasks, "task", "tasks"), s.pool),
            connections: product(&[s.tasks, s.pool]),
        });
        let sidekiq = self.sidekiq.iter().map(|s| Service {
            name: s.name.clone(),
            kind: "sidekiq",
            formula: format!(
                "{} × {} × (concurrency {} + 1)",
                plural(s.tasks, "task", "tasks"),
                plural(s.processes, "process", "processes"),
                s.concurrency
            ),
            connections: product(&[s.tasks, s.processes])
                .saturating_mul(u64::from(s.concurrency) + 1),
        });
        web.chain(batch).chain(sidekiq).collect()
    }

    /// The plan against a database's limits, with the budget's `fraction` and `reserve`.
    pub fn evaluate(
        &self,
        up: &Upstream,
        source: &'static str,
        fraction: f64,
        reserve: u32,
    ) -> Evaluation {
        let services = self.services();
        let total = services
            .iter()
            .fold(0u64, |sum, s| sum.saturating_add(s.connections));
        let budget = fleet_budget(up.max_connections, fraction, reserve);
        let usable = up.usable();
        let deploy_total = total.saturating_mul(2);
        let without_proxy = WithoutProxy {
            fits_rule: total <= u64::from(budget),
            rule_margin: i64::from(budget) - signed(total),
            deploy_total,
            fits_deploy: deploy_total <= u64::from(usable),
            deploy_margin: i64::from(usable) - signed(deploy_total),
        };
        let with_proxy = WithProxy {
            database_connections: budget,
            fits: budget <= usable,
            margin: i64::from(usable) - i64::from(budget),
            demand: total,
            queueing_ratio: total as f64 / f64::from(budget),
            waiting_at_peak: total.saturating_sub(u64::from(budget)),
        };
        Evaluation {
            source,
            max_connections: up.max_connections,
            usable,
            fraction,
            reserve,
            fleet_budget: budget,
            fits: without_proxy.fits_rule && without_proxy.fits_deploy,
            services,
            total,
            without_proxy,
            with_proxy,
        }
    }
}

/// The product of a service's numbers; saturates rather than wrap on absurd plans.
fn product(factors: &[u32]) -> u64 {
    factors
        .iter()
        .fold(1u64, |p, &f| p.saturating_mul(u64::from(f)))
}

fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The story's fleet: 15 batch tasks × 8 threads, a 50-concurrency Sidekiq process, and
    /// a web tier, against a database with max_connections = 90.
    const STORY: &str = r#"
        [database]
        max_connections = 90

        [[web]]
        name = "web"
        tasks = 4
        puma_workers = 2
        pool = 5

        [[batch]]
        name = "spec-filler"
        tasks = 15
        pool = 8

        [[sidekiq]]
        name = "sidekiq"
        tasks = 1
        processes = 1
        concurrency = 50
    "#;

    fn max(n: u32) -> Upstream {
        Upstream {
            max_connections: n,
            superuser_reserved_connections: 3,
            ..Upstream::default()
        }
    }

    #[test]
    fn service_formulas() {
        let plan = Plan::parse(STORY, "story").unwrap();
        let s = plan.services();
        let got: Vec<(&str, u64)> = s.iter().map(|s| (s.kind, s.connections)).collect();
        assert_eq!(got, [("web", 40), ("batch", 120), ("sidekiq", 51)]);
        assert_eq!(s[0].formula, "4 tasks × 2 Puma workers × pool 5");
        assert_eq!(s[1].formula, "15 tasks × pool 8");
        assert_eq!(s[2].formula, "1 task × 1 process × (concurrency 50 + 1)");
    }

    #[test]
    fn the_story_does_not_fit_a_90_connection_database() {
        let plan = Plan::parse(STORY, "story").unwrap();
        let up = plan.database.unwrap().upstream();
        let e = plan.evaluate(&up, "plan", 0.5, 0);
        assert_eq!((e.total, e.fleet_budget, e.usable), (211, 45, 87));
        assert!(!e.fits);
        let w = &e.without_proxy;
        assert_eq!((w.fits_rule, w.rule_margin), (false, 45 - 211));
        assert_eq!(
            (w.deploy_total, w.fits_deploy, w.deploy_margin),
            (422, false, 87 - 422)
        );
        let p = &e.with_proxy;
        assert_eq!((p.database_connections, p.fits, p.margin), (45, true, 42));
        assert_eq!((p.demand, p.waiting_at_peak), (211, 166));
        assert!((p.queueing_ratio - 211.0 / 45.0).abs() < 1e-9);
    }

    #[test]
    fn fitting_plan_and_the_edges() {
        let plan = Plan::parse(
            "[[web]]\nname = \"w\"\ntasks = 2\npuma_workers = 2\npool = 5\n",
            "p",
        )
        .unwrap();
        // 20 connections: exactly the rule's line at max 40; a deploy (40) needs usable ≥ 40.
        let e = plan.evaluate(&max(43), "upstream", 0.5, 0);
        assert_eq!((e.total, e.fleet_budget, e.usable), (20, 21, 40));
        assert!(e.fits, "{e:?}");
        assert_eq!(e.without_proxy.rule_margin, 1);
        assert_eq!(e.without_proxy.deploy_margin, 0);
        assert_eq!(e.with_proxy.waiting_at_peak, 0);
        // At max 40 the rule holds (20 ≤ 20) but a deploy (40) passes usable (37).
        let e = plan.evaluate(&max(40), "upstream", 0.5, 0);
        assert!(e.without_proxy.fits_rule && !e.without_proxy.fits_deploy && !e.fits);
        assert_eq!(e.without_proxy.deploy_margin, -3);
        // The reserve comes off the rule's line.
        let e = plan.evaluate(&max(43), "upstream", 0.5, 2);
        assert_eq!((e.fleet_budget, e.without_proxy.rule_margin), (19, -1));
        assert!(!e.fits);
        // A fraction close to 1 leaves the proxied fleet above what the database accepts.
        let e = plan.evaluate(&max(43), "upstream", 1.0, 0);
        assert_eq!((e.with_proxy.fits, e.with_proxy.margin), (false, -3));
    }

    #[test]
    fn sidekiq_takes_one_more_per_process() {
        let plan = Plan::parse(
            "[[sidekiq]]\nname = \"s\"\ntasks = 3\nprocesses = 4\nconcurrency = 10\n",
            "p",
        )
        .unwrap();
        assert_eq!(plan.services()[0].connections, 3 * 4 * 11);
    }

    #[test]
    fn large_numbers_do_not_overflow() {
        let plan = Plan::parse(
            &format!(
                "[[web]]\nname = \"w\"\ntasks = {m}\npuma_workers = {m}\npool = {m}\n",
                m = u32::MAX
            ),
            "p",
        )
        .unwrap();
        let e = plan.evaluate(&max(100), "upstream", 0.5, 0);
        assert!(!e.fits);
        assert!(e.without_proxy.rule_margin < 0);
    }

    #[test]
    fn bad_plans_name_the_key() {
        let err = |t: &str| Plan::parse(t, "p.toml").unwrap_err().to_string();
        assert!(err("").contains("no service"), "{}", err(""));
        assert!(err("[[web]]\nname = \"w\"\ntasks = 1\npool = 5\n").contains("puma_workers"));
        let e = err("[[batch]]\nname = \"b\"\ntasks = -1\npool = 5\n");
        assert!(e.starts_with("p.toml: batch[0].tasks:"), "{e}");
        let e = err("[[batch]]\nname = \"b\"\ntasks = 1\npool = 5\nthreads = 3\n");
        assert!(e.contains("threads"), "{e}");
        assert!(err("[[batch]]\nname = \"\"\ntasks = 1\npool = 1\n").contains("batch.name"));
        assert!(err("[[batch\n").starts_with("p.toml:"));
        let e =
            err("[database]\nmax_connections = 0\n[[batch]]\nname = \"b\"\ntasks = 1\npool = 1\n");
        assert!(e.contains("database.max_connections"), "{e}");
    }
}
