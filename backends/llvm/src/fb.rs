//! A small layer over inkwell's builder for writing kernels: byte-addressed pointers, counted loops,
//! stack variables (promoted to registers by LLVM's SROA), f32 vectors of the target's width, bf16 loads,
//! and the math the kernels need (`fma`, inline `exp`, `silu`, horizontal sums).
//!
//! Builder calls only fail when the builder has no insertion point, which this layer never allows; such a
//! failure is a q3c bug and panics with [`BUG`].

use inkwell::basic_block::BasicBlock;
use inkwell::builder::Builder;
use inkwell::context::Context;
use inkwell::intrinsics::Intrinsic;
use inkwell::module::Module;
use inkwell::types::{BasicType, BasicTypeEnum, FloatType, IntType, PointerType, VectorType};
use inkwell::values::{
    BasicMetadataValueEnum, BasicValue, BasicValueEnum, FloatValue, FunctionValue, IntValue,
    PointerValue, VectorValue,
};
use inkwell::{AddressSpace, FloatPredicate, IntPredicate};
use q3c_ir::DType;

/// Message of the panics that can only come from a q3c bug (a builder without an insertion point).
pub const BUG: &str = "LLVM builder without an insertion point (a q3c bug)";

/// What kind of machine the code is for: decides the vector width and how `sin`/`cos` are computed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Flavor {
    /// A CPU with f32 vectors of `lanes` (16 with AVX-512, 8 with AVX2, else 4); `bf16_dot`: products
    /// over bf16 weights round the activations to bf16 and use AVX512_BF16 dot products; `tuning`: the
    /// choices measured to differ between CPUs of the same features.
    Cpu {
        lanes: u32,
        bf16_dot: bool,
        tuning: CpuTuning,
    },
    /// An NVIDIA GPU through NVPTX; `bf16_dot`: products over bf16 weights round the activations to bf16
    /// and run on tensor cores where the call has enough rows ([`crate::gpu_mma`]).
    Gpu { bf16_dot: bool },
    /// The GPU flavour compiled for this CPU, to run its launches there: the same 4-lane bodies; the
    /// reduced RoPE angle goes to libm instead of the GPU's `sin.approx`/`cos.approx`, and tensor-core
    /// tiles are played lane by lane.
    GpuOnCpu { bf16_dot: bool },
}

/// Code choices that depend on the CPU model rather than its features, each measured on the CPUs it names
/// (docs/BENCHMARKS.md) — the one place they are made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CpuTuning {
    /// A product block of one activation row asks for its weight lines ahead too, as blocks of several
    /// rows always do (`gemm::prefetch_weights`). An Intel Xeon (Emerald Rapids) decoded 13–21% faster with
    /// it — its core keeps too few lines in flight on its own for a lone row's stream —; an AMD EPYC
    /// (Zen 5) 0.96–1.03×.
    pub lone_prefetch: bool,
    /// With bf16 activations, prefill's register tiles use `vdpbf16ps` on the staged bf16 rows too; else
    /// they read the unrounded f32 rows (staged beside the bf16 ones) and widen the bf16 weights for f32
    /// FMAs, while decode's streaming blocks keep `vdpbf16ps`. An AMD EPYC (Zen 5) prefilled 1.55× as fast
    /// with the dot products as with f32 FMAs; an Intel Xeon (Emerald Rapids) 0.86× (its FMAs do as many
    /// multiply-adds per cycle), where its decode with them was 1.2× as fast.
    pub bf16_tiles: bool,
}

impl CpuTuning {
    /// The tuning for LLVM's CPU name `cpu`: AMD's Zen cores, or any other (measured on Intel's).
    pub fn of(cpu: &str) -> CpuTuning {
        let zen = cpu.starts_with("znver");
        CpuTuning {
            lone_prefetch: !zen,
            bf16_tiles: zen,
        }
    }
}

impl Flavor {
    /// Whether products over bf16 weights round the activations to bf16 for the target's bf16 dot products
    /// (AVX512_BF16 on CPUs, tensor cores on GPUs).
    pub fn bf16_dot(self) -> bool {
        match self {
            Flavor::Cpu { bf16_dot, .. }
            | Flavor::Gpu { bf16_dot }
            | Flavor::GpuOnCpu { bf16_dot } => bf16_dot,
        }
    }

    /// Whether this is the GPU itself (not its flavour compiled for the CPU).
    pub fn is_gpu(self) -> bool {
        matches!(self, Flavor::Gpu { .. })
    }

    /// The CPU's tuning (the default one for GPU flavours, which do not read it).
    pub fn tuning(self) -> CpuTuning {
        match self {
            Flavor::Cpu { tuning, .. } => tuning,
            _ => CpuTuning::default(),
        }
    }

    /// f32 lanes per vector.
    pub fn lanes(self) -> u32 {
        match self {
            Flavor::Cpu { lanes, .. } => lanes,
            Flavor::Gpu { .. } | Flavor::GpuOnCpu { .. } => 4,
        }
    }
}

/// How the threads that take one work item together on a GPU share it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ItemShare {
    /// One thread per item.
    One,
    /// A matrix product's block ([`crate::gpu_gemm::columns`]), of this shape.
    Product(crate::gpu_gemm::ProductShape),
    /// A matrix product's block of this shape on tensor cores, its warps splitting the rows
    /// ([`crate::gpu_mma`]): the kernel of calls of many rows (`q3c_abi::launch::ManyRows`).
    Tensor(crate::gpu_gemm::ProductShape),
    /// `n` threads split the item's loops over a row's elements (or its heads).
    Rows(usize),
    /// Inside one part of an item that a block of `n` threads shares ([`crate::gpu_parts`]): the warp's
    /// lanes split the row loops.
    Part(usize),
}

impl ItemShare {
    /// Threads per item.
    pub fn threads(self) -> usize {
        match self {
            ItemShare::One => 1,
            ItemShare::Product(shape) | ItemShare::Tensor(shape) => shape.threads,
            ItemShare::Rows(n) | ItemShare::Part(n) => n,
        }
    }
}

/// A mutable stack variable.
#[derive(Clone, Copy)]
pub struct Var<'ctx> {
    ptr: PointerValue<'ctx>,
    ty: BasicTypeEnum<'ctx>,
}

/// Builds the body of one function.
pub struct Fb<'a, 'ctx> {
    pub cx: &'ctx Context,
    pub m: &'a Module<'ctx>,
    pub b: Builder<'ctx>,
    pub f: FunctionValue<'ctx>,
    pub flavor: Flavor,
    /// On GPUs: how the threads of a block share one work item (`Dispatch::threads_per_item`).
    pub share: ItemShare,
    /// Allocas go here, ahead of the body, so SROA can promote them.
    entry: BasicBlock<'ctx>,
    entry_b: Builder<'ctx>,
}

impl<'a, 'ctx> Fb<'a, 'ctx> {
    /// Starts the body of `f`; call [`Fb::finish`] after the last instruction.
    pub fn new(
        cx: &'ctx Context,
        m: &'a Module<'ctx>,
        f: FunctionValue<'ctx>,
        flavor: Flavor,
    ) -> Self {
        let entry = cx.append_basic_block(f, "entry");
        let body = cx.append_basic_block(f, "body");
        let entry_b = cx.create_builder();
        entry_b.position_at_end(entry);
        let b = cx.create_builder();
        b.position_at_end(body);
        Fb {
            cx,
            m,
            b,
            f,
            flavor,
            share: ItemShare::One,
            entry,
            entry_b,
        }
    }

    /// Closes the alloca block (it falls through to the body).
    pub fn finish(self) {
        let body = self.entry.get_next_basic_block().expect("body block");
        self.entry_b.build_unconditional_branch(body).expect(BUG);
    }

    // ---- types and constants

    pub fn i64t(&self) -> IntType<'ctx> {
        self.cx.i64_type()
    }
    pub fn f32t(&self) -> FloatType<'ctx> {
        self.cx.f32_type()
    }
    pub fn ptrt(&self) -> PointerType<'ctx> {
        self.cx.ptr_type(AddressSpace::default())
    }
    /// `<lanes x float>`.
    pub fn vt(&self) -> VectorType<'ctx> {
        self.f32t().vec_type(self.flavor.lanes())
    }
    pub fn lanes(&self) -> usize {
        self.flavor.lanes() as usize
    }
    pub fn i64c(&self, v: usize) -> IntValue<'ctx> {
        self.i64t().const_int(v as u64, false)
    }
    pub fn f32c(&self, v: f32) -> FloatValue<'ctx> {
        self.f32t().const_float(f64::from(v))
    }
    /// A vector of `v` in every lane.
    pub fn vsplat_c(&self, v: f32) -> VectorValue<'ctx> {
        self.vsplat_c_n(v, self.flavor.lanes())
    }
    fn vsplat_c_n(&self, v: f32, lanes: u32) -> VectorValue<'ctx> {
        let c = self.f32c(v);
        VectorType::const_vector(&vec![c; lanes as usize])
    }
    /// A vector of the runtime value `v` in every lane.
    pub fn vsplat(&self, v: FloatValue<'ctx>) -> VectorValue<'ctx> {
        self.splat(v.into(), self.flavor.lanes())
    }
    /// A vector of `lanes` copies of the runtime value `v` (an integer or a float).
    pub fn splat(&self, v: BasicValueEnum<'ctx>, lanes: u32) -> VectorValue<'ctx> {
        let ty = match v {
            BasicValueEnum::IntValue(i) => i.get_type().vec_type(lanes),
            other => other.into_float_value().get_type().vec_type(lanes),
        };
        let zero = self.cx.i32_type().const_zero();
        let one = self
            .b
            .build_insert_element(ty.get_poison(), v, zero, "")
            .expect(BUG);
        let mask = VectorType::const_vector(&vec![zero; lanes as usize]);
        self.b
            .build_shuffle_vector(one, ty.get_poison(), mask, "")
            .expect(BUG)
    }

    // ---- integers and addresses

    pub fn add(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> IntValue<'ctx> {
        self.b.build_int_add(a, b, "").expect(BUG)
    }
    pub fn mul_c(&self, a: IntValue<'ctx>, c: usize) -> IntValue<'ctx> {
        self.b.build_int_mul(a, self.i64c(c), "").expect(BUG)
    }
    pub fn add_c(&self, a: IntValue<'ctx>, c: usize) -> IntValue<'ctx> {
        self.add(a, self.i64c(c))
    }
    pub fn udiv_c(&self, a: IntValue<'ctx>, c: usize) -> IntValue<'ctx> {
        self.b
            .build_int_unsigned_div(a, self.i64c(c), "")
            .expect(BUG)
    }
    pub fn urem_c(&self, a: IntValue<'ctx>, c: usize) -> IntValue<'ctx> {
        self.b
            .build_int_unsigned_rem(a, self.i64c(c), "")
            .expect(BUG)
    }
    pub fn icmp(&self, p: IntPredicate, a: IntValue<'ctx>, b: IntValue<'ctx>) -> IntValue<'ctx> {
        self.b.build_int_compare(p, a, b, "").expect(BUG)
    }
    /// `base + bytes`.
    pub fn off(&self, base: PointerValue<'ctx>, bytes: usize) -> PointerValue<'ctx> {
        if bytes == 0 {
            return base;
        }
        self.gep(base, self.i64c(bytes))
    }
    /// `base + index · stride` bytes.
    pub fn addr(
        &self,
        base: PointerValue<'ctx>,
        index: IntValue<'ctx>,
        stride: usize,
    ) -> PointerValue<'ctx> {
        let bytes = self.mul_c(index, stride);
        self.gep(base, bytes)
    }
    fn gep(&self, base: PointerValue<'ctx>, bytes: IntValue<'ctx>) -> PointerValue<'ctx> {
        // SAFETY (of the IR, not of Rust): kernels only form addresses inside their buffers.
        unsafe {
            self.b
                .build_in_bounds_gep(self.cx.i8_type(), base, &[bytes], "")
                .expect(BUG)
        }
    }

    // ---- memory

    /// A load of `ty` at `p`, assuming `align` bytes of alignment.
    pub fn load_aligned(
        &self,
        ty: impl BasicType<'ctx>,
        p: PointerValue<'ctx>,
        align: u32,
    ) -> BasicValueEnum<'ctx> {
        let v = self.b.build_load(ty, p, "").expect(BUG);
        if let Some(i) = v.as_instruction_value() {
            i.set_alignment(align).expect(BUG);
        }
        v
    }
    pub fn load_i64(&self, p: PointerValue<'ctx>) -> IntValue<'ctx> {
        self.load_aligned(self.i64t(), p, 8).into_int_value()
    }
    pub fn load_ptr(&self, p: PointerValue<'ctx>) -> PointerValue<'ctx> {
        self.load_aligned(self.ptrt(), p, 8).into_pointer_value()
    }
    /// An i32 (token id, expert id) widened to i64.
    pub fn load_i32_as_i64(&self, p: PointerValue<'ctx>) -> IntValue<'ctx> {
        let v = self.load_aligned(self.cx.i32_type(), p, 4).into_int_value();
        self.b.build_int_s_extend(v, self.i64t(), "").expect(BUG)
    }
    pub fn load_f32(&self, p: PointerValue<'ctx>) -> FloatValue<'ctx> {
        self.load_aligned(self.f32t(), p, 4).into_float_value()
    }
    /// One element of `dt` (f32, bf16 or f16; for q8 the signed byte) as f32.
    pub fn load_weight(&self, dt: DType, p: PointerValue<'ctx>) -> FloatValue<'ctx> {
        match dt {
            DType::Q8 => {
                let q = self.load_aligned(self.cx.i8_type(), p, 1).into_int_value();
                self.b
                    .build_signed_int_to_float(q, self.f32t(), "")
                    .expect(BUG)
            }
            DType::BF16 => {
                let h = self.load_aligned(self.cx.i16_type(), p, 2).into_int_value();
                let w = self
                    .b
                    .build_int_z_extend(h, self.cx.i32_type(), "")
                    .expect(BUG);
                let w = self
                    .b
                    .build_left_shift(w, self.cx.i32_type().const_int(16, false), "")
                    .expect(BUG);
                self.b
                    .build_bit_cast(w, self.f32t(), "")
                    .expect(BUG)
                    .into_float_value()
            }
            DType::F16 => {
                let h = self
                    .load_aligned(self.cx.f16_type(), p, 2)
                    .into_float_value();
                self.b.build_float_ext(h, self.f32t(), "").expect(BUG)
            }
            _ => self.load_f32(p),
        }
    }
    /// `v` stored as one element of `dt` (f32; f16 or bf16 rounded to nearest even; for q8 a signed byte,
    /// see [`Fb::q8_bytes`]).
    pub fn store_as(&self, dt: DType, v: FloatValue<'ctx>, p: PointerValue<'ctx>) {
        match dt {
            DType::Q8 => self.store_bytes(self.q8_bytes(v.into()), p),
            DType::F16 => {
                let h = self
                    .b
                    .build_float_trunc(v, self.cx.f16_type(), "")
                    .expect(BUG);
                self.store(h, p);
            }
            DType::BF16 => self.store(self.bf16_bits(v), p),
            _ => self.store(v, p),
        }
    }
    /// A vector stored as `lanes` elements of `dt` (see [`Fb::store_as`]).
    pub fn vstore_as(&self, dt: DType, v: VectorValue<'ctx>, p: PointerValue<'ctx>) {
        match dt {
            DType::Q8 => self.store_bytes(self.q8_bytes(v.into()), p),
            DType::F16 => {
                let half = self.cx.f16_type().vec_type(self.flavor.lanes());
                let h = self.b.build_float_trunc(v, half, "").expect(BUG);
                self.store(h, p);
            }
            DType::BF16 => {
                for (i, x) in self.unpack(v).into_iter().enumerate() {
                    self.store(self.bf16_bits(x), self.off(p, 2 * i));
                }
            }
            _ => self.store(v, p),
        }
    }
    /// `v` (an f32 or a vector of them) as signed bytes: rounded to nearest even and held to ±127 (a NaN
    /// becomes 127), so the conversion is defined for every input.
    fn q8_bytes(&self, v: BasicValueEnum<'ctx>) -> BasicValueEnum<'ctx> {
        let ty = v.get_type();
        let (limit, bytes): (BasicValueEnum<'ctx>, BasicTypeEnum<'ctx>) = match ty {
            BasicTypeEnum::VectorType(t) => (
                self.vsplat_c_n(127.0, t.get_size()).into(),
                self.cx.i8_type().vec_type(t.get_size()).into(),
            ),
            _ => (self.f32c(127.0).into(), self.cx.i8_type().into()),
        };
        let neg = match limit {
            BasicValueEnum::VectorValue(l) => self.b.build_float_neg(l, "").expect(BUG).into(),
            l => self
                .b
                .build_float_neg(l.into_float_value(), "")
                .expect(BUG)
                .into(),
        };
        let r = self.intrinsic("llvm.roundeven", ty, &[v]);
        let r = self.intrinsic("llvm.minnum", ty, &[r, limit]);
        let r = self.intrinsic("llvm.maxnum", ty, &[r, neg]);
        match r {
            BasicValueEnum::VectorValue(r) => self
                .b
                .build_float_to_signed_int(r, bytes.into_vector_type(), "")
                .expect(BUG)
                .into(),
            r => self
                .b
                .build_float_to_signed_int(r.into_float_value(), bytes.into_int_type(), "")
                .expect(BUG)
                .into(),
        }
    }
    /// Bytes stored at `p` with no alignment assumed.
    fn store_bytes(&self, v: BasicValueEnum<'ctx>, p: PointerValue<'ctx>) {
        let i = self.b.build_store(p, v).expect(BUG);
        i.set_alignment(1).expect(BUG);
    }
    /// The bf16 bits (an i16) of `v` rounded to nearest even, a NaN kept a (quiet) NaN. Integer arithmetic,
    /// so no target needs a conversion instruction or a library call.
    pub fn bf16_bits(&self, v: FloatValue<'ctx>) -> inkwell::values::IntValue<'ctx> {
        let i32t = self.cx.i32_type();
        let c = |x: u64| i32t.const_int(x, false);
        let b = &self.b;
        let bits = b.build_bit_cast(v, i32t, "").expect(BUG).into_int_value();
        let lsb = b.build_right_shift(bits, c(16), false, "").expect(BUG);
        let lsb = b.build_and(lsb, c(1), "").expect(BUG);
        let rounded = b.build_int_add(bits, c(0x7fff), "").expect(BUG);
        let rounded = b.build_int_add(rounded, lsb, "").expect(BUG);
        let rounded = b.build_right_shift(rounded, c(16), false, "").expect(BUG);
        let magnitude = b.build_and(bits, c(0x7fff_ffff), "").expect(BUG);
        let nan = b
            .build_int_compare(inkwell::IntPredicate::UGT, magnitude, c(0x7f80_0000), "")
            .expect(BUG);
        let quiet = b.build_right_shift(bits, c(16), false, "").expect(BUG);
        let quiet = b.build_or(quiet, c(0x40), "").expect(BUG);
        let out = b
            .build_select(nan, quiet, rounded, "")
            .expect(BUG)
            .into_int_value();
        b.build_int_truncate(out, self.cx.i16_type(), "")
            .expect(BUG)
    }
    /// A vector of f32 activations.
    pub fn vload(&self, p: PointerValue<'ctx>) -> VectorValue<'ctx> {
        self.load_aligned(self.vt(), p, 4).into_vector_value()
    }
    /// A vector of weights of `dt` as f32 (bf16 widened by a shift into the high half, q8 bytes converted).
    pub fn vload_weight(&self, dt: DType, p: PointerValue<'ctx>) -> VectorValue<'ctx> {
        let align = match dt {
            DType::F32 => 4,
            DType::Q8 => 1,
            _ => 2,
        };
        self.load_weights(dt, p, self.flavor.lanes(), align)
    }
    /// `n` weights of `dt` at `p` (assumed aligned to `align` bytes) as a vector of f32 (bf16 widened by a
    /// shift into the high half, f16 converted).
    pub fn load_weights(
        &self,
        dt: DType,
        p: PointerValue<'ctx>,
        n: u32,
        align: u32,
    ) -> VectorValue<'ctx> {
        match dt {
            DType::Q8 => {
                let q = self
                    .load_aligned(self.cx.i8_type().vec_type(n), p, align)
                    .into_vector_value();
                self.b
                    .build_signed_int_to_float(q, self.f32t().vec_type(n), "")
                    .expect(BUG)
            }
            DType::BF16 => {
                let i32v = self.cx.i32_type().vec_type(n);
                let h = self
                    .load_aligned(self.cx.i16_type().vec_type(n), p, align)
                    .into_vector_value();
                let w = self.b.build_int_z_extend(h, i32v, "").expect(BUG);
                let sixteen =
                    VectorType::const_vector(&vec![
                        self.cx.i32_type().const_int(16, false);
                        n as usize
                    ]);
                let w = self.b.build_left_shift(w, sixteen, "").expect(BUG);
                self.b
                    .build_bit_cast(w, self.f32t().vec_type(n), "")
                    .expect(BUG)
                    .into_vector_value()
            }
            DType::F16 => {
                let half = self.cx.f16_type().vec_type(n);
                let h = self.load_aligned(half, p, align).into_vector_value();
                self.b
                    .build_float_ext(h, self.f32t().vec_type(n), "")
                    .expect(BUG)
            }
            _ => self
                .load_aligned(self.f32t().vec_type(n), p, align)
                .into_vector_value(),
        }
    }
    pub fn store(&self, v: impl BasicValue<'ctx>, p: PointerValue<'ctx>) {
        let i = self.b.build_store(p, v).expect(BUG);
        i.set_alignment(4).expect(BUG);
    }

    // ---- variables and control flow

    /// A stack variable of `ty` holding `init`.
    pub fn var(&self, init: impl BasicValue<'ctx>) -> Var<'ctx> {
        let v = init.as_basic_value_enum();
        let ty = v.get_type();
        let ptr = self.entry_b.build_alloca(ty, "").expect(BUG);
        self.b.build_store(ptr, v).expect(BUG);
        Var { ptr, ty }
    }
    pub fn get(&self, v: Var<'ctx>) -> BasicValueEnum<'ctx> {
        self.b.build_load(v.ty, v.ptr, "").expect(BUG)
    }
    pub fn getf(&self, v: Var<'ctx>) -> FloatValue<'ctx> {
        self.get(v).into_float_value()
    }
    pub fn getv(&self, v: Var<'ctx>) -> VectorValue<'ctx> {
        self.get(v).into_vector_value()
    }
    pub fn set(&self, v: Var<'ctx>, x: impl BasicValue<'ctx>) {
        self.b.build_store(v.ptr, x).expect(BUG);
    }
    /// A 64-byte aligned stack buffer of `bytes` (rounded up to whole f32).
    pub fn stack(&self, bytes: usize) -> PointerValue<'ctx> {
        let p = self
            .entry_b
            .build_alloca(self.f32t().array_type(bytes.div_ceil(4) as u32), "")
            .expect(BUG);
        if let Some(i) = p.as_instruction_value() {
            i.set_alignment(64).expect(BUG);
        }
        p
    }

    /// Opens `for i in start..end`: returns the counter, `i`, the loop's head and its exit block.
    pub fn open_loop(
        &self,
        start: IntValue<'ctx>,
        end: IntValue<'ctx>,
    ) -> (
        Var<'ctx>,
        IntValue<'ctx>,
        BasicBlock<'ctx>,
        BasicBlock<'ctx>,
    ) {
        let i = self.var(start);
        let (head, work, exit) = (
            self.cx.append_basic_block(self.f, "head"),
            self.cx.append_basic_block(self.f, "loop"),
            self.cx.append_basic_block(self.f, "exit"),
        );
        self.b.build_unconditional_branch(head).expect(BUG);
        self.b.position_at_end(head);
        let iv = self.get(i).into_int_value();
        let go = self.icmp(IntPredicate::ULT, iv, end);
        self.b.build_conditional_branch(go, work, exit).expect(BUG);
        self.b.position_at_end(work);
        (i, iv, head, exit)
    }
    /// Closes a loop opened by [`Fb::open_loop`]: `i += step`, back to the head, continue after it.
    pub fn close_loop(
        &self,
        i: Var<'ctx>,
        iv: IntValue<'ctx>,
        head: BasicBlock<'ctx>,
        exit: BasicBlock<'ctx>,
        step: usize,
    ) {
        let next = self.add_c(iv, step);
        self.set(i, next);
        self.b.build_unconditional_branch(head).expect(BUG);
        self.b.position_at_end(exit);
    }
    /// `for i in (start..end).step_by(step)`, with `body` emitting the loop body.
    pub fn for_range(
        &self,
        start: IntValue<'ctx>,
        end: IntValue<'ctx>,
        step: usize,
        mut body: impl FnMut(&Self, IntValue<'ctx>),
    ) {
        let (i, iv, head, exit) = self.open_loop(start, end);
        body(self, iv);
        self.close_loop(i, iv, head, exit, step);
    }
    /// `for i in 0..n`.
    pub fn for_n(&self, n: usize, body: impl FnMut(&Self, IntValue<'ctx>)) {
        if n > 0 {
            self.for_range(self.i64c(0), self.i64c(n), 1, body);
        }
    }
    /// Opens `if cond` (an i1); returns the block after it, for [`Fb::close_if`].
    pub fn open_if(&self, cond: IntValue<'ctx>) -> BasicBlock<'ctx> {
        let (yes, done) = (
            self.cx.append_basic_block(self.f, "then"),
            self.cx.append_basic_block(self.f, "endif"),
        );
        self.b.build_conditional_branch(cond, yes, done).expect(BUG);
        self.b.position_at_end(yes);
        done
    }
    pub fn close_if(&self, done: BasicBlock<'ctx>) {
        self.b.build_unconditional_branch(done).expect(BUG);
        self.b.position_at_end(done);
    }
    /// Runs `then` when `cond` (an i1) holds.
    pub fn when(&self, cond: IntValue<'ctx>, then: impl FnOnce(&Self)) {
        let done = self.open_if(cond);
        then(self);
        self.close_if(done);
    }

    // ---- float math (scalars and vectors alike)

    pub fn fadd<T: inkwell::values::FloatMathValue<'ctx>>(&self, a: T, b: T) -> T {
        self.b.build_float_add(a, b, "").expect(BUG)
    }
    pub fn fsub<T: inkwell::values::FloatMathValue<'ctx>>(&self, a: T, b: T) -> T {
        self.b.build_float_sub(a, b, "").expect(BUG)
    }
    pub fn fmul<T: inkwell::values::FloatMathValue<'ctx>>(&self, a: T, b: T) -> T {
        self.b.build_float_mul(a, b, "").expect(BUG)
    }
    pub fn fdiv<T: inkwell::values::FloatMathValue<'ctx>>(&self, a: T, b: T) -> T {
        self.b.build_float_div(a, b, "").expect(BUG)
    }
    pub fn fgt(&self, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> IntValue<'ctx> {
        self.b
            .build_float_compare(FloatPredicate::OGT, a, b, "")
            .expect(BUG)
    }
    /// Calls the overloaded intrinsic `name` on values of `ty`.
    pub fn intrinsic(
        &self,
        name: &str,
        ty: BasicTypeEnum<'ctx>,
        args: &[BasicValueEnum<'ctx>],
    ) -> BasicValueEnum<'ctx> {
        let f = Intrinsic::find(name)
            .and_then(|i| i.get_declaration(self.m, &[ty]))
            .unwrap_or_else(|| panic!("LLVM has no intrinsic {name} (a q3c bug)"));
        self.call(f, args)
    }
    /// Calls the non-overloaded intrinsic `name`.
    pub fn named_intrinsic(
        &self,
        name: &str,
        args: &[BasicValueEnum<'ctx>],
    ) -> BasicValueEnum<'ctx> {
        let f = Intrinsic::find(name)
            .and_then(|i| i.get_declaration(self.m, &[]))
            .unwrap_or_else(|| panic!("LLVM has no intrinsic {name} (a q3c bug)"));
        self.call(f, args)
    }
    /// Asks for the cache line at `p` ahead of its use (`llvm.prefetch`: for reading, into every cache
    /// level; an address past the data is harmless). Nothing on GPU flavours.
    pub fn prefetch(&self, p: PointerValue<'ctx>) {
        if !matches!(self.flavor, Flavor::Cpu { .. }) {
            return;
        }
        let ptr = self.cx.ptr_type(AddressSpace::default());
        let f = Intrinsic::find("llvm.prefetch")
            .and_then(|i| i.get_declaration(self.m, &[ptr.into()]))
            .expect(BUG);
        let int = |v: u64| self.cx.i32_type().const_int(v, false).into();
        // (address, read, keep in every level, data)
        self.b
            .build_call(f, &[p.into(), int(0), int(3), int(1)], "")
            .expect(BUG);
    }
    /// Calls a function returning a value.
    pub fn call(
        &self,
        f: FunctionValue<'ctx>,
        args: &[BasicValueEnum<'ctx>],
    ) -> BasicValueEnum<'ctx> {
        let args: Vec<BasicMetadataValueEnum> = args.iter().map(|&a| a.into()).collect();
        match self
            .b
            .build_call(f, &args, "")
            .expect(BUG)
            .try_as_basic_value()
        {
            inkwell::values::ValueKind::Basic(v) => v,
            inkwell::values::ValueKind::Instruction(_) => {
                panic!("{} returns nothing", f.get_name().to_string_lossy())
            }
        }
    }
    /// `a · b + c`, fused.
    pub fn fma<T: BasicValue<'ctx>>(&self, a: T, b: T, c: T) -> BasicValueEnum<'ctx> {
        let (a, b, c) = (
            a.as_basic_value_enum(),
            b.as_basic_value_enum(),
            c.as_basic_value_enum(),
        );
        self.intrinsic("llvm.fma", a.get_type(), &[a, b, c])
    }
    pub fn vfma(
        &self,
        a: VectorValue<'ctx>,
        b: VectorValue<'ctx>,
        c: VectorValue<'ctx>,
    ) -> VectorValue<'ctx> {
        self.fma(a, b, c).into_vector_value()
    }
    pub fn fmax(&self, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> FloatValue<'ctx> {
        self.intrinsic("llvm.maxnum", self.f32t().into(), &[a.into(), b.into()])
            .into_float_value()
    }
    pub fn sqrt(&self, a: FloatValue<'ctx>) -> FloatValue<'ctx> {
        self.intrinsic("llvm.sqrt", self.f32t().into(), &[a.into()])
            .into_float_value()
    }

    /// The sum of a vector's lanes, by halving (log₂ lanes shuffles and adds).
    pub fn hsum(&self, v: VectorValue<'ctx>) -> FloatValue<'ctx> {
        self.halving(v, |a, b| self.fadd(a, b))
    }
    /// The largest of a vector's lanes, by halving with `a > b ? a : b` (one `vmaxps` a level; LLVM's
    /// `vector.reduce.fmax` keeps maxnum's NaN rule and becomes a serial chain of scalar maxes on x86).
    /// Where a lane is NaN the result is unspecified.
    pub fn hmax(&self, v: VectorValue<'ctx>) -> FloatValue<'ctx> {
        self.halving(v, |a, b| {
            let gt = self
                .b
                .build_float_compare(FloatPredicate::OGT, a, b, "")
                .expect(BUG);
            self.b
                .build_select(gt, a, b, "")
                .expect(BUG)
                .into_vector_value()
        })
    }
    /// `v`'s lanes folded into lane 0 by `op` on halves (log₂ lanes shuffles and ops).
    fn halving(
        &self,
        v: VectorValue<'ctx>,
        op: impl Fn(VectorValue<'ctx>, VectorValue<'ctx>) -> VectorValue<'ctx>,
    ) -> FloatValue<'ctx> {
        let mut v = v;
        let mut n = v.get_type().get_size();
        while n > 1 {
            let half = n / 2;
            let idx = |range: std::ops::Range<u32>| {
                let c: Vec<IntValue> = range
                    .map(|i| self.cx.i32_type().const_int(u64::from(i), false))
                    .collect();
                VectorType::const_vector(&c)
            };
            let lo = self
                .b
                .build_shuffle_vector(v, v.get_type().get_poison(), idx(0..half), "")
                .expect(BUG);
            let hi = self
                .b
                .build_shuffle_vector(v, v.get_type().get_poison(), idx(half..n), "")
                .expect(BUG);
            v = op(lo, hi);
            n = half;
        }
        self.b
            .build_extract_element(v, self.cx.i32_type().const_zero(), "")
            .expect(BUG)
            .into_float_value()
    }

    /// Packs scalars into a vector of as many lanes.
    pub fn pack(&self, xs: &[FloatValue<'ctx>]) -> VectorValue<'ctx> {
        let ty = self.f32t().vec_type(xs.len() as u32);
        let mut v = ty.get_poison();
        for (i, &x) in xs.iter().enumerate() {
            let at = self.cx.i32_type().const_int(i as u64, false);
            v = self.b.build_insert_element(v, x, at, "").expect(BUG);
        }
        v
    }
    /// The lanes of a vector.
    pub fn unpack(&self, v: VectorValue<'ctx>) -> Vec<FloatValue<'ctx>> {
        (0..v.get_type().get_size())
            .map(|i| {
                let at = self.cx.i32_type().const_int(u64::from(i), false);
                self.b
                    .build_extract_element(v, at, "")
                    .expect(BUG)
                    .into_float_value()
            })
            .collect()
    }

    /// `e^x` for every lane of `x` (any width): Cephes-style range reduction and polynomial, relative error
    /// below 5e-7, inputs clamped to ±88 (no libm call, so it vectorises and runs on GPUs).
    pub fn vexp(&self, x: VectorValue<'ctx>) -> VectorValue<'ctx> {
        let n_lanes = x.get_type().get_size();
        let c = |v: f32| self.vsplat_c_n(v, n_lanes);
        let x = self
            .intrinsic(
                "llvm.minnum",
                x.get_type().into(),
                &[x.into(), c(88.3).into()],
            )
            .into_vector_value();
        let x = self
            .intrinsic(
                "llvm.maxnum",
                x.get_type().into(),
                &[x.into(), c(-87.3).into()],
            )
            .into_vector_value();
        let magic = c(12_582_912.0);
        let t = self.vfma(x, c(std::f32::consts::LOG2_E), magic);
        let n = self.fsub(t, magic);
        // r = x − n·ln 2, with ln 2 in two parts for precision.
        let r = self.vfma(n, c(-0.693_359_4), x);
        let r = self.vfma(n, c(2.121_944_4e-4), r);
        let mut p = c(1.987_569_2e-4);
        for k in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
            p = self.vfma(p, r, c(k));
        }
        let r2 = self.fmul(r, r);
        let y = self.vfma(p, r2, r);
        let y = self.fadd(y, c(1.0));
        // 2^n: n + 127 in the exponent field.
        let i32v = self.cx.i32_type().vec_type(n_lanes);
        let ni = self.b.build_float_to_signed_int(n, i32v, "").expect(BUG);
        let splat_i = |v: u64| {
            VectorType::const_vector(&vec![
                self.cx.i32_type().const_int(v, false);
                n_lanes as usize
            ])
        };
        let ni = self.b.build_int_add(ni, splat_i(127), "").expect(BUG);
        let bits = self.b.build_left_shift(ni, splat_i(23), "").expect(BUG);
        let pow2 = self
            .b
            .build_bit_cast(bits, x.get_type(), "")
            .expect(BUG)
            .into_vector_value();
        self.fmul(y, pow2)
    }
    /// Scalar `e^x` through a one-lane [`Fb::vexp`].
    pub fn exp(&self, x: FloatValue<'ctx>) -> FloatValue<'ctx> {
        let v = self.vexp(self.pack(&[x]));
        self.unpack(v)[0]
    }
    /// `x · sigmoid(x)` for every lane.
    pub fn vsilu(&self, x: VectorValue<'ctx>) -> VectorValue<'ctx> {
        let n_lanes = x.get_type().get_size();
        let neg = self.b.build_float_neg(x, "").expect(BUG);
        let e = self.vexp(neg);
        let one = self.vsplat_c_n(1.0, n_lanes);
        let den = self.fadd(e, one);
        self.fdiv(x, den)
    }

    /// Dot product of `k` f32 at `x` with `k` weights of `dt` at `w`: four vector accumulators, then
    /// single vectors, then scalars for the tail.
    pub fn dot(
        &self,
        x: PointerValue<'ctx>,
        w: PointerValue<'ctx>,
        dt: DType,
        k: usize,
    ) -> FloatValue<'ctx> {
        let sums = crate::gemm::dot_block(self, &[x], &[w], dt, k);
        sums[0][0]
    }
}
