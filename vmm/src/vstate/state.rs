//! The guest's whole CPU and device state, as a migration carries it (and, later, a
//! snapshot): per vCPU regs, sregs, FPU and XSAVE with the XCRs, every MSR KVM lists
//! as saveable (EFER, STAR/LSTAR, KERNEL_GS_BASE, TSC and TSC deadline, kvmclock's…),
//! the LAPIC, pending events, debug registers, mp_state and TSC frequency; per VM the
//! kvmclock, PIC and IOAPIC, PIT and the UART's registers with its buffered input.
//!
//! A destination refuses state it cannot carry before anything runs, naming what
//! differs: CPUID features the guest was given that this host's KVM lacks, or a TSC
//! frequency it can neither match nor scale to.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::devices::DeviceState;
use crate::error::{kvm, Error, Result};

/// Architectural state of a vCPU, as migrated (not Clone: kvm_xsave is not).
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    #[serde(with = "fpu_bytes")]
    pub fpu: kvm_bindings::kvm_fpu,
    pub xsave: kvm_xsave,
    /// None where KVM offers no XCRs (no XSAVE for the guest).
    pub xcrs: Option<kvm_xcrs>,
    pub msrs: Vec<kvm_msr_entry>,
    pub lapic: kvm_lapic_state,
    pub events: kvm_vcpu_events,
    pub debug_regs: kvm_debugregs,
    pub mp_state: kvm_mp_state,
    /// The vCPU's TSC frequency; the TSC itself (hence its offset) is MSR 0x10.
    pub tsc_khz: Option<u32>,
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

/// The MSRs of `indices` this vCPU can read: KVM_GET_MSRS stops at the first it
/// cannot, which is skipped and the rest read on.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk: Vec<kvm_msr_entry> = rest
            .iter()
            .take(256)
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&chunk).map_err(|e| Error::Vcpu {
            index: 0,
            what: format!("building the MSR list: {e:?}"),
        })?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        // Entry n could not be read: skip it.
        let skip = if n < chunk.len() { n + 1 } else { n };
        rest = &rest[skip.min(rest.len())..];
    }
    Ok(out)
}

impl VcpuState {
    /// Reads the vCPU's state (it must not be running).
    pub fn save(fd: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState> {
        Ok(VcpuState {
            mp_state: fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
            regs: fd.get_regs().map_err(kvm("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            fpu: fd.get_fpu().map_err(kvm("KVM_GET_FPU"))?,
            xsave: fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().ok(),
            debug_regs: fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
            lapic: fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
            msrs: read_msrs(fd, msr_indices)?,
            events: fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
            tsc_khz: fd.get_tsc_khz().ok(),
        })
    }

    /// Puts the state into a fresh vCPU (its CPUID already set), in the order KVM
    /// needs: special registers before the MSRs that depend on them, the LAPIC before
    /// pending events.
    pub fn restore(&self, fd: &VcpuFd) -> Result<()> {
        fd.set_mp_state(self.mp_state)
            .map_err(kvm("KVM_SET_MP_STATE"))?;
        fd.set_sregs(&self.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        fd.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        fd.set_fpu(&self.fpu).map_err(kvm("KVM_SET_FPU"))?;
        // SAFETY: a kvm_xsave of the legacy 4 KiB size, read by KVM_GET_XSAVE on a vCPU
        // of the same CPUID; KVM reads only that much.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
        if let Some(xcrs) = &self.xcrs {
            fd.set_xcrs(xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        }
        fd.set_debug_regs(&self.debug_regs)
            .map_err(kvm("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&self.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        let msrs = Msrs::from_entries(&self.msrs).map_err(|e| Error::Vcpu {
            index: 0,
            what: format!("building the MSR list: {e:?}"),
        })?;
        let n = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
        if n < self.msrs.len() {
            return Err(Error::MsrRefused {
                index: self.msrs[n].index,
            });
        }
        fd.set_vcpu_events(&self.events)
            .map_err(kvm("KVM_SET_VCPU_EVENTS"))
    }
}

/// The VM-wide state: kvmclock, the in-kernel interrupt controllers and PIT, and the
/// port-I/O devices.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MachineState {
    pub clock: kvm_clock_data,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub devices: DeviceState,
    /// The CPUID vCPU 0 was given (the topology leaves differ per vCPU; the features do
    /// not): what a destination's KVM must be able to offer.
    pub cpuid: Vec<kvm_cpuid_entry2>,
}

fn irqchip(fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip> {
    let mut c = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut c).map_err(kvm("KVM_GET_IRQCHIP"))?;
    Ok(c)
}

impl MachineState {
    pub fn save(fd: &VmFd, devices: DeviceState, cpuid: &CpuId) -> Result<MachineState> {
        Ok(MachineState {
            clock: fd.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
            pic_master: irqchip(fd, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: irqchip(fd, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: irqchip(fd, KVM_IRQCHIP_IOAPIC)?,
            pit: fd.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
            devices,
            cpuid: cpuid.as_slice().to_vec(),
        })
    }

    /// Restores the VM-wide state (before the vCPUs'). kvmclock continues from where
    /// the source stopped it: the flags KVM_GET_CLOCK reported are not settable.
    pub fn restore(&self, fd: &VmFd) -> Result<()> {
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        fd.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            fd.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
        }
        fd.set_pit2(&self.pit).map_err(kvm("KVM_SET_PIT2"))
    }
}

/// Feature registers a guest relies on: (leaf, subleaf, register name).
const FEATURE_LEAVES: [(u32, u32); 5] = [(1, 0), (7, 0), (7, 1), (0xd, 1), (0x8000_0001, 0)];

/// The CPUID features the guest was given (`theirs`) that this host's KVM does not
/// offer (`ours`), as "leaf 0x7.0 ebx bits 0x…" strings; empty when it can carry it.
pub fn missing_features(theirs: &[kvm_cpuid_entry2], ours: &CpuId) -> Vec<String> {
    let find = |set: &[kvm_cpuid_entry2], f: u32, i: u32| {
        set.iter()
            .find(|e| e.function == f && e.index == i)
            .copied()
    };
    let mut missing = Vec::new();
    for (f, i) in FEATURE_LEAVES {
        let Some(t) = find(theirs, f, i) else {
            continue;
        };
        let o = find(ours.as_slice(), f, i).unwrap_or_default();
        // Leaf 1 EBX holds the APIC ID and counts, not features.
        let regs = [
            ("eax", t.eax, o.eax),
            ("ebx", t.ebx, o.ebx),
            ("ecx", t.ecx, o.ecx),
            ("edx", t.edx, o.edx),
        ];
        for (name, t, o) in regs {
            let skip = (f == 1 && (name == "eax" || name == "ebx")) || (f == 0xd && name != "eax");
            // Leaf 1 ECX bit 27 (OSXSAVE) follows the guest's CR4, not the host.
            let t = if f == 1 && name == "ecx" {
                t & !(1 << 27)
            } else {
                t
            };
            if !skip && t & !o != 0 {
                missing.push(format!("leaf {f:#x}.{i} {name} bits {:#x}", t & !o));
            }
        }
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_feature_the_destination_lacks_is_named() {
        let e = |function, index, ecx, edx| kvm_cpuid_entry2 {
            function,
            index,
            ecx,
            edx,
            ..Default::default()
        };
        let theirs = vec![e(1, 0, 0x8000_0001 | (1 << 27), 0x10), e(7, 0, 0, 0)];
        let ours = CpuId::from_entries(&[e(1, 0, 0x8000_0001, 0x10), e(7, 0, 0, 0)]).unwrap();
        assert!(missing_features(&theirs, &ours).is_empty());
        let less = CpuId::from_entries(&[e(1, 0, 0x1, 0x10), e(7, 0, 0, 0)]).unwrap();
        assert_eq!(
            missing_features(&theirs, &less),
            vec!["leaf 0x1.0 ecx bits 0x80000000"]
        );
    }
}
