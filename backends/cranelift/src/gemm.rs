//! Cranelift's matrix products: dot products with four f32x4 accumulators, and the linear kernels' work
//! item (a panel of output columns) in 4 × 2 register tiles for prompt rows, one column at a time for
//! leftover rows (all of decode). Two matrices (SwiGLU's gate and up) share every activation load, and
//! `silu(gate) · up` is applied in registers.

use cranelift_codegen::ir::types::F32X4;
use cranelift_codegen::ir::{InstBuilder, Value};
use q3c_ir::DType;
use q3c_kernels::{KernelBuilder, MatMul};

use crate::emit::{mem, Emit};

/// `Σ_k x[k] · w[k]` over `k` constant elements: f32 activations at `x`, weights of `dtype` at `w`.
/// Four f32x4 accumulators over blocks of 16, then 4-wide and scalar tails, all unrolled.
pub fn dot(e: &mut Emit, x: Value, w: Value, dtype: DType, k: usize) -> Value {
    let ws = dtype.size();
    let zero4 = {
        let z = e.b.ins().f32const(0.0);
        e.b.ins().splat(F32X4, z)
    };
    let accs: Vec<_> = (0..4).map(|_| e.b.declare_var(F32X4)).collect();
    for &a in &accs {
        e.b.def_var(a, zero4);
    }
    let blocks = k / 16;
    if blocks > 0 {
        let accs2 = accs.clone();
        e.for_n(blocks, |e, j| {
            let xb = e.addr(x, j, 64);
            let wb = e.addr(w, j, 16 * ws);
            for (u, &a) in accs2.iter().enumerate() {
                let xv = e.b.ins().load(F32X4, mem(), xb, (16 * u) as i32);
                let wv = e.load_weight4(dtype, wb, (u * 4 * ws) as i32);
                let acc = e.b.use_var(a);
                let acc = e.madd(xv, wv, acc);
                e.b.def_var(a, acc);
            }
        });
    }
    let mut done = blocks * 16;
    let mut acc = {
        let a0 = e.b.use_var(accs[0]);
        let a1 = e.b.use_var(accs[1]);
        let a2 = e.b.use_var(accs[2]);
        let a3 = e.b.use_var(accs[3]);
        let s = e.b.ins().fadd(a0, a1);
        let t = e.b.ins().fadd(a2, a3);
        e.b.ins().fadd(s, t)
    };
    while done + 4 <= k {
        let xv = e.b.ins().load(F32X4, mem(), x, (done * 4) as i32);
        let wv = e.load_weight4(dtype, w, (done * ws) as i32);
        acc = e.madd(xv, wv, acc);
        done += 4;
    }
    let mut sum = e.hsum(acc);
    while done < k {
        let xv = e.load_f32_at(x, (done * 4) as i32);
        let wv = e.load_weight_at(dtype, w, (done * ws) as i32);
        let p = e.b.ins().fmul(xv, wv);
        sum = e.b.ins().fadd(sum, p);
        done += 1;
    }
    sum
}

/// Register-blocked dot products: `out[r][c] = Σ_k x[r][k] · w_c[k]` where row `r` of x starts at
/// `x + r·x_stride` bytes (f32) and column `c` at `cols[c]` (`dtype`; the columns may come from different
/// matrices). Each 4-wide step of k loads `rows + cols` vectors and issues `rows · cols` independent FMAs;
/// a k that is not a multiple of 4 finishes scalar.
pub fn dot_block(
    e: &mut Emit,
    x: Value,
    x_stride: usize,
    rows: usize,
    cols: &[Value],
    dtype: DType,
    k: usize,
) -> Vec<Vec<Value>> {
    let ws = dtype.size();
    let zero4 = {
        let z = e.b.ins().f32const(0.0);
        e.b.ins().splat(F32X4, z)
    };
    let accs: Vec<Vec<_>> = (0..rows)
        .map(|_| cols.iter().map(|_| e.b.declare_var(F32X4)).collect())
        .collect();
    for a in accs.iter().flatten() {
        e.b.def_var(*a, zero4);
    }
    let steps = k / 4;
    if steps > 0 {
        e.for_n(steps, |e, j| {
            let xb = e.addr(x, j, 16);
            let w_off = e.b.ins().imul_imm_u(j, (4 * ws) as i64);
            let xv: Vec<Value> = (0..rows)
                .map(|r| e.b.ins().load(F32X4, mem(), xb, (r * x_stride) as i32))
                .collect();
            for (c, &col) in cols.iter().enumerate() {
                let wb = e.b.ins().iadd(col, w_off);
                let wv = e.load_weight4(dtype, wb, 0);
                for (row_accs, &xr) in accs.iter().zip(&xv) {
                    let acc = e.b.use_var(row_accs[c]);
                    let acc = e.madd(xr, wv, acc);
                    e.b.def_var(row_accs[c], acc);
                }
            }
        });
    }
    let mut out = Vec::with_capacity(rows);
    for (r, row_accs) in accs.iter().enumerate() {
        let mut row = Vec::with_capacity(cols.len());
        for (&a, &col) in row_accs.iter().zip(cols) {
            let acc = e.b.use_var(a);
            let mut sum = e.hsum(acc);
            for kk in steps * 4..k {
                let xv = e.load_f32_at(x, (r * x_stride + kk * 4) as i32);
                let wv = e.load_weight_at(dtype, col, (kk * ws) as i32);
                let p = e.b.ins().fmul(xv, wv);
                sum = e.b.ins().fadd(sum, p);
            }
            row.push(sum);
        }
        out.push(row);
    }
    out
}

/// Work item `item` of one output: columns `item·width ..` of `out` (`[rows, n]`) from the matrices `w`
/// (`[n, k]` each; one, or gate and up combined by the SwiGLU epilogue) times the rows at `x`.
pub fn columns(
    e: &mut Emit,
    mm: MatMul<Value>,
    x: Value,
    w: &[Value],
    out: Value,
    n: usize,
    item: Value,
) {
    let MatMul {
        k,
        dt,
        rows,
        first_row,
        tile,
    } = mm;
    // Two matrices: each tile takes `block_cols / 2` columns from both, so it stays 4 × 2 accumulators
    // and every x load feeds both the gate and the up product.
    let per_matrix = (tile.block_cols / w.len()).max(1);
    let (x_stride, w_stride) = (k * 4, k * dt.size());
    let col0 = e.b.ins().imul_imm_u(item, tile.width as i64);
    let w0: Vec<Value> = w.iter().map(|&m| e.addr(m, col0, w_stride)).collect();
    let x = e.addr(x, first_row, x_stride);
    let out = e.addr(out, first_row, n * 4);
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
            let sums = dot_block(e, xr, x_stride, tile.rows, &cols, dt, k);
            for ci in 0..per_matrix {
                // Column ci of every matrix, one value per row.
                let parts: Vec<Vec<Value>> = (0..w.len())
                    .map(|m| sums.iter().map(|row| row[m * per_matrix + ci]).collect())
                    .collect();
                for (ri, v) in epilogue_rows(e, &parts).into_iter().enumerate() {
                    e.store_at(v, o, ((ri * n + c0 + ci) * 4) as i32);
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
                    dot(e, xr, wc, dt, k)
                })
                .collect();
            let v = q3c_kernels::ops::epilogue(e, &parts);
            e.store_at(v, o, (c * 4) as i32);
        }
    });
}

/// [`q3c_kernels::ops::epilogue`] over several rows at once: `parts[m][r]` is matrix `m`'s sum for row `r`. Four rows of
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
                q3c_kernels::ops::epilogue(e, &row)
            })
            .collect(),
    }
}
