// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The mock mediated device: an in-process vendor-driver emulation behind [`DeviceIo`], so
//! the real protocol code runs against it exactly as against a kernel driver.
//!
//! # What it emulates
//!
//! [`MockV1`] is a PCI device (`VFIO_DEVICE_FLAGS_PCI | RESET`) with a vfio-pci region layout
//! (region `i` at fd offset `i << 40`): BAR0 is 4 KiB of scratch, index 8 (VGA) answers
//! `EINVAL`, index 9 is an unrelated device-specific region (type 1) so a driver must find the
//! migration region by type 3 / subtype 1, which sits at `region-index` (default 10). The
//! migration region holds `struct vfio_device_migration_info` and a data section that is
//! either trapped (region offset 64) or mmappable through a sparse-mmap area (offset 4096)
//! backed by a memfd, so mmapped accesses are real shared memory.
//!
//! # What it enforces
//!
//! Everything below fails with `EINVAL` unless a `fail-at=` rule injects its own errno first:
//!
//! - migration info fields accessed other than whole at their own offset (u32 `device_state`
//!   @0, u64 `pending_bytes` @8, `data_offset` @16, `data_size` @24); bytes 4-8 and 32 up to
//!   the data section are never accessible; writes of `pending_bytes` and `data_offset`;
//! - `device_state` writes that change bits 3-31, ask for 101b/111b/110b, or are not an arc
//!   allowed by the mock's own table [`rules::v1_table::transition_allowed`] (same state is a no-op); any state write in ERROR;
//!   STOP-AND-COPY -> STOP while anything is pending or a transaction is staged and not
//!   consumed; RESUMING -> RUNNING when the state received does not verify (wrong seed, pages
//!   missing, corrupt), which also puts the device in ERROR (110b): only a reset leaves it;
//! - `pending_bytes` outside a saving state; `data_offset` outside saving and RESUMING, or
//!   with nothing pending; `data_size` reads with no transaction staged; data-section reads
//!   outside the staged transaction; data-section writes outside RESUMING;
//! - `data_size` writes outside RESUMING, of 0 or more than the section, or committing a
//!   transaction whose magic, sequence number, length (must equal `data_size`: the source's
//!   transaction sizes are kept) or crc32c is wrong;
//! - `mmap` not page aligned or outside the sparse-mmap area (or with `data=trapped`);
//!   region-info queries of missing regions or with a bad `argsz`.
//!
//! `VFIO_DEVICE_FEATURE` and `VFIO_MIG_GET_PRECOPY_INFO` answer `ENOTTY`, as on a v1 driver.
//!
//! # Saving and resuming
//!
//! Reading `pending_bytes` consumes the staged transaction (if any) and reports what is left,
//! transaction headers included (in pre-copy it grows as the device dirties pages at
//! `dirty-rate`; in stop-and-copy it falls to 0 exactly when all was consumed). Reading
//! `data_offset` stages the next transaction, at most `chunk` bytes:
//!
//! ```text
//! { magic "MTX1" u32, seq u32, total length u32 (header included), crc32c(payload) u32 }
//! + payload: the next bytes of the content packet stream (see content)
//! ```
//!
//! The content stream ([`content`]) carries every page of the seeded state, pages dirtied
//! during pre-copy again, and an END packet with a digest of the page generations; the
//! resuming mock checks every page against its own seed.
//!
//! # The v2 mock
//!
//! [`MockV2`] (`mock:v2,...`) implements the v2 uAPI instead: `VFIO_DEVICE_FEATURE` with the
//! migration features, state walks along the kernel's arcs as mtty does, and real data fds
//! (pipes served by a thread of the mock) carrying the same content stream. See [`v2`].
//!
//! # Opening a mock
//!
//! ```
//! use vfio_mig_mock::{open, MockSpec};
//!
//! let spec: MockSpec = "mock:v1,size=1M,seed=7".parse()?;
//! let (device, handle) = open(&spec)?;
//! assert_eq!(device.identity().instance, "mock:v1,size=1M,seed=7");
//! assert!(!handle.status().resumed_ok);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod content;
pub mod faults;
pub mod pace;
pub mod pci;
pub mod region_info;
pub mod rules;
pub mod spec;
pub mod status;
pub mod v1;
pub mod v2;

use std::io;
use std::sync::Arc;

pub use content::{Content, Decoder, Encoder};
pub use faults::{FaultField, FaultRule, V2FaultField, V2FaultRule};
pub use spec::{DataFd, DataMode, MockSpec, Protocol};
pub use status::{MockHandle, MockStatus};
pub use v1::MockV1;
pub use v2::MockV2;

use vfio_mig::backend::DeviceIo;
use vfio_mig::{Backend, OpenedDevice};
use vfio_mig_fence::DeviceKey;

/// The prefix of a mock device string on the command line.
pub const MOCK_PREFIX: &str = "mock:";

/// Whether a DEVICE argument names a mock (`mock:...`) rather than a sysfs path.
pub fn is_mock(device: &str) -> bool {
    device.starts_with(MOCK_PREFIX)
}

/// Words of per-page bookkeeping a mock and its decoder keep (generations, received sets).
const WORDS_PER_PAGE: u64 = 3;

/// Fails with `ENOMEM` when the per-page tables of `spec` cannot be allocated: an allocation
/// failure later would abort the process instead of failing the command with one line.
fn check_page_tables(spec: &MockSpec) -> io::Result<()> {
    let pages = spec.size.div_ceil(u64::from(spec.page.max(1)));
    let words = usize::try_from(pages.saturating_mul(WORDS_PER_PAGE)).unwrap_or(usize::MAX);
    let mut probe: Vec<u32> = Vec::new();
    probe.try_reserve_exact(words).map_err(|_| {
        io::Error::new(
            io::ErrorKind::OutOfMemory,
            format!(
                "size {}: the mock's page tables ({} bytes) cannot be allocated; give a \
                 smaller size or a larger page",
                spec.size,
                words.saturating_mul(4)
            ),
        )
    })
}

/// Creates the mock device `spec` describes, and a handle to inspect it.
pub fn open(spec: &MockSpec) -> io::Result<(Arc<dyn DeviceIo>, MockHandle)> {
    check_page_tables(spec)?;
    match spec.protocol {
        Protocol::V1 => {
            let dev = MockV1::new(spec)?;
            let handle = dev.handle();
            Ok((Arc::new(dev), handle))
        }
        Protocol::V2 => {
            let dev = MockV2::new(spec)?;
            let handle = dev.handle();
            Ok((Arc::new(dev), handle))
        }
    }
}

/// Opens the mock `spec` with its protocol driver, and a handle to inspect it.
pub fn open_mock(spec: &MockSpec) -> vfio_mig::Result<(OpenedDevice, MockHandle)> {
    let (io, handle) =
        open(spec).map_err(|e| vfio_mig::Error::device(format!("create mock device {spec}"), e))?;
    Ok((OpenedDevice::from_io(io)?, handle))
}

/// Opens a device by the name a user gives: a mock (`mock:v1,...`, with its handle) or the
/// sysfs path of a real VFIO device, through `backend`.
pub fn open_named(
    name: &str,
    backend: Backend,
) -> vfio_mig::Result<(OpenedDevice, Option<MockHandle>)> {
    if is_mock(name) {
        let spec: MockSpec = name.parse()?;
        let (opened, handle) = open_mock(&spec)?;
        return Ok((opened, Some(handle)));
    }
    Ok((vfio_mig::open_device(name, backend)?, None))
}

/// The fencing key of a device named as in [`open_named`]: `mock:ID` for a mock with an
/// `id=` option, none for a mock without one (it lives only in its process), the canonical
/// sysfs path of a real device.
pub fn device_key(name: &str) -> vfio_mig::Result<Option<DeviceKey>> {
    if is_mock(name) {
        let spec: MockSpec = name.parse()?;
        return Ok(spec.id.map(|id| DeviceKey::from_text(format!("mock:{id}"))));
    }
    DeviceKey::for_path(name)
        .map(Some)
        .map_err(vfio_mig_fence::Error::into_core)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_v1_and_v2() {
        assert!(is_mock("mock:v1"));
        assert!(!is_mock("/sys/bus/mdev/devices/x"));
        let (dev, handle) = open(&"mock:v1,size=8K".parse().unwrap()).unwrap();
        assert_eq!(dev.identity().model, "mock:v1");
        assert_eq!(handle.status().state_raw, 0x8000_0101);
        assert_eq!(handle.status().v2_state, None);
        let (dev, handle) = open(&"mock:v2,size=8K".parse().unwrap()).unwrap();
        assert_eq!(dev.identity().model, "mock:v2");
        assert_eq!(handle.status().v2_state, Some(rules::v2_arcs::RUNNING));
    }
}
