//! Post-copy on the source, after the destination runs the guest: the background push
//! on the main connection and, on a thread beside it, the urgent connection's demand
//! requests. Both claim pages from one [`Missing`], so each page is sent once.
//!
//! The urgent connection may stay silent for as long as the guest asks for nothing;
//! once the push has sent its last page, the destination owes its `Complete`, and
//! silence beyond [`crate::Timeouts::confirm`] means it is gone.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use super::{Missing, Session};
use crate::bitmap::PageBitmap;
use crate::error::{Error, PeerError, Step, WireError};
use crate::host::Phase;
use crate::pages::PageSender;
use crate::wire::frame::FrameWriter;
use crate::wire::message::{DemandStats, Layout, Message, MessageReader};
use crate::wire::transport::Channel;
use crate::{PushOrder, Timeouts};

/// What the push and the urgent thread share.
struct Shared {
    missing: Mutex<Missing>,
    /// The page of the last demand request (`u64::MAX`: none yet).
    last_request: AtomicU64,
    demand: AtomicU64,
    prefetched: AtomicU64,
    /// Requested pages the push had claimed already, sent again on the urgent channel.
    resent: AtomicU64,
    /// Set when either side failed: the other stops.
    stop: AtomicBool,
    /// When the push sent its last page.
    push_done: Mutex<Option<Instant>>,
}

impl Shared {
    /// Claims page `p` for sending; false if it was sent already.
    fn take(&self, p: u64) -> bool {
        self.take_extent(p, 1) == 1
    }

    /// Claims the extent of up to `max` missing pages from `p` (see
    /// [`Missing::take_extent`]); returns how many.
    fn take_extent(&self, p: u64, max: u64) -> u64 {
        self.missing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take_extent(p, max)
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// What the urgent thread brings back.
#[derive(Default)]
struct UrgentEnd {
    stats: Option<DemandStats>,
    bytes: u64,
}

pub(super) fn run(s: &mut Session, missing: PageBitmap) -> Result<(), Error> {
    let io = s.timeouts.io;
    let cloned = |c: &dyn Channel| {
        c.try_clone()
            .map_err(|e| Error::wire(Step::Urgent, io)(WireError::Io(e)))
    };
    let Some(conn) = s.urgent_conn.take() else {
        return Err(Error::wire(Step::Urgent, io)(WireError::Io(
            std::io::ErrorKind::NotConnected.into(),
        )));
    };
    let (reader, writer) = (conn.reader, conn.writer);
    let urgent = cloned(conn.channel.as_ref())?;
    let shared = Shared {
        missing: Mutex::new(Missing::new(missing, s.layout.page_size)),
        last_request: AtomicU64::new(u64::MAX),
        demand: AtomicU64::new(0),
        prefetched: AtomicU64::new(0),
        resent: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        push_done: Mutex::new(None),
    };
    let pages = s.vm.pages();
    let (layout, timeouts) = (s.layout, *s.timeouts);
    let (pushed, urgent_end) = std::thread::scope(|scope| {
        let handle = scope.spawn(|| {
            // Demand requests never wait behind the push (or anything else) for the CPU.
            let _ = guest_mm::host::favour_this_thread();
            let sender = PageSender::new(pages, &layout);
            let r = serve_urgent(&shared, reader, writer, sender, &layout, &timeouts);
            if r.is_err() {
                shared.stop.store(true, Ordering::Relaxed);
            }
            r
        });
        let pushed = push(s, &shared).and_then(|n| {
            if !shared.stopped() {
                s.send(Step::Push, &Message::Complete { demand: None })?;
                *shared.push_done.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
            }
            Ok(n)
        });
        if pushed.is_err() {
            // The urgent thread may be blocked reading: end it.
            shared.stop.store(true, Ordering::Relaxed);
            urgent.shutdown();
        }
        let urgent_end = handle.join().unwrap_or_else(|_| {
            Err(Error::Panicked {
                step: Step::Urgent,
                what: "urgent channel",
            })
        });
        (pushed, urgent_end)
    });
    let pushed = pushed?;
    let urgent_end = urgent_end?;
    // Added up: a resumed migration pushes again what was lacking.
    s.report.pages_pushed += pushed;
    s.report.pages_demand += shared.demand.load(Ordering::Relaxed);
    s.report.pages_prefetched += shared.prefetched.load(Ordering::Relaxed);
    s.report.pages_resent += shared.resent.load(Ordering::Relaxed);
    if let Some(d) = urgent_end.stats {
        s.report.demand_fault_us_p50 = d.us_p50;
        s.report.demand_fault_us_p99 = d.us_p99;
        s.report.demand_fault_us_max = d.us_max;
    }
    s.report.bytes_sent += urgent_end.bytes;
    Ok(())
}

/// Pushes every page nobody asked for, in `push_order`; returns how many it sent.
fn push(s: &mut Session, shared: &Shared) -> Result<u64, Error> {
    let pages = s.layout.pages();
    let mut pushed = 0u64;
    s.progress.update(Phase::Push, s.writer.bytes);
    match s.req.push_order {
        PushOrder::Sequential => {
            let mut order = Sequential::default();
            while !shared.stopped() {
                let hint = shared.last_request.load(Ordering::Relaxed);
                let next = {
                    let mut m = shared.missing.lock().unwrap_or_else(|e| e.into_inner());
                    order.next(&mut m, hint, push_extent_pages(&s.layout))
                };
                let Some(extent) = next else { break };
                push_extent(s, extent, &mut pushed)?;
            }
        }
        // Region by region, the one with the fewest pages missing first.
        PushOrder::FewestMissingFirst => loop {
            let (next, per) = {
                let m = shared.missing.lock().unwrap_or_else(|e| e.into_inner());
                (m.fewest_missing_region(), m.per_region())
            };
            let Some(region) = next else { break };
            let mut p = region * per;
            while p < ((region + 1) * per).min(pages) {
                if shared.stopped() {
                    return Ok(pushed);
                }
                match shared.take_extent(p, push_extent_pages(&s.layout)) {
                    0 => p += 1,
                    n => {
                        push_extent(s, (p, n), &mut pushed)?;
                        p += n;
                    }
                }
            }
        },
    }
    Ok(pushed)
}

/// The sequential push order: from the last demand request onwards, in address order,
/// wrapping around; it ends when nothing is missing, never after a scan of pages sent
/// already (a jump to a new request cuts such a scan short and would leave the pages
/// it skipped unsent).
#[derive(Default)]
struct Sequential {
    cursor: u64,
    /// The request the cursor last jumped to.
    followed: Option<u64>,
}

impl Sequential {
    /// Claims the next extent to push; `hint` is the page of the last demand request
    /// (`u64::MAX`: none yet).
    fn next(&mut self, missing: &mut Missing, hint: u64, max: u64) -> Option<(u64, u64)> {
        if hint != u64::MAX && self.followed != Some(hint) {
            self.followed = Some(hint);
            self.cursor = hint;
        }
        let extent = missing.take_next_extent(self.cursor, max)?;
        self.cursor = extent.0 + extent.1;
        Some(extent)
    }
}

fn push_extent(s: &mut Session, extent: (u64, u64), pushed: &mut u64) -> Result<(), Error> {
    s.sender
        .send_extent(&mut s.writer, extent, Step::Push, s.timeouts.io)?;
    let before = *pushed;
    *pushed += extent.1;
    if before / 256 != *pushed / 256 {
        s.progress.update(Phase::Push, s.writer.bytes);
    }
    Ok(())
}

/// The longest extent the push sends: 16 pages of 4 KiB (64 KiB), a huge page whole. The
/// destination holds its table lock while it writes and CONTINUEs an extent, and an
/// urgent install waits for it: shorter extents keep that wait short.
fn push_extent_pages(layout: &Layout) -> u64 {
    layout.extent_max_pages().min(16)
}

/// How many pages a demanded one brings along: up to 15 more 4 KiB pages (64 KiB in
/// all, a twentieth of a 2 MiB page's wire time); none for huge backing pages, where one
/// more page would double the next request's wait.
fn prefetch_pages(layout: &Layout) -> u64 {
    match layout.page_size {
        guest_mm::SIZE_4K => 15,
        _ => 0,
    }
}

/// Answers demand requests until the destination's `Complete`.
fn serve_urgent(
    shared: &Shared,
    mut r: MessageReader<Box<dyn Channel>>,
    mut w: FrameWriter<Box<dyn Channel>>,
    mut sender: PageSender<'_>,
    layout: &Layout,
    timeouts: &Timeouts,
) -> Result<UrgentEnd, Error> {
    let step = Step::Urgent;
    let wire = |e| Error::wire(step, timeouts.io)(e);
    loop {
        let frame = match r.recv() {
            Ok(f) => f,
            Err(_) if shared.stopped() => return Ok(UrgentEnd::default()),
            // A guest that faults on nothing sends no requests: idle, not dead (a dead
            // peer shows on the main connection, or as the end of this one).
            Err(WireError::Silent) => {
                let done = *shared.push_done.lock().unwrap_or_else(|e| e.into_inner());
                match done {
                    Some(t) if t.elapsed() >= timeouts.confirm => {
                        return Err(Error::peer(
                            Step::Complete,
                            PeerError::Unconfirmed {
                                waited: timeouts.confirm,
                            },
                        ))
                    }
                    _ => continue,
                }
            }
            Err(e) => return Err(wire(e)),
        };
        match r.decode(&frame).map_err(wire)? {
            Message::PageRequest { gpa } => {
                let p = gpa.0 / layout.page_size;
                shared.last_request.store(p, Ordering::Relaxed);
                // A page the push claimed already may sit behind megabytes of pushed
                // pages in the main connection's buffers: it goes again here, at once
                // (the destination drops whichever copy comes second).
                let fresh = shared.take(p);
                let counter = match fresh {
                    true => &shared.demand,
                    false => &shared.resent,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                let sent = sender
                    .send(&mut w, p, step, timeouts.io)
                    .and_then(|()| w.flush().map_err(wire));
                match sent {
                    Ok(()) => {}
                    // The pushed copy may have completed the destination meanwhile: it
                    // ended this connection after its Complete, which the next read
                    // brings (or the real failure, if the connection broke).
                    Err(_) if !fresh => continue,
                    Err(e) => return Err(e),
                }
                if fresh {
                    // The pages after it, which a vCPU walking memory touches next, in
                    // a frame of their own once the demanded one is out.
                    let ahead = shared.take_extent(p + 1, prefetch_pages(layout));
                    if ahead > 0 {
                        shared.prefetched.fetch_add(ahead, Ordering::Relaxed);
                        sender.send_extent(&mut w, (p + 1, ahead), step, timeouts.io)?;
                        w.flush().map_err(wire)?;
                    }
                }
            }
            Message::Complete { demand } => {
                return Ok(UrgentEnd {
                    stats: demand,
                    bytes: w.bytes,
                })
            }
            Message::Abort { reason } => {
                return Err(Error::peer(step, PeerError::Aborted { reason }))
            }
            other => {
                return Err(Error::peer(
                    step,
                    PeerError::Unexpected {
                        index: r.last_index(),
                        expected: "a PageRequest or the destination's Complete",
                        got: other.kind(),
                    },
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sequential_push_follows_requests_and_sends_every_page_a_jump_skipped() {
        // 100 4 KiB pages (one region), extents of 4 pages.
        let mut m = Missing::new(PageBitmap::full(100), 4096);
        let mut order = Sequential::default();
        let mut sent = Vec::new();
        let none = u64::MAX;
        while sent.len() < 40 {
            sent.extend(
                order
                    .next(&mut m, none, 4)
                    .map(|(p, n)| p..p + n)
                    .into_iter()
                    .flatten(),
            );
        }
        // A request for page 60 (and its prefetch, 61..75) is served on the urgent
        // connection; the push follows it.
        assert!(m.take_extent(60, 16) == 16);
        assert_eq!(order.next(&mut m, 60, 4), Some((76, 4)));
        while let Some((p, n)) = order.next(&mut m, 60, 4) {
            sent.extend(p..p + n);
            if p + n == 100 {
                break;
            }
        }
        // Wrapped around; a request for page 45 takes 45..59 while 40..44 are unsent.
        assert_eq!(m.take_extent(45, 16), 15);
        let mut rest = Vec::new();
        while let Some((p, n)) = order.next(&mut m, 45, 4) {
            rest.extend(p..p + n);
        }
        assert_eq!(
            rest,
            (40..45).collect::<Vec<_>>(),
            "the pages the jump skipped"
        );
    }
}
