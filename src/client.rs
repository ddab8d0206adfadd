//! One client's life: handshake, authentication, then the loop that lends it a server for
//! each transaction (transaction mode) or once for its whole connection (session mode).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tracing::Instrument;

use crate::app::Shared;
use crate::auth;
use crate::clients::{AppSlot, NewClient, Registration, ServerLink};
use crate::config::{Config, PoolMode};
use crate::metrics::{ErrorKind, Meter, TxnCounts};
use crate::pool::queue::WaitCell;
use crate::pool::{Checkout, PoolError, PoolId};
use crate::protocol::login_input::LoginInput;
use crate::protocol::messages::{self, quote_ident, quote_literal, ErrorFields, Severity};
use crate::protocol::startup::{self, Startup, StartupError, StartupPacket};
use crate::protocol::{frontend, TransactionStatus};
use crate::relay::{self, ClientConn, Leftover, Outcome, Peek, Txn};
use crate::server::{ServerConn, ServerError};
use crate::session_params::SessionParams;
use crate::shutdown::Watch;
use crate::socket::{Addr, Socket};
use crate::sql::SessionEffects;
use crate::stream::Stream;
use crate::tls::{ClientTlsMode, ALPN};

/// Startup parameters kept per client and applied to whichever server it gets
/// (lower case), besides `track_extra_parameters`.
pub const TRACKED_PARAMETERS: [&str; 11] = [
    "application_name",
    "client_encoding",
    "datestyle",
    "timezone",
    "intervalstyle",
    "standard_conforming_strings",
    "extra_float_digits",
    "search_path",
    "statement_timeout",
    "lock_timeout",
    "default_transaction_isolation",
];

/// Why a client is closed; `Quiet` ends without telling it anything.
#[derive(Debug)]
enum End {
    Tell(ErrorFields),
    Quiet,
}

impl From<std::io::Error> for End {
    fn from(_: std::io::Error) -> Self {
        End::Quiet
    }
}

/// Who the client is, after its startup packet.
#[derive(Debug)]
struct Login {
    user: String,
    database: String,
    /// Tracked parameters from the startup packet (lower-case names).
    params: BTreeMap<String, String>,
    /// `_pq_.` options and the minor version to answer with NegotiateProtocolVersion.
    negotiate: Option<Vec<String>>,
    /// The authentication exchange's last message (SASLFinal), not sent yet: it goes out
    /// with AuthenticationOk and the rest of the welcome, in one write.
    hello: BytesMut,
}

/// A client's addresses as the accept gave them (`None`: asked of its socket).
#[derive(Debug, Clone, Copy, Default)]
pub struct Addrs {
    pub peer: Option<Addr>,
    pub local: Option<Addr>,
}

/// The task of one accepted client connection, for its whole life: serves it until it ends,
/// logs why (once), then gives back `permit`, its place under `max_client_conn`.
/// `over_limit`: the connection was accepted over `max_client_conn` (= the value): only an
/// admin console login (or a cancel request) gets in, any other startup is refused with
/// 53300 before authentication.
pub fn task(
    stream: Socket,
    addrs: Addrs,
    shared: Arc<Shared>,
    over_limit: Option<usize>,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Connection {
    // The socket goes into the boxed login at once instead of being carried by the task.
    let login = async move {
        let stream = Stream::from(stream);
        // Asked once at most (one getpeername); formatted only if the span is recorded.
        let peer = addrs.peer.or_else(|| stream.peer());
        // The span is entered where a client's log lines come from: login, and the rare
        // paths of a session (not served, parameters applied, the clean-up after a
        // transaction). Not at every wake-up of its task: with a subscriber that records it
        // (the default level, `info`), entering and leaving it cost about 470 instructions
        // per transaction, 7 % of a select's.
        let span = tracing::info_span!("client", peer = %PeerField(peer), user = tracing::field::Empty, database = tracing::field::Empty);
        let addrs = Addrs { peer, ..addrs };
        match log_in(stream, addrs, &shared, over_limit)
            .instrument(span.clone())
            .await
        {
            Ok(Some(mut session)) => {
                session.permit = Some(permit);
                if session.client.buf.is_empty() {
                    Some(session) // to park until its first request
                } else {
                    // A request pipelined behind the login is served at once.
                    serve(session).await
                }
            }
            Ok(None) => {
                ended(&span, Ok(()));
                None
            }
            Err(e) => {
                ended(&span, Err(e));
                None
            }
        }
    };
    Connection(Phase::Running(Box::pin(login)))
}

/// One client connection's task. It stays small (two words): what each phase waits on is
/// in an allocation of its own, made when the phase begins and freed when it ends. The
/// login's futures (handshake, TLS, authentication, the welcome) are large and needed once;
/// a serving session's is about 1.1 KiB; a parked one waits on its socket with nothing but
/// its session. A client that logs in and sits idle (an app's pool opened ahead) then holds
/// its session and this task only, and going from one phase to the next costs an
/// allocation, not a task spawned (and the next phase runs in the same wake-up).
pub struct Connection(Phase);

/// What a connection's task waits on. Two variants in two words: the running future's
/// pointer tells them apart. After the end the task is not polled again: what is left in
/// it (a finished future, or no session) is dropped with it.
enum Phase {
    /// Logging in (and serving a request pipelined behind the login), or serving
    /// requests: the session when it is to park, `None` when the connection ended (why
    /// was logged).
    Running(std::pin::Pin<Box<dyn std::future::Future<Output = Option<Box<Session>>> + Send>>),
    /// Idle, waiting for the client's next bytes (`None` once it left).
    Parked(Option<Box<Session>>),
}

impl std::future::Future for Connection {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        use std::task::Poll;
        loop {
            match &mut self.0 {
                Phase::Running(running) => match running.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(None) => return Poll::Ready(()),
                    // The session parks; its login or serving future is dropped here.
                    Poll::Ready(Some(session)) => self.0 = Phase::Parked(Some(park(session))),
                },
                Phase::Parked(parked) => {
                    let Some(session) = parked else {
                        return Poll::Ready(());
                    };
                    let served = match unpark(session, cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(served) => served,
                    };
                    let session = parked.take().expect("matched above");
                    if !served {
                        finish(session, Ok(()));
                        return Poll::Ready(());
                    }
                    self.0 = Phase::Running(Box::pin(serve(session)));
                }
            }
        }
    }
}

/// Serves a logged-in client until it leaves (`None`), or until it parks: then its serving
/// future is dropped and the session comes back, to wait in [`Phase::Parked`].
async fn serve(mut session: Box<Session>) -> Option<Box<Session>> {
    let end = match session.run().await {
        Ok(Ran::Left) => Ok(()),
        Ok(Ran::Park) => return Some(session),
        Err(e) => Err(e),
    };
    finish(session, end);
    None
}

/// The session parks: it waits for its next bytes with no read buffer (unless part of a
/// request is in it) and no serving future.
fn park(mut session: Box<Session>) -> Box<Session> {
    if session.client.buf.is_empty() {
        session.client.release_buffer();
    }
    session.registration.park();
    session
}

/// A client's session ends: its read buffer serves the next client of this thread (a storm
/// of short sessions allocates none), why it ended is logged, and dropping it gives back its
/// place under max_client_conn.
fn finish(mut session: Box<Session>, end: Result<(), String>) {
    session.client.release_buffer();
    ended(&session.span, end);
}

/// Logs why a client ended (once).
fn ended(span: &tracing::Span, end: Result<(), String>) {
    let _in = span.enter();
    match end {
        Ok(()) => tracing::debug!("client left"),
        Err(msg) => tracing::info!(reason = %msg, "client closed"),
    }
}

/// A parked session's wait (at login, straight after a transaction that followed its login
/// or an idle stretch, or idle for [`crate::clients::PARK_AFTER`]): `true` when it is to be
/// served again (bytes arrived, read into its buffer where the next request is looked for;
/// or draining began, which the serving loop answers), `false` when the client left
/// (Terminate alone, or its end closed: a short connection, or a pool closing its idle
/// connections leaves from here, without serving again).
///
/// Parking is for clients that sit idle, the connections of an app's pool: a client
/// between the statements of a busy loop does not park, so the relay's path is the same;
/// coming back costs one allocation of the serving future.
fn unpark(s: &mut Session, cx: &mut std::task::Context<'_>) -> std::task::Poll<bool> {
    let watch = Watch::client(&s.shared.stop, &s.registration.client);
    // What it has buffered (part of a request) waits for the rest. The bytes that wake
    // it are read here, into its buffer: the read its serving loop would make first.
    let input = match watch.poll_draining(cx) {
        std::task::Poll::Ready(()) => None,
        std::task::Poll::Pending => match s.client.poll_input(cx) {
            std::task::Poll::Pending => return std::task::Poll::Pending,
            std::task::Poll::Ready(more) => Some(more),
        },
    };
    let left = match input {
        Some(false) => true,
        Some(true) => s.client.buf[..] == TERMINATE[..],
        None => false,
    };
    if left {
        return std::task::Poll::Ready(false);
    }
    s.registration.resume();
    // Back from a long idle stretch (or from its login): likely to go idle again.
    let client = &s.registration.client;
    s.park_early = client
        .since_request(Instant::now())
        .is_none_or(|idle| idle >= crate::clients::PARK_AFTER);
    std::task::Poll::Ready(true)
}

/// A Terminate message, whole.
const TERMINATE: [u8; 5] = [frontend::TERMINATE, 0, 0, 0, 4];

/// A client's address in its tracing span (empty when unknown).
struct PeerField(Option<Addr>);

impl std::fmt::Display for PeerField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(a) => a.fmt(f),
            None => Ok(()),
        }
    }
}

/// Sends the error and closes.
fn fatal<'a>(stream: &'a mut Stream, e: &'a ErrorFields) -> Cold<'a> {
    fatal_after(stream, &[], e)
}

/// A future of a path taken once per connection at most (an error, a goodbye), in an
/// allocation of its own: the client's task, which lives as long as the client, does not
/// carry its room.
type Cold<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

/// Sends `first` (what login still owes the client), then the error, and closes.
fn fatal_after<'a>(stream: &'a mut Stream, first: &'a [u8], e: &'a ErrorFields) -> Cold<'a> {
    Box::pin(send_fatal(stream, first, e))
}

async fn send_fatal(stream: &mut Stream, first: &[u8], e: &ErrorFields) {
    let mut buf = BytesMut::from(first);
    e.encode(&mut buf);
    let _ = tokio::time::timeout(CLOSING_WRITE, async {
        let _ = stream.send(&buf).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Login, up to a [`Session`] (`None`: the connection ended without one: a cancel request,
/// an admin console session, or a client that left quietly).
async fn log_in(
    mut stream: Stream,
    addrs: Addrs,
    shared: &Arc<Shared>,
    over_limit: Option<usize>,
) -> Result<Option<Box<Session>>, String> {
    let addr = addrs.peer;
    let config = shared.pools.config();
    let logging_in = shared.clients.logging_in();
    // Unix-socket clients have no IP address: login_rate_limit counts TCP clients only.
    let peer = addr.and_then(|a| a.ip());
    let mut input = LoginInput::new();
    // A connection over max_client_conn (let in for the admin reserve) has a few seconds for
    // its whole login, so that slow or stalled logins cannot hold the reserve.
    let login_timeout = match over_limit {
        Some(_) => config.client_login_timeout.min(RESERVE_LOGIN_WAIT),
        None => config.client_login_timeout,
    };
    let login = tokio::time::timeout(
        login_timeout,
        handshake(&mut stream, &mut input, shared, &config, peer, over_limit),
    )
    .await;
    let login = match login {
        Err(_) => {
            let e = match over_limit {
                Some(max) => {
                    shared.metrics.error(ErrorKind::TooManyClients);
                    too_many_clients_error(max)
                }
                None => {
                    shared.metrics.error(ErrorKind::LoginTimeout);
                    ErrorFields::new(
                        Severity::Fatal,
                        "08P01",
                        "client_login_timeout: login took too long",
                    )
                }
            };
            fatal(&mut stream, &e).await;
            return Err(e.message);
        }
        Ok(Ok(Some(login))) => login,
        Ok(Ok(None)) => return Ok(None),
        Ok(Err(End::Quiet)) => return Err("connection closed during login".into()),
        Ok(Err(End::Tell(e))) => {
            shared.metrics.error(match e.code.as_str() {
                "28P01" | "28000" => ErrorKind::AuthFailed,
                "53300" if over_limit.is_some() => ErrorKind::TooManyClients,
                _ => ErrorKind::BadStartup,
            });
            fatal(&mut stream, &e).await;
            return Err(e.message);
        }
    };
    tracing::Span::current()
        .record("user", login.user.as_str())
        .record("database", login.database.as_str());
    if crate::admin::is_console(&login.database) {
        drop(logging_in);
        // Boxed, as the other rare paths of a login below (TLS, a cancel request, an
        // auth_query lookup): their futures would otherwise be part of every login's
        // allocation (5.4 KiB with them, 2.4 KiB without).
        return Box::pin(console(stream, input.into_leftover(), shared, login))
            .await
            .map(|()| None);
    }
    if shared.console.is_draining() {
        let e = ErrorFields::new(Severity::Fatal, "57P03", "pooler is shutting down")
            .with_hint("pgsluice is draining: connect to another instance");
        fatal_after(&mut stream, &login.hello, &e).await;
        return Err(e.message);
    }
    let Some(pool) = shared.pools.pool_for(&login.database, &login.user) else {
        shared.metrics.error(ErrorKind::UnknownDatabase);
        let e = ErrorFields::new(
            Severity::Fatal,
            "3D000",
            format!("database \"{}\" does not exist", login.database),
        )
        .with_hint("pgsluice serves only the databases in its configuration");
        fatal_after(&mut stream, &login.hello, &e).await;
        return Err(e.message);
    };
    let cancel = shared.cancels.register();
    if let Err(e) = welcome(
        &mut stream,
        shared,
        &config,
        pool,
        &login,
        cancel.client.pid,
        cancel.client.secret,
    )
    .await
    {
        fatal_after(&mut stream, &login.hello, &e).await;
        return Err(e.message);
    }
    tracing::debug!(user = %login.user, database = %login.database, "client logged in");
    let app_name = login
        .params
        .get("application_name")
        .cloned()
        .unwrap_or_default();
    let mut new_labels = crate::metrics::NEW_LABELS_PER_CLIENT;
    let registration = shared.clients.register(NewClient {
        pool,
        database: &login.database,
        user: &login.user,
        addr,
        local: addrs.local.or_else(|| stream.local()),
        tls: stream.tls_description(),
        pid: cancel.client.pid,
        app: AppSlot {
            metrics: shared
                .metrics
                .app(&login.database, &login.user, &app_name, &mut new_labels),
            name: app_name,
        },
    });
    drop(logging_in);
    let meter = Arc::new(Meter {
        pool: shared.metrics.pool(pool, &login.database, &login.user),
        app: registration.client.app().metrics,
        client: registration.client.clone(),
    });
    let params = shared.param_sets.intern(login.params);
    // Boxed: the client's task then holds a pointer, not a second copy of the session
    // beside the login's result.
    let mut session = Box::new(Session {
        client: ClientConn::new(
            stream,
            config.max_query_size,
            config.max_prepared_statements,
            shared.pools.known_statements(pool),
        ),
        shared: shared.clone(),
        pool: u32::try_from(pool).expect("fewer than 2^32 pools"),
        mode: shared.pools.settings(pool).mode,
        startup_params: params.clone(),
        params,
        cancel,
        meter,
        registration,
        wait_cell: None,
        timeouts: (u64::MAX, relay::Timeouts::default()),
        span: tracing::Span::current(),
        permit: None,
        park_early: true,
        servers_lost: 0,
        new_labels,
    });
    session.note_params();
    // What the client sent right after its login (a pipelined first Query) is read first.
    let leftover = input.into_leftover();
    if !leftover.is_empty() {
        session.client.buf = leftover;
    }
    Ok(Some(session))
}

/// An admin console session (databases `pgbouncer` and `pgsluice`), for `admin_users` only.
async fn console(
    mut stream: Stream,
    leftover: BytesMut,
    shared: &Arc<Shared>,
    login: Login,
) -> Result<(), String> {
    if !shared.pools.config().admin_users.contains(&login.user) {
        shared.metrics.error(ErrorKind::AdminDenied);
        let e = ErrorFields::new(
            Severity::Fatal,
            "42501",
            format!(
                "permission denied for the admin console: user \"{}\" is not in admin_users",
                login.user
            ),
        )
        .with_hint("list the user in admin_users in the pgsluice configuration");
        fatal_after(&mut stream, &login.hello, &e).await;
        return Err(e.message);
    }
    let cancel = shared.cancels.register();
    crate::admin::session(stream, login.hello, leftover, shared, cancel).await
}

/// Counts a failed checkout in the pool's (and, once known, the application's) figures.
fn count_pool_error(
    shared: &Shared,
    pool: &crate::metrics::PoolMetrics,
    app: Option<&crate::metrics::AppMetrics>,
    e: &PoolError,
) {
    match e {
        PoolError::WaitTimeout(_) => {
            pool.checkout_timeouts.inc();
            if let Some(app) = app {
                app.checkout_timeouts.inc();
            }
            shared.metrics.error(ErrorKind::QueryWaitTimeout);
        }
        PoolError::Server(_) => {
            pool.server_connect_errors.inc();
            shared.metrics.error(ErrorKind::ServerConnect);
        }
        PoolError::BudgetUnknown { .. } => shared.metrics.error(ErrorKind::BudgetUnknown),
        // Not a failure of the pool: the operator removed it.
        PoolError::Removed => {}
    }
}

/// Reads packets until a StartupMessage, starting TLS on SSLRequest (or a direct TLS
/// handshake) when `client_tls` allows, answering GSSENCRequest with 'N' and forwarding a
/// CancelRequest; then authenticates. `None` for a cancel connection.
async fn handshake(
    stream: &mut Stream,
    input: &mut LoginInput,
    shared: &Arc<Shared>,
    config: &Config,
    peer: Option<IpAddr>,
    over_limit: Option<usize>,
) -> Result<Option<Login>, End> {
    let mut tls = config.tls.client.clone();
    // No TLS over a Unix socket, as PostgreSQL: an SSLRequest gets 'N', and the client is
    // local, so `client_tls.mode = require` does not apply to it.
    if stream.socket().is_unix() {
        tls = Default::default();
    }
    // SSLRequest and GSSENCRequest may each come once before the startup packet.
    let (mut ssl_asked, mut gss_asked) = (false, false);
    loop {
        match over_limit {
            // Over max_client_conn: a client that does not say at once who it is is
            // refused as it would have been without the admin reserve.
            Some(max) => {
                match tokio::time::timeout(OVER_LIMIT_WAIT, input.fill(stream, 4)).await {
                    Ok(r) => r?,
                    Err(_) => return Err(too_many_clients(max)),
                };
            }
            None => input.fill(stream, 4).await?,
        }
        let direct_tls =
            input.buffered()[0] == TLS_HANDSHAKE_RECORD && !ssl_asked && !stream.is_tls();
        if let (true, Some(config)) = (direct_tls, tls.config.clone()) {
            // PostgreSQL 17's direct TLS: a ClientHello instead of an SSLRequest. (With
            // client_tls disabled it is an invalid startup packet, as for PostgreSQL 16.)
            // Everything buffered is the start of the handshake: rustls takes it all.
            ssl_asked = true;
            let early = input.take_all();
            start_tls(stream, config, &early, shared).await?;
            if stream.alpn_protocol() != Some(ALPN) {
                return Err(unsupported(
                    "received direct TLS connection request without ALPN protocol negotiation extension \"postgresql\"".into(),
                ));
            }
            continue;
        }
        match startup::read_packet(stream, input).await {
            Ok(StartupPacket::SslRequest) if !ssl_asked => {
                ssl_asked = true;
                let Some(config) = tls.config.clone() else {
                    stream.send(b"N").await?;
                    continue;
                };
                // Bytes sent with the SSLRequest were sent before encryption: a client
                // waits for 'S' first, so they can only be injected (CVE-2021-23214).
                // Those read with it are buffered; those that came since wait in the socket.
                if !input.is_empty() || stream.has_input_now() {
                    return Err(unsupported(
                        "received unencrypted data after SSL request".into(),
                    ));
                }
                stream.send(b"S").await?;
                start_tls(stream, config, &[], shared).await?;
            }
            Ok(StartupPacket::GssEncRequest) if !gss_asked => {
                gss_asked = true;
                stream.send(b"N").await?
            }
            Ok(StartupPacket::SslRequest) | Ok(StartupPacket::GssEncRequest) => {
                return Err(unsupported(
                    "invalid startup packet: duplicate encryption request".into(),
                ))
            }
            Ok(StartupPacket::Cancel { pid, secret }) => {
                let config = shared.pools.config();
                let handled = Box::pin(shared.cancels.cancel(pid, secret, &config)).await;
                shared.metrics.cancel_request(handled);
                return Ok(None);
            }
            Ok(StartupPacket::Startup(s)) => {
                if tls.mode == ClientTlsMode::Require && !stream.is_tls() {
                    return Err(End::Tell(
                        ErrorFields::new(
                            Severity::Fatal,
                            "28000",
                            "pgsluice requires TLS: this connection is not encrypted",
                        )
                        .with_hint("connect with sslmode=require (or verify-ca, verify-full)"),
                    ));
                }
                let login = check_startup(&s, config)?;
                if let Some(max) = over_limit {
                    if !crate::admin::is_console(&login.database) {
                        return Err(too_many_clients(max));
                    }
                }
                // Before authentication, as PostgreSQL does: the client learns at once
                // that the session speaks protocol 3.0.
                if let Some(options) = &login.negotiate {
                    let mut buf = BytesMut::new();
                    messages::negotiate_protocol_version(&mut buf, 0, options.clone());
                    stream.send(&buf).await?;
                }
                let mut login = login;
                authenticate(stream, input, shared, config, &mut login, peer).await?;
                // Whatever authentication wrote must reach the client before we wait.
                stream.flush().await?;
                return Ok(Some(login));
            }
            Err(StartupError::Io(_)) => return Err(End::Quiet),
            Err(e) => {
                return Err(End::Tell(ErrorFields::new(
                    Severity::Fatal,
                    "08P01",
                    format!("invalid startup packet: {e}"),
                )))
            }
        }
    }
}

/// The first byte of a TLS handshake record (a ClientHello).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Runs the TLS handshake with a client; failures are logged and end the connection.
async fn start_tls(
    stream: &mut Stream,
    config: Arc<rustls::ServerConfig>,
    early: &[u8],
    shared: &Shared,
) -> Result<(), End> {
    // Boxed: the handshake's future is large and most logins have none.
    Box::pin(stream.accept_tls(config, early))
        .await
        .map_err(|e| {
            shared.metrics.error(ErrorKind::TlsHandshake);
            tracing::info!(error = %e, "TLS handshake with client failed");
            End::Quiet
        })
}

/// Authenticates the client as `login.user`: refuses an address over `login_rate_limit`,
/// finds the user's secret (the configuration, else `auth_query`), runs the exchange,
/// counts a failure against the address, and keeps what passthrough learned.
async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    input: &mut LoginInput,
    shared: &Arc<Shared>,
    config: &Config,
    login: &mut Login,
    peer: Option<IpAddr>,
) -> Result<(), End> {
    let limit = config.login_rate_limit;
    let blocked =
        || peer.and_then(|ip| Some((ip, shared.login_limiter.blocked(ip, limit, Instant::now())?)));
    let refused = |(ip, wait): (IpAddr, std::time::Duration)| {
        shared.metrics.error(ErrorKind::LoginRateLimited);
        tracing::debug!(address = %ip, "login refused: too many failed logins from this address (login_rate_limit)");
        End::Tell(
            ErrorFields::new(
                Severity::Fatal,
                "53300",
                format!(
                    "too many failed logins from {ip}: try again in {} s",
                    wait.as_secs().max(1)
                ),
            )
            .with_hint(format!(
                "pgsluice allows {limit} failed logins per client address per minute (login_rate_limit)"
            )),
        )
    };
    if let Some(b) = blocked() {
        return Err(refused(b));
    }
    let creds = shared.credentials.load_full();
    let mut secret = creds.get(&login.user);
    if secret.is_none() && config.auth_user.is_some() && !crate::admin::is_console(&login.database)
    {
        // Boxed: a lookup connects to a server, a future of ~3 KiB that would otherwise
        // be part of every login's allocation.
        let (found, outcome) = Box::pin(shared.auth_query.lookup(
            &shared.pools,
            &login.database,
            &login.user,
        ))
        .await;
        shared.metrics.auth_lookup(outcome);
        secret = found.map_err(|e| {
            shared.metrics.error(ErrorKind::AuthLookup);
            tracing::warn!(error = %e, "auth_query lookup failed");
            End::Tell(
                ErrorFields::new(
                    Severity::Fatal,
                    "08006",
                    "pgsluice could not look up the password (auth_query failed)",
                )
                .with_hint("the reason is in pgsluice's log"),
            )
        })?;
    }
    match auth::authenticate(
        stream,
        input,
        &mut login.hello,
        secret.as_deref(),
        creds.default_method(),
        &login.user,
        // Asked again just before the password is checked: logins started together from
        // one address passed the check above before any of them failed.
        &|| blocked().is_none(),
    )
    .await
    {
        Ok(learned) => {
            if let Some(learned) = learned {
                // Taught for the upstream server of the database logged in to.
                if let Some(db) = config.databases.get(&login.database) {
                    let upstream = format!("{}:{}", db.host, db.port);
                    shared.pools.keys.learn(&login.user, &upstream, learned);
                }
            }
            Ok(())
        }
        Err(auth::AuthError::Io(_)) => Err(End::Quiet),
        Err(auth::AuthError::Limited) => match blocked() {
            Some(b) => Err(refused(b)),
            // The window ended in between: a refusal all the same, with the shortest wait.
            None => Err(refused((
                peer.expect("limited only with an address"),
                std::time::Duration::ZERO,
            ))),
        },
        Err(e) => {
            if matches!(
                e,
                auth::AuthError::Failed(_) | auth::AuthError::UnknownUser(_)
            ) {
                if let Some(ip) = peer {
                    if shared.login_limiter.failed(ip, limit, Instant::now()) {
                        tracing::warn!(address = %ip, limit, "too many failed logins from this address: its logins are refused for a minute (login_rate_limit)");
                    }
                }
            }
            Err(End::Tell(ErrorFields::new(
                Severity::Fatal,
                e.sqlstate(),
                e.to_string(),
            )))
        }
    }
}

/// How long a write to a client that may not read (its socket buffer full) may take when the
/// proxy must finish it: a FATAL, the rest of a notice. It must not hold the connection's
/// task, and what it holds, forever.
const CLOSING_WRITE: std::time::Duration = std::time::Duration::from_secs(1);

/// How long a connection over `max_client_conn` has to send its first packet.
const OVER_LIMIT_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// How long a connection over `max_client_conn` has for its whole login (TLS, startup,
/// password): the admin reserve is for an operator's console, whose login takes well under
/// a second, not for logins that stall.
const RESERVE_LOGIN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn too_many_clients(max: usize) -> End {
    End::Tell(too_many_clients_error(max))
}

fn too_many_clients_error(max: usize) -> ErrorFields {
    tracing::warn!(max_client_conn = max, "client refused: too many clients");
    ErrorFields::new(
        Severity::Fatal,
        "53300",
        format!("no more connections allowed (max_client_conn = {max})"),
    )
}

fn unsupported(msg: String) -> End {
    End::Tell(ErrorFields::new(Severity::Fatal, "08P01", msg))
}

/// Checks the startup packet: protocol version, user, database and parameters.
fn check_startup(s: &Startup, config: &Config) -> Result<Login, End> {
    if s.major != 3 {
        return Err(End::Tell(ErrorFields::new(
            Severity::Fatal,
            "0A000",
            format!(
                "unsupported frontend protocol {}.{}: server supports 3.0 to 3.0",
                s.major, s.minor
            ),
        )));
    }
    let user = s.get("user").filter(|u| !u.is_empty()).ok_or_else(|| {
        End::Tell(ErrorFields::new(
            Severity::Fatal,
            "28000",
            "no PostgreSQL user name specified in startup packet",
        ))
    })?;
    let database = s.get("database").filter(|d| !d.is_empty()).unwrap_or(user);
    let mut params = BTreeMap::new();
    let mut pq_options = Vec::new();
    let tracked = |name: &str| {
        TRACKED_PARAMETERS.contains(&name)
            || config
                .track_extra_parameters
                .iter()
                .any(|p| p.eq_ignore_ascii_case(name))
    };
    let ignored = |name: &str| {
        config
            .ignore_startup_parameters
            .iter()
            .any(|p| p.eq_ignore_ascii_case(name))
    };
    for (name, value) in &s.params {
        let lower = name.to_ascii_lowercase();
        match lower.as_str() {
            "user" | "database" => {}
            "replication" => return Err(unsupported("replication connections are not supported by pgsluice".into())),
            "options" => {
                let settings = startup::parse_options(value).map_err(|w| {
                    unsupported(format!("unsupported options startup parameter {w:?}: only '-c name=value' and '--name=value' are allowed"))
                })?;
                for (k, v) in settings {
                    if socket_setting(&k) {
                        // About the socket to pgsluice, whose own keepalive settings rule it
                        // (another pgsluice in front asks this of its servers).
                        continue;
                    }
                    if tracked(&k) {
                        params.insert(k, v);
                    } else if !ignored(&k) {
                        return Err(unsupported(format!("unsupported startup parameter in options: {k}")));
                    }
                }
            }
            n if n.starts_with("_pq_.") => pq_options.push(name.clone()),
            n if tracked(n) => {
                params.insert(lower, value.clone());
            }
            n if ignored(n) => {}
            _ => {
                return Err(End::Tell(
                    ErrorFields::new(Severity::Fatal, "08P01", format!("unsupported startup parameter: {name}"))
                        .with_hint("add it to track_extra_parameters or ignore_startup_parameters in the pgsluice configuration"),
                ))
            }
        }
    }
    let negotiate = (s.minor > 0 || !pq_options.is_empty()).then_some(pq_options);
    Ok(Login {
        user: user.to_owned(),
        database: database.to_owned(),
        params,
        negotiate,
        hello: BytesMut::new(),
    })
}

/// A setting in a client's `options` about its TCP connection (`tcp_keepalives_idle` and
/// its kin, `tcp_user_timeout`): accepted and dropped.
fn socket_setting(name: &str) -> bool {
    // parse_options gives names in lower case.
    name.starts_with("tcp_keepalives_") || name == "tcp_user_timeout"
}

/// Finishes login: AuthenticationOk, the server's parameters (with the client's own values
/// for the ones it set), our BackendKeyData, ReadyForQuery.
async fn welcome(
    stream: &mut Stream,
    shared: &Arc<Shared>,
    config: &Config,
    pool: PoolId,
    login: &Login,
    pid: i32,
    secret: i32,
) -> Result<(), ErrorFields> {
    let params = match shared.pools.server_params(pool) {
        Some(p) => p,
        None => {
            // The first client of a pool waits for a server, so that it sees real
            // parameters and hears at once if the server cannot be reached.
            let checkout = shared
                .pools
                .checkout(
                    pool,
                    config.query_wait_timeout,
                    &Default::default(),
                    Instant::now(),
                )
                .await
                .map_err(|e| {
                    let m = shared.metrics.pool(pool, &login.database, &login.user);
                    count_pool_error(shared, &m, None, &e);
                    pool_error(&e, Severity::Fatal)
                })?;
            checkout.release();
            shared.pools.server_params(pool).unwrap_or_default()
        }
    };
    let mut buf = BytesMut::with_capacity(login.hello.len() + 512);
    buf.extend_from_slice(&login.hello);
    messages::auth_ok(&mut buf);
    params.write(&login.params, &mut buf);
    messages::backend_key_data(&mut buf, pid, secret);
    messages::ready_for_query(&mut buf, TransactionStatus::Idle);
    stream
        .send(&buf)
        .await
        .map_err(|e| ErrorFields::new(Severity::Fatal, "08006", e.to_string()))
}

/// What a client is told when pgsluice closes it to shut down.
fn shutting_down() -> ErrorFields {
    ErrorFields::new(
        Severity::Fatal,
        "57P01",
        "terminating connection because pgsluice is shutting down",
    )
    .with_hint("reconnect: another instance, or this one once restarted, will serve you")
}

/// A query the proxy ran on a server itself got no answer within `setting`.
fn no_answer(setting: &str) -> crate::server::ServerError {
    crate::server::ServerError::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("the server did not answer within {setting}"),
    ))
}

/// What a client leaving because its database or user left the configuration is told.
fn removed_error() -> ErrorFields {
    ErrorFields::new(
        Severity::Fatal,
        "57P01",
        "terminating connection because its database or user was removed from the pgsluice configuration",
    )
    .with_hint("the configuration was reloaded without this database or user")
}

/// The error a client gets when no server could be had.
fn pool_error(e: &PoolError, severity: Severity) -> ErrorFields {
    match e {
        PoolError::WaitTimeout(_) => ErrorFields::new(severity, "53300", e.to_string())
            .with_hint("all server connections of this pool stayed busy; raise pool_size or query_wait_timeout, or shorten transactions"),
        PoolError::Server(ServerError::Rejected(f)) => {
            let mut f = f.clone();
            f.severity = severity.as_str().to_owned();
            f.message = format!("pgsluice could not log in to the server: {}", f.message);
            f
        }
        PoolError::Server(se) => ErrorFields::new(severity, "08006", format!("pgsluice could not connect to the server: {se}")),
        PoolError::BudgetUnknown { .. } => ErrorFields::new(severity, "08006", format!("pgsluice: {e}"))
            .with_hint("pgsluice reads max_connections before it opens server connections; check that the server is reachable, or set budget.fallback"),
        PoolError::Removed => removed_error(),
    }
}

/// A logged-in client.
struct Session {
    client: ClientConn,
    shared: Arc<Shared>,
    /// Its [`PoolId`], in 4 bytes beside `mode` and `park_early` (see [`Session::pool`]):
    /// every byte of a session is kept by every idle client.
    pool: u32,
    mode: PoolMode,
    /// Tracked parameters as the client's startup packet set them (RESET ALL returns here);
    /// shared with the clients that sent the same.
    startup_params: SessionParams,
    /// Tracked parameters the client wants on every server it gets (copied when changed).
    params: SessionParams,
    cancel: crate::cancel::CancelHandle,
    /// Metric handles of this client's pool and application.
    meter: Arc<Meter>,
    /// This client's entry in the registry (SHOW CLIENTS, gauges); removed on drop.
    registration: Registration,
    /// Where this client's grants arrive when it queues for a server (made at its first wait).
    wait_cell: Option<Arc<WaitCell>>,
    /// `query_timeout` and `idle_transaction_timeout`, as of configuration `timeouts.0`.
    timeouts: (u64, relay::Timeouts),
    /// The client's tracing span (peer, user, database), entered on the rare paths.
    span: tracing::Span,
    /// The client's place under `max_client_conn`, given back when the session drops.
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Park straight after the next transaction, without waiting for the sweep: set at
    /// login and when the client comes back from a long idle stretch. Such a client (an
    /// app pool's connection checked once and put back, a worker that runs a query now and
    /// then) is likely to sit idle again, and its serving future's room is then given back at once
    /// instead of a second or two later. A client whose next request follows quickly keeps
    /// its serving future (see [`Phase::Parked`]).
    park_early: bool,
    /// Servers in a row that were lost while the client's parameters were set on them,
    /// before anything of the client's ran (see [`Session::apply_params`]).
    servers_lost: u8,
    /// Application labels this client may still add to the metrics' table (see
    /// [`crate::metrics::NEW_LABELS_PER_CLIENT`]).
    new_labels: u8,
}

/// How [`Session::run`] ended without an error.
enum Ran {
    /// The client left (Terminate, or closed its end).
    Left,
    /// The client sat idle long enough to be asked to park.
    Park,
}

/// What [`Session::next_request`] found.
enum Next {
    /// The first message of a request is here.
    Request,
    /// The client left.
    Left,
    /// The client was asked to park (nothing of a request has arrived).
    Park,
}

/// Why a wait for a server ended without one.
enum NotServed {
    Cancelled,
    /// Boxed: a rare outcome, which would otherwise size every wait for a server.
    Failed(Box<PoolError>),
    /// Draining: the client leaves instead of waiting.
    Drained,
}

impl Session {
    fn pool(&self) -> PoolId {
        self.pool as PoolId
    }

    async fn run(&mut self) -> Result<Ran, String> {
        // query_wait_timeout, read again after a reload (a busy client may never park, and
        // so never come back here).
        let mut generation = self.shared.pools.generation();
        let mut wait = self.shared.pools.config().query_wait_timeout;
        loop {
            self.registration.client.set_idle();
            // Hold no server until a whole first message of a transaction is here.
            let e = match self.next_request().await {
                Ok(Next::Request) => None,
                Ok(Next::Left) => return Ok(Ran::Left),
                Ok(Next::Park) => {
                    // A parked client keeps no grant cell: it is made again at its next wait.
                    self.wait_cell = None;
                    return Ok(Ran::Park);
                }
                Err(End::Quiet) => return Err("client connection lost".into()),
                Err(End::Tell(e)) => Some(Box::new(e)),
            };
            if let Some(e) = e {
                fatal(&mut self.client.stream, &e).await;
                return Err(e.message);
            }
            if self.shared.pools.generation() != generation {
                generation = self.shared.pools.generation();
                wait = self.shared.pools.config().query_wait_timeout;
            }
            let (checkout, got_at) = match self.wait_for_server(wait).await {
                None => return Ok(Ran::Left), // the client left while queued
                Some(Ok(got)) => {
                    self.cancel.idle();
                    got
                }
                Some(Err(not_served)) => {
                    self.cancel.idle();
                    let span = self.span.clone();
                    Box::pin(self.not_served(not_served).instrument(span)).await?;
                    continue;
                }
            };
            if let Some(end) = self.serve_transaction(checkout, got_at).await {
                return end.map(|()| Ran::Left);
            }
            if self.park_early && self.client.buf.is_empty() {
                self.park_early = false;
                self.registration.client.set_idle();
                return Ok(Ran::Park);
            }
        }
    }

    /// One transaction on the checked-out server: the relay, then what its outcome asks
    /// for. `Some` when the client's session ends.
    ///
    /// Only the relay waits on this path; what a rare outcome does (read back parameters,
    /// clean a server up, tell the client) runs in [`Session::after`], boxed, so that every
    /// client's task does not carry that room.
    async fn serve_transaction(
        &mut self,
        mut checkout: Checkout,
        got_at: u64,
    ) -> Option<Result<(), String>> {
        // The server's session parameters usually match the client's already.
        // The usual case is decided by pointer: clients with equal login sets share one, and
        // a server keeps the set it was last given.
        let server = checkout.server();
        if !Arc::ptr_eq(&self.params, &server.session) {
            if self.params == server.session {
                // Equal sets in two allocations: from now on one, compared by pointer.
                server.session = self.params.clone();
            } else {
                let span = self.span.clone();
                match Box::pin(self.apply_params(&mut checkout).instrument(span)).await {
                    Ok(true) => {}
                    // The server died first: it is closed, and the run loop finds the same
                    // request still buffered and waits for another server.
                    Ok(false) => return None,
                    Err(e) => return Some(Err(e)),
                }
            }
        }
        self.cancel.serving(checkout.server().key);
        let generation = self.shared.pools.generation();
        if self.timeouts.0 != generation {
            let config = self.shared.pools.config();
            self.timeouts = (
                generation,
                relay::Timeouts {
                    query: config.query_timeout,
                    idle_transaction: config.idle_transaction_timeout,
                },
            );
        }
        let transaction_mode = self.mode == PoolMode::Transaction;
        let counts = TxnCounts::starting(self.meter.clone(), got_at);
        let mut txn = match checkout.server().txn.take() {
            Some(mut txn) => {
                txn.reset(transaction_mode, counts, self.timeouts.1);
                txn
            }
            None => {
                let mut txn = Box::new(Txn::new(transaction_mode));
                txn.counts = counts;
                txn.timeouts = self.timeouts.1;
                txn
            }
        };
        let outcome = relay::transaction(
            &mut self.client,
            checkout.server(),
            &mut txn,
            Watch::client(&self.shared.stop, &self.registration.client),
        )
        .await;
        txn.counts.finish();
        if txn.read_only_error {
            checkout.read_only_error();
        }
        if txn.stats != relay::StatementStats::default() {
            let (p, s) = (&self.meter.pool, txn.stats);
            p.client_parses.inc_by(s.client_parses.into());
            p.server_parses.inc_by(s.server_parses.into());
            p.parse_hits.inc_by(s.parse_hits.into());
            p.evictions.inc_by(s.evictions.into());
            p.binds.inc_by(s.binds.into());
        }
        let no_cancel_pending = self.cancel.idle();
        // Session state that could not be named (see `SessionEffects::unknown`) stays on
        // the server: in transaction mode no other client may get it.
        let in_doubt = txn.server_in_doubt || transaction_mode && txn.effects.unknown;
        let ended = txn.counts.ended;
        let effects = std::mem::take(&mut txn.effects);
        // Back to the server, without this client's metric handles.
        txn.counts.detach();
        checkout.server().txn = Some(txn);
        match outcome {
            // A cancel may still hit it, or it said something that retires it: close it.
            Outcome::Done if !no_cancel_pending || in_doubt => {
                if no_cancel_pending && !effects.is_empty() {
                    // Retired, but what the client set must follow it to its next server.
                    let span = self.span.clone();
                    Box::pin(self.read_back(checkout, effects).instrument(span)).await;
                } else {
                    drop(checkout);
                }
                None
            }
            Outcome::Done if effects.is_empty() => {
                checkout.release_at(ended);
                None
            }
            outcome => {
                let span = self.span.clone();
                Box::pin(
                    self.after(checkout, outcome, effects, no_cancel_pending)
                        .instrument(span),
                )
                .await
            }
        }
    }

    /// Reads back the parameters a transaction changed (`SET`) from a server about to be
    /// closed, for the client's next server; bounded by `server_cleanup_timeout`. (With a
    /// cancel still on its way the server is closed unread: the client's `SET` is lost then.)
    async fn read_back(&mut self, mut checkout: Checkout, effects: SessionEffects) {
        let within = self.shared.pools.config().server_cleanup_timeout;
        let read = tokio::time::timeout(within, self.refresh_params(checkout.server(), &effects));
        if !matches!(read.await, Ok(Ok(()))) {
            tracing::warn!("could not read back session parameters from a server being closed");
        }
        self.sync_application();
    }

    /// Sets the client's parameters on its server. `Ok(false)`: the server was lost (it had
    /// died in the pool, say, its reset not yet seen), before anything of the client's ran:
    /// the caller drops it and the request goes to another server, up to three times in a
    /// row. Otherwise a failure is told to the client and ends the session: 08006 for a
    /// server lost again, 08P01 for anything else.
    async fn apply_params(&mut self, checkout: &mut Checkout) -> Result<bool, String> {
        // A server that does not answer (a failover that drops packets) is taken for lost.
        let within = self.shared.pools.config().server_connect_timeout;
        let synced = tokio::time::timeout(within, sync_params(&self.params, checkout.server()))
            .await
            .unwrap_or_else(|_| Err(no_answer("server_connect_timeout")));
        let Err(e) = synced else {
            self.servers_lost = 0;
            return Ok(true);
        };
        let lost = matches!(e, crate::server::ServerError::Io(_));
        if lost && self.servers_lost < 2 {
            self.servers_lost += 1;
            tracing::info!(error = %e, "server lost before the client's request ran: trying another");
            return Ok(false);
        }
        let code = if lost { "08006" } else { "08P01" };
        let e = ErrorFields::new(
            Severity::Fatal,
            code,
            format!("pgsluice could not apply the client's parameters: {e}"),
        );
        fatal(&mut self.client.stream, &e).await;
        Err(e.message)
    }

    /// The client got no server: a cancel while queued or a pool error is answered and the
    /// session goes on (`Ok`); draining ends it.
    async fn not_served(&mut self, why: NotServed) -> Result<(), String> {
        match why {
            NotServed::Drained => {
                let e = self.leaving_error();
                fatal(&mut self.client.stream, &e).await;
                return Err(e.message);
            }
            NotServed::Cancelled => {
                let e = ErrorFields::new(
                    Severity::Error,
                    "57014",
                    "canceling statement due to user request",
                )
                .with_hint("the statement was cancelled while waiting for a server connection");
                self.refuse_request(&e).await?;
            }
            NotServed::Failed(e) if matches!(*e, PoolError::Removed) => {
                let e = removed_error();
                fatal(&mut self.client.stream, &e).await;
                return Err(e.message);
            }
            NotServed::Failed(e) => {
                count_pool_error(&self.shared, &self.meter.pool, Some(&self.meter.app), &e);
                tracing::info!(error = %e, "no server for client");
                self.refuse_request(&pool_error(&e, Severity::Error))
                    .await?;
            }
        }
        Ok(())
    }

    /// What a transaction's outcome asks for when it is not a clean return of the server:
    /// read back the parameters it changed, or clean the server up and end the session.
    async fn after(
        &mut self,
        mut checkout: Checkout,
        outcome: Outcome,
        effects: SessionEffects,
        no_cancel_pending: bool,
    ) -> Option<Result<(), String>> {
        // A transaction that changed session parameters and did not end cleanly leaves the
        // proxy's record of its server's parameters unknown: the server is closed rather than
        // given to a client that would inherit them (session mode resets every parameter).
        let params_known = effects.is_empty() || self.mode == PoolMode::Session;
        // A cancel may still hit the server: it cannot be cleaned up and reused.
        let unless_cancelled = |left| {
            if no_cancel_pending {
                left
            } else {
                Leftover::Busy
            }
        };
        match outcome {
            Outcome::Done => {
                let within = self.shared.pools.config().server_cleanup_timeout;
                let read_back =
                    tokio::time::timeout(within, self.refresh_params(checkout.server(), &effects))
                        .await
                        .unwrap_or_else(|_| Err(no_answer("server_cleanup_timeout")));
                if let Err(e) = read_back {
                    tracing::warn!(error = %e, "could not read back session parameters; closing that server");
                    drop(checkout);
                    return None;
                }
                self.sync_application();
                checkout.release();
                None
            }
            Outcome::ClientGone(left) => {
                self.leave(checkout, unless_cancelled(left), params_known)
                    .await;
                Some(Ok(()))
            }
            Outcome::ClientError { error, left, tell } => {
                self.shared
                    .metrics
                    .error(ErrorKind::of_client_error(&error.code));
                self.close_with(&error, tell).await;
                self.leave(checkout, unless_cancelled(left), params_known)
                    .await;
                Some(Err(error.message))
            }
            Outcome::Drained => {
                self.leave(checkout, unless_cancelled(Leftover::Clean), params_known)
                    .await;
                let e = self.leaving_error();
                fatal(&mut self.client.stream, &e).await;
                Some(Err(e.message))
            }
            Outcome::TimedOut { error, left, tell } => {
                self.shared
                    .metrics
                    .error(ErrorKind::of_client_error(&error.code));
                tracing::info!(error = %error.message, "client closed at a timeout");
                self.close_with(&error, tell).await;
                self.leave(checkout, unless_cancelled(left), params_known)
                    .await;
                Some(Err(error.message))
            }
            Outcome::Aborted { left, tell } => {
                let e = ErrorFields::new(Severity::Fatal, "57P01", "terminating connection because pgsluice is shutting down and shutdown_timeout passed")
                    .with_hint("the transaction was cancelled and rolled back; reconnect and retry");
                self.close_with(&e, tell).await;
                let left = if left == Leftover::Clean {
                    unless_cancelled(left)
                } else {
                    Leftover::Busy
                };
                self.leave(checkout, left, params_known).await;
                Some(Err(e.message))
            }
            Outcome::ServerGone {
                why,
                between_messages,
            } => {
                self.shared.metrics.error(ErrorKind::ServerLost);
                let e = ErrorFields::new(
                    Severity::Fatal,
                    "08006",
                    "pgsluice: the server connection closed unexpectedly",
                )
                .with_hint(
                    "the server may have restarted or terminated the session; reconnect and retry",
                );
                if between_messages {
                    fatal(&mut self.client.stream, &e).await;
                } else {
                    // Cut inside a large message: an ErrorResponse now would be read as
                    // its rest. Closing tells the client as plainly.
                    let _ = self.client.stream.shutdown().await;
                }
                drop(checkout);
                Some(Err(format!("server connection lost: {why}")))
            }
        }
    }

    /// Why a client leaves at a transaction boundary: a reload removed its database or
    /// user, or pgsluice is draining.
    fn leaving_error(&self) -> ErrorFields {
        if self
            .registration
            .client
            .removed
            .load(std::sync::atomic::Ordering::Acquire)
        {
            removed_error()
        } else {
            shutting_down()
        }
    }

    /// Closes the client with a FATAL `e` when it stands between two messages (`tell`);
    /// cut inside one, an ErrorResponse would be read as its rest, so the connection is
    /// only shut.
    async fn close_with(&mut self, e: &ErrorFields, tell: bool) {
        if tell {
            fatal(&mut self.client.stream, e).await;
        } else {
            let _ = tokio::time::timeout(CLOSING_WRITE, self.client.stream.shutdown()).await;
        }
    }

    fn observe_wait(&self, waited: std::time::Duration) {
        let waited = waited.as_secs_f64();
        self.meter.pool.client_wait.observe(waited);
        self.meter.app.wait.observe(waited);
    }

    /// A server was checked out after waiting `waited`.
    fn got(&self, mut c: Checkout, waited: std::time::Duration) -> Checkout {
        self.observe_wait(waited);
        self.meter.pool.server_assignments.inc();
        let s = c.server();
        // Made at the server's first checkout, then shared by each client it serves.
        let link = s.link.get_or_insert_with(|| {
            Arc::new(ServerLink {
                id: s.id,
                addr: s.key.addr,
                local: None,
                pid: s.key.pid,
                connect_time: s.connected,
            })
        });
        self.registration.client.set_active(link.clone());
        c
    }

    /// Waits for a server. Meanwhile watches the client: a cancel takes it out of the queue,
    /// and a client that hangs up stops waiting (`None`) instead of running a dead request.
    /// With the server comes the time it was got, a [`crate::clock`] stamp: the transaction
    /// starts then (one clock read serves the request time, the wait and the transaction's
    /// duration).
    async fn wait_for_server(
        &mut self,
        wait: std::time::Duration,
    ) -> Option<Result<(Checkout, u64), NotServed>> {
        if let Some(c) = self.shared.pools.try_idle(self.pool()) {
            // No wait: the wait observed is zero.
            let now = crate::clock::stamp_now();
            self.registration.client.set_request_time(now);
            return Some(Ok((self.got(c, std::time::Duration::ZERO), now)));
        }
        let began = Instant::now();
        // Not boxed, though it is the largest state of a session (792 bytes, carried by
        // every client's task idle or not): boxed, the task's cell was 768 bytes instead of
        // 1,280 (2.09 against 2.55 KiB per idle client), but each queued transaction paid a
        // `malloc`, a `free` and a copy of the future, +345 instructions per select at 100
        // clients (glibc's tcache keeps 7 blocks of a size; 100 clients queue at once).
        self.wait_queued(wait, began).await
    }

    /// [`Session::wait_for_server`] when no idle server is there: queue, open one, or wait.
    async fn wait_queued(
        &mut self,
        wait: std::time::Duration,
        began: Instant,
    ) -> Option<Result<(Checkout, u64), NotServed>> {
        // The wait is measured in stamps; the pool's queue keeps the Instant (deadlines).
        let began_at = crate::clock::stamp(began);
        self.registration.client.set_waiting(began_at);
        let shared = self.shared.clone();
        let cell = self.wait_cell.get_or_insert_with(Arc::default).clone();
        let pool = self.pool();
        // Cancel safety: dropping the checkout future leaves the queue and returns any grant.
        // Its error is boxed: a rare outcome, which would otherwise size every queued wait.
        let checkout = async {
            shared
                .pools
                .checkout(pool, wait, &cell, began)
                .await
                .map_err(Box::new)
        };
        // Pinned here and lent: an async fn keeps its arguments beside its locals, so a
        // future passed by value would be held twice.
        let checkout = std::pin::pin!(checkout);
        self.queued(checkout, &cell, wait, began_at).await
    }

    /// The queued wait of [`Session::wait_queued`]: `checkout` against a cancel, a drain and
    /// the client hanging up; tells the client why it waits when it has waited long.
    async fn queued(
        &mut self,
        mut checkout: std::pin::Pin<
            &mut (dyn std::future::Future<Output = Result<Checkout, Box<PoolError>>> + Send + '_),
        >,
        cell: &WaitCell,
        wait: std::time::Duration,
        began_at: u64,
    ) -> Option<Result<(Checkout, u64), NotServed>> {
        self.client.shrink_while_queued();
        let cancelled = self.cancel.cancelled_while_queued();
        tokio::pin!(cancelled);
        // PgBouncer's query_wait_notify: tell a client queued this long why it waits (the
        // pools' sweeper flags the cell; nothing is armed per wait). Written as the socket
        // takes it, never awaited: a client that does not read still gets its grant, its
        // timeout, a cancel or the drain.
        let mut notified = false;
        let mut notice: Option<Box<Notice>> = None;
        let watch = Watch::client(&self.shared.stop, &self.registration.client);
        let result = loop {
            let room = self.client.buf.len() < relay::HIGH_WATER;
            // Biased, in this order: no random start per poll, and a grant that comes with
            // a cancel or a drain is taken (the request runs; a cancel is best-effort).
            tokio::select! {
                biased;
                r = checkout.as_mut() => {
                    let now = crate::clock::stamp_now();
                    let waited = crate::clock::between(began_at, now);
                    break match r {
                        Ok(c) => Ok((self.got(c, waited), now)),
                        Err(e) => {
                            self.observe_wait(waited);
                            Err(NotServed::Failed(e))
                        }
                    };
                }
                _ = &mut cancelled => break Err(NotServed::Cancelled),
                _ = watch.draining() => break Err(NotServed::Drained),
                _ = cell.notice_due(), if !notified => {
                    notified = true;
                    let pool = &self.meter.pool;
                    let paused = self.shared.pools.is_paused(Some(&pool.database));
                    let n = notice.insert(Box::new(Notice::queued(&pool.database, &pool.user, wait, paused)));
                    if n.write(&mut self.client.stream).ok()? {
                        notice = None;
                    }
                }
                r = self.client.stream.writable(), if notice.is_some() => {
                    r.ok()?;
                    if notice.as_mut().expect("pending").write(&mut self.client.stream).ok()? {
                        notice = None;
                    }
                }
                r = self.client.stream.readable(), if room => {
                    r.ok()?;
                    match self.client.read_some() {
                        Ok(0) => return None,
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => return None,
                    }
                }
            }
        };
        // A notice the socket took part of is finished before anything else reaches the
        // client (one not begun is dropped). Bounded: a client that takes not even that
        // within a second is closed, as for a FATAL, and a server it was granted goes back.
        if let Some(n) = notice.filter(|n| n.begun) {
            let rest = tokio::time::timeout(CLOSING_WRITE, self.client.stream.send(&n.buf));
            if !matches!(Box::pin(rest).await, Ok(Ok(()))) {
                if let Ok((c, _)) = result {
                    c.release();
                }
                return None;
            }
        }
        Some(result)
    }

    /// Waits for the first message of the next request; answers a lone Sync, drops Flush
    /// and stray COPY messages. [`Next::Left`] when the client left.
    async fn next_request(&mut self) -> Result<Next, End> {
        loop {
            // Draining: this is the client's transaction boundary.
            if self.shared.stop.is_draining() {
                return Err(End::Tell(shutting_down()));
            }
            if self.shared.pools.is_removed(self.pool()) {
                return Err(End::Tell(removed_error()));
            }
            match self.client.peek().map_err(End::Tell)? {
                Peek::Ready(frontend::PARSE) if self.mode == PoolMode::Transaction => {
                    match self.client.answer_parse() {
                        Some(reply) => self.client.stream.send(&reply).await?,
                        None => return Ok(Next::Request),
                    }
                }
                Peek::Ready(_) => return Ok(Next::Request),
                Peek::Terminate => return Ok(Next::Left),
                Peek::Local(tag, total) => {
                    self.client.discard(total);
                    if tag == frontend::SYNC {
                        let mut buf = BytesMut::new();
                        messages::ready_for_query(&mut buf, TransactionStatus::Idle);
                        self.client.stream.send(&buf).await?;
                    }
                }
                Peek::NeedMore => {
                    let watch = Watch::client(&self.shared.stop, &self.registration.client);
                    // The drain and the registry's sweep (asking a client that has sat idle
                    // a while to park) wake the same waker slot: one poll checks both.
                    let client = &self.registration.client;
                    let stop = std::future::poll_fn(|cx| match watch.poll_draining(cx) {
                        std::task::Poll::Ready(()) => std::task::Poll::Ready(true),
                        std::task::Poll::Pending if client.asked_to_park() => {
                            std::task::Poll::Ready(false)
                        }
                        std::task::Poll::Pending => std::task::Poll::Pending,
                    });
                    tokio::select! {
                        biased;
                        more = self.client.read_more() => {
                            if !more.unwrap_or(false) {
                                return Ok(Next::Left);
                            }
                        }
                        // Cancel safety: read_more loses nothing when dropped before it reads;
                        // a partial request stays in the buffer of a parked client.
                        draining = stop => return if draining {
                            Err(End::Tell(self.leaving_error()))
                        } else {
                            Ok(Next::Park)
                        },
                    }
                }
            }
        }
    }

    /// Answers the pending request with an error instead of running it.
    ///
    /// As PostgreSQL answers a failed extended-protocol batch: the error at once, then what
    /// the client sends up to the Sync that ends the batch is dropped, then ReadyForQuery.
    /// A pipeline that ends with a Flush reads the error before it sends that Sync.
    async fn refuse_request(&mut self, e: &ErrorFields) -> Result<(), String> {
        let mut buf = BytesMut::new();
        e.encode(&mut buf);
        self.client
            .stream
            .send(&buf)
            .await
            .map_err(|e| e.to_string())?;
        self.registration.client.set_idle();
        loop {
            match self.client.skip_request() {
                Ok(true) => break,
                Ok(false) => {
                    let watch = Watch::client(&self.shared.stop, &self.registration.client);
                    tokio::select! {
                        biased;
                        more = self.client.read_more() => {
                            if !more.unwrap_or(false) {
                                return Err("client left while waiting".into());
                            }
                        }
                        _ = watch.draining() => {
                            let e = self.leaving_error();
                            fatal(&mut self.client.stream, &e).await;
                            return Err(e.message);
                        }
                    }
                }
                Err(e) => {
                    fatal(&mut self.client.stream, &e).await;
                    return Err(e.message);
                }
            }
        }
        let mut buf = BytesMut::new();
        messages::ready_for_query(&mut buf, TransactionStatus::Idle);
        self.client
            .stream
            .send(&buf)
            .await
            .map_err(|e| e.to_string())
    }

    /// The client left: clean its server up and return it, or close it. `params_known`:
    /// the proxy knows the server's session parameters (else it closes the server, which
    /// also rolls back what it was in).
    async fn leave(&mut self, mut checkout: Checkout, left: Leftover, params_known: bool) {
        let timeout = self.shared.pools.config().server_cleanup_timeout;
        if left == Leftover::Busy {
            // Stop the work the client started before the server is closed. Bounded: the
            // server's host may not answer at all (a failover that drops packets).
            let cancel =
                tokio::time::timeout(timeout, crate::server::send_cancel(checkout.server().key));
            match cancel.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "could not cancel the query of a client that left")
                }
                Err(_) => tracing::warn!(
                    "could not cancel the query of a client that left: no answer within server_cleanup_timeout"
                ),
            }
            return; // dropping the checkout closes the server
        }
        if !params_known {
            return;
        }
        let server = checkout.server();
        let clean = tokio::time::timeout(timeout, async {
            if !relay::clean_up(server, left).await {
                return false;
            }
            if self.mode == PoolMode::Session {
                let reset = self.shared.pools.config().server_reset_query.clone();
                if !reset.is_empty() && server.simple_query(&reset).await.is_err() {
                    return false;
                }
                // The reset returned every parameter to its default.
                server.session = self.shared.param_sets.empty();
            }
            true
        })
        .await
        .unwrap_or(false);
        if clean {
            checkout.release();
        }
    }

    /// After `SET application_name`: moves the client's figures to its new application.
    fn sync_application(&mut self) {
        let name = self
            .params
            .get("application_name")
            .cloned()
            .unwrap_or_default();
        let entry = &self.registration.client;
        if entry.app().name == name {
            return;
        }
        let metrics =
            self.shared
                .metrics
                .app(&entry.database, &entry.user, &name, &mut self.new_labels);
        entry.set_app(AppSlot {
            name,
            metrics: metrics.clone(),
        });
        self.meter = Arc::new(Meter {
            pool: self.meter.pool.clone(),
            app: metrics,
            client: entry.clone(),
        });
    }

    /// After a transaction that changed session parameters: reads their values back from the
    /// server, so the client keeps them on its next server and this server's record is right.
    async fn refresh_params(
        &mut self,
        server: &mut ServerConn,
        effects: &SessionEffects,
    ) -> Result<(), ServerError> {
        let mut touched = std::borrow::Cow::Borrowed(&effects.touched);
        if effects.reset_all {
            self.params = self.startup_params.clone();
            server.session = self.shared.param_sets.empty();
            // RESET ALL and DISCARD ALL leave the role as it was (PostgreSQL marks it
            // GUC_NO_RESET_ALL): read it back, or the next client would inherit a SET ROLE.
            if !touched.iter().any(|n| n == "role") {
                touched.to_mut().push("role".to_owned());
            }
        }
        if touched.is_empty() {
            self.note_params();
            return Ok(());
        }
        let columns: Vec<String> = touched
            .iter()
            .map(|n| format!("pg_catalog.current_setting({}, true)", quote_literal(n)))
            .collect();
        let rows = server
            .simple_query(&format!("SELECT {}", columns.join(", ")))
            .await?;
        let row = rows.into_iter().next().unwrap_or_default();
        for (name, value) in touched.iter().zip(row) {
            // No role set reads as `none`: the same as no setting at all.
            let value = value.filter(|v| !(name == "role" && v == "none"));
            // `RESET name` took the server to its own default; the client goes back to its
            // startup value, as with a server of its own. (Unless the RESET did not stick:
            // rolled back, the server still has what it had before.)
            let client_value = match self.startup_params.get(name) {
                Some(start)
                    if effects.reset.contains(name)
                        && value.as_ref() != server.session.get(name) =>
                {
                    Some(start.clone())
                }
                _ => value.clone(),
            };
            match client_value {
                Some(v) => Arc::make_mut(&mut self.params).insert(name.clone(), v),
                None => Arc::make_mut(&mut self.params).remove(name),
            };
            match value {
                Some(v) => Arc::make_mut(&mut server.session).insert(name.clone(), v),
                None => Arc::make_mut(&mut server.session).remove(name),
            };
        }
        self.note_params();
        Ok(())
    }

    /// After the client's parameters changed: what the relay needs to know of them.
    fn note_params(&mut self) {
        self.client.escape_strings = self
            .params
            .get("standard_conforming_strings")
            .is_some_and(|v| v.eq_ignore_ascii_case("off"));
    }
}

/// PgBouncer's query_wait_notify: a NOTICE telling a client queued long why it waits, and
/// how much of it the client's socket has taken.
struct Notice {
    /// What is left to write.
    buf: BytesMut,
    /// Some of it was written: the rest must follow before any other message.
    begun: bool,
}

impl Notice {
    fn queued(database: &str, user: &str, wait: std::time::Duration, paused: bool) -> Notice {
        let why = if paused {
            format!("database {database} is paused (PAUSE on the admin console)")
        } else {
            format!("every server connection of pool {database}/{user} is busy")
        };
        let mut buf = BytesMut::new();
        ErrorFields {
            severity: "NOTICE".into(),
            code: "00000".into(),
            message: "No server connection available in postgres backend, client being queued"
                .into(),
            detail: Some(format!(
                "pgsluice: {why}; waiting up to query_wait_timeout ({}s)",
                wait.as_secs_f64()
            )),
            hint: None,
        }
        .encode_notice(&mut buf);
        Notice { buf, begun: false }
    }

    /// Writes what the socket takes now; true once all of it is written.
    fn write(&mut self, stream: &mut Stream) -> std::io::Result<bool> {
        while !self.buf.is_empty() {
            match stream.try_write(&self.buf) {
                Ok(n) => {
                    bytes::Buf::advance(&mut self.buf, n);
                    self.begun = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

/// Makes the server's session parameters the client's: one round trip, only when they differ.
async fn sync_params(params: &SessionParams, server: &mut ServerConn) -> Result<(), ServerError> {
    // set_config parses a value as the config file does, so list values such as
    // `a, "$user"` round-trip (SET would take one quoted string as a single element).
    let sets: Vec<String> = params
        .iter()
        .filter(|(name, value)| server.session.get(*name) != Some(*value))
        .map(|(name, value)| {
            format!(
                "pg_catalog.set_config({}, {}, false)",
                quote_literal(name),
                quote_literal(value)
            )
        })
        .collect();
    let mut sql = if sets.is_empty() {
        String::new()
    } else {
        format!("SELECT {};", sets.join(", "))
    };
    for name in server.session.keys() {
        if !params.contains_key(name) {
            sql.push_str(&format!("RESET {};", quote_ident(name)));
        }
    }
    server.simple_query(&sql).await?;
    server.session = params.clone();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The queued notice is written only as the socket takes it: on a full socket nothing
    /// is written (and it may be dropped), and once the peer reads, all of it follows.
    #[tokio::test(flavor = "current_thread")]
    async fn a_notice_waits_for_room_without_blocking() {
        use std::io::Read;
        let (a, mut peer) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let sock = crate::socket::Socket::from(tokio::net::UnixStream::from_std(a).unwrap());
        let mut stream = Stream::from(sock);
        let mut filled = 0;
        loop {
            match stream.try_write(&[b'x'; 4096]) {
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        let mut n = Notice::queued("db", "app", std::time::Duration::from_secs(120), false);
        let whole = n.buf.clone();
        assert!(
            !n.write(&mut stream).unwrap(),
            "a full socket takes none of it"
        );
        assert!(!n.begun && n.buf == whole, "nothing written, nothing lost");
        let mut junk = vec![0; filled];
        peer.read_exact(&mut junk).unwrap();
        stream.writable().await.unwrap();
        assert!(n.write(&mut stream).unwrap(), "written once there is room");
        let mut got = vec![0; whole.len()];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(got, whole);
        assert_eq!(got[0], b'N', "a NoticeResponse");
    }

    /// Every client holds its connection's task for its whole life, parked or not: the
    /// task's future stays two words (the phase is told by the running future's pointer).
    #[test]
    fn a_connection_task_is_two_words() {
        assert_eq!(
            std::mem::size_of::<super::Connection>(),
            2 * std::mem::size_of::<usize>()
        );
    }
}
