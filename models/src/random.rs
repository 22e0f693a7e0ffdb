//! Random checkpoints for any config (benchmarks, smoke tests), and the small seeded generator behind them.

use std::path::Path;

use crate::checkpoint::SINGLE_FILE;
use crate::tensors::expected_tensors;
use crate::writer::{plan_tensors, round_to, to_bytes, write_safetensors, Packer};
use crate::{DType, Qwen3Config};

/// A checkpoint could not be written.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct WriteError(pub String);

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
    write_checkpoint_packed(cfg, dtype, seed, dir, tokenizer, None)
}

/// [`write_checkpoint`], storing the tensors `packer` chooses pre-quantized (the values it packs are the
/// ones a plain checkpoint of `dtype` would hold). Tensors are generated and written one at a time.
pub fn write_checkpoint_packed(
    cfg: &Qwen3Config,
    dtype: DType,
    seed: u64,
    dir: &Path,
    tokenizer: Option<&Path>,
    packer: Option<&dyn Packer>,
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
    // Uniform with the standard deviation of transformers' initialisation (0.02); norms at 1.
    let amplitude = 0.02 * 3f32.sqrt();
    let specs = expected_tensors(&cfg);
    let plan = plan_tensors(&specs, dtype, packer);
    write_safetensors(&dir.join(SINGLE_FILE), &plan.tensors, &plan.metadata, |i| {
        let t = &specs[i];
        let norm = t.name.ends_with("norm.weight");
        let values: Vec<f32> = (0..t.shape.iter().product::<usize>())
            .map(|_| {
                let v = if norm {
                    1.0
                } else {
                    amplitude * (2.0 * rng.next_f64() as f32 - 1.0)
                };
                round_to(dtype, v)
            })
            .collect();
        Ok(match (&plan.packed[i], packer) {
            (Some(_), Some(p)) => p.pack(&t.name, &t.shape, &values),
            _ => to_bytes(dtype, &values),
        })
    })?;
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
