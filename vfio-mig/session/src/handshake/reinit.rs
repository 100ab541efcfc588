// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The source's answer to a device that re-initialised its pre-copy data after the
//! destination acknowledged it: the acknowledgement is not final. As QEMU 11.1 (its final
//! `save_query_pending` at the switch-over and its re-usable switchover-ack), the source asks
//! every device once more before it stops any; a device that reports
//! `VFIO_PRECOPY_INFO_REINIT` has its pre-copy reopened in the stream with the new initial
//! data, and the source waits for one SWITCHOVER_ACK_AGAIN per reopened device before it
//! asks again.

use super::message::{Message, SessionId};
use super::source::expect;
use crate::error::Result;
use vfio_mig::engine::SaveOptions;

/// Runs `resend` (which reopens the pre-copy of every device that re-initialised, hands the
/// stream back flushed, and says how many it reopened) and waits for the destination's
/// acknowledgements, until no device re-initialised. After `opts.policy.max_rounds` passes
/// the switch-over goes ahead (the last new data then moves in stop-and-copy), or, with a
/// strict downtime, the migration fails.
pub(super) fn reack_after_reinit<W>(
    rx: &mut impl std::io::Read,
    session: &SessionId,
    opts: &SaveOptions,
    mut out: W,
    mut resend: impl FnMut(W) -> Result<(W, usize)>,
) -> Result<W> {
    let again = Message::SwitchoverAckAgain { session: *session }.kind();
    let passes = opts.policy.max_rounds.max(1);
    for _ in 0..passes {
        let (next, reopened) = resend(out)?;
        out = next;
        if reopened == 0 {
            return Ok(out);
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
    if opts.policy.strict {
        return Err(vfio_mig::Error::PreCopy(why).into());
    }
    log::warn!("{why}: switching over; new initial data moves in stop-and-copy");
    Ok(out)
}
