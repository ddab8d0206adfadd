//! The admin console against a real PostgreSQL, through tokio-postgres (simple protocol) and
//! psql: every SHOW command's columns, and values checked against what the pools hold.

mod common;
use std::collections::HashMap;
use std::time::Duration;

use common::*;
use tokio_postgres::{Client, SimpleQueryMessage};

/// An app `name` whose user is an admin.
async fn admin_app(name: &str, top: &str) -> Proxy {
    app(name, &format!("admin_users = \"{name}\"\n{top}")).await
}

async fn console(proxy: &Proxy, name: &str) -> Client {
    connect(&proxy.conn(name, &format!("{name}-pw"), "pgbouncer")).await
}

/// Column names and rows (as maps) of a SHOW command.
async fn show(c: &Client, sql: &str) -> (Vec<String>, Vec<HashMap<String, Option<String>>>) {
    let mut columns = Vec::new();
    let mut rows = Vec::new();
    for m in c
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
    {
        match m {
            SimpleQueryMessage::RowDescription(cols) => {
                columns = cols.iter().map(|c| c.name().to_owned()).collect();
            }
            SimpleQueryMessage::Row(r) => {
                let mut row = HashMap::new();
                for (i, col) in r.columns().iter().enumerate() {
                    row.insert(col.name().to_owned(), r.get(i).map(str::to_owned));
                }
                rows.push(row);
            }
            _ => {}
        }
    }
    (columns, rows)
}

fn field<'a>(row: &'a HashMap<String, Option<String>>, name: &str) -> &'a str {
    row.get(name)
        .unwrap_or_else(|| panic!("no column {name}"))
        .as_deref()
        .unwrap_or("NULL")
}

fn row_of<'a>(
    rows: &'a [HashMap<String, Option<String>>],
    column: &str,
    value: &str,
) -> &'a HashMap<String, Option<String>> {
    rows.iter()
        .find(|r| field(r, column) == value)
        .unwrap_or_else(|| panic!("no row with {column} = {value}"))
}

fn cols(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn non_admin_users_are_refused() {
    let proxy = app("a_denied", "").await;
    let e = try_connect(&proxy.conn("a_denied", "a_denied-pw", "pgbouncer"))
        .await
        .unwrap_err();
    assert_eq!(code(&e), "42501");
    let e = try_connect(&proxy.conn("a_denied", "a_denied-pw", "pgsluice"))
        .await
        .unwrap_err();
    assert_eq!(code(&e), "42501");
    // A wrong password is still a wrong password.
    let e = try_connect(&proxy.conn("a_denied", "nope", "pgbouncer"))
        .await
        .unwrap_err();
    assert_eq!(code(&e), "28P01");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_pools_matches_the_pool() {
    let proxy = admin_app("a_pools", "pool_size = 2").await;
    let admin = console(&proxy, "a_pools").await;
    let holder = proxy.client("a_pools").await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let idle = proxy.client("a_pools").await;
    idle.simple_query("SELECT 1").await.unwrap(); // opens the second server
    let (columns, rows) = show(&admin, "SHOW POOLS").await;
    assert_eq!(
        columns,
        cols(&[
            "database",
            "user",
            "cl_active",
            "cl_waiting",
            "cl_active_cancel_req",
            "cl_waiting_cancel_req",
            "sv_active",
            "sv_active_cancel",
            "sv_being_canceled",
            "sv_idle",
            "sv_used",
            "sv_tested",
            "sv_login",
            "maxwait",
            "maxwait_us",
            "pool_mode",
            "load_balance_hosts",
        ])
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            let (_, rows) = show(&admin, "SHOW POOLS").await;
            let r = row_of(&rows, "database", "a_pools");
            field(r, "sv_idle") == "1"
        })
        .await
    );
    let (_, rows2) = show(&admin, "SHOW POOLS").await;
    let r = row_of(&rows2, "database", "a_pools");
    let get = |c: &str| field(r, c).to_owned();
    assert_eq!(get("user"), "a_pools");
    assert_eq!(
        get("cl_active"),
        "2",
        "linked and idle clients, as PgBouncer counts"
    );
    assert_eq!(get("cl_waiting"), "0");
    assert_eq!(get("sv_active"), "1");
    assert_eq!(get("sv_idle"), "1");
    assert_eq!(get("sv_login"), "0");
    assert_eq!(get("maxwait"), "0");
    assert_eq!(get("pool_mode"), "transaction");
    assert_eq!(get("load_balance_hosts"), "NULL");
    drop(rows);

    // A third client waits: cl_waiting and maxwait follow.
    holder.batch_execute("SELECT 1").await.unwrap();
    let busy = proxy.client("a_pools").await;
    busy.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let waiter = proxy.client("a_pools").await;
    let w = tokio::spawn(async move { waiter.simple_query("SELECT 1").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, rows) = show(&admin, "SHOW POOLS").await;
    let r = row_of(&rows, "database", "a_pools");
    assert_eq!(field(r, "cl_waiting"), "1");
    let maxwait: u64 = field(r, "maxwait").parse().unwrap();
    assert!((1..30).contains(&maxwait), "maxwait {maxwait}");
    assert_eq!(field(r, "sv_active"), "2");
    busy.batch_execute("COMMIT").await.unwrap();
    w.await.unwrap().unwrap();
    holder.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test]
async fn show_stats_counts_the_workload() {
    let proxy = admin_app("a_stats", "").await;
    let admin = console(&proxy, "a_stats").await;
    let c = proxy.client("a_stats").await;
    for _ in 0..4 {
        c.simple_query("SELECT 1").await.unwrap();
    }
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute("SELECT 1").await.unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    let (columns, rows) = show(&admin, "SHOW STATS").await;
    assert_eq!(
        columns,
        cols(&[
            "database",
            "total_server_assignment_count",
            "total_xact_count",
            "total_query_count",
            "total_received",
            "total_sent",
            "total_xact_time",
            "total_query_time",
            "total_wait_time",
            "total_client_parse_count",
            "total_server_parse_count",
            "total_bind_count",
            "avg_server_assignment_count",
            "avg_xact_count",
            "avg_query_count",
            "avg_recv",
            "avg_sent",
            "avg_xact_time",
            "avg_query_time",
            "avg_wait_time",
            "avg_client_parse_count",
            "avg_server_parse_count",
            "avg_bind_count",
            "total_requests",
        ])
    );
    let r = row_of(&rows, "database", "a_stats");
    // Four autocommit statements and one BEGIN…COMMIT: 5 transactions, 7 queries, and one
    // server lent per transaction (the login's own checkout, which opened the pool's first
    // server, lent it to no one).
    assert_eq!(field(r, "total_xact_count"), "5");
    assert_eq!(field(r, "total_query_count"), "7");
    assert_eq!(field(r, "total_server_assignment_count"), "5");
    assert_eq!(
        field(r, "total_requests"),
        "7",
        "PgBouncer 1.7's name for queries"
    );
    let n = |c: &str| field(r, c).parse::<u64>().unwrap();
    assert!(n("total_received") > 0 && n("total_sent") > 0);
    assert!(n("total_xact_time") >= n("total_query_time"));
    assert_eq!(n("avg_xact_time"), n("total_xact_time") / 5);
    // What pgbouncer_exporter reads at every scrape: the same figures, PgBouncer's names.
    let (columns, rows) = show(&admin, "SHOW STATS_TOTALS").await;
    let names = [
        "server_assignment_count",
        "xact_count",
        "query_count",
        "bytes_received",
        "bytes_sent",
        "xact_time",
        "query_time",
        "wait_time",
        "client_parse_count",
        "server_parse_count",
        "bind_count",
    ];
    let mut expected = vec!["database"];
    expected.extend(names);
    assert_eq!(columns, cols(&expected));
    let t = row_of(&rows, "database", "a_stats");
    assert_eq!(field(t, "xact_count"), "5");
    assert_eq!(field(t, "query_count"), "7");
    assert_eq!(field(t, "bytes_received"), field(r, "total_received"));
    let (columns, rows) = show(&admin, "SHOW STATS_AVERAGES").await;
    assert_eq!(columns, cols(&expected));
    let a = row_of(&rows, "database", "a_stats");
    assert_eq!(field(a, "xact_time"), field(r, "avg_xact_time"));

    // A transaction left idle, then cut off by its client leaving, has no duration in
    // xact_time: its idle time is not taken off query_time either (it used to be, which
    // took query_time down, to 0 here).
    let query_time = |rows: &[HashMap<String, Option<String>>]| {
        field(row_of(rows, "database", "a_stats"), "total_query_time")
            .parse::<u64>()
            .unwrap()
    };
    let before = query_time(&show(&admin, "SHOW STATS").await.1);
    assert!(before > 0);
    let leaver = proxy.client("a_stats").await;
    leaver.batch_execute("BEGIN; SELECT 1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    drop(leaver);
    assert!(
        eventually(Duration::from_secs(5), || async {
            let (_, rows) = show(&admin, "SHOW POOLS").await;
            // Only `c` is left.
            field(row_of(&rows, "database", "a_stats"), "cl_active") == "1"
        })
        .await
    );
    let (_, rows) = show(&admin, "SHOW STATS").await;
    assert!(
        query_time(&rows) >= before,
        "total_query_time {} after {before}",
        query_time(&rows)
    );
}

#[tokio::test]
async fn show_clients_and_servers_link_up() {
    let proxy = admin_app("a_socks", "").await;
    let admin = console(&proxy, "a_socks").await;
    let worker = connect(&format!(
        "{} application_name=worker",
        proxy.conn("a_socks", "a_socks-pw", "a_socks")
    ))
    .await;
    worker.batch_execute("BEGIN").await.unwrap();
    let pid = scalar(&worker, "SELECT pg_backend_pid()").await;
    let idle = proxy.client("a_socks").await;
    let (columns, clients) = show(&admin, "SHOW CLIENTS").await;
    let socket_columns = cols(&[
        "type",
        "user",
        "database",
        "replication",
        "state",
        "addr",
        "port",
        "local_addr",
        "local_port",
        "connect_time",
        "request_time",
        "wait",
        "wait_us",
        "close_needed",
        "ptr",
        "link",
        "remote_pid",
        "tls",
        "application_name",
        "prepared_statements",
        "id",
    ]);
    assert_eq!(columns, socket_columns);
    assert_eq!(clients.len(), 2, "admin sessions are not listed");
    let w = row_of(&clients, "application_name", "worker");
    assert_eq!(field(w, "type"), "C");
    assert_eq!(field(w, "state"), "active");
    assert_eq!(field(w, "user"), "a_socks");
    assert_eq!(field(w, "addr"), "127.0.0.1");
    assert_eq!(field(w, "local_port"), proxy.addr.port().to_string());
    assert!(field(w, "connect_time").ends_with(" UTC"));
    // Kept as a monotonic stamp, shown as wall-clock time: after the login, not 1970.
    let (connected, requested) = (field(w, "connect_time"), field(w, "request_time"));
    assert!(
        requested.ends_with(" UTC") && requested >= connected,
        "{requested} < {connected}"
    );
    let i = clients
        .iter()
        .find(|r| field(r, "application_name").is_empty())
        .unwrap();
    assert_eq!(field(i, "state"), "idle");
    assert_eq!(field(i, "link"), "");
    let (columns, servers) = show(&admin, "SHOW SERVERS").await;
    assert_eq!(columns, socket_columns);
    assert_eq!(servers.len(), 1, "the server lent to the worker");
    let s = &servers[0];
    assert_eq!(field(s, "type"), "S");
    assert_eq!(field(s, "state"), "active");
    assert_eq!(field(s, "remote_pid"), pid, "the backend's own pid");
    assert_eq!(field(s, "port"), pg().port.to_string());
    assert_eq!(field(s, "link"), field(w, "ptr"));
    assert_eq!(field(w, "link"), field(s, "ptr"));
    assert_eq!(field(s, "application_name"), "worker");
    worker.batch_execute("COMMIT").await.unwrap();
    // Back in the pool, the same server is listed idle, lent to no one.
    let (_, servers) = show(&admin, "SHOW SERVERS").await;
    let back = row_of(&servers, "remote_pid", &pid);
    assert_eq!(field(back, "state"), "idle");
    assert_eq!(field(back, "link"), "");
    // And the worker, idle again, links to no server (the link it kept is not shown).
    let (_, clients) = show(&admin, "SHOW CLIENTS").await;
    let w = row_of(&clients, "application_name", "worker");
    assert_eq!(field(w, "state"), "idle");
    assert_eq!(field(w, "link"), "");
    drop(idle);
}

#[tokio::test]
async fn show_databases_users_lists_config_version_state() {
    let proxy = admin_app(
        "a_misc",
        "pool_size = 7\nquery_wait_timeout = \"45s\"\nmax_db_connections = 6\nmax_user_connections = 5\n\
         tcp_user_timeout = \"2.5s\"",
    )
    .await;
    let admin = console(&proxy, "a_misc").await;
    let c = proxy.client("a_misc").await;
    c.simple_query("SELECT 1").await.unwrap();

    let (columns, rows) = show(&admin, "SHOW DATABASES").await;
    assert_eq!(
        columns,
        cols(&[
            "name",
            "host",
            "port",
            "database",
            "force_user",
            "pool_size",
            "min_pool_size",
            "reserve_pool_size",
            "server_lifetime",
            "pool_mode",
            "load_balance_hosts",
            "max_connections",
            "current_connections",
            "max_client_connections",
            "current_client_connections",
            "paused",
            "disabled",
            "reserve_pool",
        ])
    );
    let d = row_of(&rows, "name", "a_misc");
    assert_eq!(field(d, "host"), "127.0.0.1");
    assert_eq!(field(d, "port"), pg().port.to_string());
    assert_eq!(field(d, "database"), "a_misc");
    assert_eq!(field(d, "force_user"), "NULL");
    assert_eq!(field(d, "pool_size"), "7");
    assert_eq!(field(d, "max_connections"), "6", "max_db_connections");
    assert_eq!(field(d, "current_connections"), "1");
    assert_eq!(field(d, "current_client_connections"), "1");
    assert_eq!(field(d, "paused"), "0");

    let (columns, rows) = show(&admin, "SHOW USERS").await;
    assert_eq!(columns[0], "name");
    let u = row_of(&rows, "name", "a_misc");
    assert_eq!(field(u, "max_user_connections"), "5");
    assert_eq!(field(u, "current_connections"), "1");
    assert_eq!(field(u, "current_client_connections"), "1");

    let (columns, rows) = show(&admin, "SHOW LISTS").await;
    assert_eq!(columns, cols(&["list", "items"]));
    let items = |name: &str| field(row_of(&rows, "list", name), "items").to_owned();
    assert_eq!(items("databases"), "1");
    assert_eq!(items("users"), "1");
    assert_eq!(items("pools"), "1");
    assert_eq!(items("used_clients"), "1");
    assert_eq!(items("used_servers"), "1");

    let (columns, rows) = show(&admin, "SHOW CONFIG").await;
    assert_eq!(columns, cols(&["key", "value", "default", "changeable"]));
    let q = row_of(&rows, "key", "query_wait_timeout");
    assert_eq!((field(q, "value"), field(q, "default")), ("45", "120"));
    assert_eq!(field(row_of(&rows, "key", "pool_size"), "value"), "7");
    // In milliseconds, as PgBouncer's tcp_user_timeout.
    let u = row_of(&rows, "key", "tcp_user_timeout");
    assert_eq!((field(u, "value"), field(u, "default")), ("2500", "0"));
    assert_eq!(field(row_of(&rows, "key", "tcp_keepidle"), "value"), "60");
    // What RELOAD may change, and what it refuses (a restart).
    assert_eq!(field(q, "changeable"), "yes");
    assert_eq!(field(row_of(&rows, "key", "listen"), "changeable"), "no");
    assert_eq!(
        field(row_of(&rows, "key", "max_client_conn"), "changeable"),
        "no"
    );
    assert_eq!(
        field(row_of(&rows, "key", "admin_users"), "value"),
        "a_misc"
    );

    let (columns, rows) = show(&admin, "SHOW VERSION").await;
    assert_eq!(columns, cols(&["version"]));
    assert!(field(&rows[0], "version").contains("PgBouncer 1.25.0"));
    assert!(field(&rows[0], "version").starts_with("pgsluice "));

    let (_, rows) = show(&admin, "show state;").await;
    assert_eq!(field(row_of(&rows, "key", "paused"), "value"), "no");

    let (columns, rows) = show(&admin, "SHOW BUDGET").await;
    assert_eq!(columns[..3], cols(&["upstream", "mode", "limit"]));
    let b = &rows[0];
    assert_eq!(field(b, "upstream"), format!("127.0.0.1:{}", pg().port));
    assert_eq!(field(b, "mode"), "fixed");
    assert_eq!(field(b, "limit"), "80");
    assert_eq!(field(b, "in_use"), "1");
}

#[tokio::test]
async fn show_applications_names_the_hoarder() {
    let proxy = admin_app("a_apps", "").await;
    let admin = console(&proxy, "a_apps").await;
    let base = proxy.conn("a_apps", "a_apps-pw", "a_apps");
    let hoarder = connect(&format!("{base} application_name=uploader")).await;
    let web = connect(&format!("{base} application_name=web")).await;
    web.simple_query("SELECT 1").await.unwrap();
    hoarder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (columns, rows) = show(&admin, "SHOW APPLICATIONS").await;
    assert_eq!(
        columns,
        cols(&[
            "database",
            "user",
            "application",
            "cl_active",
            "cl_waiting",
            "cl_idle",
            "sv_idle_in_transaction",
            "max_idle_in_transaction",
            "total_idle_in_transaction",
            "total_wait_time",
            "checkout_timeouts",
        ])
    );
    let u = row_of(&rows, "application", "uploader");
    assert_eq!(field(u, "cl_active"), "1");
    assert_eq!(field(u, "sv_idle_in_transaction"), "1");
    let max: f64 = field(u, "max_idle_in_transaction").parse().unwrap();
    assert!((0.5..5.0).contains(&max), "{max}");
    let w = row_of(&rows, "application", "web");
    assert_eq!(
        (field(w, "cl_idle"), field(w, "sv_idle_in_transaction")),
        ("1", "0")
    );
    hoarder.batch_execute("COMMIT").await.unwrap();
    let (_, rows) = show(&admin, "SHOW APPLICATIONS").await;
    let u = row_of(&rows, "application", "uploader");
    let total: f64 = field(u, "total_idle_in_transaction").parse().unwrap();
    assert!(total >= 0.5, "{total}");
    assert_eq!(field(u, "max_idle_in_transaction"), "0");
}

/// `PAUSE db` while `holder` is inside a transaction: it waits for it, and answers once the
/// holder commits.
async fn pause_behind(admin: &std::sync::Arc<Client>, holder: &Client, db: &str) {
    let a = admin.clone();
    let sql = format!("PAUSE {db}");
    let pause = tokio::spawn(async move { a.simple_query(&sql).await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pause.is_finished(), "PAUSE waits for the open transaction");
    holder.batch_execute("COMMIT").await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), pause)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_waits_for_transactions_and_holds_clients_until_resume() {
    let proxy = admin_app("a_pause", "").await;
    let admin = console(&proxy, "a_pause").await;
    let holder = proxy.client("a_pause").await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let admin = std::sync::Arc::new(admin);
    pause_behind(&admin, &holder, "a_pause").await;
    let (_, rows) = show(&admin, "SHOW DATABASES").await;
    assert_eq!(field(row_of(&rows, "name", "a_pause"), "paused"), "1");
    // A request now waits, and shows as waiting.
    let c = proxy.client("a_pause").await;
    let q = tokio::spawn(async move { c.simple_query("SELECT 42").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!q.is_finished(), "paused: the query waits");
    let (_, rows) = show(&admin, "SHOW POOLS").await;
    assert_eq!(
        field(row_of(&rows, "database", "a_pause"), "cl_waiting"),
        "1"
    );
    let e = admin.simple_query("PAUSE a_pause_nope").await.unwrap_err();
    assert_eq!(code(&e), "3D000");
    admin.simple_query("RESUME a_pause").await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), q)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let e = admin.simple_query("RESUME").await.unwrap_err();
    assert_eq!(message(&e), "pooler is not paused/suspended");
    // PAUSE of everything, then RESUME.
    admin.simple_query("PAUSE").await.unwrap();
    let (_, rows) = show(&admin, "SHOW STATE").await;
    assert_eq!(field(row_of(&rows, "key", "paused"), "value"), "yes");
    admin.simple_query("RESUME").await.unwrap();
    holder.simple_query("SELECT 1").await.unwrap();
}

/// A PAUSE still waiting can be cancelled (psql's Ctrl-C, a script's timeout): it answers
/// 57014 and takes its pause back, as does one whose client leaves; a waiting WAIT_CLOSE can
/// be cancelled too. A PAUSE that answered holds until RESUME.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_pause_can_be_cancelled_and_takes_its_pause_back() {
    let other_db = format!(
        "[databases.a_pc_other]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"a_pcancel\"\n",
        pg().port
    );
    let proxy = admin_app("a_pcancel", &other_db).await;
    let admin = std::sync::Arc::new(console(&proxy, "a_pcancel").await);
    let holder = proxy.client("a_pcancel").await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let paused_db = |admin: std::sync::Arc<Client>, db: &'static str| async move {
        let (_, rows) = show(&admin, "SHOW DATABASES").await;
        field(row_of(&rows, "name", db), "paused").to_owned()
    };
    let paused = |admin: std::sync::Arc<Client>| paused_db(admin, "a_pcancel");
    let other = proxy.client("a_pcancel").await;

    for sql in [
        "PAUSE a_pcancel",
        "PAUSE",
        "RECONNECT a_pcancel; WAIT_CLOSE a_pcancel",
    ] {
        let sql = sql.rsplit("; ").next().unwrap().to_owned();
        if sql.starts_with("WAIT_CLOSE") {
            admin.simple_query("RECONNECT a_pcancel").await.unwrap();
        }
        let waiting = console(&proxy, "a_pcancel").await;
        let token = waiting.cancel_token();
        let run = {
            let sql = sql.clone();
            tokio::spawn(async move { waiting.simple_query(&sql).await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!run.is_finished(), "{sql} waits for the open transaction");
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
        let e = tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .expect("the cancel ends the wait")
            .unwrap()
            .unwrap_err();
        assert_eq!(code(&e), "57014", "{sql}: {e}");
        assert_eq!(paused(admin.clone()).await, "0", "{sql}: no pause left");
        // Nothing is held back.
        tokio::time::timeout(Duration::from_secs(5), other.simple_query("SELECT 1"))
            .await
            .expect("not paused")
            .unwrap();
    }

    // A client that leaves (its socket closes) while its PAUSE waits.
    let (leaving, connection) = tokio_postgres::connect(
        &proxy.conn("a_pcancel", "a_pcancel-pw", "pgbouncer"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    let connection = tokio::spawn(connection);
    let run =
        tokio::spawn(async move { leaving.simple_query("PAUSE a_pcancel").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        paused(admin.clone()).await,
        "1",
        "paused while its PAUSE waits"
    );
    connection.abort();
    let _ = run.await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            paused(admin.clone()).await == "0"
        })
        .await,
        "the pause of a PAUSE whose client left is taken back"
    );

    // One that answers holds, even when a later PAUSE of everything is given up.
    pause_behind(&admin, &holder, "a_pcancel").await;
    assert_eq!(paused(admin.clone()).await, "1");
    let busy = connect(&proxy.conn("a_pcancel", "a_pcancel-pw", "a_pc_other")).await;
    busy.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let waiting = console(&proxy, "a_pcancel").await;
    let token = waiting.cancel_token();
    let run = tokio::spawn(async move { waiting.simple_query("PAUSE").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !run.is_finished(),
        "PAUSE waits for a_pc_other's transaction"
    );
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let e = run.await.unwrap().unwrap_err();
    assert_eq!(code(&e), "57014", "{e}");
    assert_eq!(
        (
            paused(admin.clone()).await,
            paused_db(admin.clone(), "a_pc_other").await
        ),
        ("1".to_owned(), "0".to_owned()),
        "a_pcancel's own PAUSE still holds"
    );
    busy.batch_execute("COMMIT").await.unwrap();
    admin.simple_query("RESUME a_pcancel").await.unwrap();
}

/// Runs `PAUSE db` on a console of its own, in the background: its cancel token and the
/// task that ends with its answer.
async fn pause_in_background(
    proxy: &Proxy,
    name: &str,
    db: &str,
) -> (
    tokio_postgres::CancelToken,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) {
    let c = console(proxy, name).await;
    let token = c.cancel_token();
    let sql = format!("PAUSE {db}");
    (
        token,
        tokio::spawn(async move { c.simple_query(&sql).await.map(|_| ()) }),
    )
}

/// A PAUSE given up (cancelled) after a RESUME and another PAUSE came in the meantime takes
/// nothing back: the pause is the later PAUSE's by then, and it holds and answers. (Taken
/// back, it let servers out while that PAUSE's caller believed the database paused.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_given_up_leaves_a_later_pause_alone() {
    let proxy = admin_app("a_plater", "").await;
    let admin = console(&proxy, "a_plater").await;
    let holder = proxy.client("a_plater").await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let (first_token, first_run) = pause_in_background(&proxy, "a_plater", "a_plater").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    admin.simple_query("RESUME a_plater").await.unwrap();
    let (_, second_run) = pause_in_background(&proxy, "a_plater", "a_plater").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!second_run.is_finished(), "the later PAUSE waits");
    first_token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), first_run)
        .await
        .expect("the first PAUSE ends");
    let (_, rows) = show(&admin, "SHOW DATABASES").await;
    assert_eq!(field(row_of(&rows, "name", "a_plater"), "paused"), "1");
    holder.batch_execute("COMMIT").await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), second_run)
        .await
        .expect("the later PAUSE answers")
        .unwrap()
        .unwrap();
    admin.simple_query("RESUME a_plater").await.unwrap();
}

/// A PAUSE given up takes its own pause back even when another database was resumed in
/// the meantime (the RESUME of another database used to make it leave its own paused,
/// with every client of it queued until someone ran RESUME).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_given_up_after_another_databases_resume_is_taken_back() {
    let name = "a_pother";
    let pg = pg();
    pg.create_app(name).await;
    let proxy = Proxy::start(&format!(
        "{}[databases.a_pother_b]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"{name}\"\n",
        app_config(pg, name, &format!("admin_users = \"{name}\"")),
        pg.port
    ))
    .await;
    let admin = console(&proxy, name).await;
    admin.simple_query("PAUSE a_pother_b").await.unwrap();
    let holder = proxy.client(name).await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let (token, run) = pause_in_background(&proxy, name, "a_pother").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!run.is_finished(), "the PAUSE waits for the transaction");
    admin.simple_query("RESUME a_pother_b").await.unwrap();
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("the PAUSE ends")
        .unwrap()
        .expect_err("a cancelled PAUSE fails");
    assert_eq!(code(&e), "57014", "{e}");
    let (_, rows) = show(&admin, "SHOW DATABASES").await;
    assert_eq!(field(row_of(&rows, "name", name), "paused"), "0");
    holder.batch_execute("COMMIT").await.unwrap();
    let other = proxy.client(name).await;
    let answer = tokio::time::timeout(Duration::from_secs(5), scalar(&other, "SELECT 1"))
        .await
        .expect("the database is not paused");
    assert_eq!(answer, "1");
}

/// Two PAUSEs of one database wait together; the first given up takes nothing back while
/// the other still waits, and that one answers and holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_given_up_leaves_a_pause_still_waiting_alone() {
    let proxy = admin_app("a_ptwo", "").await;
    let admin = console(&proxy, "a_ptwo").await;
    let holder = proxy.client("a_ptwo").await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let (first_token, first_run) = pause_in_background(&proxy, "a_ptwo", "a_ptwo").await;
    let (_, second_run) = pause_in_background(&proxy, "a_ptwo", "a_ptwo").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    first_token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), first_run)
        .await
        .expect("the first PAUSE ends");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!second_run.is_finished(), "the second PAUSE still waits");
    let (_, rows) = show(&admin, "SHOW DATABASES").await;
    assert_eq!(field(row_of(&rows, "name", "a_ptwo"), "paused"), "1");
    holder.batch_execute("COMMIT").await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), second_run)
        .await
        .expect("the second PAUSE answers")
        .unwrap()
        .expect("and succeeds");
    let (_, rows) = show(&admin, "SHOW DATABASES").await;
    assert_eq!(field(row_of(&rows, "name", "a_ptwo"), "paused"), "1");
    admin.simple_query("RESUME a_ptwo").await.unwrap();
}

/// A client queued before PAUSE is not handed the server a finishing transaction returns:
/// once PAUSE answers, nothing runs on the paused database until RESUME. (It used to get
/// that server, and could run after PAUSE had answered.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_back_clients_queued_before_it() {
    let proxy = admin_app("a_pause_q", "pool_size = 1").await;
    let admin = std::sync::Arc::new(console(&proxy, "a_pause_q").await);
    let holder = proxy.client("a_pause_q").await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let c = proxy.client("a_pause_q").await;
    let q =
        tokio::spawn(
            async move { scalar(&c, "SELECT extract(epoch FROM clock_timestamp())").await },
        );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!q.is_finished(), "queued behind the holder");
    pause_behind(&admin, &holder, "a_pause_q").await;
    let paused_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!q.is_finished(), "the queued client waits for RESUME");
    let (_, rows) = show(&admin, "SHOW POOLS").await;
    let pool = row_of(&rows, "database", "a_pause_q");
    assert_eq!(
        (field(pool, "cl_waiting"), field(pool, "sv_active")),
        ("1", "0")
    );
    admin.simple_query("RESUME a_pause_q").await.unwrap();
    let ran_at: f64 = tokio::time::timeout(Duration::from_secs(5), q)
        .await
        .unwrap()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        ran_at > paused_at + 0.4,
        "ran at {ran_at}, PAUSE answered at {paused_at}"
    );
}

/// RESUME gives a paused database's queued clients the room another database took with
/// idle servers while it was paused (one budget of 2 for both).
#[tokio::test]
async fn resume_takes_back_room_held_idle_by_another_database() {
    let pg = pg();
    pg.create_app("a_rs1").await;
    pg.create_app("a_rs2").await;
    let toml = format!(
        "admin_users = \"a_rs1\"\npool_size = 2\nquery_wait_timeout = \"10s\"\n\
         [budget]\nmax_server_connections = 2\n{}{}",
        app_config(pg, "a_rs1", "[budget]").replace("[budget]\n", ""),
        app_config(pg, "a_rs2", "[budget]").replace("[budget]\n", "")
    );
    let proxy = Proxy::start(&toml).await;
    let admin = console(&proxy, "a_rs1").await;
    let c = proxy.client("a_rs1").await; // its login opens a server of a_rs1
    admin.simple_query("PAUSE a_rs1").await.unwrap();
    let q = tokio::spawn(async move { scalar(&c, "SELECT 1").await });
    // a_rs2 takes the whole budget, then leaves both servers idle.
    let (d1, d2) = (proxy.client("a_rs2").await, proxy.client("a_rs2").await);
    d1.batch_execute("BEGIN; SELECT 1").await.unwrap();
    d2.batch_execute("BEGIN; SELECT 1").await.unwrap();
    d1.batch_execute("COMMIT").await.unwrap();
    d2.batch_execute("COMMIT").await.unwrap();
    assert!(!q.is_finished(), "paused");
    let resumed = std::time::Instant::now();
    admin.simple_query("RESUME a_rs1").await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), q)
        .await
        .expect("served after RESUME")
        .unwrap();
    assert!(resumed.elapsed() < Duration::from_secs(2));
}

/// After PAUSE, SHUTDOWN WAIT_FOR_CLIENTS: RESUME still lets the queued clients go, so that
/// they finish and leave (it used to be refused, and they waited for their timeout).
#[tokio::test]
async fn resume_works_while_draining() {
    let proxy = admin_app("a_drain_resume", "").await;
    let admin = console(&proxy, "a_drain_resume").await;
    let c = proxy.client("a_drain_resume").await;
    admin.simple_query("PAUSE").await.unwrap();
    let q = tokio::spawn(async move { scalar(&c, "SELECT 7").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!q.is_finished(), "paused");
    admin
        .simple_query("SHUTDOWN WAIT_FOR_CLIENTS")
        .await
        .unwrap();
    admin.simple_query("RESUME").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), q)
        .await
        .expect("served after RESUME")
        .unwrap();
    assert_eq!(got, "7");
}

#[tokio::test]
async fn errors_keep_the_console_usable() {
    let proxy = admin_app("a_errors", "").await;
    let admin = console(&proxy, "a_errors").await;
    let e = admin.simple_query("SHOW NONSENSE").await.unwrap_err();
    assert_eq!(code(&e), "42601");
    let e = admin.simple_query("DROP TABLE x").await.unwrap_err();
    assert_eq!(code(&e), "42601");
    assert!(message(&e).contains("SHOW HELP"));
    // This proxy was started from a TOML text, not a file: there is nothing to read again.
    let e = admin.simple_query("RELOAD").await.unwrap_err();
    assert_eq!(code(&e), "F0000");
    assert!(message(&e).contains("RELOAD refused, the old configuration stays"));
    let e = admin
        .simple_query("SHUTDOWN WAIT_FOR_SERVERS")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "0A000");
    let e = admin.simple_query("KILL a_errors").await.unwrap_err();
    assert_eq!(code(&e), "0A000");
    // The extended protocol gets an error, not a dropped connection.
    let e = admin.query("SHOW POOLS", &[]).await.unwrap_err();
    assert_eq!(code(&e), "0A000");
    // Drivers' fake settings.
    admin
        .simple_query("SET extra_float_digits = 3")
        .await
        .unwrap();
    let (_, rows) = show(&admin, "SHOW client_encoding").await;
    assert_eq!(field(&rows[0], "client_encoding"), "UTF-8");
    // Still fine.
    let (_, rows) = show(&admin, "SHOW VERSION").await;
    assert_eq!(rows.len(), 1);
    admin.simple_query("").await.unwrap();
}

/// psql, as an operator would use it.
#[tokio::test]
async fn psql_shows_pools() {
    let proxy = admin_app("a_psql", "").await;
    let c = proxy.client("a_psql").await;
    c.simple_query("SELECT 1").await.unwrap();
    let psql = pg().client_bin("psql");
    let port = proxy.addr.port().to_string();
    // psql blocks; the proxy runs on this test's runtime, so run psql on another thread.
    let run = |sql: &'static str| {
        let (psql, port) = (psql.clone(), port.clone());
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new(&psql)
                .args(["-X", "-A", "-F", "|", "-h", "127.0.0.1", "-p", &port])
                .args(["-U", "a_psql", "-d", "pgbouncer", "-c", sql])
                .env("PGPASSWORD", "a_psql-pw")
                .output()
                .expect("psql runs");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        })
    };
    let pools = run("SHOW POOLS").await.unwrap();
    let mut lines = pools.lines();
    assert!(lines
        .next()
        .unwrap()
        .starts_with("database|user|cl_active|cl_waiting|"));
    assert!(lines.next().unwrap().starts_with("a_psql|a_psql|1|0|"));
    let stats = run("SHOW STATS;").await.unwrap();
    assert!(stats.starts_with("database|total_server_assignment_count|"));
}
