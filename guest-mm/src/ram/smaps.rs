//! This process's memory use as the kernel counts it, from /proc/self/smaps: resident
//! bytes of the views, bytes mapped huge, and the VMM's own RSS beside guest RAM's.

use serde::Serialize;

use crate::error::Error;

/// The fields whose sum is "mapped huge": PMD-mapped thp (anon, shmem, file) and hugetlb
/// pages. smaps leaves hugetlb out of the PMD fields (and out of `Rss`) and counts it in
/// `Shared_Hugetlb`/`Private_Hugetlb` instead, PMD- or PUD-sized.
pub(crate) const HUGE_MAPPED: &[&str] = &[
    "AnonHugePages",
    "ShmemPmdMapped",
    "FilePmdMapped",
    "Shared_Hugetlb",
    "Private_Hugetlb",
];

/// The fields whose sum is "resident in this mapping": `Rss` (4 KiB and thp pages) plus
/// hugetlb pages, which smaps leaves out of `Rss`.
pub(crate) const RESIDENT: &[&str] = &["Rss", "Shared_Hugetlb", "Private_Hugetlb"];

/// Resident memory of this process, split.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RssSplit {
    /// Everything this process has resident (`Rss` of every mapping).
    pub vmm_rss_bytes: u64,
    /// The part in guest RAM's views.
    pub guest_ram_rss_bytes: u64,
}

impl RssSplit {
    /// The VMM's own resident memory: everything but guest RAM.
    pub fn overhead_bytes(&self) -> u64 {
        self.vmm_rss_bytes.saturating_sub(self.guest_ram_rss_bytes)
    }
}

pub(crate) fn read_own() -> Result<String, Error> {
    std::fs::read_to_string("/proc/self/smaps").map_err(|source| Error::Os {
        op: "reading /proc/self/smaps",
        source,
    })
}

/// Sum of `fields` (kB values) over every VMA overlapping any of `ranges` (host
/// addresses [start, end)), in bytes. Overlap rather than containment: the kernel may
/// merge an anonymous guest-RAM mapping with a neighbouring anonymous VMA.
pub(crate) fn sum(smaps: &str, ranges: &[(u64, u64)], fields: &[&str]) -> u64 {
    let mut inside = false;
    let mut total_kib = 0;
    for line in smaps.lines() {
        if let Some((a, b)) = vma_bounds(line) {
            inside = ranges.iter().any(|&(s, e)| a < e && b > s);
            continue;
        }
        if inside {
            total_kib += field_kib(line, fields);
        }
    }
    total_kib << 10
}

/// `Rss` of every VMA, and of those overlapping `ranges`.
pub(crate) fn rss_split(smaps: &str, ranges: &[(u64, u64)]) -> RssSplit {
    let (mut total, mut inside) = (0u64, 0u64);
    let mut current_inside = false;
    for line in smaps.lines() {
        if let Some((a, b)) = vma_bounds(line) {
            current_inside = ranges.iter().any(|&(s, e)| a < e && b > s);
            continue;
        }
        let kib = field_kib(line, &["Rss"]);
        total += kib << 10;
        if current_inside {
            inside += kib << 10;
        }
    }
    RssSplit {
        vmm_rss_bytes: total,
        guest_ram_rss_bytes: inside,
    }
}

/// The [start, end) of a VMA header line ("7f00-7f20 rw-s ...").
fn vma_bounds(line: &str) -> Option<(u64, u64)> {
    let first = line.split_whitespace().next()?;
    let (a, b) = first.split_once('-')?;
    Some((
        u64::from_str_radix(a, 16).ok()?,
        u64::from_str_radix(b, 16).ok()?,
    ))
}

/// The kB value of `line` if it is one of `fields`, else 0.
fn field_kib(line: &str, fields: &[&str]) -> u64 {
    match line.split_once(':') {
        Some((key, rest)) if fields.contains(&key) => rest
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .unwrap_or(0),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
7f0000000000-7f0000200000 rw-s 00000000 00:01 5 /memfd:hugevisor-guest-ram (deleted)
Size:               2048 kB
Rss:                   8 kB
Shared_Hugetlb:        0 kB
7f0000200000-7f0000400000 rw-s 00200000 00:01 5 /memfd:hugevisor-guest-ram (deleted)
Rss:                   0 kB
Shared_Hugetlb:     2048 kB
Private_Hugetlb:       0 kB
7f0000400000-7f0000600000 rw-p 00000000 00:00 0
Rss:                 100 kB
ShmemPmdMapped:     2048 kB
7f0000600000-7f0040600000 rw-s 00000000 00:01 6 /memfd:hugevisor-guest-ram (deleted)
Rss:                   0 kB
Private_Hugetlb:  1048576 kB
";

    #[test]
    fn resident_sums_rss_and_hugetlb() {
        let lo = 0x7f00_0000_0000;
        assert_eq!(
            sum(SMAPS, &[(lo, lo + 0x40_0000)], RESIDENT),
            (8 + 2048) << 10
        );
        assert_eq!(
            sum(SMAPS, &[(lo + 0x40_0000, lo + 0x60_0000)], RESIDENT),
            100 << 10
        );
    }

    #[test]
    fn huge_mapped_counts_pmd_thp_and_hugetlb() {
        let lo = 0x7f00_0000_0000;
        // A hugetlb-2m view: Shared_Hugetlb is its huge-mapped part (no PMD field says so).
        assert_eq!(sum(SMAPS, &[(lo, lo + 0x40_0000)], HUGE_MAPPED), 2048 << 10);
        // A shmem thp: ShmemPmdMapped.
        assert_eq!(
            sum(SMAPS, &[(lo + 0x40_0000, lo + 0x60_0000)], HUGE_MAPPED),
            2048 << 10
        );
        // A hugetlb-1g view: PUD-sized, still "huge-mapped".
        assert_eq!(
            sum(SMAPS, &[(lo + 0x60_0000, lo + 0x4060_0000)], HUGE_MAPPED),
            1 << 30
        );
        // Only the VMAs overlapping the ranges count.
        assert_eq!(sum(SMAPS, &[(0x1000, 0x2000)], HUGE_MAPPED), 0);
    }

    #[test]
    fn rss_split_counts_only_rss() {
        let lo = 0x7f00_0000_0000;
        let s = rss_split(SMAPS, &[(lo, lo + 0x40_0000)]);
        assert_eq!(s.vmm_rss_bytes, 108 << 10);
        assert_eq!(s.guest_ram_rss_bytes, 8 << 10);
        assert_eq!(s.overhead_bytes(), 100 << 10);
    }

    #[test]
    fn own_rss_is_positive() {
        let s = rss_split(&read_own().unwrap(), &[]);
        assert!(s.vmm_rss_bytes > 0);
        assert_eq!(s.guest_ram_rss_bytes, 0);
    }
}
