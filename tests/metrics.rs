//! The HTTP endpoint and the metrics, against a real PostgreSQL: a known workload, exact
//! values, `/metrics` parsed with a Prometheus text-format parser.

mod common;
use std::time::Duration;

use common::pg::free_port;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::{AsyncMessage, NoTls};

/// A proxy for app `name` with the HTTP endpoint on a free port; `top` holds top-level keys.
async fn proxy(name: &str, top: &str) -> (Proxy, u16) {
    let port = free_port();
    let proxy = app(
        name,
        &format!("{top}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    )
    .await;
    assert!(
        eventually(Duration::from_secs(5), || async move {
            get(port, "/healthz").await.is_ok()
        })
        .await,
        "the HTTP endpoint did not come up"
    );
    (proxy, port)
}

/// GET over HTTP/1.1: (status, body).
async fn get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}

/// One parsed scrape.
struct Scrape(prometheus_parse::Scrape);

impl Scrape {
    async fn take(port: u16) -> Scrape {
        let (status, body) = get(port, "/metrics").await.expect("scrape");
        assert_eq!(status, 200);
        let lines = body.lines().map(|l| Ok(l.to_owned()));
        Scrape(prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text format"))
    }

    /// The value of the one sample of `name` whose labels include `labels`; 0 if none.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<f64> = self
            .0
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                other => panic!("{name}: not a single value: {other:?}"),
            })
            .collect();
        assert!(
            found.len() <= 1,
            "{name} {labels:?}: {} samples",
            found.len()
        );
        found.first().copied().unwrap_or(0.0)
    }

    fn has(&self, name: &str) -> bool {
        self.0.samples.iter().any(|s| s.metric == name)
    }
}

fn pool(name: &str) -> [(&'static str, &str); 2] {
    [("database", name), ("user", name)]
}

/// Connects with an application_name.
async fn client_as(proxy: &Proxy, name: &str, app: &str) -> tokio_postgres::Client {
    connect(&format!(
        "{} application_name={app}",
        proxy.conn(name, &format!("{name}-pw"), name)
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_checkout_timeouts_for_the_right_pool_and_application() {
    let (proxy, port) = proxy("m_timeout", "pool_size = 1\nquery_wait_timeout = \"300ms\"").await;
    let holder = client_as(&proxy, "m_timeout", "holder").await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let reporter = client_as(&proxy, "m_timeout", "reporter").await;
    for _ in 0..3 {
        let e = reporter.simple_query("SELECT 1").await.unwrap_err();
        assert_eq!(code(&e), "53300");
    }
    let s = Scrape::take(port).await;
    let p = pool("m_timeout");
    let app = |a: &'static str| [p[0], p[1], ("application", a)];
    assert_eq!(s.value("pgsluice_checkout_timeouts_total", &p), 3.0);
    assert_eq!(
        s.value(
            "pgsluice_application_checkout_timeouts_total",
            &app("reporter")
        ),
        3.0
    );
    assert_eq!(
        s.value(
            "pgsluice_application_checkout_timeouts_total",
            &app("holder")
        ),
        0.0
    );
    assert_eq!(
        s.value(
            "pgsluice_errors_total",
            &[("kind", "query_wait_timeout"), ("side", "client")]
        ),
        3.0
    );
    // Every wait is observed, the three that gave up included, each about 300 ms.
    assert_eq!(
        s.value("pgsluice_application_wait_seconds_count", &app("reporter")),
        3.0
    );
    let waited = s.value("pgsluice_application_wait_seconds_sum", &app("reporter"));
    assert!((0.85..3.0).contains(&waited), "waited {waited}");
    holder.batch_execute("COMMIT").await.unwrap();
    reporter.simple_query("SELECT 1").await.unwrap();
    let s = Scrape::take(port).await;
    assert_eq!(
        s.value("pgsluice_checkout_timeouts_total", &p),
        3.0,
        "a success adds no timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_held_idle_in_a_transaction_is_measured() {
    let (proxy, port) = proxy("m_hoard", "pool_size = 2").await;
    let worker = client_as(&proxy, "m_hoard", "llm-worker").await;
    let other = client_as(&proxy, "m_hoard", "web").await;
    other.simple_query("SELECT 1").await.unwrap();
    let app = [
        ("database", "m_hoard"),
        ("user", "m_hoard"),
        ("application", "llm-worker"),
    ];
    let before = Scrape::take(port).await;
    let base = before.value(
        "pgsluice_application_idle_in_transaction_seconds_total",
        &app,
    );
    assert_eq!(base, 0.0);
    worker.batch_execute("BEGIN; SELECT 1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // While the transaction is still open: the gauge shows it, and the counter already grew.
    let during = Scrape::take(port).await;
    let max = during.value("pgsluice_application_idle_in_transaction_max_seconds", &app);
    assert!((1.1..3.0).contains(&max), "max {max}");
    let so_far = during.value(
        "pgsluice_application_idle_in_transaction_seconds_total",
        &app,
    );
    assert!((1.1..3.0).contains(&so_far), "counted so far {so_far}");
    let p = pool("m_hoard");
    let sv = |s: &Scrape, state: &'static str| {
        s.value(
            "pgsluice_server_connections",
            &[p[0], p[1], ("state", state)],
        )
    };
    assert_eq!(sv(&during, "idle_in_transaction"), 1.0);
    assert_eq!(sv(&during, "active"), 0.0);
    assert_eq!(
        during.value(
            "pgsluice_application_clients",
            &[app[0], app[1], app[2], ("state", "active")]
        ),
        1.0
    );
    tokio::time::sleep(Duration::from_millis(900)).await;
    worker.batch_execute("COMMIT").await.unwrap();
    let after = Scrape::take(port).await;
    let total = after.value(
        "pgsluice_application_idle_in_transaction_seconds_total",
        &app,
    );
    assert!((2.0..3.5).contains(&total), "hoarded {total}");
    assert_eq!(
        after.value("pgsluice_application_idle_in_transaction_max_seconds", &app),
        0.0
    );
    assert_eq!(sv(&after, "idle_in_transaction"), 0.0);
    assert_eq!(
        after.value(
            "pgsluice_application_idle_in_transaction_seconds_total",
            &[app[0], app[1], ("application", "web")]
        ),
        0.0
    );
    // The pool's own counter has the same figure.
    let pool_total = after.value("pgsluice_idle_in_transaction_seconds_total", &p);
    assert!((total - pool_total).abs() < 0.01, "{pool_total} vs {total}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_waiting_clients_then_back_to_baseline() {
    let (proxy, port) = proxy("m_forty", "pool_size = 1").await;
    let holder = client_as(&proxy, "m_forty", "holder").await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let mut clients = Vec::new();
    for _ in 0..40 {
        clients.push(client_as(&proxy, "m_forty", "burst").await);
    }
    let p = pool("m_forty");
    let cl = |s: &Scrape, state: &'static str| {
        s.value(
            "pgsluice_client_connections",
            &[p[0], p[1], ("state", state)],
        )
    };
    let s = Scrape::take(port).await;
    assert_eq!(
        (cl(&s, "waiting"), cl(&s, "active"), cl(&s, "idle")),
        (0.0, 1.0, 40.0)
    );
    let mut tasks = Vec::new();
    for c in clients {
        tasks.push(tokio::spawn(async move {
            c.simple_query("SELECT 1").await.unwrap();
            c
        }));
    }
    assert!(
        eventually(Duration::from_secs(10), || async {
            cl(&Scrape::take(port).await, "waiting") == 40.0
        })
        .await,
        "40 clients should be waiting"
    );
    let s = Scrape::take(port).await;
    let burst = [p[0], p[1], ("application", "burst"), ("state", "waiting")];
    assert_eq!(s.value("pgsluice_application_clients", &burst), 40.0);
    assert_eq!(cl(&s, "active"), 1.0);
    assert!(s.value("pgsluice_client_max_wait_seconds", &p) > 0.0);
    assert_eq!(
        s.value(
            "pgsluice_server_connections",
            &[p[0], p[1], ("state", "idle_in_transaction")]
        ),
        1.0
    );
    assert_eq!(s.value("pgsluice_pool_size", &p), 1.0);
    holder.batch_execute("COMMIT").await.unwrap();
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await.unwrap());
    }
    // A client has its answer a moment before its session hands the server back.
    assert!(
        eventually(Duration::from_secs(5), || async {
            let s = Scrape::take(port).await;
            (cl(&s, "waiting"), cl(&s, "active"), cl(&s, "idle")) == (0.0, 0.0, 41.0)
        })
        .await,
        "all 41 clients idle again"
    );
    let s = Scrape::take(port).await;
    assert_eq!(s.value("pgsluice_application_clients", &burst), 0.0);
    assert_eq!(s.value("pgsluice_client_max_wait_seconds", &p), 0.0);
    let sv = |state: &'static str| {
        s.value(
            "pgsluice_server_connections",
            &[p[0], p[1], ("state", state)],
        )
    };
    assert_eq!(
        (
            sv("active"),
            sv("idle"),
            sv("idle_in_transaction"),
            sv("login")
        ),
        (0.0, 1.0, 0.0, 0.0)
    );
    // 1 (holder) + 40 checkouts, and as many waits observed.
    assert_eq!(s.value("pgsluice_server_assignments_total", &p), 41.0);
    assert_eq!(s.value("pgsluice_client_wait_seconds_count", &p), 41.0);
    drop(clients);
    assert!(
        eventually(Duration::from_secs(5), || async {
            cl(&Scrape::take(port).await, "idle") == 1.0
        })
        .await,
        "closed clients leave the gauges"
    );
}

#[tokio::test]
async fn transactions_and_queries_are_counted_exactly() {
    let (proxy, port) = proxy("m_count", "").await;
    let c = proxy.client("m_count").await;
    c.simple_query("SELECT 1").await.unwrap(); // the pool's first server is open now
    let p = pool("m_count");
    let before = Scrape::take(port).await;
    let delta = |after: &Scrape, name: &str| after.value(name, &p) - before.value(name, &p);
    for _ in 0..5 {
        c.simple_query("SELECT 1").await.unwrap(); // 5 transactions, 5 queries
    }
    c.batch_execute("BEGIN; SELECT 1; COMMIT").await.unwrap(); // 1 and 1
    c.batch_execute("BEGIN").await.unwrap(); // 1 transaction, 3 queries
    c.batch_execute("SELECT 1").await.unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    c.query_typed(
        "SELECT $1::int",
        &[(&7i32, tokio_postgres::types::Type::INT4)],
    )
    .await
    .unwrap(); // extended protocol, one Sync: 1 and 1
    let after = Scrape::take(port).await;
    assert_eq!(delta(&after, "pgsluice_transactions_total"), 8.0);
    assert_eq!(delta(&after, "pgsluice_queries_total"), 10.0);
    assert_eq!(
        delta(&after, "pgsluice_transaction_duration_seconds_count"),
        8.0
    );
    assert_eq!(delta(&after, "pgsluice_server_assignments_total"), 8.0);
    assert!(delta(&after, "pgsluice_client_received_bytes_total") > 100.0);
    assert!(delta(&after, "pgsluice_client_sent_bytes_total") > 100.0);
    assert_eq!(delta(&after, "pgsluice_checkout_timeouts_total"), 0.0);
}

#[tokio::test]
async fn build_info_budget_errors_and_process_metrics() {
    let (proxy, port) = proxy("m_misc", "").await;
    let c = proxy.client("m_misc").await;
    c.simple_query("SELECT 1").await.unwrap();
    let e = try_connect(&proxy.conn("m_misc", "wrong", "m_misc"))
        .await
        .unwrap_err();
    assert_eq!(code(&e), "28P01");
    let e = try_connect(&proxy.conn("m_misc", "m_misc-pw", "nosuchdb"))
        .await
        .unwrap_err();
    assert_eq!(code(&e), "3D000");
    let s = Scrape::take(port).await;
    assert_eq!(
        s.value(
            "pgsluice_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    let err = |kind: &str| s.value("pgsluice_errors_total", &[("kind", kind)]);
    assert_eq!(err("auth_failed"), 1.0);
    assert_eq!(err("unknown_database"), 1.0);
    assert_eq!(err("connect_failed"), 0.0, "every kind is exported, at 0");
    assert!(s.has("process_resident_memory_bytes"));
    assert!(s.has("process_open_fds"));
    // The test harness gives every proxy a fixed budget of 80.
    let upstream =
        s.0.samples
            .iter()
            .find(|x| x.metric == "pgsluice_budget_connections")
            .and_then(|x| x.labels.get("upstream").map(str::to_owned))
            .expect("a budget per upstream");
    let u = [("upstream", upstream.as_str())];
    assert_eq!(s.value("pgsluice_budget_connections", &u), 80.0);
    assert_eq!(s.value("pgsluice_budget_in_use_connections", &u), 1.0);
    assert_eq!(s.value("pgsluice_budget_refresh_errors_total", &u), 0.0);
}

#[tokio::test]
async fn application_labels_are_bounded() {
    let (proxy, port) = proxy("m_apps", "").await;
    let mut keep = Vec::new();
    for a in ["one", "two", "three"] {
        let c = client_as(&proxy, "m_apps", a).await;
        c.simple_query("SELECT 1").await.unwrap();
        keep.push(c);
    }
    let s = Scrape::take(port).await;
    let idle = |a: &'static str| {
        s.value(
            "pgsluice_application_clients",
            &[
                ("database", "m_apps"),
                ("application", a),
                ("state", "idle"),
            ],
        )
    };
    assert_eq!(
        (idle("one"), idle("two"), idle("three"), idle("other")),
        (1.0, 1.0, 1.0, 0.0)
    );

    // With max_applications = 2, the third name shares "other".
    let port2 = free_port();
    let pg = pg();
    let proxy2 = Proxy::start(&app_config(
        pg,
        "m_apps",
        &format!("[metrics]\nlisten = \"127.0.0.1:{port2}\"\nmax_applications = 2\n"),
    ))
    .await;
    let mut keep2 = Vec::new();
    for a in ["one", "two", "three", "four"] {
        let c = client_as(&proxy2, "m_apps", a).await;
        c.simple_query("SELECT 1").await.unwrap();
        keep2.push(c);
    }
    let s = Scrape::take(port2).await;
    let idle = |a: &'static str| {
        s.value(
            "pgsluice_application_clients",
            &[
                ("database", "m_apps"),
                ("application", a),
                ("state", "idle"),
            ],
        )
    };
    assert_eq!((idle("one"), idle("two"), idle("other")), (1.0, 1.0, 2.0));
    assert_eq!(idle("three"), 0.0);
    // SET application_name moves a client to its new label (once its session is back to
    // idle: the proxy reads the setting back after the client has its answer).
    keep2[0]
        .batch_execute("SET application_name = 'two'")
        .await
        .unwrap();
    let moved = eventually(Duration::from_secs(5), || async {
        let s = Scrape::take(port2).await;
        let idle = |a: &'static str| {
            s.value(
                "pgsluice_application_clients",
                &[
                    ("database", "m_apps"),
                    ("application", a),
                    ("state", "idle"),
                ],
            )
        };
        (idle("one"), idle("two")) == (0.0, 2.0)
    })
    .await;
    assert!(moved, "the client moved from 'one' to 'two'");
}

/// A client that names itself anew for every job cannot take every application label: its
/// third new name onwards counts as `other`, and a client that comes later still gets a label
/// of its own.
#[tokio::test]
async fn a_client_renaming_itself_cannot_take_every_label() {
    let port = free_port();
    let pg = pg();
    pg.create_app("m_rename").await;
    let proxy = Proxy::start(&app_config(
        pg,
        "m_rename",
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\nmax_applications = 3\n"),
    ))
    .await;
    let worker = client_as(&proxy, "m_rename", "worker").await;
    for job in 1..=10 {
        worker
            .batch_execute(&format!("SET application_name = 'job-{job}'"))
            .await
            .unwrap();
        worker.simple_query("SELECT 1").await.unwrap();
    }
    let web = client_as(&proxy, "m_rename", "web").await;
    web.simple_query("SELECT 1").await.unwrap();
    let labelled = eventually(Duration::from_secs(5), || async {
        let s = Scrape::take(port).await;
        let idle = |a: &str| {
            s.value(
                "pgsluice_application_clients",
                &[
                    ("database", "m_rename"),
                    ("application", a),
                    ("state", "idle"),
                ],
            )
        };
        (idle("web"), idle("other"), idle("job-1"), idle("job-2")) == (1.0, 1.0, 0.0, 0.0)
    })
    .await;
    assert!(
        labelled,
        "web has its own label; the worker's later names count as other:\n{:#?}",
        get(port, "/metrics")
            .await
            .unwrap()
            .1
            .lines()
            .filter(|l| l.starts_with("pgsluice_application_clients"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn health_endpoints_and_unknown_paths() {
    let (proxy, port) = proxy("m_health", "").await;
    assert_eq!(get(port, "/healthz").await.unwrap(), (200, "ok\n".into()));
    assert_eq!(get(port, "/readyz").await.unwrap().0, 200);
    assert_eq!(get(port, "/nope").await.unwrap().0, 404);
    // Another method: 405, naming the methods that work (RFC 9110).
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(
        b"POST /metrics HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let head = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 405"), "{head}");
    assert!(head.contains("\r\nallow: get, head\r\n"), "{head}");
    drop(proxy);

    // An upstream that does not answer: not ready, and the body says why.
    let dead = free_port();
    let port = free_port();
    let proxy = Proxy::start(&format!(
        "[metrics]\nlisten = \"127.0.0.1:{port}\"\n[budget]\nmax_server_connections = 10\n\
         [databases.gone]\nport = {dead}\n[users.gone]\npassword = \"pw\"\n"
    ))
    .await;
    assert!(
        eventually(Duration::from_secs(5), || async move {
            get(port, "/healthz").await.is_ok()
        })
        .await
    );
    let (status, body) = get(port, "/readyz").await.unwrap();
    assert_eq!(status, 503);
    assert!(body.contains(&format!("127.0.0.1:{dead}")), "{body}");
    drop(proxy);
}

/// Scrapers that open a connection and never finish their request hold the endpoint's 16
/// slots only until the header timeout (10 s): `/healthz` waits behind them, then answers,
/// and the slow connections are closed.
#[tokio::test]
async fn slow_http_clients_cannot_hold_the_endpoint() {
    let (_proxy, port) = proxy("m_slow_http", "").await;
    let mut slow = Vec::new();
    for _ in 0..16 {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n")
            .await
            .unwrap();
        slow.push(s);
    }
    let started = std::time::Instant::now();
    let health = tokio::spawn(get(port, "/healthz"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    if health.is_finished() {
        let early = health.await.unwrap();
        panic!("every slot is held by a slow request: /healthz waits; it got {early:?}");
    }
    let answer = tokio::time::timeout(Duration::from_secs(40), health)
        .await
        .expect("/healthz answered once the slow requests timed out")
        .unwrap()
        .unwrap();
    assert_eq!(answer, (200, "ok\n".into()));
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "answered only after the slots came back: {:?}",
        started.elapsed()
    );
    for mut s in slow {
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(40), s.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "a slow request's connection is closed");
    }
}

/// `/readyz` follows the upstream: ready, not ready while it is stopped, ready again.
#[tokio::test]
async fn readyz_flips_while_the_upstream_is_down() {
    let own = TestPostgres::start(&[]);
    own.create_app("m_flip").await;
    let port = free_port();
    let proxy = Proxy::start(&app_config(
        &own,
        "m_flip",
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    ))
    .await;
    let c = proxy.client("m_flip").await;
    c.simple_query("SELECT 1").await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async move {
            matches!(get(port, "/readyz").await, Ok((200, _)))
        })
        .await
    );
    own.ctl_stop();
    assert!(
        eventually(Duration::from_secs(5), || async move {
            matches!(get(port, "/readyz").await, Ok((503, _)))
        })
        .await,
        "not ready while the upstream is down"
    );
    assert_eq!(
        get(port, "/healthz").await.unwrap().0,
        200,
        "alive all the same"
    );
    own.ctl_start();
    assert!(
        eventually(Duration::from_secs(5), || async move {
            matches!(get(port, "/readyz").await, Ok((200, _)))
        })
        .await,
        "ready again"
    );
}

/// SHUTDOWN WAIT_FOR_CLIENTS: not ready and no new clients while draining; the proxy stops
/// when the last client leaves.
#[tokio::test]
async fn readyz_is_false_while_draining() {
    let (proxy, port) = proxy("m_drain", "admin_users = \"m_drain\"").await;
    let c = proxy.client("m_drain").await;
    c.simple_query("SELECT 1").await.unwrap();
    let admin = connect(&proxy.conn("m_drain", "m_drain-pw", "pgbouncer")).await;
    admin
        .simple_query("SHUTDOWN WAIT_FOR_CLIENTS")
        .await
        .unwrap();
    let (status, body) = get(port, "/readyz").await.unwrap();
    assert_eq!(status, 503);
    assert!(body.contains("draining"), "{body}");
    let e = try_connect(&proxy.conn("m_drain", "m_drain-pw", "m_drain"))
        .await
        .unwrap_err();
    assert_eq!(message(&e), "pooler is shutting down");
    assert_eq!(code(&e), "57P03", "cannot connect now: retryable");
    c.simple_query("SELECT 1")
        .await
        .expect("existing clients keep working");
    drop(admin);
    drop(c);
    assert!(
        eventually(Duration::from_secs(5), || async move {
            get(port, "/healthz").await.is_err()
        })
        .await,
        "the proxy stops once its last client left"
    );
}

/// query_wait_notify: a client queued that long gets PgBouncer's NOTICE, once.
#[tokio::test]
async fn queued_clients_are_told_why_they_wait() {
    let (proxy, _port) = proxy("m_notify", "pool_size = 1\nquery_wait_notify = \"300ms\"").await;
    let holder = proxy.client("m_notify").await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let (client, mut connection) =
        tokio_postgres::connect(&proxy.conn("m_notify", "m_notify-pw", "m_notify"), NoTls)
            .await
            .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notice(n))) => {
                    let _ = tx.send(n.message().to_owned());
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            }
        }
    });
    let waiting = tokio::spawn(async move { client.simple_query("SELECT 1").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(800)).await;
    holder.batch_execute("COMMIT").await.unwrap();
    waiting.await.unwrap().unwrap();
    let notice = rx.try_recv().expect("a NOTICE while queued");
    assert_eq!(
        notice,
        "No server connection available in postgres backend, client being queued"
    );
    assert!(rx.try_recv().is_err(), "only one notice");
}

/// Prepared-statement counters: client Parses, server Parses, hits, evictions, Binds.
#[tokio::test]
async fn prepared_statements_are_counted() {
    let (proxy, port) = proxy("m_prep", "pool_size = 1\nmax_prepared_statements = 1").await;
    let a = proxy.client("m_prep").await;
    let b = proxy.client("m_prep").await;
    a.simple_query("SELECT 1").await.unwrap(); // the pool's server is open now
    let p = pool("m_prep");
    let before = Scrape::take(port).await;
    let delta = |after: &Scrape, name: &str| after.value(name, &p) - before.value(name, &p);
    // a prepares (server parse); b prepares the same text (a hit: answered by pgsluice).
    let s1 = a.prepare("SELECT 1::int").await.unwrap();
    let s2 = b.prepare("SELECT 1::int").await.unwrap();
    a.query(&s1, &[]).await.unwrap();
    b.query(&s2, &[]).await.unwrap();
    // Another text evicts the first (max 1); using the first again prepares it again.
    let s3 = a.prepare("SELECT 2::int").await.unwrap();
    a.query(&s3, &[]).await.unwrap();
    a.query(&s1, &[]).await.unwrap();
    let after = Scrape::take(port).await;
    assert_eq!(delta(&after, "pgsluice_prepared_client_parses_total"), 3.0);
    assert_eq!(delta(&after, "pgsluice_prepared_hits_total"), 1.0);
    assert_eq!(
        delta(&after, "pgsluice_prepared_server_parses_total"),
        3.0,
        "SELECT 1, SELECT 2, SELECT 1 again"
    );
    assert_eq!(delta(&after, "pgsluice_prepared_evictions_total"), 2.0);
    assert_eq!(delta(&after, "pgsluice_binds_total"), 4.0);
}

/// The binary binds `metrics.listen` once, at start, and serves that socket (the children
/// of tests/lifecycle.rs scrape it): an address already taken stops the start with status 1
/// and says why.
#[tokio::test]
async fn the_binary_exits_when_metrics_listen_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(
        &path,
        "listen = \"127.0.0.1:0\"\nauth_type = \"trust\"\n[databases.m_bind]\nhost = \"127.0.0.1\"\nport = 1\n[users.m_bind]\npassword = \"x\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgsluice"))
        .args([
            "--config",
            path.to_str().unwrap(),
            "--metrics-listen",
            &addr,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on metrics.listen {addr}")),
        "{stderr}"
    );
}
