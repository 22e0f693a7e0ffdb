//! QKV fusion: projections of the same activation (q, k and v of a layer) become one GEMM.
//!
//! Pattern → replacement:
//! - `linear(x, w_1)`, …, `linear(x, w_n)` (n ≥ 2, weights of one dtype) → `t = linear_group(x, w_1, …, w_n)`;
//!   uses of projection i read `select(t, i)`.
//!
//! The backend runs one kernel over the concatenated output features, so the three projections share one
//! dispatch and one pass of `x` through the cache, and their work items balance over the threads together.
//! Run after `swiglu`, which claims the gate/up pair first; on its own this pass groups them too.

use std::collections::BTreeMap;

use q3c_ir::{Graph, NodeId, Op};

use super::{add_selected, Pass};

pub const PASS: Pass = Pass {
    name: "qkv",
    summary: "q/k/v projections (any linears sharing an input) as one GEMM",
    run,
};

fn run(g: &mut Graph) -> usize {
    let Ok(order) = g.topo_order() else { return 0 };
    // Linear nodes by the activation they read, in dependency order.
    let mut by_input: BTreeMap<NodeId, Vec<NodeId>> = BTreeMap::new();
    for id in order {
        // The logits projection stays a plain linear: it writes the caller's buffer.
        if g.node(id).op == Op::Linear && !g.is_output(id) {
            by_input.entry(g.inputs(id)[0]).or_default().push(id);
        }
    }
    let mut rewrites = 0;
    for (x, linears) in by_input {
        if linears.len() < 2 {
            continue;
        }
        let mut inputs = vec![x];
        inputs.extend(linears.iter().map(|&l| g.inputs(l)[1]));
        let op = Op::LinearGroup {
            n: linears.len() as u32,
        };
        let Some(parts) = add_selected(g, op, &inputs) else {
            continue; // weights of different dtypes
        };
        for (&linear, part) in linears.iter().zip(parts) {
            g.replace_uses(linear, part);
        }
        rewrites += 1;
    }
    g.remove_dead();
    rewrites
}
