//! Region telemetry: faults by outcome, bytes, read-ahead, service latency. One set per
//! region (all its handles) and one per job (all its regions); a handle adds to both.

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// How a fault ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Zeros mapped (UFFDIO_ZEROPAGE): a zero region, a zero chunk.
    Zero,
    /// Copied from the region's own backing store (its file, chunks or layer).
    Fetch,
    /// Copied from the parent's content (a clone's page it has not written).
    Cow,
    /// Served after the backing store was busy and the fault waited (bounded).
    Retry,
    /// The access failed with SIGBUS (UFFDIO_POISON), for a recorded reason.
    Failure,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Outcome::Zero,
        Outcome::Fetch,
        Outcome::Cow,
        Outcome::Retry,
        Outcome::Failure,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Zero => "zero",
            Outcome::Fetch => "fetch",
            Outcome::Cow => "cow",
            Outcome::Retry => "retry",
            Outcome::Failure => "failure",
        }
    }
}

/// Upper bounds of the latency histogram's buckets, in microseconds (then +Inf).
pub const LATENCY_BOUNDS_US: [u64; 12] =
    [2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000, 20000, 100000];

#[derive(Default)]
pub struct Counters {
    faults: [AtomicU64; 5],
    bytes_fetched: AtomicU64,
    bytes_zeroed: AtomicU64,
    bytes_cow: AtomicU64,
    readahead_pages: AtomicU64,
    readahead_hits: AtomicU64,
    opens: AtomicU64,
    latency: [AtomicU64; 13],
    latency_sum_us: AtomicU64,
}

impl Counters {
    pub fn fault(&self, outcome: Outcome, latency_us: u64) {
        self.faults[outcome as usize].fetch_add(1, Relaxed);
        let bucket = LATENCY_BOUNDS_US
            .iter()
            .position(|&b| latency_us <= b)
            .unwrap_or(LATENCY_BOUNDS_US.len());
        self.latency[bucket].fetch_add(1, Relaxed);
        self.latency_sum_us.fetch_add(latency_us, Relaxed);
    }
    /// Bytes put into the job's memory, by where they came from.
    pub fn filled(&self, from: Outcome, bytes: u64) {
        let c = match from {
            Outcome::Zero => &self.bytes_zeroed,
            Outcome::Cow => &self.bytes_cow,
            _ => &self.bytes_fetched,
        };
        c.fetch_add(bytes, Relaxed);
    }
    pub fn readahead(&self, pages: u64) {
        self.readahead_pages.fetch_add(pages, Relaxed);
    }
    pub fn readahead_hit(&self, pages: u64) {
        self.readahead_hits.fetch_add(pages, Relaxed);
    }
    pub fn opened(&self) {
        self.opens.fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> StatsView {
        let faults = Outcome::ALL
            .iter()
            .map(|o| (o.name().to_owned(), self.faults[*o as usize].load(Relaxed)))
            .collect();
        let mut cumulative = 0;
        let mut buckets = Vec::new();
        for (i, c) in self.latency.iter().enumerate() {
            cumulative += c.load(Relaxed);
            let le = LATENCY_BOUNDS_US
                .get(i)
                .map_or("+Inf".to_owned(), |b| b.to_string());
            buckets.push((le, cumulative));
        }
        StatsView {
            opens: self.opens.load(Relaxed),
            faults,
            bytes_fetched: self.bytes_fetched.load(Relaxed),
            bytes_zeroed: self.bytes_zeroed.load(Relaxed),
            bytes_cow: self.bytes_cow.load(Relaxed),
            readahead_pages: self.readahead_pages.load(Relaxed),
            readahead_hits: self.readahead_hits.load(Relaxed),
            latency_us_buckets: buckets,
            latency_us_sum: self.latency_sum_us.load(Relaxed),
        }
    }
}

/// What `agentctl region inspect` and a job's `regions` show.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct StatsView {
    pub opens: u64,
    /// Faults by outcome: zero, fetch, cow, retry, failure.
    pub faults: std::collections::BTreeMap<String, u64>,
    pub bytes_fetched: u64,
    pub bytes_zeroed: u64,
    pub bytes_cow: u64,
    /// Pages filled ahead of a sequential reader, and those it then read without a fault.
    pub readahead_pages: u64,
    pub readahead_hits: u64,
    /// Cumulative (`le` in µs, count), as Prometheus histograms are.
    pub latency_us_buckets: Vec<(String, u64)>,
    pub latency_us_sum: u64,
}

impl StatsView {
    pub fn faults_total(&self) -> u64 {
        self.faults.values().sum()
    }
    /// The latency at quantile `q` (0..1), as the bucket bound it falls in.
    pub fn latency_quantile_us(&self, q: f64) -> Option<String> {
        let total = self.latency_us_buckets.last()?.1;
        if total == 0 {
            return None;
        }
        let want = (total as f64 * q).ceil() as u64;
        self.latency_us_buckets
            .iter()
            .find(|(_, c)| *c >= want)
            .map(|(le, _)| le.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_and_quantiles_pick_buckets() {
        let c = Counters::default();
        for us in [1, 1, 3, 40, 250_000] {
            c.fault(Outcome::Fetch, us);
        }
        c.fault(Outcome::Zero, 1);
        c.filled(Outcome::Zero, 4096);
        c.filled(Outcome::Cow, 8192);
        let s = c.snapshot();
        assert_eq!(s.faults["fetch"], 5);
        assert_eq!(s.faults["zero"], 1);
        assert_eq!(s.faults_total(), 6);
        assert_eq!(s.latency_us_buckets[0], ("2".into(), 3));
        assert_eq!(s.latency_us_buckets.last().unwrap(), &("+Inf".into(), 6));
        assert_eq!(s.latency_quantile_us(0.5).unwrap(), "2");
        assert_eq!(s.latency_quantile_us(0.99).unwrap(), "+Inf");
        assert_eq!(
            (s.bytes_zeroed, s.bytes_cow, s.bytes_fetched),
            (4096, 8192, 0)
        );
    }
}
