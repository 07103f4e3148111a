//! The only owner of host mappings of guest RAM: every `mmap`, `munmap`, `madvise`
//! (populate, thp hints, zap, collapse) and `mincore` of a view is a method here, on the
//! range it was asked for and checked to lie inside the mapping.
//!
//! Raw `libc` calls: vm-memory maps files but does not create memfds, and its file
//! mappings use MAP_NORESERVE, which for hugetlb would turn a short pool into a SIGBUS at
//! first touch instead of an error at start-up.

use std::os::fd::{AsRawFd, BorrowedFd};

use crate::addr::{GpaRange, SIZE_2M, SIZE_4K};
use crate::collapse::CollapseFailure;
use crate::config::ThpMode;
use crate::error::{os, Error};

/// An mmap this crate owns; unmapped on drop. Offsets are bytes from its start, which
/// for a view of guest RAM is guest-physical 0.
pub(crate) struct Mapping {
    addr: *mut u8,
    len: usize,
}

/// What a mapping is made of.
pub(crate) enum Source<'a> {
    /// `MAP_SHARED` of a memfd from offset 0.
    Shared(BorrowedFd<'a>),
    /// `MAP_PRIVATE | MAP_ANONYMOUS`.
    Anonymous,
}

const RW: libc::c_int = libc::PROT_READ | libc::PROT_WRITE;

/// The advice [`Mapping::advise_part`] gives a part of a mapping.
#[derive(Clone, Copy)]
enum Advice {
    /// Allocate the pages for writing (MADV_POPULATE_WRITE).
    PopulateWrite,
    /// Drop the page-table entries (MADV_DONTNEED).
    DontNeed,
}

impl Mapping {
    /// A read/write mapping of `len` bytes starting on an `align` boundary.
    pub(crate) fn new(len: usize, source: Source<'_>, align: usize) -> Result<Self, Error> {
        let (flags, raw_fd) = match source {
            Source::Shared(fd) => (libc::MAP_SHARED, fd.as_raw_fd()),
            Source::Anonymous => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
        };
        // A view starts on an `align` boundary (2 MiB, or the hugetlb page size), as
        // file offset 0 does: the kernel maps a huge page only where virtual address and
        // file offset agree modulo its size, so an unaligned view could never be
        // PMD-mapped or collapsed. Reserve len + align of address space, place the view
        // at the first boundary inside, return the slack.
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
                RW,
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

    /// The host address of the mapping's first byte.
    pub(crate) fn addr(&self) -> *mut u8 {
        self.addr
    }

    /// The host address range [start, end) of the mapping.
    pub(crate) fn host_range(&self) -> (u64, u64) {
        (self.addr as u64, self.addr as u64 + self.len as u64)
    }

    /// `range` clamped to the mapping, as (host address, length); None when empty.
    fn part(&self, range: GpaRange) -> Option<(*mut libc::c_void, usize)> {
        let r = range.clamp_to(self.len as u64);
        if r.is_empty() {
            return None;
        }
        // SAFETY: r.start < len, so the pointer stays inside the mapping.
        let p = unsafe { self.addr.add(r.start.0 as usize) };
        Some((p.cast(), r.len() as usize))
    }

    /// The thp hint for the whole mapping (HUGEPAGE or NOHUGEPAGE).
    pub(crate) fn advise_thp(&self, thp: ThpMode) -> Result<(), Error> {
        let (advice, op) = match thp {
            ThpMode::Madvise => (libc::MADV_HUGEPAGE, "madvise(MADV_HUGEPAGE)"),
            ThpMode::Off => (libc::MADV_NOHUGEPAGE, "madvise(MADV_NOHUGEPAGE)"),
        };
        // SAFETY: the range is exactly this live mapping; these advice values change how
        // it may be mapped, never its content.
        if unsafe { libc::madvise(self.addr.cast(), self.len, advice) } != 0 {
            return Err(os(op));
        }
        Ok(())
    }

    /// Allocates the pages of `range` for writing, as a write of each would
    /// (MADV_POPULATE_WRITE); pages already there keep their content.
    pub(crate) fn populate_range(&self, range: GpaRange) -> Result<(), Error> {
        // POPULATE_WRITE only faults pages in and never changes the content of one that
        // is there.
        self.advise_part(range, Advice::PopulateWrite)
    }

    /// `madvise(advice)` over the part of the mapping in `range` (nothing if none).
    fn advise_part(&self, range: GpaRange, advice: Advice) -> Result<(), Error> {
        let Some((p, len)) = self.part(range) else {
            return Ok(());
        };
        let (flag, op) = match advice {
            Advice::PopulateWrite => (libc::MADV_POPULATE_WRITE, "madvise(MADV_POPULATE_WRITE)"),
            Advice::DontNeed => (
                libc::MADV_DONTNEED,
                "madvise(MADV_DONTNEED) of the guest view",
            ),
        };
        // SAFETY: [p, p+len) lies inside this live mapping (`part` clamps); the advice is
        // one of `Advice`'s, whose callers say why it keeps the content they need.
        if unsafe { libc::madvise(p, len, flag) } != 0 {
            return Err(os(op));
        }
        Ok(())
    }

    /// Allocates every page of the mapping for writing. MADV_POPULATE_WRITE (Linux 5.14)
    /// first; on EINVAL (an older kernel that does not know the advice) one byte of each
    /// `page`-sized page is written instead. Only used on freshly made, zero-filled views.
    pub(crate) fn populate_write(&self, page: u64) -> Result<(), Error> {
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

    /// Zaps `range`: MADV_DONTNEED drops the page-table entries; on a shared file
    /// mapping the page cache (the guest's content) stays, and the kernel's own mmu
    /// notifier drops KVM's entries. Never call this on anonymous RAM: it would discard
    /// the content.
    pub(crate) fn zap(&self, range: GpaRange) -> Result<(), Error> {
        // On the shared file mappings this is used on, DONTNEED keeps the page cache.
        self.advise_part(range, Advice::DontNeed)
    }

    /// `madvise(MADV_COLLAPSE)` of the 2 MiB region at `region`.
    pub(crate) fn collapse(&self, region: GpaRange) -> Result<(), CollapseFailure> {
        debug_assert_eq!(region.len(), SIZE_2M);
        let Some((p, len)) = self.part(region) else {
            return Err(CollapseFailure::NotComplete);
        };
        // SAFETY: MADV_COLLAPSE changes how an existing range is mapped, never its
        // content; the range lies inside this live mapping.
        if unsafe { libc::madvise(p, len, libc::MADV_COLLAPSE) } == 0 {
            Ok(())
        } else {
            Err(CollapseFailure::from_errno(
                std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
            ))
        }
    }

    /// Which 4 KiB pages of the 2 MiB region at `region` the host holds (mincore), one bit
    /// per page; None when the kernel refuses.
    pub(crate) fn resident_2m(&self, region: GpaRange) -> Option<[u64; 8]> {
        let (p, len) = self.part(region)?;
        if len as u64 != SIZE_2M {
            return None;
        }
        let mut vec = [0u8; (SIZE_2M / SIZE_4K) as usize];
        // SAFETY: [p, p+2 MiB) lies inside this mapping; `vec` has one byte per 4 KiB page.
        if unsafe { libc::mincore(p, len, vec.as_mut_ptr()) } != 0 {
            return None;
        }
        let mut bits = [0u64; 8];
        for (i, b) in vec.iter().enumerate() {
            if b & 1 != 0 {
                bits[i / 64] |= 1 << (i % 64);
            }
        }
        Some(bits)
    }

    /// Replaces `range` of this mapping with `fd` at the same offset (same address, same
    /// protection): a NUMA move to another emulated zone.
    pub(crate) fn remap(&self, range: GpaRange, fd: BorrowedFd<'_>) -> Result<(), Error> {
        if range.end.0 > self.len as u64 {
            return Err(Error::RemapOutside { range });
        }
        let Some((p, len)) = self.part(range) else {
            return Ok(());
        };
        // SAFETY: MAP_FIXED over a part of our own mapping (checked to be inside it) with
        // the same protection; the address range stays mapped throughout.
        let addr = unsafe {
            libc::mmap(
                p,
                len,
                RW,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd.as_raw_fd(),
                range.start.0 as libc::off_t,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(os("mmap(MAP_FIXED) for a NUMA move"));
        }
        Ok(())
    }

    /// Writes `range` of this mapping into `fd` at the same offset (the copy of a NUMA
    /// move between emulated zones).
    pub(crate) fn write_to(&self, range: GpaRange, fd: BorrowedFd<'_>) -> Result<(), Error> {
        let Some((p, len)) = self.part(range) else {
            return Ok(());
        };
        let mut done = 0usize;
        while done < len {
            // SAFETY: reads [p+done, p+len) of this live mapping (inside it: `part`) and
            // writes it to `fd` at the same guest-physical offset.
            let n = unsafe {
                libc::pwrite(
                    fd.as_raw_fd(),
                    p.cast::<u8>().add(done).cast(),
                    len - done,
                    (range.start.0 + done as u64) as libc::off_t,
                )
            };
            if n <= 0 {
                return Err(os("pwrite into the destination node"));
            }
            done += n as usize;
        }
        Ok(())
    }
}

// SAFETY: a Mapping is an address range in this process's address space, valid until
// Drop; the pointer is never dereferenced by Mapping itself except in the bounded,
// volatile accesses above. Guest memory behind it is accessed through vm-memory's
// volatile accessors or by KVM, both usable from any thread.
unsafe impl Send for Mapping {}
// SAFETY: as above; &Mapping hands out the address and issues madvise/mmap calls on its
// own range, which the kernel serialises.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: addr/len are a mapping made by Mapping::new and unmapped only here.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}
