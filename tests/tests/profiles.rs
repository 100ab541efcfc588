// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The v2 mock's driver profiles (`mock:v2,profile=NAME`) behave as their kernel drivers do,
//! where a VMM can see it. Each expectation names the driver function it comes from (see
//! `docs/mock-device.md` and `vfio_mig_mock::v2::profile`).

use std::io::Read;

use vfio_mig::backend::v2_feature as feature;
use vfio_mig::backend::DeviceIo;
use vfio_mig::{backend::v2_state::MigState, backend::DataFd, backend::DataRead};
use vfio_mig_tests::v2_mock::{dev, read_to_end, resume, state, stop_copy_stream};

#[test]
fn migration_flags_and_dma_logging_follow_the_drivers() {
    // mtty_init_dev, mlx5vf_cmd_set_migratable, hisi_acc_vfio_pci_migrn_init_dev (never P2P),
    // pds_vfio_init_device; DMA logging only where the driver has log_ops (mtty, mlx5, pds).
    for (profile, flags, dma) in [
        ("mtty", 0x7, true),
        ("mlx5", 0x7, true),
        ("hisi", 0x5, false),
        ("pds", 0x3, true),
    ] {
        let d = dev(&format!("mock:v2,size=16K,profile={profile}"));
        assert_eq!(
            feature::migration_flags(&d).unwrap().bits(),
            flags,
            "{profile}"
        );
        let probe = feature::probe(
            &d,
            vfio_bindings::bindings::vfio::VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
            vfio_bindings::bindings::vfio::VFIO_DEVICE_FEATURE_SET,
        );
        assert_eq!(probe.is_ok(), dma, "{profile}: {probe:?}");
        assert_eq!(d.identity().model, format!("mock:v2-{profile}"));
    }
}

#[test]
fn mig_data_size_is_the_whole_stop_copy_state_however_much_was_read() {
    // mtty_get_data_size, mlx5vf_pci_get_data_size (the firmware's total), hisi's and pds's
    // constant: an estimate of the whole STOP_COPY state, not of what is left unread.
    for profile in ["mtty", "mlx5", "hisi", "pds"] {
        let spec = format!("mock:v2,size=40000,seed=3,page=4096,profile={profile}");
        let whole = stop_copy_stream(&spec).len() as u64;
        let d = dev(&spec);
        assert_eq!(feature::data_size(&d).unwrap(), whole, "{profile} RUNNING");
        let fd = DataFd::new(feature::set_state(&d, MigState::StopCopy).unwrap().unwrap());
        let mut half = vec![0u8; (whole / 2) as usize];
        let mut f = std::fs::File::from(fd.fd().unwrap().try_clone_to_owned().unwrap());
        f.read_exact(&mut half).unwrap();
        assert_eq!(
            feature::data_size(&d).unwrap(),
            whole,
            "{profile} half read"
        );
    }
    // The generic mock reports the unread rest (its documented, unrealistic choice).
    let d = dev("mock:v2,size=40000,seed=3");
    let before = feature::data_size(&d).unwrap();
    let fd = DataFd::new(feature::set_state(&d, MigState::StopCopy).unwrap().unwrap());
    let (bytes, _) = read_to_end(&d, &fd);
    assert_eq!(bytes.len() as u64, before);
    assert_eq!(feature::data_size(&d).unwrap(), 0);
}

#[test]
fn pre_copy_temporary_end_is_enomsg_on_mlx5_and_zero_on_mtty_and_hisi() {
    // mlx5vf_save_read: -ENOMSG in PRE_COPY with no buffer queued; mtty_save_read and
    // hisi_acc_vf_save_read return 0. In STOP_COPY the end is 0 for all.
    for (profile, end) in [
        ("mlx5", DataRead::NoMessage),
        ("mtty", DataRead::Eof),
        ("hisi", DataRead::Eof),
    ] {
        let d = dev(&format!("mock:v2,size=64K,seed=1,profile={profile}"));
        let fd = DataFd::new(feature::set_state(&d, MigState::PreCopy).unwrap().unwrap());
        let (pre, got) = read_to_end(&d, &fd);
        assert_eq!(got, end, "{profile}");
        // Asking again gives the same answer while nothing new was produced.
        assert_eq!(read_to_end(&d, &fd).1, end, "{profile} again");
        feature::set_state(&d, MigState::StopCopy).unwrap();
        let (rest, got) = read_to_end(&d, &fd);
        assert_eq!(got, DataRead::Eof, "{profile} STOP_COPY");
        let whole = feature::data_size(&d).unwrap();
        assert_eq!((pre.len() + rest.len()) as u64, whole, "{profile}");
        feature::set_state(&d, MigState::Stop).unwrap();
        assert_eq!(d.handle().status().saves_completed, 1, "{profile}");
    }
}

#[test]
fn mtty_and_hisi_pre_copy_carry_a_small_header_and_stop_copy_the_whole_state() {
    // mtty: the fd opens with the 24-byte mtty_data header, the ports follow at STOP_COPY;
    // hisi_acc_vf_pre_copy: the match data only, vf_qm_state_save fills the rest.
    // mlx5 pre-copies the whole image.
    for (profile, small) in [("mtty", true), ("hisi", true), ("mlx5", false)] {
        let d = dev(&format!("mock:v2,size=256K,seed=4,profile={profile}"));
        let whole = feature::data_size(&d).unwrap();
        let fd = DataFd::new(feature::set_state(&d, MigState::PreCopy).unwrap().unwrap());
        let info = feature::precopy_info(&d, fd.session(), false).unwrap();
        let (pre, _) = read_to_end(&d, &fd);
        assert_eq!(info.initial_bytes, pre.len() as u64, "{profile}: {info:?}");
        assert_eq!(pre.len() < 64, small, "{profile}: {} of {whole}", pre.len());
        let after = feature::precopy_info(&d, fd.session(), false).unwrap();
        assert_eq!(
            (after.initial_bytes, after.dirty_bytes),
            (0, 0),
            "{profile}"
        );
    }
}

#[test]
fn mlx5_pre_copy_info_grows_while_the_device_dirties_its_state() {
    // mlx5vf_precopy_ioctl: dirty_bytes = what is unread plus a fresh firmware query, so it
    // grows as the running device dirties; mtty and hisi never report dirty bytes.
    let d = dev("mock:v2,size=64K,seed=2,profile=mlx5,dirty-rate=100G");
    let fd = DataFd::new(feature::set_state(&d, MigState::PreCopy).unwrap().unwrap());
    let (_, end) = read_to_end(&d, &fd);
    assert_eq!(end, DataRead::NoMessage);
    // Every PRECOPY_INFO accounts for the time since the last one; at 100 GB/s a page is
    // dirtied within nanoseconds, so a few calls see it.
    let grown = (0..1000)
        .map(|_| feature::precopy_info(&d, fd.session(), false).unwrap())
        .find(|i| i.dirty_bytes > 0)
        .expect("dirty bytes appear");
    assert_eq!(grown.initial_bytes, 0);
    let (more, _) = read_to_end(&d, &fd);
    assert!(more.len() as u64 >= grown.dirty_bytes, "{}", more.len());
    let d = dev("mock:v2,size=64K,seed=2,profile=hisi,dirty-rate=100G");
    let fd = DataFd::new(feature::set_state(&d, MigState::PreCopy).unwrap().unwrap());
    read_to_end(&d, &fd);
    for _ in 0..100 {
        let i = feature::precopy_info(&d, fd.session(), false).unwrap();
        assert_eq!((i.initial_bytes, i.dirty_bytes), (0, 0));
    }
}

#[test]
fn bad_data_is_refused_where_each_driver_refuses_it_never_when_the_device_runs() {
    // Another device's state (a different seed): mtty_load_state's header check and hisi's
    // vf_qm_check_match fail write() with EFAULT; mlx5 loads each image inside write();
    // pds's firmware refuses at RESUMING -> STOP.
    // A damaged page: mtty and hisi load at RESUMING -> STOP (EINVAL); mlx5 in write() (EIO).
    let einval = libc::EINVAL;
    let cases = [
        ("mtty", (libc::EFAULT, 0), (0, einval)),
        ("hisi", (libc::EFAULT, 0), (0, einval)),
        ("mlx5", (einval, 0), (libc::EIO, 0)),
        ("pds", (0, libc::EIO), (0, libc::EIO)),
    ];
    for (profile, other_seed, damaged) in cases {
        let spec = format!("mock:v2,size=20000,seed=5,profile={profile}");
        let good = stop_copy_stream(&spec);
        let foreign = stop_copy_stream(&format!("mock:v2,size=20000,seed=6,profile={profile}"));
        let mut bad = good.clone();
        let last = bad.len() - 100;
        bad[last] ^= 0x40;
        for (what, stream, (want_write, want_stop)) in [
            ("other seed", &foreign, other_seed),
            ("damaged", &bad, damaged),
        ] {
            let (d, w, s) = resume(&spec, stream);
            let st = d.handle().status();
            assert_eq!(w, want_write, "{profile} {what}: write errno, {st:?}");
            if want_write == 0 {
                assert_eq!(
                    s, want_stop,
                    "{profile} {what}: RESUMING -> STOP errno, {st:?}"
                );
            } else if profile == "mlx5" {
                // mlx5 (PRE_COPY supported) checks nothing at RESUMING -> STOP: the engine
                // must not get there after a refused write.
                assert_eq!(s, 0, "{profile} {what}: RESUMING -> STOP, {st:?}");
                continue;
            } else {
                assert_ne!(
                    s, 0,
                    "{profile} {what}: RESUMING -> STOP after a refused write"
                );
            }
            // Refused before anything runs: the device stays in RESUMING, not ERROR.
            assert_eq!(state(&d), Some(MigState::Resuming), "{profile} {what}");
            assert!(!st.resumed_ok);
        }
        let (d, w, s) = resume(&spec, &good);
        assert_eq!((w, s), (0, 0), "{profile} good stream");
        feature::set_state(&d, MigState::Running).unwrap();
        assert!(d.handle().status().resumed_ok, "{profile}");
    }
}

#[test]
fn an_incomplete_state_is_refused_at_resuming_to_stop() {
    // mtty_load_state: fewer bytes than the full state -> EINVAL from SET_STATE; hisi, qat,
    // igb load (pds's and xe's firmware checks) the state there too. mlx5 and virtio do not
    // (profiles_2026.rs).
    for (profile, errno) in [
        ("mtty", libc::EINVAL),
        ("hisi", libc::EINVAL),
        ("pds", libc::EIO),
        ("xe", libc::EIO),
        ("qat", libc::EINVAL),
        ("igb", libc::EIO),
    ] {
        let spec = format!("mock:v2,size=500,seed=5,profile={profile}");
        let good = stop_copy_stream(&spec);
        let (d, w, s) = resume(&spec, &good[..good.len() / 2]);
        assert_eq!((w, s), (0, errno), "{profile}");
        assert_eq!(state(&d), Some(MigState::Resuming), "{profile}");
    }
}

#[test]
fn in_error_pds_answers_every_request_with_eio_the_generic_mock_with_einval() {
    // pds_vfio_set_device_state returns EIO in ERROR before the core. The generic mock
    // loops while cur != new as mtty's code does (ERROR -> ERROR is a no-op) and the core
    // refuses the rest. (The other profiles never enter ERROR: profiles_2026.rs.)
    for (profile, errno, error_to_error) in [
        (",profile=pds", libc::EIO, libc::EIO),
        ("", libc::EINVAL, 0),
    ] {
        let d = dev(&format!(
            "mock:v2,size=8K{profile},fail-at=set-state@1:error"
        ));
        assert!(feature::set_state(&d, MigState::Stop).is_err());
        assert_eq!(state(&d), Some(MigState::Error), "{profile}");
        let e = feature::set_state(&d, MigState::Running).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(errno), "{profile}");
        let r = feature::set_state(&d, MigState::Error);
        let got = r.err().map_or(0, |e| e.raw_os_error().unwrap_or(-1));
        assert_eq!(got, error_to_error, "{profile} ERROR -> ERROR");
        d.reset().unwrap();
        assert_eq!(state(&d), Some(MigState::Running), "{profile}");
    }
}
