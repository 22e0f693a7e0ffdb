//! The launch plan of a graph ([`q3c_abi::launch`]): which kernel each node runs, with which arguments,
//! over how many work items — built once here for every backend and every launcher.
//!
//! Nodes whose code would be identical share one kernel (every layer's, typically), so compile time and
//! code size follow the distinct shapes, not the number of layers ([`kernel_key`]).
//!
//! An expert product ([`Op::ExpertLinear`], [`Op::ExpertSwiGlu`]) runs as a grouped GEMM in four
//! dispatches: the (token, slot) rows are grouped by expert ([`MoeStep::Group`], a counting sort), their
//! activations gathered into expert order ([`MoeStep::Gather`]), each expert's weight panels multiplied
//! with all of its rows as one register-tiled product (the node's own kernel), and the results put back
//! in (token, slot) order ([`MoeStep::Scatter`]). Each expert's weights are then read once per call,
//! not once per token that chose it. The rows live in an area after every other scratch buffer
//! ([`MoeArea`]).

use std::collections::HashMap;

use q3c_abi::launch::{Arg, Collective, Dispatch, LaunchPlan, NO_KERNEL};
use q3c_ir::{Graph, NodeId, Op};

use crate::items::{dims, element_dims, in_dtype, work_items};
use crate::plan::{self, Loc, Plan};
use crate::BackendError;

/// What a kernel of the plan computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    /// The kernel of a graph node (the first of the nodes sharing it).
    Node(NodeId),
    /// Prepares rows of `k` f32 activations for the matrix product after it (see [`Launch::stage`]).
    Stage { prep: Prep, k: usize },
    /// A step of a grouped expert product (see the module documentation).
    Moe(MoeStep),
    /// Moves the step's logit rows (`row_bytes` each) of its one argument to the front, in order (one work
    /// item; nothing when the step asks for every row): the logits products then read `n_logits` rows.
    Compact { row_bytes: usize },
}

/// The steps around a grouped expert product, for every backend (bodies in `q3c_kernels::moe`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MoeStep {
    /// `args = [T, step, ids i32[T, slots], offsets i32[2·experts + 2], order i32[T·slots]]`, one item:
    /// `order` lists the rows `token · slots + slot` grouped by expert (ascending within an expert), and
    /// expert `e`'s rows are `order[offsets[e] .. offsets[e + 1]]`; `offsets[experts + 1]` is the number `u`
    /// of experts with rows and `offsets[experts + 2 ..][..u]` are their ids, ascending. With `split`, the
    /// stack is one rank's part of a stack split by experts: its `experts` are the part's, from id
    /// `part · experts` on (ids and `offsets` count from there), and the rows of other parts' experts are
    /// dropped — placed after `offsets[experts]`, in no expert's range.
    Group {
        experts: usize,
        slots: usize,
        split: Option<ExpertSplit>,
    },
    /// `args = [T, step, x, order, rows]`, one item per row `p` of `order`: row `p` of `rows` (`k` f32)
    /// is the activation of row `order[p]`: `x`'s token row when `per_slot` is false (x is `[T, 1, k]`),
    /// its (token, slot) row otherwise.
    Gather {
        k: usize,
        slots: usize,
        per_slot: bool,
    },
    /// `args = [T, step, rows, order, out, offsets]`, one item per row `p`: row `order[p]` of `out` (`n`
    /// f32) is row `p` of `rows` — or zero, with `dropped_after = Some(experts)`, for a row the grouping
    /// dropped (`p ≥ offsets[experts]`).
    Scatter {
        n: usize,
        dropped_after: Option<usize>,
    },
}

/// How a stack split by experts is shared out: rank `r` of `ranks` holds part `r · parts / ranks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExpertSplit {
    pub parts: usize,
    pub ranks: usize,
}

impl ExpertSplit {
    /// The split of expert stack `stack` (a weight node), if it is split by experts.
    pub fn of(graph: &Graph, stack: NodeId) -> Option<ExpertSplit> {
        match graph.node(stack).op {
            Op::Weight { shard: Some(s), .. } if s.axis == 0 && expert_stack(graph, stack) => {
                Some(ExpertSplit {
                    parts: s.parts as usize,
                    ranks: s.ranks as usize,
                })
            }
            _ => None,
        }
    }
}

/// Where the rows of grouped expert products live: byte offsets into the scratch arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoeArea {
    pub offsets: usize,
    pub order: usize,
    /// Activations in expert order (`max_tokens · slots` rows of the widest `k`).
    pub rows_in: usize,
    /// Products in expert order (`max_tokens · slots` rows of the widest `n`).
    pub rows_out: usize,
}

/// What a staging kernel makes of an activation row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Prep {
    /// 8-bit groups with scales (for `q8` weights).
    Q8,
    /// Rounded to bf16 (for bf16 dot products).
    Bf16,
}

/// A launch plan with the body of each of its kernels.
pub struct Launch {
    pub plan: LaunchPlan,
    /// `bodies[i]` is what `plan.kernels[i]` computes.
    pub bodies: Vec<Body>,
    /// The node each dispatch runs (`None` for staging dispatches).
    pub nodes: Vec<Option<NodeId>>,
    /// Tokens per attention item (the plan's).
    attention_tokens: usize,
}

/// Checks what every backend needs of a graph before compiling it.
pub fn check(graph: &Graph, max_tokens: usize) -> Result<(), BackendError> {
    q3c_ir::verify(graph).map_err(|e| BackendError::Internal(e.to_string()))?;
    if max_tokens == 0 {
        return Err(BackendError::Unsupported(
            "max tokens per call must be at least 1".into(),
        ));
    }
    Ok(())
}

/// The launch plan of `graph` under the memory plan `plan`. Grouped expert products take an area after
/// the plan's scratch buffers (`plan.scratch_bytes_per_token` grows to cover it).
pub fn build(graph: &Graph, plan: &mut Plan) -> Result<Launch, BackendError> {
    let moe = moe_area(graph, plan);
    let plan = &*plan;
    let mut launch = Launch {
        plan: LaunchPlan {
            kernels: Vec::new(),
            dispatches: Vec::new(),
            threads_per_block: q3c_abi::launch::THREADS_PER_BLOCK,
            programmatic: false,
        },
        bodies: Vec::new(),
        nodes: Vec::new(),
        attention_tokens: plan.attention_tokens,
    };
    let mut by_key: HashMap<String, usize> = HashMap::new();
    // The ids node whose grouping the MoE area holds.
    let mut grouped: Option<NodeId> = None;
    // The logits output, and the product whose rows it takes (itself, or what it gathers from the ranks).
    let logits_out = plan
        .loc
        .iter()
        .find(|(_, &l)| l == Loc::Logits)
        .map(|(&id, _)| id);
    let logits_product = logits_out.and_then(|out| plan::logits_product(graph, out));
    for (n, &id) in plan.order.iter().enumerate() {
        let op = &graph.node(id).op;
        if op.is_leaf() || op.is_view() {
            continue;
        }
        if let Some(collective) = collective(op) {
            let x = graph.inputs(id)[0];
            launch.plan.dispatches.push(Dispatch {
                kernel: NO_KERNEL,
                args: vec![arg(plan.input_loc(graph, id, 0)), arg(plan.loc[&id])],
                items: element_dims(graph, x, 0)[1..].iter().product(),
                per_token: true,
                tokens_per_item: 1,
                logits: Some(id) == logits_out,
                threads_per_item: 1,
                collective: Some(collective),
                many_rows: None,
            });
            launch.nodes.push(Some(id));
            continue;
        }
        let kernel = *by_key
            .entry(kernel_key(graph, plan, id))
            .or_insert_with(|| {
                launch.plan.kernels.push(format!("q3c_k{n}_{}", op.name()));
                launch.bodies.push(Body::Node(id));
                launch.bodies.len() - 1
            });
        let mut args = Vec::new();
        for (i, &input) in graph.inputs(id).iter().enumerate() {
            args.push(match plan.input_loc(graph, id, i) {
                Loc::Weight { index, .. } if expert_stack(graph, input) => Arg::WeightTable(index),
                loc => arg(loc),
            });
        }
        let outs = plan
            .elements
            .get(&id)
            .cloned()
            .unwrap_or_else(|| vec![plan.loc[&id]]);
        args.extend(outs.into_iter().map(arg));
        if let (true, Some(area)) = (is_expert_product(op), moe) {
            launch.grouped_product(graph, id, kernel, args, area, &mut grouped);
            continue;
        }
        let logits = Some(id) == logits_out || Some(id) == logits_product;
        if Some(id) == logits_product {
            // The logits product runs last, so its source is free to be compacted in place.
            let row_bytes = plan::bytes_per_token(graph, graph.inputs(id)[0])?;
            let compact = launch.kernel_of(Body::Compact { row_bytes }, || {
                format!("q3c_compact_{row_bytes}")
            });
            launch.plan.dispatches.push(Dispatch {
                kernel: compact,
                args: vec![args[0]],
                items: 1,
                per_token: false,
                tokens_per_item: 1,
                logits: false,
                threads_per_item: 1,
                collective: None,
                many_rows: None,
            });
            launch.nodes.push(None);
        }
        launch.push_node(graph, id, kernel, args, logits);
    }
    Ok(launch)
}

/// The collective the runtime runs for `op`, if it is one.
fn collective(op: &Op) -> Option<Collective> {
    match *op {
        Op::AllReduce { parts, .. } => Some(Collective::AllReduce {
            parts: parts as usize,
        }),
        Op::AllGather { .. } => Some(Collective::AllGather),
        _ => None,
    }
}

impl Launch {
    /// Appends the dispatch of node `id` over its work items.
    fn push_node(
        &mut self,
        graph: &Graph,
        id: NodeId,
        kernel: usize,
        args: Vec<Arg>,
        logits: bool,
    ) {
        let items = work_items(graph, id, self.attention_tokens);
        self.plan.dispatches.push(Dispatch {
            kernel,
            args,
            items: items.count,
            per_token: items.scales_with_t,
            tokens_per_item: items.tokens_per_item,
            logits,
            threads_per_item: 1,
            collective: None,
            many_rows: None,
        });
        self.nodes.push(Some(id));
    }

    /// The dispatches of expert product `id` (kernel `kernel`, node arguments `args`): group its ids
    /// unless the area already holds their grouping, gather, multiply, scatter.
    fn grouped_product(
        &mut self,
        graph: &Graph,
        id: NodeId,
        kernel: usize,
        mut args: Vec<Arg>,
        area: MoeArea,
        grouped: &mut Option<NodeId>,
    ) {
        let ids = graph.inputs(id)[1];
        let x_dims = dims(graph, graph.inputs(id)[0]);
        let out = dims(graph, id);
        let (slots, n, k) = (out[1], out[2], x_dims[2]);
        let experts = element_dims(graph, graph.inputs(id)[2], 0)[0];
        let split = ExpertSplit::of(graph, graph.inputs(id)[2]);
        let scratch = Arg::Scratch;
        if *grouped != Some(ids) {
            let step = MoeStep::Group {
                experts,
                slots,
                split,
            };
            let at = [args[1], scratch(area.offsets), scratch(area.order)];
            self.helper(step, at.to_vec(), 1, false);
            *grouped = Some(ids);
        }
        let per_slot = x_dims[1] != 1;
        let gather = MoeStep::Gather { k, slots, per_slot };
        let at = [args[0], scratch(area.order), scratch(area.rows_in)];
        self.helper(gather, at.to_vec(), slots, true);
        let out = args.pop().expect("one output");
        args[0] = scratch(area.rows_in);
        args[1] = scratch(area.offsets);
        args.push(scratch(area.rows_out));
        self.push_node(graph, id, kernel, args, false);
        let at = [
            scratch(area.rows_out),
            scratch(area.order),
            out,
            scratch(area.offsets),
        ];
        let dropped_after = split.map(|_| experts);
        let step = MoeStep::Scatter { n, dropped_after };
        self.helper(step, at.to_vec(), slots, true);
    }

    /// Appends a dispatch of MoE step `step` (its kernel shared by every dispatch of the same step).
    fn helper(&mut self, step: MoeStep, args: Vec<Arg>, items: usize, per_token: bool) {
        let kernel = self.kernel_of(Body::Moe(step), || match step {
            MoeStep::Group {
                experts,
                slots,
                split,
            } => {
                let part = split.map_or(String::new(), |s| format!("_of{}", s.parts));
                format!("q3c_moe_group_{experts}x{slots}{part}")
            }
            MoeStep::Gather { k, slots, per_slot } => {
                format!(
                    "q3c_moe_gather_{k}x{slots}{}",
                    if per_slot { "s" } else { "" }
                )
            }
            MoeStep::Scatter { n, dropped_after } => {
                let dropping = if dropped_after.is_some() { "_d" } else { "" };
                format!("q3c_moe_scatter_{n}{dropping}")
            }
        });
        self.plan.dispatches.push(Dispatch {
            kernel,
            args,
            items,
            per_token,
            tokens_per_item: 1,
            logits: false,
            threads_per_item: 1,
            collective: None,
            many_rows: None,
        });
        self.nodes.push(None);
    }

    /// The kernel computing `body` (not a node's), added as `name()` if the plan has none yet.
    fn kernel_of(&mut self, body: Body, name: impl FnOnce() -> String) -> usize {
        match self.bodies.iter().position(|b| *b == body) {
            Some(i) => i,
            None => {
                self.plan.kernels.push(name());
                self.bodies.push(body);
                self.bodies.len() - 1
            }
        }
    }

    /// Dispatches that run a graph node (staging and MoE steps left out).
    pub fn node_dispatches(&self) -> usize {
        self.nodes.iter().filter(|n| n.is_some()).count()
    }

    /// Puts a staging dispatch before dispatch `at` (a matrix product): it prepares the product's
    /// activation rows (`rows_per_token` rows of `k` per token) into the scratch arena at `offset`, and the
    /// product reads them from there instead.
    pub fn stage(&mut self, at: usize, prep: Prep, k: usize, rows_per_token: usize, offset: usize) {
        let kernel = self.kernel_of(Body::Stage { prep, k }, || {
            let what = match prep {
                Prep::Q8 => "q8",
                Prep::Bf16 => "bf16",
            };
            format!("q3c_stage_{what}_{k}")
        });
        let product = &mut self.plan.dispatches[at];
        let source = std::mem::replace(&mut product.args[0], Arg::Scratch(offset));
        // For the logits, the staging dispatch too runs over the (compacted) logit rows only.
        let staging = Dispatch {
            kernel,
            args: vec![source, Arg::Scratch(offset)],
            items: rows_per_token,
            per_token: true,
            tokens_per_item: 1,
            logits: product.logits,
            threads_per_item: 1,
            collective: None,
            many_rows: None,
        };
        self.plan.dispatches.insert(at, staging);
        self.nodes.insert(at, None);
    }
}

/// Whether `op` is a product over expert stacks (run grouped, see the module documentation).
pub fn is_expert_product(op: &Op) -> bool {
    matches!(op, Op::ExpertLinear | Op::ExpertSwiGlu)
}

/// Allocates the area of grouped expert products after the plan's scratch buffers, if the graph has any.
fn moe_area(graph: &Graph, plan: &mut Plan) -> Option<MoeArea> {
    let products: Vec<NodeId> = plan
        .order
        .iter()
        .copied()
        .filter(|&id| is_expert_product(&graph.node(id).op))
        .collect();
    let widest = |f: &dyn Fn(NodeId) -> usize| products.iter().map(|&id| f(id)).max();
    let experts = widest(&|id| element_dims(graph, graph.inputs(id)[2], 0)[0])?;
    let slots = widest(&|id| dims(graph, id)[1])?;
    let k = widest(&|id| dims(graph, graph.inputs(id)[0])[2])?;
    let n = widest(&|id| dims(graph, id)[2])?;
    let rows = plan.max_tokens * slots;
    let align = |b: usize| b.div_ceil(64) * 64;
    let offsets = align(plan.scratch_bytes_per_token * plan.max_tokens);
    let order = offsets + align(4 * (2 * experts + 2));
    let rows_in = order + align(4 * rows);
    let rows_out = rows_in + align(4 * k * rows);
    let end = rows_out + 4 * n * rows;
    plan.scratch_bytes_per_token = end.div_ceil(plan.max_tokens);
    Some(MoeArea {
        offsets,
        order,
        rows_in,
        rows_out,
    })
}

fn arg(loc: Loc) -> Arg {
    match loc {
        Loc::Weight { index, .. } => Arg::Weight(index),
        // Positions are not materialised (kernels read them from the step); the word holds the ids.
        Loc::Ids | Loc::Positions => Arg::Ids,
        Loc::Scratch { offset } => Arg::Scratch(offset),
        Loc::Cache { slot } => Arg::Cache(slot),
        Loc::Logits => Arg::Logits,
    }
}

/// Whether weight node `id` is an expert stack (`E` table entries, passed as the table's address).
pub fn expert_stack(graph: &Graph, id: NodeId) -> bool {
    matches!(&graph.node(id).op, Op::Weight { name, .. }
        if name.contains(q3c_models::tensors::EXPERT_PLACEHOLDER))
}

/// Everything a kernel's code depends on: the op (a cache write's layer erased: the cache arrives as a
/// pointer), the types of its inputs and result, and the dtype each input is read in.
pub fn kernel_key(graph: &Graph, plan: &Plan, id: NodeId) -> String {
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
