//! The model's tokenizer, from its `tokenizer.json` (Hugging Face `tokenizers`).

use std::path::Path;

use crate::error::RuntimeError;

/// Text ↔ token ids with the model's own vocabulary, merges, pre-tokenizer and added tokens.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The same tokenizer without its added tokens (their strings come out as ordinary text), made the
    /// first time a message holds such a string, so that loading does not pay for it.
    plain: std::sync::OnceLock<tokenizers::Tokenizer>,
    /// The added tokens' strings (`<|im_start|>`, `<think>`, `<tool_call>`, ...).
    markup: Vec<String>,
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
        let bad = |e: &dyn std::fmt::Display| {
            RuntimeError::Input(format!("cannot read tokenizer {}: {e}", path.display()))
        };
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| bad(&e))?;
        let markup = inner
            .get_added_tokens_decoder()
            .values()
            .map(|t| t.content.clone())
            .filter(|c| !c.is_empty())
            .collect();
        Ok(Tokenizer {
            inner,
            plain: std::sync::OnceLock::new(),
            markup,
        })
    }

    /// [`Tokenizer::plain`], made from `inner` on first use.
    fn plain(&self) -> Result<&tokenizers::Tokenizer, RuntimeError> {
        if let Some(t) = self.plain.get() {
            return Ok(t);
        }
        let bad = |e: &dyn std::fmt::Display| {
            RuntimeError::Internal(format!(
                "cannot rebuild the tokenizer without its added tokens: {e}"
            ))
        };
        let json = self.inner.to_string(false).map_err(|e| bad(&e))?;
        let mut bare: serde_json::Value = serde_json::from_str(&json).map_err(|e| bad(&e))?;
        bare["added_tokens"] = serde_json::Value::Array(Vec::new());
        let plain: tokenizers::Tokenizer = bare.to_string().parse().map_err(|e| bad(&e))?;
        Ok(self.plain.get_or_init(|| plain))
    }

    /// Token ids of `text` as ordinary text: strings of added tokens (`<|im_start|>`, `<think>`, ...) are
    /// tokenized as the characters they are, never as control tokens. For what users write.
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>, RuntimeError> {
        let enc = self
            .plain()?
            .encode(text, false)
            .map_err(|e| RuntimeError::Input(format!("cannot tokenize: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Whether `text` holds the string of an added token (which [`Tokenizer::encode`] would turn into it).
    pub fn has_markup(&self, text: &str) -> bool {
        self.markup.iter().any(|m| text.contains(m.as_str()))
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
