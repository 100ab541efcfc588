// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Migrations of real mtty devices: the serial ports' state written into device A through its
//! BARs is read back from device B after `vfio-mig migrate`, `save` + `load`; corrupt streams
//! and failed saves leave the devices running.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use vfio_mig::{backend::v2_state::MigState, backend::V2Device};
use vfio_mig_tests::open_device;
use vfio_mig_tests::rewrite_stream;

use super::mtty::{
    mtty_devices, vfio_mig_bin, MttyDevice, PORT0_REGION, PORT1_REGION, UART_SCR, UART_TX,
};

/// What a test writes into a device and expects to read back: per port, the scratch register
/// and the bytes waiting in the receive FIFO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SerialState {
    scratch: [u8; 2],
    fifo: [Vec<u8>; 2],
}

const PORTS: [u32; 2] = [PORT0_REGION, PORT1_REGION];

/// Writes a state derived from `seed` into `dev` through its BARs.
pub(crate) fn write_state(dev: &Path, seed: u8) -> SerialState {
    let d = MttyDevice::open_or_panic(dev);
    let mut state = SerialState {
        scratch: [0; 2],
        fifo: [Vec::new(), Vec::new()],
    };
    for (i, port) in PORTS.into_iter().enumerate() {
        d.drain_rx(port).unwrap();
        let scratch = seed.wrapping_mul(7).wrapping_add(i as u8 + 1);
        d.write_reg(port, UART_SCR, scratch).unwrap();
        let bytes: Vec<u8> = (0..5 + i as u8)
            .map(|k| seed ^ (k * 17 + i as u8))
            .collect();
        for b in &bytes {
            d.write_reg(port, UART_TX, *b).unwrap();
        }
        state.scratch[i] = scratch;
        state.fifo[i] = bytes;
    }
    state
}

/// Reads the state back (this drains the FIFOs).
pub(crate) fn read_state(dev: &Path) -> SerialState {
    let d = MttyDevice::open_or_panic(dev);
    let mut state = SerialState {
        scratch: [0; 2],
        fifo: [Vec::new(), Vec::new()],
    };
    for (i, port) in PORTS.into_iter().enumerate() {
        state.scratch[i] = d.read_reg(port, UART_SCR).unwrap();
        state.fifo[i] = d.drain_rx(port).unwrap();
    }
    state
}

/// The device's v2 migration state, read through the library (and the device closed again).
pub(crate) fn mig_state(dev: &Path) -> MigState {
    let opened = open_device(dev.to_str().unwrap()).unwrap();
    let mut v2 = V2Device::open(opened.io.clone()).unwrap();
    v2.state().unwrap()
}

/// Brings a device left stopped by an earlier test back to RUNNING.
pub(crate) fn ensure_running(dev: &Path) {
    let opened = open_device(dev.to_str().unwrap()).unwrap();
    let mut v2 = V2Device::open(opened.io.clone()).unwrap();
    if v2.state().unwrap() != MigState::Running {
        v2.set_state(MigState::Running).unwrap();
    }
}

pub(crate) fn vfio_mig(args: &[&str]) -> Output {
    vfio_mig_tests::cli::run(&vfio_mig_bin(), args)
}

pub(crate) use vfio_mig_tests::cli::assert_success as ok;

/// A failure: non-zero exit, one `error:` line containing `expect`, no panic.
fn clean_failure(out: &Output, expect: &str) {
    vfio_mig_tests::cli::clean_failure(out, &[expect]);
}

pub(crate) fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub(crate) fn pair(a: usize, b: usize) -> (PathBuf, PathBuf) {
    let devs = mtty_devices();
    (devs[a].clone(), devs[b].clone())
}

#[test]
fn probe_reports_v2_flags_and_data_size() {
    let (a, _) = pair(0, 1);
    ensure_running(&a);
    let out = vfio_mig(&["probe", path_str(&a), "--json"]);
    ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["protocol"], "v2 (device feature)");
    assert_eq!(v["model"], "mdev:mtty-2");
    assert_eq!(v["capabilities"]["migration_flags"], 7);
    let details = v["details"].as_array().unwrap();
    let size = details
        .iter()
        .find(|d| d[0] == "stop-copy data size")
        .expect("data size listed");
    assert_eq!(size[1], "96 bytes", "{v}");
}

fn migrate_and_check(a: &Path, b: &Path, live: bool, seed: u8) {
    ensure_running(a);
    ensure_running(b);
    let expected = write_state(a, seed);
    // Something else in B, which the migration must replace.
    write_state(b, seed.wrapping_add(100));
    let mut args = vec!["migrate", path_str(a), path_str(b)];
    if live {
        args.push("--live");
    }
    ok(&vfio_mig(&args));
    assert_eq!(mig_state(b), MigState::Running, "destination runs");
    assert_eq!(mig_state(a), MigState::Stop, "source stopped");
    assert_eq!(read_state(b), expected, "B holds A's serial state");
}

#[test]
fn migrate_stop_copy_moves_the_serial_ports_state() {
    let (a, b) = pair(0, 1);
    migrate_and_check(&a, &b, false, 0x21);
}

#[test]
fn migrate_live_moves_the_serial_ports_state() {
    let (a, b) = pair(2, 3);
    migrate_and_check(&a, &b, true, 0x42);
}

#[test]
fn save_to_a_file_then_load_into_a_fresh_device() {
    let (a, b) = pair(1, 2);
    ensure_running(&a);
    ensure_running(&b);
    let expected = write_state(&a, 0x63);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mtty.vfiomig");
    ok(&vfio_mig(&[
        "save",
        path_str(&a),
        "-o",
        path_str(&file),
        "--live",
    ]));
    ok(&vfio_mig(&["inspect", path_str(&file)]));
    write_state(&b, 0x01);
    ok(&vfio_mig(&["load", path_str(&b), "-i", path_str(&file)]));
    assert_eq!(mig_state(&b), MigState::Running);
    assert_eq!(read_state(&b), expected);
}

/// Saves device `a` into a file and returns its bytes.
fn saved_stream(a: &Path) -> Vec<u8> {
    ensure_running(a);
    write_state(a, 0x77);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s");
    ok(&vfio_mig(&["save", path_str(a), "-o", path_str(&file)]));
    std::fs::read(&file).unwrap()
}

#[test]
fn corrupt_stream_is_refused_and_the_destination_reset_to_running() {
    let (a, b) = pair(3, 0);
    let mut bytes = saved_stream(&a);
    let at = bytes.len() - 60; // inside the last DATA record's payload
    bytes[at] ^= 0x55;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad");
    std::fs::write(&file, &bytes).unwrap();
    ensure_running(&b);
    clean_failure(
        &vfio_mig(&["load", path_str(&b), "-i", path_str(&file)]),
        "CRC",
    );
    assert_eq!(mig_state(&b), MigState::Running);
}

#[test]
fn stream_the_device_rejects_is_refused_and_the_destination_reset_to_running() {
    // A stream whose checksums are right but whose device data is not: mtty itself must refuse
    // it (its header magic is wrong), and the destination must end up reset and running.
    let (a, b) = pair(0, 2);
    let bytes = saved_stream(&a);
    // mtty's stream magic, with the stream's own checksums recomputed.
    let forged = rewrite_stream(&bytes, None, |data| data[0] ^= 0xff);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("forged");
    std::fs::write(&file, &forged).unwrap();
    ok(&vfio_mig(&["inspect", path_str(&file)]));
    ensure_running(&b);
    let out = vfio_mig(&["load", path_str(&b), "-i", path_str(&file)]);
    clean_failure(&out, "was reset");
    assert_eq!(mig_state(&b), MigState::Running);
}

#[test]
fn source_stays_usable_after_a_failed_save() {
    // A save into a full filesystem fails after the device stopped (the data is flushed at
    // the end): the source must run again with its state intact.
    let (a, _) = pair(1, 3);
    ensure_running(&a);
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("full");
    std::fs::create_dir(&mnt).unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4k", "tmpfs", path_str(&mnt)])
        .status()
        .unwrap();
    assert!(status.success(), "mount a tiny tmpfs");
    let _ = std::fs::write(mnt.join("filler"), vec![0u8; 8192]);
    let expected = write_state(&a, 0x19);
    let out = vfio_mig(&["save", path_str(&a), "-o", path_str(&mnt.join("s"))]);
    let _ = Command::new("umount").arg(&mnt).status();
    clean_failure(&out, "returned to RUNNING");
    assert_eq!(mig_state(&a), MigState::Running);
    assert_eq!(read_state(&a), expected, "the source kept its state");
    // And it still works as a device.
    let d = MttyDevice::open_or_panic(&a);
    d.write_reg(PORT0_REGION, UART_SCR, 0x3c).unwrap();
    assert_eq!(d.read_reg(PORT0_REGION, UART_SCR).unwrap(), 0x3c);
}
