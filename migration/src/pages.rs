//! Guest pages on their way to and from the wire, for both ends: the layout a guest has,
//! sending pages read from it, the memory hash, and receiving one expected message.

use std::io::{Read, Write};
use std::time::Duration;

use guest_mm::Gpa;

use crate::error::{Error, HostCall, PeerError, Step};
use crate::host::GuestPages;
use crate::wire::frame::{is_zero, FrameKind, FrameWriter};
use crate::wire::message::{Layout, Message, MessageReader};
use guest_mm::PageContent;

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

/// Reads pages and writes them as page frames (zero pages as their address only).
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
            buf: vec![0; layout.page_size as usize],
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
        let gpa = Gpa(page * self.page_size);
        self.pages
            .read_page(gpa, &mut self.buf)
            .map_err(Error::host(step, HostCall::ReadPage(gpa)))?;
        let content = if is_zero(&self.buf) {
            PageContent::Zero
        } else {
            PageContent::Bytes(&self.buf)
        };
        Message::page(gpa, content)
            .send(w)
            .map_err(Error::wire(step, io_timeout))
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
