//! `int32_t q3c_forward(const q3c_step *step)`, built once for every CPU backend from the launch plan:
//! checks the step, then fills each dispatch's argument block and runs it through the runtime's
//! `parallel_for`.

use q3c_abi::launch::{Arg, LaunchPlan};
use q3c_abi::{services_offsets, step_offsets as so};

use crate::builder::EntryBuilder;

/// Emits the body of `q3c_forward` (its one parameter, the step, at `step`). `kernels[i]` is the function
/// of `launch.kernels[i]`.
pub fn build<B: EntryBuilder>(
    b: &mut B,
    step: B::Ptr,
    launch: &LaunchPlan,
    kernels: &[B::Func],
    max_tokens: usize,
    vocab: usize,
) {
    let field = |b: &mut B, off: i32| b.off(step, off as usize);
    let at = field(b, so::IDS);
    let ids = b.load_ptr(at);
    let at = field(b, so::T);
    let t = b.load_i64(at);
    // t must be in 1..=max_tokens: t − 1 < max_tokens, unsigned (t = 0 wraps around).
    let one = b.iconst(1);
    let t_minus_1 = b.sub(t, one);
    let limit = b.iconst(max_tokens);
    let fits = b.ult(t_minus_1, limit);
    let bad_t = b.not(fits);
    b.return_if(bad_t, q3c_abi::ERR_TOKENS);
    // Every id in 0..vocab.
    let zero = b.iconst(0);
    let bad = b.var_int(zero);
    b.for_range(zero, t, 1, |b, i| {
        let at = b.addr(ids, i, 4);
        let id = b.load_i32(at);
        let v = b.iconst(vocab);
        let inside = b.ult(id, v);
        let flag = b.get_int(bad);
        let zero = b.iconst(0);
        let this = b.select_int(inside, zero, one);
        let any = b.add(flag, this);
        b.set_int(bad, any);
    });
    let flags = b.get_int(bad);
    let zero = b.iconst(0);
    let clean = b.ieq(flags, zero);
    let bad_id = b.not(clean);
    b.return_if(bad_id, q3c_abi::ERR_TOKEN_ID);
    // With logit_rows, n_logits must be in 1..=t.
    let at = field(b, so::LOGIT_ROWS);
    let rows = b.load_i64(at);
    let zero = b.iconst(0);
    let some_rows = b.ieq(rows, zero);
    let some_rows = b.not(some_rows);
    let at = field(b, so::N_LOGITS);
    let n_logits = b.load_i64(at);
    let n_minus_1 = b.sub(n_logits, one);
    let fits = b.ult(n_minus_1, t);
    let misfit = b.not(fits);
    let bad_rows = b.and(some_rows, misfit);
    b.return_if(bad_rows, q3c_abi::ERR_TOKENS);

    let load = |b: &mut B, off: i32| {
        let at = b.off(step, off as usize);
        b.load_ptr(at)
    };
    let weights = load(b, so::WEIGHTS);
    let kv = load(b, so::KV);
    let scratch = load(b, so::SCRATCH);
    let logits = load(b, so::LOGITS);
    let services = load(b, so::SERVICES);
    let parallel_for = b.load_ptr(services);
    let at = b.off(services, services_offsets::POOL);
    let pool = b.load_ptr(at);
    // Kernel arguments: T, the step (whose rows' positions and sequences kernels read), then the
    // dispatch's pointers.
    let words = 2 + launch
        .dispatches
        .iter()
        .map(|d| d.args.len())
        .max()
        .unwrap_or(0);
    let args = b.stack(8 * words);
    // With logit_rows, the logits dispatches see n_logits rows (compacted to the front of their source).
    let at = field(b, so::LOGIT_ROWS);
    let rows = b.load_i64(at);
    let zero = b.iconst(0);
    let all_rows = b.ieq(rows, zero);
    let at = field(b, so::N_LOGITS);
    let n_logits = b.load_i64(at);
    let t_logits = b.select_int(all_rows, t, n_logits);

    for d in &launch.dispatches {
        let t_here = if d.logits { t_logits } else { t };
        b.store_i64(t_here, args);
        let at = b.off(args, 8);
        b.store_ptr(step, at);
        for (i, &a) in d.args.iter().enumerate() {
            let p = match a {
                Arg::Weight(index) => {
                    let entry = b.off(weights, index * 8);
                    b.load_ptr(entry)
                }
                Arg::WeightTable(index) => b.off(weights, index * 8),
                Arg::Ids => ids,
                Arg::Scratch(offset) => b.off(scratch, offset),
                Arg::Cache(slot) => {
                    let entry = b.off(kv, slot * 8);
                    b.load_ptr(entry)
                }
                Arg::Logits => logits,
            };
            let at = b.off(args, 16 + 8 * i);
            b.store_ptr(p, at);
        }
        let n = match (d.per_token, d.tokens_per_item) {
            (false, _) => b.iconst(d.items),
            (true, 1) => b.mul_c(t_here, d.items),
            (true, block) => {
                // ⌈T / block⌉ items per `items`.
                let up = b.iconst(block - 1);
                let t_up = b.add(t_here, up);
                let blocks = b.udiv_c(t_up, block);
                b.mul_c(blocks, d.items)
            }
        };
        match d.collective {
            Some(c) => {
                let at = b.off(services, services_offsets::COLLECTIVE);
                let f = b.load_ptr(at);
                let at = b.off(services, services_offsets::COLLECTIVE_CTX);
                let ctx = b.load_ptr(at);
                b.collective(f, ctx, c.word(), args, n);
            }
            None => b.parallel_for(parallel_for, pool, kernels[d.kernel], args, n),
        }
    }
    b.return_(q3c_abi::OK);
}
