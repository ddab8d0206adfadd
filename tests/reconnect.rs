//! Switching the upstream address with the admin console's RECONNECT: pgsluice reaches its
//! database through a TCP forwarder (`common::fault`) that is retargeted from one
//! PostgreSQL to another, as a DNS flip or a load balancer switch would. RECONNECT closes the
//! old servers as they become idle; new ones reach the new address; no client sees an error.

mod common;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use pgsluice::pool::Retire;
use tokio_postgres::SimpleQueryMessage;

/// The database `name` on two clusters: the shared one (A) and a new one (B).
async fn two_clusters(name: &str) -> (&'static TestPostgres, TestPostgres) {
    let a = pg();
    let b = TestPostgres::start(&[]);
    a.create_app(name).await;
    b.create_app(name).await;
    (a, b)
}

/// The port of the PostgreSQL that answered (A and B differ by port).
async fn served_by(c: &tokio_postgres::Client, sql: &str) -> Result<String, tokio_postgres::Error> {
    for m in c.simple_query(sql).await? {
        if let SimpleQueryMessage::Row(r) = m {
            return Ok(r.get(0).unwrap().to_owned());
        }
    }
    panic!("{sql}: no row")
}

fn retired(proxy: &Proxy, db: &str, why: Retire) -> u64 {
    proxy
        .shared
        .pools
        .stats()
        .iter()
        .filter(|p| p.database == db)
        .map(|p| p.retired[why as usize])
        .sum()
}

/// What the load saw: (when the transaction started, when it ended, the port that
/// answered) and errors.
#[derive(Default)]
struct Seen {
    answers: Vec<(Instant, Instant, String)>,
    errors: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_moves_every_server_to_the_new_address() {
    let (a, b) = two_clusters("rc1").await;
    let fault = Fault::start(("127.0.0.1", a.port)).await;
    let proxy = Proxy::start(&app_config_at(
        fault.port(),
        "rc1",
        "pool_size = 4\nadmin_users = \"rc1\"",
    ))
    .await;
    let admin = Arc::new(connect(&proxy.conn("rc1", "rc1-pw", "pgbouncer")).await);
    let (a_port, b_port) = (a.port.to_string(), b.port.to_string());

    // 20 clients over 4 servers, transaction after transaction.
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut load = Vec::new();
    for _ in 0..20 {
        let c = proxy.client("rc1").await;
        let (stop, seen) = (stop.clone(), seen.clone());
        load.push(tokio::spawn(async move {
            for _ in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let began = Instant::now();
                let r = served_by(&c, "BEGIN; SELECT current_setting('port'); COMMIT").await;
                {
                    let mut s = seen.lock().unwrap();
                    match r {
                        Ok(port) => s.answers.push((began, Instant::now(), port)),
                        Err(e) => s.errors.push(e.to_string()),
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // One client holds an old server in an open transaction across the switch.
    let holder = proxy.client("rc1").await;
    holder.simple_query("BEGIN").await.unwrap();
    assert_eq!(
        served_by(&holder, "SELECT current_setting('port')")
            .await
            .unwrap(),
        a_port
    );

    let switched = Instant::now();
    fault.retarget(("127.0.0.1", b.port));
    admin.simple_query("RECONNECT rc1").await.unwrap();
    let a2 = admin.clone();
    let wait_close =
        tokio::spawn(async move { a2.simple_query("WAIT_CLOSE rc1").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !wait_close.is_finished(),
        "WAIT_CLOSE waits for the transaction still on an old server"
    );
    // The old server is still where the holder's transaction runs.
    assert_eq!(
        served_by(&holder, "SELECT current_setting('port')")
            .await
            .unwrap(),
        a_port
    );
    holder.simple_query("COMMIT").await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), wait_close)
        .await
        .expect("WAIT_CLOSE answers once the old servers are released")
        .unwrap()
        .unwrap();
    let closed = Instant::now();
    assert_eq!(
        served_by(&holder, "SELECT current_setting('port')")
            .await
            .unwrap(),
        b_port,
        "the holder's next transaction runs on the new address"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }

    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert!(
        seen.errors.is_empty(),
        "no client saw an error: {:?}",
        seen.errors
    );
    // Ended before the switch: on the old address. (One that began before it may end on a
    // new server: it was queued, and RECONNECT freed room for a new one.)
    let before = seen.answers.iter().filter(|(_, end, _)| *end < switched);
    assert!(
        before.clone().count() > 20,
        "the load ran before the switch"
    );
    assert!(before.clone().all(|(_, _, p)| *p == a_port));
    let after: Vec<_> = seen
        .answers
        .iter()
        .filter(|(began, _, _)| *began > closed)
        .collect();
    assert!(after.len() > 20, "the load ran after the switch");
    assert!(
        after.iter().all(|(_, _, p)| *p == b_port),
        "every transaction after WAIT_CLOSE ran on the new address"
    );
    // No server left on the old database; the new one has at most the pool.
    let admin_a = a.admin().await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            server_conns(&admin_a, "rc1").await == 0
        })
        .await,
        "the old database keeps no server connection"
    );
    let admin_b = b.admin().await;
    let on_b = server_conns(&admin_b, "rc1").await;
    assert!(
        (1..=4).contains(&on_b),
        "{on_b} servers on the new database"
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            proxy.shared.pools.stats()[0].open as i64 == server_conns(&admin_b, "rc1").await
        })
        .await,
        "every server pgsluice counts is a backend on the new database"
    );
    assert!(retired(&proxy, "rc1", Retire::Reconnect) >= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_reconnect_resume_switches_queued_clients() {
    let (a, b) = two_clusters("rc2").await;
    let fault = Fault::start(("127.0.0.1", a.port)).await;
    let proxy = Proxy::start(&app_config_at(
        fault.port(),
        "rc2",
        "pool_size = 2\nadmin_users = \"rc2\"",
    ))
    .await;
    let admin = connect(&proxy.conn("rc2", "rc2-pw", "pgbouncer")).await;
    let first = proxy.client("rc2").await;
    let port = "SELECT current_setting('port')";
    assert_eq!(served_by(&first, port).await.unwrap(), a.port.to_string());

    admin.simple_query("PAUSE rc2").await.unwrap();
    let mut queued = Vec::new();
    for _ in 0..6 {
        let c = proxy.client("rc2").await;
        queued.push(tokio::spawn(async move {
            served_by(&c, port).await.map_err(|e| e.to_string())
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        queued.iter().all(|q| !q.is_finished()),
        "paused: they queue"
    );
    fault.retarget(("127.0.0.1", b.port));
    admin.simple_query("RECONNECT rc2").await.unwrap();
    admin.simple_query("RESUME rc2").await.unwrap();
    for q in queued {
        let got = tokio::time::timeout(Duration::from_secs(10), q)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            got,
            Ok(b.port.to_string()),
            "a queued client got the new address"
        );
    }
    assert_eq!(served_by(&first, port).await.unwrap(), b.port.to_string());
    let admin_a = a.admin().await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            server_conns(&admin_a, "rc2").await == 0
        })
        .await
    );
}

#[tokio::test]
async fn reconnect_of_all_databases_and_errors() {
    let proxy = app("rc3", "admin_users = \"rc3\"\npool_size = 2").await;
    let admin = connect(&proxy.conn("rc3", "rc3-pw", "pgbouncer")).await;
    let c = proxy.client("rc3").await;
    let before = scalar(&c, "SELECT pg_backend_pid()").await;
    admin.simple_query("RECONNECT").await.unwrap();
    admin.simple_query("WAIT_CLOSE").await.unwrap();
    let after = scalar(&c, "SELECT pg_backend_pid()").await;
    assert_ne!(before, after, "the idle server was closed and replaced");
    assert_eq!(retired(&proxy, "rc3", Retire::Reconnect), 1);
    let metrics = String::from_utf8(pgsluice::metrics::scrape(&proxy.shared)).unwrap();
    assert!(
        metrics.contains(
            "pgsluice_servers_retired_total{database=\"rc3\",reason=\"reconnect\",user=\"rc3\"} 1"
        ),
        "{metrics}"
    );
    for (sql, sqlstate) in [
        ("RECONNECT nope", "3D000"),
        ("WAIT_CLOSE nope", "3D000"),
        ("RECONNECT pgbouncer", "55000"),
        ("RECONNECT a b", "42601"),
    ] {
        let e = admin.simple_query(sql).await.unwrap_err();
        assert_eq!(code(&e), sqlstate, "{sql}: {e}");
    }
    // The console still works.
    admin.simple_query("SHOW POOLS").await.unwrap();
}
