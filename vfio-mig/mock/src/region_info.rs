// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The mock's own answer to `VFIO_DEVICE_GET_REGION_INFO`, written byte by byte from the uAPI
//! (`include/uapi/linux/vfio.h`) and the kernel's capability chain builder
//! (`vfio_info_cap_add` / `vfio_info_cap_shift` in `drivers/vfio/vfio_main.c`, and the
//! `argsz` handling of vfio-pci's `VFIO_DEVICE_GET_REGION_INFO`), never with the driver
//! crate's encoder or parser: a mistake the two shared would be invisible.
//!
//! Layouts (little endian, offsets in bytes):
//!
//! ```text
//! vfio_region_info     argsz u32 @0, flags u32 @4, index u32 @8, cap_offset u32 @12,
//!                      size u64 @16, offset u64 @24                       (32 bytes)
//! vfio_info_cap_header id u16 @0, version u16 @2, next u32 @4              (8 bytes)
//! cap TYPE (id 2, v1)  header, type u32 @8, subtype u32 @12                (16 bytes)
//! cap SPARSE_MMAP (1, v1) header, nr_areas u32 @8, reserved u32 @12,
//!                      then nr_areas x { offset u64, size u64 }            (16 + 16 n bytes)
//! ```
//!
//! The kernel appends each capability at the chain's end rounded up to 8 bytes, links the
//! previous one's `next` to it, and shifts every offset by the 32-byte header when it copies
//! the chain behind it. When `argsz` cannot hold header and chain it only raises `argsz`,
//! sets `VFIO_REGION_INFO_FLAG_CAPS` and leaves `cap_offset` 0.

/// `VFIO_REGION_INFO_FLAG_CAPS`.
const FLAG_CAPS: u32 = 1 << 3;
/// `sizeof(struct vfio_region_info)`.
pub const HEADER: usize = 32;
/// `VFIO_REGION_INFO_CAP_SPARSE_MMAP`.
const CAP_SPARSE_MMAP: u16 = 1;
/// `VFIO_REGION_INFO_CAP_TYPE`.
const CAP_TYPE: u16 = 2;

/// One mmappable part of a region, relative to the region's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Area {
    /// Offset from the region's start.
    pub offset: u64,
    /// Length in bytes.
    pub size: u64,
}

impl Area {
    /// Whether `[offset, offset + len)` lies inside this area.
    pub fn contains(&self, offset: u64, len: u64) -> bool {
        let end = self.offset.saturating_add(self.size);
        offset >= self.offset && offset.checked_add(len).is_some_and(|e| e <= end)
    }
}

/// A capability the mock puts in a region's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cap {
    /// `VFIO_REGION_INFO_CAP_TYPE`.
    Type {
        /// Region type.
        region_type: u32,
        /// Region subtype.
        subtype: u32,
    },
    /// `VFIO_REGION_INFO_CAP_SPARSE_MMAP`.
    SparseMmap(Vec<Area>),
}

impl Cap {
    /// The capability's bytes, its `next` left 0.
    fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        let (id, body): (u16, Vec<u8>) = match self {
            Cap::Type {
                region_type,
                subtype,
            } => (
                CAP_TYPE,
                [*region_type, *subtype].map(u32::to_le_bytes).concat(),
            ),
            Cap::SparseMmap(areas) => {
                let mut body = (areas.len() as u32).to_le_bytes().to_vec();
                body.extend_from_slice(&0u32.to_le_bytes());
                for a in areas {
                    body.extend_from_slice(&a.offset.to_le_bytes());
                    body.extend_from_slice(&a.size.to_le_bytes());
                }
                (CAP_SPARSE_MMAP, body)
            }
        };
        b.extend_from_slice(&id.to_le_bytes());
        b.extend_from_slice(&1u16.to_le_bytes()); // version 1 of both
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&body);
        b
    }
}

/// What the device says about one region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    /// `VFIO_REGION_INFO_FLAG_*` (without CAPS, which the chain sets).
    pub flags: u32,
    /// Size in bytes.
    pub size: u64,
    /// Offset within the device fd.
    pub offset: u64,
    /// The capability chain, in order.
    pub caps: Vec<Cap>,
}

/// The caller's `argsz` and `index` from a query buffer, or why it is refused (EINVAL in
/// the kernel: `argsz` below the 32-byte header; here also an `argsz` beyond the buffer, the
/// caller's memory).
pub fn read_query(buf: &[u8]) -> Result<(u32, u32), String> {
    let word = |at: usize| {
        buf.get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    let (Some(argsz), Some(index)) = (word(0), word(8)) else {
        return Err(format!(
            "region info buffer of {} bytes, shorter than vfio_region_info",
            buf.len()
        ));
    };
    if (argsz as usize) < HEADER || argsz as usize > buf.len() {
        return Err(format!(
            "region info argsz {argsz} with a {} byte buffer",
            buf.len()
        ));
    }
    Ok((argsz, index))
}

/// Fills `buf` (whose first `argsz` bytes the caller offered, as checked by [`read_query`])
/// with `region`'s answer as the kernel writes it.
pub fn write_answer(buf: &mut [u8], argsz: u32, index: u32, region: &Region) {
    let mut chain: Vec<u8> = Vec::new();
    let mut last: Option<usize> = None;
    for cap in &region.caps {
        chain.resize(chain.len().next_multiple_of(8), 0);
        let at = chain.len();
        if let Some(prev) = last {
            let next = (HEADER + at) as u32;
            chain[prev + 4..prev + 8].copy_from_slice(&next.to_le_bytes());
        }
        chain.extend_from_slice(&cap.bytes());
        last = Some(at);
    }
    chain.resize(chain.len().next_multiple_of(8), 0);
    let (mut flags, mut answer_argsz, mut cap_offset) = (region.flags, argsz, 0u32);
    if !chain.is_empty() {
        flags |= FLAG_CAPS;
        let needed = HEADER + chain.len();
        if (argsz as usize) < needed {
            answer_argsz = needed as u32;
        } else {
            cap_offset = HEADER as u32;
            buf[HEADER..needed].copy_from_slice(&chain);
        }
    }
    let mut header = Vec::with_capacity(HEADER);
    for w in [answer_argsz, flags, index, cap_offset] {
        header.extend_from_slice(&w.to_le_bytes());
    }
    header.extend_from_slice(&region.size.to_le_bytes());
    header.extend_from_slice(&region.offset.to_le_bytes());
    buf[..HEADER].copy_from_slice(&header);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(argsz: u32, index: u32, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        b[0..4].copy_from_slice(&argsz.to_le_bytes());
        b[8..12].copy_from_slice(&index.to_le_bytes());
        b
    }

    /// A migration region as the v5.8 uAPI describes one: type 3 / subtype 1, and a data
    /// section at 4096 that may be mmapped. Expected bytes written out by hand from the
    /// layouts in vfio.h (and 8-byte aligned chaining of vfio_info_cap_add).
    #[test]
    fn the_chain_is_laid_out_as_the_kernel_lays_it_out() {
        let region = Region {
            flags: 0x7,
            size: 0x2000,
            offset: 10 << 40,
            caps: vec![
                Cap::Type {
                    region_type: 3,
                    subtype: 1,
                },
                Cap::SparseMmap(vec![Area {
                    offset: 0x1000,
                    size: 0x1000,
                }]),
            ],
        };
        let mut buf = query(32, 10, 32);
        let (argsz, index) = read_query(&buf).unwrap();
        write_answer(&mut buf, argsz, index, &region);
        #[rustfmt::skip]
        let short: [u8; 32] = [
            80, 0, 0, 0,  0x0f, 0, 0, 0,  10, 0, 0, 0,  0, 0, 0, 0,
            0, 0x20, 0, 0, 0, 0, 0, 0,    0, 0, 0, 0, 0, 0x0a, 0, 0,
        ];
        assert_eq!(buf, short, "a short argsz only learns the size needed");
        let mut buf = query(80, 10, 80);
        write_answer(&mut buf, 80, 10, &region);
        #[rustfmt::skip]
        let full: [u8; 80] = [
            80, 0, 0, 0,  0x0f, 0, 0, 0,  10, 0, 0, 0,  32, 0, 0, 0,
            0, 0x20, 0, 0, 0, 0, 0, 0,    0, 0, 0, 0, 0, 0x0a, 0, 0,
            // TYPE: id 2, version 1, next 48; type 3, subtype 1
            2, 0, 1, 0,  48, 0, 0, 0,  3, 0, 0, 0,  1, 0, 0, 0,
            // SPARSE_MMAP: id 1, version 1, next 0; nr_areas 1, reserved; {0x1000, 0x1000}
            1, 0, 1, 0,  0, 0, 0, 0,  1, 0, 0, 0,  0, 0, 0, 0,
            0, 0x10, 0, 0, 0, 0, 0, 0,  0, 0x10, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(buf, full);
    }

    #[test]
    fn a_region_without_caps_has_no_caps_flag_and_keeps_argsz() {
        let region = Region {
            flags: 3,
            size: 4096,
            offset: 0,
            caps: vec![],
        };
        let mut buf = query(40, 0, 40);
        write_answer(&mut buf, 40, 0, &region);
        assert_eq!(
            buf[0..16],
            [40, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn bad_queries_are_refused() {
        assert!(read_query(&[0u8; 8]).is_err());
        assert!(read_query(&query(31, 0, 32)).is_err());
        assert!(read_query(&query(64, 0, 32)).is_err());
        assert_eq!(read_query(&query(32, 7, 32)), Ok((32, 7)));
    }

    #[test]
    fn areas_contain_only_what_lies_inside() {
        let a = Area {
            offset: 4096,
            size: 8192,
        };
        assert!(a.contains(4096, 8192) && a.contains(8192, 10));
        assert!(!a.contains(4095, 2) && !a.contains(4096, 8193) && !a.contains(u64::MAX, 2));
    }
}
