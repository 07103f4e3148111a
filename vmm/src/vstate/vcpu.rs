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

use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;

use guest_image::abi;
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::boot::{self, LoadedImage};
use crate::console::{Console, LineBuffer};
use crate::error::{kvm, Error, Result};
use crate::vstate::dirty_ring::{DirtyRing, KVM_EXIT_DIRTY_RING_FULL};
use crate::vstate::vm::Vm;

/// The real-time signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick handler once per process; its only job is to make
/// `KVM_RUN` return with `EINTR`.
pub fn install_kick_handler() -> Result<()> {
    static INSTALLED: std::sync::OnceLock<std::result::Result<(), String>> =
        std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(Error::Signal)
}

/// How a vCPU's loop ended, when it ended normally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuEnd {
    /// The guest wrote `code` to the exit port (see `abi::EXIT_*`).
    Exited { code: u8 },
    /// The vCPU executed `hlt` in ring 0 (after an exception report, or a stray halt).
    Halted,
    /// The VMM stopped it (timeout or teardown).
    Stopped,
}

#[derive(Debug)]
pub struct VcpuOutcome {
    pub end: std::result::Result<VcpuEnd, String>,
    /// Number of `KVM_RUN` returns (guest exits) this vCPU took.
    pub exits: u64,
    /// Of those, exits because this vCPU's dirty ring was full (harvested, then resumed).
    pub dirty_ring_full_exits: u64,
}

/// Architectural state of a vCPU, as migrated. The built-in guest uses no interrupt
/// controller, so there is no irqchip state to carry.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VcpuState {
    pub regs: kvm_bindings::kvm_regs,
    pub sregs: kvm_bindings::kvm_sregs,
    #[serde(with = "fpu_bytes")]
    pub fpu: kvm_bindings::kvm_fpu,
    pub mp_state: kvm_bindings::kvm_mp_state,
}

/// kvm-bindings has no serde for `kvm_fpu`; it is plain old data, so carry its bytes.
mod fpu_bytes {
    use kvm_bindings::kvm_fpu;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    const LEN: usize = std::mem::size_of::<kvm_fpu>();

    pub fn serialize<S: Serializer>(fpu: &kvm_fpu, s: S) -> Result<S::Ok, S::Error> {
        // SAFETY: kvm_fpu is a repr(C) struct of integers and byte arrays; reading its
        // LEN bytes is reading initialised plain data.
        let bytes =
            unsafe { std::slice::from_raw_parts((fpu as *const kvm_fpu).cast::<u8>(), LEN) };
        bytes.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<kvm_fpu, D::Error> {
        let bytes = Vec::<u8>::deserialize(d)?;
        if bytes.len() != LEN {
            return Err(serde::de::Error::custom(format!(
                "FPU state of {} bytes, expected {LEN}",
                bytes.len()
            )));
        }
        let mut fpu = kvm_fpu::default();
        // SAFETY: exactly LEN bytes into a kvm_fpu, which is valid for any bit pattern.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (&mut fpu as *mut kvm_fpu).cast::<u8>(),
                LEN,
            )
        };
        Ok(fpu)
    }
}

/// What one `KVM_RUN` led to.
enum Step {
    Continue,
    End(VcpuEnd),
    Fail(String),
}

pub struct Vcpu {
    index: usize,
    fd: VcpuFd,
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
        fd.set_cpuid2(vm.cpuid()).map_err(kvm("KVM_SET_CPUID2"))?;
        let base = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        fd.set_sregs(&boot::ring3_sregs(&base, image, index))
            .map_err(kvm("KVM_SET_SREGS"))?;
        fd.set_regs(&boot::ring3_regs(image, index))
            .map_err(kvm("KVM_SET_REGS"))?;
        Vcpu::with_ring(vm, index, fd)
    }

    pub fn index(&self) -> usize {
        self.index
    }

    /// Creates vCPU `index` with migrated state.
    pub fn restore(vm: &Vm, index: usize, state: &VcpuState) -> Result<Vcpu> {
        let fd = vm
            .fd()
            .create_vcpu(index as u64)
            .map_err(kvm("KVM_CREATE_VCPU"))?;
        fd.set_cpuid2(vm.cpuid()).map_err(kvm("KVM_SET_CPUID2"))?;
        fd.set_sregs(&state.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        fd.set_regs(&state.regs).map_err(kvm("KVM_SET_REGS"))?;
        fd.set_fpu(&state.fpu).map_err(kvm("KVM_SET_FPU"))?;
        fd.set_mp_state(state.mp_state)
            .map_err(kvm("KVM_SET_MP_STATE"))?;
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
            dirty_ring,
        })
    }

    /// Reads the vCPU's state (it must not be running).
    pub fn save(&self) -> Result<VcpuState> {
        Ok(VcpuState {
            regs: self.fd.get_regs().map_err(kvm("KVM_GET_REGS"))?,
            sregs: self.fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            fpu: self.fd.get_fpu().map_err(kvm("KVM_GET_FPU"))?,
            mp_state: self.fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
        })
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
        counts.exits += 1;
        // Decide inside the match (which borrows the kvm_run page), describe the vCPU's
        // registers after it.
        let step = match self.fd.run() {
            Ok(VcpuExit::IoOut(abi::PORT_SERIAL, data)) => {
                for &b in data {
                    line.push(console, b);
                }
                Step::Continue
            }
            Ok(VcpuExit::IoOut(abi::PORT_EXIT, data)) => Step::End(VcpuEnd::Exited {
                code: data.first().copied().unwrap_or(0),
            }),
            // Other 16550 registers and unknown ports: writes are ignored.
            Ok(VcpuExit::IoOut(..)) => Step::Continue,
            Ok(VcpuExit::IoIn(port, data)) => {
                // 16550 line status: transmitter empty; everything else floats high.
                data.fill(if port == abi::PORT_SERIAL + 5 {
                    0x60
                } else {
                    0xff
                });
                Step::Continue
            }
            Ok(VcpuExit::Hlt) => Step::End(VcpuEnd::Halted),
            Ok(VcpuExit::Intr) => Step::Continue,
            Ok(VcpuExit::Shutdown) => Step::Fail("guest triple fault (shutdown)".into()),
            Ok(VcpuExit::MmioRead(addr, _)) | Ok(VcpuExit::MmioWrite(addr, _)) => Step::Fail(
                format!("guest accessed guest-physical {addr:#x}, outside guest RAM"),
            ),
            // KVM will not run this vCPU again until its ring has room: harvest it into
            // the VM's dirty bitmap and reset, then carry on.
            Ok(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) => {
                counts.dirty_ring_full_exits += 1;
                match self.dirty_ring.as_ref().map(|r| r.harvest_vcpu(self.index)) {
                    Some(Ok(_)) => Step::Continue,
                    Some(Err(e)) => Step::Fail(format!("harvesting the full dirty ring: {e}")),
                    None => Step::Fail("dirty ring full exit, but no dirty ring is on".into()),
                }
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => Step::Fail(format!(
                "KVM entry failed (reason {reason:#x} on host cpu {cpu})"
            )),
            Ok(other) => Step::Fail(format!("unexpected KVM exit {other:?}")),
            // A kick: the thread looks at its events before it runs the guest again.
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Step::Continue,
            Err(e) if e.errno() == libc::EFAULT => Step::Fail(
                "KVM_RUN: bad address: the host mapping behind a guest access is missing or \
                 inaccessible"
                    .into(),
            ),
            Err(e) => Step::Fail(format!("KVM_RUN failed: {e}")),
        };
        match step {
            Step::Fail(what) => Step::Fail(format!("{what}; {}", self.describe_state())),
            other => other,
        }
    }

    /// The vCPU thread: runs the guest, pausing, resuming and saving its state in place
    /// as `events` ask, until [`VcpuEvent::Finish`] (or the VMM drops its end of the
    /// channel). Answers every event on `answers`; reports the guest's end on `ended`.
    pub fn thread_main(
        mut self,
        events: Receiver<VcpuEvent>,
        answers: Sender<VcpuAnswer>,
        ended: Sender<(usize, VcpuEndResult)>,
        console: Arc<Console>,
    ) -> VcpuOutcome {
        let mut counts = Counts::default();
        let mut line = LineBuffer::default();
        let mut state = VcpuRunState::Running;
        let end = loop {
            let event = match state {
                VcpuRunState::Running => match events.try_recv() {
                    Ok(e) => Some(e),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => Some(VcpuEvent::Finish),
                },
                // Paused or ended: nothing to do until the VMM says.
                VcpuRunState::Paused | VcpuRunState::Ended(_) => {
                    Some(events.recv().unwrap_or(VcpuEvent::Finish))
                }
            };
            if let Some(event) = event {
                match self.on_event(event, &mut state) {
                    Some(answer) => {
                        let _ = answers.send(answer);
                        continue;
                    }
                    None => break state,
                }
            }
            match self.run_once(&mut line, &console, &mut counts) {
                Step::Continue => {}
                Step::End(end) => {
                    state = VcpuRunState::Ended(Ok(end));
                    let _ = ended.send((self.index, Ok(end)));
                }
                Step::Fail(what) => {
                    state = VcpuRunState::Ended(Err(what.clone()));
                    let _ = ended.send((self.index, Err(what)));
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
        }
    }

    /// The state change `event` asks for; `None` ends the thread.
    fn on_event(&self, event: VcpuEvent, state: &mut VcpuRunState) -> Option<VcpuAnswer> {
        Some(match (event, &*state) {
            (VcpuEvent::Finish, _) => return None,
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

#[derive(Default)]
struct Counts {
    exits: u64,
    dirty_ring_full_exits: u64,
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
pub type VcpuEndResult = std::result::Result<VcpuEnd, String>;

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
