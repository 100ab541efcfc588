// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The exit status and the `--json` outcome say what became of the devices, whatever ended
//! the command: success, a failure rolled back, an outcome in doubt, a signal before or
//! after the point of no return, a second signal.

mod common;

use std::io::{BufRead, BufReader};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Stdio;

use common::{assert_clean_failure, kill, stderr, Dirs, HeldOutput, Recv};
use vfio_mig_session::handshake::{read_message, write_message, Message};

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"))
}

/// The fate the outcome gives `device`.
fn fate(outcome: &serde_json::Value, device: &str) -> String {
    outcome["devices"]
        .as_array()
        .unwrap_or_else(|| panic!("no devices: {outcome}"))
        .iter()
        .find(|d| d["device"] == device)
        .unwrap_or_else(|| panic!("{device} missing: {outcome}"))["fate"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The session id a command printed on stderr (`...: session HEX, epoch N, ...`).
fn printed_session(err: &str) -> String {
    let at = err.find("session ").expect("a session line") + "session ".len();
    err[at..at + 32].to_owned()
}

/// SIGTERM reaches `send` after COMMIT (the destination runs the state; RESUMED is held
/// back by a relay in between): the source stays stopped, the status is 3 (in doubt), not
/// 143 (rolled back), and `--json` says so with the session id.
#[test]
fn a_signal_after_commit_exits_in_doubt_with_its_json_outcome() {
    let dirs = Dirs::new();
    let (real, front) = (dirs.path("real"), dirs.path("front"));
    let dev = "mock:v1,size=1M,seed=8";
    let listen = format!("unix:{}", real.display());
    let recv = Recv::start(&dirs, &[], &[dev, "--listen", &listen, "--once", "--json"]);
    let relay = UnixListener::bind(&front).unwrap();
    let send = dirs
        .cmd(&[])
        .args(["send", dev, "--to", &format!("unix:{}", front.display())])
        .arg("--json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (src, _) = relay.accept().unwrap();
    let dst = UnixStream::connect(&real).unwrap();
    let (mut from_src, mut to_dst) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
    let forward = std::thread::spawn(move || {
        let _ = std::io::copy(&mut from_src, &mut to_dst);
        let _ = to_dst.shutdown(Shutdown::Write);
    });
    let (mut from_dst, mut to_src) = (dst.try_clone().unwrap(), src.try_clone().unwrap());
    loop {
        let m = read_message(&mut from_dst, "relay").unwrap();
        if matches!(m, Message::Resumed { .. }) {
            break;
        }
        write_message(&mut to_src, &m, "relay").unwrap();
    }
    // The destination runs the state; the source waits for RESUMED on an open connection.
    let (status, out, err) = recv.wait();
    assert!(status.success(), "{err}");
    assert_eq!(json(&out)["outcome"], "resumed", "{out}");
    kill(send.id(), libc::SIGTERM);
    let o = send.wait_with_output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert_clean_failure(o.status, &err, "in doubt");
    let outcome = json(&String::from_utf8_lossy(&o.stdout));
    assert_eq!(outcome["outcome"], "in-doubt", "{outcome}");
    assert_eq!(outcome["exit_status"], 3, "{outcome}");
    assert_eq!(outcome["signal"], "SIGTERM", "{outcome}");
    assert_eq!(
        outcome["session"],
        printed_session(&err).as_str(),
        "{outcome}"
    );
    assert_eq!(fate(&outcome, dev), "stopped", "{outcome}");
    drop((src, dst));
    forward.join().unwrap();
}

/// A signal that arrives once the command completed (`save` blocked writing its JSON) does
/// not turn its success into "rolled back".
#[test]
fn a_signal_after_completion_keeps_status_0() {
    let dirs = Dirs::new();
    let out = dirs.path("out");
    let mut cmd = dirs.cmd(&[]);
    // -v: the signal thread logs "SIGTERM: cancelling" once it has taken the signal.
    cmd.args([
        "-v",
        "save",
        "mock:v1,size=1M,seed=2",
        "-o",
        out.to_str().unwrap(),
    ])
    .arg("--json")
    .stderr(Stdio::piped());
    let mut held = HeldOutput::stdout(cmd);
    held.wait_blocked();
    kill(held.child.id(), libc::SIGTERM);
    let mut log = BufReader::new(held.child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    for line in log.by_ref().map_while(Result::ok) {
        let taken = line.contains("SIGTERM: cancelling");
        seen.push(line);
        if taken {
            break;
        }
    }
    // The rest of stderr is read to its end, so that no write of the command fails.
    let rest = std::thread::spawn(move || log.map_while(Result::ok).collect::<Vec<_>>());
    let (status, text) = held.release();
    seen.extend(rest.join().unwrap());
    assert_eq!(status.code(), Some(0), "{text} {seen:?}");
    assert!(
        json(&text)["stop_copy_bytes"].as_u64().unwrap() > 0,
        "{text}"
    );
    let o = dirs.run(&[
        "load",
        "mock:v1,size=1M,seed=2",
        "-i",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// A failure with `--json` prints its outcome on stdout: what became of each device.
#[test]
fn a_failure_prints_its_json_outcome_with_each_devices_fate() {
    let dirs = Dirs::new();
    let (a, b) = ("mock:v1,size=4M,seed=3", "mock:v1,size=4M,seed=4");
    let o = dirs.run(&["migrate", a, b, "--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let outcome = json(&String::from_utf8_lossy(&o.stdout));
    assert_eq!(outcome["outcome"], "failed", "{outcome}");
    assert_eq!(outcome["command"], "migrate", "{outcome}");
    assert_eq!(outcome["exit_status"], 1, "{outcome}");
    assert_eq!(fate(&outcome, a), "returned-to-running", "{outcome}");
    assert_eq!(fate(&outcome, b), "reset", "{outcome}");
    assert_eq!(
        outcome["session"],
        printed_session(&stderr(&o)).as_str(),
        "{outcome}"
    );
    // Refused before the device was touched.
    let f = dirs.path("exists");
    std::fs::write(&f, b"x").unwrap();
    let o = dirs.run(&["save", a, "-o", f.to_str().unwrap(), "--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let outcome = json(&String::from_utf8_lossy(&o.stdout));
    assert_eq!(outcome["outcome"], "failed", "{outcome}");
    assert_eq!(fate(&outcome, a), "untouched", "{outcome}");
    assert!(outcome["session"].is_null(), "{outcome}");
}

/// A device given with its options in another order than the mock's canonical spelling
/// (`id=` before `fail-at=`) is still one device in the outcome, listed as given, with the
/// fate the error names (the failed STOP left it RUNNING: docs/cli.md's `running`), not a
/// second entry beside an "untouched" one.
#[test]
fn a_device_spelled_out_of_order_has_one_fate() {
    let dirs = Dirs::new();
    let dev = "mock:v1,size=1M,seed=1,id=spelled,fail-at=state-write@1";
    let f = dirs.path("out");
    let o = dirs.run(&["save", dev, "-o", f.to_str().unwrap(), "--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let outcome = json(&String::from_utf8_lossy(&o.stdout));
    assert_eq!(outcome["devices"].as_array().unwrap().len(), 1, "{outcome}");
    assert_eq!(fate(&outcome, dev), "running", "{outcome}");
}

/// A second signal ends the command at once, without rollback: status 4 (not "rolled
/// back"), and the JSON outcome says the devices' states are unknown.
#[test]
fn a_second_signal_exits_5_saying_the_devices_are_unknown() {
    let dirs = Dirs::new();
    let sock = dirs.path("s");
    let stdout = std::fs::File::create(dirs.path("stdout")).unwrap();
    let dev = "mock:v1,size=1M,seed=6";
    let mut cmd = dirs.cmd(&[]);
    cmd.args(["recv", dev, "--listen", &format!("unix:{}", sock.display())])
        .arg("--json")
        .stdout(Stdio::from(stdout));
    let mut held = HeldOutput::stderr(cmd);
    // Held at "listening on", its main thread cannot end the command: the second signal does.
    held.wait_blocked();
    kill(held.child.id(), libc::SIGTERM);
    kill(held.child.id(), libc::SIGINT);
    // Released only once the second signal's outcome is out (the main thread, released,
    // would end the command on the first signal).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !std::fs::read_to_string(dirs.path("stdout"))
        .unwrap()
        .ends_with("}\n")
    {
        assert!(std::time::Instant::now() < deadline, "no outcome on stdout");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let (status, err) = held.release();
    assert_eq!(status.code(), Some(5), "{err}");
    let outcome = json(&std::fs::read_to_string(dirs.path("stdout")).unwrap());
    assert_eq!(outcome["outcome"], "abandoned", "{outcome}");
    assert_eq!(outcome["exit_status"], 5, "{outcome}");
    assert_eq!(fate(&outcome, dev), "unknown", "{outcome}");
    assert!(!sock.exists());
}

/// A SIGTERM that arrives before `main()` installed its handler (here: blocked and pending
/// when the program starts, as after a parent's `sigprocmask`) cancels the command before
/// it touches a device, as a signal during the command does (docs/cli.md "Signals": 143,
/// rolled back), instead of being lost (the command then ran to completion) or killing the
/// process without a word.
#[test]
fn a_signal_pending_at_start_cancels_before_any_device_is_touched() {
    use std::os::unix::process::CommandExt;
    let dirs = Dirs::new();
    let dev = "mock:v1,size=1M,seed=12";
    let out = dirs.path("out");
    let mut cmd = dirs.cmd(&[]);
    cmd.args(["save", dev, "-o", out.to_str().unwrap(), "--json"]);
    // SAFETY: between fork and exec only async-signal-safe calls (sigprocmask, raise) run,
    // on a signal set local to this closure.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0
                || libc::raise(libc::SIGTERM) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let o = cmd.output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(143), "{err}");
    let line = assert_clean_failure(o.status, &err, "interrupted by SIGTERM");
    assert!(!line.contains("panicked"), "{line}");
    let outcome = json(&String::from_utf8_lossy(&o.stdout));
    assert_eq!(outcome["outcome"], "interrupted", "{outcome}");
    assert_eq!(outcome["signal"], "SIGTERM", "{outcome}");
    assert_eq!(fate(&outcome, dev), "untouched", "{outcome}");
    assert!(!out.exists(), "an interrupted save left {}", out.display());
}

/// Every command's `--json` success names its command, its outcome and the exit status
/// (docs/cli.md "JSON output"), as a failure's does, so that an orchestrator reads every
/// outcome the same way; the command's own report fields stay beside them.
#[test]
fn every_commands_json_success_says_its_outcome() {
    let dirs = Dirs::new();
    let check = |o: &std::process::Output, command: &str, outcome: &str, field: &str| {
        assert_eq!(o.status.code(), Some(0), "{command}: {}", stderr(o));
        let v = json(&String::from_utf8_lossy(&o.stdout));
        assert_eq!(v["command"], command, "{v}");
        assert_eq!(v["outcome"], outcome, "{v}");
        assert_eq!(v["exit_status"], 0, "{v}");
        assert!(
            !v[field].is_null(),
            "{command}: its report's {field} is missing: {v}"
        );
        v
    };
    let dev = "mock:v1,size=1M,seed=21";
    let file = dirs.path("saved");
    let file = file.to_str().unwrap();
    let o = dirs.run(&["probe", dev, "--json"]);
    check(&o, "probe", "completed", "protocol");
    let o = dirs.run(&["save", dev, "-o", file, "--json"]);
    let saved = check(&o, "save", "completed", "stop_copy_bytes");
    assert_eq!(
        saved["session"],
        printed_session(&stderr(&o)).as_str(),
        "{saved}"
    );
    let o = dirs.run(&["inspect", file, "--json"]);
    check(&o, "inspect", "completed", "totals");
    let o = dirs.run(&["load", dev, "-i", file, "--json"]);
    check(&o, "load", "completed", "chunks");
    let o = dirs.run(&["recover", dev, "--json"]);
    check(&o, "recover", "completed", "action");
    let (a, b) = ("mock:v2,size=1M,seed=22", "mock:v2,size=1M,seed=23");
    let o = dirs.run(&["migrate", a, a, b, b, "--json"]);
    let v = check(&o, "migrate", "completed", "pairs");
    assert_eq!(v["pairs"].as_array().map(Vec::len), Some(2), "{v}");
    let sock = dirs.path("s");
    let listen = format!("unix:{}", sock.display());
    let recv = Recv::start(&dirs, &[], &[dev, "--listen", &listen, "--json"]);
    let o = dirs.run(&["send", dev, "--to", &listen, "--json"]);
    check(&o, "send", "completed", "reports");
    let (status, out, err) = recv.wait();
    assert!(status.success(), "{err}");
    let v = json(&out);
    assert_eq!(v["command"], "recv", "{v}");
    assert_eq!(v["outcome"], "resumed", "{v}");
    assert_eq!(v["exit_status"], 0, "{v}");
}
