// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Command-line options of locks and fencing, of the commands that drive devices: the
//! per-host lock and state directories, and `--fence`, a store shared by the hosts of a fleet.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use vfio_mig::wire::StreamHeader;
use vfio_mig_etcd::{EtcdStore, EtcdTls, Scheme, Security};
use vfio_mig_fence::{
    Claim, DirStore, Fence, FenceConfig, FenceSet, FenceStore, Handoff, SharedFencing,
};
use vfio_mig_session::handshake::SessionId;
use vfio_mig_session::{Error, Result};

use super::config::ConfigFile;

/// The range of `--fence-ttl` and `[fence] ttl`, in seconds.
pub const TTL_RANGE: (f64, f64) = (1.0, 3600.0);
/// The range of `--fence-timeout` and `[fence] timeout`, in seconds.
pub const TIMEOUT_RANGE: (f64, f64) = (0.1, 3600.0);
/// The defaults of `--fence-ttl` and `--fence-timeout`, in seconds.
pub const DEFAULT_TTL_AND_TIMEOUT: (f64, f64) = (10.0, 10.0);

/// Where device locks and destination fencing state live (the commands that lock devices).
#[derive(Debug, Args, Clone, Default)]
pub struct DirArgs {
    /// Directory of the device lock files [default: /run/vfio-mig].
    #[arg(long, value_name = "DIR", env = "VFIO_MIG_LOCK_DIR")]
    pub lock_dir: Option<PathBuf>,
    /// Directory of the destination fencing state (highest epoch, completed sessions)
    /// [default: /var/lib/vfio-mig].
    #[arg(long, value_name = "DIR", env = "VFIO_MIG_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
}

impl DirArgs {
    /// The directories: options (or their environment variables), else the configuration
    /// file, else the defaults.
    pub fn config(&self, file: Option<&ConfigFile>) -> FenceConfig {
        let pick = |flag: &Option<PathBuf>, file: Option<&PathBuf>, default: &str| {
            flag.clone()
                .or_else(|| file.cloned())
                .unwrap_or_else(|| PathBuf::from(default))
        };
        FenceConfig::new(
            pick(
                &self.lock_dir,
                file.and_then(|f| f.lock_dir.as_ref()),
                vfio_mig_fence::DEFAULT_LOCK_DIR,
            ),
            pick(
                &self.state_dir,
                file.and_then(|f| f.state_dir.as_ref()),
                vfio_mig_fence::DEFAULT_STATE_DIR,
            ),
        )
    }
}

/// The fencing store shared by the hosts (the commands that hand devices off).
#[derive(Debug, Args, Clone, Default)]
pub struct StoreArgs {
    /// A fencing store shared by the hosts: `etcds://HOST:PORT[,HOST:PORT...]` (etcd over
    /// TLS; needs --fence-ca, --fence-cert, --fence-cert-key), `etcd://...` (plain HTTP; needs
    /// --fence-insecure), or `dir:PATH` for one host. The store grants every handoff's epoch
    /// and keeps one owner per device state (see docs/fencing.md); needs --fence-key. Given
    /// here, the configuration file's store and its credentials are not used.
    #[arg(long, value_name = "STORE", env = "VFIO_MIG_FENCE")]
    pub fence: Option<String>,
    /// PEM bundle of the CA that signed the etcd members' certificates (etcds://; the
    /// system's roots are never used).
    #[arg(long, value_name = "FILE", env = "VFIO_MIG_FENCE_CA")]
    pub fence_ca: Option<PathBuf>,
    /// This host's client certificate chain for etcd (PEM; etcds://), from a CA the members
    /// trust (`--trusted-ca-file`).
    #[arg(long, value_name = "FILE", env = "VFIO_MIG_FENCE_CERT")]
    pub fence_cert: Option<PathBuf>,
    /// The private key of --fence-cert (PEM).
    #[arg(long, value_name = "FILE", env = "VFIO_MIG_FENCE_CERT_KEY")]
    pub fence_cert_key: Option<PathBuf>,
    /// Reach an `etcd://` store over plain HTTP: anyone who reaches its client port can then
    /// rewrite owners and epochs.
    #[arg(long, env = "VFIO_MIG_FENCE_INSECURE")]
    pub fence_insecure: bool,
    /// The identity of a device state in the store, the same on every host (e.g. `vm7/gpu0`);
    /// once per device, in the order of the devices (for migrate: per pair).
    #[arg(long = "fence-key", value_name = "NAME")]
    pub fence_keys: Vec<String>,
    /// This host's name as an owner in the store (default: the host name).
    #[arg(long, value_name = "NAME", env = "VFIO_MIG_FENCE_OWNER")]
    pub fence_owner: Option<String>,
    /// Seconds a claim lives in the store without renewal after its host dies (1 to 3600)
    /// [default: 10].
    #[arg(long, value_name = "SECS",
          value_parser = |t: &str| super::parse_secs_in(t, TTL_RANGE.0, TTL_RANGE.1))]
    pub fence_ttl: Option<f64>,
    /// Seconds one operation on the fencing store may take, over all its members, before the
    /// store counts as unreachable (and the handoff is refused); 0.1 to 3600 [default: 10].
    #[arg(long, value_name = "SECS",
          value_parser = |t: &str| super::parse_secs_in(t, TIMEOUT_RANGE.0, TIMEOUT_RANGE.1))]
    pub fence_timeout: Option<f64>,
}

/// The fencing of a command: the per-host locks and state, and the shared store if any.
#[derive(Debug, Clone)]
pub struct Fencing {
    /// The lock and state directories.
    pub config: FenceConfig,
    shared: Option<SharedFencing>,
    keys: Vec<String>,
    /// `--fence-timeout`, with a shared store.
    store_timeout: Option<Duration>,
}

/// Opens the store of a `--fence` value, reached as `security` says (`None`: not etcd, or
/// not decided); an etcd store gives up on an operation after `timeout`.
pub fn open_store(
    spec: &str,
    security: Option<&Security>,
    timeout: Duration,
) -> Result<Arc<dyn FenceStore>> {
    check_store_spec(spec).map_err(|e| Error::invalid_input(format!("--fence {e}")))?;
    if let Some(path) = spec.strip_prefix("dir:") {
        return Ok(Arc::new(DirStore::new(path)));
    }
    match security {
        Some(security) => Ok(Arc::new(
            EtcdStore::from_url(spec, security)?.with_operation_timeout(timeout),
        )),
        None => Err(Error::invalid_input(format!(
            "--fence {spec}: an etcd store needs --fence-ca, --fence-cert and \
             --fence-cert-key (etcds://) or --fence-insecure (etcd://)"
        ))),
    }
}

/// Refuses a store that is neither etcd (`etcds://`, `etcd://`) nor `dir:PATH`.
pub fn check_store_spec(spec: &str) -> std::result::Result<(), String> {
    match (spec.strip_prefix("dir:"), Scheme::of(spec)) {
        (Some(path), _) if !path.is_empty() => Ok(()),
        (None, Some(_)) => Ok(()),
        _ => Err(format!(
            "{spec}: expected etcds://HOST:PORT[,HOST:PORT...] (or etcd:// with \
             --fence-insecure) or dir:PATH"
        )),
    }
}

/// A command's locks and fencing store, its options merged over the configuration file.
#[derive(Debug, Clone)]
pub struct FenceSettings {
    config: FenceConfig,
    fence: Option<String>,
    fence_ca: Option<PathBuf>,
    fence_cert: Option<PathBuf>,
    fence_cert_key: Option<PathBuf>,
    fence_insecure: bool,
    fence_keys: Vec<String>,
    fence_owner: Option<String>,
    fence_ttl: f64,
    fence_timeout: f64,
}

impl FenceSettings {
    /// The settings of a command with these directories and, if it hands devices off, this
    /// store: each option given wins over the file; a `--fence` given on the command line
    /// brings its own credentials (the file's store, CA, certificate, key and `insecure` are
    /// then not used, since they belong to the file's store).
    pub fn resolve(dirs: &DirArgs, store: Option<&StoreArgs>, file: Option<&ConfigFile>) -> Self {
        let default = StoreArgs::default();
        let flags = store.unwrap_or(&default);
        let section = match (store, file) {
            (Some(s), Some(f)) if s.fence.is_none() => Some(&f.fence),
            _ => None,
        };
        let tuning = store.and(file).map(|f| &f.fence);
        Self {
            config: dirs.config(file),
            fence: flags
                .fence
                .clone()
                .or_else(|| section.and_then(|s| s.store.clone())),
            fence_ca: flags
                .fence_ca
                .clone()
                .or_else(|| section.and_then(|s| s.ca.clone())),
            fence_cert: flags
                .fence_cert
                .clone()
                .or_else(|| section.and_then(|s| s.cert.clone())),
            fence_cert_key: flags
                .fence_cert_key
                .clone()
                .or_else(|| section.and_then(|s| s.cert_key.clone())),
            fence_insecure: flags.fence_insecure || section.is_some_and(|s| s.insecure),
            fence_keys: flags.fence_keys.clone(),
            fence_owner: flags
                .fence_owner
                .clone()
                .or_else(|| tuning.and_then(|s| s.owner.clone())),
            fence_ttl: flags
                .fence_ttl
                .or_else(|| tuning.and_then(|s| s.ttl))
                .unwrap_or(DEFAULT_TTL_AND_TIMEOUT.0),
            fence_timeout: flags
                .fence_timeout
                .or_else(|| tuning.and_then(|s| s.timeout))
                .unwrap_or(DEFAULT_TTL_AND_TIMEOUT.1),
        }
    }

    /// How the store of `spec` is reached: TLS with the given files for `etcds://`, plain
    /// HTTP for `etcd://` only with --fence-insecure; `None` for a store that is not etcd
    /// (which takes none of these options).
    fn security(&self, spec: &str) -> Result<Option<Security>> {
        let files = [
            ("--fence-ca", &self.fence_ca),
            ("--fence-cert", &self.fence_cert),
            ("--fence-cert-key", &self.fence_cert_key),
        ];
        let usage = |m: String| Err(Error::invalid_input(m));
        match Scheme::of(spec) {
            None if files.iter().any(|(_, f)| f.is_some()) => usage(
                "--fence-ca, --fence-cert and --fence-cert-key are for an etcds:// store".into(),
            ),
            None if self.fence_insecure => {
                usage("--fence-insecure is for an etcd:// (plain HTTP) store".into())
            }
            None => Ok(None),
            Some(Scheme::Plain) if self.fence_insecure => Ok(Some(Security::InsecurePlainHttp)),
            Some(Scheme::Plain) => usage(format!(
                "--fence {spec}: plain HTTP lets anyone who reaches the etcd client port \
                 rewrite owners and epochs; use etcds:// with --fence-ca, --fence-cert and \
                 --fence-cert-key, or give --fence-insecure"
            )),
            Some(Scheme::Tls) if self.fence_insecure => usage(format!(
                "--fence-insecure: {spec} is TLS (plain HTTP is etcd://)"
            )),
            Some(Scheme::Tls) => {
                let missing: Vec<&str> = files
                    .iter()
                    .filter(|(_, f)| f.is_none())
                    .map(|(o, _)| *o)
                    .collect();
                match (&self.fence_ca, &self.fence_cert, &self.fence_cert_key) {
                    (Some(ca), Some(cert), Some(key)) => {
                        super::private::check_private("--fence-cert-key", key)?;
                        Ok(Some(Security::Tls(EtcdTls::new(ca, cert, key))))
                    }
                    _ => usage(format!(
                        "--fence {spec}: TLS needs {}",
                        match missing.as_slice() {
                            [one] => (*one).to_owned(),
                            [init @ .., last] => format!("{} and {last}", init.join(", ")),
                            [] => "its files".to_owned(),
                        }
                    )),
                }
            }
        }
    }

    /// The command's fencing.
    pub fn fencing(&self) -> Result<Fencing> {
        let shared = match &self.fence {
            None => {
                if !self.fence_keys.is_empty() {
                    return Err(Error::invalid_input(
                        "--fence-key names a device state in a fencing store: give --fence too",
                    ));
                }
                None
            }
            Some(spec) => {
                let owner = match &self.fence_owner {
                    Some(o) => o.clone(),
                    None => nix::unistd::gethostname()
                        .map_err(|e| {
                            Error::device("read the host name (or give --fence-owner)", e.into())
                        })?
                        .to_string_lossy()
                        .into_owned(),
                };
                // The parsers admit finite values in range only.
                let ttl = Duration::from_secs_f64(self.fence_ttl);
                let timeout = Duration::from_secs_f64(self.fence_timeout);
                let security = self.security(spec)?;
                let store = open_store(spec, security.as_ref(), timeout)?;
                Some(SharedFencing::new(store, owner)?.with_ttl(ttl))
            }
        };
        Ok(Fencing {
            store_timeout: shared
                .as_ref()
                .map(|_| Duration::from_secs_f64(self.fence_timeout)),
            config: self.config.clone(),
            shared,
            keys: self.fence_keys.clone(),
        })
    }
}

impl Fencing {
    /// How long a source of `devices` devices waits for its destination's answers:
    /// `session_timeout` (`--timeout`), or with a shared store at least the destination's
    /// longest way to its answer ([`vfio_mig_fence::source_answer_wait`]).
    pub fn answer_wait(&self, session_timeout: Duration, devices: usize) -> Duration {
        match self.store_timeout {
            Some(store) => vfio_mig_fence::source_answer_wait(session_timeout, store, devices),
            None => session_timeout,
        }
    }

    /// The device-state identities of `count` devices, with a shared store.
    fn identities(&self, count: usize) -> Result<Vec<String>> {
        if self.keys.len() != count {
            return Err(Error::invalid_input(format!(
                "--fence: {count} device state{} to fence, {} --fence-key given (one per \
                 device, in order, the same on every host)",
                if count == 1 { "" } else { "s" },
                self.keys.len()
            )));
        }
        Ok(self.keys.clone())
    }

    /// Begins the handoff of `header`'s devices as their source, setting its epoch (see
    /// [`Self::begin_session`]).
    pub fn begin_source(
        &self,
        claims: &[Claim],
        epoch: Option<u64>,
        header: &mut StreamHeader,
    ) -> Result<Option<Handoff>> {
        let (granted, handoff) =
            self.begin_session(claims, epoch, &header.session_id, header.devices.len())?;
        header.epoch = granted;
        Ok(handoff)
    }

    /// Begins the handoff of session `session` of `devices` devices as their source, and
    /// returns its epoch: with a shared store, the store grants it (an `--epoch` is an error).
    /// Without one, `epoch` or the claims' default epoch. Before any device is touched.
    pub fn begin_session(
        &self,
        claims: &[Claim],
        epoch: Option<u64>,
        session: &SessionId,
        devices: usize,
    ) -> Result<(u64, Option<Handoff>)> {
        let Some(shared) = &self.shared else {
            let epoch =
                epoch.unwrap_or_else(|| claims.iter().map(Claim::default_epoch).max().unwrap_or(1));
            return Ok((epoch, None));
        };
        if epoch.is_some() {
            return Err(Error::invalid_input(
                "--epoch: with --fence the store grants the epoch of every handoff",
            ));
        }
        let handoff = shared.begin(&self.identities(devices)?, session)?;
        log::info!(
            "{} granted epoch {} to session {} (owner {})",
            shared.store().describe(),
            handoff.epoch(),
            vfio_mig_fence::session_hex(session),
            shared.owner()
        );
        Ok((handoff.epoch(), Some(handoff)))
    }

    /// Ends a source's handoff after the transfer: a failure that left the source devices
    /// running again ends the handoff in the store; success, or an outcome in doubt, leaves
    /// the store's record as the destination (or nobody yet) made it.
    pub fn end_source<T>(&self, handoff: Option<Handoff>, result: &Result<T>) {
        let Some(handoff) = handoff else { return };
        match result {
            Err(Error::InDoubt { .. }) | Ok(_) => {}
            // A refusal, or a failure rolled back: the source runs the state.
            Err(_) => {
                if let Err(e) = handoff.abort() {
                    log::warn!("end the failed handoff in the fencing store: {e}");
                }
            }
        }
    }

    /// The destination fence of `claims`' devices: the shared store's, else each device's
    /// own state.
    pub fn destination(&self, claims: &[Claim]) -> Result<Box<dyn Fence>> {
        match &self.shared {
            Some(shared) => Ok(Box::new(
                shared.destination(&self.identities(claims.len())?)?,
            )),
            None => Ok(Box::new(FenceSet(
                claims.iter().map(Claim::fence).collect(),
            ))),
        }
    }
}

/// Parses a session id: 32 hex digits (`--session`).
pub fn parse_session(text: &str) -> std::result::Result<SessionId, String> {
    let bad = || format!("`{text}`: expected 32 hex digits");
    if text.len() != 32 || !text.is_ascii() {
        return Err(bad());
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_parse_from_hex() {
        let id = parse_session("00112233445566778899aabbccddeeFF").unwrap();
        assert_eq!(id[0], 0);
        assert_eq!(id[15], 0xff);
        assert!(parse_session("0011").is_err());
        assert!(parse_session("zz112233445566778899aabbccddeeff").is_err());
        assert!(parse_session("é0112233445566778899aabbccddeef").is_err());
    }
}
