// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! [`TlsStream`]: a TLS 1.3 session over a blocking [`TcpStream`], and the handshake that
//! makes one ([`connect`], [`accept`]) under a deadline.
//!
//! # Handles that share one session
//!
//! vfio-mig's handshake clones its connection (`Duplex::try_clone` in the project): one
//! handle reads the peer's control messages while another writes the stream, and a third
//! shuts down the writing direction. A rustls session cannot be cloned, and
//! `rustls::StreamOwned` holds it behind `&mut`, so a reader blocked in `read` would hold
//! back every write. Here every clone of a `TlsStream` shares one session with three locks:
//!
//! - `tls`: the rustls state. Held only to encrypt, decrypt or inspect, **never across a
//!   blocking socket call**.
//! - `rx`: the reading side (the socket's receive direction and the ciphertext read but not
//!   yet given to rustls). One reader at a time; a blocking `recv` holds it.
//! - `tx`: the writing side. Held from encryption until the bytes are on the socket, so TLS
//!   records go out in the order rustls made them; a blocking `send` holds it.
//!
//! So one thread can block reading while another writes, as with a plain socket. Lock order
//! is `rx` → `tx` (try only) and `rx`/`tx` → `tls`; no thread holds `tls` while taking
//! another lock. Records that the reading side makes rustls produce (a KeyUpdate answer, an
//! alert) are sent by the reader if the writing side is free, else by the writer when it
//! releases it (every holder of `tx` looks again after releasing it).
//!
//! # Handshake
//!
//! [`connect`] and [`accept`] run the TLS handshake and then one application-data byte,
//! [`READY`], from the server to the client: in TLS 1.3 the client finishes its handshake
//! before the server has checked the client certificate, so without it a refused client
//! would only learn it at its first read, possibly after its writes met a reset connection
//! that hides the server's alert. With it, `connect` returns only once the destination
//! accepted the source's certificate, and a refusal is an error of `connect` naming the
//! alert. The deadline covers all of it: before every blocking step the socket timeout is
//! set to the time left, so a peer that trickles bytes cannot stretch it.
//!
//! A peer whose first bytes are not a TLS record fails with [`HandshakeError::NotTls`]; the
//! server then writes [`NOT_TLS_NOTICE`] (plain text) so that a plain client can say why.
//!
//! # Timeouts and closing
//!
//! After the handshake the socket has no timeout; [`TlsStream::set_timeout`] sets the idle
//! timeout of reads and writes (a timed-out read or write is a [`io::ErrorKind::TimedOut`]
//! naming the peer, as the project's `Connection` does). The `Connection`'s floor under the
//! peer's rate (`Connection::set_progress_floor`) is applied here, to each read of
//! ciphertext from the socket, so bytes trickled inside one record count as they arrive and
//! a read waiting for the rest of a record is bounded by it. A write that failed part-way
//! leaves the session unusable: later writes fail. [`TlsStream::shutdown`] with
//! `Write`/`Both` sends close_notify first; dropping the last handle sends close_notify too
//! (best effort), so the peer reads a clean end of stream (`Ok(0)`), as over a plain socket.
//! A TCP end without close_notify reads as [`io::ErrorKind::UnexpectedEof`].

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};
use rustls_pki_types::ServerName;

use super::identity::PeerIdentities;
use crate::transport::progress::{is_floor_error, Progress};

/// The byte the server sends, encrypted, once it accepted the client (see the module docs).
pub const READY: u8 = 0x01;

/// What the server writes, in plain text, to a peer that does not speak TLS.
pub const NOT_TLS_NOTICE: &[u8] = b"vfio-mig: this endpoint accepts TLS 1.3 connections only\n";

/// Size of the ciphertext read buffer.
const READ_BUFFER: usize = 64 << 10;

/// How long closing writes (an alert, close_notify on drop) may block.
const CLOSE_TIMEOUT: Duration = Duration::from_millis(200);

/// TLS record content types a session may start with.
const RECORD_HANDSHAKE: u8 = 0x16;
const RECORD_ALERT: u8 = 0x15;

/// Which end of the session this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The source: TLS client.
    Client,
    /// The destination: TLS server.
    Server,
}

impl Role {
    /// The peer, as the messages call it.
    fn them(self) -> &'static str {
        match self {
            Role::Client => "the destination",
            Role::Server => "the source",
        }
    }

    /// Our certificate, as the messages call it.
    fn ours(self) -> &'static str {
        match self {
            Role::Client => "our client certificate",
            Role::Server => "our server certificate",
        }
    }
}

/// A failed [`connect`] or [`accept`]. One line, naming the peer's address.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The handshake did not complete within the deadline.
    #[error("TLS handshake with {peer}: not completed within {deadline:?}")]
    TimedOut {
        /// The peer's address.
        peer: String,
        /// The deadline given.
        deadline: Duration,
    },
    /// The peer closed the connection during the handshake.
    #[error("TLS handshake with {peer}: {them} closed the connection")]
    Closed {
        /// The peer's address.
        peer: String,
        /// "the source" or "the destination".
        them: &'static str,
    },
    /// The peer's first bytes are not a TLS record.
    #[error(
        "TLS handshake with {peer}: {them} does not speak TLS (it sent {first}); is it \
         running without TLS?"
    )]
    NotTls {
        /// The peer's address.
        peer: String,
        /// "the source" or "the destination".
        them: &'static str,
        /// The first bytes, as text or hex.
        first: String,
    },
    /// TLS failed: a certificate was refused (ours or theirs), or the protocol failed.
    #[error("TLS handshake with {peer}: {detail}")]
    Tls {
        /// The peer's address.
        peer: String,
        /// What failed, in words.
        detail: String,
        /// The rustls error.
        #[source]
        source: rustls::Error,
    },
    /// After the handshake, the server sent something other than [`READY`].
    #[error("TLS handshake with {peer}: {detail}")]
    Protocol {
        /// The peer's address.
        peer: String,
        /// What was wrong.
        detail: String,
    },
    /// The socket failed.
    #[error("TLS handshake with {peer}: {source}")]
    Io {
        /// The peer's address.
        peer: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

impl HandshakeError {
    /// The kind of [`io::Error`] this maps to: `TimedOut`, `ConnectionAborted` (closed),
    /// `PermissionDenied` (a certificate refused, either way), `InvalidData` (not TLS, a
    /// protocol failure), or the socket error's own kind.
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            HandshakeError::TimedOut { .. } => io::ErrorKind::TimedOut,
            HandshakeError::Closed { .. } => io::ErrorKind::ConnectionAborted,
            HandshakeError::NotTls { .. } | HandshakeError::Protocol { .. } => {
                io::ErrorKind::InvalidData
            }
            HandshakeError::Tls { source, .. } => describe(source, Role::Client).1,
            HandshakeError::Io { source, .. } => source.kind(),
        }
    }

    /// The peer's address.
    pub fn peer(&self) -> &str {
        match self {
            HandshakeError::TimedOut { peer, .. }
            | HandshakeError::Closed { peer, .. }
            | HandshakeError::NotTls { peer, .. }
            | HandshakeError::Tls { peer, .. }
            | HandshakeError::Protocol { peer, .. }
            | HandshakeError::Io { peer, .. } => peer,
        }
    }
}

impl From<HandshakeError> for io::Error {
    fn from(e: HandshakeError) -> Self {
        io::Error::new(e.kind(), e)
    }
}

/// A rustls error in words, and the kind of error it is.
fn describe(e: &rustls::Error, role: Role) -> (String, io::ErrorKind) {
    use rustls::AlertDescription as A;
    use rustls::Error as E;
    let them = role.them();
    match e {
        E::AlertReceived(
            a @ (A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::AccessDenied
            | A::CertificateRequired),
        ) => (
            format!("{them} refused {} (TLS alert {a:?})", role.ours()),
            io::ErrorKind::PermissionDenied,
        ),
        E::AlertReceived(A::ProtocolVersion) => (
            format!("{them} does not accept TLS 1.3 (TLS alert ProtocolVersion)"),
            io::ErrorKind::InvalidData,
        ),
        E::AlertReceived(a) => (
            format!("{them} ended the session (TLS alert {a:?})"),
            io::ErrorKind::InvalidData,
        ),
        E::NoCertificatesPresented => (
            format!("{them} presented no certificate"),
            io::ErrorKind::PermissionDenied,
        ),
        E::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => (
            format!(
                "the certificate of {them} is not valid: it does not chain to a CA of our CA \
                 bundle (UnknownIssuer)"
            ),
            io::ErrorKind::PermissionDenied,
        ),
        E::InvalidCertificate(rustls::CertificateError::InvalidPurpose) => (
            format!(
                "the certificate of {them} is not valid: its extended key usage does not \
                 allow this role (InvalidPurpose)"
            ),
            io::ErrorKind::PermissionDenied,
        ),
        E::InvalidCertificate(c) => (
            format!("the certificate of {them} is not valid: {c}"),
            io::ErrorKind::PermissionDenied,
        ),
        E::PeerIncompatible(p) => (
            format!("{them} is incompatible: {p:?}"),
            io::ErrorKind::InvalidData,
        ),
        other => (other.to_string(), io::ErrorKind::InvalidData),
    }
}

/// `tcp:HOST:PORT` of the peer, as the project's addresses print.
fn peer_name(sock: &TcpStream) -> String {
    match sock.peer_addr() {
        Ok(SocketAddr::V4(a)) => format!("tcp:{a}"),
        Ok(SocketAddr::V6(a)) => format!("tcp:[{}]:{}", a.ip(), a.port()),
        Err(_) => "tcp peer".to_owned(),
    }
}

/// Up to 16 bytes, quoted, non-printable bytes escaped (`"VMIG\x00\x01"`).
fn show_bytes(b: &[u8]) -> String {
    format!("\"{}\"", b[..b.len().min(16)].escape_ascii())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The reading side: ciphertext read from the socket and not yet given to rustls, and how
/// the receive direction ended.
struct RxSide {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// The socket returned end-of-file (and rustls was told).
    eof: bool,
    /// A socket error found by [`TlsStream::readable_now`], for the next read.
    error: Option<io::Error>,
    /// A fatal TLS error: every later read fails with it.
    fatal: Option<(io::ErrorKind, String)>,
}

impl RxSide {
    fn new() -> Self {
        Self {
            buf: vec![0u8; READ_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
            eof: false,
            error: None,
            fatal: None,
        }
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

/// Gives rustls the next part of the buffered ciphertext (as much as it takes at once) and
/// processes it. Call only when rustls holds no unread plaintext.
fn feed(tls: &mut Connection, rx: &mut RxSide) -> Result<(), rustls::Error> {
    let mut pending = &rx.buf[rx.start..rx.end];
    match tls.read_tls(&mut pending) {
        // close_notify was received: nothing more is read.
        Ok(0) => rx.start = rx.end,
        Ok(n) => rx.start += n,
        Err(e) => return Err(rustls::Error::General(e.to_string())),
    }
    tls.process_new_packets().map(|_| ())
}

/// Moves every TLS record rustls has ready to `out`.
fn drain(tls: &mut Connection, out: &mut Vec<u8>) {
    while tls.wants_write() {
        if tls.write_tls(out).is_err() {
            break;
        }
    }
}

/// The writing side: the records being sent, and whether sending is over.
struct TxSide {
    out: Vec<u8>,
    /// close_notify was sent (shutdown).
    closed: bool,
    /// A write failed part-way: the peer would see a torn record, so nothing more is sent.
    broken: bool,
}

struct Shared {
    sock: TcpStream,
    peer: String,
    role: Role,
    identities: PeerIdentities,
    suite: String,
    tls: Mutex<Connection>,
    rx: Mutex<RxSide>,
    tx: Mutex<TxSide>,
    timeout: Mutex<Option<Duration>>,
    /// The floor under the peer's rate, applied to each read of ciphertext.
    progress: Progress,
}

/// A TLS 1.3 session over a TCP socket: blocking `Read + Write`, shared by its clones (see
/// the [module docs](self)).
#[derive(Clone)]
pub struct TlsStream {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("peer", &self.shared.peer)
            .field("identities", &self.shared.identities.to_string())
            .field("suite", &self.shared.suite)
            .finish_non_exhaustive()
    }
}

/// Runs the TLS handshake of the source over `sock`, checking the destination's certificate
/// against `config`'s roots and `server_name`, then waits for [`READY`]; all within
/// `deadline`.
pub fn connect(
    sock: TcpStream,
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    deadline: Duration,
) -> Result<TlsStream, HandshakeError> {
    let peer = peer_name(&sock);
    let conn = ClientConnection::new(config, server_name).map_err(|e| HandshakeError::Tls {
        peer: peer.clone(),
        detail: e.to_string(),
        source: e,
    })?;
    handshake(sock, conn.into(), Role::Client, peer, deadline)
}

/// Runs the TLS handshake of the destination over an accepted `sock`, requiring a client
/// certificate that `config`'s verifier accepts, then sends [`READY`]; all within
/// `deadline`. Authorization (which source may load into which device) is the caller's,
/// with [`TlsStream::peer_identities`] and an [`super::AuthorizationPolicy`].
pub fn accept(
    sock: TcpStream,
    config: Arc<ServerConfig>,
    deadline: Duration,
) -> Result<TlsStream, HandshakeError> {
    let peer = peer_name(&sock);
    let conn = ServerConnection::new(config).map_err(|e| HandshakeError::Tls {
        peer: peer.clone(),
        detail: e.to_string(),
        source: e,
    })?;
    handshake(sock, conn.into(), Role::Server, peer, deadline)
}

/// The handshake's socket and deadline.
struct Hs<'a> {
    sock: &'a TcpStream,
    peer: &'a str,
    role: Role,
    end: Instant,
    deadline: Duration,
}

impl Hs<'_> {
    fn timed_out(&self) -> HandshakeError {
        HandshakeError::TimedOut {
            peer: self.peer.to_owned(),
            deadline: self.deadline,
        }
    }

    /// The time left, or `TimedOut`.
    fn left(&self) -> Result<Duration, HandshakeError> {
        self.end
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| self.timed_out())
    }

    fn io(&self, e: io::Error) -> HandshakeError {
        if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            self.timed_out()
        } else {
            HandshakeError::Io {
                peer: self.peer.to_owned(),
                source: e,
            }
        }
    }

    /// Writes every record rustls has ready, each write within the time left.
    fn write_out(&self, tls: &mut Connection) -> Result<(), HandshakeError> {
        while tls.wants_write() {
            self.sock
                .set_write_timeout(Some(self.left()?))
                .map_err(|e| self.io(e))?;
            match tls.write_tls(&mut &*self.sock) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io(e)),
            }
        }
        Ok(())
    }

    /// Reads the next bytes from the socket within the time left; the first bytes of the
    /// session must start a TLS record.
    fn fill(&self, rx: &mut RxSide, first: &mut bool) -> Result<(), HandshakeError> {
        self.sock
            .set_read_timeout(Some(self.left()?))
            .map_err(|e| self.io(e))?;
        let n = loop {
            match (&*self.sock).read(&mut rx.buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io(e)),
            }
        };
        if n == 0 {
            return Err(HandshakeError::Closed {
                peer: self.peer.to_owned(),
                them: self.role.them(),
            });
        }
        if std::mem::take(first) {
            let b = &rx.buf[..n];
            let starts_record = match self.role {
                Role::Server => b[0] == RECORD_HANDSHAKE,
                Role::Client => b[0] == RECORD_HANDSHAKE || b[0] == RECORD_ALERT,
            } && b.get(1).is_none_or(|&v| v == 0x03);
            if !starts_record {
                if self.role == Role::Server {
                    let _ = self.sock.set_write_timeout(Some(CLOSE_TIMEOUT));
                    let _ = (&*self.sock).write_all(NOT_TLS_NOTICE);
                }
                return Err(HandshakeError::NotTls {
                    peer: self.peer.to_owned(),
                    them: self.role.them(),
                    first: show_bytes(b),
                });
            }
        }
        rx.start = 0;
        rx.end = n;
        Ok(())
    }

    /// Sends the alert rustls queued for `e` (best effort) and makes the error.
    fn fail(&self, tls: &mut Connection, e: rustls::Error) -> HandshakeError {
        let _ = self.sock.set_write_timeout(Some(CLOSE_TIMEOUT));
        while tls.wants_write() {
            if tls.write_tls(&mut &*self.sock).is_err() {
                break;
            }
        }
        HandshakeError::Tls {
            peer: self.peer.to_owned(),
            detail: describe(&e, self.role).0,
            source: e,
        }
    }
}

fn handshake(
    sock: TcpStream,
    mut tls: Connection,
    role: Role,
    peer: String,
    deadline: Duration,
) -> Result<TlsStream, HandshakeError> {
    let hs = Hs {
        sock: &sock,
        peer: &peer,
        role,
        end: Instant::now() + deadline,
        deadline,
    };
    // The stream's small control messages must not wait for Nagle (as the project's
    // `Connection::tcp`).
    sock.set_nodelay(true).map_err(|e| hs.io(e))?;
    let mut rx = RxSide::new();
    let mut first = true;
    while tls.is_handshaking() {
        hs.write_out(&mut tls)?;
        if !tls.is_handshaking() {
            break;
        }
        if rx.is_empty() {
            hs.fill(&mut rx, &mut first)?;
        }
        if let Err(e) = feed(&mut tls, &mut rx) {
            return Err(hs.fail(&mut tls, e));
        }
    }
    match role {
        Role::Server => {
            tls.writer().write_all(&[READY]).map_err(|e| hs.io(e))?;
            hs.write_out(&mut tls)?;
        }
        Role::Client => loop {
            hs.write_out(&mut tls)?;
            let mut b = [0u8; 1];
            match tls.reader().read(&mut b) {
                Ok(1) if b[0] == READY => break,
                Ok(1) => {
                    return Err(HandshakeError::Protocol {
                        peer,
                        detail: format!(
                            "the destination sent {:#04x} where the ready byte {READY:#04x} \
                             was expected",
                            b[0]
                        ),
                    })
                }
                Ok(_) => {
                    return Err(HandshakeError::Closed {
                        peer,
                        them: role.them(),
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(HandshakeError::Closed {
                        peer,
                        them: role.them(),
                    })
                }
                Err(e) => return Err(hs.io(e)),
            }
            if rx.is_empty() {
                hs.fill(&mut rx, &mut first)?;
            }
            if let Err(e) = feed(&mut tls, &mut rx) {
                return Err(hs.fail(&mut tls, e));
            }
        },
    }
    for r in [sock.set_read_timeout(None), sock.set_write_timeout(None)] {
        r.map_err(|e| hs.io(e))?;
    }
    let identities = tls
        .peer_certificates()
        .and_then(|c| c.first())
        .map(PeerIdentities::from_certificate)
        .unwrap_or_default();
    let suite = tls
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()))
        .unwrap_or_default();
    Ok(TlsStream {
        shared: Arc::new(Shared {
            sock,
            peer,
            role,
            identities,
            suite,
            tls: Mutex::new(tls),
            rx: Mutex::new(rx),
            tx: Mutex::new(TxSide {
                out: Vec::with_capacity(READ_BUFFER + 1024),
                closed: false,
                broken: false,
            }),
            timeout: Mutex::new(None),
            progress: Progress::default(),
        }),
    })
}

/// `recv(MSG_DONTWAIT)`: reads what the socket has now, without blocking and without
/// changing the (shared) file status flags.
fn recv_now(sock: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes, and the descriptor is open for
    // as long as `sock` is borrowed.
    let n = unsafe {
        libc::recv(
            sock.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

impl Shared {
    /// Turns the `EAGAIN` of an expired socket timeout into a clear `TimedOut` error.
    fn io_error(&self, e: io::Error, what: &str) -> io::Error {
        if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            let after = lock(&self.timeout)
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

    fn tls_error(&self, e: &rustls::Error) -> (io::ErrorKind, String) {
        let (detail, kind) = describe(e, self.role);
        (kind, format!("TLS session with {}: {detail}", self.peer))
    }

    /// Writes the records in `tx.out` to the socket.
    fn send(&self, tx: &mut TxSide) -> io::Result<()> {
        if tx.out.is_empty() {
            return Ok(());
        }
        let r = self.write_records(&tx.out);
        tx.out.clear();
        r.map_err(|e| {
            tx.broken = true;
            self.io_error(e, "accepted no data")
        })
    }

    /// Writes `records` whole, each wait for room bounded by the socket's write timeout in
    /// all (the idle timeout, or the short one of a closing write).
    fn write_records(&self, records: &[u8]) -> io::Result<()> {
        let timeout = self.sock.write_timeout()?;
        let whole = [io::IoSlice::new(records)];
        match super::super::silence::send_all_within(self.sock.as_fd(), &whole, timeout) {
            (_, None) => Ok(()),
            (_, Some(e)) => Err(e),
        }
    }

    /// Sends what rustls has ready if the writing side is free; a busy writing side sends
    /// it itself after its holder releases it.
    fn push_pending(&self) -> io::Result<()> {
        loop {
            if !lock(&self.tls).wants_write() {
                return Ok(());
            }
            let mut tx = match self.tx.try_lock() {
                Ok(tx) => tx,
                Err(TryLockError::WouldBlock) => return Ok(()),
                Err(TryLockError::Poisoned(p)) => p.into_inner(),
            };
            if tx.broken {
                return Ok(());
            }
            drain(&mut lock(&self.tls), &mut tx.out);
            self.send(&mut tx)?;
        }
    }

    fn write_with(
        &self,
        f: impl FnOnce(&mut rustls::Writer<'_>) -> io::Result<usize>,
    ) -> io::Result<usize> {
        let n = {
            let mut tx = lock(&self.tx);
            if tx.closed || tx.broken {
                let why = if tx.closed {
                    "the writing direction of the TLS session is shut down"
                } else {
                    "an earlier write to the TLS session failed part-way"
                };
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    format!("write to {}: {why}", self.peer),
                ));
            }
            let n = {
                let mut tls = lock(&self.tls);
                let n = f(&mut tls.writer())?;
                drain(&mut tls, &mut tx.out);
                n
            };
            self.send(&mut tx)?;
            n
        };
        // `n` bytes were sent; a failure here marks the writing side broken, and the next
        // write reports it.
        let _ = self.push_pending();
        Ok(n)
    }

    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut rx = lock(&self.rx);
        loop {
            if let Some((kind, msg)) = &rx.fatal {
                return Err(io::Error::new(*kind, msg.clone()));
            }
            {
                let mut tls = lock(&self.tls);
                match tls.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!(
                                "{} closed the connection without a TLS close_notify",
                                self.peer
                            ),
                        ))
                    }
                    Err(e) => return Err(e),
                }
                if !rx.is_empty() {
                    let r = feed(&mut tls, &mut rx);
                    drop(tls);
                    // An alert or a KeyUpdate answer; a broken writing side is the
                    // writer's error, not this read's.
                    let _ = self.push_pending();
                    if let Err(e) = r {
                        rx.fatal = Some(self.tls_error(&e));
                    }
                    continue;
                }
                if rx.eof {
                    // rustls was told; its reader answered above. Not reached.
                    return Ok(0);
                }
            }
            if let Some(e) = rx.error.take() {
                return Err(e);
            }
            let n = loop {
                // The socket's timeout is the idle timeout, or less under a deadline.
                let idle = self.sock.read_timeout()?;
                let raw = || (&self.sock).read(&mut rx.buf);
                match self.progress.read(self.sock.as_fd(), idle, &self.peer, raw) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if is_floor_error(&e) => return Err(e),
                    Err(e) => return Err(self.io_error(e, "sent nothing")),
                }
            };
            if n == 0 {
                rx.eof = true;
                let _ = lock(&self.tls).read_tls(&mut &[][..]);
            } else {
                rx.start = 0;
                rx.end = n;
            }
        }
    }

    fn readable_now(&self) -> io::Result<bool> {
        let mut rx = match self.rx.try_lock() {
            Ok(rx) => rx,
            // Another handle is reading: what arrives is for it.
            Err(TryLockError::WouldBlock) => return Ok(false),
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
        };
        loop {
            if rx.fatal.is_some() || rx.error.is_some() || rx.eof {
                return Ok(true);
            }
            {
                let mut tls = lock(&self.tls);
                match tls.process_new_packets() {
                    Ok(st) if st.plaintext_bytes_to_read() > 0 || st.peer_has_closed() => {
                        return Ok(true)
                    }
                    Ok(_) => {}
                    Err(e) => {
                        rx.fatal = Some(self.tls_error(&e));
                        return Ok(true);
                    }
                }
                if !rx.is_empty() {
                    let r = feed(&mut tls, &mut rx);
                    drop(tls);
                    let _ = self.push_pending();
                    if let Err(e) = r {
                        rx.fatal = Some(self.tls_error(&e));
                    }
                    continue;
                }
            }
            match recv_now(&self.sock, &mut rx.buf) {
                Ok(0) => {
                    rx.eof = true;
                    let _ = lock(&self.tls).read_tls(&mut &[][..]);
                }
                Ok(n) => {
                    self.progress.arrived(n);
                    rx.start = 0;
                    rx.end = n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => rx.error = Some(e),
            }
        }
    }

    /// Sends close_notify once (the writing direction then refuses writes).
    fn close_notify(&self) -> io::Result<()> {
        let mut tx = lock(&self.tx);
        if tx.closed || tx.broken {
            return Ok(());
        }
        tx.closed = true;
        {
            let mut tls = lock(&self.tls);
            tls.send_close_notify();
            drain(&mut tls, &mut tx.out);
        }
        self.send(&mut tx)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let open = {
            let tx = lock(&self.tx);
            !tx.closed && !tx.broken
        };
        if open {
            let _ = self.sock.set_write_timeout(Some(CLOSE_TIMEOUT));
            let _ = self.close_notify();
        }
    }
}

impl TlsStream {
    /// Another handle on the same session (never fails; `io::Result` to fit the project's
    /// `Duplex::try_clone`).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(self.clone())
    }

    /// The peer's address (`tcp:10.0.0.1:7000`), for messages.
    pub fn peer(&self) -> &str {
        &self.shared.peer
    }

    /// The identities of the peer's verified certificate (on the destination: the source's
    /// client certificate; on the source: the destination's server certificate).
    pub fn peer_identities(&self) -> &PeerIdentities {
        &self.shared.identities
    }

    /// The floor under the peer's rate that every read of ciphertext is held to (the
    /// project's `Connection` sets it).
    pub(crate) fn progress(&self) -> &Progress {
        &self.shared.progress
    }

    /// The negotiated cipher suite (e.g. `TLS13_AES_256_GCM_SHA384`), for logs.
    pub fn cipher_suite(&self) -> &str {
        &self.shared.suite
    }

    /// Sets the idle timeout of reads and writes for every handle (`None`: wait forever).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.shared.sock.set_read_timeout(timeout)?;
        self.shared.sock.set_write_timeout(timeout)?;
        *lock(&self.shared.timeout) = timeout;
        Ok(())
    }

    /// Shuts down one or both directions for every handle. `Write` and `Both` send
    /// close_notify first, so the peer reads a clean end of stream.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        let notified = match how {
            Shutdown::Read => Ok(()),
            Shutdown::Write | Shutdown::Both => self.shared.close_notify(),
        };
        let shut = self.shared.sock.shutdown(how);
        notified.and(shut)
    }

    /// Whether a read would return at once (decrypted data, a clean or unclean end, or an
    /// error), without blocking: the TLS-aware version of the project's `readable_now(fd)`.
    /// A TLS record that carries no data (a KeyUpdate) is processed and does not count.
    /// While another handle is inside `read`, answers `false`.
    pub fn readable_now(&self) -> io::Result<bool> {
        self.shared.readable_now()
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.shared.read(buf)
    }
}

impl Read for &TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.shared.read(buf)
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.shared.write_with(|w| w.write(buf))
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.shared.write_with(|w| w.write_vectored(bufs))
    }

    /// Every write is on the socket when it returns: nothing to flush.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Write for &TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.shared.write_with(|w| w.write(buf))
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.shared.write_with(|w| w.write_vectored(bufs))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The socket's descriptor: for `poll` in an event loop, **not** for deciding whether data
/// is there (use [`TlsStream::readable_now`]: decrypted data may be buffered, and a
/// readable socket may carry only a TLS record without data).
impl AsFd for TlsStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.shared.sock.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_shown_as_text_or_hex() {
        assert_eq!(show_bytes(b"VMIG hello"), "\"VMIG hello\"");
        assert_eq!(show_bytes(b"VMIG\x00\xff"), "\"VMIG\\x00\\xff\"");
        assert_eq!(show_bytes(&[b'a'; 40]).len(), 18);
    }

    #[test]
    fn kinds() {
        let e = HandshakeError::TimedOut {
            peer: "tcp:127.0.0.1:1".into(),
            deadline: Duration::from_millis(5),
        };
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        let io: io::Error = e.into();
        assert_eq!(io.kind(), io::ErrorKind::TimedOut);
        assert_eq!(
            io.to_string(),
            "TLS handshake with tcp:127.0.0.1:1: not completed within 5ms"
        );
        let (d, k) = describe(
            &rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA),
            Role::Client,
        );
        assert_eq!(k, io::ErrorKind::PermissionDenied);
        assert_eq!(
            d,
            "the destination refused our client certificate (TLS alert UnknownCA)"
        );
    }
}
