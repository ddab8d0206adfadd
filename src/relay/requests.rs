//! Client → server: the messages a client sends while it holds a server.
//!
//! Messages are marked ready for the server by header and streamed through. Query and Parse
//! are held until whole, to check their text for session state ([`crate::sql`]). Under
//! transaction pooling, named statements are rewritten ([`crate::prepared`]): a Parse the
//! server already has is answered by the proxy, a Bind, Describe or Close names the
//! server-side statement, and a statement the server lacks is prepared first.

use std::sync::Arc;

use crate::stream::Stream;
use bytes::{Buf, BytesMut};

use super::replies::{splice, Reply, Speculation, Synthetic, Undo};
use super::{
    frame_violation, raise_sql, violation, Txn, MAX_HELD_MESSAGE, MAX_MESSAGE, READ_CHUNK,
};
use crate::prepared::{
    close_message, ClientStatements, KnownStatements, ServerStatements, Statement, CLOSE_COMPLETE,
    MAX_CLIENT_STATEMENTS, PARSE_COMPLETE,
};
use crate::protocol::frame::{self, HEADER_LEN};
use crate::protocol::frontend;
use crate::protocol::messages::{self, CStrings, ErrorFields, Severity};
use crate::relay::TransactionStatus;
use crate::sql::{self, Deallocate, Refusal, SessionEffects};

/// See [`ClientConn::behind_clear`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BehindClear {
    /// No clear ahead drops the name.
    No,
    /// Wait for the answer of an earlier batch, which may hold the clear.
    Wait,
    /// The clear ahead, in this batch, drops the name first.
    Dropped,
}

/// Longest statement or portal name the proxy reads before a Bind's parameters.
const MAX_NAME: usize = 1024;

/// The client side of a connection after login. The scanning never touches `stream`; it
/// is a type parameter only so that the fuzz targets ([`crate::fuzzing`]) can drive the
/// scanning without a socket.
#[derive(Debug)]
pub struct ClientConn<S = Stream> {
    pub stream: S,
    /// `buf[..ready]` is scanned and ready for the server; the rest is not yet scanned.
    pub buf: BytesMut,
    pub ready: usize,
    /// Bytes of a message being streamed through that have not arrived yet.
    pub(super) pass: usize,
    /// Bytes of a message the proxy drops (stray COPY data, a refused request) that have not
    /// arrived yet: dropped as they come, never buffered.
    skip: usize,
    pub max_query_size: u32,
    /// Named statements a server may hold per connection in transaction mode (0: named
    /// statements are refused there).
    pub max_prepared: u32,
    /// The client's session has `standard_conforming_strings` off: a backslash escapes in
    /// `'…'`, which moves where its statements begin ([`sql::classify`]).
    pub escape_strings: bool,
    /// The client's named statements (transaction mode).
    pub statements: ClientStatements,
}

/// The first message a client sent while holding no server.
#[derive(Debug, PartialEq, Eq)]
pub enum Peek {
    /// More bytes are needed.
    NeedMore,
    /// A message that needs a server (tag; whole message buffered unless it is huge).
    Ready(u8),
    /// Sync, Flush or COPY messages with no server: answered or dropped by the proxy
    /// (`total` bytes long, of which stray COPY data may not all be here yet: see
    /// [`ClientConn::discard`]).
    Local(u8, usize),
    Terminate,
}

fn unknown_message(tag: u8) -> ErrorFields {
    violation(format!(
        "invalid frontend message type {} ({:?})",
        tag, tag as char
    ))
}

fn query_too_long(len: usize, max: usize) -> ErrorFields {
    ErrorFields::new(
        Severity::Fatal,
        "54000",
        format!("message of {len} bytes is over pgsluice's max_query_size ({max} bytes)"),
    )
}

fn too_many_statements() -> ErrorFields {
    ErrorFields::new(
        Severity::Fatal,
        "54000",
        format!(
            "too many prepared statements: a client may hold {MAX_CLIENT_STATEMENTS} named statements through pgsluice"
        ),
    )
    .with_hint("close the statements the client no longer uses (Close, DEALLOCATE), or use unnamed statements")
}

fn refuse(r: Refusal) -> ErrorFields {
    // Within the extended protocol a refusal cannot be placed in the stream cleanly, so the
    // client is told and disconnected; its transaction rolls back.
    ErrorFields::new(Severity::Fatal, "0A000", r.message()).with_hint(r.hint())
}

impl ClientConn {
    /// Reads what the client sent into the buffer (`Ok(0)`: end of stream). A client that
    /// fills the room it was offered (a bulk upload, a big batch) gets a buffer with room for
    /// [`READ_CHUNK`] from then on, until it next waits with nothing buffered.
    pub fn read_some(&mut self) -> std::io::Result<usize> {
        let big = self.buf.capacity() >= READ_CHUNK;
        let mut room = if big { READ_CHUNK } else { CLIENT_BUFFER };
        // Emptied by relaying, the buffer's room before the read position is taken back
        // (no allocation: within a transaction a client reads every statement into the same
        // buffer). What a queued request was kept in (all relayed by now) is too small for
        // that, and one a long message grew is freed: a buffer is taken instead.
        if self.buf.is_empty()
            && (self.buf.capacity() > 2 * READ_CHUNK
                || self.buf.capacity() < CLIENT_BUFFER
                    && !(self.buf.try_reclaim(CLIENT_BUFFER)
                        && self.buf.capacity() <= 2 * READ_CHUNK))
        {
            self.buf = take_buffer();
        }
        // The rest of a long Query or Parse, which is held whole, is read in reads as large as
        // what has arrived of it (and the last one exactly to its end), not 32 KiB at a time
        // with the buffer doubling (and copied) every few reads. Bounded by the bytes that
        // came: a header alone, claiming max_query_size, makes no allocation of that size.
        if let Some(rest) = self.held_rest() {
            room = room.max(rest.min(self.buf.len().max(READ_CHUNK)));
        }
        self.buf.reserve(room);
        let n = self.stream.read_some(&mut self.buf, room)?;
        if n == room && !big {
            self.buf.reserve(READ_CHUNK);
        }
        if self.skip > 0 {
            self.drop_skipped();
        }
        Ok(n)
    }

    /// Gives the read buffer back for another client of this thread (at the client's end).
    pub fn release_buffer(&mut self) {
        if self.buf.capacity() > 0 {
            give_buffer(std::mem::take(&mut self.buf));
        }
    }

    /// Reads more bytes into the buffer; `Ok(false)` at end of stream. Cancel-safe.
    ///
    /// A client waiting with nothing buffered holds no buffer: it gives it back to this
    /// thread's spares while it waits, and takes one when bytes arrive. Idle clients then
    /// cost their socket and task only, and a buffer a big message grew is freed.
    pub async fn read_more(&mut self) -> std::io::Result<bool> {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            give_buffer(std::mem::take(&mut self.buf));
        }
        loop {
            self.stream.readable().await?;
            if self.buf.capacity() == 0 {
                self.buf = take_buffer();
            }
            match self.read_some() {
                Ok(n) => return Ok(n > 0),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // The readiness was stale: wait without a buffer again.
                    if self.buf.is_empty() {
                        give_buffer(std::mem::take(&mut self.buf));
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// [`ClientConn::read_more`] as a poll, for a parked client: `true` once bytes arrived
    /// (read into the buffer, where the client's next request is looked for), `false` at end
    /// of stream or on an error. Readiness left over from an earlier read costs one `recv`
    /// that finds nothing, and the wait goes on without a buffer.
    pub fn poll_input(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<bool> {
        loop {
            match self.stream.poll_read_ready(cx) {
                std::task::Poll::Pending => return std::task::Poll::Pending,
                std::task::Poll::Ready(Err(_)) => return std::task::Poll::Ready(false),
                std::task::Poll::Ready(Ok(())) => {}
            }
            if self.buf.capacity() == 0 {
                self.buf = take_buffer();
            }
            match self.read_some() {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if self.buf.is_empty() {
                        give_buffer(std::mem::take(&mut self.buf));
                    }
                }
                Ok(n) => return std::task::Poll::Ready(n > 0),
                Err(_) => return std::task::Poll::Ready(false),
            }
        }
    }
}

/// Sync, Flush and CopyDone are a header alone (PostgreSQL refuses them with a body too).
fn check_no_body(tag: u8, total: usize) -> Result<(), ErrorFields> {
    if total == HEADER_LEN {
        return Ok(());
    }
    let name = match tag {
        frontend::SYNC => "Sync",
        frontend::FLUSH => "Flush",
        _ => "CopyDone",
    };
    Err(violation(format!(
        "malformed {name} message: length {} (a {name} has no body)",
        total - 1
    )))
}

/// The C string at the start of `s`, if its terminator is within `limit` bytes.
fn cstr(s: &[u8], limit: usize) -> Option<&[u8]> {
    memchr::memchr(0, &s[..s.len().min(limit + 1)]).map(|end| &s[..end])
}

thread_local! {
    /// Read buffers of clients that went idle, for the next client on this thread that reads.
    static SPARE_BUFFERS: std::cell::RefCell<Vec<BytesMut>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The longest request a queued client keeps in an allocation of its own size
/// ([`ClientConn::shrink_while_queued`]); a longer one keeps its read buffer.
const QUEUED_COPY_MAX: usize = 1024;

/// Spare buffers kept per thread.
const MAX_SPARE_BUFFERS: usize = 64;

/// A client's read buffer to begin with: room for the short messages most clients send. It
/// is one of the allocator's small size classes, so taking and freeing one is cheap when
/// more clients hold one at once than the spares cover (a login storm, hundreds of clients
/// queued with their next query); a large one (32 KiB) cost ~4,600 instructions a client.
const CLIENT_BUFFER: usize = 8 * 1024;

fn take_buffer() -> BytesMut {
    SPARE_BUFFERS
        .with(|s| s.borrow_mut().pop())
        .unwrap_or_else(|| BytesMut::with_capacity(CLIENT_BUFFER))
}

fn give_buffer(mut b: BytesMut) {
    b.clear();
    // Only a buffer of the usual size is kept (its room before the read position taken back):
    // one a big message or a bulk upload grew, or a queued request's own copy, is freed.
    if !b.try_reclaim(CLIENT_BUFFER) || b.capacity() > CLIENT_BUFFER {
        return;
    }
    SPARE_BUFFERS.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < MAX_SPARE_BUFFERS {
            s.push(b);
        }
    });
}

impl<S> ClientConn<S> {
    /// Whether the scan waits for the rest of a message it must hold whole and that may
    /// be long: a Query or Parse, up to `max_query_size`. (Other messages it looks into are
    /// short, and one that waits behind an earlier batch is not read further than
    /// [`super::HIGH_WATER`].)
    pub(super) fn holding(&self) -> bool {
        self.held_rest().is_some()
    }

    /// Bytes still to come of a Query or Parse at the front of the unscanned input, when one
    /// is there in part (and within `max_query_size`: a longer one is refused from its header).
    fn held_rest(&self) -> Option<usize> {
        if self.pass != 0 {
            return None;
        }
        let unscanned = &self.buf[self.ready..];
        match frame::header(unscanned, MAX_MESSAGE) {
            Ok(Some((frontend::QUERY | frontend::PARSE, total)))
                if total > unscanned.len() && total - 1 <= self.max_query_size as usize =>
            {
                Some(total - unscanned.len())
            }
            _ => None,
        }
    }

    /// Keeps a short request in an allocation of its own size while its client waits for a
    /// server, and gives the read buffer back to this thread's spares. A crowd queued for a
    /// pool (a login storm, hundreds of clients behind twenty servers) would otherwise hold a
    /// read buffer each, more than the spares cover, and every one of them would be taken
    /// from and given back to the allocator's slow path.
    pub fn shrink_while_queued(&mut self) {
        let len = self.buf.len();
        // A buffer this small is a request's own copy already (or a login's leftover).
        if len > QUEUED_COPY_MAX || self.buf.capacity() <= QUEUED_COPY_MAX {
            return;
        }
        let own = if len == 0 {
            BytesMut::new()
        } else {
            BytesMut::from(&self.buf[..])
        };
        give_buffer(std::mem::replace(&mut self.buf, own));
    }

    pub fn new(
        stream: S,
        max_query_size: usize,
        max_prepared: usize,
        known: Arc<KnownStatements>,
    ) -> ClientConn<S> {
        ClientConn {
            stream,
            buf: BytesMut::new(),
            ready: 0,
            pass: 0,
            skip: 0,
            // Both fit: a message's length is an i32, and so is a count of statements.
            max_query_size: max_query_size.min(i32::MAX as usize) as u32,
            max_prepared: max_prepared.min(i32::MAX as usize) as u32,
            escape_strings: false,
            statements: ClientStatements::new(known),
        }
    }

    /// Looks at the first unscanned message while the client holds no server.
    pub fn peek(&self) -> Result<Peek, ErrorFields> {
        let Some((tag, total)) =
            frame::header(&self.buf[self.ready..], MAX_MESSAGE).map_err(frame_violation)?
        else {
            return Ok(Peek::NeedMore);
        };
        let whole = self.buf.len() - self.ready >= total;
        match tag {
            frontend::TERMINATE => Ok(Peek::Terminate),
            frontend::SYNC | frontend::FLUSH | frontend::COPY_DONE => {
                check_no_body(tag, total)?;
                Ok(if whole {
                    Peek::Local(tag, total)
                } else {
                    Peek::NeedMore
                })
            }
            // Dropped (as PostgreSQL does out of a COPY) as they arrive, however long.
            frontend::COPY_DATA | frontend::COPY_FAIL => Ok(Peek::Local(tag, total)),
            frontend::QUERY | frontend::PARSE => {
                if total - 1 > self.max_query_size as usize {
                    return Err(query_too_long(total - 1, self.max_query_size as usize));
                }
                Ok(if whole {
                    Peek::Ready(tag)
                } else {
                    Peek::NeedMore
                })
            }
            frontend::BIND
            | frontend::DESCRIBE
            | frontend::EXECUTE
            | frontend::CLOSE
            | frontend::FUNCTION_CALL => {
                // A client that sent half a message holds no server while it stalls.
                Ok(if whole || total > MAX_HELD_MESSAGE {
                    Peek::Ready(tag)
                } else {
                    Peek::NeedMore
                })
            }
            other => Err(unknown_message(other)),
        }
    }

    /// With no server: a named Parse followed by Sync or Flush, of a statement some server
    /// prepared before, is answered here (ParseComplete, and ReadyForQuery for a Sync). A
    /// client that prepares while another holds the last server (pgbench does, synchronously)
    /// then need not wait. The statement is prepared on a server when first used; if it no
    /// longer prepares, the error comes then. Returns the reply to send, if answered.
    pub fn answer_parse(&mut self) -> Option<Vec<u8>> {
        if self.max_prepared == 0 || self.ready != 0 {
            return None;
        }
        let (tag, total) = frame::header(&self.buf, MAX_MESSAGE).ok()??;
        if tag != frontend::PARSE || self.buf.len() < total {
            return None;
        }
        let (next, next_total) = frame::header(&self.buf[total..], MAX_MESSAGE).ok()??;
        // A Sync or Flush with a body is left to the scan, which refuses it.
        if !(next == frontend::SYNC || next == frontend::FLUSH)
            || next_total != HEADER_LEN
            || self.buf.len() < total + next_total
        {
            return None;
        }
        let body = &self.buf[HEADER_LEN..total];
        // A name in use must fail on the server (42P05), as in PostgreSQL.
        let name = cstr(body, MAX_NAME).filter(|n| {
            !n.is_empty()
                && self.statements.get(n).is_none()
                && self.statements.len() < MAX_CLIENT_STATEMENTS
        })?;
        let after_name = &body[name.len() + 1..];
        // A statement transaction pooling refuses is left to the scan, which says why.
        let mut effects = SessionEffects::default();
        let text = CStrings(after_name).next_str()?;
        if sql::classify(text, true, self.escape_strings, &mut effects).is_some() {
            return None;
        }
        let stmt = Statement::from_parse(after_name).with_effects(effects);
        if !self.statements.known.contains(&stmt.server_name) {
            return None;
        }
        let name = name.to_vec();
        self.statements.insert(&name, Arc::new(stmt));
        let mut reply = PARSE_COMPLETE.to_vec();
        if next == frontend::SYNC {
            reply.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'I']);
        }
        self.buf.advance(total + next_total);
        Some(reply)
    }

    /// Drops a message of `total` bytes at the front, a message the proxy handled itself;
    /// what has not arrived of it yet is dropped as it comes (see `skip`).
    pub fn discard(&mut self, total: usize) {
        debug_assert_eq!((self.ready, self.pass, self.skip), (0, 0, 0));
        let here = total.min(self.buf.len());
        self.buf.advance(here);
        self.skip = total - here;
    }

    /// Drops what arrived of a message being dropped (then the only bytes buffered).
    pub(super) fn drop_skipped(&mut self) {
        let drop = self.skip.min(self.buf.len());
        self.buf.advance(drop);
        self.skip -= drop;
    }

    /// Drops everything up to and including the next Sync, or a simple Query: what a client
    /// sent for a request the proxy answers with an error. Each message is dropped as it is
    /// seen (and the rest of one as it arrives), so a long one is never held. Returns false
    /// when more bytes are needed.
    pub fn skip_request(&mut self) -> Result<bool, ErrorFields> {
        loop {
            if self.skip > 0 {
                return Ok(false);
            }
            let Some((tag, total)) =
                frame::header(&self.buf, MAX_MESSAGE).map_err(frame_violation)?
            else {
                return Ok(false);
            };
            if tag == frontend::SYNC {
                check_no_body(tag, total)?;
            }
            self.discard(total);
            if tag == frontend::QUERY || tag == frontend::SYNC {
                return Ok(true);
            }
        }
    }

    /// Scans unscanned bytes, marking messages ready for the server and recording the
    /// replies they are owed. Stops at an incomplete header, or an incomplete message the
    /// proxy must read. Returns `Ok(true)` when the client sent Terminate.
    pub(super) fn scan(
        &mut self,
        txn: &mut Txn,
        server: &mut ServerStatements,
    ) -> Result<bool, ErrorFields> {
        let mut speculation = Speculation::default();
        loop {
            if self.pass > 0 {
                let n = self.pass.min(self.buf.len() - self.ready);
                self.ready += n;
                self.pass -= n;
                if self.pass > 0 {
                    return Ok(false);
                }
            }
            let at = self.ready;
            let Some((tag, total)) =
                frame::header(&self.buf[at..], MAX_MESSAGE).map_err(frame_violation)?
            else {
                return Ok(false);
            };
            let have = self.buf.len() - at;
            if tag == frontend::BIND {
                txn.stats.binds += 1;
            }
            let rewrite = txn.transaction_mode && self.max_prepared > 0;
            match tag {
                frontend::QUERY | frontend::PARSE => {
                    if total - 1 > self.max_query_size as usize {
                        return Err(query_too_long(total - 1, self.max_query_size as usize));
                    }
                    if have < total {
                        return Ok(false);
                    }
                    if rewrite
                        && ((speculation.check(txn) && self.reads_statements(tag, at, total))
                            || (tag == frontend::PARSE
                                && self.parse_waits_for_clear(txn, at, total))
                            || (tag == frontend::QUERY
                                && txn.clears_ahead > 0
                                && !txn.skipping()
                                && txn.batch_owed()
                                && self.reads_statements(tag, at, total)))
                    {
                        return Ok(false); // wait for the earlier batch's answer
                    }
                    if tag == frontend::QUERY {
                        self.query(total, txn, server)?;
                    } else {
                        self.parse(total, txn, server)?;
                    }
                    txn.forwarded = true;
                    txn.counts.client_message();
                    continue;
                }
                frontend::BIND if rewrite => {
                    // portal\0 statement\0 ...: the names must be here to rewrite them.
                    let body = &self.buf[at + HEADER_LEN..(at + total).min(self.buf.len())];
                    let Some(portal) = cstr(body, MAX_NAME) else {
                        return self.need_more(have, total, "Bind");
                    };
                    let Some(name) = cstr(&body[portal.len() + 1..], MAX_NAME) else {
                        return self.need_more(have, total, "Bind");
                    };
                    if !name.is_empty() && speculation.check(txn) {
                        return Ok(false); // wait for the earlier batch's answer
                    }
                    let behind = self.behind_clear(txn, name);
                    if behind == BehindClear::Wait {
                        return Ok(false);
                    }
                    let (portal_len, name_len) = (portal.len(), name.len());
                    let prefix = HEADER_LEN + portal_len + 1 + name_len + 1;
                    let known = if name.is_empty() || behind == BehindClear::Dropped {
                        // A name the clear ahead drops goes as it is: the server knows no
                        // client's names and fails it (26000), as PostgreSQL would.
                        None
                    } else {
                        self.statements.get(name).cloned()
                    };
                    // The portal clears when it runs if its statement does.
                    txn.clear_bound = match &known {
                        Some(stmt) => stmt.clears,
                        None => name.is_empty() && txn.clear_parsed,
                    };
                    match known {
                        Some(stmt) => {
                            if let Some(effects) = &stmt.effects {
                                txn.effects.merge(effects);
                            }
                            // In place: the name, then the length. Nothing is allocated
                            // unless the server must prepare the statement first.
                            let first = self.prepare_first(&stmt, txn, server);
                            let server_name = stmt.server_name.as_bytes();
                            let name_at = at + HEADER_LEN + portal_len + 1;
                            splice(&mut self.buf, name_at, name_len, server_name);
                            let new_total = total - name_len + server_name.len();
                            self.buf[at + 1..at + HEADER_LEN]
                                .copy_from_slice(&((new_total - 1) as i32).to_be_bytes());
                            if !first.is_empty() {
                                splice(&mut self.buf, at, 0, &first);
                            }
                            self.ready = at + first.len() + prefix - name_len + server_name.len();
                            self.pass = total - prefix;
                        }
                        None => self.pass = total,
                    }
                    self.owe(txn, server, Reply::Bind, false, Undo::None);
                    txn.unsynced = true;
                }
                frontend::DESCRIBE | frontend::CLOSE if rewrite => {
                    if total > HEADER_LEN + 1 + MAX_NAME + 1 {
                        return Err(violation("statement name too long"));
                    }
                    if have < total {
                        return Ok(false);
                    }
                    let kind = self.buf.get(at + HEADER_LEN).copied();
                    // The kind byte, then the name: an empty body has neither.
                    let name = self
                        .buf
                        .get(at + HEADER_LEN + 1..at + total)
                        .and_then(|rest| cstr(rest, MAX_NAME))
                        .ok_or_else(|| violation("malformed Describe or Close message"))?
                        .to_vec();
                    let named_statement = kind == Some(b'S') && !name.is_empty();
                    if named_statement && speculation.check(txn) {
                        return Ok(false); // wait for the earlier batch's answer
                    }
                    let behind = if named_statement {
                        self.behind_clear(txn, &name)
                    } else {
                        BehindClear::No
                    };
                    if behind == BehindClear::Wait {
                        return Ok(false);
                    }
                    if tag == frontend::CLOSE && named_statement {
                        // The client forgets it (a name it never had closes quietly, as in
                        // PostgreSQL); the server keeps it for whoever prepares it next.
                        splice(&mut self.buf, at, total, &[]);
                        let undo = match self.statements.remove(&name) {
                            Some(stmt) => Undo::Unregister {
                                name: name.into(),
                                stmt,
                            },
                            None => Undo::None,
                        };
                        self.owe_synthetic(txn, server, Synthetic::Message(CLOSE_COMPLETE), undo);
                        txn.unsynced = true;
                        continue;
                    }
                    match self.statements.get(&name).cloned() {
                        // A Describe of a name the clear ahead drops goes as it is (26000).
                        Some(stmt) if named_statement && behind == BehindClear::No => {
                            let mut msg = self.prepare_first(&stmt, txn, server);
                            msg.extend_from_slice(&[frontend::DESCRIBE]);
                            msg.extend_from_slice(
                                &((4 + 1 + stmt.server_name.len() + 1) as i32).to_be_bytes(),
                            );
                            msg.extend_from_slice(b"S");
                            msg.extend_from_slice(stmt.server_name.as_bytes());
                            msg.extend_from_slice(&[0]);
                            splice(&mut self.buf, at, total, &msg);
                            self.ready = at + msg.len();
                        }
                        _ => self.ready = at + total,
                    }
                    let kind = if tag == frontend::CLOSE {
                        Reply::Close
                    } else {
                        Reply::Describe
                    };
                    self.owe(txn, server, kind, false, Undo::None);
                    txn.unsynced = true;
                }
                frontend::SYNC => {
                    check_no_body(tag, total)?;
                    self.owe(txn, server, Reply::Sync, false, Undo::None);
                    txn.unsynced = false;
                    self.pass = total;
                }
                frontend::FUNCTION_CALL => {
                    self.owe(txn, server, Reply::FunctionCall, false, Undo::None);
                    self.pass = total;
                }
                frontend::BIND | frontend::DESCRIBE | frontend::CLOSE | frontend::EXECUTE => {
                    // The clear runs now (a Parse alone runs nothing).
                    let clears = tag == frontend::EXECUTE && std::mem::take(&mut txn.clear_bound);
                    let kind = match tag {
                        frontend::BIND => Reply::Bind,
                        frontend::DESCRIBE => Reply::Describe,
                        frontend::CLOSE => Reply::Close,
                        _ => Reply::Execute,
                    };
                    if self.owe(txn, server, kind, false, Undo::None) && clears {
                        txn.mark_clear();
                    }
                    txn.unsynced = true;
                    self.pass = total;
                }
                frontend::FLUSH => {
                    check_no_body(tag, total)?;
                    txn.unsynced = true;
                    self.pass = total;
                }
                frontend::COPY_DATA => self.pass = total,
                frontend::COPY_DONE | frontend::COPY_FAIL => {
                    if tag == frontend::COPY_DONE {
                        check_no_body(tag, total)?;
                    }
                    txn.copy_end_sent();
                    self.pass = total
                }
                frontend::TERMINATE => return Ok(true),
                other => return Err(unknown_message(other)),
            }
            txn.forwarded = true;
            txn.counts.client_message();
        }
    }

    /// True when a whole Query or Parse at `at` depends on the client's statement names: a
    /// named Parse, or `DEALLOCATE name`.
    fn reads_statements(&self, tag: u8, at: usize, total: usize) -> bool {
        let body = &self.buf[at + HEADER_LEN..at + total];
        if tag == frontend::PARSE {
            return body.first().is_some_and(|&b| b != 0);
        }
        let text = body.strip_suffix(&[0]).unwrap_or(body);
        matches!(sql::deallocate(text), Some(Deallocate::Name(_)))
    }

    /// True when the whole Parse at `at` names a statement the client has, behind a clear
    /// that may sit in an earlier batch, still unanswered: whether that clear runs (and so
    /// frees the name, or leaves it in use: 42P05) is known from its batch's answer only.
    /// A clear in this Parse's own batch needs no wait: it runs before the Parse, or an
    /// error ahead of both skips them (see `ClientConn::parse`).
    fn parse_waits_for_clear(&self, txn: &Txn, at: usize, total: usize) -> bool {
        txn.clears_ahead > 0
            && !txn.skipping()
            // A name too long to look up here waits too: `parse` takes any length.
            && cstr(&self.buf[at + HEADER_LEN..at + total], MAX_NAME)
                .is_none_or(|name| !name.is_empty() && self.statements.get(name).is_some())
            && txn.batch_owed()
    }

    /// Where a message naming the client's statement `name` stands behind a clear passed on
    /// and not reported yet. A name the client had before the clear (not parsed again
    /// behind it): the clear drops it before the message runs if it is in the message's
    /// batch (or an error ahead skips both); if the clear may be in an earlier batch, that
    /// batch's answer tells.
    fn behind_clear(&self, txn: &Txn, name: &[u8]) -> BehindClear {
        if txn.clears_ahead == 0
            || txn.skipping()
            || txn.is_defined_behind_clear(name)
            || self.statements.get(name).is_none()
        {
            BehindClear::No
        } else if txn.batch_owed() {
            BehindClear::Wait
        } else {
            BehindClear::Dropped
        }
    }

    /// A message whose leading names are not all here yet.
    fn need_more(&self, have: usize, total: usize, what: &str) -> Result<bool, ErrorFields> {
        if have >= total || have >= HEADER_LEN + 2 * (MAX_NAME + 1) {
            return Err(violation(format!("malformed {what} message")));
        }
        Ok(false)
    }

    /// Records the reply owed for a message passed on; if the server will skip it (an
    /// earlier error in the batch), takes back what passing it on changed.
    /// Returns false when the server will skip the message.
    fn owe(
        &mut self,
        txn: &mut Txn,
        server: &mut ServerStatements,
        kind: Reply,
        internal: bool,
        undo: Undo,
    ) -> bool {
        match txn.owe(kind, internal, undo) {
            Some(undo) => {
                undo.apply(&mut self.statements, server);
                false
            }
            None => true,
        }
    }

    /// Records a reply the proxy makes itself, as [`ClientConn::owe`].
    fn owe_synthetic(
        &mut self,
        txn: &mut Txn,
        server: &mut ServerStatements,
        reply: Synthetic,
        undo: Undo,
    ) {
        if let Some(undo) = txn.owe_synthetic(reply, undo) {
            undo.apply(&mut self.statements, server);
        }
    }

    /// Messages to put before one that uses `stmt`: if the server lacks it, a Parse (and a
    /// Close of the statement it evicts), whose replies the client will not see.
    fn prepare_first(
        &mut self,
        stmt: &Arc<Statement>,
        txn: &mut Txn,
        server: &mut ServerStatements,
    ) -> Vec<u8> {
        if server.touch(&stmt.server_name) {
            return Vec::new();
        }
        self.prepare_on_server(stmt, txn, server, None, None)
    }

    /// A Parse of `stmt` for a server that lacks it, after a Close of the statement it
    /// evicts. `client_name`: the client's own Parse, whose reply is the client's; `None`:
    /// a Parse the proxy adds, whose reply the client does not see.
    fn prepare_on_server(
        &mut self,
        stmt: &Arc<Statement>,
        txn: &mut Txn,
        server: &mut ServerStatements,
        client_name: Option<Box<[u8]>>,
        replaced: Option<Arc<Statement>>,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        if let Some(evicted) = server.add(stmt.server_name.clone(), self.max_prepared as usize) {
            out.extend_from_slice(&close_message(&evicted));
            txn.stats.evictions += 1;
            self.owe(txn, server, Reply::Close, true, Undo::Evict(evicted));
        }
        out.extend_from_slice(&stmt.parse);
        txn.stats.server_parses += 1;
        let internal = client_name.is_none();
        let undo = Undo::prepare(stmt.clone(), client_name, replaced);
        self.owe(txn, server, Reply::Parse, internal, undo);
        out
    }

    /// A whole Query at `buf[ready..]`: session state, refusals, DEALLOCATE.
    fn query(
        &mut self,
        total: usize,
        txn: &mut Txn,
        server: &mut ServerStatements,
    ) -> Result<(), ErrorFields> {
        let at = self.ready;
        let body = &self.buf[at + HEADER_LEN..at + total];
        let text = body
            .strip_suffix(&[0])
            .ok_or_else(|| violation("Query message is not NUL-terminated"))?;
        let refusal = sql::classify(
            text,
            txn.transaction_mode,
            self.escape_strings,
            &mut txn.effects,
        );
        let statements = txn.transaction_mode && self.max_prepared > 0;
        let mut dealloc = None;
        if statements && refusal.is_none() {
            dealloc = sql::deallocate(text);
            if let Some(Deallocate::Name(name)) = &dealloc {
                // A name the clear ahead drops goes to the server, which fails it (26000)
                // as PostgreSQL would.
                let dropped = self.behind_clear(txn, name.as_bytes()) == BehindClear::Dropped;
                let stmt = if dropped {
                    None
                } else {
                    self.statements.remove(name.as_bytes())
                };
                if let Some(stmt) = stmt {
                    // The client's name goes; the server's statement stays for others.
                    // PostgreSQL answers DEALLOCATE and ReadyForQuery; so does the proxy,
                    // or 25P02 in a transaction that failed before it (known when the
                    // answer is due: a statement ahead in the pipeline may fail it, or a
                    // ROLLBACK end it), and the client keeps the name then. Behind
                    // extended-protocol messages with no Sync, a Flush takes its place: the
                    // server sends their replies only when asked (as a Query would ask).
                    let flush: &[u8] = if txn.unsynced {
                        &[frontend::FLUSH, 0, 0, 0, 4]
                    } else {
                        &[]
                    };
                    splice(&mut self.buf, at, total, flush);
                    self.ready = at + flush.len();
                    let undo = Undo::Unregister {
                        name: name.as_bytes().into(),
                        stmt,
                    };
                    self.owe_synthetic(txn, server, Synthetic::Deallocate, undo);
                    return Ok(());
                }
                // A name the client does not have: the server fails it (26000) as PostgreSQL would.
            }
        }
        let clears = matches!(dealloc, Some(Deallocate::All | Deallocate::DiscardAll));
        if self.owe(txn, server, Reply::Query, false, Undo::None) {
            // A Query ends the implicit transaction of extended-protocol messages before it
            // (it commits with the Query's statements), as a Sync would: the server is
            // synced once it answers.
            txn.unsynced = false;
            if clears {
                txn.mark_clear();
            }
        }
        match refusal {
            None => self.ready += total,
            Some(r) => {
                // The server raises the refusal itself, so the error, the transaction state
                // and the ReadyForQuery all come from the server.
                let mut msg = BytesMut::new();
                messages::query(&mut msg, &raise_sql(r));
                splice(&mut self.buf, at, total, &msg);
                self.ready = at + msg.len();
            }
        }
        Ok(())
    }

    /// A whole Parse at `buf[ready..]`.
    fn parse(
        &mut self,
        total: usize,
        txn: &mut Txn,
        server: &mut ServerStatements,
    ) -> Result<(), ErrorFields> {
        let at = self.ready;
        let body = &self.buf[at + HEADER_LEN..at + total];
        let mut strs = CStrings(body);
        let (name, text) = strs
            .next_str()
            .zip(strs.next_str())
            .ok_or_else(|| violation("malformed Parse message"))?;
        // What running it changes: now, and at each Bind of a named statement.
        let mut effects = SessionEffects::default();
        if let Some(r) = sql::classify(
            text,
            txn.transaction_mode,
            self.escape_strings,
            &mut effects,
        ) {
            return Err(refuse(r));
        }
        txn.effects.merge(&effects);
        let name = name.to_vec();
        txn.unsynced = true;
        if name.is_empty() || !txn.transaction_mode {
            // A DEALLOCATE ALL sent through the extended protocol: it runs at the Execute of
            // a portal bound from it (see `Txn::clears_ahead`).
            if name.is_empty() && self.max_prepared > 0 && txn.transaction_mode {
                txn.clear_parsed = matches!(
                    sql::deallocate(text),
                    Some(Deallocate::All | Deallocate::DiscardAll)
                );
            }
            self.owe(txn, server, Reply::Parse, false, Undo::None);
            self.ready += total;
            return Ok(());
        }
        if self.max_prepared == 0 {
            return Err(refuse(Refusal::NamedStatement));
        }
        txn.stats.client_parses += 1;
        let after_name = self.buf[at + HEADER_LEN + name.len() + 1..at + total].to_vec();
        // A clear ahead in the pipeline (not one the server skips) takes the server's
        // statements and the client's names away before this Parse runs.
        // Walked only for short queues: a pipeline of thousands of Parses stays linear.
        debug_assert!(
            txn.owed.len() > 256 || txn.clears_ahead as usize == txn.clears_owed(),
            "clears counted"
        );
        let clear = txn.clears_ahead > 0 && !txn.skipping();
        let mut replaced = None;
        if let Some(existing) = self.statements.get(&name).cloned() {
            if clear && !txn.is_defined_behind_clear(&name) {
                // The clear ahead is in this batch (one in an earlier batch made the scan
                // wait for its answer, see `parse_waits_for_clear`): it runs before this
                // Parse, or an error ahead of both skips them. The name is free for the new
                // text either way; its old meaning comes back if both are skipped.
                replaced = Some(existing);
            } else {
                // Behind the clear, the name was defined in this batch: if that Parse
                // fails, the server skips this one too.
                self.parse_name_in_use(&existing, &after_name, at, total, txn, server);
                return Ok(());
            }
        }
        // Not for a Parse the server will skip (its registration is taken back at once), nor
        // behind a clear that empties the client's names first (it runs in this pipeline).
        if self.statements.len() >= MAX_CLIENT_STATEMENTS && !clear && !txn.skipping() {
            return Err(too_many_statements());
        }
        if clear {
            txn.defined_behind_clear(&name);
        }
        let clears = matches!(
            sql::deallocate(text),
            Some(Deallocate::All | Deallocate::DiscardAll)
        );
        let stmt = Arc::new(
            Statement::from_parse(&after_name)
                .with_effects(effects)
                .clearing(clears),
        );
        self.statements.insert(&name, stmt.clone());
        let server_has_it = server.touch(&stmt.server_name);
        if server_has_it && (clear || (txn.server_in_doubt && !txn.skipping())) {
            // The record says the server has it, but the clear ahead takes it first, or the
            // record is in doubt: close it (a Close of a statement the server lacks is no
            // error) and prepare it again. Whether a clear ran is known only later: the server
            // is not trusted with the proxy's record after this transaction. Unanswered, the
            // Close's undo puts the statement back in the record after the Parse's takes it
            // out (newest first).
            txn.server_in_doubt = true;
            let mut msg = close_message(&stmt.server_name).to_vec();
            let undo = Undo::Evict(stmt.server_name.clone());
            self.owe(txn, server, Reply::Close, true, undo);
            msg.extend_from_slice(&stmt.parse);
            txn.stats.server_parses += 1;
            let undo = Undo::prepare(stmt, Some(name.into()), replaced);
            self.owe(txn, server, Reply::Parse, false, undo);
            splice(&mut self.buf, at, total, &msg);
            self.ready = at + msg.len();
            return Ok(());
        }
        if server_has_it
            && txn.status == TransactionStatus::Failed
            && txn.owed.is_empty()
            && !sql::parse_allowed_in_failed_transaction(text)
        {
            // In a failed transaction block (known: nothing is in flight) PostgreSQL refuses
            // this Parse (25P02) and skips to Sync. The server says so, given the Parse under
            // the statement's server name: it refuses before it looks at the name. Its undo
            // takes the client's name back, as PostgreSQL defines none.
            let mut msg = Vec::new();
            push_parse_as(&mut msg, &stmt.server_name, &after_name);
            splice(&mut self.buf, at, total, &msg);
            self.ready = at + msg.len();
            let undo = Undo::Register {
                name: name.into(),
                stmt,
            };
            self.owe(txn, server, Reply::Parse, false, undo);
            return Ok(());
        }
        if server_has_it {
            // The server has it: answer the client's Parse ourselves.
            splice(&mut self.buf, at, total, &[]);
            txn.stats.parse_hits += 1;
            let undo = Undo::Register {
                name: name.into(),
                stmt,
            };
            self.owe_synthetic(txn, server, Synthetic::Message(PARSE_COMPLETE), undo);
            return Ok(());
        }
        let msg = self.prepare_on_server(&stmt, txn, server, Some(name.into()), replaced);
        splice(&mut self.buf, at, total, &msg);
        self.ready = at + msg.len();
        Ok(())
    }

    /// A Parse of a name the client has. PostgreSQL refuses to redefine a name in use
    /// (42P05): the server says so, given the new text under the server name of the
    /// statement the name means.
    fn parse_name_in_use(
        &mut self,
        existing: &Arc<Statement>,
        after_name: &[u8],
        at: usize,
        total: usize,
        txn: &mut Txn,
        server: &mut ServerStatements,
    ) {
        let mut msg = self.prepare_first(existing, txn, server);
        push_parse_as(&mut msg, &existing.server_name, after_name);
        splice(&mut self.buf, at, total, &msg);
        self.ready = at + msg.len();
        self.owe(txn, server, Reply::Parse, false, Undo::None);
    }
}

/// Appends the client's Parse under `server_name`: `after_name` is the rest of its body
/// (query text, parameter types).
fn push_parse_as(msg: &mut Vec<u8>, server_name: &str, after_name: &[u8]) {
    msg.push(frontend::PARSE);
    msg.extend_from_slice(&((4 + server_name.len() + 1 + after_name.len()) as i32).to_be_bytes());
    msg.extend_from_slice(server_name.as_bytes());
    msg.push(0);
    msg.extend_from_slice(after_name);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::Txn;

    fn client(max_prepared: usize) -> ClientConn<()> {
        ClientConn::new((), 1 << 20, max_prepared, Arc::default())
    }

    /// A client on one end of a socket pair (the caller's runtime), and the other end.
    fn on_a_socket(max_query_size: usize) -> (ClientConn, std::os::unix::net::UnixStream) {
        let (a, peer) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let sock = crate::socket::Socket::from(tokio::net::UnixStream::from_std(a).unwrap());
        let c = ClientConn::new(Stream::from(sock), max_query_size, 0, Arc::default());
        (c, peer)
    }

    fn spares() -> usize {
        SPARE_BUFFERS.with(|s| s.borrow().len())
    }

    /// Statement after statement (a transaction, the client never waiting without a
    /// server), the client's reads go into the one buffer it has: no allocation per read.
    /// A buffer a long message grew is let go once emptied.
    #[tokio::test(flavor = "current_thread")]
    async fn reads_within_a_transaction_reuse_the_buffer() {
        use std::io::Write;
        let (mut c, mut peer) = on_a_socket(1 << 20);
        let query = b"Q\0\0\0\x0dselect 1\0";
        let mut start = None;
        for _ in 0..200 {
            peer.write_all(query).unwrap();
            c.stream.readable().await.unwrap();
            assert_eq!(c.read_some().unwrap(), query.len());
            let at = c.buf.as_ptr() as usize;
            assert_eq!(
                *start.get_or_insert(at),
                at,
                "read into the same allocation"
            );
            // Relayed: the bytes leave the front of the buffer.
            c.buf.advance(query.len());
        }
        // A long message grew the buffer; relayed whole, the buffer is freed at the next
        // read and an ordinary one is taken.
        c.buf.reserve(1 << 20);
        c.buf.extend_from_slice(&vec![0; (1 << 20) - 100]);
        c.buf.advance(c.buf.len());
        peer.write_all(query).unwrap();
        c.stream.readable().await.unwrap();
        assert_eq!(c.read_some().unwrap(), query.len());
        assert!(c.buf.capacity() <= 2 * READ_CHUNK, "{}", c.buf.capacity());
    }

    /// A header claiming a query of 30 MB, with a few bytes of it: the room made for the
    /// rest grows with what arrives, not to the claimed size at once.
    #[tokio::test(flavor = "current_thread")]
    async fn a_claimed_length_alone_makes_no_large_buffer() {
        use std::io::Write;
        let (mut c, mut peer) = on_a_socket(32 << 20);
        let mut head = vec![frontend::QUERY];
        head.extend_from_slice(&(30_000_000u32).to_be_bytes());
        head.extend_from_slice(b"select ");
        peer.write_all(&head).unwrap();
        c.stream.readable().await.unwrap();
        assert_eq!(c.read_some().unwrap(), head.len());
        peer.write_all(&[b'x'; 100]).unwrap();
        c.stream.readable().await.unwrap();
        assert_eq!(c.read_some().unwrap(), 100);
        assert!(
            c.buf.capacity() <= 4 * READ_CHUNK,
            "{} bytes of room for 112 bytes received",
            c.buf.capacity()
        );
        // As more arrives, reads take as much as has come so far.
        // (100 KB at a time, each read before the next is written: the peer blocks.)
        let chunk = vec![b'x'; 100_000];
        for _ in 0..8 {
            peer.write_all(&chunk).unwrap();
            let mut got = 0;
            while got < chunk.len() {
                c.stream.readable().await.unwrap();
                got += c.read_some().unwrap_or(0);
            }
        }
        assert!(c.buf.capacity() < 4 << 20, "{}", c.buf.capacity());
    }

    /// Stray COPY data with no server (PostgreSQL drops it out of a COPY), claiming 10 MB:
    /// dropped as it arrives, never buffered; the message after it is read intact.
    #[tokio::test(flavor = "current_thread")]
    async fn stray_copy_data_is_dropped_as_it_arrives() {
        use std::io::Write;
        let (mut c, mut peer) = on_a_socket(1 << 20);
        let total = 10_000_000usize;
        let mut head = vec![frontend::COPY_DATA];
        head.extend_from_slice(&((total - 1) as u32).to_be_bytes());
        peer.write_all(&head).unwrap();
        c.stream.readable().await.unwrap();
        c.read_some().unwrap();
        assert_eq!(c.peek().unwrap(), Peek::Local(frontend::COPY_DATA, total));
        c.discard(total);
        // The rest, 100 KB at a time (each read before the next write: the peer blocks),
        // and a Query right behind its last byte.
        let query = b"Q\0\0\0\x0dselect 1\0";
        let mut left = total - head.len();
        while left > 0 {
            let n = left.min(100_000);
            let mut chunk = vec![b'x'; n];
            if n == left {
                chunk.extend_from_slice(query);
            }
            peer.write_all(&chunk).unwrap();
            left -= n;
            let mut got = 0;
            while got < chunk.len() {
                c.stream.readable().await.unwrap();
                got += c.read_some().unwrap_or(0);
                assert!(c.buf.capacity() <= 2 * READ_CHUNK, "{}", c.buf.capacity());
            }
            if left > 0 {
                assert!(c.buf.is_empty(), "nothing of it is kept");
                assert_eq!(c.peek().unwrap(), Peek::NeedMore);
            }
        }
        assert_eq!(&c.buf[..], &query[..]);
        assert_eq!(c.peek().unwrap(), Peek::Ready(frontend::QUERY));
    }

    /// A refused request is dropped message by message, and a long message in it as it
    /// arrives, up to its Sync; what follows the Sync stays.
    #[test]
    fn a_refused_request_is_dropped_as_it_arrives() {
        let mut c = client(0);
        c.buf.extend_from_slice(b"P\0\0\0\x10\0select 1\0\0\0");
        c.buf.extend_from_slice(b"B");
        c.buf.extend_from_slice(&5_000_000u32.to_be_bytes());
        c.buf.extend_from_slice(&[0; 1000]);
        assert_eq!(c.skip_request(), Ok(false));
        assert!(c.buf.is_empty());
        let mut left = 5_000_001 - 1005;
        while left > 0 {
            let n = left.min(64 * 1024);
            c.buf.extend_from_slice(&vec![7; n]);
            c.drop_skipped();
            assert!(c.buf.is_empty());
            assert_eq!(c.skip_request(), Ok(false));
            left -= n;
        }
        c.buf
            .extend_from_slice(b"E\0\0\0\x09\0\0\0\0\0S\0\0\0\x04Q\0\0");
        c.drop_skipped();
        assert_eq!(c.skip_request(), Ok(true));
        assert_eq!(&c.buf[..], b"Q\0\0", "the next request stays");
        // A simple Query ends it too, its rest dropped as it comes.
        let mut c = client(0);
        c.buf.extend_from_slice(b"Q\0\0\x10\0select");
        assert_eq!(c.skip_request(), Ok(true));
        assert!(c.buf.is_empty());
        c.buf.extend_from_slice(&vec![b' '; 4096 - 10]);
        c.buf.extend_from_slice(b"S\0\0\0\x04");
        c.drop_skipped();
        assert_eq!(&c.buf[..], b"S\0\0\0\x04");
    }

    /// Sync, Flush and CopyDone are a header alone; with a body they are refused (with a
    /// server or without), and a Sync that is only announced does not let a Parse be
    /// answered early.
    #[test]
    fn sync_flush_and_copy_done_have_no_body() {
        for tag in [frontend::SYNC, frontend::FLUSH, frontend::COPY_DONE] {
            let mut c = client(0);
            c.buf.extend_from_slice(&[tag, 0, 0, 0, 100, 1, 2, 3]);
            let e = c.peek().unwrap_err();
            assert_eq!(e.code, "08P01");
            assert!(e.message.contains("has no body"), "{}", e.message);
            let mut txn = Txn::new(true);
            let mut server = ServerStatements::default();
            let e = c.scan(&mut txn, &mut server).unwrap_err();
            assert_eq!(e.code, "08P01");
            c.buf.clear();
            c.buf.extend_from_slice(&[tag, 0, 0, 0, 4]);
            assert_eq!(c.peek().unwrap(), Peek::Local(tag, 5));
        }
        // A Parse of a statement a server has, with a Sync claiming 100 bytes, 5 of them
        // here: not answered here (the scan refuses it). A Sync of its own is.
        let mut c = client(10);
        let parse = b"P\0\0\0\x12s1\0select 1\0\0\0";
        let stmt = crate::prepared::Statement::from_parse(&parse[8..]);
        c.statements.known.insert(&stmt.server_name);
        c.buf.extend_from_slice(parse);
        c.buf.extend_from_slice(&[frontend::SYNC, 0, 0, 0, 100]);
        assert_eq!(c.answer_parse(), None);
        assert_eq!(c.buf.len(), 19 + 5, "nothing consumed");
        c.buf.truncate(19);
        c.buf.extend_from_slice(&[frontend::SYNC, 0, 0, 0, 4]);
        let reply = c.answer_parse().expect("answered");
        assert_eq!(reply[0], b'1', "ParseComplete");
        assert!(c.buf.is_empty());
    }

    /// Past the high-water mark, only the rest of a Query or Parse is read on (up to
    /// max_query_size), not of a message waiting behind an earlier batch.
    #[test]
    fn only_a_query_or_parse_is_held_whole() {
        let mut c = client(0);
        for (tag, held) in [
            (frontend::QUERY, true),
            (frontend::PARSE, true),
            (frontend::BIND, false),
            (frontend::EXECUTE, false),
            (frontend::COPY_DATA, false),
        ] {
            c.buf.clear();
            c.buf.extend_from_slice(&[tag]);
            c.buf.extend_from_slice(&500_000u32.to_be_bytes());
            c.buf.extend_from_slice(&[0; 300_000]);
            assert_eq!(c.holding(), held, "{}", tag as char);
        }
    }

    #[test]
    fn the_rest_of_a_long_query_is_known_from_its_header() {
        let mut c = client(0);
        assert_eq!(c.held_rest(), None, "nothing buffered");
        // A Query of 100,000 bytes of which 1,000 are here; then a Parse; then one whole.
        c.buf.extend_from_slice(b"Q");
        c.buf.extend_from_slice(&100_000u32.to_be_bytes());
        c.buf.extend_from_slice(&[b'x'; 995]);
        assert_eq!(c.held_rest(), Some(100_001 - 1_000));
        c.buf[0] = frontend::PARSE;
        assert_eq!(c.held_rest(), Some(99_001));
        // Other messages are passed on in pieces or held only up to 1 MiB: no room ahead.
        c.buf[0] = frontend::BIND;
        assert_eq!(c.held_rest(), None);
        c.buf[0] = frontend::COPY_DATA;
        assert_eq!(c.held_rest(), None);
        // Over max_query_size: refused from the header, so no room is made for it.
        c.buf[0] = frontend::QUERY;
        c.max_query_size = 50_000;
        assert_eq!(c.held_rest(), None);
        c.max_query_size = 1 << 20;
        // Behind a message already scanned, or while passing a message on: none either.
        c.ready = 5;
        assert_eq!(c.held_rest(), None);
        c.ready = 0;
        c.pass = 10;
        assert_eq!(c.held_rest(), None);
        c.pass = 0;
        // Whole: nothing more to come.
        let whole = b"Q\0\0\0\x0dselect 1\0";
        c.buf.clear();
        c.buf.extend_from_slice(whole);
        assert_eq!(c.held_rest(), None);
    }

    #[test]
    fn a_queued_request_keeps_its_bytes_and_gives_the_read_buffer_back() {
        let query = b"Q\0\0\0\x0dselect 1\0";
        let mut c = client(0);
        c.buf = take_buffer();
        c.buf.extend_from_slice(query);
        let before = spares();
        c.shrink_while_queued();
        assert_eq!(&c.buf[..], query);
        assert!(c.buf.capacity() < CLIENT_BUFFER);
        assert_eq!(
            spares(),
            before + 1,
            "the read buffer goes back to the spares"
        );
        // Relayed: the request's own copy is freed, not kept as a spare.
        c.buf.advance(c.buf.len());
        give_buffer(std::mem::take(&mut c.buf));
        assert_eq!(spares(), before + 1);
        // A spare that was read from and emptied is kept whole.
        let mut b = take_buffer();
        b.extend_from_slice(query);
        b.advance(5);
        give_buffer(b);
        assert_eq!(spares(), before + 1);
        assert_eq!(take_buffer().capacity(), CLIENT_BUFFER);
        // A buffer read from before (its capacity now short of the whole) is given back too,
        // whole; a copy is not copied again.
        let mut c = client(0);
        c.buf = take_buffer();
        c.buf.extend_from_slice(query);
        c.buf.extend_from_slice(query);
        c.buf.advance(query.len());
        assert!(c.buf.capacity() < CLIENT_BUFFER);
        let before = spares();
        c.shrink_while_queued();
        assert_eq!(&c.buf[..], query);
        assert_eq!(spares(), before + 1);
        let copy = c.buf.as_ptr();
        c.shrink_while_queued();
        assert_eq!((c.buf.as_ptr(), spares()), (copy, before + 1));
        assert_eq!(take_buffer().capacity(), CLIENT_BUFFER);
        // A long request keeps its buffer (no copy of kilobytes per wait).
        let mut c = client(0);
        c.buf = take_buffer();
        c.buf.extend_from_slice(&vec![b'x'; QUEUED_COPY_MAX + 1]);
        c.shrink_while_queued();
        assert_eq!(c.buf.len(), QUEUED_COPY_MAX + 1);
        assert!(c.buf.capacity() >= CLIENT_BUFFER);
    }

    /// Found by the relay fuzz target: a Describe or Close with an empty body (no kind
    /// byte) panicked on a slice range in transaction mode with prepared statements on.
    #[test]
    fn describe_or_close_without_a_body_is_a_protocol_violation() {
        for tag in [frontend::DESCRIBE, frontend::CLOSE] {
            let mut c = client(10);
            c.buf.extend_from_slice(&[tag, 0, 0, 0, 4]);
            let mut txn = Txn::new(true);
            let err = c
                .scan(&mut txn, &mut ServerStatements::default())
                .unwrap_err();
            assert_eq!(err.code, "08P01");
            assert_eq!(err.message, "malformed Describe or Close message");
        }
    }
}
