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
        let opts = RenderOptions {
            tools,
            add_generation_prompt: true,
            enable_thinking: Some(enable_thinking && budget != Some(0)),
        };
        let text = self.template.render(messages, &opts)?;
        // Messages whose text holds control-token strings: a user must not forge a turn or close a block.
        let marked: Vec<usize> = (0..messages.len())
            .filter(|&i| {
                messages[i]["content"]
                    .as_str()
                    .is_some_and(|c| self.tokenizer.has_markup(c))
            })
            .collect();
        if marked.is_empty() {
            return Ok((self.tokenizer.encode(&text)?, thinking));
        }
        Ok((
            self.encode_marked(messages, &marked, &opts, &text)?,
            thinking,
        ))
    }

    /// Token ids of the prompt `text` where the contents of messages `marked` are ordinary text and only the
    /// template's own markup becomes control tokens: the template is rendered again with each of those
    /// contents replaced by a placeholder, the pieces between placeholders are tokenized as markup and the
    /// contents as text. A template that rewrote such a content (the rebuilt text differs) is refused.
    fn encode_marked(
        &self,
        messages: &[Message],
        marked: &[usize],
        opts: &RenderOptions,
        text: &str,
    ) -> Result<Vec<u32>, RuntimeError> {
        let placeholder = |i: usize| format!("\u{F8F0}q3c:{i}\u{F8F1}");
        let mut masked = messages.to_vec();
        for &i in marked {
            masked[i]["content"] = placeholder(i).into();
        }
        let skeleton = self.template.render(&masked, opts)?;
        let (mut ids, mut rebuilt, mut rest) = (Vec::new(), String::new(), skeleton.as_str());
        loop {
            let next = marked
                .iter()
                .filter_map(|&i| rest.find(&placeholder(i)).map(|at| (at, i)))
                .min();
            let Some((at, i)) = next else {
                ids.extend(self.tokenizer.encode(rest)?);
                rebuilt.push_str(rest);
                break;
            };
            let content = messages[i]["content"].as_str().unwrap_or_default();
            ids.extend(self.tokenizer.encode(&rest[..at])?);
            ids.extend(self.tokenizer.encode_text(content)?);
            rebuilt.push_str(&rest[..at]);
            rebuilt.push_str(content);
            rest = &rest[at + placeholder(i).len()..];
        }
        if rebuilt != text {
            return Err(RuntimeError::Input(
                "a message holds control-token text (such as <|im_start|> or <think>) where the chat \
                 template rewrites it; remove it from the message"
                    .into(),
            ));
        }
        Ok(ids)
    }
}
