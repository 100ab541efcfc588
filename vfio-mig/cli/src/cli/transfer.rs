// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `save`, `load`, `migrate` and `inspect`.

use std::fs::File;
use std::io::{BufReader, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use indicatif::{HumanBytes, MultiProgress};

use crate::cli::devices::open_device;

use vfio_mig::new_session_id;
use vfio_mig::wire::{CoalescingWriter, StreamHeader, StreamReader};
use vfio_mig::{Epoch, OpenedDevice, Source, SourceOptions};
use vfio_mig::{MigrationDevice, Observer, PreCopyPolicy, SaveReport};
use vfio_mig_fence::session_hex;
use vfio_mig_session::handshake::{load_fenced, migrate_pairs_channels, RecvOutcome};
use vfio_mig_session::StreamKey;
use vfio_mig_session::{Error, Result};

use super::fencing::Fencing;
use super::output::Output;
use super::progress::ProgressView;
use super::signals::Cancellable;
use super::TransferArgs;

/// Prints a command's report as JSON on stdout, with the fields every outcome has
/// ([`super::outcome::stamp_success`]).
pub(super) fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    let encode = |e: serde_json::Error| Error::invalid_input(format!("encode JSON: {e}"));
    let mut value = serde_json::to_value(value).map_err(encode)?;
    super::outcome::stamp_success(&mut value);
    let text = serde_json::to_string_pretty(&value).map_err(encode)?;
    super::output_text(&format!("{text}\n"))
}

/// Opens device `name` for a command: its data calls fail once a signal arrived, so that the
/// engine rolls it back (see [`super::signals`]).
pub(crate) fn open_cancellable(name: &str) -> Result<OpenedDevice> {
    let mut opened = open_device(name)?;
    opened.device = Box::new(Cancellable(opened.device));
    Ok(opened)
}

/// After a failed session: reopens every device that is not RUNNING again. The engine reset
/// them, but a driver without a reset handler (igb-vfio-pci) keeps its migration state across
/// VFIO_DEVICE_RESET; closing the device fd and opening it again starts it in RUNNING. An error
/// when a device cannot be reopened or still does not run; a device whose state cannot be read
/// is left as it is.
pub(crate) fn reopen_stuck(names: &[String], opened: &mut Vec<OpenedDevice>) -> Result<()> {
    let running = vfio_mig::backend::v2_state::MigState::Running.to_string();
    for (i, name) in names.iter().enumerate() {
        // v1 has no such driver (and names its states otherwise).
        if opened[i].device.protocol() != vfio_mig::Protocol::V2 {
            continue;
        }
        // A state that cannot be read is left to the error already reported.
        let state = match opened[i].device.state_name() {
            Ok(state) if state != running => state,
            _ => continue,
        };
        // The old fd must be closed first: the driver's open runs only for the first opener.
        drop(opened.remove(i));
        let mut fresh = open_cancellable(name)?;
        let now = fresh.device.state_name()?;
        if now != running {
            return Err(Error::invalid_input(format!(
                "{name}: in {state} after the failed session and reset, and in {now} after reopening it: it cannot take a retry"
            )));
        }
        super::diag::warning(&format!(
            "{name} stayed in {state} after the failed session's reset; reopened it, now {now}"
        ));
        opened.insert(i, fresh);
    }
    Ok(())
}

/// Reads `--key-file` (this user's own, private).
fn load_key(path: Option<&Path>) -> Result<Option<StreamKey>> {
    path.map(|p| {
        super::private::check_private("--key-file", p)?;
        StreamKey::load(p)
    })
    .transpose()
}

pub(super) fn save_summary(r: &SaveReport) -> String {
    let precopy = match r.switch_reason {
        Some(reason) => format!(
            "pre-copy {} in {} rounds ({reason:?}), ",
            HumanBytes(r.pre_copy_bytes),
            r.rounds
        ),
        None if r.stop_copy_only => "no pre-copy support: stop-and-copy only, ".into(),
        None => String::new(),
    };
    let after = match &r.after_handoff {
        Some(what) => format!("; source STOP after the handoff failed: {what}"),
        None => String::new(),
    };
    format!(
        "{precopy}stop-and-copy {} in {:.2} ms, {} chunks{after}",
        HumanBytes(r.stop_copy_bytes),
        r.stop_copy_time.as_secs_f64() * 1e3,
        r.chunks
    )
}

/// Saves `devs` into `out` through the front door: pre-copy under `policy` (when `opts` lets
/// the devices pre-copy), the switch-over, then the output committed before the devices are
/// released to STOP. On any failure, a failure to flush, sync or rename the output included,
/// each device returns to the state it began in (RUNNING, or STOP for a stopped device).
fn save_to<D: MigrationDevice>(
    devs: Vec<D>,
    out: Output,
    opts: &SourceOptions,
    policy: &PreCopyPolicy,
    obs: &dyn Observer,
) -> Result<Vec<SaveReport>> {
    let name = out.name();
    let mut stream = CoalescingWriter::with_capacity(1 << 20, out.writer()?);
    let mut source = Source::start(devs, opts).map_err(vfio_mig::Error::from)?;
    source.pre_copy(&mut stream, policy, obs)?;
    source.switch_over_observed(&mut stream, obs)?;
    let commit = || -> Result<()> {
        let mut writer = stream
            .into_inner()
            .map_err(|e| Error::transport(format!("write {name}"), e))?;
        writer
            .flush()
            .map_err(|e| Error::transport(format!("write {name}"), e))?;
        drop(writer);
        out.commit()
    };
    if let Err(e) = commit() {
        return Err(source.cancel_with(e.into_core()).into());
    }
    Ok(source.finish().reports)
}

/// Where `save` writes, and how.
pub struct SaveTarget<'a> {
    /// The output file, or `-`.
    pub output: &'a Path,
    /// Replace an existing output (`--force`).
    pub replace: bool,
    /// Authenticate the file with the key in this file.
    pub key_file: Option<&'a Path>,
}

/// Runs `save`.
pub fn save(
    device: &str,
    target: &SaveTarget<'_>,
    args: &TransferArgs,
    fence: &Fencing,
) -> Result<()> {
    // Everything that can be checked is checked before the device is touched.
    let key = load_key(target.key_file)?;
    let out = Output::create(target.output, target.replace)?;
    // Held (the device's lock) until the command ends.
    let claims = [crate::cli::devices::claim(&fence.config, device)?];
    let mut opened = open_cancellable(device)?;
    let session = new_session_id()?;
    let (epoch, handoff) = fence.begin_session(&claims, args.epoch, &session, 1)?;
    let hex = session_hex(&session);
    super::outcome::session(&hex, epoch);
    eprintln!(
        "vfio-mig: save: session {hex}, epoch {epoch}, to {}",
        out.name()
    );
    let name = out.name();
    let view = Arc::new(ProgressView::new("save", None, args.json));
    let opts = args
        .source_options(Epoch(epoch))
        .session(session)
        .key(key.as_ref().map(StreamKey::auth));
    let started = Instant::now();
    let result = save_to(
        vec![opened.device.as_mut()],
        out,
        &opts,
        &args.policy(),
        &*view,
    );
    view.finish();
    fence.end_source(handoff, &result);
    let report = result?.remove(0);
    if args.json {
        return print_json(&report);
    }
    eprintln!(
        "saved {device} to {name} in {:.2} s: {}",
        started.elapsed().as_secs_f64(),
        save_summary(&report)
    );
    Ok(())
}

/// Runs `load` (of an unauthenticated file).
pub fn load(device: &str, input: &Path, json: bool, fence: &Fencing) -> Result<()> {
    load_keyed(device, input, None, json, fence)
}

/// Runs `load`; with a key, the file must be authenticated with it.
pub fn load_keyed(
    device: &str,
    input: &Path,
    key_file: Option<&Path>,
    json: bool,
    fence: &Fencing,
) -> Result<()> {
    let key = load_key(key_file)?;
    let file =
        File::open(input).map_err(|e| Error::transport(format!("open {}", input.display()), e))?;
    let (mut reader, header) = StreamReader::open_keyed(
        BufReader::with_capacity(1 << 20, file),
        key.as_ref().map(StreamKey::auth),
    )?;
    super::outcome::session(&session_hex(&header.session_id), header.epoch);
    if reader.is_authenticated() && key.is_none() {
        return Err(Error::invalid_input(format!(
            "load {}: the file is authenticated; give its --key-file (it is not loaded \
             unchecked)",
            input.display()
        )));
    }
    // Held (the device's lock) until the command ends.
    let claims = [crate::cli::devices::claim(&fence.config, device)?];
    let mut fencing = fence.destination(&claims)?;
    let mut opened = open_cancellable(device)?;
    let view = ProgressView::new("load", None, json);
    let started = Instant::now();
    let result = load_fenced(
        &mut [opened.device.as_mut()],
        &mut reader,
        fencing.as_mut(),
        &view,
    );
    view.finish();
    let outcome = match result {
        Ok(outcome) => outcome,
        Err(e) => {
            // The error says what the engine did to the device; a driver that stays out of
            // RUNNING after its reset is reopened here, not left for the next opener (after a
            // signal the device calls fail on purpose: the exit closes it).
            if super::signals::received().is_none() {
                let mut left = vec![opened];
                if let Err(stuck) = reopen_stuck(&[device.to_string()], &mut left) {
                    super::diag::warning(&format!("{}", vfio_mig::error::Report(&stuck)));
                }
            }
            return Err(e);
        }
    };
    let report = match outcome {
        RecvOutcome::Resumed { mut reports, .. } => reports.remove(0),
        RecvOutcome::AlreadyCompleted { header } => {
            if json {
                return print_json(&serde_json::json!({
                    "outcome": "already-completed",
                    "session": session_hex(&header.session_id),
                    "epoch": header.epoch,
                }));
            }
            eprintln!(
                "session {} of {} was already loaded into {device}: not loaded again",
                session_hex(&header.session_id),
                input.display()
            );
            return Ok(());
        }
    };
    if json {
        return print_json(&report);
    }
    eprintln!(
        "loaded {} into {device} in {:.2} s: {} in {} chunks; device running",
        input.display(),
        started.elapsed().as_secs_f64(),
        HumanBytes(report.pre_copy_bytes + report.stop_copy_bytes),
        report.chunks
    );
    Ok(())
}

/// Opens every device in `names` under its claim (the locks are held while they live).
pub(crate) fn open_all(
    names: &[String],
    fence: &Fencing,
) -> Result<(Vec<vfio_mig_fence::Claim>, Vec<OpenedDevice>)> {
    // One device named twice is a usage error, not "in use by another vfio-mig" (this one).
    crate::cli::devices::refuse_duplicates("the command", names)?;
    let claims = names
        .iter()
        .map(|n| crate::cli::devices::claim(&fence.config, n))
        .collect::<Result<Vec<_>>>()?;
    let opened = names
        .iter()
        .map(|n| open_cancellable(n))
        .collect::<Result<Vec<_>>>()?;
    Ok((claims, opened))
}

/// The protocol drivers of opened devices, as the engine takes them.
pub(crate) fn drivers<'a>(
    opened: &'a mut [OpenedDevice],
) -> Vec<&'a mut (dyn MigrationDevice + 'a)> {
    opened
        .iter_mut()
        .map(|o| o.device.as_mut() as &mut (dyn MigrationDevice + 'a))
        .collect()
}

/// Runs `migrate SRC DST [SRC DST ...]`.
pub fn migrate(
    devices: &[String],
    channels: u16,
    args: &TransferArgs,
    fence: &Fencing,
) -> Result<()> {
    if !devices.len().is_multiple_of(2) {
        return Err(Error::invalid_input(format!(
            "migrate: devices come in SRC DST pairs, {} were given",
            devices.len()
        )));
    }
    let (sources, destinations): (Vec<String>, Vec<String>) = devices
        .chunks(2)
        .map(|p| (p[0].clone(), p[1].clone()))
        .unzip();
    crate::cli::devices::refuse_duplicates("migrate", devices)?;
    let (src_claims, mut srcs) = open_all(&sources, fence)?;
    let (dst_claims, mut dsts) = open_all(&destinations, fence)?;
    let opts = args.save_options();
    let mut src_devs = drivers(&mut srcs);
    let mut dst_devs = drivers(&mut dsts);
    let mut header = StreamHeader::new(
        &src_devs.iter().map(|d| &**d).collect::<Vec<_>>(),
        opts.live,
        0,
    )?;
    let mut fences = fence.destination(&dst_claims)?;
    let handoff = fence.begin_source(&src_claims, args.epoch, &mut header)?;
    let hex = session_hex(&header.session_id);
    super::outcome::session(&hex, header.epoch);
    eprintln!("vfio-mig: migrate: session {hex}, epoch {}", header.epoch);
    let multi = MultiProgress::new();
    let src_view = ProgressView::new("save", Some(&multi), args.json);
    let dst_view = ProgressView::new("load", Some(&multi), true);
    let started = Instant::now();
    let result = migrate_pairs_channels(
        &mut src_devs,
        &mut dst_devs,
        &header,
        &opts,
        fences.as_mut(),
        &src_view,
        &dst_view,
        channels,
    );
    src_view.finish();
    dst_view.finish();
    fence.end_source(handoff, &result);
    let reports = result?;
    if args.json {
        return match reports.as_slice() {
            [one] => print_json(one),
            many => print_json(&serde_json::json!({ "pairs": many })),
        };
    }
    for ((source, destination), report) in sources.iter().zip(&destinations).zip(&reports) {
        eprintln!(
            "migrated {source} -> {destination}: {}; destination running",
            save_summary(&report.save)
        );
    }
    eprintln!(
        "{} device{} migrated in {:.2} s",
        reports.len(),
        if reports.len() == 1 { "" } else { "s" },
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Runs `inspect`; with a key, the file must be authenticated with it.
pub fn inspect(file: &Path, key_file: Option<&Path>, json: bool) -> Result<()> {
    let key = load_key(key_file)?;
    let f =
        File::open(file).map_err(|e| Error::transport(format!("open {}", file.display()), e))?;
    let summary = vfio_mig::wire::verify_keyed(
        BufReader::with_capacity(1 << 20, f),
        key.as_ref().map(StreamKey::auth),
    )?;
    if json {
        return print_json(&summary);
    }
    super::output_text(&format!("{summary}\n"))
}
