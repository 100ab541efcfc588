// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The fencing model on both stores: the local directory and a 3-member etcd cluster on
//! loopback. Each scenario runs on every store it applies to, with one client per simulated
//! host, and real handoffs between mock devices where a device could be touched.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use common::{EtcdCluster, LossyRelays, TestStore};
use vfio_mig::wire::StreamHeader;
use vfio_mig::Event;
use vfio_mig::MigrationDevice;
use vfio_mig::NoObserver;
use vfio_mig::Observer;
use vfio_mig::SaveOptions;
use vfio_mig_etcd::EtcdStore;
use vfio_mig_fence::{Admission, DirStore, Fence, SharedFencing};
use vfio_mig_session::handshake::{receive, send, RecvOutcome, SendOutcome};
use vfio_mig_session::transport::Connection;
use vfio_mig_session::{Error, ReasonCode};
use vfio_mig_tests::{assert_destination_safe, handle, mock, MockDevice};

const SPEC: &str = "mock:v1,size=1M,seed=5,chunk=64K";

fn ids(id: &str) -> Vec<String> {
    vec![id.to_owned()]
}

fn opts() -> SaveOptions {
    SaveOptions {
        live: false,
        ..SaveOptions::default()
    }
}

/// A header for a new session of `dev` at `epoch`.
fn header(dev: &MockDevice, epoch: u64) -> StreamHeader {
    StreamHeader::new(&[dev.device.as_ref()], false, epoch).unwrap()
}

/// Runs one handoff from `src` to `dst` (a source thread and a destination thread over a
/// socketpair, as between two hosts) with `fence` as the destination's.
fn transfer(
    src: &mut MockDevice,
    dst: &mut MockDevice,
    header: &StreamHeader,
    fence: &mut dyn Fence,
    dst_obs: &dyn Observer,
) -> (
    vfio_mig_session::Result<SendOutcome>,
    vfio_mig_session::Result<RecvOutcome>,
) {
    let (a, b) = Connection::pair().unwrap();
    let mut s: [&mut dyn MigrationDevice; 1] = [src.opened.device.as_mut()];
    let mut d: [&mut dyn MigrationDevice; 1] = [dst.opened.device.as_mut()];
    std::thread::scope(|sc| {
        let sent = sc.spawn(|| send(&mut s, a, header, &opts(), &NoObserver));
        let received = sc.spawn(|| receive(&mut d, b, fence, dst_obs));
        (sent.join().unwrap(), received.join().unwrap())
    })
}

/// A begun handoff from `from` to `to`'s device `dst`, with its outcome.
fn hand_off(
    from: &SharedFencing,
    to: &SharedFencing,
    id: &str,
    src: &mut MockDevice,
    dst: &mut MockDevice,
    session: Option<[u8; 16]>,
) -> (
    vfio_mig_session::Result<SendOutcome>,
    vfio_mig_session::Result<RecvOutcome>,
) {
    let mut h = header(src, 0);
    if let Some(s) = session {
        h.session_id = s;
    }
    let handoff = from.begin(&ids(id), &h.session_id).unwrap();
    h.epoch = handoff.epoch();
    let mut fence = to.destination(&ids(id)).unwrap();
    let out = transfer(src, dst, &h, &mut fence, &NoObserver);
    if out.0.is_err() && handle(src).status().is_running() {
        handoff.abort().unwrap();
    }
    out
}

fn untouched(dev: &MockDevice) -> bool {
    let s = handle(dev).status();
    s.bytes_loaded == 0 && s.transactions_loaded == 0 && !s.resumed_ok && s.resets == 0
}

fn refused_text<E: Into<Error>>(r: Result<impl std::fmt::Debug, E>) -> (ReasonCode, String) {
    match r.map_err(Into::into) {
        Err(e @ Error::Refused { .. }) => {
            let Error::Refused { code, .. } = &e else {
                unreachable!()
            };
            (*code, e.to_string())
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn one_key_handed_off_by_many_at_once_has_exactly_one_winner() {
    const N: usize = 6;
    for store in TestStore::all() {
        let kind = store.kind;
        let hosts: Vec<SharedFencing> = (0..N).map(|i| store.host(&format!("h{i}"))).collect();
        let barrier = Barrier::new(N);
        let begun: Vec<_> = std::thread::scope(|s| {
            let threads: Vec<_> = hosts
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    let b = &barrier;
                    s.spawn(move || {
                        b.wait();
                        h.begin(&ids("vm1/dev0"), &[i as u8; 16])
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let winners: Vec<usize> = (0..N).filter(|i| begun[*i].is_ok()).collect();
        assert_eq!(
            winners.len(),
            1,
            "{kind}: begin winners {winners:?}: {begun:?}"
        );
        let w = winners[0];
        for (i, r) in begun.iter().enumerate().filter(|(i, _)| *i != w) {
            let e = r.as_ref().unwrap_err().to_string();
            // A loser either saw the winner's ownership or its claim, named.
            assert!(
                e.contains("vm1/dev0")
                    && (e.contains(&format!(
                        "is owned by h{w} at epoch 1; h{i} is not its owner"
                    )) || e.contains(&format!("claimed by h{w} (source)"))),
                "{kind}: h{i}: {e}"
            );
        }
        let handoff = begun.into_iter().nth(w).unwrap().unwrap();
        assert_eq!(handoff.epoch(), 1, "{kind}");

        // N destinations admit that handoff at once: one loads it, the others are refused
        // before touching their device.
        let src = mock(SPEC);
        let mut h = header(&src, handoff.epoch());
        h.session_id = [w as u8; 16];
        let dests: Vec<SharedFencing> = (0..N).map(|i| store.host(&format!("d{i}"))).collect();
        let admitted: Vec<_> = std::thread::scope(|s| {
            let threads: Vec<_> = dests
                .iter()
                .map(|d| {
                    let (b, h) = (&barrier, &h);
                    s.spawn(move || {
                        let mut f = d.destination(&ids("vm1/dev0")).unwrap();
                        b.wait();
                        f.admit(h).map(|a| (a, f))
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let loaders: Vec<usize> = (0..N).filter(|i| admitted[*i].is_ok()).collect();
        assert_eq!(loaders.len(), 1, "{kind}: admit winners {loaders:?}");
        let l = loaders[0];
        let mut fences: Vec<_> = admitted.into_iter().collect();
        for (i, r) in fences.iter_mut().enumerate().filter(|(i, _)| *i != l) {
            let e = r.as_ref().map(|_| ()).unwrap_err();
            assert!(
                matches!(
                    e,
                    vfio_mig_fence::Error::Refused {
                        code: ReasonCode::Busy,
                        ..
                    }
                ) && e.to_string().contains(&format!("is being loaded by d{l}")),
                "{kind}: d{i}: {e}"
            );
        }
        let (admission, mut fence) = fences.remove(l).unwrap();
        assert_eq!(admission, Admission::Accept);
        fence.complete(&h.session_id).unwrap();
        let record = dests[0].record("vm1/dev0").unwrap().unwrap();
        assert_eq!(
            (
                record.owner.as_str(),
                record.epoch,
                record.pending.is_none()
            ),
            (format!("d{l}").as_str(), 1, true),
            "{kind}"
        );
        drop(handoff);
    }
}

#[test]
fn a_zombie_source_is_refused_everywhere_and_a_retry_gets_the_recorded_outcome() {
    for store in TestStore::all() {
        let kind = store.kind;
        let (a, b, c, d) = (
            store.host("host-a"),
            store.host("host-b"),
            store.host("host-c"),
            store.host("host-d"),
        );
        let id = "vm2/gpu0";
        let (mut dev_a, mut dev_b, mut dev_c) = (mock(SPEC), mock(SPEC), mock(SPEC));
        let s1 = [0x51; 16];
        let (sent, recv) = hand_off(&a, &b, id, &mut dev_a, &mut dev_b, Some(s1));
        assert!(
            matches!(sent, Ok(SendOutcome::Completed(_))),
            "{kind}: {sent:?}"
        );
        assert!(
            matches!(recv, Ok(RecvOutcome::Resumed { .. })),
            "{kind}: {recv:?}"
        );
        assert!(handle(&dev_b).status().resumed_ok);

        // The source retries session 1 (its outcome was in doubt): host-b answers with the
        // recorded outcome and loads nothing; any other host refuses it.
        let retry = a.begin(&ids(id), &s1).unwrap();
        assert!(retry.is_retry() && retry.epoch() == 1, "{kind}");
        let mut h1 = header(&dev_a, 1);
        h1.session_id = s1;
        let mut dev_b2 = mock(SPEC);
        let mut fb = b.destination(&ids(id)).unwrap();
        let (sent, recv) = transfer(&mut dev_a, &mut dev_b2, &h1, &mut fb, &NoObserver);
        assert!(
            matches!(sent, Ok(SendOutcome::AlreadyCompleted)),
            "{kind}: {sent:?}"
        );
        assert!(
            matches!(recv, Ok(RecvOutcome::AlreadyCompleted { .. })),
            "{kind}"
        );
        assert!(untouched(&dev_b2), "{kind}: a retry was loaded again");
        let mut dev_d = mock(SPEC);
        let mut fd = d.destination(&ids(id)).unwrap();
        let (sent, _) = transfer(&mut dev_a, &mut dev_d, &h1, &mut fd, &NoObserver);
        let (code, e) = refused_text(sent);
        assert_eq!(code, ReasonCode::Fence, "{kind}: {e}");
        assert!(
            e.contains(
                "session 51515151515151515151515151515151 was completed by host-b at \
                        epoch 1: host-b runs that state, so host-d does not load it"
            ),
            "{kind}: {e}"
        );

        // The state moves on to host-c, at epoch 2.
        let (sent, _) = hand_off(&b, &c, id, &mut dev_b, &mut dev_c, None);
        assert!(
            matches!(sent, Ok(SendOutcome::Completed(_))),
            "{kind}: {sent:?}"
        );

        // host-a, a zombie, may not begin anything...
        let (code, e) = refused_text(a.begin(&ids(id), &[0x52; 16]));
        assert_eq!(code, ReasonCode::StaleEpoch, "{kind}: {e}");
        assert!(
            e.contains("vm2/gpu0 is owned by host-c at epoch 2; host-a is not its owner"),
            "{kind}: {e}"
        );
        // ...and whatever it sends to a host that never saw it, that host refuses before
        // touching its device: an older epoch, an epoch the store never granted.
        for (epoch, wanted) in [
            (1, "stale epoch 1 < 2 (owner host-c)"),
            (
                2,
                "at epoch 2 is not the handoff the store granted (pending: none; owner host-c)",
            ),
            (99, "at epoch 99 is not the handoff the store granted"),
        ] {
            let h = header(&dev_a, epoch);
            let (sent, recv) = transfer(&mut dev_a, &mut dev_d, &h, &mut fd, &NoObserver);
            let (_, e) = refused_text(sent);
            assert!(e.contains(wanted), "{kind}: epoch {epoch}: {e}");
            assert!(recv.is_err(), "{kind}");
        }
        assert!(
            untouched(&dev_d),
            "{kind}: a refused destination was touched"
        );
        let r = c.record(id).unwrap().unwrap();
        assert_eq!((r.owner.as_str(), r.epoch), ("host-c", 2), "{kind}");
        assert!(handle(&dev_c).status().resumed_ok, "{kind}");
    }
}

#[test]
fn a_claim_whose_lease_expires_frees_the_handoff() {
    let ttl = Duration::from_secs(2);
    for store in TestStore::all() {
        let kind = store.kind;
        let host = |name: &str| store.host(name).with_ttl(ttl);
        let (a, b, c) = (host("host-a"), host("host-b"), host("host-c"));
        let id = "vm3/nic0";
        let src = mock(SPEC);
        let mut h = header(&src, 0);
        let handoff = a.begin(&ids(id), &h.session_id).unwrap();
        h.epoch = handoff.epoch();

        // host-b admits the handoff, then dies: its lease is no longer renewed.
        let mut fb = b.destination(&ids(id)).unwrap();
        assert_eq!(fb.admit(&h).unwrap(), Admission::Accept);
        let mut fc = c.destination(&ids(id)).unwrap();
        let e = fc.admit(&h).unwrap_err().to_string();
        assert!(e.contains("is being loaded by host-b"), "{kind}: {e}");
        fb.lease_mut().unwrap().stop_keep_alive();
        let died = Instant::now();
        while a.claim(id).unwrap().is_some_and(|cl| cl.holder == "host-b") {
            assert!(
                died.elapsed() < ttl * 5,
                "{kind}: the claim outlived its lease"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let expired_after = died.elapsed();
        eprintln!(
            "{kind}: a dead destination's claim expired after {expired_after:?} (TTL {ttl:?})"
        );
        assert!(
            expired_after >= ttl / 2,
            "{kind}: expired after {expired_after:?}"
        );

        // host-c may load it now; host-b, if it comes back, cannot complete it.
        assert_eq!(fc.admit(&h).unwrap(), Admission::Accept, "{kind}");
        let e = fb.complete(&h.session_id).unwrap_err().to_string();
        assert!(
            e.contains("could not be recorded complete") && e.contains("the claim was lost"),
            "{kind}: {e}"
        );
        fc.complete(&h.session_id).unwrap();
        let r = a.record(id).unwrap().unwrap();
        assert_eq!(r.owner, "host-c", "{kind}");
        drop(handoff);

        // A source that died after beginning blocks a new handoff only while its claim lives.
        let id2 = "vm3/nic1";
        let mut stuck = c.begin(&ids(id2), &[1; 16]).unwrap();
        let (code, e) = refused_text(c.begin(&ids(id2), &[2; 16]));
        assert_eq!(code, ReasonCode::Busy, "{kind}: {e}");
        assert!(
            e.contains(
                "handoff 01010101010101010101010101010101 (epoch 1) is in flight, \
                        claimed by host-c (source)"
            ),
            "{kind}: {e}"
        );
        stuck.lease_mut().unwrap().stop_keep_alive();
        let died = Instant::now();
        let next = loop {
            match c.begin(&ids(id2), &[2; 16]) {
                Ok(h) => break h,
                Err(_) if died.elapsed() < ttl * 5 => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => panic!("{kind}: the source's claim outlived its lease: {e}"),
            }
        };
        assert_eq!(
            next.epoch(),
            2,
            "{kind}: epochs move forward past a dead handoff"
        );
    }
}

#[test]
fn an_unreachable_store_refuses_before_any_device_is_touched() {
    let mut stores: Vec<(
        &str,
        Arc<dyn vfio_mig_fence::FenceStore>,
        Option<EtcdCluster>,
    )> = Vec::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("file"), b"").unwrap();
    stores.push((
        "dir",
        Arc::new(DirStore::new(dir.path().join("file/store"))),
        None,
    ));
    if let Some(mut cluster) = EtcdCluster::start() {
        let store = cluster
            .store()
            .with_operation_timeout(Duration::from_secs(2));
        cluster.kill_all();
        stores.push(("etcd", Arc::new(store), Some(cluster)));
    }
    for (kind, store, _cluster) in stores {
        let a = SharedFencing::new(store.clone(), "host-a").unwrap();
        let b = SharedFencing::new(store.clone(), "host-b").unwrap();
        let (src, mut dst) = (mock(SPEC), mock(SPEC));
        let started = Instant::now();
        let (code, e) = refused_text(a.begin(&ids("vm4/dev"), &[4; 16]));
        eprintln!(
            "{kind}: unreachable store refused in {:?}: {e}",
            started.elapsed()
        );
        assert_eq!(code, ReasonCode::Fence, "{kind}");
        assert!(
            e.contains(&format!("fencing store {}", store.describe())),
            "{kind}: {e}"
        );
        if kind == "etcd" {
            assert!(
                e.contains("unreachable") && e.contains("no device was touched"),
                "{e}"
            );
            assert!(
                e.contains("Connection refused") || e.contains("refused"),
                "{e}"
            );
        }
        // A destination refuses the stream, its device untouched; the source is untouched.
        let mut src = src;
        let mut fb = b.destination(&ids("vm4/dev")).unwrap();
        let h = header(&src, 1);
        let (sent, recv) = transfer(&mut src, &mut dst, &h, &mut fb, &NoObserver);
        let (_, e) = refused_text(sent);
        assert!(e.contains("fencing store"), "{kind}: {e}");
        assert!(recv.is_err());
        assert!(untouched(&dst), "{kind}");
        let s = handle(&src).status();
        assert!(s.is_running() && s.bytes_saved == 0, "{kind}: {s:?}");
    }
}

/// An observer that runs `action` once, at the destination's first event (the load began:
/// the handoff was admitted and is not yet complete).
struct OnFirstEvent<F: Fn() + Sync> {
    fired: AtomicBool,
    action: F,
}

impl<F: Fn() + Sync> Observer for OnFirstEvent<F> {
    fn on_event(&self, _event: &Event) {
        if !self.fired.swap(true, Ordering::SeqCst) {
            (self.action)();
        }
    }
}

#[test]
fn an_etcd_member_killed_mid_handoff_completes_or_fails_cleanly_and_nothing_resumes_twice() {
    let Some(cluster) = EtcdCluster::start() else {
        return;
    };
    let leader = cluster.leader();
    let (url, security) = (cluster.url(), cluster.security());
    let cluster = Mutex::new(cluster);
    let host = |name: &str| {
        let store = EtcdStore::from_url(&url, &security).unwrap();
        SharedFencing::new(Arc::new(store), name).unwrap()
    };
    let (a, b) = (host("host-a"), host("host-b"));
    let id = "vm5/dev0";
    let (mut src, mut dst) = (mock(SPEC), mock(SPEC));
    let mut h = header(&src, 0);
    let handoff = a.begin(&ids(id), &h.session_id).unwrap();
    h.epoch = handoff.epoch();
    let mut fb = b.destination(&ids(id)).unwrap();
    let kill_leader = OnFirstEvent {
        fired: AtomicBool::new(false),
        action: || cluster.lock().unwrap().kill(leader),
    };
    let started = Instant::now();
    let (sent, recv) = transfer(&mut src, &mut dst, &h, &mut fb, &kill_leader);
    eprintln!(
        "handoff with the leader (m{leader}) killed mid-load: {:?} in {:?}",
        sent.as_ref().map(|_| ()),
        started.elapsed()
    );
    assert!(
        kill_leader.fired.load(Ordering::SeqCst),
        "the member was not killed"
    );
    let (s, d) = (handle(&src).status(), handle(&dst).status());
    // Exactly one device runs the state.
    assert!(
        s.is_running() != d.resumed_ok,
        "source {s:?} destination {d:?}: {sent:?} {recv:?}"
    );
    let record = a.record(id).unwrap().unwrap();
    if d.resumed_ok {
        assert!(matches!(sent, Ok(SendOutcome::Completed(_))), "{sent:?}");
        assert_eq!((record.owner.as_str(), record.epoch), ("host-b", h.epoch));
    } else {
        assert_destination_safe(&d, "member killed");
        assert_eq!(record.owner, "host-a");
    }
    // A retry of the session never loads it a second time.
    let mut dst2 = mock(SPEC);
    let mut fb2 = b.destination(&ids(id)).unwrap();
    let (sent, _) = transfer(&mut src, &mut dst2, &h, &mut fb2, &NoObserver);
    if d.resumed_ok {
        assert!(
            matches!(sent, Ok(SendOutcome::AlreadyCompleted)),
            "{sent:?}"
        );
        assert!(untouched(&dst2));
    }
    drop(handoff);
}

#[test]
fn the_whole_cluster_lost_mid_handoff_resets_the_destination_and_resumes_the_source() {
    let Some(cluster) = EtcdCluster::start() else {
        return;
    };
    let (url, security) = (cluster.url(), cluster.security());
    let cluster = Mutex::new(cluster);
    let host = |name: &str| {
        let store = EtcdStore::from_url(&url, &security)
            .unwrap()
            .with_operation_timeout(Duration::from_secs(2));
        SharedFencing::new(Arc::new(store), name).unwrap()
    };
    let (a, b) = (host("host-a"), host("host-b"));
    let id = "vm6/dev0";
    let (mut src, mut dst) = (mock(SPEC), mock(SPEC));
    let mut h = header(&src, 0);
    let handoff = a.begin(&ids(id), &h.session_id).unwrap();
    h.epoch = handoff.epoch();
    let mut fb = b.destination(&ids(id)).unwrap();
    let kill_all = OnFirstEvent {
        fired: AtomicBool::new(false),
        action: || cluster.lock().unwrap().kill_all(),
    };
    let (sent, recv) = transfer(&mut src, &mut dst, &h, &mut fb, &kill_all);
    let e = vfio_mig::error::Report(&recv.unwrap_err()).to_string();
    assert!(e.contains("unreachable"), "{e}");
    assert!(sent.is_err(), "{sent:?}");
    assert_destination_safe(&handle(&dst).status(), "cluster lost");
    assert!(
        handle(&src).status().is_running(),
        "the source must run again"
    );
    drop(handoff);
}

/// Defect 1 of issue 21: the completion commits in etcd, its answer is lost, and the store
/// stays unreachable for the destination. The destination cannot tell whether it completed:
/// it must answer neither FAILED (the source would run while the store names the destination
/// as owner) nor RESUMED, so the source ends in doubt and stays stopped (docs/fencing.md).
#[test]
fn a_completion_whose_answer_is_lost_leaves_the_source_stopped_in_doubt() {
    let Some(cluster) = EtcdCluster::start() else {
        return;
    };
    let security = cluster.security();
    let relays = LossyRelays::start(&cluster.client_endpoints());
    let a = SharedFencing::new(Arc::new(cluster.store()), "host-a").unwrap();
    // host-b reaches the cluster through the relays only.
    let through_relays = EtcdStore::new(relays.endpoints.clone(), &security)
        .unwrap()
        .with_operation_timeout(Duration::from_secs(2));
    let b = SharedFencing::new(Arc::new(through_relays), "host-b").unwrap();
    let id = "vm8/dev0";
    let (mut src, mut dst) = (mock(SPEC), mock(SPEC));
    let mut h = header(&src, 0);
    let handoff = a.begin(&ids(id), &h.session_id).unwrap();
    h.epoch = handoff.epoch();
    let mut fb = b.destination(&ids(id)).unwrap();
    // Admitted; from the load's first event on, every answer to host-b is lost.
    let lose = OnFirstEvent {
        fired: AtomicBool::new(false),
        action: || relays.lose_answers(),
    };
    let (sent, recv) = transfer(&mut src, &mut dst, &h, &mut fb, &lose);
    // The completion did commit: the store names host-b as the owner.
    let record = a.record(id).unwrap().unwrap();
    let hex = vfio_mig_fence::session_hex(&h.session_id);
    assert_eq!(
        record.completion(&hex).map(|c| c.by.as_str()),
        Some("host-b"),
        "the scenario needs the completion committed: {record:?}"
    );
    let (s, d) = (handle(&src).status(), handle(&dst).status());
    assert!(
        !s.is_running(),
        "the store names host-b as owner, so the source must stay stopped: {s:?}; {sent:?}"
    );
    assert!(matches!(sent, Err(Error::InDoubt { .. })), "{sent:?}");
    let e = vfio_mig::error::Report(&recv.unwrap_err()).to_string();
    assert!(e.contains("in doubt"), "the destination says so: {e}");
    // Not run on both sides, nor on the destination after a reset it cannot undo.
    assert!(!d.resumed_ok, "{d:?}");
    assert_destination_safe(&d, "completion in doubt");
    assert!(
        s.bytes_saved > 0 && s.resets == 0,
        "the source keeps the state: {s:?}"
    );
    drop(handoff);
}

/// Defect 2 of issue 21: the quorum stops answering before the completion. Whatever the
/// destination then answers must reach the source inside the source's wait for RESUMED, so
/// that both sides end with the same outcome: FAILED and the source runs again, or nothing
/// (in doubt on both sides). Never a FAILED the source no longer reads while it keeps its
/// device stopped in doubt, the destination reset: the state running nowhere with a source
/// that was told to run it.
#[test]
fn a_frozen_quorum_before_completion_ends_both_sides_with_one_outcome() {
    let Some(cluster) = EtcdCluster::start() else {
        return;
    };
    let (url, security) = (cluster.url(), cluster.security());
    let fence_timeout = Duration::from_secs(2);
    let host = |name: &str| {
        let store = EtcdStore::from_url(&url, &security)
            .unwrap()
            .with_operation_timeout(fence_timeout);
        SharedFencing::new(Arc::new(store), name).unwrap()
    };
    let (a, b) = (host("host-a"), host("host-b"));
    let id = "vm9/dev0";
    let (mut src, mut dst) = (mock(SPEC), mock(SPEC));
    let mut h = header(&src, 0);
    let handoff = a.begin(&ids(id), &h.session_id).unwrap();
    h.epoch = handoff.epoch();
    let mut fb = b.destination(&ids(id)).unwrap();
    let cluster = Mutex::new(cluster);
    let freeze = OnFirstEvent {
        fired: AtomicBool::new(false),
        action: || {
            let mut c = cluster.lock().unwrap();
            (0..3).for_each(|i| c.freeze(i, true));
        },
    };
    // The source waits for the destination's answer as `send` does with these settings.
    let wait = vfio_mig_fence::source_answer_wait(Duration::from_secs(3), fence_timeout, 1);
    let (mut a_conn, b_conn) = Connection::pair().unwrap();
    a_conn.set_timeout(Some(wait)).unwrap();
    let mut s: [&mut dyn MigrationDevice; 1] = [src.opened.device.as_mut()];
    let mut d: [&mut dyn MigrationDevice; 1] = [dst.opened.device.as_mut()];
    let (sent, recv) = std::thread::scope(|sc| {
        let sent = sc.spawn(|| send(&mut s, a_conn, &h, &opts(), &NoObserver));
        let received = sc.spawn(|| receive(&mut d, b_conn, &mut fb, &freeze));
        (sent.join().unwrap(), received.join().unwrap())
    });
    {
        let mut c = cluster.lock().unwrap();
        (0..3).for_each(|i| c.freeze(i, false));
    }
    let (s, d) = (handle(&src).status(), handle(&dst).status());
    assert_destination_safe(&d, "quorum frozen");
    match (&sent, &recv) {
        (Err(Error::InDoubt { .. }), Err(Error::InDoubt { .. })) => {
            assert!(!s.is_running(), "in doubt: the source stays stopped: {s:?}")
        }
        (Err(Error::InDoubt { .. }), Err(e)) => panic!(
            "the source gave up after {wait:?} and stays stopped, while the destination \
             answered: {}",
            vfio_mig::error::Report(e)
        ),
        (Err(_), Err(e)) if !matches!(e, Error::InDoubt { .. }) => {
            assert!(s.is_running(), "told FAILED, the source runs again: {s:?}")
        }
        other => panic!("the two sides disagree: {other:?}"),
    }
    drop(handoff);
}
