// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `send` and `recv`: a migration between two hosts over `unix:` or `tcp:`, with the session
//! handshake. To a `file:` address they behave as `save` and `load`.

use std::time::{Duration, Instant};

use clap::Args;
use indicatif::HumanBytes;

use crate::engine::session::new_header;
use crate::error::{Error, Result};
use crate::fence::{session_hex, FenceConfig};
use crate::handshake::{self, RecvOutcome, SendOutcome};
use crate::open::open_device;
use crate::transport::{self, Address};

use super::fencing::parse_session;
use super::progress::ProgressView;
use super::transfer::{print_json, save_summary};
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
    device: &'a str,
    destination: String,
    session: String,
    epoch: u64,
    report: Option<crate::engine::SaveReport>,
}

/// What `recv --json` prints.
#[derive(Debug, serde::Serialize)]
struct RecvJson<'a> {
    outcome: &'static str,
    device: &'a str,
    source: String,
    session: String,
    epoch: u64,
    report: Option<crate::engine::LoadReport>,
    confirmed: bool,
}

/// Runs `send DEVICE --to ADDR`.
pub fn send(
    device: &str,
    to: &Address,
    session: Option<&str>,
    args: &TransferArgs,
    net: &NetArgs,
    fence: &FenceConfig,
) -> Result<()> {
    if let Address::File(path) = to {
        if session.is_some() {
            return Err(Error::Usage(
                "--session: a file has no destination to ask; use save".into(),
            ));
        }
        return super::transfer::save(device, path, args, fence);
    }
    let session = session.map(parse_session).transpose()?;
    let claim = fence.claim(device)?;
    let mut opened = open_device(device)?;
    let opts = args.save_options();
    let epoch = args.epoch.unwrap_or_else(|| claim.default_epoch());
    let mut header = new_header(&[opened.device.as_ref()], opts.live, epoch)?;
    if let Some(s) = session {
        header.session_id = s;
    }
    let hex = session_hex(&header.session_id);
    let mut conn = transport::connect(to, secs(net.connect_timeout))?;
    conn.set_timeout(Some(secs(net.timeout)))
        .map_err(|e| Error::transport(format!("set the timeout of {to}"), e))?;
    tracing::info!("connected to {to}: session {hex}, epoch {epoch}");
    let view = ProgressView::new("send", None, args.json);
    let started = Instant::now();
    let result = handshake::send(opened.device.as_mut(), conn, &header, &opts, &view);
    view.finish();
    let (outcome, report) = match result? {
        SendOutcome::Completed(r) => ("completed", Some(r)),
        SendOutcome::AlreadyCompleted => ("already-completed", None),
    };
    if args.json {
        return print_json(&SendJson {
            outcome,
            device,
            destination: to.to_string(),
            session: hex,
            epoch,
            report,
        });
    }
    match report {
        Some(r) => eprintln!(
            "sent {device} to {to} in {:.2} s: {}; destination running (session {hex}, epoch {epoch})",
            started.elapsed().as_secs_f64(),
            save_summary(&r)
        ),
        None => eprintln!(
            "session {hex} was already completed by {to}: the destination runs this state; \
             {device} was not touched and is not resumed here (that would run the state twice)"
        ),
    }
    Ok(())
}

/// Runs `recv DEVICE --listen ADDR`: serves connections until one migration completes (with
/// `once`, gives up after the first connection whatever its outcome).
pub fn recv(
    device: &str,
    listen: &Address,
    once: bool,
    json: bool,
    net: &NetArgs,
    fence: &FenceConfig,
) -> Result<()> {
    if let Address::File(path) = listen {
        return super::transfer::load(device, path, json, fence);
    }
    let claim = fence.claim(device)?;
    let mut opened = open_device(device)?;
    let mut fencing = claim.fence();
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
        let result = handshake::receive(opened.device.as_mut(), conn, fencing.as_mut(), &view);
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
        let (name, report, confirmed) = match outcome {
            RecvOutcome::Resumed {
                report, confirmed, ..
            } => ("resumed", Some(report), confirmed),
            RecvOutcome::AlreadyCompleted { .. } => ("already-completed", None, true),
        };
        if !confirmed {
            eprintln!(
                "vfio-mig: warning: {device} runs the migrated state, but RESUMED did not \
                 reach {peer}: the source reports the outcome in doubt and keeps its device \
                 stopped"
            );
        }
        if json {
            return print_json(&RecvJson {
                outcome: name,
                device,
                source: peer,
                session: hex,
                epoch: header.epoch,
                report,
                confirmed,
            });
        }
        match report {
            Some(r) => eprintln!(
                "received {device} from {peer} in {:.2} s: {} in {} chunks; device running \
                 (session {hex}, epoch {})",
                started.elapsed().as_secs_f64(),
                HumanBytes(r.pre_copy_bytes + r.stop_copy_bytes),
                r.chunks,
                header.epoch
            ),
            None => eprintln!(
                "session {hex} from {peer} was already completed: {device} runs its state \
                 and was not loaded again"
            ),
        }
        return Ok(());
    }
}
