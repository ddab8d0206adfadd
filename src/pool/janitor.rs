//! Periodic upkeep of the pools (PgBouncer's janitor): closes servers idle longer than
//! `server_idle_timeout` or older than `server_lifetime`, closes idle servers whose room
//! clients of other pools wait for, and opens servers up to `min_pool_size`.

use std::sync::Arc;
use std::time::Duration;

use super::Pools;

/// How often the janitor runs.
pub const PERIOD: Duration = Duration::from_millis(500);

/// Runs until the task is dropped.
pub async fn run(pools: Arc<Pools>) {
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for server in pools.take_expired(crate::clock::stamp_now()) {
            tracing::debug!(server = server.id, "closing idle or old server connection");
            server.close();
        }
        for server in pools.make_room() {
            tracing::debug!(
                server = server.id,
                "closing an idle server of another pool to make room"
            );
            server.close();
        }
        for pool in pools.reserve_minimum() {
            let pools = pools.clone();
            tokio::spawn(async move { pools.open_idle(pool).await });
        }
    }
}
