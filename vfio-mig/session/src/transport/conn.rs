// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Bidirectional connections: the [`Duplex`] trait the handshake runs over, and
//! [`Connection`], a Unix or TCP stream socket with idle timeouts.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::progress::{is_floor_error, Progress, ProgressFloor};

/// A bidirectional byte stream the handshake can run over: a socket, or a test wrapper around
/// one. Clones share the socket (one half reads, the other writes).
pub trait Duplex: Read + Write + AsFd + Send + Sized {
    /// Another handle on the same connection.
    fn try_clone(&self) -> io::Result<Self>;
    /// Shuts down one or both directions, for every handle of the connection.
    fn shutdown(&self, how: Shutdown) -> io::Result<()>;
    /// Whether a read would return at once (data, the end, an error), without blocking. The
    /// default polls the descriptor; an encrypted connection also looks at what it already
    /// decrypted.
    fn readable_now(&self) -> io::Result<bool> {
        readable_now(self.as_fd())
    }
    /// Makes the reads of this connection count in the progress floor of `with` (one
    /// reserve for both, refilled by the bytes of either, drained while either waits); with
    /// no floor on `with`, none here. A session's further channels share its main
    /// connection's. The default does nothing (a test wrapper without a floor).
    fn share_progress_floor(&self, with: &Self) {
        let _ = with;
    }
    /// Sets (or with `None` clears) a deadline for the reads of this handle: each read waits
    /// at most until then, however the peer spaces its bytes, and fails with
    /// [`io::ErrorKind::TimedOut`] once it passed. The destination bounds the opening of a
    /// session (HELLO and the stream header) with it. The default does nothing (a test
    /// wrapper without timeouts).
    fn set_deadline(&mut self, deadline: Option<Instant>) -> io::Result<()> {
        let _ = deadline;
        Ok(())
    }
}

/// Whether `e` is a socket timeout that expired (`EAGAIN`, or a TLS session's `TimedOut`),
/// not the progress floor's error.
fn is_expiry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    ) && !is_floor_error(e)
}

/// Whether `fd` has something to read now (data, or EOF/an error), without blocking.
pub fn readable_now(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    loop {
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(n) => return Ok(n > 0),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

enum Socket {
    Unix(UnixStream),
    Tcp(TcpStream),
    #[cfg(feature = "tls")]
    Tls(super::tls::TlsStream),
}

/// A connected Unix or TCP stream socket.
///
/// Reads and writes that wait longer than the idle timeout (see [`Connection::set_timeout`])
/// fail with [`io::ErrorKind::TimedOut`] and a message naming the peer and the timeout, so a
/// dead peer ends in a clear error, never a hang. TCP connections have `TCP_NODELAY` set: the
/// stream is written through a buffer anyway, and the small control messages of the handshake
/// (the switchover acknowledgement sits inside the downtime) must not wait for Nagle.
pub struct Connection {
    socket: Socket,
    peer: String,
    timeout: Option<Duration>,
    /// The deadline of this handle's reads and how long it was when set (for messages).
    deadline: Option<(Instant, Duration)>,
    /// The floor under the peer's rate, shared by every handle.
    progress: Progress,
    /// Set once a write timed out: the peer accepts nothing, so every later write of every
    /// handle fails at once (a flush or a last message must not wait the timeout again), and
    /// a read returns only what already arrived.
    stalled: Arc<AtomicBool>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.peer)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// A connection over a connected Unix socket; `peer` names the other end in errors.
    pub fn unix(s: UnixStream, peer: impl Into<String>) -> Self {
        Self {
            socket: Socket::Unix(s),
            peer: peer.into(),
            timeout: None,
            deadline: None,
            progress: Progress::default(),
            stalled: Arc::default(),
        }
    }

    /// A connection over a connected TCP socket (sets `TCP_NODELAY`).
    pub fn tcp(s: TcpStream) -> io::Result<Self> {
        s.set_nodelay(true)?;
        let peer = match s.peer_addr() {
            Ok(a) => crate::transport::Address::from(a).to_string(),
            Err(_) => "tcp peer".to_owned(),
        };
        Ok(Self {
            socket: Socket::Tcp(s),
            peer,
            timeout: None,
            deadline: None,
            progress: Progress::default(),
            stalled: Arc::default(),
        })
    }

    /// A connection over an established TLS session (see [`super::tls::accept`] and
    /// [`super::tls::connect`]); the peer is named by its address.
    #[cfg(feature = "tls")]
    pub fn tls(s: super::tls::TlsStream) -> Self {
        let peer = s.peer().to_owned();
        let progress = s.progress().clone();
        Self {
            socket: Socket::Tls(s),
            peer,
            timeout: None,
            deadline: None,
            progress,
            stalled: Arc::default(),
        }
    }

    /// The TLS session, if this connection is encrypted.
    #[cfg(feature = "tls")]
    pub fn tls_session(&self) -> Option<&super::tls::TlsStream> {
        match &self.socket {
            Socket::Tls(s) => Some(s),
            _ => None,
        }
    }

    /// The plain TCP socket, if this connection is one (to start TLS over it).
    #[cfg(feature = "tls")]
    pub fn into_tcp(self) -> Option<TcpStream> {
        match self.socket {
            Socket::Tcp(s) => Some(s),
            _ => None,
        }
    }

    /// A connected pair of Unix sockets (for a migration between two devices of this host).
    pub fn pair() -> io::Result<(Self, Self)> {
        let (a, b) = UnixStream::pair()?;
        Ok((
            Self::unix(a, "the destination"),
            Self::unix(b, "the source"),
        ))
    }

    /// The other end, for messages (`unix:/run/x.sock`, `tcp:10.0.0.1:7000`).
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Sets (or with `None` ends) a floor under the rate of the peer's bytes, for the reads
    /// of every handle of this connection ([`ProgressFloor`]): once the reads waited out the
    /// reserve, the next fails with [`io::ErrorKind::TimedOut`] naming the peer as too slow.
    /// The destination sets it once a session was admitted, so that a source trickling bytes
    /// cannot hold it. It counts the socket's bytes: under TLS, the ciphertext, as it
    /// arrives. Under a floor, a read waits for its first byte at most the idle timeout
    /// from the later of its start and the last byte of any connection sharing the floor
    /// ([`Duplex::share_progress_floor`]).
    pub fn set_progress_floor(&self, floor: Option<ProgressFloor>) {
        self.progress.set(floor);
    }

    /// Sets the idle timeout of reads and writes (`None`: wait forever).
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.apply_timeout(timeout)?;
        self.timeout = timeout;
        Ok(())
    }

    /// Sets the socket timeouts (shared by every handle of the socket).
    fn apply_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match &self.socket {
            Socket::Unix(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)?;
            }
            Socket::Tcp(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)?;
            }
            #[cfg(feature = "tls")]
            Socket::Tls(s) => s.set_timeout(timeout)?,
        }
        Ok(())
    }

    /// Before a read under a deadline: the socket waits at most until the deadline (or the
    /// idle timeout, if shorter); past the deadline, a clear `TimedOut` error. Returns how
    /// long the read may wait for its first byte.
    fn before_read(&self) -> io::Result<Option<Duration>> {
        let Some((end, length)) = self.deadline else {
            return Ok(self.timeout);
        };
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "timed out: {} did not complete its part of the handshake within {length:?}",
                    self.peer
                ),
            ));
        }
        let wait = Some(self.timeout.map_or(left, |t| t.min(left)));
        self.apply_timeout(wait)?;
        Ok(wait)
    }

    /// Turns the `EAGAIN` of an expired socket timeout into a clear `TimedOut` error (the
    /// progress floor's error stays as it is).
    fn map_timeout(&self, e: io::Error, what: &str) -> io::Error {
        if is_expiry(&e) {
            self.timed_out(what)
        } else {
            e
        }
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.stalled.load(Ordering::SeqCst) && !Duplex::readable_now(self)? {
            return Err(self.given_up());
        }
        self.read_now(buf)
    }
}

impl Connection {
    /// One read of the socket, under the handshake deadline if one is set, and under the
    /// progress floor (a TLS session applies it to its reads of ciphertext).
    fn read_now(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let wait = self.before_read()?;
        let (progress, peer) = (&self.progress, self.peer.as_str());
        let r = match &self.socket {
            Socket::Unix(s) => progress.read(s.as_fd(), wait, peer, || (&*s).read(buf)),
            Socket::Tcp(s) => progress.read(s.as_fd(), wait, peer, || (&*s).read(buf)),
            #[cfg(feature = "tls")]
            Socket::Tls(s) => (&*s).read(buf),
        };
        r.map_err(|e| match self.deadline {
            Some((_, length)) if is_expiry(&e) => io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "timed out: {} did not complete its part of the handshake within \
                         {length:?}",
                    self.peer
                ),
            ),
            _ => self.map_timeout(e, "sent nothing"),
        })
    }
}

impl Connection {
    /// "timed out: PEER WHAT for TIMEOUT".
    fn timed_out(&self, what: &str) -> io::Error {
        let after = self
            .timeout
            .map(|t| format!(" for {t:?}"))
            .unwrap_or_default();
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("timed out: {} {what}{after}", self.peer),
        )
    }

    /// The error of every write (and of a read with nothing to read) once a write timed out.
    fn given_up(&self) -> io::Error {
        let e = self.timed_out("accepted no data");
        io::Error::new(e.kind(), format!("{e}: the connection was given up"))
    }

    /// A write's error: a timeout marks the connection stalled.
    fn write_failed(&self, e: io::Error) -> io::Error {
        let e = self.map_timeout(e, "accepted no data");
        if e.kind() == io::ErrorKind::TimedOut {
            self.stalled.store(true, Ordering::SeqCst);
        }
        e
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.stalled.load(Ordering::SeqCst) {
            return Err(self.given_up());
        }
        self.write_vectored(&[io::IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        if self.stalled.load(Ordering::SeqCst) {
            return Err(self.given_up());
        }
        // A plain socket's write sends everything in one call, as a blocking write does, but
        // waits for room at most its write timeout since the peer last accepted anything.
        let (fd, timeout) = match &self.socket {
            Socket::Unix(s) => (s.as_fd(), s.write_timeout()),
            Socket::Tcp(s) => (s.as_fd(), s.write_timeout()),
            #[cfg(feature = "tls")]
            Socket::Tls(s) => {
                let mut tls: &super::tls::TlsStream = s;
                return tls.write_vectored(bufs).map_err(|e| self.write_failed(e));
            }
        };
        let timeout = timeout.map_err(|e| self.write_failed(e))?;
        match super::silence::send_all_within(fd, bufs, timeout) {
            (_, None) => Ok(bufs.iter().map(|b| b.len()).sum()),
            (0, Some(e)) => Err(self.write_failed(e)),
            // Part went out: it is reported written; the failure (a timeout gives the
            // connection up) is the next write's.
            (sent, Some(e)) => {
                let _ = self.write_failed(e);
                Ok(sent)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for Connection {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.socket {
            Socket::Unix(s) => s.as_fd(),
            Socket::Tcp(s) => s.as_fd(),
            #[cfg(feature = "tls")]
            Socket::Tls(s) => s.as_fd(),
        }
    }
}

impl Duplex for Connection {
    fn try_clone(&self) -> io::Result<Self> {
        let socket = match &self.socket {
            Socket::Unix(s) => Socket::Unix(s.try_clone()?),
            Socket::Tcp(s) => Socket::Tcp(s.try_clone()?),
            #[cfg(feature = "tls")]
            Socket::Tls(s) => Socket::Tls(s.try_clone()?),
        };
        Ok(Self {
            socket,
            peer: self.peer.clone(),
            timeout: self.timeout,
            deadline: None,
            progress: self.progress.clone(),
            stalled: self.stalled.clone(),
        })
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match &self.socket {
            Socket::Unix(s) => s.shutdown(how),
            Socket::Tcp(s) => s.shutdown(how),
            #[cfg(feature = "tls")]
            Socket::Tls(s) => s.shutdown(how),
        }
    }

    fn readable_now(&self) -> io::Result<bool> {
        match &self.socket {
            #[cfg(feature = "tls")]
            Socket::Tls(s) => s.readable_now(),
            _ => readable_now(self.as_fd()),
        }
    }

    fn share_progress_floor(&self, with: &Self) {
        self.progress.share(&with.progress);
    }

    fn set_deadline(&mut self, deadline: Option<Instant>) -> io::Result<()> {
        match deadline {
            Some(end) => {
                let length = end.saturating_duration_since(Instant::now());
                self.deadline = Some((end, length));
            }
            None => {
                self.deadline = None;
                self.apply_timeout(self.timeout)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_are_clear_errors() {
        let (mut a, _b) = Connection::pair().unwrap();
        a.set_timeout(Some(Duration::from_millis(20))).unwrap();
        let mut buf = [0u8; 4];
        let e = a.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(
            e.to_string()
                .contains("timed out: the destination sent nothing for 20ms"),
            "{e}"
        );
    }

    /// A peer that sends one byte at a time, each within the idle timeout, cannot stretch a
    /// deadline: the reads end when it passes.
    #[test]
    fn a_deadline_bounds_all_reads_not_each() {
        let (mut a, mut b) = Connection::pair().unwrap();
        a.set_timeout(Some(Duration::from_secs(30))).unwrap();
        let started = Instant::now();
        a.set_deadline(Some(started + Duration::from_millis(300)))
            .unwrap();
        let trickle = std::thread::spawn(move || {
            for _ in 0..100 {
                if b.write_all(b"x").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let mut buf = [0u8; 1];
        let e = loop {
            match a.read_exact(&mut buf) {
                Ok(()) => continue,
                Err(e) => break e,
            }
        };
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(e.to_string().contains("within"), "{e}");
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
        // Cleared, the idle timeout applies again.
        a.set_deadline(None).unwrap();
        drop(a);
        trickle.join().unwrap();
    }

    /// Once a write timed out (the peer accepts nothing), every handle's later writes fail
    /// at once instead of waiting the timeout again, and a read returns only what arrived.
    #[test]
    fn a_write_that_timed_out_gives_the_connection_up() {
        let (mut a, mut b) = Connection::pair().unwrap();
        a.set_timeout(Some(Duration::from_millis(200))).unwrap();
        b.write_all(b"reason").unwrap();
        let mut a2 = a.try_clone().unwrap();
        let chunk = vec![0u8; 64 * 1024];
        let e = loop {
            if let Err(e) = a.write(&chunk) {
                break e;
            }
        };
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        let e = a2.write(b"x").unwrap_err();
        assert!(e.to_string().contains("given up"), "{e}");
        let mut got = [0u8; 6];
        a2.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"reason", "what arrived is still read");
        let e = a2.read(&mut got).unwrap_err();
        assert!(e.to_string().contains("given up"), "{e}");
        drop(b);
    }

    #[test]
    fn clones_share_the_socket_and_poll_sees_data() {
        let (a, mut b) = Connection::pair().unwrap();
        let mut a2 = a.try_clone().unwrap();
        assert!(!readable_now(a.as_fd()).unwrap());
        b.write_all(b"hi").unwrap();
        assert!(readable_now(a.as_fd()).unwrap());
        let mut buf = [0u8; 2];
        a2.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        b.shutdown(Shutdown::Write).unwrap();
        // EOF is readable too.
        assert!(readable_now(a.as_fd()).unwrap());
        assert_eq!(a2.read(&mut buf).unwrap(), 0);
    }
}
