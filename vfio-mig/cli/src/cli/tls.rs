// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The options of a secure connection (`send`, `recv`): TLS 1.3 with certificates, or plain
//! TCP only when asked with `--insecure`; and, on `recv`, who may load into which device.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use vfio_mig_session::transport::tls::{AuthorizationPolicy, PeerIdentity, TlsConfig, ANY_DEVICE};
use vfio_mig_session::transport::{Address, ClientTls};
use vfio_mig_session::{Error, Result};

use super::config::{ConfigFile, TlsSection};

/// TLS options of `send` and `recv`. `tcp:` needs either all three of `--tls-cert`,
/// `--tls-key`, `--tls-ca` (or the configuration file's `[tls]`), or `--insecure`.
#[derive(Debug, Args, Clone, Default)]
pub struct TlsArgs {
    /// PEM certificate chain of this host (its identity for the peer).
    #[arg(long, value_name = "FILE", env = "VFIO_MIG_TLS_CERT",
          requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", env = "VFIO_MIG_TLS_KEY",
          requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,
    /// PEM bundle of the CA certificates the peer's certificate must chain to.
    #[arg(long, value_name = "FILE", env = "VFIO_MIG_TLS_CA",
          requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// Allow plain TCP: no encryption and no authentication, anyone who reaches the port can
    /// load state into the device. For tests and isolated networks only. The configuration
    /// file's `[tls]` is then not used.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "tls_ca"])]
    pub insecure: bool,
}

/// `recv`: who may load into which device.
#[derive(Debug, Args, Clone, Default)]
pub struct AuthorizeArgs {
    /// The authorization policy, lines of `DEVICE IDENTITY...` (`*` for every device;
    /// identities `dns:NAME`, `uri:URI`, `cn:NAME`). DEVICE is the device's fencing key: the
    /// canonical sysfs path, or `mock:ID`; else the device as given.
    #[arg(long, value_name = "FILE")]
    pub authorize: Option<PathBuf>,
    /// A source identity allowed to load into every device given (repeatable; adds to
    /// --authorize; replaces the configuration file's `allow`).
    #[arg(long, value_name = "IDENTITY")]
    pub allow: Vec<String>,
}

/// A command's TLS: its options merged over the configuration file's `[tls]`.
#[derive(Debug, Clone, Default)]
pub struct TlsSettings {
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    tls_server_name: Option<String>,
    authorize: Option<PathBuf>,
    allow: Vec<String>,
    insecure: bool,
}

impl TlsSettings {
    /// The TLS of a connection to or from `addr`. The file's `[tls]` serves `tcp:` only (a
    /// `unix:` socket is protected by its permissions), and not with `--insecure`; its
    /// identity (cert, key, CA) is used as a whole unless the options give one.
    pub fn resolve(
        identity: &TlsArgs,
        authorization: Option<&AuthorizeArgs>,
        server_name: Option<String>,
        file: Option<&ConfigFile>,
        addr: &Address,
    ) -> Self {
        let section = file
            .map(|f| &f.tls)
            .filter(|_| matches!(addr, Address::Tcp { .. }) && !identity.insecure);
        let from_flags = identity.tls_cert.is_some();
        let pick = |flag: &Option<PathBuf>, file: fn(&TlsSection) -> &Option<PathBuf>| {
            if from_flags {
                flag.clone()
            } else {
                section.and_then(|s| file(s).clone())
            }
        };
        let none = AuthorizeArgs::default();
        let authz = authorization.unwrap_or(&none);
        let file_authz = section.filter(|_| authorization.is_some());
        Self {
            tls_cert: pick(&identity.tls_cert, |s| &s.cert),
            tls_key: pick(&identity.tls_key, |s| &s.key),
            tls_ca: pick(&identity.tls_ca, |s| &s.ca),
            tls_server_name: server_name,
            authorize: authz
                .authorize
                .clone()
                .or_else(|| file_authz.and_then(|s| s.authorize.clone())),
            allow: match (authz.allow.is_empty(), file_authz) {
                (true, Some(s)) => s.allow.clone(),
                _ => authz.allow.clone(),
            },
            insecure: identity.insecure,
        }
    }

    fn files(&self) -> Option<TlsConfig> {
        Some(TlsConfig {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            ca: self.tls_ca.clone()?,
            server_name: self.tls_server_name.clone(),
        })
    }

    /// Refuses what is never right: TLS options on a Unix socket, plain TCP without
    /// `--insecure`.
    fn check(&self, addr: &Address, what: &str) -> Result<Option<TlsConfig>> {
        let files = self.files();
        match addr {
            Address::Tcp { .. } if files.is_none() && !self.insecure => {
                Err(Error::invalid_input(format!(
                    "{what} {addr}: plain TCP is neither encrypted nor authenticated; give \
                     --tls-cert, --tls-key and --tls-ca (or --insecure to accept that)"
                )))
            }
            Address::Unix(_) if files.is_some() => Err(Error::invalid_input(format!(
                "{what} {addr}: TLS runs over tcp:HOST:PORT; a unix: socket is local, \
                 protected by its file permissions"
            ))),
            _ => {
                if let Some(f) = &files {
                    super::private::check_private("--tls-key", &f.key)?;
                }
                Ok(files)
            }
        }
    }

    /// The source's TLS, loaded before any device is touched (None: plain).
    pub fn client(&self, to: &Address) -> Result<Option<ClientTls>> {
        self.check(to, "send to")?.map(ClientTls::new).transpose()
    }

    /// The destination's TLS and authorization policy, loaded before listening (None: plain).
    pub fn server(
        &self,
        listen: &Address,
        device_keys: &[String],
    ) -> Result<
        Option<(
            Arc<vfio_mig_session::transport::tls::ServerConfig>,
            AuthorizationPolicy,
        )>,
    > {
        let Some(files) = self.check(listen, "recv on")? else {
            if !self.allow.is_empty() || self.authorize.is_some() {
                return Err(Error::invalid_input(
                    "--allow and --authorize need TLS (--tls-cert, --tls-key, --tls-ca): \
                     without it the source has no identity to authorize",
                ));
            }
            return Ok(None);
        };
        let config = files
            .server_config()
            .map_err(|e| Error::invalid_input(format!("TLS: {e}")))?;
        let mut policy = match &self.authorize {
            Some(path) => {
                AuthorizationPolicy::load(path).map_err(|e| Error::invalid_input(e.to_string()))?
            }
            None => AuthorizationPolicy::new(),
        };
        for text in &self.allow {
            let id: PeerIdentity = text
                .parse()
                .map_err(|e| Error::invalid_input(format!("--allow {text}: {e}")))?;
            for key in device_keys {
                policy.allow(key.clone(), id.clone());
            }
        }
        if policy.is_empty() {
            return Err(Error::invalid_input(format!(
                "recv over TLS needs --authorize FILE or --allow IDENTITY: which sources may \
                 load into {} (e.g. --allow dns:source.example)",
                device_keys.join(" ")
            )));
        }
        if device_keys
            .iter()
            .all(|k| policy.allowed(k).next().is_none())
            && policy.allowed(ANY_DEVICE).next().is_none()
        {
            log::warn!(
                "the authorization policy names none of the devices: every source is refused"
            );
        }
        Ok(Some((config, policy)))
    }
}

/// Checks a configuration file's `[tls]` as `send` and `recv` would use it: the identity
/// complete (cert, key and CA together) and loadable, the authorization policy readable.
pub fn check_section(section: &TlsSection) -> Result<()> {
    let identity = [&section.cert, &section.key, &section.ca];
    if identity.iter().any(|f| f.is_some()) {
        let (Some(cert), Some(key), Some(ca)) = (&section.cert, &section.key, &section.ca) else {
            return Err(Error::invalid_input(
                "[tls]: cert, key and ca come together (this host's identity)",
            ));
        };
        TlsConfig {
            cert: cert.clone(),
            key: key.clone(),
            ca: ca.clone(),
            server_name: None,
        }
        .server_config()
        .map_err(|e| Error::invalid_input(format!("[tls]: {e}")))?;
    }
    if let Some(path) = &section.authorize {
        AuthorizationPolicy::load(path)
            .map_err(|e| Error::invalid_input(format!("[tls] authorize: {e}")))?;
    }
    Ok(())
}
