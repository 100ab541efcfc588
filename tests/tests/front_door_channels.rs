// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The front door over several channels, as a VMM drives it: a unit paced round by round
//! with a byte budget, each device's records on channel `i mod n` as device `i div n` of that
//! channel's sub-stream (docs/stream-format.md, "Several channels"); a fault on one channel
//! after the quiesce rolls the whole unit back (a paused device stays paused) and no
//! destination device runs; a destination channel that fails resets every device; a
//! sub-stream that is not the announced unit's part touches no device.

use std::io::{self, Read, Write};

use vfio_mig::error::Report;
use vfio_mig::wire::StreamReader;
use vfio_mig::{
    Channels, Destination, DestinationOptions, Epoch, MigrationDevice, NoObserver, Source,
    SourceOptions, Status,
};
use vfio_mig_mock::MockHandle;
use vfio_mig_tests::{assert_destination_safe, assert_source_running, mock};

/// A stream record's header (docs/stream-format.md, "Records"): what a round may write past
/// its budget besides one page of payload.
const RECORD_HEADER: u64 = 24;
const PAGE: u64 = 4096;

/// Three v2 devices (P2P, pre-copy: one unit without an opt-in), of different sizes.
const SPECS: [&str; 3] = [
    "mock:v2,size=1M,seed=21,dirty-rate=1M",
    "mock:v2,size=768K,seed=22",
    "mock:v2,size=512K,seed=23,dirty-rate=1M",
];

fn devices() -> (Vec<Box<dyn MigrationDevice>>, Vec<MockHandle>) {
    SPECS
        .iter()
        .map(|s| {
            let d = mock(s);
            (d.opened.device, d.handle)
        })
        .unzip()
}

/// A channel that takes `left` bytes, then fails as a connection the peer reset.
struct Cut {
    left: usize,
    taken: Vec<u8>,
}

impl Write for Cut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.len() > self.left {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "channel cut",
            ));
        }
        self.left -= buf.len();
        self.taken.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_vmm_paced_unit_of_three_over_two_channels_keeps_each_round_within_its_budget() {
    let (srcs, src_handles) = devices();
    let mut source = Source::prepare(srcs, &SourceOptions::new(Epoch(3))).unwrap();
    source.set_channels(2).unwrap();
    source.begin().unwrap();
    let unit = source.header().clone();
    let budget = 200u64 << 10;
    let mut wire = [Vec::new(), Vec::new()];
    let mut rounds = 0;
    loop {
        // The VMM frames each round itself: fresh buffers a round, appended to its channels.
        let mut frames = [Vec::new(), Vec::new()];
        let round = source
            .round(&mut Channels(&mut frames[..]), Some(budget))
            .unwrap();
        let framed: u64 = frames.iter().map(|f| f.len() as u64).sum();
        assert_eq!(
            round.written, framed,
            "round {rounds}: written counts every channel"
        );
        assert!(
            round.written <= budget + PAGE + RECORD_HEADER,
            "round {rounds} wrote {} bytes for a budget of {budget}",
            round.written
        );
        for (w, f) in wire.iter_mut().zip(frames) {
            w.extend_from_slice(&f);
        }
        rounds += 1;
        if round.estimate.pending < (64 << 10) || rounds == 60 {
            break;
        }
    }
    // 2.25 MiB of initial data at 200 KiB a round takes many rounds.
    assert!(rounds >= 10, "{rounds} rounds");
    source
        .switch_over(&mut Channels(&mut wire[..]))
        .expect("switch over");

    // Each channel is an ordinary stream: channel 0 carries devices 0 and 2, channel 1
    // device 1, in unit order, under the unit's session and epoch.
    for (ch, unit_devices) in [(0, vec![0, 2]), (1, vec![1])] {
        let (_, header) = StreamReader::open(&wire[ch][..]).unwrap();
        assert_eq!(header.session_id, unit.session_id, "channel {ch}");
        assert_eq!(header.epoch, 3, "channel {ch}");
        let expected: Vec<_> = unit_devices
            .iter()
            .map(|&i| unit.devices[i].clone())
            .collect();
        assert_eq!(header.devices, expected, "channel {ch}");
    }

    // One destination takes the channels' bytes as a VMM's protocol delivers them, in small
    // pieces, alternating; another reads both channels at once.
    let (dsts, pushed_handles) = devices();
    let mut pushed = Destination::new(dsts, &DestinationOptions::new()).unwrap();
    pushed.set_channels(2).unwrap();
    let mut pieces: Vec<_> = wire.iter().map(|w| w.chunks(7001)).collect();
    let mut status = Status::NeedMore;
    let mut fed = true;
    while fed {
        fed = false;
        for (ch, chunks) in pieces.iter_mut().enumerate() {
            if let Some(piece) = chunks.next() {
                assert_eq!(status, Status::NeedMore, "loaded before every byte arrived");
                status = pushed.push_channel(ch, piece, &NoObserver).unwrap();
                fed = true;
            }
        }
    }
    assert_eq!(status, Status::Loaded);
    for (i, h) in pushed_handles.iter().enumerate() {
        assert!(!h.status().is_running(), "device {i} runs before run()");
    }
    assert_eq!(pushed.run().unwrap().len(), 3);

    let (dsts, read_handles) = devices();
    let mut read = Destination::new(dsts, &DestinationOptions::new()).unwrap();
    read.set_channels(2).unwrap();
    let mut inputs = [&wire[0][..], &wire[1][..]];
    read.read_channels(&mut inputs, &|| {}, &NoObserver, &mut |_| Ok(()))
        .unwrap();
    assert_eq!(read.run().unwrap().len(), 3);

    assert_eq!(source.channels(), 2);
    let finished = source.finish();
    assert!(
        finished.stop_failures.is_empty(),
        "{:?}",
        finished.stop_failures
    );
    for (i, h) in src_handles.iter().enumerate() {
        assert!(!h.status().is_running(), "source {i} still runs");
    }
    for (i, h) in pushed_handles.iter().chain(&read_handles).enumerate() {
        // The mock checks every byte against its seed's content and refuses to run on any
        // difference.
        assert!(h.status().resumed_ok, "destination {i}: {:?}", h.status());
    }
}

#[test]
fn a_fault_on_one_channel_after_the_quiesce_rolls_the_whole_unit_back() {
    let (mut srcs, src_handles) = devices();
    // The VMM paused device 1 before the migration: it stays paused whatever happens.
    srcs[1].stop().unwrap();
    let mut source = Source::prepare(srcs, &SourceOptions::new(Epoch(1))).unwrap();
    source.set_channels(2).unwrap();
    source.begin().unwrap();
    assert_eq!(source.live(), [true, false, true]);
    let mut wire = [Vec::new(), Vec::new()];
    source
        .round(&mut Channels(&mut wire[..]), Some(256 << 10))
        .unwrap();
    // Channel 1 (device 1's) breaks at the switch-over's first record: after every device
    // was quiesced, while their state moves.
    let mut outs = [
        Cut {
            left: usize::MAX,
            taken: std::mem::take(&mut wire[0]),
        },
        Cut {
            left: 1000,
            taken: std::mem::take(&mut wire[1]),
        },
    ];
    let err = source
        .switch_over(&mut Channels(&mut outs[..]))
        .expect_err("channel 1 is cut");
    let msg = Report(&err).to_string();
    assert!(msg.contains("channel 1"), "{msg}");
    assert!(!msg.contains('\n'), "{msg}");
    assert_source_running(&src_handles[0].status(), "device 0 ran before");
    assert_source_running(&src_handles[2].status(), "device 2 ran before");
    let paused = src_handles[1].status();
    assert_eq!(paused.state_name(), "STOP", "device 1 was paused: {msg}");
    assert!(msg.contains("returned to RUNNING"), "{msg}");
    assert_eq!(source.into_devices().len(), 3, "no device is lost");

    // The destination got what was written before the cut: it cannot load, and nothing of
    // it runs.
    let (dsts, dst_handles) = devices();
    let mut dst = Destination::new(dsts, &DestinationOptions::new()).unwrap();
    dst.set_channels(2).unwrap();
    for (ch, out) in outs.iter().enumerate() {
        assert_eq!(
            dst.push_channel(ch, &out.taken, &NoObserver).unwrap(),
            Status::NeedMore
        );
    }
    let Err(handback) = dst.run() else {
        panic!("an incomplete stream ran");
    };
    assert_eq!(handback.devices.len(), 3, "no device is lost");
    for (i, h) in dst_handles.iter().enumerate() {
        assert_destination_safe(&h.status(), &format!("destination {i}"));
    }
}

/// A channel whose reads fail after `left` bytes.
struct Broken<'a> {
    bytes: &'a [u8],
    left: usize,
}

impl Read for Broken<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "channel cut",
            ));
        }
        let n = buf.len().min(self.left).min(self.bytes.len());
        buf[..n].copy_from_slice(&self.bytes[..n]);
        self.bytes = &self.bytes[n..];
        self.left -= n;
        Ok(n)
    }
}

#[test]
fn a_destination_channel_that_fails_resets_every_device_and_names_the_channel() {
    let (srcs, _) = devices();
    let mut source = Source::prepare(srcs, &SourceOptions::new(Epoch(1))).unwrap();
    source.set_channels(2).unwrap();
    source.begin().unwrap();
    let mut wire = [Vec::new(), Vec::new()];
    source.switch_over(&mut Channels(&mut wire[..])).unwrap();
    drop(source.into_devices());

    let (dsts, dst_handles) = devices();
    let mut dst = Destination::new(dsts, &DestinationOptions::new()).unwrap();
    dst.set_channels(2).unwrap();
    let mut inputs: [Box<dyn Read + Send>; 2] = [
        Box::new(&wire[0][..]),
        Box::new(Broken {
            bytes: &wire[1],
            left: wire[1].len() / 2,
        }),
    ];
    let err = dst
        .read_channels(&mut inputs, &|| {}, &NoObserver, &mut |_| Ok(()))
        .expect_err("channel 1 breaks");
    let msg = Report(&err).to_string();
    assert!(msg.contains("channel 1"), "{msg}");
    assert!(msg.contains("was reset"), "{msg}");
    let Err(handback) = dst.run() else {
        panic!("a failed load ran");
    };
    assert_eq!(handback.devices.len(), 3);
    for (i, h) in dst_handles.iter().enumerate() {
        assert_destination_safe(&h.status(), &format!("destination {i}"));
    }
}

#[test]
fn a_sub_stream_that_is_not_the_announced_units_part_touches_no_device() {
    let (srcs, _) = devices();
    let mut source = Source::prepare(srcs, &SourceOptions::new(Epoch(5))).unwrap();
    source.set_channels(2).unwrap();
    // One channel per device at most, and at least one.
    assert!(source.set_channels(4).is_err());
    assert!(source.set_channels(0).is_err());
    source.begin().unwrap();
    let mut unit = source.header().clone();
    let mut wire = [Vec::new(), Vec::new()];
    source.switch_over(&mut Channels(&mut wire[..])).unwrap();
    drop(source.into_devices());

    // The handshake announced another epoch than the sub-streams carry.
    unit.epoch = 6;
    let (dsts, dst_handles) = devices();
    let mut dst = Destination::new(dsts, &DestinationOptions::new()).unwrap();
    dst.set_channels(2).unwrap();
    dst.expect_header(unit).unwrap();
    let err = dst
        .push_channel(1, &wire[1], &NoObserver)
        .expect_err("channel 1's header is not the unit's part");
    let msg = Report(&err).to_string();
    assert!(msg.contains("channel 1"), "{msg}");
    for (i, h) in dst_handles.iter().enumerate() {
        let st = h.status();
        assert_eq!(st.resets, 0, "destination {i} was touched: {st:?}");
        assert_eq!(st.bytes_loaded, 0, "destination {i}: {st:?}");
        assert!(st.is_running(), "destination {i}: {st:?}");
    }
}
