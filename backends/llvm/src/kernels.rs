//! One kernel body per graph node, specialised to the node's constant dims; the same body serves the CPU
//! (called by `parallel_for` over item ranges) and the GPU (one thread per item).
//!
//! A body reads `args = [T, past, input pointers..., output pointers...]` and processes work items
//! `[start, end)`; [`q3c_backend_common::items::work_items`] says what an item is for each op.

use inkwell::values::{FloatValue, IntValue, PointerValue};
use inkwell::IntPredicate;
use q3c_backend_common::items::{
    broadcast_strides, dims, element_dims, in_dtype, linear_outputs, per_token,
};
use q3c_backend_common::plan::Plan;
use q3c_backend_common::BackendError;
use q3c_ir::{DType, Graph, NodeId, Op};

use crate::fb::{Fb, Flavor, BUG};
use crate::gemm::{epilogue, MatMul};

/// Emits the body of node `id`'s kernel. `rope_table` is the address of the node's inverse frequencies.
pub fn emit<'ctx>(
    fb: &Fb<'_, 'ctx>,
    graph: &Graph,
    plan: &Plan,
    id: NodeId,
    [args, start, end]: [inkwell::values::BasicValueEnum<'ctx>; 3],
    rope_table: Option<PointerValue<'ctx>>,
) -> Result<(), BackendError> {
    let (args, start, end) = (
        args.into_pointer_value(),
        start.into_int_value(),
        end.into_int_value(),
    );
    let node = graph.node(id);
    let n_in = graph.inputs(id).len();
    let n_out = node.ty.elements().len();
    let t = fb.load_i64(args);
    let past = fb.load_i64(fb.off(args, 8));
    let ptr: Vec<PointerValue> = (0..n_in + n_out)
        .map(|i| fb.load_ptr(fb.off(args, 16 + 8 * i)))
        .collect();
    let (out, outs) = (ptr[n_in], &ptr[n_in..]);
    match &node.op {
        Op::Embedding => {
            let hidden = *dims(graph, id).last().expect("rank");
            let dt = in_dtype(plan, graph, id, 0);
            fb.for_range(start, end, 1, |fb, row| {
                let tok = fb.load_i32_as_i64(fb.addr(ptr[1], row, 4));
                let src = fb.addr(ptr[0], tok, hidden * dt.size());
                let dst = fb.addr(out, row, hidden * 4);
                fb.for_n(hidden, |fb, i| {
                    let v = fb.load_weight(dt, fb.addr(src, i, dt.size()));
                    fb.store(v, fb.addr(dst, i, 4));
                });
            });
        }
        Op::Linear | Op::SwiGlu | Op::LinearGroup { .. } => {
            let x_dims = dims(graph, graph.inputs(id)[0]);
            let k = *x_dims.last().expect("rank");
            let rows_per_token: usize = x_dims[1..x_dims.len() - 1].iter().product();
            let rows = fb.mul_c(t, rows_per_token);
            let dt = in_dtype(plan, graph, id, 1);
            let (n, tile) = linear_outputs(graph, id);
            let mm = MatMul { k, dt, rows, tile };
            fb.for_range(start, end, 1, |fb, item| match node.op {
                // Gate and up (inputs 1, 2), combined per output element by the SwiGLU epilogue.
                Op::SwiGlu => mm.columns(fb, ptr[0], &[ptr[1], ptr[2]], out, n[0], item),
                Op::Linear => mm.columns(fb, ptr[0], &[ptr[1]], out, n[0], item),
                // One GEMM over the matrices' concatenated columns: each item lies in one matrix.
                _ => {
                    let mut first = 0;
                    for (m, &nm) in n.iter().enumerate() {
                        let items = nm / tile.width;
                        let lo = fb.icmp(IntPredicate::UGE, item, fb.i64c(first));
                        let hi = fb.icmp(IntPredicate::ULT, item, fb.i64c(first + items));
                        let inside = fb.b.build_and(lo, hi, "").expect(BUG);
                        fb.when(inside, |fb| {
                            let local = fb.b.build_int_sub(item, fb.i64c(first), "").expect(BUG);
                            mm.columns(fb, ptr[0], &[ptr[1 + m]], outs[m], nm, local);
                        });
                        first += items;
                    }
                }
            });
        }
        Op::ExpertLinear | Op::ExpertSwiGlu => {
            // Expert stacks at inputs 2 (and 3 for SwiGLU).
            let mats: &[usize] = if node.op == Op::ExpertSwiGlu {
                &[2, 3]
            } else {
                &[2]
            };
            let x_dims = dims(graph, graph.inputs(id)[0]);
            let (j, k) = (x_dims[1], x_dims[2]);
            let slots = dims(graph, id)[1];
            let n = dims(graph, id)[2];
            let dt = in_dtype(plan, graph, id, 2);
            fb.for_range(start, end, 1, |fb, item| {
                // item = token · slots + slot
                let tok = fb.udiv_c(item, slots);
                let x = fb.addr(ptr[0], if j == 1 { tok } else { item }, k * 4);
                let expert = fb.load_i32_as_i64(fb.addr(ptr[1], item, 4));
                let w: Vec<PointerValue> = mats
                    .iter()
                    .map(|&m| fb.load_ptr(fb.addr(ptr[m], expert, 8)))
                    .collect();
                let o = fb.addr(out, item, n * 4);
                fb.for_n(n, |fb, col| {
                    let parts: Vec<Vec<FloatValue>> = w
                        .iter()
                        .map(|&w| vec![fb.dot(x, fb.addr(w, col, k * dt.size()), dt, k)])
                        .collect();
                    let v = epilogue(fb, &parts)[0];
                    fb.store(v, fb.addr(o, col, 4));
                });
            });
        }
        Op::RmsNorm { eps } => {
            let d = *dims(graph, id).last().expect("rank");
            let dt = in_dtype(plan, graph, id, 1);
            fb.for_range(start, end, 1, |fb, row| {
                let x = fb.addr(ptr[0], row, d * 4);
                let o = fb.addr(out, row, d * 4);
                rms_row(fb, x, ptr[1], dt, o, d, *eps);
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
            fb.for_range(start, end, 1, |fb, tok| {
                let src = fb.addr(ptr[0], tok, heads * d * 4);
                // A cache-writing norm_rope puts token t at cache row past + t.
                let row = if node.op.cache().is_some() {
                    fb.add(past, tok)
                } else {
                    tok
                };
                let dst = fb.addr(out, row, heads * d * 4);
                // Fused: normalise each head into the output row, then rotate it in place (still in L1).
                let src = match norm {
                    Some((eps, dt)) => {
                        for h in 0..heads {
                            let (x, o) = (fb.off(src, h * d * 4), fb.off(dst, h * d * 4));
                            rms_row(fb, x, ptr[1], dt, o, d, eps);
                        }
                        dst
                    }
                    None => src,
                };
                let p = fb.add(past, tok);
                let pf =
                    fb.b.build_unsigned_int_to_float(p, fb.f32t(), "")
                        .expect(BUG);
                rope_token(fb, src, dst, heads, d, pf, table, scale);
            });
        }
        Op::KvAppend { .. } => {
            let row = per_token(graph, graph.inputs(id)[0]);
            fb.for_range(start, end, 1, |fb, tok| {
                let src = fb.addr(ptr[0], tok, row * 4);
                let dst = fb.addr(out, fb.add(past, tok), row * 4);
                fb.for_n(row, |fb, i| {
                    let v = fb.load_f32(fb.addr(src, i, 4));
                    fb.store(v, fb.addr(dst, i, 4));
                });
            });
        }
        Op::Attention { scale } => {
            let qd = dims(graph, graph.inputs(id)[0]);
            let kd = dims(graph, graph.inputs(id)[1]);
            let vd = dims(graph, graph.inputs(id)[2]);
            let (hq, d, hkv, dv) = (qd[1], qd[2], kd[1], vd[2]);
            let group = hq / hkv;
            let scale = *scale as f32;
            fb.for_range(start, end, 1, |fb, item| {
                let tok = fb.udiv_c(item, hq);
                let g = fb.udiv_c(fb.urem_c(item, hq), group);
                let q = fb.addr(ptr[0], item, d * 4);
                let o = fb.addr(out, item, dv * 4);
                let len = fb.add_c(fb.add(past, tok), 1);
                let key = |fb: &Fb<'_, 'ctx>,
                           base: PointerValue<'ctx>,
                           j: IntValue<'ctx>,
                           width: usize| {
                    let row = fb.add(fb.mul_c(j, hkv), g);
                    fb.addr(base, row, width * 4)
                };
                // scale · q·k_j
                let score = |fb: &Fb<'_, 'ctx>, j: IntValue<'ctx>| {
                    let s = fb.dot(q, key(fb, ptr[1], j, d), DType::F32, d);
                    fb.fmul(s, fb.f32c(scale))
                };
                // One pass (online softmax): the running max, the running sum of exponentials and the
                // weighted values, kept in registers and rescaled by e^(max_old - max_new) as the max grows.
                let lanes = fb.lanes();
                let full = dv / lanes;
                let acc_v: Vec<_> = (0..full).map(|_| fb.var(fb.vsplat_c(0.0))).collect();
                let acc_s: Vec<_> = (full * lanes..dv).map(|_| fb.var(fb.f32c(0.0))).collect();
                let max = fb.var(fb.f32c(f32::NEG_INFINITY));
                let total = fb.var(fb.f32c(0.0));
                fb.for_range(fb.i64c(0), len, 1, |fb, j| {
                    let s = score(fb, j);
                    let old = fb.getf(max);
                    let new = fb.fmax(old, s);
                    let e = fb.unpack(fb.vexp(fb.pack(&[fb.fsub(old, new), fb.fsub(s, new)])));
                    let (c, p) = (e[0], e[1]);
                    fb.set(total, fb.fma(fb.getf(total), c, p));
                    fb.set(max, new);
                    let vj = key(fb, ptr[2], j, dv);
                    let (cv, pv) = (fb.vsplat(c), fb.vsplat(p));
                    for (i, &a) in acc_v.iter().enumerate() {
                        let v = fb.vload(fb.off(vj, i * lanes * 4));
                        fb.set(a, fb.vfma(pv, v, fb.fmul(fb.getv(a), cv)));
                    }
                    for (i, &a) in acc_s.iter().enumerate() {
                        let v = fb.load_f32(fb.off(vj, (full * lanes + i) * 4));
                        fb.set(a, fb.fma(p, v, fb.fmul(fb.getf(a), c)));
                    }
                });
                let inv = fb.fdiv(fb.f32c(1.0), fb.getf(total));
                for (i, &a) in acc_v.iter().enumerate() {
                    let y = fb.fmul(fb.getv(a), fb.vsplat(inv));
                    fb.store(y, fb.off(o, i * lanes * 4));
                }
                for (i, &a) in acc_s.iter().enumerate() {
                    fb.store(fb.fmul(fb.getf(a), inv), fb.off(o, (full * lanes + i) * 4));
                }
            });
        }
        Op::Add | Op::Mul | Op::Div => {
            let od = dims(graph, id);
            let ad = dims(graph, graph.inputs(id)[0]);
            let bd = dims(graph, graph.inputs(id)[1]);
            let (sa, sb) = (broadcast_strides(&ad, &od), broadcast_strides(&bd, &od));
            let op = node.op.clone();
            fb.for_range(start, end, 1, |fb, tok| {
                let a0 = fb.addr(ptr[0], tok, sa[0] * 4);
                let b0 = fb.addr(ptr[1], tok, sb[0] * 4);
                let o0 = fb.addr(out, tok, per_token(graph, id) * 4);
                binary_loops(fb, &op, &od[1..], &sa[1..], &sb[1..], a0, b0, o0);
            });
        }
        Op::Silu => {
            let n = per_token(graph, id);
            fb.for_range(start, end, 1, |fb, tok| {
                let x = fb.addr(ptr[0], tok, n * 4);
                let o = fb.addr(out, tok, n * 4);
                fb.for_n(n, |fb, i| {
                    let v = fb.load_f32(fb.addr(x, i, 4));
                    let y = fb.unpack(fb.vsilu(fb.pack(&[v])))[0];
                    fb.store(y, fb.addr(o, i, 4));
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
            fb.for_range(start, end, 1, |fb, tok| {
                let x = fb.addr(ptr[0], tok, in_tok * 4);
                let o = fb.addr(out, tok, out_tok * 4);
                for ob in 0..outer {
                    fb.for_n(inner, |fb, i| {
                        let xi = fb.addr(x, i, 4);
                        let mut acc = fb.f32c(0.0);
                        for j in 0..n {
                            acc = fb.fadd(acc, fb.load_f32(fb.off(xi, (ob * n + j) * inner * 4)));
                        }
                        fb.store(acc, fb.off(fb.addr(o, i, 4), ob * inner * 4));
                    });
                }
            });
        }
        Op::Softmax => {
            let n = *dims(graph, id).last().expect("rank");
            fb.for_range(start, end, 1, |fb, row| {
                softmax_row(fb, fb.addr(ptr[0], row, n * 4), fb.addr(out, row, n * 4), n);
            });
        }
        Op::TopK { k } => {
            let n = *dims(graph, graph.inputs(id)[0]).last().expect("rank");
            let k = *k as usize;
            fb.for_range(start, end, 1, |fb, row| {
                top_k_row(
                    fb,
                    fb.addr(ptr[0], row, n * 4),
                    n,
                    fb.addr(out, row, k * 4),
                    k,
                );
            });
        }
        Op::GatherLast => {
            let n = *dims(graph, graph.inputs(id)[0]).last().expect("rank");
            let k = *dims(graph, id).last().expect("rank");
            fb.for_range(start, end, 1, |fb, row| {
                let x = fb.addr(ptr[0], row, n * 4);
                gather_row(
                    fb,
                    x,
                    fb.addr(ptr[1], row, k * 4),
                    fb.addr(out, row, k * 4),
                    k,
                );
            });
        }
        Op::AddRmsNorm { eps } => {
            let d = *element_dims(graph, id, 0).last().expect("rank");
            let dt = in_dtype(plan, graph, id, 2);
            fb.for_range(start, end, 1, |fb, row| {
                let a = fb.addr(ptr[0], row, d * 4);
                let b = fb.addr(ptr[1], row, d * 4);
                let sum = fb.addr(outs[0], row, d * 4);
                // The sum is written once and normalised while it is still in L1.
                binary_loops(fb, &Op::Add, &[d], &[1], &[1], a, b, sum);
                rms_row(fb, sum, ptr[2], dt, fb.addr(outs[1], row, d * 4), d, *eps);
            });
        }
        Op::MoeRoute { k, renorm } => {
            let h = *dims(graph, graph.inputs(id)[0]).last().expect("rank");
            let experts = graph.node(graph.inputs(id)[1]).tensor().shape.resolve(0, 0)[0];
            let dt = in_dtype(plan, graph, id, 1);
            let (k, renorm) = (*k as usize, *renorm);
            // The token's router probabilities live on the kernel's stack.
            let probs = fb.stack(4 * experts);
            fb.for_range(start, end, 1, |fb, tok| {
                let x = fb.addr(ptr[0], tok, h * 4);
                fb.for_n(experts, |fb, j| {
                    let logit = fb.dot(x, fb.addr(ptr[1], j, h * dt.size()), dt, h);
                    fb.store(logit, fb.addr(probs, j, 4));
                });
                softmax_row(fb, probs, probs, experts);
                let ids = fb.addr(outs[0], tok, k * 4);
                let weights = fb.addr(outs[1], tok, k * 4);
                top_k_row(fb, probs, experts, ids, k);
                gather_row(fb, probs, ids, weights, k);
                if renorm {
                    let w: Vec<_> = (0..k)
                        .map(|j| fb.load_f32(fb.off(weights, j * 4)))
                        .collect();
                    let sum = w[1..].iter().fold(w[0], |s, &v| fb.fadd(s, v));
                    for (j, &v) in w.iter().enumerate() {
                        fb.store(fb.fdiv(v, sum), fb.off(weights, j * 4));
                    }
                }
            });
        }
        other => {
            return Err(BackendError::Internal(format!(
                "no kernel for {}",
                other.name()
            )))
        }
    }
    Ok(())
}

/// Softmax of `n` f32 at `x` into `o` (which may equal `x`).
fn softmax_row<'ctx>(fb: &Fb<'_, 'ctx>, x: PointerValue<'ctx>, o: PointerValue<'ctx>, n: usize) {
    let max = fb.var(fb.f32c(f32::NEG_INFINITY));
    fb.for_n(n, |fb, i| {
        fb.set(max, fb.fmax(fb.getf(max), fb.load_f32(fb.addr(x, i, 4))));
    });
    let total = fb.var(fb.f32c(0.0));
    fb.for_n(n, |fb, i| {
        let v = fb.fsub(fb.load_f32(fb.addr(x, i, 4)), fb.getf(max));
        let p = fb.exp(v);
        fb.store(p, fb.addr(o, i, 4));
        fb.set(total, fb.fadd(fb.getf(total), p));
    });
    let tv = fb.getf(total);
    fb.for_n(n, |fb, i| {
        let oi = fb.addr(o, i, 4);
        fb.store(fb.fdiv(fb.load_f32(oi), tv), oi);
    });
}

/// Indices (i32) of the `k` largest of `n` f32 at `x` into `o`, largest first, ties to the lower index.
fn top_k_row<'ctx>(
    fb: &Fb<'_, 'ctx>,
    x: PointerValue<'ctx>,
    n: usize,
    o: PointerValue<'ctx>,
    k: usize,
) {
    let i32t = fb.cx.i32_type();
    for slot in 0..k {
        // The largest value not already chosen; strict '>' keeps the lower index on ties.
        let best = fb.var(fb.i64t().const_all_ones());
        let best_v = fb.var(fb.f32c(f32::NEG_INFINITY));
        fb.for_n(n, |fb, i| {
            let mut taken = fb.cx.bool_type().const_zero();
            for prev in 0..slot {
                let pv = fb.load_i32_as_i64(fb.off(o, prev * 4));
                let same = fb.icmp(IntPredicate::EQ, pv, i);
                taken = fb.b.build_or(taken, same, "").expect(BUG);
            }
            let v = fb.load_f32(fb.addr(x, i, 4));
            let gt = fb.fgt(v, fb.getf(best_v));
            let cur = fb.get(best).into_int_value();
            let unset = fb.icmp(IntPredicate::EQ, cur, fb.i64t().const_all_ones());
            let better = fb.b.build_or(gt, unset, "").expect(BUG);
            let free = fb.b.build_not(taken, "").expect(BUG);
            let pick = fb.b.build_and(better, free, "").expect(BUG);
            fb.set(best, fb.b.build_select(pick, i, cur, "").expect(BUG));
            let bv = fb.getf(best_v);
            fb.set(best_v, fb.b.build_select(pick, v, bv, "").expect(BUG));
        });
        let bi =
            fb.b.build_int_truncate(fb.get(best).into_int_value(), i32t, "")
                .expect(BUG);
        fb.store(bi, fb.off(o, slot * 4));
    }
}

/// `o[j] = x[idx[j]]` for `k` i32 indices at `idx`.
fn gather_row<'ctx>(
    fb: &Fb<'_, 'ctx>,
    x: PointerValue<'ctx>,
    idx: PointerValue<'ctx>,
    o: PointerValue<'ctx>,
    k: usize,
) {
    for j in 0..k {
        let i = fb.load_i32_as_i64(fb.off(idx, j * 4));
        fb.store(fb.load_f32(fb.addr(x, i, 4)), fb.off(o, j * 4));
    }
}

/// RMSNorm of one row: `o[i] = w[i] · x[i] / sqrt(mean(x²) + eps)` for `d` f32 at `x`, weights of `dt` at `w`.
fn rms_row<'ctx>(
    fb: &Fb<'_, 'ctx>,
    x: PointerValue<'ctx>,
    w: PointerValue<'ctx>,
    dt: DType,
    o: PointerValue<'ctx>,
    d: usize,
    eps: f64,
) {
    let ss = fb.dot(x, x, DType::F32, d);
    let ms = fb.fadd(fb.fmul(ss, fb.f32c(1.0 / d as f32)), fb.f32c(eps as f32));
    let inv = fb.fdiv(fb.f32c(1.0), fb.sqrt(ms));
    fb.for_n(d, |fb, i| {
        let xv = fb.load_f32(fb.addr(x, i, 4));
        let wv = fb.load_weight(dt, fb.addr(w, i, dt.size()));
        let y = fb.fmul(wv, fb.fmul(xv, inv));
        fb.store(y, fb.addr(o, i, 4));
    });
}

/// Rotate-half RoPE of one token's `heads` rows of `d` at `src` into `dst` (which may equal `src`), at
/// position `pf` (f32), with the inverse frequencies at `table` and cos/sin multiplied by `scale`.
#[allow(clippy::too_many_arguments)]
fn rope_token<'ctx>(
    fb: &Fb<'_, 'ctx>,
    src: PointerValue<'ctx>,
    dst: PointerValue<'ctx>,
    heads: usize,
    d: usize,
    pf: FloatValue<'ctx>,
    table: PointerValue<'ctx>,
    scale: f32,
) {
    let half = d / 2;
    fb.for_n(half, |fb, i| {
        let angle = fb.fmul(pf, fb.load_f32(fb.addr(table, i, 4)));
        let (c, s) = cos_sin(fb, angle);
        let (c, s) = (fb.fmul(c, fb.f32c(scale)), fb.fmul(s, fb.f32c(scale)));
        fb.for_n(heads, |fb, h| {
            let off = fb.add(fb.mul_c(h, d), i);
            let (from, to) = (fb.addr(src, off, 4), fb.addr(dst, off, 4));
            let a = fb.load_f32(from);
            let bb = fb.load_f32(fb.off(from, half * 4));
            let lo = fb.fsub(fb.fmul(a, c), fb.fmul(bb, s));
            let hi = fb.fadd(fb.fmul(bb, c), fb.fmul(a, s));
            fb.store(lo, to);
            fb.store(hi, fb.off(to, half * 4));
        });
    });
}

/// `(cos x, sin x)` of an f32 angle. CPUs call libm (`sinf`/`cosf`, correctly reduced for large angles);
/// GPUs reduce the angle modulo 2π in f64 and use the hardware's approximations on [-π, π].
fn cos_sin<'ctx>(fb: &Fb<'_, 'ctx>, x: FloatValue<'ctx>) -> (FloatValue<'ctx>, FloatValue<'ctx>) {
    let f32t = fb.f32t().into();
    match fb.flavor {
        Flavor::Cpu { .. } => (
            fb.intrinsic("llvm.cos", f32t, &[x.into()])
                .into_float_value(),
            fb.intrinsic("llvm.sin", f32t, &[x.into()])
                .into_float_value(),
        ),
        Flavor::Gpu => {
            let f64t = fb.cx.f64_type();
            let xd = fb.b.build_float_ext(x, f64t, "").expect(BUG);
            let tau = f64t.const_float(std::f64::consts::TAU);
            let turns = fb.fdiv(xd, tau);
            let turns = fb
                .intrinsic("llvm.round", f64t.into(), &[turns.into()])
                .into_float_value();
            let r = fb.fsub(xd, fb.fmul(turns, tau));
            let r = fb.b.build_float_trunc(r, fb.f32t(), "").expect(BUG);
            let call = |name: &str| {
                let f = fb.m.get_function(name).unwrap_or_else(|| {
                    fb.m.add_function(name, fb.f32t().fn_type(&[fb.f32t().into()], false), None)
                });
                fb.call(f, &[r.into()]).into_float_value()
            };
            (
                call("llvm.nvvm.cos.approx.f"),
                call("llvm.nvvm.sin.approx.f"),
            )
        }
    }
}

/// Nested loops of a broadcasting binary op over the per-token dims.
#[allow(clippy::too_many_arguments)]
fn binary_loops<'ctx>(
    fb: &Fb<'_, 'ctx>,
    op: &Op,
    od: &[usize],
    sa: &[usize],
    sb: &[usize],
    a: PointerValue<'ctx>,
    b: PointerValue<'ctx>,
    o: PointerValue<'ctx>,
) {
    let Some((&n, rest)) = od.split_first() else {
        let (av, bv) = (fb.load_f32(a), fb.load_f32(b));
        let r = match op {
            Op::Add => fb.fadd(av, bv),
            Op::Mul => fb.fmul(av, bv),
            _ => fb.fdiv(av, bv),
        };
        fb.store(r, o);
        return;
    };
    let out_stride: usize = rest.iter().product();
    fb.for_n(n, |fb, i| {
        let ai = fb.addr(a, i, sa[0] * 4);
        let bi = fb.addr(b, i, sb[0] * 4);
        let oi = fb.addr(o, i, out_stride * 4);
        binary_loops(fb, op, rest, &sa[1..], &sb[1..], ai, bi, oi);
    });
}
