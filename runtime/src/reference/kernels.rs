//! The reference kernels: one plain function per op, f32 storage, f64 accumulation, no tricks.
//!
//! Shapes are passed resolved (`T` and `KV` known); callers have already checked them against the graph.

use q3c_ir::RopeSpec;

/// `out[m, :] = table[ids[m], :]`.
pub fn embedding(table: &[f32], hidden: usize, ids: &[i32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(ids.len() * hidden);
    for &id in ids {
        let row = id as usize * hidden;
        out.extend_from_slice(&table[row..row + hidden]);
    }
    out
}

/// `out[m, n] = Σ_k x[m, k] · w[n, k]` for x `[M, K]`, w `[N, K]`.
pub fn linear(x: &[f32], k: usize, w: &[f32], n: usize) -> Vec<f32> {
    let m = x.len() / k;
    let mut out = vec![0.0; m * n];
    for (row, out_row) in x.chunks_exact(k).zip(out.chunks_exact_mut(n)) {
        for (o, w_row) in out_row.iter_mut().zip(w.chunks_exact(k)) {
            *o = dot(row, w_row) as f32;
        }
    }
    out
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum()
}

/// RMSNorm over rows of length `w.len()`: `w · x / sqrt(mean(x²) + eps)`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f64) -> Vec<f32> {
    let d = w.len();
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(d) {
        let ms = row
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            / d as f64;
        let inv = 1.0 / (ms + eps).sqrt();
        out.extend(
            row.iter()
                .zip(w)
                .map(|(&v, &g)| (f64::from(g) * f64::from(v) * inv) as f32),
        );
    }
    out
}

/// Rotate-half RoPE on x `[S, H, d]` at the given positions.
pub fn rope(
    x: &[f32],
    heads: usize,
    d: usize,
    positions: &[i32],
    spec: &RopeSpec,
    inv_freq: &[f32],
) -> Vec<f32> {
    let half = d / 2;
    let mut out = vec![0.0; x.len()];
    for (s, &p) in positions.iter().enumerate() {
        let (cos, sin) = spec.cos_sin(inv_freq, p as usize);
        for h in 0..heads {
            let base = (s * heads + h) * d;
            let (src, dst) = (&x[base..base + d], &mut out[base..base + d]);
            for i in 0..half {
                let (a, b) = (src[i], src[i + half]);
                dst[i] = a * cos[i] - b * sin[i];
                dst[i + half] = b * cos[i] + a * sin[i];
            }
        }
    }
    out
}

/// Causal GQA attention. q `[T, Hq, d]`; k `[KV, Hkv, d]`; v `[KV, Hkv, dv]`; query t sits at KV − T + t.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t: usize,
    kv: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    dv: usize,
    scale: f64,
) -> Vec<f32> {
    let group = hq / hkv;
    let past = kv - t;
    let mut out = vec![0.0; t * hq * dv];
    let mut scores = Vec::with_capacity(kv);
    for ti in 0..t {
        for h in 0..hq {
            let g = h / group;
            let qv = &q[(ti * hq + h) * d..][..d];
            scores.clear();
            scores.extend((0..=past + ti).map(|j| dot(qv, &k[(j * hkv + g) * d..][..d]) * scale));
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let mut total = 0.0;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                total += *s;
            }
            let o = &mut out[(ti * hq + h) * dv..][..dv];
            for c in 0..dv {
                let acc: f64 = scores
                    .iter()
                    .enumerate()
                    .map(|(j, p)| p * f64::from(v[(j * hkv + g) * dv + c]))
                    .sum();
                o[c] = (acc / total) as f32;
            }
        }
    }
    out
}

/// Numpy-style broadcasting of two equal-rank operands.
pub fn broadcast(
    a: &[f32],
    a_shape: &[usize],
    b: &[f32],
    b_shape: &[usize],
    f: impl Fn(f32, f32) -> f32,
) -> (Vec<f32>, Vec<usize>) {
    let shape: Vec<usize> = a_shape
        .iter()
        .zip(b_shape)
        .map(|(&x, &y)| x.max(y))
        .collect();
    let strides = |s: &[usize]| {
        let mut st = vec![0; s.len()];
        let mut acc = 1;
        for i in (0..s.len()).rev() {
            st[i] = if s[i] == 1 { 0 } else { acc };
            acc *= s[i];
        }
        st
    };
    let (sa, sb) = (strides(a_shape), strides(b_shape));
    let total: usize = shape.iter().product();
    let mut out = Vec::with_capacity(total);
    let mut idx = vec![0; shape.len()];
    for _ in 0..total {
        let ia: usize = idx.iter().zip(&sa).map(|(i, s)| i * s).sum();
        let ib: usize = idx.iter().zip(&sb).map(|(i, s)| i * s).sum();
        out.push(f(a[ia], b[ib]));
        for axis in (0..shape.len()).rev() {
            idx[axis] += 1;
            if idx[axis] < shape[axis] {
                break;
            }
            idx[axis] = 0;
        }
    }
    (out, shape)
}

/// x · sigmoid(x).
pub fn silu(x: &[f32]) -> Vec<f32> {
    x.iter()
        .map(|&v| (f64::from(v) / (1.0 + (-f64::from(v)).exp())) as f32)
        .collect()
}

/// SwiGLU's gating: `silu(gate) · up`, elementwise.
pub fn gated(gate: &[f32], up: &[f32]) -> Vec<f32> {
    silu(gate).iter().zip(up).map(|(a, b)| a * b).collect()
}

/// Softmax over rows of length `n`.
pub fn softmax(x: &[f32], n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(n) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f64> = row.iter().map(|&v| f64::from(v - max).exp()).collect();
        let total: f64 = exps.iter().sum();
        out.extend(exps.iter().map(|&e| (e / total) as f32));
    }
    out
}

/// Sum over `axis` of a tensor of `shape`.
pub fn reduce_sum(x: &[f32], shape: &[usize], axis: usize) -> Vec<f32> {
    let outer: usize = shape[..axis].iter().product();
    let n = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let mut out = vec![0.0; outer * inner];
    for o in 0..outer {
        for i in 0..inner {
            let s: f64 = (0..n).map(|j| f64::from(x[(o * n + j) * inner + i])).sum();
            out[o * inner + i] = s as f32;
        }
    }
    out
}

/// Indices of the `k` largest of each row of length `n`, largest first, ties to the lower index.
pub fn top_k(x: &[f32], n: usize, k: usize) -> Vec<i32> {
    let mut out = Vec::with_capacity(x.len() / n * k);
    for row in x.chunks_exact(n) {
        let mut idx: Vec<usize> = (0..n).collect();
        idx.sort_by(|&a, &b| {
            row[b]
                .partial_cmp(&row[a])
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        out.extend(idx[..k].iter().map(|&i| i as i32));
    }
    out
}

/// `out[r, j] = x[r, idx[r, j]]` for rows of length `n`.
pub fn gather_last(x: &[f32], n: usize, idx: &[i32], k: usize) -> Vec<f32> {
    idx.chunks_exact(k)
        .zip(x.chunks_exact(n))
        .flat_map(|(ids, row)| ids.iter().map(|&i| row[i as usize]))
        .collect()
}

/// Grouped expert GEMM: x `[S, j, K]` (j = 1 or k), ids `[S, k]`, w `[E, N, K]` → `[S, k, N]`.
pub fn expert_linear(
    x: &[f32],
    j: usize,
    kdim: usize,
    ids: &[i32],
    k: usize,
    w: &[f32],
    n: usize,
) -> Vec<f32> {
    let s = ids.len() / k;
    let mut out = Vec::with_capacity(s * k * n);
    for si in 0..s {
        for slot in 0..k {
            let xi = &x[(si * j + if j == 1 { 0 } else { slot }) * kdim..][..kdim];
            let e = ids[si * k + slot] as usize;
            let we = &w[e * n * kdim..][..n * kdim];
            out.extend(we.chunks_exact(kdim).map(|row| dot(xi, row) as f32));
        }
    }
    out
}
