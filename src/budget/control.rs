//! The control connection: one per upstream server in auto mode. It reads the live figures
//! at start and every `budget.refresh_interval`, registers this proxy as a fleet member (by
//! its `application_name`), and sets the budget the pools draw on.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rand::RngExt;

use super::{
    fleet_budget, fleet_like_pattern, limit, member_application_name, share, Snapshot, Upstream,
};
use crate::config::PoolSettings;
use crate::pool::{BudgetId, Pools};
use crate::protocol::messages::quote_literal;
use crate::server::{ServerConn, ServerError};

/// How soon to retry while the budget is not known.
const RETRY: Duration = Duration::from_secs(1);

/// Asked of the server for the control connection's socket: probe after 10 s of silence,
/// every 5 s, 3 times. A member whose host vanished without closing its connection (a lost
/// instance, a partition) is then dropped by the server, and no longer counted, within
/// about 25 s instead of the kernel's default of over two hours. Refused settings (a managed
/// server may fix them) leave the defaults.
const KEEPALIVE: &str =
    "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3";

/// Reads the figures on an open control connection.
pub async fn read_upstream(conn: &mut ServerConn, fleet: &str) -> Result<Upstream, ServerError> {
    // A login without pg_read_all_stats sees other roles' backends with a NULL
    // backend_type; a database id still tells a client backend from a background worker.
    // Members are counted by distinct name: a control connection that lingers after its
    // replacement logged in, or a client that took a member's name, adds none.
    let sql = format!(
        "SELECT current_setting('max_connections'), current_setting('superuser_reserved_connections'), \
         coalesce(current_setting('reserved_connections', true), '0'), \
         (SELECT count(*) FROM pg_catalog.pg_stat_activity \
          WHERE backend_type = 'client backend' OR (backend_type IS NULL AND datid IS NOT NULL)), \
         (SELECT count(DISTINCT application_name) FROM pg_catalog.pg_stat_activity WHERE application_name LIKE {})",
        quote_literal(&fleet_like_pattern(fleet))
    );
    let rows = conn.simple_query(&sql).await?;
    let row = rows
        .first()
        .ok_or_else(|| ServerError::Protocol("budget query returned no row".into()))?;
    let num = |i: usize| -> Result<u32, ServerError> {
        row.get(i)
            .and_then(|v| v.as_deref())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                ServerError::Protocol(format!("budget query: column {i} is not a number"))
            })
    };
    Ok(Upstream {
        max_connections: num(0)?,
        superuser_reserved_connections: num(1)?,
        reserved_connections: num(2)?,
        connections: num(3)?,
        members: num(4)?.max(1),
    })
}

/// Reads the figures, connecting first when there is no connection (with `settings`, those
/// in force: a reload may have changed the password). True in the second place when it
/// connected.
async fn read(
    pools: &Pools,
    conn: &mut Option<ServerConn>,
    settings: &PoolSettings,
    application_name: &str,
    fleet: &str,
) -> (Result<Upstream, ServerError>, bool) {
    let connect_timeout = pools.config().server_connect_timeout;
    let connected = conn.is_none();
    if connected {
        match connect(settings, pools, application_name, connect_timeout).await {
            Ok(fresh) => *conn = Some(fresh),
            Err(e) => return (Err(e), true),
        }
    }
    let c = conn.as_mut().expect("connected above");
    let read = tokio::time::timeout(connect_timeout, read_upstream(c, fleet))
        .await
        .map_err(|_| ServerError::ConnectTimeout("budget query".into()))
        .and_then(|r| r);
    (read, connected)
}

/// A new control connection, with its keepalive settings.
async fn connect(
    settings: &PoolSettings,
    pools: &Pools,
    application_name: &str,
    timeout: Duration,
) -> Result<ServerConn, ServerError> {
    let mut fresh = ServerConn::connect_as(
        settings,
        &pools.keys,
        application_name,
        usize::MAX,
        0,
        timeout,
    )
    .await?;
    match tokio::time::timeout(timeout, fresh.simple_query(KEEPALIVE)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e @ ServerError::Query(_))) => {
            tracing::debug!(error = %e, "control connection: keepalive settings refused")
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(ServerError::ConnectTimeout("budget query".into())),
    }
    Ok(fresh)
}

/// How long to wait before the next try after `failures` failed refreshes in a row: 1 s,
/// then twice as long each time up to `refresh_interval`, give or take a quarter (a fleet
/// that lost its database does not come back in step).
fn retry_after(failures: u32, refresh_interval: Duration) -> Duration {
    let doubled = RETRY.saturating_mul(1 << failures.saturating_sub(1).min(16));
    doubled
        .min(refresh_interval)
        .mul_f64(rand::rng().random_range(0.75..1.25))
}

/// Keeps the budget of upstream `budget` up to date, forever.
pub async fn run(pools: Arc<Pools>, budget: BudgetId, settings: PoolSettings) {
    let config = pools.config().budget.clone();
    let fleet = pools.config().fleet.name.clone();
    let member = format!("{:016x}", rand::rng().random::<u64>());
    let application_name = member_application_name(&fleet, &member);
    let (host, port) = (settings.host.clone(), settings.port);
    let mut conn: Option<ServerConn> = None;
    // When the connection was made: it is replaced after `server_lifetime`, as pool servers
    // are, so that a host name that points elsewhere after a failover is followed.
    let mut connected_at = Instant::now();
    let mut reconnects = pools.control_reconnects(budget);
    let mut wake = pools.control_wake();
    let mut snapshot = Snapshot {
        mode: "auto",
        refresh_interval: config.refresh_interval,
        ..Snapshot::default()
    };
    let mut known = false;
    let mut failures = 0u32;
    // What this proxy held (control connection included) when its refreshes began to fail:
    // it opens no more than that until they succeed again (see below).
    let mut held_at_loss: Option<u32> = None;
    loop {
        // Read each time: a reload may change fraction, reserve, fallback or the interval.
        let config = pools.config().budget.clone();
        snapshot.refresh_interval = config.refresh_interval;
        let Some(settings) = pools.config().control_settings(&host, port) else {
            // A reload removed every database on this server: no connection, no member
            // counted by the others, until one comes back.
            if conn.take().is_some() {
                tracing::info!(upstream = %format!("{host}:{port}"), "no database uses this server now: control connection closed");
            }
            snapshot.last_error = Some("no configured database uses this server".into());
            tokio::select! {
                _ = tokio::time::sleep(config.refresh_interval) => {}
                _ = wake.changed() => {}
            }
            continue;
        };
        // RECONNECT, or older than server_lifetime: a new one, maybe to a new address.
        let asked = pools.control_reconnects(budget);
        if asked != reconnects
            || conn.is_some() && connected_at.elapsed() >= pools.config().server_lifetime
        {
            reconnects = asked;
            conn = None;
        }
        // A connection the server closed meanwhile (idle_session_timeout, a restart, a
        // terminated backend) is replaced before the query, not found dead by it.
        if conn.as_ref().is_some_and(|c| !c.looks_alive()) {
            conn = None;
        }
        // What this proxy holds, read before the figures: a server opened while they are
        // read would otherwise count both as its own and as free room.
        let mine = pools.budget_open(budget) + 1;
        let reused = conn.is_some();
        let (mut result, mut connected) =
            read(&pools, &mut conn, &settings, &application_name, &fleet).await;
        if result.is_err() && reused {
            // The connection broke in between: one new one at once (until it is back, this
            // proxy is no member the others count).
            conn = None;
            (result, connected) =
                read(&pools, &mut conn, &settings, &application_name, &fleet).await;
        }
        if connected {
            connected_at = Instant::now();
        }
        let failing = result.is_err();
        match result {
            Ok(up) => {
                failures = 0;
                let fleet_total = fleet_budget(up.max_connections, config.fraction, config.reserve);
                let my_share = share(fleet_total, up.members);
                let allowed = limit(my_share, mine, &up);
                if snapshot.limit != allowed || snapshot.upstream.members != up.members || !known {
                    tracing::info!(
                        max_connections = up.max_connections,
                        fleet_budget = fleet_total,
                        members = up.members,
                        share = my_share,
                        limit = allowed,
                        "connection budget"
                    );
                }
                if up.members != snapshot.upstream.members
                    && up.members.saturating_mul(2) > fleet_total
                {
                    tracing::warn!(
                        members = up.members,
                        fleet_budget = fleet_total,
                        "each proxy holds at least 2 connections (its control connection and one server): {} members hold {}, more than the fleet budget; use fewer proxies per database, or a larger budget.fraction or max_connections",
                        up.members,
                        up.members.saturating_mul(2)
                    );
                }
                snapshot.upstream = up;
                snapshot.fleet_budget = fleet_total;
                snapshot.share = my_share;
                snapshot.limit = allowed;
                snapshot.last_refresh = Some(SystemTime::now());
                snapshot.last_error = None;
                known = true;
                held_at_loss = None;
                // The control connection counts against the budget; the pools keep at least one.
                pools.set_budget(
                    budget,
                    Some(allowed.saturating_sub(1).max(1)),
                    1,
                    snapshot.clone(),
                );
            }
            Err(e) => {
                conn = None;
                failures = failures.saturating_add(1);
                snapshot.refresh_errors += 1;
                snapshot.last_error = Some(e.to_string());
                // Every failure at first, then one in ten: a database down for an hour
                // does not fill the log.
                if failures <= 3 || failures % 10 == 0 {
                    tracing::warn!(error = %e, failures, "could not read the connection budget");
                }
                if !known {
                    // Unknown so far: the fallback if configured, else clients get an error.
                    if let Some(f) = config.fallback {
                        snapshot.limit = f;
                    }
                    pools.set_budget(budget, config.fallback, 0, snapshot.clone());
                } else {
                    // Not counted as a member now, this proxy may not grow: the others may
                    // take the room its share leaves (a database at max_connections refuses
                    // the control connection first). It keeps what it held, within the last
                    // known limit, and takes no more until a refresh succeeds; the snapshot
                    // shows that limit, the one in force.
                    let held = *held_at_loss.get_or_insert(mine);
                    snapshot.limit = snapshot.limit.min(held);
                    pools.set_budget(
                        budget,
                        Some(snapshot.limit.saturating_sub(1).max(1)),
                        0,
                        snapshot.clone(),
                    );
                }
            }
        }
        // While the connection is down this proxy is not counted as a member, and the
        // others may grow into its share at their next refresh: try again soon (backing
        // off to the refresh interval), and look again at once when the server closes the
        // connection meanwhile, or RECONNECT asks for a new one.
        let pause = tokio::time::sleep(if known && !failing {
            config.refresh_interval
        } else {
            retry_after(failures.max(1), config.refresh_interval)
        });
        match conn.as_ref() {
            Some(c) => {
                tokio::select! {
                    _ = pause => {}
                    _ = wake.changed() => {}
                    _ = c.stream.readable() => {
                        // Closed by the server: a new connection, but not more than one a
                        // second (a server that closes every connection at once).
                        tokio::time::sleep_until((connected_at + RETRY).into()).await;
                    }
                }
            }
            None => {
                tokio::select! {
                    _ = pause => {}
                    _ = wake.changed() => {}
                }
            }
        }
    }
}
