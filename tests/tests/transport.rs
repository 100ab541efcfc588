// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The session handshake over real sockets: a migration over unix and TCP, a connection
//! killed in each phase, dead peers that time out, refusals (identity, stale epoch) and a
//! replayed or in-doubt session. After every failure the source runs again and the
//! destination is reset, never running with partial state.

use std::io::Write;
use std::net::Shutdown;
use std::sync::Mutex;
use std::time::Duration;

use vfio_mig::backend::v1_state::V1State;
use vfio_mig::OpenedDevice;
use vfio_mig::{wire::Phase, wire::StreamHeader};
use vfio_mig::{Event, NoObserver, PreCopyPolicy, SaveOptions};
use vfio_mig_fence::DeviceKey;
use vfio_mig_fence::{FenceRecord, MemoryFence, StateFence};
use vfio_mig_session::handshake::{
    read_message, receive, send, Message, ReasonCode, RecvOutcome, SendOutcome,
};
use vfio_mig_session::transport::{connect, listen, Address, Connection, Duplex};
use vfio_mig_session::Error;
use vfio_mig_tests::session::{run_pair, KillSwitch};
use vfio_mig_tests::StatusExt;
use vfio_mig_tests::{assert_destination_safe, assert_source_running, handle, mock, MockDevice};

const SPEC: &str = "mock:v1,size=256K,seed=31,chunk=16K,page=4K";

fn opts(live: bool) -> SaveOptions {
    SaveOptions {
        live,
        policy: PreCopyPolicy {
            max_rounds: 3,
            ..Default::default()
        },
        buffer: 16 << 10,
        ..Default::default()
    }
}

fn header(src: &OpenedDevice, live: bool, epoch: u64) -> StreamHeader {
    StreamHeader::new(&[src.device.as_ref()], live, epoch).unwrap()
}

/// Checks a failed migration: one-line errors on both sides, the source running, the
/// destination reset.
fn assert_failed_cleanly(
    sent: &vfio_mig_session::Result<SendOutcome>,
    received: &vfio_mig_session::Result<RecvOutcome>,
    src: &MockDevice,
    dst: &MockDevice,
    context: &str,
) -> (String, String) {
    let se = match sent {
        Err(e) => vfio_mig::error::Report(&e).to_string(),
        Ok(o) => panic!("{context}: the source succeeded: {o:?}"),
    };
    let de = match received {
        Err(e) => vfio_mig::error::Report(&e).to_string(),
        Ok(o) => panic!("{context}: the destination succeeded: {o:?}"),
    };
    assert!(
        !se.contains('\n') && !de.contains('\n'),
        "{context}: {se} / {de}"
    );
    assert_source_running(&handle(src).status(), context);
    assert_destination_safe(&handle(dst).status(), context);
    (se, de)
}

#[test]
fn migration_over_unix_and_tcp_sockets() {
    let dir = tempfile::tempdir().unwrap();
    for addr in [
        Address::Unix(dir.path().join("sock")),
        "tcp:127.0.0.1:0".parse().unwrap(),
    ] {
        for live in [false, true] {
            let listener = listen(&addr).unwrap();
            let bound = listener.local_address().unwrap();
            let mut src = mock(SPEC);
            let mut dst = mock(SPEC);
            let h = header(&src, live, 1);
            let (sent, received) = std::thread::scope(|s| {
                let d = s.spawn(|| {
                    let mut conn = listener.accept().unwrap();
                    conn.set_timeout(Some(Duration::from_secs(10))).unwrap();
                    receive(
                        &mut [dst.device.as_mut()],
                        conn,
                        &mut MemoryFence::new(),
                        &NoObserver,
                    )
                });
                let mut conn = connect(&bound, Duration::from_secs(5)).unwrap();
                conn.set_timeout(Some(Duration::from_secs(10))).unwrap();
                let sent = send(
                    &mut [src.device.as_mut()],
                    conn,
                    &h,
                    &opts(live),
                    &NoObserver,
                );
                (sent, d.join().unwrap())
            });
            let SendOutcome::Completed(reports) = sent.unwrap() else {
                panic!("not completed")
            };
            assert_eq!(reports.len(), 1);
            assert_eq!(reports[0].switch_reason.is_some(), live, "{bound}");
            assert!(matches!(
                received.unwrap(),
                RecvOutcome::Resumed {
                    confirmed: true,
                    ..
                }
            ));
            assert!(handle(&dst).status().resumed_ok, "{bound}");
            assert_eq!(handle(&src).state_digest(), handle(&dst).state_digest());
            // The source took its STOP transition after RESUMED.
            assert_eq!(handle(&src).status().v1_state(), V1State::Stop);
        }
    }
}

/// An observer that shuts the connection down when `when` matches an event.
struct Killer<F: Fn(&Event) -> bool + Sync> {
    conn: Connection,
    when: F,
    fired: Mutex<bool>,
}

impl<F: Fn(&Event) -> bool + Sync> vfio_mig::Observer for Killer<F> {
    fn on_event(&self, event: &Event) {
        let mut fired = self.fired.lock().unwrap();
        if !*fired && (self.when)(event) {
            *fired = true;
            let _ = self.conn.shutdown(Shutdown::Both);
        }
    }
}

/// A live migration whose connection the source side kills at the first event `when`
/// matches.
fn kill_at_source_event(when: impl Fn(&Event) -> bool + Sync, context: &str) -> (String, String) {
    let mut src = mock(SPEC);
    let mut dst = mock(SPEC);
    let h = header(&src, true, 1);
    let (a, b) = Connection::pair().unwrap();
    let killer = Killer {
        conn: a.try_clone().unwrap(),
        when,
        fired: Mutex::new(false),
    };
    let (sent, received) = run_pair(
        &mut src,
        &mut dst,
        &h,
        &opts(true),
        &mut MemoryFence::new(),
        a,
        b,
        &killer,
        &NoObserver,
    );
    assert!(*killer.fired.lock().unwrap(), "{context}: never killed");
    assert_failed_cleanly(&sent, &received, &src, &dst, context)
}

/// A live migration whose destination connection dies at its `n`-th control message
/// (1 ACCEPT, 2 SWITCHOVER_ACK, 3 LOADED, 4 RESUMED).
fn kill_destination_write(
    n: u32,
    src: &mut OpenedDevice,
    dst: &mut OpenedDevice,
    h: &StreamHeader,
    fence: &mut dyn vfio_mig_fence::Fence,
) -> (
    vfio_mig_session::Result<SendOutcome>,
    vfio_mig_session::Result<RecvOutcome>,
) {
    let (a, b) = Connection::pair().unwrap();
    let b = KillSwitch::new(b, Some(n));
    let probe = b.try_clone().unwrap();
    let out = run_pair(
        src,
        dst,
        h,
        &opts(true),
        fence,
        a,
        b,
        &NoObserver,
        &NoObserver,
    );
    assert!(probe.killed(), "write {n} never happened");
    out
}

#[test]
fn connection_killed_in_pre_copy() {
    let (se, de) = kill_at_source_event(
        |e| matches!(e, Event::RoundDone { round: 1, .. }),
        "pre-copy",
    );
    assert!(se.contains("returned to RUNNING"), "{se}");
    assert!(de.contains("truncated") && de.contains("was reset"), "{de}");
}

#[test]
fn connection_killed_during_the_switchover_wait() {
    // The source side: killed right after pre-copy, before the acknowledgement arrives.
    let (se, de) = kill_at_source_event(
        |e| {
            matches!(
                e,
                Event::PhaseEnded {
                    phase: Phase::PreCopy,
                    ..
                }
            )
        },
        "switchover wait (source)",
    );
    assert!(se.contains("returned to RUNNING"), "{se}");
    assert!(de.contains("was reset"), "{de}");
    // The destination side: its SWITCHOVER_ACK never goes out.
    let mut src = mock(SPEC);
    let mut dst = mock(SPEC);
    let h = header(&src, true, 1);
    let (sent, received) =
        kill_destination_write(2, &mut src, &mut dst, &h, &mut MemoryFence::new());
    let (se, de) = assert_failed_cleanly(&sent, &received, &src, &dst, "switchover wait");
    assert!(se.contains("SWITCHOVER_ACK"), "{se}");
    assert!(de.contains("acknowledge the pre-copy data"), "{de}");
    // The source never stopped its device: it waited for the acknowledgement.
    assert_eq!(handle(&src).status().saves_completed, 0);
}

#[test]
fn connection_killed_in_stop_copy() {
    let (se, de) = kill_at_source_event(
        |e| {
            matches!(
                e,
                Event::PhaseStarted {
                    phase: Phase::StopCopy,
                    ..
                }
            )
        },
        "stop-copy",
    );
    // The device had stopped: it runs again.
    assert!(se.contains("returned to RUNNING"), "{se}");
    assert!(de.contains("was reset"), "{de}");
}

#[test]
fn connection_killed_before_resumed() {
    // After the stop-copy data, before the trailer.
    let (se, _) = kill_at_source_event(
        |e| {
            matches!(
                e,
                Event::PhaseEnded {
                    phase: Phase::StopCopy,
                    ..
                }
            )
        },
        "before the trailer",
    );
    assert!(se.contains("returned to RUNNING"), "{se}");
    // The destination loaded everything, but its LOADED never reaches the source: without
    // COMMIT it must not resume.
    let mut src = mock(SPEC);
    let mut dst = mock(SPEC);
    let h = header(&src, true, 1);
    let (sent, received) =
        kill_destination_write(3, &mut src, &mut dst, &h, &mut MemoryFence::new());
    let (se, de) = assert_failed_cleanly(&sent, &received, &src, &dst, "before COMMIT");
    assert!(se.contains("LOADED"), "{se}");
    assert!(
        de.contains("report the state loaded") && de.contains("was reset"),
        "{de}"
    );
}

#[test]
fn lost_resumed_is_in_doubt_and_a_retry_is_answered_idempotently() {
    let dir = tempfile::tempdir().unwrap();
    let key = DeviceKey::from_text("mock:doubt");
    let mut src = mock(SPEC);
    let mut dst = mock(SPEC);
    let h = header(&src, true, 7);
    // The destination resumes after COMMIT; its RESUMED is lost.
    let (sent, received) = kill_destination_write(
        4,
        &mut src,
        &mut dst,
        &h,
        &mut StateFence::new(dir.path(), &key),
    );
    let err = sent.unwrap_err();
    assert!(matches!(err, Error::InDoubt { .. }), "{err}");
    assert!(
        vfio_mig::error::Report(&err)
            .to_string()
            .contains("retry with --session"),
        "{err}"
    );
    assert!(matches!(
        received.unwrap(),
        RecvOutcome::Resumed {
            confirmed: false,
            ..
        }
    ));
    // No split brain: the destination runs, the source stays stopped (not resumed).
    assert!(handle(&dst).status().resumed_ok);
    let src_state = handle(&src).status().v1_state();
    assert_ne!(src_state, V1State::Running);
    let loaded = handle(&dst).status().transactions_loaded;

    // The retry of the same session, after a restart of the destination (a new fence over the
    // same state directory), is answered ALREADY_COMPLETED: nothing is loaded again and the
    // source is still not resumed.
    let (a, b) = Connection::pair().unwrap();
    let (sent, received) = run_pair(
        &mut src,
        &mut dst,
        &h,
        &opts(true),
        &mut StateFence::new(dir.path(), &key),
        a,
        b,
        &NoObserver,
        &NoObserver,
    );
    assert_eq!(sent.unwrap(), SendOutcome::AlreadyCompleted);
    assert!(matches!(
        received.unwrap(),
        RecvOutcome::AlreadyCompleted { .. }
    ));
    assert_eq!(handle(&dst).status().transactions_loaded, loaded);
    assert_eq!(handle(&src).status().v1_state(), src_state);
}

#[test]
fn replayed_session_is_loaded_once() {
    let mut src = mock(SPEC);
    let mut dst = mock(SPEC);
    let h = header(&src, false, 3);
    let mut fence = MemoryFence::new();
    let (a, b) = Connection::pair().unwrap();
    let (sent, received) = run_pair(
        &mut src,
        &mut dst,
        &h,
        &opts(false),
        &mut fence,
        a,
        b,
        &NoObserver,
        &NoObserver,
    );
    assert!(matches!(sent.unwrap(), SendOutcome::Completed(_)));
    received.unwrap();
    let loaded = handle(&dst).status().transactions_loaded;
    // The same stream again, from a fresh source device (as a retry from a restarted
    // source process would be).
    let mut src2 = mock(SPEC);
    let (a, b) = Connection::pair().unwrap();
    let (sent, received) = run_pair(
        &mut src2,
        &mut dst,
        &h,
        &opts(false),
        &mut fence,
        a,
        b,
        &NoObserver,
        &NoObserver,
    );
    assert_eq!(sent.unwrap(), SendOutcome::AlreadyCompleted);
    assert!(matches!(
        received.unwrap(),
        RecvOutcome::AlreadyCompleted { .. }
    ));
    assert_eq!(handle(&dst).status().transactions_loaded, loaded);
    // The source was not touched: no save, still running.
    let st = handle(&src2).status();
    assert_eq!((st.saves_completed, st.transactions_staged), (0, 0));
    assert_eq!(st.v1_state(), V1State::Running);
}

#[test]
fn stale_epoch_and_wrong_identity_are_refused_before_either_device_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    let key = DeviceKey::from_text("mock:stale");
    let fence = StateFence::new(dir.path(), &key);
    let mut record = FenceRecord::new("mock:stale");
    record.highest_epoch = 10;
    fence.store(&record).unwrap();

    let mut src = mock(SPEC);
    let stale = header(&src, true, 9);
    let current = header(&src, true, 11);
    // A destination device of another kind than the source's: a v2 device for a v1 stream.
    let foreign = "mock:v2,size=256K,seed=31,chunk=16K";
    for (h, dst_spec, code, expect) in [
        (stale, SPEC, ReasonCode::StaleEpoch, "stale epoch 9 < 10"),
        (current, foreign, ReasonCode::Incompatible, "speaks v2"),
    ] {
        let mut dst = mock(dst_spec);
        let (a, b) = Connection::pair().unwrap();
        let (sent, received) = run_pair(
            &mut src,
            &mut dst,
            &h,
            &opts(true),
            &mut StateFence::new(dir.path(), &key),
            a,
            b,
            &NoObserver,
            &NoObserver,
        );
        for e in [sent.unwrap_err(), received.unwrap_err()] {
            assert!(
                matches!(&e, Error::Refused { code: c, .. } if *c == code),
                "{e}"
            );
            assert!(
                vfio_mig::error::Report(&e).to_string().contains(expect),
                "{e}"
            );
        }
        let s = handle(&src).status();
        assert_eq!((s.transactions_staged, s.v1_state()), (0, V1State::Running));
        let d = handle(&dst).status();
        assert_eq!((d.resets, d.transactions_loaded), (0, 0));
    }
    // The refusals did not move the recorded epoch.
    assert_eq!(fence.highest_epoch().unwrap(), 10);
}

#[test]
fn a_silent_destination_times_out_and_the_source_runs_again() {
    for (answer_accept, live) in [(false, false), (true, true), (true, false)] {
        let mut src = mock(SPEC);
        let h = header(&src, live, 1);
        let (mut a, mut b) = Connection::pair().unwrap();
        a.set_timeout(Some(Duration::from_millis(300))).unwrap();
        let err = std::thread::scope(|s| {
            let peer = s.spawn(move || {
                // Read HELLO, then say ACCEPT (or nothing), then read on and never answer.
                let hello = read_message(&mut b, "test").unwrap();
                assert!(matches!(hello, Message::Hello { .. }));
                if answer_accept {
                    let mut head = vec![0u8; 4096];
                    let _ = std::io::Read::read(&mut b, &mut head);
                    b.write_all(
                        &Message::Accept {
                            session: h.session_id,
                        }
                        .encode(),
                    )
                    .unwrap();
                }
                let mut sink = vec![0u8; 1 << 16];
                while matches!(std::io::Read::read(&mut b, &mut sink), Ok(n) if n > 0) {}
            });
            let err =
                send(&mut [src.device.as_mut()], a, &h, &opts(live), &NoObserver).unwrap_err();
            peer.join().unwrap();
            err
        });
        let text = vfio_mig::error::Report(&err).to_string();
        assert!(
            text.contains("timed out") && text.contains("300ms"),
            "{text}"
        );
        assert_source_running(&handle(&src).status(), &text);
    }
}

#[test]
fn a_silent_source_times_out_and_the_destination_is_reset() {
    let src = mock(SPEC);
    let h = header(&src, true, 1);
    let mut dst = mock(SPEC);
    let (mut a, mut b) = Connection::pair().unwrap();
    b.set_timeout(Some(Duration::from_millis(300))).unwrap();
    let err = std::thread::scope(|s| {
        let d = s.spawn(|| {
            receive(
                &mut [dst.device.as_mut()],
                b,
                &mut MemoryFence::new(),
                &NoObserver,
            )
            .unwrap_err()
        });
        // HELLO and the header, then silence (the connection stays open).
        a.write_all(&Message::Hello { features: 1 }.encode())
            .unwrap();
        a.write_all(&h.encode().unwrap()).unwrap();
        let accept = read_message(&mut a, "test").unwrap();
        assert!(matches!(accept, Message::Accept { .. }));
        let err = d.join().unwrap();
        drop(a);
        err
    });
    let text = vfio_mig::error::Report(&err).to_string();
    assert!(
        text.contains("timed out") && text.contains("was reset"),
        "{text}"
    );
    assert_destination_safe(&handle(&dst).status(), "silent source");
}

#[test]
fn garbage_instead_of_hello_is_refused() {
    let mut dst = mock(SPEC);
    let (mut a, b) = Connection::pair().unwrap();
    let err = std::thread::scope(|s| {
        let d = s.spawn(|| {
            receive(
                &mut [dst.device.as_mut()],
                b,
                &mut MemoryFence::new(),
                &NoObserver,
            )
        });
        a.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let answer = read_message(&mut a, "test").unwrap();
        assert!(matches!(answer, Message::Refuse(_)), "{answer}");
        drop(a);
        d.join().unwrap().unwrap_err()
    });
    assert!(
        vfio_mig::error::Report(&err)
            .to_string()
            .contains("bad magic"),
        "{err}"
    );
    let st = handle(&dst).status();
    assert_eq!((st.resets, st.v1_state()), (0, V1State::Running));
}
