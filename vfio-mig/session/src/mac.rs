// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Authenticated streams: a key shared by the writer and the reader, under which an
//! HMAC-SHA256 tag follows the header and every record. Without the key nobody can write a
//! stream the reader accepts, nor change, reorder, drop or splice records of one: the tag of a
//! record covers the stream's session id and the record's sequence number, and the trailer's
//! tag covers the record count and totals.

use std::path::Path;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use vfio_mig::{wire::StreamAuth, wire::TAG_LEN};

use crate::error::{Error, Result};

/// Shortest key accepted, in bytes (128 bits).
pub const MIN_KEY_LEN: usize = 16;
/// Domain label of the header's tag.
const HEADER_LABEL: &[u8] = b"vfio-mig stream header v2\0";
/// Domain label of a record's tag.
const RECORD_LABEL: &[u8] = b"vfio-mig stream record v2\0";

/// A stream authentication key (at least [`MIN_KEY_LEN`] bytes).
#[derive(Clone)]
pub struct StreamKey(Vec<u8>);

impl std::fmt::Debug for StreamKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StreamKey(..)")
    }
}

impl Drop for StreamKey {
    fn drop(&mut self) {
        // Best effort: the key does not linger in freed memory.
        self.0.iter_mut().for_each(|b| *b = 0);
    }
}

impl StreamKey {
    /// A key from its bytes.
    pub fn new(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < MIN_KEY_LEN {
            return Err(Error::invalid_input(format!(
                "a stream key needs at least {MIN_KEY_LEN} bytes, this one has {} (make one \
                 with `head -c 32 /dev/urandom > KEY`)",
                bytes.len()
            )));
        }
        Ok(Self(bytes.to_vec()))
    }

    /// Reads a key file: its whole content is the key. The file must not be readable or
    /// writable by group or others (a key others can read authenticates nothing).
    pub fn load(path: &Path) -> Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let step = || format!("key file {}", path.display());
        let meta = std::fs::metadata(path)
            .map_err(|e| Error::invalid_input(format!("{}: {e}", step())))?;
        if meta.mode() & 0o077 != 0 {
            return Err(Error::invalid_input(format!(
                "{}: mode {:o} lets group or others read it; chmod 600 it",
                step(),
                meta.mode() & 0o777
            )));
        }
        let bytes =
            std::fs::read(path).map_err(|e| Error::invalid_input(format!("{}: {e}", step())))?;
        let key = Self::new(&bytes).map_err(|e| Error::invalid_input(format!("{}: {e}", step())));
        let mut bytes = bytes;
        bytes.iter_mut().for_each(|b| *b = 0);
        key
    }

    fn mac(&self, label: &[u8]) -> Hmac<Sha256> {
        // HMAC takes keys of any length.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
        m.update(label);
        m
    }

    fn header_mac(&self, header: &[u8]) -> Hmac<Sha256> {
        let mut m = self.mac(HEADER_LABEL);
        m.update(header);
        m
    }

    fn record_mac(&self, session: &[u8; 16], head: &[u8], payload: &[u8]) -> Hmac<Sha256> {
        let mut m = self.mac(RECORD_LABEL);
        m.update(session);
        m.update(head);
        m.update(payload);
        m
    }

    /// This key as the core's [`StreamAuth`], for a [`vfio_mig::wire::StreamWriter`] or
    /// [`vfio_mig::wire::StreamReader`].
    pub fn auth(&self) -> Arc<dyn StreamAuth> {
        Arc::new(self.clone())
    }
}

impl StreamAuth for StreamKey {
    /// The tag of an encoded header (its CRC included).
    fn header_tag(&self, header: &[u8]) -> [u8; TAG_LEN] {
        self.header_mac(header).finalize().into_bytes().into()
    }

    /// Whether `tag` is the tag of `header` (compared in constant time).
    fn header_ok(&self, header: &[u8], tag: &[u8]) -> bool {
        self.header_mac(header).verify_slice(tag).is_ok()
    }

    /// The tag of a record: the stream's session id, the record header, the payload.
    fn record_tag(&self, session: &[u8; 16], head: &[u8], payload: &[u8]) -> [u8; TAG_LEN] {
        self.record_mac(session, head, payload)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Whether `tag` is the tag of the record (compared in constant time).
    fn record_ok(&self, session: &[u8; 16], head: &[u8], payload: &[u8], tag: &[u8]) -> bool {
        self.record_mac(session, head, payload)
            .verify_slice(tag)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use vfio_mig::{
        wire::verify, wire::verify_keyed, wire::Authentication, wire::DeviceDescriptor,
        wire::Phase, wire::StreamHeader, wire::StreamWriter, Protocol,
    };

    /// Bytes of the example stream's header (one device, model `mock:v1`).
    const HEADER_LEN: usize = 63;

    fn example_header(session: u8) -> StreamHeader {
        StreamHeader {
            session_id: [session; 16],
            epoch: 1,
            devices: vec![DeviceDescriptor {
                protocol: Protocol::V1,
                live: true,
                migration_flags: 0,
                model: "mock:v1".into(),
            }],
        }
    }

    /// The example stream of `docs/stream-format.md`, authenticated with `key` if given.
    fn example_with(header: &StreamHeader, key: Option<Arc<dyn StreamAuth>>) -> Vec<u8> {
        let mut w = StreamWriter::with_key(Vec::new(), header, key).unwrap();
        w.data(0, Phase::PreCopy, b"hello", true).unwrap();
        w.end_phase(0, Phase::PreCopy).unwrap();
        w.data(0, Phase::StopCopy, b"ab", false).unwrap();
        w.data(0, Phase::StopCopy, b"c", true).unwrap();
        w.end_phase(0, Phase::StopCopy).unwrap();
        w.finish().unwrap().0
    }

    #[test]
    fn short_keys_and_open_key_files_are_refused() {
        assert!(StreamKey::new(&[1; 15]).is_err());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, [7u8; 32]).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = StreamKey::load(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        StreamKey::load(&p).unwrap();
    }

    /// RFC 4231 test case 2 (key "Jefe"), to show the tag is plain HMAC-SHA256 over the
    /// label and the data.
    #[test]
    fn tags_are_hmac_sha256_of_label_and_data() {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(b"Jefe").unwrap();
        m.update(b"what do ya want for nothing?");
        let got: [u8; 32] = m.finalize().into_bytes().into();
        let hex: String = got.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let k = StreamKey::new(&[9; 32]).unwrap();
        let a = k.record_tag(&[1; 16], b"head", b"payload");
        assert_ne!(a, k.record_tag(&[2; 16], b"head", b"payload"));
        assert!(k.record_ok(&[1; 16], b"head", b"payload", &a));
        assert!(!k.record_ok(&[1; 16], b"head", b"payloaD", &a));
        assert!(!k.record_ok(&[1; 16], b"head", b"payload", &a[..31]));
        let h = k.header_tag(b"header");
        assert!(k.header_ok(b"header", &h));
        assert!(!StreamKey::new(&[8; 32]).unwrap().header_ok(b"header", &h));
    }

    /// With a key, `verify_keyed` (and so `load` and `inspect`) refuse a forged stream, a
    /// changed record whose CRC was recomputed, a header whose session id was re-forged, a
    /// stream made with another key, and one with no tags at all.
    #[test]
    fn forged_and_reforged_streams_are_refused_with_the_key() {
        let key = StreamKey::new(&[0x5a; 32]).unwrap();
        let good = example_with(&example_header(1), Some(key.auth()));
        let summary = verify_keyed(good.as_slice(), Some(key.auth())).unwrap();
        assert_eq!(summary.authentication, Authentication::Verified);
        // Without the key the tags are skipped, and say so.
        let summary = verify(good.as_slice()).unwrap();
        assert_eq!(summary.authentication, Authentication::NotChecked);

        // A forger without the key: an unauthenticated stream.
        let plain = example_with(&example_header(1), None);
        let e = verify_keyed(plain.as_slice(), Some(key.auth()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not authenticated"), "{e}");
        // ... or one under another key.
        let other = StreamKey::new(&[0x5b; 32]).unwrap();
        let forged = example_with(&example_header(1), Some(other.auth()));
        let e = verify_keyed(forged.as_slice(), Some(key.auth()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("stream header: authentication failed"), "{e}");

        // A payload byte changed and the record's CRC recomputed, as a forger would.
        let mut changed = good.clone();
        let rec = HEADER_LEN + 32; // after the header's tag
        changed[rec + 24] ^= 1;
        // The record CRC of the format: the session id, the record header before its CRC,
        // the payload (docs/stream-format.md).
        let crc = crc32c::crc32c_append(
            crc32c::crc32c_append(crc32c::crc32c(&[1; 16]), &changed[rec..rec + 20]),
            &changed[rec + 24..rec + 29],
        );
        changed[rec + 20..rec + 24].copy_from_slice(&crc.to_le_bytes());
        assert!(
            verify(changed.as_slice()).is_ok(),
            "the CRC alone is satisfied"
        );
        let e = verify_keyed(changed.as_slice(), Some(key.auth()))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("read stream record 0: authentication failed"),
            "{e}"
        );

        // The session id re-forged (to replay the file as a new session), CRC recomputed.
        let mut reforged = good.clone();
        reforged[12] ^= 0xff;
        let crc = crc32c::crc32c(&reforged[..HEADER_LEN - 4]);
        reforged[HEADER_LEN - 4..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        let e = verify_keyed(reforged.as_slice(), Some(key.auth()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("stream header: authentication failed"), "{e}");

        // Truncated before the trailer: refused whatever the tags say.
        let e = verify_keyed(&good[..good.len() - 70], Some(key.auth()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated"), "{e}");
    }
}
