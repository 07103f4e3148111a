//! The KVM dirty ring: per-vCPU rings of written guest frames, an alternative to the
//! per-memslot dirty bitmap (`KVM_GET_DIRTY_LOG`) for pre-copy migration.
//!
//! KVM pushes one `struct kvm_dirty_gfn` per first write to a page into the ring of the
//! vCPU that wrote it. The VMM *harvests*: from its fetch index, while an entry has the
//! DIRTY flag, record (slot, offset), flag it RESET and advance; then
//! `KVM_RESET_DIRTY_RINGS` re-arms write tracking for the harvested pages and frees their
//! entries. When a ring nears full, KVM_RUN returns `KVM_EXIT_DIRTY_RING_FULL` and the vCPU
//! must harvest its own ring before it runs again ([`DirtyRing::harvest_vcpu`]).
//!
//! Everything harvested lands in one bitmap of slot 0 (one bit per 4 KiB page), the same
//! shape `KVM_GET_DIRTY_LOG` returns, so the migration code does not know which is in use.
//! Harvest, reset and taking the bitmap happen under one lock: a page handed out by
//! [`DirtyRing::take`] has always been re-armed first, so a write after the caller reads the
//! page is logged again (reading before the reset could lose it).
//!
//! kvm-ioctls 0.25 has no wrapper for any of this; the numbers and the entry layout are
//! written here and checked at compile time against kvm-bindings and the `_IO` formula.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use kvm_bindings::kvm_enable_cap;
use kvm_ioctls::{VcpuFd, VmFd};

use crate::error::{kvm, ConfigError, Error, Result};

/// The smallest ring KVM accepts: one page of entries.
pub const MIN_ENTRIES: u32 = 256;
/// `KVM_DIRTY_RING_MAX_ENTRIES`: the largest ring any KVM accepts (1 MiB per vCPU).
pub const MAX_ENTRIES: u32 = 65536;
/// The ring size `--dirty-log ring` uses when it names none.
pub const DEFAULT_ENTRIES: u32 = MAX_ENTRIES;

const KVM_CAP_DIRTY_LOG_RING: u32 = 192;
const KVM_CAP_DIRTY_LOG_RING_ACQ_REL: u32 = 223;
/// Page offset of the ring in a vCPU fd's mmap space.
const KVM_DIRTY_LOG_PAGE_OFFSET: u32 = 64;
/// `kvm_run.exit_reason` when a vCPU's ring is (soft-)full.
pub const KVM_EXIT_DIRTY_RING_FULL: u32 = 31;

const KVMIO: libc::c_ulong = 0xae;
/// `_IO(type, nr)`: no direction, no size.
const fn io(nr: libc::c_ulong) -> libc::c_ulong {
    (KVMIO << 8) | nr
}
/// `_IO(KVMIO, 0xc7)`, on the VM fd.
const KVM_RESET_DIRTY_RINGS: libc::c_ulong = io(0xc7);

/// `kvm_dirty_gfn.flags`: KVM wrote the entry; the VMM has not harvested it.
const GFN_DIRTY: u32 = 1 << 0;
/// `kvm_dirty_gfn.flags`: the VMM harvested the entry; KVM may reuse it after a reset.
const GFN_RESET: u32 = 1 << 1;

/// `struct kvm_dirty_gfn`, with `flags` atomic: KVM and the VMM hand entries to each
/// other through it (KVM stores DIRTY with release, we store RESET with release).
#[repr(C)]
struct DirtyGfn {
    flags: AtomicU32,
    /// `as_id << 16 | slot id`.
    slot: u32,
    /// Page frame within the slot.
    offset: u64,
}

const _: () = assert!(KVM_CAP_DIRTY_LOG_RING == kvm_bindings::KVM_CAP_DIRTY_LOG_RING);
const _: () =
    assert!(KVM_CAP_DIRTY_LOG_RING_ACQ_REL == kvm_bindings::KVM_CAP_DIRTY_LOG_RING_ACQ_REL);
const _: () = assert!(KVM_DIRTY_LOG_PAGE_OFFSET == kvm_bindings::KVM_DIRTY_LOG_PAGE_OFFSET);
const _: () = assert!(KVM_EXIT_DIRTY_RING_FULL == kvm_bindings::KVM_EXIT_DIRTY_RING_FULL);
const _: () = assert!(KVM_RESET_DIRTY_RINGS == 0xaec7);
const _: () = assert!(GFN_DIRTY | GFN_RESET == kvm_bindings::KVM_DIRTY_GFN_F_MASK);
const _: () = assert!(std::mem::size_of::<DirtyGfn>() == 16);
const _: () = assert!(std::mem::align_of::<DirtyGfn>() == 8);
const _: () = assert!(std::mem::offset_of!(DirtyGfn, flags) == 0);
const _: () = assert!(std::mem::offset_of!(DirtyGfn, slot) == 4);
const _: () = assert!(std::mem::offset_of!(DirtyGfn, offset) == 8);
const _: () =
    assert!(std::mem::size_of::<DirtyGfn>() == std::mem::size_of::<kvm_bindings::kvm_dirty_gfn>());
const _: () = assert!(MIN_ENTRIES as usize * std::mem::size_of::<DirtyGfn>() == 4096);
const _: () = assert!(MAX_ENTRIES.is_power_of_two() && MIN_ENTRIES.is_power_of_two());

/// Which flavour of the capability KVM gave us. Both share the ring layout; ACQ_REL
/// documents the acquire/release hand-off this module already follows (and is what arm64
/// needs), so it is preferred when offered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingCap {
    AcqRel,
    Plain,
}

/// What this KVM offers: the capability flavour and the largest ring, in entries per
/// vCPU; None without a dirty ring. Asked on the system fd, for `hugevisor caps`.
pub fn offered(kvm: &kvm_ioctls::Kvm) -> Option<(RingCap, u64)> {
    let entry = std::mem::size_of::<DirtyGfn>() as u64;
    let acq_rel = kvm.check_extension_raw(KVM_CAP_DIRTY_LOG_RING_ACQ_REL.into());
    let plain = kvm.check_extension_raw(KVM_CAP_DIRTY_LOG_RING.into());
    if acq_rel > 0 {
        Some((RingCap::AcqRel, acq_rel as u64 / entry))
    } else if plain > 0 {
        Some((RingCap::Plain, plain as u64 / entry))
    } else {
        None
    }
}

/// Checks a ring size from the command line: a power of two within what any KVM accepts.
pub fn check_entries(entries: u32) -> std::result::Result<(), ConfigError> {
    if !entries.is_power_of_two() {
        return Err(ConfigError::DirtyRingEntries {
            entries,
            why: "must be a power of two (e.g. 4096, 65536)",
        });
    }
    if !(MIN_ENTRIES..=MAX_ENTRIES).contains(&entries) {
        return Err(ConfigError::DirtyRingEntries {
            entries,
            why: "must be between 256 (4 KiB) and 65536 (1 MiB) per vCPU",
        });
    }
    Ok(())
}

/// One vCPU's ring, mapped from its fd.
struct VcpuRing {
    vcpu: usize,
    base: NonNull<DirtyGfn>,
    entries: u32,
    /// The next entry to look at (free-running; masked by `entries - 1`).
    fetch: u32,
}

// SAFETY: the ring mapping belongs to this value alone (unmapped on drop) and every access
// to it goes through `DirtyRing::state`'s mutex; KVM's concurrent writes are synchronised
// through the atomic flags word of each entry.
unsafe impl Send for VcpuRing {}

impl Drop for VcpuRing {
    fn drop(&mut self) {
        let len = self.entries as usize * std::mem::size_of::<DirtyGfn>();
        // SAFETY: `base` is the start of a mapping of exactly `len` bytes made in
        // `DirtyRing::attach`, unmapped nowhere else; nothing refers to it after drop.
        unsafe { libc::munmap(self.base.as_ptr().cast(), len) };
    }
}

impl VcpuRing {
    /// Moves every DIRTY entry (in order from the fetch index) into `bitmap` and flags it
    /// RESET. Returns how many entries it took.
    fn collect(&mut self, bitmap: &mut Vec<u64>) -> u64 {
        let mask = self.entries - 1;
        let mut n = 0u64;
        while n < self.entries as u64 {
            let i = (self.fetch & mask) as usize;
            // SAFETY: i < entries, and the mapping holds `entries` entries.
            let e = unsafe { self.base.as_ptr().add(i) };
            // SAFETY: `e` points into the live ring; `flags` is an AtomicU32 (KVM writes it
            // concurrently, so only an atomic reference to it is formed, never &DirtyGfn).
            let flags = unsafe { &*std::ptr::addr_of!((*e).flags) };
            if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                break;
            }
            // SAFETY: the acquire load of DIRTY orders these reads after KVM's writes of
            // the entry; KVM does not touch a DIRTY entry until we flag it RESET and reset.
            let (slot, offset) = unsafe {
                (
                    std::ptr::read_volatile(std::ptr::addr_of!((*e).slot)),
                    std::ptr::read_volatile(std::ptr::addr_of!((*e).offset)),
                )
            };
            // Guest RAM is slot 0 of address space 0; there is no other slot to log.
            if slot == 0 {
                let word = (offset / 64) as usize;
                if word >= bitmap.len() {
                    bitmap.resize(word + 1, 0);
                }
                bitmap[word] |= 1 << (offset % 64);
            }
            flags.store(GFN_RESET, Ordering::Release);
            self.fetch = self.fetch.wrapping_add(1);
            n += 1;
        }
        n
    }
}

struct Harvest {
    rings: Vec<VcpuRing>,
    /// Pages harvested and re-armed but not yet taken: one bit per 4 KiB page of slot 0.
    bitmap: Vec<u64>,
}

/// The dirty rings of one VM: enabled on the VM fd before any vCPU exists, one ring
/// attached per vCPU as it is created.
pub struct DirtyRing {
    /// A duplicate of the VM fd, for `KVM_RESET_DIRTY_RINGS` from vCPU threads.
    vm_fd: OwnedFd,
    entries: u32,
    cap: RingCap,
    state: Mutex<Harvest>,
}

impl std::fmt::Debug for DirtyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DirtyRing({} entries, {:?})", self.entries, self.cap)
    }
}

impl DirtyRing {
    /// Enables the dirty ring on `vm`, which must have no vCPU yet.
    pub fn enable(vm: &VmFd, entries: u32) -> Result<DirtyRing> {
        check_entries(entries)?;
        let acq_rel = vm.check_extension_raw(KVM_CAP_DIRTY_LOG_RING_ACQ_REL.into());
        let plain = vm.check_extension_raw(KVM_CAP_DIRTY_LOG_RING.into());
        let (cap, cap_nr, max_bytes) = if acq_rel > 0 {
            (RingCap::AcqRel, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, acq_rel)
        } else if plain > 0 {
            (RingCap::Plain, KVM_CAP_DIRTY_LOG_RING, plain)
        } else {
            return Err(Error::DirtyRingUnsupported);
        };
        let bytes = entries as u64 * std::mem::size_of::<DirtyGfn>() as u64;
        if bytes > max_bytes as u64 {
            return Err(Error::DirtyRingTooLarge {
                entries,
                max_entries: max_bytes as u64 / std::mem::size_of::<DirtyGfn>() as u64,
            });
        }
        let mut enable = kvm_enable_cap {
            cap: cap_nr,
            ..Default::default()
        };
        enable.args[0] = bytes;
        vm.enable_cap(&enable).map_err(|e| match e.errno() {
            // The size passed the checks above, so KVM wants more than its reserved
            // entries (or a vCPU already exists, which this module's callers never do).
            libc::EINVAL => ConfigError::DirtyRingRefused { entries, bytes }.into(),
            _ => kvm("KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING)")(e),
        })?;
        // SAFETY: F_DUPFD_CLOEXEC on a valid, open fd; it returns a new fd or -1.
        let dup = unsafe { libc::fcntl(vm.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(Error::Io {
                what: "duplicating the VM fd for the dirty ring".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(DirtyRing {
            // SAFETY: `dup` is a new fd that nothing else owns.
            vm_fd: unsafe { OwnedFd::from_raw_fd(dup) },
            entries,
            cap,
            state: Mutex::new(Harvest {
                rings: Vec::new(),
                bitmap: Vec::new(),
            }),
        })
    }

    pub fn entries(&self) -> u32 {
        self.entries
    }

    pub fn cap(&self) -> RingCap {
        self.cap
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Harvest> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Maps the ring of a newly created vCPU.
    pub fn attach(&self, vcpu: usize, fd: &VcpuFd) -> Result<()> {
        let len = self.entries as usize * std::mem::size_of::<DirtyGfn>();
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let offset = KVM_DIRTY_LOG_PAGE_OFFSET as libc::off_t * page as libc::off_t;
        // SAFETY: a new shared mapping of the vCPU fd's ring area, of the size the ring was
        // enabled with; the result is checked before use and owned by the VcpuRing below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::Io {
                what: format!("mapping the dirty ring of vCPU {vcpu}"),
                source: std::io::Error::last_os_error(),
            });
        }
        let base = NonNull::new(p.cast::<DirtyGfn>()).ok_or_else(|| Error::Io {
            what: format!("mapping the dirty ring of vCPU {vcpu}"),
            source: std::io::Error::other("mmap returned NULL"),
        })?;
        let ring = VcpuRing {
            vcpu,
            base,
            entries: self.entries,
            fetch: 0,
        };
        let mut st = self.lock();
        st.rings.retain(|r| r.vcpu != vcpu);
        st.rings.push(ring);
        Ok(())
    }

    fn reset(&self) -> Result<()> {
        // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument; `vm_fd` is an open VM fd.
        let r = unsafe { libc::ioctl(self.vm_fd.as_raw_fd(), KVM_RESET_DIRTY_RINGS as _) };
        if r < 0 {
            return Err(kvm("KVM_RESET_DIRTY_RINGS")(
                vmm_sys_util::errno::Error::last(),
            ));
        }
        Ok(())
    }

    /// The ring-full exit: harvest vCPU `vcpu`'s ring into the bitmap and reset, so it can
    /// run again. Returns the number of entries harvested.
    pub fn harvest_vcpu(&self, vcpu: usize) -> Result<u64> {
        let mut st = self.lock();
        let Harvest { rings, bitmap } = &mut *st;
        let n = rings
            .iter_mut()
            .filter(|r| r.vcpu == vcpu)
            .map(|r| r.collect(bitmap))
            .sum();
        // Reset even when nothing was new: KVM counts the ring full until a reset.
        self.reset()?;
        Ok(n)
    }

    /// Harvests every ring, resets, and takes the bitmap of pages written since the last
    /// take: `slot_bytes / 4096` bits, in the layout of `KVM_GET_DIRTY_LOG`.
    pub fn take(&self, slot_bytes: u64) -> Result<Vec<u64>> {
        let mut st = self.lock();
        let Harvest { rings, bitmap } = &mut *st;
        let n: u64 = rings.iter_mut().map(|r| r.collect(bitmap)).sum();
        if n > 0 {
            self.reset()?;
        }
        let words = (slot_bytes / 4096).div_ceil(64) as usize;
        let mut out = std::mem::replace(bitmap, vec![0; words]);
        out.resize(words, 0);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_sizes_are_powers_of_two_within_kvm_limits() {
        assert!(check_entries(256).is_ok());
        assert!(check_entries(65536).is_ok());
        assert!(check_entries(1000)
            .unwrap_err()
            .to_string()
            .contains("power of two"));
        assert!(check_entries(128)
            .unwrap_err()
            .to_string()
            .contains("between"));
        assert!(check_entries(131072)
            .unwrap_err()
            .to_string()
            .contains("between"));
        assert!(check_entries(0).is_err());
    }

    #[test]
    fn collect_takes_dirty_entries_in_order_and_flags_them_reset() {
        // A ring in ordinary memory, filled as KVM would.
        let entries = 8u32;
        let mut mem: Vec<DirtyGfn> = (0..entries)
            .map(|_| DirtyGfn {
                flags: AtomicU32::new(0),
                slot: 0,
                offset: 0,
            })
            .collect();
        for (i, (slot, off)) in [(0u32, 3u64), (0, 70), (1, 5)].into_iter().enumerate() {
            mem[i].slot = slot;
            mem[i].offset = off;
            mem[i].flags.store(GFN_DIRTY, Ordering::Release);
        }
        let mut ring = VcpuRing {
            vcpu: 0,
            base: NonNull::new(mem.as_mut_ptr()).unwrap(),
            entries,
            fetch: 0,
        };
        let mut bitmap = Vec::new();
        assert_eq!(ring.collect(&mut bitmap), 3);
        assert_eq!(bitmap, vec![1 << 3, 1 << 6]);
        assert_eq!(ring.fetch, 3);
        assert!(mem[..3]
            .iter()
            .all(|e| e.flags.load(Ordering::Relaxed) == GFN_RESET));
        // Nothing new: nothing taken.
        assert_eq!(ring.collect(&mut bitmap), 0);
        // The ring must not unmap memory it does not own.
        std::mem::forget(ring);
    }
}
