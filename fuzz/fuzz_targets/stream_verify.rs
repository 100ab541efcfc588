// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `stream::verify` (what `vfio-mig inspect` runs) over arbitrary bytes: never a panic, and
//! a verified stream's summary is consistent with its trailer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vfio_mig::wire::verify;

fuzz_target!(|data: &[u8]| {
    if let Ok(summary) = verify(data) {
        assert_eq!(summary.total_bytes, data.len() as u64);
        assert_eq!(summary.devices.len(), summary.header.devices.len());
        for (d, t) in summary.devices.iter().zip(&summary.totals.devices) {
            assert_eq!(d.pre_copy.bytes, t.pre_copy_bytes);
            assert_eq!(d.stop_copy.bytes, t.stop_copy_bytes);
            assert_eq!(d.pre_copy.chunks + d.stop_copy.chunks, t.chunks);
        }
        let _ = summary.to_string();
    }
});
