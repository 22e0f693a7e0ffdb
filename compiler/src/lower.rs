//! Lowering: one parameterised builder turns any [`Qwen3Config`] into the graph IR.
//!
//! The graph follows transformers' `Qwen3ForCausalLM` / `Qwen3MoeForCausalLM` op for op (see
//! `shared/qwen3/SPEC.md`): embedding, then per layer attention (q/k/v projections, per-head QK-Norm before
//! RoPE, KV-cache append, causal GQA attention, o_proj, residual) and MLP (dense SwiGLU, or MoE: f32
//! softmax router, top-k, optional renormalisation, per-expert SwiGLU, weighted sum), final norm, lm_head.
//! Weight names come from `q3c_models::tensors`, so the graph and the checkpoint check agree by construction.

use q3c_ir::{
    DType, Dim, Graph, InputKind, KvKind, NodeId, Op, RopeSpec, Shape, Shard, TensorType,
    TypeError, Yarn,
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
    lower_sharded(cfg, &Sharding::one())
}

/// How a model is split over the ranks of a sharded job (tensor parallelism, as Megatron-LM splits a
/// transformer): each rank computes a share of the query and KV heads, of every MLP's intermediate
/// features (each expert's, in MoE layers) and of the vocabulary's logits, from its slice of the weights;
/// an all-reduce after each attention and MLP block sums the ranks' partial outputs, and an all-gather
/// puts the logits together. The embedding table is split by vocabulary rows too (each rank embeds the
/// ids of its part, zero for the others', summed by an all-reduce; a tied table is then the logits
/// matrix's slice as well). Norms and the MoE router are whole on every rank. MoE layers split each
/// expert's features or the experts themselves, as [`MoeSplit`] says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sharding {
    pub ranks: usize,
    /// How MoE layers are split.
    pub moe: MoeSplit,
    /// Parts the query heads are split into: `ranks`, or the heads themselves where there are fewer
    /// (ranks then share a head, and compute it alike).
    q_parts: usize,
    /// Likewise for the KV heads.
    kv_parts: usize,
}

/// How the ranks of a sharded model share a MoE layer's experts. Either way every rank routes every
/// token alike and an all-reduce sums the ranks' partial outputs; no tokens travel between ranks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum MoeSplit {
    /// Each expert's intermediate features are split: a rank computes `1/N` of every chosen expert, so
    /// every rank does the same work for any routing.
    #[default]
    Features,
    /// Expert parallelism: a rank holds `E/N` whole experts and computes the chosen ones among them
    /// (the tokens routed to other ranks' experts are dropped on this rank); a decode step waits for the
    /// rank that holds most of the chosen experts.
    Experts,
}

impl MoeSplit {
    pub fn name(self) -> &'static str {
        match self {
            MoeSplit::Features => "features",
            MoeSplit::Experts => "experts",
        }
    }
}

impl Sharding {
    /// No sharding: one process holds the whole model.
    pub fn one() -> Sharding {
        Sharding {
            ranks: 1,
            moe: MoeSplit::Features,
            q_parts: 1,
            kv_parts: 1,
        }
    }

    /// How `cfg` splits over `ranks` ranks, MoE layers as `moe` says, or why it cannot: every split
    /// dimension must divide evenly (heads may also be fewer than the ranks, if they divide them).
    pub fn new(cfg: &Qwen3Config, ranks: usize, moe: MoeSplit) -> Result<Sharding, String> {
        if ranks == 0 {
            return Err("a model needs at least one rank".into());
        }
        let heads = |what: &str, n: usize| {
            if n.is_multiple_of(ranks) {
                Ok(ranks)
            } else if ranks.is_multiple_of(n) {
                Ok(n)
            } else {
                Err(format!(
                    "{n} {what} cannot be split over {ranks} ranks (one must divide the other)"
                ))
            }
        };
        let q_parts = heads("attention heads", cfg.num_attention_heads)?;
        let kv_parts = heads("key-value heads", cfg.num_key_value_heads)?;
        let mut splits = vec![("vocab_size", cfg.vocab_size)];
        if (0..cfg.num_hidden_layers).any(|l| !cfg.is_sparse_layer(l)) {
            splits.push(("intermediate_size", cfg.intermediate_size));
        }
        match (&cfg.moe, moe) {
            (Some(m), MoeSplit::Features) => {
                splits.push(("moe_intermediate_size", m.moe_intermediate_size))
            }
            (Some(m), MoeSplit::Experts) => splits.push(("num_experts", m.num_experts)),
            (None, _) => {}
        }
        for (what, n) in splits {
            if !n.is_multiple_of(ranks) {
                return Err(format!(
                    "{what} {n} cannot be split over {ranks} ranks (not a multiple)"
                ));
            }
        }
        Ok(Sharding {
            ranks,
            moe,
            q_parts,
            kv_parts,
        })
    }

    /// The shard of a weight split into `parts` along `axis` (none on one rank).
    fn shard(&self, axis: u32, parts: usize) -> Option<Shard> {
        (self.ranks > 1).then_some(Shard {
            axis,
            parts: parts as u32,
            ranks: self.ranks as u32,
        })
    }
}

/// Lowers a config to the graph of one rank of `sharding` (every rank runs the same graph on its own
/// slice of the weights); with [`Sharding::one`], to the whole model's.
pub fn lower_sharded(cfg: &Qwen3Config, sharding: &Sharding) -> Result<Graph, TypeError> {
    let mut b = Builder {
        g: Graph::new(),
        cfg,
        dtype: weight_dtype(cfg),
        sharding: *sharding,
    };
    let ids = b.g.add(Op::Input(InputKind::TokenIds), &[])?;
    let positions = b.g.add(Op::Input(InputKind::Positions), &[])?;
    // Each rank holds the rows of its part of the vocabulary (zero for the others' ids, summed after).
    let ranks = sharding.ranks;
    let embed = b.sharded_weight(
        EMBED,
        &[cfg.vocab_size / ranks, cfg.hidden_size],
        sharding.shard(0, ranks),
    )?;
    let x = b.g.add(Op::Embedding, &[embed, ids])?;
    let mut x = b.reduce(x, ranks)?;
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
        let shard = sharding.shard(0, ranks);
        b.sharded_weight(LM_HEAD, &[cfg.vocab_size / ranks, cfg.hidden_size], shard)?
    };
    let logits = b.g.add(Op::Linear, &[x, head])?;
    let logits = b.gather(logits)?;
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
    sharding: Sharding,
}

fn fixed(n: usize) -> Dim {
    Dim::Fixed(n as u64)
}

impl Builder<'_> {
    fn weight(&mut self, name: &str, shape: &[usize]) -> Result<NodeId, TypeError> {
        self.sharded_weight(name, shape, None)
    }

    /// A weight of which this rank binds the slice `shard` (of type `shape`).
    fn sharded_weight(
        &mut self,
        name: &str,
        shape: &[usize],
        shard: Option<Shard>,
    ) -> Result<NodeId, TypeError> {
        let shape = Shape(shape.iter().map(|&n| fixed(n)).collect());
        self.g.add(
            Op::Weight {
                name: name.to_string(),
                ty: TensorType::new(self.dtype, shape),
                shard,
            },
            &[],
        )
    }

    /// `x · wᵀ`, w `[out, inp]`: the checkpoint tensor, or this rank's slice `shard` of it.
    fn linear(
        &mut self,
        x: NodeId,
        name: &str,
        (out, inp): (usize, usize),
        shard: Option<Shard>,
    ) -> Result<NodeId, TypeError> {
        let w = self.sharded_weight(name, &[out, inp], shard)?;
        self.g.add(Op::Linear, &[x, w])
    }

    /// `x · wᵀ` over this rank's `1/parts` of w's output features (w whole: `[out · parts, inp]`).
    fn column_linear(
        &mut self,
        x: NodeId,
        name: &str,
        shape: (usize, usize),
        parts: usize,
    ) -> Result<NodeId, TypeError> {
        let shard = self.sharding.shard(0, parts);
        self.linear(x, name, shape, shard)
    }

    /// `x · wᵀ` over this rank's `1/parts` of w's input features, summed over the ranks (w whole:
    /// `[out, inp · parts]`).
    fn row_linear(
        &mut self,
        x: NodeId,
        name: &str,
        shape: (usize, usize),
        parts: usize,
    ) -> Result<NodeId, TypeError> {
        let shard = self.sharding.shard(1, parts);
        let partial = self.linear(x, name, shape, shard)?;
        self.reduce(partial, parts)
    }

    /// The sum of the ranks' `x` (each of `parts` parts counted once); `x` itself on one rank.
    fn reduce(&mut self, x: NodeId, parts: usize) -> Result<NodeId, TypeError> {
        match self.sharding.ranks {
            1 => Ok(x),
            ranks => self.g.add(
                Op::AllReduce {
                    parts: parts as u32,
                    ranks: ranks as u32,
                },
                &[x],
            ),
        }
    }

    /// The ranks' `x` side by side; `x` itself on one rank.
    fn gather(&mut self, x: NodeId) -> Result<NodeId, TypeError> {
        match self.sharding.ranks {
            1 => Ok(x),
            ranks => self.g.add(
                Op::AllGather {
                    ranks: ranks as u32,
                },
                &[x],
            ),
        }
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
        let Sharding {
            q_parts, kv_parts, ..
        } = self.sharding;
        // This rank's heads.
        let (hq, hkv) = (
            cfg.num_attention_heads / q_parts,
            cfg.num_key_value_heads / kv_parts,
        );
        let t = |s: &str| layer_tensor(layer, s);

        let q = self.column_linear(h, &t("self_attn.q_proj.weight"), (hq * d, hidden), q_parts)?;
        let q = self.reshape(q, vec![Dim::Seq, fixed(hq), fixed(d)])?;
        let q = self.norm(q, &t("self_attn.q_norm.weight"), d)?;
        let q = self.g.add(Op::Rope(rope.clone()), &[q, positions])?;

        let k = self.column_linear(
            h,
            &t("self_attn.k_proj.weight"),
            (hkv * d, hidden),
            kv_parts,
        )?;
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

        let v = self.column_linear(
            h,
            &t("self_attn.v_proj.weight"),
            (hkv * d, hidden),
            kv_parts,
        )?;
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
        self.row_linear(a, &t("self_attn.o_proj.weight"), (hidden, hq * d), q_parts)
    }

    /// `down(silu(gate(h)) · up(h))`.
    fn dense_mlp(&mut self, layer: usize, h: NodeId) -> Result<NodeId, TypeError> {
        let ranks = self.sharding.ranks;
        let (hidden, inter) = (self.cfg.hidden_size, self.cfg.intermediate_size / ranks);
        let t = |s: &str| layer_tensor(layer, s);
        let gate = self.column_linear(h, &t("mlp.gate_proj.weight"), (inter, hidden), ranks)?;
        let up = self.column_linear(h, &t("mlp.up_proj.weight"), (inter, hidden), ranks)?;
        let act = self.g.add(Op::Silu, &[gate])?;
        let prod = self.g.add(Op::Mul, &[act, up])?;
        self.row_linear(prod, &t("mlp.down_proj.weight"), (hidden, inter), ranks)
    }

    /// Sparse MoE block: router softmax in f32, top-k, optional renormalisation, Σ p_e · expert_e(h).
    fn moe(&mut self, layer: usize, h: NodeId, moe: &MoeConfig) -> Result<NodeId, TypeError> {
        let hidden = self.cfg.hidden_size;
        let ranks = self.sharding.ranks;
        let k = moe.num_experts_per_tok;
        // Every rank routes alike and computes its share: of each chosen expert's features, or of the
        // experts (the chosen ones among its own).
        let (e, inter, axes) = match self.sharding.moe {
            MoeSplit::Features => (
                moe.num_experts,
                moe.moe_intermediate_size / ranks,
                [1, 1, 2],
            ),
            MoeSplit::Experts => (moe.num_experts / ranks, moe.moe_intermediate_size, [0; 3]),
        };

        let router = (moe.num_experts, hidden);
        let logits = self.linear(h, &layer_tensor(layer, tensors::ROUTER), router, None)?;
        let probs = self.g.add(Op::Softmax, &[logits])?;
        let chosen = self.g.add(Op::TopK { k: k as u32 }, &[probs])?;
        let mut weights = self.g.add(Op::GatherLast, &[probs, chosen])?;
        if moe.norm_topk_prob {
            let sum = self.g.add(Op::ReduceSum { axis: 1 }, &[weights])?;
            let sum = self.reshape(sum, vec![Dim::Seq, fixed(1)])?;
            weights = self.g.add(Op::Div, &[weights, sum])?;
        }

        let x = self.reshape(h, vec![Dim::Seq, fixed(1), fixed(hidden)])?;
        let stack = |me: &mut Self, proj: &str, n: usize, kdim: usize, axis: u32| {
            let shard = me.sharding.shard(axis, ranks);
            me.sharded_weight(&expert_stack(layer, proj), &[e, n, kdim], shard)
        };
        let w_gate = stack(self, "gate_proj", inter, hidden, axes[0])?;
        let w_up = stack(self, "up_proj", inter, hidden, axes[1])?;
        let w_down = stack(self, "down_proj", hidden, inter, axes[2])?;
        let gate = self.g.add(Op::ExpertLinear, &[x, chosen, w_gate])?;
        let up = self.g.add(Op::ExpertLinear, &[x, chosen, w_up])?;
        let act = self.g.add(Op::Silu, &[gate])?;
        let prod = self.g.add(Op::Mul, &[act, up])?;
        let down = self.g.add(Op::ExpertLinear, &[prod, chosen, w_down])?;

        let weights = self.reshape(weights, vec![Dim::Seq, fixed(k), fixed(1)])?;
        let weighted = self.g.add(Op::Mul, &[down, weights])?;
        let partial = self.g.add(Op::ReduceSum { axis: 1 }, &[weighted])?;
        self.reduce(partial, ranks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use q3c_models::registry;
    use q3c_models::tensors::{expected_tensors, expert_tensor, EXPERT_PLACEHOLDER};

    /// The checkpoint tensors a graph binds, expert stacks expanded, with their shapes (whole, where a
    /// rank binds a slice), sorted.
    fn bound_tensors(g: &Graph) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        for (id, name, ty) in g.weights() {
            let mut dims = ty.shape.resolve(0, 0);
            if let Op::Weight { shard: Some(s), .. } = &g.node(id).op {
                dims[s.axis as usize] *= s.parts as usize;
            }
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

    /// The tensors `cfg`'s checkpoint holds, with their shapes, sorted.
    fn checkpoint_tensors(cfg: &Qwen3Config) -> Vec<(String, Vec<usize>)> {
        let mut expected: Vec<(String, Vec<usize>)> = expected_tensors(cfg)
            .into_iter()
            .map(|t| (t.name, t.shape))
            .collect();
        expected.sort();
        expected
    }

    #[test]
    fn every_released_config_lowers_verifies_and_binds_exactly_its_checkpoint() {
        for name in registry::names() {
            let cfg = registry::lookup(name).unwrap();
            let g = lower(&cfg).unwrap();
            q3c_ir::verify(&g).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(bound_tensors(&g), checkpoint_tensors(&cfg), "{name}");
            let logits = g.node(g.output(LOGITS).unwrap());
            assert_eq!(
                *logits.tensor(),
                TensorType::f32(vec![Dim::Seq, fixed(cfg.vocab_size)]),
                "{name}"
            );
        }
    }

    #[test]
    fn sharded_graphs_bind_slices_of_exactly_the_checkpoint_and_meet_in_collectives() {
        for name in registry::names() {
            let cfg = registry::lookup(name).unwrap();
            for (ranks, moe) in [2, 4, 8].into_iter().flat_map(|r| {
                let splits = [MoeSplit::Features, MoeSplit::Experts];
                splits.into_iter().map(move |m| (r, m))
            }) {
                let name = format!("{name}/{ranks}/{}", moe.name());
                let sharding = Sharding::new(&cfg, ranks, moe).unwrap();
                let g = lower_sharded(&cfg, &sharding).unwrap();
                q3c_ir::verify(&g).unwrap_or_else(|e| panic!("{name}: {e}"));
                // Whole shapes of what the slices come from: the tensors of the checkpoint, no others.
                assert_eq!(bound_tensors(&g), checkpoint_tensors(&cfg), "{name}");
                for (id, stack, ty) in g.weights() {
                    let Op::Weight { shard: Some(s), .. } = &g.node(id).op else {
                        continue;
                    };
                    assert_eq!(s.ranks as usize, ranks, "{name}");
                    // Expert stacks are cut along the experts exactly when split by experts.
                    if stack.contains(EXPERT_PLACEHOLDER) {
                        let experts = cfg.moe.as_ref().unwrap().num_experts;
                        let by_experts = moe == MoeSplit::Experts;
                        assert_eq!(s.axis == 0, by_experts, "{name}: {stack}");
                        let held = ty.shape.resolve(0, 0)[0];
                        let want = if by_experts { experts / ranks } else { experts };
                        assert_eq!(held, want, "{name}: {stack}");
                    }
                }
                // Two all-reduces per layer (attention, MLP), one of the embeddings, the gathered logits.
                let collectives = g
                    .node_ids()
                    .iter()
                    .filter(|&&id| {
                        matches!(g.node(id).op, Op::AllReduce { .. } | Op::AllGather { .. })
                    })
                    .count();
                assert_eq!(collectives, 2 * cfg.num_hidden_layers + 2, "{name}");
                let logits = g.node(g.output(LOGITS).unwrap());
                assert_eq!(
                    *logits.tensor(),
                    TensorType::f32(vec![Dim::Seq, fixed(cfg.vocab_size)])
                );
                let text = q3c_ir::text::print(&g);
                assert_eq!(
                    q3c_ir::text::print(&q3c_ir::text::parse(&text).unwrap()),
                    text
                );
            }
        }
        let cfg = registry::lookup("Qwen3-30B-A3B").unwrap();
        assert!(Sharding::new(&cfg, 3, MoeSplit::Features)
            .unwrap_err()
            .contains("32 attention heads cannot be split over 3 ranks"));
        // 6 experts over 4 ranks: their features split, the experts themselves cannot.
        let mut six = cfg.clone();
        six.moe.as_mut().unwrap().num_experts = 6;
        assert!(Sharding::new(&six, 4, MoeSplit::Features).is_ok());
        assert!(Sharding::new(&six, 4, MoeSplit::Experts)
            .unwrap_err()
            .contains("num_experts 6 cannot be split over 4 ranks"));
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
