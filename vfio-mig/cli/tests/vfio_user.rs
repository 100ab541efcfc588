// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The command line on vfio-user devices (`vfio-user:PATH`): `probe`, `migrate` (stop-and-copy
//! and live), `save` / `load` through a file and `send` / `recv` over a UNIX socket, against
//! the project's own vfio-user server (it serves one client after another, so its BAR1 is
//! set before a run and read after it), and `probe` against libvfio-user's sample server.

mod common;
#[path = "../../user/tests/common/mod.rs"]
mod user;

use common::{stderr, Dirs, Recv};
use user::rust_server::{RustServer, BAR1_LEN};

const STOP: u32 = 1;
const RUNNING: u32 = 2;

fn pattern() -> Vec<u8> {
    (0..BAR1_LEN).map(|i| (i * 13 % 251) as u8 + 1).collect()
}

/// A primed source and an empty destination.
fn pair() -> (RustServer, RustServer) {
    let (src, dst) = (RustServer::start(None), RustServer::start(None));
    src.set_bar1(&pattern());
    assert_ne!(dst.bar1(), pattern());
    (src, dst)
}

fn assert_migrated(src: &RustServer, dst: &RustServer, what: &str) {
    assert_eq!(dst.bar1(), pattern(), "{what}: the destination's BAR1");
    assert_eq!(dst.state(), RUNNING, "{what}: the destination runs");
    assert_eq!(src.state(), STOP, "{what}: the source is stopped");
}

#[test]
fn probe_a_vfio_user_device() {
    let dirs = Dirs::new();
    let dev = RustServer::start(None);
    let o = dirs.run(&["probe", &dev.name()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("vfio-user:pci:1234:5678"), "{out}");
    assert!(out.contains("v2"), "{out}");
}

#[test]
fn probe_libvfio_user_s_sample_server() {
    if user::skipped() {
        return;
    }
    let dirs = Dirs::new();
    let mut server = user::Server::start();
    let o = dirs.run(&["probe", &format!("vfio-user:{}", server.sock.display())]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    // The sample's IDs (vfu_pci_set_id(0xdead, 0xbeef, ...)) and its migration flags.
    assert!(out.contains("vfio-user:pci:dead:beef"), "{out}");
    assert!(
        out.contains("STOP_COPY") && out.contains("PRE_COPY"),
        "{out}"
    );
    assert!(server.wait_exit().success(), "{}", server.log());
}

#[test]
fn migrate_stop_and_copy_and_live() {
    let dirs = Dirs::new();
    for live in [false, true] {
        let (src, dst) = pair();
        let mut args = vec!["migrate".to_string(), src.name(), dst.name()];
        if live {
            args.push("--live".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = dirs.run(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_migrated(&src, &dst, &format!("migrate live={live}"));
    }
}

#[test]
fn save_to_a_file_and_load_it() {
    let dirs = Dirs::new();
    let (src, dst) = pair();
    let file = dirs.path("state.vmig");
    let file = file.to_str().unwrap();
    let o = dirs.run(&["save", &src.name(), "-o", file]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(src.state(), STOP);
    assert_ne!(dst.bar1(), pattern());
    let o = dirs.run(&["load", &dst.name(), "-i", file]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_migrated(&src, &dst, "save and load");
}

#[test]
fn send_and_recv_over_a_unix_socket() {
    let dirs = Dirs::new();
    let (src, dst) = pair();
    let listen = format!("unix:{}", dirs.path("mig.sock").display());
    let recv = Recv::start(&dirs, &[], &[&dst.name(), "--listen", &listen, "--once"]);
    let o = dirs.run(&["send", &src.name(), "--to", &listen, "--live"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (status, _, err) = recv.wait();
    assert!(status.success(), "{err}");
    assert_migrated(&src, &dst, "send and recv");
}

#[test]
fn a_missing_socket_is_a_one_line_error_naming_it() {
    let dirs = Dirs::new();
    let o = dirs.run(&["probe", "vfio-user:/nonexistent/vfu.sock"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("vfio-user:/nonexistent/vfu.sock") && err.contains("connect"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// The `--json` fates of a save that fails on a stopped device (a paused VM's snapshot, or a
/// device an earlier save left stopped): it starts in STOP, so it is returned there, never
/// run (docs/cli.md, "JSON output").
#[test]
fn a_stopped_device_s_failed_save_leaves_it_stopped_and_says_so() {
    const STOP_COPY: u32 = 3;
    let dirs = Dirs::new();
    // What the device refuses, and the fate docs/cli.md names for it.
    type Refusal = fn(&mut user::rust_server::DeviceState);
    let cases: [(&str, Refusal); 2] = [
        // STOP -> STOP_COPY refused: the device never left STOP.
        ("stopped", |d| d.refuse_state = Some(STOP_COPY)),
        // Its state cannot be read in STOP_COPY: it goes back to STOP.
        ("returned-to-stop", |d| d.refuse_reads = true),
    ];
    for (fate, refuse) in cases {
        let src = RustServer::start(None);
        src.set_bar1(&pattern());
        {
            let mut d = src.device.lock().unwrap();
            d.state = STOP;
            refuse(&mut d);
        }
        let file = dirs.path(&format!("{fate}.vmig"));
        let o = dirs.run(&["save", &src.name(), "-o", file.to_str().unwrap(), "--json"]);
        assert_eq!(o.status.code(), Some(1), "{fate}: {}", stderr(&o));
        let out: serde_json::Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("{fate}: {e}: {}", String::from_utf8_lossy(&o.stdout)));
        assert_eq!(out["outcome"], "failed", "{fate}: {out}");
        assert_eq!(
            out["devices"],
            serde_json::json!([{"device": src.name(), "fate": fate}]),
            "{fate}: {out}"
        );
        assert_eq!(
            src.state(),
            STOP,
            "{fate}: the device is stopped, never run"
        );
        assert!(!file.exists(), "{fate}: no output from a failed save");
    }
}
