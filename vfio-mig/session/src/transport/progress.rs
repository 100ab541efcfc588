// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A floor under the rate at which a peer's bytes arrive, so that a peer trickling bytes
//! (each within the idle timeout) cannot hold a reader without end. It is a token bucket of
//! waiting time: the reads may wait for the peer at most `reserve` in all, and every byte
//! received gives back `1 / bytes_per_sec` seconds, up to `reserve` again. A peer that sends
//! at least `bytes_per_sec` on average, with pauses that fit in the reserve, is never
//! stopped; one that sends less runs the reserve down and its next read fails.
//!
//! # One bucket for a session's channels
//!
//! The further channels of a session share the main connection's bucket
//! ([`Progress::share`]): a byte on any channel refills it, and wall-clock time during which
//! at least one channel waits in a read drains it, once however many wait. A channel whose
//! devices are done (it reads no more), or that waits while another carries the data, so
//! costs nothing as long as the session as a whole keeps up the rate; a source trickling on
//! every channel, or keeping one silent, spends the one reserve as a one-channel source
//! would. Time in which no read waits (the destination's own work) never counts. For the
//! same reason a read under a floor waits for its first byte at most the idle timeout
//! counted from the session's last byte, not from its own start: a channel waiting while
//! another delivers is not idle.
//!
//! # Counted below TLS
//!
//! [`Progress::read`] wraps each *raw* read of the socket: the plain connection's, and the
//! TLS session's reads of ciphertext (`tls::TlsStream`). So bytes trickled inside
//! one TLS record count, and a read waiting for the rest of a record is bounded like any
//! other.

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// The rule: the reserve of waiting time and the rate that refills it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgressFloor {
    /// The most the reads may wait in all while nothing arrives (also the bucket's size).
    pub reserve: Duration,
    /// Bytes that give back one second of waiting.
    pub bytes_per_sec: u64,
}

/// The floor of one connection, shared by its handles: none, or a bucket, possibly shared
/// with the other channels of its session.
#[derive(Debug, Clone, Default)]
pub(crate) struct Progress(Arc<Mutex<Option<Arc<Mutex<Bucket>>>>>);

#[derive(Debug)]
struct Bucket {
    floor: ProgressFloor,
    /// What is left of the reserve as of `stamp`.
    left: Duration,
    stamp: Instant,
    /// Reads waiting now: while any does, `left` drains with wall-clock time.
    waiting: usize,
    /// The last byte of any channel (or when the rule began).
    last_byte: Instant,
    received: u64,
    waited: Duration,
}

/// The error of a read that waited out the reserve: final (the connection's own timeout
/// messages leave it as it is, see [`is_floor_error`]).
#[derive(Debug, thiserror::Error)]
#[error(
    "timed out: {peer} is too slow: {received} bytes in {waited:.1} s of waiting, under the \
     floor of {bytes_per_sec} bytes/s (with a reserve of {reserve:?} for pauses)"
)]
struct TooSlow {
    peer: String,
    received: u64,
    waited: f64,
    bytes_per_sec: u64,
    reserve: Duration,
}

/// Whether `e` is the floor's error (not a socket timeout to be reworded).
pub(crate) fn is_floor_error(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<TooSlow>())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Bucket {
    fn new(floor: ProgressFloor) -> Self {
        let now = Instant::now();
        Self {
            floor,
            left: floor.reserve,
            stamp: now,
            waiting: 0,
            last_byte: now,
            received: 0,
            waited: Duration::ZERO,
        }
    }

    /// Brings `left` up to `now`: drained by the time since `stamp` if a read waited.
    fn settle(&mut self, now: Instant) {
        let spent = now.saturating_duration_since(self.stamp);
        if self.waiting > 0 {
            self.left = self.left.saturating_sub(spent);
            self.waited += spent;
        }
        self.stamp = self.stamp.max(now);
    }

    /// Accounts `bytes` that arrived at `now`. A reserve that ran out stays spent.
    fn earn(&mut self, bytes: usize, now: Instant) {
        self.settle(now);
        if bytes == 0 {
            return;
        }
        let earned = Duration::try_from_secs_f64(bytes as f64 / self.floor.bytes_per_sec as f64)
            .unwrap_or(Duration::MAX);
        if !self.left.is_zero() {
            self.left = self.left.saturating_add(earned).min(self.floor.reserve);
        }
        self.received += bytes as u64;
        self.last_byte = self.last_byte.max(now);
    }

    fn too_slow(&self, peer: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            TooSlow {
                peer: peer.to_owned(),
                received: self.received,
                waited: self.waited.as_secs_f64(),
                bytes_per_sec: self.floor.bytes_per_sec,
                reserve: self.floor.reserve,
            },
        )
    }
}

/// One read waiting on a bucket: counted from `begin` until dropped.
struct Waiting<'a>(&'a Mutex<Bucket>);

impl<'a> Waiting<'a> {
    fn begin(bucket: &'a Mutex<Bucket>, peer: &str) -> io::Result<Self> {
        let mut b = lock(bucket);
        b.settle(Instant::now());
        if b.left.is_zero() {
            return Err(b.too_slow(peer));
        }
        b.waiting += 1;
        Ok(Self(bucket))
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut b = lock(self.0);
        b.settle(Instant::now());
        b.waiting -= 1;
    }
}

impl Progress {
    fn bucket(&self) -> Option<Arc<Mutex<Bucket>>> {
        lock(&self.0).clone()
    }

    /// Starts (a full reserve) or with `None` ends the rule, for every handle.
    pub(crate) fn set(&self, floor: Option<ProgressFloor>) {
        *lock(&self.0) = floor.map(|f| Arc::new(Mutex::new(Bucket::new(f))));
    }

    /// Makes these reads count in `other`'s bucket (none if it has none): a further channel
    /// joins its session's main connection.
    pub(crate) fn share(&self, other: &Progress) {
        if !Arc::ptr_eq(&self.0, &other.0) {
            *lock(&self.0) = other.bucket();
        }
    }

    /// Accounts bytes that arrived without a wait (read ahead by a readiness check).
    #[cfg(feature = "tls")]
    pub(crate) fn arrived(&self, bytes: usize) {
        if let Some(b) = self.bucket() {
            lock(&b).earn(bytes, Instant::now());
        }
    }

    /// One raw read of the socket `fd` (`read`, which blocks at most `idle`, the socket's
    /// own timeout) under the rule. Without a rule, just `read`. With one: waits until `fd`
    /// is readable, at most what is left of the reserve (then the floor's error, naming
    /// `peer`) and at most `idle` from this read's start or the session's last byte,
    /// whichever is later (then `WouldBlock`, as the socket's timeout would end it); then
    /// reads and accounts the bytes.
    pub(crate) fn read(
        &self,
        fd: BorrowedFd<'_>,
        idle: Option<Duration>,
        peer: &str,
        read: impl FnOnce() -> io::Result<usize>,
    ) -> io::Result<usize> {
        let Some(bucket) = self.bucket() else {
            return read();
        };
        let started = Instant::now();
        let waiting = Waiting::begin(&bucket, peer)?;
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        loop {
            let now = Instant::now();
            let (left, last_byte) = {
                let mut b = lock(&bucket);
                b.settle(now);
                if b.left.is_zero() {
                    return Err(b.too_slow(peer));
                }
                (b.left, b.last_byte)
            };
            let mut wait = left;
            // An idle timeout past what an `Instant` can hold never ends the wait.
            if let Some(end) = idle.and_then(|t| started.max(last_byte).checked_add(t)) {
                let until = end.saturating_duration_since(now);
                if until.is_zero() {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                wait = wait.min(until);
            }
            // Rounded up: a poll that ends early only loops.
            let ms = wait.as_micros().div_ceil(1000);
            let timeout = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
            match poll(&mut fds, timeout) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => {}
                Ok(_) => break,
                Err(e) => return Err(e.into()),
            }
        }
        drop(waiting);
        let r = read();
        if let Ok(n) = r {
            lock(&bucket).earn(n, Instant::now());
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    const FLOOR: ProgressFloor = ProgressFloor {
        reserve: Duration::from_millis(400),
        bytes_per_sec: 1000,
    };

    fn read_one(p: &Progress, s: &UnixStream, idle: Option<Duration>) -> io::Result<usize> {
        let mut buf = [0u8; 64];
        p.read(s.as_fd(), idle, "the peer", || (&*s).read(&mut buf))
    }

    /// Without a rule a read is the socket's own; with one, a silent peer is let go once the
    /// reserve is spent, with the floor's error, whatever the idle timeout.
    #[test]
    fn a_silent_peer_spends_the_reserve() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let p = Progress::default();
        b.write_all(b"x").unwrap();
        assert_eq!(read_one(&p, &a, None).unwrap(), 1, "no rule");
        p.set(Some(FLOOR));
        let started = Instant::now();
        let e = read_one(&p, &a, Some(Duration::from_secs(30))).unwrap_err();
        assert!(is_floor_error(&e), "{e}");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("the peer is too slow"), "{e}");
        assert!(started.elapsed() >= FLOOR.reserve);
        // Spent is spent: data now does not help.
        b.write_all(b"y").unwrap();
        assert!(is_floor_error(&read_one(&p, &a, None).unwrap_err()));
    }

    /// The idle timeout, counted from the session's last byte, ends a read as the socket's
    /// own timeout would (`WouldBlock`), not as the floor.
    #[test]
    fn the_idle_timeout_ends_a_read_as_the_socket_would() {
        let (a, _b) = UnixStream::pair().unwrap();
        let p = Progress::default();
        p.set(Some(ProgressFloor {
            reserve: Duration::from_secs(30),
            ..FLOOR
        }));
        let e = read_one(&p, &a, Some(Duration::from_millis(50))).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
        assert!(!is_floor_error(&e));
    }

    /// Two channels share one bucket: time in which both wait is counted once, and a byte
    /// on one refills the reserve of both; a channel that waits while the other delivers is
    /// neither drained out nor idle.
    #[test]
    fn shared_channels_drain_once_and_refill_each_other() {
        let (a, mut a_peer) = UnixStream::pair().unwrap();
        let (c, mut c_peer) = UnixStream::pair().unwrap();
        let (pa, pc) = (Progress::default(), Progress::default());
        pa.set(Some(FLOOR));
        pc.share(&pa);
        // Channel c waits through 2 s (five reserves, two idle timeouts) while a gets 400
        // bytes (0.4 s of waiting) every 100 ms; then c's byte comes.
        let idle = Some(Duration::from_secs(1));
        let feeder = std::thread::spawn(move || {
            for _ in 0..20 {
                a_peer.write_all(&[0; 400]).unwrap();
                std::thread::sleep(Duration::from_millis(100));
            }
            c_peer.write_all(b"z").unwrap();
            (a_peer, c_peer)
        });
        let reader = std::thread::spawn(move || {
            let mut got = 0;
            while got < 20 * 400 {
                got += read_one(&pa, &a, idle).unwrap();
            }
            (pa, a)
        });
        assert_eq!(read_one(&pc, &c, idle).unwrap(), 1);
        let (pa, a) = reader.join().unwrap();
        let (mut a_peer, _c_peer) = feeder.join().unwrap();
        // A second's worth of bytes fills the reserve; then both wait for nothing: it runs
        // out once, for both.
        a_peer.write_all(&[0; 1000]).unwrap();
        let mut got = 0;
        while got < 1000 {
            got += read_one(&pa, &a, None).unwrap();
        }
        let started = Instant::now();
        let other = std::thread::spawn(move || read_one(&pc, &c, None));
        let e = read_one(&pa, &a, None).unwrap_err();
        assert!(is_floor_error(&e), "{e}");
        assert!(is_floor_error(&other.join().unwrap().unwrap_err()));
        // Counted per waiting channel, the reserve would have gone in half the time.
        let took = started.elapsed();
        assert!(
            took >= FLOOR.reserve,
            "drained once, not per channel: {took:?}"
        );
    }
}
