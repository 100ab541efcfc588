// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Issue 19: the v2 mock's driver profiles against the 2026 driver sources, one test per
//! difference from the earlier profiles, and the new profiles (xe, qat, virtio, igb). Each
//! expectation names the driver code it comes from; none comes from the engine.

use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FEATURE_DMA_LOGGING_START, VFIO_DEVICE_FEATURE_SET,
};
use vfio_mig::backend::v2_feature as feature;
use vfio_mig::{backend::v2_state::MigState, backend::DataFd, backend::DataRead};
use vfio_mig::{backend::DeviceIo, backend::DmaLoggingRange};
use vfio_mig::{NoObserver, SaveOptions};
use vfio_mig_mock::{MockSpec, MockStatus};
use vfio_mig_session::handshake::migrate_local;
use vfio_mig_tests::v2_mock::{code, dev, read_to_end, resume, state, stop_copy_stream};
use vfio_mig_tests::{handle, mock, StatusExt};

fn range(iova: u64, length: u64) -> DmaLoggingRange {
    DmaLoggingRange { iova, length }
}

#[test]
fn the_new_profiles_report_their_drivers_flags_and_dma_logging() {
    // xe-vfio-pci: STOP_COPY | P2P, no log_ops; qat_vf_pci_init_dev: all three, no log_ops;
    // virtiovf_set_migratable: all three, no log_ops; igb_vfio_pci_init_dev: STOP_COPY |
    // PRE_COPY with igb_pci_log_ops; mtty_init_dev registers mtty_log_ops.
    for (profile, flags, dma) in [
        ("xe", 0x3, false),
        ("qat", 0x7, false),
        ("virtio", 0x7, false),
        ("igb", 0x5, true),
        ("mtty", 0x7, true),
    ] {
        let d = dev(&format!("mock:v2,profile={profile},size=512"));
        let got = feature::migration_flags(&d).unwrap().bits();
        assert_eq!(got, flags, "{profile}");
        let probe = feature::probe(
            &d,
            VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
            VFIO_DEVICE_FEATURE_SET,
        );
        assert_eq!(probe.is_ok(), dma, "{profile}: {probe:?}");
    }
}

#[test]
fn mtty_logs_dma_and_reports_no_dirty_page() {
    // mtty_log_start / _stop / _read_and_clear return 0 and set no bit, whatever the
    // running device does.
    let d = dev("mock:v2,size=16K,profile=mtty,dma-dirty=16");
    let page = feature::dma_logging_start(&d, 4096, &[range(0x10_0000, 0x10_0000)]).unwrap();
    assert_eq!(page, 4096);
    let mut bitmap = vec![0u64; 4];
    feature::dma_logging_report(&d, 0x10_0000, 0x10_0000, 4096, &mut bitmap).unwrap();
    assert_eq!(bitmap, vec![0; 4]);
    feature::dma_logging_stop(&d).unwrap();
    assert_eq!(d.handle().status().dma_bits_reported, 0);
}

#[test]
fn pds_stops_dma_logging_at_stop_copy_to_stop() {
    // pds_vfio_step_device_state_locked: STOP_COPY -> STOP calls pds_vfio_dirty_disable;
    // pds_vfio_dirty_sync then answers EINVAL (tracking not enabled).
    let d = dev("mock:v2,size=16K,profile=pds");
    feature::dma_logging_start(&d, 4096, &[range(0, 0x10_0000)]).unwrap();
    let mut bitmap = vec![0u64; 4];
    feature::dma_logging_report(&d, 0, 0x10_0000, 4096, &mut bitmap).unwrap();
    let fd = DataFd::new(feature::set_state(&d, MigState::StopCopy).unwrap().unwrap());
    read_to_end(&d, &fd);
    feature::dma_logging_report(&d, 0, 0x10_0000, 4096, &mut bitmap).unwrap();
    feature::set_state(&d, MigState::Stop).unwrap();
    let after = feature::dma_logging_report(&d, 0, 0x10_0000, 4096, &mut bitmap);
    assert_eq!(code(after), libc::EINVAL);
}

#[test]
fn mlx5_and_virtio_load_inside_write_and_check_nothing_at_resuming_to_stop() {
    // mlx5vf_pci_step_device_state_locked (PRE_COPY supported): RESUMING -> STOP only
    // disables the fds; virtiovf_pci_step_device_state_locked likewise. A cut stream passes.
    for profile in ["mlx5", "virtio"] {
        let spec = format!("mock:v2,size=20000,seed=5,profile={profile}");
        let good = stop_copy_stream(&spec);
        let (d, w, s) = resume(&spec, &good[..good.len() / 2]);
        assert_eq!((w, s), (0, 0), "{profile}: {:?}", d.handle().status());
        assert_eq!(state(&d), Some(MigState::Stop), "{profile}");
    }
}

#[test]
fn hisi_takes_a_stream_of_only_its_match_data() {
    // vf_qm_load_data: "Return if only match data was transferred"; anything between the
    // match data and the whole state is EINVAL.
    let spec = "mock:v2,size=20000,seed=5,profile=hisi";
    let good = stop_copy_stream(spec);
    let (d, w, s) = resume(spec, &good[..16]);
    assert_eq!((w, s), (0, 0), "{:?}", d.handle().status());
    let (_, w, s) = resume(spec, &good[..16 + 16 + 100]);
    assert_eq!((w, s), (0, libc::EINVAL));
}

#[test]
fn writes_past_the_state_size_fail_inside_write() {
    // mtty_resume_write and hisi_acc_vf_resume_write: ENOMEM past the state;
    // qat_vf_resume_write: ENOMEM past state_size; igb_resume_write: EFBIG past
    // state_max_size. Nothing of the refused write is taken: the state still loads.
    for (profile, errno) in [
        ("mtty", libc::ENOMEM),
        ("hisi", libc::ENOMEM),
        ("qat", libc::ENOMEM),
        ("igb", libc::EFBIG),
    ] {
        let spec = format!("mock:v2,size=512,seed=5,profile={profile}");
        let good = stop_copy_stream(&spec);
        let d = dev(&spec);
        let fd = DataFd::new(feature::set_state(&d, MigState::Resuming).unwrap().unwrap());
        fd.write_all_via(&d, &good).unwrap();
        assert_eq!(code(fd.write_all_via(&d, &[0u8; 16])), errno, "{profile}");
        feature::set_state(&d, MigState::Running).unwrap();
        assert!(d.handle().status().resumed_ok, "{profile}");
    }
}

#[test]
fn only_pds_has_a_path_into_error() {
    // mtty, mlx5, hisi, qat, virtio, igb and xe never set their state to ERROR (a failed
    // arc keeps the state before it); pds_vfio_set_device_state does.
    for profile in ["mtty", "mlx5", "hisi", "qat", "virtio", "igb", "xe"] {
        let text = format!("mock:v2,size=512,profile={profile},fail-at=set-state@1:error");
        let err = text.parse::<MockSpec>().unwrap_err().to_string();
        assert!(err.contains("never enters ERROR"), "{profile}: {err}");
    }
    let d = dev("mock:v2,size=512,profile=pds,fail-at=set-state@1:error");
    assert!(feature::set_state(&d, MigState::Stop).is_err());
    assert_eq!(state(&d), Some(MigState::Error));
}

#[test]
fn data_fds_of_ended_sessions_answer_enodev() {
    // mtty/hisi/qat/igb `migf->disabled`, mlx5/virtio `MIGF_STATE_ERROR`, pds
    // `lm_file->disabled`: a read of a saving fd after STOP_COPY -> STOP, and a write of a
    // resuming fd after RESUMING -> STOP, fail with ENODEV.
    for profile in ["mtty", "mlx5", "hisi", "pds", "xe", "qat", "virtio", "igb"] {
        let spec = format!("mock:v2,size=512,seed=2,profile={profile}");
        let d = dev(&spec);
        let out = DataFd::new(feature::set_state(&d, MigState::StopCopy).unwrap().unwrap());
        let (bytes, _) = read_to_end(&d, &out);
        feature::set_state(&d, MigState::Stop).unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(code(out.read_via(&d, &mut buf)), libc::ENODEV, "{profile}");
        let input = DataFd::new(feature::set_state(&d, MigState::Resuming).unwrap().unwrap());
        input.write_all_via(&d, &bytes).unwrap();
        feature::set_state(&d, MigState::Stop).unwrap();
        assert_eq!(
            code(input.write_all_via(&d, &bytes[..16])),
            libc::ENODEV,
            "{profile}"
        );
    }
}

#[test]
fn xe_takes_a_multi_gib_vram_quota_without_allocating_it() {
    // The VF's whole VRAM quota is its stop-copy state: MIG_DATA_SIZE counts all of it.
    // 8 GiB in 2 MiB pages: the mock keeps a generation per page, not the bytes.
    let d = dev("mock:v2,profile=xe,size=8G,page=2M");
    assert!(feature::data_size(&d).unwrap() > 8 << 30);
    let e = feature::set_state(&d, MigState::PreCopy).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "no PRE_COPY");
}

#[test]
fn qat_pre_copy_carries_its_setup_part_only() {
    // qat_vf_save_setup in PRE_COPY (initial_bytes = setup_size - pos, dirty 0), the state
    // at PRE_COPY_P2P -> STOP_COPY; reads return 0 at the end.
    let d = dev("mock:v2,size=64K,seed=3,profile=qat");
    let whole = feature::data_size(&d).unwrap();
    let fd = DataFd::new(feature::set_state(&d, MigState::PreCopy).unwrap().unwrap());
    let info = feature::precopy_info(&d, fd.session(), false).unwrap();
    let (pre, end) = read_to_end(&d, &fd);
    assert_eq!(
        (info.initial_bytes, info.dirty_bytes),
        (pre.len() as u64, 0)
    );
    assert!(pre.len() < 64 && end == DataRead::Eof, "{}", pre.len());
    feature::set_state(&d, MigState::StopCopy).unwrap();
    let (rest, _) = read_to_end(&d, &fd);
    assert_eq!((pre.len() + rest.len()) as u64, whole);
    // Another device's setup part is refused inside write() (qat_vfmig_load_setup).
    let foreign = stop_copy_stream("mock:v2,size=64K,seed=4,profile=qat");
    let (_, w, _) = resume("mock:v2,size=64K,seed=3,profile=qat", &foreign);
    assert_eq!(w, libc::EINVAL);
}

#[test]
fn virtio_pre_copies_its_whole_context_and_answers_enomsg_at_the_temporary_end() {
    // virtiovf_pci_save_device_data(pre_copy): the whole device context first
    // (pre_copy_initial_bytes); virtiovf_save_read: ENOMSG at the end of data in PRE_COPY.
    let d = dev("mock:v2,size=64K,seed=3,profile=virtio");
    let whole = feature::data_size(&d).unwrap();
    let fd = DataFd::new(feature::set_state(&d, MigState::PreCopy).unwrap().unwrap());
    let (pre, end) = read_to_end(&d, &fd);
    assert_eq!(end, DataRead::NoMessage);
    assert!(pre.len() as u64 > whole / 2, "{} of {whole}", pre.len());
}

#[test]
fn igb_saves_its_1k_blob_at_stop_copy_only() {
    // igb: PRE_COPY opens an empty save file (PRECOPY_INFO 0, reads 0); PRE_COPY ->
    // STOP_COPY populates it with the blob; MIG_DATA_SIZE is state_max_size (1024).
    let d = dev("mock:v2,profile=igb,seed=1");
    assert_eq!(feature::data_size(&d).unwrap(), 1024);
    let fd = DataFd::new(feature::set_state(&d, MigState::PreCopy).unwrap().unwrap());
    let info = feature::precopy_info(&d, fd.session(), false).unwrap();
    assert_eq!((info.initial_bytes, info.dirty_bytes), (0, 0));
    assert_eq!(read_to_end(&d, &fd), (vec![], DataRead::Eof));
    feature::set_state(&d, MigState::StopCopy).unwrap();
    assert_eq!(read_to_end(&d, &fd).0.len(), 1024);
    // A size whose state does not fit the 1 KiB blob is refused.
    assert!("mock:v2,profile=igb,size=4K".parse::<MockSpec>().is_err());
}

#[test]
fn igb_checks_the_blob_at_resuming_to_stop_and_a_reset_does_not_help() {
    // igb_load_data: an empty stream loads nothing (0); a blob of another VF (magic,
    // version, VF number: the match header here) fails LOAD with EIO and the driver stays
    // in RESUMING; VFIO_DEVICE_RESET resets the VF, not igb-vfio-pci's mig_state, so the
    // device stays in RESUMING and LOAD keeps failing (BAD_STATE) until the fd is reopened.
    let spec = "mock:v2,profile=igb,seed=1";
    let (d, w, s) = resume(spec, &[]);
    assert_eq!((w, s), (0, 0), "{:?}", d.handle().status());
    let foreign = stop_copy_stream("mock:v2,profile=igb,seed=2");
    let (d, w, s) = resume(spec, &foreign);
    assert_eq!((w, s), (0, libc::EIO));
    assert_eq!(state(&d), Some(MigState::Resuming));
    d.reset().unwrap();
    assert_eq!(
        state(&d),
        Some(MigState::Resuming),
        "the reset does not help"
    );
    let e = feature::set_state(&d, MigState::Stop).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
}

/// One local migration between `src` and `dst` specs, not live.
fn migrate_once(src: &str, dst: &str) -> (vfio_mig_session::Result<()>, MockStatus, MockStatus) {
    let (mut s, mut d) = (mock(src), mock(dst));
    let opts = SaveOptions::default();
    let r = migrate_local(
        s.device.as_mut(),
        d.device.as_mut(),
        &opts,
        &NoObserver,
        &NoObserver,
    );
    (r.map(drop), handle(&s).status(), handle(&d).status())
}

#[test]
fn an_empty_device_stream_never_reaches_resuming_to_stop() {
    // A source whose stop-copy data is lost from the first block reads 0 at once; igb's
    // igb_load_data returns 0 for an empty stream and the VF would run without the source's
    // state. The engine must refuse to load nothing.
    let base = "mock:v2,profile=igb,seed=1";
    let (r, src, dst) = migrate_once(&format!("{base},fail-at=data-read@1"), base);
    let e = r.expect_err("an empty stream was loaded").to_string();
    assert!(!e.contains('\n'), "{e}");
    assert!(!dst.resumed_ok && !dst.ran_incomplete, "{e}: {dst:?}");
    assert_eq!(dst.mig_state(), Some(MigState::Running), "{e}: {dst:?}");
    assert!(src.is_running(), "{e}: {src:?}");
}

#[test]
fn a_destination_reset_that_does_not_leave_resuming_is_named_in_the_error() {
    // A whole stream the device refuses (another device's state: the mock checks it by seed
    // where igb checks its blob, at RESUMING -> STOP): igb's LOAD fails, the driver stays in
    // RESUMING, and VFIO_DEVICE_RESET does not change that. The one-line error must say what
    // became of the destination, whichever side's error explains the failure.
    let base = "mock:v2,profile=igb,chunk=256,size=912,page=228";
    let (r, src, dst) = migrate_once(&format!("{base},seed=1"), &format!("{base},seed=2"));
    let e = r
        .expect_err("another device's state was loaded")
        .to_string();
    assert!(!e.contains('\n'), "{e}");
    assert_eq!(dst.mig_state(), Some(MigState::Resuming), "{dst:?}");
    assert!(dst.resets > 0 && !dst.ran_incomplete, "{dst:?}");
    assert!(
        e.contains("RESUMING after VFIO_DEVICE_RESET"),
        "the error does not say the destination is stuck: {e}"
    );
    assert!(src.is_running(), "{e}: {src:?}");
}

#[test]
fn igb_tracks_at_most_max_ranges_and_merges_the_rest() {
    // igb: CAPS max_ranges = 4; more ranges are merged (vfio_combine_iova_ranges closes the
    // smallest gaps), so the device then tracks, and DMA-writes into, the gaps; a REPORT must
    // lie inside one tracked range (igb_pci_dirty_range_valid: EINVAL otherwise, as the igb
    // guest's dirty test saw). The generic mock tracks each range as given and reports any
    // span.
    let k = 0x1000;
    let ranges: Vec<DmaLoggingRange> = [0, 2, 16, 18, 256, 260]
        .iter()
        .map(|&p| range(p * k, k))
        .collect();
    let gaps = [k, 17 * k];
    // The four ranges igb tracks: [0, 3k), [16k, 19k), [256k, 257k), [260k, 261k).
    let merged_ranges = [(0, 3 * k), (16 * k, 3 * k), (256 * k, k), (260 * k, k)];
    for (spec, merged) in [
        ("mock:v2,profile=igb,dma-dirty=400", true),
        ("mock:v2,size=4K,dma-dirty=400", false),
    ] {
        let d = dev(spec);
        feature::dma_logging_start(&d, 4096, &ranges).unwrap();
        let mut bitmap = vec![0u64; 5];
        let whole = feature::dma_logging_report(&d, 0, 261 * k, 4096, &mut bitmap);
        if merged {
            let err = whole.expect_err("a span over several ranges");
            assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{spec}: {err}");
            for (iova, len) in merged_ranges {
                feature::dma_logging_report(&d, iova, len, 4096, &mut bitmap).unwrap();
            }
        } else {
            whole.unwrap();
        }
        let written = d.handle().dma_written();
        let in_gap = written.iter().any(|p| gaps.contains(p));
        assert_eq!(in_gap, merged, "{spec}: {written:x?}");
    }
}
