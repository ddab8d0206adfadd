//! The database restarts under pgsluice: clients between transactions see nothing, clients
//! that need a new server wait through the restart, login errors come at once.

mod common;
use std::time::{Duration, Instant};

use common::*;

fn config(pg: &TestPostgres, name: &str, top: &str, password: &str) -> String {
    format!(
        "{top}\n[budget]\nmax_server_connections = 10\n[databases.{name}]\nhost = \"127.0.0.1\"\nport = {}\npassword = \"{password}\"\n[users.{name}]\npassword = \"{name}-pw\"\n",
        pg.port
    )
}

#[tokio::test]
async fn restart_between_transactions_is_invisible() {
    let pg = TestPostgres::start(&[]);
    pg.create_app("fo1").await;
    let proxy = Proxy::start(&config(&pg, "fo1", "pool_size = 2", "fo1-pw")).await;
    let c = proxy.client("fo1").await;
    let before = scalar(&c, "SELECT pg_backend_pid()").await;
    // A fast restart: every server connection of the pool dies while idle.
    pg.ctl_stop();
    pg.ctl_start();
    let after = scalar(&c, "SELECT pg_backend_pid()").await;
    assert_ne!(before, after, "a new server after the restart");
}

#[tokio::test]
async fn a_client_waits_through_a_restart() {
    let pg = TestPostgres::start(&[]);
    pg.create_app("fo2").await;
    let proxy = Proxy::start(&config(
        &pg,
        "fo2",
        "pool_size = 2\nserver_login_retry = \"20s\"",
        "fo2-pw",
    ))
    .await;
    let c = proxy.client("fo2").await;
    assert_eq!(scalar(&c, "SELECT 1").await, "1");
    pg.ctl_stop();
    let query = tokio::spawn(async move {
        let r = c.simple_query("SELECT 2").await;
        (r.map(|_| ()), Instant::now())
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !query.is_finished(),
        "the client waits while the database is down"
    );
    tokio::task::spawn_blocking({
        let (bin, dir) = (pg.bin.clone(), pg.dir.clone());
        move || TestPostgres { port: 0, dir, bin }.ctl_start()
    })
    .await
    .unwrap();
    let up = Instant::now();
    let (result, done) = tokio::time::timeout(Duration::from_secs(10), query)
        .await
        .unwrap()
        .unwrap();
    result.expect("the query runs once the database is back");
    assert!(
        done.duration_since(up) < Duration::from_secs(1),
        "served within 1 s of the database coming back: {:?}",
        done.duration_since(up)
    );
}

#[tokio::test]
async fn login_errors_are_not_retried() {
    let pg = TestPostgres::start(&[]);
    pg.create_app("fo3").await;
    let proxy = Proxy::start(&config(&pg, "fo3", "", "wrong-password")).await;
    let started = Instant::now();
    let e = try_connect(&proxy.conn("fo3", "fo3-pw", "fo3"))
        .await
        .err()
        .expect("the upstream login fails");
    assert_eq!(code(&e), "28P01", "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "no retry of a wrong password"
    );
}
