//! The source of a migration, as a state machine: `State` says what comes next, and
//! `Session::step` does it and returns the state after it.
//!
//! ```text
//! Handshake ─▶ DirtyLog ─▶ Round(0) ─▶ Round(n)… ─▶ Pause ─▶ StopAndCopy ─▶ SwitchOver
//!      (post-copy: DirtyLog ─▶ Pause ─▶ SwitchOver)                            │
//!                               AwaitResumed ◀─[Start]─ AwaitReady ◀───────────┘
//!   Done ◀─ Complete ◀─ AwaitResumed (pre-copy)
//!   Done ◀─ Postcopy ◀─ AwaitResumed (post-copy, hybrid)
//! ```
//!
//! The session remembers whether it paused the guest, whether it handed it over (sent
//! `Start`) and whether the destination confirmed it runs it, which decides what a
//! failure does (see `Session::fail`): once handed over, a broken connection is waited
//! out and resumed ([`recover`]), never answered by running the guest here again.

mod missing;
mod postcopy;
mod precopy;
mod recover;

use std::time::Instant;

use guest_mm::GpaRange;

pub use missing::dirty_pages;
use missing::Missing;

use crate::bitmap::PageBitmap;
use crate::clock::monotonic_ns;
use crate::error::PeerError;
use crate::error::{Error, HostCall, Step};
use crate::host::{Paused, Phase, Progress, SourceVm};
use crate::pages::{abort_and_close, expect, extents, layout_of, memory_hash, PageSender};
use crate::report::{Converged, MigrationReport};
use crate::wire::auth::{Auth, Session as SessionId};
use crate::wire::conn::Conn;
use crate::wire::frame::FrameWriter;
use crate::wire::message::{
    Hello, Joining, Layout, Message, MessageReader, SwitchOver, PROTOCOL_VERSION,
};
use crate::wire::transport::{Channel, Connector};
use crate::{MigrationRequest, Mode, Timeouts, Verify};

/// How a source sends.
#[derive(Clone, Debug, Default)]
pub struct Options {
    pub timeouts: Timeouts,
    /// How every connection authenticates.
    pub auth: Auth,
}

/// Migrates the guest of `vm` to `req.to` with `options`. Returns when the migration
/// has ended; see [`migrate_with`].
pub fn migrate(
    vm: &dyn SourceVm,
    req: &MigrationRequest,
    options: &Options,
    progress: &dyn Progress,
) -> Result<MigrationReport, Error> {
    migrate_with(vm, req, &req.to, options, progress)
}

/// Migrates the guest of `vm` over connections from `connector`, unauthenticated.
pub fn migrate_over(
    vm: &dyn SourceVm,
    req: &MigrationRequest,
    connector: &dyn Connector,
    timeouts: &Timeouts,
    progress: &dyn Progress,
) -> Result<MigrationReport, Error> {
    let options = Options {
        timeouts: *timeouts,
        auth: Auth::None,
    };
    migrate_with(vm, req, connector, &options, progress)
}

/// Migrates the guest of `vm` over connections from `connector`.
///
/// On success the guest runs on the destination and stays paused here. On failure,
/// [`Error::guest_at`] says where it runs: before `pause` it never stopped; between
/// `pause` and `Start` (or a destination's explicit refusal after it) this function has
/// called `resume`; after `Start` the error is [`Error::AfterSwitchOver`] and the guest
/// is the destination's. A connection that breaks after `Start` is resumed when
/// [`SourceVm::handover_paused`] says where to.
pub fn migrate_with(
    vm: &dyn SourceVm,
    req: &MigrationRequest,
    connector: &dyn Connector,
    options: &Options,
    progress: &dyn Progress,
) -> Result<MigrationReport, Error> {
    let t0 = Instant::now();
    let timeouts = &options.timeouts;
    let layout = layout_of(vm.pages())?;
    let main = open(connector, &options.auth, layout, timeouts, Step::Connect)?;
    let mut s = Session {
        vm,
        req,
        connector,
        timeouts,
        auth: &options.auth,
        progress,
        layout,
        writer: main.writer,
        reader: main.reader,
        main: main.channel,
        urgent: None,
        urgent_conn: None,
        channels: Vec::new(),
        session: None,
        sender: PageSender::new(vm.pages(), &layout),
        convergence: precopy::Convergence::default(),
        logging: false,
        paused_at_ns: None,
        lap: Instant::now(),
        shared_clock: false,
        committed: false,
        resumed: false,
        report: MigrationReport {
            mode: req.mode.name().to_string(),
            to: req.to.to_string(),
            granularity_bytes: layout.page_size,
            channels: req.channels.clamp(1, crate::MAX_CHANNELS),
            downtime_budget_ms: match req.mode {
                Mode::Precopy | Mode::Auto => req.downtime.as_secs_f64() * 1000.0,
                Mode::Postcopy | Mode::Hybrid => 0.0,
            },
            ..Default::default()
        },
    };
    let result = s.run();
    if s.convergence.throttle > 0 {
        // Full speed again: for a guest that stays here, and for a paused one it is
        // harmless. A failure only leaves the guest slower; the migration is over.
        let _ = vm.throttle(0);
    }
    if s.logging {
        vm.stop_dirty_log();
    }
    progress.finished();
    match result {
        Ok(()) => {
            s.report.total_ms = t0.elapsed().as_secs_f64() * 1000.0;
            s.report.bytes_sent += s.writer.bytes;
            s.report.bytes_sent += s.channels.iter().map(|c| c.writer.bytes).sum::<u64>();
            Ok(s.report)
        }
        Err(e) => Err(s.fail(e)),
    }
}

/// One connection to the destination from `connector`, authenticated.
fn open(
    connector: &dyn Connector,
    auth: &Auth,
    layout: Layout,
    timeouts: &Timeouts,
    step: Step,
) -> Result<Conn, Error> {
    let io = timeouts.io;
    let channel = connector
        .connect(timeouts.connect, io)
        .map_err(Error::wire(step, io))?;
    let channel = auth
        .wrap_client(channel, &connector.server_name())
        .map_err(|source| Error::Auth { step, source })?;
    let mut conn = Conn::new(channel, layout, io).map_err(|e| Error::wire(step, io)(e.into()))?;
    auth.client(&mut conn, step)?;
    Ok(conn)
}

/// Which pages a pre-copy round sends.
#[derive(Debug)]
pub(crate) enum RoundPages {
    All,
    Dirty(Vec<u64>),
}

/// What the source does next.
pub(crate) enum State {
    Handshake,
    DirtyLog,
    Round {
        n: u32,
        pages: RoundPages,
    },
    /// Stop the vCPUs; `pending` were dirtied since the last round and are not sent yet.
    Pause {
        pending: Vec<u64>,
    },
    /// Pre-copy, paused: the last pages, then the optional hash.
    StopAndCopy {
        paused: Paused,
        pages: Vec<u64>,
    },
    SwitchOver(Box<SwitchOver>),
    /// Waiting for the destination to be ready to run the guest; `missing` for post-copy.
    AwaitReady {
        missing: Option<PageBitmap>,
    },
    /// Handed over: waiting for the destination to say it runs the guest.
    AwaitResumed {
        missing: Option<PageBitmap>,
    },
    Postcopy {
        missing: PageBitmap,
    },
    Complete,
    Done,
}

pub(crate) struct Session<'a> {
    vm: &'a dyn SourceVm,
    req: &'a MigrationRequest,
    connector: &'a dyn Connector,
    timeouts: &'a Timeouts,
    auth: &'a Auth,
    progress: &'a dyn Progress,
    layout: Layout,
    /// A handle on the main connection, to shut it down.
    main: Box<dyn Channel>,
    writer: FrameWriter<Box<dyn Channel>>,
    reader: MessageReader<Box<dyn Channel>>,
    /// Post-copy: a handle on the urgent connection, once open, to shut it down.
    urgent: Option<Box<dyn Channel>>,
    /// Post-copy: the urgent connection's reader and writer, until the push takes them.
    urgent_conn: Option<Conn>,
    /// The pre-copy channels beyond the main connection (`--channels`), until the
    /// switch-over ends them.
    channels: Vec<Conn>,
    /// The destination's name for this migration (its HelloAck).
    session: Option<SessionId>,
    sender: PageSender<'a>,
    convergence: precopy::Convergence,
    logging: bool,
    /// Set once the vCPUs stopped.
    paused_at_ns: Option<u64>,
    /// When the switch-over's current step began (the report's `downtime_steps`).
    lap: Instant,
    /// Whether the destination runs on this boot of this host (its HelloAck's boot id):
    /// then its resume time is on this end's CLOCK_MONOTONIC.
    shared_clock: bool,
    /// Set once `Start` went out: the guest is the destination's, whatever fails next.
    committed: bool,
    /// Set once the destination confirmed it runs the guest.
    resumed: bool,
    report: MigrationReport,
}

impl Session<'_> {
    fn run(&mut self) -> Result<(), Error> {
        let mut state = State::Handshake;
        while !matches!(state, State::Done) {
            state = match self.step(state) {
                Ok(next) => next,
                Err(e) if self.in_doubt(&e) => self.recover(e)?,
                Err(e) => return Err(e),
            };
        }
        Ok(())
    }

    /// Does what `state` says and returns what comes next.
    fn step(&mut self, state: State) -> Result<State, Error> {
        match state {
            State::Handshake => self.handshake(),
            State::DirtyLog => self.start_dirty_log(),
            State::Round { n, pages } => self.round(n, pages),
            State::Pause { pending } => self.pause(pending),
            State::StopAndCopy { paused, pages } => self.stop_and_copy(paused, pages),
            State::SwitchOver(sw) => self.switch_over(*sw),
            State::AwaitReady { missing } => self.await_ready(missing),
            State::AwaitResumed { missing } => self.await_resumed(missing),
            State::Postcopy { missing } => {
                postcopy::run(self, missing)?;
                Ok(State::Done)
            }
            State::Complete => {
                self.send(Step::Complete, &Message::Complete { demand: None })?;
                Ok(State::Done)
            }
            State::Done => Ok(State::Done),
        }
    }

    /// Sends a message that the peer may wait for: written out at once.
    fn send(&mut self, step: Step, m: &Message) -> Result<(), Error> {
        let wire = Error::wire(step, self.timeouts.io);
        m.send(&mut self.writer)
            .and_then(|()| self.writer.flush())
            .map_err(wire)
    }

    fn handshake(&mut self) -> Result<State, Error> {
        let pages = self.vm.pages();
        let hello = Hello {
            version: PROTOCOL_VERSION,
            memory_bytes: self.layout.memory_bytes,
            backing: pages.backing(),
            page_size: self.layout.page_size,
            vcpus: self.vm.vcpus(),
            mode: self.req.mode,
            session: None,
            channels: self.report.channels,
            boot_id: crate::clock::boot_id(),
        };
        self.send(Step::Handshake, &Message::Hello(hello.clone()))?;
        let theirs = expect(
            &mut self.reader,
            Step::Handshake,
            self.timeouts.io,
            "the destination's HelloAck",
            |m| match m {
                Message::HelloAck(h) => Ok(h),
                other => Err(other.kind()),
            },
        )?;
        hello
            .check_compatible(&theirs)
            .map_err(|source| Error::Layout {
                step: Step::Handshake,
                source,
            })?;
        self.shared_clock = hello.boot_id.is_some() && hello.boot_id == theirs.boot_id;
        self.session = Some(theirs.session.ok_or(Error::Peer {
            step: Step::Handshake,
            source: PeerError::Unexpected {
                index: self.reader.last_index(),
                expected: "a HelloAck that names the session",
                got: crate::FrameKind::HelloAck,
            },
        })?);
        for k in 1..self.report.channels {
            let step = Step::Channel(k);
            let mut conn = open(self.connector, self.auth, self.layout, self.timeouts, step)?;
            conn.send(step, &self.join(Joining::Channel))?;
            self.channels.push(conn);
        }
        Ok(State::DirtyLog)
    }

    fn start_dirty_log(&mut self) -> Result<State, Error> {
        self.vm
            .start_dirty_log()
            .map_err(Error::host(Step::DirtyLog, HostCall::StartDirtyLog))?;
        self.logging = true;
        // What was written before logging began is in round 0 (or missing) anyway.
        self.take_dirty(Step::DirtyLog)?;
        Ok(match self.req.mode {
            Mode::Precopy | Mode::Hybrid | Mode::Auto => State::Round {
                n: 0,
                pages: RoundPages::All,
            },
            Mode::Postcopy => State::Pause {
                pending: Vec::new(),
            },
        })
    }

    /// Backing pages written since the last take.
    fn take_dirty(&mut self, step: Step) -> Result<Vec<u64>, Error> {
        let bitmap = self
            .vm
            .take_dirty_log()
            .map_err(Error::host(step, HostCall::TakeDirtyLog))?;
        let mut pages = dirty_pages(&bitmap, self.layout.page_size);
        pages.retain(|&p| p < self.layout.pages());
        Ok(pages)
    }

    /// Sends `pages` (ascending) as extents, telling the progress display every 256
    /// pages or so; returns how many pages. With pre-copy channels, each channel sends
    /// the extents of its regions on a thread of its own.
    fn send_pages(
        &mut self,
        pages: impl Iterator<Item = u64>,
        step: Step,
        phase: Phase,
    ) -> Result<u64, Error> {
        self.progress.update(phase, self.writer.bytes);
        if !self.channels.is_empty() {
            let n = self.send_on_channels(pages, step)?;
            self.progress.update(phase, self.writer.bytes);
            return Ok(n);
        }
        let (mut n, mut told) = (0, 0);
        for extent in extents(pages, &self.layout) {
            self.sender
                .send_extent(&mut self.writer, extent, step, self.timeouts.io)?;
            n += extent.1;
            if n - told >= 256 {
                told = n;
                self.progress.update(phase, self.writer.bytes);
            }
        }
        Ok(n)
    }

    /// Sends `pages` over every pre-copy channel, region `r` on channel `r % channels`
    /// (so that the copies of one page arrive in the order they were sent); returns how
    /// many pages.
    fn send_on_channels(
        &mut self,
        pages: impl Iterator<Item = u64>,
        step: Step,
    ) -> Result<u64, Error> {
        let lanes = self.channels.len() + 1;
        let per_region = (guest_mm::SIZE_2M / self.layout.page_size).max(1);
        let mut shares: Vec<Vec<(u64, u64)>> = vec![Vec::new(); lanes];
        for e in extents(pages, &self.layout) {
            shares[((e.0 / per_region) % lanes as u64) as usize].push(e);
        }
        let (layout, io, pages) = (self.layout, self.timeouts.io, self.vm.pages());
        let Session {
            channels,
            writer,
            sender,
            ..
        } = self;
        let Some((main_share, rest)) = shares.split_first() else {
            return Ok(0);
        };
        std::thread::scope(|scope| {
            let others: Vec<_> = channels
                .iter_mut()
                .zip(rest)
                .enumerate()
                .map(|(i, (conn, share))| {
                    scope.spawn(move || {
                        let step = Step::Channel(i as u32 + 1);
                        let mut sender = PageSender::new(pages, &layout);
                        for &e in share {
                            sender.send_extent(&mut conn.writer, e, step, io)?;
                        }
                        conn.writer.flush().map_err(Error::wire(step, io))?;
                        Ok(share.iter().map(|e| e.1).sum::<u64>())
                    })
                })
                .collect();
            let mut sent = 0;
            let mut first_error = None;
            for &e in main_share {
                if let Err(err) = sender.send_extent(writer, e, step, io) {
                    first_error = Some(err);
                    break;
                }
                sent += e.1;
            }
            for h in others {
                let r = h.join().unwrap_or(Err(Error::Panicked {
                    step,
                    what: "pre-copy channel",
                }));
                match r {
                    Ok(n) => sent += n,
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            match first_error {
                None => Ok(sent),
                Some(e) => Err(e),
            }
        })
    }

    /// The rounds are over: every pre-copy channel ends with `Complete` (the destination
    /// has all their pages before it acts on the SwitchOver that follows on the main
    /// connection).
    fn end_channels(&mut self) -> Result<(), Error> {
        for (i, conn) in self.channels.iter_mut().enumerate() {
            conn.send(
                Step::Channel(i as u32 + 1),
                &Message::Complete { demand: None },
            )?;
        }
        Ok(())
    }

    fn pause(&mut self, pending: Vec<u64>) -> Result<State, Error> {
        self.progress.update(Phase::StopAndCopy, self.writer.bytes);
        self.lap();
        let paused = self
            .vm
            .pause()
            .map_err(Error::host(Step::Pause, HostCall::Pause))?;
        self.paused_at_ns = Some(monotonic_ns());
        self.report.downtime_steps.pause_ms = self.lap();
        let last = self.take_dirty(Step::StopAndCopy)?;
        let written = vmm_written_pages(&paused.vmm_written, &self.layout);
        let mut pages: Vec<u64> = pending.into_iter().chain(last).chain(written).collect();
        pages.sort_unstable();
        pages.dedup();
        let switch_to_postcopy = self.report.converged_by == Converged::Postcopy;
        Ok(match self.req.mode {
            Mode::Precopy => State::StopAndCopy { paused, pages },
            Mode::Auto if !switch_to_postcopy => State::StopAndCopy { paused, pages },
            Mode::Postcopy => {
                self.postcopy_switch_over(paused, PageBitmap::full(self.layout.pages()))?
            }
            Mode::Hybrid | Mode::Auto => {
                let mut missing = PageBitmap::empty(self.layout.pages());
                pages.into_iter().for_each(|p| missing.set(p));
                self.postcopy_switch_over(paused, missing)?
            }
        })
    }

    fn postcopy_switch_over(
        &mut self,
        paused: Paused,
        missing: PageBitmap,
    ) -> Result<State, Error> {
        self.report.push_order = self.req.push_order.name().to_string();
        // The guest is stopped: its pages are final, whichever way they travel.
        let hash = match self.req.verify {
            Some(Verify::MemoryHash) => Some(crate::pages::digest_pages(
                self.vm.pages(),
                &self.layout,
                0..self.layout.pages(),
            )?),
            None => None,
        };
        self.report.memory_hash = hash;
        Ok(State::SwitchOver(Box::new(SwitchOver {
            state: paused.state,
            paused_at_ns: self.paused_at_ns.unwrap_or_default(),
            memory_hash: hash,
            missing: Some(missing),
        })))
    }

    fn stop_and_copy(&mut self, paused: Paused, pages: Vec<u64>) -> Result<State, Error> {
        self.report.pages_precopy +=
            self.send_pages(pages.into_iter(), Step::StopAndCopy, Phase::StopAndCopy)?;
        let hash = match self.req.verify {
            Some(Verify::MemoryHash) => Some(memory_hash(self.vm.pages(), &self.layout)?),
            None => None,
        };
        self.report.memory_hash = hash;
        Ok(State::SwitchOver(Box::new(SwitchOver {
            state: paused.state,
            paused_at_ns: self.paused_at_ns.unwrap_or_default(),
            memory_hash: hash,
            missing: None,
        })))
    }

    fn switch_over(&mut self, sw: SwitchOver) -> Result<State, Error> {
        self.end_channels()?;
        self.report.downtime_steps.last_pages_ms = self.lap();
        let missing = sw.missing.clone();
        self.send(Step::SwitchOver, &Message::SwitchOver(Box::new(sw)))?;
        if missing.is_some() {
            // The urgent channel: a second connection, for demand requests and their
            // pages only (the destination takes it before it is ready).
            self.join_urgent(self.connector)?;
        }
        Ok(State::AwaitReady { missing })
    }

    /// Opens the urgent connection and joins it to this migration.
    fn join_urgent(&mut self, connector: &dyn Connector) -> Result<(), Error> {
        let step = Step::UrgentConnect;
        let mut urgent = open(connector, self.auth, self.layout, self.timeouts, step)?;
        urgent.send(step, &self.join(Joining::Urgent))?;
        self.urgent = Some(
            urgent
                .channel
                .try_clone()
                .map_err(|e| Error::wire(step, self.timeouts.io)(e.into()))?,
        );
        self.urgent_conn = Some(urgent);
        Ok(())
    }

    fn join(&self, channel: Joining) -> Message<'static> {
        Message::Join {
            session: self.session.unwrap_or(SessionId([0; SessionId::LEN])),
            channel,
        }
    }

    /// The destination is ready: hand the guest over. From `Start` on, the source never
    /// runs it again.
    fn await_ready(&mut self, missing: Option<PageBitmap>) -> Result<State, Error> {
        expect(
            &mut self.reader,
            Step::Resumed,
            self.timeouts.io,
            "the destination's Ready",
            |m| match m {
                Message::Ready => Ok(()),
                other => Err(other.kind()),
            },
        )?;
        self.report.downtime_steps.restore_ms = self.lap();
        self.committed = true;
        self.send(Step::Start, &Message::Start)?;
        Ok(State::AwaitResumed { missing })
    }

    fn await_resumed(&mut self, missing: Option<PageBitmap>) -> Result<State, Error> {
        let at_ns = expect(
            &mut self.reader,
            Step::Resumed,
            self.timeouts.io,
            "the destination's Resumed",
            |m| match m {
                Message::Resumed { at_ns } => Ok(at_ns),
                other => Err(other.kind()),
            },
        )?;
        self.report.downtime_steps.start_ms = self.lap();
        self.resumed_at(at_ns);
        Ok(match missing {
            None => State::Complete,
            Some(missing) => State::Postcopy { missing },
        })
    }

    /// Milliseconds since the last lap, and a new lap from now.
    fn lap(&mut self) -> f64 {
        let now = Instant::now();
        let ms = now.duration_since(self.lap).as_secs_f64() * 1000.0;
        self.lap = now;
        ms
    }

    /// The destination runs the guest since `at_ns` (on its CLOCK_MONOTONIC). On this
    /// host that is set against the pause; from another host's clock it means nothing,
    /// and the downtime is the source's own: from the pause until `Resumed` arrived
    /// (one message's latency more).
    fn resumed_at(&mut self, at_ns: u64) {
        self.resumed = true;
        self.report.downtime_ms = match (self.shared_clock, self.paused_at_ns) {
            (true, Some(paused_at)) => at_ns.saturating_sub(paused_at) as f64 / 1e6,
            (false, Some(paused_at)) => monotonic_ns().saturating_sub(paused_at) as f64 / 1e6,
            (_, None) => 0.0,
        };
        if matches!(self.req.mode, Mode::Precopy | Mode::Auto) {
            self.report.budget_met =
                Some(self.report.downtime_ms <= self.report.downtime_budget_ms);
        }
    }

    /// Whether `e` leaves the guest's whereabouts to a resumed connection: it was handed
    /// over, the network (not the destination) failed, and there is something left to
    /// learn or send (a pre-copy destination that confirmed it runs the guest has all).
    fn in_doubt(&self, e: &Error) -> bool {
        self.committed && e.is_recoverable() && (self.postcopy() || !self.resumed)
    }

    /// Whether pages travel after the switch-over: post-copy, hybrid, and an auto
    /// migration whose rounds did not converge.
    fn postcopy(&self) -> bool {
        match self.req.mode {
            Mode::Precopy => false,
            Mode::Postcopy | Mode::Hybrid => true,
            Mode::Auto => self.report.converged_by == Converged::Postcopy,
        }
    }

    /// After a failure: tells the peer (best effort), closes, and puts the guest where it
    /// belongs — resumed here if it was paused and the destination never ran it.
    fn fail(&mut self, error: Error) -> Error {
        for c in &self.channels {
            c.channel.shutdown();
        }
        abort_and_close(
            &mut self.writer,
            self.main.as_ref(),
            self.urgent.as_deref(),
            &error,
        );
        // An Abort where `Resumed` was due: the destination did not start the guest.
        let refused = !self.resumed
            && matches!(
                error.root(),
                Error::Peer {
                    source: PeerError::Aborted { .. },
                    ..
                }
            );
        if self.resumed || (self.committed && !refused) {
            return Error::AfterSwitchOver {
                source: Box::new(error),
            };
        }
        if self.paused_at_ns.is_some() {
            if let Err(resume) = self.vm.resume() {
                return Error::ResumeFailed {
                    source: Box::new(error),
                    resume,
                };
            }
        }
        error
    }
}

/// The backing pages that hold any byte of the VMM-written ranges, inside guest RAM.
fn vmm_written_pages<'r>(
    ranges: &'r [GpaRange],
    layout: &'r Layout,
) -> impl Iterator<Item = u64> + 'r {
    ranges
        .iter()
        .map(|r| r.clamp_to(layout.memory_bytes))
        .filter(|r| !r.is_empty())
        .flat_map(|r| r.pages(layout.page_size))
}
