// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Test certificates for vfio-mig's TLS tests and benchmarks, minted in one place.
//!
//! A [`Ca`] writes its certificate into a directory and signs leaves ([`Ca::leaf`]) for a
//! server, a client or both ([`Usage`]), with the subject alternative names each test needs.
//! Every file is PEM; a key is readable by its owner only, since vfio-mig refuses a private
//! key that others can read.
//!
//! ```
//! use vfio_mig_testcerts::{Ca, Usage};
//! let dir = tempfile::tempdir().unwrap();
//! let ca = Ca::new(dir.path(), "test-ca").unwrap();
//! let server = ca.leaf(dir.path(), "dst", &["dst.example"], Usage::Server).unwrap();
//! assert!(server.cert.exists() && server.key.exists() && ca.pem().exists());
//! ```

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Why a certificate could not be minted.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// rcgen refused a name or failed to generate or sign.
    #[error("mint test certificate {name}")]
    Mint {
        /// The certificate's common name.
        name: String,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// A PEM file could not be written.
    #[error("write {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The write's error.
        #[source]
        source: std::io::Error,
    },
}

/// What a leaf certificate is for (its extended key usage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// A TLS server (`serverAuth`).
    Server,
    /// A TLS client (`clientAuth`).
    Client,
    /// Both, as an etcd member that serves clients and dials its peers.
    ServerAndClient,
}

impl Usage {
    fn purposes(self) -> Vec<ExtendedKeyUsagePurpose> {
        match self {
            Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Usage::ServerAndClient => vec![
                ExtendedKeyUsagePurpose::ClientAuth,
                ExtendedKeyUsagePurpose::ServerAuth,
            ],
        }
    }
}

/// A leaf's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, mode 0600).
    pub key: PathBuf,
}

/// A certificate authority whose certificate is a PEM file and that signs leaves.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: PathBuf,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("pem", &self.pem).finish()
    }
}

impl Ca {
    /// A new self-signed CA with common name `name`, its certificate written to
    /// `dir/<name>.pem`.
    pub fn new(dir: &Path, name: &str) -> Result<Ca, Error> {
        let mint = |source| Error::Mint {
            name: name.to_owned(),
            source,
        };
        let key = KeyPair::generate().map_err(mint)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(mint)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).map_err(mint)?;
        let pem = dir.join(format!("{name}.pem"));
        write(&pem, cert.pem())?;
        Ok(Ca {
            issuer: Issuer::new(params, key),
            pem,
        })
    }

    /// The CA's certificate file.
    pub fn pem(&self) -> &Path {
        &self.pem
    }

    /// A leaf signed by this CA with common name `cn`, written to `dir/<cn>.crt` and
    /// `dir/<cn>.key`. Each of `sans` is an IP address, a URI when it starts with `uri:`
    /// (the prefix dropped), or else a DNS name.
    pub fn leaf(&self, dir: &Path, cn: &str, sans: &[&str], usage: Usage) -> Result<Leaf, Error> {
        let mint = |source| Error::Mint {
            name: cn.to_owned(),
            source,
        };
        let key = KeyPair::generate().map_err(mint)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(mint)?;
        for san in sans {
            params
                .subject_alt_names
                .push(subject_alt_name(san).map_err(mint)?);
        }
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = usage.purposes();
        let cert = params.signed_by(&key, &self.issuer).map_err(mint)?;
        let leaf = Leaf {
            cert: dir.join(format!("{cn}.crt")),
            key: dir.join(format!("{cn}.key")),
        };
        write(&leaf.cert, cert.pem())?;
        write(&leaf.key, key.serialize_pem())?;
        std::fs::set_permissions(&leaf.key, std::fs::Permissions::from_mode(0o600)).map_err(
            |source| Error::Write {
                path: leaf.key.clone(),
                source,
            },
        )?;
        Ok(leaf)
    }
}

fn subject_alt_name(san: &str) -> Result<SanType, rcgen::Error> {
    if let Some(uri) = san.strip_prefix("uri:") {
        return Ok(SanType::URI(uri.try_into()?));
    }
    match san.parse::<IpAddr>() {
        Ok(ip) => Ok(SanType::IpAddress(ip)),
        Err(_) => Ok(SanType::DnsName(san.try_into()?)),
    }
}

fn write(path: &Path, pem: String) -> Result<(), Error> {
    std::fs::write(path, pem).map_err(|source| Error::Write {
        path: path.to_owned(),
        source,
    })
}
