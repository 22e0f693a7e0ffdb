//! The compiled `.so` (every backend in the build) against transformers and the reference executor, on 1 and 2 threads.

use q3c_ir::DType;
use q3c_runtime::{CompiledModel, Residency, Session};
use q3c_tests::*;

#[test]
fn every_fixture_matches_transformers_through_the_compiled_so() {
    for name in FIXTURES {
        let g = golden(name);
        let tmp = tempfile::tempdir().unwrap();
        let reference = reference_model(name)
            .session()
            .forward(&g.prompt_ids)
            .unwrap();
        for (backend, threads) in artifact_kinds().into_iter().flat_map(|b| [(b, 1), (b, 2)]) {
            let so = compile_by(backend, &g.dir, tmp.path(), 64, "none");
            let model = CompiledModel::load(&so, &g.dir, threads).unwrap();
            let logits = model.session().forward(&g.prompt_ids).unwrap();
            let vs_hf = max_abs_diff(&logits.data, &g.logits);
            let vs_ref = max_abs_diff(&logits.data, &reference.data);
            assert!(
                vs_hf <= LOGIT_TOLERANCE,
                "{name}, {backend}, {threads} threads: max |dlogit| vs transformers {vs_hf:e}"
            );
            assert!(
                vs_ref <= 1e-4,
                "{name}, {backend}, {threads} threads: max |dlogit| vs reference {vs_ref:e}"
            );
            let ids = greedy_continuation(&mut model.session(), &g);
            assert_eq!(ids, g.greedy_ids, "{name}, {backend}, {threads} threads");
            eprintln!(
                "{name}, {backend}, {threads} threads: vs transformers {vs_hf:.2e}, vs reference {vs_ref:.2e}"
            );
        }
    }
}

/// `Session::truncate` keeps a prefix of the KV cache: after feeding another continuation, cutting back to
/// the shared prefix and feeding the rest of the prompt gives, bit for bit, the logits of a fresh session fed
/// the prefix and the rest in the same two calls, on both executors.
#[test]
fn a_truncated_session_continues_as_a_fresh_one() {
    let g = golden("moe");
    let tmp = tempfile::tempdir().unwrap();
    let so = compile_by(backends()[0], &g.dir, tmp.path(), 64, "all");
    let compiled = CompiledModel::load(&so, &g.dir, 2).unwrap();
    let reference = reference_model("moe");
    let prompt = &g.prompt_ids;
    let keep = prompt.len() / 2;
    let detour: Vec<u32> = prompt[keep..]
        .iter()
        .map(|&i| (i + 1) % g.vocab as u32)
        .collect();
    type Pair<'a> = (&'static str, Box<dyn Session + 'a>, Box<dyn Session + 'a>);
    let sessions: [Pair; 2] = [
        (
            "compiled",
            Box::new(compiled.session()),
            Box::new(compiled.session()),
        ),
        (
            "reference",
            Box::new(reference.session()),
            Box::new(reference.session()),
        ),
    ];
    for (what, mut fresh, mut reused) in sessions {
        fresh.forward(&prompt[..keep]).unwrap();
        let want = fresh.forward(&prompt[keep..]).unwrap();
        reused.forward(&prompt[..keep]).unwrap();
        reused.forward(&detour).unwrap();
        reused.truncate(keep);
        assert_eq!(reused.position(), keep);
        let got = reused.forward(&prompt[keep..]).unwrap();
        assert_eq!(reused.position(), prompt.len());
        assert_eq!(got.data.len(), (prompt.len() - keep) * want.vocab);
        assert_eq!(max_abs_diff(&got.data, &want.data), 0.0, "{what}");
    }
}

/// A half-precision or 8-bit KV cache through every artifact kind, on every fixture, token by token and
/// in chunks: f16 (`--kv-dtype f16`, the default for bf16/f16 checkpoints), bf16 and q8. Each K and V element
/// is rounded once, to nearest even: relative error at most u = 2⁻¹¹ for f16 (11 significant bits) and 2⁻⁸
/// for bf16 (8 bits). f16's K and V alone are held to 1/512 of the logits' scale against the reference (f32
/// cache), the bound of the bf16-activation test (1/128 for 2⁻⁹ errors on every activation) cut by 4 for
/// the 4× smaller unit; bf16's u is 8× f16's, so 8/512 = 1/64. A q8 element is off by at most half a step
/// of its group's largest magnitude / 127: 2⁻⁸ of that magnitude, bf16's unit of the element itself, but
/// of the largest element rather than each (smaller elements fare worse): twice bf16's bound, 1/32. The
/// result must differ from the f32 cache's (the narrower path ran). The greedy continuation must be
/// transformers' with f16; with bf16 and q8, for as long as each step's top two logits are more than
/// twice the bound apart (a closer pair may swap under that rounding: such a step ends the comparison,
/// and the test says so).
#[test]
fn half_precision_kv_caches_stay_within_their_rounding() {
    for (kv, share) in [(DType::F16, 512.0), (DType::BF16, 64.0), (DType::Q8, 32.0)] {
        for name in FIXTURES {
            let g = golden(name);
            let tmp = tempfile::tempdir().unwrap();
            let cfg = q3c_models::resolve(g.dir.to_str().unwrap()).unwrap();
            let graph = fused_graph(&cfg, "all");
            let (want, scale) = reference_logits(name, &g.prompt_ids);
            let bound = scale / share;
            for backend in artifact_kinds() {
                let so = compile_graph_kv(backend, &graph, &cfg, tmp.path(), 8, "all", kv);
                let model = CompiledModel::load(&so, &g.dir, 2).unwrap();
                assert_eq!(model.manifest().kv.dtype, kv.to_string());
                // 8 tokens per call: the prompt runs in chunks, each reading the rows the ones before wrote.
                let got = model.session().forward(&g.prompt_ids).unwrap().data;
                let diff = max_abs_diff(&got, &want);
                let f32_dir = tempfile::tempdir().unwrap();
                let f32_so = compile_graph(backend, &graph, &cfg, f32_dir.path(), 8, "all");
                let exact = CompiledModel::load(&f32_so, &g.dir, 2).unwrap();
                let exact = exact.session().forward(&g.prompt_ids).unwrap().data;
                eprintln!("{name}, {backend}: {kv} KV max |dlogit| {diff:e} (scale {scale})");
                assert!(diff <= bound, "{name}, {backend}, {kv}: {diff:e}");
                assert!(
                    max_abs_diff(&got, &exact) > 0.0,
                    "{name}, {backend}: {kv} path did not run"
                );
                let what = format!("{name}, {backend}, {kv}");
                match kv {
                    DType::F16 => assert_eq!(
                        greedy_continuation(&mut model.session(), &g),
                        g.greedy_ids,
                        "{what}: greedy ids"
                    ),
                    _ => greedy_within(&mut model.session(), &g, 2.0 * bound, &what),
                }
            }
        }
    }
}

/// A q8 KV cache whose groups are narrower than a vector (head_dim 8: groups of 8, against 16 lanes on
/// AVX-512 — its rows are widened element by element), on every artifact kind: a random checkpoint of the
/// `dense_gqa` shape with head_dim 8, token by token and in chunks, held to the q8 bound above (1/32 of the
/// logits' scale) against the reference executor, and differing from the f32 cache's result.
#[test]
fn q8_kv_rows_with_groups_narrower_than_a_vector() {
    let (mut cfg, _) = q3c_tests::open_fixture("dense_gqa");
    cfg.head_dim = 8;
    let tmp = tempfile::tempdir().unwrap();
    q3c_models::random::write_checkpoint(&cfg, q3c_models::DType::F32, 11, tmp.path(), None)
        .unwrap();
    let graph = q3c_compiler::lower(&cfg).unwrap();
    let ckpt = q3c_models::Checkpoint::open(tmp.path()).unwrap();
    let reference =
        q3c_runtime::ReferenceModel::new(graph.clone(), &ckpt, q3c_compiler::LOGITS).unwrap();
    let prompt: Vec<u32> = (0..40).map(|i| (i * 37 % cfg.vocab_size) as u32).collect();
    let want = reference.session().forward(&prompt).unwrap().data;
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for backend in artifact_kinds() {
        let run = |kv: DType| {
            let out = tempfile::tempdir().unwrap();
            let so = compile_graph_kv(backend, &graph, &cfg, out.path(), 8, "none", kv);
            let model = CompiledModel::load(&so, tmp.path(), 2).unwrap();
            model.session().forward(&prompt).unwrap().data
        };
        let (exact, got) = (run(DType::F32), run(DType::Q8));
        let diff = max_abs_diff(&got, &want);
        eprintln!("head_dim 8, {backend}: q8 KV max |dlogit| {diff:e} (scale {scale})");
        assert!(max_abs_diff(&exact, &want) <= 1e-3, "{backend}: f32 KV");
        assert!(diff <= scale / 32.0, "{backend}: q8 KV {diff:e}");
        assert!(
            max_abs_diff(&got, &exact) > 0.0,
            "{backend}: q8 path did not run"
        );
    }
}

/// Greedy decoding from the prompt equals transformers' ids for as long as each step's top two logits are
/// more than `margin` apart (a closer pair may swap under the rounding being tested).
fn greedy_within(s: &mut dyn Session, g: &Golden, margin: f32, what: &str) {
    let mut row = s.forward_last(&g.prompt_ids).unwrap();
    for (step, &want) in g.greedy_ids.iter().enumerate() {
        let mut sorted = row.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        if sorted[0] - sorted[1] <= margin {
            eprintln!("{what}: greedy ids compared for {step} steps (then a top-two gap within {margin:e})");
            return;
        }
        let got = q3c_runtime::generate::argmax(&row);
        assert_eq!(got, want, "{what}: greedy id {step}");
        row = s.forward_last(&[got]).unwrap();
    }
}

#[test]
fn weights_copied_or_read_in_place_give_identical_logits() {
    let tmp = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        let g = golden(name);
        let so = compile_by(backends()[0], &g.dir, tmp.path(), 64, "none");
        let [copied, mapped] = [Residency::Copied, Residency::Mapped].map(|r| {
            let model = CompiledModel::load_with(&so, &g.dir, 2, r).unwrap();
            let logits = model.session().forward(&g.prompt_ids).unwrap().data;
            logits
        });
        assert!(
            max_abs_diff(&copied, &g.logits) <= LOGIT_TOLERANCE,
            "{name}"
        );
        assert_eq!(copied, mapped, "{name}");
    }
}

#[test]
fn prompts_longer_than_one_call_are_chunked_and_decoding_matches() {
    let g = golden("yarn");
    let tmp = tempfile::tempdir().unwrap();
    // Three tokens per call: the 24-token prompt takes eight calls.
    let so = compile_to(&g.dir, tmp.path(), 3);
    let model = CompiledModel::load(&so, &g.dir, 2).unwrap();
    let full = model.session().forward(&g.prompt_ids).unwrap();
    assert!(max_abs_diff(&full.data, &g.logits) <= LOGIT_TOLERANCE);
    let mut s = model.session();
    let mut rows = s.forward(&g.prompt_ids[..5]).unwrap().data;
    for &id in &g.prompt_ids[5..] {
        rows.extend(s.forward(&[id]).unwrap().data);
    }
    assert!(max_abs_diff(&rows, &full.data) <= 1e-5);
    assert_eq!(s.position(), g.prompt_ids.len());
    // Only the last row, computed alone across the same eight calls, is the full forward's last row.
    let mut s = model.session();
    let last = s.forward_last(&g.prompt_ids).unwrap();
    assert_eq!(s.position(), g.prompt_ids.len());
    assert!(max_abs_diff(&last, full.last()) <= 1e-6);
}

#[test]
fn sessions_hold_their_own_cache_and_refuse_bad_ids_and_overflow() {
    let g = golden("moe");
    let tmp = tempfile::tempdir().unwrap();
    let so = compile_to(&g.dir, tmp.path(), 16);
    let model = CompiledModel::load(&so, &g.dir, 2).unwrap();
    let mut a = model.session();
    let mut b = model.session_with_capacity(4);
    let first = a.forward(&g.prompt_ids).unwrap();
    b.forward(&g.prompt_ids[..4]).unwrap();
    let err = b.forward(&[1]).unwrap_err().to_string();
    assert_eq!(
        err,
        "context full: 4 cached + 1 new tokens exceed the session's capacity of 4"
    );
    let err = a.forward(&[3, 512]).unwrap_err().to_string();
    assert_eq!(err, "token id 512 is outside the vocabulary (0..512)");
    assert_eq!(a.position(), g.prompt_ids.len());
    a.reset();
    assert_eq!(a.forward(&g.prompt_ids).unwrap(), first);
}

#[test]
fn jit_compiled_code_matches_transformers_too() {
    for name in FIXTURES {
        let g = golden(name);
        for threads in [1, 2] {
            let model = jit_model(name, threads);
            let logits = model.session().forward(&g.prompt_ids).unwrap();
            let diff = max_abs_diff(&logits.data, &g.logits);
            assert!(
                diff <= LOGIT_TOLERANCE,
                "{name}, {threads} threads (jit): {diff:e}"
            );
            assert_eq!(
                greedy_continuation(&mut model.session(), &g),
                g.greedy_ids,
                "{name} (jit)"
            );
        }
    }
}

/// A fixture compiled fully fused by the LLVM backend with `opts` (64 tokens per call), loaded on 2 threads.
#[cfg(feature = "llvm")]
fn llvm_model(
    g: &Golden,
    opts: q3c_backend_llvm::CompileOptions,
) -> (CompiledModel, tempfile::TempDir) {
    let cfg = q3c_models::resolve(g.dir.to_str().unwrap()).unwrap();
    let opts = q3c_backend_llvm::CompileOptions {
        max_tokens_per_call: 64,
        fusion: "all".into(),
        ..opts
    };
    let graph = fused_graph(&cfg, &opts.fusion);
    let compiled = q3c_backend_llvm::compile(&graph, &cfg, q3c_compiler::LOGITS, &opts).unwrap();
    load_object(&compiled.object, g)
}

/// A compiled object linked into a `.so` in a temporary directory (returned, to be kept alive) and loaded
/// with the weights of `g` on 2 threads.
#[cfg(feature = "llvm")]
fn load_object(object: &[u8], g: &Golden) -> (CompiledModel, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let so = tmp.path().join("model.so");
    q3c_backend_common::link_shared(object, &so).unwrap();
    (CompiledModel::load(&so, &g.dir, 2).unwrap(), tmp)
}

/// `--bf16-activations` (LLVM, AVX512_BF16): prefill products over bf16 weights round the activations to bf16.
/// That is a different computation, so it is held to the error bf16 rounding explains, not to 1e-3: each
/// activation carries a relative error of at most 2⁻⁹, and the test allows 2⁻⁷ of the logits' scale after
/// all layers. It must also really differ from the f32 path (else the dot-product path did not run).
#[cfg(feature = "llvm")]
#[test]
fn bf16_activations_stay_within_bf16_rounding_of_transformers() {
    if !q3c_tests::cpu_feature("avx512bf16", "bf16 activations") {
        return;
    }
    let g = golden("tied_bf16");
    let (model, _dir) = llvm_model(
        &g,
        q3c_backend_llvm::CompileOptions {
            bf16_activations: true,
            ..Default::default()
        },
    );
    assert_eq!(model.manifest().matmul_activations, "bf16");
    let logits = model.session().forward(&g.prompt_ids).unwrap();
    let scale = g.logits.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = max_abs_diff(&logits.data, &g.logits);
    eprintln!("bf16 activations: max |dlogit| {diff:e}, logit scale {scale}");
    assert!(
        diff > 1e-6,
        "identical to f32: the bf16 dot products did not run"
    );
    assert!(
        diff <= scale / 128.0,
        "bf16 activations: {diff:e} vs transformers (scale {scale})"
    );
}

/// Random bf16 weights (seed `seed`) of fixture `name`'s shape in a temporary directory (returned, to be kept
/// alive), the fixture's golden data pointing there, and the reference executor's logits over `ids` on them.
#[cfg(feature = "llvm")]
fn random_bf16_reference(
    name: &str,
    seed: u64,
    ids: &[u32],
) -> (Golden, Vec<f32>, tempfile::TempDir) {
    let (cfg, _) = q3c_tests::open_fixture(name);
    let tmp = tempfile::tempdir().unwrap();
    q3c_models::random::write_checkpoint(&cfg, q3c_models::DType::BF16, seed, tmp.path(), None)
        .unwrap();
    let ckpt = q3c_models::Checkpoint::open(tmp.path()).unwrap();
    let reference = q3c_runtime::ReferenceModel::new(
        q3c_compiler::lower(&cfg).unwrap(),
        &ckpt,
        q3c_compiler::LOGITS,
    )
    .unwrap();
    let want = reference.session().forward(ids).unwrap().data;
    let g = Golden {
        dir: tmp.path().to_path_buf(),
        ..golden(name)
    };
    (g, want, tmp)
}

/// `--bf16-activations` on a mixture-of-experts model with bf16 weights: the grouped expert products stage
/// their gathered rows as bf16 too. Random bf16 weights of the `moe` fixture's shape (hidden 64, expert
/// width 32: both multiples of 32, so every product, dense and expert, takes the bf16 path) against the
/// reference executor on the same checkpoint, held to the same bf16-rounding bound as above; it must differ
/// from the f32 path, which itself stays within 1e-3 of the reference.
#[cfg(feature = "llvm")]
#[test]
fn bf16_activations_cover_grouped_expert_products() {
    if !q3c_tests::cpu_feature("avx512bf16", "bf16 activations") {
        return;
    }
    let (cfg, _) = q3c_tests::open_fixture("moe");
    let prompt: Vec<u32> = (0..40).map(|i| (i * 37 % cfg.vocab_size) as u32).collect();
    let (g, want, _tmp) = random_bf16_reference("moe", 7, &prompt);
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let run = |bf16_activations| {
        let opts = q3c_backend_llvm::CompileOptions {
            bf16_activations,
            ..Default::default()
        };
        let (model, _dir) = llvm_model(&g, opts);
        let got = model.session().forward(&prompt).unwrap().data;
        max_abs_diff(&got, &want)
    };
    let (exact, rounded) = (run(false), run(true));
    eprintln!("moe, bf16 weights: max |dlogit| f32 {exact:e}, bf16 activations {rounded:e} (scale {scale})");
    assert!(exact <= 1e-3, "f32 activations: {exact:e} vs the reference");
    assert!(
        rounded > 1e-6,
        "identical to f32: the bf16 dot products did not run"
    );
    assert!(
        rounded <= scale / 128.0,
        "bf16 activations: {rounded:e} vs the reference (scale {scale})"
    );
}

/// bf16 activations in both of the CPU tunings (`CpuTuning::bf16_tiles`): prefill's register tiles on
/// `vdpbf16ps` (AMD Zen, `znver4`) or as f32 FMAs over the unrounded rows staged beside the bf16 ones (every
/// other CPU, here the host's when it is not a Zen), decode's streaming blocks on `vdpbf16ps` in both. A
/// 40-token prompt (tiles), then 8 tokens one at a time (streaming blocks), on random bf16 weights of the
/// `dense_gqa` fixture's shape, against the reference executor: each within the bf16-rounding bound above
/// (2⁻⁷ of the logits' scale); and the prefill of the two tunings must differ (else the f32 tiles did not run).
#[cfg(feature = "llvm")]
#[test]
fn bf16_activations_in_both_cpu_tunings_stay_within_bf16_rounding() {
    if !q3c_tests::cpu_feature("avx512bf16", "bf16 activations") {
        return;
    }
    let (cfg, _) = q3c_tests::open_fixture("dense_gqa");
    let ids: Vec<u32> = (0..48).map(|i| (i * 53 % cfg.vocab_size) as u32).collect();
    let (g, want, _tmp) = random_bf16_reference("dense_gqa", 11, &ids);
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let host = q3c_backend_llvm::host_cpu();
    let mut prefills = Vec::new();
    for target in ["znver4", "native"] {
        let opts = q3c_backend_llvm::CompileOptions {
            bf16_activations: true,
            target_cpu: target.into(),
            ..Default::default()
        };
        let (model, _dir) = llvm_model(&g, opts);
        let mut s = model.session();
        let mut got = s.forward(&ids[..40]).unwrap().data;
        let prefill = max_abs_diff(&got, &want[..got.len()]);
        for &id in &ids[40..] {
            got.extend(s.forward(&[id]).unwrap().data);
        }
        let all = max_abs_diff(&got, &want);
        eprintln!(
            "bf16 activations for {target} ({host} here): max |dlogit| prefill {prefill:e}, with decode \
             {all:e} (scale {scale})"
        );
        assert!(
            all <= scale / 128.0,
            "{target}: {all:e} vs the reference (scale {scale})"
        );
        prefills.push(got[..got.len() - 8 * cfg.vocab_size].to_vec());
    }
    if host.starts_with("znver") {
        eprintln!("skipped: f32 prefill tiles with bf16 activations are not the tuning of {host}, the host");
    } else {
        assert!(
            max_abs_diff(&prefills[0], &prefills[1]) > 1e-6,
            "the two tunings prefilled alike: the f32 tiles did not run"
        );
    }
}

/// `--quantize q4` (LLVM, AVX512-VNNI): matrices of linear and expert products in 4-bit groups of 32 (the
/// logits matrix in 6 bits), activations in q8. The weights' own error is the format's (up to a step,
/// `max|w| / 8`, per weight: far above 1e-3 against transformers, reported below), so the kernels are held
/// to the reference executor run on the *decoded* q4 and q6 weights: what remains is the activations'
/// 8-bit quantization (and, for a tied table, its q6 logits copy, which a decoded checkpoint cannot hold
/// beside the exact embedding), bounded as in the q8 test (1/16 of the logits' scale), and it must be
/// smaller than the distance to transformers (else the decoded weights did not explain the result).
#[cfg(feature = "llvm")]
#[test]
fn q4_weights_match_the_reference_on_their_decoded_values() {
    if !q3c_tests::cpu_feature("avx512vnni", "q4 weights") {
        return;
    }
    // Every fixture, dense and MoE (the decoded values, `d · q` with an f16 `d`, are exact in f32; the
    // runtime quantizes the same widened values the test decodes).
    for name in FIXTURES {
        let g = golden(name);
        let (model, _dir) = llvm_model(
            &g,
            q3c_backend_llvm::CompileOptions {
                quantize: Some(q3c_ir::DType::Q4),
                ..Default::default()
            },
        );
        let weights = &model.manifest().weights;
        let read_as = |kind: &str| -> std::collections::HashSet<String> {
            weights
                .iter()
                .filter(|w| w.kernel_dtype == kind)
                .map(|w| w.name.clone())
                .collect()
        };
        let (q4, q6) = (read_as("q4"), read_as("q6"));
        assert!(!q4.is_empty(), "{name}: no weight bound as q4");
        assert_eq!(q6.len(), 1, "{name}: the logits matrix alone is q6");
        let tied = weights.iter().filter(|w| q6.contains(&w.name)).count() > 1;
        if name == "moe" {
            assert!(
                q4.iter().any(|n| n.contains(".experts.")),
                "{name}: experts"
            );
        }
        let decoded = tempfile::tempdir().unwrap();
        let mut formats: std::collections::HashMap<_, _> =
            q4.iter().map(|n| (n.clone(), DType::Q4)).collect();
        if !tied {
            formats.extend(q6.iter().map(|n| (n.clone(), DType::Q6)));
        }
        write_decoded(name, &formats, decoded.path());
        let (cfg, _) = open_fixture(name);
        let ckpt = q3c_models::Checkpoint::open(decoded.path()).unwrap();
        let graph = q3c_compiler::lower(&cfg).unwrap();
        let reference =
            q3c_runtime::ReferenceModel::new(graph, &ckpt, q3c_compiler::LOGITS).unwrap();
        let want = reference.session().forward(&g.prompt_ids).unwrap().data;
        let got = model.session().forward(&g.prompt_ids).unwrap().data;
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let (diff, vs_hf) = (max_abs_diff(&got, &want), max_abs_diff(&got, &g.logits));
        let ids = greedy_continuation(&mut model.session(), &g);
        let same = ids
            .iter()
            .zip(&g.greedy_ids)
            .take_while(|(a, b)| a == b)
            .count();
        eprintln!(
            "{name}: q4 ({} weights, logits matrix q6{}) max |dlogit| {diff:e} vs the decoded weights, \
             {vs_hf:e} vs transformers (scale {scale}); greedy ids: first {same} of {} as transformers",
            q4.len(),
            if tied { ", tied: not decoded" } else { "" },
            g.greedy_ids.len()
        );
        assert!(
            diff <= scale / 16.0,
            "{name}: {diff:e} vs the decoded weights"
        );
        assert!(
            diff < vs_hf,
            "{name}: the decoded weights do not explain the result"
        );
    }
}

/// `--quantize q8|q4` on GPUs, checked through the CPU emulation of the GPU flavour (the same launch plan,
/// panels and scales, and a GPU lane's slice of each group read by one thread playing every lane): the
/// products widen the weights in registers and read f32 activations, so against the reference executor run
/// on the *decoded* weights (`d · q`, every quantized matrix, the logits matrix's q6 under q4 too) only f32
/// rounding of sums taken in another order remains — the fixtures' 1e-3 holds with orders of magnitude to
/// spare (`check_against_decoded_weights`, on `UNTIED_FIXTURES`).
#[cfg(feature = "llvm")]
#[test]
fn quantized_gpu_products_match_the_reference_on_decoded_weights() {
    for name in UNTIED_FIXTURES {
        let g = golden(name);
        for format in [DType::Q8, DType::Q4] {
            let (model, _dir) = gpu_emulation_model(&g, Some(format), false);
            if format == DType::Q4 {
                let q6 = model
                    .manifest()
                    .weights
                    .iter()
                    .filter(|w| w.kernel_dtype == "q6");
                assert_eq!(q6.count(), 1, "{name}: the logits matrix is q6 under q4");
            }
            // Token by token from the start: one activation row, a decode step's path.
            check_against_decoded_weights(name, format, &model, 0, "GPU emulation");
        }
    }
}

/// The GPU flavour of the model in `g.dir` compiled for this CPU (sm_90, fully fused, 80 tokens per call, f32
/// KV cache; products over `quantize`d weights, and bf16 activations as asked), loaded on 2 threads.
#[cfg(feature = "llvm")]
fn gpu_emulation_model(
    g: &Golden,
    quantize: Option<DType>,
    bf16_activations: bool,
) -> (CompiledModel, tempfile::TempDir) {
    let cfg = q3c_models::resolve(g.dir.to_str().unwrap()).unwrap();
    let graph = fused_graph(&cfg, "all");
    let opts = q3c_backend_llvm::PtxOptions {
        gpu: "sm_90".into(),
        max_tokens_per_call: 80,
        fusion: "all".into(),
        kv_dtype: DType::F32,
        quantize,
        bf16_activations,
    };
    let compiled =
        q3c_backend_llvm::compile_gpu_emulation(&graph, &cfg, q3c_compiler::LOGITS, &opts).unwrap();
    load_object(&compiled.object, g)
}

/// bf16 activations on GPUs (what `--target cuda` compiles a bf16 checkpoint with by default): products over
/// bf16 weights round their activations to bf16; calls of many rows launch tensor-core kernels (`mma.sync`
/// tiles, named in the launch plan's `many_rows`), the others FMA blocks. Checked through the CPU emulation
/// of the GPU flavour, whose kernels play the tensor-core tiles lane by lane in every call (each lane's
/// fragment loads, `mma` as the PTX ISA defines it over the lanes' registers, each lane's stores): a wrong
/// index in a fragment fails here. On random bf16 weights of `dense_gqa`'s shape (k 64 and 128: chunks of
/// 64, one turn of two) and of `moe`'s (the expert products, whose items are panels of one expert's rows,
/// round as the GPU's FMA blocks do), and on `tied_bf16` (k 96 in its down projection: chunks of 16 after
/// the 64; K and V projections of one panel; the tied logits matrix): a 72-token prefill (the launcher picks
/// the tensor-core kernels, from 64 rows: five slabs of 16 rows, the last partial), then 8 tokens one at a
/// time (the plain kernels, whose emulation plays the same tiles over one row), against the reference
/// executor within the bound of the CPU's bf16 activations (each activation rounded with a relative error
/// of at most 2⁻⁹; 2⁻⁷ of the logits' scale after all layers); and unlike the f32 emulation (else the
/// rounding, and so the tiles, did not run).
#[cfg(feature = "llvm")]
#[test]
fn gpu_tensor_core_tiles_stay_within_bf16_rounding_of_the_reference() {
    for name in ["dense_gqa", "moe", "tied_bf16"] {
        let (cfg, _) = q3c_tests::open_fixture(name);
        let ids: Vec<u32> = (0..80).map(|i| (i * 53 % cfg.vocab_size) as u32).collect();
        let (g, want, _tmp) = match name {
            "tied_bf16" => {
                let (want, _) = reference_logits(name, &ids);
                (golden(name), want, None)
            }
            _ => {
                let (g, want, tmp) = random_bf16_reference(name, 5, &ids);
                (g, want, Some(tmp))
            }
        };
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let run = |bf16_activations| {
            let (model, _dir) = gpu_emulation_model(&g, None, bf16_activations);
            let manifest = model.manifest();
            let launch = manifest.launch.as_ref().expect("a launch plan");
            let tensor = launch.dispatches.iter().filter_map(|d| d.many_rows).count();
            if bf16_activations {
                assert_eq!(manifest.matmul_activations, "bf16");
                assert!(tensor > 0, "{name}: no product has a tensor-core kernel");
                for d in launch.dispatches.iter().filter_map(|d| d.many_rows) {
                    assert!(launch.kernels[d.kernel].ends_with("_tc"));
                    assert!(d.from > 1 && d.from <= 64, "{name}: from {}", d.from);
                }
            } else {
                assert_eq!(
                    tensor, 0,
                    "{name}: tensor-core kernels with f32 activations"
                );
            }
            let mut s = model.session();
            let mut got = s.forward(&ids[..72]).unwrap().data;
            for &id in &ids[72..] {
                got.extend(s.forward(&[id]).unwrap().data);
            }
            got
        };
        let (exact, rounded) = (run(false), run(true));
        let (exact_diff, diff) = (max_abs_diff(&exact, &want), max_abs_diff(&rounded, &want));
        eprintln!(
            "{name}, GPU emulation: max |dlogit| f32 {exact_diff:e}, bf16 activations {diff:e} (scale {scale})"
        );
        assert!(exact_diff <= 1e-3, "{name}: f32 activations {exact_diff:e}");
        assert!(
            max_abs_diff(&exact, &rounded) > 1e-6,
            "{name}: identical to f32: the bf16 tiles did not run"
        );
        assert!(
            diff <= scale / 128.0,
            "{name}: bf16 activations {diff:e} vs the reference (scale {scale})"
        );
    }
}

/// `--quantize q8` (LLVM, AVX512-VNNI): linear matrices in 8-bit groups of 32, activations quantized the same
/// way. Each weight and activation then carries an error of at most half a step (1/254 of its group's largest
/// magnitude); the test holds every fixture to 1/16 of the logits' scale — far looser than 1e-3, because this
/// is a lossy format — and requires that the result differs from the exact path (the q8 kernels ran).
#[cfg(feature = "llvm")]
#[test]
fn q8_weights_stay_within_quantization_error_of_transformers() {
    if !q3c_tests::cpu_feature("avx512vnni", "q8 weights") {
        return;
    }
    for name in FIXTURES {
        let g = golden(name);
        let (model, _dir) = llvm_model(
            &g,
            q3c_backend_llvm::CompileOptions {
                quantize: Some(q3c_ir::DType::Q8),
                ..Default::default()
            },
        );
        let quantized = model
            .manifest()
            .weights
            .iter()
            .filter(|w| w.kernel_dtype == "q8")
            .count();
        assert!(quantized > 0, "{name}: no weight bound as q8");
        // Expert matrices too (per expert, grouped products on VNNI), where their shapes allow q8 panels.
        let cfg = q3c_models::resolve(g.dir.to_str().unwrap()).unwrap();
        if let Some(moe) = &cfg.moe {
            let panels = |n: usize, k: usize| n.is_multiple_of(16) && k.is_multiple_of(32);
            let (h, i) = (cfg.hidden_size, moe.moe_intermediate_size);
            if panels(i, h) && panels(h, i) {
                let experts: Vec<_> = model
                    .manifest()
                    .weights
                    .iter()
                    .filter(|w| w.name.contains(".experts."))
                    .collect();
                assert!(!experts.is_empty());
                assert!(
                    experts.iter().all(|w| w.kernel_dtype == "q8"),
                    "{name}: expert matrices left unquantized"
                );
            }
        }
        let logits = model.session().forward(&g.prompt_ids).unwrap();
        let scale = g.logits.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = max_abs_diff(&logits.data, &g.logits);
        eprintln!("{name}: q8 ({quantized} weights) max |dlogit| {diff:e}, logit scale {scale}");
        assert!(
            diff > 1e-5,
            "{name}: identical to f32: the q8 kernels did not run"
        );
        assert!(
            diff <= scale / 16.0,
            "{name}: q8 {diff:e} vs transformers (scale {scale})"
        );
    }
}

/// A manifest asking for a weight form the runtime cannot produce is refused with one precise error, before
/// any code runs.
#[test]
fn weights_the_runtime_cannot_bind_as_asked_are_refused() {
    let (cfg, _) = open_fixture("dense_gqa");
    let dir = fixtures_dir().join("dense_gqa");
    let graph = q3c_compiler::lower(&cfg).unwrap();
    let opts = q3c_backend_cranelift::CompileOptions::default();
    let jit =
        q3c_backend_cranelift::compile_jit(&graph, &cfg, q3c_compiler::LOGITS, &opts).unwrap();
    let matrix = jit
        .manifest
        .weights
        .iter()
        .position(|w| w.name.ends_with("mlp.down_proj.weight"))
        .unwrap();
    let norm = jit
        .manifest
        .weights
        .iter()
        .position(|w| w.shape.len() == 1)
        .unwrap();
    let cases: [(usize, &str, &str, &str); 3] = [
        (matrix, "q8", "row-major", "is laid out as \"row-major\""),
        (norm, "q8", "panels-16", "cannot be bound as q8"),
        (matrix, "f8", "row-major", "unknown kernel dtype f8"),
    ];
    for (i, kernel_dtype, layout, expected) in cases {
        let mut manifest = jit.manifest.clone();
        manifest.weights[i].kernel_dtype = kernel_dtype.into();
        manifest.weights[i].layout = layout.into();
        // SAFETY: binding fails before `forward` could run.
        let err = unsafe {
            CompiledModel::from_code(
                jit.forward,
                manifest,
                Box::new(()),
                &dir,
                1,
                Residency::Copied,
            )
        }
        .err()
        .expect("binding must fail")
        .to_string();
        assert!(err.contains(expected), "{kernel_dtype}/{layout}: {err}");
    }
}
