// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The session's write buffering (issue 22): a record's header and payload leave in one
//! system call, not the header in a `write` of its own before the payload.
//!
//! The source's connection is wrapped in a counter of the calls that reach the socket; the
//! oracle is the number of records the source sent (its report's chunks, one DATA record each
//! at these sizes), and the mock destination checks every byte it loads against its seed.

use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use vfio_mig::wire::StreamHeader;
use vfio_mig::NoObserver;
use vfio_mig::SaveOptions;
use vfio_mig_fence::MemoryFence;
use vfio_mig_session::handshake::{receive, send, RecvOutcome, SendOutcome};
use vfio_mig_session::transport::{Connection, Duplex};
use vfio_mig_tests::{handle, mock};

/// A connection that counts the write calls reaching its socket (every clone into the same
/// counter).
struct Counted {
    conn: Connection,
    calls: Arc<AtomicUsize>,
}

impl Read for Counted {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.conn.read(buf)
    }
}

impl Write for Counted {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.conn.write(buf)
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.conn.write_vectored(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.conn.flush()
    }
}

impl AsFd for Counted {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.conn.as_fd()
    }
}

impl Duplex for Counted {
    fn try_clone(&self) -> io::Result<Self> {
        Ok(Counted {
            conn: self.conn.try_clone()?,
            calls: self.calls.clone(),
        })
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.conn.shutdown(how)
    }
    fn readable_now(&self) -> io::Result<bool> {
        self.conn.readable_now()
    }
}

#[test]
fn a_record_and_its_header_leave_in_one_call() {
    // Records of 64 KiB and 256 KiB: around and above the session's 64 KiB write buffer.
    for (spec, buffer) in [
        (
            "mock:v2,profile=xe,size=2M,seed=5,content=fast,data-fd=memfd",
            64 << 10,
        ),
        (
            "mock:v2,profile=xe,size=4M,seed=6,content=fast,data-fd=memfd",
            256 << 10,
        ),
    ] {
        let mut src = mock(spec);
        let mut dst = mock(spec);
        let header = StreamHeader::new(&[src.device.as_ref()], false, 1).unwrap();
        let opts = SaveOptions {
            buffer,
            ..Default::default()
        };
        let calls = Arc::new(AtomicUsize::new(0));
        let (a, b) = Connection::pair().unwrap();
        let a = Counted {
            conn: a,
            calls: calls.clone(),
        };
        let (sent, received) = std::thread::scope(|s| {
            let d = s.spawn(|| {
                receive(
                    &mut [dst.device.as_mut()],
                    b,
                    &mut MemoryFence::new(),
                    &NoObserver,
                )
            });
            let sent = send(&mut [src.device.as_mut()], a, &header, &opts, &NoObserver);
            (sent, d.join().unwrap())
        });
        let SendOutcome::Completed(reports) = sent.unwrap() else {
            panic!("{spec}: not completed")
        };
        assert!(matches!(received.unwrap(), RecvOutcome::Resumed { .. }));
        assert!(handle(&dst).status().resumed_ok, "{spec}");
        let records = reports[0].chunks as usize;
        assert!(records >= 8, "{spec}: {records} records");
        // Besides the records: HELLO with the stream header, END_OF_PHASE with the trailer,
        // the end of the handshake (LOADED's answer, COMMIT), a few more at most.
        let calls = calls.load(Ordering::SeqCst);
        assert!(
            calls <= records + 6,
            "{spec}: {calls} write calls for {records} records (a header sent on its own?)"
        );
    }
}
