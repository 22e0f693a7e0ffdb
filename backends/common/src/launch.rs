//! The launch plan of a graph ([`q3c_abi::launch`]): which kernel each node runs, with which arguments,
//! over how many work items — built once here for every backend and every launcher.
//!
//! Nodes whose code would be identical share one kernel (every layer's, typically), so compile time and
//! code size follow the distinct shapes, not the number of layers ([`kernel_key`]).

use std::collections::HashMap;

use q3c_abi::launch::{Arg, Dispatch, LaunchPlan};
use q3c_ir::{Graph, NodeId, Op};

use crate::items::{in_dtype, work_items};
use crate::plan::{self, Loc, Plan};
use crate::BackendError;

/// What a kernel of the plan computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    /// The kernel of a graph node (the first of the nodes sharing it).
    Node(NodeId),
    /// Prepares rows of `k` f32 activations for the matrix product after it (see [`Launch::stage`]).
    Stage { prep: Prep, k: usize },
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

/// The launch plan of `graph` under the memory plan `plan`.
pub fn build(graph: &Graph, plan: &Plan) -> Result<Launch, BackendError> {
    let mut launch = Launch {
        plan: LaunchPlan {
            kernels: Vec::new(),
            dispatches: Vec::new(),
            threads_per_block: q3c_abi::launch::THREADS_PER_BLOCK,
        },
        bodies: Vec::new(),
        nodes: Vec::new(),
    };
    let mut by_key: HashMap<String, usize> = HashMap::new();
    for (n, &id) in plan.order.iter().enumerate() {
        let op = &graph.node(id).op;
        if op.is_leaf() || op.is_view() {
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
        let last_row = if plan.loc[&id] == Loc::Logits {
            Some(plan::bytes_per_token(graph, graph.inputs(id)[0])?)
        } else {
            None
        };
        let items = work_items(graph, id);
        launch.plan.dispatches.push(Dispatch {
            kernel,
            args,
            items: items.count,
            per_token: items.scales_with_t,
            tokens_per_item: items.tokens_per_item,
            last_row,
        });
        launch.nodes.push(Some(id));
    }
    Ok(launch)
}

impl Launch {
    /// Dispatches that run a graph node (staging dispatches left out).
    pub fn node_dispatches(&self) -> usize {
        self.nodes.iter().filter(|n| n.is_some()).count()
    }

    /// Puts a staging dispatch before dispatch `at` (a matrix product): it prepares the product's
    /// activation rows (`rows_per_token` rows of `k` per token) into the scratch arena at `offset`, and the
    /// product reads them from there instead.
    pub fn stage(&mut self, at: usize, prep: Prep, k: usize, rows_per_token: usize, offset: usize) {
        let body = Body::Stage { prep, k };
        let kernel = match self.bodies.iter().position(|b| *b == body) {
            Some(i) => i,
            None => {
                let what = match prep {
                    Prep::Q8 => "q8",
                    Prep::Bf16 => "bf16",
                };
                self.plan.kernels.push(format!("q3c_stage_{what}_{k}"));
                self.bodies.push(body);
                self.bodies.len() - 1
            }
        };
        let product = &mut self.plan.dispatches[at];
        let source = std::mem::replace(&mut product.args[0], Arg::Scratch(offset));
        // For the logits, the staging dispatch reads the last row of the source; the product then reads
        // the staged row from the start of the staging area.
        let staging = Dispatch {
            kernel,
            args: vec![source, Arg::Scratch(offset)],
            items: rows_per_token,
            per_token: true,
            tokens_per_item: 1,
            last_row: product.last_row,
        };
        product.last_row = product.last_row.map(|_| 0);
        self.plan.dispatches.insert(at, staging);
        self.nodes.insert(at, None);
    }
}

fn arg(loc: Loc) -> Arg {
    match loc {
        Loc::Weight { index, .. } => Arg::Weight(index),
        // Positions are not materialised (kernels compute past + t); the word holds the ids.
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
