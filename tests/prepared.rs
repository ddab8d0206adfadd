//! Named prepared statements under transaction pooling, with real drivers and exact
//! message sequences, against a real PostgreSQL.

mod common;
use std::time::Duration;

use common::wire::{self, Wire};
use common::*;
use tokio_postgres::types::Type;

/// A transaction-mode proxy for one app whose user logs in without a password (for raw clients).
async fn trust_app(name: &str, top: &str) -> Proxy {
    app(name, &format!("auth_type = \"trust\"\n{top}")).await
}

/// Statements prepared on the server the next transaction of `c` runs on.
async fn server_statements(c: &tokio_postgres::Client) -> Vec<String> {
    c.simple_query("SELECT name FROM pg_prepared_statements ORDER BY name")
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect()
}

/// 50 tasks over 5 servers: tokio-postgres `prepare` and `query` (named statements),
/// results checked row by row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_prepared_statements_over_a_small_pool() {
    let proxy = app("ps_many", "pool_size = 5").await;
    let setup = proxy.client("ps_many").await;
    setup.batch_execute("CREATE TABLE items (id int PRIMARY KEY, label text); INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 200) g").await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..50i32 {
        let c = proxy.client("ps_many").await;
        tasks.push(tokio::spawn(async move {
            let by_id = c
                .prepare("SELECT id, label FROM items WHERE id = $1")
                .await
                .unwrap();
            let range = c
                .prepare_typed(
                    "SELECT id FROM items WHERE id BETWEEN $1 AND $2 ORDER BY id",
                    &[Type::INT4, Type::INT4],
                )
                .await
                .unwrap();
            for i in 0..20i32 {
                let id = (t * 7 + i) % 200 + 1;
                let row = c.query_one(&by_id, &[&id]).await.unwrap();
                assert_eq!(row.get::<_, i32>(0), id);
                assert_eq!(row.get::<_, String>(1), format!("item {id}"));
                let lo = id.min(190);
                let rows = c.query(&range, &[&lo, &(lo + 9)]).await.unwrap();
                let ids: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
                assert_eq!(ids, (lo..=lo + 9).collect::<Vec<_>>());
                // `query` with a string prepares (and closes) an unnamed-to-us named statement.
                let n: i64 = c
                    .query_one("SELECT count(*) FROM items WHERE id <= $1", &[&id])
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(n, id as i64);
            }
            // Inside an explicit transaction too.
            c.batch_execute("BEGIN").await.unwrap();
            assert_eq!(
                c.query_one(&by_id, &[&1i32])
                    .await
                    .unwrap()
                    .get::<_, i32>(0),
                1
            );
            c.batch_execute("COMMIT").await.unwrap();
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .unwrap()
            .unwrap();
    }
    let admin = pg().admin().await;
    assert!(server_conns(&admin, "ps_many").await <= 5);
}

/// A Parse for a statement the server already has is answered by the proxy; one for a
/// statement it lacks reaches it; both give the client exactly PostgreSQL's replies.
#[tokio::test]
async fn exact_replies_and_one_server_statement_per_text() {
    let proxy = trust_app("ps_exact", "pool_size = 1").await;
    let port = proxy.addr.port();
    let mut a = Wire::connect(port, "ps_exact", "ps_exact").await;
    let mut b = Wire::connect(port, "ps_exact", "ps_exact").await;
    // a prepares "q1", b prepares the same text as "other": one server-side statement.
    let (tags, _) = a
        .round(&[
            wire::parse("q1", "SELECT $1::int + 1"),
            wire::describe_statement("q1"),
            wire::sync(),
        ])
        .await;
    assert_eq!(tags, "1tTZ");
    let (tags, _) = b
        .round(&[
            wire::parse("other", "SELECT $1::int + 1"),
            wire::describe_statement("other"),
            wire::sync(),
        ])
        .await;
    assert_eq!(
        tags, "1tTZ",
        "ParseComplete from the proxy, the rest from the server"
    );
    let (tags, msgs) = a
        .round(&[
            wire::bind("", "q1", &["41"]),
            wire::execute(""),
            wire::sync(),
        ])
        .await;
    assert_eq!(tags, "2DCZ");
    assert_eq!(msgs[1].row(), vec![Some("42".to_owned())]);
    let (tags, msgs) = b
        .round(&[
            wire::bind("", "other", &["1"]),
            wire::execute(""),
            wire::sync(),
        ])
        .await;
    assert_eq!(tags, "2DCZ");
    assert_eq!(msgs[1].row(), vec![Some("2".to_owned())]);
    let c = proxy.client("ps_exact").await;
    let names = server_statements(&c).await;
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(names[0].starts_with("pgsluice_"), "{names:?}");
    // Pipelined: Parse, Bind, Execute of a new statement, then Close, in one batch.
    let (tags, _) = a
        .round(&[
            wire::parse("q2", "SELECT 'x'"),
            wire::bind("", "q2", &[]),
            wire::execute(""),
            wire::close_statement("q2"),
            wire::sync(),
        ])
        .await;
    assert_eq!(tags, "12DC3Z");
    // A closed name can be used again, for another text.
    let (tags, msgs) = a
        .round(&[
            wire::parse("q2", "SELECT 'y'"),
            wire::bind("", "q2", &[]),
            wire::execute(""),
            wire::sync(),
        ])
        .await;
    assert_eq!(tags, "12DCZ");
    assert_eq!(msgs[2].row(), vec![Some("y".to_owned())]);
    // An unknown name fails as in PostgreSQL.
    let (tags, msgs) = a
        .round(&[wire::bind("", "nope", &[]), wire::execute(""), wire::sync()])
        .await;
    assert_eq!(tags, "EZ");
    assert_eq!(msgs[0].code().as_deref(), Some("26000"));
    // Flush without Sync: the ParseComplete the proxy owes still arrives.
    a.send(&[wire::parse("q3", "SELECT $1::int + 1"), wire::flush()])
        .await;
    assert_eq!(a.recv().await.tag, b'1');
    let (tags, _) = a.round(&[wire::sync()]).await;
    assert_eq!(tags, "Z");
}

/// A Parse that fails on the server is reported once and not registered; an error in a
/// pipeline skips to Sync with the proxy's own replies skipped too.
#[tokio::test]
async fn failed_parse_is_not_registered() {
    let proxy = trust_app("ps_fail", "pool_size = 1").await;
    let mut a = Wire::connect(proxy.addr.port(), "ps_fail", "ps_fail").await;
    let (tags, msgs) = a
        .round(&[
            wire::parse("bad", "SELEC 1"),
            wire::bind("", "bad", &[]),
            wire::execute(""),
            wire::sync(),
        ])
        .await;
    assert_eq!(tags, "EZ");
    assert_eq!(msgs[0].code().as_deref(), Some("42601"));
    let (tags, msgs) = a
        .round(&[wire::bind("", "bad", &[]), wire::execute(""), wire::sync()])
        .await;
    assert_eq!(tags, "EZ");
    assert_eq!(
        msgs[0].code().as_deref(),
        Some("26000"),
        "the failed statement does not exist"
    );
    // An error before a Parse the proxy would answer: no ParseComplete after the error.
    a.round(&[wire::parse("ok", "SELECT 1"), wire::sync()])
        .await;
    let (tags, _) = a.round(&[wire::query("SELECT 1")]).await;
    assert_eq!(tags, "TDCZ");
    let (tags, _) = a
        .round(&[
            wire::parse("", "SELECT 1/0"),
            wire::bind("", "", &[]),
            wire::execute(""),
            wire::parse("ok", "SELECT 1"),
            wire::close_statement("ok"),
            wire::sync(),
        ])
        .await;
    // PostgreSQL folds 1/0 when the unnamed statement is planned, at Bind.
    assert_eq!(
        tags, "1EZ",
        "nothing after the error: no ParseComplete or CloseComplete from the proxy"
    );
}

/// SQL-level DEALLOCATE and DISCARD ALL act on the client's own statements.
#[tokio::test]
async fn deallocate_and_discard() {
    let proxy = trust_app("ps_dealloc", "pool_size = 1").await;
    let port = proxy.addr.port();
    let mut c = Wire::connect(port, "ps_dealloc", "ps_dealloc").await;
    let mut d = Wire::connect(port, "ps_dealloc", "ps_dealloc").await;
    let run = |name: &str| vec![wire::bind("", name, &[]), wire::execute(""), wire::sync()];
    c.round(&[
        wire::parse("s1", "SELECT 1"),
        wire::parse("s2", "SELECT 2"),
        wire::sync(),
    ])
    .await;
    let (tags, _) = c.round(&[wire::query("DEALLOCATE s1")]).await;
    assert_eq!(tags, "CZ");
    let (tags, msgs) = c.round(&run("s1")).await;
    assert_eq!(
        (tags.as_str(), msgs[0].code().as_deref()),
        ("EZ", Some("26000"))
    );
    assert_eq!(
        c.round(&run("s2")).await.0,
        "2DCZ",
        "the other statement is still there"
    );
    assert_eq!(c.round(&[wire::query("DEALLOCATE ALL")]).await.0, "CZ");
    assert_eq!(c.round(&run("s2")).await.0, "EZ");
    c.round(&[wire::parse("s3", "SELECT 3"), wire::sync()])
        .await;
    assert_eq!(c.round(&[wire::query("DISCARD ALL")]).await.0, "CZ");
    assert_eq!(c.round(&run("s3")).await.0, "EZ");
    // Another client's statement on the same server is prepared again when needed.
    d.round(&[wire::parse("t", "SELECT 4"), wire::sync()]).await;
    c.round(&[wire::query("DEALLOCATE ALL")]).await;
    let (tags, msgs) = d.round(&run("t")).await;
    assert_eq!(tags, "2DCZ");
    assert_eq!(msgs[1].row(), vec![Some("4".to_owned())]);
}

/// The server's statement cache is an LRU: evicted statements are closed on the server and
/// prepared again when used.
#[tokio::test]
async fn eviction_keeps_the_server_within_max_prepared_statements() {
    let proxy = app("ps_lru", "pool_size = 1\nmax_prepared_statements = 2").await;
    let c = proxy.client("ps_lru").await;
    let mut stmts = Vec::new();
    for i in 1..=4 {
        stmts.push(c.prepare(&format!("SELECT {i}::int")).await.unwrap());
    }
    for _ in 0..3 {
        for (i, s) in stmts.iter().enumerate() {
            assert_eq!(
                c.query_one(s, &[]).await.unwrap().get::<_, i32>(0),
                i as i32 + 1
            );
        }
    }
    let names = server_statements(&c).await;
    assert!(names.len() <= 2, "{names:?}");
}

/// A schema change that breaks a cached plan fails once, then recovers on a fresh server.
#[tokio::test]
async fn cached_plan_error_recovers() {
    let proxy = trust_app("ps_ddl", "pool_size = 1").await;
    let setup = proxy.client("ps_ddl").await;
    setup
        .batch_execute("CREATE TABLE t (a int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let mut w = Wire::connect(proxy.addr.port(), "ps_ddl", "ps_ddl").await;
    let (tags, _) = w
        .round(&[
            wire::parse("s", "SELECT * FROM t"),
            wire::bind("", "s", &[]),
            wire::execute(""),
            wire::sync(),
        ])
        .await;
    assert_eq!(tags, "12DCZ");
    setup
        .batch_execute("ALTER TABLE t ADD COLUMN b int DEFAULT 7")
        .await
        .unwrap();
    let mut saw_error = false;
    let mut recovered = false;
    for _ in 0..3 {
        let (tags, msgs) = w
            .round(&[wire::bind("", "s", &[]), wire::execute(""), wire::sync()])
            .await;
        if tags == "EZ" {
            assert_eq!(msgs[0].code().as_deref(), Some("0A000"));
            saw_error = true;
        } else {
            assert_eq!(tags, "2DCZ");
            assert_eq!(msgs[1].row(), vec![Some("1".into()), Some("7".into())]);
            recovered = true;
            break;
        }
    }
    assert!(recovered, "the statement works again");
    let _ = saw_error;
}

/// With max_prepared_statements = 0, named statements are refused cleanly in transaction mode.
#[tokio::test]
async fn disabled_refuses_named_statements() {
    let proxy = app("ps_off", "max_prepared_statements = 0").await;
    let c = proxy.client("ps_off").await;
    let e = c.prepare("SELECT 1").await.unwrap_err();
    assert_eq!(code(&e), "0A000");
    assert!(message(&e).contains("named prepared statements"));
    let d = proxy.client("ps_off").await;
    assert_eq!(
        scalar(&d, "SELECT count(*) FROM pg_prepared_statements").await,
        "0"
    );
}

/// `pgbench -M prepared` with 100 clients over a small pool, zero failures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared() {
    let pg = pg();
    let proxy = app("ps_bench", "pool_size = 5\nmax_client_conn = 200").await;
    let out = std::process::Command::new(pg.client_bin("pgbench"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port.to_string(),
            "-U",
            "ps_bench",
            "-i",
            "-s",
            "1",
            "-q",
            "ps_bench",
        ])
        .env("PGPASSWORD", "ps_bench-pw")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = proxy.addr.port().to_string();
    let bin = pg.client_bin("pgbench");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "ps_bench",
                "-M",
                "prepared",
                "-c",
                "100",
                "-j",
                "2",
                "-T",
                "4",
                "ps_bench",
            ])
            .env("PGPASSWORD", "ps_bench-pw")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("number of failed transactions: 0 (0.000%)"),
        "{text}"
    );
}

/// A named statement that changes a setting (`set_config(…, false)`, as an app setting a
/// row-level-security tenant per request) records the change each time it runs, not only
/// when it is prepared: the client keeps its value on whichever server it runs next, and
/// the other client sharing the server does not inherit it.
#[tokio::test]
async fn a_prepared_set_config_is_tracked_each_time_it_runs() {
    let proxy = app("ps_tenant", "pool_size = 1").await;
    let a = proxy.client("ps_tenant").await;
    let b = proxy.client("ps_tenant").await;
    let set = a
        .prepare("SELECT set_config('app.tenant', $1, false)")
        .await
        .unwrap();
    let tenant = "SELECT coalesce(current_setting('app.tenant', true), '')";
    for t in ["A", "B"] {
        a.query(&set, &[&t]).await.unwrap();
        // Another client runs on the one server in between.
        assert_eq!(scalar(&b, tenant).await, "", "b never set it");
        assert_eq!(scalar(&a, tenant).await, t, "a keeps the tenant it set");
    }
}

/// DEALLOCATE ALL and a new named Parse in one pipeline (psycopg sends DEALLOCATE ALL that
/// way after a rollback): the new statement exists afterwards, as in PostgreSQL, on this
/// server and on the next, and another client of the server is not disturbed.
#[tokio::test]
async fn deallocate_all_then_parse_in_one_pipeline() {
    let proxy = trust_app("ps_dealloc_pipe", "pool_size = 1").await;
    let port = proxy.addr.port();
    let mut c = Wire::connect(port, "ps_dealloc_pipe", "ps_dealloc_pipe").await;
    let mut d = Wire::connect(port, "ps_dealloc_pipe", "ps_dealloc_pipe").await;
    let run = |name: &str| vec![wire::bind("", name, &[]), wire::execute(""), wire::sync()];
    let pipeline = |clear: &str, text: &str| {
        vec![
            wire::parse("", clear),
            wire::bind("", "", &[]),
            wire::execute(""),
            wire::parse("s1", text),
            wire::bind("", "s1", &[]),
            wire::execute(""),
            wire::sync(),
        ]
    };
    c.round(&[wire::parse("old", "SELECT 0"), wire::sync()])
        .await;
    for (clear, text) in [("DEALLOCATE ALL", "SELECT 1"), ("DISCARD ALL", "SELECT 2")] {
        let (tags, _) = c.round(&pipeline(clear, text)).await;
        assert_eq!(tags, "12C12DCZ", "{clear}");
        assert_eq!(
            c.round(&run("s1")).await.0,
            "2DCZ",
            "s1 exists after {clear}"
        );
        assert_eq!(
            c.round(&run("old")).await.0,
            "EZ",
            "old is gone after {clear}"
        );
        d.round(&[wire::parse("t", "SELECT 4"), wire::sync()]).await;
        assert_eq!(d.round(&run("t")).await.0, "2DCZ");
        assert_eq!(c.round(&run("s1")).await.0, "2DCZ", "s1 on its next server");
        c.round(&[wire::query("DEALLOCATE s1")]).await;
    }
    // The text is one the server holds already (d's "SELECT 4"), which DEALLOCATE ALL
    // takes away before the Parse runs there: the proxy does not answer that Parse itself
    // but has the server close and prepare it again, so the Bind behind it works. The server
    // is closed after the transaction (whether the clear ran is known only later), and d's
    // statement is prepared again on the next.
    let (tags, msgs) = c.round(&pipeline("DEALLOCATE ALL", "SELECT 4")).await;
    assert_eq!(tags, "12C12DCZ", "{msgs:?}");
    assert_eq!(c.round(&run("s1")).await.0, "2DCZ", "s1 exists");
    assert_eq!(
        d.round(&run("t")).await.0,
        "2DCZ",
        "d's statement is prepared again"
    );
    // A Parse of a name the client has, behind a clear that fails (the transaction block
    // failed before it): both fail with 25P02, as in PostgreSQL, and s1 keeps its text.
    s1_survives_a_failed_block(&mut c, "DEALLOCATE ALL", "4").await;
}

/// In a transaction block that `SELECT 1/0` fails, `statement` and a Parse of s1 behind it,
/// sent at once, are both refused (25P02); after ROLLBACK, s1 still returns `value`.
async fn s1_survives_a_failed_block(c: &mut Wire, statement: &str, value: &str) {
    assert_eq!(c.round(&[wire::query("BEGIN")]).await.0, "CZ");
    c.send(&[
        wire::query("SELECT 1/0"),
        wire::query(statement),
        wire::parse("s1", "SELECT 6"),
        wire::sync(),
    ])
    .await;
    for step in ["22012", "25P02", "25P02"] {
        let msgs = c.until_ready().await;
        assert_eq!(msgs[0].code().as_deref(), Some(step), "{msgs:?}");
    }
    assert_eq!(c.round(&[wire::query("ROLLBACK")]).await.0, "CZ");
    runs_as(c, "s1", value, "s1 kept its text").await;
}

/// Runs statement `name` (Bind, Execute, Sync) and checks it returns the one value `value`.
async fn runs_as(c: &mut Wire, name: &str, value: &str, why: &str) {
    let (tags, msgs) = c
        .round(&[wire::bind("", name, &[]), wire::execute(""), wire::sync()])
        .await;
    assert_eq!(tags, "2DCZ", "{why}: {msgs:?}");
    let row = msgs.iter().find(|m| m.tag == b'D').unwrap().row();
    assert_eq!(row, [Some(value.to_owned())], "{why}");
}

/// A Parse of a name the client has, behind a DEALLOCATE ALL in the same pipeline: in
/// PostgreSQL the clear frees the name and the Parse defines it again, and a second Parse
/// of it behind the same clear fails with 42P05; a clear that an error skips frees nothing.
/// The client's name keeps what PostgreSQL gave it, on this server and the next.
#[tokio::test]
async fn a_name_in_use_parsed_again_behind_a_clear() {
    let proxy = trust_app("ps_reparse_clear", "pool_size = 1").await;
    let port = proxy.addr.port();
    let mut c = Wire::connect(port, "ps_reparse_clear", "ps_reparse_clear").await;
    let mut d = Wire::connect(port, "ps_reparse_clear", "ps_reparse_clear").await;
    let tags_of = |msgs: &[wire::Msg]| -> String { msgs.iter().map(|m| m.tag as char).collect() };
    let unnamed_clear = || {
        vec![
            wire::parse("", "DEALLOCATE ALL"),
            wire::bind("", "", &[]),
            wire::execute(""),
        ]
    };
    c.round(&[wire::parse("s1", "SELECT 1"), wire::sync()])
        .await;
    d.round(&[wire::parse("t", "SELECT 9"), wire::sync()]).await;

    // A simple-query clear, then the Parse and its use, sent at once.
    c.send(&[
        wire::query("DEALLOCATE ALL"),
        wire::parse("s1", "SELECT 2"),
        wire::bind("", "s1", &[]),
        wire::execute(""),
        wire::sync(),
    ])
    .await;
    assert_eq!(tags_of(&c.until_ready().await), "CZ");
    let msgs = c.until_ready().await;
    assert_eq!(tags_of(&msgs), "12DCZ", "{msgs:?}");
    let row = msgs.iter().find(|m| m.tag == b'D').unwrap().row();
    assert_eq!(row, [Some("2".to_owned())]);
    runs_as(&mut c, "s1", "2", "s1 kept").await;

    // A clear run from the unnamed statement, then two Parses of the name: the first
    // defines it, the second finds it in use.
    let mut pipeline = unnamed_clear();
    pipeline.extend([
        wire::parse("s1", "SELECT 3"),
        wire::parse("s1", "SELECT 4"),
        wire::sync(),
    ]);
    let (tags, msgs) = c.round(&pipeline).await;
    assert_eq!(tags, "12C1EZ", "{msgs:?}");
    assert_eq!(msgs[4].code().as_deref(), Some("42P05"));
    runs_as(&mut c, "s1", "3", "the first Parse holds").await;

    // The clear's batch fails before it (a Bind of a statement nobody has): the server skips
    // it, so a Parse of the name in the next batch finds it in use, as in PostgreSQL.
    let mut pipeline = vec![wire::bind("", "nosuch", &[])];
    pipeline.extend(unnamed_clear());
    pipeline.extend([wire::sync(), wire::parse("s1", "SELECT 5"), wire::sync()]);
    c.send(&pipeline).await;
    let msgs = c.until_ready().await;
    assert_eq!(tags_of(&msgs), "EZ", "{msgs:?}");
    assert_eq!(msgs[0].code().as_deref(), Some("26000"));
    let msgs = c.until_ready().await;
    assert_eq!(tags_of(&msgs), "EZ", "{msgs:?}");
    assert_eq!(msgs[0].code().as_deref(), Some("42P05"));
    runs_as(&mut c, "s1", "3", "s1 unchanged").await;

    // The same with a name longer than pgsluice reads ahead (1 KiB): it waits as well.
    let long = "l".repeat(1500);
    c.round(&[wire::parse(&long, "SELECT 1"), wire::sync()])
        .await;
    let mut pipeline = vec![wire::bind("", "nosuch", &[])];
    pipeline.extend(unnamed_clear());
    pipeline.extend([wire::sync(), wire::parse(&long, "SELECT 5"), wire::sync()]);
    c.send(&pipeline).await;
    assert_eq!(tags_of(&c.until_ready().await), "EZ");
    let msgs = c.until_ready().await;
    assert_eq!(tags_of(&msgs), "EZ", "{msgs:?}");
    assert_eq!(
        msgs[0].code().as_deref(),
        Some("42P05"),
        "the long name is in use"
    );

    // The same in one batch: the error skips the clear and the Parse alike.
    let mut pipeline = vec![wire::bind("", "nosuch", &[])];
    pipeline.extend(unnamed_clear());
    pipeline.extend([wire::parse("s1", "SELECT 6"), wire::sync()]);
    let (tags, msgs) = c.round(&pipeline).await;
    assert_eq!(tags, "EZ", "{msgs:?}");
    runs_as(&mut c, "s1", "3", "s1 unchanged").await;

    // DEALLOCATE s1 behind extended-protocol messages with no Sync: their replies come
    // first, then its own.
    c.send(&[
        wire::parse("", "SELECT 8"),
        wire::bind("", "", &[]),
        wire::execute(""),
        wire::query("DEALLOCATE s1"),
    ])
    .await;
    let msgs = c.until_ready().await;
    assert_eq!(tags_of(&msgs), "12DCCZ", "{msgs:?}");
    c.round(&[wire::parse("s1", "SELECT 3"), wire::sync()])
        .await;

    // DEALLOCATE s1 behind a clear in its batch, and in an earlier batch: the clear has
    // dropped s1, so it fails (26000), as in PostgreSQL.
    let mut pipeline = unnamed_clear();
    pipeline.push(wire::query("DEALLOCATE s1"));
    c.send(&pipeline).await;
    let msgs = c.until_ready().await;
    assert_eq!(tags_of(&msgs), "12CEZ", "{msgs:?}");
    assert_eq!(msgs[3].code().as_deref(), Some("26000"));
    c.round(&[wire::parse("s1", "SELECT 3"), wire::sync()])
        .await;
    let mut pipeline = unnamed_clear();
    pipeline.extend([wire::sync(), wire::query("DEALLOCATE s1")]);
    c.send(&pipeline).await;
    assert_eq!(tags_of(&c.until_ready().await), "12CZ");
    let msgs = c.until_ready().await;
    assert_eq!(msgs[0].code().as_deref(), Some("26000"), "{msgs:?}");
    c.round(&[wire::parse("s1", "SELECT 3"), wire::sync()])
        .await;

    // The other client's statement on the shared server, and s1 on a fresh server.
    runs_as(&mut d, "t", "9", "the other client's statement").await;
    c.round(&[wire::query("DISCARD ALL")]).await;
    c.round(&[wire::parse("s1", "SELECT 7"), wire::sync()])
        .await;
    runs_as(&mut c, "s1", "7", "on a fresh server").await;
}

/// A DEALLOCATE ALL inside a multi-statement query is not seen coming: a Parse of a name
/// the client has, behind it, goes to the server under the old statement's name and the
/// server takes the new text there. That server is retired after the transaction, so
/// another client preparing the old text is not refused on it (42P05).
#[tokio::test]
async fn an_unseen_clear_retires_the_server_behind_it() {
    let name = "ps_unseen_clear";
    let proxy = trust_app(name, "pool_size = 1").await;
    let port = proxy.addr.port();
    let mut c = Wire::connect(port, name, name).await;
    let mut d = Wire::connect(port, name, name).await;
    c.round(&[wire::parse("s1", "SELECT 1"), wire::sync()])
        .await;
    c.send(&[
        wire::query("SELECT 1; DEALLOCATE ALL"),
        wire::parse("s1", "SELECT 2"),
        wire::sync(),
    ])
    .await;
    let msgs = c.until_ready().await;
    assert_eq!(msgs.last().map(|m| m.tag), Some(b'Z'), "{msgs:?}");
    // As in PostgreSQL, where the clear freed the name.
    let msgs = c.until_ready().await;
    assert_eq!(msgs.first().map(|m| m.tag), Some(b'1'), "{msgs:?}");
    let (tags, msgs) = d
        .round(&[
            wire::parse("t", "SELECT 1"),
            wire::bind("", "t", &[]),
            wire::execute(""),
            wire::sync(),
        ])
        .await;
    assert_eq!(tags, "12DCZ", "{msgs:?}");
}

/// One round's tags, SQLSTATEs and final transaction status.
type Seen = (String, Vec<String>, Option<char>);

async fn seen(c: &mut Wire, parts: Vec<Vec<u8>>) -> Seen {
    let (tags, msgs) = c.round(&parts).await;
    let codes = msgs.iter().filter_map(|m| m.code()).collect();
    (tags, codes, msgs.last().map(|m| m.body[0] as char))
}

/// The steps of `a_parse_in_a_failed_transaction_answers_as_postgresql`.
async fn parse_in_a_failed_block(c: &mut Wire) -> Vec<Seen> {
    let run = |stmt: &str| vec![wire::bind("", stmt, &[]), wire::execute(""), wire::sync()];
    let with = |mut first: Vec<Vec<u8>>, rest: Vec<Vec<u8>>| {
        first.extend(rest);
        first
    };
    vec![
        // The server prepares both texts; the client names them a and r0.
        seen(
            c,
            vec![
                wire::parse("a", "SELECT 1"),
                wire::parse("r0", "ROLLBACK"),
                wire::sync(),
            ],
        )
        .await,
        seen(c, vec![wire::query("BEGIN")]).await,
        seen(c, vec![wire::query("SELECT 1/0")]).await,
        // Refused: 25P02, the rest skipped to Sync.
        seen(c, with(vec![wire::parse("b", "SELECT 1")], run("b"))).await,
        // Ends the block: accepted and run.
        seen(c, with(vec![wire::parse("r", "ROLLBACK")], run("r"))).await,
        // b was never defined (26000); a still runs.
        seen(c, run("b")).await,
        seen(c, run("a")).await,
    ]
}

/// A Parse of a text the server has prepared already, in a failed transaction block: as in
/// PostgreSQL it is refused (25P02) and defines no name, unless it ends the block
/// (`ROLLBACK`, which pgsluice answers itself). The same steps run directly against
/// PostgreSQL and through pgsluice give the same messages.
#[tokio::test]
async fn a_parse_in_a_failed_transaction_answers_as_postgresql() {
    let name = "ps_parse_failed";
    let proxy = trust_app(name, "pool_size = 1").await;
    let leaks = Leaks::new(&proxy, name).await;
    let mut direct = Wire::connect_password(pg().port, name, name, &format!("{name}-pw")).await;
    let expected = parse_in_a_failed_block(&mut direct).await;
    drop(direct);
    assert_eq!(expected[3].1, ["25P02"], "PostgreSQL: {expected:?}");
    assert_eq!(expected[4].0, "12CZ", "PostgreSQL: {expected:?}");
    assert_eq!(expected[5].1, ["26000"], "PostgreSQL: {expected:?}");
    let mut c = Wire::connect(proxy.addr.port(), name, name).await;
    assert_eq!(parse_in_a_failed_block(&mut c).await, expected);
    drop(c);
    leaks.check().await;
}

/// `DEALLOCATE name` is answered by pgsluice, as PostgreSQL would answer it where it runs:
/// 25P02 in a transaction that a statement ahead of it in the same pipeline failed (the
/// client keeps the statement), and success after a ROLLBACK ahead of it in a failed one.
#[tokio::test]
async fn deallocate_in_a_failed_transaction_answers_as_postgresql() {
    let proxy = trust_app("ps_dealloc_failed", "pool_size = 1").await;
    let leaks = Leaks::new(&proxy, "ps_dealloc_failed").await;
    let port = proxy.addr.port();
    let mut c = Wire::connect(port, "ps_dealloc_failed", "ps_dealloc_failed").await;
    let run = |name: &str| vec![wire::bind("", name, &[]), wire::execute(""), wire::sync()];
    let status = |msgs: &[wire::Msg]| msgs.last().map(|m| m.body[0] as char);
    c.round(&[wire::parse("s1", "SELECT 1"), wire::sync()])
        .await;

    assert_eq!(c.round(&[wire::query("BEGIN")]).await.0, "CZ");
    c.send(&[wire::query("SELECT 1/0"), wire::query("DEALLOCATE s1")])
        .await;
    let msgs = c.until_ready().await;
    assert_eq!(msgs[0].code().as_deref(), Some("22012"), "{msgs:?}");
    let msgs = c.until_ready().await;
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    assert_eq!(msgs[0].code().as_deref(), Some("25P02"), "{msgs:?}");
    assert_eq!(status(&msgs), Some('E'), "still in the failed transaction");
    assert_eq!(c.round(&[wire::query("ROLLBACK")]).await.0, "CZ");
    assert_eq!(c.round(&run("s1")).await.0, "2DCZ", "s1 kept");

    // Messages behind the refused DEALLOCATE see the name it kept: a Parse of it is refused
    // too (25P02, s1 keeps its text), a Close of it drops it (PostgreSQL's Close works in a
    // failed transaction).
    s1_survives_a_failed_block(&mut c, "DEALLOCATE s1", "1").await;
    assert_eq!(c.round(&[wire::query("BEGIN")]).await.0, "CZ");
    c.send(&[
        wire::query("SELECT 1/0"),
        wire::query("DEALLOCATE s1"),
        wire::close_statement("s1"),
        wire::sync(),
    ])
    .await;
    for step in [Some("22012"), Some("25P02"), None] {
        let msgs = c.until_ready().await;
        assert_eq!(msgs[0].code().as_deref(), step, "{msgs:?}");
    }
    assert_eq!(c.round(&[wire::query("ROLLBACK")]).await.0, "CZ");
    let (tags, msgs) = c.round(&run("s1")).await;
    assert_eq!(tags, "EZ", "the Close dropped s1: {msgs:?}");
    c.round(&[wire::parse("s1", "SELECT 1"), wire::sync()])
        .await;

    // Failed first, then a ROLLBACK and the DEALLOCATE sent together: it runs.
    c.round(&[wire::query("BEGIN")]).await;
    let (tags, msgs) = c.round(&[wire::query("SELECT 1/0")]).await;
    assert_eq!((tags.as_str(), status(&msgs)), ("EZ", Some('E')));
    c.send(&[wire::query("ROLLBACK"), wire::query("DEALLOCATE s1")])
        .await;
    assert_eq!(c.until_ready().await.len(), 2);
    let msgs = c.until_ready().await;
    assert_eq!(msgs[0].tag, b'C', "{msgs:?}");
    assert_eq!(msgs[0].body, b"DEALLOCATE\0");
    assert_eq!(status(&msgs), Some('I'));
    let (tags, msgs) = c.round(&run("s1")).await;
    assert_eq!(tags, "EZ", "s1 is gone");
    assert_eq!(msgs[0].code().as_deref(), Some("26000"));
    drop(c);
    leaks.check().await;
}

/// A client that deallocates a statement by its server-side name (another client's) makes
/// the proxy stop trusting that server: the other client's statement is prepared again.
#[tokio::test]
async fn deallocating_a_server_side_name_does_not_break_other_clients() {
    let proxy = trust_app("ps_dealloc_other", "pool_size = 1").await;
    let port = proxy.addr.port();
    let mut c = Wire::connect(port, "ps_dealloc_other", "ps_dealloc_other").await;
    let mut d = Wire::connect(port, "ps_dealloc_other", "ps_dealloc_other").await;
    let run = |name: &str| vec![wire::bind("", name, &[]), wire::execute(""), wire::sync()];
    d.round(&[wire::parse("t", "SELECT 4"), wire::sync()]).await;
    let (_, msgs) = c
        .round(&[wire::query(
            "SELECT name FROM pg_prepared_statements WHERE name LIKE 'pgsluice%'",
        )])
        .await;
    let server_name = msgs
        .iter()
        .find(|m| m.tag == b'D')
        .map(|m| m.row()[0].clone().unwrap())
        .expect("d's statement is on the server");
    let (tags, _) = c
        .round(&[wire::query(&format!("DEALLOCATE \"{server_name}\""))])
        .await;
    assert_eq!(tags, "CZ");
    let (tags, msgs) = d.round(&run("t")).await;
    assert_eq!(tags, "2DCZ", "{msgs:?}");
}

/// After an error in an extended-protocol batch, PostgreSQL ignores everything up to the
/// Sync, a simple Query sent in between included: that Query gets no answer, and the
/// transaction ends at the Sync's ReadyForQuery (the server goes back to the pool).
#[tokio::test]
async fn a_query_sent_while_the_server_skips_to_sync_is_not_owed() {
    let proxy = trust_app(
        "ps_skip_query",
        "pool_size = 1\nquery_wait_timeout = \"3s\"",
    )
    .await;
    let port = proxy.addr.port();
    let mut c = Wire::connect(port, "ps_skip_query", "ps_skip_query").await;
    let mut d = Wire::connect(port, "ps_skip_query", "ps_skip_query").await;
    let (tags, msgs) = c
        .round(&[
            wire::parse("", "SELECT 1/0"),
            wire::bind("", "", &[]),
            wire::execute(""),
            wire::query("SELECT 2"),
            wire::sync(),
        ])
        .await;
    // 1/0 fails at Bind (constants are folded when planning).
    assert_eq!(tags, "1EZ", "{msgs:?}");
    assert_eq!(msgs[1].code().as_deref(), Some("22012"));
    // The server is free: another client gets it, and this one carries on.
    assert_eq!(d.round(&[wire::query("SELECT 3")]).await.0, "TDCZ");
    assert_eq!(c.round(&[wire::query("SELECT 4")]).await.0, "TDCZ");
}

/// Parses `MAX_CLIENT_STATEMENTS` names `s0`, `s1`, … of one text, in pipelined batches.
async fn fill_statement_names(w: &mut Wire) {
    let max = pgsluice::prepared::MAX_CLIENT_STATEMENTS;
    for batch in 0..max / 1000 {
        let mut parts: Vec<Vec<u8>> = (0..1000)
            .map(|i| wire::parse(&format!("s{}", batch * 1000 + i), "SELECT $1::int"))
            .collect();
        parts.push(wire::sync());
        let (tags, _) = w.round(&parts).await;
        assert_eq!(tags, format!("{}Z", "1".repeat(1000)), "batch {batch}");
    }
}

/// The FATAL a Parse of one name too many gets, then the connection closes.
async fn refused_for_too_many_names(w: &mut Wire) {
    let m = w.recv().await;
    assert_eq!(m.tag, b'E');
    assert_eq!(m.code().as_deref(), Some("54000"));
    let fields = m.fields();
    assert!(
        fields[&'M'].contains("too many prepared statements"),
        "{fields:?}"
    );
    wire::expect_closed(&mut w.stream).await;
}

/// A client may hold `MAX_CLIENT_STATEMENTS` named statements (all clients' live in the
/// proxy's memory): a Close frees a place, a clear ahead in the pipeline counts as run, and
/// a Parse of one more name gets FATAL 54000 and the connection closes: inside a
/// transaction, which rolls back; and outside one, where pgsluice answers a Parse of a text
/// it knows without a server. The proxy goes on serving, and nothing is left behind.
#[tokio::test]
async fn a_client_cannot_hold_unbounded_statement_names() {
    let name = "ps_cap";
    let proxy = trust_app(name, "pool_size = 1").await;
    let leaks = Leaks::new(&proxy, name).await;
    let mut w = Wire::connect(proxy.addr.port(), name, name).await;
    fill_statement_names(&mut w).await;
    // At the limit: a name in use may be parsed again (PostgreSQL's 42P05), a Close frees a
    // place, and every name still runs.
    let (tags, msgs) = w
        .round(&[wire::parse("s5", "SELECT 5"), wire::sync()])
        .await;
    assert_eq!(tags, "EZ");
    assert_eq!(msgs[0].code().as_deref(), Some("42P05"));
    let (tags, _) = w
        .round(&[
            wire::close_statement("s0"),
            wire::parse("again", "SELECT 2"),
            wire::bind("", "s9999", &["7"]),
            wire::execute(""),
            wire::sync(),
        ])
        .await;
    assert_eq!(tags, "312DCZ");
    // One more name, in a transaction: refused, and the connection closes (its transaction
    // rolls back on a server that goes back clean).
    w.round(&[wire::query("BEGIN")]).await;
    w.send(&[wire::parse("one_too_many", "SELECT 3"), wire::sync()])
        .await;
    refused_for_too_many_names(&mut w).await;

    // Full again; a clear ahead in the pipeline empties the names before the Parse runs.
    let mut w = Wire::connect(proxy.addr.port(), name, name).await;
    fill_statement_names(&mut w).await;
    w.send(&[
        wire::query("DEALLOCATE ALL"),
        wire::parse("fresh", "SELECT $1::int"),
        wire::bind("", "fresh", &["8"]),
        wire::execute(""),
        wire::close_statement("fresh"),
        wire::sync(),
    ])
    .await;
    let tags = |msgs: Vec<wire::Msg>| msgs.iter().map(|m| m.tag as char).collect::<String>();
    assert_eq!(tags(w.until_ready().await), "CZ");
    assert_eq!(tags(w.until_ready().await), "12DC3Z");
    // Full once more, outside a transaction: a Parse and Sync of a known text.
    fill_statement_names(&mut w).await;
    w.send(&[wire::parse("one_more", "SELECT $1::int"), wire::sync()])
        .await;
    refused_for_too_many_names(&mut w).await;

    let c = proxy.client(name).await;
    let one: i32 = c.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    drop(c);
    leaks.check().await;
}
