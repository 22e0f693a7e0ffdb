//! Memory planning: where each node's value lives during a forward call.
//!
//! Activations are laid out `[max_tokens, ...]` in one scratch arena; buffers whose lifetimes do not overlap
//! share space (first fit over the topological order). Reshapes alias their input, `kv_append` results are
//! the KV cache itself, and the logits output is written straight into the caller's buffer.
//!
//! A tuple (the result of a multi-result fused op) gets one allocation holding its elements side by side,
//! each a `[max_tokens, ...]` block of its own; a `select` is a view of its element's block, like a reshape.

use std::collections::HashMap;

use q3c_abi::WeightOwner;
use q3c_ir::{DType, Dim, Graph, InputKind, KvKind, NodeId, Op, Shard, TensorType};

use crate::BackendError;

/// Where a node's value is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Loc {
    /// Entry `index` of the weight-pointer table (for an expert stack, the first of `E` entries).
    Weight { index: usize, dtype: DType },
    /// The step's token ids.
    Ids,
    /// Positions are not materialised: kernels read each row's from the step.
    Positions,
    /// Scratch arena at `offset` bytes (a buffer of `max_tokens * bytes_per_token`).
    Scratch { offset: usize },
    /// KV-cache pointer `slot` (2·layer + 0 for K, + 1 for V).
    Cache { slot: usize },
    /// The caller's logits buffer.
    Logits,
}

/// The memory plan of one graph.
pub struct Plan {
    pub order: Vec<NodeId>,
    pub loc: HashMap<NodeId, Loc>,
    /// Where each element of a tuple-valued node is.
    pub elements: HashMap<NodeId, Vec<Loc>>,
    /// Weight table entries. A tensor read in two forms (the tied embedding: a bf16 table and a q8 matrix)
    /// has two entries.
    pub weights: Vec<PlanWeight>,
    /// Inputs that read a weight in another form than `loc` says, by (node, input index).
    pub uses: HashMap<(NodeId, usize), Loc>,
    pub scratch_bytes_per_token: usize,
    pub max_tokens: usize,
    pub layers: usize,
    /// KV heads each layer caches (a rank's share, in a sharded model).
    pub kv_heads: usize,
    /// Elements of a cached K or V head row.
    pub head_dim: usize,
    /// Ranks the graph is one of (1: not sharded).
    pub ranks: usize,
    /// The element type of the KV cache (f32; f16, bf16 or q8 groups: the kernels that write it round,
    /// those that read it widen; layout in `q3c_abi::kv_head_row_bytes`). Set by the backend from its
    /// options; f32 unless told.
    pub kv_dtype: DType,
    /// Tokens an attention work item takes: [`crate::items::ATTENTION_TOKENS`] unless the backend sets
    /// another (GPUs: [`crate::items::GPU_ATTENTION_TOKENS`]).
    pub attention_tokens: usize,
}

/// One entry of the weight table.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanWeight {
    /// Checkpoint tensor name.
    pub name: String,
    /// The shape bound (a rank's slice of a sharded weight).
    pub shape: Vec<usize>,
    /// Dtype in the checkpoint.
    pub dtype: DType,
    /// Dtype the kernels read.
    pub read_as: DType,
    /// The slice a rank of a sharded model binds, along an axis of `shape`.
    pub shard: Option<Shard>,
    /// The ranks that bind it, where not every rank does (an expert of a stack split by experts).
    pub owner: Option<WeightOwner>,
}

impl Plan {
    /// Makes the KV cache hold `kv` elements, if a backend can be asked for them and this model's rows
    /// can hold them: a q8 row's f32 scales follow its bytes, so its head_dim must be a multiple of 4.
    pub fn set_kv_dtype(&mut self, kv: DType) -> Result<(), BackendError> {
        match kv {
            DType::Q8 if !self.head_dim.is_multiple_of(4) => {
                return Err(BackendError::Unsupported(format!(
                    "a q8 KV cache for a head_dim of {} (it needs a multiple of 4)",
                    self.head_dim
                )))
            }
            DType::F32 | DType::F16 | DType::BF16 | DType::Q8 => {}
            other => {
                return Err(BackendError::Unsupported(format!(
                    "a KV cache of {other} (f32, f16, bf16 and q8 exist)"
                )))
            }
        }
        self.kv_dtype = kv;
        Ok(())
    }

    /// Where input `i` of node `id` is read from.
    pub fn input_loc(&self, graph: &Graph, id: NodeId, i: usize) -> Loc {
        self.uses
            .get(&(id, i))
            .copied()
            .unwrap_or_else(|| self.loc[&graph.inputs(id)[i]])
    }
}

/// Bytes per token of a `[T, ...]` activation.
pub fn bytes_per_token(graph: &Graph, id: NodeId) -> Result<usize, BackendError> {
    row_bytes(graph.node(id).tensor(), graph.node(id).op.name())
}

fn row_bytes(ty: &TensorType, op: &str) -> Result<usize, BackendError> {
    let dims = ty.shape.dims();
    if dims.first() != Some(&Dim::Seq) || dims[1..].iter().any(|d| !matches!(d, Dim::Fixed(_))) {
        return Err(BackendError::Unsupported(format!(
            "{op} produces {ty}: activations must be [T, constant...]"
        )));
    }
    Ok(ty.shape.resolve(1, 0).iter().product::<usize>() * 4)
}

/// Per-token offsets of a node's elements in its allocation, and the allocation's per-token size.
fn layout(graph: &Graph, id: NodeId) -> Result<(Vec<usize>, usize), BackendError> {
    let node = graph.node(id);
    let mut offsets = Vec::new();
    let mut size = 0;
    for ty in node.ty.elements() {
        offsets.push(size);
        size += row_bytes(ty, node.op.name())?.next_multiple_of(64);
    }
    Ok((offsets, size))
}

/// Weight dtype the kernels read: f16 checkpoints are widened to f32 when bound.
pub fn kernel_dtype(stored: DType) -> DType {
    if stored == DType::F16 {
        DType::F32
    } else {
        stored
    }
}

/// Whether weight node `id` can be bound as [`DType::Q8`]: `[n, k]` matrices (n a multiple of the panel, k of
/// the group), or a stack of them, read only as the matrices of linear-type or expert products (not the
/// embedding table).
fn quantizable(graph: &Graph, id: NodeId) -> bool {
    let users = graph.users(id);
    q8_shape(graph, id) && !users.is_empty() && users.iter().all(|&u| matrix_use(graph, u, id))
}

/// A `[n, k]` matrix, or an expert stack of them, with n a multiple of the q8 panel and k of the group —
/// but a MoE router, which stays as stored whatever the fusion strategy (its product chooses the experts;
/// llama.cpp leaves it unquantized too).
fn q8_shape(graph: &Graph, id: NodeId) -> bool {
    let dims = graph.node(id).tensor().shape.resolve(0, 0);
    let Op::Weight { name, .. } = &graph.node(id).op else {
        return false;
    };
    if name.ends_with(q3c_models::tensors::ROUTER) {
        return false;
    }
    let matrix = if name.contains(q3c_models::tensors::EXPERT_PLACEHOLDER) {
        &dims[1..]
    } else {
        &dims[..]
    };
    matrix.len() == 2
        && matrix[0].is_multiple_of(q3c_ir::Q8_PANEL)
        && matrix[1].is_multiple_of(q3c_ir::Q8_GROUP)
}

/// Whether node `user` reads weight `id` only as the matrix of a linear-type or expert product.
fn matrix_use(graph: &Graph, user: NodeId, id: NodeId) -> bool {
    matches!(
        graph.node(user).op,
        Op::Linear | Op::SwiGlu | Op::LinearGroup { .. } | Op::ExpertLinear | Op::ExpertSwiGlu
    ) && graph.inputs(user)[0] != id
}

/// The memory plan of `graph` with f32/bf16 weights read as stored (f16 widened).
pub fn plan(graph: &Graph, output: &str, max_tokens: usize) -> Result<Plan, BackendError> {
    plan_with(graph, output, max_tokens, None)
}

/// [`plan`], where `quantize` ([`DType::Q8`] or [`DType::Q4`]) binds every matrix of a linear or expert
/// product that allows it in that format — but the logits matrix, which is 6-bit ([`DType::Q6`]) under q4
/// (its error reaches every logit directly; llama.cpp keeps it at 6 bits or more too).
pub fn plan_with(
    graph: &Graph,
    output: &str,
    max_tokens: usize,
    quantize: Option<DType>,
) -> Result<Plan, BackendError> {
    let order = graph
        .topo_order()
        .map_err(|_| BackendError::Internal("graph has a cycle".into()))?;
    let out_id = graph
        .output(output)
        .ok_or_else(|| BackendError::Internal(format!("no output {output}")))?;
    let logits_matrix = logits_product(graph, out_id).map(|id| graph.inputs(id)[1]);
    let quantized_as = |id: NodeId| match quantize {
        Some(DType::Q4) if Some(id) == logits_matrix => DType::Q6,
        Some(DType::Q4) => DType::Q4,
        _ => DType::Q8,
    };
    let mut loc = HashMap::new();
    let mut weights = Vec::new();
    let mut uses = HashMap::new();
    let mut layers = 0;
    let (mut kv_heads, mut head_dim) = (0, 0);
    let mut model_ranks = 1;
    // Root buffer of each node (views — reshape chains, selects — resolve to their source) and the view's
    // per-token byte offset in it.
    let mut root: HashMap<NodeId, NodeId> = HashMap::new();
    let mut view_offset: HashMap<NodeId, usize> = HashMap::new();
    for &id in &order {
        let node = graph.node(id);
        root.insert(id, id);
        view_offset.insert(id, 0);
        match &node.op {
            Op::Weight { name, ty, shard } => {
                let dims = ty.shape.resolve(0, 0);
                let index = weights.len();
                let read_as = if quantize.is_some() && quantizable(graph, id) {
                    quantized_as(id)
                } else {
                    kernel_dtype(ty.dtype)
                };
                let entry = |name: String, shape: Vec<usize>, read_as| PlanWeight {
                    name,
                    shape,
                    dtype: ty.dtype,
                    read_as,
                    shard: *shard,
                    owner: None,
                };
                if name.contains(q3c_models::tensors::EXPERT_PLACEHOLDER) {
                    // Each expert's matrix. A stack split by experts (sharded along its axis 0) still
                    // has an entry for every expert — kernels index the table by expert id — each bound
                    // only by the ranks of the part holding it; otherwise each expert takes the stack's
                    // shard along the same axis, less the leading one.
                    let by_experts = shard.filter(|s| s.axis == 0);
                    let per_part = dims[0];
                    for e in 0..per_part * by_experts.map_or(1, |s| s.parts as usize) {
                        let mut w = entry(
                            q3c_models::tensors::expert_tensor(name, e),
                            dims[1..].to_vec(),
                            read_as,
                        );
                        w.shard = shard.filter(|s| s.axis > 0).map(|s| Shard {
                            axis: s.axis - 1,
                            ..s
                        });
                        w.owner = by_experts.map(|s| WeightOwner {
                            part: e / per_part,
                            parts: s.parts as usize,
                            ranks: s.ranks as usize,
                        });
                        weights.push(w);
                    }
                } else {
                    weights.push(entry(name.clone(), dims.clone(), read_as));
                }
                // A matrix also read otherwise (the tied embedding table): its products read a quantized
                // copy (q8, or q6 as the logits matrix of a q4 model).
                if quantize.is_some() && read_as.is_float() && q8_shape(graph, id) {
                    let products: Vec<_> = graph
                        .users(id)
                        .into_iter()
                        .filter(|&u| matrix_use(graph, u, id))
                        .collect();
                    if !products.is_empty() {
                        let copy = Loc::Weight {
                            index: weights.len(),
                            dtype: quantized_as(id),
                        };
                        weights.push(entry(name.clone(), dims, quantized_as(id)));
                        for u in products {
                            for (i, _) in
                                graph.inputs(u).iter().enumerate().filter(|(_, &n)| n == id)
                            {
                                uses.insert((u, i), copy);
                            }
                        }
                    }
                }
                loc.insert(
                    id,
                    Loc::Weight {
                        index,
                        dtype: read_as,
                    },
                );
            }
            Op::Input(InputKind::TokenIds) => {
                loc.insert(id, Loc::Ids);
            }
            Op::Input(InputKind::Positions) => {
                loc.insert(id, Loc::Positions);
            }
            op if op.cache().is_some() => {
                let (layer, kind) = op.cache().expect("checked");
                layers = layers.max(layer as usize + 1);
                let dims = node.tensor().shape.resolve(0, 0);
                (kv_heads, head_dim) = (dims[1], dims[2]);
                let slot = 2 * layer as usize + usize::from(kind == KvKind::V);
                loc.insert(id, Loc::Cache { slot });
            }
            Op::AllReduce { ranks, .. } | Op::AllGather { ranks } => {
                model_ranks = *ranks as usize;
            }
            Op::Reshape { .. } => {
                let src = graph.inputs(id)[0];
                root.insert(id, root[&src]);
                view_offset.insert(id, view_offset[&src]);
            }
            Op::Select { index } => {
                let src = graph.inputs(id)[0];
                root.insert(id, root[&src]);
                view_offset.insert(
                    id,
                    view_offset[&src] + layout(graph, src)?.0[*index as usize],
                );
            }
            _ => {}
        }
    }
    if root[&out_id] != out_id || logits_product(graph, out_id).is_none() {
        return Err(BackendError::Unsupported(
            "the logits output must be produced by a linear node (or gathered from one)".into(),
        ));
    }

    // Last position at which each root buffer is read.
    let pos: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    let mut last_use: HashMap<NodeId, usize> = HashMap::new();
    for &id in &order {
        for input in graph.inputs(id) {
            let r = root[&input];
            let e = last_use.entry(r).or_insert(0);
            *e = (*e).max(pos[&id]);
        }
    }

    // First-fit allocation of scratch buffers, in units of bytes-per-token.
    let mut free: Vec<(usize, usize)> = Vec::new(); // (offset, size) per token
    let mut live: Vec<(usize, NodeId, usize, usize)> = Vec::new(); // (last use, node, offset, size)
    let mut top = 0usize;
    for (p, &id) in order.iter().enumerate() {
        // Release buffers whose last reader ran before this node.
        live.retain(|&(last, _, off, size)| {
            if last < p {
                free.push((off, size));
                false
            } else {
                true
            }
        });
        if loc.contains_key(&id) || root[&id] != id || id == out_id {
            continue;
        }
        let size = layout(graph, id)?.1;
        free.sort();
        merge_free(&mut free);
        let offset = match free.iter().position(|&(_, s)| s >= size) {
            Some(i) => {
                let (off, s) = free.remove(i);
                if s > size {
                    free.push((off + size, s - size));
                }
                off
            }
            None => {
                top += size;
                top - size
            }
        };
        live.push((last_use.get(&id).copied().unwrap_or(p), id, offset, size));
        loc.insert(
            id,
            Loc::Scratch {
                offset: offset * max_tokens,
            },
        );
    }
    loc.insert(out_id, Loc::Logits);
    let at = |base: Loc, per_token: usize| match base {
        Loc::Scratch { offset } => Ok(Loc::Scratch {
            offset: offset + per_token * max_tokens,
        }),
        _ if per_token == 0 => Ok(base),
        _ => Err(BackendError::Internal(format!(
            "a view at an offset into {base:?}"
        ))),
    };
    for &id in &order {
        if root[&id] != id {
            loc.insert(id, at(loc[&root[&id]], view_offset[&id])?);
        }
    }
    let mut elements = HashMap::new();
    for &id in &order {
        if graph.node(id).ty.tensor().is_none() {
            let (offsets, _) = layout(graph, id)?;
            let locs = offsets
                .into_iter()
                .map(|o| at(loc[&id], o))
                .collect::<Result<Vec<_>, _>>()?;
            elements.insert(id, locs);
        }
    }
    Ok(Plan {
        order,
        loc,
        elements,
        weights,
        uses,
        scratch_bytes_per_token: top,
        max_tokens,
        layers,
        kv_heads,
        head_dim,
        ranks: model_ranks,
        kv_dtype: DType::F32,
        attention_tokens: crate::items::ATTENTION_TOKENS,
    })
}

/// The matrix product that computes the logits output `out_id`: the output itself, or the product whose
/// slices the output gathers from the ranks of a sharded model.
pub fn logits_product(graph: &Graph, out_id: NodeId) -> Option<NodeId> {
    let id = match graph.node(out_id).op {
        Op::AllGather { .. } => graph.inputs(out_id)[0],
        _ => out_id,
    };
    matches!(graph.node(id).op, Op::Linear).then_some(id)
}

fn merge_free(free: &mut Vec<(usize, usize)>) {
    let mut merged: Vec<(usize, usize)> = Vec::with_capacity(free.len());
    for &(off, size) in free.iter() {
        match merged.last_mut() {
            Some(last) if last.0 + last.1 == off => last.1 += size,
            _ => merged.push((off, size)),
        }
    }
    *free = merged;
}

#[cfg(test)]
mod tests {
    use super::*;
    use q3c_models::registry::lookup;

    fn quantized_plan(model: &str, format: DType) -> (Graph, Plan) {
        let graph = q3c_compiler::lower(&lookup(model).unwrap()).unwrap();
        let plan = plan_with(&graph, q3c_compiler::LOGITS, 4, Some(format)).unwrap();
        (graph, plan)
    }

    fn q8_plan(model: &str) -> (Graph, Plan) {
        quantized_plan(model, DType::Q8)
    }

    /// A q8 KV cache needs head rows of a multiple of 4 elements (its f32 scales follow the bytes); every
    /// element type a backend holds is accepted for Qwen3's, and others are refused.
    #[test]
    fn kv_dtypes_are_checked_against_the_head_rows() {
        let mut cfg = lookup("Qwen3-0.6B").unwrap();
        let planned = |cfg: &q3c_models::Qwen3Config| {
            plan(&q3c_compiler::lower(cfg).unwrap(), q3c_compiler::LOGITS, 4).unwrap()
        };
        let mut p = planned(&cfg);
        assert_eq!(p.head_dim, 128);
        for kv in [DType::F32, DType::F16, DType::BF16, DType::Q8] {
            p.set_kv_dtype(kv).unwrap();
            assert_eq!(p.kv_dtype, kv);
        }
        assert!(p.set_kv_dtype(DType::I32).is_err());
        cfg.head_dim = 6;
        let mut p = planned(&cfg);
        let err = p.set_kv_dtype(DType::Q8).unwrap_err().to_string();
        assert!(err.contains("head_dim of 6"), "{err}");
        assert_eq!(p.kv_dtype, DType::F32);
        p.set_kv_dtype(DType::F16).unwrap();
    }

    fn forms(plan: &Plan, name: &str) -> Vec<DType> {
        plan.weights
            .iter()
            .filter(|w| w.name == name)
            .map(|w| w.read_as)
            .collect()
    }

    #[test]
    fn q8_binds_layer_matrices_and_a_q8_copy_of_the_tied_embedding_for_the_logits() {
        let (graph, plan) = q8_plan("Qwen3-0.6B");
        let embed = "model.embed_tokens.weight";
        assert_eq!(forms(&plan, embed), [DType::BF16, DType::Q8]);
        assert_eq!(
            forms(&plan, "model.layers.0.mlp.down_proj.weight"),
            [DType::Q8]
        );
        assert_eq!(
            forms(&plan, "model.layers.0.input_layernorm.weight"),
            [DType::BF16]
        );
        let logits = graph.output(q3c_compiler::LOGITS).unwrap();
        let read = |id, i| match plan.input_loc(&graph, id, i) {
            Loc::Weight { index, dtype } => (plan.weights[index].name.clone(), dtype),
            other => panic!("{other:?}"),
        };
        assert_eq!(read(logits, 1), (embed.to_string(), DType::Q8));
        let table = plan
            .order
            .iter()
            .copied()
            .find(|&id| graph.node(id).op == Op::Embedding)
            .unwrap();
        assert_eq!(read(table, 0), (embed.to_string(), DType::BF16));
    }

    #[test]
    fn an_untied_head_is_one_q8_matrix_and_the_embedding_stays_as_stored() {
        let (_, plan) = q8_plan("Qwen3-8B");
        assert_eq!(forms(&plan, "lm_head.weight"), [DType::Q8]);
        assert_eq!(forms(&plan, "model.embed_tokens.weight"), [DType::BF16]);
        assert!(plan.uses.is_empty());
    }

    #[test]
    fn q4_binds_layer_and_expert_matrices_and_the_logits_matrix_in_q6() {
        let (_, plan) = quantized_plan("Qwen3-30B-A3B", DType::Q4);
        assert_eq!(forms(&plan, "lm_head.weight"), [DType::Q6]);
        assert_eq!(forms(&plan, "model.embed_tokens.weight"), [DType::BF16]);
        for name in [
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.mlp.experts.0.gate_proj.weight",
            "model.layers.47.mlp.experts.127.down_proj.weight",
        ] {
            assert_eq!(forms(&plan, name), [DType::Q4], "{name}");
        }
        // Not the router (unfused here, so read by a plain linear); norms stay as stored.
        assert_eq!(
            forms(&plan, "model.layers.0.mlp.gate.weight"),
            [DType::BF16]
        );
        assert_eq!(
            forms(&plan, "model.layers.0.post_attention_layernorm.weight"),
            [DType::BF16]
        );
        let (_, tied) = quantized_plan("Qwen3-0.6B", DType::Q4);
        let embed = "model.embed_tokens.weight";
        assert_eq!(forms(&tied, embed), [DType::BF16, DType::Q6]);
    }
}
