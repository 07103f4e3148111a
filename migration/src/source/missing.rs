//! What the destination still lacks, as the source tracks it: pages from KVM's dirty
//! log, and in post-copy one bit per backing page with a count per 2 MiB region (for
//! the fewest-missing-first push order).

use guest_mm::SIZE_4K;

use crate::bitmap::PageBitmap;

/// Backing pages (by index) marked in a KVM dirty bitmap of 4 KiB bits, in order.
pub fn dirty_pages(bitmap: &[u64], page_size: u64) -> Vec<u64> {
    let per_page = (page_size / SIZE_4K).max(1);
    let mut out: Vec<u64> = Vec::new();
    for (w, &word) in bitmap.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let b = bits.trailing_zeros() as u64;
            bits &= bits - 1;
            let page = (w as u64 * 64 + b) / per_page;
            if out.last() != Some(&page) {
                out.push(page);
            }
        }
    }
    out.dedup();
    out
}

/// The post-copy source's record of what the destination still lacks.
pub(crate) struct Missing {
    bits: PageBitmap,
    per_region_missing: Vec<u32>,
    /// Backing pages per region (512 at 4 KiB, 1 at 2 MiB).
    per_region: u64,
}

impl Missing {
    pub fn new(bits: PageBitmap, page_size: u64) -> Missing {
        let per_region = (guest_mm::SIZE_2M / page_size).max(1);
        let mut per_region_missing = vec![0u32; bits.pages().div_ceil(per_region) as usize];
        for p in bits.iter() {
            per_region_missing[(p / per_region) as usize] += 1;
        }
        Missing {
            bits,
            per_region_missing,
            per_region,
        }
    }

    pub fn per_region(&self) -> u64 {
        self.per_region
    }

    /// Claims page `p` for sending; false if it was sent already (or is beyond the end).
    pub fn take(&mut self, p: u64) -> bool {
        let had = self.bits.clear(p);
        if had {
            self.per_region_missing[(p / self.per_region) as usize] -= 1;
        }
        had
    }

    /// Claims the extent from page `p`: `p` and the missing pages right after it, up to
    /// `max` pages, inside `p`'s region. Returns how many (0: `p` was sent already).
    pub fn take_extent(&mut self, p: u64, max: u64) -> u64 {
        let mut n = 0;
        while n < max.max(1) {
            let q = p + n;
            if (n > 0 && q.is_multiple_of(self.per_region)) || !self.take(q) {
                break;
            }
            n += 1;
        }
        n
    }

    /// Claims the extent (as [`Missing::take_extent`]) at the first missing page from
    /// `from` on, wrapping around to page 0; None once nothing is missing.
    pub fn take_next_extent(&mut self, from: u64, max: u64) -> Option<(u64, u64)> {
        let p = self.bits.next_set(from).or_else(|| self.bits.next_set(0))?;
        Some((p, self.take_extent(p, max)))
    }

    /// The region with the fewest pages still missing (but some), lowest address first.
    pub fn fewest_missing_region(&self) -> Option<u64> {
        self.per_region_missing
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .min_by_key(|(i, &n)| (n, *i))
            .map(|(i, _)| i as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_order_prefers_the_regions_with_the_fewest_pages_missing() {
        // 3 regions of 512 4 KiB pages, all missing.
        let pages = 3 * 512;
        let mut m = Missing::new(PageBitmap::full(pages), 4096);
        assert_eq!(m.fewest_missing_region(), Some(0));
        // The guest asked for two pages of region 2 and one of region 1.
        assert!(m.take(2 * 512 + 7));
        assert!(m.take(2 * 512 + 9));
        assert!(m.take(512 + 3));
        assert!(!m.take(512 + 3), "a page is sent once");
        assert_eq!(m.fewest_missing_region(), Some(2));
        for p in 2 * 512..3 * 512 {
            m.take(p);
        }
        assert_eq!(m.fewest_missing_region(), Some(1));
        for p in 0..pages {
            m.take(p);
        }
        assert_eq!(m.fewest_missing_region(), None);
        assert!(!m.take(pages), "beyond the end");
        // 2 MiB pages: one per region.
        let m = Missing::new(PageBitmap::from_words(vec![0b101], 3).unwrap(), 2 << 20);
        assert_eq!(m.fewest_missing_region(), Some(0));
    }

    #[test]
    fn an_extent_takes_missing_pages_up_to_a_gap_its_size_or_the_region_end() {
        let mut m = Missing::new(PageBitmap::full(3 * 512), 4096);
        assert!(m.take(10));
        assert_eq!(m.take_extent(0, 64), 10, "up to the page sent already");
        assert_eq!(
            m.take_extent(10, 64),
            0,
            "a page sent already starts nothing"
        );
        assert_eq!(m.take_extent(11, 64), 64, "at most max");
        assert_eq!(m.take_extent(500, 64), 12, "never into the next region");
        assert_eq!(m.take_extent(512, 1), 1);
        assert_eq!(
            m.fewest_missing_region(),
            Some(0),
            "425 missing against 511 and 512"
        );
        assert_eq!(m.take_extent(3 * 512, 64), 0, "beyond the end");
    }

    #[test]
    fn the_next_extent_wraps_around_and_ends_only_when_nothing_is_missing() {
        let pages = 3 * 512;
        let mut m = Missing::new(PageBitmap::full(pages), 4096);
        // What broke a post-copy (the push ended with pages missing that the guest never
        // asked for): a scan from an already sent stretch must still find them.
        for p in (0..pages).filter(|p| !(700..710).contains(p) && *p != 3) {
            assert!(m.take(p));
        }
        assert_eq!(m.take_next_extent(1000, 64), Some((3, 1)), "wrapped around");
        assert_eq!(m.take_next_extent(4, 64), Some((700, 10)));
        assert_eq!(m.take_next_extent(0, 64), None);
        assert_eq!(m.take_next_extent(pages + 5, 64), None, "beyond the end");
        // An extent still stops at its region's end.
        let mut m = Missing::new(PageBitmap::full(pages), 4096);
        assert_eq!(m.take_next_extent(500, 64), Some((500, 12)));
        assert_eq!(m.take_next_extent(pages - 1, 64), Some((pages - 1, 1)));
        assert_eq!(
            m.take_next_extent(pages, 64),
            Some((0, 64)),
            "from the start"
        );
    }

    #[test]
    fn dirty_bitmap_to_backing_pages() {
        let bm = [0b1011u64, 1 << 63];
        assert_eq!(dirty_pages(&bm, 4096), vec![0, 1, 3, 127]);
        // 2 MiB pages: 512 bits each.
        assert_eq!(dirty_pages(&bm, 2 << 20), vec![0]);
        let mut big = vec![0u64; 16];
        big[8] = 1; // bit 512 -> page 1
        assert_eq!(dirty_pages(&big, 2 << 20), vec![1]);
    }
}
