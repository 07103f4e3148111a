//! The vocabulary of the second-stage table: leaves (size, state, node, backing), what a
//! lookup finds and for whom, and the counts the table reports.

use serde::Serialize;

use crate::addr::{Gpa, SIZE_1G, SIZE_2M, SIZE_4K};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum LeafSize {
    #[serde(rename = "4K")]
    Size4K,
    #[serde(rename = "2M")]
    Size2M,
    #[serde(rename = "1G")]
    Size1G,
}

impl LeafSize {
    pub const ALL: [LeafSize; 3] = [LeafSize::Size4K, LeafSize::Size2M, LeafSize::Size1G];

    pub fn bytes(self) -> u64 {
        match self {
            LeafSize::Size4K => SIZE_4K,
            LeafSize::Size2M => SIZE_2M,
            LeafSize::Size1G => SIZE_1G,
        }
    }

    pub(super) fn shift(self) -> u32 {
        self.bytes().trailing_zeros()
    }

    pub(super) fn from_shift(shift: u32) -> LeafSize {
        match shift {
            12 => LeafSize::Size4K,
            21 => LeafSize::Size2M,
            _ => LeafSize::Size1G,
        }
    }

    /// The next smaller leaf size, if any.
    pub fn smaller(self) -> Option<LeafSize> {
        match self {
            LeafSize::Size4K => None,
            LeafSize::Size2M => Some(LeafSize::Size4K),
            LeafSize::Size1G => Some(LeafSize::Size2M),
        }
    }

    pub fn for_bytes(bytes: u64) -> Option<LeafSize> {
        LeafSize::ALL.into_iter().find(|s| s.bytes() == bytes)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PageState {
    /// Content is here and the guest view maps it.
    Present,
    /// Content is not here yet (e.g. during post-copy): any access must wait for it.
    Absent,
    /// Content is here but the guest-view mapping was zapped so that the next vCPU access
    /// takes a NUMA-hint fault. Internal accesses and accounting treat it as present.
    Hinted,
}

impl PageState {
    /// Whether the content is final (present or hinted): what occupancy counts.
    pub fn has_content(self) -> bool {
        !matches!(self, PageState::Absent)
    }
}

/// Where a leaf's content lives: a zone (one memfd / backing object) and a byte offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct BackingRef {
    pub zone: u16,
    pub offset: u64,
}

impl BackingRef {
    pub(super) fn plus(self, bytes: u64) -> BackingRef {
        BackingRef {
            zone: self.zone,
            offset: self.offset + bytes,
        }
    }
}

/// What a new leaf holds (the part of a leaf its creator chooses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeafSpec {
    pub state: PageState,
    pub node: u16,
    /// Backing of the first byte; later bytes follow linearly.
    pub backing: BackingRef,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Leaf {
    pub size: LeafSize,
    pub state: PageState,
    pub node: u16,
    pub backing: BackingRef,
    pub accessed: bool,
    pub dirty: bool,
}

impl Leaf {
    pub(super) fn new(size: LeafSize, spec: LeafSpec) -> Leaf {
        Leaf {
            size,
            state: spec.state,
            node: spec.node,
            backing: spec.backing,
            accessed: false,
            dirty: false,
        }
    }

    /// Whether `self` followed by 511 more leaves like it could be one leaf of the next size.
    pub(super) fn continues(&self, first: &Leaf, index: u64) -> bool {
        self.size == first.size
            && self.state == first.state
            && self.node == first.node
            && self.backing == first.backing.plus(index * first.size.bytes())
    }
}

/// Who is asking, and so whether a hinted entry faults (the FOLL_HONOR_NUMA_FAULT lesson,
/// seed 003, named for what it means).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Intent {
    /// A vCPU's access: a hinted entry takes the hint fault.
    Vcpu,
    /// The VMM's own access (device emulation, migration sender, introspection): a hinted
    /// entry is present and does not fault.
    Internal,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultCause {
    /// The content is not here yet.
    Absent,
    /// A NUMA-hint fault (vCPU accesses only).
    Hint,
}

/// The leaf that maps an address, with its start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapped {
    pub start: Gpa,
    pub leaf: Leaf,
}

impl Mapped {
    /// Backing of the byte at `gpa` (inside this leaf).
    pub fn backing_at(&self, gpa: Gpa) -> BackingRef {
        self.leaf.backing.plus(gpa.offset_from(self.start))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    Mapped(Mapped),
    Fault(Mapped, FaultCause),
    Unmapped,
}

/// A huge backing page mapped piecewise by a table of smaller leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct HugePiecewise {
    pub page: LeafSize,
    pub backing: BackingRef,
    pub node: u16,
}

/// Errors of table operations: misuse by the caller, reported rather than panicking.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("guest-physical {gpa} is not aligned to {size:?}")]
    Unaligned { gpa: Gpa, size: LeafSize },
    #[error("guest-physical {gpa} is beyond the table's 512 GiB")]
    OutOfRange { gpa: Gpa },
    #[error("nothing is mapped at guest-physical {gpa}")]
    NotMapped { gpa: Gpa },
    #[error("the {size:?} region at {gpa} cannot merge: {why}")]
    NotMergeable {
        gpa: Gpa,
        size: LeafSize,
        why: &'static str,
    },
    #[error("the leaf at {gpa} is already {size:?}; cannot split to that size")]
    NotSplittable { gpa: Gpa, size: LeafSize },
}

/// Counts for the VMM's smaps-like accounting. Hinted pages count as present.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Accounting {
    pub present_bytes: u64,
    pub absent_bytes: u64,
    /// Included in `present_bytes`.
    pub hinted_bytes: u64,
    pub leaves_4k: u64,
    pub leaves_2m: u64,
    pub leaves_1g: u64,
    /// Huge backing pages mapped piecewise (each also one logical mapping).
    pub piecewise_huge_pages: u64,
    /// Mappings as a huge backing page's owner sees them: a leaf is one, a piecewise huge
    /// page is one however many pieces it has.
    pub logical_mappings: u64,
}

/// What maps one 2 MiB region of guest-physical memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Region2M {
    Unmapped,
    /// One leaf of 2 MiB or more covers the region.
    Huge(Leaf),
    /// 4 KiB leaves: which of the 512 have content (present or hinted), and whether all
    /// 512 are present with one node and linear backing, so that they can become one
    /// 2 MiB leaf (what a collapse needs).
    Pieces {
        occupied: [u64; 8],
        mergeable: bool,
    },
}

/// A run of equal leaves, for the memory map listing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Run {
    pub start: Gpa,
    pub end: Gpa,
    pub size: LeafSize,
    pub state: PageState,
    pub node: u16,
    pub zone: u16,
    pub piecewise: bool,
}

/// Whether an access dirtied the page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dirtied {
    Yes,
    No,
}
