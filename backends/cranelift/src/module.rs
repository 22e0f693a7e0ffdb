//! Building the object: kernels, the `q3c_forward` entry point, the manifest and the ABI version symbol.

use cranelift_codegen::ir::types::{F32, I32, I64};
use cranelift_codegen::ir::{AbiParam, InstBuilder, Signature, UserFuncName};
use cranelift_codegen::isa::OwnedTargetIsa;
use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::Context;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_module::{DataDescription, FuncId, Linkage, Module};
use cranelift_object::{ObjectBuilder, ObjectModule};
use q3c_abi::launch::LaunchPlan;
use q3c_abi::{Manifest, ABI_VERSION};
use q3c_backend_common::launch::{self, Body};
use q3c_backend_common::manifest::{self, ManifestParts};
use q3c_backend_common::plan;
use q3c_ir::Graph;
use q3c_kernels::ops::Params;
use q3c_models::Qwen3Config;

use crate::emit::{Emit, Libm};
use crate::BackendError;

/// Settings of one compilation.
#[derive(Clone, Debug)]
pub struct CompileOptions {
    /// `native` (the CPU compiling) or a Cranelift CPU name such as `x86-64-v3`.
    pub target_cpu: String,
    /// Most tokens one `q3c_forward` call takes; longer prompts are fed in chunks by the runtime.
    pub max_tokens_per_call: usize,
    /// The fusion strategy the graph was built with (recorded in the manifest).
    pub fusion: String,
    /// The KV cache's element type: f32 (exact) or f16.
    pub kv_dtype: q3c_ir::DType,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            target_cpu: "native".into(),
            max_tokens_per_call: 256,
            fusion: "none".into(),
            kv_dtype: q3c_ir::DType::F32,
        }
    }
}

/// A compiled object and the manifest embedded in it.
pub struct Compiled {
    pub object: Vec<u8>,
    pub manifest: Manifest,
}

pub(crate) fn isa(target_cpu: &str, pic: bool) -> Result<OwnedTargetIsa, BackendError> {
    let mut flags = settings::builder();
    let set = |f: &mut settings::Builder, k: &str, v: &str| {
        f.set(k, v)
            .map_err(|e| BackendError::Internal(format!("{k}={v}: {e}")))
    };
    set(&mut flags, "is_pic", if pic { "true" } else { "false" })?;
    set(&mut flags, "opt_level", "speed")?;
    set(
        &mut flags,
        "enable_verifier",
        if cfg!(debug_assertions) {
            "true"
        } else {
            "false"
        },
    )?;
    let builder = if target_cpu == "native" {
        cranelift_native::builder()
            .map_err(|e| BackendError::Target(format!("cannot detect the host CPU: {e}")))?
    } else {
        let mut b = cranelift_codegen::isa::lookup(target_lexicon_host())
            .map_err(|e| BackendError::Target(e.to_string()))?;
        b.enable(target_cpu).map_err(|_| {
            BackendError::Target(format!(
                "unknown CPU '{target_cpu}' (try native, x86-64-v2, x86-64-v3)"
            ))
        })?;
        // Cranelift's x86-64-v3 and -v4 presets leave out AVX, which they imply (AVX2 and FMA need it), and
        // without which every `fma` became a call to libm's `fmaf`: prefill ran 20x slower.
        if matches!(target_cpu, "x86-64-v3" | "x86-64-v4") {
            b.enable("has_avx")
                .map_err(|e| BackendError::Internal(format!("has_avx: {e}")))?;
        }
        b
    };
    builder
        .finish(settings::Flags::new(flags))
        .map_err(|e| BackendError::Target(e.to_string()))
}

fn target_lexicon_host() -> target_lexicon::Triple {
    target_lexicon::Triple::host()
}

/// Whether `fma` compiles to an instruction (Cranelift lowers it with VEX encodings, so it needs AVX too;
/// otherwise it is a call to `fmaf`).
pub(crate) fn has_fma(isa: &dyn cranelift_codegen::isa::TargetIsa) -> bool {
    let on = |name: &str| {
        isa.isa_flags()
            .iter()
            .any(|f| f.name == name && f.as_bool() == Some(true))
    };
    on("has_fma") && on("has_avx")
}

/// CPU features the compiled code may use, as the runtime names them ([`q3c_abi::CPU_FEATURES`]:
/// Cranelift's `has_avx_vnni` is `avxvnni`).
fn required_features(isa: &dyn cranelift_codegen::isa::TargetIsa) -> Vec<String> {
    isa.isa_flags()
        .iter()
        .filter(|f| f.as_bool() == Some(true))
        .filter_map(|f| f.name.strip_prefix("has_").map(|n| n.replace('_', "")))
        .collect()
}

/// Compiles `graph` (lowered from `cfg`, output `output`) into an object file.
pub fn compile(
    graph: &Graph,
    cfg: &Qwen3Config,
    output: &str,
    opts: &CompileOptions,
) -> Result<Compiled, BackendError> {
    check(graph, opts)?;
    let builder = ObjectBuilder::new(
        isa(&opts.target_cpu, true)?,
        "q3c_model",
        cranelift_module::default_libcall_names(),
    )
    .map_err(|e| BackendError::Internal(e.to_string()))?;
    let mut module = ObjectModule::new(builder);
    let built = build(&mut module, graph, cfg, output, opts)?;
    let object = module
        .finish()
        .emit()
        .map_err(|e| BackendError::Internal(e.to_string()))?;
    Ok(Compiled {
        object,
        manifest: built.manifest,
    })
}

/// Code compiled into this process's memory by `cranelift-jit`: the same kernels and `q3c_forward` as the
/// `.so`, callable without linking or loading. Dropping it frees the code.
pub struct JitCompiled {
    pub forward: q3c_abi::Forward,
    pub manifest: Manifest,
    pub code: JitCode,
}

/// Owns the JIT's executable memory.
pub struct JitCode(#[allow(dead_code)] cranelift_jit::JITModule);

// SAFETY: the module is only kept alive, never used again after finalisation; the code it owns is immutable
// and reentrant (no global state), so it may be called and dropped from any thread.
unsafe impl Send for JitCode {}
unsafe impl Sync for JitCode {}

/// Compiles `graph` in process with `cranelift-jit` (for tests and `--jit`).
pub fn compile_jit(
    graph: &Graph,
    cfg: &Qwen3Config,
    output: &str,
    opts: &CompileOptions,
) -> Result<JitCompiled, BackendError> {
    check(graph, opts)?;
    let builder = cranelift_jit::JITBuilder::with_isa(
        isa(&opts.target_cpu, false)?,
        cranelift_module::default_libcall_names(),
    );
    let mut module = cranelift_jit::JITModule::new(builder);
    let built = build(&mut module, graph, cfg, output, opts)?;
    module
        .finalize_definitions()
        .map_err(|e| BackendError::Internal(e.to_string()))?;
    let code = module.get_finalized_function(built.forward);
    // SAFETY: `q3c_forward` was built with exactly this signature (see build_forward).
    let forward = unsafe { std::mem::transmute::<*const u8, q3c_abi::Forward>(code) };
    Ok(JitCompiled {
        forward,
        manifest: built.manifest,
        code: JitCode(module),
    })
}

fn check(graph: &Graph, opts: &CompileOptions) -> Result<(), BackendError> {
    launch::check(graph, opts.max_tokens_per_call)
}

/// What [`build`] defined in a module.
struct Built {
    manifest: Manifest,
    forward: FuncId,
}

/// Defines every kernel of the launch plan, `q3c_forward`, the manifest and the ABI version symbol in
/// `module`.
fn build<M: Module>(
    module: &mut M,
    graph: &Graph,
    cfg: &Qwen3Config,
    output: &str,
    opts: &CompileOptions,
) -> Result<Built, BackendError> {
    let isa = module.isa();
    let fma = has_fma(isa);
    let features = required_features(isa);
    let mut plan = plan::plan(graph, output, opts.max_tokens_per_call)?;
    plan.set_kv_dtype(opts.kv_dtype)?;
    let launch = launch::build(graph, &mut plan)?;
    let err = |e: cranelift_module::ModuleError| BackendError::Internal(e.to_string());

    let libm_sig = {
        let mut s = module.make_signature();
        s.params.push(AbiParam::new(F32));
        s.returns.push(AbiParam::new(F32));
        s
    };
    let cosf = module
        .declare_function("cosf", Linkage::Import, &libm_sig)
        .map_err(err)?;
    let sinf = module
        .declare_function("sinf", Linkage::Import, &libm_sig)
        .map_err(err)?;

    let kernel_sig = {
        let mut s = module.make_signature();
        for _ in 0..3 {
            s.params.push(AbiParam::new(I64));
        }
        s
    };
    let tcfg = module.target_config();
    let mut ctx = module.make_context();
    let mut fctx = FunctionBuilderContext::new();
    let mut kernels: Vec<FuncId> = Vec::new();
    for (name, body) in launch.plan.kernels.iter().zip(&launch.bodies) {
        if let Body::Stage { .. } = body {
            return Err(BackendError::Internal(format!(
                "the Cranelift backend has no staging kernel ({name})"
            )));
        }
        // RoPE frequencies as a local data table.
        let freqs = q3c_kernels::body_node(*body).and_then(|id| q3c_kernels::rope_table(graph, id));
        let rope_data = match freqs {
            Some(freqs) => {
                let bytes: Vec<u8> = freqs.iter().flat_map(|f| f.to_le_bytes()).collect();
                let data = module
                    .declare_data(&format!("{name}_inv_freq"), Linkage::Local, false, false)
                    .map_err(err)?;
                let mut desc = DataDescription::new();
                desc.define(bytes.into_boxed_slice());
                desc.set_align(16);
                module.define_data(data, &desc).map_err(err)?;
                Some(data)
            }
            None => None,
        };
        let fid = module
            .declare_function(name, Linkage::Local, &kernel_sig)
            .map_err(err)?;
        ctx.func.signature = kernel_sig.clone();
        ctx.func.name = UserFuncName::user(0, fid.as_u32());
        let libm = Libm {
            cosf: module.declare_func_in_func(cosf, &mut ctx.func),
            sinf: module.declare_func_in_func(sinf, &mut ctx.func),
        };
        let table_gv = rope_data.map(|d| module.declare_data_in_func(d, &mut ctx.func));
        {
            let mut b = FunctionBuilder::new(&mut ctx.func, &mut fctx);
            let entry = b.create_block();
            b.append_block_params_for_function_params(entry);
            b.switch_to_block(entry);
            let p = b.block_params(entry).to_vec();
            let table = table_gv.map(|gv| b.ins().symbol_value(I64, gv));
            let mut e = Emit {
                b: &mut b,
                fma,
                libm: Some(libm),
                parallel_for: None,
            };
            let params = Params {
                args: p[0],
                start: p[1],
                end: p[2],
            };
            q3c_kernels::emit_body(&mut e, graph, &plan, *body, params, table)?;
            b.ins().return_(&[]);
            b.seal_all_blocks();
            b.finalize(tcfg);
        }
        module
            .define_function(fid, &mut ctx)
            .map_err(|e| BackendError::Internal(format!("{name}: {e:?}")))?;
        module.clear_context(&mut ctx);
        kernels.push(fid);
    }

    let forward = build_forward(
        module,
        &mut ctx,
        &mut fctx,
        &launch.plan,
        &kernels,
        plan.max_tokens,
        cfg.vocab_size,
    )?;

    let manifest = manifest::build(ManifestParts {
        cfg,
        plan: &plan,
        backend: "cranelift",
        fusion: &opts.fusion,
        matmul_activations: "f32",
        target_cpu: &opts.target_cpu,
        required_cpu_features: features,
        kernels: launch.plan.dispatches.len(),
    });
    let json = serde_json::to_vec(&manifest).map_err(|e| BackendError::Internal(e.to_string()))?;
    export_data(module, q3c_abi::SYM_MANIFEST, json.clone())?;
    export_data(
        module,
        q3c_abi::SYM_MANIFEST_LEN,
        (json.len() as u64).to_le_bytes().to_vec(),
    )?;
    export_data(
        module,
        q3c_abi::SYM_ABI_VERSION,
        ABI_VERSION.to_le_bytes().to_vec(),
    )?;
    Ok(Built { manifest, forward })
}

fn export_data<M: Module>(module: &mut M, name: &str, bytes: Vec<u8>) -> Result<(), BackendError> {
    let err = |e: cranelift_module::ModuleError| BackendError::Internal(e.to_string());
    let id = module
        .declare_data(name, Linkage::Export, false, false)
        .map_err(err)?;
    let mut desc = DataDescription::new();
    desc.define(bytes.into_boxed_slice());
    desc.set_align(8);
    module.define_data(id, &desc).map_err(err)
}

/// `int32_t q3c_forward(const q3c_step *step)` ([`q3c_kernels::forward`]).
fn build_forward<M: Module>(
    module: &mut M,
    ctx: &mut Context,
    fctx: &mut FunctionBuilderContext,
    launch: &LaunchPlan,
    kernels: &[FuncId],
    max_tokens: usize,
    vocab: usize,
) -> Result<FuncId, BackendError> {
    let err = |e: cranelift_module::ModuleError| BackendError::Internal(e.to_string());
    let tcfg = module.target_config();
    let mut sig = module.make_signature();
    sig.params.push(AbiParam::new(I64));
    sig.returns.push(AbiParam::new(I32));
    let fid = module
        .declare_function(q3c_abi::SYM_FORWARD, Linkage::Export, &sig)
        .map_err(err)?;
    ctx.func.signature = sig;
    ctx.func.name = UserFuncName::user(0, fid.as_u32());
    let kernel_refs: Vec<_> = kernels
        .iter()
        .map(|&f| module.declare_func_in_func(f, &mut ctx.func))
        .collect();
    let mut b = FunctionBuilder::new(&mut ctx.func, fctx);
    let pf_sig = {
        let mut s = Signature::new(b.func.signature.call_conv);
        for _ in 0..4 {
            s.params.push(AbiParam::new(I64));
        }
        b.import_signature(s)
    };
    let entry = b.create_block();
    b.append_block_params_for_function_params(entry);
    b.switch_to_block(entry);
    let step = b.block_params(entry)[0];
    let mut e = Emit {
        b: &mut b,
        fma: false,
        libm: None,
        parallel_for: Some(pf_sig),
    };
    q3c_kernels::forward::build(&mut e, step, launch, &kernel_refs, max_tokens, vocab);
    b.seal_all_blocks();
    b.finalize(tcfg);
    module
        .define_function(fid, ctx)
        .map_err(|e| BackendError::Internal(format!("q3c_forward: {e:?}")))?;
    module.clear_context(ctx);
    Ok(fid)
}

#[cfg(test)]
mod tests {
    /// Every feature a native compilation may require is one the runtime can check (a name it does not
    /// know makes it refuse the artifact on the very CPU that compiled it).
    /// Named x86-64 levels that have FMA get it as an instruction (Cranelift's presets leave out the AVX it
    /// needs, which once made every `fma` a libm call).
    #[test]
    fn x86_64_levels_with_fma_use_the_instruction() {
        for cpu in ["x86-64-v3", "x86-64-v4"] {
            let isa = super::isa(cpu, true).expect("named ISA");
            assert!(super::has_fma(&*isa), "{cpu}");
        }
        assert!(!super::has_fma(&*super::isa("x86-64-v2", true).unwrap()));
    }

    #[test]
    fn required_features_are_abi_names() {
        let isa = super::isa("native", true).expect("host ISA");
        for f in super::required_features(&*isa) {
            assert!(q3c_abi::CPU_FEATURES.contains(&f.as_str()), "{f}");
        }
    }
}
