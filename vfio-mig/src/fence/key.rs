// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Which device a command drives, as a stable key for its lock and fencing state.

use std::fmt;

use crate::error::{Error, Result};
use crate::mock::{is_mock, MockSpec};

/// The identity of a device for fencing: the canonical sysfs path of a real device, or
/// `mock:ID` for a mock with an `id=` option.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeviceKey(String);

impl DeviceKey {
    /// The key of device `name` (a sysfs path or a mock spec). A mock without `id=` exists
    /// only inside its process, so it has no key: it needs no lock and keeps no fencing
    /// state.
    pub fn for_device(name: &str) -> Result<Option<Self>> {
        if is_mock(name) {
            let spec: MockSpec = name.parse()?;
            return Ok(spec.id.map(|id| DeviceKey(format!("mock:{id}"))));
        }
        let path = std::fs::canonicalize(name).map_err(|e| {
            Error::Usage(format!(
                "{name}: no such device ({e}; expected a sysfs path such as \
                 /sys/bus/mdev/devices/<uuid>, or mock:v1)"
            ))
        })?;
        Ok(Some(DeviceKey(path.to_string_lossy().into_owned())))
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
    fn mock_keys_come_from_their_id() {
        assert_eq!(DeviceKey::for_device("mock:v1,size=1M").unwrap(), None);
        let k = DeviceKey::for_device("mock:v1,size=1M,id=vm7-gpu0")
            .unwrap()
            .unwrap();
        assert_eq!(k.as_str(), "mock:vm7-gpu0");
        assert!(
            k.file_stem().starts_with("mock_vm7-gpu0-"),
            "{}",
            k.file_stem()
        );
        assert!(DeviceKey::for_device("mock:v1,size=0").is_err());
    }

    #[test]
    fn paths_are_canonical_and_stems_distinct() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("dev")).unwrap();
        let a = DeviceKey::for_device(dir.path().join("dev/../dev").to_str().unwrap())
            .unwrap()
            .unwrap();
        let b = DeviceKey::for_device(dir.path().join("dev").to_str().unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(a, b);
        assert!(DeviceKey::for_device("/nonexistent/dev")
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
