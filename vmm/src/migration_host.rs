//! The VM as the `migration` crate sees it: this module implements its `SourceVm` and
//! `DestinationVm` traits (guest memory's `GuestPages` is in `memory.rs`) and runs each
//! end on a thread of its own. Every decision about what to send when lives in the
//! migration crate; here are only the VM's answers:
//! - source: dirty logging through KVM, and pause/resume in place — asked of the
//!   controller, which owns the vCPUs and the run's state;
//! - destination: the vCPUs built from the arriving state, started through the
//!   controller (the end of the downtime).
//!
//! The VM state a migration carries ([`MigratedState`]) is serialised here and opaque to
//! the migration crate.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use migration::{
    DestinationVm, GuestPages, HostError, IncomingEvent, MigrationRequest, Paused, SourceVm, Uri,
    VmState,
};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::progress::Tracker;
use crate::vstate::state::{self, MachineState};
use crate::vstate::vcpu::{Vcpu, VcpuState};
use crate::vstate::vm::{DirtyLogging, Vm};
use guest_mm::{FaultPathKind, GuestMemory};

/// What the destination needs to continue the run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunInfo {
    pub workload: String,
    /// Guest run time on the source so far.
    pub elapsed_ns: u64,
    /// The run's `--duration`, if it has one.
    pub duration_ns: Option<u64>,
    /// Guest worst pass per vCPU at the switch (cycles), to find the stall afterwards.
    pub max_pass_cycles: Vec<u64>,
    /// Passes of all vCPUs at the switch, to count those made on the destination.
    pub passes: u64,
    /// Where the guest's mailbox is: the built-in image's (by either entry), or none
    /// for a guest hugevisor did not build.
    pub mailbox: Option<u64>,
    /// How the guest was first entered (the destination's report says it too).
    pub entry: String,
}

/// The VM state that travels with a migration: every vCPU's whole state, the VM's
/// (kvmclock, irqchip, PIT, devices, the CPUID the guest was given) and the run's info.
#[derive(Debug, Serialize, Deserialize)]
pub struct MigratedState {
    pub vcpus: Vec<VcpuState>,
    pub machine: MachineState,
    pub run: RunInfo,
}

impl MigratedState {
    /// The state of `vm` with its paused vCPUs' `vcpus`.
    pub fn capture(vm: &Vm, vcpus: Vec<VcpuState>, run: RunInfo) -> Result<MigratedState> {
        let machine = MachineState::save(vm.fd(), vm.devices().save(), &vm.vcpu_cpuid(0))?;
        Ok(MigratedState {
            vcpus,
            machine,
            run,
        })
    }
}

/// What the source side asks of the controller.
pub enum SourceRequest {
    /// Stop the vCPUs in place; answer with the state to carry.
    Pause(Sender<Result<Paused>>),
    /// The migration failed after the pause: run the guest here again.
    Resume(Sender<Result<()>>),
    /// Keep the vCPUs out of the guest this share of the time, in percent (0: full speed).
    Throttle(u32, Sender<Result<()>>),
    /// The guest was handed over and a connection broke (`postcopy-paused`): answer
    /// with where to resume, when asked to (`None`: give up).
    HandoverPaused(String, Sender<Option<Uri>>),
    /// A resumed migration goes on.
    HandoverResumed,
    /// The migration ended.
    Done(Box<std::result::Result<migration::MigrationReport, migration::Error>>),
}

/// What the destination side tells the controller.
pub enum DestinationEvent {
    /// The guest's vCPUs are built; start them and answer.
    Arrived(Box<Arrival>),
    /// A connection that is not this migration's was refused.
    Refused(String),
    /// Post-copy broke: the guest's vCPUs must wait (paused) for the source to resume.
    Paused { why: String, lacking: u64 },
    /// The source is back.
    Resumed,
    /// The migration ended: every page is here, or it failed.
    Ended(std::result::Result<migration::IncomingReport, migration::Error>),
}

/// A destination's guest, ready to run.
pub struct Arrival {
    pub vcpus: Vec<Vcpu>,
    pub run: RunInfo,
    /// Whether pages are still to come (post-copy) while the guest runs.
    pub postcopy: bool,
    pub started: Sender<Result<()>>,
}

/// The source VM: KVM's dirty log, and pause/resume through the controller.
struct SourceHost {
    memory: Arc<GuestMemory>,
    vm: Arc<Vm>,
    vcpus: u32,
    controller: Box<dyn Fn(SourceRequest) + Send + Sync>,
    cancel: Cancel,
}

/// A migration's `timeout_s` with Cloud Hypervisor's `Cancel` strategy: a migration that
/// has not paused the guest by the deadline fails at the next round's end (or at the
/// pause), and the guest keeps running here. Once paused, the switch-over goes on.
struct Cancel {
    timeout: Duration,
    deadline: Instant,
    paused: AtomicBool,
}

impl Cancel {
    fn check(&self) -> std::result::Result<(), HostError> {
        if !self.paused.load(Ordering::Acquire) && Instant::now() >= self.deadline {
            return Err(Error::MigrationTimeout(self.timeout).into());
        }
        Ok(())
    }
}

fn ask<T>(
    controller: &(dyn Fn(SourceRequest) + Send + Sync),
    make: impl FnOnce(Sender<Result<T>>) -> SourceRequest,
) -> std::result::Result<T, HostError> {
    let (tx, rx) = channel();
    controller(make(tx));
    Ok(rx.recv().map_err(|_| Error::ControllerGone)??)
}

impl SourceVm for SourceHost {
    fn pages(&self) -> &dyn GuestPages {
        &*self.memory
    }

    fn vcpus(&self) -> u32 {
        self.vcpus
    }

    fn start_dirty_log(&self) -> std::result::Result<(), HostError> {
        Ok(self
            .vm
            .set_dirty_logging(self.memory.memslot(), DirtyLogging::On)?)
    }

    fn take_dirty_log(&self) -> std::result::Result<Vec<u64>, HostError> {
        // Every pre-copy round ends here: where a timed-out migration is cancelled.
        self.cancel.check()?;
        Ok(self.vm.take_dirty_log(self.memory.memslot())?)
    }

    fn stop_dirty_log(&self) {
        // Failing to stop logging only costs the guest some speed; the migration is over.
        let _ = self
            .vm
            .set_dirty_logging(self.memory.memslot(), DirtyLogging::Off);
    }

    fn pause(&self) -> std::result::Result<Paused, HostError> {
        self.cancel.check()?;
        let paused = ask(&*self.controller, SourceRequest::Pause)?;
        self.cancel.paused.store(true, Ordering::Release);
        Ok(paused)
    }

    fn resume(&self) -> std::result::Result<(), HostError> {
        ask(&*self.controller, SourceRequest::Resume)
    }

    fn can_throttle(&self) -> bool {
        true
    }

    fn throttle(&self, percent: u32) -> std::result::Result<(), HostError> {
        ask(&*self.controller, |reply| {
            SourceRequest::Throttle(percent, reply)
        })
    }

    fn handover_paused(&self, why: &migration::Error) -> Option<Uri> {
        let (tx, rx) = channel();
        (self.controller)(SourceRequest::HandoverPaused(why.to_string(), tx));
        // A controller that went away gave up too.
        rx.recv().ok().flatten()
    }

    fn handover_resumed(&self) {
        (self.controller)(SourceRequest::HandoverResumed);
    }
}

/// How a migration is sent: what to ask of it, when to give up, where to say how far it is.
pub struct Sending {
    pub request: MigrationRequest,
    /// Cancelled (the guest stays here) if not paused for the switch-over by then.
    pub timeout: Duration,
    /// Its connections' timeouts and authentication.
    pub options: migration::source::Options,
    pub progress: Arc<Tracker>,
}

/// Sends the guest away on a thread of its own; `controller` receives the pause and
/// resume requests and, last, the migration's end.
pub fn start_sending(
    memory: Arc<GuestMemory>,
    vm: Arc<Vm>,
    vcpus: u32,
    sending: Sending,
    controller: impl Fn(SourceRequest) + Send + Sync + 'static,
) -> Result<()> {
    let host = SourceHost {
        memory,
        vm,
        vcpus,
        controller: Box::new(controller),
        cancel: Cancel {
            timeout: sending.timeout,
            deadline: Instant::now() + sending.timeout,
            paused: AtomicBool::new(false),
        },
    };
    let Sending {
        request,
        options,
        progress,
        ..
    } = sending;
    std::thread::Builder::new()
        .name("migrate".into())
        .spawn(move || {
            let r = migration::source::migrate(&host, &request, &options, &*progress);
            (host.controller)(SourceRequest::Done(Box::new(r)));
        })
        .map(drop)
        .map_err(|source| Error::Io {
            what: "starting the migration thread".into(),
            source,
        })
}

/// The destination VM: vCPUs built from the arriving state, started by the controller.
struct DestinationHost {
    memory: Arc<GuestMemory>,
    vm: Arc<Vm>,
    vcpus: u32,
    restored: Mutex<Option<(Vec<Vcpu>, RunInfo)>>,
    controller: Box<dyn Fn(DestinationEvent) + Send + Sync>,
}

impl DestinationVm for DestinationHost {
    fn pages(&self) -> &dyn GuestPages {
        &*self.memory
    }

    fn vcpus(&self) -> u32 {
        self.vcpus
    }

    fn restore(&self, state: VmState) -> std::result::Result<(), HostError> {
        let state: MigratedState = serde_json::from_value(state.0).map_err(Error::VmState)?;
        if state.vcpus.len() != self.vcpus as usize {
            return Err(Error::VcpuCount {
                here: self.vcpus as usize,
                arrived: state.vcpus.len(),
            }
            .into());
        }
        // Refuse what this host cannot carry before anything is restored.
        let missing = state::missing_features(&state.machine.cpuid, &self.vm.vcpu_cpuid(0));
        if !missing.is_empty() {
            return Err(Error::CpuidMismatch(missing.join(", ")).into());
        }
        state.machine.restore(self.vm.fd())?;
        self.vm.devices().restore(&state.machine.devices)?;
        let vcpus = state
            .vcpus
            .iter()
            .enumerate()
            .map(|(i, s)| Vcpu::restore(&self.vm, i, s))
            .collect::<Result<Vec<_>>>()?;
        *self.restored.lock().unwrap_or_else(|e| e.into_inner()) = Some((vcpus, state.run));
        Ok(())
    }

    fn start(&self) -> std::result::Result<(), HostError> {
        let (vcpus, run) = self
            .restored
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or(Error::NotRestored)?;
        let postcopy = self.memory.fault_path() == FaultPathKind::MissingAndMinor;
        let (started, answer) = channel();
        (self.controller)(DestinationEvent::Arrived(Box::new(Arrival {
            vcpus,
            run,
            postcopy,
            started,
        })));
        Ok(answer.recv().map_err(|_| Error::ControllerGone)??)
    }

    fn note(&self, event: IncomingEvent<'_>) {
        (self.controller)(match event {
            IncomingEvent::Refused { why } => DestinationEvent::Refused(why.to_string()),
            IncomingEvent::Paused { why, lacking } => DestinationEvent::Paused {
                why: why.to_string(),
                lacking,
            },
            IncomingEvent::Resumed => DestinationEvent::Resumed,
        });
    }
}

/// The destination VM for a restore (`crate::snapshot`), and how to tell the controller
/// the restore's end.
pub(crate) fn destination(
    memory: Arc<GuestMemory>,
    vm: Arc<Vm>,
    vcpus: u32,
    controller: impl Fn(DestinationEvent) + Send + Sync + 'static,
) -> (
    impl DestinationVm + 'static,
    impl Fn(DestinationEvent) + Send + 'static,
) {
    let controller: Arc<dyn Fn(DestinationEvent) + Send + Sync> = Arc::new(controller);
    let tell = controller.clone();
    let host = DestinationHost {
        memory,
        vm,
        vcpus,
        restored: Mutex::new(None),
        controller: Box::new(move |e| controller(e)),
    };
    (host, move |e| tell(e))
}

/// Receives the guest on `listener` (bound before the run starts, so that the source
/// finds it) on a thread of its own; `controller` gets the arrival and, last, the end.
pub fn start_receiving(
    listener: migration::Listener,
    memory: Arc<GuestMemory>,
    vm: Arc<Vm>,
    vcpus: u32,
    options: migration::destination::Options,
    controller: impl Fn(DestinationEvent) + Send + Sync + 'static,
) -> Result<()> {
    let host = DestinationHost {
        memory,
        vm,
        vcpus,
        restored: Mutex::new(None),
        controller: Box::new(controller),
    };
    std::thread::Builder::new()
        .name("incoming".into())
        .spawn(move || {
            let r = migration::destination::receive_with(&listener, &host, &options);
            // Unbound before the run hears of the end: the process may exit at once, and
            // a socket file left behind would refuse the next destination's sources.
            drop(listener);
            (host.controller)(DestinationEvent::Ended(r));
        })
        .map(drop)
        .map_err(|source| Error::Io {
            what: "starting the incoming migration thread".into(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timed_out_migration_is_cancelled_only_before_the_pause() {
        let cancel = Cancel {
            timeout: Duration::from_secs(1),
            deadline: Instant::now(),
            paused: AtomicBool::new(false),
        };
        let e = cancel.check().unwrap_err();
        assert!(e.to_string().contains("timeout_s = 1"), "{e}");
        cancel.paused.store(true, Ordering::Release);
        assert!(cancel.check().is_ok());
        let later = Cancel {
            deadline: Instant::now() + Duration::from_secs(60),
            paused: AtomicBool::new(false),
            ..cancel
        };
        assert!(later.check().is_ok());
    }
}
