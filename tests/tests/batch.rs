//! Several sequences fed together ([`Batch`]): every artifact kind, with f32 and f16 KV caches, against
//! separate sessions of the same artifact fed the same tokens, and the reference executor's batch against
//! its sessions.
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
use q3c_runtime::{Batch, CompiledModel, Model, SeqId, Session};
use q3c_tests::*;

/// Prompts of lengths that cross cache blocks (16 tokens) and calls (`MAX_TOKENS`), and a single token.
fn prompts(vocab: usize) -> Vec<Vec<u32>> {
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

const MAX_TOKENS: usize = 64;

/// Max |Δlogit| between batched and lone rows with a KV cache of `kv` (see the module documentation).
fn tolerance(kv: DType) -> f32 {
    match kv {
        DType::F32 => 1e-4,
        _ => LOGIT_TOLERANCE,
    }
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Runs a schedule on `batch` and on one session per sequence, asserting equal logits at every step:
/// all prompts at once; three steps decoding every sequence's greedy token together; a step where one
/// sequence sits out, one is closed and a new one is prefilled alongside the others' decoding.
fn check_against_sessions<'m>(
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

#[test]
fn a_batch_feeds_each_sequence_as_its_own_session_would() {
    for name in ["dense_gqa", "moe"] {
        let g = golden(name);
        let tmp = tempfile::tempdir().unwrap();
        let cfg = q3c_models::resolve(g.dir.to_str().unwrap()).unwrap();
        let graph = fused_graph(&cfg, "all");
        for kind in artifact_kinds() {
            for kv in [DType::F32, DType::F16] {
                let so = compile_graph_kv(kind, &graph, &cfg, tmp.path(), MAX_TOKENS, "all", kv);
                let model = CompiledModel::load(&so, &g.dir, 2).unwrap();
                let what = format!("{name}, {kind}, {kv} KV");
                let mut batch = model.batch(1024);
                check_against_sessions(
                    &what,
                    kv,
                    &mut batch,
                    &|| Box::new(model.session()),
                    g.vocab,
                );
                eprintln!("{what}: batched logits equal the sessions'");
            }
        }
        let model = Model::Reference {
            model: Box::new(reference_model(name)),
            eos_token_ids: vec![],
        };
        let mut batch = model.batch(1024);
        check_against_sessions(
            &format!("{name}, reference"),
            DType::F32,
            &mut *batch,
            &|| model.session(),
            g.vocab,
        );
    }
}

#[test]
fn a_batch_refuses_overflow_bad_ids_and_unknown_sequences_and_stays_as_it_was() {
    let g = golden("moe");
    let tmp = tempfile::tempdir().unwrap();
    let so = compile_by(backends()[0], &g.dir, tmp.path(), MAX_TOKENS, "all");
    let model = CompiledModel::load(&so, &g.dir, 2).unwrap();
    // Room for 64 tokens: four blocks.
    let mut batch = model.batch(64);
    assert_eq!(batch.capacity(), 64);
    let (a, b) = (batch.open(), batch.open());
    let p = &prompts(g.vocab)[0];
    let first = batch.forward_last(&[(a, &p[..20]), (b, &p[..3])]).unwrap();
    // 20 + 3 tokens hold three blocks; 40 more for b need three more: refused, nothing changes.
    let big = vec![1u32; 40];
    let err = batch
        .forward_last(&[(a, &[5]), (b, &big)])
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "KV cache full: 41 new tokens do not fit in the batch's 64 tokens (16 free)"
    );
    assert_eq!((batch.position(a), batch.position(b)), (20, 3));
    let err = batch
        .forward_last(&[(a, &[5]), (b, &[512])])
        .unwrap_err()
        .to_string();
    assert_eq!(err, "token id 512 is outside the vocabulary (0..512)");
    let err = batch
        .forward_last(&[(a, &[5]), (a, &[6])])
        .unwrap_err()
        .to_string();
    assert_eq!(err, "sequence 0 is fed twice in one call");
    let err = batch.forward_last(&[(7, &[5])]).unwrap_err().to_string();
    assert_eq!(err, "no sequence 7 in this batch");
    assert_eq!((batch.position(a), batch.position(b)), (20, 3));
    // Closing b frees its block: c takes it, then one more; a continues as if nothing had happened.
    batch.close(b);
    let c = batch.open();
    let again = batch.forward_last(&[(c, &p[..3])]).unwrap();
    assert!(max_abs_diff(&again[0], &first[1]) <= tolerance(DType::F32));
    batch.forward_last(&[(a, &[5]), (c, &big[..20])]).unwrap();
    let mut alone = model.session();
    alone.forward_last(&p[..20]).unwrap();
    let want = alone.forward_last(&[5, 6]).unwrap();
    batch.truncate(a, 21);
    let got = batch.forward_last(&[(a, &[6])]).unwrap();
    assert!(max_abs_diff(&got[0], &want) <= tolerance(DType::F32));
}

/// A fork holds its parent's first tokens without recomputing them (whole cache blocks shared, a partial
/// one copied): fork and parent, fed different continuations together, each give the logits of a fresh
/// session fed the same tokens, and the parent's later tokens never leak into the fork (nor back).
#[test]
fn a_fork_continues_as_a_fresh_sequence_and_leaves_its_parent_alone() {
    let g = golden("dense_gqa");
    let tmp = tempfile::tempdir().unwrap();
    let cfg = q3c_models::resolve(g.dir.to_str().unwrap()).unwrap();
    let graph = fused_graph(&cfg, "all");
    let prompt = &prompts(g.vocab)[2]; // 70 tokens
    for kind in artifact_kinds() {
        let so = compile_graph_kv(
            kind,
            &graph,
            &cfg,
            tmp.path(),
            MAX_TOKENS,
            "all",
            DType::F16,
        );
        let model = CompiledModel::load(&so, &g.dir, 2).unwrap();
        let reference = Model::Reference {
            model: Box::new(reference_model("dense_gqa")),
            eos_token_ids: vec![],
        };
        let compiled = Model::Compiled(Box::new(model));
        for (what, model) in [(kind, &compiled), ("reference", &reference)] {
            let mut batch = model.batch(1024);
            let parent = batch.open();
            batch.forward_last(&[(parent, &prompt[..40])]).unwrap();
            // Inside a block (37), at a block boundary (32), and nothing (0).
            for len in [37, 32, 0] {
                let fork = batch.fork(parent, len).unwrap();
                assert_eq!(batch.position(fork), len);
                let (a, b) = (&prompt[40..45], &prompt[len..len + 3]);
                let got = batch.forward_last(&[(parent, a), (fork, b)]).unwrap();
                let alone = |ids: &[u32]| model.session().forward_last(ids).unwrap();
                let want_parent = alone(&prompt[..45]);
                let want_fork = alone(&prompt[..len + 3]);
                let tol = tolerance(DType::F16);
                assert!(
                    max_abs_diff(&got[0], &want_parent) <= tol,
                    "{what}, fork at {len}: parent"
                );
                assert!(
                    max_abs_diff(&got[1], &want_fork) <= tol,
                    "{what}, fork at {len}: fork {}",
                    max_abs_diff(&got[1], &want_fork)
                );
                batch.close(fork);
                batch.truncate(parent, 40);
            }
            assert!(batch.fork(99, 1).is_err());
        }
    }
}
