//! RMSNorm + RoPE fusion: QK-Norm and the rotary embedding of q and k become one kernel.
//!
//! Pattern → replacement (the norm must have no other reader, graph outputs included):
//! - `rope(rms_norm(x, w), pos)` → `norm_rope(x, w, pos)`
//!
//! Each token's heads are normalised into the output row and rotated in place while the row is still in L1,
//! so the normalised `[T, H, d]` tensor is never written out and read back.

use q3c_ir::{Graph, Op};

use super::Pass;

pub const PASS: Pass = Pass {
    name: "norm-rope",
    summary: "per-head RMSNorm (QK-Norm) + RoPE in one kernel",
    run,
};

fn run(g: &mut Graph) -> usize {
    let Ok(order) = g.topo_order() else { return 0 };
    let mut rewrites = 0;
    for rope in order {
        let Op::Rope(spec) = &g.node(rope).op else {
            continue;
        };
        let [normed, pos] = g.inputs(rope)[..] else {
            continue;
        };
        let Op::RmsNorm { eps } = g.node(normed).op else {
            continue;
        };
        if g.users(normed) != [rope] || g.is_output(normed) {
            continue;
        }
        let [x, w] = g.inputs(normed)[..] else {
            continue;
        };
        let op = Op::NormRope {
            eps,
            rope: spec.clone(),
        };
        let Ok(fused) = g.add(op, &[x, w, pos]) else {
            continue;
        };
        g.replace_uses(rope, fused);
        rewrites += 1;
    }
    g.remove_dead();
    rewrites
}
