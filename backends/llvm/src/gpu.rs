//! The GPU flavour: every kernel of the launch plan as an entry point that runs one work item per thread,
//! `block · threads + thread`. For NVIDIA GPUs the entries are PTX kernels that read the indices from
//! the special registers ([`compile_ptx`]); for this CPU the very same bodies and entry code are compiled
//! with the indices as parameters into a `.so` the runtime launches block by block, thread by thread
//! ([`compile_gpu_emulation`]), so the launch plan, the argument blocks and the work-item mapping a GPU
//! runtime uses are checked against the reference without a GPU.

use inkwell::attributes::{Attribute, AttributeLoc};
use inkwell::context::Context;
use inkwell::module::{Linkage, Module};
use inkwell::targets::FileType;
use inkwell::values::{FunctionValue, IntValue};
use inkwell::AddressSpace;
use q3c_abi::launch::{LaunchPlan, ManyRows};
use q3c_abi::Manifest;
use q3c_backend_common::launch::{self, Body};
use q3c_backend_common::manifest::{self, ManifestParts};
use q3c_backend_common::plan::{self, Plan};
use q3c_backend_common::BackendError;
use q3c_ir::{Graph, Op};
use q3c_models::Qwen3Config;

use crate::fb::{Fb, Flavor, ItemShare, BUG};
use crate::gpu_gemm::{ProductShape, WARP};
use crate::module::{finish_object, function_attributes, kernel_body, optimise, Compiled};
use crate::target;

/// Settings of one PTX compilation.
#[derive(Clone, Debug)]
pub struct PtxOptions {
    /// `sm_80`, `sm_90`, ...
    pub gpu: String,
    pub max_tokens_per_call: usize,
    pub fusion: String,
    /// The KV cache's element type (f32 or f16).
    pub kv_dtype: q3c_ir::DType,
    /// [`q3c_ir::DType::Q8`] or [`q3c_ir::DType::Q4`]: the matrices of linear-type products bound in that
    /// format (`q3c_backend_common::plan::plan_with`), read by [`crate::gpu_quant`]; `None`: as stored.
    pub quantize: Option<q3c_ir::DType>,
    /// Products over bf16 weights whose shape tensor cores take (panels of 16, `k` a multiple of 16: nearly
    /// all) round the activations to bf16 and, for calls of many rows, run on tensor cores
    /// ([`crate::gpu_mma`]; sm_80 and later). Off: f32 activations, FMA blocks.
    pub bf16_activations: bool,
}

/// A PTX module: one `.entry` per distinct kernel.
pub struct PtxModule {
    pub ptx: String,
    /// The entry point each kernel dispatch of a forward call launches, in order (names repeat where nodes
    /// share a kernel).
    pub kernels: Vec<String>,
    /// The manifest: weights, KV geometry, scratch size, and (`launch`) every dispatch of a forward call.
    pub manifest: Manifest,
    /// Every dispatch of a forward call: kernel, argument block, work items.
    pub launch: LaunchPlan,
}

impl PtxModule {
    /// The CUDA artifact holding this module and its manifest (`q3c_abi::cuda`).
    pub fn cuda_artifact(&self) -> Vec<u8> {
        let manifest = serde_json::to_vec(&self.manifest).expect("a manifest serialises");
        q3c_abi::cuda::encode(&manifest, &self.ptx)
    }
}

/// Where an entry point finds its work item.
#[derive(Clone, Copy, PartialEq)]
enum Indices {
    /// `entry(args, items)`: block, threads per block and thread from PTX's special registers.
    Registers,
    /// `entry(args, items, block, threads, thread)`: the launcher passes them.
    Parameters,
}

/// How the threads of a GPU block share a work item of `body`: a block of `products`' shape per matrix
/// product of a linear-type node ([`crate::gpu_gemm`]); a block of [`ROW_THREADS`] for the row kernels
/// whose loops over a row's elements split across threads (`q3c_kernels`' `map_row` and `dot`), and for
/// attention and RoPE, whose warps take parts of the item (attention's key blocks; RoPE's heads, a warp
/// for each) and whose lanes split a row; else one thread.
fn item_share(graph: &Graph, body: Body, products: ProductShape) -> ItemShare {
    match body {
        Body::Node(id) => match graph.node(id).op {
            // An expert product's item is a (panel, used expert) pair: the same panel product over that
            // expert's rows, so a block as for the dense ones.
            Op::Linear
            | Op::SwiGlu
            | Op::LinearGroup { .. }
            | Op::ExpertLinear
            | Op::ExpertSwiGlu => ItemShare::Product(products),
            Op::RmsNorm { .. } | Op::AddRmsNorm { .. } | Op::Embedding | Op::KvAppend { .. } => {
                ItemShare::Rows(ROW_THREADS)
            }
            // A part per warp of the largest block: at batch 1 the items are the KV heads (8 for
            // Qwen3-8B), so the parts are all the warps that take a long context's keys.
            Op::Attention { .. } => ItemShare::Rows(crate::gpu_parts::MAX_THREADS),
            // A warp per head (up to 32): each head's work is one short dependent chain.
            Op::Rope(_) | Op::NormRope { .. } => {
                let heads = q3c_backend_common::items::dims(graph, id)[1];
                ItemShare::Rows(WARP * heads.clamp(1, MAX_ROPE_WARPS))
            }
            _ => ItemShare::One,
        },
        _ => ItemShare::One,
    }
}

/// Threads of a row kernel's block.
const ROW_THREADS: usize = 256;
/// Warps of a RoPE block at most (a block has at most 1024 threads).
const MAX_ROPE_WARPS: usize = 32;

/// The memory plan of `graph` for GPUs: weights as stored, or the products' matrices (dense and experts')
/// quantized as `opts.quantize` asks.
fn gpu_plan(graph: &Graph, output: &str, opts: &PtxOptions) -> Result<Plan, BackendError> {
    let mut plan = plan::plan_with(graph, output, opts.max_tokens_per_call, opts.quantize)?;
    plan.set_kv_dtype(opts.kv_dtype)?;
    Ok(plan)
}

/// The launch plan of `graph` for GPUs: `launch::build`'s, with each dispatch's threads per item and, with
/// bf16 activations, beside each product kernel that tensor cores take ([`crate::gpu_mma::takes_node`]) a
/// kernel of tensor-core tiles for its calls of at least `products.tensor_rows` rows
/// (`q3c_abi::launch::ManyRows`). `tensor[i]`: kernel `i` is such a kernel.
fn gpu_launch(
    graph: &Graph,
    plan: &mut Plan,
    products: ProductShape,
    bf16_activations: bool,
) -> Result<GpuLaunch, BackendError> {
    plan.attention_tokens = q3c_backend_common::items::GPU_ATTENTION_TOKENS;
    let mut launch = launch::build(graph, plan)?;
    if launch
        .plan
        .dispatches
        .iter()
        .any(|d| d.collective.is_some())
    {
        return Err(BackendError::Unsupported(
            "a sharded model on GPUs (collectives over NCCL are not built yet)".into(),
        ));
    }
    for d in &mut launch.plan.dispatches {
        d.threads_per_item = item_share(graph, launch.bodies[d.kernel], products).threads();
    }
    let mut tensor = vec![false; launch.plan.kernels.len()];
    if bf16_activations && products.tensor_rows > 0 {
        // The tensor-core kernel of each product kernel, made once however many nodes share it.
        let mut made = std::collections::HashMap::new();
        for d in 0..launch.plan.dispatches.len() {
            let kernel = launch.plan.dispatches[d].kernel;
            let Body::Node(id) = launch.bodies[kernel] else {
                continue;
            };
            let Some(rows_per_token) = crate::gpu_mma::takes_node(graph, plan, id) else {
                continue;
            };
            let alternative = *made.entry(kernel).or_insert_with(|| {
                let name = format!("{}_tc", launch.plan.kernels[kernel]);
                launch.plan.kernels.push(name);
                launch.bodies.push(Body::Node(id));
                tensor.push(true);
                launch.plan.kernels.len() - 1
            });
            launch.plan.dispatches[d].many_rows = Some(ManyRows {
                kernel: alternative,
                from: products.tensor_rows.div_ceil(rows_per_token),
            });
        }
    }
    Ok(GpuLaunch { launch, tensor })
}

/// A GPU launch plan and which of its kernels are tensor-core kernels ([`gpu_launch`]).
struct GpuLaunch {
    launch: launch::Launch,
    tensor: Vec<bool>,
}

/// How [`entries`] builds the entry points.
#[derive(Clone, Copy)]
struct EntryStyle {
    /// The bodies' flavour.
    flavor: Flavor,
    indices: Indices,
    /// The product kernels' blocks.
    products: ProductShape,
    /// Whether each kernel lets the next one launch and waits for the one before at its start
    /// ([`LaunchPlan::programmatic`](q3c_abi::launch::LaunchPlan::programmatic)).
    programmatic: bool,
}

/// Defines the entry points of every kernel of `launch` in `m`, as `style` says.
///
/// A single-thread kernel runs work item `block · threads + thread`. A kernel whose items take several
/// threads runs item `block` with every thread of the block on the GPU; on the CPU (`Indices::Parameters`)
/// thread 0 of the block runs the whole item with the CPU's code and the others return.
fn entries<'ctx>(
    cx: &'ctx Context,
    m: &Module<'ctx>,
    graph: &Graph,
    plan: &Plan,
    launch: &GpuLaunch,
    style: EntryStyle,
) -> Result<Vec<FunctionValue<'ctx>>, BackendError> {
    let GpuLaunch { launch, tensor } = launch;
    let EntryStyle {
        flavor,
        indices,
        products,
        programmatic,
    } = style;
    let (i32t, i64t) = (cx.i32_type(), cx.i64_type());
    let ptr = cx.ptr_type(AddressSpace::default());
    let mut out = Vec::new();
    for ((name, body), &tensor) in launch.plan.kernels.iter().zip(&launch.bodies).zip(tensor) {
        if let Body::Stage { .. } = body {
            return Err(BackendError::Internal(format!(
                "no staging kernels on GPUs yet ({name})"
            )));
        }
        let share = match tensor {
            true => ItemShare::Tensor(products),
            false => item_share(graph, *body, products),
        };
        let cooperative = share != ItemShare::One;
        let body = kernel_body(
            cx,
            m,
            graph,
            plan,
            *body,
            &format!("{name}_body"),
            flavor,
            share,
        )?;
        let inline = Attribute::get_named_enum_kind_id("alwaysinline");
        body.add_attribute(AttributeLoc::Function, cx.create_enum_attribute(inline, 0));
        let params: Vec<_> = match indices {
            Indices::Registers => vec![ptr.into(), i64t.into()],
            Indices::Parameters => vec![
                ptr.into(),
                i64t.into(),
                i64t.into(),
                i64t.into(),
                i64t.into(),
            ],
        };
        let entry = m.add_function(name, cx.void_type().fn_type(&params, false), None);
        function_attributes(cx, entry);
        let fb = Fb::new(cx, m, entry, flavor);
        if programmatic {
            // The next kernel may launch as soon as all of this one's blocks have started (they then
            // wait), and this one waits until the one before has finished and its writes are visible,
            // before reading anything. Measured on an H200 against letting the next one launch after
            // this one's work (decode the same, prefill 0.92-0.98×) or not at all (decode 0.98×).
            griddepcontrol(&fb, "launch_dependents");
            griddepcontrol(&fb, "wait");
        }
        let param = |i| -> IntValue<'ctx> {
            entry
                .get_nth_param(i)
                .expect("entry params")
                .into_int_value()
        };
        let [block, threads, thread] = match indices {
            Indices::Registers => ["ctaid", "ntid", "tid"].map(|r| {
                let name = format!("llvm.nvvm.read.ptx.sreg.{r}.x");
                let f = m
                    .get_function(&name)
                    .unwrap_or_else(|| m.add_function(&name, i32t.fn_type(&[], false), None));
                let v = fb.call(f, &[]).into_int_value();
                fb.b.build_int_z_extend(v, i64t, "").expect(BUG)
            }),
            Indices::Parameters => [param(2), param(3), param(4)],
        };
        let (item, inside) = if cooperative {
            let inside = fb.icmp(inkwell::IntPredicate::ULT, block, param(1));
            let inside = match indices {
                Indices::Registers => inside,
                Indices::Parameters => {
                    let first = fb.icmp(inkwell::IntPredicate::EQ, thread, fb.i64c(0));
                    fb.b.build_and(inside, first, "").expect(BUG)
                }
            };
            (block, inside)
        } else {
            let item = fb.add(fb.b.build_int_mul(block, threads, "").expect(BUG), thread);
            (item, fb.icmp(inkwell::IntPredicate::ULT, item, param(1)))
        };
        let args = entry.get_nth_param(0).expect("entry params");
        fb.when(inside, |fb| {
            let next = fb.add_c(item, 1);
            fb.b.build_call(body, &[args.into(), item.into(), next.into()], "")
                .expect(BUG);
        });
        fb.b.build_return(None).expect(BUG);
        fb.finish();
        if indices == Indices::Registers {
            // An entry point, and its block's bounds: a row kernel's block has exactly its threads, so
            // ptxas keeps the registers to what a block that size can have (a 1024-thread block, at most 64
            // per thread). Products go without unless their shape asks for several blocks per SM (with only
            // the block size, ptxas gave them more registers or spills, for the same occupancy).
            let bounds = match share {
                ItemShare::Rows(n) => vec![("maxntidx", n)],
                ItemShare::Product(p) if p.min_blocks > 0 => {
                    vec![("maxntidx", p.threads), ("minctasm", p.min_blocks)]
                }
                _ => Vec::new(),
            };
            for (key, value) in [("kernel", 1)].into_iter().chain(bounds) {
                let md = cx.metadata_node(&[
                    entry.as_global_value().as_pointer_value().into(),
                    cx.metadata_string(key).into(),
                    i32t.const_int(value as u64, false).into(),
                ]);
                m.add_global_metadata("nvvm.annotations", &md)
                    .map_err(|e| BackendError::Internal(e.to_string()))?;
            }
        }
        out.push(entry);
    }
    Ok(out)
}

/// PTX `griddepcontrol.WHAT` (sm_90), ordered with every memory access around it.
fn griddepcontrol(fb: &Fb<'_, '_>, what: &str) {
    let ty = fb.cx.void_type().fn_type(&[], false);
    let f = fb.cx.create_inline_asm(
        ty,
        format!("griddepcontrol.{what};"),
        "~{memory}".into(),
        true,
        false,
        None,
        false,
    );
    fb.b.build_indirect_call(ty, f, &[], "").expect(BUG);
}

/// The manifest's `matmul_activations` for `opts`.
fn activations(opts: &PtxOptions) -> &'static str {
    match opts.bf16_activations {
        true => "bf16",
        false => "f32",
    }
}

/// Compiles every kernel of `graph` to PTX for `opts.gpu`: entry `q3c_kN_op(args, items)` runs work item
/// `blockIdx.x · blockDim.x + threadIdx.x` if it is below `items` (items as in `work_items`).
pub fn compile_ptx(
    graph: &Graph,
    cfg: &Qwen3Config,
    output: &str,
    opts: &PtxOptions,
) -> Result<PtxModule, BackendError> {
    launch::check(graph, opts.max_tokens_per_call)?;
    let machine = target::ptx(&opts.gpu)?;
    if opts.bf16_activations && !target::bf16_tensor_cores(&opts.gpu) {
        return Err(BackendError::Unsupported(format!(
            "bf16 activations on GPUs run on bf16 tensor cores, which {} lacks (sm_80 and later)",
            opts.gpu
        )));
    }
    let programmatic = target::programmatic_launches(&opts.gpu);
    let mut plan = gpu_plan(graph, output, opts)?;
    let products = ProductShape::get().map_err(BackendError::Unsupported)?;
    let mut gpu_launch = gpu_launch(graph, &mut plan, products, opts.bf16_activations)?;
    gpu_launch.launch.plan.programmatic = programmatic;
    let cx = Context::create();
    let m = cx.create_module("q3c_kernels");
    entries(
        &cx,
        &m,
        graph,
        &plan,
        &gpu_launch,
        EntryStyle {
            flavor: Flavor::Gpu {
                bf16_dot: opts.bf16_activations,
            },
            indices: Indices::Registers,
            products,
            programmatic,
        },
    )?;
    let launch = gpu_launch.launch;
    optimise(&m, &machine)?;
    let ptx = machine
        .write_to_memory_buffer(&m, FileType::Assembly)
        .map_err(|e| {
            BackendError::Internal(format!("LLVM PTX codegen: {}", e.to_string_lossy()))
        })?;
    let ptx = String::from_utf8_lossy(ptx.as_slice())
        .trim_end_matches('\0')
        .to_string();
    let names: Vec<String> = launch
        .plan
        .dispatches
        .iter()
        .map(|d| launch.plan.kernels[d.kernel].clone())
        .collect();
    let mut manifest = manifest::build(ManifestParts {
        cfg,
        plan: &plan,
        backend: q3c_abi::cuda::BACKEND,
        fusion: &opts.fusion,
        matmul_activations: activations(opts),
        target_cpu: &opts.gpu,
        required_cpu_features: Vec::new(),
        kernels: names.len(),
    });
    manifest.launch = Some(launch.plan.clone());
    Ok(PtxModule {
        ptx,
        kernels: names,
        manifest,
        launch: launch.plan,
    })
}

/// Compiles the GPU flavour of `graph` for this CPU: the kernels [`compile_ptx`] emits, as exported
/// functions `q3c_kN_op(args, items, block, threads, thread)`, with the launch plan in the manifest and no
/// `q3c_forward`; the runtime launches them (`q3c_runtime`'s launcher).
pub fn compile_gpu_emulation(
    graph: &Graph,
    cfg: &Qwen3Config,
    output: &str,
    opts: &PtxOptions,
) -> Result<Compiled, BackendError> {
    launch::check(graph, opts.max_tokens_per_call)?;
    let target = target::cpu("native", false)?;
    let mut plan = gpu_plan(graph, output, opts)?;
    let products = ProductShape::get().map_err(BackendError::Unsupported)?;
    let gpu_launch = gpu_launch(graph, &mut plan, products, opts.bf16_activations)?;
    let cx = Context::create();
    let m = cx.create_module("q3c_gpu_on_cpu");
    let functions = entries(
        &cx,
        &m,
        graph,
        &plan,
        &gpu_launch,
        EntryStyle {
            flavor: Flavor::GpuOnCpu {
                bf16_dot: opts.bf16_activations,
            },
            indices: Indices::Parameters,
            products,
            programmatic: false,
        },
    )?;
    let launch = gpu_launch.launch;
    for f in &functions {
        f.set_linkage(Linkage::External);
        f.add_attribute(
            AttributeLoc::Function,
            cx.create_string_attribute("target-cpu", &target.cpu),
        );
    }
    let mut manifest = manifest::build(ManifestParts {
        cfg,
        plan: &plan,
        backend: "llvm-gpu-emulation",
        fusion: &opts.fusion,
        matmul_activations: activations(opts),
        target_cpu: &target.cpu,
        required_cpu_features: target.required.clone(),
        kernels: launch.plan.dispatches.len(),
    });
    manifest.launch = Some(launch.plan);
    finish_object(&cx, &m, &target.machine, manifest)
}
