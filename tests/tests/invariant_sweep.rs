// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The invariant sweep: a single fault at every step of either side (every access count of
//! every fault field of the mock, until the fault no longer fires), for units of 1 to 4
//! devices, over one connection and over two channels, for every driver profile in
//! [`PROFILES`]. Every run records the timeline of all devices of both sides and checks after
//! every step that no device state is live on both sides at once and that no destination runs
//! before its whole unit verified, and at the end that every device is in its start state,
//! the handed-off state, or reset with the error saying so ([`vfio_mig_tests::timeline`]).

use vfio_mig::error::Report;
use vfio_mig::wire::StreamHeader;
use vfio_mig::{MigrationDevice, NoObserver, PreCopyPolicy, SaveOptions};
use vfio_mig_fence::MemoryFence;
use vfio_mig_mock::v2::profile::ProfileName;
use vfio_mig_session::handshake::migrate_pairs_channels;
use vfio_mig_tests::recorder::{recorder, Recorder, UnitLog};
use vfio_mig_tests::timeline::Timeline;
use vfio_mig_tests::{try_mock, MockDevice};

/// The driver profiles swept: extend this list as profiles are added.
const PROFILES: &[&str] = &["mtty", "mlx5", "hisi", "pds", "xe", "qat", "virtio", "igb"];

/// Unit sizes swept.
const UNITS: std::ops::RangeInclusive<usize> = 1..=4;

/// Channels: 1 is the one-connection handshake, 2 the channel handshake.
const CHANNELS: [u16; 2] = [1, 2];

/// Fault fields of a v2 mock on each side (`field`, suffix): every access the engine makes.
const SOURCE_FAULTS: &[(&str, &str)] = &[
    ("get-state", ""),
    ("set-state", ""),
    ("set-state", ":error"),
    ("data-size", ""),
    ("precopy-info", ""),
    ("data-read", ""),
    ("data-read", ":error"),
    ("reset", ""),
];
const DESTINATION_FAULTS: &[(&str, &str)] = &[
    ("get-state", ""),
    ("set-state", ""),
    ("set-state", ":error"),
    ("data-write", ""),
    ("data-write", ":error"),
    ("reset", ""),
];

/// Most access counts tried per field before the sweep declares the fault never stops firing.
const MAX_ACCESS: u64 = 200;

fn enters_error(name: &str) -> bool {
    let p: ProfileName = name.parse().expect("a known profile");
    p.behaviour().enters_error
}

fn profile_flags(name: &str) -> u64 {
    let p: ProfileName = name.parse().expect("a known profile");
    p.behaviour().flags
}

fn opts(live: bool, unit: usize, p2p: bool) -> SaveOptions {
    SaveOptions {
        live,
        policy: PreCopyPolicy {
            max_rounds: 3,
            ..Default::default()
        },
        buffer: 4096,
        allow_non_p2p_unit: unit > 1 && !p2p,
        ..Default::default()
    }
}

/// One migration with `fault` on the last device of one side; `None` when the fault did not
/// fire (the sweep of this field is done).
fn one_run(spec: &str, unit: usize, channels: u16, fault: &str, on_source: bool) -> Option<()> {
    let flags = profile_flags(spec.split("profile=").nth(1).unwrap_or("mtty"));
    let (live, p2p) = (flags & 0x4 != 0, flags & 0x2 != 0);
    let context = format!(
        "{spec} unit={unit} channels={channels} {} {fault}",
        if on_source { "source" } else { "destination" }
    );
    let device = |i: usize, faulty: bool| {
        let s = format!("{spec},seed={}", i + 1);
        if faulty {
            try_mock(&format!("{s},{fault}"))
        } else {
            try_mock(&s)
        }
    };
    let open = |source: bool| -> vfio_mig::Result<Vec<MockDevice>> {
        (0..unit)
            .map(|i| device(i, source == on_source && i == unit - 1))
            .collect()
    };
    let (srcs, dsts) = match open(true).and_then(|s| open(false).map(|d| (s, d))) {
        Ok(pair) => pair,
        Err(e) => {
            // The fault fired while the mock was opened: nothing was migrated.
            let text = Report(&e).to_string();
            assert!(!text.contains('\n'), "{context}: {text}");
            return Some(());
        }
    };
    let faulty = if on_source { &srcs } else { &dsts }[unit - 1]
        .handle
        .clone();
    let handles = srcs.iter().chain(&dsts).map(|d| d.handle.clone()).collect();
    let timeline = Timeline::new(handles, unit);
    let log = UnitLog::new(2 * unit);
    let wrap = |devs: Vec<MockDevice>, first: usize| -> Vec<Recorder> {
        devs.into_iter()
            .enumerate()
            .map(|(i, d)| recorder(d.opened.device, first + i, log.clone(), timeline.probe()))
            .collect()
    };
    let mut src_rec = wrap(srcs, 0);
    let mut dst_rec = wrap(dsts, unit);
    let mut s: Vec<&mut dyn MigrationDevice> = src_rec.iter_mut().map(|d| d as _).collect();
    let mut d: Vec<&mut dyn MigrationDevice> = dst_rec.iter_mut().map(|d| d as _).collect();
    let header = StreamHeader::new(&s.iter().map(|x| &**x).collect::<Vec<_>>(), live, 1).unwrap();
    let result = migrate_pairs_channels(
        &mut s,
        &mut d,
        &header,
        &opts(live, unit, p2p),
        &mut MemoryFence::new(),
        &NoObserver,
        &NoObserver,
        channels,
    );
    let replay = timeline
        .replay()
        .unwrap_or_else(|v| panic!("{context}: {v}"));
    let error = result.as_ref().err().map(|e| Report(e).to_string());
    timeline
        .check_end(error.as_deref(), replay.ran)
        .unwrap_or_else(|v| panic!("{context}: {v}"));
    (faulty.status().fault_hits > 0).then_some(())
}

/// Sweeps `fail-at={field}@N{suffix}` over N = 1, 2, ... until the fault no longer fires;
/// returns the runs made.
fn sweep(
    spec: &str,
    unit: usize,
    channels: u16,
    field: &str,
    suffix: &str,
    on_source: bool,
) -> u64 {
    for n in 1..=MAX_ACCESS {
        let fault = format!("fail-at={field}@{n}{suffix}");
        if one_run(spec, unit, channels, &fault, on_source).is_none() {
            return n;
        }
    }
    panic!("{spec} unit={unit}: {field}{suffix} still fires after {MAX_ACCESS} accesses")
}

#[test]
fn no_device_state_runs_twice_under_any_single_fault() {
    let mut runs = 0u64;
    for profile in PROFILES {
        // igb's state is its 1 KiB blob (`max_stream`): a small state in 256-byte fault blocks.
        let p: ProfileName = profile.parse().expect("a known profile");
        let spec = match p.behaviour().max_stream {
            Some(_) => {
                format!("mock:v2,size=912,page=228,chunk=256,dirty-rate=1M,profile={profile}")
            }
            None => format!("mock:v2,size=16K,page=4K,chunk=4K,dirty-rate=1M,profile={profile}"),
        };
        let mut profile_runs = 0;
        for unit in UNITS {
            for channels in CHANNELS {
                for (faults, on_source) in [(SOURCE_FAULTS, true), (DESTINATION_FAULTS, false)] {
                    for (field, suffix) in faults {
                        // Only drivers with a path into ERROR (pds) take `:error` rules; the
                        // mock refuses them for the others, as those drivers never report it.
                        if *suffix == ":error" && !enters_error(profile) {
                            continue;
                        }
                        profile_runs += sweep(&spec, unit, channels, field, suffix, on_source);
                    }
                }
            }
        }
        println!("invariant sweep: {profile}: {profile_runs} migrations");
        runs += profile_runs;
    }
    println!("invariant sweep: {runs} migrations, every one checked step by step");
    assert!(runs > 0);
}
