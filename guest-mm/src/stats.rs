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

    /// The histogram in power-of-two buckets, for a report: `(upper edge µs, count)` for
    /// every non-empty bucket, the edges 1, 2, 4 … 8192 µs, then 10 ms (the 1 µs buckets'
    /// end) and the overflow bucket, whose edge is the largest value seen.
    pub fn log2_buckets(&self) -> Vec<(f64, u64)> {
        let mut out: Vec<(f64, u64)> = Vec::new();
        let mut upper = 1usize;
        let mut n = 0;
        for (us, &c) in self.buckets.iter().enumerate().take(HIST_BUCKETS) {
            while us >= upper {
                if n > 0 {
                    out.push((upper as f64, n));
                }
                n = 0;
                upper = (upper * 2).min(HIST_BUCKETS);
            }
            n += c;
        }
        if n > 0 {
            out.push((upper as f64, n));
        }
        if self.buckets[HIST_BUCKETS] > 0 {
            out.push((self.max_us(), self.buckets[HIST_BUCKETS]));
        }
        out
    }

    pub fn max_us(&self) -> f64 {
        self.max_ns as f64 / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log2_buckets_add_up_and_name_their_upper_edges() {
        let mut h = LatencyHistogram::default();
        for ns in [500, 1_500, 3_000, 3_900, 700_000, 20_000_000] {
            h.record(ns);
        }
        let b = h.log2_buckets();
        assert_eq!(
            b,
            vec![(1.0, 1), (2.0, 1), (4.0, 2), (1024.0, 1), (20_000.0, 1)],
            "0 µs in the first, 1 µs in [1, 2), 3 µs twice in [2, 4), 700 µs in [512, 1024), 20 ms beyond the end"
        );
        assert_eq!(b.iter().map(|x| x.1).sum::<u64>(), h.count());
    }

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
