// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Transports: where a migration stream goes.
//!
//! - `file:PATH` (or a plain path): a stream file, written by `save` and read by `load`; one
//!   direction, so no handshake.
//! - `unix:PATH` and `tcp:HOST:PORT`: a [`Connection`], bidirectional, over which the source
//!   and the destination run the session handshake ([`crate::handshake`]) around the stream.
//! - With the `tls` feature, a TCP connection can be mutually authenticated TLS 1.3
//!   (`connect_tls`, `accept_tls`, the `tls` module): the source and destination prove
//!   their identities with certificates of a common CA, and the destination decides with a
//!   `tls::AuthorizationPolicy` which sources may load into which device. Unix
//!   sockets stay plain: they are local, and file permissions decide who may connect.
//!
//! Memory does not grow with the state size: the stream bounds every record at 1 MiB, and
//! both sides read and write through fixed-size buffers, so a slow destination holds the
//! source back through the socket's own flow control (back-pressure), never by buffering.

mod address;
mod conn;
mod listen;
mod progress;
#[cfg(feature = "tls")]
mod secure;
mod silence;
#[cfg(feature = "tls")]
pub mod tls;

pub use address::Address;
pub use conn::{readable_now, Connection, Duplex};
pub use listen::{connect, listen, Listener};
pub use progress::ProgressFloor;
#[cfg(feature = "tls")]
pub use secure::{accept_tls, connect_tls, ClientTls};

use std::time::Duration;

/// Size of the buffered reader and writer around a connection (the stream's records are up
/// to 1 MiB; larger records are written straight through).
pub const SOCKET_BUFFER: usize = 64 << 10;

/// Default idle timeout of a connection: a peer silent for this long is considered dead.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Default timeout of a TCP connect.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
