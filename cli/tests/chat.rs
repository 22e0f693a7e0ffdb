//! Chat generation end to end on a tiny model with Qwen3's full vocabulary and random weights: the
//! thinking block and its budget, non-thinking mode, and text prompts, through the reference executor and a
//! compiled `.so`.

use std::path::PathBuf;

mod common;
use common::*;

const THINK: u64 = 151667;
const THINK_END: u64 = 151668;

/// A random-weight model with the real tokenizer and chat template in a temporary directory.
fn tiny_chat_model() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let config = serde_json::json!({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936,
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 8, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 512, "tie_word_embeddings": true, "torch_dtype": "float32",
        "eos_token_id": [151645, 151643]
    });
    let model = random_model(dir.path(), &config, Some("3"));
    (dir, model)
}

fn chat_json(model_args: &[&str], extra: &[&str]) -> serde_json::Value {
    let args = [
        &["generate"][..],
        model_args,
        &["--chat", "--prompt", "What is 2+2?", "--json"],
        extra,
    ]
    .concat();
    serde_json::from_str(&ok(&args)).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u64> {
    v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_u64().unwrap())
        .collect()
}

#[test]
fn thinking_budget_cuts_in_after_exactly_n_tokens() {
    let (_tmp, model) = tiny_chat_model();
    let m = ["--model", model.to_str().unwrap()];
    let early_stop = "\n\nConsidering the limited time by the user, I have to give the solution based on the thinking directly now.\n</think>\n\n";
    for budget in [1usize, 5, 12] {
        let out = chat_json(
            &m,
            &[
                "--thinking-budget",
                &budget.to_string(),
                "--temperature",
                "0",
                "--max-new-tokens",
                "40",
            ],
        );
        let ids = ids(&out);
        assert_eq!(out["thinking_tokens"], budget, "{out}");
        assert_eq!(out["budget_hit"], true);
        // <think> opens the block (the decoder opens it: random weights do not), then the model's N tokens,
        // then the early-stop sentence with the only </think>, then the answer.
        assert_eq!(ids[0], THINK);
        assert_eq!(ids.iter().filter(|&&i| i == THINK_END).count(), 1, "{out}");
        assert_eq!(ids.iter().filter(|&&i| i == THINK).count(), 1, "{out}");
        let text = out["text"].as_str().unwrap();
        let (thinking, answer) = text.split_once(early_stop).expect("the sentence");
        assert!(thinking.starts_with("<think>\n"));
        assert!(!answer.contains("</think>"));
        assert!(out["answer_tokens"].as_u64().unwrap() > 0);
        // The reasoning is the block as the model sees it: the early-stop sentence ends it.
        assert!(out["reasoning"]
            .as_str()
            .unwrap()
            .ends_with("Considering the limited time by the user, I have to give the solution based on the thinking directly now."),
            "{out}");
        // --max-new-tokens bounds everything after the prompt, inserted tokens included.
        assert!(ids.len() <= 40, "{out}");
        if out["finish_reason"] == "length" {
            assert_eq!(ids.len(), 40, "{out}");
        }
    }
}

#[test]
fn budget_zero_and_no_thinking_answer_without_a_block() {
    let (_tmp, model) = tiny_chat_model();
    let m = ["--model", model.to_str().unwrap()];
    let zero = chat_json(
        &m,
        &[
            "--thinking-budget",
            "0",
            "--temperature",
            "0",
            "--max-new-tokens",
            "6",
        ],
    );
    let off = chat_json(
        &m,
        &[
            "--no-thinking",
            "--temperature",
            "0",
            "--max-new-tokens",
            "6",
        ],
    );
    for out in [&zero, &off] {
        // The template wrote the empty block into the prompt: nothing of it is generated.
        assert!(!ids(out).contains(&THINK_END), "{out}");
        assert_eq!(out["thinking_tokens"], 0);
        assert_eq!(out["budget_hit"], false);
        assert_eq!(out["reasoning"], "");
        assert_eq!(out["answer_tokens"], 6);
    }
    assert_eq!(ids(&zero), ids(&off));
    // A trailing /no_think with thinking on: the decoder writes the empty block itself.
    let args = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--chat",
        "--prompt",
        "Hi /no_think",
        "--temperature",
        "0",
        "--max-new-tokens",
        "4",
        "--json",
    ];
    let soft: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
    assert!(
        soft["text"]
            .as_str()
            .unwrap()
            .starts_with("<think>\n\n</think>\n\n"),
        "{soft}"
    );
    assert_eq!(soft["thinking_tokens"], 0);
}

#[test]
fn chat_through_the_compiled_so_equals_the_reference() {
    let (tmp, model) = tiny_chat_model();
    let so = tmp.path().join("tiny.so");
    ok(&[
        "compile",
        model.to_str().unwrap(),
        "-o",
        so.to_str().unwrap(),
    ]);
    let extra = [
        "--thinking-budget",
        "4",
        "--max-new-tokens",
        "40",
        "--seed",
        "7",
    ];
    let reference = chat_json(&["--model", model.to_str().unwrap()], &extra);
    let compiled = chat_json(
        &[
            "--model",
            so.to_str().unwrap(),
            "--weights",
            model.to_str().unwrap(),
        ],
        &extra,
    );
    // Sampled with the thinking defaults (0.6 / 0.95 / 20): same seed, same tokens.
    assert_eq!(ids(&reference), ids(&compiled));
    assert_eq!(compiled["budget_hit"], true);
    // Raw text prompts go through the tokenizer both ways.
    let raw = ok(&[
        "generate",
        "--model",
        so.to_str().unwrap(),
        "--weights",
        model.to_str().unwrap(),
        "--prompt",
        "Hello, world",
        "--max-new-tokens",
        "3",
        "--json",
    ]);
    let raw: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(raw["prompt_tokens"], 3);
    assert!(raw["text"].is_string());
}

#[test]
fn chat_flags_are_checked() {
    let (_tmp, model) = tiny_chat_model();
    let m = model.to_str().unwrap();
    assert_error(
        &q3c(&[
            "generate",
            "--model",
            m,
            "--prompt",
            "x",
            "--thinking-budget",
            "3",
        ]),
        "add --chat",
    );
    assert_error(
        &q3c(&[
            "generate", "--model", m, "--chat", "--prompt", "x", "--top-p", "0",
        ]),
        "top_p",
    );
    let empty = tempfile::tempdir().unwrap();
    assert_error(
        &q3c(&[
            "generate",
            "--model",
            m,
            "--chat",
            "--prompt",
            "x",
            "--tokenizer",
            empty.path().to_str().unwrap(),
        ]),
        "tokenizer.json",
    );
}

#[test]
fn the_terminal_chat_streams_answers_and_switches_modes() {
    let (_tmp, model) = tiny_chat_model();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_q3c"))
        .args(["chat", model.to_str().unwrap(), "--max-new-tokens", "40"])
        .args([
            "--thinking-budget",
            "2",
            "--temperature",
            "1",
            "--seed",
            "5",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let stdin = child.stdin.as_mut().unwrap();
        stdin
            .write_all(b"Hello\n/no_think\nAgain\n/reset\n/quit\n")
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    // One report per answer: the first thought (2 tokens, budget hit), the second did not. The 40 tokens
    // of each answer include what the decoder inserted (the opening <think>\n and the early-stop sentence,
    // 26 tokens in the first).
    assert!(
        stderr.contains("[2 thinking + 12 answer tokens, budget hit,"),
        "{stderr}"
    );
    assert!(
        stderr.contains("[0 thinking + 40 answer tokens,"),
        "{stderr}"
    );
    assert!(stderr.contains("(thinking off)") && stderr.contains("(conversation cleared)"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Thinking is printed dimmed (ANSI faint), answers plain.
    assert!(stdout.contains("\x1b[2m"), "{stdout}");
}
