// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What a test (or `vfio-mig probe`) can see of a mock device from outside: a snapshot of its
//! state and counters, through a cheap cloneable handle that shares the device's inner state.

use std::fmt;
use std::sync::Arc;

use crate::rules::{v1_table, v2_arcs};

/// A snapshot of a mock device's state and counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MockStatus {
    /// The raw state: v1 `device_state`, reserved bits included; for a v2 mock, the raw
    /// `enum vfio_device_mig_state` value (see [`MockStatus::v2_state`]).
    pub state_raw: u32,
    /// The v2 migration state, a raw `enum vfio_device_mig_state` value (see
    /// [`crate::rules::v2_arcs`]); `None` for a v1 mock.
    pub v2_state: Option<u32>,
    /// RUNNING was reached after a resume whose state verified complete and intact.
    pub resumed_ok: bool,
    /// v2: the device ran a resumed state that was not complete (or nothing at all, hisi's
    /// match data only, igb's empty stream) on a driver that loads what came and has no
    /// path into ERROR: the destination runs without the source's state.
    pub ran_incomplete: bool,
    /// Successful resets.
    pub resets: u64,
    /// Saves that reached STOP with everything consumed.
    pub saves_completed: u64,
    /// Transactions staged by `data_offset` reads, this device's lifetime.
    pub transactions_staged: u64,
    /// Staged transactions the user consumed (by reading `pending_bytes` after them).
    pub transactions_saved: u64,
    /// Transactions committed by `data_size` writes while resuming.
    pub transactions_loaded: u64,
    /// Bytes (headers included) of the consumed transactions.
    pub bytes_saved: u64,
    /// Bytes (headers included) of the committed transactions.
    pub bytes_loaded: u64,
    /// Size of the transaction staged now, if any.
    pub staged: Option<u64>,
    /// State-stream bytes the current save has not staged yet (0 when not saving).
    pub stream_pending: u64,
    /// Pages dirtied by pre-copy, this device's lifetime.
    pub dirtied_pages: u64,
    /// The state being (or last) resumed did not match this device's content.
    pub corrupt: bool,
    /// The first page that did not match.
    pub first_bad_page: Option<u32>,
    /// Accesses failed by `fail-at=` rules.
    pub fault_hits: u64,
    /// Why the device last refused an access, for test diagnostics.
    pub last_refusal: Option<String>,
    /// v2: data fds handed out by state changes (saving and resuming sessions).
    pub data_fds: u64,
    /// v2: the user opted in to `VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2`.
    pub precopy_info_v2: bool,
    /// v2: DMA logging is started.
    pub dma_logging: bool,
    /// v2: pages the device wrote by DMA while logging (with repetition).
    pub dma_pages_dirtied: u64,
    /// v2: bits set in DMA logging reports.
    pub dma_bits_reported: u64,
    /// v2: reads of a data fd the device answered with ENOMSG.
    pub enomsg_reads: u64,
    /// v2: times the device re-initialised its pre-copy data (`reinit-at=`,
    /// [`MockHandle::reinit`]).
    pub reinits: u64,
}

impl MockStatus {
    /// The state's name, whatever the protocol (v2 `RUNNING`, `STOP_COPY`, ...; v1
    /// `RUNNING (001b)`, ...).
    pub fn state_name(&self) -> String {
        match self.v2_state {
            Some(s) => v2_arcs::name(s).to_string(),
            None => v1_table::name(self.state_raw),
        }
    }

    /// Whether the device runs normally: v1 RUNNING (001b), v2 RUNNING.
    pub fn is_running(&self) -> bool {
        match self.v2_state {
            Some(s) => s == v2_arcs::RUNNING,
            None => self.state_raw & v1_table::MASK == v1_table::RUNNING,
        }
    }
}

/// What a mock device offers to its inspection handle.
pub trait Inspect: Send + Sync {
    /// A snapshot of the state and counters.
    fn status(&self) -> MockStatus;
    /// crc32c of the device's page generation table: two devices with the same seed and
    /// size hold the same state exactly when their digests are equal.
    fn state_digest(&self) -> u32;
    /// v2: every IOVA page (at the logging page size) the device wrote by DMA since DMA
    /// logging last started, sorted; empty for devices without DMA logging.
    fn dma_written(&self) -> Vec<u64> {
        Vec::new()
    }
    /// v2, a profile that re-initialises (mlx5): the firmware re-initialises now, so the next
    /// PRECOPY_INFO of the current saving session reports it (as `reinit-at=` does at a
    /// chosen query). A test's trigger for a moment the engine chooses, such as the
    /// destination's switchover-ack. Does nothing on other devices.
    fn reinit(&self) {}
}

/// A cheap, cloneable view of a mock device, kept by tests while the device itself is handed
/// to the code under test as a `dyn DeviceIo`.
#[derive(Clone)]
pub struct MockHandle(Arc<dyn Inspect>);

impl MockHandle {
    /// A handle over a device's shared inner state.
    pub fn new(inner: Arc<dyn Inspect>) -> Self {
        Self(inner)
    }

    /// A snapshot of the device's state and counters.
    pub fn status(&self) -> MockStatus {
        self.0.status()
    }

    /// See [`Inspect::state_digest`].
    pub fn state_digest(&self) -> u32 {
        self.0.state_digest()
    }

    /// See [`Inspect::dma_written`].
    pub fn dma_written(&self) -> Vec<u64> {
        self.0.dma_written()
    }

    /// See [`Inspect::reinit`].
    pub fn reinit(&self) {
        self.0.reinit()
    }
}

impl fmt::Debug for MockHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("MockHandle").field(&self.status()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;

    impl Inspect for Fixed {
        fn status(&self) -> MockStatus {
            MockStatus {
                state_raw: 0x8000_0106,
                ..Default::default()
            }
        }
        fn state_digest(&self) -> u32 {
            42
        }
    }

    #[test]
    fn handle_forwards() {
        let h = MockHandle::new(Arc::new(Fixed));
        let h2 = h.clone();
        assert_eq!(h2.status().state_raw & v1_table::MASK, v1_table::ERROR);
        assert_eq!(h.state_digest(), 42);
        assert!(format!("{h:?}").contains("state_raw"));
        assert!(h.dma_written().is_empty());
        let st = h.status();
        assert_eq!(st.state_name(), "ERROR (110b)");
        assert!(!st.is_running());
        let v2 = MockStatus {
            state_raw: v2_arcs::RUNNING,
            v2_state: Some(v2_arcs::RUNNING),
            ..Default::default()
        };
        assert!(v2.is_running());
        assert_eq!(v2.state_name(), "RUNNING");
    }
}
