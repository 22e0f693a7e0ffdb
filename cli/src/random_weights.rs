//! `q3c random-weights`: a checkpoint of random weights for any config, for benchmarks and smoke tests.

use std::path::Path;

use anyhow::{Context, Result};
use q3c_models::tensors::expected_tensors;
use q3c_models::{DType, Qwen3Config};
use q3c_runtime::generate::SplitMix64;

/// Writes `config.json` and `model.safetensors` (random weights of `dtype`) into `dir`; with
/// `tokenizer`, copies `tokenizer.json` and `tokenizer_config.json` from it too.
pub fn write(
    cfg: &Qwen3Config,
    dtype: DType,
    seed: u64,
    dir: &Path,
    tokenizer: Option<&Path>,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut cfg = cfg.clone();
    cfg.torch_dtype = dtype;
    let mut json = cfg.to_json();
    json["architectures"] = serde_json::json!([if cfg.moe.is_some() {
        "Qwen3MoeForCausalLM"
    } else {
        "Qwen3ForCausalLM"
    }]);
    let mut rng = SplitMix64(seed);
    let st_dtype = match dtype {
        DType::F32 => safetensors::Dtype::F32,
        DType::BF16 => safetensors::Dtype::BF16,
        DType::F16 => safetensors::Dtype::F16,
    };
    // Uniform with the standard deviation of transformers' initialisation (0.02); norms at 1.
    let amplitude = 0.02 * 3f32.sqrt();
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = expected_tensors(&cfg)
        .into_iter()
        .map(|t| {
            let n: usize = t.shape.iter().product();
            let mut bytes = Vec::with_capacity(n * dtype.size());
            let norm = t.name.ends_with("norm.weight");
            for _ in 0..n {
                let v = if norm {
                    1.0
                } else {
                    amplitude * (2.0 * rng.next_f64() as f32 - 1.0)
                };
                match dtype {
                    DType::F32 => bytes.extend_from_slice(&v.to_le_bytes()),
                    DType::BF16 => bytes.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
                    DType::F16 => bytes.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
                }
            }
            (t.name, t.shape, bytes)
        })
        .collect();
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            Ok((
                name.as_str(),
                safetensors::tensor::TensorView::new(st_dtype, shape.clone(), bytes)?,
            ))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()
        .context("building tensors")?;
    let tmp = dir.join(".model.safetensors.tmp");
    safetensors::serialize_to_file(views, None, &tmp).context("writing model.safetensors")?;
    std::fs::rename(&tmp, dir.join("model.safetensors")).context("writing model.safetensors")?;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&json)? + "\n",
    )
    .context("writing config.json")?;
    if let Some(tok) = tokenizer {
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(tok.join(f), dir.join(f))
                .with_context(|| format!("copying {f} from {}", tok.display()))?;
        }
    }
    Ok(())
}
