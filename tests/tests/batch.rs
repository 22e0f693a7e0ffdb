//! Several sequences fed together ([`Batch`]): every artifact kind, with f32 and f16 KV caches, against
//! separate sessions of the same artifact fed the same tokens, and the reference executor's batch against
//! its sessions.
//!
//! The tolerances, and why: `q3c_tests::batching`.

use q3c_ir::DType;
use q3c_runtime::{Batch, CompiledModel, Model, Session};
use q3c_tests::batching::*;
use q3c_tests::*;

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
