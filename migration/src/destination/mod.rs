//! The destination of a migration: `ReceiveState` plus a step function from (state,
//! message) to the next state, over the main connection.
//!
//! ```text
//! AwaitHello ─Hello─▶ Precopy(0) ─Page|ZeroPage─▶ Precopy(n) ─RoundEnd(n)─▶ Precopy(n+1)
//!   Precopy(n) ─SwitchOver─▶ [verify, restore, start, ▶Resumed] ─▶ AwaitComplete ─Complete─▶ Done
//!   Precopy(n) ─SwitchOver+missing─▶ Postcopy ─[both connections, until every page is in]─▶ Done
//! ```
//!
//! Any other message, in any state, is the peer's error; an `Abort` carries its reason.
//! A failure before `start` leaves nothing running; after it the error is
//! [`Error::AfterSwitchOver`].

mod install;
mod pager;

use std::time::Instant;

use crate::clock::monotonic_ns;
use crate::error::{Error, HostCall, PeerError, Step, WireError};
use crate::host::DestinationVm;
use crate::pages::{abort_and_close, layout_of, memory_hash};
use crate::report::IncomingReport;
use crate::wire::frame::FrameWriter;
use crate::wire::message::{Hello, Layout, Message, MessageReader, SwitchOver, PROTOCOL_VERSION};
use crate::wire::transport::{Acceptor, Channel};
use crate::Timeouts;
use guest_mm::PageContent;

use pager::UrgentPager;

/// Receives one migration from the first source that connects to `acceptor` into `vm`.
/// Returns when the migration is complete: pre-copy, at the source's `Complete`;
/// post-copy, when every page is installed and the urgent connection is done.
///
/// Calls, in order: `write_page`… → `restore` → (post-copy: `begin_postcopy`) → `start`
/// → `resumed_after_migration` → (post-copy: `install_page`… → `end_postcopy`). An error
/// after `start` is [`Error::AfterSwitchOver`]: in pre-copy the guest has all its memory
/// (only the source's `Complete` went missing); in post-copy pages are missing and
/// `end_postcopy` was not called (vCPUs touching them stay blocked).
pub fn receive(
    acceptor: &dyn Acceptor,
    vm: &dyn DestinationVm,
    timeouts: &Timeouts,
) -> Result<IncomingReport, Error> {
    let t0 = Instant::now();
    let layout = layout_of(vm.pages())?;
    let main = acceptor
        .accept(timeouts.accept, timeouts.io)
        .map_err(Error::wire(Step::Connect, timeouts.io))?;
    let clone = |c: &dyn Channel| {
        c.try_clone()
            .map_err(|e| Error::wire(Step::Connect, timeouts.io)(WireError::Io(e)))
    };
    let mut r = Receiver {
        vm,
        acceptor,
        timeouts,
        layout,
        writer: FrameWriter::new(clone(main.as_ref())?),
        reader: MessageReader::new(clone(main.as_ref())?, layout),
        main,
        urgent: None,
        t0,
        started: false,
        report: IncomingReport::default(),
    };
    match r.run() {
        Ok(()) => Ok(r.report),
        Err(e) => Err(r.fail(e)),
    }
}

/// Where the destination is, on the main connection.
#[derive(Debug)]
pub(crate) enum ReceiveState {
    AwaitHello,
    /// Receiving pre-copy round `round` (pages, its RoundEnd, or the SwitchOver).
    Precopy {
        round: u32,
    },
    /// Pre-copy: the guest runs here; the source owes its Complete.
    AwaitComplete,
    /// Post-copy: the switch-over with what is missing; run by [`install`].
    Postcopy(Box<SwitchOver>),
    Done,
}

impl ReceiveState {
    fn step(&self) -> Step {
        match self {
            ReceiveState::AwaitHello => Step::Handshake,
            ReceiveState::Precopy { round } => Step::Round(*round),
            ReceiveState::AwaitComplete | ReceiveState::Done => Step::Complete,
            ReceiveState::Postcopy(_) => Step::SwitchOver,
        }
    }

    fn expects(&self) -> &'static str {
        match self {
            ReceiveState::AwaitHello => "the source's Hello",
            ReceiveState::Precopy { .. } => "a page, the round's RoundEnd or the SwitchOver",
            ReceiveState::AwaitComplete | ReceiveState::Done => "the source's Complete",
            ReceiveState::Postcopy(_) => "nothing on the main connection yet",
        }
    }
}

pub(crate) struct Receiver<'a> {
    vm: &'a dyn DestinationVm,
    acceptor: &'a dyn Acceptor,
    timeouts: &'a Timeouts,
    layout: Layout,
    /// A handle on the main connection, to shut it down.
    main: Box<dyn Channel>,
    writer: FrameWriter<Box<dyn Channel>>,
    reader: MessageReader<Box<dyn Channel>>,
    /// Post-copy: the urgent connection, once accepted.
    urgent: Option<Box<dyn Channel>>,
    t0: Instant,
    started: bool,
    report: IncomingReport,
}

impl Receiver<'_> {
    fn run(&mut self) -> Result<(), Error> {
        let mut state = ReceiveState::AwaitHello;
        loop {
            state = match state {
                ReceiveState::Done => return Ok(()),
                ReceiveState::Postcopy(sw) => {
                    self.postcopy(*sw)?;
                    ReceiveState::Done
                }
                waiting => {
                    let wire = Error::wire(waiting.step(), self.timeouts.io);
                    let frame = self.reader.recv().map_err(wire)?;
                    let msg = self
                        .reader
                        .decode(&frame)
                        .map_err(Error::wire(waiting.step(), self.timeouts.io))?;
                    self.step(waiting, msg)?
                }
            };
        }
    }

    /// The state after `msg` arrived in `state`.
    fn step(&mut self, state: ReceiveState, msg: Message<'_>) -> Result<ReceiveState, Error> {
        use ReceiveState as S;
        match (state, msg) {
            (state, Message::Abort { reason }) => {
                Err(Error::peer(state.step(), PeerError::Aborted { reason }))
            }
            (S::AwaitHello, Message::Hello(theirs)) => self.hello(theirs),
            (S::Precopy { round }, Message::Page { gpa, data }) => {
                self.write_page(round, gpa, PageContent::Bytes(data))
            }
            (S::Precopy { round }, Message::ZeroPage { gpa }) => {
                self.write_page(round, gpa, PageContent::Zero)
            }
            (S::Precopy { round }, Message::RoundEnd { round: r }) if r == round => {
                Ok(S::Precopy { round: round + 1 })
            }
            (S::Precopy { .. }, Message::SwitchOver(sw)) => {
                self.report.receive_ms = self.t0.elapsed().as_secs_f64() * 1000.0;
                self.report.bytes = self.reader.bytes();
                match sw.missing {
                    Some(_) => Ok(S::Postcopy(sw)),
                    None => self.switch_over(*sw),
                }
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

    fn hello(&mut self, theirs: Hello) -> Result<ReceiveState, Error> {
        let pages = self.vm.pages();
        let ours = Hello {
            version: PROTOCOL_VERSION,
            memory_bytes: self.layout.memory_bytes,
            backing: pages.backing(),
            page_size: self.layout.page_size,
            vcpus: self.vm.vcpus(),
            mode: theirs.mode,
        };
        ours.check_compatible(&theirs)
            .map_err(|source| Error::Layout {
                step: Step::Handshake,
                source,
            })?;
        self.report.mode = theirs.mode.name().to_string();
        self.send(Step::Handshake, &Message::HelloAck(ours))?;
        Ok(ReceiveState::Precopy { round: 0 })
    }

    fn write_page(
        &mut self,
        round: u32,
        gpa: guest_mm::Gpa,
        page: PageContent<'_>,
    ) -> Result<ReceiveState, Error> {
        self.vm
            .pages()
            .write_page(gpa, page)
            .map_err(Error::host(Step::Round(round), HostCall::WritePage(gpa)))?;
        self.report.pages += 1;
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
        }
        self.vm
            .restore(sw.state)
            .map_err(Error::host(Step::Restore, HostCall::Restore))?;
        self.start()?;
        self.vm.pages().resumed_after_migration();
        Ok(ReceiveState::AwaitComplete)
    }

    /// Starts the restored guest and tells the source (the end of the downtime).
    fn start(&mut self) -> Result<(), Error> {
        self.vm
            .start()
            .map_err(Error::host(Step::Start, HostCall::Start))?;
        self.started = true;
        self.send(
            Step::Resumed,
            &Message::Resumed {
                at_ns: monotonic_ns(),
            },
        )
    }

    /// After a failure: tells the source (best effort) and closes both connections.
    fn fail(&mut self, error: Error) -> Error {
        abort_and_close(
            &mut self.writer,
            self.main.as_ref(),
            self.urgent.as_deref(),
            &error,
        );
        if self.started {
            Error::AfterSwitchOver {
                source: Box::new(error),
            }
        } else {
            error
        }
    }
}
