// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! An owned shared memory mapping of part of a device fd (or of the mock's memfd).

use std::io;
use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::ptr::NonNull;
use std::sync::Mutex;

use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

/// A `MAP_SHARED` mapping, unmapped on drop.
///
/// The memory is shared with a device (or a vendor driver), so it is never exposed as a Rust
/// reference: all access copies in or out with volatile accesses (the device may change it
/// at any time, so the compiler must neither elide nor merge them). Copies through the same
/// `Mapping` are serialized by a lock, so safe code on several threads never sees a copy
/// torn by another (a data race by vm-memory's rules).
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<libc::c_void>,
    len: usize,
    writable: bool,
    /// Held for each copy in or out.
    copies: Mutex<()>,
}

// SAFETY: the mapping is shared memory owned by this value, reached only through volatile
// copies within `len` made under `copies`; moving the value to another thread moves nothing
// that is tied to a thread.
unsafe impl Send for Mapping {}
// SAFETY: `&Mapping` allows only copies in and out, each under the `copies` lock, so two
// threads never access the memory through it at once.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` at `offset`, shared, read-only or read-write.
    ///
    /// # Safety
    /// The caller must make sure that every page of `[offset, offset + len)` of `fd` stays
    /// backed for the life of the mapping (a page past the end of a file that was truncated,
    /// or never that long, raises `SIGBUS` on access), and that no part of the process holds
    /// a Rust reference to the same memory through another mapping (this type only copies in
    /// and out through raw pointers, which another reference's aliasing rules would forbid).
    /// A region of a VFIO device fd and a memfd that is never shrunk meet both.
    pub unsafe fn new<F: AsFd>(fd: F, offset: u64, len: usize, writable: bool) -> io::Result<Self> {
        let length = NonZeroUsize::new(len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"))?;
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mmap offset too large"))?;
        let mut prot = ProtFlags::PROT_READ;
        if writable {
            prot |= ProtFlags::PROT_WRITE;
        }
        // SAFETY: we request a fresh mapping (no MAP_FIXED), so no existing memory is
        // replaced; the result is only accessed through raw-pointer copies within `len`.
        let ptr = unsafe { mmap(None, length, prot, MapFlags::MAP_SHARED, fd, offset) }?;
        Ok(Self {
            ptr,
            len,
            writable,
            copies: Mutex::new(()),
        })
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never true: construction refuses empty mappings).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, offset: usize, len: usize) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("access {offset}+{len} outside a {} byte mapping", self.len),
            )),
        }
    }

    /// Copies `buf.len()` bytes out of the mapping at `offset`.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len())?;
        let _copy = self.copies.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: the range was checked to lie inside the live mapping; `buf` is a distinct
        // Rust buffer; this is the only copy through this mapping (the lock is held).
        unsafe { copy_out(self.ptr.as_ptr().cast::<u8>().add(offset), buf) };
        Ok(())
    }

    /// Copies `buf` into the mapping at `offset`.
    pub fn write(&self, offset: usize, buf: &[u8]) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "mapping is read-only",
            ));
        }
        self.check(offset, buf.len())?;
        let _copy = self.copies.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: the range was checked to lie inside the live, writable mapping; `buf` is a
        // distinct Rust buffer; this is the only copy through this mapping (the lock is held).
        unsafe { copy_in(buf, self.ptr.as_ptr().cast::<u8>().add(offset)) };
        Ok(())
    }
}

/// Bytes per volatile access in the middle of a copy.
const WORD: usize = std::mem::size_of::<u64>();

/// Copies `dst.len()` bytes from shared memory at `src` with volatile reads: bytes up to an
/// aligned address, then aligned words, then the last bytes.
///
/// # Safety
/// `src..src + dst.len()` must be readable memory that no Rust reference covers.
unsafe fn copy_out(src: *const u8, dst: &mut [u8]) {
    let head = src.align_offset(WORD).min(dst.len());
    let (bytes, rest) = dst.split_at_mut(head);
    for (i, b) in bytes.iter_mut().enumerate() {
        // SAFETY: within the caller's range.
        *b = unsafe { src.add(i).read_volatile() };
    }
    // SAFETY: `head` bytes in, still within the caller's range, now aligned for u64.
    let src = unsafe { src.add(head) };
    let mut words = rest.chunks_exact_mut(WORD);
    let mut at = 0;
    for w in &mut words {
        // SAFETY: an aligned whole word within the caller's range.
        let v = unsafe { src.add(at).cast::<u64>().read_volatile() };
        w.copy_from_slice(&v.to_ne_bytes());
        at += WORD;
    }
    for (i, b) in words.into_remainder().iter_mut().enumerate() {
        // SAFETY: the last bytes of the caller's range.
        *b = unsafe { src.add(at + i).read_volatile() };
    }
}

/// Copies `src` into shared memory at `dst` with volatile writes, as [`copy_out`] reads.
///
/// # Safety
/// `dst..dst + src.len()` must be writable memory that no Rust reference covers.
unsafe fn copy_in(src: &[u8], dst: *mut u8) {
    let head = dst.align_offset(WORD).min(src.len());
    let (bytes, rest) = src.split_at(head);
    for (i, b) in bytes.iter().enumerate() {
        // SAFETY: within the caller's range.
        unsafe { dst.add(i).write_volatile(*b) };
    }
    // SAFETY: `head` bytes in, still within the caller's range, now aligned for u64.
    let dst = unsafe { dst.add(head) };
    let words = rest.chunks_exact(WORD);
    let tail = words.remainder();
    let mut at = 0;
    for w in words {
        let v = u64::from_ne_bytes(w.try_into().unwrap_or_default());
        // SAFETY: an aligned whole word within the caller's range.
        unsafe { dst.add(at).cast::<u64>().write_volatile(v) };
        at += WORD;
    }
    for (i, b) in tail.iter().enumerate() {
        // SAFETY: the last bytes of the caller's range.
        unsafe { dst.add(at + i).write_volatile(*b) };
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe a mapping created in `new` and never unmapped before.
        if let Err(e) = unsafe { munmap(self.ptr, self.len) } {
            log::warn!("munmap of a {} byte mapping failed: {e}", self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::memfd::{memfd_create, MFdFlags};

    #[test]
    fn reads_and_writes_are_bounded_and_shared() {
        let fd = memfd_create("mapping-test", MFdFlags::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&fd, 8192).unwrap();
        // SAFETY: the memfd is 8 KiB for the whole test and only these mappings alias it.
        let a = unsafe { Mapping::new(&fd, 4096, 4096, true) }.unwrap();
        // SAFETY: as above.
        let b = unsafe { Mapping::new(&fd, 0, 8192, false) }.unwrap();
        a.write(10, b"hello").unwrap();
        let mut out = [0u8; 5];
        b.read(4096 + 10, &mut out).unwrap();
        assert_eq!(&out, b"hello");
        assert!(a.write(4095, b"xy").is_err());
        assert!(b.write(0, b"x").is_err());
        assert!(b.read(usize::MAX, &mut out).is_err());
    }

    /// Safe code on two threads sharing a `&Mapping`: a copy in and a copy out of the same
    /// bytes must not interleave (a torn read is a data race by vm-memory's rules, and the
    /// v1 data section is read while another thread may write it). The writer flips a page
    /// between two patterns; no read may see parts of both.
    #[test]
    fn concurrent_copies_are_not_torn() {
        const PAGE: usize = 4096;
        let fd = memfd_create("mapping-race", MFdFlags::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&fd, PAGE as i64).unwrap();
        // SAFETY: the memfd is one page for the whole test and only this mapping maps it.
        let map = unsafe { Mapping::new(&fd, 0, PAGE, true) }.unwrap();
        map.write(0, &[0xaa; PAGE]).unwrap();
        let done = std::sync::atomic::AtomicBool::new(false);
        let (torn, reads) = std::thread::scope(|s| {
            s.spawn(|| {
                let mut i = 0u64;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let byte = if i % 2 == 0 { 0x55 } else { 0xaa };
                    map.write(0, &[byte; PAGE]).unwrap();
                    i += 1;
                }
            });
            let mut page = [0u8; PAGE];
            let mut torn = 0u64;
            const READS: u64 = 100_000;
            for _ in 0..READS {
                map.read(0, &mut page).unwrap();
                if page.iter().any(|&b| b != page[0]) {
                    torn += 1;
                }
            }
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            (torn, READS)
        });
        assert_eq!(torn, 0, "{torn} of {reads} reads saw two writes at once");
    }
}
