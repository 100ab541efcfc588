// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! CRC32C (Castagnoli, the iSCSI polynomial) of the stream's records and headers, by the
//! fastest implementation the build has.
//!
//! Every byte of device state passes through this checksum on both sides, so at memory speed
//! it is a large share of the critical path (docs/benchmarks.md, "Integrity at memory
//! speed"). Two implementations compute the same values:
//! - the `crc32c` crate (default): the SSE4.2 `crc32` instruction, three streams interleaved;
//!   builds on the workspace's minimum Rust (1.85, as rust-vmm's CI);
//! - the `crc-fast` crate (feature `crc-fast`, Rust 1.89 or later): carry-less multiplication
//!   folding (VPCLMULQDQ with AVX-512 where the CPU has it), about twice as fast on a Zen 5 in
//!   `vfio-mig bench --suite crc`. The command line turns it on; a VMM chooses.
//!
//! The stream format does not depend on the choice: the values are the same (tested).

/// The implementation this build uses: `"crc-fast"` or `"crc32c"`.
pub const IMPLEMENTATION: &str = if cfg!(feature = "crc-fast") {
    "crc-fast"
} else {
    "crc32c"
};

/// The CRC32C of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c_append(0, data)
}

/// The CRC32C of the bytes whose CRC32C is `crc`, followed by `data`.
#[cfg(not(feature = "crc-fast"))]
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, data)
}

/// The CRC32C of the bytes whose CRC32C is `crc`, followed by `data`.
#[cfg(feature = "crc-fast")]
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    // The reflected CRC keeps the complement of the published value as its running state
    // (init and xorout are both all ones), so resuming from `crc` starts from `!crc`.
    let mut digest =
        crc_fast::Digest::new_with_init_state(crc_fast::CrcAlgorithm::Crc32Iscsi, u64::from(!crc));
    digest.update(data);
    // The algorithm is 32 bits wide: the value fits.
    digest.finalize() as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_check_value_of_the_catalogue() {
        // CRC-32/ISCSI in the RevEng CRC catalogue: check = 0xe3069283 for "123456789".
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    proptest! {
        /// Appending in pieces gives the value of the whole, wherever the cut is, and the
        /// value the reference crate computes (the other implementation when `crc-fast` is on).
        #[test]
        fn appending_in_pieces_is_the_checksum_of_the_whole(
            data in proptest::collection::vec(any::<u8>(), 0..5000),
            cut in 0usize..5000,
        ) {
            let cut = cut.min(data.len());
            let whole = crc32c(&data);
            prop_assert_eq!(crc32c_append(crc32c(&data[..cut]), &data[cut..]), whole);
            prop_assert_eq!(whole, ::crc32c::crc32c(&data));
        }
    }
}
