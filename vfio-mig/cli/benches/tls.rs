// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! TLS 1.3 against plain TCP, in the same run: a whole migration (`handshake::send` and
//! `handshake::receive`, a mock v1 device, and a `content=fast` v2 device whose content costs
//! almost nothing) over loopback, repeated and interleaved, median and min..max of each and
//! their ratio (issue 13 target 4b: one TLS channel at least 0.8 of plain TCP). Then one
//! bandwidth-modelled device (`rate=`, issue 13 target 2): the engine's save into a TLS (and
//! a TCP) connection against a raw read/write loop over the same kind of connection.
//! Certificates are minted (vfio-mig-testcerts) at start.
//!
//! `cargo bench -p vfio-mig-cli --bench tls [-- SIZE_MIB REPS RATE_MIB]`.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vfio_mig::wire::StreamHeader;
use vfio_mig::Backend;
use vfio_mig::{backend::v2_feature as feature, backend::v2_state::MigState, backend::V2Device};
use vfio_mig::{Epoch, NoObserver, SaveOptions, Source, SourceOptions};
use vfio_mig_fence::MemoryFence;
use vfio_mig_mock::{MockSpec, MockV2};
use vfio_mig_session::handshake;
use vfio_mig_session::transport::tls::TlsConfig;
use vfio_mig_session::transport::{
    accept_tls, connect, connect_tls, Address, ClientTls, Connection,
};
use vfio_mig_testcerts::{Ca, Usage};

/// One migration of the device `spec` over loopback; `tls`: the two sides' configurations.
fn migrate(spec: &str, tls: Option<(&TlsConfig, &TlsConfig)>) -> Duration {
    let (mut src, _) = vfio_mig_mock::open_named(spec, Backend::Auto).unwrap();
    let (mut dst, _) = vfio_mig_mock::open_named(spec, Backend::Auto).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = Address::from(listener.local_addr().unwrap());
    let server = tls.map(|(s, _)| s.server_config().unwrap());
    let client = tls.map(|(_, c)| ClientTls::new(c.clone()).unwrap());
    let started = Instant::now();
    std::thread::scope(|s| {
        let dst = &mut dst;
        let loader = s.spawn(move || {
            let (sock, _) = listener.accept().unwrap();
            let mut conn = Connection::tcp(sock).unwrap();
            if let Some(cfg) = server {
                conn = accept_tls(conn, cfg, Duration::from_secs(10)).unwrap();
            }
            let mut fence = MemoryFence::new();
            handshake::receive(&mut [dst.device.as_mut()], conn, &mut fence, &NoObserver).unwrap();
        });
        let conn = match &client {
            Some(c) => connect_tls(&addr, Duration::from_secs(10), c, Duration::from_secs(10)),
            None => connect(&addr, Duration::from_secs(10)),
        }
        .unwrap();
        let header = StreamHeader::new(&[src.device.as_ref()], false, 1).unwrap();
        let opts = SaveOptions::default();
        handshake::send(
            &mut [src.device.as_mut()],
            conn,
            &header,
            &opts,
            &NoObserver,
        )
        .unwrap();
        loader.join().unwrap();
    });
    started.elapsed()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let mib: u64 = args.first().and_then(|s| s.parse().ok()).unwrap_or(256);
    let reps: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "bench-ca").unwrap();
    let dst = ca
        .leaf(dir.path(), "dst.example", &["dst.example"], Usage::Server)
        .unwrap();
    let src = ca
        .leaf(dir.path(), "src.example", &["src.example"], Usage::Client)
        .unwrap();
    let server = TlsConfig {
        cert: dst.cert,
        key: dst.key,
        ca: ca.pem().to_owned(),
        server_name: None,
    };
    let client = TlsConfig {
        cert: src.cert,
        key: src.key,
        ca: ca.pem().to_owned(),
        server_name: Some("dst.example".into()),
    };
    let size = mib << 20;
    let rate: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(300);
    let tls = Some((&server, &client));
    for (what, spec) in [
        ("mock v1", format!("mock:v1,size={size},seed=9")),
        (
            "mock v2 content=fast",
            format!("mock:v2,size={size},seed=9,content=fast"),
        ),
    ] {
        let load = load1();
        let _ = (migrate(&spec, None), migrate(&spec, tls));
        let (mut plain, mut secure) = (Vec::new(), Vec::new());
        for i in 0..reps {
            // Alternate which goes first.
            let one = |t| size as f64 / migrate(&spec, t).as_secs_f64() / (1 << 20) as f64;
            if i % 2 == 0 {
                plain.push(one(None));
                secure.push(one(tls));
            } else {
                secure.push(one(tls));
                plain.push(one(None));
            }
        }
        let ratios = ratios(&secure, &plain);
        let (p, t) = (median(&mut plain), median(&mut secure));
        println!(
            "migration of {mib} MiB ({what}, loopback), {reps} interleaved reps: plain TCP {p:.0} MiB/s ({}), \
             TLS 1.3 {t:.0} MiB/s ({}); TLS/plain = {:.3} (per-rep ratios {}); load {load} -> {}",
            range(&plain),
            range(&secure),
            t / p,
            range_f(&ratios),
            load1()
        );
    }
    // One bandwidth-modelled device: engine vs raw loop, over TLS and over TCP.
    let rated = format!("mock:v2,size={size},seed=7,rate={rate}M,content=fast");
    for (name, t) in [("TLS", tls), ("TCP", None)] {
        let load = load1();
        let _ = (rated_one(&rated, t, false), rated_one(&rated, t, true));
        let (mut raw, mut engine) = (Vec::new(), Vec::new());
        for i in 0..reps {
            if i % 2 == 0 {
                raw.push(rated_one(&rated, t, false).as_secs_f64());
                engine.push(rated_one(&rated, t, true).as_secs_f64());
            } else {
                engine.push(rated_one(&rated, t, true).as_secs_f64());
                raw.push(rated_one(&rated, t, false).as_secs_f64());
            }
        }
        let r = ratios(&raw, &engine);
        let (a, b) = (median(&mut raw), median(&mut engine));
        println!(
            "one device at {rate} MiB/s ({mib} MiB) over {name}: raw loop {a:.3} s, engine {b:.3} s \
             (ideal {:.3} s); loop/engine = {:.3} (per-rep {}); load {load} -> {}",
            size as f64 / (rate << 20) as f64,
            a / b,
            range_f(&r),
            load1()
        );
    }
}

/// `/proc/loadavg`'s 1-minute figure now.
fn load1() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .unwrap_or("?")
        .to_owned()
}

fn ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x / y).collect()
}

fn range(v: &[f64]) -> String {
    let (lo, hi) = v
        .iter()
        .fold((f64::MAX, 0f64), |(l, h), x| (l.min(*x), h.max(*x)));
    format!("{lo:.0}..{hi:.0}")
}

fn range_f(v: &[f64]) -> String {
    let (lo, hi) = v
        .iter()
        .fold((f64::MAX, 0f64), |(l, h), x| (l.min(*x), h.max(*x)));
    format!("{lo:.3}..{hi:.3}")
}

/// Seconds of one bandwidth-modelled device's stop-and-copy into a connection to a thread
/// that reads and discards: the front door (`Source`), or a raw read/write loop of its
/// data fd. Both include the STOP_COPY and STOP transitions.
fn rated_one(spec: &str, tls: Option<(&TlsConfig, &TlsConfig)>, engine: bool) -> Duration {
    let spec: MockSpec = spec.parse().unwrap();
    let mock = MockV2::new(&spec).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = Address::from(listener.local_addr().unwrap());
    let server = tls.map(|(s, _)| s.server_config().unwrap());
    let client = tls.map(|(_, c)| ClientTls::new(c.clone()).unwrap());
    std::thread::scope(|s| {
        let rx = s.spawn(move || {
            let (sock, _) = listener.accept().unwrap();
            let mut conn = Connection::tcp(sock).unwrap();
            if let Some(cfg) = server {
                conn = accept_tls(conn, cfg, Duration::from_secs(10)).unwrap();
            }
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            // EOF, or the peer closing without close_notify: the end of the run.
            while let Ok(n @ 1..) = conn.read(&mut buf) {
                total += n as u64;
            }
            total
        });
        let mut conn = match &client {
            Some(c) => connect_tls(&addr, Duration::from_secs(10), c, Duration::from_secs(10)),
            None => connect(&addr, Duration::from_secs(10)),
        }
        .unwrap();
        let started = Instant::now();
        if engine {
            let dev = V2Device::open(Arc::new(mock)).unwrap();
            let opts = SourceOptions::new(Epoch(1)).pre_copy(false);
            let mut source = Source::start(vec![dev], &opts)
                .map_err(vfio_mig::Error::from)
                .unwrap();
            source.switch_over(&mut conn).unwrap();
            assert!(source.finish().stop_failures.is_empty());
        } else {
            let mut buf = vec![0u8; vfio_mig::DEFAULT_BUFFER];
            feature::set_state(&mock, MigState::Stop).unwrap();
            let session = feature::set_state(&mock, MigState::StopCopy)
                .unwrap()
                .unwrap();
            let fd = session.require_fd().unwrap();
            loop {
                match nix::unistd::read(fd, &mut buf) {
                    Ok(0) => break,
                    Ok(n) => conn.write_all(&buf[..n]).unwrap(),
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => panic!("raw loop read: {e}"),
                }
            }
            drop(session);
            feature::set_state(&mock, MigState::Stop).unwrap();
        }
        conn.flush().unwrap();
        let elapsed = started.elapsed();
        drop(conn);
        let got = rx.join().unwrap();
        assert!(got >= spec.size, "receiver got {got} bytes");
        elapsed
    })
}
