// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! End-to-end tests over loopback TCP with certificates minted at test time (vfio-mig-testcerts).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rustls_pki_types::ServerName;
use vfio_mig_session::transport::tls::{
    accept, connect, AuthorizationPolicy, AuthzError, HandshakeError, PeerIdentity, TlsConfig,
    TlsStream, NOT_TLS_NOTICE,
};
use vfio_mig_testcerts::{Ca, Usage};

const DEADLINE: Duration = Duration::from_secs(10);

/// The configuration of the holder of a leaf of `issuer` (common name `cn`, names `sans`),
/// trusting `trust`.
fn leaf(issuer: &Ca, dir: &Path, cn: &str, sans: &[&str], server: bool, trust: &Ca) -> TlsConfig {
    let usage = if server { Usage::Server } else { Usage::Client };
    let minted = issuer.leaf(dir, cn, sans, usage).unwrap();
    TlsConfig {
        cert: minted.cert,
        key: minted.key,
        ca: trust.pem().to_owned(),
        server_name: None,
    }
}

/// One PKI: a CA, a destination (server) certificate for `dst.example`, a source (client)
/// certificate, and a second CA that nobody trusts.
struct Pki {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    ca: Ca,
    other_ca: Ca,
    server: TlsConfig,
    client: TlsConfig,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    let ca = Ca::new(&path, "test-ca").unwrap();
    let other_ca = Ca::new(&path, "other-ca").unwrap();
    let server = leaf(&ca, &path, "dst", &["dst.example"], true, &ca);
    let client = leaf(
        &ca,
        &path,
        "src-a",
        &["src-a.example", "uri:spiffe://dc1/host/src-a"],
        false,
        &ca,
    );
    Pki {
        _dir: dir,
        dir: path,
        ca,
        other_ca,
        server,
        client,
    }
}

fn name(n: &str) -> ServerName<'static> {
    ServerName::try_from(n.to_owned()).unwrap()
}

/// Runs `server` on the accepted socket of a loopback listener in a thread and `client` on
/// a connected one; returns both results.
fn pair<S, C, A, B>(server: S, client: C) -> (A, B)
where
    S: FnOnce(TcpStream) -> A + Send + 'static,
    C: FnOnce(TcpStream) -> B,
    A: Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = thread::spawn(move || server(l.accept().unwrap().0));
    let b = client(TcpStream::connect(addr).unwrap());
    (t.join().unwrap(), b)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 13) as u8)
        .collect()
}

#[test]
fn mutual_tls_round_trip_both_ways() {
    const LEN: usize = 6 << 20;
    let p = pki();
    let scfg = p.server.server_config().unwrap();
    let ccfg = p.client.client_config().unwrap();
    let (server, client) = pair(
        move |s| -> io::Result<(String, Vec<u8>)> {
            let tls = accept(s, scfg, DEADLINE)?;
            tls.set_timeout(Some(DEADLINE))?;
            let ids = tls.peer_identities().to_string();
            // Read the source's data on one handle while a clone writes ours back.
            let mut rx = tls.try_clone()?;
            let mut tx = tls.try_clone()?;
            let writer = thread::spawn(move || -> io::Result<()> {
                tx.write_all(&pattern(LEN, 7))?;
                tx.shutdown(Shutdown::Write)
            });
            let mut got = Vec::new();
            rx.read_to_end(&mut got)?;
            writer.join().unwrap()?;
            Ok((ids, got))
        },
        move |s| -> io::Result<Vec<u8>> {
            let tls = connect(s, ccfg, name("dst.example"), DEADLINE)?;
            tls.set_timeout(Some(DEADLINE))?;
            assert!(tls.cipher_suite().starts_with("TLS13_"), "{tls:?}");
            assert_eq!(tls.peer_identities().to_string(), "dns:dst.example, cn:dst");
            let mut tx = tls.try_clone()?;
            let writer = thread::spawn(move || -> io::Result<()> {
                // Odd-sized writes, vectored too, across record boundaries.
                let data = pattern(LEN, 3);
                let (a, b) = data.split_at(LEN / 3);
                let mut written = 0;
                while written < a.len() {
                    let end = (written + 100_003).min(a.len());
                    written += tx.write(&a[written..end])?;
                }
                let mut rest = b;
                while !rest.is_empty() {
                    let half = rest.len().min(70_001) / 2;
                    let bufs = [
                        io::IoSlice::new(&rest[..half]),
                        io::IoSlice::new(&rest[half..rest.len().min(70_001)]),
                    ];
                    let n = tx.write_vectored(&bufs)?;
                    rest = &rest[n..];
                }
                tx.shutdown(Shutdown::Write)
            });
            let mut got = Vec::new();
            (&tls).read_to_end(&mut got)?;
            writer.join().unwrap()?;
            Ok(got)
        },
    );
    let (ids, from_client) = server.unwrap();
    let from_server = client.unwrap();
    assert_eq!(
        ids,
        "dns:src-a.example, uri:spiffe://dc1/host/src-a, cn:src-a"
    );
    assert!(from_client == pattern(LEN, 3), "source data corrupted");
    assert!(from_server == pattern(LEN, 7), "destination data corrupted");
}

#[test]
fn client_without_certificate_is_refused() {
    let p = pki();
    let scfg = p.server.server_config().unwrap();
    let roots = p.client.load_roots().unwrap();
    let ccfg = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let (server, client) = pair(
        move |s| accept(s, scfg, DEADLINE),
        move |s| connect(s, ccfg, name("dst.example"), DEADLINE),
    );
    let se = server.unwrap_err();
    assert_eq!(se.kind(), io::ErrorKind::PermissionDenied, "{se}");
    assert!(
        se.to_string()
            .ends_with("the source presented no certificate"),
        "{se}"
    );
    // Thanks to the ready byte the refusal reaches connect, with the alert.
    let ce = client.unwrap_err();
    assert_eq!(ce.kind(), io::ErrorKind::PermissionDenied, "{ce}");
    assert!(
        ce.to_string().contains(
            "the destination refused our client certificate (TLS alert CertificateRequired)"
        ),
        "{ce}"
    );
}

#[test]
fn client_certificate_from_another_ca_is_refused() {
    let p = pki();
    let scfg = p.server.server_config().unwrap();
    // Signed by a CA the destination does not trust (the source trusts the right CA).
    let rogue = leaf(
        &p.other_ca,
        &p.dir,
        "rogue",
        &["src-a.example"],
        false,
        &p.ca,
    );
    let ccfg = rogue.client_config().unwrap();
    let (server, client) = pair(
        move |s| accept(s, scfg, DEADLINE),
        move |s| connect(s, ccfg, name("dst.example"), DEADLINE),
    );
    let se = server.unwrap_err();
    assert_eq!(se.kind(), io::ErrorKind::PermissionDenied, "{se}");
    assert!(
        matches!(
            &se,
            HandshakeError::Tls {
                source: rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
                ..
            }
        ),
        "{se:?}"
    );
    assert!(
        se.to_string()
            .contains("the certificate of the source is not valid"),
        "{se}"
    );
    let ce = client.unwrap_err();
    assert!(
        ce.to_string()
            .contains("the destination refused our client certificate (TLS alert UnknownCA)"),
        "{ce}"
    );
}

#[test]
fn server_certificate_with_wrong_name_is_refused_by_the_client() {
    let p = pki();
    let scfg = p.server.server_config().unwrap();
    let ccfg = p.client.client_config().unwrap();
    let (server, client) = pair(
        move |s| accept(s, scfg, DEADLINE),
        move |s| connect(s, ccfg, name("other-host.example"), DEADLINE),
    );
    let ce = client.unwrap_err();
    assert_eq!(ce.kind(), io::ErrorKind::PermissionDenied, "{ce}");
    let text = ce.to_string();
    assert!(
        text.contains("the certificate of the destination is not valid"),
        "{text}"
    );
    assert!(text.contains("other-host.example"), "{text}");
    assert!(!text.contains('\n'), "{text}");
    let se = server.unwrap_err();
    assert!(
        se.to_string()
            .contains("the source refused our server certificate (TLS alert BadCertificate)"),
        "{se}"
    );

    // The destination's certificate from an untrusted CA is refused as well.
    let rogue = leaf(
        &p.other_ca,
        &p.dir,
        "rogue-dst",
        &["dst.example"],
        true,
        &p.ca,
    );
    let scfg = rogue.server_config().unwrap();
    let ccfg = p.client.client_config().unwrap();
    let (_, client) = pair(
        move |s| accept(s, scfg, DEADLINE),
        move |s| connect(s, ccfg, name("dst.example"), DEADLINE),
    );
    let ce = client.unwrap_err();
    assert!(
        ce.to_string()
            .contains("it does not chain to a CA of our CA bundle (UnknownIssuer)"),
        "{ce}"
    );
}

#[test]
fn authorization_policy_allows_and_refuses_by_identity() {
    let p = pki();
    let other = leaf(&p.ca, &p.dir, "src-b", &["src-b.example"], false, &p.ca);
    let mut policy = AuthorizationPolicy::new();
    policy.allow("vm7-gpu0", "dns:src-a.example".parse().unwrap());
    policy.allow("vm8-nic0", "uri:spiffe://dc1/host/src-a".parse().unwrap());
    policy.allow("*", "cn:admin".parse().unwrap());
    for (client, device, allowed) in [
        (&p.client, "vm7-gpu0", true),
        (&p.client, "vm8-nic0", true),
        (&other, "vm7-gpu0", false),
    ] {
        let scfg = p.server.server_config().unwrap();
        let ccfg = client.client_config().unwrap();
        let policy = policy.clone();
        let (server, client) = pair(
            move |s| {
                let tls = accept(s, scfg, DEADLINE).unwrap();
                policy.check(device, tls.peer_identities()).cloned()
            },
            move |s| connect(s, ccfg, name("dst.example"), DEADLINE).unwrap(),
        );
        drop(client);
        match server {
            Ok(id) => {
                assert!(allowed, "{device}: allowed by {id}");
                let want: PeerIdentity = if device == "vm7-gpu0" {
                    "dns:src-a.example".parse().unwrap()
                } else {
                    "uri:spiffe://dc1/host/src-a".parse().unwrap()
                };
                assert_eq!(id, want);
            }
            Err(e) => {
                assert!(!allowed, "{device}: {e}");
                assert_eq!(
                    e,
                    AuthzError::Denied {
                        device: "vm7-gpu0".into(),
                        identities: "dns:src-b.example, cn:src-b".into()
                    }
                );
                assert_eq!(
                    e.to_string(),
                    "source [dns:src-b.example, cn:src-b] is not authorized to load into \
                     device `vm7-gpu0`"
                );
            }
        }
    }
}

#[test]
fn handshake_deadline_fires_against_a_silent_server() {
    let p = pki();
    let ccfg = p.client.client_config().unwrap();
    let deadline = Duration::from_millis(300);
    // Accepts TCP, then never speaks; holds the socket until the client is done.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let silent = thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let _ = done_rx.recv();
        drop(s);
    });
    let started = Instant::now();
    let e = connect(
        TcpStream::connect(addr).unwrap(),
        ccfg,
        name("dst.example"),
        deadline,
    )
    .unwrap_err();
    let took = started.elapsed();
    done_tx.send(()).unwrap();
    silent.join().unwrap();
    assert!(matches!(e, HandshakeError::TimedOut { .. }), "{e:?}");
    assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    assert_eq!(io::Error::from(e).kind(), io::ErrorKind::TimedOut);
    assert!(took >= deadline, "gave up after {took:?}");
    assert!(took < deadline * 10, "took {took:?}");
}

#[test]
fn handshake_deadline_covers_the_whole_handshake_not_each_read() {
    // A client that trickles a plausible ClientHello one byte every 20 ms would keep a
    // per-read timeout of 300 ms alive for ever; the deadline still ends the handshake.
    let p = pki();
    let scfg = p.server.server_config().unwrap();
    let deadline = Duration::from_millis(300);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let trickler = thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        let mut hello = vec![
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ];
        hello.resize(300, 0);
        // Bounded: at most 300 bytes (6 s); stops when the server gives up.
        for b in hello {
            if s.write_all(&[b]).is_err() {
                break;
            }
            thread::sleep(Duration::from_millis(20));
            let mut probe = [0u8; 1];
            s.set_nonblocking(true).unwrap();
            let closed = matches!(s.read(&mut probe), Ok(0));
            s.set_nonblocking(false).unwrap();
            if closed {
                break;
            }
        }
    });
    let (sock, _) = l.accept().unwrap();
    let started = Instant::now();
    let e = accept(sock, scfg, deadline).unwrap_err();
    let took = started.elapsed();
    assert!(matches!(e, HandshakeError::TimedOut { .. }), "{e:?}");
    assert!(took >= deadline && took < deadline * 10, "took {took:?}");
    trickler.join().unwrap();
}

#[test]
fn plain_tcp_client_gets_a_clear_error() {
    let p = pki();
    let scfg = p.server.server_config().unwrap();
    let (server, reply) = pair(
        move |s| accept(s, scfg, DEADLINE),
        |mut s| {
            // What a source without TLS sends first: the project's HELLO frame.
            s.write_all(b"VMIGHELLO\x00\x01").unwrap();
            s.set_read_timeout(Some(DEADLINE)).unwrap();
            let mut reply = Vec::new();
            s.read_to_end(&mut reply).unwrap();
            reply
        },
    );
    let se = server.unwrap_err();
    assert!(matches!(se, HandshakeError::NotTls { .. }), "{se:?}");
    assert_eq!(se.kind(), io::ErrorKind::InvalidData);
    assert!(
        se.to_string().ends_with(
            "the source does not speak TLS (it sent \"VMIGHELLO\\x00\\x01\"); is it running \
             without TLS?"
        ),
        "{se}"
    );
    // The plain client reads a plain-text reason, then EOF.
    assert_eq!(reply, NOT_TLS_NOTICE);

    // The other way round: a TLS client reaching a plain server.
    let ccfg = p.client.client_config().unwrap();
    let (_, client) = pair(
        |mut s| {
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"VMIG\x00\x02 refused: not a stream\n");
        },
        move |s| connect(s, ccfg, name("dst.example"), DEADLINE),
    );
    let ce = client.unwrap_err();
    assert!(
        ce.to_string()
            .contains("the destination does not speak TLS (it sent"),
        "{ce}"
    );
}

#[test]
fn readable_now_sees_data_and_the_end_but_not_silence() {
    let p = pki();
    let scfg = p.server.server_config().unwrap();
    let ccfg = p.client.client_config().unwrap();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (server, client) = pair(
        move |s| -> io::Result<()> {
            let mut tls = accept(s, scfg, DEADLINE)?;
            tls.set_timeout(Some(DEADLINE))?;
            go_rx.recv().unwrap();
            tls.write_all(b"FAILED")?;
            go_rx.recv().unwrap();
            tls.shutdown(Shutdown::Write)?;
            // Wait for the source to close.
            let mut rest = Vec::new();
            tls.read_to_end(&mut rest)?;
            Ok(())
        },
        move |s| -> io::Result<()> {
            let tls = connect(s, ccfg, name("dst.example"), DEADLINE)?;
            tls.set_timeout(Some(DEADLINE))?;
            assert!(!tls.readable_now()?, "nothing sent yet");
            go_tx.send(()).unwrap();
            // Wait (without sleeping) until the data is there: a blocking peek via poll.
            wait_readable(&tls);
            assert!(tls.readable_now()?);
            assert!(tls.readable_now()?, "asking twice does not consume");
            let mut buf = [0u8; 6];
            (&tls).read_exact(&mut buf)?;
            assert_eq!(&buf, b"FAILED");
            assert!(!tls.readable_now()?, "all read");
            go_tx.send(()).unwrap();
            wait_readable(&tls);
            assert!(tls.readable_now()?, "close_notify counts");
            assert_eq!((&tls).read(&mut buf)?, 0, "clean end of stream");
            tls.shutdown(Shutdown::Write)?;
            Ok(())
        },
    );
    server.unwrap();
    client.unwrap();
}

/// Blocks until the socket has something (poll), then lets `readable_now` judge.
fn wait_readable(tls: &TlsStream) {
    use std::os::fd::{AsFd, AsRawFd};
    let mut fd = libc::pollfd {
        fd: tls.as_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut fd, 1, 10_000) };
    assert_eq!(n, 1, "nothing arrived within 10 s");
}

#[test]
fn unclean_end_and_writes_after_shutdown() {
    let p = pki();
    let scfg = p.server.server_config().unwrap();
    let ccfg = p.client.client_config().unwrap();
    let (server, client) = pair(
        move |s| -> io::Result<io::Error> {
            let tls = accept(s, scfg, DEADLINE)?;
            let mut buf = [0u8; 8];
            Ok((&tls).read(&mut buf).unwrap_err())
        },
        move |s| -> io::Result<()> {
            let raw = s.try_clone()?;
            let mut tls = connect(s, ccfg, name("dst.example"), DEADLINE)?;
            // Cut the TCP connection under TLS: no close_notify.
            raw.shutdown(Shutdown::Write)?;
            // The TLS shutdown may fail (the destination may be gone already); writes are
            // refused after it either way.
            let _ = tls.shutdown(Shutdown::Write);
            let e = tls.write(b"late").unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
            assert!(e.to_string().contains("shut down"), "{e}");
            Ok(())
        },
    );
    client.unwrap();
    let e = server.unwrap();
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    assert!(e.to_string().contains("without a TLS close_notify"), "{e}");
}

#[test]
fn idle_timeout_after_the_handshake_is_a_clear_error() {
    let p = pki();
    let scfg = p.server.server_config().unwrap();
    let ccfg = p.client.client_config().unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let (server, client) = pair(
        move |s| {
            let tls = accept(s, scfg, DEADLINE);
            let _ = done_rx.recv();
            tls.map(drop)
        },
        move |s| {
            let tls = connect(s, ccfg, name("dst.example"), DEADLINE).unwrap();
            tls.set_timeout(Some(Duration::from_millis(50))).unwrap();
            let mut buf = [0u8; 4];
            let e = (&tls).read(&mut buf).unwrap_err();
            done_tx.send(()).unwrap();
            e
        },
    );
    server.unwrap();
    assert_eq!(client.kind(), io::ErrorKind::TimedOut);
    assert!(
        client.to_string().ends_with("sent nothing for 50ms"),
        "{client}"
    );
}

#[test]
fn config_errors_name_the_file() {
    let p = pki();
    let mut c = p.client.clone();
    c.key = p.server.key.clone();
    let e = c.client_config().unwrap_err().to_string();
    assert!(e.starts_with("certificate "), "{e}");
    assert!(
        e.contains("src-a.crt with key ") && e.contains("dst.key"),
        "{e}"
    );
    let mut c = p.client.clone();
    c.key = p.client.cert.clone();
    let e = c.server_config().unwrap_err().to_string();
    assert!(e.contains("src-a.crt: no PRIVATE KEY block found"), "{e}");
}
