//! [`Model`]: a loaded model of any kind, behind one interface for every surface (CLI, server, C API,
//! tests): sessions, the model's end-of-sequence ids and how long a conversation may grow.

use crate::batch::{Batch, SessionBatch};
use crate::compiled::{CompiledModel, DEFAULT_CONTEXT};
use crate::reference::ReferenceModel;
use crate::session::Session;

/// A model ready to open sessions on.
pub enum Model {
    /// The reference executor over a lowered graph (built by the caller, which owns the compiler).
    Reference {
        model: Box<ReferenceModel>,
        eos_token_ids: Vec<u32>,
    },
    /// A compiled artifact with its weights bound (or in-process JIT code).
    Compiled(Box<CompiledModel>),
}

impl Model {
    /// On rank 0 of a sharded compiled model, tells the other ranks to stop (see
    /// [`CompiledModel::release_followers`]); nothing for any other model.
    pub fn release_followers(&self) {
        if let Model::Compiled(m) = self {
            m.release_followers();
        }
    }

    /// A session with an empty KV cache of the default size.
    pub fn session(&self) -> Box<dyn Session + Send + '_> {
        match self {
            Model::Reference { model, .. } => Box::new(model.session()),
            Model::Compiled(m) => Box::new(m.session()),
        }
    }

    /// A session whose KV cache holds `tokens` (the reference executor's cache grows as needed).
    pub fn session_with_capacity(&self, tokens: usize) -> Box<dyn Session + Send + '_> {
        match self {
            Model::Reference { model, .. } => Box::new(model.session()),
            Model::Compiled(m) => Box::new(m.session_with_capacity(tokens)),
        }
    }

    /// Sequences fed together, sharing a KV cache of up to `tokens` tokens: one batched call per feed on
    /// a compiled model, one forward per sequence on the reference executor.
    pub fn batch(&self, tokens: usize) -> Box<dyn Batch + Send + '_> {
        match self {
            Model::Reference { model, .. } => {
                let model: &ReferenceModel = model;
                Box::new(SessionBatch::new(
                    Box::new(move || Box::new(model.session())),
                    tokens,
                ))
            }
            Model::Compiled(m) => Box::new(m.batch(tokens)),
        }
    }

    /// A compiled model's KV-cache element type and bytes per cached token (all layers, K and V); `None`
    /// for the reference executor.
    pub fn kv_bytes_per_token(&self) -> Option<(String, usize)> {
        match self {
            Model::Reference { .. } => None,
            Model::Compiled(m) => {
                let kv = &m.manifest().kv;
                Some((kv.dtype.clone(), kv.bytes_per_token()))
            }
        }
    }

    /// The ids that end generation.
    pub fn eos_token_ids(&self) -> &[u32] {
        match self {
            Model::Reference { eos_token_ids, .. } => eos_token_ids,
            Model::Compiled(m) => &m.config().eos_token_ids,
        }
    }

    /// Positions the model was trained for (`max_position_embeddings`); none of its own for the reference
    /// executor.
    pub fn max_positions(&self) -> usize {
        match self {
            Model::Reference { .. } => usize::MAX,
            Model::Compiled(m) => m.config().max_position_embeddings,
        }
    }

    /// Most tokens a served conversation may hold: a compiled model's `max_position_embeddings` (no
    /// limit of its own for the reference executor), capped at 8 × the default session context.
    pub fn context(&self) -> usize {
        self.max_positions().min(DEFAULT_CONTEXT * 8)
    }
}
