//! Random checkpoints for any config (benchmarks, smoke tests), and the small seeded generator behind them.

use std::path::Path;

use crate::tensors::expected_tensors;
use crate::{DType, Qwen3Config};

/// A checkpoint could not be written.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct WriteError(String);

/// A small, fast, seedable generator (Steele et al.'s SplitMix64), shared by samplers, random checkpoints and
/// tests.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Writes `config.json` and `model.safetensors` (random weights of `dtype`) into `dir`; with
/// `tokenizer`, copies `tokenizer.json` and `tokenizer_config.json` from it too.
pub fn write_checkpoint(
    cfg: &Qwen3Config,
    dtype: DType,
    seed: u64,
    dir: &Path,
    tokenizer: Option<&Path>,
) -> Result<(), WriteError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| WriteError(format!("cannot create {}: {e}", dir.display())))?;
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
        .map_err(|e| WriteError(format!("building tensors: {e}")))?;
    let tmp = dir.join(".model.safetensors.tmp");
    safetensors::serialize_to_file(views, None, &tmp)
        .map_err(|e| WriteError(format!("writing model.safetensors: {e}")))?;
    std::fs::rename(&tmp, dir.join("model.safetensors"))
        .map_err(|e| WriteError(format!("writing model.safetensors: {e}")))?;
    let text = serde_json::to_string_pretty(&json).map_err(|e| WriteError(e.to_string()))? + "\n";
    std::fs::write(dir.join("config.json"), text)
        .map_err(|e| WriteError(format!("writing config.json: {e}")))?;
    if let Some(tok) = tokenizer {
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(tok.join(f), dir.join(f))
                .map_err(|e| WriteError(format!("copying {f} from {}: {e}", tok.display())))?;
        }
    }
    Ok(())
}
