//! Hand-written CPU kernels over raw slices. They know no model: each takes tensors or slices
//! of documented shapes and returns `None` where its case does not apply (another device, another
//! dtype, a shape it does not serve), so the caller falls back to candle's portable ops.
//!
//! * `isa`: which instruction set the kernels run on (the CPU's best, or one forced lower by
//!   `YOCO_CPU_ISA=avx2` or `=portable`, read once, so that an AVX-512 machine also tests the
//!   AVX2 forms);
//! * `gemv`: decode projections over f32 weights, and the `dot` every kernel shares;
//! * `quantized`: the same over candle's quantized blocks, and dequantization;
//! * `attention`: decode attention in tiles, and the window's band attention for prefill;
//! * `fused`: element-wise prefill pieces fused into one pass (SwiGLU, head norms, scans of
//!   decays, scaled masked softmax, small batched products);
//! * `scan`: Mamba's selective scan and causal convolution.

pub(crate) mod attention;
pub(crate) mod fused;
pub(crate) mod gemv;
pub(crate) mod isa;
pub(crate) mod quantized;
pub(crate) mod scan;

/// Asks for the cache line holding `at` to be brought into the nearest cache: a hint, which
/// never faults whatever the address (one past a slice's end included), and does nothing off
/// x86-64. The streaming kernels issue it some way ahead of their loads where the hardware
/// prefetcher alone keeps too few lines in flight.
#[inline(always)]
pub(crate) fn prefetch_line<T>(at: *const T) {
    prefetch_hint::<true, T>(at)
}

/// [`prefetch_line`] into the second-level cache (L2), not the first: what a kernel bound by
/// memory asks for (see the quantized forms' `prefetch_blocks_ahead`).
#[inline(always)]
pub(crate) fn prefetch_line_to_l2<T>(at: *const T) {
    prefetch_hint::<false, T>(at)
}

/// The prefetch into L1 (`L1`) or L2.
#[inline(always)]
fn prefetch_hint<const L1: bool, T>(at: *const T) {
    // SAFETY: a prefetch is only a hint; it reads nothing and never faults.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
        if L1 {
            _mm_prefetch::<_MM_HINT_T0>(at.cast())
        } else {
            _mm_prefetch::<_MM_HINT_T1>(at.cast())
        }
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

/// The largest of `xs`, NaN ignored (as `f32::max` does); -inf when there is none. Kept in 16
/// lanes: a fold one by one is a chain of dependent comparisons, and softmaxes (attention tiles,
/// a vocabulary's logits) start with this.
pub(crate) fn max_of(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            // A NaN compares false and is skipped.
            *m = if x > *m { x } else { *m };
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    lanes.iter().copied().fold(tail, f32::max)
}

/// A seeded generator of test inputs (the crate's sampling `Rng` lives above the models; tests
/// down here need only uniform floats).
#[cfg(test)]
pub(crate) struct TestRng(u64);

#[cfg(test)]
impl TestRng {
    /// A generator from `seed` (any value, zero included).
    pub(crate) fn new(seed: u64) -> Self {
        TestRng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    /// A float uniform in `[0, 1)` (splitmix64).
    pub(crate) fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Inputs and references the kernels' tests (and the layers' that check them) share.
#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{Device, Tensor};

    use super::TestRng;
    use crate::Result;

    /// A `shape` tensor of floats uniform in `[-scale, scale)`, the same for the same seed.
    pub(crate) fn uniform(shape: &[usize], seed: u64, scale: f32) -> Result<Tensor> {
        let mut rng = TestRng::new(seed);
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| (rng.next_f32() * 2.0 - 1.0) * scale)
            .collect();
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
    }

    /// `x W^T` summed in f64, one output at a time: the naive definition.
    pub(crate) fn naive_product(x: &Tensor, w: &Tensor) -> Result<Vec<f32>> {
        let (n, k) = w.dims2()?;
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let ws: Vec<f32> = w.flatten_all()?.to_vec1()?;
        let rows = xs.len() / k;
        let mut out = Vec::with_capacity(rows * n);
        for r in 0..rows {
            for j in 0..n {
                let s: f64 = (0..k)
                    .map(|i| f64::from(xs[r * k + i]) * f64::from(ws[j * k + i]))
                    .sum();
                out.push(s as f32);
            }
        }
        Ok(out)
    }

    /// The largest |a - b|.
    pub(crate) fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `max_of` against the one-by-one fold: lengths around the 16 lanes, NaNs anywhere
    /// (ignored), all -inf or NaN (-inf), +inf, and nothing at all.
    #[test]
    fn max_of_equals_the_plain_fold() {
        let mut rng = TestRng::new(11);
        for n in [0usize, 1, 5, 15, 16, 17, 31, 32, 33, 100, 128, 1000] {
            let mut xs: Vec<f32> = (0..n).map(|_| rng.next_f32() * 200.0 - 100.0).collect();
            let fold = |xs: &[f32]| xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max_of(&xs), fold(&xs), "n {n}");
            if n > 0 {
                let at = n * 7 / 9;
                xs[at] = f32::NAN;
                xs[0] = f32::NAN;
                assert_eq!(max_of(&xs), fold(&xs), "NaN, n {n}");
                assert!(!max_of(&xs).is_nan());
                xs[n / 2] = f32::INFINITY;
                assert_eq!(max_of(&xs), f32::INFINITY, "+inf, n {n}");
                let none = vec![f32::NEG_INFINITY; n];
                assert_eq!(max_of(&none), f32::NEG_INFINITY);
                let nans = vec![f32::NAN; n];
                assert_eq!(max_of(&nans), f32::NEG_INFINITY);
            }
        }
        assert_eq!(max_of(&[]), f32::NEG_INFINITY);
    }
}
