// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The vfio-user message format (libvfio-user's `include/vfio-user.h`, QEMU's
//! `docs/interop/vfio-user.rst`): a 16-byte little-endian header, then the command's payload.
//! Pure encoding and decoding, no I/O.

use std::fmt;

/// Size of [`Header`] on the wire.
pub const HEADER_SIZE: usize = 16;

/// `VFIO_USER_F_TYPE_MASK`: the message type bits of the header flags.
pub const F_TYPE_MASK: u32 = 0xf;
/// `VFIO_USER_F_TYPE_COMMAND`.
pub const F_TYPE_COMMAND: u32 = 0x0;
/// `VFIO_USER_F_TYPE_REPLY`.
pub const F_TYPE_REPLY: u32 = 0x1;
/// `VFIO_USER_F_NO_REPLY`: the sender expects no reply.
pub const F_NO_REPLY: u32 = 0x10;
/// `VFIO_USER_F_ERROR`: the reply carries an errno in `error_no` and no payload.
pub const F_ERROR: u32 = 0x20;

/// The vfio-user commands this client sends or may receive (`enum vfio_user_command`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Command {
    /// `VFIO_USER_VERSION`: negotiation, the first message.
    Version = 1,
    /// `VFIO_USER_DEVICE_GET_INFO`.
    DeviceGetInfo = 4,
    /// `VFIO_USER_DEVICE_GET_REGION_INFO`.
    DeviceGetRegionInfo = 5,
    /// `VFIO_USER_REGION_READ`.
    RegionRead = 9,
    /// `VFIO_USER_REGION_WRITE`.
    RegionWrite = 10,
    /// `VFIO_USER_DMA_READ` (server to client).
    DmaRead = 11,
    /// `VFIO_USER_DMA_WRITE` (server to client).
    DmaWrite = 12,
    /// `VFIO_USER_DEVICE_RESET`.
    DeviceReset = 13,
    /// `VFIO_USER_DEVICE_FEATURE`.
    DeviceFeature = 16,
    /// `VFIO_USER_MIG_DATA_READ`.
    MigDataRead = 17,
    /// `VFIO_USER_MIG_DATA_WRITE`.
    MigDataWrite = 18,
}

impl Command {
    /// The protocol's name of the command, for errors and logs.
    pub fn name(self) -> &'static str {
        match self {
            Command::Version => "VFIO_USER_VERSION",
            Command::DeviceGetInfo => "VFIO_USER_DEVICE_GET_INFO",
            Command::DeviceGetRegionInfo => "VFIO_USER_DEVICE_GET_REGION_INFO",
            Command::RegionRead => "VFIO_USER_REGION_READ",
            Command::RegionWrite => "VFIO_USER_REGION_WRITE",
            Command::DmaRead => "VFIO_USER_DMA_READ",
            Command::DmaWrite => "VFIO_USER_DMA_WRITE",
            Command::DeviceReset => "VFIO_USER_DEVICE_RESET",
            Command::DeviceFeature => "VFIO_USER_DEVICE_FEATURE",
            Command::MigDataRead => "VFIO_USER_MIG_DATA_READ",
            Command::MigDataWrite => "VFIO_USER_MIG_DATA_WRITE",
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `struct vfio_user_header`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Matches a reply to its command.
    pub msg_id: u16,
    /// The command (raw: a peer may send one this client does not know).
    pub cmd: u16,
    /// The whole message's size, header included.
    pub msg_size: u32,
    /// `VFIO_USER_F_*`.
    pub flags: u32,
    /// The errno of an error reply.
    pub error_no: u32,
}

impl Header {
    /// The header of a command of `payload` bytes.
    pub fn command(msg_id: u16, cmd: Command, payload: usize) -> Self {
        Self {
            msg_id,
            cmd: cmd as u16,
            msg_size: (HEADER_SIZE + payload) as u32,
            flags: F_TYPE_COMMAND,
            error_no: 0,
        }
    }

    /// The little-endian wire form.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..2].copy_from_slice(&self.msg_id.to_le_bytes());
        b[2..4].copy_from_slice(&self.cmd.to_le_bytes());
        b[4..8].copy_from_slice(&self.msg_size.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.error_no.to_le_bytes());
        b
    }

    /// Decodes a header (no check of its fields).
    pub fn decode(b: &[u8; HEADER_SIZE]) -> Self {
        Self {
            msg_id: u16::from_le_bytes([b[0], b[1]]),
            cmd: u16::from_le_bytes([b[2], b[3]]),
            msg_size: le32(b, 4),
            flags: le32(b, 8),
            error_no: le32(b, 12),
        }
    }

    /// Whether the message is a reply.
    pub fn is_reply(&self) -> bool {
        self.flags & F_TYPE_MASK == F_TYPE_REPLY
    }
}

/// The little-endian `u32` at `at` (the caller checked the length).
pub fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// The little-endian `u64` at `at` (the caller checked the length).
pub fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Appends little-endian integers to a payload.
#[derive(Debug, Default)]
pub struct Payload(pub Vec<u8>);

impl Payload {
    /// Appends a `u16`.
    pub fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends a `u32`.
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends a `u64`.
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends raw bytes.
    pub fn bytes(mut self, v: &[u8]) -> Self {
        self.0.extend_from_slice(v);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_in_the_documented_layout() {
        let h = Header::command(0x1234, Command::MigDataRead, 8);
        let b = h.encode();
        // msg_id, cmd 17, msg_size 24, flags 0 (command), error_no 0, little-endian.
        assert_eq!(b, [0x34, 0x12, 17, 0, 24, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(Header::decode(&b), h);
        assert!(!h.is_reply());
    }
}
