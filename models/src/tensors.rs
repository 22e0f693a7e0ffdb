//! The checkpoint tensors a config implies: names as in Hugging Face checkpoints, shapes `[out, in]`.
//!
//! These functions are the single source of tensor names: the lowering binds its weight nodes through them
//! and the checkpoint check compares against [`expected_tensors`].

use crate::config::Qwen3Config;

/// A tensor the checkpoint must hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

/// `model.embed_tokens.weight`.
pub const EMBED: &str = "model.embed_tokens.weight";
/// `model.norm.weight`.
pub const FINAL_NORM: &str = "model.norm.weight";
/// `lm_head.weight` (absent when embeddings are tied).
pub const LM_HEAD: &str = "lm_head.weight";
/// The suffix of a MoE layer's router matrix (`model.layers.{layer}.mlp.gate.weight`).
pub const ROUTER: &str = "mlp.gate.weight";
/// The placeholder for the expert index in an expert-stack name.
pub const EXPERT_PLACEHOLDER: &str = "{e}";

/// `model.layers.{layer}.{suffix}`.
pub fn layer_tensor(layer: usize, suffix: &str) -> String {
    format!("model.layers.{layer}.{suffix}")
}

/// `model.layers.{layer}.mlp.experts.{e}.{proj}.weight`, with `{e}` left in for the stack.
pub fn expert_stack(layer: usize, proj: &str) -> String {
    layer_tensor(
        layer,
        &format!("mlp.experts.{EXPERT_PLACEHOLDER}.{proj}.weight"),
    )
}

/// The name of expert `e`'s tensor in an expert-stack name.
pub fn expert_tensor(stack: &str, e: usize) -> String {
    stack.replace(EXPERT_PLACEHOLDER, &e.to_string())
}

/// Every tensor the checkpoint must hold for `cfg`, in layer order.
pub fn expected_tensors(cfg: &Qwen3Config) -> Vec<TensorSpec> {
    let (h, d) = (cfg.hidden_size, cfg.head_dim);
    let spec = |name: String, shape: &[usize]| TensorSpec {
        name,
        shape: shape.to_vec(),
    };
    let mut out = vec![spec(EMBED.into(), &[cfg.vocab_size, h])];
    for l in 0..cfg.num_hidden_layers {
        let t = |s: &str| layer_tensor(l, s);
        out.push(spec(t("input_layernorm.weight"), &[h]));
        out.push(spec(
            t("self_attn.q_proj.weight"),
            &[cfg.num_attention_heads * d, h],
        ));
        out.push(spec(
            t("self_attn.k_proj.weight"),
            &[cfg.num_key_value_heads * d, h],
        ));
        out.push(spec(
            t("self_attn.v_proj.weight"),
            &[cfg.num_key_value_heads * d, h],
        ));
        out.push(spec(
            t("self_attn.o_proj.weight"),
            &[h, cfg.num_attention_heads * d],
        ));
        out.push(spec(t("self_attn.q_norm.weight"), &[d]));
        out.push(spec(t("self_attn.k_norm.weight"), &[d]));
        out.push(spec(t("post_attention_layernorm.weight"), &[h]));
        match cfg.moe.as_ref().filter(|_| cfg.is_sparse_layer(l)) {
            Some(moe) => {
                let i = moe.moe_intermediate_size;
                out.push(spec(t(ROUTER), &[moe.num_experts, h]));
                for e in 0..moe.num_experts {
                    out.push(spec(
                        expert_tensor(&expert_stack(l, "gate_proj"), e),
                        &[i, h],
                    ));
                    out.push(spec(expert_tensor(&expert_stack(l, "up_proj"), e), &[i, h]));
                    out.push(spec(
                        expert_tensor(&expert_stack(l, "down_proj"), e),
                        &[h, i],
                    ));
                }
            }
            None => {
                let i = cfg.intermediate_size;
                out.push(spec(t("mlp.gate_proj.weight"), &[i, h]));
                out.push(spec(t("mlp.up_proj.weight"), &[i, h]));
                out.push(spec(t("mlp.down_proj.weight"), &[h, i]));
            }
        }
    }
    out.push(spec(FINAL_NORM.into(), &[h]));
    if !cfg.tie_word_embeddings {
        out.push(spec(LM_HEAD.into(), &[cfg.vocab_size, h]));
    }
    out
}
