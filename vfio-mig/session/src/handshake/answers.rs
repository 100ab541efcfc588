// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The source's side of the destination's answers: the writer that stops when the
//! destination speaks, reading an expected answer, the destination's reason for a broken
//! connection, and the errors past COMMIT (in doubt, past the point of no return).

use std::io::{self, Write};

use super::message::{read_message, Message, SessionId};
use crate::error::{Error, Result};
use crate::transport::Duplex;
use vfio_mig::Error as CoreError;
use vfio_mig::SaveReport;

/// The source's writing half: before every write it checks, without blocking, whether the
/// destination said something. During the transfer the destination only speaks to fail
/// (FAILED, or closing the connection), so the source stops at its next write instead of
/// streaming the rest of the state into a destination that gave up.
pub(super) struct Watched<C: Duplex>(pub(super) C);

impl<C: Duplex> Watched<C> {
    fn check(&self) -> io::Result<()> {
        if self.0.readable_now()? {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the destination ended the session",
            ));
        }
        Ok(())
    }
}

impl<C: Duplex> Write for Watched<C> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.check()?;
        self.0.write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.check()?;
        self.0.write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

pub(super) fn unexpected(msg: &Message, wanted: &str, step: &str) -> Error {
    Error::protocol(
        step,
        format!("the destination sent {msg} where {wanted} was expected"),
    )
}

/// Reads the destination's answer at `step`: `Ok(())` for a message of kind `wanted` (a
/// [`Message::kind`]) with this session, a [`Error::PeerFailed`] for FAILED, a protocol error
/// for anything else.
pub(super) fn expect(
    rx: &mut impl io::Read,
    session: &SessionId,
    wanted: u8,
    step: &str,
) -> Result<()> {
    let msg = read_message(rx, step)?;
    match &msg {
        m if m.kind() == wanted && m.session() == Some(session) => Ok(()),
        Message::Failed(r) => Err(Error::PeerFailed {
            step: step.to_owned(),
            detail: r.text.clone(),
        }),
        m => Err(Error::protocol(
            step,
            format!("the destination sent {m} (session {:02x?})", m.session()),
        )),
    }
}

/// After a transport error, reads what the destination said, if it said anything: its
/// FAILED reason explains the broken connection better than `EPIPE`; a closed connection is
/// named as such, at the step that found it.
pub(super) fn explain<C: Duplex>(err: Error, rx: &mut C) -> Error {
    let Some(CoreError::Transport { step, .. }) = err.as_core() else {
        return err;
    };
    if !rx.readable_now().unwrap_or(false) {
        return err;
    }
    match read_message(rx, "read the destination's reason") {
        Ok(Message::Failed(r)) | Ok(Message::Refuse(r)) => Error::PeerFailed {
            step: step.clone(),
            detail: r.text,
        },
        Ok(other) => unexpected(&other, "FAILED", step),
        Err(CoreError::Transport { source, .. })
            if source.kind() == io::ErrorKind::UnexpectedEof =>
        {
            Error::transport(
                step.clone(),
                io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the destination closed the connection",
                ),
            )
        }
        Err(_) => err,
    }
}

/// The source's error after PARTLY_RESUMED: the destination's account (`what`) and what
/// became of each source device (stopped, or its STOP failure, after which it was reset).
pub(super) fn past_no_return(
    names: &[String],
    reports: &[SaveReport],
    step: &str,
    what: &str,
) -> Error {
    let sources: Vec<String> = names
        .iter()
        .zip(reports)
        .map(|(name, r)| match &r.after_handoff {
            None => format!("{name} is stopped"),
            Some(why) => format!("{name} failed its STOP ({why})"),
        })
        .collect();
    Error::Core(vfio_mig::Error::PastNoReturn {
        step: step.into(),
        detail: format!(
            "the destination: {what}; not resumed here, the state must not run twice: {}",
            sources.join(", ")
        ),
    })
}

pub(super) fn in_doubt(names: &[String], session: &SessionId, what: String) -> Error {
    let hex: String = session.iter().map(|b| format!("{b:02x}")).collect();
    Error::InDoubt {
        step: "wait for RESUMED after COMMIT".into(),
        detail: format!(
            "{what}; the destination may be running the state, so {} is left stopped, not \
             resumed; retry with --session {hex} to ask the destination",
            names.join(", ")
        ),
    }
}
