//! The global connection budget against PostgreSQL servers with `max_connections = 20`:
//! the fleet budget is then floor(20 × 0.5) = 10. Each test starts its own server, since
//! every proxy (and the test's own connections) changes what the others see.

mod common;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio_postgres::Client;

/// Connections of the given roles (pools and control connections alike).
async fn conns_of(admin: &Client, roles: &[&str]) -> i64 {
    let roles: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
    admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = ANY($1)",
            &[&roles],
        )
        .await
        .unwrap()
        .get(0)
}

/// Samples `conns_of` every 50 ms into `max` until `stop`.
fn sampler(
    admin: Client,
    roles: Vec<&'static str>,
    max: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let n = conns_of(&admin, &roles).await as u64;
            max.fetch_max(n, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

fn db_user(pg: &TestPostgres, name: &str) -> String {
    format!(
        "[databases.{name}]\nhost = \"127.0.0.1\"\nport = {}\n[users.{name}]\npassword = \"{name}-pw\"\nauth_type = \"trust\"\n",
        pg.port
    )
}

fn budget(proxy: &Proxy) -> pgsluice::budget::Snapshot {
    proxy.shared.pools.budget_snapshots().remove(0).1
}

/// One proxy, four pools whose sizes add up to 32, 100 clients: the proxy never holds more
/// than 10 connections, and every client's work commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_pools_stay_within_half_of_max_connections() {
    let pg = TestPostgres::start(&["max_connections = 20"]);
    let names = ["bq1", "bq2", "bq3", "bq4"];
    let mut toml = "pool_size = 8\n[budget]\nrefresh_interval = \"1s\"\n".to_owned();
    for n in names {
        pg.create_app(n).await;
        toml.push_str(&db_user(&pg, n));
    }
    let proxy = Proxy::start(&toml).await;
    for n in names {
        proxy
            .client(n)
            .await
            .batch_execute("CREATE TABLE work (client int, i int)")
            .await
            .unwrap();
    }
    assert!(
        eventually(Duration::from_secs(5), || async {
            budget(&proxy).limit == 10
        })
        .await,
        "{:?}",
        budget(&proxy)
    );
    let max = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let watch = sampler(pg.admin().await, names.to_vec(), max.clone(), stop.clone());
    let mut tasks = Vec::new();
    for client in 0..100 {
        let name = names[client % 4];
        let c = proxy.client(name).await;
        tasks.push(tokio::spawn(async move {
            for i in 0..5 {
                c.batch_execute(&format!(
                    "BEGIN; INSERT INTO work VALUES ({client}, {i}); SELECT pg_sleep(0.01); COMMIT"
                ))
                .await
                .unwrap();
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .expect("work finishes")
            .unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    watch.await.unwrap();
    for n in names {
        assert_eq!(
            scalar(&proxy.client(n).await, "SELECT count(*) FROM work").await,
            "125",
            "{n}"
        );
    }
    let max = max.load(Ordering::Relaxed);
    assert!(
        max <= 10,
        "the proxy held {max} connections; the budget is 10"
    );
    assert!(max >= 6, "the budget was used ({max})");
}

/// Runs `clients` clients in a loop of short transactions until `stop`; counts errors.
fn workload(
    proxy: &Proxy,
    name: &'static str,
    clients: usize,
    stop: Arc<AtomicBool>,
    errors: Arc<AtomicU64>,
    done: Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let conn = proxy.conn(name, "x", name);
    (0..clients)
        .map(|_| {
            let (conn, stop, errors, done) =
                (conn.clone(), stop.clone(), errors.clone(), done.clone());
            tokio::spawn(async move {
                let c = connect(&conn).await;
                while !stop.load(Ordering::Relaxed) {
                    match c
                        .batch_execute("BEGIN; SELECT pg_sleep(0.02); COMMIT")
                        .await
                    {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            // The client's proxy stopped: this client is done.
                            eprintln!("workload error: {e}");
                            errors.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    };
                }
            })
        })
        .collect()
}

/// Two proxies share 10; two more join (deploy overlap) and the fleet stays under what the
/// database accepts, back to 10 within two refresh intervals; two leave and the others grow
/// back. Client work never fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_shares_the_budget_through_a_deploy() {
    let pg = TestPostgres::start(&["max_connections = 20"]);
    pg.create_app("fl").await;
    let toml = format!(
        "pool_size = 10\n[fleet]\nname = \"shop\"\n[budget]\nrefresh_interval = \"1s\"\n{}",
        db_user(&pg, "fl")
    );
    let (stop, errors, done) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let admin = pg.admin().await;
    let p1 = Proxy::start(&toml).await;
    let p2 = Proxy::start(&toml).await;
    let both_half = || async { budget(&p1).share == 5 && budget(&p2).share == 5 };
    assert!(
        eventually(Duration::from_secs(5), both_half).await,
        "{:?}",
        budget(&p1)
    );
    let mut tasks = workload(&p1, "fl", 8, stop.clone(), errors.clone(), done.clone());
    tasks.extend(workload(
        &p2,
        "fl",
        8,
        stop.clone(),
        errors.clone(),
        done.clone(),
    ));

    // Two members: at most 10 together.
    let max = Arc::new(AtomicU64::new(0));
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let watch = sampler(
        pg.admin().await,
        vec!["fl"],
        max.clone(),
        stop_sampling.clone(),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        max.load(Ordering::Relaxed) <= 10,
        "two members held {}",
        max.load(Ordering::Relaxed)
    );
    assert!(max.load(Ordering::Relaxed) >= 6, "the budget was used");

    // Deploy: two more members. Never past max_connections - superuser_reserved (17).
    max.store(0, Ordering::Relaxed);
    let p3 = Proxy::start(&toml).await;
    let p4 = Proxy::start(&toml).await;
    tasks.extend(workload(
        &p3,
        "fl",
        8,
        stop.clone(),
        errors.clone(),
        done.clone(),
    ));
    tasks.extend(workload(
        &p4,
        "fl",
        8,
        stop.clone(),
        errors.clone(),
        done.clone(),
    ));
    let started = std::time::Instant::now();
    let converged = eventually(Duration::from_secs(4), || async {
        conns_of(&admin, &["fl"]).await <= 10
    })
    .await;
    assert!(
        converged,
        "back under the fleet budget within two refresh intervals"
    );
    eprintln!("converged after {:?}", started.elapsed());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let transition_max = max.load(Ordering::Relaxed);
    assert!(
        transition_max <= 17,
        "the fleet held {transition_max}, past what the database accepts"
    );
    // Steady with four members: each share is 2, the total at most 10.
    max.store(0, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        max.load(Ordering::Relaxed) <= 10,
        "four members held {}",
        max.load(Ordering::Relaxed)
    );
    for p in [&p1, &p2, &p3, &p4] {
        assert_eq!(budget(p).share, 2);
        assert_eq!(budget(p).upstream.members, 4);
    }

    // Two leave: the others grow back to a share of 5.
    drop(p3);
    drop(p4);
    assert!(
        eventually(Duration::from_secs(5), both_half).await,
        "{:?}",
        budget(&p1)
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
    }
    stop_sampling.store(true, Ordering::Relaxed);
    watch.await.unwrap();
    assert!(max.load(Ordering::Relaxed) <= 17);
    // Clients of the stopped proxies lose their connections; the others never fail.
    assert!(
        done.load(Ordering::Relaxed) > 100,
        "work got done: {}",
        done.load(Ordering::Relaxed)
    );
    let errs = errors.load(Ordering::Relaxed);
    assert!(
        errs <= 16,
        "only the stopped proxies' clients may fail once each ({errs})"
    );
}

/// Budget full, pool A idle, pool B waits: an idle server of A is closed for B. And with the
/// budget full, clients of different pools are served in arrival order.
#[tokio::test]
async fn waiters_take_over_idle_servers_and_keep_arrival_order() {
    let pg = TestPostgres::start(&["max_connections = 20"]);
    pg.create_app("ta").await;
    pg.create_app("tb").await;
    let toml = format!(
        "pool_size = 2\nquery_wait_timeout = \"5s\"\n[budget]\nmax_server_connections = 2\n{}{}",
        db_user(&pg, "ta"),
        db_user(&pg, "tb")
    );
    let proxy = Proxy::start(&toml).await;
    let admin = pg.admin().await;
    let (a1, a2) = (proxy.client("ta").await, proxy.client("ta").await);
    a1.batch_execute("BEGIN").await.unwrap();
    a2.batch_execute("BEGIN").await.unwrap();
    a1.batch_execute("COMMIT").await.unwrap();
    a2.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        server_conns(&admin, "ta").await,
        2,
        "pool A holds the whole budget, idle"
    );
    let b = proxy.client("tb").await;
    let started = std::time::Instant::now();
    assert_eq!(scalar(&b, "SELECT 1").await, "1");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "B did not wait for a timeout"
    );
    assert_eq!(server_conns(&admin, "ta").await, 1);
    assert_eq!(server_conns(&admin, "tb").await, 1);

    // Arrival order: A holds both servers in transactions; B queues, then A3 queues.
    a1.batch_execute("BEGIN").await.unwrap();
    a2.batch_execute("BEGIN").await.unwrap();
    let b_task = tokio::spawn(async move {
        scalar(
            &b,
            "SELECT extract(epoch FROM clock_timestamp()) FROM pg_sleep(0.3)",
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let a3 = proxy.client("ta").await;
    let a3_task =
        tokio::spawn(
            async move { scalar(&a3, "SELECT extract(epoch FROM clock_timestamp())").await },
        );
    tokio::time::sleep(Duration::from_millis(200)).await;
    a1.batch_execute("COMMIT").await.unwrap(); // frees one: B waited longest
    let b_at: f64 = b_task.await.unwrap().parse().unwrap();
    a2.batch_execute("COMMIT").await.unwrap();
    let a3_at: f64 = a3_task.await.unwrap().parse().unwrap();
    assert!(
        b_at < a3_at,
        "B (queued first) ran at {b_at}, A3 at {a3_at}"
    );
}

/// max_connections raised on the server: the budget follows at the next refresh.
#[tokio::test]
async fn budget_follows_max_connections() {
    let pg = TestPostgres::start(&["max_connections = 20"]);
    pg.create_app("mc").await;
    let proxy = Proxy::start(&format!(
        "[budget]\nrefresh_interval = \"1s\"\n{}",
        db_user(&pg, "mc")
    ))
    .await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            budget(&proxy).fleet_budget == 10
        })
        .await
    );
    assert_eq!(budget(&proxy).upstream.max_connections, 20);
    pg.admin()
        .await
        .batch_execute("ALTER SYSTEM SET max_connections = 40")
        .await
        .unwrap();
    pg.ctl_stop();
    pg.ctl_start();
    assert!(
        eventually(Duration::from_secs(10), || async {
            budget(&proxy).fleet_budget == 20
        })
        .await,
        "{:?}",
        budget(&proxy)
    );
    // The restart closed the control connection: it is replaced before the next refresh
    // (a refresh error shows only if the database is still down then).
    assert_eq!(scalar(&proxy.client("mc").await, "SELECT 1").await, "1");
}

/// A control connection the server closes (here `pg_terminate_backend`; in production an
/// `idle_session_timeout`, a failover) is back at once, not after `refresh_interval`: while
/// it is gone this proxy is no member the others count, and they may grow into its share.
#[tokio::test]
async fn a_lost_control_connection_comes_back_at_once() {
    let pg = TestPostgres::start(&["max_connections = 20"]);
    pg.create_app("cc").await;
    let proxy = Proxy::start(&format!(
        "[budget]\nrefresh_interval = \"60s\"\n{}",
        db_user(&pg, "cc")
    ))
    .await;
    let admin = pg.admin().await;
    let member = || {
        let admin = &admin;
        async move {
            let pids: Vec<i32> = admin
                .query(
                    "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'pgsluice:fleet=%'",
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            pids
        }
    };
    assert!(
        eventually(Duration::from_secs(5), || async {
            member().await.len() == 1
        })
        .await,
        "registered"
    );
    let first = member().await[0];
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&first])
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            matches!(member().await.as_slice(), [p] if *p != first)
        })
        .await,
        "a new control connection within seconds (refresh_interval is 60 s): {:?}",
        member().await
    );
    assert_eq!(scalar(&proxy.client("cc").await, "SELECT 1").await, "1");
}

/// While its control connection cannot come back (here its role may no longer log in; a
/// database at max_connections refuses it the same way), the proxy is no member the others
/// count: it keeps the servers it held but opens no more, and its clients queue. Once a
/// refresh succeeds it grows again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_without_its_control_connection_does_not_grow() {
    let pg = TestPostgres::start(&["max_connections = 40"]);
    pg.create_app("frozen").await;
    let admin = pg.admin().await;
    admin
        .batch_execute("CREATE ROLE frozen_ctl LOGIN PASSWORD 'ctl-pw'")
        .await
        .unwrap();
    let proxy = Proxy::start(&format!(
        "pool_size = 8\nquery_wait_timeout = \"30s\"\n[budget]\nrefresh_interval = \"60s\"\n\
         user = \"frozen_ctl\"\npassword = \"ctl-pw\"\n{}",
        db_user(&pg, "frozen")
    ))
    .await;
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(proxy.client("frozen").await);
    }
    // Two servers open, then go idle.
    for c in &clients[..2] {
        c.batch_execute("BEGIN; SELECT 1").await.unwrap();
    }
    for c in &clients[..2] {
        c.batch_execute("COMMIT").await.unwrap();
    }
    assert_eq!(server_conns(&admin, "frozen").await, 2);

    // Two statements, not one query: a multi-statement query is one transaction, so the
    // backend would be terminated before NOLOGIN commits, and a proxy quick to reconnect
    // would log in again (its control connection back, no error to see).
    admin
        .batch_execute("ALTER ROLE frozen_ctl NOLOGIN")
        .await
        .unwrap();
    admin
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'frozen_ctl'",
        )
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(20), || async {
            budget(&proxy).last_error.is_some()
        })
        .await,
        "the control connection could not come back"
    );
    // Six transactions at once: two run on the servers held, four wait.
    let clients: Vec<Arc<Client>> = clients.into_iter().map(Arc::new).collect();
    let done = Arc::new(AtomicU64::new(0));
    for c in &clients {
        let (c, done) = (c.clone(), done.clone());
        tokio::spawn(async move {
            c.batch_execute("BEGIN; SELECT 1").await.unwrap();
            done.fetch_add(1, Ordering::Relaxed);
        });
    }
    assert!(
        eventually(Duration::from_secs(5), || async {
            done.load(Ordering::Relaxed) >= 2
        })
        .await,
        "the two servers held serve two of them"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        (
            done.load(Ordering::Relaxed),
            server_conns(&admin, "frozen").await,
            // What SHOW BUDGET and the metrics show: the limit in force (the two servers
            // held and the control connection they were counted with), not the last read.
            budget(&proxy).limit,
        ),
        (2, 2, 3),
        "no server opened beyond those held"
    );

    admin
        .batch_execute("ALTER ROLE frozen_ctl LOGIN")
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            done.load(Ordering::Relaxed) == 6
        })
        .await,
        "the queued transactions run once the budget is read again"
    );
    assert_eq!(server_conns(&admin, "frozen").await, 6);
    assert!(budget(&proxy).last_error.is_none());
}

/// The fleet members of a server: (pid, application_name) of the control connections.
async fn members(admin: &Client) -> Vec<(i32, String)> {
    admin
        .query(
            "SELECT pid, application_name FROM pg_stat_activity WHERE application_name LIKE 'pgsluice:fleet=%' ORDER BY pid",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// RECONNECT replaces the control connection too (after a failover the budget must be
/// read on the new primary, not on the old server that still answers), and a client that
/// takes a member's name adds no member.
#[tokio::test]
async fn reconnect_replaces_the_control_connection() {
    let pg = TestPostgres::start(&["max_connections = 20"]);
    pg.create_app("ccre").await;
    let proxy = Proxy::start(&format!(
        "admin_users = \"ccre\"\n[budget]\nrefresh_interval = \"60s\"\n{}",
        db_user(&pg, "ccre")
    ))
    .await;
    let admin = pg.admin().await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            members(&admin).await.len() == 1
        })
        .await,
        "registered"
    );
    let (first, name) = members(&admin).await.remove(0);

    // A connection of someone else's under the member's name (a client may set any
    // application_name): still one member.
    let (_impostor, conn) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user=ccre password=ccre-pw dbname=ccre application_name={name}",
            pg.port
        ),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);

    let console = connect(&proxy.conn("ccre", "ccre-pw", "pgbouncer")).await;
    console.simple_query("RECONNECT").await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            members(&admin)
                .await
                .iter()
                .any(|(pid, n)| *pid != first && *n == name)
                && !members(&admin).await.iter().any(|(pid, _)| *pid == first)
        })
        .await,
        "a new control connection after RECONNECT (refresh_interval is 60 s): {:?}",
        members(&admin).await
    );
    // The new connection read the figures at once: the impostor is not a second member.
    assert!(
        eventually(Duration::from_secs(5), || async {
            budget(&proxy).last_refresh.is_some() && budget(&proxy).upstream.members == 1
        })
        .await,
        "members: {}",
        budget(&proxy).upstream.members
    );
    assert_eq!(scalar(&proxy.client("ccre").await, "SELECT 1").await, "1");
}

/// A reload that removes every database on a server closes that server's control
/// connection (it no longer counts as a member of that server's fleet); one that adds a
/// database there again brings it back.
#[tokio::test]
async fn a_server_no_database_uses_has_no_control_connection() {
    let pg = TestPostgres::start(&["max_connections = 20"]);
    pg.create_app("ccgone").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgsluice.toml");
    // Two upstreams as pgsluice counts them (TCP, and the Unix socket), one server really.
    let file = |both: bool| {
        let mut s = format!(
            "[budget]\nrefresh_interval = \"60s\"\n{}",
            db_user(&pg, "ccgone")
        );
        if both {
            s.push_str(&format!(
                "[databases.ccgone_b]\nhost = \"{}\"\nport = {}\ndbname = \"ccgone\"\nuser = \"ccgone\"\npassword = \"ccgone-pw\"\n",
                pg.dir.display(),
                pg.port
            ));
        }
        s
    };
    std::fs::write(&path, file(true)).unwrap();
    let proxy = Proxy::start_file(&path).await;
    let admin = pg.admin().await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            members(&admin).await.len() == 2
        })
        .await,
        "one control connection per upstream: {:?} {:?}",
        members(&admin).await,
        proxy
            .shared
            .pools
            .budget_snapshots()
            .into_iter()
            .map(|(u, s)| (u, s.last_error))
            .collect::<Vec<_>>()
    );
    std::fs::write(&path, file(false)).unwrap();
    pgsluice::reload::reload(&proxy.shared).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            members(&admin).await.len() == 1
        })
        .await,
        "the unused upstream's control connection is closed: {:?}",
        members(&admin).await
    );
    std::fs::write(&path, file(true)).unwrap();
    pgsluice::reload::reload(&proxy.shared).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            members(&admin).await.len() == 2
        })
        .await,
        "back with its database: {:?}",
        members(&admin).await
    );
}

/// The control connection has the server probe its socket after 10 s of silence (the
/// kernel's default is two hours): a member whose host vanishes without closing it stops
/// being counted within about 25 s. Read off the server's end of the socket with `ss`.
#[tokio::test]
async fn the_server_probes_the_control_connection_after_10_s() {
    if std::process::Command::new("ss").arg("-V").output().is_err() {
        panic!("ss (iproute2) is needed: apt-get install iproute2");
    }
    let pg = TestPostgres::start(&["max_connections = 20"]);
    pg.create_app("ka").await;
    let proxy = Proxy::start(&db_user(&pg, "ka")).await;
    let admin = pg.admin().await;
    let control_port = || async {
        admin
            .query_opt(
                "SELECT client_port FROM pg_stat_activity WHERE application_name LIKE 'pgsluice:fleet=%'",
                &[],
            )
            .await
            .unwrap()
            .map(|r| r.get::<_, i32>(0))
    };
    assert!(
        eventually(Duration::from_secs(5), || async {
            control_port().await.is_some()
        })
        .await,
        "registered"
    );
    let port = control_port().await.unwrap();
    // The SET runs right after the login: wait for the first refresh to have used it.
    assert!(
        eventually(Duration::from_secs(5), || async {
            budget(&proxy).last_refresh.is_some()
        })
        .await
    );
    // The server's end of the control connection, as ss shows its timer (keepalive while
    // the connection is quiet; a refresh in flight shows another timer for a moment).
    let ss = || {
        let out = std::process::Command::new("ss")
            .args(["-tnoH", "state", "established"])
            .arg(format!("( sport = :{} and dport = :{port} )", pg.port))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // e.g. timer:(keepalive,9.812ms,0) / timer:(keepalive,8.5sec,0) / timer:(keepalive,119min,0)
    let keepalive = |text: &str| -> Option<String> {
        let t = text.split("timer:(keepalive,").nth(1)?;
        Some(t.split(',').next()?.to_owned())
    };
    let mut text = ss();
    for _ in 0..50 {
        if keepalive(&text).is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        text = ss();
    }
    let timer = keepalive(&text)
        .unwrap_or_else(|| panic!("no keepalive timer on the server's socket: {text:?}"));
    let secs = if let Some(ms) = timer.strip_suffix("ms") {
        ms.parse::<f64>().unwrap() / 1000.0
    } else if let Some(s) = timer.strip_suffix("sec") {
        s.parse::<f64>().unwrap_or(f64::MAX)
    } else {
        f64::MAX // minutes: the kernel's default
    };
    assert!(secs <= 10.0, "keepalive timer {timer} ({text:?})");
}

/// Upstream down when the proxy starts: clients get a clear error, then service once it is up.
#[tokio::test]
async fn upstream_down_at_start_then_up() {
    let pg = TestPostgres::start(&["max_connections = 20"]);
    pg.create_app("late").await;
    pg.ctl_stop();
    let proxy = Proxy::start(&format!(
        "[budget]\nrefresh_interval = \"1s\"\n{}",
        db_user(&pg, "late")
    ))
    .await;
    let e = try_connect(&proxy.conn("late", "x", "late"))
        .await
        .expect_err("no server yet");
    assert_eq!(code(&e), "08006", "{e}");
    assert!(budget(&proxy).last_error.is_some());
    pg.ctl_start();
    let served = eventually(Duration::from_secs(10), || async {
        match try_connect(&proxy.conn("late", "x", "late")).await {
            Ok(c) => c.simple_query("SELECT 1").await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
    assert!(served, "served once the server is up");
    assert_eq!(budget(&proxy).fleet_budget, 10);
}
