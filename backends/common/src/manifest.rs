//! The manifest every artifact embeds, built the same way by every backend.

use q3c_abi::{KvGeometry, Manifest, WeightEntry, WeightShard, ABI_VERSION};
use q3c_models::Qwen3Config;

use crate::plan::Plan;

/// What a backend knows about one compilation beyond the plan.
pub struct ManifestParts<'a> {
    pub cfg: &'a Qwen3Config,
    pub plan: &'a Plan,
    /// `cranelift` or `llvm`.
    pub backend: &'a str,
    pub fusion: &'a str,
    /// `f32`, or `bf16` where products over bf16 weights round activations to bf16.
    pub matmul_activations: &'a str,
    pub target_cpu: &'a str,
    pub required_cpu_features: Vec<String>,
    pub kernels: usize,
}

/// The manifest of an artifact compiled from `parts`.
pub fn build(parts: ManifestParts) -> Manifest {
    let ManifestParts {
        cfg,
        plan,
        backend,
        fusion,
        matmul_activations,
        target_cpu,
        required_cpu_features,
        kernels,
    } = parts;
    let weights = plan
        .weights
        .iter()
        .map(|w| WeightEntry {
            name: w.name.clone(),
            shape: w.shape.clone(),
            dtype: w.dtype.name().into(),
            kernel_dtype: w.read_as.name().into(),
            layout: q3c_abi::layout_for(w.read_as.name()).into(),
            shard: w.shard.map(|s| WeightShard {
                axis: s.axis as usize,
                parts: s.parts as usize,
                ranks: s.ranks as usize,
            }),
            owner: w.owner,
        })
        .collect();
    Manifest {
        abi_version: ABI_VERSION,
        compiler_version: env!("CARGO_PKG_VERSION").into(),
        backend: backend.into(),
        config: cfg.to_json(),
        vocab_size: cfg.vocab_size,
        max_position_embeddings: cfg.max_position_embeddings,
        eos_token_ids: cfg.eos_token_ids.clone(),
        weights,
        kv: KvGeometry {
            layers: plan.layers,
            kv_heads: plan.kv_heads,
            head_dim: cfg.head_dim,
            dtype: plan.kv_dtype.name().into(),
        },
        max_tokens_per_call: plan.max_tokens,
        scratch_bytes_per_token: plan.scratch_bytes_per_token,
        fusion: fusion.into(),
        matmul_activations: matmul_activations.into(),
        target_cpu: target_cpu.into(),
        required_cpu_features,
        kernels,
        launch: None,
        ranks: plan.ranks,
    }
}
