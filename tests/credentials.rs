//! Where passwords come from: `auth_file` (PgBouncer's userlist.txt format), `env:` and
//! `file:` secrets, a rotated secret file picked up by a reload, and the upstream salted
//! password derived once for many server logins. Against a real PostgreSQL.
mod common;
use common::pg::free_port;
use common::*;

use std::process::{Command, Stdio};
use std::time::Duration;

const STEP: Duration = Duration::from_secs(15);

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

/// The verifier PostgreSQL stores for a role (what an operator copies into auth_file).
async fn stored_verifier(role: &str) -> String {
    pg().admin()
        .await
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            &[&role],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn auth_file_with_a_plain_password_and_the_servers_own_verifier() {
    let pg = pg();
    pg.create_app("cr_file").await;
    pg.create_app("cr_file_v").await;
    let verifier = stored_verifier("cr_file_v").await;
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("userlist.txt");
    std::fs::write(
        &users,
        format!("; users\n\"cr_file\" \"cr_file-pw\"\n\"cr_file_v\" \"{verifier}\"\n"),
    )
    .unwrap();
    let proxy = Proxy::start(&format!(
        "auth_file = {:?}\nadmin_users = [\"cr_file\"]\n[budget]\nmax_server_connections = 20\n[databases.cr_file]\nhost = \"127.0.0.1\"\nport = {p}\n[databases.cr_file_v]\nhost = \"127.0.0.1\"\nport = {p}\n",
        users.display().to_string(),
        p = pg.port
    ))
    .await;
    // An auth_file user may be an admin; SHOW USERS lists the file's users; SHOW CONFIG
    // shows where passwords come from, never a password.
    let console = login(&proxy, "cr_file", "cr_file-pw", "pgbouncer")
        .await
        .unwrap();
    let mut names = Vec::new();
    for m in console.simple_query("SHOW USERS").await.unwrap() {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            names.push(r.get(0).unwrap().to_owned());
        }
    }
    assert_eq!(names, ["cr_file", "cr_file_v"]);
    let mut config = String::new();
    for m in console.simple_query("SHOW CONFIG").await.unwrap() {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            config.push_str(&format!(
                "{}={}\n",
                r.get(0).unwrap(),
                r.get(1).unwrap_or("")
            ));
        }
    }
    assert!(
        config.contains(&format!("auth_file={}", users.display())),
        "{config}"
    );
    assert!(
        !config.contains("cr_file-pw") && !config.contains(&verifier),
        "{config}"
    );
    // A plain password checks the client and logs in upstream.
    let c = login(&proxy, "cr_file", "cr_file-pw", "cr_file")
        .await
        .unwrap();
    assert_eq!(scalar(&c, "SELECT current_user").await, "cr_file");
    // The server's own verifier: no password anywhere in pgsluice, passthrough logs in.
    let c = login(&proxy, "cr_file_v", "cr_file_v-pw", "cr_file_v")
        .await
        .unwrap();
    assert_eq!(scalar(&c, "SELECT current_user").await, "cr_file_v");
    for (user, db) in [
        ("cr_file", "cr_file"),
        ("cr_file_v", "cr_file_v"),
        ("cr_nobody", "cr_file"),
    ] {
        let e = login(&proxy, user, "wrong", db).await.unwrap_err();
        assert_eq!(code(&e), "28P01", "{user}: {e}");
    }
}

#[tokio::test]
async fn a_verifier_from_elsewhere_cannot_log_in_upstream_and_says_why() {
    let pg = pg();
    pg.create_app("cr_other_v").await;
    // The same password, but a verifier with another salt than the server's.
    let verifier = postgres_protocol::password::scram_sha_256(b"cr_other_v-pw");
    let proxy = Proxy::start(&format!(
        "[budget]\nmax_server_connections = 20\n[databases.cr_other_v]\nhost = \"127.0.0.1\"\nport = {}\n[users.cr_other_v]\npassword = \"{verifier}\"\n",
        pg.port
    ))
    .await;
    let e = login(&proxy, "cr_other_v", "cr_other_v-pw", "cr_other_v")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "08006", "{e}");
    assert!(
        message(&e).contains("another salt or iteration count"),
        "{}",
        message(&e)
    );
}

#[tokio::test]
async fn file_secrets_rotate_on_reload() {
    let pg = pg();
    pg.create_app("cr_rotate").await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("db-password");
    std::fs::write(&secret, "cr_rotate-pw\n").unwrap();
    let path = dir.path().join("pgsluice.toml");
    std::fs::write(
        &path,
        format!(
            "pool_size = 4\n[budget]\nmax_server_connections = 20\n[databases.cr_rotate]\nhost = \"127.0.0.1\"\nport = {}\n[users.cr_rotate]\npassword = \"file:{}\"\n",
            pg.port,
            secret.display()
        ),
    )
    .unwrap();
    let proxy = Proxy::start_file(&path).await;
    let old = login(&proxy, "cr_rotate", "cr_rotate-pw", "cr_rotate")
        .await
        .unwrap();
    assert_eq!(scalar(&old, "SELECT 1").await, "1");

    // Rotate: the database first, then the file, then RELOAD.
    let admin = pg.admin().await;
    admin
        .batch_execute("ALTER ROLE cr_rotate PASSWORD 'cr_rotate-new'")
        .await
        .unwrap();
    std::fs::write(&secret, "cr_rotate-new\n").unwrap();
    pgsluice::reload::reload(&proxy.shared).expect("the new secret reloads");

    let e = login(&proxy, "cr_rotate", "cr_rotate-pw", "cr_rotate")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "28P01", "the old password no longer works: {e}");
    let new = login(&proxy, "cr_rotate", "cr_rotate-new", "cr_rotate")
        .await
        .unwrap();
    // New server connections log in with the new password: hold two transactions so a
    // second server opens after the rotation.
    old.batch_execute("BEGIN").await.unwrap();
    new.batch_execute("BEGIN").await.unwrap();
    assert_eq!(scalar(&new, "SELECT 2").await, "2");
    assert_eq!(
        scalar(&old, "SELECT 3").await,
        "3",
        "clients logged in before keep working"
    );
    new.batch_execute("COMMIT").await.unwrap();
    old.batch_execute("COMMIT").await.unwrap();
    assert!(server_conns(&admin, "cr_rotate").await >= 2);

    // A secret file that disappears: the reload is refused, naming the key.
    std::fs::remove_file(&secret).unwrap();
    let e = pgsluice::reload::reload(&proxy.shared).unwrap_err();
    assert!(
        e.starts_with("users.cr_rotate.password: cannot read secret file "),
        "{e}"
    );
    login(&proxy, "cr_rotate", "cr_rotate-new", "cr_rotate")
        .await
        .expect("the old configuration stays");
}

#[tokio::test]
async fn many_server_logins_derive_the_salted_password_once() {
    let pg = pg();
    pg.create_app("cr_salted").await;
    let proxy = app_proxy("cr_salted", "pool_size = 6").await;
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(proxy.client("cr_salted").await);
    }
    for c in &clients {
        c.batch_execute("BEGIN").await.unwrap();
    }
    for c in &clients {
        assert_eq!(scalar(c, "SELECT 1").await, "1");
    }
    let admin = pg.admin().await;
    assert_eq!(server_conns(&admin, "cr_salted").await, 6);
    assert_eq!(
        proxy.shared.pools.keys.derivations(),
        1,
        "six SCRAM logins upstream, one PBKDF2"
    );
    let text = String::from_utf8(pgsluice::metrics::scrape(&proxy.shared)).unwrap();
    assert!(
        text.contains("\npgsluice_scram_key_derivations_total 1\n"),
        "{text}"
    );
}

async fn app_proxy(name: &str, top: &str) -> Proxy {
    Proxy::start(&app_config(pg(), name, top)).await
}

/// `env:` secrets in the real binary: the value comes from the variable; a missing one is
/// a configuration error that names the key (exit status 2), never the value.
#[tokio::test]
async fn env_secrets_in_the_binary() {
    let pg = pg();
    pg.create_app("cr_env").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgsluice.toml");
    let port = free_port();
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:{port}\"\n[budget]\nmax_server_connections = 5\n[databases.cr_env]\nhost = \"127.0.0.1\"\nport = {}\n[users.cr_env]\npassword = \"env:CR_ENV_DB_PASSWORD\"\n",
            pg.port
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pgsluice"))
        .arg("--check-config")
        .arg(&path)
        .env_remove("CR_ENV_DB_PASSWORD")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("users.cr_env.password: environment variable CR_ENV_DB_PASSWORD is not set"),
        "{err}"
    );

    let mut child = Command::new(env!("CARGO_BIN_EXE_pgsluice"))
        .arg("--config")
        .arg(&path)
        .env("CR_ENV_DB_PASSWORD", "cr_env-pw")
        .env("PGSLUICE_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let up = eventually(Duration::from_secs(10), || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    let conn = format!("host=127.0.0.1 port={port} user=cr_env password=cr_env-pw dbname=cr_env");
    let result = if up {
        match tokio::time::timeout(STEP, try_connect(&conn)).await {
            Ok(Ok(c)) => Ok(scalar(&c, "SELECT current_user").await),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".into()),
        }
    } else {
        Err("pgsluice did not start".into())
    };
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    assert_eq!(result.as_deref(), Ok("cr_env"));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        !log.contains("cr_env-pw"),
        "the secret is never logged:\n{log}"
    );
}

/// The recipe for a server whose pg_authid cannot be read (Amazon RDS): make the verifier
/// with `pgsluice verifier`, set it on the role, put the same verifier in auth_file. No
/// plain-text password is stored anywhere, and passthrough logs in upstream.
#[tokio::test]
async fn a_verifier_made_by_pgsluice_serves_both_sides() {
    use std::io::Write;
    let pg = pg();
    pg.create_app("cr_recipe").await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgsluice"))
        .arg("verifier")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"cr recipe pw\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let verifier = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(verifier.starts_with("SCRAM-SHA-256$4096:"), "{verifier}");
    let admin = pg.admin().await;
    admin
        .batch_execute(&format!("ALTER ROLE cr_recipe PASSWORD '{verifier}'"))
        .await
        .unwrap();
    // The server takes the verifier as it is: the password works directly.
    connect(&pg.url("cr_recipe", "cr%20recipe%20pw", "cr_recipe")).await;

    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("userlist.txt");
    std::fs::write(&users, format!("\"cr_recipe\" \"{verifier}\"\n")).unwrap();
    let proxy = Proxy::start(&format!(
        "auth_file = {:?}\n[budget]\nmax_server_connections = 20\n[databases.cr_recipe]\nhost = \"127.0.0.1\"\nport = {}\n",
        users.display().to_string(),
        pg.port
    ))
    .await;
    let conn = format!(
        "host=127.0.0.1 port={} user=cr_recipe password='cr recipe pw' dbname=cr_recipe",
        proxy.addr.port()
    );
    let c = tokio::time::timeout(STEP, try_connect(&conn))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(scalar(&c, "SELECT current_user").await, "cr_recipe");
    // Empty input is refused.
    let out = Command::new(env!("CARGO_BIN_EXE_pgsluice"))
        .arg("verifier")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
