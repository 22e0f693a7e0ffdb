//! The q3c runtime: executes models and decodes.
//!
//! - [`Session`]: the interface of every executor (one KV cache per session); [`Batch`]: several
//!   sequences fed together.
//! - [`reference`]: the reference executor, which runs the IR directly in plain f32 Rust. It is the oracle
//!   every backend and pass is tested against.
//! - [`compiled`]: loads ahead-of-time compiled artifacts (`model.so`) and runs them on a thread pool.
//! - [`Model`]: a loaded model of either kind, as every surface (CLI, server, C API) holds it.
//! - [`generate`]: the plain decoding loop over token ids.
//! - [`text`]: tokenizer, chat template, streaming detokenisation; [`sampling`]: the token sampler;
//!   [`chat`]: chat decoding with the thinking block and its budget.
//!
//! The runtime never depends on the compiler or on a code generator: it receives a graph (for the
//! reference executor) or, later, a compiled artifact.

pub mod batch;
pub mod chat;
pub mod compiled;
mod error;
pub mod generate;
mod model;
pub mod reference;
pub mod sampling;
pub mod scheduler;
mod session;
pub mod stats;
pub mod text;

pub use batch::{Batch, SeqId, SessionBatch};
pub use compiled::{
    CollectiveStats, CompiledBatch, CompiledModel, CompiledSession, Residency, ThreadTransport,
    Transport,
};
pub use error::RuntimeError;
pub use generate::{generate, GenerateOptions};
pub use model::Model;
pub use reference::{ReferenceModel, ReferenceSession};
pub use sampling::{Sampler, SamplingOverrides, SamplingParams};
pub use scheduler::{BatchedSession, Scheduler};
pub use session::{Logits, Session};
