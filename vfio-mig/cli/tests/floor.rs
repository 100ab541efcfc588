// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `recv`'s floor under the rate of an admitted source (issue 21, defect 7; docs/cli.md,
//! "recv"): over several channels, one shared reserve of waiting time; under TLS, counted on
//! the socket's ciphertext, so a source trickling inside one TLS record is let go like one
//! trickling a plain stream. Each against the `vfio-mig` binary.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    data_record_header, header_bytes, send_unit_over_two_channels, stderr, unit_header_bytes, Dirs,
    Pki, Recv,
};
use vfio_mig_session::handshake::{read_message, Message, FEATURE_CHANNELS};
use vfio_mig_session::transport::tls::TlsConfig;
use vfio_mig_session::transport::{connect_tls, Address, ClientTls};

/// Writes one zero byte every 500 ms to `w` (each well within recv's 2 s idle timeout), at
/// most 240 (120 s), until a write fails (recv let the peer go).
fn trickle(mut w: impl Write + Send + 'static) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for _ in 0..240 {
            if w.write_all(&[0]).and_then(|()| w.flush()).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    })
}

/// Waits (at most `limit`, from `started`) for recv's stderr line containing `text`.
fn line_within(recv: &Recv, text: &str, started: Instant, limit: Duration) -> String {
    let mut seen = Vec::new();
    loop {
        let left = limit.saturating_sub(started.elapsed());
        match recv.lines.recv_timeout(left) {
            Ok(l) if l.contains(text) => return l,
            Ok(l) => seen.push(l),
            Err(_) => panic!("recv printed no {text:?} within {limit:?}: {seen:?}"),
        }
    }
}

/// Opens a two-channel session of `session` on the `recv` at `sock` and binds its further
/// channel; after ACCEPT each channel starts its sub-stream and a DATA record, and the
/// channels `trickled` send the record's payload one byte every 500 ms (the others stay
/// silent). Returns `recv`'s line saying the source was too slow; panics if none came
/// within 30 s of ACCEPT.
fn slow_session(recv: &Recv, sock: &std::path::Path, session: u8, trickled: [bool; 2]) -> String {
    let mut main = UnixStream::connect(sock).unwrap();
    let hello = Message::Hello {
        features: FEATURE_CHANNELS,
    };
    main.write_all(&hello.encode()).unwrap();
    main.write_all(&Message::OfferChannels { count: 2 }.encode())
        .unwrap();
    main.write_all(&unit_header_bytes(session)).unwrap();
    let answer = read_message(&mut main, "test").unwrap();
    let Message::Channels {
        session: id,
        count: 2,
        token,
    } = answer
    else {
        panic!("CHANNELS with 2 expected: {answer:?}");
    };
    let mut further = UnixStream::connect(sock).unwrap();
    let bind = Message::Channel {
        session: id,
        index: 1,
        token,
    };
    further.write_all(&bind.encode()).unwrap();
    let answer = read_message(&mut main, "test").unwrap();
    assert!(matches!(answer, Message::Accept { .. }), "{answer:?}");
    let started = Instant::now();
    let mut trickles = Vec::new();
    for (c, trickled) in [&mut main, &mut further].into_iter().zip(trickled) {
        c.write_all(&header_bytes(session, 1)).unwrap();
        c.write_all(&data_record_header()).unwrap();
        if trickled {
            trickles.push(trickle(c.try_clone().unwrap()));
        }
    }
    // The reserve is 4 s; a trickle would last 120 s.
    let line = line_within(recv, "too slow", started, Duration::from_secs(30));
    drop((main, further));
    for t in trickles {
        t.join().unwrap();
    }
    line
}

/// A source that opens a two-channel session and after ACCEPT trickles a record on each
/// channel (every byte within the 2 s idle timeout), or on one while the other stays
/// silent, is let go once the session's one reserve (twice `--timeout`: 4 s) is spent: both
/// destination devices reset, the error naming the source as too slow; `recv` then serves
/// an honest two-channel source. Without a floor over several channels the trickle held
/// `recv` for as long as it lasted.
#[test]
fn a_source_trickling_on_every_channel_or_one_is_let_go() {
    let dirs = Dirs::new();
    let devs = ["mock:v1,size=1M,seed=71", "mock:v1,size=1M,seed=72"];
    let sock = dirs.path("s");
    let listen = format!("unix:{}", sock.display());
    let unit = "--allow-non-p2p-unit";
    let args = [
        devs[0],
        devs[1],
        "--listen",
        &listen,
        unit,
        "--timeout",
        "2",
    ];
    let recv = Recv::start(&dirs, &[], &args);
    for (session, trickled) in [(12, [true, true]), (13, [true, false])] {
        let line = slow_session(&recv, &sock, session, trickled);
        assert!(line.starts_with("vfio-mig: warning: "), "{line}");
        for dev in devs {
            assert!(line.contains(&format!("{dev} was reset")), "{line}");
        }
    }
    send_unit_over_two_channels(&dirs, [devs[0], devs[1]], &listen, recv);
}

/// Forwards every connection accepted on `listener` to `upstream`; the source's bytes of
/// the first connection (channel 0) at about 320 KiB/s (16 KiB every 50 ms), every other
/// direction at once.
fn slow_main_channel_proxy(listener: UnixListener, upstream: std::path::PathBuf) {
    std::thread::spawn(move || {
        for (n, client) in listener.incoming().enumerate() {
            let Ok(client) = client else { return };
            let Ok(server) = UnixStream::connect(&upstream) else {
                return;
            };
            let pace = (n == 0).then_some(Duration::from_millis(50));
            pump(
                client.try_clone().unwrap(),
                server.try_clone().unwrap(),
                pace,
            );
            pump(server, client, None);
        }
    });
}

/// Copies `from` to `to` (16 KiB at a time, `pace` after each) until either ends.
fn pump(mut from: UnixStream, mut to: UnixStream, pace: Option<Duration>) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
            if let Some(p) = pace {
                std::thread::sleep(p);
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
}

/// An honest `send --live --channels 2` is never stopped by the floor, though its small
/// device's channel waits through the big device's whole pre-copy (about 13 s through a
/// slow link, far past the 4 s reserve) and then ends early while the other carries the
/// rest: the bytes of any channel refill the session's one reserve. A floor per channel
/// would cut the waiting channel after 4 s.
#[test]
fn an_honest_two_channel_send_whose_channels_end_apart_is_never_stopped() {
    let dirs = Dirs::new();
    let devs = ["mock:v2,size=4M,seed=73", "mock:v2,size=64K,seed=74"];
    let sock = dirs.path("s");
    let listen = format!("unix:{}", sock.display());
    let args = [
        devs[0],
        devs[1],
        "--listen",
        &listen,
        "--once",
        "--timeout",
        "2",
    ];
    let recv = Recv::start(&dirs, &[], &args);
    let front = dirs.path("proxy");
    slow_main_channel_proxy(UnixListener::bind(&front).unwrap(), sock);
    let to = format!("unix:{}", front.display());
    let o = dirs.run(&[
        "send",
        devs[0],
        devs[1],
        "--to",
        &to,
        "--channels",
        "2",
        "--live",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (status, _, err) = recv.wait();
    assert!(status.success(), "{err}");
    assert!(!err.contains("too slow"), "{err}");
}

/// Forwards one TCP connection to `upstream`: at once until `slow` is set, then the
/// source's bytes one every 500 ms (at most 240).
fn trickling_tls_proxy(listener: TcpListener, upstream: String, slow: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let Ok((client, _)) = listener.accept() else {
            return;
        };
        let server = TcpStream::connect(upstream).unwrap();
        let (mut from, mut to) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        let (mut back_from, mut back_to) = (server, client);
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_from, &mut back_to);
        });
        let mut buf = vec![0u8; 64 << 10];
        let mut pending = std::collections::VecDeque::new();
        let mut sent = 0;
        loop {
            if !slow.load(Ordering::SeqCst) || pending.is_empty() {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => pending.extend(&buf[..n]),
                }
            }
            if !slow.load(Ordering::SeqCst) {
                let all: Vec<u8> = pending.drain(..).collect();
                if to.write_all(&all).is_err() {
                    return;
                }
                continue;
            }
            let Some(b) = pending.pop_front() else {
                continue;
            };
            if sent == 240 || to.write_all(&[b]).is_err() {
                return;
            }
            sent += 1;
            std::thread::sleep(Duration::from_millis(500));
        }
    });
}

/// An authorized TLS source (the test CA's `src.example`) completes the TLS handshake and
/// ACCEPT, then its next TLS record arrives one byte every 500 ms: each raw read comes within
/// the 2 s idle timeout, but the record completes only after hours. The floor counts the
/// socket's ciphertext bytes, so the source is let go once the 4 s reserve is spent, the
/// device reset, and `recv` goes on to serve an honest source. Before, the read waited for
/// the whole record and the trickle held `recv`.
#[test]
fn a_tls_source_trickling_inside_one_record_is_let_go() {
    let dirs = Dirs::new();
    let pki = Pki::new(dirs.tmp.path());
    let dev = "mock:v1,size=1M,seed=75";
    let mut args: Vec<String> = vec![dev.into(), "--listen".into(), "tcp:127.0.0.1:0".into()];
    args.extend(pki.dst.args());
    args.extend(["--allow", "dns:src.example", "--timeout", "2"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut recv = Recv::start(&dirs, &[], &args);
    let upstream = recv.addr.strip_prefix("tcp:").unwrap().to_owned();
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_addr: Address = format!("tcp:{}", proxy.local_addr().unwrap())
        .parse()
        .unwrap();
    let slow = Arc::new(AtomicBool::new(false));
    trickling_tls_proxy(proxy, upstream, slow.clone());
    let tls = ClientTls::new(TlsConfig {
        cert: pki.src.cert.clone(),
        key: pki.src.key.clone(),
        ca: pki.src.ca.clone(),
        server_name: Some("dst.example".into()),
    })
    .unwrap();
    let five = Duration::from_secs(5);
    let mut conn = connect_tls(&proxy_addr, five, &tls, five).unwrap();
    conn.write_all(&Message::Hello { features: 0 }.encode())
        .unwrap();
    conn.write_all(&header_bytes(13, 1)).unwrap();
    let answer = read_message(&mut conn, "test").unwrap();
    assert!(matches!(answer, Message::Accept { .. }), "{answer:?}");
    // From here the proxy passes the source's bytes one at a time: one TLS record of 20 KiB
    // of plaintext (16 KiB and more of ciphertext) would take hours.
    slow.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let mut record = data_record_header();
    record.resize(20 << 10, 0);
    conn.write_all(&record).unwrap();
    let line = line_within(&recv, "too slow", started, Duration::from_secs(30));
    assert!(line.contains("reset"), "{line}");
    assert!(recv.running(), "recv keeps serving after a failed session");
    drop(conn);
    let mut send: Vec<String> = vec!["send".into(), dev.into(), "--to".into(), recv.addr.clone()];
    send.extend(pki.src.args());
    send.extend(["--tls-server-name".into(), "dst.example".into()]);
    let send: Vec<&str> = send.iter().map(String::as_str).collect();
    let o = dirs.run(&send);
    assert!(o.status.success(), "{}", stderr(&o));
    let (status, _, err) = recv.wait();
    assert!(status.success(), "{err}");
}
