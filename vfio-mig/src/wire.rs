// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The stream format ([docs/stream-format.md]), for a tool that inspects or verifies a stream
//! and a session layer that frames, authenticates or carries one: the reader and writer,
//! the header and records, the keyed-MAC seam ([`StreamAuth`]) and the CRC32C.
//!
//! [docs/stream-format.md]: https://github.com/vfio-mig/vfio-mig/blob/main/docs/stream-format.md

pub use crate::stream::crc;
pub use crate::stream::format::{RecordHeader, RECORD_HEADER_LEN};
pub use crate::stream::{
    verify, verify_keyed, Authentication, DeviceDescriptor, DeviceSummary, DeviceTotals, Phase,
    PhaseSummary, Protocol, Record, RecordKind, SessionId, StreamAuth, StreamHeader, StreamReader,
    StreamSummary, StreamWriter, Totals, FORMAT_VERSION, MAGIC, MAX_DEVICES, MAX_FRAGMENT, TAG_LEN,
};
