// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A unit whose device fails during its stop-and-copy stops its siblings early: the device
//! threads that hand their records to the writing thread are refused their next record, so
//! the switch-over ends with the failed device's own error (not a sibling's "stopped" error),
//! long before the siblings' data is out, and every device comes back.
//!
//! Deterministic: the siblings wait at their second read until the failing device's read has
//! failed, and each has far more chunks left than a few records in flight.

mod common;

use std::sync::{Arc, Condvar, Mutex};

use common::recorder::{Log, ReadHook, Recorder};
use vfio_mig::error::{Error, Report};
use vfio_mig::{Epoch, Source, SourceOptions};

const DEVICES: usize = 4;
/// Chunks each device has to read out: far more than the unit could send before the failing
/// device's thread marks the unit failed.
const CHUNKS: usize = 20_000;
const CHUNK: usize = 256;

#[test]
fn a_failed_device_stops_its_siblings_early() {
    let failed = Arc::new((Mutex::new(false), Condvar::new()));
    let logs: Vec<Arc<Mutex<Log>>> = (0..DEVICES)
        .map(|i| {
            let failed = failed.clone();
            let hook = move |read: usize| {
                if read != 1 {
                    return Ok(());
                }
                let (flag, changed) = &*failed;
                let mut flag = flag.lock().unwrap();
                if i == 0 {
                    *flag = true;
                    changed.notify_all();
                    return Err(Error::InvalidInput(
                        "injected: device 0's read failed".into(),
                    ));
                }
                while !*flag {
                    flag = changed.wait(flag).unwrap();
                }
                Ok(())
            };
            Arc::new(Mutex::new(Log {
                to_read: (0..CHUNKS).map(|j| vec![(i + j) as u8; CHUNK]).collect(),
                before_read: Some(ReadHook(Box::new(hook))),
                ..Log::default()
            }))
        })
        .collect();
    let devs = logs.iter().map(|l| Recorder(l.clone())).collect();
    let mut source = Source::start(devs, &SourceOptions::new(Epoch(1))).unwrap();
    let e = source
        .switch_over(&mut std::io::sink())
        .expect_err("device 0 failed");
    let e = Report(&e).to_string();
    assert!(e.contains("injected: device 0's read failed"), "{e}");
    assert_eq!(source.into_devices().len(), DEVICES, "a device was lost");
    for (i, log) in logs.iter().enumerate().skip(1) {
        let reads = log.lock().unwrap().reads;
        assert!(
            reads < CHUNKS,
            "device {i} read {reads} of its {CHUNKS} chunks: its sibling's failure did not stop \
             it"
        );
    }
}
