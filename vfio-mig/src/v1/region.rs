// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Locating the v1 migration region and accessing its fields.
//!
//! Every field of `vfio_device_migration_info` is accessed alone, at its native width and
//! alignment (a vendor driver may trap each field separately and refuse anything else), and
//! every pread/pwrite error is returned to the caller, never logged and dropped.

use std::io;
use std::mem::{offset_of, size_of};
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    vfio_device_migration_info, VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE, VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED,
    VFIO_REGION_TYPE_MIGRATION_DEPRECATED,
};

use crate::device::region::query_region;
use crate::device::region::{RegionInfo, SparseArea};
use crate::device::{DeviceIo, Mapping};
use crate::error::{Error, Result};

/// Offset of `device_state` (u32).
pub(crate) const DEVICE_STATE: u64 = offset_of!(vfio_device_migration_info, device_state) as u64;
/// Offset of `pending_bytes` (u64).
pub(crate) const PENDING_BYTES: u64 = offset_of!(vfio_device_migration_info, pending_bytes) as u64;
/// Offset of `data_offset` (u64).
pub(crate) const DATA_OFFSET: u64 = offset_of!(vfio_device_migration_info, data_offset) as u64;
/// Offset of `data_size` (u64).
pub(crate) const DATA_SIZE: u64 = offset_of!(vfio_device_migration_info, data_size) as u64;
/// Size of the info header at the start of the region.
pub(crate) const INFO_SIZE: u64 = size_of::<vfio_device_migration_info>() as u64;

/// A mapped sparse area of the region.
#[derive(Debug)]
struct MappedArea {
    area: SparseArea,
    map: Mapping,
}

/// The v1 migration region of a device.
pub struct MigrationRegion {
    dev: Arc<dyn DeviceIo>,
    info: RegionInfo,
    mapped: Vec<MappedArea>,
}

impl std::fmt::Debug for MigrationRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrationRegion")
            .field("info", &self.info)
            .field("mapped_areas", &self.mapped.len())
            .finish()
    }
}

/// Finds the migration region by its type capability among all of the device's regions.
///
/// Regions are queried by their real index, 0 to `num_regions - 1`. A region whose query fails
/// with EINVAL is absent (the VGA region of a non-VGA PCI device is reported that way); any
/// other failure is an error, since it could hide the region we look for.
pub fn find_migration_region(dev: &dyn DeviceIo) -> Result<Option<RegionInfo>> {
    let info = dev
        .device_info()
        .map_err(|e| Error::device("VFIO_DEVICE_GET_INFO", e))?;
    for index in 0..info.num_regions {
        let region = match query_region(dev, index) {
            Ok(r) => r,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => continue,
            Err(e) => {
                return Err(Error::device(
                    format!("VFIO_DEVICE_GET_REGION_INFO for region {index}"),
                    e,
                ))
            }
        };
        if region.region_type()
            == Some((
                VFIO_REGION_TYPE_MIGRATION_DEPRECATED,
                VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED,
            ))
        {
            return Ok(Some(region));
        }
    }
    Ok(None)
}

impl MigrationRegion {
    /// Opens the migration region described by `info` (from [`find_migration_region`]),
    /// mmapping its sparse areas when the region allows it. An area that fails to map is left
    /// to pread/pwrite, which always works.
    pub fn open(dev: Arc<dyn DeviceIo>, info: RegionInfo) -> Result<Self> {
        let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        if info.flags & rw != rw {
            return Err(Error::protocol(
                "open migration region",
                format!(
                    "region {} is not readable and writable (flags {:#x})",
                    info.index, info.flags
                ),
            ));
        }
        if info.size < INFO_SIZE {
            return Err(Error::protocol(
                "open migration region",
                format!(
                    "region {} is {} bytes, smaller than its header",
                    info.index, info.size
                ),
            ));
        }
        let mut mapped = Vec::new();
        if info.flags & VFIO_REGION_INFO_FLAG_MMAP != 0 {
            for area in info.sparse_areas().unwrap_or_default() {
                let in_region = area
                    .offset
                    .checked_add(area.size)
                    .is_some_and(|end| end <= info.size);
                let Ok(len) = usize::try_from(area.size) else {
                    continue;
                };
                if !in_region || len == 0 {
                    log::warn!("ignoring a sparse-mmap area outside the region: {area:?}");
                    continue;
                }
                match dev.mmap(info.offset + area.offset, len, true) {
                    Ok(map) => mapped.push(MappedArea { area: *area, map }),
                    Err(e) => log::warn!("mmap of {area:?} failed, using pread/pwrite: {e}"),
                }
            }
        }
        Ok(Self { dev, info, mapped })
    }

    /// Finds and opens the migration region of `dev`; `Ok(None)` if it has none.
    pub fn find(dev: Arc<dyn DeviceIo>) -> Result<Option<Self>> {
        match find_migration_region(dev.as_ref())? {
            Some(info) => Self::open(dev, info).map(Some),
            None => Ok(None),
        }
    }

    /// The region's information.
    pub fn info(&self) -> &RegionInfo {
        &self.info
    }

    /// The device this region belongs to.
    pub fn device(&self) -> &Arc<dyn DeviceIo> {
        &self.dev
    }

    /// Whether `[offset, offset + len)` (region-relative) is served by an mmap.
    pub fn is_mapped(&self, offset: u64, len: u64) -> bool {
        self.mapped.iter().any(|m| m.area.contains(offset, len))
    }

    fn read_exact(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self
                .dev
                .read_at(&mut buf[done..], self.info.offset + offset + done as u64)
            {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_exact(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self
                .dev
                .write_at(&buf[done..], self.info.offset + offset + done as u64)
            {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// A register access is one pread/pwrite of exactly the field's width: a short transfer
    /// is an error, never retried piecewise (that would be a narrower access).
    fn read_field<const N: usize>(&self, offset: u64) -> io::Result<[u8; N]> {
        let mut buf = [0u8; N];
        let n = self.dev.read_at(&mut buf, self.info.offset + offset)?;
        if n != N {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("short {n}-byte read of a {N}-byte field"),
            ));
        }
        Ok(buf)
    }

    fn write_field(&self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let n = self.dev.write_at(bytes, self.info.offset + offset)?;
        if n != bytes.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short {n}-byte write of a {}-byte field", bytes.len()),
            ));
        }
        Ok(())
    }

    /// Reads `device_state` (u32 at offset 0).
    pub fn read_state(&self) -> io::Result<u32> {
        self.read_field::<4>(DEVICE_STATE).map(u32::from_ne_bytes)
    }

    /// Writes `device_state`. Callers compose the value with [`super::state::compose`].
    pub fn write_state(&self, raw: u32) -> io::Result<()> {
        self.write_field(DEVICE_STATE, &raw.to_ne_bytes())
    }

    /// Reads `pending_bytes`. While saving, this also tells the driver that the chunk staged
    /// by the last `data_offset` read has been consumed.
    pub fn pending_bytes(&self) -> io::Result<u64> {
        self.read_field::<8>(PENDING_BYTES).map(u64::from_ne_bytes)
    }

    /// Reads `data_offset`. While saving, this asks the driver to stage the next chunk.
    pub fn data_offset(&self) -> io::Result<u64> {
        self.read_field::<8>(DATA_OFFSET).map(u64::from_ne_bytes)
    }

    /// Reads `data_size`: the size of the staged chunk.
    pub fn data_size(&self) -> io::Result<u64> {
        self.read_field::<8>(DATA_SIZE).map(u64::from_ne_bytes)
    }

    /// Writes `data_size`: while resuming, this hands the written chunk to the driver.
    pub fn set_data_size(&self, size: u64) -> io::Result<()> {
        self.write_field(DATA_SIZE, &size.to_ne_bytes())
    }

    /// Checks that a data transfer lies inside the region, past the info header.
    pub fn check_data_range(&self, offset: u64, len: u64) -> std::result::Result<(), String> {
        match offset.checked_add(len) {
            Some(end) if offset >= INFO_SIZE && end <= self.info.size => Ok(()),
            _ => Err(format!(
                "data range {offset:#x}+{len:#x} lies outside the data section of a {:#x} byte region",
                self.info.size
            )),
        }
    }

    fn mapping_for(&self, offset: u64, len: u64) -> Option<(&Mapping, usize)> {
        self.mapped
            .iter()
            .find(|m| m.area.contains(offset, len))
            .map(|m| (&m.map, (offset - m.area.offset) as usize))
    }

    /// Reads data-section bytes at region-relative `offset`: from the mmap when the range lies
    /// inside a mapped area, with pread otherwise.
    pub fn read_data(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match self.mapping_for(offset, buf.len() as u64) {
            Some((map, at)) => map.read(at, buf),
            None => self.read_exact(offset, buf),
        }
    }

    /// Writes data-section bytes at region-relative `offset`: into the mmap when the range lies
    /// inside a mapped area, with pwrite otherwise.
    pub fn write_data(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        match self.mapping_for(offset, buf.len() as u64) {
            Some((map, at)) => map.write(at, buf),
            None => self.write_exact(offset, buf),
        }
    }
}
