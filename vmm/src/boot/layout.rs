//! Where hugevisor puts what it writes for a guest it boots through `--kernel`, and the
//! memory map that guest is given. Everything the VMM writes lies below 1 MiB; a kernel
//! segment or an initramfs there is refused (it would overwrite, or be overwritten by,
//! the VMM's tables).
//!
//! | range | what |
//! |---|---|
//! | 0x6000 | PVH start_info; memory map at 0x6100, module list at 0x6800 |
//! | 0x7000 | command line (up to 4 KiB) |
//! | 0x8000 | Linux zero page (`boot_params`, bzImage only) |
//! | 0x9000 | boot GDT (32-bit code, 64-bit code, data, TSS) |
//! | 0xa000 | identity map for the Linux 64-bit entry: PML4, PDPT, 4 page directories |
//! | 0x70000 | free: the built-in image's AP trampoline (its own choice) |
//! | 0x9fc00–1 MiB | reserved; ACPI tables at 0xe0000 (RSDP first, where a scan finds it) |
//! | 1 MiB – end | RAM for the kernel, its decompression and the initramfs (top-down) |

use guest_mm::{Gpa, GpaRange, SIZE_1G, SIZE_4K};

pub use super::fast::{CMDLINE_GPA, MEMMAP_GPA, START_INFO_GPA};

pub const MODLIST_GPA: u64 = 0x6800;
pub const ZERO_PAGE_GPA: u64 = 0x8000;
pub const GDT_GPA: u64 = 0x9000;
pub const PML4_GPA: u64 = 0xa000;
/// The identity map the Linux 64-bit entry gets covers the first 4 GiB.
pub const IDENTITY_MAP_GIB: u64 = 4;
/// Start of the ACPI tables; the RSDP is the first of them.
pub const ACPI_GPA: u64 = 0xe_0000;
pub const ACPI_END: u64 = 0x10_0000;
/// Low RAM ends where a PC's extended BIOS data area would start.
pub const LOW_RAM_END: u64 = 0x9_fc00;
/// The first byte a kernel or an initramfs may occupy.
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// Guest RAM must end below the IOAPIC's and LAPICs' MMIO window (one memslot at 0).
pub const APIC_WINDOW: u64 = 0xfec0_0000;
/// What the VMM writes below 1 MiB, as one range for overlap checks.
pub const VMM_AREA: std::ops::Range<u64> = START_INFO_GPA..ACPI_END;

/// GDT selectors of the boot GDT: the PVH entry runs on `CODE32`/`DATA`, the Linux
/// 64-bit entry on `CODE64`/`DATA` (the boot protocol's __BOOT_CS 0x10, __BOOT_DS 0x18).
pub const SEL_CODE32: u16 = 0x08;
pub const SEL_CODE64: u16 = 0x10;
pub const SEL_DATA: u16 = 0x18;
pub const SEL_TSS: u16 = 0x20;
pub const GDT: [u64; 5] = [
    0,
    0x00cf_9b00_0000_ffff, // 0x08: code, 32-bit, flat
    0x00af_9b00_0000_ffff, // 0x10: code, 64-bit
    0x00cf_9300_0000_ffff, // 0x18: data, flat
    0x0080_8b00_0000_0067, // 0x20: TSS (busy), base 0, for KVM's task register
];

/// E820 / PVH memory map entry types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// One memory map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapEntry {
    pub range: GpaRange,
    pub kind: u32,
}

/// The guest's memory map: low RAM, the reserved hole with the ACPI tables, high RAM.
pub fn memory_map(ram_size: u64) -> Vec<MapEntry> {
    let e = |start: u64, end: u64, kind| MapEntry {
        range: GpaRange::new(Gpa(start), Gpa(end)),
        kind,
    };
    vec![
        e(0, LOW_RAM_END, E820_RAM),
        e(LOW_RAM_END, HIGH_RAM_START, E820_RESERVED),
        e(HIGH_RAM_START, ram_size, E820_RAM),
    ]
}

/// The highest address an initramfs may end at: the end of RAM, below 4 GiB.
pub fn initramfs_ceiling(ram_size: u64, protocol_max: Option<u64>) -> u64 {
    let top = ram_size.min(4 * SIZE_1G);
    let top = match protocol_max {
        Some(max) => top.min(max.saturating_add(1)),
        None => top,
    };
    top & !(SIZE_4K - 1)
}
