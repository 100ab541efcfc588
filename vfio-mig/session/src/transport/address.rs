// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Transport addresses: `file:PATH` (or a plain path), `unix:PATH`, `tcp:HOST:PORT`.

use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;

use crate::error::Error;

/// Where a stream goes to or comes from.
///
/// ```
/// use vfio_mig_session::transport::Address;
///
/// let a: Address = "tcp:[::1]:7000".parse()?;
/// assert_eq!(a, Address::Tcp { host: "::1".into(), port: 7000 });
/// assert_eq!(a.to_string(), "tcp:[::1]:7000");
/// assert_eq!("unix:/run/x.sock".parse::<Address>()?, Address::Unix("/run/x.sock".into()));
/// assert_eq!("/tmp/state".parse::<Address>()?, Address::File("/tmp/state".into()));
/// # Ok::<(), vfio_mig_session::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    /// A stream file (`file:PATH`, or a path with no transport prefix): one direction only,
    /// no handshake.
    File(PathBuf),
    /// A Unix stream socket (`unix:PATH`).
    Unix(PathBuf),
    /// A TCP socket (`tcp:HOST:PORT`; IPv6 literals in brackets, `tcp:[::1]:7000`). `host`
    /// is kept without brackets and resolved when connecting or listening.
    Tcp {
        /// A host name or an IPv4/IPv6 literal.
        host: String,
        /// The port (0 to listen on any free port).
        port: u16,
    },
}

impl Address {
    /// Whether this address is a socket (Unix or TCP), i.e. carries a handshake.
    pub fn is_socket(&self) -> bool {
        !matches!(self, Address::File(_))
    }

    /// The socket addresses a TCP address resolves to (empty for other kinds).
    pub fn resolve(&self) -> io::Result<Vec<SocketAddr>> {
        match self {
            Address::Tcp { host, port } => Ok((host.as_str(), *port).to_socket_addrs()?.collect()),
            _ => Ok(Vec::new()),
        }
    }
}

impl From<SocketAddr> for Address {
    fn from(a: SocketAddr) -> Self {
        Address::Tcp {
            host: a.ip().to_string(),
            port: a.port(),
        }
    }
}

fn usage(text: &str, why: impl fmt::Display) -> Error {
    Error::invalid_input(format!(
        "address `{text}`: {why} (expected file:PATH, unix:PATH or tcp:HOST:PORT)"
    ))
}

fn parse_tcp(text: &str, rest: &str) -> Result<Address, Error> {
    let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
        let (host, after) = bracketed
            .split_once(']')
            .ok_or_else(|| usage(text, "`[` without `]`"))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| usage(text, "no `:PORT` after `]`"))?;
        (host, port)
    } else {
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| usage(text, "no `:PORT`"))?;
        if host.contains(':') {
            return Err(usage(
                text,
                "put an IPv6 address in brackets, e.g. tcp:[::1]:7000",
            ));
        }
        (host, port)
    };
    if host.is_empty() {
        return Err(usage(text, "empty host"));
    }
    let port = port
        .parse::<u16>()
        .map_err(|_| usage(text, format!("`{port}` is not a port number (0-65535)")))?;
    Ok(Address::Tcp {
        host: host.to_owned(),
        port,
    })
}

impl FromStr for Address {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        if let Some(path) = text.strip_prefix("file:") {
            if path.is_empty() {
                return Err(usage(text, "empty path"));
            }
            return Ok(Address::File(path.into()));
        }
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(usage(text, "empty path"));
            }
            return Ok(Address::Unix(path.into()));
        }
        if let Some(rest) = text.strip_prefix("tcp:") {
            return parse_tcp(text, rest);
        }
        if text.is_empty() {
            return Err(usage(text, "empty address"));
        }
        // `udp:...`, `http:...`: a mistyped transport rather than a file name.
        if let Some((scheme, _)) = text.split_once(':') {
            if scheme.len() > 1 && scheme.bytes().all(|b| b.is_ascii_lowercase()) {
                return Err(usage(text, format!("unknown transport `{scheme}:`")));
            }
        }
        Ok(Address::File(text.into()))
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::File(p) => write!(f, "file:{}", p.display()),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
            Address::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Address::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Address {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn err(s: &str) -> String {
        s.parse::<Address>().unwrap_err().to_string()
    }

    #[test]
    fn every_kind_parses_and_prints_back() {
        for s in [
            "file:/tmp/x",
            "unix:/run/vfio-mig.sock",
            "tcp:127.0.0.1:7000",
            "tcp:[::1]:7000",
            "tcp:[fe80::1%eth0]:1",
            "tcp:host.example:65535",
            "tcp:localhost:0",
        ] {
            assert_eq!(parse(s).to_string(), s);
        }
        assert_eq!(parse("state.bin"), Address::File("state.bin".into()));
        assert_eq!(parse("./a:b"), Address::File("./a:b".into()));
        assert_eq!(parse("C:x"), Address::File("C:x".into()));
        assert!(parse("unix:/x").is_socket());
        assert!(!parse("/x").is_socket());
    }

    #[test]
    fn bad_addresses_say_why() {
        assert!(err("tcp:::1:7000").contains("brackets"));
        assert!(err("tcp:host").contains("no `:PORT`"));
        assert!(err("tcp:host:http").contains("not a port number"));
        assert!(err("tcp:host:70000").contains("not a port number"));
        assert!(err("tcp::7000").contains("empty host"));
        assert!(err("tcp:[::1:7000").contains("without `]`"));
        assert!(err("tcp:[::1]7000").contains("no `:PORT` after"));
        assert!(err("udp:1.2.3.4:5").contains("unknown transport `udp:`"));
        assert!(err("unix:").contains("empty path"));
        assert!(err("file:").contains("empty path"));
        assert!(err("").contains("empty address"));
    }

    #[test]
    fn tcp_resolves() {
        let a = parse("tcp:127.0.0.1:9");
        assert_eq!(a.resolve().unwrap(), vec!["127.0.0.1:9".parse().unwrap()]);
        let a = parse("tcp:[::1]:9");
        assert_eq!(a.resolve().unwrap(), vec!["[::1]:9".parse().unwrap()]);
        assert!(parse("unix:/x").resolve().unwrap().is_empty());
    }
}
