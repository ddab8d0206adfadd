//! The database restarts or fails over under pgsluice: clients between transactions see
//! nothing, clients that need a new server wait through the restart, login errors come at
//! once; `pg_ctl restart -m fast` under load cuts only open transactions (57P01/08006) and
//! leaks nothing; the failover rules (docs/operations.md#failover): read-only servers in a
//! pool for writes, server_check_query on idle servers.

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
        .expect_err("the upstream login fails");
    assert_eq!(code(&e), "28P01", "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "no retry of a wrong password"
    );
}

fn retired(proxy: &Proxy, db: &str, why: pgsluice::pool::Retire) -> u64 {
    proxy
        .shared
        .pools
        .stats()
        .iter()
        .filter(|p| p.database == db)
        .map(|p| p.retired[why as usize])
        .sum()
}

/// A pool for writes (the default) closes a server that answered 25006 when its transaction
/// ends; a pool with target_session_attrs = "any" keeps it.
#[tokio::test]
async fn a_server_answering_read_only_is_retired_in_a_pool_for_writes() {
    use pgsluice::pool::Retire;
    let pg = pg();
    for (name, attrs, retires) in [
        ("ro1", "", true),
        ("ro2", "target_session_attrs = \"any\"\n", false),
    ] {
        pg.create_app(name).await;
        let toml = app_config(pg, name, "pool_size = 1").replace(
            &format!("[databases.{name}]\n"),
            &format!("[databases.{name}]\n{attrs}"),
        );
        let proxy = Proxy::start(&toml).await;
        let c = proxy.client(name).await;
        let before = scalar(&c, "SELECT pg_backend_pid()").await;
        let e = c
            .simple_query("BEGIN READ ONLY; CREATE TABLE t (x int)")
            .await
            .unwrap_err();
        assert_eq!(code(&e), "25006", "{e}");
        c.simple_query("ROLLBACK").await.unwrap();
        let after = scalar(&c, "SELECT pg_backend_pid()").await;
        assert_eq!(before != after, retires, "{name}: retired = {retires}");
        assert_eq!(retired(&proxy, name, Retire::ReadOnly), u64::from(retires));
        assert!(
            server_conns(&pg.admin().await, name).await <= 1,
            "{name}: no leak"
        );
    }
}

/// A new server that reports itself read-only is not used by a pool for writes: the client
/// waits (as for a restart) until a writable server can be had, or gets 08006 after
/// server_login_retry. With target_session_attrs = "any" it is used at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_for_writes_waits_for_a_writable_server() {
    let pg = pg();
    pg.create_app("ro3").await;
    let top = "pool_size = 2\nadmin_users = \"ro3\"";
    let patient = Proxy::start(&app_config(
        pg,
        "ro3",
        &format!("{top}\nserver_login_retry = \"30s\""),
    ))
    .await;
    let hasty = Proxy::start(&app_config(
        pg,
        "ro3",
        &format!("{top}\nserver_login_retry = \"1s\""),
    ))
    .await;
    let any = Proxy::start(&app_config(pg, "ro3", top).replace(
        "[databases.ro3]\n",
        "[databases.ro3]\ntarget_session_attrs = \"any\"\n",
    ))
    .await;
    // Logged in (the pools know their parameters) before the database turns read-only.
    let c = patient.client("ro3").await;
    let h = hasty.client("ro3").await;
    let y = any.client("ro3").await;
    let admin = pg.admin().await;
    admin
        .batch_execute("ALTER DATABASE ro3 SET default_transaction_read_only = on")
        .await
        .unwrap();
    for p in [&patient, &hasty, &any] {
        p.shared.pools.reconnect(None);
    }

    assert_eq!(
        scalar(&y, "SHOW transaction_read_only").await,
        "on",
        "any: used at once"
    );
    let e = h.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(code(&e), "08006", "{e}");
    assert!(message(&e).contains("read-only"), "{}", message(&e));

    let waiting = tokio::spawn(async move {
        let r = c.simple_query("SHOW transaction_read_only").await;
        (r, c)
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !waiting.is_finished(),
        "the client waits for a writable server"
    );
    admin
        .batch_execute("ALTER DATABASE ro3 RESET default_transaction_read_only")
        .await
        .unwrap();
    let (r, c) = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap()
        .unwrap();
    r.expect("served once a writable server can be had");
    assert_eq!(scalar(&c, "SHOW transaction_read_only").await, "off");
}

/// A pool of one server for app `name` whose `server_check_query` is `select check_ok()`, a
/// function that fails once the returned owner connection empties table `ok`.
async fn check_ok_app(name: &str, delay: &str) -> (Proxy, tokio_postgres::Client) {
    let pg = pg();
    pg.create_app(name).await;
    let owner = connect(&format!(
        "host=127.0.0.1 port={} user={name} password={name}-pw dbname={name}",
        pg.port
    ))
    .await;
    owner
        .batch_execute(
            "CREATE TABLE ok (x int); INSERT INTO ok VALUES (1);
             CREATE FUNCTION check_ok() RETURNS int LANGUAGE sql AS 'SELECT 1 / (SELECT count(*)::int FROM ok)'",
        )
        .await
        .unwrap();
    let top = format!(
        "pool_size = 1\nserver_check_delay = \"{delay}\"\nserver_check_query = \"select check_ok()\""
    );
    (Proxy::start(&app_config(pg, name, &top)).await, owner)
}

/// server_check_query runs on a server idle longer than server_check_delay; one that fails
/// is closed and the client gets another server without seeing an error.
#[tokio::test]
async fn idle_servers_failing_the_health_check_are_replaced() {
    use pgsluice::pool::Retire;
    let pg = pg();
    let (proxy, owner) = check_ok_app("hc1", "0s").await;
    let c = proxy.client("hc1").await;
    let first = scalar(&c, "SELECT pg_backend_pid()").await;
    assert_eq!(
        scalar(&c, "SELECT pg_backend_pid()").await,
        first,
        "the check passed"
    );
    owner.batch_execute("DELETE FROM ok").await.unwrap();
    let second = scalar(&c, "SELECT pg_backend_pid()").await;
    assert_ne!(
        second, first,
        "the server that failed its check was replaced"
    );
    assert_eq!(retired(&proxy, "hc1", Retire::CheckFailed), 1);
    drop(owner);
    let admin = pg.admin().await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            server_conns(&admin, "hc1").await == 1
        })
        .await,
        "the failed server's backend is gone"
    );
}

/// A queued client handed a server that fails its check keeps its turn: it opens a new
/// server in that slot instead of going back behind the clients queued after it.
#[tokio::test]
async fn a_client_handed_a_failing_server_keeps_its_turn() {
    use pgsluice::pool::Retire;
    let pg = pg();
    pg.create_app("hc4").await;
    // The check fails on a server whose session set hc.fail (a session setting survives
    // the transaction that set it).
    let top = "pool_size = 1\nserver_check_delay = \"0s\"\n\
               server_check_query = \"select 1 / (current_setting('hc.fail', true) is distinct from 'yes')::int\"";
    let proxy = Proxy::start(&app_config(pg, "hc4", top)).await;
    let a = proxy.client("hc4").await;
    a.batch_execute("BEGIN; SELECT set_config('hc.fail', 'yes', false)")
        .await
        .unwrap();
    let at = "SELECT extract(epoch FROM clock_timestamp())";
    let b = proxy.client("hc4").await;
    let b_task = tokio::spawn(async move { scalar(&b, at).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = proxy.client("hc4").await;
    let c_task = tokio::spawn(async move { scalar(&c, at).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!b_task.is_finished() && !c_task.is_finished(), "both queue");
    a.batch_execute("COMMIT").await.unwrap(); // the server goes to B, fails its check
    let b_at: f64 = b_task.await.unwrap().parse().unwrap();
    let c_at: f64 = c_task.await.unwrap().parse().unwrap();
    assert!(b_at < c_at, "B (queued first) ran at {b_at}, C at {c_at}");
    assert_eq!(retired(&proxy, "hc4", Retire::CheckFailed), 1);
}

/// With a delay of half a second or more the janitor marks idle servers due for their
/// check, and a checkout that finds one takes the checking path.
#[tokio::test]
async fn a_server_idle_past_a_longer_delay_is_checked() {
    use pgsluice::pool::Retire;
    let (proxy, owner) = check_ok_app("hc3", "1s").await;
    let c = proxy.client("hc3").await;
    let first = scalar(&c, "SELECT pg_backend_pid()").await;
    owner.batch_execute("DELETE FROM ok").await.unwrap();
    // Used again at once: not due, not checked.
    assert_eq!(scalar(&c, "SELECT pg_backend_pid()").await, first);
    // Idle past the delay (and a janitor round): checked, fails, replaced.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let second = scalar(&c, "SELECT pg_backend_pid()").await;
    assert_ne!(
        second, first,
        "the server that failed its check was replaced"
    );
    assert_eq!(retired(&proxy, "hc3", Retire::CheckFailed), 1);
}

/// A check that gets no answer (the connection leads nowhere) is cut at
/// server_connect_timeout; the client waits for a new server instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_check_that_hangs_is_cut() {
    use pgsluice::pool::Retire;
    let pg = pg();
    pg.create_app("hc2").await;
    let fault = Fault::start(("127.0.0.1", pg.port)).await;
    let proxy = Proxy::start(&app_config_at(
        fault.port(),
        "hc2",
        "pool_size = 1\nserver_check_delay = \"0s\"\nserver_connect_timeout = \"1s\"\nserver_login_retry = \"30s\"",
    ))
    .await;
    let c = proxy.client("hc2").await;
    let first = scalar(&c, "SELECT pg_backend_pid()").await;
    fault.stall();
    let began = Instant::now();
    let q = tokio::spawn(async move {
        let r = c.simple_query("SELECT pg_backend_pid()").await.map(|_| ());
        (r, Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!q.is_finished(), "waits while nothing answers");
    fault.pass();
    let (r, done) = tokio::time::timeout(Duration::from_secs(10), q)
        .await
        .unwrap()
        .unwrap();
    r.expect("served once the network answers");
    assert!(done.duration_since(began) >= Duration::from_secs(1));
    assert_eq!(retired(&proxy, "hc2", Retire::CheckFailed), 1);
    let admin = pg.admin().await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            server_conns(&admin, "hc2").await == 1
        })
        .await,
        "the stalled server's backend is gone, the new one stays (first was {first})"
    );
}

/// `pg_ctl restart -m fast` under load: clients inside a transaction get 57P01 (the
/// server's) or 08006 (pgsluice's) and can reconnect; clients between transactions, even
/// ones that start a query while the database is down, see no error; every transaction is
/// whole; no server connection is leaked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_restart_under_load() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let name = "fo_restart";
    let pg = TestPostgres::start(&[]);
    pg.create_app(name).await;
    let pw = format!("{name}-pw");
    let proxy = Proxy::start(&config(
        &pg,
        name,
        "pool_size = 8\nserver_login_retry = \"30s\"",
        &pw,
    ))
    .await;
    let leaks = Leaks::with(&proxy, &[name], pg.port, name, name, &pw).await;
    let conn = proxy.conn(name, &pw, name);
    connect(&conn)
        .await
        .batch_execute("CREATE TABLE t (v int)")
        .await
        .unwrap();

    // 12 clients in transaction after transaction, each open for ~50 ms.
    let stop = Arc::new(AtomicBool::new(false));
    let restarted = Arc::new(AtomicBool::new(false));
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..12u32 {
        let (conn, stop, restarted, errors) = (
            conn.clone(),
            stop.clone(),
            restarted.clone(),
            errors.clone(),
        );
        writers.push(tokio::spawn(async move {
            let mut c = connect(&conn).await;
            let mut after = 0u32;
            for n in 0..100_000u32 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let v = w * 1_000_000 + n;
                let txn = async {
                    c.batch_execute(&format!("BEGIN; INSERT INTO t VALUES ({v})"))
                        .await?;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    c.batch_execute(&format!("INSERT INTO t VALUES ({v}); COMMIT"))
                        .await
                };
                let was_restarted = restarted.load(Ordering::Relaxed);
                match txn.await {
                    Ok(()) if was_restarted => after += 1,
                    Ok(()) => {}
                    Err(e) => {
                        // A FATAL that arrives while the client sits idle in its transaction
                        // ends tokio-postgres's connection: its next call says "closed".
                        let what = match e.as_db_error() {
                            Some(d) => d.code().code().to_owned(),
                            None if c.is_closed() => "closed".to_owned(),
                            None => e.to_string(),
                        };
                        errors.lock().unwrap().push(what);
                        // The client reconnects, as an application's pool does.
                        if c.is_closed() {
                            c = connect(&conn).await;
                        } else {
                            let _ = c.batch_execute("ROLLBACK").await;
                        }
                    }
                }
            }
            after
        }));
    }
    // 12 clients between transactions.
    let mut idle = Vec::new();
    for _ in 0..12 {
        let c = connect(&conn).await;
        assert_eq!(scalar(&c, "SELECT 1").await, "1");
        idle.push(c);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let h = pg.handle();
    let restart = tokio::task::spawn_blocking(move || {
        let out = pgsluice::demo::postgres::pg_command(&h.bin, "pg_ctl")
            .arg("-D")
            .arg(h.dir.join("data"))
            .arg("-l")
            .arg(h.dir.join("log"))
            .args(["-m", "fast", "-w", "-t", "60", "restart"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    });
    // The idle clients start a query as soon as the database is seen down (or, if the
    // restart is quicker than the polling, once it is over): they wait, then succeed.
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], pg.port));
    for _ in 0..2000 {
        if restart.is_finished() || tokio::net::TcpStream::connect(addr).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut queries = Vec::new();
    for c in idle {
        queries.push(tokio::spawn(async move {
            let r = c.simple_query("SELECT 2").await.map(|_| ());
            (r, c)
        }));
    }
    restart.await.unwrap();
    restarted.store(true, Ordering::Relaxed);
    let mut idle = Vec::new();
    for q in queries {
        let (r, c) = tokio::time::timeout(Duration::from_secs(30), q)
            .await
            .unwrap()
            .unwrap();
        r.unwrap_or_else(|e| panic!("a client between transactions saw {e}"));
        idle.push(c);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let after = w.await.unwrap();
        assert!(after > 0, "every writer committed again after the restart");
    }

    let errors = errors.lock().unwrap().clone();
    assert!(!errors.is_empty(), "the restart hit open transactions");
    assert!(
        errors
            .iter()
            .all(|c| c == "57P01" || c == "08006" || c == "closed"),
        "transactions cut by the restart get 57P01 or 08006: {errors:?}"
    );
    let c = connect(&conn).await;
    assert_eq!(
        scalar(
            &c,
            "SELECT count(*) FROM (SELECT v FROM t GROUP BY v HAVING count(*) <> 2) torn"
        )
        .await,
        "0",
        "every transaction is whole"
    );
    drop((c, idle));
    leaks.check_with(&pg.admin().await).await;
}
