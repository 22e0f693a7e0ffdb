//! The q3c compiler front end: lowering a Qwen3 config to the graph IR, and the fusion passes over it.
//!
//! - [`lower`]: one parameterised builder for every Qwen3 size.
//! - [`passes`]: one file per fusion; [`pipeline`]: their order, strategies, and the verifying runner.
//! - [`metrics`]: kernels and activation traffic per token, read off a graph.
//!
//! Code generation lives in `backends/`.

pub mod lower;
pub mod metrics;
pub mod passes;
pub mod pipeline;

pub use lower::{lower, lower_sharded, rope_spec, MoeSplit, Sharding, LOGITS};
pub use pipeline::{PipelineError, Strategy};
