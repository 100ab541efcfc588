// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! An owned shared memory mapping of part of a device fd (or of the mock's memfd).

use std::io;
use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::ptr::NonNull;

use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

/// A `MAP_SHARED` mapping, unmapped on drop.
///
/// The memory is shared with a device (or a vendor driver), so it is never exposed as a Rust
/// reference: all access copies in or out through raw pointers.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<libc::c_void>,
    len: usize,
    writable: bool,
}

// SAFETY: the mapping is plain shared memory owned by this value; access goes through
// `copy_nonoverlapping` on raw pointers, which is sound from any thread (the data is opaque
// bytes and the protocol serializes producer and consumer).
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only allows copies in and out.
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
        Ok(Self { ptr, len, writable })
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
        // SAFETY: the range was checked to lie inside the live mapping, and `buf` is a
        // distinct Rust buffer, so the regions do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().cast::<u8>().add(offset),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
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
        // SAFETY: the range was checked to lie inside the live, writable mapping, and `buf`
        // is a distinct Rust buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(
                buf.as_ptr(),
                self.ptr.as_ptr().cast::<u8>().add(offset),
                buf.len(),
            )
        };
        Ok(())
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
}
