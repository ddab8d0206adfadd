//! Recognises statements that change state living in a server *session* rather than in a
//! transaction, so that transaction pooling can keep each client's session state its own.
//!
//! This is a lexer, not a parser: it skips comments, strings, quoted identifiers and dollar
//! quotes, splits statements on `;` and looks at each statement's leading keywords (plus a
//! few function names anywhere). See `docs/transaction-mode.md` for the per-statement choices.

/// What a query text does to session state, accumulated over one transaction.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SessionEffects {
    /// Parameters (lower case) a `SET`, `RESET` or `set_config` may have changed.
    pub touched: Vec<String>,
    /// Those of `touched` whose last change was `RESET name`: the server goes back to its
    /// own default, but the client to its startup value (see `Session::refresh_params`).
    pub reset: Vec<String>,
    /// `RESET ALL` or `DISCARD ALL` ran: every parameter went back to its default.
    pub reset_all: bool,
    /// Session state changed that cannot be named here: a parameter written with escapes
    /// (`U&"…"`, `E'…'`), a name longer than the statement's head, or more than
    /// [`MAX_TOUCHED`] parameters. The server cannot be given to another client: it is
    /// closed after the transaction.
    pub unknown: bool,
}

/// Most parameters tracked in one transaction; past it the server is closed instead (see
/// [`SessionEffects::unknown`]), which also keeps the read-back query within PostgreSQL's
/// 1,664 columns.
pub const MAX_TOUCHED: usize = 256;

impl SessionEffects {
    pub fn is_empty(&self) -> bool {
        self.touched.is_empty() && !self.reset_all && !self.unknown
    }

    /// Adds what `other` changed.
    pub fn merge(&mut self, other: &SessionEffects) {
        self.reset_all |= other.reset_all;
        self.unknown |= other.unknown;
        for name in &other.touched {
            self.touch(name.clone(), other.reset.contains(name));
        }
    }

    /// `name` may have changed; `reset`: by `RESET name`, the last change so far.
    fn touch(&mut self, name: String, reset: bool) {
        if let Some(i) = self.reset.iter().position(|n| *n == name) {
            if !reset {
                self.reset.swap_remove(i);
            }
        } else if reset && !self.unknown {
            self.reset.push(name.clone());
        }
        if self.unknown || self.touched.contains(&name) {
            return;
        }
        if self.touched.len() >= MAX_TOUCHED {
            self.unknown = true;
            return;
        }
        self.touched.push(name);
    }
}

/// A statement transaction pooling refuses, because its effect would outlive the transaction
/// on a server session that other clients share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Listen,
    Prepare,
    HoldCursor,
    TempTable,
    AdvisoryLock,
    SessionAuthorization,
    NamedStatement,
}

impl Refusal {
    /// SQLSTATE 0A000 (feature_not_supported) message.
    pub fn message(self) -> &'static str {
        match self {
            Refusal::Listen => "pgsluice: LISTEN is not supported in transaction pooling mode",
            Refusal::Prepare => "pgsluice: SQL PREPARE is not supported in transaction pooling mode",
            Refusal::HoldCursor => "pgsluice: DECLARE ... WITH HOLD is not supported in transaction pooling mode",
            Refusal::TempTable => "pgsluice: temporary tables, views and sequences are not supported in transaction pooling mode",
            Refusal::AdvisoryLock => "pgsluice: session-level advisory locks are not supported in transaction pooling mode",
            Refusal::SessionAuthorization => {
                "pgsluice: SET SESSION AUTHORIZATION is not supported in transaction pooling mode"
            }
            Refusal::NamedStatement => {
                "pgsluice: named prepared statements are not supported in transaction pooling mode"
            }
        }
    }

    /// What to do instead.
    pub fn hint(self) -> &'static str {
        match self {
            Refusal::Listen => "Notifications would be delivered to a server connection other clients share. Connect listeners through a pool with pool_mode = \"session\".",
            Refusal::Prepare => "The statement would stay on a server connection other clients share. Use your driver's protocol-level statements, or pool_mode = \"session\".",
            Refusal::HoldCursor => "A holdable cursor outlives its transaction on a shared server connection. Use a cursor without WITH HOLD inside a transaction, or pool_mode = \"session\".",
            Refusal::TempTable => "The table would stay on a server connection other clients share. Create it with ON COMMIT DROP and use it within one transaction, or use pool_mode = \"session\".",
            Refusal::AdvisoryLock => "The lock would stay on a server connection other clients share. Use pg_advisory_xact_lock() inside a transaction, or pool_mode = \"session\".",
            Refusal::SessionAuthorization => "Use SET LOCAL ROLE inside a transaction, or pool_mode = \"session\".",
            Refusal::NamedStatement => "Use unnamed statements, or pool_mode = \"session\" for this client.",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token<'a> {
    Word(&'a [u8]),
    QuotedIdent(&'a [u8]),
    Str(&'a [u8]),
    /// A string or identifier whose text is not what it means: `E'…'` with a backslash,
    /// `U&'…'`, `U&"…"`.
    Escaped,
    Semi,
    LParen,
    Dot,
    Eq,
    Other,
}

struct Lexer<'a> {
    s: &'a [u8],
    i: usize,
    /// The session has `standard_conforming_strings` off: a backslash escapes in `'…'`.
    escape_strings: bool,
    /// The last string went on past a closing quote (`'a'` newline `'b'`).
    continued: bool,
}

/// White space as PostgreSQL's lexer has it (`[ \t\n\r\f\v]`): Rust's ASCII white space
/// lacks the vertical tab.
fn is_space(b: u8) -> bool {
    b.is_ascii_whitespace() || b == 0x0b
}

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

fn is_ident_cont(b: u8) -> bool {
    is_ident_start(b) || b.is_ascii_digit() || b == b'$'
}

impl<'a> Lexer<'a> {
    fn new(s: &'a [u8]) -> Lexer<'a> {
        Lexer {
            s,
            i: 0,
            escape_strings: false,
            continued: false,
        }
    }

    fn at(&self, k: usize) -> u8 {
        self.s.get(self.i + k).copied().unwrap_or(0)
    }

    /// Skips a quoted run ending at `q`, where a doubled `q` is an escaped one.
    fn quoted(&mut self, q: u8, backslash: bool) -> &'a [u8] {
        let start = self.i;
        while self.i < self.s.len() {
            let b = self.s[self.i];
            if backslash && b == b'\\' {
                self.i += 2;
                continue;
            }
            if b == q {
                if self.at(1) == q {
                    self.i += 2;
                    continue;
                }
                let body = &self.s[start..self.i];
                self.i += 1;
                // `'a'` white space with a newline `'b'` is one string `ab` to PostgreSQL,
                // lexed on in the same mode (an `E` string keeps its escapes).
                if q == b'\'' {
                    if let Some(next) = self.continuation() {
                        self.i = next + 1;
                        self.continued = true;
                        return self.quoted(q, backslash);
                    }
                }
                return body;
            }
            self.i += 1;
        }
        let end = self.s.len().min(self.i);
        self.i = self.s.len();
        &self.s[start..end]
    }

    /// Where a string continues after its closing quote: white space holding a newline
    /// (comments allowed after the newline), then a quote. The quote's index.
    fn continuation(&self) -> Option<usize> {
        let mut j = self.i;
        let mut newline = false;
        while j < self.s.len() {
            match self.s[j] {
                b'\n' | b'\r' => {
                    newline = true;
                    j += 1;
                }
                b if is_space(b) => j += 1,
                b'-' if newline && self.s.get(j + 1) == Some(&b'-') => {
                    j = memchr::memchr2(b'\n', b'\r', &self.s[j..]).map_or(self.s.len(), |p| j + p);
                }
                b'\'' if newline => return Some(j),
                _ => return None,
            }
        }
        None
    }

    fn next_token(&mut self) -> Option<Token<'a>> {
        loop {
            let b = *self.s.get(self.i)?;
            match b {
                b if is_space(b) => self.i += 1,
                // A comment ends at a newline, `\r` included, as PostgreSQL's does.
                b'-' if self.at(1) == b'-' => {
                    self.i = memchr::memchr2(b'\n', b'\r', &self.s[self.i..])
                        .map_or(self.s.len(), |p| self.i + p);
                }
                b'/' if self.at(1) == b'*' => {
                    let mut depth = 0usize;
                    while self.i < self.s.len() {
                        if self.at(0) == b'/' && self.at(1) == b'*' {
                            depth += 1;
                            self.i += 2;
                        } else if self.at(0) == b'*' && self.at(1) == b'/' {
                            depth -= 1;
                            self.i += 2;
                            if depth == 0 {
                                break;
                            }
                        } else {
                            self.i += 1;
                        }
                    }
                }
                b'\'' => {
                    self.i += 1;
                    self.continued = false;
                    let body = self.quoted(b'\'', self.escape_strings);
                    if self.continued || self.escape_strings && body.contains(&b'\\') {
                        return Some(Token::Escaped);
                    }
                    return Some(Token::Str(body));
                }
                b'"' => {
                    self.i += 1;
                    return Some(Token::QuotedIdent(self.quoted(b'"', false)));
                }
                b'$' => {
                    // $n parameter, or a $tag$ ... $tag$ dollar quote.
                    let mut j = self.i + 1;
                    while j < self.s.len() && is_ident_cont(self.s[j]) && self.s[j] != b'$' {
                        j += 1;
                    }
                    if j < self.s.len() && self.s[j] == b'$' && !self.at(1).is_ascii_digit() {
                        let tag = &self.s[self.i..=j];
                        let body_start = j + 1;
                        let end = memchr::memmem::find(&self.s[body_start..], tag);
                        let body_end = end.map_or(self.s.len(), |e| body_start + e);
                        self.i = end.map_or(self.s.len(), |e| body_start + e + tag.len());
                        return Some(Token::Str(&self.s[body_start..body_end]));
                    }
                    self.i = j.max(self.i + 1);
                    return Some(Token::Other);
                }
                b if b.is_ascii_digit() => {
                    // A number is one token, not one per digit.
                    self.i += 1;
                    while self.i < self.s.len()
                        && (self.s[self.i].is_ascii_alphanumeric() || self.s[self.i] == b'.')
                    {
                        self.i += 1;
                    }
                    return Some(Token::Other);
                }
                b if is_ident_start(b) => {
                    let start = self.i;
                    while self.i < self.s.len() && is_ident_cont(self.s[self.i]) {
                        self.i += 1;
                    }
                    let word = &self.s[start..self.i];
                    if self.at(0) == b'\'' && (word.eq_ignore_ascii_case(b"e")) {
                        self.i += 1;
                        self.continued = false;
                        let body = self.quoted(b'\'', true);
                        if self.continued || body.contains(&b'\\') {
                            return Some(Token::Escaped);
                        }
                        return Some(Token::Str(body));
                    }
                    // U&'…' and U&"…": Unicode escapes (and maybe a UESCAPE clause).
                    if word.eq_ignore_ascii_case(b"u")
                        && self.at(0) == b'&'
                        && matches!(self.at(1), b'\'' | b'"')
                    {
                        let q = self.at(1);
                        self.i += 2;
                        self.quoted(q, false);
                        return Some(Token::Escaped);
                    }
                    return Some(Token::Word(word));
                }
                b';' => {
                    self.i += 1;
                    return Some(Token::Semi);
                }
                b'(' => {
                    self.i += 1;
                    return Some(Token::LParen);
                }
                b'.' => {
                    self.i += 1;
                    return Some(Token::Dot);
                }
                b'=' => {
                    self.i += 1;
                    return Some(Token::Eq);
                }
                _ => {
                    self.i += 1;
                    return Some(Token::Other);
                }
            }
        }
    }
}

fn is(t: Option<&Token>, kw: &str) -> bool {
    matches!(t, Some(Token::Word(w)) if w.eq_ignore_ascii_case(kw.as_bytes()))
}

const SESSION_LOCK_FUNCTIONS: [&str; 4] = [
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
];

/// Tokens of a statement's start kept for the checks that look at it (`SET a.b.c TO …`).
const HEAD: usize = 12;

/// What one statement showed so far, token by token, without keeping its tokens.
#[derive(Default)]
struct Scan<'a> {
    head: [Option<Token<'a>>; HEAD],
    len: usize,
    /// The two tokens before the current one.
    prev: [Option<Token<'a>>; 2],
    with_hold: bool,
    on_commit_drop: bool,
    /// `pg_temp.` names an object: one made there lives as long as the session.
    pg_temp: bool,
    /// The token after `set_config(` names the parameter.
    set_config_next: bool,
    refusal: Option<Refusal>,
}

impl<'a> Scan<'a> {
    fn push(&mut self, tok: Token<'a>, effects: &mut SessionEffects) {
        if self.len < HEAD {
            self.head[self.len] = Some(tok);
        }
        self.len += 1;
        if self.set_config_next {
            self.set_config_next = false;
            match tok {
                Token::Str(name) => {
                    effects.touch(String::from_utf8_lossy(name).to_ascii_lowercase(), false)
                }
                // A name written with escapes: which parameter it sets is not known here.
                Token::Escaped => effects.unknown = true,
                // Not a literal (`$1`, an expression): not tracked (docs: Limitations).
                _ => {}
            }
        }
        match tok {
            // Function calls anywhere in the statement, named plainly or quoted (a quoted
            // name keeps its case: only the lower-case spelling is the function).
            Token::LParen => {
                let name = match self.prev[1] {
                    Some(Token::Word(w)) => Some((w, false)),
                    Some(Token::QuotedIdent(w)) => Some((w, true)),
                    _ => None,
                };
                if let Some((w, quoted)) = name {
                    let named = |f: &str| {
                        if quoted {
                            w == f.as_bytes()
                        } else {
                            w.eq_ignore_ascii_case(f.as_bytes())
                        }
                    };
                    if SESSION_LOCK_FUNCTIONS.iter().any(|f| named(f)) {
                        self.refusal.get_or_insert(Refusal::AdvisoryLock);
                    } else if named("set_config") {
                        self.set_config_next = true;
                    }
                }
            }
            Token::Dot if is(self.prev[1].as_ref(), "pg_temp") => self.pg_temp = true,
            Token::Word(w) => {
                if w.eq_ignore_ascii_case(b"hold") && is(self.prev[1].as_ref(), "with") {
                    self.with_hold = true;
                } else if w.eq_ignore_ascii_case(b"drop")
                    && is(self.prev[1].as_ref(), "commit")
                    && is(self.prev[0].as_ref(), "on")
                {
                    self.on_commit_drop = true;
                }
            }
            _ => {}
        }
        self.prev = [self.prev[1], Some(tok)];
    }

    /// The statement ended: its refusal, if any; the scan is reset for the next one.
    fn finish(&mut self, effects: &mut SessionEffects) -> Option<Refusal> {
        let n = self.len.min(HEAD);
        let mut toks = [Token::Other; HEAD];
        for (t, h) in toks.iter_mut().zip(&self.head[..n]) {
            *t = h.expect("set for every index below len");
        }
        let r = statement(&toks[..n], self, effects).or(self.refusal);
        *self = Scan::default();
        r
    }
}

/// Scans a query text (one or many statements). Records the parameters it may change into
/// `effects`; returns a refusal when `transaction_mode` and the text holds session state.
/// Allocates nothing unless the text changes a parameter.
///
/// `escape_strings`: the session has `standard_conforming_strings` off, so a backslash
/// escapes a quote inside `'…'` and the statements fall elsewhere.
pub fn classify(
    sql: &[u8],
    transaction_mode: bool,
    escape_strings: bool,
    effects: &mut SessionEffects,
) -> Option<Refusal> {
    if plain_statement(sql) && !(escape_strings && memchr::memchr(b'\\', sql).is_some()) {
        return None;
    }
    classify_all(sql, transaction_mode, escape_strings, effects)
}

/// [`classify`] without the shortcut for plain statements.
fn classify_all(
    sql: &[u8],
    transaction_mode: bool,
    escape_strings: bool,
    effects: &mut SessionEffects,
) -> Option<Refusal> {
    let mut lexer = Lexer::new(sql);
    lexer.escape_strings = escape_strings;
    let mut scan = Scan::default();
    let mut refusal = None;
    loop {
        let tok = lexer.next_token();
        match tok {
            Some(Token::Semi) | None => {
                if scan.len > 0 {
                    if let Some(r) = scan.finish(effects) {
                        refusal.get_or_insert(r);
                    }
                }
                if tok.is_none() {
                    break;
                }
            }
            Some(t) => scan.push(t, effects),
        }
    }
    if transaction_mode {
        refusal
    } else {
        None
    }
}

/// First words of the statements that may set or hold session state.
const SESSION_WORDS: [&str; 7] = [
    "set", "reset", "discard", "listen", "prepare", "declare", "create",
];

/// Words whose presence anywhere in a statement may mean a function call that holds or
/// changes session state: the session-level advisory locks (`pg_advisory_lock`,
/// `pg_try_advisory_lock_shared`, …) and `set_config`; each with the index of a byte that
/// is rare in SQL, searched for first.
const SESSION_FUNCTION_WORDS: [(&[u8], usize); 2] = [(b"advisory", 2), (b"set_config", 7)];

/// Whether `text` contains `word` (lower case), ignoring ASCII case as the lexer does: a
/// SIMD search for the word's byte at `key` (either case), then a comparison around each
/// hit. A few hundred instructions for a long query, against 45 per byte to lex it.
fn mentions(text: &[u8], word: &[u8], key: usize) -> bool {
    let k = word[key];
    memchr::memchr2_iter(k, k.to_ascii_uppercase(), text).any(|i| {
        i >= key
            && text
                .get(i - key..i - key + word.len())
                .is_some_and(|w| w.eq_ignore_ascii_case(word))
    })
}

/// One statement whose first word is not one of [`SESSION_WORDS`], and whose function
/// calls, if it has any (a parenthesis), cannot be an advisory lock or `set_config`: it
/// cannot touch session state. Most queries are such; this answers them with searches for
/// a few bytes and one token, instead of lexing the whole text (about 45 instructions per
/// byte: 14,000 for a 630-byte ORM query).
///
/// Why that is enough: everything [`classify_all`] reacts to is either a statement's first
/// word, or a word followed by `(`, and a word the lexer returns is a slice of the text, so
/// a text that does not contain it cannot produce it.
fn plain_statement(sql: &[u8]) -> bool {
    let mut body = sql.trim_ascii_end();
    if let Some(rest) = body.strip_suffix(b";") {
        body = rest;
    }
    // One statement; `calls`: it has a parenthesis.
    let calls = match memchr::memchr2(b'(', b';', body) {
        None => false,
        Some(i) if body[i] == b';' => return false,
        Some(i) if memchr::memchr(b';', &body[i..]).is_some() => return false,
        Some(_) => true,
    };
    let is_session_word = |w: &[u8]| {
        SESSION_WORDS
            .iter()
            .any(|k| w.eq_ignore_ascii_case(k.as_bytes()))
    };
    let first_word_plain = match first_letters(sql) {
        Some(w) => !is_session_word(w),
        None => match (Lexer::new(sql)).next_token() {
            Some(Token::Word(w)) => !is_session_word(w),
            None => true,
            _ => false,
        },
    };
    first_word_plain
        && (!calls
            || !SESSION_FUNCTION_WORDS
                .iter()
                .any(|&(word, key)| mentions(body, word, key)))
}

/// The first word of `sql` when it is plain letters followed by white space (`SELECT abalance
/// …`): the word the lexer would return, found without it. `None` for anything else (a
/// comment, a quote, a parenthesis, a word with digits, `_` or `$`): the lexer decides.
fn first_letters(sql: &[u8]) -> Option<&[u8]> {
    let start = sql.iter().position(|b| !b.is_ascii_whitespace())?;
    let rest = &sql[start..];
    let len = rest.iter().position(|b| !b.is_ascii_alphabetic())?;
    (len > 0 && rest[len].is_ascii_whitespace()).then(|| &rest[..len])
}

/// A query text that drops prepared statements, when it is a single statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deallocate {
    /// `DEALLOCATE [PREPARE] name`
    Name(String),
    /// `DEALLOCATE [PREPARE] ALL`
    All,
    /// `DISCARD ALL`
    DiscardAll,
}

/// Recognises `DEALLOCATE name`, `DEALLOCATE ALL` and `DISCARD ALL` as a whole query text.
pub fn deallocate(sql: &[u8]) -> Option<Deallocate> {
    // Most texts are something else: their first letter tells (this runs for every Query).
    match sql.iter().find(|b| !b.is_ascii_whitespace()) {
        None => return None,
        Some(b) if b.is_ascii_alphabetic() && !b.eq_ignore_ascii_case(&b'd') => return None,
        Some(_) => {}
    }
    // Then one token (a comment may come first).
    let first = Lexer::new(sql).next_token();
    if !is(first.as_ref(), "deallocate") && !is(first.as_ref(), "discard") {
        return None;
    }
    let mut lexer = Lexer::new(sql);
    let mut toks = Vec::with_capacity(4);
    while let Some(t) = lexer.next_token() {
        if t != Token::Semi {
            toks.push(t);
        } else if lexer.next_token().is_some() {
            return None; // more than one statement
        }
        if toks.len() > 3 {
            return None;
        }
    }
    let first = toks.first();
    if is(first, "discard") && is(toks.get(1), "all") && toks.len() == 2 {
        return Some(Deallocate::DiscardAll);
    }
    if !is(first, "deallocate") {
        return None;
    }
    let rest = if is(toks.get(1), "prepare") {
        &toks[2..]
    } else {
        &toks[1..]
    };
    match rest {
        [t] if is(Some(t), "all") => Some(Deallocate::All),
        // Statement names keep their case when quoted.
        [Token::QuotedIdent(w)] => Some(Deallocate::Name(String::from_utf8_lossy(w).into_owned())),
        [t] => name_of(Some(t)).map(Deallocate::Name),
        _ => None,
    }
}

/// Whether PostgreSQL accepts a Parse of `sql` in a failed transaction block: an empty text,
/// or a statement that ends the block (`COMMIT`, `END`, `ROLLBACK [TO …]`, `ABORT`,
/// `PREPARE TRANSACTION`; not `COMMIT PREPARED` or `ROLLBACK PREPARED`). Anything else
/// starting with a keyword is refused there (25P02). A text that starts otherwise is not
/// decided here: true (as if accepted).
pub fn parse_allowed_in_failed_transaction(sql: &[u8]) -> bool {
    let mut lexer = Lexer::new(sql);
    let first = loop {
        match lexer.next_token() {
            Some(Token::Semi) => continue,
            t => break t,
        }
    };
    let Some(Token::Word(w)) = first else {
        return true;
    };
    let word = |kw: &str| w.eq_ignore_ascii_case(kw.as_bytes());
    if word("commit") || word("end") || word("rollback") || word("abort") {
        !is(lexer.next_token().as_ref(), "prepared")
    } else if word("prepare") {
        is(lexer.next_token().as_ref(), "transaction")
    } else {
        false
    }
}

fn name_of(t: Option<&Token>) -> Option<String> {
    match t {
        Some(Token::Word(w)) => Some(String::from_utf8_lossy(w).to_ascii_lowercase()),
        // Parameter names are case-insensitive, even quoted.
        Some(Token::QuotedIdent(w)) => Some(String::from_utf8_lossy(w).to_ascii_lowercase()),
        _ => None,
    }
}

/// A (possibly dotted, as in `myapp.tenant`) parameter name starting at `toks[0]`.
fn param_name(toks: &[Token]) -> Option<String> {
    let mut name = name_of(toks.first())?;
    let mut i = 1;
    while toks.get(i) == Some(&Token::Dot) {
        name.push('.');
        name.push_str(&name_of(toks.get(i + 1))?);
        i += 2;
    }
    Some(name)
}

/// The checks on a statement's first tokens `t`; `scan` says what came later.
fn statement(t: &[Token], scan: &Scan, effects: &mut SessionEffects) -> Option<Refusal> {
    let first = t.first();
    let mut refusal = None;
    if is(first, "set") {
        let mut rest = &t[1..];
        if is(rest.first(), "local") || is(rest.first(), "transaction") {
            return None;
        }
        if is(rest.first(), "session") {
            rest = &rest[1..];
            if is(rest.first(), "authorization") {
                return Some(Refusal::SessionAuthorization);
            }
            if is(rest.first(), "characteristics") {
                for n in [
                    "default_transaction_isolation",
                    "default_transaction_read_only",
                    "default_transaction_deferrable",
                ] {
                    effects.touch(n.to_owned(), false);
                }
                return None;
            }
        }
        special_or_named(rest, scan.len > HEAD, false, effects);
    } else if is(first, "reset") {
        let rest = &t[1..];
        if is(rest.first(), "all") {
            effects.reset_all = true;
        } else if !is(rest.first(), "session") {
            special_or_named(rest, scan.len > HEAD, true, effects);
        }
    } else if is(first, "discard") {
        if is(t.get(1), "all") {
            effects.reset_all = true;
        }
    } else if is(first, "listen") {
        refusal = Some(Refusal::Listen);
    } else if is(first, "prepare") && !is(t.get(1), "transaction") {
        refusal = Some(Refusal::Prepare);
    } else if is(first, "declare") && scan.with_hold {
        refusal = Some(Refusal::HoldCursor);
    } else if is(first, "create") {
        let mut i = 1;
        if is(t.get(i), "or") && is(t.get(i + 1), "replace") {
            i += 2;
        }
        if is(t.get(i), "global") || is(t.get(i), "local") {
            i += 1;
        }
        let temp = is(t.get(i), "temp") || is(t.get(i), "temporary") || scan.pg_temp;
        if temp && !scan.on_commit_drop {
            refusal = Some(Refusal::TempTable);
        }
    }
    refusal
}

/// `SET`/`RESET` targets: the special forms, else a parameter name. `cut`: the statement
/// went on past the tokens kept (`rest` ends there); `reset`: it is a `RESET`.
fn special_or_named(rest: &[Token], cut: bool, reset: bool, effects: &mut SessionEffects) {
    // A name written with escapes, or a dotted name that may go on past the tokens kept:
    // which parameter it is cannot be told.
    let name_tokens = rest.iter().take_while(|t| {
        matches!(
            t,
            Token::Word(_) | Token::QuotedIdent(_) | Token::Dot | Token::Escaped
        )
    });
    if rest.first() == Some(&Token::Escaped)
        || name_tokens.clone().any(|t| *t == Token::Escaped)
        || cut && name_tokens.count() == rest.len()
    {
        effects.unknown = true;
        return;
    }
    let name = if is(rest.first(), "time") && is(rest.get(1), "zone") {
        Some("timezone".to_owned())
    } else if is(rest.first(), "names") {
        Some("client_encoding".to_owned())
    } else if is(rest.first(), "schema") {
        Some("search_path".to_owned())
    } else if is(rest.first(), "xml") && is(rest.get(1), "option") {
        Some("xmloption".to_owned())
    } else {
        param_name(rest)
    };
    if let Some(name) = name {
        effects.touch(name, reset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plain_statement_shortcut_agrees_with_the_full_scan() {
        let texts = [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 5;",
            "UPDATE pgbench_accounts SET abalance = abalance + -12 WHERE aid = 7;",
            "BEGIN;",
            "END;",
            "  select 1  ;  ",
            "SET search_path = x",
            "set_config",
            "SELECT set_config('a.b', 'c', false)",
            "SELECT pg_advisory_lock(1)",
            "LISTEN x",
            "prepare p as select 1",
            "declare c cursor with hold for select 1",
            "create temp table t (a int)",
            "create temporary table t as select 1",
            "reset all",
            "discard all",
            "select 1; set x.y = 2",
            "/* set */ select 1",
            "-- set\nselect 1",
            "select 'set x = 1'",
            "\"set\" x",
            "",
            ";",
            // Function calls: only advisory locks and set_config matter.
            "SELECT count(*) FROM t WHERE a IN (1, 2)",
            "INSERT INTO h (tid, bid) VALUES (1, 2);",
            "select PG_ADVISORY_LOCK(1)",
            "select pg_try_advisory_lock_shared (7)",
            "select x from pg_advisory_lock(1)",
            "SELECT Set_Config('a.b', 'c', false)",
            "select coalesce(set_config('app.user', '7', false), '')",
            "select f(1) -- pg_advisory_lock(2)",
            "select 'pg_advisory_lock(' || x from t",
            "select (1); select pg_advisory_lock(1)",
            "select f('a;b')",
            "with x as (select 1) select * from x",
            "create temp table t (a int) on commit drop",
            "declare c cursor with hold for select f(1)",
            "SET LOCAL statement_timeout = (5)",
        ];
        for t in texts {
            let (mut a, mut b) = (SessionEffects::default(), SessionEffects::default());
            let fast = classify(t.as_bytes(), true, false, &mut a);
            let full = classify_all(t.as_bytes(), true, false, &mut b);
            assert_eq!((fast, a), (full, b), "{t:?}");
        }
    }

    /// Texts that hide a session change from a lexer that splits them otherwise than
    /// PostgreSQL: what each must be found to do (a parameter touched, a refusal, or
    /// "unknown" for a name it cannot read).
    #[test]
    fn texts_split_as_postgresql_splits_them() {
        #[derive(Debug, PartialEq)]
        enum Want {
            Touches(&'static str),
            Refused(Refusal),
            Unknown,
        }
        use Want::*;
        let cases: &[(&str, bool, Want)] = &[
            // A comment ends at \r too.
            (
                "--x\rSET search_path TO evil",
                false,
                Touches("search_path"),
            ),
            (
                "SELECT 1 --\r, pg_advisory_lock(1)",
                false,
                Refused(Refusal::AdvisoryLock),
            ),
            // The vertical tab is white space.
            ("SET\x0bsearch_path = evil", false, Touches("search_path")),
            (
                "CREATE\x0bTEMP TABLE t (a int)",
                false,
                Refused(Refusal::TempTable),
            ),
            // An E string continued on the next line keeps its escapes.
            (
                "SELECT E'x'\n'\\'' ; SET search_path = evil; -- '",
                false,
                Touches("search_path"),
            ),
            // standard_conforming_strings off: a backslash escapes the quote.
            (
                "SELECT '\\'' ; SET search_path = evil; -- '",
                true,
                Touches("search_path"),
            ),
            // Quoted function names are the function when spelled in lower case.
            (
                "SELECT \"set_config\"('search_path', 'evil', false)",
                false,
                Touches("search_path"),
            ),
            (
                "SELECT \"pg_advisory_lock\"(1)",
                false,
                Refused(Refusal::AdvisoryLock),
            ),
            (
                "SELECT pg_catalog.pg_advisory_lock /* c */ (1)",
                false,
                Refused(Refusal::AdvisoryLock),
            ),
            // Names written with escapes cannot be read: the server is not reused.
            ("SET U&\"search\\005fpath\" = evil", false, Unknown),
            (
                "SELECT set_config(E'search\\137path', 'x', false)",
                false,
                Unknown,
            ),
            (
                "SELECT set_config(U&'search_path', 'x', false)",
                false,
                Unknown,
            ),
            // Temporary objects made other than by CREATE TEMP.
            (
                "CREATE TABLE pg_temp.t (a int)",
                false,
                Refused(Refusal::TempTable),
            ),
            (
                "CREATE VIEW pg_temp.accounts AS SELECT 1",
                false,
                Refused(Refusal::TempTable),
            ),
        ];
        for (text, escapes, want) in cases {
            let mut effects = SessionEffects::default();
            let refusal = classify(text.as_bytes(), true, *escapes, &mut effects);
            let got = match (refusal, effects.unknown, effects.touched.first()) {
                (Some(r), _, _) => Refused(r),
                (None, true, _) => Unknown,
                (None, false, Some(n)) if n == "search_path" => Touches("search_path"),
                other => panic!("{text:?}: {other:?}"),
            };
            assert_eq!(&got, want, "{text:?}");
        }
        // And what must stay plain.
        for text in [
            "SELECT temp FROM readings WHERE temperature > 3",
            // Not seen (docs: Limitations): the statement's first word decides.
            "SELECT * INTO TEMP t FROM x",
            "SELECT '\\'' , 1",
            "SELECT E'a\\'b', 'c'",
            "SELECT \"PG_ADVISORY_LOCK\"(1)",
        ] {
            let mut effects = SessionEffects::default();
            assert_eq!(
                classify(text.as_bytes(), true, false, &mut effects),
                None,
                "{text:?}"
            );
            assert!(effects.is_empty(), "{text:?}: {effects:?}");
        }
    }

    /// `reset` holds the names whose last change was `RESET name`.
    #[test]
    fn the_last_change_tells_a_reset() {
        for (text, reset) in [
            ("RESET timezone", &["timezone"][..]),
            ("SET timezone = 'UTC'; RESET timezone", &["timezone"]),
            ("RESET timezone; SET timezone = 'UTC'", &[]),
            ("RESET app.x; SELECT set_config('app.x', '1', false)", &[]),
            ("RESET ALL", &[]),
            ("RESET role", &["role"]),
        ] {
            let mut effects = SessionEffects::default();
            classify(text.as_bytes(), true, false, &mut effects);
            assert_eq!(effects.reset, reset, "{text:?}");
        }
    }

    /// Past MAX_TOUCHED parameters in one transaction the server's state is unknown.
    #[test]
    fn many_parameters_make_the_state_unknown() {
        let text: String = (0..MAX_TOUCHED + 10)
            .map(|i| format!("SET app.p{i} = 1;"))
            .collect();
        let mut effects = SessionEffects::default();
        assert_eq!(classify(text.as_bytes(), true, false, &mut effects), None);
        assert!(effects.unknown);
        assert_eq!(effects.touched.len(), MAX_TOUCHED);
    }

    #[test]
    fn mentions_ignores_case_and_bounds() {
        for (text, word, key, want) in [
            ("select pg_advisory_lock(1)", "advisory", 2, true),
            ("ADVISORY", "advisory", 2, true),
            ("xAdViSoRy", "advisory", 2, true),
            ("vadvisor", "advisory", 2, false),
            ("advisor", "advisory", 2, false),
            ("v", "advisory", 2, false),
            ("select set_CONFIG('a', 'b', false)", "set_config", 7, true),
            ("from filler offset", "set_config", 7, false),
            ("set_conFig", "set_config", 7, true),
            ("et_config", "set_config", 7, false),
        ] {
            assert_eq!(
                mentions(text.as_bytes(), word.as_bytes(), key),
                want,
                "{text:?} {word:?}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn the_shortcut_never_hides_session_state(t in "[a-zA-Z_ ;().,'=0-9-]{0,60}") {
            let (mut a, mut b) = (SessionEffects::default(), SessionEffects::default());
            let fast = classify(t.as_bytes(), true, false, &mut a);
            let full = classify_all(t.as_bytes(), true, false, &mut b);
            proptest::prop_assert_eq!((fast, a), (full, b));
        }

        /// Texts made of the words the scan reacts to, in any case, with calls, strings,
        /// comments and separators between them.
        #[test]
        fn the_shortcut_agrees_on_session_words(parts in proptest::collection::vec(
            proptest::sample::select(vec![
                "select", "SELECT", "set", "Set", "reset", "set_config", "SET_CONFIG",
                "pg_advisory_lock", "PG_TRY_ADVISORY_LOCK_SHARED", "pg_advisory_xact_lock",
                "listen", "prepare", "declare", "create", "temp", "with", "hold", "on",
                "commit", "drop", "all", "x", "'a'", "'set_config('", "(", ")", "(1)", ",",
                ";", " ", "\n", "--c\n", "/* pg_advisory_lock( */", "\"set\"", "=", "1",
            ]),
            0..14,
        )) {
            let t = parts.concat();
            let (mut a, mut b) = (SessionEffects::default(), SessionEffects::default());
            let fast = classify(t.as_bytes(), true, false, &mut a);
            let full = classify_all(t.as_bytes(), true, false, &mut b);
            proptest::prop_assert_eq!((fast, a), (full, b), "{:?}", t);
        }
    }

    #[test]
    fn first_letters_is_a_plain_first_word_or_nothing() {
        for (text, want) in [
            ("SELECT 1", Some("SELECT")),
            (" \n\tset x = 1", Some("set")),
            ("select\n1", Some("select")),
            ("set", None),
            ("set;", None),
            ("set(", None),
            ("select1 ", None),
            ("set_config ", None),
            ("/* c */ set x", None),
            ("-- c\nset x", None),
            ("\"set\" x", None),
            ("", None),
            ("   ", None),
        ] {
            assert_eq!(
                first_letters(text.as_bytes()),
                want.map(str::as_bytes),
                "{text:?}"
            );
        }
    }

    proptest::proptest! {
        /// Where the shortcut finds a first word, it is the lexer's first token.
        #[test]
        fn first_letters_agrees_with_the_lexer(t in "[a-zA-Z_ \t\n;()'\"$0-9/*-]{0,20}") {
            if let Some(w) = first_letters(t.as_bytes()) {
                let tok = (Lexer::new(t.as_bytes())).next_token();
                proptest::prop_assert!(matches!(tok, Some(Token::Word(x)) if x == w), "{:?}", t);
            }
        }
    }

    fn run(sql: &str) -> (Option<Refusal>, SessionEffects) {
        let mut e = SessionEffects::default();
        let r = classify(sql.as_bytes(), true, false, &mut e);
        (r, e)
    }

    #[test]
    fn plain_queries_do_nothing() {
        for q in [
            "SELECT 1",
            "select abalance from pgbench_accounts where aid = 5;",
            "BEGIN; UPDATE t SET a = 1; COMMIT",
            "",
        ] {
            assert_eq!(run(q), (None, SessionEffects::default()), "{q}");
        }
    }

    #[test]
    fn set_forms() {
        assert_eq!(run("SET TimeZone = 'UTC'").1.touched, vec!["timezone"]);
        assert_eq!(
            run("set session statement_timeout to 5000").1.touched,
            vec!["statement_timeout"]
        );
        assert_eq!(
            run("SET TIME ZONE 'Europe/Paris'").1.touched,
            vec!["timezone"]
        );
        assert_eq!(run("SET NAMES 'LATIN1'").1.touched, vec!["client_encoding"]);
        assert_eq!(
            run("SET myapp.tenant = '7'").1.touched,
            vec!["myapp.tenant"]
        );
        assert_eq!(run("SET \"DateStyle\" TO ISO").1.touched, vec!["datestyle"]);
        assert!(run("SET LOCAL timezone = 'UTC'").1.is_empty());
        assert!(run("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
            .1
            .is_empty());
        assert_eq!(run("RESET search_path").1.touched, vec!["search_path"]);
        assert!(run("RESET ALL").1.reset_all);
        assert!(run("DISCARD ALL").1.reset_all);
        assert_eq!(
            run("SELECT set_config('search_path', 'x', false)")
                .1
                .touched,
            vec!["search_path"]
        );
        assert_eq!(
            run("SELECT 1; SET work_mem = '1MB'; SET work_mem = '2MB'")
                .1
                .touched,
            vec!["work_mem"]
        );
    }

    #[test]
    fn refusals() {
        assert_eq!(run("LISTEN jobs").0, Some(Refusal::Listen));
        assert_eq!(run("select 1; listen jobs").0, Some(Refusal::Listen));
        assert_eq!(run("PREPARE p AS SELECT 1").0, Some(Refusal::Prepare));
        assert_eq!(run("PREPARE TRANSACTION 'x'").0, None);
        assert_eq!(
            run("DECLARE c CURSOR WITH HOLD FOR SELECT 1").0,
            Some(Refusal::HoldCursor)
        );
        assert_eq!(run("DECLARE c CURSOR FOR SELECT 1").0, None);
        assert_eq!(
            run("CREATE TEMP TABLE t (a int)").0,
            Some(Refusal::TempTable)
        );
        assert_eq!(
            run("create global temporary table t (a int)").0,
            Some(Refusal::TempTable)
        );
        assert_eq!(run("CREATE TEMP TABLE t (a int) ON COMMIT DROP").0, None);
        assert_eq!(run("CREATE TABLE temp (a int)").0, None);
        assert_eq!(
            run("SELECT pg_advisory_lock(1)").0,
            Some(Refusal::AdvisoryLock)
        );
        assert_eq!(
            run("SELECT pg_catalog.pg_try_advisory_lock_shared(1, 2)").0,
            Some(Refusal::AdvisoryLock)
        );
        assert_eq!(run("SELECT pg_advisory_xact_lock(1)").0, None);
        assert_eq!(
            run("SET SESSION AUTHORIZATION bob").0,
            Some(Refusal::SessionAuthorization)
        );
        let mut e = SessionEffects::default();
        assert_eq!(
            classify(b"LISTEN x", false, false, &mut e),
            None,
            "session mode refuses nothing"
        );
    }

    #[test]
    fn strings_and_comments_hide_keywords() {
        for q in [
            "SELECT 'LISTEN x'",
            "SELECT 1 -- ; LISTEN x",
            "SELECT /* ; LISTEN /* nested */ x */ 1",
            "SELECT $$; LISTEN x$$",
            "SELECT $tag$ ; listen x $tag$",
            "SELECT E'\\'; LISTEN x'",
            "SELECT \"pg_advisory_lock\"",
            "SELECT 'pg_advisory_lock('",
        ] {
            assert_eq!(run(q).0, None, "{q}");
        }
        assert_eq!(run("SELECT $1; LISTEN x").0, Some(Refusal::Listen));
    }

    /// PostgreSQL's IsTransactionExitStmt, and the empty text, which it also parses in a
    /// failed block.
    #[test]
    fn parses_allowed_in_a_failed_transaction() {
        for ok in [
            "ROLLBACK",
            "rollback to savepoint s",
            "ROLLBACK AND CHAIN",
            "/* c */ COMMIT",
            "commit work",
            "END",
            "abort",
            "PREPARE TRANSACTION 'x'",
            "",
            " ; ",
            "(SELECT 1)",
        ] {
            assert!(parse_allowed_in_failed_transaction(ok.as_bytes()), "{ok}");
        }
        for refused in [
            "SELECT 1",
            "COMMIT PREPARED 'x'",
            "ROLLBACK PREPARED 'x'",
            "PREPARE p AS SELECT 1",
            "savepoint s",
            "BEGIN",
            "-- c\nINSERT INTO t VALUES (1)",
        ] {
            assert!(
                !parse_allowed_in_failed_transaction(refused.as_bytes()),
                "{refused}"
            );
        }
    }

    #[test]
    fn deallocate_forms() {
        assert_eq!(
            deallocate(b"DEALLOCATE s1"),
            Some(Deallocate::Name("s1".into()))
        );
        assert_eq!(
            deallocate(b"deallocate prepare \"S1\";"),
            Some(Deallocate::Name("S1".into()))
        );
        assert_eq!(deallocate(b"DEALLOCATE ALL"), Some(Deallocate::All));
        assert_eq!(deallocate(b"discard all"), Some(Deallocate::DiscardAll));
        assert_eq!(deallocate(b"DEALLOCATE s1; SELECT 1"), None);
        assert_eq!(deallocate(b"SELECT 1"), None);
        assert_eq!(deallocate(b"DISCARD PLANS"), None);
        // The first-letter shortcut: whitespace and comments before the word.
        assert_eq!(deallocate(b" \n\tDEALLOCATE ALL"), Some(Deallocate::All));
        assert_eq!(
            deallocate(b"/* c */ discard all"),
            Some(Deallocate::DiscardAll)
        );
        assert_eq!(
            deallocate(b"-- x\nDeallocate s2"),
            Some(Deallocate::Name("s2".into()))
        );
        assert_eq!(deallocate(b""), None);
        assert_eq!(deallocate(b"   "), None);
        assert_eq!(deallocate(b"DELETE FROM t"), None);
        assert_eq!(deallocate(b"_deallocate all"), None);
    }

    #[test]
    fn garbage_never_panics() {
        for q in [
            "'",
            "\"",
            "$",
            "$a",
            "/*",
            "--",
            "E'\\",
            "$a$ unterminated",
            "set",
            "set a.",
            "reset",
            "(((",
            "\u{ff}",
        ] {
            run(q);
        }
    }
}
