//! Checking a [`Batch`] against one session per sequence, for the batch tests of every executor.
//!
//! Batched rows must give the logits of the same tokens fed alone up to the order of f32 additions: a
//! row's products, staging and attention are the same whichever rows share a call, but a row that falls in
//! a partial register tile of a matrix product (the last rows of a call) sums its dot products in another
//! grouping than in a full tile. Each order is within `γ_K·Σ|terms|` of the exact sum (K ≤ 512 here:
//! ~3e-5 relative), so with an f32 KV cache the comparisons allow 1e-4, the bound the compiled-vs-reference
//! test uses for the same cause. With an f16 cache, a K or V element whose f32 value differs in its last
//! bits can round to the neighbouring f16 value — a relative change of 2^-11 in that element — so those
//! comparisons allow 1e-3, the fixtures' tolerance against transformers ([`tolerance`]). A row attending to
//! another sequence's keys, at a wrong position or through a wrong cache block moves logits by 1e-1 and more
//! on these random weights (1.9 measured when attention read the first sequence's blocks for every row).

use q3c_ir::DType;
use q3c_runtime::generate::argmax;
use q3c_runtime::{Batch, SeqId, Session};

use crate::{max_abs_diff, LOGIT_TOLERANCE};

/// Prompts of lengths that cross cache blocks (16 tokens) and calls (`MAX_TOKENS`), and a single token.
pub fn prompts(vocab: usize) -> Vec<Vec<u32>> {
    let mut state = 0x9e37_79b9u64;
    [37usize, 1, 70, 16, 5]
        .iter()
        .map(|&n| {
            (0..n)
                .map(|_| {
                    state = state
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1);
                    ((state >> 33) as usize % vocab) as u32
                })
                .collect()
        })
        .collect()
}

pub const MAX_TOKENS: usize = 64;

/// Max |Δlogit| between batched and lone rows with a KV cache of `kv` (see the module documentation).
pub fn tolerance(kv: DType) -> f32 {
    match kv {
        DType::F32 => 1e-4,
        _ => LOGIT_TOLERANCE,
    }
}

/// Runs a schedule on `batch` and on one session per sequence, asserting equal logits at every step:
/// all prompts at once; three steps decoding every sequence's greedy token together; a step where one
/// sequence sits out, one is closed and a new one is prefilled alongside the others' decoding.
pub fn check_against_sessions<'m>(
    what: &str,
    kv: DType,
    batch: &mut dyn Batch,
    session: &dyn Fn() -> Box<dyn Session + 'm>,
    vocab: usize,
) {
    let prompts = prompts(vocab);
    let mut seqs: Vec<(SeqId, Box<dyn Session + 'm>, Vec<u32>)> = prompts
        .iter()
        .map(|p| (batch.open(), session(), p.clone()))
        .collect();
    let step = |batch: &mut dyn Batch,
                seqs: &mut Vec<(SeqId, Box<dyn Session + 'm>, Vec<u32>)>,
                n: usize| {
        let work: Vec<(SeqId, &[u32])> =
            seqs.iter().map(|(id, _, next)| (*id, &next[..])).collect();
        let got = batch.forward_last(&work).unwrap();
        for (i, (id, s, next)) in seqs.iter_mut().enumerate() {
            let want = s.forward_last(next).unwrap();
            let diff = max_abs_diff(&got[i], &want);
            assert!(
                diff <= tolerance(kv),
                "{what}, step {n}, sequence {id}: max |dlogit| {diff:e}"
            );
            assert_eq!(batch.position(*id), s.position(), "{what}, step {n}");
            *next = vec![argmax(&got[i])];
        }
    };
    step(batch, &mut seqs, 0);
    for n in 1..=3 {
        step(batch, &mut seqs, n);
    }
    // Sequence 0 sits out, sequence 1 leaves, a new one arrives with a prompt.
    let resting = seqs.remove(0);
    let (gone, _, _) = seqs.remove(0);
    batch.close(gone);
    assert_eq!(batch.position(gone), 0);
    seqs.push((batch.open(), session(), prompts[2][..21].to_vec()));
    step(batch, &mut seqs, 4);
    // And sequence 0 comes back, still where it was.
    seqs.push(resting);
    step(batch, &mut seqs, 5);
}
