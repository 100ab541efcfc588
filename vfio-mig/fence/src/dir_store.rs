// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The embedded fencing store: one host's directory. Every operation takes an exclusive
//! `flock(2)` on `<dir>/.lock`, reads the one store file, and replaces it atomically
//! (temporary file, fsync, rename, fsync of the directory) when it changed, so the processes
//! of one host see one linearizable store and a crash never leaves half a transaction.
//!
//! The directory is created 0700 and its files 0600 whatever the umask; a directory that
//! another user owns or that group or others may write is refused (they could replace the
//! store), and no file is opened through a symbolic link.
//!
//! Lease deadlines are wall-clock times (the processes share no monotonic clock): a clock
//! step on the host shortens or lengthens the leases alive at that moment.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};

use super::private::{open_private, private_dir};
use super::store::{store_error, Condition, Entry, FenceStore, LeaseId, Revision, Write};
use crate::error::Result;

/// The first line of the store file.
const STORE_MAGIC: &str = "vfio-mig-store 1";

/// A [`FenceStore`] in a directory of this host.
#[derive(Debug, Clone)]
pub struct DirStore {
    dir: PathBuf,
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    deadline_ms: u64,
    ttl_ms: u64,
}

#[derive(Debug, Clone)]
struct Stored {
    value: Vec<u8>,
    revision: Revision,
    lease: Option<i64>,
}

#[derive(Debug, Default)]
struct State {
    revision: Revision,
    leases: BTreeMap<i64, Lease>,
    entries: BTreeMap<String, Stored>,
}

/// The next revision after `revision`; the counter ends with an error rather than wrap to
/// revisions already handed out (the compare-and-swap would then accept stale reads). A
/// lease id is a revision too, and etcd's lease ids are positive int64s.
fn next_revision(revision: Revision) -> std::result::Result<Revision, String> {
    revision
        .checked_add(1)
        .ok_or_else(|| "the store's revision counter is exhausted".to_owned())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> std::result::Result<Vec<u8>, String> {
    if text.len() % 2 != 0 || !text.is_ascii() {
        return Err(format!("bad hex {text:?}"));
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).map_err(|_| format!("bad hex {text:?}")))
        .collect()
}

fn number<T: std::str::FromStr>(text: Option<&str>, what: &str) -> std::result::Result<T, String> {
    let text = text.ok_or_else(|| format!("missing {what}"))?;
    text.parse().map_err(|_| format!("bad {what} {text:?}"))
}

impl State {
    fn parse(text: &str) -> std::result::Result<Self, String> {
        let mut lines = text.lines();
        if lines.next() != Some(STORE_MAGIC) {
            return Err("not a vfio-mig store file (or another version)".into());
        }
        let mut state = State::default();
        let mut revision = None;
        for line in lines {
            let mut words = line.split(' ');
            match words.next() {
                Some("revision") if revision.is_none() => {
                    revision = Some(number(words.next(), "revision")?)
                }
                Some("lease") => {
                    let id = number(words.next(), "lease id")?;
                    let deadline_ms = number(words.next(), "lease deadline")?;
                    let ttl_ms = number(words.next(), "lease ttl")?;
                    state.leases.insert(
                        id,
                        Lease {
                            deadline_ms,
                            ttl_ms,
                        },
                    );
                }
                Some("entry") => {
                    let rev = number(words.next(), "entry revision")?;
                    let lease = match words.next() {
                        Some("-") => None,
                        l => Some(number(l, "entry lease")?),
                    };
                    let key = String::from_utf8(unhex(words.next().unwrap_or(""))?)
                        .map_err(|_| "a key is not UTF-8".to_owned())?;
                    let value = unhex(words.next().unwrap_or(""))?;
                    state.entries.insert(
                        key,
                        Stored {
                            value,
                            revision: rev,
                            lease,
                        },
                    );
                }
                _ => return Err(format!("unknown or repeated line {line:?}")),
            }
            if words.next().is_some() {
                return Err(format!("trailing words in {line:?}"));
            }
        }
        state.revision = revision.ok_or("no revision")?;
        Ok(state)
    }

    fn to_text(&self) -> String {
        let mut text = format!("{STORE_MAGIC}\nrevision {}\n", self.revision);
        for (id, l) in &self.leases {
            text.push_str(&format!("lease {id} {} {}\n", l.deadline_ms, l.ttl_ms));
        }
        for (key, e) in &self.entries {
            let lease = e.lease.map_or("-".to_owned(), |l| l.to_string());
            text.push_str(&format!(
                "entry {} {lease} {} {}\n",
                e.revision,
                hex(key.as_bytes()),
                hex(&e.value)
            ));
        }
        text
    }

    /// Drops expired leases and their keys; whether anything changed.
    fn expire(&mut self, now: u64) -> bool {
        let expired: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline_ms <= now)
            .map(|(id, _)| *id)
            .collect();
        self.drop_leases(&expired)
    }

    fn drop_leases(&mut self, ids: &[i64]) -> bool {
        if ids.is_empty() {
            return false;
        }
        for id in ids {
            self.leases.remove(id);
        }
        self.entries
            .retain(|_, e| !e.lease.is_some_and(|l| ids.contains(&l)));
        // Like etcd, an expiry is a write: it raises the revision (saturating: the next
        // write reports the exhausted counter).
        self.revision = self.revision.saturating_add(1);
        true
    }
}

impl DirStore {
    /// The store in `dir` (created on first use).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn file(&self) -> PathBuf {
        self.dir.join("store")
    }

    /// Runs `f` on the store under the lock; writes the state back if `f` (or an expiry)
    /// changed it. `f` returns its answer and whether it changed the state.
    fn locked<T>(
        &self,
        step: &str,
        f: impl FnOnce(&mut State) -> std::result::Result<(T, bool), String>,
    ) -> Result<T> {
        let fail = |e: &dyn std::fmt::Display| store_error(self, step, e);
        private_dir(&self.dir).map_err(|e| fail(&format!("{}: {e}", self.dir.display())))?;
        let lock = open_private(
            &self.dir.join(".lock"),
            OpenOptions::new().read(true).write(true).create(true),
        )
        .map_err(|e| fail(&e))?;
        let _held = Flock::lock(lock, FlockArg::LockExclusive).map_err(|(_, e)| fail(&e))?;
        let read = open_private(&self.file(), OpenOptions::new().read(true)).and_then(|mut f| {
            let mut text = String::new();
            io::Read::read_to_string(&mut f, &mut text).map(|_| text)
        });
        let mut state = match read {
            Ok(text) => State::parse(&text).map_err(|e| {
                fail(&format!(
                    "{} is corrupt ({e}); refusing every handoff until it is repaired",
                    self.file().display()
                ))
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(fail(&e)),
        };
        let expired = state.expire(now_ms());
        let (answer, changed) = f(&mut state).map_err(|e| fail(&e))?;
        if changed || expired {
            self.store(&state).map_err(|e| fail(&e))?;
        }
        Ok(answer)
    }

    fn store(&self, state: &State) -> io::Result<()> {
        let tmp = self.dir.join(format!(".store.tmp.{}", std::process::id()));
        // A name left by a crash, or planted: removed (a link, not its target), then made
        // anew, exclusively.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let written = (|| {
            let mut f = open_private(&tmp, OpenOptions::new().write(true).create_new(true))?;
            f.write_all(state.to_text().as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, self.file())?;
            File::open(&self.dir)?.sync_all()
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }
}

impl FenceStore for DirStore {
    fn describe(&self) -> String {
        format!("dir:{}", self.dir.display())
    }

    fn get(&self, key: &str) -> Result<Option<Entry>> {
        self.locked("read the fencing store", |s| {
            let entry = s.entries.get(key).map(|e| Entry {
                value: e.value.clone(),
                revision: e.revision,
            });
            Ok((entry, false))
        })
    }

    fn commit(&self, conditions: &[Condition], writes: &[Write]) -> Result<Option<Revision>> {
        self.locked("write the fencing store", |s| {
            let holds = conditions
                .iter()
                .all(|c| s.entries.get(&c.key).map_or(0, |e| e.revision) == c.revision);
            if !holds {
                return Ok((None, false));
            }
            s.revision = next_revision(s.revision)?;
            let revision = s.revision;
            for w in writes {
                match w {
                    Write::Put { key, value, lease } => {
                        if let Some(l) = lease {
                            if !s.leases.contains_key(&l.0) {
                                return Err(format!("lease {l} not found (it expired)"));
                            }
                        }
                        s.entries.insert(
                            key.clone(),
                            Stored {
                                value: value.clone(),
                                revision,
                                lease: lease.map(|l| l.0),
                            },
                        );
                    }
                    Write::Delete { key } => {
                        s.entries.remove(key);
                    }
                }
            }
            Ok((Some(revision), true))
        })
    }

    fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        self.locked("grant a lease", |s| {
            s.revision = next_revision(s.revision)?;
            let id = i64::try_from(s.revision)
                .map_err(|_| "the store's revision counter is past the last lease id".to_owned())?;
            let ttl_ms = ttl.as_millis().max(1) as u64;
            s.leases.insert(
                id,
                Lease {
                    deadline_ms: now_ms() + ttl_ms,
                    ttl_ms,
                },
            );
            Ok((LeaseId(id), true))
        })
    }

    fn keep_alive(&self, lease: LeaseId) -> Result<bool> {
        self.locked("keep a lease alive", |s| match s.leases.get_mut(&lease.0) {
            Some(l) => {
                l.deadline_ms = now_ms() + l.ttl_ms;
                Ok((true, true))
            }
            None => Ok((false, false)),
        })
    }

    fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.locked("revoke a lease", |s| {
            let changed = s.leases.contains_key(&lease.0) && s.drop_leases(&[lease.0]);
            Ok(((), changed))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &str, lease: Option<LeaseId>) -> Write {
        Write::Put {
            key: key.into(),
            value: value.into(),
            lease,
        }
    }

    #[test]
    fn compare_and_swap_on_revisions() {
        let dir = tempfile::tempdir().unwrap();
        let s = DirStore::new(dir.path());
        assert_eq!(s.get("a").unwrap(), None);
        let absent = Condition {
            key: "a".into(),
            revision: 0,
        };
        let r1 = s
            .commit(std::slice::from_ref(&absent), &[put("a", "1", None)])
            .unwrap();
        let r1 = r1.expect("the key was absent");
        // The same create again fails: the key exists now.
        assert_eq!(s.commit(&[absent], &[put("a", "2", None)]).unwrap(), None);
        let e = s.get("a").unwrap().unwrap();
        assert_eq!((e.value.as_slice(), e.revision), (&b"1"[..], r1));
        let at_r1 = Condition {
            key: "a".into(),
            revision: r1,
        };
        let r2 = s
            .commit(
                std::slice::from_ref(&at_r1),
                &[put("a", "2", None), put("b", "x", None)],
            )
            .unwrap()
            .unwrap();
        assert!(r2 > r1);
        assert_eq!(s.commit(&[at_r1], &[put("a", "3", None)]).unwrap(), None);
        assert_eq!(s.get("b").unwrap().unwrap().revision, r2);
        // A second instance (another process) sees the same state.
        assert_eq!(
            DirStore::new(dir.path()).get("a").unwrap().unwrap().value,
            b"2"
        );
    }

    #[test]
    fn keys_die_with_their_lease() {
        let dir = tempfile::tempdir().unwrap();
        let s = DirStore::new(dir.path());
        let l = s.grant_lease(Duration::from_secs(60)).unwrap();
        s.commit(&[], &[put("k", "v", Some(l))]).unwrap().unwrap();
        assert!(s.keep_alive(l).unwrap());
        s.revoke_lease(l).unwrap();
        assert_eq!(s.get("k").unwrap(), None);
        assert!(!s.keep_alive(l).unwrap());
        let e = s
            .commit(&[], &[put("k", "v", Some(l))])
            .unwrap_err()
            .to_string();
        assert!(e.contains("not found"), "{e}");
    }

    #[test]
    fn a_corrupt_store_refuses() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("store"), "vfio-mig-store 1\nrevision x\n").unwrap();
        let e = DirStore::new(dir.path()).get("a").unwrap_err().to_string();
        assert!(e.contains("corrupt") && e.contains("dir:"), "{e}");
    }
}
