//! MoE routing fusion: router matmul, softmax, top-k, gather and renormalisation become one kernel.
//!
//! Pattern → replacement (every intermediate read only inside the pattern, graph outputs included):
//! - `p = softmax(linear(x, w_router))`, `ids = top_k(p)`, `wts = gather_last(p, ids)`, optionally
//!   `wts = div(wts, reshape(reduce_sum(wts, axis=1)))` → `t = moe_route(x, w_router)` with `renorm` set
//!   when the division is there; uses of `ids` read `select(t, 0)`, uses of the weights `select(t, 1)`.
//!
//! Per token the kernel keeps the `E` router probabilities on its stack and writes only the `k` chosen
//! expert ids and their weights, which feed the grouped expert GEMMs (`expert_linear` / `expert_swiglu`,
//! which touch only the selected experts).

use q3c_ir::{Graph, NodeId, Op};

use super::{add_selected, Pass};

pub const PASS: Pass = Pass {
    name: "moe-route",
    summary: "router matmul + softmax + top-k + renormalisation in one kernel",
    run,
};

fn run(g: &mut Graph) -> usize {
    let Ok(order) = g.topo_order() else { return 0 };
    let mut rewrites = 0;
    for top in order {
        let Some((x, router, k, weights, renorm)) = matched(g, top) else {
            continue;
        };
        let Some([ids, wts]) = add_selected(g, Op::MoeRoute { k, renorm }, &[x, router])
            .and_then(|s| <[_; 2]>::try_from(s).ok())
        else {
            continue;
        };
        // The gather (and the renormalisation) still read the old nodes; nothing reads them afterwards.
        g.replace_uses(top, ids);
        g.replace_uses(weights, wts);
        rewrites += 1;
    }
    g.remove_dead();
    rewrites
}

/// `Some((x, w_router, k, the final weights node, renorm))`.
fn matched(g: &Graph, top: NodeId) -> Option<(NodeId, NodeId, u32, NodeId, bool)> {
    let Op::TopK { k } = g.node(top).op else {
        return None;
    };
    let only = |n: NodeId, readers: &[NodeId]| {
        let mut users = g.users(n);
        users.retain(|u| !readers.contains(u));
        users.is_empty() && !g.is_output(n)
    };
    let probs = g.inputs(top)[0];
    if g.node(probs).op != Op::Softmax {
        return None;
    }
    let logits = g.inputs(probs)[0];
    if g.node(logits).op != Op::Linear || !only(logits, &[probs]) {
        return None;
    }
    // The probabilities feed exactly top_k and one gather of the chosen ids.
    let gather = g
        .users(probs)
        .into_iter()
        .find(|&u| g.node(u).op == Op::GatherLast && g.inputs(u) == [probs, top])?;
    if !only(probs, &[top, gather]) || g.is_output(top) {
        return None;
    }
    let (weights, renorm) = renormalised(g, gather).map_or((gather, false), |div| (div, true));
    let [x, router] = g.inputs(logits)[..] else {
        return None;
    };
    Some((x, router, k, weights, renorm))
}

/// The `div(w, reshape(reduce_sum(w, 1)))` that renormalises `w`, if that is all `w` feeds.
fn renormalised(g: &Graph, w: NodeId) -> Option<NodeId> {
    let users = g.users(w);
    let div = *users.iter().find(|&&u| g.node(u).op == Op::Div)?;
    let sum = *users
        .iter()
        .find(|&&u| matches!(g.node(u).op, Op::ReduceSum { axis: 1 }))?;
    if users.len() != 2 || g.is_output(w) || g.users(sum).len() != 1 || g.is_output(sum) {
        return None;
    }
    let reshape = g.users(sum)[0];
    let is_reshape = matches!(g.node(reshape).op, Op::Reshape { .. });
    (is_reshape
        && g.inputs(div) == [w, reshape]
        && g.users(reshape) == [div]
        && !g.is_output(reshape))
    .then_some(div)
}
