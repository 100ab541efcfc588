// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A v1 destination whose data section is smaller than the source's transactions. QEMU's v1
//! `vfio_load_buffer` (5.2-7.2) splits such a transaction: it writes what fits at
//! `data_offset`, writes that size to `data_size`, reads `data_offset` again and goes on
//! ("This case can occur if size of migration region at destination is smaller than size of
//! migration region at source"). The engine does the same, in the source's order; the mock
//! destination checks every byte against its seed and each transaction's sequence number.

use vfio_mig::{NoObserver, SaveOptions};
use vfio_mig_session::handshake::migrate_local;
use vfio_mig_tests::{handle, mock};

#[test]
fn transactions_larger_than_the_destination_section_are_split_in_order() {
    // (source chunk = section, destination section): a divisor and a non-divisor.
    for (src_section, dst_section) in [("256K", "64K"), ("256K", "100K"), ("64K", "4K")] {
        for data in ["mmap", "trapped"] {
            for live in [false, true] {
                let src_spec = format!(
                    "mock:v1,size=1M,seed=5,chunk={src_section},section={src_section},data={data},dirty-rate=4M"
                );
                let dst_spec = format!(
                    "mock:v1,size=1M,seed=5,chunk={dst_section},section={dst_section},data={data}"
                );
                let context = format!("{src_spec} -> {dst_spec} live={live}");
                let mut src = mock(&src_spec);
                let mut dst = mock(&dst_spec);
                let opts = SaveOptions {
                    live,
                    ..SaveOptions::default()
                };
                let report = migrate_local(
                    src.device.as_mut(),
                    dst.device.as_mut(),
                    &opts,
                    &NoObserver,
                    &NoObserver,
                )
                .unwrap_or_else(|e| panic!("{context}: {e}"));
                let (s, d) = (handle(&src).status(), handle(&dst).status());
                assert!(d.resumed_ok && !d.corrupt, "{context}: {d:?}");
                assert_eq!(
                    handle(&src).state_digest(),
                    handle(&dst).state_digest(),
                    "{context}"
                );
                // Every source transaction arrived whole and in order (the mock refuses a
                // sequence number out of order), split or not.
                assert_eq!(d.transactions_loaded, s.transactions_saved, "{context}");
                assert_eq!(report.load.chunks, report.save.chunks, "{context}");
            }
        }
    }
}
