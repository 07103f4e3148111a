//! [`GuestMemory`]: the one object the VMM and the migration code hold. It owns guest
//! RAM, the second-stage table and its notifier, the guest view's userfaultfd, and the
//! engines the configuration asks for (fault thread, collapse, NUMA, stress zapper).
//!
//! Its life: `create` (validate, build, place; nothing runs yet) → `start` (threads) →
//! optionally a migration's `write_page`s, `begin_postcopy`, `install_page`s,
//! `end_postcopy`, `resumed_after_migration` → `stop` (threads joined, final figures).
//! Raw host addresses of the guest view never leave it, except as the [`Memslot`] KVM
//! needs.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::Serialize;
use vm_memory::{Bytes, GuestMemoryMmap};

use crate::addr::{Gpa, GpaRange, SIZE_2M};
use crate::collapse::{CollapseEngine, CollapseFailure, CollapseReport, CollapseStatus};
use crate::config::{BackingKind, FaultPathNeed, MemoryConfig, NumaLayout, Prefault, ViewLayout};
use crate::error::Error;
use crate::fault::{FaultContext, FaultReport, FaultStats, FaultThread, VcpuThreads};
use crate::guest_view::{GuestView, Registration};
use crate::numa::{NumaEngine, NumaReport};
use crate::page::{Installed, InstalledPages, PageContent, Pager};
use crate::periodic::Periodic;
use crate::ram::populate::{PopulateEnd, PopulateReport, Populator};
use crate::ram::{smaps::RssSplit, GuestRam, MovedCache, View};
use crate::stage::{Accounting, Change, Run, SecondStage};
use crate::stress::StressZapper;

/// What KVM's memslot needs: the only way the guest view's host address leaves guest-mm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Memslot {
    pub guest_phys_addr: Gpa,
    pub size: u64,
    pub userspace_addr: u64,
}

/// The guest view's fault path in this run, as reports name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultPathKind {
    /// MINOR faults (NUMA hints, zaps).
    Minor,
    /// Post-copy: MISSING and MINOR faults, absent pages asked of the pager.
    MissingAndMinor,
    /// No fault path: nothing zaps the guest view.
    NothingZaps,
    /// No fault path: anon RAM has one view and no page cache.
    SingleView,
}

impl FaultPathKind {
    pub fn describe(self) -> &'static str {
        match self {
            FaultPathKind::Minor => "uffd-minor",
            FaultPathKind::MissingAndMinor => "uffd-missing-minor (post-copy)",
            FaultPathKind::NothingZaps => "off: nothing zaps the guest view in this run",
            FaultPathKind::SingleView => {
                "off: anon RAM has a single view and no page cache for MINOR faults"
            }
        }
    }
}

/// A cheap snapshot while the run goes on (the control API's vm.info).
#[derive(Clone, Debug, Serialize)]
pub struct MemoryStats {
    pub fault_path: &'static str,
    pub faults: Option<FaultReport>,
    pub collapse: Option<CollapseStatus>,
    pub numa: Option<NumaReport>,
}

/// The final figures of a run's guest memory.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryReport {
    pub fault_path: &'static str,
    /// None when no fault thread ran.
    pub faults: Option<FaultReport>,
    /// None when the collapse engine had no work in this run.
    pub collapse: Option<CollapseReport>,
    pub numa: Option<NumaReport>,
    /// Zaps by the stress zapper.
    pub zaps: u64,
    /// Host-side mapping changes (zaps, userfaultfd re-registration after a NUMA move)
    /// that failed: when not 0, guest memory may not have been protected.
    pub host_failures: u64,
    /// A migration destination's population of its RAM ([`GuestMemory::prepare_incoming`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub populate: Option<PopulateReport>,
}

/// Threads and their state, behind one lock.
struct Running {
    started: bool,
    fault: Option<FaultThread>,
    numa: Vec<Periodic>,
    stress: Option<StressZapper>,
    /// A migration destination populating its RAM ([`GuestMemory::prepare_incoming`]).
    populate: Option<Populator>,
    /// How the population ended, once waited for.
    populated: Option<PopulateReport>,
    fault_path: FaultPathKind,
    report: Option<MemoryReport>,
}

/// Guest memory of one VM. `Send + Sync`; held in an `Arc`.
pub struct GuestMemory {
    cfg: MemoryConfig,
    pub(crate) ram: Arc<GuestRam>,
    stage: Arc<SecondStage>,
    view: Arc<GuestView>,
    vcpus: Arc<VcpuThreads>,
    numa: Option<Arc<NumaEngine>>,
    collapse: Option<Arc<CollapseEngine>>,
    pager: Arc<OnceLock<Arc<dyn Pager>>>,
    fault_stats: Arc<FaultStats>,
    running: Mutex<Running>,
}

impl GuestMemory {
    /// Validates `cfg` (host pools, MemAvailable, combinations that cannot work), then
    /// creates RAM, table, notifier and the engines the configuration needs, and applies
    /// the initial NUMA placement. On error nothing is left behind. Nothing runs and
    /// nothing is registered with userfaultfd until [`start`](Self::start).
    pub fn create(cfg: &MemoryConfig) -> Result<Arc<GuestMemory>, Error> {
        cfg.validate()?;
        let ram = Arc::new(GuestRam::create(&cfg.ram)?);
        let stage = Arc::new(
            SecondStage::all_present(ram.size(), ram.page_size()).map_err(|source| {
                Error::Table {
                    what: "mapping all of guest RAM",
                    source,
                }
            })?,
        );
        let view = Arc::new(GuestView::new(ram.clone()));
        let file_backed = ram.view_layout() == ViewLayout::GuestAndStaging;
        if file_backed {
            stage.notifier().subscribe(view.clone());
        }
        let vcpus = Arc::new(VcpuThreads::new(cfg.vcpus));
        let numa = match &cfg.numa {
            Some(n) => {
                let moved_cache = match cfg.collapse_has_work() {
                    true => MovedCache::Huge,
                    false => MovedCache::Pages,
                };
                let engine = Arc::new(NumaEngine::new(
                    ram.clone(),
                    stage.clone(),
                    n.clone(),
                    vcpus.clone(),
                    moved_cache,
                ));
                engine.place_initial()?;
                Some(engine)
            }
            None => None,
        };
        let fault_path = match (file_backed, cfg.needs_minor_faults()) {
            (true, true) => FaultPathKind::Minor,
            (true, false) => FaultPathKind::NothingZaps,
            (false, _) => FaultPathKind::SingleView,
        };
        let collapse = cfg.collapse_has_work().then(|| {
            Arc::new(CollapseEngine::new(
                cfg.collapse.mode,
                cfg.collapse.scan,
                ram.clone(),
                stage.clone(),
                view.clone(),
            ))
        });
        Ok(Arc::new(GuestMemory {
            cfg: cfg.clone(),
            vcpus,
            fault_stats: Arc::new(FaultStats::new(cfg.vcpus)),
            ram,
            stage,
            view,
            numa,
            collapse,
            pager: Arc::new(OnceLock::new()),
            running: Mutex::new(Running {
                started: false,
                fault: None,
                numa: Vec::new(),
                stress: None,
                populate: None,
                populated: None,
                fault_path,
                report: None,
            }),
        }))
    }

    fn running(&self) -> std::sync::MutexGuard<'_, Running> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers the guest view for MINOR faults if anything will zap it, and starts the
    /// fault thread, collapse engine, NUMA threads and stress zapper that the
    /// configuration asks for. vCPU threads may still be registering. Once per run;
    /// later calls do nothing.
    pub fn start(self: &Arc<Self>) -> Result<(), Error> {
        let mut r = self.running();
        if r.started {
            return Ok(());
        }
        r.started = true;
        if r.fault_path == FaultPathKind::Minor && self.view.registration() == Registration::None {
            self.view.register(Registration::MinorOnly)?;
        }
        self.start_fault_thread(&mut r)?;
        if let Some(c) = &self.collapse {
            c.start()?;
        }
        if let Some(n) = &self.numa {
            r.numa = n.start_threads()?;
        }
        if let Some(every) = self.cfg.stress_zap {
            r.stress = Some(StressZapper::start(
                self.stage.clone(),
                self.ram.size(),
                every,
            )?);
        }
        Ok(())
    }

    /// The fault thread, when the view is registered and it does not run yet.
    fn start_fault_thread(&self, r: &mut Running) -> Result<(), Error> {
        if r.fault.is_some() || self.view.registration() == Registration::None {
            return Ok(());
        }
        r.fault = Some(FaultThread::start(FaultContext {
            ram: self.ram.clone(),
            collapse: self.collapse.clone(),
            view: self.view.clone(),
            stage: self.stage.clone(),
            vcpus: self.vcpus.clone(),
            numa: self.numa.clone(),
            pager: self.pager.clone(),
            stats: self.fault_stats.clone(),
        })?);
        Ok(())
    }

    pub fn size(&self) -> u64 {
        self.ram.size()
    }

    /// The guest view's fault path now (post-copy changes it).
    pub fn fault_path(&self) -> FaultPathKind {
        self.running().fault_path
    }

    pub fn page_size(&self) -> u64 {
        self.ram.page_size()
    }

    pub fn backing(&self) -> BackingKind {
        self.ram.backing()
    }

    pub fn numa_layout(&self) -> NumaLayout {
        self.ram.numa()
    }

    /// The VMM's own reads and writes of guest memory (the staging view).
    pub fn staging(&self) -> &GuestMemoryMmap {
        self.ram.staging()
    }

    /// What KVM's memslot needs.
    pub fn memslot(&self) -> Memslot {
        Memslot {
            guest_phys_addr: Gpa::ZERO,
            size: self.ram.size(),
            userspace_addr: self.ram.guest_view_addr(),
        }
    }

    /// The registry vCPU threads fill (`register_current(index)` on each vCPU's thread).
    pub fn vcpu_threads(&self) -> &VcpuThreads {
        &self.vcpus
    }

    /// The second-stage table behind its door: lookups with an intent, accounting, and
    /// changes through the notifier (zaps, hints). Moves go through
    /// [`move_region`](Self::move_region), which also moves the content.
    pub fn stage(&self) -> &SecondStage {
        &self.stage
    }

    /// The node of the 2 MiB region holding `gpa`.
    pub fn node_of(&self, gpa: Gpa) -> u16 {
        self.ram.node_of(gpa)
    }

    /// Moves the 2 MiB region at `gpa` to `node`: invalidated through the notifier (the
    /// guest view is zapped), content moved, table changed, guest view re-registered.
    /// On emulated nodes a region that still waits for post-copy pages is refused
    /// (`Error::MoveWithAbsentPages`).
    pub fn move_region(&self, gpa: Gpa, node: u16) -> Result<(), Error> {
        crate::numa::engine::move_region(&self.stage, &self.ram, gpa, node, MovedCache::Pages)
            .map_err(|e| e.into_error(gpa))
    }

    /// `gpa` and `len` as one backing page inside guest RAM, or why not.
    fn check_page(&self, gpa: Gpa, len: u64) -> Result<(), Error> {
        let page = self.page_size();
        if len != page || !gpa.is_aligned(page) {
            return Err(Error::NotABackingPage { gpa, len, page });
        }
        match gpa.checked_add(len) {
            Some(end) if end.0 <= self.size() => Ok(()),
            _ => Err(Error::OutsideRam {
                gpa,
                len,
                size: self.size(),
            }),
        }
    }

    /// Checks that `len` bytes at `gpa` are one extent: whole backing pages, at most
    /// [`crate::EXTENT_MAX_PAGES`] of them, inside one region (or one huge page), inside RAM.
    fn check_extent(&self, gpa: Gpa, len: u64) -> Result<GpaRange, Error> {
        let page = self.page_size();
        let pages = len / page;
        let range = GpaRange::new(gpa, gpa.add(len));
        let one_region =
            len <= page || gpa.align_down(SIZE_2M) == Gpa(range.end.0 - 1).align_down(SIZE_2M);
        if len == 0
            || !len.is_multiple_of(page)
            || !gpa.is_aligned(page)
            || pages > crate::page::extent_max_pages(page)
            || !one_region
        {
            return Err(Error::NotAnExtent { gpa, len, page });
        }
        match gpa.checked_add(len) {
            Some(end) if end.0 <= self.size() => Ok(range),
            _ => Err(Error::OutsideRam {
                gpa,
                len,
                size: self.size(),
            }),
        }
    }

    /// Reads the extent at `gpa` (`buf.len()` bytes) through the staging view (a migration
    /// source sending it as one frame).
    pub fn read_pages(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), Error> {
        self.check_extent(gpa, buf.len() as u64)?;
        self.read_staging(gpa, buf)
    }

    /// Writes an arriving extent before the guest runs here (pre-copy receive): one
    /// `pwrite` on shmem, one copy through the staging view otherwise
    /// ([`GuestRam::write_bytes`]).
    pub fn write_pages(&self, gpa: Gpa, bytes: &[u8]) -> Result<(), Error> {
        self.check_extent(gpa, bytes.len() as u64)?;
        self.ram.write_bytes(gpa, bytes)
    }

    /// Pre-copy receive: the extent of `pages` backing pages at `gpa` is all zeros. Written
    /// as zeros (one `pwrite` on shmem), never punched out: a hole in a present page would
    /// later raise a MISSING fault the fault path cannot CONTINUE (hybrid registers
    /// MISSING|MINOR after the rounds; UFFDIO_CONTINUE of a hole is EFAULT).
    pub fn zero_pages(&self, gpa: Gpa, pages: u64) -> Result<(), Error> {
        let page = self.page_size();
        let range = self.check_extent(gpa, pages.saturating_mul(page))?;
        match crate::page::ZERO_EXTENT.get(..range.len() as usize) {
            Some(zeros) => self.ram.write_bytes(gpa, zeros),
            None => (0..pages)
                .try_for_each(|i| self.write_staging(gpa.add(i * page), PageContent::Zero)),
        }
    }

    /// Post-copy: an arriving extent. Under one hold of the table lock, each stretch of
    /// pages still absent is written (as [`GuestMemory::write_pages`]) and CONTINUEd into
    /// the guest view with one ioctl (waking the vCPUs waiting on any of them) and marked
    /// present; pages no longer absent are duplicates, left alone. Then NUMA placement
    /// hears of the new pages. Returns which pages were new.
    pub fn install_pages(&self, gpa: Gpa, bytes: &[u8]) -> Result<InstalledPages, Error> {
        let range = self.check_extent(gpa, bytes.len() as u64)?;
        let page = self.page_size();
        if let Some(n) = &self.numa {
            n.before_install(gpa);
        }
        let new = self.stage.fill_extent(range, page, |stretch| {
            let at = (stretch.start.0 - gpa.0) as usize;
            self.ram
                .write_bytes(stretch.start, &bytes[at..at + stretch.len() as usize])?;
            self.view.continue_range(stretch).map(|_| ())
        })?;
        for i in (0..range.len() / page).filter(|&i| new.is_new(i)) {
            if let Some(n) = &self.numa {
                n.after_install(gpa.add(i * page));
            }
        }
        // The collapse engine waits for `end_postcopy` (see [`GuestMemory::install_page`]).
        Ok(new)
    }

    /// Reads the backing page at `gpa` through the staging view (a migration source).
    pub fn read_page(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), Error> {
        self.check_page(gpa, buf.len() as u64)?;
        self.read_staging(gpa, buf)
    }

    fn read_staging(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), Error> {
        self.staging()
            .read_slice(buf, gpa.into())
            .map_err(|source| Error::Staging {
                what: "reading",
                gpa,
                source,
            })
    }

    /// Writes an arriving backing page through the staging view (pre-copy receive, before
    /// the guest runs here).
    pub fn write_page(&self, gpa: Gpa, page: PageContent<'_>) -> Result<(), Error> {
        let len = match page {
            PageContent::Bytes(b) => b.len() as u64,
            PageContent::Zero => self.page_size(),
        };
        self.check_page(gpa, len)?;
        self.write_staging(gpa, page)
    }

    fn write_staging(&self, gpa: Gpa, page: PageContent<'_>) -> Result<(), Error> {
        static ZEROS: [u8; 65536] = [0; 65536];
        let write = |bytes: &[u8], at: Gpa| {
            self.staging()
                .write_slice(bytes, at.into())
                .map_err(|source| Error::Staging {
                    what: "writing",
                    gpa: at,
                    source,
                })
        };
        match page {
            PageContent::Bytes(b) => self.ram.write_bytes(gpa, b),
            PageContent::Zero => {
                let mut off = 0;
                while off < self.page_size() {
                    let n = (self.page_size() - off).min(ZEROS.len() as u64);
                    write(&ZEROS[..n as usize], gpa.add(off))?;
                    off += n;
                }
                Ok(())
            }
        }
    }

    /// A migration destination, before its source connects: file-backed RAM is
    /// populated on a thread of its own (see [`crate::ram::populate`]), so that the
    /// pages arriving later are copied into place, not allocated (and on hugetlb zeroed)
    /// first on the receive path. Nothing to do for anonymous RAM or RAM populated
    /// already. Returns whether a population started.
    pub fn prepare_incoming(&self) -> Result<bool, Error> {
        let hugetlb = self.ram.backing().hugetlb_page().is_some();
        let shmem = self.ram.backing() == BackingKind::Shmem;
        let populated =
            self.cfg.ram.prefault == Prefault::Populate || self.cfg.ram.numa.emulated_zones();
        let mut r = self.running();
        if !(hugetlb || shmem) || populated || r.populate.is_some() {
            return Ok(false);
        }
        r.populate = Some(
            Populator::start(self.ram.clone()).map_err(|source| Error::Os {
                op: "spawning the thread that populates guest RAM",
                source,
            })?,
        );
        Ok(true)
    }

    /// Waits for the population [`GuestMemory::prepare_incoming`] started to end and says
    /// how it did; None if none started (or it was waited for already).
    pub fn wait_populated(&self) -> Option<PopulateEnd> {
        let p = self.running().populate.take()?;
        let end = p.wait();
        self.running().populated = Some(end.report(self.ram.size()));
        Some(end)
    }

    /// Post-copy destination, before any vCPU runs: marks `absent` absent in the table,
    /// registers the guest view MISSING|MINOR, remembers `pager` (asked for every absent
    /// page a vCPU touches) and starts the fault thread. Returns the number of absent
    /// backing pages.
    pub fn begin_postcopy(&self, absent: &[GpaRange], pager: Arc<dyn Pager>) -> Result<u64, Error> {
        let file_backed = self.ram.view_layout() == ViewLayout::GuestAndStaging;
        // NUMA's hint faults and moves are safe beside post-copy (the fault path tells
        // hinted from absent pages under the table lock, and emulated moves wait for
        // complete regions); the random zapper and callers zapping by themselves are not
        // part of that argument.
        let zaps_otherwise =
            self.cfg.stress_zap.is_some() || self.cfg.fault_path == FaultPathNeed::Minor;
        if file_backed && zaps_otherwise {
            return Err(Error::PostcopyWithFaultPath);
        }
        if !file_backed {
            return Err(Error::PostcopyNeedsFileRam);
        }
        if self.pager.set(pager).is_err() {
            return Err(Error::PostcopyTwice);
        }
        for &range in absent {
            self.stage
                .apply(Change::MarkAbsent { range })
                .map_err(|source| Error::Table {
                    what: "marking post-copy pages absent",
                    source,
                })?;
        }
        self.view.register(Registration::MissingAndMinor)?;
        if let Some(n) = &self.numa {
            n.begin_postcopy(absent, self.page_size());
        }
        let mut r = self.running();
        r.fault_path = FaultPathKind::MissingAndMinor;
        self.start_fault_thread(&mut r)?;
        Ok(self.stage.accounting().absent_bytes / self.page_size())
    }

    /// One arriving post-copy page: under the table lock, and only if the page is still
    /// absent, write it through the staging view, CONTINUE it into the guest view (waking
    /// the vCPUs that wait on it) and mark it present. A page that is no longer absent
    /// is a duplicate and left alone: the guest may have written it since.
    pub fn install_page(&self, gpa: Gpa, page: PageContent<'_>) -> Result<Installed, Error> {
        let len = match page {
            PageContent::Bytes(b) => b.len() as u64,
            PageContent::Zero => self.page_size(),
        };
        self.check_page(gpa, len)?;
        let range = GpaRange::new(gpa, gpa.add(len));
        // NUMA placement on the way in: host nodes place a region before its first page,
        // emulated ones move it once its last page is in (numa::postcopy).
        if let Some(n) = &self.numa {
            n.before_install(gpa);
        }
        let new = self.stage.fill(gpa, || {
            self.write_staging(gpa, page)?;
            self.view.continue_range(range).map(|_| ())
        })?;
        if !new {
            return Ok(Installed::Duplicate);
        }
        if let Some(n) = &self.numa {
            n.after_install(gpa);
        }
        // No collapse while post-copy runs: `end_postcopy` sweeps every complete region.
        // A collapse copies 2 MiB in the kernel, milliseconds that a host without kernel
        // preemption (PREEMPT_NONE, as here) does not give up to a woken urgent thread:
        // with collapses as regions filled, a 1 GiB shmem post-copy's demand p99 was
        // 4.2-8.3 ms and its collapse thread used 0.6-1.8 s of CPU against the guest
        // and the receivers; with them after it, 1.7-2.0 ms (3 runs each).
        Ok(Installed::New)
    }

    /// Every post-copy page is in: unregister the guest view (which wakes anything still
    /// waiting) — and register it MINOR only again when NUMA keeps hinting it —, and sweep:
    /// every region post-copy completed collapses now (none did while it ran).
    pub fn end_postcopy(&self) -> Result<(), Error> {
        if let Some(n) = &self.numa {
            n.end_postcopy();
        }
        let mut unregistered = self.view.register(Registration::None);
        if unregistered.is_ok() && self.cfg.needs_minor_faults() {
            // Re-registering with fewer modes is a no-op for the kernel (it keeps the
            // wider set), hence unregister first. A hinted page touched in between is
            // mapped by the kernel from the page cache: its content is right, only its
            // hint fault is lost.
            unregistered = self.view.register(Registration::MinorOnly);
        }
        if let Some(c) = &self.collapse {
            c.sweep();
        }
        unregistered
    }

    /// An incoming guest whose absent pages will never come (a lazy restore that cannot
    /// serve one, a post-copy that gave up) is going away: the guest view is unregistered,
    /// which wakes every vCPU blocked on an absent page (it reads zeros, or what the page
    /// cache holds) so that it can leave KVM_RUN at its kick. A vCPU whose fault the kernel
    /// retries from inside KVM (here the emulated ring 0's page-table walk) otherwise
    /// never returns to user mode to see its kick, and the run never ends (seen in CI:
    /// a lazy restore of a changed snapshot, vCPU and fault thread spinning). Only for a
    /// guest that is being discarded: what it runs between this and its stop is not kept.
    pub fn abandon_postcopy(&self) -> Result<(), Error> {
        self.view.register(Registration::None)
    }

    /// A migration destination resumed the guest: collapse every complete region (those
    /// pre-copy rounds completed before the switch).
    pub fn resumed_after_migration(&self) {
        if let Some(c) = &self.collapse {
            c.sweep();
        }
    }

    /// Collapses the region at `gpa` now, on this thread, with the engine's sequence and
    /// checks (a region that is not complete is refused before any host step).
    pub fn collapse_now(&self, gpa: Gpa) -> Result<Duration, CollapseFailure> {
        crate::collapse::policy::collapse_region(&self.ram, &self.stage, &self.view, gpa)
    }

    pub fn accounting(&self) -> Accounting {
        self.stage.accounting()
    }

    /// The table as runs of equal leaves (`--memmap`).
    pub fn runs(&self) -> Vec<Run> {
        self.stage.runs()
    }

    /// Guest RAM the kernel maps huge in the guest view right now (smaps): PMD-mapped
    /// thp, and for hugetlb every mapped hugetlb page (PUD-sized for 1 GiB pages).
    pub fn pmd_mapped_bytes(&self) -> Result<u64, Error> {
        self.ram.huge_mapped_bytes(View::Guest)
    }

    /// As [`pmd_mapped_bytes`](Self::pmd_mapped_bytes), for either view.
    pub fn huge_mapped_bytes(&self, view: View) -> Result<u64, Error> {
        self.ram.huge_mapped_bytes(view)
    }

    /// This process's resident memory: all of it, and guest RAM's part.
    pub fn rss_split(&self) -> Result<RssSplit, Error> {
        self.ram.rss_split()
    }

    /// A cheap snapshot while running.
    pub fn stats(&self) -> MemoryStats {
        let r = self.running();
        MemoryStats {
            fault_path: r.fault_path.describe(),
            faults: r.fault.as_ref().map(|_| self.fault_stats.report()),
            collapse: self.collapse.as_ref().map(|c| c.status()),
            numa: self.numa.as_ref().map(|n| n.report()),
        }
    }

    /// Stops every thread and returns the final figures. Idempotent: later calls return
    /// the same report.
    pub fn stop(&self) -> MemoryReport {
        let mut r = self.running();
        if let Some(report) = &r.report {
            return report.clone();
        }
        let collapse = self.collapse.as_ref().map(|c| c.stop());
        let zaps = r.stress.take().map(StressZapper::stop).unwrap_or(0);
        r.numa.drain(..).for_each(Periodic::stop);
        let numa = self.numa.as_ref().map(|n| n.report());
        let faults = r.fault.take().map(FaultThread::stop);
        let populate = r
            .populate
            .take()
            .map(|p| p.stop().report(self.ram.size()))
            .or_else(|| r.populated.clone());
        let report = MemoryReport {
            fault_path: r.fault_path.describe(),
            faults,
            collapse,
            numa,
            zaps,
            host_failures: self.view.failures(),
            populate,
        };
        r.report = Some(report.clone());
        report
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        self.stop();
    }
}
