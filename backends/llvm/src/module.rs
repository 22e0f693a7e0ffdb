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
use std::collections::HashMap;

use q3c_backend_common::items::{dims, in_dtype};
use q3c_backend_common::manifest::{self, ManifestParts};
use q3c_backend_common::plan::{self, Plan};
use q3c_backend_common::BackendError;
use q3c_ir::{Graph, NodeId, Op};
use q3c_models::Qwen3Config;

use crate::fb::{Fb, Flavor, BUG};
use crate::{forward, kernels, staging, target};

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
    /// Bind the matrices of linear kernels as `q8` (8-bit groups of 32, quantized by the runtime at load)
    /// and multiply them with AVX512-VNNI on activations quantized the same way.
    pub weights_q8: bool,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            target_cpu: "native".into(),
            max_tokens_per_call: 256,
            fusion: "none".into(),
            bf16_activations: false,
            weights_q8: false,
        }
    }
}

/// A compiled object and the manifest embedded in it.
pub struct Compiled {
    pub object: Vec<u8>,
    pub manifest: Manifest,
}

/// Settings of one PTX compilation.
#[derive(Clone, Debug)]
pub struct PtxOptions {
    /// `sm_80`, `sm_90`, ...
    pub gpu: String,
    pub max_tokens_per_call: usize,
    pub fusion: String,
}

/// A PTX module: one `.entry` per distinct kernel.
pub struct PtxModule {
    pub ptx: String,
    /// The entry point each kernel dispatch of a forward call launches, in order (names repeat where nodes
    /// share a kernel).
    pub kernels: Vec<String>,
    /// The manifest a CPU artifact of the same graph would carry (weights, KV geometry, scratch size).
    pub manifest: Manifest,
}

fn check(graph: &Graph, max_tokens: usize) -> Result<(), BackendError> {
    q3c_ir::verify(graph).map_err(|e| BackendError::Internal(e.to_string()))?;
    if max_tokens == 0 {
        return Err(BackendError::Unsupported(
            "max tokens per call must be at least 1".into(),
        ));
    }
    Ok(())
}

/// Nodes that get a kernel, in dispatch order, with the name of the kernel each runs. Nodes whose code
/// would be identical share one kernel (every layer's, typically): compile time and code size grow with
/// the distinct shapes, not with the number of layers.
fn kernel_nodes(graph: &Graph, plan: &Plan) -> Vec<(NodeId, String)> {
    let mut names: HashMap<String, String> = HashMap::new();
    plan.order
        .iter()
        .enumerate()
        .filter(|(_, &id)| {
            let op = &graph.node(id).op;
            !op.is_leaf() && !op.is_view()
        })
        .map(|(n, &id)| {
            let name = names
                .entry(kernel_key(graph, plan, id))
                .or_insert_with(|| format!("q3c_k{n}_{}", graph.node(id).op.name()));
            (id, name.clone())
        })
        .collect()
}

/// Everything a kernel's code depends on: the op (a cache write's layer erased: the cache arrives as a
/// pointer), the types of its inputs and result, and the dtype each input is read in.
fn kernel_key(graph: &Graph, plan: &Plan, id: NodeId) -> String {
    let mut op = graph.node(id).op.clone();
    match &mut op {
        Op::KvAppend { layer, .. }
        | Op::NormRope {
            cache: Some((layer, _)),
            ..
        } => *layer = 0,
        _ => {}
    }
    let inputs: Vec<String> = graph
        .inputs(id)
        .iter()
        .enumerate()
        .map(|(i, &n)| format!("{} as {:?}", graph.node(n).ty, in_dtype(plan, graph, id, i)))
        .collect();
    format!("{op:?} ({}) -> {}", inputs.join(", "), graph.node(id).ty)
}

/// The RoPE inverse frequencies of a rope node, as a private constant table.
fn rope_table<'ctx>(
    cx: &'ctx Context,
    m: &Module<'ctx>,
    graph: &Graph,
    id: NodeId,
    name: &str,
) -> Option<PointerValue<'ctx>> {
    let (Op::Rope(spec) | Op::NormRope { rope: spec, .. }) = &graph.node(id).op else {
        return None;
    };
    let d = dims(graph, id)[2];
    let values: Vec<_> = spec
        .inv_freq(d)
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

/// Declares `name(ptr args, i64 start, i64 end)` and emits node `id`'s body into it.
fn kernel_body<'ctx>(
    cx: &'ctx Context,
    m: &Module<'ctx>,
    graph: &Graph,
    plan: &Plan,
    id: NodeId,
    name: &str,
    flavor: Flavor,
) -> Result<FunctionValue<'ctx>, BackendError> {
    let i64t = cx.i64_type();
    let ptr = cx.ptr_type(AddressSpace::default());
    let ty = cx
        .void_type()
        .fn_type(&[ptr.into(), i64t.into(), i64t.into()], false);
    let f = m.add_function(name, ty, Some(Linkage::Internal));
    nounwind(cx, f);
    let table = rope_table(cx, m, graph, id, name);
    let fb = Fb::new(cx, m, f, flavor);
    let params = [
        f.get_nth_param(0).expect("3 params"),
        f.get_nth_param(1).expect("3 params"),
        f.get_nth_param(2).expect("3 params"),
    ];
    kernels::emit(&fb, graph, plan, id, params, table)?;
    fb.b.build_return(None).expect(BUG);
    fb.finish();
    Ok(f)
}

pub(crate) fn nounwind(cx: &Context, f: FunctionValue) {
    let kind = Attribute::get_named_enum_kind_id("nounwind");
    f.add_attribute(AttributeLoc::Function, cx.create_enum_attribute(kind, 0));
}

/// Verifies `m`, then runs LLVM's O3 pipeline for `machine`.
fn optimise(m: &Module, machine: &TargetMachine) -> Result<(), BackendError> {
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
    check(graph, opts.max_tokens_per_call)?;
    let target = target::cpu(&opts.target_cpu, opts.bf16_activations)?;
    if opts.weights_q8 && !target.vnni() {
        return Err(BackendError::Target(format!(
            "q8 weights need AVX512-VNNI, which {} lacks",
            target.cpu
        )));
    }
    let mut plan = plan::plan_with(graph, output, opts.max_tokens_per_call, opts.weights_q8)?;
    let cx = Context::create();
    let m = cx.create_module("q3c_model");
    let mut kernels_built = Vec::new();
    let mut functions: HashMap<String, FunctionValue> = HashMap::new();
    // Staged products (q8, bf16 activations) prepare their activations after every other scratch buffer.
    let staging_offset = plan.scratch_bytes_per_token * plan.max_tokens;
    let mut staging_per_token = 0;
    for (id, name) in kernel_nodes(graph, &plan) {
        let f = match functions.get(&name) {
            Some(&f) => f,
            None => {
                let f = kernel_body(&cx, &m, graph, &plan, id, &name, target.flavor)?;
                functions.insert(name, f);
                f
            }
        };
        let staging =
            staging::of(graph, &plan, id, target.flavor).map(|(prep, k, rows_per_token)| {
                staging_per_token = staging_per_token.max(rows_per_token * prep.row_bytes(k));
                let kernel = *functions
                    .entry(staging::name(prep, k))
                    .or_insert_with(|| staging::kernel(&cx, &m, prep, k, target.flavor));
                staging::Staging {
                    kernel,
                    offset: staging_offset,
                    rows_per_token,
                }
            });
        kernels_built.push((id, f, staging));
    }
    plan.scratch_bytes_per_token += staging_per_token;
    let forward_fn = forward::build(&cx, &m, graph, &plan, &kernels_built, cfg.vocab_size)?;
    for f in functions.values().copied().chain([forward_fn]) {
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
        kernels: kernels_built.len(),
    });
    forward::export_manifest(&cx, &m, &manifest)?;
    optimise(&m, &target.machine)?;
    let object = target
        .machine
        .write_to_memory_buffer(&m, FileType::Object)
        .map_err(|e| BackendError::Internal(format!("LLVM codegen: {}", e.to_string_lossy())))?;
    Ok(Compiled {
        object: object.as_slice().to_vec(),
        manifest,
    })
}

/// Compiles every kernel of `graph` to PTX for `opts.gpu`: entry `q3c_kN_op(args, items)` runs work item
/// `blockIdx.x · blockDim.x + threadIdx.x` if it is below `items` (items as in `work_items`).
pub fn compile_ptx(
    graph: &Graph,
    cfg: &Qwen3Config,
    output: &str,
    opts: &PtxOptions,
) -> Result<PtxModule, BackendError> {
    check(graph, opts.max_tokens_per_call)?;
    let machine = target::ptx(&opts.gpu)?;
    let plan = plan::plan(graph, output, opts.max_tokens_per_call)?;
    let cx = Context::create();
    let m = cx.create_module("q3c_kernels");
    let (i32t, i64t) = (cx.i32_type(), cx.i64_type());
    let ptr = cx.ptr_type(AddressSpace::default());
    let sreg = |name: &str| {
        m.get_function(name)
            .unwrap_or_else(|| m.add_function(name, i32t.fn_type(&[], false), None))
    };
    let mut names: Vec<String> = Vec::new();
    let mut built: std::collections::HashSet<String> = std::collections::HashSet::new();
    for (id, name) in kernel_nodes(graph, &plan) {
        if !built.insert(name.clone()) {
            names.push(name);
            continue;
        }
        let body = kernel_body(
            &cx,
            &m,
            graph,
            &plan,
            id,
            &format!("{name}_body"),
            Flavor::Gpu,
        )?;
        let inline = Attribute::get_named_enum_kind_id("alwaysinline");
        body.add_attribute(AttributeLoc::Function, cx.create_enum_attribute(inline, 0));
        let entry = m.add_function(
            &name,
            cx.void_type().fn_type(&[ptr.into(), i64t.into()], false),
            None,
        );
        nounwind(&cx, entry);
        let fb = Fb::new(&cx, &m, entry, Flavor::Gpu);
        let read = |f: &str| {
            let v = fb.call(sreg(f), &[]).into_int_value();
            fb.b.build_int_z_extend(v, i64t, "").expect(BUG)
        };
        let block = read("llvm.nvvm.read.ptx.sreg.ctaid.x");
        let width = read("llvm.nvvm.read.ptx.sreg.ntid.x");
        let thread = read("llvm.nvvm.read.ptx.sreg.tid.x");
        let item = fb.add(fb.b.build_int_mul(block, width, "").expect(BUG), thread);
        let items = entry.get_nth_param(1).expect("2 params").into_int_value();
        let inside = fb.icmp(inkwell::IntPredicate::ULT, item, items);
        let args = entry.get_nth_param(0).expect("2 params");
        fb.when(inside, |fb| {
            let next = fb.add_c(item, 1);
            fb.b.build_call(body, &[args.into(), item.into(), next.into()], "")
                .expect(BUG);
        });
        fb.b.build_return(None).expect(BUG);
        fb.finish();
        let md = cx.metadata_node(&[
            entry.as_global_value().as_pointer_value().into(),
            cx.metadata_string("kernel").into(),
            i32t.const_int(1, false).into(),
        ]);
        m.add_global_metadata("nvvm.annotations", &md)
            .map_err(|e| BackendError::Internal(e.to_string()))?;
        names.push(name);
    }
    optimise(&m, &machine)?;
    let ptx = machine
        .write_to_memory_buffer(&m, FileType::Assembly)
        .map_err(|e| {
            BackendError::Internal(format!("LLVM PTX codegen: {}", e.to_string_lossy()))
        })?;
    let ptx = String::from_utf8_lossy(ptx.as_slice())
        .trim_end_matches('\0')
        .to_string();
    let manifest = manifest::build(ManifestParts {
        cfg,
        plan: &plan,
        backend: "llvm-nvptx",
        fusion: &opts.fusion,
        matmul_activations: "f32",
        target_cpu: &opts.gpu,
        required_cpu_features: Vec::new(),
        kernels: names.len(),
    });
    Ok(PtxModule {
        ptx,
        kernels: names,
        manifest,
    })
}
