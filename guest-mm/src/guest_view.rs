//! The guest view's userfaultfd and its host-side mapping changes: registration (MINOR
//! only, or MISSING|MINOR for post-copy), re-registration after a NUMA move remapped part
//! of the view, unregistration when post-copy ends, the zap every notifier invalidation
//! asks for, and **the one** `UFFDIO_CONTINUE` with one error policy:
//!
//! - EEXIST (another resolution mapped it first): wake the waiters, done;
//! - ENOENT after the view was unregistered (post-copy ended): unregistering woke every
//!   waiter, which now faults the page in without us — done;
//! - EAGAIN (the mm changed under the ioctl): retry.
//!
//! Only file-backed RAM is ever registered or zapped: MINOR faults need page cache, and
//! zapping the single view of anonymous RAM would discard it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::addr::{Gpa, GpaRange};
use crate::config::ViewLayout;
use crate::error::Error;
use crate::ram::GuestRam;
use crate::stage::{InvalidateReason, MmuNotifierSubscriber};

/// Which faults the guest view raises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Registration {
    /// Not registered: every access is the kernel's business.
    None,
    /// Zapped pages only (a hole is zero-filled by the kernel without an event).
    MinorOnly,
    /// Post-copy: holes raise MISSING too, so no page is ever zero-filled behind our back.
    MissingAndMinor,
}

impl Registration {
    fn mode(self) -> Option<uffd::RegisterMode> {
        match self {
            Registration::None => None,
            Registration::MinorOnly => Some(uffd::RegisterMode::MINOR),
            Registration::MissingAndMinor => {
                Some(uffd::RegisterMode::MINOR | uffd::RegisterMode::MISSING)
            }
        }
    }
}

/// What the one CONTINUE did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Continued {
    /// The range is mapped now, and its waiters woken.
    Mapped,
    /// It was mapped already (EEXIST); its waiters were woken.
    AlreadyMapped,
    /// The view is not registered (never, or post-copy ended): nothing waits on it.
    NotRegistered,
}

/// EAGAIN retries of one CONTINUE before it counts as a failure.
const CONTINUE_RETRIES: u32 = 1000;

/// The guest view's userfaultfd side.
pub(crate) struct GuestView {
    ram: Arc<GuestRam>,
    uffd: OnceLock<Arc<uffd::Uffd>>,
    registration: Mutex<Registration>,
    /// Zaps and re-registrations that failed (the guest view may then not be guarded).
    failures: AtomicU64,
}

impl GuestView {
    pub(crate) fn new(ram: Arc<GuestRam>) -> GuestView {
        GuestView {
            ram,
            uffd: OnceLock::new(),
            registration: Mutex::new(Registration::None),
            failures: AtomicU64::new(0),
        }
    }

    /// The view's userfaultfd, opened on first use.
    pub(crate) fn uffd(&self) -> Result<&Arc<uffd::Uffd>, Error> {
        if let Some(u) = self.uffd.get() {
            return Ok(u);
        }
        let u = uffd::Uffd::open(
            uffd::Features::THREAD_ID
                | uffd::Features::MINOR_SHMEM
                | uffd::Features::MINOR_HUGETLBFS,
        )
        .map_err(|source| Error::Uffd {
            what: "opening it",
            source,
        })?;
        // Only the registration path opens it, under the registration lock.
        Ok(self.uffd.get_or_init(|| Arc::new(u)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registration> {
        self.registration.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn registration(&self) -> Registration {
        *self.lock()
    }

    /// Registers the whole view for `registration`'s faults (or unregisters it for
    /// `Registration::None`).
    pub(crate) fn register(&self, registration: Registration) -> Result<(), Error> {
        let mut current = self.lock();
        if self.ram.view_layout() == ViewLayout::SingleView {
            if registration == Registration::None {
                return Ok(());
            }
            return Err(Error::PostcopyNeedsFileRam);
        }
        let (base, size) = (self.ram.guest_view_addr(), self.ram.size());
        match registration.mode() {
            Some(mode) => {
                let u = self.uffd()?;
                u.register(base, size, mode).map_err(|source| Error::Uffd {
                    what: "registering the guest view",
                    source,
                })?;
                *current = registration;
            }
            None => {
                // Unregistered first in our own state: a CONTINUE that races with the
                // ioctl and gets ENOENT then knows why.
                let was = std::mem::replace(&mut *current, Registration::None);
                if let (Some(u), true) = (self.uffd.get(), was != Registration::None) {
                    u.unregister(base, size).map_err(|source| Error::Uffd {
                        what: "unregistering the guest view",
                        source,
                    })?;
                }
            }
        }
        Ok(())
    }

    /// The host address of `range` in the guest view, clamped to guest RAM.
    fn host(&self, range: GpaRange) -> (u64, u64) {
        let r = range.clamp_to(self.ram.size());
        (self.ram.guest_view_addr() + r.start.0, r.len())
    }

    /// The guest-physical address of a host address in the guest view, if it is one.
    pub(crate) fn gpa_of(&self, host: u64) -> Option<Gpa> {
        let base = self.ram.guest_view_addr();
        (host >= base && host < base + self.ram.size()).then(|| Gpa(host - base))
    }

    /// The one UFFDIO_CONTINUE: maps `range`'s page cache into the guest view and wakes
    /// whoever waits on it (the policy is in the module header).
    pub(crate) fn continue_range(&self, range: GpaRange) -> Result<Continued, Error> {
        let Some(u) = self.uffd.get() else {
            return Ok(Continued::NotRegistered);
        };
        if self.registration() == Registration::None {
            return Ok(Continued::NotRegistered);
        }
        let (start, len) = self.host(range);
        let mut tries = 0;
        loop {
            let err = match u.continue_range(start, len, uffd::Wake::Yes) {
                Ok(()) => return Ok(Continued::Mapped),
                Err(uffd::Error::AlreadyMapped { .. }) => {
                    return match u.wake(start, len) {
                        Ok(()) => Ok(Continued::AlreadyMapped),
                        Err(source) => Err(Error::Uffd {
                            what: "UFFDIO_WAKE after EEXIST",
                            source,
                        }),
                    };
                }
                Err(uffd::Error::Ioctl { ref source, .. })
                    if source.raw_os_error() == Some(libc::ENOENT)
                        && self.registration() == Registration::None =>
                {
                    return Ok(Continued::NotRegistered);
                }
                Err(uffd::Error::Retry { .. }) if tries < CONTINUE_RETRIES => {
                    tries += 1;
                    std::thread::yield_now();
                    continue;
                }
                Err(e) => e,
            };
            return Err(Error::Uffd {
                what: "UFFDIO_CONTINUE",
                source: err,
            });
        }
    }

    /// A hint fault's resolution of a whole region: one CONTINUE per run of formerly
    /// hinted pages (one for a region hinted as a whole), then the one CONTINUE of the
    /// faulting `span` with the policy above, so that its vCPU is woken whatever the runs
    /// met. A run that stops early (a page mapped already, a hole of the page cache that
    /// the kernel zero-fills on first touch under MINOR-only registration) is finished
    /// page by page, skipping those pages: the guest touched none of them, and each
    /// raises its own fault later if it needs one.
    pub(crate) fn continue_region(&self, span: GpaRange, runs: &[GpaRange]) -> Result<(), Error> {
        if let Some(u) = self.uffd.get() {
            for &run in runs {
                let (start, len) = self.host(run);
                if len == 0 || u.continue_range(start, len, uffd::Wake::Yes).is_ok() {
                    continue;
                }
                if self.registration() == Registration::None {
                    break;
                }
                self.continue_pages(u, run)?;
            }
        }
        self.continue_range(span).map(|_| ())
    }

    /// Finishes a run that stopped early, one backing page at a time (see
    /// [`continue_region`](Self::continue_region)).
    fn continue_pages(&self, u: &uffd::Uffd, run: GpaRange) -> Result<(), Error> {
        let page = self.ram.page_size();
        for p in run.pages(page) {
            let (start, len) = self.host(GpaRange::new(Gpa(p * page), Gpa((p + 1) * page)));
            let mut tries = 0;
            loop {
                match u.continue_range(start, len, uffd::Wake::Yes) {
                    Ok(()) | Err(uffd::Error::AlreadyMapped { .. }) => break,
                    Err(uffd::Error::Retry { .. }) if tries < CONTINUE_RETRIES => {
                        tries += 1;
                        std::thread::yield_now();
                    }
                    // A hole: nothing to map; the kernel fills it on first touch.
                    Err(uffd::Error::Ioctl { ref source, .. })
                        if source.raw_os_error() == Some(libc::EFAULT) =>
                    {
                        break
                    }
                    Err(_) if self.registration() == Registration::None => return Ok(()),
                    Err(source) => {
                        return Err(Error::Uffd {
                            what: "UFFDIO_CONTINUE of a hinted region",
                            source,
                        })
                    }
                }
            }
        }
        Ok(())
    }

    pub(crate) fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

impl MmuNotifierSubscriber for GuestView {
    /// Zaps the range so that the kernel's own mmu notifier drops KVM's entries; the page
    /// cache keeps the content, and the next vCPU touch is a MINOR fault.
    fn invalidate_range_start(&self, range: GpaRange, reason: InvalidateReason) {
        if !reason.zaps_host_mapping() {
            return;
        }
        if self.ram.zap_guest_view(range).is_err() {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A NUMA move remapped the range in place, which dropped its userfaultfd
    /// registration: register it again, as the rest of the view is.
    fn invalidate_range_end(&self, range: GpaRange, reason: InvalidateReason) {
        if reason != InvalidateReason::Move {
            return;
        }
        let current = self.lock();
        let (Some(mode), Some(u)) = (current.mode(), self.uffd.get()) else {
            return;
        };
        let (start, len) = self.host(range);
        if len > 0 && u.register(start, len, mode).is_err() {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
    }
}
