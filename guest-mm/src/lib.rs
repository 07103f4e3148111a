//! Guest memory for hugevisor: the only crate that maps, zaps, registers or CONTINUEs
//! guest memory. The VMM and the migration code hold one [`GuestMemory`] and talk to
//! guest memory through it; KVM gets a [`Memslot`].
//!
//! Map of the crate:
//! - [`addr`]: `Gpa`, `GpaRange`, the page sizes, defined once.
//! - [`config`]: what is asked ([`RamConfig`], [`MemoryConfig`]) and whether it can be
//!   met; [`host`]: /proc and /sys facts; [`size`]: sizes on the command line.
//! - [`ram`]: backings, the guest view and the staging view ([`ram::mapping`] owns every
//!   host mapping call), NUMA zones ([`ram::zones`]), smaps figures ([`ram::smaps`]).
//! - [`stage`]: the second-stage table behind its one door (widen → notify → change;
//!   resolve; fill) and its mmu notifier.
//! - `guest_view`: the guest view's userfaultfd (registration, re-registration after a
//!   NUMA move, unregistration), the notifier subscriber that zaps, and the one CONTINUE.
//! - [`fault`]: the fault thread (uffd event → vCPU → table → NUMA hook or pager →
//!   resolve) and its figures; [`page`]: pages arriving from outside, the `Pager`.
//! - [`collapse`]: policy and engine; [`numa`]: balancer, engine, command-line spec.
//! - [`memory`]: [`GuestMemory`], which ties it all together; [`probe`]: host cost probes.
//!
//! Words: **hugetlb** means pages from hugetlbfs pools; **thp** means transparent huge
//! pages. The **guest view** is what KVM maps; the **staging view** is the VMM's. A
//! **region** is a 2 MiB-aligned 2 MiB of guest-physical memory; a **move** is a region
//! changing NUMA node ("migration" is only ever live migration).

pub mod addr;
pub mod collapse;
pub mod config;
pub mod error;
pub mod fault;
mod guest_view;
pub mod host;
pub mod memory;
pub mod numa;
pub mod page;
mod periodic;
pub mod probe;
pub mod ram;
pub mod size;
pub mod stage;
pub mod stats;
mod stress;

pub use addr::{Gpa, GpaRange, SIZE_1G, SIZE_2M, SIZE_4K};
pub use collapse::{CollapseMode, CollapseReport, CollapseStatus, ScanBudget};
pub use config::{
    BackingKind, CollapseConfig, FaultPathNeed, GuestOrigin, MemoryConfig, NodeBackendKind,
    NumaConfig, NumaLayout, Policy, Prefault, RamConfig, Recurring, ThpMode, ViewLayout,
};
pub use error::Error;
pub use fault::{FaultReport, VcpuThreads};
pub use guest_view::Registration;
pub use host::HostPaths;
pub use memory::{FaultPathKind, GuestMemory, MemoryReport, MemoryStats, Memslot};
pub use numa::{Balancing, NumaReport};
pub use page::{
    extent_max_pages, Installed, InstalledPages, PageContent, Pager, EXTENT_MAX_BYTES,
    EXTENT_MAX_PAGES, ZERO_EXTENT,
};
pub use ram::{smaps::RssSplit, GuestRam, MovedCache, View};
