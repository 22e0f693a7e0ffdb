//! The model's tokenizer, from its `tokenizer.json` (Hugging Face `tokenizers`).

use std::path::Path;

use crate::error::RuntimeError;

/// Text ↔ token ids with the model's own vocabulary, merges, pre-tokenizer and added tokens.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    /// Loads `tokenizer.json` from a model directory.
    pub fn from_dir(dir: &Path) -> Result<Tokenizer, RuntimeError> {
        Tokenizer::from_file(&dir.join("tokenizer.json"))
    }

    /// Loads a `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Tokenizer, RuntimeError> {
        if !path.is_file() {
            return Err(RuntimeError::Input(format!(
                "no tokenizer at {} (a model directory needs tokenizer.json for text prompts)",
                path.display()
            )));
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| {
            RuntimeError::Input(format!("cannot read tokenizer {}: {e}", path.display()))
        })?;
        Ok(Tokenizer { inner })
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`, `<think>`, ...) become their
    /// ids; nothing is added around the text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, RuntimeError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| RuntimeError::Input(format!("cannot tokenize: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`, special tokens included. Bytes of an incomplete UTF-8 character at the end
    /// come out as U+FFFD; [`super::StreamDecoder`] holds them back instead.
    pub fn decode(&self, ids: &[u32]) -> Result<String, RuntimeError> {
        self.inner
            .decode(ids, false)
            .map_err(|e| RuntimeError::Input(format!("cannot detokenize: {e}")))
    }

    /// The id of a token written exactly as `token` (e.g. `<|im_end|>`), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Entries in the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
