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
use crate::size::format_size;

/// Smallest guest RAM: the image and its tables occupy the first 4 MiB.
pub const MIN_RAM: u64 = 8 << 20;
/// Largest guest RAM: what the guest image's page-table area maps.
pub const MAX_RAM: u64 = 64 << 30;

const MADV_POPULATE_WRITE: libc::c_int = 23;

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
            return Err(Error::Unaligned {
                size: format_size(self.size),
                backing: self.backing.to_string(),
                page: format_size(page),
                below: format_size(below.max(page)),
                above: format_size(below + page),
            });
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

    /// Every check, including host resources (hugetlb pool, MemAvailable). No side effects.
    pub fn validate(&self) -> Result<(), Error> {
        self.check_shape()?;
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
    ) -> Result<Self, Error> {
        let raw_fd = fd.map(|f| f.as_raw_fd()).unwrap_or(-1);
        // SAFETY: a fresh mapping at a kernel-chosen address; no existing memory is affected.
        let addr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, raw_fd, 0) };
        if addr == libc::MAP_FAILED {
            return Err(os("mmap"));
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
    backing: BackingKind,
    size: u64,
}

// SAFETY: the raw pointers in Mapping are addresses of process-wide mappings that live as
// long as GuestRam; all access to guest memory goes through vm-memory's volatile accessors
// or KVM, which are safe to use from any thread.
unsafe impl Send for GuestRam {}
// SAFETY: as above; GuestRam has no interior mutability of its own.
unsafe impl Sync for GuestRam {}

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
        let (memfd, guest_view, staging_view) = match cfg.backing.memfd_flags() {
            Some(flags) => {
                let fd = create_memfd(flags, cfg.size)?;
                let guest = Mapping::new(len, rw, libc::MAP_SHARED, Some(fd.as_fd()))
                    .map_err(|e| hugetlb_mmap_error(cfg, e))?;
                let staging = Mapping::new(len, rw, libc::MAP_SHARED, Some(fd.as_fd()))?;
                (Some(fd), guest, Some(staging))
            }
            None => {
                let m = Mapping::new(len, rw, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, None)?;
                match cfg.thp {
                    ThpMode::Madvise => m.madvise(libc::MADV_HUGEPAGE, "madvise(MADV_HUGEPAGE)")?,
                    ThpMode::Off => m.madvise(libc::MADV_NOHUGEPAGE, "madvise(MADV_NOHUGEPAGE)")?,
                }
                (None, m, None)
            }
        };
        if cfg.prefault == Prefault::Populate {
            guest_view.madvise(MADV_POPULATE_WRITE, "madvise(MADV_POPULATE_WRITE)")?;
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
        Ok(GuestRam {
            staging,
            staging_view,
            guest_view,
            memfd,
            backing: cfg.backing,
            size: cfg.size,
        })
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

    fn require_host() -> bool {
        std::env::var("HUGEVISOR_REQUIRE_HOST").is_ok_and(|v| v == "1")
    }

    fn pool_ok(page: u64, pages: u64) -> bool {
        let ok = HostPaths::default()
            .hugetlb_pool(page)
            .is_some_and(|p| p.available() >= pages);
        if !ok {
            assert!(
                !require_host(),
                "HUGEVISOR_REQUIRE_HOST=1 but the {page}-byte hugetlb pool lacks {pages} pages"
            );
            eprintln!("SKIP: the {page}-byte hugetlb pool lacks {pages} free pages");
        }
        ok
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

    /// A fake /proc + /sys tree.
    fn fake_host(
        free_2m: u64,
        nr_2m: u64,
        mem_available_kib: u64,
    ) -> (std::path::PathBuf, HostPaths) {
        let root = std::env::temp_dir().join(format!(
            "guest-mm-host-{}-{free_2m}-{mem_available_kib}",
            std::process::id()
        ));
        let pool = root.join("sys/kernel/mm/hugepages/hugepages-2048kB");
        std::fs::create_dir_all(&pool).unwrap();
        std::fs::create_dir_all(root.join("proc")).unwrap();
        std::fs::write(pool.join("nr_hugepages"), format!("{nr_2m}\n")).unwrap();
        std::fs::write(pool.join("free_hugepages"), format!("{free_2m}\n")).unwrap();
        std::fs::write(pool.join("resv_hugepages"), "0\n").unwrap();
        std::fs::write(
            root.join("proc/meminfo"),
            format!("MemTotal: 100 kB\nMemAvailable: {mem_available_kib} kB\n"),
        )
        .unwrap();
        let host = HostPaths {
            proc_root: root.join("proc"),
            sys_root: root.join("sys"),
        };
        (root, host)
    }

    #[test]
    fn pool_too_small_names_the_fix() {
        let (root, host) = fake_host(10, 10, 1 << 30);
        let c = RamConfig {
            size: 64 << 20,
            backing: BackingKind::Hugetlb2M,
            host,
            ..Default::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("echo 32 >") && e.contains("hugepages-2048kB/nr_hugepages"),
            "{e}"
        );
        assert!(e.contains("10 free") && e.contains("32 are needed"), "{e}");
        let c1g = RamConfig {
            backing: BackingKind::Hugetlb1G,
            size: 1 << 30,
            ..c
        };
        let e = c1g.validate().unwrap_err().to_string();
        assert!(e.contains("no 1 GiB hugetlb pool"), "{e}");
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn more_than_mem_available_is_refused() {
        let (root, host) = fake_host(0, 0, 100 << 10);
        let c = RamConfig {
            size: 1 << 30,
            backing: BackingKind::Shmem,
            host,
            ..Default::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("MemAvailable") && e.contains("100 MiB"), "{e}");
        // Nothing is created when validation fails.
        assert!(GuestRam::create(&c).is_err());
        std::fs::remove_dir_all(root).unwrap();
    }
}
