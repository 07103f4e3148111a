//! Latency histograms: what a fault or a demand request cost, in 1 µs buckets.

/// Fault latency histogram: 1 µs buckets up to 10 ms, then one overflow bucket.
pub struct LatencyHistogram {
    buckets: Vec<u64>,
    count: u64,
    max_ns: u64,
}

const HIST_BUCKETS: usize = 10_000;

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: vec![0; HIST_BUCKETS + 1],
            count: 0,
            max_ns: 0,
        }
    }
}

impl LatencyHistogram {
    pub fn record(&mut self, ns: u64) {
        let us = (ns / 1000) as usize;
        self.buckets[us.min(HIST_BUCKETS)] += 1;
        self.count += 1;
        self.max_ns = self.max_ns.max(ns);
    }

    /// The `p`-th percentile in µs (upper edge of its bucket); 0 when empty.
    pub fn percentile_us(&self, p: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let want = ((p / 100.0) * self.count as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (us, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= want {
                return if us == HIST_BUCKETS {
                    self.max_ns as f64 / 1000.0
                } else {
                    (us + 1) as f64
                };
            }
        }
        self.max_ns as f64 / 1000.0
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn max_us(&self) -> f64 {
        self.max_ns as f64 / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_percentiles() {
        let mut h = LatencyHistogram::default();
        for us in 1..=100u64 {
            h.record(us * 1000 - 500);
        }
        assert_eq!(h.percentile_us(50.0), 50.0);
        assert_eq!(h.percentile_us(99.0), 99.0);
        h.record(50_000_000);
        assert_eq!(h.percentile_us(100.0), 50_000.0);
        assert_eq!(LatencyHistogram::default().percentile_us(50.0), 0.0);
    }
}
