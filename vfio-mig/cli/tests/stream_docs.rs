// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! docs/stream-format.md is enough to verify an authenticated file: a reader built from its
//! tables alone (offsets, lengths, the tags' labels) checks the header tag and the first
//! record's tag of a file `save --key-file` wrote.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{stderr, Dirs};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The label the documented `what` tag row gives: the text in `"..."` after
/// `HMAC-SHA256(key, `, its `\0` a NUL byte.
fn documented_label(doc: &str, what: &str) -> Vec<u8> {
    let row = doc
        .lines()
        .find(|l| l.starts_with('|') && l.contains(&format!("| {what} |")))
        .unwrap_or_else(|| panic!("no `{what}` row in docs/stream-format.md"));
    let start = row.find("HMAC-SHA256(key, `\"").expect("an HMAC formula") + 19;
    let end = start + row[start..].find("\"`").expect("a closing quote");
    row[start..end].replace("\\0", "\0").into_bytes()
}

fn le(bytes: &[u8]) -> u64 {
    bytes.iter().rev().fold(0, |v, b| (v << 8) | u64::from(*b))
}

fn tag(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap();
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().to_vec()
}

#[test]
fn a_reader_built_from_the_docs_verifies_a_keyed_file() {
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/stream-format.md"),
    )
    .unwrap();
    let dirs = Dirs::new();
    let key_path = dirs.path("key");
    let key = [0x5au8; 32];
    std::fs::write(&key_path, key).unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let file = dirs.path("s");
    let o = dirs.run(&[
        "save",
        "mock:v1,size=1M,seed=4",
        "-o",
        file.to_str().unwrap(),
        "--key-file",
        key_path.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = std::fs::read(&file).unwrap();
    // Header: N at 10, session id at 12..28, descriptors from 40 (12 + M each, M at 2).
    let n = le(&s[10..12]) as usize;
    let mut at = 40;
    for _ in 0..n {
        at += 12 + le(&s[at + 2..at + 4]) as usize;
    }
    let crc_end = at + 4;
    let header_label = documented_label(&doc, "header tag");
    assert_eq!(
        s[crc_end..crc_end + 32],
        tag(&key, &[&header_label, &s[..crc_end]]),
        "header tag per the docs"
    );
    // Record 0: 24-byte record header (payload length at 16), payload, tag.
    let rec = crc_end + 32;
    let len = le(&s[rec + 16..rec + 20]) as usize;
    let payload_end = rec + 24 + len;
    let record_label = documented_label(&doc, "record tag");
    assert_eq!(
        s[payload_end..payload_end + 32],
        tag(
            &key,
            &[
                &record_label,
                &s[12..28],
                &s[rec..rec + 24],
                &s[rec + 24..payload_end]
            ]
        ),
        "record tag per the docs (label {:?})",
        String::from_utf8_lossy(&record_label)
    );
}
