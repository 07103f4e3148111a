//! COM1: `vm-superio`'s 16550 with its interrupt delivered through an irqfd on GSI 4.
//!
//! The UART's output sink is a small buffer drained after every register write into
//! the writing vCPU's console line, so lines of several vCPUs never interleave
//! mid-line (each vCPU assembles its own; see `console.rs`).

use kvm_ioctls::VmFd;
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::COM1_GSI;
use crate::error::{kvm, Error, Result};

/// The UART's interrupt: an eventfd KVM turns into an edge on GSI 4.
pub struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The 16550 on COM1.
pub struct Uart {
    serial: Serial<IrqTrigger, NoEvents, Vec<u8>>,
    transmitted: u64,
}

/// The UART's registers and the input bytes it holds (what a migration carries).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
    /// Bytes transmitted so far (the report's console figure).
    pub transmitted: u64,
}

impl Default for SerialSnapshot {
    fn default() -> Self {
        SerialSnapshot::from_state(&SerialState::default(), 0)
    }
}

impl SerialSnapshot {
    fn from_state(s: &SerialState, transmitted: u64) -> Self {
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
            transmitted,
        }
    }

    fn to_state(&self) -> SerialState {
        SerialState {
            baud_divisor_low: self.baud_divisor_low,
            baud_divisor_high: self.baud_divisor_high,
            interrupt_enable: self.interrupt_enable,
            interrupt_identification: self.interrupt_identification,
            line_control: self.line_control,
            line_status: self.line_status,
            modem_control: self.modem_control,
            modem_status: self.modem_status,
            scratch: self.scratch,
            in_buffer: self.in_buffer.clone(),
        }
    }
}

fn irq_eventfd(vm: &VmFd) -> Result<EventFd> {
    let fd = EventFd::new(EFD_NONBLOCK).map_err(|source| Error::Io {
        what: "creating the UART's interrupt eventfd".into(),
        source,
    })?;
    vm.register_irqfd(&fd, COM1_GSI)
        .map_err(kvm("KVM_IRQFD (COM1)"))?;
    Ok(fd)
}

impl Uart {
    /// A UART in its reset state whose interrupt reaches `vm`'s irqchip.
    pub fn new(vm: &VmFd) -> Result<Uart> {
        Ok(Uart {
            serial: Serial::new(IrqTrigger(irq_eventfd(vm)?), Vec::new()),
            transmitted: 0,
        })
    }

    /// A register write; transmitted bytes go to `console`.
    pub fn write(&mut self, offset: u8, value: u8, console: &mut dyn FnMut(u8)) {
        // The only error is the interrupt eventfd's write, which cannot fail short of
        // 2^64 pending edges; the byte has been transmitted either way.
        let _ = self.serial.write(offset, value);
        let out = self.serial.writer_mut();
        self.transmitted += out.len() as u64;
        for b in out.drain(..) {
            console(b);
        }
    }

    pub fn read(&mut self, offset: u8) -> u8 {
        self.serial.read(offset)
    }

    pub fn transmitted(&self) -> u64 {
        self.transmitted
    }

    pub fn snapshot(&self) -> SerialSnapshot {
        SerialSnapshot::from_state(&self.serial.state(), self.transmitted)
    }

    /// Replaces the registers with `s` (keeping this VM's interrupt eventfd); an
    /// interrupt the state has pending is raised again.
    pub fn restore(&mut self, s: &SerialSnapshot) -> Result<()> {
        let trigger = IrqTrigger(
            self.serial
                .interrupt_evt()
                .0
                .try_clone()
                .map_err(|source| Error::Io {
                    what: "cloning the UART's interrupt eventfd".into(),
                    source,
                })?,
        );
        self.serial = Serial::from_state(&s.to_state(), trigger, NoEvents, Vec::new())
            .map_err(|e| Error::DeviceState(format!("the UART's state: {e:?}")))?;
        self.transmitted = s.transmitted;
        Ok(())
    }
}
