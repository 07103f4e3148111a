//! What a migration needs from the VMM: the seam. The VMM implements these traits over
//! its guest memory, vCPUs and devices; the migration calls them from its own thread(s)
//! and knows nothing of KVM, userfaultfd or the second-stage table.
//!
//! Order of calls, source: `start_dirty_log` → `take_dirty_log`… → `pause` → (pages,
//! switch-over) → `stop_dirty_log`; `resume` only if the migration fails after `pause`
//! and before the destination confirmed it runs the guest. Destination: `write_page`…
//! → `restore` → (post-copy: `begin_postcopy`) → `start` → `resumed_after_migration` →
//! (post-copy: `install_page`… → `end_postcopy`).

use std::sync::Arc;

use guest_mm::{Gpa, GpaRange, Installed, InstalledPages, PageContent, Pager};
use serde::{Deserialize, Serialize};

use crate::wire::transport::Uri;

/// An error of the VMM's own, carried as the source of [`crate::Error::Host`].
pub type HostError = Box<dyn std::error::Error + Send + Sync>;

/// Guest memory as a migration sees it.
pub trait GuestPages: Send + Sync {
    fn size(&self) -> u64;
    /// The backing page: the granularity of every page frame.
    fn page_size(&self) -> u64;
    /// "shmem", "hugetlb-2m", ... (for Hello).
    fn backing(&self) -> String;
    /// Reads the backing page at `gpa` into `buf` (one backing page long).
    fn read_page(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), HostError>;
    /// Pre-copy receive: writes an arriving page while no vCPU runs.
    fn write_page(&self, gpa: Gpa, page: PageContent<'_>) -> Result<(), HostError>;
    /// Reads the extent at `gpa` (`buf` is whole backing pages, inside one region) into
    /// `buf`. Page by page unless the VMM does better.
    fn read_pages(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), HostError> {
        let ps = self.page_size() as usize;
        for (i, page) in buf.chunks_mut(ps).enumerate() {
            self.read_page(gpa.add((i * ps) as u64), page)?;
        }
        Ok(())
    }
    /// Pre-copy receive: writes an arriving extent while no vCPU runs.
    fn write_pages(&self, gpa: Gpa, bytes: &[u8]) -> Result<(), HostError> {
        let ps = self.page_size() as usize;
        for (i, page) in bytes.chunks(ps).enumerate() {
            self.write_page(gpa.add((i * ps) as u64), PageContent::Bytes(page))?;
        }
        Ok(())
    }
    /// Pre-copy receive: the extent of `pages` backing pages at `gpa` is all zeros.
    fn zero_pages(&self, gpa: Gpa, pages: u64) -> Result<(), HostError> {
        for i in 0..pages {
            self.write_page(gpa.add(i * self.page_size()), PageContent::Zero)?;
        }
        Ok(())
    }
    /// Post-copy: marks `absent` not-here-yet; a vCPU touching one of them calls `pager`.
    /// Returns how many backing pages are absent now: the migration installs that many.
    fn begin_postcopy(&self, absent: &[GpaRange], pager: Arc<dyn Pager>) -> Result<u64, HostError>;
    /// Post-copy: installs an arriving page if it is still absent (a duplicate never
    /// overwrites what the guest wrote since).
    fn install_page(&self, gpa: Gpa, page: PageContent<'_>) -> Result<Installed, HostError>;
    /// Post-copy: installs an arriving extent, each page only if it is still absent;
    /// says which pages were new. Page by page unless the VMM does better (one CONTINUE
    /// over each stretch of absent pages).
    fn install_pages(&self, gpa: Gpa, bytes: &[u8]) -> Result<InstalledPages, HostError> {
        let ps = self.page_size() as usize;
        let mut new = 0u64;
        for (i, page) in bytes.chunks(ps).enumerate().take(64) {
            let at = gpa.add((i * ps) as u64);
            if self.install_page(at, PageContent::Bytes(page))? == Installed::New {
                new |= 1 << i;
            }
        }
        Ok(InstalledPages(new))
    }
    /// Destination, before the source connects: get RAM ready for the pages to come
    /// (hugevisor populates hugetlb RAM in the background). Nothing by default.
    fn prepare_incoming(&self) -> Result<(), HostError> {
        Ok(())
    }
    /// Post-copy: every page is in; stop paging (e.g. unregister userfaultfd).
    fn end_postcopy(&self) -> Result<(), HostError>;
    /// The guest runs here after a migration (e.g. a collapse sweep).
    fn resumed_after_migration(&self);
}

/// The VM state a migration carries without looking inside (vCPUs, devices, the run's
/// info): serialised by the VMM, opaque here.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VmState(pub serde_json::Value);

/// What `pause` hands over.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Paused {
    pub state: VmState,
    /// Ranges the VMM itself wrote while the guest ran (the mailbox): not in KVM's dirty
    /// log, so they are sent after the pause in every mode.
    pub vmm_written: Vec<GpaRange>,
}

/// The source VM.
pub trait SourceVm: Send + Sync {
    fn pages(&self) -> &dyn GuestPages;
    fn vcpus(&self) -> u32;
    fn start_dirty_log(&self) -> Result<(), HostError>;
    /// One bit per 4 KiB page written since the last take (bit `i` of word `w` is the
    /// page at GPA `(w * 64 + i) * 4096`).
    fn take_dirty_log(&self) -> Result<Vec<u64>, HostError>;
    fn stop_dirty_log(&self);
    /// Stops the vCPUs in place and returns their state, plus the ranges the VMM itself
    /// wrote while the guest ran. An error means the guest still runs here.
    fn pause(&self) -> Result<Paused, HostError>;
    /// The migration failed after `pause`: the guest runs here again.
    fn resume(&self) -> Result<(), HostError>;
    /// Whether [`SourceVm::throttle`] can slow the vCPUs down (auto-converge). A VM that
    /// cannot leaves a pre-copy that does not converge to stop over its budget, saying so.
    fn can_throttle(&self) -> bool {
        false
    }
    /// Lets the vCPUs run only `100 - percent` % of the time (0: full speed again), so that
    /// the guest dirties memory slower than the wire sends it. Called with 0 when the
    /// migration ends, whichever way.
    fn throttle(&self, percent: u32) -> Result<(), HostError> {
        let _ = percent;
        Ok(())
    }
    /// The guest was handed over (`Start` sent) and a connection broke: in post-copy, or
    /// before a pre-copy destination confirmed it runs the guest. The source keeps what
    /// the destination may lack and never runs the guest again. Blocks until the VMM is
    /// asked to resume, and returns where to reconnect; `None` gives up (the migration
    /// fails, the guest stays the destination's). Called again, with the new error, when
    /// a resume attempt fails.
    fn handover_paused(&self, why: &crate::Error) -> Option<Uri> {
        let _ = why;
        None
    }
    /// A resumed migration goes on (after `handover_paused`).
    fn handover_resumed(&self) {}
}

/// What a destination tells its VMM while it receives (for `vm.info` and the report).
#[derive(Debug)]
pub enum IncomingEvent<'a> {
    /// A connection that is not this migration's (unauthenticated, garbage, another
    /// session, one too many) was refused.
    Refused { why: &'a str },
    /// Post-copy broke: this end keeps what it has and waits for the source to resume;
    /// vCPUs that touch one of the `lacking` pages wait for it (pause them: a starved
    /// guest must not spin).
    Paused { why: &'a crate::Error, lacking: u64 },
    /// The source is back: pages flow again.
    Resumed,
}

/// The destination VM (its vCPUs do not exist until `restore`).
pub trait DestinationVm: Send + Sync {
    fn pages(&self) -> &dyn GuestPages;
    fn vcpus(&self) -> u32;
    /// Builds the vCPUs/devices from the state (not running yet); an error aborts the
    /// migration.
    fn restore(&self, state: VmState) -> Result<(), HostError>;
    /// Starts the restored guest: the end of the downtime.
    fn start(&self) -> Result<(), HostError>;
    /// Something the VMM may show or act on (see [`IncomingEvent`]).
    fn note(&self, event: IncomingEvent<'_>) {
        let _ = event;
    }
}

/// What the source is doing, for a progress display.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Round(u32),
    StopAndCopy,
    Push,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Phase::Round(n) => write!(f, "round {n}"),
            Phase::StopAndCopy => f.write_str("stop+copy"),
            Phase::Push => f.write_str("push"),
        }
    }
}

/// Told about the source's progress: at each phase and every 256 pages.
pub trait Progress: Sync {
    fn update(&self, phase: Phase, bytes_sent: u64);
    /// The migration ended (either way).
    fn finished(&self) {}
}

/// No display.
pub struct NoProgress;

impl Progress for NoProgress {
    fn update(&self, _phase: Phase, _bytes_sent: u64) {}
}

/// Guest memory as hugevisor's VMM holds it: every page a migration sends or installs
/// goes straight to guest-mm, the one crate that writes, maps and CONTINUEs guest RAM.
impl GuestPages for guest_mm::GuestMemory {
    fn size(&self) -> u64 {
        guest_mm::GuestMemory::size(self)
    }

    fn page_size(&self) -> u64 {
        guest_mm::GuestMemory::page_size(self)
    }

    fn backing(&self) -> String {
        guest_mm::GuestMemory::backing(self).to_string()
    }

    fn read_page(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), HostError> {
        Ok(guest_mm::GuestMemory::read_page(self, gpa, buf)?)
    }

    fn write_page(&self, gpa: Gpa, page: PageContent<'_>) -> Result<(), HostError> {
        Ok(guest_mm::GuestMemory::write_page(self, gpa, page)?)
    }

    fn read_pages(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), HostError> {
        Ok(guest_mm::GuestMemory::read_pages(self, gpa, buf)?)
    }

    fn write_pages(&self, gpa: Gpa, bytes: &[u8]) -> Result<(), HostError> {
        Ok(guest_mm::GuestMemory::write_pages(self, gpa, bytes)?)
    }

    fn zero_pages(&self, gpa: Gpa, pages: u64) -> Result<(), HostError> {
        Ok(guest_mm::GuestMemory::zero_pages(self, gpa, pages)?)
    }

    fn install_pages(&self, gpa: Gpa, bytes: &[u8]) -> Result<InstalledPages, HostError> {
        Ok(guest_mm::GuestMemory::install_pages(self, gpa, bytes)?)
    }

    fn begin_postcopy(&self, absent: &[GpaRange], pager: Arc<dyn Pager>) -> Result<u64, HostError> {
        Ok(guest_mm::GuestMemory::begin_postcopy(self, absent, pager)?)
    }

    fn install_page(&self, gpa: Gpa, page: PageContent<'_>) -> Result<Installed, HostError> {
        Ok(guest_mm::GuestMemory::install_page(self, gpa, page)?)
    }

    fn prepare_incoming(&self) -> Result<(), HostError> {
        guest_mm::GuestMemory::prepare_incoming(self)?;
        Ok(())
    }

    fn end_postcopy(&self) -> Result<(), HostError> {
        Ok(guest_mm::GuestMemory::end_postcopy(self)?)
    }

    fn resumed_after_migration(&self) {
        guest_mm::GuestMemory::resumed_after_migration(self)
    }
}
