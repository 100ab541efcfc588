// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The stream decoder over arbitrary bytes: `StreamReader::open`, every record, `finish`.
//! It must never panic, never allocate more than one record (1 MiB), and a stream it accepts
//! must obey the format's rules.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vfio_mig::{wire::Record, wire::StreamReader, wire::MAX_FRAGMENT};

fuzz_target!(|data: &[u8]| {
    let Ok((mut reader, header)) = StreamReader::open(data) else {
        return;
    };
    assert!(!header.devices.is_empty());
    let mut records = 0u64;
    loop {
        match reader.next_record() {
            Ok(Record::Data { device, bytes, .. }) => {
                assert!(usize::from(device) < header.devices.len());
                assert!(!bytes.is_empty() && bytes.len() <= MAX_FRAGMENT);
            }
            Ok(Record::EndOfPhase { device, .. }) => {
                assert!(usize::from(device) < header.devices.len());
            }
            Ok(Record::End(totals)) => {
                assert_eq!(totals.records, records);
                let _ = reader.finish();
                return;
            }
            Err(_) => {
                // After an error every call fails.
                assert!(reader.next_record().is_err());
                return;
            }
        }
        records += 1;
    }
});
