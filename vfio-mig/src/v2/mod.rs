// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The v2 migration protocol: `VFIO_DEVICE_FEATURE` plus a data fd (Linux 5.18 and later;
//! what current kernels and the kernel's `mtty` sample implement).
//!
//! # Discovery
//! A `PROBE | GET` of `VFIO_DEVICE_FEATURE_MIGRATION` succeeds on a v2 device; a `GET` returns
//! its flags: `STOP_COPY` (1, mandatory: STOP, STOP_COPY, RESUMING), `P2P` (2: RUNNING_P2P)
//! and `PRE_COPY` (4: PRE_COPY; with `P2P` also PRE_COPY_P2P). RUNNING and ERROR always exist.
//!
//! # States and arcs
//! `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` GETs the state or SETs a new one. The kernel moves
//! along fixed single arcs ([`state`] holds a copy of its table, `vfio_mig_get_next_state`):
//!
//! ```text
//! RUNNING      <-> RUNNING_P2P    (P2P)
//! RUNNING_P2P  <-> STOP           (P2P; without it RUNNING <-> STOP)
//! STOP         <-> STOP_COPY
//! STOP         <-> RESUMING
//! RUNNING      <-> PRE_COPY       (PRE_COPY)
//! RUNNING_P2P  <-> PRE_COPY_P2P   (PRE_COPY and P2P)
//! PRE_COPY     <-> PRE_COPY_P2P   (PRE_COPY and P2P)
//! PRE_COPY_P2P  -> STOP_COPY      (PRE_COPY and P2P; without P2P: PRE_COPY -> STOP_COPY)
//! ```
//!
//! Any other request is a combination of arcs chosen by the kernel: the shortest path that
//! opens no data session midway (only its last arc may return a data fd; it may cross
//! PRE_COPY_P2P only when it starts in the saving group), with arcs through states the device
//! does not support skipped (no P2P: RUNNING <-> STOP directly).
//! Notable walks: PRE_COPY -> STOP goes PRE_COPY -> RUNNING -> (RUNNING_P2P ->) STOP, i.e. the
//! device runs again; RESUMING -> RUNNING goes through STOP. Refused with EINVAL: any request
//! from or to ERROR, states the flags do not support, and STOP_COPY -> PRE_COPY(_P2P). That
//! last one must never be sent: kernels before a 2026 fix loop forever in
//! `vfio_mig_get_next_state` on it (the ERROR sentinel defeats the skip loop).
//!
//! The driver ([`V2Device`]) walks [`state::plan`] itself, one SET per arc, so a failure is
//! pinned to one arc and the data fd is tracked arc by arc.
//!
//! # The data fd
//! An arc that starts a session returns a new `data_fd` in the SET answer (`-1` otherwise):
//! RUNNING -> PRE_COPY, RUNNING_P2P -> PRE_COPY_P2P, STOP -> STOP_COPY (read it) and
//! STOP -> RESUMING (write it). PRE_COPY, PRE_COPY_P2P and STOP_COPY form the saving group and
//! share one session: PRE_COPY(_P2P) -> STOP_COPY returns no new fd (mtty: -1) and the
//! STOP_COPY data follows the pre-copy data on the same fd, so the destination receives one
//! continuous byte stream into its single RESUMING fd. Leaving the streaming states ends the
//! session: the driver closes the fd after STOP_COPY -> STOP, PRE_COPY -> RUNNING and
//! RESUMING -> STOP. Writes may be split anywhere (no chunk boundaries in v2); each read is
//! reported as its own chunk.
//!
//! # End of data
//! In STOP_COPY, `read` returning 0 is the end of the device state. In PRE_COPY the fd has a
//! temporary end when no pre-copy data is available for now: the uAPI says drivers should
//! fail `read` with ENOMSG, mtty returns 0; both end the current pre-copy round, and a later
//! read (or STOP_COPY) may return more. `VFIO_MIG_GET_PRECOPY_INFO` on the fd gives
//! `initial_bytes` and `dirty_bytes` (PRE_COPY states only: mtty answers EINVAL in STOP_COPY);
//! `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE` estimates the STOP_COPY size in any state.
//! `VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2` (an empty SET) opts in to the REINIT flag on newer
//! kernels; the driver tries it at open and lives without it.
//!
//! # Failure and recovery
//! A failed SET may leave the device in its old state, at any step of the walk, or in ERROR.
//! The driver reads the state back and reports it ([`crate::Error::Transition`]), then, as
//! QEMU does: a source is walked back to RUNNING, and reset (`VFIO_DEVICE_RESET`, which mtty
//! honours without advertising it) when that fails or when it is in ERROR; a destination
//! whose RESUMING -> STOP (the driver's check of the loaded state) or later step fails is
//! reset, never run with partial state. A reset returns the device to RUNNING and ends any
//! session.
//!
//! # Dirty tracking
//! `VFIO_DEVICE_FEATURE_DMA_LOGGING_START` / `_REPORT` / `_STOP` record the device's DMA
//! writes by IOVA page; see [`feature`] and [`V2Device::dma_logging_start`].

pub(crate) mod data;
pub(crate) mod driver;
#[cfg(test)]
mod fake;
pub mod feature;
pub mod state;

pub(crate) use driver::V2Device;
