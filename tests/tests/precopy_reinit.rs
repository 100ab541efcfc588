// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Issue 19: mlx5's PRE_COPY re-initialisation (the 2026 REINIT series). The expectations come
//! from the uAPI text of `VFIO_PRECOPY_INFO_REINIT` (include/uapi/linux/vfio.h) and from
//! `mlx5vf_precopy_ioctl` (drivers/vfio/pci/mlx5/main.c): after the PRECOPY_INFOv2 opt-in, a
//! firmware in MIGRATION_INIT makes every unread byte (read-ahead and a new SAVE) initial
//! data, sets the REINIT flag and restarts the dirty bytes at 0; without the opt-in the flags
//! stay 0 and the same bytes are dirty bytes.

use std::sync::atomic::{AtomicBool, Ordering};

use vfio_mig::backend::v2_feature as feature;
use vfio_mig::backend::v2_state::MigState;
use vfio_mig::backend::DataFd;
use vfio_mig::backend::DataRead;
use vfio_mig::backend::DeviceIo;
use vfio_mig::error::Report;
use vfio_mig::wire::Phase;
use vfio_mig::wire::StreamHeader;
use vfio_mig::Event;
use vfio_mig::MigrationDevice;
use vfio_mig::NoObserver;
use vfio_mig::Observer;
use vfio_mig::SaveOptions;
use vfio_mig::{resume, DestinationOptions, Epoch, Source, SourceOptions};
use vfio_mig_fence::MemoryFence;
use vfio_mig_mock::{MockHandle, MockSpec};
use vfio_mig_session::handshake::{migrate_local, migrate_pairs_channels};
use vfio_mig_tests::v2_mock::{dev, read_to_end};
use vfio_mig_tests::{handle, mock, MockDevice};

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

/// The destination's observer re-initialises source device 0 when destination device 0 ends
/// its pre-copy phase: after the source's last query of its pre-copy, just before the
/// destination acknowledges the pre-copy data (SWITCHOVER_ACK).
struct ReinitAtAck {
    src: MockHandle,
    fired: AtomicBool,
}

impl Observer for ReinitAtAck {
    fn on_event(&self, event: &Event) {
        if let Event::PhaseEnded {
            device: 0,
            phase: Phase::PreCopy,
            ..
        } = event
        {
            if !self.fired.swap(true, Ordering::SeqCst) {
                self.src.reinit();
            }
        }
    }
}

/// A live migration of `devices` mlx5 devices over `channels` connections whose source
/// device 0 re-initialises as the destination acknowledges the pre-copy data.
fn reinit_at_the_ack(devices: usize, channels: u16) {
    let context = format!("devices={devices} channels={channels}");
    let spec = |i: usize| format!("mock:v2,size=256K,seed={},profile=mlx5", i + 1);
    let mut srcs: Vec<MockDevice> = (0..devices).map(|i| mock(&spec(i))).collect();
    let mut dsts: Vec<MockDevice> = (0..devices).map(|i| mock(&spec(i))).collect();
    let obs = ReinitAtAck {
        src: handle(&srcs[0]),
        fired: AtomicBool::new(false),
    };
    let mut s: Vec<&mut dyn MigrationDevice> =
        srcs.iter_mut().map(|d| d.device.as_mut() as _).collect();
    let mut d: Vec<&mut dyn MigrationDevice> =
        dsts.iter_mut().map(|d| d.device.as_mut() as _).collect();
    let header = StreamHeader::new(&s.iter().map(|x| &**x).collect::<Vec<_>>(), true, 1).unwrap();
    let opts = SaveOptions {
        live: true,
        ..SaveOptions::default()
    };
    let reports = migrate_pairs_channels(
        &mut s,
        &mut d,
        &header,
        &opts,
        &mut MemoryFence::new(),
        &NoObserver,
        &obs,
        channels,
    )
    .unwrap_or_else(|e| panic!("{context}: {}", Report(&e)));
    let src0 = handle(&srcs[0]).status();
    assert_eq!(src0.reinits, 1, "{context}: the source saw the REINIT");
    // The uAPI: leave PRE_COPY only once the initial bytes reached 0; QEMU 11.1 sends the
    // new initial data in pre-copy and waits for the destination's ack again. The whole
    // device was saved anew, so stop-and-copy carrying little shows it moved before the stop.
    let save = &reports[0].save;
    assert!(
        save.stop_copy_bytes < 256 << 10,
        "{context}: the re-initialised device's new initial data went in stop-and-copy \
         ({} bytes; pre-copy {}): the ack given before the REINIT was taken as final",
        save.stop_copy_bytes,
        save.pre_copy_bytes
    );
    assert!(save.pre_copy_bytes > 2 * (256 << 10), "{context}: {save:?}");
    for (i, dst) in dsts.iter().enumerate() {
        let st = handle(dst).status();
        assert!(
            st.is_running() && st.resumed_ok,
            "{context}: destination {i}: {st:?}"
        );
    }
}

#[test]
fn a_switchover_ack_before_a_reinit_is_not_final_over_one_connection() {
    reinit_at_the_ack(1, 1);
    reinit_at_the_ack(2, 1);
}

#[test]
fn a_switchover_ack_before_a_reinit_is_not_final_over_channels() {
    reinit_at_the_ack(2, 2);
}

/// Rounds until every device's initial bytes were sent (at most 50).
fn rounds_until_initial_sent<D: MigrationDevice>(source: &mut Source<D>, wire: &mut Vec<u8>) {
    for _ in 0..50 {
        if source.round(wire, None).unwrap().estimate.initial_bytes == 0 {
            return;
        }
    }
    panic!("the initial bytes never reached 0");
}

#[test]
fn the_front_door_refuses_a_switch_over_that_would_carry_new_initial_data() {
    let spec = "mock:v2,size=256K,seed=9,profile=mlx5";
    let src = mock(spec);
    let src_handle = handle(&src);
    let mut dst = mock(spec);
    let mut source = Source::start(vec![src.opened.device], &SourceOptions::new(Epoch(1))).unwrap();
    let mut wire = Vec::new();
    rounds_until_initial_sent(&mut source, &mut wire);
    // The firmware re-initialises after the VMM's last estimate said the initial bytes were
    // out: the switch-over's own last query finds the REINIT (QEMU checks it there too) and
    // refuses, leaving the migration in pre-copy.
    src_handle.reinit();
    let e = source.switch_over(&mut wire).unwrap_err();
    let text = Report(&e).to_string();
    assert!(text.contains("REINIT"), "{text}");
    assert!(!source.switched_over());
    let estimate = source.estimate().unwrap();
    assert!(estimate.initial_bytes > 0, "{estimate:?}");
    rounds_until_initial_sent(&mut source, &mut wire);
    let before_stop = wire.len();
    source.switch_over(&mut wire).unwrap();
    assert!(
        wire.len() - before_stop < 256 << 10,
        "the new initial data went in stop-and-copy ({} bytes)",
        wire.len() - before_stop
    );
    resume(
        &mut [dst.device.as_mut()],
        &wire[..],
        &DestinationOptions::new(),
    )
    .unwrap();
    assert_eq!(src_handle.state_digest(), handle(&dst).state_digest());
    assert!(handle(&dst).status().resumed_ok);
    drop(source.finish());
}

#[test]
fn a_reinit_during_pre_copy_keeps_the_switch_over_waiting_for_the_new_initial_bytes() {
    // The policy switches over only once the initial bytes are sent (the uAPI's
    // recommendation, QEMU's switchover-ack point); new initial bytes count as well.
    let spec = "mock:v2,size=256K,seed=4,profile=mlx5,reinit-at=2";
    let mut src = mock(spec);
    let mut dst = mock(spec);
    let opts = SaveOptions {
        live: true,
        ..SaveOptions::default()
    };
    let report = migrate_local(
        src.device.as_mut(),
        dst.device.as_mut(),
        &opts,
        &NoObserver,
        &NoObserver,
    )
    .unwrap_or_else(|e| panic!("{}", Report(&e)));
    assert_eq!(handle(&src).status().reinits, 1);
    assert!(
        report.save.stop_copy_bytes < 256 << 10,
        "the new initial data went in stop-and-copy: {:?}",
        report.save
    );
    assert!(handle(&dst).status().resumed_ok);
}

#[test]
fn a_round_s_estimate_says_a_device_re_initialised_during_the_round() {
    // The round's own query (what the device has pending when its turn begins) is the one
    // that finds the REINIT; the estimate the round returns must still say so.
    let spec = "mock:v2,size=256K,seed=10,profile=mlx5";
    let src = mock(spec);
    let src_handle = handle(&src);
    let mut source = Source::start(vec![src.opened.device], &SourceOptions::new(Epoch(1))).unwrap();
    let mut wire = Vec::new();
    rounds_until_initial_sent(&mut source, &mut wire);
    src_handle.reinit();
    let round = source.round(&mut wire, Some(4096)).unwrap();
    assert!(round.estimate.reinit, "{:?}", round.estimate);
    assert!(round.estimate.initial_bytes > 0, "{:?}", round.estimate);
    assert!(!source.estimate().unwrap().reinit, "said once");
    drop(source.cancel());
}
