//! One bit per backing page of guest RAM: what a post-copy destination still lacks.

use guest_mm::{Gpa, GpaRange};

/// Why words from the wire are not a bitmap of guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum BitmapError {
    #[error("a bitmap of {words} words for {pages} pages (expected {expected})")]
    Length {
        words: usize,
        pages: u64,
        expected: usize,
    },
    #[error("a bitmap with bits set beyond page {pages}")]
    BeyondEnd { pages: u64 },
}

/// A set of backing pages, by index (page `i` holds GPA `i * page_size`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageBitmap {
    words: Vec<u64>,
    pages: u64,
}

impl PageBitmap {
    /// Words needed for `pages` bits.
    pub fn words_for(pages: u64) -> usize {
        pages.div_ceil(64) as usize
    }

    pub fn empty(pages: u64) -> PageBitmap {
        PageBitmap {
            words: vec![0; Self::words_for(pages)],
            pages,
        }
    }

    pub fn full(pages: u64) -> PageBitmap {
        let mut words = vec![u64::MAX; Self::words_for(pages)];
        if !pages.is_multiple_of(64) {
            if let Some(last) = words.last_mut() {
                *last = (1u64 << (pages % 64)) - 1;
            }
        }
        PageBitmap { words, pages }
    }

    /// A bitmap from its words, refused unless it has exactly the words for `pages`
    /// and no bit beyond them (it comes from the wire).
    pub fn from_words(words: Vec<u64>, pages: u64) -> Result<PageBitmap, BitmapError> {
        if words.len() != Self::words_for(pages) {
            return Err(BitmapError::Length {
                words: words.len(),
                pages,
                expected: Self::words_for(pages),
            });
        }
        let bitmap = PageBitmap { words, pages };
        if bitmap != bitmap.masked() {
            return Err(BitmapError::BeyondEnd { pages });
        }
        Ok(bitmap)
    }

    fn masked(&self) -> PageBitmap {
        let mut m = self.clone();
        if !self.pages.is_multiple_of(64) {
            if let Some(last) = m.words.last_mut() {
                *last &= (1u64 << (self.pages % 64)) - 1;
            }
        }
        m
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    pub fn words(&self) -> &[u64] {
        &self.words
    }

    pub fn get(&self, page: u64) -> bool {
        page < self.pages
            && self
                .words
                .get((page / 64) as usize)
                .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    /// Adds `page` (ignored beyond the end).
    pub fn set(&mut self, page: u64) {
        if page < self.pages {
            if let Some(w) = self.words.get_mut((page / 64) as usize) {
                *w |= 1 << (page % 64);
            }
        }
    }

    /// Removes `page`; whether it was there.
    pub fn clear(&mut self, page: u64) -> bool {
        let had = self.get(page);
        if let Some(w) = self.words.get_mut((page / 64) as usize) {
            *w &= !(1 << (page % 64));
        }
        had
    }

    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The first page in the set at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.pages {
            return None;
        }
        let first = (from / 64) as usize;
        let head = self.words.get(first)? & (u64::MAX << (from % 64));
        std::iter::once(head)
            .chain(self.words.get(first + 1..)?.iter().copied())
            .enumerate()
            .find(|&(_, w)| w != 0)
            .map(|(i, w)| (first + i) as u64 * 64 + u64::from(w.trailing_zeros()))
    }

    /// The pages in the set, in address order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut bits = w;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                Some(i as u64 * 64 + b)
            })
        })
    }

    /// The set as guest-physical ranges of contiguous pages of `page_size` bytes.
    pub fn ranges(&self, page_size: u64) -> Vec<GpaRange> {
        let mut out: Vec<GpaRange> = Vec::new();
        for p in self.iter() {
            let start = Gpa(p * page_size);
            match out.last_mut() {
                Some(r) if r.end == start => r.end = start.add(page_size),
                _ => out.push(GpaRange::new(start, start.add(page_size))),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_bitmaps_stop_at_the_last_page_and_wire_bitmaps_are_checked() {
        let b = PageBitmap::full(70);
        assert_eq!(b.count(), 70);
        assert!(b.get(69) && !b.get(70));
        assert!(PageBitmap::from_words(b.words().to_vec(), 70).is_ok());
        assert!(PageBitmap::from_words(vec![u64::MAX; 2], 70).is_err());
        assert!(PageBitmap::from_words(vec![0; 3], 70).is_err());
        assert!(PageBitmap::from_words(vec![u64::MAX], 64).is_ok());
    }

    #[test]
    fn ranges_join_neighbours() {
        let mut b = PageBitmap::empty(130);
        for p in [0, 1, 2, 5, 64, 65, 129] {
            b.set(p);
        }
        b.set(130);
        assert!(b.clear(2) && !b.clear(2));
        let r: Vec<_> = b.ranges(4096).iter().map(|r| r.to_string()).collect();
        assert_eq!(
            r,
            [
                "[0x0, 0x2000)",
                "[0x5000, 0x6000)",
                "[0x40000, 0x42000)",
                "[0x81000, 0x82000)"
            ]
        );
        assert_eq!(b.iter().collect::<Vec<_>>(), [0, 1, 5, 64, 65, 129]);
        let next: Vec<_> = [0, 2, 6, 63, 64, 66, 129, 130, 500]
            .iter()
            .map(|&p| b.next_set(p))
            .collect();
        assert_eq!(
            next,
            [
                Some(0),
                Some(5),
                Some(64),
                Some(64),
                Some(64),
                Some(129),
                Some(129),
                None,
                None
            ]
        );
        assert_eq!(PageBitmap::empty(130).next_set(0), None);
    }
}
