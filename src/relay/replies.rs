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

use bytes::{Buf, BytesMut};

use super::{Txn, MAX_MESSAGE};
use crate::prepared::{ClientStatements, ServerStatements, Statement};
use crate::protocol::frame::{self, FrameError, HEADER_LEN};
use crate::protocol::messages::ErrorFields;
use crate::protocol::{backend, TransactionStatus};

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
        /// A Parse that prepares a named statement on this server, and the client's name
        /// for it (`None` when the proxy added the Parse), to undo if it fails.
        prepares: Option<(Arc<Statement>, Option<Box<[u8]>>)>,
    },
    /// A reply the proxy sends itself once everything before it is answered.
    Synthetic(&'static [u8]),
}

/// Where the relay stands inside the server's message stream.
#[derive(Debug, Default, Clone, Copy)]
pub struct Cursor {
    tag: u8,
    /// Body bytes of the current message not yet seen.
    left: usize,
}

impl Cursor {
    pub fn at_boundary(&self) -> bool {
        self.left == 0
    }
}

impl Txn {
    /// Records that the server owes a reply to a message just passed on.
    pub(super) fn owe(
        &mut self,
        kind: Reply,
        internal: bool,
        prepares: Option<(Arc<Statement>, Option<Box<[u8]>>)>,
    ) {
        // After an error the server skips to the next Sync: nothing else will be answered.
        if self.errored && !kind.ends_batch() {
            return;
        }
        self.owed.push_back(Owed::Reply {
            kind,
            internal,
            prepares,
        });
    }

    /// Records a reply the proxy makes itself.
    pub(super) fn owe_synthetic(&mut self, reply: &'static [u8]) {
        if !self.errored {
            self.owed.push_back(Owed::Synthetic(reply));
        }
    }

    /// Replies still owed that end with ReadyForQuery.
    pub(super) fn batches_owed(&self) -> usize {
        self.owed
            .iter()
            .filter(|o| matches!(o, Owed::Reply { kind, .. } if kind.ends_batch()))
            .count()
    }

    /// A reply entry that failed on the server: forget what it would have prepared.
    fn failed(entry: Owed, clients: &mut ClientStatements, servers: &mut ServerStatements) {
        if let Owed::Reply {
            prepares: Some((stmt, client_name)),
            ..
        } = entry
        {
            servers.forget(&stmt.server_name);
            if let Some(name) = client_name {
                clients.remove_if(&name, &stmt);
            }
        }
    }

    /// A server message is complete.
    fn complete(
        &mut self,
        tag: u8,
        clients: &mut ClientStatements,
        servers: &mut ServerStatements,
    ) {
        match tag {
            backend::READY_FOR_QUERY => {
                self.copy_in = false;
                self.errored = false;
                while let Some(entry) = self.owed.pop_front() {
                    match entry {
                        Owed::Reply { kind, .. } if kind.ends_batch() => break,
                        other => Self::failed(other, clients, servers),
                    }
                }
                self.counts.ready(self.status, self.batches_owed() == 0);
            }
            backend::ERROR_RESPONSE => match self.owed.front() {
                Some(Owed::Reply { kind, .. }) if kind.ends_batch() => {}
                Some(_) => {
                    // An extended-protocol message failed: the server skips to the next Sync.
                    self.errored = true;
                    while let Some(Owed::Reply { kind, .. }) = self.owed.front() {
                        if kind.ends_batch() {
                            break;
                        }
                        let entry = self.owed.pop_front().expect("front exists");
                        Self::failed(entry, clients, servers);
                    }
                    while matches!(self.owed.front(), Some(Owed::Synthetic(_))) {
                        self.owed.pop_front();
                    }
                }
                None => {}
            },
            backend::COPY_IN_RESPONSE | backend::COPY_BOTH_RESPONSE => self.copy_in = true,
            _ => {
                if let Some(Owed::Reply { kind, prepares, .. }) = self.owed.front() {
                    if kind.completed_by(tag) {
                        if let Some((stmt, _)) = prepares {
                            clients.known.insert(&stmt.server_name);
                        }
                        self.owed.pop_front();
                    }
                }
            }
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
        // server until the statement is prepared again: retire the server.
        // A statement the proxy thought missing but the server had (42P05) or the reverse
        // (26000 for a proxy-prepared name) means the proxy's record of it is wrong.
        let stale_plan = e.code == "0A000"
            && e.message
                .contains("cached plan must not change result type");
        let wrong_record =
            (e.code == "42P05" || e.code == "26000") && e.message.contains("pgsluice_");
        if stale_plan || wrong_record {
            self.server_in_doubt = true;
        }
    }
}

/// Splices in the proxy's own replies that are due (everything before them is answered)
/// at `at`, the end of what is ready for the client.
pub(super) fn emit_due(buf: &mut BytesMut, at: &mut usize, txn: &mut Txn) {
    while let Some(Owed::Synthetic(reply)) = txn.owed.front() {
        let reply = *reply;
        txn.owed.pop_front();
        splice(buf, *at, 0, reply);
        *at += reply.len();
    }
}

/// Replaces `remove` bytes at `at` with `insert`.
pub(super) fn splice(buf: &mut BytesMut, at: usize, remove: usize, insert: &[u8]) {
    if at == buf.len() && remove == 0 {
        buf.extend_from_slice(insert);
        return;
    }
    let mut tail = buf.split_off(at);
    tail.advance(remove);
    buf.extend_from_slice(insert);
    buf.extend_from_slice(&tail);
}

/// Reads the server bytes `buf[at..]`: completes owed replies, splices. Returns the new end
/// of what is ready for the client; bytes after it (a partial header, or a ReadyForQuery or
/// small ErrorResponse not yet whole) wait for more.
pub(super) fn process(
    buf: &mut BytesMut,
    mut at: usize,
    cursor: &mut Cursor,
    txn: &mut Txn,
    clients: &mut ClientStatements,
    servers: &mut ServerStatements,
) -> Result<usize, FrameError> {
    loop {
        if cursor.left > 0 {
            let n = cursor.left.min(buf.len() - at);
            at += n;
            cursor.left -= n;
            if cursor.left > 0 {
                return Ok(at);
            }
            txn.complete(cursor.tag, clients, servers);
            continue;
        }
        emit_due(buf, &mut at, txn);
        let Some((tag, total)) = frame::header(&buf[at..], MAX_MESSAGE)? else {
            return Ok(at);
        };
        let inspect = tag == backend::READY_FOR_QUERY
            || (tag == backend::ERROR_RESPONSE && total <= INSPECTED_ERROR);
        if inspect && buf.len() - at < total {
            return Ok(at);
        }
        match tag {
            backend::READY_FOR_QUERY => {
                if let Some(s) = buf
                    .get(at + HEADER_LEN)
                    .copied()
                    .and_then(TransactionStatus::from_byte)
                {
                    txn.status = s;
                }
            }
            backend::ERROR_RESPONSE if inspect => {
                txn.inspect_error(&buf[at + HEADER_LEN..at + total])
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
        at += HEADER_LEN;
        if cursor.left == 0 {
            txn.complete(tag, clients, servers);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    /// Feeds `wire` in chunks of the given sizes; returns what the client gets.
    fn run(txn: &mut Txn, wire: &[u8], cuts: &[usize]) -> Vec<u8> {
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
            buf.advance(ready);
            ready = 0;
            i += 1;
        }
        assert!(buf.is_empty() && cursor.at_boundary());
        out
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
            txn.owe(Reply::Execute, false, None);
            txn.owe_synthetic(crate::prepared::PARSE_COMPLETE);
            txn.owe(Reply::Parse, true, Some((stmt(), None)));
            txn.owe(Reply::Bind, false, None);
            txn.owe(Reply::Execute, false, None);
            txn.owe(Reply::Sync, false, None);
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
            Some((s.clone(), Some(b"s1".to_vec().into()))),
        );
        txn.owe(Reply::Bind, false, None);
        txn.owe_synthetic(crate::prepared::CLOSE_COMPLETE);
        txn.owe(Reply::Execute, false, None);
        txn.owe(Reply::Sync, false, None);
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

    #[test]
    fn stale_plan_errors_retire_the_server() {
        let mut txn = Txn::new(true);
        txn.owe(Reply::Execute, false, None);
        txn.owe(Reply::Sync, false, None);
        let mut wire = msg(
            b'E',
            b"SERROR\0C0A000\0Mcached plan must not change result type\0\0",
        );
        wire.extend(msg(b'Z', b"I"));
        run(&mut txn, &wire, &[3]);
        assert!(txn.server_in_doubt);
    }
}
