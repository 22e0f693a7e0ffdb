//! Lowering: one parameterised builder turns any [`Qwen3Config`] into the graph IR.
//!
//! The graph follows transformers' `Qwen3ForCausalLM` / `Qwen3MoeForCausalLM` op for op (see
//! `shared/qwen3/SPEC.md`): embedding, then per layer attention (q/k/v projections, per-head QK-Norm before
//! RoPE, KV-cache append, causal GQA attention, o_proj, residual) and MLP (dense SwiGLU, or MoE: f32
//! softmax router, top-k, optional renormalisation, per-expert SwiGLU, weighted sum), final norm, lm_head.
//! Weight names come from `q3c_models::tensors`, so the graph and the checkpoint check agree by construction.

use q3c_ir::{
    DType, Dim, Graph, InputKind, KvKind, NodeId, Op, RopeSpec, Shape, TensorType, TypeError, Yarn,
};
use q3c_models::tensors::{self, expert_stack, layer_tensor, EMBED, FINAL_NORM, LM_HEAD};
use q3c_models::{MoeConfig, Qwen3Config};

/// The name of the logits output, `f32[T, vocab]`.
pub const LOGITS: &str = "logits";

/// Lowers a config to a graph with one output, [`LOGITS`].
///
/// Fails only if the builder produces an ill-typed node, which is a compiler bug: configs are checked when
/// they are parsed.
pub fn lower(cfg: &Qwen3Config) -> Result<Graph, TypeError> {
    let mut b = Builder {
        g: Graph::new(),
        cfg,
        dtype: weight_dtype(cfg),
    };
    let ids = b.g.add(Op::Input(InputKind::TokenIds), &[])?;
    let positions = b.g.add(Op::Input(InputKind::Positions), &[])?;
    let embed = b.weight(EMBED, &[cfg.vocab_size, cfg.hidden_size])?;
    let mut x = b.g.add(Op::Embedding, &[embed, ids])?;
    let rope = rope_spec(cfg);
    for layer in 0..cfg.num_hidden_layers {
        let h = b.norm(
            x,
            &layer_tensor(layer, "input_layernorm.weight"),
            cfg.hidden_size,
        )?;
        let attn = b.attention(layer, h, positions, &rope)?;
        x = b.g.add(Op::Add, &[x, attn])?;
        let h = b.norm(
            x,
            &layer_tensor(layer, "post_attention_layernorm.weight"),
            cfg.hidden_size,
        )?;
        let mlp = match cfg.moe.as_ref().filter(|_| cfg.is_sparse_layer(layer)) {
            Some(moe) => b.moe(layer, h, moe)?,
            None => b.dense_mlp(layer, h)?,
        };
        x = b.g.add(Op::Add, &[x, mlp])?;
    }
    let x = b.norm(x, FINAL_NORM, cfg.hidden_size)?;
    let head = if cfg.tie_word_embeddings {
        embed
    } else {
        b.weight(LM_HEAD, &[cfg.vocab_size, cfg.hidden_size])?
    };
    let logits = b.g.add(Op::Linear, &[x, head])?;
    b.g.set_output(LOGITS, logits);
    Ok(b.g)
}

fn weight_dtype(cfg: &Qwen3Config) -> DType {
    match cfg.torch_dtype {
        q3c_models::DType::F32 => DType::F32,
        q3c_models::DType::BF16 => DType::BF16,
        q3c_models::DType::F16 => DType::F16,
    }
}

/// The RoPE parameters a config implies.
pub fn rope_spec(cfg: &Qwen3Config) -> RopeSpec {
    RopeSpec {
        theta: cfg.rope_theta,
        yarn: cfg.rope_scaling.as_ref().map(|y| Yarn {
            factor: y.factor,
            original_max_position_embeddings: y.original_max_position_embeddings as u64,
            attention_factor: y.attention_factor,
            beta_fast: y.beta_fast,
            beta_slow: y.beta_slow,
            truncate: y.truncate,
        }),
    }
}

struct Builder<'a> {
    g: Graph,
    cfg: &'a Qwen3Config,
    dtype: DType,
}

fn fixed(n: usize) -> Dim {
    Dim::Fixed(n as u64)
}

impl Builder<'_> {
    fn weight(&mut self, name: &str, shape: &[usize]) -> Result<NodeId, TypeError> {
        let shape = Shape(shape.iter().map(|&n| fixed(n)).collect());
        self.g.add(
            Op::Weight {
                name: name.to_string(),
                ty: TensorType::new(self.dtype, shape),
            },
            &[],
        )
    }

    fn linear(
        &mut self,
        x: NodeId,
        name: &str,
        out: usize,
        inp: usize,
    ) -> Result<NodeId, TypeError> {
        let w = self.weight(name, &[out, inp])?;
        self.g.add(Op::Linear, &[x, w])
    }

    fn norm(&mut self, x: NodeId, name: &str, dim: usize) -> Result<NodeId, TypeError> {
        let w = self.weight(name, &[dim])?;
        self.g.add(
            Op::RmsNorm {
                eps: self.cfg.rms_norm_eps,
            },
            &[x, w],
        )
    }

    fn reshape(&mut self, x: NodeId, dims: Vec<Dim>) -> Result<NodeId, TypeError> {
        self.g.add(Op::Reshape { shape: Shape(dims) }, &[x])
    }

    /// Self-attention of one layer on normalised input `h` `[T, H]`; returns `[T, H]`.
    fn attention(
        &mut self,
        layer: usize,
        h: NodeId,
        positions: NodeId,
        rope: &RopeSpec,
    ) -> Result<NodeId, TypeError> {
        let cfg = self.cfg;
        let (hidden, d) = (cfg.hidden_size, cfg.head_dim);
        let (hq, hkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let t = |s: &str| layer_tensor(layer, s);

        let q = self.linear(h, &t("self_attn.q_proj.weight"), hq * d, hidden)?;
        let q = self.reshape(q, vec![Dim::Seq, fixed(hq), fixed(d)])?;
        let q = self.norm(q, &t("self_attn.q_norm.weight"), d)?;
        let q = self.g.add(Op::Rope(rope.clone()), &[q, positions])?;

        let k = self.linear(h, &t("self_attn.k_proj.weight"), hkv * d, hidden)?;
        let k = self.reshape(k, vec![Dim::Seq, fixed(hkv), fixed(d)])?;
        let k = self.norm(k, &t("self_attn.k_norm.weight"), d)?;
        let k = self.g.add(Op::Rope(rope.clone()), &[k, positions])?;
        let k = self.g.add(
            Op::KvAppend {
                layer: layer as u32,
                kind: KvKind::K,
            },
            &[k],
        )?;

        let v = self.linear(h, &t("self_attn.v_proj.weight"), hkv * d, hidden)?;
        let v = self.reshape(v, vec![Dim::Seq, fixed(hkv), fixed(d)])?;
        let v = self.g.add(
            Op::KvAppend {
                layer: layer as u32,
                kind: KvKind::V,
            },
            &[v],
        )?;

        let scale = 1.0 / (d as f64).sqrt();
        let a = self.g.add(Op::Attention { scale }, &[q, k, v])?;
        let a = self.reshape(a, vec![Dim::Seq, fixed(hq * d)])?;
        self.linear(a, &t("self_attn.o_proj.weight"), hidden, hq * d)
    }

    /// `down(silu(gate(h)) · up(h))`.
    fn dense_mlp(&mut self, layer: usize, h: NodeId) -> Result<NodeId, TypeError> {
        let (hidden, inter) = (self.cfg.hidden_size, self.cfg.intermediate_size);
        let t = |s: &str| layer_tensor(layer, s);
        let gate = self.linear(h, &t("mlp.gate_proj.weight"), inter, hidden)?;
        let up = self.linear(h, &t("mlp.up_proj.weight"), inter, hidden)?;
        let act = self.g.add(Op::Silu, &[gate])?;
        let prod = self.g.add(Op::Mul, &[act, up])?;
        self.linear(prod, &t("mlp.down_proj.weight"), hidden, inter)
    }

    /// Sparse MoE block: router softmax in f32, top-k, optional renormalisation, Σ p_e · expert_e(h).
    fn moe(&mut self, layer: usize, h: NodeId, moe: &MoeConfig) -> Result<NodeId, TypeError> {
        let hidden = self.cfg.hidden_size;
        let (e, k, inter) = (
            moe.num_experts,
            moe.num_experts_per_tok,
            moe.moe_intermediate_size,
        );

        let logits = self.linear(h, &layer_tensor(layer, tensors::ROUTER), e, hidden)?;
        let probs = self.g.add(Op::Softmax, &[logits])?;
        let chosen = self.g.add(Op::TopK { k: k as u32 }, &[probs])?;
        let mut weights = self.g.add(Op::GatherLast, &[probs, chosen])?;
        if moe.norm_topk_prob {
            let sum = self.g.add(Op::ReduceSum { axis: 1 }, &[weights])?;
            let sum = self.reshape(sum, vec![Dim::Seq, fixed(1)])?;
            weights = self.g.add(Op::Div, &[weights, sum])?;
        }

        let x = self.reshape(h, vec![Dim::Seq, fixed(1), fixed(hidden)])?;
        let stack = |me: &mut Self, proj: &str, n: usize, kdim: usize| {
            me.weight(&expert_stack(layer, proj), &[e, n, kdim])
        };
        let w_gate = stack(self, "gate_proj", inter, hidden)?;
        let w_up = stack(self, "up_proj", inter, hidden)?;
        let w_down = stack(self, "down_proj", hidden, inter)?;
        let gate = self.g.add(Op::ExpertLinear, &[x, chosen, w_gate])?;
        let up = self.g.add(Op::ExpertLinear, &[x, chosen, w_up])?;
        let act = self.g.add(Op::Silu, &[gate])?;
        let prod = self.g.add(Op::Mul, &[act, up])?;
        let down = self.g.add(Op::ExpertLinear, &[prod, chosen, w_down])?;

        let weights = self.reshape(weights, vec![Dim::Seq, fixed(k), fixed(1)])?;
        let weighted = self.g.add(Op::Mul, &[down, weights])?;
        self.g.add(Op::ReduceSum { axis: 1 }, &[weighted])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use q3c_models::registry;
    use q3c_models::tensors::{expected_tensors, expert_tensor, EXPERT_PLACEHOLDER};

    /// The weight names a graph binds, expert stacks expanded, with their shapes.
    fn bound_tensors(g: &Graph) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        for (_, name, ty) in g.weights() {
            let dims = ty.shape.resolve(0, 0);
            if name.contains(EXPERT_PLACEHOLDER) {
                for e in 0..dims[0] {
                    out.push((expert_tensor(name, e), dims[1..].to_vec()));
                }
            } else {
                out.push((name.to_string(), dims));
            }
        }
        out.sort();
        out
    }

    #[test]
    fn every_released_config_lowers_verifies_and_binds_exactly_its_checkpoint() {
        for name in registry::names() {
            let cfg = registry::lookup(name).unwrap();
            let g = lower(&cfg).unwrap();
            q3c_ir::verify(&g).unwrap_or_else(|e| panic!("{name}: {e}"));
            let mut expected: Vec<(String, Vec<usize>)> = expected_tensors(&cfg)
                .into_iter()
                .map(|t| (t.name, t.shape))
                .collect();
            expected.sort();
            assert_eq!(bound_tensors(&g), expected, "{name}");
            let logits = g.node(g.output(LOGITS).unwrap());
            assert_eq!(
                *logits.tensor(),
                TensorType::f32(vec![Dim::Seq, fixed(cfg.vocab_size)]),
                "{name}"
            );
        }
    }

    #[test]
    fn lowered_graphs_round_trip_through_text() {
        let cfg = registry::lookup("Qwen3-30B-A3B").unwrap();
        let g = lower(&cfg).unwrap();
        let text = q3c_ir::text::print(&g);
        let back = q3c_ir::text::parse(&text).unwrap();
        q3c_ir::verify(&back).unwrap();
        assert_eq!(q3c_ir::text::print(&back), text);
    }

    #[test]
    fn layer_structure_follows_the_config() {
        let count = |g: &Graph, pred: &dyn Fn(&Op) -> bool| {
            g.node_ids()
                .iter()
                .filter(|&&id| pred(&g.node(id).op))
                .count()
        };
        let dense = lower(&registry::lookup("Qwen3-8B").unwrap()).unwrap();
        assert_eq!(count(&dense, &|op| matches!(op, Op::Attention { .. })), 36);
        assert_eq!(count(&dense, &|op| matches!(op, Op::ExpertLinear)), 0);
        assert_eq!(count(&dense, &|op| matches!(op, Op::Rope(_))), 72);
        let moe = lower(&registry::lookup("Qwen3-30B-A3B").unwrap()).unwrap();
        assert_eq!(count(&moe, &|op| matches!(op, Op::ExpertLinear)), 3 * 48);
        assert_eq!(count(&moe, &|op| matches!(op, Op::TopK { k: 8 })), 48);
        // Tied: lm_head reuses the embedding table.
        let tied = lower(&registry::lookup("Qwen3-0.6B").unwrap()).unwrap();
        assert!(tied.weights().iter().all(|(_, n, _)| *n != LM_HEAD));
    }
}
