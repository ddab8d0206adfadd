//! Parking: a logged-in client that sits idle gives up its task and keeps only its session
//! (docs/architecture.md, "Parked clients"). It parks after a second idle (the registry's
//! sweep), or straight after a transaction that followed its login or a long idle stretch.
//! A parked client must come back exactly as it was: its session state, its named
//! statements, a request half-sent, a hang-up, a drain.

mod common;
use std::time::Duration;

use common::leaks::metrics;
use common::wire::{self, Wire};
use common::*;

fn parked(p: &Proxy) -> u32 {
    p.shared.clients.parked_count()
}

async fn parked_reaches(p: &Proxy, n: u32) -> bool {
    eventually(Duration::from_secs(6), || async move { parked(p) == n }).await
}

const TOP: &str = "pool_mode = \"transaction\"\npool_size = 4";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_park_and_come_back_as_they_were() {
    let proxy = app("park_back", &format!("admin_users = \"park_back\"\n{TOP}")).await;
    let leaks = Leaks::new(&proxy, "park_back").await;
    let mut clients = Vec::new();
    let mut statements = Vec::new();
    for i in 0..30 {
        let c = proxy.client("park_back").await;
        c.batch_execute(&format!("SET application_name = 'worker-{i}'"))
            .await
            .unwrap();
        // A named statement, kept by the client's session across parking.
        let s = c.prepare("SELECT $1::int + 1").await.unwrap();
        clients.push(c);
        statements.push(s);
    }
    // Idle for a second, each is asked to park.
    assert!(
        parked_reaches(&proxy, 30).await,
        "parked: {}",
        parked(&proxy)
    );
    let m = metrics(&proxy).await;
    assert_eq!(m.sum("pgsluice_clients_parked", &[]), 30.0);
    assert_eq!(
        m.sum("pgsluice_client_connections", &[("state", "idle")]),
        30.0,
        "a parked client is an idle client"
    );
    // SHOW CLIENTS still lists them.
    let admin = connect(&proxy.conn("park_back", "park_back-pw", "pgsluice")).await;
    let rows = admin.simple_query("SHOW CLIENTS").await.unwrap();
    let listed = rows
        .iter()
        .filter(|r| matches!(r, tokio_postgres::SimpleQueryMessage::Row(_)))
        .count();
    assert!(listed >= 30, "SHOW CLIENTS lists {listed}");
    // The console's client is not a pool's: it never parks.
    assert_eq!(parked(&proxy), 30);
    drop(admin);

    for (i, (c, s)) in clients.iter().zip(&statements).enumerate() {
        let row = c.query_one(s, &[&(i as i32)]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), i as i32 + 1);
        assert_eq!(
            scalar(c, "SHOW application_name").await,
            format!("worker-{i}"),
            "the session's parameters survive parking"
        );
    }
    assert!(
        parked_reaches(&proxy, 30).await,
        "parked again: {}",
        parked(&proxy)
    );
    drop(clients);
    assert!(
        parked_reaches(&proxy, 0).await,
        "clients that left are not parked"
    );
    leaks.check().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_client_keeps_its_task() {
    let proxy = app("park_busy", TOP).await;
    let c = proxy.client("park_busy").await;
    // Logged in, nothing asked yet: parked.
    assert!(parked_reaches(&proxy, 1).await);
    // Its first transaction brings it back; it parks again straight after.
    assert_eq!(scalar(&c, "SELECT 1").await, "1");
    assert!(
        parked_reaches(&proxy, 1).await,
        "parks after its first transaction"
    );
    // The next requests follow quickly: it keeps its task between them.
    assert_eq!(scalar(&c, "SELECT 2").await, "2");
    for i in 3..10 {
        assert_eq!(scalar(&c, &format!("SELECT {i}")).await, i.to_string());
        assert_eq!(
            parked(&proxy),
            0,
            "a client between quick statements keeps its task"
        );
    }
    // Idle now: the sweep parks it within a second or two.
    assert!(parked_reaches(&proxy, 1).await, "idle, it parks");
    assert_eq!(scalar(&c, "SELECT 10").await, "10");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_half_sent_waits_in_a_parked_client() {
    let proxy = app("park_half", TOP).await;
    let leaks = Leaks::new(&proxy, "park_half").await;
    let port = proxy.addr.port();
    let mut w = Wire::connect_password(port, "park_half", "park_half", "park_half-pw").await;
    assert!(parked_reaches(&proxy, 1).await);
    let q = wire::query("SELECT 'whole' AS v");
    let (head, tail) = q.split_at(7);
    w.send(&[head.to_vec()]).await;
    // The bytes bring it back; idle a second, with a request half here, it parks again.
    assert!(parked_reaches(&proxy, 0).await, "back when bytes arrive");
    assert!(
        parked_reaches(&proxy, 1).await,
        "parks again with the half request kept"
    );
    let (tags, msgs) = w.round(&[tail.to_vec()]).await;
    assert_eq!(tags, "TDCZ", "{msgs:?}");
    assert_eq!(msgs[1].row(), vec![Some("whole".to_string())]);
    drop(w);
    leaks.check().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_client_that_hangs_up_is_gone() {
    let proxy = app("park_gone", TOP).await;
    let leaks = Leaks::new(&proxy, "park_gone").await;
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(proxy.client("park_gone").await);
    }
    for c in &clients {
        assert_eq!(scalar(c, "SELECT 1").await, "1");
    }
    // Five more that close their socket without a Terminate.
    let port = proxy.addr.port();
    let mut raw = Vec::new();
    for _ in 0..5 {
        let mut w = Wire::connect_password(port, "park_gone", "park_gone", "park_gone-pw").await;
        let (tags, _) = w.round(&[wire::query("SELECT 1")]).await;
        assert_eq!(tags, "TDCZ");
        raw.push(w);
    }
    assert!(parked_reaches(&proxy, 15).await);
    // tokio-postgres sends Terminate, then closes.
    drop(clients);
    drop(raw);
    assert!(
        eventually(Duration::from_secs(5), || async {
            proxy.shared.clients.is_empty() && parked(&proxy) == 0
        })
        .await,
        "parked clients that hung up are removed"
    );
    leaks.check().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_closes_parked_clients_at_once() {
    let proxy = app("park_drain", TOP).await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(proxy.client("park_drain").await);
    }
    for c in &clients {
        assert_eq!(scalar(c, "SELECT 1").await, "1");
    }
    assert!(parked_reaches(&proxy, 5).await);
    let began = std::time::Instant::now();
    tokio::time::timeout(
        Duration::from_secs(5),
        pgsluice::shutdown::drain(&proxy.shared),
    )
    .await
    .expect("drained within 5 s: parked clients were woken");
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "{:?}",
        began.elapsed()
    );
    for c in &clients {
        let e = c.simple_query("SELECT 1").await.unwrap_err();
        assert!(
            e.as_db_error().is_none_or(|d| d.code().code() == "57P01"),
            "{e}"
        );
    }
    assert_eq!(parked(&proxy), 0);
}
