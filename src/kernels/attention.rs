//! Softmax attention kernels on the CPU in f32: one decode query per head over a long K/V (the
//! grouped query heads of a K/V head walk it once, in tiles), and a prefill chunk's causal,
//! optionally windowed, attention in independent blocks of queries.

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::kernels::fused;
use crate::kernels::gemv::dot;
use crate::kernels::isa::{Isa, Level};
use crate::kernels::max_of;
use crate::Result;

/// Keys per tile of [`decode_grouped_cpu`]: the scores of a tile are exponentiated together (a
/// loop the compiler vectorises) and rescale the accumulated values once per tile, not per key.
pub(crate) const DECODE_TILE: usize = 128;

/// The element types [`decode_grouped_cpu`] reads keys and values in: f32, or f16/bf16 (half
/// the bytes for a long-context decode to read). The SIMD tile forms widen each 16-bit row in
/// registers as they load it (exact: every f16 and bf16 is an f32), so the K/V is read once, in
/// its own width; the other paths widen a row at a time.
trait KvElem: Copy + Send + Sync + candle_core::WithDType + SimdLoad {
    /// `src` (a row's `dst.len()` values) as f32.
    fn widen(src: &[Self], dst: &mut [f32]);
}

impl KvElem for f32 {
    fn widen(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(&src[..dst.len()]);
    }
}

impl KvElem for half::f16 {
    fn widen(src: &[Self], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        src[..dst.len()].convert_to_f32_slice(dst);
    }
}

impl KvElem for half::bf16 {
    fn widen(src: &[Self], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        src[..dst.len()].convert_to_f32_slice(dst);
    }
}

#[cfg(target_arch = "x86_64")]
use x86::Wide as SimdLoad;

/// Off x86 the element types need no SIMD loads.
#[cfg(not(target_arch = "x86_64"))]
trait SimdLoad {}
#[cfg(not(target_arch = "x86_64"))]
impl SimdLoad for f32 {}
#[cfg(not(target_arch = "x86_64"))]
impl SimdLoad for half::f16 {}
#[cfg(not(target_arch = "x86_64"))]
impl SimdLoad for half::bf16 {}

/// One decode query per head on CPU (`q: (B, H, 1, d)` f32, `k, v: (B, H_kv, L, d)` in f32, f16
/// or bf16 (both the same), any row stride, and an optional additive mask of one row of `L` per
/// batch row): the `G` query heads that share a K/V head walk its rows *once*, together, with an
/// online softmax. At long context decode is bound by reading the global K/V, and a kernel that
/// reads it once per query head (G times per K/V head) is G times slower. Masked (-inf) slots
/// are skipped, so a row of a right-aligned batch computes exactly what it computes alone.
/// Returns `None` when the layout is not one it handles (the caller falls back).
pub(crate) fn decode_grouped_cpu(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f32,
) -> Result<Option<Tensor>> {
    use candle_core::Storage;
    let (b, h, _, d) = q.dims4()?;
    let (_, h_kv, l, _) = k.dims4()?;
    let q = q.contiguous()?;
    let mask: Option<Vec<f32>> = match mask {
        Some(m) => Some(m.flatten_all()?.to_vec1::<f32>()?),
        None => None,
    };
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (Storage::Cpu(qs), Storage::Cpu(ks), Storage::Cpu(vs)) = (&*qs, &*ks, &*vs) else {
        return Ok(None);
    };
    let (kst, vst) = (kl.stride(), vl.stride());
    if kst[3] != 1 || vst[3] != 1 || l == 0 || h_kv == 0 || h % h_kv != 0 {
        return Ok(None);
    }
    let qd = &qs.as_slice::<f32>()?[ql.start_offset()..];
    let walk = Walk {
        shape: (b, h, h_kv, l, d),
        k: (kl.start_offset(), kst[0], kst[1], kst[2]),
        v: (vl.start_offset(), vst[0], vst[1], vst[2]),
        mask: mask.as_deref(),
        scale,
    };
    let out = match (k.dtype(), v.dtype()) {
        (DType::F32, DType::F32) => walk.run(qd, ks.as_slice::<f32>()?, vs.as_slice::<f32>()?),
        (DType::F16, DType::F16) => {
            walk.run(qd, ks.as_slice::<half::f16>()?, vs.as_slice::<half::f16>()?)
        }
        (DType::BF16, DType::BF16) => walk.run(
            qd,
            ks.as_slice::<half::bf16>()?,
            vs.as_slice::<half::bf16>()?,
        ),
        _ => return Ok(None),
    };
    Ok(Some(Tensor::from_vec(out, (b, h, 1, d), q.device())?))
}

/// What one [`decode_grouped_cpu`] call walks: `(B, H, H_kv, L, d)`, the keys' and values'
/// (start, row, head, position) strides, the mask rows and the scale.
struct Walk<'m> {
    shape: (usize, usize, usize, usize, usize),
    k: (usize, usize, usize, usize),
    v: (usize, usize, usize, usize),
    mask: Option<&'m [f32]>,
    scale: f32,
}

impl Walk<'_> {
    fn run<T: KvElem>(&self, qd: &[f32], kd: &[T], vd: &[T]) -> Vec<f32> {
        let isa = Isa::active();
        let (b, h, h_kv, l, d) = self.shape;
        let g = h / h_kv;
        let (k0, kst0, kst1, kst2) = self.k;
        let (v0, vst0, vst1, vst2) = self.v;
        let mut out = vec![0f32; b * h * d];
        // One task per (row, K/V head) (rayon's pool, shared with candle's matmul).
        out.par_chunks_mut(g * d)
            .enumerate()
            .for_each(|(task, out_kv)| {
                let (row, kv) = (task / h_kv, task % h_kv);
                let qh = &qd[task * g * d..(task + 1) * g * d];
                let row_mask = self.mask.map(|m| &m[row * l..(row + 1) * l]);
                let (kb, vb) = (k0 + row * kst0 + kv * kst1, v0 + row * vst0 + kv * vst1);
                // A right-aligned row's real keys start after its masked ones; tiles are counted
                // from there, so the row computes exactly what it computes alone.
                let first = row_mask.map_or(0, |m| {
                    m.iter().take_while(|&&x| x == f32::NEG_INFINITY).count()
                });
                let mut max = vec![f32::NEG_INFINITY; g];
                let mut sum = vec![0f32; g];
                let mut scores = vec![0f32; g * DECODE_TILE];
                for t0 in (first..l).step_by(DECODE_TILE) {
                    let t = DECODE_TILE.min(l - t0);
                    let keys = (&kd[kb + t0 * kst2..], kst2);
                    tile_dots(isa, qh, d, keys, t, (&mut scores, DECODE_TILE));
                    for gi in 0..g {
                        let s = &mut scores[gi * DECODE_TILE..gi * DECODE_TILE + t];
                        match row_mask {
                            Some(m) => s.iter_mut().zip(&m[t0..t0 + t]).for_each(|(x, &b)| {
                                // A masked slot scores -inf whatever its key holds.
                                *x = if b == f32::NEG_INFINITY {
                                    b
                                } else {
                                    *x * self.scale + b
                                }
                            }),
                            None => s.iter_mut().for_each(|x| *x *= self.scale),
                        }
                    }
                    // Online softmax, a tile at a time: rescale what was accumulated when the
                    // tile raises the running max, then weight the tile's values.
                    for gi in 0..g {
                        let s = &mut scores[gi * DECODE_TILE..gi * DECODE_TILE + t];
                        let tile_max = max_of(s);
                        if tile_max == f32::NEG_INFINITY {
                            s.fill(0.0);
                            continue;
                        }
                        let new_max = max[gi].max(tile_max);
                        if new_max > max[gi] {
                            // exp(-inf) = 0 on the first tile, when nothing is accumulated yet.
                            let rescale = (max[gi] - new_max).exp();
                            sum[gi] *= rescale;
                            out_kv[gi * d..(gi + 1) * d]
                                .iter_mut()
                                .for_each(|a| *a *= rescale);
                            max[gi] = new_max;
                        }
                        fused::exp_shifted(s, new_max);
                        sum[gi] += lanes_sum(s);
                    }
                    let values = (&vd[vb + t0 * vst2..], vst2);
                    tile_add_weighted(isa, out_kv, d, values, t, (&scores, DECODE_TILE));
                }
                for gi in 0..g {
                    let inv = 1.0 / sum[gi];
                    out_kv[gi * d..(gi + 1) * d]
                        .iter_mut()
                        .for_each(|x| *x *= inv);
                }
            });
        out
    }
}

/// The sum of a tile's softmax numerators in 16 lanes, then the lanes: a sum one by one is a
/// chain of dependent adds (with the max taken one by one too, 5-11% of the decode attention's
/// time, at 1K and 4K context for 16 sequences and at 16K for one).
fn lanes_sum(s: &[f32]) -> f32 {
    let mut m = [0f32; 16];
    let mut chunks = s.chunks_exact(16);
    for c in &mut chunks {
        for (a, &x) in m.iter_mut().zip(c) {
            *a += x;
        }
    }
    let tail: f32 = chunks.remainder().iter().sum();
    m.iter().sum::<f32>() + tail
}

/// `scores[i * stride + j] = q_i . k_j` for the query heads `q` (rows of `d`) and a tile's `t`
/// keys (rows of `d` in `keys.0`, `keys.1` apart). The keys go in blocks of 16 (AVX-512) or 8
/// (AVX2) whose dot products are summed across lanes together, a transposing tree that leaves
/// the block's sums in one register: summing each key's lanes on its own cost more than its
/// multiplications. The keys after the last whole block take [`query_dots`], widened.
fn tile_dots<T: KvElem>(
    isa: Isa,
    q: &[f32],
    d: usize,
    (k, kst): (&[T], usize),
    t: usize,
    (scores, stride): (&mut [f32], usize),
) {
    let g = q.len() / d.max(1);
    if g == 0 || t == 0 {
        return;
    }
    // What the SIMD forms index: every key row and every head's scores.
    let fits =
        q.len() == g * d && k.len() >= (t - 1) * kst + d && scores.len() >= (g - 1) * stride + t;
    let done = match isa.level() {
        // SAFETY: an `Isa` is never above what the CPU has; `fits` holds the lengths.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 if fits && d.is_multiple_of(16) && d <= 256 => unsafe {
            x86::tile_dots_avx512(q, d, k, kst, t, scores, stride);
            t - t % 16
        },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 if fits && d.is_multiple_of(8) => unsafe {
            x86::tile_dots_avx2(q, d, k, kst, t, scores, stride);
            t - t % 8
        },
        _ => 0,
    };
    let mut dots = vec![0f32; if done < t { g } else { 0 }];
    let mut key = vec![0f32; if done < t { d } else { 0 }];
    for j in done..t {
        T::widen(&k[j * kst..], &mut key);
        query_dots(isa, q, &key, &mut dots);
        for (i, &x) in dots.iter().enumerate() {
            scores[i * stride + j] = x;
        }
    }
}

/// `out_i += p[i * stride + j] v_j` over a tile's `t` values (rows of `d` in `values.0`,
/// `values.1` apart), key after key, for the query heads' accumulators `out` (rows of `d`); a
/// zero weight adds nothing. The SIMD forms keep the accumulators in registers for the whole
/// tile (loading and storing them per key was most of the work).
fn tile_add_weighted<T: KvElem>(
    isa: Isa,
    out: &mut [f32],
    d: usize,
    (v, vst): (&[T], usize),
    t: usize,
    (p, stride): (&[f32], usize),
) {
    let g = out.len() / d.max(1);
    if g == 0 || t == 0 {
        return;
    }
    let fits =
        out.len() == g * d && v.len() >= (t - 1) * vst + d && p.len() >= (g - 1) * stride + t;
    match isa.level() {
        // SAFETY: an `Isa` is never above what the CPU has; `fits` holds the lengths.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 if fits && d.is_multiple_of(16) && d <= 256 => unsafe {
            x86::tile_add_weighted_avx512(out, d, v, vst, t, p, stride)
        },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 if fits && d.is_multiple_of(8) => unsafe {
            x86::tile_add_weighted_avx2(out, d, v, vst, t, p, stride)
        },
        _ => {
            let (mut pj, mut value) = (vec![0f32; g], vec![0f32; d]);
            for j in 0..t {
                for (i, x) in pj.iter_mut().enumerate() {
                    *x = p[i * stride + j];
                }
                if pj.iter().any(|&x| x != 0.0) {
                    T::widen(&v[j * vst..], &mut value);
                    add_weighted(isa, out, &value, &pj);
                }
            }
        }
    }
}

/// `out[i] = q_i . k` for the query heads `q` (`out.len()` rows of `k.len()`) that share one key
/// row: the key is loaded once for all of them, and each dot product is a few registers summed
/// once (a head is 64-128 wide, and [`dot`]'s 32 lanes, summed one by one, cost more than the
/// multiplications).
fn query_dots(isa: Isa, q: &[f32], k: &[f32], out: &mut [f32]) {
    let d = k.len();
    match isa.level() {
        // SAFETY: an `Isa` is never above what the CPU has; the lengths are checked by `x86`.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 if d.is_multiple_of(16) && d <= 256 && q.len() == out.len() * d => unsafe {
            x86::query_dots_avx512(q, k, out)
        },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 if d.is_multiple_of(8) && out.len() <= 8 && q.len() == out.len() * d => unsafe {
            x86::query_dots_avx2(q, k, out)
        },
        _ => {
            for (o, qi) in out.iter_mut().zip(q.chunks_exact(d.max(1))) {
                *o = dot(qi, k);
            }
        }
    }
}

/// `out_i += p_i v` for the query heads' accumulators `out` (`p.len()` rows of `v.len()`): the
/// value row is loaded once for all of them.
fn add_weighted(isa: Isa, out: &mut [f32], v: &[f32], p: &[f32]) {
    let d = v.len();
    match isa.level() {
        // SAFETY: as in `query_dots`.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 if d.is_multiple_of(16) && d <= 256 && out.len() == p.len() * d => unsafe {
            x86::add_weighted_avx512(out, v, p)
        },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 if d.is_multiple_of(8) && out.len() == p.len() * d => unsafe {
            x86::add_weighted_avx2(out, v, p)
        },
        _ => {
            for (o, &pi) in out.chunks_exact_mut(d.max(1)).zip(p) {
                if pi != 0.0 {
                    o.iter_mut().zip(v).for_each(|(a, x)| *a += pi * x);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use crate::kernels::prefetch_line;

    /// A K/V element type the tile forms load as f32 lanes, widening 16-bit values in registers
    /// (f16 by the F16C conversion, bf16 as the high half of an f32).
    pub(super) trait Wide: Copy {
        /// 16 values at `p` as f32.
        ///
        /// # Safety
        /// The CPU has AVX-512F; `p` points at 16 readable values.
        unsafe fn z(p: *const Self) -> __m512;
        /// 8 values at `p` as f32.
        ///
        /// # Safety
        /// The CPU has AVX2 and F16C; `p` points at 8 readable values.
        unsafe fn y(p: *const Self) -> __m256;
    }

    impl Wide for f32 {
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn z(p: *const f32) -> __m512 {
            // SAFETY: as the trait's.
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline]
        #[target_feature(enable = "avx2,f16c")]
        unsafe fn y(p: *const f32) -> __m256 {
            // SAFETY: as the trait's.
            unsafe { _mm256_loadu_ps(p) }
        }
    }

    impl Wide for half::f16 {
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn z(p: *const Self) -> __m512 {
            // SAFETY: as the trait's: 32 bytes.
            unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
        }
        #[inline]
        #[target_feature(enable = "avx2,f16c")]
        unsafe fn y(p: *const Self) -> __m256 {
            // SAFETY: as the trait's: 16 bytes.
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
        }
    }

    impl Wide for half::bf16 {
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn z(p: *const Self) -> __m512 {
            // SAFETY: as the trait's: 32 bytes.
            let h = unsafe { _mm256_loadu_si256(p.cast()) };
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
        #[inline]
        #[target_feature(enable = "avx2,f16c")]
        unsafe fn y(p: *const Self) -> __m256 {
            // SAFETY: as the trait's: 16 bytes.
            let h = unsafe { _mm_loadu_si128(p.cast()) };
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        }
    }

    /// Calls `$f::<N>($args)` for `N = $n` in 1..=16: a register array of a constant length
    /// stays in registers, where one of a run-time length lives on the stack (zeroed and filled
    /// by a call of `memcpy` per key, which cost more than the key's arithmetic).
    macro_rules! by_registers {
        ($n:expr, $f:ident $(<$t:ty>)?, $($args:expr),*) => {
            match $n {
                1 => $f::<$($t,)? 1>($($args),*),
                2 => $f::<$($t,)? 2>($($args),*),
                3 => $f::<$($t,)? 3>($($args),*),
                4 => $f::<$($t,)? 4>($($args),*),
                5 => $f::<$($t,)? 5>($($args),*),
                6 => $f::<$($t,)? 6>($($args),*),
                7 => $f::<$($t,)? 7>($($args),*),
                8 => $f::<$($t,)? 8>($($args),*),
                9 => $f::<$($t,)? 9>($($args),*),
                10 => $f::<$($t,)? 10>($($args),*),
                11 => $f::<$($t,)? 11>($($args),*),
                12 => $f::<$($t,)? 12>($($args),*),
                13 => $f::<$($t,)? 13>($($args),*),
                14 => $f::<$($t,)? 14>($($args),*),
                15 => $f::<$($t,)? 15>($($args),*),
                16 => $f::<$($t,)? 16>($($args),*),
                _ => {}
            }
        };
    }

    /// The lane sums of 16 registers, in order, in one: pairs interleaved and added (each
    /// 128-bit lane then holds half sums of two registers), then pairs of those (four whole
    /// 128-bit lane sums), then 128-bit lanes exchanged twice.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn sum16(a: [__m512; 16]) -> __m512 {
        let b: [__m512; 8] = std::array::from_fn(|i| {
            let (x, y) = (a[2 * i], a[2 * i + 1]);
            _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y))
        });
        let c: [__m512; 4] = std::array::from_fn(|i| {
            let (x, y) = (b[2 * i], b[2 * i + 1]);
            _mm512_add_ps(
                _mm512_shuffle_ps::<0x44>(x, y),
                _mm512_shuffle_ps::<0xEE>(x, y),
            )
        });
        let e: [__m512; 2] = std::array::from_fn(|i| {
            let (x, y) = (c[2 * i], c[2 * i + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(x, y),
                _mm512_shuffle_f32x4::<0xDD>(x, y),
            )
        });
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(e[0], e[1]),
            _mm512_shuffle_f32x4::<0xDD>(e[0], e[1]),
        )
    }

    /// [`super::tile_dots`] with AVX-512 for the whole blocks of 16 keys.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `q` holds rows of `d = 16 N <= 256`, `k` holds `t` rows of `d`
    /// `kst` apart, and `scores` holds each head's `t` scores `stride` apart.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_dots_avx512<T: Wide>(
        q: &[f32],
        d: usize,
        k: &[T],
        kst: usize,
        t: usize,
        scores: &mut [f32],
        stride: usize,
    ) {
        // SAFETY: as this function's.
        unsafe { by_registers!(d / 16, tile_dots_n<T>, q, k, kst, t, scores, stride) }
    }

    /// [`tile_dots_avx512`] for heads of `16 N` floats.
    ///
    /// # Safety
    /// As [`tile_dots_avx512`], with `d == 16 N`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_dots_n<T: Wide, const N: usize>(
        q: &[f32],
        k: &[T],
        kst: usize,
        t: usize,
        scores: &mut [f32],
        stride: usize,
    ) {
        let d = 16 * N;
        // (Not on AMD's CPUs: on a 2-core EPYC, Zen 4, one Q8_0 sequence's decode at 16K went
        // 60-90 tokens/s with the hints and 79-105 without, medians 81 and 102, six runs each.)
        let hints = if crate::kernels::isa::amd() { 0 } else { 16 };
        for j0 in (0..t - t % 16).step_by(16) {
            // The next block's keys, one hint per line: with one 64-byte load per line the
            // hardware prefetcher alone keeps too few in flight (16 sequences' step 3-5% faster).
            for jj in 0..hints {
                for c in 0..N {
                    prefetch_line(k.as_ptr().wrapping_add((j0 + 16 + jj) * kst + 16 * c));
                }
            }
            for (i, qi) in q.chunks_exact(d).enumerate() {
                // SAFETY: 16 (c + 1) <= d floats of row i.
                let qv: [__m512; N] =
                    std::array::from_fn(|c| unsafe { _mm512_loadu_ps(qi.as_ptr().add(16 * c)) });
                // (Loops, not `array::from_fn`: a closure does not take this function's target
                // features, and `T::z` then stays a call per key.)
                let mut acc = [_mm512_setzero_ps(); 16];
                for (jj, a) in acc.iter_mut().enumerate() {
                    for (c, qc) in qv.iter().enumerate() {
                        // SAFETY: key j0 + jj < t starts at (j0 + jj) kst and holds d values.
                        let kc = unsafe { T::z(k.as_ptr().add((j0 + jj) * kst + 16 * c)) };
                        *a = _mm512_fmadd_ps(*qc, kc, *a);
                    }
                }
                // SAFETY: head i's scores j0..j0 + 16 <= t.
                unsafe { _mm512_storeu_ps(scores.as_mut_ptr().add(i * stride + j0), sum16(acc)) };
            }
        }
    }

    /// [`super::tile_add_weighted`] with AVX-512: the accumulators of as many heads as fill 16
    /// registers stay in them over the tile.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `out` holds rows of `d = 16 N <= 256`, `v` holds `t` rows of `d`
    /// `vst` apart, and `p` holds each head's `t` weights `stride` apart.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_add_weighted_avx512<T: Wide>(
        out: &mut [f32],
        d: usize,
        v: &[T],
        vst: usize,
        t: usize,
        p: &[f32],
        stride: usize,
    ) {
        // SAFETY: as this function's.
        unsafe { by_registers!(d / 16, tile_add_weighted_n<T>, out, v, vst, t, p, stride) }
    }

    /// [`tile_add_weighted_avx512`] for heads of `16 N` floats.
    ///
    /// # Safety
    /// As [`tile_add_weighted_avx512`], with `d == 16 N`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_add_weighted_n<T: Wide, const N: usize>(
        out: &mut [f32],
        v: &[T],
        vst: usize,
        t: usize,
        p: &[f32],
        stride: usize,
    ) {
        let d = 16 * N;
        // (Not on AMD's CPUs, as the keys' hints in `tile_dots_n`.)
        let hints = !crate::kernels::isa::amd();
        // Heads per pass: their accumulators fill 16 registers (h N + c < 16 below).
        let per_pass = (16 / N).max(1);
        let heads = out.len() / d;
        for h0 in (0..heads).step_by(per_pass) {
            let here = per_pass.min(heads - h0);
            let mut acc = [_mm512_setzero_ps(); 16];
            for h in 0..per_pass {
                if h < here {
                    for c in 0..N {
                        // SAFETY: row h0 + h of `out` holds d floats.
                        acc[h * N + c] =
                            unsafe { _mm512_loadu_ps(out.as_ptr().add((h0 + h) * d + 16 * c)) };
                    }
                }
            }
            for j in 0..t {
                // The value eight keys on, on the first pass (as the keys in `tile_dots_n`).
                if h0 == 0 && hints {
                    for c in 0..N {
                        prefetch_line(v.as_ptr().wrapping_add((j + 8) * vst + 16 * c));
                    }
                }
                let mut vv = [_mm512_setzero_ps(); N];
                for (c, x) in vv.iter_mut().enumerate() {
                    // SAFETY: value j < t starts at j vst and holds d floats.
                    *x = unsafe { T::z(v.as_ptr().add(j * vst + 16 * c)) };
                }
                for h in 0..per_pass {
                    if h < here {
                        let pj = p[(h0 + h) * stride + j];
                        if pj != 0.0 {
                            let pv = _mm512_set1_ps(pj);
                            for (c, x) in vv.iter().enumerate() {
                                acc[h * N + c] = _mm512_fmadd_ps(pv, *x, acc[h * N + c]);
                            }
                        }
                    }
                }
            }
            for h in 0..per_pass {
                if h < here {
                    for c in 0..N {
                        // SAFETY: as the loads.
                        unsafe {
                            _mm512_storeu_ps(
                                out.as_mut_ptr().add((h0 + h) * d + 16 * c),
                                acc[h * N + c],
                            )
                        };
                    }
                }
            }
        }
    }

    /// The lane sums of 8 registers, in order, in one: [`sum16`]'s tree on 256 bits.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn sum8(a: [__m256; 8]) -> __m256 {
        let b: [__m256; 4] = std::array::from_fn(|i| {
            let (x, y) = (a[2 * i], a[2 * i + 1]);
            _mm256_add_ps(_mm256_unpacklo_ps(x, y), _mm256_unpackhi_ps(x, y))
        });
        let c: [__m256; 2] = std::array::from_fn(|i| {
            let (x, y) = (b[2 * i], b[2 * i + 1]);
            _mm256_add_ps(
                _mm256_shuffle_ps::<0x44>(x, y),
                _mm256_shuffle_ps::<0xEE>(x, y),
            )
        });
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(c[0], c[1]),
            _mm256_permute2f128_ps::<0x31>(c[0], c[1]),
        )
    }

    /// [`super::tile_dots`] with AVX2 and FMA for the whole blocks of 8 keys.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `q` holds rows of `d`, a multiple of 8, `k` holds `t` rows of
    /// `d` `kst` apart, and `scores` holds each head's `t` scores `stride` apart.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile_dots_avx2<T: Wide>(
        q: &[f32],
        d: usize,
        k: &[T],
        kst: usize,
        t: usize,
        scores: &mut [f32],
        stride: usize,
    ) {
        for j0 in (0..t - t % 8).step_by(8) {
            for (i, qi) in q.chunks_exact(d).enumerate() {
                let mut acc = [_mm256_setzero_ps(); 8];
                // A key's whole row, then the next key's (the query's values from the first-level
                // cache each time): rows read in order as the AVX-512 form reads them, where
                // eight keys' first values, then their second, ... read the K/V at 0.5x its speed.
                for (jj, a) in acc.iter_mut().enumerate() {
                    for c in (0..d).step_by(8) {
                        // SAFETY: c + 8 <= d floats of row i and of key j0 + jj < t.
                        unsafe {
                            let kc = T::y(k.as_ptr().add((j0 + jj) * kst + c));
                            *a = _mm256_fmadd_ps(_mm256_loadu_ps(qi.as_ptr().add(c)), kc, *a);
                        }
                    }
                }
                // SAFETY: head i's scores j0..j0 + 8 <= t.
                unsafe { _mm256_storeu_ps(scores.as_mut_ptr().add(i * stride + j0), sum8(acc)) };
            }
        }
    }

    /// [`super::tile_add_weighted`] with AVX2 and FMA: one head's accumulators, 64 floats of
    /// them at a time, stay in 8 registers over the tile.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `out` holds rows of `d`, a multiple of 8, `v` holds `t` rows of
    /// `d` `vst` apart, and `p` holds each head's `t` weights `stride` apart.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile_add_weighted_avx2<T: Wide>(
        out: &mut [f32],
        d: usize,
        v: &[T],
        vst: usize,
        t: usize,
        p: &[f32],
        stride: usize,
    ) {
        for (h, row) in out.chunks_exact_mut(d).enumerate() {
            let ph = &p[h * stride..][..t];
            for c0 in (0..d).step_by(64) {
                let n = ((d - c0) / 8).min(8);
                let mut acc = [_mm256_setzero_ps(); 8];
                for (c, a) in acc.iter_mut().enumerate().take(n) {
                    // SAFETY: c0 + 8 (c + 1) <= d floats of the row.
                    *a = unsafe { _mm256_loadu_ps(row.as_ptr().add(c0 + 8 * c)) };
                }
                for (j, &pj) in ph.iter().enumerate() {
                    if pj == 0.0 {
                        continue;
                    }
                    let pv = _mm256_set1_ps(pj);
                    for (c, a) in acc.iter_mut().enumerate().take(n) {
                        // SAFETY: value j < t starts at j vst and holds d floats.
                        let x = unsafe { T::y(v.as_ptr().add(j * vst + c0 + 8 * c)) };
                        *a = _mm256_fmadd_ps(pv, x, *a);
                    }
                }
                for (c, a) in acc.iter().enumerate().take(n) {
                    // SAFETY: as the loads.
                    unsafe { _mm256_storeu_ps(row.as_mut_ptr().add(c0 + 8 * c), *a) };
                }
            }
        }
    }

    /// [`super::query_dots`] with AVX-512: the key in up to 16 registers, one accumulator per
    /// head, reduced once.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `k.len()` is a multiple of 16 and at most 256, and `q` holds
    /// `out.len()` rows of it.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn query_dots_avx512(q: &[f32], k: &[f32], out: &mut [f32]) {
        // SAFETY: as this function's.
        unsafe { by_registers!(k.len() / 16, query_dots_n, q, k, out) }
    }

    /// [`query_dots_avx512`] for keys of `16 N` floats.
    ///
    /// # Safety
    /// As [`query_dots_avx512`], with `k.len() == 16 N`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn query_dots_n<const N: usize>(q: &[f32], k: &[f32], out: &mut [f32]) {
        let d = 16 * N;
        // SAFETY: 16 (c + 1) <= d floats of `k`.
        let kv: [__m512; N] =
            std::array::from_fn(|c| unsafe { _mm512_loadu_ps(k.as_ptr().add(16 * c)) });
        for (i, o) in out.iter_mut().enumerate() {
            let mut acc = _mm512_setzero_ps();
            for (c, r) in kv.iter().enumerate() {
                // SAFETY: row i of `q` holds d floats at i d.
                let qv = unsafe { _mm512_loadu_ps(q.as_ptr().add(i * d + 16 * c)) };
                acc = _mm512_fmadd_ps(qv, *r, acc);
            }
            *o = _mm512_reduce_add_ps(acc);
        }
    }

    /// [`super::query_dots`] with AVX2 and FMA: eight of the key's values at a time, loaded once
    /// for every head's accumulator (at most eight heads), each reduced once.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `k.len()` is a multiple of 8, `out.len() <= 8`, and `q` holds
    /// `out.len()` rows of `k.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn query_dots_avx2(q: &[f32], k: &[f32], out: &mut [f32]) {
        let d = k.len();
        let mut acc = [_mm256_setzero_ps(); 8];
        for c in (0..d).step_by(8) {
            // SAFETY: c + 8 <= d floats of `k`, and of row i of `q` at i d.
            unsafe {
                let kv = _mm256_loadu_ps(k.as_ptr().add(c));
                for (i, a) in acc.iter_mut().enumerate().take(out.len()) {
                    let qv = _mm256_loadu_ps(q.as_ptr().add(i * d + c));
                    *a = _mm256_fmadd_ps(qv, kv, *a);
                }
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            let s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            *o = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
        }
    }

    /// [`super::add_weighted`] with AVX2 and FMA: eight of the value's floats at a time, loaded
    /// once for every head.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `v.len()` is a multiple of 8 and `out` holds `p.len()` rows of
    /// it.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn add_weighted_avx2(out: &mut [f32], v: &[f32], p: &[f32]) {
        let d = v.len();
        for c in (0..d).step_by(8) {
            // SAFETY: c + 8 <= d floats of `v`, and of row i of `out` at i d.
            unsafe {
                let vv = _mm256_loadu_ps(v.as_ptr().add(c));
                for (i, &pi) in p.iter().enumerate() {
                    if pi != 0.0 {
                        let at = out.as_mut_ptr().add(i * d + c);
                        let sum = _mm256_fmadd_ps(_mm256_set1_ps(pi), vv, _mm256_loadu_ps(at));
                        _mm256_storeu_ps(at, sum);
                    }
                }
            }
        }
    }

    /// [`super::add_weighted`] with AVX-512: the value in up to 16 registers.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `v.len()` is a multiple of 16 and at most 256, and `out` holds
    /// `p.len()` rows of it.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn add_weighted_avx512(out: &mut [f32], v: &[f32], p: &[f32]) {
        // SAFETY: as this function's.
        unsafe { by_registers!(v.len() / 16, add_weighted_n, out, v, p) }
    }

    /// [`add_weighted_avx512`] for values of `16 N` floats.
    ///
    /// # Safety
    /// As [`add_weighted_avx512`], with `v.len() == 16 N`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn add_weighted_n<const N: usize>(out: &mut [f32], v: &[f32], p: &[f32]) {
        let d = 16 * N;
        // SAFETY: 16 (c + 1) <= d floats of `v`.
        let vv: [__m512; N] =
            std::array::from_fn(|c| unsafe { _mm512_loadu_ps(v.as_ptr().add(16 * c)) });
        for (i, &pi) in p.iter().enumerate() {
            if pi == 0.0 {
                continue;
            }
            let pv = _mm512_set1_ps(pi);
            for (c, r) in vv.iter().enumerate() {
                // SAFETY: row i of `out` holds d floats at i d.
                unsafe {
                    let at = out.as_mut_ptr().add(i * d + 16 * c);
                    _mm512_storeu_ps(at, _mm512_fmadd_ps(pv, *r, _mm512_loadu_ps(at)));
                }
            }
        }
    }
}

/// Query rows per task of [`band_attention_cpu`]: with the window's `W - 1` earlier keys each
/// block scores `W + 127` keys (W = 1024: 89% of them visible), and a 512-token chunk of three
/// heads makes twelve tasks for the pool.
pub(crate) const BAND_QUERY_BLOCK: usize = 128;

/// Causal attention of a chunk of queries over the end of a K/V view, optionally windowed, on
/// the CPU in f32: `q: (B, H, C, d)`, `k, v: (B, H_kv, L, d)` (any row stride, `L >= C`). Query
/// `i` sits at slot `L - C + i` and sees the slots `j <= L - C + i` (and, with `window = W`,
/// `j > L - C + i - W`). Blocks of queries of every head are independent tasks on rayon's pool,
/// each scoring only the keys its block can see, one single-threaded product each for the scores
/// and the weighted values; the visibility rule is applied in the softmax, so no mask tensor is
/// built. Returns `None` when the layout is not one it handles (the caller falls back).
pub(crate) fn band_attention_cpu(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    window: Option<usize>,
    scale: f32,
) -> Result<Option<Tensor>> {
    use candle_core::Storage;
    let (b, h, c, d) = q.dims4()?;
    let (_, h_kv, l, _) = k.dims4()?;
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if !(f32_cpu(q) && f32_cpu(k) && f32_cpu(v)) || c == 0 || l < c || h % h_kv != 0 {
        return Ok(None);
    }
    let g = h / h_kv;
    let q = q.contiguous()?;
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (Storage::Cpu(qs), Storage::Cpu(ks), Storage::Cpu(vs)) = (&*qs, &*ks, &*vs) else {
        return Ok(None);
    };
    let (kst, vst) = (kl.stride(), vl.stride());
    if kst[3] != 1 || vst[3] != 1 {
        return Ok(None);
    }
    let qd = &qs.as_slice::<f32>()?[ql.start_offset()..];
    let (kd, vd) = (
        &ks.as_slice::<f32>()?[kl.start_offset()..],
        &vs.as_slice::<f32>()?[vl.start_offset()..],
    );
    let offset = l - c;
    let mut out = vec![0f32; b * h * c * d];
    out.par_chunks_mut(c * d)
        .enumerate()
        .try_for_each(|(bh, out_head)| -> Result<()> {
            let (row, head) = (bh / h, bh % h);
            let qh = qd.get(bh * c * d..(bh + 1) * c * d).unwrap_or_default();
            let kv = head / g;
            let (kh, vh) = (
                kd.get(row * kst[0] + kv * kst[1]..).unwrap_or_default(),
                vd.get(row * vst[0] + kv * vst[1]..).unwrap_or_default(),
            );
            out_head
                .par_chunks_mut(BAND_QUERY_BLOCK * d)
                .enumerate()
                .try_for_each_init(Vec::new, |scores, (blk, out_block)| -> Result<()> {
                    let a = blk * BAND_QUERY_BLOCK;
                    let m = out_block.len() / d;
                    // Slots seen by the block's first query and by its last.
                    let first = |pos: usize| window.map_or(0, |w| (pos + 1).saturating_sub(w));
                    let (lo, hi) = (first(offset + a), offset + a + m);
                    let n = hi - lo;
                    scores.resize(m * n, 0f32);
                    fused::gemm_into(
                        scores,
                        (m, n, d),
                        fused::Strided {
                            data: qh.get(a * d..).unwrap_or_default(),
                            rows: d,
                            cols: 1,
                        },
                        fused::Strided {
                            data: kh.get(lo * kst[2]..).unwrap_or_default(),
                            rows: 1,
                            cols: kst[2],
                        },
                        scale,
                    )?;
                    for (i, s) in scores.chunks_mut(n).enumerate() {
                        let pos = offset + a + i;
                        let seen = first(pos) - lo..pos + 1 - lo;
                        let max = max_of(&s[seen.clone()]);
                        let mut sum = 0f32;
                        for x in &mut s[seen.clone()] {
                            *x = (*x - max).exp();
                            sum += *x;
                        }
                        let inv = 1.0 / sum;
                        s[seen.clone()].iter_mut().for_each(|x| *x *= inv);
                        s[..seen.start].fill(0.0);
                        s[seen.end..].fill(0.0);
                    }
                    fused::gemm_into(
                        out_block,
                        (m, d, n),
                        fused::Strided {
                            data: scores,
                            rows: n,
                            cols: 1,
                        },
                        fused::Strided {
                            data: vh.get(lo * vst[2]..).unwrap_or_default(),
                            rows: vst[2],
                            cols: 1,
                        },
                        1.0,
                    )
                })
        })?;
    Ok(Some(Tensor::from_vec(out, (b, h, c, d), q.device())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-key helpers of the decode kernel on every instruction set this CPU has, against
    /// plain loops: head widths that take the SIMD forms and one that does not, up to eight and
    /// more heads, and zero weights skipped.
    #[test]
    fn the_key_and_value_helpers_equal_plain_loops_on_every_instruction_set() {
        let mut rng = crate::kernels::TestRng::new(3);
        for (d, g) in [(64, 4), (128, 2), (128, 8), (96, 12), (20, 3)] {
            let q: Vec<f32> = (0..g * d).map(|_| rng.next_f32() - 0.5).collect();
            let k: Vec<f32> = (0..d).map(|_| rng.next_f32() - 0.5).collect();
            let mut p: Vec<f32> = (0..g).map(|_| rng.next_f32()).collect();
            p[0] = 0.0;
            let start: Vec<f32> = (0..g * d).map(|_| rng.next_f32()).collect();
            let want_dots: Vec<f32> = q
                .chunks(d)
                .map(|qi| qi.iter().zip(&k).map(|(a, b)| a * b).sum())
                .collect();
            let mut want_out = start.clone();
            for (o, &pi) in want_out.chunks_mut(d).zip(&p) {
                o.iter_mut().zip(&k).for_each(|(a, x)| *a += pi * x);
            }
            for isa in Isa::supported() {
                let mut dots = vec![0f32; g];
                query_dots(isa, &q, &k, &mut dots);
                for (a, b) in dots.iter().zip(&want_dots) {
                    assert!((a - b).abs() <= 1e-5, "{isa:?} d {d} g {g}: {a} vs {b}");
                }
                let mut out = start.clone();
                add_weighted(isa, &mut out, &k, &p);
                for (a, b) in out.iter().zip(&want_out) {
                    assert!((a - b).abs() <= 1e-5, "{isa:?} d {d} g {g}");
                }
                assert_eq!(out[..d], start[..d], "a zero weight leaves its head alone");
            }
        }
    }

    /// The tile forms on every instruction set: scores against plain loops (whole blocks of 16
    /// and 8 keys, the keys after them, rows wider than a head), and the weighted values bit for
    /// bit against the per-key helper on the same instruction set, with zero weights skipped (a
    /// NaN value under them stays out).
    #[test]
    fn the_tile_forms_equal_plain_loops_on_every_instruction_set() {
        let mut rng = crate::kernels::TestRng::new(5);
        for (d, g, t, kst) in [
            (64, 3, 128, 64),
            (64, 3, 37, 80),
            (128, 2, 40, 128),
            (256, 1, 19, 256),
            (48, 5, 23, 48),
            (96, 4, 16, 96),
            (20, 3, 17, 24),
        ] {
            let stride = t + 3;
            let q: Vec<f32> = (0..g * d).map(|_| rng.next_f32() - 0.5).collect();
            let mut k: Vec<f32> = (0..(t - 1) * kst + d)
                .map(|_| rng.next_f32() - 0.5)
                .collect();
            let mut p: Vec<f32> = (0..g * stride).map(|_| rng.next_f32()).collect();
            // Key 3's weight is zero for every head, and its value NaN; key 5's for head 0 only.
            for i in 0..g {
                p[i * stride + 3] = 0.0;
            }
            p[5] = 0.0;
            let start: Vec<f32> = (0..g * d).map(|_| rng.next_f32()).collect();
            let want: Vec<Vec<f32>> = q
                .chunks(d)
                .map(|qi| {
                    (0..t)
                        .map(|j| qi.iter().zip(&k[j * kst..][..d]).map(|(a, b)| a * b).sum())
                        .collect()
                })
                .collect();
            k[3 * kst..3 * kst + d].fill(f32::NAN);
            for isa in Isa::supported() {
                let mut scores = vec![0f32; g * stride];
                let mut clean = k.clone();
                clean[3 * kst..3 * kst + d].fill(0.5);
                tile_dots(isa, &q, d, (&clean, kst), t, (&mut scores, stride));
                for (i, row) in want.iter().enumerate() {
                    for (j, w) in row.iter().enumerate().filter(|(j, _)| *j != 3) {
                        let got = scores[i * stride + j];
                        assert!(
                            (got - w).abs() <= 1e-5,
                            "{isa:?} d {d} g {g} t {t}: {got} vs {w}"
                        );
                    }
                }
                let mut out = start.clone();
                tile_add_weighted(isa, &mut out, d, (&k, kst), t, (&p, stride));
                let mut by_key = start.clone();
                for j in (0..t).filter(|&j| j != 3) {
                    let pj: Vec<f32> = (0..g).map(|i| p[i * stride + j]).collect();
                    add_weighted(isa, &mut by_key, &k[j * kst..][..d], &pj);
                }
                assert!(
                    out.iter().all(|x| x.is_finite()),
                    "{isa:?}: a zero weight let NaN in"
                );
                assert_eq!(out, by_key, "{isa:?} d {d} g {g} t {t}");
            }
        }
    }

    /// The tile forms read f16 and bf16 keys and values as the f32 forms read the same values
    /// widened first, bit for bit (widening is exact), on every instruction set: whole blocks,
    /// the keys after them, and a row stride wider than a head.
    #[test]
    fn half_precision_tiles_equal_the_f32_tiles_of_their_widened_rows() {
        let mut rng = crate::kernels::TestRng::new(11);
        for (d, g, t, kst) in [
            (64, 3, 128, 64),
            (64, 3, 37, 80),
            (128, 2, 21, 136),
            (20, 3, 9, 24),
        ] {
            let stride = t + 1;
            let q: Vec<f32> = (0..g * d).map(|_| rng.next_f32() - 0.5).collect();
            let raw: Vec<f32> = (0..(t - 1) * kst + d)
                .map(|_| rng.next_f32() - 0.5)
                .collect();
            let p: Vec<f32> = (0..g * stride).map(|_| rng.next_f32()).collect();
            let f16: Vec<half::f16> = raw.iter().map(|&x| half::f16::from_f32(x)).collect();
            let bf16: Vec<half::bf16> = raw.iter().map(|&x| half::bf16::from_f32(x)).collect();
            let wide_f16: Vec<f32> = f16.iter().map(|x| x.to_f32()).collect();
            let wide_bf16: Vec<f32> = bf16.iter().map(|x| x.to_f32()).collect();
            for isa in Isa::supported() {
                let run = |k: &dyn Fn(&mut [f32], &mut [f32])| {
                    let (mut scores, mut out) = (vec![0f32; g * stride], vec![0.25f32; g * d]);
                    k(&mut scores, &mut out);
                    (scores, out)
                };
                let tiles = |kv: (&[half::f16], &[half::bf16], &[f32]), which: usize| {
                    run(&|scores: &mut [f32], out: &mut [f32]| match which {
                        0 => {
                            tile_dots(isa, &q, d, (kv.0, kst), t, (scores, stride));
                            tile_add_weighted(isa, out, d, (kv.0, kst), t, (&p, stride));
                        }
                        1 => {
                            tile_dots(isa, &q, d, (kv.1, kst), t, (scores, stride));
                            tile_add_weighted(isa, out, d, (kv.1, kst), t, (&p, stride));
                        }
                        _ => {
                            tile_dots(isa, &q, d, (kv.2, kst), t, (scores, stride));
                            tile_add_weighted(isa, out, d, (kv.2, kst), t, (&p, stride));
                        }
                    })
                };
                let got_f16 = tiles((&f16, &bf16, &wide_f16), 0);
                let want_f16 = tiles((&f16, &bf16, &wide_f16), 2);
                assert_eq!(got_f16, want_f16, "{isa:?} f16 d {d} g {g} t {t}");
                let got_bf16 = tiles((&f16, &bf16, &wide_bf16), 1);
                let want_bf16 = tiles((&f16, &bf16, &wide_bf16), 2);
                assert_eq!(got_bf16, want_bf16, "{isa:?} bf16 d {d} g {g} t {t}");
            }
        }
    }

    /// Not a test: the decode attention of a 16-sequence step over 1K positions (bench-160m's
    /// heads), one cross layer's K/V after another from memory, in f32, f16 and bf16
    /// (`YOCO_BENCH_KV` one of them, `YOCO_BENCH_L` positions, `YOCO_BENCH_B` sequences). Prints
    /// GB/s of K/V read.
    #[test]
    #[ignore]
    fn decode_attention_throughput() -> Result<()> {
        let var = |name: &str, default: usize| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let (b, h, h_kv, d) = (var("YOCO_BENCH_B", 16), 12, 4, 64);
        let (l, layers, calls) = (var("YOCO_BENCH_L", 1024), 6, 120);
        let only = std::env::var("YOCO_BENCH_KV").unwrap_or_default();
        let q = crate::kernels::testing::uniform(&[b, h, 1, d], 1, 1.0)?;
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            if !only.is_empty() && only != dtype.as_str() {
                continue;
            }
            let kv = (0..layers)
                .map(|i| {
                    let k = crate::kernels::testing::uniform(&[b, h_kv, l, d], 2 + i as u64, 1.0)?;
                    let v = crate::kernels::testing::uniform(&[b, h_kv, l, d], 20 + i as u64, 1.0)?;
                    Ok((k.to_dtype(dtype)?, v.to_dtype(dtype)?))
                })
                .collect::<Result<Vec<_>>>()?;
            let t0 = std::time::Instant::now();
            for c in 0..calls {
                let (k, v) = &kv[c % layers];
                decode_grouped_cpu(&q, k, v, None, 0.125)?;
            }
            let secs = t0.elapsed().as_secs_f64();
            let bytes = 2 * b * h_kv * l * d * dtype.size_in_bytes() * calls;
            println!(
                "{dtype:?} {:?}, {b} x {l}: {:.2} GB/s of K/V, {:.3} ms per layer",
                Isa::active(),
                bytes as f64 / secs / 1e9,
                secs * 1e3 / calls as f64
            );
        }
        Ok(())
    }
}
