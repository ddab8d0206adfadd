//! `max_db_connections` and `max_user_connections` span pools (one per database and user)
//! and upstream servers. A client held back by a cap gets room that another pool holds
//! idle, and the server another pool returns, without waiting for `query_wait_timeout`;
//! PostgreSQL never sees more sessions than the cap allows.

mod common;
use std::time::{Duration, Instant};

use common::*;
use tokio_postgres::Client;

/// Sessions of `role` on `datname`, as PostgreSQL counts them.
async fn sessions(admin: &Client, role: &str, datname: &str) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND datname = $2",
            &[&role, &datname],
        )
        .await
        .unwrap()
        .get(0)
}

/// A client's `SELECT 1` must not wait for the cap's timeout: run it and report how long
/// it took.
async fn select_within(c: &Client, what: &str) -> Duration {
    let began = Instant::now();
    assert_eq!(scalar(c, "SELECT 1").await, "1", "{what}");
    began.elapsed()
}

/// A proxy for database `name` with two users, `name` and `{name}2`, under
/// `max_db_connections = 2` (pool size 5 each, one upstream server), and a superuser
/// connection to PostgreSQL.
async fn two_users_under_a_db_cap(name: &str) -> (Proxy, Client) {
    let pg = pg();
    pg.create_app(name).await;
    let admin = pg.admin().await;
    admin
        .batch_execute(&format!("CREATE ROLE {name}2 LOGIN PASSWORD '{name}2-pw'"))
        .await
        .unwrap();
    let proxy = Proxy::start(&format!(
        "pool_size = 5\nmax_db_connections = 2\nquery_wait_timeout = \"10s\"\n\
         [budget]\nmax_server_connections = 50\n\
         [databases.{name}]\nhost = \"127.0.0.1\"\nport = {}\n\
         [users.{name}]\npassword = \"{name}-pw\"\n[users.{name}2]\npassword = \"{name}2-pw\"\n",
        pg.port
    ))
    .await;
    (proxy, admin)
}

/// Two users of one database under `max_db_connections = 2`, on one upstream server.
#[tokio::test]
async fn a_database_cap_is_shared_by_its_users() {
    let (proxy, admin) = two_users_under_a_db_cap("capd").await;
    let user_a = || connect_as(&proxy, "capd", "capd");
    let user_b = || connect_as(&proxy, "capd2", "capd");
    cap_scenario(&admin, ("capd", "capd"), ("capd2", "capd"), user_a, user_b).await;
}

/// One user, one database reached over two upstream servers (TCP and the Unix socket: two
/// budgets), under `max_user_connections = 2`.
#[tokio::test]
async fn a_user_cap_spans_upstream_servers() {
    let pg = pg();
    pg.create_app("capu").await;
    let admin = pg.admin().await;
    let proxy = Proxy::start(&format!(
        "pool_size = 5\nmax_user_connections = 2\nquery_wait_timeout = \"10s\"\n\
         [budget]\nmax_server_connections = 50\n\
         [databases.capu_tcp]\nhost = \"127.0.0.1\"\nport = {port}\ndbname = \"capu\"\n\
         [databases.capu_unix]\nhost = \"{dir}\"\nport = {port}\ndbname = \"capu\"\n\
         [users.capu]\npassword = \"capu-pw\"\n",
        port = pg.port,
        dir = pg.dir.display()
    ))
    .await;
    assert_eq!(
        proxy.shared.pools.upstreams().len(),
        2,
        "two upstream servers, two budgets"
    );
    let tcp = || connect_as(&proxy, "capu", "capu_tcp");
    let unix = || connect_as(&proxy, "capu", "capu_unix");
    // Both pools log in as capu to database capu: PostgreSQL tells them apart by address.
    cap_scenario(&admin, ("capu", "capu"), ("capu", "capu"), tcp, unix).await;
}

async fn connect_as(proxy: &Proxy, user: &str, db: &str) -> Client {
    connect(&proxy.conn(user, &format!("{user}-pw"), db)).await
}

/// Pools A and B share a cap of 2 (`a` and `b` are their `(role, datname)` upstream).
/// 1. A holds both servers idle; B's client closes one of them and runs at once.
/// 2. A holds the cap in two transactions; B's client queues; the first server A returns
///    goes to B (closed, and B opens one), not into A's idle list.
///
/// Through both, PostgreSQL sees at most 2 sessions of the two pools together.
async fn cap_scenario<FA, FB, FutA, FutB>(
    admin: &Client,
    a: (&str, &str),
    b: (&str, &str),
    pool_a: FA,
    pool_b: FB,
) where
    FA: Fn() -> FutA,
    FB: Fn() -> FutB,
    FutA: std::future::Future<Output = Client>,
    FutB: std::future::Future<Output = Client>,
{
    let total = || async {
        let n = sessions(admin, a.0, a.1).await;
        if a == b {
            n
        } else {
            n + sessions(admin, b.0, b.1).await
        }
    };
    let (a1, a2) = (pool_a().await, pool_a().await);
    a1.batch_execute("BEGIN").await.unwrap();
    a2.batch_execute("BEGIN").await.unwrap();
    a1.batch_execute("COMMIT").await.unwrap();
    a2.batch_execute("COMMIT").await.unwrap();
    assert_eq!(total().await, 2, "pool A holds the cap, idle");

    // 1. Room held idle by another pool is taken at once (the login too needs a server
    //    when the pool has not seen one yet).
    let began = Instant::now();
    let b1 = pool_b().await;
    select_within(&b1, "B takes an idle server's room").await;
    let took = began.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "B waited {took:?} although A's servers were idle"
    );
    assert!(
        eventually(Duration::from_secs(5), || async { total().await == 2 }).await,
        "A's idle server closed for B: {} sessions",
        total().await
    );

    // 2. A holds both servers in transactions (its second takes the room of B's idle
    //    server, which closes in turn).
    a1.batch_execute("BEGIN; SELECT 1").await.unwrap();
    a2.batch_execute("BEGIN; SELECT 1").await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async { total().await == 2 }).await,
        "A holds the cap: {} sessions",
        total().await
    );
    let b2 = pool_b().await;
    let queued = tokio::spawn(async move { select_within(&b2, "B served after A's commit").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!queued.is_finished(), "B waits while A holds the cap");
    let committed = Instant::now();
    a1.batch_execute("COMMIT").await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), queued)
        .await
        .expect("B is served once A returns a server, not at query_wait_timeout")
        .unwrap();
    assert!(committed.elapsed() < Duration::from_secs(3));
    a2.batch_execute("COMMIT").await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async { total().await <= 2 }).await,
        "the cap holds: {} sessions",
        total().await
    );
    drop(b1);
}

/// Two busy pools under one cap share it without closing and opening servers at every turn
/// (a returned server goes to the other pool only when that pool's client has waited
/// noticeably longer), and neither pool starves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_pools_under_a_cap_keep_their_servers() {
    let (proxy, _admin) = two_users_under_a_db_cap("capc").await;
    let mut tasks = Vec::new();
    for user in ["capc", "capc2"] {
        for _ in 0..4 {
            let c = connect_as(&proxy, user, "capc").await;
            tasks.push(tokio::spawn(async move {
                let mut pids = std::collections::HashSet::new();
                let (began, mut n) = (Instant::now(), 0);
                while began.elapsed() < Duration::from_millis(1500) && n < 5000 {
                    pids.insert(scalar(&c, "SELECT pg_backend_pid()").await);
                    n += 1;
                }
                (user, n, pids)
            }));
        }
    }
    let mut done = std::collections::HashMap::new();
    let mut pids = std::collections::HashSet::new();
    for t in tasks {
        let (user, n, seen) = t.await.unwrap();
        *done.entry(user).or_insert(0) += n;
        pids.extend(seen);
    }
    let total: i32 = done.values().sum();
    for user in ["capc", "capc2"] {
        assert!(done[user] >= 20, "{user} starved: {done:?}");
    }
    assert!(
        pids.len() <= 8,
        "{} servers opened for {total} statements: a server closed and reopened at most turns",
        pids.len()
    );
}

/// A server another pool used a moment ago is left to it at first (it is likely to be used
/// again at once), but not for long: a client held back by the cap while its own pool's
/// server is in a long transaction gets that room within a janitor round or so.
#[tokio::test]
async fn room_held_idle_is_not_kept_from_a_waiting_client() {
    let (proxy, admin) = two_users_under_a_db_cap("capj").await;
    let a1 = connect_as(&proxy, "capj", "capj").await;
    let a2 = connect_as(&proxy, "capj", "capj").await;
    let b = connect_as(&proxy, "capj2", "capj").await;
    a1.batch_execute("BEGIN; SELECT 1").await.unwrap(); // A's server stays lent
    assert_eq!(scalar(&b, "SELECT 1").await, "1"); // B's server is idle now, just used
    let began = Instant::now();
    assert_eq!(scalar(&a2, "SELECT 1").await, "1");
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "A's second client waited {:?} while B's server sat idle",
        began.elapsed()
    );
    a1.batch_execute("COMMIT").await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            sessions(&admin, "capj2", "capj").await == 0
        })
        .await,
        "B's idle server was closed for A"
    );
}
