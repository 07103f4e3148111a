//! What guest memory is asked to be, and whether the request can be met: [`RamConfig`]
//! (size, backing, thp, prefault, NUMA layout) with its checks against the host, and
//! [`MemoryConfig`], everything [`crate::GuestMemory::create`] needs (RAM plus the fault
//! path, collapse, NUMA balancing and stress options), with the refusals of combinations
//! that cannot work.
//!
//! Two levels of checking: `check` needs no host state (so a caller can refuse bad input
//! before it opens anything); `validate` adds the host's resources (hugetlb pools,
//! MemAvailable, host NUMA nodes). Neither has side effects.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

use crate::addr::{GpaRange, SIZE_1G, SIZE_2M, SIZE_4K};
use crate::collapse::{CollapseMode, ScanBudget};
use crate::error::Error;
use crate::host::HostPaths;
use crate::numa::{BalancerConfig, Balancing};
use crate::size::format_size;

/// Smallest guest RAM: the image and its tables occupy the first 4 MiB.
pub const MIN_RAM: u64 = 8 << 20;
/// Largest guest RAM: what the guest image's page-table area maps.
pub const MAX_RAM: u64 = 64 << 30;
/// Most guest NUMA nodes supported.
pub const MAX_NODES: u16 = 8;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub enum BackingKind {
    /// memfd on shmem (tmpfs) with 4 KiB pages. The default.
    #[default]
    #[serde(rename = "shmem")]
    Shmem,
    /// memfd with MFD_HUGETLB, 2 MiB pages from the hugetlb pool.
    #[serde(rename = "hugetlb-2m")]
    Hugetlb2M,
    /// memfd with MFD_HUGETLB, 1 GiB pages from the hugetlb pool.
    #[serde(rename = "hugetlb-1g")]
    Hugetlb1G,
    /// Private anonymous memory (one view); thp optional.
    #[serde(rename = "anon")]
    Anon,
}

impl BackingKind {
    pub const ALL: [BackingKind; 4] = [
        BackingKind::Shmem,
        BackingKind::Hugetlb2M,
        BackingKind::Hugetlb1G,
        BackingKind::Anon,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BackingKind::Shmem => "shmem",
            BackingKind::Hugetlb2M => "hugetlb-2m",
            BackingKind::Hugetlb1G => "hugetlb-1g",
            BackingKind::Anon => "anon",
        }
    }

    /// The backing page size: what the host maps guest RAM with (before any thp).
    pub fn page_size(self) -> u64 {
        match self {
            BackingKind::Shmem | BackingKind::Anon => SIZE_4K,
            BackingKind::Hugetlb2M => SIZE_2M,
            BackingKind::Hugetlb1G => SIZE_1G,
        }
    }

    pub fn view_layout(self) -> ViewLayout {
        match self {
            BackingKind::Anon => ViewLayout::SingleView,
            _ => ViewLayout::GuestAndStaging,
        }
    }

    /// The hugetlb page size, for the hugetlb backings.
    pub fn hugetlb_page(self) -> Option<u64> {
        match self {
            BackingKind::Hugetlb2M | BackingKind::Hugetlb1G => Some(self.page_size()),
            _ => None,
        }
    }

    /// Whether collapse applies at all: hugetlb is huge by construction.
    pub fn collapses(self) -> bool {
        self.hugetlb_page().is_none()
    }
}

impl fmt::Display for BackingKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BackingKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        BackingKind::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| Error::UnknownBacking(s.to_string()))
    }
}

/// Transparent huge pages for the anon backing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ThpMode {
    /// MADV_NOHUGEPAGE: 4 KiB pages whatever the host default.
    #[default]
    Off,
    /// MADV_HUGEPAGE.
    Madvise,
}

/// Whether guest RAM is populated before the guest runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Prefault {
    #[default]
    No,
    /// MADV_POPULATE_WRITE over the guest view.
    Populate,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViewLayout {
    /// File-backed: a guest view and a separate staging view of the same memfd.
    GuestAndStaging,
    /// Anonymous: one view serves the guest and the VMM.
    SingleView,
}

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

impl fmt::Display for NodeBackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeBackendKind::Host => "host",
            NodeBackendKind::Emulated => "emulated",
        })
    }
}

/// Host memory policies for a host-backed zone.
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

impl NumaLayout {
    /// Whether nodes are emulated memfds (more than one node on the emulated backend).
    pub fn emulated_zones(&self) -> bool {
        self.nodes > 1 && self.backend == NodeBackendKind::Emulated
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RamConfig {
    pub size: u64,
    pub backing: BackingKind,
    pub thp: ThpMode,
    pub prefault: Prefault,
    /// Where host facts are read (tests point this at a fake tree).
    pub host: HostPaths,
    /// Guest NUMA nodes and how they are backed.
    pub numa: NumaLayout,
}

impl RamConfig {
    /// The checks that need no host state: size range and alignment, option combinations.
    pub fn check_shape(&self) -> Result<(), Error> {
        let page = self.backing.page_size();
        if self.size < MIN_RAM {
            return Err(Error::TooSmall {
                size: format_size(self.size),
                min: format_size(MIN_RAM),
            });
        }
        if self.size > MAX_RAM {
            return Err(Error::TooLarge {
                size: format_size(self.size),
                max: format_size(MAX_RAM),
            });
        }
        if !self.size.is_multiple_of(page) {
            let below = self.size / page * page;
            let above = below + page;
            let nearest = if below >= MIN_RAM {
                format!("{} or {}", format_size(below), format_size(above))
            } else {
                format_size(above)
            };
            return Err(Error::Unaligned {
                size: format_size(self.size),
                backing: self.backing.to_string(),
                page: format_size(page),
                nearest,
            });
        }
        self.check_numa_shape()?;
        if self.thp == ThpMode::Madvise && self.backing != BackingKind::Anon {
            return Err(Error::ThpNotApplicable {
                backing: self.backing.to_string(),
                why: if self.backing.hugetlb_page().is_some() {
                    "already backed by hugetlb pages"
                } else {
                    "shmem, whose thp is the host's shmem_enabled setting"
                },
            });
        }
        Ok(())
    }

    fn check_numa_shape(&self) -> Result<(), Error> {
        let nodes = self.numa.nodes;
        if nodes == 0 || nodes > MAX_NODES {
            return Err(Error::NumaNodeCount {
                nodes,
                max: MAX_NODES,
            });
        }
        if nodes > 1 {
            if !self.size.is_multiple_of(SIZE_2M) || self.size < nodes as u64 * SIZE_2M {
                return Err(Error::NumaSplit {
                    size: format_size(self.size),
                    nodes,
                });
            }
            if self.numa.backend == NodeBackendKind::Emulated && self.backing != BackingKind::Shmem
            {
                return Err(Error::EmulatedNodesNeedShmem {
                    backing: self.backing,
                });
            }
        }
        Ok(())
    }

    /// Every check, including host resources (hugetlb pool, MemAvailable, host nodes).
    /// No side effects.
    pub fn validate(&self) -> Result<(), Error> {
        self.check_shape()?;
        if self.numa.backend == NodeBackendKind::Host {
            let host = self.host.numa_nodes();
            if let Some(missing) = (0..self.numa.nodes as u32).find(|n| !host.contains(n)) {
                return Err(Error::NoHostNode {
                    node: missing,
                    host,
                    nodes: self.numa.nodes,
                });
            }
        }
        match self.backing.hugetlb_page() {
            Some(page) => self.validate_pool(page),
            None => match self.host.mem_available() {
                Some(avail) if self.size > avail => Err(Error::NotEnoughMemory {
                    size: format_size(self.size),
                    available: format_size(avail / (1 << 20) * (1 << 20)),
                }),
                _ => Ok(()),
            },
        }
    }

    fn validate_pool(&self, page: u64) -> Result<(), Error> {
        let dir = self.host.hugetlb_dir(page);
        let pool = self
            .host
            .hugetlb_pool(page)
            .ok_or_else(|| Error::NoHugetlbPool {
                page: format_size(page),
                dir: dir.display().to_string(),
                page_arg: if page == SIZE_1G {
                    "1G".into()
                } else {
                    "2M".into()
                },
            })?;
        let needed = self.size / page;
        if pool.available() < needed {
            return Err(Error::HugetlbPoolTooSmall {
                page: format_size(page),
                free: pool.available(),
                needed,
                total: pool.nr + (needed - pool.available()),
                dir: dir.display().to_string(),
            });
        }
        Ok(())
    }
}

/// Where the guest's memory content comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GuestOrigin {
    /// The VMM loads an image and boots it.
    #[default]
    Booted,
    /// A live migration fills guest memory (pre-copy, post-copy or both) before and
    /// after the guest resumes here.
    MigrationDestination,
}

/// Which guest-view faults a run takes outside post-copy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FaultPathNeed {
    /// What the rest of the configuration needs: MINOR faults when NUMA (hint faults,
    /// moves) or the stress zapper can zap the guest view, none otherwise.
    #[default]
    Derived,
    /// MINOR faults whatever else is configured (for callers that zap through the
    /// second stage themselves).
    Minor,
}

/// `--collapse` and its budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CollapseConfig {
    pub mode: CollapseMode,
    pub scan: ScanBudget,
}

impl Default for CollapseConfig {
    fn default() -> Self {
        CollapseConfig {
            mode: CollapseMode::OnFill,
            scan: ScanBudget::default(),
        }
    }
}

/// A timer with a pseudo-random sequence: testing aids that act every `period`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recurring {
    pub period: Duration,
    pub seed: u64,
}

/// Guest NUMA beyond the layout (which is [`RamConfig::numa`]): who is where, what each
/// vCPU works on, where memory starts, and whether the engine balances.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NumaConfig {
    pub balancing: Balancing,
    pub scan: BalancerConfig,
    /// The node of each vCPU.
    pub vcpu_nodes: Vec<u16>,
    /// Each vCPU's working set (what locality is measured over).
    pub working_sets: Vec<GpaRange>,
    /// Initial placement: ranges (2 MiB regions) and the node each goes to, applied by
    /// `GuestMemory::create` before the guest runs. Unlisted regions stay on node 0.
    pub placement: Vec<(GpaRange, u16)>,
    /// Testing: move a pseudo-random region to another node every period.
    pub forced_moves: Option<Recurring>,
    /// Said with the report (e.g. why the emulated backend was chosen).
    pub note: Option<String>,
}

/// Everything guest memory is asked to be and do during a run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryConfig {
    pub ram: RamConfig,
    pub vcpus: usize,
    pub origin: GuestOrigin,
    pub fault_path: FaultPathNeed,
    pub collapse: CollapseConfig,
    /// `--numa`; None: one node and no NUMA engine.
    pub numa: Option<NumaConfig>,
    /// Testing: zap a random range of the guest view through the second stage every
    /// period (`--stress-zap`).
    pub stress_zap: Option<Recurring>,
}

impl MemoryConfig {
    /// Whether the guest view takes MINOR faults outside post-copy.
    pub fn needs_minor_faults(&self) -> bool {
        match self.fault_path {
            FaultPathNeed::Minor => true,
            FaultPathNeed::Derived => self.numa.is_some() || self.stress_zap.is_some(),
        }
    }

    /// Whether the collapse engine can have work: on-fill where regions fill (a
    /// migration destination, and every run whose hint faults resolve whole regions
    /// again: NUMA, zaps), background in any run; never on hugetlb.
    pub fn collapse_has_work(&self) -> bool {
        let mode_has_work = match self.collapse.mode {
            CollapseMode::Off => false,
            CollapseMode::OnFill => {
                let file_backed = self.ram.backing.view_layout() == ViewLayout::GuestAndStaging;
                self.origin == GuestOrigin::MigrationDestination
                    || (file_backed && self.needs_minor_faults())
            }
            CollapseMode::Background => true,
        };
        mode_has_work && self.ram.backing.collapses()
    }

    /// The checks that need no host state: the RAM's shape and the combinations that
    /// cannot work.
    pub fn check(&self) -> Result<(), Error> {
        self.ram.check_shape()?;
        let file_backed = self.ram.backing.view_layout() == ViewLayout::GuestAndStaging;
        if self.collapse.mode == CollapseMode::Background {
            if self.ram.backing == BackingKind::Anon && self.ram.thp == ThpMode::Off {
                return Err(Error::CollapseNeedsThp);
            }
            // Only moves made while the guest runs remap regions under the scanner; with
            // balancing off, no forced moves and no migration filling memory, the
            // initial placement is the last move.
            let moves_while_running = self.numa.as_ref().is_some_and(|n| {
                n.balancing == Balancing::On
                    || n.forced_moves.is_some()
                    || self.origin == GuestOrigin::MigrationDestination
            });
            if moves_while_running {
                return Err(Error::CollapseWithNuma);
            }
        }
        if let Some(numa) = &self.numa {
            if numa.balancing == Balancing::On && !file_backed {
                return Err(Error::BalancingNeedsFileRam);
            }
            self.check_per_vcpu("--numa vCPU nodes", numa.vcpu_nodes.len())?;
            self.check_per_vcpu("--numa working sets", numa.working_sets.len())?;
        }
        if self.stress_zap.is_some() && !file_backed {
            return Err(Error::StressZapNeedsFileRam);
        }
        Ok(())
    }

    fn check_per_vcpu(&self, what: &'static str, got: usize) -> Result<(), Error> {
        if got != self.vcpus {
            return Err(Error::PerVcpu {
                what,
                got,
                vcpus: self.vcpus,
            });
        }
        Ok(())
    }

    /// Every check, including the host's resources. No side effects.
    pub fn validate(&self) -> Result<(), Error> {
        self.check()?;
        self.ram.validate()
    }
}

#[cfg(test)]
mod tests;
