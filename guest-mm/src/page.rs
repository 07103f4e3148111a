//! The vocabulary of pages crossing into guest memory from outside (a migration stream,
//! a snapshot file): what a page holds, what installing it did, and who is asked for a
//! page a vCPU needs that has not arrived.

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

/// Fetches pages that are absent from guest memory (post-copy: the migration source).
pub trait Pager: Send + Sync {
    /// A vCPU faulted on the absent backing page at `gpa` (aligned to the backing page).
    /// The vCPU sleeps in userfaultfd until the page is installed; this must not block.
    fn request(&self, gpa: Gpa);
}
