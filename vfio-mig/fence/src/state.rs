// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The fencing state of a device on disk: one small JSON file per device in the state
//! directory, replaced atomically (temporary file, fsync, rename, fsync of the directory).

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use super::record::{Admission, FenceRecord};
use super::{DeviceKey, Fence};
use crate::error::ReasonCode;
use crate::error::{Error, Result};
use vfio_mig::wire::SessionId;
use vfio_mig::wire::StreamHeader;

/// A [`Fence`] kept in `<state dir>/<key stem>.fence`. Every operation re-reads the file, so
/// the state survives restarts of `recv`; the caller holds the device lock, so nobody else
/// writes it meanwhile.
#[derive(Debug, Clone)]
pub struct StateFence {
    dir: PathBuf,
    path: PathBuf,
    key: DeviceKey,
    /// The session admitted last and its epoch, recorded when it completes.
    admitted: Option<(SessionId, u64)>,
    /// A completion written beside the record, not yet in its place
    /// ([`Fence::prepare_complete`]).
    prepared: Option<(SessionId, PathBuf)>,
}

fn fence_err(step: String, detail: impl Into<String>) -> Error {
    Error::Refused {
        step,
        code: ReasonCode::Fence,
        detail: detail.into(),
    }
}

impl StateFence {
    /// The fencing state of `key` in `dir` (created on the first write).
    pub fn new(dir: &Path, key: &DeviceKey) -> Self {
        Self {
            dir: dir.to_owned(),
            path: dir.join(format!("{}.fence", key.file_stem())),
            key: key.clone(),
            admitted: None,
            prepared: None,
        }
    }

    /// The state file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the record (an empty one if the file does not exist). A file that does not
    /// parse is an error, not an empty record: forgetting the fencing state would let a
    /// stale or replayed stream in.
    pub fn load(&self) -> Result<FenceRecord> {
        let text = match read_no_follow(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(FenceRecord::new(self.key.as_str()))
            }
            Err(e) => {
                return Err(fence_err(
                    format!("read fencing state {}", self.path.display()),
                    e.to_string(),
                ))
            }
        };
        let record = FenceRecord::parse(&text).map_err(|e| {
            fence_err(
                format!("read fencing state {}", self.path.display()),
                format!("corrupt ({e}); remove the file to reset the device's fencing state"),
            )
        })?;
        if record.key != self.key.as_str() {
            return Err(fence_err(
                format!("read fencing state {}", self.path.display()),
                format!(
                    "the file belongs to device {}, not {}",
                    record.key, self.key
                ),
            ));
        }
        Ok(record)
    }

    /// Replaces the record atomically.
    pub fn store(&self, record: &FenceRecord) -> Result<()> {
        let tmp = self.write_beside(record)?;
        self.install(&tmp)
    }

    /// Writes `record` to a new temporary file beside the record, synced; returns its path.
    fn write_beside(&self, record: &FenceRecord) -> Result<PathBuf> {
        let step = || format!("write fencing state {}", self.path.display());
        let io_err = |e: io::Error| fence_err(step(), e.to_string());
        super::private::private_dir(&self.dir).map_err(io_err)?;
        // A fresh name each time, created with O_EXCL: an existing file or symlink there is
        // never written through.
        let tmp = self.dir.join(format!(
            ".{}.tmp.{}.{:016x}",
            self.key.file_stem(),
            std::process::id(),
            random_u64()
        ));
        if record.key.contains('\n') {
            return Err(fence_err(
                step(),
                "a device key must not hold a line break".to_owned(),
            ));
        }
        let text = record.to_text();
        let written = (|| {
            let mut f = super::private::open_private(
                &tmp,
                std::fs::OpenOptions::new().write(true).create_new(true),
            )?;
            f.write_all(text.as_bytes())?;
            f.sync_all()
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io_err(e));
        }
        Ok(tmp)
    }

    /// Puts a record written by [`StateFence::write_beside`] in its place (a rename: it
    /// needs no space).
    fn install(&self, tmp: &Path) -> Result<()> {
        let installed = std::fs::rename(tmp, &self.path)
            .and_then(|()| File::open(&self.dir).and_then(|d| d.sync_all()));
        if installed.is_err() {
            let _ = std::fs::remove_file(tmp);
        }
        installed.map_err(|e| {
            fence_err(
                format!("write fencing state {}", self.path.display()),
                e.to_string(),
            )
        })
    }

    /// The record with `session` completed.
    fn completed(&self, session: &SessionId) -> Result<FenceRecord> {
        let mut record = self.load()?;
        record.complete(session);
        // The epoch counts from now on: the handoff that carried it completed.
        if let Some((admitted, epoch)) = self.admitted {
            if admitted == *session {
                record.accept_epoch(epoch);
            }
        }
        Ok(record)
    }

    /// The highest epoch recorded for the device (0 if none).
    pub fn highest_epoch(&self) -> Result<u64> {
        Ok(self.load()?.highest_epoch)
    }
}

/// Reads a regular file, refusing a symlink, a FIFO or any other kind of file at its path
/// ([`super::private::open_private`]).
fn read_no_follow(path: &Path) -> io::Result<String> {
    let mut f = super::private::open_private(path, std::fs::OpenOptions::new().read(true))?;
    let mut text = String::new();
    f.read_to_string(&mut text)?;
    Ok(text)
}

/// 64 random bits for a temporary name (the time if the random source fails).
fn random_u64() -> u64 {
    match vfio_mig::new_session_id() {
        Ok(id) => id.iter().take(8).fold(0, |a, b| a << 8 | u64::from(*b)),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    }
}

impl Fence for StateFence {
    fn admit(&mut self, header: &StreamHeader) -> Result<Admission> {
        let mut record = self.load()?;
        let (admission, changed) = record.admit(header)?;
        if changed {
            self.store(&record)?;
        }
        if admission == Admission::Accept {
            self.admitted = Some((header.session_id, header.epoch));
        }
        Ok(admission)
    }

    fn complete(&mut self, session: &SessionId) -> Result<()> {
        match self.prepared.take() {
            Some((prepared, tmp)) if prepared == *session => self.install(&tmp),
            other => {
                if let Some((_, tmp)) = other {
                    let _ = std::fs::remove_file(tmp);
                }
                let record = self.completed(session)?;
                self.store(&record)
            }
        }
    }

    fn prepare_complete(&mut self, session: &SessionId) -> Result<()> {
        self.discard_prepared();
        let record = self.completed(session)?;
        self.prepared = Some((*session, self.write_beside(&record)?));
        Ok(())
    }

    fn discard_prepared(&mut self) {
        if let Some((_, tmp)) = self.prepared.take() {
            let _ = std::fs::remove_file(tmp);
        }
    }

    fn undo_complete(&mut self, session: &SessionId) -> Result<()> {
        let mut record = self.load()?;
        record.undo_complete(session);
        self.store(&record)
    }
}

impl Drop for StateFence {
    fn drop(&mut self) {
        self.discard_prepared();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_header as header;

    /// A prepared completion changes nothing until it completes; a discarded one leaves no
    /// file behind.
    #[test]
    fn a_prepared_completion_takes_effect_only_when_completed() {
        let dir = tempfile::tempdir().unwrap();
        let key = DeviceKey::from_text("mock:p");
        let mut f = StateFence::new(dir.path(), &key);
        assert_eq!(f.admit(&header(3, 5)).unwrap(), Admission::Accept);
        f.prepare_complete(&[3; 16]).unwrap();
        assert!(f.load().unwrap().completed.is_empty());
        f.complete(&[3; 16]).unwrap();
        assert_eq!(f.load().unwrap().completed.len(), 1);
        f.prepare_complete(&[4; 16]).unwrap();
        f.discard_prepared();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        assert_eq!(f.load().unwrap().completed.len(), 1);
    }

    #[test]
    fn state_persists_across_instances() {
        let dir = tempfile::tempdir().unwrap();
        let key = DeviceKey::from_text("mock:x");
        let mut f = StateFence::new(&dir.path().join("state"), &key);
        assert!(!f.path().exists());
        // Admitted but never completed: the epoch is not recorded.
        assert_eq!(f.admit(&header(3, 20)).unwrap(), Admission::Accept);
        assert_eq!(f.highest_epoch().unwrap(), 0);
        assert_eq!(f.admit(&header(1, 10)).unwrap(), Admission::Accept);
        f.complete(&[1; 16]).unwrap();
        let mut g = StateFence::new(&dir.path().join("state"), &key);
        assert_eq!(g.highest_epoch().unwrap(), 10);
        assert_eq!(
            g.admit(&header(1, 10)).unwrap(),
            Admission::AlreadyCompleted
        );
        assert!(g
            .admit(&header(2, 9))
            .unwrap_err()
            .to_string()
            .contains("stale epoch 9 < 10"));
        g.undo_complete(&[1; 16]).unwrap();
        assert_eq!(f.admit(&header(1, 10)).unwrap(), Admission::Accept);
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("state"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn corrupt_or_foreign_files_refuse_everything() {
        let dir = tempfile::tempdir().unwrap();
        let key = DeviceKey::from_text("mock:x");
        let mut f = StateFence::new(dir.path(), &key);
        std::fs::write(f.path(), b"{ not a record").unwrap();
        let e = f.admit(&header(1, 1)).unwrap_err().to_string();
        assert!(
            e.contains("corrupt") && e.contains("remove the file"),
            "{e}"
        );
        std::fs::write(f.path(), b"vfio-mig-fence 1\nkey mock:y\nhighest-epoch 0\n").unwrap();
        let e = f.admit(&header(1, 1)).unwrap_err().to_string();
        assert!(e.contains("belongs to device mock:y"), "{e}");
        // A later version, or a field this version does not know, is not half-understood.
        for text in [
            "vfio-mig-fence 2\nkey mock:x\nhighest-epoch 0\n",
            "vfio-mig-fence 1\nkey mock:x\nhighest-epoch 0\nowner someone\n",
            "vfio-mig-fence 1\nkey mock:x\nhighest-epoch 0\nhighest-epoch 9\n",
        ] {
            std::fs::write(f.path(), text).unwrap();
            let e = f.admit(&header(1, 1)).unwrap_err().to_string();
            assert!(e.contains("corrupt"), "{text:?}: {e}");
        }
    }
}
