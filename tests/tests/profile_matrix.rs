// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The engine over every driver profile of the v2 mock: one device, live, several devices as
//! one unit (refused without P2P, then opted in), and a fault sweep over every fault field the
//! engine reaches, on both sides. One line per profile goes to the test log
//! (`cargo test --test profile_matrix -- --nocapture`):
//!
//! ```text
//! profile igb: single ok, live ok (pre-copy empty, state at stop-copy), multi refused (no P2P), multi ok (opted in without P2P), faults 7/7 sweeps (25 failed migrations, all clean)
//! ```

use vfio_mig::wire::StreamHeader;
use vfio_mig::{MigrationDevice, NoObserver, SaveOptions};
use vfio_mig_fence::MemoryFence;
use vfio_mig_mock::v2::profile::ProfileName;
use vfio_mig_mock::MockSpec;
use vfio_mig_session::handshake::{migrate_local, migrate_pairs};
use vfio_mig_tests::sweep::Sweep;
use vfio_mig_tests::{
    assert_destination_left_safe, assert_destination_safe, assert_source_running,
    fault_test_options, handle, mock, MockDevice,
};

fn has_pre_copy(profile: ProfileName) -> bool {
    profile.behaviour().flags & 0x4 != 0
}

fn has_p2p(profile: ProfileName) -> bool {
    profile.behaviour().flags & 0x2 != 0
}

/// One migration between two fresh devices of `spec`; checks the outcome either way.
fn migrate(spec: &str, live: bool) -> Result<vfio_mig_session::handshake::MigrateReport, String> {
    let (mut src, mut dst) = (mock(spec), mock(spec));
    let r = migrate_local(
        src.device.as_mut(),
        dst.device.as_mut(),
        &fault_test_options(live),
        &NoObserver,
        &NoObserver,
    );
    match r {
        Ok(report) => {
            let st = handle(&dst).status();
            assert!(
                st.resumed_ok && !st.ran_incomplete,
                "{spec} live={live}: {st:?}"
            );
            assert_eq!(handle(&src).state_digest(), handle(&dst).state_digest());
            Ok(report)
        }
        Err(e) => {
            let text = e.to_string();
            assert!(!text.contains('\n'), "{spec}: {text}");
            assert_source_running(&handle(&src).status(), spec);
            assert_destination_left_safe(&handle(&dst).status(), spec, &text);
            Err(text)
        }
    }
}

fn single(spec: &str) -> String {
    let report = migrate(spec, false).unwrap_or_else(|e| panic!("{spec}: {e}"));
    assert_eq!(report.save.pre_copy_bytes, 0, "{spec}");
    "single ok".into()
}

fn live(profile: ProfileName, spec: &str) -> String {
    match migrate(spec, true) {
        // igb's pre-copy file is empty: its whole state comes at STOP_COPY.
        Ok(report) if profile.behaviour().precopy_empty => {
            assert_eq!(report.save.pre_copy_bytes, 0, "{spec}");
            "live ok (pre-copy empty, state at stop-copy)".into()
        }
        Ok(report) if has_pre_copy(profile) => {
            assert!(report.save.pre_copy_bytes > 0, "{spec}: {:?}", report.save);
            format!("live ok (pre-copy {} B)", report.save.pre_copy_bytes)
        }
        // No PRE_COPY (pds): QEMU migrates such a device in stop-and-copy only (issue 10,
        // defect 7), and the report says so.
        Ok(report) => {
            assert_eq!(report.save.pre_copy_bytes, 0, "{spec}");
            assert!(report.save.stop_copy_only, "{spec}: {:?}", report.save);
            "live ok (stop-copy only: no PRE_COPY)".into()
        }
        Err(e) => panic!("{spec} live: {e}"),
    }
}

fn multi(profile: ProfileName, base: &str, allow_non_p2p: bool) -> String {
    let specs: Vec<String> = (1..=3).map(|s| format!("{base},seed={s}")).collect();
    let mut srcs: Vec<MockDevice> = specs.iter().map(|s| mock(s)).collect();
    let mut dsts: Vec<MockDevice> = specs.iter().map(|s| mock(s)).collect();
    let live = has_pre_copy(profile);
    let result = {
        let mut s: Vec<&mut dyn MigrationDevice> =
            srcs.iter_mut().map(|d| d.device.as_mut() as _).collect();
        let mut d: Vec<&mut dyn MigrationDevice> =
            dsts.iter_mut().map(|d| d.device.as_mut() as _).collect();
        let header =
            StreamHeader::new(&s.iter().map(|x| &**x).collect::<Vec<_>>(), live, 1).unwrap();
        let opts = SaveOptions {
            allow_non_p2p_unit: allow_non_p2p,
            ..fault_test_options(live)
        };
        migrate_pairs(
            &mut s,
            &mut d,
            &header,
            &opts,
            &mut MemoryFence::new(),
            &NoObserver,
            &NoObserver,
        )
    };
    match result {
        Ok(reports) => {
            assert!(
                has_p2p(profile) || allow_non_p2p,
                "{base}: a unit without P2P was accepted"
            );
            assert_eq!(reports.len(), 3);
            for (s, d) in srcs.iter().zip(&dsts) {
                assert!(handle(d).status().resumed_ok, "{base}");
                assert_eq!(handle(s).state_digest(), handle(d).state_digest(), "{base}");
            }
            if has_p2p(profile) {
                "multi ok".into()
            } else {
                "multi ok (opted in without P2P)".into()
            }
        }
        // Without P2P a device of a unit may DMA into a peer already stopped: issue 10
        // (defect 2) refuses such a unit by default, as QEMU does.
        Err(e) if !has_p2p(profile) && !allow_non_p2p => {
            assert!(e.to_string().contains("P2P"), "{base}: {e}");
            for (s, d) in srcs.iter().zip(&dsts) {
                assert_source_running(&handle(s).status(), base);
                assert_destination_safe(&handle(d).status(), base);
            }
            "multi refused (no P2P)".into()
        }
        Err(e) => panic!("{base} multi: {e}"),
    }
}

/// Three devices as one unit: with P2P as is; without, refused, then accepted when opted in.
fn unit(profile: ProfileName, base: &str) -> String {
    if has_p2p(profile) {
        return multi(profile, base, false);
    }
    format!(
        "{}, {}",
        multi(profile, base, false),
        multi(profile, base, true)
    )
}

/// The fault sweeps of one profile: (sweeps run, migrations failed by a fault).
fn faults(profile: ProfileName, base: &str) -> (u32, u32) {
    let live = has_pre_copy(profile);
    let mut plan: Vec<(&str, &str, bool)> = vec![
        ("get-state", "", true),
        ("set-state", "", true),
        ("set-state", ":error", true),
        ("data-read", "", true),
        ("data-read", ":error", true),
        ("get-state", "", false),
        ("set-state", "", false),
        ("set-state", ":error", false),
        ("data-write", "", false),
        ("data-write", ":error", false),
    ];
    if live {
        plan.push(("precopy-info", "", true));
    }
    // Only pds (of the profiles) has a path into ERROR; the others refuse `:error` rules.
    if !profile.behaviour().enters_error {
        plan.retain(|&(_, suffix, _)| suffix != ":error");
    }
    let mut failed = 0;
    for &(field, suffix, on_source) in &plan {
        let n = Sweep {
            spec: base.to_string(),
            field,
            suffix,
            on_source,
            opts: fault_test_options(live),
            max: 200,
        }
        .run(|n| field == "get-state" && n == 1);
        assert!(
            n > 0,
            "{base}: {field}{suffix} on_source={on_source} never fired"
        );
        failed += n;
    }
    (plan.len() as u32, failed)
}

#[test]
fn the_engine_runs_over_every_driver_profile() {
    for profile in ProfileName::ALL {
        // 48 KiB in 4 KiB fault blocks; pre-copy dirties at 8 MB/s. igb's state is its 1 KiB
        // blob: 976 bytes in 4 pages, 256-byte fault blocks.
        let base = match profile.behaviour().max_stream {
            Some(_) => format!("mock:v2,size=912,page=228,chunk=256,profile={profile}"),
            None => format!("mock:v2,size=48K,page=4K,chunk=4K,profile={profile}"),
        };
        let spec: MockSpec = format!("{base},seed=11").parse().unwrap();
        let one = format!("{spec},dirty-rate=8M");
        let (sweeps, failed) = faults(profile, &spec.to_string());
        println!(
            "profile {profile}: {}, {}, {}, faults {sweeps}/{sweeps} sweeps ({failed} failed \
             migrations, all clean)",
            single(&one),
            live(profile, &one),
            unit(profile, &base),
        );
    }
}

/// The fault sweeps of one v1 layout, on both sides: (sweeps run, migrations failed).
fn v1_faults(base: &str) -> (u32, u32) {
    let mut plan: Vec<(&str, bool)> = vec![
        ("state-read", true),
        ("state-write", true),
        ("pending", true),
        ("data-offset", true),
        ("data-size-read", true),
        ("state-write", false),
        ("data-offset", false),
        ("data-size-write", false),
    ];
    // Data accesses through the mmap are not seen by the device (no fault can fire there):
    // sweep them where some chunks are trapped.
    if base.contains("trapped") || base.contains("areas") {
        plan.extend([("data-read", true), ("data-write", false)]);
    }
    let mut failed = 0;
    for &(field, on_source) in &plan {
        let n = Sweep {
            spec: base.to_string(),
            field,
            suffix: "",
            on_source,
            opts: fault_test_options(true),
            max: 400,
        }
        // Opening reads the state once (the driver learns the reserved bits).
        .run(|n| field == "state-read" && n == 1);
        assert!(n > 0, "{base}: {field} on_source={on_source} never fired");
        failed += n;
    }
    (plan.len() as u32, failed)
}

/// The engine over the v1 data-section layouts of v1-era drivers (docs/mock-device.md): a
/// fixed offset, a moving `data_offset` over several sparse areas (chunks straddling them are
/// trapped), and a `pending_bytes` that over-reports (an empty chunk ends each phase). One line
/// per layout in the test log.
#[test]
fn the_engine_runs_over_every_v1_layout() {
    let layouts = [
        ("fixed", ""),
        ("moving+areas", ",section=32K,areas=4,data-offset=moving"),
        ("slack", ",pending-slack=4K"),
        (
            "trapped+moving",
            ",section=24K,data=trapped,data-offset=moving",
        ),
    ];
    for (name, extra) in layouts {
        let base = format!("mock:v1,size=48K,page=4K,chunk=5000{extra},seed=11");
        let one = format!("{base},dirty-rate=8M");
        let single = migrate(&one, false).unwrap_or_else(|e| panic!("{one}: {e}"));
        let live = migrate(&one, true).unwrap_or_else(|e| panic!("{one} live: {e}"));
        assert!(live.save.pre_copy_bytes > 0, "{one}: {:?}", live.save);
        let (sweeps, failed) = v1_faults(&base);
        println!(
            "v1 layout {name}: single ok ({} B), live ok (pre-copy {} B), faults {sweeps}/{sweeps} \
             sweeps ({failed} failed migrations, all clean)",
            single.save.stop_copy_bytes, live.save.pre_copy_bytes,
        );
    }
}
