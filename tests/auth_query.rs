//! `auth_query` and SCRAM passthrough against a real PostgreSQL: users not in the proxy's
//! configuration log in with the password PostgreSQL has, the proxy logs in upstream as
//! them without knowing it, wrong passwords, unknown and expired roles all fail the same
//! way, and the lookup connection never carries what a client sent (CVE-2025-12819).
mod common;
use common::*;

use std::time::Duration;

/// Upper bound for any single login or query in these tests.
const STEP: Duration = Duration::from_secs(15);

/// A superuser that may read pg_authid with the default query.
const LOOKUP: &str = "aq_lookup";

async fn setup_lookup_role() {
    let admin = pg().admin().await;
    // Several tests share the cluster: create once.
    let _ = admin
        .batch_execute(&format!(
            "CREATE ROLE {LOOKUP} LOGIN SUPERUSER PASSWORD '{LOOKUP}-pw'"
        ))
        .await;
}

/// A proxy for database `db` with no [users] at all: every user comes from auth_query.
async fn proxy(db: &str, extra: &str) -> Proxy {
    setup_lookup_role().await;
    let pg = pg();
    Proxy::start(&format!(
        "auth_user = \"{LOOKUP}\"\nauth_password = \"{LOOKUP}-pw\"\n{extra}\n[budget]\nmax_server_connections = 20\n[databases.{db}]\nhost = \"127.0.0.1\"\nport = {}\n",
        pg.port
    ))
    .await
}

async fn login(
    proxy: &Proxy,
    user: &str,
    password: &str,
    db: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    tokio::time::timeout(STEP, try_connect(&proxy.conn(user, password, db)))
        .await
        .expect("login timed out")
}

fn metric(proxy: &Proxy, line_start: &str) -> f64 {
    let text = String::from_utf8(pgsluice::metrics::scrape(&proxy.shared)).unwrap();
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {line_start}"))
}

#[tokio::test]
async fn passthrough_logs_in_with_no_password_in_the_config() {
    let pg = pg();
    pg.create_app("aq_app").await;
    let proxy = proxy("aq_app", "pool_size = 3").await;
    let c = login(&proxy, "aq_app", "aq_app-pw", "aq_app")
        .await
        .expect("auth_query user logs in");
    assert_eq!(scalar(&c, "SELECT current_user").await, "aq_app");

    // More server connections log in with the keys the first login taught: three
    // transactions at once need three servers.
    let mut clients = vec![c];
    for _ in 0..2 {
        clients.push(
            login(&proxy, "aq_app", "aq_app-pw", "aq_app")
                .await
                .unwrap(),
        );
    }
    for c in &clients {
        c.batch_execute("BEGIN").await.unwrap();
    }
    for c in &clients {
        assert_eq!(scalar(c, "SELECT session_user").await, "aq_app");
    }
    for c in &clients {
        c.batch_execute("COMMIT").await.unwrap();
    }
    let admin = pg.admin().await;
    assert_eq!(server_conns(&admin, "aq_app").await, 3);
    // The only key derived from a password is the lookup role's own, once: the pool's
    // servers logged in with the keys the client's proof revealed.
    assert_eq!(proxy.shared.pools.keys.derivations(), 1);

    // The lookup connection is a server connection too: it counts in the budget.
    let in_use = proxy.shared.pools.budget_snapshots()[0].1.in_use;
    assert_eq!(in_use, 4, "3 pool servers + the lookup connection");
    let lookup_backends: i64 = admin
        .query_one(
            // This test's database only: the other tests' proxies have lookup connections too.
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND application_name = 'pgsluice auth_query' AND datname = 'aq_app'",
            &[&LOOKUP],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(lookup_backends, 1, "one lookup connection, reused");

    // The first login looked the user up; the next ones used the cache.
    assert_eq!(
        metric(
            &proxy,
            "pgsluice_auth_query_lookups_total{result=\"found\"}"
        ),
        1.0
    );
    assert!(
        metric(
            &proxy,
            "pgsluice_auth_query_lookups_total{result=\"cached\"}"
        ) >= 2.0
    );
}

#[tokio::test]
async fn wrong_password_and_unknown_user_fail_alike_with_28p01() {
    let pg = pg();
    pg.create_app("aq_wrong").await;
    let proxy = proxy("aq_wrong", "").await;
    let e = login(&proxy, "aq_wrong", "not-it", "aq_wrong")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "28P01", "{e}");
    assert_eq!(
        message(&e),
        "password authentication failed for user \"aq_wrong\""
    );
    let e = login(&proxy, "aq_nobody", "whatever", "aq_wrong")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "28P01", "{e}");
    assert_eq!(
        message(&e),
        "password authentication failed for user \"aq_nobody\""
    );
    // A role that may not log in is unknown too.
    let admin = pg.admin().await;
    admin
        .batch_execute("CREATE ROLE aq_nologin NOLOGIN PASSWORD 'aq_nologin-pw'")
        .await
        .unwrap();
    let e = login(&proxy, "aq_nologin", "aq_nologin-pw", "aq_wrong")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "28P01", "{e}");
    // The right password still works, and no pool exists for the unknown names.
    login(&proxy, "aq_wrong", "aq_wrong-pw", "aq_wrong")
        .await
        .unwrap();
    let users: Vec<String> = proxy
        .shared
        .pools
        .stats()
        .into_iter()
        .map(|p| p.user)
        .collect();
    assert_eq!(users, ["aq_wrong"]);
    assert_eq!(
        metric(
            &proxy,
            "pgsluice_auth_query_lookups_total{result=\"not_found\"}"
        ),
        2.0
    );
}

#[tokio::test]
async fn an_expired_role_fails_until_its_validity_is_extended() {
    let pg = pg();
    pg.create_app("aq_expired").await;
    let admin = pg.admin().await;
    admin
        .batch_execute("ALTER ROLE aq_expired VALID UNTIL '2001-01-01'")
        .await
        .unwrap();
    let proxy = proxy("aq_expired", "auth_query_cache_ttl = \"200ms\"").await;
    let e = login(&proxy, "aq_expired", "aq_expired-pw", "aq_expired")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "28P01", "{e}");
    assert_eq!(
        message(&e),
        "password authentication failed for user \"aq_expired\"",
        "the same answer as a wrong password"
    );
    admin
        .batch_execute("ALTER ROLE aq_expired VALID UNTIL 'infinity'")
        .await
        .unwrap();
    // The cached answer expires after auth_query_cache_ttl.
    let ok = eventually(Duration::from_secs(5), || async {
        login(&proxy, "aq_expired", "aq_expired-pw", "aq_expired")
            .await
            .is_ok()
    })
    .await;
    assert!(ok, "logs in once the role is valid again");
}

/// CVE-2025-12819: what a client puts in its startup packet (`search_path`,
/// `application_name`, `options`) never reaches the lookup connection. The query below
/// returns the password only when the lookup session has the server's own defaults.
#[tokio::test]
async fn the_lookup_connection_never_carries_client_parameters() {
    let pg = pg();
    pg.create_app("aq_params").await;
    let admin = pg.admin().await;
    admin
        .batch_execute("CREATE SCHEMA IF NOT EXISTS aq_evil")
        .await
        .unwrap();
    let query = "SELECT rolname, CASE WHEN pg_catalog.current_setting('search_path') OPERATOR(pg_catalog.=) '\"$user\", public' AND pg_catalog.current_setting('application_name') OPERATOR(pg_catalog.=) 'pgsluice auth_query' THEN rolpassword END FROM pg_catalog.pg_authid WHERE rolname OPERATOR(pg_catalog.=) $1";
    let proxy = proxy(
        "aq_params",
        &format!("auth_query = {query:?}\ntrack_extra_parameters = [\"work_mem\"]"),
    )
    .await;
    let port = proxy.addr.port();
    let conn = format!(
        "host=127.0.0.1 port={port} user=aq_params password=aq_params-pw dbname=aq_params application_name=evil options='-c search_path=aq_evil -c work_mem=64kB'"
    );
    let c = tokio::time::timeout(STEP, try_connect(&conn))
        .await
        .unwrap()
        .expect("the lookup saw the server's defaults, not the client's");
    // The client's own session does get its parameters.
    assert_eq!(scalar(&c, "SHOW search_path").await, "aq_evil");
    assert_eq!(scalar(&c, "SHOW application_name").await, "evil");
}

/// The setup docs/authentication.md recommends: a non-superuser lookup role that may only
/// call a SECURITY DEFINER function, in one database (`auth_dbname`).
#[tokio::test]
async fn a_security_definer_function_and_a_dedicated_lookup_role() {
    let pg = pg();
    pg.create_app("aq_definer").await;
    let admin = pg.admin().await;
    admin
        .batch_execute(
            "CREATE ROLE aq_auth LOGIN PASSWORD 'aq_auth-pw';
             CREATE SCHEMA aq_auth_fn;
             CREATE FUNCTION aq_auth_fn.lookup(i_username text, OUT usename name, OUT passwd text)
               RETURNS record LANGUAGE sql STABLE SECURITY DEFINER
               SET search_path = pg_catalog, pg_temp
               AS $$ SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END
                     FROM pg_authid WHERE rolname = i_username AND rolcanlogin $$;
             REVOKE ALL ON FUNCTION aq_auth_fn.lookup(text) FROM PUBLIC;
             GRANT USAGE ON SCHEMA aq_auth_fn TO aq_auth;
             GRANT EXECUTE ON FUNCTION aq_auth_fn.lookup(text) TO aq_auth;",
        )
        .await
        .unwrap();
    let proxy = Proxy::start(&format!(
        "auth_user = \"aq_auth\"\nauth_password = \"aq_auth-pw\"\nauth_dbname = \"postgres\"\nauth_query = \"SELECT usename, passwd FROM aq_auth_fn.lookup($1)\"\n[budget]\nmax_server_connections = 20\n[databases.aq_definer]\nhost = \"127.0.0.1\"\nport = {}\n",
        pg.port
    ))
    .await;
    let c = login(&proxy, "aq_definer", "aq_definer-pw", "aq_definer")
        .await
        .expect("logs in through the function");
    assert_eq!(scalar(&c, "SELECT current_user").await, "aq_definer");
    let e = login(&proxy, "aq_definer", "nope", "aq_definer")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "28P01");
    // The lookup role cannot read pg_authid itself.
    let direct = connect(&format!(
        "host=127.0.0.1 port={} user=aq_auth password=aq_auth-pw dbname=postgres",
        pg.port
    ))
    .await;
    assert!(direct
        .simple_query("SELECT rolpassword FROM pg_authid")
        .await
        .is_err());
}

#[tokio::test]
async fn a_failing_lookup_is_08006_and_says_nothing_about_the_user() {
    let pg = pg();
    pg.create_app("aq_fail").await;
    setup_lookup_role().await;
    let proxy = Proxy::start(&format!(
        "auth_user = \"{LOOKUP}\"\nauth_password = \"wrong\"\n[budget]\nmax_server_connections = 20\n[databases.aq_fail]\nhost = \"127.0.0.1\"\nport = {}\n",
        pg.port
    ))
    .await;
    for user in ["aq_fail", "aq_nobody_at_all"] {
        let e = login(&proxy, user, "aq_fail-pw", "aq_fail")
            .await
            .unwrap_err();
        assert_eq!(code(&e), "08006", "{e}");
        assert_eq!(
            message(&e),
            "pgsluice could not look up the password (auth_query failed)"
        );
    }
    assert_eq!(
        metric(
            &proxy,
            "pgsluice_errors_total{kind=\"auth_lookup_failed\",side=\"server\"}"
        ),
        2.0
    );
    // Nothing is left counted against the budget.
    assert_eq!(proxy.shared.pools.budget_snapshots()[0].1.in_use, 0);
}

/// A user listed in [users] without a password (for its pool settings) is looked up too,
/// and its settings apply.
#[tokio::test]
async fn a_listed_user_without_password_is_looked_up() {
    let pg = pg();
    pg.create_app("aq_listed").await;
    let proxy = proxy("aq_listed", "[users.aq_listed]\npool_size = 1").await;
    let c = login(&proxy, "aq_listed", "aq_listed-pw", "aq_listed")
        .await
        .unwrap();
    assert_eq!(scalar(&c, "SELECT 1").await, "1");
    assert_eq!(proxy.shared.pools.stats()[0].pool_size, 1);
}

/// A lookup cut off mid-query (its client's login timed out) must not leave its reply for
/// the next lookup: user aq_cut_y's login with aq_cut_x's password fails. (The slow lookup
/// for aq_cut_slow answers with aq_cut_x's row after 1.5 s; the login gives up at 1 s and
/// aq_cut_y's lookup starts at once, on the same connection before the fix.)
#[tokio::test]
async fn a_lookup_cut_off_leaves_nothing_for_the_next() {
    let pg = pg();
    pg.create_app("aq_cut").await;
    let admin = pg.admin().await;
    admin
        .batch_execute(
            "CREATE ROLE aq_cut_x LOGIN PASSWORD 'x-secret'; CREATE ROLE aq_cut_y LOGIN PASSWORD 'y-secret'",
        )
        .await
        .unwrap();
    let query = "SELECT usename, passwd FROM pg_shadow WHERE usename = $1 OR \
                 ($1 = 'aq_cut_slow' AND usename = 'aq_cut_x' AND pg_sleep(1.5) IS NOT NULL)";
    let proxy = proxy(
        "aq_cut",
        &format!("client_login_timeout = \"1s\"\nauth_query = \"{query}\""),
    )
    .await;
    // Opens the lookup connection.
    login(&proxy, "aq_cut_x", "x-secret", "aq_cut")
        .await
        .expect("x logs in");
    let e = login(&proxy, "aq_cut_slow", "x-secret", "aq_cut")
        .await
        .expect_err("the slow lookup's login times out");
    assert_eq!(code(&e), "08P01", "{e}");
    let e = login(&proxy, "aq_cut_y", "x-secret", "aq_cut")
        .await
        .expect_err("y's login with x's password must fail");
    assert_eq!(code(&e), "28P01", "{e}");
    login(&proxy, "aq_cut_y", "y-secret", "aq_cut")
        .await
        .expect("y logs in with its own password");
}

/// A listed user's own `auth_type` applies to the password auth_query finds for it: under
/// a top-level `auth_type = "trust"`, a user listed with SCRAM still needs its password.
#[tokio::test]
async fn a_listed_users_auth_type_applies_to_its_looked_up_password() {
    let pg = pg();
    pg.create_app("aq_strict").await;
    let proxy = proxy(
        "aq_strict",
        "auth_type = \"trust\"\n[users.aq_strict]\nauth_type = \"scram-sha-256\"",
    )
    .await;
    let e = login(&proxy, "aq_strict", "not-the-password", "aq_strict")
        .await
        .expect_err("a wrong password is refused");
    assert_eq!(code(&e), "28P01", "{e}");
    let c = login(&proxy, "aq_strict", "aq_strict-pw", "aq_strict")
        .await
        .expect("its password is checked with SCRAM");
    assert_eq!(scalar(&c, "SELECT current_user").await, "aq_strict");
}

/// One user name on two PostgreSQL servers with different passwords (auth_query on each):
/// what a login to one teaches about logging in upstream is kept for that server only, so
/// logins to the other do not break its new server connections.
#[tokio::test]
async fn passthrough_keys_are_kept_per_upstream_server() {
    setup_lookup_role().await;
    let one = pg();
    let two = TestPostgres::start(&[]);
    for (pg, pw) in [(one, "first-pw"), (&two, "second-pw")] {
        let admin = pg.admin().await;
        for sql in [
            format!(
                "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{LOOKUP}') THEN \
                 CREATE ROLE {LOOKUP} LOGIN SUPERUSER PASSWORD '{LOOKUP}-pw'; END IF; END $$"
            ),
            format!("CREATE ROLE aq_twice LOGIN PASSWORD '{pw}'"),
            "CREATE DATABASE aq_twice OWNER aq_twice".to_owned(),
        ] {
            admin.batch_execute(&sql).await.unwrap();
        }
    }
    let proxy = Proxy::start(&format!(
        "auth_user = \"{LOOKUP}\"\nauth_password = \"{LOOKUP}-pw\"\npool_size = 3\n\
         [budget]\nmax_server_connections = 20\n\
         [databases.aq_twice_one]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"aq_twice\"\n\
         [databases.aq_twice_two]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"aq_twice\"\n",
        one.port, two.port
    ))
    .await;
    let a = login(&proxy, "aq_twice", "first-pw", "aq_twice_one")
        .await
        .expect("logs in to the first server");
    let a2 = login(&proxy, "aq_twice", "first-pw", "aq_twice_one")
        .await
        .unwrap();
    let b = login(&proxy, "aq_twice", "second-pw", "aq_twice_two")
        .await
        .expect("logs in to the second server");
    assert_eq!(scalar(&b, "SELECT 2").await, "2");
    // A second server of the first database, opened after the login to the second,
    // logs in with what the logins to the first taught.
    a.batch_execute("BEGIN; SELECT 1").await.unwrap();
    a2.batch_execute("BEGIN; SELECT 1").await.unwrap();
    a.batch_execute("COMMIT").await.unwrap();
    a2.batch_execute("COMMIT").await.unwrap();
}

/// A lookup still running when a reload lands built its answer with the old configuration;
/// it must not put that answer back into the cache the reload emptied. Here the old
/// `auth_type = "trust"` would otherwise let any password in for `auth_query_cache_ttl`.
#[tokio::test]
async fn a_lookup_racing_a_reload_does_not_cache_the_old_configuration() {
    setup_lookup_role().await;
    let pg = pg();
    pg.create_app("aq_race").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgsluice.toml");
    let file = |auth_type: &str| {
        format!(
            "auth_type = \"{auth_type}\"\nauth_user = \"{LOOKUP}\"\nauth_password = \"{LOOKUP}-pw\"\n\
             auth_query = \"WITH slow AS MATERIALIZED (SELECT pg_sleep(1.5)) SELECT rolname, rolpassword FROM pg_catalog.pg_authid, slow WHERE rolname = $1\"\n\
             auth_query_cache_ttl = \"10m\"\n[budget]\nmax_server_connections = 20\n\
             [databases.aq_race]\nhost = \"127.0.0.1\"\nport = {}\n",
            pg.port
        )
    };
    std::fs::write(&path, file("trust")).unwrap();
    let proxy = Proxy::start_file(&path).await;
    let conn = proxy.conn("aq_race", "anything", "aq_race");
    let racing = tokio::spawn(async move { tokio::time::timeout(STEP, try_connect(&conn)).await });

    // Reload to SCRAM while the lookup sleeps on the server.
    let admin = pg.admin().await;
    let running = eventually(STEP, || async {
        let n: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgsluice auth_query' AND state = 'active' AND query LIKE '%pg_sleep%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        n == 1
    })
    .await;
    assert!(running, "the lookup never started");
    std::fs::write(&path, file("scram-sha-256")).unwrap();
    pgsluice::reload::reload(&proxy.shared).expect("the new file reloads");
    // The racing login ran under the configuration it started with: trust let it in, and
    // then no server took it (trust teaches pgsluice no upstream password), which is not
    // what is under test.
    let _ = racing.await.unwrap().expect("login timed out");

    let e = login(&proxy, "aq_race", "not-the-password", "aq_race")
        .await
        .expect_err("after the reload a wrong password is refused");
    assert_eq!(code(&e), "28P01", "{e}");
    let c = login(&proxy, "aq_race", "aq_race-pw", "aq_race")
        .await
        .expect("its password passes SCRAM");
    assert_eq!(scalar(&c, "SELECT current_user").await, "aq_race");
}
