//! uring-relay: a 1:1 TCP pass-through relay (client <-> PostgreSQL, no protocol parsing), in
//! two implementations with the same behaviour, to measure what io_uring's batching saves
//! against tokio's epoll readiness model. A measuring tool, not product code.
//!
//!   uring-relay --mode epoll --listen PORT --upstream PGPORT
//!   uring-relay --mode epoll-raw --listen PORT --upstream PGPORT
//!   uring-relay --mode usend --listen PORT --upstream PGPORT [--no-defer-taskrun]
//!   uring-relay --mode uring --listen PORT --upstream PGPORT [--multishot] [--no-poll-first]
//!               [--no-defer-taskrun] [--link]
//!
//! epoll: tokio current-thread runtime; per direction wait for readiness, one nonblocking recv
//! into a reused buffer (a short read clears the readiness, so no EAGAIN recv follows), then
//! send it all. That is pgsluice's relay loop without the protocol work.
//!
//! epoll-raw: the same without tokio: one thread, one edge-triggered epoll set, a plain loop
//! over epoll_wait's events (as PgBouncer's libevent loop). It separates what io_uring saves
//! in the kernel from what leaving tokio's task machinery saves in user space.
//!
//! usend: epoll's loop (tokio readiness, one recv per arrival), but every send is copied into
//! the socket's outgoing buffer and queued on one io_uring ring per thread as a SEND; a flusher
//! task, woken by the first send a runtime turn queues, submits them all in one enter. Reads
//! stay on epoll, so idle sockets hold no buffer; only the sends are batched.
//!
//! uring: one thread, one ring. Every socket has one RECV outstanding; its completion queues a
//! SEND to the peer; once all of it is sent, the RECV is armed again. Everything a loop turn
//! queued goes to the kernel in one `submit_and_wait(1)`, so several operations share one
//! kernel entry. With --multishot each socket keeps one multishot RECV that takes buffers from
//! a registered buffer ring instead of being re-armed per message. With --link (single-shot
//! only) the re-armed RECV is linked behind the SEND (IOSQE_IO_LINK, MSG_WAITALL) and so
//! submitted in the same enter, not one turn later.

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};

const BUF: usize = 16 * 1024;

struct Args {
    mode: String,
    listen: u16,
    upstream: u16,
    multishot: bool,
    poll_first: bool,
    defer_taskrun: bool,
    link: bool,
}

fn parse_args() -> Args {
    let mut a = Args {
        mode: String::new(),
        listen: 0,
        upstream: 0,
        multishot: false,
        poll_first: true,
        defer_taskrun: true,
        link: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().expect("flag needs a value");
        match arg.as_str() {
            "--mode" => a.mode = value(),
            "--listen" => a.listen = value().parse().expect("--listen PORT"),
            "--upstream" => a.upstream = value().parse().expect("--upstream PORT"),
            "--multishot" => a.multishot = true,
            "--link" => a.link = true,
            "--no-poll-first" => a.poll_first = false,
            "--no-defer-taskrun" => a.defer_taskrun = false,
            _ => {
                eprintln!("unknown argument {arg}; see the top of src/main.rs");
                std::process::exit(2);
            }
        }
    }
    if a.listen == 0
        || a.upstream == 0
        || !["epoll", "epoll-raw", "uring", "usend"].contains(&&*a.mode)
    {
        eprintln!(
            "usage: uring-relay --mode epoll|epoll-raw|uring|usend --listen PORT --upstream PORT"
        );
        std::process::exit(2);
    }
    a
}

fn main() -> io::Result<()> {
    let args = parse_args();
    let upstream = SocketAddr::from(([127, 0, 0, 1], args.upstream));
    let listener = std::net::TcpListener::bind(("127.0.0.1", args.listen))?;
    if args.mode == "epoll" {
        epoll::run(listener, upstream)
    } else if args.mode == "epoll-raw" {
        epoll_raw::run(listener, upstream)
    } else if args.mode == "usend" {
        usend::run(listener, upstream, args.defer_taskrun)
    } else {
        uring::run(listener, upstream, &args)
    }
}

mod epoll {
    use super::*;
    use std::task::Poll;
    use tokio::io::Interest;
    use tokio::net::TcpStream;

    pub fn run(listener: std::net::TcpListener, upstream: SocketAddr) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            loop {
                let (client, _) = listener.accept().await?;
                tokio::spawn(async move {
                    if let Err(e) = relay(client, upstream).await {
                        eprintln!("relay: {e}");
                    }
                });
            }
        })
    }

    async fn relay(client: TcpStream, upstream: SocketAddr) -> io::Result<()> {
        let server = TcpStream::connect(upstream).await?;
        client.set_nodelay(true)?;
        server.set_nodelay(true)?;
        let socks = [&client, &server];
        let mut bufs = [vec![0u8; BUF], vec![0u8; BUF]];
        loop {
            let ready = either_readable(socks).await;
            for d in 0..2 {
                if !ready[d] {
                    continue;
                }
                match read_some(socks[d], &mut bufs[d])? {
                    None => {}
                    Some(0) => return Ok(()),
                    Some(n) => write_all(socks[1 - d], &bufs[d][..n]).await?,
                }
            }
        }
    }

    /// Waits until either socket is readable; which ones are.
    pub(crate) async fn either_readable(socks: [&TcpStream; 2]) -> [bool; 2] {
        std::future::poll_fn(|cx| {
            let r = [
                socks[0].poll_read_ready(cx).is_ready(),
                socks[1].poll_read_ready(cx).is_ready(),
            ];
            if r[0] || r[1] {
                Poll::Ready(r)
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// One recv. A read that leaves room in the buffer drained the socket: report
    /// WouldBlock to `try_io` so it clears the readiness and the next wait goes to epoll
    /// rather than to a recv that returns EAGAIN (as pgsluice's `Stream::read_some`).
    /// None: nothing there after all; Some(0): end of stream.
    pub(crate) fn read_some(s: &TcpStream, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let mut got = 0;
        let r = s.try_io(Interest::READABLE, || {
            got = s.try_read(buf)?;
            if got > 0 && got < buf.len() {
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(got)
            }
        });
        match r {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok((got > 0).then_some(got)),
            Err(e) => Err(e),
        }
    }

    /// Sends eagerly; waits for writability only if the socket is full.
    async fn write_all(s: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match s.try_write(buf) {
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => s.writable().await?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

mod epoll_raw {
    use super::*;

    const LISTENER: u64 = u64::MAX;

    struct Pair {
        fds: [RawFd; 2],
        bufs: [Vec<u8>; 2],
    }

    pub fn run(listener: std::net::TcpListener, upstream: SocketAddr) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(io::Error::last_os_error());
        }
        add(ep, listener.as_raw_fd(), libc::EPOLLIN as u32, LISTENER)?;
        let mut pairs: Vec<Option<Pair>> = Vec::new();
        let mut free: Vec<usize> = Vec::new();
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        loop {
            let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), 256, -1) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for ev in &events[..n as usize] {
                let key = ev.u64;
                if key == LISTENER {
                    while let Ok((client, _)) = listener.accept() {
                        let Ok(server) = StdTcpStream::connect(upstream) else {
                            continue;
                        };
                        let p = free.pop().unwrap_or_else(|| {
                            pairs.push(None);
                            pairs.len() - 1
                        });
                        let socks = [client, server];
                        for (d, s) in socks.iter().enumerate() {
                            s.set_nodelay(true)?;
                            s.set_nonblocking(true)?;
                            let flags = (libc::EPOLLIN | libc::EPOLLET) as u32;
                            add(ep, s.as_raw_fd(), flags, (p as u64) << 1 | d as u64)?;
                        }
                        let fds = socks.map(|s| s.into_raw_fd());
                        pairs[p] = Some(Pair {
                            fds,
                            bufs: [vec![0; BUF], vec![0; BUF]],
                        });
                    }
                    continue;
                }
                let (p, d) = ((key >> 1) as usize, (key & 1) as usize);
                // An event of a pair closed earlier in this batch finds nothing (or a
                // new pair whose recv then returns EAGAIN: harmless).
                let Some(pair) = pairs[p].as_mut() else {
                    continue;
                };
                if !relay(pair, d) {
                    for fd in pair.fds {
                        unsafe { libc::close(fd) };
                    }
                    pairs[p] = None;
                    free.push(p);
                }
            }
        }
    }

    fn add(ep: RawFd, fd: RawFd, events: u32, key: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: key };
        if unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Edge-triggered: reads until a read leaves room in the buffer (the socket is drained)
    /// and sends each piece on. False when the pair is done.
    fn relay(pair: &mut Pair, d: usize) -> bool {
        let (from, to, buf) = (pair.fds[d], pair.fds[1 - d], &mut pair.bufs[d]);
        loop {
            let n = unsafe { libc::recv(from, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock;
            }
            if n == 0 || !send_all(to, &buf[..n as usize]) {
                return false;
            }
            if (n as usize) < buf.len() {
                return true;
            }
        }
    }

    /// Sends it all; if the peer's socket is full, waits for it with poll(2) (never under
    /// pgbench -S; it blocks the loop, which a measuring tool may).
    fn send_all(fd: RawFd, mut buf: &[u8]) -> bool {
        while !buf.is_empty() {
            let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
            if n >= 0 {
                buf = &buf[n as usize..];
            } else if io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock {
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLOUT,
                    revents: 0,
                };
                unsafe { libc::poll(&mut pfd, 1, -1) };
            } else {
                return false;
            }
        }
        true
    }
}

mod uring {
    use super::*;
    use io_uring::{cqueue, opcode, squeue, types, IoUring};
    use std::sync::atomic::{AtomicU16, Ordering};

    const ACCEPT: u64 = u64::MAX;
    const RECV: u64 = 0;
    const SEND: u64 = 1;
    /// Registered buffers for --multishot (one group, id 0).
    const RING_BUFS: u16 = 1024;
    /// Marks the per-direction buffer in single-shot mode.
    const OWN: u16 = u16::MAX;
    /// IORING_RECVSEND_POLL_FIRST (linux/io_uring.h): wait for data before the first try.
    const RECVSEND_POLL_FIRST: u16 = 1;

    fn ud(pair: usize, kind: u64, dir: usize) -> u64 {
        ((pair as u64) << 2) | (kind << 1) | dir as u64
    }

    /// Bytes read from `fds[d]`, to be sent to `fds[1 - d]`.
    #[derive(Default)]
    struct Dir {
        /// Single-shot mode's receive buffer.
        buf: Vec<u8>,
        /// Chunks waiting to be sent (buffer id, length); the head one may be part sent.
        queue: VecDeque<(u16, usize)>,
        sent: usize,
        sending: bool,
    }

    struct Pair {
        fds: [RawFd; 2],
        dirs: [Dir; 2],
        /// Operations in the kernel that name this pair; it is freed when this reaches 0.
        inflight: u32,
        closing: bool,
    }

    /// The provided-buffer ring of --multishot: the kernel takes buffers from it, we give
    /// them back once their bytes are sent.
    struct BufRing {
        entries: *mut types::BufRingEntry,
        tail: u16,
        mem: Vec<u8>,
    }

    impl BufRing {
        fn new(ring: &IoUring) -> io::Result<BufRing> {
            let layout =
                std::alloc::Layout::from_size_align(RING_BUFS as usize * 16, 4096).unwrap();
            // SAFETY: non-zero size; lives as long as the ring (the process).
            let entries = unsafe { std::alloc::alloc_zeroed(layout) } as *mut types::BufRingEntry;
            let mut br = BufRing {
                entries,
                tail: 0,
                mem: vec![0u8; RING_BUFS as usize * BUF],
            };
            // SAFETY: page-aligned memory of RING_BUFS entries that is never freed.
            unsafe {
                ring.submitter()
                    .register_buf_ring_with_flags(entries as u64, RING_BUFS, 0, 0)?
            };
            for bid in 0..RING_BUFS {
                br.give(bid);
            }
            br.publish();
            Ok(br)
        }

        fn addr(&self, bid: u16) -> *const u8 {
            self.mem[bid as usize * BUF..].as_ptr()
        }

        fn give(&mut self, bid: u16) {
            // SAFETY: the index is masked into the ring.
            let e = unsafe { &mut *self.entries.add((self.tail & (RING_BUFS - 1)) as usize) };
            e.set_addr(self.addr(bid) as u64);
            e.set_len(BUF as u32);
            e.set_bid(bid);
            self.tail = self.tail.wrapping_add(1);
        }

        fn publish(&self) {
            // SAFETY: the tail field lives in the first entry, shared with the kernel.
            let tail = unsafe { &*(types::BufRingEntry::tail(self.entries) as *const AtomicU16) };
            tail.store(self.tail, Ordering::Release);
        }
    }

    struct Relay {
        ring: IoUring,
        pairs: Vec<Option<Pair>>,
        free: Vec<usize>,
        bufs: Option<BufRing>,
        /// Sockets whose multishot RECV ended for want of buffers.
        starved: Vec<(usize, usize)>,
        poll_first: bool,
        link: bool,
        listen_fd: RawFd,
        upstream: SocketAddr,
    }

    pub fn run(
        listener: std::net::TcpListener,
        upstream: SocketAddr,
        args: &Args,
    ) -> io::Result<()> {
        let mut b = IoUring::builder();
        if args.defer_taskrun {
            b.setup_single_issuer().setup_defer_taskrun();
        }
        let ring = b.setup_cqsize(4096).build(1024)?;
        let bufs = if args.multishot {
            Some(BufRing::new(&ring)?)
        } else {
            None
        };
        let mut r = Relay {
            ring,
            pairs: Vec::new(),
            free: Vec::new(),
            bufs,
            starved: Vec::new(),
            poll_first: args.poll_first,
            link: args.link,
            listen_fd: listener.as_raw_fd(),
            upstream,
        };
        r.arm_accept();
        let mut done: Vec<(u64, i32, u32)> = Vec::with_capacity(1024);
        loop {
            match r.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
            done.clear();
            done.extend(
                r.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            for &(u, res, flags) in &done {
                if u == ACCEPT {
                    r.accepted(res);
                } else {
                    let (p, kind, d) = ((u >> 2) as usize, (u >> 1) & 1, (u & 1) as usize);
                    r.completed(p, kind, d, res, flags);
                }
            }
            if let Some(b) = &r.bufs {
                b.publish();
            }
        }
    }

    impl Relay {
        fn push(&mut self, e: squeue::Entry) {
            // SAFETY: every buffer named by an entry outlives the operation (pair buffers
            // are freed only when nothing is in flight; ring buffers never).
            while unsafe { self.ring.submission().push(&e) }.is_err() {
                self.ring.submit().expect("io_uring_enter");
            }
        }

        fn arm_accept(&mut self) {
            let fd = types::Fd(self.listen_fd);
            let e = opcode::Accept::new(fd, std::ptr::null_mut(), std::ptr::null_mut())
                .flags(libc::SOCK_CLOEXEC)
                .build()
                .user_data(ACCEPT);
            self.push(e);
        }

        fn accepted(&mut self, res: i32) {
            self.arm_accept();
            if res < 0 {
                eprintln!("accept: {}", io::Error::from_raw_os_error(-res));
                return;
            }
            // Connects are not the measured path: a blocking connect is fine.
            let server = match StdTcpStream::connect(self.upstream) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("connect: {e}");
                    unsafe { libc::close(res) };
                    return;
                }
            };
            let _ = server.set_nodelay(true);
            let one: libc::c_int = 1;
            // SAFETY: plain setsockopt on the accepted fd.
            unsafe {
                libc::setsockopt(
                    res,
                    libc::IPPROTO_TCP,
                    libc::TCP_NODELAY,
                    &one as *const _ as *const libc::c_void,
                    4,
                )
            };
            let single = self.bufs.is_none();
            let dir = || Dir {
                buf: if single { vec![0u8; BUF] } else { Vec::new() },
                ..Dir::default()
            };
            let pair = Pair {
                fds: [res, server.into_raw_fd()],
                dirs: [dir(), dir()],
                inflight: 0,
                closing: false,
            };
            let p = match self.free.pop() {
                Some(p) => {
                    self.pairs[p] = Some(pair);
                    p
                }
                None => {
                    self.pairs.push(Some(pair));
                    self.pairs.len() - 1
                }
            };
            self.arm_recv(p, 0);
            self.arm_recv(p, 1);
        }

        fn pair(&mut self, p: usize) -> &mut Pair {
            self.pairs[p].as_mut().expect("live pair")
        }

        fn arm_recv(&mut self, p: usize, d: usize) {
            let poll_first = self.poll_first;
            let multishot = self.bufs.is_some();
            let pair = self.pair(p);
            pair.inflight += 1;
            let fd = types::Fd(pair.fds[d]);
            let e = if multishot {
                opcode::RecvMulti::new(fd, 0).build()
            } else {
                let buf = &mut pair.dirs[d].buf;
                let prio = if poll_first { RECVSEND_POLL_FIRST } else { 0 };
                opcode::Recv::new(fd, buf.as_mut_ptr(), buf.len() as u32)
                    .ioprio(prio)
                    .build()
            };
            self.push(e.user_data(ud(p, RECV, d)));
        }

        /// Sends (the rest of) the head chunk of direction `d` to the peer.
        fn send_head(&mut self, p: usize, d: usize) {
            let base = {
                let pair = self.pairs[p].as_ref().unwrap();
                match pair.dirs[d].queue.front() {
                    Some(&(OWN, _)) => pair.dirs[d].buf.as_ptr(),
                    Some(&(bid, _)) => self.bufs.as_ref().unwrap().addr(bid),
                    None => return,
                }
            };
            let pair = self.pair(p);
            let dir = &mut pair.dirs[d];
            let len = dir.queue[0].1 - dir.sent;
            // SAFETY: within the chunk.
            let ptr = unsafe { base.add(dir.sent) };
            dir.sending = true;
            pair.inflight += 1;
            let fd = types::Fd(pair.fds[1 - d]);
            let own = base == pair.dirs[d].buf.as_ptr();
            let link = self.link && own;
            // --link: MSG_WAITALL makes the kernel finish a short send itself, and the RECV
            // linked after it starts only once all is sent, so it goes in the same enter.
            let flags = libc::MSG_NOSIGNAL | if link { libc::MSG_WAITALL } else { 0 };
            let e = opcode::Send::new(fd, ptr, len as u32).flags(flags).build();
            let e = if link {
                e.flags(squeue::Flags::IO_LINK)
            } else {
                e
            };
            self.push(e.user_data(ud(p, SEND, d)));
            if link {
                self.arm_recv(p, d);
            }
        }

        fn completed(&mut self, p: usize, kind: u64, d: usize, res: i32, flags: u32) {
            let multishot = self.bufs.is_some();
            let link = self.link;
            let more = multishot && kind == RECV && cqueue::more(flags);
            let pair = self.pair(p);
            if !more {
                pair.inflight -= 1;
            }
            let bid = cqueue::buffer_select(flags);
            if pair.closing || res <= 0 {
                if let (Some(bid), Some(b)) = (bid, self.bufs.as_mut()) {
                    b.give(bid);
                }
                if res == -libc::ENOBUFS && !self.pair(p).closing {
                    self.starved.push((p, d));
                } else {
                    self.close(p);
                }
                return;
            }
            let res = res as usize;
            if kind == RECV {
                let dir = &mut pair.dirs[d];
                dir.queue.push_back((bid.unwrap_or(OWN), res));
                if !dir.sending {
                    self.send_head(p, d);
                }
                if multishot && !more {
                    self.arm_recv(p, d);
                }
                return;
            }
            // A send completed.
            let dir = &mut pair.dirs[d];
            dir.sent += res;
            dir.sending = false;
            if dir.sent < dir.queue[0].1 && link && dir.queue[0].0 == OWN {
                return self.close(p); // MSG_WAITALL: short only on error; the RECV is cancelled
            }
            if dir.sent < dir.queue[0].1 {
                return self.send_head(p, d); // short send: the rest
            }
            let (bid, _) = dir.queue.pop_front().unwrap();
            dir.sent = 0;
            let more_queued = !dir.queue.is_empty();
            if bid == OWN {
                if !link {
                    self.arm_recv(p, d); // single-shot: read again once all is sent
                }
            } else {
                self.bufs.as_mut().unwrap().give(bid);
                if let Some((sp, sd)) = self.starved.pop() {
                    if self.pairs[sp].as_ref().is_some_and(|x| !x.closing) {
                        self.arm_recv(sp, sd);
                    }
                }
            }
            if more_queued {
                self.send_head(p, d);
            }
        }

        /// Shuts both sockets down, which ends their outstanding operations; closes them
        /// and frees the pair when the last one has completed.
        fn close(&mut self, p: usize) {
            let pair = self.pair(p);
            if !pair.closing {
                pair.closing = true;
                for fd in pair.fds {
                    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
                }
            }
            if pair.inflight > 0 {
                return;
            }
            let pair = self.pairs[p].take().unwrap();
            for fd in pair.fds {
                unsafe { libc::close(fd) };
            }
            if let Some(b) = self.bufs.as_mut() {
                for dir in &pair.dirs {
                    dir.queue
                        .iter()
                        .filter(|c| c.0 != OWN)
                        .for_each(|c| b.give(c.0));
                }
            }
            self.starved.retain(|s| s.0 != p);
            self.free.push(p);
        }
    }
}

mod usend {
    //! Sends batched through io_uring, reads by tokio readiness (see the top of the file).
    use super::*;
    use io_uring::{opcode, types, IoUring};
    use std::cell::RefCell;
    use std::task::{Poll, Waker};
    use tokio::io::unix::AsyncFd;
    use tokio::net::TcpStream;

    /// Bytes a socket may have waiting to be sent before a writer waits.
    const CAP: usize = 256 * 1024;

    /// One socket's outgoing side. The ring sends from `sending` (untouched while a SEND is in
    /// flight); writers append to `pending`.
    struct Out {
        fd: RawFd,
        sending: Vec<u8>,
        sent: usize,
        pending: Vec<u8>,
        busy: bool,
        waiter: Option<Waker>,
        err: Option<i32>,
        /// The owner is gone: close `fd` once nothing is in flight.
        orphan: bool,
    }

    struct Ring {
        ring: IoUring,
        outs: Vec<Option<Out>>,
        free: Vec<usize>,
        queued: bool,
        flusher: Option<Waker>,
    }

    thread_local! {
        static RING: RefCell<Option<Ring>> = const { RefCell::new(None) };
    }

    fn with<R>(f: impl FnOnce(&mut Ring) -> R) -> R {
        RING.with(|r| f(r.borrow_mut().as_mut().expect("ring set up")))
    }

    impl Ring {
        fn push(&mut self, e: io_uring::squeue::Entry) {
            // SAFETY: the buffer an entry names is an `Out::sending`, which is neither
            // touched nor freed until the entry's completion has been reaped.
            while unsafe { self.ring.submission().push(&e) }.is_err() {
                self.ring.submit().expect("io_uring_enter");
            }
            if !self.queued {
                self.queued = true;
                if let Some(w) = self.flusher.take() {
                    w.wake();
                }
            }
        }

        /// Sends what `sending` holds from `sent` on.
        fn send(&mut self, slot: usize) {
            let o = self.outs[slot].as_mut().unwrap();
            o.busy = true;
            let e = opcode::Send::new(
                types::Fd(o.fd),
                o.sending[o.sent..].as_ptr(),
                (o.sending.len() - o.sent) as u32,
            )
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(slot as u64);
            self.push(e);
        }

        /// Starts sending what writers queued, if anything.
        fn start(&mut self, slot: usize) {
            let o = self.outs[slot].as_mut().unwrap();
            if o.busy || o.pending.is_empty() {
                return;
            }
            std::mem::swap(&mut o.sending, &mut o.pending);
            o.sent = 0;
            self.send(slot);
        }

        fn completed(&mut self, slot: usize, res: i32) {
            let o = self.outs[slot].as_mut().unwrap();
            o.busy = false;
            if res < 0 {
                o.err = Some(-res);
                o.pending.clear();
            } else {
                o.sent += res as usize;
                if o.sent < o.sending.len() && o.err.is_none() {
                    return self.send(slot);
                }
                o.sending.clear();
                o.sent = 0;
            }
            if let Some(w) = o.waiter.take() {
                w.wake();
            }
            if o.err.is_none() {
                self.start(slot);
            }
            let o = self.outs[slot].as_mut().unwrap();
            if o.orphan && !o.busy {
                unsafe { libc::close(o.fd) };
                self.outs[slot] = None;
                self.free.push(slot);
            }
        }
    }

    /// The outgoing side of `s`, sent through the ring (over a dup of its fd, so that it can
    /// finish after the owner dropped the stream).
    struct Sender(usize);

    impl Sender {
        fn new(s: &TcpStream) -> io::Result<Sender> {
            let fd = unsafe { libc::dup(s.as_raw_fd()) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(Sender(with(|r| {
                let out = Out {
                    fd,
                    sending: Vec::new(),
                    sent: 0,
                    pending: Vec::new(),
                    busy: false,
                    waiter: None,
                    err: None,
                    orphan: false,
                };
                match r.free.pop() {
                    Some(i) => {
                        r.outs[i] = Some(out);
                        i
                    }
                    None => {
                        r.outs.push(Some(out));
                        r.outs.len() - 1
                    }
                }
            })))
        }

        /// Queues all of `data`; waits only while the socket has CAP bytes queued.
        async fn write_all(&self, data: &[u8]) -> io::Result<()> {
            std::future::poll_fn(|cx| {
                with(|r| {
                    let o = r.outs[self.0].as_mut().unwrap();
                    if let Some(e) = o.err {
                        return Poll::Ready(Err(io::Error::from_raw_os_error(e)));
                    }
                    if o.pending.len() + o.sending.len() - o.sent >= CAP {
                        o.waiter = Some(cx.waker().clone());
                        return Poll::Pending;
                    }
                    o.pending.extend_from_slice(data);
                    r.start(self.0);
                    Poll::Ready(Ok(()))
                })
            })
            .await
        }
    }

    impl Drop for Sender {
        fn drop(&mut self) {
            with(|r| {
                let o = r.outs[self.0].as_mut().unwrap();
                o.orphan = true;
                if !o.busy && o.pending.is_empty() {
                    unsafe { libc::close(o.fd) };
                    r.outs[self.0] = None;
                    r.free.push(self.0);
                }
            })
        }
    }

    /// Submits what a runtime turn queued, in one enter, and reaps completions.
    async fn flusher(ring_fd: AsyncFd<RawFd>) {
        let mut done: Vec<(u64, i32)> = Vec::with_capacity(256);
        loop {
            std::future::poll_fn(|cx| {
                if let Poll::Ready(Ok(mut g)) = ring_fd.poll_read_ready(cx) {
                    g.clear_ready();
                    return Poll::Ready(());
                }
                with(|r| {
                    if r.queued {
                        Poll::Ready(())
                    } else {
                        r.flusher = Some(cx.waker().clone());
                        Poll::Pending
                    }
                })
            })
            .await;
            with(|r| {
                loop {
                    r.queued = false;
                    match r.ring.submit() {
                        Ok(_) => {}
                        Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                        Err(e) => panic!("io_uring_enter: {e}"),
                    }
                    done.clear();
                    done.extend(r.ring.completion().map(|c| (c.user_data(), c.result())));
                    for &(slot, res) in &done {
                        r.completed(slot as usize, res);
                    }
                    // Resends of short sends go in the same turn.
                    if !r.queued {
                        break;
                    }
                }
            });
        }
    }

    pub fn run(
        listener: std::net::TcpListener,
        upstream: SocketAddr,
        defer: bool,
    ) -> io::Result<()> {
        let mut b = IoUring::builder();
        b.setup_single_issuer();
        if defer {
            b.setup_defer_taskrun().setup_taskrun_flag();
        } else {
            b.setup_coop_taskrun().setup_taskrun_flag();
        }
        let ring = b.setup_cqsize(4096).build(1024)?;
        let fd = ring.as_raw_fd();
        RING.with(|r| {
            *r.borrow_mut() = Some(Ring {
                ring,
                outs: Vec::new(),
                free: Vec::new(),
                queued: false,
                flusher: None,
            })
        });
        listener.set_nonblocking(true)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async move {
            // SAFETY: the ring (and its fd) lives in the thread-local for the whole run.
            let ring_fd =
                unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }?;
            tokio::task::spawn_local(flusher(ring_fd));
            let listener = tokio::net::TcpListener::from_std(listener)?;
            loop {
                let (client, _) = listener.accept().await?;
                tokio::task::spawn_local(async move {
                    if let Err(e) = relay(client, upstream).await {
                        eprintln!("relay: {e}");
                    }
                });
            }
        })
    }

    async fn relay(client: TcpStream, upstream: SocketAddr) -> io::Result<()> {
        let server = TcpStream::connect(upstream).await?;
        client.set_nodelay(true)?;
        server.set_nodelay(true)?;
        let socks = [&client, &server];
        let out = [Sender::new(&server)?, Sender::new(&client)?];
        let mut bufs = [vec![0u8; BUF], vec![0u8; BUF]];
        loop {
            let ready = epoll::either_readable(socks).await;
            for d in 0..2 {
                if !ready[d] {
                    continue;
                }
                match epoll::read_some(socks[d], &mut bufs[d])? {
                    None => {}
                    Some(0) => return Ok(()),
                    Some(n) => out[d].write_all(&bufs[d][..n]).await?,
                }
            }
        }
    }
}
