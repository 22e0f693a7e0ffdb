//! Choosing and running a code generator: one lookup from `--backend` to the compiler that builds it
//! (`auto`: the best one in this build), and compiling a fused graph into a linked artifact.

use std::path::Path;

use anyhow::{bail, Context, Result};
use q3c_compiler::Strategy;
use q3c_models::Qwen3Config;

/// Whether this q3c was built with the LLVM backend (`--features llvm`).
pub const LLVM_BUILT: bool = cfg!(feature = "llvm");

/// The message for an LLVM feature asked of a build without it.
const NO_LLVM: &str = "this q3c was built without the LLVM backend: install LLVM 19 (apt-get install \
    llvm-19-dev libpolly-19-dev zlib1g-dev libzstd-dev libffi-dev) and rebuild with `cargo build --release \
    --features llvm` (or run ./x build)";

/// `--backend`: which code generator compiles the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// The fastest in this build: LLVM where built, else Cranelift.
    Auto,
    /// Cranelift: always built, quick to compile, 128-bit vectors.
    Cranelift,
    /// LLVM 19 at O3 for the target CPU (512-bit vectors, AVX512_BF16/VNNI), and PTX.
    Llvm,
}

impl Backend {
    /// The code generator this choice means in this build; an error for LLVM in a build without it.
    pub fn resolve(self) -> Result<Backend> {
        match self {
            Backend::Auto if LLVM_BUILT => Ok(Backend::Llvm),
            Backend::Auto => Ok(Backend::Cranelift),
            Backend::Llvm if !LLVM_BUILT => bail!(NO_LLVM),
            other => Ok(other),
        }
    }
}

/// `--target`: what `q3c compile` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// A shared library for this (or `--target-cpu`'s) CPU.
    Cpu,
    /// A PTX module with every kernel, for `--gpu` (LLVM); nothing runs it by itself.
    Nvptx,
    /// A CUDA artifact for `--gpu` (LLVM): the PTX with the manifest and launch plan that the runtime's
    /// CUDA executor loads (`q3c_abi::cuda`).
    Cuda,
}

/// `--quantize`: how the matrices of linear and expert products are bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Quantize {
    /// As stored (f16 widened to f32).
    None,
    /// 8-bit groups of 32 with an f32 scale each, quantized at load; AVX512-VNNI products (LLVM).
    Q8,
    /// 4-bit groups of 32 with an f16 scale each (4.5 bits per weight, as llama.cpp's Q4_0), the logits
    /// matrix in 6 bits (6.5 per weight, as llama.cpp keeps it in Q6_K), quantized at load; AVX512-VNNI
    /// products (LLVM).
    Q4,
}

impl Quantize {
    /// The weight format, or `None` for weights as stored.
    pub fn dtype(self) -> Option<q3c_ir::DType> {
        match self {
            Quantize::None => None,
            Quantize::Q8 => Some(q3c_ir::DType::Q8),
            Quantize::Q4 => Some(q3c_ir::DType::Q4),
        }
    }
}

/// `--activations`: what matrix products round their activations to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Activations {
    /// bf16 where the weights are bf16 and the target has AVX512_BF16 (LLVM) or bf16 tensor cores (GPUs
    /// from sm_80), else f32.
    Auto,
    /// f32: exact to the reference.
    F32,
    /// bf16 (AVX512_BF16 dot products, or tensor cores on GPUs; refused where the target lacks them).
    Bf16,
}

impl Activations {
    /// Whether products over bf16 weights round activations to bf16, for `cfg` compiled by `backend` for
    /// `target_cpu`.
    pub fn bf16(self, cfg: &Qwen3Config, backend: Backend, target_cpu: &str) -> Result<bool> {
        Ok(match self {
            Activations::F32 => false,
            Activations::Bf16 => true,
            Activations::Auto => {
                backend == Backend::Llvm
                    && cfg.torch_dtype == q3c_models::DType::BF16
                    && bf16_dot_available(target_cpu)?
            }
        })
    }

    /// [`Activations::bf16`] for a GPU target: `auto` is bf16 for a bf16 checkpoint with weights as
    /// stored (quantized products read f32 activations) on a GPU with bf16 tensor cores (what the
    /// prefill's `mma` tiles need).
    pub fn bf16_on_gpu(self, cfg: &Qwen3Config, gpu: &str, quantize: Quantize) -> bool {
        match self {
            Activations::F32 => false,
            Activations::Bf16 => true,
            Activations::Auto => {
                cfg.torch_dtype == q3c_models::DType::BF16
                    && quantize == Quantize::None
                    && bf16_tensor_cores(gpu)
            }
        }
    }
}

#[cfg(feature = "llvm")]
fn bf16_tensor_cores(gpu: &str) -> bool {
    q3c_backend_llvm::bf16_tensor_cores(gpu)
}

#[cfg(not(feature = "llvm"))]
fn bf16_tensor_cores(_: &str) -> bool {
    false
}

#[cfg(feature = "llvm")]
fn bf16_dot_available(target_cpu: &str) -> Result<bool> {
    Ok(q3c_backend_llvm::bf16_dot_available(target_cpu)?)
}

#[cfg(not(feature = "llvm"))]
fn bf16_dot_available(_: &str) -> Result<bool> {
    Ok(false)
}

/// How to generate CPU code.
pub struct CpuCodegen<'a> {
    /// A resolved backend (not `auto`).
    pub backend: Backend,
    pub target_cpu: &'a str,
    pub max_tokens: usize,
    /// LLVM only: AVX512_BF16 dot products with bf16-rounded activations.
    pub bf16_activations: bool,
    pub quantize: Quantize,
    /// The KV cache's element type (f32 or f16).
    pub kv_dtype: q3c_ir::DType,
    /// Ranks (processes) the model is sharded over; 1: not sharded.
    pub shards: usize,
    /// How a sharded model's MoE layers are split.
    pub moe_split: q3c_compiler::MoeSplit,
}

/// `--moe-split`: how the ranks of a sharded model share a MoE layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MoeSplit {
    /// Each expert's intermediate features: every rank computes a share of every chosen expert.
    Features,
    /// The experts (expert parallelism): every rank holds E/N whole experts and computes the chosen
    /// ones among them.
    Experts,
}

impl MoeSplit {
    pub fn resolve(self) -> q3c_compiler::MoeSplit {
        match self {
            MoeSplit::Features => q3c_compiler::MoeSplit::Features,
            MoeSplit::Experts => q3c_compiler::MoeSplit::Experts,
        }
    }
}

/// `--kv-dtype`: the KV cache's element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KvDtype {
    /// f16 for a bf16 or f16 checkpoint (as llama.cpp), f32 for an f32 one.
    Auto,
    /// Exact (4 bytes per element).
    F32,
    /// Half the bytes: rounded to nearest even when written, widened when read.
    F16,
    /// Half the bytes with f32's range and 8 bits of precision (f16 has 11), as llama.cpp's `-ctk bf16`.
    Bf16,
    /// About a quarter of f32's bytes (0.56 of f16's at head_dim 128): 8-bit integers in groups of 32 with
    /// an f32 scale each, as llama.cpp's `-ctk q8_0`.
    Q8,
}

impl KvDtype {
    /// The element type for `cfg`'s checkpoint.
    pub fn resolve(self, cfg: &Qwen3Config) -> q3c_ir::DType {
        match self {
            KvDtype::F32 => q3c_ir::DType::F32,
            KvDtype::F16 => q3c_ir::DType::F16,
            KvDtype::Bf16 => q3c_ir::DType::BF16,
            KvDtype::Q8 => q3c_ir::DType::Q8,
            KvDtype::Auto if cfg.torch_dtype == q3c_models::DType::F32 => q3c_ir::DType::F32,
            KvDtype::Auto => q3c_ir::DType::F16,
        }
    }
}

/// `cfg` lowered and rewritten by `strategy`'s passes.
pub fn fused_graph(cfg: &Qwen3Config, strategy: &Strategy) -> Result<q3c_ir::Graph> {
    sharded_graph(cfg, strategy, 1, q3c_compiler::MoeSplit::default())
}

/// One rank's graph of `cfg` sharded over `ranks` ranks (the whole model's for 1), MoE layers split as
/// `moe` says, rewritten by `strategy`'s passes.
pub fn sharded_graph(
    cfg: &Qwen3Config,
    strategy: &Strategy,
    ranks: usize,
    moe: q3c_compiler::MoeSplit,
) -> Result<q3c_ir::Graph> {
    let sharding = q3c_compiler::Sharding::new(cfg, ranks, moe)
        .map_err(|e| anyhow::anyhow!("cannot shard this model: {e}"))?;
    let mut graph =
        q3c_compiler::lower_sharded(cfg, &sharding).context("lowering failed (a q3c bug)")?;
    q3c_compiler::pipeline::run(&mut graph, strategy, true, |_, _| {})?;
    Ok(graph)
}

/// Lowers `cfg`, runs `strategy`'s passes, compiles as `how` says and links the artifact at `out`.
/// Returns the artifact's manifest and the fused graph.
pub fn compile_artifact(
    cfg: &Qwen3Config,
    strategy: &Strategy,
    how: &CpuCodegen,
    out: &Path,
) -> Result<(q3c_abi::Manifest, q3c_ir::Graph)> {
    let graph = sharded_graph(cfg, strategy, how.shards, how.moe_split)?;
    let (object, manifest) = compile_object(&graph, cfg, strategy.name(), how)?;
    q3c_backend_common::link_shared(&object, out)?;
    Ok((manifest, graph))
}

/// Compiles a fused graph into an object file.
fn compile_object(
    graph: &q3c_ir::Graph,
    cfg: &Qwen3Config,
    fusion: &str,
    how: &CpuCodegen,
) -> Result<(Vec<u8>, q3c_abi::Manifest)> {
    if how.backend != Backend::Llvm {
        if how.bf16_activations {
            bail!("--activations bf16 needs --backend llvm");
        }
        if let Some(format) = how.quantize.dtype() {
            bail!("--quantize {format} needs --backend llvm");
        }
    }
    match how.backend {
        Backend::Llvm => llvm_object(graph, cfg, fusion, how),
        _ => {
            let opts = q3c_backend_cranelift::CompileOptions {
                target_cpu: how.target_cpu.to_string(),
                max_tokens_per_call: how.max_tokens,
                fusion: fusion.to_string(),
                kv_dtype: how.kv_dtype,
            };
            let c = q3c_backend_cranelift::compile(graph, cfg, q3c_compiler::LOGITS, &opts)?;
            Ok((c.object, c.manifest))
        }
    }
}

#[cfg(feature = "llvm")]
fn llvm_object(
    graph: &q3c_ir::Graph,
    cfg: &Qwen3Config,
    fusion: &str,
    how: &CpuCodegen,
) -> Result<(Vec<u8>, q3c_abi::Manifest)> {
    let opts = q3c_backend_llvm::CompileOptions {
        target_cpu: how.target_cpu.to_string(),
        max_tokens_per_call: how.max_tokens,
        fusion: fusion.to_string(),
        bf16_activations: how.bf16_activations,
        quantize: how.quantize.dtype(),
        kv_dtype: how.kv_dtype,
    };
    let c = q3c_backend_llvm::compile(graph, cfg, q3c_compiler::LOGITS, &opts)?;
    Ok((c.object, c.manifest))
}

#[cfg(not(feature = "llvm"))]
fn llvm_object(
    _: &q3c_ir::Graph,
    _: &Qwen3Config,
    _: &str,
    _: &CpuCodegen,
) -> Result<(Vec<u8>, q3c_abi::Manifest)> {
    bail!(NO_LLVM)
}

/// Settings of a GPU compilation (`--target nvptx|cuda`).
#[cfg_attr(not(feature = "llvm"), allow(dead_code))]
pub struct GpuCodegen<'a> {
    /// sm_80, sm_90, ...
    pub gpu: &'a str,
    pub max_tokens: usize,
    pub fusion: &'a str,
    pub kv_dtype: q3c_ir::DType,
    /// The products' weight format.
    pub quantize: Quantize,
    /// Products over bf16 weights round activations to bf16 (tensor cores for calls of many rows).
    pub bf16_activations: bool,
}

/// Every kernel of a fused graph compiled to PTX for a GPU (LLVM only): the PTX text and the manifest with
/// its launch plan.
#[cfg(feature = "llvm")]
pub fn compile_gpu(
    graph: &q3c_ir::Graph,
    cfg: &Qwen3Config,
    how: &GpuCodegen,
) -> Result<(String, q3c_abi::Manifest)> {
    let opts = q3c_backend_llvm::PtxOptions {
        gpu: how.gpu.to_string(),
        max_tokens_per_call: how.max_tokens,
        fusion: how.fusion.to_string(),
        kv_dtype: how.kv_dtype,
        quantize: how.quantize.dtype(),
        bf16_activations: how.bf16_activations,
    };
    let m = q3c_backend_llvm::compile_ptx(graph, cfg, q3c_compiler::LOGITS, &opts)?;
    Ok((m.ptx, m.manifest))
}

#[cfg(not(feature = "llvm"))]
pub fn compile_gpu(
    _: &q3c_ir::Graph,
    _: &Qwen3Config,
    _: &GpuCodegen,
) -> Result<(String, q3c_abi::Manifest)> {
    bail!(NO_LLVM)
}
