//! Rotary position embedding: the parameters a [`crate::Op::Rope`] carries and the tables they define.
//!
//! This is the one place the frequencies are computed; every executor and code generator reads them from
//! here, so plain RoPE and YaRN mean the same thing everywhere (transformers' `_compute_yarn_parameters`).

/// Parameters of rotate-half RoPE.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeSpec {
    /// Base wavelength θ (`rope_theta`).
    pub theta: f64,
    /// YaRN context extension, when `rope_type` is `yarn`.
    pub yarn: Option<Yarn>,
}

/// YaRN parameters, already resolved from the config (defaults filled in).
#[derive(Clone, Debug, PartialEq)]
pub struct Yarn {
    /// Scale factor s.
    pub factor: f64,
    /// Context length L the model was pre-trained with.
    pub original_max_position_embeddings: u64,
    /// Multiplier on cos and sin (default 0.1·ln(s) + 1).
    pub attention_factor: f64,
    pub beta_fast: f64,
    pub beta_slow: f64,
    /// Round the correction range outward to whole dims (transformers' default).
    pub truncate: bool,
}

impl RopeSpec {
    /// Plain RoPE with base `theta`.
    pub fn plain(theta: f64) -> RopeSpec {
        RopeSpec { theta, yarn: None }
    }

    /// Checks the parameters are usable.
    pub fn check(&self) -> Result<(), String> {
        if !(self.theta.is_finite() && self.theta > 1.0) {
            return Err(format!(
                "rope theta must be finite and > 1, is {}",
                self.theta
            ));
        }
        if let Some(y) = &self.yarn {
            if !(y.factor.is_finite() && y.factor > 0.0) {
                return Err(format!(
                    "yarn factor must be finite and positive, is {}",
                    y.factor
                ));
            }
            if y.original_max_position_embeddings == 0 {
                return Err("yarn original_max_position_embeddings must be positive".into());
            }
            if !(y.attention_factor.is_finite()
                && y.beta_fast.is_finite()
                && y.beta_slow.is_finite())
            {
                return Err("yarn attention_factor, beta_fast and beta_slow must be finite".into());
            }
        }
        Ok(())
    }

    /// Inverse frequencies for a head dim `d`: `d / 2` values, as f32 like transformers computes them.
    pub fn inv_freq(&self, d: usize) -> Vec<f32> {
        let half = d / 2;
        let base: Vec<f64> = (0..half)
            .map(|i| 1.0 / self.theta.powf((2 * i) as f64 / d as f64))
            .collect();
        let Some(y) = &self.yarn else {
            return base.iter().map(|&f| f as f32).collect();
        };
        let corr = |rotations: f64| {
            let l = y.original_max_position_embeddings as f64;
            d as f64 * (l / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * self.theta.ln())
        };
        let (mut low, mut high) = (corr(y.beta_fast), corr(y.beta_slow));
        if y.truncate {
            low = low.floor();
            high = high.ceil();
        }
        let low = low.max(0.0);
        let mut high = high.min(d as f64 - 1.0);
        if low == high {
            high += 0.001;
        }
        base.iter()
            .enumerate()
            .map(|(i, &b)| {
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                (b * (1.0 - ramp) + (b / y.factor) * ramp) as f32
            })
            .collect()
    }

    /// The factor cos and sin are multiplied by (1 without YaRN).
    pub fn attention_scale(&self) -> f32 {
        self.yarn
            .as_ref()
            .map_or(1.0, |y| y.attention_factor as f32)
    }

    /// cos and sin for one position: `d / 2` values each, already multiplied by [`Self::attention_scale`].
    pub fn cos_sin(&self, inv_freq: &[f32], position: usize) -> (Vec<f32>, Vec<f32>) {
        let scale = self.attention_scale();
        inv_freq
            .iter()
            .map(|&f| {
                let angle = position as f32 * f;
                (angle.cos() * scale, angle.sin() * scale)
            })
            .unzip()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_frequencies_follow_theta() {
        let f = RopeSpec::plain(10000.0).inv_freq(8);
        assert_eq!(f.len(), 4);
        assert_eq!(f[0], 1.0);
        assert!((f[1] - 0.1).abs() < 1e-7);
        assert!((f[3] - 0.001).abs() < 1e-9);
    }

    #[test]
    fn yarn_interpolates_low_frequencies_only() {
        let yarn = Yarn {
            factor: 4.0,
            original_max_position_embeddings: 16,
            attention_factor: 0.1 * 4f64.ln() + 1.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            truncate: true,
        };
        let spec = RopeSpec {
            theta: 10000.0,
            yarn: Some(yarn),
        };
        let plain = RopeSpec::plain(10000.0).inv_freq(64);
        let scaled = spec.inv_freq(64);
        // Highest frequency untouched, lowest divided by the factor.
        assert_eq!(scaled[0], plain[0]);
        assert!((scaled[31] - plain[31] / 4.0).abs() < 1e-12);
        assert!((spec.attention_scale() - 1.138_629_4).abs() < 1e-6);
    }
}
