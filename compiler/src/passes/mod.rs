//! Fusion passes. Each is a plain function over the graph, in a file of its own, registered as a [`Pass`];
//! the order they run in is spelled out in [`crate::pipeline`].

pub mod moe_route;
pub mod norm_rope;
pub mod qkv;
pub mod residual_norm;
pub mod swiglu;

use q3c_ir::{Graph, NodeId, Op};

/// A named rewrite of the graph.
#[derive(Clone, Copy, Debug)]
pub struct Pass {
    /// The name strategies, `--after` and the manifest use.
    pub name: &'static str,
    /// One line on what it fuses.
    pub summary: &'static str,
    /// Rewrites the graph in place and returns how many rewrites it made.
    pub run: fn(&mut Graph) -> usize,
}

/// Adds a multi-result fused node and one `select` per element; returns the selects in element order, or
/// `None` if the inputs do not fit the op.
fn add_selected(g: &mut Graph, op: Op, inputs: &[NodeId]) -> Option<Vec<NodeId>> {
    let fused = g.add(op, inputs).ok()?;
    let count = g.node(fused).ty.elements().len();
    (0..count as u32)
        .map(|index| g.add(Op::Select { index }, &[fused]).ok())
        .collect()
}
