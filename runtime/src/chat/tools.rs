//! Tool calls in Qwen3's output: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` blocks in the
//! answer, turned into OpenAI-style `tool_calls` entries.

use serde_json::{json, Value};

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// Splits an answer into its text outside tool-call blocks and the calls, in order. Each call is
/// `{"id", "type": "function", "function": {"name", "arguments"}}` with `arguments` a JSON string, as OpenAI
/// returns them. A block that is not a JSON object with a string `name` stays in the text.
pub fn parse_tool_calls(content: &str) -> (String, Vec<Value>) {
    let mut text = String::new();
    let mut calls = Vec::new();
    let mut rest = content;
    while let Some(start) = rest.find(OPEN) {
        let after = &rest[start + OPEN.len()..];
        let Some(end) = after.find(CLOSE) else { break };
        let body = after[..end].trim();
        match serde_json::from_str::<Value>(body) {
            Ok(call) if call["name"].is_string() => {
                text.push_str(&rest[..start]);
                let arguments = match &call["arguments"] {
                    Value::String(s) => s.clone(),
                    Value::Null => "{}".to_string(),
                    other => other.to_string(),
                };
                calls.push(json!({
                    "id": format!("call_{}", calls.len()),
                    "type": "function",
                    "function": {"name": call["name"], "arguments": arguments},
                }));
            }
            _ => text.push_str(&rest[..start + OPEN.len() + end + CLOSE.len()]),
        }
        rest = &after[end + CLOSE.len()..];
    }
    text.push_str(rest);
    (text.trim().to_string(), calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_parsed_and_the_rest_kept() {
        let answer = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": \"{}\"}\n</tool_call>";
        let (text, calls) = parse_tool_calls(answer);
        assert_eq!(text, "Let me check.");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0]["function"]["name"], "get_weather");
        assert_eq!(calls[0]["function"]["arguments"], "{\"city\":\"Zürich\"}");
        assert_eq!(calls[1]["function"]["arguments"], "{}");
        assert_eq!(calls[1]["id"], "call_1");
        // Not JSON, or unterminated: left as text.
        let (text, calls) = parse_tool_calls("a <tool_call>oops</tool_call> b <tool_call>{");
        assert!(calls.is_empty());
        assert_eq!(text, "a <tool_call>oops</tool_call> b <tool_call>{");
    }
}

/// Streams answer text while holding back tool calls: text before the first `<tool_call>` passes through (a
/// tail that could be the start of the tag is held until it is not); from the tag on, the text is kept for
/// [`ToolCallStream::finish`], which parses the calls.
#[derive(Default)]
pub struct ToolCallStream {
    /// Everything pushed so far.
    all: String,
    /// Bytes of `all` already passed through.
    sent: usize,
    /// A `<tool_call>` was seen: nothing more passes through.
    in_calls: bool,
}

impl ToolCallStream {
    pub fn new() -> ToolCallStream {
        ToolCallStream::default()
    }

    /// Adds answer text; returns what may be shown now.
    pub fn push(&mut self, piece: &str) -> Option<String> {
        self.all.push_str(piece);
        if self.in_calls {
            return None;
        }
        let pending = &self.all[self.sent..];
        let upto = match pending.find(OPEN) {
            Some(at) => {
                self.in_calls = true;
                at
            }
            None => {
                // Hold back a tail that may grow into the tag.
                let keep = (1..OPEN.len())
                    .rev()
                    .find(|&n| pending.ends_with(&OPEN[..n]))
                    .unwrap_or(0);
                pending.len() - keep
            }
        };
        let out = pending[..upto].to_string();
        self.sent += upto;
        (!out.is_empty()).then_some(out)
    }

    /// The rest of the text to show, and the tool calls.
    pub fn finish(self) -> (Option<String>, Vec<Value>) {
        let (_, calls) = parse_tool_calls(&self.all);
        let rest = &self.all[self.sent..];
        // Whatever follows the calls (or a tag that never became a call) is text too.
        let tail = if calls.is_empty() {
            rest.to_string()
        } else {
            let after = rest.rfind(CLOSE).map_or("", |i| &rest[i + CLOSE.len()..]);
            after.trim().to_string()
        };
        ((!tail.is_empty()).then_some(tail), calls)
    }
}

#[cfg(test)]
mod stream_tests {
    use super::*;

    #[test]
    fn text_streams_and_calls_are_held_for_the_end() {
        let mut s = ToolCallStream::new();
        let mut shown = String::new();
        for piece in [
            "Let me ",
            "check.\n<to",
            "ol_call>\n{\"name\": \"f\", ",
            "\"arguments\": {}}\n</tool_call>",
        ] {
            if let Some(t) = s.push(piece) {
                shown.push_str(&t);
            }
        }
        assert_eq!(shown, "Let me check.\n");
        let (rest, calls) = s.finish();
        assert_eq!(rest, None);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0]["function"]["name"], "f");
        // "<to" that turns out not to be the tag is shown after all.
        let mut s = ToolCallStream::new();
        assert_eq!(s.push("a <to"), Some("a ".into()));
        assert_eq!(s.push("p"), Some("<top".into()));
        assert_eq!(s.finish(), (None, vec![]));
        // A tag that never closes into a call is text.
        let mut s = ToolCallStream::new();
        assert_eq!(s.push("x <tool_call> y"), Some("x ".into()));
        assert_eq!(s.finish(), (Some("<tool_call> y".into()), vec![]));
    }
}
