// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! TLS 1.3 against plain TCP, in the same run: a whole migration (`handshake::send` and
//! `handshake::receive`, mock v1 devices) over loopback, repeated and interleaved, median
//! and min..max of each and their ratio. Certificates are made with rcgen at start.
//!
//! `cargo bench -p vfio-mig-cli --bench tls [-- SIZE_MIB REPS]`.

use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use vfio_mig::engine::session::new_header;
use vfio_mig::engine::{NoObserver, SaveOptions};
use vfio_mig::fence::MemoryFence;
use vfio_mig::handshake;
use vfio_mig::transport::tls::TlsConfig;
use vfio_mig::transport::{accept_tls, connect, connect_tls, Address, ClientTls, Connection};
use vfio_mig::Backend;

fn leaf(
    dir: &Path,
    issuer: &Issuer<'static, KeyPair>,
    name: &str,
    server: bool,
) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names
        .push(SanType::DnsName(name.try_into().unwrap()));
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    let cert = p.signed_by(&key, issuer).unwrap();
    let (c, k) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c.display().to_string(), k.display().to_string())
}

/// One migration of `size` bytes over loopback; `tls`: the two sides' configurations.
fn migrate(size: u64, tls: Option<(&TlsConfig, &TlsConfig)>) -> Duration {
    let spec = format!("mock:v1,size={size},seed=9");
    let (mut src, _) = vfio_mig_mock::open_named(&spec, Backend::Auto).unwrap();
    let (mut dst, _) = vfio_mig_mock::open_named(&spec, Backend::Auto).unwrap();
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
        let header = new_header(&[src.device.as_ref()], false, 1).unwrap();
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
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "bench-ca");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let ca_pem = dir.path().join("ca.pem");
    std::fs::write(&ca_pem, ca_cert.pem()).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let (sc, sk) = leaf(dir.path(), &issuer, "dst.example", true);
    let (cc, ck) = leaf(dir.path(), &issuer, "src.example", false);
    let server = TlsConfig {
        cert: sc.into(),
        key: sk.into(),
        ca: ca_pem.clone(),
        server_name: None,
    };
    let client = TlsConfig {
        cert: cc.into(),
        key: ck.into(),
        ca: ca_pem,
        server_name: Some("dst.example".into()),
    };
    let size = mib << 20;
    let _ = (migrate(size, None), migrate(size, Some((&server, &client))));
    let (mut plain, mut tls) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        plain.push(size as f64 / migrate(size, None).as_secs_f64() / (1 << 20) as f64);
        tls.push(
            size as f64 / migrate(size, Some((&server, &client))).as_secs_f64() / (1 << 20) as f64,
        );
    }
    let range = |v: &[f64]| {
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, 0f64), |(l, h), x| (l.min(*x), h.max(*x)));
        format!("{lo:.0}..{hi:.0}")
    };
    let (p, t) = (median(&mut plain), median(&mut tls));
    println!(
        "migration of {mib} MiB (mock v1, loopback), {reps} interleaved reps: plain TCP {p:.0} MiB/s ({}), \
         TLS 1.3 {t:.0} MiB/s ({}); TLS/plain = {:.2}",
        range(&plain),
        range(&tls),
        t / p
    );
}
