//! The plain decoding loop over token ids (no chat template, no thinking block): see [`crate::chat`] for
//! chat requests.

use crate::error::RuntimeError;
use crate::sampling::{Sampler, SamplingParams};
use crate::session::Session;

/// How to continue a prompt.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// Greedy (the default) or seeded sampling.
    pub sampling: SamplingParams,
    /// Ids that end generation (they are included in the output).
    pub stop_ids: Vec<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 32,
            sampling: SamplingParams::greedy(),
            stop_ids: Vec::new(),
        }
    }
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
    let mut sampler = Sampler::new(opts.sampling.clone())?;
    let mut context = prompt.to_vec();
    let mut out = Vec::with_capacity(opts.max_new_tokens);
    if opts.max_new_tokens == 0 {
        return Ok(out);
    }
    let mut logits = session.forward_last(prompt)?;
    loop {
        let next = sampler.sample(&logits, &context, &out);
        out.push(next);
        context.push(next);
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

pub use q3c_models::random::SplitMix64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.0, 3.0, 1.0, 3.0]), 1);
    }
}
