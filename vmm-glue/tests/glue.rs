// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vmm-glue on the host: dirty-bitmap merging against known patterns, the VMM traits over mock
//! devices, and the KVM VFIO device where /dev/kvm answers.

use std::os::unix::net::UnixStream;

use vfio_mig::Backend;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_glue::dirty::{merge_dirty, take_dirty, DirtyTracker, MemoryRange, MemoryRangeTable};
use vmm_glue::{Migratable, Pausable, Snapshottable, VfioMigratable};

const PAGE: u64 = 4096;

fn guest_memory() -> GuestMemoryMmap<AtomicBitmap> {
    // Two regions with a hole between them, as a VMM lays out low and high memory.
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 64 * PAGE as usize),
        (GuestAddress(0x1_0000_0000), 32 * PAGE as usize),
    ])
    .unwrap()
}

/// The destination side of a migration over a socket pair: `dst` restores from one end on a
/// thread of its own; the other end is the source's stream.
fn restore_in_background(
    mut dst: VfioMigratable,
) -> (UnixStream, std::thread::JoinHandle<vmm_glue::Result<()>>) {
    let (tx, mut rx) = UnixStream::pair().unwrap();
    (tx, std::thread::spawn(move || dst.restore(&mut rx)))
}

#[test]
fn bitmap_words_become_merged_ranges() {
    // Pages 0-2, 5, 63-64 (across a word boundary) and 130.
    let mut words = vec![0u64; 3];
    for p in [0u64, 1, 2, 5, 63, 64, 130] {
        words[(p / 64) as usize] |= 1 << (p % 64);
    }
    let table = MemoryRangeTable::from_bitmap(&words, 0x1000_0000, PAGE);
    let got: Vec<(u64, u64)> = table
        .ranges
        .iter()
        .map(|r| (r.gpa, r.length / PAGE))
        .collect();
    assert_eq!(
        got,
        vec![
            (0x1000_0000, 3),
            (0x1000_0000 + 5 * PAGE, 1),
            (0x1000_0000 + 63 * PAGE, 2),
            (0x1000_0000 + 130 * PAGE, 1)
        ]
    );
    assert_eq!(table.bytes(), 7 * PAGE);
}

/// A tracker that reports fixed pages (relative to each range's start) once, then nothing,
/// and records the ranges it was asked for.
struct FixedTracker {
    pages: Vec<u64>,
    asked: Vec<(MemoryRange, u64)>,
}

impl DirtyTracker for FixedTracker {
    fn start(&mut self, _ranges: &[MemoryRange], _page_size: u64) -> vmm_glue::Result<()> {
        Ok(())
    }
    fn report(&mut self, range: MemoryRange, page_size: u64) -> vmm_glue::Result<Vec<u64>> {
        self.asked.push((range, page_size));
        let mut words = vec![0u64; (range.length / page_size).div_ceil(64) as usize];
        for p in std::mem::take(&mut self.pages) {
            words[(p / 64) as usize] |= 1 << (p % 64);
        }
        Ok(words)
    }
    fn stop(&mut self) -> vmm_glue::Result<()> {
        Ok(())
    }
}

#[test]
fn merge_dirty_reads_every_range_into_guest_memory() {
    let mem = guest_memory();
    let ranges = [
        MemoryRange {
            gpa: 0,
            length: 64 * PAGE,
        },
        MemoryRange {
            gpa: 0x1_0000_0000,
            length: 32 * PAGE,
        },
    ];
    // Pages 1 and 63 of the first range; the tracker has nothing for the second.
    let mut tracker = FixedTracker {
        pages: vec![1, 63],
        asked: Vec::new(),
    };
    let (table, outside) = merge_dirty(&mut tracker, &ranges, PAGE, &mem).unwrap();
    assert_eq!(outside, 0);
    assert_eq!(
        tracker.asked,
        vec![(ranges[0], PAGE), (ranges[1], PAGE)],
        "every range, in order"
    );
    let want = MemoryRangeTable {
        ranges: vec![
            MemoryRange {
                gpa: PAGE,
                length: PAGE,
            },
            MemoryRange {
                gpa: 63 * PAGE,
                length: PAGE,
            },
        ],
    };
    assert_eq!(table, want);
    assert_eq!(take_dirty(&mem, PAGE), want, "vm-memory's bitmap");
}

#[test]
fn device_dirty_pages_merge_into_guest_memory_bitmaps() {
    let mem = guest_memory();
    // A device report covering the end of the low region and the start of the high one, as
    // two ranges, plus one page outside guest memory (in the hole).
    let table = MemoryRangeTable {
        ranges: vec![
            MemoryRange {
                gpa: 62 * PAGE,
                length: 2 * PAGE,
            },
            MemoryRange {
                gpa: 0x1_0000_0000 + 3 * PAGE,
                length: 3 * PAGE,
            },
            MemoryRange {
                gpa: 0x8000_0000,
                length: PAGE,
            },
        ],
    };
    let outside = table.mark_dirty(&mem);
    assert_eq!(outside, 1, "the page in the hole is reported, not marked");
    // vCPU writes through vm-memory mark the same bitmaps (as KVM's merged log would).
    use vm_memory::Bytes;
    mem.write_obj(0xabu8, GuestAddress(10 * PAGE + 7)).unwrap();
    let dirty = take_dirty(&mem, PAGE);
    let got: Vec<(u64, u64)> = dirty
        .ranges
        .iter()
        .map(|r| (r.gpa, r.length / PAGE))
        .collect();
    assert_eq!(
        got,
        vec![
            (10 * PAGE, 1),
            (62 * PAGE, 2),
            (0x1_0000_0000 + 3 * PAGE, 3)
        ]
    );
    assert!(
        take_dirty(&mem, PAGE).ranges.is_empty(),
        "taking the log clears it"
    );
}

#[test]
fn snapshot_and_restore_through_the_traits() {
    let spec = "mock:v1,size=2M,seed=21,chunk=64K";
    let mut src = VfioMigratable::new(
        "nic0",
        vfio_mig_mock::open_named(spec, Backend::Auto).unwrap().0,
    );
    let (dst_dev, dst_dev_mock) = vfio_mig_mock::open_named(spec, Backend::Auto).unwrap();
    let dst_handle = dst_dev_mock.unwrap();
    let mut dst = VfioMigratable::new("nic0", dst_dev);
    let mut bytes = Vec::new();
    let sent = src.snapshot(&mut bytes).unwrap();
    assert!(sent >= 2 << 20);
    dst.restore(&mut bytes.as_slice()).unwrap();
    assert!(dst_handle.status().resumed_ok);
    // pause/resume map to STOP/RUNNING.
    dst.pause().unwrap();
    assert_eq!(dst_handle.status().state_raw & 7, 0);
    dst.resume().unwrap();
    assert_eq!(dst_handle.status().state_raw & 7, 1);
}

#[test]
fn live_migration_through_the_traits() {
    let spec = "mock:v1,size=4M,seed=5,chunk=256K,dirty-rate=32M";
    let (src_dev, src_dev_mock) = vfio_mig_mock::open_named(spec, Backend::Auto).unwrap();
    let src_handle = src_dev_mock.unwrap();
    let mut src = VfioMigratable::new("gpu0", src_dev);
    let (dst_dev, dst_dev_mock) = vfio_mig_mock::open_named(spec, Backend::Auto).unwrap();
    let dst_handle = dst_dev_mock.unwrap();
    let dst = VfioMigratable::new("gpu0", dst_dev);
    let (tx, restorer) = restore_in_background(dst);
    src.begin_send(Box::new(tx)).unwrap();
    src.start_migration().unwrap();
    let mut rounds = 0;
    loop {
        let round = src.precopy_round().unwrap();
        rounds += 1;
        if round.estimate.pending < (64 << 10) || rounds == 10 {
            break;
        }
    }
    src.pause().unwrap();
    src.complete_migration().unwrap();
    restorer.join().unwrap().unwrap();
    assert!(src.finish_migration().unwrap().is_empty());
    assert!(dst_handle.status().resumed_ok);
    assert_eq!(src_handle.state_digest(), dst_handle.state_digest());
}

#[test]
fn failed_live_migration_rolls_the_source_back() {
    let spec = "mock:v1,size=1M,seed=5,chunk=64K,fail-at=data-offset@6";
    let (src_dev, src_dev_mock) = vfio_mig_mock::open_named(spec, Backend::Auto).unwrap();
    let src_handle = src_dev_mock.unwrap();
    let mut src = VfioMigratable::new("gpu0", src_dev);
    src.begin_send(Box::new(std::io::sink())).unwrap();
    src.start_migration().unwrap();
    let err = src.precopy_round().unwrap_err();
    assert!(
        vfio_mig::error::Report(&err)
            .to_string()
            .contains("read data_offset"),
        "{err}"
    );
    assert!(
        vfio_mig::error::Report(&err)
            .to_string()
            .contains("returned to RUNNING"),
        "{err}"
    );
    assert_eq!(src_handle.status().state_raw & 7, 1);
}

#[cfg(feature = "kvm")]
#[test]
fn kvm_vfio_device_can_be_created_where_dev_kvm_answers() {
    let kvm = match kvm_ioctls::Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            // Said plainly: this host has no usable /dev/kvm, so nothing was checked.
            eprintln!("NOT RUN: /dev/kvm is not available here ({e}); nothing was checked");
            return;
        }
    };
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    assert!(
        vmm_glue::kvm::vfio_device_supported(&vm).unwrap(),
        "KVM_DEV_TYPE_VFIO"
    );
    let dev = vmm_glue::kvm::create_vfio_device(&vm).expect("KVM_CREATE_DEVICE (VFIO)");
    let _handle = vmm_glue::kvm::container_handle(dev);
}

/// A failed `start_migration` (a refused PRE_COPY) keeps the device: `pause` and `resume`
/// afterwards work on it (they panicked at `unreachable!` when the front door had dropped it).
#[test]
fn a_failed_start_keeps_the_device_for_pause_and_resume() {
    let spec = "mock:v2,size=256K,seed=31,fail-at=set-state:PRE_COPY@1";
    let (dev, mock) = vfio_mig_mock::open_named(spec, Backend::Auto).unwrap();
    let handle = mock.unwrap();
    let mut src = VfioMigratable::new("gpu0", dev);
    src.begin_send(Box::new(std::io::sink())).unwrap();
    let err = src.start_migration().unwrap_err();
    assert!(
        vfio_mig::error::Report(&err)
            .to_string()
            .contains("PRE_COPY"),
        "{err}"
    );
    assert_eq!(handle.status().state_name(), "RUNNING");
    src.pause().unwrap();
    assert_eq!(handle.status().state_name(), "STOP");
    src.resume().unwrap();
    assert_eq!(handle.status().state_name(), "RUNNING");
}

/// `pause` during a migration quiesces every device of the unit (PRE_COPY_P2P) instead of
/// stopping it; a failing snapshot of a paused VM leaves its devices stopped.
#[test]
fn pause_during_a_migration_quiesces_and_a_paused_snapshot_failure_stays_stopped() {
    let specs = ["mock:v2,size=256K,seed=32", "mock:v2,size=256K,seed=33"];
    let (devs, handles): (Vec<_>, Vec<_>) = specs
        .iter()
        .map(|s| {
            let (d, m) = vfio_mig_mock::open_named(s, Backend::Auto).unwrap();
            (d, m.unwrap())
        })
        .unzip();
    let mut src = VfioMigratable::unit("vm0", devs);
    src.begin_send(Box::new(std::io::sink())).unwrap();
    src.start_migration().unwrap();
    src.precopy_round().unwrap();
    src.pause().unwrap();
    for h in &handles {
        assert_eq!(h.status().state_name(), "PRE_COPY_P2P");
    }
    src.complete_migration().unwrap();
    for h in &handles {
        assert_eq!(h.status().state_name(), "STOP_COPY");
    }
    assert!(src.finish_migration().unwrap().is_empty());
    for h in &handles {
        assert_eq!(h.status().state_name(), "STOP");
    }

    let spec = "mock:v2,size=256K,seed=34,fail-at=set-state:STOP_COPY@1";
    let (dev, mock) = vfio_mig_mock::open_named(spec, Backend::Auto).unwrap();
    let handle = mock.unwrap();
    let mut src = VfioMigratable::new("nic0", dev);
    src.pause().unwrap();
    assert!(src.snapshot(&mut Vec::new()).is_err());
    assert_eq!(
        handle.status().state_name(),
        "STOP",
        "a paused VM's device ran"
    );
}

/// Several devices as one unit over one stream: both arrive, verified.
#[test]
fn a_unit_of_devices_migrates_over_one_stream() {
    let specs = ["mock:v2,size=512K,seed=35", "mock:v2,size=256K,seed=36"];
    let open = |s: &&str| {
        let (d, m) = vfio_mig_mock::open_named(s, Backend::Auto).unwrap();
        (d, m.unwrap())
    };
    let (srcs, src_h): (Vec<_>, Vec<_>) = specs.iter().map(open).unzip();
    let (dsts, dst_h): (Vec<_>, Vec<_>) = specs.iter().map(open).unzip();
    let mut src = VfioMigratable::unit("vm0", srcs);
    let dst = VfioMigratable::unit("vm0", dsts);
    let (tx, restorer) = restore_in_background(dst);
    src.begin_send(Box::new(tx)).unwrap();
    src.start_migration().unwrap();
    src.precopy_round().unwrap();
    src.pause().unwrap();
    src.complete_migration().unwrap();
    restorer.join().unwrap().unwrap();
    src.finish_migration().unwrap();
    for (s, d) in src_h.iter().zip(&dst_h) {
        assert!(d.status().resumed_ok);
        assert_eq!(s.state_digest(), d.state_digest());
    }
}
