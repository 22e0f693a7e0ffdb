//! Binding weights as `q8` (`q3c_abi::Q8_LAYOUT`): 8-bit values in groups of 32 with one f32 scale each.

use q3c_ir::Q8_GROUP;

/// Bytes of the `q8` form of `len` values: `len` i8, then `len / 32` f32 scales.
pub fn q8_bytes(len: usize) -> usize {
    len + len / Q8_GROUP * 4
}

/// Quantizes a row-major `[n, k]` matrix (`k` a multiple of 32) into the `q8` layout in `out`
/// (`q8_bytes(w.len())` bytes, 4-byte aligned): `n·k` i8, then `n·k/32` f32 scales.
pub fn quantize_q8(w: &[f32], out: &mut [u8]) {
    debug_assert!(w.len().is_multiple_of(Q8_GROUP));
    let (q, scales) = out.split_at_mut(w.len());
    for ((chunk, q), scale) in w
        .chunks_exact(Q8_GROUP)
        .zip(q.chunks_exact_mut(Q8_GROUP))
        .zip(scales.chunks_exact_mut(4))
    {
        let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        for (q, v) in q.iter_mut().zip(chunk) {
            *q = ((v * inv).round_ties_even() as i8) as u8;
        }
        scale.copy_from_slice(&d.to_ne_bytes());
    }
}

#[cfg(test)]
/// The value `quantize_q8` stores for element `i` (for tests).
pub fn dequantize_q8(bytes: &[u8], len: usize, i: usize) -> f32 {
    let q = bytes[i] as i8;
    let s = len + i / Q8_GROUP * 4;
    let d = f32::from_ne_bytes(bytes[s..s + 4].try_into().expect("4 bytes"));
    d * f32::from(q)
}

#[cfg(test)]
fn quantized(w: &[f32]) -> Vec<u8> {
    let mut out = vec![0; q8_bytes(w.len())];
    quantize_q8(w, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_error_is_within_half_a_step_of_each_group() {
        let w: Vec<f32> = (0..128)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let q = quantized(&w);
        assert_eq!(q.len(), 128 + 128 / 32 * 4);
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
        let all_zero = quantized(&[0.0; 32]);
        assert_eq!(dequantize_q8(&all_zero, 32, 5), 0.0);
    }
}
