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

/// SplitMix64's step: its state is the seed plus this times the draws so far.
const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN_GAMMA);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// The generator `n` draws later: the same values a sequential run would give from there.
    pub fn skip(&self, n: u64) -> SplitMix64 {
        SplitMix64(self.0.wrapping_add(n.wrapping_mul(GOLDEN_GAMMA)))
    }
}

/// `n` values uniform in `[-amplitude, amplitude)` rounded to `dtype`, drawn from `rng` on (as one
/// sequential run would draw them, so a seed names the same checkpoint), in chunks over the machine's
/// threads: a Qwen3-8B shape's 8 billion draws took 84 s on one thread.
fn uniform_values(rng: &SplitMix64, n: usize, amplitude: f32, dtype: DType) -> Vec<f32> {
    let mut values = vec![0f32; n];
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let chunk = n.div_ceil(threads).max(1 << 16);
    std::thread::scope(|s| {
        for (c, part) in values.chunks_mut(chunk).enumerate() {
            let mut rng = rng.skip((c * chunk) as u64);
            s.spawn(move || {
                for v in part {
                    *v = round_to(dtype, amplitude * (2.0 * rng.next_f64() as f32 - 1.0));
                }
            });
        }
    });
    values
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
        let n = t.shape.iter().product::<usize>();
        let values = if t.name.ends_with("norm.weight") {
            vec![round_to(dtype, 1.0); n]
        } else {
            let values = uniform_values(&rng, n, amplitude, dtype);
            rng = rng.skip(n as u64);
            values
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skip_lands_where_the_draws_would() {
        let mut seq = SplitMix64(7);
        for _ in 0..1000 {
            seq.next_u64();
        }
        assert_eq!(SplitMix64(7).skip(1000).next_u64(), seq.next_u64());
    }

    #[test]
    fn values_drawn_in_chunks_are_the_sequential_draws() {
        // Several chunks of 2^16 wherever there are two threads or more: 2^16 · 5 + 17 values.
        let n = (5 << 16) + 17;
        let mut seq = SplitMix64(3);
        let expected: Vec<f32> = (0..n)
            .map(|_| round_to(DType::BF16, 0.5 * (2.0 * seq.next_f64() as f32 - 1.0)))
            .collect();
        let got = uniform_values(&SplitMix64(3), n, 0.5, DType::BF16);
        assert!(got
            .iter()
            .zip(&expected)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        assert_eq!(got.len(), n);
    }
}
