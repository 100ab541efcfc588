// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A small vfio-user server of the project's own, for the tests the sample server cannot
//! serve: it takes clients one after another (so the state can be read before and after a
//! command-line run), and it misbehaves on request, answering the Nth message with an error,
//! hanging up, or sending a malformed reply.
//!
//! Its device: PCI IDs 1234:5678, BAR1 (region 1) of [`BAR1_LEN`] bytes, v2 migration with
//! PRE_COPY. Its migration data is BAR1 exactly; RESUMING -> STOP refuses (EINVAL) anything
//! but a whole BAR1, so a destination that ran with partial state would be visible.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// The size of the test device's BAR1.
pub const BAR1_LEN: usize = 4096;

/// How the server misbehaves at its Nth message (counted from 1 over all connections).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// An error reply with this errno.
    Error(u32),
    /// Closes the connection without a reply.
    HangUp,
    /// A reply header announcing 1 GiB of payload.
    Oversized,
    /// A reply header announcing 64 bytes, 10 of them sent, then a hang-up.
    Truncated,
    /// A well-formed reply to another message id.
    WrongId,
    /// A reply whose payload is cut to 2 bytes (well framed, too short for its command).
    ShortPayload,
    /// Before the reply, a `VFIO_USER_DMA_READ` command to the client; the client's answer
    /// is recorded in [`DeviceState::client_answer`].
    CommandFirst,
}

/// What the device holds.
#[derive(Debug)]
pub struct DeviceState {
    /// BAR1.
    pub bar1: Vec<u8>,
    /// The raw v2 migration state.
    pub state: u32,
    saving: Vec<u8>,
    cursor: usize,
    incoming: Vec<u8>,
    /// Messages handled so far.
    pub messages: u32,
    /// The header of the client's answer to [`Fault::CommandFirst`].
    pub client_answer: Option<[u8; 16]>,
    /// A SET of MIG_DEVICE_STATE to this state answers EIO, the state unchanged (a driver
    /// refusing the arc).
    pub refuse_state: Option<u32>,
    /// MIG_DATA_READ answers EIO (a driver failing to produce its state).
    pub refuse_reads: bool,
}

/// A running server.
pub struct RustServer {
    /// Its socket.
    pub sock: PathBuf,
    /// Its device.
    pub device: Arc<Mutex<DeviceState>>,
    _dir: tempfile::TempDir,
    _thread: JoinHandle<()>,
}

const RUNNING: u32 = 2;
const STOP: u32 = 1;
const STOP_COPY: u32 = 3;
const RESUMING: u32 = 4;
const PRE_COPY: u32 = 6;

impl RustServer {
    /// Starts it; `fault` fires at message `nth`.
    pub fn start(fault: Option<(u32, Fault)>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("rust.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let device = Arc::new(Mutex::new(DeviceState {
            bar1: vec![0; BAR1_LEN],
            state: RUNNING,
            saving: Vec::new(),
            cursor: 0,
            incoming: Vec::new(),
            messages: 0,
            client_answer: None,
            refuse_state: None,
            refuse_reads: false,
        }));
        let dev = device.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                serve(conn, &dev, fault);
            }
        });
        Self {
            sock,
            device,
            _dir: dir,
            _thread: thread,
        }
    }

    /// `vfio-user:SOCK`.
    pub fn name(&self) -> String {
        format!("vfio-user:{}", self.sock.display())
    }

    /// BAR1 now.
    pub fn bar1(&self) -> Vec<u8> {
        self.device.lock().unwrap().bar1.clone()
    }

    /// Sets BAR1.
    pub fn set_bar1(&self, data: &[u8]) {
        self.device.lock().unwrap().bar1 = data.to_vec();
    }

    /// The raw migration state now.
    pub fn state(&self) -> u32 {
        self.device.lock().unwrap().state
    }
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn header(id: u16, cmd: u16, size: usize, flags: u32, errno: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(16);
    h.extend_from_slice(&id.to_le_bytes());
    h.extend_from_slice(&cmd.to_le_bytes());
    h.extend_from_slice(&(size as u32).to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    h.extend_from_slice(&errno.to_le_bytes());
    h
}

fn serve(mut conn: UnixStream, dev: &Mutex<DeviceState>, fault: Option<(u32, Fault)>) {
    loop {
        let mut h = [0u8; 16];
        if conn.read_exact(&mut h).is_err() {
            return;
        }
        let (id, cmd, size) = (
            u16::from_le_bytes([h[0], h[1]]),
            u16::from_le_bytes([h[2], h[3]]),
            le32(&h, 4) as usize,
        );
        let mut body = vec![0u8; size.saturating_sub(16)];
        if conn.read_exact(&mut body).is_err() {
            return;
        }
        let nth = {
            let mut d = dev.lock().unwrap();
            d.messages += 1;
            d.messages
        };
        let answer = handle(dev, cmd, &body);
        let out = match fault.filter(|&(n, _)| n == nth).map(|(_, f)| f) {
            None => match answer {
                Ok(payload) => [header(id, cmd, 16 + payload.len(), 1, 0), payload].concat(),
                Err(errno) => header(id, cmd, 16, 1 | 0x20, errno),
            },
            Some(Fault::Error(errno)) => header(id, cmd, 16, 1 | 0x20, errno),
            Some(Fault::HangUp) => return,
            Some(Fault::Oversized) => header(id, cmd, 16 + (1 << 30), 1, 0),
            Some(Fault::Truncated) => {
                let _ = conn.write_all(&[header(id, cmd, 16 + 64, 1, 0), vec![0; 10]].concat());
                return;
            }
            Some(Fault::WrongId) => header(id.wrapping_add(7), cmd, 16, 1, 0),
            Some(Fault::ShortPayload) => [header(id, cmd, 18, 1, 0), vec![0; 2]].concat(),
            Some(Fault::CommandFirst) => {
                // DMA_READ of 16 bytes at 0, message id 0x4242, then the client's answer.
                let ask = [header(0x4242, 11, 32, 0, 0), vec![0; 16]].concat();
                let mut client = [0u8; 16];
                if conn.write_all(&ask).is_err() || conn.read_exact(&mut client).is_err() {
                    return;
                }
                dev.lock().unwrap().client_answer = Some(client);
                match answer {
                    Ok(payload) => [header(id, cmd, 16 + payload.len(), 1, 0), payload].concat(),
                    Err(errno) => header(id, cmd, 16, 1 | 0x20, errno),
                }
            }
        };
        if conn.write_all(&out).is_err() {
            return;
        }
    }
}

/// The device's answer to one command: a reply payload or an errno.
fn handle(dev: &Mutex<DeviceState>, cmd: u16, body: &[u8]) -> Result<Vec<u8>, u32> {
    const EINVAL: u32 = libc::EINVAL as u32;
    let mut d = dev.lock().unwrap();
    match cmd {
        // VERSION: 0.2, and libvfio-user's capabilities.
        1 => {
            let caps = br#"{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576,"migration":{"pgsize":4096}}}"#;
            Ok([&0u16.to_le_bytes()[..], &2u16.to_le_bytes(), caps, b"\0"].concat())
        }
        // DEVICE_GET_INFO: PCI | RESET, 9 regions, no IRQs.
        4 => Ok([16u32, 0x3, 9, 0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect()),
        // DEVICE_GET_REGION_INFO: BAR1 and the config space; others have size 0.
        5 => {
            let index = le32(body, 8);
            let size: u64 = match index {
                1 => BAR1_LEN as u64,
                7 => 256,
                _ => 0,
            };
            let mut r = Vec::new();
            for v in [32u32, 0x3, index, 0] {
                r.extend_from_slice(&v.to_le_bytes());
            }
            r.extend_from_slice(&size.to_le_bytes());
            r.extend_from_slice(&0u64.to_le_bytes());
            Ok(r)
        }
        // REGION_READ / REGION_WRITE.
        9 | 10 => {
            let (offset, region, count) = (
                le64(body, 0) as usize,
                le32(body, 8),
                le32(body, 12) as usize,
            );
            let config = [0x34, 0x12, 0x78, 0x56];
            let space: &mut [u8] = match region {
                1 => &mut d.bar1,
                7 if cmd == 9 => &mut config.clone(),
                _ => return Err(EINVAL),
            };
            let end = offset
                .checked_add(count)
                .filter(|&e| e <= space.len())
                .ok_or(EINVAL)?;
            if cmd == 9 {
                Ok([&body[..16], &space[offset..end]].concat())
            } else {
                space[offset..end].copy_from_slice(&body[16..16 + count]);
                Ok(body[..16].to_vec())
            }
        }
        // DEVICE_RESET.
        13 => {
            d.state = RUNNING;
            d.incoming.clear();
            d.saving.clear();
            Ok(Vec::new())
        }
        // DEVICE_FEATURE.
        16 => {
            let flags = le32(body, 4);
            let feature = flags & 0xffff;
            let (get, set, probe) = (
                flags & (1 << 16) != 0,
                flags & (1 << 17) != 0,
                flags & (1 << 18) != 0,
            );
            match (feature, get, set, probe) {
                (1 | 2, _, _, true) => Ok(body.to_vec()),
                (1, true, false, false) => Ok([&body[..8], &(1u64 | 4).to_le_bytes()[..]].concat()),
                (2, true, false, false) => {
                    Ok([&body[..8], &d.state.to_le_bytes()[..], &[0xff; 4]].concat())
                }
                // DMA logging: START and STOP accepted; a REPORT marks pages 0 and 65 dirty.
                (6 | 7, false, true, false) => Ok(body.to_vec()),
                (8, true, false, false) => {
                    let argsz = le32(body, 0) as usize;
                    let mut bitmap = vec![0u8; argsz.saturating_sub(8 + 24)];
                    bitmap[0] = 1;
                    if bitmap.len() >= 16 {
                        bitmap[8] = 2;
                    }
                    Ok([&body[..8 + 24], &bitmap[..]].concat())
                }
                (2, false, true, false) => {
                    let to = le32(body, 8);
                    if d.refuse_state == Some(to) {
                        return Err(libc::EIO as u32);
                    }
                    set_state(&mut d, to)?;
                    Ok(body.to_vec())
                }
                _ => Err(EINVAL),
            }
        }
        // MIG_DATA_READ.
        17 => {
            if d.refuse_reads {
                return Err(libc::EIO as u32);
            }
            if d.state != STOP_COPY && d.state != PRE_COPY {
                return Err(EINVAL);
            }
            let want = le32(body, 4) as usize;
            let end = (d.cursor + want).min(d.saving.len());
            let chunk = d.saving[d.cursor..end].to_vec();
            d.cursor = end;
            let mut r = Vec::new();
            r.extend_from_slice(&(8 + chunk.len() as u32).to_le_bytes());
            r.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
            r.extend_from_slice(&chunk);
            Ok(r)
        }
        // MIG_DATA_WRITE.
        18 => {
            let len = le32(body, 4) as usize;
            if d.state != RESUMING || d.incoming.len() + len > BAR1_LEN || body.len() < 8 + len {
                return Err(EINVAL);
            }
            d.incoming.extend_from_slice(&body[8..8 + len]);
            Ok(body[..8].to_vec())
        }
        _ => Err(libc::EOPNOTSUPP as u32),
    }
}

/// One SET of MIG_DEVICE_STATE (the server walks combination arcs itself, as libvfio-user).
fn set_state(d: &mut DeviceState, to: u32) -> Result<(), u32> {
    match to {
        // The whole state is sent in STOP_COPY: its pre-copy has nothing to send.
        STOP_COPY => {
            d.saving = d.bar1.clone();
            d.cursor = 0;
        }
        PRE_COPY => {
            d.saving = Vec::new();
            d.cursor = 0;
        }
        RESUMING => d.incoming.clear(),
        STOP if d.state == RESUMING => {
            if d.incoming.len() != BAR1_LEN {
                return Err(libc::EINVAL as u32);
            }
            d.bar1 = std::mem::take(&mut d.incoming);
        }
        STOP | RUNNING => {}
        _ => return Err(libc::EINVAL as u32),
    }
    d.state = to;
    Ok(())
}
