// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! SIGTERM in the middle of a migration of an igb VF: the source goes back to RUNNING with its
//! state; the destination never loads (no RESUMING -> STOP) and says what became of it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};

use vfio_mig::handshake::{read_message, write_message, Message};
use vfio_mig::stream::{Record, StreamReader};

use super::migration::loaded_lines;
use super::vf::{a0_b0, ok, read_rings, s, vfio_mig, vfio_mig_bin, write_rings};

fn sigterm(pid: u32) {
    // SAFETY: kill(2) on a child this test started; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
}

fn one_error_line(err: &str, expect: &str) -> String {
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("error:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains(expect), "expected {expect:?} in {err}");
    lines[0].to_string()
}

/// A destination that reads the whole stream and never answers: `send` waits with its VF
/// saved (STOP_COPY done); SIGTERM brings the VF back to RUNNING.
#[test]
fn sigterm_during_send_returns_the_igb_source_to_running() {
    let (a, _) = a0_b0();
    let rings = write_rings(&a, 0x0a0b);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("fake-destination");
    let listener = UnixListener::bind(&sock).unwrap();
    let send = Command::new(vfio_mig_bin())
        .args(["send", s(&a), "--to", &format!("unix:{}", sock.display())])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (conn, _) = listener.accept().unwrap();
    let mut tx = conn.try_clone().unwrap();
    let mut rx = conn;
    match read_message(&mut rx, "fake destination: HELLO").unwrap() {
        Message::Hello { .. } => {}
        other => panic!("{other}"),
    }
    let (mut reader, header) = StreamReader::open(&mut rx).unwrap();
    write_message(
        &mut tx,
        &Message::Accept {
            session: header.session_id,
        },
        "fake destination",
    )
    .unwrap();
    while !matches!(reader.next_record().unwrap(), Record::End(_)) {}
    sigterm(send.id());
    let out = send.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{err}");
    let line = one_error_line(&err, "interrupted by SIGTERM");
    assert!(line.contains("returned to RUNNING"), "{line}");
    assert_eq!(read_rings(&a), rings);
}

/// A source that sends everything but the trailer, then waits: SIGTERM to `recv`. The blob
/// is in the driver's buffer, but the arc that loads it is never taken.
#[test]
fn sigterm_during_recv_leaves_the_igb_destination_unloaded() {
    let (a, b) = a0_b0();
    write_rings(&a, 0x0c0d);
    let own = write_rings(&b, 0x0e0f);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a.mig");
    ok(&vfio_mig(&["save", s(&a), "-o", s(&file)]));
    let stream = std::fs::read(&file).unwrap();
    let loads = loaded_lines(&b);
    let sock = dir.path().join("s");
    let listen = format!("unix:{}", sock.display());
    let mut recv = Command::new(vfio_mig_bin())
        .args(["recv", s(&b), "--listen", &listen, "--once"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(recv.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let listening = line.contains("listening on");
        seen.push(line);
        if listening {
            break;
        }
    }
    let conn = UnixStream::connect(&sock).unwrap();
    let mut tx = conn.try_clone().unwrap();
    let mut rx = conn;
    tx.write_all(&Message::Hello { features: 0 }.encode())
        .unwrap();
    // Everything but the trailer (its 24-byte header and 8 + 24 bytes of payload).
    tx.write_all(&stream[..stream.len() - (24 + 8 + 24)])
        .unwrap();
    match read_message(&mut rx, "fake source: ACCEPT").unwrap() {
        Message::Accept { .. } => {}
        other => panic!("{other}"),
    }
    sigterm(recv.id());
    seen.extend(lines.map_while(Result::ok));
    let status = recv.wait().unwrap();
    let err = seen.join("\n");
    assert_eq!(status.code(), Some(143), "{err}");
    let line = one_error_line(&err, "interrupted by SIGTERM");
    eprintln!("recv: {line}");
    assert_eq!(
        loaded_lines(&b),
        loads,
        "the destination loaded a stream without its trailer"
    );
    assert_eq!(read_rings(&b), own);
    assert!(!sock.exists());
}
