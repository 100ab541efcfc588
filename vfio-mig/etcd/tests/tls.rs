// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Who reaches the fencing state of an etcd cluster run as docs/fencing.md says
//! (`--client-cert-auth --trusted-ca-file`): a host with a certificate of the fleet's CA, and
//! nobody else. A client without a certificate, with another CA's, or over plain HTTP can
//! neither read nor change owners and epochs, and a handoff through such a client is refused
//! before any device is touched; a host whose CA did not sign the members' certificate
//! refuses to talk to them. What a refusal must look like comes from TLS 1.3 (RFC 8446: the
//! server's alert on a missing or unknown client certificate, the client's check of the
//! server's chain), not from the store.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{EtcdCluster, Pki};
use vfio_mig::wire::StreamHeader;
use vfio_mig::{MigrationDevice, NoObserver, SaveOptions};
use vfio_mig_etcd::{ClientIdentity, EtcdStore, EtcdTls, Security};
use vfio_mig_fence::{Fence, FenceStore, SharedFencing, Write};
use vfio_mig_session::handshake::{receive, send, RecvOutcome, SendOutcome};
use vfio_mig_session::transport::Connection;
use vfio_mig_session::{Error, ReasonCode};
use vfio_mig_tests::{handle, mock, MockDevice};

const SPEC: &str = "mock:v1,size=256K,seed=3,chunk=64K";
const PROBE: &str = "vfio-mig-test/probe";

fn ids(id: &str) -> Vec<String> {
    vec![id.to_owned()]
}

/// One stream from `src` to `dst`, `fence` deciding at the destination.
fn transfer(
    src: &mut MockDevice,
    dst: &mut MockDevice,
    header: &StreamHeader,
    fence: &mut dyn Fence,
) -> (
    vfio_mig_session::Result<SendOutcome>,
    vfio_mig_session::Result<RecvOutcome>,
) {
    let (a, b) = Connection::pair().unwrap();
    let opts = SaveOptions {
        live: false,
        ..SaveOptions::default()
    };
    let mut s: [&mut dyn MigrationDevice; 1] = [src.opened.device.as_mut()];
    let mut d: [&mut dyn MigrationDevice; 1] = [dst.opened.device.as_mut()];
    std::thread::scope(|sc| {
        let sent = sc.spawn(|| send(&mut s, a, header, &opts, &NoObserver));
        let received = sc.spawn(|| receive(&mut d, b, fence, &NoObserver));
        (sent.join().unwrap(), received.join().unwrap())
    })
}

fn untouched(dev: &MockDevice) -> bool {
    let s = handle(dev).status();
    s.bytes_loaded == 0 && s.transactions_loaded == 0 && !s.resumed_ok && s.resets == 0
}

/// The refusal's code and whole text.
fn refusal<T: std::fmt::Debug, E: Into<Error>>(r: Result<T, E>) -> (ReasonCode, String) {
    match r.map_err(Into::into) {
        Err(e @ Error::Refused { .. }) => {
            let Error::Refused { code, .. } = &e else {
                unreachable!()
            };
            (*code, vfio_mig::error::Report(&e).to_string())
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// A fleet: a TLS cluster in which host-a handed `vm1/dev0` to host-b (epoch 1), and a probe
/// key written by a host.
fn fleet() -> Option<(EtcdCluster, Arc<dyn FenceStore>)> {
    let cluster = EtcdCluster::start()?;
    let store: Arc<dyn FenceStore> = Arc::new(cluster.store());
    let (a, b) = (
        SharedFencing::new(store.clone(), "host-a").unwrap(),
        SharedFencing::new(store.clone(), "host-b").unwrap(),
    );
    let (mut src, mut dst) = (mock(SPEC), mock(SPEC));
    let mut h = StreamHeader::new(&[src.device.as_ref()], false, 0).unwrap();
    let handoff = a.begin(&ids("vm1/dev0"), &h.session_id).unwrap();
    h.epoch = handoff.epoch();
    let mut fence = b.destination(&ids("vm1/dev0")).unwrap();
    let (sent, _) = transfer(&mut src, &mut dst, &h, &mut fence);
    assert!(matches!(sent, Ok(SendOutcome::Completed(_))), "{sent:?}");
    drop(handoff);
    let written = store
        .commit(
            &[],
            &[Write::Put {
                key: PROBE.into(),
                value: b"fleet".to_vec(),
                lease: None,
            }],
        )
        .unwrap();
    assert!(written.is_some());
    Some((cluster, store))
}

/// What the fleet's own client sees: the record of `vm1/dev0` and the probe.
fn state(store: &Arc<dyn FenceStore>) -> (String, u64, bool, Vec<u8>, u64) {
    let f = SharedFencing::new(store.clone(), "auditor").unwrap();
    let r = f.record("vm1/dev0").unwrap().unwrap();
    let probe = store.get(PROBE).unwrap().unwrap();
    (
        r.owner,
        r.epoch,
        r.pending.is_none(),
        probe.value,
        probe.revision,
    )
}

/// `intruder` can neither read nor write the store, its handoffs are refused before a device
/// is touched, each refusal names its step and `why`; the fleet's state is as it was.
fn assert_locked_out(
    kind: &str,
    intruder: EtcdStore,
    fleet_store: &Arc<dyn FenceStore>,
    why: &str,
) {
    let before = state(fleet_store);
    assert_eq!(
        (before.0.as_str(), before.1, before.2, before.3.as_slice()),
        ("host-b", 1, true, b"fleet".as_slice())
    );
    let intruder: Arc<dyn FenceStore> =
        Arc::new(intruder.with_operation_timeout(Duration::from_secs(5)));

    // Every member refuses at once (a certificate is configuration, not an outage): the
    // message says so rather than "unreachable for 5.0 s".
    let (code, e) = refusal(intruder.get(PROBE));
    assert_eq!(code, ReasonCode::Fence, "{kind}: {e}");
    assert!(
        e.starts_with("read the fencing store: refused: fencing store etcds://")
            && e.contains("every member refused TLS")
            && e.contains(why),
        "{kind}: {e}"
    );
    let (_, e) = refusal(intruder.commit(
        &[],
        &[Write::Put {
            key: PROBE.into(),
            value: b"intruder".to_vec(),
            lease: None,
        }],
    ));
    assert!(
        e.starts_with("write the fencing store: refused:") && e.contains(why),
        "{kind}: {e}"
    );
    let (_, e) = refusal(intruder.grant_lease(Duration::from_secs(5)));
    assert!(e.starts_with("grant a lease: refused:"), "{kind}: {e}");

    // The current owner itself, through this client, may not begin a handoff...
    let host_b = SharedFencing::new(intruder.clone(), "host-b").unwrap();
    let (code, e) = refusal(host_b.begin(&ids("vm1/dev0"), &[7; 16]));
    assert_eq!(code, ReasonCode::Fence, "{kind}: {e}");
    assert!(e.contains("every member refused TLS"), "{kind}: {e}");
    // ...and a destination deciding through it refuses the stream, its device untouched.
    let (mut src, mut dst) = (mock(SPEC), mock(SPEC));
    let h = StreamHeader::new(&[src.device.as_ref()], false, 2).unwrap();
    let mut fence = SharedFencing::new(intruder.clone(), "host-c")
        .unwrap()
        .destination(&ids("vm1/dev0"))
        .unwrap();
    let (sent, recv) = transfer(&mut src, &mut dst, &h, &mut fence);
    let (code, e) = refusal(sent);
    assert_eq!(code, ReasonCode::Fence, "{kind}: {e}");
    assert!(
        e.contains("fencing store") && e.contains(why),
        "{kind}: {e}"
    );
    assert!(recv.is_err(), "{kind}");
    assert!(untouched(&dst), "{kind}: a refused destination was touched");
    let s = handle(&src).status();
    assert!(s.is_running() && s.bytes_saved == 0, "{kind}: {s:?}");

    assert_eq!(
        state(fleet_store),
        before,
        "{kind}: the fencing state changed"
    );
}

#[test]
fn a_client_without_a_certificate_of_the_fleet_ca_cannot_read_or_change_the_fencing_state() {
    let Some((cluster, fleet_store)) = fleet() else {
        return;
    };
    let pki = cluster.pki();
    let refused_host = "the member refused this host";
    let no_cert = EtcdTls {
        ca: pki.ca.clone(),
        client: None,
    };
    let other_ca = EtcdTls {
        ca: pki.ca.clone(),
        client: Some(ClientIdentity {
            cert: pki.other_host.cert.clone(),
            key: pki.other_host.key.clone(),
        }),
    };
    for (kind, tls) in [
        ("no certificate", no_cert),
        ("another CA's certificate", other_ca),
    ] {
        let intruder = EtcdStore::from_url(&cluster.url(), &Security::Tls(tls)).unwrap();
        assert_locked_out(kind, intruder, &fleet_store, refused_host);
    }
}

#[test]
fn members_whose_certificate_the_given_ca_did_not_sign_are_refused() {
    let Some((cluster, fleet_store)) = fleet() else {
        return;
    };
    let pki = cluster.pki();
    // The fleet's own client certificate, but the members are checked against another CA:
    // the host refuses them (the server's chain, RFC 8446 4.4.2.4), whoever they are.
    let tls = EtcdTls::new(&pki.other_ca, &pki.host.cert, &pki.host.key);
    let client = EtcdStore::from_url(&cluster.url(), &Security::Tls(tls)).unwrap();
    assert_locked_out(
        "members of an unknown CA",
        client,
        &fleet_store,
        "the member's certificate does not verify against the given CA (UnknownIssuer)",
    );
}

#[test]
fn plain_http_reaches_nothing_of_a_tls_cluster() {
    let Some((cluster, fleet_store)) = fleet() else {
        return;
    };
    let before = state(&fleet_store);
    let url = cluster.url().replacen("etcds://", "etcd://", 1);
    let plain: Arc<dyn FenceStore> = Arc::new(
        EtcdStore::from_url(&url, &Security::InsecurePlainHttp)
            .unwrap()
            .with_operation_timeout(Duration::from_secs(3)),
    );
    let (code, e) = refusal(plain.get(PROBE));
    assert_eq!(code, ReasonCode::Fence, "{e}");
    assert!(
        e.starts_with("read the fencing store: refused: fencing store etcd://"),
        "{e}"
    );
    // The member hangs up after the request went out, which a client cannot tell from a
    // lost answer: the write is refused or in doubt; the state says nothing was written.
    let e = match plain.commit(&[], &[Write::Delete { key: PROBE.into() }]) {
        Err(
            e @ (vfio_mig_fence::Error::Refused { .. } | vfio_mig_fence::Error::InDoubt { .. }),
        ) => e.to_string(),
        other => panic!("expected a refusal or doubt, got {other:?}"),
    };
    assert!(e.starts_with("write the fencing store: "), "{e}");
    assert_eq!(state(&fleet_store), before);
}

#[test]
fn a_plain_cluster_is_reached_only_when_asked_for_by_name() {
    // A URL never silently drops or adds TLS.
    let tls = Security::Tls(EtcdTls::new("ca.crt", "host.crt", "host.key"));
    let e = EtcdStore::from_url("etcds://127.0.0.1:2379", &Security::InsecurePlainHttp)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("an etcds:// store needs a CA, a client certificate and its key"),
        "{e}"
    );
    let e = EtcdStore::from_url("etcd://127.0.0.1:2379", &tls)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("etcd:// is plain HTTP, but TLS files were given: use etcds://"),
        "{e}"
    );

    let Some(cluster) = EtcdCluster::start_plain() else {
        return;
    };
    assert!(cluster.url().starts_with("etcd://"));
    let store = EtcdStore::from_url(&cluster.url(), &Security::InsecurePlainHttp).unwrap();
    let put = Write::Put {
        key: PROBE.into(),
        value: b"plain".to_vec(),
        lease: None,
    };
    let rev = store.commit(&[], &[put]).unwrap().unwrap();
    let entry = store.get(PROBE).unwrap().unwrap();
    assert_eq!(
        (entry.value.as_slice(), entry.revision),
        (b"plain".as_slice(), rev)
    );
}

#[test]
fn bad_tls_files_are_refused_when_the_store_is_made() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let url = "etcds://127.0.0.1:1";
    let make = |tls: EtcdTls| {
        EtcdStore::from_url(url, &Security::Tls(tls))
            .unwrap_err()
            .to_string()
    };
    let missing = dir.path().join("missing.crt");
    let e = make(EtcdTls::new(&missing, &pki.host.cert, &pki.host.key));
    assert!(
        e.contains("read CA bundle") && e.contains(&missing.display().to_string()),
        "{e}"
    );
    // A key file as the CA bundle.
    let e = make(EtcdTls::new(&pki.host.key, &pki.host.cert, &pki.host.key));
    assert!(
        e.contains("CA bundle") && e.contains("no CERTIFICATE block"),
        "{e}"
    );
    // A key that is not the certificate's.
    let e = make(EtcdTls::new(&pki.ca, &pki.host.cert, &pki.other_host.key));
    assert!(
        e.contains(&pki.host.cert.display().to_string())
            && e.contains(&pki.other_host.key.display().to_string()),
        "{e}"
    );
    // Without a client certificate only the CA is read.
    EtcdStore::from_url(
        url,
        &Security::Tls(EtcdTls {
            ca: pki.ca.clone(),
            client: None,
        }),
    )
    .unwrap();
}
