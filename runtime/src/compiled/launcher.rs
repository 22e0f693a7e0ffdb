//! Running an artifact whose kernels are launched rather than dispatched by its own `q3c_forward`: the GPU
//! flavour compiled for this CPU (`q3c_abi::Manifest::launch`). The launcher does what a GPU runtime does
//! with the same launch plan — checks the step, fills each dispatch's argument block, launches
//! `ceil(items / threads)` blocks of `threads` — and runs every (block, thread) of the grid in turn, so
//! the plan, the argument blocks and the kernels' mapping of threads to work items are exercised on any
//! machine.

use q3c_abi::launch::{Arg, LaunchPlan, LaunchedKernel};
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
        let t = step.t as usize;
        if t == 0 || t > self.max_tokens {
            return q3c_abi::ERR_TOKENS;
        }
        // SAFETY: the step holds t ids.
        let ids = unsafe { std::slice::from_raw_parts(step.ids, t) };
        if ids.iter().any(|&id| id < 0 || id as usize >= self.vocab) {
            return q3c_abi::ERR_TOKEN_ID;
        }
        let n_logits = if step.logit_rows.is_null() {
            t
        } else {
            step.n_logits as usize
        };
        if n_logits == 0 || n_logits > t {
            return q3c_abi::ERR_TOKENS;
        }
        let words = 2 + self
            .plan
            .dispatches
            .iter()
            .map(|d| d.args.len())
            .max()
            .unwrap_or(0);
        let mut args = vec![0u64; words];
        for d in &self.plan.dispatches {
            let t_here = if d.logits { n_logits } else { t };
            args[0] = t_here as u64;
            args[1] = step as *const Step as u64;
            for (i, a) in d.args.iter().enumerate() {
                // SAFETY: indices and offsets come from the plan the artifact was compiled with; the
                // tables and buffers are the ones its manifest sized.
                args[2 + i] = unsafe {
                    match *a {
                        Arg::Weight(index) => *step.weights.add(index) as u64,
                        Arg::WeightTable(index) => step.weights.add(index) as u64,
                        Arg::Ids => step.ids as u64,
                        Arg::Scratch(offset) => step.scratch.add(offset) as u64,
                        Arg::Cache(slot) => *step.kv.add(slot) as u64,
                        Arg::Logits => step.logits as u64,
                    }
                };
            }
            let items = d.item_count(t_here) as u64;
            let threads = self.plan.threads_per_block as u64;
            let kernel = self.kernels[d.kernel];
            for block in 0..items.div_ceil(threads) {
                for thread in 0..threads {
                    // SAFETY: the argument block was filled as the kernel expects (see above).
                    unsafe { kernel(args.as_ptr(), items, block, threads, thread) };
                }
            }
        }
        q3c_abi::OK
    }
}
