// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A VFIO device behind Cloud Hypervisor's own migration traits, over vfio-mig.
//!
//! `vm_migration` below re-declares what Cloud Hypervisor's `vm-migration` crate
//! (vm-migration/src/lib.rs and protocol.rs, cloud-hypervisor HEAD `ae44c2971c83`) gives its
//! devices, with the same signatures: `Pausable`, `Snapshottable`, `Transportable`,
//! `Migratable` (every method with its default body), `MigratableError`, `Snapshot` /
//! `SnapshotData`, and `protocol::MemoryRangeTable`. `VfioMigration` implements them over
//! vfio-mig the way a `VfioPciDevice` would, and `main` plays Cloud Hypervisor's source flow
//! (`Vmm::send_migration`: start_migration, start_dirty_log, dirty_log per memory iteration,
//! pause, snapshot, complete, stop_dirty_log, complete_migration) against a mock device,
//! with a destination thread loading the device's stream.
//!
//! What changes against Cloud Hypervisor's own VFIO code (docs/embedding.md has the side by
//! side): the device is pre-copied while the guest runs (one round per memory iteration),
//! `pause()` quiesces every device into RUNNING_P2P before any of them stops, the device
//! state travels as a checksummed stream on its own connection instead of a base64 blob in
//! the snapshot JSON, `MIG_DATA_SIZE` is reported for the downtime estimate, and a failure
//! returns the device to RUNNING (or resets it) with the error chain intact.
//!
//! Run: `cargo run -p vmm-glue --example cloud_hypervisor [MOCK-SPEC]`.

use std::os::unix::net::UnixStream;
use std::sync::Arc;

use vfio_mig::{Epoch, Handback, MigrationDevice, Source, SourceOptions};
use vmm_glue::dirty::{DirtyTracker, DmaLogging, MemoryRange as GlueRange};

/// Cloud Hypervisor's `vm-migration`, re-declared (the parts a VFIO device uses).
#[allow(dead_code)]
mod vm_migration {
    use std::collections::BTreeMap;
    use std::{io, result};

    use anyhow::anyhow;
    use serde::{Deserialize, Serialize};
    use thiserror::Error;

    pub mod protocol {
        use serde::{Deserialize, Serialize};

        /// `vm_migration::protocol::MemoryRange`.
        #[repr(C)]
        #[derive(Copy, Clone, Default, Debug, PartialEq, Eq, Serialize, Deserialize)]
        pub struct MemoryRange {
            pub gpa: u64,
            pub length: u64,
        }

        /// `vm_migration::protocol::MemoryRangeTable`.
        #[derive(Clone, Default, Debug, Serialize, Deserialize)]
        pub struct MemoryRangeTable {
            data: Vec<MemoryRange>,
        }

        impl MemoryRangeTable {
            pub fn ranges(&self) -> &[MemoryRange] {
                &self.data
            }

            pub fn regions(&self) -> &[MemoryRange] {
                &self.data
            }

            pub fn push(&mut self, range: MemoryRange) {
                self.data.push(range)
            }

            pub fn extend(&mut self, table: Self) {
                self.data.extend(table.data)
            }

            pub fn is_empty(&self) -> bool {
                self.data.is_empty()
            }

            pub fn new_from_tables(tables: Vec<Self>) -> Self {
                let data = tables.into_iter().flat_map(|t| t.data).collect();
                Self { data }
            }

            /// Bit `n` of the bitmap is page `start_addr + n * page_size`; runs of set bits
            /// become one range.
            pub fn from_dirty_bitmap(
                bitmap: impl IntoIterator<Item = u64>,
                start_addr: u64,
                page_size: u64,
            ) -> Self {
                let mut table = Self::default();
                let mut run: Option<(u64, u64)> = None;
                for (w, word) in bitmap.into_iter().enumerate() {
                    for b in 0..64 {
                        let page = w as u64 * 64 + b;
                        if word & (1 << b) != 0 {
                            run = match run {
                                Some((s, n)) if s + n == page => Some((s, n + 1)),
                                Some((s, n)) => {
                                    table.push(range(start_addr, page_size, s, n));
                                    Some((page, 1))
                                }
                                None => Some((page, 1)),
                            };
                        }
                    }
                }
                if let Some((s, n)) = run {
                    table.push(range(start_addr, page_size, s, n));
                }
                table
            }

            /// The sum of the ranges' lengths.
            pub fn effective_size(&self) -> u64 {
                self.data.iter().map(|r| r.length).sum()
            }
        }

        fn range(start: u64, page: u64, first: u64, pages: u64) -> MemoryRange {
            MemoryRange {
                gpa: start + first * page,
                length: pages * page,
            }
        }
    }

    use protocol::MemoryRangeTable;

    /// Stands in for `vm_migration::UffdError` (userfaultfd restore, not used by VFIO).
    #[derive(Error, Debug)]
    #[error("userfaultfd error")]
    pub struct UffdError;

    pub mod tls {
        /// Stands in for `vm_migration::tls::TlsError` (not used by VFIO).
        #[derive(thiserror::Error, Debug)]
        #[error("TLS error")]
        pub struct TlsError;
    }

    /// `vm_migration::MigratableError`, variant for variant.
    #[derive(Error, Debug)]
    pub enum MigratableError {
        #[error("Failed to pause migratable component")]
        Pause(#[source] anyhow::Error),
        #[error("Failed to resume migratable component")]
        Resume(#[source] anyhow::Error),
        #[error("Failed to snapshot migratable component")]
        Snapshot(#[source] anyhow::Error),
        #[error("Failed to restore migratable component")]
        Restore(#[source] anyhow::Error),
        #[error("Failed to send migratable component snapshot")]
        MigrateSend(#[source] anyhow::Error),
        #[error("Failed to receive migratable component snapshot")]
        MigrateReceive(#[source] anyhow::Error),
        #[error("On-demand restore failed")]
        OnDemandRestore(#[source] UffdError),
        #[error("Socket error")]
        MigrateSocket(#[source] io::Error),
        #[error("Failed to start migration for migratable component")]
        StartDirtyLog(#[source] anyhow::Error),
        #[error("Failed to stop migration for migratable component")]
        StopDirtyLog(#[source] anyhow::Error),
        #[error("Failed to retrieve dirty ranges for migratable component")]
        DirtyLog(#[source] anyhow::Error),
        #[error("Failed to start migration for migratable component")]
        StartMigration(#[source] anyhow::Error),
        #[error("Failed to complete migration for migratable component")]
        CompleteMigration(#[source] anyhow::Error),
        #[error("Failed to release a disk lock")]
        UnlockError(#[source] anyhow::Error),
        #[error("Lifecycle operation skipped for disconnected component {0}")]
        DeviceDisconnected(String),
        #[error("Error setting up a TLS-encrypted connection")]
        Tls(#[source] tls::TlsError),
    }

    /// `vm_migration::SnapshotData`: the state as a JSON string.
    #[derive(Clone, Default, Deserialize, Serialize)]
    pub struct SnapshotData {
        state: String,
    }

    impl SnapshotData {
        pub fn to_state<'a, T>(&'a self) -> Result<T, MigratableError>
        where
            T: Deserialize<'a>,
        {
            serde_json::from_str(&self.state)
                .map_err(|e| MigratableError::Restore(anyhow!("Error deserialising: {e}")))
        }

        pub fn new_from_state<T>(state: &T) -> Result<Self, MigratableError>
        where
            T: Serialize,
        {
            let state = serde_json::to_string(state)
                .map_err(|e| MigratableError::Snapshot(anyhow!("Error serialising: {e}")))?;
            Ok(SnapshotData { state })
        }
    }

    /// `vm_migration::Snapshot`.
    #[derive(Clone, Default, Deserialize, Serialize)]
    pub struct Snapshot {
        pub snapshots: BTreeMap<String, Snapshot>,
        pub snapshot_data: Option<SnapshotData>,
    }

    impl Snapshot {
        pub fn from_data(data: SnapshotData) -> Self {
            Snapshot {
                snapshot_data: Some(data),
                ..Default::default()
            }
        }

        pub fn new_from_state<T>(state: &T) -> Result<Self, MigratableError>
        where
            T: Serialize,
        {
            Ok(Snapshot::from_data(SnapshotData::new_from_state(state)?))
        }

        pub fn add_snapshot(&mut self, id: String, snapshot: Snapshot) {
            self.snapshots.insert(id, snapshot);
        }

        pub fn to_state<'a, T>(&'a self) -> Result<T, MigratableError>
        where
            T: Deserialize<'a>,
        {
            self.snapshot_data
                .as_ref()
                .ok_or_else(|| MigratableError::Restore(anyhow!("Missing snapshot data")))?
                .to_state()
        }
    }

    /// A Pausable component can be paused and resumed.
    pub trait Pausable {
        fn pause(&mut self) -> result::Result<(), MigratableError> {
            Ok(())
        }
        fn resume(&mut self) -> result::Result<(), MigratableError> {
            Ok(())
        }
    }

    pub trait Snapshottable: Pausable {
        fn id(&self) -> String {
            String::new()
        }
        fn snapshot(&mut self) -> result::Result<Snapshot, MigratableError> {
            Ok(Snapshot::default())
        }
    }

    pub trait Transportable: Pausable + Snapshottable {
        fn send(
            &self,
            _snapshot: &Snapshot,
            _destination_url: &str,
        ) -> result::Result<(), MigratableError> {
            Ok(())
        }
        fn recv(&self, _source_url: &str) -> result::Result<Snapshot, MigratableError> {
            Ok(Snapshot::default())
        }
    }

    pub trait Migratable: Send + Pausable + Snapshottable + Transportable {
        fn start_dirty_log(&mut self) -> result::Result<(), MigratableError> {
            Ok(())
        }
        fn stop_dirty_log(&mut self) -> result::Result<(), MigratableError> {
            Ok(())
        }
        fn dirty_log(&mut self) -> result::Result<MemoryRangeTable, MigratableError> {
            Ok(MemoryRangeTable::default())
        }
        fn start_migration(&mut self) -> result::Result<(), MigratableError> {
            Ok(())
        }
        fn complete_migration(&mut self) -> result::Result<(), MigratableError> {
            Ok(())
        }
    }
}

use vm_migration::protocol::{MemoryRange, MemoryRangeTable};
use vm_migration::{Migratable, MigratableError, Pausable, Snapshot, Snapshottable, Transportable};

/// The snapshot id of the device's migration record (Cloud Hypervisor: `vfio_migration`).
const VFIO_MIGRATION_ID: &str = "vfio_migration";

/// What the snapshot carries for a live-migrated device: not the state itself (that went on
/// the device's stream, checksummed), but what the destination checks it against.
#[derive(serde::Serialize, serde::Deserialize)]
struct VfioMigrationRecord {
    /// The device's model, as the stream header has it.
    model: String,
    /// Pre-copy bytes sent while the guest ran.
    pre_copy_bytes: u64,
}

/// Where the device is.
enum Phase {
    Idle(Box<dyn MigrationDevice>),
    /// `start_migration` ran: vfio-mig's front door owns the device.
    Migrating(Source<Box<dyn MigrationDevice>>),
    /// The migration completed (the device is stopped) or failed (it is back in the state it
    /// had when the migration began).
    Done(Vec<Box<dyn MigrationDevice>>),
    Moving,
}

/// A VFIO device as Cloud Hypervisor's `VfioPciDevice` would present it, over vfio-mig.
struct VfioMigration {
    id: String,
    phase: Phase,
    /// The connection the device stream goes on (the VMM opens it next to its own).
    stream: Option<UnixStream>,
    dirty: DmaLogging,
    guest: Vec<MemoryRange>,
    page_size: u64,
    dirty_logging: bool,
    pre_copy_bytes: u64,
}

fn error(e: vfio_mig::Error) -> anyhow::Error {
    anyhow::Error::new(e)
}

impl VfioMigration {
    fn device(&mut self) -> Option<&mut dyn MigrationDevice> {
        match &mut self.phase {
            Phase::Idle(d) => Some(d.as_mut()),
            Phase::Migrating(s) => s
                .devices()
                .next()
                .map(|d| d.as_mut() as &mut dyn MigrationDevice),
            Phase::Done(d) => d.first_mut().map(|d| &mut **d as &mut dyn MigrationDevice),
            Phase::Moving => None,
        }
    }

    /// After a failure the front door rolled the device back; keep it.
    fn end(&mut self) {
        if let Phase::Migrating(s) = std::mem::replace(&mut self.phase, Phase::Moving) {
            self.phase = Phase::Done(s.into_devices());
        }
    }
}

impl Pausable for VfioMigration {
    /// Cloud Hypervisor pauses the vCPUs, then every device: during a migration this is the
    /// P2P quiesce (RUNNING_P2P / PRE_COPY_P2P) that must reach every device before any of
    /// them stops; outside one, the device stops.
    fn pause(&mut self) -> Result<(), MigratableError> {
        let migrating = matches!(self.phase, Phase::Migrating(_));
        let dev = self
            .device()
            .ok_or_else(|| MigratableError::Pause(anyhow::anyhow!("no device")))?;
        let r = if migrating { dev.quiesce() } else { dev.stop() };
        r.map_err(|e| MigratableError::Pause(error(e)))
    }

    fn resume(&mut self) -> Result<(), MigratableError> {
        let dev = self
            .device()
            .ok_or_else(|| MigratableError::Resume(anyhow::anyhow!("no device")))?;
        dev.run().map_err(|e| MigratableError::Resume(error(e)))
    }
}

impl Snapshottable for VfioMigration {
    fn id(&self) -> String {
        self.id.clone()
    }

    /// In a live migration (after `pause`): the switch-over through vfio-mig, the rest of the
    /// state on the device stream; the device stays in STOP_COPY, so the VMM's last dirty-log
    /// read still sees its DMA writes, until `complete_migration`. The snapshot records what
    /// the destination checks.
    fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
        let Phase::Migrating(source) = &mut self.phase else {
            return Err(MigratableError::Snapshot(anyhow::anyhow!(
                "this example snapshots during a live migration only"
            )));
        };
        let model = source
            .devices()
            .next()
            .map(|d| d.identity().model)
            .unwrap_or_default();
        let stream = self
            .stream
            .as_mut()
            .ok_or_else(|| MigratableError::Snapshot(anyhow::anyhow!("no device stream")))?;
        if let Err(e) = source.switch_over(stream) {
            self.end();
            return Err(MigratableError::Snapshot(error(e)));
        }
        let mut snapshot = Snapshot::default();
        snapshot.add_snapshot(
            VFIO_MIGRATION_ID.into(),
            Snapshot::new_from_state(&VfioMigrationRecord {
                model,
                pre_copy_bytes: self.pre_copy_bytes,
            })?,
        );
        Ok(snapshot)
    }
}

/// As in Cloud Hypervisor, the device has no transport of its own in these traits.
impl Transportable for VfioMigration {}

impl Migratable for VfioMigration {
    fn start_dirty_log(&mut self) -> Result<(), MigratableError> {
        let ranges: Vec<GlueRange> = self
            .guest
            .iter()
            .map(|r| GlueRange {
                gpa: r.gpa,
                length: r.length,
            })
            .collect();
        self.dirty
            .start(&ranges, self.page_size)
            .map_err(|e| MigratableError::StartDirtyLog(anyhow::Error::new(e)))?;
        self.dirty_logging = true;
        Ok(())
    }

    fn stop_dirty_log(&mut self) -> Result<(), MigratableError> {
        if std::mem::take(&mut self.dirty_logging) {
            self.dirty
                .stop()
                .map_err(|e| MigratableError::StopDirtyLog(anyhow::Error::new(e)))?;
        }
        Ok(())
    }

    /// Called once per memory iteration: the device's DMA writes, and, while the guest runs,
    /// one pre-copy round of the device's own state.
    fn dirty_log(&mut self) -> Result<MemoryRangeTable, MigratableError> {
        let stream = self.stream.as_mut();
        if let (Phase::Migrating(source), Some(stream)) = (&mut self.phase, stream) {
            // Rounds only while the guest runs: after the switch-over this is the last read.
            let round = match source.switched_over() {
                true => None,
                false => Some(source.round(stream, None)),
            };
            match round {
                None => {}
                Some(Ok(round)) => {
                    self.pre_copy_bytes += round.sent;
                    println!(
                        "  device pre-copy round: {} KiB sent, {} KiB pending, stop-and-copy \
                         estimate {}",
                        round.sent >> 10,
                        round.estimate.pending >> 10,
                        round
                            .estimate
                            .stop_copy
                            .map_or("unknown".into(), |b| format!("{} KiB", b >> 10))
                    );
                }
                Some(Err(e)) => {
                    self.end();
                    return Err(MigratableError::DirtyLog(error(e)));
                }
            }
        }
        let mut tables = Vec::new();
        if self.dirty_logging {
            for r in &self.guest {
                let range = GlueRange {
                    gpa: r.gpa,
                    length: r.length,
                };
                let words = self
                    .dirty
                    .report(range, self.page_size)
                    .map_err(|e| MigratableError::DirtyLog(anyhow::Error::new(e)))?;
                tables.push(MemoryRangeTable::from_dirty_bitmap(
                    words,
                    r.gpa,
                    self.page_size,
                ));
            }
        }
        Ok(MemoryRangeTable::new_from_tables(tables))
    }

    /// Starts the device's pre-copy (Cloud Hypervisor refuses here a device without
    /// migration support; vfio-mig's open already did).
    fn start_migration(&mut self) -> Result<(), MigratableError> {
        if self.stream.is_none() {
            return Err(MigratableError::StartMigration(anyhow::anyhow!(
                "no device stream connection"
            )));
        }
        match std::mem::replace(&mut self.phase, Phase::Moving) {
            Phase::Idle(dev) => match Source::start(vec![dev], &SourceOptions::new(Epoch(1))) {
                Ok(source) => {
                    self.phase = Phase::Migrating(source);
                    Ok(())
                }
                // The device comes back with the error, in the state it had.
                Err(Handback { error: e, devices }) => {
                    self.phase = Phase::Done(devices);
                    Err(MigratableError::StartMigration(error(*e)))
                }
            },
            other => {
                self.phase = other;
                Err(MigratableError::StartMigration(anyhow::anyhow!(
                    "a migration already ran"
                )))
            }
        }
    }

    /// The destination runs the state: the source device leaves STOP_COPY for STOP, for
    /// good (the point of no return: `finish` consumes the migration).
    fn complete_migration(&mut self) -> Result<(), MigratableError> {
        match std::mem::replace(&mut self.phase, Phase::Moving) {
            Phase::Migrating(source) => {
                let finished = source.finish();
                self.phase = Phase::Done(finished.devices);
                match finished.stop_failures.is_empty() {
                    true => Ok(()),
                    false => Err(MigratableError::CompleteMigration(anyhow::anyhow!(
                        "{}",
                        finished.stop_failures.join("; ")
                    ))),
                }
            }
            other => {
                self.phase = other;
                Err(MigratableError::CompleteMigration(anyhow::anyhow!(
                    "complete_migration before snapshot"
                )))
            }
        }
    }
}

const PAGE: u64 = 4096;
const GUEST: u64 = 256 << 20;

fn main() {
    let spec = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "mock:v2,size=16M,seed=11,dirty-rate=16M,dma-dirty=32".into());
    let (src, src_handle) = vfio_mig_mock::open_mock(&spec.parse().expect("mock spec"))
        .expect("open the source device");
    let (dst, dst_handle) = vfio_mig_mock::open_mock(&spec.parse().expect("mock spec"))
        .expect("open the destination device");
    let (tx, rx) = UnixStream::pair().expect("socketpair");

    // The destination: Cloud Hypervisor builds the device, then loads its state; here the
    // device stream is loaded as it arrives and the device runs once all of it verified.
    let destination = std::thread::spawn(move || {
        let mut devs = vec![dst.device];
        vfio_mig::resume(&mut devs, rx, &vfio_mig::DestinationOptions::new())
    });

    let mut device = VfioMigration {
        id: "_vfio0".into(),
        dirty: DmaLogging::new(Arc::clone(&src.io)),
        phase: Phase::Idle(src.device),
        stream: Some(tx),
        guest: vec![MemoryRange {
            gpa: 0,
            length: GUEST,
        }],
        page_size: PAGE,
        dirty_logging: false,
        pre_copy_bytes: 0,
    };
    let dev: &mut dyn Migratable = &mut device;

    // Vmm::send_migration, the device's share of it.
    dev.start_migration().expect("start_migration");
    dev.start_dirty_log().expect("start_dirty_log");
    for iteration in 1..=5 {
        let table = dev.dirty_log().expect("dirty_log");
        println!(
            "memory iteration {iteration}: the device dirtied {} KiB of guest memory by DMA",
            table.effective_size() >> 10
        );
    }
    // Downtime: vCPUs paused, then every device (quiesce), then the final dirty log, then
    // the snapshot (stop-and-copy).
    dev.pause().expect("pause");
    let snapshot = dev.snapshot().expect("snapshot");
    // With the device in STOP_COPY: its last DMA writes are still logged (pds ends its log at
    // STOP_COPY -> STOP), as QEMU reads it.
    let last = dev.dirty_log().expect("final dirty_log");
    dev.stop_dirty_log().expect("stop_dirty_log");
    let reports = destination
        .join()
        .expect("destination thread")
        .expect("destination resume");
    dev.complete_migration().expect("complete_migration");

    let record: VfioMigrationRecord = snapshot.snapshots[VFIO_MIGRATION_ID]
        .to_state()
        .expect("snapshot record");
    let status = dst_handle.status();
    assert!(
        status.resumed_ok,
        "the destination verified and runs the state"
    );
    assert_eq!(src_handle.state_digest(), dst_handle.state_digest());
    assert_eq!(reports[0].pre_copy_bytes, record.pre_copy_bytes);
    println!(
        "migrated {} ({}): {} KiB in pre-copy, {} KiB in stop-and-copy, last DMA dirty set {} KiB; \
         destination verified and running",
        device.id,
        record.model,
        record.pre_copy_bytes >> 10,
        reports[0].stop_copy_bytes >> 10,
        last.effective_size() >> 10
    );
}
