//! Guest RAM backings and their views.
//!
//! File-backed RAM (shmem and hugetlb memfds) is mapped twice, `MAP_SHARED`:
//! - the **guest view**, which KVM's memslot points at (and, later, the only view
//!   registered with userfaultfd), and
//! - the **staging view**, through which the VMM reads and writes guest memory without
//!   taking guest faults.
//!
//! Anonymous RAM has one private mapping that serves as both.
//!
//! memfds and mappings are made with raw `libc` calls: vm-memory maps files but does not
//! create memfds, and its file mappings use MAP_NORESERVE, which for hugetlb would turn a
//! short pool into a SIGBUS at first touch instead of an error at start-up.

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::str::FromStr;

use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::error::{os, Error};
use crate::host::HostPaths;
use crate::numa::{self, ExistingPages, NodeBackendKind, NumaLayout, Policy};
use crate::size::format_size;

/// Smallest guest RAM: the image and its tables occupy the first 4 MiB.
pub const MIN_RAM: u64 = 8 << 20;
/// Largest guest RAM: what the guest image's page-table area maps.
pub const MAX_RAM: u64 = 64 << 30;

/// Most guest NUMA nodes supported.
pub const MAX_NODES: u16 = 8;
const SIZE_2M: u64 = 2 << 20;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub enum BackingKind {
    /// memfd on shmem (tmpfs) with 4 KiB pages. The default.
    #[default]
    #[serde(rename = "shmem")]
    Shmem,
    /// memfd with MFD_HUGETLB, 2 MiB pages from the hugetlb pool.
    #[serde(rename = "hugetlb-2m")]
    Hugetlb2M,
    /// memfd with MFD_HUGETLB, 1 GiB pages from the hugetlb pool.
    #[serde(rename = "hugetlb-1g")]
    Hugetlb1G,
    /// Private anonymous memory (one view); thp optional.
    #[serde(rename = "anon")]
    Anon,
}

impl BackingKind {
    pub const ALL: [BackingKind; 4] = [
        BackingKind::Shmem,
        BackingKind::Hugetlb2M,
        BackingKind::Hugetlb1G,
        BackingKind::Anon,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BackingKind::Shmem => "shmem",
            BackingKind::Hugetlb2M => "hugetlb-2m",
            BackingKind::Hugetlb1G => "hugetlb-1g",
            BackingKind::Anon => "anon",
        }
    }

    /// The backing page size: what the host maps guest RAM with (before any thp).
    pub fn page_size(self) -> u64 {
        match self {
            BackingKind::Shmem | BackingKind::Anon => 4 << 10,
            BackingKind::Hugetlb2M => 2 << 20,
            BackingKind::Hugetlb1G => 1 << 30,
        }
    }

    pub fn view_layout(self) -> ViewLayout {
        match self {
            BackingKind::Anon => ViewLayout::SingleView,
            _ => ViewLayout::GuestAndStaging,
        }
    }

    fn hugetlb_page(self) -> Option<u64> {
        match self {
            BackingKind::Hugetlb2M | BackingKind::Hugetlb1G => Some(self.page_size()),
            _ => None,
        }
    }

    fn memfd_flags(self) -> Option<libc::c_uint> {
        match self {
            BackingKind::Shmem => Some(libc::MFD_CLOEXEC),
            BackingKind::Hugetlb2M => {
                Some(libc::MFD_CLOEXEC | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB)
            }
            BackingKind::Hugetlb1G => {
                Some(libc::MFD_CLOEXEC | libc::MFD_HUGETLB | libc::MFD_HUGE_1GB)
            }
            BackingKind::Anon => None,
        }
    }
}

impl fmt::Display for BackingKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BackingKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        BackingKind::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| Error::UnknownBacking(s.to_string()))
    }
}

/// Transparent huge pages for the anon backing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ThpMode {
    /// MADV_NOHUGEPAGE: 4 KiB pages whatever the host default.
    #[default]
    Off,
    /// MADV_HUGEPAGE.
    Madvise,
}

/// Whether guest RAM is populated before the guest runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Prefault {
    #[default]
    No,
    /// MADV_POPULATE_WRITE over the guest view.
    Populate,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViewLayout {
    /// File-backed: a guest view and a separate staging view of the same memfd.
    GuestAndStaging,
    /// Anonymous: one view serves the guest and the VMM.
    SingleView,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RamConfig {
    pub size: u64,
    pub backing: BackingKind,
    pub thp: ThpMode,
    pub prefault: Prefault,
    /// Where host facts are read (tests point this at a fake tree).
    pub host: HostPaths,
    /// Guest NUMA nodes and how they are backed.
    pub numa: NumaLayout,
}

impl RamConfig {
    /// The checks that need no host state: size range and alignment, option combinations.
    pub fn check_shape(&self) -> Result<(), Error> {
        let page = self.backing.page_size();
        if self.size < MIN_RAM {
            return Err(Error::TooSmall {
                size: format_size(self.size),
                min: format_size(MIN_RAM),
            });
        }
        if self.size > MAX_RAM {
            return Err(Error::TooLarge {
                size: format_size(self.size),
                max: format_size(MAX_RAM),
            });
        }
        if !self.size.is_multiple_of(page) {
            let below = self.size / page * page;
            let above = below + page;
            let nearest = if below >= MIN_RAM {
                format!("{} or {}", format_size(below), format_size(above))
            } else {
                format_size(above)
            };
            return Err(Error::Unaligned {
                size: format_size(self.size),
                backing: self.backing.to_string(),
                page: format_size(page),
                nearest,
            });
        }
        if self.numa.nodes == 0 || self.numa.nodes > MAX_NODES {
            return Err(Error::Numa(format!(
                "{} guest NUMA nodes: 1 to {MAX_NODES} are supported",
                self.numa.nodes
            )));
        }
        if self.numa.nodes > 1 {
            if !self.size.is_multiple_of(SIZE_2M) || self.size < self.numa.nodes as u64 * SIZE_2M {
                return Err(Error::Numa(format!(
                    "guest memory of {} cannot be split into 2 MiB regions over {} nodes",
                    format_size(self.size),
                    self.numa.nodes
                )));
            }
            if self.numa.backend == NodeBackendKind::Emulated && self.backing != BackingKind::Shmem
            {
                return Err(Error::Numa(format!(
                    "emulated NUMA nodes need the shmem backing (each node is its own memfd, sparse); {} is not supported",
                    self.backing
                )));
            }
        }
        if self.thp == ThpMode::Madvise && self.backing != BackingKind::Anon {
            return Err(Error::ThpNotApplicable {
                backing: self.backing.to_string(),
                why: if self.backing.hugetlb_page().is_some() {
                    "already backed by hugetlb pages"
                } else {
                    "shmem, whose thp is the host's shmem_enabled setting"
                },
            });
        }
        Ok(())
    }

    /// Every check, including host resources (hugetlb pool, MemAvailable, host nodes).
    /// No side effects.
    pub fn validate(&self) -> Result<(), Error> {
        self.check_shape()?;
        if self.numa.backend == NodeBackendKind::Host {
            let host = self.host.numa_nodes();
            if let Some(missing) = (0..self.numa.nodes as u32).find(|n| !host.contains(n)) {
                return Err(Error::Numa(format!(
                    "guest node {missing} has no host node to bind to (host nodes: {host:?}); use --numa nodes={},backend=emulated",
                    self.numa.nodes
                )));
            }
        }
        match self.backing.hugetlb_page() {
            Some(page) => {
                let dir = self.host.hugetlb_dir(page);
                let pool = self
                    .host
                    .hugetlb_pool(page)
                    .ok_or_else(|| Error::NoHugetlbPool {
                        page: format_size(page),
                        dir: dir.display().to_string(),
                        page_arg: if page == 1 << 30 {
                            "1G".into()
                        } else {
                            "2M".into()
                        },
                    })?;
                let needed = self.size / page;
                if pool.available() < needed {
                    return Err(Error::HugetlbPoolTooSmall {
                        page: format_size(page),
                        free: pool.available(),
                        needed,
                        total: pool.nr + (needed - pool.available()),
                        dir: dir.display().to_string(),
                    });
                }
            }
            None => {
                if let Some(avail) = self.host.mem_available() {
                    if self.size > avail {
                        return Err(Error::NotEnoughMemory {
                            size: format_size(self.size),
                            available: format_size(avail / (1 << 20) * (1 << 20)),
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

/// Alignment of every guest RAM view (see `Mapping::new`).
const HUGE_ALIGN: usize = 2 << 20;

/// An mmap this crate owns; unmapped on drop.
struct Mapping {
    addr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(
        len: usize,
        prot: libc::c_int,
        flags: libc::c_int,
        fd: Option<BorrowedFd<'_>>,
        align: usize,
    ) -> Result<Self, Error> {
        let raw_fd = fd.map(|f| f.as_raw_fd()).unwrap_or(-1);
        // A view starts on an `align` boundary (2 MiB, or the hugetlb page size), as
        // file offset 0 does: the kernel maps a huge page only
        // where virtual address and file offset agree modulo its size, so an unaligned
        // view could never be PMD-mapped or collapsed. Reserve len + 2 MiB of address
        // space, place the view at the first boundary inside, return the slack.
        // SAFETY: a fresh PROT_NONE reservation at a kernel-chosen address.
        let reserve = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len + align,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if reserve == libc::MAP_FAILED {
            return Err(os("mmap (address space for a guest RAM view)"));
        }
        let start = reserve as usize;
        let aligned = start.next_multiple_of(align);
        // SAFETY: [aligned, aligned + len) lies inside the reservation made above, which
        // this function owns; MAP_FIXED replaces only that part of it.
        let addr = unsafe {
            libc::mmap(
                aligned as *mut libc::c_void,
                len,
                prot,
                flags | libc::MAP_FIXED,
                raw_fd,
                0,
            )
        };
        let failed = addr == libc::MAP_FAILED;
        let err = failed.then(|| os("mmap"));
        // SAFETY: the head [start, aligned) and tail [aligned + len, start + len + align)
        // are the unused parts of our own reservation (on failure, all of it is).
        unsafe {
            if failed {
                libc::munmap(reserve, len + align);
            } else {
                if aligned > start {
                    libc::munmap(reserve, aligned - start);
                }
                let end = aligned + len;
                let tail = start + len + align - end;
                if tail > 0 {
                    libc::munmap(end as *mut libc::c_void, tail);
                }
            }
        }
        if let Some(e) = err {
            return Err(e);
        }
        Ok(Mapping {
            addr: addr.cast(),
            len,
        })
    }

    fn madvise(&self, advice: libc::c_int, op: &'static str) -> Result<(), Error> {
        // SAFETY: the range is exactly this live mapping; the advice values used here
        // (HUGEPAGE, NOHUGEPAGE, POPULATE_WRITE) do not discard data.
        if unsafe { libc::madvise(self.addr.cast(), self.len, advice) } != 0 {
            return Err(os(op));
        }
        Ok(())
    }
}

impl Mapping {
    /// Allocates every page of the mapping for writing. MADV_POPULATE_WRITE (Linux 5.14)
    /// first; on EINVAL (an older kernel that does not know the advice) one byte of each
    /// `page`-sized page is written instead. Only used on freshly made, zero-filled views.
    fn populate_write(&self, page: u64) -> Result<(), Error> {
        // SAFETY: the range is exactly this live mapping; POPULATE_WRITE only faults pages
        // in (as a write would) and does not change their content.
        if unsafe { libc::madvise(self.addr.cast(), self.len, libc::MADV_POPULATE_WRITE) } == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINVAL) {
            return Err(Error::Os {
                op: "madvise(MADV_POPULATE_WRITE)",
                source: err,
            });
        }
        let step = usize::try_from(page).unwrap_or(4096).max(1);
        for off in (0..self.len).step_by(step) {
            // SAFETY: off < len, so the byte lies inside this live read/write mapping;
            // writing back the value just read leaves the content unchanged.
            unsafe {
                let p = self.addr.add(off);
                std::ptr::write_volatile(p, std::ptr::read_volatile(p));
            }
        }
        Ok(())
    }

    /// Replaces [off, off+len) of this mapping with `fd` at `file_off` (same address).
    fn remap(&self, off: u64, len: u64, fd: BorrowedFd<'_>, file_off: u64) -> Result<(), Error> {
        if off + len > self.len as u64 {
            return Err(Error::Numa(format!(
                "remap of [{off:#x}, +{len:#x}) outside the view"
            )));
        }
        // SAFETY: MAP_FIXED over a part of our own mapping (checked to be inside it) with
        // the same protection; the address range stays mapped throughout.
        let addr = unsafe {
            libc::mmap(
                self.addr.add(off as usize).cast(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd.as_raw_fd(),
                file_off as libc::off_t,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(os("mmap(MAP_FIXED) for a NUMA move"));
        }
        Ok(())
    }
}

// SAFETY: a Mapping is an address range in this process's address space, valid until
// Drop; the pointer is never dereferenced by Mapping itself. Guest memory behind it is
// accessed through vm-memory's volatile accessors or by KVM, both usable from any thread.
unsafe impl Send for Mapping {}
// SAFETY: as above; &Mapping only hands out the address and issues madvise/mmap calls on
// its own range, which the kernel serialises.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: addr/len are a mapping made by Mapping::new and unmapped only here.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

/// Guest RAM: one backing, its views, and the vm-memory object over the staging view.
///
/// Field order is drop order: the vm-memory object (which does not own its mapping)
/// goes before the mappings, the mappings before the memfd.
pub struct GuestRam {
    staging: GuestMemoryMmap,
    staging_view: Option<Mapping>,
    guest_view: Mapping,
    memfd: Option<OwnedFd>,
    /// Emulated NUMA: the memfd of each node > 0 (node 0's is `memfd`).
    node_memfds: Vec<OwnedFd>,
    /// Node of each 2 MiB region.
    region_nodes: std::sync::Mutex<Vec<u16>>,
    numa: NumaLayout,
    backing: BackingKind,
    size: u64,
}

impl GuestRam {
    /// Validates `cfg` against the host, then creates the backing and its views. On error
    /// nothing is left behind (every step's resources are owned and dropped).
    pub fn create(cfg: &RamConfig) -> Result<GuestRam, Error> {
        cfg.validate()?;
        let len = usize::try_from(cfg.size).map_err(|_| Error::TooLarge {
            size: format_size(cfg.size),
            max: format_size(MAX_RAM),
        })?;
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let align = (cfg.backing.page_size() as usize).max(HUGE_ALIGN);
        let (memfd, guest_view, staging_view) = match cfg.backing.memfd_flags() {
            Some(flags) => {
                let fd = create_memfd(flags, cfg.size)?;
                let guest = Mapping::new(len, rw, libc::MAP_SHARED, Some(fd.as_fd()), align)
                    .map_err(|e| hugetlb_mmap_error(cfg, e))?;
                let staging = Mapping::new(len, rw, libc::MAP_SHARED, Some(fd.as_fd()), align)?;
                (Some(fd), guest, Some(staging))
            }
            None => {
                let m = Mapping::new(
                    len,
                    rw,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    None,
                    align,
                )?;
                match cfg.thp {
                    ThpMode::Madvise => m.madvise(libc::MADV_HUGEPAGE, "madvise(MADV_HUGEPAGE)")?,
                    ThpMode::Off => m.madvise(libc::MADV_NOHUGEPAGE, "madvise(MADV_NOHUGEPAGE)")?,
                }
                (None, m, None)
            }
        };
        // Emulated NUMA nodes need every page allocated (see move_emulated).
        let emulated_numa = cfg.numa.nodes > 1 && cfg.numa.backend == NodeBackendKind::Emulated;
        if cfg.prefault == Prefault::Populate || emulated_numa {
            guest_view.populate_write(cfg.backing.page_size())?;
        }
        let (view, flags) = match &staging_view {
            Some(s) => (s, libc::MAP_SHARED),
            None => (&guest_view, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS),
        };
        // SAFETY: `view` is a live read/write mapping of `len` bytes made above with these
        // prot/flags; GuestRam keeps it mapped until after `staging` is dropped.
        let region = unsafe { MmapRegion::<()>::build_raw(view.addr, len, rw, flags) }
            .map_err(|e| Error::VmMemory(e.to_string()))?;
        let region = GuestRegionMmap::new(region, GuestAddress(0))
            .ok_or_else(|| Error::VmMemory("guest region overflows".into()))?;
        let staging = GuestMemoryMmap::from_regions(vec![region])
            .map_err(|e| Error::VmMemory(e.to_string()))?;
        let mut node_memfds = Vec::new();
        if cfg.numa.nodes > 1 && cfg.numa.backend == NodeBackendKind::Emulated {
            for _ in 1..cfg.numa.nodes {
                node_memfds.push(create_memfd(libc::MFD_CLOEXEC, cfg.size)?);
            }
        }
        let ram = GuestRam {
            staging,
            staging_view,
            guest_view,
            memfd,
            node_memfds,
            region_nodes: std::sync::Mutex::new(vec![0; cfg.size.div_ceil(SIZE_2M) as usize]),
            numa: cfg.numa,
            backing: cfg.backing,
            size: cfg.size,
        };
        if cfg.numa.backend == NodeBackendKind::Host {
            numa::mbind(
                ram.staging_view_addr() as u64,
                ram.size,
                Policy::Bind,
                &[0],
                ExistingPages::Move,
            )?;
        }
        Ok(ram)
    }

    pub fn numa(&self) -> NumaLayout {
        self.numa
    }

    /// The node of the 2 MiB region holding `gpa`.
    pub fn node_of(&self, gpa: u64) -> u16 {
        let nodes = self.region_nodes.lock().unwrap_or_else(|e| e.into_inner());
        nodes.get((gpa / SIZE_2M) as usize).copied().unwrap_or(0)
    }

    /// The node of every 2 MiB region.
    pub fn region_nodes(&self) -> Vec<u16> {
        self.region_nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn zone_fd(&self, node: u16) -> Option<BorrowedFd<'_>> {
        match node {
            0 => self.memfd(),
            n => self.node_memfds.get(n as usize - 1).map(|f| f.as_fd()),
        }
    }

    /// Moves the 2 MiB-aligned range [gpa, gpa+len) to `node`.
    ///
    /// The caller must have invalidated the range first (mmu notifier start: the guest
    /// view no longer maps it, so no vCPU write can land in the old copy while it is
    /// copied — seed 002) and must not write it through the staging view meanwhile.
    /// Emulated nodes: the content is copied into the node's memfd at the same offset,
    /// both views are remapped there in place, and the old copy is punched out. A
    /// remapped guest view loses its userfaultfd registration: re-register it.
    /// Host nodes: mbind(MPOL_MF_MOVE) of the staging view.
    pub fn move_region(&self, gpa: u64, len: u64, node: u16) -> Result<(), Error> {
        if !gpa.is_multiple_of(SIZE_2M) || !len.is_multiple_of(SIZE_2M) || gpa + len > self.size {
            return Err(Error::Numa(format!(
                "move of [{gpa:#x}, +{len:#x}) is not 2 MiB regions of guest RAM"
            )));
        }
        if node >= self.numa.nodes {
            return Err(Error::Numa(format!(
                "node {node} does not exist (the guest has {})",
                self.numa.nodes
            )));
        }
        let mut nodes = self.region_nodes.lock().unwrap_or_else(|e| e.into_inner());
        for r in (gpa / SIZE_2M)..((gpa + len) / SIZE_2M) {
            let from = nodes[r as usize];
            if from == node {
                continue;
            }
            let off = r * SIZE_2M;
            match self.numa.backend {
                NodeBackendKind::Host => numa::mbind(
                    self.staging_view_addr() as u64 + off,
                    SIZE_2M,
                    self.numa.policy,
                    &[node],
                    ExistingPages::Move,
                )?,
                NodeBackendKind::Emulated => self.move_emulated(off, from, node)?,
            }
            nodes[r as usize] = node;
        }
        Ok(())
    }

    fn move_emulated(&self, off: u64, from: u16, to: u16) -> Result<(), Error> {
        let (Some(src), Some(dst), Some(staging)) = (
            self.zone_fd(from),
            self.zone_fd(to),
            self.staging_view.as_ref(),
        ) else {
            return Err(Error::Numa(
                "emulated nodes need file-backed RAM with a staging view".into(),
            ));
        };
        // Copy the whole region, holes included, so that every page of guest RAM stays
        // allocated in its node's memfd. The guest view is registered MINOR only, which
        // does not guard holes (a first touch of a hole is zero-filled without an event,
        // host-facts.md): a hole in the old copy would let a vCPU's first write land
        // there during the move, and be lost (measured: verify found zeroed pages).
        let mut at = off;
        while at < off + SIZE_2M {
            // SAFETY: reads [at, off+2M) of the staging view (inside it: off+2M <= size)
            // and writes it to the destination memfd at the same offset.
            let n = unsafe {
                libc::pwrite(
                    dst.as_raw_fd(),
                    staging.addr.add(at as usize).cast(),
                    (off + SIZE_2M - at) as usize,
                    at as libc::off_t,
                )
            };
            if n <= 0 {
                return Err(os("pwrite into the destination node"));
            }
            at += n as u64;
        }
        self.guest_view.remap(off, SIZE_2M, dst, off)?;
        staging.remap(off, SIZE_2M, dst, off)?;
        // SAFETY: frees the old copy's pages in our own memfd; nothing maps them anymore.
        let r = unsafe {
            libc::fallocate(
                src.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off as libc::off_t,
                SIZE_2M as libc::off_t,
            )
        };
        if r != 0 {
            return Err(os("fallocate(PUNCH_HOLE) of the old node's copy"));
        }
        Ok(())
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn backing(&self) -> BackingKind {
        self.backing
    }

    pub fn page_size(&self) -> u64 {
        self.backing.page_size()
    }

    pub fn view_layout(&self) -> ViewLayout {
        self.backing.view_layout()
    }

    /// Host address of the guest view (the KVM memslot's userspace_addr).
    pub fn guest_view_addr(&self) -> *mut u8 {
        self.guest_view.addr
    }

    /// Host address of the staging view (the guest view for anon).
    pub fn staging_view_addr(&self) -> *mut u8 {
        self.staging_view.as_ref().unwrap_or(&self.guest_view).addr
    }

    /// The VMM's access to guest memory: vm-memory over the staging view.
    pub fn staging(&self) -> &GuestMemoryMmap {
        &self.staging
    }

    pub fn memfd(&self) -> Option<BorrowedFd<'_>> {
        self.memfd.as_ref().map(|f| f.as_fd())
    }

    /// Bytes of the guest view that are mapped in this process right now: `Rss` (4 KiB
    /// and thp pages) plus `Shared_Hugetlb` and `Private_Hugetlb` (hugetlb pages, which
    /// smaps leaves out of `Rss`) over the guest view's VMAs in /proc/self/smaps.
    /// For anon this is the whole RAM's footprint (one view).
    pub fn guest_view_rss_bytes(&self) -> Result<u64, Error> {
        self.guest_view_smaps_sum(&["Rss", "Shared_Hugetlb", "Private_Hugetlb"])
    }

    /// Bytes of the guest view the kernel maps with PMDs right now: `AnonHugePages` +
    /// `ShmemPmdMapped` + `FilePmdMapped` of its VMAs (hugetlb is not counted there: it is
    /// huge by construction). What collapse achieved, by the kernel's count.
    pub fn guest_view_pmd_mapped_bytes(&self) -> Result<u64, Error> {
        self.guest_view_smaps_sum(&["AnonHugePages", "ShmemPmdMapped", "FilePmdMapped"])
    }

    fn guest_view_smaps_sum(&self, fields: &[&str]) -> Result<u64, Error> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").map_err(|source| Error::Os {
            op: "reading /proc/self/smaps",
            source,
        })?;
        let start = self.guest_view.addr as u64;
        Ok(smaps_sum(&smaps, start, start + self.size, fields))
    }

    /// Host VA ranges [start, end) of every view (for accounting).
    pub fn host_ranges(&self) -> Vec<(u64, u64)> {
        let mut v = vec![(
            self.guest_view.addr as u64,
            self.guest_view.addr as u64 + self.size,
        )];
        if let Some(s) = &self.staging_view {
            v.push((s.addr as u64, s.addr as u64 + self.size));
        }
        v
    }
}

/// Sum of `fields` (kB values) over every smaps VMA overlapping [start, end), in bytes.
fn smaps_sum(smaps: &str, start: u64, end: u64, fields: &[&str]) -> u64 {
    let mut inside = false;
    let mut total_kib = 0;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                inside = a < end && b > start;
                continue;
            }
        }
        if !inside {
            continue;
        }
        if let Some((key, rest)) = line.split_once(':') {
            if fields.contains(&key) {
                let kib = rest.trim().trim_end_matches("kB").trim();
                total_kib += kib.parse::<u64>().unwrap_or(0);
            }
        }
    }
    total_kib << 10
}

fn create_memfd(flags: libc::c_uint, size: u64) -> Result<OwnedFd, Error> {
    // SAFETY: the name is a valid NUL-terminated string; memfd_create returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"hugevisor-guest-ram".as_ptr(), flags) };
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

/// A hugetlb guest-view mmap reserves the pool's pages; ENOMEM there means the pool
/// shrank after validation (another process took pages). Say so with the fix.
fn hugetlb_mmap_error(cfg: &RamConfig, e: Error) -> Error {
    match (&e, cfg.backing.hugetlb_page()) {
        (Error::Os { source, .. }, Some(_)) if source.raw_os_error() == Some(libc::ENOMEM) => {
            cfg.validate().err().unwrap_or(e)
        }
        _ => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn env_is_1(name: &str) -> bool {
        std::env::var(name).is_ok_and(|v| v == "1")
    }

    /// Whether the host's hugetlb pool of `page` bytes has `pages` pages a new mapping
    /// can reserve. With HUGEVISOR_TEST_RESERVE=1 a short pool is grown (and left grown);
    /// otherwise the caller skips, which panics under HUGEVISOR_REQUIRE_HOST=1.
    fn pool_ok(page: u64, pages: u64) -> bool {
        let host = HostPaths::default();
        let available = |h: &HostPaths| h.hugetlb_pool(page).map(|p| p.available());
        if available(&host).is_some_and(|a| a >= pages) {
            return true;
        }
        if env_is_1("HUGEVISOR_TEST_RESERVE") {
            if let Some(pool) = host.hugetlb_pool(page) {
                let want = pool.nr + (pages - pool.available());
                let file = host.hugetlb_dir(page).join("nr_hugepages");
                if let Err(e) = std::fs::write(&file, format!("{want}\n")) {
                    eprintln!("could not write {want} to {}: {e}", file.display());
                }
                if available(&host).is_some_and(|a| a >= pages) {
                    eprintln!(
                        "reserved: {} hugetlb pool grown to {want} pages",
                        format_size(page)
                    );
                    return true;
                }
            }
        }
        let have = match available(&host) {
            Some(a) => format!("has {a} pages available, {pages} needed"),
            None => "does not exist on this host".to_string(),
        };
        let why = format!(
            "the {} hugetlb pool {have} (set HUGEVISOR_TEST_RESERVE=1 to let the test reserve them)",
            format_size(page)
        );
        assert!(
            !env_is_1("HUGEVISOR_REQUIRE_HOST"),
            "HUGEVISOR_REQUIRE_HOST=1: {why}"
        );
        eprintln!("SKIP: {why}");
        false
    }

    fn cfg(size: u64, backing: BackingKind) -> RamConfig {
        RamConfig {
            size,
            backing,
            ..Default::default()
        }
    }

    #[test]
    fn staging_writes_are_seen_through_the_guest_view() {
        for (backing, size) in [
            (BackingKind::Shmem, 16 << 20),
            (BackingKind::Anon, 16 << 20),
            (BackingKind::Hugetlb2M, 16 << 20),
            (BackingKind::Hugetlb1G, 1 << 30),
        ] {
            if let Some(page) = backing.hugetlb_page() {
                if !pool_ok(page, size / page) {
                    continue;
                }
            }
            let ram = GuestRam::create(&cfg(size, backing)).unwrap();
            assert_eq!(ram.size(), size);
            ram.staging()
                .write_obj(0xfeed_u64, GuestAddress(size - 8))
                .unwrap();
            // SAFETY: test: the guest view maps `size` bytes; reading the last u64.
            let v = unsafe {
                std::ptr::read_volatile(ram.guest_view_addr().add(size as usize - 8).cast::<u64>())
            };
            assert_eq!(v, 0xfeed, "{backing}");
            assert_eq!(
                ram.view_layout() == ViewLayout::SingleView,
                backing == BackingKind::Anon
            );
            assert_eq!(ram.memfd().is_some(), backing != BackingKind::Anon);
        }
    }

    #[test]
    fn emulated_numa_move_keeps_content_and_frees_the_old_copy() {
        let c = RamConfig {
            size: 16 << 20,
            backing: BackingKind::Shmem,
            numa: NumaLayout {
                nodes: 2,
                backend: NodeBackendKind::Emulated,
                ..Default::default()
            },
            ..Default::default()
        };
        let ram = GuestRam::create(&c).unwrap();
        let gpa = 4 << 20;
        ram.staging()
            .write_obj(0xbeef_u64, GuestAddress(gpa + 4096))
            .unwrap();
        assert_eq!(ram.node_of(gpa), 0);
        ram.move_region(gpa, 2 << 20, 1).unwrap();
        assert_eq!(ram.node_of(gpa), 1);
        assert_eq!(ram.node_of(gpa + (2 << 20)), 0);
        assert_eq!(
            ram.staging()
                .read_obj::<u64>(GuestAddress(gpa + 4096))
                .unwrap(),
            0xbeef
        );
        // SAFETY: test: reading inside the 16 MiB guest view.
        let v = unsafe {
            std::ptr::read_volatile(ram.guest_view_addr().add(gpa as usize + 4096).cast::<u64>())
        };
        assert_eq!(v, 0xbeef, "the guest view follows the move");
        // The data now lives in node 1's memfd; node 0's copy is a hole.
        let node1 = ram.zone_fd(1).unwrap();
        let mut buf = [0u8; 8];
        // SAFETY: test: pread into a local buffer from our memfd.
        let n = unsafe {
            libc::pread(
                node1.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                8,
                (gpa + 4096) as i64,
            )
        };
        assert_eq!(n, 8);
        assert_eq!(u64::from_le_bytes(buf), 0xbeef);
        let node0 = ram.zone_fd(0).unwrap();
        // SAFETY: test: lseek on our memfd.
        let data = unsafe { libc::lseek(node0.as_raw_fd(), gpa as i64, libc::SEEK_DATA) };
        assert!(
            data < 0 || data as u64 >= gpa + (2 << 20),
            "old copy punched out"
        );
        // Writes through the staging view land on the new node too, and a move back works.
        ram.staging()
            .write_obj(0xcafe_u64, GuestAddress(gpa))
            .unwrap();
        ram.move_region(gpa, 2 << 20, 0).unwrap();
        assert_eq!(
            ram.staging().read_obj::<u64>(GuestAddress(gpa)).unwrap(),
            0xcafe
        );
        assert_eq!(
            ram.staging()
                .read_obj::<u64>(GuestAddress(gpa + 4096))
                .unwrap(),
            0xbeef
        );
        assert!(ram
            .move_region(gpa, 2 << 20, 2)
            .unwrap_err()
            .to_string()
            .contains("node 2"));
        assert!(ram.move_region(gpa + 4096, 2 << 20, 1).is_err());
        // Emulated nodes need shmem; host nodes must exist.
        let bad = RamConfig {
            backing: BackingKind::Anon,
            ..c.clone()
        };
        assert!(bad.check_shape().unwrap_err().to_string().contains("shmem"));
        let host = RamConfig {
            numa: NumaLayout {
                nodes: 2,
                backend: NodeBackendKind::Host,
                ..Default::default()
            },
            ..c
        };
        let e = host.validate().unwrap_err().to_string();
        assert!(
            e.contains("guest node 1 has no host node") && e.contains("backend=emulated"),
            "{e}"
        );
    }

    #[test]
    fn prefault_and_thp() {
        let mut c = cfg(16 << 20, BackingKind::Anon);
        c.thp = ThpMode::Madvise;
        c.prefault = Prefault::Populate;
        let ram = GuestRam::create(&c).unwrap();
        assert_eq!(ram.staging().read_obj::<u64>(GuestAddress(0)).unwrap(), 0);
        c.backing = BackingKind::Shmem;
        assert!(matches!(c.validate(), Err(Error::ThpNotApplicable { .. })));
    }

    #[test]
    fn shape_errors() {
        assert!(matches!(
            cfg(4 << 20, BackingKind::Shmem).check_shape(),
            Err(Error::TooSmall { .. })
        ));
        assert!(matches!(
            cfg(128 << 30, BackingKind::Shmem).check_shape(),
            Err(Error::TooLarge { .. })
        ));
        let e = cfg(512 << 20, BackingKind::Hugetlb1G)
            .check_shape()
            .unwrap_err()
            .to_string();
        assert!(e.contains("1 GiB"), "{e}");
        let e = cfg((16 << 20) + 4096, BackingKind::Hugetlb2M)
            .check_shape()
            .unwrap_err()
            .to_string();
        assert!(e.contains("16 MiB") && e.contains("18 MiB"), "{e}");
        assert_eq!(
            "hugetlb-2m".parse::<BackingKind>().unwrap(),
            BackingKind::Hugetlb2M
        );
        assert!("tmpfs"
            .parse::<BackingKind>()
            .unwrap_err()
            .to_string()
            .contains("shmem"));
    }

    /// A fake /proc + /sys tree in a fresh temporary directory, removed on drop.
    struct FakeHost {
        root: std::path::PathBuf,
        paths: HostPaths,
    }

    impl FakeHost {
        fn new() -> FakeHost {
            static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let root =
                std::env::temp_dir().join(format!("guest-mm-fake-host-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(root.join("proc")).unwrap();
            std::fs::create_dir_all(root.join("sys/kernel/mm/hugepages")).unwrap();
            let paths = HostPaths {
                proc_root: root.join("proc"),
                sys_root: root.join("sys"),
            };
            FakeHost { root, paths }
        }

        fn pool(self, kib: u64, nr: u64, free: u64, resv: u64) -> FakeHost {
            let dir = self
                .paths
                .sys_root
                .join(format!("kernel/mm/hugepages/hugepages-{kib}kB"));
            std::fs::create_dir_all(&dir).unwrap();
            for (f, v) in [
                ("nr_hugepages", nr),
                ("free_hugepages", free),
                ("resv_hugepages", resv),
                ("surplus_hugepages", 0),
            ] {
                std::fs::write(dir.join(f), format!("{v}\n")).unwrap();
            }
            self
        }

        fn mem_available_kib(self, kib: u64) -> FakeHost {
            std::fs::write(
                self.paths.proc_root.join("meminfo"),
                format!("MemTotal:       25165824 kB\nMemFree: 1 kB\nMemAvailable:   {kib} kB\n"),
            )
            .unwrap();
            self
        }
    }

    impl Drop for FakeHost {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    #[test]
    fn pool_too_small_names_the_fix() {
        let fake = FakeHost::new()
            .pool(2048, 10, 10, 0)
            .mem_available_kib(1 << 30);
        let c = RamConfig {
            size: 64 << 20,
            backing: BackingKind::Hugetlb2M,
            host: fake.paths.clone(),
            ..Default::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("echo 32 > ") && e.contains("hugepages-2048kB/nr_hugepages"),
            "{e}"
        );
        assert!(e.contains("10 free") && e.contains("32 are needed"), "{e}");
        // Nothing is created when validation fails.
        assert!(matches!(
            GuestRam::create(&c),
            Err(Error::HugetlbPoolTooSmall { .. })
        ));
        let c1g = RamConfig {
            backing: BackingKind::Hugetlb1G,
            size: 1 << 30,
            ..c
        };
        let e = c1g.validate().unwrap_err().to_string();
        assert!(
            e.contains("no 1 GiB hugetlb pool") && e.contains("hugepagesz=1G"),
            "{e}"
        );
    }

    #[test]
    fn reserved_hugetlb_pages_are_not_available() {
        // 40 free but 20 of them promised to existing mappings: 20 usable, 12 short.
        let fake = FakeHost::new().pool(2048, 50, 40, 20);
        let c = RamConfig {
            size: 64 << 20,
            backing: BackingKind::Hugetlb2M,
            host: fake.paths.clone(),
            ..Default::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("echo 62 > ") && e.contains("20 free"), "{e}");
        let ok = RamConfig {
            size: 40 << 20,
            ..c
        };
        ok.validate().unwrap();
    }

    #[test]
    fn more_than_mem_available_is_refused() {
        let fake = FakeHost::new().mem_available_kib(100 << 10);
        let c = RamConfig {
            size: 1 << 30,
            backing: BackingKind::Shmem,
            host: fake.paths.clone(),
            ..Default::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("MemAvailable") && e.contains("100 MiB"), "{e}");
        assert!(matches!(
            GuestRam::create(&c),
            Err(Error::NotEnoughMemory { .. })
        ));
        let anon = RamConfig {
            backing: BackingKind::Anon,
            ..c.clone()
        };
        assert!(matches!(
            anon.validate(),
            Err(Error::NotEnoughMemory { .. })
        ));
        let fits = RamConfig {
            size: 64 << 20,
            ..c
        };
        fits.validate().unwrap();
    }

    #[test]
    fn thp_applies_to_anon_only() {
        for backing in [
            BackingKind::Shmem,
            BackingKind::Hugetlb2M,
            BackingKind::Hugetlb1G,
        ] {
            let c = RamConfig {
                size: 1 << 30,
                backing,
                thp: ThpMode::Madvise,
                ..Default::default()
            };
            let e = c.check_shape().unwrap_err().to_string();
            assert!(e.contains("--thp applies to the anon backing only"), "{e}");
        }
    }

    #[test]
    fn zero_and_unaligned_sizes() {
        let e = cfg(0, BackingKind::Anon)
            .check_shape()
            .unwrap_err()
            .to_string();
        assert!(e.contains("too small") && e.contains("8 MiB"), "{e}");
        let e = cfg(512 << 20, BackingKind::Hugetlb1G)
            .check_shape()
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("use 1 GiB"), "{e}");
        let e = cfg((16 << 20) + 1, BackingKind::Shmem)
            .check_shape()
            .unwrap_err()
            .to_string();
        assert!(e.contains("use 16 MiB or 16388 KiB"), "{e}");
        let e = cfg(64 << 30, BackingKind::Hugetlb1G).check_shape();
        assert!(e.is_ok(), "64 GiB is the largest size and allowed");
    }

    #[test]
    fn guest_ram_is_send_and_sync() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<GuestRam>();
    }

    #[test]
    fn memfd_is_named() {
        let ram = GuestRam::create(&cfg(8 << 20, BackingKind::Shmem)).unwrap();
        let fd = ram.memfd().unwrap().as_raw_fd();
        let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
        assert!(
            link.to_string_lossy().contains("memfd:hugevisor-guest-ram"),
            "{link:?}"
        );
        assert!(GuestRam::create(&cfg(8 << 20, BackingKind::Anon))
            .unwrap()
            .memfd()
            .is_none());
    }

    /// The staging view writes the memfd without mapping anything into the guest view;
    /// populate maps the whole guest view.
    #[test]
    fn staging_writes_do_not_map_the_guest_view_and_populate_maps_it() {
        let mut cases = vec![
            (BackingKind::Shmem, 16 << 20),
            (BackingKind::Anon, 16 << 20),
        ];
        if pool_ok(2 << 20, 8) {
            cases.push((BackingKind::Hugetlb2M, 16 << 20));
        }
        for (backing, size) in cases {
            let mut c = cfg(size, backing);
            let ram = GuestRam::create(&c).unwrap();
            assert_eq!(ram.guest_view_rss_bytes().unwrap(), 0, "{backing}");
            ram.staging()
                .write_obj(1_u64, GuestAddress(size / 2))
                .unwrap();
            let rss = ram.guest_view_rss_bytes().unwrap();
            match ram.view_layout() {
                ViewLayout::GuestAndStaging => assert_eq!(rss, 0, "{backing}"),
                ViewLayout::SingleView => assert_eq!(rss, 4096, "{backing}"),
            }
            drop(ram);
            c.prefault = Prefault::Populate;
            let ram = GuestRam::create(&c).unwrap();
            assert_eq!(ram.guest_view_rss_bytes().unwrap(), size, "{backing}");
        }
    }

    #[test]
    fn smaps_parsing() {
        let smaps = "\
7f0000000000-7f0000200000 rw-s 00000000 00:01 5 /memfd:hugevisor-guest-ram (deleted)
Size:               2048 kB
Rss:                   8 kB
Shared_Hugetlb:        0 kB
7f0000200000-7f0000400000 rw-s 00200000 00:01 5 /memfd:hugevisor-guest-ram (deleted)
Rss:                   0 kB
Shared_Hugetlb:     2048 kB
Private_Hugetlb:       0 kB
7f0000400000-7f0000600000 rw-p 00000000 00:00 0
Rss:                 100 kB
ShmemPmdMapped:     2048 kB
";
        const RESIDENT: &[&str] = &["Rss", "Shared_Hugetlb", "Private_Hugetlb"];
        assert_eq!(
            smaps_sum(smaps, 0x7f00_0000_0000, 0x7f00_0040_0000, RESIDENT),
            (8 + 2048) << 10
        );
        assert_eq!(
            smaps_sum(smaps, 0x7f00_0040_0000, 0x7f00_0060_0000, RESIDENT),
            100 << 10
        );
        // The PMD-mapped count reads other fields of the same VMAs.
        let pmd = &["AnonHugePages", "ShmemPmdMapped", "FilePmdMapped"];
        assert_eq!(smaps_sum(smaps, 0x7f00_0000_0000, 0x7f00_0040_0000, pmd), 0);
        assert_eq!(
            smaps_sum(smaps, 0x7f00_0040_0000, 0x7f00_0060_0000, pmd),
            2048 << 10
        );
    }
}
