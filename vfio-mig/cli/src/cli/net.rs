// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `send` and `recv`: a migration between two hosts over `tcp:` (TLS 1.3 with mutual
//! authentication, or plain with `--insecure`) or `unix:`, with the session handshake. To a
//! `file:` address they behave as `save` and `load`.

use std::net::Shutdown;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use vfio_mig::wire::StreamHeader;

use clap::Args;
use indicatif::HumanBytes;

use vfio_mig_fence::session_hex;
use vfio_mig_session::handshake::{self, RecvOutcome, SendOutcome};
use vfio_mig_session::transport::{self, Address, Duplex};
use vfio_mig_session::{Error, Result};

use super::fencing::Fencing;
use super::progress::ProgressView;
use super::serve::{self, Event};
use super::signals;
use super::tls::TlsSettings;
use super::transfer::{drivers, open_all, print_json, reopen_stuck, save_summary};
use super::TransferArgs;

/// Options of the connection (`send` and `recv`).
#[derive(Debug, Args, Clone)]
pub struct NetArgs {
    /// Seconds the peer may stay silent (no data, no answer) before the connection is
    /// considered dead. With --fence, `send` waits at least as long as a destination with
    /// the same --fence-timeout may take to answer (docs/fencing.md).
    #[arg(long, value_name = "SECS", default_value_t = 30.0, value_parser = super::parse_secs)]
    pub timeout: f64,
    /// Seconds a TCP connect may take.
    #[arg(long, value_name = "SECS", default_value_t = 10.0, value_parser = super::parse_secs)]
    pub connect_timeout: f64,
    /// Seconds the whole opening of a session may take (TLS handshake, HELLO and stream
    /// header), however the peer spaces its bytes.
    #[arg(long, value_name = "SECS", default_value_t = 10.0, value_parser = super::parse_secs)]
    pub handshake_timeout: f64,
    /// Channels (connections) of the session. `send`: how many to offer (default 1: one
    /// connection); device i travels on channel i mod N. `recv`: the most it takes (default
    /// 16, and never more than its devices); the session uses the smaller of the two.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=16))]
    pub channels: Option<u16>,
    /// TLS and authorization, resolved from the command's options and the configuration
    /// file (see `TlsSettings::resolve`).
    #[arg(skip)]
    pub tls: TlsSettings,
}

fn secs(s: f64) -> Duration {
    // parse_secs admits finite, non-negative values only.
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
    reports: Vec<vfio_mig::SaveReport>,
}

/// What `recv --json` prints.
#[derive(Debug, serde::Serialize)]
struct RecvJson<'a> {
    outcome: &'static str,
    devices: &'a [String],
    source: String,
    /// The source's verified TLS identities (`dns:…, uri:…, cn:…`); null when plain.
    source_identity: Option<String>,
    session: String,
    epoch: u64,
    reports: Vec<vfio_mig::LoadReport>,
    confirmed: bool,
}

/// Where `send` goes.
pub struct SendTarget<'a> {
    /// The destination (`--to`).
    pub to: &'a Address,
    /// The session to retry (`--session`).
    pub session: Option<vfio_mig::wire::SessionId>,
    /// `file:` only: replace an existing file (`--force`).
    pub replace: bool,
}

/// Runs `send DEVICE... --to ADDR`.
pub fn send(
    devices: &[String],
    target: &SendTarget<'_>,
    args: &TransferArgs,
    net: &NetArgs,
    fence: &Fencing,
) -> Result<()> {
    let (to, session) = (target.to, target.session);
    if let Address::File(path) = to {
        let [device] = devices else {
            return Err(Error::invalid_input(
                "send to a file saves one device; give one device or use unix:/tcp:",
            ));
        };
        if session.is_some() {
            return Err(Error::invalid_input(
                "--session: a file has no destination to ask; use save",
            ));
        }
        let target = super::transfer::SaveTarget {
            output: path,
            replace: target.replace,
            key_file: None,
        };
        return super::transfer::save(device, &target, args, fence);
    }
    if target.replace {
        return Err(Error::invalid_input(
            "--force replaces an existing output file: it is for --to file: only",
        ));
    }
    // Certificates and keys are read before any device is claimed.
    let tls = net.tls.client(to)?;
    let (claims, mut opened) = open_all(devices, fence)?;
    let opts = args.save_options();
    let mut devs = drivers(&mut opened);
    let mut header =
        StreamHeader::new(&devs.iter().map(|d| &**d).collect::<Vec<_>>(), opts.live, 0)?;
    if let Some(s) = session {
        header.session_id = s;
    }
    let handoff = fence.begin_source(&claims, args.epoch, &mut header)?;
    let epoch = header.epoch;
    let hex = session_hex(&header.session_id);
    super::outcome::session(&hex, epoch);
    // Printed before anything can fail half-way: a killed send leaves the id to retry with.
    eprintln!("vfio-mig: send: session {hex}, epoch {epoch}, to {to}");
    // Every channel is opened the same way: TLS identities are verified for each exactly as
    // for the first.
    let open = || -> Result<transport::Connection> {
        let mut conn = match &tls {
            Some(tls) => transport::connect_tls(
                to,
                secs(net.connect_timeout),
                tls,
                secs(net.handshake_timeout),
            )?,
            None => transport::connect(to, secs(net.connect_timeout))?,
        };
        conn.set_timeout(Some(fence.answer_wait(secs(net.timeout), devices.len())))
            .map_err(|e| Error::transport(format!("set the timeout of {to}"), e))?;
        Ok(conn)
    };
    let conn = open()?;
    if let Some(s) = conn.tls_session() {
        tracing::info!(
            "TLS to {to}: {} ({})",
            s.peer_identities(),
            s.cipher_suite()
        );
    }
    // A signal ends every wait for the destination; the engine then rolls back.
    let ctl = conn
        .try_clone()
        .map_err(|e| Error::transport("clone the connection", e))?;
    let _hook = signals::on_cancel(move || {
        let _ = ctl.shutdown(Shutdown::Both);
    });
    let view = ProgressView::new("send", None, args.json);
    let started = Instant::now();
    let offer = net.channels.unwrap_or(1);
    let mut connect = |_: u16| open();
    let result =
        handshake::send_channels(&mut devs, conn, &header, &opts, &view, offer, &mut connect);
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

/// Listens at `listen`; a Unix socket is created with mode 0600 whatever the umask (who may
/// connect is decided by its file permissions: this user only).
fn listen_private(listen: &Address) -> Result<transport::Listener> {
    use nix::sys::stat::{umask, Mode};
    let Address::Unix(_) = listen else {
        return transport::listen(listen);
    };
    // The umask is the process's; nothing else creates files while recv starts listening.
    let before = umask(Mode::from_bits_truncate(0o177));
    let listener = transport::listen(listen);
    umask(before);
    listener
}

/// Removes a Unix socket file when `recv` ends (the listener lives on its accept thread).
struct SocketFile(Option<PathBuf>);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// What `recv` does beyond where it listens.
pub struct RecvOptions {
    /// End after the first session.
    pub once: bool,
    /// Print the report as JSON.
    pub json: bool,
    /// Accept a unit whose devices do not all have the P2P states.
    pub allow_non_p2p_unit: bool,
}

/// Runs `recv DEVICE... --listen ADDR`: serves connections until one session completes
/// (with `once`, until one session ends, whatever its outcome). Connections that are not a
/// session (closed early, not the protocol, not TLS, not authorized, too slow) and sessions
/// offered while one runs (answered busy) do not count.
pub fn recv(
    devices: &[String],
    listen: &Address,
    opts: &RecvOptions,
    net: &NetArgs,
    fence: &Fencing,
) -> Result<()> {
    let (once, json) = (opts.once, opts.json);
    if let Address::File(path) = listen {
        let [device] = devices else {
            return Err(Error::invalid_input(
                "recv from a file loads one device; give one device or use unix:/tcp:",
            ));
        };
        return super::transfer::load(device, path, json, fence);
    }
    let (claims, mut opened) = open_all(devices, fence)?;
    let device_keys: Vec<String> = claims
        .iter()
        .zip(devices)
        .map(|(c, name)| c.key().map_or_else(|| name.clone(), |k| k.to_string()))
        .collect();
    let tls = net.tls.server(listen, &device_keys)?;
    let mut fencing = fence.destination(&claims)?;
    let mut devs = drivers(&mut opened);
    // The destination decides on its own devices: a unit without P2P is this host's risk too
    // (a device that cannot wait quiesced may run before its peers are loaded).
    vfio_mig::check_unit(&devs, opts.allow_non_p2p_unit)?;
    let names = devices.join(" ");
    let listener = listen_private(listen)?;
    let bound = listener.local_address()?;
    let _socket = SocketFile(match &bound {
        Address::Unix(p) => {
            signals::remove_on_exit(p.clone());
            Some(p.clone())
        }
        _ => None,
    });
    let admission = serve::Admission {
        tls,
        device_keys,
        handshake: secs(net.handshake_timeout),
        timeout: secs(net.timeout),
    };
    let slot = serve::Slot::default();
    let (wake, events, channels) = serve::start(listener, admission, slot.clone());
    let max_channels = net.channels.unwrap_or(handshake::MAX_CHANNELS);
    let _wake = signals::on_cancel(move || {
        let _ = wake.send(Event::Cancelled);
    });
    // Tests and scripts wait for this line before they connect.
    eprintln!("vfio-mig: recv: listening on {bound}");
    loop {
        let incoming = match events.recv() {
            Ok(Event::Session(i)) => i,
            Ok(Event::Cancelled) | Err(_) => {
                signals::check("wait for a source")?;
                return Err(Error::invalid_input("the listener stopped"));
            }
        };
        let serve::Incoming {
            opening,
            peer,
            identity,
        } = *incoming;
        let header = opening.header().clone();
        let hex = session_hex(&header.session_id);
        super::outcome::session(&hex, header.epoch);
        let who = identity
            .as_ref()
            .map(|i| format!(" ({i})"))
            .unwrap_or_default();
        eprintln!(
            "vfio-mig: recv: session {hex}, epoch {}, from {peer}{who}",
            header.epoch
        );
        // A signal ends the session's reads: the load fails, the device is reset and the
        // source is told (FAILED still goes out on the writing direction).
        let ctl = opening
            .connection()
            .try_clone()
            .map_err(|e| Error::transport("clone the connection", e))?;
        let hook = signals::on_cancel(move || {
            let _ = ctl.shutdown(Shutdown::Read);
        });
        let view = ProgressView::new("recv", None, json);
        let started = Instant::now();
        let result = if opening.offered_channels() > 1 {
            slot.want_channels(true);
            let mut accept = |deadline: Instant| {
                let timed_out = || {
                    Error::transport(
                        "accept a channel",
                        std::io::Error::from(std::io::ErrorKind::TimedOut),
                    )
                };
                // A queued channel is returned even by a zero wait: past the bind limit
                // (refusals that drained may have taken the session there) none is bound.
                let wait = deadline.saturating_duration_since(Instant::now());
                if wait.is_zero() {
                    return Err(timed_out());
                }
                let channel = channels.recv_timeout(wait).map_err(|_| timed_out())?;
                if Instant::now() > deadline {
                    let peer = channel.connection().peer().to_owned();
                    serve::turn_away_channel(channel, &peer, "it came after the bind limit".into());
                    return Err(timed_out());
                }
                Ok(channel)
            };
            handshake::receive_channels(
                &mut devs,
                opening,
                fencing.as_mut(),
                &view,
                max_channels,
                &mut accept,
            )
        } else {
            handshake::receive_opened(&mut devs, opening, fencing.as_mut(), &view)
        };
        view.finish();
        drop(hook);
        slot.release();
        // Channels that came for this session and were not bound end with it.
        while channels.try_recv().is_ok() {}
        let outcome = match result {
            Ok(o) => o,
            // In doubt: the store may name this host as the owner; nothing more runs here.
            Err(e @ Error::InDoubt { .. }) => return Err(e),
            // Refused before any device was touched (an unknown feature, another model, a
            // stale epoch): not a session, even for --once.
            Err(e @ Error::Refused { .. }) if signals::received().is_none() => {
                super::diag::warning(&format!(
                    "{}; waiting for a source on {bound}",
                    vfio_mig::error::Report(&e)
                ));
                continue;
            }
            Err(e) if once || signals::received().is_some() => return Err(e),
            Err(e) => {
                super::diag::warning(&format!(
                    "{}; waiting for a retry on {bound}",
                    vfio_mig::error::Report(&e)
                ));
                drop(devs);
                reopen_stuck(devices, &mut opened)?;
                devs = drivers(&mut opened);
                continue;
            }
        };
        let (name, reports, confirmed) = match outcome {
            RecvOutcome::Resumed {
                reports, confirmed, ..
            } => ("resumed", reports, confirmed),
            RecvOutcome::AlreadyCompleted { .. } => ("already-completed", Vec::new(), true),
        };
        if reports.is_empty() && !once {
            // A replayed session changes nothing here: keep waiting for a new one.
            eprintln!(
                "vfio-mig: recv: session {hex} from {peer} was already completed: {names} \
                 runs its state and was not loaded again; waiting for a new session on {bound}"
            );
            continue;
        }
        if !confirmed {
            super::diag::warning(&format!(
                "{names} runs the migrated state, but RESUMED did not \
                 reach {peer}: the source reports the outcome in doubt and keeps its device \
                 stopped"
            ));
        }
        if json {
            return print_json(&RecvJson {
                outcome: name,
                devices,
                source: peer,
                source_identity: identity,
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
