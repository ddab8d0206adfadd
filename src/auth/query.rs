//! `auth_query`: looks up the password (SCRAM verifier or md5 hash) of a user who is not
//! listed in the configuration, on the upstream server, as PgBouncer does.
//!
//! - The lookup runs `auth_query` with the user name as the parameter `$1` (extended
//!   protocol: never spliced into the SQL) on a connection of its own, logged in as
//!   `auth_user` with only `user`, `database` and `application_name` in its startup packet:
//!   no parameter a client sent ever reaches it (CVE-2025-12819). The default query names
//!   everything with `pg_catalog.` and returns no password for a role past its
//!   `VALID UNTIL` (CVE-2025-2291), so an expired role fails like a wrong password.
//! - One lookup connection per upstream server and database, used by one lookup at a time.
//!   It counts against the upstream's connection budget and closes after
//!   [`IDLE_CLOSE`] unused.
//! - Answers, found or not, are reused for `auth_query_cache_ttl`; a reload forgets them.
//!   Logins racing for the same user share one query.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use thiserror::Error;
use tokio::io::AsyncWriteExt;

use super::Secret;
use crate::pool::{Auxiliary, Pools};
use crate::protocol::messages::ErrorFields;
use crate::protocol::{backend, TransactionStatus};
use crate::secrets::Password;
use crate::server::{parse_data_row, ServerConn, ServerError};

/// A lookup connection unused this long is closed (its budget slot freed).
pub const IDLE_CLOSE: Duration = Duration::from_secs(60);
/// `application_name` of lookup connections.
pub const APPLICATION_NAME: &str = "pgsluice auth_query";

#[derive(Debug, Error)]
pub enum LookupError {
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("auth_query failed: {} ({})", .0.message, .0.code)]
    Query(ErrorFields),
    #[error("auth_query did not answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    BadResult(String),
}

/// How a lookup was answered (the `result` label of `pgsluice_auth_query_lookups_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Cached,
    Found,
    NotFound,
    Failed,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Outcome::Cached,
        Outcome::Found,
        Outcome::NotFound,
        Outcome::Failed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Cached => "cached",
            Outcome::Found => "found",
            Outcome::NotFound => "not_found",
            Outcome::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone)]
struct Cached {
    at: Instant,
    secret: Option<Arc<Secret>>,
}

struct LookupConn {
    conn: ServerConn,
    last_used: Instant,
    /// Its place in the budget.
    _held: Auxiliary,
}

type Slot = Arc<tokio::sync::Mutex<Option<LookupConn>>>;

/// Answers by (upstream, user), and how many times they were forgotten.
#[derive(Default)]
struct Cache {
    answers: HashMap<(String, String), Cached>,
    /// Bumped by each [`AuthQuery::clear`]: a lookup started before a reload built its
    /// answer with the old configuration (an old `auth_type`, say) and must not put it
    /// back into the cache the reload emptied.
    generation: u64,
}

/// The lookups of one proxy.
#[derive(Default)]
pub struct AuthQuery {
    cache: Mutex<Cache>,
    conns: Mutex<HashMap<String, Slot>>,
}

impl std::fmt::Debug for AuthQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthQuery").finish_non_exhaustive()
    }
}

/// Most answers kept; past it the cache starts again.
const MAX_CACHED: usize = 100_000;

impl AuthQuery {
    /// Forgets every answer (the configuration changed).
    pub fn clear(&self) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.answers.clear();
        cache.generation += 1;
    }

    fn generation(&self) -> u64 {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .generation
    }

    fn cached(&self, key: &(String, String), ttl: Duration) -> Option<Cached> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .answers
            .get(key)
            .filter(|c| c.at.elapsed() < ttl)
            .cloned()
    }

    /// The secret of `user` for a client of `database`, looked up with `auth_query` on
    /// that database's upstream. `Ok(None)`: no such user, no password, or an expired role;
    /// also when `auth_user` is not set or the database is not configured.
    pub async fn lookup(
        &self,
        pools: &Arc<Pools>,
        database: &str,
        user: &str,
    ) -> (Result<Option<Arc<Secret>>, LookupError>, Outcome) {
        // Read before the configuration: a reload stores its configuration, then clears.
        let generation = self.generation();
        let config = pools.config();
        let Some(settings) = config.auth_query_settings(database) else {
            return (Ok(None), Outcome::NotFound);
        };
        let target = format!(
            "{}:{}/{}/{}",
            settings.host, settings.port, settings.upstream_dbname, settings.upstream_user
        );
        let key = (target.clone(), user.to_owned());
        let ttl = config.auth_query_cache_ttl;
        if let Some(c) = self.cached(&key, ttl) {
            return (Ok(c.secret), Outcome::Cached);
        }
        let slot = self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(target)
            .or_default()
            .clone();
        let mut guard = slot.lock().await;
        // Another login may have looked the same user up while this one waited.
        if let Some(c) = self.cached(&key, ttl) {
            return (Ok(c.secret), Outcome::Cached);
        }
        let timeout = config.server_connect_timeout;
        // The connection is taken out of its slot while a lookup runs and put back only
        // after a whole, idle answer: a lookup cut off mid-query (its login timed out)
        // drops it with its unread reply, which the next lookup would otherwise read as
        // its own (another user's password).
        let result = async {
            let mut c = match guard.take() {
                Some(c) if c.conn.looks_alive() && c.conn.buf.is_empty() => c,
                stale => {
                    if let Some(old) = stale {
                        old.conn.close();
                    }
                    let held = pools.hold_auxiliary(&settings.host, settings.port);
                    let conn = ServerConn::connect_as(
                        &settings,
                        &pools.keys,
                        APPLICATION_NAME,
                        usize::MAX,
                        0,
                        timeout,
                    )
                    .await?;
                    tokio::spawn(close_when_idle(Arc::downgrade(&slot)));
                    LookupConn {
                        conn,
                        last_used: Instant::now(),
                        _held: held,
                    }
                }
            };
            c.last_used = Instant::now();
            let found =
                match tokio::time::timeout(timeout, run(&mut c.conn, &config.auth_query, user))
                    .await
                {
                    Ok(r) => r,
                    Err(_) => Err(LookupError::Timeout(timeout)),
                };
            match found {
                Ok(p) => {
                    *guard = Some(c);
                    Ok(p)
                }
                Err(e) => {
                    // The connection may be mid-message: never reuse it.
                    c.conn.close();
                    Err(e)
                }
            }
        }
        .await;
        let password = match result {
            Ok(p) => p,
            Err(e) => return (Err(e), Outcome::Failed),
        };
        drop(guard);
        let secret = password.map(|p| {
            // The user's own method: a listed user's auth_type applies to the password
            // looked up for it too.
            let s = Secret::new(user, Some(&Password::new(p)), config.auth_type_of(user));
            if !s.usable() {
                tracing::warn!(
                    user,
                    "auth_query returned a password this auth_type cannot check (an md5 hash with scram-sha-256, or an empty one)"
                );
            }
            Arc::new(s)
        });
        let outcome = if secret.is_some() {
            Outcome::Found
        } else {
            Outcome::NotFound
        };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.generation == generation {
            if cache.answers.len() >= MAX_CACHED {
                cache.answers.clear();
            }
            cache.answers.insert(
                key,
                Cached {
                    at: Instant::now(),
                    secret: secret.clone(),
                },
            );
        }
        (Ok(secret), outcome)
    }
}

/// Closes a lookup connection once it has been unused for [`IDLE_CLOSE`].
async fn close_when_idle(slot: Weak<tokio::sync::Mutex<Option<LookupConn>>>) {
    loop {
        tokio::time::sleep(IDLE_CLOSE / 4).await;
        let Some(slot) = slot.upgrade() else { return };
        let Ok(mut guard) = slot.try_lock() else {
            continue; // a lookup is running
        };
        match guard.as_ref() {
            None => return,
            Some(c) if c.last_used.elapsed() >= IDLE_CLOSE => {
                if let Some(c) = guard.take() {
                    tracing::debug!("closing the idle auth_query connection");
                    c.conn.close();
                }
                return;
            }
            Some(_) => {}
        }
    }
}

/// Parse, Bind (the user name as `$1`, text), Execute, Sync.
fn extended_query(sql: &str, param: &str) -> BytesMut {
    let mut b = BytesMut::new();
    let msg = |b: &mut BytesMut, tag: u8, body: &[u8]| {
        b.put_u8(tag);
        b.put_i32(body.len() as i32 + 4);
        b.put_slice(body);
    };
    let mut parse = Vec::new();
    parse.push(0); // unnamed statement
    parse.extend_from_slice(sql.as_bytes());
    parse.push(0);
    parse.extend_from_slice(&0i16.to_be_bytes()); // parameter types: inferred
    msg(&mut b, b'P', &parse);
    let mut bind = vec![0, 0]; // unnamed portal, unnamed statement
    bind.extend_from_slice(&0i16.to_be_bytes()); // parameter formats: text
    bind.extend_from_slice(&1i16.to_be_bytes());
    bind.extend_from_slice(&(param.len() as i32).to_be_bytes());
    bind.extend_from_slice(param.as_bytes());
    bind.extend_from_slice(&0i16.to_be_bytes()); // result formats: text
    msg(&mut b, b'B', &bind);
    let mut exec = vec![0];
    exec.extend_from_slice(&0i32.to_be_bytes());
    msg(&mut b, b'E', &exec);
    msg(&mut b, b'S', &[]);
    b
}

/// Runs the lookup; returns the password column of the first row (`None`: no row, or NULL).
async fn run(conn: &mut ServerConn, sql: &str, user: &str) -> Result<Option<String>, LookupError> {
    conn.stream
        .write_all(&extended_query(sql, user))
        .await
        .map_err(ServerError::from)?;
    let mut first: Option<Vec<Option<String>>> = None;
    let mut error = None;
    loop {
        let (tag, body) = conn.read_message().await?;
        match tag {
            b'1'
            | b'2'
            | backend::COMMAND_COMPLETE
            | backend::NOTICE_RESPONSE
            | backend::PARAMETER_STATUS => {}
            backend::DATA_ROW => {
                if first.is_none() {
                    first = Some(parse_data_row(&body)?);
                }
            }
            backend::ERROR_RESPONSE => error = Some(ErrorFields::parse(&body)),
            backend::READY_FOR_QUERY => {
                if body.first().copied().and_then(TransactionStatus::from_byte)
                    != Some(TransactionStatus::Idle)
                {
                    return Err(LookupError::BadResult(
                        "the auth_query connection is not idle after the lookup".into(),
                    ));
                }
                break;
            }
            other => {
                return Err(LookupError::BadResult(format!(
                    "unexpected message {:?} in reply to auth_query",
                    other as char
                )))
            }
        }
    }
    if let Some(e) = error {
        return Err(LookupError::Query(e));
    }
    match first {
        None => Ok(None),
        Some(row) if row.len() < 2 => Err(LookupError::BadResult(
            "auth_query must return two columns: the user name and the password".into(),
        )),
        Some(mut row) => Ok(row.swap_remove(1).filter(|p| !p.is_empty())),
    }
}
