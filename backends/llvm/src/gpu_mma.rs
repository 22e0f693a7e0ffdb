//! Matrix products over bf16 weights on tensor cores (sm_80 and later), where the GPU flavour rounds the
//! activations to bf16 (`Flavor::Gpu { bf16_dot: true }`): PTX `mma.sync.aligned.m16n8k16.row.col.f32
//! .bf16.bf16.f32`, with which a warp multiplies a 16 × 16 tile of activations (rows × k) by a 16 × 8 tile of
//! weights (k × columns) into 16 × 8 f32 accumulators.
//!
//! These tiles are a kernel of their own (`ItemShare::Tensor`), which the launch plan names beside the
//! product's kernel for calls of at least [`ProductShape::tensor_rows`] rows (`q3c_abi::launch::ManyRows`):
//! in one kernel with the decode path, its 108–154 registers a thread (the Qwen3-8B shape) would have
//! halved the occupancy of decoding's FMA blocks (56–80). Those blocks ([`crate::gpu_gemm`]) round the
//! activations the same way ([`round_bf16`]), so a call's result does not depend on which kernel took it
//! beyond the order and the rounding of the f32 sums (tensor cores align and truncate their addends their
//! own way).
//!
//! The plan's work items stay panels of 16 columns, a block each. Where a matrix has a multiple of `G`
//! panels (G up to [`ProductShape::group`], 4), the G blocks of G consecutive panels share those 16·G
//! columns and split the call's rows: a unit of work is a 16-row slab times a warp tile of 32 columns (16 of
//! each of SwiGLU's gate and up), and the group's `8·G` warps take the units in turn, each over the whole of
//! `k` in registers. So a block reads an activation row once for 32 columns instead of once per panel, and
//! the G blocks of a group read its weights from L2 after the first.
//!
//! Fragments (PTX ISA, "matrix fragments for mma.m16n8k16 with floating point type"): lane `l` is in group
//! `g = l / 4` at `t = l % 4`; its four A registers hold (row g, κ 2t..2t+1), (g + 8, 2t..), (g, 2t + 8..),
//! (g + 8, 2t + 8..), its two B registers (κ 2t..2t+1, column g), (2t + 8.., g), its four accumulators (g,
//! 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1); a register's lower half holds the lower κ. Only the
//! lanes at one `t` hold the κ's {2t, 2t + 1, 2t + 8, 2t + 9}, in A and B alike, so which k positions a
//! step's κ's stand for is free, as long as A and B agree and the lane loaded them itself. A chunk of 64
//! positions is loaded as two runs per row and column, lane `t` taking `8t ..` and `32 + 8t ..` (16-byte
//! loads of bf16 weights, 32 bytes of f32 activations per row, each warp load contiguous), and the chunk's
//! step `s` takes pair `s` of each run; a chunk of 16 (the end of `k` where 64 does not divide it) is the
//! plain layout, runs of one pair at `2t` and `8 + 2t`.
//!
//! On the CPU emulation of the GPU flavour one thread plays the block, for every row count: for each slab
//! and chunk every lane loads its fragments with the same index arithmetic into a table, the tables are
//! multiplied as the PTX ISA defines `mma` (each element found in the lane and register that hold it), and
//! every lane stores its accumulators as on the GPU. So the layout a GPU reads is checked against the
//! reference without one.

use inkwell::attributes::{Attribute, AttributeLoc};
use inkwell::types::{BasicMetadataTypeEnum, FunctionType};
use inkwell::values::{
    BasicMetadataValueEnum, BasicValueEnum, FloatValue, IntValue, PointerValue, ValueKind,
};
use inkwell::IntPredicate;
use q3c_backend_common::items;
use q3c_backend_common::plan::Plan;
use q3c_ir::{DType, Graph, NodeId, Op};
use q3c_kernels::MatMul;

use crate::fb::{Fb, Flavor, ItemShare, Var, BUG};
use crate::gemm::epilogue;
use crate::gpu_gemm::{thread_index, ProductShape, WARP};

/// Rows of an `mma` tile (a slab of activation rows).
const SLAB: usize = 16;
/// k positions of one `mma`.
const STEP: usize = 16;
/// Columns of an `mma` tile.
const TILE: usize = 8;
/// Columns of a panel (a work item).
const PANEL: usize = 16;
/// k positions a lane's loads cover at once where `k` allows (two runs of 8 per row and column).
const CHUNK: usize = 64;

/// Whether a product of `mm`'s shape runs on tensor cores in `flavor` (in its calls of many rows; the
/// FMA blocks of the others round the activations the same way): bf16 activations, and a shape
/// [`fits`].
pub fn takes<I>(flavor: Flavor, mm: &MatMul<I>) -> bool {
    matches!(flavor, Flavor::Gpu { .. } | Flavor::GpuOnCpu { .. })
        && flavor.bf16_dot()
        && fits(mm.dt, mm.k, mm.tile.width)
}

/// Whether node `id` is a matrix product tensor cores take where the activations are bf16 ([`takes`]),
/// and then its activation rows per token.
pub fn takes_node(graph: &Graph, plan: &Plan, id: NodeId) -> Option<usize> {
    if !matches!(
        graph.node(id).op,
        Op::Linear | Op::SwiGlu | Op::LinearGroup { .. }
    ) {
        return None;
    }
    let x = items::dims(graph, graph.inputs(id)[0]);
    let k = *x.last().expect("rank");
    let (_, tile) = items::linear_outputs(graph, id);
    let dt = items::in_dtype(plan, graph, id, 1);
    fits(dt, k, tile.width).then(|| x[1..x.len() - 1].iter().product())
}

/// The one rule of which products tensor cores take: bf16 weights, panels of 16, `k` a multiple of 16.
fn fits(dt: DType, k: usize, width: usize) -> bool {
    dt == DType::BF16 && width == PANEL && k.is_multiple_of(STEP)
}

/// `mma` tiles of 8 columns a warp's tile spans over all the product's matrices: 32 columns of one
/// matrix, or 16 of each of SwiGLU's two (4 `mma` per 16 k positions; 8 took ~170 registers a thread).
const WARP_TILES: usize = 4;

/// The geometry of one product's tiles.
#[derive(Clone, Copy)]
struct Tiles {
    k: usize,
    /// Output columns of this matrix (the row stride of the output).
    n: usize,
    /// Panels of a group: the blocks of that many consecutive panels share their columns.
    group: usize,
    /// Panels of a warp's tile (of each matrix).
    panels: usize,
    /// Weight matrices (1, or SwiGLU's gate and up).
    matrices: usize,
    /// Warps of a block.
    warps: usize,
    /// Chunks of 64 k positions a GPU loop iteration loads before multiplying them.
    unroll: usize,
}

impl Tiles {
    fn new(shape: ProductShape, k: usize, n: usize, matrices: usize) -> Tiles {
        let panels = n / PANEL;
        let divides = |most: usize| {
            [8, 4, 2, 1]
                .into_iter()
                .find(|&g| g <= most && panels.is_multiple_of(g))
                .expect("1 divides the panels")
        };
        let warp_panels = divides((WARP_TILES * TILE / PANEL / matrices).max(1));
        Tiles {
            k,
            n,
            group: divides(shape.group).max(warp_panels),
            panels: warp_panels,
            matrices,
            warps: shape.threads / WARP,
            unroll: shape.tensor_chunks,
        }
    }
    /// `mma` tiles of 8 columns per matrix across a warp's tile.
    fn tiles(self) -> usize {
        self.panels * PANEL / TILE
    }
    /// Warp tiles across a group's columns.
    fn parts(self) -> usize {
        self.group / self.panels
    }
}

/// `body(chunks)` over `k` in turns, each a list of (first k position, width) chunks: `tiles.unroll` chunks
/// of 64 per turn of a loop while they fill whole turns, then the other chunks of 64 one per turn, then
/// those of 16 (where 64 does not divide `k`).
fn for_chunks<'ctx>(
    fb: &Fb<'_, 'ctx>,
    tiles: Tiles,
    mut body: impl FnMut(&Fb<'_, 'ctx>, &[(IntValue<'ctx>, usize)]),
) {
    let whole = tiles.k / CHUNK;
    let unroll = tiles.unroll.clamp(1, whole.max(1));
    fb.for_n(whole / unroll, |fb, i| {
        let first = fb.mul_c(i, unroll * CHUNK);
        let chunks: Vec<_> = (0..unroll)
            .map(|u| (fb.add_c(first, u * CHUNK), CHUNK))
            .collect();
        body(fb, &chunks);
    });
    for i in whole / unroll * unroll..whole {
        body(fb, &[(fb.i64c(i * CHUNK), CHUNK)]);
    }
    for k0 in (whole * CHUNK..tiles.k).step_by(STEP) {
        body(fb, &[(fb.i64c(k0), STEP)]);
    }
}

/// Where one warp's tile reads and writes.
struct Operands<'ctx> {
    /// Activation row 0 (row stride `k · 4`).
    x: PointerValue<'ctx>,
    /// The call's activation rows.
    rows: IntValue<'ctx>,
    /// Each matrix's first weight row of the warp tile's columns (row stride `k · 2`).
    w: Vec<PointerValue<'ctx>>,
    /// The output's first column of the warp tile, at row 0 (row stride `n · 4`).
    out: PointerValue<'ctx>,
}

impl<'ctx> Operands<'ctx> {
    /// The operands of the warp tile `cols` columns further right.
    fn right(&self, fb: &Fb<'_, 'ctx>, tiles: Tiles, cols: IntValue<'ctx>) -> Operands<'ctx> {
        Operands {
            x: self.x,
            rows: self.rows,
            w: self
                .w
                .iter()
                .map(|&m| fb.addr(m, cols, tiles.k * 2))
                .collect(),
            out: fb.addr(self.out, cols, 4),
        }
    }
}

/// A lane's fragments of one chunk of width `c` (pairs of bf16 in i32): `a[run][row half][pair]`,
/// `b[matrix][tile][run][pair]`.
struct Fragments<'ctx> {
    a: Vec<Vec<Vec<IntValue<'ctx>>>>,
    b: Vec<Vec<Vec<Vec<IntValue<'ctx>>>>>,
}

impl<'ctx> Fragments<'ctx> {
    /// The A registers of step `s`, in `mma`'s order: (row g, κ 2t..), (g + 8, 2t..), (g, 2t + 8..),
    /// (g + 8, 2t + 8..) — κ 2t.. from the first run, 2t + 8.. from the second.
    fn a(&self, s: usize) -> [IntValue<'ctx>; 4] {
        [
            self.a[0][0][s],
            self.a[0][1][s],
            self.a[1][0][s],
            self.a[1][1][s],
        ]
    }
    /// The B registers of step `s` for `tile` of matrix `m`: (κ 2t.., column g), (2t + 8.., g).
    fn b(&self, s: usize, m: usize, tile: usize) -> [IntValue<'ctx>; 2] {
        [self.b[m][tile][0][s], self.b[m][tile][1][s]]
    }
}

/// Work item `item` (panel `item` of the matrices `w`) of a product that [`takes`] tensor cores.
pub fn columns<'ctx>(
    fb: &Fb<'_, 'ctx>,
    mm: MatMul<IntValue<'ctx>>,
    x: PointerValue<'ctx>,
    w: &[PointerValue<'ctx>],
    out: PointerValue<'ctx>,
    n: usize,
    item: IntValue<'ctx>,
) {
    let (ItemShare::Product(shape) | ItemShare::Tensor(shape)) = fb.share else {
        unreachable!("tensor-core tiles outside a product block (a q3c bug)")
    };
    let MatMul {
        k, rows, first_row, ..
    } = mm;
    let tiles = Tiles::new(shape, k, n, w.len());
    let (group, part) = (fb.udiv_c(item, tiles.group), fb.urem_c(item, tiles.group));
    let col0 = fb.mul_c(group, tiles.group * PANEL);
    let ops = Operands {
        x: fb.addr(x, first_row, k * 4),
        rows,
        w: w.iter().map(|&m| fb.addr(m, col0, k * 2)).collect(),
        out: fb.addr(fb.addr(out, first_row, n * 4), col0, 4),
    };
    match (fb.flavor, fb.share) {
        (Flavor::Gpu { .. }, ItemShare::Tensor(_)) => {
            let tid = thread_index(fb);
            let (warp, lane) = (fb.udiv_c(tid, WARP), fb.urem_c(tid, WARP));
            for_units(fb, tiles, part, warp, rows, |fb, slab, cols| {
                gpu_slab(fb, tiles, &ops.right(fb, tiles, cols), slab, lane)
            });
        }
        // The kernel of calls of fewer rows.
        (Flavor::Gpu { .. }, _) => crate::gpu_gemm::columns(fb, mm, x, w, out, n, item),
        _ => fb.for_n(tiles.warps, |fb, warp| {
            for_units(fb, tiles, part, warp, rows, |fb, slab, cols| {
                emulated_slab(fb, tiles, &ops.right(fb, tiles, cols), slab)
            })
        }),
    }
}

/// `body(slab, columns)` for the units of work warp `warp` of the block at `part` of its group takes: a
/// unit is a 16-row slab times a warp tile of the group's columns (`columns` from the group's first), unit
/// `u` slab `u / parts`, tile `u % parts`; the group's `G · warps` warps take units `part + G · warp`, then
/// every `G · warps`-th (so few units spread over the group's blocks, on as many SMs).
fn for_units<'ctx>(
    fb: &Fb<'_, 'ctx>,
    tiles: Tiles,
    part: IntValue<'ctx>,
    warp: IntValue<'ctx>,
    rows: IntValue<'ctx>,
    mut body: impl FnMut(&Fb<'_, 'ctx>, IntValue<'ctx>, IntValue<'ctx>),
) {
    let first = fb.add(part, fb.mul_c(warp, tiles.group));
    let slabs = fb.udiv_c(fb.add_c(rows, SLAB - 1), SLAB);
    let units = fb.mul_c(slabs, tiles.parts());
    fb.for_range(first, units, tiles.group * tiles.warps, |fb, u| {
        let (slab, tile) = (fb.udiv_c(u, tiles.parts()), fb.urem_c(u, tiles.parts()));
        body(fb, slab, fb.mul_c(tile, tiles.panels * PANEL))
    });
}

/// One warp's slab on the GPU: accumulators in registers, `mma.sync` per step, tile and matrix.
fn gpu_slab<'ctx>(
    fb: &Fb<'_, 'ctx>,
    tiles: Tiles,
    ops: &Operands<'ctx>,
    slab: IntValue<'ctx>,
    lane: IntValue<'ctx>,
) {
    let zero = fb.f32c(0.0);
    // accs[matrix][tile][accumulator]
    let accs: Vec<Vec<Vec<Var>>> = (0..tiles.matrices)
        .map(|_| {
            (0..tiles.tiles())
                .map(|_| (0..4).map(|_| fb.var(zero)).collect())
                .collect()
        })
        .collect();
    let multiply = |fb: &Fb<'_, 'ctx>, f: &Fragments<'ctx>, c: usize| {
        for s in 0..c / STEP {
            for (m, per_tile) in accs.iter().enumerate() {
                for (tile, acc) in per_tile.iter().enumerate() {
                    let c: Vec<FloatValue> = acc.iter().map(|&v| fb.getf(v)).collect();
                    for (v, d) in acc.iter().zip(mma(fb, f.a(s), f.b(s, m, tile), &c)) {
                        fb.set(*v, d);
                    }
                }
            }
        }
    };
    let load = |fb: &Fb<'_, 'ctx>, k0: IntValue<'ctx>, c: usize| {
        fragments(fb, tiles, ops, slab, lane, k0, c)
    };
    // Every load of a turn's chunks issued before the first `mma`, so a warp has several chunks' loads in
    // flight.
    for_chunks(fb, tiles, |fb, chunks| {
        let frags: Vec<_> = chunks.iter().map(|&(k0, c)| load(fb, k0, c)).collect();
        for (f, &(_, c)) in frags.iter().zip(chunks) {
            multiply(fb, f, c);
        }
    });
    let values: Vec<Vec<Vec<FloatValue>>> = accs
        .iter()
        .map(|per_tile| {
            per_tile
                .iter()
                .map(|acc| acc.iter().map(|&v| fb.getf(v)).collect())
                .collect()
        })
        .collect();
    store_lane(fb, tiles, ops, slab, lane, &values);
}

/// `D = A · B + C` of one `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32` (this lane's registers).
fn mma<'ctx>(
    fb: &Fb<'_, 'ctx>,
    a: [IntValue<'ctx>; 4],
    b: [IntValue<'ctx>; 2],
    c: &[FloatValue<'ctx>],
) -> Vec<FloatValue<'ctx>> {
    let (i32t, f32t) = (fb.cx.i32_type(), fb.f32t());
    let out = fb
        .cx
        .struct_type(&[f32t.into(), f32t.into(), f32t.into(), f32t.into()], false);
    let mut params: Vec<BasicMetadataTypeEnum> = vec![i32t.into(); 6];
    params.extend([BasicMetadataTypeEnum::from(f32t); 4]);
    let mut args: Vec<BasicMetadataValueEnum> = a.iter().chain(&b).map(|&v| v.into()).collect();
    args.extend(c.iter().map(|&v| BasicMetadataValueEnum::from(v)));
    let d = asm(
        fb,
        true,
        out.fn_type(&params, false),
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$0, $1, $2, $3}, {$4, $5, $6, $7}, \
         {$8, $9}, {$10, $11, $12, $13};",
        "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f",
        &args,
    )
    .into_struct_value();
    (0..4)
        .map(|i| {
            fb.b.build_extract_value(d, i, "")
                .expect(BUG)
                .into_float_value()
        })
        .collect()
}

/// The result of PTX `text` (inline assembly of type `ty`, operands as `constraints` says) on `args`;
/// `convergent` for a warp-wide instruction, which LLVM must then not move into code only some lanes run
/// (as clang marks every inline assembly in CUDA).
fn asm<'ctx>(
    fb: &Fb<'_, 'ctx>,
    convergent: bool,
    ty: FunctionType<'ctx>,
    text: &str,
    constraints: &str,
    args: &[BasicMetadataValueEnum<'ctx>],
) -> BasicValueEnum<'ctx> {
    let f = fb.cx.create_inline_asm(
        ty,
        text.into(),
        constraints.into(),
        false,
        false,
        None,
        false,
    );
    let call = fb.b.build_indirect_call(ty, f, args, "").expect(BUG);
    if convergent {
        let kind = Attribute::get_named_enum_kind_id("convergent");
        call.add_attribute(AttributeLoc::Function, fb.cx.create_enum_attribute(kind, 0));
    }
    match call.try_as_basic_value() {
        ValueKind::Basic(v) => v,
        ValueKind::Instruction(_) => unreachable!("inline assembly with a result returned none"),
    }
}

/// Lane `lane`'s fragments of the chunk of width `c` at `k0` for slab `slab` (see the module's notes).
fn fragments<'ctx>(
    fb: &Fb<'_, 'ctx>,
    tiles: Tiles,
    ops: &Operands<'ctx>,
    slab: IntValue<'ctx>,
    lane: IntValue<'ctx>,
    k0: IntValue<'ctx>,
    c: usize,
) -> Fragments<'ctx> {
    let (g, t) = (fb.udiv_c(lane, 4), fb.urem_c(lane, 4));
    let pairs = c / STEP;
    // Run `run` of this lane starts at k0 + run·c/2 + t·2·pairs.
    let run_at = |run: usize| fb.add(fb.add_c(k0, run * c / 2), fb.mul_c(t, 2 * pairs));
    let last = fb.b.build_int_sub(ops.rows, fb.i64c(1), "").expect(BUG);
    let a = (0..2)
        .map(|run| {
            (0..2)
                .map(|half| {
                    // Rows past the call's read its last row (their results are not stored).
                    let row = fb.add(fb.mul_c(slab, SLAB), fb.add_c(g, 8 * half));
                    let past = fb.icmp(IntPredicate::UGT, row, last);
                    let row =
                        fb.b.build_select(past, last, row, "")
                            .expect(BUG)
                            .into_int_value();
                    let at = fb.addr(fb.addr(ops.x, row, tiles.k * 4), run_at(run), 4);
                    let xs = fb.unpack(fb.load_weights(
                        DType::F32,
                        at,
                        2 * pairs as u32,
                        (8 * pairs) as u32,
                    ));
                    xs.chunks(2).map(|p| bf16_pair(fb, p[0], p[1])).collect()
                })
                .collect()
        })
        .collect();
    let i32t = fb.cx.i32_type();
    let b = ops
        .w
        .iter()
        .map(|&m| {
            (0..tiles.tiles())
                .map(|tile| {
                    let col = fb.add_c(g, tile * TILE);
                    let row = fb.addr(m, col, tiles.k * 2);
                    (0..2)
                        .map(|run| {
                            let at = fb.addr(row, run_at(run), 2);
                            let v = fb
                                .load_aligned(i32t.vec_type(pairs as u32), at, (4 * pairs) as u32)
                                .into_vector_value();
                            (0..pairs)
                                .map(|p| {
                                    let i = i32t.const_int(p as u64, false);
                                    fb.b.build_extract_element(v, i, "")
                                        .expect(BUG)
                                        .into_int_value()
                                })
                                .collect()
                        })
                        .collect()
                })
                .collect()
        })
        .collect();
    Fragments { a, b }
}

/// Lane `lane`'s accumulators `values[matrix][tile][i]` of slab `slab` through the epilogue into the
/// output: accumulators 0, 1 at row `g`, 2, 3 at row `g + 8`, columns `tile · 8 + 2t ..`; rows past the
/// call's are not stored.
fn store_lane<'ctx>(
    fb: &Fb<'_, 'ctx>,
    tiles: Tiles,
    ops: &Operands<'ctx>,
    slab: IntValue<'ctx>,
    lane: IntValue<'ctx>,
    values: &[Vec<Vec<FloatValue<'ctx>>>],
) {
    let (g, t) = (fb.udiv_c(lane, 4), fb.urem_c(lane, 4));
    for half in 0..2 {
        let row = fb.add(fb.mul_c(slab, SLAB), fb.add_c(g, 8 * half));
        let inside = fb.icmp(IntPredicate::ULT, row, ops.rows);
        fb.when(inside, |fb| {
            let o = fb.addr(fb.addr(ops.out, row, tiles.n * 4), t, 8);
            for tile in 0..tiles.tiles() {
                let parts: Vec<Vec<FloatValue>> = values
                    .iter()
                    .map(|per_tile| per_tile[tile][2 * half..2 * half + 2].to_vec())
                    .collect();
                let v = epilogue(fb, &parts);
                let pair = fb.pack(&v);
                let at = fb.off(o, tile * TILE * 4);
                let st = fb.b.build_store(at, pair).expect(BUG);
                st.set_alignment(8).expect(BUG);
            }
        });
    }
}

/// One slab on one CPU thread: every lane's fragments into tables, `mma` as the PTX ISA defines it over
/// them, every lane's accumulators stored as on the GPU.
fn emulated_slab<'ctx>(
    fb: &Fb<'_, 'ctx>,
    tiles: Tiles,
    ops: &Operands<'ctx>,
    slab: IntValue<'ctx>,
) {
    let i32t = fb.cx.i32_type();
    let (m_count, t_count) = (tiles.matrices, tiles.tiles());
    // Per lane: accumulators [matrix][tile][4] f32; the registers each `mma` of a chunk gets, A [step][4],
    // B [step][matrix][tile][2] (room for chunks of 64: 4 steps).
    let steps = CHUNK / STEP;
    let acc_len = m_count * t_count * 4;
    let (a_len, b_len) = (steps * 4, steps * m_count * t_count * 2);
    let accs = fb.stack(WARP * acc_len * 4);
    let a_table = fb.stack(WARP * a_len * 4);
    let b_table = fb.stack(WARP * b_len * 4);
    let slot = |table: PointerValue<'ctx>, len: usize, lane: IntValue<'ctx>, i: IntValue<'ctx>| {
        fb.addr(fb.addr(table, lane, len * 4), i, 4)
    };
    let acc_at = |lane, m: usize, tile: IntValue<'ctx>, i: usize| {
        let idx = fb.add_c(fb.mul_c(tile, 4), m * t_count * 4 + i);
        slot(accs, acc_len, lane, idx)
    };
    fb.for_n(WARP * acc_len, |fb, i| {
        fb.store(fb.f32c(0.0), fb.addr(accs, i, 4))
    });
    let chunk = |fb: &Fb<'_, 'ctx>, k0: IntValue<'ctx>, c: usize| {
        let pairs = c / STEP;
        fb.for_n(WARP, |fb, lane| {
            let f = fragments(fb, tiles, ops, slab, lane, k0, c);
            for s in 0..pairs {
                for (r, &v) in f.a(s).iter().enumerate() {
                    fb.store(v, slot(a_table, a_len, lane, fb.i64c(s * 4 + r)));
                }
                for m in 0..m_count {
                    for tile in 0..t_count {
                        for (r, &v) in f.b(s, m, tile).iter().enumerate() {
                            let i = ((s * m_count + m) * t_count + tile) * 2 + r;
                            fb.store(v, slot(b_table, b_len, lane, fb.i64c(i)));
                        }
                    }
                }
            }
        });
        // The element of a pair table (`lane`, register index `i`) at half `e`, as f32.
        let element = |fb: &Fb<'_, 'ctx>, p: PointerValue<'ctx>, e: IntValue<'ctx>| {
            let pair = fb.load_aligned(i32t, p, 4).into_int_value();
            let shift =
                fb.b.build_int_truncate(fb.mul_c(e, 16), i32t, "")
                    .expect(BUG);
            let v = fb.b.build_right_shift(pair, shift, false, "").expect(BUG);
            let v =
                fb.b.build_left_shift(v, i32t.const_int(16, false), "")
                    .expect(BUG);
            fb.b.build_bit_cast(v, fb.f32t(), "")
                .expect(BUG)
                .into_float_value()
        };
        for s in 0..pairs {
            for m in 0..m_count {
                fb.for_n(t_count, |fb, tile| {
                    // D[row][col] += Σ_κ A[row][κ] · B[κ][col], for every lane's four accumulators.
                    fb.for_n(WARP, |fb, lane| {
                        for i in 0..4 {
                            let row = fb.add_c(fb.udiv_c(lane, 4), 8 * (i / 2));
                            let col = fb.add_c(fb.mul_c(fb.urem_c(lane, 4), 2), i % 2);
                            let at = acc_at(lane, m, tile, i);
                            let sum = fb.var(fb.load_f32(at));
                            fb.for_n(STEP, |fb, kappa| {
                                let (k8, pair_half) = (fb.udiv_c(kappa, 8), fb.urem_c(kappa, 2));
                                let within = fb.udiv_c(fb.urem_c(kappa, 8), 2);
                                // A[row][κ]: lane (row % 8)·4 + (κ % 8)/2, register row/8 + 2·(κ/8).
                                let a_lane = fb.add(fb.mul_c(fb.urem_c(row, 8), 4), within);
                                let a_reg = fb.add(fb.udiv_c(row, 8), fb.mul_c(k8, 2));
                                let a_i = fb.add_c(a_reg, s * 4);
                                let av = element(fb, slot(a_table, a_len, a_lane, a_i), pair_half);
                                // B[κ][col]: lane col·4 + (κ % 8)/2, register κ/8.
                                let b_lane = fb.add(fb.mul_c(col, 4), within);
                                let b_tile = fb.add_c(tile, (s * m_count + m) * t_count);
                                let b_i = fb.add(fb.mul_c(b_tile, 2), k8);
                                let bv = element(fb, slot(b_table, b_len, b_lane, b_i), pair_half);
                                let acc = fb.getf(sum);
                                fb.set(sum, fb.fma(av, bv, acc));
                            });
                            fb.store(fb.getf(sum), at);
                        }
                    });
                });
            }
        }
    };
    // The GPU's turns over k, each chunk played in turn.
    for_chunks(fb, tiles, |fb, chunks| {
        for &(k0, c) in chunks {
            chunk(fb, k0, c);
        }
    });
    fb.for_n(WARP, |fb, lane| {
        let values: Vec<Vec<Vec<FloatValue>>> = (0..m_count)
            .map(|m| {
                (0..t_count)
                    .map(|tile| {
                        (0..4)
                            .map(|i| fb.load_f32(acc_at(lane, m, fb.i64c(tile), i)))
                            .collect()
                    })
                    .collect()
            })
            .collect();
        store_lane(fb, tiles, ops, slab, lane, &values);
    });
}

/// Two f32 rounded to bf16 (nearest even) in one i32, `lo` in the lower half: `cvt.rn.bf16x2.f32` on the
/// GPU, the same rounding in integer arithmetic on the CPU.
fn bf16_pair<'ctx>(
    fb: &Fb<'_, 'ctx>,
    lo: FloatValue<'ctx>,
    hi: FloatValue<'ctx>,
) -> IntValue<'ctx> {
    let i32t = fb.cx.i32_type();
    if fb.flavor.is_gpu() {
        let ty = i32t.fn_type(&[fb.f32t().into(), fb.f32t().into()], false);
        // `cvt.rn.bf16x2.f32 d, a, b` puts a in the upper half.
        let args = [hi.into(), lo.into()];
        return asm(
            fb,
            false,
            ty,
            "cvt.rn.bf16x2.f32 $0, $1, $2;",
            "=r,f,f",
            &args,
        )
        .into_int_value();
    }
    let widen = |v| {
        fb.b.build_int_z_extend(fb.bf16_bits(v), i32t, "")
            .expect(BUG)
    };
    let hi =
        fb.b.build_left_shift(widen(hi), i32t.const_int(16, false), "")
            .expect(BUG);
    fb.b.build_or(widen(lo), hi, "").expect(BUG)
}

/// `xs` rounded to bf16 (nearest even) and widened back to f32, pairwise as the tensor-core tiles round
/// them ([`bf16_pair`]).
pub fn round_bf16<'ctx>(fb: &Fb<'_, 'ctx>, xs: &[FloatValue<'ctx>]) -> Vec<FloatValue<'ctx>> {
    let i32t = fb.cx.i32_type();
    let as_f32 = |v: IntValue<'ctx>| {
        fb.b.build_bit_cast(v, fb.f32t(), "")
            .expect(BUG)
            .into_float_value()
    };
    xs.chunks(2)
        .flat_map(|p| {
            let hi = p.get(1).copied().unwrap_or(p[0]);
            let pair = bf16_pair(fb, p[0], hi);
            let lo =
                fb.b.build_left_shift(pair, i32t.const_int(16, false), "")
                    .expect(BUG);
            let high =
                fb.b.build_and(pair, i32t.const_int(0xffff_0000, false), "")
                    .expect(BUG);
            [as_f32(lo), as_f32(high)].into_iter().take(p.len())
        })
        .collect()
}
