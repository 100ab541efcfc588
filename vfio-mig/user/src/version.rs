// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `VFIO_USER_VERSION`: the first exchange, which agrees on the protocol version and on the
//! limits each side announces in a NUL-terminated JSON object (`{"capabilities": {...}}`).

use std::io;

use serde_json::{json, Value};

use crate::conn::Connection;
use crate::wire::{le32, Command, Payload};

/// The protocol major version this client speaks (libvfio-user's `LIB_VFIO_USER_MAJOR`).
pub const MAJOR: u16 = 0;
/// The highest minor version this client speaks (the one with `VFIO_USER_DEVICE_FEATURE`
/// and `VFIO_USER_MIG_DATA_*`, libvfio-user's `LIB_VFIO_USER_MINOR`).
pub const MINOR: u16 = 2;
/// The largest data transfer this client asks for or accepts (the protocol's default, 1 MiB).
pub const MAX_DATA_XFER: usize = 1 << 20;
/// Descriptors this client accepts per message.
pub const CLIENT_MAX_FDS: usize = crate::conn::MAX_FDS;

/// What the server announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerVersion {
    /// The minor version the server chose (at most [`MINOR`]).
    pub minor: u16,
    /// `max_msg_fds` (1 when absent, as the protocol says).
    pub max_msg_fds: u64,
    /// `max_data_xfer_size` (1 MiB when absent).
    pub max_data_xfer_size: u64,
    /// `migration.pgsize`, when the server offers migration.
    pub migration_pgsize: Option<u64>,
    /// The capabilities as sent, for `probe`.
    pub capabilities: String,
}

fn bad(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: {what}", Command::Version),
    )
}

/// Sends this client's version and capabilities and checks the server's answer.
pub fn negotiate(conn: &mut Connection) -> io::Result<ServerVersion> {
    let caps = json!({
        "capabilities": {
            "max_msg_fds": CLIENT_MAX_FDS,
            "max_data_xfer_size": MAX_DATA_XFER,
        }
    })
    .to_string();
    let payload = Payload::default()
        .u16(MAJOR)
        .u16(MINOR)
        .bytes(caps.as_bytes())
        .bytes(&[0]);
    let reply = conn.request(Command::Version, &payload.0)?;
    parse(&reply.body)
}

/// Decodes the server's `struct vfio_user_version` and its JSON.
pub fn parse(body: &[u8]) -> io::Result<ServerVersion> {
    if body.len() < 4 {
        return Err(bad(format!("truncated reply ({} bytes)", body.len())));
    }
    let word = le32(body, 0);
    let (major, minor) = ((word & 0xffff) as u16, (word >> 16) as u16);
    if major != MAJOR {
        return Err(bad(format!(
            "server speaks major version {major}, not {MAJOR}"
        )));
    }
    if minor > MINOR {
        return Err(bad(format!(
            "server chose minor version {minor}, above the {MINOR} offered"
        )));
    }
    let text = &body[4..];
    // The JSON is NUL-terminated; nothing may follow the NUL.
    let text = match text.iter().position(|&b| b == 0) {
        Some(end) if end + 1 == text.len() => &text[..end],
        Some(_) => return Err(bad("bytes after the capabilities' terminating NUL")),
        None if text.is_empty() => &b"{}"[..],
        None => return Err(bad("capabilities without a terminating NUL")),
    };
    let value: Value =
        serde_json::from_slice(text).map_err(|e| bad(format!("capabilities are not JSON: {e}")))?;
    let caps = value.get("capabilities").cloned().unwrap_or(Value::Null);
    let number = |v: Option<&Value>, name: &str, default: u64| -> io::Result<u64> {
        match v {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .ok_or_else(|| bad(format!("capability {name} is not an unsigned number: {v}"))),
        }
    };
    let max_msg_fds = number(caps.get("max_msg_fds"), "max_msg_fds", 1)?;
    let max_data_xfer_size = number(
        caps.get("max_data_xfer_size"),
        "max_data_xfer_size",
        MAX_DATA_XFER as u64,
    )?;
    if max_data_xfer_size == 0 {
        return Err(bad("capability max_data_xfer_size is 0"));
    }
    let migration_pgsize = match caps.get("migration") {
        None => None,
        Some(m) => Some(number(m.get("pgsize"), "migration.pgsize", 4096)?),
    };
    Ok(ServerVersion {
        minor,
        max_msg_fds,
        max_data_xfer_size,
        migration_pgsize,
        capabilities: String::from_utf8_lossy(text).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(major: u16, minor: u16, json: &[u8]) -> Vec<u8> {
        Payload::default().u16(major).u16(minor).bytes(json).0
    }

    #[test]
    fn reads_libvfio_user_s_capabilities() {
        // What libvfio-user's format_server_capabilities sends for a migratable device.
        let json = br#"{ "capabilities": { "max_msg_fds": 8, "max_data_xfer_size": 1048576, "migration": { "pgsize": 4096 } } }"#;
        let v = parse(&reply(0, 2, &[&json[..], b"\0"].concat())).unwrap();
        assert_eq!(v.minor, 2);
        assert_eq!(v.max_msg_fds, 8);
        assert_eq!(v.max_data_xfer_size, 1 << 20);
        assert_eq!(v.migration_pgsize, Some(4096));
    }

    #[test]
    fn refuses_what_the_protocol_does_not_allow() {
        for (body, want) in [
            (reply(1, 0, b"{}\0"), "major version 1"),
            (reply(0, 9, b"{}\0"), "minor version 9"),
            (reply(0, 1, b"{\0"), "not JSON"),
            (reply(0, 1, b"{}"), "terminating NUL"),
            (reply(0, 1, b"{}\0x"), "after the capabilities"),
            (
                reply(0, 1, br#"{"capabilities":{"max_data_xfer_size":-1}}"#),
                "NUL",
            ),
            (
                reply(0, 1, b"{\"capabilities\":{\"max_data_xfer_size\":-1}}\0"),
                "not an unsigned number",
            ),
            (
                reply(0, 1, b"{\"capabilities\":{\"max_data_xfer_size\":0}}\0"),
                "is 0",
            ),
            (vec![0, 0], "truncated"),
        ] {
            let e = parse(&body).unwrap_err().to_string();
            assert!(
                e.contains(want) && e.starts_with("VFIO_USER_VERSION"),
                "{e}"
            );
        }
    }
}
