// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A unit over several channels (docs/stream-format.md, "Several channels"): every device's
//! records arrive in order whether devices share or own channels; the destination takes
//! fewer channels than offered; one channel cut mid-transfer fails and rolls back the whole
//! unit; a CHANNEL connection with a wrong token or another session is refused and touches
//! no device.

use std::io::Write;
use std::net::Shutdown;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vfio_mig::error::Report;
use vfio_mig::wire::StreamHeader;
use vfio_mig::{Event, MigrationDevice, NoObserver, Observer, SaveOptions};
use vfio_mig_fence::MemoryFence;
use vfio_mig_session::handshake::{
    open_connection, open_session, read_message, receive_channels, receive_opened, send_channels,
    ChannelOpening, Message, Opened, RecvOutcome, SendOutcome,
};
use vfio_mig_session::transport::{Connection, Duplex};
use vfio_mig_session::Error;
use vfio_mig_tests::{assert_destination_safe, assert_source_running, handle, mock, MockDevice};

fn opts(live: bool) -> SaveOptions {
    SaveOptions {
        live,
        buffer: 64 << 10,
        allow_non_p2p_unit: true,
        ..SaveOptions::default()
    }
}

fn specs(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| match i % 2 {
            0 => format!("mock:v1,size={}M,seed={},chunk=64K", 2 + i, 10 + i),
            _ => format!("mock:v2,size={}M,seed={},dirty-rate=4M", 2 + i, 10 + i),
        })
        .collect()
}

/// What a run of one unit over channels did.
struct Run {
    sent: vfio_mig_session::Result<SendOutcome>,
    received: vfio_mig_session::Result<RecvOutcome>,
    /// Further connections the source opened (indices it asked for).
    opened: Vec<u16>,
}

/// Runs `srcs` into `dsts` over socketpairs: the source offers `offer` channels, the
/// destination takes at most `max` (`None`: the one-channel entry point,
/// `receive_opened`). `tap` sees every further connection's source end before use;
/// `intruders` are raw connections queued before the source's own further connections.
#[allow(clippy::too_many_arguments)]
fn run(
    srcs: &mut [MockDevice],
    dsts: &mut [MockDevice],
    live: bool,
    offer: u16,
    max: Option<u16>,
    tap: &(dyn Fn(u16, &Connection) + Sync),
    dst_obs: &dyn Observer,
    intruders: Vec<Connection>,
) -> Run {
    let mut s: Vec<&mut dyn MigrationDevice> =
        srcs.iter_mut().map(|d| d.device.as_mut() as _).collect();
    let mut d: Vec<&mut dyn MigrationDevice> =
        dsts.iter_mut().map(|d| d.device.as_mut() as _).collect();
    let header = StreamHeader::new(&s.iter().map(|x| &**x).collect::<Vec<_>>(), live, 1).unwrap();
    let (to_dst, to_src) = Connection::pair().unwrap();
    let (further_tx, further_rx) = mpsc::channel::<Connection>();
    for i in intruders {
        further_tx.send(i).unwrap();
    }
    let opened = Mutex::new(Vec::new());
    let options = opts(live);
    let (sent, received) = std::thread::scope(|sc| {
        let opened = &opened;
        let header = &header;
        let options = &options;
        let saver = sc.spawn(move || {
            let mut connect = |index: u16| {
                let (a, b) = Connection::pair().map_err(|e| Error::transport("pair", e))?;
                tap(index, &a);
                opened.lock().unwrap().push(index);
                further_tx.send(b).unwrap();
                Ok(a)
            };
            send_channels(
                &mut s,
                to_dst,
                header,
                options,
                &NoObserver,
                offer,
                &mut connect,
            )
        });
        let loader = sc.spawn(move || {
            let mut fence = MemoryFence::new();
            let opening = open_session(to_src, None)?;
            let Some(max) = max else {
                return receive_opened(&mut d, opening, &mut fence, dst_obs);
            };
            let mut accept =
                |deadline: Instant| -> vfio_mig_session::Result<ChannelOpening<Connection>> {
                    let wait = deadline.saturating_duration_since(Instant::now());
                    let conn = further_rx
                        .recv_timeout(wait)
                        .map_err(|e| Error::protocol("accept a channel", e.to_string()))?;
                    match open_connection(conn, Some(deadline))? {
                        Opened::Channel(c) => Ok(c),
                        Opened::Session(_) => Err(Error::protocol("accept a channel", "a session")),
                    }
                };
            receive_channels(&mut d, opening, &mut fence, dst_obs, max, &mut accept)
        });
        (saver.join().unwrap(), loader.join().unwrap())
    });
    Run {
        sent,
        received,
        opened: opened.into_inner().unwrap(),
    }
}

fn no_tap(_: u16, _: &Connection) {}

fn assert_migrated(srcs: &[MockDevice], dsts: &[MockDevice], run: &Run, context: &str) {
    match (&run.sent, &run.received) {
        (Ok(SendOutcome::Completed(saves)), Ok(RecvOutcome::Resumed { reports, .. })) => {
            for (i, (s, l)) in saves.iter().zip(reports).enumerate() {
                assert_eq!(s.chunks, l.chunks, "{context}: device {i} chunks");
                assert_eq!(
                    s.pre_copy_bytes + s.stop_copy_bytes,
                    l.pre_copy_bytes + l.stop_copy_bytes,
                    "{context}: device {i} bytes"
                );
            }
        }
        (s, r) => panic!("{context}: sent {s:?}, received {r:?}"),
    }
    for (i, (s, d)) in srcs.iter().zip(dsts).enumerate() {
        let st = handle(d).status();
        assert!(
            st.resumed_ok && !st.corrupt,
            "{context}: device {i}: {st:?}"
        );
        assert_eq!(
            handle(s).state_digest(),
            handle(d).state_digest(),
            "{context}: device {i}"
        );
    }
}

#[test]
fn every_device_loads_in_order_when_four_devices_share_two_channels_or_own_four() {
    for (offer, further) in [(2u16, vec![1u16]), (4, vec![1, 2, 3])] {
        for live in [false, true] {
            let specs = specs(4);
            let mut srcs: Vec<_> = specs.iter().map(|s| mock(s)).collect();
            let mut dsts: Vec<_> = specs.iter().map(|s| mock(s)).collect();
            let r = run(
                &mut srcs,
                &mut dsts,
                live,
                offer,
                Some(16),
                &no_tap,
                &NoObserver,
                vec![],
            );
            let context = format!("{offer} channels, live={live}");
            assert_migrated(&srcs, &dsts, &r, &context);
            assert_eq!(r.opened, further, "{context}");
        }
    }
}

#[test]
fn the_destination_takes_fewer_channels_than_offered() {
    // (destination's bound, further connections the source then opens)
    for (max, further) in [(Some(2u16), vec![1u16]), (Some(1), vec![]), (None, vec![])] {
        let specs = specs(4);
        let mut srcs: Vec<_> = specs.iter().map(|s| mock(s)).collect();
        let mut dsts: Vec<_> = specs.iter().map(|s| mock(s)).collect();
        let r = run(
            &mut srcs,
            &mut dsts,
            true,
            4,
            max,
            &no_tap,
            &NoObserver,
            vec![],
        );
        let context = format!("offer 4, destination bound {max:?}");
        assert_migrated(&srcs, &dsts, &r, &context);
        assert_eq!(r.opened, further, "{context}");
    }
    // Fewer devices than channels offered: one channel a device.
    let specs = specs(2);
    let mut srcs: Vec<_> = specs.iter().map(|s| mock(s)).collect();
    let mut dsts: Vec<_> = specs.iter().map(|s| mock(s)).collect();
    let r = run(
        &mut srcs,
        &mut dsts,
        false,
        8,
        Some(16),
        &no_tap,
        &NoObserver,
        vec![],
    );
    assert_migrated(&srcs, &dsts, &r, "2 devices, 8 offered");
    assert_eq!(r.opened, [1]);
}

/// Shuts the source end of channel `channel` down (both directions) the first time the
/// destination reports data of `device`: a connection lost mid-transfer.
struct CutOnFirstData {
    device: u16,
    conn: Arc<Mutex<Option<Connection>>>,
}

impl Observer for CutOnFirstData {
    fn on_event(&self, e: &Event) {
        if let Event::PhaseStarted { device, .. } = e {
            if *device == self.device {
                if let Some(c) = self.conn.lock().unwrap().take() {
                    c.shutdown(Shutdown::Both).unwrap();
                }
            }
        }
    }
}

#[test]
fn a_channel_cut_mid_transfer_rolls_back_the_whole_unit() {
    for (offer, cut_channel) in [(2u16, 1u16), (4, 3)] {
        for live in [false, true] {
            let specs = specs(4);
            let mut srcs: Vec<_> = specs.iter().map(|s| mock(s)).collect();
            let mut dsts: Vec<_> = specs.iter().map(|s| mock(s)).collect();
            let held = Arc::new(Mutex::new(None));
            let tap = {
                let held = held.clone();
                move |index: u16, c: &Connection| {
                    if index == cut_channel {
                        *held.lock().unwrap() = Some(c.try_clone().unwrap());
                    }
                }
            };
            // Device `cut_channel` travels on channel `cut_channel` (i mod n).
            let obs = CutOnFirstData {
                device: cut_channel,
                conn: held.clone(),
            };
            let r = run(
                &mut srcs,
                &mut dsts,
                live,
                offer,
                Some(16),
                &tap,
                &obs,
                vec![],
            );
            let context = format!("{offer} channels, channel {cut_channel} cut, live={live}");
            assert!(held.lock().unwrap().is_none(), "{context}: never cut");
            let se = r.sent.expect_err(&context);
            let de = r.received.expect_err(&context);
            for s in &srcs {
                assert_source_running(&handle(s).status(), &context);
            }
            for d in &dsts {
                assert_destination_safe(&handle(d).status(), &context);
            }
            let (se, de) = (Report(&se).to_string(), Report(&de).to_string());
            assert!(!se.contains('\n') && !de.contains('\n'), "{context}");
            // The destination names the channel on which it saw the failure. Which one that
            // is, is not determined: once the source fails on the cut channel it closes the
            // others, and under load the destination may read another channel's truncated
            // stream first (seen about once in 35 runs on a loaded 2-CPU machine). The
            // devices above are what must not depend on it.
            assert!(de.contains("channel "), "{context}: {de}");
            assert!(se.contains("returned to RUNNING"), "{context}: {se}");
        }
    }
}

/// A raw connection to the destination that opens with `msg`; returns our end.
fn intruder(msg: &Message) -> (Connection, Connection) {
    let (mut ours, theirs) = Connection::pair().unwrap();
    ours.write_all(&msg.encode()).unwrap();
    (ours, theirs)
}

#[test]
fn a_channel_with_a_wrong_token_or_another_session_is_refused_and_touches_nothing() {
    let specs = specs(2);
    let mut srcs: Vec<_> = specs.iter().map(|s| mock(s)).collect();
    let mut dsts: Vec<_> = specs.iter().map(|s| mock(s)).collect();
    // The token is the destination's secret; an intruder can only guess it.
    let (mut guess, guess_end) = intruder(&Message::Channel {
        session: [0xaa; 16],
        index: 1,
        token: [0; 16],
    });
    let r = run(
        &mut srcs,
        &mut dsts,
        false,
        2,
        Some(16),
        &no_tap,
        &NoObserver,
        vec![guess_end],
    );
    // The intruder was refused; the session bound its own channel and completed.
    match read_message(&mut guess, "intruder") {
        Ok(Message::Refuse(reason)) => {
            assert!(reason.text.contains("another session"), "{}", reason.text)
        }
        other => panic!("intruder got {other:?}"),
    }
    assert_migrated(&srcs, &dsts, &r, "with an intruder");

    // The unit's own session id (not secret: it is in the clear on a plain connection) with
    // a wrong token, and the source's own channel never arriving: the forger is refused, and
    // so is the session, before any device is touched.
    let mut srcs: Vec<_> = specs.iter().map(|s| mock(s)).collect();
    let mut dsts: Vec<_> = specs.iter().map(|s| mock(s)).collect();
    let mut s: Vec<&mut dyn MigrationDevice> =
        srcs.iter_mut().map(|d| d.device.as_mut() as _).collect();
    let mut d: Vec<&mut dyn MigrationDevice> =
        dsts.iter_mut().map(|d| d.device.as_mut() as _).collect();
    let header = StreamHeader::new(&s.iter().map(|x| &**x).collect::<Vec<_>>(), false, 1).unwrap();
    let (mut forged, forged_end) = intruder(&Message::Channel {
        session: header.session_id,
        index: 1,
        token: [0x5a; 16],
    });
    let (to_dst, to_src) = Connection::pair().unwrap();
    let (sent, received) = std::thread::scope(|sc| {
        let header = &header;
        let (s, d) = (&mut s, &mut d);
        let saver = sc.spawn(move || {
            let mut connect = |_: u16| -> vfio_mig_session::Result<Connection> {
                Err(Error::transport(
                    "connect",
                    std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
                ))
            };
            send_channels(
                s,
                to_dst,
                header,
                &opts(false),
                &NoObserver,
                2,
                &mut connect,
            )
        });
        let loader = sc.spawn(move || {
            let mut fence = MemoryFence::new();
            let opening = open_session(to_src, None)?;
            let mut once = Some(forged_end);
            let mut accept =
                |deadline: Instant| -> vfio_mig_session::Result<ChannelOpening<Connection>> {
                    let conn = once.take().ok_or_else(|| {
                        Error::protocol("accept a channel", "no more connections")
                    })?;
                    match open_connection(conn, Some(deadline))? {
                        Opened::Channel(c) => Ok(c),
                        Opened::Session(_) => Err(Error::protocol("accept a channel", "a session")),
                    }
                };
            receive_channels(d, opening, &mut fence, &NoObserver, 16, &mut accept)
        });
        (saver.join().unwrap(), loader.join().unwrap())
    });
    drop((s, d));
    match read_message(&mut forged, "forger") {
        Ok(Message::Refuse(reason)) => {
            assert!(reason.text.contains("token"), "{}", reason.text)
        }
        other => panic!("forger got {other:?}"),
    }
    assert!(sent.is_err(), "{sent:?}");
    let e = received.expect_err("the session cannot bind its channel");
    assert!(
        matches!(e, Error::Refused { .. }),
        "refused, not failed: {}",
        Report(&e)
    );
    for (i, (src, dst)) in srcs.iter().zip(&dsts).enumerate() {
        let st = handle(src).status();
        assert!(
            st.is_running() && st.transactions_staged == 0 && st.dirtied_pages == 0,
            "source {i} touched: {st:?}"
        );
        let st = handle(dst).status();
        assert!(
            st.is_running() && st.resets == 0 && st.bytes_loaded == 0,
            "destination {i} touched: {st:?}"
        );
    }
}
