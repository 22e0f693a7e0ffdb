//! One kernel per graph node, specialised to the node's constant dims.
//!
//! Every kernel has the signature `(args: *const u64, start: u64, end: u64)` and processes work items
//! `[start, end)`. `args` holds `[T, past, input pointers..., output pointers...]` (one output pointer, or
//! one per element of a tuple result). [`work_items`] says what an item is for each op (a token row, an
//! output feature, a (token, head) pair, ...).

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::types::{F32, F32X4, I32, I64};
use cranelift_codegen::ir::{InstBuilder, StackSlotData, StackSlotKind, Value};
use q3c_backend_common::items::{
    broadcast_strides, dims, element_dims, in_dtype, linear_outputs, per_token, LinearTile,
};
use q3c_backend_common::plan::Plan;
use q3c_ir::{DType, Graph, NodeId, Op};

use crate::emit::{mem, Emit};
use crate::BackendError;

/// Emits the body of node `id`'s kernel. `rope_table` is the address of the node's inverse frequencies.
pub fn emit(
    e: &mut Emit,
    graph: &Graph,
    plan: &Plan,
    id: NodeId,
    params: [Value; 3],
    rope_table: Option<Value>,
) -> Result<(), BackendError> {
    let [args, start, end] = params;
    let node = graph.node(id);
    let n_in = graph.inputs(id).len();
    let n_out = node.ty.elements().len();
    let t = e.b.ins().load(I64, mem(), args, 0);
    let past = e.b.ins().load(I64, mem(), args, 8);
    let ptr: Vec<Value> = (0..n_in + n_out)
        .map(|i| e.b.ins().load(I64, mem(), args, 16 + 8 * i as i32))
        .collect();
    let (out, outs) = (ptr[n_in], &ptr[n_in..]);
    let _ = t;
    match &node.op {
        Op::Embedding => {
            let hidden = *dims(graph, id).last().expect("rank");
            let dt = in_dtype(plan, graph, id, 0);
            let ws = dt.size();
            e.for_range(start, end, 1, |e, row| {
                let tok = e.addr(ptr[1], row, 4);
                let tok = e.load_i32_as_i64(tok, 0);
                let src = e.addr(ptr[0], tok, hidden * ws);
                let dst = e.addr(out, row, hidden * 4);
                e.for_n(hidden, |e, i| {
                    let s = e.addr(src, i, ws);
                    let v = e.load_weight(dt, s, 0);
                    let d = e.addr(dst, i, 4);
                    e.store(v, d, 0);
                });
            });
        }
        Op::Linear | Op::SwiGlu | Op::LinearGroup { .. } => {
            let x_dims = dims(graph, graph.inputs(id)[0]);
            let k = *x_dims.last().expect("rank");
            let rows_per_token: usize = x_dims[1..x_dims.len() - 1].iter().product();
            let rows = e.b.ins().imul_imm_u(t, rows_per_token as i64);
            let dt = in_dtype(plan, graph, id, 1);
            let (n, tile) = linear_outputs(graph, id);
            let mm = MatMul { k, dt, rows, tile };
            e.for_range(start, end, 1, |e, item| match node.op {
                // Gate and up (inputs 1, 2), combined per output element by the SwiGLU epilogue.
                Op::SwiGlu => mm.columns(e, ptr[0], &[ptr[1], ptr[2]], out, n[0], item),
                Op::Linear => mm.columns(e, ptr[0], &[ptr[1]], out, n[0], item),
                // One GEMM over the matrices' concatenated columns: each item lies in one matrix.
                _ => {
                    let ends: Vec<usize> = n
                        .iter()
                        .scan(0, |acc, &ni| {
                            *acc += ni / tile.width;
                            Some(*acc)
                        })
                        .collect();
                    e.ranges(item, &ends, |e, m, local| {
                        mm.columns(e, ptr[0], &[ptr[1 + m]], outs[m], n[m], local)
                    });
                }
            });
        }
        Op::ExpertLinear | Op::ExpertSwiGlu => {
            // Expert stacks at inputs 2 (and 3 for SwiGLU).
            let mats: Vec<usize> = if node.op == Op::ExpertSwiGlu {
                vec![2, 3]
            } else {
                vec![2]
            };
            let x_dims = dims(graph, graph.inputs(id)[0]);
            let (j, k) = (x_dims[1], x_dims[2]);
            let slots = dims(graph, id)[1];
            let n = dims(graph, id)[2];
            let dt = in_dtype(plan, graph, id, 2);
            e.for_range(start, end, 1, |e, item| {
                // item = token * slots + slot
                let slots_c = e.iconst(slots);
                let tok = e.b.ins().udiv(item, slots_c);
                let x_row = if j == 1 { tok } else { item };
                let x = e.addr(ptr[0], x_row, k * 4);
                let ide = e.addr(ptr[1], item, 4);
                let expert = e.load_i32_as_i64(ide, 0);
                let w: Vec<Value> = mats
                    .iter()
                    .map(|&m| {
                        let wp = e.addr(ptr[m], expert, 8);
                        e.b.ins().load(I64, mem(), wp, 0)
                    })
                    .collect();
                let o = e.addr(out, item, n * 4);
                e.for_n(n, |e, col| {
                    let parts: Vec<Value> = w
                        .iter()
                        .map(|&w| {
                            let w_row = e.addr(w, col, k * dt.size());
                            e.dot(x, w_row, dt, k)
                        })
                        .collect();
                    let s = epilogue(e, &parts);
                    let oo = e.addr(o, col, 4);
                    e.store(s, oo, 0);
                });
            });
        }
        Op::RmsNorm { eps } => {
            let d = *dims(graph, id).last().expect("rank");
            let dt = in_dtype(plan, graph, id, 1);
            e.for_range(start, end, 1, |e, row| {
                let x = e.addr(ptr[0], row, d * 4);
                let o = e.addr(out, row, d * 4);
                rms_row(e, x, ptr[1], dt, o, d, *eps);
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
            let pos_input = if norm.is_some() { 2 } else { 1 };
            debug_assert!(matches!(
                graph.node(graph.inputs(id)[pos_input]).op,
                Op::Input(_)
            ));
            e.for_range(start, end, 1, |e, tok| {
                let src = e.addr(ptr[0], tok, heads * d * 4);
                // A cache-writing norm_rope puts token t at cache row past + t.
                let row = if node.op.cache().is_some() {
                    e.b.ins().iadd(past, tok)
                } else {
                    tok
                };
                let dst = e.addr(out, row, heads * d * 4);
                // Fused: normalise each head into the output row, then rotate it in place (still in L1).
                let src = match norm {
                    Some((eps, dt)) => {
                        for h in 0..heads {
                            let (x, o) = (
                                e.b.ins().iadd_imm_u(src, (h * d * 4) as i64),
                                e.b.ins().iadd_imm_u(dst, (h * d * 4) as i64),
                            );
                            rms_row(e, x, ptr[1], dt, o, d, eps);
                        }
                        dst
                    }
                    None => src,
                };
                let p = e.b.ins().iadd(past, tok);
                let pf = e.b.ins().fcvt_from_uint(F32, p);
                rope_token(e, src, dst, heads, d, pf, table, scale);
            });
        }
        Op::KvAppend { .. } => {
            let row = per_token(graph, graph.inputs(id)[0]);
            e.for_range(start, end, 1, |e, tok| {
                let src = e.addr(ptr[0], tok, row * 4);
                let p = e.b.ins().iadd(past, tok);
                let dst = e.addr(out, p, row * 4);
                e.for_n(row / 4, |e, i| {
                    let s = e.addr(src, i, 16);
                    let v = e.b.ins().load(F32X4, mem(), s, 0);
                    let d = e.addr(dst, i, 16);
                    e.store(v, d, 0);
                });
                for r in (row / 4) * 4..row {
                    let v = e.load_f32(src, (r * 4) as i32);
                    e.store(v, dst, (r * 4) as i32);
                }
            });
        }
        Op::Attention { scale } => {
            let qd = dims(graph, graph.inputs(id)[0]);
            let kd = dims(graph, graph.inputs(id)[1]);
            let vd = dims(graph, graph.inputs(id)[2]);
            let (hq, d, hkv, dv) = (qd[1], qd[2], kd[1], vd[2]);
            let group = hq / hkv;
            let scale = *scale as f32;
            e.for_range(start, end, 1, |e, item| {
                let hq_c = e.iconst(hq);
                let tok = e.b.ins().udiv(item, hq_c);
                let h = e.b.ins().urem(item, hq_c);
                let group_c = e.iconst(group);
                let g = e.b.ins().udiv(h, group_c);
                let q = e.addr(ptr[0], item, d * 4);
                let o = e.addr(out, item, dv * 4);
                let len = e.b.ins().iadd(past, tok);
                let len = e.b.ins().iadd_imm_s(len, 1);
                let key = |e: &mut Emit, base: Value, j: Value, width: usize| {
                    let row = e.b.ins().imul_imm_u(j, hkv as i64);
                    let row = e.b.ins().iadd(row, g);
                    e.addr(base, row, width * 4)
                };
                // scale · q·k_j
                let score = |e: &mut Emit, j: Value| {
                    let kj = key(e, ptr[1], j, d);
                    let s = e.dot(q, kj, DType::F32, d);
                    let sc = e.fconst(scale);
                    e.b.ins().fmul(s, sc)
                };
                // Pass 1: the largest score.
                let max = e.var_f32(f32::NEG_INFINITY);
                let zero = e.iconst(0);
                e.for_range(zero, len, 1, |e, j| {
                    let s = score(e, j);
                    let m = e.b.use_var(max);
                    let m = e.b.ins().fmax(m, s);
                    e.b.def_var(max, m);
                });
                // Pass 2: exponentials, their sum, and the weighted values accumulated into the output.
                e.for_n(dv, |e, c| {
                    let z = e.fconst(0.0);
                    let oc = e.addr(o, c, 4);
                    e.store(z, oc, 0);
                });
                let total = e.var_f32(0.0);
                let zero = e.iconst(0);
                e.for_range(zero, len, 1, |e, j| {
                    let s = score(e, j);
                    let m = e.b.use_var(max);
                    let s = e.b.ins().fsub(s, m);
                    let p = e.expf(s);
                    let tv = e.b.use_var(total);
                    let tv = e.b.ins().fadd(tv, p);
                    e.b.def_var(total, tv);
                    let vj = key(e, ptr[2], j, dv);
                    let p4 = e.b.ins().splat(F32X4, p);
                    for c in (0..dv / 4).map(|c| c * 16) {
                        let vv = e.b.ins().load(F32X4, mem(), vj, c as i32);
                        let ov = e.b.ins().load(F32X4, mem(), o, c as i32);
                        let nv = e.madd(p4, vv, ov);
                        e.store(nv, o, c as i32);
                    }
                    for c in (dv / 4) * 4..dv {
                        let vv = e.load_f32(vj, (c * 4) as i32);
                        let ov = e.load_f32(o, (c * 4) as i32);
                        let pv = e.b.ins().fmul(p, vv);
                        let nv = e.b.ins().fadd(ov, pv);
                        e.store(nv, o, (c * 4) as i32);
                    }
                });
                let tv = e.b.use_var(total);
                let one = e.fconst(1.0);
                let inv = e.b.ins().fdiv(one, tv);
                e.for_n(dv, |e, c| {
                    let oc = e.addr(o, c, 4);
                    let v = e.load_f32(oc, 0);
                    let v = e.b.ins().fmul(v, inv);
                    e.store(v, oc, 0);
                });
            });
        }
        Op::Add | Op::Mul | Op::Div => {
            let od = dims(graph, id);
            let ad = dims(graph, graph.inputs(id)[0]);
            let bd = dims(graph, graph.inputs(id)[1]);
            let (sa, sb) = (broadcast_strides(&ad, &od), broadcast_strides(&bd, &od));
            let op = node.op.clone();
            e.for_range(start, end, 1, |e, tok| {
                let a0 = e.addr(ptr[0], tok, sa[0] * 4);
                let b0 = e.addr(ptr[1], tok, sb[0] * 4);
                let o0 = e.addr(out, tok, per_token(graph, id) * 4);
                binary_loops(e, &op, &od[1..], &sa[1..], &sb[1..], a0, b0, o0);
            });
        }
        Op::Silu => {
            let n = per_token(graph, id);
            e.for_range(start, end, 1, |e, tok| {
                let x = e.addr(ptr[0], tok, n * 4);
                let o = e.addr(out, tok, n * 4);
                e.for_n(n, |e, i| {
                    let xi = e.addr(x, i, 4);
                    let v = e.load_f32(xi, 0);
                    let y = e.silu(v);
                    let oi = e.addr(o, i, 4);
                    e.store(y, oi, 0);
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
            e.for_range(start, end, 1, |e, tok| {
                let x = e.addr(ptr[0], tok, in_tok * 4);
                let o = e.addr(out, tok, out_tok * 4);
                for ob in 0..outer {
                    e.for_n(inner, |e, i| {
                        let acc = e.var_f32(0.0);
                        for j in 0..n {
                            let xi = e.addr(x, i, 4);
                            let v = e.load_f32(xi, (((ob * n + j) * inner) * 4) as i32);
                            let a = e.b.use_var(acc);
                            let a = e.b.ins().fadd(a, v);
                            e.b.def_var(acc, a);
                        }
                        let a = e.b.use_var(acc);
                        let oi = e.addr(o, i, 4);
                        e.store(a, oi, (ob * inner * 4) as i32);
                    });
                }
            });
        }
        Op::Softmax => {
            let n = *dims(graph, id).last().expect("rank");
            e.for_range(start, end, 1, |e, row| {
                let x = e.addr(ptr[0], row, n * 4);
                let o = e.addr(out, row, n * 4);
                softmax_row(e, x, o, n);
            });
        }
        Op::TopK { k } => {
            let n = *dims(graph, graph.inputs(id)[0]).last().expect("rank");
            let k = *k as usize;
            e.for_range(start, end, 1, |e, row| {
                let x = e.addr(ptr[0], row, n * 4);
                let o = e.addr(out, row, k * 4);
                top_k_row(e, x, n, o, k);
            });
        }
        Op::GatherLast => {
            let n = *dims(graph, graph.inputs(id)[0]).last().expect("rank");
            let k = *dims(graph, id).last().expect("rank");
            e.for_range(start, end, 1, |e, row| {
                let x = e.addr(ptr[0], row, n * 4);
                let idx = e.addr(ptr[1], row, k * 4);
                let o = e.addr(out, row, k * 4);
                gather_row(e, x, idx, o, k);
            });
        }
        Op::AddRmsNorm { eps } => {
            let d = *element_dims(graph, id, 0).last().expect("rank");
            let dt = in_dtype(plan, graph, id, 2);
            e.for_range(start, end, 1, |e, row| {
                let a = e.addr(ptr[0], row, d * 4);
                let b = e.addr(ptr[1], row, d * 4);
                let sum = e.addr(outs[0], row, d * 4);
                let o = e.addr(outs[1], row, d * 4);
                // The sum is written once and normalised while it is still in L1.
                binary_loops(e, &Op::Add, &[d], &[1], &[1], a, b, sum);
                rms_row(e, sum, ptr[2], dt, o, d, *eps);
            });
        }
        Op::MoeRoute { k, renorm } => {
            let h = *dims(graph, graph.inputs(id)[0]).last().expect("rank");
            let experts = graph.node(graph.inputs(id)[1]).tensor().shape.resolve(0, 0)[0];
            let dt = in_dtype(plan, graph, id, 1);
            let (k, renorm) = (*k as usize, *renorm);
            // The token's router probabilities live on the kernel's stack.
            let slot = e.b.create_sized_stack_slot(StackSlotData::new(
                StackSlotKind::ExplicitSlot,
                (experts * 4) as u32,
                4,
            ));
            e.for_range(start, end, 1, |e, tok| {
                let probs = e.b.ins().stack_addr(I64, slot, 0);
                let x = e.addr(ptr[0], tok, h * 4);
                e.for_n(experts, |e, j| {
                    let w = e.addr(ptr[1], j, h * dt.size());
                    let logit = e.dot(x, w, dt, h);
                    let p = e.addr(probs, j, 4);
                    e.store(logit, p, 0);
                });
                softmax_row(e, probs, probs, experts);
                let ids = e.addr(outs[0], tok, k * 4);
                let weights = e.addr(outs[1], tok, k * 4);
                top_k_row(e, probs, experts, ids, k);
                gather_row(e, probs, ids, weights, k);
                if renorm {
                    let mut sum = e.load_f32(weights, 0);
                    for j in 1..k {
                        let v = e.load_f32(weights, (j * 4) as i32);
                        sum = e.b.ins().fadd(sum, v);
                    }
                    for j in 0..k {
                        let v = e.load_f32(weights, (j * 4) as i32);
                        let v = e.b.ins().fdiv(v, sum);
                        e.store(v, weights, (j * 4) as i32);
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

/// The shape of a linear kernel: `rows` activation rows of `k` (f32), weights of `dt`, cut into `tile`s.
#[derive(Clone, Copy)]
struct MatMul {
    k: usize,
    dt: DType,
    rows: Value,
    tile: LinearTile,
}

impl MatMul {
    /// Work item `item` of one output: columns `item·width ..` of `out` (`[rows, n]`) from the matrices `w`
    /// (`[n, k]` each; one, or gate and up combined by the SwiGLU epilogue) times the rows at `x`.
    fn columns(&self, e: &mut Emit, x: Value, w: &[Value], out: Value, n: usize, item: Value) {
        let MatMul { k, dt, rows, tile } = *self;
        // Two matrices: each tile takes `block_cols / 2` columns from both, so it stays 4 × 2 accumulators
        // and every x load feeds both the gate and the up product.
        let per_matrix = (tile.block_cols / w.len()).max(1);
        let (x_stride, w_stride) = (k * 4, k * dt.size());
        let col0 = e.b.ins().imul_imm_u(item, tile.width as i64);
        let w0: Vec<Value> = w.iter().map(|&m| e.addr(m, col0, w_stride)).collect();
        let o0 = e.addr(out, col0, 4);
        // Rows in blocks of `tile.rows` (rows × block_cols register tiles), then one at a time.
        let blocks = e.b.ins().udiv_imm_u(rows, tile.rows as i64);
        let full = e.b.ins().imul_imm_u(blocks, tile.rows as i64);
        let zero = e.iconst(0);
        e.for_range(zero, full, tile.rows, |e, r| {
            let xr = e.addr(x, r, x_stride);
            let o = e.addr(o0, r, n * 4);
            for c0 in (0..tile.width).step_by(per_matrix) {
                // Columns c0..c0+per_matrix of each matrix, matrix-major.
                let cols: Vec<Value> = w0
                    .iter()
                    .flat_map(|&w0| (0..per_matrix).map(move |c| (w0, c0 + c)))
                    .map(|(w0, c)| e.b.ins().iadd_imm_u(w0, (c * w_stride) as i64))
                    .collect();
                let sums = e.dot_block(xr, x_stride, tile.rows, &cols, dt, k);
                for ci in 0..per_matrix {
                    // Column ci of every matrix, one value per row.
                    let parts: Vec<Vec<Value>> = (0..w.len())
                        .map(|m| sums.iter().map(|row| row[m * per_matrix + ci]).collect())
                        .collect();
                    for (ri, v) in epilogue_rows(e, &parts).into_iter().enumerate() {
                        e.store(v, o, ((ri * n + c0 + ci) * 4) as i32);
                    }
                }
            }
        });
        // Leftover rows (all of decode): one column at a time, four accumulators over 16-wide steps.
        e.for_range(full, rows, 1, |e, r| {
            let xr = e.addr(x, r, x_stride);
            let o = e.addr(o0, r, n * 4);
            for c in 0..tile.width {
                let parts: Vec<Value> = w0
                    .iter()
                    .map(|&w0| {
                        let wc = e.b.ins().iadd_imm_u(w0, (c * w_stride) as i64);
                        e.dot(xr, wc, dt, k)
                    })
                    .collect();
                let v = epilogue(e, &parts);
                e.store(v, o, (c * 4) as i32);
            }
        });
    }
}

/// Softmax of `n` f32 at `x` into `o` (which may equal `x`).
fn softmax_row(e: &mut Emit, x: Value, o: Value, n: usize) {
    let max = e.var_f32(f32::NEG_INFINITY);
    e.for_n(n, |e, i| {
        let xi = e.addr(x, i, 4);
        let v = e.load_f32(xi, 0);
        let m = e.b.use_var(max);
        let m = e.b.ins().fmax(m, v);
        e.b.def_var(max, m);
    });
    let total = e.var_f32(0.0);
    e.for_n(n, |e, i| {
        let xi = e.addr(x, i, 4);
        let v = e.load_f32(xi, 0);
        let m = e.b.use_var(max);
        let v = e.b.ins().fsub(v, m);
        let p = e.expf(v);
        let oi = e.addr(o, i, 4);
        e.store(p, oi, 0);
        let tv = e.b.use_var(total);
        let tv = e.b.ins().fadd(tv, p);
        e.b.def_var(total, tv);
    });
    let tv = e.b.use_var(total);
    e.for_n(n, |e, i| {
        let oi = e.addr(o, i, 4);
        let v = e.load_f32(oi, 0);
        let v = e.b.ins().fdiv(v, tv);
        e.store(v, oi, 0);
    });
}

/// Indices (i32) of the `k` largest of `n` f32 at `x` into `o`, largest first, ties to the lower index.
fn top_k_row(e: &mut Emit, x: Value, n: usize, o: Value, k: usize) {
    for slot in 0..k {
        // The largest value not already chosen; strict '>' keeps the lower index on ties.
        let best = e.b.declare_var(I64);
        let best_v = e.var_f32(f32::NEG_INFINITY);
        let minus1 = e.b.ins().iconst(I64, -1);
        e.b.def_var(best, minus1);
        e.for_n(n, |e, i| {
            let mut taken = e.b.ins().iconst(cranelift_codegen::ir::types::I8, 0);
            for prev in 0..slot {
                let pv = e.load_i32_as_i64(o, (prev * 4) as i32);
                let same = e.b.ins().icmp(IntCC::Equal, pv, i);
                taken = e.b.ins().bor(taken, same);
            }
            let xi = e.addr(x, i, 4);
            let v = e.load_f32(xi, 0);
            let bv = e.b.use_var(best_v);
            let gt = e.b.ins().fcmp(FloatCC::GreaterThan, v, bv);
            let cur = e.b.use_var(best);
            let unset = e.b.ins().icmp_imm_s(IntCC::Equal, cur, -1);
            let better = e.b.ins().bor(gt, unset);
            let free = e.b.ins().bxor_imm_u(taken, 1);
            let pick = e.b.ins().band(better, free);
            let nb = e.b.ins().select(pick, i, cur);
            let nv = e.b.ins().select(pick, v, bv);
            e.b.def_var(best, nb);
            e.b.def_var(best_v, nv);
        });
        let bi = e.b.use_var(best);
        let bi = e.b.ins().ireduce(I32, bi);
        e.store(bi, o, (slot * 4) as i32);
    }
}

/// `o[j] = x[idx[j]]` for `k` i32 indices at `idx`.
fn gather_row(e: &mut Emit, x: Value, idx: Value, o: Value, k: usize) {
    for j in 0..k {
        let i = e.load_i32_as_i64(idx, (j * 4) as i32);
        let xi = e.addr(x, i, 4);
        let v = e.load_f32(xi, 0);
        e.store(v, o, (j * 4) as i32);
    }
}

/// RMSNorm of one row: `o[i] = w[i] · x[i] / sqrt(mean(x²) + eps)` for `d` f32 at `x`, weights of `dt` at `w`.
fn rms_row(e: &mut Emit, x: Value, w: Value, dt: DType, o: Value, d: usize, eps: f64) {
    let ss = e.dot(x, x, DType::F32, d);
    let invd = e.fconst(1.0 / d as f32);
    let ms = e.b.ins().fmul(ss, invd);
    let epsv = e.fconst(eps as f32);
    let ms = e.b.ins().fadd(ms, epsv);
    let root = e.b.ins().sqrt(ms);
    let one = e.fconst(1.0);
    let inv = e.b.ins().fdiv(one, root);
    e.for_n(d, |e, i| {
        let xi = e.addr(x, i, 4);
        let xv = e.load_f32(xi, 0);
        let wi = e.addr(w, i, dt.size());
        let wv = e.load_weight(dt, wi, 0);
        let y = e.b.ins().fmul(xv, inv);
        let y = e.b.ins().fmul(wv, y);
        let oi = e.addr(o, i, 4);
        e.store(y, oi, 0);
    });
}

/// Rotate-half RoPE of one token's `heads` rows of `d` at `src` into `dst` (which may equal `src`), at
/// position `pf` (f32), with the inverse frequencies at `table` and cos/sin multiplied by `scale`.
#[allow(clippy::too_many_arguments)]
fn rope_token(
    e: &mut Emit,
    src: Value,
    dst: Value,
    heads: usize,
    d: usize,
    pf: Value,
    table: Value,
    scale: f32,
) {
    let half = d / 2;
    e.for_n(half, |e, i| {
        let fi = e.addr(table, i, 4);
        let f = e.load_f32(fi, 0);
        let angle = e.b.ins().fmul(pf, f);
        let c = e.call1(e.libm.cosf, angle);
        let s = e.call1(e.libm.sinf, angle);
        let sc = e.fconst(scale);
        let c = e.b.ins().fmul(c, sc);
        let s = e.b.ins().fmul(s, sc);
        e.for_n(heads, |e, h| {
            let hd = e.b.ins().imul_imm_u(h, d as i64);
            let off = e.b.ins().iadd(hd, i);
            let from = e.addr(src, off, 4);
            let to = e.addr(dst, off, 4);
            let a = e.load_f32(from, 0);
            let bb = e.load_f32(from, (half * 4) as i32);
            let ac = e.b.ins().fmul(a, c);
            let bs = e.b.ins().fmul(bb, s);
            let lo = e.b.ins().fsub(ac, bs);
            let bc = e.b.ins().fmul(bb, c);
            let as_ = e.b.ins().fmul(a, s);
            let hi = e.b.ins().fadd(bc, as_);
            e.store(lo, to, 0);
            e.store(hi, to, (half * 4) as i32);
        });
    });
}

/// [`epilogue`] over several rows at once: `parts[m][r]` is matrix `m`'s sum for row `r`. Four rows of
/// SwiGLU are gated as one f32x4 (one inline exp for four outputs).
fn epilogue_rows(e: &mut Emit, parts: &[Vec<Value>]) -> Vec<Value> {
    match parts {
        [gate, up] if gate.len() == 4 => {
            let pack = |e: &mut Emit, lanes: &[Value]| {
                let mut v = e.b.ins().splat(F32X4, lanes[0]);
                for (l, &x) in lanes.iter().enumerate().skip(1) {
                    v = e.b.ins().insertlane(v, x, l as u8);
                }
                v
            };
            let (g, u) = (pack(e, gate), pack(e, up));
            let act = e.silu4(g);
            let y = e.b.ins().fmul(act, u);
            (0..4u8).map(|l| e.b.ins().extractlane(y, l)).collect()
        }
        _ => (0..parts[0].len())
            .map(|r| {
                let row: Vec<Value> = parts.iter().map(|m| m[r]).collect();
                epilogue(e, &row)
            })
            .collect(),
    }
}

/// The epilogue of a (grouped) matrix product: the plain dot product, or for SwiGLU `silu(gate) · up`.
fn epilogue(e: &mut Emit, parts: &[Value]) -> Value {
    match *parts {
        [dot] => dot,
        [gate, up] => {
            let act = e.silu(gate);
            e.b.ins().fmul(act, up)
        }
        _ => unreachable!("matrix products combine one or two weight matrices"),
    }
}

/// Nested loops of a broadcasting binary op over the per-token dims.
#[allow(clippy::too_many_arguments)]
fn binary_loops(
    e: &mut Emit,
    op: &Op,
    od: &[usize],
    sa: &[usize],
    sb: &[usize],
    a: Value,
    b: Value,
    o: Value,
) {
    let Some((&n, rest)) = od.split_first() else {
        let av = e.load_f32(a, 0);
        let bv = e.load_f32(b, 0);
        let r = match op {
            Op::Add => e.b.ins().fadd(av, bv),
            Op::Mul => e.b.ins().fmul(av, bv),
            _ => e.b.ins().fdiv(av, bv),
        };
        e.store(r, o, 0);
        return;
    };
    let out_stride: usize = rest.iter().product();
    let contiguous = rest.is_empty() && sa[0] == 1 && sb[0] == 1 && n % 4 == 0;
    if contiguous {
        e.for_n(n / 4, |e, i| {
            let ai = e.addr(a, i, 16);
            let bi = e.addr(b, i, 16);
            let oi = e.addr(o, i, 16);
            let av = e.b.ins().load(F32X4, mem(), ai, 0);
            let bv = e.b.ins().load(F32X4, mem(), bi, 0);
            let r = match op {
                Op::Add => e.b.ins().fadd(av, bv),
                Op::Mul => e.b.ins().fmul(av, bv),
                _ => e.b.ins().fdiv(av, bv),
            };
            e.store(r, oi, 0);
        });
        return;
    }
    e.for_n(n, |e, i| {
        let ai = e.addr(a, i, sa[0] * 4);
        let bi = e.addr(b, i, sb[0] * 4);
        let oi = e.addr(o, i, out_stride * 4);
        binary_loops(e, op, rest, &sa[1..], &sb[1..], ai, bi, oi);
    });
}
