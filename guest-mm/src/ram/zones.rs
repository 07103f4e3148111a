//! Zones: the backing objects behind guest NUMA nodes, and which node each 2 MiB region
//! is on.
//!
//! - **emulated** (single-node hosts): each node is its own memfd, sized like guest RAM;
//!   a region lives in its node's memfd at its own offset, the others hold a hole there.
//! - **host**: one memfd whose pages are bound to host nodes with mbind(2), moved with
//!   mbind(MPOL_MF_MOVE) and read back with move_pages(2).
//!
//! Node syscalls go through `libc::syscall`: no NUMA crate is kept up (and libnuma would
//! add a C dependency for four syscalls).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Mutex;

use crate::addr::{Gpa, GpaRange, SIZE_2M};
use crate::config::{Policy, MAX_RAM};
use crate::error::{os, Error};
use crate::size::format_size;

/// The memfd flavour of a backing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MemfdKind {
    Shmem,
    Hugetlb2M,
    Hugetlb1G,
}

impl MemfdKind {
    fn flags(self) -> libc::c_uint {
        match self {
            MemfdKind::Shmem => libc::MFD_CLOEXEC,
            MemfdKind::Hugetlb2M => libc::MFD_CLOEXEC | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB,
            MemfdKind::Hugetlb1G => libc::MFD_CLOEXEC | libc::MFD_HUGETLB | libc::MFD_HUGE_1GB,
        }
    }
}

/// A memfd of `size` bytes named for guest RAM (so /proc/PID/maps says what it is).
pub(crate) fn create_memfd(kind: MemfdKind, size: u64) -> Result<OwnedFd, Error> {
    // SAFETY: the name is a valid NUL-terminated string; memfd_create returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"hugevisor-guest-ram".as_ptr(), kind.flags()) };
    if fd < 0 {
        return Err(os("memfd_create"));
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = libc::off_t::try_from(size).map_err(|_| Error::TooLarge {
        size: format_size(size),
        max: format_size(MAX_RAM),
    })?;
    // SAFETY: fd is a valid memfd owned above.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len) } != 0 {
        return Err(os("ftruncate(memfd)"));
    }
    Ok(fd)
}

/// The zones of guest RAM and the node of every region.
pub(crate) struct Zones {
    /// Zone `n` holds node `n`'s regions (emulated); zone 0 is guest RAM's own memfd
    /// (None for anon).
    memfds: Vec<OwnedFd>,
    anon: bool,
    /// Node of each 2 MiB region.
    region_nodes: Mutex<Vec<u16>>,
}

impl Zones {
    /// Zones over `main` (guest RAM's memfd, if any) plus `extra` emulated node memfds.
    pub(crate) fn new(main: Option<OwnedFd>, extra: Vec<OwnedFd>, size: u64) -> Zones {
        let anon = main.is_none();
        Zones {
            memfds: main.into_iter().chain(extra).collect(),
            anon,
            region_nodes: Mutex::new(vec![0; size.div_ceil(SIZE_2M) as usize]),
        }
    }

    /// The memfd of `zone`; None for anon RAM and for zones that do not exist.
    pub(crate) fn fd(&self, zone: u16) -> Option<BorrowedFd<'_>> {
        if self.anon {
            return None;
        }
        self.memfds.get(zone as usize).map(|f| f.as_fd())
    }

    /// Guest RAM's memfd when it is the only zone (no emulated nodes): every GPA is at the
    /// same offset in it.
    pub(crate) fn single_memfd(&self) -> Option<BorrowedFd<'_>> {
        match self.memfds.len() {
            1 if !self.anon => self.fd(0),
            _ => None,
        }
    }

    pub(crate) fn nodes(&self) -> std::sync::MutexGuard<'_, Vec<u16>> {
        self.region_nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The node of the region holding `gpa` (0 beyond guest RAM).
    pub(crate) fn node_of(&self, gpa: Gpa) -> u16 {
        self.nodes()
            .get((gpa.0 / SIZE_2M) as usize)
            .copied()
            .unwrap_or(0)
    }

    /// Frees `range` of `zone` (the old copy after an emulated move, zero pages arriving).
    pub(crate) fn punch(&self, zone: u16, range: GpaRange) -> Result<(), Error> {
        let Some(fd) = self.fd(zone) else {
            return Err(Error::EmulatedNeedsStaging);
        };
        // SAFETY: frees pages of our own memfd; nothing maps them anymore.
        let r = unsafe {
            libc::fallocate(
                fd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                range.start.0 as libc::off_t,
                range.len() as libc::off_t,
            )
        };
        if r != 0 {
            return Err(os("fallocate(PUNCH_HOLE) of a range of guest RAM's memfd"));
        }
        Ok(())
    }
}

/// Whether [`mbind`] moves pages already placed elsewhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExistingPages {
    Stay,
    Move,
}

const MPOL_MF_STRICT: u32 = 1 << 0;
const MPOL_MF_MOVE: u32 = 1 << 1;

/// mbind(2) of the host range [addr, addr+len) to `nodes`.
pub fn mbind(
    addr: u64,
    len: u64,
    policy: Policy,
    nodes: &[u16],
    existing: ExistingPages,
) -> Result<(), Error> {
    let mode = match policy {
        Policy::Bind => libc::MPOL_BIND,
        Policy::Preferred => libc::MPOL_PREFERRED,
        Policy::Interleave => libc::MPOL_INTERLEAVE,
    };
    let mut mask = [0u64; 16];
    for &n in nodes {
        let i = n as usize;
        if i >= mask.len() * 64 {
            return Err(Error::NodeBeyondMbind { node: n });
        }
        mask[i / 64] |= 1 << (i % 64);
    }
    let flags = match existing {
        ExistingPages::Stay => 0,
        ExistingPages::Move => MPOL_MF_MOVE | MPOL_MF_STRICT,
    };
    // SAFETY: mbind reads the nodemask (maxnode bits) we own and changes policy of our own
    // mapping; it does not touch memory contents.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr,
            len,
            mode,
            mask.as_ptr(),
            (mask.len() * 64) as u64,
            flags,
        )
    };
    if r != 0 {
        let source = std::io::Error::last_os_error();
        let max = host_nodes().iter().max().copied().unwrap_or(0);
        return Err(Error::Mbind {
            len,
            nodes: nodes.to_vec(),
            source,
            host_max: nodes.iter().any(|&n| u32::from(n) > max).then_some(max),
        });
    }
    Ok(())
}

/// The node each page at `addrs` is on (move_pages(2) query); negative values are -errno
/// (e.g. -ENOENT for a page not present).
pub fn page_nodes(addrs: &[u64]) -> Result<Vec<i32>, Error> {
    let mut status = vec![0i32; addrs.len()];
    // SAFETY: query mode (nodes = NULL): the kernel reads `addrs` and writes `status`,
    // both ours and of the same length.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            0,
            addrs.len() as u64,
            addrs.as_ptr(),
            std::ptr::null::<i32>(),
            status.as_mut_ptr(),
            0,
        )
    };
    if r != 0 {
        return Err(Error::MovePages {
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(status)
}

/// The host's online nodes.
pub fn host_nodes() -> Vec<u32> {
    crate::host::HostPaths::default().numa_nodes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_syscalls_on_this_host() {
        // SAFETY: test: a private anonymous mapping of 2 pages.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                8192,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let a = p as u64;
        mbind(a, 8192, Policy::Bind, &[0], ExistingPages::Move).unwrap();
        // SAFETY: test: touch the first page.
        unsafe { std::ptr::write_volatile(p as *mut u64, 1) };
        let st = page_nodes(&[a, a + 4096]).unwrap();
        assert_eq!(st[0], 0, "touched page on node 0");
        assert_eq!(st[1], -libc::ENOENT, "untouched page not present");
        let nodes = host_nodes();
        let absent = nodes.iter().max().copied().unwrap_or(0) as u16 + 1;
        let e = mbind(a, 8192, Policy::Bind, &[absent], ExistingPages::Move)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("node(s) [{absent}]")) && e.contains("emulated"),
            "{e}"
        );
        // SAFETY: test: unmap our mapping.
        unsafe { libc::munmap(p, 8192) };
    }
}
