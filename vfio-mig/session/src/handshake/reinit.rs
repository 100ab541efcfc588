// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The source's answer to a device that re-initialised its pre-copy data after the
//! destination acknowledged it: the acknowledgement is not final. As QEMU 11.1 (its final
//! `save_query_pending` at the switch-over and its re-usable switchover-ack), the source asks
//! every device once more before it stops any; a device that reports
//! `VFIO_PRECOPY_INFO_REINIT` has its pre-copy reopened in the stream with the new initial
//! data, and the source waits for one SWITCHOVER_ACK_AGAIN per reopened device before it
//! asks again.

use super::answers::expect;
use super::message::{Message, SessionId};
use crate::error::{Error, Result};
use vfio_mig::PreCopyPolicy;
use vfio_mig::SaveOptions;

/// Runs `resend` (which reopens the pre-copy of every device that re-initialised, hands the
/// stream back flushed, and says how many it reopened) and waits for the destination's
/// acknowledgements, until no device re-initialised ([`reack_passes`]).
pub(super) fn reack_after_reinit<W>(
    rx: &mut impl std::io::Read,
    session: &SessionId,
    opts: &SaveOptions,
    out: W,
    mut resend: impl FnMut(W) -> Result<(W, usize)>,
) -> Result<W> {
    let mut held = Some(out);
    reack_passes(rx, session, &opts.policy, || {
        let out = held.take().ok_or_else(lost_stream)?;
        let (next, reopened) = resend(out)?;
        held = Some(next);
        Ok(reopened)
    })?;
    held.ok_or_else(lost_stream)
}

fn lost_stream() -> Error {
    vfio_mig::Error::InvalidInput("re-acknowledge: the stream was lost on an earlier error".into())
        .into()
}

/// Runs `resend` (which reopens the pre-copy of every device that re-initialised and says how
/// many it reopened) and waits for one SWITCHOVER_ACK_AGAIN per reopened device, until no
/// device re-initialised. After `policy.max_rounds` passes the switch-over goes ahead (the
/// last new data then moves in stop-and-copy), or, with a strict downtime, the migration
/// fails.
pub(super) fn reack_passes(
    rx: &mut impl std::io::Read,
    session: &SessionId,
    policy: &PreCopyPolicy,
    mut resend: impl FnMut() -> Result<usize>,
) -> Result<()> {
    let again = Message::SwitchoverAckAgain { session: *session }.kind();
    let passes = policy.max_rounds.max(1);
    for _ in 0..passes {
        let reopened = resend()?;
        if reopened == 0 {
            return Ok(());
        }
        for _ in 0..reopened {
            expect(
                rx,
                session,
                again,
                "wait for the destination's SWITCHOVER_ACK_AGAIN (a device re-initialised its pre-copy data)",
            )?;
        }
    }
    let why = format!(
        "devices kept re-initialising their pre-copy data (REINIT) after {passes} \
         acknowledged passes"
    );
    if policy.strict {
        return Err(vfio_mig::Error::PreCopy(why).into());
    }
    log::warn!("{why}: switching over; new initial data moves in stop-and-copy");
    Ok(())
}
