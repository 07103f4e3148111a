//! The run controller: one thread that owns the run's state and reacts to events —
//! control-API calls, vCPUs whose guest ended, a migration source asking to pause or
//! reporting its end, a destination's guest arriving — and, between events, watches the
//! guest's mailbox for the run's limits (`--duration`, `vm.shutdown`, a failed vCPU, the
//! corruption test) and its deadline.
//!
//! ```text
//!  Waiting ─vm.receive-migration─▶ Receiving ──arrived──▶ Running ◀─ migration failed ─┐
//!  (no guest yet)                (destination)   vm.resume │ │ │ vm.send-migration      │
//!                                     Paused(api) ◀────────┘ │ └─▶ Migrating ──pause──▶ │
//!                                          vm.pause          │     Paused(switch-over) ─┤
//!     limit / shutdown / signal /                            │  connection broke ▲ ▼    ▼ migration done
//!     a vCPU failed                                          ▼  after hand-over PostcopyPaused
//!                              Stopping ──every vCPU ended──▶ (end)           Migrated ─▶ (end)
//! ```
//! Both pauses stop the vCPUs in place ([`VcpuSet::pause`]) before the controller
//! answers; `vm.resume` and a failed migration run the same threads again.
//! `PostcopyPaused` is both ends' state while a migration whose connection broke after
//! the hand-over waits to be resumed: the source keeps its guest stopped (it is the
//! destination's), the destination stops its vCPUs (they would only wait for pages that
//! do not come). SIGINT, SIGTERM and SIGHUP end the run as `vm.shutdown` does
//! ([`crate::signals`]).

use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::Duration;

use guest_image::abi;
use vm_memory::{Bytes, GuestAddress};

use crate::api::{ApiCall, MigrateRefusal, ReceiveRefusal, StateRefusal};
use crate::builder::{Start, Vmm};
use crate::config::{CorruptionTest, RunConfig, RunLimit};
use crate::console::Console;
use crate::error::{Error, Result};
use crate::mailbox::Mailbox;
use crate::migration_host::{DestinationEvent, RunInfo, SourceRequest};
use crate::progress::Tracker;
use crate::vstate::vcpu::{Vcpu, VcpuEnd, VcpuEndResult, VcpuOutcome};
use crate::vstate::vcpu_set::VcpuSet;
use crate::vstate::vm::Vm;

mod calls;
mod handover;
mod snapshot;
use guest_image::clock::monotonic_ns;
use guest_mm::GuestMemory;
use migration::{IncomingReport, MigrationReport};

/// How often the controller looks at the guest's mailbox between events.
const POLL: Duration = Duration::from_millis(2);
/// How long vCPUs get to finish their pass after the stop flag before they are kicked.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// Where the run is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// A VMM started without a guest, waiting for `vm.receive-migration`.
    Waiting,
    /// A migration destination waiting for, or receiving, its guest.
    Receiving,
    /// The guest runs here.
    Running,
    /// The guest runs here while a migration sends it away.
    Migrating,
    /// The vCPUs are stopped in place.
    Paused(PauseCause),
    /// The run's end was asked for; the vCPUs finish their pass.
    Stopping,
    /// The guest was handed over to a migration destination.
    Migrated,
    /// A connection broke after the hand-over; the migration waits to be resumed.
    PostcopyPaused,
}

/// Who stopped the vCPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PauseCause {
    /// `vm.pause`; `vm.resume` runs them again.
    Api,
    /// A migration, for its switch-over.
    SwitchOver,
}

impl RunState {
    pub fn name(self) -> &'static str {
        match self {
            RunState::Waiting => "waiting",
            RunState::Receiving => "receiving",
            RunState::Running => "running",
            RunState::Migrating => "migrating",
            RunState::Paused(_) => "paused",
            RunState::Stopping => "stopping",
            RunState::Migrated => "migrated",
            RunState::PostcopyPaused => "postcopy-paused",
        }
    }
}

/// What reaches the controller.
pub enum Event {
    Api(ApiCall),
    VcpuEnded(usize, VcpuEndResult),
    Source(SourceRequest),
    Incoming(DestinationEvent),
}

/// Where a destination's migration is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IncomingPhase {
    /// Waiting for the source, or receiving pages before the switch-over.
    Receiving,
    /// The guest runs here; post-copy pages still arrive.
    Postcopy,
    /// The guest runs here; the source has yet to end the migration.
    Completing,
    Complete,
}

impl IncomingPhase {
    fn name(self) -> &'static str {
        match self {
            IncomingPhase::Receiving => "receiving",
            IncomingPhase::Postcopy => "postcopy",
            IncomingPhase::Completing => "completing",
            IncomingPhase::Complete => "complete",
        }
    }
}

/// Everything the run leaves for its report.
pub struct RunEnd {
    /// How the guest was entered (on a destination: on the source).
    pub entry: String,
    pub outcomes: Vec<VcpuOutcome>,
    pub timed_out: bool,
    pub launch_ns: u64,
    pub end_ns: u64,
    pub workload: String,
    pub corrupted_gpa: Option<u64>,
    pub migrated: Option<MigrationReport>,
    /// The guest was handed over although the migration did not end cleanly.
    pub handed_over: bool,
    pub migration_failures: Vec<String>,
    /// The migration failure that ends the run with an error (after its report).
    pub migration_error: Option<String>,
    /// An incoming guest whose missing pages never came was released and stopped: what
    /// its vCPUs did after that (they read zeros) is a consequence, not the outcome.
    pub abandoned: bool,
    pub incoming: Option<IncomingReport>,
    pub console: Arc<Console>,
    pub memory: Arc<GuestMemory>,
    pub mailbox: Mailbox,
    /// How long the run was allowed (its timeout, from the guest's start here).
    pub timeout: Duration,
    /// No guest ever ran here: a VMM that waited for a migration and was ended first.
    pub no_guest: bool,
}

type MigrateReply = Sender<std::result::Result<MigrationReport, MigrateRefusal>>;

/// The source side of a migration in progress.
struct Outgoing {
    /// The `vm.migrate` calls waiting for its end (the first, and each resume).
    replies: Vec<MigrateReply>,
    /// Each vCPU's worst pass when it paused, restored if the migration fails.
    max_pass_at_pause: Vec<u64>,
    mode: migration::Mode,
    destination: migration::Uri,
    progress: Arc<Tracker>,
    /// Postcopy-paused: where to send the resume's destination (`None`: give up).
    resume: Option<Sender<Option<migration::Uri>>>,
}

impl Outgoing {
    /// Gives up a paused hand-over: the migration ends failed, the guest the destination's.
    fn give_up(&mut self) {
        if let Some(tx) = self.resume.take() {
            let _ = tx.send(None);
        }
    }
}

/// The run's limits, checked on every poll.
#[derive(Default)]
struct Limits {
    /// The run's whole duration (`--duration`, or the source's): None runs the guest's
    /// passes to their end.
    duration: Option<Duration>,
    /// When the guest is told to stop (`--duration`, from its first start anywhere).
    stop_at: Option<u64>,
    /// When the stop flag was set.
    stop_requested_at: Option<u64>,
    shutdown_requested: bool,
    deadline: u64,
    /// The timeout `deadline` was set from.
    timeout: Duration,
    timed_out: bool,
    corrupted_gpa: Option<u64>,
    /// vCPU 0's pass count when the corruption was written.
    corrupted_at_pass: Option<u64>,
    /// A vCPU reset or powered off the machine: every vCPU stops.
    machine_ended: bool,
}

pub struct Controller<'a> {
    cfg: &'a RunConfig,
    entry: String,
    memory: Arc<GuestMemory>,
    vm: Arc<Vm>,
    mailbox: Mailbox,
    console: Arc<Console>,
    vcpus: Option<VcpuSet>,
    ended: Vec<Option<VcpuEndResult>>,
    state: RunState,
    events_tx: Sender<Event>,
    events_rx: Receiver<Event>,
    launch_ns: u64,
    /// Guest run time on the source before it arrived here (0 when booted here).
    source_elapsed_ns: u64,
    workload: String,
    limits: Limits,
    outgoing: Option<Outgoing>,
    migrated: Option<MigrationReport>,
    handed_over: bool,
    migration_failures: Vec<String>,
    incoming: Option<IncomingReport>,
    /// A destination's migration; `None` for a guest booted here.
    incoming_phase: Option<IncomingPhase>,
    /// The guest's run info as it arrived (a destination's report needs it).
    arrived: Option<RunInfo>,
    /// Destination: connections refused at the migration listener.
    refused_connections: u64,
    /// Destination, postcopy-paused: the pages it still lacks.
    lacking_pages: Option<u64>,
    /// Destination, postcopy-paused: the state it paused from.
    paused_from: Option<RunState>,
    /// The signal that ended the run, once seen.
    signal: Option<i32>,
    /// What ends the run with an error once the vCPUs are finished (a post-copy that
    /// failed after the guest started here, a source that could not resume its guest).
    fatal: Option<Error>,
    /// See [`RunEnd::abandoned`].
    abandoned: bool,
    /// A `vm.receive-migration` call, answered when the migration ends here.
    receive_reply: Option<Sender<std::result::Result<(), ReceiveRefusal>>>,
    /// A snapshot waiting for its hot-set period to end.
    snapshot: Option<snapshot::PendingSnapshot>,
    /// `--snapshot-at` has been taken (once per run).
    snapshot_at_taken: bool,
    /// Where a destination listens for its guest (until it arrives).
    receiving_on: Option<migration::Uri>,
    _api: Option<crate::api::ApiServer>,
}

impl<'a> Controller<'a> {
    /// Starts the run: boots the vCPUs, or starts receiving the guest.
    pub fn start(cfg: &'a RunConfig, vmm: Vmm) -> Result<Controller<'a>> {
        let (events_tx, events_rx) = channel();
        let memory = vmm.memory;
        let api = vmm.api.map(|(server, calls)| {
            forward(calls, events_tx.clone(), Event::Api);
            server
        });
        let mut c = Controller {
            cfg,
            entry: vmm.entry.to_string(),
            memory,
            vm: vmm.vm,
            mailbox: vmm.mailbox,
            console: Arc::new(Console::new(cfg.console.clone())),
            vcpus: None,
            ended: vec![None; cfg.vcpus as usize],
            state: RunState::Receiving,
            events_tx,
            events_rx,
            launch_ns: monotonic_ns(),
            source_elapsed_ns: 0,
            workload: cfg.workload.to_string(),
            limits: Limits::default(),
            outgoing: None,
            migrated: None,
            handed_over: false,
            migration_failures: Vec::new(),
            incoming: None,
            incoming_phase: None,
            arrived: None,
            refused_connections: 0,
            lacking_pages: None,
            paused_from: None,
            signal: None,
            fatal: None,
            abandoned: false,
            receive_reply: None,
            snapshot: None,
            snapshot_at_taken: false,
            receiving_on: None,
            _api: api,
        };
        c.limits.duration = match cfg.limit {
            RunLimit::Duration(d) => Some(d),
            RunLimit::Passes(_) | RunLimit::FromSource => None,
        };
        match vmm.start {
            Start::Boot(vcpus) => c.start_guest(vcpus)?,
            Start::Incoming(listener) => c.receive_on(listener)?,
            Start::AwaitReceive => c.state = RunState::Waiting,
            Start::Restore(snap, mode) => c.restore_from(*snap, mode)?,
        }
        Ok(c)
    }

    /// Receives the guest on `listener`, on a thread of its own.
    fn receive_on(&mut self, listener: migration::Listener) -> Result<()> {
        let tx = self.events_tx.clone();
        let options = migration::destination::Options {
            timeouts: migration::Timeouts {
                accept: self.cfg.accept_timeout(),
                recover: self.cfg.recovery_timeout,
                ..Default::default()
            },
            auth: self.cfg.migration_auth.clone(),
            strangers: migration::destination::Strangers::Refuse,
        };
        // A signal before the guest arrives removes the socket file this binds.
        self.receiving_on = listener.uri().ok();
        crate::migration_host::start_receiving(
            listener,
            self.memory.clone(),
            self.vm.clone(),
            self.cfg.vcpus,
            options,
            move |e| {
                let _ = tx.send(Event::Incoming(e));
            },
        )?;
        self.state = RunState::Receiving;
        self.incoming_phase = Some(IncomingPhase::Receiving);
        Ok(())
    }

    /// Restores the guest from a snapshot, on a thread of its own (a destination whose
    /// source is the snapshot directory).
    fn restore_from(
        &mut self,
        snap: migration::snapshot::Snapshot,
        mode: migration::snapshot::RestoreMode,
    ) -> Result<()> {
        let tx = self.events_tx.clone();
        crate::snapshot::start_restoring(
            snap,
            mode,
            self.memory.clone(),
            self.vm.clone(),
            self.cfg.vcpus,
            move |e| {
                let _ = tx.send(Event::Incoming(e));
            },
        )?;
        self.state = RunState::Receiving;
        self.incoming_phase = Some(IncomingPhase::Receiving);
        Ok(())
    }

    /// Starts the vCPU threads and what runs beside the guest; the run's clock starts.
    fn start_guest(&mut self, vcpus: Vec<Vcpu>) -> Result<()> {
        self.launch_ns = monotonic_ns();
        // Before the vCPUs run: the fault path must be in place for their first touch.
        self.memory.start()?;
        let memory = self.memory.clone();
        let tx = self.events_tx.clone();
        self.vcpus = Some(VcpuSet::start(
            vcpus,
            &self.console,
            Arc::new(move |index| memory.vcpu_threads().register_current(index)),
            Arc::new(move |index, end| {
                let _ = tx.send(Event::VcpuEnded(index, end));
            }),
        )?);
        self.state = RunState::Running;
        // The duration counts from the guest's first start, on whichever host.
        let left = self
            .limits
            .duration
            .map(|d| d.saturating_sub(Duration::from_nanos(self.source_elapsed_ns)));
        self.limits.timeout = self.cfg.timeout_for(left);
        self.limits.deadline = self.launch_ns + self.limits.timeout.as_nanos() as u64;
        self.limits.stop_at = left.map(|l| self.launch_ns + l.as_nanos() as u64);
        Ok(())
    }

    /// Runs the event loop until the run ends, then finishes the vCPUs.
    pub fn run(mut self) -> Result<RunEnd> {
        while !self.finished() {
            match self.events_rx.recv_timeout(POLL) {
                Ok(event) => self.handle(event)?,
                Err(RecvTimeoutError::Timeout) => {}
                // The controller holds a sender itself: never happens.
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.on_signal()?;
            if !matches!(self.state, RunState::Waiting | RunState::Receiving) {
                self.poll_guest()?;
            }
        }
        self.finish()
    }

    /// SIGINT/SIGTERM/SIGHUP: the run ends as `vm.shutdown` would end it. A destination
    /// still waiting for its guest has nothing to report: it ends at once.
    fn on_signal(&mut self) -> Result<()> {
        let Some(signal) = crate::signals::received() else {
            return Ok(());
        };
        if self.signal.replace(signal).is_some() {
            return Ok(());
        }
        let name = crate::signals::name(signal);
        if self.state == RunState::Receiving {
            // The receiving thread owns the listener: its socket file goes here.
            if let Some(migration::Uri::Unix(p)) = &self.receiving_on {
                let _ = std::fs::remove_file(p);
            }
            return Err(Error::Interrupted { signal: name });
        }
        eprintln!("hugevisor: {name}: ending the run");
        self.request_shutdown();
        Ok(())
    }

    /// `vm.shutdown`, `vmm.shutdown`, a signal: the guest finishes its pass (a VMM still
    /// waiting for one ends); a paused hand-over is given up.
    fn request_shutdown(&mut self) {
        self.limits.shutdown_requested = true;
        if let Some(o) = self.outgoing.as_mut() {
            o.give_up();
        }
    }

    fn finished(&self) -> bool {
        if self.fatal.is_some() && self.state != RunState::Stopping {
            return true;
        }
        match self.state {
            RunState::Migrated => true,
            // Ended by vmm.shutdown before any guest came.
            RunState::Waiting => self.limits.shutdown_requested,
            RunState::Receiving
            | RunState::Paused(PauseCause::SwitchOver)
            | RunState::PostcopyPaused => false,
            RunState::Running
            | RunState::Migrating
            | RunState::Stopping
            | RunState::Paused(PauseCause::Api) => {
                self.limits.timed_out
                    || self.limits.machine_ended
                    // A guest without a mailbox cannot be asked to finish its pass.
                    || (self.limits.stop_requested_at.is_some() && !self.mailbox.is_present())
                    || self.ended.iter().all(Option::is_some)
            }
        }
    }

    fn handle(&mut self, event: Event) -> Result<()> {
        match event {
            Event::Api(call) => self.on_api(call),
            Event::VcpuEnded(index, end) => {
                if matches!(end, Ok(VcpuEnd::Reset | VcpuEnd::PowerOff)) {
                    self.limits.machine_ended = true;
                }
                if let Some(slot) = self.ended.get_mut(index) {
                    *slot = Some(end);
                }
            }
            Event::Source(SourceRequest::Pause(reply)) => {
                let _ = reply.send(self.pause_for_migration());
            }
            Event::Source(SourceRequest::Resume(reply)) => {
                let _ = reply.send(self.resume_after_failed_migration());
            }
            Event::Source(SourceRequest::Throttle(percent, reply)) => {
                let _ = reply.send(self.vcpus.as_ref().map_or(Ok(()), |v| v.throttle(percent)));
            }
            Event::Source(SourceRequest::Done(result)) => self.on_migration_done(*result),
            Event::Source(SourceRequest::HandoverPaused(why, resume)) => {
                eprintln!("hugevisor: warning: the migration is paused after the hand-over ({why}); the guest stays stopped here: resume it with `hugevisor migrate --resume --to URI`");
                self.state = RunState::PostcopyPaused;
                match self.outgoing.as_mut() {
                    Some(o) if !self.limits.shutdown_requested => {
                        o.resume = Some(resume);
                        for r in o.replies.drain(..) {
                            let _ = r.send(Err(MigrateRefusal::Paused(why.clone())));
                        }
                    }
                    _ => drop(resume.send(None)),
                }
            }
            Event::Source(SourceRequest::HandoverResumed) => {
                self.state = RunState::Paused(PauseCause::SwitchOver)
            }
            Event::Incoming(DestinationEvent::Refused(why)) => {
                self.refused_connections += 1;
                eprintln!("hugevisor: warning: refused a migration connection: {why}");
            }
            Event::Incoming(DestinationEvent::Paused { why, lacking }) => {
                self.on_incoming_paused(&why, lacking)
            }
            Event::Incoming(DestinationEvent::Resumed) => self.on_incoming_resumed(),
            Event::Incoming(DestinationEvent::Arrived(arrival)) => self.on_arrival(*arrival),
            Event::Incoming(DestinationEvent::Ended(result)) => self.on_incoming_end(result)?,
        }
        Ok(())
    }

    /// Between events: the corruption test, the run's limits, failures, the deadline.
    fn poll_guest(&mut self) -> Result<()> {
        if self.state == RunState::PostcopyPaused && monotonic_ns() >= self.limits.deadline {
            // Nobody resumed it within the run's --timeout: the hand-over is given up.
            if let Some(o) = self.outgoing.as_mut() {
                o.give_up();
            }
        }
        if matches!(
            self.state,
            RunState::Paused(PauseCause::SwitchOver)
                | RunState::Migrated
                | RunState::PostcopyPaused
        ) {
            return Ok(());
        }
        let now = monotonic_ns();
        let memory = self.memory.clone();
        let mem = memory.staging();
        let corruption_checked = match self.cfg.corruption {
            CorruptionTest::None => true,
            CorruptionTest::AfterFirstPass => self
                .limits
                .corrupted_at_pass
                .is_some_and(|at| self.mailbox.slot(mem, 0).passes >= at + 2),
        };
        let limit_reached =
            self.limits.shutdown_requested || self.limits.stop_at.is_some_and(|t| now >= t);
        if self.limits.stop_requested_at.is_none() && limit_reached && corruption_checked {
            self.request_stop(now);
        }
        if self.cfg.corruption == CorruptionTest::AfterFirstPass
            && self.limits.corrupted_gpa.is_none()
        {
            self.corrupt_one_page()?;
        }
        if self.limits.stop_requested_at.is_none() {
            self.poll_snapshot(now)?;
        }
        // One vCPU's failure ends the run for all.
        if self.ended.iter().any(Option::is_some) && self.limits.stop_requested_at.is_none() {
            let failed = (0..self.cfg.vcpus as usize).any(|i| {
                let st = self.mailbox.slot(mem, i).state;
                st == abi::STATE_EXCEPTION || st == abi::STATE_BAD_PARAMS
            });
            if failed {
                self.request_stop(now);
            }
        }
        let grace_over = self
            .limits
            .stop_requested_at
            .is_some_and(|t| now >= t + STOP_GRACE.as_nanos() as u64);
        if now >= self.limits.deadline || grace_over {
            self.limits.timed_out = true;
        }
        Ok(())
    }

    fn request_stop(&mut self, now: u64) {
        self.mailbox.request_stop(self.memory.staging());
        self.limits.stop_requested_at = Some(now);
        // A guest paused by vm.pause runs again to finish its pass.
        if self.state == RunState::Paused(PauseCause::Api) {
            if let Some(Err(e)) = self.vcpus.as_ref().map(VcpuSet::resume) {
                self.fatal.get_or_insert(e);
            }
            self.state = RunState::Running;
        }
        if self.state == RunState::Running {
            self.state = RunState::Stopping;
        }
    }

    /// `--inject-corruption`: after vCPU 0's first pass, overwrite one word of a page in
    /// its partition through the staging view (the VMM's own access path).
    fn corrupt_one_page(&mut self) -> Result<()> {
        let mem = self.memory.staging();
        let slot = self.mailbox.slot(mem, 0);
        if slot.passes < 1 {
            return Ok(());
        }
        let pages = (slot.part_end - slot.part_start) / 4096;
        let gpa = slot.part_start + pages / 2 * 4096 + 8;
        let word: u64 = mem.read_obj(GuestAddress(gpa)).unwrap_or(0);
        mem.write_obj(word ^ 0x5a5a_0000_0000_5a5a, GuestAddress(gpa))
            .map_err(|e| Error::GuestWrite {
                gpa,
                what: e.to_string(),
            })?;
        self.limits.corrupted_gpa = Some(gpa & !0xfff);
        self.limits.corrupted_at_pass = Some(slot.passes);
        Ok(())
    }

    /// The run is over: finish the vCPUs, end a migration still in flight, wait for a
    /// destination's receiving thread.
    fn finish(mut self) -> Result<RunEnd> {
        // As late as possible, so that the released vCPUs run as little as can be before
        // their stop: a vCPU blocked on a page that will never come cannot stop otherwise.
        if self.abandoned {
            self.release_blocked_vcpus();
        }
        let outcomes = self.vcpus.take().map(|v| v.finish()).unwrap_or_default();
        let end_ns = monotonic_ns();
        // A migration still in flight ends here: the guest finished (or failed) first.
        if let Some(mut o) = self.outgoing.take() {
            o.give_up();
            let why = MigrateRefusal::GuestFinished;
            self.migration_failures.push(why.to_string());
            for r in &o.replies {
                let _ = r.send(Err(MigrateRefusal::GuestFinished));
            }
        }
        // A destination's migration reports its end once its threads are done (they end
        // when the source does, or when their connections fail).
        while self
            .incoming_phase
            .is_some_and(|p| p != IncomingPhase::Complete)
        {
            match self.events_rx.recv() {
                Ok(Event::Incoming(DestinationEvent::Ended(r))) => self.on_incoming_end(r)?,
                Ok(Event::Incoming(DestinationEvent::Arrived(a))) => {
                    let _ = a
                        .started
                        .send(Err(Error::GuestStart("the run has ended".into())));
                }
                Ok(other) => self.refuse(other),
                Err(_) => break,
            }
        }
        while let Ok(event) = self.events_rx.try_recv() {
            self.refuse(event);
        }
        // The run ends with its report all the same; the error is its outcome.
        let migration_error = self.fatal.take().map(|e| e.to_string());
        // Every guest that ran here had vCPU threads.
        let no_guest = outcomes.is_empty();
        Ok(RunEnd {
            entry: self.entry,
            migration_error,
            abandoned: self.abandoned,
            outcomes,
            timed_out: self.limits.timed_out,
            launch_ns: self.launch_ns,
            end_ns,
            workload: self.workload,
            corrupted_gpa: self.limits.corrupted_gpa,
            migrated: self.migrated,
            handed_over: self.handed_over,
            migration_failures: self.migration_failures,
            incoming: self.incoming,
            console: self.console,
            memory: self.memory.clone(),
            mailbox: self.mailbox,
            timeout: self.limits.timeout,
            no_guest,
        })
    }

    /// Answers what arrives after the end.
    fn refuse(&self, event: Event) {
        match event {
            Event::Source(SourceRequest::Pause(reply)) => {
                let _ = reply.send(Err(Error::GuestFinished));
            }
            Event::Source(SourceRequest::Resume(reply))
            | Event::Source(SourceRequest::Throttle(_, reply)) => {
                let _ = reply.send(Err(Error::GuestFinished));
            }
            Event::Api(ApiCall::Info(reply)) => {
                let _ = reply.send(crate::status::info(&self.snapshot()));
            }
            Event::Api(ApiCall::Counters(reply)) => {
                let _ = reply.send(crate::status::counters(&self.snapshot()));
            }
            // The run is ending already.
            Event::Api(ApiCall::Shutdown(reply) | ApiCall::VmmShutdown(reply)) => {
                let _ = reply.send(Ok(()));
            }
            Event::Api(ApiCall::Pause(reply) | ApiCall::Resume(reply)) => {
                let _ = reply.send(Err(StateRefusal::NotRunning(RunState::Stopping.name())));
            }
            Event::Api(ApiCall::Migrate(_, reply)) => {
                let _ = reply.send(Err(MigrateRefusal::GuestFinished));
            }
            Event::Api(ApiCall::Receive(_, reply)) => {
                let _ = reply.send(Err(ReceiveRefusal::NotWaiting(RunState::Stopping.name())));
            }
            Event::Api(ApiCall::Snapshot(_, reply)) => {
                let _ = reply.send(Err(crate::snapshot::SnapshotRefusal::GuestFinished));
            }
            _ => {}
        }
    }
}

/// Forwards everything `from` receives into the controller's channel, wrapped by `wrap`,
/// on a small thread that ends when either side closes.
fn forward<T: Send + 'static>(from: Receiver<T>, to: Sender<Event>, wrap: fn(T) -> Event) {
    let _ = std::thread::Builder::new()
        .name("events".into())
        .spawn(move || {
            while let Ok(x) = from.recv() {
                if to.send(wrap(x)).is_err() {
                    return;
                }
            }
        });
}
