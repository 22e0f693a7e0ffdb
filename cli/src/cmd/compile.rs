//! `q3c compile`: a model compiled ahead of time into a `.so` (or, for NVIDIA GPUs, a PTX module). With no
//! flags: the best code generator in this build, every fusion pass, this machine's CPU features.

use std::path::PathBuf;

use anyhow::{bail, Result};
use q3c_compiler::Strategy;
use q3c_models::ModelSource;

use crate::codegen::{self, Activations, Backend, CpuCodegen, KvDtype, MoeSplit, Quantize, Target};
use crate::output::write_atomically;

#[derive(clap::Args)]
pub struct Args {
    /// A registry name (e.g. Qwen3-8B), a config.json, or a model directory.
    model: String,
    /// Output artifact.
    #[arg(short, long, default_value = "model.so")]
    out: PathBuf,
    /// Code generator (auto: LLVM in a build with `--features llvm`, else Cranelift).
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    backend: Backend,
    /// What to generate: a CPU `.so`; or (LLVM) for NVIDIA GPUs of --gpu, a CUDA artifact that `--model`
    /// runs on the GPU (`cuda`, needs a q3c built with the `cuda` feature to run), or the bare PTX module.
    #[arg(long, value_enum, default_value_t = Target::Cpu)]
    target: Target,
    /// With --target cuda|nvptx: the GPU architecture (sm_80, sm_90, ...).
    #[arg(long, default_value = "sm_90")]
    gpu: String,
    /// CPU to generate code for: native, or a CPU name (x86-64-v2, x86-64-v3, x86-64-v4, znver4, ...).
    #[arg(long, default_value = "native")]
    target_cpu: String,
    /// What matrix products over bf16 weights round activations to: bf16 uses AVX512_BF16 dot products
    /// (about 2x the f32 rate; what llama.cpp does for bf16 models; KL from f32 ~5e-5, see
    /// docs/BENCHMARKS.md), f32 is exact to the reference. auto: bf16 for a bf16 checkpoint where the
    /// target CPU has AVX512_BF16 (LLVM), else f32. On GPUs (--target cuda|nvptx) bf16 runs calls of 64
    /// rows or more (prefill) on bf16 tensor cores (sm_80 and later); auto: bf16 for a bf16 checkpoint
    /// with weights as stored.
    #[arg(long, value_enum, default_value_t = Activations::Auto)]
    activations: Activations,
    /// Same as --activations bf16.
    #[arg(long, conflicts_with = "activations")]
    bf16_activations: bool,
    /// LLVM: bind the matrices of linear and expert products as 8-bit (q8: groups of 32, f32 scales, like
    /// llama.cpp's Q8_0) or 4-bit (q4: groups of 32, f16 scales, like Q4_0; the logits matrix in 6 bits)
    /// weights, multiplied with AVX512-VNNI on 8-bit activations (on GPUs: widened in registers, f32
    /// activations); quantized at load, or read as they are from a checkpoint written by
    /// `q3c quantize`. Default: the format of MODEL's checkpoint if it is pre-quantized, else none.
    #[arg(long, value_enum)]
    quantize: Option<Quantize>,
    /// The KV cache's element type: f16 or bf16 (half the bytes of f32, rounded to nearest even; bf16 keeps
    /// f32's range with 8 bits of precision, f16 11) or f32 (exact).
    /// auto: f16 for a bf16 or f16 checkpoint (as llama.cpp), f32 for an f32 one.
    #[arg(long, value_enum, default_value_t = KvDtype::Auto)]
    kv_dtype: KvDtype,
    /// Most tokens per forward call (longer prompts run in chunks); sizes the scratch memory.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Fusion strategy: all (every pass, each checked equal to none), none, or a comma list of passes
    /// (see `q3c ir --help`).
    #[arg(long, default_value = "all")]
    fusion: String,
    /// Shard the model over N processes (tensor parallel: heads, MLP features and logits split; an
    /// all-reduce after each attention and MLP block, an all-gather of the logits), run as
    /// `mpirun -np N q3c ...` with a q3c built with the `mpi` feature; each rank binds its slice of the
    /// weights. CPU targets only.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    shards: u32,
    /// With --shards: how MoE layers are split — each expert's features over the ranks (every rank equally
    /// busy whatever the routing: the faster decode), or the experts themselves (expert parallelism: E/N
    /// whole experts per rank; faster prefill once an expert's slices get narrow, slower decode of a
    /// lone sequence, whose rank with the most chosen experts sets the pace; see docs/SHARDING.md).
    #[arg(long, value_enum, default_value_t = MoeSplit::Features)]
    moe_split: MoeSplit,
}

pub fn run(args: Args) -> Result<()> {
    let cfg = ModelSource::parse(&args.model).config()?;
    let start = std::time::Instant::now();
    let strategy = Strategy::parse(&args.fusion)?;
    let backend = args.backend.resolve()?;
    let model = &args.model;
    if matches!(args.target, Target::Nvptx | Target::Cuda) {
        if args.shards > 1 {
            bail!("--shards is for CPU targets: sharding over GPUs (NCCL) is not built yet");
        }
        if backend != Backend::Llvm {
            let target = if args.target == Target::Cuda {
                "cuda"
            } else {
                "nvptx"
            };
            bail!("--target {target} needs --backend llvm");
        }
        let graph = codegen::fused_graph(&cfg, &strategy)?;
        let quantize = args
            .quantize
            .unwrap_or_else(|| checkpoint_format(&args.model));
        let how = codegen::GpuCodegen {
            gpu: &args.gpu,
            max_tokens: args.max_tokens,
            fusion: strategy.name(),
            kv_dtype: args.kv_dtype.resolve(&cfg),
            quantize,
            bf16_activations: args.bf16_activations
                || args.activations.bf16_on_gpu(&cfg, &args.gpu, quantize),
        };
        let (ptx, manifest) = codegen::compile_gpu(&graph, &cfg, &how)?;
        let (what, bytes) = match args.target {
            Target::Cuda => {
                let json = serde_json::to_vec(&manifest)?;
                ("a CUDA artifact", q3c_abi::cuda::encode(&json, &ptx))
            }
            _ => ("PTX", ptx.into_bytes()),
        };
        write_atomically(&args.out, &bytes)?;
        eprintln!(
            "compiled {model} to {what} for {} ({}{} activations, {} KV cache) into {} ({} kernels) in {:.2} s",
            args.gpu,
            how.quantize
                .dtype()
                .map_or(String::new(), |f| format!("{f} weights, ")),
            manifest.matmul_activations,
            manifest.kv.dtype,
            args.out.display(),
            manifest.kernels,
            start.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    let quantize = match args.quantize {
        Some(q) => q,
        None => checkpoint_format(&args.model),
    };
    let how = CpuCodegen {
        backend,
        target_cpu: &args.target_cpu,
        max_tokens: args.max_tokens,
        bf16_activations: match args.bf16_activations {
            true => true,
            false => args.activations.bf16(&cfg, backend, &args.target_cpu)?,
        },
        quantize,
        kv_dtype: args.kv_dtype.resolve(&cfg),
        shards: args.shards as usize,
        moe_split: args.moe_split.resolve(),
    };
    let (manifest, _) = codegen::compile_artifact(&cfg, &strategy, &how, &args.out)?;
    eprintln!(
        "compiled {model}{} with {} (fusion {}, {} activations{}, {} KV cache) for {} [{}] into {} ({} kernels, {} weights) in {:.2} s",
        match (manifest.ranks, &cfg.moe) {
            (1, _) => String::new(),
            (n, None) => format!(" sharded over {n} ranks"),
            (n, Some(_)) => format!(
                " sharded over {n} ranks (MoE layers by {})",
                how.moe_split.name()
            ),
        },
        manifest.backend,
        manifest.fusion,
        manifest.matmul_activations,
        quantize
            .dtype()
            .map_or(String::new(), |f| format!(", {f} weights")),
        manifest.kv.dtype,
        manifest.target_cpu,
        manifest.required_cpu_features.join(" "),
        args.out.display(),
        manifest.kernels,
        manifest.weights.len(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The format of a pre-quantized checkpoint in directory `model` (q4 where any tensor is 4-bit: its
/// logits matrix is 8-bit), or none.
fn checkpoint_format(model: &str) -> Quantize {
    let dir = std::path::Path::new(model);
    let formats = match q3c_models::Checkpoint::open(dir) {
        Ok(ckpt) if dir.is_dir() => ckpt
            .packed_formats()
            .iter()
            .map(|f| f.to_string())
            .collect(),
        _ => Vec::new(),
    };
    if formats.iter().any(|f| f == q3c_abi::Q4_LAYOUT) {
        Quantize::Q4
    } else if formats.iter().any(|f| f == q3c_abi::Q8_LAYOUT) {
        Quantize::Q8
    } else {
        Quantize::None
    }
}
