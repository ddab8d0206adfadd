//! Named prepared statements under transaction pooling.
//!
//! A client's next transaction may run on a server that never saw its `Parse`. So the proxy
//! keeps, per client, its statement names → the statement; and per server, which statements
//! it has prepared, under proxy-chosen names derived from a hash of the query text and
//! parameter types (`pgsluice_<32 hex>`): the same text prepared by different clients, under
//! any names, shares one server-side statement, and names never collide across clients.
//! The relay rewrites `Parse`, `Bind`, `Describe` and `Close` by these maps
//! ([`crate::relay`]); the server side of the map is an LRU bounded by
//! `max_prepared_statements`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes, BytesMut};
use sha2::{Digest, Sha256};

use crate::sql::SessionEffects;

/// foldhash keyed once per process from the operating system's random source (through
/// `rand`), without 8 bytes of seed in every client's session: statement names are the
/// client's to choose, so their hashes must not be predictable (foldhash's own
/// `RandomState` seeds from addresses and the clock). SipHash, keyed the same way, cost
/// ~190 instructions per lookup here, three lookups per Bind of a prepared statement.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessKeys;

static KEYS: std::sync::LazyLock<foldhash::fast::SeedableRandomState> =
    std::sync::LazyLock::new(|| {
        use rand::RngExt;
        let mut rng = rand::rng();
        let shared = Box::leak(Box::new(foldhash::SharedSeed::from_u64(rng.random())));
        foldhash::fast::SeedableRandomState::with_seed(rng.random(), shared)
    });

impl std::hash::BuildHasher for ProcessKeys {
    type Hasher = foldhash::fast::FoldHasher<'static>;

    fn build_hasher(&self) -> Self::Hasher {
        KEYS.build_hasher()
    }
}

/// One statement as the server knows it.
#[derive(Debug)]
pub struct Statement {
    /// Server-side name, `pgsluice_` + 32 hex digits.
    pub server_name: Arc<str>,
    /// The Parse message that prepares it on a server, under `server_name`.
    pub parse: Bytes,
    /// Session parameters running it may change (a `SET` or `set_config` in its text):
    /// tracked at each Bind, as for a statement sent as text, so that a changed setting is
    /// recorded whichever transaction runs it. `None` for almost every statement.
    pub effects: Option<Box<SessionEffects>>,
    /// Running it clears every prepared statement: its text is `DEALLOCATE ALL` or `DISCARD
    /// ALL` (see the relay's `Txn::clears_ahead`).
    pub clears: bool,
}

impl Statement {
    /// Builds the server-side statement from the body of a client's Parse message, given
    /// where its query text starts (just after the client's statement name).
    pub fn from_parse(after_name: &[u8]) -> Statement {
        let digest = Sha256::digest(after_name);
        let mut name = String::with_capacity(41);
        name.push_str("pgsluice_");
        for b in &digest[..16] {
            name.push_str(&format!("{b:02x}"));
        }
        let mut parse = BytesMut::with_capacity(after_name.len() + name.len() + 6);
        parse.put_u8(b'P');
        parse.put_i32((4 + name.len() + 1 + after_name.len()) as i32);
        parse.put_slice(name.as_bytes());
        parse.put_u8(0);
        parse.put_slice(after_name);
        Statement {
            server_name: name.into(),
            parse: parse.freeze(),
            effects: None,
            clears: false,
        }
    }

    /// The statement, noting that running it clears every prepared statement.
    pub fn clearing(mut self, clears: bool) -> Statement {
        self.clears = clears;
        self
    }

    /// The statement, noting what running it changes in the session.
    pub fn with_effects(mut self, effects: SessionEffects) -> Statement {
        self.effects = (!effects.is_empty()).then(|| Box::new(effects));
        self
    }
}

/// Statements some server of this proxy prepared successfully: a client's Parse of one
/// of them can be answered without a server.
#[derive(Debug, Default)]
pub struct KnownStatements {
    names: Mutex<HashSet<Arc<str>>>,
}

/// Most statements remembered as known; past it the set starts over.
const MAX_KNOWN: usize = 100_000;

impl KnownStatements {
    pub fn contains(&self, name: &str) -> bool {
        self.names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name)
    }

    pub fn insert(&self, name: &Arc<str>) {
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        if names.len() >= MAX_KNOWN {
            names.clear();
        }
        names.insert(name.clone());
    }
}

/// Most named statements one client may hold: past it, its Parse of a new name gets
/// `FATAL 54000` (all clients' statements live in the proxy's memory, which one client
/// leaking names must not exhaust). Drivers cache far fewer (Rails 1,000, pgx 512, JDBC 256,
/// psycopg 100).
pub const MAX_CLIENT_STATEMENTS: usize = 10_000;

/// A client's named statements.
#[derive(Debug, Default)]
pub struct ClientStatements {
    map: HashMap<Box<[u8]>, Arc<Statement>, ProcessKeys>,
    /// The proxy-wide set of statements known to prepare.
    pub known: Arc<KnownStatements>,
}

impl ClientStatements {
    pub fn new(known: Arc<KnownStatements>) -> ClientStatements {
        ClientStatements {
            map: HashMap::with_hasher(ProcessKeys),
            known,
        }
    }

    pub fn get(&self, name: &[u8]) -> Option<&Arc<Statement>> {
        self.map.get(name)
    }

    pub fn insert(&mut self, name: &[u8], stmt: Arc<Statement>) {
        self.map.insert(name.into(), stmt);
    }

    /// Forgets `name`; returns what it meant.
    pub fn remove(&mut self, name: &[u8]) -> Option<Arc<Statement>> {
        self.map.remove(name)
    }

    /// Puts back a name a skipped Close or DEALLOCATE removed, unless it was reused since.
    pub fn restore(&mut self, name: &[u8], stmt: Arc<Statement>) {
        self.map.entry(name.into()).or_insert(stmt);
    }

    /// Forgets `name` if it still means `stmt` (a failed Parse is not registered).
    pub fn remove_if(&mut self, name: &[u8], stmt: &Arc<Statement>) {
        if self.map.get(name).is_some_and(|s| Arc::ptr_eq(s, stmt)) {
            self.map.remove(name);
        }
    }

    pub fn clear(&mut self) {
        self.map.clear();
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The statements one server connection has prepared, least recently used first out.
#[derive(Debug, Default)]
pub struct ServerStatements {
    used: HashMap<Arc<str>, u64, ProcessKeys>,
    tick: u64,
}

impl ServerStatements {
    /// True (and marks it used) when the server has the statement.
    pub fn touch(&mut self, name: &Arc<str>) -> bool {
        self.tick += 1;
        match self.used.get_mut(name) {
            Some(t) => {
                *t = self.tick;
                true
            }
            None => false,
        }
    }

    /// Records that the server is about to prepare `name`; returns the statement to close
    /// first when that would pass `max` statements.
    pub fn add(&mut self, name: Arc<str>, max: usize) -> Option<Arc<str>> {
        let evicted = if self.used.len() >= max.max(1) {
            let oldest = self
                .used
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(n, _)| n.clone())?;
            self.used.remove(&oldest);
            Some(oldest)
        } else {
            None
        };
        self.tick += 1;
        self.used.insert(name, self.tick);
        evicted
    }

    /// Forgets a statement the server turned out not to have (its Parse failed); true
    /// when the record had it.
    pub fn forget(&mut self, name: &str) -> bool {
        self.used.remove(name).is_some()
    }

    /// Puts back a statement whose eviction Close the server skipped: it still has it.
    pub fn restore(&mut self, name: Arc<str>) {
        self.tick += 1;
        self.used.entry(name).or_insert(self.tick);
    }

    /// The server dropped all its statements (DEALLOCATE ALL, DISCARD ALL).
    pub fn clear(&mut self) {
        self.used.clear();
    }

    pub fn len(&self) -> usize {
        self.used.len()
    }

    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }
}

/// A Close (statement) message for `name`.
pub fn close_message(name: &str) -> Bytes {
    let mut m = BytesMut::with_capacity(name.len() + 7);
    m.put_u8(b'C');
    m.put_i32((4 + 1 + name.len() + 1) as i32);
    m.put_u8(b'S');
    m.put_slice(name.as_bytes());
    m.put_u8(0);
    m.freeze()
}

/// ParseComplete, as the proxy answers a Parse the server did not need.
pub const PARSE_COMPLETE: &[u8] = &[b'1', 0, 0, 0, 4];
/// CloseComplete, as the proxy answers a client's Close of a statement.
pub const CLOSE_COMPLETE: &[u8] = &[b'3', 0, 0, 0, 4];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_depend_on_text_and_types_only() {
        let a = Statement::from_parse(b"SELECT 1\0\0\0");
        let b = Statement::from_parse(b"SELECT 1\0\0\0");
        let c = Statement::from_parse(b"SELECT 2\0\0\0");
        let d = Statement::from_parse(b"SELECT $1\0\0\x01\0\0\0\x17");
        let e = Statement::from_parse(b"SELECT $1\0\0\x01\0\0\0\x19");
        assert_eq!(a.server_name, b.server_name);
        assert_ne!(a.server_name, c.server_name);
        assert_ne!(d.server_name, e.server_name);
        assert_eq!(a.server_name.len(), 41);
        // The Parse message carries the server name and the client's query and types.
        assert_eq!(&a.parse[..1], b"P");
        assert_eq!(
            i32::from_be_bytes(a.parse[1..5].try_into().unwrap()) as usize,
            a.parse.len() - 1
        );
        assert!(a.parse.ends_with(b"SELECT 1\0\0\0"));
    }

    #[test]
    fn lru_evicts_the_least_recently_used() {
        let mut s = ServerStatements::default();
        let n = |x: &str| -> Arc<str> { x.into() };
        assert_eq!(s.add(n("a"), 2), None);
        assert_eq!(s.add(n("b"), 2), None);
        assert!(s.touch(&n("a")));
        assert_eq!(s.add(n("c"), 2).as_deref(), Some("b"));
        assert!(!s.touch(&n("b")));
        assert!(s.touch(&n("a")) && s.touch(&n("c")));
        s.forget("a");
        assert!(!s.touch(&n("a")));
    }
}
