// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vfio-mig migrating libvfio-user's sample server device to a second sample server, with
//! the state checked through the socket: the oracle is the server itself (it aborts unless it
//! received exactly its whole state) and its BARs read back over vfio-user.

mod common;

use std::sync::Arc;

use common::*;
use vfio_mig::device::DeviceIo;
use vfio_mig::engine::{NoObserver, SaveOptions};
use vfio_mig::handshake::migrate_local;
use vfio_mig::v2::{MigState, V2Device};

fn v2(dev: &Arc<vfio_mig_user::VfioUserDevice>) -> V2Device {
    V2Device::open(dev.clone() as Arc<dyn DeviceIo>).unwrap()
}

fn migrate(live: bool) {
    if skipped() {
        return;
    }
    let (mut a, mut b) = (Server::start(), Server::start());
    let (src_io, dst_io) = (a.connect(), b.connect());
    let (bar0, bar1) = prime(src_io.as_ref(), 7);
    // The destination starts with other content, so that a copy is visible.
    let before = read_region(dst_io.as_ref(), BAR1, BAR1_SIZE);
    assert_ne!(before, bar1);
    let (mut src, mut dst) = (v2(&src_io), v2(&dst_io));
    let opts = SaveOptions {
        live,
        ..SaveOptions::default()
    };
    let report = migrate_local(&mut src, &mut dst, &opts, &NoObserver, &NoObserver)
        .unwrap_or_else(|e| panic!("{e}\nsource: {}\ndestination: {}", a.log(), b.log()));
    assert_eq!(dst.state().unwrap(), MigState::Running);
    assert_eq!(src.state().unwrap(), MigState::Stop);
    assert_eq!(read_region(dst_io.as_ref(), BAR1, BAR1_SIZE), bar1);
    assert_eq!(bar0_value(dst_io.as_ref()), bar0);
    if live {
        assert_eq!(report.save.pre_copy_bytes, 0, "{report:?}");
        // The sample logs "transition to device state 3" (VFU_MIGR_STATE_PRE_COPY).
        assert!(
            a.log().contains("transition to device state 3"),
            "{}",
            a.log()
        );
    } else {
        assert!(
            !a.log().contains("transition to device state 3"),
            "{}",
            a.log()
        );
    }
    // Both servers are alive (an incomplete state aborts the sample) and end cleanly when
    // their client hangs up.
    drop((src, dst, src_io, dst_io));
    assert!(a.wait_exit().success(), "{}", a.log());
    assert!(b.wait_exit().success(), "{}", b.log());
}

#[test]
fn stop_and_copy_between_two_sample_servers() {
    migrate(false);
}

/// vfio-user has no `VFIO_MIG_GET_PRECOPY_INFO`: as QEMU does when that ioctl fails
/// (`vfio_query_precopy_size` leaves both sizes 0), pre-copy counts no pending bytes, so the
/// engine enters PRE_COPY while the device runs and switches to stop-and-copy without
/// reading pre-copy data.
#[test]
fn live_between_two_sample_servers() {
    migrate(true);
}
