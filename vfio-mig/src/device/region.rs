// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Region information and its capability chain.
//!
//! `VFIO_DEVICE_GET_REGION_INFO` returns a `vfio_region_info` followed, when
//! `VFIO_REGION_INFO_FLAG_CAPS` is set, by a chain of capabilities linked by byte offsets from
//! the start of the buffer. We walk that chain ourselves (vfio-ioctls only parses it into a list
//! keyed by position, which shifts when a region query fails) and bound every step, since the
//! offsets come from a driver.

use std::io;
use std::mem::size_of;

use vfio_bindings::bindings::vfio::{
    vfio_info_cap_header, vfio_region_info, vfio_region_info_cap_sparse_mmap,
    vfio_region_info_cap_type, vfio_region_sparse_mmap_area, VFIO_REGION_INFO_CAP_SPARSE_MMAP,
    VFIO_REGION_INFO_CAP_TYPE, VFIO_REGION_INFO_FLAG_CAPS,
};

use super::pod::{read_pod, write_pod};
use super::DeviceIo;

/// Largest region-info buffer we accept from a driver: far above any real chain.
pub(crate) const MAX_REGION_INFO_SIZE: u32 = 64 * 1024;
/// Most capabilities we follow in one chain, so a looping chain cannot hang us.
const MAX_CAPS: usize = 64;
/// Most sparse-mmap areas we accept in one capability.
const MAX_SPARSE_AREAS: u32 = 1024;

/// One mmappable area of a region, relative to the region's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparseArea {
    /// Offset from the start of the region.
    pub offset: u64,
    /// Length in bytes.
    pub size: u64,
}

impl SparseArea {
    /// Whether `[offset, offset + len)` (region-relative) lies inside this area.
    pub fn contains(&self, offset: u64, len: u64) -> bool {
        offset >= self.offset
            && offset
                .checked_add(len)
                .is_some_and(|end| end <= self.offset.saturating_add(self.size))
    }
}

/// A capability from a region's chain that the migration code understands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegionCap {
    /// `VFIO_REGION_INFO_CAP_TYPE`: a device-specific region's type and subtype.
    Type {
        /// Region type (3 is migration).
        region_type: u32,
        /// Region subtype (1 is the v1 migration region).
        subtype: u32,
    },
    /// `VFIO_REGION_INFO_CAP_SPARSE_MMAP`: the parts of the region that may be mmapped.
    SparseMmap(Vec<SparseArea>),
    /// Any other capability, kept by id and version so `probe` can list it.
    Other {
        /// Capability id.
        id: u16,
        /// Capability version.
        version: u16,
    },
}

/// A region's information, capabilities included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionInfo {
    /// The region index this information was queried with.
    pub index: u32,
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// Region size in bytes.
    pub size: u64,
    /// Offset of the region within the device fd.
    pub offset: u64,
    /// The capability chain, in chain order.
    pub caps: Vec<RegionCap>,
}

impl RegionInfo {
    /// The type/subtype capability, if present.
    pub fn region_type(&self) -> Option<(u32, u32)> {
        self.caps.iter().find_map(|c| match c {
            RegionCap::Type {
                region_type,
                subtype,
            } => Some((*region_type, *subtype)),
            _ => None,
        })
    }

    /// The sparse-mmap areas, if the region has that capability.
    pub fn sparse_areas(&self) -> Option<&[SparseArea]> {
        self.caps.iter().find_map(|c| match c {
            RegionCap::SparseMmap(areas) => Some(areas.as_slice()),
            _ => None,
        })
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Queries region `index`, growing the buffer once if the chain does not fit, and parses it.
pub fn query_region(dev: &dyn DeviceIo, index: u32) -> io::Result<RegionInfo> {
    let header = size_of::<vfio_region_info>() as u32;
    let mut argsz = header;
    // The kernel answers a short buffer with the size it needs; a driver that keeps asking for
    // more after we grew the buffer is broken, so two rounds are enough.
    for _ in 0..2 {
        let mut buf = vec![0u8; argsz as usize];
        let query = vfio_region_info {
            argsz,
            index,
            ..Default::default()
        };
        write_pod(&mut buf, 0, &query);
        dev.region_info_raw(&mut buf)?;
        let info: vfio_region_info = read_pod(&buf, 0).expect("buffer holds the header");
        if info.argsz > argsz {
            if info.argsz > MAX_REGION_INFO_SIZE {
                return Err(invalid(format!(
                    "region {index}: driver asks for a {} byte info buffer",
                    info.argsz
                )));
            }
            argsz = info.argsz;
            continue;
        }
        return parse_region_info(index, &buf);
    }
    Err(invalid(format!(
        "region {index}: info buffer size keeps growing"
    )))
}

/// Parses a filled region-info buffer (header and capability chain).
pub(crate) fn parse_region_info(index: u32, buf: &[u8]) -> io::Result<RegionInfo> {
    let info: vfio_region_info =
        read_pod(buf, 0).ok_or_else(|| invalid(format!("region {index}: short region info")))?;
    let mut caps = Vec::new();
    if info.flags & VFIO_REGION_INFO_FLAG_CAPS != 0 && info.cap_offset != 0 {
        let header = size_of::<vfio_region_info>();
        let mut next = info.cap_offset as usize;
        while next != 0 {
            if caps.len() == MAX_CAPS {
                return Err(invalid(format!(
                    "region {index}: capability chain longer than {MAX_CAPS}"
                )));
            }
            // A capability lives after the fixed header; an offset pointing back into the
            // header (or at itself, or backwards) could loop, so require forward progress.
            if next < header {
                return Err(invalid(format!(
                    "region {index}: capability offset {next} inside the header"
                )));
            }
            let cap_header: vfio_info_cap_header = read_pod(buf, next).ok_or_else(|| {
                invalid(format!(
                    "region {index}: capability at {next} out of bounds"
                ))
            })?;
            caps.push(parse_cap(index, buf, next, &cap_header)?);
            let following = cap_header.next as usize;
            if following != 0 && following <= next {
                return Err(invalid(format!(
                    "region {index}: capability chain goes backwards ({next} -> {following})"
                )));
            }
            next = following;
        }
    }
    Ok(RegionInfo {
        index,
        flags: info.flags,
        size: info.size,
        offset: info.offset,
        caps,
    })
}

fn parse_cap(
    index: u32,
    buf: &[u8],
    at: usize,
    header: &vfio_info_cap_header,
) -> io::Result<RegionCap> {
    match u32::from(header.id) {
        VFIO_REGION_INFO_CAP_TYPE => {
            let cap: vfio_region_info_cap_type = read_pod(buf, at)
                .ok_or_else(|| invalid(format!("region {index}: truncated type capability")))?;
            Ok(RegionCap::Type {
                region_type: cap.type_,
                subtype: cap.subtype,
            })
        }
        VFIO_REGION_INFO_CAP_SPARSE_MMAP => {
            // The fixed part is the header followed by `nr_areas` and a reserved u32; the
            // struct itself ends in a flexible array, so read its counter directly.
            let nr_areas: u32 =
                read_pod(buf, at + size_of::<vfio_info_cap_header>()).ok_or_else(|| {
                    invalid(format!("region {index}: truncated sparse-mmap capability"))
                })?;
            if nr_areas > MAX_SPARSE_AREAS {
                return Err(invalid(format!(
                    "region {index}: {nr_areas} sparse-mmap areas"
                )));
            }
            let first = at + size_of::<vfio_region_info_cap_sparse_mmap>();
            let areas = (0..nr_areas as usize)
                .map(|i| {
                    let off = first + i * size_of::<vfio_region_sparse_mmap_area>();
                    read_pod::<vfio_region_sparse_mmap_area>(buf, off)
                        .map(|a| SparseArea {
                            offset: a.offset,
                            size: a.size,
                        })
                        .ok_or_else(|| {
                            invalid(format!(
                                "region {index}: sparse-mmap area {i} out of bounds"
                            ))
                        })
                })
                .collect::<io::Result<Vec<_>>>()?;
            Ok(RegionCap::SparseMmap(areas))
        }
        _ => Ok(RegionCap::Other {
            id: header.id,
            version: header.version,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel's answer for a v1 migration region, written out by hand from the vfio.h
    /// layouts: header (cap_offset 32), TYPE 3/1 linked to a SPARSE_MMAP with one area.
    #[rustfmt::skip]
    const KERNEL_ANSWER: [u8; 80] = [
        80, 0, 0, 0,  0x0f, 0, 0, 0,  9, 0, 0, 0,  32, 0, 0, 0,
        0, 0, 0x20, 0, 0, 0, 0, 0,    0, 0, 0, 0, 0, 0x09, 0, 0,
        2, 0, 1, 0,  48, 0, 0, 0,  3, 0, 0, 0,  1, 0, 0, 0,
        1, 0, 1, 0,  0, 0, 0, 0,  1, 0, 0, 0,  0, 0, 0, 0,
        0, 0x10, 0, 0, 0, 0, 0, 0,  0, 0, 0x10, 0, 0, 0, 0, 0,
    ];

    #[test]
    fn a_kernel_chain_parses() {
        let parsed = parse_region_info(9, &KERNEL_ANSWER).unwrap();
        assert_eq!(
            parsed.caps,
            vec![
                RegionCap::Type {
                    region_type: 3,
                    subtype: 1
                },
                RegionCap::SparseMmap(vec![SparseArea {
                    offset: 0x1000,
                    size: 0x10_0000,
                }]),
            ]
        );
        assert_eq!(parsed.region_type(), Some((3, 1)));
        assert_eq!((parsed.size, parsed.offset), (0x20_0000, 9 << 40));
        assert_eq!(parsed.flags, 7 | VFIO_REGION_INFO_FLAG_CAPS);
    }

    #[test]
    fn looping_chain_is_refused() {
        let mut buf = vec![0u8; 64];
        write_pod(
            &mut buf,
            0,
            &vfio_region_info {
                argsz: 64,
                flags: VFIO_REGION_INFO_FLAG_CAPS,
                cap_offset: 32,
                ..Default::default()
            },
        );
        // A capability that points at itself.
        write_pod(
            &mut buf,
            32,
            &vfio_info_cap_header {
                id: 99,
                version: 1,
                next: 32,
            },
        );
        let err = parse_region_info(0, &buf).unwrap_err();
        assert!(err.to_string().contains("backwards"), "{err}");
    }

    #[test]
    fn truncated_sparse_areas_are_refused() {
        let mut buf = vec![0u8; 48];
        write_pod(
            &mut buf,
            0,
            &vfio_region_info {
                argsz: 48,
                flags: VFIO_REGION_INFO_FLAG_CAPS,
                cap_offset: 32,
                ..Default::default()
            },
        );
        write_pod(
            &mut buf,
            32,
            &vfio_info_cap_header {
                id: VFIO_REGION_INFO_CAP_SPARSE_MMAP as u16,
                version: 1,
                next: 0,
            },
        );
        write_pod(&mut buf, 40, &4u32);
        let err = parse_region_info(0, &buf).unwrap_err();
        assert!(err.to_string().contains("out of bounds"), "{err}");
    }

    #[test]
    fn sparse_area_containment() {
        let a = SparseArea {
            offset: 4096,
            size: 8192,
        };
        assert!(a.contains(4096, 8192));
        assert!(a.contains(8192, 10));
        assert!(!a.contains(4095, 2));
        assert!(!a.contains(4096, 8193));
        assert!(!a.contains(u64::MAX, 2));
    }
}
