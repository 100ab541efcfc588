// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The PCI shell both mocks share, as vfio-pci lays it out: region `i` at device-fd offset
//! `i << REGION_SHIFT`, BAR0 as plain read/write memory, and the answer to
//! `VFIO_DEVICE_GET_REGION_INFO` (encoded by [`crate::region_info`]).

use std::ops::Range;

use crate::region_info::{read_query, write_answer, Region};

/// Region `i` starts at device-fd offset `i << REGION_SHIFT`, as in vfio-pci
/// (`VFIO_PCI_OFFSET_SHIFT`).
pub const REGION_SHIFT: u32 = 40;
/// Size of BAR0, a read/write scratch region.
pub const BAR0_SIZE: u64 = 4096;

/// BAR0's bytes.
#[derive(Debug, Clone)]
pub struct Bar0(Vec<u8>);

impl Default for Bar0 {
    fn default() -> Self {
        Self(vec![0; BAR0_SIZE as usize])
    }
}

impl Bar0 {
    /// Whether an access at BAR0 offset `offset` starts inside BAR0.
    pub fn holds(offset: u64) -> bool {
        offset < BAR0_SIZE
    }

    /// The bytes an access of `len` at `offset` touches, clipped at BAR0's end (as a pread
    /// past a region's end is short); the caller checked [`Bar0::holds`].
    fn span(len: usize, offset: u64) -> Range<usize> {
        let n = len.min(BAR0_SIZE.saturating_sub(offset) as usize);
        offset as usize..offset as usize + n
    }

    /// Reads at `offset` (which [`Bar0::holds`]); returns the bytes read.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> usize {
        let span = Self::span(buf.len(), offset);
        let n = span.len();
        buf[..n].copy_from_slice(&self.0[span]);
        n
    }

    /// Writes at `offset` (which [`Bar0::holds`]); returns the bytes written.
    pub fn write(&mut self, buf: &[u8], offset: u64) -> usize {
        let span = Self::span(buf.len(), offset);
        let n = span.len();
        self.0[span].copy_from_slice(&buf[..n]);
        n
    }
}

/// Answers the `VFIO_DEVICE_GET_REGION_INFO` query in `buf` with `region(index)`; `Err` says
/// why the query is refused (a malformed query, or no such region).
pub fn answer_region_info(
    buf: &mut [u8],
    region: impl FnOnce(u32) -> Option<Region>,
) -> Result<(), String> {
    let (argsz, index) = read_query(buf)?;
    let found = region(index).ok_or_else(|| format!("no region {index}"))?;
    write_answer(buf, argsz, index, &found);
    Ok(())
}
