// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The options of a secure connection (`send`, `recv`): TLS 1.3 with certificates, or plain
//! TCP only when asked with `--insecure`; and, on `recv`, who may load into which device.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use vfio_mig_session::transport::tls::{AuthorizationPolicy, PeerIdentity, TlsConfig, ANY_DEVICE};
use vfio_mig_session::transport::{Address, ClientTls};
use vfio_mig_session::{Error, Result};

/// TLS options. `tcp:` needs either all three of `--tls-cert`, `--tls-key`, `--tls-ca`, or
/// `--insecure`.
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
    /// send: the name the destination's certificate must carry (default: the host of --to).
    #[arg(long, value_name = "NAME")]
    pub tls_server_name: Option<String>,
    /// recv: the authorization policy, lines of `DEVICE IDENTITY...` (`*` for every device;
    /// identities `dns:NAME`, `uri:URI`, `cn:NAME`). DEVICE is the device's fencing key: the
    /// canonical sysfs path, or `mock:ID`; else the device as given.
    #[arg(long, value_name = "FILE")]
    pub authorize: Option<PathBuf>,
    /// recv: a source identity allowed to load into every device given (repeatable; adds to
    /// --authorize).
    #[arg(long, value_name = "IDENTITY")]
    pub allow: Vec<String>,
    /// Allow plain TCP: no encryption and no authentication, anyone who reaches the port can
    /// load state into the device. For tests and isolated networks only.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "tls_ca"])]
    pub insecure: bool,
}

impl TlsArgs {
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
        if !self.allow.is_empty() || self.authorize.is_some() {
            return Err(Error::invalid_input(
                "--allow and --authorize are options of recv (the destination decides who \
                 may load into its devices)",
            ));
        }
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
        if self.tls_server_name.is_some() {
            return Err(Error::invalid_input(
                "--tls-server-name is an option of send",
            ));
        }
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
