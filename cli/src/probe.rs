//! `q3c probe`: this machine's limits, to say how far a benchmark figure is from them — read memory
//! bandwidth (what bounds decode, which streams every weight once per token) and f32 FMA peak (what bounds
//! prefill).

use std::time::Instant;

/// The measured limits.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Limits {
    pub threads: usize,
    /// Best sustained read bandwidth over a buffer much larger than the caches, GB/s (1e9 bytes).
    pub read_gb_s: f64,
    /// Best f32 fused multiply-add throughput, GFLOP/s (an FMA counts as 2 flops).
    pub fma_gflop_s: f64,
    /// The vector width the FMA probe used.
    pub isa: &'static str,
}

/// Runs both probes on `threads` threads (`mib` MiB buffer for the bandwidth probe).
pub fn run(threads: usize, mib: usize) -> Limits {
    let threads = threads.max(1);
    let (fma, isa) = fma_peak(threads);
    Limits {
        threads,
        read_gb_s: read_bandwidth(threads, mib),
        fma_gflop_s: fma,
        isa,
    }
}

/// Each thread sums its share of a large buffer; best of five passes.
fn read_bandwidth(threads: usize, mib: usize) -> f64 {
    let n = mib * (1 << 20) / 4;
    let data: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let chunk = n.div_ceil(threads);
    let mut best = 0f64;
    for _ in 0..5 {
        let start = Instant::now();
        let total: f32 = std::thread::scope(|s| {
            let handles: Vec<_> = data
                .chunks(chunk)
                .map(|part| s.spawn(move || sum(part)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("probe thread"))
                .sum()
        });
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(total);
        best = best.max((n * 4) as f64 / secs / 1e9);
    }
    best
}

/// A sum with 16 independent lanes, so the loop is bound by loads, not by the add latency.
fn sum(xs: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present.
            return unsafe { sum_avx2(xs) };
        }
    }
    sum_lanes(xs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn sum_avx2(xs: &[f32]) -> f32 {
    sum_lanes(xs)
}

#[inline(always)]
fn sum_lanes(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut it = xs.chunks_exact(16);
    for c in &mut it {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + it.remainder().iter().sum::<f32>()
}

/// Every thread runs independent FMA chains in the widest vectors the CPU has; best of three.
fn fma_peak(threads: usize) -> (f64, &'static str) {
    const ITERS: u64 = 20_000_000;
    #[cfg(target_arch = "x86_64")]
    let (kernel, flops_per_iter, isa): (fn(u64) -> f32, u64, &str) =
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY (both): the feature was detected above.
            (|n| unsafe { fma_avx512(n) }, 12 * 16 * 2, "avx512")
        } else if std::arch::is_x86_feature_detected!("fma") {
            (|n| unsafe { fma_avx2(n) }, 12 * 8 * 2, "avx2+fma")
        } else {
            (fma_scalar, 12 * 2, "scalar")
        };
    #[cfg(not(target_arch = "x86_64"))]
    let (kernel, flops_per_iter, isa): (fn(u64) -> f32, u64, &str) = (fma_scalar, 12 * 2, "scalar");
    let mut best = 0f64;
    for _ in 0..3 {
        let start = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(move || std::hint::black_box(kernel(ITERS)));
            }
        });
        let secs = start.elapsed().as_secs_f64();
        best = best.max((ITERS * flops_per_iter * threads as u64) as f64 / secs / 1e9);
    }
    (best, isa)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn fma_avx512(n: u64) -> f32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
    let mut acc = [_mm512_set1_ps(1.0); 12];
    for _ in 0..n {
        for v in acc.iter_mut() {
            *v = _mm512_fmadd_ps(*v, a, b);
        }
    }
    acc.iter().map(|v| _mm512_reduce_add_ps(*v)).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn fma_avx2(n: u64) -> f32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
    let mut acc = [_mm256_set1_ps(1.0); 12];
    for _ in 0..n {
        for v in acc.iter_mut() {
            *v = _mm256_fmadd_ps(*v, a, b);
        }
    }
    let mut out = [0f32; 8];
    let mut total = 0.0;
    for v in acc {
        // SAFETY: `out` holds eight f32.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) };
        total += out.iter().sum::<f32>();
    }
    total
}

fn fma_scalar(n: u64) -> f32 {
    let mut acc = [1f32; 12];
    for _ in 0..n {
        for v in acc.iter_mut() {
            *v = v.mul_add(0.999_999, 1e-7);
        }
    }
    acc.iter().sum()
}
