//! SwiGLU fusion: the gate and up projections and `silu(gate) · up` become one kernel.
//!
//! Pattern → replacement (each intermediate must have no other reader, graph outputs included):
//! - `mul(silu(linear(x, wg)), linear(x, wu))` → `swiglu(x, wg, wu)`
//! - `mul(silu(expert_linear(x, ids, wg)), expert_linear(x, ids, wu))` → `expert_swiglu(x, ids, wg, wu)`
//!
//! The operands of `mul` may come in either order. The backend computes both dot products per output element
//! in one pass over `x` and applies the gating in registers, so the `[T, I]` gate and up activations are never
//! written to memory.

use q3c_ir::{Graph, NodeId, Op};

use super::Pass;

pub const PASS: Pass = Pass {
    name: "swiglu",
    summary: "gate/up projections + silu(gate)·up in one kernel (dense and experts)",
    run,
};

fn run(g: &mut Graph) -> usize {
    let Ok(order) = g.topo_order() else { return 0 };
    let mut rewrites = 0;
    for mul in order {
        if !g.contains(mul) || g.node(mul).op != Op::Mul {
            continue;
        }
        let [a, b] = g.inputs(mul)[..] else { continue };
        let Some((op, inputs)) = [(a, b), (b, a)]
            .into_iter()
            .find_map(|(act, up)| matched(g, mul, act, up))
        else {
            continue;
        };
        let Ok(fused) = g.add(op, &inputs) else {
            continue;
        };
        g.replace_uses(mul, fused);
        rewrites += 1;
    }
    g.remove_dead();
    rewrites
}

/// `Some((fused op, its inputs))` when `act` is `silu(gate)` and `gate`, `up` are matching projections.
fn matched(g: &Graph, mul: NodeId, act: NodeId, up: NodeId) -> Option<(Op, Vec<NodeId>)> {
    let only_read_by = |n: NodeId, reader: NodeId| g.users(n) == [reader] && !g.is_output(n);
    if g.node(act).op != Op::Silu || !only_read_by(act, mul) || !only_read_by(up, mul) {
        return None;
    }
    let gate = g.inputs(act)[0];
    if !only_read_by(gate, act) {
        return None;
    }
    let (gi, ui) = (g.inputs(gate), g.inputs(up));
    match (&g.node(gate).op, &g.node(up).op) {
        (Op::Linear, Op::Linear) if gi[0] == ui[0] => Some((Op::SwiGlu, vec![gi[0], gi[1], ui[1]])),
        (Op::ExpertLinear, Op::ExpertLinear) if gi[0] == ui[0] && gi[1] == ui[1] => {
            Some((Op::ExpertSwiGlu, vec![gi[0], gi[1], gi[2], ui[2]]))
        }
        _ => None,
    }
}
