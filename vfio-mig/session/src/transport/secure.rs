// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! (Feature `tls`.) Connections over TLS: [`connect_tls`] for the source, [`accept_tls`] for
//! the destination. Both run the whole TLS handshake under one deadline.

use std::sync::Arc;
use std::time::Duration;

use super::tls::{self, ServerName, TlsConfig};
use super::{connect, Address, Connection};
use crate::error::{Error, Result};

/// The source's side of TLS: its configuration and the name the destination's certificate
/// must carry.
#[derive(Clone)]
pub struct ClientTls {
    /// The rustls client configuration ([`TlsConfig::client_config`]).
    pub config: Arc<rustls::ClientConfig>,
    /// The files, for the server name ([`TlsConfig::server_name_for`]).
    pub files: TlsConfig,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Loads the certificate, key and CA bundle of `files` (fails naming the file).
    pub fn new(files: TlsConfig) -> Result<Self> {
        let config = files
            .client_config()
            .map_err(|e| Error::invalid_input(format!("TLS: {e}")))?;
        Ok(Self { config, files })
    }
}

/// Connects to the TCP address `addr` (within `timeout`) and runs the TLS handshake as the
/// source (within `handshake`): the destination's certificate must chain to the CA bundle and
/// name the host of `addr` (or the configured server name); the destination must accept our
/// certificate. A `unix:` address is a usage error (Unix sockets stay local and plain).
pub fn connect_tls(
    addr: &Address,
    timeout: Duration,
    tls: &ClientTls,
    handshake: Duration,
) -> Result<Connection> {
    let step = format!("connect to {addr} (TLS)");
    let Address::Tcp { host, .. } = addr else {
        return Err(Error::invalid_input(format!(
            "{step}: TLS runs over tcp:HOST:PORT only; a unix: socket is local and plain"
        )));
    };
    let name: ServerName<'static> = tls
        .files
        .server_name_for(host)
        .map_err(|e| Error::invalid_input(format!("{step}: {e}")))?;
    let plain = connect(addr, timeout)?;
    let sock = plain
        .into_tcp()
        .ok_or_else(|| Error::invalid_input(format!("{step}: not a TCP connection")))?;
    let stream = tls::connect(sock, tls.config.clone(), name, handshake)
        .map_err(|e| Error::transport(step, e.into()))?;
    log::info!(
        "TLS to {addr}: {} ({:?})",
        stream.peer_identities(),
        stream.cipher_suite()
    );
    Ok(Connection::tls(stream))
}

/// Runs the destination's TLS handshake over an accepted TCP connection within `deadline`:
/// the source must present a certificate that chains to the CA bundle of `config`.
pub fn accept_tls(
    conn: Connection,
    config: Arc<rustls::ServerConfig>,
    deadline: Duration,
) -> Result<Connection> {
    let peer = conn.peer().to_owned();
    let step = format!("TLS handshake with {peer}");
    let sock = conn
        .into_tcp()
        .ok_or_else(|| Error::invalid_input(format!("{step}: TLS runs over tcp:HOST:PORT only")))?;
    let stream =
        tls::accept(sock, config, deadline).map_err(|e| Error::transport(step, e.into()))?;
    Ok(Connection::tls(stream))
}
