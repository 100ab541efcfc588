// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The TLS of an `etcds://` store: the members' certificates verified against one CA (never
//! the system's roots), this host's client certificate presented to them.
//!
//! The files are loaded and checked by the library's [`vfio_mig::transport::tls::TlsConfig`]
//! when the store is made (a missing file, a CA bundle that is not a trust anchor, or a key
//! that is not the certificate's fails there, naming the file), then handed to ureq's
//! rustls connector with the `ring` provider.

use std::path::PathBuf;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig, TlsProvider};

use vfio_mig::error::{Error, Result};
use vfio_mig::transport::tls::TlsConfig as Files;

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

    /// ureq's TLS configuration of these files, after the library checked them.
    pub(crate) fn ureq_config(&self) -> Result<TlsConfig> {
        let bad = |e: &dyn std::fmt::Display| Error::InvalidInput(format!("etcd TLS: {e}"));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let files = Files {
            ca: self.ca.clone(),
            cert: self.client.as_ref().map(|c| c.cert.clone()).unwrap_or_default(),
            key: self.client.as_ref().map(|c| c.key.clone()).unwrap_or_default(),
            server_name: None,
        };
        match &self.client {
            // The CA bundle, the chain, the key and that the key is the certificate's.
            Some(_) => files.client_config().map(drop).map_err(|e| bad(&e))?,
            None => files.load_roots().map(drop).map_err(|e| bad(&e))?,
        }
        // Checked above: these parse.
        let read = |p: &PathBuf| std::fs::read(p).map_err(|e| bad(&format!("{}: {e}", p.display())));
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
        Ok(TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .unversioned_rustls_crypto_provider(provider)
            .root_certs(RootCerts::Specific(Arc::new(roots)))
            .client_cert(client)
            .build())
    }
}

/// What a TLS failure means, for the message: `None` when `e` is not one.
pub(crate) fn tls_failure(e: &ureq::Error) -> Option<String> {
    let found = match e {
        ureq::Error::Rustls(r) => Some(r),
        ureq::Error::Io(io) => io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
        _ => None,
    }?;
    Some(match found {
        rustls::Error::AlertReceived(alert) => format!(
            "TLS: the member refused this host ({alert:?} alert): its --trusted-ca-file did \
             not sign this host's client certificate, or none was given"
        ),
        rustls::Error::InvalidCertificate(why) => format!(
            "TLS: the member's certificate does not verify against the given CA ({why:?})"
        ),
        other => format!("TLS: {other}"),
    })
}
