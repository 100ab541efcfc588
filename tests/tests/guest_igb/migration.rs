// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Migrations between igb VFs with the `vfio-mig` command: the VF's ring registers, written
//! through BAR0 on the source, read back through BAR0 on the destination (and the
//! destination's own values gone); the device relocates a blob to another VF number.

use std::path::Path;

use vfio_mig::backend::v2_state::MigState;

use super::vf::{
    a0_b0, clean_failure, find_key, igb_vfs, mig_state, ok, read_rings, s, vfio_mig, write_rings,
    BLOB_SIZE,
};

#[test]
fn four_vfs_on_igb_vfio_pci_each_in_its_own_group() {
    let vfs = igb_vfs();
    let mut groups = Vec::new();
    for vf in &vfs {
        let id = |f: &str| {
            std::fs::read_to_string(vf.join(f))
                .unwrap()
                .trim()
                .to_string()
        };
        assert_eq!(
            (id("vendor"), id("device")),
            ("0x8086".into(), "0x10ca".into()),
            "{}",
            vf.display()
        );
        let driver = std::fs::read_link(vf.join("driver")).unwrap();
        assert!(
            driver.ends_with("igb-vfio-pci"),
            "{}: {}",
            vf.display(),
            driver.display()
        );
        let group = std::fs::read_link(vf.join("iommu_group")).unwrap();
        groups.push(group.file_name().unwrap().to_string_lossy().into_owned());
        // physfn: VF 0/1 of PF A, then of PF B.
        assert!(vf.join("physfn").exists(), "{} is not a VF", vf.display());
    }
    let pf = |i: usize| std::fs::read_link(vfs[i].join("physfn")).unwrap();
    assert_eq!(pf(0), pf(1));
    assert_eq!(pf(2), pf(3));
    assert_ne!(pf(0), pf(2));
    let mut unique = groups.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 4, "VFs share IOMMU groups: {groups:?}");
}

#[test]
fn probe_reports_v2_stop_copy_pre_copy_no_p2p_and_a_1024_byte_state() {
    let (a, _) = a0_b0();
    let out = vfio_mig(&["probe", s(&a), "--json"]);
    ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["protocol"], "v2 (device feature)", "{v}");
    assert_eq!(v["model"], "pci:8086:10ca", "{v}");
    // igb-vfio-pci: migration_flags = VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY.
    assert_eq!(v["capabilities"]["migration_flags"], 5, "{v}");
    assert_eq!(v["capabilities"]["p2p"], false, "{v}");
    let details = v["details"].as_array().unwrap();
    let size = details
        .iter()
        .find(|d| d[0] == "stop-copy data size")
        .expect("data size listed");
    assert_eq!(size[1], format!("{BLOB_SIZE} bytes"), "{v}");
    assert_eq!(mig_state(&a), MigState::Running);
}

/// `vfio-mig migrate SRC DST [--live]`, checking the state moved and the report.
fn migrate_and_check(src: &Path, dst: &Path, live: bool, seed: u32) -> serde_json::Value {
    let expected = write_rings(src, seed);
    let before = write_rings(dst, seed ^ 0xa5a5_5a5a);
    assert_ne!(
        expected, before,
        "the test needs different states on both sides"
    );
    let mut args = vec!["migrate", s(src), s(dst), "--json"];
    if live {
        args.push("--live");
    }
    let out = vfio_mig(&args);
    ok(&out);
    assert_eq!(
        read_rings(dst),
        expected,
        "{} -> {}",
        src.display(),
        dst.display()
    );
    serde_json::from_slice(&out.stdout).expect("a JSON report")
}

#[test]
fn stop_and_copy_from_a_vf_of_pf_a_to_a_vf_of_pf_b_and_back() {
    let (a, b) = a0_b0();
    let report = migrate_and_check(&a, &b, false, 0x11);
    assert_eq!(
        find_key(&report, "stop_copy_bytes"),
        Some(&BLOB_SIZE.into()),
        "{report}"
    );
    migrate_and_check(&b, &a, false, 0x22);
    assert_eq!(mig_state(&a), MigState::Running);
    assert_eq!(mig_state(&b), MigState::Running);
}

/// VF 0 of PF A into VF 1 of PF B: the device relocates the per-VF registers of the blob to
/// its own VF number (igb_core_vf_load_state), so the state shows at VF 1's BAR.
#[test]
fn the_device_relocates_a_blob_to_another_vf_number() {
    let [a0, _, _, b1] = igb_vfs();
    migrate_and_check(&a0, &b1, false, 0x33);
    migrate_and_check(&b1, &a0, false, 0x44);
}

/// The driver's PRE_COPY has no data (PRECOPY_INFO says 0 + 0): the engine must switch over
/// at once, without spinning, and move the whole 1024 bytes in stop-and-copy.
#[test]
fn live_migration_converges_at_once_and_moves_the_state_in_stop_copy() {
    let (a, b) = a0_b0();
    let report = migrate_and_check(&a, &b, true, 0x55);
    assert_eq!(
        find_key(&report, "pre_copy_bytes"),
        Some(&0.into()),
        "{report}"
    );
    assert_eq!(
        find_key(&report, "stop_copy_bytes"),
        Some(&BLOB_SIZE.into()),
        "{report}"
    );
    let rounds = find_key(&report, "rounds")
        .and_then(|r| r.as_u64())
        .expect("rounds");
    assert!(
        rounds <= 1,
        "pre-copy of an empty PRE_COPY ran {rounds} rounds: {report}"
    );
    migrate_and_check(&b, &a, true, 0x66);
}

/// A unit of two VFs (neither has VFIO_MIGRATION_P2P): refused by default with nothing
/// touched, migrated with --allow-non-p2p-unit.
#[test]
fn a_unit_of_two_vfs_needs_the_non_p2p_opt_in() {
    let [a0, a1, b0, b1] = igb_vfs();
    let s0 = write_rings(&a0, 0x77);
    let s1 = write_rings(&a1, 0x78);
    let d0 = write_rings(&b0, 0x79);
    let d1 = write_rings(&b1, 0x7a);
    let out = vfio_mig(&["migrate", s(&a0), s(&b0), s(&a1), s(&b1)]);
    clean_failure(&out, &["P2P"]);
    assert_eq!(
        [
            read_rings(&a0),
            read_rings(&a1),
            read_rings(&b0),
            read_rings(&b1)
        ],
        [s0.clone(), s1.clone(), d0, d1],
        "a refused unit changed a device"
    );
    ok(&vfio_mig(&[
        "migrate",
        s(&a0),
        s(&b0),
        s(&a1),
        s(&b1),
        "--allow-non-p2p-unit",
    ]));
    assert_eq!(read_rings(&b0), s0);
    assert_eq!(read_rings(&b1), s1);
}

#[test]
fn save_to_a_file_and_load_it_in_another_process() {
    let (a, b) = a0_b0();
    let expected = write_rings(&a, 0x88);
    write_rings(&b, 0x99);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vf.mig");
    ok(&vfio_mig(&["save", s(&a), "-o", s(&file)]));
    ok(&vfio_mig(&["inspect", s(&file)]));
    let loads_before = loaded_lines(&b);
    ok(&vfio_mig(&["load", s(&b), "-i", s(&file)]));
    assert_eq!(read_rings(&b), expected);
    assert_eq!(
        loaded_lines(&b),
        loads_before + 1,
        "the driver logged one load"
    );
}

/// How many "loaded state: 1024 bytes" lines the driver logged for `vf`.
pub(crate) fn loaded_lines(vf: &Path) -> usize {
    super::vf::kernel_lines(vf)
        .iter()
        .filter(|l| l.contains(&format!("loaded state: {BLOB_SIZE} bytes")))
        .count()
}
