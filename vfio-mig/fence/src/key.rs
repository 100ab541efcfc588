// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Which device a command drives, as a stable key for its lock and fencing state.

use std::fmt;

use crate::error::{Error, Result};

/// The identity of a device for fencing: the canonical sysfs path of a real device, or any
/// stable name the caller chooses (the mock device uses `mock:ID`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeviceKey(String);

impl DeviceKey {
    /// The key of the real device at sysfs path `path`: its canonical path, so that two
    /// spellings of one device share a lock and fencing state.
    pub fn for_path(path: &str) -> Result<Self> {
        let canonical = std::fs::canonicalize(path).map_err(|e| {
            Error::invalid_input(format!(
                "{path}: no such device ({e}; expected a sysfs path such as \
                 /sys/bus/mdev/devices/<uuid>)"
            ))
        })?;
        Ok(DeviceKey(canonical.to_string_lossy().into_owned()))
    }

    /// A key from its text (for tests and tools).
    pub fn from_text(text: impl Into<String>) -> Self {
        DeviceKey(text.into())
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A file name stem for the key's lock and state files: the key with every byte
    /// outside `[A-Za-z0-9._-]` replaced by `_`, cut to 100 bytes, then `-` and the key's
    /// CRC32C, so that distinct keys never share a file.
    pub fn file_stem(&self) -> String {
        let mut clean: String = self
            .0
            .trim_start_matches('/')
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '_'
                }
            })
            .take(100)
            .collect();
        if clean.starts_with('.') {
            clean.insert(0, '_');
        }
        format!("{clean}-{:08x}", crc32c::crc32c(self.0.as_bytes()))
    }
}

impl fmt::Display for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_canonical_and_stems_distinct() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("dev")).unwrap();
        let a = DeviceKey::for_path(dir.path().join("dev/../dev").to_str().unwrap()).unwrap();
        let b = DeviceKey::for_path(dir.path().join("dev").to_str().unwrap()).unwrap();
        assert_eq!(a, b);
        assert!(DeviceKey::for_path("/nonexistent/dev")
            .unwrap_err()
            .to_string()
            .contains("no such device"));
        let x = DeviceKey::from_text("a/b");
        let y = DeviceKey::from_text("a_b");
        assert_ne!(x.file_stem(), y.file_stem());
        assert!(!DeviceKey::from_text("..").file_stem().starts_with('.'));
        assert!(DeviceKey::from_text("x".repeat(500)).file_stem().len() < 120);
    }
}
