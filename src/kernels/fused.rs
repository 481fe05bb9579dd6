//! Fused CPU kernels for the prefill path (f32, raw slices, rayon).
//!
//! Each replaces a chain of candle ops that would cost one pass over memory (and one
//! allocation, and on two cores one wake-up of candle's worker pool) per op: splitting a fused
//! projection into heads with RoPE and a scale, SwiGLU, retention's per-head norm with its
//! output gate, the decay matrices of chunkwise retention and its state scan, and a scaled,
//! masked softmax. Every kernel returns `None` when its inputs are not contiguous f32 tensors on
//! the CPU; the caller then takes the portable path of candle ops, which is also what other
//! devices run. Tests check each kernel against that portable path.

use candle_core::{DType, Storage, Tensor};
use rayon::prelude::*;

use crate::kernels::isa::{Isa, Level};
use crate::{Error, Result};

/// Rows handled by one task: enough work to amortise scheduling, small enough to balance.
const ROWS_PER_TASK: usize = 16;

/// Runs `f` on the data of `ts` when every one is an f32 tensor on the CPU that is contiguous
/// (from its start offset on); `None` otherwise.
pub(crate) fn with_f32<const N: usize, R>(
    ts: [&Tensor; N],
    f: impl FnOnce([&[f32]; N]) -> Result<R>,
) -> Result<Option<R>> {
    if ts
        .iter()
        .any(|t| !t.device().is_cpu() || t.dtype() != DType::F32 || !t.is_contiguous())
    {
        return Ok(None);
    }
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices: [&[f32]; N] = [&[]; N];
    for ((slice, (storage, layout)), t) in slices.iter_mut().zip(&guards).zip(ts) {
        let Storage::Cpu(cpu) = &**storage else {
            return Ok(None);
        };
        let start = layout.start_offset();
        *slice = cpu
            .as_slice::<f32>()?
            .get(start..start + t.elem_count())
            .ok_or_else(|| Error::Input("tensor storage shorter than its layout".into()))?;
    }
    f(slices).map(Some)
}

/// `x: (B, C, W)` contiguous: columns `col..col + H * d` of every row, as `(B, H, C, d)` heads,
/// rotated by `rope` (`(cos, sin)`, interleaved pairs) and then multiplied by `scale`.
pub(crate) fn heads(
    x: &Tensor,
    col: usize,
    (n_heads, d): (usize, usize),
    rope: Option<(&Tensor, &Tensor)>,
    scale: Option<f32>,
) -> Result<Option<Tensor>> {
    let (b, c, width) = x.dims3()?;
    if col + n_heads * d > width || d % 2 == 1 {
        return Err(Error::Input(format!(
            "{n_heads} heads of {d} from column {col} do not fit a width of {width}"
        )));
    }
    let kernel = |src: &[f32], tables: Option<(&[f32], &[f32])>, per_row: bool| {
        let mut out = vec![0f32; b * n_heads * c * d];
        // Tasks: blocks of rows of one (batch row, head); a block never crosses a head.
        out.par_chunks_mut(c * d)
            .enumerate()
            .flat_map(|(bh, head)| {
                head.par_chunks_mut(ROWS_PER_TASK * d)
                    .enumerate()
                    .map(move |(block, dst)| (bh, block, dst))
            })
            .for_each(|(bh, block, dst)| {
                let (bi, h) = (bh / n_heads, bh % n_heads);
                for (r, dst) in dst.chunks_mut(d).enumerate() {
                    let t = block * ROWS_PER_TASK + r;
                    let s = &src[(bi * c + t) * width + col + h * d..][..d];
                    match tables {
                        Some((cos, sin)) => {
                            let row = if per_row { bi * c + t } else { t };
                            let (cos, sin) = (&cos[row * d / 2..], &sin[row * d / 2..]);
                            for i in 0..d / 2 {
                                let (x0, x1) = (s[2 * i], s[2 * i + 1]);
                                dst[2 * i] = x0 * cos[i] - x1 * sin[i];
                                dst[2 * i + 1] = x0 * sin[i] + x1 * cos[i];
                            }
                        }
                        None => dst.copy_from_slice(s),
                    }
                    if let Some(scale) = scale {
                        dst.iter_mut().for_each(|v| *v *= scale);
                    }
                }
            });
        Ok(Tensor::from_vec(out, (b, n_heads, c, d), x.device())?)
    };
    match rope {
        None => with_f32([x], |[src]| kernel(src, None, false)),
        Some((cos, sin)) => {
            let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
            let per_row = cos.rank() == 3;
            with_f32([x, &cos, &sin], |[src, cos, sin]| {
                kernel(src, Some((cos, sin)), per_row)
            })
        }
    }
}

/// Element by element `a + b` or `a * b` of two tensors of one shape, on rayon's pool (candle's
/// own parallel element-wise ops run on a second pool whose wake-ups, on two cores, cost more
/// than the additions).
pub(crate) fn binary(a: &Tensor, b: &Tensor, op: Op) -> Result<Option<Tensor>> {
    if a.dims() != b.dims() {
        return Ok(None);
    }
    with_f32([a, b], |[x, y]| {
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(1 << 14)
            .zip(x.par_chunks(1 << 14).zip(y.par_chunks(1 << 14)))
            .for_each(|(o, (x, y))| match op {
                Op::Add => o
                    .iter_mut()
                    .zip(x.iter().zip(y))
                    .for_each(|(o, (x, y))| *o = x + y),
                Op::Mul => o
                    .iter_mut()
                    .zip(x.iter().zip(y))
                    .for_each(|(o, (x, y))| *o = x * y),
            });
        Ok(Tensor::from_vec(out, a.dims(), a.device())?)
    })
}

/// `a op b` through [`binary`] when `native` allows it, candle's op otherwise.
pub(crate) fn apply(a: &Tensor, b: &Tensor, op: Op, native: bool) -> Result<Tensor> {
    if native {
        if let Some(t) = binary(a, b, op)? {
            return Ok(t);
        }
    }
    Ok(match op {
        Op::Add => (a + b)?,
        Op::Mul => (a * b)?,
    })
}

/// `x * s[.., None]` through [`scale_rows`] when `native` allows it, candle's op otherwise.
pub(crate) fn apply_scale_rows(x: &Tensor, s: &Tensor, native: bool) -> Result<Tensor> {
    if native {
        if let Some(t) = scale_rows(x, s)? {
            return Ok(t);
        }
    }
    Ok(x.broadcast_mul(&s.unsqueeze(2)?)?)
}

/// The operation of [`binary`].
#[derive(Clone, Copy, Debug)]
pub(crate) enum Op {
    Add,
    Mul,
}

/// `x: (N, C, d)` with row `(n, t)` multiplied by `s[n, t]` (`s: (N, C)`).
pub(crate) fn scale_rows(x: &Tensor, s: &Tensor) -> Result<Option<Tensor>> {
    let (n, c, d) = x.dims3()?;
    if s.dims() != [n, c] {
        return Ok(None);
    }
    with_f32([x, s], |[x, s]| {
        let mut out = vec![0f32; n * c * d];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .zip(s.par_iter())
            .for_each(|((o, x), &s)| o.iter_mut().zip(x).for_each(|(o, x)| *o = x * s));
        Ok(Tensor::from_vec(out, (n, c, d), &candle_core::Device::Cpu)?)
    })
}

/// SwiGLU of a fused `(B, C, 2F)` projection: `silu(x[.., :F]) * x[.., F:]`, `(B, C, F)`.
pub(crate) fn swiglu(x: &Tensor) -> Result<Option<Tensor>> {
    let (b, c, two_f) = x.dims3()?;
    let f = two_f / 2;
    with_f32([x], |[src]| {
        let mut out = vec![0f32; b * c * f];
        out.par_chunks_mut(f)
            .zip(src.par_chunks(two_f))
            .for_each(|(dst, row)| {
                let (act, lin) = row.split_at(f);
                for ((d, &a), &l) in dst.iter_mut().zip(act).zip(lin) {
                    *d = a / (1.0 + (-a).exp()) * l;
                }
            });
        Ok(Tensor::from_vec(out, (b, c, f), x.device())?)
    })
}

/// Retention's output: per head the RMS norm (without weight) of `o: (B, H, C, d)`, heads merged
/// to `(B, C, H * d)` and multiplied by `silu(g)`, where `g` is columns `col..col + H * d` of the
/// contiguous `(B, C, W)` tensor `gx`.
pub(crate) fn gated_head_norm(
    o: &Tensor,
    gx: &Tensor,
    col: usize,
    eps: f32,
) -> Result<Option<Tensor>> {
    let (b, h, c, d) = o.dims4()?;
    let (_, _, width) = gx.dims3()?;
    let dim = h * d;
    with_f32([o, gx], |[o_data, g_data]| {
        let mut out = vec![0f32; b * c * dim];
        out.par_chunks_mut(dim).enumerate().for_each(|(row, dst)| {
            let (bi, t) = (row / c, row % c);
            let g = &g_data[row * width + col..][..dim];
            for hh in 0..h {
                let src = &o_data[((bi * h + hh) * c + t) * d..][..d];
                let sum2: f32 = src.iter().map(|&v| v * v).sum();
                let m = (sum2 / d as f32 + eps).sqrt();
                let (dst, g) = (&mut dst[hh * d..][..d], &g[hh * d..][..d]);
                for ((y, &x), &gv) in dst.iter_mut().zip(src).zip(g) {
                    *y = gv / (1.0 + (-gv).exp()) * (x / m);
                }
            }
        });
        Ok(Tensor::from_vec(out, (b, c, dim), o.device())?)
    })
}

/// Retention's log-decays from its gate logits: columns `col..col + H` of the contiguous
/// `(B, C, W)` tensor `x`, as `logsigmoid(gt) / normalizer` in `(B, H, C)`.
pub(crate) fn log_decays(
    x: &Tensor,
    col: usize,
    n_heads: usize,
    normalizer: f32,
) -> Result<Option<Tensor>> {
    let (b, c, width) = x.dims3()?;
    with_f32([x], |[src]| {
        let mut out = vec![0f32; b * n_heads * c];
        for (i, dst) in out.iter_mut().enumerate() {
            let (bh, t) = (i / c, i % c);
            let (bi, h) = (bh / n_heads, bh % n_heads);
            let g = src[(bi * c + t) * width + col + h];
            // log(sigmoid(g)) = min(g, 0) - log(1 + exp(-|g|)), stable for large |g|.
            *dst = (g.min(0.0) - (-g.abs()).exp().ln_1p()) / normalizer;
        }
        Ok(Tensor::from_vec(out, (b, n_heads, c), x.device())?)
    })
}

/// What chunkwise retention needs from the log-decays `lg: (N, C)` of `N` chunks of `C` tokens:
/// * `decay: (N, C, C)`, `exp(lg_{m+1} + ... + lg_n)` for `n >= m` and 0 above the diagonal;
/// * `from_start: (N, C)`, `exp(lg_0 + ... + lg_n)` (decay of the state into token `n`);
/// * `to_end: (N, C)`, `exp(lg_{n+1} + ... + lg_{C-1})` (decay of token `n` to the chunk's end);
/// * `total: (N,)`, `exp(lg_0 + ... + lg_{C-1})`.
///
/// Each sum is taken directly over its own range rather than as a difference of cumulative
/// sums, which in f32 would lose the digits that matter over a long chunk.
pub(crate) struct Decays {
    pub decay: Tensor,
    pub from_start: Tensor,
    pub to_end: Tensor,
    pub total: Tensor,
}

/// [`Decays`] of `lg: (N, C)` f32 on the CPU.
pub(crate) fn decays(lg: &Tensor) -> Result<Option<Decays>> {
    let (n, c) = lg.dims2()?;
    let device = lg.device().clone();
    with_f32([lg], |[lg]| {
        let mut decay = vec![0f32; n * c * c];
        decay.par_chunks_mut(c).enumerate().for_each(|(row, dst)| {
            let (chunk, t) = (row / c, row % c);
            let lg = &lg[chunk * c..][..c];
            // Backwards from the diagonal: the segment (m, t] grows by one term per step.
            let mut s = 0f32;
            dst[t] = 1.0;
            for m in (0..t).rev() {
                s += lg[m + 1];
                dst[m] = s.exp();
            }
        });
        let mut from_start = vec![0f32; n * c];
        let mut to_end = vec![0f32; n * c];
        let mut total = vec![0f32; n];
        for chunk in 0..n {
            let lg = &lg[chunk * c..][..c];
            let mut s = 0f32;
            for t in 0..c {
                s += lg[t];
                from_start[chunk * c + t] = s.exp();
            }
            total[chunk] = s.exp();
            let mut s = 0f32;
            for t in (0..c).rev() {
                to_end[chunk * c + t] = s.exp();
                s += lg[t];
            }
        }
        let t = |v: Vec<f32>, shape: &[usize]| Tensor::from_vec(v, shape, &device);
        Ok(Decays {
            decay: t(decay, &[n, c, c])?,
            from_start: t(from_start, &[n, c])?,
            to_end: t(to_end, &[n, c])?,
            total: t(total, &[n])?,
        })
    })
}

/// The state recurrence of chunkwise retention over `n` chunks for `rows` independent states:
/// `S_i = total_i * S_{i-1} + update_i`, from `state: (rows, d*d)`, with `update: (rows, n, d*d)`
/// and `total: (rows, n)`. Returns the state before each chunk, `(rows, n, d*d)`, and the final
/// state `(rows, d*d)`.
pub(crate) fn scan_states(
    state: &Tensor,
    update: &Tensor,
    total: &Tensor,
) -> Result<Option<(Tensor, Tensor)>> {
    let (rows, n, dd) = update.dims3()?;
    let device = state.device().clone();
    with_f32([state, update, total], |[s0, up, tot]| {
        let mut before = vec![0f32; rows * n * dd];
        let mut last = s0.to_vec();
        before
            .par_chunks_mut(n * dd)
            .zip(last.par_chunks_mut(dd))
            .enumerate()
            .for_each(|(r, (before, s))| {
                for i in 0..n {
                    before[i * dd..][..dd].copy_from_slice(s);
                    let g = tot[r * n + i];
                    let u = &up[(r * n + i) * dd..][..dd];
                    for (sv, &uv) in s.iter_mut().zip(u) {
                        *sv = *sv * g + uv;
                    }
                }
            });
        Ok((
            Tensor::from_vec(before, (rows, n, dd), &device)?,
            Tensor::from_vec(last, (rows, dd), &device)?,
        ))
    })
}

/// Where [`decayed_state_step`] writes a head's new state.
pub(crate) enum StateStep<'a> {
    /// Over the old state (a buffer no one else reads): one read and one write per element.
    InPlace(&'a mut [f32]),
    /// From the old state into a new buffer, written whole (the old one is shared).
    Into(&'a [f32], &'a mut [std::mem::MaybeUninit<f32>]),
}

/// One decode step of a decayed outer-product state (one head): `S' = decay S + k^T v` and
/// `o = q S'`, for `S: (d, d)` row-major, `q, k, v: (d,)`. `S'` is written in place or into a
/// new buffer ([`StateStep`]) and `o` (`d`, zeroed by the caller) accumulated, each element by
/// the same f32 operations in the same order whatever the instruction set and destination:
/// `isa` picks a build of this loop for AVX-512 or AVX2 (the crate is otherwise compiled for
/// baseline x86-64, whose 4-wide SSE2 made this loop, over 75 MB of states at 16 sequences of
/// bench-160m, bound by arithmetic).
pub(crate) fn decayed_state_step(
    isa: crate::kernels::isa::Isa,
    state: StateStep<'_>,
    decay: f32,
    (q, k, v): (&[f32], &[f32], &[f32]),
    o: &mut [f32],
) {
    #[inline(always)]
    fn body(state: StateStep<'_>, decay: f32, (q, k, v): (&[f32], &[f32], &[f32]), o: &mut [f32]) {
        let d = v.len();
        match state {
            StateStep::InPlace(s) => {
                for (i, row) in s.chunks_exact_mut(d).enumerate() {
                    let (ki, qi) = (k[i], q[i]);
                    for ((x, vj), oj) in row.iter_mut().zip(v).zip(o.iter_mut()) {
                        let y = *x * decay + ki * vj;
                        *x = y;
                        *oj += qi * y;
                    }
                }
            }
            StateStep::Into(s_old, s_new) => {
                for (i, (old, new)) in s_old
                    .chunks_exact(d)
                    .zip(s_new.chunks_exact_mut(d))
                    .enumerate()
                {
                    let (ki, qi) = (k[i], q[i]);
                    for (((old, new), vj), oj) in
                        old.iter().zip(new.iter_mut()).zip(v).zip(o.iter_mut())
                    {
                        let y = old * decay + ki * vj;
                        new.write(y);
                        *oj += qi * y;
                    }
                }
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        /// `body` built for `$features`.
        macro_rules! built_for {
            ($name:ident, $features:literal) => {
                #[target_feature(enable = $features)]
                fn $name(
                    state: StateStep<'_>,
                    decay: f32,
                    qkv: (&[f32], &[f32], &[f32]),
                    o: &mut [f32],
                ) {
                    body(state, decay, qkv, o)
                }
            };
        }
        built_for!(avx512, "avx512f");
        built_for!(avx2, "avx2");
        use crate::kernels::isa::Level;
        match isa.level() {
            // SAFETY: an `Isa` is never above what the CPU has.
            Level::Avx512 => return unsafe { avx512(state, decay, (q, k, v), o) },
            // SAFETY: as above.
            Level::Avx2 => return unsafe { avx2(state, decay, (q, k, v), o) },
            Level::Portable => {}
        }
    }
    let _ = isa;
    body(state, decay, (q, k, v), o)
}

/// `softmax(scores * scale + mask)` over the last axis of `scores: (N, R, L)`, where `mask` is
/// `(R, L)` (shared by all `N`) or one `(1, L)` row per group of `N / B` consecutive matrices
/// (`per_batch = B`).
pub(crate) fn scaled_masked_softmax(
    scores: &Tensor,
    scale: f32,
    mask: Option<&Tensor>,
    per_batch: usize,
) -> Result<Option<Tensor>> {
    let (n, r, l) = scores.dims3()?;
    let device = scores.device().clone();
    let softmax = |s: &[f32], m: Option<&[f32]>| -> Result<Tensor> {
        let mut out = vec![0f32; n * r * l];
        out.par_chunks_mut(l).enumerate().for_each(|(row, dst)| {
            let src = &s[row * l..][..l];
            let mrow = m.map(|m| {
                if m.len() == r * l {
                    &m[(row % r) * l..][..l]
                } else {
                    // One mask row per batch row: matrices are grouped by batch row.
                    let batch = row / r / (n / per_batch.max(1)).max(1);
                    &m[batch * l..][..l]
                }
            });
            let mut max = f32::NEG_INFINITY;
            for (j, (d, &x)) in dst.iter_mut().zip(src).enumerate() {
                let v = x * scale + mrow.map_or(0.0, |m| m[j]);
                *d = v;
                max = max.max(v);
            }
            let mut sum = 0f32;
            for d in dst.iter_mut() {
                *d = (*d - max).exp();
                sum += *d;
            }
            dst.iter_mut().for_each(|d| *d /= sum);
        });
        Ok(Tensor::from_vec(out, (n, r, l), &device)?)
    };
    match mask {
        None => with_f32([scores], |[s]| softmax(s, None)),
        Some(mask) => {
            let mask = mask.contiguous()?;
            if mask.elem_count() != r * l && mask.elem_count() != per_batch * l {
                return Ok(None);
            }
            with_f32([scores, &mask], |[s, m]| softmax(s, Some(m)))
        }
    }
}

/// `s[i] = exp(s[i] - shift)` for scores at or below `shift` (softmax), `-inf` giving 0, in a
/// form the compiler vectorises (glibc's `expf` is a call per element): `2^n * p(r)` with
/// `x = n ln 2 + r`, `|r| <= ln 2 / 2`, and Cephes' degree-6 polynomial for `exp(r)`, within 2
/// ulp of `f32::exp` on `[-87, 0]` (checked by a test); below -87 the result is 0 (exp is under
/// 1.7e-38 there, a subnormal that cannot move a softmax).
/// On the active instruction set: each element takes the same operations whatever the width
/// (Rust never fuses a multiply and an add on its own), so every level gives the same bits.
pub(crate) fn exp_shifted(s: &mut [f32], shift: f32) {
    exp_shifted_on(Isa::active(), s, shift);
}

/// [`exp_shifted`] on a given level (tests take each).
fn exp_shifted_on(isa: Isa, s: &mut [f32], shift: f32) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn wide(s: &mut [f32], shift: f32) {
            exp_shifted_body(s, shift);
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(s: &mut [f32], shift: f32) {
            exp_shifted_body(s, shift);
        }
        match isa.level() {
            // SAFETY: an `Isa` is never above what the CPU has.
            Level::Avx512 => unsafe { wide(s, shift) },
            // SAFETY: as above.
            Level::Avx2 => unsafe { avx2(s, shift) },
            Level::Portable => exp_shifted_body(s, shift),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        exp_shifted_body(s, shift);
    }
}

#[inline(always)]
fn exp_shifted_body(s: &mut [f32], shift: f32) {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    for v in s.iter_mut() {
        let x = *v - shift;
        let keep = x >= -87.0;
        let x = if keep { x } else { -87.0 };
        let t = x * LOG2E + ROUND;
        let n = t - ROUND;
        // The integer `n` from `t`'s bits, which step by one in [2^23, 2^24): the same value
        // as `n as i32`, whose saturating conversion the compiler does lane by lane (six
        // scalar instructions each, most of this loop's time).
        let n_int = t.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
        let r = x - n * LN2_HI - n * LN2_LO;
        let mut p = 1.987_569_1e-4;
        p = p * r + 1.398_2e-3;
        p = p * r + 8.333_452e-3;
        p = p * r + 4.166_579_6e-2;
        p = p * r + 1.666_666_5e-1;
        p = p * r + 0.5;
        let e = (p * r * r + r) + 1.0;
        let scale = f32::from_bits((n_int.wrapping_add(127) as u32) << 23);
        *v = if keep { e * scale } else { 0.0 };
    }
}

/// A row-major-or-strided f32 matrix in a slice: element `(i, j)` at `i * rows + j * cols`.
#[derive(Clone, Copy)]
pub(crate) struct Strided<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
}

impl Strided<'_> {
    /// Does an `r x c` matrix fit in the slice?
    fn holds(&self, r: usize, c: usize) -> bool {
        r == 0 || c == 0 || (r - 1) * self.rows + (c - 1) * self.cols < self.data.len()
    }
}

/// `dst = scale * lhs rhs` for `lhs: m x k`, `rhs: k x n` and a row-major `dst: m x n`, on the
/// calling thread: for the many small independent products of attention and chunkwise
/// retention, which run side by side on rayon's pool (candle runs a batch of products one after
/// the other, each split over the threads, which small products do not amortise).
pub(crate) fn gemm_into(
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    lhs: Strided,
    rhs: Strided,
    scale: f32,
) -> Result<()> {
    if dst.len() < m * n || !lhs.holds(m, k) || !rhs.holds(k, n) {
        return Err(Error::Input(format!(
            "a {m}x{k} by {k}x{n} product does not fit its buffers"
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        dst[..m * n].fill(0.0);
        return Ok(());
    }
    // SAFETY: the checks above keep every element gemm reads (`lhs`, `rhs`) or writes (`dst`,
    // row-major m x n) inside its slice, and `dst` is borrowed mutably, so nothing aliases it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.data.as_ptr(),
            lhs.cols as isize,
            lhs.rows as isize,
            rhs.data.as_ptr(),
            rhs.cols as isize,
            rhs.rows as isize,
            0.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    Ok(())
}

/// `a b` for `a: (N, m, k)` and `b: (N, k, n)` (any strides, e.g. a transposed view) on the
/// CPU in f32: the `N` products run side by side on rayon's pool, each on one thread (see
/// [`gemm_into`]). `None` for other devices or dtypes.
pub(crate) fn batched_matmul(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    let (batch, m, k) = a.dims3()?;
    let (batch_b, k_b, n) = b.dims3()?;
    if batch != batch_b || k != k_b {
        return Err(Error::Input(format!(
            "cannot multiply {:?} by {:?}",
            a.dims(),
            b.dims()
        )));
    }
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if !(f32_cpu(a) && f32_cpu(b)) {
        return Ok(None);
    }
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    let (Storage::Cpu(sa), Storage::Cpu(sb)) = (&*sa, &*sb) else {
        return Ok(None);
    };
    let (ad, bd) = (
        &sa.as_slice::<f32>()?[la.start_offset()..],
        &sb.as_slice::<f32>()?[lb.start_offset()..],
    );
    let (ast, bst) = (la.stride(), lb.stride());
    let mut out = vec![0f32; batch * m * n];
    if m * n > 0 {
        out.par_chunks_mut(m * n)
            .enumerate()
            .try_for_each(|(i, dst)| {
                let lhs = Strided {
                    data: ad.get(i * ast[0]..).unwrap_or_default(),
                    rows: ast[1],
                    cols: ast[2],
                };
                let rhs = Strided {
                    data: bd.get(i * bst[0]..).unwrap_or_default(),
                    rows: bst[1],
                    cols: bst[2],
                };
                gemm_into(dst, (m, n, k), lhs, rhs, 1.0)
            })?;
    }
    Ok(Some(Tensor::from_vec(out, (batch, m, n), a.device())?))
}

/// `a b` through [`batched_matmul`] when `native` allows it, candle's `matmul` otherwise.
pub(crate) fn apply_matmul(a: &Tensor, b: &Tensor, native: bool) -> Result<Tensor> {
    if native {
        if let Some(t) = batched_matmul(a, b)? {
            return Ok(t);
        }
    }
    Ok(a.matmul(b)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The decode step of a decayed state gives the plain loop's bits on every instruction set.
    #[test]
    fn the_decayed_state_step_is_the_plain_loop_on_every_instruction_set_in_place_or_not() {
        let mut rng = crate::kernels::TestRng::new(11);
        for d in [1, 7, 64, 256] {
            let mut vals =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.next_f32() - 0.5).collect() };
            let (s_old, q, k, v) = (vals(d * d), vals(d), vals(d), vals(d));
            let decay = 0.97f32;
            let mut want_s = vec![0f32; d * d];
            let mut want_o = vec![0f32; d];
            for i in 0..d {
                for j in 0..d {
                    let x = s_old[i * d + j] * decay + k[i] * v[j];
                    want_s[i * d + j] = x;
                    want_o[j] += q[i] * x;
                }
            }
            for isa in crate::kernels::isa::Isa::supported() {
                let mut s_new = vec![std::mem::MaybeUninit::new(f32::NAN); d * d];
                let mut o = vec![0f32; d];
                let into = StateStep::Into(&s_old, &mut s_new);
                decayed_state_step(isa, into, decay, (&q, &k, &v), &mut o);
                let mut in_place = s_old.clone();
                let mut o_in_place = vec![0f32; d];
                let over = StateStep::InPlace(&mut in_place);
                decayed_state_step(isa, over, decay, (&q, &k, &v), &mut o_in_place);
                assert_eq!(
                    in_place.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    want_s.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    "{isa:?} d {d}, in place"
                );
                assert_eq!(o_in_place, o, "{isa:?} d {d}, in place");
                // SAFETY: initialised above (and overwritten by the step).
                let got: Vec<u32> = s_new
                    .iter()
                    .map(|x| unsafe { x.assume_init() }.to_bits())
                    .collect();
                assert_eq!(
                    got,
                    want_s.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    "{isa:?} d {d}"
                );
                assert_eq!(
                    o.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    want_o.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    "{isa:?} d {d}"
                );
            }
        }
    }
    use candle_core::Device;

    fn seeded(shape: &[usize], seed: u64) -> Result<Tensor> {
        crate::kernels::testing::uniform(shape, seed, 2.0)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
    }

    fn some<T>(x: Option<T>) -> Result<T> {
        x.ok_or_else(|| Error::Input("kernel declined a CPU f32 input".into()))
    }

    #[test]
    fn exp_shifted_is_within_two_ulp_of_exp_and_masks_to_zero() {
        let xs: Vec<f32> = (0..=200_000)
            .map(|i| -87.0 * i as f32 / 200_000.0)
            .collect();
        let mut got = xs.clone();
        exp_shifted(&mut got, 0.0);
        for (&x, &e) in xs.iter().zip(&got) {
            let want = x.exp();
            let ulp = (want.to_bits() as i64 - e.to_bits() as i64).abs();
            assert!(ulp <= 2, "exp({x}) = {want}, got {e} ({ulp} ulp)");
        }
        // Shifted: the same as exp of the difference; -inf and far below give exactly 0.
        let mut s = vec![3.0, 1.0, f32::NEG_INFINITY, -200.0];
        exp_shifted(&mut s, 3.0);
        assert_eq!(s[0], 1.0);
        assert!((s[1] - (-2f32).exp()).abs() <= 2.0 * f32::EPSILON * s[1]);
        assert_eq!(&s[2..], &[0.0, 0.0]);
    }

    #[test]
    fn exp_shifted_gives_the_same_bits_on_every_instruction_set() {
        // Odd length: the vector loops' tails too.
        let xs: Vec<f32> = (0..1001)
            .map(|i| -90.0 * (i as f32 * 0.618_034).fract())
            .chain([f32::NEG_INFINITY, 0.0, -0.0])
            .collect();
        let mut want = xs.clone();
        exp_shifted_on(Isa::cpu().at_most(Level::Portable), &mut want, 0.5);
        for isa in Isa::supported() {
            let mut got = xs.clone();
            exp_shifted_on(isa, &mut got, 0.5);
            let same = got
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{isa:?}");
        }
    }

    #[test]
    fn batched_products_equal_candles_over_transposed_and_narrowed_views() -> Result<()> {
        let a = seeded(&[5, 7, 9], 1)?;
        let b_all = seeded(&[5, 12, 9], 2)?;
        // (5, 9, 11): a transposed, narrowed view.
        let b = b_all.narrow(1, 1, 11)?.t()?;
        let fast = some(batched_matmul(&a, &b)?)?;
        let slow = a.matmul(&b.contiguous()?)?;
        assert!(max_diff(&fast, &slow)? < 1e-5);
        let fast = some(batched_matmul(&a.t()?, &a)?)?;
        let slow = a.t()?.contiguous()?.matmul(&a)?;
        assert!(max_diff(&fast, &slow)? < 1e-5);
        // Shapes that do not multiply are an error, not a panic.
        assert!(batched_matmul(&a, &a).is_err());
        Ok(())
    }

    #[test]
    fn log_decays_equal_the_log_sigmoid_chain() -> Result<()> {
        let x = (seeded(&[2, 9, 7], 11)? * 10.0)?;
        let got = some(log_decays(&x, 4, 3, 16.0)?)?;
        let gt = x.narrow(2, 4, 3)?.transpose(1, 2)?.contiguous()?;
        // log sigmoid(x) = -log(1 + exp(-x)), written out.
        let want = ((gt.neg()?.exp()? + 1.0)?.log()?.neg()? / 16.0)?;
        assert!(max_diff(&got, &want)? <= 1e-6);
        Ok(())
    }

    #[test]
    fn binary_ops_and_row_scaling_equal_candles() -> Result<()> {
        let (a, b) = (seeded(&[3, 70000], 12)?, seeded(&[3, 70000], 13)?);
        assert_eq!(
            max_diff(&some(binary(&a, &b, Op::Add)?)?, &(&a + &b)?)?,
            0.0
        );
        assert_eq!(
            max_diff(&some(binary(&a, &b, Op::Mul)?)?, &(&a * &b)?)?,
            0.0
        );
        assert!(binary(&a, &b.narrow(1, 0, 5)?, Op::Add)?.is_none());
        let x = seeded(&[4, 6, 5], 14)?;
        let s = seeded(&[4, 6], 15)?;
        let want = x.broadcast_mul(&s.unsqueeze(2)?)?;
        assert_eq!(max_diff(&some(scale_rows(&x, &s)?)?, &want)?, 0.0);
        Ok(())
    }

    #[test]
    fn swiglu_equals_silu_times_gate() -> Result<()> {
        let x = seeded(&[1, 20, 2 * 24], 2)?;
        let got = some(swiglu(&x)?)?;
        let want = (x.narrow(2, 0, 24)?.silu()? * x.narrow(2, 24, 24)?)?;
        assert!(max_diff(&got, &want)? <= 1e-6);
        Ok(())
    }

    #[test]
    fn gated_head_norm_equals_norm_merge_and_gate() -> Result<()> {
        let (b, h, c, d) = (2, 3, 11, 8);
        let o = seeded(&[b, h, c, d], 3)?;
        let gx = seeded(&[b, c, 2 * h * d + 5], 4)?;
        let got = some(gated_head_norm(&o, &gx, h * d + 5, 1e-5)?)?;
        let ones = Tensor::ones(d, DType::F32, &Device::Cpu)?;
        let normed = candle_nn::ops::rms_norm(&o, &ones, 1e-5)?;
        let merged = normed.transpose(1, 2)?.reshape((b, c, h * d))?;
        let g = gx.narrow(2, h * d + 5, h * d)?;
        let want = (g.silu()? * merged)?;
        assert!(max_diff(&got, &want)? <= 1e-6);
        Ok(())
    }

    #[test]
    #[allow(clippy::needless_range_loop)]
    fn decays_equal_the_sums_written_out() -> Result<()> {
        let (n, c) = (3, 9);
        let lg = (seeded(&[n, c], 5)?.abs()? * -0.1)?;
        let got = some(decays(&lg)?)?;
        let lgv: Vec<Vec<f32>> = lg.to_vec2()?;
        let decay: Vec<Vec<Vec<f32>>> = got.decay.to_vec3()?;
        let from_start: Vec<Vec<f32>> = got.from_start.to_vec2()?;
        let to_end: Vec<Vec<f32>> = got.to_end.to_vec2()?;
        let total: Vec<f32> = got.total.to_vec1()?;
        for k in 0..n {
            let sum = |a: usize, b: usize| -> f64 { (a..b).map(|j| lgv[k][j] as f64).sum() };
            for t in 0..c {
                for m in 0..c {
                    let want = if m <= t { sum(m + 1, t + 1).exp() } else { 0.0 };
                    assert!((decay[k][t][m] as f64 - want).abs() < 1e-6);
                }
                assert!((from_start[k][t] as f64 - sum(0, t + 1).exp()).abs() < 1e-6);
                assert!((to_end[k][t] as f64 - sum(t + 1, c).exp()).abs() < 1e-6);
            }
            assert!((total[k] as f64 - sum(0, c).exp()).abs() < 1e-6);
        }
        Ok(())
    }

    #[test]
    fn scan_equals_the_recurrence_step_by_step() -> Result<()> {
        let (rows, n, dd) = (2, 4, 6);
        let s0 = seeded(&[rows, dd], 6)?;
        let up = seeded(&[rows, n, dd], 7)?;
        let tot = (seeded(&[rows, n], 8)?.abs()? * 0.4)?;
        let (before, last) = some(scan_states(&s0, &up, &tot)?)?;
        let mut s = s0.clone();
        for i in 0..n {
            assert!(max_diff(&before.narrow(1, i, 1)?.squeeze(1)?, &s)? <= 1e-6);
            let g = tot.narrow(1, i, 1)?;
            s = (s.broadcast_mul(&g)? + up.narrow(1, i, 1)?.squeeze(1)?)?;
        }
        assert!(max_diff(&last, &s)? <= 1e-6);
        Ok(())
    }

    #[test]
    fn scaled_masked_softmax_equals_the_op_chain() -> Result<()> {
        let (n, r, l) = (4, 5, 7);
        let s = seeded(&[n, r, l], 9)?;
        // Query i (at position 2 + i) sees keys j with 2 + i - 3 < j <= 2 + i.
        let mask: Vec<f32> = (0..r)
            .flat_map(|i| {
                (0..l).map(move |j| {
                    if j <= 2 + i && j + 3 > 2 + i {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (r, l), &Device::Cpu)?;
        let got = some(scaled_masked_softmax(&s, 0.3, Some(&mask), 1)?)?;
        let want = candle_nn::ops::softmax_last_dim(&(s.clone() * 0.3)?.broadcast_add(&mask)?)?;
        assert!(max_diff(&got, &want)? <= 1e-6);
        // One mask row per batch row (two batch rows of two matrices each).
        // Rows owning the last 3 and the last 7 of 7 slots.
        let rows: Vec<f32> = [3, 7]
            .iter()
            .flat_map(|&n| (0..l).map(move |j| if j + n >= l { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let rows = Tensor::from_vec(rows, (2, 1, 1, 1, l), &Device::Cpu)?;
        let s1 = seeded(&[n, 1, l], 10)?;
        let got = some(scaled_masked_softmax(&s1, 1.0, Some(&rows), 2)?)?;
        let want = candle_nn::ops::softmax_last_dim(
            &s1.reshape((2, 2, 1, l))?
                .broadcast_add(&rows.reshape((2, 1, 1, l))?)?
                .reshape((n, 1, l))?,
        )?;
        assert!(max_diff(&got, &want)? <= 1e-6);
        Ok(())
    }
}
