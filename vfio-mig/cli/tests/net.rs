// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `send` and `recv` as separate processes: over a Unix socket, TCP loopback and (as root) TCP
//! between two network namespaces; refusals, replays, locks held by another process.

use std::io::Write;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

mod common;

use common::{assert_clean_failure, stderr, Dirs, Pki, Recv, BIN};

#[test]
fn live_migration_over_a_unix_socket_with_json_reports() {
    let dirs = Dirs::new();
    let sock = dirs.path("s");
    let listen = format!("unix:{}", sock.display());
    let dev = "mock:v1,size=16M,seed=5";
    let recv = Recv::start(&dirs, &[], &[dev, "--listen", &listen, "--once", "--json"]);
    assert_eq!(recv.addr, listen);
    let o = dirs.run(&["send", dev, "--to", &listen, "--live", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let sent: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let (status, out, err) = recv.wait();
    assert!(status.success(), "{err}");
    let got: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(sent["outcome"], "completed");
    assert_eq!(got["outcome"], "resumed");
    assert_eq!(got["session"], sent["session"]);
    assert_eq!(got["epoch"], sent["epoch"]);
    assert!(sent["reports"][0]["pre_copy_bytes"].as_u64().unwrap() >= 16 << 20);
    assert_eq!(
        got["reports"][0]["pre_copy_bytes"],
        sent["reports"][0]["pre_copy_bytes"]
    );
    assert_eq!(got["confirmed"], true);
    // The socket file is removed when recv exits.
    assert!(!sock.exists());
}

#[test]
fn migration_over_tcp_loopback() {
    let dirs = Dirs::new();
    let dev = "mock:v1,size=8M,seed=6,data=trapped";
    for listen in ["tcp:127.0.0.1:0", "tcp:[::1]:0"] {
        if listen.contains("::1") && std::net::TcpListener::bind("[::1]:0").is_err() {
            eprintln!("no IPv6 loopback here: {listen} not tested");
            continue;
        }
        let recv = Recv::start(
            &dirs,
            &[],
            &[dev, "--listen", listen, "--once", "--insecure"],
        );
        assert!(
            recv.addr.starts_with(&listen[..listen.len() - 1]),
            "{}",
            recv.addr
        );
        let o = dirs.run(&["send", dev, "--to", &recv.addr, "--live", "--insecure"]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stderr(&o).contains("destination running"), "{}", stderr(&o));
        let (status, _, err) = recv.wait();
        assert!(status.success(), "{err}");
        assert!(err.contains("device running"), "{err}");
    }
}

#[test]
fn wrong_seed_fails_cleanly_on_both_sides() {
    let dirs = Dirs::new();
    let recv = Recv::start(
        &dirs,
        &[],
        &[
            "mock:v1,size=4M,seed=2",
            "--listen",
            "tcp:127.0.0.1:0",
            "--once",
            "--insecure",
        ],
    );
    let o = dirs.run(&[
        "send",
        "mock:v1,size=4M,seed=1",
        "--to",
        &recv.addr,
        "--live",
        "--insecure",
    ]);
    let line = assert_clean_failure(o.status, &stderr(&o), "the destination failed");
    assert!(line.contains("seed=1 was returned to RUNNING"), "{line}");
    let (status, _, err) = recv.wait();
    let line = assert_clean_failure(status, &err, "RESUMING (100b) -> RUNNING (001b)");
    assert!(line.contains("seed=2 was reset"), "{line}");
}

#[test]
fn a_device_claimed_by_another_process_is_refused_at_once() {
    let dirs = Dirs::new();
    let dev = "mock:v1,size=1M,id=shared-gpu";
    let recv = Recv::start(
        &dirs,
        &[],
        &[
            dev,
            "--listen",
            &format!("unix:{}", dirs.path("s").display()),
        ],
    );
    let pid = recv.child.id();
    let expect = format!("is in use by another vfio-mig (pid {pid};");
    let out = dirs.path("out");
    for args in [
        vec!["save", dev, "-o", out.to_str().unwrap()],
        vec!["recv", dev, "--listen", "tcp:127.0.0.1:0"],
        vec!["migrate", "mock:v1,size=1M", dev],
    ] {
        let o = dirs.run(&args);
        assert_clean_failure(o.status, &stderr(&o), &expect);
    }
    drop(recv);
    let o = dirs.run(&["migrate", dev, dev]);
    assert_clean_failure(o.status, &stderr(&o), "is given twice");
    // Released with the process.
    let o = dirs.run(&["save", dev, "-o", dirs.path("f").to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn stale_epochs_are_refused_and_replayed_sessions_answered_idempotently() {
    let dirs = Dirs::new();
    let dst = "mock:v1,size=1M,seed=8,id=fenced";
    let src = "mock:v1,size=1M,seed=8";
    let session = "00112233445566778899aabbccddeeff";
    let listen = format!("unix:{}", dirs.path("s").display());
    let pair = |send_args: &[&str]| {
        let recv = Recv::start(&dirs, &[], &[dst, "--listen", &listen, "--once"]);
        let mut args = vec!["send", src, "--to", &listen];
        args.extend_from_slice(send_args);
        let o = dirs.run(&args);
        let (status, _, err) = recv.wait();
        (o, status, err)
    };
    let (o, status, err) = pair(&["--epoch", "5", "--session", session]);
    assert!(
        o.status.success() && status.success(),
        "{}\n{err}",
        stderr(&o)
    );

    // The same session again: answered ALREADY_COMPLETED, exit 0 on both sides.
    let (o, status, err) = pair(&["--epoch", "5", "--session", session]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("was already completed"),
        "{}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("not resumed here"), "{}", stderr(&o));
    assert!(status.success(), "{err}");
    assert!(err.contains("was not loaded again"), "{err}");

    // An older epoch: refused on both sides, before the device is touched; that is not a
    // session, so even `recv --once` keeps waiting (issue 21, defect 7).
    let mut recv = Recv::start(&dirs, &[], &[dst, "--listen", &listen, "--once"]);
    let o = dirs.run(&["send", src, "--to", &listen, "--epoch", "4"]);
    assert_clean_failure(o.status, &stderr(&o), "stale epoch 4 < 5");
    let warning = recv.wait_line("stale epoch 4 < 5");
    assert!(warning.contains("warning:"), "{warning}");
    assert!(recv.running(), "a refused source ended recv --once");
    drop(recv);

    // The state file is small JSON.
    let state: Vec<_> = std::fs::read_dir(dirs.path("state")).unwrap().collect();
    assert_eq!(state.len(), 1);
}

#[test]
fn recv_waits_for_a_retry_after_a_refusal_by_default() {
    let dirs = Dirs::new();
    let dst = "mock:v1,size=1M,seed=9,id=retry";
    let listen = format!("unix:{}", dirs.path("s").display());
    // Epoch 7 first, so that a send with epoch 6 is refused.
    let recv = Recv::start(&dirs, &[], &[dst, "--listen", &listen, "--once"]);
    let o = dirs.run(&[
        "send",
        "mock:v1,size=1M,seed=9",
        "--to",
        &listen,
        "--epoch",
        "7",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(recv.wait().0.success());

    let recv = Recv::start(&dirs, &[], &[dst, "--listen", &listen]);
    let o = dirs.run(&[
        "send",
        "mock:v1,size=1M,seed=9",
        "--to",
        &listen,
        "--epoch",
        "6",
    ]);
    assert_clean_failure(o.status, &stderr(&o), "stale epoch 6 < 7");
    let o = dirs.run(&[
        "send",
        "mock:v1,size=1M,seed=9",
        "--to",
        &listen,
        "--epoch",
        "8",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (status, _, err) = recv.wait();
    assert!(status.success(), "{err}");
    assert!(
        err.contains("warning:") && err.contains("stale epoch 6 < 7"),
        "{err}"
    );
    assert!(err.contains("device running"), "{err}");
}

#[test]
fn nothing_listening_fails_fast_with_the_address() {
    let dirs = Dirs::new();
    let none = format!("unix:{}", dirs.path("none").display());
    let o = dirs.run(&["send", "mock:v1,size=1M", "--to", &none]);
    assert_clean_failure(o.status, &stderr(&o), &format!("connect to {none}"));
    // A TCP port nobody listens on (bound, then closed).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("tcp:127.0.0.1:{port}");
    let o = dirs.run(&["send", "mock:v1,size=1M", "--to", &addr, "--insecure"]);
    assert_clean_failure(o.status, &stderr(&o), &format!("connect to {addr}"));
    let o = dirs.run(&["send", "mock:v1,size=1M", "--to", "udp:1.2.3.4:5"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("unknown transport"), "{}", stderr(&o));
}

#[test]
fn send_and_recv_to_a_file_save_and_load() {
    let dirs = Dirs::new();
    let f = dirs.path("state.vfiomig");
    let to = format!("file:{}", f.display());
    let o = dirs.run(&[
        "send",
        "mock:v1,size=1M,seed=4,id=f1",
        "--to",
        &to,
        "--live",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = dirs.run(&["recv", "mock:v1,size=1M,seed=4,id=f2", "--listen", &to]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Loading the same file into the same device again is a replay.
    let o = dirs.run(&[
        "load",
        "mock:v1,size=1M,seed=4,id=f2",
        "-i",
        f.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("not loaded again"), "{}", stderr(&o));
}

// ---- Two network namespaces ------------------------------------------------------------

/// Why the namespace test cannot run here, if it cannot.
fn netns_unavailable() -> Option<String> {
    // SAFETY: geteuid(2) takes no arguments, touches no memory and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("the `ip` command (iproute2) is not installed".into()),
    }
}

/// Two network namespaces joined by a veth pair, deleted on drop (even after a failure).
struct NetnsPair {
    names: [String; 2],
}

impl NetnsPair {
    const ADDRS: [&'static str; 2] = ["10.99.0.1", "10.99.0.2"];

    fn ip(args: &[&str]) -> Result<(), String> {
        let o = Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if o.status.success() {
            Ok(())
        } else {
            Err(format!("ip {}: {}", args.join(" "), stderr(&o).trim()))
        }
    }

    fn create() -> Result<Self, String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let tag = format!(
            "vmig{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let pair = Self {
            names: [format!("{tag}a"), format!("{tag}b")],
        };
        let [a, b] = &pair.names;
        Self::ip(&["netns", "add", a])?;
        Self::ip(&["netns", "add", b])?;
        // Created straight inside the namespaces: no name clash in the host's namespace.
        Self::ip(&[
            "link", "add", "veth0", "netns", a, "type", "veth", "peer", "name", "veth0", "netns", b,
        ])?;
        for (ns, addr) in [(a, Self::ADDRS[0]), (b, Self::ADDRS[1])] {
            Self::ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "veth0",
            ])?;
            Self::ip(&["-n", ns, "link", "set", "veth0", "up"])?;
            Self::ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(pair)
    }

    /// The command prefix that runs a program in namespace `i`.
    fn exec(&self, i: usize) -> [&str; 4] {
        ["ip", "netns", "exec", &self.names[i]]
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Self::ip(&["netns", "del", n]);
        }
    }
}

fn skip_or_fail(reason: &str) {
    let line = format!("SKIPPED: {reason}");
    if std::env::var("VFIO_MIG_REQUIRE_NETNS").as_deref() == Ok("1") {
        panic!("{line} (VFIO_MIG_REQUIRE_NETNS=1 requires this test to run)");
    }
    // In the test's captured output, and on the terminal of `cargo test` (a direct write to
    // stderr is not captured by the test harness, unlike `eprintln!`).
    println!("{line}");
    let _ = writeln!(std::io::stderr(), "{line}");
}

#[test]
fn live_migration_over_tcp_between_two_network_namespaces() {
    if let Some(reason) = netns_unavailable() {
        return skip_or_fail(&reason);
    }
    let ns = match NetnsPair::create() {
        Ok(ns) => ns,
        Err(e) => return skip_or_fail(&format!("cannot create network namespaces: {e}")),
    };
    let dirs = Dirs::new();
    let listen = format!("tcp:{}:7107", NetnsPair::ADDRS[0]);
    let dev = "mock:v1,size=32M,seed=12,dirty-rate=8M";

    // Success: recv in namespace a, send in namespace b, across the veth pair.
    let recv = Recv::start(
        &dirs,
        &ns.exec(0),
        &[dev, "--listen", &listen, "--once", "--json", "--insecure"],
    );
    assert_eq!(recv.addr, listen);
    let o = dirs
        .cmd(&ns.exec(1))
        .args([
            BIN,
            "send",
            dev,
            "--to",
            &listen,
            "--live",
            "--json",
            "--insecure",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let (status, out, err) = recv.wait();
    assert!(status.success(), "{err}");
    let got: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(got["outcome"], "resumed");
    assert!(
        got["source"]
            .as_str()
            .unwrap()
            .starts_with("tcp:10.99.0.2:"),
        "{got}"
    );

    // Failure: a destination with another seed; both sides exit non-zero, cleanly.
    let recv = Recv::start(
        &dirs,
        &ns.exec(0),
        &[
            "mock:v1,size=32M,seed=13",
            "--listen",
            &listen,
            "--once",
            "--insecure",
        ],
    );
    let o = dirs
        .cmd(&ns.exec(1))
        .args([BIN, "send", dev, "--to", &listen, "--live", "--insecure"])
        .output()
        .unwrap();
    let line = assert_clean_failure(o.status, &stderr(&o), "the destination failed");
    assert!(line.contains("returned to RUNNING"), "{line}");
    let (status, _, err) = recv.wait();
    let line = assert_clean_failure(status, &err, "RESUMING");
    assert!(line.contains("was reset"), "{line}");

    // TLS across the namespaces: mutual authentication, the source's identity authorized
    // and reported; a source certificate from another CA is refused, recv keeps waiting.
    let pki = Pki::new(dirs.tmp.path());
    let mut recv_args: Vec<String> = vec![
        dev.into(),
        "--listen".into(),
        listen.clone(),
        "--once".into(),
        "--json".into(),
        "--allow".into(),
        "dns:src.example".into(),
    ];
    recv_args.extend(pki.dst.args());
    let recv_args: Vec<&str> = recv_args.iter().map(String::as_str).collect();
    let mut recv = Recv::start(&dirs, &ns.exec(0), &recv_args);
    let send_tls = |leaf: &common::Leaf| {
        let mut args: Vec<String> = vec![
            BIN.into(),
            "send".into(),
            dev.into(),
            "--to".into(),
            listen.clone(),
            "--live".into(),
            "--tls-server-name".into(),
            "dst.example".into(),
        ];
        args.extend(leaf.args());
        dirs.cmd(&ns.exec(1)).args(&args).output().unwrap()
    };
    let o = send_tls(&pki.rogue);
    assert_clean_failure(o.status, &stderr(&o), "refused our client certificate");
    recv.wait_line("ignored");
    assert!(recv.running());
    let o = send_tls(&pki.src);
    assert!(o.status.success(), "{}", stderr(&o));
    let (status, out, err) = recv.wait();
    assert!(status.success(), "{err}");
    let got: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(got["outcome"], "resumed");
    assert!(
        got["source_identity"]
            .as_str()
            .unwrap()
            .contains("dns:src.example"),
        "{got}"
    );

    // Nothing listens in namespace a any more: namespace b cannot reach the address.
    let o = dirs
        .cmd(&ns.exec(1))
        .args([
            BIN,
            "send",
            dev,
            "--to",
            &listen,
            "--connect-timeout",
            "2",
            "--insecure",
        ])
        .output()
        .unwrap();
    assert_clean_failure(o.status, &stderr(&o), &format!("connect to {listen}"));
    drop(ns);
}

/// The namespace helper itself must not leak namespaces.
#[test]
fn netns_pair_is_removed_on_drop() {
    if netns_unavailable().is_some() {
        return;
    }
    let Ok(ns) = NetnsPair::create() else { return };
    let names = ns.names.clone();
    drop(ns);
    let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    for n in names {
        assert!(
            !list
                .lines()
                .any(|l| l.split_whitespace().next() == Some(&n)),
            "{n} left"
        );
    }
}

/// The destination decides on its own devices (QEMU refuses a unit without P2P on either
/// side): `recv` of two devices without P2P (flags 0x5, hisi-like) is refused at once, before
/// it listens, whatever a source would opt in to; with its own `--allow-non-p2p-unit` (and the
/// source's) the unit migrates. Under `timeout`, so that a recv that listens anyway fails the
/// test instead of hanging it.
#[test]
fn recv_refuses_a_unit_without_p2p_unless_it_opts_in_itself() {
    let dirs = Dirs::new();
    let devs = [
        "mock:v2,size=1M,seed=1,flags=0x5",
        "mock:v2,size=1M,seed=2,flags=0x5",
    ];
    let listen = format!("unix:{}", dirs.path("s").display());
    let o = dirs
        .cmd(&["timeout", "20"])
        .arg(BIN)
        .args(["recv", devs[0], devs[1], "--listen", &listen, "--once"])
        .output()
        .expect("run recv");
    assert_clean_failure(o.status, &stderr(&o), "P2P");
    let recv = Recv::start(
        &dirs,
        &[],
        &[
            devs[0],
            devs[1],
            "--listen",
            &listen,
            "--once",
            "--allow-non-p2p-unit",
        ],
    );
    let o = dirs.run(&[
        "send",
        devs[0],
        devs[1],
        "--to",
        &recv.addr,
        "--allow-non-p2p-unit",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (status, _, err) = recv.wait();
    assert!(status.success(), "{err}");
}
