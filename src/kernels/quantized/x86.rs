//! Interleaved Q8_0 and Q4_0 weights against a Q8_0 input, and interleaved Q4_K weights against
//! a Q8_K input, with AVX2, FMA and F16C (and `vpdpbusd` where the CPU has it); the inputs'
//! quantization and the dequantization of candle's blocks, vectorised with candle's arithmetic.
//!
//! Q8_0 and Q4_0 are blocks of 32 weights behind an f16 scale (Q8_0: 34 bytes, the weights as
//! i8; Q4_0: 18 bytes, the weights as nibbles `q + 8`, the first 16 in the low halves); Q4_K
//! blocks of 256 behind `d`, `dmin` and eight 6-bit scales and mins. Functions with target
//! features are inlined only where the compiler likes (a call per eight blocks cost the forms
//! 7-10%), so the helpers inside the forms are macros, and the forms take no closures (they
//! would not inherit the features).

use std::arch::x86_64::*;

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ8K, BlockQ8_0, GgmlType};
use candle_core::quantized::GgmlDType;

use super::{BandKernel, Q4KX8_BYTES, Q4X8_BYTES, Q8X8_BYTES};
use crate::kernels::isa::{Isa, Level};

/// Whether `isa` has what the kernels use (AVX2, FMA and F16C): an `Isa` is never above
/// what the CPU has.
fn available(isa: Isa) -> bool {
    isa.level() >= Level::Avx2
}

/// `$call!(form, n)` for a run of `$take` input rows with the form of `$dots`: up to four
/// rows with AVX-512 (32 registers), two without.
macro_rules! by_runs {
    ($dots:expr, $take:expr, $call:ident, $evex:ident, $vex:ident, $avx2:ident) => {
        match ($dots, $take) {
            (Dots::Evex, 1) => $call!($evex, 1),
            (Dots::Evex, 2) => $call!($evex, 2),
            (Dots::Evex, 3) => $call!($evex, 3),
            (Dots::Evex, _) => $call!($evex, 4),
            (Dots::Vex, 1) => $call!($vex, 1),
            (Dots::Vex, _) => $call!($vex, 2),
            (Dots::Avx2, 1) => $call!($avx2, 1),
            (Dots::Avx2, _) => $call!($avx2, 2),
        }
    };
}

/// Bytes of a Q8_0 block: the f16 scale, then 32 i8.
const Q8_0_BYTES: usize = 34;
/// Bytes of a Q4_0 block: the f16 scale, then 16 bytes of nibbles.
const Q4_0_BYTES: usize = 18;

/// The Q8_0 and Q4_0 kernel: weight rows interleaved by eight ([`super::interleave`]),
/// a group of eight at a time (`first` and every band start at a group), against the input
/// rows quantized to Q8_0.
pub(super) struct Kernel<'a> {
    weight: &'a [u8],
    /// Blocks per row.
    kb: usize,
    /// The input rows' Q8_0 scales as f32.
    input_scales: Vec<f32>,
    /// The byte dot product the forms use.
    dots: Dots,
    /// Q8_0 past [`row_form_most`] rows: the input rows in groups of `width`, as
    /// [`q8x8_lanes`], [`q8x8_lanes_vex`] and [`q8x8_lanes16`] (`32 width kb` bytes a
    /// group) or [`q8x8_lanes_avx2`] (`512 kb` bytes a group) read them ([`Lanes::q`];
    /// empty otherwise).
    lanes: Vec<u8>,
    /// With `lanes`: each group's block scales, `width` per block ([`Lanes::scales`]).
    lane_scales: Vec<f32>,
    /// Input rows per group of `lanes`: 8 (256-bit registers) for up to 8 rows or without
    /// AVX-512 VNNI, else 16; 1 for Q4_0 and for up to [`row_form_most`] rows of Q8_0,
    /// which take the rows forms instead ([`group_rows`], [`group_rows_vex`],
    /// [`group_rows_avx2`]).
    width: usize,
    /// With width 1: each input block's 32 bytes as they are (signed), and what the
    /// weights' bias adds to their products ([`RowInput::minus`]).
    signed: Vec<u8>,
    minus: Vec<i32>,
    /// Q4_0 rather than Q8_0.
    nibbles: bool,
    rows: usize,
}

/// Whether Q8_0, Q4_0 and Q4_K weights are interleaved for `isa`
/// ([`super::QWeight::prepared`]): where the kernels have AVX2, whose forms for them
/// ([`group_rows`] and the others) do without the transposition candle's layout needs.
pub(super) fn interleaves(isa: Isa) -> bool {
    available(isa)
}

/// Whether prompt chunks of interleaved weights of `format` take the kernel on `isa`: with
/// `vpdpbusd` (four byte products per lane and instruction, where the float gemm does one
/// multiply-add), and with AVX2 alone for Q4_0 and Q4_K, whose `maddubs` take the nibbles as
/// they are (on a Zen 4 with AVX2 forced, prefill at 2K 1.13-1.28x and 1.32-1.34x the
/// dequantized gemm's). Q8_0 with AVX2 alone multiplies pairs of i16, no faster than the gemm
/// (0.94-1.05x).
pub(super) fn integer_prompts(isa: Isa, format: GgmlDType) -> bool {
    available(isa) && (Dots::of(isa) != Dots::Avx2 || format != GgmlDType::Q8_0)
}

/// The kernel of interleaved Q8_0 or Q4_0 weights `bytes` of `(n, k)` (rows padded to a
/// multiple of eight), with the input `x` (`rows` rows of `k`) quantized for it; `None`
/// for another format, candle's layout, or blocks that do not fit.
// One argument per fact about the piece; a struct would only be unpacked again.
#[allow(clippy::too_many_arguments)]
pub(super) fn kernel<'a>(
    isa: Isa,
    format: GgmlDType,
    interleaved: bool,
    bytes: &'a [u8],
    n: usize,
    k: usize,
    x: &[f32],
    rows: usize,
) -> Option<Kernel<'a>> {
    let (nibbles, block_bytes) = match format {
        GgmlDType::Q8_0 => (false, Q8_0_BYTES),
        GgmlDType::Q4_0 => (true, Q4_0_BYTES),
        _ => return None,
    };
    if !available(isa)
        || !interleaved
        || std::mem::size_of::<BlockQ8_0>() != Q8_0_BYTES
        || !k.is_multiple_of(32)
        || x.len() != rows * k
    {
        return None;
    }
    let kb = k / 32;
    if bytes.len() != n.next_multiple_of(8) * kb * block_bytes {
        return None;
    }
    let mut input = vec![BlockQ8_0::zeros(); rows * kb];
    for (xr, qr) in x.chunks_exact(k).zip(input.chunks_exact_mut(kb)) {
        quantize_q8_0(xr, qr);
    }
    let input = as_bytes(&input);
    let input_scales: Vec<f32> = input
        .chunks_exact(Q8_0_BYTES)
        .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect();
    let dots = Dots::of(isa);
    // `vpdpbusd`, on either encoding: the inputs laid out for it.
    let vnni = dots != Dots::Avx2;
    let width = match rows {
        _ if nibbles => 1,
        r if r <= row_form_most(dots) => 1,
        r if r <= 8 || dots != Dots::Evex => 8,
        _ => 16,
    };
    // Block `b` of input row `r`: its 32 bytes.
    let block = |r: usize, b: usize| {
        let at = (r * kb + b) * Q8_0_BYTES + 2;
        &input[at..at + 32]
    };
    let (mut lanes, mut lane_scales) = (Vec::new(), Vec::new());
    let (mut signed, mut minus) = (Vec::new(), Vec::new());
    let sum = |q: &[u8]| q.iter().map(|&v| i32::from(v as i8)).sum::<i32>();
    if width == 1 {
        for b in input.chunks_exact(Q8_0_BYTES) {
            signed.extend_from_slice(&b[2..]);
            if nibbles {
                minus.push(-8 * sum(&b[2..]));
            } else if vnni {
                minus.push(-128 * sum(&b[2..]));
            }
        }
    } else if !vnni {
        // Each pair of bytes `2p, 2p + 1` of every row's block b, widened to i16, side by
        // side (row m in lane m), eight rows to a group: 512 bytes a block.
        let groups = rows.div_ceil(8);
        lanes = vec![0u8; groups * kb * 512];
        lane_scales = vec![0f32; groups * kb * 8];
        for r in 0..rows {
            let (group, m) = (r / 8, r % 8);
            for b in 0..kb {
                let at = (group * kb + b) * 512 + 4 * m;
                for (p, two) in block(r, b).chunks_exact(2).enumerate() {
                    let at = at + 32 * p;
                    lanes[at..at + 2].copy_from_slice(&i16::from(two[0] as i8).to_le_bytes());
                    lanes[at + 2..at + 4].copy_from_slice(&i16::from(two[1] as i8).to_le_bytes());
                }
                lane_scales[(group * kb + b) * 8 + m] = input_scales[r * kb + b];
            }
        }
    } else {
        // Byte group g of every row's block b, biased to the unsigned operand (`x + 128`),
        // side by side, row m in lane m, `width` rows to a group; the lanes past the last
        // row stay zero and are never read back.
        let groups = rows.div_ceil(width);
        lanes = vec![0u8; groups * kb * 32 * width];
        lane_scales = vec![0f32; groups * kb * width];
        for r in 0..rows {
            let (group, m) = (r / width, r % width);
            for b in 0..kb {
                let at = (group * kb + b) * 32 * width + 4 * m;
                // Four bytes at a time: a byte at a time, this layout was 1.2-1.5% of 16
                // sequences' Q8_0 decode step (0.6% now), on one thread while the other waits.
                for (g, four) in block(r, b).chunks_exact(4).enumerate() {
                    let at = at + 4 * width * g;
                    let biased =
                        u32::from_ne_bytes([four[0], four[1], four[2], four[3]]) ^ 0x8080_8080;
                    lanes[at..at + 4].copy_from_slice(&biased.to_ne_bytes());
                }
                lane_scales[(group * kb + b) * width + m] = input_scales[r * kb + b];
            }
        }
    }
    Some(Kernel {
        weight: bytes,
        kb,
        input_scales,
        dots,
        lanes,
        lane_scales,
        width,
        signed,
        minus,
        nibbles,
        rows,
    })
}

/// The bytes of Q8_0 blocks (34 each, no padding: checked by the caller).
fn as_bytes(blocks: &[BlockQ8_0]) -> &[u8] {
    // SAFETY: `BlockQ8_0` is `repr(C)` { f16, [i8; 32] } with no padding (its size, 34, is
    // checked before any is made), so its memory is initialised bytes; the view borrows
    // `blocks`.
    unsafe {
        std::slice::from_raw_parts(blocks.as_ptr().cast::<u8>(), std::mem::size_of_val(blocks))
    }
}

/// The bytes of Q8_0 blocks, to write (34 each, no padding: checked by the caller).
fn as_bytes_mut(blocks: &mut [BlockQ8_0]) -> &mut [u8] {
    // SAFETY: as `as_bytes`, and any bytes are a valid `BlockQ8_0` (an f16 and i8s); the
    // view borrows `blocks` mutably.
    unsafe {
        std::slice::from_raw_parts_mut(
            blocks.as_mut_ptr().cast::<u8>(),
            std::mem::size_of_val(blocks),
        )
    }
}

/// The 32 bytes of the 32 floats `$v` (four registers) times `$scale`, each rounded half away
/// from zero as `f32::round`, clamped to -128..127 and converted as `as i8` (NaN to 0): the
/// truncation, plus the sign where the dropped fraction (exact) is at least one half. Unsafe:
/// the CPU has AVX2; `$sign`, `$half` and `$one` are -0.0, 0.5 and 1.0 in every lane.
macro_rules! bytes_of {
    ($v:expr, $scale:expr, $sign:expr, $half:expr, $one:expr) => {{
        let q: [__m256i; 4] = std::array::from_fn(|c| {
            let y = _mm256_mul_ps($scale, $v[c]);
            let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
            let frac = _mm256_andnot_ps($sign, _mm256_sub_ps(y, t));
            let up = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(frac, $half), $one);
            let r = _mm256_add_ps(t, _mm256_or_ps(up, _mm256_and_ps(y, $sign)));
            let r = _mm256_and_ps(r, _mm256_cmp_ps::<_CMP_ORD_Q>(y, y));
            let r = _mm256_min_ps(
                _mm256_max_ps(r, _mm256_set1_ps(-128.0)),
                _mm256_set1_ps(127.0),
            );
            _mm256_cvttps_epi32(r)
        });
        // i32 -> i16 -> i8 with saturation, then the lanes back in order.
        let w = _mm256_packs_epi32(q[0], q[1]);
        let z = _mm256_packs_epi32(q[2], q[3]);
        let bytes = _mm256_packs_epi16(w, z);
        _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
    }};
}

/// candle's `BlockQ8_0::from_float`, eight floats at a time with AVX2 (the caller checked
/// the CPU has it): per block of 32, the largest magnitude over 127 as the scale (its f16
/// stored), each value times the scale's inverse rounded half away from zero, as
/// `f32::round`. candle runs a scalar loop with a call of `roundf` per value: at 16 rows
/// the input's quantization was 4% of a decode step, on one thread. The same bytes (a unit
/// test compares them).
pub(super) fn quantize_q8_0(xs: &[f32], ys: &mut [BlockQ8_0]) {
    if std::mem::size_of::<BlockQ8_0>() != Q8_0_BYTES || xs.len() != 32 * ys.len() {
        BlockQ8_0::from_float(xs, ys);
        return;
    }
    // SAFETY: `kernel` runs only where `available` (AVX2, FMA, F16C); 32 floats per block.
    unsafe { quantize_q8_0_avx2(xs, as_bytes_mut(ys)) }
}

/// [`quantize_q8_0`]'s body.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `out` is 34 bytes per 32 floats of `xs`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_q8_0_avx2(xs: &[f32], out: &mut [u8]) {
    let sign = _mm256_set1_ps(-0.0);
    let half = _mm256_set1_ps(0.5);
    let one = _mm256_set1_ps(1.0);
    for (x, b) in xs.chunks_exact(32).zip(out.chunks_exact_mut(Q8_0_BYTES)) {
        // SAFETY: 32 floats.
        let v: [__m256; 4] =
            std::array::from_fn(|c| unsafe { _mm256_loadu_ps(x.as_ptr().add(8 * c)) });
        // `f32::max` skips a NaN; `max_ps` returns its second operand when either is one.
        let mut m = _mm256_setzero_ps();
        for vc in v {
            m = _mm256_max_ps(_mm256_andnot_ps(sign, vc), m);
        }
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(_mm_movehl_ps(m, m), m);
        let amax = _mm_cvtss_f32(_mm_max_ss(_mm_movehdup_ps(m), m));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b[..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
        let bytes = bytes_of!(v, _mm256_set1_ps(id), sign, half, one);
        // SAFETY: bytes 2..34 of the block.
        unsafe { _mm256_storeu_si256(b.as_mut_ptr().add(2).cast(), bytes) };
    }
}

/// candle's `BlockQ8K::from_float` with AVX2 (the caller checked the CPU has it): per block of
/// 256, the first value of the largest magnitude (`max`), `-127 / max` as the inverse scale,
/// each value times it rounded half away from zero and clamped, `1 / (-127 / max)` as the
/// scale, and the sums of each 16 bytes. candle runs a scalar loop with a call of `roundf` per
/// value: for a Q4_K prompt chunk that took a third of the time of its products. The same
/// bytes (a unit test compares them).
pub(super) fn quantize_q8k(xs: &[f32], ys: &mut [BlockQ8K]) {
    if std::mem::size_of::<BlockQ8K>() != Q8K_BYTES || xs.len() != 256 * ys.len() {
        BlockQ8K::from_float(xs, ys);
        return;
    }
    // SAFETY: `BlockQ8K` is `repr(C)` { f32, [i8; 256], [i16; 16] } with no padding (its size,
    // 292, is checked above), and any bytes are a valid one; the view borrows `ys` mutably.
    let out = unsafe {
        std::slice::from_raw_parts_mut(ys.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(ys))
    };
    // SAFETY: the kernels run only where `available` (AVX2, FMA, F16C); 256 floats per block.
    unsafe { quantize_q8k_avx2(xs, out) }
}

/// [`quantize_q8k`]'s body.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `out` is 292 bytes per 256 floats of `xs`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_q8k_avx2(xs: &[f32], out: &mut [u8]) {
    let sign = _mm256_set1_ps(-0.0);
    let half = _mm256_set1_ps(0.5);
    let one = _mm256_set1_ps(1.0);
    let zero = _mm256_setzero_si256();
    for (x, b) in xs.chunks_exact(256).zip(out.chunks_exact_mut(Q8K_BYTES)) {
        // SAFETY (all loads below): 256 floats.
        let at = |c: usize| unsafe { _mm256_loadu_ps(x.as_ptr().add(8 * c)) };
        // The largest magnitude (NaNs skipped, as `amax < x.abs()` skips them).
        let mut m = _mm256_setzero_ps();
        for c in 0..32 {
            m = _mm256_max_ps(_mm256_andnot_ps(sign, at(c)), m);
        }
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(_mm_movehl_ps(m, m), m);
        let amax = _mm_cvtss_f32(_mm_max_ss(_mm_movehdup_ps(m), m));
        if amax == 0.0 {
            b.fill(0);
            continue;
        }
        // The first value of that magnitude.
        let wanted = _mm256_set1_ps(amax);
        let mut max = amax;
        for c in 0..32 {
            let hit = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(
                _mm256_andnot_ps(sign, at(c)),
                wanted,
            ));
            if hit != 0 {
                max = x[8 * c + hit.trailing_zeros() as usize];
                break;
            }
        }
        let iscale = -127f32 / max;
        let scale = _mm256_set1_ps(iscale);
        for part in 0..8 {
            let v: [__m256; 4] = std::array::from_fn(|c| at(4 * part + c));
            let bytes = bytes_of!(v, scale, sign, half, one);
            // SAFETY: bytes `4 + 32 part..` of the block's 256.
            unsafe { _mm256_storeu_si256(b.as_mut_ptr().add(4 + 32 * part).cast(), bytes) };
            // The two sums of 16: the bytes biased to unsigned, summed by eights, less 8 * 128.
            let eights = _mm256_sad_epu8(_mm256_xor_si256(bytes, _mm256_set1_epi8(-128)), zero);
            let mut sums = [0i64; 4];
            // SAFETY: four i64.
            unsafe { _mm256_storeu_si256(sums.as_mut_ptr().cast(), eights) };
            for (h, pair) in sums.chunks_exact(2).enumerate() {
                let sum = (pair[0] + pair[1] - 16 * 128) as i16;
                let at = Q8K_SUMS + 2 * (2 * part + h);
                b[at..at + 2].copy_from_slice(&sum.to_le_bytes());
            }
        }
        b[..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
    }
}

impl BandKernel for Kernel<'_> {
    /// Q4_0: runs of up to four input rows (two without AVX-512) against each group of eight
    /// weight rows ([`group_rows`] and the others). Q8_0: up to [`row_form_most`] input rows
    /// at once the same way, more with the input rows in the lanes, 8 or 16 to a register
    /// ([`q8x8_lanes`], [`q8x8_lanes_vex`] four weight rows a pass, [`q8x8_lanes16`],
    /// [`q8x8_lanes_avx2`]). Every form sums each block exactly and adds the sums alike, so a
    /// row gets the same bits alone, in any batch and on every instruction set.
    fn run(&self, first: usize, out: &mut [f32]) {
        let feats = out.len() / self.rows.max(1);
        let (width, kb) = (self.width, self.kb);
        if self.nibbles {
            // A few input rows at a time (what the registers hold: sixteen without
            // AVX-512).
            let most = if self.dots == Dots::Evex { 4 } else { 2 };
            let group_bytes = kb * Q4X8_BYTES;
            over_groups(
                self.weight,
                group_bytes,
                first,
                self.rows,
                most,
                out,
                |group, r, take, buf| {
                    let input = |d: usize| RowInput {
                        q: &self.signed[32 * kb * (r + d)..32 * kb * (r + d + 1)],
                        minus: &self.minus[kb * (r + d)..kb * (r + d + 1)],
                        scales: &self.input_scales[kb * (r + d)..kb * (r + d + 1)],
                    };
                    macro_rules! call {
                        ($f:ident, $n:literal) => {
                            buf[..$n].copy_from_slice(&$f::<$n, true>(
                                kb,
                                group,
                                std::array::from_fn(input),
                            ))
                        };
                    }
                    // SAFETY: the CPU has AVX2, FMA and F16C (`available`), AVX-512 VNNI and
                    // VL at `Dots::Evex` (`Isa::vnni`), AVX-VNNI at `Dots::Vex`
                    // (`Isa::avx_vnni`); `group` is `kb` interleaved Q4_0 blocks of eight rows,
                    // and `signed` holds `32 kb` bytes and `minus` and `input_scales` `kb`
                    // values a row.
                    unsafe {
                        by_runs!(
                            self.dots,
                            take,
                            call,
                            group_rows,
                            group_rows_vex,
                            group_rows_avx2
                        )
                    }
                },
            );
            return;
        }
        let group_bytes = kb * Q8X8_BYTES;
        let mut i = 0;
        while i < feats {
            let at = (first + i) / 8 * group_bytes;
            let Some(group) = self.weight.get(at..at + group_bytes) else {
                return;
            };
            let here = (feats - i).min(8);
            if width == 1 {
                let input = |r: usize| RowInput {
                    q: &self.signed[32 * kb * r..32 * kb * (r + 1)],
                    // (Empty without `vpdpbusd`: the AVX2 form does not read it.)
                    minus: self.minus.get(kb * r..kb * (r + 1)).unwrap_or(&[]),
                    scales: &self.input_scales[kb * r..kb * (r + 1)],
                };
                let mut put = |dots: &[[f32; 8]]| {
                    for (r, d) in dots.iter().enumerate() {
                        for (j, v) in d.iter().enumerate().take(here) {
                            out[(i + j) * self.rows + r] = *v;
                        }
                    }
                };
                macro_rules! call {
                    ($f:ident, $n:literal) => {
                        put(&$f::<$n, false>(kb, group, std::array::from_fn(input)))
                    };
                }
                // SAFETY: the CPU has AVX2, FMA and F16C (`available`), AVX-512 VNNI and VL
                // at `Dots::Evex` (`Isa::vnni`), AVX-VNNI at `Dots::Vex` (`Isa::avx_vnni`);
                // `group` is `kb` interleaved blocks of eight rows, `signed` holds `32 kb`
                // bytes and `minus` and `input_scales` `kb` values a row, for 1 to
                // `row_form_most` rows.
                unsafe {
                    match (self.dots, self.rows) {
                        (Dots::Evex, 1) => call!(group_rows, 1),
                        (Dots::Evex, 2) => call!(group_rows, 2),
                        (Dots::Evex, 3) => call!(group_rows, 3),
                        (Dots::Evex, _) => call!(group_rows, 4),
                        (Dots::Vex, 1) => call!(group_rows_vex, 1),
                        (Dots::Vex, 2) => call!(group_rows_vex, 2),
                        (Dots::Vex, 3) => call!(group_rows_vex, 3),
                        (Dots::Vex, _) => call!(group_rows_vex, 4),
                        (Dots::Avx2, 1) => call!(group_rows_avx2, 1),
                        (Dots::Avx2, 2) => call!(group_rows_avx2, 2),
                        (Dots::Avx2, 3) => call!(group_rows_avx2, 3),
                        (Dots::Avx2, 4) => call!(group_rows_avx2, 4),
                        (Dots::Avx2, _) => call!(group_rows_avx2, 5),
                    }
                }
                i += 8;
                continue;
            }
            // 32 bytes a block and lane with `vpdpbusd`; without, 64 (i16).
            let lane_group = if self.dots == Dots::Avx2 {
                512 * kb
            } else {
                32 * width * kb
            };
            let groups = self.lanes.len() / lane_group;
            let lanes = |gi: usize| Lanes {
                q: &self.lanes[lane_group * gi..lane_group * (gi + 1)],
                scales: &self.lane_scales[width * kb * gi..width * kb * (gi + 1)],
            };
            let mut put = |gi: usize, from: usize, dots: &[[f32; 16]]| {
                let rows_here = (self.rows - width * gi).min(width);
                for (j, d) in dots.iter().enumerate() {
                    if from + j >= here {
                        break;
                    }
                    let at = (i + from + j) * self.rows + width * gi;
                    out[at..at + rows_here].copy_from_slice(&d[..rows_here]);
                }
            };
            let mut gi = 0;
            while gi < groups {
                // (Without VNNI, one group of 8 input rows against the eight rows: two groups
                // sharing each broadcast, four rows a pass, measured slower here.)
                // SAFETY: as above; `lanes` holds `lane_group` bytes and `lane_scales`
                // `width kb` scales a group (width 16 only at `Dots::Evex`).
                unsafe {
                    match (self.dots, width) {
                        (Dots::Evex, 16) => put(gi, 0, &q8x8_lanes16::<8>(kb, group, 0, lanes(gi))),
                        (Dots::Evex, _) => put(gi, 0, &q8x8_lanes::<8>(kb, group, 0, lanes(gi))),
                        (Dots::Vex, _) => {
                            put(gi, 0, &q8x8_lanes_vex::<4>(kb, group, 0, lanes(gi)));
                            put(gi, 4, &q8x8_lanes_vex::<4>(kb, group, 4, lanes(gi)));
                        }
                        (Dots::Avx2, _) => {
                            let [a] = q8x8_lanes_avx2::<8, 1, 0>(kb, group, [lanes(gi)]);
                            put(gi, 0, &a);
                        }
                    }
                }
                gi += 1;
            }
            i += 8;
        }
    }
}

/// Runs `dots` over a band of weight rows interleaved by eight, from `first` (a group's
/// start; groups of `group_bytes`), against `rows` input rows, up to `most` at a time:
/// `dots(group, r, take, buf)` fills `buf[..take]` with input rows `r..r + take`' dots with
/// the group's eight rows, which go to `out` (feature-major, `rows` values per weight row).
/// Each group stays in the nearest cache across its runs of input rows.
fn over_groups(
    weight: &[u8],
    group_bytes: usize,
    first: usize,
    rows: usize,
    most: usize,
    out: &mut [f32],
    mut dots: impl FnMut(&[u8], usize, usize, &mut [[f32; 8]; 4]),
) {
    let feats = out.len() / rows.max(1);
    let mut buf = [[0f32; 8]; 4];
    let mut i = 0;
    while i < feats {
        let at = (first + i) / 8 * group_bytes;
        let Some(group) = weight.get(at..at + group_bytes) else {
            return;
        };
        let here = (feats - i).min(8);
        let mut r = 0;
        while r < rows {
            let take = (rows - r).min(most).min(4);
            dots(group, r, take, &mut buf);
            for (dr, d) in buf.iter().enumerate().take(take) {
                for (j, v) in d.iter().enumerate().take(here) {
                    out[(i + j) * rows + r + dr] = *v;
                }
            }
            r += take;
        }
        i += 8;
    }
}

/// `-128` times the sums of each of the eight interleaved rows' block at `at` (row `m` in
/// lane `m`), with `$dpbusd`: what the biased input (`x + 128`) adds to their products.
/// Unsafe: the CPU has `$dpbusd`; [`Q8X8_BYTES`] bytes are readable at `$at`.
macro_rules! group_starts {
    ($at:expr, $dpbusd:ident) => {{
        let bias = _mm256_set1_epi8(-128);
        let zero = _mm256_setzero_si256();
        let (mut t0, mut t1) = (zero, zero);
        for g in (0..8).step_by(2) {
            t0 = $dpbusd(t0, bias, _mm256_loadu_si256($at.add(16 + 32 * g).cast()));
            t1 = $dpbusd(t1, bias, _mm256_loadu_si256($at.add(48 + 32 * g).cast()));
        }
        let mut starts = [0i32; 8];
        _mm256_storeu_si256(
            starts.as_mut_ptr().cast(),
            _mm256_sub_epi32(zero, _mm256_add_epi32(t0, t1)),
        );
        starts
    }};
}

/// How far ahead the interleaved forms prefetch, in blocks of a group (a group's blocks
/// are one run of memory).
const Q8X8_AHEAD: usize = 4;

/// Asks for the interleaved block [`Q8X8_AHEAD`] blocks (of `$bytes`) after the one at
/// `$at`: the hardware's prefetcher alone left the 16-row form 12% slower than candle's
/// layout, whose forms prefetch their four rows. With one input row (`$one_row`) the form
/// is bound by memory and asks for L2 only: on a 2-core EPYC (Zen 4), one row against
/// weights from memory read Q4_K 1.07x faster (median of 10 paired runs) and Q8_0 1.02x,
/// where several input rows, bound by arithmetic, want the lines in L1 (with L2 hints 16
/// rows of Q8_0 read 0.76-0.85x as fast, 4 rows 0.6-0.85x).
macro_rules! prefetch_blocks_ahead {
    ($at:expr, $bytes:expr, $one_row:expr) => {
        let ahead = $at.wrapping_add(Q8X8_AHEAD * $bytes);
        for line in 0..$bytes.div_ceil(64) {
            let line = ahead.wrapping_add(64 * line);
            if $one_row {
                crate::kernels::prefetch_line_to_l2(line);
            } else {
                crate::kernels::prefetch_line(line);
            }
        }
    };
}

/// Makes, with `$features` and `$dpbusd`, `$lanes`: `P` of a group's eight interleaved
/// Q8_0 rows ([`super::interleave`]) from `lane0` dotted with up to 8 input rows in the
/// lanes ([`Lanes`], `W` = 8): per block and weight row, its four bytes broadcast and one
/// `$dpbusd` per four bytes of the input rows (biased, `x + 128`; the lanes starting from
/// -128 times the weights' sums), each block's 32 products summed exactly, converted, and
/// added by one multiply-add with the product of the scales: the rows forms' bits.
macro_rules! interleaved_forms {
    ($features:literal, $dpbusd:ident, $lanes:ident) => {
        /// See `interleaved_forms`.
        ///
        /// # Safety
        /// The CPU has `$features`; `group` is `kb` interleaved blocks of eight rows,
        /// `lane0 + P <= 8`, `x.q` holds `256 kb` bytes and `x.scales` `8 kb` floats.
        #[target_feature(enable = $features)]
        unsafe fn $lanes<const P: usize>(
            kb: usize,
            group: &[u8],
            lane0: usize,
            x: Lanes,
        ) -> [[f32; 16]; P] {
            let mut acc = [_mm256_setzero_ps(); P];
            let base = group.as_ptr();
            for b in 0..kb {
                // SAFETY (all pointer arithmetic below): block `b < kb` of the group;
                // input block `b` is 256 bytes of `x.q` and 8 floats of `x.scales`.
                let at = unsafe { base.add(Q8X8_BYTES * b) };
                prefetch_blocks_ahead!(at, Q8X8_BYTES, false);
                let starts = unsafe { group_starts!(at, $dpbusd) };
                let mut ws = [0f32; 8];
                unsafe {
                    _mm256_storeu_ps(ws.as_mut_ptr(), _mm256_cvtph_ps(_mm_loadu_si128(at.cast())))
                };
                let xb = unsafe { x.q.as_ptr().add(256 * b) };
                let mut xv = [_mm256_setzero_si256(); 8];
                for (g, v) in xv.iter_mut().enumerate() {
                    *v = unsafe { _mm256_loadu_si256(xb.add(32 * g).cast()) };
                }
                let xs = unsafe { _mm256_loadu_ps(x.scales.as_ptr().add(8 * b)) };
                for (p, acc) in acc.iter_mut().enumerate() {
                    let m = lane0 + p;
                    let mut sum = _mm256_set1_epi32(starts[m]);
                    for (g, xg) in xv.iter().enumerate() {
                        let four = unsafe {
                            std::ptr::read_unaligned(at.add(16 + 32 * g + 4 * m).cast::<i32>())
                        };
                        sum = $dpbusd(sum, *xg, _mm256_set1_epi32(four));
                    }
                    let d = _mm256_mul_ps(_mm256_set1_ps(ws[m]), xs);
                    *acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sum), *acc);
                }
            }
            let mut dots = [[0f32; 16]; P];
            for (d, a) in dots.iter_mut().zip(&acc) {
                // SAFETY: eight floats.
                unsafe { _mm256_storeu_ps(d.as_mut_ptr(), *a) };
            }
            dots
        }
    };
}

interleaved_forms!(
    "avx512f,avx512vnni,avx512vl,avx2,fma,f16c",
    _mm256_dpbusd_epi32,
    q8x8_lanes
);
interleaved_forms!(
    "avxvnni,avx2,fma,f16c",
    _mm256_dpbusd_avx_epi32,
    q8x8_lanes_vex
);

/// `$acc` plus, in each 32-bit lane, the four products of the unsigned bytes `$u` and the
/// signed bytes `$s`: one `$dpbusd` (`$vnni`), else `maddubs` and `madd` (the pairs must
/// not saturate i16). Unsafe: the CPU has `$dpbusd`, or AVX2.
macro_rules! byte_dot {
    ($vnni:literal, $dpbusd:ident, $acc:expr, $u:expr, $s:expr) => {
        if $vnni {
            $dpbusd($acc, $u, $s)
        } else {
            let pairs = _mm256_maddubs_epi16($u, $s);
            _mm256_add_epi32($acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
        }
    };
}

/// Makes `$name`, with `$features`: a group's eight interleaved weight rows
/// ([`super::interleave`], one row per lane) dotted with `R` input rows, Q8_0 or
/// (`NIBBLES`) Q4_0. Per four bytes of a block, one load of the eight rows' bytes, made
/// once for the `R` rows into the unsigned operand, and per input row its four bytes
/// broadcast and one `$dpbusd` (`$vnni`), else `maddubs` and `madd`:
///
/// * Q8_0 with `vpdpbusd`: the weights biased (`w + 128`), each block's lanes starting from
///   `-128` times its input bytes' sum; with AVX2 alone `|w|`, and the input bytes take
///   `w`'s signs (at most `2 * 128 * 127` a pair).
/// * Q4_0: the load's low nibbles are weights `4g..4g + 4` and its high nibbles
///   `16 + 4g..16 + 4g + 4`, each as stored (`w + 8`, at most `2 * 15 * 128` a pair), each
///   block's lanes starting from `-8` times its input bytes' sum.
///
/// Each block's 32 products are summed exactly, row `m` in lane `m`, converted, and added by
/// one multiply-add with the product of the scales: a row gets the same bits alone, in any
/// batch and on every instruction set. Where candle's layout needs eight rows' blocks
/// transposed (24 shuffles a block) or each row's lanes summed across, these bytes are in
/// place.
///
/// # Safety
/// The CPU has `$features`; `group` is `kb` interleaved blocks of eight rows of the
/// format, each `x[r].q` `32 kb` bytes, its `scales` `kb` values and, but for Q8_0 without
/// `$vnni`, its `minus` `kb` values.
macro_rules! group_rows_form {
    ($name:ident, $features:literal, $vnni:literal, $dpbusd:ident) => {
        // `r` indexes several arrays of accumulators at once.
        #[allow(clippy::needless_range_loop)]
        #[target_feature(enable = $features)]
        unsafe fn $name<const R: usize, const NIBBLES: bool>(
            kb: usize,
            group: &[u8],
            x: [RowInput; R],
        ) -> [[f32; 8]; R] {
            let flip = _mm256_set1_epi8(-128);
            let low = _mm256_set1_epi8(0x0F);
            let zero = _mm256_setzero_si256();
            let bytes = if NIBBLES { Q4X8_BYTES } else { Q8X8_BYTES };
            let mut acc = [_mm256_setzero_ps(); R];
            let base = group.as_ptr();
            for b in 0..kb {
                // SAFETY (all pointer arithmetic below): block `b < kb` of the group is
                // `bytes` bytes from `bytes b`; input block `b` is 32 bytes of `x[r].q`.
                let at = unsafe { base.add(bytes * b) };
                prefetch_blocks_ahead!(at, bytes, R == 1);
                let ws = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(at.cast()) });
                // Two chains of sums per row, so that one waits less on the other.
                let mut even = [zero; R];
                let mut odd = [zero; R];
                if NIBBLES || $vnni {
                    for r in 0..R {
                        even[r] = _mm256_set1_epi32(x[r].minus[b]);
                    }
                }
                for g in 0..(if NIBBLES { 4 } else { 8 }) {
                    let raw = unsafe { _mm256_loadu_si256(at.add(16 + 32 * g).cast()) };
                    // The unsigned operands: Q4_0's two halves; Q8_0's biased weights or
                    // magnitudes (and, without VNNI, the signs the input takes).
                    let (first, second) = if NIBBLES {
                        let high = _mm256_srli_epi16(raw, 4);
                        (_mm256_and_si256(raw, low), _mm256_and_si256(high, low))
                    } else if $vnni {
                        (_mm256_xor_si256(raw, flip), raw)
                    } else {
                        (_mm256_sign_epi8(raw, raw), raw)
                    };
                    for r in 0..R {
                        let xq = unsafe { x[r].q.as_ptr().add(32 * b + 4 * g) };
                        let four = _mm256_set1_epi32(unsafe {
                            std::ptr::read_unaligned(xq.cast::<i32>())
                        });
                        if NIBBLES {
                            let upper = _mm256_set1_epi32(unsafe {
                                std::ptr::read_unaligned(xq.add(16).cast::<i32>())
                            });
                            even[r] = byte_dot!($vnni, $dpbusd, even[r], first, four);
                            odd[r] = byte_dot!($vnni, $dpbusd, odd[r], second, upper);
                        } else {
                            let four = if $vnni {
                                four
                            } else {
                                _mm256_sign_epi8(four, second)
                            };
                            if g % 2 == 0 {
                                even[r] = byte_dot!($vnni, $dpbusd, even[r], first, four);
                            } else {
                                odd[r] = byte_dot!($vnni, $dpbusd, odd[r], first, four);
                            }
                        }
                    }
                }
                for r in 0..R {
                    let sum = _mm256_add_epi32(even[r], odd[r]);
                    let d = _mm256_mul_ps(ws, _mm256_set1_ps(x[r].scales[b]));
                    acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sum), acc[r]);
                }
            }
            let mut dots = [[0f32; 8]; R];
            for (d, a) in dots.iter_mut().zip(&acc) {
                // SAFETY: eight floats.
                unsafe { _mm256_storeu_ps(d.as_mut_ptr(), *a) };
            }
            dots
        }
    };
}

group_rows_form!(
    group_rows,
    "avx512f,avx512vnni,avx512vl,avx2,fma,f16c",
    true,
    _mm256_dpbusd_epi32
);
group_rows_form!(
    group_rows_vex,
    "avxvnni,avx2,fma,f16c",
    true,
    _mm256_dpbusd_avx_epi32
);
// (The AVX2 form never takes its `$dpbusd`: `$vnni` is false.)
group_rows_form!(
    group_rows_avx2,
    "avx2,fma,f16c",
    false,
    _mm256_dpbusd_avx_epi32
);

/// `interleaved_forms`' lanes form on 512-bit registers: a group's eight rows dotted with
/// up to 16 input rows in the lanes ([`Lanes`], `W` = 16).
///
/// # Safety
/// The CPU has AVX-512F, AVX-512 VNNI and VL, AVX2, FMA and F16C; `group` is `kb`
/// interleaved blocks of eight rows, `x.q` holds `512 kb` bytes and `x.scales` `16 kb`
/// floats.
#[target_feature(enable = "avx512f,avx512vnni,avx512vl,avx2,fma,f16c")]
unsafe fn q8x8_lanes16<const P: usize>(
    kb: usize,
    group: &[u8],
    lane0: usize,
    x: Lanes,
) -> [[f32; 16]; P] {
    let mut acc = [_mm512_setzero_ps(); P];
    let base = group.as_ptr();
    for b in 0..kb {
        // SAFETY (all pointer arithmetic below): block `b < kb` of the group; input block
        // `b` is 512 bytes of `x.q` and 16 floats of `x.scales`.
        let at = unsafe { base.add(Q8X8_BYTES * b) };
        prefetch_blocks_ahead!(at, Q8X8_BYTES, false);
        let starts = unsafe { group_starts!(at, _mm256_dpbusd_epi32) };
        // Broadcast from memory (a load), not from the register the sums are in (two
        // shuffles each, on the ports the products need).
        let starts = std::hint::black_box(starts);
        let mut ws = [0f32; 8];
        unsafe { _mm256_storeu_ps(ws.as_mut_ptr(), _mm256_cvtph_ps(_mm_loadu_si128(at.cast()))) };
        let xb = unsafe { x.q.as_ptr().add(512 * b) };
        let mut xv = [_mm512_setzero_si512(); 8];
        for (g, v) in xv.iter_mut().enumerate() {
            *v = unsafe { _mm512_loadu_si512(xb.add(64 * g).cast()) };
        }
        let xs = unsafe { _mm512_loadu_ps(x.scales.as_ptr().add(16 * b)) };
        for (p, acc) in acc.iter_mut().enumerate() {
            let m = lane0 + p;
            let mut sum = _mm512_set1_epi32(starts[m]);
            for (g, xg) in xv.iter().enumerate() {
                let four =
                    unsafe { std::ptr::read_unaligned(at.add(16 + 32 * g + 4 * m).cast::<i32>()) };
                sum = _mm512_dpbusd_epi32(sum, *xg, _mm512_set1_epi32(four));
            }
            let d = _mm512_mul_ps(_mm512_set1_ps(ws[m]), xs);
            *acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sum), *acc);
        }
    }
    let mut dots = [[0f32; 16]; P];
    for (d, a) in dots.iter_mut().zip(&acc) {
        // SAFETY: sixteen floats.
        unsafe { _mm512_storeu_ps(d.as_mut_ptr(), *a) };
    }
    dots
}

/// The lanes form with AVX2 alone: `P` of a group's rows from `L` dotted with `G` groups of
/// up to 8 input rows in the lanes as i16 pairs ([`Lanes`]), one `madd` and one add per
/// pair of bytes; each block's rows widened to i16 pairs a four rows' conversion at a time
/// (their bytes `4g..4g + 4` are side by side). The rows forms' bits. Taken as all eight
/// rows against one group (two groups of four rows sharing each broadcast, as the form over
/// candle's layout did, measured 0.82x of that).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `group` is `kb` interleaved blocks of eight rows,
/// `L + P <= 8`, each `x.q` holds `512 kb` bytes and `x.scales` `8 kb` floats.
// `g`, `q` and `gg` index groups, rows and input groups of several arrays at once.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8x8_lanes_avx2<const P: usize, const G: usize, const L: usize>(
    kb: usize,
    group: &[u8],
    x: [Lanes; G],
) -> [[[f32; 16]; P]; G] {
    let lane0 = L;
    let mut acc = [[_mm256_setzero_ps(); P]; G];
    let base = group.as_ptr();
    for b in 0..kb {
        // SAFETY (all pointer arithmetic below): block `b < kb` of the group; input block
        // `b` is 512 bytes of `x[gg].q` and 8 floats of `x[gg].scales`.
        let at = unsafe { base.add(Q8X8_BYTES * b) };
        // (The group's second pass reads what the first brought.)
        if lane0 == 0 {
            prefetch_blocks_ahead!(at, Q8X8_BYTES, false);
        }
        let mut ws = [0f32; 8];
        unsafe { _mm256_storeu_ps(ws.as_mut_ptr(), _mm256_cvtph_ps(_mm_loadu_si128(at.cast()))) };
        let ws = std::hint::black_box(ws);
        // wide[g][2m + h]: row m's pair h of its bytes 4g..4g + 4, as two i16 (the rows
        // of this pass only).
        let mut wide = [[0i32; 16]; 8];
        for (g, pairs) in wide.iter_mut().enumerate() {
            for half in (lane0 / 4)..(lane0 + P).div_ceil(4) {
                let four_rows = unsafe { _mm_loadu_si128(at.add(16 + 32 * g + 16 * half).cast()) };
                // SAFETY: eight i32.
                unsafe {
                    _mm256_storeu_si256(
                        pairs.as_mut_ptr().add(8 * half).cast(),
                        _mm256_cvtepi8_epi16(four_rows),
                    )
                };
            }
        }
        // Each pair is broadcast from memory (a load, no arithmetic): left in registers,
        // the compiler broadcast them with shuffles, on the port the products need.
        let wp: *const [[i32; 16]; 8] = std::hint::black_box(&wide);
        let mut sums = [[_mm256_setzero_si256(); P]; G];
        for p in 0..16 {
            let mut xv = [_mm256_setzero_si256(); G];
            for (gg, v) in xv.iter_mut().enumerate() {
                *v = unsafe { _mm256_loadu_si256(x[gg].q.as_ptr().add(512 * b + 32 * p).cast()) };
            }
            for q in 0..P {
                // SAFETY: `wp` points at `wide`, alive and unchanged.
                let pair = _mm256_set1_epi32(unsafe { (*wp)[p / 2][2 * (lane0 + q) + p % 2] });
                for gg in 0..G {
                    sums[gg][q] = _mm256_add_epi32(sums[gg][q], _mm256_madd_epi16(xv[gg], pair));
                }
            }
        }
        for gg in 0..G {
            let xs = unsafe { _mm256_loadu_ps(x[gg].scales.as_ptr().add(8 * b)) };
            for q in 0..P {
                let d = _mm256_mul_ps(_mm256_set1_ps(ws[lane0 + q]), xs);
                acc[gg][q] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sums[gg][q]), acc[gg][q]);
            }
        }
    }
    let mut dots = [[[0f32; 16]; P]; G];
    for (dg, ag) in dots.iter_mut().zip(&acc) {
        for (d, a) in dg.iter_mut().zip(ag) {
            // SAFETY: eight floats.
            unsafe { _mm256_storeu_ps(d.as_mut_ptr(), *a) };
        }
    }
    dots
}

/// Most Q8_0 input rows that take the rows form ([`group_rows`]): it spends eight
/// `vpdpbusd` per block and input row for eight weight rows, where the lanes forms spend
/// eight per weight row for up to 8 or 16 input rows at once; with AVX2 alone three
/// operations per four bytes against [`q8x8_lanes_avx2`]'s 32 per block for up to 8 rows
/// (measured on candle's layout, where at six rows the accumulators no longer fit the
/// sixteen registers).
fn row_form_most(dots: Dots) -> usize {
    match dots {
        Dots::Avx2 => 5,
        Dots::Vex | Dots::Evex => 4,
    }
}

/// The byte dot product an [`Isa`] gives the Q8_0 and Q4_0 kernels.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dots {
    /// AVX2 alone: `maddubs` and `madd`.
    Avx2,
    /// AVX-VNNI (AVX2 CPUs since Alder Lake): `vpdpbusd` on 256-bit registers, VEX
    /// encoded, sixteen registers.
    Vex,
    /// AVX-512 VNNI and VL: `vpdpbusd` on 256- and 512-bit registers, thirty-two of them.
    Evex,
}

impl Dots {
    fn of(isa: Isa) -> Dots {
        if isa.vnni() {
            Dots::Evex
        } else if isa.avx_vnni() {
            Dots::Vex
        } else {
            Dots::Avx2
        }
    }
}

/// One input row of Q8_0 blocks as [`group_rows`] reads it.
#[derive(Clone, Copy)]
struct RowInput<'a> {
    /// `kb` blocks of 32 signed bytes.
    q: &'a [u8],
    /// Per block, what the weights' bias adds to the products, taken back: `-128` times
    /// the sum of its bytes for Q8_0 with `vpdpbusd` (empty without), `-8` times for Q4_0.
    minus: &'a [i32],
    /// The blocks' scales.
    scales: &'a [f32],
}

/// Up to `W` (8 or 16) input rows of Q8_0 blocks as [`q8x8_lanes`] (`W` = 8) and
/// [`q8x8_lanes16`] read them, or up to 8 as [`q8x8_lanes_avx2`] does.
#[derive(Clone, Copy)]
struct Lanes<'a> {
    /// With `vpdpbusd`, `kb` blocks of `32 W` bytes: for each four bytes `g` of a block,
    /// the rows' bytes `4g..4g + 4` side by side (row `m` in 32-bit lane `m`), biased to
    /// the unsigned operand (`x + 128`). For [`q8x8_lanes_avx2`], `kb` blocks
    /// of 512 bytes: for each pair of bytes `p`, the rows' bytes `2p, 2p + 1` as two i16,
    /// side by side.
    q: &'a [u8],
    /// The rows' block scales, `W` per block.
    scales: &'a [f32],
}

/// `(bytes per block, weights per block)` of `format` where [`dequantize`] reads it on
/// `isa`.
pub(super) fn dequantizes(isa: Isa, format: GgmlDType) -> Option<(usize, usize)> {
    if !available(isa) {
        return None;
    }
    match format {
        GgmlDType::Q8_0 => Some((Q8_0_BYTES, 32)),
        GgmlDType::Q4_0 => Some((Q4_0_BYTES, 32)),
        GgmlDType::Q4K if std::mem::size_of::<BlockQ4K>() == Q4K_BYTES => Some((Q4K_BYTES, 256)),
        _ => None,
    }
}

/// The eight 6-bit scales, then the eight 6-bit mins, of a Q4_K block, one per byte, from
/// its 12 packed bytes: bytes 0-3 hold scales 0-3 and bytes 4-7 mins 0-3 in their low six
/// bits, and the top two bits of scales and mins 4-7 in their high two; bytes 8-11 hold the
/// low four bits of scales 4-7 (low halves) and of mins 4-7 (high halves).
#[inline]
fn scales_and_mins(packed: &[u8]) -> [u8; 16] {
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    let word = |i: usize| {
        u32::from_le_bytes([
            packed[4 * i],
            packed[4 * i + 1],
            packed[4 * i + 2],
            packed[4 * i + 3],
        ])
    };
    let (a, b, c) = (word(0), word(1), word(2));
    let parts = [
        a & LOW6,
        (c & LOW4) | (((a >> 6) & LOW2) << 4),
        b & LOW6,
        ((c >> 4) & LOW4) | (((b >> 6) & LOW2) << 4),
    ];
    let mut out = [0u8; 16];
    for (o, p) in out.chunks_exact_mut(4).zip(parts) {
        o.copy_from_slice(&p.to_le_bytes());
    }
    out
}

/// candle's `to_float` for Q8_0, Q4_0 or Q4_K blocks `bytes` into `out`, with the same
/// operations on each weight (an f32 product, and for Q4_K a difference), eight at a time.
///
/// # Safety
/// [`dequantizes`] gave `Some` for `format` on this CPU; `bytes` is whole blocks of it and
/// `out` holds their weights.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dequantize(format: GgmlDType, bytes: &[u8], out: &mut [f32]) {
    /// An f16's bits as f32 (exact).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn widen(lo: u8, hi: u8) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(
            u16::from_le_bytes([lo, hi]),
        ))))
    }
    /// The low eight bytes of `q` as f32, times `d`, less `m` when given.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn eight(q: __m128i, d: __m256, m: Option<__m256>, out: &mut [f32]) {
        let f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
        let y = _mm256_mul_ps(d, f);
        let y = match m {
            Some(m) => _mm256_sub_ps(y, m),
            None => y,
        };
        // SAFETY: the callers pass eight floats.
        unsafe { _mm256_storeu_ps(out[..8].as_mut_ptr(), y) };
    }
    let low = _mm_set1_epi8(0x0F);
    match format {
        GgmlDType::Q8_0 => {
            for (b, y) in bytes.chunks_exact(Q8_0_BYTES).zip(out.chunks_exact_mut(32)) {
                let d = _mm256_set1_ps(widen(b[0], b[1]));
                for (c, y) in y.chunks_exact_mut(8).enumerate() {
                    // SAFETY: bytes 2 + 8c .. 10 + 8c of the 34-byte block.
                    let q = unsafe { _mm_loadl_epi64(b.as_ptr().add(2 + 8 * c).cast()) };
                    eight(q, d, None, y);
                }
            }
        }
        GgmlDType::Q4_0 => {
            let eights = _mm_set1_epi8(8);
            for (b, y) in bytes.chunks_exact(Q4_0_BYTES).zip(out.chunks_exact_mut(32)) {
                let d = _mm256_set1_ps(widen(b[0], b[1]));
                // SAFETY: bytes 2..18 of the 18-byte block.
                let packed = unsafe { _mm_loadu_si128(b.as_ptr().add(2).cast()) };
                // The first 16 weights in the low halves, the last 16 in the high; each
                // less 8, as an i8.
                let lo = _mm_sub_epi8(_mm_and_si128(packed, low), eights);
                let hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(packed, 4), low), eights);
                let (y0, y1) = y.split_at_mut(16);
                for (q, y) in [(lo, y0), (hi, y1)] {
                    eight(q, d, None, &mut y[..8]);
                    eight(_mm_srli_si128(q, 8), d, None, &mut y[8..]);
                }
            }
        }
        GgmlDType::Q4K => {
            for (b, y) in bytes.chunks_exact(Q4K_BYTES).zip(out.chunks_exact_mut(256)) {
                let (d, dmin) = (widen(b[0], b[1]), widen(b[2], b[3]));
                let sm = scales_and_mins(&b[4..16]);
                for (j, y) in y.chunks_exact_mut(64).enumerate() {
                    // Sub-block 2j in the low halves of the 32 bytes, 2j + 1 in the high.
                    for (half, y) in y.chunks_exact_mut(32).enumerate() {
                        let s = 2 * j + half;
                        let dv = _mm256_set1_ps(d * f32::from(sm[s]));
                        let mv = _mm256_set1_ps(dmin * f32::from(sm[8 + s]));
                        for (c, y) in y.chunks_exact_mut(16).enumerate() {
                            let at = 16 + 32 * j + 16 * c;
                            // SAFETY: bytes `at..at + 16` of the 144-byte block.
                            let packed = unsafe { _mm_loadu_si128(b.as_ptr().add(at).cast()) };
                            let q = if half == 0 {
                                _mm_and_si128(packed, low)
                            } else {
                                _mm_and_si128(_mm_srli_epi16(packed, 4), low)
                            };
                            eight(q, dv, Some(mv), &mut y[..8]);
                            eight(_mm_srli_si128(q, 8), dv, Some(mv), &mut y[8..]);
                        }
                    }
                }
            }
        }
        _ => {}
    }
}

/// candle's Q8_0 `to_float` (each byte times its block's scale, in f32) for rows interleaved
/// by eight ([`super::interleave`]): each four bytes of two rows widened and scaled
/// at once, then stored to their rows.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `bytes` is whole groups of `kb` interleaved blocks and
/// `out` their eight rows of `32 kb` floats each.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dequantize_interleaved(bytes: &[u8], kb: usize, out: &mut [f32]) {
    let k = 32 * kb;
    for (group, ys) in bytes
        .chunks_exact(kb * Q8X8_BYTES)
        .zip(out.chunks_exact_mut(8 * k))
    {
        for b in 0..kb {
            // SAFETY (all pointer arithmetic below): block `b` of the group, its scales in
            // its first 16 bytes and its rows' bytes `4g..4g + 4` at `16 + 32g + 4m`; row
            // `m`'s floats `32b + 4g..32b + 4g + 4` of `ys`.
            let at = unsafe { group.as_ptr().add(Q8X8_BYTES * b) };
            let mut ws = [0f32; 8];
            unsafe {
                _mm256_storeu_ps(ws.as_mut_ptr(), _mm256_cvtph_ps(_mm_loadu_si128(at.cast())))
            };
            for pair in 0..4 {
                let (m, d) = (2 * pair, 2 * pair + 1);
                let scale = _mm256_set_m128(_mm_set1_ps(ws[d]), _mm_set1_ps(ws[m]));
                for g in 0..8 {
                    let q = unsafe { _mm_loadl_epi64(at.add(16 + 32 * g + 8 * pair).cast()) };
                    let y = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), scale);
                    let at_m = m * k + 32 * b + 4 * g;
                    let at_d = d * k + 32 * b + 4 * g;
                    unsafe {
                        _mm_storeu_ps(ys[at_m..at_m + 4].as_mut_ptr(), _mm256_castps256_ps128(y));
                        _mm_storeu_ps(
                            ys[at_d..at_d + 4].as_mut_ptr(),
                            _mm256_extractf128_ps::<1>(y),
                        );
                    }
                }
            }
        }
    }
}

/// Bytes of a Q4_K block: f16 `d`, f16 `dmin`, 12 bytes of packed 6-bit scales and mins for
/// its eight sub-blocks of 32, then 128 bytes of nibbles (sub-block `2j` in the low halves of
/// bytes `32j..32j + 32`, sub-block `2j + 1` in their high halves).
const Q4K_BYTES: usize = 144;
/// Bytes of a Q8_K block: f32 `d`, 256 i8, then 16 i16 sums of 16 of them.
const Q8K_BYTES: usize = 292;
/// Where a Q8_K block's i16 sums begin.
const Q8K_SUMS: usize = 260;

/// Q4_K weights, rows interleaved by eight ([`super::interleave`]), against a Q8_K input:
/// a group of eight rows at a time against a few input rows ([`q4k_group`] and the others).
/// The input's scales and sums per sub-block are made once per call.
pub(super) struct Q4kKernel<'a> {
    weight: &'a [u8],
    /// Blocks per row.
    kb: usize,
    /// The input rows as Q8_K blocks.
    input: Vec<BlockQ8K>,
    /// Each input block's scale.
    input_scales: Vec<f32>,
    /// Each input block's sums per sub-block of 32: its sums of 16 added in pairs, as i16
    /// (as candle's `hadd` pairs them; at most 32 * 128 in magnitude, so no wrapping).
    input_sums: Vec<[i16; 8]>,
    /// The byte dot product the forms use.
    dots: Dots,
    rows: usize,
}

/// The Q4_K kernel for `n` rows of width `k` stored as `bytes`, interleaved (rows padded to
/// a multiple of eight), with the input `x` (`rows` rows of `k`) quantized to Q8_K; `None`
/// if the CPU lacks the instructions, for candle's layout, or blocks that do not fit.
pub(super) fn q4k_kernel<'a>(
    isa: Isa,
    interleaved: bool,
    bytes: &'a [u8],
    n: usize,
    k: usize,
    x: &[f32],
    rows: usize,
) -> Option<Q4kKernel<'a>> {
    if !available(isa)
        || !interleaved
        || std::mem::size_of::<BlockQ4K>() != Q4K_BYTES
        || std::mem::size_of::<BlockQ8K>() != Q8K_BYTES
        || !k.is_multiple_of(256)
        || x.len() != rows * k
    {
        return None;
    }
    let kb = k / 256;
    if bytes.len() != n.next_multiple_of(8) * kb * Q4K_BYTES {
        return None;
    }
    let mut input = vec![BlockQ8K::zeros(); rows * kb];
    for (xr, qr) in x.chunks_exact(k).zip(input.chunks_exact_mut(kb)) {
        quantize_q8k(xr, qr);
    }
    let blocks = q8k_bytes(&input);
    let input_scales = blocks
        .chunks_exact(Q8K_BYTES)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let input_sums = blocks
        .chunks_exact(Q8K_BYTES)
        .map(|b| {
            let sum = |i: usize| i16::from_le_bytes([b[Q8K_SUMS + 2 * i], b[Q8K_SUMS + 2 * i + 1]]);
            std::array::from_fn(|s| sum(2 * s).wrapping_add(sum(2 * s + 1)))
        })
        .collect();
    Some(Q4kKernel {
        weight: bytes,
        kb,
        input,
        input_scales,
        input_sums,
        dots: Dots::of(isa),
        rows,
    })
}

/// The bytes of Q8_K blocks (292 each, no padding: checked by the caller).
fn q8k_bytes(blocks: &[BlockQ8K]) -> &[u8] {
    // SAFETY: `BlockQ8K` is `repr(C)` { f32, [i8; 256], [i16; 16] } with no padding (its
    // size, 292, is checked before any is made), so its memory is initialised bytes; the
    // view borrows `blocks`.
    unsafe {
        std::slice::from_raw_parts(blocks.as_ptr().cast::<u8>(), std::mem::size_of_val(blocks))
    }
}

/// One input row as [`q4k_group`] reads it.
#[derive(Clone, Copy)]
struct Q8kRow<'a> {
    /// `kb` Q8_K blocks.
    q: &'a [u8],
    /// Their scales.
    d: &'a [f32],
    /// Their sums per sub-block of 32 (see [`Q4kKernel`]).
    sums: &'a [[i16; 8]],
}

impl BandKernel for Q4kKernel<'_> {
    /// A group of eight rows at a time (`first` and every band start at a group) against
    /// every input row, a few at a time ([`q4k_group`], [`q4k_group_vex`],
    /// [`q4k_group_avx2`]; the group stays in the nearest cache meanwhile).
    fn run(&self, first: usize, out: &mut [f32]) {
        let x = q8k_bytes(&self.input);
        let kb = self.kb;
        let x_row = kb * Q8K_BYTES;
        // What the registers hold: sixteen without AVX-512.
        let most = if self.dots == Dots::Evex { 4 } else { 2 };
        let group_bytes = kb * Q4KX8_BYTES;
        over_groups(
            self.weight,
            group_bytes,
            first,
            self.rows,
            most,
            out,
            |group, r, take, buf| {
                let input = |d: usize| Q8kRow {
                    q: &x[(r + d) * x_row..(r + d + 1) * x_row],
                    d: &self.input_scales[(r + d) * kb..(r + d + 1) * kb],
                    sums: &self.input_sums[(r + d) * kb..(r + d + 1) * kb],
                };
                macro_rules! call {
                    ($f:ident, $n:literal) => {
                        buf[..$n].copy_from_slice(&$f::<$n>(kb, group, std::array::from_fn(input)))
                    };
                }
                // SAFETY: the CPU has AVX2, FMA and F16C (`available`), AVX-512 VNNI and VL at
                // `Dots::Evex` (`Isa::vnni`), AVX-VNNI at `Dots::Vex` (`Isa::avx_vnni`);
                // `group` is `kb` interleaved Q4_K blocks of eight rows, and every input row
                // `kb` Q8_K blocks with `kb` scales and `kb` sums (lengths checked by
                // `q4k_kernel`).
                unsafe {
                    by_runs!(
                        self.dots,
                        take,
                        call,
                        q4k_group,
                        q4k_group_vex,
                        q4k_group_avx2
                    )
                }
            },
        );
    }
}

/// Makes `$name`, with `$features`: a group's eight interleaved Q4_K weight rows
/// ([`super::Q4KX8_BYTES`], one row per lane) dotted with `R` Q8_K input rows. Per four
/// bytes `g` of the nibbles, one load of the eight rows' bytes, split once for the `R` rows
/// into the low nibbles (sub-block `2j`, `j = g / 8`) and the high (sub-block `2j + 1`); per
/// input row and half its four bytes broadcast and one `$dpbusd` (`$vnni`), else `maddubs`
/// and `madd` (at most `2 * 15 * 128` a pair). Each sub-block's 32 products are summed
/// exactly, multiplied by its row's 6-bit scale (`vpmulld`) and added, its mins times the
/// input's sums per sub-block likewise (`madd` on pairs of them), and each block's two i32
/// totals converted and added by two multiply-adds, `d` and `-dmin` times the input's scale:
/// a row gets the same bits alone, in any batch and on every instruction set. candle's
/// order (eight f32 lanes a block) differs from it by float rounding.
///
/// # Safety
/// The CPU has `$features`; `group` is `kb` interleaved Q4_K blocks of eight rows, each
/// `x[r]` `kb` Q8_K blocks with `kb` scales and `kb` sums.
macro_rules! q4k_group_form {
    ($name:ident, $features:literal, $vnni:literal, $dpbusd:ident) => {
        // `r` indexes several arrays of accumulators at once.
        #[allow(clippy::needless_range_loop)]
        #[target_feature(enable = $features)]
        unsafe fn $name<const R: usize>(kb: usize, group: &[u8], x: [Q8kRow; R]) -> [[f32; 8]; R] {
            let low = _mm256_set1_epi8(0x0F);
            let zero = _mm256_setzero_si256();
            let (low6, low4, low2) = (
                _mm256_set1_epi8(0x3F),
                _mm256_set1_epi8(0x0F),
                _mm256_set1_epi8(0x03),
            );
            // Byte `t` of each 32-bit lane, zero-extended (`0x80`: a zero byte).
            let byte: [__m256i; 4] = std::array::from_fn(|t| {
                let lane = |l: i32| (0x8080_8000_u32 as i32) | (4 * l + t as i32);
                _mm256_setr_epi32(
                    lane(0),
                    lane(1),
                    lane(2),
                    lane(3),
                    lane(0),
                    lane(1),
                    lane(2),
                    lane(3),
                )
            });
            // Bytes `2q` and `2q + 1` of each 32-bit lane, as two i16.
            let pair: [__m256i; 2] = std::array::from_fn(|q| {
                let lane = |l: i32| {
                    let at = 4 * l + 2 * q as i32;
                    at | (0x80 << 8) | ((at + 1) << 16) | (0x80_u32 << 24) as i32
                };
                _mm256_setr_epi32(
                    lane(0),
                    lane(1),
                    lane(2),
                    lane(3),
                    lane(0),
                    lane(1),
                    lane(2),
                    lane(3),
                )
            });
            let mut acc = [_mm256_setzero_ps(); R];
            let base = group.as_ptr();
            for b in 0..kb {
                // SAFETY (all pointer arithmetic below): block `b < kb` of the group is
                // `Q4KX8_BYTES` bytes from `Q4KX8_BYTES b` (offsets as
                // `super::Q4KX8_BYTES` lays them out); input block `b` of each row is
                // `Q8K_BYTES` bytes, its 256 i8 from 4 on, and its scale and sums are
                // entry `b`.
                let at = unsafe { base.add(Q4KX8_BYTES * b) };
                prefetch_blocks_ahead!(at, Q4KX8_BYTES, R == 1);
                let wd = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(at.cast()) });
                let wm = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(at.add(16).cast()) });
                // The eight rows' 6-bit scales and mins, row `m` in lane `m` (ggml's
                // `get_scale_min_k4` on the three words of each): scales 0-3 and 4-7, mins
                // 0-3 and 4-7, a byte each.
                let word = |w: usize| unsafe { _mm256_loadu_si256(at.add(32 + 32 * w).cast()) };
                let (a, bw, c) = (word(0), word(1), word(2));
                let top = |v: __m256i| {
                    _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(v, 6), low2), 4)
                };
                let scales = [
                    _mm256_and_si256(a, low6),
                    _mm256_or_si256(_mm256_and_si256(c, low4), top(a)),
                ];
                let mins = [
                    _mm256_and_si256(bw, low6),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(c, 4), low4), top(bw)),
                ];
                let mut sums = [zero; R];
                for j in 0..4 {
                    let mut lows = [zero; R];
                    let mut highs = [zero; R];
                    for t in 0..8 {
                        let raw =
                            unsafe { _mm256_loadu_si256(at.add(128 + 32 * (8 * j + t)).cast()) };
                        let lo = _mm256_and_si256(raw, low);
                        let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
                        for r in 0..R {
                            let xq =
                                unsafe { x[r].q.as_ptr().add(Q8K_BYTES * b + 4 + 64 * j + 4 * t) };
                            let xl = _mm256_set1_epi32(unsafe {
                                std::ptr::read_unaligned(xq.cast::<i32>())
                            });
                            let xh = _mm256_set1_epi32(unsafe {
                                std::ptr::read_unaligned(xq.add(32).cast::<i32>())
                            });
                            lows[r] = byte_dot!($vnni, $dpbusd, lows[r], lo, xl);
                            highs[r] = byte_dot!($vnni, $dpbusd, highs[r], hi, xh);
                        }
                    }
                    let scale = |s: usize| _mm256_shuffle_epi8(scales[s / 4], byte[s % 4]);
                    let (sl, sh) = (scale(2 * j), scale(2 * j + 1));
                    for r in 0..R {
                        let both = _mm256_add_epi32(
                            _mm256_mullo_epi32(lows[r], sl),
                            _mm256_mullo_epi32(highs[r], sh),
                        );
                        sums[r] = _mm256_add_epi32(sums[r], both);
                    }
                }
                let mut total = [zero; R];
                for p in 0..4 {
                    // Mins 2p and 2p + 1 of each row, as two i16.
                    let m = _mm256_shuffle_epi8(mins[p / 2], pair[p % 2]);
                    for r in 0..R {
                        // Sub-blocks 2p and 2p + 1's input sums, as two i16.
                        let two = _mm256_set1_epi32(unsafe {
                            std::ptr::read_unaligned(x[r].sums[b].as_ptr().add(2 * p).cast::<i32>())
                        });
                        total[r] = _mm256_add_epi32(total[r], _mm256_madd_epi16(m, two));
                    }
                }
                for r in 0..R {
                    let xd = _mm256_set1_ps(x[r].d[b]);
                    let (d, dm) = (_mm256_mul_ps(wd, xd), _mm256_mul_ps(wm, xd));
                    acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sums[r]), acc[r]);
                    acc[r] = _mm256_fnmadd_ps(dm, _mm256_cvtepi32_ps(total[r]), acc[r]);
                }
            }
            let mut dots = [[0f32; 8]; R];
            for (d, a) in dots.iter_mut().zip(&acc) {
                // SAFETY: eight floats.
                unsafe { _mm256_storeu_ps(d.as_mut_ptr(), *a) };
            }
            dots
        }
    };
}

q4k_group_form!(
    q4k_group,
    "avx512f,avx512vnni,avx512vl,avx2,fma,f16c",
    true,
    _mm256_dpbusd_epi32
);
q4k_group_form!(
    q4k_group_vex,
    "avxvnni,avx2,fma,f16c",
    true,
    _mm256_dpbusd_avx_epi32
);
// (The AVX2 form never takes its `$dpbusd`: `$vnni` is false.)
q4k_group_form!(
    q4k_group_avx2,
    "avx2,fma,f16c",
    false,
    _mm256_dpbusd_avx_epi32
);
