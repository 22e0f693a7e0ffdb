//! Cranelift's implementation of [`KernelBuilder`] and [`EntryBuilder`]: 128-bit vectors (f32x4), bf16
//! widened by `uload16x4` and a shift, `e^x` inline, libm for `sin`/`cos`. The matrix products are in
//! `gemm.rs`.

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::types::{F32, F32X4, I32, I32X4, I64, I8};
use cranelift_codegen::ir::{
    Block, FuncRef, InstBuilder, MemFlagsData, SigRef, StackSlotData, StackSlotKind, Type, Value,
};
use cranelift_frontend::{FunctionBuilder, Variable};
use q3c_ir::DType;
use q3c_kernels::{EntryBuilder, KernelBuilder, MatMul};

use crate::gemm;

/// Imported libm functions, declared in the function being built.
#[derive(Clone, Copy)]
pub struct Libm {
    pub cosf: FuncRef,
    pub sinf: FuncRef,
}

/// A function under construction plus what every kernel needs.
pub struct Emit<'a, 'b> {
    pub b: &'a mut FunctionBuilder<'b>,
    /// The CPU has fused multiply-add.
    pub fma: bool,
    /// `cosf`/`sinf` (kernels that rotate); `None` in `q3c_forward`.
    pub libm: Option<Libm>,
    /// The signature of the runtime's `parallel_for`, and of its `collective` (four 64-bit words, no
    /// result; in `q3c_forward` only).
    pub parallel_for: Option<SigRef>,
}

/// Loads that may be unaligned and never trap (pointers come from the runtime, already checked).
pub fn mem() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

/// A loop opened by [`KernelBuilder::loop_begin`].
pub struct Loop {
    var: Variable,
    i: Value,
    header: Block,
    exit: Block,
}

impl Emit<'_, '_> {
    pub fn load_f32_at(&mut self, ptr: Value, offset: i32) -> Value {
        self.b.ins().load(F32, mem(), ptr, offset)
    }

    pub fn store_at(&mut self, v: Value, ptr: Value, offset: i32) {
        self.b.ins().store(mem(), v, ptr, offset);
    }

    /// One weight element at `ptr + offset`, widened to f32 (for q8, the signed byte).
    pub fn load_weight_at(&mut self, dtype: DType, ptr: Value, offset: i32) -> Value {
        match dtype {
            DType::Q8 => {
                let q = self.b.ins().sload8(I32, mem(), ptr, offset);
                self.b.ins().fcvt_from_sint(F32, q)
            }
            DType::BF16 => {
                let bits = self.b.ins().uload16(I32, mem(), ptr, offset);
                let bits = self.b.ins().ishl_imm_u(bits, 16);
                self.b.ins().bitcast(F32, MemFlagsData::new(), bits)
            }
            DType::F16 => {
                let bits = self.b.ins().uload16(I32, mem(), ptr, offset);
                self.f16_bits_to_f32(bits, I32, F32)
            }
            _ => self.load_f32_at(ptr, offset),
        }
    }

    /// A constant of integer type `ty` (a scalar or a splat vector).
    fn int_const(&mut self, ty: Type, v: i64) -> Value {
        if ty.is_vector() {
            let c = self.b.ins().iconst(ty.lane_type(), v);
            self.b.ins().splat(ty, c)
        } else {
            self.b.ins().iconst(ty, v)
        }
    }

    /// IEEE half-precision bits (zero-extended into `int`, I32 or I32X4) as `float` (F32 or F32X4), exactly:
    /// exponent and mantissa moved into place and scaled by 2^112 (right for normal and subnormal values
    /// alike), infinities and NaNs given the f32 exponent, the sign put back.
    fn f16_bits_to_f32(&mut self, h: Value, int: Type, float: Type) -> Value {
        let le = MemFlagsData::new().with_endianness(cranelift_codegen::ir::Endianness::Little);
        let (mag_mask, exp_mask, sign_mask) = (
            self.int_const(int, 0x7fff),
            self.int_const(int, 0x7c00),
            self.int_const(int, 0x8000),
        );
        let mag = self.b.ins().band(h, mag_mask);
        let mag = self.b.ins().ishl_imm_u(mag, 13);
        let f = self.b.ins().bitcast(float, le, mag);
        let scale = self.b.ins().f32const(2f32.powi(112));
        let scale = if float.is_vector() {
            self.b.ins().splat(float, scale)
        } else {
            scale
        };
        let f = self.b.ins().fmul(f, scale);
        let bits = self.b.ins().bitcast(int, le, f);
        let exp = self.b.ins().band(h, exp_mask);
        let special = self.b.ins().icmp(IntCC::Equal, exp, exp_mask);
        let special = if int.is_vector() {
            special
        } else {
            let zero = self.b.ins().iconst(int, 0);
            let ones = self.b.ins().iconst(int, -1);
            self.b.ins().select(special, ones, zero)
        };
        let inf = self.int_const(int, 0x7f80_0000);
        let inf = self.b.ins().band(special, inf);
        let bits = self.b.ins().bor(bits, inf);
        let sign = self.b.ins().band(h, sign_mask);
        let sign = self.b.ins().ishl_imm_u(sign, 16);
        let bits = self.b.ins().bor(bits, sign);
        self.b.ins().bitcast(float, le, bits)
    }

    /// An f32 rounded to IEEE half precision (to nearest even; overflow to infinity, NaN kept a quiet NaN,
    /// subnormals exact), as bits in the low 16 of an I32 (F. Giesen's `float_to_half_fast3_rtne`).
    /// The bf16 bits (low half of an I32) of `x` rounded to nearest even; a NaN stays a (quiet) NaN.
    fn f32_to_bf16_bits(&mut self, x: Value) -> Value {
        let bits = self.b.ins().bitcast(I32, MemFlagsData::new(), x);
        let lsb = self.b.ins().ushr_imm_u(bits, 16);
        let lsb = self.b.ins().band_imm_u(lsb, 1);
        let rounded = self.b.ins().iadd_imm_u(bits, 0x7fff);
        let rounded = self.b.ins().iadd(rounded, lsb);
        let rounded = self.b.ins().ushr_imm_u(rounded, 16);
        let magnitude = self.b.ins().band_imm_u(bits, 0x7fff_ffff);
        let nan = self
            .b
            .ins()
            .icmp_imm_u(IntCC::UnsignedGreaterThan, magnitude, 0x7f80_0000);
        let quiet = self.b.ins().ushr_imm_u(bits, 16);
        let quiet = self.b.ins().bor_imm_u(quiet, 0x40);
        self.b.ins().select(nan, quiet, rounded)
    }

    fn f32_to_f16_bits(&mut self, x: Value) -> Value {
        let bits = self.b.ins().bitcast(I32, MemFlagsData::new(), x);
        let sign = self.b.ins().band_imm_u(bits, 0x8000_0000);
        let a = self.b.ins().bxor(bits, sign);
        // Too large for f16: infinity, or a quiet NaN.
        let nan = self
            .b
            .ins()
            .icmp_imm_u(IntCC::UnsignedGreaterThan, a, 0x7f80_0000);
        let (qnan, inf) = (
            self.b.ins().iconst(I32, 0x7e00),
            self.b.ins().iconst(I32, 0x7c00),
        );
        let big_bits = self.b.ins().select(nan, qnan, inf);
        // Subnormal in f16: the float addition rounds the mantissa into place.
        let magic = ((127 - 15) + (23 - 10) + 1) << 23;
        let af = self.b.ins().bitcast(F32, MemFlagsData::new(), a);
        let mf = self.b.ins().f32const(f32::from_bits(magic as u32));
        let sum = self.b.ins().fadd(af, mf);
        let sum = self.b.ins().bitcast(I32, MemFlagsData::new(), sum);
        let small_bits = self.b.ins().iadd_imm_u(sum, -(magic as i64));
        // Normal: rebias the exponent and round to nearest even on bit 13.
        let odd = self.b.ins().ushr_imm_u(a, 13);
        let odd = self.b.ins().band_imm_u(odd, 1);
        let rebias = self
            .b
            .ins()
            .iadd_imm_u(a, (((15 - 127) << 23) + 0xfff) as i64);
        let rounded = self.b.ins().iadd(rebias, odd);
        let normal_bits = self.b.ins().ushr_imm_u(rounded, 13);
        let big = self
            .b
            .ins()
            .icmp_imm_u(IntCC::UnsignedGreaterThanOrEqual, a, (127 + 16) << 23);
        let small = self
            .b
            .ins()
            .icmp_imm_u(IntCC::UnsignedLessThan, a, 113 << 23);
        let o = self.b.ins().select(small, small_bits, normal_bits);
        let o = self.b.ins().select(big, big_bits, o);
        let sign = self.b.ins().ushr_imm_u(sign, 16);
        self.b.ins().bor(o, sign)
    }

    /// An f32 as a q8 element (an i32 holding the signed byte): rounded to nearest even, held to ±127 (a NaN
    /// becomes 0).
    fn q8_byte(&mut self, v: Value) -> Value {
        let r = self.b.ins().nearest(v);
        let hi = self.b.ins().f32const(127.0);
        let lo = self.b.ins().f32const(-127.0);
        let r = self.b.ins().fmin(r, hi);
        let r = self.b.ins().fmax(r, lo);
        self.b.ins().fcvt_to_sint_sat(I32, r)
    }

    /// Four consecutive weight elements widened to f32x4.
    pub fn load_weight4(&mut self, dtype: DType, ptr: Value, offset: i32) -> Value {
        match dtype {
            DType::Q8 => {
                // Eight bytes as i16x8 (sign-extended), the low four of them as i32x4.
                let wide = self.b.ins().sload8x8(mem(), ptr, offset);
                let wide = self.b.ins().swiden_low(wide);
                self.b.ins().fcvt_from_sint(F32X4, wide)
            }
            DType::BF16 => {
                let wide = self.b.ins().uload16x4(mem(), ptr, offset);
                let bits = self.b.ins().ishl_imm_u(wide, 16);
                self.b.ins().bitcast(
                    F32X4,
                    MemFlagsData::new().with_endianness(cranelift_codegen::ir::Endianness::Little),
                    bits,
                )
            }
            DType::F16 => {
                let wide = self.b.ins().uload16x4(mem(), ptr, offset);
                self.f16_bits_to_f32(wide, I32X4, F32X4)
            }
            _ => self.b.ins().load(F32X4, mem(), ptr, offset),
        }
    }

    /// `a * b + c` on f32 or f32x4 (a fused multiply-add where the CPU has one).
    pub fn madd(&mut self, a: Value, b: Value, c: Value) -> Value {
        if self.fma {
            self.b.ins().fma(a, b, c)
        } else {
            let p = self.b.ins().fmul(a, b);
            self.b.ins().fadd(p, c)
        }
    }

    pub fn hsum(&mut self, v: Value) -> Value {
        let lanes: Vec<Value> = (0..4u8).map(|l| self.b.ins().extractlane(v, l)).collect();
        let a = self.b.ins().fadd(lanes[0], lanes[1]);
        let c = self.b.ins().fadd(lanes[2], lanes[3]);
        self.b.ins().fadd(a, c)
    }

    pub fn call1(&mut self, f: FuncRef, x: Value) -> Value {
        let call = self.b.ins().call(f, &[x]);
        self.b.inst_results(call)[0]
    }

    /// `e^x` of an f32, through [`Emit::exp4`] (no call, so nothing live is spilled around it).
    pub fn expf(&mut self, x: Value) -> Value {
        let v = self.b.ins().splat(F32X4, x);
        let e = self.exp4(v);
        self.b.ins().extractlane(e, 0)
    }

    /// `silu(x) = x / (1 + e^-x)` of an f32, through [`Emit::silu4`].
    pub fn silu1(&mut self, x: Value) -> Value {
        let v = self.b.ins().splat(F32X4, x);
        let y = self.silu4(v);
        self.b.ins().extractlane(y, 0)
    }

    /// `silu` on f32x4.
    pub fn silu4(&mut self, x: Value) -> Value {
        let neg = self.b.ins().fneg(x);
        let ex = self.exp4(neg);
        let one = self.b.ins().f32const(1.0);
        let one = self.b.ins().splat(F32X4, one);
        let den = self.b.ins().fadd(one, ex);
        self.b.ins().fdiv(x, den)
    }

    /// `e^x` on f32x4, inline: Cephes' reduction `x = n·ln 2 + r` with `n` rounded to nearest (the
    /// 1.5·2²³ trick), a degree-6 polynomial for `e^r`, and `2^n` built in the exponent bits. Inputs are
    /// clamped to [-87.3, 88.3]; the relative error is about 2e-7 (checked against `f32::exp` in the tests).
    pub fn exp4(&mut self, x: Value) -> Value {
        let splat = |e: &mut Self, c: f32| {
            let s = e.b.ins().f32const(c);
            e.b.ins().splat(F32X4, s)
        };
        let (hi, lo) = (splat(self, 88.3), splat(self, -87.3));
        let x = self.b.ins().fmin(x, hi);
        let x = self.b.ins().fmax(x, lo);
        let (log2e, magic) = (
            splat(self, std::f32::consts::LOG2_E),
            splat(self, 12_582_912.0),
        );
        let t = self.madd(x, log2e, magic);
        let n = self.b.ins().fsub(t, magic);
        // r = x − n·ln 2, with ln 2 in two parts for precision.
        let (c1, c2) = (splat(self, -0.693_359_4), splat(self, 2.121_944_4e-4));
        let r = self.madd(n, c1, x);
        let r = self.madd(n, c2, r);
        let mut p = splat(self, 1.987_569_2e-4);
        for c in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
            let c = splat(self, c);
            p = self.madd(p, r, c);
        }
        let r2 = self.b.ins().fmul(r, r);
        let y = self.madd(p, r2, r);
        let one = splat(self, 1.0);
        let y = self.b.ins().fadd(y, one);
        // 2^n: n + 127 in the exponent field.
        let n = self.b.ins().fcvt_to_sint_sat(I32X4, n);
        let bias = self.b.ins().iconst(I32, 127);
        let bias = self.b.ins().splat(I32X4, bias);
        let n = self.b.ins().iadd(n, bias);
        let bits = self.b.ins().ishl_imm_u(n, 23);
        let pow2 = self.b.ins().bitcast(
            F32X4,
            MemFlagsData::new().with_endianness(cranelift_codegen::ir::Endianness::Little),
            bits,
        );
        self.b.ins().fmul(y, pow2)
    }
}

impl KernelBuilder for Emit<'_, '_> {
    type Int = Value;
    type Bool = Value;
    type Ptr = Value;
    type F32 = Value;
    type Vec = Value;
    type Var = Variable;
    type Loop = Loop;
    type If = Block;

    fn lanes(&self) -> usize {
        4
    }

    fn iconst(&mut self, v: usize) -> Value {
        self.b.ins().iconst(I64, v as i64)
    }
    fn add(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().iadd(a, b)
    }
    fn sub(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().isub(a, b)
    }
    fn mul_c(&mut self, a: Value, c: usize) -> Value {
        self.b.ins().imul_imm_u(a, c as i64)
    }
    fn udiv_c(&mut self, a: Value, c: usize) -> Value {
        let c = self.iconst(c);
        self.b.ins().udiv(a, c)
    }
    fn urem_c(&mut self, a: Value, c: usize) -> Value {
        let c = self.iconst(c);
        self.b.ins().urem(a, c)
    }
    fn udiv(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().udiv(a, b)
    }
    fn urem(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().urem(a, b)
    }
    fn ult(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().icmp(IntCC::UnsignedLessThan, a, b)
    }
    fn ieq(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().icmp(IntCC::Equal, a, b)
    }
    fn fgt(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fcmp(FloatCC::GreaterThan, a, b)
    }
    fn and(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().band(a, b)
    }
    fn or(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().bor(a, b)
    }
    fn not(&mut self, a: Value) -> Value {
        // Comparisons give 0 or 1.
        self.b.ins().bxor_imm_u(a, 1)
    }
    fn false_(&mut self) -> Value {
        self.b.ins().iconst(I8, 0)
    }
    fn select_int(&mut self, c: Value, a: Value, b: Value) -> Value {
        self.b.ins().select(c, a, b)
    }
    fn select_f32(&mut self, c: Value, a: Value, b: Value) -> Value {
        self.b.ins().select(c, a, b)
    }
    fn int_to_f32(&mut self, a: Value) -> Value {
        self.b.ins().fcvt_from_uint(F32, a)
    }
    fn off(&mut self, base: Value, bytes: usize) -> Value {
        if bytes == 0 {
            return base;
        }
        self.b.ins().iadd_imm_u(base, bytes as i64)
    }
    fn addr(&mut self, base: Value, index: Value, stride: usize) -> Value {
        let off = self.b.ins().imul_imm_u(index, stride as i64);
        self.b.ins().iadd(base, off)
    }

    fn load_i64(&mut self, p: Value) -> Value {
        self.b.ins().load(I64, mem(), p, 0)
    }
    fn load_ptr(&mut self, p: Value) -> Value {
        self.b.ins().load(I64, mem(), p, 0)
    }
    fn load_i32(&mut self, p: Value) -> Value {
        let v = self.b.ins().load(I32, mem(), p, 0);
        self.b.ins().sextend(I64, v)
    }
    fn load_f32(&mut self, p: Value) -> Value {
        self.load_f32_at(p, 0)
    }
    fn load_weight(&mut self, dt: DType, p: Value) -> Value {
        self.load_weight_at(dt, p, 0)
    }
    fn store_f32(&mut self, v: Value, p: Value) {
        self.store_at(v, p, 0);
    }
    fn store_i32(&mut self, v: Value, p: Value) {
        let v = self.b.ins().ireduce(I32, v);
        self.store_at(v, p, 0);
    }
    fn store_i64(&mut self, v: Value, p: Value) {
        self.store_at(v, p, 0);
    }
    fn store_ptr(&mut self, v: Value, p: Value) {
        self.store_at(v, p, 0);
    }
    fn vload(&mut self, p: Value) -> Value {
        self.b.ins().load(F32X4, mem(), p, 0)
    }
    fn vload_weight(&mut self, dt: DType, p: Value) -> Value {
        self.load_weight4(dt, p, 0)
    }
    fn vstore(&mut self, v: Value, p: Value) {
        self.store_at(v, p, 0);
    }
    fn store_as(&mut self, dt: DType, v: Value, p: Value) {
        match dt {
            DType::Q8 => {
                let q = self.q8_byte(v);
                self.b.ins().istore8(mem(), q, p, 0);
            }
            DType::F16 => {
                let h = self.f32_to_f16_bits(v);
                self.b.ins().istore16(mem(), h, p, 0);
            }
            DType::BF16 => {
                let h = self.f32_to_bf16_bits(v);
                self.b.ins().istore16(mem(), h, p, 0);
            }
            _ => self.store_at(v, p, 0),
        }
    }
    fn vstore_as(&mut self, dt: DType, v: Value, p: Value) {
        match dt {
            DType::Q8 => {
                for lane in 0..4u8 {
                    let x = self.b.ins().extractlane(v, lane);
                    let q = self.q8_byte(x);
                    self.b.ins().istore8(mem(), q, p, i32::from(lane));
                }
            }
            DType::F16 | DType::BF16 => {
                for lane in 0..4u8 {
                    let x = self.b.ins().extractlane(v, lane);
                    let h = match dt {
                        DType::F16 => self.f32_to_f16_bits(x),
                        _ => self.f32_to_bf16_bits(x),
                    };
                    self.b.ins().istore16(mem(), h, p, 2 * i32::from(lane));
                }
            }
            _ => self.store_at(v, p, 0),
        }
    }
    fn stack(&mut self, bytes: usize) -> Value {
        let slot = self.b.create_sized_stack_slot(StackSlotData::new(
            StackSlotKind::ExplicitSlot,
            bytes.next_multiple_of(64) as u32,
            6,
        ));
        self.b.ins().stack_addr(I64, slot, 0)
    }

    fn var_int(&mut self, init: Value) -> Variable {
        let v = self.b.declare_var(I64);
        self.b.def_var(v, init);
        v
    }
    fn var_f32(&mut self, init: Value) -> Variable {
        let v = self.b.declare_var(F32);
        self.b.def_var(v, init);
        v
    }
    fn var_vec(&mut self, init: Value) -> Variable {
        let v = self.b.declare_var(F32X4);
        self.b.def_var(v, init);
        v
    }
    fn get_int(&mut self, v: Variable) -> Value {
        self.b.use_var(v)
    }
    fn get_f32(&mut self, v: Variable) -> Value {
        self.b.use_var(v)
    }
    fn get_vec(&mut self, v: Variable) -> Value {
        self.b.use_var(v)
    }
    fn set_int(&mut self, v: Variable, x: Value) {
        self.b.def_var(v, x);
    }
    fn set_f32(&mut self, v: Variable, x: Value) {
        self.b.def_var(v, x);
    }
    fn set_vec(&mut self, v: Variable, x: Value) {
        self.b.def_var(v, x);
    }

    fn loop_begin(&mut self, start: Value, end: Value) -> (Value, Loop) {
        let (header, body, exit) = (
            self.b.create_block(),
            self.b.create_block(),
            self.b.create_block(),
        );
        let var = self.b.declare_var(I64);
        self.b.def_var(var, start);
        self.b.ins().jump(header, &[]);
        self.b.switch_to_block(header);
        let i = self.b.use_var(var);
        let more = self.b.ins().icmp(IntCC::UnsignedLessThan, i, end);
        self.b.ins().brif(more, body, &[], exit, &[]);
        self.b.switch_to_block(body);
        (
            i,
            Loop {
                var,
                i,
                header,
                exit,
            },
        )
    }
    fn loop_end(&mut self, l: Loop, step: usize) {
        let next = self.b.ins().iadd_imm_s(l.i, step as i64);
        self.b.def_var(l.var, next);
        self.b.ins().jump(l.header, &[]);
        self.b.switch_to_block(l.exit);
    }
    fn if_begin(&mut self, cond: Value) -> Block {
        let (then, done) = (self.b.create_block(), self.b.create_block());
        self.b.ins().brif(cond, then, &[], done, &[]);
        self.b.switch_to_block(then);
        done
    }
    fn if_end(&mut self, done: Block) {
        self.b.ins().jump(done, &[]);
        self.b.switch_to_block(done);
    }

    fn fconst(&mut self, v: f32) -> Value {
        self.b.ins().f32const(v)
    }
    fn fadd(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fadd(a, b)
    }
    fn fsub(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fsub(a, b)
    }
    fn fmul(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fmul(a, b)
    }
    fn fdiv(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fdiv(a, b)
    }
    fn fmax(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fmax(a, b)
    }
    fn fma(&mut self, a: Value, b: Value, c: Value) -> Value {
        self.madd(a, b, c)
    }
    fn sqrt(&mut self, a: Value) -> Value {
        self.b.ins().sqrt(a)
    }
    fn exp(&mut self, x: Value) -> Value {
        self.expf(x)
    }
    fn exp_pair(&mut self, a: Value, b: Value) -> (Value, Value) {
        // Both in one f32x4 exponential.
        let v = self.b.ins().splat(F32X4, a);
        let v = self.b.ins().insertlane(v, b, 1);
        let e = self.exp4(v);
        (
            self.b.ins().extractlane(e, 0),
            self.b.ins().extractlane(e, 1),
        )
    }
    fn silu(&mut self, x: Value) -> Value {
        self.silu1(x)
    }
    fn cos_sin(&mut self, x: Value) -> (Value, Value) {
        let libm = self.libm.expect("a rotating kernel is built with libm");
        (self.call1(libm.cosf, x), self.call1(libm.sinf, x))
    }

    fn vsplat(&mut self, v: Value) -> Value {
        self.b.ins().splat(F32X4, v)
    }
    fn vadd(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fadd(a, b)
    }
    fn vmul(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fmul(a, b)
    }
    fn vdiv(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fdiv(a, b)
    }
    fn vfma(&mut self, a: Value, b: Value, c: Value) -> Value {
        self.madd(a, b, c)
    }
    fn vsilu(&mut self, x: Value) -> Value {
        self.silu4(x)
    }
    fn vsub(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fsub(a, b)
    }
    fn vexp(&mut self, x: Value) -> Value {
        self.exp4(x)
    }
    fn hsum(&mut self, v: Value) -> Value {
        Emit::hsum(self, v)
    }
    fn hmax(&mut self, v: Value) -> Value {
        let lanes: Vec<Value> = (0..4u8).map(|l| self.b.ins().extractlane(v, l)).collect();
        let a = self.b.ins().fmax(lanes[0], lanes[1]);
        let c = self.b.ins().fmax(lanes[2], lanes[3]);
        self.b.ins().fmax(a, c)
    }

    fn dot(&mut self, x: Value, w: Value, dt: DType, k: usize) -> Value {
        gemm::dot(self, x, w, dt, k)
    }
    fn matmul_columns(
        &mut self,
        mm: MatMul<Value>,
        x: Value,
        w: &[Value],
        out: Value,
        n: usize,
        item: Value,
    ) {
        gemm::columns(self, mm, x, w, out, n, item)
    }
}

impl EntryBuilder for Emit<'_, '_> {
    type Func = FuncRef;

    fn return_if(&mut self, cond: Value, code: i32) {
        let (fail, go_on) = (self.b.create_block(), self.b.create_block());
        self.b.ins().brif(cond, fail, &[], go_on, &[]);
        self.b.switch_to_block(fail);
        self.return_(code);
        self.b.switch_to_block(go_on);
    }
    fn return_(&mut self, code: i32) {
        let c = self.b.ins().iconst(I32, i64::from(code));
        self.b.ins().return_(&[c]);
    }
    fn parallel_for(&mut self, pf: Value, pool: Value, kernel: FuncRef, args: Value, n: Value) {
        let sig = self
            .parallel_for
            .expect("q3c_forward is built with parallel_for's signature");
        let kernel = self.b.ins().func_addr(I64, kernel);
        self.b
            .ins()
            .call_indirect(sig, pf, &[pool, kernel, args, n]);
    }
    fn collective(&mut self, f: Value, ctx: Value, op: u64, args: Value, n: Value) {
        let sig = self
            .parallel_for
            .expect("q3c_forward is built with parallel_for's signature");
        let op = self.b.ins().iconst(I64, op as i64);
        self.b.ins().call_indirect(sig, f, &[ctx, op, args, n]);
    }
}

#[cfg(test)]
mod tests {
    use cranelift_codegen::ir::{AbiParam, UserFuncName};
    use cranelift_frontend::FunctionBuilderContext;
    use cranelift_module::{Linkage, Module};

    use super::*;

    /// JIT-compiles `f(x) = e^x` through [`Emit::expf`].
    fn jit_exp() -> (cranelift_jit::JITModule, extern "C" fn(f32) -> f32) {
        jit_f32(|e, x| e.expf(x))
    }

    /// JIT-compiles `f(x) = body(x)` for an f32 `x`.
    fn jit_f32(
        body: impl FnOnce(&mut Emit, Value) -> Value,
    ) -> (cranelift_jit::JITModule, extern "C" fn(f32) -> f32) {
        let isa = crate::module::isa("native", false).unwrap();
        let fma = crate::module::has_fma(&*isa);
        let builder =
            cranelift_jit::JITBuilder::with_isa(isa, cranelift_module::default_libcall_names());
        let mut module = cranelift_jit::JITModule::new(builder);
        let mut sig = module.make_signature();
        sig.params.push(AbiParam::new(F32));
        sig.returns.push(AbiParam::new(F32));
        let id = module
            .declare_function("exp", Linkage::Local, &sig)
            .unwrap();
        let libm = module
            .declare_function("cosf", Linkage::Import, &sig)
            .unwrap();
        let mut ctx = module.make_context();
        ctx.func.signature = sig;
        ctx.func.name = UserFuncName::user(0, id.as_u32());
        let cos = module.declare_func_in_func(libm, &mut ctx.func);
        let mut fctx = FunctionBuilderContext::new();
        let mut b = FunctionBuilder::new(&mut ctx.func, &mut fctx);
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let x = b.block_params(entry)[0];
        let mut e = Emit {
            b: &mut b,
            fma,
            libm: Some(Libm {
                cosf: cos,
                sinf: cos,
            }),
            parallel_for: None,
        };
        let y = body(&mut e, x);
        b.ins().return_(&[y]);
        b.seal_all_blocks();
        b.finalize(module.target_config());
        module.define_function(id, &mut ctx).unwrap();
        module.finalize_definitions().unwrap();
        let code = module.get_finalized_function(id);
        // SAFETY: built above with exactly this signature.
        let f = unsafe { std::mem::transmute::<*const u8, extern "C" fn(f32) -> f32>(code) };
        (module, f)
    }

    #[test]
    fn inline_exp_matches_libm() {
        let (_module, exp) = jit_exp();
        let mut worst = 0f64;
        for i in -8700..=8800 {
            let x = i as f32 / 100.0;
            let want = f64::from(x).exp();
            let rel = ((f64::from(exp(x)) - want) / want).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 5e-7, "worst relative error {worst:e}");
        // Far below the range the result is tiny, not NaN; far above it is large and finite.
        assert!(exp(-1e4) >= 0.0 && exp(-1e4) < 1e-37);
        assert!(exp(1e4).is_finite() && exp(1e4) > 1e38);
    }

    /// `n` pseudo-random 32-bit words (a fixed linear congruential sequence).
    fn random_bits(n: usize) -> impl Iterator<Item = u32> {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        (0..n).map(move |_| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (seed >> 32) as u32
        })
    }

    /// f32 → f16 (as the cache stores it) → f32 (as attention reads it, scalar and 4-lane) against the
    /// `half` crate's conversions: round to nearest even, subnormals, overflow to infinity, NaN kept.
    #[test]
    fn f16_conversions_match_ieee() {
        let (_m1, scalar) = jit_f32(|e, x| {
            let h = e.f32_to_f16_bits(x);
            e.f16_bits_to_f32(h, I32, F32)
        });
        let (_m2, vector) = jit_f32(|e, x| {
            let h = e.f32_to_f16_bits(x);
            let hv = e.b.ins().splat(I32X4, h);
            let v = e.f16_bits_to_f32(hv, I32X4, F32X4);
            e.b.ins().extractlane(v, 2)
        });
        let mut xs: Vec<f32> = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            65504.0,
            65520.0,
            1e6,
            -1e6,
            6.1e-5,
            5.96e-8,
            2.98e-8,
            1e-10,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.333_333_34,
            1.000_976_6,
            1.000_488_3,
            2049.0,
            2051.0,
        ];
        // Exponents around f16's range (subnormals to overflow), any mantissa and sign.
        xs.extend(random_bits(200_000).map(|bits| {
            let exp = 100 + (bits >> 24) % 50;
            f32::from_bits((bits & 0x807f_ffff) | (exp << 23))
        }));
        for x in xs {
            let want = half::f16::from_f32(x).to_f32();
            for (what, got) in [("scalar", scalar(x)), ("vector", vector(x))] {
                assert!(
                    got.to_bits() == want.to_bits(),
                    "{what}: {x:e} ({:#x}) -> {got:e}, want {want:e}",
                    x.to_bits()
                );
            }
        }
        assert!(scalar(f32::NAN).is_nan() && vector(f32::NAN).is_nan());
    }

    /// f32 → bf16 (as the cache stores it) → f32 (as attention reads it) against the `half` crate's
    /// conversions: round to nearest even, overflow to infinity, NaN kept a NaN.
    #[test]
    fn bf16_conversions_match_ieee() {
        let (_m, round_trip) = jit_f32(|e, x| {
            let h = e.f32_to_bf16_bits(x);
            let h = e.b.ins().band_imm_u(h, 0xffff);
            let bits = e.b.ins().ishl_imm_u(h, 16);
            e.b.ins().bitcast(F32, MemFlagsData::new(), bits)
        });
        let mut xs: Vec<f32> = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            f32::MAX,
            -f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1.003_906_3,
            1.011_718_8,
            0.333_333_34,
        ];
        xs.extend(random_bits(200_000).map(f32::from_bits));
        for x in xs.into_iter().filter(|x| !x.is_nan()) {
            let want = half::bf16::from_f32(x).to_f32();
            let got = round_trip(x);
            assert!(
                got.to_bits() == want.to_bits(),
                "{x:e} ({:#x}) -> {got:e}, want {want:e}",
                x.to_bits()
            );
        }
        assert!(round_trip(f32::NAN).is_nan());
        assert!(round_trip(f32::from_bits(0x7f80_0001)).is_nan());
    }
}
