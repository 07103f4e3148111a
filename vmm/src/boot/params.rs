//! What the VMM writes for a `--kernel` guest besides the kernel: the PVH start_info
//! (memory map, modules, command line, RSDP), or the Linux zero page (e820, initrd,
//! command line, RSDP) with the identity map its 64-bit entry needs; and the boot GDT
//! both entries start on. Addresses are [`super::layout`]'s.

use guest_mm::{GpaRange, SIZE_1G, SIZE_2M};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    self, CMDLINE_GPA, GDT_GPA, MEMMAP_GPA, MODLIST_GPA, PML4_GPA, START_INFO_GPA, ZERO_PAGE_GPA,
};
use crate::error::{Error, Result};

const PVH_START_MAGIC: u32 = 0x336e_c578;
/// type_of_loader: "undefined" loader id with the extended version byte in use.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// loadflags: CAN_USE_HEAP.
const CAN_USE_HEAP: u8 = 0x80;

fn put<T: ByteValued>(mem: &GuestMemoryMmap, gpa: u64, v: T) -> Result<()> {
    mem.write_obj(v, GuestAddress(gpa))
        .map_err(|e| Error::GuestWrite {
            gpa,
            what: e.to_string(),
        })
}

fn put_bytes(mem: &GuestMemoryMmap, gpa: u64, b: &[u8]) -> Result<()> {
    mem.write_slice(b, GuestAddress(gpa))
        .map_err(|e| Error::GuestWrite {
            gpa,
            what: e.to_string(),
        })
}

/// The boot GDT (read by the vCPU's first segment loads, whichever entry).
pub fn write_gdt(mem: &GuestMemoryMmap) -> Result<()> {
    for (i, d) in layout::GDT.iter().enumerate() {
        put(mem, GDT_GPA + 8 * i as u64, *d)?;
    }
    Ok(())
}

fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<()> {
    let mut b = cmdline.as_bytes().to_vec();
    b.push(0);
    put_bytes(mem, CMDLINE_GPA, &b)
}

/// PVH start_info (version 1): memory map, the initramfs as module 0, command line,
/// RSDP.
pub fn write_start_info(
    mem: &GuestMemoryMmap,
    ram: u64,
    cmdline: &str,
    initramfs: Option<GpaRange>,
    rsdp: u64,
) -> Result<()> {
    write_cmdline(mem, cmdline)?;
    let map = layout::memory_map(ram);
    for (i, e) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.range.start.raw(),
            size: e.range.len(),
            type_: e.kind,
            reserved: 0,
        };
        put(
            mem,
            MEMMAP_GPA + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64,
            entry,
        )?;
    }
    if let Some(m) = initramfs {
        put(
            mem,
            MODLIST_GPA,
            hvm_modlist_entry {
                paddr: m.start.raw(),
                size: m.len(),
                cmdline_paddr: 0,
                reserved: 0,
            },
        )?;
    }
    let si = hvm_start_info {
        magic: PVH_START_MAGIC,
        version: 1,
        flags: 0,
        nr_modules: u32::from(initramfs.is_some()),
        modlist_paddr: if initramfs.is_some() { MODLIST_GPA } else { 0 },
        cmdline_paddr: CMDLINE_GPA,
        rsdp_paddr: rsdp,
        memmap_paddr: MEMMAP_GPA,
        memmap_entries: map.len() as u32,
        reserved: 0,
    };
    put(mem, START_INFO_GPA, si)
}

/// The Linux zero page for the 64-bit boot protocol, and the identity map of the first
/// 4 GiB (2 MiB pages) that protocol requires.
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    ram: u64,
    setup: setup_header,
    cmdline: &str,
    initramfs: Option<GpaRange>,
    rsdp: u64,
) -> Result<()> {
    write_cmdline(mem, cmdline)?;
    let mut bp = boot_params {
        hdr: setup,
        ..Default::default()
    };
    bp.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    bp.hdr.loadflags |= CAN_USE_HEAP;
    bp.hdr.heap_end_ptr = 0xfe00;
    bp.hdr.cmd_line_ptr = CMDLINE_GPA as u32;
    bp.hdr.cmdline_size = cmdline.len() as u32 + 1;
    if let Some(m) = initramfs {
        bp.hdr.ramdisk_image = m.start.raw() as u32;
        bp.hdr.ramdisk_size = m.len() as u32;
    }
    bp.acpi_rsdp_addr = rsdp;
    let map = layout::memory_map(ram);
    for (i, e) in map.iter().enumerate() {
        bp.e820_table[i] = boot_e820_entry {
            addr: e.range.start.raw(),
            size: e.range.len(),
            r#type: e.kind,
        };
    }
    bp.e820_entries = map.len() as u8;
    put(mem, ZERO_PAGE_GPA, bp)?;
    write_identity_map(mem)
}

fn write_identity_map(mem: &GuestMemoryMmap) -> Result<()> {
    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x80;
    let pdpt = PML4_GPA + 0x1000;
    put(mem, PML4_GPA, pdpt | PRESENT_RW)?;
    for gib in 0..layout::IDENTITY_MAP_GIB {
        let pd = pdpt + 0x1000 * (1 + gib);
        put(mem, pdpt + 8 * gib, pd | PRESENT_RW)?;
        let table: Vec<u8> = (0..512u64)
            .flat_map(|i| ((gib * SIZE_1G + i * SIZE_2M) | PRESENT_RW | HUGE).to_le_bytes())
            .collect();
        put_bytes(mem, pd, &table)?;
    }
    Ok(())
}
