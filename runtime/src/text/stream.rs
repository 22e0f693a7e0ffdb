//! Streaming detokenisation: text pieces as tokens arrive, never splitting a multi-byte character.

use super::Tokenizer;
use crate::error::RuntimeError;

/// Turns a growing list of ids into text deltas. A byte-level BPE token can end in the middle of a UTF-8
/// character; such a tail decodes to U+FFFD and is held back until the character is complete.
///
/// Each step decodes a short window (from a few tokens before the unsent text) rather than everything so
/// far, so the cost per token stays constant, and the window starts on a token boundary so that decoders
/// which treat the first token specially see the same context each time.
pub struct StreamDecoder {
    ids: Vec<u32>,
    /// Start of the window decoded each step.
    prefix: usize,
    /// Ids up to here have been sent as text.
    read: usize,
}

impl Default for StreamDecoder {
    fn default() -> Self {
        StreamDecoder::new()
    }
}

impl StreamDecoder {
    pub fn new() -> StreamDecoder {
        StreamDecoder {
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    /// Adds `id`; returns the new complete text, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>, RuntimeError> {
        self.ids.push(id);
        let sent = tok.decode(&self.ids[self.prefix..self.read])?;
        let now = tok.decode(&self.ids[self.prefix..])?;
        if now.len() > sent.len() && !now.ends_with('\u{FFFD}') && now.starts_with(&sent) {
            let delta = now[sent.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(Some(delta))
        } else {
            Ok(None)
        }
    }

    /// Whatever is still held back (an incomplete character at the very end comes out as U+FFFD).
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String, RuntimeError> {
        let sent = tok.decode(&self.ids[self.prefix..self.read])?;
        let now = tok.decode(&self.ids[self.prefix..])?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(now.get(sent.len()..).unwrap_or_default().to_string())
    }
}
