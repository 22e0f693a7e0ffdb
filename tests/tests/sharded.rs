//! Sharded models (`q3c compile --shards N`) against the same model in one process, with the ranks as
//! threads of this test (`ThreadTransport`; `cli/tests/mpi.rs` runs them as MPI processes).
//!
//! Every rank's partial products are exact slices of the single-process ones; what changes is the order
//! of f32 additions: an output projection's or MLP's dot product over K inputs is summed as N partial sums
//! of K/N terms, then added across ranks. Each order is within `γ_K·Σ|terms|` of the exact sum (K ≤ 128
//! here: ~1e-5 relative), so logits must agree within 1e-4, the bound the compiled-vs-reference tests use
//! for the same cause; greedy ids must be identical. A rank binding the wrong slice, a collective summing a
//! shared head twice or gathering logits out of order moves logits by far more than that (the random
//! weights' logits are of order 1).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use q3c_compiler::MoeSplit;
use q3c_ir::DType;
use q3c_runtime::{Batch, CompiledModel, Session, ThreadTransport};
use q3c_tests::{
    backends, batching, fixtures_dir, golden, greedy_continuation, max_abs_diff, FIXTURES,
};

const MAX_TOKENS: usize = batching::MAX_TOKENS;

/// Compiles fixture `name` for `ranks` ranks with `backend` into `out`.
fn compile(backend: &str, name: &str, ranks: usize, fusion: &str, out: &Path) -> PathBuf {
    compile_split(backend, name, (ranks, MoeSplit::Features), fusion, out)
}

/// Like [`compile`], MoE layers split as `moe` says.
fn compile_split(
    backend: &str,
    name: &str,
    (ranks, moe): (usize, MoeSplit),
    fusion: &str,
    out: &Path,
) -> PathBuf {
    let (cfg, _) = q3c_tests::open_fixture(name);
    let graph = q3c_tests::sharded_graph(&cfg, ranks, moe, fusion);
    let dir = out.join(format!("{backend}-{name}-{ranks}-{}-{fusion}", moe.name()));
    std::fs::create_dir_all(&dir).unwrap();
    q3c_tests::compile_graph(backend, &graph, &cfg, &dir, MAX_TOKENS, fusion)
}

/// Runs `lead` on rank 0 of `so` loaded on `ranks` threads, the others following it; also returns each
/// rank's bytes of bound weights.
fn on_ranks<R: Send>(
    so: &Path,
    weights: &Path,
    ranks: usize,
    lead: impl FnOnce(&CompiledModel) -> R + Send,
) -> (R, Vec<usize>) {
    let mut world = ThreadTransport::world(ranks).into_iter();
    let zero = world.next().expect("rank 0");
    std::thread::scope(|s| {
        let followers: Vec<_> = world
            .map(|t| {
                s.spawn(move || {
                    let model = CompiledModel::load_rank(so, weights, 1, Arc::new(t)).unwrap();
                    model.follow().unwrap();
                    model.weight_bytes()
                })
            })
            .collect();
        let model = CompiledModel::load_rank(so, weights, 1, Arc::new(zero)).unwrap();
        let result = lead(&model);
        let mut bytes = vec![model.weight_bytes()];
        // Dropping rank 0's model tells the others to stop.
        drop(model);
        for f in followers {
            bytes.push(f.join().expect("follower"));
        }
        (result, bytes)
    })
}

/// Bytes a rank of `model` must bind: each manifest weight's — its slice's, where sharded; none for an
/// expert other ranks hold — on a cache line of its own (f32 and 16-bit weights only).
fn slice_bytes(model: &CompiledModel) -> usize {
    model
        .manifest()
        .weights
        .iter()
        .filter(|w| w.owner.is_none_or(|o| o.binds(model.rank())))
        .map(|w| {
            let size = if w.kernel_dtype == "f32" { 4 } else { 2 };
            (w.shape.iter().product::<usize>() * size).next_multiple_of(64)
        })
        .sum()
}

/// What the tests compare: the prompt's logits and the greedy continuation.
fn prompt_and_greedy(model: &CompiledModel, name: &str) -> (Vec<f32>, Vec<u32>) {
    let g = golden(name);
    let logits = model.session().forward(&g.prompt_ids).unwrap().data;
    let ids = greedy_continuation(&mut model.session(), &g);
    (logits, ids)
}

/// Runs `so` (fixture `name`) on `ranks` thread-ranks, `check` on rank 0's model first, and holds it to the
/// single-process model `single`, whose prompt logits and greedy ids are `want`: logits within 1e-4, the same
/// ids, and every rank binding the same bytes, about 1/N of one process's (plus norms and routers, whole
/// everywhere, and the heads ranks share where there are fewer than ranks).
fn check_against_one_process(
    what: &str,
    (so, name, ranks): (&Path, &str, usize),
    single: &CompiledModel,
    (want, want_ids): &(Vec<f32>, Vec<u32>),
    check: impl FnOnce(&CompiledModel) + Send,
) {
    let weights = fixtures_dir().join(name);
    let (((got, ids), want_bytes), bytes) = on_ranks(so, &weights, ranks, |m| {
        check(m);
        (prompt_and_greedy(m, name), slice_bytes(m))
    });
    assert!(bytes.iter().all(|&b| b == want_bytes), "{what}: {bytes:?}");
    let share = want_bytes as f64 / single.weight_bytes() as f64;
    let diff = max_abs_diff(&got, want);
    println!(
        "{what} over {ranks} ranks: max |dlogit| {diff:e}; weights per rank {share:.2} of one process's"
    );
    assert!(share <= 1.0 / ranks as f64 + 0.1, "{what}: {share}");
    assert!(diff <= 1e-4, "{what} over {ranks} ranks: {diff:e}");
    assert_eq!(&ids, want_ids, "{what} over {ranks} ranks");
}

#[test]
fn every_fixture_sharded_over_2_and_4_ranks_gives_the_single_process_logits() {
    let tmp = tempfile::tempdir().unwrap();
    for backend in backends() {
        for name in FIXTURES {
            let weights = fixtures_dir().join(name);
            let one = compile(backend, name, 1, "all", tmp.path());
            let single = CompiledModel::load(&one, &weights, 1).unwrap();
            let want = prompt_and_greedy(&single, name);
            assert_eq!(want.1, golden(name).greedy_ids, "{backend} {name}");
            for ranks in [2, 4] {
                let so = compile(backend, name, ranks, "all", tmp.path());
                let what = format!("{backend} {name}");
                check_against_one_process(&what, (&so, name, ranks), &single, &want, |_| {});
            }
        }
    }
}

/// Expert parallelism (`--moe-split experts`): each rank holds E/N whole experts and computes only the
/// chosen ones among them, dropping the other rows; the all-reduce after the MoE block adds the ranks'
/// experts up. Each expert's product is the single-process one, computed alike; only the order in which
/// the k chosen experts' weighted outputs are summed changes (per rank, then across ranks), so the bound is
/// the same 1e-4. A rank computing another's expert counts it twice; a dropped row left unzeroed, or an
/// expert read from the wrong table entry, moves logits by the scale of the expert outputs.
#[test]
fn expert_parallel_moe_fixtures_give_the_single_process_logits() {
    let tmp = tempfile::tempdir().unwrap();
    for backend in backends() {
        for name in ["moe", "moe_sparse_step"] {
            let weights = fixtures_dir().join(name);
            let one = compile(backend, name, 1, "all", tmp.path());
            let single = CompiledModel::load(&one, &weights, 1).unwrap();
            let want = prompt_and_greedy(&single, name);
            let (cfg, _) = q3c_tests::open_fixture(name);
            let experts = cfg.moe.as_ref().expect("a MoE fixture").num_experts;
            for ranks in [2, 4] {
                if experts % ranks != 0 {
                    let err = q3c_compiler::Sharding::new(&cfg, ranks, MoeSplit::Experts);
                    let want = format!("num_experts {experts} cannot be split over {ranks} ranks");
                    assert!(err.unwrap_err().contains(&want), "{name}");
                    continue;
                }
                let split = (ranks, MoeSplit::Experts);
                let so = compile_split(backend, name, split, "all", tmp.path());
                let what = format!("{backend} {name} expert-parallel");
                check_against_one_process(&what, (&so, name, ranks), &single, &want, |m| {
                    let owned = m.manifest().weights.iter().filter(|w| w.owner.is_some());
                    assert_eq!(
                        owned.count() % (3 * experts),
                        0,
                        "every expert has an owner"
                    );
                });
            }
        }
    }
}

#[test]
fn unfused_sharded_graphs_agree_too() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["dense_gqa", "moe", "tied_bf16"] {
        let weights = fixtures_dir().join(name);
        let one = compile("cranelift", name, 1, "none", tmp.path());
        let (want, want_ids) =
            prompt_and_greedy(&CompiledModel::load(&one, &weights, 1).unwrap(), name);
        let so = compile("cranelift", name, 2, "none", tmp.path());
        let ((got, ids), _) = on_ranks(&so, &weights, 2, |m| prompt_and_greedy(m, name));
        let diff = max_abs_diff(&got, &want);
        assert!(diff <= 1e-4, "{name}: {diff:e}");
        assert_eq!(ids, want_ids, "{name}");
    }
}

/// A batch on rank 0 — several KV pools, sequences opened, closed and forked mid-block — must reach every
/// rank: the batch equals lone sessions of the same sharded model, and a fork continues as its source would.
#[test]
fn batches_and_forks_of_a_sharded_model_match_its_sessions() {
    let tmp = tempfile::tempdir().unwrap();
    let name = "moe";
    let weights = fixtures_dir().join(name);
    let so = compile(backends()[backends().len() - 1], name, 2, "all", tmp.path());
    on_ranks(&so, &weights, 2, |model| {
        let vocab = model.manifest().vocab_size;
        let mut batch = model.batch(1024);
        batching::check_against_sessions(
            "sharded batch",
            DType::F32,
            &mut batch,
            &|| Box::new(model.session()),
            vocab,
        );
        // A fork 20 tokens in copies a partial block on every rank.
        let prompt = &batching::prompts(vocab)[0];
        let a = batch.open();
        batch.forward_last(&[(a, &prompt[..30])]).unwrap();
        let b = batch.fork(a, 20).unwrap();
        let got = batch.forward_last(&[(b, &prompt[20..25])]).unwrap();
        let mut lone = model.session();
        lone.forward(&prompt[..20]).unwrap();
        let want = lone.forward_last(&prompt[20..25]).unwrap();
        let diff = max_abs_diff(&got[0], &want);
        assert!(diff <= 1e-4, "fork: {diff:e}");
    });
}

#[test]
fn a_sharded_artifact_needs_its_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let weights = fixtures_dir().join("dense_gqa");
    let so = compile("cranelift", "dense_gqa", 2, "all", tmp.path());
    let err = CompiledModel::load(&so, &weights, 1)
        .err()
        .expect("refused");
    assert!(
        err.to_string()
            .contains("sharded over 2 ranks: run it as `mpirun -np 2"),
        "{err}"
    );
    let one = compile("cranelift", "dense_gqa", 1, "all", tmp.path());
    let world = ThreadTransport::world(2);
    let err = CompiledModel::load_rank(
        &one,
        &weights,
        1,
        Arc::new(world.into_iter().next().unwrap()),
    )
    .err()
    .expect("refused");
    assert!(
        err.to_string().contains("compile it with --shards 2"),
        "{err}"
    );
    // A rank other than 0 runs only what rank 0 sends.
    let mut world = ThreadTransport::world(2).into_iter();
    let _zero = world.next();
    let one = CompiledModel::load_rank(&so, &weights, 1, Arc::new(world.next().unwrap())).unwrap();
    let err = one.session().forward(&[1, 2]).unwrap_err();
    assert!(
        err.to_string()
            .contains("rank 1 of a sharded model runs only what rank 0 sends"),
        "{err}"
    );
    let err = q3c_compiler::Sharding::new(
        &q3c_tests::open_fixture("dense_gqa").0,
        3,
        MoeSplit::Features,
    )
    .unwrap_err();
    assert!(
        err.contains("4 attention heads cannot be split over 3 ranks"),
        "{err}"
    );
}

/// `--quantize q8|q4 --shards 2` (LLVM, AVX512-VNNI): each rank quantizes its own slices at load. A slice
/// whose rows start on a panel of 16 and columns on a group of 32 holds exactly the whole tensor's quantized
/// values (dense_gqa: every slice; it then matches one process to 2e-7); a slice too narrow for panels (the
/// MoE fixture's 16 expert features per rank, tied_bf16's 48 MLP features) stays in the checkpoint's dtype,
/// as any matrix of that shape would; split by experts instead, the MoE fixture's experts stay whole and
/// are quantized as in one process. The format's own error is tested in `tests/compiled.rs`; here the
/// sharded model is held to its single-process twin within the q8 test's bound (1/16 of the logits' scale:
/// the activations' 8-bit quantization, and those slices left exact), and must be closer to it than to
/// transformers (the same quantized weights explain it).
#[cfg(feature = "llvm")]
#[test]
fn quantized_sharded_models_match_the_single_process_quantized_model() {
    if !q3c_tests::cpu_feature("avx512vnni", "quantized sharded weights") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    for format in [DType::Q8, DType::Q4] {
        let cases = [
            ("dense_gqa", MoeSplit::Features),
            ("moe", MoeSplit::Features),
            ("moe", MoeSplit::Experts),
            ("tied_bf16", MoeSplit::Features),
        ];
        for (name, moe) in cases {
            let (cfg, _) = q3c_tests::open_fixture(name);
            let artifact = |ranks: usize| {
                let graph = q3c_tests::sharded_graph(&cfg, ranks, moe, "all");
                let opts = q3c_backend_llvm::CompileOptions {
                    max_tokens_per_call: MAX_TOKENS,
                    quantize: Some(format),
                    ..Default::default()
                };
                let c =
                    q3c_backend_llvm::compile(&graph, &cfg, q3c_compiler::LOGITS, &opts).unwrap();
                let so = tmp
                    .path()
                    .join(format!("{name}-{format}-{ranks}-{}.so", moe.name()));
                q3c_backend_common::link_shared(&c.object, &so).unwrap();
                (so, c.manifest)
            };
            let ((one, _), (two, manifest)) = (artifact(1), artifact(2));
            let quantized = manifest
                .weights
                .iter()
                .filter(|w| w.shard.is_some() && w.kernel_dtype == format.name())
                .count();
            assert!(quantized > 0, "{name} {format}: no slice bound quantized");
            // Split by experts, every expert is whole, so quantized as in one process.
            let experts = manifest.weights.iter().filter(|w| w.owner.is_some());
            assert!(
                experts.clone().all(|w| w.kernel_dtype == format.name()),
                "{name} {format}: an expert left unquantized"
            );
            assert_eq!(experts.count() > 0, moe == MoeSplit::Experts);
            let g = golden(name);
            let weights = fixtures_dir().join(name);
            let single = CompiledModel::load(&one, &weights, 1).unwrap();
            let want = single.session().forward(&g.prompt_ids).unwrap().data;
            let (got, _) = on_ranks(&two, &weights, 2, |m| {
                m.session().forward(&g.prompt_ids).unwrap().data
            });
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let (diff, vs_hf) = (max_abs_diff(&got, &want), max_abs_diff(&got, &g.logits));
            println!(
                "{name} {format} over 2 ranks ({}): max |dlogit| {diff:e} vs one process, {vs_hf:e} vs transformers (scale {scale})",
                moe.name()
            );
            assert!(
                diff <= scale / 16.0,
                "{name} {format}: {diff:e} (scale {scale})"
            );
            assert!(
                diff < vs_hf,
                "{name} {format}: {diff:e}, {vs_hf:e} vs transformers"
            );
        }
    }
}
