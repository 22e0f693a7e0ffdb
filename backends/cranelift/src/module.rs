//! Building the object: kernels, the `q3c_forward` entry point, the manifest and the ABI version symbol.

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{I32, I64};
use cranelift_codegen::ir::{
    AbiParam, InstBuilder, Signature, StackSlotData, StackSlotKind, UserFuncName,
};
use cranelift_codegen::isa::OwnedTargetIsa;
use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::Context;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_module::{DataDescription, FuncId, Linkage, Module};
use cranelift_object::{ObjectBuilder, ObjectModule};
use q3c_abi::{step_offsets as so, Manifest, ABI_VERSION};
use q3c_ir::{Graph, NodeId, Op};
use q3c_models::Qwen3Config;

use crate::emit::{mem, Emit, Libm};
use crate::kernels;
use crate::BackendError;
use q3c_backend_common::items::work_items;
use q3c_backend_common::manifest::{self, ManifestParts};
use q3c_backend_common::plan::{self, Loc};

/// Settings of one compilation.
#[derive(Clone, Debug)]
pub struct CompileOptions {
    /// `native` (the CPU compiling) or a Cranelift CPU name such as `x86-64-v3`.
    pub target_cpu: String,
    /// Most tokens one `q3c_forward` call takes; longer prompts are fed in chunks by the runtime.
    pub max_tokens_per_call: usize,
    /// The fusion strategy the graph was built with (recorded in the manifest).
    pub fusion: String,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            target_cpu: "native".into(),
            max_tokens_per_call: 256,
            fusion: "none".into(),
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
        b
    };
    builder
        .finish(settings::Flags::new(flags))
        .map_err(|e| BackendError::Target(e.to_string()))
}

fn target_lexicon_host() -> target_lexicon::Triple {
    target_lexicon::Triple::host()
}

/// CPU features the compiled code may use, as the runtime names them.
fn required_features(isa: &dyn cranelift_codegen::isa::TargetIsa) -> Vec<String> {
    isa.isa_flags()
        .iter()
        .filter(|f| f.as_bool() == Some(true))
        .filter_map(|f| f.name.strip_prefix("has_").map(|n| n.replace('_', ".")))
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
    q3c_ir::verify(graph).map_err(|e| BackendError::Internal(e.to_string()))?;
    if opts.max_tokens_per_call == 0 {
        return Err(BackendError::Unsupported(
            "max tokens per call must be at least 1".into(),
        ));
    }
    Ok(())
}

/// What [`build`] defined in a module.
struct Built {
    manifest: Manifest,
    forward: FuncId,
}

/// Defines every kernel, `q3c_forward`, the manifest and the ABI version symbol in `module`.
fn build<M: Module>(
    module: &mut M,
    graph: &Graph,
    cfg: &Qwen3Config,
    output: &str,
    opts: &CompileOptions,
) -> Result<Built, BackendError> {
    let isa = module.isa();
    let fma = isa
        .isa_flags()
        .iter()
        .any(|f| f.name == "has_fma" && f.as_bool() == Some(true));
    let features = required_features(isa);
    let plan = plan::plan(graph, output, opts.max_tokens_per_call)?;
    let err = |e: cranelift_module::ModuleError| BackendError::Internal(e.to_string());

    let libm_sig = {
        let mut s = module.make_signature();
        s.params
            .push(AbiParam::new(cranelift_codegen::ir::types::F32));
        s.returns
            .push(AbiParam::new(cranelift_codegen::ir::types::F32));
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
    let mut kernels_built: Vec<(NodeId, FuncId)> = Vec::new();
    for (n, &id) in plan.order.iter().enumerate() {
        let op = &graph.node(id).op;
        if op.is_leaf() || op.is_view() {
            continue;
        }
        // RoPE frequencies as a local data table.
        let rope_data = match op {
            Op::Rope(spec) | Op::NormRope { rope: spec, .. } => {
                let d = graph.node(id).tensor().shape.resolve(1, 1)[2];
                let bytes: Vec<u8> = spec
                    .inv_freq(d)
                    .iter()
                    .flat_map(|f| f.to_le_bytes())
                    .collect();
                let data = module
                    .declare_data(&format!("q3c_rope_{n}"), Linkage::Local, false, false)
                    .map_err(err)?;
                let mut desc = DataDescription::new();
                desc.define(bytes.into_boxed_slice());
                desc.set_align(16);
                module.define_data(data, &desc).map_err(err)?;
                Some(data)
            }
            _ => None,
        };
        let name = format!("q3c_k{n}_{}", op.name());
        let fid = module
            .declare_function(&name, Linkage::Local, &kernel_sig)
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
                libm,
            };
            kernels::emit(&mut e, graph, &plan, id, [p[0], p[1], p[2]], table)?;
            b.ins().return_(&[]);
            b.seal_all_blocks();
            b.finalize(tcfg);
        }
        module
            .define_function(fid, &mut ctx)
            .map_err(|e| BackendError::Internal(format!("{name}: {e:?}")))?;
        module.clear_context(&mut ctx);
        kernels_built.push((id, fid));
    }

    let forward = build_forward(
        module,
        &mut ctx,
        &mut fctx,
        graph,
        &plan,
        &kernels_built,
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
        kernels: kernels_built.len(),
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

/// `int32_t q3c_forward(const q3c_step *step)`: checks the step, then dispatches every kernel in order.
#[allow(clippy::too_many_arguments)]
fn build_forward<M: Module>(
    module: &mut M,
    ctx: &mut Context,
    fctx: &mut FunctionBuilderContext,
    graph: &Graph,
    plan: &plan::Plan,
    kernels_built: &[(NodeId, FuncId)],
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
    let kernel_refs: Vec<_> = kernels_built
        .iter()
        .map(|&(id, f)| (id, module.declare_func_in_func(f, &mut ctx.func)))
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
    // The entry point calls no libm function; the field is filled with any function reference.
    let unused = kernel_refs
        .first()
        .map(|k| k.1)
        .ok_or_else(|| BackendError::Internal("no kernels".into()))?;
    let mut e = Emit {
        b: &mut b,
        fma: false,
        libm: Libm {
            cosf: unused,
            sinf: unused,
        },
    };

    let ret = |e: &mut Emit, code: i32| {
        let c = e.b.ins().iconst(I32, i64::from(code));
        e.b.ins().return_(&[c]);
    };
    let ids = e.b.ins().load(I64, mem(), step, so::IDS);
    let t = e.b.ins().load(I64, mem(), step, so::T);
    let past = e.b.ins().load(I64, mem(), step, so::PAST);
    // t must be in 1..=max_tokens.
    let t_minus_1 = e.b.ins().iadd_imm_s(t, -1);
    let bad_t = e.b.ins().icmp_imm_s(
        IntCC::UnsignedGreaterThanOrEqual,
        t_minus_1,
        plan.max_tokens as i64,
    );
    let (fail_t, ok_t) = (e.b.create_block(), e.b.create_block());
    e.b.ins().brif(bad_t, fail_t, &[], ok_t, &[]);
    e.b.switch_to_block(fail_t);
    ret(&mut e, q3c_abi::ERR_TOKENS);
    e.b.switch_to_block(ok_t);
    // Every id in 0..vocab.
    let bad_id = e.b.create_block();
    let zero = e.iconst(0);
    e.for_range(zero, t, 1, |e, i| {
        let p = e.addr(ids, i, 4);
        let id = e.load_i32_as_i64(p, 0);
        let bad =
            e.b.ins()
                .icmp_imm_s(IntCC::UnsignedGreaterThanOrEqual, id, vocab as i64);
        let next = e.b.create_block();
        e.b.ins().brif(bad, bad_id, &[], next, &[]);
        e.b.switch_to_block(next);
    });
    let run = e.b.create_block();
    e.b.ins().jump(run, &[]);
    e.b.switch_to_block(bad_id);
    ret(&mut e, q3c_abi::ERR_TOKEN_ID);
    e.b.switch_to_block(run);

    let weights = e.b.ins().load(I64, mem(), step, so::WEIGHTS);
    let kv = e.b.ins().load(I64, mem(), step, so::KV);
    let scratch = e.b.ins().load(I64, mem(), step, so::SCRATCH);
    let logits = e.b.ins().load(I64, mem(), step, so::LOGITS);
    let services = e.b.ins().load(I64, mem(), step, so::SERVICES);
    let parallel_for = e.b.ins().load(I64, mem(), services, 0);
    let pool = e.b.ins().load(I64, mem(), services, 8);
    // Kernel arguments: T, past, then input and output pointers.
    let arg_words = 2 + kernel_refs
        .iter()
        .map(|&(id, _)| graph.inputs(id).len() + graph.node(id).ty.elements().len())
        .max()
        .unwrap_or(0);
    let slot = e.b.create_sized_stack_slot(StackSlotData::new(
        StackSlotKind::ExplicitSlot,
        (8 * arg_words) as u32,
        3,
    ));
    let args = e.b.ins().stack_addr(I64, slot, 0);

    let pointer = |e: &mut Emit, loc: Loc| match loc {
        // The address of the weight's table entry; single weights are dereferenced by the caller below,
        // expert stacks pass the entry address itself (E consecutive data pointers).
        Loc::Weight { index, .. } => e.b.ins().iadd_imm_s(weights, (index * 8) as i64),
        Loc::Ids | Loc::Positions => ids,
        Loc::Scratch { offset } => e.b.ins().iadd_imm_s(scratch, offset as i64),
        Loc::Cache { slot } => e.b.ins().load(I64, mem(), kv, (slot * 8) as i32),
        Loc::Logits => logits,
    };
    // With last_logits_only, the logits kernel sees one row: the last one of its input.
    let last_only = e.b.ins().load(I64, mem(), step, so::LAST_LOGITS_ONLY);
    let one = e.iconst(1);
    let t_logits = e.b.ins().select(last_only, one, t);
    let skipped_rows = {
        let t_minus_1 = e.b.ins().iadd_imm_s(t, -1);
        let zero = e.iconst(0);
        e.b.ins().select(last_only, t_minus_1, zero)
    };
    for &(id, fref) in &kernel_refs {
        let is_logits = plan.loc[&id] == Loc::Logits;
        e.b.ins()
            .store(mem(), if is_logits { t_logits } else { t }, args, 0);
        e.b.ins().store(mem(), past, args, 8);
        let inputs = graph.inputs(id);
        let stack_weight = |n: NodeId| matches!(&graph.node(n).op, Op::Weight { name, .. } if name.contains(q3c_models::tensors::EXPERT_PLACEHOLDER));
        for (i, &input) in inputs.iter().enumerate() {
            let loc = plan.input_loc(graph, id, i);
            let mut p = pointer(&mut e, loc);
            if matches!(loc, Loc::Weight { .. }) && !stack_weight(input) {
                p = e.b.ins().load(I64, mem(), p, 0);
            }
            if is_logits && i == 0 {
                let row_bytes = plan::bytes_per_token(graph, input)?;
                p = e.addr(p, skipped_rows, row_bytes);
            }
            e.b.ins().store(mem(), p, args, (16 + 8 * i) as i32);
        }
        let outs = plan
            .elements
            .get(&id)
            .cloned()
            .unwrap_or_else(|| vec![plan.loc[&id]]);
        for (i, loc) in outs.into_iter().enumerate() {
            let out = pointer(&mut e, loc);
            e.b.ins()
                .store(mem(), out, args, (16 + 8 * (inputs.len() + i)) as i32);
        }
        let items = work_items(graph, id);
        let n = if items.scales_with_t {
            e.b.ins().imul_imm_u(t, items.count as i64)
        } else {
            e.iconst(items.count)
        };
        let kernel = e.b.ins().func_addr(I64, fref);
        e.b.ins()
            .call_indirect(pf_sig, parallel_for, &[pool, kernel, args, n]);
    }
    ret(&mut e, q3c_abi::OK);
    b.seal_all_blocks();
    b.finalize(tcfg);
    module
        .define_function(fid, ctx)
        .map_err(|e| BackendError::Internal(format!("q3c_forward: {e:?}")))?;
    module.clear_context(ctx);
    Ok(fid)
}
