//! How each node's kernel splits its work into items (the unit `parallel_for` hands to a thread, or one GPU
//! thread's share), and the shape helpers the kernels of every backend use.

use q3c_ir::{DType, Graph, NodeId, Op};

use crate::plan::{Loc, Plan};

/// Dims of a node's (tensor) value with T = 1 and one cached position.
pub fn dims(graph: &Graph, id: NodeId) -> Vec<usize> {
    graph.node(id).tensor().shape.resolve(1, 1)
}

/// Dims of element `i` of a node's value (the value itself for a tensor).
pub fn element_dims(graph: &Graph, id: NodeId, i: usize) -> Vec<usize> {
    graph.node(id).ty.elements()[i].shape.resolve(1, 1)
}

/// Output features of each matrix of a linear kernel, and the tile every matrix is cut into.
pub fn linear_outputs(graph: &Graph, id: NodeId) -> (Vec<usize>, LinearTile) {
    let n: Vec<usize> = graph
        .node(id)
        .ty
        .elements()
        .iter()
        .map(|t| t.shape.resolve(1, 1).last().copied().expect("rank >= 1"))
        .collect();
    let common = n.iter().copied().fold(0, gcd);
    (n, LinearTile::for_width(common))
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Product of the dims after the leading `T`.
pub fn per_token(graph: &Graph, id: NodeId) -> usize {
    dims(graph, id)[1..].iter().product()
}

/// Element strides of a broadcasting binary op's operand of dims `s` for an output of dims `out`
/// (0 where the operand broadcasts along a dim).
pub fn broadcast_strides(s: &[usize], out: &[usize]) -> Vec<usize> {
    let mut st = vec![0; s.len()];
    let mut acc = 1;
    for i in (0..s.len()).rev() {
        st[i] = if s[i] == 1 && out[i] != 1 { 0 } else { acc };
        acc *= s[i];
    }
    st
}

/// The weight dtype of input `i`, or F32 for activations.
pub fn in_dtype(plan: &Plan, graph: &Graph, id: NodeId, i: usize) -> DType {
    match plan.input_loc(graph, id, i) {
        Loc::Weight { dtype, .. } => dtype,
        _ => DType::F32,
    }
}

/// Tokens an attention work item takes on a CPU ([`crate::plan::Plan::attention_tokens`]): its query rows
/// (these tokens × the query heads of one KV head) share every K and V row it loads (and its widening from
/// f16/bf16). 8 prefilled 2048 tokens 10–15% faster than 4 (docs/BENCHMARKS.md); 16 measured the same as 8
/// on Qwen3-0.6B and would put 64 KB of accumulators on the stack for the 8-query-head groups of the larger
/// models.
pub const ATTENTION_TOKENS: usize = 8;

/// Tokens an attention work item takes on a GPU, where each of the warp's threads keeps the item's
/// accumulators in local memory (the value measured on the H200; docs/BENCHMARKS.md).
pub const GPU_ATTENTION_TOKENS: usize = 4;

/// Work items of a node's kernel: `count × ⌈T / tokens_per_item⌉` if `scales_with_t`, else `count` alone.
pub struct Items {
    pub count: usize,
    pub scales_with_t: bool,
    pub tokens_per_item: usize,
}

/// How a node's work is split into items (an attention item takes `attention_tokens` tokens).
pub fn work_items(graph: &Graph, id: NodeId, attention_tokens: usize) -> Items {
    let out = element_dims(graph, id, 0);
    let by_t = |count| Items {
        count,
        scales_with_t: true,
        tokens_per_item: 1,
    };
    match &graph.node(id).op {
        Op::Linear | Op::SwiGlu | Op::LinearGroup { .. } => {
            let (n, tile) = linear_outputs(graph, id);
            Items {
                count: n.iter().sum::<usize>() / tile.width,
                scales_with_t: false,
                tokens_per_item: 1,
            }
        }
        Op::MoeRoute { .. } => by_t(1),
        // (panel of output columns, u-th expert with rows) pairs, `panels · T·slots` of them (no more
        // than T·slots experts can have rows); the kernel orders them (see `ops::emit`).
        Op::ExpertLinear | Op::ExpertSwiGlu => {
            let (n, tile) = linear_outputs(graph, id);
            by_t(n[0] / tile.width * out[1])
        }
        Op::RmsNorm { .. } | Op::AddRmsNorm { .. } | Op::Softmax => {
            by_t(out[1..out.len() - 1].iter().product())
        }
        // (block of `attention_tokens` tokens, KV head).
        Op::Attention { .. } => Items {
            count: element_dims(graph, graph.inputs(id)[1], 0)[1],
            scales_with_t: true,
            tokens_per_item: attention_tokens,
        },
        Op::TopK { .. } | Op::GatherLast => by_t(out[1..out.len() - 1].iter().product()),
        _ => by_t(1),
    }
}

/// How a linear kernel splits its work: each work item owns `width` output columns (a weight panel that
/// stays in cache while the activations stream past); rows go through `rows × block_cols` register tiles,
/// leftover rows (and decode, where T = 1) one column at a time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinearTile {
    pub width: usize,
    pub rows: usize,
    pub block_cols: usize,
}

impl LinearTile {
    pub fn for_width(n: usize) -> LinearTile {
        let width = [16, 4, 2, 1]
            .into_iter()
            .find(|w| n.is_multiple_of(*w))
            .expect("1 divides n");
        LinearTile {
            width,
            rows: 4,
            block_cols: width.min(2),
        }
    }
}
