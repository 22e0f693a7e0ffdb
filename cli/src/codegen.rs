//! Choosing a code generator: Cranelift (always built) or LLVM (with the `llvm` cargo feature).

use anyhow::{bail, Result};

/// The code generators `q3c compile --backend` offers.
pub const BACKENDS: [&str; 2] = ["cranelift", "llvm"];

/// How to generate CPU code.
pub struct CpuCodegen<'a> {
    /// `cranelift` or `llvm`.
    pub backend: &'a str,
    pub target_cpu: &'a str,
    pub max_tokens: usize,
    /// LLVM only: AVX512_BF16 dot products with bf16-rounded activations in prefill.
    pub bf16_activations: bool,
    /// LLVM only: linear matrices bound as 8-bit groups (`q8`), multiplied with VNNI.
    pub weights_q8: bool,
}

/// Compiles a fused graph into an object file.
pub fn compile_object(
    graph: &q3c_ir::Graph,
    cfg: &q3c_models::Qwen3Config,
    fusion: &str,
    how: &CpuCodegen,
) -> Result<(Vec<u8>, q3c_abi::Manifest)> {
    let &CpuCodegen {
        backend,
        target_cpu,
        max_tokens,
        bf16_activations,
        weights_q8,
    } = how;
    if bf16_activations && backend != "llvm" {
        bail!("--bf16-activations needs --backend llvm");
    }
    if weights_q8 && backend != "llvm" {
        bail!("--quantize q8 needs --backend llvm");
    }
    match backend {
        "cranelift" => {
            let opts = q3c_backend_cranelift::CompileOptions {
                target_cpu: target_cpu.to_string(),
                max_tokens_per_call: max_tokens,
                fusion: fusion.to_string(),
            };
            let c = q3c_backend_cranelift::compile(graph, cfg, q3c_compiler::LOGITS, &opts)?;
            Ok((c.object, c.manifest))
        }
        "llvm" => llvm_object(graph, cfg, fusion, how),
        other => bail!("unknown backend '{other}' (one of {})", BACKENDS.join(", ")),
    }
}

#[cfg(feature = "llvm")]
fn llvm_object(
    graph: &q3c_ir::Graph,
    cfg: &q3c_models::Qwen3Config,
    fusion: &str,
    how: &CpuCodegen,
) -> Result<(Vec<u8>, q3c_abi::Manifest)> {
    let opts = q3c_backend_llvm::CompileOptions {
        target_cpu: how.target_cpu.to_string(),
        max_tokens_per_call: how.max_tokens,
        fusion: fusion.to_string(),
        bf16_activations: how.bf16_activations,
        weights_q8: how.weights_q8,
    };
    let c = q3c_backend_llvm::compile(graph, cfg, q3c_compiler::LOGITS, &opts)?;
    Ok((c.object, c.manifest))
}

#[cfg(not(feature = "llvm"))]
fn llvm_object(
    _: &q3c_ir::Graph,
    _: &q3c_models::Qwen3Config,
    _: &str,
    _: &CpuCodegen,
) -> Result<(Vec<u8>, q3c_abi::Manifest)> {
    bail!(NO_LLVM)
}

#[cfg(not(feature = "llvm"))]
const NO_LLVM: &str = "this q3c was built without the LLVM backend: install LLVM 19 (apt-get install \
    llvm-19-dev libpolly-19-dev zlib1g-dev libzstd-dev libffi-dev) and rebuild with `cargo build --release \
    --features llvm`";

/// Compiles every kernel of a fused graph to PTX for `gpu` (LLVM only). Returns the PTX text and the
/// number of kernels.
#[cfg(feature = "llvm")]
pub fn compile_ptx(
    graph: &q3c_ir::Graph,
    cfg: &q3c_models::Qwen3Config,
    gpu: &str,
    max_tokens: usize,
    fusion: &str,
) -> Result<(String, usize)> {
    let opts = q3c_backend_llvm::PtxOptions {
        gpu: gpu.to_string(),
        max_tokens_per_call: max_tokens,
        fusion: fusion.to_string(),
    };
    let m = q3c_backend_llvm::compile_ptx(graph, cfg, q3c_compiler::LOGITS, &opts)?;
    Ok((m.ptx, m.kernels.len()))
}

#[cfg(not(feature = "llvm"))]
pub fn compile_ptx(
    _: &q3c_ir::Graph,
    _: &q3c_models::Qwen3Config,
    _: &str,
    _: usize,
    _: &str,
) -> Result<(String, usize)> {
    bail!(NO_LLVM)
}
