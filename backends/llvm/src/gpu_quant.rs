//! Products over quantized weights on NVIDIA GPUs (`q3c_abi::Q8_LAYOUT`, `Q4_LAYOUT`, `Q6_LAYOUT`: panels
//! of 16 rows, groups of 32) times f32 activations, which a GPU reads as they are (no staging).
//!
//! A block takes one panel (16 output columns). Its warps take the panel's groups in turn; in each group
//! every lane reads its fixed slice of the group's bytes, 16 (q8: four values of four rows) or 8 (q4, q6:
//! the nibbles of eight values of two rows; q6 also their 8 bytes of each plane of high bits), so a warp's
//! loads cover the group's contiguous bytes. The lane widens its values in registers (`q − 128`, the nibble
//! `− 8`, or nibble and high bits `− 32`), multiplies them by the activations they meet and
//! adds `d · Σ` to one accumulator per row it holds. The lanes holding the same rows meet by shuffles, the
//! warps in shared memory, and the block's first `16 · rows` threads apply the epilogue and store.
//!
//! On the CPU emulation of the GPU flavour one thread plays every lane of the (single) warp in turn with
//! the same index arithmetic ([`lane_slice`]), so the layout reading a GPU does is checked there.

use inkwell::values::{FloatValue, IntValue, PointerValue};
use inkwell::IntPredicate;
use q3c_ir::{DType, Q8_GROUP, Q8_PANEL};
use q3c_kernels::MatMul;

use crate::fb::{Fb, Flavor, ItemShare, Var, BUG};
use crate::gemm::epilogue;
use crate::gpu_gemm::{barrier, shared_array, shared_at, thread_index, warp_sum_masks, WARP};
use crate::q8::Format;

/// Bytes of each matrix a lane loads per iteration of its groups.
const IN_FLIGHT: usize = 32;

/// How a lane's slice of a group looks in `format`.
#[derive(Clone, Copy)]
struct Slice {
    format: Format,
}

impl Slice {
    /// Bytes a lane reads per group.
    fn bytes(self) -> usize {
        match self.format {
            Format::Q8 => 16,
            Format::Q4 | Format::Q6 => 8,
        }
    }
    /// Panel rows a lane holds.
    fn rows(self) -> usize {
        match self.format {
            Format::Q8 => 4,
            Format::Q4 | Format::Q6 => 2,
        }
    }
    /// Lanes that hold different rows (lane `l` holds the rows of set `l % sets`).
    fn sets(self) -> usize {
        Q8_PANEL / self.rows()
    }
    /// The shuffle distances that add up the lanes holding the same rows.
    fn masks(self) -> &'static [u64] {
        match self.format {
            Format::Q8 => &[4, 8, 16],
            Format::Q4 | Format::Q6 => &[8, 16],
        }
    }
}

/// One matrix's panel: its values and its scales.
#[derive(Clone, Copy)]
struct Panel<'ctx> {
    values: PointerValue<'ctx>,
    scales: PointerValue<'ctx>,
}

/// Work item `item` (panel `item`) of a product over q8/q4 weights, as [`crate::gemm::columns`].
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
    assert_eq!(
        tile.width, Q8_PANEL,
        "quantized weights come in panels of 16 rows"
    );
    let format = Format::of(dt);
    let slice = Slice { format };
    let groups = k / Q8_GROUP;
    let panel_bytes = format.panel_bytes(k);
    let scale_bytes = groups * Q8_PANEL * format.scale_bytes();
    let panels: Vec<Panel> = w
        .iter()
        .map(|&m| Panel {
            values: fb.addr(m, item, panel_bytes),
            scales: fb.addr(fb.off(m, n / Q8_PANEL * panel_bytes), item, scale_bytes),
        })
        .collect();
    let x = fb.addr(x, first_row, k * 4);
    let o0 = fb.addr(fb.addr(out, first_row, n * 4), item, Q8_PANEL * 4);
    match (fb.flavor, fb.share) {
        (Flavor::Gpu { .. }, ItemShare::Product(shape)) => {
            let warps = shape.threads / WARP;
            let block = |fb: &Fb<'_, 'ctx>, r: IntValue<'ctx>, nrows: usize| {
                gpu_block(fb, slice, &panels, x, r, nrows, k, warps, o0, n);
            };
            let full = fb.mul_c(fb.udiv_c(rows, shape.rows), shape.rows);
            fb.for_range(fb.i64c(0), full, shape.rows, |fb, r| {
                block(fb, r, shape.rows)
            });
            fb.for_range(full, rows, 1, |fb, r| block(fb, r, 1));
        }
        _ => fb.for_range(fb.i64c(0), rows, 1, |fb, r| {
            emulated_row(fb, slice, &panels, x, r, k, o0, n)
        }),
    }
}

/// Activation rows `r .. r + nrows` through the panels, by the whole block on a GPU.
#[allow(clippy::too_many_arguments)]
fn gpu_block<'ctx>(
    fb: &Fb<'_, 'ctx>,
    slice: Slice,
    panels: &[Panel<'ctx>],
    x: PointerValue<'ctx>,
    r: IntValue<'ctx>,
    nrows: usize,
    k: usize,
    warps: usize,
    o0: PointerValue<'ctx>,
    n: usize,
) {
    let tid = thread_index(fb);
    let (warp, lane) = (fb.udiv_c(tid, WARP), fb.urem_c(tid, WARP));
    let xr: Vec<_> = (0..nrows)
        .map(|i| fb.off(fb.addr(x, r, k * 4), i * k * 4))
        .collect();
    // accs[matrix][row][held row]
    let zero = fb.f32c(0.0);
    let accs: Vec<Vec<Vec<Var>>> = panels
        .iter()
        .map(|_| {
            (0..nrows)
                .map(|_| (0..slice.rows()).map(|_| fb.var(zero)).collect())
                .collect()
        })
        .collect();
    let groups = k / Q8_GROUP;
    let add = |fb: &Fb<'_, 'ctx>, g: IntValue<'ctx>| {
        let sums = lane_slice(fb, slice, panels, &xr, g, lane);
        for (m, per_row) in sums.iter().enumerate() {
            for (ri, held) in per_row.iter().enumerate() {
                for (j, &s) in held.iter().enumerate() {
                    let a = fb.getf(accs[m][ri][j]);
                    fb.set(accs[m][ri][j], fb.fadd(a, s));
                }
            }
        }
    };
    // Groups warp, warp + warps, ...: `unroll` of them per iteration, so a lane has 32 bytes of each
    // matrix in flight (two q8 groups, four q4), then the rest one at a time.
    let unroll = IN_FLIGHT / slice.bytes();
    let stride = warps * unroll;
    let whole = fb.i64c(groups / stride * stride);
    fb.for_range(warp, whole, stride, |fb, g| {
        for u in 0..unroll {
            add(fb, fb.add_c(g, u * warps));
        }
    });
    let rest = fb.add(whole, warp);
    fb.for_range(rest, fb.i64c(groups), warps, |fb, g| add(fb, g));
    // The lanes of each row set meet; lanes 0..sets hold their rows' sums, which go to shared memory.
    let sets = slice.sets();
    let shared = panel_sums(fb, warps, panels.len(), nrows);
    // Warp w's sum for matrix m, activation row ri, panel row `row`.
    let slot = |fb: &Fb<'_, 'ctx>, w: IntValue<'ctx>, m: usize, ri: IntValue<'ctx>, row| {
        let i = fb.mul_c(w, panels.len() * nrows * Q8_PANEL);
        let i = fb.add(i, fb.mul_c(fb.add_c(ri, m * nrows), Q8_PANEL));
        shared_at(fb, shared, fb.add(i, row))
    };
    let totals: Vec<Vec<Vec<FloatValue>>> = accs
        .iter()
        .map(|per_row| {
            per_row
                .iter()
                .map(|held| {
                    held.iter()
                        .map(|&a| warp_sum_masks(fb, fb.getf(a), slice.masks()))
                        .collect()
                })
                .collect()
        })
        .collect();
    barrier(fb);
    let first = fb.icmp(IntPredicate::ULT, lane, fb.i64c(sets));
    fb.when(first, |fb| {
        for (m, per_row) in totals.iter().enumerate() {
            for (ri, held) in per_row.iter().enumerate() {
                for (j, &s) in held.iter().enumerate() {
                    let row = fb.add_c(fb.mul_c(lane, slice.rows()), j);
                    fb.store(s, slot(fb, warp, m, fb.i64c(ri), row));
                }
            }
        }
    });
    barrier(fb);
    // Thread t < 16 · nrows: output column t % 16 of row t / 16.
    let outputs = fb.icmp(IntPredicate::ULT, tid, fb.i64c(Q8_PANEL * nrows));
    fb.when(outputs, |fb| {
        let (ri, col) = (fb.udiv_c(tid, Q8_PANEL), fb.urem_c(tid, Q8_PANEL));
        let sums: Vec<Vec<FloatValue>> = (0..panels.len())
            .map(|m| {
                let mut s = fb.f32c(0.0);
                for w in 0..warps {
                    let at = slot(fb, fb.i64c(w), m, ri, col);
                    let v =
                        fb.b.build_load(fb.f32t(), at, "")
                            .expect(BUG)
                            .into_float_value();
                    s = fb.fadd(s, v);
                }
                vec![s]
            })
            .collect();
        let v = epilogue(fb, &sums)[0];
        let o = fb.addr(fb.addr(o0, fb.add(r, ri), n * 4), col, 4);
        fb.store(v, o);
    });
}

/// Activation row `r` through the panels on one thread: every lane's slice of every group in turn.
#[allow(clippy::too_many_arguments)]
fn emulated_row<'ctx>(
    fb: &Fb<'_, 'ctx>,
    slice: Slice,
    panels: &[Panel<'ctx>],
    x: PointerValue<'ctx>,
    r: IntValue<'ctx>,
    k: usize,
    o0: PointerValue<'ctx>,
    n: usize,
) {
    let xr = [fb.addr(x, r, k * 4)];
    let zero = fb.f32c(0.0);
    // accs[matrix][panel row]
    let accs: Vec<Vec<Var>> = panels
        .iter()
        .map(|_| (0..Q8_PANEL).map(|_| fb.var(zero)).collect())
        .collect();
    fb.for_n(k / Q8_GROUP, |fb, g| {
        for lane in 0..WARP {
            let sums = lane_slice(fb, slice, panels, &xr, g, fb.i64c(lane));
            let set = lane % slice.sets();
            for (m, per_row) in sums.iter().enumerate() {
                for (j, &s) in per_row[0].iter().enumerate() {
                    let a = &accs[m][set * slice.rows() + j];
                    fb.set(*a, fb.fadd(fb.getf(*a), s));
                }
            }
        }
    });
    let o = fb.addr(o0, r, n * 4);
    for col in 0..Q8_PANEL {
        let sums: Vec<Vec<FloatValue>> = accs.iter().map(|a| vec![fb.getf(a[col])]).collect();
        fb.store(epilogue(fb, &sums)[0], fb.off(o, col * 4));
    }
}

/// Lane `lane`'s share of group `g`: for each matrix, each activation row of `xr` and each panel row the
/// lane holds (rows `lane % sets · rows ..`), `d · Σ q · x` over the lane's values.
fn lane_slice<'ctx>(
    fb: &Fb<'_, 'ctx>,
    slice: Slice,
    panels: &[Panel<'ctx>],
    xr: &[PointerValue<'ctx>],
    g: IntValue<'ctx>,
    lane: IntValue<'ctx>,
) -> Vec<Vec<Vec<FloatValue<'ctx>>>> {
    let format = slice.format;
    let set = fb.urem_c(lane, slice.sets());
    // Where the lane's values sit in the group: k offsets of the first (and, for q4, second) run of four.
    let (runs, first_k) = match format {
        // Step s = lane / 4: k offsets 4s .. 4s + 4 for all four rows.
        Format::Q8 => (1, fb.mul_c(fb.udiv_c(lane, 4), 4)),
        // v = lane / 8: low nibbles k = 4v .. 4v + 4, high nibbles 16 + 4v ..
        Format::Q4 | Format::Q6 => (2, fb.mul_c(fb.udiv_c(lane, 8), 4)),
    };
    // The activations each run multiplies: x[32g + first_k + 16·run ..][..4] per activation row.
    let xs: Vec<Vec<Vec<FloatValue>>> = xr
        .iter()
        .map(|&row| {
            (0..runs)
                .map(|run| {
                    let at = fb.add(fb.mul_c(g, Q8_GROUP), fb.add_c(first_k, 16 * run));
                    let v = fb.load_weights(DType::F32, fb.addr(row, at, 4), 4, 16);
                    fb.unpack(v)
                })
                .collect()
        })
        .collect();
    let block = format.block();
    panels
        .iter()
        .map(|p| {
            let group = fb.addr(p.values, g, block);
            let load = |at| {
                fb.load_aligned(
                    fb.cx.i8_type().vec_type(slice.bytes() as u32),
                    at,
                    slice.bytes() as u32,
                )
                .into_vector_value()
            };
            let bytes = load(fb.addr(group, lane, slice.bytes()));
            // q6: the same (row, element) bytes of the two planes, bits 2v of each for the lane's steps.
            let planes = (format == Format::Q6).then(|| {
                let first = fb.off(group, Q8_GROUP * Q8_PANEL / 2);
                let at = |h: usize| fb.addr(fb.off(first, h * 64), fb.urem_c(lane, 8), 8);
                let shift = fb.mul_c(fb.udiv_c(lane, 8), 2);
                (load(at(0)), load(at(1)), shift)
            });
            // values[held row][run][e]
            let values = widen(fb, format, bytes, planes);
            let scales = scales(fb, format, p.scales, g, set, slice.rows());
            xs.iter()
                .map(|x_runs| {
                    (0..slice.rows())
                        .map(|j| {
                            let mut s = fb.f32c(0.0);
                            for (run, xv) in x_runs.iter().enumerate() {
                                for (e, &xe) in xv.iter().enumerate() {
                                    s = fb.fma(values[j][run][e], xe, s).into_float_value();
                                }
                            }
                            fb.fmul(scales[j], s)
                        })
                        .collect()
                })
                .collect()
        })
        .collect()
}

/// A lane's bytes as signed values, `[held row][run][e]`: q8, 4 rows of 4 bytes `q + 128`; q4, 2 rows of 4
/// bytes, each the low nibble (run 0) and the high nibble (run 1), `q + 8`; q6, as q4 with bits
/// `shift, shift + 1` of the planes' bytes (plane 0 for run 0, plane 1 for run 1) above each nibble,
/// `q + 32`.
/// (Widening by ORing the bytes into the mantissa of 2²³ instead of converting, measured on an H200,
/// decoded no faster and prefilled q8 at 0.97×: the conversions do not bound these products.)
fn widen<'ctx>(
    fb: &Fb<'_, 'ctx>,
    format: Format,
    bytes: inkwell::values::VectorValue<'ctx>,
    planes: Option<(
        inkwell::values::VectorValue<'ctx>,
        inkwell::values::VectorValue<'ctx>,
        IntValue<'ctx>,
    )>,
) -> Vec<Vec<Vec<FloatValue<'ctx>>>> {
    let i32t = fb.cx.i32_type();
    let n = bytes.get_type().get_size();
    let wide =
        fb.b.build_int_z_extend(bytes, i32t.vec_type(n), "")
            .expect(BUG);
    let as_float = |v: inkwell::values::VectorValue<'ctx>, offset: f32| {
        let f =
            fb.b.build_unsigned_int_to_float(v, fb.f32t().vec_type(n), "")
                .expect(BUG);
        let off = fb.splat(fb.f32c(offset).into(), n);
        fb.unpack(fb.fsub(f, off))
    };
    match format {
        Format::Q8 => {
            let v = as_float(wide, format.offset() as f32);
            v.chunks(4).map(|row| vec![row.to_vec()]).collect()
        }
        Format::Q4 | Format::Q6 => {
            let splat = |c: u64| fb.splat(i32t.const_int(c, false).into(), n);
            let mut lo = fb.b.build_and(wide, splat(0xf), "").expect(BUG);
            let mut hi =
                fb.b.build_right_shift(wide, splat(4), false, "")
                    .expect(BUG);
            if let Some((p0, p1, shift)) = planes {
                let shift = fb.splat(
                    fb.b.build_int_truncate(shift, i32t, "").expect(BUG).into(),
                    n,
                );
                let high = |p| {
                    let p = fb.b.build_int_z_extend(p, i32t.vec_type(n), "").expect(BUG);
                    let p = fb.b.build_right_shift(p, shift, false, "").expect(BUG);
                    let p = fb.b.build_and(p, splat(3), "").expect(BUG);
                    fb.b.build_left_shift(p, splat(4), "").expect(BUG)
                };
                lo = fb.b.build_or(lo, high(p0), "").expect(BUG);
                hi = fb.b.build_or(hi, high(p1), "").expect(BUG);
            }
            let offset = format.offset() as f32;
            let (lo, hi) = (as_float(lo, offset), as_float(hi, offset));
            (0..2)
                .map(|j| vec![lo[4 * j..4 * j + 4].to_vec(), hi[4 * j..4 * j + 4].to_vec()])
                .collect()
        }
    }
}

/// The scales of rows `set · rows ..` of group `g` (q8: f32, q4: f16 widened).
fn scales<'ctx>(
    fb: &Fb<'_, 'ctx>,
    format: Format,
    base: PointerValue<'ctx>,
    g: IntValue<'ctx>,
    set: IntValue<'ctx>,
    rows: usize,
) -> Vec<FloatValue<'ctx>> {
    let size = format.scale_bytes();
    let group = fb.addr(base, g, Q8_PANEL * size);
    let at = fb.addr(group, set, rows * size);
    let dt = match format {
        Format::Q8 => DType::F32,
        Format::Q4 | Format::Q6 => DType::F16,
    };
    let v = fb.load_weights(dt, at, rows as u32, (rows * size) as u32);
    fb.unpack(v)
}

/// The block's shared array of the warps' panel sums (`[warp][matrix][row][panel row]`), sized for the
/// largest product block of the module.
fn panel_sums<'ctx>(
    fb: &Fb<'_, 'ctx>,
    warps: usize,
    matrices: usize,
    rows: usize,
) -> PointerValue<'ctx> {
    let ItemShare::Product(shape) = fb.share else {
        unreachable!("panel sums outside a product block (a q3c bug)")
    };
    let most = shape.threads / WARP * 2 * shape.rows * Q8_PANEL;
    debug_assert!(warps * matrices * rows * Q8_PANEL <= most);
    shared_array(fb, "q3c_panel_sums", most, 16)
}
