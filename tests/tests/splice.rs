// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The engine's splice path for v2 devices (data fd -> pipe -> sink without a copy through
//! userspace), against the v2 mock: what it saves loads and verifies.

use std::os::fd::AsFd;
use std::sync::Arc;

use vfio_mig::backend::V2Device;
use vfio_mig::{wire::StreamReader, wire::StreamWriter};
use vfio_mig::{workspace::can_splice_into, workspace::is_pipe, workspace::save_spliced};
use vfio_mig::{workspace::load_device, workspace::new_header, workspace::SaveOptions, NoObserver};
use vfio_mig_mock::{MockHandle, MockSpec, MockV2};

fn v2(spec: &str) -> (V2Device, MockHandle) {
    let spec: MockSpec = spec.parse().unwrap();
    let mock = MockV2::new(&spec).unwrap();
    let handle = mock.handle();
    (V2Device::open(Arc::new(mock)).unwrap(), handle)
}

/// A spliced save into a file loads into a fresh device, which verifies every byte.
#[test]
fn spliced_save_into_a_file_loads_and_verifies() {
    for live in [false, true] {
        let (mut src, _) = v2("mock:v2,size=3M,seed=5,dirty-rate=64M");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let file = std::fs::File::create(&path).unwrap();
        assert!(can_splice_into(file.as_fd()));
        let header = new_header(&[&src], live, 1).unwrap();
        let mut w = StreamWriter::new(file, &header).unwrap();
        let opts = SaveOptions {
            live,
            ..SaveOptions::default()
        };
        let report = save_spliced(&mut src, &mut w, 0, &opts, &NoObserver).unwrap();
        assert!(report.stop_copy_bytes > 0);
        w.finish().unwrap();
        let (mut dst, handle) = v2("mock:v2,size=3M,seed=5");
        let (mut r, _) =
            StreamReader::open(std::io::BufReader::new(std::fs::File::open(&path).unwrap()))
                .unwrap();
        load_device(&mut dst, &mut r, 0, &NoObserver).unwrap();
        assert!(handle.status().resumed_ok, "live={live}");
    }
}

#[test]
fn sinks_that_cannot_splice_take_the_plain_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a");
    let f = std::fs::File::options()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    assert!(!can_splice_into(f.as_fd()));
    let null = std::fs::File::options()
        .write(true)
        .open("/dev/null")
        .unwrap();
    assert!(can_splice_into(null.as_fd()));
    assert!(!is_pipe(null.as_fd()));
    let (mut src, _) = v2("mock:v2,size=1M,seed=2");
    let header = new_header(&[&src], false, 1).unwrap();
    let mut w = StreamWriter::new(f, &header).unwrap();
    save_spliced(&mut src, &mut w, 0, &SaveOptions::default(), &NoObserver).unwrap();
    w.finish().unwrap();
    let (mut dst, handle) = v2("mock:v2,size=1M,seed=2");
    let (mut r, _) = StreamReader::open(std::fs::File::open(&path).unwrap()).unwrap();
    load_device(&mut dst, &mut r, 0, &NoObserver).unwrap();
    assert!(handle.status().resumed_ok);
}
