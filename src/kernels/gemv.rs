//! Decode projections on the CPU over raw f32 slices: a few input rows times a weight `(n, k)`,
//! each thread streaming a band of weight rows once, the rows of a batch dotted with each weight
//! row from registers (AVX-512 or AVX2 with FMA where the CPU has them), bit for bit as a row
//! alone would be. Also the one `dot` every CPU kernel uses.

use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

use super::isa::{Isa, Level};
use crate::{Error, Result};

/// At most this many sequences of a decode step take the row-streaming CPU kernel for quantized
/// weights (each group of weight rows is dotted with every input row while it is in cache; at
/// Phi-4-mini-flash's FFN width, 64 rows take half the time of dequantizing the weight for the
/// float gemm, 16 rows a sixth); more dequantize the weight and take the float gemm, as a
/// prompt chunk does.
pub(crate) const GEMV_MAX_ROWS: usize = 64;

/// At most this many input rows take the row-streaming CPU kernel for f32 weights (a decode step
/// of a batch of sequences); more use candle's matmul, which blocks for cache reuse and wins once
/// a weight row is used many times.
pub(crate) const GEMV_MAX_ROWS_F32: usize = 64;

/// `x W^T` on CPU for f32 `x: (..., k)` with at most [`GEMV_MAX_ROWS_F32`] rows and a contiguous f32
/// `w: (n, k)`: each thread takes a band of output features and streams their weight rows once,
/// using each row for every input row while it is in cache. `None` when the case is not this one.
pub(crate) fn gemv_cpu(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    gemv_with(Isa::active(), x, w)
}

/// [`gemv_cpu`] on the instruction set `isa` (tests run every one the CPU has).
fn gemv_with(isa: Isa, x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    if !matches!(x.device(), Device::Cpu)
        || !matches!(w.device(), Device::Cpu)
        || x.dtype() != DType::F32
        || w.dtype() != DType::F32
        || !w.is_contiguous()
    {
        return Ok(None);
    }
    let (n, k) = w.dims2()?;
    let dims = x.dims();
    let Some((&xk, lead)) = dims.split_last() else {
        return Ok(None);
    };
    let rows: usize = lead.iter().product();
    if xk != k || rows == 0 || rows > GEMV_MAX_ROWS_F32 || n == 0 {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (Storage::Cpu(xs), Storage::Cpu(ws)) = (&*xs, &*ws) else {
        return Ok(None);
    };
    let xd = slice(xs.as_slice::<f32>()?, xl.start_offset(), rows * k)?;
    let wd = slice(ws.as_slice::<f32>()?, wl.start_offset(), n * k)?;

    // Bands of output features, a few per thread so that uneven progress evens out; never so
    // small that scheduling costs more than the band's weights take to read.
    let threads = rayon::current_num_threads().max(1);
    let band = n.div_ceil(threads * 4).max(16384 / k.max(1)).max(1);
    let mut out = vec![0f32; n * rows];
    if rows == 1 {
        out.par_chunks_mut(band).enumerate().for_each(|(b, out)| {
            let first = b * band;
            let w_band = &wd[first * k..(first + out.len()) * k];
            for (y, w_row) in out.iter_mut().zip(w_band.chunks_exact(k)) {
                *y = dot_with(isa, xd, w_row);
            }
        });
    } else {
        // Each band computes its features feature-major `(len, rows)` (in its core's cache) and
        // puts them in every output row itself: one thread reordering the whole product
        // afterwards, a scattered store per value, took 2.7% of a 16-row f32 decode step's
        // samples with the other thread idle.
        let bands = n.div_ceil(band);
        let mut segments: Vec<Vec<&mut [f32]>> =
            (0..bands).map(|_| Vec::with_capacity(rows)).collect();
        for row in out.chunks_mut(n) {
            for (segs, seg) in segments.iter_mut().zip(row.chunks_mut(band)) {
                segs.push(seg);
            }
        }
        segments
            .into_par_iter()
            .enumerate()
            .for_each(|(b, mut segs)| {
                let first = b * band;
                let len = band.min(n - first);
                let mut by_feature = vec![0f32; len * rows];
                dots(
                    isa,
                    xd,
                    &wd[first * k..(first + len) * k],
                    k,
                    &mut by_feature,
                );
                for (r, seg) in segs.iter_mut().enumerate() {
                    for (j, y) in seg.iter_mut().enumerate() {
                        *y = by_feature[j * rows + r];
                    }
                }
            });
    }
    let mut out_dims = lead.to_vec();
    out_dims.push(n);
    Ok(Some(Tensor::from_vec(out, out_dims, x.device())?))
}

/// `data[start..start + len]`, or an error if the storage is shorter than its layout claims.
pub(crate) fn slice(data: &[f32], start: usize, len: usize) -> Result<&[f32]> {
    data.get(start..start + len)
        .ok_or_else(|| Error::Input("tensor storage shorter than its layout".into()))
}

/// Independent partial sums of [`dot`].
const LANES: usize = 32;

/// How far ahead of its loads (in floats) the AVX-512 dot product asks for a weight row's lines:
/// one hint per 32 floats, 1 KiB ahead. One input row against weights streamed from memory, on
/// a 2-core Xeon: 12.6-13.5 GB/s without it, 16.2-17.0 GB/s with it (its 64-byte loads, one
/// per line, leave the hardware prefetcher too few lines in flight), and one sequence's f32
/// decode 1.3x faster. The AVX2 loop (two loads per line) reads as fast without it, and came
/// out 0.97-0.99x with it, so it has none. A hint costs nothing next to the arithmetic when the
/// rows are in cache or many input rows share them. AMD's CPUs take none: on a 2-core EPYC
/// (Zen 4) one sequence's f32 decode at 1K went 53.5-56.5 tokens/s with the hints and 63.2-67.9
/// without (three runs each, in turn).
const PREFETCH_AHEAD: usize = 256;

/// Dot product over 32 independent lanes (each a chain of multiply-adds over every 32nd
/// element), which hide the latency of the adds where a plain `sum` is one sequential chain.
/// Every kernel that dots an input row with a weight row ([`dots`], the decode attention)
/// computes exactly this, so a row gets the same bits whichever kernel serves it. AVX-512 and
/// AVX2 give the same bits (the same fused multiply-add chain per lane); the portable form
/// rounds the product and the add apart.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_with(Isa::active(), a, b)
}

/// [`dot`] on the instruction set `isa`.
pub(crate) fn dot_with(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    let k = a.len().min(b.len());
    let (a, b) = (&a[..k], &b[..k]);
    match isa.level() {
        // SAFETY: an `Isa` is never above what the CPU has, so it has AVX-512F.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { x86::block_avx512::<1, 1>([b], [a], &[])[0][0] },
        // SAFETY: as above: the CPU has AVX2 and FMA.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { x86::block_avx2::<1, 1>([b], [a])[0][0] },
        _ => dot_plain(a, b),
    }
}

/// [`dot`] without SIMD intrinsics: a multiply, then an add, per lane.
fn dot_plain(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    finish_dot(&acc, tail)
}

/// The end of [`dot`]: its lanes folded in halves (lane `j` takes lane `j + 16`, then `j + 8`,
/// `j + 4`, `j + 2` and `j + 1`: five adds deep, the order in which SIMD registers fold, where
/// a sum in lane order was a chain of 32 adds that cost a batch of short rows a third of its
/// time), plus [`tail_dot`]. Shared so that every kernel that computes a dot product lane by
/// lane ends it alike; the SIMD kernels fold in registers, in this order.
#[inline(always)]
fn finish_dot(acc: &[f32; LANES], tail: (&[f32], &[f32])) -> f32 {
    let mut lanes = *acc;
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for j in 0..width {
            lanes[j] += lanes[j + width];
        }
    }
    lanes[0] + tail_dot(tail)
}

/// The products past a dot product's last full group of lanes, summed in order.
#[inline(always)]
fn tail_dot((a, b): (&[f32], &[f32])) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `out[i * rows + r] = dot(x_r, w_i)` for the `rows` input rows of `x` (`rows * k`) and the
/// weight rows of `w` (`out.len() / rows` of `k`), equal bit for bit to calling [`dot`] for
/// each pair: every lane takes the same operations in the same order and [`finish_dot`] ends
/// them, so a sequence gets the same logits alone and in a batch. With AVX-512 (AVX2) it dots
/// four (three) weight rows with two input rows at a time from registers, so that each weight,
/// once loaded, serves several rows: with several rows a decode step is bound by arithmetic
/// rather than by reading the weights. (More weight rows than input rows: the input rows stream
/// from the second-level cache for every block, the weight rows stay in the first, so fewer
/// input rows per block cut that traffic. With AVX-512, four by two where it was two by four,
/// and the block's eight products folded together: 16 f32 rows at bench-160m's widths went
/// from 52-77 to 107-127 GFLOP/s with the weights in the last-level cache, on a 2-core Zen 4.
/// With AVX2, three by two where it was two by three: the 16-sequence step 1.1x, medians of
/// five runs in turn.)
fn dots(isa: Isa, x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
    match isa.level() {
        // SAFETY: an `Isa` is never above what the CPU has, so it has AVX-512F.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => dots_by::<4, 2>(
            isa,
            (x, w, k, out),
            |ws, xs, ahead| unsafe { x86::block_avx512(ws, xs, ahead) },
            |ws, xs| unsafe { x86::block_avx512(ws, xs, &[]) },
        ),
        // SAFETY: as above: the CPU has AVX2 and FMA. Fewer than three rows keep the one-pass
        // kernel, whose single read of the weights is what bounds them.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 if x.len() < 3 * k => dots_by::<1, 2>(
            isa,
            (x, w, k, out),
            |ws, xs, _| unsafe { x86::block_avx2(ws, xs) },
            |ws, xs| unsafe { x86::block_avx2(ws, xs) },
        ),
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => dots_by::<3, 2>(
            isa,
            (x, w, k, out),
            |ws, xs, ahead| unsafe { x86::block_avx2_halves(ws, xs, ahead) },
            |ws, xs| unsafe { x86::block_avx2_halves(ws, xs, &[]) },
        ),
        _ => dots_by::<1, 1>(
            isa,
            (x, w, k, out),
            |[w], [x], _| [[dot_plain(x, w)]],
            |[w], [x]| [[dot_plain(x, w)]],
        ),
    }
}

/// [`dots`] in blocks of `A` weight rows by `B` input rows through `block`, the input rows left
/// over one at a time through `column` (the same lanes: `A` weight rows by one input row), the
/// weight rows left over pair by pair through [`dot_with`] on `isa` (the same instruction set).
/// Each block is also given its share of the next `A` weight rows to prefetch: a block of
/// several input rows is bound by its arithmetic, and without the hints it waited on the next
/// rows' first loads (16 sequences' f32 step on a 2-core Zen 4: 1.1-1.25x with them).
fn dots_by<const A: usize, const B: usize>(
    isa: Isa,
    (x, w, k, out): (&[f32], &[f32], usize, &mut [f32]),
    block: impl Fn([&[f32]; A], [&[f32]; B], &[f32]) -> [[f32; B]; A],
    column: impl Fn([&[f32]; A], [&[f32]; 1]) -> [[f32; 1]; A],
) {
    let rows = x.len() / k.max(1);
    let n = out.len() / rows.max(1);
    let x_row = |r: usize| &x[r * k..(r + 1) * k];
    let w_row = |i: usize| &w[i * k..(i + 1) * k];
    let mut i = 0;
    while i + A <= n {
        let ws: [&[f32]; A] = std::array::from_fn(|a| w_row(i + a));
        // The next weight rows, asked for while these serve the input rows: each block of input
        // rows prefetches its share.
        let next = &w[((i + A) * k).min(w.len())..((i + 2 * A) * k).min(w.len())];
        let share = next.len().div_ceil((rows / B).max(1));
        let mut r = 0;
        while r + B <= rows {
            let part =
                &next[(r / B * share).min(next.len())..((r / B + 1) * share).min(next.len())];
            let ys = block(ws, std::array::from_fn(|b| x_row(r + b)), part);
            for (a, ya) in ys.iter().enumerate() {
                out[(i + a) * rows + r..][..B].copy_from_slice(ya);
            }
            r += B;
        }
        for r in r..rows {
            for (a, y) in column(ws, [x_row(r)]).iter().enumerate() {
                out[(i + a) * rows + r] = y[0];
            }
        }
        i += A;
    }
    for i in i..n {
        for r in 0..rows {
            out[i * rows + r] = dot_with(isa, x_row(r), w_row(i));
        }
    }
}

/// Lane-by-lane dot products in registers, `A` weight rows by `B` input rows at a time (see
/// [`dot`] and [`dots`]).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{tail_dot, LANES, PREFETCH_AHEAD};
    use crate::kernels::prefetch_line;

    /// The lines of the weight rows a register block serves next, asked for a few at each step
    /// of its loop so that the whole span is in flight, spread out, by the time it is used.
    struct Ahead<'a> {
        rows: &'a [f32],
        per_step: usize,
        line: usize,
    }

    impl<'a> Ahead<'a> {
        /// `rows` spread over `steps` steps.
        #[inline(always)]
        fn new(rows: &'a [f32], steps: usize) -> Self {
            let per_step = rows.len().div_ceil(16).div_ceil(steps.max(1));
            Ahead {
                rows,
                per_step,
                line: 0,
            }
        }

        /// This step's lines (none once the span is asked for).
        #[inline(always)]
        fn step(&mut self) {
            for _ in 0..self.per_step {
                if 16 * self.line < self.rows.len() {
                    prefetch_line(self.rows.as_ptr().wrapping_add(16 * self.line));
                    self.line += 1;
                }
            }
        }
    }

    /// The length every slice has (the shortest).
    fn common_len(w: &[&[f32]], x: &[&[f32]]) -> usize {
        w.iter().chain(x).map(|s| s.len()).min().unwrap_or(0)
    }

    /// `dot(x_b, w_a)` for `A` weight rows and `B` input rows (`A * B <= 8` keeps the
    /// accumulators in registers): a dot product's 32 lanes in two 16-lane registers. The
    /// lines of `ahead` (the rows the next block serves) are asked for along the way.
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block_avx512<const A: usize, const B: usize>(
        w: [&[f32]; A],
        x: [&[f32]; B],
        ahead: &[f32],
    ) -> [[f32; B]; A] {
        let k = common_len(&w, &x);
        let full = k - k % LANES;
        let mut acc = [[[_mm512_setzero_ps(); 2]; B]; A];
        let mut ahead = Ahead::new(ahead, full / LANES);
        // Hints this far ahead only where one input row streams the weights; a block of several
        // rows asks for the next rows at its own pace (`ahead`): hints at this distance took
        // load slots from its multiply-adds (16 f32 rows 3-5% slower).
        let hints = B == 1 && !crate::kernels::isa::amd();
        let mut c = 0;
        while c < full {
            if hints {
                for row in w {
                    // Past the row's end: the next row of the band, or nothing.
                    prefetch_line(row.as_ptr().wrapping_add(c + PREFETCH_AHEAD));
                }
            }
            ahead.step();
            // SAFETY: c + 32 <= full <= every slice's length, so each load of 16 floats at c
            // or c + 16 reads inside its slice.
            unsafe {
                let wv: [[__m512; 2]; A] = std::array::from_fn(|a| {
                    let p = w[a].as_ptr().add(c);
                    [_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))]
                });
                for b in 0..B {
                    let p = x[b].as_ptr().add(c);
                    let xv = [_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))];
                    for a in 0..A {
                        for h in 0..2 {
                            acc[a][b][h] = _mm512_fmadd_ps(xv[h], wv[a][h], acc[a][b][h]);
                        }
                    }
                }
            }
            c += LANES;
        }
        let mut ys = [[0f32; B]; A];
        if A * B == 8 {
            let sums = fold8_avx512(std::array::from_fn(|o| acc[o / B][o % B]));
            for (o, s) in sums.into_iter().enumerate() {
                ys[o / B][o % B] = s;
            }
        } else {
            for a in 0..A {
                for b in 0..B {
                    let [low, high] = acc[a][b];
                    ys[a][b] = fold_avx512(low, high);
                }
            }
        }
        if full < k {
            for a in 0..A {
                for b in 0..B {
                    ys[a][b] += tail_dot((&x[b][full..k], &w[a][full..k]));
                }
            }
        } else {
            // As `finish_dot` adds its (empty) tail: -0 becomes +0.
            for y in ys.iter_mut().flatten() {
                *y += 0.0;
            }
        }
        ys
    }

    /// [`fold_avx512`] for eight dot products at once: each halving adds two registers that
    /// hold the halves of several products side by side, so eight products take 15 shuffles
    /// and 15 adds where one at a time took eight times eight.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn fold8_avx512(acc: [[__m512; 2]; 8]) -> [f32; 8] {
        // Lanes j + 16: one register per product.
        let s16: [__m512; 8] = std::array::from_fn(|o| _mm512_add_ps(acc[o][0], acc[o][1]));
        // Lanes j + 8: two products per register, eight lanes each.
        let s8: [__m512; 4] = std::array::from_fn(|p| {
            let (a, b) = (s16[2 * p], s16[2 * p + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(a, b),
                _mm512_shuffle_f32x4::<0xEE>(a, b),
            )
        });
        // Lanes j + 4: four products per register, one per 128-bit lane.
        let s4: [__m512; 2] = std::array::from_fn(|p| {
            let (a, b) = (s8[2 * p], s8[2 * p + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(a, b),
                _mm512_shuffle_f32x4::<0xDD>(a, b),
            )
        });
        // Lanes j + 2: 128-bit lane L holds product L in elements 0-1 and product 4 + L in 2-3.
        let s2 = _mm512_add_ps(
            _mm512_shuffle_ps::<0x44>(s4[0], s4[1]),
            _mm512_shuffle_ps::<0xEE>(s4[0], s4[1]),
        );
        // Lane j + 1, into elements 4 L and 4 L + 2; then the eight in order.
        let s1 = _mm512_add_ps(s2, _mm512_movehdup_ps(s2));
        let order = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0);
        let mut out = [0f32; 8];
        // SAFETY: `out` holds 8 floats.
        unsafe {
            _mm256_storeu_ps(
                out.as_mut_ptr(),
                _mm512_castps512_ps256(_mm512_permutexvar_ps(order, s1)),
            )
        };
        out
    }

    /// [`super::finish_dot`]'s fold of 32 lanes held as lanes 0-15 and 16-31.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn fold_avx512(low: __m512, high: __m512) -> f32 {
        let s16 = _mm512_add_ps(low, high);
        let upper = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(s16)));
        fold_avx2_8(_mm256_add_ps(_mm512_castps512_ps256(s16), upper))
    }

    /// [`super::finish_dot`]'s fold of 32 lanes held as lanes 0-7, 8-15, 16-23 and 24-31.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn fold_avx2(q: [__m256; 4]) -> f32 {
        let s16 = [_mm256_add_ps(q[0], q[2]), _mm256_add_ps(q[1], q[3])];
        fold_avx2_8(_mm256_add_ps(s16[0], s16[1]))
    }

    /// The last three halvings of [`super::finish_dot`]'s fold: 8 lanes to one.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn fold_avx2_8(s8: __m256) -> f32 {
        let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)))
    }

    /// As [`block_avx2`], in two passes over the rows, each keeping half of every dot product's
    /// lanes (two 8-lane registers) so that six products fit the sixteen registers: three
    /// weight rows by two input rows load 0.8 values per multiply-add where one by two loaded
    /// 1.5, and the loads, not the multiply-adds, bounded a batch. Every lane takes the same
    /// multiply-adds in the same order as in one pass, so the same bits. The second pass reads
    /// rows the first just brought into the nearest cache; the first asks for `ahead`'s lines.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    // `q` picks the register of a quarter in every accumulator, not one array's elements.
    #[allow(clippy::needless_range_loop)]
    pub(super) unsafe fn block_avx2_halves<const A: usize, const B: usize>(
        w: [&[f32]; A],
        x: [&[f32]; B],
        ahead: &[f32],
    ) -> [[f32; B]; A] {
        let k = common_len(&w, &x);
        let full = k - k % LANES;
        let mut lanes = [[[0f32; LANES]; B]; A];
        let mut ahead = Ahead::new(ahead, full / LANES);
        for half in 0..2 {
            let mut acc = [[[_mm256_setzero_ps(); 2]; B]; A];
            let mut c = 0;
            while c < full {
                if half == 0 {
                    ahead.step();
                }
                for q in 0..2 {
                    let at = c + 16 * half + 8 * q;
                    // SAFETY: at + 8 <= c + 32 <= full <= every slice's length, so each load
                    // of 8 floats at `at` reads inside its slice.
                    unsafe {
                        let wv: [__m256; A] =
                            std::array::from_fn(|a| _mm256_loadu_ps(w[a].as_ptr().add(at)));
                        for b in 0..B {
                            let xv = _mm256_loadu_ps(x[b].as_ptr().add(at));
                            for a in 0..A {
                                acc[a][b][q] = _mm256_fmadd_ps(xv, wv[a], acc[a][b][q]);
                            }
                        }
                    }
                }
                c += LANES;
            }
            for a in 0..A {
                for b in 0..B {
                    for (q, v) in acc[a][b].iter().enumerate() {
                        let part = &mut lanes[a][b][16 * half + 8 * q..][..8];
                        // SAFETY: `part` holds 8 floats.
                        unsafe { _mm256_storeu_ps(part.as_mut_ptr(), *v) };
                    }
                }
            }
        }
        let mut ys = [[0f32; B]; A];
        for a in 0..A {
            for b in 0..B {
                let l = &lanes[a][b];
                // SAFETY: `l` holds 32 floats, four loads of 8.
                let q = std::array::from_fn(|i| unsafe { _mm256_loadu_ps(l.as_ptr().add(8 * i)) });
                ys[a][b] = fold_avx2(q) + tail_dot((&x[b][full..k], &w[a][full..k]));
            }
        }
        ys
    }

    /// As [`block_avx512`], with a dot product's 32 lanes in four 8-lane registers.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn block_avx2<const A: usize, const B: usize>(
        w: [&[f32]; A],
        x: [&[f32]; B],
    ) -> [[f32; B]; A] {
        let k = common_len(&w, &x);
        let full = k - k % LANES;
        let mut acc = [[[_mm256_setzero_ps(); 4]; B]; A];
        let mut c = 0;
        while c < full {
            // SAFETY: c + 32 <= full <= every slice's length, so each load of 8 floats at
            // c + 8 q (q < 4) reads inside its slice.
            unsafe {
                let wv: [[__m256; 4]; A] = std::array::from_fn(|a| {
                    std::array::from_fn(|q| _mm256_loadu_ps(w[a].as_ptr().add(c + 8 * q)))
                });
                for b in 0..B {
                    for q in 0..4 {
                        let xv = _mm256_loadu_ps(x[b].as_ptr().add(c + 8 * q));
                        for a in 0..A {
                            acc[a][b][q] = _mm256_fmadd_ps(xv, wv[a][q], acc[a][b][q]);
                        }
                    }
                }
            }
            c += LANES;
        }
        let mut ys = [[0f32; B]; A];
        for a in 0..A {
            for b in 0..B {
                ys[a][b] = fold_avx2(acc[a][b]) + tail_dot((&x[b][full..k], &w[a][full..k]));
            }
        }
        ys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded(shape: &[usize], seed: u64) -> Result<Tensor> {
        crate::kernels::testing::uniform(shape, seed, 1.0)
    }

    use crate::kernels::testing::naive_product as naive;

    use crate::kernels::testing::max_diff;

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|f| f.to_bits()).collect()
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_and_in_any_batch_on_every_instruction_set() -> Result<()> {
        // Widths below, at and past the 32 lanes, with a tail; batches that fill the register
        // blocks and leave rows and weight rows over; every instruction set this CPU has.
        for isa in Isa::supported() {
            for k in [7, 32, 100, 256, 773] {
                let w = seeded(&[11, k], k as u64)?;
                let alone: Vec<Vec<f32>> = (0..GEMV_MAX_ROWS_F32)
                    .map(|r| {
                        let row = seeded(&[GEMV_MAX_ROWS_F32, k], k as u64 + 1)?.narrow(0, r, 1)?;
                        let y = gemv_with(isa, &row, &w)?.ok_or(Error::Input("declined".into()))?;
                        Ok(y.flatten_all()?.to_vec1()?)
                    })
                    .collect::<Result<_>>()?;
                for rows in (1..=9).chain([13, GEMV_MAX_ROWS_F32]) {
                    let x = seeded(&[GEMV_MAX_ROWS_F32, k], k as u64 + 1)?.narrow(0, 0, rows)?;
                    let batch = gemv_with(isa, &x, &w)?.ok_or(Error::Input("declined".into()))?;
                    let naive = naive(&x, &w)?;
                    let got: Vec<f32> = batch.flatten_all()?.to_vec1()?;
                    assert!(
                        max_diff(&got, &naive) <= 1e-5 * (k as f32).sqrt(),
                        "{isa:?}"
                    );
                    for (r, alone) in alone.iter().enumerate().take(rows) {
                        let mine = &got[r * 11..(r + 1) * 11];
                        assert_eq!(
                            bits(mine),
                            bits(alone),
                            "{isa:?} k {k}, {rows} rows, row {r}"
                        );
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn the_simd_dot_is_fused_lane_chains_folded_in_halves() -> Result<()> {
        // The definition written out in scalars: each of the 32 lanes a chain of fused
        // multiply-adds over every 32nd element, the lanes folded by `finish_dot`. The SIMD
        // kernels fold in registers (one product at a time, and eight at a time in a block).
        for k in [32, 64, 96, 300, 768, 2048 + 5] {
            let x: Vec<f32> = seeded(&[9, k], 3)?.flatten_all()?.to_vec1()?;
            let w: Vec<f32> = seeded(&[7, k], 4)?.flatten_all()?.to_vec1()?;
            let full = k - k % LANES;
            let reference = |xr: &[f32], wr: &[f32]| {
                let mut acc = [0f32; LANES];
                for c in (0..full).step_by(LANES) {
                    for (l, a) in acc.iter_mut().enumerate() {
                        *a = xr[c + l].mul_add(wr[c + l], *a);
                    }
                }
                finish_dot(&acc, (&xr[full..], &wr[full..]))
            };
            let want: Vec<f32> = (0..7 * 9)
                .map(|j| {
                    let (i, r) = (j / 9, j % 9);
                    reference(&x[r * k..(r + 1) * k], &w[i * k..(i + 1) * k])
                })
                .collect();
            for isa in Isa::supported() {
                if isa.level() == Level::Portable {
                    continue;
                }
                let mut got = vec![f32::NAN; 7 * 9];
                dots(isa, &x, &w, k, &mut got);
                assert_eq!(bits(&got), bits(&want), "{isa:?} k {k}");
            }
        }
        Ok(())
    }

    #[test]
    fn every_register_blocked_kernel_equals_its_own_single_dot_bit_for_bit() -> Result<()> {
        // `dots` on each instruction set this CPU has, against the same set's `dot` one pair at
        // a time and against the naive product; the SIMD sets against each other (the same
        // fused chain per lane, so the same bits).
        let (n, rows) = (7, 9);
        for k in [5, 64, 101, 256, 300] {
            let x: Vec<f32> = seeded(&[rows, k], 1)?.flatten_all()?.to_vec1()?;
            let w: Vec<f32> = seeded(&[n, k], 2)?.flatten_all()?.to_vec1()?;
            let naive = naive(
                &Tensor::from_vec(x.clone(), (rows, k), &Device::Cpu)?,
                &Tensor::from_vec(w.clone(), (n, k), &Device::Cpu)?,
            )?;
            let mut simd_bits = Vec::new();
            for isa in Isa::supported() {
                let mut got = vec![f32::NAN; n * rows];
                dots(isa, &x, &w, k, &mut got);
                let mut want = vec![0f32; n * rows];
                for i in 0..n {
                    for r in 0..rows {
                        want[i * rows + r] =
                            dot_with(isa, &x[r * k..(r + 1) * k], &w[i * k..(i + 1) * k]);
                    }
                }
                assert_eq!(bits(&got), bits(&want), "{isa:?} k {k}");
                let by_row: Vec<f32> = (0..rows * n).map(|j| got[(j % n) * rows + j / n]).collect();
                assert!(
                    max_diff(&by_row, &naive) <= 1e-5 * (k as f32).sqrt(),
                    "{isa:?}"
                );
                if isa.level() != Level::Portable {
                    simd_bits.push(bits(&got));
                }
            }
            assert!(simd_bits.windows(2).all(|p| p[0] == p[1]), "k {k}");
        }
        Ok(())
    }
}
