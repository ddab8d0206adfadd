//! One transaction (or, in session mode, one session) between a client and a server.
//!
//! Bytes move in bulk: whatever a read returns is scanned by header and written on as one
//! piece. The proxy reads only tags and lengths, ReadyForQuery's status byte and small
//! ErrorResponses; on the client side Query and Parse are held whole to check their text
//! ([`crate::sql`]), and under transaction pooling the few messages that name a prepared
//! statement are rewritten ([`crate::prepared`]).
//!
//! - [`requests`]: client → server, what each message is owed.
//! - [`replies`]: server → client, matching replies to what is owed.
//!
//! A transaction is over when every reply owed has come, no extended-protocol message waits
//! for its Sync, no COPY is open, and the server reports status Idle. Only then may the
//! server serve another client.

#[doc(hidden)]
pub mod fuzzing;
mod replies;
mod requests;

use std::collections::VecDeque;
use std::future::Future;
use std::task::Poll;

use bytes::Buf;

use crate::metrics::TxnCounts;
use crate::protocol::frame::FrameError;
use crate::protocol::messages::{quote_literal, ErrorFields, Severity};
use crate::protocol::{backend, frontend, TransactionStatus};
use crate::server::ServerConn;
use crate::shutdown::Watch;
use crate::sql::{Refusal, SessionEffects};
pub use replies::Cursor;
pub use replies::Owed;
pub use requests::{ClientConn, Peek};

/// Most unsent bytes held per direction before reading that side pauses.
pub const HIGH_WATER: usize = 256 * 1024;

/// Most replies owed to a client (messages sent on, or answered by the proxy, whose replies
/// have not all been relayed) before reading it pauses: about 1 MiB of bookkeeping. The
/// server's replies flush as its output buffer fills, so a pipeline longer than this waits
/// for them rather than for a Sync.
pub const MAX_OWED: usize = 16 * 1024;
/// Read buffer growth step.
const READ_CHUNK: usize = 32 * 1024;
/// Largest non-Query message the proxy holds whole before checking a server out.
const MAX_HELD_MESSAGE: usize = 1 << 20;
/// Messages may not claim more than PostgreSQL's own limit (1 GB).
const MAX_MESSAGE: usize = 0x3fff_ffff;

/// Prepared-statement figures of one transaction, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StatementStats {
    /// Named Parse messages from the client.
    pub client_parses: u32,
    /// Parse messages sent to the server (the client's or the proxy's).
    pub server_parses: u32,
    /// Client Parses answered by the proxy because the server had the statement.
    pub parse_hits: u32,
    /// Statements closed on the server to stay within `max_prepared_statements`.
    pub evictions: u32,
    /// Bind messages from the client.
    pub binds: u32,
}

/// Where one transaction stands.
#[derive(Debug)]
pub struct Txn {
    /// Replies the server owes the client, in order.
    owed: VecDeque<Owed>,
    /// Extended-protocol messages were sent after the last Sync.
    unsynced: bool,
    /// The server waits for COPY data.
    copy_in: bool,
    /// The server ended a COPY FROM STDIN with an error before the client's CopyDone or
    /// CopyFail, which is still to come (see `Txn::copy_ended`).
    copy_end_pending: bool,
    /// An extended-protocol message failed: the server skips to the next Sync.
    errored: bool,
    status: TransactionStatus,
    forwarded: bool,
    transaction_mode: bool,
    /// Something the server said means it must not be reused.
    pub server_in_doubt: bool,
    /// DEALLOCATE ALL or DISCARD ALL passed on and not reported run yet (the owed entries
    /// marked `clears`): a statement the server has now may be gone before a Parse behind
    /// it runs, so such a Parse is not answered by the proxy, and a name the client has is
    /// free for it (see `ClientConn::parse`). A clear that fails or is skipped stops
    /// counting when its entry leaves the queue.
    clears_ahead: u32,
    /// Names the client's Parses (re)defined behind the last clear counted in
    /// `clears_ahead`: that clear does not free them (`None` until there is one). Boxed:
    /// one word in every transaction for a set almost none needs.
    #[allow(clippy::box_collection)]
    behind_clear: Option<Box<std::collections::HashSet<Box<[u8]>, crate::prepared::ProcessKeys>>>,
    /// The unnamed statement is DEALLOCATE ALL or DISCARD ALL (it clears when a portal bound
    /// from it runs), and the portal last bound from it is.
    clear_parsed: bool,
    clear_bound: bool,
    /// The server answered SQLSTATE 25006 (read_only_sql_transaction): a pool for writes
    /// retires it (`Checkout::read_only_error`).
    pub read_only_error: bool,
    /// Session state the transaction's statements may have changed.
    pub effects: SessionEffects,
    /// Queries, bytes and idle time, in plain integers; published once per transaction.
    pub counts: TxnCounts,
    pub stats: StatementStats,
    /// How long the transaction may wait on either side (`query_timeout`,
    /// `idle_transaction_timeout`); off by default.
    pub timeouts: Timeouts,
}

/// Limits on waiting within a transaction; zero turns one off.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// The server owes replies (a request runs, or its answer is not all read) this long.
    pub query: std::time::Duration,
    /// The client holds the server inside a transaction and sends nothing this long.
    pub idle_transaction: std::time::Duration,
}

impl Timeouts {
    fn off(&self) -> bool {
        self.query.is_zero() && self.idle_transaction.is_zero()
    }
}

/// When each timeout's wait began, while the relay waits.
#[derive(Debug, Default)]
struct Waits {
    query: Option<tokio::time::Instant>,
    idle: Option<tokio::time::Instant>,
}

impl Waits {
    /// Notes what the transaction waits for now; returns the earliest deadline, if any.
    fn update(
        &mut self,
        t: Timeouts,
        owed: bool,
        idle_in_transaction: bool,
    ) -> Option<tokio::time::Instant> {
        let now = tokio::time::Instant::now();
        self.query = if owed && !t.query.is_zero() {
            Some(self.query.unwrap_or(now))
        } else {
            None
        };
        self.idle = if idle_in_transaction && !t.idle_transaction.is_zero() {
            Some(self.idle.unwrap_or(now))
        } else {
            None
        };
        let q = self.query.map(|s| s + t.query);
        let i = self.idle.map(|s| s + t.idle_transaction);
        match (q, i) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// What the server's state is when a client goes away mid-transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leftover {
    /// Idle and clean: reusable as is.
    Clean,
    /// In an open (or failed) transaction, or inside extended-protocol messages not synced
    /// yet, with nothing running: a ROLLBACK makes it clean (after a Sync when the server
    /// skips to one, an extended-protocol message having failed).
    IdleInTransaction { skipping: bool },
    /// A query or COPY runs, or a message was cut in half: cancel and close.
    Busy,
}

/// How a relay ended.
#[derive(Debug)]
pub enum Outcome {
    /// The transaction is over and the server is clean.
    Done,
    /// The client left (Terminate or a closed socket).
    ClientGone(Leftover),
    /// The client must be closed with this error, told only if it stands between two
    /// messages (`tell`: otherwise it would be read as the rest of one cut short).
    ClientError {
        error: ErrorFields,
        left: Leftover,
        tell: bool,
    },
    /// The server connection broke; the client must be closed. `between_messages`: what
    /// the client was given ends between two messages, so an ErrorResponse can tell it
    /// why (otherwise it would be read as the rest of a message cut short).
    ServerGone { why: String, between_messages: bool },
    /// Session mode, draining: the session reached a transaction boundary.
    Drained,
    /// The shutdown timeout passed mid-transaction; the client is told only if it stands
    /// between two messages (`tell`).
    Aborted { left: Leftover, tell: bool },
    /// `query_timeout` or `idle_transaction_timeout` passed: the client is to be closed
    /// with `error`, told only if it stands between two messages (`tell`).
    TimedOut {
        error: ErrorFields,
        left: Leftover,
        tell: bool,
    },
}

fn violation(msg: impl Into<String>) -> ErrorFields {
    ErrorFields::new(Severity::Fatal, "08P01", msg)
}

fn frame_violation(e: FrameError) -> ErrorFields {
    violation(e.to_string())
}

/// SQL that makes the server raise a refusal as its own error.
pub fn raise_sql(r: Refusal) -> String {
    format!(
        "DO $pgsluice$BEGIN RAISE EXCEPTION USING ERRCODE = '0A000', MESSAGE = {}, HINT = {}; END$pgsluice$",
        quote_literal(r.message()),
        quote_literal(r.hint())
    )
}

impl Txn {
    /// A Parse behind a clear (re)defined `name`: a Parse of it after this one, behind the
    /// same clear, finds it in use (42P05).
    fn defined_behind_clear(&mut self, name: &[u8]) {
        self.behind_clear
            .get_or_insert_with(Default::default)
            .insert(name.into());
    }

    fn is_defined_behind_clear(&self, name: &[u8]) -> bool {
        self.behind_clear.as_ref().is_some_and(|n| n.contains(name))
    }

    pub fn new(transaction_mode: bool) -> Txn {
        Self::reusing(transaction_mode, VecDeque::new())
    }

    /// A transaction whose reply queue reuses `owed`'s allocation (emptied first).
    pub fn reusing(transaction_mode: bool, mut owed: VecDeque<Owed>) -> Txn {
        owed.clear();
        Txn {
            owed,
            unsynced: false,
            copy_in: false,
            copy_end_pending: false,
            errored: false,
            status: TransactionStatus::Idle,
            forwarded: false,
            transaction_mode,
            server_in_doubt: false,
            clears_ahead: 0,
            behind_clear: None,
            clear_parsed: false,
            clear_bound: false,
            read_only_error: false,
            effects: SessionEffects::default(),
            counts: TxnCounts::default(),
            stats: StatementStats::default(),
            timeouts: Timeouts::default(),
        }
    }

    /// Makes this a new transaction counted in `counts`, keeping the reply queue's
    /// allocation. Field by field: building a whole `Txn` and moving it in costs more.
    pub fn reset(&mut self, transaction_mode: bool, counts: TxnCounts, timeouts: Timeouts) {
        self.owed.clear();
        self.unsynced = false;
        self.copy_in = false;
        self.copy_end_pending = false;
        self.errored = false;
        self.status = TransactionStatus::Idle;
        self.forwarded = false;
        self.transaction_mode = transaction_mode;
        self.server_in_doubt = false;
        self.clears_ahead = 0;
        if self.behind_clear.is_some() {
            self.behind_clear = None;
        }
        self.clear_parsed = false;
        self.clear_bound = false;
        self.read_only_error = false;
        if !self.effects.is_empty() {
            self.effects = SessionEffects::default();
        }
        self.counts = counts;
        self.stats = StatementStats::default();
        self.timeouts = timeouts;
    }

    fn done(&self) -> bool {
        self.transaction_mode
            && self.forwarded
            && self.owed.is_empty()
            && !self.unsynced
            && !self.copy_in
            && self.status == TransactionStatus::Idle
    }

    /// The server's state if the client vanished now.
    fn leftover(&self, client: &ClientConn, server: &ServerConn) -> Leftover {
        let cut = client.ready > 0
            || client.pass > 0
            || !server.cursor.at_boundary()
            || !server.buf.is_empty();
        if cut || !self.owed.is_empty() || self.copy_in || self.server_in_doubt {
            Leftover::Busy
        } else if self.unsynced || self.status != TransactionStatus::Idle {
            Leftover::IdleInTransaction {
                skipping: self.unsynced && self.errored,
            }
        } else {
            Leftover::Clean
        }
    }
}

/// Nothing is on its way in either direction: no client bytes held or owed to the server,
/// no server bytes held, and the server's stream is between messages (a message that began
/// after ReadyForQuery, say a FATAL error, belongs to this client and is relayed whole).
fn quiet<S>(client: &ClientConn<S>, server_buf: &bytes::BytesMut, cursor: &Cursor) -> bool {
    client.ready == 0 && client.pass == 0 && server_buf.is_empty() && cursor.at_boundary()
}

fn would_block(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock
}

/// Relays until the transaction is over (transaction mode) or the client leaves; in session
/// mode also until a drain finds the session between transactions.
pub async fn transaction(
    client: &mut ClientConn,
    server: &mut ServerConn,
    txn: &mut Txn,
    watch: Watch<'_>,
) -> Outcome {
    let mut client_closed = false;
    // `server.buf[..out]` is read and ready for the client.
    let mut out = 0;
    let mut waits = Waits::default();
    // Armed once a timeout applies (never with the defaults), then moved, not re-made.
    let mut timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    // Whether the last wait looked at the client's socket (see `Wants::client_seen`).
    let mut client_seen = false;
    loop {
        match client.scan(txn, &mut server.statements) {
            Ok(false) => {}
            Ok(true) => client_closed = true,
            Err(error) => {
                return Outcome::ClientError {
                    error,
                    left: txn.leftover(client, server),
                    tell: out == 0 && server.cursor.client_between_messages(),
                }
            }
        }
        replies::emit_due(&mut server.buf, &mut out, txn, &mut client.statements);
        // TLS output rustls holds from an earlier write goes first.
        if client.stream.wants_write() {
            match client.stream.flush_tls() {
                Err(e) if !would_block(&e) => {
                    return Outcome::ClientGone(txn.leftover(client, server))
                }
                _ => {}
            }
        }
        if server.stream.wants_write() {
            match server.stream.flush_tls() {
                Err(e) if !would_block(&e) => {
                    return server_gone(client, server, out, e.to_string()).await
                }
                _ => {}
            }
        }
        // Write eagerly: most of the time the socket takes it all and no wait is needed.
        while out > 0 {
            match client.stream.try_write(&server.buf[..out]) {
                Ok(n) => {
                    txn.counts.sent += n as u64;
                    server.buf.advance(n);
                    out -= n;
                }
                Err(e) if would_block(&e) => break,
                Err(_) => return Outcome::ClientGone(txn.leftover(client, server)),
            }
        }
        while client.ready > 0 {
            match server.stream.try_write(&client.buf[..client.ready]) {
                Ok(n) => {
                    txn.counts.received += n as u64;
                    client.buf.advance(n);
                    client.ready -= n;
                }
                Err(e) if would_block(&e) => break,
                Err(e) => return server_gone(client, server, out, e.to_string()).await,
            }
        }
        let quiet = quiet(client, &server.buf, &server.cursor)
            && !client.stream.wants_write()
            && !server.stream.wants_write();
        // After Terminate, as PostgreSQL: the requests before it are answered first (a
        // client may send a Query and Terminate in one packet, then read the answer), then
        // the client is gone. Extended-protocol messages with no Sync after them get no
        // answer from PostgreSQL either: nothing to wait for then. Nor for a COPY FROM STDIN
        // the client did not end (libpq's PQfinish sends Terminate in the middle of one):
        // the server is cancelled and closed, which rolls the COPY back as PostgreSQL does.
        if client_closed
            && (txn.unsynced || txn.awaits_copy_data() || (txn.owed.is_empty() && quiet))
        {
            return Outcome::ClientGone(txn.leftover(client, server));
        }
        if txn.done() && quiet {
            return Outcome::Done;
        }
        // A session between transactions may end when draining.
        let between =
            !txn.transaction_mode && quiet && txn.leftover(client, server) == Leftover::Clean;
        if between && watch.is_draining() {
            return Outcome::Drained;
        }
        // Nothing after Terminate is read (and a client that shut its side down after it
        // is not taken for gone while its answers are still on their way).
        // Bounded both ways: bytes ready for a server that does not take them (a COPY
        // faster than the server) stop the reading, and so do unscanned bytes, except for
        // the rest of a message the proxy must hold whole (a Query or Parse up to
        // max_query_size), which would otherwise never complete; and so do replies the
        // client does not read, the proxy's own included (a CloseComplete for each Close of
        // a named statement, which never reaches the server); and so do replies owed past
        // MAX_OWED (Closes answered by the proxy pile up behind a slow query without
        // growing any buffer).
        let read_client = !client_closed
            && client.ready < HIGH_WATER
            && server.buf.len() < HIGH_WATER
            && txn.owed.len() < MAX_OWED
            && (client.buf.len() - client.ready < HIGH_WATER || client.holding());
        let read_server = server.buf.len() < HIGH_WATER;
        let deadline = if txn.timeouts.off() {
            None
        } else {
            let idle_in_transaction = txn.owed.is_empty()
                && quiet
                && out == 0
                && !txn.copy_in
                && (txn.status != TransactionStatus::Idle || txn.unsynced);
            waits.update(txn.timeouts, !txn.owed.is_empty(), idle_in_transaction)
        };
        if let Some(d) = deadline {
            match timer.as_mut() {
                Some(t) if t.deadline() == d => {}
                Some(t) => t.as_mut().reset(d),
                None => timer = Some(Box::pin(tokio::time::sleep_until(d))),
            }
        }
        let mut wants = Wants {
            read_server,
            read_client,
            write_client: out > 0 || client.stream.wants_write(),
            write_server: client.ready > 0 || server.stream.wants_write(),
            drain: between,
            client_seen,
            again: false,
        };
        let mut armed = deadline.and(timer.as_mut());
        let waited =
            std::future::poll_fn(|cx| wants.poll(cx, client, server, &watch, armed.as_deref_mut()))
                .await;
        client_seen = wants.client_seen;
        let woke = match waited {
            Ok(woke) => woke,
            Err(Stop::ClientGone) => return Outcome::ClientGone(txn.leftover(client, server)),
            Err(Stop::ServerGone(e)) => {
                return server_gone(client, server, out, e.to_string()).await
            }
            Err(Stop::Aborting) => {
                return Outcome::Aborted {
                    left: txn.leftover(client, server),
                    tell: out == 0 && server.cursor.client_between_messages(),
                }
            }
            Err(Stop::TimedOut) => return timed_out(client, server, out, txn, &waits),
        };
        if woke.server {
            // Up to the high-water mark in one read when there is room for it.
            let room = READ_CHUNK.max(HIGH_WATER.saturating_sub(server.buf.len()));
            server.buf.reserve(READ_CHUNK);
            match server.stream.read_some(&mut server.buf, room) {
                Ok(0) => {
                    return server_gone(client, server, out, "server closed the connection".into())
                        .await
                }
                Ok(_) => match replies::process(
                    &mut server.buf,
                    out,
                    &mut server.cursor,
                    txn,
                    &mut client.statements,
                    &mut server.statements,
                ) {
                    Ok(end) => out = end,
                    Err(e) => return server_gone(client, server, out, e.to_string()).await,
                },
                Err(e) if would_block(&e) => {}
                Err(e) => return server_gone(client, server, out, e.to_string()).await,
            }
        }
        if woke.client {
            match client.read_some() {
                Ok(0) => return Outcome::ClientGone(txn.leftover(client, server)),
                Ok(_) => {}
                Err(e) if would_block(&e) => {}
                Err(_) => return Outcome::ClientGone(txn.leftover(client, server)),
            }
        }
    }
}

/// What the relay waits for, in one poll over both sockets, the shutdown flags and the
/// timeout (no future per source: the relay's state stays small, and every source that is
/// ready is served in the same turn, so a streaming server cannot starve the client).
#[derive(Debug, Clone, Copy)]
struct Wants {
    read_server: bool,
    read_client: bool,
    write_client: bool,
    write_server: bool,
    /// A session between transactions ends when draining begins.
    drain: bool,
    /// The client's socket was looked at last (in this wait's earlier polls, or the wait
    /// before). Then a server found readable ends the wait at once: the client's socket is
    /// looked at in the next one, after the server's bytes are read (or by the session when
    /// they end the transaction, the usual case: one readiness poll fewer per transaction).
    /// A streaming server is thus looked at alone one wait in two at most: it cannot starve
    /// the client.
    client_seen: bool,
    /// The wait was polled before (and so has slept): see [`Wants::poll`].
    again: bool,
}

/// The sockets with bytes to read after a wait.
#[derive(Debug, Default)]
struct Woke {
    server: bool,
    client: bool,
}

/// What ends a relay while it waits.
enum Stop {
    ClientGone,
    ServerGone(std::io::Error),
    Aborting,
    TimedOut,
}

impl Wants {
    /// Ready when anything the relay waits for happened: readable sockets are returned,
    /// anything else (room to write, draining) only ends the wait.
    fn poll(
        &mut self,
        cx: &mut std::task::Context<'_>,
        client: &ClientConn,
        server: &ServerConn,
        watch: &Watch<'_>,
        timer: Option<&mut std::pin::Pin<Box<tokio::time::Sleep>>>,
    ) -> Poll<Result<Woke, Stop>> {
        let mut woke = Woke::default();
        let mut any = false;
        if watch.poll_aborting(cx).is_ready() {
            return Poll::Ready(Err(Stop::Aborting));
        }
        // Woken: what woke the task is usually a socket now readable, seen in the readiness
        // the runtime keeps, without storing the waker again under each registration's lock
        // (one poll of that kind fewer per wait, two when the client woke it). The first
        // poll of a wait registers everything it waits for, as below; a wait that finds
        // nothing here registers again too, so it never sleeps without a waker.
        if std::mem::replace(&mut self.again, true) {
            let server_now = self.read_server && server.stream.read_ready_now();
            if server_now && self.client_seen {
                self.client_seen = false;
                return Poll::Ready(Ok(Woke {
                    server: true,
                    client: false,
                }));
            }
            let client_now = self.read_client && client.stream.read_ready_now();
            if self.read_client {
                self.client_seen = true;
            }
            if server_now || client_now {
                return Poll::Ready(Ok(Woke {
                    server: server_now,
                    client: client_now,
                }));
            }
        }
        if self.read_server {
            match server.stream.poll_read_ready(cx) {
                Poll::Ready(Ok(())) if self.client_seen => {
                    self.client_seen = false;
                    return Poll::Ready(Ok(Woke {
                        server: true,
                        client: false,
                    }));
                }
                Poll::Ready(Ok(())) => woke.server = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Stop::ServerGone(e))),
                Poll::Pending => {}
            }
        }
        if self.read_client {
            self.client_seen = true;
            match client.stream.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => woke.client = true,
                Poll::Ready(Err(_)) => return Poll::Ready(Err(Stop::ClientGone)),
                Poll::Pending => {}
            }
        }
        if self.write_client {
            match client.stream.poll_write_ready(cx) {
                Poll::Ready(Ok(())) => any = true,
                Poll::Ready(Err(_)) => return Poll::Ready(Err(Stop::ClientGone)),
                Poll::Pending => {}
            }
        }
        if self.write_server {
            match server.stream.poll_write_ready(cx) {
                Poll::Ready(Ok(())) => any = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Stop::ServerGone(e))),
                Poll::Pending => {}
            }
        }
        if self.drain && watch.poll_draining(cx).is_ready() {
            any = true;
        }
        if woke.server || woke.client || any {
            return Poll::Ready(Ok(woke));
        }
        // No clock read nor timer while the timeouts are off (the default).
        if let Some(t) = timer {
            if t.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(Stop::TimedOut));
            }
        }
        Poll::Pending
    }
}

/// A wait in the transaction passed its timeout: what ends it.
fn timed_out(
    client: &ClientConn,
    server: &ServerConn,
    out: usize,
    txn: &Txn,
    waits: &Waits,
) -> Outcome {
    // The client has been given whole messages only if nothing ready is left unwritten.
    let tell = out == 0 && server.cursor.client_between_messages();
    if waits
        .query
        .is_some_and(|s| s.elapsed() >= txn.timeouts.query)
    {
        // The server may be hung or unreachable: it is cancelled and closed, never reused.
        let error = ErrorFields::new(
            Severity::Fatal,
            "57014",
            "canceling statement due to query_timeout",
        )
        .with_hint(format!(
            "the server had not finished answering after query_timeout ({}s); the transaction was rolled back",
            txn.timeouts.query.as_secs_f64()
        ));
        return Outcome::TimedOut {
            error,
            left: Leftover::Busy,
            tell,
        };
    }
    let error = ErrorFields::new(
        Severity::Fatal,
        "25P03",
        "terminating connection due to idle_transaction_timeout",
    )
    .with_hint(format!(
        "the transaction held its server idle for idle_transaction_timeout ({}s); it was rolled back",
        txn.timeouts.idle_transaction.as_secs_f64()
    ));
    Outcome::TimedOut {
        error,
        left: txn.leftover(client, server),
        tell,
    }
}

/// The server connection broke. The client gets what was ready for it (whole messages,
/// unless a large one was streaming), if it takes it within a second.
///
/// Boxed: a rare path, whose timer and write need not add to the room every relay (and so
/// every client's task) carries.
fn server_gone<'a>(
    client: &'a mut ClientConn,
    server: &'a mut ServerConn,
    out: usize,
    why: String,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Outcome> + Send + 'a>> {
    Box::pin(flush_to_client(client, server, out, why))
}

async fn flush_to_client(
    client: &mut ClientConn,
    server: &mut ServerConn,
    out: usize,
    why: String,
) -> Outcome {
    let flushed = out == 0
        || matches!(
            tokio::time::timeout(
                std::time::Duration::from_secs(1),
                client.stream.send(&server.buf[..out]),
            )
            .await,
            Ok(Ok(()))
        );
    Outcome::ServerGone {
        why,
        between_messages: flushed && server.cursor.client_between_messages(),
    }
}

/// After a client left mid-transaction: makes the server clean again, or says it cannot.
/// Returns true when the server may be reused.
pub async fn clean_up(server: &mut ServerConn, leftover: Leftover) -> bool {
    match leftover {
        Leftover::Clean => true,
        Leftover::Busy => false,
        Leftover::IdleInTransaction { skipping } => {
            // Not a Sync first: outside a transaction block, a Sync commits what unsynced
            // extended-protocol messages did (their implicit transaction), where PostgreSQL
            // rolls it back when its client leaves. A simple query's ROLLBACK ends that
            // implicit transaction, or the block, rolling it back. Only a server that skips
            // to the next Sync (a message failed: its transaction rolls back at that Sync)
            // would ignore the ROLLBACK: it gets the Sync first.
            if skipping {
                let sync = [frontend::SYNC, 0, 0, 0, 4];
                if tokio::io::AsyncWriteExt::write_all(&mut server.stream, &sync)
                    .await
                    .is_err()
                {
                    return false;
                }
                if drain_to_ready(server).await.is_none() {
                    return false;
                }
            }
            server.simple_query("ROLLBACK").await.is_ok()
        }
    }
}

/// Reads and drops server output up to the next ReadyForQuery.
async fn drain_to_ready(server: &mut ServerConn) -> Option<()> {
    loop {
        let (tag, _) = server.read_message().await.ok()?;
        if tag == backend::READY_FOR_QUERY {
            return Some(());
        }
    }
}
