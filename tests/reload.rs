//! Configuration reload: pool sizes change under load (200 clients) with no failed
//! transaction, as SHOW POOLS and pg_stat_activity show; a bad
//! file keeps the old configuration, a removed database's clients leave at their next
//! transaction boundary, and SIGHUP reloads the real binary.

mod common;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

fn config(pg: &TestPostgres, dbs: &[&str], pool_size: u32, extra: &str) -> String {
    let mut s = format!("pool_size = {pool_size}\nquery_wait_timeout = \"30s\"\n{extra}\n[budget]\nmax_server_connections = 40\n");
    for d in dbs {
        s.push_str(&format!(
            "[databases.{d}]\nhost = \"127.0.0.1\"\nport = {}\n[users.{d}]\npassword = \"{d}-pw\"\n",
            pg.port
        ));
    }
    s
}

/// A proxy started from a configuration file (`config`) in a temp dir, with an app per
/// database, for tests that rewrite the file and reload it.
async fn from_file(
    dbs: &[&str],
    pool_size: u32,
    extra: &str,
) -> (tempfile::TempDir, std::path::PathBuf, Proxy) {
    let pg = pg();
    for d in dbs {
        pg.create_app(d).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgsluice.toml");
    std::fs::write(&path, config(pg, dbs, pool_size, extra)).unwrap();
    let proxy = Proxy::start_file(&path).await;
    (dir, path, proxy)
}

/// Server connections the console's SHOW POOLS reports for a database (`sv_active` +
/// `sv_idle` + `sv_used` + `sv_tested` + `sv_login`) and the pool size SHOW DATABASES reports.
async fn console_view(console: &tokio_postgres::Client, db: &str) -> (u32, u32) {
    let mut servers = 0;
    let mut size = 0;
    for (sql, cols) in [
        (
            "SHOW POOLS",
            &["sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login"][..],
        ),
        ("SHOW DATABASES", &["pool_size"][..]),
    ] {
        for m in console.simple_query(sql).await.unwrap() {
            let tokio_postgres::SimpleQueryMessage::Row(r) = m else {
                continue;
            };
            let name = if sql == "SHOW POOLS" {
                "database"
            } else {
                "name"
            };
            if r.get(name) != Some(db) {
                continue;
            }
            let sum: u32 = cols
                .iter()
                .map(|c| r.get(*c).unwrap().parse::<u32>().unwrap())
                .sum();
            if sql == "SHOW POOLS" {
                servers += sum;
            } else {
                size = sum;
            }
        }
    }
    (servers, size)
}

/// 200 clients run transactions while reloads grow the pool (3 → 8), refuse a broken file,
/// and shrink it (→ 2). SHOW POOLS and pg_stat_activity follow; no transaction fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_size_changes_under_load() {
    let pg = pg();
    pg.create_app("rl_load").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgsluice.toml");
    // md5 keeps 200 logins quick in a debug build; the reload is what is under test.
    let extra = "auth_type = \"md5\"\nadmin_users = \"rl_load\"";
    std::fs::write(&path, config(pg, &["rl_load"], 3, extra)).unwrap();
    let proxy = Proxy::start_file(&path).await;
    let admin = pg.admin().await;
    let console = connect(&proxy.conn("rl_load", "rl_load-pw", "pgbouncer")).await;
    let (stop, failed, done) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let c = proxy.client("rl_load").await;
        let (stop, failed, done) = (stop.clone(), failed.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..2000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match c
                    .batch_execute("BEGIN; SELECT pg_sleep(0.02); COMMIT")
                    .await
                {
                    Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("{e}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(server_conns(&admin, "rl_load").await <= 3);
    let (servers, size) = console_view(&console, "rl_load").await;
    assert_eq!(
        (size, servers.min(3)),
        (3, 3),
        "SHOW POOLS: a full pool of 3"
    );
    assert!(servers <= 3);

    std::fs::write(&path, config(pg, &["rl_load"], 8, extra)).unwrap();
    pgsluice::reload::reload(&proxy.shared).expect("a valid file reloads");
    assert!(
        eventually(Duration::from_secs(5), || async {
            server_conns(&admin, "rl_load").await > 3
        })
        .await,
        "the pool grew"
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            console_view(&console, "rl_load").await == (8, 8)
        })
        .await,
        "SHOW POOLS and SHOW DATABASES: {:?}",
        console_view(&console, "rl_load").await
    );
    assert!(server_conns(&admin, "rl_load").await <= 8);

    // A broken file under load: refused, the pool and the clients carry on.
    std::fs::write(&path, "pool_size = \"many\"\n").unwrap();
    assert!(pgsluice::reload::reload(&proxy.shared).is_err());
    let before = done.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(done.load(Ordering::Relaxed) > before, "still serving");
    assert_eq!(console_view(&console, "rl_load").await.1, 8);

    // Shrink again: busy servers above the size close as they come back.
    std::fs::write(&path, config(pg, &["rl_load"], 2, extra)).unwrap();
    pgsluice::reload::reload(&proxy.shared).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            server_conns(&admin, "rl_load").await <= 2
        })
        .await,
        "the pool shrank"
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            console_view(&console, "rl_load").await == (2, 2)
        })
        .await,
        "SHOW POOLS and SHOW DATABASES: {:?}",
        console_view(&console, "rl_load").await
    );
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no transaction failed");
    assert!(done.load(Ordering::Relaxed) > 200);
}

#[tokio::test]
async fn a_bad_reload_keeps_the_old_configuration() {
    let pg = pg();
    let (_dir, path, proxy) = from_file(&["rl_bad"], 4, "").await;
    let c = proxy.client("rl_bad").await;
    std::fs::write(&path, "pool_size = \"many\"\n").unwrap();
    let e = pgsluice::reload::reload(&proxy.shared).unwrap_err();
    assert!(e.contains("pool_size"), "{e}");
    std::fs::write(
        &path,
        config(pg, &["rl_bad"], 4, "listen = \"127.0.0.1:1\""),
    )
    .unwrap();
    let e = pgsluice::reload::reload(&proxy.shared).unwrap_err();
    assert!(e.contains("listen: changing it needs a restart"), "{e}");
    // The cancel keys handed out carry the peer_id: it cannot change either.
    std::fs::write(&path, config(pg, &["rl_bad"], 4, "peer_id = 3")).unwrap();
    let e = pgsluice::reload::reload(&proxy.shared).unwrap_err();
    assert!(e.contains("peer_id: changing it needs a restart"), "{e}");
    // The metrics' application labels are sized at start.
    std::fs::write(
        &path,
        config(pg, &["rl_bad"], 4, "[metrics]\nmax_applications = 5"),
    )
    .unwrap();
    let e = pgsluice::reload::reload(&proxy.shared).unwrap_err();
    assert!(
        e.contains("metrics.max_applications: changing it needs a restart"),
        "{e}"
    );
    assert_eq!(proxy.shared.pools.stats()[0].pool_size, 4);
    assert_eq!(scalar(&c, "SELECT 1").await, "1", "still serving");
    assert_eq!(
        scalar(&proxy.client("rl_bad").await, "SELECT 2").await,
        "2",
        "still accepting"
    );
}

#[tokio::test]
async fn a_removed_database_drains() {
    let pg = pg();
    let admin = "admin_users = \"rl_keep\"";
    let (_dir, path, proxy) = from_file(&["rl_keep", "rl_gone"], 2, admin).await;
    let keep = proxy.client("rl_keep").await;
    let gone = proxy.client("rl_gone").await;
    gone.batch_execute("BEGIN; SELECT 1").await.unwrap();
    std::fs::write(&path, config(pg, &["rl_keep"], 2, admin)).unwrap();
    pgsluice::reload::reload(&proxy.shared).unwrap();
    // SHOW STATS has a row per configured database, so none for the removed one.
    let console = connect(&proxy.conn("rl_keep", "rl_keep-pw", "pgbouncer")).await;
    let rows: Vec<String> = console
        .simple_query("SHOW STATS")
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get("database").map(str::to_owned),
            _ => None,
        })
        .collect();
    assert_eq!(rows, ["rl_keep"], "SHOW STATS after the reload");
    // The open transaction finishes; the next one is refused with 57P01.
    gone.batch_execute("COMMIT").await.unwrap();
    let e = gone.simple_query("SELECT 1").await.unwrap_err();
    assert!(
        e.as_db_error().is_none_or(|d| d.code().code() == "57P01"),
        "{e}"
    );
    let e = try_connect(&proxy.conn("rl_gone", "rl_gone-pw", "rl_gone"))
        .await
        .err()
        .unwrap();
    assert!(["3D000", "28P01"].contains(&code(&e).as_str()), "{e}");
    assert_eq!(scalar(&keep, "SELECT 1").await, "1");
}

#[tokio::test]
async fn sighup_reloads_the_binary() {
    let pg = pg();
    pg.create_app("rl_hup").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgsluice.toml");
    let port = pg::free_port();
    let listen = format!("listen = \"127.0.0.1:{port}\"\nquery_wait_timeout = \"1s\"");
    let write = |size: u32| {
        std::fs::write(
            &path,
            config(pg, &["rl_hup"], size, &listen).replace("query_wait_timeout = \"30s\"\n", ""),
        )
        .unwrap()
    };
    write(1);
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgsluice"))
        .arg("--config")
        .arg(&path)
        .env("PGSLUICE_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await
    );
    let conn = format!("host=127.0.0.1 port={port} user=rl_hup password=rl_hup-pw dbname=rl_hup");
    let a = connect(&conn).await;
    let b = connect(&conn).await;
    a.batch_execute("BEGIN").await.unwrap();
    let e = b.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(code(&e), "53300", "one server, held by a");
    write(2);
    assert!(Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let served = eventually(Duration::from_secs(5), || async {
        b.simple_query("SELECT 1").await.is_ok()
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    assert!(served, "after SIGHUP the pool has a second server");
}

/// The queue's sweeper wakes for the earliest deadline: after a reload shortens
/// `query_wait_timeout`, a client that queues later times out first (53300), while the one
/// queued before the reload keeps its longer wait and is served when the server frees up.
#[tokio::test]
async fn a_shorter_query_wait_timeout_ends_later_waits_first() {
    let pg = pg();
    let (_dir, path, proxy) = from_file(&["rl_wait"], 1, "").await;
    let holder = proxy.client("rl_wait").await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    // Queued with the 30 s wait.
    let early = proxy.client("rl_wait").await;
    let early_wait = tokio::spawn(async move { scalar(&early, "SELECT 7").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(
        &path,
        config(pg, &["rl_wait"], 1, "").replace("\"30s\"", "\"1s\""),
    )
    .unwrap();
    pgsluice::reload::reload(&proxy.shared).unwrap();
    let late = proxy.client("rl_wait").await;
    let started = std::time::Instant::now();
    let e = late.batch_execute("SELECT 1").await.unwrap_err();
    let waited = started.elapsed();
    assert_eq!(code(&e), "53300", "{e}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "timed out after {waited:?}"
    );
    assert!(!early_wait.is_finished(), "the earlier client still waits");
    holder.batch_execute("COMMIT").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(20), early_wait)
        .await
        .expect("served once the server is free")
        .unwrap();
    assert_eq!(got, "7");
}

/// A client connected before a reload runs its next transaction with the reloaded
/// `query_timeout` (clients cache the timeouts per configuration generation).
#[tokio::test]
async fn a_reloaded_query_timeout_reaches_connected_clients() {
    let pg = pg();
    let (_dir, path, proxy) = from_file(&["rl_qt"], 2, "").await;
    let c = proxy.client("rl_qt").await;
    // No query_timeout yet: a 1.5 s statement finishes.
    assert_eq!(scalar(&c, "SELECT pg_sleep(1.5)::text || 'ok'").await, "ok");
    std::fs::write(
        &path,
        config(pg, &["rl_qt"], 2, "query_timeout = \"500ms\""),
    )
    .unwrap();
    pgsluice::reload::reload(&proxy.shared).unwrap();
    let started = std::time::Instant::now();
    let e = c.simple_query("SELECT pg_sleep(5)").await.unwrap_err();
    assert_eq!(code(&e), "57014", "{e}");
    assert!(message(&e).contains("query_timeout"), "{}", message(&e));
    assert!(started.elapsed() < Duration::from_secs(4));
}

/// A removed database with `min_pool_size` is not topped up any more: its servers close and
/// no new session reaches PostgreSQL for it (the janitor once opened and closed
/// `min_pool_size` servers for it every tick).
#[tokio::test]
async fn a_removed_database_is_not_topped_up() {
    let pg = pg();
    let (_dir, path, proxy) =
        from_file(&["rl_min_keep", "rl_min_gone"], 2, "min_pool_size = 2").await;
    // Pools are made at their first login.
    let keep = proxy.client("rl_min_keep").await;
    let gone = proxy.client("rl_min_gone").await;
    assert_eq!(scalar(&gone, "SELECT 1").await, "1");
    let admin = pg.admin().await;
    let backends = |db: &'static str| {
        let admin = &admin;
        async move {
            let n: i64 = admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = $1",
                    &[&db],
                )
                .await
                .unwrap()
                .get(0);
            n
        }
    };
    assert!(
        eventually(Duration::from_secs(10), || async {
            backends("rl_min_gone").await >= 2
        })
        .await,
        "min_pool_size opens two servers: {} open",
        backends("rl_min_gone").await
    );
    std::fs::write(&path, config(pg, &["rl_min_keep"], 2, "min_pool_size = 2")).unwrap();
    pgsluice::reload::reload(&proxy.shared).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            backends("rl_min_gone").await == 0
        })
        .await,
        "the removed pool's servers close"
    );
    // Sessions PostgreSQL counts for the database (at their end) stay put over several
    // janitor ticks.
    let sessions = || {
        let admin = &admin;
        async move {
            admin
                .batch_execute("SELECT pg_stat_clear_snapshot()")
                .await
                .unwrap();
            let n: i64 = admin
                .query_one(
                    "SELECT sessions FROM pg_stat_database WHERE datname = 'rl_min_gone'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            n
        }
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = sessions().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        sessions().await,
        before,
        "no server opened for the removed database"
    );
    assert_eq!(backends("rl_min_gone").await, 0);
    assert!(
        backends("rl_min_keep").await >= 2,
        "the kept pool keeps its minimum"
    );
    assert_eq!(scalar(&keep, "SELECT 1").await, "1");
}

/// Lowering a limit by reload closes the idle servers above it at once (busy ones close at
/// their checkin): first `max_db_connections`, then the fixed budget.
#[tokio::test]
async fn lowered_limits_close_idle_servers() {
    let pg = pg();
    let (_dir, path, proxy) = from_file(&["rl_lower"], 5, "").await;
    let clients = futures_util::future::join_all((0..4).map(|_| proxy.client("rl_lower"))).await;
    for c in &clients {
        c.batch_execute("BEGIN; SELECT 1").await.unwrap();
    }
    for c in &clients {
        c.batch_execute("COMMIT").await.unwrap();
    }
    let admin = pg.admin().await;
    assert_eq!(
        server_conns(&admin, "rl_lower").await,
        4,
        "four idle servers"
    );
    let lowered = |text: String| async {
        std::fs::write(&path, text).unwrap();
        pgsluice::reload::reload(&proxy.shared).unwrap();
    };
    lowered(config(pg, &["rl_lower"], 5, "max_db_connections = 3")).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            server_conns(&admin, "rl_lower").await == 3
        })
        .await,
        "max_db_connections = 3: {} servers",
        server_conns(&admin, "rl_lower").await
    );
    lowered(
        config(pg, &["rl_lower"], 5, "max_db_connections = 3")
            .replace("max_server_connections = 40", "max_server_connections = 2"),
    )
    .await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            server_conns(&admin, "rl_lower").await == 2
        })
        .await,
        "a fixed budget of 2: {} servers",
        server_conns(&admin, "rl_lower").await
    );
    for c in &clients {
        assert_eq!(scalar(c, "SELECT 1").await, "1");
    }
    assert!(server_conns(&admin, "rl_lower").await <= 2);
}

/// Session-mode clients of a removed database leave too, at their next transaction
/// boundary: one idle between transactions is closed at once with 57P01, and its server
/// with it. (A session-mode client reaches no request boundary of its own after its first,
/// so it once kept its server, and its access, until it disconnected.)
#[tokio::test]
async fn a_removed_database_closes_its_session_mode_clients() {
    let pg = pg();
    let extra = "pool_mode = \"session\"";
    let (_dir, path, proxy) = from_file(&["rl_sess_keep", "rl_sess_gone"], 2, extra).await;
    let keep = proxy.client("rl_sess_keep").await;
    let gone = proxy.client("rl_sess_gone").await;
    assert_eq!(scalar(&gone, "SELECT 1").await, "1");
    std::fs::write(&path, config(pg, &["rl_sess_keep"], 2, extra)).unwrap();
    pgsluice::reload::reload(&proxy.shared).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async { gone.is_closed() }).await,
        "the idle session-mode client is closed"
    );
    let e = gone.simple_query("SELECT 1").await.unwrap_err();
    assert!(
        e.as_db_error().is_none_or(|d| d.code().code() == "57P01"),
        "{e}"
    );
    let admin = pg.admin().await;
    let backends = || async {
        let n: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = 'rl_sess_gone'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        n
    };
    assert!(
        eventually(Duration::from_secs(5), || async { backends().await == 0 }).await,
        "its server is closed"
    );
    assert_eq!(scalar(&keep, "SELECT 1").await, "1");
}

/// Clients queued for a removed database's pool leave at once with 57P01, rather than
/// waiting out query_wait_timeout (no server opens for a removed pool again); the client
/// holding its server finishes its transaction first.
#[tokio::test]
async fn a_removed_database_lets_its_queued_clients_go() {
    let pg = pg();
    let (_dir, path, proxy) = from_file(&["rl_q_keep", "rl_q_gone"], 1, "").await;
    let holder = proxy.client("rl_q_gone").await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let queued = proxy.client("rl_q_gone").await;
    let waiting = tokio::spawn(async move { queued.simple_query("SELECT 2").await.err() });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    std::fs::write(&path, config(pg, &["rl_q_keep"], 1, "")).unwrap();
    pgsluice::reload::reload(&proxy.shared).unwrap();
    let e = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the queued client is let go")
        .unwrap()
        .expect("its query did not run");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        e.as_db_error().is_none_or(|d| d.code().code() == "57P01"),
        "{e}"
    );
    // The holder's transaction ends normally; then it leaves too.
    holder.batch_execute("COMMIT").await.unwrap();
    let e = holder.simple_query("SELECT 3").await.unwrap_err();
    assert!(
        e.as_db_error().is_none_or(|d| d.code().code() == "57P01"),
        "{e}"
    );
    let keep = proxy.client("rl_q_keep").await;
    assert_eq!(scalar(&keep, "SELECT 1").await, "1");
}

/// A database removed by one reload and added back at another address by the next: its
/// pool (with the servers it may still lend, and the budget it counts against) remains
/// from before, so, as for a database whose address changes in one reload, this needs a
/// restart. Added back unchanged, it is served again.
#[tokio::test]
async fn a_database_removed_then_added_elsewhere_needs_a_restart() {
    let pg = pg();
    let (_dir, path, proxy) = from_file(&["rl_move_keep", "rl_move"], 2, "").await;
    let c = proxy.client("rl_move").await;
    assert_eq!(scalar(&c, "SELECT 1").await, "1");
    drop(c);
    std::fs::write(&path, config(pg, &["rl_move_keep"], 2, "")).unwrap();
    pgsluice::reload::reload(&proxy.shared).unwrap();
    let moved = config(pg, &["rl_move_keep", "rl_move"], 2, "").replace(
        &format!(
            "[databases.rl_move]\nhost = \"127.0.0.1\"\nport = {}",
            pg.port
        ),
        "[databases.rl_move]\nhost = \"127.0.0.1\"\nport = 1",
    );
    assert!(moved.contains("port = 1\n"));
    std::fs::write(&path, moved).unwrap();
    let e = pgsluice::reload::reload(&proxy.shared).unwrap_err();
    assert!(
        e.contains("databases.rl_move") && e.contains("restart"),
        "{e}"
    );
    std::fs::write(&path, config(pg, &["rl_move_keep", "rl_move"], 2, "")).unwrap();
    pgsluice::reload::reload(&proxy.shared).unwrap();
    let c = proxy.client("rl_move").await;
    assert_eq!(scalar(&c, "SELECT 1").await, "1");
}

/// A client that stays busy (it never parks, so never starts its serving loop again)
/// waits with a reloaded `query_wait_timeout` from its next transaction on, as a new
/// client does.
#[tokio::test]
async fn a_busy_client_waits_with_the_reloaded_query_wait_timeout() {
    let pg = pg();
    let (_dir, path, proxy) = from_file(&["rl_busywait"], 1, "").await;
    let busy = proxy.client("rl_busywait").await;
    // Its first transaction after login parks it; the next ones, close together, do not.
    for _ in 0..3 {
        assert_eq!(scalar(&busy, "SELECT 1").await, "1");
    }
    std::fs::write(
        &path,
        config(pg, &["rl_busywait"], 1, "").replace("\"30s\"", "\"1s\""),
    )
    .unwrap();
    pgsluice::reload::reload(&proxy.shared).unwrap();
    let holder = proxy.client("rl_busywait").await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let started = std::time::Instant::now();
    let e = busy.batch_execute("SELECT 2").await.unwrap_err();
    let waited = started.elapsed();
    assert_eq!(code(&e), "53300", "{e}");
    assert!(
        waited < Duration::from_secs(4),
        "timed out after {waited:?}"
    );
    holder.batch_execute("COMMIT").await.unwrap();
}
