//! One transaction (or, in session mode, one session) between a client and a server.
//!
//! Bytes move in bulk: whatever a read returns is scanned by header and written on as one
//! piece. The proxy reads only tags, lengths and ReadyForQuery's status byte, with two
//! exceptions on the client side: Query and Parse messages are held until whole, so their
//! text can be checked for statements that change session state ([`crate::sql`]).
//!
//! A transaction is over when every Query, Sync and FunctionCall sent has been answered by
//! a ReadyForQuery, no extended-protocol message waits for its Sync, no COPY is open, and the
//! server reports status Idle. Only then may the server serve another client.

use bytes::{Buf, BytesMut};
use tokio::net::TcpStream;

use crate::protocol::frame::{self, FrameError};
use crate::protocol::messages::{self, quote_literal, CStrings, ErrorFields, Severity};
use crate::protocol::{backend, frontend, TransactionStatus};
use crate::server::ServerConn;
use crate::sql::{self, Refusal, SessionEffects};

/// Most unsent bytes held per direction before reading that side pauses.
pub const HIGH_WATER: usize = 256 * 1024;
/// Read buffer growth step.
const READ_CHUNK: usize = 32 * 1024;
/// Largest non-Query message the proxy holds whole before checking a server out.
const MAX_HELD_MESSAGE: usize = 1 << 20;
/// Messages may not claim more than PostgreSQL's own limit (1 GB).
const MAX_MESSAGE: usize = 0x3fff_ffff;

/// The client side of a connection after login.
#[derive(Debug)]
pub struct ClientConn {
    pub stream: TcpStream,
    /// `buf[..ready]` is scanned and ready for the server; the rest is not yet scanned.
    pub buf: BytesMut,
    pub ready: usize,
    /// Bytes of a message being streamed through that have not arrived yet.
    pass: usize,
    pub max_query_size: usize,
}

/// Where one transaction stands.
#[derive(Debug)]
pub struct Txn {
    /// Query, Sync and FunctionCall messages not yet answered by ReadyForQuery.
    pending: u32,
    /// Extended-protocol messages were sent after the last Sync.
    unsynced: bool,
    /// The server waits for COPY data.
    copy_in: bool,
    status: TransactionStatus,
    forwarded: bool,
    transaction_mode: bool,
    /// Session state the transaction's statements may have changed.
    pub effects: SessionEffects,
}

/// What the server's state is when a client goes away mid-transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leftover {
    /// Idle and clean: reusable as is.
    Clean,
    /// In an open (or failed) transaction, or waiting for Sync, with nothing running:
    /// a Sync and ROLLBACK make it clean.
    IdleInTransaction { unsynced: bool },
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
    /// The client must be told this error and closed.
    ClientError(ErrorFields, Leftover),
    /// The server connection broke; the client must be told and closed.
    ServerGone(String),
}

/// The first message a client sent while holding no server.
#[derive(Debug, PartialEq, Eq)]
pub enum Peek {
    /// More bytes are needed.
    NeedMore,
    /// A message that needs a server (tag; whole message buffered unless it is huge).
    Ready(u8),
    /// Sync, Flush or COPY messages with no server: answered or dropped by the proxy
    /// (`total` bytes long).
    Local(u8, usize),
    Terminate,
}

fn violation(msg: impl Into<String>) -> ErrorFields {
    ErrorFields::new(Severity::Fatal, "08P01", msg)
}

fn frame_violation(e: FrameError) -> ErrorFields {
    violation(e.to_string())
}

impl Txn {
    pub fn new(transaction_mode: bool) -> Txn {
        Txn {
            pending: 0,
            unsynced: false,
            copy_in: false,
            status: TransactionStatus::Idle,
            forwarded: false,
            transaction_mode,
            effects: SessionEffects::default(),
        }
    }

    fn done(&self) -> bool {
        self.transaction_mode
            && self.forwarded
            && self.pending == 0
            && !self.unsynced
            && !self.copy_in
            && self.status == TransactionStatus::Idle
    }

    /// The server's state if the client vanished now.
    fn leftover(&self, client: &ClientConn, server: &ServerConn) -> Leftover {
        let cut = client.ready > 0
            || client.pass > 0
            || !server.scanner.at_boundary()
            || !server.buf.is_empty();
        if cut || self.pending > 0 || self.copy_in {
            Leftover::Busy
        } else if self.unsynced || self.status != TransactionStatus::Idle {
            Leftover::IdleInTransaction {
                unsynced: self.unsynced,
            }
        } else {
            Leftover::Clean
        }
    }

    /// Notes a server message the scanner completed.
    #[inline]
    fn on_server_message(&mut self, tag: u8, first: Option<u8>) {
        match tag {
            backend::READY_FOR_QUERY => {
                self.pending = self.pending.saturating_sub(1);
                self.copy_in = false;
                if let Some(s) = first.and_then(TransactionStatus::from_byte) {
                    self.status = s;
                }
            }
            backend::COPY_IN_RESPONSE | backend::COPY_BOTH_RESPONSE => self.copy_in = true,
            _ => {}
        }
    }
}

impl ClientConn {
    pub fn new(stream: TcpStream, max_query_size: usize) -> ClientConn {
        ClientConn {
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK),
            ready: 0,
            pass: 0,
            max_query_size,
        }
    }

    /// Reads more bytes into the buffer; `Ok(false)` at end of stream.
    pub async fn read_more(&mut self) -> std::io::Result<bool> {
        use tokio::io::AsyncReadExt;
        self.buf.reserve(READ_CHUNK);
        Ok(self.stream.read_buf(&mut self.buf).await? > 0)
    }

    /// Looks at the first unscanned message while the client holds no server.
    pub fn peek(&self) -> Result<Peek, ErrorFields> {
        let Some((tag, total)) =
            frame::header(&self.buf[self.ready..], MAX_MESSAGE).map_err(frame_violation)?
        else {
            return Ok(Peek::NeedMore);
        };
        let have = self.buf.len() - self.ready;
        let whole = have >= total;
        match tag {
            frontend::TERMINATE => Ok(Peek::Terminate),
            frontend::SYNC
            | frontend::FLUSH
            | frontend::COPY_DATA
            | frontend::COPY_DONE
            | frontend::COPY_FAIL => Ok(if whole {
                Peek::Local(tag, total)
            } else {
                Peek::NeedMore
            }),
            frontend::QUERY | frontend::PARSE => {
                if total - 1 > self.max_query_size {
                    return Err(query_too_long(total - 1, self.max_query_size));
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

    /// Drops `n` unscanned bytes at the front (a message the proxy handled itself).
    pub fn consume(&mut self, n: usize) {
        debug_assert_eq!(self.ready, 0);
        self.buf.advance(n);
    }

    /// Drops everything up to and including the next Sync, or a whole simple Query:
    /// what a client sent for a request the proxy answers with an error. Returns false
    /// when more bytes are needed.
    pub fn skip_request(&mut self) -> Result<bool, ErrorFields> {
        let mut pos = 0;
        loop {
            let Some((tag, total)) =
                frame::header(&self.buf[pos..], MAX_MESSAGE).map_err(frame_violation)?
            else {
                return Ok(false);
            };
            if self.buf.len() - pos < total {
                return Ok(false);
            }
            pos += total;
            if tag == frontend::QUERY || tag == frontend::SYNC {
                self.buf.advance(pos);
                return Ok(true);
            }
        }
    }

    /// Scans unscanned bytes, marking whole messages ready for the server. Stops at an
    /// incomplete Query/Parse or header. Returns `Ok(true)` when the client sent Terminate.
    fn scan(&mut self, txn: &mut Txn) -> Result<bool, ErrorFields> {
        loop {
            if self.pass > 0 {
                let n = self.pass.min(self.buf.len() - self.ready);
                self.ready += n;
                self.pass -= n;
                if self.pass > 0 {
                    return Ok(false);
                }
            }
            let Some((tag, total)) =
                frame::header(&self.buf[self.ready..], MAX_MESSAGE).map_err(frame_violation)?
            else {
                return Ok(false);
            };
            match tag {
                frontend::QUERY | frontend::PARSE => {
                    if total - 1 > self.max_query_size {
                        return Err(query_too_long(total - 1, self.max_query_size));
                    }
                    if self.buf.len() - self.ready < total {
                        return Ok(false);
                    }
                    self.inspect(tag, total, txn)?;
                    continue;
                }
                frontend::SYNC => {
                    txn.pending += 1;
                    txn.unsynced = false;
                }
                frontend::FUNCTION_CALL => txn.pending += 1,
                frontend::BIND
                | frontend::DESCRIBE
                | frontend::EXECUTE
                | frontend::CLOSE
                | frontend::FLUSH => txn.unsynced = true,
                frontend::COPY_DATA | frontend::COPY_DONE | frontend::COPY_FAIL => {}
                frontend::TERMINATE => return Ok(true),
                other => return Err(unknown_message(other)),
            }
            txn.forwarded = true;
            self.pass = total;
        }
    }

    /// A whole Query or Parse at `buf[ready..ready+total]`: checks its text, rewrites a
    /// refused Query, and marks it ready.
    fn inspect(&mut self, tag: u8, total: usize, txn: &mut Txn) -> Result<(), ErrorFields> {
        let body = &self.buf[self.ready + frame::HEADER_LEN..self.ready + total];
        let refusal = if tag == frontend::QUERY {
            let text = body
                .strip_suffix(&[0])
                .ok_or_else(|| violation("Query message is not NUL-terminated"))?;
            sql::classify(text, txn.transaction_mode, &mut txn.effects)
        } else {
            let mut strs = CStrings(body);
            let (name, text) = strs
                .next_str()
                .zip(strs.next_str())
                .ok_or_else(|| violation("malformed Parse message"))?;
            let named = txn.transaction_mode && !name.is_empty();
            let refusal = sql::classify(text, txn.transaction_mode, &mut txn.effects);
            if let Some(r) = if named {
                Some(Refusal::NamedStatement)
            } else {
                refusal
            } {
                // Within the extended protocol the refusal cannot be placed in the stream
                // cleanly, so the client is told and disconnected; its transaction rolls back.
                return Err(
                    ErrorFields::new(Severity::Fatal, "0A000", r.message()).with_hint(r.hint())
                );
            }
            None
        };
        txn.forwarded = true;
        if tag == frontend::QUERY {
            txn.pending += 1;
        } else {
            txn.unsynced = true;
        }
        match refusal {
            None => self.ready += total,
            Some(r) => {
                // Replace the Query with one that makes the server raise the refusal, so the
                // error, the transaction state and the ReadyForQuery all come from the server.
                let mut tail = self.buf.split_off(self.ready);
                tail.advance(total);
                messages::query(&mut self.buf, &raise_sql(r));
                self.ready = self.buf.len();
                self.buf.extend_from_slice(&tail);
            }
        }
        Ok(())
    }
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

/// SQL that makes the server raise a refusal as its own error.
pub fn raise_sql(r: Refusal) -> String {
    format!(
        "DO $pgsluice$BEGIN RAISE EXCEPTION USING ERRCODE = '0A000', MESSAGE = {}, HINT = {}; END$pgsluice$",
        quote_literal(r.message()),
        quote_literal(r.hint())
    )
}

fn would_block(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock
}

/// Relays until the transaction is over (transaction mode) or the client leaves.
pub async fn transaction(
    client: &mut ClientConn,
    server: &mut ServerConn,
    txn: &mut Txn,
) -> Outcome {
    let mut client_closed = false;
    loop {
        match client.scan(txn) {
            Ok(false) => {}
            Ok(true) => client_closed = true,
            Err(e) => return Outcome::ClientError(e, txn.leftover(client, server)),
        }
        // Write eagerly: most of the time the socket takes it all and no wait is needed.
        while !server.buf.is_empty() {
            match client.stream.try_write(&server.buf) {
                Ok(n) => server.buf.advance(n),
                Err(e) if would_block(&e) => break,
                Err(_) => return Outcome::ClientGone(txn.leftover(client, server)),
            }
        }
        while client.ready > 0 {
            match server.stream.try_write(&client.buf[..client.ready]) {
                Ok(n) => {
                    client.buf.advance(n);
                    client.ready -= n;
                }
                Err(e) if would_block(&e) => break,
                Err(e) => return Outcome::ServerGone(e.to_string()),
            }
        }
        if client_closed {
            return Outcome::ClientGone(txn.leftover(client, server));
        }
        if txn.done() && client.ready == 0 && client.pass == 0 && server.buf.is_empty() {
            return Outcome::Done;
        }
        let read_client = client.buf.len() - client.ready < HIGH_WATER;
        let read_server = server.buf.len() < HIGH_WATER;
        tokio::select! {
            r = server.stream.readable(), if read_server => {
                if let Err(e) = r { return Outcome::ServerGone(e.to_string()) }
                server.buf.reserve(READ_CHUNK);
                let before = server.buf.len();
                match server.stream.try_read_buf(&mut server.buf) {
                    Ok(0) => return Outcome::ServerGone("server closed the connection".into()),
                    Ok(_) => {
                        if let Err(e) = server.scanner.feed(&server.buf[before..], MAX_MESSAGE, |t, f| txn.on_server_message(t, f)) {
                            return Outcome::ServerGone(e.to_string());
                        }
                    }
                    Err(e) if would_block(&e) => {}
                    Err(e) => return Outcome::ServerGone(e.to_string()),
                }
            }
            r = client.stream.readable(), if read_client => {
                if r.is_err() { return Outcome::ClientGone(txn.leftover(client, server)) }
                client.buf.reserve(READ_CHUNK);
                match client.stream.try_read_buf(&mut client.buf) {
                    Ok(0) => return Outcome::ClientGone(txn.leftover(client, server)),
                    Ok(_) => {}
                    Err(e) if would_block(&e) => {}
                    Err(_) => return Outcome::ClientGone(txn.leftover(client, server)),
                }
            }
            r = client.stream.writable(), if !server.buf.is_empty() => {
                if r.is_err() { return Outcome::ClientGone(txn.leftover(client, server)) }
            }
            r = server.stream.writable(), if client.ready > 0 => {
                if let Err(e) = r { return Outcome::ServerGone(e.to_string()) }
            }
        }
    }
}

/// After a client left mid-transaction: makes the server clean again, or says it cannot.
/// Returns true when the server may be reused.
pub async fn clean_up(server: &mut ServerConn, leftover: Leftover) -> bool {
    match leftover {
        Leftover::Clean => true,
        Leftover::Busy => false,
        Leftover::IdleInTransaction { unsynced } => {
            if unsynced {
                // Close the extended-protocol batch first; its answer is drained below.
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
            matches!(server.simple_query("ROLLBACK").await, Ok(_))
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
