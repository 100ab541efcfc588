// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The pre-copy policy against mock devices with dirty rates: convergence, non-convergence
//! (reported, or refused under a strict policy with the source rolled back), and the downtime
//! estimate the engine reports.

use std::time::Duration;

use vfio_mig::Error;
use vfio_mig::{NoObserver, PreCopyPolicy, SaveOptions, SwitchReason};
use vfio_mig_session::handshake::migrate_local;
use vfio_mig_tests::{assert_destination_safe, assert_source_running, handle, mock};

fn opts(policy: PreCopyPolicy) -> SaveOptions {
    SaveOptions {
        live: true,
        policy,
        buffer: 256 << 10,
        ..Default::default()
    }
}

#[test]
fn a_quiet_device_converges_within_the_downtime_budget() {
    let spec = "mock:v2,size=8M,seed=1";
    let (mut src, mut dst) = (mock(spec), mock(spec));
    let report = migrate_local(
        src.device.as_mut(),
        dst.device.as_mut(),
        &opts(PreCopyPolicy::default()),
        &NoObserver,
        &NoObserver,
    )
    .unwrap();
    assert_eq!(report.save.switch_reason, Some(SwitchReason::Converged));
    assert!(report.save.bandwidth.is_some_and(|b| b > 0), "{report:?}");
    assert!(report.save.estimated_downtime.is_some(), "{report:?}");
    assert!(handle(&dst).status().resumed_ok);
}

#[test]
fn a_device_dirtying_faster_than_the_link_is_reported_not_converging() {
    // Every page is dirty again by the end of each round: pending never falls.
    let spec = "mock:v1,size=2M,seed=2,chunk=64K,dirty-rate=1000G";
    let (mut src, mut dst) = (mock(spec), mock(spec));
    let policy = PreCopyPolicy {
        downtime_budget: Duration::ZERO,
        max_rounds: 50,
        stall_rounds: 3,
        ..Default::default()
    };
    let report = migrate_local(
        src.device.as_mut(),
        dst.device.as_mut(),
        &opts(policy),
        &NoObserver,
        &NoObserver,
    )
    .unwrap();
    assert_eq!(
        report.save.switch_reason,
        Some(SwitchReason::NotConverging),
        "{report:?}"
    );
    assert!(report.save.rounds < 50, "stopped early: {report:?}");
    assert_eq!(handle(&src).state_digest(), handle(&dst).state_digest());
}

/// Migrates `src_spec` to `dst_spec` under a strict `policy` that must refuse to switch
/// over: a pre-copy failure rolled back, its text holding `why`, the source running again and
/// the destination safe.
fn strict_refusal(src_spec: &str, dst_spec: &str, policy: PreCopyPolicy, why: &str) {
    let (mut src, mut dst) = (mock(src_spec), mock(dst_spec));
    let err = migrate_local(
        src.device.as_mut(),
        dst.device.as_mut(),
        &opts(policy),
        &NoObserver,
        &NoObserver,
    )
    .unwrap_err();
    let text = vfio_mig::error::Report(&err).to_string();
    assert!(
        matches!(&err, vfio_mig_session::Error::Core(Error::RolledBack { source, .. }) if matches!(**source, Error::PreCopy(_))),
        "{text}"
    );
    assert!(text.contains(why), "{text}");
    assert_source_running(&handle(&src).status(), why);
    assert_destination_safe(&handle(&dst).status(), why);
}

#[test]
fn a_strict_policy_refuses_to_exceed_the_budget_and_rolls_back() {
    let spec = "mock:v1,size=2M,seed=3,chunk=64K,dirty-rate=1000G";
    let policy = PreCopyPolicy {
        downtime_budget: Duration::ZERO,
        stall_rounds: 2,
        strict: true,
        ..Default::default()
    };
    strict_refusal(spec, spec, policy, "NotConverging");
}

/// MIG_DATA_SIZE failing during pre-copy leaves the stop-copy size unknown: QEMU then counts
/// `VFIO_MIG_STOP_COPY_SIZE` (100 GiB) "so downtime limit won't be violated", so a strict
/// budget, however generous, is never met and the migration fails with the source running.
#[test]
fn a_strict_budget_never_switches_over_on_an_unknown_stop_copy_size() {
    let faults: Vec<String> = (1..=64).map(|n| format!("fail-at=data-size@{n}")).collect();
    let spec = "mock:v2,size=256K,seed=1";
    let policy = PreCopyPolicy {
        downtime_budget: Duration::from_secs(3600),
        strict: true,
        ..Default::default()
    };
    strict_refusal(
        &format!("{spec},{}", faults.join(",")),
        spec,
        policy,
        "unknown (MIG_DATA_SIZE failed)",
    );
}
