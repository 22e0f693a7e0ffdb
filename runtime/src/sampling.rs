//! Choosing the next token: greedy, or seeded sampling with temperature, top-k, top-p, min-p, and
//! presence and repetition penalties.

use crate::error::RuntimeError;
use crate::generate::{argmax, SplitMix64};

/// How to pick tokens. `temperature` 0 is greedy; `top_k` 0, `top_p` 1, `min_p` 0 and the penalties at
/// their neutral values (0 and 1) switch those filters off.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    /// Subtracted from the logit of every token already generated (OpenAI's presence penalty).
    pub presence_penalty: f32,
    /// Logits of tokens in the prompt or generated are divided by it when positive and multiplied when
    /// negative (transformers' repetition penalty); 1 is off.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl SamplingParams {
    /// Qwen3's recommendation for thinking mode: temperature 0.6, top-p 0.95, top-k 20, min-p 0.
    pub fn thinking() -> SamplingParams {
        SamplingParams {
            temperature: 0.6,
            top_k: 20,
            top_p: 0.95,
            min_p: 0.0,
            presence_penalty: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }

    /// Qwen3's recommendation without thinking: temperature 0.7, top-p 0.8, top-k 20, min-p 0.
    pub fn non_thinking() -> SamplingParams {
        SamplingParams {
            temperature: 0.7,
            top_p: 0.8,
            ..SamplingParams::thinking()
        }
    }

    /// Qwen3's recommendation for a mode: [`SamplingParams::thinking`] or [`SamplingParams::non_thinking`].
    pub fn for_mode(thinking: bool) -> SamplingParams {
        if thinking {
            SamplingParams::thinking()
        } else {
            SamplingParams::non_thinking()
        }
    }

    /// Always the most likely token.
    pub fn greedy() -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            ..SamplingParams::thinking()
        }
    }

    /// Checks every field's range.
    pub fn check(&self) -> Result<(), RuntimeError> {
        let bad =
            |what: &str, v: f32| Err(RuntimeError::Input(format!("{what} is out of range: {v}")));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad("temperature (>= 0)", self.temperature);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p (in (0, 1])", self.top_p);
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p (in [0, 1])", self.min_p);
        }
        if !(self.presence_penalty.is_finite() && (-2.0..=2.0).contains(&self.presence_penalty)) {
            return bad("presence_penalty (in [-2, 2])", self.presence_penalty);
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad("repetition_penalty (> 0)", self.repetition_penalty);
        }
        Ok(())
    }
}

/// Sampling settings a user gave; the unset ones come from a mode's defaults ([`SamplingOverrides::over`]).
/// Field names are those of the OpenAI-style request.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
pub struct SamplingOverrides {
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
}

impl SamplingOverrides {
    /// These settings over `defaults` (an unset seed is 0).
    pub fn over(&self, defaults: SamplingParams) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature.unwrap_or(defaults.temperature),
            top_k: self.top_k.unwrap_or(defaults.top_k),
            top_p: self.top_p.unwrap_or(defaults.top_p),
            min_p: self.min_p.unwrap_or(defaults.min_p),
            presence_penalty: self.presence_penalty.unwrap_or(defaults.presence_penalty),
            repetition_penalty: self
                .repetition_penalty
                .unwrap_or(defaults.repetition_penalty),
            seed: self.seed.unwrap_or(0),
        }
    }
}

/// A seeded sampler: the same parameters, seed and logits give the same tokens.
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Sampler, RuntimeError> {
        params.check()?;
        let rng = SplitMix64(params.seed);
        Ok(Sampler { params, rng })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The next token after `context` (prompt and generated ids), of which `generated` were generated.
    pub fn sample(&mut self, logits: &[f32], context: &[u32], generated: &[u32]) -> u32 {
        let p = &self.params;
        let mut l = logits.to_vec();
        if p.repetition_penalty != 1.0 {
            for &id in distinct(context).iter() {
                if let Some(v) = l.get_mut(id as usize) {
                    *v = if *v > 0.0 {
                        *v / p.repetition_penalty
                    } else {
                        *v * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 {
            for &id in distinct(generated).iter() {
                if let Some(v) = l.get_mut(id as usize) {
                    *v -= p.presence_penalty;
                }
            }
        }
        if p.temperature == 0.0 {
            return argmax(&l);
        }
        // Candidates, most likely first (ties to the lower id).
        let cand = if p.top_k > 0 && p.top_k < l.len() {
            top_k(&l, p.top_k)
        } else {
            let mut all: Vec<u32> = (0..l.len() as u32).collect();
            all.sort_unstable_by(|a, b| l[*b as usize].total_cmp(&l[*a as usize]).then(a.cmp(b)));
            all
        };
        let max = f64::from(l[cand[0] as usize]);
        let t = f64::from(p.temperature);
        let mut probs: Vec<f64> = cand
            .iter()
            .map(|&i| ((f64::from(l[i as usize]) - max) / t).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        // top-p: the shortest prefix holding at least top_p of the mass.
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, q) in probs.iter().enumerate() {
                acc += q;
                if acc >= f64::from(p.top_p) {
                    keep = i + 1;
                    break;
                }
            }
        }
        // min-p: drop tokens below min_p × the most likely one's probability.
        if p.min_p > 0.0 {
            let floor = f64::from(p.min_p) * probs[0];
            keep = keep.min(probs.iter().take_while(|&&q| q >= floor).count().max(1));
        }
        let mass: f64 = probs[..keep].iter().sum();
        let mut target = self.rng.next_f64() * mass;
        for (i, q) in probs[..keep].iter().enumerate() {
            target -= q;
            if target < 0.0 {
                return cand[i];
            }
        }
        cand[keep - 1]
    }
}

/// The ids of the `k` largest of `logits` (`total_cmp`), most likely first, ties to the lower id: one pass
/// that keeps the `k` best so far in order, skipping a chunk of 16 at once when none beats the k-th best.
/// (It is on the server's critical path once per sequence and step: a selection over all 151,936 ids took
/// ~270 µs, this pass ~65.)
fn top_k(logits: &[f32], k: usize) -> Vec<u32> {
    // `total_cmp`'s order as signed integers (flip the magnitude bits of negatives), which vectorize.
    let key = |v: f32| {
        let x = v.to_bits() as i32;
        x ^ (((x >> 31) as u32) >> 1) as i32
    };
    let mut best: Vec<(i32, u32)> = Vec::with_capacity(k + 1);
    for (c, chunk) in logits.chunks(16).enumerate() {
        if best.len() == k && chunk.iter().map(|&v| key(v)).max() <= Some(best[k - 1].0) {
            continue;
        }
        for (i, &v) in chunk.iter().enumerate() {
            let v = key(v);
            // Ids come in increasing order, so a tie with the k-th best loses.
            if best.len() == k && v <= best[k - 1].0 {
                continue;
            }
            let at = best.partition_point(|&(b, _)| b >= v);
            best.insert(at, (v, (c * 16 + i) as u32));
            best.truncate(k);
        }
    }
    best.into_iter().map(|(_, id)| id).collect()
}

fn distinct(ids: &[u32]) -> Vec<u32> {
    let mut v = ids.to_vec();
    v.sort_unstable();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draws(params: SamplingParams, logits: &[f32], n: usize) -> Vec<u32> {
        let mut s = Sampler::new(params).unwrap();
        (0..n).map(|_| s.sample(logits, &[], &[])).collect()
    }

    fn with(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            ..SamplingParams::greedy()
        };
        f(&mut p);
        p
    }

    #[test]
    fn top_k_is_the_head_of_the_full_ordering() {
        // The full ordering: by logit (total_cmp), ties to the lower id.
        let sorted = |l: &[f32]| {
            let mut all: Vec<u32> = (0..l.len() as u32).collect();
            all.sort_by(|a, b| l[*b as usize].total_cmp(&l[*a as usize]).then(a.cmp(b)));
            all
        };
        let mut state = 7u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        let random: Vec<f32> = (0..5000)
            .map(|_| (next() % 1000) as f32 / 10.0 - 50.0)
            .collect();
        let rising: Vec<f32> = (0..300).map(|i| i as f32).collect();
        let ties = vec![1.0, 2.0, 2.0, -0.0, 0.0, 2.0, f32::NAN, -1.0, 2.0, 1.0];
        for l in [&random, &rising, &ties] {
            for k in [1, 2, 3, 5, 40, l.len() - 1]
                .into_iter()
                .filter(|&k| k < l.len())
            {
                assert_eq!(top_k(l, k), sorted(l)[..k], "k = {k} of {}", l.len());
            }
        }
    }

    #[test]
    fn greedy_takes_the_argmax_after_penalties() {
        let logits = [1.0, 3.0, 2.0];
        let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
        assert_eq!(s.sample(&logits, &[], &[]), 1);
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy()
        })
        .unwrap();
        // 3.0 / 2 = 1.5 < 2.0.
        assert_eq!(s.sample(&logits, &[1], &[]), 2);
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 1.5,
            ..SamplingParams::greedy()
        })
        .unwrap();
        assert_eq!(s.sample(&logits, &[1], &[1]), 2);
    }

    #[test]
    fn filters_cut_the_tail_and_sampling_is_reproducible() {
        // Probabilities 0.5, 0.25, 0.125, 0.125.
        let logits = [2f32.ln() * 3.0, 2f32.ln() * 2.0, 2f32.ln(), 2f32.ln()];
        let all = draws(with(|_| {}), &logits, 4000);
        assert_eq!(all, draws(with(|_| {}), &logits, 4000));
        assert_ne!(all, draws(with(|p| p.seed = 1), &logits, 4000));
        let share = |d: &[u32], id| d.iter().filter(|&&i| i == id).count() as f64 / d.len() as f64;
        assert!((share(&all, 0) - 0.5).abs() < 0.03);
        let top2 = draws(with(|p| p.top_k = 2), &logits, 4000);
        assert!(top2.iter().all(|&i| i < 2) && (share(&top2, 0) - 2.0 / 3.0).abs() < 0.03);
        // top_p 0.7: 0.5 + 0.25 reaches it, so ids 0 and 1 remain.
        assert!(draws(with(|p| p.top_p = 0.7), &logits, 4000)
            .iter()
            .all(|&i| i < 2));
        // min_p 0.3: 0.3 × 0.5 = 0.15 keeps ids 0 and 1.
        assert!(draws(with(|p| p.min_p = 0.3), &logits, 4000)
            .iter()
            .all(|&i| i < 2));
        // A low temperature sharpens towards the argmax.
        let cold = draws(with(|p| p.temperature = 0.1), &logits, 1000);
        assert!(share(&cold, 0) > 0.99);
    }

    #[test]
    fn out_of_range_settings_are_refused() {
        assert!(Sampler::new(with(|p| p.top_p = 0.0)).is_err());
        assert!(Sampler::new(with(|p| p.temperature = -1.0)).is_err());
        assert!(Sampler::new(with(|p| p.min_p = 1.5)).is_err());
        assert!(Sampler::new(with(|p| p.repetition_penalty = 0.0)).is_err());
    }
}
