//! Guest-physical addresses, ranges and the page sizes, defined once for every crate.
//!
//! [`Gpa`] is a guest-physical address; [`GpaRange`] a half-open range of them. Both are
//! plain newtypes over `u64` (as vm-memory's `GuestAddress`, into which a `Gpa`
//! converts for staging-view access): arithmetic that can overflow is checked, because
//! addresses arrive from migration streams and guests as well as from our own code.

use serde::{Deserialize, Serialize};

/// 4 KiB: the base page, the unit of KVM's dirty log and of the table's smallest leaf.
pub const SIZE_4K: u64 = 1 << 12;
/// 2 MiB: a PMD-sized huge page, the unit of collapse and of NUMA placement (a region).
pub const SIZE_2M: u64 = 1 << 21;
/// 1 GiB: a PUD-sized huge page (hugetlb-1g).
pub const SIZE_1G: u64 = 1 << 30;

/// A guest-physical address.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Gpa(pub u64);

impl Gpa {
    pub const ZERO: Gpa = Gpa(0);

    pub const fn raw(self) -> u64 {
        self.0
    }

    /// `self + bytes`, or `None` on overflow.
    pub fn checked_add(self, bytes: u64) -> Option<Gpa> {
        self.0.checked_add(bytes).map(Gpa)
    }

    /// `self + bytes`; for offsets already known to stay inside guest RAM.
    pub const fn add(self, bytes: u64) -> Gpa {
        Gpa(self.0 + bytes)
    }

    /// Bytes from `base` up to `self` (0 when `self` is below `base`).
    pub fn offset_from(self, base: Gpa) -> u64 {
        self.0.saturating_sub(base.0)
    }

    /// The address rounded down to a multiple of `align` (a power of two).
    pub const fn align_down(self, align: u64) -> Gpa {
        Gpa(self.0 & !(align - 1))
    }

    pub const fn is_aligned(self, align: u64) -> bool {
        self.0 & (align - 1) == 0
    }
}

impl std::fmt::Display for Gpa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl std::fmt::LowerHex for Gpa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::LowerHex::fmt(&self.0, f)
    }
}

impl From<Gpa> for vm_memory::GuestAddress {
    fn from(g: Gpa) -> Self {
        vm_memory::GuestAddress(g.0)
    }
}

impl From<vm_memory::GuestAddress> for Gpa {
    fn from(g: vm_memory::GuestAddress) -> Self {
        Gpa(g.0)
    }
}

/// A guest-physical range [start, end).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GpaRange {
    pub start: Gpa,
    pub end: Gpa,
}

impl GpaRange {
    pub const fn new(start: Gpa, end: Gpa) -> GpaRange {
        GpaRange { start, end }
    }

    /// [start, start + len), or `None` if it would wrap.
    pub fn with_len(start: Gpa, len: u64) -> Option<GpaRange> {
        Some(GpaRange::new(start, start.checked_add(len)?))
    }

    pub fn len(&self) -> u64 {
        self.end.0.saturating_sub(self.start.0)
    }

    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    pub fn contains(&self, other: &GpaRange) -> bool {
        self.start <= other.start && other.end <= self.end
    }

    pub fn contains_gpa(&self, gpa: Gpa) -> bool {
        self.start <= gpa && gpa < self.end
    }

    pub fn union(&self, other: &GpaRange) -> GpaRange {
        GpaRange::new(self.start.min(other.start), self.end.max(other.end))
    }

    /// The range cut to [0, limit).
    pub fn clamp_to(&self, limit: u64) -> GpaRange {
        GpaRange::new(Gpa(self.start.0.min(limit)), Gpa(self.end.0.min(limit)))
    }

    /// The `page`-aligned pages (by index) that hold any byte of the range.
    pub fn pages(&self, page: u64) -> std::ops::Range<u64> {
        self.start.0 / page..self.end.0.div_ceil(page)
    }
}

impl std::fmt::Display for GpaRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start.0, self.end.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_is_checked_where_input_is_foreign() {
        assert_eq!(Gpa(u64::MAX - 0xfff).checked_add(0x1000), None);
        assert_eq!(GpaRange::with_len(Gpa(0xffff_ffff_ffff_f000), 0x1000), None);
        assert_eq!(Gpa(0x20_1234).align_down(SIZE_2M), Gpa(0x20_0000));
        assert!(Gpa(SIZE_2M).is_aligned(SIZE_2M));
    }

    #[test]
    fn ranges() {
        let r = GpaRange::new(Gpa(0x1800), Gpa(0x3001));
        assert_eq!(r.len(), 0x1801);
        assert_eq!(r.pages(SIZE_4K), 1..4);
        assert!(r.contains_gpa(Gpa(0x1800)) && !r.contains_gpa(Gpa(0x3001)));
        assert_eq!(r.clamp_to(0x2000), GpaRange::new(Gpa(0x1800), Gpa(0x2000)));
        assert_eq!(r.to_string(), "[0x1800, 0x3001)");
    }
}
