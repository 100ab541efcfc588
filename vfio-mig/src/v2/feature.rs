// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `VFIO_DEVICE_FEATURE` argument buffers for the v2 migration features, and the calls that
//! issue them through [`DeviceIo::device_feature`].
//!
//! Every buffer is the 8-byte `vfio_device_feature` header (`argsz`, then `flags` = feature
//! index | GET/SET/PROBE) followed by the feature's payload struct from `vfio-bindings`. The
//! header is written field by field: its bindgen struct ends in a flexible array and is not
//! plain data. Builders and parsers are pure, so the byte layout is tested without a device.
//!
//! `VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2` (12) has no payload struct: it is a SET with an
//! empty payload that opts in to `VFIO_PRECOPY_INFO_REINIT` being reported in
//! `vfio_precopy_info.flags` (without the opt-in, drivers echo back whatever flags the caller
//! passed). Kernels without it refuse the SET; [`enable_precopy_info_v2`] reports that.

use std::io;
use std::mem::size_of;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};

use vfio_bindings::bindings::vfio::{
    vfio_device_feature_dma_logging_control, vfio_device_feature_dma_logging_range,
    vfio_device_feature_dma_logging_report, vfio_device_feature_mig_data_size,
    vfio_device_feature_mig_state, vfio_device_feature_migration, vfio_precopy_info,
    VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2, VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_START, VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
    VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MASK, VFIO_DEVICE_FEATURE_MIGRATION,
    VFIO_DEVICE_FEATURE_MIG_DATA_SIZE, VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
    VFIO_DEVICE_FEATURE_PROBE, VFIO_DEVICE_FEATURE_SET, VFIO_PRECOPY_INFO_REINIT,
};

use super::state::{MigState, MigrationFlags};
use crate::device::pod::{read_pod, write_pod, Pod};
use crate::device::DeviceIo;

/// Size of the `vfio_device_feature` header (`argsz` + `flags`) before the payload.
pub const HEADER_LEN: usize = 8;

/// One IOVA range for DMA logging (the kernel's struct, re-exported).
pub type DmaLoggingRange = vfio_device_feature_dma_logging_range;

/// The smallest page size the kernel accepts for a DMA logging report.
pub const MIN_DMA_LOG_PAGE: u64 = 4096;

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// A feature buffer: the header (`argsz` = whole buffer, `flags`) and a zeroed payload.
pub fn request(flags: u32, payload_len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; HEADER_LEN + payload_len];
    let argsz = buf.len() as u32;
    buf[0..4].copy_from_slice(&argsz.to_ne_bytes());
    buf[4..8].copy_from_slice(&flags.to_ne_bytes());
    buf
}

/// A feature buffer carrying `payload`.
pub fn request_with<T: Pod>(flags: u32, payload: &T) -> Vec<u8> {
    let mut buf = request(flags, size_of::<T>());
    write_pod(&mut buf, HEADER_LEN, payload);
    buf
}

/// The `(argsz, flags)` of a feature buffer.
pub fn parse_header(buf: &[u8]) -> io::Result<(u32, u32)> {
    let argsz = read_pod::<u32>(buf, 0).ok_or_else(|| invalid("feature buffer too short"))?;
    let flags = read_pod::<u32>(buf, 4).ok_or_else(|| invalid("feature buffer too short"))?;
    Ok((argsz, flags))
}

/// Reads the payload `T` of a feature buffer.
pub fn parse_payload<T: Pod>(buf: &[u8]) -> io::Result<T> {
    read_pod(buf, HEADER_LEN).ok_or_else(|| {
        invalid(format!(
            "feature buffer of {} bytes holds no {}-byte payload",
            buf.len(),
            size_of::<T>()
        ))
    })
}

/// A probe of `feature` (its index, at most `VFIO_DEVICE_FEATURE_MASK`) for the `access`
/// bits (`VFIO_DEVICE_FEATURE_GET` and/or `VFIO_DEVICE_FEATURE_SET`, or 0): header only.
pub fn probe_request(feature: u32, access: u32) -> Vec<u8> {
    request(
        VFIO_DEVICE_FEATURE_PROBE | access | (feature & VFIO_DEVICE_FEATURE_MASK),
        0,
    )
}

/// GET of `VFIO_DEVICE_FEATURE_MIGRATION`.
pub fn migration_request() -> Vec<u8> {
    request_with(
        VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIGRATION,
        &vfio_device_feature_migration::default(),
    )
}

/// The migration flags of an answered [`migration_request`].
pub fn parse_migration(buf: &[u8]) -> io::Result<MigrationFlags> {
    let mig: vfio_device_feature_migration = parse_payload(buf)?;
    Ok(MigrationFlags::from_bits_retain(mig.flags))
}

/// GET of `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`.
pub fn get_state_request() -> Vec<u8> {
    request_with(
        VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
        &vfio_device_feature_mig_state {
            device_state: 0,
            data_fd: -1,
        },
    )
}

/// SET of `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` to `state` (`data_fd` is output only; -1).
pub fn set_state_request(state: MigState) -> Vec<u8> {
    request_with(
        VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
        &vfio_device_feature_mig_state {
            device_state: state.raw(),
            data_fd: -1,
        },
    )
}

/// The `vfio_device_feature_mig_state` of an answered state request.
pub fn parse_mig_state(buf: &[u8]) -> io::Result<vfio_device_feature_mig_state> {
    parse_payload(buf)
}

/// GET of `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`.
pub fn data_size_request() -> Vec<u8> {
    request_with(
        VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DATA_SIZE,
        &vfio_device_feature_mig_data_size::default(),
    )
}

/// The `stop_copy_length` of an answered [`data_size_request`].
pub fn parse_data_size(buf: &[u8]) -> io::Result<u64> {
    let size: vfio_device_feature_mig_data_size = parse_payload(buf)?;
    Ok(size.stop_copy_length)
}

/// SET of `VFIO_DEVICE_FEATURE_DMA_LOGGING_START`. The payload holds the *address* of
/// `ranges`, which must stay alive and unmoved until the ioctl returns.
pub fn dma_logging_start_request(page_size: u64, ranges: &[DmaLoggingRange]) -> Vec<u8> {
    request_with(
        VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
        &vfio_device_feature_dma_logging_control {
            page_size,
            num_ranges: ranges.len() as u32,
            __reserved: 0,
            ranges: ranges.as_ptr() as u64,
        },
    )
}

/// The page size the device chose, from an answered [`dma_logging_start_request`].
pub fn parse_dma_logging_start(buf: &[u8]) -> io::Result<u64> {
    let control: vfio_device_feature_dma_logging_control = parse_payload(buf)?;
    Ok(control.page_size)
}

/// SET of `VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP` (no payload).
pub fn dma_logging_stop_request() -> Vec<u8> {
    request(
        VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
        0,
    )
}

/// GET of `VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT` for `[iova, iova + length)` at
/// `page_size` granularity into the bitmap at address `bitmap` (one bit per page, relative to
/// `iova`), which must stay alive, unmoved and large enough until the ioctl returns.
pub fn dma_logging_report_request(iova: u64, length: u64, page_size: u64, bitmap: u64) -> Vec<u8> {
    request_with(
        VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
        &vfio_device_feature_dma_logging_report {
            iova,
            length,
            page_size,
            bitmap,
        },
    )
}

/// SET of `VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2` (no payload: an opt-in).
pub fn precopy_info_v2_request() -> Vec<u8> {
    request(
        VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2,
        0,
    )
}

/// How many `u64` words a DMA logging bitmap for `length` bytes at `page_size` needs.
pub fn dma_bitmap_words(length: u64, page_size: u64) -> Option<u64> {
    if page_size == 0 {
        return None;
    }
    Some(length.div_ceil(page_size).div_ceil(64))
}

/// Issues a prepared feature buffer.
fn call(dev: &dyn DeviceIo, mut buf: Vec<u8>) -> io::Result<Vec<u8>> {
    dev.device_feature(&mut buf)?;
    Ok(buf)
}

/// Probes `feature` for `access` (see [`probe_request`]): `Ok` when the device supports it.
pub fn probe(dev: &dyn DeviceIo, feature: u32, access: u32) -> io::Result<()> {
    call(dev, probe_request(feature, access)).map(drop)
}

/// The device's migration flags (`VFIO_DEVICE_FEATURE_MIGRATION`).
pub fn migration_flags(dev: &dyn DeviceIo) -> io::Result<MigrationFlags> {
    parse_migration(&call(dev, migration_request())?)
}

/// Size of a `MIG_DEVICE_STATE` feature buffer: header and `vfio_device_feature_mig_state`.
const STATE_REQUEST_LEN: usize = HEADER_LEN + size_of::<vfio_device_feature_mig_state>();

/// A `MIG_DEVICE_STATE` GET or SET, byte for byte [`get_state_request`] or
/// [`set_state_request`], built on the stack: every transition issues a few of these, and the
/// heap buffer was a measurable share of their cost (`vfio-mig bench`, guest).
fn state_call(
    dev: &dyn DeviceIo,
    flags: u32,
    state: u32,
) -> io::Result<vfio_device_feature_mig_state> {
    let mut buf = state_request_array(flags, state);
    dev.device_feature(&mut buf)?;
    parse_mig_state(&buf)
}

fn state_request_array(flags: u32, state: u32) -> [u8; STATE_REQUEST_LEN] {
    let mut buf = [0u8; STATE_REQUEST_LEN];
    buf[0..4].copy_from_slice(&(STATE_REQUEST_LEN as u32).to_ne_bytes());
    buf[4..8].copy_from_slice(&flags.to_ne_bytes());
    write_pod(
        &mut buf,
        HEADER_LEN,
        &vfio_device_feature_mig_state {
            device_state: state,
            data_fd: -1,
        },
    );
    buf
}

/// The raw current migration state; decode it with [`MigState::from_raw`].
pub fn get_state(dev: &dyn DeviceIo) -> io::Result<u32> {
    Ok(state_call(
        dev,
        VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
        0,
    )?
    .device_state)
}

/// Requests `state`. Returns the new data fd when the transition opened a data session
/// (the kernel answers `data_fd` >= 0), `None` when it answered -1.
pub fn set_state(dev: &dyn DeviceIo, state: MigState) -> io::Result<Option<OwnedFd>> {
    let answer = state_call(
        dev,
        VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
        state.raw(),
    )?;
    if answer.data_fd < 0 {
        return Ok(None);
    }
    // SAFETY: on success the kernel (and, by the `DeviceIo::device_feature` contract, the mock)
    // installs a new descriptor for the data session and hands its only reference to the
    // caller; nothing else in this process owns or closes it, so adopting it is sound.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(answer.data_fd) }))
}

/// The estimated number of bytes STOP_COPY will produce (`VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`).
pub fn data_size(dev: &dyn DeviceIo) -> io::Result<u64> {
    parse_data_size(&call(dev, data_size_request())?)
}

/// Starts DMA logging of `ranges` (non-empty, non-overlapping, `page_size`-aligned) with
/// `page_size` as a hint; returns the page size the device chose.
pub fn dma_logging_start(
    dev: &dyn DeviceIo,
    page_size: u64,
    ranges: &[DmaLoggingRange],
) -> io::Result<u64> {
    if ranges.is_empty() || !page_size.is_power_of_two() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // `ranges` is borrowed for the whole call, so the address in the payload stays valid.
    parse_dma_logging_start(&call(dev, dma_logging_start_request(page_size, ranges))?)
}

/// Stops DMA logging.
pub fn dma_logging_stop(dev: &dyn DeviceIo) -> io::Result<()> {
    call(dev, dma_logging_stop_request()).map(drop)
}

/// Reads and clears the DMA log of `[iova, iova + length)` into `bitmap`: bit `n` of the
/// bitmap (word `n / 64`, bit `n % 64`) is page `iova + n * page_size`. The device only sets
/// bits; clear `bitmap` first. `page_size` must be a power of two of at least 4096 and
/// `bitmap` must hold [`dma_bitmap_words`] words, as the kernel writes that far.
pub fn dma_logging_report(
    dev: &dyn DeviceIo,
    iova: u64,
    length: u64,
    page_size: u64,
    bitmap: &mut [u64],
) -> io::Result<()> {
    if page_size < MIN_DMA_LOG_PAGE || !page_size.is_power_of_two() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    if iova.checked_add(length).is_none() {
        return Err(io::Error::from_raw_os_error(libc::EOVERFLOW));
    }
    let words = dma_bitmap_words(length, page_size).unwrap_or(u64::MAX);
    if (bitmap.len() as u64) < words {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a DMA log of {length} bytes at {page_size}-byte pages needs {words} bitmap words, not {}",
                bitmap.len()
            ),
        ));
    }
    // `bitmap` is mutably borrowed for the whole call and checked to be large enough for every
    // bit the kernel may set, so the address in the payload is valid for its writes.
    let buf = dma_logging_report_request(iova, length, page_size, bitmap.as_mut_ptr() as u64);
    call(dev, buf).map(drop)
}

/// Opts in to `VFIO_PRECOPY_INFO_REINIT` reporting (`VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2`).
pub fn enable_precopy_info_v2(dev: &dyn DeviceIo) -> io::Result<()> {
    call(dev, precopy_info_v2_request()).map(drop)
}

/// What `VFIO_MIG_GET_PRECOPY_INFO` says about the pre-copy data still to read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrecopyInfo {
    /// Initial (critical) pre-copy bytes not yet read.
    pub initial_bytes: u64,
    /// Bytes of state changed since it was last read.
    pub dirty_bytes: u64,
    /// New initial data appeared (`VFIO_PRECOPY_INFO_REINIT`); only meaningful after
    /// [`enable_precopy_info_v2`] succeeded, false otherwise.
    pub reinit: bool,
}

impl PrecopyInfo {
    /// Decodes the kernel's answer; `v2` says whether the REINIT opt-in is in force.
    pub fn from_raw(info: &vfio_precopy_info, v2: bool) -> Self {
        Self {
            initial_bytes: info.initial_bytes,
            dirty_bytes: info.dirty_bytes,
            reinit: v2 && info.flags & VFIO_PRECOPY_INFO_REINIT != 0,
        }
    }

    /// Initial plus dirty bytes, the pre-copy data currently available.
    pub fn total(&self) -> u64 {
        self.initial_bytes.saturating_add(self.dirty_bytes)
    }
}

/// `VFIO_MIG_GET_PRECOPY_INFO` on `data_fd` (valid in PRE_COPY and PRE_COPY_P2P only).
pub fn precopy_info(
    dev: &dyn DeviceIo,
    data_fd: BorrowedFd<'_>,
    v2: bool,
) -> io::Result<PrecopyInfo> {
    Ok(PrecopyInfo::from_raw(&dev.precopy_info(data_fd)?, v2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stack_state_requests_equal_the_heap_ones() {
        assert_eq!(
            state_request_array(
                VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
                0
            )
            .to_vec(),
            get_state_request()
        );
        for s in MigState::ALL {
            assert_eq!(
                state_request_array(
                    VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
                    s.raw()
                )
                .to_vec(),
                set_state_request(s)
            );
        }
    }

    fn le32(v: u32) -> [u8; 4] {
        v.to_ne_bytes()
    }

    fn le64(v: u64) -> [u8; 8] {
        v.to_ne_bytes()
    }

    fn bytes(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    #[test]
    fn header_layout() {
        assert_eq!(HEADER_LEN, 8);
        let buf = request(0x0002_0002, 8);
        assert_eq!(buf, bytes(&[&le32(16), &le32(0x0002_0002), &[0; 8]]));
        assert_eq!(parse_header(&buf).unwrap(), (16, 0x0002_0002));
        assert!(parse_header(&[0; 7]).is_err());
    }

    #[test]
    fn probe_bytes() {
        // PROBE (1 << 18) | GET (1 << 16) | MIGRATION (1), header only.
        let buf = probe_request(VFIO_DEVICE_FEATURE_MIGRATION, VFIO_DEVICE_FEATURE_GET);
        assert_eq!(buf, bytes(&[&le32(8), &le32(0x0005_0001)]));
        // The feature index is masked to 16 bits.
        let buf = probe_request(0x1_0006, VFIO_DEVICE_FEATURE_SET);
        assert_eq!(buf, bytes(&[&le32(8), &le32(0x0006_0006)]));
    }

    #[test]
    fn migration_round_trip() {
        let mut buf = migration_request();
        assert_eq!(buf, bytes(&[&le32(16), &le32(0x0001_0001), &le64(0)]));
        buf[8..16].copy_from_slice(&le64(7));
        assert_eq!(parse_migration(&buf).unwrap(), MigrationFlags::all());
        buf[8..16].copy_from_slice(&le64(0x105));
        let f = parse_migration(&buf).unwrap();
        assert_eq!(f.bits(), 0x105);
        assert!(f.contains(MigrationFlags::PRE_COPY) && !f.contains(MigrationFlags::P2P));
        assert!(parse_migration(&buf[..12]).is_err());
    }

    #[test]
    fn state_round_trip() {
        assert_eq!(
            get_state_request(),
            bytes(&[&le32(16), &le32(0x0001_0002), &le32(0), &le32(u32::MAX)])
        );
        let mut buf = set_state_request(MigState::StopCopy);
        assert_eq!(
            buf,
            bytes(&[&le32(16), &le32(0x0002_0002), &le32(3), &le32(u32::MAX)])
        );
        buf[12..16].copy_from_slice(&le32(42));
        let ans = parse_mig_state(&buf).unwrap();
        assert_eq!((ans.device_state, ans.data_fd), (3, 42));
        for s in MigState::ALL {
            let ans = parse_mig_state(&set_state_request(s)).unwrap();
            assert_eq!(MigState::from_raw(ans.device_state), Some(s));
            assert_eq!(ans.data_fd, -1);
        }
    }

    #[test]
    fn data_size_round_trip() {
        let mut buf = data_size_request();
        assert_eq!(buf, bytes(&[&le32(16), &le32(0x0001_0009), &le64(0)]));
        buf[8..].copy_from_slice(&le64(96));
        assert_eq!(parse_data_size(&buf).unwrap(), 96);
    }

    #[test]
    fn dma_logging_bytes() {
        let ranges = [
            DmaLoggingRange {
                iova: 0x1000,
                length: 0x4000,
            },
            DmaLoggingRange {
                iova: 0x10_0000,
                length: 0x1000,
            },
        ];
        let mut buf = dma_logging_start_request(4096, &ranges);
        let addr = ranges.as_ptr() as u64;
        assert_eq!(
            buf,
            bytes(&[
                &le32(32),
                &le32(0x0002_0006),
                &le64(4096),
                &le32(2),
                &le32(0),
                &le64(addr),
            ])
        );
        // The array the address points at is the kernel's layout: iova, length pairs.
        assert_eq!(size_of::<DmaLoggingRange>(), 16);
        buf[8..16].copy_from_slice(&le64(8192));
        assert_eq!(parse_dma_logging_start(&buf).unwrap(), 8192);

        assert_eq!(
            dma_logging_stop_request(),
            bytes(&[&le32(8), &le32(0x0002_0007)])
        );
        assert_eq!(
            dma_logging_report_request(0x1000, 0x8000, 4096, 0xdead_b000),
            bytes(&[
                &le32(40),
                &le32(0x0001_0008),
                &le64(0x1000),
                &le64(0x8000),
                &le64(4096),
                &le64(0xdead_b000),
            ])
        );
        assert_eq!(dma_bitmap_words(0x8000, 4096), Some(1));
        assert_eq!(dma_bitmap_words(65 * 4096, 4096), Some(2));
        assert_eq!(dma_bitmap_words(1, 4096), Some(1));
        assert_eq!(dma_bitmap_words(0, 4096), Some(0));
        assert_eq!(dma_bitmap_words(1, 0), None);
    }

    #[test]
    fn precopy_v2_bytes_and_info() {
        assert_eq!(
            precopy_info_v2_request(),
            bytes(&[&le32(8), &le32(0x0002_000c)])
        );
        let raw = vfio_precopy_info {
            argsz: 24,
            flags: VFIO_PRECOPY_INFO_REINIT,
            initial_bytes: 24,
            dirty_bytes: 8,
        };
        let v1 = PrecopyInfo::from_raw(&raw, false);
        assert!(!v1.reinit);
        assert_eq!(v1.total(), 32);
        assert!(PrecopyInfo::from_raw(&raw, true).reinit);
    }
}
