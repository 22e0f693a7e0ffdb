//! The eight released Qwen3 models by name, with the values of their official `config.json`.

use crate::config::{MoeConfig, Qwen3Config};
use crate::dtype::DType;

/// (name, hidden, intermediate, moe_intermediate, layers, q heads, kv heads, tied, experts, top-k)
type Row = (
    &'static str,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    bool,
    usize,
    usize,
);

const RELEASED: [Row; 8] = [
    ("Qwen3-0.6B", 1024, 3072, 0, 28, 16, 8, true, 0, 0),
    ("Qwen3-1.7B", 2048, 6144, 0, 28, 16, 8, true, 0, 0),
    ("Qwen3-4B", 2560, 9728, 0, 36, 32, 8, true, 0, 0),
    ("Qwen3-8B", 4096, 12288, 0, 36, 32, 8, false, 0, 0),
    ("Qwen3-14B", 5120, 17408, 0, 40, 40, 8, false, 0, 0),
    ("Qwen3-32B", 5120, 25600, 0, 64, 64, 8, false, 0, 0),
    ("Qwen3-30B-A3B", 2048, 6144, 768, 48, 32, 4, false, 128, 8),
    (
        "Qwen3-235B-A22B",
        4096,
        12288,
        1536,
        94,
        64,
        4,
        false,
        128,
        8,
    ),
];

/// Names of the released models, smallest first.
pub fn names() -> Vec<&'static str> {
    RELEASED.iter().map(|r| r.0).collect()
}

/// The config of a released model. Case-insensitive; a `Qwen/` prefix is allowed.
pub fn lookup(name: &str) -> Option<Qwen3Config> {
    let bare = name
        .strip_prefix("Qwen/")
        .or_else(|| name.strip_prefix("qwen/"))
        .unwrap_or(name);
    let row = RELEASED.iter().find(|r| r.0.eq_ignore_ascii_case(bare))?;
    let &(_, hidden, inter, moe_inter, layers, heads, kv_heads, tied, experts, top_k) = row;
    Some(Qwen3Config {
        vocab_size: 151936,
        hidden_size: hidden,
        intermediate_size: inter,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim: 128,
        rms_norm_eps: 1e-6,
        rope_theta: 1_000_000.0,
        rope_scaling: None,
        max_position_embeddings: 40960,
        tie_word_embeddings: tied,
        torch_dtype: DType::BF16,
        bos_token_id: Some(151643),
        eos_token_ids: vec![151645],
        moe: (experts > 0).then(|| MoeConfig {
            num_experts: experts,
            num_experts_per_tok: top_k,
            moe_intermediate_size: moe_inter,
            norm_topk_prob: true,
            decoder_sparse_step: 1,
            mlp_only_layers: vec![],
        }),
    })
}
