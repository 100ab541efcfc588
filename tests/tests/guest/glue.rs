// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The engine's multi-device path and vmm-glue's dirty tracking on real mtty devices: two
//! devices migrated as one unit through the P2P states, DMA logging start/report/stop, and the
//! type1 container's dirty-page tracking over a DMA-mapped guest buffer.

use std::path::Path;

use vfio_mig::backend::DmaLoggingRange;
use vfio_mig::{backend::v2_state::MigState, backend::V2Device};
use vfio_mig_tests::open_device;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_glue::dirty::{DirtyTracker, MemoryRange};
use vmm_glue::dma::VmContainer;

use super::migration::{
    ensure_running, mig_state, ok, pair, path_str, read_state, vfio_mig, write_state,
};

#[test]
fn two_devices_migrate_as_one_unit_through_the_p2p_states() {
    for live in [false, true] {
        let (a, b) = pair(0, 1);
        let (c, d) = pair(2, 3);
        for dev in [&a, &b, &c, &d] {
            ensure_running(dev);
        }
        let seed = if live { 0x31 } else { 0x13 };
        let expected_b = write_state(&a, seed);
        let expected_d = write_state(&c, seed.wrapping_add(1));
        write_state(&b, 0x70);
        write_state(&d, 0x71);
        let mut args = vec![
            "migrate",
            path_str(&a),
            path_str(&b),
            path_str(&c),
            path_str(&d),
        ];
        if live {
            args.push("--live");
        }
        let out = vfio_mig(&args);
        ok(&out);
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("2 devices migrated"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(read_state(&b), expected_b, "first pair, live={live}");
        assert_eq!(read_state(&d), expected_d, "second pair, live={live}");
        assert_eq!(mig_state(&b), MigState::Running);
        assert_eq!(mig_state(&d), MigState::Running);
        assert_eq!(mig_state(&a), MigState::Stop);
        assert_eq!(mig_state(&c), MigState::Stop);
    }
}

#[test]
fn mtty_quiesces_into_running_p2p_and_back() {
    use vfio_mig::MigrationDevice;
    let (a, _) = pair(0, 1);
    ensure_running(&a);
    let opened = open_device(path_str(&a)).unwrap();
    let mut dev = V2Device::open(opened.io.clone()).unwrap();
    dev.quiesce().unwrap();
    assert_eq!(dev.state().unwrap(), MigState::RunningP2p);
    dev.run().unwrap();
    assert_eq!(dev.state().unwrap(), MigState::Running);
}

#[test]
fn dma_logging_start_report_stop_on_mtty() {
    let (a, _) = pair(1, 2);
    ensure_running(&a);
    let opened = open_device(path_str(&a)).unwrap();
    let dev = V2Device::open(opened.io.clone()).unwrap();
    let page = 4096u64;
    let range = DmaLoggingRange {
        iova: 0x10_0000,
        length: 64 * page,
    };
    // mtty has no DMA engine; its log ops accept START and STOP and report no page. REPORT
    // needs the kernel's iova_bitmap (CONFIG_IOMMUFD_DRIVER): without it (the Debian kernel)
    // REPORT is refused with EOPNOTSUPP; with it (the iommufd kernel: IOMMUFD_TEST selects
    // it) REPORT succeeds and sets no bit. The buffer starts all ones: the library must clear
    // it, since the kernel only sets bits (failed before feature::dma_logging_report did).
    dev.dma_logging_start(page, &[range])
        .expect("DMA_LOGGING_START");
    let mut bitmap = vec![u64::MAX; 1];
    match dev.dma_logging_report(range.iova, range.length, page, &mut bitmap) {
        Ok(()) => assert_eq!(bitmap, vec![0], "mtty reported DMA it never did"),
        Err(e) => assert_eq!(e.errno(), Some(libc::EOPNOTSUPP), "{e}"),
    }
    dev.dma_logging_stop().expect("DMA_LOGGING_STOP");
    // Stopped: the VFIO core keeps no logging state (vfio_main.c only checks that log ops
    // exist), the driver decides, and mtty's read_and_clear reports nothing whether started
    // or not. So without iova_bitmap the report is refused, with it the report is empty.
    bitmap.fill(u64::MAX);
    match dev.dma_logging_report(range.iova, range.length, page, &mut bitmap) {
        Ok(()) => assert_eq!(bitmap, vec![0], "mtty reported DMA after STOP"),
        Err(e) => assert_eq!(e.errno(), Some(libc::EOPNOTSUPP), "after STOP: {e}"),
    }
}

#[test]
fn container_dirty_page_tracking_over_a_dma_mapped_buffer() {
    if std::env::var("VFIO_MIG_BACKEND").as_deref() == Ok("iommufd") {
        // The type1 container is the group path's; iommufd tracks dirty pages per HWPT.
        eprintln!(
            "NOT RUN on the iommufd backend: the type1 container only exists on the group path"
        );
        return;
    }
    let (a, _) = pair(3, 0);
    ensure_running(&a);
    let container = VmContainer::new(None).expect("open /dev/vfio/vfio");
    let _dev = container
        .open_device(Path::new(path_str(&a)))
        .expect("open the device in the VM's container");
    let page = 4096u64;
    let mem: GuestMemoryMmap<AtomicBitmap> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0x20_0000), 32 * page as usize)]).unwrap();
    // SAFETY: `mem` stays mapped until it is unmapped below, and nothing holds Rust references
    // into it while it is DMA-mapped.
    unsafe { container.map_guest_memory(&mem) }.expect("VFIO_IOMMU_MAP_DMA of guest memory");
    let mut tracker = container.dirty_tracker();
    let range = MemoryRange {
        gpa: 0x20_0000,
        length: 32 * page,
    };
    tracker
        .start(&[range], page)
        .expect("VFIO_IOMMU_DIRTY_PAGES START");
    let bitmap = tracker
        .report(range, page)
        .expect("GET_BITMAP of the mapped buffer");
    assert_eq!(bitmap.len(), 1);
    // mtty pins no pages: an mdev-only container reports only pinned pages, so none.
    assert_eq!(bitmap, vec![0], "dirty pages nobody wrote");
    // The bitmap's page size must be the IOMMU's smallest page: 8 KiB pages are refused.
    assert!(tracker.report(range, 2 * page).is_err());
    tracker.stop().expect("VFIO_IOMMU_DIRTY_PAGES STOP");
    container.unmap_guest_memory(&mem).expect("unmap");
}
