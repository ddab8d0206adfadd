//! `pgsluice budget` (the built binary) against real PostgreSQL servers: the figures it
//! prints equal what our own SQL reads, fleet members are counted from control connections,
//! plans fit or not with the right exit code, and errors exit 2.

mod common;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use common::pg::{free_port, SUPERUSER_PASSWORD};
use common::*;
use pgsluice::budget::{fleet_budget, fleet_like_pattern, member_application_name, share};
use serde_json::Value;
use tokio_postgres::Client;

/// A server with known limits (max_connections = 20) for the tests that count.
static PG20: OnceLock<TestPostgres> = OnceLock::new();

fn pg20() -> &'static TestPostgres {
    PG20.get_or_init(|| TestPostgres::start(&["max_connections = 20"]))
}

/// Every test that connects to `pg20` takes its turn, so the counts hold still.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn turn() -> tokio::sync::MutexGuard<'static, ()> {
    TURN.lock().await
}

fn superuser_url(pg: &TestPostgres) -> String {
    pg.url("postgres", SUPERUSER_PASSWORD, "postgres")
}

/// Connects to `pg` as the superuser with an application_name.
async fn connect_as_app(pg: &TestPostgres, application_name: &str) -> Client {
    connect(&format!(
        "host=127.0.0.1 port={} user=postgres password={SUPERUSER_PASSWORD} dbname=postgres application_name={application_name}",
        pg.port
    ))
    .await
}

/// Waits until `admin` is the only client backend: the sessions of earlier tests are gone.
async fn settle(admin: &Client) {
    let quiet = eventually(Duration::from_secs(10), || async {
        scalar(
            admin,
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
        )
        .await
            == "0"
    })
    .await;
    assert!(quiet, "earlier sessions are gone");
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("--json output parses: {e}\n{}", self.stdout))
    }
}

/// Runs `pgsluice budget ARGS` (off the runtime's thread, so connections stay driven).
async fn budget(args: &[&str]) -> Run {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_pgsluice"))
            .arg("budget")
            .args(&args)
            .env_remove("PGSLUICE_CONFIG")
            .env_remove("PGSLUICE_UPSTREAM")
            .stdin(Stdio::null())
            .output()
            .expect("run pgsluice budget")
    })
    .await
    .unwrap();
    Run {
        code: out.status.code().expect("exited"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The value printed after `label` at the start of a line of the text report.
fn figure(out: &str, label: &str) -> String {
    out.lines()
        .find_map(|l| l.trim_start().strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {label:?} line in\n{out}"))
        .to_owned()
}

fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or_else(|| panic!("{v} is an integer"))
}

/// The limits as our own SQL reads them: max_connections, superuser_reserved_connections,
/// reserved_connections (0 before PostgreSQL 16).
async fn limits(admin: &Client) -> (i64, i64, i64) {
    let num = |s: String| s.parse::<i64>().unwrap();
    (
        num(scalar(admin, "SHOW max_connections").await),
        num(scalar(admin, "SHOW superuser_reserved_connections").await),
        num(scalar(
            admin,
            "SELECT coalesce((SELECT setting FROM pg_settings WHERE name = 'reserved_connections'), '0')",
        )
        .await),
    )
}

async fn client_backends(admin: &Client) -> i64 {
    scalar(
        admin,
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'",
    )
    .await
    .parse()
    .unwrap()
}

/// Our connections grouped as the report groups them, for application names `prefix%`.
async fn groups(admin: &Client, prefix: &str) -> Vec<(String, String, String, i64)> {
    admin
        .query(
            "SELECT application_name, usename::text, state, count(*) FROM pg_stat_activity \
             WHERE application_name LIKE $1 GROUP BY 1, 2, 3 ORDER BY 1, 3",
            &[&format!("{prefix}%")],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

fn reported_groups(live: &Value, prefix: &str) -> Vec<(String, String, String, i64)> {
    let mut g: Vec<_> = live["groups"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["application_name"].as_str().unwrap().starts_with(prefix))
        .map(|g| {
            (
                g["application_name"].as_str().unwrap().to_owned(),
                g["user"].as_str().unwrap().to_owned(),
                g["state"].as_str().unwrap().to_owned(),
                int(&g["connections"]),
            )
        })
        .collect();
    g.sort_by(|a, b| (&a.0, &a.2).cmp(&(&b.0, &b.2)));
    g
}

#[tokio::test]
async fn live_figures_equal_our_sql() {
    let pg = pg20();
    let _turn = turn().await;
    let admin = pg.admin().await;
    settle(&admin).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect_as_app(pg, "cli-test-a").await);
    }
    for _ in 0..2 {
        held.push(connect_as_app(pg, "cli-test-b").await);
    }
    held[4].batch_execute("BEGIN").await.unwrap();

    let (max, su, reserved) = limits(&admin).await;
    assert_eq!(max, 20);
    let now = client_backends(&admin).await;
    assert_eq!(now, 6, "admin and five held connections");
    let ours = groups(&admin, "cli-test-").await;
    assert_eq!(ours.len(), 3, "{ours:?}");
    let budget_line = fleet_budget(max as u32, 0.5, 0) as i64;
    assert_eq!(budget_line, 10);

    let run = budget(&["--upstream", &superuser_url(pg), "--json"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let report = run.json();
    let live = &report["live"];
    assert_eq!(int(&live["max_connections"]), max);
    assert_eq!(int(&live["superuser_reserved_connections"]), su);
    assert_eq!(int(&live["reserved_connections"]), reserved);
    assert_eq!(int(&live["usable"]), max - su - reserved);
    assert_eq!(int(&live["fleet_budget"]), budget_line);
    assert_eq!(
        int(&live["connections"]),
        now,
        "its own connection is not counted"
    );
    assert_eq!(int(&live["headroom"]), max / 2 - now);
    assert_eq!(int(&live["free_slots"]), max - su - reserved - now);
    assert_eq!(int(&live["hidden_states"]), 0);
    assert_eq!(reported_groups(live, "cli-test-"), ours);
    let total: i64 = live["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| int(&g["connections"]))
        .sum();
    assert_eq!(total, now, "the groups add up to the connections");
    assert_eq!(report["upstream"]["port"], pg.port);
    assert!(report["plan"].is_null() && report["fits"].is_null());

    // The same figures in the text report.
    let run = budget(&["--upstream", &superuser_url(pg)]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let out = &run.stdout;
    assert_eq!(figure(out, "max_connections"), max.to_string());
    assert_eq!(
        figure(out, "superuser_reserved_connections"),
        su.to_string()
    );
    assert_eq!(figure(out, "reserved_connections"), reserved.to_string());
    assert_eq!(figure(out, "usable"), (max - su - reserved).to_string());
    assert_eq!(figure(out, "fleet budget"), budget_line.to_string());
    assert_eq!(figure(out, "connections now"), now.to_string());
    assert_eq!(figure(out, "headroom"), (max / 2 - now).to_string());
    for (app, user, state, n) in &ours {
        let row = format!("{app} {user} {state} {n}");
        assert!(
            out.lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>().join(" ") == row),
            "a row {row:?} in\n{out}"
        );
    }

    // With the rule broken, headroom goes negative and the report says by how much.
    for _ in 0..6 {
        held.push(connect_as_app(pg, "cli-test-c").await);
    }
    let now = client_backends(&admin).await;
    let run = budget(&["--upstream", &superuser_url(pg)]).await;
    assert_eq!(run.code, 0, "no plan: the figures were read");
    assert_eq!(figure(&run.stdout, "headroom"), (10 - now).to_string());
    assert!(
        run.stdout.contains(&format!("over by {}", now - 10)),
        "{}",
        run.stdout
    );
    drop(held);
}

/// A login without pg_read_all_stats sees other roles' sessions without backend_type or
/// state; they still count.
#[tokio::test]
async fn an_unprivileged_login_counts_every_client_backend() {
    let pg = pg20();
    let _turn = turn().await;
    let admin = pg.admin().await;
    settle(&admin).await;
    admin
        .batch_execute(
            "DO $$ BEGIN CREATE ROLE budget_viewer LOGIN PASSWORD 'budget_viewer-pw'; \
             EXCEPTION WHEN duplicate_object THEN NULL; END $$",
        )
        .await
        .unwrap();
    let held = [
        connect_as_app(pg, "cli-hidden").await,
        connect_as_app(pg, "cli-hidden").await,
    ];
    let now = client_backends(&admin).await;
    let url = pg.url("budget_viewer", "budget_viewer-pw", "postgres");
    let run = budget(&["--upstream", &url, "--json"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let live = &run.json()["live"];
    assert_eq!(int(&live["connections"]), now);
    assert_eq!(
        int(&live["hidden_states"]),
        now,
        "all of them are the superuser's"
    );
    let run = budget(&["--upstream", &url]).await;
    assert!(run.stdout.contains("pg_read_all_stats"), "{}", run.stdout);
    assert!(run.stdout.contains("(hidden)"), "{}", run.stdout);
    drop(held);
}

#[tokio::test]
async fn fleet_members_come_from_control_connections() {
    let pg = pg20();
    let _turn = turn().await;
    let admin = pg.admin().await;
    settle(&admin).await;
    // Member ids are 16 characters, as a proxy draws them; a name of another length is
    // not a member.
    let mut held = Vec::new();
    for m in ["m1", "m2", "m3"] {
        held.push(connect_as_app(pg, &member_application_name("blue", &format!("{m:0>16}"))).await);
    }
    held.push(
        connect_as_app(
            pg,
            &member_application_name("green", &format!("{:0>16}", "g1")),
        )
        .await,
    );
    held.push(connect_as_app(pg, &member_application_name("blue", "short")).await);
    let members: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE $1",
            &[&fleet_like_pattern("blue")],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(members, 3);

    let run = budget(&[
        "--upstream",
        &superuser_url(pg),
        "--fleet",
        "blue",
        "--json",
    ])
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let fleet = &run.json()["live"]["fleet"];
    assert_eq!(fleet["name"], "blue");
    assert_eq!(int(&fleet["live_members"]), members);
    assert_eq!(
        int(&fleet["share"]),
        i64::from(share(fleet_budget(20, 0.5, 0), 3))
    );
    assert_eq!(int(&fleet["share"]), 3);
    let ids: Vec<&str> = fleet["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["member"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["00000000000000m1", "00000000000000m2", "00000000000000m3"]
    );

    // Fraction and reserve change the fleet budget and so the share.
    let run = budget(&[
        "--upstream",
        &superuser_url(pg),
        "--fleet",
        "blue",
        "--budget-fraction",
        "0.8",
        "--budget-reserve",
        "2",
    ])
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(figure(&run.stdout, "fleet budget"), "14");
    assert!(
        run.stdout
            .contains("Fleet \"blue\": 3 live members, share 4 each"),
        "{}",
        run.stdout
    );
    for m in ["m1", "m2", "m3"] {
        let id = format!("{m:0>16}");
        assert!(
            run.stdout.lines().any(|l| l.trim_start().starts_with(&id)),
            "{}",
            run.stdout
        );
    }

    // The default fleet has no member here; green has one with the whole budget.
    let run = budget(&["--upstream", &superuser_url(pg), "--json"]).await;
    let fleet = &run.json()["live"]["fleet"];
    assert_eq!((int(&fleet["live_members"]), int(&fleet["share"])), (0, 10));
    let run = budget(&[
        "--upstream",
        &superuser_url(pg),
        "--fleet",
        "green",
        "--json",
    ])
    .await;
    let fleet = &run.json()["live"]["fleet"];
    assert_eq!((int(&fleet["live_members"]), int(&fleet["share"])), (1, 10));

    let run = budget(&["--upstream", &superuser_url(pg), "--fleet", "bl_e"]).await;
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("--fleet"), "{}", run.stderr);
    drop(held);
}

#[tokio::test]
async fn a_config_file_gives_the_upstream_and_the_budget_settings() {
    let pg = pg20();
    let _turn = turn().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgsluice.toml");
    std::fs::write(
        &path,
        format!(
            "[fleet]\nname = \"cfg\"\n[budget]\nfraction = 0.8\nreserve = 1\n\
             [databases.app]\nhost = \"127.0.0.1\"\nport = {p}\ndbname = \"postgres\"\n\
             [databases.other]\nhost = \"127.0.0.1\"\nport = {p}\ndbname = \"template1\"\n\
             [users.postgres]\npassword = \"{SUPERUSER_PASSWORD}\"\n",
            p = pg.port
        ),
    )
    .unwrap();
    let file = path.to_str().unwrap();
    let run = budget(&["--config", file, "--json"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let report = run.json();
    assert_eq!(report["upstream"]["user"], "postgres");
    assert_eq!(
        report["upstream"]["dbname"], "postgres",
        "the first database"
    );
    let live = &report["live"];
    assert_eq!(int(&live["max_connections"]), 20);
    assert_eq!(live["fleet"]["name"], "cfg");
    assert_eq!(
        int(&live["fleet_budget"]),
        i64::from(fleet_budget(20, 0.8, 1))
    );

    // Flags beat the file.
    let run = budget(&[
        "--config",
        file,
        "--database",
        "other",
        "--fleet",
        "x",
        "--budget-fraction",
        "0.5",
        "--budget-reserve",
        "0",
        "--json",
    ])
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let live = &run.json()["live"];
    assert_eq!(live["fleet"]["name"], "x");
    assert_eq!(int(&live["fleet_budget"]), 10);

    let run = budget(&["--config", file, "--database", "nope"]).await;
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("no database \"nope\""),
        "{}",
        run.stderr
    );
}

#[tokio::test]
async fn errors_exit_2_with_a_clear_message() {
    let port = free_port();
    let run = budget(&[
        "--upstream",
        &format!("postgres://app:pw@127.0.0.1:{port}/app"),
    ])
    .await;
    assert_eq!(run.code, 2);
    assert!(
        run.stderr
            .contains(&format!("cannot read the budget from 127.0.0.1:{port}"))
            && run.stderr.contains("could not connect"),
        "{}",
        run.stderr
    );
    assert!(run.stdout.is_empty());

    let run = budget(&["--upstream", "mysql://a@b/c"]).await;
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("--upstream"), "{}", run.stderr);

    let run = budget(&[]).await;
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("no upstream"), "{}", run.stderr);

    let run = budget(&["--plan", "config/plan-small.toml"]).await;
    assert_eq!(run.code, 2, "no [database] and no upstream");
    assert!(run.stderr.contains("[database]"), "{}", run.stderr);

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("plan.toml");
    std::fs::write(&bad, "[[web]]\nname = \"w\"\ntasks = 2\npool = 5\n").unwrap();
    let run = budget(&["--plan", bad.to_str().unwrap()]).await;
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("puma_workers"), "{}", run.stderr);

    let run = budget(&["--upstream", "postgres://a@b/c", "--budget-fraction", "1.5"]).await;
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("--budget-fraction"), "{}", run.stderr);
}

#[tokio::test]
async fn the_overloaded_plan_does_not_fit() {
    let run = budget(&["--plan", "config/plan-overloaded.toml"]).await;
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout
            .contains("Result: the plan does not fit without pgsluice"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("over by 166"), "{}", run.stdout);

    let run = budget(&["--plan", "config/plan-overloaded.toml", "--json"]).await;
    assert_eq!(run.code, 1);
    let report = run.json();
    assert!(report["live"].is_null(), "no upstream was asked for");
    let plan = &report["plan"];
    assert_eq!(plan["source"], "plan");
    assert_eq!(int(&plan["max_connections"]), 90);
    assert_eq!(int(&plan["fleet_budget"]), 45);
    let connections: Vec<i64> = plan["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| int(&s["connections"]))
        .collect();
    assert_eq!(connections, [4 * 2 * 5, 15 * 8, 1 + 50]);
    assert_eq!(int(&plan["total"]), 211);
    assert_eq!(plan["without_proxy"]["fits_rule"], false);
    assert_eq!(int(&plan["without_proxy"]["rule_margin"]), 45 - 211);
    assert_eq!(int(&plan["without_proxy"]["deploy_margin"]), 87 - 422);
    assert_eq!(plan["with_proxy"]["fits"], true);
    assert_eq!(int(&plan["with_proxy"]["database_connections"]), 45);
    assert_eq!(int(&plan["with_proxy"]["waiting_at_peak"]), 166);
    assert_eq!(report["fits"], false);
}

#[tokio::test]
async fn the_small_plan_fits_the_default_max_connections() {
    let pg = pg();
    let admin = pg.admin().await;
    let (max, _, _) = limits(&admin).await;
    assert_eq!(max, 100, "PostgreSQL's default");
    let run = budget(&[
        "--upstream",
        &superuser_url(pg),
        "--plan",
        "config/plan-small.toml",
    ])
    .await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout
            .contains("Result: the plan fits without pgsluice"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("(live)"), "{}", run.stdout);
    let run = budget(&[
        "--upstream",
        &superuser_url(pg),
        "--plan",
        "config/plan-small.toml",
        "--json",
    ])
    .await;
    let report = run.json();
    let plan = &report["plan"];
    assert_eq!(plan["source"], "upstream");
    assert_eq!(int(&plan["total"]), 36);
    assert_eq!(int(&plan["without_proxy"]["rule_margin"]), 50 - 36);
    assert_eq!(report["fits"], true);
}

#[tokio::test]
async fn the_small_plan_does_not_fit_max_connections_20() {
    let pg = pg20();
    let _turn = turn().await;
    let run = budget(&[
        "--upstream",
        &superuser_url(pg),
        "--plan",
        "config/plan-small.toml",
    ])
    .await;
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("does not fit"), "{}", run.stdout);
    assert!(
        run.stdout.contains("max_connections 20 (live)"),
        "{}",
        run.stdout
    );
}

/// The subcommand leaves the proxy's own flags alone: quick mode still runs the proxy.
#[tokio::test]
async fn quick_mode_still_runs_the_proxy() {
    let pg = pg();
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgsluice"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--upstream", &superuser_url(pg)])
        .args(["--budget-max-server-connections", "2"])
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
    let result = if up {
        let client = connect(&format!(
            "host=127.0.0.1 port={port} user=postgres password={SUPERUSER_PASSWORD} dbname=postgres"
        ))
        .await;
        Some(scalar(&client, "SELECT 6 * 7").await)
    } else {
        None
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        result.as_deref(),
        Some("42"),
        "the proxy listens and serves"
    );

    // The proxy's flags before `budget` are a mistake, not silently dropped.
    let out = Command::new(env!("CARGO_BIN_EXE_pgsluice"))
        .args([
            "--pool-size",
            "3",
            "budget",
            "--upstream",
            "postgres://a@b/c",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("after `budget`"));
}
