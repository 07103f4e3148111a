//! NUMA: node backends (host syscalls, or emulated nodes), and the balancing policy that
//! decides from NUMA-hint faults where a 2 MiB region should live.
//!
//! Node syscalls go through `libc::syscall`: no NUMA crate is kept up (and libnuma would
//! add a C dependency for four syscalls).

use std::collections::HashMap;

use serde::Serialize;

use crate::table::SIZE_2M;
use crate::Error;

/// How guest NUMA nodes are backed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeBackendKind {
    /// Real host nodes: zones bound with mbind, pages moved with mbind(MPOL_MF_MOVE).
    Host,
    /// Each guest node is its own memfd; moving a region copies it and remaps both views.
    /// For single-node hosts; labelled as emulated in every output.
    #[default]
    Emulated,
}

impl std::fmt::Display for NodeBackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NodeBackendKind::Host => "host",
            NodeBackendKind::Emulated => "emulated",
        })
    }
}

/// Guest NUMA layout of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NumaLayout {
    pub nodes: u16,
    pub backend: NodeBackendKind,
}

impl Default for NumaLayout {
    fn default() -> Self {
        NumaLayout {
            nodes: 1,
            backend: NodeBackendKind::Emulated,
        }
    }
}

/// Host memory policies for [`mbind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    Bind,
    Preferred,
    Interleave,
}

/// Whether [`mbind`] moves pages already placed elsewhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExistingPages {
    Stay,
    Move,
}

const MPOL_MF_STRICT: u32 = 1 << 0;
const MPOL_MF_MOVE: u32 = 1 << 1;

/// mbind(2) of [addr, addr+len) to `nodes`.
pub fn mbind(
    addr: u64,
    len: u64,
    policy: Policy,
    nodes: &[u16],
    existing: ExistingPages,
) -> Result<(), Error> {
    let mode = match policy {
        Policy::Bind => libc::MPOL_BIND,
        Policy::Preferred => libc::MPOL_PREFERRED,
        Policy::Interleave => libc::MPOL_INTERLEAVE,
    };
    let mut mask = [0u64; 16];
    for &n in nodes {
        let n = n as usize;
        if n >= mask.len() * 64 {
            return Err(Error::Numa(format!(
                "node {n} is beyond the 1024 nodes mbind supports"
            )));
        }
        mask[n / 64] |= 1 << (n % 64);
    }
    let flags = match existing {
        ExistingPages::Stay => 0,
        ExistingPages::Move => MPOL_MF_MOVE | MPOL_MF_STRICT,
    };
    // SAFETY: mbind reads the nodemask (maxnode bits) we own and changes policy of our own
    // mapping; it does not touch memory contents.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr,
            len,
            mode,
            mask.as_ptr(),
            (mask.len() * 64) as u64,
            flags,
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        let max = host_nodes().iter().max().copied().unwrap_or(0);
        return Err(Error::Numa(format!(
            "mbind of {len:#x} bytes to node(s) {nodes:?}: {e}{}",
            if nodes.iter().any(|&n| u32::from(n) > max) {
                format!(" (this host's nodes are 0..={max}; use --numa backend=emulated for more)")
            } else {
                String::new()
            }
        )));
    }
    Ok(())
}

/// The node each page at `addrs` is on (move_pages(2) query); negative values are -errno
/// (e.g. -ENOENT for a page not present).
pub fn page_nodes(addrs: &[u64]) -> Result<Vec<i32>, Error> {
    let mut status = vec![0i32; addrs.len()];
    // SAFETY: query mode (nodes = NULL): the kernel reads `addrs` and writes `status`,
    // both ours and of the same length.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            0,
            addrs.len() as u64,
            addrs.as_ptr(),
            std::ptr::null::<i32>(),
            status.as_mut_ptr(),
            0,
        )
    };
    if r != 0 {
        return Err(Error::Numa(format!(
            "move_pages query: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(status)
}

/// The host's online nodes.
pub fn host_nodes() -> Vec<u32> {
    crate::host::HostPaths::default().numa_nodes()
}

/// Balancing knobs (defaults follow Linux's task_numa_work: 256 MB per 1 s).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct BalancerConfig {
    /// Bytes hinted per scan period.
    pub scan_window: u64,
    pub scan_period_min_ms: u64,
    pub scan_period_max_ms: u64,
    /// At most this many region migrations per second.
    pub max_migrations_per_sec: u64,
    /// A region that took faults from two different nodes within this many scans is
    /// shared and stays put.
    pub shared_window_scans: u64,
}

impl Default for BalancerConfig {
    fn default() -> Self {
        BalancerConfig {
            scan_window: 256 << 20,
            scan_period_min_ms: 1000,
            scan_period_max_ms: 60_000,
            max_migrations_per_sec: 128,
            shared_window_scans: 4,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Stay,
    Migrate { to: u16 },
}

#[derive(Clone, Copy, Debug, Default)]
struct RegionHistory {
    /// The node of the last hint fault and the scan it was in.
    last: Option<(u16, u64)>,
    /// Scan in which faults from two different nodes were last seen.
    shared_at: Option<u64>,
}

/// The placement policy: migrate a region to the accessing vCPU's node after two
/// consecutive hint faults from that node (the kernel's should_numa_migrate_memory
/// two-stage filter); regions touched from several nodes stay; migrations are rate
/// limited.
#[derive(Debug)]
pub struct Balancer {
    cfg: BalancerConfig,
    regions: HashMap<u64, RegionHistory>,
    scan: u64,
    budget_window_start_ms: u64,
    migrations_in_window: u64,
}

impl Balancer {
    pub fn new(cfg: BalancerConfig) -> Self {
        Balancer {
            cfg,
            regions: HashMap::new(),
            scan: 0,
            budget_window_start_ms: 0,
            migrations_in_window: 0,
        }
    }

    pub fn config(&self) -> &BalancerConfig {
        &self.cfg
    }

    /// A new scan period began.
    pub fn next_scan(&mut self) {
        self.scan += 1;
    }

    /// A hint fault at `gpa` by a vCPU on `node`; the region is on `current`.
    pub fn on_hint_fault(&mut self, gpa: u64, node: u16, current: u16, now_ms: u64) -> Decision {
        let region = gpa / SIZE_2M;
        let scan = self.scan;
        let h = self.regions.entry(region).or_default();
        let previous = h.last.replace((node, scan));
        if let Some((prev_node, prev_scan)) = previous {
            if prev_node != node && scan.saturating_sub(prev_scan) <= self.cfg.shared_window_scans {
                h.shared_at = Some(scan);
            }
        }
        let shared = h
            .shared_at
            .is_some_and(|s| scan.saturating_sub(s) <= self.cfg.shared_window_scans);
        if shared || node == current {
            return Decision::Stay;
        }
        // Two-fault filter: the previous fault (in an earlier scan) came from this node too.
        let confirmed = previous.is_some_and(|(n, s)| n == node && s < scan);
        if !confirmed {
            return Decision::Stay;
        }
        if now_ms.saturating_sub(self.budget_window_start_ms) >= 1000 {
            self.budget_window_start_ms = now_ms;
            self.migrations_in_window = 0;
        }
        if self.migrations_in_window >= self.cfg.max_migrations_per_sec {
            return Decision::Stay;
        }
        self.migrations_in_window += 1;
        Decision::Migrate { to: node }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_faults_from_a_remote_node_migrate() {
        let mut b = Balancer::new(BalancerConfig::default());
        assert_eq!(
            b.on_hint_fault(0, 1, 0, 0),
            Decision::Stay,
            "first fault only records"
        );
        b.next_scan();
        assert_eq!(b.on_hint_fault(4096, 1, 0, 10), Decision::Migrate { to: 1 });
        // Local faults never migrate.
        b.next_scan();
        assert_eq!(b.on_hint_fault(SIZE_2M, 0, 0, 20), Decision::Stay);
    }

    #[test]
    fn shared_regions_stay_put() {
        let mut b = Balancer::new(BalancerConfig::default());
        for scan in 0..10u64 {
            let node = (scan % 2) as u16;
            assert_eq!(
                b.on_hint_fault(0, node, 0, scan * 10),
                Decision::Stay,
                "scan {scan}"
            );
            b.next_scan();
        }
    }

    #[test]
    fn migrations_are_rate_limited() {
        let cfg = BalancerConfig {
            max_migrations_per_sec: 3,
            ..Default::default()
        };
        let mut b = Balancer::new(cfg);
        for r in 0..10u64 {
            b.on_hint_fault(r * SIZE_2M, 1, 0, 0);
        }
        b.next_scan();
        let migrated = (0..10u64)
            .filter(|r| b.on_hint_fault(r * SIZE_2M, 1, 0, 5) != Decision::Stay)
            .count();
        assert_eq!(migrated, 3);
        // Next second: budget again.
        b.next_scan();
        let migrated = (0..10u64)
            .filter(|r| b.on_hint_fault(r * SIZE_2M, 1, 0, 1500) != Decision::Stay)
            .count();
        assert_eq!(migrated, 3);
    }

    #[test]
    fn host_syscalls_on_this_host() {
        // SAFETY: test: a private anonymous mapping of 2 pages.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                8192,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let a = p as u64;
        mbind(a, 8192, Policy::Bind, &[0], ExistingPages::Move).unwrap();
        // SAFETY: test: touch the first page.
        unsafe { std::ptr::write_volatile(p as *mut u64, 1) };
        let st = page_nodes(&[a, a + 4096]).unwrap();
        assert_eq!(st[0], 0, "touched page on node 0");
        assert_eq!(st[1], -libc::ENOENT, "untouched page not present");
        let nodes = host_nodes();
        let absent = nodes.iter().max().copied().unwrap_or(0) as u16 + 1;
        let e = mbind(a, 8192, Policy::Bind, &[absent], ExistingPages::Move)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("node(s) [{absent}]")) && e.contains("emulated"),
            "{e}"
        );
        // SAFETY: test: unmap our mapping.
        unsafe { libc::munmap(p, 8192) };
    }
}
