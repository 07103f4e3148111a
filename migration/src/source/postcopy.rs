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
        // From the last demand request onwards, in address order.
        PushOrder::Sequential => {
            let (mut cursor, mut idle, mut followed) = (0u64, 0u64, u64::MAX);
            while idle < pages && !shared.stopped() {
                let hint = shared.last_request.load(Ordering::Relaxed);
                if hint != followed && hint < pages {
                    followed = hint;
                    cursor = hint;
                }
                let p = cursor % pages;
                match shared.take_extent(p, s.layout.extent_max_pages()) {
                    0 => {
                        cursor = p + 1;
                        idle += 1;
                    }
                    n => {
                        push_extent(s, (p, n), &mut pushed)?;
                        cursor = p + n;
                        idle = 0;
                    }
                }
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
                match shared.take_extent(p, s.layout.extent_max_pages()) {
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
                if shared.take(p) {
                    shared.demand.fetch_add(1, Ordering::Relaxed);
                    sender.send(&mut w, p, step, timeouts.io)?;
                    w.flush().map_err(wire)?;
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
