//! Matrix products: register-blocked dot products over the shared `k` axis, and the linear kernels'
//! work item (a panel of output columns) with their epilogues (plain, or SwiGLU's `silu(gate) · up`).
//!
//! Weights are `[n, k]` row-major (the checkpoint's layout), activations `[rows, k]`, so both operands run
//! along `k`: a tile keeps `rows × cols` vector accumulators, loads each activation and weight vector once
//! per step, and reduces the lanes at the end.

use inkwell::values::{BasicValue, FloatValue, IntValue, PointerValue, VectorValue};
use inkwell::IntPredicate;
use q3c_ir::{DType, Q8_GROUP, Q8_PANEL};
use q3c_kernels::MatMul;

use crate::fb::{Fb, Flavor, Var};
use crate::q8;

/// How far ahead of a product's weight loads (bytes) a block of several activation rows asks for the
/// weights' cache lines. With several rows per weight load the cores are busy with the dot products and the
/// hardware prefetcher alone kept too few lines in flight: 4 and 8 sequences decoded 4-8% faster (bf16
/// dot products; 21% with f32 activations, 4-10% over q8/q4 panels) with lines asked for 1024 bytes ahead
/// (512 close behind, 2048 less), and prefill did not move. A block of one row asks too where the CPU's
/// tuning says so (`CpuTuning::lone_prefetch`: not AMD's Zen cores, which issue a lone row's loads fast
/// enough).
const PREFETCH_AHEAD: usize = 1024;

/// Asks for the weight line [`PREFETCH_AHEAD`] bytes after `p`, a weight load's address, when the block
/// has `rows` activation rows: several always; one where the CPU's tuning says so
/// (`CpuTuning::lone_prefetch`).
pub fn prefetch_weights<'ctx>(fb: &Fb<'_, 'ctx>, rows: usize, p: PointerValue<'ctx>) {
    if rows > 1 || fb.flavor.tuning().lone_prefetch {
        fb.prefetch(fb.off(p, PREFETCH_AHEAD));
    }
}

/// Rows of a register tile in prefill.
pub const TILE_ROWS: usize = 4;
/// Up to this many rows (batched decode), a product reads each weight row once, sequentially, for every
/// row at once (blocks of 8, 4, 2, 1 rows) instead of interleaving four weight rows per tile.
pub const STREAM_ROWS: usize = 8;
/// Rows of a streaming block.
const STREAM_BLOCK: usize = 4;
/// Columns of a register tile (4 × 4 accumulators + 4 + 4 operands fit AVX-512's 32 registers).
pub const TILE_COLS: usize = 4;
/// Independent accumulator chains a dot-product block keeps at least (each pair of rows and columns takes
/// up to [`MAX_UNROLL`] in turns): a fused multiply-add waits for the one before it on its chain, and
/// keeping two in flight per cycle takes a dozen chains or more (a streaming block of 4 rows × 1 column had
/// 4, latency-bound).
const CHAINS: usize = 16;
/// Chains per pair of rows and columns at most.
const MAX_UNROLL: usize = 4;

/// `sums[r][c] = Σ_i rows[r][i] · cols[c][i]` over `k` elements: activations (f32) at `rows`, weights of
/// `dt` at `cols`.
pub fn dot_block<'ctx>(
    fb: &Fb<'_, 'ctx>,
    rows: &[PointerValue<'ctx>],
    cols: &[PointerValue<'ctx>],
    dt: DType,
    k: usize,
) -> Vec<Vec<FloatValue<'ctx>>> {
    // bf16 weights where AVX512_BF16 is enabled: pairs of bf16 products per f32 lane.
    if fb.flavor.bf16_dot() && dt == DType::BF16 && fb.lanes() == 16 {
        let accs = accumulators(fb, rows.len(), cols.len());
        return dot_block_bf16(fb, rows, false, cols, k, &accs);
    }
    dot_block_fma(fb, rows, cols, dt, k)
}

/// [`dot_block`] with f32 FMAs, the weights widened to f32 as they are loaded.
fn dot_block_fma<'ctx>(
    fb: &Fb<'_, 'ctx>,
    rows: &[PointerValue<'ctx>],
    cols: &[PointerValue<'ctx>],
    dt: DType,
    k: usize,
) -> Vec<Vec<FloatValue<'ctx>>> {
    let lanes = fb.lanes();
    let ws = dt.size();
    let accs = accumulators(fb, rows.len(), cols.len());
    let unroll = accs.len();
    // One vector step of every (row, col) pair; `at(p, elem_bytes)` is the step's operand address.
    let step = |u: usize, at: &dyn Fn(PointerValue<'ctx>, usize) -> PointerValue<'ctx>| {
        let xs: Vec<_> = rows.iter().map(|&r| fb.vload(at(r, 4))).collect();
        let wv: Vec<_> = cols
            .iter()
            .map(|&c| fb.vload_weight(dt, at(c, ws)))
            .collect();
        // Once per 64-byte line of each weight row.
        if (u * lanes * ws).is_multiple_of(64) {
            cols.iter()
                .for_each(|&c| prefetch_weights(fb, rows.len(), at(c, ws)));
        }
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
            step(u, &|p, eb| {
                fb.off(fb.addr(p, j, per_trip * eb), u * lanes * eb)
            });
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
    finish(fb, rows, cols, dt, &accs, done, k)
}

/// Zeroed vector accumulators `[chain][row][col]`: at least four independent chains in all, to hide the
/// FMA latency.
fn accumulators<'ctx>(fb: &Fb<'_, 'ctx>, rows: usize, cols: usize) -> Vec<Vec<Vec<Var<'ctx>>>> {
    let unroll = (CHAINS / (rows * cols)).clamp(1, MAX_UNROLL);
    let zero = fb.vsplat_c(0.0);
    (0..unroll)
        .map(|_| {
            (0..rows)
                .map(|_| (0..cols).map(|_| fb.var(zero)).collect())
                .collect()
        })
        .collect()
}

/// The sums of [`dot_block`]: each pair's chains added, its lanes reduced, then elements `done..k` as scalars.
fn finish<'ctx>(
    fb: &Fb<'_, 'ctx>,
    rows: &[PointerValue<'ctx>],
    cols: &[PointerValue<'ctx>],
    dt: DType,
    accs: &[Vec<Vec<Var<'ctx>>>],
    done: usize,
    k: usize,
) -> Vec<Vec<FloatValue<'ctx>>> {
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
                        let w = fb.load_weight(dt, fb.off(col, i * dt.size()));
                        s = fb.fma(x, w, s).into_float_value();
                    }
                    s
                })
                .collect()
        })
        .collect()
}

/// [`dot_block`] over staged rows (see `staging.rs`) and bf16 weights: `vdpbf16ps` over the rows rounded to
/// bf16, or, in a register tile (`tile`) where the CPU's tuning says so (`CpuTuning::bf16_tiles` unset),
/// f32 FMAs over the rows as they came, staged after the bf16 ones.
fn dot_block_prepared<'ctx>(
    fb: &Fb<'_, 'ctx>,
    rows: &[PointerValue<'ctx>],
    cols: &[PointerValue<'ctx>],
    k: usize,
    tile: bool,
) -> Vec<Vec<FloatValue<'ctx>>> {
    if tile && !fb.flavor.tuning().bf16_tiles {
        let f32_rows: Vec<_> = rows.iter().map(|&r| fb.off(r, 2 * k)).collect();
        return dot_block_fma(fb, &f32_rows, cols, DType::BF16, k);
    }
    let accs = accumulators(fb, rows.len(), cols.len());
    dot_block_bf16(fb, rows, true, cols, k, &accs)
}

/// Whether products over weights of `dt` run on `vdpbf16ps` over activations staged as bf16 rows
/// (`staging.rs`).
pub fn bf16_staged(flavor: Flavor, dt: DType, k: usize) -> bool {
    flavor.bf16_dot() && dt == DType::BF16 && flavor.lanes() == 16 && k.is_multiple_of(32)
}

/// Rounds `n` rows of `k` f32 at `x` (row stride `k·4`) to bf16 into `dst` (row stride `k·2`).
pub fn round_rows_bf16<'ctx>(
    fb: &Fb<'_, 'ctx>,
    x: PointerValue<'ctx>,
    n: usize,
    k: usize,
    dst: PointerValue<'ctx>,
) {
    for i in 0..n {
        let (src, to) = (fb.off(x, i * k * 4), fb.off(dst, i * k * 2));
        fb.for_n(k / 32, |fb, j| {
            let p = fb.addr(src, j, 128);
            let v = cvt_bf16(fb, fb.vload(p), fb.vload(fb.off(p, 64)));
            fb.store(v, fb.addr(to, j, 64));
        });
    }
}

/// 32 f32 (two vectors) rounded to bf16, to nearest even.
fn cvt_bf16<'ctx>(
    fb: &Fb<'_, 'ctx>,
    lo: inkwell::values::VectorValue<'ctx>,
    hi: inkwell::values::VectorValue<'ctx>,
) -> inkwell::values::VectorValue<'ctx> {
    // cvtne2ps2bf16(a, b) puts b in the low half.
    fb.named_intrinsic(
        "llvm.x86.avx512bf16.cvtne2ps2bf16.512",
        &[hi.into(), lo.into()],
    )
    .into_vector_value()
}

/// [`dot_block`] for bf16 weights with `vdpbf16ps`: 32 elements per step, the activations rounded to bf16
/// (round to nearest even, as llama.cpp does for bf16 models) as they are loaded, or already rounded
/// (`rows_bf16`: rows of bf16); scalars finish the tail (f32 rows only). `accs[u][r][c]`: `u` independent
/// chains per pair, taking turns step by step.
fn dot_block_bf16<'ctx>(
    fb: &Fb<'_, 'ctx>,
    rows: &[PointerValue<'ctx>],
    rows_bf16: bool,
    cols: &[PointerValue<'ctx>],
    k: usize,
    accs: &[Vec<Vec<Var<'ctx>>>],
) -> Vec<Vec<FloatValue<'ctx>>> {
    let bf32 = fb.cx.bf16_type().vec_type(32);
    let load_bf16 = |p: PointerValue<'ctx>| {
        let raw = fb.b.build_load(bf32, p, "").expect(crate::fb::BUG);
        if let Some(i) = raw.as_instruction_value() {
            i.set_alignment(2).expect(crate::fb::BUG);
        }
        raw.into_vector_value()
    };
    let step = |u: usize, at: &dyn Fn(PointerValue<'ctx>, usize) -> PointerValue<'ctx>| {
        let xs: Vec<_> = rows
            .iter()
            .map(|&r| {
                if rows_bf16 {
                    load_bf16(at(r, 2))
                } else {
                    cvt_bf16(fb, fb.vload(at(r, 4)), fb.vload(fb.off(at(r, 4), 64)))
                }
            })
            .collect();
        let wv: Vec<_> = cols.iter().map(|&c| load_bf16(at(c, 2))).collect();
        cols.iter()
            .for_each(|&c| prefetch_weights(fb, rows.len(), at(c, 2)));
        for (r, x) in xs.iter().enumerate() {
            for (c, w) in wv.iter().enumerate() {
                let a = fb.getv(accs[u][r][c]);
                let y = fb.named_intrinsic(
                    "llvm.x86.avx512bf16.dpbf16ps.512",
                    &[a.into(), (*x).into(), (*w).into()],
                );
                fb.set(accs[u][r][c], y);
            }
        }
    };
    let unroll = accs.len();
    let per_trip = 32 * unroll;
    let trips = k / per_trip;
    fb.for_n(trips, |_, j| {
        for u in 0..unroll {
            step(u, &|p, eb| {
                fb.off(fb.addr(p, j, per_trip * eb), 32 * u * eb)
            });
        }
    });
    let mut done = trips * per_trip;
    let mut u = 0;
    while done + 32 <= k {
        step(u, &|p, eb| fb.off(p, done * eb));
        done += 32;
        u = (u + 1) % unroll;
    }
    // The rest (k not a multiple of 32) as f32 scalars.
    assert!(!rows_bf16 || done == k, "bf16 rows need k divisible by 32");
    finish(fb, rows, cols, DType::BF16, accs, done, k)
}

/// Work item `item` of one output: columns `item·width ..` of `out` (`[rows, n]`) from the matrices `w`
/// (`[n, k]` each; one, or gate and up combined by the SwiGLU epilogue) times the rows at `x`.
pub fn columns<'ctx>(
    fb: &Fb<'_, 'ctx>,
    mm: MatMul<IntValue<'ctx>>,
    x: PointerValue<'ctx>,
    w: &[PointerValue<'ctx>],
    out: PointerValue<'ctx>,
    n: usize,
    item: IntValue<'ctx>,
) {
    let MatMul {
        k,
        dt,
        rows,
        first_row,
        tile,
    } = mm;
    if dt.is_quantized() {
        // GPUs read the activations as f32 (no staging); the CPU's panels meet staged q8 rows on VNNI.
        return match fb.flavor {
            Flavor::Gpu { .. } | Flavor::GpuOnCpu { .. } => {
                crate::gpu_quant::columns(fb, mm, x, w, out, n, item)
            }
            _ => q8_columns(fb, mm, x, w, out, n, item),
        };
    }
    let product_block = matches!(
        fb.share,
        crate::fb::ItemShare::Product(_) | crate::fb::ItemShare::Tensor(_)
    );
    if product_block && crate::gpu_mma::takes(fb.flavor, &mm) {
        return crate::gpu_mma::columns(fb, mm, x, w, out, n, item);
    }
    if let (Flavor::Gpu { .. }, true) = (fb.flavor, product_block) {
        return crate::gpu_gemm::columns(fb, mm, x, w, out, n, item);
    }
    let (x_stride, w_stride) = (k * 4, k * dt.size());
    // Two matrices: a tile takes half its columns from each, so gate and up share every x load.
    let per_matrix = (TILE_COLS / w.len()).clamp(1, tile.width);
    let col0 = fb.mul_c(item, tile.width);
    let w0: Vec<_> = w.iter().map(|&m| fb.addr(m, col0, w_stride)).collect();
    let o0 = fb.addr(fb.addr(out, first_row, n * 4), col0, 4);
    // With bf16 dot products, `x` holds the rows already rounded to bf16 (staged by the dispatch before).
    let staged = bf16_staged(fb.flavor, dt, k);
    let x_stride = if staged {
        crate::staging::row_bytes(q3c_backend_common::launch::Prep::Bf16, k, fb.flavor)
    } else {
        x_stride
    };
    let x = fb.addr(x, first_row, x_stride);
    let block = |fb: &Fb<'_, 'ctx>, r: IntValue<'ctx>, nrows: usize, stream: bool| {
        // Few rows (decode, batched decode) stream one weight row at a time: sequential reads, which the
        // prefetcher follows (four interleaved rows measured 1.6× slower in decode), each weight load
        // shared by every row of the block. A single matrix streamed for 4 rows or more takes two weight
        // rows at once, as SwiGLU's gate and up do: 8 sequences decoded 1.17-1.19× as fast (the products
        // over one matrix had run at 0.7-0.9× SwiGLU's bytes per second); two rows of each of gate and up
        // measured no faster.
        let two_streams = stream && nrows >= 4 && w.len() == 1 && tile.width.is_multiple_of(2);
        let per_matrix = if two_streams {
            2
        } else if nrows == 1 || stream {
            1
        } else {
            per_matrix
        };
        let x_block = fb.addr(x, r, x_stride);
        let xr: Vec<_> = (0..nrows).map(|i| fb.off(x_block, i * x_stride)).collect();
        let o = fb.addr(o0, r, n * 4);
        // Column groups as a loop, not unrolled: one tile's code, whatever the panel width.
        fb.for_n(tile.width / per_matrix, |fb, group| {
            let c0 = fb.mul_c(group, per_matrix);
            let cols: Vec<_> = w0
                .iter()
                .flat_map(|&w0| (0..per_matrix).map(move |c| (w0, c)))
                .map(|(w0, c)| fb.off(fb.addr(w0, c0, w_stride), c * w_stride))
                .collect();
            let sums = if staged {
                dot_block_prepared(fb, &xr, &cols, k, !stream)
            } else {
                dot_block(fb, &xr, &cols, dt, k)
            };
            let oc = fb.addr(o, c0, 4);
            for ci in 0..per_matrix {
                // Column ci of every matrix, one value per row.
                let parts: Vec<Vec<FloatValue>> = (0..w.len())
                    .map(|m| sums.iter().map(|row| row[m * per_matrix + ci]).collect())
                    .collect();
                for (ri, v) in epilogue(fb, &parts).into_iter().enumerate() {
                    fb.store(v, fb.off(oc, (ri * n + ci) * 4));
                }
            }
        });
    };
    row_blocks(fb, rows, STREAM_ROWS, block);
}

/// [`columns`] over `q8` or `q4` weights: the work item is one panel of 16 columns of every matrix, `x` the
/// activation rows as the staging kernel quantized them (see [`q8::row_bytes`]).
fn q8_columns<'ctx>(
    fb: &Fb<'_, 'ctx>,
    mm: MatMul<IntValue<'ctx>>,
    x: PointerValue<'ctx>,
    w: &[PointerValue<'ctx>],
    out: PointerValue<'ctx>,
    n: usize,
    item: IntValue<'ctx>,
) {
    let MatMul {
        k,
        dt,
        rows,
        first_row,
        tile,
    } = mm;
    assert_eq!(
        tile.width, Q8_PANEL,
        "quantized weights come in panels of 16 rows"
    );
    let format = q8::Format::of(dt);
    let panel_bytes = format.panel_bytes(k);
    let scale_bytes = k / Q8_GROUP * Q8_PANEL * format.scale_bytes();
    let mats: Vec<_> = w
        .iter()
        .map(|&m| {
            let scales = fb.off(m, n / Q8_PANEL * panel_bytes);
            (
                fb.addr(m, item, panel_bytes),
                fb.addr(scales, item, scale_bytes),
            )
        })
        .collect();
    let o0 = fb.addr(fb.addr(out, first_row, n * 4), item, Q8_PANEL * 4);
    let row = q8::row_bytes(k);
    let x = fb.addr(x, first_row, row);
    // Quantized panels keep an integer and a float accumulator per row and matrix: four rows at most.
    row_blocks(fb, rows, 1, |fb, r, nrows, _| {
        let x_block = fb.addr(x, r, row);
        let xr: Vec<_> = (0..nrows).map(|i| fb.off(x_block, i * row)).collect();
        let o = fb.addr(o0, r, n * 4);
        for (ri, per_matrix) in q8::panel(fb, format, &xr, &mats, k).iter().enumerate() {
            fb.store(combine(fb, per_matrix), fb.off(o, ri * n * 4));
        }
    });
}

/// `block(r, rows, stream)` over `rows` activation rows: up to `stream_rows` rows, one streaming block
/// per power of two in the count (`stream` set); more, blocks of TILE_ROWS, then one at a time.
fn row_blocks<'ctx>(
    fb: &Fb<'_, 'ctx>,
    rows: IntValue<'ctx>,
    stream_rows: usize,
    block: impl Fn(&Fb<'_, 'ctx>, IntValue<'ctx>, usize, bool),
) {
    let few = fb.icmp(IntPredicate::ULE, rows, fb.i64c(stream_rows));
    fb.when(few, |fb| {
        // Blocks of STREAM_BLOCK rows, then one of each smaller power of two the rest holds.
        let big = STREAM_BLOCK.min(stream_rows);
        let full = fb.mul_c(fb.udiv_c(rows, big), big);
        fb.for_range(fb.i64c(0), full, big, |fb, r| block(fb, r, big, true));
        let at = fb.var(full);
        for size in [4, 2, 1].into_iter().filter(|&s| s < big) {
            let bit = fb.urem_c(fb.udiv_c(rows, size), 2);
            let set = fb.icmp(IntPredicate::NE, bit, fb.i64c(0));
            fb.when(set, |fb| {
                let r = fb.get(at).into_int_value();
                block(fb, r, size, true);
                fb.set(at, fb.add_c(r, size));
            });
        }
    });
    let many = fb.icmp(IntPredicate::UGT, rows, fb.i64c(stream_rows));
    fb.when(many, |fb| {
        let full = fb.mul_c(fb.udiv_c(rows, TILE_ROWS), TILE_ROWS);
        fb.for_range(fb.i64c(0), full, TILE_ROWS, |fb, r| {
            block(fb, r, TILE_ROWS, false)
        });
        fb.for_range(full, rows, 1, |fb, r| block(fb, r, 1, false));
    });
}

/// The epilogue of a (grouped) matrix product over several rows: `parts[m][r]` is matrix `m`'s sum for
/// row `r`; the plain sums, or SwiGLU's `silu(gate) · up` computed for all rows as one vector.
pub fn epilogue<'ctx>(fb: &Fb<'_, 'ctx>, parts: &[Vec<FloatValue<'ctx>>]) -> Vec<FloatValue<'ctx>> {
    match parts {
        [dot] => dot.clone(),
        _ => {
            let packed: Vec<_> = parts.iter().map(|p| fb.pack(p)).collect();
            fb.unpack(combine(fb, &packed))
        }
    }
}

/// The epilogue over vectors of sums (one per matrix): the sums, or `silu(gate) · up`.
fn combine<'ctx>(fb: &Fb<'_, 'ctx>, parts: &[VectorValue<'ctx>]) -> VectorValue<'ctx> {
    match parts {
        [dot] => *dot,
        [gate, up] => fb.fmul(fb.vsilu(*gate), *up),
        _ => unreachable!("matrix products combine one or two weight matrices"),
    }
}
