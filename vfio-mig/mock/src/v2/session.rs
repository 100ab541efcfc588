// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The data fd sessions of the v2 mock: a saving session served by a feeder thread and a
//! resuming session served by a consumer thread, each over a real pipe whose other end the
//! caller owns; with `data-fd=memfd`, a resuming session over a memfd and no thread (the
//! saving side of that mode is [`super::memfd`]).
//!
//! # Why pipes, and how a pipe says "no more pre-copy data for now"
//!
//! A kernel data fd is a byte stream: reads of any size, partial reads, `poll`, `splice`. A
//! pipe is all of that (and the best `splice` partner). What a pipe cannot do by itself is the
//! pre-copy "temporary end": a 0-byte read now, more data later. A pipe read returns 0 when
//! the pipe is empty and has no writer; so the feeder *closes its write end* when the
//! pre-copy data runs out, and the device *opens a new write end* of the same pipe, through
//! `/proc/self/fd/<O_PATH handle>`, when more data appears (pages dirtied, or STOP_COPY). For
//! an anonymous pipe that open neither blocks nor needs a reader. The device reopens the
//! writer synchronously, under its lock, before the ioctl that produced the data returns, so
//! a reader can never mistake "not written yet" for an end: in STOP_COPY, 0 is the true end.
//!
//! `SOCK_SEQPACKET` pairs also carry 0-byte messages, but silently discard the rest of a
//! datagram when the reader's buffer is smaller; a pipe has no minimum read size.
//!
//! # Threads
//!
//! Each session has one thread that never takes the device's lock: the device locks itself,
//! then the session, then the fault plan; the thread only the session, then the plan. The
//! thread's fd is non-blocking and it waits in `poll(2)` on that fd and an eventfd the device
//! signals, so a stop request always wakes it; stopping joins it. A thread also ends by itself
//! once nothing more can flow: the caller closed its end (EPIPE for the feeder, which blocks
//! SIGPIPE for itself; EOF for the consumer), or a fault or framing error stopped it.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, open, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};
use nix::sys::stat::{fstat, Mode};

use crate::content::{Content, Decoder, Encoder, PACKET_HEADER};
use crate::faults::{FaultHit, V2FaultField, V2FaultPlan};
use crate::pace::Pacer;

use super::memfd;

/// The fault plan, shared by the device and its session threads.
pub(super) type Faults = Arc<Mutex<V2FaultPlan>>;

/// Pipe buffer size asked for (the unprivileged maximum by default); a smaller pipe only
/// means more wake-ups.
const PIPE_SIZE: i32 = 1 << 20;
/// Largest piece the feeder emits at once, and the consumer's read buffer.
const PIECE: u64 = 256 << 10;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking session thread leaves consistent-enough state for diagnostics.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Locks the fault plan (the innermost lock: nothing is locked while it is held).
pub(super) fn lock_faults(f: &Faults) -> MutexGuard<'_, V2FaultPlan> {
    lock(f)
}

/// The identity of an open file, to recognise a data fd the caller hands back.
pub(super) type FileId = (u64, u64);

/// The (device, inode) pair of an open file.
pub(super) fn file_id(fd: BorrowedFd<'_>) -> io::Result<FileId> {
    let st = fstat(fd)?;
    Ok((st.st_dev, st.st_ino))
}

/// Bytes buffered in a pipe (`FIONREAD`, on either end).
fn fionread(fd: BorrowedFd<'_>) -> u64 {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, which points at `n`; the fd is
    // borrowed, so it is open for the duration of the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    if r < 0 {
        0
    } else {
        n.max(0) as u64
    }
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// A pipe with a large buffer: (read end, write end), both close-on-exec and blocking.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let _ = fcntl(&w, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
    Ok((r, w))
}

/// An eventfd that wakes a session thread.
#[derive(Debug)]
struct Wake(OwnedFd);

impl Wake {
    fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes no pointers; a non-negative return is a new fd we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd and nothing else owns it.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn notify(&self) {
        // Only EAGAIN (counter saturated: already signalled) can fail here.
        let _ = nix::unistd::write(&self.0, &1u64.to_ne_bytes());
    }

    fn drain(&self) {
        let mut b = [0u8; 8];
        let _ = nix::unistd::read(&self.0, &mut b);
    }

    /// Waits until `fd` (if any) is ready for `events` or the eventfd is signalled.
    fn wait(&self, fd: Option<(BorrowedFd<'_>, PollFlags)>) {
        self.wait_for(fd, PollTimeout::NONE);
    }

    /// [`Wake::wait`], at most `timeout`.
    fn wait_for(&self, fd: Option<(BorrowedFd<'_>, PollFlags)>, timeout: PollTimeout) {
        let mut fds = vec![PollFd::new(self.0.as_fd(), PollFlags::POLLIN)];
        if let Some((fd, events)) = fd {
            fds.push(PollFd::new(fd, events));
        }
        // EINTR and other errors just make the caller loop once more.
        let _ = poll(&mut fds, timeout);
    }
}

/// A way back to a pipe after its write end was closed: an `O_PATH` handle on it, reopened
/// through `/proc/self/fd`.
#[derive(Debug)]
struct Reopen(OwnedFd);

impl Reopen {
    fn new(end: BorrowedFd<'_>) -> io::Result<Self> {
        let path = format!("/proc/self/fd/{}", end.as_raw_fd());
        open(
            path.as_str(),
            OFlag::O_PATH | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map(Self)
        .map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("the v2 mock needs /proc to emulate pre-copy data fds: open {path}: {e}"),
            )
        })
    }

    /// A new, non-blocking end of the pipe (`O_WRONLY` or `O_RDONLY`).
    fn open(&self, mode: OFlag) -> io::Result<OwnedFd> {
        let path = format!("/proc/self/fd/{}", self.0.as_raw_fd());
        Ok(open(
            path.as_str(),
            mode | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?)
    }
}

/// Blocks SIGPIPE in the calling thread, so a write into a closed pipe fails with EPIPE
/// instead of killing the process (the pending signal dies with the thread).
fn block_sigpipe() {
    let mut set = SigSet::empty();
    set.add(Signal::SIGPIPE);
    let _ = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None);
}

/// The state of a saving session, shared by the device and the feeder.
#[derive(Debug)]
pub(super) struct SaveState {
    /// The device state being saved; the device dirties pages and finishes it.
    pub encoder: Encoder,
    /// Bytes of the initial data: the first pass (every page once), which comes first in the
    /// stream, or after a re-initialisation what was unread then.
    pub initial_total: u64,
    /// Stream offset where the initial data starts: 0, or where the caller had read to when
    /// the device last re-initialised (mlx5's `pre_copy_initial_bytes_start`).
    pub initial_start: u64,
    /// PRECOPY_INFO queries answered in this session.
    pub info_queries: u64,
    /// Emitted by the encoder, not yet written into the pipe.
    buf: Vec<u8>,
    pos: usize,
    /// Stream bytes emitted so far (the next emission's stream offset).
    emitted: u64,
    /// Fault blocks (of `chunk` bytes) counted so far.
    blocks: u64,
    chunk: u64,
    /// Bytes written into the pipe.
    pub written: u64,
    /// Our write end while open.
    writer: Option<Arc<OwnedFd>>,
    /// A `data-read` fault stopped the feeding.
    pub failed: Option<FaultHit>,
    /// The failure was reported by an arc.
    pub fail_reported: bool,
    /// The device applied the failure's `:error`.
    pub error_applied: bool,
    /// The caller closed its end (a write failed with EPIPE).
    pub reader_gone: bool,
    shutdown: bool,
    /// Keep the writer open at pre-copy's temporary end (the device answers ENOMSG itself).
    keep_open: bool,
    /// Data the device produced becomes readable this long after (asynchronous saves).
    latency: Option<Duration>,
    /// When the batch produced after the feeder last went idle becomes readable.
    batch_ready: Option<Instant>,
    /// The device's data rate (`rate=`): the feeder produces no faster.
    pacer: Option<Pacer>,
    /// Nothing becomes readable before this instant (`precopy-delay=`: the first save of
    /// pre-copy completes asynchronously).
    not_before: Option<Instant>,
}

impl SaveState {
    /// Whether the device's first asynchronous save is still under way.
    pub fn delayed(&self) -> bool {
        self.not_before.is_some_and(|t| Instant::now() < t)
    }

    /// Stream bytes not yet in the pipe: pending in the encoder or in the feeder's buffer.
    pub fn unwritten(&self) -> u64 {
        self.encoder.pending() + (self.buf.len() - self.pos) as u64
    }

    /// Whether the whole stream, END included, went into the pipe.
    pub fn all_written(&self) -> bool {
        self.encoder.is_done() && self.pos == self.buf.len()
    }
}

#[derive(Debug)]
struct SaveShared {
    state: Mutex<SaveState>,
    wake: Wake,
    faults: Faults,
}

/// What the feeder does after one step under the lock.
enum Next {
    /// Wrote something: loop.
    Progress,
    /// The pipe is full: wait until this writer can take more.
    Writable(Arc<OwnedFd>),
    /// Nothing to do until the device signals.
    Idle,
    /// The next batch becomes readable after this long (or a signal).
    Sleep(Duration),
    /// Nothing more will ever be written (caller gone, or a fault): the thread ends.
    Done,
}

impl SaveShared {
    /// One step of the feeder, under the session lock.
    fn step(&self, st: &mut SaveState) -> Next {
        if st.pos == st.buf.len() {
            if st.failed.is_some() || st.reader_gone {
                st.writer = None;
                return Next::Done;
            }
            if st.encoder.pending() == 0 {
                // End of the pre-copy data for now, or of the stream: the caller reads 0
                // once it has drained the pipe (unless the device answers ENOMSG for a
                // temporary end: then only the true end closes the writer).
                if !st.keep_open || st.encoder.is_done() {
                    st.writer = None;
                }
                st.batch_ready = None;
                return Next::Idle;
            }
            if let Some(t) = st.not_before {
                let now = Instant::now();
                if now < t {
                    return Next::Sleep(t - now);
                }
                st.not_before = None;
            }
            if let Some(latency) = st.latency {
                // An asynchronous save: the batch appears once the device's command completes.
                let now = Instant::now();
                let ready = *st.batch_ready.get_or_insert(now + latency);
                if now < ready {
                    return Next::Sleep(ready - now);
                }
            }
            if let Some(p) = &st.pacer {
                // A bandwidth-modelled device: the next piece is not produced yet.
                let wait = p.wait(Instant::now());
                if !wait.is_zero() {
                    return Next::Sleep(wait);
                }
            }
            // The next piece stays inside one fault block; a block's first piece counts it.
            let block = st.emitted / st.chunk;
            if block >= st.blocks {
                st.blocks = block + 1;
                if let Err(hit) = lock(&self.faults).check(V2FaultField::DataRead, None) {
                    st.failed = Some(hit);
                    st.writer = None;
                    return Next::Done;
                }
            }
            let room = (block + 1) * st.chunk - st.emitted;
            let n = room.min(PIECE).min(st.encoder.pending()) as usize;
            st.buf.resize(n, 0);
            let got = st.encoder.emit(&mut st.buf);
            st.buf.truncate(got);
            st.pos = 0;
            st.emitted += got as u64;
            if let Some(p) = &mut st.pacer {
                p.took(got as u64, Instant::now());
            }
        }
        let Some(w) = st.writer.clone() else {
            // Data but no writer: only until the device reopens one (it does before it
            // returns from whatever produced the data).
            return Next::Idle;
        };
        match nix::unistd::write(&*w, &st.buf[st.pos..]) {
            Ok(n) => {
                st.pos += n;
                st.written += n as u64;
                Next::Progress
            }
            Err(Errno::EAGAIN) => Next::Writable(w),
            Err(Errno::EINTR) => Next::Progress,
            Err(_) => {
                // EPIPE: the caller closed its end; nobody will read what is left.
                st.reader_gone = true;
                st.writer = None;
                Next::Done
            }
        }
    }

    fn feed(&self) {
        block_sigpipe();
        loop {
            self.wake.drain();
            let next = {
                let mut st = lock(&self.state);
                if st.shutdown {
                    st.writer = None;
                    return;
                }
                self.step(&mut st)
            };
            match next {
                Next::Progress => {}
                Next::Writable(w) => self.wake.wait(Some((w.as_fd(), PollFlags::POLLOUT))),
                Next::Idle => self.wake.wait(None),
                Next::Sleep(d) => {
                    let ms = u16::try_from(d.as_millis().max(1)).unwrap_or(u16::MAX);
                    self.wake.wait_for(None, PollTimeout::from(ms));
                }
                Next::Done => return,
            }
        }
    }
}

/// A saving session: the caller reads the stream from the read end of a pipe the feeder
/// thread writes.
#[derive(Debug)]
pub(super) struct SaveSession {
    shared: Arc<SaveShared>,
    thread: Option<JoinHandle<()>>,
    reopen: Option<Reopen>,
    /// The pipe's identity, to recognise the caller's fd.
    pub id: FileId,
}

/// What a stopped saving session leaves behind.
#[derive(Debug)]
pub(super) struct SaveEnd {
    /// The device state (with the pages dirtied meanwhile).
    pub encoder: Encoder,
    /// Stream bytes the caller read.
    pub consumed: u64,
    /// The caller read the whole stream, END included.
    pub complete: bool,
}

impl SaveSession {
    /// Starts a session streaming `encoder`, in `chunk`-byte fault blocks. A pre-copy session
    /// needs `/proc` to reopen its writer. Gives the encoder back if the session cannot start.
    pub fn start(
        encoder: Encoder,
        pre_copy: bool,
        chunk: u64,
        faults: Faults,
        feed: FeedOptions,
    ) -> Result<(Self, OwnedFd), Box<(Encoder, io::Error)>> {
        let setup = || -> io::Result<(OwnedFd, OwnedFd, Option<Reopen>, FileId, Wake)> {
            let (r, w) = pipe()?;
            set_nonblocking(&w)?;
            // Without /proc only pre-copy is impossible; other sessions just estimate less.
            let reopen = match Reopen::new(r.as_fd()) {
                Ok(h) => Some(h),
                Err(e) if pre_copy => return Err(e),
                Err(_) => None,
            };
            let id = file_id(r.as_fd())?;
            Ok((r, w, reopen, id, Wake::new()?))
        };
        let (r, w, reopen, id, wake) = match setup() {
            Ok(v) => v,
            Err(e) => return Err(Box::new((encoder, e))),
        };
        // The initial pass: what the encoder holds before anything is dirtied (END aside).
        let end = if encoder.is_finished() {
            PACKET_HEADER as u64
        } else {
            0
        };
        let initial_total = encoder.pending() - end;
        let shared = Arc::new(SaveShared {
            state: Mutex::new(SaveState {
                encoder,
                initial_total,
                initial_start: 0,
                info_queries: 0,
                buf: Vec::new(),
                pos: 0,
                emitted: 0,
                blocks: 0,
                chunk: chunk.max(1),
                written: 0,
                writer: Some(Arc::new(w)),
                failed: None,
                fail_reported: false,
                error_applied: false,
                reader_gone: false,
                shutdown: false,
                keep_open: feed.keep_open,
                latency: feed.latency,
                batch_ready: None,
                pacer: (feed.rate > 0).then(|| Pacer::new(feed.rate)),
                not_before: (pre_copy && !feed.first_delay.is_zero())
                    .then(|| Instant::now() + feed.first_delay),
            }),
            wake,
            faults,
        });
        let feeder = shared.clone();
        let thread = std::thread::Builder::new()
            .name("mock-v2-feeder".into())
            .spawn(move || feeder.feed());
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                drop(r);
                let shared = Arc::try_unwrap(shared).expect("no thread holds it");
                let st = shared.state.into_inner().unwrap_or_else(|e| e.into_inner());
                return Err(Box::new((st.encoder, e)));
            }
        };
        Ok((
            Self {
                shared,
                thread: Some(thread),
                reopen,
                id,
            },
            r,
        ))
    }

    /// The shared state.
    pub fn lock(&self) -> MutexGuard<'_, SaveState> {
        lock(&self.shared.state)
    }

    /// After the device added stream data (dirtied pages, finished the stream): reopens the
    /// writer if the feeder had closed it, so the caller's next read waits for the data
    /// instead of seeing an end, and wakes the feeder.
    pub fn more_data(&self, st: &mut SaveState) -> io::Result<()> {
        if st.unwritten() > 0
            && st.writer.is_none()
            && st.failed.is_none()
            && !st.reader_gone
            && !st.shutdown
        {
            let reopen = self.reopen.as_ref().ok_or_else(|| {
                io::Error::new(io::ErrorKind::Unsupported, "no way to reopen the data pipe")
            })?;
            st.writer = Some(Arc::new(reopen.open(OFlag::O_WRONLY)?));
        }
        self.shared.wake.notify();
        Ok(())
    }

    /// Bytes in the pipe, unread: by `FIONREAD` on the caller's fd when given, else on our
    /// writer, else on a momentary reader (0 without `/proc`).
    pub fn in_pipe(&self, st: &SaveState, caller: Option<BorrowedFd<'_>>) -> u64 {
        if let Some(fd) = caller {
            return fionread(fd);
        }
        if let Some(w) = &st.writer {
            return fionread(w.as_fd());
        }
        match self.reopen.as_ref().map(|h| h.open(OFlag::O_RDONLY)) {
            Some(Ok(r)) => fionread(r.as_fd()),
            _ => 0,
        }
    }

    /// Stops the feeder (closing the writer: the caller reads what is buffered, then 0) and
    /// returns the device state and what was read.
    pub fn stop(mut self) -> SaveEnd {
        self.halt();
        let mut st = self.lock();
        let in_pipe = self.in_pipe(&st, None);
        let consumed = st.written.saturating_sub(in_pipe);
        let complete = st.all_written() && in_pipe == 0 && st.failed.is_none();
        // `Drop` forbids moving the encoder out: leave a one-byte stand-in.
        let encoder = std::mem::replace(&mut st.encoder, Encoder::new(Content::new(0, 1, 1)));
        SaveEnd {
            encoder,
            consumed,
            complete,
        }
    }

    /// Stream bytes the caller has read so far.
    pub fn consumed(&self, st: &SaveState) -> u64 {
        st.written.saturating_sub(self.in_pipe(st, None))
    }

    fn halt(&mut self) {
        if let Some(t) = self.thread.take() {
            lock(&self.shared.state).shutdown = true;
            self.shared.wake.notify();
            let _ = t.join();
        }
        lock(&self.shared.state).writer = None;
    }
}

impl Drop for SaveSession {
    fn drop(&mut self) {
        self.halt();
    }
}

/// How a saving session's feeder behaves (the driver profile's choices).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct FeedOptions {
    /// Keep the writer open at pre-copy's temporary end (the device answers ENOMSG itself).
    pub keep_open: bool,
    /// Data becomes readable this long after the device produced it.
    pub latency: Option<Duration>,
    /// Bytes per second the device produces (`rate=`; 0: as fast as the feeder can).
    pub rate: u64,
    /// Pre-copy data becomes readable only this long after the session starts.
    pub first_delay: Duration,
}

/// The state of a resuming session, shared by the device and the consumer.
#[derive(Debug)]
pub(super) struct LoadState {
    /// The state received so far.
    pub decoder: Decoder,
    /// Stream bytes received (fed to the decoder).
    pub received: u64,
    /// A `data-write` fault stopped the consuming.
    pub failed: Option<FaultHit>,
    /// The device applied the failure's `:error`.
    pub error_applied: bool,
    /// The stream's framing broke: the consumer stopped.
    pub framing: Option<String>,
    /// Fault blocks (of `chunk` bytes) counted so far.
    blocks: u64,
    chunk: u64,
    /// A write through the device refused data: later writes fail with this errno.
    pub refused: Option<i32>,
    /// Drain what is in the pipe, then exit.
    drain_exit: bool,
    /// Exit now.
    stop_now: bool,
    /// The device's acceptance rate (`accept-rate=`): the consumer takes no faster.
    pacer: Option<Pacer>,
}

impl LoadState {
    /// How long the device must wait before it takes more (zero: now).
    fn accept_wait(&self) -> Duration {
        self.pacer
            .as_ref()
            .map_or(Duration::ZERO, |p| p.wait(Instant::now()))
    }

    /// Takes `data` at stream offset `received`: counts fault blocks and feeds the decoder.
    /// Returns false when the consumer must stop (fault or framing error).
    pub fn take(&mut self, data: &[u8], faults: &Faults) -> bool {
        if let Some(p) = &mut self.pacer {
            p.took(data.len() as u64, Instant::now());
        }
        let end = self.received + data.len() as u64;
        let mut usable = data.len();
        while self.blocks * self.chunk < end {
            if let Err(hit) = lock(faults).check(V2FaultField::DataWrite, None) {
                // The failing block's bytes are refused: feed only what came before it.
                usable = (self.blocks * self.chunk).saturating_sub(self.received) as usize;
                self.failed = Some(hit);
                break;
            }
            self.blocks += 1;
        }
        if usable > 0 {
            if let Err(e) = self.decoder.feed(&data[..usable]) {
                self.framing = Some(e);
            }
            self.received += usable as u64;
        }
        self.failed.is_none() && self.framing.is_none()
    }
}

#[derive(Debug)]
struct LoadShared {
    state: Mutex<LoadState>,
    wake: Wake,
    faults: Faults,
}

impl LoadShared {
    fn new(
        decoder: Decoder,
        chunk: u64,
        faults: Faults,
        accept_rate: u64,
    ) -> io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            state: Mutex::new(LoadState {
                decoder,
                received: 0,
                failed: None,
                error_applied: false,
                framing: None,
                refused: None,
                blocks: 0,
                chunk: chunk.max(1),
                drain_exit: false,
                stop_now: false,
                pacer: (accept_rate > 0).then(|| Pacer::new(accept_rate)),
            }),
            wake: Wake::new()?,
            faults,
        }))
    }

    fn consume(&self, reader: OwnedFd) {
        let mut reader = Some(reader);
        let mut buf = vec![0u8; PIECE as usize];
        loop {
            self.wake.drain();
            let (drain_exit, wait) = {
                let st = lock(&self.state);
                if st.stop_now {
                    return;
                }
                (st.drain_exit, st.accept_wait())
            };
            if !wait.is_zero() {
                // A bandwidth-modelled device is still busy with what it took; a stop
                // request wakes it.
                let ms = u16::try_from(wait.as_millis().max(1)).unwrap_or(u16::MAX);
                self.wake.wait_for(None, PollTimeout::from(ms));
                continue;
            }
            // No reader left (EOF, fault, framing error): nothing more can arrive.
            let Some(r) = &reader else {
                return;
            };
            match nix::unistd::read(r, &mut buf) {
                // The caller closed its end: nothing more will come.
                Ok(0) => reader = None,
                Ok(n) => {
                    if !lock(&self.state).take(&buf[..n], &self.faults) {
                        // Closing our end makes the caller's next write fail (EPIPE).
                        reader = None;
                    }
                }
                Err(Errno::EAGAIN) => {
                    if drain_exit {
                        return;
                    }
                    self.wake.wait(Some((r.as_fd(), PollFlags::POLLIN)));
                }
                Err(Errno::EINTR) => {}
                Err(_) => reader = None,
            }
        }
    }
}

/// A resuming session: the caller writes the stream into a pipe the consumer thread reads,
/// or (`data-fd=memfd`) into a memfd the device reads back when the caller is done.
#[derive(Debug)]
pub(super) struct LoadSession {
    shared: Arc<LoadShared>,
    thread: Option<JoinHandle<()>>,
    /// The memfd the caller writes, until [`LoadSession::finish`] reads it back.
    file: Option<OwnedFd>,
    /// The pipe's (or memfd's) identity, to recognise the caller's fd.
    pub id: FileId,
}

impl LoadSession {
    /// Starts a session decoding into `decoder`, in `chunk`-byte fault blocks, taking at most
    /// `accept_rate` bytes a second (0: unlimited); returns the caller's write end.
    pub fn start(
        decoder: Decoder,
        chunk: u64,
        faults: Faults,
        accept_rate: u64,
    ) -> io::Result<(Self, OwnedFd)> {
        let (r, w) = pipe()?;
        set_nonblocking(&r)?;
        let id = file_id(r.as_fd())?;
        let shared = LoadShared::new(decoder, chunk, faults, accept_rate)?;
        let consumer = shared.clone();
        let thread = std::thread::Builder::new()
            .name("mock-v2-consumer".into())
            .spawn(move || consumer.consume(r))?;
        Ok((
            Self {
                shared,
                thread: Some(thread),
                file: None,
                id,
            },
            w,
        ))
    }

    /// Starts a session whose caller writes into a new memfd (no thread); the device decodes
    /// it in [`LoadSession::finish`]. Returns the caller's write-only description.
    pub fn start_file(decoder: Decoder, chunk: u64, faults: Faults) -> io::Result<(Self, OwnedFd)> {
        let file = memfd::create("vfio-mig-mock-v2-resume")?;
        let w = memfd::reopen(file.as_fd(), OFlag::O_WRONLY)?;
        let id = file_id(file.as_fd())?;
        let shared = LoadShared::new(decoder, chunk, faults, 0)?;
        Ok((
            Self {
                shared,
                thread: None,
                file: Some(file),
                id,
            },
            w,
        ))
    }

    /// The shared state.
    pub fn lock(&self) -> MutexGuard<'_, LoadState> {
        lock(&self.shared.state)
    }

    /// Takes a write made through the device (`DeviceIo::write_data`) straight into the
    /// decoder, in the caller's thread, so that the write itself can be refused.
    pub fn take_direct(&self, data: &[u8]) -> MutexGuard<'_, LoadState> {
        let wait = self.lock().accept_wait();
        if !wait.is_zero() {
            // The write blocks while the device is busy with what it took before.
            std::thread::sleep(wait);
        }
        let mut st = self.lock();
        st.take(data, &self.shared.faults);
        st
    }

    /// Consumes everything the caller wrote so far (its writes returned, so it is all in the
    /// pipe), then stops the consumer and closes our end: later writes fail with EPIPE.
    ///
    /// A memfd session decodes what the caller wrote into its memfd, then empties and seals
    /// it (later writes fail with EPERM).
    pub fn finish(&mut self) {
        if let Some(t) = self.thread.take() {
            self.lock().drain_exit = true;
            self.shared.wake.notify();
            let _ = t.join();
        }
        if let Some(file) = self.file.take() {
            self.take_file(&file);
            if let Err(e) = memfd::empty_and_seal(file.as_fd()) {
                log::warn!("mock v2: cannot seal the resuming memfd: {e}");
            }
        }
    }

    /// Feeds the decoder from the memfd, until its end or until the decoder refuses.
    fn take_file(&self, file: &OwnedFd) {
        let mut buf = vec![0u8; PIECE as usize];
        let mut offset = 0i64;
        loop {
            let n = match nix::sys::uio::pread(file, &mut buf, offset) {
                Ok(0) => return,
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    self.lock().framing = Some(format!("read back the resuming memfd: {e}"));
                    return;
                }
            };
            if !self.lock().take(&buf[..n], &self.shared.faults) {
                return;
            }
            offset += n as i64;
        }
    }

    /// Stops the consumer now, closing our end (a memfd is emptied and sealed, undecoded).
    pub fn abort(&mut self) {
        if let Some(t) = self.thread.take() {
            self.lock().stop_now = true;
            self.shared.wake.notify();
            let _ = t.join();
        }
        if let Some(file) = self.file.take() {
            let _ = memfd::empty_and_seal(file.as_fd());
        }
    }
}

impl Drop for LoadSession {
    fn drop(&mut self) {
        self.abort();
    }
}
