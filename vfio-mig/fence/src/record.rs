// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What a destination remembers of a device's handoffs, and the rules applied to a new one.

use crate::error::ReasonCode;
use crate::error::{Error, Result};
use vfio_mig::wire::SessionId;
use vfio_mig::wire::StreamHeader;

/// How many completed session ids a record keeps (the oldest are forgotten first).
pub const MAX_COMPLETED: usize = 64;

/// How far above the clock (milliseconds since 1970) an epoch may be: 24 hours. Default
/// epochs are the clock in milliseconds, and orchestrator counters are small, so only a
/// forged or broken epoch is further ahead; accepted, it would make every real handoff to
/// the device "stale" until the state file is removed. The lead is measured from the clock
/// only, never from the highest accepted epoch, so handoffs a day apart cannot walk the
/// record further and further ahead.
pub const MAX_EPOCH_LEAD: u64 = 24 * 60 * 60 * 1000;

/// The version of the record's file format.
pub const RECORD_VERSION: u32 = 1;

/// What the fence decided about a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Load it.
    Accept,
    /// This session was already completed here: the device runs its state. Do not load it
    /// again; answer idempotently.
    AlreadyCompleted,
}

/// The fencing state of one destination device: the highest epoch it accepted and the
/// sessions it completed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FenceRecord {
    /// Format version ([`RECORD_VERSION`]).
    pub version: u32,
    /// The device key the record belongs to.
    pub key: String,
    /// The highest epoch accepted (0: none yet).
    pub highest_epoch: u64,
    /// Completed session ids, hex, oldest first, at most [`MAX_COMPLETED`].
    pub completed: Vec<String>,
}

/// The first line of a record file: a magic word and the format version.
const RECORD_MAGIC: &str = "vfio-mig-fence";

/// The system clock in milliseconds since 1970 (0 if it is before).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Lower-case hex of a session id.
pub fn session_hex(s: &SessionId) -> String {
    s.iter().map(|b| format!("{b:02x}")).collect()
}

impl FenceRecord {
    /// An empty record for `key`.
    pub fn new(key: impl Into<String>) -> Self {
        Self {
            version: RECORD_VERSION,
            key: key.into(),
            ..Default::default()
        }
    }

    /// The record as its file text: a line `vfio-mig-fence VERSION`, then one `NAME VALUE`
    /// line per field (`key`, `highest-epoch`, and `completed` once per session id).
    pub fn to_text(&self) -> String {
        let mut text = format!(
            "{RECORD_MAGIC} {}\nkey {}\nhighest-epoch {}\n",
            self.version, self.key, self.highest_epoch
        );
        for session in &self.completed {
            text.push_str("completed ");
            text.push_str(session);
            text.push('\n');
        }
        text
    }

    /// Parses a record file's text. A version other than [`RECORD_VERSION`], a line this
    /// version does not know, a repeated field or a malformed value is an error: a record
    /// that is only partly understood must not decide what a handoff may do.
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let mut lines = text.lines();
        let first = lines.next().ok_or("empty file")?;
        let version = first
            .strip_prefix(RECORD_MAGIC)
            .and_then(|v| v.strip_prefix(' '))
            .ok_or_else(|| format!("not a fencing record (first line {first:?})"))?;
        let version: u32 = version
            .parse()
            .map_err(|_| format!("bad version {version:?}"))?;
        if version != RECORD_VERSION {
            return Err(format!(
                "record version {version}, this vfio-mig reads version {RECORD_VERSION}"
            ));
        }
        let mut record = FenceRecord {
            version,
            ..Default::default()
        };
        let (mut key, mut epoch) = (None, None);
        for line in lines {
            let (name, value) = line
                .split_once(' ')
                .ok_or_else(|| format!("malformed line {line:?}"))?;
            match name {
                "key" if key.is_none() => key = Some(value.to_owned()),
                "highest-epoch" if epoch.is_none() => {
                    epoch = Some(
                        value
                            .parse::<u64>()
                            .map_err(|_| format!("bad highest-epoch {value:?}"))?,
                    )
                }
                "completed" => {
                    if value.len() != 32 || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(format!("bad session id {value:?}"));
                    }
                    if record.completed.len() == MAX_COMPLETED {
                        return Err(format!("more than {MAX_COMPLETED} completed sessions"));
                    }
                    record.completed.push(value.to_ascii_lowercase());
                }
                _ => return Err(format!("unknown or repeated field {name:?}")),
            }
        }
        record.key = key.ok_or("no key")?;
        record.highest_epoch = epoch.ok_or("no highest-epoch")?;
        Ok(record)
    }

    /// Whether `session` was completed.
    pub fn is_completed(&self, session: &SessionId) -> bool {
        let hex = session_hex(session);
        self.completed.contains(&hex)
    }

    /// Applies the rules to a new stream, with the clock at `now_ms` (milliseconds since
    /// 1970): a completed session is answered idempotently (whatever its epoch); an epoch
    /// below the highest accepted is refused, and so is one above the highest accepted and
    /// more than [`MAX_EPOCH_LEAD`] above `now_ms`. The record does not change: the epoch
    /// becomes the highest accepted only once the handoff completed ([`Self::accept_epoch`]),
    /// so a peer that opens a session and goes away cannot move it. Returns the decision and
    /// whether the record changed (never, since fencing is recorded at completion).
    pub fn admit_at(&mut self, header: &StreamHeader, now_ms: u64) -> Result<(Admission, bool)> {
        if self.is_completed(&header.session_id) {
            return Ok((Admission::AlreadyCompleted, false));
        }
        if header.epoch < self.highest_epoch {
            return Err(Error::Refused {
                step: "check the session's epoch".into(),
                code: ReasonCode::StaleEpoch,
                detail: format!(
                    "stale epoch {} < {}: this device already accepted a later handoff (session {})",
                    header.epoch,
                    self.highest_epoch,
                    session_hex(&header.session_id)
                ),
            });
        }
        // The highest itself stays admissible on a host whose clock went back.
        let ceiling = now_ms
            .saturating_add(MAX_EPOCH_LEAD)
            .max(self.highest_epoch);
        if header.epoch > ceiling {
            return Err(Error::Refused {
                step: "check the session's epoch".into(),
                code: ReasonCode::Fence,
                detail: format!(
                    "epoch {} is more than {MAX_EPOCH_LEAD} above the clock in milliseconds \
                     ({now_ms}) and above the highest accepted epoch ({}): refused, it would \
                     fence out every later handoff (session {})",
                    header.epoch,
                    self.highest_epoch,
                    session_hex(&header.session_id)
                ),
            });
        }
        Ok((Admission::Accept, false))
    }

    /// [`Self::admit_at`] with the system clock.
    pub fn admit(&mut self, header: &StreamHeader) -> Result<(Admission, bool)> {
        self.admit_at(header, now_ms())
    }

    /// Raises the highest accepted epoch to `epoch` (never lowers it): called when a handoff
    /// with that epoch completed. Returns whether the record changed.
    pub fn accept_epoch(&mut self, epoch: u64) -> bool {
        let changed = epoch > self.highest_epoch;
        self.highest_epoch = self.highest_epoch.max(epoch);
        changed
    }

    /// Records `session` as completed.
    pub fn complete(&mut self, session: &SessionId) {
        if !self.is_completed(session) {
            self.completed.push(session_hex(session));
        }
        let excess = self.completed.len().saturating_sub(MAX_COMPLETED);
        self.completed.drain(..excess);
    }

    /// Forgets that `session` was completed (its resume failed after all).
    pub fn undo_complete(&mut self, session: &SessionId) {
        let hex = session_hex(session);
        self.completed.retain(|c| *c != hex);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_header as header;

    #[test]
    fn epochs_only_move_forward_and_completed_sessions_are_idempotent() {
        let mut r = FenceRecord::new("mock:a");
        assert_eq!(r.admit(&header(1, 5)).unwrap(), (Admission::Accept, false));
        assert!(r.accept_epoch(5));
        assert_eq!(r.admit(&header(2, 5)).unwrap(), (Admission::Accept, false));
        let e = r.admit(&header(3, 4)).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Refused {
                    code: ReasonCode::StaleEpoch,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("stale epoch 4 < 5"), "{e}");
        r.complete(&[2; 16]);
        r.complete(&[2; 16]);
        assert_eq!(r.completed.len(), 1);
        // A replay is answered idempotently even once its epoch is stale.
        r.admit(&header(9, 7)).unwrap();
        r.accept_epoch(7);
        assert_eq!(
            r.admit(&header(2, 5)).unwrap(),
            (Admission::AlreadyCompleted, false)
        );
        r.undo_complete(&[2; 16]);
        assert!(r.admit(&header(2, 5)).is_err());
    }

    /// A forged epoch far in the future would fence out every later handoff: refused.
    #[test]
    fn epochs_cannot_jump_without_bound() {
        let now = 1_700_000_000_000;
        let mut r = FenceRecord::new("mock:a");
        let e = r.admit_at(&header(1, u64::MAX), now).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Refused {
                    code: ReasonCode::Fence,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("more than"), "{e}");
        r.admit_at(&header(1, now + MAX_EPOCH_LEAD), now).unwrap();
        assert!(r
            .admit_at(&header(1, now + MAX_EPOCH_LEAD + 1), now)
            .is_err());
        // Small orchestrator counters stay fine; the bound follows the clock, not the highest
        // epoch (no ratchet), and the highest itself stays admissible.
        r.admit_at(&header(2, 3), now).unwrap();
        r.accept_epoch(now + MAX_EPOCH_LEAD);
        assert!(r
            .admit_at(&header(3, now + 2 * MAX_EPOCH_LEAD), now)
            .is_err());
        r.admit_at(&header(3, now + MAX_EPOCH_LEAD), now - 1000)
            .unwrap();
        // Admission alone changes nothing.
        assert_eq!(r.highest_epoch, now + MAX_EPOCH_LEAD);
    }

    #[test]
    fn completed_list_is_bounded() {
        let mut r = FenceRecord::new("k");
        for i in 0..(MAX_COMPLETED as u8 + 10) {
            r.complete(&[i; 16]);
        }
        assert_eq!(r.completed.len(), MAX_COMPLETED);
        assert!(!r.is_completed(&[0; 16]));
        assert!(r.is_completed(&[MAX_COMPLETED as u8 + 9; 16]));
    }
}
