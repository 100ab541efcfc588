// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! SIGTERM in the middle of a session, on real mtty devices (which keep their migration state
//! across close): the source is back in RUNNING, the destination reset, exit status 143.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};

use vfio_mig::handshake::{read_message, write_message, Message};
use vfio_mig::stream::{Record, StreamReader};
use vfio_mig::v2::MigState;

use super::migration::{ensure_running, mig_state, ok, pair, path_str, vfio_mig, write_state};
use super::mtty::vfio_mig_bin;

fn sigterm(pid: u32) {
    // SAFETY: kill(2) on a child this test started; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
}

fn one_error_line(err: &str, expect: &str) {
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("error:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains(expect), "expected {expect:?} in {err}");
}

/// The source: a destination that accepts, reads the whole stream and then never answers
/// LOADED, so `send` waits with its device stopped (STOP_COPY done); SIGTERM then.
#[test]
fn sigterm_during_send_leaves_the_mtty_source_running() {
    let (a, _) = pair(0, 1);
    ensure_running(&a);
    write_state(&a, 0x31);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("fake-destination");
    let listener = UnixListener::bind(&sock).unwrap();
    let send = Command::new(vfio_mig_bin())
        .args([
            "send",
            path_str(&a),
            "--to",
            &format!("unix:{}", sock.display()),
        ])
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
    let session = header.session_id;
    write_message(&mut tx, &Message::Accept { session }, "fake destination").unwrap();
    while !matches!(reader.next_record().unwrap(), Record::End(_)) {}
    // The source sent its trailer: its device is stopped and it waits for LOADED.
    sigterm(send.id());
    let out = send.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{err}");
    one_error_line(&err, "interrupted by SIGTERM");
    assert!(err.contains("returned to RUNNING"), "{err}");
    assert_eq!(mig_state(&a), MigState::Running);
}

/// The destination: a source that opens a session and sends all records but the trailer,
/// then waits; SIGTERM to `recv` resets the device (it never runs partial state).
#[test]
fn sigterm_during_recv_resets_the_mtty_destination() {
    let (a, b) = pair(2, 3);
    ensure_running(&a);
    ensure_running(&b);
    write_state(&a, 0x42);
    let file = tempfile::NamedTempFile::new().unwrap();
    ok(&vfio_mig(&[
        "save",
        path_str(&a),
        "-o",
        path_str(file.path()),
        // The temporary file exists already.
        "--force",
    ]));
    ensure_running(&a);
    let stream = std::fs::read(file.path()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let listen = format!("unix:{}", sock.display());
    let mut recv = Command::new(vfio_mig_bin())
        .args(["recv", path_str(&b), "--listen", &listen, "--once"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // recv prints "listening on" once the socket exists.
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
    let trailer = 24 + 8 + 24;
    tx.write_all(&stream[..stream.len() - trailer]).unwrap();
    match read_message(&mut rx, "fake source: ACCEPT").unwrap() {
        Message::Accept { .. } => {}
        other => panic!("{other}"),
    }
    sigterm(recv.id());
    seen.extend(lines.map_while(Result::ok));
    let status = recv.wait().unwrap();
    let err = seen.join("\n");
    assert_eq!(status.code(), Some(143), "{err}");
    one_error_line(&err, "interrupted by SIGTERM");
    assert!(err.contains("was reset"), "{err}");
    assert_eq!(mig_state(&b), MigState::Running);
    assert!(!sock.exists());
}
