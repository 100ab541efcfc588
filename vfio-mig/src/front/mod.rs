// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The front door: one migration of one or several devices, as a VMM drives it.
//!
//! A VMM owns the schedule of a live migration: it runs memory rounds, measures its link,
//! decides when to stop the vCPUs and carries the bytes in its own protocol. The source fits
//! that loop:
//!
//! 1. [`Source::start`] records each device's state (running, or stopped for a paused VM),
//!    and puts every running device that supports it into pre-copy, the devices forming one
//!    unit;
//! 2. [`Source::round`] writes one pre-copy round into any `Write` the VMM passes, within an
//!    optional byte budget, and returns what is left ([`Estimate`]: what is unknown is
//!    `None`);
//! 3. [`Source::switch_over`], with the vCPUs stopped, quiesces every device before any
//!    stops, sends the rest of their state (the devices in parallel) and ends the stream,
//!    leaving the devices in stop-and-copy while the VMM reads its last dirty pages;
//! 4. [`Source::finish`] once the destination runs (the point of no return: it consumes the
//!    source), or [`Source::cancel`] if it cannot.
//!
//! The destination takes the bytes as they arrive ([`Destination::push`]), loads every device,
//! and reports [`Status::Loaded`] with none running; the VMM restores what is its own, then
//! calls [`Destination::run`].
//!
//! Device state may travel over several channels (connections) of the VMM's own:
//! [`Source::set_channels`] before `begin`, then every call takes one writer per channel
//! ([`Channels`]); [`Destination::set_channels`], then a push per channel
//! ([`Destination::push_channel`]) or [`Destination::read_channels`]. The unit stays one:
//! one quiesce barrier, one rollback, one load.
//!
//! The devices are never lost: the VMM lends them (`&mut`) or gives them (`Box`), and gets
//! them back with every error ([`Handback`]). Every failure returns each source device to
//! the state it had when the migration began (or resets it), and resets every destination
//! device. Dropping an unfinished destination resets its devices; dropping a source before
//! its switch-over cancels it, and after it (the outcome in doubt) leaves its devices stopped.
//!
//! ```
//! use vfio_mig::{Destination, DestinationOptions, Epoch, MigrationDevice, Source, SourceOptions, Status};
//! # fn demo(src: Box<dyn MigrationDevice>, dst: Box<dyn MigrationDevice>) -> vfio_mig::Result<()> {
//! let mut source = Source::start(vec![src], &SourceOptions::new(Epoch(1)))?;
//! let mut wire = Vec::new(); // the VMM's own channel
//! loop {
//!     let round = source.round(&mut wire, Some(8 << 20))?;
//!     // The VMM's own policy: here, switch over once little is left.
//!     if round.estimate.pending < 64 << 10 {
//!         break;
//!     }
//! }
//! source.switch_over(&mut wire)?;
//! // ... the VMM reads its last dirty pages, the devices in STOP_COPY ...
//! let mut destination = Destination::new(vec![dst], &DestinationOptions::new())?;
//! for piece in wire.chunks(1000) {
//!     destination.push(piece)?;
//! }
//! // ... the destination VMM restores PCI_COMMAND and interrupts ...
//! let _running = destination.run()?;
//! let _stopped = source.finish();
//! # Ok(()) }
//! ```

mod channels;
mod destination;
mod handback;
mod inbox;
mod options;
mod outgoing;
mod pre_copy;
mod relay;
mod source;

pub use channels::{Channels, Outputs};
pub use destination::{resume, Destination, Status};
pub use handback::Handback;
pub use options::{DestinationOptions, Epoch, SourceOptions};
pub use outgoing::UnitRecords;
pub use source::{Estimate, Finished, Round, Source};
