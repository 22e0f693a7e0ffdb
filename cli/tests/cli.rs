//! The `q3c` binary end to end: output contracts of `ir`, `logits` and `generate`, and clear errors on bad input.

use std::path::Path;
mod common;
use common::*;

use q3c_tests::{copy_fixture, fixtures_dir, golden, max_abs_diff, LOGIT_TOLERANCE};

#[test]
fn logits_writes_transformers_logits_to_safetensors() {
    for name in ["dense_gqa", "moe", "yarn"] {
        let g = golden(name);
        let dir = tempfile::tempdir().unwrap();
        let out_path = dir.path().join("out.safetensors");
        let model = fixtures_dir().join(name);
        ok(&[
            "logits",
            "--model",
            model.to_str().unwrap(),
            "--prompt-ids",
            &ids_arg(&g.prompt_ids),
            "--out",
            out_path.to_str().unwrap(),
        ]);
        let bytes = std::fs::read(&out_path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.names().len(), 1);
        let t = st.tensor("logits").unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::F32);
        assert_eq!(t.shape(), &[g.prompt_ids.len(), g.vocab]);
        let values: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert!(
            max_abs_diff(&values, &g.logits) <= LOGIT_TOLERANCE,
            "{name}"
        );
        // Nothing but the output file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}

#[test]
fn generate_json_reports_the_greedy_ids() {
    for name in ["tied_bf16", "sharded_f16"] {
        let g = golden(name);
        let model = fixtures_dir().join(name);
        let out = ok(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt-ids",
            &ids_arg(&g.prompt_ids),
            "--max-new-tokens",
            &g.greedy_ids.len().to_string(),
            "--temperature",
            "0",
            "--ignore-eos",
            "--json",
        ]);
        let stdout = out;
        assert_eq!(stdout.lines().count(), 1, "{stdout}");
        assert_eq!(json_ids(&stdout), g.greedy_ids, "{name}");
        let obj: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(obj["finish_reason"], "length");
    }
}

#[test]
fn generate_stops_at_eos_unless_told_not_to() {
    // In dense_gqa's greedy continuation, pretend the 5th token is the end-of-sequence id.
    let g = golden("dense_gqa");
    let dir = copy_fixture("dense_gqa");
    let cfg_path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let eos = g.greedy_ids[4];
    cfg["eos_token_id"] = serde_json::json!([eos]);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let first = g.greedy_ids.iter().position(|&id| id == eos).unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            dir.path().to_str().unwrap(),
            "--max-new-tokens",
            "24",
            "--json",
        ];
        let prompt = ids_arg(&g.prompt_ids);
        args.extend(["--prompt-ids", prompt.as_str()]);
        args.extend(extra);
        let out = ok(&args);
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let stopped = run(&[]);
    assert_eq!(stopped["ids"].as_array().unwrap().len(), first + 1);
    assert_eq!(stopped["finish_reason"], "stop");
    assert_eq!(run(&["--ignore-eos"])["ids"].as_array().unwrap().len(), 24);
}

#[test]
fn sampling_is_reproducible_with_a_seed() {
    let g = golden("moe");
    let model = fixtures_dir().join("moe");
    let run = |seed: &str| {
        let out = ok(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt-ids",
            &ids_arg(&g.prompt_ids),
            "--max-new-tokens",
            "16",
            "--temperature",
            "1.5",
            "--seed",
            seed,
            "--ignore-eos",
            "--json",
        ]);
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["ids"].clone()
    };
    assert_eq!(run("3"), run("3"));
    assert_ne!(run("3"), run("4"));
}

#[test]
fn ir_prints_text_that_parses_back_and_dot() {
    for model in ["Qwen3-8B", "qwen/qwen3-30b-a3b"] {
        let out = ok(&["ir", model]);
        let text = out;
        let g = q3c_ir::text::parse(&text).unwrap();
        q3c_ir::verify(&g).unwrap();
        assert!(text.contains("\noutput logits = %"), "{model}");
    }
    let out = ok(&["ir", "Qwen3-0.6B", "--dot"]);
    assert!(out.starts_with("digraph q3c {"));
    // A config.json and a directory work too.
    let dir = fixtures_dir().join("moe");
    for arg in [dir.clone(), dir.join("config.json")] {
        let out = ok(&["ir", arg.to_str().unwrap()]);
        assert!(out.contains("expert_linear"));
    }
}

#[test]
fn bad_input_gets_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures_dir().join("dense_gqa");
    let model = model.to_str().unwrap();
    let out_file = tmp.path().join("x.safetensors");
    let out_file = out_file.to_str().unwrap();

    assert_error(&q3c(&["ir", "Qwen3-9B"]), "unknown model 'Qwen3-9B'");
    assert_error(
        &q3c(&[
            "logits",
            "--model",
            model,
            "--prompt-ids",
            "1,x",
            "--out",
            out_file,
        ]),
        "--prompt-ids: 'x' is not a token id",
    );
    assert_error(
        &q3c(&[
            "logits",
            "--model",
            model,
            "--prompt-ids",
            ",",
            "--out",
            out_file,
        ]),
        "give at least one token id",
    );
    assert_error(
        &q3c(&[
            "logits",
            "--model",
            model,
            "--prompt-ids",
            "1,99999",
            "--out",
            out_file,
        ]),
        "token id 99999 is outside the vocabulary (0..512)",
    );
    assert_error(
        &q3c(&["generate", "--model", "/nonexistent", "--prompt-ids", "1"]),
        "--model /nonexistent: no such file or directory",
    );
    assert!(
        !Path::new(out_file).exists(),
        "nothing is written on failure"
    );

    // Malformed config.
    let bad = tmp.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    std::fs::write(bad.join("config.json"), "{\"hidden_size\": ").unwrap();
    assert_error(
        &q3c(&["ir", bad.to_str().unwrap()]),
        "malformed config JSON",
    );
    // Unsupported setting, named by field.
    let cfg = std::fs::read_to_string(fixtures_dir().join("dense_gqa/config.json")).unwrap();
    std::fs::write(
        bad.join("config.json"),
        cfg.replace("\"attention_bias\": false", "\"attention_bias\": true"),
    )
    .unwrap();
    assert_error(
        &q3c(&["ir", bad.to_str().unwrap()]),
        "config field `attention_bias`",
    );
    // Config fine, weights missing.
    std::fs::write(bad.join("config.json"), &cfg).unwrap();
    assert_error(
        &q3c(&[
            "generate",
            "--model",
            bad.to_str().unwrap(),
            "--prompt-ids",
            "1",
        ]),
        "no model.safetensors",
    );
    // Truncated weights.
    let weights = std::fs::read(fixtures_dir().join("dense_gqa/model.safetensors")).unwrap();
    std::fs::write(bad.join("model.safetensors"), &weights[..weights.len() / 2]).unwrap();
    assert_error(
        &q3c(&[
            "generate",
            "--model",
            bad.to_str().unwrap(),
            "--prompt-ids",
            "1",
        ]),
        "truncated or corrupt",
    );
    // Weights of another model.
    std::fs::copy(
        fixtures_dir().join("moe/model.safetensors"),
        bad.join("model.safetensors"),
    )
    .unwrap();
    assert_error(
        &q3c(&[
            "generate",
            "--model",
            bad.to_str().unwrap(),
            "--prompt-ids",
            "1",
        ]),
        "does not match the model config",
    );
}

#[test]
fn ir_shows_the_graph_after_passes() {
    let after = ok(&["ir", "Qwen3-30B-A3B", "--after", "swiglu"]);
    assert_eq!(after.matches("= expert_swiglu ").count(), 48);
    assert!(!after.contains("= silu "));
    let g = q3c_ir::text::parse(&after).unwrap();
    q3c_ir::verify(&g).unwrap();
    // Every fusion on the MoE release: one routing kernel, one QKV group and two residual norms per layer.
    let all = ok(&["ir", "Qwen3-30B-A3B", "--fusion", "all"]);
    for (op, n) in [
        ("moe_route k=8 renorm=true", 48),
        ("linear_group n=3", 48),
        ("add_rms_norm", 2 * 48),
        ("softmax", 0),
        ("top_k", 0),
    ] {
        assert_eq!(all.matches(&format!("= {op} ")).count(), n, "{op}");
    }
    // A fused YaRN graph prints and parses back to the same text.
    let yarn = fixtures_dir().join("yarn");
    let fused = ok(&["ir", yarn.to_str().unwrap(), "--fusion", "all"]);
    assert_eq!(
        fused
            .matches("= norm_rope eps=1e-6 theta=10000.0 yarn_factor=4.0")
            .count(),
        4,
        "{fused}"
    );
    assert_eq!(
        q3c_ir::text::print(&q3c_ir::text::parse(&fused).unwrap()),
        fused
    );
    let dump = ok(&["ir", "Qwen3-0.6B", "--fusion", "all", "--dump-all"]);
    assert!(
        dump.contains("; ==== Qwen3-0.6B: lowered ====")
            && dump.contains("; ==== after swiglu ====")
    );
    let out = q3c(&["ir", "Qwen3-0.6B", "--fusion", "swiglu", "--time-passes"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pass swiglu"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_error(
        &q3c(&["ir", "Qwen3-0.6B", "--fusion", "quantum"]),
        "unknown fusion pass 'quantum' (available: norm-rope, swiglu, residual-norm, qkv, moe-route; or none, all)",
    );
    assert_error(
        &q3c(&[
            "compile",
            "Qwen3-0.6B",
            "--fusion",
            "quantum",
            "-o",
            "/tmp/never.so",
        ]),
        "unknown fusion pass 'quantum'",
    );
}

#[test]
fn probe_reports_the_machine_limits() {
    let out = ok(&["probe", "--threads", "1", "--mib", "16", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["read_gb_s"].as_f64().unwrap() > 0.1, "{v}");
    assert!(v["fma_gflop_s"].as_f64().unwrap() > 0.1, "{v}");
    assert_eq!(v["threads"], 1);
    assert_error(&q3c(&["probe", "--mib", "0"]), "--mib must be at least 1");
}
