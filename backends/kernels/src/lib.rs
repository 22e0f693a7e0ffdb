//! q3c's kernels, written once for every backend.
//!
//! - [`builder::KernelBuilder`]: the vocabulary of a kernel body (loops, loads and stores of each dtype,
//!   f32 scalar and vector arithmetic, `exp`/`silu`, matrix-product entry points). Each code generator
//!   implements it once: Cranelift's `Emit`, LLVM's `Fb` (CPU, or GPU flavoured).
//! - [`ops::emit`]: one body per op over that trait, specialised to a node's constant dims;
//!   [`moe::emit`]: the steps around grouped expert products.
//! - [`forward::build`]: `q3c_forward` from the launch plan ([`q3c_backend_common::launch`]), over
//!   [`builder::EntryBuilder`].
//!
//! Adding an op means one arm in [`ops::emit`] (the match is exhaustive); adding a backend means one
//! implementation of the two traits.

pub mod builder;
pub mod forward;
mod kv;
pub mod moe;
pub mod ops;

pub use builder::{EntryBuilder, KernelBuilder, MatMul};

use q3c_backend_common::items::dims;
use q3c_backend_common::launch::Body;
use q3c_backend_common::plan::Plan;
use q3c_backend_common::BackendError;
use q3c_ir::{Graph, NodeId, Op};

/// Emits the body of a launch-plan kernel written here: a node's ([`ops::emit`], `rope_table` the address
/// of its frequency table) or a MoE step's ([`moe::emit`]). Staging bodies are each backend's own.
pub fn emit_body<B: KernelBuilder>(
    b: &mut B,
    graph: &Graph,
    plan: &Plan,
    body: Body,
    params: ops::Params<B>,
    rope_table: Option<B::Ptr>,
) -> Result<(), BackendError> {
    match body {
        Body::Node(id) => ops::emit(b, graph, plan, id, params, rope_table),
        Body::Moe(step) => {
            moe::emit(b, step, params);
            Ok(())
        }
        Body::Compact { row_bytes } => {
            ops::compact(b, row_bytes, params);
            Ok(())
        }
        Body::Stage { .. } => Err(BackendError::Internal(format!(
            "{body:?} has no body common to every backend"
        ))),
    }
}

/// The graph node a kernel body is specialised to, if any.
pub fn body_node(body: Body) -> Option<NodeId> {
    match body {
        Body::Node(id) => Some(id),
        _ => None,
    }
}

/// The RoPE inverse frequencies a rope node's kernel reads from its table, or `None` for other ops.
pub fn rope_table(graph: &Graph, id: NodeId) -> Option<Vec<f32>> {
    match &graph.node(id).op {
        Op::Rope(spec) | Op::NormRope { rope: spec, .. } => Some(spec.inv_freq(dims(graph, id)[2])),
        _ => None,
    }
}
