// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The handshake decoder over arbitrary bytes: `Message::decode` and `read_message` agree,
//! never panic, and every accepted message re-encodes to exactly the bytes it came from (the
//! encoding is canonical: no byte is ignored).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vfio_mig_session::handshake::{read_message, Message};

fuzz_target!(|data: &[u8]| {
    let decoded = Message::decode(data);
    let read = read_message(&mut &data[..], "fuzz");
    match (decoded, read) {
        (Ok((m, len)), Ok(r)) => {
            assert_eq!(m, r);
            assert_eq!(m.encode(), &data[..len]);
            let _ = m.to_string();
        }
        (Err(_), Err(_)) => {}
        (d, r) => panic!("decode and read_message disagree: {d:?} vs {r:?}"),
    }
});
