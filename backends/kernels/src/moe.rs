//! The steps around a grouped expert product ([`MoeStep`]; the product itself is the node's kernel in
//! [`crate::ops`]): group the (token, slot) rows by expert, gather their activations into expert order,
//! scatter the products back.

use q3c_backend_common::launch::{ExpertSplit, MoeStep};
use q3c_ir::DType;

use crate::builder::KernelBuilder;
use crate::ops::{copy_row, part_first, zero_row, Params};

/// Emits the body of `step` (argument blocks as [`MoeStep`] documents them).
pub fn emit<B: KernelBuilder>(b: &mut B, step: MoeStep, Params { args, start, end }: Params<B>) {
    let t = b.load_i64(args);
    let arg = |b: &mut B, i: usize| {
        let at = b.off(args, 16 + 8 * i);
        b.load_ptr(at)
    };
    match step {
        MoeStep::Group {
            experts,
            slots,
            split,
        } => {
            let (ids, offsets, order) = (arg(b, 0), arg(b, 1), arg(b, 2));
            let first = split.map(|ExpertSplit { parts, ranks }| {
                let at = b.off(args, 8);
                let step = b.load_ptr(at);
                part_first(b, step, parts, ranks, experts)
            });
            let grouping = Grouping {
                experts,
                slots,
                first,
            };
            b.for_range(start, end, 1, |b, _| {
                grouping.emit(b, t, ids, offsets, order)
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
        MoeStep::Scatter { n, dropped_after } => {
            let (rows, order, out) = (arg(b, 0), arg(b, 1), arg(b, 2));
            // Rows from `offsets[experts]` on were dropped by the grouping (other ranks' experts).
            let kept = dropped_after.map(|experts| {
                let offsets = arg(b, 3);
                let at = b.off(offsets, 4 * experts);
                b.load_i32(at)
            });
            b.for_range(start, end, 1, |b, p| {
                let at = b.addr(order, p, 4);
                let row = b.load_i32(at);
                let (from, to) = (b.addr(rows, p, 4 * n), b.addr(out, row, 4 * n));
                let Some(kept) = kept else {
                    return copy_row(b, from, (to, DType::F32), n);
                };
                let computed = b.ult(p, kept);
                b.when(computed, |b| copy_row(b, from, (to, DType::F32), n));
                let dropped = b.not(computed);
                b.when(dropped, |b| zero_row(b, to, n));
            });
        }
    }
}

/// A counting sort of the `T · slots` rows by expert id: `offsets[e]` = rows of experts below `e`, and
/// `order[offsets[e] ..]` expert `e`'s rows in ascending order; after `offsets[experts]`, the count of
/// experts with rows and their ids. With `first` (a part of a stack split by experts), ids count from
/// `first`, and the rows of ids outside `first .. first + experts` go into one more bucket, `experts`,
/// which no product computes.
struct Grouping<I> {
    experts: usize,
    slots: usize,
    first: Option<I>,
}

impl<I: Copy> Grouping<I> {
    /// The bucket of expert id `id`.
    fn bucket<B: KernelBuilder<Int = I>>(&self, b: &mut B, id: I) -> I {
        let Some(first) = self.first else {
            return id;
        };
        let local = b.sub(id, first);
        let n = b.iconst(self.experts);
        let inside = b.ult(local, n);
        b.select_int(inside, local, n)
    }

    fn emit<B: KernelBuilder<Int = I>>(
        &self,
        b: &mut B,
        t: I,
        ids: B::Ptr,
        offsets: B::Ptr,
        order: B::Ptr,
    ) {
        let (experts, slots) = (self.experts, self.slots);
        let buckets = experts + usize::from(self.first.is_some());
        let rows = b.mul_c(t, slots);
        let zero = b.iconst(0);
        b.for_n(buckets + 1, |b, e| {
            let at = b.addr(offsets, e, 4);
            b.store_i32(zero, at);
        });
        // Each row's bucket, in row order.
        let each_row = |b: &mut B, f: &mut dyn FnMut(&mut B, I, I)| {
            b.for_range(zero, rows, 1, |b, r| {
                let at = b.addr(ids, r, 4);
                let id = b.load_i32(at);
                let e = self.bucket(b, id);
                f(b, r, e)
            })
        };
        // Counts at offsets[bucket + 1] ...
        let counts = b.off(offsets, 4);
        each_row(b, &mut |b, _, e| {
            post_increment(b, counts, e);
        });
        // ... summed into starts (the dropped bucket's start is offsets[experts]) ...
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
        // ... each row placed at its bucket's cursor (a copy of the starts on the stack) ...
        let cursor = b.stack(4 * buckets);
        b.for_n(buckets, |b, e| {
            let at = b.addr(offsets, e, 4);
            let start = b.load_i32(at);
            let to = b.addr(cursor, e, 4);
            b.store_i32(start, to);
        });
        each_row(b, &mut |b, r, e| {
            let p = post_increment(b, cursor, e);
            let to = b.addr(order, p, 4);
            b.store_i32(r, to);
        });
        // ... and the experts with rows compacted after the offsets (over the dropped bucket's count):
        // used[0] = how many, used[1..] = which (the product's items then skip the others with one
        // compare). Branch-free: every expert is written at the next place, which only a used one keeps.
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
    }
}

/// Adds one to the i32 at `table[i]`; returns the value before.
fn post_increment<B: KernelBuilder>(b: &mut B, table: B::Ptr, i: B::Int) -> B::Int {
    let at = b.addr(table, i, 4);
    let v = b.load_i32(at);
    let next = b.add_c(v, 1);
    b.store_i32(next, at);
    v
}
