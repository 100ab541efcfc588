// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Shared helpers of the integration tests: opening mocks, moving a stream through memory, and
//! the invariants every failed migration must keep.

pub mod cli;
pub mod recorder;
pub mod session;

pub mod sweep;
pub mod timeline;
pub mod v2_mock;
pub mod wrap;
pub mod wrap_io;

use vfio_mig::backend::v1_state::V1State;
use vfio_mig::backend::v2_state::MigState;
use vfio_mig::Result;
use vfio_mig::{resume, DestinationOptions, Epoch, Source, SourceOptions};
use vfio_mig::{wire::Record, wire::StreamReader, wire::StreamWriter};
use vfio_mig::{Backend, OpenedDevice};
use vfio_mig::{LoadReport, NoObserver, SaveOptions, SaveReport};
use vfio_mig_mock::{MockHandle, MockStatus};

/// The backend the tests open real devices through: `VFIO_MIG_BACKEND` (`auto`, `group`,
/// `iommufd`), so that the guest harness runs the same tests over both kernel interfaces.
pub fn test_backend() -> Backend {
    match std::env::var("VFIO_MIG_BACKEND") {
        Ok(v) if !v.trim().is_empty() => v
            .parse()
            .unwrap_or_else(|e| panic!("VFIO_MIG_BACKEND={v}: {e}")),
        _ => Backend::Auto,
    }
}

/// Opens a device by name (a mock spec or a sysfs path) through [`test_backend`].
pub fn open_device(name: &str) -> Result<OpenedDevice> {
    Ok(vfio_mig_mock::open_named(name, test_backend())?.0)
}

/// An opened mock device and the handle that inspects it; derefs to the [`OpenedDevice`].
pub struct MockDevice {
    /// The device, as the engine takes it.
    pub opened: OpenedDevice,
    /// The mock's handle.
    pub handle: MockHandle,
}

impl std::fmt::Debug for MockDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockDevice")
            .field("model", &self.opened.device.identity().model)
            .finish_non_exhaustive()
    }
}

impl std::ops::Deref for MockDevice {
    type Target = OpenedDevice;
    fn deref(&self) -> &OpenedDevice {
        &self.opened
    }
}

impl std::ops::DerefMut for MockDevice {
    fn deref_mut(&mut self) -> &mut OpenedDevice {
        &mut self.opened
    }
}

/// Opens a mock device from its spec.
pub fn try_mock(spec: &str) -> Result<MockDevice> {
    let parsed: vfio_mig_mock::MockSpec = spec.parse()?;
    let (opened, handle) = vfio_mig_mock::open_mock(&parsed)?;
    Ok(MockDevice { opened, handle })
}

/// Opens a mock device from its spec, panicking on a bad spec (a test bug).
pub fn mock(spec: &str) -> MockDevice {
    try_mock(spec).unwrap_or_else(|e| panic!("open {spec}: {e}"))
}

/// The mock handle of an opened mock.
pub fn handle(dev: &MockDevice) -> MockHandle {
    dev.handle.clone()
}

/// The options of the fault tests: 4 KiB buffers (many records from a small device) and,
/// when `live`, pre-copy that never switches over early (4 rounds, no byte threshold), so
/// that a fault can land in every phase.
pub fn fault_test_options(live: bool) -> SaveOptions {
    SaveOptions {
        live,
        policy: vfio_mig::PreCopyPolicy {
            switchover_bytes: 0,
            max_rounds: 4,
            ..Default::default()
        },
        buffer: 4096,
        ..Default::default()
    }
}

/// Saves `dev` into an in-memory stream through the front door, as the command's `save` does:
/// pre-copy rounds under `opts.policy` when `opts.live`, then the switch-over; the device ends
/// stopped, or (on failure) back in the state it started in.
pub fn save_to_vec(dev: &mut OpenedDevice, opts: &SaveOptions) -> Result<(Vec<u8>, SaveReport)> {
    let source_opts = SourceOptions::new(Epoch(1))
        .pre_copy(opts.live)
        .buffer(opts.buffer)
        .allow_non_p2p_unit(opts.allow_non_p2p_unit);
    let mut source = Source::start(vec![dev.device.as_mut()], &source_opts)?;
    let mut out = Vec::new();
    source.pre_copy(&mut out, &opts.policy, &NoObserver)?;
    source.switch_over(&mut out)?;
    let mut finished = source.finish();
    Ok((out, finished.reports.remove(0)))
}

/// Loads an in-memory stream into `dev` and runs it, through the front door ([`resume`]);
/// on failure the device is reset.
pub fn load_from_slice(dev: &mut OpenedDevice, bytes: &[u8]) -> Result<LoadReport> {
    let mut reports = resume(
        &mut [dev.device.as_mut()],
        bytes,
        &DestinationOptions::new(),
    )?;
    Ok(reports.remove(0))
}

/// The mock reports its state as raw uAPI values (it names states with its own rules,
/// `vfio_mig_mock::rules`); the tests compare them with the driver's state types.
pub trait StatusExt {
    /// The v1 state of `state_raw` (meaningless for a v2 mock).
    fn v1_state(&self) -> V1State;
    /// The v2 state; `None` for a v1 mock or a raw value the uAPI does not define.
    fn mig_state(&self) -> Option<MigState>;
}

impl StatusExt for MockStatus {
    fn v1_state(&self) -> V1State {
        V1State::from_raw(self.state_raw)
    }

    fn mig_state(&self) -> Option<MigState> {
        self.v2_state.and_then(MigState::from_raw)
    }
}

/// A source after a failed migration: running again (by the cancel arc or a reset), not
/// stuck saving or stopped.
pub fn assert_source_running(status: &MockStatus, context: &str) {
    assert!(
        status.is_running(),
        "{context}: source must be RUNNING after a failure, status {status:?}"
    );
}

/// A destination after a failed migration: never running with loaded (partial or wrong)
/// state. It either was never touched or was reset, and runs its own reset state.
pub fn assert_destination_safe(status: &MockStatus, context: &str) {
    assert!(
        !status.resumed_ok,
        "{context}: destination must not run with loaded state, status {status:?}"
    );
    assert!(
        !status.ran_incomplete,
        "{context}: destination ran without the whole migrated state, status {status:?}"
    );
    let safe = match status.v2_state {
        Some(_) => matches!(status.mig_state(), Some(MigState::Running | MigState::Stop)),
        None => matches!(status.v1_state(), V1State::Running | V1State::Stop),
    };
    assert!(
        safe,
        "{context}: destination must be left reset (RUNNING), status {status:?}"
    );
    if status.bytes_loaded > 0 || status.transactions_loaded > 0 {
        assert!(
            status.resets > 0,
            "{context}: a destination that received data must be reset, status {status:?}"
        );
    }
}

/// [`assert_destination_safe`] after a failed migration whose error is `error`, allowing one
/// more honest outcome: a driver whose VFIO_DEVICE_RESET does not leave RESUMING (igb-vfio-pci
/// after a failed load) stays there, runs nothing, and the error must say so.
pub fn assert_destination_left_safe(status: &MockStatus, context: &str, error: &str) {
    if status.mig_state() == Some(MigState::Resuming) {
        assert!(
            error.contains("RESUMING after VFIO_DEVICE_RESET"),
            "{context}: a destination left in RESUMING needs an error saying the reset did not \
             help: {error}"
        );
        assert!(
            !status.resumed_ok && !status.ran_incomplete,
            "{context}: {status:?}"
        );
        return;
    }
    assert_destination_safe(status, context);
}

/// Rewrites a stream record by record: `model` replaces the device model, `edit` may change
/// the first data record's bytes. The stream's own checksums are recomputed.
pub fn rewrite_stream(bytes: &[u8], model: Option<&str>, edit: impl Fn(&mut Vec<u8>)) -> Vec<u8> {
    let (mut reader, mut header) = StreamReader::open(bytes).unwrap();
    if let Some(m) = model {
        header.devices[0].model = m.to_string();
    }
    let mut writer = StreamWriter::new(Vec::new(), &header).unwrap();
    let mut first = true;
    loop {
        match reader.next_record().unwrap() {
            Record::Data {
                device,
                phase,
                bytes,
                chunk_end,
            } => {
                let mut data = bytes.to_vec();
                if first {
                    edit(&mut data);
                    first = false;
                }
                writer.data(device, phase, &data, chunk_end).unwrap();
            }
            Record::EndOfPhase { device, phase } => writer.end_phase(device, phase).unwrap(),
            Record::End(_) => break,
        }
    }
    writer.finish().unwrap().0
}
