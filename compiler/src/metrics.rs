//! Cost figures read off a graph, for comparing fusion strategies without running anything.

use std::collections::HashMap;

use q3c_ir::{Dim, Graph, NodeId, TensorType};

/// What a graph's kernels do per forward call, per token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Traffic {
    /// Kernels a forward call runs: every node but weights, inputs and views (`reshape`, `select`).
    pub kernels: usize,
    /// Bytes of activations kernels write per token (a KV-cache append counts its one new row); the graph
    /// outputs are not intermediates and are left out.
    pub bytes_written: usize,
    /// Bytes of activations kernels read per token: each kernel reads each activation input once. Weights,
    /// token ids and attention's reads of the whole KV cache (which grow with the context and no fusion
    /// changes) are left out.
    pub bytes_read: usize,
}

impl Traffic {
    /// Written plus read.
    pub fn bytes(&self) -> usize {
        self.bytes_written + self.bytes_read
    }
}

/// Counts the kernels and the per-token activation traffic of `g`.
pub fn traffic(g: &Graph) -> Traffic {
    let is_view = |id: NodeId| g.node(id).op.is_view();
    let is_leaf = |id: NodeId| g.node(id).op.is_leaf();
    // Views resolve to the value they look at (a select to its element, a reshape to its source).
    let mut source: HashMap<NodeId, NodeId> = HashMap::new();
    let order = g.topo_order().unwrap_or_else(|_| g.node_ids());
    for &id in &order {
        let s = if is_view(id) {
            source[&g.inputs(id)[0]]
        } else {
            id
        };
        source.insert(id, s);
    }
    let outputs: Vec<NodeId> = g.outputs().iter().map(|&(_, id)| id).collect();
    let mut t = Traffic {
        kernels: 0,
        bytes_written: 0,
        bytes_read: 0,
    };
    for &id in &order {
        if is_view(id) || is_leaf(id) {
            continue;
        }
        t.kernels += 1;
        if !outputs.contains(&id) {
            t.bytes_written += g
                .node(id)
                .ty
                .elements()
                .iter()
                .map(row_bytes)
                .sum::<usize>();
        }
        for input in g.inputs(id) {
            if is_leaf(source[&input]) {
                continue;
            }
            let ty = g.node(input).tensor();
            if ty.shape.dims().first() == Some(&Dim::Seq) {
                t.bytes_read += row_bytes(ty);
            }
        }
    }
    t
}

/// Bytes of one token's row of a `[T, ...]` or `[KV, ...]` tensor.
fn row_bytes(ty: &TensorType) -> usize {
    ty.shape.resolve(1, 1)[1..].iter().product::<usize>() * ty.dtype.size()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{lower, pipeline, Strategy};

    #[test]
    fn fusion_removes_kernels_and_traffic() {
        let cfg = q3c_models::registry::lookup("Qwen3-0.6B").unwrap();
        let fused = |s: &str| {
            let mut g = lower(&cfg).unwrap();
            pipeline::run(&mut g, &Strategy::parse(s).unwrap(), true, |_, _| {}).unwrap();
            traffic(&g)
        };
        let none = fused("none");
        // Per layer: input norm, q/k/v, 2 q/k norms, 2 ropes, 2 appends, attention, o, add, norm, gate, up,
        // silu, mul, down, add = 20; plus embedding, final norm and lm_head.
        assert_eq!(none.kernels, 28 * 20 + 3);
        let swiglu = fused("swiglu");
        assert_eq!(swiglu.kernels, none.kernels - 28 * 3);
        // Per layer the gate, up and silu rows ([3072] f32) are no longer written and read (6 rows), and the
        // normed input ([1024] f32) is read once instead of twice.
        assert_eq!(none.bytes() - swiglu.bytes(), 28 * (6 * 3072 + 1024) * 4);
        let all = fused("all");
        assert!(all.kernels < swiglu.kernels && all.bytes() < swiglu.bytes());
    }
}
