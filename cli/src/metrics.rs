//! The server's counters, served as Prometheus text at `GET /metrics`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use q3c_runtime::chat::ChatOutput;
use q3c_runtime::scheduler::BatchStats;
use q3c_runtime::stats::Histogram;

/// Writes one access-log line (a JSON object after `q3c serve: request `) to stderr.
pub fn access_log(fields: &serde_json::Value) {
    eprintln!("q3c serve: request {fields}");
}

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
    /// Seconds from a request's start (a slot granted) to its first piece of text, to its end, and per
    /// output token after the first.
    pub time_to_first_token: Histogram,
    pub request_duration: Histogram,
    pub time_per_output_token: Histogram,
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
    /// Records the latencies of a request that started at `start`, showed its first text at `first` and
    /// produced `tokens` tokens.
    pub fn latencies(&self, start: Instant, first: Option<Instant>, tokens: usize) {
        let total = start.elapsed().as_secs_f64();
        self.request_duration.observe(total);
        if let Some(first) = first {
            let ttft = first.duration_since(start).as_secs_f64();
            self.time_to_first_token.observe(ttft);
            if tokens > 1 {
                self.time_per_output_token
                    .observe((total - ttft) / (tokens - 1) as f64);
            }
        }
    }

    /// Counts a finished request or choice (tokens — its prompt's only if `with_prompt` — and latencies)
    /// and writes its access-log line.
    pub fn finished(
        &self,
        start: Instant,
        first: Option<Instant>,
        out: &ChatOutput,
        stream: bool,
        with_prompt: bool,
    ) {
        self.latencies(start, first, out.ids.len());
        match with_prompt {
            true => self.tokens(out.prompt_tokens, out.cached_tokens, out.ids.len()),
            false => self.tokens(0, 0, out.ids.len()),
        }
        access_log(&serde_json::json!({
            "status": 200,
            "stream": stream,
            "prompt_tokens": out.prompt_tokens,
            "cached_tokens": out.cached_tokens,
            "completion_tokens": out.ids.len(),
            "finish_reason": out.finish_reason,
            "ttft_s": first.map(|f| f.duration_since(start).as_secs_f64()),
            "duration_s": start.elapsed().as_secs_f64(),
        }));
    }

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
        let rows: [(&str, &str, &str, &AtomicU64); 12] = [
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
            (
                "q3c_kv_tokens_used",
                "gauge",
                "Tokens of KV cache held by running and kept sequences (whole blocks; shared blocks once).",
                &self.batch.kv_in_use,
            ),
            (
                "q3c_kv_tokens_capacity",
                "gauge",
                "Tokens the KV cache may hold (--ctx-size).",
                &self.batch.kv_capacity,
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, v) in rows {
            out += &format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}\n",
                v.load(Ordering::Relaxed)
            );
        }
        self.time_to_first_token.render(
            "q3c_time_to_first_token_seconds",
            "From a request's start (a slot granted) to its first text.",
            &mut out,
        );
        self.request_duration.render(
            "q3c_request_duration_seconds",
            "From a request's start (a slot granted) to its end.",
            &mut out,
        );
        self.time_per_output_token.render(
            "q3c_time_per_output_token_seconds",
            "Seconds per output token after the first text.",
            &mut out,
        );
        self.batch.inter_token.render(
            "q3c_inter_token_latency_seconds",
            "Between consecutive tokens of one request, as its decoding loop sees them.",
            &mut out,
        );
        out
    }
}
