//! q3c's kernels, written once for every backend.
//!
//! - [`builder::KernelBuilder`]: the vocabulary of a kernel body (loops, loads and stores of each dtype,
//!   f32 scalar and vector arithmetic, `exp`/`silu`, matrix-product entry points). Each code generator
//!   implements it once: Cranelift's `Emit`, LLVM's `Fb` (CPU, or GPU flavoured).
//! - [`ops::emit`]: one body per op over that trait, specialised to a node's constant dims.
//! - [`forward::build`]: `q3c_forward` from the launch plan ([`q3c_backend_common::launch`]), over
//!   [`builder::EntryBuilder`].
//!
//! Adding an op means one arm in [`ops::emit`] (the match is exhaustive); adding a backend means one
//! implementation of the two traits.

pub mod builder;
pub mod forward;
pub mod ops;

pub use builder::{EntryBuilder, KernelBuilder, MatMul};

use q3c_backend_common::items::dims;
use q3c_ir::{Graph, NodeId, Op};

/// The RoPE inverse frequencies a rope node's kernel reads from its table, or `None` for other ops.
pub fn rope_table(graph: &Graph, id: NodeId) -> Option<Vec<f32>> {
    match &graph.node(id).op {
        Op::Rope(spec) | Op::NormRope { rope: spec, .. } => Some(spec.inv_freq(dims(graph, id)[2])),
        _ => None,
    }
}
