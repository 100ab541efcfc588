// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The errors of a session: a refused or failed peer, an outcome in doubt, fencing, and the
//! core's errors.

use vfio_mig_fence::ReasonCode;

/// Errors of the session layer.
///
/// The engine carries an error of the session's own hooks (its load gate, its fence) out as
/// [`vfio_mig::Error::External`]; converting a core error into this one takes such an error
/// back, so that a caller matches [`Error::Refused`] wherever the refusal came from.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An error of the migration library (a device, the stream, a transport, a rollback).
    #[error(transparent)]
    Core(vfio_mig::Error),
    /// A fencing error other than a refusal (a device lock another command holds).
    #[error(transparent)]
    Fence(vfio_mig_fence::Error),
    /// A migration was refused before either device was touched (by the destination's
    /// compatibility or fencing checks).
    #[error("{step}: refused: {detail}")]
    Refused {
        /// What was being done.
        step: String,
        /// Why, as a code (also sent to the source in REFUSE).
        code: ReasonCode,
        /// Why, in words.
        detail: String,
    },
    /// The destination reported a failure after it had accepted the migration (its device
    /// was reset).
    #[error("{step}: the destination failed: {detail}")]
    PeerFailed {
        /// What the source was doing.
        step: String,
        /// The destination's reason.
        detail: String,
    },
    /// The connection was lost after the source told the destination to resume: the
    /// destination may run the state. The source device is left stopped, not resumed, so that
    /// the state never runs twice; `send --session` with the same id asks the destination.
    #[error("{step}: outcome in doubt: {detail}")]
    InDoubt {
        /// What was being done.
        step: String,
        /// What is known.
        detail: String,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl From<vfio_mig::Error> for Error {
    fn from(e: vfio_mig::Error) -> Self {
        match e {
            vfio_mig::Error::External(inner) => match inner.downcast::<Error>() {
                Ok(ours) => *ours,
                Err(inner) => match inner.downcast::<vfio_mig_fence::Error>() {
                    Ok(fence) => Error::from(*fence),
                    Err(inner) => Error::Core(vfio_mig::Error::External(inner)),
                },
            },
            other => Error::Core(other),
        }
    }
}

impl From<vfio_mig_fence::Error> for Error {
    fn from(e: vfio_mig_fence::Error) -> Self {
        match e {
            vfio_mig_fence::Error::Core(core) => Error::from(core),
            vfio_mig_fence::Error::Refused { step, code, detail } => {
                Error::Refused { step, code, detail }
            }
            vfio_mig_fence::Error::InDoubt { step, detail } => Error::InDoubt { step, detail },
            other => Error::Fence(other),
        }
    }
}

impl Error {
    /// This error as the core's, to return from a hook the core calls (a session's hook
    /// between a destination's reads): the core's own errors stay themselves, the others
    /// travel as [`vfio_mig::Error::External`] and come back through `From`.
    pub fn into_core(self) -> vfio_mig::Error {
        match self {
            Error::Core(e) => e,
            other => vfio_mig::Error::External(Box::new(other)),
        }
    }

    /// The core error this is, if it is one.
    pub fn as_core(&self) -> Option<&vfio_mig::Error> {
        match self {
            Error::Core(e) => Some(e),
            _ => None,
        }
    }

    /// A transport error at `step` ([`vfio_mig::Error::Transport`]).
    pub fn transport(step: impl Into<String>, source: std::io::Error) -> Self {
        Error::Core(vfio_mig::Error::transport(step, source))
    }

    /// A protocol violation at `step` ([`vfio_mig::Error::Protocol`]).
    pub fn protocol(step: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Core(vfio_mig::Error::protocol(step, detail))
    }

    /// A stream error at `step` ([`vfio_mig::Error::Stream`]).
    pub fn stream(step: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Core(vfio_mig::Error::stream(step, detail))
    }

    /// A device access error at `step` ([`vfio_mig::Error::Device`]).
    pub fn device(step: impl Into<String>, source: std::io::Error) -> Self {
        Error::Core(vfio_mig::Error::device(step, source))
    }

    /// A malformed argument or configuration ([`vfio_mig::Error::InvalidInput`]).
    pub fn invalid_input(detail: impl Into<String>) -> Self {
        Error::Core(vfio_mig::Error::InvalidInput(detail.into()))
    }
}

/// Whether a source's failure `e` came from losing its destination (a broken connection, or
/// the destination's FAILED): the destination's own error then explains it better.
pub(crate) fn is_peer_loss(e: &vfio_mig::Error) -> bool {
    match e {
        vfio_mig::Error::Transport { .. } => true,
        vfio_mig::Error::External(inner) => {
            matches!(
                inner.downcast_ref::<Error>(),
                Some(Error::PeerFailed { .. })
            )
        }
        _ => false,
    }
}
