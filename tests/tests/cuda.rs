//! The CUDA executor (`q3c compile --target cuda`, run through the runtime's `cuda` feature) on a real
//! NVIDIA GPU: every golden fixture against transformers (max |Δlogit| ≤ [`LOGIT_TOLERANCE`] with an f32 KV
//! cache, identical greedy ids), token-by-token decoding against the full forward, an f16 cache within
//! f16 rounding (the bound and its derivation: `tests/compiled.rs`), and a batch of sequences against
//! lone sessions (`q3c_tests::batching`). Where this build has no CUDA support or this machine no NVIDIA
//! driver, each test says it is skipped; loading a CUDA artifact without a driver must then fail with one
//! clear message, which is checked instead.

#![cfg(feature = "cuda")]

use q3c_ir::DType;
use q3c_runtime::{Batch, CompiledModel, RuntimeError, Session};
use q3c_tests::batching::*;
use q3c_tests::*;

/// The GPU model of fixture `name` with a KV cache of `kv`, or `None` (said) where none can run here.
fn gpu_model(name: &str, kv: DType, dir: &std::path::Path) -> Option<CompiledModel> {
    gpu_model_with(name, kv, None, false, dir)
}

/// [`gpu_model`] with the products' matrices quantized as `quantize` says, and their activations rounded
/// to bf16 (tensor cores in calls of many rows) where `bf16_activations`.
fn gpu_model_with(
    name: &str,
    kv: DType,
    quantize: Option<DType>,
    bf16_activations: bool,
    dir: &std::path::Path,
) -> Option<CompiledModel> {
    let artifact = cuda_artifact(name, kv, quantize, bf16_activations, dir)?;
    let loaded = CompiledModel::load(&artifact, &golden(name).dir, 2);
    if !q3c_runtime::compiled::cuda_available() {
        let err = loaded
            .err()
            .expect("no driver, yet the CUDA artifact loaded");
        assert!(
            matches!(&err, RuntimeError::Gpu(m) if m.starts_with("no NVIDIA driver found")),
            "{err}"
        );
        eprintln!("skipped: {name} on the GPU: no NVIDIA driver found on this machine");
        return None;
    }
    let model = loaded.unwrap_or_else(|e| panic!("{name}: {e}"));
    eprintln!("{name}: running on {}", model.gpu().expect("a GPU model"));
    Some(model)
}

#[test]
fn every_fixture_matches_transformers_on_the_gpu() {
    let tmp = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        let g = golden(name);
        let Some(model) = gpu_model(name, DType::F32, tmp.path()) else {
            continue;
        };
        let full = model.session().forward(&g.prompt_ids).unwrap();
        let diff = max_abs_diff(&full.data, &g.logits);
        eprintln!("{name}: GPU max |dlogit| vs transformers {diff:.2e}");
        assert!(diff <= LOGIT_TOLERANCE, "{name}: {diff:e}");
        assert_eq!(
            greedy_continuation(&mut model.session(), &g),
            g.greedy_ids,
            "{name}: greedy ids"
        );
        // A prefill of half the prompt, then one token at a time: each step reads the cache the ones
        // before wrote (same kernels, same order of additions per row: 1e-4 as for the CPU artifacts).
        let mut s = model.session();
        let split = g.prompt_ids.len() / 2;
        let mut rows = s.forward(&g.prompt_ids[..split]).unwrap().data;
        for &id in &g.prompt_ids[split..] {
            rows.extend(s.forward(&[id]).unwrap().data);
        }
        let diff = max_abs_diff(&rows, &full.data);
        assert!(diff <= 1e-4, "{name}: incremental vs full {diff:e}");
    }
}

/// `--quantize q8|q4` on the GPU: against the reference executor on the decoded weights only f32 rounding
/// remains, so the fixtures' [`LOGIT_TOLERANCE`] holds, and the distance to transformers (the format's own
/// error) must be larger ([`check_against_decoded_weights`]); half the prompt at once, then one token at a
/// time (the decode path's one-row blocks), matches too.
#[test]
fn quantized_weights_on_the_gpu_match_the_reference_on_their_decoded_values() {
    let tmp = tempfile::tempdir().unwrap();
    for name in UNTIED_FIXTURES {
        for format in [DType::Q8, DType::Q4] {
            let Some(model) = gpu_model_with(name, DType::F32, Some(format), false, tmp.path())
            else {
                continue;
            };
            let split = golden(name).prompt_ids.len() / 2;
            check_against_decoded_weights(name, format, &model, split, "GPU");
        }
    }
}

/// bf16 activations on the GPU (what a bf16 checkpoint compiles with by default): `tied_bf16` with a 64-token
/// prefill — calls of 64 rows launch the tensor-core kernels (`mma.sync` tiles) — then 8 tokens one at a
/// time (FMA blocks over activations rounded the same way), against the reference executor within the bound
/// of bf16-rounded activations (2⁻⁷ of the logits' scale, derived in tests/compiled.rs, where the same
/// tiles run lane by lane on the CPU emulation), and unlike the f32 artifact (else nothing was rounded).
#[test]
fn bf16_activations_on_the_gpu_stay_within_bf16_rounding() {
    let tmp = tempfile::tempdir().unwrap();
    let name = "tied_bf16";
    let vocab = golden(name).vocab;
    let ids: Vec<u32> = (0..72).map(|i| (i * 53 % vocab) as u32).collect();
    let (want, scale) = reference_logits(name, &ids);
    let mut runs = Vec::new();
    for bf16 in [false, true] {
        let Some(model) = gpu_model_with(name, DType::F32, None, bf16, tmp.path()) else {
            return;
        };
        let launch = model.manifest().launch.clone().expect("a launch plan");
        let tensor = launch.dispatches.iter().filter(|d| d.many_rows.is_some());
        assert_eq!(
            tensor.count() > 0,
            bf16,
            "tensor-core kernels only with bf16 activations"
        );
        let mut s = model.session();
        let mut got = s.forward(&ids[..64]).unwrap().data;
        for &id in &ids[64..] {
            got.extend(s.forward(&[id]).unwrap().data);
        }
        let diff = max_abs_diff(&got, &want);
        eprintln!("{name}: GPU, bf16 activations {bf16}: max |dlogit| {diff:e} (scale {scale})");
        let bound = if bf16 { scale / 128.0 } else { 1e-3 };
        assert!(diff <= bound, "{name}, bf16 activations {bf16}: {diff:e}");
        runs.push(got);
    }
    assert!(
        max_abs_diff(&runs[0], &runs[1]) > 1e-6,
        "bf16 activations changed nothing"
    );
}

#[test]
fn an_f16_cache_on_the_gpu_stays_within_f16_rounding() {
    let tmp = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        let g = golden(name);
        let Some(model) = gpu_model(name, DType::F16, tmp.path()) else {
            continue;
        };
        assert_eq!(model.manifest().kv.dtype, "f16");
        let (want, scale) = reference_logits(name, &g.prompt_ids);
        let got = model.session().forward(&g.prompt_ids).unwrap().data;
        let diff = max_abs_diff(&got, &want);
        eprintln!("{name}: GPU f16 KV max |dlogit| {diff:e} (scale {scale})");
        assert!(diff <= scale / 512.0, "{name}: {diff:e}");
        assert_eq!(
            greedy_continuation(&mut model.session(), &g),
            g.greedy_ids,
            "{name}: greedy ids"
        );
    }
}

#[test]
fn a_gpu_batch_feeds_each_sequence_as_its_own_session_would() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["dense_gqa", "moe"] {
        for kv in [DType::F32, DType::F16] {
            let Some(model) = gpu_model(name, kv, tmp.path()) else {
                continue;
            };
            let vocab = model.manifest().vocab_size;
            let mut batch = model.batch(4096);
            let session = || Box::new(model.session()) as Box<dyn Session>;
            check_against_sessions(
                &format!("{name}, GPU, {kv}"),
                kv,
                &mut batch,
                &session,
                vocab,
            );
            assert!(batch.in_use() > 0);
        }
    }
}
