// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The error type: every failure names the step it happened in.

use std::io;

/// A migration step, named in every error so an operator knows where things stopped.
pub type Step = &'static str;

/// Errors of the migration library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A device access (pread, pwrite, ioctl, read of the data fd) failed.
    #[error("{step}: {source}")]
    Device {
        /// What was being done.
        step: String,
        /// The operating-system error.
        #[source]
        source: io::Error,
    },
    /// The device refused a state change.
    #[error("{step}: device refused {from} -> {to}: {source}; device is now in {now}")]
    Transition {
        /// What was being done.
        step: String,
        /// State before the attempt.
        from: String,
        /// Requested state.
        to: String,
        /// State read back after the failure.
        now: String,
        /// The error of the state write.
        #[source]
        source: io::Error,
    },
    /// The device broke a rule of the migration protocol.
    #[error("{step}: protocol violation: {detail}")]
    Protocol {
        /// What was being done.
        step: String,
        /// What the device did wrong.
        detail: String,
    },
    /// The device does not support what was asked.
    #[error("{0}")]
    Unsupported(String),
    /// The migration stream is malformed, corrupt or incompatible.
    #[error("{step}: {detail}")]
    Stream {
        /// What was being done.
        step: String,
        /// What is wrong with the stream.
        detail: String,
    },
    /// Reading or writing the stream's transport failed.
    #[error("{step}: {source}")]
    Transport {
        /// What was being done.
        step: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A migration failed and the device was rolled back (source) or reset (destination).
    #[error("{source}; {device} {recovery}")]
    RolledBack {
        /// The failure.
        #[source]
        source: Box<Error>,
        /// The device that was rolled back.
        device: String,
        /// What became of it.
        recovery: crate::engine::Recovery,
    },
    /// A bad command-line or device specification.
    #[error("{0}")]
    Usage(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A device access error at `step`.
    pub fn device(step: impl Into<String>, source: io::Error) -> Self {
        Error::Device {
            step: step.into(),
            source,
        }
    }

    /// A protocol violation at `step`.
    pub fn protocol(step: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Protocol {
            step: step.into(),
            detail: detail.into(),
        }
    }

    /// A stream format error at `step`.
    pub fn stream(step: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Stream {
            step: step.into(),
            detail: detail.into(),
        }
    }

    /// A transport error at `step`.
    pub fn transport(step: impl Into<String>, source: io::Error) -> Self {
        Error::Transport {
            step: step.into(),
            source,
        }
    }

    /// The errno of the underlying OS error, if there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Device { source, .. }
            | Error::Transition { source, .. }
            | Error::Transport { source, .. } => source.raw_os_error(),
            Error::RolledBack { source, .. } => source.errno(),
            _ => None,
        }
    }
}
