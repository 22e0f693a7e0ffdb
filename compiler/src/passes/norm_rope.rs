//! RMSNorm + RoPE fusion: QK-Norm and the rotary embedding of q and k become one kernel.
//!
//! Pattern → replacement (the norm must have no other reader, graph outputs included):
//! - `kv_append(rope(rms_norm(x, w), pos))` → `norm_rope(x, w, pos)` writing the cache (k: the rotated rows go
//!   straight into the KV cache; the rope must have no other reader)
//! - `rope(rms_norm(x, w), pos)` → `norm_rope(x, w, pos)` (q)
//!
//! Each token's heads are normalised into the destination row (the activation, or the cache row at position
//! `past + t`) and rotated in place while the row is still in L1, so neither the normalised nor the rotated
//! `[T, H, d]` tensor is written out and read back.

use q3c_ir::{Graph, Op};

use super::Pass;

pub const PASS: Pass = Pass {
    name: "norm-rope",
    summary: "per-head RMSNorm (QK-Norm) + RoPE (+ the KV-cache write for k) in one kernel",
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
        // Fold the cache write when the rotated rows only go into the cache.
        let append = match g.users(rope)[..] {
            [user] if !g.is_output(rope) => g
                .node(user)
                .op
                .cache()
                .filter(|_| matches!(g.node(user).op, Op::KvAppend { .. }))
                .map(|key| (user, key)),
            _ => None,
        };
        let op = Op::NormRope {
            eps,
            rope: spec.clone(),
            cache: append.map(|(_, key)| key),
        };
        let Ok(fused) = g.add(op, &[x, w, pos]) else {
            continue;
        };
        g.replace_uses(append.map_or(rope, |(kv, _)| kv), fused);
        rewrites += 1;
    }
    g.remove_dead();
    rewrites
}
