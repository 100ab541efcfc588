// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `send` and `recv`: a migration between two hosts over `unix:` or `tcp:`, with the session
//! handshake. To a `file:` address they behave as `save` and `load`.

use std::time::{Duration, Instant};

use clap::Args;
use indicatif::HumanBytes;

use vfio_mig::engine::session::new_header;
use vfio_mig::error::{Error, Result};
use vfio_mig::fence::session_hex;
use vfio_mig::handshake::{self, RecvOutcome, SendOutcome};
use vfio_mig::transport::{self, Address};

use super::fencing::{parse_session, Fencing};
use super::progress::ProgressView;
use super::transfer::{drivers, open_all, print_json, save_summary};
use super::TransferArgs;

/// Options of the connection (`send` and `recv`).
#[derive(Debug, Args, Clone)]
pub struct NetArgs {
    /// Seconds the peer may stay silent (no data, no answer) before the connection is
    /// considered dead.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub timeout: f64,
    /// Seconds a TCP connect may take.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub connect_timeout: f64,
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.clamp(0.001, 1e9))
}

/// What `send --json` prints.
#[derive(Debug, serde::Serialize)]
struct SendJson<'a> {
    outcome: &'static str,
    devices: &'a [String],
    destination: String,
    session: String,
    epoch: u64,
    reports: Vec<vfio_mig::engine::SaveReport>,
}

/// What `recv --json` prints.
#[derive(Debug, serde::Serialize)]
struct RecvJson<'a> {
    outcome: &'static str,
    devices: &'a [String],
    source: String,
    session: String,
    epoch: u64,
    reports: Vec<vfio_mig::engine::LoadReport>,
    confirmed: bool,
}

/// Runs `send DEVICE... --to ADDR`.
pub fn send(
    devices: &[String],
    to: &Address,
    session: Option<&str>,
    args: &TransferArgs,
    net: &NetArgs,
    fence: &Fencing,
) -> Result<()> {
    if let Address::File(path) = to {
        let [device] = devices else {
            return Err(Error::InvalidInput(
                "send to a file saves one device; give one device or use unix:/tcp:".into(),
            ));
        };
        if session.is_some() {
            return Err(Error::InvalidInput(
                "--session: a file has no destination to ask; use save".into(),
            ));
        }
        return super::transfer::save(device, path, args, fence);
    }
    let session = session.map(parse_session).transpose()?;
    let (claims, mut opened) = open_all(devices, fence)?;
    let opts = args.save_options();
    let mut devs = drivers(&mut opened);
    let mut header = new_header(&devs.iter().map(|d| &**d).collect::<Vec<_>>(), opts.live, 0)?;
    if let Some(s) = session {
        header.session_id = s;
    }
    let handoff = fence.begin_source(&claims, args.epoch, &mut header)?;
    let epoch = header.epoch;
    let hex = session_hex(&header.session_id);
    let mut conn = transport::connect(to, secs(net.connect_timeout))?;
    conn.set_timeout(Some(secs(net.timeout)))
        .map_err(|e| Error::transport(format!("set the timeout of {to}"), e))?;
    tracing::info!("connected to {to}: session {hex}, epoch {epoch}");
    let view = ProgressView::new("send", None, args.json);
    let started = Instant::now();
    let result = handshake::send(&mut devs, conn, &header, &opts, &view);
    view.finish();
    fence.end_source(handoff, &result);
    let (outcome, reports) = match result? {
        SendOutcome::Completed(r) => ("completed", r),
        SendOutcome::AlreadyCompleted => ("already-completed", Vec::new()),
    };
    if args.json {
        return print_json(&SendJson {
            outcome,
            devices,
            destination: to.to_string(),
            session: hex,
            epoch,
            reports,
        });
    }
    let names = devices.join(" ");
    if reports.is_empty() {
        eprintln!(
            "session {hex} was already completed by {to}: the destination runs this state; \
             {names} was not touched and is not resumed here (that would run the state twice)"
        );
    }
    for (device, r) in devices.iter().zip(&reports) {
        eprintln!("sent {device} to {to}: {}", save_summary(r));
    }
    if !reports.is_empty() {
        eprintln!(
            "sent in {:.2} s; destination running (session {hex}, epoch {epoch})",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Runs `recv DEVICE... --listen ADDR`: serves connections until one migration completes
/// (with `once`, gives up after the first connection whatever its outcome).
pub fn recv(
    devices: &[String],
    listen: &Address,
    once: bool,
    json: bool,
    net: &NetArgs,
    fence: &Fencing,
) -> Result<()> {
    if let Address::File(path) = listen {
        let [device] = devices else {
            return Err(Error::InvalidInput(
                "recv from a file loads one device; give one device or use unix:/tcp:".into(),
            ));
        };
        return super::transfer::load(device, path, json, fence);
    }
    let (claims, mut opened) = open_all(devices, fence)?;
    let mut fencing = fence.destination(&claims)?;
    let mut devs = drivers(&mut opened);
    let names = devices.join(" ");
    let listener = transport::listen(listen)?;
    // Tests and scripts wait for this line before they connect.
    eprintln!("vfio-mig: recv: listening on {}", listener.local_address()?);
    loop {
        let mut conn = listener.accept()?;
        let peer = conn.peer().to_owned();
        conn.set_timeout(Some(secs(net.timeout)))
            .map_err(|e| Error::transport(format!("set the timeout of {peer}"), e))?;
        tracing::info!("connection from {peer}");
        let view = ProgressView::new("recv", None, json);
        let started = Instant::now();
        let result = handshake::receive(&mut devs, conn, fencing.as_mut(), &view);
        view.finish();
        let outcome = match result {
            Ok(o) => o,
            Err(e) if once => return Err(e),
            Err(e) => {
                eprintln!("vfio-mig: warning: {e}; waiting for a retry on {listen}");
                continue;
            }
        };
        let header = outcome.header().clone();
        let hex = session_hex(&header.session_id);
        let (name, reports, confirmed) = match outcome {
            RecvOutcome::Resumed {
                reports, confirmed, ..
            } => ("resumed", reports, confirmed),
            RecvOutcome::AlreadyCompleted { .. } => ("already-completed", Vec::new(), true),
        };
        if !confirmed {
            eprintln!(
                "vfio-mig: warning: {names} runs the migrated state, but RESUMED did not \
                 reach {peer}: the source reports the outcome in doubt and keeps its device \
                 stopped"
            );
        }
        if json {
            return print_json(&RecvJson {
                outcome: name,
                devices,
                source: peer,
                session: hex,
                epoch: header.epoch,
                reports,
                confirmed,
            });
        }
        if reports.is_empty() {
            eprintln!(
                "session {hex} from {peer} was already completed: {names} runs its state \
                 and was not loaded again"
            );
        }
        for (device, r) in devices.iter().zip(&reports) {
            eprintln!(
                "received {device} from {peer}: {} in {} chunks; device running",
                HumanBytes(r.pre_copy_bytes + r.stop_copy_bytes),
                r.chunks,
            );
        }
        if !reports.is_empty() {
            eprintln!(
                "received in {:.2} s (session {hex}, epoch {})",
                started.elapsed().as_secs_f64(),
                header.epoch
            );
        }
        return Ok(());
    }
}
