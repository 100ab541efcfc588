// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The engine as a VMM drives it, for the suites that measure it: the front door's
//! [`Source`] and [`Destination`] (stop-and-copy of a unit, the stream into any writer, the
//! destination fed from any reader), and both ends of a migration in one process over a
//! socketpair.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use vfio_mig::wire::CoalescingWriter;
use vfio_mig::{Destination, DestinationOptions, Epoch, Source, SourceOptions, Status};
use vfio_mig::{LoadReport, MigrationDevice, Observer, PreCopyPolicy, SaveReport};
use vfio_mig_session::transport::SOCKET_BUFFER;
use vfio_mig_session::{Error, Result};

/// Saves `devs` (running, or stopped) as one unit into `out` with `buffer`-byte device reads:
/// pre-copy under `pre_copy`'s policy when given (for the devices that support it), then
/// stop-and-copy, each device's phases reported to `obs`; returns the devices, stopped after
/// the handoff, and what was sent of each.
pub fn save<D: MigrationDevice, W: Write + ?Sized>(
    devs: Vec<D>,
    out: &mut W,
    buffer: usize,
    pre_copy: Option<&PreCopyPolicy>,
    obs: &dyn Observer,
) -> Result<(Vec<D>, Vec<SaveReport>)> {
    let opts = SourceOptions::new(Epoch(1))
        .pre_copy(pre_copy.is_some())
        .buffer(buffer);
    save_with(devs, out, &opts, pre_copy, obs)
}

/// [`save`] with the source's options given whole (a unit of devices without P2P states
/// needs `allow_non_p2p_unit`).
pub fn save_with<D: MigrationDevice, W: Write + ?Sized>(
    devs: Vec<D>,
    out: &mut W,
    opts: &SourceOptions,
    pre_copy: Option<&PreCopyPolicy>,
    obs: &dyn Observer,
) -> Result<(Vec<D>, Vec<SaveReport>)> {
    let mut source = Source::start(devs, opts).map_err(vfio_mig::Error::from)?;
    let sent = match pre_copy {
        Some(policy) => source.pre_copy(out, policy, obs).map(drop),
        None => Ok(()),
    };
    if let Err(e) = sent.and_then(|()| source.switch_over_observed(out, obs)) {
        drop(source.into_devices());
        return Err(e.into());
    }
    let finished = source.finish();
    if let Some(failure) = finished.stop_failures.first() {
        return Err(Error::invalid_input(format!(
            "bench: a source's STOP after the handoff failed: {failure}"
        )));
    }
    Ok((finished.devices, finished.reports))
}

/// Loads a stream from `input` into `devs` (each read into `buf`), each device's phase
/// reported to `obs`, and runs them; returns the devices and what each loaded.
pub fn load<D: MigrationDevice, R: Read + ?Sized>(
    devs: Vec<D>,
    input: &mut R,
    buf: &mut [u8],
    obs: &dyn Observer,
) -> Result<(Vec<D>, Vec<LoadReport>)> {
    let mut dst =
        Destination::new(devs, &DestinationOptions::new()).map_err(vfio_mig::Error::from)?;
    while dst.read_some(input, buf, obs)? != Status::Loaded {}
    let reports = dst.reports();
    let devs = dst.run().map_err(vfio_mig::Error::from)?;
    Ok((devs, reports))
}

/// Migrates `src` into `dst` in one process: the source on a thread of its own writes the
/// stream into a socketpair behind the session's write buffer ([`CoalescingWriter`]), the
/// destination reads it on the calling thread with `buffer`-byte reads. Returns both units'
/// devices (the sources stopped, the destinations running).
pub fn migrate<S, D>(
    src: Vec<S>,
    dst: Vec<D>,
    buffer: usize,
    src_obs: &(dyn Observer + Sync),
    dst_obs: &dyn Observer,
) -> Result<(Vec<S>, Vec<D>)>
where
    S: MigrationDevice + Send,
    D: MigrationDevice,
{
    let (tx, mut rx) = UnixStream::pair().map_err(|e| Error::transport("socketpair", e))?;
    std::thread::scope(|s| {
        let sender = s.spawn(move || {
            let mut out = CoalescingWriter::with_capacity(SOCKET_BUFFER, tx);
            let saved = save(src, &mut out, buffer, None, src_obs);
            // The destination sees the end of the stream whatever happened.
            drop(out);
            saved
        });
        let loaded = load(dst, &mut rx, &mut vec![0u8; buffer], dst_obs);
        drop(rx);
        let saved = sender
            .join()
            .map_err(|_| Error::invalid_input("bench: the source thread panicked"))?;
        let (src, _) = saved?;
        Ok((src, loaded?.0))
    })
}
