// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What a test (or `vfio-mig probe`) can see of a mock device from outside: a snapshot of its
//! state and counters, through a cheap cloneable handle that shares the device's inner state.

use std::fmt;
use std::sync::Arc;

use crate::v1::state::V1State;

/// A snapshot of a mock device's state and counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MockStatus {
    /// The raw state: v1 `device_state`, reserved bits included.
    pub state_raw: u32,
    /// RUNNING was reached after a resume whose state verified complete and intact.
    pub resumed_ok: bool,
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
}

impl MockStatus {
    /// The v1 state of `state_raw`.
    pub fn v1_state(&self) -> V1State {
        V1State::from_raw(self.state_raw)
    }
}

/// What a mock device offers to its inspection handle.
pub trait Inspect: Send + Sync {
    /// A snapshot of the state and counters.
    fn status(&self) -> MockStatus;
    /// crc32c of the device's page generation table: two devices with the same seed and
    /// size hold the same state exactly when their digests are equal.
    fn state_digest(&self) -> u32;
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
        assert_eq!(h2.status().v1_state(), V1State::Error);
        assert_eq!(h.state_digest(), 42);
        assert!(format!("{h:?}").contains("state_raw"));
    }
}
