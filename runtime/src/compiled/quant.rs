//! Binding weights as `q8` (`q3c_abi::Q8_LAYOUT`: 8-bit values in groups of 32 with one f32 scale each),
//! `q4` or `q6` (`q3c_abi::Q4_LAYOUT`, `Q6_LAYOUT`: 4- or 6-bit values in groups of 32 with one f16 scale
//! each), interleaved in panels of 16 rows for 512-bit VNNI products.

use q3c_ir::{Q8_GROUP, Q8_PANEL};

/// Bytes of the `q8` form of `len` values: `len` bytes, then `len / 32` f32 scales.
pub fn q8_bytes(len: usize) -> usize {
    len + len / Q8_GROUP * 4
}

/// Bytes of one step of a panel: four elements of each of its rows.
const STEP: usize = 4 * Q8_PANEL;

/// Quantizes a row-major `[n, k]` matrix (`n` a multiple of 16, `k` of 32) into the `q8` layout in `out`
/// (`q8_bytes(n·k)` bytes, 4-byte aligned); `row(i, buf)` writes row `i` into `buf` as f32.
pub fn quantize_q8(n: usize, k: usize, row: impl Fn(usize, &mut [f32]), out: &mut [u8]) {
    debug_assert!(k.is_multiple_of(Q8_GROUP) && n.is_multiple_of(Q8_PANEL));
    let groups = k / Q8_GROUP;
    let (q, scales) = out.split_at_mut(n * k);
    let mut buf = vec![0f32; k];
    for i in 0..n {
        row(i, &mut buf);
        let row = &buf;
        let (panel, r) = (i / Q8_PANEL, i % Q8_PANEL);
        for (g, chunk) in row.chunks_exact(Q8_GROUP).enumerate() {
            let (d, bytes) = q8_group(chunk);
            let block = (panel * groups + g) * Q8_GROUP * Q8_PANEL + r * 4;
            for (s, four) in bytes.chunks_exact(4).enumerate() {
                q[block + s * STEP..block + s * STEP + 4].copy_from_slice(four);
            }
            let s = ((panel * groups + g) * Q8_PANEL + r) * 4;
            scales[s..s + 4].copy_from_slice(&d.to_ne_bytes());
        }
    }
}

/// One group of 32 values in 8 bits: the scale `d = max|v| / 127` and the values `q + 128` (`q` rounded
/// to nearest, ties to even), so that `v ≈ d · q`.
pub fn q8_group(values: &[f32]) -> (f32, [u8; Q8_GROUP]) {
    let amax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut bytes = [0u8; Q8_GROUP];
    for (b, v) in bytes.iter_mut().zip(values) {
        *b = offset_byte(v * inv);
    }
    (d, bytes)
}

/// Bytes of `len` values packed as `format` ([`q3c_abi::Q8_LAYOUT`], [`q3c_abi::Q4_LAYOUT`] or
/// [`q3c_abi::Q6_LAYOUT`]); `None` for any other format.
pub fn packed_bytes(format: &str, len: usize) -> Option<usize> {
    match format {
        q3c_abi::Q8_LAYOUT => Some(q8_bytes(len)),
        q3c_abi::Q4_LAYOUT => Some(q4_bytes(len)),
        q3c_abi::Q6_LAYOUT => Some(q6_bytes(len)),
        _ => None,
    }
}

/// Quantizes a row-major `[n, k]` matrix into `format` (q8, q4 or q6, see [`quantize_q8`],
/// [`quantize_low_bits`]).
pub fn quantize(format: &str, n: usize, k: usize, row: impl Fn(usize, &mut [f32]), out: &mut [u8]) {
    match format {
        q3c_abi::Q4_LAYOUT => quantize_low_bits(LowBits::Q4, n, k, row, out),
        q3c_abi::Q6_LAYOUT => quantize_low_bits(LowBits::Q6, n, k, row, out),
        _ => quantize_q8(n, k, row, out),
    }
}

/// Bytes of the `q4` form of `len` values: `len / 2` bytes of nibbles, then `len / 32` f16 scales.
pub fn q4_bytes(len: usize) -> usize {
    LowBits::Q4.bytes(len)
}

/// Bytes of the `q6` form of `len` values: `len · 3/4` bytes of nibbles and high-bit planes, then
/// `len / 32` f16 scales.
pub fn q6_bytes(len: usize) -> usize {
    LowBits::Q6.bytes(len)
}

/// The formats of fewer than 8 bits, one f16 scale per group of 32 and the values' low four bits laid
/// out alike ([`q3c_abi::Q4_LAYOUT`], [`q3c_abi::Q6_LAYOUT`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LowBits {
    Q4,
    Q6,
}

impl LowBits {
    /// The format of weights read as `dt`, if it is one of these.
    pub fn of(dt: q3c_ir::DType) -> Option<LowBits> {
        match dt {
            q3c_ir::DType::Q4 => Some(LowBits::Q4),
            q3c_ir::DType::Q6 => Some(LowBits::Q6),
            _ => None,
        }
    }

    /// Bits per value.
    pub fn bits(self) -> u32 {
        match self {
            LowBits::Q4 => 4,
            LowBits::Q6 => 6,
        }
    }

    /// The stored offset of the values, `2^(bits − 1)`: levels `−offset .. offset − 1`.
    pub fn offset(self) -> i32 {
        1 << (self.bits() - 1)
    }

    /// Bytes of a panel's group (32 values of 16 rows).
    fn block(self) -> usize {
        Q8_GROUP * Q8_PANEL * self.bits() as usize / 8
    }

    /// Bytes of `len` values: the panels' groups, then one f16 scale per group.
    fn bytes(self, len: usize) -> usize {
        len / Q8_GROUP * (self.block() / Q8_PANEL + 2)
    }

    /// One group of 32 values: the scale `d` (as stored, f16) and the values `q + offset` in
    /// `0 .. 2·offset`, so that `v ≈ d · q`. `d = m / −offset` for `m` the value of largest magnitude,
    /// which is therefore exact up to the f16 rounding of `d` (as llama.cpp's Q4_0).
    pub fn group(self, values: &[f32]) -> (half::f16, [u8; Q8_GROUP]) {
        let half = self.offset() as f32;
        let m = values
            .iter()
            .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let d = m / -half;
        let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut q = [0u8; Q8_GROUP];
        for (q, v) in q.iter_mut().zip(values) {
            *q = (((v * inv + MAGIC) - MAGIC).clamp(-half, half - 1.0) + half) as u8;
        }
        (half::f16::from_f32(d), q)
    }
}

/// Quantizes a row-major `[n, k]` matrix (`n` a multiple of 16, `k` of 32) into the `q4` or `q6` layout in
/// `out` (`bytes(n·k)` bytes, 2-byte aligned); `row(i, buf)` writes row `i` into `buf` as f32.
pub fn quantize_low_bits(
    format: LowBits,
    n: usize,
    k: usize,
    row: impl Fn(usize, &mut [f32]),
    out: &mut [u8],
) {
    debug_assert!(k.is_multiple_of(Q8_GROUP) && n.is_multiple_of(Q8_PANEL));
    let groups = k / Q8_GROUP;
    let (q, scales) = out.split_at_mut(n * k * format.bits() as usize / 8);
    let mut buf = vec![0f32; k];
    for i in 0..n {
        row(i, &mut buf);
        let (panel, r) = (i / Q8_PANEL, i % Q8_PANEL);
        for (g, chunk) in buf.chunks_exact(Q8_GROUP).enumerate() {
            let (d, values) = format.group(chunk);
            let block = (panel * groups + g) * format.block();
            // Steps 0..4 in the low nibbles, steps 4..8 in the high ones.
            for v in 0..4 {
                for j in 0..4 {
                    let (lo, hi) = (values[4 * v + j], values[4 * (v + 4) + j]);
                    q[block + v * STEP + r * 4 + j] = (lo & 15) | (hi & 15) << 4;
                }
            }
            // q6: step s's high two bits in plane s / 4, at bits 2·(s % 4).
            if format == LowBits::Q6 {
                let planes = block + Q8_GROUP * Q8_PANEL / 2 + r * 4;
                for h in 0..2 {
                    for j in 0..4 {
                        q[planes + h * STEP + j] = (0..4)
                            .map(|t| (values[4 * (4 * h + t) + j] >> 4) << (2 * t))
                            .fold(0, |a, b| a | b);
                    }
                }
            }
            let s = ((panel * groups + g) * Q8_PANEL + r) * 2;
            scales[s..s + 2].copy_from_slice(&d.to_ne_bytes());
        }
    }
}

/// 1.5 · 2^23: adding it to |x| < 2^22 leaves no fraction bits, rounding x to nearest, ties to even.
const MAGIC: f32 = 12_582_912.0;

/// `x` rounded to the nearest integer, ties to even, for |x| < 2^22 (without a libm call).
#[cfg(test)]
fn round_even(x: f32) -> f32 {
    (x + MAGIC) - MAGIC
}

/// `round_even(x) + 128` as a byte, for |x| ≤ 127.5: the low byte of `x + MAGIC`'s bits is `round_even(x)`
/// in two's complement; flipping its top bit adds 128. Branch-free, so the loop vectorises.
fn offset_byte(x: f32) -> u8 {
    ((x + MAGIC).to_bits() as u8) ^ 0x80
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Element `[i][j]` of an `[n, k]` matrix stored by [`quantize_q8`], decoded as `q3c_abi::Q8_LAYOUT` says.
    fn element(bytes: &[u8], n: usize, k: usize, i: usize, j: usize) -> f32 {
        let (p, r, g, s) = (i / 16, i % 16, j / 32, j % 32 / 4);
        let block = p * k / 32 + g;
        let q = i32::from(bytes[block * 512 + s * 64 + r * 4 + j % 4]) - 128;
        let at = n * k + (block * 16 + r) * 4;
        let d = f32::from_ne_bytes(bytes[at..at + 4].try_into().unwrap());
        d * q as f32
    }

    #[test]
    fn round_trip_error_is_within_half_a_step_of_each_group() {
        let (n, k) = (32, 64);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0 * (1 + i / 640) as f32)
            .collect();
        let mut q = vec![0; q8_bytes(w.len())];
        quantize_q8(
            n,
            k,
            |i, buf| buf.copy_from_slice(&w[i * k..(i + 1) * k]),
            &mut q,
        );
        assert_eq!(q.len(), n * k + n * k / 32 * 4);
        for i in 0..n {
            for g in 0..k / 32 {
                let group = &w[i * k + g * 32..i * k + g * 32 + 32];
                let amax = group.iter().fold(0f32, |m, v| m.max(v.abs()));
                for j in g * 32..g * 32 + 32 {
                    let err = (element(&q, n, k, i, j) - w[i * k + j]).abs();
                    assert!(err <= amax / 127.0 / 2.0 + 1e-5, "[{i}][{j}]: {err}");
                    // The largest magnitude of a group is exact (±127 steps).
                    if w[i * k + j].abs() == amax {
                        assert!(err <= 1e-5 * amax, "[{i}][{j}]");
                    }
                }
            }
        }
        let mut zero = vec![1; q8_bytes(16 * 32)];
        quantize_q8(16, 32, |_, buf| buf.fill(0.0), &mut zero);
        assert!(zero[..512].iter().all(|&b| b == 128));
        assert_eq!(element(&zero, 16, 32, 5, 7), 0.0);
    }

    /// Element `[i][j]` of an `[n, k]` matrix stored by [`quantize_low_bits`], decoded as
    /// `q3c_abi::Q4_LAYOUT` and `Q6_LAYOUT` say.
    fn element_low(format: LowBits, bytes: &[u8], n: usize, k: usize, i: usize, j: usize) -> f32 {
        let (p, r, g, s) = (i / 16, i % 16, j / 32, j % 32 / 4);
        let block = (p * k / 32 + g) * format.block();
        let byte = bytes[block + (s % 4) * 64 + r * 4 + j % 4];
        let mut value = if s < 4 { byte & 15 } else { byte >> 4 };
        if format == LowBits::Q6 {
            let plane = bytes[block + 256 + (s / 4) * 64 + r * 4 + j % 4];
            value |= (plane >> (2 * (s % 4)) & 3) << 4;
        }
        let at = n * k * format.bits() as usize / 8 + ((p * k / 32 + g) * 16 + r) * 2;
        let d = half::f16::from_ne_bytes(bytes[at..at + 2].try_into().unwrap()).to_f32();
        d * (i32::from(value) - format.offset()) as f32
    }

    #[test]
    fn q4_and_q6_round_trip_error_is_within_half_a_step_of_each_group() {
        let (n, k) = (32, 96);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 9.0 * (1 + i / 700) as f32)
            .collect();
        for format in [LowBits::Q4, LowBits::Q6] {
            let mut q = vec![0; format.bytes(w.len())];
            quantize_low_bits(
                format,
                n,
                k,
                |i, buf| buf.copy_from_slice(&w[i * k..(i + 1) * k]),
                &mut q,
            );
            let bits = format.bits() as usize;
            assert_eq!(q.len(), n * k * bits / 8 + n * k / 32 * 2);
            let levels = format.offset() as f32;
            for i in 0..n {
                for g in 0..k / 32 {
                    let group = &w[i * k + g * 32..i * k + g * 32 + 32];
                    let m = group
                        .iter()
                        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                    let step = m.abs() / levels;
                    // The f16 rounding of the scale (2⁻¹¹ relative) over at most `levels` steps.
                    let f16 = m.abs() * 2f32.powi(-11) + 1e-6;
                    for j in g * 32..g * 32 + 32 {
                        let v = w[i * k + j];
                        // Half a step, but a value of m's opposite sign beyond levels − ½ steps is
                        // clamped to levels − 1 steps (the levels are −offset..offset − 1): up to one step.
                        let clamped = v * m < 0.0 && v.abs() > (levels - 0.5) * step;
                        let bound = if clamped { step } else { step / 2.0 } + f16;
                        let err = (element_low(format, &q, n, k, i, j) - v).abs();
                        assert!(err <= bound, "{format:?} [{i}][{j}]: {err} > {bound}");
                        if v == m {
                            assert!(err <= f16, "[{i}][{j}]: the largest magnitude is exact");
                        }
                    }
                }
            }
            let mut zero = vec![1; format.bytes(16 * 32)];
            quantize_low_bits(format, 16, 32, |_, buf| buf.fill(0.0), &mut zero);
            // Zero is stored as the offset: 8 in each nibble (q4); for q6, 32: nibbles of 0 and 0b10 in
            // each pair of plane bits.
            let nibbles = if format == LowBits::Q4 { 0x88 } else { 0 };
            assert!(zero[..256].iter().all(|&b| b == nibbles));
            if format == LowBits::Q6 {
                assert!(zero[256..384].iter().all(|&b| b == 0b1010_1010));
            }
            assert_eq!(element_low(format, &zero, 16, 32, 5, 7), 0.0);
        }
    }

    #[test]
    fn offset_bytes_are_rounded_values_plus_128() {
        for x in [-127.0, -126.5, -0.5, 0.0, 0.49, 0.5, 1.5, 126.5, 127.0] {
            assert_eq!(i32::from(offset_byte(x)), round_even(x) as i32 + 128, "{x}");
        }
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(
            [0.5, 1.5, 2.5, -0.5, -1.5, 126.5, -127.0, 3.49].map(round_even),
            [0.0, 2.0, 2.0, 0.0, -2.0, 126.0, -127.0, 3.0]
        );
    }
}
