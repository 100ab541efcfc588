// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What a destination remembers of a device's handoffs, and the rules applied to a new one.

use crate::error::ReasonCode;
use crate::error::{Error, Result};
use crate::stream::SessionId;
use crate::stream::StreamHeader;

/// How many completed session ids a record keeps (the oldest are forgotten first).
pub const MAX_COMPLETED: usize = 64;

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

    /// Applies the rules to a new stream: a completed session is answered idempotently
    /// (whatever its epoch); an epoch below the highest accepted is refused; otherwise the
    /// epoch becomes the highest accepted. Returns the decision and whether the record
    /// changed.
    pub fn admit(&mut self, header: &StreamHeader) -> Result<(Admission, bool)> {
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
        let changed = header.epoch > self.highest_epoch;
        self.highest_epoch = header.epoch;
        Ok((Admission::Accept, changed))
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
    use crate::fence::test_header as header;

    #[test]
    fn epochs_only_move_forward_and_completed_sessions_are_idempotent() {
        let mut r = FenceRecord::new("mock:a");
        assert_eq!(r.admit(&header(1, 5)).unwrap(), (Admission::Accept, true));
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
        assert_eq!(
            r.admit(&header(2, 5)).unwrap(),
            (Admission::AlreadyCompleted, false)
        );
        r.undo_complete(&[2; 16]);
        assert!(r.admit(&header(2, 5)).is_err());
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
