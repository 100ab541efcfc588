// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A command holds its device's lock until it ends (`save`, `load`, `send --to file:`,
//! `recv --listen file:`), and `save` never replaces an output it did not mean to: an
//! existing one is refused before the device is touched (unless `--force`), and one that
//! appears while it runs survives, the losing save rolling its device back.

mod common;

use std::io::Write;
use std::process::Stdio;

use common::{assert_clean_failure, stderr, Dirs, HeldOutput};

/// Holds `args` (a command that claims `mock:...,id=held`) at its first stderr line and
/// checks that a `save` of the same device meanwhile is refused as in use.
fn second_save_is_refused_while_held(dirs: &Dirs, args: &[&str], dev: &str) {
    let mut cmd = dirs.cmd(&[]);
    cmd.args(args).stdout(Stdio::null());
    let mut held = HeldOutput::stderr(cmd);
    held.wait_blocked();
    let other = dirs.path("other");
    let o = dirs.run(&["save", dev, "-o", other.to_str().unwrap()]);
    assert_clean_failure(o.status, &stderr(&o), "is in use by another vfio-mig");
    assert!(!other.exists());
    let (status, err) = held.release();
    assert!(status.success(), "{err}");
}

#[test]
fn save_holds_the_device_lock_until_it_ends() {
    let dirs = Dirs::new();
    let dev = "mock:v1,size=1M,seed=5,id=held";
    let out = dirs.path("out");
    second_save_is_refused_while_held(&dirs, &["save", dev, "-o", out.to_str().unwrap()], dev);
}

#[test]
fn send_to_a_file_holds_the_device_lock_until_it_ends() {
    let dirs = Dirs::new();
    let dev = "mock:v1,size=1M,seed=5,id=held";
    let to = format!("file:{}", dirs.path("out").display());
    second_save_is_refused_while_held(&dirs, &["send", dev, "--to", &to], dev);
}

/// Runs `args` reading the stream of an 8 MiB save through a FIFO; once it has consumed more
/// than its read buffer (so it is loading, past the header), a `recover` of the destination
/// must be refused as in use; then the rest is written and the load must succeed.
fn recover_is_refused_while_loading(dirs: &Dirs, args: &[&str], fifo: &std::path::Path) {
    let stream = dirs.path("stream");
    let o = dirs.run(&[
        "save",
        "mock:v1,size=8M,seed=7",
        "-o",
        stream.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&stream).unwrap();
    nix::unistd::mkfifo(fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let child = dirs
        .cmd(&[])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Opening blocks until the command opened its end.
    let mut w = std::fs::OpenOptions::new().write(true).open(fifo).unwrap();
    // 3 MiB consumed (less the pipe's 64 KiB) is past the 1 MiB read buffer of the header.
    let split = 3 << 20;
    w.write_all(&bytes[..split]).unwrap();
    let o = dirs.run(&["recover", "mock:v1,size=8M,seed=7,id=dst"]);
    assert_clean_failure(o.status, &stderr(&o), "is in use by another vfio-mig");
    w.write_all(&bytes[split..]).unwrap();
    drop(w);
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn load_holds_the_device_lock_until_it_ends() {
    let dirs = Dirs::new();
    let fifo = dirs.path("fifo");
    let args = [
        "load",
        "mock:v1,size=8M,seed=7,id=dst",
        "-i",
        fifo.to_str().unwrap(),
    ];
    recover_is_refused_while_loading(&dirs, &args, &fifo);
}

#[test]
fn recv_from_a_file_holds_the_device_lock_until_it_ends() {
    let dirs = Dirs::new();
    let fifo = dirs.path("fifo");
    let listen = format!("file:{}", fifo.display());
    let args = ["recv", "mock:v1,size=8M,seed=7,id=dst", "--listen", &listen];
    recover_is_refused_while_loading(&dirs, &args, &fifo);
}

fn partial_files(dirs: &Dirs) -> Vec<String> {
    std::fs::read_dir(dirs.tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains("partial"))
        .collect()
}

#[test]
fn an_existing_output_is_refused_unless_force_is_given() {
    let dirs = Dirs::new();
    let out = dirs.path("out");
    let f = out.to_str().unwrap();
    std::fs::write(&out, b"precious").unwrap();
    let dev = "mock:v1,size=1M,seed=9,id=kept";
    let o = dirs.run(&["save", dev, "-o", f]);
    let line = assert_clean_failure(o.status, &stderr(&o), "exists");
    assert!(line.contains("--force"), "{line}");
    // Refused before the device was touched: no session was started.
    assert!(!stderr(&o).contains("session"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    // The same through send --to file:.
    let o = dirs.run(&["send", dev, "--to", &format!("file:{f}")]);
    assert_clean_failure(o.status, &stderr(&o), "--force");
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    // Asked to replace it, save does.
    let o = dirs.run(&["save", dev, "-o", f, "--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = dirs.run(&["inspect", f]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(partial_files(&dirs).is_empty());
}

#[test]
fn an_output_that_appears_during_the_save_is_not_replaced() {
    let dirs = Dirs::new();
    let out = dirs.path("out");
    let mut cmd = dirs.cmd(&[]);
    cmd.args([
        "save",
        "mock:v1,size=1M,seed=3",
        "-o",
        out.to_str().unwrap(),
    ])
    .stdout(Stdio::null());
    let mut held = HeldOutput::stderr(cmd);
    // Held after its checks, before its stream is written and renamed.
    held.wait_blocked();
    std::fs::write(&out, b"the other save's").unwrap();
    let (status, err) = held.release();
    let line = assert_clean_failure(status, &err, "appeared");
    assert!(line.contains("was returned to RUNNING"), "{line}");
    assert_eq!(std::fs::read(&out).unwrap(), b"the other save's");
    assert!(
        partial_files(&dirs).is_empty(),
        "{:?}",
        partial_files(&dirs)
    );
}
