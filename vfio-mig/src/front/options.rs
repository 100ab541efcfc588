// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The options of a migration, as structs: what a VMM sets once, not positional arguments.

use std::sync::Arc;

use crate::stream::StreamAuth;

/// The fencing epoch a stream carries in its header: a number the VMM's orchestration raises
/// with every handoff of the same VM, so that a destination can refuse a stale stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(pub u64);

/// How a [`super::Source`] migrates its devices.
///
/// ```
/// use vfio_mig::{Epoch, SourceOptions};
/// let opts = SourceOptions::new(Epoch(7)).allow_non_p2p_unit(true);
/// assert_eq!(opts.epoch, Epoch(7));
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct SourceOptions {
    /// The epoch written into the stream header.
    pub epoch: Epoch,
    /// Lets several devices of which some lack the P2P states migrate as one unit. Without
    /// P2P a device cannot be quiesced before its peers stop, so it may still DMA into a peer
    /// that is already stopped: QEMU refuses such a unit, and so does the source unless this
    /// is set.
    pub allow_non_p2p_unit: bool,
    /// The largest read from a device in one go (and so the largest record payload batch);
    /// a MiB, as QEMU reads a data fd. A unit's switch-over reads at most one record's
    /// payload ([`MAX_FRAGMENT`](crate::wire::MAX_FRAGMENT)) at a time: each buffer goes to
    /// the writing thread whole, as one record.
    pub buffer: usize,
    /// Whether running devices that support it enter pre-copy (a live migration); without
    /// it every device goes straight to stop-and-copy at the switch-over.
    pub pre_copy: bool,
    /// The stream's session id; `None` draws a fresh one. A retried handoff passes the id of
    /// the attempt whose outcome it asks about (the session layer's fencing keys on it).
    pub session: Option<[u8; 16]>,
    /// Authenticates every record of the stream with this key (a keyed stream, see
    /// docs/stream-format.md); `None` writes CRCs only.
    pub key: Option<Arc<dyn StreamAuth>>,
    /// The switch-over pump's depth: buffers in the ring between the thread that reads a
    /// device and the one that checksums and writes its records (0 or 1: one thread does
    /// all). `None` chooses from the CPUs this thread may run on (a ring of 3 from three CPUs
    /// up, else one thread); a VMM that pins its migration to one core sets 1.
    pub pipeline: Option<usize>,
}

impl std::fmt::Debug for SourceOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceOptions")
            .field("epoch", &self.epoch)
            .field("allow_non_p2p_unit", &self.allow_non_p2p_unit)
            .field("buffer", &self.buffer)
            .field("pre_copy", &self.pre_copy)
            .field("session", &self.session)
            .field("key", &self.key.is_some())
            .field("pipeline", &self.pipeline)
            .finish()
    }
}

impl SourceOptions {
    /// The defaults, with `epoch`.
    pub fn new(epoch: Epoch) -> Self {
        Self {
            epoch,
            allow_non_p2p_unit: false,
            buffer: crate::DEFAULT_BUFFER,
            pre_copy: true,
            session: None,
            key: None,
            pipeline: None,
        }
    }

    /// Sets [`pre_copy`](Self::pre_copy).
    pub fn pre_copy(mut self, pre_copy: bool) -> Self {
        self.pre_copy = pre_copy;
        self
    }

    /// Sets [`session`](Self::session).
    pub fn session(mut self, id: [u8; 16]) -> Self {
        self.session = Some(id);
        self
    }

    /// Sets [`key`](Self::key).
    pub fn key(mut self, key: Option<Arc<dyn StreamAuth>>) -> Self {
        self.key = key;
        self
    }

    /// Sets [`allow_non_p2p_unit`](Self::allow_non_p2p_unit).
    pub fn allow_non_p2p_unit(mut self, allow: bool) -> Self {
        self.allow_non_p2p_unit = allow;
        self
    }

    /// Sets [`pipeline`](Self::pipeline).
    pub fn pipeline(mut self, depth: Option<usize>) -> Self {
        self.pipeline = depth;
        self
    }

    /// Sets [`buffer`](Self::buffer) (at least 4 KiB is used).
    pub fn buffer(mut self, bytes: usize) -> Self {
        self.buffer = bytes;
        self
    }
}

/// How a [`super::Destination`] loads its devices.
///
/// ```
/// use vfio_mig::DestinationOptions;
/// let opts = DestinationOptions::new().allow_non_p2p_unit(true);
/// assert!(opts.allow_non_p2p_unit);
/// ```
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct DestinationOptions {
    /// Lets several devices of which some lack the P2P states load and run as one unit: the
    /// destination's own opt-in to the risk the source's option names (a device that runs
    /// before its peers can answer peer-to-peer accesses).
    pub allow_non_p2p_unit: bool,
    /// The stream must be authenticated with this key (a keyed stream, see
    /// [`SourceOptions::key`]): the header's tag is checked before any device is touched,
    /// and every record's before its bytes reach a device. Without a key, the tags of an
    /// authenticated stream are skipped, not checked.
    pub key: Option<Arc<dyn StreamAuth>>,
}

impl DestinationOptions {
    /// The defaults: a unit must have the P2P states.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`allow_non_p2p_unit`](Self::allow_non_p2p_unit).
    pub fn allow_non_p2p_unit(mut self, allow: bool) -> Self {
        self.allow_non_p2p_unit = allow;
        self
    }

    /// Sets [`key`](Self::key).
    pub fn key(mut self, key: Option<Arc<dyn StreamAuth>>) -> Self {
        self.key = key;
        self
    }
}
