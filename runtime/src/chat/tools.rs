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
