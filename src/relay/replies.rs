//! Server → client: what the server owes the client, in order, and the bytes it sends.
//!
//! Every client message that gets a reply is recorded in [`Txn::owed`] as it is passed to
//! the server. Server messages are read by header (plus ReadyForQuery's status and small
//! ErrorResponses) and complete these entries in order. Two kinds of entry exist only for
//! prepared statements: replies the proxy makes itself (a ParseComplete for a statement
//! the server already has, a CloseComplete for a client's Close), spliced into the stream
//! once everything before them is answered; and messages the proxy added (a Parse on a
//! server that lacks the statement, a Close of an evicted one), whose success replies are
//! cut out. Without such entries the bytes pass through untouched.

use std::sync::Arc;

use bytes::BytesMut;

use super::{Txn, MAX_MESSAGE};
use crate::prepared::{ClientStatements, ServerStatements, Statement};
use crate::protocol::frame::{self, FrameError, HEADER_LEN};
use crate::protocol::messages::{ErrorFields, Severity};
use crate::protocol::{backend, TransactionStatus};

/// CommandComplete messages up to this size are read whole, to see DEALLOCATE ALL.
const INSPECTED_TAG: usize = 32;
/// ErrorResponses up to this size are read whole, to recognise a few that matter.
const INSPECTED_ERROR: usize = 4096;

/// A client message that gets a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    Parse,
    Bind,
    Describe,
    Execute,
    Close,
    Sync,
    Query,
    FunctionCall,
    /// Not a reply: marks where the client ended a COPY FROM STDIN (CopyDone or CopyFail),
    /// so that the Syncs it sent during the copy, which PostgreSQL ignores, are known.
    CopyEnd,
}

impl Reply {
    /// Replied to with ReadyForQuery (and not skipped after an extended-protocol error).
    fn ends_batch(self) -> bool {
        matches!(self, Reply::Sync | Reply::Query | Reply::FunctionCall)
    }

    /// The server message that ends the reply.
    fn completed_by(self, tag: u8) -> bool {
        match self {
            Reply::Parse => tag == b'1',
            Reply::Bind => tag == b'2',
            Reply::Close => tag == b'3',
            Reply::Describe => tag == b'T' || tag == b'n',
            Reply::Execute => tag == b'C' || tag == b'I' || tag == b's',
            Reply::Sync | Reply::Query | Reply::FunctionCall => tag == backend::READY_FOR_QUERY,
            Reply::CopyEnd => false,
        }
    }
}

/// One entry of what the server owes the client.
#[derive(Debug)]
pub enum Owed {
    Reply {
        kind: Reply,
        /// A message the proxy added: its success reply is not the client's.
        internal: bool,
        /// The message is DEALLOCATE ALL or DISCARD ALL, not reported run yet (see
        /// [`Txn::clears_ahead`]).
        clears: bool,
        /// What to take back if the server fails or skips the message.
        undo: Undo,
    },
    /// A reply the proxy sends itself once everything before it is answered.
    Synthetic { reply: Synthetic, undo: Undo },
}

/// A reply the proxy makes in place of the server's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synthetic {
    /// A fixed message (ParseComplete, CloseComplete).
    Message(&'static [u8]),
    /// `DEALLOCATE name` answered: CommandComplete and ReadyForQuery.
    Deallocate,
}

/// A client's Parse of a name it has, sent as a new statement behind a clear.
#[derive(Debug)]
pub struct Redefinition {
    stmt: Arc<Statement>,
    name: Box<[u8]>,
    /// What the name meant before: put back if neither the clear nor the Parse runs (an
    /// error ahead of both skips them). Dropped once the clear is reported run.
    replaced: Option<Arc<Statement>>,
}

/// A change to the statement records made when a message was passed on, to take back if
/// PostgreSQL fails or skips the message (it skips everything up to Sync after an error).
#[derive(Debug)]
pub enum Undo {
    None,
    /// The server was to prepare `stmt`; the client named it `client_name` (a client's Parse).
    Prepare {
        stmt: Arc<Statement>,
        client_name: Option<Box<[u8]>>,
    },
    /// A client's Parse of a name it has, behind a clear in its batch that frees the name
    /// (rare: boxed, so that every entry of the queue stays small).
    Redefine(Box<Redefinition>),
    /// The client's name was registered for a Parse the proxy answered.
    Register {
        name: Box<[u8]>,
        stmt: Arc<Statement>,
    },
    /// The client's name was dropped for a Close or DEALLOCATE the proxy answered.
    Unregister {
        name: Box<[u8]>,
        stmt: Arc<Statement>,
    },
    /// The server's record dropped a statement it was about to close (an eviction).
    Evict(Arc<str>),
}

impl Undo {
    /// The undo of a Parse sent to the server: the client's own (`client_name`), which
    /// takes that name from what it meant before (`replaced`) behind a clear, or one the
    /// proxy added.
    pub(super) fn prepare(
        stmt: Arc<Statement>,
        client_name: Option<Box<[u8]>>,
        replaced: Option<Arc<Statement>>,
    ) -> Undo {
        match (client_name, replaced) {
            (Some(name), Some(old)) => Undo::Redefine(Box::new(Redefinition {
                stmt,
                name,
                replaced: Some(old),
            })),
            (client_name, _) => Undo::Prepare { stmt, client_name },
        }
    }

    pub(super) fn apply(self, clients: &mut ClientStatements, servers: &mut ServerStatements) {
        match self {
            Undo::None => {}
            Undo::Prepare { stmt, client_name } => {
                servers.forget(&stmt.server_name);
                if let Some(name) = client_name {
                    clients.remove_if(&name, &stmt);
                }
            }
            Undo::Redefine(r) => {
                servers.forget(&r.stmt.server_name);
                clients.remove_if(&r.name, &r.stmt);
                if let Some(old) = r.replaced {
                    clients.restore(&r.name, old);
                }
            }
            Undo::Register { name, stmt } => clients.remove_if(&name, &stmt),
            Undo::Unregister { name, stmt } => clients.restore(&name, stmt),
            Undo::Evict(name) => servers.restore(name),
        }
    }
}

/// Messages up to this size reach the client whole: a partly read one is held back until
/// its last byte is here. Larger ones (big rows, COPY data) stream through as they come.
/// So a server that breaks mid-message leaves the client after a whole message, where an
/// ErrorResponse can follow, unless that message is a large one.
pub const WHOLE_MESSAGE: usize = 64 * 1024;

/// Where the relay stands inside the server's message stream.
#[derive(Debug, Default, Clone, Copy)]
pub struct Cursor {
    tag: u8,
    /// Body bytes of the current message not yet seen.
    left: usize,
    /// Bytes of the current (small) message already read but held back from the client;
    /// they follow the end of what is ready for it.
    held: usize,
    /// The current message is held back until whole ([`WHOLE_MESSAGE`]).
    small: bool,
}

impl Cursor {
    pub fn at_boundary(&self) -> bool {
        self.left == 0
    }

    /// What the client has been given so far, once everything ready is written, ends
    /// between two messages.
    pub fn client_between_messages(&self) -> bool {
        self.left == 0 || self.small
    }
}

impl Txn {
    /// Records that the server owes a reply to a message just passed on. Returns false
    /// when the server will skip the message (an earlier error in the batch): the caller
    /// then takes back what it changed.
    pub(super) fn owe(&mut self, kind: Reply, internal: bool, undo: Undo) -> Option<Undo> {
        // Skipping to Sync, PostgreSQL ignores everything but a Sync, a Query included.
        if self.skipping() && kind != Reply::Sync {
            return Some(undo);
        }
        self.owed.push_back(Owed::Reply {
            kind,
            internal,
            clears: false,
            undo,
        });
        None
    }

    /// The message just owed (a Query or an Execute) is DEALLOCATE ALL or DISCARD ALL (see
    /// `clears_ahead`). Not for one the server skips (call it only when owed). One that
    /// fails (DISCARD ALL inside a transaction block, anything in a failed one) counts until
    /// its reply, like one that runs: until then nothing tells them apart.
    pub(super) fn mark_clear(&mut self) {
        if let Some(Owed::Reply { clears, .. }) = self.owed.back_mut() {
            if !*clears {
                *clears = true;
                self.clears_ahead += 1;
                if let Some(names) = &mut self.behind_clear {
                    names.clear();
                }
            }
        }
    }

    /// Owed entries that are clears not reported run (what `clears_ahead` counts); for
    /// debug assertions.
    pub(super) fn clears_owed(&self) -> usize {
        self.owed
            .iter()
            .filter(|e| matches!(e, Owed::Reply { clears: true, .. }))
            .count()
    }

    /// Takes the entry at the front of the queue out; a clear in it that was never
    /// reported run (it failed, or the server skipped it) is no longer ahead.
    #[inline]
    fn pop_owed(&mut self) -> Option<Owed> {
        let entry = self.owed.pop_front();
        if let Some(Owed::Reply { clears: true, .. }) = entry {
            debug_assert!(self.clears_ahead > 0, "clears counted");
            self.clears_ahead -= 1;
        }
        entry
    }

    /// Records a reply the proxy makes itself; false when PostgreSQL would not answer (an
    /// earlier error in the batch).
    pub(super) fn owe_synthetic(&mut self, reply: Synthetic, undo: Undo) -> Option<Undo> {
        if self.skipping() {
            return Some(undo);
        }
        self.owed.push_back(Owed::Synthetic { reply, undo });
        None
    }

    /// True while an earlier batch (closed by a Sync already passed on) holds a change to
    /// the statement records that the server may still take back by failing. A message
    /// that reads those records must wait for that batch's answer: within one batch an
    /// error skips everything after it anyway, across batches it does not. A `DEALLOCATE
    /// name` pgsluice answers is such a batch of its own: it is refused (and the name
    /// kept) if the transaction failed before it.
    pub(super) fn speculating(&self) -> bool {
        let mut changed = false;
        for entry in &self.owed {
            match entry {
                Owed::Reply { kind, .. } if kind.ends_batch() => {
                    if changed {
                        return true;
                    }
                }
                Owed::Synthetic {
                    reply: Synthetic::Deallocate,
                    ..
                } => return true,
                Owed::Reply { undo, .. } | Owed::Synthetic { undo, .. } => {
                    changed |= !matches!(undo, Undo::None)
                }
            }
        }
        false
    }
}

/// [`Txn::speculating`] asked message after message by one scan, which only appends to the
/// owed queue: each entry is looked at once, not the whole queue for every message (a run
/// of thousands of Closes of named statements in one read made that quadratic).
#[derive(Debug, Default)]
pub(super) struct Speculation {
    seen: usize,
    changed: bool,
    speculating: bool,
}

impl Speculation {
    pub(super) fn check(&mut self, txn: &Txn) -> bool {
        debug_assert!(
            self.seen <= txn.owed.len(),
            "the queue only grows during a scan"
        );
        for entry in txn.owed.range(self.seen..) {
            match entry {
                Owed::Reply { kind, .. } if kind.ends_batch() => self.speculating |= self.changed,
                Owed::Synthetic {
                    reply: Synthetic::Deallocate,
                    ..
                } => self.speculating = true,
                Owed::Reply { undo, .. } | Owed::Synthetic { undo, .. } => {
                    self.changed |= !matches!(undo, Undo::None)
                }
            }
        }
        self.seen = txn.owed.len();
        debug_assert_eq!(self.speculating, txn.speculating());
        self.speculating
    }
}

impl Txn {
    /// After DEALLOCATE ALL or DISCARD ALL cleared both records: the statement changes the
    /// scan made for messages behind it in the pipeline happen after it on the server, so
    /// they are made again, in order (a client that sends DEALLOCATE ALL and a new Parse at
    /// once keeps the new statement; a Close of the proxy's behind it runs after that Parse).
    /// A statement the proxy answered for, because the server had it, is gone from the
    /// server now: the server is closed at the end of the transaction rather than trusted
    /// with what the proxy believes it holds.
    ///
    /// What an entry behind the clear would take back if the server skipped it is then
    /// measured from the state after the clear (whether or not a later clear runs): a
    /// statement the clear dropped is not put back, one made again behind it is.
    fn redo_after_clear(&mut self, clients: &mut ClientStatements, servers: &mut ServerStatements) {
        for entry in &mut self.owed {
            let (Owed::Reply { undo, .. } | Owed::Synthetic { undo, .. }) = entry;
            match undo {
                Undo::None => {}
                Undo::Evict(name) => {
                    // The Close runs after the clear: a statement prepared again behind the
                    // clear goes again; one the clear dropped leaves nothing to put back.
                    if !servers.forget(name) {
                        *undo = Undo::None;
                    }
                }
                Undo::Prepare { stmt, client_name } => {
                    servers.restore(stmt.server_name.clone());
                    if let Some(name) = client_name {
                        clients.insert(name, stmt.clone());
                    }
                }
                Undo::Redefine(r) => {
                    // What the name meant before comes back only if it was made again
                    // behind the clear (between it and a later clear).
                    if r.replaced.as_ref().is_some_and(|old| {
                        !clients.get(&r.name).is_some_and(|s| Arc::ptr_eq(s, old))
                    }) {
                        r.replaced = None;
                    }
                    servers.restore(r.stmt.server_name.clone());
                    clients.insert(&r.name, r.stmt.clone());
                }
                Undo::Register { name, stmt } => {
                    clients.insert(name, stmt.clone());
                    self.server_in_doubt = true;
                }
                Undo::Unregister { name, stmt } => {
                    // A name made again behind the clear comes back if the Close is
                    // skipped; one the clear dropped does not.
                    let made_again = clients.get(name).is_some_and(|s| Arc::ptr_eq(s, stmt));
                    clients.remove(name);
                    if !made_again {
                        *undo = Undo::None;
                    }
                }
            }
        }
    }

    /// True when the server will skip a message passed on now: it reported an error and
    /// the Sync that ends its skipping has not been passed on yet.
    pub(super) fn skipping(&self) -> bool {
        self.errored && !self.batch_owed()
    }

    /// Whether a reply that ends with ReadyForQuery is still owed (the first one found
    /// answers: the queue is not counted through).
    pub(super) fn batch_owed(&self) -> bool {
        self.owed
            .iter()
            .any(|o| matches!(o, Owed::Reply { kind, .. } if kind.ends_batch()))
    }

    /// Entries that will not be answered, in stream order: their changes are taken back
    /// newest first.
    fn all_unanswered(
        entries: Vec<Owed>,
        clients: &mut ClientStatements,
        servers: &mut ServerStatements,
    ) {
        for entry in entries.into_iter().rev() {
            Self::unanswered(entry, clients, servers);
        }
    }

    /// An entry that will not be answered (it failed, or the server skipped it).
    fn unanswered(entry: Owed, clients: &mut ClientStatements, servers: &mut ServerStatements) {
        match entry {
            Owed::Reply { undo, .. } | Owed::Synthetic { undo, .. } => undo.apply(clients, servers),
        }
    }

    /// ReadyForQuery ended a batch whose own entry is not first in the queue: the entries
    /// before it were skipped (or it is a clear that failed).
    #[inline(never)]
    fn batch_answered_after_skips(
        &mut self,
        clients: &mut ClientStatements,
        servers: &mut ServerStatements,
    ) {
        let mut skipped = Vec::new();
        while let Some(entry) = self.pop_owed() {
            match entry {
                Owed::Reply { kind, .. } if kind.ends_batch() => break,
                other => skipped.push(other),
            }
        }
        if !skipped.is_empty() {
            Self::all_unanswered(skipped, clients, servers);
        }
    }

    /// A server message is complete.
    fn complete(
        &mut self,
        tag: u8,
        clients: &mut ClientStatements,
        servers: &mut ServerStatements,
    ) {
        if self.copy_in && (tag == backend::COMMAND_COMPLETE || tag == backend::ERROR_RESPONSE) {
            self.copy_ended();
        }
        match tag {
            backend::READY_FOR_QUERY => {
                self.copy_in = false;
                self.errored = false;
                // Usually the batch's own entry is first: nothing was skipped.
                if matches!(
                    self.owed.front(),
                    Some(Owed::Reply { kind, clears: false, .. }) if kind.ends_batch()
                ) {
                    self.owed.pop_front();
                } else {
                    self.batch_answered_after_skips(clients, servers);
                }
                self.drop_stray_copy_ends();
                self.counts.ready(self.status, !self.batch_owed());
            }
            backend::ERROR_RESPONSE => match self.owed.front() {
                Some(Owed::Reply { kind, .. }) if kind.ends_batch() => {}
                Some(_) => {
                    // An extended-protocol message failed: the server skips to the next
                    // Sync, and answers nothing before it (not a Query sent in between).
                    self.errored = true;
                    let mut skipped = Vec::new();
                    while let Some(entry) = self.owed.front() {
                        if matches!(
                            entry,
                            Owed::Reply {
                                kind: Reply::Sync,
                                ..
                            }
                        ) {
                            break;
                        }
                        skipped.push(self.pop_owed().expect("front exists"));
                    }
                    Self::all_unanswered(skipped, clients, servers);
                }
                None => {}
            },
            backend::COPY_IN_RESPONSE | backend::COPY_BOTH_RESPONSE => self.copy_in = true,
            _ => {
                if let Some(Owed::Reply { kind, undo, .. }) = self.owed.front() {
                    if kind.completed_by(tag) {
                        match undo {
                            Undo::Prepare { stmt, .. } => clients.known.insert(&stmt.server_name),
                            Undo::Redefine(r) => clients.known.insert(&r.stmt.server_name),
                            _ => {}
                        }
                        self.pop_owed();
                        self.drop_stray_copy_ends();
                    }
                }
            }
        }
    }

    /// The server left COPY FROM STDIN (CommandComplete, or an ErrorResponse). PostgreSQL
    /// ignores Sync and Flush while it copies in, so the Syncs the client sent between the
    /// Execute that started the copy and its CopyDone or CopyFail get no ReadyForQuery
    /// (tokio-postgres sends Bind, Execute, Sync, then the data, CopyDone, Sync): they leave
    /// the queue with the CopyEnd marker. A copy the server ended with an error before the
    /// client finished has no marker yet: every Sync owed came during the copy, and the
    /// CopyDone or CopyFail still to come gets no marker.
    fn copy_ended(&mut self) {
        self.copy_in = false;
        let end = self.owed.iter().position(|e| {
            matches!(
                e,
                Owed::Reply {
                    kind: Reply::CopyEnd,
                    ..
                }
            )
        });
        if end.is_none() {
            self.copy_end_pending = true;
        }
        let end = end.unwrap_or(self.owed.len());
        let mut at = 0;
        self.owed.retain(|e| {
            let during = at <= end
                && matches!(
                    e,
                    Owed::Reply {
                        kind: Reply::Sync | Reply::CopyEnd,
                        ..
                    }
                );
            at += 1;
            !during
        });
    }

    /// The server is in COPY FROM STDIN and the client has not ended it (no CopyDone or
    /// CopyFail sent): the server waits for the client's data.
    pub(super) fn awaits_copy_data(&self) -> bool {
        self.copy_in
            && !self.owed.iter().any(|e| {
                matches!(
                    e,
                    Owed::Reply {
                        kind: Reply::CopyEnd,
                        ..
                    }
                )
            })
    }

    /// The client sent CopyDone or CopyFail: marks it (see [`Txn::copy_ended`]). With no
    /// COPY running and nothing owed that could start one, PostgreSQL ignores the message,
    /// and so does the proxy.
    pub(super) fn copy_end_sent(&mut self) {
        if std::mem::take(&mut self.copy_end_pending) {
            return;
        }
        if !self.copy_in && self.owed.is_empty() {
            return;
        }
        let _ = self.owe(Reply::CopyEnd, false, Undo::None);
    }

    /// Everything before a CopyEnd marker is answered and no COPY runs: the CopyDone or
    /// CopyFail it marks came outside a COPY (a COPY that failed before it began, or a
    /// stray one), and PostgreSQL ignored it. Left in the queue, the marker would take the
    /// place of the next reply: an ErrorResponse would be matched to it, and the replies
    /// behind it to the wrong requests.
    #[inline]
    fn drop_stray_copy_ends(&mut self) {
        while !self.copy_in
            && matches!(
                self.owed.front(),
                Some(Owed::Reply {
                    kind: Reply::CopyEnd,
                    ..
                })
            )
        {
            self.owed.pop_front();
        }
    }

    /// True when `tag` ends a reply to a message the proxy added (the client must not see it).
    fn swallows(&self, tag: u8) -> bool {
        matches!(self.owed.front(), Some(Owed::Reply { kind, internal: true, .. }) if tag != backend::ERROR_RESPONSE && kind.completed_by(tag))
    }

    /// Notes what an ErrorResponse means for the server's reuse.
    fn inspect_error(&mut self, body: &[u8]) {
        let e = ErrorFields::parse(body);
        // A cached plan that no longer matches its statement (after DDL) fails on this
        // server until the statement is prepared again; a proxy-named statement the server
        // does not have means the proxy's record is wrong. Either way: retire the server.
        let stale_plan = e.code == "0A000"
            && e.message
                .contains("cached plan must not change result type");
        let wrong_record = e.code == "26000" && e.message.contains("pgsluice_");
        if stale_plan || wrong_record {
            self.server_in_doubt = true;
        }
        // A standby, or a primary made read-only: the pool decides (it may be for writes).
        if e.code == "25006" {
            self.read_only_error = true;
        }
    }
}

/// Splices in the proxy's own replies that are due (everything before them is answered)
/// at `at`, the end of what is ready for the client. Inlined to a check of the queue's
/// front: it runs for every server message and every turn of the relay (7 times per
/// select), and there is almost never anything to splice.
#[inline]
pub(super) fn emit_due(
    buf: &mut BytesMut,
    at: &mut usize,
    txn: &mut Txn,
    clients: &mut ClientStatements,
) {
    if matches!(txn.owed.front(), Some(Owed::Synthetic { .. })) {
        splice_due(buf, at, txn, clients);
    }
}

#[inline(never)]
fn splice_due(buf: &mut BytesMut, at: &mut usize, txn: &mut Txn, clients: &mut ClientStatements) {
    // All the replies due go in with one move of the bytes behind them (thousands of
    // CloseCompletes may be due at once, each moving up to HIGH_WATER bytes otherwise).
    let mut due = Vec::new();
    while let Some(Owed::Synthetic { .. }) = txn.owed.front() {
        let Some(Owed::Synthetic { reply, undo }) = txn.owed.pop_front() else {
            unreachable!("the front is a synthetic reply")
        };
        match reply {
            Synthetic::Message(m) => due.extend_from_slice(m),
            Synthetic::Deallocate if txn.status == TransactionStatus::Failed => {
                // The transaction failed before it (a statement ahead of it in the same
                // pipeline): PostgreSQL refuses every command but the end of the block, so
                // the client keeps the statement.
                if let Undo::Unregister { name, stmt } = undo {
                    clients.restore(&name, stmt);
                }
                let mut refusal = BytesMut::new();
                ErrorFields::new(
                    Severity::Error,
                    "25P02",
                    "current transaction is aborted, commands ignored until end of transaction block",
                )
                .encode(&mut refusal);
                due.extend_from_slice(&refusal);
                due.extend_from_slice(&[backend::READY_FOR_QUERY, 0, 0, 0, 5, b'E']);
                txn.counts.ready(txn.status, !txn.batch_owed());
            }
            Synthetic::Deallocate => {
                due.extend_from_slice(&[b'C', 0, 0, 0, 15]);
                due.extend_from_slice(b"DEALLOCATE\0");
                due.extend_from_slice(&[
                    backend::READY_FOR_QUERY,
                    0,
                    0,
                    0,
                    5,
                    txn.status.as_byte(),
                ]);
                txn.counts.ready(txn.status, !txn.batch_owed());
            }
        }
    }
    splice(buf, *at, 0, &due);
    *at += due.len();
}

/// Replaces `remove` bytes at `at` with `insert`, in place: the buffer stays one unshared
/// allocation (a `split_off` would make it shared, and a shared buffer's `capacity` and
/// `try_reclaim` no longer tell how large its allocation is: one a long message grew could
/// then pass for a small one and be kept).
pub(super) fn splice(buf: &mut BytesMut, at: usize, remove: usize, insert: &[u8]) {
    let (len, end) = (buf.len(), at + remove);
    let new_len = len - remove + insert.len();
    if new_len > len {
        buf.resize(new_len, 0);
    }
    buf.copy_within(end..len, at + insert.len());
    buf[at..at + insert.len()].copy_from_slice(insert);
    buf.truncate(new_len);
}

/// Reads the server bytes after `buf[..ready]` (what is ready for the client): completes
/// owed replies, splices. Returns the new end of what is ready for the client; bytes after
/// it (a partial header, a message under [`WHOLE_MESSAGE`] not yet whole) wait for more.
pub(super) fn process(
    buf: &mut BytesMut,
    ready: usize,
    cursor: &mut Cursor,
    txn: &mut Txn,
    clients: &mut ClientStatements,
    servers: &mut ServerStatements,
) -> Result<usize, FrameError> {
    // Bytes held back last time were read already.
    let mut start = ready;
    let mut at = ready + cursor.held;
    cursor.held = 0;
    loop {
        if cursor.left > 0 {
            let n = cursor.left.min(buf.len() - at);
            at += n;
            cursor.left -= n;
            if cursor.left > 0 {
                if cursor.small {
                    cursor.held = at - start;
                    return Ok(start);
                }
                return Ok(at);
            }
            txn.complete(cursor.tag, clients, servers);
            continue;
        }
        emit_due(buf, &mut at, txn, clients);
        let Some((tag, total)) = frame::header(&buf[at..], MAX_MESSAGE)? else {
            return Ok(at);
        };
        let inspect = tag == backend::READY_FOR_QUERY
            || (tag == backend::ERROR_RESPONSE && total <= INSPECTED_ERROR)
            || (tag == backend::COMMAND_COMPLETE && total <= INSPECTED_TAG);
        if inspect && buf.len() - at < total {
            return Ok(at);
        }
        match tag {
            backend::READY_FOR_QUERY => {
                // Its status byte, never the next message's first (a server that sent
                // ReadyForQuery without one is broken, and is closed).
                if total != HEADER_LEN + 1 {
                    return Err(FrameError::WrongLength {
                        tag: tag as char,
                        len: total - 1,
                        expected: 5,
                    });
                }
                if let Some(s) = TransactionStatus::from_byte(buf[at + HEADER_LEN]) {
                    txn.status = s;
                }
            }
            backend::ERROR_RESPONSE if inspect => {
                txn.inspect_error(&buf[at + HEADER_LEN..at + total])
            }
            backend::COMMAND_COMPLETE if inspect => {
                // DEALLOCATE ALL or DISCARD ALL ran, however it was sent: the server has no
                // prepared statement left, and neither has the client.
                let tag = &buf[at + HEADER_LEN..at + total];
                if tag == b"DEALLOCATE ALL\0" || tag == b"DISCARD ALL\0" {
                    // The clear at the front of the queue is reported; one the proxy did
                    // not see coming (inside a multi-statement query) was never counted.
                    let behind = txn.owed.len() > 1;
                    match txn.owed.front_mut() {
                        Some(Owed::Reply { clears, .. }) if *clears => {
                            *clears = false;
                            txn.clears_ahead -= 1;
                        }
                        // Not seen coming: messages behind it may have been rewritten for
                        // statements the server no longer has (a Parse of a name the
                        // client had went out under that statement's server name).
                        _ if behind => txn.server_in_doubt = true,
                        _ => {}
                    }
                    clients.clear();
                    servers.clear();
                    txn.redo_after_clear(clients, servers);
                } else if tag == b"DEALLOCATE\0" && txn.transaction_mode {
                    // The proxy answers DEALLOCATE of the client's own names; one the server
                    // ran dropped a statement the client never named (another client's,
                    // by its server name): the proxy's record of this server is wrong now.
                    txn.server_in_doubt = true;
                }
            }
            _ => {}
        }
        if txn.swallows(tag) {
            if buf.len() - at < total {
                return Ok(at); // cut it out whole
            }
            splice(buf, at, total, &[]);
            txn.complete(tag, clients, servers);
            continue;
        }
        cursor.tag = tag;
        cursor.left = total - HEADER_LEN;
        cursor.small = total <= WHOLE_MESSAGE;
        start = at;
        at += HEADER_LEN;
        if cursor.left == 0 {
            txn.complete(tag, clients, servers);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Buf;
    use proptest::prelude::*;

    proptest! {
        /// `splice` is `Vec::splice`, and the buffer stays one unshared allocation: emptied,
        /// it gives all its room back (a shared one would hide it, see `splice`).
        #[test]
        fn splice_replaces_in_place(
            text in proptest::collection::vec(any::<u8>(), 0..64),
            at in 0usize..64,
            remove in 0usize..64,
            insert in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let at = at.min(text.len());
            let remove = remove.min(text.len() - at);
            let mut buf = BytesMut::with_capacity(1 << 16);
            buf.extend_from_slice(&text);
            splice(&mut buf, at, remove, &insert);
            let mut want = text.clone();
            want.splice(at..at + remove, insert.iter().copied());
            prop_assert_eq!(&buf[..], &want[..]);
            buf.clear();
            prop_assert!(buf.try_reclaim(1));
            prop_assert!(buf.capacity() >= 1 << 16, "{}", buf.capacity());
        }
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    /// Feeds `wire` in chunks of the given sizes; returns what the client gets.
    fn run(txn: &mut Txn, wire: &[u8], cuts: &[usize]) -> Vec<u8> {
        run_counting(txn, wire, cuts, &mut Vec::new())
    }

    /// [`run`], also noting where each delivery to the client ended.
    fn run_counting(
        txn: &mut Txn,
        wire: &[u8],
        cuts: &[usize],
        deliveries: &mut Vec<usize>,
    ) -> Vec<u8> {
        let (mut clients, mut servers) = (ClientStatements::default(), ServerStatements::default());
        let mut cursor = Cursor::default();
        let mut buf = BytesMut::new();
        let mut ready = 0;
        let mut out = Vec::new();
        let mut rest = wire;
        let mut i = 0;
        while !rest.is_empty() {
            let n = cuts[i % cuts.len()].clamp(1, rest.len());
            buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            ready = process(
                &mut buf,
                ready,
                &mut cursor,
                txn,
                &mut clients,
                &mut servers,
            )
            .unwrap();
            out.extend_from_slice(&buf[..ready]);
            deliveries.push(out.len());
            buf.advance(ready);
            ready = 0;
            i += 1;
        }
        assert!(buf.is_empty() && cursor.at_boundary());
        out
    }

    /// A ReadyForQuery without its status byte is a broken server, not a status read
    /// from the message after it.
    #[test]
    fn a_ready_for_query_without_its_status_is_refused() {
        let mut txn = Txn::new(true);
        let _ = txn.owe(Reply::Query, false, Undo::None);
        let (mut clients, mut servers) = (ClientStatements::default(), ServerStatements::default());
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&msg(b'C', b"SELECT 1\0"));
        buf.extend_from_slice(&msg(backend::READY_FOR_QUERY, b""));
        buf.extend_from_slice(&msg(b'E', b"SFATAL\0\0"));
        let mut cursor = Cursor::default();
        let r = process(
            &mut buf,
            0,
            &mut cursor,
            &mut txn,
            &mut clients,
            &mut servers,
        );
        assert!(
            matches!(
                r,
                Err(FrameError::WrongLength {
                    tag: 'Z',
                    len: 4,
                    expected: 5
                })
            ),
            "{r:?}"
        );
        assert_eq!(txn.status, TransactionStatus::Idle);
    }

    fn stmt() -> Arc<Statement> {
        Arc::new(Statement::from_parse(b"SELECT 1\0\0\0"))
    }

    proptest! {
        /// Whatever the chunking: a Parse the proxy added is answered out of sight, a
        /// ParseComplete the proxy owes is placed after the replies before it, and the
        /// transaction ends at the last ReadyForQuery.
        #[test]
        fn splicing_is_chunking_independent(rows in 0usize..20, cuts in proptest::collection::vec(1usize..40, 1..20)) {
            let mut txn = Txn::new(true);
            // Client: Execute (earlier portal), Parse(known: synthetic), internal Parse, Bind, Execute, Sync.
            txn.owe(Reply::Execute, false, Undo::None);
            txn.owe_synthetic(Synthetic::Message(crate::prepared::PARSE_COMPLETE), Undo::None);
            txn.owe(Reply::Parse, true, Undo::Prepare { stmt: stmt(), client_name: None });
            txn.owe(Reply::Bind, false, Undo::None);
            txn.owe(Reply::Execute, false, Undo::None);
            txn.owe(Reply::Sync, false, Undo::None);
            let mut server: Vec<u8> = Vec::new();
            let mut expected: Vec<u8> = Vec::new();
            for r in 0..rows {
                let d = msg(b'D', format!("row{r}").as_bytes());
                server.extend(&d);
                expected.extend(&d);
            }
            let c1 = msg(b'C', b"SELECT 1\0");
            server.extend(&c1);
            expected.extend(&c1);
            expected.extend(crate::prepared::PARSE_COMPLETE);
            server.extend(msg(b'1', b"")); // swallowed
            for m in [msg(b'2', b""), msg(b'D', b"x"), msg(b'C', b"SELECT 1\0"), msg(b'Z', b"I")] {
                server.extend(&m);
                expected.extend(&m);
            }
            let out = run(&mut txn, &server, &cuts);
            prop_assert_eq!(out, expected);
            prop_assert!(txn.owed.is_empty());
            prop_assert_eq!(txn.status, TransactionStatus::Idle);
        }
    }

    /// Offsets where each message of `wire` ends.
    fn boundaries(wire: &[u8]) -> Vec<usize> {
        let mut out = vec![0];
        let mut at = 0;
        while at < wire.len() {
            let len = i32::from_be_bytes(wire[at + 1..at + 5].try_into().unwrap()) as usize;
            at += 1 + len;
            out.push(at);
        }
        out
    }

    proptest! {
        /// However the server's bytes are cut, the client is only ever given whole messages
        /// when they are small; a large one streams through in pieces.
        #[test]
        fn small_messages_reach_the_client_whole(
            sizes in proptest::collection::vec(0usize..3000, 1..30),
            cuts in proptest::collection::vec(1usize..5000, 1..20),
        ) {
            let mut txn = Txn::new(true);
            txn.owe(Reply::Query, false, Undo::None);
            let mut wire = Vec::new();
            for n in &sizes {
                wire.extend(msg(b'D', &vec![b'x'; *n]));
            }
            let big = msg(b'd', &vec![b'y'; WHOLE_MESSAGE + 10]);
            wire.extend(&big);
            wire.extend(msg(b'C', b"SELECT 1\0"));
            wire.extend(msg(b'Z', b"I"));
            let mut deliveries = Vec::new();
            let out = run_counting(&mut txn, &wire, &cuts, &mut deliveries);
            prop_assert_eq!(&out, &wire);
            let ends = boundaries(&wire);
            let big_at = wire.len() - big.len() - 14 - 6;
            for d in deliveries {
                let inside_big = d > big_at && d < big_at + big.len();
                prop_assert!(ends.contains(&d) || inside_big, "delivery ends at {} mid-message", d);
            }
        }
    }

    #[test]
    fn an_error_skips_to_sync_and_undoes_a_failed_prepare() {
        let mut txn = Txn::new(true);
        let s = stmt();
        let (mut clients, mut servers) = (ClientStatements::default(), ServerStatements::default());
        clients.insert(b"s1", s.clone());
        servers.add(s.server_name.clone(), 10);
        txn.owe(
            Reply::Parse,
            false,
            Undo::Prepare {
                stmt: s.clone(),
                client_name: Some(b"s1".to_vec().into()),
            },
        );
        txn.owe(Reply::Bind, false, Undo::None);
        // A Close the proxy answered; skipped after the error, so the client keeps "s2".
        clients.remove(b"s2");
        txn.owe_synthetic(
            Synthetic::Message(crate::prepared::CLOSE_COMPLETE),
            Undo::Unregister {
                name: b"s2".to_vec().into(),
                stmt: s.clone(),
            },
        );
        txn.owe(Reply::Execute, false, Undo::None);
        txn.owe(Reply::Sync, false, Undo::None);
        let mut wire = msg(b'E', b"SERROR\0C42601\0Msyntax error\0\0");
        wire.extend(msg(b'Z', b"I"));
        let mut buf = BytesMut::from(&wire[..]);
        let mut cursor = Cursor::default();
        let end = process(
            &mut buf,
            0,
            &mut cursor,
            &mut txn,
            &mut clients,
            &mut servers,
        )
        .unwrap();
        assert_eq!(
            &buf[..end],
            &wire[..],
            "the error and ReadyForQuery pass; no CloseComplete after the error"
        );
        assert!(txn.owed.is_empty());
        assert!(
            clients.get(b"s1").is_none(),
            "a failed Parse is not registered"
        );
        assert!(!servers.touch(&s.server_name));
    }

    /// Every message owes an entry: the queue's entries stay small (a rare case's data is
    /// boxed).
    #[test]
    fn owed_entries_stay_small() {
        assert!(std::mem::size_of::<Undo>() <= 32);
        assert!(std::mem::size_of::<Owed>() <= 48);
    }

    #[test]
    fn stale_plan_errors_retire_the_server() {
        let mut txn = Txn::new(true);
        txn.owe(Reply::Execute, false, Undo::None);
        txn.owe(Reply::Sync, false, Undo::None);
        let mut wire = msg(
            b'E',
            b"SERROR\0C0A000\0Mcached plan must not change result type\0\0",
        );
        wire.extend(msg(b'Z', b"I"));
        run(&mut txn, &wire, &[3]);
        assert!(txn.server_in_doubt);
    }
}
