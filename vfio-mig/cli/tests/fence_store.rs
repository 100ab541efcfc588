// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `--fence`: handoffs between `send` and `recv` processes acting as different hosts of a
//! fleet, through a shared fencing store (the local directory store, and a 3-member etcd
//! cluster on loopback).

#[path = "../../etcd/tests/common/cluster.rs"]
mod cluster;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_vfio-mig");
const SESSION: &str = "0123456789abcdef0123456789abcdef";

/// One simulated host: its own lock and state directories and owner name, the shared store.
struct Host {
    dir: PathBuf,
    owner: &'static str,
    fence: String,
}

impl Host {
    fn cmd(&self) -> Command {
        let mut c = Command::new(BIN);
        c.env_remove("RUST_LOG")
            .env_remove("VFIO_MIG_FENCE")
            .env("VFIO_MIG_LOCK_DIR", self.dir.join(self.owner).join("lock"))
            .env(
                "VFIO_MIG_STATE_DIR",
                self.dir.join(self.owner).join("state"),
            )
            .args(["--fence", &self.fence, "--fence-owner", self.owner])
            .args(["--fence-key", "vm9/dev0", "--fence-timeout", "2"]);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("run vfio-mig")
    }

    /// Starts `recv DEVICE --listen unix:SOCK --once` and waits until it listens.
    fn recv(&self, device: &str, sock: &str) -> Child {
        let mut child = self
            .cmd()
            .args(["recv", device, "--listen", sock, "--once"])
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn recv");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let started = Instant::now();
        loop {
            match rx.recv_timeout(Duration::from_secs(20)) {
                Ok(l) if l.contains("listening on") => break,
                Ok(_) => {}
                Err(_) => panic!("recv never listened ({:?})", started.elapsed()),
            }
        }
        // Keep reading so that recv never blocks on a full pipe.
        std::thread::spawn(move || for _ in rx.iter() {});
        child
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A failure: non-zero exit, one `error:` line containing `expect`, no panic.
fn assert_refused(o: &Output, expect: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("error:")).collect();
    assert_eq!(lines.len(), 1, "one error line expected: {err}");
    assert!(lines[0].contains(expect), "{expect:?} expected: {err}");
}

fn hosts_handoff_through(fence: &str, dir: &std::path::Path) {
    let host = |owner| Host {
        dir: dir.to_owned(),
        owner,
        fence: fence.to_owned(),
    };
    let (a, b, d) = (host("host-a"), host("host-b"), host("host-d"));
    let src = "mock:v1,size=1M,seed=8";
    let sock = format!("unix:{}", dir.join("s").display());

    // host-a hands vm9/dev0 to host-b: the store grants epoch 1.
    let mut recv = b.recv("mock:v1,size=1M,seed=8,id=b", &sock);
    let o = a.run(&["send", src, "--to", &sock, "--session", SESSION]);
    assert!(o.status.success(), "{fence}: {}", stderr(&o));
    assert!(stderr(&o).contains("epoch 1)"), "{}", stderr(&o));
    assert!(recv.wait().unwrap().success());

    // host-a retries the session (as after an outcome in doubt) to host-d: refused, naming
    // who runs the state.
    let mut recv = d.recv("mock:v1,size=1M,seed=8,id=d", &sock);
    let o = a.run(&["send", src, "--to", &sock, "--session", SESSION]);
    assert_refused(
        &o,
        "vm9/dev0: session 0123456789abcdef0123456789abcdef was completed by host-b at epoch \
         1: host-b runs that state, so host-d does not load it",
    );
    assert!(!recv.wait().unwrap().success());

    // host-a is no longer the owner: a new handoff is refused before it connects anywhere.
    let o = a.run(&["send", src, "--to", &sock]);
    assert_refused(
        &o,
        "vm9/dev0 is owned by host-b at epoch 1; host-a is not its owner (a stale source)",
    );
    // The store, not the operator, grants epochs.
    let o = a.run(&["send", src, "--to", &sock, "--epoch", "7"]);
    assert_refused(&o, "--epoch: with --fence the store grants the epoch");
    // A fenced save and load: the file's session is loaded once, by one host.
    let file = dir.join("state.vmig");
    let o = b.run(&[
        "save",
        "mock:v1,size=1M,seed=8,id=b",
        "-o",
        file.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{fence}: {}", stderr(&o));
    let o = d.run(&[
        "load",
        "mock:v1,size=1M,seed=8,id=d",
        "-i",
        file.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{fence}: {}", stderr(&o));
    let o = a.run(&[
        "load",
        "mock:v1,size=1M,seed=8,id=a",
        "-i",
        file.to_str().unwrap(),
    ]);
    assert_refused(&o, "was completed by host-d at epoch 2");
}

#[test]
fn hosts_hand_off_one_device_state_through_the_directory_store() {
    let dir = tempfile::tempdir().unwrap();
    let fence = format!("dir:{}", dir.path().join("store").display());
    hosts_handoff_through(&fence, dir.path());
}

#[test]
fn hosts_hand_off_one_device_state_through_etcd() {
    let Some(cluster) = cluster::EtcdCluster::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    hosts_handoff_through(&cluster.url(), dir.path());
}

#[test]
fn an_unreachable_etcd_refuses_the_handoff_before_the_device_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on port 1 of the loopback.
    let h = Host {
        dir: dir.path().to_owned(),
        owner: "host-a",
        fence: "etcd://127.0.0.1:1,127.0.0.1:2".into(),
    };
    let sock = format!("unix:{}", dir.path().join("s").display());
    let started = Instant::now();
    let o = h.run(&["send", "mock:v1,size=1M", "--to", &sock]);
    assert_refused(
        &o,
        "fencing store etcd://127.0.0.1:1,127.0.0.1:2: unreachable for",
    );
    assert!(
        stderr(&o).contains("no device was touched"),
        "{}",
        stderr(&o)
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    // Usage errors name the option.
    let o = h.run(&["send", "mock:v1,size=1M", "mock:v1,size=1M", "--to", &sock]);
    assert_refused(&o, "--fence: 2 device states to fence, 1 --fence-key given");
    let o = Command::new(BIN)
        .args(["send", "mock:v1", "--to", &sock, "--fence", "etcd:/x"])
        .output()
        .unwrap();
    assert_refused(&o, "--fence etcd:/x: expected etcd://HOST:PORT");
}
