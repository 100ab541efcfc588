// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `--channels N` on `send`, `recv` and `migrate`: a unit over several connections (unix, and
//! mutual TLS through a counting proxy), the destination taking fewer than offered, and one
//! TLS channel cut mid-transfer failing the whole unit on both sides.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::{assert_clean_failure, stderr, Dirs, Pki, Recv};

fn devices(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("mock:v2,size={}M,seed={}", 2 + i, 40 + i))
        .collect()
}

/// A TCP proxy in front of `upstream` that counts the connections it forwards; with
/// `cut = Some((k, bytes))` it closes connection number `k` (from 1) both ways once it
/// forwarded `bytes` from the source: a channel lost mid-transfer.
fn proxy(upstream: String, cut: Option<(usize, usize)>) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("tcp:{}", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let n = seen.fetch_add(1, Ordering::SeqCst) + 1;
            let server = TcpStream::connect(&upstream).unwrap();
            let limit = cut.and_then(|(k, bytes)| (k == n).then_some(bytes));
            let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let (c_kill, s_kill) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                let mut total = 0usize;
                while let Ok(k) = c_in.read(&mut buf) {
                    if k == 0 || s_out.write_all(&buf[..k]).is_err() {
                        break;
                    }
                    total += k;
                    if limit.is_some_and(|l| total >= l) {
                        let _ = c_kill.shutdown(Shutdown::Both);
                        let _ = s_kill.shutdown(Shutdown::Both);
                        return;
                    }
                }
                let _ = s_out.shutdown(Shutdown::Write);
            });
            std::thread::spawn(move || {
                let (mut s_in, mut c_out) = (server, client);
                let _ = std::io::copy(&mut s_in, &mut c_out);
                let _ = c_out.shutdown(Shutdown::Write);
            });
        }
    });
    (addr, count)
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn send_and_recv_with_channels_over_a_unix_socket() {
    let dirs = Dirs::new();
    let devs = devices(4);
    // (send --channels, recv --channels)
    for (offer, take) in [("4", None), ("2", None), ("4", Some("2")), ("4", Some("1"))] {
        let listen = format!("unix:{}", dirs.path(&format!("s{offer}")).display());
        let mut args = strs(&devs);
        args.extend(["--listen", &listen, "--once", "--json"]);
        if let Some(t) = take {
            args.extend(["--channels", t]);
        }
        let recv = Recv::start(&dirs, &[], &args);
        let mut send = vec!["send"];
        send.extend(strs(&devs));
        send.extend(["--to", &listen, "--live", "--json", "--channels", offer]);
        let o = dirs.run(&send);
        let context = format!("send --channels {offer}, recv --channels {take:?}");
        assert!(o.status.success(), "{context}: {}", stderr(&o));
        let sent: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let (status, out, err) = recv.wait();
        assert!(status.success(), "{context}: {err}");
        let got: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(sent["outcome"], "completed", "{context}");
        assert_eq!(got["outcome"], "resumed", "{context}");
        for i in 0..4 {
            assert_eq!(
                got["reports"][i]["chunks"], sent["reports"][i]["chunks"],
                "{context}: device {i}"
            );
        }
    }
}

#[test]
fn migrate_with_channels() {
    let dirs = Dirs::new();
    let devs = devices(3);
    // The same spec twice is "given twice": give each destination an id of its own.
    let dsts: Vec<String> = (0..3).map(|i| format!("{},id=dst{i}", devs[i])).collect();
    let mut args2 = vec!["migrate", "--channels", "2", "--live"];
    for (s, d) in devs.iter().zip(&dsts) {
        args2.extend([s.as_str(), d.as_str()]);
    }
    let o = dirs.run(&args2);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stderr(&o).matches("destination running").count(),
        3,
        "{}",
        stderr(&o)
    );
    let o = dirs.run(&["migrate", "--channels", "0", &devs[0], &dsts[0]]);
    assert_clean_failure(o.status, &stderr(&o), "--channels");
}

fn tls_pair(dirs: &Dirs, pki: &Pki, devs: &[String], recv_extra: &[&str]) -> Recv {
    let mut args: Vec<String> = devs.to_vec();
    args.extend(["--listen".into(), "tcp:127.0.0.1:0".into(), "--once".into()]);
    args.extend(pki.dst.args());
    args.extend(["--allow".into(), "dns:src.example".into()]);
    args.extend(recv_extra.iter().map(|s| s.to_string()));
    Recv::start(dirs, &[], &strs(&args))
}

fn tls_send(
    dirs: &Dirs,
    pki: &Pki,
    devs: &[String],
    to: &str,
    offer: &str,
) -> std::process::Output {
    let mut args: Vec<String> = vec!["send".into()];
    args.extend(devs.iter().cloned());
    args.extend(["--to".into(), to.into(), "--channels".into(), offer.into()]);
    args.extend(pki.src.args());
    args.extend(["--tls-server-name".into(), "dst.example".into()]);
    dirs.run(&strs(&args))
}

#[test]
fn tls_channels_each_verified_and_negotiated_down() {
    let dirs = Dirs::new();
    let pki = Pki::new(dirs.tmp.path());
    let devs = devices(4);
    for (take, connections) in [(None, 4), (Some("2"), 2)] {
        let extra: Vec<&str> = take.map_or(vec![], |t| vec!["--channels", t]);
        let recv = tls_pair(&dirs, &pki, &devs, &extra);
        let (to, count) = proxy(recv.addr.strip_prefix("tcp:").unwrap().to_owned(), None);
        let o = tls_send(&dirs, &pki, &devs, &to, "4");
        assert!(
            o.status.success(),
            "recv --channels {take:?}: {}",
            stderr(&o)
        );
        let (status, _, err) = recv.wait();
        assert!(status.success(), "{err}");
        assert_eq!(err.matches("device running").count(), 4, "{err}");
        assert_eq!(
            count.load(Ordering::SeqCst),
            connections,
            "recv --channels {take:?}"
        );
    }
}

#[test]
fn a_tls_channel_cut_mid_transfer_fails_the_whole_unit() {
    let dirs = Dirs::new();
    let pki = Pki::new(dirs.tmp.path());
    let devs = devices(4);
    let recv = tls_pair(&dirs, &pki, &devs, &[]);
    // Connection 3 is channel 2 (devices 2): cut after 256 KiB of its 4 MiB.
    let (to, count) = proxy(
        recv.addr.strip_prefix("tcp:").unwrap().to_owned(),
        Some((3, 256 << 10)),
    );
    let o = tls_send(&dirs, &pki, &devs, &to, "4");
    let line = assert_clean_failure(o.status, &stderr(&o), "returned to RUNNING");
    for d in &devs {
        assert!(
            line.contains(&format!("{d} was returned to RUNNING")),
            "{line}"
        );
    }
    let (status, _, err) = recv.wait();
    let line = assert_clean_failure(status, &err, "was reset");
    // A device enters RESUMING only once its channel's header was read (the front door's
    // destination): the cut channel's device always did and is reset; a device whose channel
    // had not delivered its header yet was never touched and is not named. None runs.
    assert!(line.contains(&format!("{} was reset", devs[2])), "{line}");
    for d in &devs {
        assert!(!line.contains(&format!("{d} was returned")), "{line}");
        assert!(!line.contains(&format!("{d} runs")), "{line}");
    }
    // The receiver names the channel on which it saw the failure: the cut one (2), or
    // another whose stream the sender closed after failing on it (seen once: channel 3).
    assert!(line.contains("channel "), "{line}");
    assert_eq!(count.load(Ordering::SeqCst), 4);
}
