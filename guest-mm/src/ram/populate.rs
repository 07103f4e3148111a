//! Populating a migration destination's RAM while it waits for its source.
//!
//! The first touch of a hugetlb page zeroes it whole (2 MiB or 1 GiB), and hugetlbfs has
//! no `pwrite` that could fill a page without zeroing it first. On a migration
//! destination that zeroing sat on the receive thread's path, in the rounds and in the
//! stop-and-copy: a 1 GiB pre-copy of a busy guest took 1.6–1.8 s with it and 1.0–1.4 s
//! with the RAM populated beforehand (clear_page was the receiving thread's largest
//! cost). shmem's `pwrite` does not zero a page it fills whole, but allocating it (page
//! cache, memory cgroup charge, LRU) was still 60 % of the receiving thread's time in a
//! 1 GiB idle pre-copy (695 ms of CPU; 325 ms populated; the migration 1.4–4.1 s against
//! 0.8–1.2 s). So an incoming VM populates RAM on a thread of its own, from the start of
//! RAM upwards (the order round 0 arrives in), in chunks between which it can be
//! stopped, through the staging view (`MADV_POPULATE_WRITE`: allocated, zeroed and
//! mapped). On shmem the receive path then copies each arriving page into its mapped
//! page instead of `pwrite`: 0.04 s per GiB against 0.12–0.49 s here (shmem's
//! `fallocate`, used before, allocates without zeroing, but only `pwrite` gains from
//! that — a fault on a fallocated page zeroes it); the receiving thread's samples fell
//! by a third in a 1 GiB idle pre-copy. Pages past where the population has got still
//! go by `pwrite`. Populating never changes a page that is there already, so it may run
//! beside the receive path; the guest view is left alone
//! (post-copy needs its mappings absent). QEMU's `prealloc=on` is the peer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::GuestRam;
use crate::addr::{Gpa, GpaRange};
use crate::error::Error;

/// Populated per step: small enough to stop soon, large enough to be cheap.
const CHUNK: u64 = 64 << 20;

/// How a population ended.
#[derive(Debug)]
pub enum PopulateEnd {
    /// Every page of guest RAM is allocated.
    Complete,
    /// Stopped (the VM is going away) after this many bytes.
    Stopped { bytes: u64 },
    /// The host refused (e.g. the hugetlb pool ran short) after this many bytes; the
    /// receive path then allocates the rest itself, or reports the shortage.
    Failed { bytes: u64, source: Error },
    /// The populating thread panicked.
    Panicked,
}

/// How a population ended, for a run's report.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PopulateReport {
    /// complete, stopped, failed or panicked.
    pub end: &'static str,
    /// Bytes populated from the start of RAM (all of it when complete).
    pub bytes: Option<u64>,
    /// Why the host refused (failed only): the receive path allocated the rest itself.
    pub error: Option<String>,
}

impl PopulateEnd {
    pub fn report(&self, ram_bytes: u64) -> PopulateReport {
        let (end, bytes, error) = match self {
            PopulateEnd::Complete => ("complete", Some(ram_bytes), None),
            PopulateEnd::Stopped { bytes } => ("stopped", Some(*bytes), None),
            PopulateEnd::Failed { bytes, source } => {
                ("failed", Some(*bytes), Some(source.to_string()))
            }
            PopulateEnd::Panicked => ("panicked", None, None),
        };
        PopulateReport { end, bytes, error }
    }
}

/// The populating thread.
pub(crate) struct Populator {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<PopulateEnd>,
}

impl Populator {
    /// Starts populating `ram`'s staging view.
    pub(crate) fn start(ram: Arc<GuestRam>) -> std::io::Result<Populator> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("populate".into())
            .spawn(move || populate(&ram, &flag))?;
        Ok(Populator { stop, handle })
    }

    /// Waits for it to end.
    pub(crate) fn wait(self) -> PopulateEnd {
        self.handle.join().unwrap_or(PopulateEnd::Panicked)
    }

    /// Stops it at its next chunk and says how it ended.
    pub(crate) fn stop(self) -> PopulateEnd {
        self.stop.store(true, Ordering::Relaxed);
        self.wait()
    }
}

fn populate(ram: &GuestRam, stop: &AtomicBool) -> PopulateEnd {
    let chunk = CHUNK.max(ram.page_size());
    let mut at = 0;
    while at < ram.size() {
        if stop.load(Ordering::Relaxed) {
            return PopulateEnd::Stopped { bytes: at };
        }
        let end = (at + chunk).min(ram.size());
        if let Err(source) = ram.populate_staging(GpaRange::new(Gpa(at), Gpa(end))) {
            return PopulateEnd::Failed { bytes: at, source };
        }
        at = end;
    }
    PopulateEnd::Complete
}
