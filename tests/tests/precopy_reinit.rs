// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Issue 19: mlx5's PRE_COPY re-initialisation (the 2026 REINIT series). The expectations come
//! from the uAPI text of `VFIO_PRECOPY_INFO_REINIT` (include/uapi/linux/vfio.h) and from
//! `mlx5vf_precopy_ioctl` (drivers/vfio/pci/mlx5/main.c): after the PRECOPY_INFOv2 opt-in, a
//! firmware in MIGRATION_INIT makes every unread byte (read-ahead and a new SAVE) initial
//! data, sets the REINIT flag and restarts the dirty bytes at 0; without the opt-in the flags
//! stay 0 and the same bytes are dirty bytes.

use vfio_mig::device::DeviceIo;
use vfio_mig::v2::feature;
use vfio_mig::v2::{DataFd, DataRead, MigState};
use vfio_mig_mock::MockSpec;
use vfio_mig_tests::v2_mock::{dev, read_to_end};

const MLX5: &str = "mock:v2,size=64K,seed=3,profile=mlx5,reinit-at=2";

#[test]
fn mlx5_reports_reinit_after_the_opt_in_and_counts_the_unread_bytes_as_initial() {
    let d = dev(MLX5);
    feature::enable_precopy_info_v2(&d).unwrap();
    let fd = DataFd::new(feature::set_state(&d, MigState::PreCopy).unwrap().unwrap());
    let first = feature::precopy_info(&d, fd.session(), true).unwrap();
    assert!(!first.reinit && first.initial_bytes > 0, "{first:?}");
    let (pre, end) = read_to_end(&d, &fd);
    assert_eq!(
        end,
        DataRead::NoMessage,
        "mlx5 answers ENOMSG at the temporary end"
    );
    assert_eq!(pre.len() as u64, first.initial_bytes);
    // The second query finds the firmware re-initialised.
    let again = feature::precopy_info(&d, fd.session(), true).unwrap();
    assert!(again.reinit, "{again:?}");
    assert_eq!(again.dirty_bytes, 0, "dirty bytes restart at 0");
    assert!(again.initial_bytes > 0, "{again:?}");
    // The new initial data is what the fd yields next, and then it is used up.
    let (new, _) = read_to_end(&d, &fd);
    assert_eq!(new.len() as u64, again.initial_bytes);
    let after = feature::precopy_info(&d, fd.session(), true).unwrap();
    assert!(!after.reinit && after.initial_bytes == 0, "{after:?}");
    assert_eq!(d.handle().status().reinits, 1);
}

#[test]
fn mlx5_without_the_opt_in_reports_no_flag_and_counts_the_new_data_as_dirty() {
    let d = dev(MLX5);
    let fd = DataFd::new(feature::set_state(&d, MigState::PreCopy).unwrap().unwrap());
    // The first query, then the initial data, then the query that finds the reinit.
    d.precopy_info(fd.session()).unwrap();
    drop(read_to_end(&d, &fd));
    let raw = d.precopy_info(fd.session()).unwrap();
    assert_eq!(raw.flags, 0, "flags are reserved without the opt-in");
    assert_eq!(raw.initial_bytes, 0);
    assert!(raw.dirty_bytes > 0);
    assert_eq!(read_to_end(&d, &fd).0.len() as u64, raw.dirty_bytes);
}

#[test]
fn reinit_at_is_an_mlx5_option() {
    for spec in [
        "mock:v2,profile=mtty,reinit-at=1",
        "mock:v2,reinit-at=1",
        "mock:v2,profile=mlx5,reinit-at=0",
        "mock:v1,reinit-at=1",
    ] {
        assert!(spec.parse::<MockSpec>().is_err(), "{spec}");
    }
    let s: MockSpec = MLX5.parse().unwrap();
    assert_eq!(s.to_string().parse::<MockSpec>().unwrap(), s);
}
