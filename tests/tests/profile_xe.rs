// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Issue 19: the xe profile against the xe sources (Linux 2026): drivers/vfio/pci/xe/main.c
//! and the PF side it calls, drivers/gpu/drm/xe/xe_sriov_vfio.c and xe_sriov_pf_migration.c.
//! One test per difference from the profile as first modelled; each expectation names the
//! driver code it comes from.

use vfio_mig::backend::v2_feature as feature;
use vfio_mig::backend::v2_state::MigState;
use vfio_mig::backend::DataFd;
use vfio_mig_tests::v2_mock::{code, dev, resume, state, stop_copy_stream};

const XE: &str = "mock:v2,size=64K,seed=5,profile=xe";

#[test]
fn xe_refuses_a_malformed_packet_inside_write() {
    // xe_vfio_pci_resume_write -> xe_sriov_pf_migration_write -> (per packet)
    // xe_sriov_pf_migration_restore_produce: a packet of no known type, tile or GT is
    // "Received invalid restore packet" and -EINVAL, inside write().
    let garbage = [0xa5u8; 256];
    let (d, w, _) = resume(XE, &garbage);
    assert_eq!(w, libc::EINVAL, "{:?}", d.handle().status());
}

#[test]
fn xe_takes_a_well_formed_stream_in_write_and_restores_it_at_resuming_to_stop() {
    // A well-formed stream of another VF passes write() (the PF queues its packets) and is
    // refused only when the restore completes (xe_sriov_vfio_resume_data_exit at
    // RESUMING -> STOP); the VF's own stream loads.
    let foreign = stop_copy_stream("mock:v2,size=64K,seed=6,profile=xe");
    let (_, w, s) = resume(XE, &foreign);
    assert_eq!(w, 0);
    assert_ne!(s, 0);
    let own = stop_copy_stream(XE);
    let (d, w, s) = resume(XE, &own);
    assert_eq!((w, s), (0, 0));
    assert_eq!(state(&d), Some(MigState::Stop));
}

#[test]
fn xe_answers_a_failed_size_query_with_the_error_as_a_length() {
    // xe_vfio_pci_get_data_size stores xe_sriov_vfio_stop_copy_size()'s ssize_t (the PF's
    // total, or -errno) into the unsigned stop_copy_length and returns 0: the ioctl
    // succeeds and a failure reads as a length of 2^64 - errno. Other drivers fail the
    // ioctl (mlx5vf_pci_get_data_size returns the error).
    let d = dev(&format!("{XE},fail-at=data-size@1"));
    let len = feature::data_size(&d).unwrap();
    assert_eq!(len, (libc::EIO as u64).wrapping_neg());
    assert!(
        feature::data_size(&d).unwrap() < 1 << 20,
        "the next query succeeds"
    );
    let m = dev("mock:v2,size=64K,profile=mlx5,fail-at=data-size@1");
    assert_eq!(code(feature::data_size(&m)), libc::EIO);
}

#[test]
fn xe_saves_at_stop_copy_only() {
    // xe_vfio_pci_migration_init: STOP_COPY | P2P; STOP -> STOP_COPY opens the save file.
    let d = dev(XE);
    let fd = DataFd::new(feature::set_state(&d, MigState::StopCopy).unwrap().unwrap());
    drop(fd);
    assert_eq!(state(&d), Some(MigState::StopCopy));
}
