//! LLVM's implementation of [`KernelBuilder`] and [`EntryBuilder`] over [`Fb`]: vectors of the target's
//! width (16 lanes with AVX-512; 4 on GPUs), `sin`/`cos` from LLVM's intrinsics on CPUs and from the
//! hardware's approximations after an f64 reduction on GPUs, and the matrix products of `gemm.rs` (register
//! tiles, staged bf16 and q8 activations).

use inkwell::basic_block::BasicBlock;
use inkwell::values::{FloatValue, FunctionValue, IntValue, PointerValue, VectorValue};
use inkwell::{AddressSpace, IntPredicate};
use q3c_ir::DType;
use q3c_kernels::{EntryBuilder, KernelBuilder, MatMul};

use crate::fb::{Fb, Flavor, Var, BUG};

/// A loop opened by [`KernelBuilder::loop_begin`].
pub struct Loop<'ctx> {
    var: Var<'ctx>,
    i: IntValue<'ctx>,
    head: BasicBlock<'ctx>,
    exit: BasicBlock<'ctx>,
}

impl<'ctx> KernelBuilder for Fb<'_, 'ctx> {
    type Int = IntValue<'ctx>;
    type Bool = IntValue<'ctx>;
    type Ptr = PointerValue<'ctx>;
    type F32 = FloatValue<'ctx>;
    type Vec = VectorValue<'ctx>;
    type Var = Var<'ctx>;
    type Loop = Loop<'ctx>;
    type If = BasicBlock<'ctx>;

    fn lanes(&self) -> usize {
        Fb::lanes(self)
    }

    fn iconst(&mut self, v: usize) -> IntValue<'ctx> {
        self.i64c(v)
    }
    fn add(&mut self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> IntValue<'ctx> {
        Fb::add(self, a, b)
    }
    fn sub(&mut self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> IntValue<'ctx> {
        self.b.build_int_sub(a, b, "").expect(BUG)
    }
    fn mul_c(&mut self, a: IntValue<'ctx>, c: usize) -> IntValue<'ctx> {
        Fb::mul_c(self, a, c)
    }
    fn udiv_c(&mut self, a: IntValue<'ctx>, c: usize) -> IntValue<'ctx> {
        Fb::udiv_c(self, a, c)
    }
    fn urem_c(&mut self, a: IntValue<'ctx>, c: usize) -> IntValue<'ctx> {
        Fb::urem_c(self, a, c)
    }
    fn udiv(&mut self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> IntValue<'ctx> {
        self.b.build_int_unsigned_div(a, b, "").expect(BUG)
    }
    fn urem(&mut self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> IntValue<'ctx> {
        self.b.build_int_unsigned_rem(a, b, "").expect(BUG)
    }
    fn ult(&mut self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> IntValue<'ctx> {
        self.icmp(IntPredicate::ULT, a, b)
    }
    fn ieq(&mut self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> IntValue<'ctx> {
        self.icmp(IntPredicate::EQ, a, b)
    }
    fn fgt(&mut self, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> IntValue<'ctx> {
        Fb::fgt(self, a, b)
    }
    fn and(&mut self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> IntValue<'ctx> {
        self.b.build_and(a, b, "").expect(BUG)
    }
    fn or(&mut self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> IntValue<'ctx> {
        self.b.build_or(a, b, "").expect(BUG)
    }
    fn not(&mut self, a: IntValue<'ctx>) -> IntValue<'ctx> {
        self.b.build_not(a, "").expect(BUG)
    }
    fn false_(&mut self) -> IntValue<'ctx> {
        self.cx.bool_type().const_zero()
    }
    fn select_int(
        &mut self,
        c: IntValue<'ctx>,
        a: IntValue<'ctx>,
        b: IntValue<'ctx>,
    ) -> IntValue<'ctx> {
        self.b
            .build_select(c, a, b, "")
            .expect(BUG)
            .into_int_value()
    }
    fn select_f32(
        &mut self,
        c: IntValue<'ctx>,
        a: FloatValue<'ctx>,
        b: FloatValue<'ctx>,
    ) -> FloatValue<'ctx> {
        self.b
            .build_select(c, a, b, "")
            .expect(BUG)
            .into_float_value()
    }
    fn int_to_f32(&mut self, a: IntValue<'ctx>) -> FloatValue<'ctx> {
        self.b
            .build_unsigned_int_to_float(a, self.f32t(), "")
            .expect(BUG)
    }
    fn off(&mut self, base: PointerValue<'ctx>, bytes: usize) -> PointerValue<'ctx> {
        Fb::off(self, base, bytes)
    }
    fn addr(
        &mut self,
        base: PointerValue<'ctx>,
        index: IntValue<'ctx>,
        stride: usize,
    ) -> PointerValue<'ctx> {
        Fb::addr(self, base, index, stride)
    }

    fn load_i64(&mut self, p: PointerValue<'ctx>) -> IntValue<'ctx> {
        Fb::load_i64(self, p)
    }
    fn load_ptr(&mut self, p: PointerValue<'ctx>) -> PointerValue<'ctx> {
        Fb::load_ptr(self, p)
    }
    fn load_i32(&mut self, p: PointerValue<'ctx>) -> IntValue<'ctx> {
        self.load_i32_as_i64(p)
    }
    fn load_f32(&mut self, p: PointerValue<'ctx>) -> FloatValue<'ctx> {
        Fb::load_f32(self, p)
    }
    fn load_weight(&mut self, dt: DType, p: PointerValue<'ctx>) -> FloatValue<'ctx> {
        Fb::load_weight(self, dt, p)
    }
    fn store_f32(&mut self, v: FloatValue<'ctx>, p: PointerValue<'ctx>) {
        self.store(v, p);
    }
    fn store_i32(&mut self, v: IntValue<'ctx>, p: PointerValue<'ctx>) {
        let v = self
            .b
            .build_int_truncate(v, self.cx.i32_type(), "")
            .expect(BUG);
        self.store(v, p);
    }
    fn store_i64(&mut self, v: IntValue<'ctx>, p: PointerValue<'ctx>) {
        self.store(v, p);
    }
    fn store_ptr(&mut self, v: PointerValue<'ctx>, p: PointerValue<'ctx>) {
        self.store(v, p);
    }
    fn vload(&mut self, p: PointerValue<'ctx>) -> VectorValue<'ctx> {
        Fb::vload(self, p)
    }
    fn vload_weight(&mut self, dt: DType, p: PointerValue<'ctx>) -> VectorValue<'ctx> {
        Fb::vload_weight(self, dt, p)
    }
    fn vstore(&mut self, v: VectorValue<'ctx>, p: PointerValue<'ctx>) {
        self.store(v, p);
    }
    fn store_as(&mut self, dt: DType, v: FloatValue<'ctx>, p: PointerValue<'ctx>) {
        Fb::store_as(self, dt, v, p)
    }
    fn vstore_as(&mut self, dt: DType, v: VectorValue<'ctx>, p: PointerValue<'ctx>) {
        Fb::vstore_as(self, dt, v, p)
    }
    fn stack(&mut self, bytes: usize) -> PointerValue<'ctx> {
        Fb::stack(self, bytes)
    }

    fn var_int(&mut self, init: IntValue<'ctx>) -> Var<'ctx> {
        self.var(init)
    }
    fn var_f32(&mut self, init: FloatValue<'ctx>) -> Var<'ctx> {
        self.var(init)
    }
    fn var_vec(&mut self, init: VectorValue<'ctx>) -> Var<'ctx> {
        self.var(init)
    }
    fn get_int(&mut self, v: Var<'ctx>) -> IntValue<'ctx> {
        self.get(v).into_int_value()
    }
    fn get_f32(&mut self, v: Var<'ctx>) -> FloatValue<'ctx> {
        self.getf(v)
    }
    fn get_vec(&mut self, v: Var<'ctx>) -> VectorValue<'ctx> {
        self.getv(v)
    }
    fn set_int(&mut self, v: Var<'ctx>, x: IntValue<'ctx>) {
        self.set(v, x);
    }
    fn set_f32(&mut self, v: Var<'ctx>, x: FloatValue<'ctx>) {
        self.set(v, x);
    }
    fn set_vec(&mut self, v: Var<'ctx>, x: VectorValue<'ctx>) {
        self.set(v, x);
    }

    fn loop_begin(
        &mut self,
        start: IntValue<'ctx>,
        end: IntValue<'ctx>,
    ) -> (IntValue<'ctx>, Loop<'ctx>) {
        let (var, i, head, exit) = self.open_loop(start, end);
        (i, Loop { var, i, head, exit })
    }
    fn loop_end(&mut self, l: Loop<'ctx>, step: usize) {
        self.close_loop(l.var, l.i, l.head, l.exit, step);
    }
    fn if_begin(&mut self, cond: IntValue<'ctx>) -> BasicBlock<'ctx> {
        self.open_if(cond)
    }
    fn if_end(&mut self, done: BasicBlock<'ctx>) {
        self.close_if(done);
    }

    fn fconst(&mut self, v: f32) -> FloatValue<'ctx> {
        self.f32c(v)
    }
    fn fadd(&mut self, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> FloatValue<'ctx> {
        Fb::fadd(self, a, b)
    }
    fn fsub(&mut self, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> FloatValue<'ctx> {
        Fb::fsub(self, a, b)
    }
    fn fmul(&mut self, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> FloatValue<'ctx> {
        Fb::fmul(self, a, b)
    }
    fn fdiv(&mut self, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> FloatValue<'ctx> {
        Fb::fdiv(self, a, b)
    }
    fn fmax(&mut self, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> FloatValue<'ctx> {
        Fb::fmax(self, a, b)
    }
    fn fma(
        &mut self,
        a: FloatValue<'ctx>,
        b: FloatValue<'ctx>,
        c: FloatValue<'ctx>,
    ) -> FloatValue<'ctx> {
        Fb::fma(self, a, b, c).into_float_value()
    }
    fn sqrt(&mut self, a: FloatValue<'ctx>) -> FloatValue<'ctx> {
        Fb::sqrt(self, a)
    }
    fn exp(&mut self, x: FloatValue<'ctx>) -> FloatValue<'ctx> {
        Fb::exp(self, x)
    }
    fn exp_pair(
        &mut self,
        a: FloatValue<'ctx>,
        b: FloatValue<'ctx>,
    ) -> (FloatValue<'ctx>, FloatValue<'ctx>) {
        // Both in one two-lane exponential.
        let e = Fb::vexp(self, self.pack(&[a, b]));
        let e = self.unpack(e);
        (e[0], e[1])
    }
    fn silu(&mut self, x: FloatValue<'ctx>) -> FloatValue<'ctx> {
        let v = Fb::vsilu(self, self.pack(&[x]));
        self.unpack(v)[0]
    }
    fn cos_sin(&mut self, x: FloatValue<'ctx>) -> (FloatValue<'ctx>, FloatValue<'ctx>) {
        cos_sin(self, x)
    }

    fn vsplat(&mut self, v: FloatValue<'ctx>) -> VectorValue<'ctx> {
        Fb::vsplat(self, v)
    }
    fn vadd(&mut self, a: VectorValue<'ctx>, b: VectorValue<'ctx>) -> VectorValue<'ctx> {
        Fb::fadd(self, a, b)
    }
    fn vmul(&mut self, a: VectorValue<'ctx>, b: VectorValue<'ctx>) -> VectorValue<'ctx> {
        Fb::fmul(self, a, b)
    }
    fn vdiv(&mut self, a: VectorValue<'ctx>, b: VectorValue<'ctx>) -> VectorValue<'ctx> {
        Fb::fdiv(self, a, b)
    }
    fn vfma(
        &mut self,
        a: VectorValue<'ctx>,
        b: VectorValue<'ctx>,
        c: VectorValue<'ctx>,
    ) -> VectorValue<'ctx> {
        Fb::vfma(self, a, b, c)
    }
    fn vsilu(&mut self, x: VectorValue<'ctx>) -> VectorValue<'ctx> {
        Fb::vsilu(self, x)
    }
    fn vsub(&mut self, a: VectorValue<'ctx>, b: VectorValue<'ctx>) -> VectorValue<'ctx> {
        Fb::fsub(self, a, b)
    }
    fn vexp(&mut self, x: VectorValue<'ctx>) -> VectorValue<'ctx> {
        Fb::vexp(self, x)
    }
    fn hsum(&mut self, v: VectorValue<'ctx>) -> FloatValue<'ctx> {
        Fb::hsum(self, v)
    }
    fn hmax(&mut self, v: VectorValue<'ctx>) -> FloatValue<'ctx> {
        Fb::hmax(self, v)
    }

    fn dot(
        &mut self,
        x: PointerValue<'ctx>,
        w: PointerValue<'ctx>,
        dt: DType,
        k: usize,
    ) -> FloatValue<'ctx> {
        Fb::dot(self, x, w, dt, k)
    }
    fn item_lane(&mut self) -> Option<(IntValue<'ctx>, usize)> {
        crate::gpu_gemm::row_lane(self)
    }
    fn item_parts<R>(
        &mut self,
        f: impl FnOnce(&mut Self, Option<(IntValue<'ctx>, usize)>) -> R,
    ) -> R {
        crate::gpu_parts::item_parts(self, f)
    }
    fn parts_max(&mut self, x: FloatValue<'ctx>) -> FloatValue<'ctx> {
        crate::gpu_parts::reduce(self, x.into(), crate::gpu_parts::Meet::Max).into_float_value()
    }
    fn parts_sum(&mut self, x: FloatValue<'ctx>) -> FloatValue<'ctx> {
        crate::gpu_parts::reduce(self, x.into(), crate::gpu_parts::Meet::Sum).into_float_value()
    }
    fn parts_sum_vec(&mut self, x: VectorValue<'ctx>) -> VectorValue<'ctx> {
        crate::gpu_parts::reduce(self, x.into(), crate::gpu_parts::Meet::Sum).into_vector_value()
    }
    fn alone<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        let share = std::mem::replace(&mut self.share, crate::fb::ItemShare::One);
        let r = f(self);
        self.share = share;
        r
    }
    fn share_sum(&mut self, x: FloatValue<'ctx>) -> FloatValue<'ctx> {
        match crate::gpu_gemm::row_lane(self) {
            Some(_) if self.flavor.is_gpu() => crate::gpu_gemm::item_sum(self, x),
            _ => x,
        }
    }
    fn matmul_columns(
        &mut self,
        mm: MatMul<IntValue<'ctx>>,
        x: PointerValue<'ctx>,
        w: &[PointerValue<'ctx>],
        out: PointerValue<'ctx>,
        n: usize,
        item: IntValue<'ctx>,
    ) {
        crate::gemm::columns(self, mm, x, w, out, n, item)
    }
}

impl<'ctx> EntryBuilder for Fb<'_, 'ctx> {
    type Func = FunctionValue<'ctx>;

    fn return_if(&mut self, cond: IntValue<'ctx>, code: i32) {
        let i32t = self.cx.i32_type();
        self.when(cond, |fb| {
            fb.b.build_return(Some(&i32t.const_int(code as u64, true)))
                .expect(BUG);
            // Code after a return is unreachable; give the builder a fresh block to continue in.
            let dead = fb.cx.append_basic_block(fb.f, "dead");
            fb.b.position_at_end(dead);
        });
    }
    fn return_(&mut self, code: i32) {
        let c = self.cx.i32_type().const_int(code as u64, true);
        self.b.build_return(Some(&c)).expect(BUG);
    }
    fn parallel_for(
        &mut self,
        pf: PointerValue<'ctx>,
        pool: PointerValue<'ctx>,
        kernel: FunctionValue<'ctx>,
        args: PointerValue<'ctx>,
        n: IntValue<'ctx>,
    ) {
        let ptr = self.cx.ptr_type(AddressSpace::default());
        let ty = self.cx.void_type().fn_type(
            &[ptr.into(), ptr.into(), ptr.into(), self.i64t().into()],
            false,
        );
        let kernel = kernel.as_global_value().as_pointer_value();
        self.b
            .build_indirect_call(
                ty,
                pf,
                &[pool.into(), kernel.into(), args.into(), n.into()],
                "",
            )
            .expect(BUG);
    }

    fn collective(
        &mut self,
        f: PointerValue<'ctx>,
        ctx: PointerValue<'ctx>,
        op: u64,
        args: PointerValue<'ctx>,
        n: IntValue<'ctx>,
    ) {
        let ptr = self.cx.ptr_type(AddressSpace::default());
        let i64t = self.i64t();
        let ty = self
            .cx
            .void_type()
            .fn_type(&[ptr.into(), i64t.into(), ptr.into(), i64t.into()], false);
        let op = i64t.const_int(op, false);
        self.b
            .build_indirect_call(ty, f, &[ctx.into(), op.into(), args.into(), n.into()], "")
            .expect(BUG);
    }
}

/// `(cos x, sin x)` of an f32 angle. CPUs call LLVM's `cos`/`sin` (libm, correctly reduced for large
/// angles); GPUs reduce the angle modulo 2π in f64 and use the hardware's approximations on [-π, π]
/// (emulated on a CPU: libm on the reduced angle).
fn cos_sin<'ctx>(fb: &Fb<'_, 'ctx>, x: FloatValue<'ctx>) -> (FloatValue<'ctx>, FloatValue<'ctx>) {
    let f32t = fb.f32t().into();
    match fb.flavor {
        Flavor::Cpu { .. } => (
            fb.intrinsic("llvm.cos", f32t, &[x.into()])
                .into_float_value(),
            fb.intrinsic("llvm.sin", f32t, &[x.into()])
                .into_float_value(),
        ),
        Flavor::Gpu { .. } | Flavor::GpuOnCpu { .. } => {
            let f64t = fb.cx.f64_type();
            let xd = fb.b.build_float_ext(x, f64t, "").expect(BUG);
            let tau = f64t.const_float(std::f64::consts::TAU);
            let turns = Fb::fdiv(fb, xd, tau);
            let turns = fb
                .intrinsic("llvm.round", f64t.into(), &[turns.into()])
                .into_float_value();
            let r = Fb::fsub(fb, xd, Fb::fmul(fb, turns, tau));
            let r = fb.b.build_float_trunc(r, fb.f32t(), "").expect(BUG);
            if matches!(fb.flavor, Flavor::GpuOnCpu { .. }) {
                return (
                    fb.intrinsic("llvm.cos", f32t, &[r.into()])
                        .into_float_value(),
                    fb.intrinsic("llvm.sin", f32t, &[r.into()])
                        .into_float_value(),
                );
            }
            let call = |name: &str| {
                let f = fb.m.get_function(name).unwrap_or_else(|| {
                    fb.m.add_function(name, fb.f32t().fn_type(&[fb.f32t().into()], false), None)
                });
                fb.call(f, &[r.into()]).into_float_value()
            };
            (
                call("llvm.nvvm.cos.approx.f"),
                call("llvm.nvvm.sin.approx.f"),
            )
        }
    }
}
