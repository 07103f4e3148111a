//! Restoring a snapshot into a destination VM: `copy` (every page before the start) and
//! `lazy` (start at once; a file pager serves faults, a filler the rest, hot set first).
//!
//! Lazy restore is post-copy with the file as its source: the VM's `begin_postcopy`
//! marks every page absent and takes a [`Pager`]; here that pager is a queue the filler
//! thread (this one) reads before each background page, and every page goes in through
//! `install_page` — the same door and table lock as a migrated page (and its collapse when it ends).

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guest_mm::stats::LatencyHistogram;
use guest_mm::{Gpa, GpaRange, Installed, Pager};

use super::{RestoreMode, Snapshot, SnapshotError};
use crate::host::{DestinationVm, GuestPages};
use crate::report::IncomingReport;
use crate::PageBitmap;

/// Restores `snap` into `vm`: `restore` → (lazy: `begin_postcopy`) → `start` →
/// `resumed_after_migration` → (lazy: `install_page`… → `end_postcopy`). Returns when
/// every page is in. An error after `start` is [`SnapshotError::AfterStart`]: the pages
/// not yet in stay absent (the vCPUs touching them wait; none is given wrong data).
pub fn restore(
    snap: &Snapshot,
    mode: RestoreMode,
    vm: &dyn DestinationVm,
) -> Result<IncomingReport, SnapshotError> {
    let t0 = Instant::now();
    let mut report = IncomingReport {
        mode: mode.name().to_string(),
        ..Default::default()
    };
    match mode {
        RestoreMode::Copy => {
            report.pages = copy_in(snap, vm.pages())?;
            report.bytes = report.pages * snap.state.page_size;
            report.receive_ms = t0.elapsed().as_secs_f64() * 1000.0;
            vm.restore(snap.state.vm.clone())
                .map_err(SnapshotError::host("restoring the VM state"))?;
            vm.start()
                .map_err(SnapshotError::host("starting the guest"))?;
            vm.pages().resumed_after_migration();
        }
        RestoreMode::Lazy => lazy(snap, vm, &mut report)?,
    }
    Ok(report)
}

/// Loads every data page (holes stay zero: guest memory starts zeroed), then checks the
/// memory hash. Returns the pages written.
fn copy_in(snap: &Snapshot, pages: &dyn GuestPages) -> Result<u64, SnapshotError> {
    let file = &snap.memory;
    let mut buf = vec![0u8; file.page_size() as usize];
    let mut written = 0;
    for p in 0..file.pages() {
        // A hole is checked against its checksum too, and not written.
        let content = file.read(p, &mut buf)?;
        if file.is_hole(p) {
            continue;
        }
        pages
            .write_page(Gpa(p * file.page_size()), content)
            .map_err(SnapshotError::host("writing guest RAM"))?;
        written += 1;
    }
    let here = hash(pages, file.page_size())?;
    if here != snap.state.memory_hash {
        return Err(SnapshotError::MemoryHash {
            here,
            there: snap.state.memory_hash,
        });
    }
    Ok(written)
}

fn hash(pages: &dyn GuestPages, page_size: u64) -> Result<u32, SnapshotError> {
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; page_size as usize];
    for p in 0..pages.size() / page_size {
        pages
            .read_page(Gpa(p * page_size), &mut buf)
            .map_err(SnapshotError::host("reading guest RAM"))?;
        h.update(&buf);
    }
    Ok(h.finalize())
}

/// The lazy restore's pager: a vCPU's fault becomes a request the filler reads first.
struct FilePager {
    requests: Mutex<Sender<(Gpa, Instant)>>,
}

impl Pager for FilePager {
    fn request(&self, gpa: Gpa) {
        // The filler holds the receiver until every page is in; after that no page is
        // absent and nothing asks.
        let _ = self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send((gpa, Instant::now()));
    }
}

/// The filler's books.
struct Filler<'a> {
    snap: &'a Snapshot,
    pages: &'a dyn GuestPages,
    buf: Vec<u8>,
    have: PageBitmap,
    installed: u64,
    latency: LatencyHistogram,
    demand: u64,
    background: u64,
}

impl Filler<'_> {
    /// Installs page `page` from the file unless it is in already. Returns whether it was new.
    fn install(&mut self, page: u64) -> Result<bool, SnapshotError> {
        if page >= self.have.pages() || self.have.get(page) {
            return Ok(false);
        }
        let gpa = Gpa(page * self.snap.state.page_size);
        let content = self.snap.memory.read(page, &mut self.buf)?;
        let done = self
            .pages
            .install_page(gpa, content)
            .map_err(SnapshotError::host("installing a page"))?;
        self.have.set(page);
        if done == Installed::New {
            self.installed += 1;
        }
        Ok(done == Installed::New)
    }

    /// Serves every request queued so far.
    fn serve(&mut self, requests: &Receiver<(Gpa, Instant)>) -> Result<(), SnapshotError> {
        while let Ok((gpa, at)) = requests.try_recv() {
            if self.install(gpa.0 / self.snap.state.page_size)? {
                self.demand += 1;
                self.latency.record(at.elapsed().as_nanos() as u64);
            }
        }
        Ok(())
    }
}

fn lazy(
    snap: &Snapshot,
    vm: &dyn DestinationVm,
    report: &mut IncomingReport,
) -> Result<(), SnapshotError> {
    let t0 = Instant::now();
    let (tx, requests) = channel();
    let pager = Arc::new(FilePager {
        requests: Mutex::new(tx),
    });
    vm.restore(snap.state.vm.clone())
        .map_err(SnapshotError::host("restoring the VM state"))?;
    let pages = vm.pages();
    let all = GpaRange::new(Gpa(0), Gpa(snap.state.memory_bytes));
    let absent = pages
        .begin_postcopy(&[all], pager)
        .map_err(SnapshotError::host("marking guest RAM absent"))?;
    report.receive_ms = t0.elapsed().as_secs_f64() * 1000.0;
    vm.start()
        .map_err(SnapshotError::host("starting the guest"))?;
    let started = Instant::now();
    pages.resumed_after_migration();
    let mut f = Filler {
        snap,
        pages,
        buf: vec![0u8; snap.state.page_size as usize],
        have: PageBitmap::empty(snap.state.pages()),
        installed: 0,
        latency: LatencyHistogram::default(),
        demand: 0,
        background: 0,
    };
    let after = |e| SnapshotError::AfterStart {
        source: Box::new(e),
    };
    let hot = snap.state.hot_set.iter().flat_map(|&(a, b)| a..b);
    let order = hot.chain(0..snap.state.pages());
    for page in order {
        if f.installed >= absent {
            break;
        }
        f.serve(&requests).map_err(after)?;
        if f.install(page).map_err(after)? {
            f.background += 1;
        }
    }
    // Every page was visited; demands for pages installed since are answered already.
    while f.installed < absent {
        match requests.recv_timeout(Duration::from_millis(100)) {
            Ok((gpa, _)) => {
                f.install(gpa.0 / snap.state.page_size).map_err(after)?;
            }
            Err(_) => {
                return Err(after(SnapshotError::Incomplete {
                    installed: f.installed,
                    absent,
                }))
            }
        }
    }
    pages
        .end_postcopy()
        .map_err(|e| after(SnapshotError::host("leaving lazy restore")(e)))?;
    report.pages = snap.state.data_pages;
    report.bytes = snap.state.data_pages * snap.state.page_size;
    report.pages_demand = f.demand;
    report.pages_pushed = f.background;
    report.demand_fault_us_p50 = f.latency.percentile_us(50.0);
    report.demand_fault_us_p99 = f.latency.percentile_us(99.0);
    report.demand_fault_us_max = f.latency.max_us();
    report.postcopy_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
    Ok(())
}
