//! Guest pages on their way to and from the wire, for both ends: the layout a guest has,
//! sending pages read from it, the memory hash, and receiving one expected message.

use std::io::{Read, Write};
use std::time::Duration;

use guest_mm::Gpa;

use crate::error::{Error, HostCall, PeerError, Step};
use crate::host::GuestPages;
use crate::wire::frame::{is_zero, FrameKind, FrameWriter};
use crate::wire::message::{Layout, Message, MessageReader};

/// The guest's layout, or a host error if the VMM reports one that cannot be.
pub(crate) fn layout_of(pages: &dyn GuestPages) -> Result<Layout, Error> {
    Layout::new(pages.size(), pages.page_size()).ok_or_else(|| Error::Host {
        step: Step::Connect,
        call: HostCall::Layout,
        source: format!(
            "guest RAM of {:#x} bytes in backing pages of {:#x} is not a layout a migration can carry",
            pages.size(),
            pages.page_size()
        )
        .into(),
    })
}

/// Groups backing page numbers (ascending) into extents, `(first page, pages)`: runs of
/// consecutive pages, at most [`Layout::extent_max_pages`] long, never across a region.
pub(crate) fn extents(
    pages: impl IntoIterator<Item = u64>,
    layout: &Layout,
) -> impl Iterator<Item = (u64, u64)> {
    let max = layout.extent_max_pages();
    let per_region = (guest_mm::SIZE_2M / layout.page_size).max(1);
    let mut pages = pages.into_iter().peekable();
    std::iter::from_fn(move || {
        let first = pages.next()?;
        let mut n = 1;
        while n < max {
            let next = first + n;
            if next.is_multiple_of(per_region) || pages.peek() != Some(&next) {
                break;
            }
            pages.next();
            n += 1;
        }
        Some((first, n))
    })
}

/// Reads extents and writes them as page frames: each stretch of non-zero pages as one
/// `Page` frame, each stretch of zero pages as one `ZeroPage` (its address and count).
pub(crate) struct PageSender<'a> {
    pages: &'a dyn GuestPages,
    page_size: u64,
    buf: Vec<u8>,
}

impl<'a> PageSender<'a> {
    pub(crate) fn new(pages: &'a dyn GuestPages, layout: &Layout) -> PageSender<'a> {
        PageSender {
            pages,
            page_size: layout.page_size,
            buf: vec![0; (layout.extent_max_pages() * layout.page_size) as usize],
        }
    }

    /// Sends backing page number `page`.
    pub(crate) fn send<W: Write>(
        &mut self,
        w: &mut FrameWriter<W>,
        page: u64,
        step: Step,
        io_timeout: Duration,
    ) -> Result<(), Error> {
        self.send_extent(w, (page, 1), step, io_timeout)
    }

    /// Sends the extent of `pages` backing pages from page number `first` (one of
    /// [`extents`]).
    pub(crate) fn send_extent<W: Write>(
        &mut self,
        w: &mut FrameWriter<W>,
        (first, pages): (u64, u64),
        step: Step,
        io_timeout: Duration,
    ) -> Result<(), Error> {
        let ps = self.page_size as usize;
        let gpa = Gpa(first * self.page_size);
        let buf = &mut self.buf[..pages as usize * ps];
        self.pages
            .read_pages(gpa, buf)
            .map_err(Error::host(step, HostCall::ReadPage(gpa)))?;
        let zero = |i: usize| is_zero(&buf[i * ps..(i + 1) * ps]);
        let n = pages as usize;
        let mut i = 0;
        while i < n {
            let z = zero(i);
            let mut j = i + 1;
            while j < n && zero(j) == z {
                j += 1;
            }
            let at = gpa.add((i * ps) as u64);
            let m = match z {
                true => Message::ZeroPage {
                    gpa: at,
                    pages: (j - i) as u32,
                },
                false => Message::Page {
                    gpa: at,
                    data: &buf[i * ps..j * ps],
                },
            };
            m.send(w).map_err(Error::wire(step, io_timeout))?;
            i = j;
        }
        Ok(())
    }
}

/// CRC-32 of all guest RAM, page by page in address order (the same value whatever the
/// page size: CRC-32 runs over the bytes).
pub(crate) fn memory_hash(pages: &dyn GuestPages, layout: &Layout) -> Result<u32, Error> {
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; layout.page_size as usize];
    for p in 0..layout.pages() {
        let gpa = Gpa(p * layout.page_size);
        pages
            .read_page(gpa, &mut buf)
            .map_err(Error::host(Step::Verify, HostCall::ReadPage(gpa)))?;
        h.update(&buf);
    }
    Ok(h.finalize())
}

/// One backing page's share of the post-copy memory hash: CRC-32 of its GPA and bytes.
pub(crate) fn page_digest(gpa: Gpa, data: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&gpa.0.to_le_bytes());
    h.update(data);
    h.finalize()
}

/// The post-copy memory hash of `which` backing pages: the wrapping sum of their
/// [`page_digest`]s, so it can be added up in any order as pages arrive.
pub(crate) fn digest_pages(
    pages: &dyn GuestPages,
    layout: &Layout,
    which: impl Iterator<Item = u64>,
) -> Result<u32, Error> {
    let mut buf = vec![0u8; layout.page_size as usize];
    let mut sum = 0u32;
    for p in which {
        let gpa = Gpa(p * layout.page_size);
        pages
            .read_page(gpa, &mut buf)
            .map_err(Error::host(Step::Verify, HostCall::ReadPage(gpa)))?;
        sum = sum.wrapping_add(page_digest(gpa, &buf));
    }
    Ok(sum)
}

/// Receives the next message and hands it to `pick`, which takes what `step` expects
/// (else returns the message's kind). An `Abort` is the peer's error.
pub(crate) fn expect<R: Read, T>(
    r: &mut MessageReader<R>,
    step: Step,
    io_timeout: Duration,
    expected: &'static str,
    pick: impl FnOnce(Message<'_>) -> Result<T, FrameKind>,
) -> Result<T, Error> {
    let frame = r.recv().map_err(Error::wire(step, io_timeout))?;
    let msg = r.decode(&frame).map_err(Error::wire(step, io_timeout))?;
    if let Message::Abort { reason } = msg {
        return Err(Error::peer(step, PeerError::Aborted { reason }));
    }
    pick(msg).map_err(|got| {
        Error::peer(
            step,
            PeerError::Unexpected {
                index: r.last_index(),
                expected,
                got,
            },
        )
    })
}

/// After a failure on either end: tells the peer why (best effort: it may be gone) and
/// closes both connections, so every thread blocked on them returns.
pub(crate) fn abort_and_close(
    writer: &mut crate::wire::frame::FrameWriter<Box<dyn crate::wire::transport::Channel>>,
    main: &dyn crate::wire::transport::Channel,
    urgent: Option<&dyn crate::wire::transport::Channel>,
    error: &Error,
) {
    let abort = crate::wire::message::Message::Abort {
        reason: error.to_string(),
    };
    let _ = abort.send(writer).and_then(|()| writer.flush());
    main.shutdown();
    if let Some(u) = urgent {
        u.shutdown();
    }
}
