//! Testing: the stress zapper zaps random ranges of guest RAM through the second stage
//! (and so the guest view) while the guest runs. Every zapped page comes back as a MINOR
//! fault on its next vCPU touch, which is what the fault path's tests lean on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::addr::{Gpa, GpaRange, SIZE_4K};
use crate::config::Recurring;
use crate::error::Error;
use crate::periodic::Periodic;
use crate::stage::{Change, SecondStage};

pub(crate) struct StressZapper {
    thread: Periodic,
    zaps: Arc<AtomicU64>,
}

impl StressZapper {
    pub(crate) fn start(
        stage: Arc<SecondStage>,
        size: u64,
        every: Recurring,
    ) -> Result<StressZapper, Error> {
        let zaps = Arc::new(AtomicU64::new(0));
        let z = zaps.clone();
        let mut x = every.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let pages = size / SIZE_4K;
        let thread = Periodic::spawn("stress-zap", move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let start = (x % pages) * SIZE_4K;
            let len = (1 + (x >> 32) % 512) * SIZE_4K;
            let range = GpaRange::new(Gpa(start), Gpa((start + len).min(size)));
            if stage.apply(Change::Zap { range }).is_ok() {
                z.fetch_add(1, Ordering::Relaxed);
            }
            every.period
        })
        .map_err(|source| Error::Thread {
            name: "stress-zap",
            source,
        })?;
        Ok(StressZapper { thread, zaps })
    }

    /// Stops the thread; returns the number of zaps it made.
    pub(crate) fn stop(self) -> u64 {
        self.thread.stop();
        self.zaps.load(Ordering::Relaxed)
    }
}
