//! Products over `q8` weights (`q3c_abi::Q8_LAYOUT`: i8 in groups of 32 with one f32 scale each, stored
//! offset by 128 in panels of 16 rows), `q4` weights (`q3c_abi::Q4_LAYOUT`: nibbles offset by 8, one f16
//! scale per group, unpacked in registers into the same steps) and `q6` weights (`q3c_abi::Q6_LAYOUT`: the
//! q4 nibbles with two more bits from planes beside them, offset by 32) with 512-bit AVX512-VNNI `vpdpbusd`.
//!
//! The activations of a q8 product are quantized the same way (per row, per group of 32) once per dispatch
//! by a staging kernel (`staging.rs`). One `vpdpbusd` multiplies a 64-byte step of a panel (four elements of
//! each of its 16 rows, unsigned) by four activation bytes broadcast to every lane (signed); the offset of
//! 128 is taken back by starting each group's sum at `-128 · Σ x_q`. Each lane then holds one output
//! column, so the group's sums are scaled by `d_w · d_x` with one vector multiply-add and no horizontal
//! reduction.

use inkwell::values::{IntValue, PointerValue, VectorValue};
use q3c_ir::{DType, Q8_GROUP, Q8_PANEL};

use crate::fb::{Fb, BUG};

/// Bytes of one quantized activation row of `k`: the i8 values, one f32 scale per group, then one i32
/// `-128 · Σ q` per group.
pub fn row_bytes(k: usize) -> usize {
    k + k / Q8_GROUP * 8
}

/// Bytes of one `vpdpbusd` step of a panel (four bytes of each of 16 rows).
const STEP: usize = 4 * Q8_PANEL;
/// `vpdpbusd` steps per group.
const STEPS: usize = Q8_GROUP / 4;

/// The quantized weight formats the panel product reads.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Format {
    Q8,
    Q4,
    Q6,
}

impl Format {
    /// The format of weights read as `dt`.
    pub fn of(dt: DType) -> Format {
        match dt {
            DType::Q4 => Format::Q4,
            DType::Q6 => Format::Q6,
            _ => Format::Q8,
        }
    }

    /// Bytes of one group of a panel (32 elements of 16 rows).
    pub fn block(self) -> usize {
        match self {
            Format::Q8 => Q8_GROUP * Q8_PANEL,
            Format::Q4 => Q8_GROUP * Q8_PANEL / 2,
            Format::Q6 => Q8_GROUP * Q8_PANEL * 3 / 4,
        }
    }

    /// Bytes of a panel's values (16 rows of `k`).
    pub fn panel_bytes(self, k: usize) -> usize {
        k / Q8_GROUP * self.block()
    }

    /// Bytes of one scale.
    pub fn scale_bytes(self) -> usize {
        match self {
            Format::Q8 => 4,
            Format::Q4 | Format::Q6 => 2,
        }
    }

    /// The offset the stored (unsigned) values carry: 128, 8 or 32.
    pub fn offset(self) -> u32 {
        match self {
            Format::Q8 => 128,
            Format::Q4 => 8,
            Format::Q6 => 32,
        }
    }

    /// log2 of 128 over [`Format::offset`]: the staged `-128 · Σq` shifted right by it is `-offset · Σq`.
    fn offset_shift(self) -> u64 {
        u64::from((128 / self.offset()).trailing_zeros())
    }
}

/// Quantizes one row of `k` f32 at `src` into `dst` (see [`row_bytes`]).
pub fn quantize_row<'ctx>(
    fb: &Fb<'_, 'ctx>,
    src: PointerValue<'ctx>,
    dst: PointerValue<'ctx>,
    k: usize,
) {
    let i32t = fb.cx.i32_type();
    let groups = k / Q8_GROUP;
    fb.for_n(groups, |fb, g| {
        let p = fb.addr(src, g, Q8_GROUP * 4);
        let both = fb
            .load_aligned(fb.f32t().vec_type(Q8_GROUP as u32), p, 4)
            .into_vector_value();
        let abs = fb
            .intrinsic("llvm.fabs", both.get_type().into(), &[both.into()])
            .into_vector_value();
        let amax = fb.hmax(abs);
        let d = fb.fmul(amax, fb.f32c(1.0 / 127.0));
        let positive = fb.fgt(d, fb.f32c(0.0));
        let inv = fb.fdiv(fb.f32c(1.0), d);
        let inv =
            fb.b.build_select(positive, inv, fb.f32c(0.0), "")
                .expect(BUG)
                .into_float_value();
        let scaled = fb.fmul(both, fb.pack(&[inv; Q8_GROUP]));
        let rounded = fb
            .intrinsic("llvm.roundeven", scaled.get_type().into(), &[scaled.into()])
            .into_vector_value();
        let q32 =
            fb.b.build_float_to_signed_int(rounded, i32t.vec_type(Q8_GROUP as u32), "")
                .expect(BUG);
        let sum = fb
            .intrinsic(
                "llvm.vector.reduce.add",
                q32.get_type().into(),
                &[q32.into()],
            )
            .into_int_value();
        let correction =
            fb.b.build_int_mul(sum, i32t.const_int((-128i64) as u64, true), "")
                .expect(BUG);
        let q =
            fb.b.build_int_truncate(q32, fb.cx.i8_type().vec_type(Q8_GROUP as u32), "")
                .expect(BUG);
        fb.store(q, fb.addr(dst, g, Q8_GROUP));
        fb.store(d, fb.off(fb.addr(dst, g, 4), k));
        fb.store(correction, fb.off(fb.addr(dst, g, 4), k + groups * 4));
    });
}

/// One panel's products: for every quantized row at `rows` (see [`row_bytes`]) and every matrix
/// `(panel, scales)` of `format` (the panel's values and its 16·k/32 scales), a vector of its 16 output
/// columns.
pub fn panel<'ctx>(
    fb: &Fb<'_, 'ctx>,
    format: Format,
    rows: &[PointerValue<'ctx>],
    mats: &[(PointerValue<'ctx>, PointerValue<'ctx>)],
    k: usize,
) -> Vec<Vec<VectorValue<'ctx>>> {
    let i32t = fb.cx.i32_type();
    let i32v = i32t.vec_type(Q8_PANEL as u32);
    let f32v = fb.f32t().vec_type(Q8_PANEL as u32);
    let groups = k / Q8_GROUP;
    let accs: Vec<Vec<_>> = rows
        .iter()
        .map(|_| mats.iter().map(|_| fb.var(f32v.const_zero())).collect())
        .collect();
    let load = |ty: inkwell::types::BasicTypeEnum<'ctx>, p| fb.load_aligned(ty, p, 4);
    let splat = |v| fb.splat(v, Q8_PANEL as u32);
    fb.for_n(groups, |fb, g: IntValue<'ctx>| {
        let xs: Vec<_> = rows.iter().map(|&r| fb.addr(r, g, Q8_GROUP)).collect();
        let mut dots: Vec<Vec<VectorValue>> = rows
            .iter()
            .map(|&r| {
                // -128·Σq from the staging kernel; for an offset of 8 (q4) or 32 (q6), -offset·Σq is that
                // shifted right.
                let c = load(i32t.into(), fb.off(fb.addr(r, g, 4), k + groups * 4));
                let shift = i32t.const_int(format.offset_shift(), false);
                let c =
                    fb.b.build_right_shift(c.into_int_value(), shift, true, "")
                        .expect(BUG);
                let c = splat(c.into());
                mats.iter().map(|_| c).collect()
            })
            .collect();
        let blocks: Vec<_> = mats
            .iter()
            .map(|&(w, _)| fb.addr(w, g, format.block()))
            .collect();
        // q4, q6: the high nibbles of steps 0..4 are steps 4..8; q6: the planes of high bits.
        let mut high: Vec<Vec<VectorValue>> = vec![Vec::new(); mats.len()];
        let mut planes: Vec<Vec<VectorValue>> = vec![Vec::new(); mats.len()];
        for s in 0..STEPS {
            // 64 bytes at `offset` in a panel's block, read from memory (their line ahead asked for).
            let read = |block, offset| {
                let at = fb.off(block, offset);
                crate::gemm::prefetch_weights(fb, rows.len(), at);
                load(i32v.into(), at)
            };
            let ws: Vec<_> = blocks
                .iter()
                .enumerate()
                .map(|(m, &block)| {
                    let nibble = match format {
                        Format::Q8 => return read(block, s * STEP).into_vector_value(),
                        _ if s < STEPS / 2 => {
                            let (lo, hi) = nibbles(fb, read(block, s * STEP));
                            high[m].push(hi);
                            lo
                        }
                        _ => high[m][s - STEPS / 2],
                    };
                    if format != Format::Q6 {
                        return nibble;
                    }
                    if s % 4 == 0 {
                        let plane = read(block, Q8_GROUP * Q8_PANEL / 2 + s / 4 * STEP);
                        planes[m].push(plane.into_vector_value());
                    }
                    fb.b.build_or(nibble, high_bits(fb, planes[m][s / 4], s % 4), "")
                        .expect(BUG)
                })
                .collect();
            for (r, &x) in xs.iter().enumerate() {
                let xb = splat(load(i32t.into(), fb.off(x, 4 * s)));
                for (m, w) in ws.iter().enumerate() {
                    dots[r][m] = fb
                        .named_intrinsic(
                            "llvm.x86.avx512.vpdpbusd.512",
                            &[dots[r][m].into(), (*w).into(), xb.into()],
                        )
                        .into_vector_value();
                }
            }
        }
        for (m, &(_, scales)) in mats.iter().enumerate() {
            let at = fb.addr(scales, g, Q8_PANEL * format.scale_bytes());
            let dw = match format {
                Format::Q8 => load(f32v.into(), at).into_vector_value(),
                Format::Q4 | Format::Q6 => {
                    let half = fb.cx.f16_type().vec_type(Q8_PANEL as u32);
                    let h = fb
                        .load_aligned(inkwell::types::BasicTypeEnum::from(half), at, 2)
                        .into_vector_value();
                    fb.b.build_float_ext(h, f32v, "").expect(BUG)
                }
            };
            for (r, &row) in rows.iter().enumerate() {
                let dx = load(fb.f32t().into(), fb.off(fb.addr(row, g, 4), k));
                let scale = fb.fmul(dw, splat(dx));
                let f =
                    fb.b.build_signed_int_to_float(dots[r][m], f32v, "")
                        .expect(BUG);
                let y = fb.vfma(f, scale, fb.getv(accs[r][m]));
                fb.set(accs[r][m], y);
            }
        }
    });
    accs.iter()
        .map(|row| row.iter().map(|&a| fb.getv(a)).collect())
        .collect()
}

/// Bits 4 and 5 of each of 64 bytes: bits `2t, 2t + 1` of that byte of `plane` (a q6 value's high bits).
fn high_bits<'ctx>(fb: &Fb<'_, 'ctx>, plane: VectorValue<'ctx>, t: usize) -> VectorValue<'ctx> {
    let words = fb.cx.i32_type().vec_type(Q8_PANEL as u32);
    let word = |c: u64| fb.splat(fb.cx.i32_type().const_int(c, false).into(), Q8_PANEL as u32);
    // Shifting whole 32-bit lanes moves no bit that the mask keeps across a byte boundary.
    let moved = match t {
        0 | 1 => {
            fb.b.build_left_shift(plane, word(4 - 2 * t as u64), "")
                .expect(BUG)
        }
        2 => plane,
        _ => {
            fb.b.build_right_shift(plane, word(2), false, "")
                .expect(BUG)
        }
    };
    debug_assert_eq!(moved.get_type(), words);
    fb.b.build_and(moved, word(0x3030_3030), "").expect(BUG)
}

/// The low and high nibbles of 64 packed bytes, each as 64 bytes (as `vpdpbusd` operands, 16 × i32).
fn nibbles<'ctx>(
    fb: &Fb<'_, 'ctx>,
    packed: inkwell::values::BasicValueEnum<'ctx>,
) -> (VectorValue<'ctx>, VectorValue<'ctx>) {
    let bytes = fb.cx.i8_type().vec_type(64);
    let words = fb.cx.i32_type().vec_type(Q8_PANEL as u32);
    let v =
        fb.b.build_bit_cast(packed, bytes, "")
            .expect(BUG)
            .into_vector_value();
    let low = fb.splat(fb.cx.i8_type().const_int(0x0f, false).into(), 64);
    let four = fb.splat(fb.cx.i8_type().const_int(4, false).into(), 64);
    let lo = fb.b.build_and(v, low, "").expect(BUG);
    let hi = fb.b.build_right_shift(v, four, false, "").expect(BUG);
    let cast = |x| {
        fb.b.build_bit_cast(x, words, "")
            .expect(BUG)
            .into_vector_value()
    };
    (cast(lo), cast(hi))
}
