//! The steps around a grouped expert product ([`MoeStep`]; the product itself is the node's kernel in
//! [`crate::ops`]): group the (token, slot) rows by expert, gather their activations into expert order,
//! scatter the products back.

use q3c_backend_common::launch::MoeStep;
use q3c_ir::DType;

use crate::builder::KernelBuilder;
use crate::ops::{copy_row, Params};

/// Emits the body of `step` (argument blocks as [`MoeStep`] documents them).
pub fn emit<B: KernelBuilder>(b: &mut B, step: MoeStep, Params { args, start, end }: Params<B>) {
    let t = b.load_i64(args);
    let arg = |b: &mut B, i: usize| {
        let at = b.off(args, 16 + 8 * i);
        b.load_ptr(at)
    };
    match step {
        MoeStep::Group { experts, slots } => {
            let (ids, offsets, order) = (arg(b, 0), arg(b, 1), arg(b, 2));
            b.for_range(start, end, 1, |b, _| {
                group(b, t, experts, slots, ids, offsets, order)
            });
        }
        MoeStep::Gather { k, slots, per_slot } => {
            let (x, order, rows) = (arg(b, 0), arg(b, 1), arg(b, 2));
            b.for_range(start, end, 1, |b, p| {
                let at = b.addr(order, p, 4);
                let row = b.load_i32(at);
                let src = if per_slot { row } else { b.udiv_c(row, slots) };
                let (from, to) = (b.addr(x, src, 4 * k), b.addr(rows, p, 4 * k));
                copy_row(b, from, (to, DType::F32), k);
            });
        }
        MoeStep::Scatter { n } => {
            let (rows, order, out) = (arg(b, 0), arg(b, 1), arg(b, 2));
            b.for_range(start, end, 1, |b, p| {
                let at = b.addr(order, p, 4);
                let row = b.load_i32(at);
                let (from, to) = (b.addr(rows, p, 4 * n), b.addr(out, row, 4 * n));
                copy_row(b, from, (to, DType::F32), n);
            });
        }
    }
}

/// A counting sort of the `T · slots` rows by expert id: `offsets[e]` = rows of experts below `e`, and
/// `order[offsets[e] ..]` expert `e`'s rows in ascending order; after `offsets[experts]`, the count of
/// experts with rows and their ids.
fn group<B: KernelBuilder>(
    b: &mut B,
    t: B::Int,
    experts: usize,
    slots: usize,
    ids: B::Ptr,
    offsets: B::Ptr,
    order: B::Ptr,
) {
    let rows = b.mul_c(t, slots);
    let zero = b.iconst(0);
    b.for_n(experts + 1, |b, e| {
        let at = b.addr(offsets, e, 4);
        b.store_i32(zero, at);
    });
    // Counts at offsets[e + 1] ...
    b.for_range(zero, rows, 1, |b, r| {
        let at = b.addr(ids, r, 4);
        let e = b.load_i32(at);
        let at = b.addr(offsets, e, 4);
        let at = b.off(at, 4);
        let c = b.load_i32(at);
        let c = b.add_c(c, 1);
        b.store_i32(c, at);
    });
    // ... summed into starts ...
    let running = b.var_int(zero);
    b.for_n(experts, |b, e| {
        let at = b.addr(offsets, e, 4);
        let at = b.off(at, 4);
        let count = b.load_i32(at);
        let sum = b.get_int(running);
        let sum = b.add(sum, count);
        b.set_int(running, sum);
        b.store_i32(sum, at);
    });
    // The experts with rows, compacted after the offsets: used[0] = how many, used[1..] = which (the
    // product's items then skip the others with one compare). Branch-free: every expert is written at the
    // next place, which only a used one keeps.
    let used = b.off(offsets, 4 * (experts + 1));
    let count_used = b.var_int(zero);
    b.for_n(experts, |b, e| {
        let at = b.addr(offsets, e, 4);
        let first = b.load_i32(at);
        let at = b.off(at, 4);
        let next = b.load_i32(at);
        let n = b.get_int(count_used);
        let slot = b.add_c(n, 1);
        let to = b.addr(used, slot, 4);
        b.store_i32(e, to);
        let empty = b.ieq(first, next);
        let n1 = b.add_c(n, 1);
        let n = b.select_int(empty, n, n1);
        b.set_int(count_used, n);
    });
    let n = b.get_int(count_used);
    b.store_i32(n, used);
    // ... then each row placed at its expert's cursor (a copy of the starts on the stack).
    let cursor = b.stack(4 * experts);
    b.for_n(experts, |b, e| {
        let at = b.addr(offsets, e, 4);
        let start = b.load_i32(at);
        let to = b.addr(cursor, e, 4);
        b.store_i32(start, to);
    });
    b.for_range(zero, rows, 1, |b, r| {
        let at = b.addr(ids, r, 4);
        let e = b.load_i32(at);
        let at = b.addr(cursor, e, 4);
        let p = b.load_i32(at);
        let next = b.add_c(p, 1);
        b.store_i32(next, at);
        let to = b.addr(order, p, 4);
        b.store_i32(r, to);
    });
}
