// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The files of one side ([`TlsConfig`]) and the `rustls` configurations built from them.
//!
//! Both configurations speak TLS 1.3 only, with the `ring` provider, and have session
//! resumption off: a migration is one long connection, and without tickets the server sends
//! nothing unasked after the handshake (which [`super::TlsStream::readable_now`] relies on:
//! readable means the peer said something).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// A failure to load the files of a [`TlsConfig`] or to build a configuration from them. Each
/// message is one line and names the file and what failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("read {what} {}: {source}", .path.display())]
    Read {
        /// What the file holds ("certificate chain", "private key", "CA bundle").
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file is not PEM, or holds no block of the expected kind.
    #[error("{what} {}: {detail}", .path.display())]
    Pem {
        /// What the file holds.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why (e.g. "no CERTIFICATE block").
        detail: String,
    },
    /// A certificate of the CA bundle is not a usable trust anchor.
    #[error("CA bundle {}: certificate {index} is not a usable trust anchor: {detail}", .path.display())]
    TrustAnchor {
        /// The CA bundle.
        path: PathBuf,
        /// The certificate's place in the file, from 1.
        index: usize,
        /// Why.
        detail: String,
    },
    /// The certificate chain and the key do not make a usable identity (e.g. the key is not
    /// the certificate's, or its algorithm is not supported).
    #[error("certificate {} with key {}: {detail}", .cert.display(), .key.display())]
    Identity {
        /// The certificate chain file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// Why.
        detail: String,
    },
    /// The client-certificate verifier could not be built from the CA bundle.
    #[error("CA bundle {}: {detail}", .path.display())]
    Verifier {
        /// The CA bundle.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// The expected server name is neither a DNS name nor an IP address.
    #[error("server name `{name}`: {detail}")]
    ServerName {
        /// The name as given.
        name: String,
        /// Why.
        detail: String,
    },
    /// The provider refused the protocol version (cannot happen with `ring` and TLS 1.3).
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The files one side of a migration authenticates with.
///
/// The source (TLS client) presents `cert` and checks the destination's certificate against
/// `ca` and the expected server name; the destination (TLS server) presents `cert` and
/// requires a client certificate that chains to `ca`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM certificate chain, end-entity certificate first.
    pub cert: PathBuf,
    /// PEM private key of `cert` (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM bundle of the CA certificates the peer's certificate must chain to.
    pub ca: PathBuf,
    /// The name the destination's certificate must carry (client only). `None`: the host of
    /// the address connected to (see [`TlsConfig::server_name_for`]).
    pub server_name: Option<String>,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn pem_detail(e: &pem::Error, kind: &str) -> String {
    match e {
        pem::Error::NoItemsFound => format!("no {kind} block found (expected PEM)"),
        other => format!("not valid PEM: {other:?}"),
    }
}

/// Reads every certificate of a PEM file (at least one).
fn load_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            path: path.to_owned(),
            detail: pem_detail(&e, "CERTIFICATE"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            path: path.to_owned(),
            detail: "no CERTIFICATE block found (expected PEM)".into(),
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read("private key", path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Pem {
        what: "private key",
        path: path.to_owned(),
        detail: pem_detail(&e, "PRIVATE KEY"),
    })
}

/// The crypto provider of both sides: `ring`.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsConfig {
    /// Reads the CA bundle into a root store; every certificate in it must be a usable
    /// trust anchor (a typo'd bundle fails here, not at the first connection).
    pub fn load_roots(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        for (i, cert) in load_certs("CA bundle", &self.ca)?.into_iter().enumerate() {
            roots.add(cert).map_err(|e| TlsError::TrustAnchor {
                path: self.ca.clone(),
                index: i + 1,
                detail: e.to_string(),
            })?;
        }
        Ok(roots)
    }

    fn identity(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        Ok((
            load_certs("certificate chain", &self.cert)?,
            load_key(&self.key)?,
        ))
    }

    fn identity_error(&self, e: impl fmt::Display) -> TlsError {
        TlsError::Identity {
            cert: self.cert.clone(),
            key: self.key.clone(),
            detail: e.to_string(),
        }
    }

    /// The configuration of the source (TLS client): TLS 1.3, `cert`/`key` as the client
    /// certificate, the server verified against `ca` (webpki), no session resumption.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let roots = self.load_roots()?;
        let (chain, key) = self.identity()?;
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| self.identity_error(e))?;
        config.resumption = Resumption::disabled();
        Ok(Arc::new(config))
    }

    /// The configuration of the destination (TLS server): TLS 1.3, `cert`/`key` as the
    /// server certificate, a client certificate chaining to `ca` required (webpki), no
    /// session tickets nor session cache.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let roots = Arc::new(self.load_roots()?);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| TlsError::Verifier {
                path: self.ca.clone(),
                detail: e.to_string(),
            })?;
        let (chain, key) = self.identity()?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| self.identity_error(e))?;
        config.send_tls13_tickets = 0;
        config.session_storage = Arc::new(NoServerSessionStorage {});
        Ok(Arc::new(config))
    }

    /// The name the destination's certificate must be valid for: `server_name` if set, else
    /// `host` (the host of `tcp:HOST:PORT`, without brackets). DNS names and IP addresses
    /// are accepted (an IP must then be in the certificate's IP SANs).
    pub fn server_name_for(&self, host: &str) -> Result<ServerName<'static>, TlsError> {
        let name = self.server_name.as_deref().unwrap_or(host);
        ServerName::try_from(name.to_owned()).map_err(|e| TlsError::ServerName {
            name: name.to_owned(),
            detail: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path) -> TlsConfig {
        TlsConfig {
            cert: dir.join("c.pem"),
            key: dir.join("k.pem"),
            ca: dir.join("ca.pem"),
            server_name: None,
        }
    }

    #[test]
    fn missing_and_bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path());
        let e = c.client_config().unwrap_err().to_string();
        assert!(e.starts_with("read CA bundle "), "{e}");
        assert!(e.contains("ca.pem"), "{e}");
        std::fs::write(&c.ca, "not pem at all\n").unwrap();
        let e = c.server_config().unwrap_err().to_string();
        assert!(e.contains("ca.pem: no CERTIFICATE block found"), "{e}");
        std::fs::write(
            &c.ca,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = c.client_config().unwrap_err().to_string();
        assert!(
            e.contains("ca.pem: certificate 1 is not a usable trust anchor"),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn server_names() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path());
        assert_eq!(
            c.server_name_for("dst.example").unwrap(),
            ServerName::try_from("dst.example").unwrap()
        );
        assert!(matches!(
            c.server_name_for("::1").unwrap(),
            ServerName::IpAddress(_)
        ));
        c.server_name = Some("other.example".into());
        assert_eq!(
            c.server_name_for("10.0.0.1").unwrap(),
            ServerName::try_from("other.example").unwrap()
        );
        c.server_name = Some("bad name!".into());
        let e = c.server_name_for("x").unwrap_err().to_string();
        assert!(e.starts_with("server name `bad name!`"), "{e}");
    }
}
