//! Matrix products on NVIDIA GPUs: one thread block per work item (a panel of output columns), each warp
//! taking `width / warps` columns together (one at a time where they do not divide), the warp's 32 lanes
//! splitting `k`.
//!
//! Each lane reads `v` consecutive weights (up to 8 bf16 = 16 bytes) per step and the warp a contiguous
//! `32·v`-element run of the weight row, so the loads are coalesced; the activations come from L1/L2 (every
//! warp of the call reads the same rows). Rows go in blocks of four, each weight load shared by them. A
//! warp's partial sums meet in a butterfly of `shfl.sync.bfly` (every lane ends with the sum) and lane 0
//! applies the epilogue and stores. Used for the kernels the launch plan gives [`ProductShape::threads`] threads
//! per item (`q3c_abi::launch::Dispatch::threads_per_item`); on the CPU emulation of the GPU flavour the
//! same items run with the CPU tiling on one thread of the block.

use inkwell::values::{FloatValue, IntValue, PointerValue};
use inkwell::IntPredicate;
use q3c_ir::DType;
use q3c_kernels::MatMul;

use crate::fb::{Fb, Flavor, ItemShare, BUG};
use crate::gemm::epilogue;

/// The shape of the product kernels' blocks. [`ProductShape::DEFAULT`] is the best measured on an H200;
/// `Q3C_GPU_PRODUCTS` (e.g. `threads=128,streams=8,rows=2,blocks=4`, any subset) overrides it when
/// compiling, for the sweeps `benches/gpu.sh` times on a lent GPU.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProductShape {
    /// Threads of the block that takes one work item (a panel of output columns; each warp takes
    /// `width / warps` of them together).
    pub threads: usize,
    /// Weight runs a lane loads per iteration of a `k` loop at least (columns × matrices × steps).
    pub streams: usize,
    /// Rows that share each weight load.
    pub rows: usize,
    /// Blocks an SM must be able to hold at once: ptxas keeps the registers to fit (0: no bound).
    pub min_blocks: usize,
    /// With bf16 activations, calls of at least this many rows multiply on tensor cores
    /// ([`crate::gpu_mma`]); fewer take this module's FMA blocks. 0: never.
    pub tensor_rows: usize,
    /// Panels (of 16 columns) that many blocks of the tensor-core kernels share: those blocks split the
    /// rows and share the panels' columns. The most up to this that divides a matrix's panels, but at
    /// least a warp tile's panels.
    pub group: usize,
    /// Chunks of 64 k positions a tensor-core warp loads per loop iteration before multiplying them.
    pub tensor_chunks: usize,
}

impl ProductShape {
    /// 8 warps, two columns each of a 16-column panel. Measured on an H200: one column at a time left the
    /// single-matrix products at 1.8-2.1 TB/s, two 2.3-2.8; a warp per column in blocks of 512 threads,
    /// held to 64 registers for two blocks per SM, ran prefill at 0.7×, decode the same.
    pub const DEFAULT: ProductShape = ProductShape {
        threads: 256,
        streams: 4,
        rows: 4,
        min_blocks: 0,
        tensor_rows: 64,
        group: 4,
        tensor_chunks: 2,
    };

    /// The shape this compilation uses: [`ProductShape::DEFAULT`] with `Q3C_GPU_PRODUCTS`' settings.
    pub fn get() -> Result<ProductShape, String> {
        match std::env::var("Q3C_GPU_PRODUCTS") {
            Ok(spec) => ProductShape::parse(&spec),
            Err(_) => Ok(ProductShape::DEFAULT),
        }
    }

    /// [`ProductShape::DEFAULT`] with the comma-separated `key=value` settings of `spec`.
    pub fn parse(spec: &str) -> Result<ProductShape, String> {
        let mut s = ProductShape::DEFAULT;
        for kv in spec.split(',').filter(|kv| !kv.trim().is_empty()) {
            let bad = || {
                format!(
                    "Q3C_GPU_PRODUCTS: `{kv}` is not key=number (threads, streams, rows, blocks, \
                     tensor_rows, group, tensor_chunks)"
                )
            };
            let (k, v) = kv.split_once('=').ok_or_else(bad)?;
            let v: usize = v.trim().parse().map_err(|_| bad())?;
            match k.trim() {
                "threads" => s.threads = v,
                "streams" => s.streams = v,
                "rows" => s.rows = v,
                "blocks" => s.min_blocks = v,
                "tensor_rows" => s.tensor_rows = v,
                "group" => s.group = v,
                "tensor_chunks" => s.tensor_chunks = v,
                _ => return Err(bad()),
            }
        }
        let ok = s.threads.is_power_of_two()
            && (WARP..=1024).contains(&s.threads)
            && (1..=64).contains(&s.streams)
            && (1..=8).contains(&s.rows)
            && [1, 2, 4, 8].contains(&s.group)
            && (1..=4).contains(&s.tensor_chunks);
        if !ok {
            return Err(format!(
                "Q3C_GPU_PRODUCTS: threads={}, streams={}, rows={}, group={}, tensor_chunks={} is out of \
                 range (threads a power of two from 32 to 1024, streams 1-64, rows 1-8, group 1, 2, 4 or 8, \
                 tensor_chunks 1-4)",
                s.threads, s.streams, s.rows, s.group, s.tensor_chunks
            ));
        }
        Ok(s)
    }
}

/// Threads of a row kernel's block at most (the shared arrays of its sums are sized for them).
pub const BLOCK_THREADS: usize = 256;
/// Threads of a warp: the threads of a row kernel's item.
pub const WARP: usize = 32;

/// `threadIdx.x` as an i64.
pub fn thread_index<'ctx>(fb: &Fb<'_, 'ctx>) -> IntValue<'ctx> {
    let name = "llvm.nvvm.read.ptx.sreg.tid.x";
    let i32t = fb.cx.i32_type();
    let f =
        fb.m.get_function(name)
            .unwrap_or_else(|| fb.m.add_function(name, i32t.fn_type(&[], false), None));
    let v = fb.call(f, &[]).into_int_value();
    fb.b.build_int_z_extend(v, fb.i64t(), "").expect(BUG)
}

/// The warp's sum of `x`, in every lane.
pub fn warp_sum<'ctx>(fb: &Fb<'_, 'ctx>, x: FloatValue<'ctx>) -> FloatValue<'ctx> {
    warp_sum_masks(fb, x, &[16, 8, 4, 2, 1])
}

/// The sum of `x` over the lanes whose indices differ only in the bits of `masks` (a butterfly of
/// `shfl.sync.bfly` over those distances), in each of them.
pub fn warp_sum_masks<'ctx>(
    fb: &Fb<'_, 'ctx>,
    x: FloatValue<'ctx>,
    masks: &[u64],
) -> FloatValue<'ctx> {
    let i32t = fb.cx.i32_type();
    let all = i32t.const_int(0xffff_ffff, false);
    let clamp = i32t.const_int(0x1f, false);
    let mut s = x;
    for &mask in masks {
        let other = fb
            .named_intrinsic(
                "llvm.nvvm.shfl.sync.bfly.f32",
                &[
                    all.into(),
                    s.into(),
                    i32t.const_int(mask, false).into(),
                    clamp.into(),
                ],
            )
            .into_float_value();
        s = fb.fadd(s, other);
    }
    s
}

/// `n` elements of `dt` at `p`, aligned to their whole size, as f32.
fn load_run<'ctx>(
    fb: &Fb<'_, 'ctx>,
    dt: DType,
    p: PointerValue<'ctx>,
    n: usize,
) -> Vec<FloatValue<'ctx>> {
    let v = fb.load_weights(dt, p, n as u32, (n * dt.size()) as u32);
    fb.unpack(v)
}

/// Work item `item` of a linear kernel (columns `item · tile.width ..` of `out`), computed by the block.
pub fn columns<'ctx>(
    fb: &Fb<'_, 'ctx>,
    mm: MatMul<IntValue<'ctx>>,
    x: PointerValue<'ctx>,
    w: &[PointerValue<'ctx>],
    out: PointerValue<'ctx>,
    n: usize,
    item: IntValue<'ctx>,
) {
    let MatMul {
        k,
        dt,
        rows,
        first_row,
        tile,
    } = mm;
    let tid = thread_index(fb);
    let warp = fb.udiv_c(tid, WARP);
    let lane = fb.urem_c(tid, WARP);
    // Elements per lane and step: the widest run that tiles k exactly (and whole runs are aligned).
    let v = [8, 4, 2, 1]
        .into_iter()
        .find(|v| k.is_multiple_of(WARP * v))
        .unwrap_or(1);
    let chunk = WARP * v;
    let steps = k / chunk;
    let done = steps * chunk;
    let (x_stride, w_stride) = (k * 4, k * dt.size());
    let x = fb.addr(x, first_row, x_stride);
    let o0 = fb.addr(out, first_row, n * 4);
    let col0 = fb.mul_c(item, tile.width);
    let lane_x = fb.mul_c(lane, v * 4);
    let lane_w = fb.mul_c(lane, v * dt.size());
    let ItemShare::Product(shape) = fb.share else {
        unreachable!("a product's columns outside a product block (a q3c bug)")
    };
    let warps = shape.threads / WARP;
    // With bf16 activations (the shapes tensor cores take), the activations are rounded as there.
    let bf16 = crate::gpu_mma::takes(fb.flavor, &mm);
    let load_x = |fb: &Fb<'_, 'ctx>, p: PointerValue<'ctx>, n: usize| {
        let xs = load_run(fb, DType::F32, p, n);
        match bf16 {
            true => crate::gpu_mma::round_bf16(fb, &xs),
            false => xs,
        }
    };
    // A warp takes its columns of the panel together where they divide evenly (every warp `width /
    // warps` of them), so each lane has a load of every column's (and matrix's) run in flight at once:
    // one column at a time left the single-matrix products at 1.8-2.1 TB/s on an H200, two 2.3-2.8.
    let together = if tile.width.is_multiple_of(warps) {
        tile.width / warps
    } else {
        1
    };
    fb.for_range(warp, fb.i64c(tile.width / together), warps, |fb, c| {
        let cols: Vec<_> = (0..together)
            .map(|i| fb.add(col0, fb.add_c(c, i * tile.width / together)))
            .collect();
        // The weight rows, column by column, matrix by matrix.
        let wrows: Vec<Vec<_>> = cols
            .iter()
            .map(|&col| w.iter().map(|&m| fb.addr(m, col, w_stride)).collect())
            .collect();
        let block = |fb: &Fb<'_, 'ctx>, r: IntValue<'ctx>, nrows: usize| {
            let xr: Vec<_> = (0..nrows)
                .map(|i| fb.off(fb.addr(x, r, x_stride), i * x_stride))
                .collect();
            let zero = fb.f32c(0.0);
            // accs[column][row][matrix]
            let accs: Vec<Vec<Vec<_>>> = cols
                .iter()
                .map(|_| {
                    (0..nrows)
                        .map(|_| w.iter().map(|_| fb.var(zero)).collect())
                        .collect()
                })
                .collect();
            let step = |fb: &Fb<'_, 'ctx>, j: IntValue<'ctx>| {
                let w_at = fb.add(fb.mul_c(j, chunk * dt.size()), lane_w);
                let ws: Vec<Vec<_>> = wrows
                    .iter()
                    .map(|ms| {
                        ms.iter()
                            .map(|&m| load_run(fb, dt, ptr_at(fb, m, w_at), v))
                            .collect()
                    })
                    .collect();
                let x_at = fb.add(fb.mul_c(j, chunk * 4), lane_x);
                for (ri, &xrow) in xr.iter().enumerate() {
                    let xs = load_x(fb, ptr_at(fb, xrow, x_at), v);
                    for (ci, wc) in ws.iter().enumerate() {
                        for (mi, wv) in wc.iter().enumerate() {
                            let mut a = fb.getf(accs[ci][ri][mi]);
                            for e in 0..v {
                                a = fb.fma(xs[e], wv[e], a).into_float_value();
                            }
                            fb.set(accs[ci][ri][mi], a);
                        }
                    }
                }
            };
            // `unroll` steps per iteration, so their loads are all in flight before the first sum
            // needs one (a warp's one or two weight streams left the loads of one step alone in flight).
            let unroll = (shape.streams / (cols.len() * w.len())).max(1);
            fb.for_n(steps / unroll, |fb, jj| {
                for u in 0..unroll {
                    step(fb, fb.add_c(fb.mul_c(jj, unroll), u));
                }
            });
            for j in steps / unroll * unroll..steps {
                step(fb, fb.i64c(j));
            }
            // Elements past the whole runs, one per lane.
            if done < k {
                fb.for_range(fb.add_c(lane, done), fb.i64c(k), WARP, |fb, i| {
                    for (ri, &xrow) in xr.iter().enumerate() {
                        let xi = load_x(fb, ptr_at(fb, xrow, fb.mul_c(i, 4)), 1)[0];
                        for (ci, wc) in wrows.iter().enumerate() {
                            for (mi, &m) in wc.iter().enumerate() {
                                let wi = fb.load_weight(dt, ptr_at(fb, m, fb.mul_c(i, dt.size())));
                                let a = fb.getf(accs[ci][ri][mi]);
                                fb.set(accs[ci][ri][mi], fb.fma(xi, wi, a));
                            }
                        }
                    }
                });
            }
            for (ci, &col) in cols.iter().enumerate() {
                let parts: Vec<Vec<FloatValue>> = (0..w.len())
                    .map(|mi| {
                        (0..nrows)
                            .map(|ri| warp_sum(fb, fb.getf(accs[ci][ri][mi])))
                            .collect()
                    })
                    .collect();
                let first = fb.icmp(IntPredicate::EQ, lane, fb.i64c(0));
                fb.when(first, |fb| {
                    let o = fb.addr(fb.addr(o0, r, n * 4), col, 4);
                    for (ri, s) in epilogue(fb, &parts).into_iter().enumerate() {
                        fb.store(s, fb.off(o, ri * n * 4));
                    }
                });
            }
        };
        let full = fb.mul_c(fb.udiv_c(rows, shape.rows), shape.rows);
        fb.for_range(fb.i64c(0), full, shape.rows, |fb, r| {
            block(fb, r, shape.rows)
        });
        fb.for_range(full, rows, 1, |fb, r| block(fb, r, 1));
    });
}

/// `base + bytes` for a byte count computed at run time.
fn ptr_at<'ctx>(
    fb: &Fb<'_, 'ctx>,
    base: PointerValue<'ctx>,
    bytes: IntValue<'ctx>,
) -> PointerValue<'ctx> {
    fb.addr(base, bytes, 1)
}

/// The sum of `x` over the threads of a row kernel's item, in every thread: a warp's through shuffles;
/// a block's through each warp's sum in shared memory, between two barriers (the first keeps a previous
/// sum's readers ahead of the writes).
pub fn item_sum<'ctx>(fb: &Fb<'_, 'ctx>, x: FloatValue<'ctx>) -> FloatValue<'ctx> {
    let s = warp_sum(fb, x);
    let warps = match fb.share {
        ItemShare::Rows(n) => n / WARP,
        _ => 1,
    };
    if warps <= 1 {
        return s;
    }
    assert!(warps <= MAX_WARPS, "a block sum over {warps} warps");
    let shared = shared_sums(fb);
    let tid = thread_index(fb);
    let (warp, lane) = (fb.udiv_c(tid, WARP), fb.urem_c(tid, WARP));
    barrier(fb);
    let first = fb.icmp(IntPredicate::EQ, lane, fb.i64c(0));
    fb.when(first, |fb| {
        let at = shared_at(fb, shared, warp);
        fb.b.build_store(at, s).expect(BUG);
    });
    barrier(fb);
    let mut total = fb.f32c(0.0);
    for w in 0..warps {
        let at = shared_at(fb, shared, fb.i64c(w));
        let v =
            fb.b.build_load(fb.f32t(), at, "")
                .expect(BUG)
                .into_float_value();
        total = fb.fadd(total, v);
    }
    total
}

/// Warps of a block at most ([`BLOCK_THREADS`] threads).
const MAX_WARPS: usize = BLOCK_THREADS / WARP;

/// The module's shared-memory array of one f32 per warp (address space 3).
fn shared_sums<'ctx>(fb: &Fb<'_, 'ctx>) -> PointerValue<'ctx> {
    shared_array(fb, "q3c_warp_sums", MAX_WARPS, 4)
}

/// The module's shared-memory (address space 3) array `name` of `len` f32 aligned to `align` bytes,
/// declared on first use.
pub fn shared_array<'ctx>(
    fb: &Fb<'_, 'ctx>,
    name: &str,
    len: usize,
    align: u32,
) -> PointerValue<'ctx> {
    let g = fb.m.get_global(name).unwrap_or_else(|| {
        let ty = fb.f32t().array_type(len as u32);
        let g =
            fb.m.add_global(ty, Some(inkwell::AddressSpace::from(3u16)), name);
        g.set_linkage(inkwell::module::Linkage::Internal);
        g.set_initializer(&ty.get_undef());
        g.set_alignment(align);
        g
    });
    g.as_pointer_value()
}

/// Element `i` of a shared array from [`shared_array`] (the caller keeps `i` within its length).
pub fn shared_at<'ctx>(
    fb: &Fb<'_, 'ctx>,
    shared: PointerValue<'ctx>,
    i: IntValue<'ctx>,
) -> PointerValue<'ctx> {
    // SAFETY (of the IR): the callers' indices are below the array's length.
    unsafe {
        fb.b.build_in_bounds_gep(fb.f32t(), shared, &[i], "")
            .expect(BUG)
    }
}

/// `bar.sync 0`: every thread of the block waits for the others.
pub fn barrier(fb: &Fb<'_, '_>) {
    let name = "llvm.nvvm.barrier0";
    let f = fb.m.get_function(name).unwrap_or_else(|| {
        fb.m.add_function(name, fb.cx.void_type().fn_type(&[], false), None)
    });
    fb.b.build_call(f, &[], "").expect(BUG);
}

/// This thread's index among those splitting a row kernel's loops and their number, where they share
/// it: the block's threads, or inside one of the item's parts ([`crate::gpu_parts`]) the warp's lanes.
/// On the CPU emulation of the GPU flavour, thread 0 of the block takes the item as the only one of them
/// (so the GPU's way of splitting a row runs, and is tested, there at one thread).
pub fn row_lane<'ctx>(fb: &Fb<'_, 'ctx>) -> Option<(IntValue<'ctx>, usize)> {
    match (fb.flavor, fb.share) {
        (Flavor::Gpu { .. }, ItemShare::Rows(n)) => Some((thread_index(fb), n)),
        (Flavor::Gpu { .. }, ItemShare::Part(_)) => Some((fb.urem_c(thread_index(fb), WARP), WARP)),
        (Flavor::GpuOnCpu { .. }, ItemShare::Rows(_) | ItemShare::Part(_)) => Some((fb.i64c(0), 1)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::ProductShape;

    #[test]
    fn product_shapes_parse_from_their_settings_and_refuse_bad_ones() {
        assert_eq!(ProductShape::parse("").unwrap(), ProductShape::DEFAULT);
        let s = ProductShape::parse("threads=128, rows=2,blocks=3,tensor_rows=0,group=2").unwrap();
        assert_eq!(
            (
                s.threads,
                s.streams,
                s.rows,
                s.min_blocks,
                s.tensor_rows,
                s.group
            ),
            (128, ProductShape::DEFAULT.streams, 2, 3, 0, 2)
        );
        for bad in [
            "threads",
            "threads=x",
            "warps=4",
            "threads=100",
            "rows=0",
            "streams=65",
            "group=3",
            "tensor_chunks=5",
        ] {
            let err = ProductShape::parse(bad).unwrap_err();
            assert!(err.starts_with("Q3C_GPU_PRODUCTS: "), "{bad}: {err}");
        }
    }
}
