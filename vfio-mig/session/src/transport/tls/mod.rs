// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! (Feature `tls`.) An authenticated, encrypted transport for vfio-mig migrations: mutually authenticated
//! TLS 1.3 (rustls with the `ring` provider) over a TCP socket, plus an authorization policy
//! that says which source may load into which device.
//!
//! - [`TlsConfig`]: the certificate, key and CA bundle files of one side; builds the
//!   `rustls` client ([`TlsConfig::client_config`], the source) and server
//!   ([`TlsConfig::server_config`], the destination) configurations. Both sides require the
//!   other's certificate to chain to the CA bundle; the client also checks the server name.
//! - [`connect`] and [`accept`]: run the handshake over a connected [`std::net::TcpStream`]
//!   under one deadline for the whole handshake, and return a [`TlsStream`].
//! - [`TlsStream`]: blocking `Read + Write`, with handles that share one TLS session
//!   ([`TlsStream::try_clone`]) so that one handle can read while another writes, as the
//!   project's handshake does with its socket clones. See [`stream`] for the design.
//! - [`PeerIdentities`]: the names the verified peer certificate carries (DNS and URI SANs,
//!   subject CN), and [`AuthorizationPolicy`], which maps a device key to the identities
//!   allowed to load into it.
//!
//! ```no_run
//! use std::net::TcpStream;
//! use std::time::Duration;
//! use vfio_mig_session::transport::tls::{connect, TlsConfig};
//!
//! let cfg = TlsConfig {
//!     cert: "/etc/vfio-mig/src.crt".into(),
//!     key: "/etc/vfio-mig/src.key".into(),
//!     ca: "/etc/vfio-mig/ca.crt".into(),
//!     server_name: None,
//! };
//! let sock = TcpStream::connect("dst.example:7000")?;
//! let name = cfg.server_name_for("dst.example")?;
//! let mut tls = connect(sock, cfg.client_config()?, name, Duration::from_secs(10))?;
//! println!("talking to {}", tls.peer_identities());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod config;
pub mod identity;
pub mod policy;
pub mod stream;

pub use config::{TlsConfig, TlsError};
pub use identity::{PeerIdentities, PeerIdentity};
pub use policy::{AuthorizationPolicy, AuthzError, PolicyError, ANY_DEVICE};
/// The rustls configurations [`TlsConfig`] builds (re-exported).
pub use rustls::{ClientConfig, ServerConfig};
/// The name a server certificate is checked against (re-exported from `rustls-pki-types`).
pub use rustls_pki_types::ServerName;
pub use stream::{accept, connect, HandshakeError, TlsStream, NOT_TLS_NOTICE, READY};
