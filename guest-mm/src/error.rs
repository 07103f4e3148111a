//! Errors of guest-mm. Each names the problem and what to do about it. Configuration
//! errors (what was asked cannot be met) come first, runtime failures (the host refused
//! an operation) after; the parsers of command-line specifications have their own types
//! ([`crate::numa::SpecError`], [`crate::collapse::BudgetError`]).

use crate::addr::{Gpa, GpaRange};
use crate::config::BackingKind;
use crate::stage::TableError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid size {text:?}: {why} (write e.g. 512M, 1G, 2048K or a byte count)")]
    BadSize { text: String, why: &'static str },
    #[error("unknown backing {0:?}; choose one of: shmem, hugetlb-2m, hugetlb-1g, anon")]
    UnknownBacking(String),
    #[error("guest memory of {size} is not a multiple of the {backing} page size ({page}); use {nearest}")]
    Unaligned {
        size: String,
        backing: String,
        page: String,
        /// The nearest valid sizes, e.g. "16 MiB or 18 MiB".
        nearest: String,
    },
    #[error("guest memory of {size} is too small: at least {min} is needed (the guest image and its tables take the first 4 MiB)")]
    TooSmall { size: String, min: String },
    #[error("guest memory of {size} is too large: at most {max} (the guest image's page tables map up to {max})")]
    TooLarge { size: String, max: String },
    #[error("guest memory of {size} exceeds the host's available memory ({available} MemAvailable); ask for less")]
    NotEnoughMemory { size: String, available: String },
    #[error("this host has no {page} hugetlb pool ({dir} does not exist); use another backing or boot with hugepagesz={page_arg}")]
    NoHugetlbPool {
        page: String,
        dir: String,
        page_arg: String,
    },
    #[error("the {page} hugetlb pool has {free} free pages but {needed} are needed; reserve them with `echo {total} > {dir}/nr_hugepages` (as root)")]
    HugetlbPoolTooSmall {
        page: String,
        free: u64,
        needed: u64,
        total: u64,
        dir: String,
    },
    #[error("--thp applies to the anon backing only; {backing} is {why}")]
    ThpNotApplicable { backing: String, why: &'static str },
    #[error("NUMA: {nodes} guest NUMA nodes: 1 to {max} are supported")]
    NumaNodeCount { nodes: u16, max: u16 },
    #[error("NUMA: guest memory of {size} cannot be split into 2 MiB regions over {nodes} nodes")]
    NumaSplit { size: String, nodes: u16 },
    #[error("NUMA: emulated NUMA nodes need the shmem backing (each node is its own memfd, sparse); {backing} is not supported")]
    EmulatedNodesNeedShmem { backing: BackingKind },
    #[error("NUMA: guest node {node} has no host node to bind to (host nodes: {host:?}); use --numa nodes={nodes},backend=emulated")]
    NoHostNode {
        node: u32,
        host: Vec<u32>,
        nodes: u16,
    },
    #[error("--collapse background on anon with --thp off: --thp off tells the kernel no huge pages (MADV_NOHUGEPAGE), so nothing could collapse; use --thp on or --backing shmem")]
    CollapseNeedsThp,
    #[error("--collapse background with --numa is supported only with --numa-balancing off, no --numa-force-move and no --incoming (NUMA moves remap regions under the scanner); use --collapse on-fill")]
    CollapseWithNuma,
    #[error("NUMA balancing takes hint faults through userfaultfd MINOR faults, which need file-backed RAM (shmem or hugetlb); use --numa-balancing off with anon")]
    BalancingNeedsFileRam,
    #[error(
        "--stress-zap needs file-backed RAM (shmem or hugetlb): zapping anon RAM would discard it"
    )]
    StressZapNeedsFileRam,
    #[error("{what} has {got} entries for {vcpus} vCPUs; give one per vCPU")]
    PerVcpu {
        what: &'static str,
        got: usize,
        vcpus: usize,
    },
    #[error("post-copy needs file-backed RAM (shmem or hugetlb) on the destination")]
    PostcopyNeedsFileRam,
    #[error("post-copy into a destination that also runs --stress-zap is not supported (that combination is untested); drop --stress-zap on the destination")]
    PostcopyWithFaultPath,
    #[error("post-copy has begun already; begin it once per run")]
    PostcopyTwice,

    #[error("{op} failed: {source}")]
    Os {
        op: &'static str,
        source: std::io::Error,
    },
    #[error("creating the staging view's vm-memory region: {source}")]
    StagingRegion {
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("the staging view does not fit vm-memory's guest address space")]
    StagingOverflow,
    #[error("building the staging view's vm-memory object: {source}")]
    StagingMemory {
        #[source]
        source: vm_memory::GuestRegionCollectionError,
    },
    #[error("{what} guest-physical {gpa} through the staging view: {source}")]
    Staging {
        what: &'static str,
        gpa: Gpa,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("guest-physical {gpa} (+{len:#x} bytes) is outside guest RAM ({size:#x} bytes)")]
    OutsideRam { gpa: Gpa, len: u64, size: u64 },
    #[error("a backing page is {page:#x} bytes at a {page:#x}-aligned address; got {len:#x} bytes at {gpa}")]
    NotABackingPage { gpa: Gpa, len: u64, page: u64 },
    #[error("an extent is 1 to 64 whole backing pages of {page:#x} bytes inside one 2 MiB region (or one huge page); got {len:#x} bytes at {gpa}")]
    NotAnExtent { gpa: Gpa, len: u64, page: u64 },
    #[error("NUMA: node {node} is beyond the 1024 nodes mbind supports")]
    NodeBeyondMbind { node: u16 },
    #[error("NUMA: mbind of {len:#x} bytes to node(s) {nodes:?}: {source}{}", mbind_hint(*.host_max))]
    Mbind {
        len: u64,
        nodes: Vec<u16>,
        #[source]
        source: std::io::Error,
        /// The host's highest node, when a requested node is beyond it.
        host_max: Option<u32>,
    },
    #[error("NUMA: move_pages query: {source}")]
    MovePages {
        #[source]
        source: std::io::Error,
    },
    #[error("NUMA: move of {range} is not 2 MiB regions of guest RAM")]
    MoveNotRegions { range: GpaRange },
    #[error("NUMA: node {node} does not exist (the guest has {nodes})")]
    NoSuchNode { node: u16, nodes: u16 },
    #[error("NUMA: the region {region} still waits for post-copy pages; an emulated node's region moves once all of them are in")]
    MoveWithAbsentPages { region: GpaRange },
    #[error("NUMA: remap of {range} is outside the view")]
    RemapOutside { range: GpaRange },
    #[error("NUMA: emulated nodes need file-backed RAM with a staging view")]
    EmulatedNeedsStaging,
    #[error("NUMA: initial placement of {range} on node {node} failed: {source}")]
    Placement {
        range: GpaRange,
        node: u16,
        #[source]
        source: Box<Error>,
    },
    #[error("second-stage table: {what}: {source}")]
    Table {
        what: &'static str,
        #[source]
        source: TableError,
    },
    #[error("userfaultfd of the guest view: {what}: {source}")]
    Uffd {
        what: &'static str,
        #[source]
        source: uffd::Error,
    },
    #[error("starting the {name} thread: {source}")]
    Thread {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn mbind_hint(host_max: Option<u32>) -> String {
    match host_max {
        Some(max) => {
            format!(" (this host's nodes are 0..={max}; use --numa backend=emulated for more)")
        }
        None => String::new(),
    }
}

pub(crate) fn os(op: &'static str) -> Error {
    Error::Os {
        op,
        source: std::io::Error::last_os_error(),
    }
}
