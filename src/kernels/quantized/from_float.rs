//! Float weights to Q4_K blocks as candle's `BlockQ4K::from_float` makes them, byte for byte,
//! without its costs: candle allocates a vector for every sub-block of 32 and calls `roundf`
//! once per value and try (five tries of the scale search). Quantizing a model to Q4_K as it
//! loads spent most of its time there (2560 x 10240 floats in 0.38 s, 68 M weights a second on
//! two cores: about a minute for Phi-4-mini-flash).
//!
//! The steps are candle's, in its order (its sums run over a sub-block's values in turn, in
//! f32, so they still do), the eight sub-blocks of a block side by side so that each step is
//! one vector operation for all eight; the rounding is inline where the CPU rounds in one
//! instruction (AVX2: `round` lowers to a truncation of `x + copysign(0.5 - ulp, x)`, exact for
//! every f32), and the levels stay floats (whole numbers, so the same sums). 430-460 M weights
//! a second on the same two cores, the bytes unchanged.

use candle_core::quantized::k_quants::{BlockQ4K, GgmlType};
use half::f16;

use super::super::isa::{Isa, Level};

/// Bytes of one Q4_K block: `d` and `dmin` (f16), 12 bytes of packed 6-bit scales and mins,
/// 128 bytes of nibbles.
const Q4K_BYTES: usize = 144;

/// `xs` (whole blocks of 256) quantized into `ys`, the bytes of candle's
/// `BlockQ4K::from_float`.
pub(crate) fn quantize_q4k(isa: Isa, xs: &[f32], ys: &mut [BlockQ4K]) {
    if std::mem::size_of::<BlockQ4K>() != Q4K_BYTES || xs.len() != 256 * ys.len() {
        BlockQ4K::from_float(xs, ys);
        return;
    }
    // SAFETY: `BlockQ4K` is `repr(C)` { f16, f16, [u8; 12], [u8; 128] } with no padding (its
    // size, 144, is checked above), and any bytes are a valid one; the view borrows `ys`
    // mutably.
    let out = unsafe {
        std::slice::from_raw_parts_mut(ys.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(ys))
    };
    match isa.level() {
        // SAFETY: an `Isa` is never above what the CPU has.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 | Level::Avx2 => unsafe { blocks_avx2(xs, out) },
        _ => blocks(xs, out),
    }
}

/// [`blocks`] with eight lanes to a register and `round` one instruction.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn blocks_avx2(xs: &[f32], out: &mut [u8]) {
    blocks(xs, out)
}

/// Every block of `xs` into its 144 bytes of `out`.
#[inline(always)]
fn blocks(xs: &[f32], out: &mut [u8]) {
    for (x, b) in xs.chunks_exact(256).zip(out.chunks_exact_mut(Q4K_BYTES)) {
        block(x, b);
    }
}

/// candle's `nearest_int`: rounded half away from zero, saturated (NaN to 0).
#[inline(always)]
fn nearest_int(v: f32) -> i32 {
    v.round() as i32
}

/// `nearest_int(v).clamp(0, top)` as a float (`top` a small whole number), without the
/// conversion: NaN and -0.0 give +0.0, as the integer's 0 does. A saturating conversion per
/// value did not vectorise.
#[inline(always)]
fn nearest_clamped(v: f32, top: f32) -> f32 {
    let r = v.round();
    let r = if r > 0.0 { r } else { 0.0 };
    if r < top {
        r
    } else {
        top
    }
}

/// One block of 256 floats into its bytes: each sub-block of 32's scale and minimum by
/// [`scale_min8`], both quantized to 6 bits against the block's largest, then each value to 4.
#[inline(always)]
fn block(x: &[f32], b: &mut [u8]) {
    let (scales, mins) = scale_min8(x);
    let max_scale = scales.iter().fold(0.0, |max: f32, &v| v.max(max));
    let max_min = mins.iter().fold(0.0, |max: f32, &v| v.max(max));
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    for j in 0..8 {
        // `as u8` as candle's: a negative product wraps.
        let ls = nearest_int(inv_scale * scales[j]).min(63) as u8;
        let lm = nearest_int(inv_min * mins[j]).min(63) as u8;
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    let mut l = [0u8; 256];
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &packed);
        let dj = d.to_f32() * sc as f32;
        if dj != 0.0 {
            let dm = dmin.to_f32() * m as f32;
            for (q, &v) in l[32 * j..32 * j + 32].iter_mut().zip(&x[32 * j..]) {
                let r = nearest_clamped((v + dm) / dj, 15.0);
                // SAFETY: `r` is a whole number in 0..=15.
                *q = unsafe { r.to_int_unchecked::<u8>() };
            }
        }
    }
    b[0..2].copy_from_slice(&d.to_le_bytes());
    b[2..4].copy_from_slice(&dmin.to_le_bytes());
    b[4..16].copy_from_slice(&packed);
    for (c, qs) in b[16..].chunks_exact_mut(32).enumerate() {
        for (i, q) in qs.iter_mut().enumerate() {
            *q = l[64 * c + i] | (l[64 * c + 32 + i] << 4);
        }
    }
}

/// Sub-block `j`'s 6-bit scale and minimum from the 12 packed bytes (ggml's
/// `get_scale_min_k4`).
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// candle's `make_qkx1_quants(15, 5, x)` for each of a block's eight sub-blocks of 32 (lane
/// `j` is sub-block `j`): the scale and the negated minimum that map it onto 0..=15, refined
/// by up to five least-squares tries. Each lane takes candle's steps in candle's order (its
/// sums run over the 32 values in turn); the eight lanes side by side are what lets the
/// compiler put them in one register, where one sub-block alone was a chain of dependent adds.
/// A lane whose try changed nothing keeps what that try computed, as candle's loop stops there.
#[inline(always)]
fn scale_min8(x: &[f32]) -> ([f32; 8], [f32; 8]) {
    const NMAX: i32 = 15;
    let mut xt = [[0f32; 8]; 32];
    for (j, sub) in x.chunks_exact(32).enumerate() {
        for (i, &v) in sub.iter().enumerate() {
            xt[i][j] = v;
        }
    }
    let (mut min, mut max) = ([0f32; 8], [0f32; 8]);
    for (j, sub) in x.chunks_exact(32).enumerate() {
        // The first least and the last greatest in the total order, as `min_by` / `max_by`
        // with `total_cmp` give them.
        let (mut lo, mut hi) = (sub[0], sub[0]);
        for &v in sub {
            if v.total_cmp(&lo).is_lt() {
                lo = v;
            }
            if v.total_cmp(&hi).is_ge() {
                hi = v;
            }
        }
        (min[j], max[j]) = (lo, hi);
    }
    // A constant sub-block is (0, 0) and takes no tries.
    let flat: [bool; 8] = std::array::from_fn(|j| max[j] == min[j]);
    let mut active = flat.map(|f| !f);
    let mut iscale = [0f32; 8];
    let mut scale = [0f32; 8];
    for j in 0..8 {
        min[j] = min[j].min(0.);
        iscale[j] = NMAX as f32 / (max[j] - min[j]);
        scale[j] = 1.0 / iscale[j];
    }
    // The levels 0..=15 as floats, and their squares summed as floats: whole numbers below
    // 2^24, so exactly candle's integers.
    let mut l = [[0f32; 8]; 32];
    for _ in 0..5 {
        if !active.contains(&true) {
            break;
        }
        let mut sumlx = [0f32; 8];
        let mut suml2 = [0f32; 8];
        let mut changed = [false; 8];
        for (xi, li) in xt.iter().zip(l.iter_mut()) {
            for j in 0..8 {
                let q = nearest_clamped(iscale[j] * (xi[j] - min[j]), NMAX as f32);
                changed[j] |= q != li[j];
                li[j] = q;
                sumlx[j] += (xi[j] - min[j]) * q;
                suml2[j] += q * q;
            }
        }
        let tried: [f32; 8] = std::array::from_fn(|j| sumlx[j] / suml2[j]);
        // `Iterator::sum`'s fold: from -0.0, which adds nothing.
        let mut sum = [-0.0f32; 8];
        for (xi, li) in xt.iter().zip(&l) {
            for j in 0..8 {
                sum[j] += xi[j] - tried[j] * li[j];
            }
        }
        for j in 0..8 {
            if active[j] {
                scale[j] = tried[j];
                min[j] = sum[j] / 32.0;
                if min[j] > 0.0 {
                    min[j] = 0.0;
                }
                iscale[j] = 1.0 / scale[j];
                active[j] = changed[j];
            }
        }
    }
    let scales = std::array::from_fn(|j| if flat[j] { 0.0 } else { scale[j] });
    let mins = std::array::from_fn(|j| if flat[j] { 0.0 } else { -min[j] });
    (scales, mins)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks of `seed`'s values: normal-ish values, then a block of edge cases (zeros, a
    /// constant, one outlier, tiny and huge values, ties at the rounding points, negative
    /// zero, NaN and infinities).
    fn inputs(blocks: usize, seed: u64) -> Vec<f32> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        let mut xs: Vec<f32> = (0..256 * blocks).map(|_| next() * 0.05).collect();
        let edge: [&dyn Fn(usize) -> f32; 10] = [
            &|_| 0.0,
            &|_| 0.25,
            &|i| if i == 7 { 40.0 } else { 0.01 },
            &|i| (i as f32) * 1e-30,
            &|i| (i as f32 - 16.0) * 1e30,
            &|i| (i % 16) as f32 * 0.5,
            &|i| if i % 2 == 0 { -0.0 } else { 0.0 },
            &|i| if i == 3 { f32::NAN } else { i as f32 },
            &|i| if i == 5 { f32::INFINITY } else { -(i as f32) },
            &|i| (i as f32 / 31.0) * 15.0 - 7.5,
        ];
        for (e, f) in edge.iter().enumerate() {
            // Each edge case fills one sub-block of its own block, the rest normal values.
            let block = e % blocks;
            let sub = e % 8;
            for i in 0..32 {
                xs[256 * block + 32 * sub + i] = f(i);
            }
        }
        xs
    }

    fn bytes(ys: &[BlockQ4K]) -> Vec<u8> {
        // SAFETY: as in `quantize_q4k`: `repr(C)`, no padding, read-only view.
        unsafe {
            std::slice::from_raw_parts(ys.as_ptr().cast::<u8>(), std::mem::size_of_val(ys)).to_vec()
        }
    }

    #[test]
    fn q4k_blocks_equal_candles_byte_for_byte_on_every_instruction_set() {
        // Enough blocks that an operation out of candle's order shows in some byte (a sum of
        // the 32 values in reverse showed in these 8,000 blocks, not in 72).
        for seed in 0..8 {
            let xs = inputs(1000, seed);
            let mut want = vec![BlockQ4K::zeros(); 1000];
            BlockQ4K::from_float(&xs, &mut want);
            for isa in Isa::supported() {
                let mut got = vec![BlockQ4K::zeros(); 1000];
                quantize_q4k(isa, &xs, &mut got);
                assert_eq!(bytes(&got), bytes(&want), "{isa:?} seed {seed}");
            }
        }
    }
}
