// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The bandwidth-modelled mock (`rate=`, `accept-rate=`, `latency=`, `content=fast`): a
//! device moves no faster than its rate, its state changes take their latency, and its state
//! still verifies exactly by seed.
//!
//! Only the bound a device can never break is asserted: bytes moved within what the rate
//! allows in the time measured (plus one burst and one piece), or at least the latency per
//! state change. A loaded machine makes a run slower, never faster, so these cannot flake; the
//! lower side (a paced device reaches its rate) is the pacer's own unit test, on a synthetic
//! clock (`vfio_mig_mock::pace`).

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use vfio_mig::backend::DataSession;
use vfio_mig::SaveOptions;
use vfio_mig::{backend::v2_feature as feature, backend::v2_state::MigState};
use vfio_mig_mock::pace::BURST;
use vfio_mig_mock::{MockSpec, MockV2};
use vfio_mig_tests::{load_from_slice, mock, save_to_vec};

/// The largest piece a v2 feeder (256 KiB) or a v1 chunk (`chunk=256K`) moves at once.
const PIECE: f64 = (256 << 10) as f64;

/// Bytes `rate` lets through in `elapsed`: rate x (elapsed + one burst) + one piece.
fn allowed(rate: u64, elapsed: Duration) -> f64 {
    rate as f64 * (elapsed + BURST).as_secs_f64() + PIECE
}

fn v2(spec: &str) -> MockV2 {
    MockV2::new(&spec.parse::<MockSpec>().unwrap()).unwrap()
}

#[test]
fn a_v2_device_produces_no_faster_than_its_rate() {
    let rate = 4u64 << 20;
    let d = v2("mock:v2,size=2M,seed=3,rate=4M,content=fast");
    let t = Instant::now();
    feature::set_state(&d, MigState::Stop).unwrap();
    let fd = feature::set_state(&d, MigState::StopCopy)
        .unwrap()
        .and_then(DataSession::into_fd)
        .unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut stream = Vec::new();
    loop {
        let n = nix::unistd::read(fd.as_fd(), &mut buf).unwrap();
        if n == 0 {
            break;
        }
        stream.extend_from_slice(&buf[..n]);
    }
    let elapsed = t.elapsed();
    assert!(stream.len() as u64 > 2 << 20);
    let ratio = stream.len() as f64 / allowed(rate, elapsed);
    assert!(
        ratio <= 1.0,
        "{} bytes in {elapsed:?}: {ratio:.2} of what {rate} B/s allows",
        stream.len()
    );
    drop(fd);
    feature::set_state(&d, MigState::Stop).unwrap();

    // The paced stream is the device's state, verified page by page by a resuming twin.
    let dst = v2("mock:v2,size=2M,seed=3,content=fast");
    feature::set_state(&dst, MigState::Stop).unwrap();
    let w = feature::set_state(&dst, MigState::Resuming)
        .unwrap()
        .and_then(DataSession::into_fd)
        .unwrap();
    let mut rest = &stream[..];
    while !rest.is_empty() {
        rest = &rest[nix::unistd::write(&w, rest).unwrap()..];
    }
    drop(w);
    feature::set_state(&dst, MigState::Stop).unwrap();
    feature::set_state(&dst, MigState::Running).unwrap();
    assert!(dst.handle().status().resumed_ok);
}

#[test]
fn a_v2_device_accepts_no_faster_than_its_accept_rate_and_changes_state_in_its_latency() {
    let mut src = mock("mock:v2,size=2M,seed=5,content=fast");
    let (bytes, _) = save_to_vec(&mut src, &SaveOptions::default()).unwrap();
    let rate = 4u64 << 20;
    let mut dst = mock("mock:v2,size=2M,seed=5,content=fast,accept-rate=4M,latency=20ms");
    let t = Instant::now();
    load_from_slice(&mut dst, &bytes).unwrap();
    let elapsed = t.elapsed();
    assert!(dst.handle.status().resumed_ok);
    let ratio = (2u64 << 20) as f64 / allowed(rate, elapsed);
    assert!(
        ratio <= 1.0,
        "took 2 MiB in {elapsed:?}: {ratio:.2} of what {rate} B/s allows"
    );
    // RUNNING -> STOP -> RESUMING, RESUMING -> STOP -> RUNNING: at least 2 SETs of 20 ms.
    assert!(elapsed >= Duration::from_millis(40), "{elapsed:?}");

    let d = v2("mock:v2,latency=20ms");
    let t = Instant::now();
    for s in [MigState::Stop, MigState::Running, MigState::Stop] {
        feature::set_state(&d, s).unwrap();
    }
    // Asking for the state it is in is no change and costs nothing.
    feature::set_state(&d, MigState::Stop).unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(60),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn a_v1_device_stages_and_accepts_at_its_rates() {
    let rate = 4u64 << 20;
    let mut src = mock("mock:v1,size=2M,seed=9,chunk=256K,rate=4M,content=fast");
    let t = Instant::now();
    let (bytes, report) = save_to_vec(&mut src, &SaveOptions::default()).unwrap();
    let elapsed = t.elapsed();
    let ratio = report.stop_copy_bytes as f64 / allowed(rate, elapsed);
    assert!(
        ratio <= 1.0,
        "staged {} bytes in {elapsed:?}: {ratio:.2} of what the rate allows",
        report.stop_copy_bytes
    );

    let mut dst = mock("mock:v1,size=2M,seed=9,chunk=256K,accept-rate=4M,content=fast");
    let t = Instant::now();
    load_from_slice(&mut dst, &bytes).unwrap();
    let elapsed = t.elapsed();
    assert!(dst.handle.status().resumed_ok);
    let ratio = report.stop_copy_bytes as f64 / allowed(rate, elapsed);
    assert!(ratio <= 1.0, "committed in {elapsed:?}: {ratio:.2}");

    // Staging latency: 8 chunks of 256 KiB (and a last short one) at 20 ms each.
    let mut slow = mock("mock:v1,size=2M,seed=9,chunk=256K,latency=20ms,content=fast");
    let t = Instant::now();
    save_to_vec(&mut slow, &SaveOptions::default()).unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(8 * 20),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn fast_content_is_another_state_than_exact_content() {
    // The same seed under the other generator is refused at resume: verification is exact.
    let mut src = mock("mock:v2,size=1M,seed=1,content=fast");
    let (bytes, _) = save_to_vec(&mut src, &SaveOptions::default()).unwrap();
    let mut dst = mock("mock:v2,size=1M,seed=1");
    let e = load_from_slice(&mut dst, &bytes).unwrap_err();
    let st = dst.handle.status();
    let e = vfio_mig::error::Report(&e).to_string();
    assert!(!st.resumed_ok, "{e}");
    assert!(e.contains("refused"), "{e}");
    let why = st.last_refusal.unwrap_or_default();
    assert!(why.contains("does not match"), "{why}");
}
