//! An in-process network for both ends, whose connections can be made to fail: a peer
//! that dies (closes) or stalls (goes silent) at a given frame, or corrupts it.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::WireError;
use crate::wire::frame::{FrameKind, HEADER_LEN, MAGIC};
use crate::wire::transport::{Acceptor, Channel, Connector, MemoryNet};

/// Where in the writes of one connection a fault strikes.
#[derive(Clone, Copy, Debug)]
pub enum At {
    /// At the start of the `nth` (from 0) frame of this kind.
    Frame(FrameKind, usize),
}

#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// The writer dies: what precedes the frame goes out, then the connection closes.
    Close(At),
    /// The writer goes silent from the frame on (and never closes).
    Stall(At),
    /// The frame's magic is garbled.
    BadMagic(At),
    /// One bit of the frame's payload (or, if it has none, its checksum) flips.
    FlipBit(At),
}

impl Fault {
    fn at(&self) -> At {
        match *self {
            Fault::Close(a) | Fault::Stall(a) | Fault::BadMagic(a) | Fault::FlipBit(a) => a,
        }
    }
}

struct FaultState {
    fault: Option<Fault>,
    /// Bytes of payload still to come in the current frame.
    payload_left: u64,
    seen: std::collections::HashMap<u8, usize>,
    tripped: bool,
}

impl FaultState {
    /// Where, in `buf`, the fault's frame starts (and its payload length), if it does.
    fn find(&mut self, buf: &[u8]) -> Option<(usize, u64)> {
        let mut pos = 0usize;
        while pos < buf.len() {
            if self.payload_left > 0 {
                let n = self.payload_left.min((buf.len() - pos) as u64);
                self.payload_left -= n;
                pos += n as usize;
                continue;
            }
            // The writer never splits a header across writes.
            let h = buf.get(pos..pos + HEADER_LEN)?;
            if h[0..4] != MAGIC {
                return None;
            }
            let kind = h[4];
            let len = u64::from(u32::from_le_bytes([h[8], h[9], h[10], h[11]]));
            let nth = self.seen.entry(kind).or_default();
            let At::Frame(want, want_nth) = self.fault?.at();
            if want as u8 == kind && *nth == want_nth && !self.tripped {
                return Some((pos, len));
            }
            *nth += 1;
            self.payload_left = len;
            pos += HEADER_LEN;
        }
        None
    }
}

/// A connection whose writes may fail as `fault` says (reads pass through).
pub struct Faulty {
    inner: Box<dyn Channel>,
    state: Arc<Mutex<FaultState>>,
}

impl Faulty {
    pub fn new(inner: Box<dyn Channel>, fault: Option<Fault>) -> Faulty {
        Faulty {
            inner,
            state: Arc::new(Mutex::new(FaultState {
                fault,
                payload_left: 0,
                seen: Default::default(),
                tripped: false,
            })),
        }
    }
}

fn broken() -> std::io::Error {
    std::io::ErrorKind::BrokenPipe.into()
}

impl Write for Faulty {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut st = self.state.lock().unwrap();
        if st.tripped {
            return match st.fault {
                Some(Fault::Stall(_)) => Ok(buf.len()),
                _ => Err(broken()),
            };
        }
        let Some((at, len)) = st.find(buf) else {
            drop(st);
            self.inner.write_all(buf)?;
            return Ok(buf.len());
        };
        match st.fault {
            Some(Fault::Close(_)) => {
                st.tripped = true;
                self.inner.write_all(&buf[..at])?;
                self.inner.shutdown();
                Err(broken())
            }
            Some(Fault::Stall(_)) => {
                st.tripped = true;
                self.inner.write_all(&buf[..at])?;
                Ok(buf.len())
            }
            Some(f @ (Fault::BadMagic(_) | Fault::FlipBit(_))) => {
                // This frame once; the rest of the stream as it is.
                st.fault = None;
                drop(st);
                let flip = match f {
                    Fault::BadMagic(_) => at,
                    _ if len > 0 && at + HEADER_LEN < buf.len() => at + HEADER_LEN,
                    _ => at + 12,
                };
                let mut copy = buf.to_vec();
                copy[flip] ^= 0x01;
                self.inner.write_all(&copy)?;
                Ok(buf.len())
            }
            None => {
                drop(st);
                self.inner.write_all(buf)?;
                Ok(buf.len())
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl Read for Faulty {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf)
    }
}

impl Channel for Faulty {
    fn try_clone(&self) -> std::io::Result<Box<dyn Channel>> {
        Ok(Box::new(Faulty {
            inner: self.inner.try_clone()?,
            state: self.state.clone(),
        }))
    }
    fn set_io_timeout(&self, t: Duration) -> std::io::Result<()> {
        self.inner.set_io_timeout(t)
    }
    fn shutdown(&self) {
        let st = self.state.lock().unwrap();
        // A stalled peer is wedged: it closes nothing.
        if st.tripped && matches!(st.fault, Some(Fault::Stall(_))) {
            return;
        }
        self.inner.shutdown();
    }
}

/// Both ends' connections, with the faults to give each, in connection order (0: main,
/// 1: urgent), on the source's side and on the destination's.
#[derive(Default)]
pub struct TestNet {
    net: MemoryNet,
    source: Mutex<VecDeque<Option<Fault>>>,
    destination: Mutex<VecDeque<Option<Fault>>>,
}

impl TestNet {
    pub fn new() -> TestNet {
        TestNet::default()
    }

    /// The source's writes on connection `n` fail as `fault` says.
    pub fn source_fault(self, n: usize, fault: Fault) -> TestNet {
        set(&self.source, n, fault);
        self
    }

    /// The destination's writes on connection `n` fail as `fault` says.
    pub fn destination_fault(self, n: usize, fault: Fault) -> TestNet {
        set(&self.destination, n, fault);
        self
    }
}

fn set(q: &Mutex<VecDeque<Option<Fault>>>, n: usize, fault: Fault) {
    let mut q = q.lock().unwrap();
    while q.len() <= n {
        q.push_back(None);
    }
    q[n] = Some(fault);
}

fn next(q: &Mutex<VecDeque<Option<Fault>>>) -> Option<Fault> {
    q.lock().unwrap().pop_front().flatten()
}

impl Connector for TestNet {
    fn connect(&self, wait: Duration, io: Duration) -> Result<Box<dyn Channel>, WireError> {
        let c = self.net.connect(wait, io)?;
        Ok(Box::new(Faulty::new(c, next(&self.source))))
    }
}

impl Acceptor for TestNet {
    fn accept(&self, wait: Duration, io: Duration) -> Result<Box<dyn Channel>, WireError> {
        let c = self.net.accept(wait, io)?;
        Ok(Box::new(Faulty::new(c, next(&self.destination))))
    }
}
