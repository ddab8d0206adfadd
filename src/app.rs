//! Wiring: builds the state every task shares and runs the listener and the janitor.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::auth::Credentials;
use crate::cancel::Cancels;
use crate::config::Config;
use crate::listener;
use crate::pool::{janitor, Pools};

/// State shared by every connection task. There are no mutable statics: two proxies can
/// run in one process (the tests do).
#[derive(Debug)]
pub struct Shared {
    pub pools: Arc<Pools>,
    pub credentials: Credentials,
    pub cancels: Arc<Cancels>,
}

impl Shared {
    pub fn new(config: Config) -> Arc<Shared> {
        let credentials = Credentials::from_config(&config);
        Arc::new(Shared {
            pools: Pools::new(Arc::new(config)),
            credentials,
            cancels: Arc::new(Cancels::default()),
        })
    }
}

/// Serves clients from `listener` until `shutdown` completes.
pub async fn run(listener: TcpListener, config: Config, shutdown: impl Future) {
    let shared = Shared::new(config);
    let janitor = tokio::spawn(janitor::run(shared.pools.clone()));
    tokio::select! {
        _ = listener::run(listener, shared.clone()) => {}
        _ = shutdown => tracing::info!("shutting down"),
    }
    janitor.abort();
}
