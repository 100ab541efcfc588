// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The stream format ([docs/stream-format.md]), for a tool that inspects or verifies a stream
//! and a session layer that frames, authenticates or carries one: the reader and writer,
//! the header and records, the keyed-MAC seam ([`StreamAuth`]) and the CRC32C.
//!
//! [docs/stream-format.md]: https://github.com/vfio-mig/vfio-mig/blob/main/docs/stream-format.md

pub use crate::stream::auth::{StreamAuth, TAG_LEN};
pub use crate::stream::coalesce::CoalescingWriter;
pub use crate::stream::crc;
pub use crate::stream::format::{
    DeviceDescriptor, DeviceTotals, Phase, SessionId, StreamHeader, Totals, MAGIC, MAX_FRAGMENT,
};
pub use crate::stream::reader::{
    verify, verify_keyed, Authentication, DeviceSummary, PhaseSummary, Record, StreamReader,
    StreamSummary,
};
pub use crate::stream::writer::StreamWriter;
