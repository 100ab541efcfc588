// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The host configuration file (TOML): the settings that belong to a host rather than to one
//! command (TLS identity and authorization, the fencing store and its credentials, the lock
//! and state directories). Its values pass the same checks as the options they stand for;
//! options given on the command line (or by their environment variables) override it. The
//! guide is docs/cli.md ("The configuration file").

use std::fmt;
use std::path::{Path, PathBuf};

use clap::Args;
use serde::{Deserialize, Deserializer};

use vfio_mig_session::transport::tls::PeerIdentity;
use vfio_mig_session::{Error, Result};

/// Where the file is read when neither `--config` nor `VFIO_MIG_CONFIG` names one (a missing
/// file there is no error: a host without one runs on options and defaults).
pub const DEFAULT_PATH: &str = "/etc/vfio-mig/config.toml";

/// `--config`: the commands that take host settings.
#[derive(Debug, Args, Clone, Default)]
pub struct ConfigArgs {
    /// The host configuration file (TOML; see docs/cli.md). Default: /etc/vfio-mig/config.toml
    /// when it exists. Options on the command line override its settings.
    #[arg(long, value_name = "PATH", env = "VFIO_MIG_CONFIG")]
    pub config: Option<PathBuf>,
}

impl ConfigArgs {
    /// The file named by `--config`, else the default file if it exists (None: no file).
    pub fn load(&self) -> Result<Option<ConfigFile>> {
        match &self.config {
            Some(path) => ConfigFile::read(path).map(Some),
            None if Path::new(DEFAULT_PATH).exists() => {
                ConfigFile::read(Path::new(DEFAULT_PATH)).map(Some)
            }
            None => Ok(None),
        }
    }
}

/// The configuration file, as read and checked.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConfigFile {
    /// `lock-dir`: the device lock files (`--lock-dir`).
    pub lock_dir: Option<PathBuf>,
    /// `state-dir`: the destination fencing state (`--state-dir`).
    pub state_dir: Option<PathBuf>,
    /// `[tls]`: this host's TLS identity and who may load into its devices.
    #[serde(default)]
    pub tls: TlsSection,
    /// `[fence]`: the fencing store shared by the hosts.
    #[serde(default)]
    pub fence: FenceSection,
}

/// `[tls]`: used for `tcp:` addresses only (a `unix:` socket is protected by its permissions).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TlsSection {
    /// `cert`: PEM certificate chain of this host (`--tls-cert`).
    pub cert: Option<PathBuf>,
    /// `key`: its private key (`--tls-key`); refused if others may read it.
    #[serde(default, deserialize_with = "private_key")]
    pub key: Option<PathBuf>,
    /// `ca`: the CA bundle peers' certificates chain to (`--tls-ca`).
    pub ca: Option<PathBuf>,
    /// `authorize`: recv's authorization policy file (`--authorize`).
    pub authorize: Option<PathBuf>,
    /// `allow`: source identities allowed to load into every device (`--allow`).
    #[serde(default, deserialize_with = "identities")]
    pub allow: Vec<String>,
}

/// `[fence]`: the store and its credentials (`--fence-*`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FenceSection {
    /// `store`: `etcds://...`, `etcd://...` or `dir:PATH` (`--fence`).
    #[serde(default, deserialize_with = "store")]
    pub store: Option<String>,
    /// `ca` (`--fence-ca`).
    pub ca: Option<PathBuf>,
    /// `cert` (`--fence-cert`).
    pub cert: Option<PathBuf>,
    /// `cert-key` (`--fence-cert-key`); refused if others may read it.
    #[serde(default, deserialize_with = "private_key")]
    pub cert_key: Option<PathBuf>,
    /// `insecure` (`--fence-insecure`).
    #[serde(default)]
    pub insecure: bool,
    /// `owner` (`--fence-owner`).
    pub owner: Option<String>,
    /// `ttl`, seconds (`--fence-ttl`).
    #[serde(default, deserialize_with = "ttl")]
    pub ttl: Option<f64>,
    /// `timeout`, seconds (`--fence-timeout`).
    #[serde(default, deserialize_with = "timeout")]
    pub timeout: Option<f64>,
}

/// Runs `vfio-mig config ...`: prints the settings, or one error line; 0 when valid, 2 not.
pub fn run(command: &super::ConfigCommand) -> u8 {
    let super::ConfigCommand::Check { path } = command;
    match check(path) {
        Ok(text) => match super::output_text(&text) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("vfio-mig: error: {e}");
                2
            }
        },
        Err(e) => {
            eprintln!("vfio-mig: error: {e}");
            2
        }
    }
}

/// Checks the file at `path` as the commands would use it (the key files' permissions, the
/// certificates, the authorization policy and the store's credentials are read and checked;
/// no store is contacted) and returns its effective settings, defaults filled in.
fn check(path: &Path) -> Result<String> {
    let mut file = ConfigFile::read(path)?;
    let in_file = |e: Error| Error::invalid_input(format!("config {}: {e}", path.display()));
    super::tls::check_section(&file.tls).map_err(in_file)?;
    if file.fence.store.is_some() {
        let dirs = super::DirArgs::default();
        super::fencing::FenceSettings::resolve(&dirs, Some(&Default::default()), Some(&file))
            .fencing()
            .map_err(in_file)?;
    }
    file.lock_dir
        .get_or_insert_with(|| vfio_mig_fence::DEFAULT_LOCK_DIR.into());
    file.state_dir
        .get_or_insert_with(|| vfio_mig_fence::DEFAULT_STATE_DIR.into());
    if file.fence.store.is_some() {
        let (ttl, timeout) = super::fencing::DEFAULT_TTL_AND_TIMEOUT;
        file.fence.ttl.get_or_insert(ttl);
        file.fence.timeout.get_or_insert(timeout);
    }
    Ok(format!("# {}\n{file}", path.display()))
}

impl ConfigFile {
    /// Reads and checks the file at `path`: an error names the file, the line and the key.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::invalid_input(format!("config {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| {
            let place = e.span().map(|s| key_at(&text, s.start)).unwrap_or_default();
            let message = e.message().trim().replace('\n', "; ");
            Error::invalid_input(format!("config {}{place}: {message}", path.display()))
        })
    }
}

/// Prints the settings as `key = value` lines (paths and names only: the contents of key
/// files are never read here, so never printed).
impl fmt::Display for ConfigFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path =
            |p: &Option<PathBuf>| p.as_ref().map(|p| format!("{:?}", p.display().to_string()));
        let lines = [
            ("lock-dir", path(&self.lock_dir)),
            ("state-dir", path(&self.state_dir)),
            ("tls.cert", path(&self.tls.cert)),
            ("tls.key", path(&self.tls.key)),
            ("tls.ca", path(&self.tls.ca)),
            ("tls.authorize", path(&self.tls.authorize)),
            (
                "tls.allow",
                Some(format!("{:?}", self.tls.allow)).filter(|_| !self.tls.allow.is_empty()),
            ),
            (
                "fence.store",
                self.fence
                    .store
                    .as_deref()
                    .map(|s| format!("{:?}", redact(s))),
            ),
            ("fence.ca", path(&self.fence.ca)),
            ("fence.cert", path(&self.fence.cert)),
            ("fence.cert-key", path(&self.fence.cert_key)),
            (
                "fence.insecure",
                Some(self.fence.insecure.to_string()).filter(|_| self.fence.insecure),
            ),
            (
                "fence.owner",
                self.fence.owner.as_ref().map(|o| format!("{o:?}")),
            ),
            ("fence.ttl", self.fence.ttl.map(|s| s.to_string())),
            ("fence.timeout", self.fence.timeout.map(|s| s.to_string())),
        ];
        for (key, value) in lines {
            if let Some(value) = value {
                writeln!(f, "{key} = {value}")?;
            }
        }
        Ok(())
    }
}

/// `:LINE: KEY` of the byte at `offset`: the line's number, and the key written on it under
/// the `[section]` above it (the parser's errors carry a position, not the key's name).
fn key_at(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let number = before.matches('\n').count() + 1;
    let line = text.lines().nth(number - 1).unwrap_or("");
    let key = line.split('=').next().unwrap_or("").trim();
    let section = before
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim());
    match (section, key) {
        (_, "") => format!(":{number}"),
        (_, k) if k.starts_with('[') => format!(":{number}: {}", k.trim_matches(['[', ']'])),
        (Some(section), k) => format!(":{number}: {section}.{k}"),
        (None, k) => format!(":{number}: {k}"),
    }
}

/// A store URL without any `user:password@` of its members.
fn redact(spec: &str) -> String {
    let Some((scheme, rest)) = spec.split_once("://") else {
        return spec.to_owned();
    };
    let members: Vec<String> = rest
        .split(',')
        .map(|m| match m.rsplit_once('@') {
            Some((_, host)) => format!("<redacted>@{host}"),
            None => m.to_owned(),
        })
        .collect();
    format!("{scheme}://{}", members.join(","))
}

fn private_key<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<PathBuf>, D::Error> {
    let path = PathBuf::deserialize(d)?;
    super::private::check_private("key file", &path).map_err(serde::de::Error::custom)?;
    Ok(Some(path))
}

fn identities<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<String>, D::Error> {
    let texts = Vec::<String>::deserialize(d)?;
    for text in &texts {
        text.parse::<PeerIdentity>()
            .map_err(|e| serde::de::Error::custom(format!("{text:?}: {e}")))?;
    }
    Ok(texts)
}

fn store<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<String>, D::Error> {
    let spec = String::deserialize(d)?;
    super::fencing::check_store_spec(&spec).map_err(serde::de::Error::custom)?;
    Ok(Some(spec))
}

fn secs_in<'de, D: Deserializer<'de>>(
    d: D,
    min: f64,
    max: f64,
) -> std::result::Result<Option<f64>, D::Error> {
    let value = f64::deserialize(d)?;
    super::check_secs(value, min, max).map_err(serde::de::Error::custom)?;
    Ok(Some(value))
}

fn ttl<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<f64>, D::Error> {
    let (min, max) = super::fencing::TTL_RANGE;
    secs_in(d, min, max)
}

fn timeout<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<f64>, D::Error> {
    let (min, max) = super::fencing::TIMEOUT_RANGE;
    secs_in(d, min, max)
}
