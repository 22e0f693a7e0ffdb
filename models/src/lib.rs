//! Qwen3 model definitions: the data that describes a model, nothing that executes it.
//!
//! - [`Qwen3Config`]: a checked `config.json` (both transformers 4.x and 5.x spellings).
//! - [`registry`]: the eight released models by name.
//! - [`tensors`]: the checkpoint tensor names and shapes a config implies.
//! - [`Checkpoint`]: memory-mapped safetensors (single or sharded), checked against a config.
//! - [`source`]: turns a user's MODEL argument (name, `config.json`, directory) into a config.

pub mod checkpoint;
pub mod config;
pub mod dtype;
pub mod random;
pub mod registry;
pub mod source;
pub mod tensors;
pub mod writer;

pub use checkpoint::{Checkpoint, CheckpointError, Packed, TensorRef};
pub use config::{ConfigError, MoeConfig, Qwen3Config, YarnScaling};
pub use dtype::DType;
pub use source::{resolve, ModelSource, SourceError};

#[cfg(test)]
mod tests;
