//! A TCP forwarder that injects network faults, for tests: put it between pgsluice and
//! PostgreSQL (or between a client and pgsluice) and switch what it does while traffic flows.
//!
//! ```ignore
//! let fault = Fault::start(("127.0.0.1", pg.port)).await;   // listens on 127.0.0.1:0
//! // point the proxy's database at fault.port() instead of pg.port
//! fault.stall();            // open connections move nothing, sockets stay open
//! fault.pass();             // back to normal
//! fault.reset_existing();   // RST every open connection (both sides), new ones pass
//! fault.blackhole();        // new connections are accepted and never answered
//! fault.retarget(other);    // new connections go elsewhere (an endpoint flip)
//! ```
//!
//! Modes (`Mode`) apply to every open connection and to new ones, in both directions; the
//! accept policy (`Accept`) applies to new connections; the target applies to new
//! connections only, as a DNS flip does. Everything stops when the `Fault` is dropped.

use std::io;
use std::net::{Shutdown, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::SockRef;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What open connections do with the bytes they read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward at once.
    Pass,
    /// Hold every chunk this long before forwarding it.
    Latency(Duration),
    /// Forward `bytes` at a time with `every` between pieces.
    Drip { bytes: usize, every: Duration },
    /// Neither read nor write; sockets stay open (an iptables DROP).
    Stall,
    /// Close every connection with RST (SO_LINGER 0), now and as soon as one is accepted.
    Reset,
    /// Forward this many more bytes (both directions together, counted from when the mode
    /// was set), then close both sides with FIN.
    CloseAfter(u64),
    /// The same, but close with RST.
    ResetAfter(u64),
}

/// What happens to new connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accept {
    /// Connect to the target and forward.
    Forward,
    /// Accept, never connect upstream, never answer; the socket stays open until the
    /// client closes it or the `Fault` is dropped.
    Blackhole,
    /// Close the listening socket: connects are refused (ECONNREFUSED) until `accept()`.
    Refuse,
    /// Forward, except a connection whose first packet is a CancelRequest: that one is read
    /// and then held open with no reply and no EOF (Odyssey's cancel-leak evil proxy).
    HangCancel,
}

#[derive(Clone, Debug)]
struct Ctl {
    mode: Mode,
    accept: Accept,
    target: SocketAddr,
    /// Connections with an id below this are reset (`reset_existing`).
    reset_below: u64,
    /// Changes with every `set`, so byte limits count from when their mode was set.
    generation: u64,
}

/// A fault-injecting TCP forwarder on 127.0.0.1. See the module documentation.
pub struct Fault {
    pub addr: SocketAddr,
    ctl: watch::Sender<Ctl>,
    stop: CancellationToken,
    stats: Arc<Stats>,
}

#[derive(Default)]
struct Stats {
    next_id: AtomicU64,
    open: AtomicU64,
    bytes: AtomicU64,
}

impl Fault {
    /// Listens on 127.0.0.1:0 and forwards to `target`.
    pub async fn start(target: impl ToSocketAddrs) -> Fault {
        let target = target
            .to_socket_addrs()
            .expect("fault target address")
            .next()
            .expect("fault target address");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (ctl, rx) = watch::channel(Ctl {
            mode: Mode::Pass,
            accept: Accept::Forward,
            target,
            reset_below: 0,
            generation: 0,
        });
        let stop = CancellationToken::new();
        let stats = Arc::new(Stats::default());
        tokio::spawn(accept_loop(listener, addr, rx, stop.clone(), stats.clone()));
        Fault {
            addr,
            ctl,
            stop,
            stats,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn set_mode(&self, mode: Mode) {
        self.ctl.send_modify(|c| {
            c.mode = mode;
            c.generation += 1;
        });
    }

    pub fn set_accept(&self, accept: Accept) {
        self.ctl.send_modify(|c| {
            c.accept = accept;
            c.generation += 1;
        });
    }

    pub fn pass(&self) {
        self.set_mode(Mode::Pass);
    }
    pub fn latency(&self, d: Duration) {
        self.set_mode(Mode::Latency(d));
    }
    pub fn drip(&self, bytes: usize, every: Duration) {
        self.set_mode(Mode::Drip { bytes, every });
    }
    pub fn stall(&self) {
        self.set_mode(Mode::Stall);
    }
    /// RST every connection, open and new, until another mode is set.
    pub fn reset(&self) {
        self.set_mode(Mode::Reset);
    }
    pub fn close_after(&self, bytes: u64) {
        self.set_mode(Mode::CloseAfter(bytes));
    }
    pub fn reset_after(&self, bytes: u64) {
        self.set_mode(Mode::ResetAfter(bytes));
    }

    /// RST the connections open now (both sides); later ones are not affected.
    pub fn reset_existing(&self) {
        let below = self.stats.next_id.load(Ordering::SeqCst);
        self.ctl.send_modify(|c| c.reset_below = below);
    }

    /// New connections are accepted and never answered.
    pub fn blackhole(&self) {
        self.set_accept(Accept::Blackhole);
    }
    /// New connections are refused: the listening socket is closed.
    pub fn refuse(&self) {
        self.set_accept(Accept::Refuse);
    }
    /// New connections are forwarded again (undoes `blackhole`, `refuse`, `HangCancel`).
    pub fn accept(&self) {
        self.set_accept(Accept::Forward);
    }

    /// New connections go to `target`; open ones stay where they are.
    pub fn retarget(&self, target: impl ToSocketAddrs) {
        let target = target.to_socket_addrs().unwrap().next().unwrap();
        self.ctl.send_modify(|c| c.target = target);
    }

    /// Connections accepted so far (forwarded, blackholed or held).
    pub fn accepted(&self) -> u64 {
        self.stats.next_id.load(Ordering::SeqCst)
    }
    /// Connections open now.
    pub fn open(&self) -> u64 {
        self.stats.open.load(Ordering::SeqCst)
    }
    /// Bytes forwarded so far, both directions.
    pub fn bytes(&self) -> u64 {
        self.stats.bytes.load(Ordering::SeqCst)
    }
}

impl Drop for Fault {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    mut ctl: watch::Receiver<Ctl>,
    stop: CancellationToken,
    stats: Arc<Stats>,
) {
    let mut listener = Some(listener);
    loop {
        let accept = ctl.borrow_and_update().accept;
        if accept == Accept::Refuse {
            listener = None;
            tokio::select! {
                _ = ctl.changed() => continue,
                _ = stop.cancelled() => return,
            }
        }
        if listener.is_none() {
            listener = Some(rebind(addr, &stop).await);
        }
        let l = listener.as_ref().unwrap();
        let (client, _) = tokio::select! {
            r = l.accept() => match r {
                Ok(c) => c,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = ctl.changed() => continue,
            _ = stop.cancelled() => return,
        };
        let _ = client.set_nodelay(true);
        let id = stats.next_id.fetch_add(1, Ordering::SeqCst);
        let (ctl, stop, stats) = (ctl.clone(), stop.child_token(), stats.clone());
        tokio::spawn(async move {
            stats.open.fetch_add(1, Ordering::SeqCst);
            let accept = ctl.borrow().accept;
            match accept {
                Accept::Blackhole => hold(client, &stop).await,
                _ => connection(id, client, accept, ctl, stop, &stats).await,
            }
            stats.open.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// Binds the listening address again after `refuse`; the port was ours, so it is free
/// unless another socket took it meanwhile, which is retried for a few seconds.
async fn rebind(addr: SocketAddr, stop: &CancellationToken) -> TcpListener {
    for _ in 0..100 {
        if stop.is_cancelled() {
            break;
        }
        if let Ok(l) = TcpListener::bind(addr).await {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("fault forwarder: cannot listen on {addr} again");
}

/// Reads and discards until the peer closes; never answers.
async fn hold(s: TcpStream, stop: &CancellationToken) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            r = read_some(&s, &mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
            _ = stop.cancelled() => return,
        }
    }
}

async fn connection(
    id: u64,
    client: TcpStream,
    accept: Accept,
    ctl: watch::Receiver<Ctl>,
    stop: CancellationToken,
    stats: &Stats,
) {
    if accept == Accept::HangCancel {
        // A CancelRequest is 16 bytes: length 16, code 80877102.
        let mut first = [0u8; 8];
        let mut got = 0;
        while got < 8 {
            tokio::select! {
                r = read_some(&client, &mut first[got..]) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got += n,
                },
                _ = stop.cancelled() => return,
            }
        }
        if first == [0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e] {
            return hold(client, &stop).await;
        }
        let target = ctl.borrow().target;
        let Ok(server) = TcpStream::connect(target).await else {
            rst(&client);
            return;
        };
        if write_all(&server, &first).await.is_err() {
            rst(&client);
            return;
        }
        return forward(id, client, server, ctl, stop, stats).await;
    }
    let target = ctl.borrow().target;
    let server = tokio::select! {
        r = TcpStream::connect(target) => r,
        _ = stop.cancelled() => return,
    };
    match server {
        Ok(server) => forward(id, client, server, ctl, stop, stats).await,
        Err(_) => rst(&client),
    }
}

/// Bytes forwarded on one connection since the mode's generation.
struct Budget {
    generation: u64,
    used: u64,
}

async fn forward(
    id: u64,
    client: TcpStream,
    server: TcpStream,
    ctl: watch::Receiver<Ctl>,
    stop: CancellationToken,
    stats: &Stats,
) {
    let _ = server.set_nodelay(true);
    let (client, server) = (Arc::new(client), Arc::new(server));
    let budget = Arc::new(Mutex::new(Budget {
        generation: ctl.borrow().generation,
        used: 0,
    }));
    let up = pump(
        id,
        client.clone(),
        server.clone(),
        ctl.clone(),
        stop.clone(),
        budget.clone(),
        stats,
    );
    let down = pump(id, server, client, ctl, stop.clone(), budget, stats);
    tokio::join!(up, down);
}

/// How a pump ended, so the connection's sockets are closed the right way.
enum End {
    /// Half-close the other side (EOF read).
    Eof,
    /// Close both sides with FIN.
    Close,
    /// Close both sides with RST.
    Reset,
}

async fn pump(
    id: u64,
    from: Arc<TcpStream>,
    to: Arc<TcpStream>,
    mut ctl: watch::Receiver<Ctl>,
    conn: CancellationToken,
    budget: Arc<Mutex<Budget>>,
    stats: &Stats,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let end = 'run: loop {
        let c = ctl.borrow_and_update().clone();
        if id < c.reset_below || c.mode == Mode::Reset {
            break End::Reset;
        }
        if c.mode == Mode::Stall {
            tokio::select! {
                _ = ctl.changed() => continue,
                _ = conn.cancelled() => return,
            }
        }
        let n = tokio::select! {
            r = read_some(&from, &mut buf) => match r {
                Ok(0) => break End::Eof,
                Ok(n) => n,
                Err(_) => break End::Reset,
            },
            _ = ctl.changed() => continue,
            _ = conn.cancelled() => return,
        };
        // The mode may have changed while reading: use the newest one for these bytes.
        let c = ctl.borrow().clone();
        if id < c.reset_below || c.mode == Mode::Reset {
            break End::Reset;
        }
        let (mut n, mut after) = (n, None);
        if let Mode::CloseAfter(limit) | Mode::ResetAfter(limit) = c.mode {
            let mut b = budget.lock().unwrap();
            if b.generation != c.generation {
                b.generation = c.generation;
                b.used = 0;
            }
            let left = limit.saturating_sub(b.used);
            if (n as u64) >= left {
                n = left as usize;
                after = Some(if matches!(c.mode, Mode::CloseAfter(_)) {
                    End::Close
                } else {
                    End::Reset
                });
            }
            b.used += n as u64;
        }
        let data = &buf[..n];
        let written = tokio::select! {
            r = deliver(&to, data, &c.mode) => r,
            _ = conn.cancelled() => return,
        };
        if written.is_err() {
            break End::Reset;
        }
        stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
        if let Some(end) = after {
            break 'run end;
        }
    };
    match end {
        End::Eof => {
            let _ = SockRef::from(&*to).shutdown(Shutdown::Write);
        }
        End::Close => {
            let _ = SockRef::from(&*from).shutdown(Shutdown::Both);
            let _ = SockRef::from(&*to).shutdown(Shutdown::Both);
            conn.cancel();
        }
        End::Reset => {
            rst(&from);
            rst(&to);
            conn.cancel();
        }
    }
}

/// Writes `data` as the mode says.
async fn deliver(to: &TcpStream, data: &[u8], mode: &Mode) -> io::Result<()> {
    match mode {
        Mode::Latency(d) => {
            tokio::time::sleep(*d).await;
            write_all(to, data).await
        }
        Mode::Drip { bytes, every } => {
            for (i, piece) in data.chunks((*bytes).max(1)).enumerate() {
                if i > 0 {
                    tokio::time::sleep(*every).await;
                }
                write_all(to, piece).await?;
            }
            Ok(())
        }
        _ => write_all(to, data).await,
    }
}

/// Arms SO_LINGER 0 so that the close, when the last handle is dropped, sends RST; and
/// shuts the socket down for reading so the peer's pump stops now. (shutdown(2) itself
/// would send FIN, so only the read side is shut here.)
fn rst(s: &TcpStream) {
    let sock = SockRef::from(s);
    let _ = sock.set_linger(Some(Duration::ZERO));
    let _ = sock.shutdown(Shutdown::Read);
}

async fn read_some(s: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        s.readable().await?;
        match s.try_read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

async fn write_all(s: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        s.writable().await?;
        match s.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
