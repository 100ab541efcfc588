// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One error type with a variant per phase, as VMM migration code expects.

/// Errors of the VMM glue.
#[derive(Debug, thiserror::Error)]
pub enum GlueError {
    /// Pausing (stopping) a device failed.
    #[error("pause {id}: {source}")]
    Pause {
        /// The device.
        id: String,
        /// The cause.
        #[source]
        source: Box<vfio_mig::Error>,
    },
    /// Resuming (running) a device failed.
    #[error("resume {id}: {source}")]
    Resume {
        /// The device.
        id: String,
        /// The cause.
        #[source]
        source: Box<vfio_mig::Error>,
    },
    /// Taking a snapshot (saving device state) failed.
    #[error("snapshot {id}: {source}")]
    Snapshot {
        /// The device.
        id: String,
        /// The cause.
        #[source]
        source: Box<vfio_mig::Error>,
    },
    /// Restoring device state failed.
    #[error("restore {id}: {source}")]
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
    /// Mapping guest memory for DMA failed.
    #[error("DMA map: {0}")]
    DmaMap(String),
    /// Opening a device or container failed.
    #[error("open {what}: {detail}")]
    Open {
        /// What was being opened.
        what: String,
        /// What went wrong.
        detail: String,
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
