//! Building LLVM modules from a graph: the CPU object (kernels, `q3c_forward`, manifest, ABI version) and
//! the PTX module (one entry point per kernel).

use inkwell::attributes::{Attribute, AttributeLoc};
use inkwell::context::Context;
use inkwell::module::{Linkage, Module};
use inkwell::passes::PassBuilderOptions;
use inkwell::targets::{FileType, TargetMachine};
use inkwell::values::{FunctionValue, PointerValue};
use inkwell::AddressSpace;
use q3c_abi::Manifest;

use q3c_backend_common::launch::{self, Body};
use q3c_backend_common::manifest::{self, ManifestParts};
use q3c_backend_common::plan::{self, Plan};
use q3c_backend_common::BackendError;
use q3c_ir::{DType, Graph, NodeId};
use q3c_kernels::ops::Params;
use q3c_models::Qwen3Config;

use crate::fb::{Fb, Flavor, ItemShare, BUG};
use crate::{forward, staging, target};

/// Settings of one CPU compilation.
#[derive(Clone, Debug)]
pub struct CompileOptions {
    /// `native` (the CPU compiling) or a named x86-64 CPU such as `x86-64-v3` or `znver4`.
    pub target_cpu: String,
    /// Most tokens one `q3c_forward` call takes; longer prompts are fed in chunks by the runtime.
    pub max_tokens_per_call: usize,
    /// The fusion strategy the graph was built with (recorded in the manifest).
    pub fusion: String,
    /// Matrix products over bf16 weights round the activations to bf16 and use AVX512_BF16 dot
    /// products (twice the f32 FMA rate; llama.cpp does the same for bf16 models). Off: f32 activations.
    pub bf16_activations: bool,
    /// Bind the matrices of linear and expert products as [`DType::Q8`] (8-bit groups of 32) or
    /// [`DType::Q4`] (4-bit groups of 32; the logits matrix in [`DType::Q6`]), quantized by the runtime at load, and
    /// multiply them with AVX512-VNNI on activations quantized to 8 bits. `None`: as stored.
    pub quantize: Option<DType>,
    /// The KV cache's element type: f32 (exact), or f16 (half the bytes; written rounded to nearest even,
    /// widened when read).
    pub kv_dtype: DType,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            target_cpu: "native".into(),
            max_tokens_per_call: 256,
            fusion: "none".into(),
            bf16_activations: false,
            quantize: None,
            kv_dtype: DType::F32,
        }
    }
}

/// A compiled object and the manifest embedded in it.
pub struct Compiled {
    pub object: Vec<u8>,
    pub manifest: Manifest,
}

/// The RoPE inverse frequencies of a rope node, as a private constant table.
fn rope_table<'ctx>(
    cx: &'ctx Context,
    m: &Module<'ctx>,
    graph: &Graph,
    id: NodeId,
    name: &str,
) -> Option<PointerValue<'ctx>> {
    let values: Vec<_> = q3c_kernels::rope_table(graph, id)?
        .iter()
        .map(|&f| cx.f32_type().const_float(f64::from(f)))
        .collect();
    let g = m.add_global(
        cx.f32_type().array_type(values.len() as u32),
        None,
        &format!("{name}_inv_freq"),
    );
    g.set_initializer(&cx.f32_type().const_array(&values));
    g.set_constant(true);
    g.set_linkage(Linkage::Private);
    g.set_alignment(64);
    Some(g.as_pointer_value())
}

/// Declares `name(ptr args, i64 start, i64 end)` and emits `body` (one written in `q3c_kernels`) into it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn kernel_body<'ctx>(
    cx: &'ctx Context,
    m: &Module<'ctx>,
    graph: &Graph,
    plan: &Plan,
    body: Body,
    name: &str,
    flavor: Flavor,
    share: ItemShare,
) -> Result<FunctionValue<'ctx>, BackendError> {
    let i64t = cx.i64_type();
    let ptr = cx.ptr_type(AddressSpace::default());
    let ty = cx
        .void_type()
        .fn_type(&[ptr.into(), i64t.into(), i64t.into()], false);
    let f = m.add_function(name, ty, Some(Linkage::Internal));
    function_attributes(cx, f);
    let table = q3c_kernels::body_node(body).and_then(|id| rope_table(cx, m, graph, id, name));
    let mut fb = Fb::new(cx, m, f, flavor);
    fb.share = share;
    let param = |i| f.get_nth_param(i).expect("3 params");
    let params = Params {
        args: param(0).into_pointer_value(),
        start: param(1).into_int_value(),
        end: param(2).into_int_value(),
    };
    q3c_kernels::emit_body(&mut fb, graph, plan, body, params, table)?;
    fb.b.build_return(None).expect(BUG);
    fb.finish();
    Ok(f)
}

/// The attributes of every function q3c emits: it does not unwind, and it makes no library calls of LLVM's
/// own invention.
pub(crate) fn function_attributes(cx: &Context, f: FunctionValue) {
    let kind = Attribute::get_named_enum_kind_id("nounwind");
    f.add_attribute(AttributeLoc::Function, cx.create_enum_attribute(kind, 0));
    // No library calls made up from loops or stores (a 1 KB zeroing became `memset` for sapphirerapids):
    // an artifact imports nothing beyond libm.
    f.add_attribute(
        AttributeLoc::Function,
        cx.create_string_attribute("no-builtins", ""),
    );
}

/// Verifies `m`, then runs LLVM's O3 pipeline for `machine`.
pub(crate) fn optimise(m: &Module, machine: &TargetMachine) -> Result<(), BackendError> {
    m.set_triple(&machine.get_triple());
    m.set_data_layout(&machine.get_target_data().get_data_layout());
    m.verify()
        .map_err(|e| BackendError::Internal(format!("invalid LLVM IR: {}", e.to_string_lossy())))?;
    m.run_passes("default<O3>", machine, PassBuilderOptions::create())
        .map_err(|e| BackendError::Internal(format!("LLVM O3: {}", e.to_string_lossy())))
}

/// Compiles `graph` (lowered from `cfg`, output `output`) into a relocatable object for the CPU.
pub fn compile(
    graph: &Graph,
    cfg: &Qwen3Config,
    output: &str,
    opts: &CompileOptions,
) -> Result<Compiled, BackendError> {
    launch::check(graph, opts.max_tokens_per_call)?;
    let target = target::cpu(&opts.target_cpu, opts.bf16_activations)?;
    match opts.quantize {
        Some(DType::Q8 | DType::Q4) if !target.vnni() => {
            return Err(BackendError::Target(format!(
                "{} weights need AVX512-VNNI, which {} lacks",
                opts.quantize.map_or("", DType::name),
                target.cpu
            )))
        }
        None | Some(DType::Q8 | DType::Q4) => {}
        Some(other) => {
            return Err(BackendError::Unsupported(format!(
                "quantizing weights to {other} (q8 and q4 exist)"
            )))
        }
    }
    let mut plan = plan::plan_with(graph, output, opts.max_tokens_per_call, opts.quantize)?;
    plan.set_kv_dtype(opts.kv_dtype)?;
    let mut launch = launch::build(graph, &mut plan)?;
    // Staged products (q8, bf16 activations) prepare their activations after every other scratch buffer.
    let staging_offset = plan.scratch_bytes_per_token * plan.max_tokens;
    let mut staging_per_token = 0;
    let mut at = 0;
    while at < launch.plan.dispatches.len() {
        let node = launch.nodes[at];
        if let Some((prep, k, rows)) =
            node.and_then(|id| staging::of(graph, &plan, id, target.flavor))
        {
            staging_per_token =
                staging_per_token.max(rows * staging::row_bytes(prep, k, target.flavor));
            launch.stage(at, prep, k, rows, staging_offset);
            at += 1;
        }
        at += 1;
    }
    plan.scratch_bytes_per_token += staging_per_token;
    let cx = Context::create();
    let m = cx.create_module("q3c_model");
    let functions = launch
        .plan
        .kernels
        .iter()
        .zip(&launch.bodies)
        .map(|(name, body)| match *body {
            Body::Stage { prep, k } => Ok(staging::kernel(&cx, &m, name, prep, k, target.flavor)),
            body => kernel_body(
                &cx,
                &m,
                graph,
                &plan,
                body,
                name,
                target.flavor,
                ItemShare::One,
            ),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let forward_fn = forward::build(
        &cx,
        &m,
        &launch.plan,
        &functions,
        plan.max_tokens,
        cfg.vocab_size,
    );
    for f in functions.iter().copied().chain([forward_fn]) {
        f.add_attribute(
            AttributeLoc::Function,
            cx.create_string_attribute("target-cpu", &target.cpu),
        );
        if !target.features.is_empty() {
            f.add_attribute(
                AttributeLoc::Function,
                cx.create_string_attribute("target-features", &target.features),
            );
        }
    }
    let manifest = manifest::build(ManifestParts {
        cfg,
        plan: &plan,
        backend: "llvm",
        fusion: &opts.fusion,
        matmul_activations: if opts.bf16_activations { "bf16" } else { "f32" },
        target_cpu: &target.cpu,
        required_cpu_features: target.required.clone(),
        kernels: launch.node_dispatches(),
    });
    finish_object(&cx, &m, &target.machine, manifest)
}

/// Exports `manifest` from `m`, optimises the module and emits it as an object file for `machine`.
pub(crate) fn finish_object<'ctx>(
    cx: &'ctx Context,
    m: &Module<'ctx>,
    machine: &TargetMachine,
    manifest: Manifest,
) -> Result<Compiled, BackendError> {
    forward::export_manifest(cx, m, &manifest)?;
    optimise(m, machine)?;
    let object = machine
        .write_to_memory_buffer(m, FileType::Object)
        .map_err(|e| BackendError::Internal(format!("LLVM codegen: {}", e.to_string_lossy())))?;
    Ok(Compiled {
        object: object.as_slice().to_vec(),
        manifest,
    })
}
