//! Running an artifact whose kernels are launched rather than dispatched by its own `q3c_forward`: the GPU
//! flavour compiled for this CPU (`q3c_abi::Manifest::launch`). The launcher does what a GPU runtime does
//! with the same launch plan — checks the step, fills each dispatch's argument block, launches its grid
//! (`Dispatch::grid`) — and runs every (block, thread) of the grid in turn, so
//! the plan, the argument blocks and the kernels' mapping of threads to work items are exercised on any
//! machine.

use q3c_abi::launch::{Arg, Dispatch, LaunchPlan, LaunchedKernel};
use q3c_abi::Step;

/// A launch plan with the entry point of each of its kernels.
pub struct Launcher {
    plan: LaunchPlan,
    kernels: Vec<LaunchedKernel>,
    max_tokens: usize,
    vocab: usize,
}

impl Launcher {
    /// `kernels[i]` must be the entry point named `plan.kernels[i]`.
    pub fn new(
        plan: LaunchPlan,
        kernels: Vec<LaunchedKernel>,
        max_tokens: usize,
        vocab: usize,
    ) -> Launcher {
        Launcher {
            plan,
            kernels,
            max_tokens,
            vocab,
        }
    }

    /// Runs one forward call as `q3c_forward` would, returning its status.
    ///
    /// # Safety
    /// Every pointer of `step` must be valid for the sizes the artifact's manifest specifies, as for
    /// `q3c_forward`.
    pub unsafe fn run(&self, step: &Step) -> i32 {
        // SAFETY: as for this function.
        let n_logits = match unsafe { check_step(step, self.max_tokens, self.vocab) } {
            Ok(n) => n,
            Err(status) => return status,
        };
        let mut args = Vec::new();
        for d in &self.plan.dispatches {
            let (items, kernel) = arguments(
                d,
                step,
                n_logits,
                step as *const Step as u64,
                &mut args,
                |a| {
                    // SAFETY: indices and offsets come from the plan the artifact was compiled with; the
                    // tables and buffers are the ones its manifest sized.
                    unsafe {
                        match a {
                            Arg::Weight(index) => *step.weights.add(index) as u64,
                            Arg::WeightTable(index) => step.weights.add(index) as u64,
                            Arg::Ids => step.ids as u64,
                            Arg::Scratch(offset) => step.scratch.add(offset) as u64,
                            Arg::Cache(slot) => *step.kv.add(slot) as u64,
                            Arg::Logits => step.logits as u64,
                        }
                    }
                },
            );
            let (blocks, threads) = d.grid(items, self.plan.threads_per_block);
            let (items, blocks, threads) = (items as u64, blocks as u64, threads as u64);
            let kernel = self.kernels[kernel];
            for block in 0..blocks {
                for thread in 0..threads {
                    // SAFETY: the argument block was filled as the kernel expects (see above).
                    unsafe { kernel(args.as_ptr(), items, block, threads, thread) };
                }
            }
        }
        q3c_abi::OK
    }
}

/// Checks a step as `q3c_forward` does, returning its number of logit rows or the status refusing it.
///
/// # Safety
/// `step.ids` must hold `step.t` ids, and `step.logit_rows` (if set) `step.n_logits` rows.
pub(crate) unsafe fn check_step(
    step: &Step,
    max_tokens: usize,
    vocab: usize,
) -> Result<usize, i32> {
    let t = step.t as usize;
    if t == 0 || t > max_tokens {
        return Err(q3c_abi::ERR_TOKENS);
    }
    // SAFETY: the step holds t ids.
    let ids = unsafe { std::slice::from_raw_parts(step.ids, t) };
    if ids.iter().any(|&id| id < 0 || id as usize >= vocab) {
        return Err(q3c_abi::ERR_TOKEN_ID);
    }
    let n_logits = if step.logit_rows.is_null() {
        t
    } else {
        step.n_logits as usize
    };
    if n_logits == 0 || n_logits > t {
        return Err(q3c_abi::ERR_TOKENS);
    }
    Ok(n_logits)
}

/// Writes dispatch `d`'s argument block into `out` — `[T, step address, each argument as resolve says]`,
/// T the step's rows or, for logits dispatches, its logit rows — and returns its work items and the kernel
/// that takes them ([`Dispatch::kernel_for`]).
pub(crate) fn arguments(
    d: &Dispatch,
    step: &Step,
    n_logits: usize,
    step_address: u64,
    out: &mut Vec<u64>,
    resolve: impl Fn(Arg) -> u64,
) -> (usize, usize) {
    let t = if d.logits { n_logits } else { step.t as usize };
    out.clear();
    out.push(t as u64);
    out.push(step_address);
    out.extend(d.args.iter().map(|&a| resolve(a)));
    (d.item_count(t), d.kernel_for(t))
}
