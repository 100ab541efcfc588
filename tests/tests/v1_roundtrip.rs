// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Save and resume round trips of the v1 mock over random sizes, chunk sizes, page sizes,
//! buffer sizes (so chunks travel as several fragments), data-section modes and live or not.

use proptest::prelude::*;
use vfio_mig::backend::v1_state::V1State;
use vfio_mig::{PreCopyPolicy, SaveOptions};
use vfio_mig_tests::StatusExt;
use vfio_mig_tests::{handle, load_from_slice, mock, save_to_vec};

fn round_trip(size: u64, chunk: u64, page: u64, mmap: bool, live: bool, buffer: usize, seed: u64) {
    let data = if mmap { "mmap" } else { "trapped" };
    let spec = format!("mock:v1,size={size},seed={seed},chunk={chunk},page={page},data={data}");
    let mut src = mock(&spec);
    let mut dst = mock(&spec);
    let opts = SaveOptions {
        live,
        policy: PreCopyPolicy::default(),
        buffer,
        ..Default::default()
    };
    let (stream, report) =
        save_to_vec(&mut src, &opts).unwrap_or_else(|e| panic!("{spec}: save: {e}"));
    assert_eq!(handle(&src).status().v1_state(), V1State::Stop, "{spec}");
    assert!(
        report.pre_copy_bytes + report.stop_copy_bytes >= size,
        "{spec}: {report:?}"
    );
    assert_eq!(live, report.pre_copy_bytes > 0, "{spec}: {report:?}");
    let load = load_from_slice(&mut dst, &stream).unwrap_or_else(|e| panic!("{spec}: load: {e}"));
    let status = handle(&dst).status();
    assert!(status.resumed_ok, "{spec}: {status:?}");
    assert_eq!(status.v1_state(), V1State::Running, "{spec}");
    assert_eq!(load.chunks, report.chunks, "{spec}");
    assert_eq!(
        status.transactions_loaded,
        handle(&src).status().transactions_saved,
        "{spec}: every source transaction is replayed once"
    );
    assert_eq!(
        handle(&src).state_digest(),
        handle(&dst).state_digest(),
        "{spec}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn save_then_resume_round_trips(
        size in 1u64..300_000,
        chunk_kib in 1u64..=24,
        chunk_extra in 0u64..1000,
        page in prop::sample::select(vec![512u64, 1000, 4096, 8192]),
        mmap in any::<bool>(),
        live in any::<bool>(),
        buffer in prop::sample::select(vec![4096usize, 6000, 65536]),
        seed in any::<u64>(),
    ) {
        // Chunks from a bit over 1 KiB to 25 KiB, often not a multiple of anything.
        let chunk = chunk_kib * 1024 + chunk_extra;
        round_trip(size, chunk, page, mmap, live, buffer, seed);
    }
}

#[test]
fn large_chunks_travel_as_several_fragments() {
    // 256 KiB chunks through a 4 KiB buffer: 64 fragments a chunk, both data-section modes.
    round_trip(1 << 20, 256 << 10, 4096, true, true, 4096, 5);
    round_trip(1 << 20, 256 << 10, 4096, false, false, 4096, 6);
}
