//! `q3c_forward` ([`q3c_kernels::forward`]) and the exported data symbols (manifest, its length, the ABI
//! version).

use inkwell::context::Context;
use inkwell::module::{Linkage, Module};
use inkwell::values::FunctionValue;
use inkwell::AddressSpace;
use q3c_abi::launch::LaunchPlan;
use q3c_abi::{Manifest, ABI_VERSION};
use q3c_backend_common::BackendError;

use crate::fb::{Fb, Flavor};
use crate::module::function_attributes;

/// Builds `int32_t q3c_forward(const q3c_step *step)` over the launch plan; `kernels[i]` is the function of
/// `launch.kernels[i]`.
pub fn build<'ctx>(
    cx: &'ctx Context,
    m: &Module<'ctx>,
    launch: &LaunchPlan,
    kernels: &[FunctionValue<'ctx>],
    max_tokens: usize,
    vocab: usize,
) -> FunctionValue<'ctx> {
    let ptr = cx.ptr_type(AddressSpace::default());
    let f = m.add_function(
        q3c_abi::SYM_FORWARD,
        cx.i32_type().fn_type(&[ptr.into()], false),
        Some(Linkage::External),
    );
    function_attributes(cx, f);
    let flavor = Flavor::Cpu {
        lanes: 4,
        bf16_dot: false,
        tuning: crate::fb::CpuTuning::default(),
    };
    let mut fb = Fb::new(cx, m, f, flavor);
    let step = f.get_nth_param(0).expect("1 param").into_pointer_value();
    q3c_kernels::forward::build(&mut fb, step, launch, kernels, max_tokens, vocab);
    fb.finish();
    f
}

/// Defines the exported constants `q3c_manifest`, `q3c_manifest_len` and `q3c_abi_version`.
pub fn export_manifest<'ctx>(
    cx: &'ctx Context,
    m: &Module<'ctx>,
    manifest: &Manifest,
) -> Result<(), BackendError> {
    let json = serde_json::to_vec(manifest).map_err(|e| BackendError::Internal(e.to_string()))?;
    let bytes = cx.const_string(&json, false);
    let g = m.add_global(bytes.get_type(), None, q3c_abi::SYM_MANIFEST);
    g.set_initializer(&bytes);
    let len = cx.i64_type().const_int(json.len() as u64, false);
    let gl = m.add_global(cx.i64_type(), None, q3c_abi::SYM_MANIFEST_LEN);
    gl.set_initializer(&len);
    let version = cx.i32_type().const_int(u64::from(ABI_VERSION), false);
    let gv = m.add_global(cx.i32_type(), None, q3c_abi::SYM_ABI_VERSION);
    gv.set_initializer(&version);
    for g in [g, gl, gv] {
        g.set_constant(true);
        g.set_linkage(Linkage::External);
        g.set_alignment(8);
    }
    Ok(())
}
