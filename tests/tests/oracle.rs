// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The driver's state rules against the mock's own (`vfio_mig_mock::rules`), which were
//! written from the kernel's uAPI text, `vfio_mig_get_next_state()` and QEMU without the
//! driver's code. Every (flags, from, to) is compared; each disagreement is listed, and the set
//! of disagreements must equal the documented set below. Where they disagree, the uAPI text
//! decides, and the expectation written here is the uAPI's.
//!
//! The last two tests check that the mock devices execute their rules: a request the rules
//! refuse leaves the device where it was, one they accept gets there.

use std::collections::BTreeSet;

use vfio_mig::backend::query_region;
use vfio_mig::backend::v2_feature as feature;
use vfio_mig::backend::DeviceIo;
use vfio_mig::{backend::v1_state::compose, backend::v1_state::V1State};
use vfio_mig::{
    backend::v2_state::next_step, backend::v2_state::plan, backend::v2_state::returns_data_fd,
    backend::v2_state::MigState, backend::v2_state::MigrationFlags,
};
use vfio_mig_mock::rules::{v1_table, v2_arcs};
use vfio_mig_mock::{MockSpec, MockV1, MockV2};

/// v1 disagreements known today, as `(from, to)` low bits: none. Until issue 10's defect 6
/// was fixed this held 000b -> 010b (QEMU 5.2-7.0's `vfio_save_setup()` ORs SAVING into a
/// stopped device, savevm or migrate of a paused VM), which the driver refused; a new entry
/// here must name the driver defect it documents.
const KNOWN_V1_DEFECTS: &[(u32, u32)] = &[];

/// v2 disagreements known today: none (the driver's table and the kernel's agree).
const KNOWN_V2_DEFECTS: &[(u64, u32, u32)] = &[];

/// Flag sets compared: every combination of the three defined bits, and unknown bits.
fn v2_flag_sets() -> Vec<u64> {
    let mut f: Vec<u64> = (0..16).collect();
    f.extend([0x11, 0x8000_0000_0000_0007, u64::from(u32::MAX), u64::MAX]);
    f
}

/// The driver's walk as raw states starting with `from` (the oracle's form), or `None`.
fn driver_walk(flags: u64, from: u32, to: u32) -> Option<Vec<u32>> {
    let (f, t) = (MigState::from_raw(from)?, MigState::from_raw(to)?);
    let walk = plan(f, t, MigrationFlags::from_bits_retain(flags)).ok()?;
    Some(
        std::iter::once(from)
            .chain(walk.into_iter().map(MigState::raw))
            .collect(),
    )
}

fn v2_disagreements() -> Vec<(u64, u32, u32, String)> {
    let mut out = Vec::new();
    for flags in v2_flag_sets() {
        for from in 0..=v2_arcs::NUM_STATES {
            for to in 0..=v2_arcs::NUM_STATES {
                let driver = driver_walk(flags, from, to);
                let oracle = v2_arcs::path(flags, from, to).ok();
                if driver != oracle {
                    out.push((
                        flags,
                        from,
                        to,
                        format!("plan {driver:?} vs path {oracle:?}"),
                    ));
                    continue;
                }
                let (Some(f), Some(t)) = (MigState::from_raw(from), MigState::from_raw(to)) else {
                    continue;
                };
                let step = next_step(f, t, MigrationFlags::from_bits_retain(flags))
                    .ok()
                    .map(MigState::raw);
                let oracle_step = v2_arcs::next_state(flags, from, to).ok();
                if step != oracle_step {
                    out.push((
                        flags,
                        from,
                        to,
                        format!("next_step {step:?} vs next_state {oracle_step:?}"),
                    ));
                }
                if from != to && returns_data_fd(f, t) != v2_arcs::arc_opens_data_fd(from, to) {
                    out.push((flags, from, to, "data fd rule".into()));
                }
            }
        }
    }
    out
}

#[test]
fn v2_driver_plans_equal_the_kernel_port_for_every_flags_from_to() {
    let found = v2_disagreements();
    for (flags, from, to, why) in &found {
        println!(
            "v2 disagreement: flags {flags:#x} {} -> {}: {why}",
            v2_arcs::name(*from),
            v2_arcs::name(*to)
        );
    }
    let found: BTreeSet<_> = found.iter().map(|&(f, a, b, _)| (f, a, b)).collect();
    let known: BTreeSet<_> = KNOWN_V2_DEFECTS.iter().copied().collect();
    assert_eq!(
        found, known,
        "v2 disagreements differ from the documented set"
    );
}

/// Reserved bits 3-31 patterns the v1 comparison runs under (the driver must keep them).
const V1_RESERVED: [u32; 4] = [0, 0x8, 0x8000_0100, 0xffff_fff8];

/// One v1 disagreement: reserved bits, from, to (low bits), and the raw value the driver and
/// the uAPI table write (`None`: refused).
type V1Diff = (u32, u32, u32, Option<u32>, Option<u32>);

/// Each v1 (from, to) where the driver's `compose` and the uAPI table differ.
fn v1_disagreements() -> Vec<V1Diff> {
    let mut out = Vec::new();
    for reserved in V1_RESERVED {
        for from in 0..8 {
            for to in 0..8 {
                let cur = reserved | from;
                let driver = compose(cur, V1State::from_raw(to)).ok();
                let uapi =
                    v1_table::transition_allowed(cur, to).then(|| v1_table::with_low_bits(cur, to));
                if driver != uapi {
                    out.push((reserved, from, to, driver, uapi));
                }
            }
        }
    }
    out
}

#[test]
fn v1_driver_transitions_equal_the_uapi_table_except_the_documented_defects() {
    let found = v1_disagreements();
    for (reserved, from, to, driver, uapi) in &found {
        println!(
            "v1 disagreement: reserved {reserved:#x} {} -> {}: driver {driver:x?}, uAPI {uapi:x?}",
            v1_table::name(*from),
            v1_table::name(*to)
        );
    }
    // Each documented case must be one the uAPI allows and the driver refuses, under every
    // reserved-bits pattern; nothing else may differ.
    for &(from, to) in KNOWN_V1_DEFECTS {
        for reserved in V1_RESERVED {
            assert!(
                v1_table::transition_allowed(reserved | from, to),
                "{from:03b} -> {to:03b} is documented as a uAPI arc"
            );
        }
    }
    let found: BTreeSet<_> = found.iter().map(|&(_, a, b, _, _)| (a, b)).collect();
    let known: BTreeSet<_> = KNOWN_V1_DEFECTS.iter().copied().collect();
    assert_eq!(
        found, known,
        "v1 disagreements (from, to) differ from the documented set"
    );
}

/// A SET of MIG_DEVICE_STATE with any raw value (the driver's API only takes known states);
/// a returned data fd is closed.
fn raw_set_state(dev: &dyn DeviceIo, state: u32) -> std::io::Result<()> {
    dev.set_mig_state(state).map(drop)
}

/// Puts a fresh v2 mock with `flags` into `from` (reachable from RUNNING without a resume
/// completing), or `None` for ERROR.
fn v2_mock_in(flags: u64, from: u32) -> Option<MockV2> {
    let spec: MockSpec = format!("mock:v2,size=8K,flags={flags:#x}").parse().unwrap();
    let dev = MockV2::new(&spec).unwrap();
    let state = MigState::from_raw(from)?;
    if state == MigState::Error {
        return None;
    }
    feature::set_state(&dev, state).unwrap_or_else(|e| panic!("{flags:#x} reach {state}: {e}"));
    Some(dev)
}

#[test]
fn the_v2_mock_executes_its_rules_for_every_flags_from_to() {
    for flags in [0x1, 0x3, 0x5, 0x7] {
        for from in v2_arcs::ALL_STATES {
            if !v2_arcs::supported(flags, from) {
                continue;
            }
            for to in 0..=v2_arcs::NUM_STATES {
                let Some(dev) = v2_mock_in(flags, from) else {
                    continue;
                };
                let context = format!(
                    "flags {flags:#x} {} -> {}",
                    v2_arcs::name(from),
                    v2_arcs::name(to)
                );
                let r = raw_set_state(&dev, to);
                let now = feature::get_state(&dev).unwrap();
                match v2_arcs::path(flags, from, to) {
                    Err(_) => {
                        let e = r.expect_err(&context);
                        assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{context}");
                        assert_eq!(now, from, "{context}: a refused request moved the device");
                    }
                    // Leaving RESUMING with an empty stream: the mock refuses to run it.
                    Ok(_) if from == v2_arcs::RESUMING && to != v2_arcs::STOP && to != from => {}
                    Ok(_) => {
                        r.unwrap_or_else(|e| panic!("{context}: {e}"));
                        assert_eq!(now, to, "{context}");
                    }
                }
            }
        }
    }
}

/// A raw v1 mock driven by `device_state` writes.
struct RawV1 {
    dev: MockV1,
    base: u64,
}

impl RawV1 {
    fn new() -> Self {
        let dev = MockV1::new(&"mock:v1,size=8K,chunk=2K".parse().unwrap()).unwrap();
        let n = dev.device_info().unwrap().num_regions;
        let mig = (0..n)
            .filter_map(|i| query_region(&dev, i).ok())
            .find(|r| r.region_type() == Some((3, 1)))
            .expect("a migration region");
        Self {
            dev,
            base: mig.offset,
        }
    }

    fn state(&self) -> u32 {
        let mut b = [0u8; 4];
        self.dev.read_at(&mut b, self.base).unwrap();
        u32::from_le_bytes(b)
    }

    fn set(&self, low: u32) -> std::io::Result<usize> {
        let v = v1_table::with_low_bits(self.state(), low);
        self.dev.write_at(&v.to_le_bytes(), self.base)
    }
}

#[test]
fn the_v1_mock_executes_the_uapi_table_for_every_from_to() {
    for from in [0b000, 0b001, 0b010, 0b011, 0b100] {
        for to in 0..8 {
            let d = RawV1::new();
            d.set(from).unwrap();
            let context = format!("{} -> {}", v1_table::name(from), v1_table::name(to));
            let r = d.set(to);
            let now = d.state() & v1_table::MASK;
            let refusal = d.dev.handle().status().last_refusal.unwrap_or_default();
            if !v1_table::transition_allowed(from, to) {
                assert!(r.is_err(), "{context}: accepted");
                assert_eq!(now, from, "{context}: a refused write moved the device");
            } else if (from, to) == (0b010, 0b000) {
                // The mock's own condition: all data read before STOP.
                assert!(refusal.contains("pending"), "{context}: {refusal}");
            } else if (from, to) == (0b100, 0b001) {
                // Nothing was loaded: the state cannot run (the device fails).
                assert!(refusal.contains("RESUMING -> RUNNING refused"), "{context}");
            } else {
                r.unwrap_or_else(|e| panic!("{context}: {e}"));
                assert_eq!(now, to, "{context}");
            }
        }
    }
}
