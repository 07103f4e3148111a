//! vCPUs and the vCPU loop: one thread per vCPU running `KVM_RUN` and handling exits.
//!
//! Guests report through the shared mailbox, so exits are rare: console bytes, the
//! per-vCPU exit port, and errors. The VMM interrupts a vCPU with a signal
//! ([`kick_signal`]) that makes `KVM_RUN` return `EINTR`.
//!
//! A vCPU's life is an explicit state machine on its own thread ([`VcpuRunState`]),
//! driven by [`VcpuEvent`]s (Firecracker's model): it pauses and resumes in place — a
//! migration's switch-over, a failed migration, a snapshot — without its thread ever
//! being respawned. When the guest ends (exit port, halt, a failure) the thread stays,
//! answering events, until the VMM finishes it ([`VcpuSet`] in `vcpu_set.rs`).

use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::boot::kernel::KernelEntry;
use crate::boot::{self, LoadedImage};
use crate::console::{Console, LineBuffer};
use crate::devices::{Devices, PortEffect};
use crate::error::{kvm, Error, Result};
use crate::vstate::dirty_ring::{DirtyRing, KVM_EXIT_DIRTY_RING_FULL};
pub use crate::vstate::state::VcpuState;
use crate::vstate::vcpu_set::OnGuestEnd;
use crate::vstate::vm::Vm;

/// CPU time of the calling thread.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if r != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The real-time signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick handler once per process; its only job is to make
/// `KVM_RUN` return with `EINTR`.
pub fn install_kick_handler() -> Result<()> {
    // The outcome of the one installation, as an errno (io::Error is not Clone).
    static INSTALLED: std::sync::OnceLock<std::result::Result<(), i32>> =
        std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
                .map_err(|e| e.errno())
        })
        .map_err(|errno| Error::Signal {
            source: std::io::Error::from_raw_os_error(errno),
        })
}

/// How a vCPU's loop ended, when it ended normally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuEnd {
    /// The guest wrote `code` to the exit port (see `abi::EXIT_*`).
    Exited { code: u8 },
    /// The vCPU executed `hlt` in ring 0 (after an exception report, or a stray halt).
    Halted,
    /// The guest reset the machine (i8042 CPU reset): the VM ends.
    Reset,
    /// The guest powered the machine off (ACPI S5): the VM ends.
    PowerOff,
    /// The VMM stopped it (timeout or teardown).
    Stopped,
}

#[derive(Debug)]
pub struct VcpuOutcome {
    pub end: VcpuEndResult,
    /// Number of `KVM_RUN` returns (guest exits) this vCPU took.
    pub exits: u64,
    /// Of those, exits because this vCPU's dirty ring was full (harvested, then resumed).
    pub dirty_ring_full_exits: u64,
    /// The exits by kind.
    pub exit_kinds: ExitKinds,
    /// CPU time the vCPU thread used (in and around KVM_RUN), in nanoseconds.
    pub cpu_ns: u64,
    /// CLOCK_MONOTONIC when the thread first entered KVM_RUN: the guest's first
    /// instruction on this vCPU (0 if it never ran).
    pub first_run_ns: u64,
}

/// What one `KVM_RUN` led to.
enum Step {
    Continue,
    End(VcpuEnd),
    Fail(VcpuFault),
}

/// Why a vCPU stopped running the guest against the guest's will.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VcpuFault {
    #[error("guest triple fault (shutdown)")]
    TripleFault,
    #[error("guest accessed guest-physical {gpa:#x}, outside guest RAM")]
    OutsideRam { gpa: u64 },
    #[error("harvesting the full dirty ring: {0}")]
    DirtyRingHarvest(String),
    #[error("dirty ring full exit, but no dirty ring is on")]
    DirtyRingMissing,
    #[error("KVM entry failed (reason {reason:#x} on host cpu {cpu})")]
    EntryFailed { reason: u64, cpu: u32 },
    #[error("KVM could not run the guest's next instruction (KVM_EXIT_INTERNAL_ERROR; under kvm_pvm ring 0 is emulated and the emulator lacks some instructions)")]
    EmulationFailed,
    #[error("unexpected KVM exit {0}")]
    UnexpectedExit(String),
    #[error(
        "KVM_RUN: bad address: the host mapping behind a guest access is missing or inaccessible"
    )]
    BadAddress,
    #[error("KVM_RUN failed: {0}")]
    RunFailed(String),
    #[error("the vCPU thread panicked")]
    Panicked,
}

/// A vCPU's failure with the registers it stopped at.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{fault}; {registers}")]
pub struct VcpuFailure {
    pub fault: VcpuFault,
    pub registers: String,
}

pub struct Vcpu {
    index: usize,
    fd: VcpuFd,
    devices: Arc<Devices>,
    /// The MSRs a save reads (KVM's saveable list).
    msr_indices: Vec<u32>,
    /// The VM's dirty ring, when in use: this vCPU's ring is harvested on a ring-full exit.
    dirty_ring: Option<Arc<DirtyRing>>,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Vcpu({})", self.index)
    }
}

impl Vcpu {
    /// Creates vCPU `index` and puts it at the image's ring-3 entry (the fast path).
    pub fn new(vm: &Vm, index: usize, image: &LoadedImage) -> Result<Vcpu> {
        let fd = vm
            .fd()
            .create_vcpu(index as u64)
            .map_err(kvm("KVM_CREATE_VCPU"))?;
        fd.set_cpuid2(&vm.vcpu_cpuid(index))
            .map_err(kvm("KVM_SET_CPUID2"))?;
        set_local_interrupts(&fd)?;
        let base = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        fd.set_sregs(&boot::ring3_sregs(&base, image, index))
            .map_err(kvm("KVM_SET_SREGS"))?;
        fd.set_regs(&boot::ring3_regs(image, index))
            .map_err(kvm("KVM_SET_REGS"))?;
        // With an in-kernel LAPIC an AP waits for INIT/SIPI; the fast path starts every
        // vCPU at its entry at once.
        fd.set_mp_state(kvm_bindings::kvm_mp_state {
            mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
        })
        .map_err(kvm("KVM_SET_MP_STATE"))?;
        Vcpu::with_ring(vm, index, fd)
    }

    pub fn index(&self) -> usize {
        self.index
    }

    /// Creates vCPU `index` of a `--kernel` guest: the boot vCPU (`entry` given) at the
    /// kernel's entry; an AP as KVM makes it, waiting for the guest's INIT/SIPI.
    pub fn boot(vm: &Vm, index: usize, entry: Option<KernelEntry>) -> Result<Vcpu> {
        let fd = vm
            .fd()
            .create_vcpu(index as u64)
            .map_err(kvm("KVM_CREATE_VCPU"))?;
        fd.set_cpuid2(&vm.vcpu_cpuid(index))
            .map_err(kvm("KVM_SET_CPUID2"))?;
        set_local_interrupts(&fd)?;
        if let Some(entry) = entry {
            let base = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
            fd.set_sregs(&boot::entry::sregs(&base, entry))
                .map_err(kvm("KVM_SET_SREGS"))?;
            fd.set_regs(&boot::entry::regs(entry))
                .map_err(kvm("KVM_SET_REGS"))?;
        }
        Vcpu::with_ring(vm, index, fd)
    }

    /// Creates vCPU `index` with migrated state.
    pub fn restore(vm: &Vm, index: usize, state: &VcpuState) -> Result<Vcpu> {
        let fd = vm
            .fd()
            .create_vcpu(index as u64)
            .map_err(kvm("KVM_CREATE_VCPU"))?;
        fd.set_cpuid2(&vm.vcpu_cpuid(index))
            .map_err(kvm("KVM_SET_CPUID2"))?;
        // The guest's TSC runs at the source's frequency: match it, scale to it, or
        // refuse (before the guest runs here).
        if let (Some(theirs), Ok(ours)) = (state.tsc_khz, fd.get_tsc_khz()) {
            if theirs != ours && fd.set_tsc_khz(theirs).is_err() {
                return Err(Error::TscFrequency {
                    source_khz: theirs,
                    here_khz: ours,
                });
            }
        }
        state.restore(&fd)?;
        Vcpu::with_ring(vm, index, fd)
    }

    /// Maps the vCPU's dirty ring, when the VM has one.
    fn with_ring(vm: &Vm, index: usize, fd: VcpuFd) -> Result<Vcpu> {
        let dirty_ring = vm.dirty_ring().cloned();
        if let Some(ring) = &dirty_ring {
            ring.attach(index, &fd)?;
        }
        Ok(Vcpu {
            index,
            fd,
            devices: vm.devices().clone(),
            msr_indices: vm.msr_indices().to_vec(),
            dirty_ring,
        })
    }

    /// Reads the vCPU's state (it must not be running).
    pub fn save(&self) -> Result<VcpuState> {
        VcpuState::save(&self.fd, &self.msr_indices)
    }

    fn describe_state(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                "rip={:#x} rsp={:#x} rflags={:#x} cs={:#x} cr2={:#x}",
                r.rip, r.rsp, r.rflags, s.cs.selector, s.cr2
            ),
            _ => "registers unavailable".to_string(),
        }
    }

    /// Runs the guest until its next exit that needs the VMM: one `KVM_RUN` and the
    /// handling of what it returned.
    fn run_once(&mut self, line: &mut LineBuffer, console: &Console, counts: &mut Counts) -> Step {
        if counts.exits == 0 {
            counts.first_run_ns = guest_image::clock::monotonic_ns();
        }
        counts.exits += 1;
        // Decide inside the match (which borrows the kvm_run page), describe the vCPU's
        // registers after it.
        let devices = &*self.devices;
        let step = match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                counts.kinds.io_out += 1;
                match devices.io_out(port, data, &mut |b| line.push(console, b)) {
                    PortEffect::None => Step::Continue,
                    PortEffect::Exit { code } => Step::End(VcpuEnd::Exited { code }),
                    PortEffect::Reset => Step::End(VcpuEnd::Reset),
                    PortEffect::PowerOff => Step::End(VcpuEnd::PowerOff),
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                counts.kinds.io_in += 1;
                devices.io_in(port, data);
                Step::Continue
            }
            Ok(VcpuExit::Hlt) => {
                counts.kinds.hlt += 1;
                Step::End(VcpuEnd::Halted)
            }
            Ok(VcpuExit::Intr) => {
                counts.kinds.kick += 1;
                Step::Continue
            }
            Ok(VcpuExit::Shutdown) => Step::Fail(VcpuFault::TripleFault),
            Ok(VcpuExit::MmioRead(gpa, _)) | Ok(VcpuExit::MmioWrite(gpa, _)) => {
                counts.kinds.mmio += 1;
                Step::Fail(VcpuFault::OutsideRam { gpa })
            }
            // KVM will not run this vCPU again until its ring has room: harvest it into
            // the VM's dirty bitmap and reset, then carry on.
            Ok(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) => {
                counts.dirty_ring_full_exits += 1;
                counts.kinds.dirty_ring_full += 1;
                match self.dirty_ring.as_ref().map(|r| r.harvest_vcpu(self.index)) {
                    Some(Ok(_)) => Step::Continue,
                    Some(Err(e)) => Step::Fail(VcpuFault::DirtyRingHarvest(e.to_string())),
                    None => Step::Fail(VcpuFault::DirtyRingMissing),
                }
            }
            Ok(VcpuExit::InternalError) => Step::Fail(VcpuFault::EmulationFailed),
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                Step::Fail(VcpuFault::EntryFailed { reason, cpu })
            }
            Ok(other) => Step::Fail(VcpuFault::UnexpectedExit(format!("{other:?}"))),
            // A kick: the thread looks at its events before it runs the guest again.
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                counts.kinds.kick += 1;
                Step::Continue
            }
            Err(e) if e.errno() == libc::EFAULT => Step::Fail(VcpuFault::BadAddress),
            Err(e) => Step::Fail(VcpuFault::RunFailed(e.to_string())),
        };
        step
    }

    /// The vCPU thread: runs the guest, pausing, resuming and saving its state in place
    /// as `events` ask, until [`VcpuEvent::Finish`] (or the VMM drops its end of the
    /// channel). Answers every event on `answers`; reports the guest's end to `on_end`.
    pub fn thread_main(
        mut self,
        events: Receiver<VcpuEvent>,
        answers: Sender<VcpuAnswer>,
        on_end: OnGuestEnd,
        console: Arc<Console>,
    ) -> VcpuOutcome {
        let mut counts = Counts::default();
        let mut line = LineBuffer::default();
        let mut state = VcpuRunState::Running;
        // An event that arrived during a throttle's wait.
        let mut pending = None;
        let end = loop {
            let event = match (pending.take(), &state) {
                (Some(e), _) => Some(e),
                (None, VcpuRunState::Running) => match events.try_recv() {
                    Ok(e) => Some(e),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => Some(VcpuEvent::Finish),
                },
                // Paused or ended: nothing to do until the VMM says.
                (None, VcpuRunState::Paused | VcpuRunState::Ended(_)) => {
                    Some(events.recv().unwrap_or(VcpuEvent::Finish))
                }
            };
            if let Some(event) = event {
                // A pause may be a migration's switch-over: the line so far is printed
                // here rather than cut.
                if event == VcpuEvent::Pause {
                    line.flush(&console);
                }
                match self.on_event(event, &mut state) {
                    Reaction::Answer(answer) => {
                        let _ = answers.send(answer);
                        continue;
                    }
                    // Out of the guest for `wait`, or until the next event.
                    Reaction::StayOut(wait) => {
                        pending = match events.recv_timeout(wait) {
                            Ok(e) => Some(e),
                            Err(RecvTimeoutError::Timeout) => None,
                            Err(RecvTimeoutError::Disconnected) => Some(VcpuEvent::Finish),
                        };
                        continue;
                    }
                    Reaction::Ignore => continue,
                    Reaction::End => break state,
                }
            }
            match self.run_once(&mut line, &console, &mut counts) {
                Step::Continue => {}
                Step::End(end) => {
                    state = VcpuRunState::Ended(Ok(end));
                    on_end(self.index, Ok(end));
                }
                Step::Fail(fault) => {
                    let failure = VcpuFailure {
                        fault,
                        registers: self.describe_state(),
                    };
                    state = VcpuRunState::Ended(Err(failure.clone()));
                    on_end(self.index, Err(failure));
                }
            }
        };
        line.flush(&console);
        VcpuOutcome {
            end: match end {
                VcpuRunState::Ended(e) => e,
                VcpuRunState::Running | VcpuRunState::Paused => Ok(VcpuEnd::Stopped),
            },
            exits: counts.exits,
            dirty_ring_full_exits: counts.dirty_ring_full_exits,
            exit_kinds: counts.kinds,
            cpu_ns: thread_cpu_ns(),
            first_run_ns: counts.first_run_ns,
        }
    }

    /// The state change `event` asks for, and what the thread does next.
    fn on_event(&self, event: VcpuEvent, state: &mut VcpuRunState) -> Reaction {
        Reaction::Answer(match (event, &*state) {
            (VcpuEvent::Finish, _) => return Reaction::End,
            (VcpuEvent::Throttle(wait), VcpuRunState::Running) => return Reaction::StayOut(wait),
            // Not running anyway (a throttle sent just before a pause, say).
            (VcpuEvent::Throttle(_), _) => return Reaction::Ignore,
            (VcpuEvent::Pause, VcpuRunState::Running) => {
                *state = VcpuRunState::Paused;
                VcpuAnswer::Paused
            }
            (VcpuEvent::Resume, VcpuRunState::Paused) => {
                *state = VcpuRunState::Running;
                VcpuAnswer::Resumed
            }
            // Pausing a paused vCPU, resuming a running one: already there.
            (VcpuEvent::Pause, VcpuRunState::Paused) => VcpuAnswer::Paused,
            (VcpuEvent::Resume, VcpuRunState::Running) => VcpuAnswer::Resumed,
            // A vCPU whose guest ended stays where it stopped: its state can be saved
            // (a migration carries it), but it does not run again.
            (VcpuEvent::Pause | VcpuEvent::Resume, VcpuRunState::Ended(_)) => VcpuAnswer::Ended,
            (VcpuEvent::SaveState, VcpuRunState::Running) => {
                VcpuAnswer::State(Box::new(Err(Error::VcpuRunning { index: self.index })))
            }
            (VcpuEvent::SaveState, _) => VcpuAnswer::State(Box::new(self.save())),
        })
    }
}

/// What a vCPU thread does after an event.
enum Reaction {
    Answer(VcpuAnswer),
    /// A throttle: no answer, no guest for this long.
    StayOut(std::time::Duration),
    /// No answer, nothing changes.
    Ignore,
    /// The thread ends.
    End,
}

#[derive(Default)]
struct Counts {
    exits: u64,
    dirty_ring_full_exits: u64,
    kinds: ExitKinds,
    first_run_ns: u64,
}

/// A vCPU's `KVM_RUN` returns by kind: what the VMM knows of any guest without a
/// mailbox.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ExitKinds {
    /// Port writes (console bytes, device registers, the exit port).
    pub io_out: u64,
    /// Port reads.
    pub io_in: u64,
    /// Accesses outside guest RAM and every device (a failure).
    pub mmio: u64,
    /// `hlt` that reached the VMM (no in-kernel LAPIC took it).
    pub hlt: u64,
    /// Returns because the VMM kicked the vCPU (pause, stop) or a signal arrived.
    pub kick: u64,
    pub dirty_ring_full: u64,
}

impl ExitKinds {
    pub fn add(&mut self, o: &ExitKinds) {
        self.io_out += o.io_out;
        self.io_in += o.io_in;
        self.mmio += o.mmio;
        self.hlt += o.hlt;
        self.kick += o.kick;
        self.dirty_ring_full += o.dirty_ring_full;
    }
}

/// The LAPIC's LINT0 as ExtINT (the PIC's output reaches the CPU in virtual-wire mode)
/// and LINT1 as NMI, as a PC's firmware leaves them.
fn set_local_interrupts(fd: &VcpuFd) -> Result<()> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_NMI: u32 = 0x4;
    const APIC_MODE_EXTINT: u32 = 0x7;
    let mut lapic = fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let v = u32::from_le_bytes(bytes);
        let v = (v & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as libc::c_char;
        }
    }
    fd.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))
}

/// Where a vCPU thread is in its life.
#[derive(Debug)]
pub enum VcpuRunState {
    /// In or around `KVM_RUN`.
    Running,
    /// Stopped in place by the VMM; its state is stable and can be saved.
    Paused,
    /// The guest ended on this vCPU (exit port, halt) or it failed; it will not run again.
    Ended(VcpuEndResult),
}

/// How a vCPU's guest ended: normally, or with a failure described for the user.
pub type VcpuEndResult = std::result::Result<VcpuEnd, VcpuFailure>;

/// What the VMM asks of a vCPU thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuEvent {
    /// Stop running the guest, in place.
    Pause,
    /// Run the guest again after a pause.
    Resume,
    /// Answer with the vCPU's architectural state (it must be paused or ended).
    SaveState,
    /// End the thread.
    Finish,
    /// Stay out of the guest this long, then run on (auto-converge; unanswered). Any other
    /// event ends the wait at once; a vCPU that is not running ignores it.
    Throttle(std::time::Duration),
}

/// What a vCPU thread answers.
#[derive(Debug)]
pub enum VcpuAnswer {
    Paused,
    Resumed,
    /// The guest ended on this vCPU before the event; it stays stopped.
    Ended,
    // Boxed: a VcpuState is ~1 KiB (sregs, FPU) and the other answers carry nothing.
    State(Box<Result<VcpuState>>),
}
