//! Live migration state machines over the `migration` crate's protocol.
//!
//! Source (`send`), on its own thread beside the running guest:
//! ```text
//! Hello ─▶ HelloAck ─▶ dirty logging on ─▶ round 0: every page ─▶ rounds of dirty pages
//!   until what is left fits the downtime budget at the measured rate (or stops
//!   shrinking for two rounds, or 20 rounds)
//!   ─▶ ask the monitor to pause the vCPUs ─▶ last dirty pages ─▶ SwitchOver (vCPU state,
//!   run info) ─▶ Resumed from the destination ─▶ Complete
//! ```
//! Any error before the pause leaves the guest running on the source; an error after it
//! resumes the source vCPUs (the destination has not started the guest until it sends
//! Resumed). Destination (`receive`): the mirror image, writing pages into guest memory
//! (`GuestMemory::write_page`) while its vCPUs do not exist yet; post-copy installs
//! later pages with `GuestMemory::install_page`.

use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_mm::{Gpa, GpaRange, GuestMemory, Installed, PageContent};
use migration::{Frame, FrameKind, FrameReader, FrameWriter, Hello, Listener, Stream, Uri};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use crate::api::MigrateRequest;
use crate::vstate::vcpu::VcpuState;
use crate::vstate::vm::{DirtyLogging, Vm};

/// How long a peer may stay silent before the migration fails.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(10);
/// Post-copy: how long after its last pushed page the source waits for the destination
/// to confirm that every page is installed (it may still be working through what is in
/// flight on a loaded host; once seen at over 10 s in the benchmark).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_ROUNDS: u32 = 20;

/// What the destination needs to continue the run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunInfo {
    pub workload: String,
    /// Guest run time on the source so far.
    pub elapsed_ns: u64,
    /// The run's `--duration`, if it has one.
    pub duration_ns: Option<u64>,
    /// Guest worst pass per vCPU at the switch (cycles), to find the stall afterwards.
    pub max_pass_cycles: Vec<u64>,
    pub source_exits: u64,
    /// Passes of all vCPUs at the switch, to count those made on the destination.
    #[serde(default)]
    pub passes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SwitchOver {
    pub vcpus: Vec<VcpuState>,
    pub run: RunInfo,
    /// CLOCK_MONOTONIC when the source vCPUs stopped (same host: comparable).
    pub paused_at_ns: u64,
    /// CRC-32 of all guest RAM at the switch-over, when the migration was asked to verify.
    pub memory_hash: Option<u32>,
    /// Post-copy: a bitmap (one bit per page unit) of the pages the destination does not
    /// have yet; they arrive on demand (urgent channel) or by background push.
    pub postcopy_missing: Option<Vec<u64>>,
}

/// CRC-32 of guest RAM, read through the staging view.
pub fn memory_hash(ram: &GuestMemory) -> std::result::Result<u32, String> {
    let mut h = crc32fast::Hasher::new();
    let chunk = 1u64 << 20;
    let mut buf = vec![0u8; chunk as usize];
    let mut gpa = 0;
    while gpa < ram.size() {
        let n = chunk.min(ram.size() - gpa) as usize;
        ram.staging()
            .read_slice(&mut buf[..n], GuestAddress(gpa))
            .map_err(|e| format!("hashing GPA {gpa:#x}: {e}"))?;
        h.update(&buf[..n]);
        gpa += n as u64;
    }
    Ok(h.finalize())
}

/// Events from the migration thread to the monitor loop.
/// The `page`-sized units that hold any byte of `range`.
fn units_of(range: &std::ops::Range<u64>, page: u64) -> std::ops::Range<u64> {
    range.start / page..range.end.div_ceil(page)
}

/// What the source's monitor answers to `Pause`.
pub struct Paused {
    pub vcpus: Vec<VcpuState>,
    pub run: RunInfo,
    /// Guest-physical range of the mailbox. The monitor has cleared each vCPU's worst
    /// pass there, so that the pass spanning the switch-over is measured from the source's
    /// memory; post-copy sends these pages after the pause whether or not KVM saw them
    /// written (the monitor's write goes through the staging view, which KVM does not log).
    pub mailbox: std::ops::Range<u64>,
}

pub enum SourceEvent {
    /// Stop the vCPUs and answer with their state and the run info.
    Pause(Sender<std::result::Result<Paused, String>>),
    /// The migration ended (the vCPUs are paused if it failed after `Pause`).
    Done(std::result::Result<MigrationReport, String>),
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MigrationReport {
    pub mode: String,
    pub to: String,
    pub total_ms: f64,
    /// Source vCPU stop to destination vCPU resume.
    pub downtime_ms: f64,
    pub bytes_sent: u64,
    pub pages_precopy: u64,
    pub pages_pushed: u64,
    pub pages_demand: u64,
    pub demand_fault_us_p50: f64,
    pub demand_fault_us_p99: f64,
    pub demand_fault_us_max: f64,
    pub precopy_rounds: u32,
    /// Post-copy: the background push order used.
    #[serde(default)]
    pub push_order: String,
    /// Bytes per page frame: the backing page size (4 KiB shmem, 2 MiB/1 GiB hugetlb).
    pub granularity_bytes: u64,
    /// CRC-32 of guest RAM at the switch-over, checked by the destination, if asked.
    pub memory_hash: Option<u32>,
    /// How the source's KVM reported written pages: "bitmap" or "ring" (`--dirty-log`).
    pub dirty_log: String,
    /// Dirty-log fetches on the source and their total time (harvest + reset for the ring,
    /// KVM_GET_DIRTY_LOG for the bitmap).
    pub dirty_log_takes: u64,
    pub dirty_log_ms: f64,
}

pub fn hello_for(ram: &GuestMemory, vcpus: u32, mode: &str) -> Hello {
    Hello {
        version: migration::PROTOCOL_VERSION,
        memory_bytes: ram.size(),
        backing: ram.backing().to_string(),
        page_size: ram.page_size(),
        vcpus,
        mode: mode.to_string(),
    }
}

/// Pages (by index of `page_size` units) marked in a KVM dirty bitmap of 4 KiB bits.
fn dirty_units(bitmap: &[u64], page_size: u64) -> Vec<u64> {
    let per_unit = (page_size / 4096).max(1);
    let mut out: Vec<u64> = Vec::new();
    for (w, &word) in bitmap.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let b = bits.trailing_zeros() as u64;
            bits &= bits - 1;
            let unit = (w as u64 * 64 + b) / per_unit;
            if out.last() != Some(&unit) {
                out.push(unit);
            }
        }
    }
    out.dedup();
    out
}

/// The guest-mm form of a received page.
fn content(data: migration::PageData<'_>) -> PageContent<'_> {
    match data {
        migration::PageData::Bytes(b) => PageContent::Bytes(b),
        migration::PageData::Zero => PageContent::Zero,
    }
}

fn send_pages(
    w: &mut FrameWriter<Stream>,
    ram: &GuestMemory,
    units: impl Iterator<Item = u64>,
    buf: &mut [u8],
) -> Result<u64, String> {
    let page = ram.page_size();
    let mut n = 0;
    for u in units {
        let gpa = u * page;
        ram.read_page(Gpa(gpa), buf)
            .map_err(|e| format!("reading GPA {gpa:#x}: {e}"))?;
        let frame = if migration::is_zero(buf) {
            Frame::zero_page(gpa)
        } else {
            Frame::page(gpa, buf)
        };
        w.send(&frame).map_err(|e| e.to_string())?;
        n += 1;
        if n % 256 == 0 {
            progress(w.bytes, "sending");
        }
    }
    Ok(n)
}

/// A one-line progress display on the source's stderr (bytes, rate, phase), when stderr
/// is a terminal; at most five updates a second.
fn progress(bytes: u64, phase: &str) {
    use std::io::IsTerminal;
    use std::sync::atomic::{AtomicU64, Ordering};
    static START_NS: AtomicU64 = AtomicU64::new(0);
    static LAST_NS: AtomicU64 = AtomicU64::new(0);
    if !std::io::stderr().is_terminal() {
        return;
    }
    let now = crate::clock::monotonic_ns();
    let start = match START_NS.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed) {
        Ok(_) => now,
        Err(s) => s,
    };
    if now.saturating_sub(LAST_NS.load(Ordering::Relaxed)) < 200_000_000 {
        return;
    }
    LAST_NS.store(now, Ordering::Relaxed);
    let secs = (now - start) as f64 / 1e9;
    eprint!(
        "\rmigration: {phase:<10} {:>8.1} MiB sent, {:>7.1} MiB/s, {:>5.1} s   ",
        bytes as f64 / (1 << 20) as f64,
        if secs > 0.0 {
            bytes as f64 / (1 << 20) as f64 / secs
        } else {
            0.0
        },
        secs
    );
}

/// The source side. Runs on its own thread; `events` reaches the monitor loop.
pub fn send(
    vm: Arc<Vm>,
    ram: Arc<GuestMemory>,
    vcpus: u32,
    req: MigrateRequest,
    events: Sender<SourceEvent>,
) -> std::result::Result<MigrationReport, String> {
    let t0 = Instant::now();
    if !matches!(req.mode.as_str(), "precopy" | "postcopy" | "hybrid") {
        return Err(format!(
            "migration mode {:?}: choose precopy, postcopy or hybrid",
            req.mode
        ));
    }
    let uri: Uri = req.to.parse()?;
    let stream =
        Stream::connect(&uri, Duration::from_secs(5), PEER_TIMEOUT).map_err(|e| e.to_string())?;
    let mut r = FrameReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut w = FrameWriter::new(stream);
    let hello = hello_for(&ram, vcpus, &req.mode);
    w.send(&Frame::json(FrameKind::Hello, &hello))
        .map_err(|e| e.to_string())?;
    w.flush().map_err(|e| e.to_string())?;
    r.expect(FrameKind::HelloAck, "the destination's HelloAck")
        .map_err(|e| e.to_string())?;

    let mut report = MigrationReport {
        mode: req.mode.clone(),
        to: req.to.clone(),
        granularity_bytes: ram.page_size(),
        ..Default::default()
    };
    vm.set_dirty_logging(ram.memslot(), DirtyLogging::On)
        .map_err(|e| e.to_string())?;
    let result = match req.mode.as_str() {
        "precopy" => precopy(&vm, &ram, &mut w, &mut r, &req, &events, &mut report),
        _ => postcopy(&vm, &ram, &uri, &mut w, &mut r, &req, &events, &mut report),
    };
    let _ = vm.set_dirty_logging(ram.memslot(), DirtyLogging::Off);
    if result.is_err() {
        let _ = w.send(&Frame {
            kind: FrameKind::Abort,
            payload: b"source failed".to_vec(),
        });
        w.get_mut().shutdown();
    }
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprintln!();
    }
    result?;
    report.total_ms = t0.elapsed().as_secs_f64() * 1000.0;
    report.bytes_sent = w.bytes;
    Ok(report)
}

fn precopy(
    vm: &Vm,
    ram: &GuestMemory,
    w: &mut FrameWriter<Stream>,
    r: &mut FrameReader<Stream>,
    req: &MigrateRequest,
    events: &Sender<SourceEvent>,
    report: &mut MigrationReport,
) -> std::result::Result<(), String> {
    let page = ram.page_size();
    let mut buf = vec![0u8; page as usize];
    let _ = vm
        .take_dirty_log(ram.memslot())
        .map_err(|e| e.to_string())?;
    // Round 0: everything.
    let start = Instant::now();
    progress(w.bytes, "round 0");
    let n = send_pages(w, ram, 0..ram.size() / page, &mut buf)?;
    report.pages_precopy += n;
    w.send(&Frame::json(FrameKind::RoundEnd, &0u32))
        .map_err(|e| e.to_string())?;
    let mut rate = (n * page) as f64 / start.elapsed().as_secs_f64().max(1e-6);
    let budget = req.downtime_ms as f64 / 1000.0;
    let mut dirty = dirty_units(
        &vm.take_dirty_log(ram.memslot())
            .map_err(|e| e.to_string())?,
        page,
    );
    report.precopy_rounds = 1;
    // Rounds until what is left fits the downtime budget — or stops shrinking: a guest
    // that dirties memory faster than it can be sent would otherwise never converge.
    let mut stalled_rounds = 0;
    let mut previous = u64::MAX;
    while report.precopy_rounds < MAX_ROUNDS
        && stalled_rounds < 2
        && (dirty.len() as u64 * page) as f64 / rate > budget
    {
        if dirty.len() as u64 * 10 >= previous.saturating_mul(9) {
            stalled_rounds += 1;
        } else {
            stalled_rounds = 0;
        }
        previous = dirty.len() as u64;
        let start = Instant::now();
        let n = send_pages(w, ram, dirty.iter().copied(), &mut buf)?;
        report.pages_precopy += n;
        w.send(&Frame::json(FrameKind::RoundEnd, &report.precopy_rounds))
            .map_err(|e| e.to_string())?;
        rate = (n * page) as f64 / start.elapsed().as_secs_f64().max(1e-6);
        report.precopy_rounds += 1;
        dirty = dirty_units(
            &vm.take_dirty_log(ram.memslot())
                .map_err(|e| e.to_string())?,
            page,
        );
    }
    // Stop and copy.
    progress(w.bytes, "stop+copy");
    let (tx, rx) = channel();
    events
        .send(SourceEvent::Pause(tx))
        .map_err(|_| "the VM is shutting down".to_string())?;
    let Paused {
        vcpus: states,
        run,
        mailbox,
    } = rx
        .recv()
        .map_err(|_| "the VM is shutting down".to_string())??;
    let paused_at_ns = crate::clock::monotonic_ns();
    let last = dirty_units(
        &vm.take_dirty_log(ram.memslot())
            .map_err(|e| e.to_string())?,
        page,
    );
    let mut all: Vec<u64> = dirty
        .into_iter()
        .chain(last)
        .chain(units_of(&mailbox, page))
        .collect();
    all.sort_unstable();
    all.dedup();
    report.pages_precopy += send_pages(w, ram, all.into_iter(), &mut buf)?;
    let hash = match req.verify.as_deref() {
        Some("memory-hash") => Some(memory_hash(ram)?),
        Some(other) => {
            return Err(format!(
                "unknown verify {other:?}; the only check is memory-hash"
            ))
        }
        None => None,
    };
    report.memory_hash = hash;
    w.send(&Frame::json(
        FrameKind::SwitchOver,
        &SwitchOver {
            vcpus: states,
            run,
            paused_at_ns,
            memory_hash: hash,
            postcopy_missing: None,
        },
    ))
    .map_err(|e| e.to_string())?;
    w.flush().map_err(|e| e.to_string())?;
    let resumed = r
        .expect(FrameKind::Resumed, "the destination's Resumed")
        .map_err(|e| e.to_string())?;
    let resumed_ns = resumed.as_u64(r.frames - 1).map_err(|e| e.to_string())?;
    report.downtime_ms = resumed_ns.saturating_sub(paused_at_ns) as f64 / 1e6;
    w.send(&Frame {
        kind: FrameKind::Complete,
        payload: vec![],
    })
    .map_err(|e| e.to_string())?;
    w.flush().map_err(|e| e.to_string())?;
    Ok(())
}

/// Post-copy (and hybrid: a bounded number of pre-copy rounds first). The source vCPUs
/// stop at once; the destination runs the guest and asks for absent pages on an urgent
/// channel while the rest is pushed in the background, nearest to the last request first.
#[allow(clippy::too_many_arguments)]
fn postcopy(
    vm: &Vm,
    ram: &GuestMemory,
    uri: &Uri,
    w: &mut FrameWriter<Stream>,
    r: &mut FrameReader<Stream>,
    req: &MigrateRequest,
    events: &Sender<SourceEvent>,
    report: &mut MigrationReport,
) -> std::result::Result<(), String> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;
    const HYBRID_ROUNDS: u32 = 3;
    let page = ram.page_size();
    let units = ram.size() / page;
    let mut buf = vec![0u8; page as usize];
    let _ = vm
        .take_dirty_log(ram.memslot())
        .map_err(|e| e.to_string())?;
    // One bit per unit the destination does not have.
    let mut missing = vec![u64::MAX; units.div_ceil(64) as usize];
    if !units.is_multiple_of(64) {
        if let Some(last) = missing.last_mut() {
            *last = (1u64 << (units % 64)) - 1;
        }
    }
    if req.mode == "hybrid" {
        report.pages_precopy += send_pages(w, ram, 0..units, &mut buf)?;
        missing.iter_mut().for_each(|m| *m = 0);
        w.send(&Frame::json(FrameKind::RoundEnd, &0u32))
            .map_err(|e| e.to_string())?;
        report.precopy_rounds = 1;
        while report.precopy_rounds < HYBRID_ROUNDS {
            let dirty = dirty_units(
                &vm.take_dirty_log(ram.memslot())
                    .map_err(|e| e.to_string())?,
                page,
            );
            report.pages_precopy += send_pages(w, ram, dirty.into_iter(), &mut buf)?;
            w.send(&Frame::json(FrameKind::RoundEnd, &report.precopy_rounds))
                .map_err(|e| e.to_string())?;
            report.precopy_rounds += 1;
        }
    }
    let (tx, rx) = channel();
    events
        .send(SourceEvent::Pause(tx))
        .map_err(|_| "the VM is shutting down".to_string())?;
    let Paused {
        vcpus: states,
        run,
        mailbox,
    } = rx
        .recv()
        .map_err(|_| "the VM is shutting down".to_string())??;
    let paused_at_ns = crate::clock::monotonic_ns();
    if req.mode == "hybrid" {
        for u in dirty_units(
            &vm.take_dirty_log(ram.memslot())
                .map_err(|e| e.to_string())?,
            page,
        )
        .into_iter()
        .chain(units_of(&mailbox, page))
        {
            missing[(u / 64) as usize] |= 1 << (u % 64);
        }
    }
    let switch = SwitchOver {
        vcpus: states,
        run,
        paused_at_ns,
        memory_hash: None,
        postcopy_missing: Some(missing.clone()),
    };
    w.send(&Frame::json(FrameKind::SwitchOver, &switch))
        .map_err(|e| e.to_string())?;
    w.flush().map_err(|e| e.to_string())?;
    // The urgent channel: a second connection, for demand requests and their pages only.
    let urgent =
        Stream::connect(uri, Duration::from_secs(5), PEER_TIMEOUT).map_err(|e| e.to_string())?;
    let resumed = r
        .expect(FrameKind::Resumed, "the destination's Resumed")
        .map_err(|e| e.to_string())?;
    let resumed_ns = resumed.as_u64(r.frames - 1).map_err(|e| e.to_string())?;
    report.downtime_ms = resumed_ns.saturating_sub(paused_at_ns) as f64 / 1e6;

    let missing = Mutex::new(Missing::new(missing, units, page));
    let last_request = AtomicU64::new(u64::MAX);
    let demand = AtomicU64::new(0);
    let urgent_bytes = AtomicU64::new(0);
    let dest_stats: Mutex<Option<DemandStats>> = Mutex::new(None);
    // Claims unit `u` for sending; false if it was sent already.
    let take = |u: u64| -> bool { missing.lock().unwrap_or_else(|e| e.into_inner()).take(u) };
    report.push_order = req.push_order.name().to_string();
    let urgent_reader = urgent.try_clone().map_err(|e| e.to_string())?;
    // Set when the background push has sent its last page: from then on the destination
    // owes us its Complete, and silence on the urgent channel means it is gone.
    let push_done: Mutex<Option<Instant>> = Mutex::new(None);
    std::thread::scope(|scope| -> std::result::Result<(), String> {
        let h = scope.spawn(|| -> std::result::Result<(), String> {
            let mut ur = FrameReader::new(urgent_reader);
            let mut uw = FrameWriter::new(urgent);
            let mut ubuf = vec![0u8; page as usize];
            loop {
                let f = match ur.recv() {
                    Ok(f) => f,
                    Err(migration::Error::Closed { .. }) => break,
                    // A guest that faults on nothing sends no requests: the urgent channel
                    // is idle, not dead, while the push goes on (a dead peer shows on the
                    // main connection, or as Closed here).
                    Err(migration::Error::Silent) => {
                        let done = *push_done.lock().unwrap_or_else(|e| e.into_inner());
                        match done {
                            Some(t) if t.elapsed() >= CONFIRM_TIMEOUT => {
                                return Err(format!(
                                    "urgent channel: the destination did not confirm the last page within {CONFIRM_TIMEOUT:?} of the push's end"
                                ))
                            }
                            _ => continue,
                        }
                    }
                    Err(e) => return Err(format!("urgent channel: {e}")),
                };
                if f.kind == FrameKind::Complete {
                    if let Ok(d) = f.parse_json::<DemandStats>(ur.frames - 1) {
                        if let Ok(mut slot) = dest_stats.lock() {
                            *slot = Some(d);
                        }
                    }
                    break;
                }
                let gpa = f.as_u64(ur.frames - 1).map_err(|e| e.to_string())?;
                let u = gpa / page;
                last_request.store(u, Ordering::Relaxed);
                if u < units && take(u) {
                    demand.fetch_add(1, Ordering::Relaxed);
                    send_pages(&mut uw, ram, std::iter::once(u), &mut ubuf)?;
                    uw.flush().map_err(|e| e.to_string())?;
                }
            }
            urgent_bytes.store(uw.bytes, Ordering::Relaxed);
            Ok(())
        });
        let mut pushed = 0u64;
        match req.push_order {
            // From the last demand request onwards, in address order.
            crate::api::PushOrder::Sequential => {
                let (mut cursor, mut idle, mut followed) = (0u64, 0u64, u64::MAX);
                while idle < units {
                    let hint = last_request.load(Ordering::Relaxed);
                    if hint != followed && hint < units {
                        followed = hint;
                        cursor = hint;
                    }
                    let u = cursor % units;
                    cursor = u + 1;
                    if take(u) {
                        send_pages(w, ram, std::iter::once(u), &mut buf)?;
                        pushed += 1;
                        idle = 0;
                    } else {
                        idle += 1;
                    }
                }
            }
            // Region by region, the one with the fewest pages missing first.
            crate::api::PushOrder::FewestMissingFirst => loop {
                let next = missing
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .fewest_missing_region();
                let Some(region) = next else { break };
                let per = missing.lock().unwrap_or_else(|e| e.into_inner()).per_region;
                for u in region * per..((region + 1) * per).min(units) {
                    if take(u) {
                        send_pages(w, ram, std::iter::once(u), &mut buf)?;
                        pushed += 1;
                    }
                }
            },
        }
        w.send(&Frame {
            kind: FrameKind::Complete,
            payload: vec![],
        })
        .map_err(|e| e.to_string())?;
        w.flush().map_err(|e| e.to_string())?;
        *push_done.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        report.pages_pushed = pushed;
        // The destination closes the urgent channel once every page is in.
        h.join()
            .map_err(|_| "the urgent channel thread panicked".to_string())?
    })?;
    report.pages_demand = demand.load(Ordering::Relaxed);
    if let Some(d) = dest_stats.lock().ok().and_then(|d| *d) {
        report.demand_fault_us_p50 = d.us_p50;
        report.demand_fault_us_p99 = d.us_p99;
        report.demand_fault_us_max = d.us_max;
    }
    w.bytes += urgent_bytes.load(Ordering::Relaxed);
    Ok(())
}

/// The post-copy source's record of what the destination still lacks: one bit per unit,
/// and a count per 2 MiB region (for the push order).
struct Missing {
    bits: Vec<u64>,
    per_region_missing: Vec<u32>,
    /// Units per region (512 at 4 KiB, 1 at 2 MiB).
    per_region: u64,
}

impl Missing {
    fn new(bits: Vec<u64>, units: u64, page: u64) -> Missing {
        let per_region = (guest_mm::SIZE_2M / page).max(1);
        let mut per_region_missing = vec![0u32; units.div_ceil(per_region) as usize];
        for u in 0..units {
            if bits[(u / 64) as usize] & (1 << (u % 64)) != 0 {
                per_region_missing[(u / per_region) as usize] += 1;
            }
        }
        Missing {
            bits,
            per_region_missing,
            per_region,
        }
    }

    /// Claims unit `u`; false if it was sent already.
    fn take(&mut self, u: u64) -> bool {
        let bit = 1u64 << (u % 64);
        let Some(word) = self.bits.get_mut((u / 64) as usize) else {
            return false;
        };
        let had = *word & bit != 0;
        *word &= !bit;
        if had {
            self.per_region_missing[(u / self.per_region) as usize] -= 1;
        }
        had
    }

    /// The region with the fewest units still missing (but some), lowest address first.
    fn fewest_missing_region(&self) -> Option<u64> {
        self.per_region_missing
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .min_by_key(|(i, &n)| (n, *i))
            .map(|(i, _)| i as u64)
    }
}

/// What the destination received before it starts the guest.
pub struct Incoming {
    pub switch: SwitchOver,
    pub hello: Hello,
    pub pages: u64,
    pub bytes: u64,
    writer: FrameWriter<Stream>,
    reader: FrameReader<Stream>,
    listener: Listener,
}

impl Incoming {
    /// Post-copy: accepts the source's urgent channel (before the guest starts).
    pub fn accept_urgent(&self) -> std::result::Result<Stream, String> {
        self.listener
            .accept(Duration::from_secs(10), PEER_TIMEOUT)
            .map_err(|e| format!("waiting for the source's urgent channel: {e}"))
    }

    /// Post-copy: tells the source the guest runs here, and hands back the main channel
    /// (background pages follow on it).
    pub fn resumed_postcopy(mut self) -> std::result::Result<FrameReader<Stream>, String> {
        self.writer
            .send(&Frame::u64(
                FrameKind::Resumed,
                crate::clock::monotonic_ns(),
            ))
            .map_err(|e| e.to_string())?;
        self.writer.flush().map_err(|e| e.to_string())?;
        Ok(self.reader)
    }

    /// Tells the source the guest runs here (the end of the downtime), then waits for
    /// its Complete.
    pub fn confirm_resumed(mut self) -> std::result::Result<(), String> {
        self.writer
            .send(&Frame::u64(
                FrameKind::Resumed,
                crate::clock::monotonic_ns(),
            ))
            .map_err(|e| e.to_string())?;
        self.writer.flush().map_err(|e| e.to_string())?;
        self.reader
            .expect(FrameKind::Complete, "the source's Complete")
            .map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// The destination side: accepts one source on `uri` and receives the guest into `ram`.
pub fn receive(
    uri: &Uri,
    ram: &GuestMemory,
    vcpus: u32,
    wait: Duration,
) -> std::result::Result<Incoming, String> {
    let listener = Listener::bind(uri).map_err(|e| e.to_string())?;
    let stream = listener
        .accept(wait, PEER_TIMEOUT)
        .map_err(|e| format!("waiting for the source on {uri}: {e}"))?;
    let mut r = FrameReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut w = FrameWriter::new(stream);
    let theirs: Hello = r
        .expect(FrameKind::Hello, "the source's Hello")
        .and_then(|f| f.parse_json(0))
        .map_err(|e| e.to_string())?;
    let ours = hello_for(ram, vcpus, &theirs.mode);
    if let Err(e) = ours.check_compatible(&theirs) {
        let _ = w.send(&Frame {
            kind: FrameKind::Abort,
            payload: e.to_string().into_bytes(),
        });
        return Err(e.to_string());
    }
    w.send(&Frame::json(FrameKind::HelloAck, &ours))
        .map_err(|e| e.to_string())?;
    w.flush().map_err(|e| e.to_string())?;
    let page = ram.page_size();
    let mut pages = 0u64;
    loop {
        let f = r.recv().map_err(|e| e.to_string())?;
        let index = r.frames - 1;
        match f.kind {
            FrameKind::Page | FrameKind::ZeroPage => {
                let (gpa, data) = f.as_page(index, page).map_err(|e| e.to_string())?;
                if gpa % page != 0 || gpa + page > ram.size() {
                    return Err(format!("migration stream: frame {index}: page at GPA {gpa:#x} is outside guest RAM"));
                }
                ram.write_page(Gpa(gpa), content(data))
                    .map_err(|e| format!("migration stream: frame {index}: {e}"))?;
                pages += 1;
            }
            FrameKind::RoundEnd => {}
            FrameKind::SwitchOver => {
                let switch: SwitchOver = f.parse_json(index).map_err(|e| e.to_string())?;
                if switch.vcpus.len() != vcpus as usize {
                    let e = format!(
                        "migration stream: frame {index}: {} vCPU states for {vcpus} vCPUs",
                        switch.vcpus.len()
                    );
                    let _ = w.send(&Frame {
                        kind: FrameKind::Abort,
                        payload: e.clone().into_bytes(),
                    });
                    return Err(e);
                }
                if let Some(want) = switch.memory_hash {
                    let got = memory_hash(ram)?;
                    if got != want {
                        let e = format!("guest memory differs after the transfer: CRC-32 {got:#010x} here, {want:#010x} on the source");
                        let _ = w.send(&Frame {
                            kind: FrameKind::Abort,
                            payload: e.clone().into_bytes(),
                        });
                        return Err(e);
                    }
                }
                return Ok(Incoming {
                    switch,
                    hello: theirs,
                    pages,
                    bytes: r.bytes,
                    writer: w,
                    reader: r,
                    listener,
                });
            }
            FrameKind::Abort => {
                return Err(format!(
                    "the source aborted: {}",
                    String::from_utf8_lossy(&f.payload)
                ));
            }
            other => {
                return Err(format!(
                    "migration stream: frame {index}: unexpected {other:?} during pre-copy"
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn push_order_prefers_the_regions_with_the_fewest_pages_missing() {
        // 3 regions of 512 4 KiB units, all missing.
        let units = 3 * 512;
        let mut m = super::Missing::new(vec![u64::MAX; units / 64], units as u64, 4096);
        assert_eq!(m.fewest_missing_region(), Some(0));
        // The guest asked for two pages of region 2 and one of region 1.
        assert!(m.take(2 * 512 + 7));
        assert!(m.take(2 * 512 + 9));
        assert!(m.take(512 + 3));
        assert!(!m.take(512 + 3), "a unit is sent once");
        assert_eq!(m.fewest_missing_region(), Some(2));
        for u in 2 * 512..3 * 512 {
            m.take(u);
        }
        assert_eq!(m.fewest_missing_region(), Some(1));
        for u in 0..units as u64 {
            m.take(u);
        }
        assert_eq!(m.fewest_missing_region(), None);
        // 2 MiB units: one per region.
        let m = super::Missing::new(vec![0b101], 3, 2 << 20);
        assert_eq!(m.fewest_missing_region(), Some(0));
    }

    #[test]
    fn dirty_bitmap_to_units() {
        let bm = [0b1011u64, 1 << 63];
        assert_eq!(super::dirty_units(&bm, 4096), vec![0, 1, 3, 127]);
        // 2 MiB units: 512 bits each.
        assert_eq!(super::dirty_units(&bm, 2 << 20), vec![0]);
        let mut big = vec![0u64; 16];
        big[8] = 1; // bit 512 -> unit 1
        assert_eq!(super::dirty_units(&big, 2 << 20), vec![1]);
    }
}

/// Demand-fault figures the destination reports back when post-copy completes.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct DemandStats {
    pub pages: u64,
    pub us_p50: f64,
    pub us_p99: f64,
    pub us_max: f64,
}

/// Destination side of post-copy: the pager (demand requests on the urgent channel) and
/// the receivers that install arriving pages.
pub struct PostcopyLink {
    urgent: std::sync::Mutex<FrameWriter<Stream>>,
    requested: std::sync::Mutex<std::collections::HashMap<u64, Instant>>,
    page: u64,
    pub latency: std::sync::Mutex<guest_mm::stats::LatencyHistogram>,
    pub demand_pages: std::sync::atomic::AtomicU64,
    pub pushed_pages: std::sync::atomic::AtomicU64,
    pub missing: u64,
}

impl guest_mm::Pager for PostcopyLink {
    fn request(&self, gpa: Gpa) {
        let unit = gpa.raw() / self.page * self.page;
        let mut req = self.requested.lock().unwrap_or_else(|e| e.into_inner());
        if req.contains_key(&unit) {
            return;
        }
        req.insert(unit, Instant::now());
        drop(req);
        let mut w = self.urgent.lock().unwrap_or_else(|e| e.into_inner());
        let _ = w.send(&Frame::u64(FrameKind::PageRequest, unit));
        let _ = w.flush();
    }
}

/// Post-copy destination: the link that pages in what `missing` (one bit per backing
/// page) marks, with guest memory told which pages are absent and who to ask for them.
pub fn postcopy_begin(
    memory: &GuestMemory,
    missing: &[u64],
    urgent: Stream,
) -> Result<Arc<PostcopyLink>, guest_mm::Error> {
    let page = memory.page_size();
    let units = memory.size() / page;
    let bit = |u: u64| {
        missing
            .get((u / 64) as usize)
            .is_some_and(|w| w & (1 << (u % 64)) != 0)
    };
    let mut absent = Vec::new();
    let mut count = 0;
    let mut u = 0;
    while u < units {
        if !bit(u) {
            u += 1;
            continue;
        }
        let start = u;
        while u < units && bit(u) {
            u += 1;
        }
        count += u - start;
        absent.push(GpaRange::new(Gpa(start * page), Gpa(u * page)));
    }
    let link = Arc::new(PostcopyLink {
        urgent: std::sync::Mutex::new(FrameWriter::new(urgent)),
        requested: Default::default(),
        page,
        latency: Default::default(),
        demand_pages: Default::default(),
        pushed_pages: Default::default(),
        missing: count,
    });
    memory.begin_postcopy(&absent, link.clone())?;
    Ok(link)
}

/// What a post-copy receiver makes of a channel that sends nothing for the I/O timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Silence {
    /// The main channel always has pages to push until Complete: silence is a dead peer.
    PeerGone,
    /// The urgent channel carries only what the guest asks for: silence is normal.
    Idle,
}

/// Installs pages arriving on `reader` (either channel) until it closes or sends Complete.
pub fn postcopy_receive(
    link: &PostcopyLink,
    ram: &GuestMemory,
    mut reader: FrameReader<Stream>,
    filled: &std::sync::atomic::AtomicU64,
    silence: Silence,
) -> std::result::Result<(), String> {
    use std::sync::atomic::Ordering;
    let page = ram.page_size();
    loop {
        let f = match reader.recv() {
            Ok(f) => f,
            Err(migration::Error::Closed { .. }) => return Ok(()),
            Err(migration::Error::Silent) if silence == Silence::Idle => continue,
            Err(e) => return Err(e.to_string()),
        };
        let index = reader.frames - 1;
        match f.kind {
            FrameKind::Complete => return Ok(()),
            FrameKind::Page | FrameKind::ZeroPage => {
                let (gpa, data) = f.as_page(index, page).map_err(|e| e.to_string())?;
                if gpa % page != 0 || gpa + page > ram.size() {
                    return Err(format!(
                        "post-copy frame {index}: GPA {gpa:#x} is outside guest RAM"
                    ));
                }
                let installed = ram
                    .install_page(Gpa(gpa), content(data))
                    .map_err(|e| format!("installing GPA {gpa:#x}: {e}"))?;
                if installed == Installed::Duplicate {
                    continue;
                }
                let asked = link
                    .requested
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&gpa)
                    .copied();
                match asked {
                    Some(t) => {
                        link.demand_pages.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut h) = link.latency.lock() {
                            h.record(t.elapsed().as_nanos() as u64);
                        }
                    }
                    None => {
                        link.pushed_pages.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if filled.fetch_add(1, Ordering::Relaxed) + 1 == link.missing {
                    // Every page is in: end the urgent channel, telling the source what
                    // the demand faults cost here.
                    let stats = {
                        let h = link.latency.lock().unwrap_or_else(|e| e.into_inner());
                        DemandStats {
                            pages: link.demand_pages.load(Ordering::Relaxed),
                            us_p50: h.percentile_us(50.0),
                            us_p99: h.percentile_us(99.0),
                            us_max: h.max_us(),
                        }
                    };
                    let mut w = link.urgent.lock().unwrap_or_else(|e| e.into_inner());
                    let _ = w.send(&Frame::json(FrameKind::Complete, &stats));
                    let _ = w.flush();
                }
            }
            other => return Err(format!("post-copy frame {index}: unexpected {other:?}")),
        }
    }
}
