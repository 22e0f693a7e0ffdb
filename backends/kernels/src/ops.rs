//! One kernel body per op, written once over [`KernelBuilder`] and specialised to the node's constant dims.
//!
//! A body reads `args = [T, step, input pointers..., output pointers...]` (one output pointer, or one per
//! element of a tuple result) and processes work items `[start, end)`;
//! [`q3c_backend_common::items::work_items`] says what an item is for each op (a token row, a panel of
//! output columns, a (token, head) pair, ...). The match below names every op: an op added to the IR
//! without a body here does not compile.

use q3c_abi::step_offsets as so;
use q3c_abi::KV_BLOCK_TOKENS;
use q3c_backend_common::items::{
    broadcast_strides, dims, element_dims, in_dtype, linear_outputs, per_token, LinearTile,
};
use q3c_backend_common::launch::ExpertSplit;
use q3c_backend_common::plan::{Loc, Plan};
use q3c_backend_common::BackendError;
use q3c_ir::{DType, Graph, NodeId, Op};

use crate::builder::{KernelBuilder, MatMul};
use crate::kv::{self, Element};

/// The parameters of a kernel function: `(args, start, end)`.
pub struct Params<B: KernelBuilder> {
    pub args: B::Ptr,
    pub start: B::Int,
    pub end: B::Int,
}

/// Emits the body of node `id`'s kernel. `rope_table` is the address of the node's inverse frequencies
/// (see [`crate::rope_table`]).
pub fn emit<B: KernelBuilder>(
    b: &mut B,
    graph: &Graph,
    plan: &Plan,
    id: NodeId,
    Params { args, start, end }: Params<B>,
    rope_table: Option<B::Ptr>,
) -> Result<(), BackendError> {
    let node = graph.node(id);
    let n_in = graph.inputs(id).len();
    let n_out = node.ty.elements().len();
    let t = b.load_i64(args);
    let step_at = b.off(args, 8);
    let step = b.load_ptr(step_at);
    let ptr: Vec<B::Ptr> = (0..n_in + n_out)
        .map(|i| {
            let at = b.off(args, 16 + 8 * i);
            b.load_ptr(at)
        })
        .collect();
    let (out, outs) = (ptr[n_in], &ptr[n_in..]);
    match &node.op {
        Op::Input(_)
        | Op::Weight { .. }
        | Op::Reshape { .. }
        | Op::Select { .. }
        | Op::AllReduce { .. }
        | Op::AllGather { .. } => {
            return Err(BackendError::Internal(format!(
                "{} has no kernel (a leaf, a view, or a collective the runtime runs)",
                node.op.name()
            )));
        }
        Op::Embedding => {
            let hidden = *dims(graph, id).last().expect("rank");
            let dt = in_dtype(plan, graph, id, 0);
            let table = graph.inputs(id)[0];
            let rows = dims(graph, table)[0];
            // A rank's slice of a vocabulary-sharded table holds the ids from its part's first on; the
            // rows of other ids are zero here (an all-reduce adds the ranks' rows up).
            let first = match graph.node(table).op {
                Op::Weight { shard: Some(s), .. } => Some(part_first(
                    b,
                    step,
                    s.parts as usize,
                    s.ranks as usize,
                    rows,
                )),
                _ => None,
            };
            b.for_range(start, end, 1, |b, row| {
                let at = b.addr(ptr[1], row, 4);
                let tok = b.load_i32(at);
                let dst = b.addr(out, row, hidden * 4);
                let copy = |b: &mut B, tok| {
                    let src = b.addr(ptr[0], tok, hidden * dt.size());
                    widen_row(b, (src, dt), dst, hidden);
                };
                let Some(first) = first else {
                    return copy(b, tok);
                };
                let local = b.sub(tok, first);
                let n = b.iconst(rows);
                let inside = b.ult(local, n);
                b.when(inside, |b| copy(b, local));
                let outside = b.not(inside);
                b.when(outside, |b| zero_row(b, dst, hidden));
            });
        }
        Op::Linear | Op::SwiGlu | Op::LinearGroup { .. } => {
            let x_dims = dims(graph, graph.inputs(id)[0]);
            let k = *x_dims.last().expect("rank");
            let rows_per_token: usize = x_dims[1..x_dims.len() - 1].iter().product();
            let rows = b.mul_c(t, rows_per_token);
            let dt = in_dtype(plan, graph, id, 1);
            let (n, tile) = linear_outputs(graph, id);
            let first_row = b.iconst(0);
            let mm = MatMul {
                k,
                dt,
                rows,
                first_row,
                tile,
            };
            let op = node.op.clone();
            b.for_range(start, end, 1, |b, item| match op {
                // Gate and up (inputs 1, 2), combined per output element as silu(gate) · up.
                Op::SwiGlu => b.matmul_columns(mm, ptr[0], &[ptr[1], ptr[2]], out, n[0], item),
                Op::Linear => b.matmul_columns(mm, ptr[0], &[ptr[1]], out, n[0], item),
                // One GEMM over the matrices' concatenated columns: each item lies in one matrix.
                _ => {
                    let ends: Vec<usize> = n
                        .iter()
                        .scan(0, |acc, &ni| {
                            *acc += ni / tile.width;
                            Some(*acc)
                        })
                        .collect();
                    b.ranges(item, &ends, |b, m, local| {
                        b.matmul_columns(mm, ptr[0], &[ptr[1 + m]], outs[m], n[m], local)
                    });
                }
            });
        }
        Op::ExpertLinear | Op::ExpertSwiGlu => {
            // Grouped (see `q3c_backend_common::launch`): args = [T, step, rows in expert order, offsets
            // (with the used experts after them, `MoeStep::Group`), expert stacks (one, or gate and
            // up)..., rows out in expert order]. `panels · T·slots` items, each a (panel, u) pair: that
            // panel of the u-th used expert's matrices times all of its rows; pairs past the used experts
            // (at most min(E, T·slots)) do nothing.
            let k = dims(graph, graph.inputs(id)[0])[2];
            let dt = in_dtype(plan, graph, id, 2);
            let (n, tile) = linear_outputs(graph, id);
            let experts = element_dims(graph, graph.inputs(id)[2], 0)[0];
            let slots = dims(graph, id)[1];
            let panels = n[0] / tile.width;
            let stacks = &ptr[2..n_in];
            let shape = (k, dt, n[0], tile);
            let used = b.off(ptr[1], 4 * (experts + 1));
            let used_count = b.load_i32(used);
            let rows = b.mul_c(t, slots);
            // A stack split by experts holds a part's `experts`; the table has an entry for every expert.
            let stacks: Vec<B::Ptr> = match ExpertSplit::of(graph, graph.inputs(id)[2]) {
                Some(s) => {
                    let first = part_first(b, step, s.parts, s.ranks, experts);
                    stacks.iter().map(|&w| b.addr(w, first, 8)).collect()
                }
                None => stacks.to_vec(),
            };
            let item = |b: &mut B, u: B::Int, panel: B::Int| {
                let live = b.ult(u, used_count);
                b.when(live, |b| {
                    let at = b.addr(used, u, 4);
                    let at = b.off(at, 4);
                    let expert = b.load_i32(at);
                    expert_panel(b, expert, panel, &ptr, &stacks, out, shape);
                });
            };
            // Few rows (decode): expert-major — nearly every pair is live, and a thread's share streams
            // whole experts' panels in order. Many rows: panel-major, so that the live pairs (one per used
            // expert in each panel) spread evenly over the threads; (panel, u) advance item by item.
            let limit = b.iconst(experts + 1);
            let few = b.ult(rows, limit);
            b.when(few, |b| {
                b.for_range(start, end, 1, |b, i| {
                    let u = b.udiv_c(i, panels);
                    let panel = b.urem_c(i, panels);
                    item(b, u, panel);
                });
            });
            let many = b.not(few);
            b.when(many, |b| {
                let panel = b.udiv(start, rows);
                let panel = b.var_int(panel);
                let u = b.urem(start, rows);
                let u = b.var_int(u);
                b.for_range(start, end, 1, |b, _| {
                    let (uv, pv) = (b.get_int(u), b.get_int(panel));
                    item(b, uv, pv);
                    let next = b.add_c(uv, 1);
                    let wrap = b.ieq(next, rows);
                    let zero = b.iconst(0);
                    let nu = b.select_int(wrap, zero, next);
                    b.set_int(u, nu);
                    let np = b.add_c(pv, 1);
                    let np = b.select_int(wrap, np, pv);
                    b.set_int(panel, np);
                });
            });
        }
        Op::RmsNorm { eps } => {
            let d = *dims(graph, id).last().expect("rank");
            let dt = in_dtype(plan, graph, id, 1);
            b.for_range(start, end, 1, |b, row| {
                let x = b.addr(ptr[0], row, d * 4);
                let o = b.addr(out, row, d * 4);
                rms_row(b, x, ptr[1], dt, o, d, *eps);
            });
        }
        Op::Rope(spec) | Op::NormRope { rope: spec, .. } => {
            let od = dims(graph, id);
            let (heads, d) = (od[1], od[2]);
            let table = rope_table
                .ok_or_else(|| BackendError::Internal("rope without a frequency table".into()))?;
            let scale = spec.attention_scale();
            let norm = match &node.op {
                Op::NormRope { eps, .. } => Some((*eps, in_dtype(plan, graph, id, 1))),
                _ => None,
            };
            let writes_cache = node.op.cache().is_some();
            // The cache holds elements of the plan's KV dtype; other outputs are f32.
            let kv = if writes_cache {
                plan.kv_dtype
            } else {
                DType::F32
            };
            // Normalised rows go to the output (f32) or, before rounding into the cache, to the stack;
            // rotated rows of a q8 cache go to the stack too, to be quantized in groups.
            let normed = (norm.is_some() && kv != DType::F32).then(|| b.stack(heads * d * 4));
            let rotated = (kv == DType::Q8).then(|| b.stack(heads * d * 4));
            let kv_row = kv::row_bytes(kv, d);
            let rows = Rows::load(b, step);
            b.for_range(start, end, 1, |b, tok| {
                let src = b.addr(ptr[0], tok, heads * d * 4);
                // A cache-writing norm_rope puts the token at its position's cache row.
                let row = if writes_cache {
                    rows.cache_row(b, tok)
                } else {
                    tok
                };
                let dst = b.addr(out, row, heads * kv_row);
                let p = rows.pos(b, tok);
                let pf = b.int_to_f32(p);
                let Some((lane, threads)) = b.item_lane() else {
                    // Fused: normalise each head into the output row, then rotate it in place (still
                    // in L1).
                    let src = match norm {
                        Some((eps, dt)) => {
                            let to = normed.unwrap_or(dst);
                            for h in 0..heads {
                                let (x, o) = (b.off(src, h * d * 4), b.off(to, h * d * 4));
                                rms_row(b, x, ptr[1], dt, o, d, eps);
                            }
                            to
                        }
                        None => src,
                    };
                    match rotated {
                        None => rope_token(b, src, (dst, kv), heads, d, pf, table, scale),
                        Some(rot) => {
                            rope_token(b, src, (rot, DType::F32), heads, d, pf, table, scale);
                            b.for_n(heads, |b, h| {
                                let (from, to) = (b.addr(rot, h, d * 4), b.addr(dst, h, kv_row));
                                kv::store_row(b, from, (to, kv), d);
                            });
                        }
                    }
                    return;
                };
                if kv != DType::Q8 {
                    // Threads sharing the token: its heads go to the item's parts in turn, and the
                    // threads of a part split each head's rotation pairs (with the norm fused in).
                    let norm = norm.map(|(eps, dt)| (ptr[1], dt, eps));
                    b.item_parts(|b, parts| {
                        let (part, parts) = parts.unwrap_or_else(|| (b.iconst(0), 1));
                        let heads_end = b.iconst(heads);
                        b.for_range(part, heads_end, parts, |b, h| {
                            let x = b.addr(src, h, d * 4);
                            let o = b.addr(dst, h, kv_row);
                            norm_rope_pairs(b, x, norm, (o, kv), d, pf, table, scale);
                        });
                    });
                    return;
                }
                // A q8 cache quantizes a head's row a group at a time: each thread sharing the token
                // normalises, rotates and stores every `threads`-th head alone.
                let heads_end = b.iconst(heads);
                b.for_range(lane, heads_end, threads, |b, h| {
                    b.alone(|b| {
                        let x = b.addr(src, h, d * 4);
                        let o = b.addr(dst, h, kv_row);
                        let x = match norm {
                            Some((eps, dt)) => {
                                let to = match normed {
                                    Some(stack) => b.addr(stack, h, d * 4),
                                    None => o,
                                };
                                rms_row(b, x, ptr[1], dt, to, d, eps);
                                to
                            }
                            None => x,
                        };
                        let rot = rotated.expect("a q8 cache rotates on the stack");
                        rope_token(b, x, (rot, DType::F32), 1, d, pf, table, scale);
                        kv::store_row(b, rot, (o, kv), d);
                    })
                });
            });
        }
        Op::KvAppend { .. } => {
            let row = per_token(graph, graph.inputs(id)[0]);
            let d = *dims(graph, id).last().expect("rank");
            let heads = row / d;
            let kv = plan.kv_dtype;
            let kv_row = kv::row_bytes(kv, d);
            let rows = Rows::load(b, step);
            b.for_range(start, end, 1, |b, tok| {
                let src = b.addr(ptr[0], tok, row * 4);
                let p = rows.cache_row(b, tok);
                let dst = b.addr(out, p, heads * kv_row);
                match kv {
                    // Quantized head by head, in groups.
                    DType::Q8 => b.for_n(heads, |b, h| {
                        let (from, to) = (b.addr(src, h, d * 4), b.addr(dst, h, kv_row));
                        kv::store_row(b, from, (to, kv), d);
                    }),
                    _ => copy_row(b, src, (dst, kv), row),
                }
            });
        }
        Op::Attention { scale } => {
            let qd = dims(graph, graph.inputs(id)[0]);
            let kd = dims(graph, graph.inputs(id)[1]);
            let vd = dims(graph, graph.inputs(id)[2]);
            // Keys and values are read through the sequences' block tables: they must be the cache.
            for i in [1, 2] {
                if !matches!(plan.input_loc(graph, id, i), Loc::Cache { .. }) {
                    return Err(BackendError::Internal(
                        "attention reads K and V that are not the KV cache".into(),
                    ));
                }
            }
            let kv = plan.kv_dtype;
            let shape = AttentionShape {
                hq: qd[1],
                d: qd[2],
                hkv: kd[1],
                dv: vd[2],
                scale: *scale as f32,
                kv,
                tokens: plan.attention_tokens,
            };
            let rows = Rows::load(b, step);
            b.for_range(start, end, 1, |b, item| {
                attention_item(b, &shape, [ptr[0], ptr[1], ptr[2], out], &rows, t, item)
            });
        }
        Op::Add | Op::Mul | Op::Div => {
            let od = dims(graph, id);
            let ad = dims(graph, graph.inputs(id)[0]);
            let bd = dims(graph, graph.inputs(id)[1]);
            let (sa, sb) = (broadcast_strides(&ad, &od), broadcast_strides(&bd, &od));
            let op = Binary::of(&node.op);
            let out_row = per_token(graph, id);
            b.for_range(start, end, 1, |b, tok| {
                let a0 = b.addr(ptr[0], tok, sa[0] * 4);
                let b0 = b.addr(ptr[1], tok, sb[0] * 4);
                let o0 = b.addr(out, tok, out_row * 4);
                binary_loops(b, op, &od[1..], &sa[1..], &sb[1..], a0, b0, o0);
            });
        }
        Op::Silu => {
            let n = per_token(graph, id);
            b.for_range(start, end, 1, |b, tok| {
                let x = b.addr(ptr[0], tok, n * 4);
                let o = b.addr(out, tok, n * 4);
                map_row(b, n, |b, at| {
                    let (from, to) = (at.ptr(b, x, 4), at.ptr(b, o, 4));
                    if at.is_vector() {
                        let v = b.vload(from);
                        let y = b.vsilu(v);
                        b.vstore(y, to);
                    } else {
                        let v = b.load_f32(from);
                        let y = b.silu(v);
                        b.store_f32(y, to);
                    }
                });
            });
        }
        Op::ReduceSum { axis } => {
            let xd = dims(graph, graph.inputs(id)[0]);
            let axis = *axis as usize;
            if axis == 0 {
                return Err(BackendError::Unsupported(
                    "reduce_sum over the token axis".into(),
                ));
            }
            let outer: usize = xd[1..axis].iter().product();
            let n = xd[axis];
            let inner: usize = xd[axis + 1..].iter().product();
            let (in_tok, out_tok) = (per_token(graph, graph.inputs(id)[0]), per_token(graph, id));
            b.for_range(start, end, 1, |b, tok| {
                let x = b.addr(ptr[0], tok, in_tok * 4);
                let o = b.addr(out, tok, out_tok * 4);
                for ob in 0..outer {
                    b.for_n(inner, |b, i| {
                        let xi = b.addr(x, i, 4);
                        let mut acc = b.fconst(0.0);
                        for j in 0..n {
                            let at = b.off(xi, (ob * n + j) * inner * 4);
                            let v = b.load_f32(at);
                            acc = b.fadd(acc, v);
                        }
                        let oi = b.addr(o, i, 4);
                        let to = b.off(oi, ob * inner * 4);
                        b.store_f32(acc, to);
                    });
                }
            });
        }
        Op::Softmax => {
            let n = *dims(graph, id).last().expect("rank");
            b.for_range(start, end, 1, |b, row| {
                let (x, o) = (b.addr(ptr[0], row, n * 4), b.addr(out, row, n * 4));
                softmax_row(b, x, o, n);
            });
        }
        Op::TopK { k } => {
            let n = *dims(graph, graph.inputs(id)[0]).last().expect("rank");
            let k = *k as usize;
            b.for_range(start, end, 1, |b, row| {
                let (x, o) = (b.addr(ptr[0], row, n * 4), b.addr(out, row, k * 4));
                top_k_row(b, x, n, o, k);
            });
        }
        Op::GatherLast => {
            let n = *dims(graph, graph.inputs(id)[0]).last().expect("rank");
            let k = *dims(graph, id).last().expect("rank");
            b.for_range(start, end, 1, |b, row| {
                let x = b.addr(ptr[0], row, n * 4);
                let idx = b.addr(ptr[1], row, k * 4);
                let o = b.addr(out, row, k * 4);
                gather_row(b, x, idx, o, k);
            });
        }
        Op::AddRmsNorm { eps } => {
            let d = *element_dims(graph, id, 0).last().expect("rank");
            let dt = in_dtype(plan, graph, id, 2);
            b.for_range(start, end, 1, |b, row| {
                let x = b.addr(ptr[0], row, d * 4);
                let y = b.addr(ptr[1], row, d * 4);
                let sum = b.addr(outs[0], row, d * 4);
                let o = b.addr(outs[1], row, d * 4);
                // The sum is written once and normalised while it is still in L1.
                binary_loops(b, Binary::Add, &[d], &[1], &[1], x, y, sum);
                rms_row(b, sum, ptr[2], dt, o, d, *eps);
            });
        }
        Op::MoeRoute { k, renorm } => {
            let h = *dims(graph, graph.inputs(id)[0]).last().expect("rank");
            let experts = graph.node(graph.inputs(id)[1]).tensor().shape.resolve(0, 0)[0];
            let dt = in_dtype(plan, graph, id, 1);
            let (k, renorm) = (*k as usize, *renorm);
            // The token's router probabilities live on the kernel's stack.
            let probs = b.stack(4 * experts);
            b.for_range(start, end, 1, |b, tok| {
                let x = b.addr(ptr[0], tok, h * 4);
                b.for_n(experts, |b, j| {
                    let w = b.addr(ptr[1], j, h * dt.size());
                    let logit = b.dot(x, w, dt, h);
                    let p = b.addr(probs, j, 4);
                    b.store_f32(logit, p);
                });
                softmax_row(b, probs, probs, experts);
                let ids = b.addr(outs[0], tok, k * 4);
                let weights = b.addr(outs[1], tok, k * 4);
                top_k_row(b, probs, experts, ids, k);
                gather_row(b, probs, ids, weights, k);
                if renorm {
                    let w: Vec<B::F32> = (0..k)
                        .map(|j| {
                            let at = b.off(weights, j * 4);
                            b.load_f32(at)
                        })
                        .collect();
                    let sum = w[1..].iter().fold(w[0], |s, &v| b.fadd(s, v));
                    for (j, &v) in w.iter().enumerate() {
                        let q = b.fdiv(v, sum);
                        let at = b.off(weights, j * 4);
                        b.store_f32(q, at);
                    }
                }
            });
        }
    }
    Ok(())
}

/// Where [`map_row`] is in a row: vector `i` of a loop, or element `i` of the tail.
#[derive(Clone, Copy)]
enum At<I> {
    Vector(I),
    Scalar(usize),
}

impl<I: Copy> At<I> {
    /// The address of this position in a row at `base` of elements of `size` bytes.
    fn ptr<B: KernelBuilder<Int = I>>(self, b: &mut B, base: B::Ptr, size: usize) -> B::Ptr {
        match self {
            At::Vector(v) => {
                let lanes = b.lanes();
                b.addr(base, v, lanes * size)
            }
            At::Scalar(i) => b.off(base, i * size),
        }
    }
    fn is_vector(self) -> bool {
        matches!(self, At::Vector(_))
    }
    /// The index of this position's first element.
    fn element<B: KernelBuilder<Int = I>>(self, b: &mut B) -> Element<B> {
        match self {
            At::Vector(v) => {
                let lanes = b.lanes();
                Element::At(b.mul_c(v, lanes))
            }
            At::Scalar(i) => Element::Const(i),
        }
    }
}

/// One item of a grouped expert product: columns `panel · tile.width ..` of expert `expert`'s rows (see
/// `Op::ExpertLinear` in [`emit`]).
fn expert_panel<B: KernelBuilder>(
    b: &mut B,
    expert: B::Int,
    panel: B::Int,
    ptr: &[B::Ptr],
    stacks: &[B::Ptr],
    out: B::Ptr,
    (k, dt, n, tile): (usize, DType, usize, LinearTile),
) {
    let at = b.addr(ptr[1], expert, 4);
    let first_row = b.load_i32(at);
    let at = b.off(at, 4);
    let next = b.load_i32(at);
    let rows = b.sub(next, first_row);
    let w: Vec<B::Ptr> = stacks
        .iter()
        .map(|&stack| {
            let entry = b.addr(stack, expert, 8);
            b.load_ptr(entry)
        })
        .collect();
    let mm = MatMul {
        k,
        dt,
        rows,
        first_row,
        tile,
    };
    b.matmul_columns(mm, ptr[0], &w, out, n, panel);
}

/// The first row (of `per_part` a part) of the part of a split tensor the calling rank holds: the rank is
/// the step's, and rank `r` of `ranks` holds part `r · parts / ranks`.
pub(crate) fn part_first<B: KernelBuilder>(
    b: &mut B,
    step: B::Ptr,
    parts: usize,
    ranks: usize,
    per_part: usize,
) -> B::Int {
    let at = b.off(step, so::RANK as usize);
    let rank = b.load_i64(at);
    let part = b.mul_c(rank, parts);
    let part = b.udiv_c(part, ranks);
    b.mul_c(part, per_part)
}

/// Widens `n` elements of `dt` at `src` (a q8 KV row: bytes times their group's scale) into f32 at `dst`.
fn widen_row<B: KernelBuilder>(b: &mut B, (src, dt): (B::Ptr, DType), dst: B::Ptr, n: usize) {
    let widen = |b: &mut B, at: At<B::Int>| {
        let (from, to) = (at.ptr(b, src, dt.size()), at.ptr(b, dst, 4));
        let scale = (dt == DType::Q8).then(|| {
            let e = at.element(b);
            kv::q8_scale(b, src, n, e)
        });
        if at.is_vector() {
            let v = b.vload_weight(dt, from);
            let v = scaled_vec(b, v, scale);
            b.vstore(v, to);
        } else {
            let v = b.load_weight(dt, from);
            let v = scaled_f32(b, v, scale);
            b.store_f32(v, to);
        }
    };
    if dt == DType::Q8 && !kv::q8_vectors_fit(b, n) {
        // Groups narrower than a vector: element by element.
        for i in 0..n {
            widen(b, At::Scalar(i));
        }
        return;
    }
    map_row(b, n, widen);
}

/// `v` times `scale`, where there is one (a q8 group's).
fn scaled_vec<B: KernelBuilder>(b: &mut B, v: B::Vec, scale: Option<B::F32>) -> B::Vec {
    match scale {
        Some(s) => {
            let s = b.vsplat(s);
            b.vmul(v, s)
        }
        None => v,
    }
}

/// `x` times `scale`, where there is one (a q8 group's).
fn scaled_f32<B: KernelBuilder>(b: &mut B, x: B::F32, scale: Option<B::F32>) -> B::F32 {
    match scale {
        Some(s) => b.fmul(x, s),
        None => x,
    }
}

/// Sets `n` f32 at `dst` to zero.
pub(crate) fn zero_row<B: KernelBuilder>(b: &mut B, dst: B::Ptr, n: usize) {
    map_row(b, n, |b, at| {
        let to = at.ptr(b, dst, 4);
        let zero = b.fconst(0.0);
        if at.is_vector() {
            let v = b.vsplat(zero);
            b.vstore(v, to);
        } else {
            b.store_f32(zero, to);
        }
    });
}

/// Copies `n` f32 from `src` to `dst` as elements of `dt` (f32, or f16 rounded to nearest even).
pub(crate) fn copy_row<B: KernelBuilder>(
    b: &mut B,
    src: B::Ptr,
    (dst, dt): (B::Ptr, DType),
    n: usize,
) {
    map_row(b, n, |b, at| {
        let (from, to) = (at.ptr(b, src, 4), at.ptr(b, dst, dt.size()));
        if at.is_vector() {
            let v = b.vload(from);
            b.vstore_as(dt, v, to);
        } else {
            let v = b.load_f32(from);
            b.store_as(dt, v, to);
        }
    });
}

/// `f(at)` over the `n` elements of a row: whole vectors in a loop, then the tail one element at a time,
/// unrolled.
fn map_row<B: KernelBuilder>(b: &mut B, n: usize, mut f: impl FnMut(&mut B, At<B::Int>)) {
    let lanes = b.lanes();
    match b.item_lane() {
        None => {
            b.for_n(n / lanes, |b, v| f(b, At::Vector(v)));
            for i in n / lanes * lanes..n {
                f(b, At::Scalar(i));
            }
        }
        // Threads sharing the item: every `threads`-th vector from this thread's on, the tail in thread 0.
        Some((lane, threads)) => {
            let vectors = n / lanes;
            if vectors.is_multiple_of(threads) {
                // A constant trip count, which the code generator unrolls: more loads in flight.
                b.for_n(vectors / threads, |b, j| {
                    let step = b.mul_c(j, threads);
                    let v = b.add(lane, step);
                    f(b, At::Vector(v))
                });
            } else {
                let end = b.iconst(vectors);
                b.for_range(lane, end, threads, |b, v| f(b, At::Vector(v)));
            }
            if !n.is_multiple_of(lanes) {
                let zero = b.iconst(0);
                let first = b.ieq(lane, zero);
                b.when(first, |b| {
                    for i in n / lanes * lanes..n {
                        f(b, At::Scalar(i));
                    }
                });
            }
        }
    }
}

/// `Σ_i x[i] · w[i]` over a row of `k` elements (f32 at `x`, `dt` at `w`): [`KernelBuilder::dot`] for a
/// thread alone; where threads share the item, each sums its part of the row as [`map_row`] splits it (so
/// it reads what it wrote there itself) and the parts meet in [`KernelBuilder::share_sum`], each vector of
/// `x` times its group's scale where `w` is a q8 KV row ([`kv::q8_dot_alone`] for a thread alone).
fn dot_row<B: KernelBuilder>(b: &mut B, x: B::Ptr, w: B::Ptr, dt: DType, k: usize) -> B::F32 {
    if dt == DType::Q8 && !kv::q8_vectors_fit(b, k) {
        let wide = b.stack(4 * k);
        widen_row(b, (w, dt), wide, k);
        return dot_row(b, x, wide, DType::F32, k);
    }
    if b.item_lane().is_none() {
        return match dt {
            DType::Q8 => kv::q8_dot_alone(b, x, w, k),
            _ => b.dot(x, w, dt, k),
        };
    }
    let zero = b.fconst(0.0);
    let zeros = b.vsplat(zero);
    let (acc, tail) = (b.var_vec(zeros), b.var_f32(zero));
    map_row(b, k, |b, at| {
        let (xa, wa) = (at.ptr(b, x, 4), at.ptr(b, w, dt.size()));
        let scale = (dt == DType::Q8).then(|| {
            let e = at.element(b);
            kv::q8_scale(b, w, k, e)
        });
        if at.is_vector() {
            let (xv, wv) = (b.vload(xa), b.vload_weight(dt, wa));
            let xv = scaled_vec(b, xv, scale);
            let a = b.get_vec(acc);
            let a = b.vfma(xv, wv, a);
            b.set_vec(acc, a);
        } else {
            let (xs, ws) = (b.load_f32(xa), b.load_weight(dt, wa));
            let xs = scaled_f32(b, xs, scale);
            let t = b.get_f32(tail);
            let t = b.fma(xs, ws, t);
            b.set_f32(tail, t);
        }
    });
    let a = b.get_vec(acc);
    let sum = b.hsum(a);
    let t = b.get_f32(tail);
    let sum = b.fadd(sum, t);
    b.share_sum(sum)
}

/// The epilogue of a matrix product over one output element: the plain dot product, or for SwiGLU
/// `silu(gate) · up`.
pub fn epilogue<B: KernelBuilder>(b: &mut B, parts: &[B::F32]) -> B::F32 {
    match *parts {
        [dot] => dot,
        [gate, up] => {
            let act = b.silu(gate);
            b.fmul(act, up)
        }
        _ => unreachable!("matrix products combine one or two weight matrices"),
    }
}

/// The constant shape of an attention kernel.
struct AttentionShape {
    hq: usize,
    d: usize,
    hkv: usize,
    dv: usize,
    scale: f32,
    /// The element type of the K and V rows (the cache's).
    kv: DType,
    /// Tokens per work item ([`Plan::attention_tokens`]).
    tokens: usize,
}

/// The body of [`Body::Compact`](q3c_backend_common::launch::Body::Compact): moves the step's logit rows
/// (f32 rows of `row_bytes`) of `args[2]` to its front, in order, in its one work item. The rows ascend, so
/// row `i` moves from a row at or after `i`, and in order no row is overwritten before it moves.
pub fn compact<B: KernelBuilder>(
    b: &mut B,
    row_bytes: usize,
    Params { args, start, end }: Params<B>,
) {
    let step_at = b.off(args, 8);
    let step = b.load_ptr(step_at);
    let at = b.off(args, 16);
    let buf = b.load_ptr(at);
    let at = b.off(step, so::LOGIT_ROWS as usize);
    let listed = b.load_i64(at);
    let list = b.load_ptr(at);
    let at = b.off(step, so::N_LOGITS as usize);
    let n = b.load_i64(at);
    let zero = b.iconst(0);
    let every_row = b.ieq(listed, zero);
    let some = b.not(every_row);
    b.for_range(start, end, 1, |b, _| {
        b.when(some, |b| {
            let first = b.iconst(0);
            b.for_range(first, n, 1, |b, i| {
                let at = b.addr(list, i, 4);
                let from = b.load_i32(at);
                let stays = b.ieq(from, i);
                let moves = b.not(stays);
                b.when(moves, |b| {
                    let src = b.addr(buf, from, row_bytes);
                    let dst = b.addr(buf, i, row_bytes);
                    copy_row(b, src, (dst, DType::F32), row_bytes / 4);
                });
            });
        });
    });
}

/// The call's rows as the step describes them (its address is word 1 of every argument block): each row's
/// position and sequence, and each sequence's block table and end.
pub struct Rows<B: KernelBuilder> {
    pos: B::Ptr,
    seq: B::Ptr,
    seqs: B::Ptr,
}

impl<B: KernelBuilder> Rows<B> {
    /// The step's tables.
    pub fn load(b: &mut B, step: B::Ptr) -> Self {
        let field = |b: &mut B, off: i32| {
            let at = b.off(step, off as usize);
            b.load_ptr(at)
        };
        Rows {
            pos: field(b, so::POS),
            seq: field(b, so::SEQ),
            seqs: field(b, so::SEQS),
        }
    }

    /// Row `row`'s position in its sequence.
    pub fn pos(&self, b: &mut B, row: B::Int) -> B::Int {
        let at = b.addr(self.pos, row, 4);
        b.load_i32(at)
    }

    /// Row `row`'s sequence.
    pub fn seq(&self, b: &mut B, row: B::Int) -> B::Int {
        let at = b.addr(self.seq, row, 4);
        b.load_i32(at)
    }

    /// Sequence `seq`'s block table.
    pub fn blocks(&self, b: &mut B, seq: B::Int) -> B::Ptr {
        let entry = b.addr(self.seqs, seq, so::SEQ_BYTES);
        let at = b.off(entry, so::SEQ_BLOCKS as usize);
        b.load_ptr(at)
    }

    /// The row after sequence `seq`'s last row in the call.
    pub fn end(&self, b: &mut B, seq: B::Int) -> B::Int {
        let entry = b.addr(self.seqs, seq, so::SEQ_BYTES);
        let at = b.off(entry, so::SEQ_END as usize);
        b.load_i64(at)
    }

    /// The cache row that row `row`'s keys and values go to.
    pub fn cache_row(&self, b: &mut B, row: B::Int) -> B::Int {
        let seq = self.seq(b, row);
        let blocks = self.blocks(b, seq);
        let p = self.pos(b, row);
        cache_row(b, blocks, p)
    }
}

/// The cache row of position `p` in a sequence whose block table is `blocks`.
fn cache_row<B: KernelBuilder>(b: &mut B, blocks: B::Ptr, p: B::Int) -> B::Int {
    let which = b.udiv_c(p, KV_BLOCK_TOKENS);
    let at = b.addr(blocks, which, 4);
    let block = b.load_i32(at);
    let first = b.mul_c(block, KV_BLOCK_TOKENS);
    let within = b.urem_c(p, KV_BLOCK_TOKENS);
    b.add(first, within)
}

/// One attention work item: the query rows of [`Plan::attention_tokens`] consecutive rows of the call × the
/// query heads of one KV head. The rows are taken a sequence at a time ([`attention_segment`]): a block of
/// rows from several sequences (batched decoding) runs one segment per sequence.
fn attention_item<B: KernelBuilder>(
    b: &mut B,
    s: &AttentionShape,
    bufs: [B::Ptr; 4],
    rows: &Rows<B>,
    t: B::Int,
    item: B::Int,
) {
    let g = b.urem_c(item, s.hkv);
    let block = b.udiv_c(item, s.hkv);
    let b0 = b.mul_c(block, s.tokens);
    let b_next = b.add_c(b0, s.tokens);
    let room = b.ult(t, b_next);
    let b_end = b.select_int(room, t, b_next);
    // Where the item has parts (the warps of a GPU block), each takes every `parts`-th block of keys.
    b.item_parts(|b, parts| {
        let scratch = AttentionScratch::new(b, s);
        attention_rows(b, s, bufs, rows, (b0, b_end, g), &scratch, parts);
    });
}

/// The rows `b0..b_end` of an attention item for the query heads of KV head `g`, a segment at a time.
fn attention_rows<B: KernelBuilder>(
    b: &mut B,
    s: &AttentionShape,
    bufs: [B::Ptr; 4],
    rows: &Rows<B>,
    (b0, b_end, g): (B::Int, B::Int, B::Int),
    scratch: &AttentionScratch<B>,
    parts: Option<(B::Int, usize)>,
) {
    // A segment starts at the block's first row and wherever the sequence changes.
    b.for_range(b0, b_end, 1, |b, r| {
        let first = b.ieq(r, b0);
        let one = b.iconst(1);
        let before = b.sub(r, one);
        let prev = b.select_int(first, r, before);
        let (seq, seq_prev) = (rows.seq(b, r), rows.seq(b, prev));
        let same = b.ieq(seq, seq_prev);
        let changes = b.not(same);
        let starts = b.or(first, changes);
        b.when(starts, |b| {
            let end = rows.end(b, seq);
            let later = b.ult(b_end, end);
            let s1 = b.select_int(later, b_end, end);
            let blocks = rows.blocks(b, seq);
            // Row x of the segment is at position base + x (wrapping arithmetic: base may be "negative").
            let p0 = rows.pos(b, r);
            let base = b.sub(p0, r);
            let segment = Segment {
                t0: r,
                t_end: s1,
                base,
                blocks,
                g,
            };
            attention_segment(b, s, bufs, scratch, &segment, parts);
        });
    });
}

/// The per-row state of an attention item, on the stack: weighted values, running max and sum; and,
/// for a half-precision cache, a key block's K and V rows widened to f32 (see [`attention_segment`]).
struct AttentionScratch<B: KernelBuilder> {
    acc: B::Ptr,
    /// Bytes of a row's accumulators in `acc` ([`Accumulators::scratch_bytes`]).
    acc_row: usize,
    maxes: B::Ptr,
    totals: B::Ptr,
    scores: B::Ptr,
    widened: Option<(B::Ptr, B::Ptr)>,
}

impl<B: KernelBuilder> AttentionScratch<B> {
    fn new(b: &mut B, s: &AttentionShape) -> Self {
        let rows = s.tokens * (s.hq / s.hkv);
        let lanes = b.lanes();
        // Threads sharing an item (the GPU flavour) would each widen the whole block: they read the
        // cache directly.
        let widen = s.kv != DType::F32 && b.item_lane().is_none();
        let acc_row = Accumulators::<B>::scratch_bytes(b, s.dv);
        AttentionScratch {
            acc: b.stack(rows * acc_row),
            acc_row,
            maxes: b.stack(4 * rows),
            totals: b.stack(4 * rows),
            scores: b.stack(4 * lanes),
            widened: widen.then(|| (b.stack(4 * lanes * s.d), b.stack(4 * lanes * s.dv))),
        }
    }
}

/// Rows `t0..t_end` of one sequence (at most [`Plan::attention_tokens`]), row `x` at position `base + x`, its
/// keys and values found through `blocks`, for the query heads of KV head `g`.
struct Segment<B: KernelBuilder> {
    t0: B::Int,
    t_end: B::Int,
    base: B::Int,
    blocks: B::Ptr,
    g: B::Int,
}

/// The attention of one [`Segment`]: its query rows in one pass over the sequence's keys with the softmax
/// online (per row: the running max, the running sum of exponentials and the weighted values, rescaled by
/// `e^(max_old − max_new)` as the max grows). `bufs` = [q, k cache, v cache, out].
///
/// Keys go in blocks of `lanes` (within one cache block, as `KV_BLOCK_TOKENS` is a multiple of every
/// target's lanes): a block's K and V rows are read from memory by the first query row and from L1 by the
/// others (re-reading the cache for every query row made attention memory-bound) — from a half-precision
/// cache, widened to f32 once per block into the scratch rather than once per query row, where the
/// segment has several tokens — and a row's scores for
/// the block form one vector, so the block takes one max, one vector exponential and one rescale of the
/// row's accumulators. A row skips the blocks wholly after its position and masks the keys after it in a
/// partial one; keys after the last whole block go one at a time (a block never reads a cache row past
/// the segment's last position).
fn attention_segment<B: KernelBuilder>(
    b: &mut B,
    s: &AttentionShape,
    [q, k, v, out]: [B::Ptr; 4],
    st: &AttentionScratch<B>,
    seg: &Segment<B>,
    parts: Option<(B::Int, usize)>,
) {
    let group = s.hq / s.hkv;
    let rows = s.tokens * group;
    let lanes = b.lanes();
    debug_assert_eq!(KV_BLOCK_TOKENS % lanes, 0);
    let (acc, maxes, totals, scores) = (st.acc, st.maxes, st.totals, st.scores);
    let (t0, t_end, g) = (seg.t0, seg.t_end, seg.g);
    // The segment's last row sees keys 0..len_max.
    let len_max = b.add(seg.base, t_end);
    let (zero, neg_inf) = (b.fconst(0.0), b.fconst(f32::NEG_INFINITY));
    b.for_n(rows, |b, r| {
        let (m, l) = (b.addr(maxes, r, 4), b.addr(totals, r, 4));
        b.store_f32(neg_inf, m);
        b.store_f32(zero, l);
        let o = b.addr(acc, r, st.acc_row);
        Accumulators::zero_scratch(b, o, s.dv);
    });
    // Query row r: row t0 + r / group, head g · group + r % group; it sees keys 0..len.
    let query = |b: &mut B, r: B::Int| {
        let tok = b.udiv_c(r, group);
        let tok = b.add(t0, tok);
        let head = b.urem_c(r, group);
        let g0 = b.mul_c(g, group);
        let head = b.add(g0, head);
        let qi = b.mul_c(tok, s.hq);
        let qi = b.add(qi, head);
        let len = b.add(seg.base, tok);
        let len = b.add_c(len, 1);
        (tok, qi, len)
    };
    // Cache row c holds KV head g at c · hkv + g.
    let head_row = |b: &mut B, c: B::Int| {
        let r = b.mul_c(c, s.hkv);
        b.add(r, g)
    };
    // Whether row r is a row of this segment that sees key j (or a later one); its q row and length.
    let sees = |b: &mut B, r: B::Int, j: B::Int| {
        let (tok, qi, len) = query(b, r);
        let live = b.ult(tok, t_end);
        let seen = b.ult(j, len);
        (b.and(live, seen), qi, len)
    };
    // The K (or V) row of KV head g at cache row c, as stored.
    let cached = |b: &mut B, cache: B::Ptr, c: B::Int, n: usize| {
        let r = head_row(b, c);
        (b.addr(cache, r, kv::row_bytes(s.kv, n)), s.kv)
    };
    // scale · q_qi · k, k at `kr` of `dt`.
    let score = |b: &mut B, qi: B::Int, (kr, dt): (B::Ptr, DType)| {
        let qr = b.addr(q, qi, s.d * 4);
        let dot = dot_row(b, qr, kr, dt, s.d);
        let sc = b.fconst(s.scale);
        b.fmul(dot, sc)
    };
    // The online-softmax step of row r for scores whose largest is `candidate`: the new max, then
    // `exps(old, new)` gives the old terms' factor c = e^(old − new) and the new terms' sum; the row's
    // total and max are updated and its accumulators loaded, already multiplied by c (returned with their
    // address and the sum).
    let rescale = |b: &mut B, r: B::Int, candidate: B::F32, exps: &mut Exps<B>| {
        let (m, l) = (b.addr(maxes, r, 4), b.addr(totals, r, 4));
        let old = b.load_f32(m);
        let new = b.fmax(old, candidate);
        let (c, sum) = exps(b, old, new);
        let total = b.load_f32(l);
        let total = b.fma(total, c, sum);
        b.store_f32(total, l);
        b.store_f32(new, m);
        let o = b.addr(acc, r, st.acc_row);
        (Accumulators::load(b, o, s.dv, c), o, sum)
    };
    let blocks = b.udiv_c(len_max, lanes);
    let blocked = b.mul_c(blocks, lanes);
    // This part's share of the keys: every `parts`-th block (and key after the last whole block).
    let (part, n_parts) = parts.unwrap_or_else(|| (b.iconst(0), 1));
    let first = b.mul_c(part, lanes);
    let pass = |b: &mut B, widened: Option<(B::Ptr, B::Ptr)>| {
        b.for_range(first, blocked, lanes * n_parts, |b, j0| {
            // The block's keys are consecutive cache rows from c0; key u's K and V rows (from the
            // scratch, if widened there).
            let c0 = cache_row(b, seg.blocks, j0);
            if let Some((kw, vw)) = widened {
                b.for_n(lanes, |b, u| {
                    let c = b.add(c0, u);
                    for (cache, to, n) in [(k, kw, s.d), (v, vw, s.dv)] {
                        let (from, dt) = cached(b, cache, c, n);
                        let to = b.addr(to, u, n * 4);
                        widen_row(b, (from, dt), to, n);
                    }
                });
            }
            // Key u's row of K (which = 0) or V (1).
            let key = |b: &mut B, which: usize, u: B::Int| {
                let (cache, n) = [(k, s.d), (v, s.dv)][which];
                match widened.map(|(kw, vw)| [kw, vw][which]) {
                    Some(w) => (b.addr(w, u, n * 4), DType::F32),
                    None => {
                        let c = b.add(c0, u);
                        cached(b, cache, c, n)
                    }
                }
            };
            b.for_n(rows, |b, r| {
                let (go, qi, len) = sees(b, r, j0);
                b.when(go, |b| {
                    b.for_n(lanes, |b, u| {
                        let j = b.add(j0, u);
                        let kr = key(b, 0, u);
                        let score = score(b, qi, kr);
                        let before = b.ult(j, len);
                        let score = b.select_f32(before, score, neg_inf);
                        let at = b.addr(scores, u, 4);
                        b.store_f32(score, at);
                    });
                    let sv = b.vload(scores);
                    let block_max = b.hmax(sv);
                    let (row, o, _) = rescale(b, r, block_max, &mut |b, old, new| {
                        let d_old = b.fsub(old, new);
                        let c = b.exp(d_old);
                        let new_v = b.vsplat(new);
                        let shifted = b.vsub(sv, new_v);
                        let p = b.vexp(shifted);
                        b.vstore(p, scores);
                        (c, b.hsum(p))
                    });
                    b.for_n(lanes, |b, u| {
                        let at = b.addr(scores, u, 4);
                        let pu = b.load_f32(at);
                        let (vr, dt) = key(b, 1, u);
                        row.add(b, pu, vr, dt, s.dv);
                    });
                    row.keep(b, o);
                });
            });
        });
    };
    match st.widened {
        None => pass(b, None),
        // A q8 block is widened (bytes times scales) once for all rows, a lone token's too: read directly,
        // each query row of the GQA group would convert it again (the widened decode ran 1.3× faster at
        // depth 8192).
        Some(w) if s.kv == DType::Q8 => pass(b, Some(w)),
        // A lone token's rows (decoding) read each f16 or bf16 key directly: widening the block first
        // only adds work there (it ran 0.75× as fast at depth 8192).
        Some(w) => {
            let n = b.sub(t_end, t0);
            let one = b.iconst(1);
            let several = b.ult(one, n);
            b.when(several, |b| pass(b, Some(w)));
            let single = b.not(several);
            b.when(single, |b| pass(b, None));
        }
    }
    // The keys after the last whole block, one at a time.
    let tail = b.add(blocked, part);
    b.for_range(tail, len_max, n_parts, |b, j| {
        let c = cache_row(b, seg.blocks, j);
        b.for_n(rows, |b, r| {
            let (go, qi, _) = sees(b, r, j);
            b.when(go, |b| {
                let kr = cached(b, k, c, s.d);
                let score = score(b, qi, kr);
                // One key: its exponential is the whole sum.
                let (row, o, p) = rescale(b, r, score, &mut |b, old, new| {
                    let (d_old, d_new) = (b.fsub(old, new), b.fsub(score, new));
                    b.exp_pair(d_old, d_new)
                });
                let (vr, dt) = cached(b, v, c, s.dv);
                row.add(b, p, vr, dt, s.dv);
                row.keep(b, o);
            });
        });
    });
    // out = weighted values / sum, for the rows of this segment.
    b.for_n(rows, |b, r| {
        let (tok, qi, _) = query(b, r);
        let live = b.ult(tok, t_end);
        b.when(live, |b| {
            let one = b.fconst(1.0);
            let l = b.addr(totals, r, 4);
            let total = b.load_f32(l);
            let o = b.addr(acc, r, st.acc_row);
            let to = b.addr(out, qi, s.dv * 4);
            if parts.is_none() {
                let inv = b.fdiv(one, total);
                let row = Accumulators::load(b, o, s.dv, inv);
                row.store(b, to, s.dv);
                return;
            }
            // The parts' sums, each rescaled to the largest max of all (a part that saw none of the
            // row's keys has max -inf, so its factor and sums are 0), add up; the first part stores.
            let m = b.addr(maxes, r, 4);
            let m = b.load_f32(m);
            let top = b.parts_max(m);
            let below = b.fsub(m, top);
            let c = b.exp(below);
            let total = b.fmul(total, c);
            let total = b.parts_sum(total);
            let row = Accumulators::load(b, o, s.dv, c);
            let inv = b.fdiv(one, total);
            row.meet_parts(b, inv);
            let zero = b.iconst(0);
            let first = b.ieq(part, zero);
            b.when(first, |b| row.store(b, to, s.dv));
        });
    });
}

/// The exponentials of one online-softmax step: from the old and the new max, the old terms' factor
/// `e^(old − new)` and the sum of the new terms.
type Exps<'a, B> = dyn FnMut(
        &mut B,
        <B as KernelBuilder>::F32,
        <B as KernelBuilder>::F32,
    ) -> (<B as KernelBuilder>::F32, <B as KernelBuilder>::F32)
    + 'a;

/// One query row's weighted sum of value rows while it is updated, in registers: whole vectors, then
/// single lanes. Where threads share the work item ([`KernelBuilder::item_lane`]), each keeps every
/// `threads`-th vector from its index on (the last repeated where the vectors run out: a repeat computes
/// and stores the same values as its owner) and every single lane.
struct Accumulators<B: KernelBuilder> {
    vectors: Vec<(VectorAt<B::Int>, B::Var)>,
    scalars: Vec<B::Var>,
}

/// Which vector of a row: a constant index, or one computed from the thread's index.
#[derive(Clone, Copy)]
enum VectorAt<I> {
    Const(usize),
    At(I),
}

impl<I: Copy> VectorAt<I> {
    /// The vectors of a row of `n` this thread keeps (see [`Accumulators`]).
    fn of_row<B: KernelBuilder<Int = I>>(b: &mut B, n: usize) -> Vec<VectorAt<I>> {
        match b.item_lane() {
            None => (0..n).map(VectorAt::Const).collect(),
            Some(_) if n == 0 => Vec::new(),
            Some((lane, threads)) => (0..n.div_ceil(threads))
                .map(|j| {
                    let i = b.add_c(lane, j * threads);
                    let last = b.iconst(n - 1);
                    let inside = b.ult(i, last);
                    VectorAt::At(b.select_int(inside, i, last))
                })
                .collect(),
        }
    }

    /// Its address in a row at `base` of elements of `size` bytes.
    fn ptr<B: KernelBuilder<Int = I>>(self, b: &mut B, base: B::Ptr, size: usize) -> B::Ptr {
        let lanes = b.lanes();
        match self {
            VectorAt::Const(i) => b.off(base, i * lanes * size),
            VectorAt::At(i) => b.addr(base, i, lanes * size),
        }
    }

    /// The index of its first element.
    fn element<B: KernelBuilder<Int = I>>(self, b: &mut B) -> Element<B> {
        let lanes = b.lanes();
        match self {
            VectorAt::Const(i) => Element::Const(i * lanes),
            VectorAt::At(i) => Element::At(b.mul_c(i, lanes)),
        }
    }
}

/// A thread's accumulators for a row of `dv` values kept between key blocks in its scratch row `o`: the
/// vectors it owns one after the other (slot `j` at `o + j` vectors), then the single lanes. The slots' addresses do
/// not depend on the thread, so the threads of a GPU warp read and write their scratch (thread-local
/// memory) at one address together; for a thread alone they are the row's own layout.
impl<B: KernelBuilder> Accumulators<B> {
    /// Bytes of a scratch row for `dv` values.
    fn scratch_bytes(b: &mut B, dv: usize) -> usize {
        let lanes = b.lanes();
        (VectorAt::of_row(b, dv / lanes).len() * lanes + dv % lanes) * 4
    }

    /// The scratch row at `o` set to zero.
    fn zero_scratch(b: &mut B, o: B::Ptr, dv: usize) {
        let lanes = b.lanes();
        let slots = VectorAt::of_row(b, dv / lanes).len();
        let zero = b.fconst(0.0);
        let z = b.vsplat(zero);
        for j in 0..slots {
            let to = b.off(o, j * lanes * 4);
            b.vstore(z, to);
        }
        for i in 0..dv % lanes {
            let to = b.off(o, (slots * lanes + i) * 4);
            b.store_f32(zero, to);
        }
    }

    /// The accumulators kept in the scratch row at `o`, each multiplied by `c`.
    fn load(b: &mut B, o: B::Ptr, dv: usize, c: B::F32) -> Self {
        let lanes = b.lanes();
        let cv = b.vsplat(c);
        let owned = VectorAt::of_row(b, dv / lanes);
        let slots = owned.len();
        let vectors = owned
            .into_iter()
            .enumerate()
            .map(|(j, i)| {
                let at = b.off(o, j * lanes * 4);
                let x = b.vload(at);
                let x = b.vmul(x, cv);
                (i, b.var_vec(x))
            })
            .collect();
        let scalars = (0..dv % lanes)
            .map(|i| {
                let at = b.off(o, (slots * lanes + i) * 4);
                let x = b.load_f32(at);
                let x = b.fmul(x, c);
                b.var_f32(x)
            })
            .collect();
        Accumulators { vectors, scalars }
    }

    /// Keeps the accumulators in the scratch row at `o` (see [`Accumulators::load`]).
    fn keep(&self, b: &mut B, o: B::Ptr) {
        let lanes = b.lanes();
        for (j, &(_, a)) in self.vectors.iter().enumerate() {
            let y = b.get_vec(a);
            let to = b.off(o, j * lanes * 4);
            b.vstore(y, to);
        }
        for (i, &a) in self.scalars.iter().enumerate() {
            let y = b.get_f32(a);
            let to = b.off(o, (self.vectors.len() * lanes + i) * 4);
            b.store_f32(y, to);
        }
    }

    /// Adds `p ·` the value row at `vj` (elements of `dt`; of a q8 KV row, `p` times each group's scale
    /// multiplies its bytes), of `dv` elements.
    fn add(&self, b: &mut B, p: B::F32, vj: B::Ptr, dt: DType, dv: usize) {
        if dt == DType::Q8 && !kv::q8_vectors_fit(b, dv) {
            let wide = b.stack(4 * dv);
            widen_row(b, (vj, dt), wide, dv);
            return self.add(b, p, wide, DType::F32, dv);
        }
        let lanes = b.lanes();
        let scaled = |b: &mut B, e: Element<B>| -> B::F32 {
            let scale = (dt == DType::Q8).then(|| kv::q8_scale(b, vj, dv, e));
            scaled_f32(b, p, scale)
        };
        let pv = b.vsplat(p);
        for &(i, a) in &self.vectors {
            let pv = match dt {
                DType::Q8 => {
                    let e = i.element(b);
                    let ps = scaled(b, e);
                    b.vsplat(ps)
                }
                _ => pv,
            };
            let at = i.ptr(b, vj, dt.size());
            let x = b.vload_weight(dt, at);
            let prev = b.get_vec(a);
            let y = b.vfma(pv, x, prev);
            b.set_vec(a, y);
        }
        let base = dv / lanes * lanes;
        for (i, &a) in self.scalars.iter().enumerate() {
            let ps = scaled(b, Element::Const(base + i));
            let at = b.off(vj, (base + i) * dt.size());
            let x = b.load_weight(dt, at);
            let prev = b.get_f32(a);
            let y = b.fma(ps, x, prev);
            b.set_f32(a, y);
        }
    }

    /// Inside [`KernelBuilder::item_parts`]: every value summed over the parts, then multiplied by `c`.
    fn meet_parts(&self, b: &mut B, c: B::F32) {
        let cv = b.vsplat(c);
        for &(_, a) in &self.vectors {
            let x = b.get_vec(a);
            let x = b.parts_sum_vec(x);
            let x = b.vmul(x, cv);
            b.set_vec(a, x);
        }
        for &a in &self.scalars {
            let x = b.get_f32(a);
            let x = b.parts_sum(x);
            let x = b.fmul(x, c);
            b.set_f32(a, x);
        }
    }

    /// Writes the accumulators to their elements of the row at `o`, of `dv` elements.
    fn store(&self, b: &mut B, o: B::Ptr, dv: usize) {
        let lanes = b.lanes();
        for &(i, a) in &self.vectors {
            let y = b.get_vec(a);
            let to = i.ptr(b, o, 4);
            b.vstore(y, to);
        }
        let base = dv / lanes * lanes;
        for (i, &a) in self.scalars.iter().enumerate() {
            let y = b.get_f32(a);
            let to = b.off(o, (base + i) * 4);
            b.store_f32(y, to);
        }
    }
}

/// Softmax of `n` f32 at `x` into `o` (which may equal `x`).
fn softmax_row<B: KernelBuilder>(b: &mut B, x: B::Ptr, o: B::Ptr, n: usize) {
    let neg_inf = b.fconst(f32::NEG_INFINITY);
    let max = b.var_f32(neg_inf);
    b.for_n(n, |b, i| {
        let at = b.addr(x, i, 4);
        let v = b.load_f32(at);
        let m = b.get_f32(max);
        let m = b.fmax(m, v);
        b.set_f32(max, m);
    });
    let zero = b.fconst(0.0);
    let total = b.var_f32(zero);
    b.for_n(n, |b, i| {
        let at = b.addr(x, i, 4);
        let v = b.load_f32(at);
        let m = b.get_f32(max);
        let v = b.fsub(v, m);
        let p = b.exp(v);
        let to = b.addr(o, i, 4);
        b.store_f32(p, to);
        let t = b.get_f32(total);
        let t = b.fadd(t, p);
        b.set_f32(total, t);
    });
    let t = b.get_f32(total);
    b.for_n(n, |b, i| {
        let at = b.addr(o, i, 4);
        let v = b.load_f32(at);
        let v = b.fdiv(v, t);
        b.store_f32(v, at);
    });
}

/// Indices (i32) of the `k` largest of `n` f32 at `x` into `o`, largest first, ties to the lower index.
fn top_k_row<B: KernelBuilder>(b: &mut B, x: B::Ptr, n: usize, o: B::Ptr, k: usize) {
    for slot in 0..k {
        // The largest value not already chosen; strict '>' keeps the lower index on ties.
        let unset = b.iconst(usize::MAX);
        let best = b.var_int(unset);
        let neg_inf = b.fconst(f32::NEG_INFINITY);
        let best_v = b.var_f32(neg_inf);
        b.for_n(n, |b, i| {
            let mut taken = b.false_();
            for prev in 0..slot {
                let at = b.off(o, prev * 4);
                let pv = b.load_i32(at);
                let same = b.ieq(pv, i);
                taken = b.or(taken, same);
            }
            let at = b.addr(x, i, 4);
            let v = b.load_f32(at);
            let bv = b.get_f32(best_v);
            let gt = b.fgt(v, bv);
            let cur = b.get_int(best);
            let none_yet = b.ieq(cur, unset);
            let better = b.or(gt, none_yet);
            let free = b.not(taken);
            let pick = b.and(better, free);
            let nb = b.select_int(pick, i, cur);
            let nv = b.select_f32(pick, v, bv);
            b.set_int(best, nb);
            b.set_f32(best_v, nv);
        });
        let bi = b.get_int(best);
        let at = b.off(o, slot * 4);
        b.store_i32(bi, at);
    }
}

/// `o[j] = x[idx[j]]` for `k` i32 indices at `idx`.
fn gather_row<B: KernelBuilder>(b: &mut B, x: B::Ptr, idx: B::Ptr, o: B::Ptr, k: usize) {
    for j in 0..k {
        let at = b.off(idx, j * 4);
        let i = b.load_i32(at);
        let from = b.addr(x, i, 4);
        let v = b.load_f32(from);
        let to = b.off(o, j * 4);
        b.store_f32(v, to);
    }
}

/// RMSNorm of one row: `o[i] = w[i] · x[i] / sqrt(mean(x²) + eps)` for `d` f32 at `x`, weights of `dt` at `w`.
fn rms_row<B: KernelBuilder>(
    b: &mut B,
    x: B::Ptr,
    w: B::Ptr,
    dt: DType,
    o: B::Ptr,
    d: usize,
    eps: f64,
) {
    let ss = dot_row(b, x, x, DType::F32, d);
    let inv_d = b.fconst(1.0 / d as f32);
    let ms = b.fmul(ss, inv_d);
    let eps = b.fconst(eps as f32);
    let ms = b.fadd(ms, eps);
    let root = b.sqrt(ms);
    let one = b.fconst(1.0);
    let inv = b.fdiv(one, root);
    let inv_v = b.vsplat(inv);
    map_row(b, d, |b, at| {
        let (xa, wa, oa) = (at.ptr(b, x, 4), at.ptr(b, w, dt.size()), at.ptr(b, o, 4));
        if at.is_vector() {
            let xv = b.vload(xa);
            let wv = b.vload_weight(dt, wa);
            let y = b.vmul(xv, inv_v);
            let y = b.vmul(wv, y);
            b.vstore(y, oa);
        } else {
            let xv = b.load_f32(xa);
            let wv = b.load_weight(dt, wa);
            let y = b.fmul(xv, inv);
            let y = b.fmul(wv, y);
            b.store_f32(y, oa);
        }
    });
}

/// Rotate-half RoPE of one token's `heads` rows of `d` f32 at `src` into `dst` as elements of `dt` (`dst`
/// may equal `src` for f32), at position `pf` (f32), with the inverse frequencies at `table` and cos/sin
/// multiplied by `scale`.
#[allow(clippy::too_many_arguments)]
fn rope_token<B: KernelBuilder>(
    b: &mut B,
    src: B::Ptr,
    (dst, dt): (B::Ptr, DType),
    heads: usize,
    d: usize,
    pf: B::F32,
    table: B::Ptr,
    scale: f32,
) {
    let half = d / 2;
    b.for_n(half, |b, i| {
        let at = b.addr(table, i, 4);
        let f = b.load_f32(at);
        let angle = b.fmul(pf, f);
        let (c, s) = b.cos_sin(angle);
        let sc = b.fconst(scale);
        let (c, s) = (b.fmul(c, sc), b.fmul(s, sc));
        b.for_n(heads, |b, h| {
            let hd = b.mul_c(h, d);
            let off = b.add(hd, i);
            let (from, to) = (b.addr(src, off, 4), b.addr(dst, off, dt.size()));
            let x0 = b.load_f32(from);
            let at = b.off(from, half * 4);
            let x1 = b.load_f32(at);
            let (x0c, x1s) = (b.fmul(x0, c), b.fmul(x1, s));
            let lo = b.fsub(x0c, x1s);
            let (x1c, x0s) = (b.fmul(x1, c), b.fmul(x0, s));
            let hi = b.fadd(x1c, x0s);
            b.store_as(dt, lo, to);
            let at = b.off(to, half * dt.size());
            b.store_as(dt, hi, at);
        });
    });
}

/// One head's row of `d` f32 at `x`, RMS-normalised first where `norm` = (weights, their dtype, eps) is
/// given, rotated (rotate-half RoPE at position `pf`, inverse frequencies at `table`, cos/sin times
/// `scale`) into `o` as elements of `dt`, with the same arithmetic as [`rms_row`] then [`rope_token`].
/// Threads sharing the item ([`KernelBuilder::item_lane`]) split the pairs `(i, i + d/2)`: each reads and
/// writes only its own pairs (so `o` may be `x`), and the squares' sum meets in
/// [`KernelBuilder::share_sum`].
#[allow(clippy::too_many_arguments)]
fn norm_rope_pairs<B: KernelBuilder>(
    b: &mut B,
    x: B::Ptr,
    norm: Option<(B::Ptr, DType, f64)>,
    (o, dt): (B::Ptr, DType),
    d: usize,
    pf: B::F32,
    table: B::Ptr,
    scale: f32,
) {
    let half = d / 2;
    let (lane, threads) = b.item_lane().unwrap_or_else(|| (b.iconst(0), 1));
    let end = b.iconst(half);
    let pair = |b: &mut B, i: B::Int| {
        let at = b.addr(x, i, 4);
        let x0 = b.load_f32(at);
        let at = b.off(at, half * 4);
        (x0, b.load_f32(at))
    };
    let norm = norm.map(|(w, wdt, eps)| {
        let zero = b.fconst(0.0);
        let squares = b.var_f32(zero);
        b.for_range(lane, end, threads, |b, i| {
            let (x0, x1) = pair(b, i);
            let acc = b.get_f32(squares);
            let acc = b.fma(x0, x0, acc);
            let acc = b.fma(x1, x1, acc);
            b.set_f32(squares, acc);
        });
        let ss = b.get_f32(squares);
        let ss = b.share_sum(ss);
        let inv_d = b.fconst(1.0 / d as f32);
        let ms = b.fmul(ss, inv_d);
        let eps = b.fconst(eps as f32);
        let ms = b.fadd(ms, eps);
        let root = b.sqrt(ms);
        let one = b.fconst(1.0);
        (w, wdt, b.fdiv(one, root))
    });
    b.for_range(lane, end, threads, |b, i| {
        let at = b.addr(table, i, 4);
        let f = b.load_f32(at);
        let angle = b.fmul(pf, f);
        let (c, s) = b.cos_sin(angle);
        let sc = b.fconst(scale);
        let (c, s) = (b.fmul(c, sc), b.fmul(s, sc));
        let (mut x0, mut x1) = pair(b, i);
        if let Some((w, wdt, inv)) = norm {
            let w0 = b.addr(w, i, wdt.size());
            let w1 = b.off(w0, half * wdt.size());
            for (xv, wp) in [(&mut x0, w0), (&mut x1, w1)] {
                let wv = b.load_weight(wdt, wp);
                let y = b.fmul(*xv, inv);
                *xv = b.fmul(wv, y);
            }
        }
        let (x0c, x1s) = (b.fmul(x0, c), b.fmul(x1, s));
        let lo = b.fsub(x0c, x1s);
        let (x1c, x0s) = (b.fmul(x1, c), b.fmul(x0, s));
        let hi = b.fadd(x1c, x0s);
        let to = b.addr(o, i, dt.size());
        b.store_as(dt, lo, to);
        let to = b.off(to, half * dt.size());
        b.store_as(dt, hi, to);
    });
}

/// A broadcasting binary op.
#[derive(Clone, Copy)]
enum Binary {
    Add,
    Mul,
    Div,
}

impl Binary {
    fn of(op: &Op) -> Binary {
        match op {
            Op::Add => Binary::Add,
            Op::Mul => Binary::Mul,
            _ => Binary::Div,
        }
    }
    fn scalar<B: KernelBuilder>(self, b: &mut B, x: B::F32, y: B::F32) -> B::F32 {
        match self {
            Binary::Add => b.fadd(x, y),
            Binary::Mul => b.fmul(x, y),
            Binary::Div => b.fdiv(x, y),
        }
    }
    fn vector<B: KernelBuilder>(self, b: &mut B, x: B::Vec, y: B::Vec) -> B::Vec {
        match self {
            Binary::Add => b.vadd(x, y),
            Binary::Mul => b.vmul(x, y),
            Binary::Div => b.vdiv(x, y),
        }
    }
}

/// Nested loops of a broadcasting binary op over the per-token dims; a contiguous innermost dim runs in
/// vectors.
#[allow(clippy::too_many_arguments)]
fn binary_loops<B: KernelBuilder>(
    b: &mut B,
    op: Binary,
    od: &[usize],
    sa: &[usize],
    sb: &[usize],
    x: B::Ptr,
    y: B::Ptr,
    o: B::Ptr,
) {
    let Some((&n, rest)) = od.split_first() else {
        let (xv, yv) = (b.load_f32(x), b.load_f32(y));
        let r = op.scalar(b, xv, yv);
        b.store_f32(r, o);
        return;
    };
    if rest.is_empty() && sa[0] == 1 && sb[0] == 1 {
        map_row(b, n, |b, at| {
            let (xa, ya, oa) = (at.ptr(b, x, 4), at.ptr(b, y, 4), at.ptr(b, o, 4));
            if at.is_vector() {
                let (xv, yv) = (b.vload(xa), b.vload(ya));
                let r = op.vector(b, xv, yv);
                b.vstore(r, oa);
            } else {
                let (xv, yv) = (b.load_f32(xa), b.load_f32(ya));
                let r = op.scalar(b, xv, yv);
                b.store_f32(r, oa);
            }
        });
        return;
    }
    let out_stride: usize = rest.iter().product();
    b.for_n(n, |b, i| {
        let xi = b.addr(x, i, sa[0] * 4);
        let yi = b.addr(y, i, sb[0] * 4);
        let oi = b.addr(o, i, out_stride * 4);
        binary_loops(b, op, rest, &sa[1..], &sb[1..], xi, yi, oi);
    });
}
