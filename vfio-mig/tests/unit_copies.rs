// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A unit's switch-over (several devices, a save thread each, one writer the VMM passes that
//! need not be `Send`) sends each record as one device alone does: its header and its payload
//! in one vectored write, the payload straight from the buffer the device read into (no
//! staging copy), with no allocation per record; and the destination reads the unit's stream
//! back byte for byte, plain and keyed (the tag after each payload, in the same write).
//!
//! The oracles: the bytes each device handed out and the addresses of the buffers it read
//! into (the recorder's log), the record header's size from docs/stream-format.md, and the
//! allocator's own count of large allocations. One test per file: the allocation count is
//! the whole process's.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::io::{IoSlice, Write};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::recorder::{Log, Recorder};
use vfio_mig::wire::{StreamAuth, TAG_LEN};
use vfio_mig::{Destination, DestinationOptions, Epoch, Source, SourceOptions, Status};

/// The record header's size, from docs/stream-format.md ("a 24-byte record header").
const RECORD_HEADER_LEN: usize = 24;
const DEVICES: usize = 4;
/// Chunks each device reads out, one per read: a record each.
const CHUNKS: usize = 32;
/// Each chunk's size, and the source's buffer.
const CHUNK: usize = 256 << 10;
/// Allocations at least this large are counted: a buffer of a record's payload.
const LARGE: usize = CHUNK / 2;

/// The system allocator, counting large allocations while `COUNTING` is set.
struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static LARGE_ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

fn count(size: usize) {
    if size >= LARGE && COUNTING.load(Ordering::Relaxed) {
        LARGE_ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator, which upholds the
// `GlobalAlloc` contract; counting touches only atomics and never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: the caller's layout, as the contract of `alloc` requires.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: as in `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        // SAFETY: `ptr` was allocated by this allocator (so by `System`) with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by this allocator (so by `System`) with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The VMM's writer: keeps every byte and, per call, each slice's address and length. Not
/// `Send` (as a VMM's writer may be): the unit writes it on the calling thread only.
struct Recording {
    bytes: Vec<u8>,
    calls: Vec<Vec<(usize, usize)>>,
    _not_send: Rc<()>,
}

impl Write for Recording {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        let call: Vec<(usize, usize)> = bufs
            .iter()
            .filter(|b| !b.is_empty())
            .map(|b| (b.as_ptr() as usize, b.len()))
            .collect();
        for b in bufs {
            // Within the capacity reserved up front: no allocation counted here.
            self.bytes.extend_from_slice(b);
        }
        self.calls.push(call);
        Ok(bufs.iter().map(|b| b.len()).sum())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A keyed tag for the test (not a MAC: SipHash with fixed keys, spread over the tag): what
/// matters here is where the tag stands and that the destination checks it.
#[derive(Debug)]
struct TestKey;

impl TestKey {
    fn tag(parts: &[&[u8]]) -> [u8; TAG_LEN] {
        let mut tag = [0u8; TAG_LEN];
        for (i, out) in tag.chunks_mut(8).enumerate() {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            i.hash(&mut h);
            for p in parts {
                p.hash(&mut h);
            }
            out.copy_from_slice(&h.finish().to_le_bytes());
        }
        tag
    }
}

impl StreamAuth for TestKey {
    fn header_tag(&self, header: &[u8]) -> [u8; TAG_LEN] {
        Self::tag(&[header])
    }
    fn header_ok(&self, header: &[u8], tag: &[u8]) -> bool {
        Self::tag(&[header]) == tag
    }
    fn record_tag(&self, session: &[u8; 16], head: &[u8], payload: &[u8]) -> [u8; TAG_LEN] {
        Self::tag(&[session, head, payload])
    }
    fn record_ok(&self, session: &[u8; 16], head: &[u8], payload: &[u8], tag: &[u8]) -> bool {
        Self::tag(&[session, head, payload]) == tag
    }
}

/// Chunk `j` of device `i`: distinct for every device and chunk.
fn chunk(i: usize, j: usize) -> Vec<u8> {
    (0..CHUNK)
        .map(|k| (k * 7 + j * 13 + i * 101 + k / 251) as u8)
        .collect()
}

fn logs(fill: bool) -> Vec<Arc<Mutex<Log>>> {
    (0..DEVICES)
        .map(|i| {
            let log = Log {
                to_read: if fill {
                    (0..CHUNKS).map(|j| chunk(i, j)).collect()
                } else {
                    Default::default()
                },
                ..Log::default()
            };
            Arc::new(Mutex::new(log))
        })
        .collect()
}

fn recorders(logs: &[Arc<Mutex<Log>>]) -> Vec<Recorder> {
    logs.iter().map(|l| Recorder(l.clone())).collect()
}

#[test]
fn a_units_records_leave_from_the_devices_buffers_with_their_headers() {
    // The device threads' pumps inline (each reads, encodes and hands over on its thread),
    // then pipelined (a reader thread per device and a ring of 3 buffers).
    unit_of_four(None, Some(0));
    unit_of_four(Some(Arc::new(TestKey)), Some(0));
    unit_of_four(None, Some(3));
}

/// Saves a unit of four recorders with `key` and pump depth `pipeline`, and checks it.
fn unit_of_four(key: Option<Arc<dyn StreamAuth>>, pipeline: Option<usize>) {
    let keyed = key.is_some();
    let what = format!("keyed {keyed}, pipeline {pipeline:?}");
    let tag_len = if keyed { TAG_LEN } else { 0 };
    let src_logs = logs(true);
    let opts = SourceOptions::new(Epoch(1))
        .buffer(CHUNK)
        .key(key.clone())
        .pipeline(pipeline);
    let mut source = Source::start(recorders(&src_logs), &opts).unwrap();
    let mut out = Recording {
        bytes: Vec::with_capacity(DEVICES * CHUNKS * (CHUNK + 4096) + (1 << 20)),
        calls: Vec::with_capacity(4 * DEVICES * CHUNKS + 1024),
        _not_send: Rc::new(()),
    };
    LARGE_ALLOCATIONS.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    let switched = source.switch_over(&mut out);
    COUNTING.store(false, Ordering::SeqCst);
    switched.unwrap();
    let large = LARGE_ALLOCATIONS.load(Ordering::SeqCst);
    drop(source.finish());

    // The destination reads the unit's stream back: every device gets its own chunks.
    let dst_logs = logs(false);
    let dst_opts = DestinationOptions::new().key(key);
    let mut dst = Destination::new(recorders(&dst_logs), &dst_opts).unwrap();
    assert_eq!(dst.push(&out.bytes).unwrap(), Status::Loaded);
    for (i, log) in dst_logs.iter().enumerate() {
        let log = log.lock().unwrap();
        let got: Vec<&[u8]> = log.writes.iter().map(|(b, ..)| b.as_slice()).collect();
        let want: Vec<Vec<u8>> = (0..CHUNKS).map(|j| chunk(i, j)).collect();
        assert!(
            got == want,
            "{what}: device {i}: the destination loaded other bytes"
        );
    }

    // Where the devices read into.
    let buffers: HashSet<usize> = src_logs
        .iter()
        .flat_map(|l| l.lock().unwrap().read_at.clone())
        .collect();
    let mut records = 0;
    let mut unstaged = 0;
    for call in &out.calls {
        let lens: Vec<usize> = call.iter().map(|&(_, len)| len).collect();
        if !lens.iter().any(|&len| len >= CHUNK) {
            continue;
        }
        records += 1;
        // Header, payload and tag, each a slice of its own, the payload where a device read
        // it.
        let unstaged_record = match call[..] {
            [(_, RECORD_HEADER_LEN), (at, CHUNK)] => !keyed && buffers.contains(&at),
            [(_, RECORD_HEADER_LEN), (at, CHUNK), (_, tag)] => {
                tag == tag_len && buffers.contains(&at)
            }
            _ => false,
        };
        unstaged += usize::from(unstaged_record);
    }
    eprintln!(
        "{what}: {records} record writes, {unstaged} of them a header and a device's buffer; \
         {large} allocations of {LARGE} bytes or more during the switch-over, for {} records",
        DEVICES * CHUNKS
    );
    assert_eq!(
        records,
        DEVICES * CHUNKS,
        "{what}: a record left in several writes"
    );
    assert_eq!(
        unstaged, records,
        "{what}: records left as a staged copy, not as their header and the device's buffer"
    );
    assert!(
        large <= DEVICES * CHUNKS / 4,
        "{what}: {large} large allocations for {} records: buffers are allocated per record",
        DEVICES * CHUNKS
    );
}
