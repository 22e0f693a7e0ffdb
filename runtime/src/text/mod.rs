//! Text in and out: the model's tokenizer, its chat template, and streaming detokenisation.

mod stream;
mod template;
mod tokenizer;

pub use stream::StreamDecoder;
pub use template::{ChatTemplate, Message, RenderOptions};
pub use tokenizer::Tokenizer;

use std::path::Path;

use crate::error::RuntimeError;

/// The tokenizer and chat template of a model directory.
pub struct TextModel {
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
}

impl TextModel {
    pub fn load(dir: &Path) -> Result<TextModel, RuntimeError> {
        Ok(TextModel {
            tokenizer: Tokenizer::from_dir(dir)?,
            template: ChatTemplate::from_dir(dir)?,
        })
    }

    /// Renders `messages` (with the `tools` offered) for a request and works out whether it thinks. A budget
    /// of 0 renders the non-thinking prompt, as `enable_thinking: false` does.
    pub fn prompt(
        &self,
        messages: &[Message],
        tools: Option<Vec<serde_json::Value>>,
        enable_thinking: bool,
        budget: Option<usize>,
    ) -> Result<(Vec<u32>, bool), RuntimeError> {
        let thinking = crate::chat::thinking_enabled(messages, enable_thinking, budget);
        let text = self.template.render(
            messages,
            &RenderOptions {
                tools,
                add_generation_prompt: true,
                enable_thinking: Some(enable_thinking && budget != Some(0)),
            },
        )?;
        Ok((self.tokenizer.encode(&text)?, thinking))
    }
}
