// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `load --key-file` of an authenticated file: the file `save --key-file` wrote loads with
//! its key, and a record changed after the save, its CRC recomputed as anybody can (the CRC
//! is unkeyed), is refused by its tag before the device takes it. Offsets and the CRC rule
//! come from docs/stream-format.md; the CRC32C is the `crc32c` crate's.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{assert_clean_failure, stderr, Dirs};

const DEVICE: &str = "mock:v2,size=1M,seed=61";

fn le(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .rev()
        .fold(0, |v, b| (v << 8) | usize::from(*b))
}

/// Saves `DEVICE` with a key; returns the file and the key file.
fn keyed_save(dirs: &Dirs) -> (String, String) {
    let key = dirs.path("key");
    std::fs::write(&key, [0x33u8; 32]).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (key, file) = (
        key.display().to_string(),
        dirs.path("s").display().to_string(),
    );
    let o = dirs.run(&["save", DEVICE, "-o", &file, "--key-file", &key]);
    assert!(o.status.success(), "{}", stderr(&o));
    (file, key)
}

#[test]
fn a_keyed_file_loads_with_its_key() {
    let dirs = Dirs::new();
    let (file, key) = keyed_save(&dirs);
    // The mock checks every byte against its seed as it leaves RESUMING.
    let o = dirs.run(&["load", DEVICE, "-i", &file, "--key-file", &key]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn a_record_changed_with_a_valid_crc_is_refused_by_its_tag() {
    let dirs = Dirs::new();
    let (file, key) = keyed_save(&dirs);
    let mut s = std::fs::read(&file).unwrap();
    // Header: N at 10, descriptors from 40 (12 + M each, M at 2), CRC, 32-byte tag.
    let mut at = 40;
    for _ in 0..le(&s[10..12]) {
        at += 12 + le(&s[at + 2..at + 4]);
    }
    let rec = at + 4 + 32;
    assert_eq!(s[rec], 1, "record 0 is DATA");
    let len = le(&s[rec + 16..rec + 20]);
    assert!(len > 0);
    // One payload byte changed; the record CRC over session id, header bytes 0..20 and
    // payload made right again.
    s[rec + 24] ^= 0x01;
    let mut crc = crc32c::crc32c(&s[12..28]);
    crc = crc32c::crc32c_append(crc, &s[rec..rec + 20]);
    crc = crc32c::crc32c_append(crc, &s[rec + 24..rec + 24 + len]);
    s[rec + 20..rec + 24].copy_from_slice(&crc.to_le_bytes());
    let forged = dirs.path("forged");
    std::fs::write(&forged, &s).unwrap();
    let o = dirs.run(&[
        "load",
        DEVICE,
        "-i",
        forged.to_str().unwrap(),
        "--key-file",
        &key,
    ]);
    assert_clean_failure(
        o.status,
        &stderr(&o),
        "the record's tag does not match the key",
    );
    // The same change without a key's help passes the CRC: only the tag tells.
    let o = dirs.run(&["inspect", forged.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
}
