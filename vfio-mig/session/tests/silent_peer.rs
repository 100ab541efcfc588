// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A peer that goes silent mid-write (a network partition: nothing read, nothing closed)
//! holds a write for one idle timeout, not more. docs/cli.md: "a peer that sends nothing, or
//! accepts nothing, for that long is considered dead". A blocking write whose timeout expires
//! after the kernel took part of the buffer returns that part (send(2), SO_SNDTIMEO); taking
//! it for progress and writing again waited the timeout a second time (the soak's source that
//! outlived its bound under a partition that never healed).

use std::io::{self, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rustls_pki_types::ServerName;
use vfio_mig_session::transport::tls::{accept, connect, TlsConfig};
use vfio_mig_session::transport::Connection;
use vfio_mig_testcerts::{Ca, Usage};

/// The idle timeout of the tests.
const TIMEOUT: Duration = Duration::from_secs(1);

/// Writes far more than the socket buffers hold to a peer that reads nothing; returns the
/// error and how long after the first byte went out the write gave up.
fn write_until_given_up(w: &mut dyn Write) -> (io::Error, Duration) {
    let chunk = vec![0x5a; 64 << 20];
    let started = Instant::now();
    let e = w.write_all(&chunk).expect_err("a peer that reads nothing");
    (e, started.elapsed())
}

/// The write ends within one idle timeout (and a margin for a loaded machine: well below the
/// two timeouts the old behaviour waited).
fn assert_one_timeout(e: &io::Error, took: Duration) {
    assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
    // The kernel's wait may end up to a timer tick early.
    let tick = Duration::from_millis(20);
    assert!(
        took + tick >= TIMEOUT,
        "gave up after {took:?}, before the timeout"
    );
    assert!(
        took < TIMEOUT * 17 / 10,
        "a silent peer held the write {took:?}, more than the {TIMEOUT:?} idle timeout"
    );
}

#[test]
fn a_silent_unix_peer_holds_a_write_one_timeout() {
    let (mut a, _b) = Connection::pair().unwrap();
    a.set_timeout(Some(TIMEOUT)).unwrap();
    let (e, took) = write_until_given_up(&mut a);
    assert_one_timeout(&e, took);
}

#[test]
fn a_silent_tcp_peer_holds_a_write_one_timeout() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let _peer = l.accept().unwrap();
    let mut a = Connection::tcp(s).unwrap();
    a.set_timeout(Some(TIMEOUT)).unwrap();
    let (e, took) = write_until_given_up(&mut a);
    assert_one_timeout(&e, took);
}

#[test]
fn a_silent_tls_peer_holds_a_write_one_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "test-ca").unwrap();
    let config = |cn: &str, sans: &[&str], usage| {
        let minted = ca.leaf(dir.path(), cn, sans, usage).unwrap();
        TlsConfig {
            cert: minted.cert,
            key: minted.key,
            ca: ca.pem().to_owned(),
            server_name: None,
        }
    };
    let server = config("dst", &["dst.example"], Usage::Server)
        .server_config()
        .unwrap();
    let client = config("src", &["src.example"], Usage::Client)
        .client_config()
        .unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    // The destination completes the handshake, then reads nothing until the test ends.
    let peer = thread::spawn(move || {
        let tls = accept(
            l.accept().unwrap().0,
            Arc::clone(&server),
            Duration::from_secs(10),
        );
        let _ = done_rx.recv();
        tls.map(drop)
    });
    let name = ServerName::try_from("dst.example".to_owned()).unwrap();
    let sock = TcpStream::connect(addr).unwrap();
    let tls = connect(sock, client, name, Duration::from_secs(10)).unwrap();
    let mut a = Connection::tls(tls);
    a.set_timeout(Some(TIMEOUT)).unwrap();
    let (e, took) = write_until_given_up(&mut a);
    done_tx.send(()).unwrap();
    peer.join().unwrap().unwrap();
    assert_one_timeout(&e, took);
}
