//! The server's counters, served as Prometheus text at `GET /metrics`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use q3c_runtime::scheduler::BatchStats;

/// Counters and gauges of one server (relaxed atomics: each is read on its own).
#[derive(Default)]
pub struct Metrics {
    /// Requests answered, any outcome (parse errors included).
    pub requests: AtomicU64,
    /// Requests answered with an error status or ended by a failure.
    pub failed: AtomicU64,
    /// Requests decoding now.
    pub running: AtomicU64,
    /// Requests waiting for a slot.
    pub waiting: AtomicU64,
    /// Prompt tokens of answered requests, and those of them read from a kept KV cache.
    pub prompt_tokens: AtomicU64,
    pub cached_tokens: AtomicU64,
    /// Tokens after the prompts (inserted ones included).
    pub completion_tokens: AtomicU64,
    /// The batch scheduler's steps, sequences and tokens.
    pub batch: Arc<BatchStats>,
}

/// Adds one to `gauge` until the guard is dropped.
pub struct Gauge<'a>(&'a AtomicU64);

impl<'a> Gauge<'a> {
    pub fn enter(gauge: &'a AtomicU64) -> Gauge<'a> {
        gauge.fetch_add(1, Ordering::Relaxed);
        Gauge(gauge)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// Counts a finished request's tokens.
    pub fn tokens(&self, prompt: usize, cached: usize, completion: usize) {
        self.prompt_tokens
            .fetch_add(prompt as u64, Ordering::Relaxed);
        self.cached_tokens
            .fetch_add(cached as u64, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(completion as u64, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let rows: [(&str, &str, &str, &AtomicU64); 10] = [
            (
                "q3c_requests_total",
                "counter",
                "Chat requests answered, any outcome.",
                &self.requests,
            ),
            (
                "q3c_requests_failed_total",
                "counter",
                "Requests answered with an error.",
                &self.failed,
            ),
            (
                "q3c_requests_running",
                "gauge",
                "Requests decoding now.",
                &self.running,
            ),
            (
                "q3c_requests_waiting",
                "gauge",
                "Requests waiting for a slot.",
                &self.waiting,
            ),
            (
                "q3c_prompt_tokens_total",
                "counter",
                "Prompt tokens of answered requests.",
                &self.prompt_tokens,
            ),
            (
                "q3c_prompt_tokens_cached_total",
                "counter",
                "Prompt tokens read from a kept KV cache instead of computed.",
                &self.cached_tokens,
            ),
            (
                "q3c_completion_tokens_total",
                "counter",
                "Tokens after the prompts, inserted ones included.",
                &self.completion_tokens,
            ),
            (
                "q3c_batch_steps_total",
                "counter",
                "Batched forward steps run (each feeds every running request at once).",
                &self.batch.steps,
            ),
            (
                "q3c_batch_sequences_total",
                "counter",
                "Sequences fed, summed over the steps (divided by the steps: the mean batch).",
                &self.batch.sequences,
            ),
            (
                "q3c_batch_tokens_total",
                "counter",
                "Tokens fed, summed over the steps.",
                &self.batch.tokens,
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, v) in rows {
            out += &format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}\n",
                v.load(Ordering::Relaxed)
            );
        }
        out
    }
}
