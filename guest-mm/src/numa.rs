//! NUMA: node backends (host syscalls, or emulated nodes), and the balancing policy that
//! decides from NUMA-hint faults where a 2 MiB region should live.
//!
//! Node syscalls go through `libc::syscall`: no NUMA crate is kept up (and libnuma would
//! add a C dependency for four syscalls).

use serde::Serialize;

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
    /// Host backend: how a zone is tied to its host node.
    pub policy: Policy,
}

impl Default for NumaLayout {
    fn default() -> Self {
        NumaLayout {
            nodes: 1,
            backend: NodeBackendKind::Emulated,
            policy: Policy::Bind,
        }
    }
}

/// Host memory policies for [`mbind`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// MPOL_BIND: only the zone's node.
    #[default]
    Bind,
    /// MPOL_PREFERRED: the zone's node first, others when it is full.
    Preferred,
    /// MPOL_INTERLEAVE over the zone's node set (one node per zone for now).
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
    /// A region that took hint faults from two nodes stays put this long.
    pub shared_hold_ms: u64,
}

impl Default for BalancerConfig {
    fn default() -> Self {
        BalancerConfig {
            scan_window: 256 << 20,
            scan_period_min_ms: 1000,
            scan_period_max_ms: 60_000,
            max_migrations_per_sec: 128,
            shared_hold_ms: 10_000,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Stay,
    Migrate { to: u16 },
}

/// The placement policy, per 4 KiB page like the kernel's `should_numa_migrate_memory`:
/// a hint fault records the faulting node on the page; the page's 2 MiB region migrates
/// to that node only when the page's previous hint fault came from the same node (the
/// two-fault filter). A page touched alternately from several nodes (a shared buffer)
/// never passes the filter, so shared regions stay put. Migrations are rate limited.
#[derive(Debug)]
pub struct Balancer {
    cfg: BalancerConfig,
    /// Node of each page's last hint fault; `NO_NODE` when none yet.
    last_node: Vec<u8>,
    /// Per 2 MiB region: the node of its last hint fault, and until when it counts as
    /// shared (it took hint faults from two nodes).
    regions: Vec<(u8, u64)>,
    budget_window_start_ms: u64,
    migrations_in_window: u64,
}

const NO_NODE: u8 = u8::MAX;

impl Balancer {
    /// A balancer for guest RAM of `ram_size` bytes.
    pub fn new(cfg: BalancerConfig, ram_size: u64) -> Self {
        Balancer {
            cfg,
            last_node: vec![NO_NODE; (ram_size / 4096) as usize],
            regions: vec![(NO_NODE, 0); ram_size.div_ceil(2 << 20) as usize],
            budget_window_start_ms: 0,
            migrations_in_window: 0,
        }
    }

    pub fn config(&self) -> &BalancerConfig {
        &self.cfg
    }

    /// A hint fault at `gpa` by a vCPU on `node`; the page's region is on `current`.
    pub fn on_hint_fault(&mut self, gpa: u64, node: u16, current: u16, now_ms: u64) -> Decision {
        let Some(last) = self.last_node.get_mut((gpa / 4096) as usize) else {
            return Decision::Stay;
        };
        let node8 = node.min(NO_NODE as u16 - 1) as u8;
        let previous = std::mem::replace(last, node8);
        // A region faulted from two nodes is shared for a while: pages of a shared
        // buffer walked at different speeds by several vCPUs would otherwise pass the
        // per-page filter now and then and ping-pong.
        let region = &mut self.regions[(gpa >> 21) as usize];
        if region.0 != NO_NODE && region.0 != node8 {
            region.1 = now_ms + self.cfg.shared_hold_ms;
        }
        region.0 = node8;
        if node == current || previous != node8 || now_ms < region.1 {
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
    use crate::table::SIZE_2M;

    #[test]
    fn two_faults_from_a_remote_node_migrate() {
        let mut b = Balancer::new(BalancerConfig::default(), 64 << 20);
        assert_eq!(
            b.on_hint_fault(4096, 1, 0, 0),
            Decision::Stay,
            "first fault only records"
        );
        assert_eq!(
            b.on_hint_fault(8192, 1, 0, 5),
            Decision::Stay,
            "another page: its first fault"
        );
        assert_eq!(b.on_hint_fault(4096, 1, 0, 10), Decision::Migrate { to: 1 });
        // Local faults never migrate.
        b.on_hint_fault(SIZE_2M, 0, 0, 20);
        assert_eq!(b.on_hint_fault(SIZE_2M, 0, 0, 30), Decision::Stay);
        // Beyond guest RAM: ignored.
        assert_eq!(b.on_hint_fault(1 << 40, 1, 0, 30), Decision::Stay);
    }

    #[test]
    fn pages_touched_from_alternating_nodes_stay_put() {
        let mut b = Balancer::new(BalancerConfig::default(), 64 << 20);
        for k in 0..10u64 {
            let node = (k % 2) as u16;
            // Always remote, always a different node than the page's last fault.
            assert_eq!(
                b.on_hint_fault(0, node, 1 - node, k * 10),
                Decision::Stay,
                "fault {k}"
            );
        }
    }

    #[test]
    fn a_region_faulted_from_two_nodes_is_held_even_when_a_page_passes_the_filter() {
        let mut b = Balancer::new(BalancerConfig::default(), 64 << 20);
        b.on_hint_fault(0, 1, 0, 0);
        b.on_hint_fault(4096, 0, 0, 1);
        // Page 0's second fault from node 1 would pass the per-page filter...
        assert_eq!(
            b.on_hint_fault(0, 1, 0, 2),
            Decision::Stay,
            "...but the region is shared"
        );
        // After the hold expires, a private pattern migrates again.
        b.on_hint_fault(8192, 1, 0, 20_000);
        assert_eq!(
            b.on_hint_fault(8192, 1, 0, 20_001),
            Decision::Migrate { to: 1 }
        );
    }

    #[test]
    fn migrations_are_rate_limited() {
        let cfg = BalancerConfig {
            max_migrations_per_sec: 3,
            ..Default::default()
        };
        let mut b = Balancer::new(cfg, 64 << 20);
        for r in 0..10u64 {
            b.on_hint_fault(r * SIZE_2M, 1, 0, 0);
        }
        let migrated = (0..10u64)
            .filter(|r| b.on_hint_fault(r * SIZE_2M, 1, 0, 5) != Decision::Stay)
            .count();
        assert_eq!(migrated, 3);
        // Next second: budget again.
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
