// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The TLS of an `etcds://` store: the members' certificates verified against one CA (never
//! the system's roots), this host's client certificate presented to them.
//!
//! The files are loaded and checked by the library's [`vfio_mig_session::transport::tls::TlsConfig`]
//! when the store is made (a missing file, a CA bundle that is not a trust anchor, or a key
//! that is not the certificate's fails there, naming the file), then handed to ureq's
//! rustls connector with the `ring` provider.

use std::io::Read as _;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::{ClientConfig, ClientConnection, StreamOwned};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig, TlsProvider};

use vfio_mig_fence::{Error, Result};
use vfio_mig_session::transport::tls::TlsConfig as Files;

/// A client certificate chain (end-entity first) and its private key, PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The certificate chain.
    pub cert: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// The TLS files of an `etcds://` store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    /// PEM bundle of the CA(s) every member's certificate must chain to; the member's
    /// certificate must name the host (or IP address) of its `HOST:PORT`.
    pub ca: PathBuf,
    /// This host's certificate. `None` connects without one, which an etcd run with
    /// `--client-cert-auth` refuses (the command always gives one).
    pub client: Option<ClientIdentity>,
}

impl EtcdTls {
    /// Members verified against `ca`, this host presenting `cert` with `key`.
    pub fn new(ca: impl Into<PathBuf>, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        Self {
            ca: ca.into(),
            client: Some(ClientIdentity {
                cert: cert.into(),
                key: key.into(),
            }),
        }
    }

    /// ureq's TLS configuration of these files, after the library checked them, and the
    /// same as a rustls configuration for [`diagnose`].
    pub(crate) fn configs(&self) -> Result<(TlsConfig, Arc<ClientConfig>)> {
        let bad = |e: &dyn std::fmt::Display| Error::invalid_input(format!("etcd TLS: {e}"));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let files = Files {
            ca: self.ca.clone(),
            cert: self
                .client
                .as_ref()
                .map(|c| c.cert.clone())
                .unwrap_or_default(),
            key: self
                .client
                .as_ref()
                .map(|c| c.key.clone())
                .unwrap_or_default(),
            server_name: None,
        };
        let rustls_config = match &self.client {
            // The CA bundle, the chain, the key and that the key is the certificate's.
            Some(_) => files.client_config().map_err(|e| bad(&e))?,
            None => {
                let roots = files.load_roots().map_err(|e| bad(&e))?;
                let config = ClientConfig::builder_with_provider(provider.clone())
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .map_err(|e| bad(&e))?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                Arc::new(config)
            }
        };
        // Checked above: these parse.
        let read =
            |p: &PathBuf| std::fs::read(p).map_err(|e| bad(&format!("{}: {e}", p.display())));
        let roots: Vec<Certificate<'static>> = CertificateDer::pem_slice_iter(&read(&self.ca)?)
            .map(|c| c.map(|c| Certificate::from_der(&c).to_owned()))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| bad(&format!("{}: {e:?}", self.ca.display())))?;
        let client = match &self.client {
            None => None,
            Some(id) => {
                let chain: Vec<Certificate<'static>> =
                    CertificateDer::pem_slice_iter(&read(&id.cert)?)
                        .map(|c| c.map(|c| Certificate::from_der(&c).to_owned()))
                        .collect::<std::result::Result<_, _>>()
                        .map_err(|e| bad(&format!("{}: {e:?}", id.cert.display())))?;
                let key = PrivateKey::from_pem(&read(&id.key)?)
                    .map_err(|e| bad(&format!("{}: {e}", id.key.display())))?;
                Some(ClientCert::new_with_certs(&chain, key))
            }
        };
        let ureq_config = TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .unversioned_rustls_crypto_provider(provider)
            .root_certs(RootCerts::Specific(Arc::new(roots)))
            .client_cert(client)
            .build();
        Ok((ureq_config, rustls_config))
    }
}

/// Whether a member that closed a TLS connection under a request did so because it refused
/// this host's certificate.
///
/// In TLS 1.3 the client's side of the handshake ends before the server has checked the
/// client's certificate, so the request is written at once; a server that refuses the
/// certificate sends its alert and closes, and the request arriving at the closed socket can
/// make the kernel reset the connection, discarding the alert before it is read. So after
/// such a failure a second connection makes the handshake and writes nothing: a refusal then
/// arrives as the alert (and a server that accepted waits, silent after its session tickets,
/// until the read times out: not a refusal).
pub(crate) fn diagnose(config: &Arc<ClientConfig>, endpoint: &str) -> Option<String> {
    const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
    let (host, _) = endpoint.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(host.to_owned()).ok()?;
    let addr = endpoint.to_socket_addrs().ok()?.next()?;
    let sock = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).ok()?;
    sock.set_read_timeout(Some(PROBE_TIMEOUT)).ok()?;
    sock.set_write_timeout(Some(PROBE_TIMEOUT)).ok()?;
    let conn = ClientConnection::new(config.clone(), name).ok()?;
    let mut tls = StreamOwned::new(conn, sock);
    let mut byte = [0u8; 1];
    // Drives the handshake, then waits for what the server says first.
    let e = tls.read(&mut byte).err()?;
    let found = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    Some(describe(found))
}

fn describe(e: &rustls::Error) -> String {
    match e {
        rustls::Error::AlertReceived(alert) => format!(
            "TLS: the member refused this host ({alert:?} alert): its --trusted-ca-file did \
             not sign this host's client certificate, or none was given"
        ),
        rustls::Error::InvalidCertificate(why) => {
            format!("TLS: the member's certificate does not verify against the given CA ({why:?})")
        }
        other => format!("TLS: {other}"),
    }
}

/// What a TLS failure means, for the message: `None` when `e` is not one.
pub(crate) fn tls_failure(e: &ureq::Error) -> Option<String> {
    let found = match e {
        ureq::Error::Rustls(r) => Some(r),
        ureq::Error::Io(io) => io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
        _ => None,
    }?;
    Some(describe(found))
}

/// Whether `e` is a connection the peer closed or reset under a request (see [`diagnose`]).
pub(crate) fn closed_under_request(e: &ureq::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e, ureq::Error::Io(io) if matches!(
        io.kind(),
        BrokenPipe | ConnectionReset | ConnectionAborted | UnexpectedEof
    ))
}
