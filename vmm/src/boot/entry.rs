//! The boot vCPU's registers at a `--kernel` guest's entry. Application processors are
//! left as KVM creates them beside an in-kernel LAPIC — waiting for INIT/SIPI — and the
//! guest starts them itself, as on a PC.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use super::kernel::KernelEntry;
use super::layout::{
    self, GDT_GPA, PML4_GPA, SEL_CODE32, SEL_CODE64, SEL_DATA, SEL_TSS, START_INFO_GPA,
    ZERO_PAGE_GPA,
};

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Which kind of flat segment: a 64-bit code segment (L set) or a 32-bit one (D/B set).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Width {
    Long,
    Bits32,
}

fn flat(selector: u16, type_: u8, width: Width) -> kvm_segment {
    let long = width == Width::Long;
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Special registers at `entry`, from KVM's reset state `base`.
pub fn sregs(base: &kvm_sregs, entry: KernelEntry) -> kvm_sregs {
    let mut s = *base;
    let long = matches!(entry, KernelEntry::Linux64 { .. });
    s.cs = if long {
        flat(SEL_CODE64, 0xb, Width::Long)
    } else {
        flat(SEL_CODE32, 0xb, Width::Bits32)
    };
    let data = flat(SEL_DATA, 0x3, Width::Bits32);
    (s.ds, s.es, s.fs, s.gs, s.ss) = (data, data, data, data, data);
    s.tr = kvm_segment {
        base: 0,
        limit: 0x67,
        selector: SEL_TSS,
        type_: 0xb,
        present: 1,
        s: 0,
        g: 0,
        db: 0,
        l: 0,
        dpl: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    s.gdt.base = GDT_GPA;
    s.gdt.limit = (layout::GDT.len() * 8 - 1) as u16;
    s.idt.base = 0;
    s.idt.limit = 0;
    if long {
        s.cr0 = CR0_PE | CR0_ET | CR0_PG;
        s.cr3 = PML4_GPA;
        s.cr4 = CR4_PAE;
        s.efer = EFER_LME | EFER_LMA;
    } else {
        s.cr0 = CR0_PE | CR0_ET;
        s.cr3 = 0;
        s.cr4 = 0;
        s.efer = 0;
    }
    s
}

/// General registers at `entry`: PVH passes start_info in `ebx`, the 64-bit boot
/// protocol the zero page in `rsi`.
pub fn regs(entry: KernelEntry) -> kvm_regs {
    match entry {
        KernelEntry::Pvh { rip } => kvm_regs {
            rip,
            rbx: START_INFO_GPA,
            rflags: 0x2,
            ..Default::default()
        },
        KernelEntry::Linux64 { rip } => kvm_regs {
            rip,
            rsi: ZERO_PAGE_GPA,
            rflags: 0x2,
            ..Default::default()
        },
    }
}
