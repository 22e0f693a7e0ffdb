//! The C example builds against `q3c_runtime.h` and `libq3c_capi.so`, and chats with a compiled model.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `target/<profile>` of this test run, after building `libq3c_capi.so` into it: `cargo test` links the tests
/// against the rlib and does not produce the cdylib, so the test asks cargo for it (once).
fn target_dir() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().unwrap();
            let dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let st = Command::new(cargo)
                .args(["build", "--profile", "test", "-p", "q3c-capi", "--lib"])
                .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")))
                .status()
                .unwrap();
            assert!(st.success(), "building libq3c_capi.so failed");
            dir
        })
        .clone()
}

/// A tiny random-weight model with Qwen3's full vocabulary, tokenizer and chat template, compiled to a `.so`.
fn tiny_model(dir: &Path) -> (PathBuf, PathBuf) {
    let config = serde_json::json!({
        "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 256,
        "tie_word_embeddings": true, "torch_dtype": "float32", "eos_token_id": [151645, 151643]
    });
    let cfg_path = dir.join("config.json");
    std::fs::write(&cfg_path, config.to_string()).unwrap();
    let cfg = q3c_models::resolve(cfg_path.to_str().unwrap()).unwrap();
    let weights = dir.join("weights");
    let tok = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/reference/tokenizer");
    q3c_models::random::write_checkpoint(&cfg, cfg.torch_dtype, 5, &weights, Some(&tok)).unwrap();
    let so = q3c_tests::compile_to(&weights, dir, 64);
    (so, weights)
}

#[test]
fn the_c_example_builds_and_chats() {
    let dir = tempfile::tempdir().unwrap();
    let (so, weights) = tiny_model(dir.path());
    let lib = target_dir();
    assert!(lib.join("libq3c_capi.so").is_file(), "{}", lib.display());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exe = dir.path().join("chat");
    let st = Command::new("cc")
        .arg(manifest.join("examples/chat.c"))
        .arg(format!("-I{}", manifest.display()))
        .arg(format!("-L{}", lib.display()))
        .args(["-lq3c_capi", "-Wall", "-Werror", "-o"])
        .arg(&exe)
        .status()
        .unwrap();
    assert!(st.success(), "the C example does not compile");
    let out = Command::new(&exe)
        .arg(&so)
        .arg(&weights)
        .env("LD_LIBRARY_PATH", &lib)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json_line = stdout
        .lines()
        .find(|l| l.starts_with("{\"ids\""))
        .expect("the result object");
    let result: serde_json::Value = serde_json::from_str(json_line).unwrap();
    assert_eq!(result["thinking_tokens"], 4);
    assert_eq!(result["budget_hit"], true);
    // What was streamed is what the result holds.
    let streamed: String = stdout.lines().next().unwrap().to_string();
    let reasoning = result["reasoning"].as_str().unwrap();
    assert!(streamed.starts_with(&format!(
        "[{}",
        reasoning.chars().take(3).collect::<String>()
    )));
    assert!(stdout.contains("bad request refused: invalid request body"));
    assert!(stdout.contains("n refused: n is 2: q3c_chat returns one choice"));
}

#[test]
fn the_header_declares_exactly_the_exported_functions() {
    let header =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("q3c_runtime.h"))
            .unwrap();
    let nm = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(target_dir().join("libq3c_capi.so"))
        .output()
        .unwrap();
    let mut exported: Vec<String> = String::from_utf8_lossy(&nm.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .filter(|s| s.starts_with("q3c_"))
        .map(str::to_string)
        .collect();
    exported.sort();
    let mut declared: Vec<String> = header
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("q3c_"))
        .filter(|w| header.contains(&format!("{w}(")))
        .map(str::to_string)
        .collect();
    declared.sort();
    declared.dedup();
    assert_eq!(exported, declared);
}
