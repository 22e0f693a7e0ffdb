//! Binding weights as `q8` (`q3c_abi::Q8_LAYOUT`): 8-bit values in groups of 32 with one f32 scale each.

use q3c_ir::Q8_GROUP;

/// Quantizes a row-major `[n, k]` matrix (`k` a multiple of 32) into the `q8` layout: `n·k` i8, then `n·k/32`
/// f32 scales. Returned as f32 words so the scales are aligned; the i8 part fills the first `n·k/4` words.
pub fn quantize_q8(w: &[f32]) -> Vec<f32> {
    debug_assert!(w.len().is_multiple_of(Q8_GROUP));
    let groups = w.len() / Q8_GROUP;
    let mut q = vec![0u8; w.len()];
    let mut scales = Vec::with_capacity(groups);
    for (g, chunk) in w.chunks_exact(Q8_GROUP).enumerate() {
        let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        for (i, v) in chunk.iter().enumerate() {
            q[g * Q8_GROUP + i] = ((v * inv).round_ties_even() as i8) as u8;
        }
        scales.push(d);
    }
    let mut words: Vec<f32> = q
        .chunks_exact(4)
        .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    words.extend(scales);
    words
}

#[cfg(test)]
/// The value `quantize_q8` stores for element `i` (for tests).
pub fn dequantize_q8(words: &[f32], len: usize, i: usize) -> f32 {
    let bytes = words[i / 4].to_ne_bytes();
    let q = bytes[i % 4] as i8;
    let d = words[len / 4 + i / Q8_GROUP];
    d * f32::from(q)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_error_is_within_half_a_step_of_each_group() {
        let w: Vec<f32> = (0..128)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let q = quantize_q8(&w);
        assert_eq!(q.len(), 128 / 4 + 128 / 32);
        for g in 0..4 {
            let amax = w[g * 32..(g + 1) * 32]
                .iter()
                .fold(0f32, |m, v| m.max(v.abs()));
            for (i, &v) in w.iter().enumerate().skip(g * 32).take(32) {
                let err = (dequantize_q8(&q, 128, i) - v).abs();
                assert!(err <= amax / 127.0 / 2.0 + 1e-6, "{i}: {err}");
            }
        }
        // The largest magnitude of a group is exact (±127 steps).
        let all_zero = quantize_q8(&[0.0; 32]);
        assert_eq!(dequantize_q8(&all_zero, 32, 5), 0.0);
    }
}
