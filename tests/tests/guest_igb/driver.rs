// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What igb-vfio-pci does that mtty does not, seen through the library's v2 layer: its
//! MIG_DATA_SIZE and PRECOPY_INFO answers, a load that fails and leaves the driver in RESUMING
//! (VFIO_DEVICE_RESET does not help, a reopen does), RESUMING -> STOP with nothing written,
//! EFBIG past the state size, and DMA logging's START merging ranges (what REPORT then says
//! is in `dirty.rs`). Expectations from the driver source (`driver/main.c` of the fixture)
//! and vfio_main.c of Linux 6.12.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use vfio_mig::error::Recovery;
use vfio_mig::{
    backend::v2_state::MigState, backend::DmaLoggingRange, backend::OnFailure, backend::V2Device,
};
use vfio_mig_tests::open_device;

use super::migration::loaded_lines;
use super::vf::{a0_b0, kernel_lines, read_rings, write_rings, BLOB_SIZE};

fn open_v2(path: &Path) -> V2Device {
    let opened = open_device(path.to_str().unwrap()).expect("open the VF");
    V2Device::open(opened.io.clone()).expect("igb-vfio-pci speaks v2")
}

/// The session's data fd as a `File` (a duplicate: the device keeps its own).
fn data_file(dev: &V2Device) -> File {
    File::from(
        dev.data_fd()
            .expect("a data fd")
            .try_clone_to_owned()
            .expect("dup the data fd"),
    )
}

/// How many "DVSEC cmd 0x3 failed (error CODE)" lines (a LOAD the device refused) `vf` has.
fn load_refusals(vf: &Path, code: u32) -> usize {
    let needle = format!("DVSEC cmd 0x3 failed (error {code})");
    kernel_lines(vf)
        .iter()
        .filter(|l| l.contains(&needle))
        .count()
}

#[test]
fn data_size_and_precopy_info_as_the_driver_answers_them() {
    let (a, _) = a0_b0();
    let mut dev = open_v2(&a);
    // MIG_DATA_SIZE: the DVSEC's DATA_SIZE register, the blob size, in RUNNING and STOP.
    assert_eq!(dev.data_size().unwrap(), BLOB_SIZE as u64);
    // Linux 6.12 has no VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2: the opt-in fails, REINIT is
    // never reported.
    assert!(
        !dev.precopy_info_v2(),
        "the 6.12 kernel has no PRECOPY_INFOv2 opt-in"
    );
    dev.set_state(MigState::PreCopy).unwrap();
    let info = dev.precopy_info().unwrap();
    eprintln!("PRE_COPY: {info:?}, MIG_DATA_SIZE {:?}", dev.data_size());
    assert_eq!((info.initial_bytes, info.dirty_bytes), (0, 0), "{info:?}");
    let mut f = data_file(&dev);
    let mut buf = vec![0u8; 4 * BLOB_SIZE];
    // No pre-copy data: the read ends at once (0 bytes) instead of blocking.
    let n = f.read(&mut buf).unwrap();
    assert_eq!(n, 0, "PRE_COPY data of igb-vfio-pci");
    dev.set_state(MigState::StopCopy).unwrap();
    // Everything comes in STOP_COPY, on the same fd (the uAPI: PRE_COPY -> STOP_COPY keeps it).
    let mut all = Vec::new();
    f.read_to_end(&mut all).unwrap();
    assert_eq!(all.len(), BLOB_SIZE);
    // The blob's own header (igb_migration.c): magic "MIGB", version 1, VF number 0.
    assert_eq!(&all[0..4], &0x4D49_4742u32.to_le_bytes());
    assert_eq!(&all[4..8], &1u32.to_le_bytes());
    assert_eq!(&all[8..12], &0u32.to_le_bytes());
    dev.set_state(MigState::Running).unwrap();
}

#[test]
fn a_refused_load_stays_in_resuming_and_only_a_reopen_brings_the_vf_back() {
    let (_, b) = a0_b0();
    let before = write_rings(&b, 0x1234);
    let refusals = load_refusals(&b, 6);
    let mut dev = open_v2(&b);
    dev.set_state(MigState::Resuming).unwrap();
    data_file(&dev).write_all(&[0x5a; BLOB_SIZE]).unwrap();
    let err = dev
        .set_state_with(MigState::Stop, OnFailure::Report)
        .expect_err("the device refuses a blob without its magic");
    eprintln!("RESUMING -> STOP: {err}");
    assert_eq!(
        load_refusals(&b, 6),
        refusals + 1,
        "BAD_MAGIC (6) logged by the driver"
    );
    assert_eq!(dev.state().unwrap(), MigState::Resuming);
    // igb-vfio-pci has no reset_done handler: VFIO_DEVICE_RESET resets the VF, not the
    // driver's state, and the library must say so rather than report a reset.
    match dev.reset() {
        Recovery::Failed(why) => assert!(why.contains("RESUMING"), "{why}"),
        other => panic!("VFIO_DEVICE_RESET cannot bring igb-vfio-pci back: {other}"),
    }
    assert_eq!(dev.state().unwrap(), MigState::Resuming);
    drop(dev);
    // Closing and reopening the device fd: igb_pci_open_device starts in RUNNING.
    let mut dev = open_v2(&b);
    assert_eq!(dev.state().unwrap(), MigState::Running);
    drop(dev);
    assert_eq!(read_rings(&b), before, "a refused blob changed the VF");
}

#[test]
fn resuming_to_stop_with_nothing_written_succeeds_and_loads_nothing() {
    let (_, b) = a0_b0();
    let before = write_rings(&b, 0x4321);
    let loads = loaded_lines(&b);
    let mut dev = open_v2(&b);
    dev.set_state(MigState::Resuming).unwrap();
    // A write past the state size (DATA_SIZE) is refused with EFBIG and writes nothing.
    let err = data_file(&dev).write(&[0u8; 2 * BLOB_SIZE]).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EFBIG), "{err}");
    // igb_load_data: "if (!migf->size) return 0": the arc succeeds without a LOAD.
    dev.set_state(MigState::Stop).unwrap();
    dev.set_state(MigState::Running).unwrap();
    drop(dev);
    assert_eq!(loaded_lines(&b), loads, "nothing was loaded");
    assert_eq!(read_rings(&b), before);
}

/// START and STOP reach the driver, which merges ranges beyond the device's max_ranges (4,
/// CAPS[11:8]) with vfio_combine_iova_ranges: the smallest gaps are closed first. REPORT
/// answers on this kernel (vfio_main.c 6.7+ refuses it with EOPNOTSUPP without
/// CONFIG_IOMMUFD_DRIVER, as on the Debian 6.12 kernel), over a merged range and its gaps.
#[test]
fn dma_logging_start_merges_ranges_and_report_answers_on_this_kernel() {
    let (a, _) = a0_b0();
    let dev = open_v2(&a);
    let range = |iova: u64, length: u64| DmaLoggingRange { iova, length };
    let ranges = [
        range(0x10000, 0x1000),
        range(0x12000, 0x1000),
        range(0x100000, 0x1000),
        range(0x102000, 0x1000),
        range(0x400000, 0x1000),
        range(0x800000, 0x1000),
    ];
    let logged_before = kernel_lines(&a).len();
    let page = dev
        .dma_logging_start(4096, &ranges)
        .expect("DMA_LOGGING_START");
    assert_eq!(page, 4096);
    let new: Vec<String> = kernel_lines(&a)[logged_before..].to_vec();
    let got: Vec<&String> = new.iter().filter(|l| l.contains("dirty range[")).collect();
    eprintln!("{got:#?}");
    let expect = [
        "dirty range[0]: iova=0x10000 size=0x3000 pgsize=4096",
        "dirty range[1]: iova=0x100000 size=0x3000 pgsize=4096",
        "dirty range[2]: iova=0x400000 size=0x1000 pgsize=4096",
        "dirty range[3]: iova=0x800000 size=0x1000 pgsize=4096",
    ];
    assert_eq!(got.len(), expect.len(), "{got:#?}");
    for (line, want) in got.iter().zip(expect) {
        assert!(line.contains(want), "{line} lacks {want}");
    }
    // Nothing is DMA-mapped here and the VF's queues are off: an empty log, gap included.
    let mut bitmap = vec![0u64; 1];
    dev.dma_logging_report(0x10000, 0x3000, 4096, &mut bitmap)
        .expect("REPORT over merged range 0 (CONFIG_IOMMUFD_DRIVER)");
    assert_eq!(bitmap, vec![0], "no page written");
    dev.dma_logging_stop().expect("DMA_LOGGING_STOP");
}
