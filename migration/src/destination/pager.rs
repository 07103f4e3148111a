//! The post-copy pager: the VMM's fault path calls it for an absent page, and it asks
//! the source on the urgent connection. It also keeps the books on what arrived: which
//! installed pages had been asked for (demand) and how long they took, and it ends the
//! urgent connection with the destination's `Complete` once every page is in. After a
//! break, a resumed urgent connection takes the old one's place and every request still
//! unanswered is sent again on it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use guest_mm::stats::LatencyHistogram;
use guest_mm::{Gpa, Pager};

use crate::wire::frame::FrameWriter;
use crate::wire::message::{DemandStats, Layout, Message};
use crate::wire::transport::Channel;

pub(crate) struct UrgentPager {
    urgent: Mutex<FrameWriter<Box<dyn Channel>>>,
    layout: Layout,
    /// Each page asked for and not installed yet: when, and when its request went out.
    requested: Mutex<HashMap<Gpa, Asked>>,
    latency: Mutex<Stages>,
    demand: AtomicU64,
    pushed: AtomicU64,
    completed: AtomicBool,
}

/// A page asked for.
#[derive(Clone, Copy)]
struct Asked {
    at: Instant,
    sent: Option<Instant>,
}

/// The demand faults' latencies, whole and stage by stage.
#[derive(Default)]
struct Stages {
    total: LatencyHistogram,
    request_sent: LatencyHistogram,
    page_arrived: LatencyHistogram,
    installed_resumed: LatencyHistogram,
}

fn ns(from: Instant, to: Instant) -> u64 {
    to.saturating_duration_since(from).as_nanos() as u64
}

impl UrgentPager {
    pub(crate) fn new(urgent: Box<dyn Channel>, layout: Layout) -> UrgentPager {
        UrgentPager {
            urgent: Mutex::new(FrameWriter::new(urgent)),
            layout,
            requested: Mutex::default(),
            latency: Mutex::default(),
            demand: AtomicU64::new(0),
            pushed: AtomicU64::new(0),
            completed: AtomicBool::new(false),
        }
    }

    /// The page at `gpa` was installed (it was absent); its frame was read at `arrived`.
    pub(crate) fn installed(&self, gpa: Gpa, arrived: Instant) {
        let asked = self
            .requested
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&gpa);
        match asked {
            Some(a) => {
                let now = Instant::now();
                self.demand.fetch_add(1, Ordering::Relaxed);
                let mut l = self.latency.lock().unwrap_or_else(|e| e.into_inner());
                l.total.record(ns(a.at, now));
                // A page pushed before its request went out arrived "before" it: its
                // wire stage is 0, its install stage counts from the request.
                let sent = a.sent.unwrap_or(a.at).max(a.at);
                l.request_sent.record(ns(a.at, sent));
                l.page_arrived.record(ns(sent, arrived));
                l.installed_resumed.record(ns(arrived.max(sent), now));
            }
            None => {
                self.pushed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub(crate) fn breakdown(&self) -> crate::report::DemandBreakdown {
        use crate::report::StageLatency;
        let l = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        crate::report::DemandBreakdown {
            request_sent: StageLatency::of(&l.request_sent),
            page_arrived: StageLatency::of(&l.page_arrived),
            installed_resumed: StageLatency::of(&l.installed_resumed),
            total: StageLatency::of(&l.total),
        }
    }

    pub(crate) fn stats(&self) -> DemandStats {
        let l = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        let h = &l.total;
        DemandStats {
            pages: self.demand.load(Ordering::Relaxed),
            us_p50: h.percentile_us(50.0),
            us_p99: h.percentile_us(99.0),
            us_max: h.max_us(),
        }
    }

    pub(crate) fn pushed(&self) -> u64 {
        self.pushed.load(Ordering::Relaxed)
    }

    /// Every page is in: tells the source what the demand faults cost, then ends the
    /// urgent connection (nothing more can travel on it). Once only.
    pub(crate) fn complete(&self) {
        if self.completed.swap(true, Ordering::AcqRel) {
            return;
        }
        let stats = self.stats();
        let mut w = self.urgent.lock().unwrap_or_else(|e| e.into_inner());
        let _ = Message::Complete {
            demand: Some(stats),
        }
        .send(&mut w)
        .and_then(|()| w.flush());
        w.get_mut().shutdown();
    }

    /// A resumed urgent connection replaces the broken one; the requests not answered
    /// yet go out again on it (the source forgot them with the old connection).
    pub(crate) fn reconnect(&self, urgent: Box<dyn Channel>) {
        let mut w = self.urgent.lock().unwrap_or_else(|e| e.into_inner());
        *w = FrameWriter::new(urgent);
        let mut again: Vec<Gpa> = self
            .requested
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect();
        again.sort_unstable();
        for gpa in again {
            let _ = Message::PageRequest { gpa }.send(&mut w);
        }
        let _ = w.flush();
    }

    /// Ends the urgent connection (after a failure).
    pub(crate) fn shutdown(&self) {
        self.urgent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut()
            .shutdown();
    }
}

impl Pager for UrgentPager {
    fn request(&self, gpa: Gpa) {
        let page = gpa.align_down(self.layout.page_size);
        if page.0 >= self.layout.memory_bytes || self.completed.load(Ordering::Acquire) {
            return;
        }
        {
            let mut req = self.requested.lock().unwrap_or_else(|e| e.into_inner());
            if req.contains_key(&page) {
                return;
            }
            req.insert(
                page,
                Asked {
                    at: Instant::now(),
                    sent: None,
                },
            );
        }
        // A failed write shows on the main connection (the source is gone) soon enough;
        // the vCPU waits for the page either way.
        {
            let mut w = self.urgent.lock().unwrap_or_else(|e| e.into_inner());
            let _ = Message::PageRequest { gpa: page }
                .send(&mut w)
                .and_then(|()| w.flush());
        }
        let sent = Instant::now();
        if let Some(a) = self
            .requested
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&page)
        {
            a.sent = Some(sent);
        }
    }
}
