//! Guest NUMA in the VMM: topology from `--numa`, initial placement per workload, and the
//! NUMA engine — a scanner that hints a window of guest memory each period (a zap through
//! the mmu notifier), hint faults from the fault path recorded against the faulting
//! vCPU's node, and region migrations decided by `guest_mm::numa::Balancer`.
//!
//! What the VMM knows and the kernel's automatic NUMA balancing does not: which thread is
//! which vCPU (the fault's thread id) and the guest topology.

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guest_image::abi;
use guest_image::Workload;
use guest_mm::notifier::GpaRange;
use guest_mm::numa::{Balancer, BalancerConfig, Decision, NodeBackendKind, NumaLayout, Policy};
use guest_mm::stage::{Change, SecondStage};
use guest_mm::GuestRam;
use serde::Serialize;

use crate::periodic::Periodic;

const SIZE_2M: u64 = 2 << 20;

/// `--numa nodes=N[,cpus=A-B:C-D...][,backend=host|emulated][,policy=bind|preferred|interleave]`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NumaSpec {
    pub nodes: u16,
    /// vCPUs of each node, in node order (`cpus=0-1:2-3`).
    pub cpus: Option<Vec<Vec<u32>>>,
    pub backend: Option<NodeBackendKind>,
    pub policy: Policy,
}

impl FromStr for NumaSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut spec = NumaSpec {
            nodes: 0,
            cpus: None,
            backend: None,
            policy: Policy::Bind,
        };
        for part in s.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("--numa {s:?}: expected key=value, got {part:?}"))?;
            match k {
                "nodes" => {
                    spec.nodes = v
                        .parse()
                        .map_err(|_| format!("--numa nodes={v:?} is not a number"))?;
                }
                "cpus" => {
                    let mut per_node = Vec::new();
                    for group in v.split(':') {
                        let list = guest_mm::host::parse_cpu_list(group);
                        if list.is_empty() {
                            return Err(format!(
                                "--numa cpus={v:?}: {group:?} is not a vCPU list like 0-1"
                            ));
                        }
                        per_node.push(list);
                    }
                    spec.cpus = Some(per_node);
                }
                "backend" => {
                    spec.backend = Some(match v {
                        "host" => NodeBackendKind::Host,
                        "emulated" => NodeBackendKind::Emulated,
                        _ => return Err(format!("--numa backend={v:?}: choose host or emulated")),
                    });
                }
                "policy" => {
                    spec.policy = match v {
                        "bind" => Policy::Bind,
                        "preferred" => Policy::Preferred,
                        "interleave" => Policy::Interleave,
                        _ => {
                            return Err(format!(
                                "--numa policy={v:?}: choose bind, preferred or interleave"
                            ))
                        }
                    };
                }
                _ => {
                    return Err(format!(
                        "--numa: unknown key {k:?} (nodes, cpus, backend, policy)"
                    ))
                }
            }
        }
        if spec.nodes == 0 {
            return Err(format!("--numa {s:?}: nodes=N (N >= 1) is required"));
        }
        Ok(spec)
    }
}

/// The resolved topology: layout of guest RAM and the node of each vCPU.
#[derive(Clone, Debug)]
pub struct Topology {
    pub layout: NumaLayout,
    pub vcpu_nodes: Vec<u16>,
    /// Why the emulated backend was chosen, when the user did not ask for it.
    pub note: Option<String>,
}

impl NumaSpec {
    pub fn resolve(&self, vcpus: u32, host_nodes: usize) -> Result<Topology, String> {
        let (backend, note) = match self.backend {
            Some(b) => (b, None),
            None if host_nodes >= self.nodes as usize => (NodeBackendKind::Host, None),
            None => (
                NodeBackendKind::Emulated,
                Some(format!(
                    "the host has {host_nodes} NUMA node(s), fewer than {}: using emulated nodes",
                    self.nodes
                )),
            ),
        };
        let vcpu_nodes = match &self.cpus {
            Some(groups) => {
                if groups.len() != self.nodes as usize {
                    return Err(format!(
                        "--numa cpus= names {} node(s) but nodes={}",
                        groups.len(),
                        self.nodes
                    ));
                }
                let mut nodes = vec![u16::MAX; vcpus as usize];
                for (node, group) in groups.iter().enumerate() {
                    for &c in group {
                        let slot = nodes.get_mut(c as usize).ok_or_else(|| {
                            format!("--numa cpus=: vCPU {c} does not exist (--vcpus {vcpus})")
                        })?;
                        if *slot != u16::MAX {
                            return Err(format!("--numa cpus=: vCPU {c} is in two nodes"));
                        }
                        *slot = node as u16;
                    }
                }
                if let Some(c) = nodes.iter().position(|&n| n == u16::MAX) {
                    return Err(format!("--numa cpus=: vCPU {c} is in no node"));
                }
                nodes
            }
            // Spread evenly: consecutive vCPUs share a node.
            None => (0..vcpus)
                .map(|v| (v as u64 * self.nodes as u64 / vcpus as u64) as u16)
                .collect(),
        };
        Ok(Topology {
            layout: NumaLayout {
                nodes: self.nodes,
                backend,
                policy: self.policy,
            },
            vcpu_nodes,
            note,
        })
    }
}

/// Whether the NUMA engine scans and migrates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Balancing {
    On,
    Off,
}

/// `--numa-scan window=SIZE,period=D`
pub fn parse_scan(s: &str) -> Result<BalancerConfig, String> {
    let mut cfg = BalancerConfig::default();
    for part in s.split(',') {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("--numa-scan {s:?}: expected key=value"))?;
        match k {
            "window" => {
                cfg.scan_window = guest_mm::size::parse_size(v).map_err(|e| e.to_string())?
            }
            "period" => {
                let d = humantime::parse_duration(v)
                    .map_err(|e| format!("--numa-scan period={v:?}: {e}"))?;
                cfg.scan_period_min_ms = (d.as_millis() as u64).max(1);
                cfg.scan_period_max_ms = cfg.scan_period_max_ms.max(cfg.scan_period_min_ms * 16);
            }
            "rate" => {
                cfg.max_migrations_per_sec =
                    v.parse().map_err(|_| format!("--numa-scan rate={v:?}"))?
            }
            _ => {
                return Err(format!(
                    "--numa-scan: unknown key {k:?} (window, period, rate)"
                ))
            }
        }
    }
    Ok(cfg)
}

/// Each vCPU's working set: its partition, or the whole data area for numa01.
pub fn working_sets(workload: Workload, ram_size: u64, vcpus: usize) -> Vec<(u64, u64)> {
    let total = (ram_size - abi::DATA_START) / 4096;
    let per = total / vcpus as u64;
    (0..vcpus as u64)
        .map(|v| {
            if workload == Workload::Numa01 {
                return (abi::DATA_START, ram_size);
            }
            let start = abi::DATA_START + v * per * 4096;
            let pages = if v == vcpus as u64 - 1 {
                total - v * per
            } else {
                per
            };
            (start, start + pages * 4096)
        })
        .collect()
}

/// Whether a move is initial placement (before the guest runs) or a migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MoveKind {
    Placement,
    Migration,
}

#[derive(Default)]
pub struct NumaCounters {
    pub hint_faults: AtomicU64,
    pub hint_faults_local: AtomicU64,
    pub regions_migrated: AtomicU64,
    pub migrate_failures: AtomicU64,
    pub scans: AtomicU64,
}

#[derive(Clone, Debug, Serialize)]
pub struct NumaReport {
    pub nodes: u16,
    pub backend: String,
    pub balancing: bool,
    pub vcpu_nodes: Vec<u16>,
    pub numa_hint_faults: u64,
    pub numa_hint_faults_local: u64,
    pub numa_pages_migrated: u64,
    pub numa_migrate_failures: u64,
    pub locality_pct: f64,
    pub scans: u64,
    /// (ms since the vCPUs started, locality %) sampled every 100 ms.
    pub locality_over_time: Vec<(f64, f64)>,
    pub time_to_95_ms: Option<f64>,
    pub note: Option<String>,
}

pub struct NumaEngine {
    ram: Arc<GuestRam>,
    stage: Arc<SecondStage>,
    vcpu_nodes: Vec<u16>,
    working_sets: Vec<(u64, u64)>,
    balancer: Mutex<Balancer>,
    pub counters: NumaCounters,
    start: Instant,
    samples: Mutex<Vec<(f64, f64)>>,
    remote_since_scan: AtomicU64,
}

impl NumaEngine {
    pub fn new(
        ram: Arc<GuestRam>,
        stage: Arc<SecondStage>,
        vcpu_nodes: Vec<u16>,
        working_sets: Vec<(u64, u64)>,
        cfg: BalancerConfig,
    ) -> NumaEngine {
        let ram_size = ram.size();
        NumaEngine {
            ram,
            stage,
            vcpu_nodes,
            working_sets,
            balancer: Mutex::new(Balancer::new(cfg, ram_size)),
            counters: NumaCounters::default(),
            start: Instant::now(),
            samples: Mutex::new(Vec::new()),
            remote_since_scan: AtomicU64::new(0),
        }
    }

    pub fn node_of_vcpu(&self, vcpu: usize) -> u16 {
        self.vcpu_nodes.get(vcpu).copied().unwrap_or(0)
    }

    /// Moves the 2 MiB region at `gpa` to `node` through the mmu notifier: every mapping
    /// of the range is invalidated before the copy. Counted as a migration.
    pub fn migrate(&self, gpa: u64, node: u16) -> bool {
        self.move_region(gpa, node, MoveKind::Migration)
    }

    fn move_region(&self, gpa: u64, node: u16, kind: MoveKind) -> bool {
        let region = gpa & !(SIZE_2M - 1);
        let range = GpaRange::new(region, region + SIZE_2M);
        let r = self.stage.apply_with(Change::Migrate { range, node }, |w| {
            self.ram.move_region(w.start, w.len(), node)
        });
        match r {
            Ok(_) => {
                if kind == MoveKind::Migration {
                    self.counters
                        .regions_migrated
                        .fetch_add(1, Ordering::Relaxed);
                }
                true
            }
            Err(_) => {
                self.counters
                    .migrate_failures
                    .fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// A hint fault at `gpa` by `vcpu`: count it, and migrate the region if the policy
    /// says so. Called on the fault thread before the fault is resolved.
    pub fn on_hint_fault(&self, gpa: u64, vcpu: usize) {
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
        if let Decision::Migrate { to } = decision {
            self.migrate(gpa, to);
        }
    }

    /// Places guest RAM before the guest runs. The image area stays on node 0.
    pub fn place_initial(&self, workload: Workload) -> Result<(), String> {
        let nodes = self.ram.numa().nodes;
        if nodes < 2 {
            return Ok(());
        }
        let regions = self.ram.size() / SIZE_2M;
        let first = abi::DATA_START / SIZE_2M;
        for r in first..regions {
            let gpa = r * SIZE_2M;
            let owner = self
                .working_sets
                .iter()
                .position(|&(s, e)| gpa >= s && gpa < e)
                .unwrap_or(0);
            let node = match workload {
                Workload::Numa01 => 0,
                Workload::Numa02 => (self.node_of_vcpu(owner) + 1) % nodes,
                Workload::Numa01ThreadAlloc => (r % nodes as u64) as u16,
                _ => self.node_of_vcpu(owner),
            };
            if node != 0 && !self.move_region(gpa, node, MoveKind::Placement) {
                return Err(format!(
                    "initial placement of GPA {gpa:#x} on node {node} failed"
                ));
            }
        }
        Ok(())
    }

    /// Share of each vCPU's working set on its own node, averaged over vCPUs (percent).
    pub fn locality_pct(&self) -> f64 {
        let nodes = self.ram.region_nodes();
        let mut sum = 0.0;
        for (v, &(s, e)) in self.working_sets.iter().enumerate() {
            let mine = self.node_of_vcpu(v);
            let (mut local, mut all) = (0u64, 0u64);
            let mut gpa = s;
            while gpa < e {
                let next = ((gpa / SIZE_2M) + 1) * SIZE_2M;
                let len = next.min(e) - gpa;
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
        sum / self.working_sets.len().max(1) as f64
    }

    fn sample(&self) {
        let t = self.start.elapsed().as_secs_f64() * 1000.0;
        let pct = self.locality_pct();
        self.samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((t, pct));
    }

    /// Starts the scanner (balancing on) and the locality sampler.
    pub fn start_threads(self: &Arc<Self>, balancing: Balancing) -> std::io::Result<Vec<Periodic>> {
        let mut threads = Vec::new();
        let e = self.clone();
        e.sample();
        threads.push(Periodic::spawn("numa-sampler", move || {
            e.sample();
            Duration::from_millis(100)
        })?);
        if balancing == Balancing::On && self.ram.numa().nodes > 1 {
            let e = self.clone();
            let cfg = *self
                .balancer
                .lock()
                .unwrap_or_else(|x| x.into_inner())
                .config();
            let mut cursor = 0u64;
            let mut period = cfg.scan_period_min_ms;
            threads.push(Periodic::spawn("numa-scanner", move || {
                let size = e.ram.size();
                let end = (cursor + cfg.scan_window).min(size);
                let _ = e.stage.apply(Change::Hint {
                    range: GpaRange::new(cursor, end),
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
            })?);
        }
        Ok(threads)
    }

    /// Testing: migrates a pseudo-random region to another node every `period`.
    pub fn start_forced_migrations(
        self: &Arc<Self>,
        period: Duration,
        seed: u64,
    ) -> std::io::Result<Periodic> {
        let e = self.clone();
        let mut x = seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1;
        Periodic::spawn("numa-force-migrate", move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let regions = e.ram.size() / SIZE_2M;
            let gpa = (x % regions) * SIZE_2M;
            let nodes = e.ram.numa().nodes as u64;
            let to =
                ((e.ram.node_of(gpa) as u64 + 1 + (x >> 40) % (nodes - 1).max(1)) % nodes) as u16;
            e.migrate(gpa, to);
            period
        })
    }

    pub fn report(&self, balancing: Balancing, note: Option<String>) -> NumaReport {
        let samples = self
            .samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        NumaReport {
            nodes: self.ram.numa().nodes,
            backend: self.ram.numa().backend.to_string(),
            balancing: balancing == Balancing::On,
            vcpu_nodes: self.vcpu_nodes.clone(),
            numa_hint_faults: self.counters.hint_faults.load(Ordering::Relaxed),
            numa_hint_faults_local: self.counters.hint_faults_local.load(Ordering::Relaxed),
            numa_pages_migrated: self.counters.regions_migrated.load(Ordering::Relaxed)
                * (SIZE_2M / 4096),
            numa_migrate_failures: self.counters.migrate_failures.load(Ordering::Relaxed),
            locality_pct: self.locality_pct(),
            scans: self.counters.scans.load(Ordering::Relaxed),
            time_to_95_ms: samples.iter().find(|(_, p)| *p >= 95.0).map(|(t, _)| *t),
            locality_over_time: samples,
            note,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_numa_specs() {
        let s: NumaSpec = "nodes=2".parse().unwrap();
        let t = s.resolve(4, 1).unwrap();
        assert_eq!(t.vcpu_nodes, vec![0, 0, 1, 1]);
        assert_eq!(t.layout.backend, NodeBackendKind::Emulated);
        assert!(t.note.unwrap().contains("emulated"));
        let s: NumaSpec = "nodes=2,cpus=0:1-2,backend=host,policy=preferred"
            .parse()
            .unwrap();
        assert_eq!(s.policy, Policy::Preferred);
        let t = s.resolve(3, 1).unwrap();
        assert_eq!(t.vcpu_nodes, vec![0, 1, 1]);
        assert_eq!(t.layout.backend, NodeBackendKind::Host);
        assert!("nodes=2,cpus=0:0"
            .parse::<NumaSpec>()
            .unwrap()
            .resolve(2, 1)
            .is_err());
        assert!("nodes=2,cpus=0"
            .parse::<NumaSpec>()
            .unwrap()
            .resolve(2, 1)
            .is_err());
        assert!("nodes=x".parse::<NumaSpec>().is_err());
        assert!("nodes=2,backend=magic".parse::<NumaSpec>().is_err());
        assert!("cpus=0".parse::<NumaSpec>().is_err());
        let c = parse_scan("window=64M,period=20ms").unwrap();
        assert_eq!((c.scan_window, c.scan_period_min_ms), (64 << 20, 20));
        assert!(parse_scan("speed=9").is_err());
    }

    #[test]
    fn working_sets_split_like_the_guest() {
        let w = working_sets(Workload::Numa02, 64 << 20, 2);
        assert_eq!(w, vec![(4 << 20, 34 << 20), (34 << 20, 64 << 20)]);
        let w = working_sets(Workload::Numa01, 64 << 20, 2);
        assert!(w.iter().all(|&r| r == (4 << 20, 64 << 20)));
    }
}
