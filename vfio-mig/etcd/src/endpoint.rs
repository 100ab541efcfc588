// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The `etcds://HOST:PORT[,HOST:PORT...]` (TLS) or `etcd://...` (plain HTTP) URL of a
//! cluster.

use vfio_mig_fence::{Error, Result};

/// The scheme of a cluster reached over TLS.
pub const TLS_SCHEME: &str = "etcds://";
/// The scheme of a cluster reached over plain HTTP (see [`crate::Security::InsecurePlainHttp`]).
pub const PLAIN_SCHEME: &str = "etcd://";

/// How a cluster URL says to reach its members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `etcds://`: TLS.
    Tls,
    /// `etcd://`: plain HTTP.
    Plain,
}

impl Scheme {
    /// The scheme of `url`, if it is a cluster URL.
    pub fn of(url: &str) -> Option<Self> {
        if url.starts_with(TLS_SCHEME) {
            Some(Self::Tls)
        } else if url.starts_with(PLAIN_SCHEME) {
            Some(Self::Plain)
        } else {
            None
        }
    }

    /// `etcds://` or `etcd://`.
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Tls => TLS_SCHEME,
            Self::Plain => PLAIN_SCHEME,
        }
    }
}

/// The scheme and the members' client addresses of an `etcds://HOST:PORT[,HOST:PORT...]` or
/// `etcd://...` URL (a host is a name, an IPv4 address or a bracketed IPv6 address; the port
/// is required).
pub fn parse_url(url: &str) -> Result<(Scheme, Vec<String>)> {
    let bad = |why: &str| {
        Error::invalid_input(format!(
            "--fence {url}: {why} (expected etcds://HOST:PORT[,HOST:PORT...])"
        ))
    };
    let scheme = Scheme::of(url).ok_or_else(|| bad("not an etcds:// or etcd:// URL"))?;
    let list = &url[scheme.prefix().len()..];
    let list = list.strip_suffix('/').unwrap_or(list);
    if list.is_empty() {
        return Err(bad("no member"));
    }
    list.split(',')
        .map(|member| {
            let (host, port) = member
                .rsplit_once(':')
                .ok_or_else(|| bad(&format!("member `{member}` has no port")))?;
            let host_ok = if let Some(v6) = host.strip_prefix('[') {
                v6.strip_suffix(']')
                    .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok())
            } else {
                !host.is_empty()
                    && host
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
            };
            if !host_ok {
                return Err(bad(&format!("member `{member}` has a bad host")));
            }
            match port.parse::<u16>() {
                Ok(p) if p != 0 => Ok(member.to_owned()),
                _ => Err(bad(&format!("member `{member}` has a bad port"))),
            }
        })
        .collect::<Result<Vec<_>>>()
        .map(|members| (scheme, members))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_list_members_with_ports() {
        let (scheme, members) = parse_url("etcds://127.0.0.1:2379,etcd-b:2379,[::1]:2381").unwrap();
        assert_eq!(scheme, Scheme::Tls);
        assert_eq!(members, ["127.0.0.1:2379", "etcd-b:2379", "[::1]:2381"]);
        let (scheme, members) = parse_url("etcd://etcd-a:2379/").unwrap();
        assert_eq!(
            (scheme, members),
            (Scheme::Plain, vec!["etcd-a:2379".into()])
        );
        for bad in [
            "http://a:1",
            "https://a:1",
            "etcds://",
            "etcds://a",
            "etcd://",
            "etcd://a",
            "etcd://a:0",
            "etcd://a:x",
            "etcd://a:1,,b:2",
            "etcd://[zz]:1",
            "etcd://a b:1",
        ] {
            let e = parse_url(bad).unwrap_err().to_string();
            assert!(
                e.contains("--fence") && e.contains("etcds://HOST:PORT"),
                "{bad}: {e}"
            );
        }
    }
}
