// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Driving a v2 mock by hand through the feature calls and its data fds, for the profile tests.

use vfio_mig::backend::v2_feature as feature;
use vfio_mig::{backend::v2_state::MigState, backend::DataFd, backend::DataRead};
use vfio_mig_mock::{MockSpec, MockV2};

use crate::StatusExt;

/// A v2 mock of `spec`, panicking on a bad spec (a test bug).
pub fn dev(spec: &str) -> MockV2 {
    let parsed: MockSpec = spec.parse().unwrap_or_else(|e| panic!("{spec}: {e}"));
    MockV2::new(&parsed).unwrap()
}

/// The device's migration state, as the driver names it.
pub fn state(d: &MockV2) -> Option<MigState> {
    d.handle().status().mig_state()
}

/// The errno of a result (0 on success, -1 for an error without one).
pub fn code<T>(r: std::io::Result<T>) -> i32 {
    r.err().map_or(0, |e| e.raw_os_error().unwrap_or(-1))
}

/// Reads a saving fd through the device until it reports its (temporary or true) end.
pub fn read_to_end(d: &MockV2, fd: &DataFd) -> (Vec<u8>, DataRead) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        match fd.read_via(d, &mut buf).unwrap() {
            DataRead::Bytes(n) => out.extend_from_slice(&buf[..n]),
            end => return (out, end),
        }
    }
}

/// A whole stop-copy stream of `spec`'s device (STOP -> STOP_COPY, read to 0).
pub fn stop_copy_stream(spec: &str) -> Vec<u8> {
    let d = dev(spec);
    let fd = DataFd::new(feature::set_state(&d, MigState::StopCopy).unwrap().unwrap());
    let (bytes, end) = read_to_end(&d, &fd);
    assert_eq!(end, DataRead::Eof, "{spec}");
    feature::set_state(&d, MigState::Stop).unwrap();
    bytes
}

/// Resumes a device of `spec` from `stream` written through the device hook: the device,
/// the errno of the write (0: all taken) and of RESUMING -> STOP (0: success).
pub fn resume(spec: &str, stream: &[u8]) -> (MockV2, i32, i32) {
    let d = dev(spec);
    let fd = DataFd::new(feature::set_state(&d, MigState::Resuming).unwrap().unwrap());
    let w = code(fd.write_all_via(&d, stream));
    let s = code(feature::set_state(&d, MigState::Stop));
    (d, w, s)
}
