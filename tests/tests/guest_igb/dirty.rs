// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Real DMA dirty tracking: the igb VF writes into guest memory by DMA (driven by this
//! project's [`VfTx`]), and VFIO's DMA logging (igb-vfio-pci over the device model's per-range
//! bitmaps) must name exactly the pages it wrote, through vmm-glue's merge into vm-memory's
//! dirty bitmap, as a VMM migrating memory would read them.
//!
//! The oracles: the pages the test told the device to write, each write seen in guest memory
//! (a descriptor's DD bit, a head value over a sentinel); the device model's granularity (it
//! marks every 4 KiB page a DMA write touches, and only writes: `igb_core_dirty_track_dma` in
//! the QEMU patch); the device's `max_ranges` read from its DVSEC in config space; and the
//! rule by which the driver merges ranges beyond it (`vfio_combine_iova_ranges`, Linux 6.12
//! drivers/vfio/vfio_main.c). REPORT needs a kernel with `CONFIG_IOMMUFD_DRIVER`: the igb
//! guest runs the project's own kernel (scripts/guest/ikernel.sh), not Debian's.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use vfio_mig::backend::DeviceIo;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_glue::dirty::{
    merge_dirty, take_dirty, DirtyTracker, DmaLogging, MemoryRange, MemoryRangeTable,
};
use vmm_glue::dma::VmContainer;

use super::vf::{igb_vfs, kernel_lines};
use super::vf_driver::VfTx;

/// The device model's page size (CAPS bit 12: 4 KiB only), which the test asks for too.
const PAGE: u64 = 4096;
/// Six regions of guest memory, 64 KiB each, with gaps of different sizes between them (the
/// smallest two: after region 0 and after region 2), so that more ranges than the device's
/// four are merged in a known order.
const REGIONS: [u64; 6] = [
    0x0010_0000,
    0x0011_1000,
    0x0020_0000,
    0x0021_2000,
    0x0040_0000,
    0x0080_0000,
];
const REGION_LEN: u64 = 0x1_0000;
/// The transmit ring (region 0, page 2) and the packet the device reads (region 2, page 5).
const RING: u64 = 0x0010_2000;
const PACKET: u64 = 0x0020_5000;
const PACKET_LEN: u16 = 60;
/// Where the device writes its head, one descriptor each, in four more regions (one of them
/// the last dword of its page).
const HEAD_WRITES: [u64; 4] = [0x0011_8040, 0x0021_2ffc, 0x0040_9100, 0x0080_f000];
/// What guest memory holds where the device has not written.
const SENTINEL: u32 = 0x5eed_f00d;

/// The config space offset of the migration DVSEC and its CAPS register (the QEMU patch's
/// igb_migration.h; the driver finds it with pci_find_dvsec_capability(pdev, 0x8086, 1)).
const DVSEC: usize = 0x160;
const DVSEC_CAPS: usize = DVSEC + 0x0c;

/// `vfio_combine_iova_ranges` of Linux 6.12 (drivers/vfio/vfio_main.c), which igb-vfio-pci
/// calls when given more ranges than the device's `max_ranges`: with one range wanted, one
/// from the first start to the last end; else, while there are too many, the two neighbours
/// with the smallest gap (`next.start - prev.last`, the first such pair on a tie) become one.
/// Ranges are `(start, last)`, inclusive, sorted.
fn combine_like_vfio(ranges: &[(u64, u64)], want: usize) -> Vec<(u64, u64)> {
    let mut r = ranges.to_vec();
    if want == 1 && !r.is_empty() {
        return vec![(r[0].0, r[r.len() - 1].1)];
    }
    while r.len() > want {
        let mut best = 1;
        for i in 2..r.len() {
            if r[i].0 - r[i - 1].1 < r[best].0 - r[best - 1].1 {
                best = i;
            }
        }
        r[best - 1].1 = r[best].1;
        r.remove(best);
    }
    r
}

/// The device's max_ranges: DVSEC CAPS[11:8], read from the VF's config space in sysfs.
fn max_ranges(vf: &Path) -> usize {
    let config = std::fs::read(vf.join("config")).expect("read the VF's config space");
    assert!(
        config.len() >= DVSEC_CAPS + 4,
        "{}: {} bytes of config space, the DVSEC is at {DVSEC:#x}",
        vf.display(),
        config.len()
    );
    let dword = |at: usize| u32::from_le_bytes(config[at..at + 4].try_into().unwrap());
    // Extended capability header: ID 0x23 (DVSEC); DVSEC header 1: vendor 0x8086.
    assert_eq!(dword(DVSEC) & 0xffff, 0x23, "no DVSEC at {DVSEC:#x}");
    assert_eq!(dword(DVSEC + 4) & 0xffff, 0x8086, "DVSEC vendor");
    ((dword(DVSEC_CAPS) >> 8) & 0xf) as usize
}

/// Guest memory of the six regions (the test DMA-maps it at IOVA = GPA).
fn guest_memory() -> GuestMemoryMmap<AtomicBitmap> {
    let ranges: Vec<(GuestAddress, usize)> = REGIONS
        .iter()
        .map(|&gpa| (GuestAddress(gpa), REGION_LEN as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).expect("guest memory")
}

fn region_ranges() -> Vec<MemoryRange> {
    REGIONS
        .iter()
        .map(|&gpa| MemoryRange {
            gpa,
            length: REGION_LEN,
        })
        .collect()
}

fn read_u32(mem: &GuestMemoryMmap<AtomicBitmap>, gpa: u64) -> u32 {
    mem.read_obj(GuestAddress(gpa))
        .unwrap_or_else(|e| panic!("read guest memory at {gpa:#x}: {e}"))
}

/// The pages of a table, one entry per page.
fn pages(table: &MemoryRangeTable) -> Vec<u64> {
    table
        .ranges
        .iter()
        .flat_map(|r| (r.gpa..r.gpa + r.length).step_by(PAGE as usize))
        .collect()
}

fn hex(pages: &[u64]) -> String {
    let v: Vec<String> = pages.iter().map(|p| format!("{p:#x}")).collect();
    v.join(" ")
}

/// One REPORT of `[iova, iova + length)` straight through the device (not vmm-glue).
fn report(dev: &dyn DeviceIo, iova: u64, length: u64) -> std::io::Result<Vec<u64>> {
    let mut bitmap = vec![0u64; length.div_ceil(PAGE).div_ceil(64) as usize];
    dev.dma_logging_report(iova, length, PAGE, &mut bitmap)
        .map(|()| bitmap)
}

#[test]
fn dma_logging_reports_exactly_the_pages_the_vf_wrote() {
    let [_, vf, _, _] = igb_vfs();
    let max = max_ranges(&vf);
    assert_eq!(
        max, 4,
        "the device model's CAPS[11:8] (IGB_MIG_CAPS_MAX_RANGES)"
    );
    let mem = guest_memory();
    let container = VmContainer::new(None).expect("VFIO container");
    // Opening the VF resets it (function level reset: its queues are disabled).
    let dev: Arc<dyn DeviceIo> = container.open_device(&vf).expect("open the VF");
    // SAFETY: `mem` outlives the mapping (unmapped below, before it is dropped) and is only
    // accessed through vm-memory's volatile accessors while the device may write it.
    unsafe { container.map_guest_memory(&mem) }.expect("DMA-map guest memory");

    let mut tx = VfTx::new(dev.clone()).expect("the VF's registers");
    let reply = tx.reset().expect("reset through the PF mailbox");
    eprintln!("dirty: VF reset through the PF mailbox: {reply:?}");
    tx.start(RING).expect("transmit queue 0");

    // The packet (an Ethernet frame to a local address nobody has, ethertype 0x88b5, for
    // local experiments), the sentinels, and the ring's six descriptors, all written by the
    // test before the device runs; then the test's own writes are taken out of vm-memory's
    // bitmap, as a VMM's vCPU writes would be sent by then.
    let mut frame = vec![0u8; PACKET_LEN as usize];
    frame[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    frame[6..12].copy_from_slice(&reply.mac);
    frame[12..14].copy_from_slice(&[0x88, 0xb5]);
    mem.write_slice(&frame, GuestAddress(PACKET)).unwrap();
    for &at in &HEAD_WRITES {
        mem.write_obj(SENTINEL, GuestAddress(at)).unwrap();
    }
    // Descriptors 0-4 with report status (0: written back in place; 1-4: head write-back
    // instead), descriptor 5 without.
    let descs: Vec<u64> = (0..6)
        .map(|i| tx.queue(&mem, i, PACKET, PACKET_LEN, i < 5).expect("queue"))
        .collect();
    let _ = take_dirty(&mem, PAGE);

    let ranges = region_ranges();
    let mut logging = DmaLogging::new(dev.clone());
    let logged_before = kernel_lines(&vf).len();
    logging.start(&ranges, PAGE).expect("DMA_LOGGING_START");
    let (table, outside) = merge_dirty(&mut logging, &ranges, PAGE, &mem).expect("REPORT");
    assert_eq!(
        (table, outside),
        (MemoryRangeTable::default(), 0),
        "nothing written yet"
    );

    // The device writes: descriptor 0's write-back in the ring's page, then the head into
    // four chosen pages; it reads the packet's page each time, and writes nothing there.
    tx.post().expect("descriptor 0");
    assert!(VfTx::done(&mem, descs[0]).unwrap(), "descriptor 0 has DD");
    for (i, &at) in HEAD_WRITES.iter().enumerate() {
        tx.head_write_back(Some(at)).expect("TDWBAL/TDWBAH");
        tx.post().expect("descriptor");
        let head = read_u32(&mem, at);
        assert_eq!(head, i as u32 + 2, "head written back at {at:#x}");
        assert!(
            !VfTx::done(&mem, descs[i + 1]).unwrap(),
            "no write-back in place"
        );
    }
    tx.head_write_back(None).expect("head write-back off");
    let written: BTreeSet<u64> = std::iter::once(descs[0])
        .chain(HEAD_WRITES)
        .map(|a| a & !(PAGE - 1))
        .collect();
    let written: Vec<u64> = written.into_iter().collect();
    eprintln!("dirty: pages written by the device: {}", hex(&written));

    // vmm-glue's merge: a REPORT per region, into vm-memory's per-region bitmaps.
    let (table, outside) = merge_dirty(&mut logging, &ranges, PAGE, &mem).expect("REPORT");
    eprintln!(
        "dirty: pages reported (DMA_LOGGING_REPORT): {}",
        hex(&pages(&table))
    );
    assert_eq!(outside, 0);
    assert_eq!(
        pages(&table),
        written,
        "REPORT names exactly the written pages"
    );
    let in_bitmap = take_dirty(&mem, PAGE);
    eprintln!(
        "dirty: pages dirty in vm-memory's bitmap: {}",
        hex(&pages(&in_bitmap))
    );
    assert_eq!(
        pages(&in_bitmap),
        written,
        "vm-memory's bitmap carries them"
    );

    // REPORT reads and clears; a descriptor without report status is fetched and its packet
    // read, but nothing is written.
    let (again, _) = merge_dirty(&mut logging, &ranges, PAGE, &mem).expect("REPORT");
    assert_eq!(again, MemoryRangeTable::default(), "the log was cleared");
    tx.post().expect("descriptor 5");
    assert!(!VfTx::done(&mem, descs[5]).unwrap(), "no RS, no write-back");
    let (none, _) = merge_dirty(&mut logging, &ranges, PAGE, &mem).expect("REPORT");
    assert_eq!(none, MemoryRangeTable::default(), "reads are not logged");
    assert_eq!(take_dirty(&mem, PAGE), MemoryRangeTable::default());

    // Six ranges for a device of four: merged by the driver's rule, as its debug lines say,
    // and as REPORT shows (a page in a merged gap is inside a tracked range, one in an
    // unmerged gap is not).
    let asked: Vec<(u64, u64)> = REGIONS.iter().map(|&g| (g, g + REGION_LEN - 1)).collect();
    let merged = combine_like_vfio(&asked, max);
    let lines: Vec<String> = kernel_lines(&vf)[logged_before..]
        .iter()
        .filter(|l| l.contains("dirty range["))
        .cloned()
        .collect();
    let shown: Vec<String> = merged
        .iter()
        .map(|(start, last)| format!("{start:#x}-{last:#x}"))
        .collect();
    eprintln!(
        "dirty: {} ranges asked, max_ranges {max}, vfio_combine_iova_ranges gives: {}",
        asked.len(),
        shown.join(" ")
    );
    for line in &lines {
        eprintln!("dirty: {line}");
    }
    assert_eq!(lines.len(), merged.len(), "{lines:#?}");
    for (i, (line, (start, last))) in lines.iter().zip(&merged).enumerate() {
        let want = format!(
            "dirty range[{i}]: iova={start:#x} size={:#x} pgsize={PAGE}",
            last - start + 1
        );
        assert!(line.contains(&want), "{line} lacks {want}");
    }
    let merged_gap = REGIONS[0] + REGION_LEN;
    assert!(merged
        .iter()
        .any(|&(s, l)| s <= merged_gap && merged_gap <= l));
    let bits = report(dev.as_ref(), merged_gap, PAGE).expect("REPORT in a merged gap");
    assert_eq!(bits, vec![0], "nothing written in the gap");
    let open_gap = REGIONS[1] + REGION_LEN;
    let err = report(dev.as_ref(), open_gap, PAGE).expect_err("REPORT outside the ranges");
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");

    logging.stop().expect("DMA_LOGGING_STOP");
    tx.stop().expect("stop the queue");
    container
        .unmap_guest_memory(&mem)
        .expect("unmap guest memory");
}

#[test]
fn combine_like_vfio_joins_the_smallest_gaps_first() {
    // The rule itself, on ranges whose answer is worked out by hand: gaps 0x1001, 0xdf001,
    // 0x2001, 0x1de001, 0x3f0001 -> the first and the third are closed.
    let asked: Vec<(u64, u64)> = REGIONS.iter().map(|&g| (g, g + REGION_LEN - 1)).collect();
    assert_eq!(
        combine_like_vfio(&asked, 4),
        vec![
            (0x10_0000, 0x12_0fff),
            (0x20_0000, 0x22_1fff),
            (0x40_0000, 0x40_ffff),
            (0x80_0000, 0x80_ffff),
        ]
    );
    assert_eq!(combine_like_vfio(&asked, 1), vec![(0x10_0000, 0x80_ffff)]);
    assert_eq!(combine_like_vfio(&asked, 6), asked);
}
