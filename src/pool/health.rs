//! Rules that retire server connections so that, after a failover or a switchover, clients
//! end up on the right database:
//!
//! - **RECONNECT** (admin console): every server of the database opened until now closes as
//!   soon as it is idle (idle ones at once), so new ones connect again and pick up a new
//!   endpoint. Ids grow monotonically, so "opened until now" is "id below a mark".
//! - **Read-only** (`target_session_attrs = "read-write"`, the default): a new server that
//!   reports itself a standby or read-only by default (PostgreSQL 14+ reports
//!   `in_hot_standby` and `default_transaction_read_only` at login) is closed and the connect
//!   retried, as a passing failure; a server that answers SQLSTATE 25006
//!   (read_only_sql_transaction) is closed at the end of that transaction. The relay only
//!   notes the SQLSTATE of the (rare) error replies it already reads.
//! - **Health check** (`server_check_query` after `server_check_delay`, PgBouncer's
//!   semantics): a server idle longer than the delay runs the query before it is handed out;
//!   if it fails or takes longer than `server_connect_timeout`, it is closed and the client
//!   gets another. An empty query turns the check off.
//!
//! Every server connection resolves the database's host name again (`server.rs` connects by
//! name; pgsluice keeps no DNS cache), so a DNS flip reaches the next new server.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::{Checkout, PoolId, Pools};
use crate::config::{PoolSettings, TargetSessionAttrs};
use crate::server::{ServerConn, ServerError};

/// Why a health rule closed a server (the `reason` label of `pgsluice_servers_retired_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retire {
    /// RECONNECT on the admin console.
    Reconnect = 0,
    /// Read-only (SQLSTATE 25006) in a pool for writes.
    ReadOnly = 1,
    /// `server_check_query` failed or timed out.
    CheckFailed = 2,
}

impl Retire {
    pub const ALL: [Retire; 3] = [Retire::Reconnect, Retire::ReadOnly, Retire::CheckFailed];

    pub fn as_str(self) -> &'static str {
        match self {
            Retire::Reconnect => "reconnect",
            Retire::ReadOnly => "read_only",
            Retire::CheckFailed => "check_failed",
        }
    }
}

/// A freshly opened server, unless its pool is for writes and the server says it cannot
/// take them (then it is closed, and the error is a passing one: the connect is retried).
pub(super) fn writable(s: &PoolSettings, server: ServerConn) -> Result<ServerConn, ServerError> {
    if s.target_session_attrs != TargetSessionAttrs::ReadWrite {
        return Ok(server);
    }
    let reported = |name: &str| {
        server
            .reported
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let why = if reported("in_hot_standby") == Some("on") {
        "a standby (in_hot_standby = on)"
    } else if reported("default_transaction_read_only") == Some("on") {
        "read-only (default_transaction_read_only = on)"
    } else {
        return Ok(server);
    };
    let addr = server.key.addr;
    server.close();
    Err(ServerError::ReadOnly(format!(
        "server {addr} is {why}, and databases.{}.target_session_attrs is \"read-write\"",
        s.database
    )))
}

/// Counts a server in `testing` while it runs the health check.
struct Testing<'a> {
    pools: &'a Pools,
    pool: PoolId,
}

impl<'a> Testing<'a> {
    fn new(pools: &'a Pools, pool: PoolId) -> Self {
        pools.lock().pools[pool].testing += 1;
        Testing { pools, pool }
    }
}

impl Drop for Testing<'_> {
    fn drop(&mut self) {
        self.pools.lock().pools[self.pool].testing -= 1;
    }
}

impl Pools {
    /// RECONNECT: closes the idle servers of `database`'s pools (every pool when `None`)
    /// now, and their other servers, open or being opened, when they are next idle.
    /// Returns how many closed now.
    pub fn reconnect(&self, database: Option<&str>) -> usize {
        let mark = self.next_id.load(Ordering::Relaxed);
        let closing = {
            let mut st = self.lock();
            let mut closing = Vec::new();
            for id in 0..st.pools.len() {
                if database.is_some_and(|d| d != st.pools[id].settings.database) {
                    continue;
                }
                st.pools[id].reconnect_below = mark;
                while let Some(server) = st.pools[id].idle.pop() {
                    st.pools[id].retired[Retire::Reconnect as usize] += 1;
                    st.release(id);
                    closing.push(server);
                }
            }
            st.grant_slots();
            // The control connections of the servers named too (pools or none yet): after
            // a failover the budget must be read on the new primary as well.
            let config = self.config.load();
            for b in st.budgets.iter_mut() {
                let named = match database {
                    None => true,
                    Some(d) => config
                        .databases
                        .get(d)
                        .is_some_and(|db| b.upstream == format!("{}:{}", db.host, db.port)),
                };
                if named {
                    b.reconnects += 1;
                }
            }
            closing
        };
        self.control_wake.send_modify(|_| {});
        let n = closing.len();
        for server in closing {
            server.close();
        }
        n
    }

    /// True when the server `id` of `pool` is to close when next idle (RECONNECT).
    pub fn close_needed(&self, pool: PoolId, id: u64) -> bool {
        id < self.lock().pools[pool].reconnect_below
    }

    /// Each pool's RECONNECT mark, by pool id: its servers with a lower id close when
    /// released (see [`Pools::close_needed`]).
    pub fn reconnect_marks(&self) -> Vec<u64> {
        self.lock()
            .pools
            .iter()
            .map(|p| p.reconnect_below)
            .collect()
    }

    /// Runs `server_check_query` on a server idle longer than `server_check_delay` at `now`
    /// (the checkout's start: no clock read of its own). False when the check failed: the
    /// checkout is marked retired (dropping it closes the server).
    ///
    /// The check itself runs in an allocation of its own, made only when one is due: the
    /// queued checkout that calls this stays small.
    pub(super) async fn check_if_due(
        self: &Arc<Self>,
        checkout: &mut Checkout,
        now: Instant,
    ) -> bool {
        // A delay of the janitor's period or more: the janitor flags the servers due (as
        // `try_idle` reads them), so a server not flagged needs no configuration load and
        // no clock arithmetic here, the common case of every queued checkout.
        if !checkout.server().check_due && !self.check_often.load(Ordering::Relaxed) {
            return true;
        }
        let (query, timeout) = {
            let c = self.config.load();
            if c.server_check_query.is_empty()
                || crate::clock::between(checkout.server().last_used, crate::clock::stamp(now))
                    < c.server_check_delay
            {
                return true;
            }
            (c.server_check_query.clone(), c.server_connect_timeout)
        };
        Box::pin(self.check(checkout, query, timeout)).await
    }

    async fn check(
        self: &Arc<Self>,
        checkout: &mut Checkout,
        query: String,
        timeout: std::time::Duration,
    ) -> bool {
        let server = checkout.server();
        let (pool, id) = (server.pool, server.id);
        let _testing = Testing::new(self, pool);
        let failure = match tokio::time::timeout(timeout, server.simple_query(&query)).await {
            Ok(Ok(_)) => {
                server.last_used = crate::clock::stamp_now();
                server.check_due = false;
                return true;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within server_connect_timeout ({timeout:?})"),
        };
        tracing::warn!(server = id, error = %failure, "server_check_query failed; closing the server");
        checkout.retire = Some(Retire::CheckFailed);
        false
    }
}

impl Checkout {
    /// The server answered SQLSTATE 25006 (read_only_sql_transaction) in this checkout: if
    /// its pool is for writes, the server closes instead of going back to the pool (the
    /// database it reaches is a standby now, or was made read-only). Off the hot path:
    /// only called after such an error.
    pub fn read_only_error(&mut self) {
        let pool = self.server().pool;
        let settings = self.pools.settings(pool);
        if settings.target_session_attrs == TargetSessionAttrs::ReadWrite {
            tracing::warn!(
                server = self.server().id,
                database = %settings.database,
                "server answered 25006 (read-only) in a pool for writes; closing it"
            );
            self.retire = Some(Retire::ReadOnly);
        }
    }
}
