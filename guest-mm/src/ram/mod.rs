//! Guest RAM: a backing, its views and its NUMA zones.
//!
//! File-backed RAM (shmem and hugetlb memfds) is mapped twice, `MAP_SHARED`:
//! - the **guest view**, which KVM's memslot points at and the only view registered with
//!   userfaultfd, and
//! - the **staging view**, through which the VMM reads and writes guest memory without
//!   taking guest faults.
//!
//! Anonymous RAM has one private mapping that serves as both.
//!
//! [`mapping`] owns every host mapping call; [`zones`] the memfds behind guest NUMA
//! nodes; [`smaps`] reads back what the kernel made of it all.

pub(crate) mod mapping;
pub mod populate;
pub mod smaps;
pub mod zones;

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::addr::{Gpa, GpaRange, SIZE_2M};
use crate::collapse::CollapseFailure;
use crate::config::{
    BackingKind, NodeBackendKind, NumaLayout, Prefault, RamConfig, ViewLayout, MAX_RAM,
};
use crate::error::Error;
use crate::size::format_size;
use mapping::{Mapping, Source};
use smaps::RssSplit;
use zones::{create_memfd, mbind, ExistingPages, MemfdKind, Zones};

/// What a NUMA move leaves in the page cache of the node it moved to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MovedCache {
    /// The pages as written (4 KiB on shmem).
    Pages,
    /// One huge page per region, as the region was before the move: an emulated move
    /// writes 4 KiB pages into the new memfd, so its staging view is collapsed again,
    /// under the move's invalidation, and mapping the region huge after its next fault
    /// costs no copy.
    Huge,
}

/// Which view of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    /// What KVM maps (and userfaultfd guards).
    Guest,
    /// The VMM's own access (the guest view again for anon RAM).
    Staging,
}

/// Guest RAM: one backing, its views, and the vm-memory object over the staging view.
///
/// Field order is drop order: the vm-memory object (which does not own its mapping)
/// goes before the mappings, the mappings before the memfds.
pub struct GuestRam {
    staging: GuestMemoryMmap,
    staging_view: Option<Mapping>,
    guest_view: Mapping,
    zones: Zones,
    numa: NumaLayout,
    backing: BackingKind,
    size: u64,
    /// Bytes from the start of RAM the staging view has mapped and allocated (a
    /// migration destination's [`populate`] raises it): an arriving page below it is
    /// copied through the mapping, not `pwrite`n (see [`GuestRam::write_bytes`]). Only a
    /// choice of the faster path: a write either way is correct.
    staging_populated: AtomicU64,
}

/// Alignment of every guest RAM view (see `Mapping::new`).
const HUGE_ALIGN: u64 = SIZE_2M;

impl GuestRam {
    /// Validates `cfg` against the host, then creates the backing and its views. On error
    /// nothing is left behind (every step's resources are owned and dropped).
    pub fn create(cfg: &RamConfig) -> Result<GuestRam, Error> {
        cfg.validate()?;
        let len = usize::try_from(cfg.size).map_err(|_| Error::TooLarge {
            size: format_size(cfg.size),
            max: format_size(MAX_RAM),
        })?;
        let align = cfg.backing.page_size().max(HUGE_ALIGN) as usize;
        let (memfd, guest_view, staging_view) = match memfd_kind(cfg.backing) {
            Some(kind) => {
                let fd = create_memfd(kind, cfg.size)?;
                let guest = Mapping::new(len, Source::Shared(fd.as_fd()), align)
                    .map_err(|e| hugetlb_mmap_error(cfg, e))?;
                let staging = Mapping::new(len, Source::Shared(fd.as_fd()), align)?;
                (Some(fd), guest, Some(staging))
            }
            None => {
                let m = Mapping::new(len, Source::Anonymous, align)?;
                m.advise_thp(cfg.thp)?;
                (None, m, None)
            }
        };
        // Emulated NUMA nodes need every page allocated (see move_emulated).
        if cfg.prefault == Prefault::Populate || cfg.numa.emulated_zones() {
            guest_view.populate_write(cfg.backing.page_size())?;
        }
        let view = staging_view.as_ref().unwrap_or(&guest_view);
        let staging = staging_memory(view, len, cfg.backing.view_layout())?;
        let mut extra = Vec::new();
        if cfg.numa.emulated_zones() {
            for _ in 1..cfg.numa.nodes {
                extra.push(create_memfd(MemfdKind::Shmem, cfg.size)?);
            }
        }
        let ram = GuestRam {
            staging,
            staging_view,
            guest_view,
            zones: Zones::new(memfd, extra, cfg.size),
            numa: cfg.numa,
            backing: cfg.backing,
            size: cfg.size,
            staging_populated: AtomicU64::new(0),
        };
        if cfg.numa.backend == NodeBackendKind::Host {
            let (start, _) = ram.staging_mapping().host_range();
            mbind(start, ram.size, cfg.numa.policy, &[0], ExistingPages::Move)?;
        }
        Ok(ram)
    }

    pub fn numa(&self) -> NumaLayout {
        self.numa
    }

    /// The node of the 2 MiB region holding `gpa`.
    pub fn node_of(&self, gpa: Gpa) -> u16 {
        self.zones.node_of(gpa)
    }

    /// The node of every 2 MiB region.
    pub fn region_nodes(&self) -> Vec<u16> {
        self.zones.nodes().clone()
    }

    /// Moves `range` (2 MiB regions of guest RAM) to `node`.
    ///
    /// The caller must have invalidated the range first (mmu notifier start: the guest
    /// view no longer maps it, so no vCPU write can land in the old copy while it is
    /// copied — seed 002) and must not write it through the staging view meanwhile: this
    /// is the host step of `Change::Move`.
    /// Emulated nodes: the content is copied into the node's memfd at the same offset,
    /// both views are remapped there in place, and the old copy is punched out. A
    /// remapped guest view loses its userfaultfd registration: the guest view registers
    /// it again when the move's invalidation ends.
    /// Host nodes: mbind(MPOL_MF_MOVE) of the staging view (the kernel moves a huge page
    /// as one, so `cache` needs nothing there).
    pub fn move_region(&self, range: GpaRange, node: u16, cache: MovedCache) -> Result<(), Error> {
        if !range.start.is_aligned(SIZE_2M)
            || !range.end.is_aligned(SIZE_2M)
            || range.end.0 > self.size
        {
            return Err(Error::MoveNotRegions { range });
        }
        if node >= self.numa.nodes {
            return Err(Error::NoSuchNode {
                node,
                nodes: self.numa.nodes,
            });
        }
        let mut nodes = self.zones.nodes();
        for r in range.pages(SIZE_2M) {
            let from = nodes[r as usize];
            if from == node {
                continue;
            }
            let region = GpaRange::new(Gpa(r * SIZE_2M), Gpa((r + 1) * SIZE_2M));
            match self.numa.backend {
                NodeBackendKind::Host => {
                    let (base, _) = self.staging_mapping().host_range();
                    let addr = base + region.start.0;
                    mbind(
                        addr,
                        SIZE_2M,
                        self.numa.policy,
                        &[node],
                        ExistingPages::Move,
                    )?
                }
                NodeBackendKind::Emulated => self.move_emulated(region, from, node, cache)?,
            }
            nodes[r as usize] = node;
        }
        Ok(())
    }

    fn move_emulated(
        &self,
        region: GpaRange,
        from: u16,
        to: u16,
        cache: MovedCache,
    ) -> Result<(), Error> {
        let (Some(dst), Some(staging)) = (self.zones.fd(to), self.staging_view.as_ref()) else {
            return Err(Error::EmulatedNeedsStaging);
        };
        // Copy the whole region, holes included, so that every page of guest RAM stays
        // allocated in its node's memfd. The guest view is registered MINOR only, which
        // does not guard holes (a first touch of a hole is zero-filled without an event,
        // host-facts.md): a hole in the old copy would let a vCPU's first write land
        // there during the move, and be lost (measured: verify found zeroed pages).
        staging.write_to(region, dst)?;
        self.guest_view.remap(region, dst)?;
        staging.remap(region, dst)?;
        if cache == MovedCache::Huge {
            // A failure only costs the copy later, when the guest view collapses.
            let _ = staging.collapse(region);
        }
        self.zones.punch(from, region)
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

    /// Allocates the backing pages of `range` through the staging view (see
    /// [`populate`]); pages already there keep their content.
    /// The memfd of shmem RAM in one zone: written with `pwrite` where the staging view
    /// is not populated (hugetlbfs has no `write`; anon has no file).
    fn shmem_memfd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        match self.backing {
            BackingKind::Shmem => self.zones.single_memfd(),
            _ => None,
        }
    }

    pub(crate) fn populate_staging(&self, range: GpaRange) -> Result<(), Error> {
        // Faulted in and mapped (zeroed: shmem's `fallocate` would allocate without
        // zeroing, but a fault on a fallocated page zeroes it anyway, and a receive path
        // that copies into a mapped page is ~10x cheaper per GiB than `pwrite`'s page
        // cache walk — 0.04 against 0.12–0.49 s here).
        self.staging_mapping().populate_range(range)?;
        if self.shmem_memfd().is_some() {
            self.staging_populated
                .fetch_max(range.end.0, Ordering::Release);
        }
        Ok(())
    }

    pub fn view_layout(&self) -> ViewLayout {
        self.backing.view_layout()
    }

    /// Host address of the guest view: the KVM memslot's userspace_addr, and the base of
    /// userfaultfd registration. Never leaves guest-mm except through `Memslot`.
    pub(crate) fn guest_view_addr(&self) -> u64 {
        self.guest_view.host_range().0
    }

    fn staging_mapping(&self) -> &Mapping {
        self.staging_view.as_ref().unwrap_or(&self.guest_view)
    }

    fn mapping(&self, view: View) -> &Mapping {
        match view {
            View::Guest => &self.guest_view,
            View::Staging => self.staging_mapping(),
        }
    }

    /// The VMM's access to guest memory: vm-memory over the staging view.
    pub fn staging(&self) -> &GuestMemoryMmap {
        &self.staging
    }

    /// Writes `bytes` at `gpa` before any vCPU runs on them (a migration or restore
    /// receiving whole backing pages). On a shmem memfd of one zone, where the staging
    /// view is not populated yet, this is `pwrite`: the kernel then allocates each page
    /// cache page without zeroing it first (a whole-page write), which a first write
    /// through a mapping cannot avoid — a third less time per GiB here
    /// (`../shared/brief/host-facts.md`). Everything else (a populated staging view,
    /// hugetlbfs, which takes no `write`, emulated NUMA zones, anon) writes through the
    /// staging view.
    pub fn write_bytes(&self, gpa: Gpa, bytes: &[u8]) -> Result<(), Error> {
        let end = gpa.0.saturating_add(bytes.len() as u64);
        let populated = end <= self.staging_populated.load(Ordering::Acquire);
        let fd = match self.shmem_memfd() {
            Some(fd) if !populated => fd,
            _ => {
                return self
                    .staging
                    .write_slice(bytes, gpa.into())
                    .map_err(|source| Error::Staging {
                        what: "writing",
                        gpa,
                        source,
                    })
            }
        };
        let mut done = 0usize;
        while done < bytes.len() {
            let rest = &bytes[done..];
            // SAFETY: writes from a live slice into our own memfd at an offset inside
            // guest RAM (the caller checked the range); no memory of ours is written.
            let n = unsafe {
                libc::pwrite(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    rest.as_ptr().cast(),
                    rest.len(),
                    (gpa.0 + done as u64) as libc::off_t,
                )
            };
            match n {
                n if n > 0 => done += n as usize,
                _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
                _ => {
                    return Err(crate::error::os(
                        "pwrite of arriving pages into guest RAM's memfd",
                    ))
                }
            }
        }
        Ok(())
    }

    /// Guest RAM's memfd (zone 0); None for anon.
    #[cfg(test)]
    pub(crate) fn memfd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.zones.fd(0)
    }

    #[cfg(test)]
    pub(crate) fn zone_fd(&self, zone: u16) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.zones.fd(zone)
    }

    /// Zaps `range` of the guest view (see `Mapping::zap`); nothing for single-view RAM,
    /// whose only view holds the content.
    pub(crate) fn zap_guest_view(&self, range: GpaRange) -> Result<(), Error> {
        match self.view_layout() {
            ViewLayout::GuestAndStaging => self.guest_view.zap(range),
            ViewLayout::SingleView => Ok(()),
        }
    }

    /// MADV_COLLAPSE of the 2 MiB region at `region` in `view`.
    pub(crate) fn collapse(&self, view: View, region: GpaRange) -> Result<(), CollapseFailure> {
        self.mapping(view).collapse(region)
    }

    /// Which pages of the 2 MiB region the host holds for the guest view (mincore).
    pub(crate) fn resident_2m(&self, region: GpaRange) -> Option<[u64; 8]> {
        self.guest_view.resident_2m(region)
    }

    /// Bytes of the guest view mapped in this process right now (`Rss` plus hugetlb).
    /// For anon this is the whole RAM's footprint (one view).
    pub fn guest_view_rss_bytes(&self) -> Result<u64, Error> {
        let r = self.guest_view.host_range();
        Ok(smaps::sum(&smaps::read_own()?, &[r], smaps::RESIDENT))
    }

    /// Bytes of `view` the kernel maps huge right now: PMD-mapped thp (AnonHugePages,
    /// ShmemPmdMapped, FilePmdMapped) and, for hugetlb, every mapped hugetlb page (huge by
    /// construction; PUD-sized for 1 GiB pages). What collapse achieved, by the kernel's
    /// count rather than our table's.
    pub fn huge_mapped_bytes(&self, view: View) -> Result<u64, Error> {
        let r = self.mapping(view).host_range();
        Ok(smaps::sum(&smaps::read_own()?, &[r], smaps::HUGE_MAPPED))
    }

    /// This process's resident memory, split into guest RAM (every view) and the rest.
    pub fn rss_split(&self) -> Result<RssSplit, Error> {
        let mut ranges = vec![self.guest_view.host_range()];
        ranges.extend(self.staging_view.as_ref().map(|s| s.host_range()));
        Ok(smaps::rss_split(&smaps::read_own()?, &ranges))
    }
}

fn memfd_kind(backing: BackingKind) -> Option<MemfdKind> {
    match backing {
        BackingKind::Shmem => Some(MemfdKind::Shmem),
        BackingKind::Hugetlb2M => Some(MemfdKind::Hugetlb2M),
        BackingKind::Hugetlb1G => Some(MemfdKind::Hugetlb1G),
        BackingKind::Anon => None,
    }
}

/// vm-memory's object over `view` (the staging view, or the only view).
fn staging_memory(
    view: &Mapping,
    len: usize,
    layout: ViewLayout,
) -> Result<GuestMemoryMmap, Error> {
    let flags = match layout {
        ViewLayout::GuestAndStaging => libc::MAP_SHARED,
        ViewLayout::SingleView => libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
    };
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: `view` is a live read/write mapping of `len` bytes; GuestRam keeps it mapped
    // until after the returned object is dropped (field order).
    let region = unsafe { MmapRegion::<()>::build_raw(view.addr(), len, rw, flags) }
        .map_err(|source| Error::StagingRegion { source })?;
    let region = GuestRegionMmap::new(region, GuestAddress(0)).ok_or(Error::StagingOverflow)?;
    GuestMemoryMmap::from_regions(vec![region]).map_err(|source| Error::StagingMemory { source })
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
mod tests;
