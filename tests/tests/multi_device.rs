// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Several devices migrated as one unit: mixed protocols in one stream, the P2P order (every
//! device quiesced before any stops), parallel save and load, and one failing device rolling
//! back all of them.

use std::sync::{Arc, Mutex};

use vfio_mig::device::DeviceIdentity;
use vfio_mig::engine::session::new_header;
use vfio_mig::engine::{
    Capabilities, MigrationDevice, NoObserver, Pending, PreCopyPolicy, Protocol, ReadOutcome,
    Recovery, SaveOptions,
};
use vfio_mig::fence::MemoryFence;
use vfio_mig::handshake::migrate_pairs;
use vfio_mig::Result;
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
) -> Result<Vec<vfio_mig::handshake::MigrateReport>> {
    let mut s: Vec<&mut dyn MigrationDevice> =
        srcs.iter_mut().map(|d| d.device.as_mut() as _).collect();
    let mut d: Vec<&mut dyn MigrationDevice> =
        dsts.iter_mut().map(|d| d.device.as_mut() as _).collect();
    let header = new_header(&s.iter().map(|x| &**x).collect::<Vec<_>>(), live, 1)?;
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

/// A device that records the engine's calls in a log shared by all devices.
struct Logged {
    name: &'static str,
    inner: Box<dyn MigrationDevice>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Logged {
    fn note(&mut self, what: &str) {
        let state = self.inner.state_name().unwrap_or_default();
        self.log
            .lock()
            .unwrap()
            .push(format!("{} {what} -> {state}", self.name));
    }
}

impl MigrationDevice for Logged {
    fn identity(&self) -> DeviceIdentity {
        self.inner.identity()
    }
    fn protocol(&self) -> Protocol {
        self.inner.protocol()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn state_name(&mut self) -> Result<String> {
        self.inner.state_name()
    }
    fn details(&mut self) -> Result<Vec<(String, String)>> {
        self.inner.details()
    }
    fn quiesce(&mut self) -> Result<()> {
        self.inner.quiesce()?;
        self.note("quiesce");
        Ok(())
    }
    fn stop(&mut self) -> Result<()> {
        self.inner.stop()
    }
    fn run(&mut self) -> Result<()> {
        self.inner.run()
    }
    fn start_pre_copy(&mut self) -> Result<()> {
        self.inner.start_pre_copy()
    }
    fn start_stop_copy(&mut self) -> Result<()> {
        self.note("stop-copy requested");
        self.inner.start_stop_copy()
    }
    fn pending(&mut self) -> Result<Pending> {
        self.inner.pending()
    }
    fn read(&mut self, buf: &mut [u8]) -> Result<ReadOutcome> {
        self.inner.read(buf)
    }
    fn finish_save(&mut self) -> Result<()> {
        self.inner.finish_save()
    }
    fn finish_handoff(&mut self) -> Result<()> {
        self.inner.finish_handoff()
    }
    fn start_resume(&mut self) -> Result<()> {
        self.inner.start_resume()
    }
    fn write(&mut self, data: &[u8], chunk_end: bool) -> Result<()> {
        self.inner.write(data, chunk_end)
    }
    fn load_state(&mut self) -> Result<()> {
        self.inner.load_state()
    }
    fn prepare_run(&mut self) -> Result<()> {
        self.inner.prepare_run()
    }
    fn finish_resume(&mut self) -> Result<()> {
        self.inner.finish_resume()
    }
    fn recover(&mut self) -> Recovery {
        self.inner.recover()
    }
    fn abort_resume(&mut self) -> Recovery {
        self.inner.abort_resume()
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
            .map(|(i, name)| Logged {
                name,
                inner: mock(&format!("mock:v2,size=2M,seed={i}")).opened.device,
                log: log.clone(),
            })
            .collect();
        let dst_handles: Vec<_> = (0..3)
            .map(|i| mock(&format!("mock:v2,size=2M,seed={i}")))
            .collect();
        let mut dsts = dst_handles;
        let mut s: Vec<&mut dyn MigrationDevice> = srcs.iter_mut().map(|d| d as _).collect();
        let mut d: Vec<&mut dyn MigrationDevice> =
            dsts.iter_mut().map(|d| d.device.as_mut() as _).collect();
        let header = new_header(&s.iter().map(|x| &**x).collect::<Vec<_>>(), live, 1).unwrap();
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
