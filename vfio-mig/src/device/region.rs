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
pub const MAX_REGION_INFO_SIZE: u32 = 64 * 1024;
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
pub fn parse_region_info(index: u32, buf: &[u8]) -> io::Result<RegionInfo> {
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

/// Encodes a region-info answer the way the kernel does (`vfio_info_add_capability`): header,
/// then each capability 8-byte aligned and linked by offset. Used by the mock device, so the
/// parser above runs on exactly the bytes a kernel would produce. If `buf` is too small for the
/// chain, only `argsz` is raised and `VFIO_REGION_INFO_FLAG_CAPS` set, as the kernel does.
pub fn encode_region_info(buf: &mut [u8], info: &RegionInfo) -> io::Result<()> {
    let header = size_of::<vfio_region_info>();
    let mut chain: Vec<u8> = Vec::new();
    let mut offsets = Vec::new();
    for cap in &info.caps {
        // Capabilities start 8-byte aligned, as in the kernel.
        while (header + chain.len()) % 8 != 0 {
            chain.push(0);
        }
        offsets.push(header + chain.len());
        let start = chain.len();
        match cap {
            RegionCap::Type {
                region_type,
                subtype,
            } => {
                let c = vfio_region_info_cap_type {
                    header: vfio_info_cap_header {
                        id: VFIO_REGION_INFO_CAP_TYPE as u16,
                        version: 1,
                        next: 0,
                    },
                    type_: *region_type,
                    subtype: *subtype,
                };
                chain.resize(start + size_of::<vfio_region_info_cap_type>(), 0);
                write_pod(&mut chain, start, &c);
            }
            RegionCap::SparseMmap(areas) => {
                let c = vfio_info_cap_header {
                    id: VFIO_REGION_INFO_CAP_SPARSE_MMAP as u16,
                    version: 1,
                    next: 0,
                };
                let area_size = size_of::<vfio_region_sparse_mmap_area>();
                let fixed = size_of::<vfio_region_info_cap_sparse_mmap>();
                chain.resize(start + fixed + areas.len() * area_size, 0);
                write_pod(&mut chain, start, &c);
                write_pod(
                    &mut chain,
                    start + size_of::<vfio_info_cap_header>(),
                    &(areas.len() as u32),
                );
                for (i, a) in areas.iter().enumerate() {
                    let area = vfio_region_sparse_mmap_area {
                        offset: a.offset,
                        size: a.size,
                    };
                    write_pod(&mut chain, start + fixed + i * area_size, &area);
                }
            }
            RegionCap::Other { id, version } => {
                let c = vfio_info_cap_header {
                    id: *id,
                    version: *version,
                    next: 0,
                };
                chain.resize(start + size_of::<vfio_info_cap_header>(), 0);
                write_pod(&mut chain, start, &c);
            }
        }
    }
    // Link each capability to the next (offsets are from the start of the whole buffer).
    for pair in offsets.windows(2) {
        let at = pair[0] - header;
        let mut h: vfio_info_cap_header = read_pod(&chain, at).expect("written above");
        h.next = pair[1] as u32;
        write_pod(&mut chain, at, &h);
    }
    let query: vfio_region_info =
        read_pod(buf, 0).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let needed = (header + chain.len()) as u32;
    let mut answer = vfio_region_info {
        argsz: query.argsz,
        flags: info.flags,
        index: info.index,
        cap_offset: 0,
        size: info.size,
        offset: info.offset,
    };
    if !info.caps.is_empty() {
        answer.flags |= VFIO_REGION_INFO_FLAG_CAPS;
        if (query.argsz as usize) < needed as usize || buf.len() < needed as usize {
            answer.argsz = needed;
        } else {
            answer.cap_offset = header as u32;
            buf[header..needed as usize].copy_from_slice(&chain);
        }
    }
    write_pod(buf, 0, &answer);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RegionInfo {
        RegionInfo {
            index: 9,
            flags: 3,
            size: 0x20_0000,
            offset: 9 << 40,
            caps: vec![
                RegionCap::SparseMmap(vec![SparseArea {
                    offset: 0x1000,
                    size: 0x10_0000,
                }]),
                RegionCap::Type {
                    region_type: 3,
                    subtype: 1,
                },
            ],
        }
    }

    #[test]
    fn encode_then_parse_round_trips() {
        let info = sample();
        let header = size_of::<vfio_region_info>();
        let mut small = vec![0u8; header];
        write_pod(
            &mut small,
            0,
            &vfio_region_info {
                argsz: header as u32,
                index: 9,
                ..Default::default()
            },
        );
        encode_region_info(&mut small, &info).unwrap();
        let answer: vfio_region_info = read_pod(&small, 0).unwrap();
        assert!(
            answer.argsz as usize > small.len(),
            "short buffer must ask for more"
        );
        assert_eq!(answer.cap_offset, 0);

        let mut full = vec![0u8; answer.argsz as usize];
        write_pod(
            &mut full,
            0,
            &vfio_region_info {
                argsz: answer.argsz,
                index: 9,
                ..Default::default()
            },
        );
        encode_region_info(&mut full, &info).unwrap();
        let parsed = parse_region_info(9, &full).unwrap();
        assert_eq!(parsed.caps, info.caps);
        assert_eq!(parsed.region_type(), Some((3, 1)));
        assert_eq!(parsed.sparse_areas().unwrap()[0].offset, 0x1000);
        assert_eq!(parsed.flags, 3 | VFIO_REGION_INFO_FLAG_CAPS);
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
