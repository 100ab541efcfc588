// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Authorization beyond the trust anchors: which verified sources may load into which
//! device.
//!
//! A CA bundle says who a peer is; it does not say that every host the CA vouches for may
//! overwrite every device's state. An [`AuthorizationPolicy`] maps a device key (a string
//! such as `vm7-gpu0`, or [`ANY_DEVICE`]) to the source identities allowed to load into it.
//! A source is allowed into a device when one of its identities is listed for that device or
//! for `*`. Nothing is allowed by default.
//!
//! The text form (one rule a line, `#` comments):
//!
//! ```text
//! # device    identities allowed to load into it
//! vm7-gpu0    dns:src-a.example uri:spiffe://dc1/host/src-a
//! *           cn:maintenance-host
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::identity::{PeerIdentities, PeerIdentity};

/// The device key that matches every device.
pub const ANY_DEVICE: &str = "*";

/// A refused authorization. One line; names the device and the source's identities (never
/// the identities that would have been allowed: the message may go back to the peer).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthzError {
    /// The source's identities are not listed for the device (nor for `*`).
    #[error("source [{identities}] is not authorized to load into device `{device}`")]
    Denied {
        /// The device key.
        device: String,
        /// The source's identities, as [`PeerIdentities`] displays them.
        identities: String,
    },
    /// The policy has no rule for the device, nor a `*` rule: no source may load into it.
    #[error(
        "source [{identities}] is not authorized to load into device `{device}`: the \
         authorization policy has no rule for this device"
    )]
    NoRule {
        /// The device key.
        device: String,
        /// The source's identities.
        identities: String,
    },
}

/// A policy file that could not be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("read authorization policy {}: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A line is not `DEVICE IDENTITY...`.
    #[error("authorization policy {origin} line {line}: {detail}")]
    Syntax {
        /// The file, or `(text)`.
        origin: String,
        /// The line number, from 1.
        line: usize,
        /// Why.
        detail: String,
    },
}

/// Which source identities may load into which device.
///
/// ```
/// use vfio_mig_session::transport::tls::{AuthorizationPolicy, PeerIdentities, PeerIdentity};
///
/// let policy: AuthorizationPolicy = "vm7-gpu0 dns:src-a.example\n".parse()?;
/// let src_a = PeerIdentities::from_identities([PeerIdentity::Dns("src-a.example".into())]);
/// let src_b = PeerIdentities::from_identities([PeerIdentity::Dns("src-b.example".into())]);
/// assert!(policy.check("vm7-gpu0", &src_a).is_ok());
/// assert_eq!(
///     policy.check("vm7-gpu0", &src_b).unwrap_err().to_string(),
///     "source [dns:src-b.example] is not authorized to load into device `vm7-gpu0`"
/// );
/// # Ok::<(), vfio_mig_session::transport::tls::PolicyError>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthorizationPolicy {
    rules: BTreeMap<String, BTreeSet<PeerIdentity>>,
}

impl AuthorizationPolicy {
    /// A policy that allows nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Allows `identity` to load into `device` (or into every device, for [`ANY_DEVICE`]).
    pub fn allow(&mut self, device: impl Into<String>, identity: PeerIdentity) -> &mut Self {
        self.rules
            .entry(device.into())
            .or_default()
            .insert(identity);
        self
    }

    /// The identities listed for `device` itself (not those of `*`).
    pub fn allowed(&self, device: &str) -> impl Iterator<Item = &PeerIdentity> {
        self.rules.get(device).into_iter().flatten()
    }

    /// Whether no rule is set.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Checks that a source with identities `peer` may load into `device`; returns the
    /// identity that allowed it (for the log).
    pub fn check<'p>(
        &self,
        device: &str,
        peer: &'p PeerIdentities,
    ) -> Result<&'p PeerIdentity, AuthzError> {
        let own = self.rules.get(device);
        let any = self.rules.get(ANY_DEVICE);
        if own.is_none() && any.is_none() {
            return Err(AuthzError::NoRule {
                device: device.to_owned(),
                identities: peer.to_string(),
            });
        }
        peer.iter()
            .find(|id| own.is_some_and(|s| s.contains(*id)) || any.is_some_and(|s| s.contains(*id)))
            .ok_or_else(|| AuthzError::Denied {
                device: device.to_owned(),
                identities: peer.to_string(),
            })
    }

    /// Checks every device of a multi-device migration; the first refusal is the error.
    pub fn check_all<'d>(
        &self,
        devices: impl IntoIterator<Item = &'d str>,
        peer: &PeerIdentities,
    ) -> Result<(), AuthzError> {
        devices
            .into_iter()
            .try_for_each(|d| self.check(d, peer).map(|_| ()))
    }

    /// Parses the text form; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, PolicyError> {
        let mut policy = Self::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            let mut words = line.split_whitespace();
            let Some(device) = words.next() else {
                continue;
            };
            let syntax = |detail: String| PolicyError::Syntax {
                origin: origin.to_owned(),
                line: i + 1,
                detail,
            };
            let mut any = false;
            for word in words {
                let id = word.parse::<PeerIdentity>().map_err(syntax)?;
                policy.allow(device, id);
                any = true;
            }
            if !any {
                return Err(syntax(format!(
                    "device `{device}` lists no identity (expected DEVICE IDENTITY...)"
                )));
            }
        }
        Ok(policy)
    }

    /// Reads and parses a policy file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }
}

impl FromStr for AuthorizationPolicy {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, PolicyError> {
        Self::parse(s, "(text)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(list: &[&str]) -> PeerIdentities {
        PeerIdentities::from_identities(list.iter().map(|s| s.parse().unwrap()))
    }

    #[test]
    fn device_rules_and_wildcard() {
        let p: AuthorizationPolicy = "\
            # comment\n\
            vm7-gpu0 dns:src-a.example uri:spiffe://dc1/src-b\n\
            \n\
            * cn:admin   # any device\n"
            .parse()
            .unwrap();
        let a = ids(&["dns:src-a.example", "cn:src-a"]);
        assert_eq!(
            p.check("vm7-gpu0", &a).unwrap(),
            &"dns:src-a.example".parse().unwrap()
        );
        assert!(p
            .check("vm7-gpu0", &ids(&["uri:spiffe://dc1/src-b"]))
            .is_ok());
        assert!(p.check("vm8-nic1", &ids(&["cn:admin"])).is_ok());
        assert!(p.check("vm7-gpu0", &ids(&["cn:admin"])).is_ok());
        let e = p.check("vm8-nic1", &a).unwrap_err();
        assert_eq!(
            e.to_string(),
            "source [dns:src-a.example, cn:src-a] is not authorized to load into device `vm8-nic1`"
        );
        // Kinds do not mix: a CN equal to an allowed DNS name is not that name.
        assert!(p.check("vm7-gpu0", &ids(&["cn:src-a.example"])).is_err());
        // DNS names compare without case.
        assert!(p.check("vm7-gpu0", &ids(&["dns:SRC-A.example"])).is_ok());
        assert!(p
            .check_all(["vm7-gpu0", "vm8-nic1"], &ids(&["cn:admin"]))
            .is_ok());
        assert!(p.check_all(["vm7-gpu0", "vm8-nic1"], &a).is_err());
    }

    #[test]
    fn no_rule_and_empty_policy() {
        let mut p = AuthorizationPolicy::new();
        let e = p.check("vm7-gpu0", &ids(&["cn:x"])).unwrap_err();
        assert!(matches!(e, AuthzError::NoRule { .. }));
        assert!(e.to_string().contains("no rule for this device"), "{e}");
        p.allow("vm7-gpu0", "cn:x".parse().unwrap());
        assert!(p.check("vm7-gpu0", &ids(&["cn:x"])).is_ok());
        let e = p.check("vm7-gpu0", &PeerIdentities::default()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "source [(no identity)] is not authorized to load into device `vm7-gpu0`"
        );
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let e = AuthorizationPolicy::parse("a dns:x\nb\n", "p.txt").unwrap_err();
        assert_eq!(
            e.to_string(),
            "authorization policy p.txt line 2: device `b` lists no identity (expected DEVICE IDENTITY...)"
        );
        let e = AuthorizationPolicy::parse("a host.example\n", "p.txt").unwrap_err();
        assert!(
            e.to_string().contains("line 1: identity `host.example`"),
            "{e}"
        );
        let e = AuthorizationPolicy::load(Path::new("/nonexistent/policy")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("read authorization policy /nonexistent/policy:"),
            "{e}"
        );
    }
}
