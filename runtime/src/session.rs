//! The interface every executor offers: a session with its own KV cache that turns token ids into logits.

use crate::error::RuntimeError;

/// Logits for a run of tokens: `rows` × `vocab`, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Logits {
    pub rows: usize,
    pub vocab: usize,
    pub data: Vec<f32>,
}

impl Logits {
    /// The logits after token `i` of the call.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab..(i + 1) * self.vocab]
    }

    /// The logits after the last token.
    pub fn last(&self) -> &[f32] {
        self.row(self.rows - 1)
    }
}

/// One conversation's state on a loaded model.
pub trait Session {
    /// Feeds `ids` after everything fed so far and returns their logits, one row per id.
    /// On error the session is left as it was before the call.
    fn forward(&mut self, ids: &[u32]) -> Result<Logits, RuntimeError>;

    /// Like [`Session::forward`], but returns only the logits after the last id (what decoding needs);
    /// executors that can skip the other rows do.
    fn forward_last(&mut self, ids: &[u32]) -> Result<Vec<f32>, RuntimeError> {
        Ok(self.forward(ids)?.last().to_vec())
    }

    /// Tokens held in the KV cache.
    fn position(&self) -> usize;

    /// Empties the KV cache.
    fn reset(&mut self);

    /// Keeps the first `len` tokens of the KV cache and forgets the rest (`len` at most
    /// [`Session::position`]): a continuation that shares only a prefix with what was fed reuses it.
    fn truncate(&mut self, len: usize);

    /// Rows of the embedding table (ids must be below this).
    fn vocab_size(&self) -> usize;
}
