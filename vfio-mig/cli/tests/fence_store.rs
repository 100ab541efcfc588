// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `--fence`: handoffs between `send` and `recv` processes acting as different hosts of a
//! fleet, through a shared fencing store (the local directory store, and a 3-member etcd
//! cluster on loopback over mutual TLS); plain HTTP only with `--fence-insecure`.

#[path = "../../etcd/tests/common/cluster.rs"]
mod cluster;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_vfio-mig");
const SESSION: &str = "0123456789abcdef0123456789abcdef";

/// One simulated host: its own lock and state directories and owner name, the shared store,
/// and the options or environment variables that reach it (TLS files, `--fence-insecure`).
struct Host {
    dir: PathBuf,
    owner: &'static str,
    fence: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

/// The fencing variables of the caller's environment, which no test inherits.
const FENCE_ENV: [&str; 5] = [
    "VFIO_MIG_FENCE",
    "VFIO_MIG_FENCE_CA",
    "VFIO_MIG_FENCE_CERT",
    "VFIO_MIG_FENCE_CERT_KEY",
    "VFIO_MIG_FENCE_INSECURE",
];

impl Host {
    fn new(dir: &std::path::Path, owner: &'static str, fence: &str) -> Self {
        Host {
            dir: dir.to_owned(),
            owner,
            fence: fence.to_owned(),
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    /// `vfio-mig COMMAND...` with this host's fencing options after it (they are options of
    /// the command).
    fn cmd(&self, command: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(command);
        for v in FENCE_ENV {
            c.env_remove(v);
        }
        c.env_remove("RUST_LOG")
            // An empty configuration file: the host's own must not reach the tests.
            .env("VFIO_MIG_CONFIG", "/dev/null")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(&self.args)
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
        self.cmd(args).output().expect("run vfio-mig")
    }

    /// Starts `recv DEVICE --listen unix:SOCK --once` and waits until it listens.
    fn recv(&self, device: &str, sock: &str) -> Child {
        let mut child = self
            .cmd(&["recv", device, "--listen", sock, "--once"])
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

/// `configure` gives each host its way to the store.
fn hosts_handoff_through(fence: &str, dir: &std::path::Path, configure: &dyn Fn(&mut Host)) {
    let host = |owner| {
        let mut h = Host::new(dir, owner, fence);
        configure(&mut h);
        h
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
    // Refused before the device was touched: not a session, recv --once keeps waiting.
    assert!(
        recv.try_wait().unwrap().is_none(),
        "a refused source ended recv --once"
    );
    recv.kill().unwrap();
    recv.wait().unwrap();

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
    hosts_handoff_through(&fence, dir.path(), &|_| {});
}

#[test]
fn hosts_hand_off_one_device_state_through_etcd_over_tls() {
    let Some(cluster) = cluster::EtcdCluster::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pki = cluster.pki().clone();
    assert!(cluster.url().starts_with("etcds://"));
    // host-d takes its TLS files from the environment, the others from options.
    hosts_handoff_through(&cluster.url(), dir.path(), &|h| {
        let files = [
            ("CA", &pki.ca),
            ("CERT", &pki.host.cert),
            ("CERT_KEY", &pki.host.key),
        ];
        for (name, path) in files {
            let path = path.display().to_string();
            if h.owner == "host-d" {
                h.env.push((format!("VFIO_MIG_FENCE_{name}"), path));
            } else {
                let option = format!("--fence-{}", name.to_lowercase().replace('_', "-"));
                h.args.extend([option, path]);
            }
        }
    });
}

#[test]
fn hosts_hand_off_through_a_plain_etcd_only_with_fence_insecure() {
    let Some(cluster) = cluster::EtcdCluster::start_plain() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // host-d asks for plain HTTP through the environment.
    hosts_handoff_through(&cluster.url(), dir.path(), &|h| {
        if h.owner == "host-d" {
            h.env
                .push(("VFIO_MIG_FENCE_INSECURE".into(), "true".into()));
        } else {
            h.args.push("--fence-insecure".into());
        }
    });
    // Without it the store is not even asked.
    let h = Host::new(dir.path(), "host-a", &cluster.url());
    let sock = format!("unix:{}", dir.path().join("s").display());
    let o = h.run(&["send", "mock:v1,size=1M", "--to", &sock]);
    assert_refused(
        &o,
        &format!(
            "--fence {}: plain HTTP lets anyone who reaches the etcd client port rewrite \
             owners and epochs; use etcds:// with --fence-ca, --fence-cert and \
             --fence-cert-key, or give --fence-insecure",
            cluster.url()
        ),
    );
}

#[test]
fn a_host_whose_certificate_the_fleet_ca_did_not_sign_is_refused_before_its_device_is_touched() {
    let Some(cluster) = cluster::EtcdCluster::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pki = cluster.pki();
    let mut h = Host::new(dir.path(), "host-a", &cluster.url());
    h.args = ["--fence-ca", "--fence-cert", "--fence-cert-key"]
        .iter()
        .zip([&pki.ca, &pki.other_host.cert, &pki.other_host.key])
        .flat_map(|(o, p)| [o.to_string(), p.display().to_string()])
        .collect();
    let sock = format!("unix:{}", dir.path().join("s").display());
    let o = h.run(&["send", "mock:v1,size=1M", "--to", &sock]);
    assert_refused(
        &o,
        &format!("fencing store {}: every member refused TLS", cluster.url()),
    );
    assert!(
        stderr(&o).contains("the member refused this host")
            && stderr(&o).contains("no device was touched"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn tls_options_are_checked_before_any_store_is_asked() {
    let dir = tempfile::tempdir().unwrap();
    let sock = format!("unix:{}", dir.path().join("s").display());
    let run = |fence: &str, args: &[&str]| {
        let mut h = Host::new(dir.path(), "host-a", fence);
        h.args = args.iter().map(|a| a.to_string()).collect();
        h.run(&["send", "mock:v1,size=1M", "--to", &sock])
    };
    let o = run("etcds://127.0.0.1:1", &["--fence-ca", "ca.crt"]);
    assert_refused(
        &o,
        "--fence etcds://127.0.0.1:1: TLS needs --fence-cert and --fence-cert-key",
    );
    let o = run("etcds://127.0.0.1:1", &["--fence-insecure"]);
    assert_refused(&o, "--fence-insecure: etcds://127.0.0.1:1 is TLS");
    let o = run("dir:/tmp/x", &["--fence-ca", "ca.crt"]);
    assert_refused(
        &o,
        "--fence-ca, --fence-cert and --fence-cert-key are for an etcds:// store",
    );
    let missing = dir.path().join("missing.crt");
    let m = missing.display().to_string();
    let o = run(
        "etcds://127.0.0.1:1",
        &["--fence-ca", &m, "--fence-cert", &m, "--fence-cert-key", &m],
    );
    assert_refused(&o, &format!("read CA bundle {m}"));
}

#[test]
fn an_unreachable_etcd_refuses_the_handoff_before_the_device_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on port 1 of the loopback.
    let mut h = Host::new(dir.path(), "host-a", "etcd://127.0.0.1:1,127.0.0.1:2");
    h.args.push("--fence-insecure".into());
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
    assert_refused(&o, "--fence etcd:/x: expected etcds://HOST:PORT");
}
