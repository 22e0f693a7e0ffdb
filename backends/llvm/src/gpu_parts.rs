//! Parts of a GPU work item: a block of several warps that share one item can split a loop by warp (the
//! item's *parts*: attention's keys, RoPE's heads), each warp splitting a row across its lanes as a whole
//! item would, and then meet through shared memory ([`KernelBuilder::item_parts`](q3c_kernels::KernelBuilder::item_parts)).

use inkwell::values::{BasicValue, BasicValueEnum, IntValue, PointerValue};

use crate::fb::{Fb, Flavor, ItemShare, BUG};
use crate::gpu_gemm::{barrier, shared_array, shared_at, thread_index, WARP};

/// Runs `f` with this warp's index and the number of warps, as parts of the item, where a block of several
/// warps shares it on a GPU (inside, [`ItemShare::Part`] makes each warp's lanes the threads of the row
/// loops); on the CPU emulation, as the one part of the item that thread 0 takes; else with `None`.
pub fn item_parts<'a, 'ctx, R>(
    fb: &mut Fb<'a, 'ctx>,
    f: impl FnOnce(&mut Fb<'a, 'ctx>, Option<(IntValue<'ctx>, usize)>) -> R,
) -> R {
    let ItemShare::Rows(n) = fb.share else {
        return f(fb, None);
    };
    let part = match fb.flavor {
        Flavor::Gpu { .. } if n > WARP => (fb.udiv_c(thread_index(fb), WARP), n / WARP),
        // Thread 0 of the block takes the item alone: one part.
        Flavor::GpuOnCpu { .. } => (fb.i64c(0), 1),
        _ => return f(fb, None),
    };
    fb.share = ItemShare::Part(n);
    let r = f(fb, Some(part));
    fb.share = ItemShare::Rows(n);
    r
}

/// How [`reduce`] meets the parts' values.
#[derive(Clone, Copy)]
pub enum Meet {
    Max,
    Sum,
}

/// Inside [`item_parts`]: `x` (an f32 or a vector) met over the parts, each part giving the value of its
/// thread at this thread's lane, in every thread; outside, `x`. Every thread of the block must reach it
/// (two barriers: the first keeps a previous meeting's readers ahead of these writes).
pub fn reduce<'ctx>(
    fb: &Fb<'_, 'ctx>,
    x: BasicValueEnum<'ctx>,
    meet: Meet,
) -> BasicValueEnum<'ctx> {
    let ItemShare::Part(threads) = fb.share else {
        return x;
    };
    if !fb.flavor.is_gpu() {
        return x;
    }
    assert!(
        threads <= MAX_THREADS,
        "parts meeting in a block of {threads} threads"
    );
    let width = match x {
        BasicValueEnum::VectorValue(v) => v.get_type().get_size() as usize,
        _ => 1,
    };
    debug_assert!(width <= VALUES_PER_THREAD);
    let ty = x.get_type();
    let shared = part_values(fb);
    let tid = thread_index(fb);
    let lane = fb.urem_c(tid, WARP);
    let at = |i| shared_at(fb, shared, fb.mul_c(i, width));
    barrier(fb);
    fb.b.build_store(at(tid), x)
        .expect(BUG)
        .set_alignment((width * 4) as u32)
        .expect(BUG);
    barrier(fb);
    let load = |i| {
        let v = fb.b.build_load(ty, at(i), "").expect(BUG);
        v.as_instruction_value()
            .expect("a load")
            .set_alignment((width * 4) as u32)
            .expect(BUG);
        v
    };
    let mut acc = load(lane);
    for p in 1..threads / WARP {
        let v = load(fb.add_c(lane, p * WARP));
        acc = match (meet, acc, v) {
            (Meet::Sum, BasicValueEnum::FloatValue(a), BasicValueEnum::FloatValue(b)) => {
                fb.fadd(a, b).into()
            }
            (Meet::Sum, BasicValueEnum::VectorValue(a), BasicValueEnum::VectorValue(b)) => {
                fb.fadd(a, b).into()
            }
            (Meet::Max, BasicValueEnum::FloatValue(a), BasicValueEnum::FloatValue(b)) => {
                fb.fmax(a, b).into()
            }
            _ => unreachable!("parts meet f32 (max or sum) or vectors (sum)"),
        };
    }
    acc
}

/// Threads of a block whose parts meet, at most (a CUDA block's limit).
pub const MAX_THREADS: usize = 1024;
/// f32 per thread in the shared array [`reduce`] meets through (a vector of 4).
const VALUES_PER_THREAD: usize = 4;

/// The module's shared-memory array of [`VALUES_PER_THREAD`] f32 per thread of a block.
fn part_values<'ctx>(fb: &Fb<'_, 'ctx>) -> PointerValue<'ctx> {
    shared_array(fb, "q3c_part_values", MAX_THREADS * VALUES_PER_THREAD, 16)
}
