//! The admin console: the virtual databases `pgbouncer` and `pgsluice`, for the users in
//! `admin_users`. It speaks the simple query protocol and answers PgBouncer's commands with
//! PgBouncer's column names and order (1.25), so that exporters and dashboards written for
//! PgBouncer work unchanged; see `docs/admin-console.md`.
//!
//! [`Console`] also holds the shutdown state the commands change; paused databases are kept
//! by the pools (`pool/pause.rs`), which hand out no server for them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::{BufMut, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::sync::Notify;

use crate::app::Shared;
use crate::clients::ClientState;
use crate::config::{Config, PoolMode};
use crate::metrics::{clients_by_pool, ClientCounts, ServerCounts};
use crate::pool::pause::PauseError;
use crate::protocol::messages::{self, ErrorFields, Severity};
use crate::protocol::{frame, frontend, TransactionStatus};

/// The names of the admin console's virtual databases.
pub const CONSOLE_DATABASES: [&str; 2] = ["pgbouncer", "pgsluice"];

/// The PgBouncer release whose admin output this console matches.
pub const PGBOUNCER_COMPAT: &str = "1.25.0";

/// Longest admin command accepted.
const MAX_COMMAND: usize = 64 * 1024;

pub fn is_console(database: &str) -> bool {
    CONSOLE_DATABASES.contains(&database)
}

/// State changed by admin commands.
#[derive(Debug, Default)]
pub struct Console {
    draining: AtomicBool,
    shutdown: AtomicBool,
    shutdown_now: Notify,
    /// The highest `total_query_time` SHOW STATS reported per database. It is a
    /// difference of two sums a finishing transaction adds to one after the other, so a
    /// read between them could dip; exporters read the column as a counter, and a dip
    /// would look like a reset.
    query_time_shown: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

impl Console {
    /// No new clients; `/readyz` says not ready. Set by `SHUTDOWN WAIT_FOR_CLIENTS`.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Asks [`crate::app::run`] to stop.
    pub fn request_shutdown(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.shutdown.store(true, Ordering::SeqCst);
        self.shutdown_now.notify_waiters();
    }

    /// Completes when a shutdown was requested.
    pub async fn shutdown_requested(&self) {
        loop {
            let n = self.shutdown_now.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.shutdown.load(Ordering::SeqCst) {
                return;
            }
            n.await;
        }
    }
}

/// A result set being built: RowDescription, DataRows, CommandComplete.
struct Table {
    buf: BytesMut,
    columns: usize,
    rows: usize,
}

/// Column types (OIDs) the console uses.
#[derive(Clone, Copy)]
enum Ty {
    Text,
    Int,
    Float,
}

impl Ty {
    fn oid_len(self) -> (i32, i16) {
        match self {
            Ty::Text => (25, -1),
            Ty::Int => (20, 8),
            Ty::Float => (701, 8),
        }
    }
}

/// A cell value.
enum V {
    S(String),
    I(i64),
    F(f64),
    Null,
}

impl From<&str> for V {
    fn from(s: &str) -> V {
        V::S(s.to_owned())
    }
}
impl From<String> for V {
    fn from(s: String) -> V {
        V::S(s)
    }
}
impl From<i64> for V {
    fn from(n: i64) -> V {
        V::I(n)
    }
}
impl From<u32> for V {
    fn from(n: u32) -> V {
        V::I(n as i64)
    }
}
impl From<u64> for V {
    fn from(n: u64) -> V {
        V::I(n.min(i64::MAX as u64) as i64)
    }
}
impl From<usize> for V {
    fn from(n: usize) -> V {
        V::I(n as i64)
    }
}
impl From<f64> for V {
    fn from(n: f64) -> V {
        V::F(n)
    }
}
impl<T: Into<V>> From<Option<T>> for V {
    fn from(o: Option<T>) -> V {
        o.map(Into::into).unwrap_or(V::Null)
    }
}

impl Table {
    fn new(columns: &[(&str, Ty)]) -> Table {
        let mut buf = BytesMut::new();
        buf.put_u8(b'T');
        let at = buf.len();
        buf.put_i32(0);
        buf.put_i16(columns.len() as i16);
        for (name, ty) in columns {
            let (oid, len) = ty.oid_len();
            buf.put_slice(name.as_bytes());
            buf.put_u8(0);
            buf.put_i32(0);
            buf.put_i16(0);
            buf.put_i32(oid);
            buf.put_i16(len);
            buf.put_i32(-1);
            buf.put_i16(0);
        }
        let n = (buf.len() - at) as i32;
        buf[at..at + 4].copy_from_slice(&n.to_be_bytes());
        Table {
            buf,
            columns: columns.len(),
            rows: 0,
        }
    }

    fn row(&mut self, values: Vec<V>) {
        debug_assert_eq!(values.len(), self.columns);
        let buf = &mut self.buf;
        buf.put_u8(b'D');
        let at = buf.len();
        buf.put_i32(0);
        buf.put_i16(values.len() as i16);
        for v in values {
            let text = match v {
                V::S(s) => s,
                V::I(n) => n.to_string(),
                V::F(f) => format!("{f}"),
                V::Null => {
                    buf.put_i32(-1);
                    continue;
                }
            };
            buf.put_i32(text.len() as i32);
            buf.put_slice(text.as_bytes());
        }
        let n = (buf.len() - at) as i32;
        buf[at..at + 4].copy_from_slice(&n.to_be_bytes());
        self.rows += 1;
    }

    fn finish(mut self, tag: &str) -> BytesMut {
        command_complete(&mut self.buf, tag);
        self.buf
    }
}

fn command_complete(buf: &mut BytesMut, tag: &str) {
    buf.put_u8(b'C');
    buf.put_i32((tag.len() + 5) as i32);
    buf.put_slice(tag.as_bytes());
    buf.put_u8(0);
}

/// `YYYY-MM-DD HH:MM:SS UTC`, as PgBouncer shows times.
pub fn format_time(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// An object address as PgBouncer's `ptr` and `link` columns show it: clients and servers
/// get distinct ranges so that a client's `link` matches its server's `ptr`.
pub fn client_ptr(id: u64) -> String {
    format!("{:#x}", 0x7c00_0000_0000u64 + id)
}

pub fn server_ptr(id: u64) -> String {
    format!("{:#x}", 0x5e00_0000_0000u64 + id)
}

fn pool_mode_str(m: PoolMode) -> &'static str {
    match m {
        PoolMode::Transaction => "transaction",
        PoolMode::Session => "session",
    }
}

fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{}", s as u64)
    } else {
        format!("{s}")
    }
}

/// A failed command: ERROR, then the console carries on.
fn error(code: &str, msg: impl Into<String>) -> ErrorFields {
    ErrorFields::new(Severity::Error, code, msg)
}

/// Serves an admin console session after login; the caller checked the user.
pub async fn session(
    mut stream: crate::stream::Stream,
    hello: BytesMut,
    leftover: BytesMut,
    shared: &Arc<Shared>,
    cancel: crate::cancel::CancelHandle,
) -> Result<(), String> {
    let (pid, secret) = (cancel.client.pid, cancel.client.secret);
    // `hello`: what login still owes the client (SASLFinal); `leftover`: what the client
    // sent after its login, read first.
    let mut out = hello;
    messages::auth_ok(&mut out);
    for (name, value) in [
        ("application_name", ""),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO"),
        ("integer_datetimes", "on"),
        ("server_encoding", "UTF8"),
        (
            "server_version",
            concat!(env!("CARGO_PKG_VERSION"), "/pgsluice"),
        ),
        ("standard_conforming_strings", "on"),
        ("TimeZone", "UTC"),
    ] {
        messages::parameter_status(&mut out, name, value);
    }
    messages::backend_key_data(&mut out, pid, secret);
    messages::ready_for_query(&mut out, TransactionStatus::Idle);
    stream.send(&out).await.map_err(|e| e.to_string())?;
    let mut buf = leftover;
    buf.reserve(1024);
    // In the extended protocol, everything up to Sync is answered by one error.
    let mut skipping = false;
    loop {
        let Some((tag, total)) = frame::header(&buf, MAX_COMMAND).map_err(|e| e.to_string())?
        else {
            if !read_more(&mut stream, &mut buf, shared).await? {
                return Ok(());
            }
            continue;
        };
        if buf.len() < total {
            buf.reserve(total - buf.len());
            if !read_more(&mut stream, &mut buf, shared).await? {
                return Ok(());
            }
            continue;
        }
        let msg = buf.split_to(total);
        let body = &msg[frame::HEADER_LEN..];
        let mut out = BytesMut::new();
        match tag {
            frontend::TERMINATE => return Ok(()),
            frontend::QUERY => {
                let sql = String::from_utf8_lossy(body.strip_suffix(&[0]).unwrap_or(body));
                let run = command(shared, sql.trim());
                match interruptible(run, &mut stream, &mut buf, shared, &cancel).await {
                    Interrupted::No(Ok(reply)) => out.extend_from_slice(&reply),
                    Interrupted::No(Err(e)) => e.encode(&mut out),
                    Interrupted::Cancelled => {
                        error("57014", "canceling statement due to user request").encode(&mut out)
                    }
                    Interrupted::Left => return Ok(()),
                    Interrupted::Draining => {
                        shutting_down(&mut stream).await;
                        return Ok(());
                    }
                }
                messages::ready_for_query(&mut out, TransactionStatus::Idle);
            }
            frontend::SYNC => {
                skipping = false;
                messages::ready_for_query(&mut out, TransactionStatus::Idle);
            }
            frontend::FLUSH => {}
            _ if skipping => {}
            frontend::PARSE
            | frontend::BIND
            | frontend::DESCRIBE
            | frontend::EXECUTE
            | frontend::CLOSE => {
                skipping = true;
                error(
                    "0A000",
                    "the admin console supports only the simple query protocol",
                )
                .with_hint("use psql, or a driver's simple query mode")
                .encode(&mut out);
            }
            other => {
                let e = ErrorFields::new(
                    Severity::Fatal,
                    "08P01",
                    format!(
                        "invalid frontend message type {other} ({:?}) on the admin console",
                        other as char
                    ),
                );
                e.encode(&mut out);
                let _ = stream.send(&out).await;
                return Err(e.message);
            }
        }
        if !out.is_empty() {
            stream.send(&out).await.map_err(|e| e.to_string())?;
        }
        if buf.capacity() > 64 * 1024 && buf.is_empty() {
            buf = BytesMut::with_capacity(1024);
        }
    }
}

/// Reads more of a console session's input; false when the client left, or when pgsluice
/// began to shut down (SIGTERM, `SHUTDOWN`): as PgBouncer, the console closes then, after
/// the command it was running, so an open console (an exporter's, an operator's psql) does
/// not hold the shutdown until `shutdown_timeout`.
async fn read_more(
    stream: &mut crate::stream::Stream,
    buf: &mut BytesMut,
    shared: &Shared,
) -> Result<bool, String> {
    tokio::select! {
        r = stream.read_buf(buf) => Ok(r.map_err(|e| e.to_string())? > 0),
        _ = shared.stop.drain.cancelled() => {
            shutting_down(stream).await;
            Ok(false)
        }
    }
}

/// Tells a console client that pgsluice shuts down (57P01), if it takes it within a second.
async fn shutting_down(stream: &mut crate::stream::Stream) {
    let mut out = BytesMut::new();
    ErrorFields::new(
        Severity::Fatal,
        "57P01",
        "terminating connection because pgsluice is shutting down",
    )
    .encode(&mut out);
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.send(&out)).await;
}

/// Whether the whole messages in `buf` include a Terminate (a driver that gives up on a
/// command sends one before it closes).
fn terminates(buf: &[u8]) -> bool {
    let mut at = 0;
    while let Ok(Some((tag, total))) = frame::header(&buf[at..], MAX_COMMAND) {
        if tag == frontend::TERMINATE {
            return true;
        }
        at += total;
        if at >= buf.len() {
            break;
        }
    }
    false
}

/// How a console command that may wait (PAUSE, WAIT_CLOSE) ended.
enum Interrupted<T> {
    /// It ran to its answer.
    No(T),
    /// A cancel request for this console session (psql's Ctrl-C, a driver's timeout).
    Cancelled,
    /// The client closed the connection.
    Left,
    /// pgsluice began to shut down.
    Draining,
}

/// Runs `run` while watching what should stop it: a cancel request, the client leaving (what
/// it sends meanwhile is kept in `buf`, up to `MAX_COMMAND`), and the drain. A stopped
/// command is dropped: a PAUSE still waiting takes its pause back (see [`pause`]).
async fn interruptible<T>(
    run: impl std::future::Future<Output = T>,
    stream: &mut crate::stream::Stream,
    buf: &mut BytesMut,
    shared: &Shared,
    cancel: &crate::cancel::CancelHandle,
) -> Interrupted<T> {
    tokio::pin!(run);
    let cancelled = cancel.cancelled_while_queued();
    tokio::pin!(cancelled);
    let outcome = loop {
        let room = buf.len() < MAX_COMMAND;
        tokio::select! {
            biased;
            r = &mut run => break Interrupted::No(r),
            _ = &mut cancelled => break Interrupted::Cancelled,
            _ = shared.stop.drain.cancelled() => break Interrupted::Draining,
            r = stream.read_buf(buf), if room => {
                if !matches!(r, Ok(n) if n > 0) || terminates(buf) {
                    break Interrupted::Left;
                }
            }
        }
    };
    // Later cancels find the session idle.
    cancel.idle();
    outcome
}

/// A console command as read from its text, before it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
    /// An empty query (EmptyQueryResponse).
    Empty,
    /// `SHOW what` (`what` in lower case).
    Show(String),
    Pause(Option<&'a str>),
    Resume(Option<&'a str>),
    Reconnect(Option<&'a str>),
    WaitClose(Option<&'a str>),
    Shutdown,
    ShutdownWaitForClients,
    Reload,
    /// `SET key ...` (`key` in lower case).
    Set(String),
}

/// Reads a console command (the text of a simple Query). Commands that are not supported
/// are errors here, before anything runs.
pub fn parse_command(sql: &str) -> Result<Command<'_>, ErrorFields> {
    let text = sql.trim_end_matches(|c: char| c == ';' || c.is_whitespace());
    let words: Vec<&str> = text.split_whitespace().collect();
    let lower: Vec<String> = words.iter().map(|w| w.to_ascii_lowercase()).collect();
    let arg = |i: usize| words.get(i).map(|w| w.trim_matches('"'));
    let invalid = || error("42601", format!("invalid command '{sql}', use SHOW HELP;"));
    Ok(match lower.first().map(String::as_str) {
        None => Command::Empty,
        Some("show") if words.len() == 2 => Command::Show(lower[1].clone()),
        Some("show") => return Err(invalid()),
        Some("pause") if words.len() <= 2 => Command::Pause(arg(1)),
        Some("resume") if words.len() <= 2 => Command::Resume(arg(1)),
        Some("reconnect") if words.len() <= 2 => Command::Reconnect(arg(1)),
        Some("wait_close") if words.len() <= 2 => Command::WaitClose(arg(1)),
        Some("shutdown") if words.len() == 1 => Command::Shutdown,
        Some("shutdown") if words.len() == 2 && lower[1] == "wait_for_clients" => {
            Command::ShutdownWaitForClients
        }
        Some("shutdown") if words.len() == 2 && lower[1] == "wait_for_servers" => {
            return Err(
                error("0A000", "SHUTDOWN WAIT_FOR_SERVERS is not supported yet")
                    .with_hint("use SHUTDOWN WAIT_FOR_CLIENTS, or PAUSE then SHUTDOWN"),
            )
        }
        Some("reload") if words.len() == 1 => Command::Reload,
        Some("set") => {
            let rest = text.trim_start()[3..].trim();
            Command::Set(
                rest.split(|c: char| c == '=' || c.is_whitespace())
                    .next()
                    .unwrap_or("")
                    .to_ascii_lowercase(),
            )
        }
        Some("disable" | "enable" | "kill" | "kill_client" | "suspend") => {
            return Err(error(
                "0A000",
                format!(
                    "{} is not supported by pgsluice",
                    words[0].to_ascii_uppercase()
                ),
            ))
        }
        _ => return Err(invalid()),
    })
}

/// Runs one console command; the reply without ReadyForQuery.
async fn command(shared: &Arc<Shared>, sql: &str) -> Result<BytesMut, ErrorFields> {
    match parse_command(sql)? {
        Command::Empty => {
            let mut out = BytesMut::new();
            // An empty query: EmptyQueryResponse.
            out.put_u8(b'I');
            out.put_i32(4);
            Ok(out)
        }
        Command::Show(what) => show(shared, &what),
        Command::Pause(db) => pause(shared, db).await,
        Command::Resume(db) => resume(shared, db),
        Command::Reconnect(db) => reconnect(shared, db),
        Command::WaitClose(db) => wait_close(shared, db).await,
        Command::Shutdown => {
            tracing::info!("SHUTDOWN command issued");
            shared.console.request_shutdown();
            let mut out = BytesMut::new();
            command_complete(&mut out, "SHUTDOWN");
            Ok(out)
        }
        Command::ShutdownWaitForClients => {
            tracing::info!("SHUTDOWN WAIT_FOR_CLIENTS command issued");
            shared.console.begin_drain();
            let s = shared.clone();
            tokio::spawn(async move {
                s.clients.wait_until_empty().await;
                s.console.request_shutdown();
            });
            let mut out = BytesMut::new();
            command_complete(&mut out, "SHUTDOWN");
            Ok(out)
        }
        Command::Reload => match crate::reload::reload(shared) {
            Ok(()) => {
                let mut out = BytesMut::new();
                command_complete(&mut out, "RELOAD");
                Ok(out)
            }
            // PgBouncer's SQLSTATE for a failed RELOAD.
            Err(e) => Err(error(
                "F0000",
                format!("RELOAD refused, the old configuration stays: {e}"),
            )),
        },
        Command::Set(key) => set(&key),
    }
}

/// Settings some drivers SET or SHOW at connect; PgBouncer fakes them, so do we.
const FAKE_PARAMETERS: [(&str, &str); 6] = [
    ("client_encoding", "UTF-8"),
    ("default_transaction_isolation", "read committed"),
    ("standard_conforming_strings", "on"),
    ("datestyle", "ISO"),
    ("timezone", "GMT"),
    ("extra_float_digits", "2"),
];

fn set(key: &str) -> Result<BytesMut, ErrorFields> {
    if FAKE_PARAMETERS.iter().any(|(k, _)| *k == key) {
        let mut out = BytesMut::new();
        ErrorFields {
            severity: "NOTICE".into(),
            code: "00000".into(),
            message: "SET ignored".into(),
            detail: None,
            hint: None,
        }
        .encode_notice(&mut out);
        command_complete(&mut out, "SET");
        return Ok(out);
    }
    Err(error(
        "0A000",
        "SET is not supported by pgsluice: settings come from the configuration file",
    ))
}

async fn pause(shared: &Arc<Shared>, db: Option<&str>) -> Result<BytesMut, ErrorFields> {
    if let Some(d) = db {
        if is_console(d) {
            return Err(error("55000", format!("cannot pause admin db: {d}")));
        }
        if !shared.pools.config().databases.contains_key(d) {
            return Err(error("3D000", format!("no such database: {d}")));
        }
    }
    let Ok(paused_now) = shared.pools.pause(db) else {
        return Err(error("55000", "already suspended/paused"));
    };
    tracing::info!(database = db.unwrap_or("(all)"), "PAUSE command issued");
    // A PAUSE cancelled, or whose client leaves, before it answers takes its pause back (a
    // script's timeout around PAUSE must not leave the databases paused); once answered,
    // the pause holds until RESUME.
    let mut withdraw = PauseWithdrawal {
        shared,
        db,
        token: paused_now,
    };
    // Like PgBouncer, answer once every server of the paused databases is released. The
    // pools hand out none from now on, so none is lent after this answer.
    while shared.pools.busy(db) {
        if !shared.pools.is_paused(db) {
            // A RESUME took it back; a later PAUSE's pause is not this one's to withdraw.
            withdraw.token = None;
            return Err(error("55000", "resumed before every server was released"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Some(token) = withdraw.token.take() {
        shared.pools.pause_answered(db, token);
    }
    let mut out = BytesMut::new();
    command_complete(&mut out, "PAUSE");
    Ok(out)
}

/// Takes back the pause of a PAUSE dropped before it answered (see [`interruptible`]).
struct PauseWithdrawal<'a> {
    shared: &'a Shared,
    db: Option<&'a str>,
    /// What [`crate::pool::Pools::pause`] returned, while the pause is to be taken back.
    token: Option<u64>,
}

impl Drop for PauseWithdrawal<'_> {
    fn drop(&mut self) {
        let Some(token) = self.token else {
            return;
        };
        if self.shared.pools.withdraw_pause(self.db, token) {
            tracing::info!(
                database = self.db.unwrap_or("(all)"),
                "PAUSE withdrawn before it answered"
            );
        }
    }
}

/// `db` names a configured database (or is `None`: all of them).
fn known_database(shared: &Shared, db: Option<&str>, verb: &str) -> Result<(), ErrorFields> {
    match db {
        Some(d) if is_console(d) => Err(error("55000", format!("cannot {verb} admin db: {d}"))),
        Some(d) if !shared.pools.config().databases.contains_key(d) => {
            Err(error("3D000", format!("no such database: {d}")))
        }
        _ => Ok(()),
    }
}

/// RECONNECT [db]: idle servers close now, the others when their client releases them, so
/// that new ones connect again (and pick up a new endpoint). Answers at once.
fn reconnect(shared: &Arc<Shared>, db: Option<&str>) -> Result<BytesMut, ErrorFields> {
    known_database(shared, db, "reconnect")?;
    let closed = shared.pools.reconnect(db);
    tracing::info!(
        database = db.unwrap_or("(all)"),
        idle_closed = closed,
        "RECONNECT command issued: servers close as they become idle"
    );
    let mut out = BytesMut::new();
    command_complete(&mut out, "RECONNECT");
    Ok(out)
}

/// WAIT_CLOSE [db]: answers once no client of the database holds a server a RECONNECT
/// marked for closing.
async fn wait_close(shared: &Arc<Shared>, db: Option<&str>) -> Result<BytesMut, ErrorFields> {
    known_database(shared, db, "wait for")?;
    loop {
        // One look at the pools' marks, then one pass over the clients.
        let marks = shared.pools.reconnect_marks();
        let pending = shared.clients.any(|c| {
            db.is_none_or(|d| &*c.database == d)
                && c.server()
                    .is_some_and(|s| marks.get(c.pool).is_some_and(|&m| s.id < m))
        });
        if !pending {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut out = BytesMut::new();
    command_complete(&mut out, "WAIT_CLOSE");
    Ok(out)
}

fn resume(shared: &Arc<Shared>, db: Option<&str>) -> Result<BytesMut, ErrorFields> {
    match db {
        Some(d) if !shared.pools.config().databases.contains_key(d) => {
            return Err(error("3D000", format!("no such database: {d}")))
        }
        _ => {}
    }
    match shared.pools.resume(db) {
        Ok(()) => tracing::info!(database = db.unwrap_or("(all)"), "RESUME command issued"),
        Err(PauseError::AllPaused) => {
            return Err(error(
                "55000",
                "every database is paused: RESUME (without a name) resumes them",
            ))
        }
        Err(PauseError::DatabaseNotPaused) => {
            let d = db.unwrap_or_default();
            return Err(error("55000", format!("database {d} is not paused")));
        }
        Err(_) => return Err(error("55000", "pooler is not paused/suspended")),
    }
    let mut out = BytesMut::new();
    command_complete(&mut out, "RESUME");
    Ok(out)
}

fn show(shared: &Arc<Shared>, what: &str) -> Result<BytesMut, ErrorFields> {
    let t = match what {
        "help" => return Ok(help()),
        "pools" => show_pools(shared),
        "stats" => show_stats(shared, StatsView::All),
        "stats_totals" => show_stats(shared, StatsView::Totals),
        "stats_averages" => show_stats(shared, StatsView::Averages),
        "clients" => show_clients(shared),
        "servers" => show_servers(shared),
        "databases" => show_databases(shared),
        "users" => show_users(shared),
        "lists" => show_lists(shared),
        "config" => show_config(&shared.pools.config()),
        "version" => {
            let mut t = Table::new(&[("version", Ty::Text)]);
            t.row(vec![version().into()]);
            t
        }
        "state" => {
            let paused = shared.pools.is_paused(None);
            let mut t = Table::new(&[("key", Ty::Text), ("value", Ty::Text)]);
            for (k, v) in [
                ("active", !paused),
                ("paused", paused),
                ("suspended", false),
            ] {
                t.row(vec![k.into(), if v { "yes" } else { "no" }.into()]);
            }
            t
        }
        "applications" => show_applications(shared),
        "budget" => show_budget(shared),
        other => {
            if let Some((name, value)) = FAKE_PARAMETERS.iter().find(|(k, _)| *k == other) {
                let mut t = Table::new(&[(name, Ty::Text)]);
                t.row(vec![(*value).into()]);
                t
            } else {
                return Err(error(
                    "42601",
                    format!("invalid command 'SHOW {other}', use SHOW HELP;"),
                ));
            }
        }
    };
    Ok(t.finish("SHOW"))
}

/// The version string: pgsluice's, and the PgBouncer release its console matches (tools
/// that parse `PgBouncer X.Y.Z` find it).
pub fn version() -> String {
    format!(
        "pgsluice {} (PgBouncer {PGBOUNCER_COMPAT} compatible)",
        env!("CARGO_PKG_VERSION")
    )
}

fn help() -> BytesMut {
    let mut out = BytesMut::new();
    ErrorFields {
        severity: "NOTICE".into(),
        code: "00000".into(),
        message: "Console usage".into(),
        detail: Some(
            "\n\tSHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|VERSION\n\
             \tSHOW LISTS|STATE|STATS|STATS_TOTALS|STATS_AVERAGES\n\
             \tSHOW APPLICATIONS|BUDGET\n\
             \tPAUSE [<db>]\n\
             \tRESUME [<db>]\n\
             \tRECONNECT [<db>]\n\
             \tWAIT_CLOSE [<db>]\n\
             \tRELOAD\n\
             \tSHUTDOWN\n\
             \tSHUTDOWN WAIT_FOR_CLIENTS"
                .into(),
        ),
        hint: None,
    }
    .encode_notice(&mut out);
    command_complete(&mut out, "SHOW");
    out
}

fn show_pools(shared: &Shared) -> Table {
    use Ty::*;
    let mut t = Table::new(&[
        ("database", Text),
        ("user", Text),
        ("cl_active", Int),
        ("cl_waiting", Int),
        ("cl_active_cancel_req", Int),
        ("cl_waiting_cancel_req", Int),
        ("sv_active", Int),
        ("sv_active_cancel", Int),
        ("sv_being_canceled", Int),
        ("sv_idle", Int),
        ("sv_used", Int),
        ("sv_tested", Int),
        ("sv_login", Int),
        ("maxwait", Int),
        ("maxwait_us", Int),
        ("pool_mode", Text),
        ("load_balance_hosts", Text),
    ]);
    let by_pool = clients_by_pool(&shared.clients.all(), Instant::now());
    for p in shared.pools.stats() {
        let key = (p.database.as_str().into(), p.user.as_str().into());
        let c = by_pool.get(&key).cloned().unwrap_or_default();
        let sv = ServerCounts::of(&p, &c);
        let mode = shared
            .pools
            .config()
            .pool_settings(&p.database, &p.user)
            .map(|s| pool_mode_str(s.mode));
        t.row(vec![
            p.database.clone().into(),
            p.user.clone().into(),
            (c.active + c.idle).into(),
            c.waiting.into(),
            0i64.into(),
            0i64.into(),
            (sv.active + sv.idle_in_transaction).into(),
            0i64.into(),
            0i64.into(),
            sv.idle.into(),
            0i64.into(),
            sv.testing.into(),
            sv.login.into(),
            c.max_wait.as_secs().into(),
            (c.max_wait.subsec_micros() as i64).into(),
            mode.into(),
            V::Null,
        ]);
    }
    t
}

/// Totals per database, summed over its pools.
#[derive(Default)]
struct DbStats {
    assignments: u64,
    client_parses: u64,
    server_parses: u64,
    binds: u64,
    xacts: u64,
    queries: u64,
    received: u64,
    sent: u64,
    xact_us: f64,
    idle_us: f64,
    wait_us: f64,
}

/// Which view of the statistics a SHOW command asks for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum StatsView {
    /// SHOW STATS: totals, then averages, then `total_requests`.
    All,
    /// SHOW STATS_TOTALS (what pgbouncer_exporter reads).
    Totals,
    /// SHOW STATS_AVERAGES.
    Averages,
}

/// The statistics' columns, as SHOW STATS_TOTALS and SHOW STATS_AVERAGES name them; SHOW
/// STATS names them `total_` and `avg_` these (`recv` for the received bytes' average).
const STATS_COLUMNS: [(&str, &str, &str); 11] = [
    (
        "server_assignment_count",
        "total_server_assignment_count",
        "avg_server_assignment_count",
    ),
    ("xact_count", "total_xact_count", "avg_xact_count"),
    ("query_count", "total_query_count", "avg_query_count"),
    ("bytes_received", "total_received", "avg_recv"),
    ("bytes_sent", "total_sent", "avg_sent"),
    ("xact_time", "total_xact_time", "avg_xact_time"),
    ("query_time", "total_query_time", "avg_query_time"),
    ("wait_time", "total_wait_time", "avg_wait_time"),
    (
        "client_parse_count",
        "total_client_parse_count",
        "avg_client_parse_count",
    ),
    (
        "server_parse_count",
        "total_server_parse_count",
        "avg_server_parse_count",
    ),
    ("bind_count", "total_bind_count", "avg_bind_count"),
];

fn show_stats(shared: &Shared, view: StatsView) -> Table {
    use Ty::*;
    let mut columns = vec![("database", Text)];
    columns.extend(STATS_COLUMNS.iter().map(|(short, total, _)| {
        let name = if view == StatsView::All { total } else { short };
        (*name, Int)
    }));
    if view == StatsView::All {
        columns.extend(STATS_COLUMNS.iter().map(|(_, _, avg)| (*avg, Int)));
        // PgBouncer before 1.8 (exporters written for it, such as Debian's
        // prometheus-pgbouncer-exporter, still read it): requests = queries.
        columns.push(("total_requests", Int));
    }
    let mut t = Table::new(&columns);
    let mut dbs: BTreeMap<String, DbStats> = shared
        .pools
        .config()
        .databases
        .keys()
        .map(|d| (d.clone(), DbStats::default()))
        .collect();
    for p in shared.metrics.pool_handles() {
        // A database a reload removed has no row.
        let Some(d) = dbs.get_mut(&p.database) else {
            continue;
        };
        d.client_parses += p.client_parses.get();
        d.server_parses += p.server_parses.get();
        d.binds += p.binds.get();
        d.assignments += p.server_assignments.get();
        d.xacts += p.transactions.get();
        d.queries += p.queries.get();
        d.received += p.received.get();
        d.sent += p.sent.get();
        d.xact_us += p.transaction_duration.get_sample_sum() * 1e6;
        // Idle time of the transactions counted in xact_us only: a transaction still open,
        // or cut off by its client leaving, has no duration there.
        d.idle_us += p.ended_idle_us.load(Ordering::Relaxed) as f64;
        d.wait_us += p.client_wait.get_sample_sum() * 1e6;
    }
    let uptime = shared.started.elapsed().as_secs().max(1);
    let per = |total: u64, n: u64| total.checked_div(n).unwrap_or(0);
    let mut shown = shared
        .console
        .query_time_shown
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    shown.retain(|name, _| dbs.contains_key(name));
    for (name, d) in dbs {
        let last = shown.entry(name.clone()).or_default();
        let query_us = ((d.xact_us - d.idle_us).max(0.0) as u64).max(*last);
        *last = query_us;
        let xact_us = d.xact_us as u64;
        let wait_us = d.wait_us as u64;
        let totals = [
            d.assignments,
            d.xacts,
            d.queries,
            d.received,
            d.sent,
            xact_us,
            query_us,
            wait_us,
            d.client_parses,
            d.server_parses,
            d.binds,
        ];
        // Counts per second since start; times per transaction, query and assignment.
        let averages = [
            d.assignments / uptime,
            d.xacts / uptime,
            d.queries / uptime,
            d.received / uptime,
            d.sent / uptime,
            per(xact_us, d.xacts),
            per(query_us, d.queries),
            per(wait_us, d.assignments),
            d.client_parses / uptime,
            d.server_parses / uptime,
            d.binds / uptime,
        ];
        let mut row = vec![name.into()];
        match view {
            StatsView::Totals => row.extend(totals.map(V::from)),
            StatsView::Averages => row.extend(averages.map(V::from)),
            StatsView::All => {
                row.extend(totals.map(V::from));
                row.extend(averages.map(V::from));
                row.push(d.queries.into());
            }
        }
        t.row(row);
    }
    t
}

const SOCKET_COLUMNS: [(&str, Ty); 21] = [
    ("type", Ty::Text),
    ("user", Ty::Text),
    ("database", Ty::Text),
    ("replication", Ty::Text),
    ("state", Ty::Text),
    ("addr", Ty::Text),
    ("port", Ty::Int),
    ("local_addr", Ty::Text),
    ("local_port", Ty::Int),
    ("connect_time", Ty::Text),
    ("request_time", Ty::Text),
    ("wait", Ty::Int),
    ("wait_us", Ty::Int),
    ("close_needed", Ty::Int),
    ("ptr", Ty::Text),
    ("link", Ty::Text),
    ("remote_pid", Ty::Int),
    ("tls", Ty::Text),
    ("application_name", Ty::Text),
    ("prepared_statements", Ty::Int),
    ("id", Ty::Int),
];

/// An address as `addr` and `port` columns; a Unix socket shows as `unix` and its port, as
/// in PgBouncer.
fn addr_parts(a: Option<crate::socket::Addr>) -> (V, V) {
    match a {
        Some(a) => (a.host_text().into(), (a.port() as i64).into()),
        None => (V::Null, V::Null),
    }
}

fn show_clients(shared: &Shared) -> Table {
    let mut t = Table::new(&SOCKET_COLUMNS);
    let now = Instant::now();
    for c in shared.clients.all() {
        let (addr, port) = addr_parts(c.addr);
        let (laddr, lport) = addr_parts(c.local);
        let wait = c.waiting_for(now).unwrap_or_default();
        let link = c.server().map(|s| server_ptr(s.id));
        t.row(vec![
            "C".into(),
            (&*c.user).into(),
            (&*c.database).into(),
            "none".into(),
            c.state().as_str().into(),
            addr,
            port,
            laddr,
            lport,
            format_time(c.connect_time).into(),
            c.request_time().map(format_time).into(),
            wait.as_secs().into(),
            (wait.subsec_micros() as i64).into(),
            0i64.into(),
            client_ptr(c.id).into(),
            link.unwrap_or_default().into(),
            0i64.into(),
            (&*c.tls).into(),
            c.app().name.into(),
            0i64.into(),
            c.id.into(),
        ]);
    }
    t
}

fn show_servers(shared: &Shared) -> Table {
    let mut t = Table::new(&SOCKET_COLUMNS);
    let config = shared.pools.config();
    for c in shared.clients.all() {
        let Some(s) = c.server() else { continue };
        let (addr, port) = addr_parts(Some(s.addr));
        let (laddr, lport) = addr_parts(s.local);
        let user = config
            .pool_settings(&c.database, &c.user)
            .map(|p| p.upstream_user)
            .unwrap_or_else(|| c.user.to_string());
        t.row(vec![
            "S".into(),
            user.into(),
            (&*c.database).into(),
            "none".into(),
            "active".into(),
            addr,
            port,
            laddr,
            lport,
            format_time(s.connect_time).into(),
            c.request_time().map(format_time).into(),
            0i64.into(),
            0i64.into(),
            i64::from(shared.pools.close_needed(c.pool, s.id)).into(),
            server_ptr(s.id).into(),
            client_ptr(c.id).into(),
            (s.pid as i64).into(),
            "".into(),
            c.app().name.into(),
            0i64.into(),
            s.id.into(),
        ]);
    }
    for s in shared.pools.idle_servers() {
        let (addr, port) = addr_parts(Some(s.addr));
        let (laddr, lport) = addr_parts(s.local);
        t.row(vec![
            "S".into(),
            s.user.into(),
            s.database.into(),
            "none".into(),
            "idle".into(),
            addr,
            port,
            laddr,
            lport,
            format_time(s.connect_time).into(),
            format_time(s.last_used).into(),
            0i64.into(),
            0i64.into(),
            0i64.into(),
            server_ptr(s.id).into(),
            "".into(),
            (s.pid as i64).into(),
            "".into(),
            "".into(),
            0i64.into(),
            s.id.into(),
        ]);
    }
    t
}

fn show_databases(shared: &Shared) -> Table {
    use Ty::*;
    let config = shared.pools.config();
    let mut t = Table::new(&[
        ("name", Text),
        ("host", Text),
        ("port", Int),
        ("database", Text),
        ("force_user", Text),
        ("pool_size", Int),
        ("min_pool_size", Int),
        ("reserve_pool_size", Int),
        ("server_lifetime", Int),
        ("pool_mode", Text),
        ("load_balance_hosts", Text),
        ("max_connections", Int),
        ("current_connections", Int),
        ("max_client_connections", Int),
        ("current_client_connections", Int),
        ("paused", Int),
        ("disabled", Int),
        // PgBouncer before 1.8's name of reserve_pool_size, for old exporters.
        ("reserve_pool", Int),
    ]);
    let stats = shared.pools.stats();
    let clients = shared.clients.all();
    for (name, db) in &config.databases {
        let open: u32 = stats
            .iter()
            .filter(|p| &p.database == name)
            .map(|p| p.open)
            .sum();
        let n_clients = clients.iter().filter(|c| *c.database == **name).count();
        t.row(vec![
            name.clone().into(),
            db.host.clone().into(),
            (db.port as i64).into(),
            db.dbname.clone().unwrap_or_else(|| name.clone()).into(),
            db.user.clone().into(),
            db.pool_size.unwrap_or(config.pool_size).into(),
            db.min_pool_size.unwrap_or(config.min_pool_size).into(),
            0i64.into(),
            config.server_lifetime.as_secs().into(),
            db.pool_mode.map(pool_mode_str).into(),
            V::Null,
            db.max_db_connections
                .unwrap_or(config.max_db_connections)
                .into(),
            open.into(),
            0i64.into(),
            n_clients.into(),
            i64::from(shared.pools.is_paused(Some(name))).into(),
            0i64.into(),
            0i64.into(),
        ]);
    }
    t
}

fn show_users(shared: &Shared) -> Table {
    use Ty::*;
    let config = shared.pools.config();
    let mut t = Table::new(&[
        ("name", Text),
        ("pool_size", Text),
        ("reserve_pool_size", Text),
        ("pool_mode", Text),
        ("max_user_connections", Int),
        ("current_connections", Int),
        ("max_user_client_connections", Int),
        ("current_client_connections", Int),
    ]);
    let stats = shared.pools.stats();
    let clients = shared.clients.all();
    for name in user_names(&config, &stats) {
        let u = config.users.get(name);
        let open: u32 = stats
            .iter()
            .filter(|p| &p.user == name)
            .map(|p| p.open)
            .sum();
        let n_clients = clients.iter().filter(|c| *c.user == **name).count();
        t.row(vec![
            name.clone().into(),
            u.and_then(|u| u.pool_size)
                .map(|n| n.to_string())
                .unwrap_or_default()
                .into(),
            "".into(),
            u.and_then(|u| u.pool_mode).map(pool_mode_str).into(),
            u.and_then(|u| u.max_user_connections)
                .unwrap_or(config.max_user_connections)
                .into(),
            open.into(),
            0i64.into(),
            n_clients.into(),
        ]);
    }
    t
}

/// Users in `[users]` or `auth_file`, and users found by `auth_query` that have a pool.
fn user_names<'a>(config: &'a Config, stats: &'a [crate::pool::PoolStats]) -> Vec<&'a String> {
    let mut names: Vec<&String> = config
        .users
        .keys()
        .chain(config.auth_file_users.keys())
        .chain(stats.iter().map(|p| &p.user))
        .collect();
    names.sort();
    names.dedup();
    names
}

fn show_lists(shared: &Shared) -> Table {
    let config = shared.pools.config();
    let stats = shared.pools.stats();
    let open: u32 = stats.iter().map(|p| p.open).sum();
    let mut t = Table::new(&[("list", Ty::Text), ("items", Ty::Int)]);
    for (name, n) in [
        ("databases", config.databases.len()),
        ("users", user_names(&config, &stats).len()),
        ("peers", 0),
        ("pools", stats.len()),
        ("peer_pools", 0),
        ("free_clients", 0),
        ("used_clients", shared.clients.len()),
        ("login_clients", shared.clients.login_count() as usize),
        ("free_servers", 0),
        ("used_servers", open as usize),
        ("dns_names", 0),
        ("dns_zones", 0),
        ("dns_queries", 0),
        ("dns_pending", 0),
    ] {
        t.row(vec![name.into(), n.into()]);
    }
    t
}

/// `(key, value, default)` of the settings SHOW CONFIG lists. Durations in seconds, as
/// PgBouncer shows them (`tcp_user_timeout` in milliseconds, as PgBouncer's is set).
pub fn config_rows(c: &Config) -> Vec<(&'static str, String, &'static str)> {
    let list = |v: &[String]| v.join(",");
    vec![
        ("listen", c.listen.clone(), "127.0.0.1:6432"),
        (
            "pool_mode",
            pool_mode_str(c.pool_mode).into(),
            "transaction",
        ),
        ("pool_size", c.pool_size.to_string(), "20"),
        ("min_pool_size", c.min_pool_size.to_string(), "0"),
        ("max_client_conn", c.max_client_conn.to_string(), "10000"),
        ("query_wait_timeout", secs(c.query_wait_timeout), "120"),
        ("query_wait_notify", secs(c.query_wait_notify), "5"),
        ("client_login_timeout", secs(c.client_login_timeout), "60"),
        ("query_timeout", secs(c.query_timeout), "0"),
        (
            "idle_transaction_timeout",
            secs(c.idle_transaction_timeout),
            "0",
        ),
        (
            "server_connect_timeout",
            secs(c.server_connect_timeout),
            "15",
        ),
        ("server_idle_timeout", secs(c.server_idle_timeout), "600"),
        ("server_lifetime", secs(c.server_lifetime), "3600"),
        (
            "server_cleanup_timeout",
            secs(c.server_cleanup_timeout),
            "5",
        ),
        (
            "server_reset_query",
            c.server_reset_query.clone(),
            "DISCARD ALL",
        ),
        ("server_check_delay", secs(c.server_check_delay), "30"),
        (
            "server_check_query",
            c.server_check_query.clone(),
            "select 1",
        ),
        (
            "auth_type",
            match c.auth_type {
                crate::config::AuthType::ScramSha256 => "scram-sha-256",
                crate::config::AuthType::Md5 => "md5",
                crate::config::AuthType::Trust => "trust",
            }
            .into(),
            "scram-sha-256",
        ),
        ("auth_file", c.auth_file.clone().unwrap_or_default(), ""),
        ("auth_user", c.auth_user.clone().unwrap_or_default(), ""),
        (
            "auth_query",
            c.auth_query.clone(),
            crate::config::DEFAULT_AUTH_QUERY,
        ),
        ("auth_dbname", c.auth_dbname.clone().unwrap_or_default(), ""),
        ("auth_query_cache_ttl", secs(c.auth_query_cache_ttl), "10"),
        ("login_rate_limit", c.login_rate_limit.to_string(), "0"),
        ("max_query_size", c.max_query_size.to_string(), "33554432"),
        (
            "max_prepared_statements",
            c.max_prepared_statements.to_string(),
            "200",
        ),
        ("tcp_keepalive", c.tcp_keepalive.to_string(), "1"),
        ("tcp_keepidle", secs(c.tcp_keepidle), "60"),
        ("tcp_keepintvl", secs(c.tcp_keepintvl), "10"),
        ("tcp_keepcnt", c.tcp_keepcnt.to_string(), "6"),
        (
            "tcp_user_timeout",
            c.tcp_user_timeout.as_millis().to_string(),
            "0",
        ),
        (
            "server_tcp_keepalive",
            c.server_tcp_keepalive.to_string(),
            "1",
        ),
        (
            "ignore_startup_parameters",
            list(&c.ignore_startup_parameters),
            "",
        ),
        (
            "track_extra_parameters",
            list(&c.track_extra_parameters),
            "",
        ),
        (
            "log_format",
            match c.log_format {
                crate::config::LogFormat::Text => "text",
                crate::config::LogFormat::Json => "json",
            }
            .into(),
            "text",
        ),
        ("admin_users", list(&c.admin_users), ""),
        (
            "metrics.listen",
            c.metrics.listen.clone().unwrap_or_default(),
            "",
        ),
        (
            "metrics.max_applications",
            c.metrics.max_applications.to_string(),
            "100",
        ),
    ]
}

fn show_config(c: &Config) -> Table {
    let mut t = Table::new(&[
        ("key", Ty::Text),
        ("value", Ty::Text),
        ("default", Ty::Text),
        ("changeable", Ty::Text),
    ]);
    // Changeable by RELOAD (or SIGHUP) unless the reload refuses a change of it.
    let restart: Vec<String> = crate::reload::restart_keys(c)
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    for (k, v, d) in config_rows(c) {
        let changeable = if restart.iter().any(|r| r == k) {
            "no"
        } else {
            "yes"
        };
        t.row(vec![k.into(), v.into(), d.into(), changeable.into()]);
    }
    t
}

fn show_applications(shared: &Shared) -> Table {
    use Ty::*;
    let mut t = Table::new(&[
        ("database", Text),
        ("user", Text),
        ("application", Text),
        ("cl_active", Int),
        ("cl_waiting", Int),
        ("cl_idle", Int),
        ("sv_idle_in_transaction", Int),
        ("max_idle_in_transaction", Float),
        ("total_idle_in_transaction", Float),
        ("total_wait_time", Float),
        ("checkout_timeouts", Int),
    ]);
    let now = Instant::now();
    let mut by_app: BTreeMap<(String, String, String), (ClientCounts, Duration)> = BTreeMap::new();
    for c in shared.clients.all() {
        let a = c.app().metrics;
        let e = by_app
            .entry((a.database.clone(), a.user.clone(), a.label.clone()))
            .or_default();
        match c.state() {
            ClientState::Active => e.0.active += 1,
            ClientState::Waiting => e.0.waiting += 1,
            ClientState::Idle => e.0.idle += 1,
        }
        if let Some(d) = c.idle_in_transaction_for(now) {
            e.0.idle_in_transaction += 1;
            e.1 = e.1.max(d);
        }
    }
    for a in shared.metrics.apps() {
        let (c, max) = by_app
            .remove(&(a.database.clone(), a.user.clone(), a.label.clone()))
            .unwrap_or_default();
        t.row(vec![
            a.database.clone().into(),
            a.user.clone().into(),
            a.label.clone().into(),
            c.active.into(),
            c.waiting.into(),
            c.idle.into(),
            c.idle_in_transaction.into(),
            max.as_secs_f64().into(),
            a.idle_in_transaction.get().into(),
            a.wait.get_sample_sum().into(),
            a.checkout_timeouts.get().into(),
        ]);
    }
    t
}

fn show_budget(shared: &Shared) -> Table {
    use Ty::*;
    let mut t = Table::new(&[
        ("upstream", Text),
        ("mode", Text),
        ("limit", Int),
        ("share", Int),
        ("fleet_budget", Int),
        ("max_connections", Int),
        ("superuser_reserved_connections", Int),
        ("reserved_connections", Int),
        ("connections", Int),
        ("members", Int),
        ("in_use", Int),
        ("last_refresh", Text),
        ("last_error", Text),
        ("refresh_errors", Int),
        ("refresh_interval", Float),
    ]);
    for (upstream, s) in shared.pools.budget_snapshots() {
        t.row(vec![
            upstream.into(),
            s.mode.into(),
            s.limit.into(),
            s.share.into(),
            s.fleet_budget.into(),
            s.upstream.max_connections.into(),
            s.upstream.superuser_reserved_connections.into(),
            s.upstream.reserved_connections.into(),
            s.upstream.connections.into(),
            s.upstream.members.into(),
            s.in_use.into(),
            s.last_refresh.map(format_time).into(),
            s.last_error.into(),
            s.refresh_errors.into(),
            s.refresh_interval.as_secs_f64().into(),
        ]);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_look_like_pgbouncer_s() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(format_time(t), "2023-11-14 22:13:20 UTC");
        assert_eq!(
            format_time(SystemTime::UNIX_EPOCH),
            "1970-01-01 00:00:00 UTC"
        );
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(format_time(leap), "2000-02-29 00:00:00 UTC");
    }

    #[test]
    fn config_defaults_are_the_real_defaults() {
        let c =
            Config::from_toml("upstream = \"postgres://u:p@h/d\"\nlisten = \"127.0.0.1:6432\"\n")
                .unwrap();
        for (k, v, d) in config_rows(&c) {
            if k == "admin_users" {
                assert_eq!(v, "u", "quick mode makes the upstream user an admin");
                continue;
            }
            assert_eq!(v, d, "{k}: SHOW CONFIG's default column is stale");
        }
    }

    #[test]
    fn table_encoding() {
        let mut t = Table::new(&[("a", Ty::Text), ("b", Ty::Int)]);
        t.row(vec!["x".into(), V::Null]);
        let b = t.finish("SHOW");
        assert_eq!(b[0], b'T');
        let len = i32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        assert_eq!(b[1 + len], b'D');
        assert!(b.ends_with(b"C\0\0\0\x09SHOW\0"));
    }
}
