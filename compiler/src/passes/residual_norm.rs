//! Residual add + RMSNorm fusion: the residual add and the layer norm that reads it become one kernel.
//!
//! Pattern → replacement:
//! - `rms_norm(add(a, b), w)` (a, b of the same shape) → `t = add_rms_norm(a, b, w)`; uses of the add read
//!   `select(t, 0)` (the updated residual stream), uses of the norm read `select(t, 1)`.
//!
//! The add may have other readers (the next residual add): that is why the fused op returns both values.
//! The kernel writes the sum and normalises it while the row is still in L1, so the residual stream is not
//! read back from memory by a separate norm kernel.

use q3c_ir::{Graph, Op};

use super::{add_selected, Pass};

pub const PASS: Pass = Pass {
    name: "residual-norm",
    summary: "residual add + the next RMSNorm in one kernel",
    run,
};

fn run(g: &mut Graph) -> usize {
    let Ok(order) = g.topo_order() else { return 0 };
    let mut rewrites = 0;
    for norm in order {
        let Op::RmsNorm { eps } = g.node(norm).op else {
            continue;
        };
        let [sum, w] = g.inputs(norm)[..] else {
            continue;
        };
        if g.node(sum).op != Op::Add {
            continue;
        }
        let [a, b] = g.inputs(sum)[..] else { continue };
        let Some([new_sum, normed]) = add_selected(g, Op::AddRmsNorm { eps }, &[a, b, w])
            .and_then(|s| <[_; 2]>::try_from(s).ok())
        else {
            continue; // a broadcasting add
        };
        g.replace_uses(norm, normed);
        g.replace_uses(sum, new_sum);
        rewrites += 1;
    }
    g.remove_dead();
    rewrites
}
