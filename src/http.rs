//! The HTTP endpoint on `metrics.listen`: `/metrics` (Prometheus text format), `/healthz`
//! (the process runs) and `/readyz` (clients can be served: not draining, and every
//! upstream server answers). HTTP/1.1 only, a few connections at a time.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::app::Shared;

/// HTTP connections served at once; more wait for a slot.
const MAX_CONNECTIONS: usize = 16;
/// How long a request's headers may take to arrive.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one HTTP connection may last (keep-alive included): a scraper reconnects.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an upstream probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a probe result is reused, so that frequent `/readyz` calls cost little.
const PROBE_CACHE: Duration = Duration::from_secs(1);

/// Serves `metrics.listen` until dropped; completes only if the address cannot be bound
/// (after logging why). Pending forever when `metrics.listen` is not set.
pub async fn run(shared: Arc<Shared>) {
    let Some(addr) = shared.pools.config().metrics.listen.clone() else {
        return std::future::pending().await;
    };
    let listener = match TcpListener::bind(&addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen on metrics.listen {addr}");
            return;
        }
    };
    serve(listener, shared).await
}

/// Serves HTTP on `listener` forever.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(listen = %addr, "serving /metrics, /healthz and /readyz");
    }
    let health = Arc::new(Health::default());
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let shared = shared.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let shared = shared.clone();
                let health = health.clone();
                async move { Ok::<_, Infallible>(route(&shared, &health, req).await) }
            });
            let served = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            // Bounded: a client that asks and never reads the answer (or keeps a connection
            // open) must not hold one of the few slots, and /healthz behind them, for ever.
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, served).await;
            drop(permit);
        });
    }
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .expect("a valid response")
}

async fn route(
    shared: &Arc<Shared>,
    health: &Health,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "use GET\n");
        r.headers_mut().insert(
            "allow",
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return r;
    }
    match req.uri().path() {
        "/metrics" => {
            let shared = shared.clone();
            // Scraping walks every client; keep it off the async worker threads' hot loop.
            match tokio::task::spawn_blocking(move || crate::metrics::scrape(&shared)).await {
                Ok(body) => reply(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    body,
                ),
                // A scrape that panicked: an empty 200 would read as "no series" and
                // silence every alert; a 500 makes Prometheus mark the target down.
                Err(e) => {
                    tracing::error!(error = %e, "the metrics scrape failed");
                    reply(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        TEXT,
                        "the metrics scrape failed: see pgsluice's log\n",
                    )
                }
            }
        }
        "/healthz" => reply(StatusCode::OK, TEXT, "ok\n"),
        "/readyz" => match health.ready(shared).await {
            Ok(()) => reply(StatusCode::OK, TEXT, "ready\n"),
            Err(why) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                format!("not ready: {why}\n"),
            ),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: try /metrics, /healthz or /readyz\n",
        ),
    }
}

/// The readiness check, with its last upstream probe.
#[derive(Debug, Default)]
struct Health {
    last: Mutex<Option<(Instant, Result<(), String>)>>,
    /// Held while probing: checks arriving meanwhile wait for its answer instead of
    /// probing every upstream again.
    probing: tokio::sync::Mutex<()>,
}

impl Health {
    fn cached(&self) -> Option<Result<(), String>> {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.as_ref()
            .filter(|(at, _)| at.elapsed() < PROBE_CACHE)
            .map(|(_, r)| r.clone())
    }

    async fn ready(&self, shared: &Shared) -> Result<(), String> {
        if shared.console.is_draining() {
            return Err("draining (shutting down)".into());
        }
        if let Some(r) = self.cached() {
            return r;
        }
        let _turn = self.probing.lock().await;
        if let Some(r) = self.cached() {
            return r;
        }
        let upstreams: BTreeSet<(String, u16)> = shared
            .pools
            .config()
            .databases
            .values()
            .map(|d| (d.host.clone(), d.port))
            .collect();
        let mut result = Ok(());
        for (host, port) in upstreams {
            if let Err(e) = probe(&host, port).await {
                result = Err(format!("upstream {host}:{port} does not answer: {e}"));
                break;
            }
        }
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), result.clone()));
        result
    }
}

/// Opens a connection to a PostgreSQL server (TCP, or its Unix socket for a `host` that is
/// a directory) and closes it without sending anything: a stopped server refuses it.
/// PostgreSQL logs nothing for a connection that sends no data (an SSLRequest would make a
/// server with `ssl = on` log a failed handshake per probe).
async fn probe(host: &str, port: u16) -> Result<(), String> {
    match tokio::time::timeout(PROBE_TIMEOUT, crate::socket::connect(host, port)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
    }
}
