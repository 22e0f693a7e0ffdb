//! `q3c bench`: prefill and decode speed of a model, measured as llama-bench measures pp/tg.

use std::time::Instant;

use anyhow::Result;
use q3c_runtime::Session;

/// Speeds measured in one run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchResult {
    pub prompt_len: usize,
    pub gen: usize,
    pub threads: usize,
    pub repetitions: usize,
    /// Prompt tokens per second (best of the repetitions).
    pub prefill_tok_s: f64,
    /// Generated tokens per second, one token per forward call (best of the repetitions).
    pub decode_tok_s: f64,
}

/// Runs `reps` times: a prefill of `prompt_len` pseudo-random ids in a fresh session, then `gen`
/// single-token decodes after it. Like llama-bench, only the last row's logits are computed.
/// Reports the best rate of each.
pub fn run(
    session: &mut dyn Session,
    vocab: usize,
    prompt_len: usize,
    gen: usize,
    threads: usize,
    reps: usize,
) -> Result<BenchResult> {
    let prompt: Vec<u32> = (0..prompt_len)
        .map(|i| ((i as u64 * 2654435761) % vocab as u64) as u32)
        .collect();
    let (mut best_pp, mut best_tg) = (0f64, 0f64);
    for _ in 0..reps.max(1) {
        session.reset();
        let t0 = Instant::now();
        session.forward_last(&prompt)?;
        best_pp = best_pp.max(prompt_len as f64 / t0.elapsed().as_secs_f64());
        let mut next = 1u32;
        let t0 = Instant::now();
        for _ in 0..gen {
            let logits = session.forward_last(&[next])?;
            next = q3c_runtime::generate::argmax(&logits);
        }
        best_tg = best_tg.max(gen as f64 / t0.elapsed().as_secs_f64());
    }
    Ok(BenchResult {
        prompt_len,
        gen,
        threads,
        repetitions: reps.max(1),
        prefill_tok_s: best_pp,
        decode_tok_s: best_tg,
    })
}
