//! Helpers shared by the CLI tests: run the real `q3c` binary and check its output.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};

/// Runs q3c with `args`.
pub fn q3c(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_q3c"))
        .args(args)
        .output()
        .expect("q3c runs")
}

/// Runs q3c, asserts it succeeded, and returns its standard output.
pub fn ok(args: &[&str]) -> String {
    let out = q3c(args);
    assert!(
        out.status.success(),
        "q3c {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// Asserts a failed run: non-zero exit, no panic, stderr starting with `error: ` and containing `want`.
pub fn assert_error(out: &Output, want: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.starts_with("error: ") && stderr.contains(want),
        "expected {want:?} in {stderr}"
    );
}

/// `1,2,3` from ids.
pub fn ids_arg(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

/// The `ids` field of `generate --json` output.
pub fn json_ids(stdout: &str) -> Vec<u32> {
    let obj: serde_json::Value = serde_json::from_str(stdout).expect("one JSON object");
    obj["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| v.as_u64().expect("id") as u32)
        .collect()
}

/// A tiny random model — 2 layers, hidden 32, the real tokenizer's vocabulary, f32 — written by
/// `q3c random-weights` into `dir/model` (its config in `dir/config.json`).
pub fn tiny_model(dir: &Path) -> PathBuf {
    let config = serde_json::json!({
        "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 256,
        "tie_word_embeddings": true, "torch_dtype": "float32", "eos_token_id": [151645, 151643]
    });
    random_model(dir, &config, None)
}

/// `config` written to `dir/config.json`, and a random f32 checkpoint of it with the real tokenizer written
/// by `q3c random-weights` (`--seed seed`, if given) into `dir/model`.
pub fn random_model(dir: &Path, config: &serde_json::Value, seed: Option<&str>) -> PathBuf {
    let cfg = dir.join("config.json");
    std::fs::write(&cfg, config.to_string()).unwrap();
    let model = dir.join("model");
    let tok = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/reference/tokenizer");
    let mut args = vec![
        "random-weights",
        cfg.to_str().unwrap(),
        "-o",
        model.to_str().unwrap(),
        "--dtype",
        "f32",
        "--tokenizer",
        tok.to_str().unwrap(),
    ];
    if let Some(seed) = seed {
        args.extend(["--seed", seed]);
    }
    ok(&args);
    model
}

/// The URL a `q3c serve` child (stdout piped) announces on its first line.
pub fn listening_url(child: &mut Child) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    line.trim()
        .strip_prefix("q3c serve: listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string()
}
