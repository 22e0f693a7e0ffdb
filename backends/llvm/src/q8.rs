//! Products over `q8` weights (`q3c_abi::Q8_LAYOUT`: i8 in groups of 32, one f32 scale each) with
//! AVX512-VNNI: the activations are quantized the same way (per row, per group of 32) into a stack buffer,
//! and each group's product is one `vpdpbusd` — `|x|` (unsigned) against `w` carrying `x`'s sign
//! (`vpsignb`), as llama.cpp's Q8_0 kernels do — scaled by `d_x · d_w` into f32 accumulators.

use inkwell::types::VectorType;
use inkwell::values::{BasicValue, FloatValue, IntValue, PointerValue, VectorValue};
use q3c_ir::Q8_GROUP;

use crate::fb::{Fb, BUG};

/// Bytes of one quantized activation row of `k`: the i8 values, their magnitudes, then one f32 per group.
pub fn row_bytes(k: usize) -> usize {
    2 * k + k / Q8_GROUP * 4
}

/// Quantizes `n` rows of `k` f32 at `x` (row stride `k·4`) into `dst` (row stride [`row_bytes`]).
pub fn quantize_rows<'ctx>(
    fb: &Fb<'_, 'ctx>,
    x: PointerValue<'ctx>,
    n: usize,
    k: usize,
    dst: PointerValue<'ctx>,
) {
    let i32t = fb.cx.i32_type();
    for i in 0..n {
        let (src, to) = (fb.off(x, i * k * 4), fb.off(dst, i * row_bytes(k)));
        fb.for_n(k / Q8_GROUP, |fb, g| {
            let p = fb.addr(src, g, Q8_GROUP * 4);
            let (lo, hi) = (fb.vload(p), fb.vload(fb.off(p, 64)));
            let both = concat(fb, lo, hi);
            let abs = fb
                .intrinsic("llvm.fabs", both.get_type().into(), &[both.into()])
                .into_vector_value();
            let amax = fb
                .intrinsic(
                    "llvm.vector.reduce.fmax",
                    both.get_type().into(),
                    &[abs.into()],
                )
                .into_float_value();
            let d = fb.fmul(amax, fb.f32c(1.0 / 127.0));
            let positive = fb.fgt(d, fb.f32c(0.0));
            let inv = fb.fdiv(fb.f32c(1.0), d);
            let inv =
                fb.b.build_select(positive, inv, fb.f32c(0.0), "")
                    .expect(BUG)
                    .into_float_value();
            let splat = fb.pack(&[inv; Q8_GROUP]);
            let scaled = fb.fmul(both, splat);
            let rounded = fb
                .intrinsic("llvm.roundeven", scaled.get_type().into(), &[scaled.into()])
                .into_vector_value();
            let q32 =
                fb.b.build_float_to_signed_int(rounded, i32t.vec_type(Q8_GROUP as u32), "")
                    .expect(BUG);
            let q =
                fb.b.build_int_truncate(q32, fb.cx.i8_type().vec_type(Q8_GROUP as u32), "")
                    .expect(BUG);
            let a = fb
                .intrinsic(
                    "llvm.abs",
                    q.get_type().into(),
                    &[q.into(), fb.cx.bool_type().const_zero().into()],
                )
                .into_vector_value();
            fb.store(q, fb.addr(to, g, Q8_GROUP));
            fb.store(a, fb.off(fb.addr(to, g, Q8_GROUP), k));
            fb.store(d, fb.off(fb.addr(to, g, 4), 2 * k));
        });
    }
}

/// Two vectors as one of twice the lanes.
fn concat<'ctx>(
    fb: &Fb<'_, 'ctx>,
    a: VectorValue<'ctx>,
    b: VectorValue<'ctx>,
) -> VectorValue<'ctx> {
    let n = a.get_type().get_size();
    let mask: Vec<IntValue> = (0..2 * n)
        .map(|i| fb.cx.i32_type().const_int(u64::from(i), false))
        .collect();
    fb.b.build_shuffle_vector(a, b, VectorType::const_vector(&mask), "")
        .expect(BUG)
}

/// `sums[r][c]` over `k`: quantized rows at `rows` (see [`quantize_rows`]) against q8 weight rows at
/// `cols` (i8) with their group scales at `scales`.
pub fn dot_block<'ctx>(
    fb: &Fb<'_, 'ctx>,
    rows: &[PointerValue<'ctx>],
    cols: &[(PointerValue<'ctx>, PointerValue<'ctx>)],
    k: usize,
) -> Vec<Vec<FloatValue<'ctx>>> {
    let i8v = fb.cx.i8_type().vec_type(Q8_GROUP as u32);
    let i32v = fb.cx.i32_type().vec_type(8);
    let f8 = fb.f32t().vec_type(8);
    // Independent chains per pair (at least four in all), taking turns group by group.
    let chains = (4 / (rows.len() * cols.len())).max(1);
    let accs: Vec<Vec<Vec<_>>> = (0..chains)
        .map(|_| {
            rows.iter()
                .map(|_| cols.iter().map(|_| fb.var(f8.const_zero())).collect())
                .collect()
        })
        .collect();
    let load = |p: PointerValue<'ctx>| {
        let v = fb.b.build_load(i8v, p, "").expect(BUG);
        if let Some(i) = v.as_instruction_value() {
            i.set_alignment(1).expect(BUG);
        }
        v.into_vector_value()
    };
    let as_i32 = |v: VectorValue<'ctx>| {
        fb.b.build_bit_cast(v, i32v, "")
            .expect(BUG)
            .into_vector_value()
    };
    // One group (32 elements) of every pair into chain `u`.
    let group = |g: IntValue<'ctx>, u: usize| {
        let xs: Vec<_> = rows
            .iter()
            .map(|&r| {
                let q = load(fb.addr(r, g, Q8_GROUP));
                let a = load(fb.off(fb.addr(r, g, Q8_GROUP), k));
                let d = fb.load_f32(fb.off(fb.addr(r, g, 4), 2 * k));
                (q, a, d)
            })
            .collect();
        for (c, &(w, s)) in cols.iter().enumerate() {
            let wq = load(fb.addr(w, g, Q8_GROUP));
            let dw = fb.load_f32(fb.addr(s, g, 4));
            for (r, &(xq, xa, dx)) in xs.iter().enumerate() {
                let signed = fb
                    .named_intrinsic("llvm.x86.avx2.psign.b", &[wq.into(), xq.into()])
                    .into_vector_value();
                let dp = fb
                    .named_intrinsic(
                        "llvm.x86.avx512.vpdpbusd.256",
                        &[
                            i32v.const_zero().into(),
                            as_i32(xa).into(),
                            as_i32(signed).into(),
                        ],
                    )
                    .into_vector_value();
                let f = fb.b.build_signed_int_to_float(dp, f8, "").expect(BUG);
                let scale = fb.fmul(dx, dw);
                let acc = fb.getv(accs[u][r][c]);
                let y = fb.vfma(f, fb.pack(&[scale; 8]), acc);
                fb.set(accs[u][r][c], y.as_basic_value_enum());
            }
        }
    };
    let groups = k / Q8_GROUP;
    let trips = groups / chains;
    fb.for_n(trips, |fb, j| {
        for u in 0..chains {
            group(fb.add_c(fb.mul_c(j, chains), u), u);
        }
    });
    for (u, g) in (trips * chains..groups).enumerate() {
        group(fb.i64c(g), u);
    }
    (0..rows.len())
        .map(|r| {
            (0..cols.len())
                .map(|c| {
                    let mut v = fb.getv(accs[0][r][c]);
                    for chain in &accs[1..] {
                        v = fb.fadd(v, fb.getv(chain[r][c]));
                    }
                    fb.hsum(v)
                })
                .collect()
        })
        .collect()
}
