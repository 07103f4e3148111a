//! The destination of a migration: `ReceiveState` plus a step function from (state,
//! message) to the next state, over the main connection.
//!
//! ```text
//! [door: authenticated, Hello] ─▶ Precopy(0) ─Page|ZeroPage─▶ Precopy(n) ─RoundEnd(n)─▶ Precopy(n+1)
//!   Precopy(n) ─SwitchOver─▶ [verify, restore, ◀Ready] ─▶ AwaitStart ─Start─▶ [start, ◀Resumed]
//!     ─▶ AwaitComplete ─Complete─▶ Done
//!   Precopy(n) ─SwitchOver+missing─▶ Postcopy ─[both connections, until every page is in]─▶ Done
//! ```
//!
//! Any other message, in any state, is the peer's error; an `Abort` carries its reason.
//! A failure before `start` leaves nothing running; after it the error is
//! [`Error::AfterSwitchOver`]. Once `Ready` went out the source may have handed the guest
//! over: a connection that breaks then is waited out ([`recover`]) — the source comes back
//! on a resumed connection, or the destination ends saying what it never received.

mod channels;
mod door;
mod install;
mod pager;
mod recover;

use std::time::Instant;

pub use door::Strangers;

use crate::clock::monotonic_ns;
use crate::error::{Error, HostCall, PeerError, Step};
use crate::host::DestinationVm;
use crate::pages::{abort_and_close, layout_of, memory_hash};
use crate::report::IncomingReport;
use crate::wire::auth::Auth;
use crate::wire::conn::Conn;
use crate::wire::frame::FrameWriter;
use crate::wire::message::{
    Hello, Joining, Layout, Message, MessageReader, SwitchOver, PROTOCOL_VERSION,
};
use crate::wire::transport::{Acceptor, Channel};
use crate::Timeouts;

use door::Door;
use pager::UrgentPager;

/// How a destination receives.
#[derive(Clone, Debug, Default)]
pub struct Options {
    pub timeouts: Timeouts,
    /// How every connection authenticates.
    pub auth: Auth,
    /// What a connection that is not the source does before the migration began.
    pub strangers: Strangers,
}

/// Receives one migration from the first source that connects to `acceptor` into `vm`,
/// without authentication; any other first connection fails it (see [`receive_with`]).
pub fn receive(
    acceptor: &dyn Acceptor,
    vm: &dyn DestinationVm,
    timeouts: &Timeouts,
) -> Result<IncomingReport, Error> {
    let options = Options {
        timeouts: *timeouts,
        auth: Auth::None,
        strangers: Strangers::Fail,
    };
    receive_with(acceptor, vm, &options)
}

/// Receives one migration from the first source that authenticates on `acceptor` into
/// `vm`. Returns when the migration is complete: pre-copy, at the source's `Complete`;
/// post-copy, when every page is installed and the urgent connection is done.
///
/// Calls, in order: `prepare_incoming` → `write_page`… → `restore` → (post-copy: `begin_postcopy`) → `start`
/// → `resumed_after_migration` → (post-copy: `install_page`… → `end_postcopy`). An error
/// after `start` is [`Error::AfterSwitchOver`]: in pre-copy the guest has all its memory
/// (only the source's `Complete` went missing); in post-copy pages are missing and
/// `end_postcopy` was not called (vCPUs touching them stay blocked, never on zeros).
pub fn receive_with(
    acceptor: &dyn Acceptor,
    vm: &dyn DestinationVm,
    options: &Options,
) -> Result<IncomingReport, Error> {
    let t0 = Instant::now();
    let layout = layout_of(vm.pages())?;
    vm.pages()
        .prepare_incoming()
        .map_err(Error::host(Step::Connect, HostCall::PrepareIncoming))?;
    let timeouts = &options.timeouts;
    let door = Door::new(acceptor, &options.auth, vm, layout, *timeouts)?;
    let (main, theirs) = door.main(options.strangers)?;
    let lanes = channels::Channels::default();
    let result = std::thread::scope(|scope| {
        let doorman = scope.spawn(|| door.serve(scope));
        let Conn {
            channel,
            writer,
            reader,
            ..
        } = main;
        let mut r = Receiver {
            vm,
            door: &door,
            channels: &lanes,
            channel_handles: Vec::new(),
            timeouts,
            layout,
            writer,
            reader,
            main: channel,
            urgent: None,
            t0,
            ready: false,
            started_at_ns: None,
            resumed_sent: false,
            report: IncomingReport::default(),
        };
        let result = match r.run(theirs, scope) {
            Ok(()) => Ok(r.report.clone()),
            // A channel that failed shut the main connection down: its error is the cause.
            Err(e) => Err(r.fail(lanes.failure().unwrap_or(e))),
        };
        door.close();
        let _ = doorman.join();
        result
    });
    result.map(|mut report| {
        report.refused_connections = door.refused();
        report
    })
}

/// What an arriving extent holds.
#[derive(Clone, Copy, Debug)]
enum Extent<'a> {
    Bytes(&'a [u8]),
    /// This many zero pages.
    Zeros(u64),
}

/// Where the destination is, on the main connection.
#[derive(Debug)]
pub(crate) enum ReceiveState {
    /// Receiving pre-copy round `round` (pages, its RoundEnd, or the SwitchOver).
    Precopy {
        round: u32,
    },
    /// Pre-copy: restored and `Ready`; the source's `Start` hands the guest over.
    AwaitStart,
    /// Pre-copy: the guest runs here; the source owes its Complete.
    AwaitComplete,
    /// Post-copy: the switch-over with what is missing; run by [`install`].
    Postcopy(Box<SwitchOver>),
    Done,
}

impl ReceiveState {
    fn step(&self) -> Step {
        match self {
            ReceiveState::Precopy { round } => Step::Round(*round),
            ReceiveState::AwaitStart => Step::Start,
            ReceiveState::AwaitComplete | ReceiveState::Done => Step::Complete,
            ReceiveState::Postcopy(_) => Step::SwitchOver,
        }
    }

    fn expects(&self) -> &'static str {
        match self {
            ReceiveState::Precopy { .. } => "a page, the round's RoundEnd or the SwitchOver",
            ReceiveState::AwaitStart => "the source's Start",
            ReceiveState::AwaitComplete | ReceiveState::Done => "the source's Complete",
            ReceiveState::Postcopy(_) => "nothing on the main connection yet",
        }
    }
}

pub(crate) struct Receiver<'a> {
    vm: &'a dyn DestinationVm,
    door: &'a Door<'a>,
    /// The pre-copy channels beyond the main connection: how their threads ended.
    channels: &'a channels::Channels,
    /// Handles on those channels, to end them when the migration fails.
    channel_handles: Vec<Box<dyn Channel>>,
    timeouts: &'a Timeouts,
    layout: Layout,
    /// A handle on the main connection, to shut it down.
    main: Box<dyn Channel>,
    writer: FrameWriter<Box<dyn Channel>>,
    reader: MessageReader<Box<dyn Channel>>,
    /// Post-copy: the urgent connection, once accepted.
    urgent: Option<Box<dyn Channel>>,
    t0: Instant,
    /// `Ready` went out: from here the source may hand the guest over.
    ready: bool,
    /// When the guest started here (CLOCK_MONOTONIC).
    started_at_ns: Option<u64>,
    /// `Resumed` went out: the source knows the guest runs here.
    resumed_sent: bool,
    report: IncomingReport,
}

impl<'a> Receiver<'a> {
    fn run<'s>(&mut self, theirs: Hello, scope: &'s std::thread::Scope<'s, '_>) -> Result<(), Error>
    where
        'a: 's,
    {
        let mut state = self.hello(theirs, scope)?;
        loop {
            state = match state {
                ReceiveState::Done => return Ok(()),
                ReceiveState::Postcopy(sw) => {
                    self.postcopy(*sw)?;
                    ReceiveState::Done
                }
                waiting => {
                    let handing_over = matches!(
                        waiting,
                        ReceiveState::AwaitStart | ReceiveState::AwaitComplete
                    );
                    match self.next(waiting) {
                        Ok(next) => next,
                        // Ready went out and the connection broke: the source may have
                        // handed the guest over without hearing whether it runs here.
                        // It comes back and is told; or, not started, nothing ever runs
                        // here, and, started, the guest goes on with all its memory.
                        Err(e) if self.ready && handing_over && e.is_recoverable() => {
                            let lacking = crate::PageBitmap::empty(self.layout.pages());
                            self.recover(e, &lacking, 0)?;
                            match self.started_at_ns {
                                None => ReceiveState::AwaitStart,
                                Some(_) => ReceiveState::AwaitComplete,
                            }
                        }
                        Err(e) => return Err(e),
                    }
                }
            };
        }
    }

    /// Waits for the next message in `waiting` and steps.
    fn next(&mut self, waiting: ReceiveState) -> Result<ReceiveState, Error> {
        let wire = Error::wire(waiting.step(), self.timeouts.io);
        let frame = self.reader.recv().map_err(wire)?;
        let msg = self
            .reader
            .decode(&frame)
            .map_err(Error::wire(waiting.step(), self.timeouts.io))?;
        let next = self.step(waiting, msg);
        self.reader.recycle(frame);
        next
    }

    /// The state after `msg` arrived in `state`.
    fn step(&mut self, state: ReceiveState, msg: Message<'_>) -> Result<ReceiveState, Error> {
        use ReceiveState as S;
        match (state, msg) {
            (state, Message::Abort { reason }) => {
                Err(Error::peer(state.step(), PeerError::Aborted { reason }))
            }
            (S::Precopy { round }, Message::Page { gpa, data }) => {
                self.write_pages(round, gpa, Extent::Bytes(data))
            }
            (S::Precopy { round }, Message::ZeroPage { gpa, pages }) => {
                self.write_pages(round, gpa, Extent::Zeros(pages.into()))
            }
            (S::Precopy { round }, Message::RoundEnd { round: r }) if r == round => {
                Ok(S::Precopy { round: round + 1 })
            }
            (S::Precopy { .. }, Message::SwitchOver(sw)) => {
                // Every channel's pages are in before the switch-over is acted on.
                self.report.pages += self.channels.wait()?;
                self.report.receive_ms = self.t0.elapsed().as_secs_f64() * 1000.0;
                self.report.bytes = self.reader.bytes();
                match sw.missing {
                    Some(_) => Ok(S::Postcopy(sw)),
                    None => self.switch_over(*sw),
                }
            }
            (S::AwaitStart, Message::Start) => {
                self.start()?;
                self.vm.pages().resumed_after_migration();
                Ok(S::AwaitComplete)
            }
            (S::AwaitComplete, Message::Complete { demand: None }) => Ok(S::Done),
            (state, other) => Err(Error::peer(
                state.step(),
                PeerError::Unexpected {
                    index: self.reader.last_index(),
                    expected: state.expects(),
                    got: other.kind(),
                },
            )),
        }
    }

    /// Sends a message the source waits for.
    fn send(&mut self, step: Step, m: &Message) -> Result<(), Error> {
        let wire = Error::wire(step, self.timeouts.io);
        m.send(&mut self.writer)
            .and_then(|()| self.writer.flush())
            .map_err(wire)
    }

    fn hello<'s>(
        &mut self,
        theirs: Hello,
        scope: &'s std::thread::Scope<'s, '_>,
    ) -> Result<ReceiveState, Error>
    where
        'a: 's,
    {
        let pages = self.vm.pages();
        let ours = Hello {
            version: PROTOCOL_VERSION,
            memory_bytes: self.layout.memory_bytes,
            backing: pages.backing(),
            page_size: self.layout.page_size,
            vcpus: self.vm.vcpus(),
            mode: theirs.mode,
            session: None,
            channels: theirs.channels,
            boot_id: crate::clock::boot_id(),
        };
        ours.check_compatible(&theirs)
            .map_err(|source| Error::Layout {
                step: Step::Handshake,
                source,
            })?;
        self.report.mode = theirs.mode.name().to_string();
        let ack = Hello {
            session: Some(self.door.session),
            ..ours
        };
        self.send(Step::Handshake, &Message::HelloAck(ack))?;
        self.open_channels(theirs.channels, scope)?;
        Ok(ReceiveState::Precopy { round: 0 })
    }

    /// Takes the source's other pre-copy channels as they join, each read on a thread.
    fn open_channels<'s>(
        &mut self,
        channels: u32,
        scope: &'s std::thread::Scope<'s, '_>,
    ) -> Result<(), Error>
    where
        'a: 's,
    {
        let io = self.timeouts.io;
        for k in 1..channels {
            let step = Step::Channel(k);
            let wait = self.timeouts.urgent_accept;
            let conn = self
                .door
                .joined(Joining::Channel, wait)
                .ok_or(Error::Peer {
                    step,
                    source: PeerError::Timeout { waited: wait },
                })?;
            let cloned = |c: &dyn Channel| {
                c.try_clone()
                    .map_err(|e| Error::wire(step, io)(crate::error::WireError::Io(e)))
            };
            self.channel_handles.push(cloned(conn.channel.as_ref())?);
            let main = cloned(self.main.as_ref())?;
            let (pages, lanes) = (self.vm.pages(), self.channels);
            lanes.started();
            scope.spawn(move || channels::receive(k, pages, conn, main, lanes));
        }
        Ok(())
    }

    /// Writes an arriving extent in place: the guest does not run here yet.
    fn write_pages(
        &mut self,
        round: u32,
        gpa: guest_mm::Gpa,
        extent: Extent<'_>,
    ) -> Result<ReceiveState, Error> {
        let pages = self.vm.pages();
        let written = match extent {
            Extent::Bytes(data) => pages
                .write_pages(gpa, data)
                .map(|()| data.len() as u64 / self.layout.page_size),
            Extent::Zeros(n) => pages.zero_pages(gpa, n).map(|()| n),
        };
        self.report.pages +=
            written.map_err(Error::host(Step::Round(round), HostCall::WritePage(gpa)))?;
        Ok(ReceiveState::Precopy { round })
    }

    /// Pre-copy switch-over: every page is here.
    fn switch_over(&mut self, sw: SwitchOver) -> Result<ReceiveState, Error> {
        if let Some(there) = sw.memory_hash {
            let here = memory_hash(self.vm.pages(), &self.layout)?;
            if here != there {
                return Err(Error::MemoryHash {
                    step: Step::Verify,
                    here,
                    there,
                });
            }
            self.report.memory_hash = Some(here);
        }
        self.vm
            .restore(sw.state)
            .map_err(Error::host(Step::Restore, HostCall::Restore))?;
        self.offer()?;
        Ok(ReceiveState::AwaitStart)
    }

    /// Restored and ready: the source may now hand the guest over with `Start`.
    fn offer(&mut self) -> Result<(), Error> {
        self.ready = true;
        self.send(Step::Resumed, &Message::Ready)
    }

    /// Starts the restored guest and tells the source (the end of the downtime).
    fn start(&mut self) -> Result<(), Error> {
        self.vm
            .start()
            .map_err(Error::host(Step::Start, HostCall::Start))?;
        let at_ns = monotonic_ns();
        self.started_at_ns = Some(at_ns);
        self.send(Step::Resumed, &Message::Resumed { at_ns })?;
        self.resumed_sent = true;
        Ok(())
    }

    /// After a failure: tells the source (best effort) and closes both connections. Once
    /// the guest started here, an `Abort` goes out only after `Resumed` did: a source
    /// that reads an `Abort` where it waits for `Resumed` takes it to mean that nothing
    /// runs here, and runs the guest again.
    fn fail(&mut self, error: Error) -> Error {
        for c in &self.channel_handles {
            c.shutdown();
        }
        if self.started_at_ns.is_none() || self.resumed_sent {
            abort_and_close(
                &mut self.writer,
                self.main.as_ref(),
                self.urgent.as_deref(),
                &error,
            );
        } else {
            self.main.shutdown();
            if let Some(u) = &self.urgent {
                u.shutdown();
            }
        }
        if self.started_at_ns.is_some() {
            Error::AfterSwitchOver {
                source: Box::new(error),
            }
        } else {
            error
        }
    }
}
