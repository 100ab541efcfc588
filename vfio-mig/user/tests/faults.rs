// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Bad input from a vfio-user server: the project's own server (tests/common/rust_server.rs)
//! answers message N of a migration with an error, hangs up at it, or sends a malformed
//! reply, for every N a clean migration exchanges, on the source's side and on the
//! destination's. Each run must end in a one-line error naming a step (or in success when
//! the fault hit nothing the migration needs), without a panic, with the source's server back
//! in RUNNING or the error saying what became of it, and the destination never holding or
//! running a partial state.

mod common;

use common::rust_server::{Fault, RustServer, BAR1_LEN};
use vfio_mig::error::Report;
use vfio_mig::{NoObserver, SaveOptions};
use vfio_mig_session::handshake::migrate_local;
use vfio_mig_user::ConnectOptions;

const RUNNING: u32 = 2;

fn pattern() -> Vec<u8> {
    (0..BAR1_LEN).map(|i| (i * 7 % 251) as u8 + 1).collect()
}

/// Opens both and migrates; the error as the command line prints it.
fn migrate(src: &RustServer, dst: &RustServer, live: bool) -> Result<(), String> {
    let opts = ConnectOptions::default();
    let mut s = vfio_mig_user::open(&src.name(), &opts).map_err(|e| Report(&e).to_string())?;
    let mut d = vfio_mig_user::open(&dst.name(), &opts).map_err(|e| Report(&e).to_string())?;
    let save = SaveOptions {
        live,
        ..SaveOptions::default()
    };
    migrate_local(
        &mut *s.device,
        &mut *d.device,
        &save,
        &NoObserver,
        &NoObserver,
    )
    .map(drop)
    .map_err(|e| Report(&e).to_string())
}

/// Messages a clean migration sends to each side.
fn clean_counts(live: bool) -> (u32, u32) {
    let (src, dst) = (RustServer::start(None), RustServer::start(None));
    src.set_bar1(&pattern());
    migrate(&src, &dst, live).unwrap();
    assert_eq!(dst.bar1(), pattern());
    assert_eq!(dst.state(), RUNNING);
    let n = |s: &RustServer| s.device.lock().unwrap().messages;
    (n(&src), n(&dst))
}

fn check(fault: Fault, live: bool) {
    let (src_n, dst_n) = clean_counts(live);
    assert!(src_n > 10 && dst_n > 10, "{src_n} {dst_n}");
    for on_source in [true, false] {
        for nth in 1..=if on_source { src_n } else { dst_n } {
            let at = Some((nth, fault));
            let (src, dst) = if on_source {
                (RustServer::start(at), RustServer::start(None))
            } else {
                (RustServer::start(None), RustServer::start(at))
            };
            src.set_bar1(&pattern());
            let context = format!(
                "{fault:?} at message {nth} of the {}",
                if on_source { "source" } else { "destination" }
            );
            let result = migrate(&src, &dst, live);
            let dst_bar = dst.bar1();
            // Never a partial state: the destination holds its own state or the whole source's.
            assert!(
                dst_bar == vec![0; BAR1_LEN] || dst_bar == pattern(),
                "{context}: partial state"
            );
            match result {
                Ok(()) => {
                    assert_eq!(dst_bar, pattern(), "{context}");
                    assert_eq!(dst.state(), RUNNING, "{context}");
                }
                Err(e) => {
                    assert!(!e.contains('\n') && e.contains(": "), "{context}: {e}");
                    // The destination never runs what it did not fully receive.
                    if dst.state() == RUNNING {
                        assert!(
                            dst_bar == vec![0; BAR1_LEN] || e.contains("reset"),
                            "{context}: {e}"
                        );
                    }
                    // The source runs again, or the error says it could not be made to.
                    assert!(
                        src.state() == RUNNING
                            || e.contains("could not be recovered")
                            || e.contains("returning it to RUNNING failed"),
                        "{context}: source in state {}: {e}",
                        src.state()
                    );
                }
            }
        }
    }
}

#[test]
fn an_error_reply_at_each_message() {
    check(Fault::Error(libc::EIO as u32), false);
}

#[test]
fn an_error_reply_at_each_message_live() {
    check(Fault::Error(libc::EIO as u32), true);
}

#[test]
fn a_hang_up_at_each_message() {
    check(Fault::HangUp, false);
}

#[test]
fn an_oversized_reply_at_each_message() {
    check(Fault::Oversized, false);
}

#[test]
fn a_truncated_reply_at_each_message() {
    check(Fault::Truncated, false);
}

#[test]
fn a_reply_to_another_message_at_each_message() {
    check(Fault::WrongId, false);
}

#[test]
fn a_short_payload_at_each_message() {
    check(Fault::ShortPayload, false);
}

#[test]
fn malformed_replies_are_named() {
    for (fault, want) in [
        (
            Fault::Oversized,
            "oversized reply: 1073741824 payload bytes",
        ),
        (Fault::Truncated, "hung up after 10 of 64 payload bytes"),
        (Fault::WrongId, "the server answered message 7"),
        (Fault::HangUp, "hung up after 0 of 16 header bytes"),
        (Fault::ShortPayload, "VFIO_USER_VERSION: truncated reply"),
        (Fault::Error(libc::EPERM as u32), "Operation not permitted"),
    ] {
        let server = RustServer::start(Some((1, fault)));
        let e = vfio_mig_user::open(&server.name(), &ConnectOptions::default()).unwrap_err();
        let text = Report(&e).to_string();
        assert!(text.contains("negotiate the version"), "{fault:?}: {text}");
        assert!(text.contains(want), "{fault:?}: {text}");
    }
}

/// The bitmap of a DMA logging report is decoded after the report's fixed fields, one
/// little-endian `u64` per 64 pages, and ORed into the caller's words.
#[test]
fn a_dma_logging_report_is_decoded_word_by_word() {
    use vfio_mig::backend::DeviceIo;
    use vfio_mig::backend::DmaLoggingRange;
    let server = RustServer::start(None);
    let dev =
        vfio_mig_user::VfioUserDevice::connect(&server.sock, &ConnectOptions::default()).unwrap();
    let range = DmaLoggingRange {
        iova: 0,
        length: 128 * 4096,
    };
    assert_eq!(dev.dma_logging_start(&[range], 4096).unwrap(), 4096);
    let mut bitmap = [0u64, 0, 0x8000];
    dev.dma_logging_report(0, 128 * 4096, 4096, &mut bitmap)
        .unwrap();
    assert_eq!(bitmap, [1, 2, 0x8000]);
    let mut short = [0u64; 1];
    let e = dev
        .dma_logging_report(0, 128 * 4096, 4096, &mut short)
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
    dev.dma_logging_stop().unwrap();
}

/// A command from the server (a DMA request) while a reply is awaited: the client answers it
/// with an error reply (EOPNOTSUPP: it maps no DMA), then takes its own reply.
#[test]
fn a_server_command_is_refused_and_the_reply_still_taken() {
    let server = RustServer::start(Some((2, Fault::CommandFirst)));
    let dev = vfio_mig_user::open(&server.name(), &ConnectOptions::default()).unwrap();
    assert_eq!(
        dev.io.identity().model,
        "vfio-user:pci:1234:5678",
        "the device opened past the interleaved command"
    );
    let answer = server.device.lock().unwrap().client_answer.unwrap();
    // msg_id 0x4242, cmd 11 (DMA_READ), 16 bytes, REPLY | ERROR, EOPNOTSUPP.
    let mut want = Vec::new();
    want.extend_from_slice(&0x4242u16.to_le_bytes());
    want.extend_from_slice(&11u16.to_le_bytes());
    want.extend_from_slice(&16u32.to_le_bytes());
    want.extend_from_slice(&0x21u32.to_le_bytes());
    want.extend_from_slice(&(libc::EOPNOTSUPP as u32).to_le_bytes());
    assert_eq!(&answer[..], &want[..]);
}
