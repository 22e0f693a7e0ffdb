//! Compiled `.so` vs reference executor on randomly drawn small configs: head ratios, head_dim, experts,
//! top-k, renormalisation, sparse steps, tied/untied, YaRN, and f32/bf16/f16 weights — each case fully fused
//! and under one more strategy (none or a single pass, in turn).

use q3c_models::tensors::expected_tensors;
use q3c_models::{Checkpoint, Qwen3Config};
use q3c_runtime::generate::SplitMix64;
use q3c_runtime::{CompiledModel, ReferenceModel, Session};
use q3c_tests::max_abs_diff;

/// The shared seeded generator, with the helpers this test draws with.
struct Rng(SplitMix64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0.next_u64() % n
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
    fn uniform(&mut self) -> f32 {
        2.0 * self.0.next_f64() as f32 - 1.0
    }
}

fn random_config(rng: &mut Rng) -> serde_json::Value {
    let kv_heads = rng.pick(&[1u64, 2, 3]);
    let heads = kv_heads * rng.pick(&[1u64, 2, 4]);
    let layers = 1 + rng.below(3);
    let mut cfg = serde_json::json!({
        "model_type": "qwen3",
        "vocab_size": rng.pick(&[97u64, 128, 300]),
        "hidden_size": rng.pick(&[16u64, 24, 40, 64]),
        "intermediate_size": rng.pick(&[20u64, 48, 96]),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": rng.pick(&[6u64, 8, 16, 20, 32]),
        "rms_norm_eps": 1e-6,
        "rope_theta": rng.pick(&[10000.0, 1e6]),
        "max_position_embeddings": 64,
        "tie_word_embeddings": rng.below(2) == 0,
        "torch_dtype": rng.pick(&["float32", "bfloat16", "float16"]),
        "eos_token_id": 2,
    });
    if rng.below(3) == 0 {
        cfg["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": rng.pick(&[2.0, 4.0]), "original_max_position_embeddings": 8});
    }
    if rng.below(2) == 0 {
        let experts = rng.pick(&[2u64, 4, 6, 8]);
        let obj = cfg.as_object_mut().unwrap();
        obj.insert("model_type".into(), "qwen3_moe".into());
        obj.insert("num_experts".into(), experts.into());
        obj.insert(
            "num_experts_per_tok".into(),
            (1 + rng.below(experts)).into(),
        );
        obj.insert(
            "moe_intermediate_size".into(),
            rng.pick(&[8u64, 12, 32]).into(),
        );
        obj.insert("norm_topk_prob".into(), (rng.below(2) == 0).into());
        obj.insert("decoder_sparse_step".into(), rng.pick(&[1u64, 2]).into());
        let only: Vec<u64> = (0..layers).filter(|_| rng.below(4) == 0).collect();
        obj.insert("mlp_only_layers".into(), only.into());
    }
    cfg
}

/// Writes config.json and random weights of the config's dtype into `dir`.
fn write_model(dir: &std::path::Path, cfg_json: &serde_json::Value, rng: &mut Rng) -> Qwen3Config {
    std::fs::write(dir.join("config.json"), cfg_json.to_string()).unwrap();
    let cfg = Qwen3Config::from_file(&dir.join("config.json")).unwrap();
    let dtype = match cfg.torch_dtype {
        q3c_models::DType::F32 => safetensors::Dtype::F32,
        q3c_models::DType::BF16 => safetensors::Dtype::BF16,
        q3c_models::DType::F16 => safetensors::Dtype::F16,
    };
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = expected_tensors(&cfg)
        .into_iter()
        .map(|t| {
            let n: usize = t.shape.iter().product();
            let norm = t.name.ends_with("norm.weight");
            let values = (0..n).map(|_| {
                if norm {
                    1.0 + 0.3 * rng.uniform()
                } else {
                    0.3 * rng.uniform()
                }
            });
            let bytes = match dtype {
                safetensors::Dtype::F32 => values.flat_map(f32::to_le_bytes).collect(),
                safetensors::Dtype::BF16 => values
                    .flat_map(|v| half::bf16::from_f32(v).to_le_bytes())
                    .collect(),
                _ => values
                    .flat_map(|v| half::f16::from_f32(v).to_le_bytes())
                    .collect(),
            };
            (t.name, t.shape, bytes)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(dtype, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    cfg
}

#[test]
fn compiled_equals_reference_on_random_configs() {
    let mut rng = Rng(SplitMix64(20261122));
    for case in 0..14 {
        let cfg_json = random_config(&mut rng);
        let dir = tempfile::tempdir().unwrap();
        let cfg = write_model(dir.path(), &cfg_json, &mut rng);
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        let reference = ReferenceModel::new(
            q3c_compiler::lower(&cfg).unwrap(),
            &ckpt,
            q3c_compiler::LOGITS,
        )
        .unwrap();
        // Every case runs fully fused and under one more strategy (none, then each pass alone, in turn).
        let mut rotation = vec!["none"];
        rotation.extend(q3c_compiler::pipeline::PASSES.iter().map(|p| p.name));
        // ... through every backend in the build.
        let strategies: Vec<(&str, &str)> = q3c_tests::artifact_kinds()
            .into_iter()
            .flat_map(|b| [(b, rotation[case % rotation.len()]), (b, "all")])
            .collect();
        let compiled: Vec<CompiledModel> = strategies
            .iter()
            .map(|(backend, fusion)| {
                let out = dir.path().join(fusion.replace(',', "_"));
                std::fs::create_dir_all(&out).unwrap();
                let so = q3c_tests::compile_by(backend, dir.path(), &out, 5, fusion);
                CompiledModel::load(&so, dir.path(), 1 + case % 2).unwrap()
            })
            .collect();
        let prompt: Vec<u32> = (0..9)
            .map(|_| rng.below(cfg.vocab_size as u64) as u32)
            .collect();
        let mut r = reference.session();
        let mut sessions: Vec<_> = compiled.iter().map(|m| m.session()).collect();
        // A prefill of 9 tokens (two calls of at most 5), then three single-token decodes.
        let mut steps = vec![prompt];
        steps.extend((0..3).map(|_| vec![rng.below(cfg.vocab_size as u64) as u32]));
        for ids in steps {
            let lr = r.forward(&ids).unwrap();
            let scale = lr.data.iter().fold(1f32, |m, v| m.max(v.abs()));
            for ((backend, fusion), c) in strategies.iter().zip(&mut sessions) {
                let diff = max_abs_diff(&lr.data, &c.forward(&ids).unwrap().data);
                assert!(
                    diff <= 1e-4 * scale,
                    "case {case} ({backend}, {fusion}) {cfg_json}: compiled vs reference differ by {diff:e} (scale {scale})"
                );
            }
        }
    }
}
