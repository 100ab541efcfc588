// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `recv`'s listener: every connection is opened on its own thread (the TLS handshake, HELLO
//! and the stream header, all under one deadline, then the authorization), and only a
//! complete, authorized opening reaches the session. While a session runs, further openings
//! are answered REFUSE(busy) and do not disturb it; connections that close early, stall, or
//! do not speak the protocol are logged and ignored. A further channel (CHANNEL) is taken
//! only while a session waits for its channels, and at most [`MAX_CHANNELS`] wait to be
//! bound; any other is refused and closed at once.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use vfio_mig_session::handshake::{open_connection, ChannelOpening, Opened, Opening, MAX_CHANNELS};
use vfio_mig_session::transport::tls::{AuthorizationPolicy, ServerConfig};
use vfio_mig_session::transport::{accept_tls, Connection, Listener, ProgressFloor};
use vfio_mig_session::{Error, ReasonCode};

/// Most connections in their opening at once; more are closed at once (a flood must not
/// exhaust threads or descriptors).
const MAX_OPENING: usize = 16;
/// How long a turned-away source may keep sending before its connection is closed.
const TURN_AWAY_DRAIN: Duration = Duration::from_secs(2);
/// The slowest an admitted source may send on average (16 KiB/s, 128 kbit/s: an eighth of a
/// 1 Mbit/s link; docs/cli.md, "recv"), so that one trickling bytes cannot hold `recv`.
const MIN_SOURCE_RATE: u64 = 16 * 1024;

/// How connections are admitted.
pub struct Admission {
    /// TLS (configuration and policy), or plain.
    pub tls: Option<(Arc<ServerConfig>, AuthorizationPolicy)>,
    /// The keys the policy knows the devices by, in order.
    pub device_keys: Vec<String>,
    /// The deadline of the whole opening (TLS handshake, HELLO, stream header).
    pub handshake: Duration,
    /// The idle timeout of the session.
    pub timeout: Duration,
}

/// A session ready to run.
pub struct Incoming {
    /// The opened session.
    pub opening: Opening<Connection>,
    /// The source's address.
    pub peer: String,
    /// The source's verified identities (TLS), for the log and the JSON.
    pub identity: Option<String>,
}

/// What the main thread of `recv` waits for.
pub enum Event {
    /// A session to run; the busy flag is set until [`Slot::release`].
    Session(Box<Incoming>),
    /// A signal arrived.
    Cancelled,
}

/// The one session slot, and whether its session waits for further channels.
#[derive(Clone, Default)]
pub struct Slot {
    busy: Arc<AtomicBool>,
    wants_channels: Arc<AtomicBool>,
}

impl Slot {
    fn claim(&self) -> bool {
        !self.busy.swap(true, Ordering::SeqCst)
    }

    /// The session ended: the next opening may run.
    pub fn release(&self) {
        self.wants_channels.store(false, Ordering::SeqCst);
        self.busy.store(false, Ordering::SeqCst);
    }

    /// Whether the running session waits for further channels (CHANNEL connections are
    /// refused otherwise).
    pub fn want_channels(&self, wanted: bool) {
        self.wants_channels.store(wanted, Ordering::SeqCst);
    }
}

/// A further connection of a session (CHANNEL), admitted like a session's (TLS, policy); the
/// running session checks its binding.
pub type Channel = ChannelOpening<Connection>;

/// Starts accepting on `listener`: events arrive on the returned channel (its sender is also
/// given back, for the signal hook); further channels of sessions on the third.
pub fn start(
    listener: Listener,
    admission: Admission,
    slot: Slot,
) -> (
    mpsc::Sender<Event>,
    mpsc::Receiver<Event>,
    mpsc::Receiver<Channel>,
) {
    let (tx, rx) = mpsc::channel();
    // Bounded: a channel that cannot wait here is refused, never queued without end.
    let (channel_tx, channel_rx) = mpsc::sync_channel::<Channel>(usize::from(MAX_CHANNELS));
    let events = tx.clone();
    let admission = Arc::new(admission);
    let opening = Arc::new(AtomicUsize::new(0));
    std::thread::spawn(move || loop {
        let conn = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and the like pass; keep serving after a pause.
                log::warn!("{e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if opening.fetch_add(1, Ordering::SeqCst) >= MAX_OPENING {
            opening.fetch_sub(1, Ordering::SeqCst);
            log::warn!(
                "connection from {} closed: {MAX_OPENING} connections are already opening",
                conn.peer()
            );
            continue;
        }
        let (admission, slot, events, opening, channels) = (
            admission.clone(),
            slot.clone(),
            events.clone(),
            opening.clone(),
            channel_tx.clone(),
        );
        std::thread::spawn(move || {
            let peer = conn.peer().to_owned();
            let handed = match admit(conn, &admission, &slot) {
                Some(Admitted::Session(incoming)) => events.send(Event::Session(incoming)).is_ok(),
                Some(Admitted::Channel(c)) => {
                    if let Err(mpsc::TrySendError::Full(c) | mpsc::TrySendError::Disconnected(c)) =
                        channels.try_send(*c)
                    {
                        let why = format!("{MAX_CHANNELS} channels already wait to be bound");
                        turn_away_channel(c, &peer, why);
                    }
                    true
                }
                None => true,
            };
            if !handed {
                slot.release();
            }
            opening.fetch_sub(1, Ordering::SeqCst);
            log::debug!("opening of {peer} done");
        });
    });
    (tx, rx, channel_rx)
}

/// Whether `e` is a connection closed before its first byte (a probe, a port scan).
fn closed_early(e: &Error) -> bool {
    matches!(e, Error::Core(vfio_mig::Error::Transport { step, source })
        if step == "handshake: wait for HELLO"
            && source.kind() == std::io::ErrorKind::UnexpectedEof)
}

/// What an admitted connection is.
enum Admitted {
    Session(Box<Incoming>),
    Channel(Box<Channel>),
}

/// Opens one connection; `Some` when it is a session this destination runs now, or a
/// further channel (TLS identities checked exactly as a session's).
fn admit(mut conn: Connection, admission: &Admission, slot: &Slot) -> Option<Admitted> {
    let peer = conn.peer().to_owned();
    let deadline = Instant::now() + admission.handshake;
    let mut identity = None;
    if let Some((config, _)) = &admission.tls {
        conn = match accept_tls(conn, config.clone(), admission.handshake) {
            Ok(c) => c,
            Err(e) => {
                super::diag::warning(&format!(
                    "connection from {peer} ignored: {}",
                    vfio_mig::error::Report(&e)
                ));
                return None;
            }
        };
        if let Some(session) = conn.tls_session() {
            identity = Some(session.peer_identities().to_string());
        }
    }
    // On the connection the session runs over: the TLS one replaced the plain one, and with
    // it the plain one's timeout (a channel then read for ever from a silent source).
    if let Err(e) = conn.set_timeout(Some(admission.timeout)) {
        log::warn!("connection from {peer}: set the timeout: {e}");
        return None;
    }
    let opening = match open_connection(conn, Some(deadline)) {
        Ok(Opened::Session(o)) => *o,
        Ok(Opened::Channel(c)) => {
            if !slot.wants_channels.load(Ordering::SeqCst) {
                turn_away_channel(c, &peer, "no session waits for channels".into());
                return None;
            }
            if let Some((_, policy)) = &admission.tls {
                let ids = c
                    .connection()
                    .tls_session()
                    .map(|s| s.peer_identities().clone())
                    .unwrap_or_default();
                let keys = admission.device_keys.iter().map(String::as_str);
                if let Err(e) = policy.check_all(keys, &ids) {
                    let e = c.refuse(e.to_string(), TURN_AWAY_DRAIN);
                    super::diag::warning(&format!(
                        "channel from {peer} refused: {}",
                        vfio_mig::error::Report(&e)
                    ));
                    return None;
                }
            }
            return Some(Admitted::Channel(Box::new(c)));
        }
        Err(e) if closed_early(&e) => {
            log::info!("{peer} connected and closed without a session: ignored");
            return None;
        }
        Err(e) => {
            super::diag::warning(&format!(
                "connection from {peer} ignored: {}",
                vfio_mig::error::Report(&e)
            ));
            return None;
        }
    };
    if let Some((_, policy)) = &admission.tls {
        // The opening's connection is TLS: its identities were read above.
        let ids = opening_identities(&opening);
        if let Err(e) = policy.check_all(admission.device_keys.iter().map(String::as_str), &ids) {
            let e = opening.refuse(ReasonCode::Unauthorized, e.to_string(), TURN_AWAY_DRAIN);
            super::diag::warning(&format!(
                "connection from {peer} refused: {}",
                vfio_mig::error::Report(&e)
            ));
            return None;
        }
    }
    // Its pauses (the source stopping its devices, reading the stop-copy state) get twice
    // the idle timeout in all; the session's further channels share the floor once bound.
    opening.connection().set_progress_floor(Some(ProgressFloor {
        reserve: admission.timeout.saturating_mul(2),
        bytes_per_sec: MIN_SOURCE_RATE,
    }));
    if !slot.claim() {
        let e = opening.refuse(
            ReasonCode::Busy,
            "the destination is serving another session; retry when it ended".into(),
            TURN_AWAY_DRAIN,
        );
        super::diag::warning(&format!(
            "connection from {peer} turned away: {}",
            vfio_mig::error::Report(&e)
        ));
        return None;
    }
    Some(Admitted::Session(Box::new(Incoming {
        opening,
        peer,
        identity,
    })))
}

/// Refuses a CHANNEL connection and closes it at once (nothing of it is worth draining).
pub fn turn_away_channel(c: Channel, peer: &str, why: String) {
    let e = c.refuse(why, Duration::ZERO);
    super::diag::warning(&format!(
        "channel from {peer} refused: {}",
        vfio_mig::error::Report(&e)
    ));
}

fn opening_identities(
    opening: &Opening<Connection>,
) -> vfio_mig_session::transport::tls::PeerIdentities {
    opening
        .connection()
        .tls_session()
        .map(|s| s.peer_identities().clone())
        .unwrap_or_default()
}
