//! The vocabulary of pages crossing into guest memory from outside (a migration stream,
//! a snapshot file): what a page holds, what installing it did, and who is asked for a
//! page a vCPU needs that has not arrived. An **extent** is up to
//! [`EXTENT_MAX_PAGES`] contiguous backing pages inside one region (or one huge backing
//! page): what one write or one CONTINUE of an arriving stream covers.

use crate::addr::Gpa;

/// The content of one backing page as it arrives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageContent<'a> {
    /// Exactly one backing page of bytes.
    Bytes(&'a [u8]),
    /// A page that is all zeros (travels as its address only).
    Zero,
}

/// What installing an arriving page did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Installed {
    /// The page was absent; it now holds the arrived content and is mapped.
    New,
    /// The page was already present (a duplicate: demanded and pushed both). It was left
    /// alone: the guest may have written it since the first copy arrived.
    Duplicate,
}

/// The most backing pages one extent holds: a migration frame carries at most one extent,
/// and an install reports which of its pages were new in one [`InstalledPages`] mask.
pub const EXTENT_MAX_PAGES: u64 = 64;

/// The most bytes of one extent of 4 KiB pages (an extent of huge backing pages is one
/// page).
pub const EXTENT_MAX_BYTES: u64 = EXTENT_MAX_PAGES * crate::addr::SIZE_4K;

/// The bytes of a largest extent of 4 KiB zero pages: what a zero extent is written (or
/// installed) from.
pub static ZERO_EXTENT: [u8; EXTENT_MAX_BYTES as usize] = [0; EXTENT_MAX_BYTES as usize];

/// The largest extent for backing pages of `page_size`: 64 pages of 4 KiB, one huge page.
pub fn extent_max_pages(page_size: u64) -> u64 {
    (EXTENT_MAX_BYTES / page_size).max(1)
}

/// What installing an extent did, page by page: bit `i` is set if page `i` was absent
/// and is now installed ([`Installed::New`]); a clear bit is a duplicate, left alone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InstalledPages(pub u64);

impl InstalledPages {
    pub fn is_new(self, i: u64) -> bool {
        i < 64 && self.0 & (1 << i) != 0
    }

    /// How many pages were new.
    pub fn count(self) -> u64 {
        u64::from(self.0.count_ones())
    }
}

/// Fetches pages that are absent from guest memory (post-copy: the migration source).
pub trait Pager: Send + Sync {
    /// A vCPU faulted on the absent backing page at `gpa` (aligned to the backing page).
    /// The vCPU sleeps in userfaultfd until the page is installed; this must not block.
    fn request(&self, gpa: Gpa);
}
