//! Wiring: builds the state every task shares and runs the listener and the janitor.

use std::future::Future;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::task::JoinHandle;

use tokio::net::TcpListener;

use std::time::Instant;

use crate::admin::Console;
use crate::auth::query::AuthQuery;
use crate::auth::rate_limit::LoginLimiter;
use crate::auth::Credentials;
use crate::budget::control;
use crate::cancel::Cancels;
use crate::clients::Clients;
use crate::config::{BudgetMode, Config};
use crate::listener;
use crate::metrics::Metrics;
use crate::pool::{janitor, queue, BudgetId, Pools};
use crate::reload::ConfigSource;
use crate::shutdown::Stop;

/// State shared by every connection task. There are no mutable statics: two proxies can
/// run in one process (the tests do).
#[derive(Debug)]
pub struct Shared {
    pub pools: Arc<Pools>,
    /// Who may log in; swapped whole by a reload.
    pub credentials: ArcSwap<Credentials>,
    /// `auth_query` lookups of users not in the configuration.
    pub auth_query: AuthQuery,
    /// Failed logins per client address (`login_rate_limit`).
    pub login_limiter: LoginLimiter,
    /// Where the configuration came from, to read it again on reload.
    pub source: ConfigSource,
    /// Background tasks (janitor, control connections, HTTP), stopped at the end.
    pub background: Mutex<Vec<JoinHandle<()>>>,
    pub cancels: Arc<Cancels>,
    pub metrics: Arc<Metrics>,
    /// Logged-in clients (SHOW CLIENTS, client gauges).
    pub clients: Arc<Clients>,
    /// State the admin console changes: paused databases, draining, shutdown.
    pub console: Console,
    pub started: Instant,
    /// Draining and stopping (SIGTERM, SHUTDOWN).
    pub stop: Stop,
    /// Clients' login parameter sets, shared among the clients that sent equal ones.
    pub param_sets: crate::session_params::ParamSets,
}

impl Shared {
    pub fn new(config: Config) -> Arc<Shared> {
        Self::with_source(config, ConfigSource::default())
    }

    /// State for a configuration loaded from `source`, which a reload reads again.
    pub fn with_source(config: Config, source: ConfigSource) -> Arc<Shared> {
        let credentials = ArcSwap::from_pointee(Credentials::from_config(&config, None));
        let metrics = Arc::new(Metrics::new(config.metrics.max_applications as usize));
        let cancels = Arc::new(Cancels::new(config.peer_id));
        Arc::new(Shared {
            pools: Pools::new(Arc::new(config)),
            credentials,
            auth_query: AuthQuery::default(),
            login_limiter: LoginLimiter::default(),
            source,
            background: Mutex::new(Vec::new()),
            cancels,
            metrics,
            clients: Arc::new(Clients::default()),
            console: Console::default(),
            started: Instant::now(),
            stop: Stop::default(),
            param_sets: Default::default(),
        })
    }
}

/// Serves clients from `listener` until `shutdown` completes.
pub async fn run(listener: TcpListener, config: Config, shutdown: impl Future) {
    serve(listener, Shared::new(config), shutdown).await
}

/// [`run`] with state built by the caller, who may keep a handle on it (tests, metrics).
/// With `listen_unix`, binds its socket too (next to `listener`'s port); if that fails, logs
/// why and returns without serving.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: impl Future) {
    let unix = match listener::bind_unix_for(&shared.pools.config(), &listener).await {
        Ok(unix) => unix,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen on listen_unix");
            return;
        }
    };
    let listeners = listener::Listeners {
        tcp: listener,
        unix,
        metrics: None,
    };
    serve_on(listeners, shared, shutdown).await
}

/// [`serve`] on listeners already bound.
pub async fn serve_on(
    mut listeners: listener::Listeners,
    shared: Arc<Shared>,
    shutdown: impl Future,
) {
    shared.spawn(janitor::run(shared.pools.clone()));
    shared.spawn(queue::sweeper(Arc::downgrade(&shared.pools)));
    shared.spawn(crate::clients::parker(Arc::downgrade(&shared.clients)));
    let budgets: Vec<BudgetId> = shared
        .pools
        .upstreams()
        .into_iter()
        .map(|(b, _, _)| b)
        .collect();
    start_control(&shared, &budgets);
    // The HTTP endpoint keeps answering while draining (/readyz says not ready).
    match listeners.metrics.take() {
        Some(metrics) => shared.spawn(crate::http::serve(metrics, shared.clone())),
        None => shared.spawn(crate::http::run(shared.clone())),
    }
    tokio::select! {
        _ = listener::run(listeners, shared.clone()) => {}
        _ = shutdown => tracing::info!("shutting down"),
        _ = shared.console.shutdown_requested() => tracing::info!("shutting down (admin console SHUTDOWN)"),
    }
    // The listeners are dropped (the Unix socket's file removed): no new clients.
    crate::shutdown::drain(&shared).await;
    for task in shared
        .background
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain(..)
    {
        task.abort();
    }
}

/// In auto mode, starts the control connection of each of these budgets.
pub fn start_control(shared: &Arc<Shared>, budgets: &[BudgetId]) {
    let config = shared.pools.config();
    if config.budget.mode() != BudgetMode::Auto {
        return;
    }
    for (budget, host, port) in shared.pools.upstreams() {
        if !budgets.contains(&budget) {
            continue;
        }
        let Some(settings) = config.control_settings(&host, port) else {
            continue; // validation guarantees credentials for every configured upstream
        };
        shared.spawn(control::run(shared.pools.clone(), budget, settings));
    }
}

impl Shared {
    /// Runs a background task until the proxy stops.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(task);
        self.background
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(handle);
    }
}
