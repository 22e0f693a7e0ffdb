//! [`KernelBuilder`]: the vocabulary every op body is written in, implemented once per code generator
//! (Cranelift's `Emit`, LLVM's `Fb`).
//!
//! Values are the backend's own handles (Cranelift `Value`s, inkwell's typed values); pointers are byte
//! addresses, integers are 64-bit, floats f32, vectors `lanes()` f32. Control flow is structured: a loop or
//! a conditional is opened and closed by the body that uses it ([`KernelBuilder::for_range`],
//! [`KernelBuilder::when`]), so a body cannot leave a block dangling.
//!
//! Matrix products are entry points rather than loops written here ([`KernelBuilder::dot`],
//! [`KernelBuilder::matmul_columns`]): register tiling, staged bf16/q8 activations and their intrinsics are
//! where the targets differ most, and each backend keeps its own.

use q3c_backend_common::items::LinearTile;
use q3c_ir::DType;

/// The shape of a linear kernel: `rows` activation rows of `k` f32 from row `first_row` on (of the
/// activations and of the output alike), weights of `dt`, cut into `tile`s.
#[derive(Clone, Copy, Debug)]
pub struct MatMul<I> {
    pub k: usize,
    pub dt: DType,
    pub rows: I,
    pub first_row: I,
    pub tile: LinearTile,
}

/// Builds one function's body for one target.
pub trait KernelBuilder: Sized {
    /// A 64-bit integer (indices, sizes, token ids widened).
    type Int: Copy;
    /// The result of a comparison.
    type Bool: Copy;
    /// A byte address.
    type Ptr: Copy;
    /// An f32.
    type F32: Copy;
    /// A vector of [`KernelBuilder::lanes`] f32.
    type Vec: Copy;
    /// A mutable variable (integer, f32 or vector) that the code generator keeps in a register.
    type Var: Copy;
    /// An open loop (see [`KernelBuilder::loop_begin`]).
    type Loop;
    /// An open conditional (see [`KernelBuilder::if_begin`]).
    type If;

    /// f32 lanes of [`KernelBuilder::Vec`].
    fn lanes(&self) -> usize;

    // ---- integers, conditions and addresses

    fn iconst(&mut self, v: usize) -> Self::Int;
    fn add(&mut self, a: Self::Int, b: Self::Int) -> Self::Int;
    /// `a + c`.
    fn add_c(&mut self, a: Self::Int, c: usize) -> Self::Int {
        let c = self.iconst(c);
        self.add(a, c)
    }
    fn sub(&mut self, a: Self::Int, b: Self::Int) -> Self::Int;
    fn mul_c(&mut self, a: Self::Int, c: usize) -> Self::Int;
    fn udiv_c(&mut self, a: Self::Int, c: usize) -> Self::Int;
    fn urem_c(&mut self, a: Self::Int, c: usize) -> Self::Int;
    /// `a / b`, unsigned, `b` not zero.
    fn udiv(&mut self, a: Self::Int, b: Self::Int) -> Self::Int;
    /// `a % b`, unsigned, `b` not zero.
    fn urem(&mut self, a: Self::Int, b: Self::Int) -> Self::Int;
    /// `a < b`, unsigned.
    fn ult(&mut self, a: Self::Int, b: Self::Int) -> Self::Bool;
    fn ieq(&mut self, a: Self::Int, b: Self::Int) -> Self::Bool;
    /// `a > b` (false if either is NaN).
    fn fgt(&mut self, a: Self::F32, b: Self::F32) -> Self::Bool;
    fn and(&mut self, a: Self::Bool, b: Self::Bool) -> Self::Bool;
    fn or(&mut self, a: Self::Bool, b: Self::Bool) -> Self::Bool;
    fn not(&mut self, a: Self::Bool) -> Self::Bool;
    fn false_(&mut self) -> Self::Bool;
    fn select_int(&mut self, c: Self::Bool, a: Self::Int, b: Self::Int) -> Self::Int;
    fn select_f32(&mut self, c: Self::Bool, a: Self::F32, b: Self::F32) -> Self::F32;
    /// An unsigned integer converted to f32.
    fn int_to_f32(&mut self, a: Self::Int) -> Self::F32;
    /// `base + bytes`.
    fn off(&mut self, base: Self::Ptr, bytes: usize) -> Self::Ptr;
    /// `base + index · stride` bytes.
    fn addr(&mut self, base: Self::Ptr, index: Self::Int, stride: usize) -> Self::Ptr;

    // ---- memory

    fn load_i64(&mut self, p: Self::Ptr) -> Self::Int;
    fn load_ptr(&mut self, p: Self::Ptr) -> Self::Ptr;
    /// An i32 (token id, expert id, index) sign-extended to 64 bits.
    fn load_i32(&mut self, p: Self::Ptr) -> Self::Int;
    fn load_f32(&mut self, p: Self::Ptr) -> Self::F32;
    /// One element of `dt` (f32, bf16 or f16; for q8 the signed byte) as f32.
    fn load_weight(&mut self, dt: DType, p: Self::Ptr) -> Self::F32;
    /// `v` stored as one element of `dt` (f32; f16 or bf16 rounded to nearest even; for q8 a signed byte,
    /// rounded to nearest even and held to ±127; a NaN's byte is some value in that range).
    fn store_as(&mut self, dt: DType, v: Self::F32, p: Self::Ptr);
    /// `v` stored as `lanes` elements of `dt` (as [`KernelBuilder::store_as`]).
    fn vstore_as(&mut self, dt: DType, v: Self::Vec, p: Self::Ptr);
    fn store_f32(&mut self, v: Self::F32, p: Self::Ptr);
    /// The low 32 bits of `v`.
    fn store_i32(&mut self, v: Self::Int, p: Self::Ptr);
    fn store_i64(&mut self, v: Self::Int, p: Self::Ptr);
    fn store_ptr(&mut self, v: Self::Ptr, p: Self::Ptr);
    /// `lanes` f32 (any alignment).
    fn vload(&mut self, p: Self::Ptr) -> Self::Vec;
    /// `lanes` elements of `dt` (f32, bf16 or f16; for q8 signed bytes) widened to f32.
    fn vload_weight(&mut self, dt: DType, p: Self::Ptr) -> Self::Vec;
    fn vstore(&mut self, v: Self::Vec, p: Self::Ptr);
    /// A 64-byte aligned buffer of `bytes` on the function's stack.
    fn stack(&mut self, bytes: usize) -> Self::Ptr;

    // ---- variables

    fn var_int(&mut self, init: Self::Int) -> Self::Var;
    fn var_f32(&mut self, init: Self::F32) -> Self::Var;
    fn var_vec(&mut self, init: Self::Vec) -> Self::Var;
    fn get_int(&mut self, v: Self::Var) -> Self::Int;
    fn get_f32(&mut self, v: Self::Var) -> Self::F32;
    fn get_vec(&mut self, v: Self::Var) -> Self::Vec;
    fn set_int(&mut self, v: Self::Var, x: Self::Int);
    fn set_f32(&mut self, v: Self::Var, x: Self::F32);
    fn set_vec(&mut self, v: Self::Var, x: Self::Vec);

    // ---- control flow (structured; use the provided `for_range`, `for_n`, `when`, `ranges`)

    /// Opens `for i in (start..end)`; returns `i`. Close with [`KernelBuilder::loop_end`].
    fn loop_begin(&mut self, start: Self::Int, end: Self::Int) -> (Self::Int, Self::Loop);
    /// Closes a loop: `i += step`, back to the test, and continues after the loop.
    fn loop_end(&mut self, l: Self::Loop, step: usize);
    /// Opens `if cond`. Close with [`KernelBuilder::if_end`].
    fn if_begin(&mut self, cond: Self::Bool) -> Self::If;
    fn if_end(&mut self, b: Self::If);

    /// `for i in (start..end).step_by(step)`, with `body` emitting the loop body.
    fn for_range(
        &mut self,
        start: Self::Int,
        end: Self::Int,
        step: usize,
        mut body: impl FnMut(&mut Self, Self::Int),
    ) {
        let (i, l) = self.loop_begin(start, end);
        body(self, i);
        self.loop_end(l, step);
    }

    /// `for i in 0..n` with a constant bound (nothing for `n = 0`).
    fn for_n(&mut self, n: usize, body: impl FnMut(&mut Self, Self::Int)) {
        if n > 0 {
            let (zero, end) = (self.iconst(0), self.iconst(n));
            self.for_range(zero, end, 1, body);
        }
    }

    /// Runs `then` when `cond` holds.
    fn when(&mut self, cond: Self::Bool, then: impl FnOnce(&mut Self)) {
        let b = self.if_begin(cond);
        then(self);
        self.if_end(b);
    }

    /// Splits `index` over consecutive ranges ending at `ends` (increasing constants): runs `arm(r, local)`
    /// for the range `r` holding `index`, with `local` its position in that range. Beyond the last range
    /// nothing runs.
    fn ranges(
        &mut self,
        index: Self::Int,
        ends: &[usize],
        mut arm: impl FnMut(&mut Self, usize, Self::Int),
    ) {
        let mut begin = 0;
        for (r, &end) in ends.iter().enumerate() {
            let (lo, hi) = (self.iconst(begin), self.iconst(end));
            let below = self.ult(index, lo);
            let at_least = self.not(below);
            let under = self.ult(index, hi);
            let inside = self.and(at_least, under);
            self.when(inside, |b| {
                let local = b.sub(index, lo);
                arm(b, r, local);
            });
            begin = end;
        }
    }

    // ---- f32 arithmetic

    fn fconst(&mut self, v: f32) -> Self::F32;
    fn fadd(&mut self, a: Self::F32, b: Self::F32) -> Self::F32;
    fn fsub(&mut self, a: Self::F32, b: Self::F32) -> Self::F32;
    fn fmul(&mut self, a: Self::F32, b: Self::F32) -> Self::F32;
    fn fdiv(&mut self, a: Self::F32, b: Self::F32) -> Self::F32;
    /// The larger of `a` and `b` (the other one if either is NaN).
    fn fmax(&mut self, a: Self::F32, b: Self::F32) -> Self::F32;
    /// `a · b + c` (fused where the target has FMA).
    fn fma(&mut self, a: Self::F32, b: Self::F32, c: Self::F32) -> Self::F32;
    fn sqrt(&mut self, a: Self::F32) -> Self::F32;
    /// `e^x`, inline (relative error below 5e-7; inputs clamped to [-87.3, 88.3]).
    fn exp(&mut self, x: Self::F32) -> Self::F32;
    /// `(e^a, e^b)`; a target may compute both in one vector.
    fn exp_pair(&mut self, a: Self::F32, b: Self::F32) -> (Self::F32, Self::F32) {
        (self.exp(a), self.exp(b))
    }
    /// `x · sigmoid(x)`.
    fn silu(&mut self, x: Self::F32) -> Self::F32;
    /// `(cos x, sin x)`, correctly reduced for large angles (RoPE positions reach 10⁵ radians and more).
    fn cos_sin(&mut self, x: Self::F32) -> (Self::F32, Self::F32);

    // ---- vectors

    fn vsplat(&mut self, v: Self::F32) -> Self::Vec;
    fn vadd(&mut self, a: Self::Vec, b: Self::Vec) -> Self::Vec;
    fn vmul(&mut self, a: Self::Vec, b: Self::Vec) -> Self::Vec;
    fn vdiv(&mut self, a: Self::Vec, b: Self::Vec) -> Self::Vec;
    /// `a · b + c` per lane.
    fn vfma(&mut self, a: Self::Vec, b: Self::Vec, c: Self::Vec) -> Self::Vec;
    /// `silu` per lane.
    fn vsilu(&mut self, x: Self::Vec) -> Self::Vec;
    fn vsub(&mut self, a: Self::Vec, b: Self::Vec) -> Self::Vec;
    /// `e^x` per lane (as [`KernelBuilder::exp`]).
    fn vexp(&mut self, x: Self::Vec) -> Self::Vec;
    /// The sum of the lanes.
    fn hsum(&mut self, v: Self::Vec) -> Self::F32;
    /// The largest lane.
    fn hmax(&mut self, v: Self::Vec) -> Self::F32;

    // ---- matrix products (each backend tiles them its own way)

    /// Where several threads take one work item (a GPU warp or block for row kernels): this thread's index
    /// among them and their number. Loops over a row's elements ([`crate::ops`]' `map_row`, and the dot
    /// products written on it) then take every `threads`-th vector from the thread's index on (the scalar
    /// tail in thread 0), and partial sums meet through [`KernelBuilder::share_sum`]. `None`: this thread
    /// takes the item alone (and [`KernelBuilder::dot`] is the whole dot product).
    fn item_lane(&mut self) -> Option<(Self::Int, usize)> {
        None
    }
    /// The sum of `x` over the threads of the item (see [`KernelBuilder::item_lane`]), in every thread.
    fn share_sum(&mut self, x: Self::F32) -> Self::F32 {
        x
    }
    /// Emits `f` as code this thread runs alone: inside it, [`KernelBuilder::item_lane`] is `None` (for a
    /// kernel that splits its item's work by some other index, e.g. heads, across the threads).
    fn alone<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        f(self)
    }

    /// Where the threads sharing an item form several parts (the warps of a GPU block), runs `f` with this
    /// thread's part and the number of parts, for a loop the parts split between them (attention's keys,
    /// RoPE's heads); inside `f`, [`KernelBuilder::item_lane`] and [`KernelBuilder::share_sum`] are the
    /// part's own, and [`KernelBuilder::parts_max`] / [`KernelBuilder::parts_sum`] meet the parts. `None`
    /// (one part): `f` runs as the code around it.
    fn item_parts<R>(&mut self, f: impl FnOnce(&mut Self, Option<(Self::Int, usize)>) -> R) -> R {
        f(self, None)
    }
    /// Inside [`KernelBuilder::item_parts`]: the largest of the parts' `x` (each part giving its thread's
    /// at this thread's lane), in every thread. Every thread of the item must reach it.
    fn parts_max(&mut self, x: Self::F32) -> Self::F32 {
        x
    }
    /// Inside [`KernelBuilder::item_parts`]: the sum of the parts' `x`, as [`KernelBuilder::parts_max`].
    fn parts_sum(&mut self, x: Self::F32) -> Self::F32 {
        x
    }
    /// [`KernelBuilder::parts_sum`] lane by lane.
    fn parts_sum_vec(&mut self, x: Self::Vec) -> Self::Vec {
        x
    }

    /// `Σ_i x[i] · w[i]` over `k` elements: f32 activations at `x`, weights of `dt` at `w`.
    fn dot(&mut self, x: Self::Ptr, w: Self::Ptr, dt: DType, k: usize) -> Self::F32;

    /// Work item `item` of a linear kernel's output: columns `item · tile.width ..` of `out` (`[rows, n]`)
    /// from the matrices `w` (`[n, k]` each; one, or gate and up combined as `silu(gate) · up`) times the
    /// rows at `x` (rows `mm.first_row ..` of `x` and of `out`).
    fn matmul_columns(
        &mut self,
        mm: MatMul<Self::Int>,
        x: Self::Ptr,
        w: &[Self::Ptr],
        out: Self::Ptr,
        n: usize,
        item: Self::Int,
    );
}

/// What a target needs beyond kernel bodies to build `q3c_forward` (see [`crate::forward`]).
pub trait EntryBuilder: KernelBuilder {
    /// A kernel the entry point dispatches.
    type Func: Copy;
    /// Returns `code` from the function if `cond` holds; code after it runs otherwise.
    fn return_if(&mut self, cond: Self::Bool, code: i32);
    /// Returns `code` (the last instruction of the function).
    fn return_(&mut self, code: i32);
    /// Calls the runtime's `parallel_for(pool, kernel, args, n)` through the function pointer at `pf`.
    fn parallel_for(
        &mut self,
        pf: Self::Ptr,
        pool: Self::Ptr,
        kernel: Self::Func,
        args: Self::Ptr,
        n: Self::Int,
    );
    /// Calls the runtime's `collective(ctx, op, args, n)` through the function pointer at `f`.
    fn collective(&mut self, f: Self::Ptr, ctx: Self::Ptr, op: u64, args: Self::Ptr, n: Self::Int);
}
