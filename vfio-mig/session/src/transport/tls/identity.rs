// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The identities a verified peer certificate carries: DNS and URI subject alternative
//! names, and the subject's common name.
//!
//! These are read only from a certificate that the handshake already verified against the
//! CA bundle; they say who the CA vouched for, and an [`super::AuthorizationPolicy`] decides
//! what that peer may do. Prefer SANs in policies: a CA's name constraints apply to SANs,
//! not to the common name.

use std::fmt;
use std::str::FromStr;

use rustls_pki_types::CertificateDer;

/// One identity of a peer, written `dns:NAME`, `uri:URI` or `cn:NAME`.
///
/// DNS names compare case-insensitively (they are kept in lower case); URIs and common
/// names compare exactly.
///
/// ```
/// use vfio_mig_session::transport::tls::PeerIdentity;
///
/// let id: PeerIdentity = "dns:Src-A.example".parse().unwrap();
/// assert_eq!(id, PeerIdentity::Dns("src-a.example".into()));
/// assert_eq!(id.to_string(), "dns:src-a.example");
/// assert!("src-a.example".parse::<PeerIdentity>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PeerIdentity {
    /// A DNS name of the subject alternative name extension (lower case).
    Dns(String),
    /// A URI of the subject alternative name extension (e.g. a SPIFFE id).
    Uri(String),
    /// The common name (CN) of the certificate's subject.
    CommonName(String),
}

/// Names come from the peer's certificate: control characters (a line break would forge a
/// log line), `,` (the separator of [`PeerIdentities`]) and `\` are printed as `\u{..}`
/// escapes, every other character as it is.
impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, value) = match self {
            PeerIdentity::Dns(n) => ("dns", n),
            PeerIdentity::Uri(u) => ("uri", u),
            PeerIdentity::CommonName(n) => ("cn", n),
        };
        write!(f, "{kind}:")?;
        for c in value.chars() {
            if c.is_control() || matches!(c, ',' | '\\') {
                write!(f, "{}", c.escape_unicode())?;
            } else {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

impl FromStr for PeerIdentity {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, value) = s
            .split_once(':')
            .ok_or_else(|| format!("identity `{s}`: expected dns:NAME, uri:URI or cn:NAME"))?;
        if value.is_empty() {
            return Err(format!("identity `{s}`: empty {kind} value"));
        }
        match kind {
            "dns" => Ok(PeerIdentity::Dns(value.to_ascii_lowercase())),
            "uri" => Ok(PeerIdentity::Uri(value.to_owned())),
            "cn" => Ok(PeerIdentity::CommonName(value.to_owned())),
            _ => Err(format!(
                "identity `{s}`: unknown kind `{kind}:` (expected dns:, uri: or cn:)"
            )),
        }
    }
}

/// Every identity of a verified peer certificate, in the order DNS SANs, URI SANs, CN.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentities {
    ids: Vec<PeerIdentity>,
}

impl PeerIdentities {
    /// The identities of `cert` (an end-entity certificate, already verified). A certificate
    /// that webpki cannot parse yields none.
    pub fn from_certificate(cert: &CertificateDer<'_>) -> Self {
        let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
            return Self::default();
        };
        let mut ids: Vec<PeerIdentity> = ee
            .valid_dns_names()
            .map(|n| PeerIdentity::Dns(n.to_ascii_lowercase()))
            .collect();
        ids.extend(
            ee.valid_uri_names()
                .map(|u| PeerIdentity::Uri(u.to_owned())),
        );
        ids.extend(common_names(ee.subject()).map(PeerIdentity::CommonName));
        Self { ids }
    }

    /// A set of identities given directly (tests, or identities learned some other way).
    pub fn from_identities(ids: impl IntoIterator<Item = PeerIdentity>) -> Self {
        Self {
            ids: ids.into_iter().collect(),
        }
    }

    /// All identities.
    pub fn iter(&self) -> impl Iterator<Item = &PeerIdentity> {
        self.ids.iter()
    }

    /// Whether the certificate carried no DNS or URI SAN and no CN.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Whether `id` is one of them.
    pub fn contains(&self, id: &PeerIdentity) -> bool {
        self.ids.contains(id)
    }

    /// The DNS SANs.
    pub fn dns_names(&self) -> impl Iterator<Item = &str> {
        self.ids.iter().filter_map(|i| match i {
            PeerIdentity::Dns(n) => Some(n.as_str()),
            _ => None,
        })
    }

    /// The URI SANs.
    pub fn uris(&self) -> impl Iterator<Item = &str> {
        self.ids.iter().filter_map(|i| match i {
            PeerIdentity::Uri(u) => Some(u.as_str()),
            _ => None,
        })
    }

    /// The subject's common name, if it has one (the first, if several).
    pub fn common_name(&self) -> Option<&str> {
        self.ids.iter().find_map(|i| match i {
            PeerIdentity::CommonName(n) => Some(n.as_str()),
            _ => None,
        })
    }
}

/// `dns:a.example, cn:a`, or `(no identity)`.
impl fmt::Display for PeerIdentities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ids.is_empty() {
            return f.write_str("(no identity)");
        }
        for (i, id) in self.ids.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{id}")?;
        }
        Ok(())
    }
}

/// One DER TLV: (tag, value, rest). Short and long definite lengths up to 4 bytes.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let mut len = 0usize;
        for &b in &rest[..n] {
            len = (len << 8) | usize::from(b);
        }
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// DER of OID 2.5.4.3 (id-at-commonName).
const OID_CN: &[u8] = &[0x55, 0x04, 0x03];

/// The common names in the contents of an X.509 `Name` (a sequence of RDN sets), as UTF-8,
/// Printable or IA5 strings; anything malformed ends the walk.
fn common_names(mut name: &[u8]) -> impl Iterator<Item = String> {
    let mut out = Vec::new();
    while let Some((0x31, mut set, rest)) = tlv(name) {
        name = rest;
        while let Some((0x30, atv, more)) = tlv(set) {
            set = more;
            let Some((0x06, oid, value)) = tlv(atv) else {
                break;
            };
            if oid != OID_CN {
                continue;
            }
            // UTF8String, PrintableString, IA5String.
            if let Some((0x0c | 0x13 | 0x16, text, _)) = tlv(value) {
                if let Ok(s) = std::str::from_utf8(text) {
                    out.push(s.to_owned());
                }
            }
        }
    }
    out.into_iter()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 21, defect 9: a certificate's names are the peer's words. Printed, they stay on
    /// one line and cannot look like a further identity of the list.
    #[test]
    fn names_with_line_breaks_or_separators_cannot_forge_lines_or_identities() {
        let ids = PeerIdentities::from_identities([
            PeerIdentity::CommonName("a\nvfio-mig: recv: session forged".into()),
            PeerIdentity::Uri("spiffe://x, dns:admin.example".into()),
        ]);
        let shown = ids.to_string();
        assert!(!shown.contains('\n') && !shown.contains('\r'), "{shown}");
        assert!(!shown.contains(", dns:"), "{shown}");
        assert_eq!(shown.matches(", ").count(), 1, "two identities: {shown}");
        // Names that need no escape print as given.
        let plain = PeerIdentity::CommonName("Source A".into());
        assert_eq!(plain.to_string(), "cn:Source A");
    }

    #[test]
    fn identities_parse_and_print() {
        for s in ["dns:a.example", "uri:spiffe://dc1/host/a", "cn:Source A"] {
            assert_eq!(s.parse::<PeerIdentity>().unwrap().to_string(), s);
        }
        assert!("dns:"
            .parse::<PeerIdentity>()
            .unwrap_err()
            .contains("empty"));
        assert!("ip:1.2.3.4"
            .parse::<PeerIdentity>()
            .unwrap_err()
            .contains("unknown kind `ip:`"));
    }

    #[test]
    fn common_names_from_der() {
        // SET { SEQ { OID 2.5.4.6, PrintableString "DE" } }, SET { SEQ { OID 2.5.4.3, UTF8 "src" } }
        let name = [
            0x31, 0x0b, 0x30, 0x09, 0x06, 0x03, 0x55, 0x04, 0x06, 0x13, 0x02, b'D', b'E', 0x31,
            0x0c, 0x30, 0x0a, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x03, b's', b'r', b'c',
        ];
        assert_eq!(common_names(&name).collect::<Vec<_>>(), vec!["src"]);
        // Truncated input: no panic, no name.
        assert!(common_names(&name[..20]).nth(1).is_none());
        assert_eq!(common_names(&[]).count(), 0);
        // Long-form length.
        assert_eq!(
            tlv(&[0x04, 0x81, 0x01, 0xaa]),
            Some((0x04, &[0xaa][..], &[][..]))
        );
        assert_eq!(tlv(&[0x04, 0x85, 0, 0, 0, 0, 1]), None);
    }

    #[test]
    fn display() {
        let ids = PeerIdentities::from_identities([
            PeerIdentity::Dns("a.example".into()),
            PeerIdentity::CommonName("a".into()),
        ]);
        assert_eq!(ids.to_string(), "dns:a.example, cn:a");
        assert_eq!(ids.common_name(), Some("a"));
        assert_eq!(PeerIdentities::default().to_string(), "(no identity)");
    }
}
