//! The NUMA engine: initial placement, a scanner that hints a window of guest memory
//! each period (a zap through the mmu notifier), hint faults from the fault thread
//! recorded against the faulting vCPU's node, region moves decided by the
//! [`Balancer`], and locality sampling.
//!
//! What the VMM knows and the kernel's automatic NUMA balancing does not: which thread is
//! which vCPU (the fault's thread id) and the guest topology.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::balancer::{Balancer, Decision};
use super::spec::Balancing;
use crate::addr::{Gpa, GpaRange, SIZE_2M, SIZE_4K};
use crate::config::{NumaConfig, Recurring};
use crate::error::Error;
use crate::periodic::Periodic;
use crate::ram::GuestRam;
use crate::stage::{ApplyError, Change, SecondStage};

/// Whether a move is initial placement (before the guest runs) or a balancing move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MoveKind {
    Placement,
    Balancing,
}

#[derive(Default)]
struct Counters {
    hint_faults: AtomicU64,
    hint_faults_local: AtomicU64,
    regions_moved: AtomicU64,
    move_failures: AtomicU64,
    scans: AtomicU64,
}

#[derive(Clone, Debug, Serialize)]
pub struct NumaReport {
    pub nodes: u16,
    pub backend: String,
    pub balancing: bool,
    pub vcpu_nodes: Vec<u16>,
    pub numa_hint_faults: u64,
    pub numa_hint_faults_local: u64,
    /// 4 KiB pages moved. The name (and `numa_migrate_failures`) is the kernel's
    /// /proc/vmstat counter's, which users compare these against; we say "move".
    pub numa_pages_migrated: u64,
    pub numa_migrate_failures: u64,
    pub locality_pct: f64,
    pub scans: u64,
    /// (ms since the engine was made, locality %) sampled every 100 ms.
    pub locality_over_time: Vec<(f64, f64)>,
    pub time_to_95_ms: Option<f64>,
    pub note: Option<String>,
}

pub struct NumaEngine {
    ram: Arc<GuestRam>,
    stage: Arc<SecondStage>,
    cfg: NumaConfig,
    balancer: Mutex<Balancer>,
    counters: Counters,
    start: Instant,
    samples: Mutex<Vec<(f64, f64)>>,
    remote_since_scan: AtomicU64,
}

impl NumaEngine {
    pub(crate) fn new(ram: Arc<GuestRam>, stage: Arc<SecondStage>, cfg: NumaConfig) -> Self {
        let ram_size = ram.size();
        NumaEngine {
            balancer: Mutex::new(Balancer::new(cfg.scan, ram_size)),
            ram,
            stage,
            cfg,
            counters: Counters::default(),
            start: Instant::now(),
            samples: Mutex::new(Vec::new()),
            remote_since_scan: AtomicU64::new(0),
        }
    }

    pub fn node_of_vcpu(&self, vcpu: usize) -> u16 {
        self.cfg.vcpu_nodes.get(vcpu).copied().unwrap_or(0)
    }

    /// Moves the 2 MiB region at `gpa` to `node` through the mmu notifier: every mapping
    /// of the range is invalidated before the copy. Counted as a balancing move.
    pub fn move_region(&self, gpa: Gpa, node: u16) -> bool {
        self.move_kind(gpa, node, MoveKind::Balancing).is_ok()
    }

    fn move_kind(&self, gpa: Gpa, node: u16, kind: MoveKind) -> Result<(), Error> {
        let start = gpa.align_down(SIZE_2M);
        let range = GpaRange::new(start, start.add(SIZE_2M));
        let r = self.stage.apply_with(Change::Move { range, node }, |w| {
            self.ram.move_region(w, node)
        });
        match r {
            Ok(_) => {
                if kind == MoveKind::Balancing {
                    self.counters.regions_moved.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }
            Err(e) => {
                self.counters.move_failures.fetch_add(1, Ordering::Relaxed);
                Err(match e {
                    ApplyError::Host(e) => e,
                    ApplyError::Table(source) => Error::Table {
                        what: "a NUMA move",
                        source,
                    },
                })
            }
        }
    }

    /// A hint fault at `gpa` by `vcpu`: count it, and move the region if the policy says
    /// so. Called on the fault thread before the fault is resolved.
    pub fn on_hint_fault(&self, gpa: Gpa, vcpu: usize) {
        let node = self.node_of_vcpu(vcpu);
        let current = self.ram.node_of(gpa);
        self.counters.hint_faults.fetch_add(1, Ordering::Relaxed);
        if node == current {
            self.counters
                .hint_faults_local
                .fetch_add(1, Ordering::Relaxed);
        } else {
            self.remote_since_scan.fetch_add(1, Ordering::Relaxed);
        }
        let now_ms = self.start.elapsed().as_millis() as u64;
        let decision = self
            .balancer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .on_hint_fault(gpa, node, current, now_ms);
        if let Decision::Move { to } = decision {
            self.move_region(gpa, to);
        }
    }

    /// Applies the configured initial placement (before the guest runs).
    pub(crate) fn place_initial(&self) -> Result<(), Error> {
        if self.ram.numa().nodes < 2 {
            return Ok(());
        }
        for &(range, node) in &self.cfg.placement {
            for r in range.pages(SIZE_2M) {
                let gpa = Gpa(r * SIZE_2M);
                if self.ram.node_of(gpa) == node {
                    continue;
                }
                self.move_kind(gpa, node, MoveKind::Placement)
                    .map_err(|e| Error::Placement {
                        range: GpaRange::new(gpa, gpa.add(SIZE_2M)),
                        node,
                        source: Box::new(e),
                    })?;
            }
        }
        Ok(())
    }

    /// Share of each vCPU's working set on its own node, averaged over vCPUs (percent).
    pub fn locality_pct(&self) -> f64 {
        let nodes = self.ram.region_nodes();
        let mut sum = 0.0;
        for (v, set) in self.cfg.working_sets.iter().enumerate() {
            let mine = self.node_of_vcpu(v);
            let (mut local, mut all) = (0u64, 0u64);
            let mut gpa = set.start.0;
            while gpa < set.end.0 {
                let next = ((gpa / SIZE_2M) + 1) * SIZE_2M;
                let len = next.min(set.end.0) - gpa;
                all += len;
                if nodes.get((gpa / SIZE_2M) as usize) == Some(&mine) {
                    local += len;
                }
                gpa = next;
            }
            sum += if all > 0 {
                local as f64 * 100.0 / all as f64
            } else {
                100.0
            };
        }
        sum / self.cfg.working_sets.len().max(1) as f64
    }

    fn sample(&self) {
        let t = self.start.elapsed().as_secs_f64() * 1000.0;
        let pct = self.locality_pct();
        self.samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((t, pct));
    }

    /// Starts the locality sampler, the scanner (balancing on, more than one node) and
    /// the forced moves (if configured).
    pub(crate) fn start_threads(self: &Arc<Self>) -> Result<Vec<Periodic>, Error> {
        let io = |source| Error::Thread {
            name: "NUMA",
            source,
        };
        let mut threads = Vec::new();
        let e = self.clone();
        e.sample();
        threads.push(
            Periodic::spawn("numa-sampler", move || {
                e.sample();
                Duration::from_millis(100)
            })
            .map_err(io)?,
        );
        if self.cfg.balancing == Balancing::On && self.ram.numa().nodes > 1 {
            threads.push(self.start_scanner().map_err(io)?);
        }
        if let Some(f) = self.cfg.forced_moves {
            threads.push(self.start_forced_moves(f).map_err(io)?);
        }
        Ok(threads)
    }

    fn start_scanner(self: &Arc<Self>) -> std::io::Result<Periodic> {
        let e = self.clone();
        let cfg = self.cfg.scan;
        let mut cursor = 0u64;
        let mut period = cfg.scan_period_min_ms;
        Periodic::spawn("numa-scanner", move || {
            let size = e.ram.size();
            let end = (cursor + cfg.scan_window).min(size);
            let _ = e.stage.apply(Change::Hint {
                range: GpaRange::new(Gpa(cursor), Gpa(end)),
            });
            cursor = if end >= size { 0 } else { end };
            e.counters.scans.fetch_add(1, Ordering::Relaxed);
            // Like task_numa_work: scan faster while faults are remote, slower when
            // everything is already local.
            let remote = e.remote_since_scan.swap(0, Ordering::Relaxed);
            period = if remote > 0 {
                (period / 2).max(cfg.scan_period_min_ms)
            } else {
                (period * 2).min(cfg.scan_period_max_ms)
            };
            Duration::from_millis(period)
        })
    }

    /// Testing: moves a pseudo-random region to another node every period.
    fn start_forced_moves(self: &Arc<Self>, f: Recurring) -> std::io::Result<Periodic> {
        let e = self.clone();
        let mut x = f.seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1;
        Periodic::spawn("numa-force-move", move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let regions = e.ram.size() / SIZE_2M;
            let gpa = Gpa((x % regions) * SIZE_2M);
            let nodes = e.ram.numa().nodes as u64;
            let to =
                ((e.ram.node_of(gpa) as u64 + 1 + (x >> 40) % (nodes - 1).max(1)) % nodes) as u16;
            e.move_region(gpa, to);
            f.period
        })
    }

    pub fn report(&self) -> NumaReport {
        let samples = self
            .samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let c = &self.counters;
        NumaReport {
            nodes: self.ram.numa().nodes,
            backend: self.ram.numa().backend.to_string(),
            balancing: self.cfg.balancing == Balancing::On,
            vcpu_nodes: self.cfg.vcpu_nodes.clone(),
            numa_hint_faults: c.hint_faults.load(Ordering::Relaxed),
            numa_hint_faults_local: c.hint_faults_local.load(Ordering::Relaxed),
            numa_pages_migrated: c.regions_moved.load(Ordering::Relaxed) * (SIZE_2M / SIZE_4K),
            numa_migrate_failures: c.move_failures.load(Ordering::Relaxed),
            locality_pct: self.locality_pct(),
            scans: c.scans.load(Ordering::Relaxed),
            time_to_95_ms: samples.iter().find(|(_, p)| *p >= 95.0).map(|(t, _)| *t),
            locality_over_time: samples,
            note: self.cfg.note.clone(),
        }
    }
}
