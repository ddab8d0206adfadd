//! Transaction and session pooling against a real PostgreSQL, with tokio-postgres clients.

mod common;
use std::time::Duration;

use common::*;
use tokio_postgres::types::Type;

/// 20 clients share 3 servers; every transaction commits, the data is exact, and the proxy
/// never holds more than 3 server connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_few_servers_all_commit() {
    let proxy = app("many", "pool_size = 3").await;
    let setup = proxy.client("many").await;
    setup.batch_execute("CREATE TABLE ledger (client int, n int, PRIMARY KEY (client, n)); CREATE TABLE total (v bigint); INSERT INTO total VALUES (0)").await.unwrap();
    let admin = pg().admin().await;
    let watcher = tokio::spawn(async move {
        let mut max = 0;
        for _ in 0..200 {
            max = max.max(server_conns(&admin, "many").await);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        max
    });
    let mut tasks = Vec::new();
    for client in 0..20 {
        let c = proxy.client("many").await;
        tasks.push(tokio::spawn(async move {
            for n in 0..25 {
                let sql = format!(
                    "BEGIN; INSERT INTO ledger VALUES ({client}, {n}); UPDATE total SET v = v + {}; COMMIT;",
                    client * 100 + n
                );
                c.batch_execute(&sql).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let max = watcher.await.unwrap();
    assert_eq!(scalar(&setup, "SELECT count(*) FROM ledger").await, "500");
    let expected: i64 = (0..20)
        .flat_map(|c| (0..25).map(move |n| c * 100 + n))
        .sum();
    assert_eq!(
        scalar(&setup, "SELECT v FROM total").await,
        expected.to_string()
    );
    assert!(
        max <= 3,
        "the proxy held {max} server connections with pool_size = 3"
    );
    assert!(max >= 1);
}

/// An error inside a transaction fails it until ROLLBACK, and the server goes back clean.
#[tokio::test]
async fn error_inside_transaction() {
    let proxy = app("errtx", "pool_size = 1").await;
    let a = proxy.client("errtx").await;
    let b = proxy.client("errtx").await;
    a.batch_execute("CREATE TABLE t (v int)").await.unwrap();
    a.batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let e = a.batch_execute("SELECT 1/0").await.unwrap_err();
    assert_eq!(code(&e), "22012");
    let e = a.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(code(&e), "25P02", "the transaction is failed until it ends");
    a.batch_execute("ROLLBACK").await.unwrap();
    // The only server now serves b, outside any transaction, and the insert is gone.
    assert_eq!(scalar(&b, "SELECT count(*) FROM t").await, "0");
    assert_eq!(
        scalar(&b, "SELECT pg_catalog.txid_current_if_assigned() IS NULL").await,
        "t"
    );
    // Extended protocol: an error skips to Sync; the next statement runs.
    let e = a
        .query_typed("SELECT 1/$1::int", &[(&0i32, Type::INT4)])
        .await
        .unwrap_err();
    assert_eq!(code(&e), "22012");
    assert_eq!(
        a.query_typed("SELECT 2", &[]).await.unwrap()[0].get::<_, i32>(0),
        2
    );
}

/// A large result streams through whole.
#[tokio::test]
async fn hundred_thousand_rows() {
    let proxy = app("bigresult", "pool_size = 2").await;
    let c = proxy.client("bigresult").await;
    let rows = c
        .query_typed(
            "SELECT g, repeat('x', 100) FROM generate_series(1, 100000) g",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 100_000);
    assert_eq!(rows[99_999].get::<_, i32>(0), 100_000);
    let msgs = c
        .simple_query("SELECT g FROM generate_series(1, 100000) g")
        .await
        .unwrap();
    let n = msgs
        .iter()
        .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        .count();
    assert_eq!(n, 100_000);
}

/// Each client keeps its own TimeZone, application_name and SET parameters, even when
/// they take turns on one server.
#[tokio::test]
async fn per_client_parameters_do_not_leak() {
    let pg = pg();
    pg.create_app("params").await;
    let proxy = Proxy::start(&app_config(pg, "params", "pool_size = 1")).await;
    let base = proxy.conn("params", "params-pw", "params");
    let a = connect(&format!(
        "{base} application_name=alpha options='-c TimeZone=Asia/Tokyo'"
    ))
    .await;
    let b = connect(&format!(
        "{base} application_name=beta options='-c TimeZone=America/New_York'"
    ))
    .await;
    let c = connect(&base).await;
    // The same login parameters as `a`: the proxy shares one set between them, and a SET
    // by one must not reach the other.
    let a2 = connect(&format!(
        "{base} application_name=alpha options='-c TimeZone=Asia/Tokyo'"
    ))
    .await;
    let default_tz = scalar(&c, "SHOW TimeZone").await;
    a.batch_execute("SET statement_timeout = '7s'")
        .await
        .unwrap();
    b.batch_execute("SET search_path = 'beta_schema', public")
        .await
        .unwrap();
    for _ in 0..10 {
        assert_eq!(scalar(&a, "SHOW TimeZone").await, "Asia/Tokyo");
        assert_eq!(scalar(&b, "SHOW TimeZone").await, "America/New_York");
        assert_eq!(scalar(&c, "SHOW TimeZone").await, default_tz);
        assert_eq!(
            scalar(&a, "SELECT current_setting('application_name')").await,
            "alpha"
        );
        assert_eq!(
            scalar(&b, "SELECT current_setting('application_name')").await,
            "beta"
        );
        assert_eq!(scalar(&a, "SHOW statement_timeout").await, "7s");
        assert_eq!(scalar(&b, "SHOW statement_timeout").await, "0");
        assert_eq!(scalar(&b, "SHOW search_path").await, "beta_schema, public");
        assert_eq!(scalar(&c, "SHOW search_path").await, "\"$user\", public");
    }
    // A SET rolled back does not stick; RESET returns to the client's own startup value.
    a.batch_execute("BEGIN; SET TimeZone = 'UTC'; ROLLBACK")
        .await
        .unwrap();
    assert_eq!(scalar(&a, "SHOW TimeZone").await, "Asia/Tokyo");
    a.batch_execute("SET TimeZone = 'UTC'").await.unwrap();
    assert_eq!(scalar(&b, "SHOW TimeZone").await, "America/New_York");
    assert_eq!(scalar(&a, "SHOW TimeZone").await, "UTC");
    for _ in 0..3 {
        assert_eq!(scalar(&a2, "SHOW TimeZone").await, "Asia/Tokyo");
        assert_eq!(scalar(&a2, "SHOW statement_timeout").await, "0");
        assert_eq!(scalar(&a, "SHOW TimeZone").await, "UTC");
    }
    a.batch_execute("RESET ALL").await.unwrap();
    assert_eq!(scalar(&a, "SHOW TimeZone").await, "Asia/Tokyo");
    assert_eq!(scalar(&a, "SHOW statement_timeout").await, "0");
    a2.batch_execute("SET TimeZone = 'Europe/Paris'")
        .await
        .unwrap();
    assert_eq!(scalar(&a, "SHOW TimeZone").await, "Asia/Tokyo");
    assert_eq!(scalar(&a2, "SHOW TimeZone").await, "Europe/Paris");

    // RESET name: back to the client's own startup value, as on a server of its own (the
    // server's RESET goes to the server's default).
    a.batch_execute("SET TimeZone = 'UTC'").await.unwrap();
    a.batch_execute("RESET TimeZone").await.unwrap();
    assert_eq!(scalar(&a, "SHOW TimeZone").await, "Asia/Tokyo");
    a.batch_execute("SET application_name = 'other'")
        .await
        .unwrap();
    a.batch_execute("RESET application_name").await.unwrap();
    assert_eq!(
        scalar(&a, "SELECT current_setting('application_name')").await,
        "alpha"
    );
    // A RESET rolled back does not stick; one followed by a SET keeps the SET.
    a.batch_execute("SET TimeZone = 'UTC'").await.unwrap();
    a.batch_execute("BEGIN; RESET TimeZone; ROLLBACK")
        .await
        .unwrap();
    assert_eq!(scalar(&a, "SHOW TimeZone").await, "UTC");
    a.batch_execute("RESET TimeZone; SET TimeZone = 'Europe/Oslo'")
        .await
        .unwrap();
    assert_eq!(scalar(&a, "SHOW TimeZone").await, "Europe/Oslo");
    assert_eq!(scalar(&b, "SHOW TimeZone").await, "America/New_York");
    assert_eq!(scalar(&c, "SHOW TimeZone").await, default_tz);
}

/// Session state that slips past a plain reading of the SQL stays with its client: a role
/// kept by RESET ALL (PostgreSQL leaves `role` alone there), a parameter whose name holds a
/// reserved word, one set through a quoted function name or while
/// `standard_conforming_strings` is off, and one whose name is written with escapes (that
/// server is closed instead). One server, clients taking turns on it.
#[tokio::test]
async fn session_state_hidden_in_the_sql_does_not_leak() {
    let pg = pg();
    pg.create_app("hidden").await;
    let admin = pg.admin().await;
    let _ = admin
        .batch_execute("CREATE ROLE hidden_r2; GRANT hidden_r2 TO hidden")
        .await;
    let proxy = Proxy::start(&app_config(pg, "hidden", "pool_size = 1")).await;
    let base = proxy.conn("hidden", "hidden-pw", "hidden");
    let a = connect(&base).await;
    let b = connect(&base).await;
    let search_path = scalar(&b, "SHOW search_path").await;

    a.batch_execute("SET ROLE hidden_r2").await.unwrap();
    a.batch_execute("RESET ALL").await.unwrap();
    assert_eq!(scalar(&a, "SELECT current_user").await, "hidden_r2");
    assert_eq!(
        scalar(&b, "SELECT current_user").await,
        "hidden",
        "role leaked"
    );
    assert_eq!(scalar(&a, "SELECT current_user").await, "hidden_r2");
    a.batch_execute("RESET ROLE").await.unwrap();

    // `RESET "app"."user"`: a bare `RESET app.user` is a syntax error.
    a.batch_execute("SELECT set_config('app.user', '7', false)")
        .await
        .unwrap();
    assert_eq!(scalar(&b, "SELECT 1").await, "1");
    assert_eq!(
        scalar(&b, "SELECT coalesce(current_setting('app.user', true), '')").await,
        ""
    );
    assert_eq!(scalar(&a, "SELECT current_setting('app.user')").await, "7");

    for hidden in [
        "SELECT \"set_config\"('search_path', 'evil', false)",
        "--x\rSET search_path TO evil",
        "SET U&\"search\\005fpath\" = evil",
    ] {
        a.batch_execute(hidden).await.unwrap();
        assert_eq!(
            scalar(&b, "SHOW search_path").await,
            search_path,
            "{hidden:?}"
        );
        a.batch_execute("RESET search_path").await.unwrap();
    }

    // standard_conforming_strings off: `'\''` is a quote, and the SET is a statement.
    a.batch_execute("SET standard_conforming_strings = off")
        .await
        .unwrap();
    a.batch_execute("SELECT '\\'' ; SET search_path = evil; -- '")
        .await
        .unwrap();
    assert_eq!(scalar(&b, "SHOW search_path").await, search_path);
    assert_eq!(scalar(&a, "SHOW search_path").await, "evil");
}

/// Statements whose effect would outlive the transaction are refused with 0A000 and a hint;
/// the connection stays usable and a refused statement fails the open transaction.
#[tokio::test]
async fn session_state_is_refused_in_transaction_mode() {
    let proxy = app("refuse", "pool_size = 1").await;
    let c = proxy.client("refuse").await;
    for sql in [
        "LISTEN jobs",
        "PREPARE p AS SELECT 1",
        "SELECT pg_advisory_lock(42)",
        "CREATE TEMP TABLE tmp (a int)",
        "BEGIN; DECLARE cur CURSOR WITH HOLD FOR SELECT 1; COMMIT",
    ] {
        let e = c.batch_execute(sql).await.unwrap_err();
        assert_eq!(code(&e), "0A000", "{sql}");
        assert!(
            message(&e).contains("not supported in transaction pooling mode"),
            "{sql}: {}",
            message(&e)
        );
        assert!(
            e.as_db_error().unwrap().hint().unwrap().contains("session"),
            "{sql}"
        );
        assert_eq!(scalar(&c, "SELECT 1").await, "1", "usable after {sql}");
    }
    c.batch_execute("CREATE TABLE kept (v int)").await.unwrap();
    c.batch_execute("BEGIN; INSERT INTO kept VALUES (1)")
        .await
        .unwrap();
    assert_eq!(
        code(&c.batch_execute("LISTEN x").await.unwrap_err()),
        "0A000"
    );
    // COMMIT of a failed transaction rolls back, as PostgreSQL does.
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(scalar(&c, "SELECT count(*) FROM kept").await, "0");
    // The transaction-scoped forms work.
    c.batch_execute("BEGIN; SELECT pg_advisory_xact_lock(42); CREATE TEMP TABLE t2 (a int) ON COMMIT DROP; COMMIT").await.unwrap();
    // A refused statement through the extended protocol: FATAL, the connection closes.
    let e = c.query_typed("LISTEN jobs", &[]).await.unwrap_err();
    assert_eq!(code(&e), "0A000");
    assert!(c.is_closed() || c.simple_query("SELECT 1").await.is_err());
    // Nothing leaked on the server.
    let d = proxy.client("refuse").await;
    assert_eq!(
        scalar(&d, "SELECT count(*) FROM pg_listening_channels()").await,
        "0"
    );
    assert_eq!(
        scalar(&d, "SELECT count(*) FROM pg_prepared_statements").await,
        "0"
    );
    assert_eq!(
        scalar(
            &d,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
        )
        .await,
        "0"
    );
}

/// Session mode: the server is the client's until it leaves, then reset before reuse.
#[tokio::test]
async fn session_mode_resets_the_server() {
    let proxy = app("sess", "pool_size = 1\npool_mode = \"session\"").await;
    let a = proxy.client("sess").await;
    a.batch_execute("SET statement_timeout = '1234ms'; CREATE TEMP TABLE mine (v int); LISTEN chan; PREPARE p AS SELECT 7").await.unwrap();
    let pid_a = scalar(&a, "SELECT pg_backend_pid()").await;
    assert_eq!(scalar(&a, "EXECUTE p").await, "7");
    // Named statements work in session mode.
    let st = a.prepare("SELECT $1::int * 2").await.unwrap();
    assert_eq!(
        a.query_one(&st, &[&21i32]).await.unwrap().get::<_, i32>(0),
        42
    );
    drop(a);
    let b = proxy.client("sess").await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            scalar(&b, "SELECT pg_backend_pid()").await == pid_a
        })
        .await,
        "the same server is reused"
    );
    assert_eq!(scalar(&b, "SHOW statement_timeout").await, "0");
    assert_eq!(
        scalar(&b, "SELECT count(*) FROM pg_listening_channels()").await,
        "0"
    );
    assert_eq!(
        scalar(&b, "SELECT count(*) FROM pg_prepared_statements").await,
        "0"
    );
    assert!(
        b.batch_execute("SELECT * FROM mine").await.is_err(),
        "the temp table is gone"
    );
}

/// The checkout timeout ends a wait with 53300 naming query_wait_timeout; the client stays
/// usable and gets a server once one is free.
#[tokio::test]
async fn checkout_timeout() {
    let proxy = app("waitto", "pool_size = 1\nquery_wait_timeout = \"1s\"").await;
    let holder = proxy.client("waitto").await;
    let waiter = proxy.client("waitto").await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let started = std::time::Instant::now();
    let e = waiter.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(code(&e), "53300");
    assert!(
        message(&e).contains("query_wait_timeout"),
        "{}",
        message(&e)
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
    // Extended protocol too.
    let e = waiter.query_typed("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(code(&e), "53300");
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(scalar(&waiter, "SELECT 5").await, "5");
}

/// Waiters are served in arrival order.
#[tokio::test]
async fn waiters_are_served_in_order() {
    let proxy = app("fifo", "pool_size = 1").await;
    let holder = proxy.client("fifo").await;
    holder
        .batch_execute("CREATE TABLE arrivals (seq serial, who int)")
        .await
        .unwrap();
    holder.batch_execute("BEGIN").await.unwrap();
    let mut tasks = Vec::new();
    for who in 0..5 {
        let c = proxy.client("fifo").await;
        tasks.push(tokio::spawn(async move {
            c.batch_execute(&format!("INSERT INTO arrivals (who) VALUES ({who})"))
                .await
                .unwrap();
        }));
        // Give each waiter time to queue before the next.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    holder.batch_execute("COMMIT").await.unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    let order: Vec<String> = holder
        .simple_query("SELECT who FROM arrivals ORDER BY seq")
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect();
    assert_eq!(order, vec!["0", "1", "2", "3", "4"]);
}

/// A CancelRequest reaches the server running the client's query.
#[tokio::test]
async fn cancel_a_running_query() {
    let proxy = app("cancelq", "pool_size = 2").await;
    let c = proxy.client("cancelq").await;
    let token = c.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    });
    let started = std::time::Instant::now();
    let e = c.batch_execute("SELECT pg_sleep(30)").await.unwrap_err();
    assert_eq!(code(&e), "57014");
    assert!(started.elapsed() < Duration::from_secs(10));
    canceller.await.unwrap();
    assert_eq!(scalar(&c, "SELECT 1").await, "1");
}

/// A cancel for a client still queued takes it out of the queue with 57014.
#[tokio::test]
async fn cancel_while_queued() {
    let proxy = app("cancelw", "pool_size = 1").await;
    let holder = proxy.client("cancelw").await;
    holder.batch_execute("BEGIN").await.unwrap();
    let waiter = proxy.client("cancelw").await;
    let token = waiter.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    });
    let started = std::time::Instant::now();
    let e = waiter.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(code(&e), "57014");
    assert!(started.elapsed() < Duration::from_secs(5));
    canceller.await.unwrap();
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(scalar(&waiter, "SELECT 3").await, "3");
}

/// A client that disappears while holding a row lock releases it within seconds.
#[tokio::test]
async fn killed_client_releases_its_locks() {
    let proxy = app("vanish", "pool_size = 2").await;
    let setup = proxy.client("vanish").await;
    setup
        .batch_execute(
            "CREATE TABLE acct (id int PRIMARY KEY, v int); INSERT INTO acct VALUES (1, 0)",
        )
        .await
        .unwrap();
    // Idle in transaction: the proxy rolls back and reuses the server.
    {
        let (client, connection) = tokio_postgres::connect(
            &proxy.conn("vanish", "vanish-pw", "vanish"),
            tokio_postgres::NoTls,
        )
        .await
        .unwrap();
        let conn_task = tokio::spawn(connection);
        client
            .batch_execute("BEGIN; UPDATE acct SET v = 1 WHERE id = 1")
            .await
            .unwrap();
        conn_task.abort(); // the socket closes with the transaction open
    }
    let other = proxy.client("vanish").await;
    let started = std::time::Instant::now();
    tokio::time::timeout(
        Duration::from_secs(5),
        other.batch_execute("UPDATE acct SET v = 2 WHERE id = 1"),
    )
    .await
    .expect("the lock is released within seconds")
    .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        scalar(&other, "SELECT v FROM acct").await,
        "2",
        "the vanished client's update rolled back"
    );
    // Mid-query: the query is cancelled, the server closed.
    {
        let (client, connection) = tokio_postgres::connect(
            &proxy.conn("vanish", "vanish-pw", "vanish"),
            tokio_postgres::NoTls,
        )
        .await
        .unwrap();
        let conn_task = tokio::spawn(connection);
        client
            .batch_execute("BEGIN; UPDATE acct SET v = 3 WHERE id = 1")
            .await
            .unwrap();
        let q = tokio::spawn(async move { client.batch_execute("SELECT pg_sleep(60)").await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        conn_task.abort();
        q.abort();
    }
    let admin = pg().admin().await;
    let gone = eventually(Duration::from_secs(5), || async {
        scalar(&admin, "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(60)%' AND state = 'active'").await == "0"
    })
    .await;
    assert!(gone, "the vanished client's query was cancelled");
    tokio::time::timeout(
        Duration::from_secs(5),
        other.batch_execute("UPDATE acct SET v = 4 WHERE id = 1"),
    )
    .await
    .expect("the lock is released within seconds")
    .unwrap();
    assert_eq!(scalar(&other, "SELECT v FROM acct").await, "4");
}

/// Pipelined extended-protocol queries all run, in order, on one server.
#[tokio::test]
async fn pipelined_queries() {
    let proxy = app("pipe", "pool_size = 1").await;
    let c = proxy.client("pipe").await;
    let sqls: Vec<String> = (0..50).map(|i| format!("SELECT {i}::int")).collect();
    let futs: Vec<_> = sqls.iter().map(|s| c.query_typed(s, &[])).collect();
    let results = futures_join(futs).await;
    for (i, r) in results.into_iter().enumerate() {
        assert_eq!(r.unwrap()[0].get::<_, i32>(0), i as i32);
    }
}

async fn futures_join<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut out = Vec::new();
    // tokio-postgres sends each query when its future is first polled; polling them together
    // pipelines them on one connection.
    let mut pinned: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut done: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in pinned.iter_mut().enumerate() {
            if done[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => done[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    for d in done {
        out.push(d.expect("all done"));
    }
    out
}

/// min_pool_size opens servers before any client; server_idle_timeout closes the extra ones.
#[tokio::test]
async fn janitor_keeps_minimum_and_closes_idle() {
    let proxy = app(
        "janitor",
        "pool_size = 4\nmin_pool_size = 2\nserver_idle_timeout = \"1s\"",
    )
    .await;
    let admin = pg().admin().await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            server_conns(&admin, "janitor").await == 2
        })
        .await,
        "min_pool_size servers open with no client"
    );
    let clients: Vec<_> = futures_join((0..4).map(|_| proxy.client("janitor")).collect()).await;
    for c in &clients {
        c.batch_execute("BEGIN").await.unwrap();
    }
    assert_eq!(server_conns(&admin, "janitor").await, 4);
    for c in &clients {
        c.batch_execute("COMMIT").await.unwrap();
    }
    assert!(
        eventually(Duration::from_secs(5), || async {
            server_conns(&admin, "janitor").await == 2
        })
        .await,
        "idle servers above min_pool_size close after server_idle_timeout"
    );
}

/// server_lifetime retires old servers; a server that died while idle is never handed out.
#[tokio::test]
async fn old_and_dead_servers_are_replaced() {
    let proxy = app("lifetime", "pool_size = 1\nserver_lifetime = \"1s\"").await;
    let c = proxy.client("lifetime").await;
    let first = scalar(&c, "SELECT pg_backend_pid()").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second = scalar(&c, "SELECT pg_backend_pid()").await;
    assert_ne!(first, second, "a server past server_lifetime is replaced");
    // Kill the idle server behind the proxy's back: the next transaction gets a fresh one.
    let admin = pg().admin().await;
    admin
        .batch_execute(&format!("SELECT pg_terminate_backend({second})"))
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            server_conns(&admin, "lifetime").await == 0
        })
        .await
    );
    let third = scalar(&c, "SELECT pg_backend_pid()").await;
    assert_ne!(third, second);
}

/// server_lifetime at check-in: a server within its lifetime is reused; one that passes it
/// during a transaction is closed when the transaction ends, not handed out again.
#[tokio::test]
async fn a_server_past_its_lifetime_closes_at_the_end_of_its_transaction() {
    let proxy = app("lifeend", "pool_size = 1\nserver_lifetime = \"1s\"").await;
    let c = proxy.client("lifeend").await;
    let first = scalar(&c, "SELECT pg_backend_pid()").await;
    assert_eq!(
        scalar(&c, "SELECT pg_backend_pid()").await,
        first,
        "a server well within server_lifetime is reused"
    );
    c.batch_execute("BEGIN").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(scalar(&c, "SELECT pg_backend_pid()").await, first);
    c.batch_execute("COMMIT").await.unwrap();
    let admin = pg().admin().await;
    let next = scalar(&c, "SELECT pg_backend_pid()").await;
    assert_ne!(
        next, first,
        "the server past server_lifetime was not reused"
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            server_conns(&admin, "lifeend").await == 1
        })
        .await,
        "the old server is closed, not kept beside the new one"
    );
}

/// A server that dies mid-transaction: the client is told (08006) and the proxy goes on.
#[tokio::test]
async fn server_dies_mid_transaction() {
    let proxy = app("srvdie", "pool_size = 1").await;
    let c = proxy.client("srvdie").await;
    c.batch_execute("BEGIN").await.unwrap();
    let pid = scalar(&c, "SELECT pg_backend_pid()").await;
    let admin = pg().admin().await;
    admin
        .batch_execute(&format!("SELECT pg_terminate_backend({pid})"))
        .await
        .unwrap();
    let e = c.batch_execute("SELECT 1").await.unwrap_err();
    // The server's own FATAL (57P01) is relayed first; either it or ours ends the session.
    let code = e.as_db_error().map(|d| d.code().code().to_owned());
    assert!(
        matches!(code.as_deref(), Some("57P01") | Some("08006") | None),
        "{e}"
    );
    let d = proxy.client("srvdie").await;
    assert_eq!(scalar(&d, "SELECT 1").await, "1");
}

/// A client that hangs up while queued leaves the queue: its request never runs.
#[tokio::test]
async fn client_leaving_the_queue_runs_nothing() {
    let proxy = app("leaveq", "pool_size = 1").await;
    let holder = proxy.client("leaveq").await;
    holder
        .batch_execute("CREATE TABLE hits (v int)")
        .await
        .unwrap();
    holder.batch_execute("BEGIN").await.unwrap();
    {
        let (client, connection) = tokio_postgres::connect(
            &proxy.conn("leaveq", "leaveq-pw", "leaveq"),
            tokio_postgres::NoTls,
        )
        .await
        .unwrap();
        let conn_task = tokio::spawn(connection);
        let q =
            tokio::spawn(async move { client.batch_execute("INSERT INTO hits VALUES (1)").await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        conn_task.abort();
        q.abort();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    holder.batch_execute("COMMIT").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(scalar(&holder, "SELECT count(*) FROM hits").await, "0");
}

/// COPY FROM STDIN over the extended protocol, as tokio-postgres sends it: Bind, Execute,
/// Sync, then the data, CopyDone, Sync. PostgreSQL ignores the first Sync while it copies,
/// so one ReadyForQuery answers the two; the proxy must not wait for a second. With one
/// server, a second client gets it after each copy, and a copy the server rejects midway
/// (bad data) leaves the connection and the server usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_over_the_extended_protocol() {
    use futures_util::SinkExt;
    let proxy = app("copy_ext", "pool_size = 1").await;
    let c = proxy.client("copy_ext").await;
    let other = proxy.client("copy_ext").await;
    c.batch_execute("CREATE TABLE rows_in (n int, t text)")
        .await
        .unwrap();
    for round in 0..3 {
        let sink = c.copy_in("COPY rows_in FROM STDIN").await.unwrap();
        let mut sink = std::pin::pin!(sink);
        let data: String = (0..1000).map(|n| format!("{n}\tround {round}\n")).collect();
        sink.send(bytes::Bytes::from(data)).await.unwrap();
        assert_eq!(sink.finish().await.unwrap(), 1000);
        // The one server went back to the pool: the other client runs at once.
        let n = tokio::time::timeout(
            Duration::from_secs(5),
            other.query_one("SELECT count(*) FROM rows_in", &[]),
        )
        .await
        .expect("the server is back in the pool after the copy")
        .unwrap();
        assert_eq!(n.get::<_, i64>(0), 1000 * (round + 1));
    }
    // Rejected midway: the error reaches the client, and both connections go on.
    let sink = c.copy_in("COPY rows_in FROM STDIN").await.unwrap();
    let mut sink = std::pin::pin!(sink);
    let _ = sink
        .send(bytes::Bytes::from_static(b"1\tgood\nnot-a-number\tbad\n"))
        .await;
    let e = sink.finish().await.expect_err("bad data fails the copy");
    assert_eq!(
        e.as_db_error().map(|d| d.code().code()),
        Some("22P02"),
        "{e}"
    );
    assert_eq!(scalar(&c, "SELECT count(*) FROM rows_in").await, "3000");
    assert_eq!(scalar(&other, "SELECT 1").await, "1");
    c.batch_execute("DROP TABLE rows_in").await.unwrap();
}

/// The ParameterStatus messages of a raw login with `extra` startup parameters, by name.
async fn welcome(port: u16, name: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    use common::wire::*;
    use tokio::io::AsyncWriteExt;
    let mut s = raw_connect(port).await;
    let mut params = vec![("user", name), ("database", name)];
    params.extend_from_slice(extra);
    s.write_all(&startup_packet(&params)).await.unwrap();
    read_until_ready(&mut s)
        .await
        .into_iter()
        .filter(|m| m.tag == b'S')
        .map(|m| {
            let mut parts = m.body.split(|&b| b == 0);
            let mut next = || String::from_utf8(parts.next().unwrap().to_vec()).unwrap();
            (next(), next())
        })
        .collect()
}

/// A login is shown what the pool's server reported (encoded once per pool), with the
/// client's own value in place for a parameter it set, under the server's spelling.
#[tokio::test]
async fn the_welcome_shows_the_servers_parameters_with_the_clients_own() {
    let proxy = app("welcome", "auth_type = \"trust\"").await;
    let port = proxy.addr.port();
    let plain = welcome(port, "welcome", &[]).await;
    let own = welcome(
        port,
        "welcome",
        &[("application_name", "web"), ("DateStyle", "German")],
    )
    .await;
    let names = |w: &[(String, String)]| w.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    let value = |w: &[(String, String)], n: &str| {
        w.iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{n} not shown: {w:?}"))
    };
    // The same names in the same order, each once, for both.
    assert_eq!(names(&plain), names(&own));
    for n in [
        "server_version",
        "DateStyle",
        "TimeZone",
        "application_name",
        "client_encoding",
    ] {
        assert_eq!(
            names(&plain).iter().filter(|k| *k == n).count(),
            1,
            "{n}: {plain:?}"
        );
    }
    assert_eq!(value(&own, "application_name"), "web");
    assert_eq!(value(&own, "DateStyle"), "German");
    assert_ne!(value(&plain, "application_name"), "web");
    assert_ne!(value(&plain, "DateStyle"), "German");
    // Everything else is the server's, for both.
    for (n, v) in &plain {
        if n != "application_name" && n != "DateStyle" {
            assert_eq!(&value(&own, n), v, "{n}");
        }
    }
    let c = proxy.client("welcome").await;
    assert_eq!(
        value(&plain, "server_version"),
        scalar(&c, "SHOW server_version").await
    );
    // A login after them is shown the server's values again, not the last client's.
    assert_eq!(welcome(port, "welcome", &[]).await, plain);
}

/// Clients queued behind a busy pool get their own answers once a server frees. A queued
/// request of up to 1 KiB moves out of its read buffer into a copy of its own size while it
/// waits; a client that sends more while queued reads into a buffer again.
#[tokio::test]
async fn queued_requests_are_answered_whole() {
    let proxy = app("queued_req", "pool_size = 1").await;
    let holder = proxy.client("queued_req").await;
    holder.batch_execute("BEGIN").await.unwrap();
    let mut waiting = Vec::new();
    for i in 1..=6usize {
        let c = proxy.client("queued_req").await;
        waiting.push(tokio::spawn(async move {
            // Requests on both sides of the copy's limit; two pipelined while queued.
            let pad = "x".repeat(i * 250);
            let first = format!("SELECT '{pad}' || {i}");
            let second = format!("SELECT {i} * 2");
            let (a, b) = tokio::join!(scalar(&c, &first), scalar(&c, &second));
            (a == format!("{pad}{i}"), b == (i * 2).to_string())
        }));
    }
    let queued = eventually(Duration::from_secs(10), || async {
        proxy
            .shared
            .pools
            .stats()
            .iter()
            .map(|p| p.waiting)
            .sum::<u32>()
            >= 6
    })
    .await;
    assert!(queued, "six clients queued behind the held server");
    holder.batch_execute("COMMIT").await.unwrap();
    for w in waiting {
        let answers = tokio::time::timeout(Duration::from_secs(20), w)
            .await
            .expect("a queued client was not answered")
            .unwrap();
        assert_eq!(answers, (true, true));
    }
}
