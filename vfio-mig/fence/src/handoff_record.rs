// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What a fencing store keeps per device-state identity ([`HandoffRecord`]) and per claim
//! ([`ClaimRecord`]), as small line-based texts.

use std::fmt;

use super::record::MAX_COMPLETED;

/// The first line of a handoff record: a magic word and the format version.
const HANDOFF_MAGIC: &str = "vfio-mig-handoff 1";

/// A handoff that was begun and has not ended: the source stopped or may stop its device for
/// it, and only a destination that loads this session at this epoch may complete it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// The session id, hex.
    pub session: String,
    /// The epoch the store granted it.
    pub epoch: u64,
}

/// A completed handoff: who runs the state since.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The session id, hex.
    pub session: String,
    /// Its epoch.
    pub epoch: u64,
    /// The owner that completed it (and so ran the state).
    pub by: String,
}

/// The fencing state of one device-state identity in a store: who owns the state, the current
/// epoch, the handoff in flight and the last completed ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoffRecord {
    /// The device-state identity (chosen by the operator, e.g. `vm7/gpu0`).
    pub identity: String,
    /// The owner that runs the state, or hands it off now.
    pub owner: String,
    /// The current epoch: raised by every new handoff, never lowered.
    pub epoch: u64,
    /// The handoff in flight.
    pub pending: Option<Pending>,
    /// Completed handoffs, oldest first, at most [`MAX_COMPLETED`].
    pub completed: Vec<Completion>,
}

/// What a claim is held for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimRole {
    /// The source that began the handoff.
    Source,
    /// The destination that loads it.
    Destination,
}

impl fmt::Display for ClaimRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ClaimRole::Source => "source",
            ClaimRole::Destination => "destination",
        })
    }
}

/// Who drives a handoff now. A claim lives under its holder's lease: it ends when its holder
/// ends or stops renewing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRecord {
    /// The session id, hex.
    pub session: String,
    /// The holder's role.
    pub role: ClaimRole,
    /// The holder (an owner name).
    pub holder: String,
}

/// Whether `name` may be an owner or identity name: 1 to 200 bytes, no whitespace or control
/// characters (records are lines of space-separated words).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.chars().any(|c| c.is_whitespace() || c.is_control())
}

fn hex_session(text: &str) -> Result<String, String> {
    if text.len() == 32 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(text.to_ascii_lowercase())
    } else {
        Err(format!("bad session id {text:?}"))
    }
}

fn epoch(text: Option<&str>) -> Result<u64, String> {
    let text = text.ok_or("missing epoch")?;
    text.parse().map_err(|_| format!("bad epoch {text:?}"))
}

impl HandoffRecord {
    /// The record as text.
    pub fn to_text(&self) -> String {
        let mut t = format!(
            "{HANDOFF_MAGIC}\nidentity {}\nowner {}\nepoch {}\n",
            self.identity, self.owner, self.epoch
        );
        if let Some(p) = &self.pending {
            t.push_str(&format!("pending {} {}\n", p.session, p.epoch));
        }
        for c in &self.completed {
            t.push_str(&format!("completed {} {} {}\n", c.session, c.epoch, c.by));
        }
        t
    }

    /// Parses a record. Anything not understood in full is an error: a half-read record must
    /// not decide a handoff.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut lines = text.lines();
        if lines.next() != Some(HANDOFF_MAGIC) {
            return Err("not a handoff record (or another version)".into());
        }
        let (mut identity, mut owner, mut current) = (None, None, None);
        let (mut pending, mut completed) = (None, Vec::new());
        for line in lines {
            let words: Vec<&str> = line.split(' ').collect();
            match words.as_slice() {
                ["identity", v] if identity.is_none() && valid_name(v) => {
                    identity = Some(v.to_string())
                }
                ["owner", v] if owner.is_none() && valid_name(v) => owner = Some(v.to_string()),
                ["epoch", v] if current.is_none() => current = Some(epoch(Some(v))?),
                ["pending", s, e] if pending.is_none() => {
                    pending = Some(Pending {
                        session: hex_session(s)?,
                        epoch: epoch(Some(e))?,
                    })
                }
                ["completed", s, e, by] if valid_name(by) && completed.len() < MAX_COMPLETED => {
                    completed.push(Completion {
                        session: hex_session(s)?,
                        epoch: epoch(Some(e))?,
                        by: by.to_string(),
                    })
                }
                _ => return Err(format!("unknown, repeated or malformed line {line:?}")),
            }
        }
        Ok(Self {
            identity: identity.ok_or("no identity")?,
            owner: owner.ok_or("no owner")?,
            epoch: current.ok_or("no epoch")?,
            pending,
            completed,
        })
    }

    /// The completion of `session` (hex), if it completed.
    pub fn completion(&self, session: &str) -> Option<&Completion> {
        self.completed.iter().find(|c| c.session == session)
    }

    /// Records `session` completed by `by` at `epoch`: `by` becomes the owner, the handoff
    /// ends. The oldest completions are forgotten past [`MAX_COMPLETED`].
    pub fn complete(&mut self, session: &str, epoch: u64, by: &str) {
        self.owner = by.to_owned();
        self.pending = None;
        self.completed.push(Completion {
            session: session.to_owned(),
            epoch,
            by: by.to_owned(),
        });
        let excess = self.completed.len().saturating_sub(MAX_COMPLETED);
        self.completed.drain(..excess);
    }
}

impl ClaimRecord {
    /// The claim as text: `SESSION ROLE HOLDER`.
    pub fn to_text(&self) -> String {
        format!("{} {} {}", self.session, self.role, self.holder)
    }

    /// Parses a claim.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.split(' ').collect::<Vec<_>>().as_slice() {
            [s, role, holder] if valid_name(holder) => Ok(Self {
                session: hex_session(s)?,
                role: match *role {
                    "source" => ClaimRole::Source,
                    "destination" => ClaimRole::Destination,
                    r => return Err(format!("bad claim role {r:?}")),
                },
                holder: holder.to_string(),
            }),
            _ => Err(format!("malformed claim {text:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_reject_what_they_do_not_know() {
        let mut r = HandoffRecord {
            identity: "vm7/gpu0".into(),
            owner: "host-a".into(),
            epoch: 3,
            pending: Some(Pending {
                session: "ab".repeat(16),
                epoch: 3,
            }),
            completed: vec![],
        };
        r.complete(&"ab".repeat(16), 3, "host-b");
        assert_eq!(r.owner, "host-b");
        assert_eq!(r.pending, None);
        assert_eq!(HandoffRecord::parse(&r.to_text()).unwrap(), r);
        for bad in [
            "vfio-mig-handoff 2\nidentity a\nowner b\nepoch 1\n",
            "vfio-mig-handoff 1\nidentity a\nowner b\nepoch 1\nepoch 2\n",
            "vfio-mig-handoff 1\nidentity a\nowner b\nepoch 1\nlord x\n",
            "vfio-mig-handoff 1\nidentity a\nowner b\n",
        ] {
            assert!(HandoffRecord::parse(bad).is_err(), "{bad:?}");
        }
        let c = ClaimRecord {
            session: "01".repeat(16),
            role: ClaimRole::Destination,
            holder: "h".into(),
        };
        assert_eq!(ClaimRecord::parse(&c.to_text()).unwrap(), c);
        assert!(ClaimRecord::parse("x source h").is_err());
        assert!(!valid_name("a b") && !valid_name("") && valid_name("vm/dev:0"));
    }
}
