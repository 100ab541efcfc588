// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Bidirectional connections: the [`Duplex`] trait the handshake runs over, and
//! [`Connection`], a Unix or TCP stream socket with idle timeouts.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// A bidirectional byte stream the handshake can run over: a socket, or a test wrapper around
/// one. Clones share the socket (one half reads, the other writes).
pub trait Duplex: Read + Write + AsFd + Send + Sized {
    /// Another handle on the same connection.
    fn try_clone(&self) -> io::Result<Self>;
    /// Shuts down one or both directions, for every handle of the connection.
    fn shutdown(&self, how: Shutdown) -> io::Result<()>;
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
        })
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

    /// Sets the idle timeout of reads and writes (`None`: wait forever).
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        match &self.socket {
            Socket::Unix(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)?;
            }
            Socket::Tcp(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)?;
            }
        }
        self.timeout = timeout;
        Ok(())
    }

    /// Turns the `EAGAIN` of an expired socket timeout into a clear `TimedOut` error.
    fn map_timeout(&self, e: io::Error, what: &str) -> io::Error {
        if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            let after = self
                .timeout
                .map(|t| format!(" for {t:?}"))
                .unwrap_or_default();
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("timed out: {} {what}{after}", self.peer),
            )
        } else {
            e
        }
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let r = match &mut self.socket {
            Socket::Unix(s) => s.read(buf),
            Socket::Tcp(s) => s.read(buf),
        };
        r.map_err(|e| self.map_timeout(e, "sent nothing"))
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let r = match &mut self.socket {
            Socket::Unix(s) => s.write(buf),
            Socket::Tcp(s) => s.write(buf),
        };
        r.map_err(|e| self.map_timeout(e, "accepted no data"))
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let r = match &mut self.socket {
            Socket::Unix(s) => s.write_vectored(bufs),
            Socket::Tcp(s) => s.write_vectored(bufs),
        };
        r.map_err(|e| self.map_timeout(e, "accepted no data"))
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
        }
    }
}

impl Duplex for Connection {
    fn try_clone(&self) -> io::Result<Self> {
        let socket = match &self.socket {
            Socket::Unix(s) => Socket::Unix(s.try_clone()?),
            Socket::Tcp(s) => Socket::Tcp(s.try_clone()?),
        };
        Ok(Self {
            socket,
            peer: self.peer.clone(),
            timeout: self.timeout,
        })
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match &self.socket {
            Socket::Unix(s) => s.shutdown(how),
            Socket::Tcp(s) => s.shutdown(how),
        }
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
