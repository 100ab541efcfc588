// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Several devices migrated as one unit: mixed protocols in one stream, the P2P order (every
//! device quiesced before any stops), parallel save and load, and one failing device rolling
//! back all of them.

use std::sync::{Arc, Mutex};

use vfio_mig::wire::StreamHeader;
use vfio_mig::Result;
use vfio_mig::{MigrationDevice, NoObserver, PreCopyPolicy, SaveOptions};
use vfio_mig_fence::MemoryFence;
use vfio_mig_session::handshake::migrate_pairs;
use vfio_mig_tests::wrap::{Call, Hooks, Wrapped};
use vfio_mig_tests::{assert_destination_safe, assert_source_running, handle, mock, MockDevice};

/// These units mix v1 devices (no P2P states) in: they need the explicit opt-in.
fn opts(live: bool) -> SaveOptions {
    SaveOptions {
        live,
        policy: PreCopyPolicy::default(),
        buffer: 64 << 10,
        allow_non_p2p_unit: true,
        ..SaveOptions::default()
    }
}

fn run(
    srcs: &mut [MockDevice],
    dsts: &mut [MockDevice],
    live: bool,
) -> vfio_mig_session::Result<Vec<vfio_mig_session::handshake::MigrateReport>> {
    let mut s: Vec<&mut dyn MigrationDevice> =
        srcs.iter_mut().map(|d| d.device.as_mut() as _).collect();
    let mut d: Vec<&mut dyn MigrationDevice> =
        dsts.iter_mut().map(|d| d.device.as_mut() as _).collect();
    let header = StreamHeader::new(&s.iter().map(|x| &**x).collect::<Vec<_>>(), live, 1)?;
    migrate_pairs(
        &mut s,
        &mut d,
        &header,
        &opts(live),
        &mut MemoryFence::new(),
        &NoObserver,
        &NoObserver,
    )
}

const SPECS: [&str; 3] = [
    "mock:v1,size=3M,seed=1,chunk=64K,data=trapped,dirty-rate=8M",
    "mock:v2,size=5M,seed=2,dirty-rate=8M",
    "mock:v1,size=2M,seed=3,chunk=128K,data=mmap",
];

#[test]
fn mixed_v1_and_v2_devices_migrate_as_one_unit() {
    for live in [false, true] {
        let mut srcs: Vec<_> = SPECS.iter().map(|s| mock(s)).collect();
        let mut dsts: Vec<_> = SPECS.iter().map(|s| mock(s)).collect();
        let reports = run(&mut srcs, &mut dsts, live).unwrap();
        assert_eq!(reports.len(), 3);
        for (i, (s, d)) in srcs.iter().zip(&dsts).enumerate() {
            assert!(handle(d).status().resumed_ok, "device {i} live={live}");
            assert_eq!(
                handle(s).state_digest(),
                handle(d).state_digest(),
                "device {i}"
            );
            assert_eq!(reports[i].save.switch_reason.is_some(), live);
            assert_eq!(reports[i].load.chunks, reports[i].save.chunks, "device {i}");
        }
    }
}

#[test]
fn one_failing_device_rolls_back_every_device() {
    for (failing, fault) in [
        (0, "fail-at=pending@9"),
        (1, "fail-at=data-read@3"),
        (2, "fail-at=data-size-write@4"),
    ] {
        for live in [false, true] {
            let mut srcs: Vec<_> = SPECS
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    if i == failing && !fault.contains("write") {
                        mock(&format!("{s},{fault}"))
                    } else {
                        mock(s)
                    }
                })
                .collect();
            let mut dsts: Vec<_> = SPECS
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    if i == failing && fault.contains("write") {
                        mock(&format!("{s},{fault}"))
                    } else {
                        mock(s)
                    }
                })
                .collect();
            let err = run(&mut srcs, &mut dsts, live).unwrap_err();
            let context = format!("device {failing} {fault} live={live}: {err}");
            for s in &srcs {
                assert_source_running(&handle(s).status(), &context);
            }
            for d in &dsts {
                assert_destination_safe(&handle(d).status(), &context);
            }
            assert!(
                !vfio_mig::error::Report(&err).to_string().contains('\n'),
                "{context}"
            );
        }
    }
}

/// A device that records the engine's calls in a log shared by all devices; with a
/// rendezvous, each of its unit transitions first waits there for the other devices' same
/// transition.
type Logged = Wrapped<Logging>;

/// The hooks of a [`Logged`] device.
struct Logging {
    name: &'static str,
    log: Arc<Mutex<Vec<String>>>,
    rendezvous: Option<Arc<Rendezvous>>,
}

/// Where the devices of a unit meet: `arrive(step)` returns once every device has arrived at
/// `step`, true then; false if they did not all arrive within a generous bound (a unit that
/// issues the step one device after another never gets them all there: this is how the test
/// fails instead of hanging, not a timing).
struct Rendezvous {
    devices: usize,
    arrived: Mutex<std::collections::HashMap<&'static str, usize>>,
    all_there: std::sync::Condvar,
}

impl Rendezvous {
    fn new(devices: usize) -> Self {
        Rendezvous {
            devices,
            arrived: Mutex::new(Default::default()),
            all_there: std::sync::Condvar::new(),
        }
    }

    fn arrive(&self, step: &'static str) -> bool {
        let mut arrived = self.arrived.lock().unwrap();
        *arrived.entry(step).or_default() += 1;
        self.all_there.notify_all();
        let (arrived, timeout) = self
            .all_there
            .wait_timeout_while(arrived, std::time::Duration::from_secs(5), |a| {
                a[step] < self.devices
            })
            .unwrap();
        drop(arrived);
        !timeout.timed_out()
    }
}

impl Logging {
    /// Meets the other devices at `step` (with a rendezvous) and logs whether all came.
    fn meet(&mut self, step: &'static str) {
        if let Some(r) = self.rendezvous.clone() {
            let together = r.arrive(step);
            self.log.lock().unwrap().push(format!(
                "{} meet:{step} {}",
                self.name,
                if together { "together" } else { "ALONE" }
            ));
        }
    }

    fn note(&mut self, dev: &mut dyn MigrationDevice, what: &str) {
        let state = dev.state_name().unwrap_or_default();
        self.log
            .lock()
            .unwrap()
            .push(format!("{} {what} -> {state}", self.name));
    }
}

impl Hooks for Logging {
    fn before(&mut self, dev: &mut dyn MigrationDevice, call: Call) -> Result<()> {
        match call {
            Call::Quiesce => self.meet("quiesce"),
            Call::StartStopCopy => {
                self.note(dev, "stop-copy requested");
                self.meet("stop-copy");
            }
            Call::LoadState => self.meet("load-state"),
            Call::PrepareRun => {
                self.meet("prepare-run");
                self.note(dev, "prepared");
            }
            Call::FinishResume => self.note(dev, "run requested"),
            Call::FinishHandoff => self.meet("handoff-stop"),
            _ => {}
        }
        Ok(())
    }

    fn after(&mut self, dev: &mut dyn MigrationDevice, call: Call, ok: bool) {
        match call {
            Call::Quiesce if ok => self.note(dev, "quiesce"),
            Call::FinishResume => self.note(dev, "ran"),
            _ => {}
        }
    }
}

#[test]
fn every_device_is_quiesced_before_any_stops() {
    for live in [false, true] {
        let log = Arc::new(Mutex::new(Vec::new()));
        let names = ["a", "b", "c"];
        let mut srcs: Vec<Logged> = names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let inner = mock(&format!("mock:v2,size=2M,seed={i}")).opened.device;
                let hooks = Logging {
                    name,
                    log: log.clone(),
                    rendezvous: None,
                };
                Wrapped::new(inner, hooks)
            })
            .collect();
        let dst_handles: Vec<_> = (0..3)
            .map(|i| mock(&format!("mock:v2,size=2M,seed={i}")))
            .collect();
        let mut dsts = dst_handles;
        let mut s: Vec<&mut dyn MigrationDevice> = srcs.iter_mut().map(|d| d as _).collect();
        let mut d: Vec<&mut dyn MigrationDevice> =
            dsts.iter_mut().map(|d| d.device.as_mut() as _).collect();
        let header =
            StreamHeader::new(&s.iter().map(|x| &**x).collect::<Vec<_>>(), live, 1).unwrap();
        migrate_pairs(
            &mut s,
            &mut d,
            &header,
            &opts(live),
            &mut MemoryFence::new(),
            &NoObserver,
            &NoObserver,
        )
        .unwrap();
        let log = log.lock().unwrap().clone();
        let first_stop = log
            .iter()
            .position(|l| l.contains("stop-copy requested"))
            .expect("stop-copy happened");
        let quiesced: Vec<&String> = log[..first_stop]
            .iter()
            .filter(|l| l.contains("quiesce"))
            .collect();
        assert_eq!(
            quiesced.len(),
            3,
            "all quiesced before the first stop: {log:?}"
        );
        let p2p = if live { "PRE_COPY_P2P" } else { "RUNNING_P2P" };
        assert!(quiesced.iter().all(|l| l.ends_with(p2p)), "{log:?}");
        for dst in &dsts {
            assert!(handle(dst).status().resumed_ok);
        }
    }
}

/// The unit's transitions run on every device at once, in the P2P order: with a firmware
/// latency on every state change (the mock's `latency=`), quiescing, entering stop-and-copy,
/// the STOP after the handoff, and on the destination taking the state and RUNNING_P2P are
/// each issued to all devices together (every device reaches the rendezvous before any
/// transition of that step goes to the kernel), and no device stops before all are quiesced,
/// none runs before all are prepared. RUNNING goes to one device after another (the point of
/// no return: docs/engine.md), each only once the previous one runs.
#[test]
fn the_unit_transitions_overlap_in_the_p2p_order() {
    for live in [false, true] {
        let log = Arc::new(Mutex::new(Vec::new()));
        let names = ["a", "b", "c", "d"];
        let unit = |side: &str| -> (Vec<Logged>, Vec<vfio_mig_mock::MockHandle>) {
            let rendezvous = Arc::new(Rendezvous::new(names.len()));
            names
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    let m = mock(&format!("mock:v2,size=1M,seed={i},latency=20ms"));
                    let h = handle(&m);
                    let hooks = Logging {
                        name: if side == "src" {
                            name
                        } else {
                            ["A", "B", "C", "D"][i]
                        },
                        log: log.clone(),
                        rendezvous: Some(rendezvous.clone()),
                    };
                    let dev = Wrapped::new(m.opened.device, hooks);
                    (dev, h)
                })
                .unzip()
        };
        let (mut srcs, src_handles) = unit("src");
        let (mut dsts, dst_handles) = unit("dst");
        let mut s: Vec<&mut dyn MigrationDevice> = srcs.iter_mut().map(|d| d as _).collect();
        let mut d: Vec<&mut dyn MigrationDevice> = dsts.iter_mut().map(|d| d as _).collect();
        let header =
            StreamHeader::new(&s.iter().map(|x| &**x).collect::<Vec<_>>(), live, 1).unwrap();
        let reports = migrate_pairs(
            &mut s,
            &mut d,
            &header,
            &SaveOptions {
                live,
                ..SaveOptions::default()
            },
            &mut MemoryFence::new(),
            &NoObserver,
            &NoObserver,
        )
        .unwrap();
        assert!(reports.iter().all(|r| r.save.after_handoff.is_none()));
        let log = log.lock().unwrap().clone();
        for step in [
            "quiesce",
            "stop-copy",
            "handoff-stop",
            "load-state",
            "prepare-run",
        ] {
            let met: Vec<&String> = log
                .iter()
                .filter(|l| l.contains(&format!(" meet:{step} ")))
                .collect();
            assert_eq!(met.len(), names.len(), "{step}: {log:?}");
            assert!(
                met.iter().all(|l| l.ends_with("together")),
                "live={live}: {step} issued one device after another: {log:?}"
            );
        }
        let last = |what: &str| log.iter().rposition(|l| l.contains(what)).expect(what);
        let first = |what: &str| log.iter().position(|l| l.contains(what)).expect(what);
        assert!(
            last("quiesce ->") < first("stop-copy requested"),
            "a device stopped before every device was quiesced: {log:?}"
        );
        let runs: Vec<&String> = log
            .iter()
            .filter(|l| l.contains("run requested") || l.contains(" ran ->"))
            .collect();
        assert!(
            runs.chunks(2).all(|p| p.len() == 2
                && p[0].contains("run requested")
                && p[1].contains(" ran ->")),
            "RUNNING was issued to a device before the previous one ran: {runs:?}"
        );
        assert!(
            last("prepared") < first("run requested"),
            "a device ran before every device was prepared: {log:?}"
        );
        for (s, d) in src_handles.iter().zip(&dst_handles) {
            assert!(d.status().resumed_ok, "{log:?}");
            assert_eq!(s.state_digest(), d.state_digest());
        }
    }
}
