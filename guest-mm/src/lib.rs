//! Guest RAM for hugevisor: backings (shmem and hugetlb memfds, anonymous memory with
//! optional thp), the guest view and the staging view, and the host memory facts that
//! decide whether a request can be met (hugetlb pools, MemAvailable, thp settings).
//!
//! Words: **hugetlb** means pages from hugetlbfs pools; **thp** means transparent huge
//! pages. The **guest view** is what KVM maps; the **staging view** is the VMM's.

pub mod addr;
pub mod backing;
pub mod collapse;
pub mod error;
pub mod host;
pub mod notifier;
pub mod numa;
pub mod page;
pub mod size;
pub mod stage;
pub mod stats;
pub mod table;

pub use addr::{Gpa, GpaRange, SIZE_1G, SIZE_2M, SIZE_4K};
pub use backing::{BackingKind, GuestRam, Prefault, RamConfig, ThpMode, ViewLayout};
pub use error::Error;
pub use host::HostPaths;
pub use numa::{NodeBackendKind, NumaLayout};
pub use page::{Installed, PageContent, Pager};
