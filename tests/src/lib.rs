//! Helpers shared by q3c's end-to-end tests: the golden fixtures recorded from Hugging Face transformers.
//!
//! Each fixture directory (made by `reference/make_fixtures.py`) holds a tiny random checkpoint, the logits
//! transformers computed over a prompt, and transformers' 24-token greedy continuation.

pub mod batching;

use std::path::PathBuf;

use q3c_models::{Checkpoint, Qwen3Config};
use q3c_runtime::ReferenceModel;

/// The tolerance every executor is held to against transformers: max |Δlogit| in f32.
pub const LOGIT_TOLERANCE: f32 = 1e-3;

/// Names of all committed fixtures.
pub const FIXTURES: [&str; 6] = [
    "dense_gqa",
    "tied_bf16",
    "moe",
    "moe_sparse_step",
    "yarn",
    "sharded_f16",
];

/// What transformers recorded for one fixture.
pub struct Golden {
    pub name: String,
    pub dir: PathBuf,
    pub prompt_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    /// `[T, vocab]` row-major.
    pub logits: Vec<f32>,
    pub vocab: usize,
}

/// The directory holding the fixtures.
pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("reference")
        .join("fixtures")
}

/// Loads a fixture's recorded outputs.
pub fn golden(name: &str) -> Golden {
    let dir = fixtures_dir().join(name);
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("golden.json")).expect("golden.json"),
    )
    .expect("valid JSON");
    let ids = |key: &str| {
        json[key]
            .as_array()
            .expect(key)
            .iter()
            .map(|v| v.as_u64().expect("id") as u32)
            .collect()
    };
    let bytes = std::fs::read(dir.join("logits.safetensors")).expect("logits.safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
    let view = st.tensor("logits").expect("logits tensor");
    let logits = view
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Golden {
        name: name.into(),
        prompt_ids: ids("prompt_ids"),
        greedy_ids: ids("greedy_ids"),
        logits,
        vocab: view.shape()[1],
        dir,
    }
}

/// The fixture's config and checkpoint, checked against each other.
pub fn open_fixture(name: &str) -> (Qwen3Config, Checkpoint) {
    let dir = fixtures_dir().join(name);
    let cfg = Qwen3Config::from_file(&dir.join("config.json")).expect("fixture config");
    let ckpt = Checkpoint::open(&dir).expect("fixture checkpoint");
    ckpt.check(&cfg)
        .expect("fixture checkpoint matches its config");
    (cfg, ckpt)
}

/// The reference executor over a fixture.
pub fn reference_model(name: &str) -> ReferenceModel {
    let (cfg, ckpt) = open_fixture(name);
    let graph = q3c_compiler::lower(&cfg).expect("lowering");
    ReferenceModel::new(graph, &ckpt, q3c_compiler::LOGITS).expect("binding weights")
}

/// A writable copy of a fixture directory (for tests that edit the config or the weights).
pub fn copy_fixture(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("temp dir");
    for entry in std::fs::read_dir(fixtures_dir().join(name)).expect("fixture dir") {
        let entry = entry.expect("dir entry");
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).expect("copy");
    }
    tmp
}

/// The code generators this build has: `cranelift`, and `llvm` with the `llvm` feature.
pub fn backends() -> Vec<&'static str> {
    let mut b = vec!["cranelift"];
    if cfg!(feature = "llvm") {
        b.push("llvm");
    }
    b
}

/// The kinds of artifact the executor tests run: every code generator of this build and, with LLVM, the
/// GPU flavour compiled for this CPU and launched by the runtime (`llvm-gpu-emulation`, the manifest's
/// backend name), which checks a GPU's launch plan and argument blocks without a GPU.
pub fn artifact_kinds() -> Vec<&'static str> {
    let mut kinds = backends();
    if cfg!(feature = "llvm") {
        kinds.push("llvm-gpu-emulation");
    }
    kinds
}

/// Compiles the model in `model_dir` (or a `config.json`) with the Cranelift backend into `out_dir/model.so`.
pub fn compile_to(
    model_dir: &std::path::Path,
    out_dir: &std::path::Path,
    max_tokens: usize,
) -> PathBuf {
    compile_with(model_dir, out_dir, max_tokens, "none")
}

/// The lowered graph of `cfg` after the fusion strategy `fusion` (`none`, `all`, or a pass list).
pub fn fused_graph(cfg: &Qwen3Config, fusion: &str) -> q3c_ir::Graph {
    sharded_graph(cfg, 1, q3c_compiler::MoeSplit::default(), fusion)
}

/// One rank's graph of `cfg` sharded over `ranks` ranks (the whole model's for 1), MoE layers split as
/// `moe` says, after `fusion`.
pub fn sharded_graph(
    cfg: &Qwen3Config,
    ranks: usize,
    moe: q3c_compiler::MoeSplit,
    fusion: &str,
) -> q3c_ir::Graph {
    let sharding = q3c_compiler::Sharding::new(cfg, ranks, moe).expect("the model shards");
    let mut graph = q3c_compiler::lower_sharded(cfg, &sharding).expect("lowering");
    let strategy = q3c_compiler::Strategy::parse(fusion).expect("strategy");
    q3c_compiler::pipeline::run(&mut graph, &strategy, true, |_, _| {}).expect("passes");
    graph
}

/// Like [`compile_to`], with a fusion strategy.
pub fn compile_with(
    model_dir: &std::path::Path,
    out_dir: &std::path::Path,
    max_tokens: usize,
    fusion: &str,
) -> PathBuf {
    compile_by("cranelift", model_dir, out_dir, max_tokens, fusion)
}

/// Like [`compile_with`], with the code generator `backend` (one of [`artifact_kinds`]).
pub fn compile_by(
    backend: &str,
    model_dir: &std::path::Path,
    out_dir: &std::path::Path,
    max_tokens: usize,
    fusion: &str,
) -> PathBuf {
    let cfg = q3c_models::resolve(model_dir.to_str().expect("utf-8 path")).expect("config");
    let graph = fused_graph(&cfg, fusion);
    compile_graph(backend, &graph, &cfg, out_dir, max_tokens, fusion)
}

/// Compiles `graph` (its output [`q3c_compiler::LOGITS`]; `cfg` goes into the manifest) with the code
/// generator `backend` into `out_dir/model-BACKEND.so`.
pub fn compile_graph(
    backend: &str,
    graph: &q3c_ir::Graph,
    cfg: &Qwen3Config,
    out_dir: &std::path::Path,
    max_tokens: usize,
    fusion: &str,
) -> PathBuf {
    compile_graph_kv(
        backend,
        graph,
        cfg,
        out_dir,
        max_tokens,
        fusion,
        q3c_ir::DType::F32,
    )
}

/// [`compile_graph`] with a KV cache of `kv` (f32 or f16).
pub fn compile_graph_kv(
    backend: &str,
    graph: &q3c_ir::Graph,
    cfg: &Qwen3Config,
    out_dir: &std::path::Path,
    max_tokens: usize,
    fusion: &str,
    kv_dtype: q3c_ir::DType,
) -> PathBuf {
    let object = match backend {
        "cranelift" => {
            let opts = q3c_backend_cranelift::CompileOptions {
                max_tokens_per_call: max_tokens,
                fusion: fusion.into(),
                kv_dtype,
                ..Default::default()
            };
            q3c_backend_cranelift::compile(graph, cfg, q3c_compiler::LOGITS, &opts)
                .expect("compile")
                .object
        }
        #[cfg(feature = "llvm")]
        "llvm" => {
            let opts = q3c_backend_llvm::CompileOptions {
                max_tokens_per_call: max_tokens,
                fusion: fusion.into(),
                kv_dtype,
                ..Default::default()
            };
            q3c_backend_llvm::compile(graph, cfg, q3c_compiler::LOGITS, &opts)
                .expect("compile")
                .object
        }
        #[cfg(feature = "llvm")]
        "llvm-gpu-emulation" => {
            let opts = q3c_backend_llvm::PtxOptions {
                gpu: "sm_90".into(),
                max_tokens_per_call: max_tokens,
                fusion: fusion.into(),
                kv_dtype,
                quantize: None,
                bf16_activations: false,
            };
            q3c_backend_llvm::compile_gpu_emulation(graph, cfg, q3c_compiler::LOGITS, &opts)
                .expect("compile")
                .object
        }
        other => panic!("backend {other} is not in this build"),
    };
    let so = out_dir.join(format!("model-{backend}.so"));
    q3c_backend_common::link_shared(&object, &so).expect("link");
    so
}

/// Compiles `graph` in process with cranelift-jit and binds the weights in `weights_dir`.
pub fn jit_graph(
    graph: &q3c_ir::Graph,
    cfg: &Qwen3Config,
    weights_dir: &std::path::Path,
    max_tokens: usize,
    threads: usize,
) -> q3c_runtime::CompiledModel {
    let opts = q3c_backend_cranelift::CompileOptions {
        max_tokens_per_call: max_tokens,
        ..Default::default()
    };
    let jit =
        q3c_backend_cranelift::compile_jit(graph, cfg, q3c_compiler::LOGITS, &opts).expect("jit");
    // SAFETY: forward and manifest come from the same compilation, kept alive by `code`.
    unsafe {
        q3c_runtime::CompiledModel::from_code(
            jit.forward,
            jit.manifest,
            Box::new(jit.code),
            weights_dir,
            threads,
            q3c_runtime::Residency::default(),
        )
    }
    .expect("binding weights")
}

/// Compiles a fixture in process with cranelift-jit and binds its weights.
pub fn jit_model(name: &str, threads: usize) -> q3c_runtime::CompiledModel {
    let (cfg, _) = open_fixture(name);
    let graph = q3c_compiler::lower(&cfg).expect("lowering");
    jit_graph(&graph, &cfg, &fixtures_dir().join(name), 8, threads)
}

/// The 24-token greedy continuation of a fixture's prompt (EOS ignored), as transformers recorded it.
pub fn greedy_continuation(session: &mut dyn q3c_runtime::Session, g: &Golden) -> Vec<u32> {
    let opts = q3c_runtime::GenerateOptions {
        max_new_tokens: g.greedy_ids.len(),
        sampling: q3c_runtime::SamplingParams::greedy(),
        stop_ids: vec![],
    };
    q3c_runtime::generate(session, &g.prompt_ids, &opts).expect("generation")
}

/// The reference executor's logits for fixture `name` over `ids`, and their largest magnitude (the scale
/// the rounding bounds of half-precision tests are shares of).
pub fn reference_logits(name: &str, ids: &[u32]) -> (Vec<f32>, f32) {
    let want = q3c_runtime::Session::forward(&mut reference_model(name).session(), ids)
        .unwrap()
        .data;
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    (want, scale)
}

/// Largest absolute difference between two equally long slices; infinite if either holds a NaN or an
/// infinity (a plain `f32::max` fold would count a NaN as no difference at all).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).fold(0.0, |worst, (x, y)| {
        if !x.is_finite() || !y.is_finite() {
            f32::INFINITY
        } else {
            worst.max((x - y).abs())
        }
    })
}

/// Whether this CPU has `feature` (as `is_x86_feature_detected!` names it). Without it the caller skips,
/// and this says so on stderr, visible even when the test passes; with `Q3C_REQUIRE_FEATURES=1` a missing feature fails the test instead.
pub fn cpu_feature(feature: &str, what: &str) -> bool {
    let has = match feature {
        "avx512bf16" => std::arch::is_x86_feature_detected!("avx512bf16"),
        "avx512vnni" => std::arch::is_x86_feature_detected!("avx512vnni"),
        "avx512f" => std::arch::is_x86_feature_detected!("avx512f"),
        "avx2" => std::arch::is_x86_feature_detected!("avx2"),
        other => panic!("no check for CPU feature {other}"),
    };
    if !has {
        assert!(
            std::env::var("Q3C_REQUIRE_FEATURES").as_deref() != Ok("1"),
            "{what}: this CPU lacks {feature} and Q3C_REQUIRE_FEATURES=1"
        );
        // Written to the process's stderr directly: libtest captures eprintln! of passing tests.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "skipped: {what} needs {feature}, which this CPU lacks (Q3C_REQUIRE_FEATURES=1 fails instead)"
        );
    }
    has
}

/// The fixtures whose logits matrix is its own tensor, dense and MoE: quantized products are checked on these
/// against the reference on decoded weights ([`check_against_decoded_weights`]); a tied table is one
/// checkpoint tensor both exact (the embedding) and quantized (the logits' copy), which one decoded
/// checkpoint cannot say.
pub const UNTIED_FIXTURES: [&str; 5] =
    ["dense_gqa", "moe", "moe_sparse_step", "yarn", "sharded_f16"];

/// Checks `model` of fixture `name`, its products reading `format` weights with f32 activations (the GPU
/// flavour), against the reference executor on the decoded weights ([`decoded_reference`]): the whole
/// prompt, and its first `split` tokens at once then one at a time, each within [`LOGIT_TOLERANCE`] (only
/// f32 rounding of sums taken in another order remains), and closer to the decoded weights than to
/// transformers (else the decoded weights did not explain the result). `what` names the model in messages.
pub fn check_against_decoded_weights(
    name: &str,
    format: q3c_ir::DType,
    model: &q3c_runtime::CompiledModel,
    split: usize,
    what: &str,
) {
    use q3c_runtime::Session as _;
    let g = golden(name);
    let weights = model.manifest().weights.iter();
    let (formats, want) =
        decoded_reference(name, weights.map(|w| (&w.name[..], &w.kernel_dtype[..])));
    assert!(
        formats.values().any(|&f| f == format),
        "{name}: no weight bound as {format}"
    );
    let got = model.session().forward(&g.prompt_ids).unwrap().data;
    let mut s = model.session();
    let mut stepped = Vec::new();
    if split > 0 {
        stepped = s.forward(&g.prompt_ids[..split]).unwrap().data;
    }
    for &id in &g.prompt_ids[split..] {
        stepped.extend(s.forward(&[id]).unwrap().data);
    }
    let (diff, step_diff) = (max_abs_diff(&got, &want), max_abs_diff(&stepped, &want));
    let vs_hf = max_abs_diff(&got, &g.logits);
    eprintln!(
        "{name}: {what} {format} ({} weights) max |dlogit| {diff:.2e} ({step_diff:.2e} after {split} at once, \
         then token by token) vs the decoded weights, {vs_hf:.2e} vs transformers",
        formats.len()
    );
    assert!(
        diff <= LOGIT_TOLERANCE && step_diff <= LOGIT_TOLERANCE,
        "{name} {format}: {diff:e} {step_diff:e}"
    );
    assert!(
        diff < vs_hf,
        "{name} {format}: the decoded weights do not explain the result"
    );
}

/// The weights a compiled model binds as q8, q4 or q6 (`(name, kernel_dtype)` of each of its weights) by name,
/// and the reference executor's logits over fixture `name`'s prompt on those weights decoded
/// ([`write_decoded`]): what its quantized products should give, up to f32 rounding.
pub fn decoded_reference<'a>(
    name: &str,
    weights: impl Iterator<Item = (&'a str, &'a str)>,
) -> (std::collections::HashMap<String, q3c_ir::DType>, Vec<f32>) {
    let formats: std::collections::HashMap<String, q3c_ir::DType> = weights
        .filter_map(|(n, kind)| match kind {
            "q8" => Some((n.to_string(), q3c_ir::DType::Q8)),
            "q4" => Some((n.to_string(), q3c_ir::DType::Q4)),
            "q6" => Some((n.to_string(), q3c_ir::DType::Q6)),
            _ => None,
        })
        .collect();
    let decoded = tempfile::tempdir().expect("a temporary directory");
    write_decoded(name, &formats, decoded.path());
    let (cfg, _) = open_fixture(name);
    let ckpt = q3c_models::Checkpoint::open(decoded.path()).expect("the decoded checkpoint");
    let graph = q3c_compiler::lower(&cfg).expect("lowering");
    let reference = q3c_runtime::ReferenceModel::new(graph, &ckpt, q3c_compiler::LOGITS)
        .expect("the reference executor");
    let g = golden(name);
    let want = q3c_runtime::Session::forward(&mut reference.session(), &g.prompt_ids)
        .expect("a reference forward")
        .data;
    (formats, want)
}

/// Writes fixture `name`'s checkpoint into `dir` as f32, each weight named in `formats` replaced by its
/// values in that format (q8, q4 or q6) decoded (`d · q` per group of 32, as `q3c_abi::Q8_LAYOUT`,
/// `Q4_LAYOUT` and `Q6_LAYOUT` define them): the checkpoint on which the reference executor computes what
/// quantized products should give.
pub fn write_decoded(
    name: &str,
    formats: &std::collections::HashMap<String, q3c_ir::DType>,
    dir: &std::path::Path,
) {
    use q3c_runtime::compiled::quant::{q8_group, LowBits};
    let src = fixtures_dir().join(name);
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let (_, ckpt) = open_fixture(name);
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = ckpt
        .names()
        .map(|n| {
            let t = ckpt.get(n).unwrap();
            let mut values = t.to_f32();
            if let Some(&format) = formats.get(n) {
                for group in values.chunks_exact_mut(32) {
                    let (d, q, offset) = match LowBits::of(format) {
                        Some(bits) => {
                            let (d, q) = bits.group(group);
                            (d.to_f32(), q, bits.offset() as f32)
                        }
                        None => {
                            let (d, q) = q8_group(group);
                            (d, q, 128.0)
                        }
                    };
                    for (v, q) in group.iter_mut().zip(q) {
                        *v = d * (f32::from(q) - offset);
                    }
                }
            }
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (n.to_string(), t.shape.to_vec(), bytes)
        })
        .collect();
    let views: Vec<_> = data
        .iter()
        .map(|(n, s, b)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .unwrap();
            (n.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

/// A CUDA artifact of fixture `name` (fusion all, KV cache of `kv_dtype`, weights as stored or quantized
/// as `quantize` says, activations of products over bf16 weights rounded to bf16 where `bf16_activations`,
/// else f32; 64 tokens per call) in `out_dir`: compiled here with LLVM, or, in a build without it (what
/// travels to a GPU machine), taken from the directory `$Q3C_CUDA_ARTIFACTS` as `NAME-KV.q3c`,
/// `NAME-KV-QUANTIZE.q3c` or `NAME-KV-bf16-activations.q3c` (made by `q3c compile FIXTURE --target cuda`:
/// `benches/gpu.sh prepare`). `None`, saying why, where there is neither.
pub fn cuda_artifact(
    name: &str,
    kv_dtype: q3c_ir::DType,
    quantize: Option<q3c_ir::DType>,
    bf16_activations: bool,
    out_dir: &std::path::Path,
) -> Option<PathBuf> {
    let quantized = quantize.map_or(String::new(), |q| format!("-{q}"));
    let activations = if bf16_activations {
        "-bf16-activations"
    } else {
        ""
    };
    let file = format!("{name}-{kv_dtype}{quantized}{activations}.q3c");
    if let Some(dir) = std::env::var_os("Q3C_CUDA_ARTIFACTS") {
        let path = PathBuf::from(dir).join(&file);
        return match path.is_file() {
            true => Some(path),
            false => {
                eprintln!("skipped: no {} (Q3C_CUDA_ARTIFACTS)", path.display());
                None
            }
        };
    }
    #[cfg(feature = "llvm")]
    {
        let (cfg, _) = open_fixture(name);
        let graph = fused_graph(&cfg, "all");
        let opts = q3c_backend_llvm::PtxOptions {
            gpu: "sm_80".into(),
            max_tokens_per_call: 64,
            fusion: "all".into(),
            kv_dtype,
            quantize,
            bf16_activations,
        };
        let m = q3c_backend_llvm::compile_ptx(&graph, &cfg, q3c_compiler::LOGITS, &opts)
            .expect("compile PTX");
        let path = out_dir.join(file);
        std::fs::write(&path, m.cuda_artifact()).expect("write the CUDA artifact");
        Some(path)
    }
    #[cfg(not(feature = "llvm"))]
    {
        let _ = out_dir;
        eprintln!("skipped: {file}: no LLVM in this build and no Q3C_CUDA_ARTIFACTS directory");
        None
    }
}
