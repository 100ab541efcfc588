// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Command-line options of locks and fencing state, shared by every command.

use std::path::PathBuf;

use clap::Args;

use vfio_mig::error::{Error, Result};
use vfio_mig::fence::FenceConfig;
use vfio_mig::handshake::SessionId;

/// Where device locks and destination fencing state live (options of every command).
#[derive(Debug, Args, Clone)]
pub struct FenceArgs {
    /// Directory of the device lock files.
    #[arg(long, global = true, value_name = "DIR", env = "VFIO_MIG_LOCK_DIR",
          default_value = vfio_mig::fence::DEFAULT_LOCK_DIR)]
    pub lock_dir: PathBuf,
    /// Directory of the destination fencing state (highest epoch, completed sessions).
    #[arg(long, global = true, value_name = "DIR", env = "VFIO_MIG_STATE_DIR",
          default_value = vfio_mig::fence::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}

impl FenceArgs {
    /// The directories: options, else environment, else defaults.
    pub fn config(&self) -> FenceConfig {
        FenceConfig::new(&self.lock_dir, &self.state_dir)
    }
}

/// Parses a session id: 32 hex digits.
pub fn parse_session(text: &str) -> Result<SessionId> {
    let bad = || Error::InvalidInput(format!("--session `{text}`: expected 32 hex digits"));
    if text.len() != 32 || !text.is_ascii() {
        return Err(bad());
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_parse_from_hex() {
        let id = parse_session("00112233445566778899aabbccddeeFF").unwrap();
        assert_eq!(id[0], 0);
        assert_eq!(id[15], 0xff);
        assert!(parse_session("0011").is_err());
        assert!(parse_session("zz112233445566778899aabbccddeeff").is_err());
        assert!(parse_session("é0112233445566778899aabbccddeef").is_err());
    }
}
