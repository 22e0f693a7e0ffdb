//! The q3c compiler front end: lowering a Qwen3 config to the graph IR.
//!
//! Passes over the IR (fusions) and the pipeline that orders them live here too as they arrive; code
//! generation lives in `backends/`.

pub mod lower;

pub use lower::{lower, rope_spec, LOGITS};
