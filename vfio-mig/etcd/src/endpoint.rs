// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The `etcd://HOST:PORT[,HOST:PORT...]` URL of a cluster.

use vfio_mig::error::{Error, Result};

/// The scheme of a cluster URL.
pub const URL_SCHEME: &str = "etcd://";

/// The members' client addresses of an `etcd://HOST:PORT[,HOST:PORT...]` URL (a host is a
/// name, an IPv4 address or a bracketed IPv6 address; the port is required).
pub fn parse_endpoints(url: &str) -> Result<Vec<String>> {
    let bad = |why: &str| {
        Error::InvalidInput(format!(
            "--fence {url}: {why} (expected etcd://HOST:PORT[,HOST:PORT...])"
        ))
    };
    let list = url
        .strip_prefix(URL_SCHEME)
        .ok_or_else(|| bad("not an etcd:// URL"))?;
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
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_list_members_with_ports() {
        assert_eq!(
            parse_endpoints("etcd://127.0.0.1:2379,etcd-b:2379,[::1]:2381").unwrap(),
            ["127.0.0.1:2379", "etcd-b:2379", "[::1]:2381"]
        );
        for bad in [
            "http://a:1",
            "etcd://",
            "etcd://a",
            "etcd://a:0",
            "etcd://a:x",
            "etcd://a:1,,b:2",
            "etcd://[zz]:1",
            "etcd://a b:1",
        ] {
            let e = parse_endpoints(bad).unwrap_err().to_string();
            assert!(
                e.contains("--fence") && e.contains("etcd://HOST:PORT"),
                "{bad}: {e}"
            );
        }
    }
}
