// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The point of no return of a unit: once one destination device entered RUNNING it runs the
//! migrated state (an mlx5 VF may have sent queued work), so the source must never run that
//! state again, even when a sibling destination device then fails to run. QEMU leaves its
//! source in postmigrate after the switchover; here the sources stay stopped (or reset), the
//! destination keeps its completion record, and the error names what runs and what was reset.

use vfio_mig::error::Report;
use vfio_mig::wire::StreamHeader;
use vfio_mig::{MigrationDevice, NoObserver, SaveOptions};
use vfio_mig_fence::{Admission, Fence, MemoryFence};
use vfio_mig_session::handshake::migrate_pairs_channels;
use vfio_mig_tests::{handle, mock, MockDevice};

/// Two P2P devices (mtty's flags: STOP_COPY | P2P | PRE_COPY).
const SPEC: &str = "mock:v2,size=1M,chunk=64K";

fn unit(fault_on: Option<usize>, fault: &str) -> Vec<MockDevice> {
    (0..2)
        .map(|i| {
            let seeded = format!("{SPEC},seed={}", i + 1);
            match fault_on {
                Some(f) if f == i => mock(&format!("{seeded},{fault}")),
                _ => mock(&seeded),
            }
        })
        .collect()
}

/// Migrates a two-device unit whose destination device `failing` cannot enter RUNNING, over
/// `channels` connections, and checks the outcome past the point of no return.
fn second_device_fails_to_run(channels: u16, live: bool, failing: usize) {
    let context = format!("channels={channels} live={live} failing={failing}");
    let mut srcs = unit(None, "");
    let mut dsts = unit(Some(failing), "fail-at=set-state:RUNNING@1");
    let mut s: Vec<&mut dyn MigrationDevice> =
        srcs.iter_mut().map(|d| d.device.as_mut() as _).collect();
    let mut d: Vec<&mut dyn MigrationDevice> =
        dsts.iter_mut().map(|d| d.device.as_mut() as _).collect();
    let header = StreamHeader::new(&s.iter().map(|x| &**x).collect::<Vec<_>>(), live, 1).unwrap();
    let mut fence = MemoryFence::new();
    let opts = SaveOptions {
        live,
        buffer: 64 << 10,
        ..SaveOptions::default()
    };
    let err = migrate_pairs_channels(
        &mut s,
        &mut d,
        &header,
        &opts,
        &mut fence,
        &NoObserver,
        &NoObserver,
        channels,
    )
    .expect_err("a destination device failed to run: the migration cannot succeed");
    let text = Report(&err).to_string();
    assert!(!text.contains('\n'), "{context}: one line: {text}");
    if failing == 0 {
        // The devices enter RUNNING in order: when the first cannot, none runs the state yet,
        // so this is an ordinary failure: every destination reset, every source running again,
        // no completion record.
        for (i, dst) in dsts.iter().enumerate() {
            let st = handle(dst).status();
            assert!(
                !st.resumed_ok || st.resets > 0,
                "{context}: destination {i} runs the state though the first could not: {st:?}"
            );
        }
        for (i, src) in srcs.iter().enumerate() {
            let st = handle(src).status();
            assert!(
                st.is_running(),
                "{context}: source {i} not running again: {st:?}; {text}"
            );
        }
        assert!(!text.contains("point of no return"), "{context}: {text}");
        assert_ne!(
            fence.admit(&header).unwrap(),
            Admission::AlreadyCompleted,
            "{context}: nothing ran, so no completion record stays"
        );
        return;
    }
    let ran = 1 - failing;
    let (ran_status, failed_status) =
        (handle(&dsts[ran]).status(), handle(&dsts[failing]).status());
    // The oracle: the kernel uAPI (RUNNING means the device runs the loaded state) and the
    // mock's own verification of what it loaded.
    assert!(ran_status.resumed_ok, "{context}: {ran_status:?}");
    assert_eq!(
        handle(&srcs[ran]).state_digest(),
        handle(&dsts[ran]).state_digest(),
        "{context}: the running destination keeps the migrated state"
    );
    assert!(
        !failed_status.resumed_ok && failed_status.resets > 0,
        "{context}: the device that could not run is reset: {failed_status:?}"
    );
    for (i, src) in srcs.iter().enumerate() {
        let st = handle(src).status();
        assert!(
            !st.is_running() && st.state_name() != "PRE_COPY",
            "{context}: source {i} runs the state destination {ran} already runs: {st:?}; {text}"
        );
    }
    assert!(
        text.contains("point of no return"),
        "{context}: the error says the state runs at the destination: {text}"
    );
    assert_eq!(
        fence.admit(&header).unwrap(),
        Admission::AlreadyCompleted,
        "{context}: the destination keeps its completion record (a retry must not run it again)"
    );
}

#[test]
fn a_device_that_fails_to_run_after_its_peer_ran_never_resumes_the_source() {
    for channels in [1, 2] {
        for live in [false, true] {
            for failing in [0, 1] {
                second_device_fails_to_run(channels, live, failing);
            }
        }
    }
}
