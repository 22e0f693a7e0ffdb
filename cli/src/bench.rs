//! `q3c bench`: prefill and decode speed of a model, measured as llama-bench measures pp/tg.

use std::time::Instant;

use anyhow::Result;
use q3c_runtime::{Batch, SeqId, Session};

/// What to measure.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    pub prompt_len: usize,
    pub gen: usize,
    /// `None`: decode follows the prompt (at depth `prompt_len`). `Some(d)`: as llama-bench's `-d`, both
    /// figures are taken after `d` tokens already in the cache — the prompt in one session, the decode in
    /// another with no prompt.
    pub depth: Option<usize>,
    pub reps: usize,
}

/// Speeds measured in one run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchResult {
    pub prompt_len: usize,
    pub gen: usize,
    /// Tokens in the cache before each measurement (`null`: decode follows the prompt).
    pub depth: Option<usize>,
    pub threads: usize,
    pub repetitions: usize,
    /// Prompt tokens per second (best of the repetitions).
    pub prefill_tok_s: f64,
    /// Generated tokens per second, one token per forward call (best of the repetitions).
    pub decode_tok_s: f64,
    /// Mean and standard deviation over the repetitions (what llama-bench reports).
    pub prefill_mean_tok_s: f64,
    pub prefill_std_tok_s: f64,
    pub decode_mean_tok_s: f64,
    pub decode_std_tok_s: f64,
    /// Seconds to load the model (weights bound), and the process's resident memory right after
    /// (`VmRSS`; `null` where the system does not say).
    pub load_s: f64,
    pub resident_after_load_bytes: Option<u64>,
    /// For a sharded model: what its collectives cost per decode step (rank 0's view).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub collectives: Option<CollectiveCost>,
}

/// The collectives of one decode step of a sharded model, as rank 0 sees them.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CollectiveCost {
    pub ranks: usize,
    pub per_step: usize,
    /// Seconds per step in them (waiting for the other ranks included).
    pub seconds_per_step: f64,
    /// Their share of the step's time.
    pub share: f64,
    /// Bytes rank 0 contributes per step.
    pub bytes_per_step: u64,
}

/// Times `gen` decode steps of `session` (after one token) and what `stats` says their collectives cost.
pub fn collective_cost(
    session: &mut dyn Session,
    ranks: usize,
    gen: usize,
    stats: impl Fn() -> q3c_runtime::CollectiveStats,
) -> Result<CollectiveCost> {
    session.reset();
    session.forward_last(&[1])?;
    let (before, t0) = (stats(), Instant::now());
    let mut next = 1;
    for _ in 0..gen {
        next = q3c_runtime::generate::argmax(&session.forward_last(&[next])?);
    }
    let (spent, secs) = (stats() - before, t0.elapsed().as_secs_f64());
    let steps = gen.max(1);
    Ok(CollectiveCost {
        ranks,
        per_step: spent.calls as usize / steps,
        seconds_per_step: spent.seconds / steps as f64,
        share: spent.seconds / secs,
        bytes_per_step: spent.bytes / steps as u64,
    })
}

/// This process's resident memory (`VmRSS` of `/proc/self/status`), if the system reports it.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Mean and (sample) standard deviation.
fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}

/// After one warm-up pass, runs `reps` times: a prefill of `prompt_len` pseudo-random ids in a fresh session,
/// then `gen` single-token decodes after it (or, with a depth, each after that many tokens of context; see
/// [`Workload::depth`]). Like llama-bench, only the last row's logits are computed. Reports the best rate of
/// each, and their mean and spread.
pub fn run(
    session: &mut dyn Session,
    vocab: usize,
    work: Workload,
    threads: usize,
) -> Result<BenchResult> {
    let Workload {
        prompt_len,
        gen,
        depth,
        reps,
    } = work;
    let ids = |n: usize, from: usize| -> Vec<u32> {
        (from..from + n)
            .map(|i| ((i as u64 * 2654435761) % vocab as u64) as u32)
            .collect()
    };
    let prompt = ids(prompt_len, depth.unwrap_or(0));
    let context = ids(depth.unwrap_or(0), 0);
    // A fresh session holding the depth's tokens.
    let fresh = |session: &mut dyn Session| -> Result<()> {
        session.reset();
        if !context.is_empty() {
            session.forward_last(&context)?;
        }
        Ok(())
    };
    let decode = |session: &mut dyn Session| -> Result<f64> {
        let mut next = 1u32;
        let t0 = Instant::now();
        for _ in 0..gen {
            let logits = session.forward_last(&[next])?;
            next = q3c_runtime::generate::argmax(&logits);
        }
        Ok(gen as f64 / t0.elapsed().as_secs_f64())
    };
    // One untimed warm-up, as llama-bench does: the first pass pays for faulting in the mapped weights.
    fresh(session)?;
    session.forward_last(&prompt)?;
    session.forward_last(&[1])?;
    let (mut pp, mut tg) = (Vec::new(), Vec::new());
    for _ in 0..reps.max(1) {
        fresh(session)?;
        let t0 = Instant::now();
        session.forward_last(&prompt)?;
        pp.push(prompt_len as f64 / t0.elapsed().as_secs_f64());
        if depth.is_some() {
            fresh(session)?;
        }
        tg.push(decode(session)?);
    }
    let best = |xs: &[f64]| xs.iter().copied().fold(0f64, f64::max);
    let ((pp_mean, pp_std), (tg_mean, tg_std)) = (mean_std(&pp), mean_std(&tg));
    Ok(BenchResult {
        prompt_len,
        gen,
        depth,
        threads,
        repetitions: reps.max(1),
        prefill_tok_s: best(&pp),
        decode_tok_s: best(&tg),
        prefill_mean_tok_s: pp_mean,
        prefill_std_tok_s: pp_std,
        decode_mean_tok_s: tg_mean,
        decode_std_tok_s: tg_std,
        load_s: 0.0,
        resident_after_load_bytes: None,
        collectives: None,
    })
}

/// Speeds of `sequences` sequences decoding together (as llama-batched-bench's PP/TG columns).
#[derive(Debug, Clone, serde::Serialize)]
pub struct BatchResult {
    pub sequences: usize,
    pub prompt_len: usize,
    pub gen: usize,
    pub threads: usize,
    pub repetitions: usize,
    /// Prompt tokens of all sequences per second, the prompts fed together (best of the repetitions).
    pub prefill_tok_s: f64,
    /// Generated tokens of all sequences per second, one token per sequence per step (best).
    pub decode_tok_s: f64,
    /// `decode_tok_s` per sequence.
    pub decode_per_sequence_tok_s: f64,
    pub prefill_mean_tok_s: f64,
    pub decode_mean_tok_s: f64,
    pub load_s: f64,
    pub resident_after_load_bytes: Option<u64>,
}

/// After one warm-up pass, runs `reps` times: `sequences` prompts of `prompt_len` distinct pseudo-random
/// ids fed together, then `gen` steps each feeding every sequence one token, all in a batch whose
/// sequences are opened afresh each time.
pub fn run_batch(
    batch: &mut dyn Batch,
    sequences: usize,
    work: Workload,
    threads: usize,
) -> Result<BatchResult> {
    let vocab = batch.vocab_size() as u64;
    let prompts: Vec<Vec<u32>> = (0..sequences)
        .map(|s| {
            (0..work.prompt_len)
                .map(|i| (((s * work.prompt_len + i) as u64 * 2654435761) % vocab) as u32)
                .collect()
        })
        .collect();
    let pass = |batch: &mut dyn Batch, gen: usize| -> Result<(f64, f64)> {
        let seqs: Vec<SeqId> = (0..sequences).map(|_| batch.open()).collect();
        let t0 = Instant::now();
        let feed: Vec<(SeqId, &[u32])> = seqs
            .iter()
            .zip(&prompts)
            .map(|(&s, p)| (s, &p[..]))
            .collect();
        let mut logits = batch.forward_last(&feed)?;
        let pp = (sequences * work.prompt_len) as f64 / t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        for _ in 0..gen {
            let next: Vec<[u32; 1]> = logits
                .iter()
                .map(|l| [q3c_runtime::generate::argmax(l)])
                .collect();
            let feed: Vec<(SeqId, &[u32])> =
                seqs.iter().zip(&next).map(|(&s, n)| (s, &n[..])).collect();
            logits = batch.forward_last(&feed)?;
        }
        let tg = (sequences * gen) as f64 / t0.elapsed().as_secs_f64();
        for s in seqs {
            batch.close(s);
        }
        Ok((pp, tg))
    };
    pass(batch, 1)?;
    let (mut pp, mut tg) = (Vec::new(), Vec::new());
    for _ in 0..work.reps.max(1) {
        let (p, t) = pass(batch, work.gen)?;
        pp.push(p);
        tg.push(t);
    }
    let best = |xs: &[f64]| xs.iter().copied().fold(0f64, f64::max);
    Ok(BatchResult {
        sequences,
        prompt_len: work.prompt_len,
        gen: work.gen,
        threads,
        repetitions: work.reps.max(1),
        prefill_tok_s: best(&pp),
        decode_tok_s: best(&tg),
        decode_per_sequence_tok_s: best(&tg) / sequences as f64,
        prefill_mean_tok_s: mean_std(&pp).0,
        decode_mean_tok_s: mean_std(&tg).0,
        load_s: 0.0,
        resident_after_load_bytes: None,
    })
}
