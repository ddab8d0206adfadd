//! Wiring: builds the state every task shares and runs the listener and the janitor.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use std::time::Instant;

use crate::admin::Console;
use crate::auth::Credentials;
use crate::budget::control;
use crate::cancel::Cancels;
use crate::clients::Clients;
use crate::config::{BudgetMode, Config};
use crate::listener;
use crate::metrics::Metrics;
use crate::pool::{janitor, Pools};
use crate::shutdown::Stop;

/// State shared by every connection task. There are no mutable statics: two proxies can
/// run in one process (the tests do).
#[derive(Debug)]
pub struct Shared {
    pub pools: Arc<Pools>,
    pub credentials: Credentials,
    pub cancels: Arc<Cancels>,
    pub metrics: Arc<Metrics>,
    /// Logged-in clients (SHOW CLIENTS, client gauges).
    pub clients: Arc<Clients>,
    /// State the admin console changes: paused databases, draining, shutdown.
    pub console: Console,
    pub started: Instant,
    /// Draining and stopping (SIGTERM, SHUTDOWN).
    pub stop: Stop,
}

impl Shared {
    pub fn new(config: Config) -> Arc<Shared> {
        let credentials = Credentials::from_config(&config);
        let metrics = Arc::new(Metrics::new(config.metrics.max_applications as usize));
        Arc::new(Shared {
            pools: Pools::new(Arc::new(config)),
            credentials,
            cancels: Arc::new(Cancels::default()),
            metrics,
            clients: Arc::new(Clients::default()),
            console: Console::default(),
            started: Instant::now(),
            stop: Stop::default(),
        })
    }
}

/// Serves clients from `listener` until `shutdown` completes.
pub async fn run(listener: TcpListener, config: Config, shutdown: impl Future) {
    serve(listener, Shared::new(config), shutdown).await
}

/// [`run`] with state built by the caller, who may keep a handle on it (tests, metrics).
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: impl Future) {
    let mut background = vec![tokio::spawn(janitor::run(shared.pools.clone()))];
    if shared.pools.config().budget.mode() == BudgetMode::Auto {
        for (budget, host, port) in shared.pools.upstreams() {
            let Some(settings) = shared.pools.config().control_settings(&host, port) else {
                continue; // validation guarantees credentials for every configured upstream
            };
            background.push(tokio::spawn(control::run(
                shared.pools.clone(),
                budget,
                settings,
            )));
        }
    }
    // The HTTP endpoint keeps answering while draining (/readyz says not ready).
    background.push(tokio::spawn(crate::http::run(shared.clone())));
    tokio::select! {
        _ = listener::run(listener, shared.clone()) => {}
        _ = shutdown => tracing::info!("shutting down"),
        _ = shared.console.shutdown_requested() => tracing::info!("shutting down (admin console SHUTDOWN)"),
    }
    // The listener is dropped: no new clients.
    crate::shutdown::drain(&shared).await;
    for task in background {
        task.abort();
    }
}
