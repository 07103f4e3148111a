//! `--kernel FILE`: loading a guest hugevisor did not build.
//!
//! - a **PVH ELF** (an ELF64 with the Xen note `XEN_ELFNOTE_PHYS32_ENTRY`, as a Linux
//!   `vmlinux` or the built-in image carries) is loaded segment by segment and entered
//!   at that 32-bit entry with a PVH start_info;
//! - a **bzImage** is loaded at `code32_start` and entered through the Linux 64-bit
//!   boot protocol (zero page, e820, initrd), or — `--boot-entry pvh` — its inner
//!   vmlinux is unpacked ([`super::vmlinux`]) and entered through PVH.
//!
//! Loading is `linux-loader`'s; what it does not check is checked here first, so a bad
//! file is refused before a byte of it reaches guest RAM: the format, the PVH note or
//! the 64-bit entry, every segment inside high RAM and clear of what the VMM writes
//! below 1 MiB, the initramfs's room, the command line's length.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use guest_image::abi::ImageInfo;
use guest_mm::{Gpa, GpaRange, SIZE_2M, SIZE_4K};
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{self, APIC_WINDOW, HIGH_RAM_START};
use super::vmlinux;

/// Which entry of the kernel to use (`--boot-entry`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH for an ELF, the 64-bit boot protocol for a bzImage.
    #[default]
    Auto,
    /// PVH: an ELF's note, or a bzImage's inner vmlinux.
    Pvh,
    /// The Linux 64-bit boot protocol (bzImage only).
    Linux64,
}

/// A `--boot-entry` value that is none of the entries.
#[derive(Debug, thiserror::Error)]
#[error("{0:?}: choose auto, pvh or linux64")]
pub struct BootEntryParseError(String);

impl std::str::FromStr for BootEntry {
    type Err = BootEntryParseError;
    fn from_str(s: &str) -> Result<Self, BootEntryParseError> {
        match s {
            "auto" => Ok(BootEntry::Auto),
            "pvh" => Ok(BootEntry::Pvh),
            "linux64" => Ok(BootEntry::Linux64),
            _ => Err(BootEntryParseError(s.to_string())),
        }
    }
}

/// What `--kernel`, `--initramfs`, `--cmdline` and `--boot-entry` ask for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelConfig {
    pub path: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub entry: BootEntry,
}

/// The entry a kernel was started through (the report's `entry`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryUsed {
    /// An ELF's PVH note.
    Pvh,
    /// A bzImage through the Linux 64-bit boot protocol.
    Linux64,
    /// A bzImage's inner vmlinux, unpacked by hugevisor, through its PVH note.
    BzImageVmlinuxPvh,
}

impl EntryUsed {
    pub fn name(self) -> &'static str {
        match self {
            EntryUsed::Pvh => "pvh",
            EntryUsed::Linux64 => "linux-64-bit boot protocol",
            EntryUsed::BzImageVmlinuxPvh => "pvh (bzImage's inner vmlinux)",
        }
    }
}

/// Why a kernel was refused. Each names the problem in one line.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{path}: {source}", path = .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--kernel {path}: neither an ELF nor a bzImage (no ELF magic, no \"HdrS\" setup header)", path = .0.display())]
    NotAKernel(PathBuf),
    #[error("--kernel {path}: {what}", path = .path.display())]
    Malformed { path: PathBuf, what: &'static str },
    #[error("--kernel {path}: the ELF has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); build the kernel with CONFIG_PVH=y", path = .0.display())]
    NoPvhNote(PathBuf),
    #[error("--kernel {path}: the bzImage has no 64-bit entry (boot protocol {version:#x}, xloadflags {xloadflags:#x}); use --boot-entry pvh or a newer kernel", path = .path.display())]
    No64BitEntry {
        path: PathBuf,
        version: u16,
        xloadflags: u16,
    },
    #[error("--kernel {path}: --boot-entry linux64 needs a bzImage; an ELF is entered through PVH", path = .0.display())]
    ElfHasNoLinux64(PathBuf),
    #[error("--kernel: segment {start:#x}..{end:#x} lies outside guest RAM (0..{ram:#x}); raise --memory")]
    SegmentOutsideRam { start: u64, end: u64, ram: u64 },
    #[error("--kernel: segment {start:#x}..{end:#x} lies below 1 MiB, over the start_info, ACPI tables and page tables hugevisor writes there")]
    SegmentOverVmmArea { start: u64, end: u64 },
    #[error("--kernel: the kernel needs RAM up to {end:#x} to decompress (init_size), beyond --memory {ram:#x}")]
    KernelNeedsMore { end: u64, ram: u64 },
    #[error("--initramfs {path}: the file is empty", path = .0.display())]
    InitramfsEmpty(PathBuf),
    #[error("--initramfs: {size} bytes do not fit between the kernel's end ({kernel_end:#x}) and {ceiling:#x}; raise --memory")]
    InitramfsTooLarge {
        size: u64,
        kernel_end: u64,
        ceiling: u64,
    },
    #[error("--cmdline is {len} bytes; this kernel takes at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("--cmdline contains a NUL byte")]
    CmdlineNul,
    #[error("--memory {size:#x}: a --kernel guest's RAM must end below the IOAPIC/LAPIC window at {window:#x}")]
    RamOverlapsApic { size: u64, window: u64 },
    #[error("--kernel: the bzImage's compressed vmlinux: {0}")]
    Payload(String),
    #[error("--kernel: the bzImage's vmlinux is compressed in a format hugevisor cannot unpack (magic {magic:02x?}); use gzip or LZ4, or --boot-entry linux64")]
    PayloadFormat { magic: Vec<u8> },
    #[error("--kernel: loading failed: {0}")]
    Load(String),
}

/// The boot vCPU's entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelEntry {
    /// 32-bit protected mode, paging off, `ebx` = start_info.
    Pvh { rip: u64 },
    /// 64-bit mode on the identity map, `rsi` = zero page.
    Linux64 { rip: u64 },
}

/// A kernel in guest RAM, before its boot information is written.
#[derive(Clone, Debug)]
pub struct LoadedKernel {
    pub entry: KernelEntry,
    pub used: EntryUsed,
    /// The built-in image's header, when the kernel is the built-in image: its mailbox
    /// then reports as under the fast path.
    pub builtin: Option<ImageInfo>,
    /// First byte after everything the kernel occupies (or decompresses into).
    pub end: u64,
    /// The bzImage's setup header (the 64-bit boot protocol copies it into the zero page).
    pub setup: Option<setup_header>,
    pub initramfs: Option<GpaRange>,
    /// The longest command line the kernel takes (without the NUL).
    pub cmdline_max: usize,
}

/// Linux's COMMAND_LINE_SIZE on x86 (with the NUL); PVH kernels take this much.
const PVH_CMDLINE_SIZE: usize = 2048;
const XLF_KERNEL_64: u16 = 1;

/// Loads `cfg`'s kernel and initramfs into `mem` (the staging view of RAM of `ram`
/// bytes).
pub fn load(
    mem: &GuestMemoryMmap,
    ram: u64,
    cfg: &KernelConfig,
) -> Result<LoadedKernel, KernelError> {
    if ram > APIC_WINDOW {
        return Err(KernelError::RamOverlapsApic {
            size: ram,
            window: APIC_WINDOW,
        });
    }
    let file = read(&cfg.path)?;
    let mut kernel = if file.starts_with(b"\x7fELF") {
        if cfg.entry == BootEntry::Linux64 {
            return Err(KernelError::ElfHasNoLinux64(cfg.path.clone()));
        }
        load_pvh_elf(mem, ram, &cfg.path, &file, EntryUsed::Pvh)?
    } else if file.get(0x202..0x206) == Some(b"HdrS".as_slice()) {
        let header = read_setup_header(&file, &cfg.path)?;
        match cfg.entry {
            BootEntry::Pvh => {
                let elf = vmlinux::unpack(payload(&file, &header)?)?;
                load_pvh_elf(mem, ram, &cfg.path, &elf, EntryUsed::BzImageVmlinuxPvh)?
            }
            BootEntry::Auto | BootEntry::Linux64 => load_bzimage(mem, ram, cfg, &file, header)?,
        }
    } else {
        return Err(KernelError::NotAKernel(cfg.path.clone()));
    };
    if let Some(path) = &cfg.initramfs {
        let max = kernel.setup.map(|h| u64::from(h.initrd_addr_max));
        kernel.initramfs = Some(load_initramfs(mem, ram, path, kernel.end, max)?);
    }
    Ok(kernel)
}

fn read(path: &Path) -> Result<Vec<u8>, KernelError> {
    std::fs::read(path).map_err(|source| KernelError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Every loadable byte must lie in high RAM: below 1 MiB are the VMM's tables.
fn check_range(start: u64, end: u64, ram: u64) -> Result<(), KernelError> {
    if end > ram || end < start {
        return Err(KernelError::SegmentOutsideRam { start, end, ram });
    }
    if start < HIGH_RAM_START {
        return Err(KernelError::SegmentOverVmmArea { start, end });
    }
    Ok(())
}

fn load_pvh_elf(
    mem: &GuestMemoryMmap,
    ram: u64,
    path: &Path,
    elf: &[u8],
    used: EntryUsed,
) -> Result<LoadedKernel, KernelError> {
    let bad = |what| KernelError::Malformed {
        path: path.to_path_buf(),
        what,
    };
    let segments = guest_image::load_segments(elf).map_err(|e| match e {
        guest_image::Error::Malformed(what) => bad(what),
        _ => bad("unreadable program headers"),
    })?;
    let entry = pvh_note(elf).ok_or_else(|| KernelError::NoPvhNote(path.to_path_buf()))?;
    let mut end = 0;
    for s in segments.iter().filter(|s| s.mem_size > 0) {
        let seg_end = s.paddr.saturating_add(s.mem_size);
        check_range(s.paddr, seg_end, ram)?;
        end = end.max(seg_end);
    }
    if segments.is_empty() {
        return Err(bad("no loadable segment"));
    }
    Elf::load(mem, None, &mut Cursor::new(elf), None)
        .map_err(|e| KernelError::Load(e.to_string()))?;
    Ok(LoadedKernel {
        entry: KernelEntry::Pvh { rip: entry },
        used,
        builtin: guest_image::image_info(elf).ok(),
        end,
        setup: None,
        initramfs: None,
        cmdline_max: PVH_CMDLINE_SIZE - 1,
    })
}

/// The entry address in the ELF's Xen note `XEN_ELFNOTE_PHYS32_ENTRY` (type 18).
pub fn pvh_note(elf: &[u8]) -> Option<u64> {
    const PT_NOTE: u32 = 4;
    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?));
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let (phentsize, phnum) = (u16_at(0x36)? as usize, u16_at(0x38)? as usize);
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(ph)? != PT_NOTE {
            continue;
        }
        let (off, size) = (u64_at(ph + 8)? as usize, u64_at(ph + 32)? as usize);
        let mut at = off;
        while at + 12 <= off.checked_add(size)? {
            let (namesz, descsz, kind) = (
                u32_at(at)? as usize,
                u32_at(at + 4)? as usize,
                u32_at(at + 8)?,
            );
            let name = at + 12;
            let desc = name + namesz.div_ceil(4) * 4;
            if kind == XEN_ELFNOTE_PHYS32_ENTRY
                && elf.get(name..name + 3) == Some(b"Xen".as_slice())
            {
                return match descsz {
                    8 => u64_at(desc),
                    _ => u32_at(desc).map(u64::from),
                };
            }
            at = desc + descsz.div_ceil(4) * 4;
        }
    }
    None
}

fn read_setup_header(file: &[u8], path: &Path) -> Result<setup_header, KernelError> {
    let size = std::mem::size_of::<setup_header>();
    let bytes = file
        .get(0x1f1..0x1f1 + size)
        .ok_or(KernelError::Malformed {
            path: path.to_path_buf(),
            what: "truncated bzImage setup header",
        })?;
    let mut h = setup_header::default();
    h.as_mut_slice().copy_from_slice(bytes);
    Ok(h)
}

/// Bytes of real-mode setup code before the protected-mode kernel (0 sectors means 4).
fn setup_bytes(h: &setup_header) -> usize {
    let sects = match h.setup_sects {
        0 => 4,
        n => usize::from(n),
    };
    (sects + 1) * 512
}

/// The compressed vmlinux inside a bzImage.
fn payload<'a>(file: &'a [u8], h: &setup_header) -> Result<&'a [u8], KernelError> {
    let start = setup_bytes(h) + h.payload_offset as usize;
    file.get(start..start + h.payload_length as usize)
        .filter(|p| !p.is_empty())
        .ok_or_else(|| {
            KernelError::Payload("payload_offset/payload_length outside the file".into())
        })
}

fn load_bzimage(
    mem: &GuestMemoryMmap,
    ram: u64,
    cfg: &KernelConfig,
    file: &[u8],
    h: setup_header,
) -> Result<LoadedKernel, KernelError> {
    // The 64-bit entry exists from boot protocol 2.12 on, flagged XLF_KERNEL_64.
    if h.version < 0x20c || h.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(KernelError::No64BitEntry {
            path: cfg.path.clone(),
            version: h.version,
            xloadflags: h.xloadflags,
        });
    }
    let setup = setup_bytes(&h);
    let load_at = u64::from(h.code32_start);
    let code = file.len().saturating_sub(setup) as u64;
    check_range(load_at, load_at + code, ram)?;
    // A relocatable kernel decompresses itself to pref_address; init_size bytes from
    // there must be RAM.
    let run_at = if h.relocatable_kernel != 0 {
        h.pref_address.max(load_at)
    } else {
        load_at
    };
    let end = run_at + u64::from(h.init_size);
    if end > ram {
        return Err(KernelError::KernelNeedsMore { end, ram });
    }
    let loaded = BzImage::load(
        mem,
        None,
        &mut Cursor::new(file),
        Some(GuestAddress(HIGH_RAM_START)),
    )
    .map_err(|e| KernelError::Load(e.to_string()))?;
    let setup_hdr = loaded.setup_header.unwrap_or(h);
    Ok(LoadedKernel {
        entry: KernelEntry::Linux64 {
            rip: load_at + 0x200,
        },
        used: EntryUsed::Linux64,
        builtin: None,
        end: end.max(load_at + code),
        setup: Some(setup_hdr),
        initramfs: None,
        cmdline_max: (h.cmdline_size as usize).clamp(1, PVH_CMDLINE_SIZE) - 1,
    })
}

/// Places the initramfs as high as it fits, page aligned, above the kernel.
fn load_initramfs(
    mem: &GuestMemoryMmap,
    ram: u64,
    path: &Path,
    kernel_end: u64,
    protocol_max: Option<u64>,
) -> Result<GpaRange, KernelError> {
    let data = read(path)?;
    if data.is_empty() {
        return Err(KernelError::InitramfsEmpty(path.to_path_buf()));
    }
    let size = data.len() as u64;
    let ceiling = layout::initramfs_ceiling(ram, protocol_max);
    let floor = kernel_end.next_multiple_of(SIZE_2M);
    let start = ceiling.checked_sub(size).map(|s| s & !(SIZE_4K - 1));
    let start = match start {
        Some(s) if s >= floor => s,
        _ => {
            return Err(KernelError::InitramfsTooLarge {
                size,
                kernel_end,
                ceiling,
            })
        }
    };
    mem.write_slice(&data, GuestAddress(start))
        .map_err(|e| KernelError::Load(format!("writing the initramfs: {e}")))?;
    Ok(GpaRange::new(Gpa(start), Gpa(start + size)))
}

/// Checks `cmdline` against what the kernel takes.
pub fn check_cmdline(cmdline: &str, max: usize) -> Result<(), KernelError> {
    if cmdline.as_bytes().contains(&0) {
        return Err(KernelError::CmdlineNul);
    }
    if cmdline.len() > max {
        return Err(KernelError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pvh_note_of_the_built_in_image_is_its_pvh_entry() {
        let info = guest_image::image_info(guest_image::IMAGE).unwrap();
        assert_eq!(pvh_note(guest_image::IMAGE), Some(info.pvh_entry));
        assert_eq!(pvh_note(b"\x7fELF\x02 too short"), None);
    }

    #[test]
    fn segments_must_lie_in_high_ram() {
        assert!(check_range(HIGH_RAM_START, HIGH_RAM_START + 4096, 64 << 20).is_ok());
        assert!(matches!(
            check_range(0x8000, 0x9000, 64 << 20),
            Err(KernelError::SegmentOverVmmArea { .. })
        ));
        assert!(matches!(
            check_range(HIGH_RAM_START, 65 << 20, 64 << 20),
            Err(KernelError::SegmentOutsideRam { .. })
        ));
    }

    #[test]
    fn command_lines_are_checked_against_the_kernel_s_limit() {
        assert!(check_cmdline("console=ttyS0", 2047).is_ok());
        assert!(matches!(
            check_cmdline(&"x".repeat(2048), 2047),
            Err(KernelError::CmdlineTooLong {
                len: 2048,
                max: 2047
            })
        ));
        assert!(matches!(
            check_cmdline("a\0b", 2047),
            Err(KernelError::CmdlineNul)
        ));
    }
}
