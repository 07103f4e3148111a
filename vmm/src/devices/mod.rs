//! The VM's emulated devices on the port-I/O bus: a 16550 UART on COM1 (`vm-superio`)
//! with its interrupt through an irqfd, an i8042 whose CPU reset ends the VM, the ACPI
//! power-off register the FADT describes, and the built-in image's exit port. The
//! interrupt controllers (PIC, IOAPIC, LAPICs) and the PIT are KVM's own (in-kernel).
//!
//! Every vCPU thread dispatches its port-I/O exits here ([`Devices::io_out`],
//! [`Devices::io_in`]); each device sits behind its own lock, so vCPUs contend only
//! when they touch the same device.

pub mod serial;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use guest_image::abi;
use vm_superio::{I8042Device, Trigger};

use crate::error::Result;
pub use serial::{SerialSnapshot, Uart};

/// COM1's I/O ports: eight registers from 0x3f8.
pub const COM1: u16 = abi::PORT_SERIAL;
/// COM1's legacy interrupt line (ISA IRQ 4, GSI 4 under KVM's default routing).
pub const COM1_GSI: u32 = 4;
/// The i8042's data and command/status ports.
pub const I8042_DATA: u16 = 0x60;
pub const I8042_COMMAND: u16 = 0x64;
/// The ACPI sleep control and status registers (hardware-reduced ACPI; the FADT points
/// here). Writing SLP_TYP=5 with SLP_EN asks for S5, power-off.
pub const ACPI_SLEEP_CONTROL: u16 = 0x600;
pub const ACPI_SLEEP_STATUS: u16 = 0x601;
/// The S5 sleep type the DSDT's `_S5_` object names.
pub const ACPI_S5_TYPE: u8 = 5;
const ACPI_SLP_EN: u8 = 1 << 5;

/// What a port write asks of the vCPU loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortEffect {
    /// Nothing beyond the device's own state change.
    None,
    /// The built-in image's exit port: this vCPU is finished with `code`.
    Exit { code: u8 },
    /// The guest reset the machine through the i8042 (`0xfe` to port 0x64): the VM ends.
    Reset,
    /// The guest entered S5 through the ACPI sleep control register: the VM ends.
    PowerOff,
}

/// Sets a flag: the i8042's CPU-reset trigger, read back right after the write.
#[derive(Debug, Default, Clone)]
struct ResetFlag(Arc<AtomicBool>);

impl Trigger for ResetFlag {
    type E = std::convert::Infallible;

    fn trigger(&self) -> std::result::Result<(), Self::E> {
        self.0.store(true, Ordering::Release);
        Ok(())
    }
}

/// The VM's port-I/O devices.
pub struct Devices {
    uart: Mutex<Uart>,
    i8042: Mutex<I8042Device<ResetFlag>>,
    reset: ResetFlag,
}

impl std::fmt::Debug for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Devices")
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A device's state stays consistent across a panicking vCPU thread: every register
    // update is a single assignment.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Devices {
    /// The devices of a VM whose in-kernel irqchip exists (`vm` registers the UART's
    /// irqfd on [`COM1_GSI`]).
    pub fn new(vm: &kvm_ioctls::VmFd) -> Result<Devices> {
        let reset = ResetFlag::default();
        Ok(Devices {
            uart: Mutex::new(Uart::new(vm)?),
            i8042: Mutex::new(I8042Device::new(reset.clone())),
            reset,
        })
    }

    /// A guest write of `data` to `port`. Bytes the UART transmits are handed to
    /// `console` one by one, on the writing vCPU's thread (which assembles its lines).
    pub fn io_out(&self, port: u16, data: &[u8], console: &mut dyn FnMut(u8)) -> PortEffect {
        let value = data.first().copied().unwrap_or(0);
        match port {
            p if (COM1..COM1 + 8).contains(&p) => {
                lock(&self.uart).write((p - COM1) as u8, value, console);
                PortEffect::None
            }
            abi::PORT_EXIT => PortEffect::Exit { code: value },
            I8042_DATA | I8042_COMMAND => {
                let _ = lock(&self.i8042).write((port - I8042_DATA) as u8, value);
                if self.reset.0.swap(false, Ordering::AcqRel) {
                    PortEffect::Reset
                } else {
                    PortEffect::None
                }
            }
            ACPI_SLEEP_CONTROL if value & ACPI_SLP_EN != 0 && (value >> 2) & 7 == ACPI_S5_TYPE => {
                PortEffect::PowerOff
            }
            // Other ports: writes go nowhere (a PC without the device).
            _ => PortEffect::None,
        }
    }

    /// A guest read of `port` into `data`.
    pub fn io_in(&self, port: u16, data: &mut [u8]) {
        let value = match port {
            p if (COM1..COM1 + 8).contains(&p) => lock(&self.uart).read((p - COM1) as u8),
            I8042_DATA | I8042_COMMAND => lock(&self.i8042).read((port - I8042_DATA) as u8),
            ACPI_SLEEP_STATUS => 0,
            // No device: the bus floats high.
            _ => 0xff,
        };
        data.fill(value);
    }

    /// The UART's registers and buffered input, for a migration.
    pub fn save(&self) -> DeviceState {
        DeviceState {
            uart: lock(&self.uart).snapshot(),
        }
    }

    /// Puts the UART back as `state` had it (a migration destination).
    pub fn restore(&self, state: &DeviceState) -> Result<()> {
        lock(&self.uart).restore(&state.uart)
    }

    /// Bytes the guest has written to the UART's transmitter so far.
    pub fn console_bytes(&self) -> u64 {
        lock(&self.uart).transmitted()
    }
}

/// The port-I/O devices' state, as migrated.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct DeviceState {
    pub uart: SerialSnapshot,
}
