// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The v1 rules, driven through `V1Device` against the mock: state checks before writing,
//! read-modify-write, read-back and reset on failure, pre-copy to stop-and-copy with bytes
//! pending, chunk sizes, and refusals of bad or foreign streams.

use vfio_mig::Error;
use vfio_mig::{backend::v1_state::V1State, backend::V1Device};
use vfio_mig::{NoObserver, PreCopyPolicy, SaveOptions, SwitchReason};
use vfio_mig_session::handshake::migrate_local;
use vfio_mig_tests::StatusExt;
use vfio_mig_tests::{
    assert_destination_safe, assert_source_running, handle, load_from_slice, mock, save_to_vec,
};

/// The mock's default reserved bits (bits 3-31 of device_state).
const RESERVED: u32 = 0x8000_0100;

fn v1(spec: &str) -> (V1Device, vfio_mig_mock::MockHandle) {
    let dev = mock(spec);
    let h = handle(&dev);
    (V1Device::open(dev.io.clone()).unwrap(), h)
}

#[test]
fn error_and_invalid_states_are_refused_before_anything_is_written() {
    // The first device_state write fails: if a refused request wrote anything, the legitimate
    // request after it would succeed instead.
    let (mut dev, h) = v1("mock:v1,size=8K,fail-at=state-write@1");
    for bad in [V1State::Error, V1State::Invalid(5), V1State::Invalid(7)] {
        let err = dev.set_state(bad).unwrap_err();
        assert!(matches!(err, Error::Protocol { .. }), "{bad}: {err}");
    }
    let err = dev.set_state(V1State::Stop).unwrap_err();
    assert!(matches!(err, Error::Transition { .. }), "{err}");
    assert_eq!(h.status().v1_state(), V1State::Running);
}

#[test]
fn transitions_outside_the_uapi_table_are_refused() {
    let (mut dev, _h) = v1("mock:v1,size=8K");
    dev.set_state(V1State::Resuming).unwrap();
    let err = dev.set_state(V1State::StopCopy).unwrap_err();
    assert!(
        vfio_mig::error::Report(&err)
            .to_string()
            .contains("no transition"),
        "{err}"
    );
    let err = dev.set_state(V1State::PreCopy).unwrap_err();
    assert!(
        vfio_mig::error::Report(&err)
            .to_string()
            .contains("no transition"),
        "{err}"
    );
}

#[test]
fn state_writes_preserve_reserved_bits() {
    let (mut dev, h) = v1("mock:v1,size=8K");
    for target in [
        V1State::PreCopy,
        V1State::StopCopy,
        V1State::Running,
        V1State::Stop,
    ] {
        dev.set_state(target).unwrap();
        let raw = h.status().state_raw;
        assert_eq!(raw & !7, RESERVED, "{target}: {raw:#x}");
        assert_eq!(V1State::from_raw(raw), target);
    }
}

#[test]
fn failed_write_is_reported_with_the_state_read_back() {
    let (mut dev, h) = v1("mock:v1,size=8K,fail-at=state-write@1:EBUSY");
    let err = dev.set_state(V1State::PreCopy).unwrap_err();
    let text = vfio_mig::error::Report(&err).to_string();
    assert!(text.contains("now in RUNNING"), "{text}");
    assert!(text.contains("os error 16"), "{text}");
    assert_eq!(h.status().resets, 0);
}

#[test]
fn error_state_after_a_failed_write_leads_to_a_reset() {
    let (mut dev, h) = v1("mock:v1,size=8K,fail-at=state-write@1:error");
    let err = dev.set_state(V1State::PreCopy).unwrap_err();
    let text = vfio_mig::error::Report(&err).to_string();
    assert!(text.contains("ERROR (110b), so it was reset"), "{text}");
    let st = h.status();
    assert_eq!(st.resets, 1);
    assert_eq!(st.v1_state(), V1State::Running);
}

#[test]
fn precopy_may_switch_over_with_bytes_still_pending() {
    // A device dirtying 2 GiB/s cannot converge; after one round the policy switches anyway.
    let spec = "mock:v1,size=2M,seed=9,chunk=64K,dirty-rate=2G";
    let mut src = mock(spec);
    let mut dst = mock(spec);
    let opts = SaveOptions {
        live: true,
        policy: PreCopyPolicy {
            downtime_budget: std::time::Duration::ZERO,
            switchover_bytes: 0,
            max_rounds: 1,
            stall_rounds: 100,
            ..Default::default()
        },
        buffer: 64 << 10,
        ..Default::default()
    };
    let report = migrate_local(
        src.device.as_mut(),
        dst.device.as_mut(),
        &opts,
        &NoObserver,
        &NoObserver,
    )
    .unwrap();
    assert_eq!(report.save.switch_reason, Some(SwitchReason::MaxRounds));
    assert!(
        report.save.pre_copy_bytes > 0 && report.save.stop_copy_bytes > 0,
        "{report:?}"
    );
    assert!(handle(&src).status().dirtied_pages > 0);
    assert!(handle(&dst).status().resumed_ok);
    assert_eq!(handle(&src).state_digest(), handle(&dst).state_digest());
}

#[test]
fn dirtying_device_needs_several_rounds_and_the_destination_gets_the_latest_state() {
    let spec = "mock:v1,size=1M,seed=2,chunk=16K,dirty-rate=64M";
    let mut src = mock(spec);
    let mut dst = mock(spec);
    let opts = SaveOptions {
        live: true,
        policy: PreCopyPolicy {
            switchover_bytes: 64 << 10,
            max_rounds: 50,
            ..Default::default()
        },
        buffer: 16 << 10,
        ..Default::default()
    };
    let report = migrate_local(
        src.device.as_mut(),
        dst.device.as_mut(),
        &opts,
        &NoObserver,
        &NoObserver,
    )
    .unwrap();
    assert!(report.save.rounds >= 1, "{report:?}");
    assert!(handle(&dst).status().resumed_ok);
    assert_eq!(handle(&src).state_digest(), handle(&dst).state_digest());
}

#[test]
fn wrong_seed_on_the_destination_is_refused_at_resume_and_reset() {
    let mut src = mock("mock:v1,size=64K,seed=1");
    let mut dst = mock("mock:v1,size=64K,seed=2");
    let err = migrate_local(
        src.device.as_mut(),
        dst.device.as_mut(),
        &SaveOptions::default(),
        &NoObserver,
        &NoObserver,
    )
    .unwrap_err();
    assert!(
        vfio_mig::error::Report(&err)
            .to_string()
            .contains("RESUMING (100b) -> RUNNING (001b)"),
        "{err}"
    );
    assert_source_running(&handle(&src).status(), "wrong seed");
    let st = handle(&dst).status();
    assert_destination_safe(&st, "wrong seed");
    assert!(st.resets >= 1);
}

#[test]
fn corrupt_stream_is_refused_and_the_destination_reset() {
    let mut src = mock("mock:v1,size=64K,seed=4,chunk=8K");
    let (mut stream, _) = save_to_vec(&mut src, &SaveOptions::default()).unwrap();
    // A bit flip in the middle of the stream (inside some record's payload).
    let mid = stream.len() / 2;
    stream[mid] ^= 0x10;
    let mut dst = mock("mock:v1,size=64K,seed=4,chunk=8K");
    let err = load_from_slice(&mut dst, &stream).unwrap_err();
    assert!(
        vfio_mig::error::Report(&err)
            .to_string()
            .to_lowercase()
            .contains("crc"),
        "{err}"
    );
    assert_destination_safe(&handle(&dst).status(), "bit flip");
}

#[test]
fn truncated_stream_never_resumes_the_destination() {
    let mut src = mock("mock:v1,size=32K,seed=4,chunk=4K");
    let (stream, _) = save_to_vec(&mut src, &SaveOptions::default()).unwrap();
    for cut in (0..stream.len()).step_by(97) {
        let mut dst = mock("mock:v1,size=32K,seed=4,chunk=4K");
        let err = load_from_slice(&mut dst, &stream[..cut]).unwrap_err();
        assert!(!vfio_mig::error::Report(&err).to_string().is_empty());
        assert_destination_safe(&handle(&dst).status(), &format!("cut at {cut}"));
    }
}

#[test]
fn stream_of_another_device_model_is_refused_before_the_device_is_touched() {
    let mut src = mock("mock:v1,size=16K,seed=4");
    let (stream, _) = save_to_vec(&mut src, &SaveOptions::default()).unwrap();
    // Claim another model in the header by editing the model bytes (and fixing nothing else:
    // the header CRC must catch it first).
    let pos = stream.windows(7).position(|w| w == b"mock:v1").unwrap();
    let mut tampered = stream.clone();
    tampered[pos + 6] = b'2';
    let mut dst = mock("mock:v1,size=16K,seed=4");
    let err = load_from_slice(&mut dst, &tampered).unwrap_err();
    assert!(
        vfio_mig::error::Report(&err)
            .to_string()
            .to_lowercase()
            .contains("crc"),
        "{err}"
    );
    let st = handle(&dst).status();
    assert_eq!((st.resets, st.v1_state()), (0, V1State::Running), "{st:?}");
}

#[test]
fn source_is_stopped_after_a_save_and_runs_again_when_recovered() {
    let mut src = mock("mock:v1,size=16K,seed=4");
    save_to_vec(&mut src, &SaveOptions::default()).unwrap();
    assert_eq!(handle(&src).status().v1_state(), V1State::Stop);
    let r = src.device.recover();
    assert_eq!(r, vfio_mig::Recovery::Resumed);
    assert_eq!(handle(&src).status().v1_state(), V1State::Running);
}
