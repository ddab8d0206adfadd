//! A socket-free driver of the relay's message inspection, for the fuzz targets and the
//! corpus replay test ([`crate::fuzzing::relay`]).
//!
//! It plays one client session as `client.rs` and [`super::transaction`] do: between
//! transactions it peeks (answering a lone Sync, a known Parse, refusing a request); while
//! linked it scans the client's bytes ([`ClientConn::scan`], the prepared-statement
//! rewriting) and processes the server's ([`replies::process`], the reply matching and
//! splicing). The script says which bytes arrive from which side, in what pieces.
//!
//! Besides "no panic", it checks that both streams the proxy writes (to the server, to the
//! client) are well-framed: rewriting and splicing must never cut a message or produce a
//! bad header.

use std::sync::Arc;

use bytes::Buf;

use super::replies::{self, Cursor};
use super::{ClientConn, Txn, MAX_MESSAGE};
use crate::prepared::{KnownStatements, ServerStatements};
use crate::protocol::frame::{self, HEADER_LEN};
use crate::protocol::frontend;
use crate::relay::Peek;

/// Checks that a byte stream is a sequence of whole, well-formed messages (the last may be
/// unfinished).
#[derive(Default)]
struct Framing {
    /// Bytes of the current message body still to come.
    left: usize,
    header: Vec<u8>,
}

impl Framing {
    fn feed(&mut self, mut bytes: &[u8], what: &str) {
        while !bytes.is_empty() {
            if self.left > 0 {
                let n = self.left.min(bytes.len());
                self.left -= n;
                bytes = &bytes[n..];
                continue;
            }
            let need = HEADER_LEN - self.header.len();
            let n = need.min(bytes.len());
            self.header.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.header.len() == HEADER_LEN {
                match frame::header(&self.header, MAX_MESSAGE) {
                    Ok(Some((_, total))) => self.left = total - HEADER_LEN,
                    other => panic!(
                        "the proxy wrote a bad message header to the {what}: {:?} ({other:?})",
                        self.header
                    ),
                }
                self.header.clear();
            }
        }
    }
}

/// One pooled server connection's state that outlives a transaction.
#[derive(Default)]
struct Server {
    buf: bytes::BytesMut,
    cursor: Cursor,
    statements: ServerStatements,
}

struct Session {
    client: ClientConn<()>,
    servers: [Server; 2],
    /// The linked server and the transaction, if any.
    linked: Option<(usize, Txn)>,
    /// Bytes of `servers[linked].buf` ready for the client.
    out: usize,
    transaction_mode: bool,
    next_server: usize,
    to_server: Framing,
    to_client: Framing,
    /// The session ended (Terminate, a protocol error, the server gone).
    over: bool,
    /// The next request is refused (as when the pool is paused or a checkout times out).
    refuse_next: bool,
}

impl Session {
    /// Between transactions: what `client.rs` does with the client's next request.
    fn idle(&mut self) {
        while !self.over && self.linked.is_none() {
            if self.refuse_next {
                match self.client.skip_request() {
                    Ok(true) => {
                        self.refuse_next = false;
                        continue;
                    }
                    Ok(false) => return,
                    Err(_) => {
                        self.over = true;
                        return;
                    }
                }
            }
            match self.client.peek() {
                Err(_) | Ok(Peek::Terminate) => self.over = true,
                Ok(Peek::NeedMore) => return,
                Ok(Peek::Local(_, total)) => self.client.discard(total),
                Ok(Peek::Ready(tag)) => {
                    if tag == frontend::PARSE && self.transaction_mode {
                        if let Some(reply) = self.client.answer_parse() {
                            self.to_client.feed(&reply, "client");
                            continue;
                        }
                    }
                    let s = self.next_server % 2;
                    self.next_server += 1;
                    self.linked = Some((s, Txn::new(self.transaction_mode)));
                    self.out = 0;
                }
            }
        }
    }

    /// While linked: one turn of [`super::transaction`]'s loop, with every write taking
    /// all it is given.
    fn relay(&mut self) {
        let Some((s, txn)) = self.linked.as_mut() else {
            return;
        };
        let server = &mut self.servers[*s];
        let closed = match self.client.scan(txn, &mut server.statements) {
            Ok(closed) => closed,
            Err(_) => {
                self.over = true;
                return;
            }
        };
        assert!(self.client.ready <= self.client.buf.len());
        replies::emit_due(
            &mut server.buf,
            &mut self.out,
            txn,
            &mut self.client.statements,
        );
        assert!(self.out <= server.buf.len());
        self.to_client.feed(&server.buf[..self.out], "client");
        server.buf.advance(self.out);
        self.out = 0;
        self.to_server
            .feed(&self.client.buf[..self.client.ready], "server");
        self.client.buf.advance(self.client.ready);
        self.client.ready = 0;
        if closed {
            self.over = true;
            return;
        }
        if txn.done() && super::quiet(&self.client, &server.buf, &server.cursor) {
            // What `Checkout::release` requires of a server going back to the pool.
            assert!(
                server.buf.is_empty() && server.cursor.at_boundary(),
                "a server is released mid-message"
            );
            self.linked = None;
        }
    }

    fn step(&mut self) {
        // A transaction may end and the next begin on what is already buffered.
        for _ in 0..64 {
            if self.over {
                return;
            }
            self.idle();
            if self.linked.is_none() {
                return; // more bytes needed, or the session is over
            }
            self.relay();
            if self.linked.is_some() {
                return; // the transaction waits for more bytes
            }
        }
    }

    fn client_bytes(&mut self, bytes: &[u8]) {
        self.client.buf.extend_from_slice(bytes);
        self.client.drop_skipped();
        self.step();
    }

    fn server_bytes(&mut self, bytes: &[u8]) {
        let Some((s, txn)) = self.linked.as_mut() else {
            // A pooled server that speaks unasked is discarded (its liveness check fails).
            let s = self.next_server % 2;
            self.servers[s] = Server::default();
            return;
        };
        let server = &mut self.servers[*s];
        server.buf.extend_from_slice(bytes);
        match replies::process(
            &mut server.buf,
            self.out,
            &mut server.cursor,
            txn,
            &mut self.client.statements,
            &mut server.statements,
        ) {
            Ok(end) => {
                assert!(end <= server.buf.len() && end >= self.out);
                self.out = end;
            }
            Err(_) => {
                self.over = true;
                return;
            }
        }
        self.step();
    }
}

/// Reads a script from fuzzer bytes.
struct Script<'a>(&'a [u8]);

impl<'a> Script<'a> {
    fn byte(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        b
    }

    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        b
    }
}

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn cstrs(parts: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::new();
    for p in parts {
        v.extend_from_slice(p);
        v.push(0);
    }
    v
}

const FRONTEND_TAGS: &[u8] = b"QPBDECHSFdcfXp";
const BACKEND_TAGS: &[u8] = b"123CDEIGHWNnsTtZSKAVcdv";
const NAMES: [&[u8]; 4] = [b"", b"s1", b"s2", b"pgsluice_x"];
const QUERIES: [&[u8]; 8] = [
    b"SELECT 1",
    b"SELECT $1",
    b"DEALLOCATE s1",
    b"DEALLOCATE ALL",
    b"BEGIN",
    b"COMMIT",
    b"SET search_path = a",
    b"LISTEN x",
];

/// A client message of the extended protocol, built well-formed from a few script bytes.
fn client_message(s: &mut Script) -> Vec<u8> {
    let kind = s.byte();
    let name = NAMES[(s.byte() % 4) as usize];
    match kind % 8 {
        0 => {
            let q = QUERIES[(s.byte() % 8) as usize];
            message(b'P', &[&cstrs(&[name, q])[..], &[0, 0]].concat())
        }
        1 => message(
            b'B',
            &[&cstrs(&[b"", name])[..], &[0, 0, 0, 0, 0, 0]].concat(),
        ),
        2 => message(b'D', &[&[b'S'][..], &cstrs(&[name])].concat()),
        3 => message(b'C', &[&[b'S'][..], &cstrs(&[name])].concat()),
        4 => message(b'E', &[0, 0, 0, 0, 0]),
        5 => message(b'S', &[]),
        6 => message(b'H', &[]),
        _ => {
            let q = QUERIES[(s.byte() % 8) as usize];
            message(b'Q', &cstrs(&[q]))
        }
    }
}

/// A server message, built well-formed from a few script bytes.
fn server_message(s: &mut Script) -> Vec<u8> {
    match s.byte() % 12 {
        0 => message(b'1', &[]),
        1 => message(b'2', &[]),
        2 => message(b'3', &[]),
        3 => message(b'n', &[]),
        4 => message(b'C', b"SELECT 1\0"),
        5 => message(b'C', b"DEALLOCATE ALL\0"),
        6 => message(b'Z', &[[b'I', b'T', b'E'][(s.byte() % 3) as usize]]),
        7 => message(b'E', b"SERROR\0C42601\0Msyntax error\0\0"),
        8 => message(
            b'E',
            b"SERROR\0C26000\0Mprepared statement \"pgsluice_x\" does not exist\0\0",
        ),
        9 => message(b'D', &[0, 1, 0, 0, 0, 1, b'x']),
        10 => message(b'T', &[0, 0]),
        _ => message(b'G', &[0, 0, 0]),
    }
}

/// Runs a fuzzer-chosen script. The first byte sets the pool mode and limits; then each
/// op adds bytes on one side (a built message, a message with a fuzzer tag and body, or raw
/// bytes), held back until a "deliver" op or the end, so that messages arrive in any pieces.
pub fn run(data: &[u8]) {
    let mut s = Script(data);
    let flags = s.byte();
    let transaction_mode = flags & 1 == 0;
    let max_prepared = ((flags >> 1) & 7) as usize;
    let max_query_size = if flags & 0x10 != 0 { 64 } else { 1 << 20 };
    let mut session = Session {
        client: ClientConn::new(
            (),
            max_query_size,
            max_prepared,
            Arc::new(KnownStatements::default()),
        ),
        servers: Default::default(),
        linked: None,
        out: 0,
        transaction_mode,
        next_server: 0,
        to_server: Framing::default(),
        to_client: Framing::default(),
        over: false,
        refuse_next: false,
    };
    let (mut from_client, mut from_server) = (Vec::new(), Vec::new());
    let mut ops = 0;
    while !s.0.is_empty() && !session.over && ops < 10_000 {
        ops += 1;
        let op = s.byte();
        match op % 9 {
            0 => from_client.extend(client_message(&mut s)),
            1 => from_server.extend(server_message(&mut s)),
            2 => {
                let tag = FRONTEND_TAGS[s.byte() as usize % FRONTEND_TAGS.len()];
                let n = s.byte() as usize;
                from_client.extend(message(tag, s.bytes(n)));
            }
            3 => {
                let tag = BACKEND_TAGS[s.byte() as usize % BACKEND_TAGS.len()];
                let n = s.byte() as usize;
                from_server.extend(message(tag, s.bytes(n)));
            }
            4 => {
                let n = (s.byte() % 16) as usize;
                from_client.extend_from_slice(s.bytes(n));
            }
            5 => {
                let n = (s.byte() % 16) as usize;
                from_server.extend_from_slice(s.bytes(n));
            }
            6 => {
                // Deliver some of the client's bytes.
                let n = (s.byte() as usize).min(from_client.len());
                let chunk: Vec<u8> = from_client.drain(..n).collect();
                session.client_bytes(&chunk);
            }
            7 => {
                let n = (s.byte() as usize).min(from_server.len());
                let chunk: Vec<u8> = from_server.drain(..n).collect();
                session.server_bytes(&chunk);
            }
            _ => session.refuse_next = true,
        }
    }
    if !session.over && !from_client.is_empty() {
        session.client_bytes(&from_client);
    }
    if !session.over && !from_server.is_empty() {
        session.server_bytes(&from_server);
    }
}
