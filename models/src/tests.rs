//! Config parsing, registry and checkpoint checks.

use std::collections::HashMap;

use crate::tensors::expected_tensors;
use crate::*;

/// The official Qwen3-0.6B config.json (transformers 4.x spelling).
const OFFICIAL_0_6B: &str = r#"{
  "architectures": ["Qwen3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
  "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
  "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
  "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
  "rope_scaling": null, "rope_theta": 1000000, "sliding_window": null, "tie_word_embeddings": true,
  "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": true,
  "use_sliding_window": false, "vocab_size": 151936
}"#;

/// The official Qwen3-30B-A3B config.json.
const OFFICIAL_30B_A3B: &str = r#"{
  "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
  "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
  "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [],
  "model_type": "qwen3_moe", "moe_intermediate_size": 768, "norm_topk_prob": true,
  "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
  "num_key_value_heads": 4, "output_router_logits": false, "rms_norm_eps": 1e-06, "rope_scaling": null,
  "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": null,
  "tie_word_embeddings": false, "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
  "use_cache": true, "use_sliding_window": false, "vocab_size": 151936
}"#;

fn json_with(base: &str, edits: &[(&str, serde_json::Value)]) -> String {
    let mut v: serde_json::Value = serde_json::from_str(base).unwrap();
    for (k, val) in edits {
        if val.is_null() && *k != "rope_scaling" {
            v.as_object_mut().unwrap().remove(*k);
        } else {
            v[*k] = val.clone();
        }
    }
    v.to_string()
}

#[test]
fn official_configs_equal_the_registry() {
    assert_eq!(
        Qwen3Config::from_json(OFFICIAL_0_6B).unwrap(),
        registry::lookup("Qwen3-0.6B").unwrap()
    );
    assert_eq!(
        Qwen3Config::from_json(OFFICIAL_30B_A3B).unwrap(),
        registry::lookup("Qwen3-30B-A3B").unwrap()
    );
}

#[test]
fn transformers_5_spelling_reads_the_same() {
    let v5 = json_with(
        OFFICIAL_30B_A3B,
        &[
            ("rope_theta", serde_json::Value::Null),
            ("rope_scaling", serde_json::Value::Null),
            (
                "rope_parameters",
                serde_json::json!({"rope_type": "default", "rope_theta": 1000000.0}),
            ),
            ("num_experts", serde_json::Value::Null),
            ("num_local_experts", serde_json::json!(128)),
            ("torch_dtype", serde_json::Value::Null),
            ("dtype", serde_json::json!("bfloat16")),
        ],
    );
    assert!(!v5.contains("torch_dtype") && v5.contains("num_local_experts"));
    assert_eq!(
        Qwen3Config::from_json(&v5).unwrap(),
        registry::lookup("qwen/qwen3-30b-a3b").unwrap()
    );
}

#[test]
fn yarn_reads_from_either_spelling_with_defaults() {
    let qwen_recipe = serde_json::json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768});
    for key in ["rope_scaling", "rope_parameters"] {
        let cfg = Qwen3Config::from_json(&json_with(OFFICIAL_0_6B, &[(key, qwen_recipe.clone())]))
            .unwrap();
        let y = cfg.rope_scaling.unwrap();
        assert_eq!((y.factor, y.original_max_position_embeddings), (4.0, 32768));
        assert!((y.attention_factor - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-15);
        assert_eq!((y.beta_fast, y.beta_slow, y.truncate), (32.0, 1.0, true));
        assert_eq!(cfg.rope_theta, 1e6);
    }
    // Older spelling `type`, explicit attention_factor.
    let old = serde_json::json!({"type": "yarn", "factor": 2.0, "attention_factor": 1.5});
    let y = Qwen3Config::from_json(&json_with(OFFICIAL_0_6B, &[("rope_scaling", old)]))
        .unwrap()
        .rope_scaling
        .unwrap();
    assert_eq!(
        (
            y.factor,
            y.attention_factor,
            y.original_max_position_embeddings
        ),
        (2.0, 1.5, 40960)
    );
}

#[test]
fn registry_knows_all_eight_by_any_case() {
    assert_eq!(registry::names().len(), 8);
    for name in registry::names() {
        let cfg = registry::lookup(name).unwrap();
        assert_eq!(registry::lookup(&name.to_uppercase()), Some(cfg.clone()));
        assert_eq!(registry::lookup(&format!("Qwen/{name}")), Some(cfg.clone()));
        assert_eq!(cfg.num_attention_heads % cfg.num_key_value_heads, 0);
    }
    let big = registry::lookup("Qwen3-235B-A22B").unwrap();
    assert_eq!(
        (
            big.num_hidden_layers,
            big.num_attention_heads,
            big.num_key_value_heads
        ),
        (94, 64, 4)
    );
    assert!((0..94).all(|l| big.is_sparse_layer(l)));
    // Parameter counts match the published sizes.
    let billions = |n: &str| registry::lookup(n).unwrap().parameter_count() as f64 / 1e9;
    assert!(
        (billions("Qwen3-0.6B") - 0.596).abs() < 0.01,
        "{}",
        billions("Qwen3-0.6B")
    );
    assert!(
        (billions("Qwen3-8B") - 8.19).abs() < 0.02,
        "{}",
        billions("Qwen3-8B")
    );
    assert!(
        (billions("Qwen3-30B-A3B") - 30.5).abs() < 0.1,
        "{}",
        billions("Qwen3-30B-A3B")
    );
    assert!(
        (billions("Qwen3-235B-A22B") - 235.1).abs() < 0.5,
        "{}",
        billions("Qwen3-235B-A22B")
    );
    assert!(registry::lookup("Qwen3-7B").is_none());
}

#[test]
fn unsupported_settings_name_their_field() {
    use serde_json::json;
    let cases: Vec<(Vec<(&str, serde_json::Value)>, &str)> = vec![
        (
            vec![("use_sliding_window", json!(true))],
            "config field `use_sliding_window`",
        ),
        (
            vec![("attention_bias", json!(true))],
            "config field `attention_bias`",
        ),
        (
            vec![(
                "rope_scaling",
                json!({"rope_type": "longrope", "factor": 2.0}),
            )],
            "config field `rope_scaling.rope_type`: \"longrope\"",
        ),
        (
            vec![(
                "rope_parameters",
                json!({"rope_type": "dynamic", "rope_theta": 1e6}),
            )],
            "config field `rope_parameters.rope_type`",
        ),
        (
            vec![("num_key_value_heads", json!(6))],
            "config field `num_key_value_heads`: 6 does not divide num_attention_heads = 16",
        ),
        (
            vec![("hidden_size", json!("big"))],
            "config field `hidden_size`: must be a non-negative integer",
        ),
        (
            vec![("hidden_size", serde_json::Value::Null)],
            "config field `hidden_size`: is missing",
        ),
        (vec![("head_dim", json!(7))], "config field `head_dim`"),
        (
            vec![("model_type", json!("llama"))],
            "config field `model_type`",
        ),
        (
            vec![("hidden_act", json!("gelu"))],
            "config field `hidden_act`",
        ),
        (
            vec![("torch_dtype", json!("int8"))],
            "config field `torch_dtype`",
        ),
        (
            vec![(
                "layer_types",
                json!(["full_attention", "sliding_attention"]),
            )],
            "config field `layer_types`",
        ),
        (
            vec![("eos_token_id", json!(999999))],
            "config field `eos_token_id`",
        ),
        (
            vec![("rope_theta", serde_json::Value::Null)],
            "config field `rope_theta`: is missing",
        ),
    ];
    for (edits, want) in cases {
        let err = Qwen3Config::from_json(&json_with(OFFICIAL_0_6B, &edits))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with(want), "{edits:?}: got {err}");
    }
    let moe_cases: Vec<(Vec<(&str, serde_json::Value)>, &str)> = vec![
        (
            vec![("num_experts_per_tok", json!(200))],
            "config field `num_experts_per_tok`: 200 exceeds the 128 experts",
        ),
        (
            vec![("mlp_only_layers", json!([3, 48]))],
            "config field `mlp_only_layers`: layer 48 does not exist",
        ),
        (
            vec![("decoder_sparse_step", json!(0))],
            "config field `decoder_sparse_step`",
        ),
        (
            vec![("moe_intermediate_size", serde_json::Value::Null)],
            "config field `moe_intermediate_size`: is missing",
        ),
    ];
    for (edits, want) in moe_cases {
        let err = Qwen3Config::from_json(&json_with(OFFICIAL_30B_A3B, &edits))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with(want), "{edits:?}: got {err}");
    }
    assert!(Qwen3Config::from_json("{not json")
        .unwrap_err()
        .to_string()
        .starts_with("malformed config JSON"));
    assert!(Qwen3Config::from_json("[1]")
        .unwrap_err()
        .to_string()
        .contains("must be a JSON object"));
}

#[test]
fn sparse_layers_follow_step_and_exclusions() {
    let cfg = Qwen3Config::from_json(&json_with(
        OFFICIAL_30B_A3B,
        &[
            ("decoder_sparse_step", serde_json::json!(2)),
            ("mlp_only_layers", serde_json::json!([3])),
        ],
    ))
    .unwrap();
    let sparse: Vec<usize> = (0..8).filter(|&l| cfg.is_sparse_layer(l)).collect();
    assert_eq!(sparse, vec![1, 5, 7]);
}

/// A tiny config for checkpoint tests.
fn tiny() -> Qwen3Config {
    let mut cfg = registry::lookup("Qwen3-0.6B").unwrap();
    cfg.vocab_size = 16;
    cfg.hidden_size = 8;
    cfg.intermediate_size = 12;
    cfg.num_hidden_layers = 1;
    cfg.num_attention_heads = 2;
    cfg.num_key_value_heads = 1;
    cfg.head_dim = 4;
    cfg.tie_word_embeddings = true;
    cfg
}

fn write_checkpoint(dir: &std::path::Path, file: &str, tensors: &[(String, Vec<usize>)]) {
    let data: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(n, s)| {
            (
                n.clone(),
                vec![0u8; 2 * s.iter().product::<usize>()],
                s.clone(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, bytes, s)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, s.clone(), bytes)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join(file)).unwrap();
}

fn expected_pairs(cfg: &Qwen3Config) -> Vec<(String, Vec<usize>)> {
    expected_tensors(cfg)
        .into_iter()
        .map(|t| (t.name, t.shape))
        .collect()
}

#[test]
fn checkpoint_reports_every_missing_extra_and_misshaped_tensor() {
    let cfg = tiny();
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = expected_pairs(&cfg);
    tensors.retain(|(n, _)| !n.ends_with("k_norm.weight"));
    tensors
        .iter_mut()
        .find(|(n, _)| n.ends_with("q_proj.weight"))
        .unwrap()
        .1 = vec![4, 8];
    tensors.push(("model.layers.0.self_attn.q_proj.bias".into(), vec![8]));
    tensors.push((tensors::LM_HEAD.into(), vec![16, 8]));
    write_checkpoint(dir.path(), "model.safetensors", &tensors);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let err = ckpt.check(&cfg).unwrap_err().to_string();
    assert!(
        err.contains("missing tensor model.layers.0.self_attn.k_norm.weight (expected shape [4])"),
        "{err}"
    );
    assert!(
        err.contains(
            "tensor model.layers.0.self_attn.q_proj.weight has shape [4, 8], expected [8, 8]"
        ),
        "{err}"
    );
    assert!(
        err.contains("unexpected tensor model.layers.0.self_attn.q_proj.bias (shape [8])"),
        "{err}"
    );
    // A tied checkpoint may carry lm_head.weight.
    assert!(!err.contains("lm_head"), "{err}");
    assert!(
        err.contains("3 tensor problem(s): 1 missing, 1 mis-shaped, 1 unexpected"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 5, "{err}");
}

#[test]
fn checkpoint_reads_values_of_every_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let f32s: Vec<u8> = [1.5f32, -2.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let bf16s: Vec<u8> = [half::bf16::from_f32(1.5), half::bf16::from_f32(-2.0)]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let f16s: Vec<u8> = [half::f16::from_f32(1.5), half::f16::from_f32(-2.0)]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let views = vec![
        (
            "a",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &f32s).unwrap(),
        ),
        (
            "b",
            safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![2], &bf16s)
                .unwrap(),
        ),
        (
            "c",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F16, vec![1, 2], &f16s)
                .unwrap(),
        ),
    ];
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    for name in ["a", "b", "c"] {
        assert_eq!(ckpt.get(name).unwrap().to_f32(), vec![1.5, -2.0], "{name}");
    }
    assert_eq!(ckpt.get("c").unwrap().shape, &[1, 2]);
}

#[test]
fn truncated_and_missing_files_are_clear_errors() {
    let cfg = tiny();
    let dir = tempfile::tempdir().unwrap();
    assert!(Checkpoint::open(dir.path())
        .err()
        .unwrap()
        .to_string()
        .starts_with("no model.safetensors or model.safetensors.index.json"));
    write_checkpoint(dir.path(), "model.safetensors", &expected_pairs(&cfg));
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    let err = Checkpoint::open(dir.path()).err().unwrap().to_string();
    assert!(
        err.contains("is not a valid safetensors file (truncated or corrupt?)"),
        "{err}"
    );
    std::fs::write(&path, b"garbage").unwrap();
    assert!(Checkpoint::open(dir.path())
        .err()
        .unwrap()
        .to_string()
        .contains("not a valid safetensors file"));
}

#[test]
fn sharded_checkpoints_follow_their_index() {
    let cfg = tiny();
    let dir = tempfile::tempdir().unwrap();
    let all = expected_pairs(&cfg);
    let (first, second) = all.split_at(all.len() / 2);
    write_checkpoint(dir.path(), "model-00001-of-00002.safetensors", first);
    write_checkpoint(dir.path(), "model-00002-of-00002.safetensors", second);
    let mut map: HashMap<&str, &str> = HashMap::new();
    for (n, _) in first {
        map.insert(n, "model-00001-of-00002.safetensors");
    }
    for (n, _) in second {
        map.insert(n, "model-00002-of-00002.safetensors");
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.path().join(checkpoint::INDEX_FILE), index.to_string()).unwrap();
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    ckpt.check(&cfg).unwrap();
    assert_eq!(ckpt.files().count(), 2);

    // An index that points a tensor at the wrong shard is rejected.
    map.insert(&first[0].0, "model-00002-of-00002.safetensors");
    let index = serde_json::json!({"weight_map": map});
    std::fs::write(dir.path().join(checkpoint::INDEX_FILE), index.to_string()).unwrap();
    let err = Checkpoint::open(dir.path()).err().unwrap().to_string();
    assert!(
        err.contains("is listed in model-00002-of-00002.safetensors but not found there"),
        "{err}"
    );

    // A shard the index names but that does not exist.
    std::fs::remove_file(dir.path().join("model-00001-of-00002.safetensors")).unwrap();
    let err = Checkpoint::open(dir.path()).err().unwrap().to_string();
    assert!(
        err.starts_with("cannot read") && err.contains("model-00001-of-00002.safetensors"),
        "{err}"
    );
}

#[test]
fn model_sources_resolve_names_files_and_dirs() {
    assert_eq!(
        resolve("Qwen3-8B").unwrap(),
        registry::lookup("Qwen3-8B").unwrap()
    );
    let err = resolve("Qwen3-9B").unwrap_err().to_string();
    assert!(
        err.starts_with("unknown model 'Qwen3-9B': not a path, and not one of Qwen3-0.6B, "),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    assert!(resolve(dir.path().to_str().unwrap())
        .unwrap_err()
        .to_string()
        .ends_with("has no config.json"));
    std::fs::write(dir.path().join("config.json"), OFFICIAL_0_6B).unwrap();
    assert_eq!(
        resolve(dir.path().to_str().unwrap()).unwrap(),
        registry::lookup("Qwen3-0.6B").unwrap()
    );
    let file = dir.path().join("config.json");
    assert_eq!(
        resolve(file.to_str().unwrap()).unwrap(),
        registry::lookup("Qwen3-0.6B").unwrap()
    );
    std::fs::write(&file, "{\"hidden_size\": 1").unwrap();
    let err = resolve(file.to_str().unwrap()).unwrap_err().to_string();
    assert!(err.contains("config.json: malformed config JSON"), "{err}");
}

#[test]
fn to_json_reads_back_to_the_same_config() {
    let yarn = serde_json::json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768});
    let mut configs: Vec<Qwen3Config> = registry::names()
        .into_iter()
        .map(|n| registry::lookup(n).unwrap())
        .collect();
    configs.push(
        Qwen3Config::from_json(&json_with(OFFICIAL_0_6B, &[("rope_scaling", yarn)])).unwrap(),
    );
    configs.push(
        Qwen3Config::from_json(&json_with(
            OFFICIAL_30B_A3B,
            &[("mlp_only_layers", serde_json::json!([0, 5]))],
        ))
        .unwrap(),
    );
    for cfg in configs {
        assert_eq!(
            Qwen3Config::from_json(&cfg.to_json().to_string()).unwrap(),
            cfg
        );
    }
}
