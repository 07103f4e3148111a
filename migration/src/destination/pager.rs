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
    /// When each page was first asked for.
    requested: Mutex<HashMap<Gpa, Instant>>,
    latency: Mutex<LatencyHistogram>,
    demand: AtomicU64,
    pushed: AtomicU64,
    completed: AtomicBool,
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

    /// The page at `gpa` was installed (it was absent).
    pub(crate) fn installed(&self, gpa: Gpa) {
        let asked = self
            .requested
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&gpa);
        match asked {
            Some(t) => {
                self.demand.fetch_add(1, Ordering::Relaxed);
                self.latency
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .record(t.elapsed().as_nanos() as u64);
            }
            None => {
                self.pushed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub(crate) fn stats(&self) -> DemandStats {
        let h = self.latency.lock().unwrap_or_else(|e| e.into_inner());
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
            req.insert(page, Instant::now());
        }
        // A failed write shows on the main connection (the source is gone) soon enough;
        // the vCPU waits for the page either way.
        let mut w = self.urgent.lock().unwrap_or_else(|e| e.into_inner());
        let _ = Message::PageRequest { gpa: page }
            .send(&mut w)
            .and_then(|()| w.flush());
    }
}
