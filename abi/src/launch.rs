//! The launch plan: every kernel dispatch of one forward call, in order, as data.
//!
//! A CPU artifact's `q3c_forward` is generated from it; a launcher that runs kernels itself (the CPU
//! emulation of GPU launches, a GPU runtime) reads it and fills each dispatch's argument block the same
//! way: `[T, the step's address, arguments...]` as 64-bit words (kernels read the rows' positions and
//! sequences from the step), where each argument is resolved by [`Arg`].

use serde::{Deserialize, Serialize};

/// Threads per block of a GPU launch (work items `block · THREADS_PER_BLOCK + thread`).
pub const THREADS_PER_BLOCK: usize = 64;

/// Every dispatch of a forward call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchPlan {
    /// The distinct kernels, by symbol (nodes whose code would be identical share one). In an artifact
    /// whose kernels are launched ([`crate::Manifest::launch`]), each is an exported
    /// `void kernel(const uint64_t *args, uint64_t items, uint64_t block, uint64_t threads, uint64_t
    /// thread)` that runs work item `block · threads + thread` if it is below `items`.
    pub kernels: Vec<String>,
    /// In the order they run; each waits for the one before.
    pub dispatches: Vec<Dispatch>,
    /// Threads per block where kernels are launched as on a GPU.
    pub threads_per_block: usize,
    /// Set where every kernel lets the next one launch and then waits for the one before to finish at its
    /// start (PTX `griddepcontrol`, sm_90 and later): a GPU runtime may then launch them programmatically,
    /// each kernel's blocks starting while the one before finishes. Without it (older artifacts, sm_80)
    /// each launch must wait for the one before.
    #[serde(default)]
    pub programmatic: bool,
}

/// One kernel launch over its work items.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dispatch {
    /// Index into [`LaunchPlan::kernels`].
    pub kernel: usize,
    /// The words after `[T, step]` in the argument block: input pointers, then output pointers.
    pub args: Vec<Arg>,
    /// Work items: `items`, times ⌈T / tokens_per_item⌉ if `per_token`.
    pub items: usize,
    pub per_token: bool,
    /// Tokens one work item takes (1 but for attention, whose items take blocks of tokens).
    #[serde(default = "one")]
    pub tokens_per_item: usize,
    /// Set on the dispatches that compute the logits: they run over the step's logit rows only (`T =
    /// n_logits` when `logit_rows` is set), which a compaction kernel before them has moved to the front
    /// of their source.
    #[serde(default)]
    pub logits: bool,
    /// Threads that take one work item together, as one block of a GPU launch (`items` blocks); 1: one
    /// thread per item, in blocks of [`LaunchPlan::threads_per_block`]. Set by GPU code generators for
    /// the kernels whose GPU code cooperates within a block (matrix products).
    #[serde(default = "one")]
    pub threads_per_item: usize,
    /// Set on the dispatches the runtime runs itself between the ranks of a sharded model
    /// (`q3c_services.collective`, over `args = [T, step, x, out]`, `items` floats of x per token);
    /// `kernel` is then [`NO_KERNEL`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collective: Option<Collective>,
    /// Another kernel for the same work in calls of many rows (see [`ManyRows`]); `None`: [`Dispatch::kernel`]
    /// always. Older launchers, which do not know it, run `kernel` for every call: the same results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub many_rows: Option<ManyRows>,
}

/// A kernel a dispatch launches instead of its own in calls whose `T` (the rows of its argument block) is
/// at least `from`, with the same argument block, items and block shape: on GPUs, the tensor-core tiles of a
/// matrix product, which need more registers than the decode steps' blocks should carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManyRows {
    /// Index into [`LaunchPlan::kernels`].
    pub kernel: usize,
    pub from: usize,
}

/// The `kernel` of a [`Dispatch`] that runs a collective, not a kernel.
pub const NO_KERNEL: usize = usize::MAX;

/// A collective among the ranks of a sharded model (`Q3C_ALL_REDUCE`, `Q3C_ALL_GATHER` in `q3c_abi.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Collective {
    /// The sum over the first rank of each of `parts` parts (`r · parts mod ranks < parts`).
    AllReduce { parts: usize },
    /// Every rank's row side by side, by rank.
    AllGather,
}

impl Collective {
    /// The `op` word `q3c_services.collective` receives.
    pub fn word(self) -> u64 {
        match self {
            Collective::AllReduce { parts } => (parts as u64) << 8,
            Collective::AllGather => 1,
        }
    }

    /// The collective an `op` word names.
    pub fn from_word(word: u64) -> Option<Collective> {
        match (word & 0xff, word >> 8) {
            (0, parts) if parts > 0 => Some(Collective::AllReduce {
                parts: parts as usize,
            }),
            (1, 0) => Some(Collective::AllGather),
            _ => None,
        }
    }

    /// Whether rank `rank` of `ranks` adds its part to an all-reduce (always, for a gather).
    pub fn contributes(self, rank: usize, ranks: usize) -> bool {
        match self {
            Collective::AllReduce { parts } => rank * parts % ranks < parts,
            Collective::AllGather => true,
        }
    }
}

impl Dispatch {
    /// Blocks and threads per block of a GPU launch over `items` work items, with `threads_per_block`
    /// threads in a block of single-thread items.
    pub fn grid(&self, items: usize, threads_per_block: usize) -> (usize, usize) {
        match self.threads_per_item {
            1 => (items.div_ceil(threads_per_block), threads_per_block),
            t => (items, t),
        }
    }

    /// The kernel a call whose argument block has `t` rows launches.
    pub fn kernel_for(&self, t: usize) -> usize {
        match self.many_rows {
            Some(m) if t >= m.from => m.kernel,
            _ => self.kernel,
        }
    }

    /// Work items for a call of `t` tokens.
    pub fn item_count(&self, t: usize) -> usize {
        if self.per_token {
            self.items * t.div_ceil(self.tokens_per_item)
        } else {
            self.items
        }
    }
}

fn one() -> usize {
    1
}

/// A launched kernel (see [`LaunchPlan::kernels`]).
pub type LaunchedKernel =
    unsafe extern "C" fn(args: *const u64, items: u64, block: u64, threads: u64, thread: u64);

/// Where one argument word points.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Arg {
    /// The data of weight-table entry `index`.
    Weight(usize),
    /// The address of weight-table entry `index` itself: an expert stack, `E` consecutive data pointers.
    WeightTable(usize),
    /// The step's token ids.
    Ids,
    /// The scratch arena at this byte offset.
    Scratch(usize),
    /// The KV-cache buffer `slot` (2·layer for K, 2·layer + 1 for V).
    Cache(usize),
    /// The caller's logits buffer.
    Logits,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_of_many_rows_launch_the_other_kernel_and_old_plans_read_without_one() {
        let plain = Dispatch {
            kernel: 3,
            args: vec![Arg::Scratch(0)],
            items: 16,
            per_token: false,
            tokens_per_item: 1,
            logits: false,
            threads_per_item: 256,
            collective: None,
            many_rows: None,
        };
        assert_eq!([1, 64, 512].map(|t| plain.kernel_for(t)), [3, 3, 3]);
        let tensor = Dispatch {
            many_rows: Some(ManyRows {
                kernel: 7,
                from: 64,
            }),
            ..plain.clone()
        };
        assert_eq!([1, 63, 64, 512].map(|t| tensor.kernel_for(t)), [3, 3, 7, 7]);
        // A plan written before `many_rows` existed reads as one without it; one without it writes none.
        let json = serde_json::to_string(&plain).unwrap();
        assert!(!json.contains("many_rows"), "{json}");
        let read: Dispatch = serde_json::from_str(&json).unwrap();
        assert_eq!(read, plain);
        let read: Dispatch =
            serde_json::from_str(&serde_json::to_string(&tensor).unwrap()).unwrap();
        assert_eq!(read, tensor);
    }
}
