// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A `recv` that serves until one migration completes, on an igb VF: a first session whose
//! blob the device refuses leaves igb-vfio-pci in RESUMING, which VFIO_DEVICE_RESET does not
//! undo (the driver has no reset handler; only its open starts in RUNNING). The retry that
//! follows must still load: recv has to bring the VF back by reopening it.

use std::io::Write;
use std::os::unix::net::UnixStream;

use vfio_mig_session::handshake::{read_message, Message};
use vfio_mig_tests::cli::{sigterm, Recv};
use vfio_mig_tests::rewrite_stream;

use super::migration::loaded_lines;
use super::vf::{a0_b0, ok, read_rings, s, vfio_mig, vfio_mig_bin, write_rings};

#[test]
fn recv_takes_a_retry_after_the_device_refused_a_blob() {
    let (a, b) = a0_b0();
    let rings = write_rings(&a, 0x1f2e);
    write_rings(&b, 0x3d4c);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a.mig");
    ok(&vfio_mig(&["save", s(&a), "-o", s(&file)]));
    let good = std::fs::read(&file).unwrap();
    // The blob's magic broken, the stream's checksums intact: only the device can tell.
    let bad = rewrite_stream(&good, None, |d| d[0] ^= 0xff);
    let loads = loaded_lines(&b);
    let sock = dir.path().join("s");
    let listen = format!("unix:{}", sock.display());
    let mut recv = Recv::start(&vfio_mig_bin(), s(&b), &listen, &[]);
    // First session: a source that sends the bad stream and reads the answers until recv
    // closes the connection.
    {
        let conn = UnixStream::connect(&sock).unwrap();
        let mut tx = conn.try_clone().unwrap();
        let mut rx = conn;
        // Never wait forever on a destination that keeps the connection open.
        rx.set_read_timeout(Some(std::time::Duration::from_secs(60)))
            .unwrap();
        tx.write_all(&Message::Hello { features: 0 }.encode())
            .unwrap();
        tx.write_all(&bad).unwrap();
        let mut answers = Vec::new();
        while let Ok(m) = read_message(&mut rx, "fake source") {
            answers.push(m.to_string());
        }
        eprintln!("answers to the bad stream: {answers:?}");
        assert!(
            !answers.iter().any(|m| m.contains("RESUMED")),
            "the destination resumed a blob its device refused: {answers:?}"
        );
    }
    // The retry wait is announced on stderr.
    recv.wait_for("waiting for a retry");
    // Second session: the real source with the good state.
    let send = vfio_mig(&["send", s(&a), "--to", &listen]);
    if !send.status.success() {
        // recv would wait for yet another retry: end it before failing.
        sigterm(recv.child.id());
    }
    let (code, err) = recv.finish();
    eprintln!("recv:\n{err}");
    ok(&send);
    assert_eq!(code, Some(0), "recv: {err}");
    assert_eq!(loaded_lines(&b), loads + 1, "one load, the retry's");
    assert_eq!(read_rings(&b), rings);
}
