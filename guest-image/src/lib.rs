//! The hugevisor guest image: one PVH ELF holding every built-in workload.
//!
//! Built by `build.rs` from `guest/` (GNU as + gcc + ld, no cross toolchain). Any VMM
//! that boots PVH ELFs (QEMU `-M microvm`, Cloud Hypervisor, Firecracker) can run it;
//! parameters come from the PVH start-info command line, or from the default command
//! line stored in the image header when the loader passes none
//! ([`image_with_default_cmdline`]). hugevisor itself enters at the 64-bit ring-3 entry
//! ([`abi::ImageInfo::user_entry`]) after writing the tables the PVH path would build.

pub mod abi;
pub mod clock;

use std::fmt;
use std::str::FromStr;

/// The image as built, with its stock default command line.
pub static IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hvguest.elf"));

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown workload {0:?}; choose one of: touch, verify, stream, random, fault, numa01, numa02, numa01_thread_alloc, idle")]
    UnknownWorkload(String),
    #[error("guest command line is {len} bytes; at most {max} fit in the image header")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("guest command line must be printable ASCII without NUL: {0:?}")]
    CmdlineNotAscii(String),
    #[error("guest image is malformed: {0} (rebuild hugevisor)")]
    Malformed(&'static str),
}

/// The built-in workloads (see `guest/workloads.c`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Workload {
    /// Each vCPU writes every page of its partition once per pass.
    Touch,
    /// Memory-integrity checker: (page number, generation) per page, checked every pass.
    Verify,
    /// Sequential read-modify-write of every word.
    Stream,
    /// One read-modify-write per page, pages in a scrambled order.
    Random,
    /// Takes a deliberate page fault (tests the exception path).
    Fault,
    /// autonuma-benchmark numa01: all vCPUs share one buffer (the whole data area).
    Numa01,
    /// numa02: each vCPU works on its own partition (placed on the wrong node at start).
    Numa02,
    /// numa01_thread_alloc: each vCPU's partition, interleaved over the nodes at start.
    Numa01ThreadAlloc,
    /// Writes its partition once, then spins without touching RAM (an idle guest for
    /// migration); checks the partition once more when told to stop.
    Idle,
}

impl Workload {
    pub const ALL: [Workload; 9] = [
        Workload::Touch,
        Workload::Verify,
        Workload::Stream,
        Workload::Random,
        Workload::Fault,
        Workload::Numa01,
        Workload::Numa02,
        Workload::Numa01ThreadAlloc,
        Workload::Idle,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Touch => "touch",
            Workload::Verify => "verify",
            Workload::Stream => "stream",
            Workload::Random => "random",
            Workload::Fault => "fault",
            Workload::Numa01 => "numa01",
            Workload::Numa02 => "numa02",
            Workload::Numa01ThreadAlloc => "numa01_thread_alloc",
            Workload::Idle => "idle",
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Workload {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Workload::ALL
            .into_iter()
            .find(|w| w.name() == s)
            .ok_or_else(|| Error::UnknownWorkload(s.to_string()))
    }
}

/// Guest parameters, rendered as the command line the guest parses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestParams {
    pub workload: Workload,
    /// Passes per vCPU; `None` runs until the VMM sets the mailbox stop flag.
    pub passes: Option<u64>,
    pub vcpus: u32,
    pub seed: u64,
    /// Guest NUMA node of each vCPU (empty: all on node 0).
    pub vcpu_nodes: Vec<u16>,
}

impl GuestParams {
    pub fn cmdline(&self) -> String {
        let mut s = format!(
            "workload={} passes={} vcpus={} seed={}",
            self.workload,
            self.passes.unwrap_or(0),
            self.vcpus,
            self.seed
        );
        if !self.vcpu_nodes.is_empty() {
            let nodes: Vec<String> = self.vcpu_nodes.iter().map(|n| n.to_string()).collect();
            s.push_str(&format!(" nodes={}", nodes.join(",")));
        }
        s
    }
}

fn read_u16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn read_u64(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// File offset of the image header (the bytes loaded at [`abi::IMAGE_BASE`]).
///
/// Hand-parsed: only the ELF64 program headers of our own image are read, which is less
/// code than adapting a general ELF crate to in-place patching.
pub fn header_file_offset(elf: &[u8]) -> Result<usize, Error> {
    let base = elf.as_ptr() as usize;
    load_segments(elf)?
        .iter()
        .find(|s| s.paddr <= abi::IMAGE_BASE && abi::IMAGE_BASE < s.paddr + s.file.len() as u64)
        .map(|s| s.file.as_ptr() as usize - base + (abi::IMAGE_BASE - s.paddr) as usize)
        .ok_or(Error::Malformed("no loadable segment at the image base"))
}

/// A loadable segment of the image: `file` bytes go to `paddr`; the rest of `mem_size`
/// is zero (fresh guest RAM already is).
#[derive(Clone, Copy, Debug)]
pub struct Segment<'a> {
    pub paddr: u64,
    pub file: &'a [u8],
    pub mem_size: u64,
}

/// The PT_LOAD segments of an ELF64 image.
pub fn load_segments(elf: &[u8]) -> Result<Vec<Segment<'_>>, Error> {
    let (phoff, phentsize, phnum) = program_headers(elf)?;
    let mut out = Vec::new();
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let trunc = || Error::Malformed("truncated program header");
        let p_type = elf.get(ph..ph + 4).ok_or_else(trunc)?;
        if p_type != 1u32.to_le_bytes() {
            continue;
        }
        let p_offset = read_u64(elf, ph + 8).ok_or_else(trunc)?;
        let p_paddr = read_u64(elf, ph + 24).ok_or_else(trunc)?;
        let p_filesz = read_u64(elf, ph + 32).ok_or_else(trunc)?;
        let p_memsz = read_u64(elf, ph + 40).ok_or_else(trunc)?;
        let file = usize::try_from(p_offset)
            .ok()
            .zip(usize::try_from(p_filesz).ok())
            .and_then(|(o, n)| elf.get(o..o.checked_add(n)?))
            .ok_or(Error::Malformed("segment outside the file"))?;
        out.push(Segment {
            paddr: p_paddr,
            file,
            mem_size: p_memsz.max(p_filesz),
        });
    }
    Ok(out)
}

fn program_headers(elf: &[u8]) -> Result<(usize, usize, usize), Error> {
    if elf.get(0..4) != Some(b"\x7fELF".as_slice()) || elf.get(4) != Some(&2) {
        return Err(Error::Malformed("not an ELF64 file"));
    }
    let trunc = || Error::Malformed("truncated ELF header");
    let phoff = read_u64(elf, 0x20).ok_or_else(trunc)? as usize;
    let phentsize = read_u16(elf, 0x36).ok_or_else(trunc)? as usize;
    let phnum = read_u16(elf, 0x38).ok_or_else(trunc)? as usize;
    Ok((phoff, phentsize, phnum))
}

/// Reads the image header from an ELF image.
pub fn image_info(elf: &[u8]) -> Result<abi::ImageInfo, Error> {
    let off = header_file_offset(elf)?;
    let size = std::mem::size_of::<abi::ImageInfo>();
    let bytes = elf
        .get(off..off + size)
        .ok_or(Error::Malformed("truncated image header"))?;
    // SAFETY: `bytes` is exactly size_of::<ImageInfo>() long and ImageInfo is a repr(C)
    // struct of integers and a byte array, valid for any bit pattern; read_unaligned
    // copes with the slice's alignment.
    let info = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<abi::ImageInfo>()) };
    if info.magic != abi::IMAGE_MAGIC {
        return Err(Error::Malformed("bad image header magic"));
    }
    if info.abi_version != abi::ABI_VERSION {
        return Err(Error::Malformed(
            "image ABI version differs from this hugevisor",
        ));
    }
    Ok(info)
}

/// The image with `cmdline` stored as its default command line: what the guest runs
/// when the loader passes an empty PVH command line (`qemu -kernel FILE` without `-append`).
pub fn image_with_default_cmdline(cmdline: &str) -> Result<Vec<u8>, Error> {
    if !cmdline.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(Error::CmdlineNotAscii(cmdline.to_string()));
    }
    if cmdline.len() >= abi::CMDLINE_MAX {
        return Err(Error::CmdlineTooLong {
            len: cmdline.len(),
            max: abi::CMDLINE_MAX - 1,
        });
    }
    let mut elf = IMAGE.to_vec();
    let off = header_file_offset(&elf)? + std::mem::offset_of!(abi::ImageInfo, default_cmdline);
    let field = elf
        .get_mut(off..off + abi::CMDLINE_MAX)
        .ok_or(Error::Malformed("truncated image header"))?;
    field.fill(0);
    field[..cmdline.len()].copy_from_slice(cmdline.as_bytes());
    Ok(elf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_matches_abi() {
        let info = image_info(IMAGE).unwrap();
        assert_eq!(info.max_vcpus as usize, abi::MAX_VCPUS);
        assert_eq!(info.data_start, abi::DATA_START);
        assert!(info.image_end <= abi::DATA_START);
        assert_eq!(info.kernel_stacks % abi::KSTACK_SIZE, 0);
        assert_eq!(info.page_tables % 4096, 0);
        assert!(info.mailbox >= abi::IMAGE_BASE && info.mailbox + 0x5000 <= info.image_end);
        assert!(info.user_entry > abi::IMAGE_BASE && info.user_entry < info.image_end);
    }

    #[test]
    fn default_cmdline_is_patched() {
        let elf = image_with_default_cmdline("workload=random passes=2").unwrap();
        let info = image_info(&elf).unwrap();
        assert!(info
            .default_cmdline
            .starts_with(b"workload=random passes=2\0"));
        assert!(matches!(
            image_with_default_cmdline(&"x".repeat(300)),
            Err(Error::CmdlineTooLong { .. })
        ));
        assert!(image_with_default_cmdline("a\nb").is_err());
    }

    #[test]
    fn workload_names_round_trip() {
        for w in Workload::ALL {
            assert_eq!(w.name().parse::<Workload>().unwrap(), w);
        }
        assert!("nope".parse::<Workload>().is_err());
    }
}
