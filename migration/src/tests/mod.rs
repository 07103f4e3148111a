//! Both ends of a migration against fake VMs, in one process: every mode succeeding, and
//! each step failing on either end (a peer that dies, stalls or sends garbage, a host
//! call that fails).

mod convergence;
mod destination_errors;
mod fakes;
mod fuzz_replay;
mod net;
mod recovery;
mod safety;
mod snapshot;
mod source_errors;
mod success;
mod tls;

use std::time::Duration;

use crate::error::Error;
use crate::host::NoProgress;
use crate::report::{IncomingReport, MigrationReport};
use crate::wire::frame::{Frame, FrameWriter};
use crate::wire::message::{Hello, Layout, Message, MessageReader, PROTOCOL_VERSION};
use crate::wire::transport::{Acceptor, Channel, Connector};
use crate::{destination, source, MigrationRequest, Mode, Timeouts};
use fakes::{FakeDestination, FakeSource};

pub const MIB: u64 = 1 << 20;

/// Waits long enough for a loaded 2-core machine (a clean-clone CI run beside two busy
/// loops saw a 10 s wait run out); every wait ends on its event when the peer is there.
pub fn timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(2),
        io: Duration::from_secs(30),
        accept: Duration::from_secs(30),
        urgent_accept: Duration::from_secs(30),
        confirm: Duration::from_secs(30),
        recover: Duration::from_secs(2),
    }
}

/// Short waits, for the tests of peers that stall (long enough that a loaded machine
/// does not look like a stalled peer).
pub fn quick() -> Timeouts {
    Timeouts {
        connect: Duration::from_millis(500),
        io: Duration::from_millis(1000),
        accept: Duration::from_secs(5),
        urgent_accept: Duration::from_secs(2),
        confirm: Duration::from_millis(1500),
        recover: Duration::from_secs(1),
    }
}

pub fn request(mode: Mode) -> MigrationRequest {
    let mut req = MigrationRequest::new("unix:/nowhere".parse().unwrap(), mode);
    req.downtime = Duration::from_millis(50);
    req
}

/// Runs a source and a destination against each other.
pub fn pair(
    src: &FakeSource,
    dst: &FakeDestination,
    req: &MigrationRequest,
    net: &(impl Connector + Acceptor),
    t: &Timeouts,
) -> (
    Result<MigrationReport, Error>,
    Result<IncomingReport, Error>,
) {
    std::thread::scope(|scope| {
        let d = scope.spawn(|| destination::receive(net, dst, t));
        let s = source::migrate_over(src, req, net, t, &NoProgress);
        (s, d.join().unwrap())
    })
}

/// The Hello a source with `layout` and one vCPU sends.
pub fn hello(layout: &Layout, mode: Mode) -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        memory_bytes: layout.memory_bytes,
        backing: "shmem".into(),
        page_size: layout.page_size,
        vcpus: 1,
        mode,
        session: None,
        channels: 1,
        boot_id: None,
    }
}

/// The HelloAck a destination with `layout` and one vCPU answers (with a session).
pub fn hello_ack(layout: &Layout, mode: Mode) -> Hello {
    Hello {
        session: Some(crate::Session::random().unwrap()),
        ..hello(layout, mode)
    }
}

/// One end of a connection, driven by hand.
pub struct Peer {
    pub w: FrameWriter<Box<dyn Channel>>,
    pub r: MessageReader<Box<dyn Channel>>,
}

impl Peer {
    pub fn new(c: Box<dyn Channel>, layout: Layout) -> Peer {
        Peer {
            w: FrameWriter::new(c.try_clone().unwrap()),
            r: MessageReader::new(c, layout),
        }
    }

    pub fn send(&mut self, m: &Message) {
        m.send(&mut self.w).unwrap();
        self.w.flush().unwrap();
    }

    pub fn send_raw(&mut self, f: &Frame) {
        self.w.send(f).unwrap();
        self.w.flush().unwrap();
    }

    /// The next frame, decoded; panics on anything but a message.
    pub fn recv(&mut self) -> Message<'static> {
        let f = Box::leak(Box::new(self.r.recv().unwrap()));
        self.r.decode(f).unwrap()
    }

    /// The kinds of the frames that arrive until the connection ends or goes silent.
    pub fn rest(&mut self) -> Vec<crate::FrameKind> {
        std::iter::from_fn(|| self.r.recv().ok().map(|f| f.kind)).collect()
    }

    /// Says nothing until the other end gives up and closes the connection (an event,
    /// not a guess at how long its timeout takes on a busy host).
    pub fn silent_until_closed(&mut self) {
        while let Err(crate::error::WireError::Silent) | Ok(_) = self.r.recv() {}
    }
}
