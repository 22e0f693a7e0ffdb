//! Latency histograms in the Prometheus text format, shared by the scheduler and the server's metrics.

use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds (seconds) of the latency histograms' buckets.
const LATENCY_BOUNDS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// A Prometheus histogram of seconds over [`LATENCY_BOUNDS`] (relaxed atomics).
#[derive(Debug)]
pub struct Histogram {
    /// Observations at or below each bound (not cumulative), and above the last.
    counts: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_micros: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// Counts one observation of `seconds`.
    pub fn observe(&self, seconds: f64) {
        let bucket = LATENCY_BOUNDS
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(LATENCY_BOUNDS.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    /// Appends the text exposition: cumulative buckets, `+Inf`, sum and count.
    pub fn render(&self, name: &str, help: &str, out: &mut String) {
        *out += &format!("# HELP {name} {help}\n# TYPE {name} histogram\n");
        let mut total = 0;
        for (i, c) in self.counts.iter().enumerate() {
            total += c.load(Ordering::Relaxed);
            let le = LATENCY_BOUNDS
                .get(i)
                .map_or("+Inf".to_string(), |b| b.to_string());
            *out += &format!("{name}_bucket{{le=\"{le}\"}} {total}\n");
        }
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        *out += &format!("{name}_sum {sum}\n{name}_count {total}\n");
    }
}
