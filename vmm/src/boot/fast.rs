//! The hugevisor fast path into the guest image.
//!
//! The PVH path of the image (boot.S/kernel.c) enters long mode, builds identity page
//! tables, GDT TSS descriptors, TSS and IDT in ring 0 and `iretq`s to ring 3. Under
//! kvm_pvm every ring-0 instruction is emulated, and a guest that enters ring 3 by
//! itself traps on ring-3 port I/O. So hugevisor writes those same tables itself, into
//! the areas the image header names, and starts every vCPU directly at the image's
//! 64-bit ring-3 entry (`user_entry(vcpu, start_info)`), the way a PVH loader would
//! have left it after the guest's own set-up. Ring-0 code then runs only on exceptions.

use guest_image::abi::{self, ImageInfo};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::error::{ConfigError, Error, Result};

/// Where hugevisor puts the PVH start_info, its memory map and the command line.
pub const START_INFO_GPA: u64 = 0x6000;
pub const MEMMAP_GPA: u64 = 0x6100;
pub const CMDLINE_GPA: u64 = 0x7000;
pub const CMDLINE_LIMIT: usize = 0x1000;

const PVH_START_MAGIC: u32 = 0x336e_c578;
const PTE_PRESENT_RW_USER: u64 = 0x7;
const PDE_HUGE_2M: u64 = 0x87;
const SIZE_2M: u64 = 2 << 20;
const SIZE_1G: u64 = 1 << 30;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_AM: u64 = 1 << 18;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// IOPL 3 (ring-3 port I/O exits to the VMM instead of #GP), reserved bit 1, IF clear.
const RFLAGS_IOPL3: u64 = 0x3002;

/// The guest image as loaded into guest RAM.
#[derive(Clone, Copy, Debug)]
pub struct LoadedImage {
    pub info: ImageInfo,
}

fn write(mem: &GuestMemoryMmap, gpa: u64, bytes: &[u8]) -> Result<()> {
    mem.write_slice(bytes, GuestAddress(gpa))
        .map_err(|e| Error::GuestWrite {
            gpa,
            what: e.to_string(),
        })
}

fn write_u64(mem: &GuestMemoryMmap, gpa: u64, v: u64) -> Result<()> {
    write(mem, gpa, &v.to_le_bytes())
}

/// Copies the image's loadable segments into guest RAM (through the staging view).
pub fn load_image(mem: &GuestMemoryMmap, elf: &[u8], ram_size: u64) -> Result<LoadedImage> {
    let info = guest_image::image_info(elf)?;
    for seg in guest_image::load_segments(elf)? {
        if seg.paddr + seg.mem_size > ram_size.min(abi::DATA_START) {
            return Err(ConfigError::ImageTooLarge {
                start: seg.paddr,
                end: seg.paddr + seg.mem_size,
            }
            .into());
        }
        write(mem, seg.paddr, seg.file)?;
    }
    Ok(LoadedImage { info })
}

/// Writes the identity map, GDT TSS descriptors, TSSes, IDT, per-vCPU stack tags, and the
/// PVH start_info with `cmdline`: everything the image's own PVH path would have built.
pub fn write_boot_tables(
    mem: &GuestMemoryMmap,
    image: &LoadedImage,
    ram_size: u64,
    vcpus: usize,
    cmdline: &str,
) -> Result<()> {
    let info = &image.info;
    if !ram_size.is_multiple_of(SIZE_2M) {
        return Err(ConfigError::MemoryNotMultipleOf2M { size: ram_size }.into());
    }
    if ram_size > abi::MAX_RAM_GIB * SIZE_1G {
        return Err(ConfigError::MemoryTooLargeForImage {
            size: ram_size,
            max_gib: abi::MAX_RAM_GIB,
        }
        .into());
    }
    if vcpus == 0 || vcpus > abi::MAX_VCPUS {
        return Err(ConfigError::VcpusOutOfRange {
            vcpus,
            max: abi::MAX_VCPUS,
        }
        .into());
    }
    // Identity map with 2 MiB guest pages, user-accessible (the workloads run in ring 3).
    let pml4 = info.page_tables;
    let pdpt = pml4 + 0x1000;
    write_u64(mem, pml4, pdpt | PTE_PRESENT_RW_USER)?;
    let gibs = ram_size.div_ceil(SIZE_1G);
    for gib in 0..gibs {
        let pd = pml4 + 0x1000 * (2 + gib);
        write_u64(mem, pdpt + 8 * gib, pd | PTE_PRESENT_RW_USER)?;
        let entries = ((ram_size - gib * SIZE_1G).min(SIZE_1G) / SIZE_2M) as usize;
        let mut table = vec![0u8; entries * 8];
        for (i, e) in table.chunks_exact_mut(8).enumerate() {
            let addr = gib * SIZE_1G + i as u64 * SIZE_2M;
            e.copy_from_slice(&(addr | PDE_HUGE_2M).to_le_bytes());
        }
        write(mem, pd, &table)?;
    }
    // IDT: an interrupt gate per exception vector, pointing at the image's handlers.
    for vector in 0..32u64 {
        let mut handler = [0u8; 8];
        mem.read_slice(&mut handler, GuestAddress(info.trap_handlers + 8 * vector))
            .map_err(|e| Error::GuestWrite {
                gpa: info.trap_handlers,
                what: e.to_string(),
            })?;
        let h = u64::from_le_bytes(handler);
        let low = (h & 0xffff)
            | (u64::from(abi::SEL_KCODE) << 16)
            | (0x8e << 40)
            | ((h >> 16 & 0xffff) << 48);
        write_u64(mem, info.idt + 16 * vector, low)?;
        write_u64(mem, info.idt + 16 * vector + 8, h >> 32)?;
    }
    // One TSS per vCPU: rsp0 is the top of its ring-0 stack, where its index is stored.
    for cpu in 0..vcpus as u64 {
        let tss = tss_base(info, cpu);
        let kstack_top = info.kernel_stacks + (cpu + 1) * abi::KSTACK_SIZE;
        write_u64(mem, kstack_top - 16, cpu)?;
        write_u64(mem, tss + 4, kstack_top - 16)?;
        write(mem, tss + 102, &104u16.to_le_bytes())?;
        let (limit, busy_tss) = (103u64, 0x8bu64);
        let low = (limit & 0xffff)
            | ((tss & 0xff_ffff) << 16)
            | (busy_tss << 40)
            | ((limit >> 16 & 0xf) << 48)
            | ((tss >> 24 & 0xff) << 56);
        let desc = info.gdt + u64::from(abi::SEL_TSS0) + 16 * cpu;
        write_u64(mem, desc, low)?;
        write_u64(mem, desc + 8, tss >> 32)?;
    }
    write_start_info(mem, ram_size, cmdline)
}

fn tss_base(info: &ImageInfo, cpu: u64) -> u64 {
    info.tss + cpu * abi::TSS_STRIDE
}

/// PVH start_info (version 1) with a one-entry memory map and the command line.
fn write_start_info(mem: &GuestMemoryMmap, ram_size: u64, cmdline: &str) -> Result<()> {
    if cmdline.len() >= CMDLINE_LIMIT {
        return Err(ConfigError::CmdlineTooLong { max: CMDLINE_LIMIT }.into());
    }
    let mut cl = cmdline.as_bytes().to_vec();
    cl.push(0);
    write(mem, CMDLINE_GPA, &cl)?;
    let mut si = Vec::with_capacity(56);
    si.extend_from_slice(&PVH_START_MAGIC.to_le_bytes());
    si.extend_from_slice(&1u32.to_le_bytes()); // version
    si.extend_from_slice(&0u32.to_le_bytes()); // flags
    si.extend_from_slice(&0u32.to_le_bytes()); // nr_modules
    si.extend_from_slice(&0u64.to_le_bytes()); // modlist_paddr
    si.extend_from_slice(&CMDLINE_GPA.to_le_bytes());
    si.extend_from_slice(&0u64.to_le_bytes()); // rsdp_paddr
    si.extend_from_slice(&MEMMAP_GPA.to_le_bytes());
    si.extend_from_slice(&1u32.to_le_bytes()); // memmap_entries
    si.extend_from_slice(&0u32.to_le_bytes());
    write(mem, START_INFO_GPA, &si)?;
    let mut mm = Vec::with_capacity(24);
    mm.extend_from_slice(&0u64.to_le_bytes());
    mm.extend_from_slice(&ram_size.to_le_bytes());
    mm.extend_from_slice(&1u32.to_le_bytes()); // RAM
    mm.extend_from_slice(&0u32.to_le_bytes());
    write(mem, MEMMAP_GPA, &mm)
}

fn segment(selector: u16, type_: u8, dpl: u8, long: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl,
        db: u8::from(long == 0),
        s: 1,
        l: long,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Special registers for vCPU `cpu` entering the image's ring-3 code in long mode.
pub fn ring3_sregs(base: &kvm_sregs, image: &LoadedImage, cpu: usize) -> kvm_sregs {
    let info = &image.info;
    let mut s = *base;
    s.cs = segment(abi::SEL_UCODE, 0xb, 3, 1);
    let data = segment(abi::SEL_UDATA, 0x3, 3, 0);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = kvm_segment {
        base: tss_base(info, cpu as u64),
        limit: 103,
        selector: abi::SEL_TSS0 + 16 * cpu as u16,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    s.gdt.base = info.gdt;
    s.gdt.limit = (abi::GDT_ENTRIES * 8 - 1) as u16;
    s.idt.base = info.idt;
    s.idt.limit = 256 * 16 - 1;
    s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG;
    s.cr3 = info.page_tables;
    s.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    s.efer = EFER_LME | EFER_LMA;
    s
}

/// General registers for vCPU `cpu`: `user_entry(cpu, start_info)` on its own stack.
pub fn ring3_regs(image: &LoadedImage, cpu: usize) -> kvm_regs {
    let info = &image.info;
    kvm_regs {
        rip: info.user_entry,
        rsp: info.user_stacks + (cpu as u64 + 1) * abi::USTACK_SIZE,
        rdi: cpu as u64,
        rsi: START_INFO_GPA,
        rflags: RFLAGS_IOPL3,
        ..Default::default()
    }
}
