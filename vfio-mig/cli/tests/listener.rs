// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `recv`'s listener under peers that do not behave (issue 21, defects 6 and 7): CHANNEL
//! connections no session waits for, a HELLO the destination refuses, a refused peer that
//! stays silent. Each against the `vfio-mig` binary over a unix socket.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::{
    data_record_header, header_bytes, send_unit_over_two_channels, stderr, unit_header_bytes, Dirs,
    Recv,
};
use vfio_mig_session::handshake::{read_message, Message, FEATURE_CHANNELS, TOKEN_LEN};

/// Reads what `conn` receives until the peer closes it; `Err` if it is still open after
/// `limit` (the peer holds it).
fn read_until_closed(conn: &mut UnixStream, limit: Duration) -> Result<Vec<u8>, String> {
    let deadline = Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "still open after {limit:?} ({} bytes read)",
                got.len()
            ));
        }
        conn.set_read_timeout(Some(left)).unwrap();
        match conn.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(got),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Defect 6: CHANNEL connections that no session waits for are refused and closed at once,
/// not kept (40 held ones made a real multi-channel send time out); a real two-channel
/// session is served afterwards.
#[test]
fn channel_connections_no_session_waits_for_are_closed_at_once() {
    let dirs = Dirs::new();
    let devs = ["mock:v1,size=1M,seed=61", "mock:v1,size=1M,seed=62"];
    let sock = dirs.path("s");
    let listen = format!("unix:{}", sock.display());
    let unit = "--allow-non-p2p-unit";
    let recv = Recv::start(&dirs, &[], &[devs[0], devs[1], "--listen", &listen, unit]);
    let channel = Message::Channel {
        session: [7; 16],
        index: 1,
        token: [0; TOKEN_LEN],
    }
    .encode();
    let mut strays: Vec<UnixStream> = (0..40)
        .map(|_| {
            let mut c = UnixStream::connect(&sock).unwrap();
            c.write_all(&channel).unwrap();
            c
        })
        .collect();
    for (i, c) in strays.iter_mut().enumerate() {
        // Well below the 10 s handshake and 30 s idle timeouts: refused, not held.
        if let Err(e) = read_until_closed(c, Duration::from_secs(5)) {
            panic!("stray CHANNEL connection {i}: {e}");
        }
    }
    send_unit_over_two_channels(&dirs, [devs[0], devs[1]], &listen, recv);
}

/// Defect 7: a HELLO the destination refuses (an unknown feature bit) touches no device and
/// is not a session: `recv --once` keeps waiting; and the refused peer, silent, is let go
/// after the drain (10 s), not held for the 30 s idle timeout.
#[test]
fn a_refused_hello_neither_ends_recv_once_nor_holds_the_listener() {
    let dirs = Dirs::new();
    let dev = "mock:v1,size=1M,seed=63";
    let sock = dirs.path("s");
    let listen = format!("unix:{}", sock.display());
    let mut recv = Recv::start(&dirs, &[], &[dev, "--listen", &listen, "--once"]);
    let mut bad = UnixStream::connect(&sock).unwrap();
    bad.write_all(&Message::Hello { features: 1 << 30 }.encode())
        .unwrap();
    bad.write_all(&header_bytes(9, 1)).unwrap();
    // REFUSE, then the end of what recv writes; the peer stays silent, its end open.
    let answer = read_until_closed(&mut bad, Duration::from_secs(5)).unwrap();
    assert!(!answer.is_empty(), "REFUSE is sent first");
    // recv is done with the peer when it reports the refusal: after the 10 s drain at most.
    let limit = Duration::from_secs(20);
    let started = Instant::now();
    let mut seen = Vec::new();
    loop {
        let left = limit.saturating_sub(started.elapsed());
        match recv.lines.recv_timeout(left) {
            Ok(l) if l.contains("unknown HELLO features") => break,
            Ok(l) => seen.push(l),
            Err(_) => panic!("the silent refused peer was held over {limit:?}: {seen:?}"),
        }
    }
    drop(bad);
    assert!(recv.running(), "one refused HELLO ended recv --once");
    let o = dirs.run(&["send", dev, "--to", &listen]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (status, _, err) = recv.wait();
    assert!(status.success(), "{err}");
}

/// Defect 7: a source that trickles its stream after ACCEPT, each byte well within the idle
/// timeout, does not hold `recv`: it is let go once it used up its reserve of waiting time
/// (twice `--timeout`) at under the floor rate (docs/cli.md, "recv"), the device reset.
#[test]
fn a_source_trickling_after_accept_is_let_go() {
    let dirs = Dirs::new();
    let dev = "mock:v1,size=1M,seed=64";
    let sock = dirs.path("s");
    let listen = format!("unix:{}", sock.display());
    // An idle timeout of 2 s: one byte every 500 ms keeps every read within it.
    let args = [dev, "--listen", &listen, "--once", "--timeout", "2"];
    let mut recv = Recv::start(&dirs, &[], &args);
    let mut src = UnixStream::connect(&sock).unwrap();
    src.write_all(&Message::Hello { features: 0 }.encode())
        .unwrap();
    src.write_all(&header_bytes(10, 1)).unwrap();
    let answer = read_message(&mut src, "test").unwrap();
    assert!(matches!(answer, Message::Accept { .. }), "{answer:?}");
    // A DATA record whose payload then comes one byte at a time.
    src.write_all(&data_record_header()).unwrap();
    let mut trickle = src.try_clone().unwrap();
    let trickler = std::thread::spawn(move || {
        for _ in 0..240 {
            if trickle.write_all(&[0]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    // The reserve is 4 s; the trickle would last 120 s.
    let limit = Duration::from_secs(30);
    let started = Instant::now();
    while recv.running() {
        assert!(
            started.elapsed() < limit,
            "a trickling source held recv over {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(src);
    let (status, _, err) = recv.wait();
    let line = common::assert_clean_failure(status, &err, "too slow");
    assert!(line.contains("was reset"), "{line}");
    trickler.join().unwrap();
}

/// Defect 7: a multi-channel session is not accepted after its bind limit (10 s,
/// `BIND_TIME`). Refused CHANNEL connections that stay silent keep the binding busy past the
/// limit (each is drained for a second); the session's real channel, which arrives after
/// the limit passed, must not be bound: the source is refused, not accepted late.
#[test]
fn a_channel_after_the_bind_limit_is_refused_not_bound() {
    let dirs = Dirs::new();
    let devs = ["mock:v1,size=1M,seed=65", "mock:v1,size=1M,seed=66"];
    let sock = dirs.path("s");
    let listen = format!("unix:{}", sock.display());
    let unit = "--allow-non-p2p-unit";
    let recv = Recv::start(&dirs, &[], &[devs[0], devs[1], "--listen", &listen, unit]);
    let mut main = UnixStream::connect(&sock).unwrap();
    main.write_all(
        &Message::Hello {
            features: FEATURE_CHANNELS,
        }
        .encode(),
    )
    .unwrap();
    main.write_all(&Message::OfferChannels { count: 2 }.encode())
        .unwrap();
    main.write_all(&unit_header_bytes(11)).unwrap();
    let Message::Channels { session, token, .. } = read_message(&mut main, "test").unwrap() else {
        panic!("CHANNELS expected");
    };
    let started = Instant::now();
    // Silent channels with a wrong token, each refused and drained for 1 s in turn.
    let bogus = Message::Channel {
        session,
        index: 1,
        token: [0; TOKEN_LEN],
    }
    .encode();
    let _held: Vec<UnixStream> = (0..13)
        .map(|_| {
            let mut c = UnixStream::connect(&sock).unwrap();
            c.write_all(&bogus).unwrap();
            c
        })
        .collect();
    // Once 10 were refused, 10 s of drains passed since the binding began: the bind limit
    // is over, and the real channel comes.
    for _ in 0..10 {
        // A warning of the library's log, like recv's own: one prefix, said once.
        let line = recv.wait_line("its token is not this session's");
        assert!(line.starts_with("vfio-mig: warning: "), "{line:?}");
        assert_eq!(line.matches("warning").count(), 1, "{line:?}");
    }
    assert!(started.elapsed() >= Duration::from_secs(10));
    let mut real = UnixStream::connect(&sock).unwrap();
    real.write_all(
        &Message::Channel {
            session,
            index: 1,
            token,
        }
        .encode(),
    )
    .unwrap();
    let answer = read_message(&mut main, "test").unwrap();
    assert!(
        matches!(answer, Message::Refuse(_)),
        "the session was answered {answer:?} {:?} after CHANNELS, past its bind limit",
        started.elapsed()
    );
}
