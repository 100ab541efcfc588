// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Attacks on and accidents around `send`/`recv`, `save`/`load` and the listener, each run
//! against the `vfio-mig` binary: replayed and forged streams, man in the middle, untrusted
//! and unauthorized certificates, held and probed listeners, forged epochs, signals, unsafe
//! output paths.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{assert_clean_failure, kill, stderr, Dirs, Pki, Recv, BIN};
use vfio_mig::{wire::DeviceDescriptor, wire::Protocol, wire::StreamHeader};
use vfio_mig_session::handshake::Message;

/// `recv DEV --listen tcp:127.0.0.1:0` with the destination's certificate, allowing
/// `dns:src.example`.
fn tls_recv(dirs: &Dirs, pki: &Pki, dev: &str, extra: &[&str]) -> Recv {
    let mut args: Vec<String> = vec![dev.into(), "--listen".into(), "tcp:127.0.0.1:0".into()];
    args.extend(pki.dst.args());
    args.extend(["--allow".into(), "dns:src.example".into()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Recv::start(dirs, &[], &args)
}

/// `send DEV --to ADDR` with `leaf`'s certificate, checking the destination as dst.example.
fn tls_send(
    dirs: &Dirs,
    leaf: &common::Leaf,
    dev: &str,
    to: &str,
    extra: &[&str],
) -> std::process::Output {
    let mut args: Vec<String> = vec!["send".into(), dev.into(), "--to".into(), to.into()];
    args.extend(leaf.args());
    args.extend(["--tls-server-name".into(), "dst.example".into()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    dirs.run(&args)
}

fn tcp_port(addr: &str) -> String {
    addr.strip_prefix("tcp:").unwrap().to_owned()
}

/// A saved stream of `dev` (unauthenticated).
fn saved(dirs: &Dirs, dev: &str, name: &str) -> Vec<u8> {
    let f = dirs.path(name);
    let o = dirs.run(&["save", dev, "-o", f.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::read(f).unwrap()
}

/// A one-device v1 stream header (what a raw client sends after HELLO).
fn header_bytes(session: u8, epoch: u64) -> Vec<u8> {
    StreamHeader {
        session_id: [session; 16],
        epoch,
        devices: vec![DeviceDescriptor {
            protocol: Protocol::V1,
            live: false,
            migration_flags: 0,
            model: "mock:v1".into(),
        }],
    }
    .encode()
    .unwrap()
}

fn hello() -> Vec<u8> {
    Message::Hello { features: 0 }.encode()
}

#[test]
fn tls_migration_authenticates_both_sides_and_reports_the_identity() {
    let dirs = Dirs::new();
    let pki = Pki::new(dirs.tmp.path());
    let dev = "mock:v1,size=4M,seed=21";
    let recv = tls_recv(&dirs, &pki, dev, &["--once", "--json"]);
    let o = tls_send(&dirs, &pki.src, dev, &recv.addr, &["--live", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The session id is printed when the session starts, before any data moved.
    let sent: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let session = sent["session"].as_str().unwrap().to_owned();
    assert!(
        stderr(&o).contains(&format!("vfio-mig: send: session {session}")),
        "{}",
        stderr(&o)
    );
    let (status, out, err) = recv.wait();
    assert!(status.success(), "{err}");
    let got: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(got["outcome"], "resumed");
    assert_eq!(got["session"], session.as_str());
    assert!(
        got["source_identity"]
            .as_str()
            .unwrap()
            .contains("dns:src.example"),
        "{got}"
    );
}

#[test]
fn plain_tcp_needs_insecure_and_tls_options_come_together() {
    let dirs = Dirs::new();
    let o = dirs.run(&["recv", "mock:v1,size=1M", "--listen", "tcp:127.0.0.1:0"]);
    assert_clean_failure(o.status, &stderr(&o), "--insecure");
    let o = dirs.run(&["send", "mock:v1,size=1M", "--to", "tcp:127.0.0.1:9"]);
    assert_clean_failure(o.status, &stderr(&o), "--insecure");
    // TLS over a unix socket is a usage error; so is a certificate without its key.
    let pki = Pki::new(dirs.tmp.path());
    let mut args = vec![
        "recv".to_owned(),
        "mock:v1,size=1M".into(),
        "--listen".into(),
    ];
    args.push(format!("unix:{}", dirs.path("s").display()));
    args.extend(pki.dst.args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = dirs.run(&args);
    assert_clean_failure(o.status, &stderr(&o), "a unix: socket is local");
    let o = dirs.run(&[
        "send",
        "mock:v1,size=1M",
        "--to",
        "tcp:127.0.0.1:9",
        "--tls-cert",
        pki.src.cert.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--tls-key"), "{}", stderr(&o));
    // recv over TLS without a policy: nobody would be allowed, so it does not start.
    let mut args = vec![
        "recv".to_owned(),
        "mock:v1,size=1M".into(),
        "--listen".into(),
        "tcp:127.0.0.1:0".into(),
    ];
    args.extend(pki.dst.args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = dirs.run(&args);
    assert_clean_failure(
        o.status,
        &stderr(&o),
        "--authorize FILE or --allow IDENTITY",
    );
}

/// A raw client replays a saved file into a waiting TLS `recv`: it is not a TLS peer, so it
/// is told so and cut off; the device is not touched and `recv --once` keeps waiting for
/// a real session, which then succeeds.
#[test]
fn a_raw_client_replaying_a_saved_file_is_refused() {
    let dirs = Dirs::new();
    let pki = Pki::new(dirs.tmp.path());
    let dev = "mock:v1,size=1M,seed=22";
    let file = saved(&dirs, dev, "state");
    let mut recv = tls_recv(&dirs, &pki, dev, &["--once"]);
    let mut raw = TcpStream::connect(tcp_port(&recv.addr)).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = raw.write_all(&hello());
    let _ = raw.write_all(&file);
    let mut answer = Vec::new();
    let _ = raw.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.contains("accepts TLS 1.3 connections only"),
        "{answer}"
    );
    let line = recv.wait_line("ignored");
    assert!(line.contains("does not speak TLS"), "{line}");
    assert!(
        recv.running(),
        "recv --once ended on a connection that was no session"
    );
    let o = tls_send(&dirs, &pki.src, dev, &recv.addr, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (status, _, err) = recv.wait();
    assert!(status.success(), "{err}");
    assert!(err.contains("device running"), "{err}");
}

#[test]
fn a_certificate_from_another_ca_is_refused_and_recv_keeps_waiting() {
    let dirs = Dirs::new();
    let pki = Pki::new(dirs.tmp.path());
    let dev = "mock:v1,size=1M,seed=23";
    let mut recv = tls_recv(&dirs, &pki, dev, &["--once"]);
    let o = tls_send(&dirs, &pki.rogue, dev, &recv.addr, &[]);
    let line = assert_clean_failure(o.status, &stderr(&o), "refused our client certificate");
    assert!(line.contains("connect to"), "{line}");
    recv.wait_line("ignored");
    assert!(recv.running());
    // A source that trusts another CA refuses the destination.
    let mut args: Vec<String> = vec!["send".into(), dev.into(), "--to".into(), recv.addr.clone()];
    args.extend([
        "--tls-cert".into(),
        pki.src.cert.display().to_string(),
        "--tls-key".into(),
        pki.src.key.display().to_string(),
        "--tls-ca".into(),
        dirs.tmp.path().join("rogue-ca.pem").display().to_string(),
        "--tls-server-name".into(),
        "dst.example".into(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = dirs.run(&args);
    assert_clean_failure(o.status, &stderr(&o), "connect to");
    assert!(recv.running());
}

#[test]
fn an_identity_the_policy_does_not_name_is_refused_before_the_device_is_touched() {
    let dirs = Dirs::new();
    let pki = Pki::new(dirs.tmp.path());
    let dst = "mock:v1,size=1M,seed=24,id=guarded";
    let mut recv = tls_recv(&dirs, &pki, dst, &["--once"]);
    let o = tls_send(
        &dirs,
        &pki.other,
        "mock:v1,size=1M,seed=24",
        &recv.addr,
        &[],
    );
    let line = assert_clean_failure(o.status, &stderr(&o), "not authorized to load into device");
    assert!(line.contains("dns:other.example"), "{line}");
    assert!(line.contains("mock:guarded"), "{line}");
    recv.wait_line("refused");
    assert!(recv.running());
    let o = tls_send(&dirs, &pki.src, "mock:v1,size=1M,seed=24", &recv.addr, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(recv.wait().0.success());
}

/// A man in the middle flips one byte of the source's traffic, past the handshake: TLS
/// detects it; the destination is reset and the source rolled back to RUNNING.
#[test]
fn a_man_in_the_middle_rewriting_bytes_fails_cleanly() {
    let dirs = Dirs::new();
    let pki = Pki::new(dirs.tmp.path());
    let dev = "mock:v1,size=8M,seed=25";
    let recv = tls_recv(&dirs, &pki, dev, &["--once"]);
    let upstream = tcp_port(&recv.addr);
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_addr = format!("tcp:{}", proxy.local_addr().unwrap());
    std::thread::spawn(move || {
        let (client, _) = proxy.accept().unwrap();
        let server = TcpStream::connect(upstream).unwrap();
        let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        std::thread::spawn(move || {
            let mut buf = [0u8; 16384];
            let mut total = 0usize;
            while let Ok(n) = c_in.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let at = 1_000_000usize;
                if total <= at && at < total + n {
                    buf[at - total] ^= 0x40;
                }
                total += n;
                if s_out.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = s_out.shutdown(std::net::Shutdown::Write);
        });
        let (mut s_in, mut c_out) = (server, client);
        let _ = std::io::copy(&mut s_in, &mut c_out);
        let _ = c_out.shutdown(std::net::Shutdown::Write);
    });
    let o = tls_send(&dirs, &pki.src, dev, &proxy_addr, &[]);
    let line = assert_clean_failure(o.status, &stderr(&o), "returned to RUNNING");
    assert!(line.contains(dev), "{line}");
    let (status, _, err) = recv.wait();
    let line = assert_clean_failure(status, &err, "was reset");
    assert!(
        line.to_lowercase().contains("decrypt") || line.contains("TLS"),
        "{line}"
    );
}

/// A header with epoch 2^64-1, then a close: refused (the epoch is implausible) and, even if
/// it were not, nothing is recorded for a session that did not complete; the next real
/// handoff with an ordinary epoch goes through.
#[test]
fn a_forged_epoch_cannot_fence_out_later_handoffs() {
    let dirs = Dirs::new();
    let dst = "mock:v1,size=1M,seed=26,id=fence-target";
    let sock = dirs.path("s");
    let listen = format!("unix:{}", sock.display());
    let recv = Recv::start(&dirs, &[], &[dst, "--listen", &listen]);
    for epoch in [u64::MAX, 1u64 << 62] {
        let mut raw = UnixStream::connect(&sock).unwrap();
        raw.write_all(&hello()).unwrap();
        raw.write_all(&header_bytes(9, epoch)).unwrap();
        let mut answer = [0u8; 64];
        let _ = raw.read(&mut answer);
        drop(raw);
    }
    let o = dirs.run(&["send", "mock:v1,size=1M,seed=26", "--to", &listen]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (status, _, err) = recv.wait();
    assert!(status.success(), "{err}");
    assert!(err.contains("is more than"), "{err}");
    // Admitted but abandoned sessions recorded nothing: a later, lower epoch still passes.
    let state = std::fs::read_dir(dirs.path("state"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let text = std::fs::read_to_string(state.path()).unwrap();
    assert!(!text.contains(&u64::MAX.to_string()), "{text}");
}

/// A connection that opens and closes (a liveness probe, a port scan) is logged and ignored:
/// `recv --once` ends only after a session.
#[test]
fn connect_and_close_does_not_end_recv_once() {
    let dirs = Dirs::new();
    let dev = "mock:v1,size=1M,seed=27";
    let sock = dirs.path("s");
    let listen = format!("unix:{}", sock.display());
    let mut recv = Recv::start(&dirs, &[], &[dev, "--listen", &listen, "--once", "-v"]);
    drop(UnixStream::connect(&sock).unwrap());
    recv.wait_line("connected and closed without a session");
    assert!(recv.running());
    let o = dirs.run(&["send", dev, "--to", &listen]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (status, _, err) = recv.wait();
    assert!(status.success(), "{err}");
}

/// A client that sends a byte every 200 ms, each well within the idle timeout, is cut off
/// by the deadline of the whole handshake; a real source is served meanwhile and after.
#[test]
fn a_trickling_client_cannot_hold_the_listener() {
    let dirs = Dirs::new();
    let dev = "mock:v1,size=1M,seed=28";
    let sock = dirs.path("s");
    let listen = format!("unix:{}", sock.display());
    let recv = Recv::start(
        &dirs,
        &[],
        &[
            dev,
            "--listen",
            &listen,
            "--once",
            "--handshake-timeout",
            "1",
        ],
    );
    let mut slow = UnixStream::connect(&sock).unwrap();
    let bytes = hello();
    let started = Instant::now();
    let mut cut = false;
    for b in bytes.iter().cycle().take(100) {
        if slow.write_all(&[*b]).is_err() {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(cut, "the trickling client was never cut off");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let o = dirs.run(&["send", dev, "--to", &listen]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (status, _, err) = recv.wait();
    assert!(status.success(), "{err}");
    assert!(err.contains("handshake within"), "{err}");
}

/// While a session runs, another source is answered "busy" at once, and the running session
/// is not disturbed.
#[test]
fn a_second_source_during_a_session_is_told_busy() {
    let dirs = Dirs::new();
    let dev = "mock:v1,size=1M,seed=29";
    let sock = dirs.path("s");
    let listen = format!("unix:{}", sock.display());
    let mut recv = Recv::start(&dirs, &[], &[dev, "--listen", &listen]);
    // The first "source" opens a session (HELLO, header, ACCEPT) and then holds it.
    let mut first = UnixStream::connect(&sock).unwrap();
    first.write_all(&hello()).unwrap();
    first.write_all(&header_bytes(1, 5)).unwrap();
    let mut accept = [0u8; 20];
    first.read_exact(&mut accept[..1]).unwrap();
    recv.wait_line("vfio-mig: recv: session 01010101");
    let o = dirs.run(&["send", dev, "--to", &listen]);
    assert_clean_failure(o.status, &stderr(&o), "serving another session");
    assert!(recv.running());
    // The first session is still open: it ends only when its source goes away.
    drop(first);
    recv.wait_line("waiting for a retry");
    let o = dirs.run(&["send", dev, "--to", &listen]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (status, _, err) = recv.wait();
    assert!(status.success(), "{err}");
}

fn key_file(dirs: &Dirs, name: &str, byte: u8) -> String {
    let p = dirs.path(name);
    std::fs::write(&p, [byte; 32]).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p.display().to_string()
}

#[test]
fn keyed_files_refuse_forgeries_and_records_are_bound_to_their_stream() {
    let dirs = Dirs::new();
    let dev = "mock:v1,size=1M,seed=30";
    let key = key_file(&dirs, "key", 1);
    let other = key_file(&dirs, "other", 2);
    let f = dirs.path("f");
    let fs = f.to_str().unwrap();
    let o = dirs.run(&["save", dev, "-o", fs, "--key-file", &key]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = dirs.run(&["inspect", fs, "--key-file", &key]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("verified with the key"));
    // Another key, or no key at load: refused.
    let o = dirs.run(&["inspect", fs, "--key-file", &other]);
    assert_clean_failure(o.status, &stderr(&o), "authentication failed");
    let o = dirs.run(&["load", dev, "-i", fs]);
    assert_clean_failure(o.status, &stderr(&o), "give its --key-file");
    // An unauthenticated forgery with the key: refused.
    let plain = dirs.path("plain");
    let o = dirs.run(&["save", dev, "-o", plain.to_str().unwrap()]);
    assert!(o.status.success());
    let o = dirs.run(&[
        "load",
        dev,
        "-i",
        plain.to_str().unwrap(),
        "--key-file",
        &key,
    ]);
    assert_clean_failure(o.status, &stderr(&o), "not authenticated");
    // A record of another stream (same layout, another session) spliced in: refused
    // without any key.
    let a = std::fs::read(&plain).unwrap();
    let b = saved(&dirs, dev, "b");
    assert_eq!(a.len(), b.len());
    let mut spliced = a.clone();
    let first_record = 63..63 + 24 + 64;
    spliced[first_record.clone()].copy_from_slice(&b[first_record]);
    let s = dirs.path("spliced");
    std::fs::write(&s, &spliced).unwrap();
    let o = dirs.run(&["inspect", s.to_str().unwrap()]);
    assert_clean_failure(o.status, &stderr(&o), "CRC mismatch");
    // A key file others can read is refused.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = dirs.run(&["inspect", fs, "--key-file", &key]);
    assert_clean_failure(o.status, &stderr(&o), "chmod 600");
}

#[test]
fn outputs_that_are_not_regular_files_are_refused_before_the_device_is_touched() {
    let dirs = Dirs::new();
    let dev = "mock:v1,size=1M,seed=31";
    let target = dirs.path("target");
    std::fs::write(&target, b"precious").unwrap();
    let link = dirs.path("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let o = dirs.run(&["save", dev, "-o", link.to_str().unwrap()]);
    assert_clean_failure(o.status, &stderr(&o), "is a symbolic link");
    assert_eq!(std::fs::read(&target).unwrap(), b"precious");
    let dir = dirs.path("dir");
    std::fs::create_dir(&dir).unwrap();
    let o = dirs.run(&["save", dev, "-o", dir.to_str().unwrap()]);
    assert_clean_failure(o.status, &stderr(&o), "not a regular file");
    let o = dirs.run(&["save", dev, "-o", "/dev/null"]);
    assert_clean_failure(o.status, &stderr(&o), "not a regular file");
    // Nothing partial is left behind.
    let names: Vec<_> = std::fs::read_dir(dirs.tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(names.is_empty(), "{names:?}");
    // `-o -` streams to standard output.
    let o = dirs.run(&["save", dev, "-o", "-"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let f = dirs.path("from-stdout");
    std::fs::write(&f, &o.stdout).unwrap();
    let o = dirs.run(&["load", dev, "-i", f.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn concurrent_saves_to_one_output_one_wins_the_other_rolls_back() {
    let dirs = Dirs::new();
    let out = dirs.path("out");
    let spawn = |seed: u32| {
        dirs.cmd(&[])
            .args([
                "save",
                &format!("mock:v1,size=16M,seed={seed}"),
                "-o",
                out.to_str().unwrap(),
            ])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(41), spawn(42));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    // Exactly one wins; the other says why and its device runs again (or was never
    // touched, when the winner's file existed before it started).
    let (winner, loser) = match (a.status.success(), b.status.success()) {
        (true, false) => (41, &b),
        (false, true) => (42, &a),
        _ => panic!("one save must win: {} / {}", stderr(&a), stderr(&b)),
    };
    let line = assert_clean_failure(loser.status, &stderr(loser), "out");
    assert!(
        line.contains("appeared") || line.contains("exists"),
        "{line}"
    );
    let o = dirs.run(&[
        "load",
        &format!("mock:v1,size=16M,seed={winner}"),
        "-i",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn files_are_private_whatever_the_umask() {
    let dirs = Dirs::new();
    let out = dirs.path("out");
    let script = format!(
        "umask 000; exec {BIN} save mock:v1,size=1M,id=umask -o {}",
        out.display()
    );
    let o = dirs.cmd(&["sh"]).args(["-c", &script]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&out), 0o600);
    assert_eq!(mode(&dirs.path("lock")), 0o700);
    let lock = std::fs::read_dir(dirs.path("lock"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(mode(&lock.path()), 0o600);
    // The fencing state of a destination.
    let script = format!(
        "umask 000; exec {BIN} load mock:v1,size=1M,id=umask2 -i {}",
        out.display()
    );
    let o = dirs.cmd(&["sh"]).args(["-c", &script]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(mode(&dirs.path("state")), 0o700);
    let state = std::fs::read_dir(dirs.path("state"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(mode(&state.path()), 0o600);
}

/// SIGTERM in the middle of a live send: the source is returned to RUNNING, the destination
/// reset, one line each, exit status 143; the unix socket file is removed.
#[test]
fn sigterm_during_a_session_rolls_back_both_sides() {
    let dirs = Dirs::new();
    let sock = dirs.path("s");
    let listen = format!("unix:{}", sock.display());
    let dev = "mock:v1,size=64M,seed=32,dirty-rate=64M";
    let recv = Recv::start(&dirs, &[], &[dev, "--listen", &listen, "--once"]);
    let mut send = dirs
        .cmd(&[])
        .args([
            "send",
            dev,
            "--to",
            &listen,
            "--live",
            "--max-rounds",
            "1000",
            // A budget no round can meet, so pre-copy is still running when the signal comes
            // (a device that converges in one round would finish first and race the signal).
            "--downtime-ms",
            "0",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    recv.wait_line("vfio-mig: recv: session");
    // Mid-stream: the source has sent whole pre-copy rounds and is in the next.
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(send.stderr.take().unwrap()));
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let mid = line.contains("pre-copy round 2:");
        seen.push(line);
        if mid {
            break;
        }
    }
    kill(send.id(), libc::SIGTERM);
    seen.extend(lines.map_while(Result::ok));
    let status = send.wait().unwrap();
    let err = seen.join("\n");
    assert_eq!(status.code(), Some(143), "{err}");
    let line = assert_clean_failure(status, &err, "interrupted by SIGTERM");
    assert!(line.contains("returned to RUNNING"), "{line}");
    let (status, _, err) = recv.wait();
    let line = assert_clean_failure(status, &err, "was reset");
    assert!(!line.contains("panicked"), "{line}");
    assert!(!sock.exists());
}

#[test]
fn signals_end_a_waiting_recv_with_their_status_and_remove_the_socket() {
    for (signal, code) in [
        (libc::SIGINT, 130),
        (libc::SIGHUP, 129),
        (libc::SIGTERM, 143),
    ] {
        let dirs = Dirs::new();
        let sock = dirs.path("s");
        let listen = format!("unix:{}", sock.display());
        let recv = Recv::start(&dirs, &[], &["mock:v1,size=1M", "--listen", &listen]);
        assert!(sock.exists());
        kill(recv.child.id(), signal);
        let (status, _, err) = recv.wait();
        assert_eq!(status.code(), Some(code), "{err}");
        assert_clean_failure(status, &err, "interrupted by SIG");
        assert!(!sock.exists(), "socket left after signal {signal}");
    }
}

#[test]
fn bad_durations_and_closed_pipes_are_clean_errors() {
    let dirs = Dirs::new();
    for args in [
        vec![
            "save",
            "mock:v1,size=1M",
            "-o",
            "x",
            "--max-precopy-secs",
            "inf",
        ],
        vec![
            "send",
            "mock:v1,size=1M",
            "--to",
            "unix:/x",
            "--connect-timeout",
            "nan",
        ],
        vec![
            "recv",
            "mock:v1,size=1M",
            "--listen",
            "unix:/x",
            "--timeout",
            "nan",
        ],
        vec![
            "recv",
            "mock:v1,size=1M",
            "--listen",
            "unix:/x",
            "--timeout=-1",
        ],
    ] {
        let o = dirs.run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
        assert!(
            stderr(&o).contains("finite number of seconds"),
            "{}",
            stderr(&o)
        );
    }
    // `probe | true`: the reader is gone before probe writes.
    let mut child = dirs
        .cmd(&[])
        .args(["probe", "mock:v1,size=1M"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    assert!(o.status.success(), "{}", stderr(&o));
}

/// A size whose bookkeeping cannot be allocated under the address-space limit is one error
/// line, not an abort; a failed migrate prints one line, not a progress line and an error.
#[test]
fn a_huge_mock_and_a_failed_migrate_are_one_line_each() {
    let dirs = Dirs::new();
    let script = format!("ulimit -v 4000000; exec {BIN} save mock:v1,size=15T -o -");
    let o = dirs.cmd(&["sh"]).args(["-c", &script]).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_clean_failure(o.status, &stderr(&o), "cannot be allocated");
    let o = dirs.run(&[
        "migrate",
        "mock:v1,size=1M,seed=1",
        "mock:v1,size=1M,seed=2",
    ]);
    let line = assert_clean_failure(o.status, &stderr(&o), "was reset");
    assert!(line.contains("returned to RUNNING"), "{line}");
    assert_eq!(
        stderr(&o)
            .lines()
            .filter(|l| l.contains("rolled back"))
            .count(),
        0,
        "{}",
        stderr(&o)
    );
}

/// recv's warning after a failed session names the port it is bound to, not `:0`.
#[test]
fn the_retry_warning_names_the_bound_port() {
    let dirs = Dirs::new();
    let mut recv = Recv::start(
        &dirs,
        &[],
        &[
            "mock:v1,size=1M,seed=2",
            "--listen",
            "tcp:127.0.0.1:0",
            "--insecure",
        ],
    );
    assert!(!recv.addr.ends_with(":0"), "{}", recv.addr);
    let o = dirs.run(&[
        "send",
        "mock:v1,size=1M,seed=1",
        "--to",
        &recv.addr,
        "--insecure",
    ]);
    assert!(!o.status.success());
    let line = recv.wait_line("waiting for a retry");
    assert!(
        line.ends_with(&format!("waiting for a retry on {}", recv.addr)),
        "{line}"
    );
    assert!(recv.running());
}

#[test]
fn a_device_given_twice_is_a_usage_error() {
    let dirs = Dirs::new();
    let dev = "mock:v1,size=1M,id=twice";
    let listen = format!("unix:{}", dirs.path("s").display());
    for args in [
        vec!["send", dev, dev, "--to", &listen],
        vec!["recv", dev, dev, "--listen", &listen],
    ] {
        let o = dirs.run(&args);
        let line = assert_clean_failure(o.status, &stderr(&o), "is given twice");
        assert!(!line.contains("in use by another"), "{line}");
    }
}

#[test]
fn recover_reports_the_state_and_leaves_a_running_device_alone() {
    let dirs = Dirs::new();
    let o = dirs.run(&["recover", "mock:v2,size=1M", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["action"], "none");
    assert!(
        v["state_before"].as_str().unwrap().contains("RUNNING"),
        "{v}"
    );
}
