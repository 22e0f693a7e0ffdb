//! Matrix products: register-blocked dot products over the shared `k` axis, and the linear kernels'
//! work item (a panel of output columns) with their epilogues (plain, or SwiGLU's `silu(gate) · up`).
//!
//! Weights are `[n, k]` row-major (the checkpoint's layout), activations `[rows, k]`, so both operands run
//! along `k`: a tile keeps `rows × cols` vector accumulators, loads each activation and weight vector once
//! per step, and reduces the lanes at the end.

use inkwell::values::{FloatValue, IntValue, PointerValue};
use q3c_backend_common::items::LinearTile;
use q3c_ir::DType;

use crate::fb::Fb;

/// Rows of a register tile in prefill.
pub const TILE_ROWS: usize = 4;
/// Columns of a register tile (4 × 4 accumulators + 4 + 4 operands fit AVX-512's 32 registers).
pub const TILE_COLS: usize = 4;

/// `sums[r][c] = Σ_i rows[r][i] · cols[c][i]` over `k` elements: activations (f32) at `rows`, weights of
/// `dt` at `cols`.
pub fn dot_block<'ctx>(
    fb: &Fb<'_, 'ctx>,
    rows: &[PointerValue<'ctx>],
    cols: &[PointerValue<'ctx>],
    dt: DType,
    k: usize,
) -> Vec<Vec<FloatValue<'ctx>>> {
    let lanes = fb.lanes();
    let ws = dt.size();
    // Independent accumulator chains: at least four, to hide the FMA latency.
    let unroll = (4 / (rows.len() * cols.len())).max(1);
    let zero = fb.vsplat_c(0.0);
    let accs: Vec<Vec<Vec<_>>> = (0..unroll)
        .map(|_| {
            rows.iter()
                .map(|_| cols.iter().map(|_| fb.var(zero)).collect())
                .collect()
        })
        .collect();
    // One vector step of every (row, col) pair; `at(p, elem_bytes)` is the step's operand address.
    let step = |u: usize, at: &dyn Fn(PointerValue<'ctx>, usize) -> PointerValue<'ctx>| {
        let xs: Vec<_> = rows.iter().map(|&r| fb.vload(at(r, 4))).collect();
        let wv: Vec<_> = cols
            .iter()
            .map(|&c| fb.vload_weight(dt, at(c, ws)))
            .collect();
        for (r, x) in xs.iter().enumerate() {
            for (c, w) in wv.iter().enumerate() {
                let a = fb.getv(accs[u][r][c]);
                fb.set(accs[u][r][c], fb.vfma(*x, *w, a));
            }
        }
    };
    // Main loop: `unroll` vectors per trip.
    let per_trip = unroll * lanes;
    let trips = k / per_trip;
    fb.for_n(trips, |_, j| {
        for u in 0..unroll {
            step(u, &|p, eb| fb.off(fb.addr(p, j, per_trip * eb), u * lanes * eb));
        }
    });
    // Whole vectors left over, at constant offsets.
    let mut done = trips * per_trip;
    let mut u = 0;
    while done + lanes <= k {
        step(u, &|p, eb| fb.off(p, done * eb));
        done += lanes;
        u = (u + 1) % unroll;
    }
    // Reduce the chains and the lanes, then the scalar tail.
    rows.iter()
        .enumerate()
        .map(|(r, &row)| {
            cols.iter()
                .enumerate()
                .map(|(c, &col)| {
                    let mut v = fb.getv(accs[0][r][c]);
                    for chain in &accs[1..] {
                        v = fb.fadd(v, fb.getv(chain[r][c]));
                    }
                    let mut s = fb.hsum(v);
                    for i in done..k {
                        let x = fb.load_f32(fb.off(row, i * 4));
                        let w = fb.load_weight(dt, fb.off(col, i * ws));
                        s = fb.fma(x, w, s).into_float_value();
                    }
                    s
                })
                .collect()
        })
        .collect()
}

/// The shape of a linear kernel: `rows` activation rows of `k` (f32), weights of `dt`, cut into `tile`s.
#[derive(Clone, Copy)]
pub struct MatMul<'ctx> {
    pub k: usize,
    pub dt: DType,
    pub rows: IntValue<'ctx>,
    pub tile: LinearTile,
}

impl<'ctx> MatMul<'ctx> {
    /// Work item `item` of one output: columns `item·width ..` of `out` (`[rows, n]`) from the matrices `w`
    /// (`[n, k]` each; one, or gate and up combined by the SwiGLU epilogue) times the rows at `x`.
    pub fn columns(
        &self,
        fb: &Fb<'_, 'ctx>,
        x: PointerValue<'ctx>,
        w: &[PointerValue<'ctx>],
        out: PointerValue<'ctx>,
        n: usize,
        item: IntValue<'ctx>,
    ) {
        let MatMul { k, dt, rows, tile } = *self;
        let (x_stride, w_stride) = (k * 4, k * dt.size());
        // Two matrices: a tile takes half its columns from each, so gate and up share every x load.
        let per_matrix = (TILE_COLS / w.len()).clamp(1, tile.width);
        let col0 = fb.mul_c(item, tile.width);
        let w0: Vec<_> = w.iter().map(|&m| fb.addr(m, col0, w_stride)).collect();
        let o0 = fb.addr(out, col0, 4);
        let block = |fb: &Fb<'_, 'ctx>, r: IntValue<'ctx>, nrows: usize| {
            let xr: Vec<_> = (0..nrows)
                .map(|i| fb.addr(x, fb.add_c(r, i), x_stride))
                .collect();
            let o = fb.addr(o0, r, n * 4);
            for c0 in (0..tile.width).step_by(per_matrix) {
                let cols: Vec<_> = w0
                    .iter()
                    .flat_map(|&w0| (0..per_matrix).map(move |c| (w0, c0 + c)))
                    .map(|(w0, c)| fb.off(w0, c * w_stride))
                    .collect();
                let sums = dot_block(fb, &xr, &cols, dt, k);
                for ci in 0..per_matrix {
                    // Column ci of every matrix, one value per row.
                    let parts: Vec<Vec<FloatValue>> = (0..w.len())
                        .map(|m| sums.iter().map(|row| row[m * per_matrix + ci]).collect())
                        .collect();
                    for (ri, v) in epilogue(fb, &parts).into_iter().enumerate() {
                        fb.store(v, fb.off(o, (ri * n + c0 + ci) * 4));
                    }
                }
            }
        };
        // Rows in blocks of TILE_ROWS, then one at a time (all of decode).
        let full = fb.mul_c(fb.udiv_c(rows, TILE_ROWS), TILE_ROWS);
        fb.for_range(fb.i64c(0), full, TILE_ROWS, |fb, r| block(fb, r, TILE_ROWS));
        fb.for_range(full, rows, 1, |fb, r| block(fb, r, 1));
    }
}

/// The epilogue of a (grouped) matrix product over several rows: `parts[m][r]` is matrix `m`'s sum for
/// row `r`; the plain sums, or SwiGLU's `silu(gate) · up` computed for all rows as one vector.
pub fn epilogue<'ctx>(fb: &Fb<'_, 'ctx>, parts: &[Vec<FloatValue<'ctx>>]) -> Vec<FloatValue<'ctx>> {
    match parts {
        [dot] => dot.clone(),
        [gate, up] => {
            let (g, u) = (fb.pack(gate), fb.pack(up));
            let y = fb.fmul(fb.vsilu(g), u);
            fb.unpack(y)
        }
        _ => unreachable!("matrix products combine one or two weight matrices"),
    }
}
