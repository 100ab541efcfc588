// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Connecting to and listening on an [`Address`].

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use super::{Address, Connection};
use crate::error::{Error, Result};

/// Connects to a Unix or TCP address, trying every address a TCP host resolves to, each for
/// at most `timeout`.
pub fn connect(addr: &Address, timeout: Duration) -> Result<Connection> {
    let step = format!("connect to {addr}");
    match addr {
        Address::File(_) => Err(Error::invalid_input(format!(
            "{step}: a file is not a socket (use unix:PATH or tcp:HOST:PORT)"
        ))),
        Address::Unix(path) => {
            let s = UnixStream::connect(path).map_err(|e| Error::transport(&step, e))?;
            Ok(Connection::unix(s, addr.to_string()))
        }
        Address::Tcp { .. } => {
            let candidates = addr.resolve().map_err(|e| Error::transport(&step, e))?;
            let mut last = io::Error::new(io::ErrorKind::NotFound, "the host has no address");
            for sa in candidates {
                match TcpStream::connect_timeout(&sa, timeout) {
                    Ok(s) => return Connection::tcp(s).map_err(|e| Error::transport(&step, e)),
                    Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                        last = io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("no answer from {sa} within {timeout:?}"),
                        )
                    }
                    Err(e) => last = e,
                }
            }
            Err(Error::transport(step, last))
        }
    }
}

/// A listening Unix or TCP socket. A Unix socket file is removed when the listener is
/// dropped.
#[derive(Debug)]
pub enum Listener {
    /// A Unix stream socket bound at `path`.
    Unix {
        /// The socket.
        listener: UnixListener,
        /// Its file, removed on drop.
        path: PathBuf,
    },
    /// A TCP socket.
    Tcp(TcpListener),
}

/// Binds a listening socket at `addr`. A stale Unix socket file (nobody accepts on it) is
/// replaced; a live one is an "address in use" error.
pub fn listen(addr: &Address) -> Result<Listener> {
    let step = format!("listen on {addr}");
    match addr {
        Address::File(_) => Err(Error::invalid_input(format!(
            "{step}: a file is not a socket (use unix:PATH or tcp:HOST:PORT)"
        ))),
        Address::Unix(path) => {
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                if !meta.file_type().is_socket() {
                    return Err(Error::transport(
                        step,
                        io::Error::new(
                            io::ErrorKind::AlreadyExists,
                            "the path exists and is not a socket",
                        ),
                    ));
                }
                if UnixStream::connect(path).is_ok() {
                    return Err(Error::transport(
                        step,
                        io::Error::new(
                            io::ErrorKind::AddrInUse,
                            "another process listens on this socket",
                        ),
                    ));
                }
                std::fs::remove_file(path).map_err(|e| Error::transport(&step, e))?;
            }
            let listener = UnixListener::bind(path).map_err(|e| Error::transport(&step, e))?;
            Ok(Listener::Unix {
                listener,
                path: path.clone(),
            })
        }
        Address::Tcp { .. } => {
            let candidates = addr.resolve().map_err(|e| Error::transport(&step, e))?;
            let l =
                TcpListener::bind(candidates.as_slice()).map_err(|e| Error::transport(step, e))?;
            Ok(Listener::Tcp(l))
        }
    }
}

impl Listener {
    /// The address actually bound (for TCP port 0, the port the kernel chose).
    pub fn local_address(&self) -> Result<Address> {
        match self {
            Listener::Unix { path, .. } => Ok(Address::Unix(path.clone())),
            Listener::Tcp(l) => l
                .local_addr()
                .map(Address::from)
                .map_err(|e| Error::transport("read the listening address", e)),
        }
    }

    /// Waits for the next connection.
    pub fn accept(&self) -> Result<Connection> {
        match self {
            Listener::Unix { listener, path } => {
                let (s, _) = listener
                    .accept()
                    .map_err(|e| Error::transport("accept a connection", e))?;
                Ok(Connection::unix(
                    s,
                    format!("the source on unix:{}", path.display()),
                ))
            }
            Listener::Tcp(l) => {
                let (s, _) = l
                    .accept()
                    .map_err(|e| Error::transport("accept a connection", e))?;
                Connection::tcp(s).map_err(|e| Error::transport("accept a connection", e))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn unix_and_tcp_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let unix = Address::Unix(dir.path().join("s"));
        for addr in [unix, "tcp:127.0.0.1:0".parse().unwrap()] {
            let l = listen(&addr).unwrap();
            let bound = l.local_address().unwrap();
            let t = std::thread::spawn(move || {
                let mut c = connect(&bound, Duration::from_secs(5)).unwrap();
                c.write_all(b"ping").unwrap();
            });
            let mut c = l.accept().unwrap();
            let mut buf = [0u8; 4];
            c.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"ping");
            t.join().unwrap();
        }
    }

    #[test]
    fn unix_socket_in_use_stale_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let addr = Address::Unix(dir.path().join("s"));
        let l = listen(&addr).unwrap();
        let e = vfio_mig::error::Report(&listen(&addr).unwrap_err()).to_string();
        assert!(e.contains("another process listens"), "{e}");
        drop(l);
        assert!(!dir.path().join("s").exists());
        // A stale socket file (its listener gone without cleanup) is replaced.
        let stale = UnixListener::bind(dir.path().join("s")).unwrap();
        drop(stale);
        let _l = listen(&addr).unwrap();
        std::fs::write(dir.path().join("f"), b"x").unwrap();
        let e = vfio_mig::error::Report(&listen(&Address::Unix(dir.path().join("f"))).unwrap_err())
            .to_string();
        assert!(e.contains("not a socket"), "{e}");
    }

    #[test]
    fn refused_connections_name_the_address() {
        let dir = tempfile::tempdir().unwrap();
        let e = connect(
            &Address::Unix(dir.path().join("none")),
            Duration::from_secs(1),
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("connect to unix:"), "{e}");
        let e = connect(&Address::File("x".into()), Duration::from_secs(1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a socket"), "{e}");
    }
}
