// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The error type: every failure names the step it happened in.

use std::fmt;
use std::io;

/// Errors of the migration library.
///
/// An error's `Display` says what went wrong at its own level only; the cause, when there is
/// one, is its [`source`](std::error::Error::source), as the Rust API guidelines ask, so a
/// caller that prints the chain prints each cause once. [`Report`] prints the chain on one
/// line: `read pending_bytes: Input/output error (os error 5)`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A device access (pread, pwrite, ioctl, read of the data fd) failed.
    #[error("{step}")]
    Device {
        /// What was being done.
        step: String,
        /// The operating-system error.
        #[source]
        source: io::Error,
    },
    /// The device refused a state change.
    #[error("{step}: device refused {from} -> {to} and is now in {now}")]
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
    #[error("{step}")]
    Transport {
        /// What was being done.
        step: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A migration failed and the device was rolled back (source) or reset (destination).
    #[error("{device} {recovery} after the failure")]
    RolledBack {
        /// The failure.
        #[source]
        source: Box<Error>,
        /// The device that was rolled back.
        device: String,
        /// What became of it.
        recovery: Recovery,
    },
    /// Pre-copy could not meet the downtime budget under a strict policy.
    #[error("pre-copy: {0}")]
    PreCopy(String),
    /// Several devices failed as one unit and were all rolled back or reset.
    #[error("{} after the failure", outcomes.iter().map(|(d, r)| format!("{d} {r}")).collect::<Vec<_>>().join(", "))]
    RolledBackAll {
        /// The failure.
        #[source]
        source: Box<Error>,
        /// Each device and what became of it.
        outcomes: Vec<(String, Recovery)>,
    },
    /// A device stopped because another device of the same migration failed.
    #[error("stopped: another device of the migration failed")]
    SiblingFailed,
    /// An argument or configuration the caller gave is malformed (an address, a device
    /// name, an option out of range).
    #[error("{0}")]
    InvalidInput(String),
    /// The unit passed its point of no return (a destination device entered RUNNING and runs
    /// the migrated state) but not every device runs: `detail` names those that run and
    /// those that failed to run and were reset. The source devices are stopped (or reset),
    /// never resumed, and the destination keeps its completion record: the state must not
    /// run twice.
    #[error("{step}: past the point of no return: {detail}")]
    PastNoReturn {
        /// What was being done.
        step: String,
        /// Which devices run, which failed to run and what became of them.
        detail: String,
    },
    /// An error of the caller's code that the core called or was handed (a session's hook
    /// between reads, an output), carried out of the engine unchanged so that the caller's crate can take
    /// it back (the session and fencing crates downcast their own errors from it).
    #[error(transparent)]
    External(Box<dyn std::error::Error + Send + Sync + 'static>),
}

/// An error and its causes on one line, each separated by `": "`: what a command line or a
/// log prints. A cause whose text the line already holds is left out (some errors, such as
/// an `io::Error` built with a message, carry their cause's text themselves).
///
/// ```
/// use vfio_mig::error::{Error, Report};
/// let e = Error::device("read pending_bytes", std::io::Error::from_raw_os_error(5));
/// assert_eq!(e.to_string(), "read pending_bytes");
/// assert_eq!(
///     Report(&e).to_string(),
///     "read pending_bytes: Input/output error (os error 5)"
/// );
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Report<'a>(pub &'a dyn std::error::Error);

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut line = self.0.to_string();
        let mut cause = self.0.source();
        while let Some(c) = cause {
            let text = c.to_string();
            if !line.contains(&text) {
                line.push_str(": ");
                line.push_str(&text);
            }
            cause = c.source();
        }
        f.write_str(&line)
    }
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
            Error::RolledBack { source, .. } | Error::RolledBackAll { source, .. } => {
                source.errno()
            }
            _ => None,
        }
    }
}

/// What a recovery attempt achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Recovery {
    /// The device was already running.
    AlreadyRunning,
    /// The device was moved back to RUNNING.
    Resumed,
    /// The device was already stopped, as it was when the migration began.
    AlreadyStopped,
    /// The device was moved back to STOP, its state when the migration began (a paused VM).
    Stopped,
    /// The device was reset (and runs with its reset state).
    Reset,
    /// Neither a transition nor a reset worked.
    Failed(String),
}

impl fmt::Display for Recovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Recovery::AlreadyRunning => write!(f, "is running"),
            Recovery::Resumed => write!(f, "was returned to RUNNING"),
            Recovery::AlreadyStopped => write!(f, "is stopped"),
            Recovery::Stopped => write!(f, "was returned to STOP"),
            Recovery::Reset => write!(f, "was reset"),
            Recovery::Failed(why) => write!(f, "could not be recovered ({why})"),
        }
    }
}
