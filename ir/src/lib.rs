//! The q3c graph IR.
//!
//! A model is a dataflow [`Graph`] of [`Node`]s, each a closed [`Op`] with a result [`TensorType`]
//! (dtype and [`Shape`], where shapes may use the symbolic lengths `T` and `KV`). The crate knows nothing
//! of Qwen3 or of any backend: models lower into it, passes rewrite it, executors and code generators
//! read it.
//!
//! - [`verify`] checks every invariant and reports all violations with their node.
//! - [`text::print`] / [`text::parse`] are the stable text form (they round-trip).
//! - [`dot::to_dot`] exports Graphviz.

pub mod dot;
mod graph;
mod op;
mod rope;
pub mod text;
mod types;
mod verify;

pub use graph::{Graph, Node, NodeId, TypeError};
pub use op::{InputKind, KvKind, Op, Shard};
pub use rope::{RopeSpec, Yarn};
pub use types::{DType, Dim, Shape, TensorType, Type, Q8_GROUP, Q8_PANEL};
pub use verify::{verify, VerifierError, VerifierErrors};

#[cfg(test)]
mod tests;
