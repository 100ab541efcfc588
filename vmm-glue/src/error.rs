// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One error type with a variant per phase, as VMM migration code expects.

/// Errors of the VMM glue.
///
/// As with [`vfio_mig::Error`], a variant's message names its own step only and the cause is
/// its `source()`; print the chain with [`vfio_mig::error::Report`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GlueError {
    /// Pausing (stopping) a device failed.
    #[error("pause {id}")]
    Pause {
        /// The device.
        id: String,
        /// The cause.
        #[source]
        source: Box<vfio_mig::Error>,
    },
    /// Resuming (running) a device failed.
    #[error("resume {id}")]
    Resume {
        /// The device.
        id: String,
        /// The cause.
        #[source]
        source: Box<vfio_mig::Error>,
    },
    /// Taking a snapshot (saving device state) failed.
    #[error("snapshot {id}")]
    Snapshot {
        /// The device.
        id: String,
        /// The cause.
        #[source]
        source: Box<vfio_mig::Error>,
    },
    /// Restoring device state failed.
    #[error("restore {id}")]
    Restore {
        /// The device.
        id: String,
        /// The cause.
        #[source]
        source: Box<vfio_mig::Error>,
    },
    /// Starting, reading or stopping dirty tracking failed.
    #[error("dirty log {id}: {detail}")]
    DirtyLog {
        /// The device or tracker.
        id: String,
        /// What went wrong.
        detail: String,
    },
    /// Mapping (or unmapping) guest memory for DMA failed.
    #[error("DMA {what} guest memory")]
    DmaMap {
        /// `map` or `unmap`.
        what: &'static str,
        /// The cause (it carries the ioctl's `io::Error`).
        #[source]
        source: vfio_ioctls::VfioError,
    },
    /// Opening a device or container failed.
    #[error("open {what}")]
    Open {
        /// What was being opened.
        what: String,
        /// The cause.
        #[source]
        source: vfio_ioctls::VfioError,
    },
    /// A KVM operation failed.
    #[error("KVM {what}: {detail}")]
    Kvm {
        /// What was being done.
        what: String,
        /// What went wrong.
        detail: String,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, GlueError>;
