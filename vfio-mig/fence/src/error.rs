// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The errors of fencing: a refused handoff (with the [`ReasonCode`] a destination sends in
//! REFUSE), a device another command holds, and the core's errors.

use std::fmt;

/// Errors of fencing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An error of the migration library (an invalid input, a stream header).
    #[error(transparent)]
    Core(#[from] vfio_mig::Error),
    /// A handoff was refused before the device was touched (a stale epoch, a session
    /// completed elsewhere, a store that cannot be read).
    #[error("{step}: refused: {detail}")]
    Refused {
        /// What was being done.
        step: String,
        /// Why, as a code (also sent to the source in REFUSE).
        code: ReasonCode,
        /// Why, in words.
        detail: String,
    },
    /// A write whose outcome cannot be known: the request reached the store and no answer
    /// came back, and the store could not be read since. The write may or may not be
    /// recorded; nothing may act as if either were true (docs/fencing.md).
    #[error("{step}: outcome in doubt: {detail}")]
    InDoubt {
        /// What was being done.
        step: String,
        /// What is known.
        detail: String,
    },
    /// Another vfio-mig command holds the device's lock.
    #[error("{device} is in use by another vfio-mig (pid {pid}; lock {})", lock.display())]
    Busy {
        /// The device.
        device: String,
        /// The holder's pid, as recorded in the lock file (`unknown` if unreadable).
        pid: String,
        /// The lock file.
        lock: std::path::PathBuf,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The core's [`vfio_mig::Error::InvalidInput`]: a malformed argument or configuration.
    pub fn invalid_input(detail: impl Into<String>) -> Self {
        Error::Core(vfio_mig::Error::InvalidInput(detail.into()))
    }

    /// The core's [`vfio_mig::Error::Device`]: an access to a device (or its lock) failed.
    pub fn device(step: impl Into<String>, source: std::io::Error) -> Self {
        Error::Core(vfio_mig::Error::device(step, source))
    }

    /// An error the engine can carry through its hooks ([`vfio_mig::Error::External`]); the
    /// core's own errors stay themselves.
    pub fn into_core(self) -> vfio_mig::Error {
        match self {
            Error::Core(e) => e,
            other => vfio_mig::Error::External(Box::new(other)),
        }
    }
}

/// Why a destination refused or failed a migration, as a machine-readable code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
#[non_exhaustive]
pub enum ReasonCode {
    /// The stream's device does not fit the destination device (protocol, model).
    Incompatible,
    /// The stream's epoch is older than one the destination already accepted.
    StaleEpoch,
    /// The destination device is busy.
    Busy,
    /// Something the destination does not support (a feature, several devices).
    Unsupported,
    /// The stream is malformed, corrupt or truncated.
    Stream,
    /// The destination device failed or rejected the state.
    Device,
    /// The destination could not read or record its fencing state.
    Fence,
    /// The peer broke the handshake protocol.
    Protocol,
    /// The source's authenticated identity may not load into this device.
    Unauthorized,
    /// A code this version does not know.
    Unknown(u16),
}

impl ReasonCode {
    /// The code's wire value.
    pub const fn wire(self) -> u16 {
        match self {
            ReasonCode::Incompatible => 1,
            ReasonCode::StaleEpoch => 2,
            ReasonCode::Busy => 3,
            ReasonCode::Unsupported => 4,
            ReasonCode::Stream => 5,
            ReasonCode::Device => 6,
            ReasonCode::Fence => 7,
            ReasonCode::Protocol => 8,
            ReasonCode::Unauthorized => 9,
            ReasonCode::Unknown(n) => n,
        }
    }

    /// The code of wire value `n`.
    pub const fn from_wire(n: u16) -> Self {
        match n {
            1 => ReasonCode::Incompatible,
            2 => ReasonCode::StaleEpoch,
            3 => ReasonCode::Busy,
            4 => ReasonCode::Unsupported,
            5 => ReasonCode::Stream,
            6 => ReasonCode::Device,
            7 => ReasonCode::Fence,
            8 => ReasonCode::Protocol,
            9 => ReasonCode::Unauthorized,
            n => ReasonCode::Unknown(n),
        }
    }
}

impl fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReasonCode::Incompatible => f.write_str("incompatible device"),
            ReasonCode::StaleEpoch => f.write_str("stale epoch"),
            ReasonCode::Busy => f.write_str("device busy"),
            ReasonCode::Unsupported => f.write_str("unsupported"),
            ReasonCode::Stream => f.write_str("bad stream"),
            ReasonCode::Device => f.write_str("device failure"),
            ReasonCode::Fence => f.write_str("fencing state"),
            ReasonCode::Protocol => f.write_str("protocol violation"),
            ReasonCode::Unauthorized => f.write_str("not authorized"),
            ReasonCode::Unknown(n) => write!(f, "reason {n}"),
        }
    }
}
