//! Rows of the KV cache as the kernels write and read them: one KV head's `n` elements of the cache's
//! element type, laid out as `q3c_abi::kv_head_row_bytes` says. f32, f16 and bf16 rows are plain
//! elements; a q8 row is `n` signed bytes, then one f32 scale per group of [`q3c_abi::kv_q8_group`].
//!
//! Writing rounds each element once (a q8 group to its largest magnitude / 127); reading widens to f32,
//! where for q8 the caller applies the group's scale ([`q8_scale`]) to whatever it multiplies the bytes
//! with, so a dot product or a weighted sum costs one more multiply per vector, not per element.

use q3c_abi::{kv_head_row_bytes, kv_q8_group};
use q3c_ir::DType;

use crate::builder::KernelBuilder;
use crate::ops::copy_row;

/// Bytes of one KV head's row of `n` elements of `kv`.
pub(crate) fn row_bytes(kv: DType, n: usize) -> usize {
    kv_head_row_bytes(kv.name(), n)
}

/// Whether the q8 row of `n` elements has whole vectors within its groups (else its readers widen it
/// element by element first).
pub(crate) fn q8_vectors_fit<B: KernelBuilder>(b: &B, n: usize) -> bool {
    kv_q8_group(n).is_multiple_of(b.lanes())
}

/// The scale of the q8 group holding element `e` (a multiple of the vector width where vectors fit) of
/// the row of `n` elements at `row`.
pub(crate) fn q8_scale<B: KernelBuilder>(
    b: &mut B,
    row: B::Ptr,
    n: usize,
    e: Element<B>,
) -> B::F32 {
    let group = kv_q8_group(n);
    let scales = b.off(row, n);
    let at = match e {
        Element::Const(i) => b.off(scales, 4 * (i / group)),
        Element::At(i) => {
            let g = b.udiv_c(i, group);
            b.addr(scales, g, 4)
        }
    };
    b.load_f32(at)
}

/// `Σ_i x[i] · k[i]` over the q8 row `k` of `n` elements (f32 at `x`), for one thread alone where vectors
/// fit the groups: each group's products summed, times its scale, then the groups summed pairwise, so no
/// chain of dependent additions runs the length of the row.
pub(crate) fn q8_dot_alone<B: KernelBuilder>(b: &mut B, x: B::Ptr, k: B::Ptr, n: usize) -> B::F32 {
    let (lanes, group) = (b.lanes(), kv_q8_group(n));
    let mut parts: Vec<B::Vec> = (0..n / group)
        .map(|g| {
            let mut sum: Option<B::Vec> = None;
            for e in (g * group..(g + 1) * group).step_by(lanes) {
                let (xa, ka) = (b.off(x, 4 * e), b.off(k, e));
                let (xv, kv) = (b.vload(xa), b.vload_weight(DType::Q8, ka));
                sum = Some(match sum {
                    None => b.vmul(xv, kv),
                    Some(s) => b.vfma(xv, kv, s),
                });
            }
            let scale = q8_scale(b, k, n, Element::Const(g * group));
            let scale = b.vsplat(scale);
            b.vmul(sum.expect("a group holds a vector"), scale)
        })
        .collect();
    while parts.len() > 1 {
        parts = parts
            .chunks(2)
            .map(|pair| match *pair {
                [a, c] => b.vadd(a, c),
                [a] => a,
                _ => unreachable!("chunks of two"),
            })
            .collect();
    }
    b.hsum(parts[0])
}

/// An element's index in a row: known when the kernel is built, or computed.
pub(crate) enum Element<B: KernelBuilder> {
    Const(usize),
    At(B::Int),
}

/// Writes the `n` f32 at `src` as the KV row at `dst` of `kv`. A q8 group's scale is its largest magnitude
/// / 127 (its bytes then span ±127); an infinite or NaN element makes the scale NaN, so that it reaches
/// the logits as it would through a wider cache.
pub(crate) fn store_row<B: KernelBuilder>(
    b: &mut B,
    src: B::Ptr,
    (dst, kv): (B::Ptr, DType),
    n: usize,
) {
    if kv != DType::Q8 {
        return copy_row(b, src, (dst, kv), n);
    }
    let group = kv_q8_group(n);
    b.for_n(n / group, |b, g| {
        let from = b.addr(src, g, group * 4);
        let zero = b.fconst(0.0);
        let (largest, poison) = (b.var_f32(zero), b.var_f32(zero));
        b.for_n(group, |b, i| {
            let at = b.addr(from, i, 4);
            let x = b.load_f32(at);
            let neg = b.fsub(zero, x);
            let magnitude = b.fmax(x, neg);
            let m = b.get_f32(largest);
            let m = b.fmax(m, magnitude);
            b.set_f32(largest, m);
            // 0 for a finite element, NaN for an infinite or NaN one.
            let p = b.get_f32(poison);
            let p = b.fma(x, zero, p);
            b.set_f32(poison, p);
        });
        let m = b.get_f32(largest);
        let step = b.fconst(1.0 / 127.0);
        let scale = b.fmul(m, step);
        let p = b.get_f32(poison);
        let scale = b.fadd(scale, p);
        let scales = b.off(dst, n);
        let at = b.addr(scales, g, 4);
        b.store_f32(scale, at);
        let full = b.fconst(127.0);
        let inv = b.fdiv(full, m);
        let any = b.fgt(m, zero);
        let inv = b.select_f32(any, inv, zero);
        let to = b.addr(dst, g, group);
        b.for_n(group, |b, i| {
            let at = b.addr(from, i, 4);
            let x = b.load_f32(at);
            let q = b.fmul(x, inv);
            let at = b.addr(to, i, 1);
            b.store_as(DType::Q8, q, at);
        });
    });
}
