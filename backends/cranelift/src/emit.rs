//! Cranelift building blocks shared by the kernels: counted loops, weight loads with widening,
//! SIMD dot products and libm calls.

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{F32, F32X4, I32, I32X4, I64};
use cranelift_codegen::ir::{FuncRef, InstBuilder, MemFlagsData, Value};
use cranelift_frontend::FunctionBuilder;
use q3c_ir::DType;

/// Imported libm functions, declared in the function being built.
#[derive(Clone, Copy)]
pub struct Libm {
    pub cosf: FuncRef,
    pub sinf: FuncRef,
}

/// A function under construction plus what every kernel needs.
pub struct Emit<'a, 'b> {
    pub b: &'a mut FunctionBuilder<'b>,
    pub fma: bool,
    pub libm: Libm,
}

/// Loads that may be unaligned and never trap (pointers come from the runtime, already checked).
pub fn mem() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

impl Emit<'_, '_> {
    pub fn iconst(&mut self, v: usize) -> Value {
        self.b.ins().iconst(I64, v as i64)
    }

    pub fn fconst(&mut self, v: f32) -> Value {
        self.b.ins().f32const(v)
    }

    /// `base + index * scale` (byte address arithmetic).
    pub fn addr(&mut self, base: Value, index: Value, scale: usize) -> Value {
        let off = self.b.ins().imul_imm_u(index, scale as i64);
        self.b.ins().iadd(base, off)
    }

    /// `for i in (start..end).step_by(step) { body(i) }`.
    pub fn for_range(
        &mut self,
        start: Value,
        end: Value,
        step: usize,
        mut body: impl FnMut(&mut Self, Value),
    ) {
        let header = self.b.create_block();
        let body_blk = self.b.create_block();
        let exit = self.b.create_block();
        let var = self.b.declare_var(I64);
        self.b.def_var(var, start);
        self.b.ins().jump(header, &[]);
        self.b.switch_to_block(header);
        let i = self.b.use_var(var);
        let more = self.b.ins().icmp(IntCC::UnsignedLessThan, i, end);
        self.b.ins().brif(more, body_blk, &[], exit, &[]);
        self.b.switch_to_block(body_blk);
        body(self, i);
        let next = self.b.ins().iadd_imm_s(i, step as i64);
        self.b.def_var(var, next);
        self.b.ins().jump(header, &[]);
        self.b.switch_to_block(exit);
    }

    /// Splits `index` over consecutive ranges ending at `ends` (increasing constants): runs `arm(r, local)`
    /// for the range `r` holding `index`, with `local` its position in that range. Beyond the last range
    /// nothing runs.
    pub fn ranges(
        &mut self,
        index: Value,
        ends: &[usize],
        mut arm: impl FnMut(&mut Self, usize, Value),
    ) {
        let done = self.b.create_block();
        let mut begin = 0;
        for (r, &end) in ends.iter().enumerate() {
            let (body, next) = (self.b.create_block(), self.b.create_block());
            let inside = self
                .b
                .ins()
                .icmp_imm_u(IntCC::UnsignedLessThan, index, end as i64);
            self.b.ins().brif(inside, body, &[], next, &[]);
            self.b.switch_to_block(body);
            let local = self.b.ins().iadd_imm_s(index, -(begin as i64));
            arm(self, r, local);
            self.b.ins().jump(done, &[]);
            self.b.switch_to_block(next);
            begin = end;
        }
        self.b.ins().jump(done, &[]);
        self.b.switch_to_block(done);
    }

    /// `for i in 0..n` with a constant bound.
    pub fn for_n(&mut self, n: usize, body: impl FnMut(&mut Self, Value)) {
        let (zero, end) = (self.iconst(0), self.iconst(n));
        self.for_range(zero, end, 1, body);
    }

    pub fn load_f32(&mut self, ptr: Value, offset: i32) -> Value {
        self.b.ins().load(F32, mem(), ptr, offset)
    }

    pub fn store(&mut self, v: Value, ptr: Value, offset: i32) {
        self.b.ins().store(mem(), v, ptr, offset);
    }

    pub fn load_i32_as_i64(&mut self, ptr: Value, offset: i32) -> Value {
        let v = self.b.ins().load(I32, mem(), ptr, offset);
        self.b.ins().sextend(I64, v)
    }

    /// One weight element at `ptr` (its byte address), widened to f32.
    pub fn load_weight(&mut self, dtype: DType, ptr: Value, offset: i32) -> Value {
        match dtype {
            DType::BF16 => {
                let bits = self.b.ins().uload16(I32, mem(), ptr, offset);
                let bits = self.b.ins().ishl_imm_u(bits, 16);
                self.b.ins().bitcast(F32, MemFlagsData::new(), bits)
            }
            _ => self.load_f32(ptr, offset),
        }
    }

    /// Four consecutive weight elements widened to f32x4.
    pub fn load_weight4(&mut self, dtype: DType, ptr: Value, offset: i32) -> Value {
        match dtype {
            DType::BF16 => {
                let wide = self.b.ins().uload16x4(mem(), ptr, offset);
                let bits = self.b.ins().ishl_imm_u(wide, 16);
                self.b.ins().bitcast(
                    F32X4,
                    MemFlagsData::new().with_endianness(cranelift_codegen::ir::Endianness::Little),
                    bits,
                )
            }
            _ => self.b.ins().load(F32X4, mem(), ptr, offset),
        }
    }

    /// `a * b + c` on f32x4 (a fused multiply-add where the CPU has one).
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

    /// `Σ_k x[k] · w[k]` over `k` constant elements: f32 activations at `x`, weights of `dtype` at `w`.
    /// Four f32x4 accumulators over blocks of 16, then 4-wide and scalar tails, all unrolled.
    pub fn dot(&mut self, x: Value, w: Value, dtype: DType, k: usize) -> Value {
        let ws = if dtype == DType::BF16 { 2 } else { 4 };
        let zero4 = {
            let z = self.fconst(0.0);
            self.b.ins().splat(F32X4, z)
        };
        let accs: Vec<_> = (0..4).map(|_| self.b.declare_var(F32X4)).collect();
        for &a in &accs {
            self.b.def_var(a, zero4);
        }
        let blocks = k / 16;
        if blocks > 0 {
            let accs2 = accs.clone();
            self.for_n(blocks, |e, j| {
                let xb = e.addr(x, j, 64);
                let wb = e.addr(w, j, 16 * ws);
                for (u, &a) in accs2.iter().enumerate() {
                    let xv = e.b.ins().load(F32X4, mem(), xb, (16 * u) as i32);
                    let wv = e.load_weight4(dtype, wb, (u * 4 * ws) as i32);
                    let acc = e.b.use_var(a);
                    let acc = e.madd(xv, wv, acc);
                    e.b.def_var(a, acc);
                }
            });
        }
        let mut done = blocks * 16;
        let mut acc = {
            let a0 = self.b.use_var(accs[0]);
            let a1 = self.b.use_var(accs[1]);
            let a2 = self.b.use_var(accs[2]);
            let a3 = self.b.use_var(accs[3]);
            let s = self.b.ins().fadd(a0, a1);
            let t = self.b.ins().fadd(a2, a3);
            self.b.ins().fadd(s, t)
        };
        while done + 4 <= k {
            let xv = self.b.ins().load(F32X4, mem(), x, (done * 4) as i32);
            let wv = self.load_weight4(dtype, w, (done * ws) as i32);
            acc = self.madd(xv, wv, acc);
            done += 4;
        }
        let mut sum = self.hsum(acc);
        while done < k {
            let xv = self.load_f32(x, (done * 4) as i32);
            let wv = self.load_weight(dtype, w, (done * ws) as i32);
            let p = self.b.ins().fmul(xv, wv);
            sum = self.b.ins().fadd(sum, p);
            done += 1;
        }
        sum
    }

    /// Register-blocked dot products: `out[r][c] = Σ_k x[r][k] · w_c[k]` where row `r` of x starts at
    /// `x + r·x_stride` bytes (f32) and column `c` at `cols[c]` (`dtype`; the columns may come from different
    /// matrices). Each 4-wide step of k loads `rows + cols` vectors and issues `rows · cols` independent FMAs;
    /// a k that is not a multiple of 4 finishes scalar.
    pub fn dot_block(
        &mut self,
        x: Value,
        x_stride: usize,
        rows: usize,
        cols: &[Value],
        dtype: DType,
        k: usize,
    ) -> Vec<Vec<Value>> {
        let ws = if dtype == DType::BF16 { 2 } else { 4 };
        let zero4 = {
            let z = self.fconst(0.0);
            self.b.ins().splat(F32X4, z)
        };
        let accs: Vec<Vec<_>> = (0..rows)
            .map(|_| cols.iter().map(|_| self.b.declare_var(F32X4)).collect())
            .collect();
        for a in accs.iter().flatten() {
            self.b.def_var(*a, zero4);
        }
        let steps = k / 4;
        if steps > 0 {
            self.for_n(steps, |e, j| {
                let xb = e.addr(x, j, 16);
                let w_off = e.b.ins().imul_imm_u(j, (4 * ws) as i64);
                let xv: Vec<Value> = (0..rows)
                    .map(|r| e.b.ins().load(F32X4, mem(), xb, (r * x_stride) as i32))
                    .collect();
                for (c, &col) in cols.iter().enumerate() {
                    let wb = e.b.ins().iadd(col, w_off);
                    let wv = e.load_weight4(dtype, wb, 0);
                    for (row_accs, &xr) in accs.iter().zip(&xv) {
                        let acc = e.b.use_var(row_accs[c]);
                        let acc = e.madd(xr, wv, acc);
                        e.b.def_var(row_accs[c], acc);
                    }
                }
            });
        }
        let mut out = Vec::with_capacity(rows);
        for (r, row_accs) in accs.iter().enumerate() {
            let mut row = Vec::with_capacity(cols.len());
            for (&a, &col) in row_accs.iter().zip(cols) {
                let acc = self.b.use_var(a);
                let mut sum = self.hsum(acc);
                for kk in steps * 4..k {
                    let xv = self.load_f32(x, (r * x_stride + kk * 4) as i32);
                    let wv = self.load_weight(dtype, col, (kk * ws) as i32);
                    let p = self.b.ins().fmul(xv, wv);
                    sum = self.b.ins().fadd(sum, p);
                }
                row.push(sum);
            }
            out.push(row);
        }
        out
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
    pub fn silu(&mut self, x: Value) -> Value {
        let v = self.b.ins().splat(F32X4, x);
        let y = self.silu4(v);
        self.b.ins().extractlane(y, 0)
    }

    /// `silu` on f32x4.
    pub fn silu4(&mut self, x: Value) -> Value {
        let neg = self.b.ins().fneg(x);
        let ex = self.exp4(neg);
        let one = self.fconst(1.0);
        let one = self.b.ins().splat(F32X4, one);
        let den = self.b.ins().fadd(one, ex);
        self.b.ins().fdiv(x, den)
    }

    /// `e^x` on f32x4, inline: Cephes' reduction `x = n·ln 2 + r` with `n` rounded to nearest (the
    /// 1.5·2²³ trick), a degree-6 polynomial for `e^r`, and `2^n` built in the exponent bits. Inputs are
    /// clamped to [-87.3, 88.3]; the relative error is about 2e-7 (checked against `f32::exp` in the tests).
    pub fn exp4(&mut self, x: Value) -> Value {
        let splat = |e: &mut Self, c: f32| {
            let s = e.fconst(c);
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

    /// An f32 stack accumulator: declare, set, read, write through `Variable`s.
    pub fn var_f32(&mut self, init: f32) -> cranelift_frontend::Variable {
        let v = self.b.declare_var(F32);
        let c = self.fconst(init);
        self.b.def_var(v, c);
        v
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
        let isa = crate::module::isa("native", false).unwrap();
        let fma = isa
            .isa_flags()
            .iter()
            .any(|f| f.name == "has_fma" && f.as_bool() == Some(true));
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
            libm: Libm {
                cosf: cos,
                sinf: cos,
            },
        };
        let y = e.expf(x);
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
}
