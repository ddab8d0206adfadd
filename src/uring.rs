//! io_uring for client and server sockets: Cargo feature `io-uring` (on by default, Linux
//! only), switched on by `io_uring = true` with `worker_threads = 1`.
//!
//! Over epoll, a statement costs four socket system calls (a `recv` and a `send` on each leg)
//! and some `epoll_wait`. Here a socket's reads and writes are operations on one ring per
//! thread instead, and all the operations the tasks of one runtime turn queue reach the kernel
//! in one `io_uring_enter` ([docs/performance.md](../docs/performance.md)).
//!
//! The relay keeps its one code path: [`Sock`] offers the readiness-style calls of a tokio
//! socket (`poll_read_ready`, `try_read`, `try_write`, ...) on top of the ring.
//! - **Reading.** A socket has at most one RECV in the kernel. It waits for data first
//!   (`IORING_RECVSEND_POLL_FIRST`) and takes a buffer from a shared ring of provided
//!   buffers only when data arrives, so an idle socket holds no buffer. The filled buffer waits
//!   in the socket's slot until its task reads it (a copy into the task's own buffer); then it
//!   goes back and the RECV is armed again. So a socket holds at most one buffer of input and
//!   TCP's flow control does the rest, as with epoll.
//! - **Writing.** A write copies into the socket's outgoing buffer (up to [`OUT_CAP`] bytes
//!   may wait; beyond that it would block) and returns; one SEND at a time sends it, in order.
//!   A socket dropped with bytes still waiting is closed once they are sent.
//! - **The driver** is a task woken by the first operation a turn queues (it runs after the
//!   tasks already woken, so it sees the whole turn) and by completions (the ring's fd is
//!   registered with tokio's reactor). It submits, reaps the completions and wakes the tasks
//!   they concern.
//!
//! Everything here lives on the one runtime thread (the ring is thread-local and set up with
//! `IORING_SETUP_SINGLE_ISSUER`); a socket is converted to a [`Sock`] only on that thread.
#![allow(unsafe_code)]

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use tokio::io::unix::AsyncFd;

/// Submission queue entries; a full queue is submitted at once.
const SQ_ENTRIES: u32 = 1024;
/// Completion queue entries: at most two operations per socket are in the kernel.
const CQ_ENTRIES: u32 = 16384;
/// The two groups of provided read buffers, (size, count; a power of two): small ones for
/// clients, whose requests are small and who are many, large ones for the few servers,
/// whose results may be big. 2 MiB each, resident from the start. Only a socket whose
/// input arrived and is not read yet holds one.
const GROUPS: [(usize, u16); 2] = [(2 * 1024, 1024), (16 * 1024, 128)];
/// Which buffer group a socket reads into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reads {
    /// A client's: small buffers.
    Small = 0,
    /// A server's: large buffers.
    Large = 1,
}
/// Bytes a socket may have waiting to be sent before a write would block.
pub const OUT_CAP: usize = 64 * 1024;
/// A sent outgoing buffer up to this size goes back to the ring's spares; a bigger one (grown
/// by a big result) is freed.
const OUT_KEEP: usize = 16 * 1024;
/// Spare outgoing buffers kept for the next writes.
const OUT_SPARES: usize = 32;
/// How long a dropped socket may take to send what it still holds before it is cut off.
const LINGER: Duration = Duration::from_secs(10);
/// `IORING_RECVSEND_POLL_FIRST` (linux/io_uring.h): wait for data before trying to read.
const POLL_FIRST: u16 = 1;

/// Operation kinds, in the low bits of an entry's user data (the slot index above them).
const RECV: u64 = 0;
const SEND: u64 = 1;
const CANCEL: u64 = 2;

fn user_data(slot: u32, op: u64) -> u64 {
    (u64::from(slot) << 2) | op
}

/// Where a socket's input stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Input {
    /// No RECV in the kernel.
    Idle,
    /// A RECV waits in the kernel.
    Armed,
    /// Buffer `bid` holds `len` bytes, read up to `off`.
    Ready { bid: u16, len: u32, off: u32 },
    /// The peer closed its side.
    Eof,
    /// The RECV failed with this errno.
    Failed(i32),
}

/// One socket's state in the ring.
struct Slot {
    fd: OwnedFd,
    /// The buffer group its RECVs take from (`Reads as usize`).
    group: u16,
    input: Input,
    /// The RECV found no free buffer; armed again when one comes back.
    starved: bool,
    reader: Option<Waker>,
    /// Bytes the SEND in the kernel sends from (untouched while it runs), sent up to `sent`.
    sending: Vec<u8>,
    sent: usize,
    /// Bytes written since, sent when `sending` is done.
    pending: Vec<u8>,
    send_busy: bool,
    /// A SEND failed with this errno: later writes fail too.
    send_failed: Option<i32>,
    /// Waits for room to write, or for everything to be sent.
    writer: Option<Waker>,
    /// Operations in the kernel that name this slot (RECV, SEND, CANCEL).
    in_kernel: u8,
    /// The [`Sock`] is gone: the slot is freed (and the fd closed) once nothing is in the
    /// kernel and nothing waits to be sent.
    dropped: bool,
}

impl Slot {
    fn waiting_out(&self) -> usize {
        self.pending.len() + self.sending.len() - self.sent
    }
}

/// A provided-buffer ring the kernel takes read buffers from: one per group.
struct Bufs {
    /// `count` entries shared with the kernel (page-aligned; freed when the ring is dropped,
    /// once nothing is left in the kernel).
    entries: *mut types::BufRingEntry,
    tail: u16,
    /// `count * size` bytes (freed as `entries`).
    mem: *mut u8,
    size: usize,
    count: u16,
    /// Sockets of this group whose RECV found no free buffer.
    starved: Vec<u32>,
}

impl Bufs {
    fn new(ring: &IoUring, group: u16) -> io::Result<Bufs> {
        let (size, count) = GROUPS[usize::from(group)];
        let entries_layout = std::alloc::Layout::from_size_align(usize::from(count) * 16, 4096)
            .expect("valid layout");
        let mem_layout = std::alloc::Layout::from_size_align(usize::from(count) * size, 4096)
            .expect("valid layout");
        // SAFETY: both layouts have a non-zero size; freed by `Ring`'s drop.
        let (entries, mem) = unsafe {
            (
                std::alloc::alloc_zeroed(entries_layout) as *mut types::BufRingEntry,
                std::alloc::alloc(mem_layout),
            )
        };
        if entries.is_null() || mem.is_null() {
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        // Touched now, so that this fixed cost is resident from the start rather than
        // growing into view as the kernel rotates through the buffers.
        // SAFETY: `mem` is `count * size` bytes just allocated.
        unsafe { std::ptr::write_bytes(mem, 0, usize::from(count) * size) };
        // SAFETY: `entries` is page-aligned memory for `count` entries that lives until the
        // group is unregistered (`Ring`'s drop).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(entries as u64, count, group, 0)?
        };
        let mut bufs = Bufs {
            entries,
            tail: 0,
            mem,
            size,
            count,
            starved: Vec::new(),
        };
        for bid in 0..count {
            bufs.give(bid);
        }
        Ok(bufs)
    }

    /// Hands buffer `bid` (back) to the kernel.
    fn give(&mut self, bid: u16) {
        // SAFETY: the index is masked into the ring; the entry at the tail is ours until the
        // tail moves past it.
        let e = unsafe { &mut *self.entries.add(usize::from(self.tail & (self.count - 1))) };
        e.set_addr(self.mem as u64 + u64::from(bid) * self.size as u64);
        e.set_len(self.size as u32);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail field overlays the first entry's reserved word, which the kernel
        // reads; publishing it with release ordering makes the entry above visible first.
        let tail = unsafe { &*(types::BufRingEntry::tail(self.entries) as *const AtomicU16) };
        tail.store(self.tail, Ordering::Release);
    }

    /// The bytes `off..len` of buffer `bid`.
    ///
    /// # Safety
    /// The kernel filled `bid` (a RECV completed with it) and it was not given back since.
    unsafe fn bytes(&self, bid: u16, off: u32, len: u32) -> &[u8] {
        std::slice::from_raw_parts(
            self.mem.add(usize::from(bid) * self.size + off as usize),
            (len - off) as usize,
        )
    }
}

/// The ring of this thread and the sockets on it.
struct Ring {
    id: u32,
    ring: IoUring,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    /// The buffer groups, by [`Reads`].
    bufs: [Bufs; 2],
    /// Entries were queued since the last submit.
    queued: bool,
    driver: Option<Waker>,
    /// Completions of one reap, kept to reuse the allocation.
    done: Vec<(u64, i32, u32)>,
    /// Dropped sockets still sending, and when they are cut off.
    lingering: Vec<(u32, Instant)>,
    /// Sent outgoing buffers, emptied, for the next writes: a socket holds one only while
    /// it has bytes to send, so an idle one holds none, and a write allocates none.
    spares: Vec<Vec<u8>>,
}

thread_local! {
    static RING: RefCell<Option<Ring>> = const { RefCell::new(None) };
}

/// Numbers the rings (one per thread that serves sockets), so that a socket knows its own.
static NEXT_RING: AtomicU32 = AtomicU32::new(1);
/// Sockets dropped on a thread other than their ring's (ring, slot), for their ring's driver
/// to close. pgsluice itself drops every socket on its ring's thread; this is the fallback.
static ORPHANS: Mutex<Vec<(u32, u32)>> = Mutex::new(Vec::new());
static ORPHANED: AtomicBool = AtomicBool::new(false);

fn with<R>(f: impl FnOnce(&mut Ring) -> R) -> R {
    RING.with(|r| {
        f(r.borrow_mut()
            .as_mut()
            .expect("io_uring set up on this thread"))
    })
}

/// Runs `f` on ring `id` if it is this thread's; `None` elsewhere.
fn on<R>(id: u32, f: impl FnOnce(&mut Ring) -> R) -> Option<R> {
    RING.try_with(|r| match r.borrow_mut().as_mut() {
        Some(ring) if ring.id == id => Some(f(ring)),
        _ => None,
    })
    .ok()
    .flatten()
}

/// The error of a socket used off its ring's thread.
fn elsewhere() -> io::Error {
    io::Error::other("an io_uring socket was used off the thread of its ring")
}

/// True when this thread has a ring: sockets made here go through it.
pub fn active() -> bool {
    RING.with(|r| r.borrow().is_some())
}

/// Sets up this thread's ring and spawns its driver on the current (current-thread) runtime.
/// Fails when the kernel or a seccomp filter (Docker's default profile) refuses io_uring.
pub fn start() -> io::Result<()> {
    let ring = build_ring()?;
    let bufs = [Bufs::new(&ring, 0)?, Bufs::new(&ring, 1)?];
    // SAFETY: the ring's fd stays open while the AsyncFd lives: the ring is kept in the
    // thread-local until the thread ends, after the runtime (and its driver task) is gone.
    let fd = unsafe {
        AsyncFd::register_with_interest(RingFd(ring.as_raw_fd()), tokio::io::Interest::READABLE)
    }?;
    RING.with(|r| {
        *r.borrow_mut() = Some(Ring {
            id: NEXT_RING.fetch_add(1, Ordering::Relaxed),
            ring,
            slots: Vec::new(),
            free: Vec::new(),
            bufs,
            queued: false,
            driver: None,
            done: Vec::with_capacity(256),
            lingering: Vec::new(),
            spares: Vec::new(),
        })
    });
    tokio::spawn(drive(fd));
    Ok(())
}

/// Completions run as task work when this thread next enters or leaves the kernel
/// (`COOP_TASKRUN`, Linux 5.19), which posts them and wakes tokio's reactor through the
/// ring's fd. `DEFER_TASKRUN` would be cheaper still, but its completions wait for an
/// `io_uring_enter` and do not wake a poller of the ring's fd: an epoll loop would sleep
/// through them.
fn build_ring() -> io::Result<IoUring> {
    let mut b = IoUring::builder();
    b.setup_cqsize(CQ_ENTRIES)
        .setup_single_issuer()
        .setup_coop_taskrun()
        .setup_taskrun_flag();
    b.build(SQ_ENTRIES)
}

/// Sends what is still queued before the process exits (bounded by `limit`).
pub fn finish(limit: Duration) {
    if !active() {
        return;
    }
    let until = Instant::now() + limit;
    loop {
        let busy = with(|r| {
            r.turn();
            r.slots.iter().flatten().any(|s| s.send_busy)
        });
        if !busy || Instant::now() >= until {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The ring's fd, for tokio's reactor (the ring itself stays in the thread-local).
struct RingFd(RawFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// The driver: submits what a turn queued, reaps completions, cuts off lingering sockets.
async fn drive(fd: AsyncFd<RingFd>) {
    let mut linger: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        std::future::poll_fn(|cx| {
            let mut ready = false;
            if let Poll::Ready(r) = fd.poll_read_ready(cx) {
                if let Ok(mut guard) = r {
                    guard.clear_ready();
                }
                ready = true;
            }
            if let Some(sleep) = linger.as_mut() {
                if sleep.as_mut().poll(cx).is_ready() {
                    linger = None;
                    ready = true;
                }
            }
            with(|r| {
                if ready || r.queued {
                    Poll::Ready(())
                } else {
                    r.driver = Some(cx.waker().clone());
                    Poll::Pending
                }
            })
        })
        .await;
        let next_cutoff = with(|r| {
            if ORPHANED.load(Ordering::Relaxed) {
                r.adopt_orphans();
            }
            r.turn();
            r.cut_off_lingering()
        });
        if let (Some(at), None) = (next_cutoff, &linger) {
            linger = Some(Box::pin(tokio::time::sleep_until(at.into())));
        }
    }
}

impl Drop for Ring {
    /// When the thread ends: cancels what is still in the kernel and, once all of it has
    /// completed, frees the read buffers (until then the kernel may still write into them;
    /// if that takes longer than a second, they are left allocated).
    fn drop(&mut self) {
        for i in 0..self.slots.len() as u32 {
            let Some(s) = self.slots[i as usize].as_ref() else {
                continue;
            };
            let (armed, sending) = (s.input == Input::Armed, s.send_busy);
            for (op, on) in [(RECV, armed), (SEND, sending)] {
                if on {
                    self.slot(i).in_kernel += 1;
                    let e = opcode::AsyncCancel::new(user_data(i, op))
                        .build()
                        .user_data(user_data(i, CANCEL));
                    self.push(e);
                }
            }
        }
        let until = Instant::now() + Duration::from_secs(1);
        let in_kernel = |r: &Ring| r.slots.iter().flatten().any(|s| s.in_kernel > 0);
        while in_kernel(self) && Instant::now() < until {
            let _ = self.ring.submit_and_wait(1);
            let done: Vec<(u64, i32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (ud, _) in done {
                if let Some(s) = self.slots[(ud >> 2) as usize].as_mut() {
                    s.in_kernel = s.in_kernel.saturating_sub(1);
                }
            }
        }
        if in_kernel(self) {
            return;
        }
        for (group, bufs) in self.bufs.iter().enumerate() {
            let _ = self.ring.submitter().unregister_buf_ring(group as u16);
            // SAFETY: nothing is in the kernel any more and the group is unregistered, so
            // the kernel holds no pointer into these allocations, made in `Bufs::new` with
            // these layouts.
            unsafe {
                std::alloc::dealloc(
                    bufs.entries as *mut u8,
                    std::alloc::Layout::from_size_align(usize::from(bufs.count) * 16, 4096)
                        .expect("valid layout"),
                );
                std::alloc::dealloc(
                    bufs.mem,
                    std::alloc::Layout::from_size_align(usize::from(bufs.count) * bufs.size, 4096)
                        .expect("valid layout"),
                );
            }
        }
    }
}

impl Ring {
    fn slot(&mut self, i: u32) -> &mut Slot {
        self.slots[i as usize].as_mut().expect("live io_uring slot")
    }

    fn push(&mut self, e: squeue::Entry) {
        // SAFETY: every buffer an entry names outlives the operation: read buffers are the
        // leaked provided buffers, and a SEND's bytes are its slot's `sending`, which is
        // neither touched nor freed until the SEND completes (a slot is freed only when
        // nothing of it is in the kernel).
        while unsafe { self.ring.submission().push(&e) }.is_err() {
            self.submit();
        }
        if !self.queued {
            self.queued = true;
            if let Some(w) = self.driver.take() {
                w.wake();
            }
        }
    }

    fn submit(&mut self) {
        loop {
            match self.ring.submit() {
                Ok(_) => return,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // The completion queue is full: reap, then submit again.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => self.reap(),
                Err(e) => {
                    tracing::error!(error = %e, "io_uring_enter failed");
                    return;
                }
            }
        }
    }

    /// Takes in what the kernel has finished: completions already posted, and those whose
    /// task work waits for this thread to enter the kernel (`IORING_SQ_TASKRUN`).
    fn catch_up(&mut self) {
        if self.ring.submission().taskrun() || !self.ring.completion().is_empty() {
            self.turn();
        }
    }

    /// Submits, reaps and handles completions until nothing more is queued.
    fn turn(&mut self) {
        loop {
            self.queued = false;
            self.submit();
            self.reap();
            if !self.queued {
                return;
            }
        }
    }

    fn reap(&mut self) {
        let mut done = std::mem::take(&mut self.done);
        done.clear();
        done.extend(
            self.ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        for &(ud, res, flags) in &done {
            self.completed(ud, res, flags);
        }
        self.done = done;
    }

    fn arm(&mut self, i: u32) {
        let s = self.slot(i);
        s.input = Input::Armed;
        s.in_kernel += 1;
        let group = s.group;
        let e = opcode::Recv::new(
            types::Fd(s.fd.as_raw_fd()),
            std::ptr::null_mut(),
            GROUPS[usize::from(group)].0 as u32,
        )
        .buf_group(group)
        .ioprio(POLL_FIRST)
        .build()
        .flags(squeue::Flags::BUFFER_SELECT)
        .user_data(user_data(i, RECV));
        self.push(e);
    }

    /// Gives buffer `bid` of `group` back, and with it a starved socket its RECV.
    fn give(&mut self, group: u16, bid: u16) {
        self.bufs[usize::from(group)].give(bid);
        while let Some(i) = self.bufs[usize::from(group)].starved.pop() {
            match self.slots[i as usize].as_mut() {
                Some(s) if s.starved && !s.dropped => {
                    s.starved = false;
                    self.arm(i);
                    return;
                }
                _ => {}
            }
        }
    }

    fn send(&mut self, i: u32) {
        let s = self.slot(i);
        s.send_busy = true;
        s.in_kernel += 1;
        let rest = &s.sending[s.sent..];
        let e = opcode::Send::new(
            types::Fd(s.fd.as_raw_fd()),
            rest.as_ptr(),
            rest.len() as u32,
        )
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(user_data(i, SEND));
        self.push(e);
    }

    /// Starts sending what was written, unless a SEND runs or nothing waits.
    fn start_send(&mut self, i: u32) {
        let s = self.slot(i);
        if s.send_busy || s.pending.is_empty() || s.send_failed.is_some() {
            return;
        }
        std::mem::swap(&mut s.sending, &mut s.pending);
        s.sent = 0;
        self.send(i);
    }

    fn completed(&mut self, ud: u64, res: i32, flags: u32) {
        let i = (ud >> 2) as u32;
        let op = ud & 3;
        let s = self.slot(i);
        s.in_kernel -= 1;
        match op {
            RECV => {
                let bid = cqueue::buffer_select(flags);
                let s = self.slot(i);
                let group = s.group;
                if s.dropped {
                    if let Some(bid) = bid {
                        self.give(group, bid);
                    }
                } else if res > 0 {
                    let bid = bid.expect("a RECV with data names its buffer");
                    s.input = Input::Ready {
                        bid,
                        len: res as u32,
                        off: 0,
                    };
                    wake(&mut s.reader);
                } else if res == -libc::ENOBUFS {
                    s.input = Input::Idle;
                    s.starved = true;
                    self.bufs[usize::from(group)].starved.push(i);
                } else {
                    s.input = if res == 0 {
                        Input::Eof
                    } else {
                        Input::Failed(-res)
                    };
                    wake(&mut s.reader);
                    if let Some(bid) = bid {
                        self.give(group, bid);
                    }
                }
            }
            SEND => {
                s.send_busy = false;
                // Nothing sent of a non-empty buffer would be sent again for ever: a failure.
                let res = if res == 0 { -libc::EPIPE } else { res };
                if res < 0 {
                    s.send_failed = Some(-res);
                    s.pending = Vec::new();
                    s.sending = Vec::new();
                    s.sent = 0;
                } else {
                    s.sent += res as usize;
                    if s.sent < s.sending.len() {
                        self.send(i);
                        return;
                    }
                    let mut sent = std::mem::take(&mut s.sending);
                    s.sent = 0;
                    if sent.capacity() <= OUT_KEEP && self.spares.len() < OUT_SPARES {
                        sent.clear();
                        self.spares.push(sent);
                    }
                    self.start_send(i);
                }
                wake(&mut self.slot(i).writer);
            }
            _ => {}
        }
        self.free_if_done(i);
    }

    /// Frees a dropped socket's slot (closing its fd) once nothing of it is left.
    fn free_if_done(&mut self, i: u32) {
        let s = self.slot(i);
        if s.dropped && s.in_kernel == 0 && !s.send_busy && s.pending.is_empty() {
            self.slots[i as usize] = None;
            self.free.push(i);
        }
    }

    /// Cancels the SENDs of dropped sockets past their time; returns the next deadline.
    fn cut_off_lingering(&mut self) -> Option<Instant> {
        if self.lingering.is_empty() {
            return None;
        }
        let now = Instant::now();
        let mut lingering = std::mem::take(&mut self.lingering);
        lingering.retain(|&(i, at)| {
            let live = matches!(&self.slots[i as usize], Some(s) if s.dropped && s.send_busy);
            if live && at <= now {
                let s = self.slot(i);
                s.pending = Vec::new();
                s.in_kernel += 1;
                let e = opcode::AsyncCancel::new(user_data(i, SEND))
                    .build()
                    .user_data(user_data(i, CANCEL));
                self.push(e);
                return false;
            }
            live
        });
        self.lingering = lingering;
        self.lingering.iter().map(|&(_, at)| at).min()
    }
}

fn wake(w: &mut Option<Waker>) {
    if let Some(w) = w.take() {
        w.wake();
    }
}

/// A socket served through this thread's ring (see the module's comment).
#[derive(Debug)]
pub struct Sock {
    slot: u32,
    /// The [`Ring::id`] of the ring that serves it.
    ring: u32,
    fd: RawFd,
    unix: bool,
}

impl Sock {
    /// Takes over a connected, non-blocking socket. Call only where [`active`] is true.
    pub fn new(fd: OwnedFd, unix: bool, reads: Reads) -> Sock {
        let raw = fd.as_raw_fd();
        let slot = Slot {
            fd,
            group: reads as u16,
            input: Input::Idle,
            starved: false,
            reader: None,
            sending: Vec::new(),
            sent: 0,
            pending: Vec::new(),
            send_busy: false,
            send_failed: None,
            writer: None,
            in_kernel: 0,
            dropped: false,
        };
        let (slot, ring) = with(|r| {
            let i = match r.free.pop() {
                Some(i) => {
                    r.slots[i as usize] = Some(slot);
                    i
                }
                None => {
                    r.slots.push(Some(slot));
                    (r.slots.len() - 1) as u32
                }
            };
            (i, r.id)
        });
        Sock {
            slot,
            ring,
            fd: raw,
            unix,
        }
    }

    /// Runs `f` on this socket's ring (`None` off its thread).
    fn on<R>(&self, f: impl FnOnce(&mut Ring) -> R) -> Option<R> {
        on(self.ring, f)
    }

    pub fn is_unix(&self) -> bool {
        self.unix
    }

    /// Input is ready to read (or the end of it, or an error): a read will not block.
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.on(|r| {
            let s = r.slot(self.slot);
            match s.input {
                Input::Ready { .. } | Input::Eof | Input::Failed(_) => Poll::Ready(Ok(())),
                Input::Armed => {
                    s.reader = Some(cx.waker().clone());
                    Poll::Pending
                }
                Input::Idle => {
                    s.reader = Some(cx.waker().clone());
                    if !s.starved {
                        r.arm(self.slot);
                    }
                    Poll::Pending
                }
            }
        })
        .unwrap_or_else(|| Poll::Ready(Err(elsewhere())))
    }

    /// Whether a read would find something now (bytes, the end, or an error), going by the
    /// slot's state: no system call, no waker.
    pub fn read_ready_now(&self) -> bool {
        self.on(|r| {
            matches!(
                r.slot(self.slot).input,
                Input::Ready { .. } | Input::Eof | Input::Failed(_)
            )
        })
        .unwrap_or(true)
    }

    /// Copies what was received into `dst` (by `copy(bytes) -> taken`): `WouldBlock` when
    /// nothing is there yet, `Ok(0)` at the end of the stream.
    fn read_with(&self, copy: impl FnOnce(&[u8]) -> usize) -> io::Result<usize> {
        self.on(|r| {
            let s = r.slot(self.slot);
            match s.input {
                Input::Ready { bid, len, off } => {
                    let group = s.group;
                    // SAFETY: the RECV that completed with `bid` filled it; it goes back
                    // to the kernel only below, once all of it is read.
                    let n = copy(unsafe { r.bufs[usize::from(group)].bytes(bid, off, len) });
                    let s = r.slot(self.slot);
                    let off = off + n as u32;
                    if off < len {
                        s.input = Input::Ready { bid, len, off };
                    } else {
                        s.input = Input::Idle;
                        r.give(group, bid);
                        // Wait for the next bytes at once (in the same enter as the rest).
                        if !r.slot(self.slot).starved {
                            r.arm(self.slot);
                        }
                    }
                    Ok(n)
                }
                Input::Idle => {
                    if !s.starved {
                        r.arm(self.slot);
                    }
                    Err(io::ErrorKind::WouldBlock.into())
                }
                Input::Armed => Err(io::ErrorKind::WouldBlock.into()),
                Input::Eof => Ok(0),
                Input::Failed(e) => Err(io::Error::from_raw_os_error(e)),
            }
        })
        .unwrap_or_else(|| Err(elsewhere()))
    }

    pub fn try_read(&self, dst: &mut [u8]) -> io::Result<usize> {
        self.read_with(|src| {
            let n = src.len().min(dst.len());
            dst[..n].copy_from_slice(&src[..n]);
            n
        })
    }

    /// `AsyncRead::poll_read`: copies into `buf`'s unfilled part without initializing the
    /// rest of it (a login's read buffer is mostly room that should stay untouched).
    pub fn poll_read(
        &self,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let r = self.read_with(|src| {
                let n = src.len().min(buf.remaining());
                buf.put_slice(&src[..n]);
                n
            });
            match r {
                Ok(_) => return Poll::Ready(Ok(())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::task::ready!(self.poll_read_ready(cx))?
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Reads into `buf`'s spare room (64 bytes of it made when there is none, as tokio's).
    pub fn try_read_buf<B: bytes::BufMut>(&self, buf: &mut B) -> io::Result<usize> {
        self.read_with(|src| {
            // The room the caller offers (a BytesMut's spare capacity, or less).
            let n = src.len().min(buf.chunk_mut().len());
            buf.put_slice(&src[..n]);
            n
        })
    }

    /// Received bytes wait to be read.
    pub fn has_input(&self) -> bool {
        self.on(|r| matches!(r.slot(self.slot).input, Input::Ready { .. }))
            .unwrap_or(false)
    }

    /// Nothing was received and the peer has not closed: what an idle server looks like.
    /// Completions the kernel has ready are taken in first (a server that died while idle
    /// must not be handed out); that costs a system call only when some are pending.
    pub fn looks_idle(&self) -> bool {
        self.on(|r| {
            r.catch_up();
            matches!(r.slot(self.slot).input, Input::Idle | Input::Armed)
        })
        .unwrap_or(false)
    }

    /// Runs `f`; readiness here is the slot's own state, so there is nothing to clear.
    pub fn try_io<R>(
        &self,
        _interest: tokio::io::Interest,
        f: impl FnOnce() -> io::Result<R>,
    ) -> io::Result<R> {
        f()
    }

    /// Takes all of `data` unless [`OUT_CAP`] bytes already wait (`WouldBlock` then).
    pub fn try_write(&self, data: &[u8]) -> io::Result<usize> {
        self.try_write_vectored(&[io::IoSlice::new(data)])
    }

    pub fn try_write_vectored(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.on(|r| {
            let s = r.slot(self.slot);
            if let Some(e) = s.send_failed {
                return Err(io::Error::from_raw_os_error(e));
            }
            if s.waiting_out() >= OUT_CAP {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            if s.pending.capacity() == 0 {
                let spare = r.spares.pop().unwrap_or_default();
                r.slot(self.slot).pending = spare;
            }
            let s = r.slot(self.slot);
            let mut n = 0;
            for b in bufs {
                s.pending.extend_from_slice(b);
                n += b.len();
            }
            r.start_send(self.slot);
            Ok(n)
        })
        .unwrap_or_else(|| Err(elsewhere()))
    }

    /// Room to write (or a failed socket, whose next write reports the error).
    pub fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.on(|r| {
            let s = r.slot(self.slot);
            if s.send_failed.is_some() || s.waiting_out() < OUT_CAP {
                Poll::Ready(Ok(()))
            } else {
                s.writer = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .unwrap_or_else(|| Poll::Ready(Err(elsewhere())))
    }

    /// Ready once everything written was sent.
    pub fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.on(|r| {
            let s = r.slot(self.slot);
            if let Some(e) = s.send_failed {
                Poll::Ready(Err(io::Error::from_raw_os_error(e)))
            } else if !s.send_busy && s.pending.is_empty() {
                Poll::Ready(Ok(()))
            } else {
                s.writer = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .unwrap_or_else(|| Poll::Ready(Err(elsewhere())))
    }

    /// Sends what was written, then shuts the writing side down.
    pub fn poll_shutdown(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_flush(cx))?;
        Poll::Ready(socket2::SockRef::from(self).shutdown(std::net::Shutdown::Write))
    }
}

impl AsFd for Sock {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the fd belongs to the slot, which lives at least as long as this Sock
        // (it is freed only after the Sock is dropped).
        unsafe { BorrowedFd::borrow_raw(self.fd) }
    }
}

impl Drop for Sock {
    fn drop(&mut self) {
        let slot = self.slot;
        if self.on(|r| r.drop_sock(slot)).is_some() {
            return;
        }
        // Off its ring's thread (or after that thread's ring is gone): the ring's driver
        // closes it at its next turn; shutting the socket down ends a RECV waiting on it,
        // which wakes the driver.
        if let Ok(mut orphans) = ORPHANS.lock() {
            orphans.push((self.ring, slot));
            ORPHANED.store(true, Ordering::Relaxed);
        }
        let _ = socket2::SockRef::from(&*self).shutdown(std::net::Shutdown::Both);
    }
}

impl Ring {
    /// The socket in slot `i` is gone: its input is dropped, its output still sent (for up
    /// to [`LINGER`]), its slot freed once nothing of it is in the kernel.
    fn drop_sock(&mut self, i: u32) {
        let s = self.slot(i);
        s.dropped = true;
        s.reader = None;
        s.writer = None;
        let input = std::mem::replace(&mut s.input, Input::Eof);
        let (sending, group) = (s.send_busy, s.group);
        match input {
            Input::Ready { bid, .. } => self.give(group, bid),
            Input::Armed => {
                self.slot(i).in_kernel += 1;
                let e = opcode::AsyncCancel::new(user_data(i, RECV))
                    .build()
                    .user_data(user_data(i, CANCEL));
                self.push(e);
            }
            _ => {}
        }
        if sending {
            self.lingering.push((i, Instant::now() + LINGER));
            if self.lingering.len() == 1 {
                // The driver arms its timer for the first one.
                self.queued = true;
                if let Some(w) = self.driver.take() {
                    w.wake();
                }
            }
        }
        self.free_if_done(i);
    }

    /// Drops the sockets of this ring that were dropped on another thread.
    fn adopt_orphans(&mut self) {
        let mine: Vec<u32> = match ORPHANS.lock() {
            Ok(mut orphans) => {
                let id = self.id;
                let mine = orphans.iter().filter(|o| o.0 == id).map(|o| o.1).collect();
                orphans.retain(|o| o.0 != id);
                ORPHANED.store(!orphans.is_empty(), Ordering::Relaxed);
                mine
            }
            Err(_) => return,
        };
        for i in mine {
            if self.slots[i as usize].as_ref().is_some_and(|s| !s.dropped) {
                self.drop_sock(i);
            }
        }
    }
}
