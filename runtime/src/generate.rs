//! Decoding loop: greedy or temperature sampling over any [`Session`].

use crate::error::RuntimeError;
use crate::session::Session;

/// How to continue a prompt.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 means greedy (argmax, ties to the lowest id).
    pub temperature: f32,
    /// Seed of the sampler; the same seed gives the same tokens.
    pub seed: u64,
    /// Ids that end generation (they are included in the output).
    pub stop_ids: Vec<u32>,
}

/// Feeds `prompt`, then generates up to `max_new_tokens` ids and returns them (without the prompt).
pub fn generate(
    session: &mut dyn Session,
    prompt: &[u32],
    opts: &GenerateOptions,
) -> Result<Vec<u32>, RuntimeError> {
    if prompt.is_empty() {
        return Err(RuntimeError::Input(
            "the prompt is empty: give at least one token id".into(),
        ));
    }
    if !(opts.temperature >= 0.0 && opts.temperature.is_finite()) {
        return Err(RuntimeError::Input(format!(
            "temperature must be a finite number >= 0, is {}",
            opts.temperature
        )));
    }
    let mut rng = SplitMix64(opts.seed);
    let mut out = Vec::with_capacity(opts.max_new_tokens);
    if opts.max_new_tokens == 0 {
        return Ok(out);
    }
    let mut logits = session.forward_last(prompt)?;
    loop {
        let next = if opts.temperature == 0.0 {
            argmax(&logits)
        } else {
            sample(&logits, opts.temperature, &mut rng)
        };
        out.push(next);
        if out.len() == opts.max_new_tokens || opts.stop_ids.contains(&next) {
            return Ok(out);
        }
        logits = session.forward_last(&[next])?;
    }
}

/// Index of the largest value, the first one on ties (as `torch.argmax`).
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

fn sample(row: &[f32], temperature: f32, rng: &mut SplitMix64) -> u32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = row
        .iter()
        .map(|&v| (f64::from(v - max) / f64::from(temperature)).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut target = rng.next_f64() * total;
    for (i, w) in weights.iter().enumerate() {
        target -= w;
        if target < 0.0 {
            return i as u32;
        }
    }
    argmax(row)
}

/// A small, fast, seedable generator (Steele et al.'s SplitMix64), shared by the sampler, random
/// checkpoints and tests.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.0, 3.0, 1.0, 3.0]), 1);
    }

    #[test]
    fn sampling_is_seeded_and_follows_the_distribution() {
        let row = [0.0f32, (3.0f32).ln(), f32::NEG_INFINITY];
        let draw = |seed| {
            let mut rng = SplitMix64(seed);
            (0..4000)
                .map(|_| sample(&row, 1.0, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let ones = draw(7).iter().filter(|&&i| i == 1).count() as f64 / 4000.0;
        assert!((ones - 0.75).abs() < 0.03, "{ones}");
        assert!(draw(7).iter().all(|&i| i != 2));
    }
}
