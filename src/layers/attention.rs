//! Softmax attention shared by the sliding-window self-decoder and the cross-decoder.
//!
//! Grouped-query attention without repeating K/V: the `G = H / H_kv` query heads that share a
//! key/value head are stacked into one matrix, so each K/V head is read once.

use std::ops::Range;

use candle_core::{DType, Tensor, D};
use rayon::prelude::*;

use crate::layers::fused;
use crate::layers::linear::dot;
use crate::Result;

/// Keys `keys` of a K/V view and the additive mask over them (`None`: all visible).
#[derive(Clone, Debug)]
pub(crate) struct KeyBlock {
    pub keys: Range<usize>,
    pub mask: Option<Tensor>,
}

/// `softmax(q k^T * scale + mask) v`; `native` allows the CPU decode kernel.
///
/// * `q`: `(B, H, C, d)`; `k`, `v`: `(B, H_kv, L, d)` (a strided view of a cache is fine);
/// * `mask`: additive (0 or -inf), broadcastable to `(B, H_kv, G, C, L)`: either `(C, L)` for a
///   mask shared by all rows, or `(B, 1, 1, C, L)` for one per row; `None` = every key visible.
///
/// `q k^T` is multiplied in the inputs' dtype, then scaled, masked and softmaxed in f32; the
/// result has `v`'s dtype, shape `(B, H, C, d)`. One decode query per head on CPU in f32 takes
/// a kernel that reads each K/V head once for all its query heads.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    native: bool,
) -> Result<Tensor> {
    let (b, h, c, d) = q.dims4()?;
    let (_, h_kv, l, _) = k.dims4()?;
    let cpu_f32 = q.device().is_cpu() && q.dtype() == DType::F32 && k.dtype() == DType::F32;
    // One query per row: the kernel, also for a batch of rows with one mask row each (rows of a
    // right-aligned batch, `(B, 1, 1, 1, L)`).
    let row_mask = mask.is_none_or(|m| m.dims() == [b, 1, 1, 1, l] && m.dtype() == DType::F32);
    if native && c == 1 && cpu_f32 && row_mask {
        if let Some(out) = decode_grouped_cpu(q, k, v, mask, scale as f32)? {
            return Ok(out);
        }
    }
    let g = h / h_kv;
    // (B, H, C, d) -> (B, H_kv, G*C, d): head h = kv * G + g reads kv head h / G.
    let q = q.contiguous()?.reshape((b, h_kv, g * c, d))?;
    let scores = q.matmul(&k.t()?)?;
    if native {
        // Scale, mask and softmax in one pass.
        let flat = scores.reshape((b * h_kv * g, c, l))?;
        if let Some(p) = fused::scaled_masked_softmax(&flat, scale as f32, mask, b)? {
            let probs = p.reshape((b, h_kv, g * c, l))?.to_dtype(v.dtype())?;
            return Ok(probs.matmul(v)?.reshape((b, h, c, d))?);
        }
    }
    let scores = (scores.to_dtype(DType::F32)? * scale)?;
    let scores = match mask {
        Some(mask) => scores
            .reshape((b, h_kv, g, c, l))?
            .broadcast_add(mask)?
            .reshape((b, h_kv, g * c, l))?,
        None => scores,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
    let out = probs.matmul(v)?;
    Ok(out.reshape((b, h, c, d))?)
}

/// [`attention`] over the keys of `blocks` in turn, merged by an online softmax, so that scores
/// and masks never exceed one block: for many queries over a long K/V (scoring a long text).
/// Every query must see at least one key of the first block.
pub(crate) fn attention_over_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    blocks: &[KeyBlock],
    scale: f64,
    native: bool,
) -> Result<Tensor> {
    if let [one] = blocks {
        let (k, v) = (
            k.narrow(2, one.keys.start, one.keys.len())?,
            v.narrow(2, one.keys.start, one.keys.len())?,
        );
        return attention(q, &k, &v, one.mask.as_ref(), scale, native);
    }
    let (b, h, c, d) = q.dims4()?;
    let h_kv = k.dim(1)?;
    let g = h / h_kv;
    let q = q.contiguous()?.reshape((b, h_kv, g * c, d))?;
    // Running max, sum of exponentials and weighted values of each query row.
    let mut acc: Option<(Tensor, Tensor, Tensor)> = None;
    for block in blocks {
        let n = block.keys.len();
        let (kb, vb) = (
            k.narrow(2, block.keys.start, n)?,
            v.narrow(2, block.keys.start, n)?,
        );
        let s = (q.matmul(&kb.t()?)?.to_dtype(DType::F32)? * scale)?;
        let s = match &block.mask {
            Some(mask) => s
                .reshape((b, h_kv, g, c, n))?
                .broadcast_add(mask)?
                .reshape((b, h_kv, g * c, n))?,
            None => s,
        };
        let block_max = s.max_keepdim(D::Minus1)?;
        let max = match &acc {
            Some((m, _, _)) => m.maximum(&block_max)?,
            None => block_max,
        };
        let p = s.broadcast_sub(&max)?.exp()?;
        let sum = p.sum_keepdim(D::Minus1)?;
        let pv = p.to_dtype(v.dtype())?.matmul(&vb)?.to_dtype(DType::F32)?;
        acc = Some(match acc {
            None => (max, sum, pv),
            Some((m, l, o)) => {
                let rescale = (m - &max)?.exp()?;
                let l = (l * &rescale)?.add(&sum)?;
                let o = o.broadcast_mul(&rescale)?.add(&pv)?;
                (max, l, o)
            }
        });
    }
    let Some((_, l, o)) = acc else {
        return Err(crate::Error::Input("attention over no keys".into()));
    };
    Ok(o.broadcast_div(&l)?
        .to_dtype(v.dtype())?
        .reshape((b, h, c, d))?)
}

/// Keys per tile of [`decode_grouped_cpu`]: the scores of a tile are exponentiated together (a
/// loop the compiler vectorises) and rescale the accumulated values once per tile, not per key.
const DECODE_TILE: usize = 128;

/// One decode query per head on CPU (`q: (B, H, 1, d)`, `k, v: (B, H_kv, L, d)` f32, any row
/// stride, and an optional additive mask of one row of `L` per batch row): the `G` query heads
/// that share a K/V head walk its rows *once*, together, with an online softmax. At long context
/// decode is bound by reading the global K/V, and a kernel that reads it once per query head (G
/// times per K/V head) is G times slower. Masked (-inf) slots are skipped, so a row of a
/// right-aligned batch computes exactly what it computes alone. Returns `None` when the layout is
/// not one it handles (the caller falls back).
fn decode_grouped_cpu(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f32,
) -> Result<Option<Tensor>> {
    use candle_core::Storage;
    let (b, h, _, d) = q.dims4()?;
    let (_, h_kv, l, _) = k.dims4()?;
    let g = h / h_kv;
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
    let (qd, kd, vd) = (
        qs.as_slice::<f32>()?,
        ks.as_slice::<f32>()?,
        vs.as_slice::<f32>()?,
    );
    let (kst, vst) = (kl.stride(), vl.stride());
    if kst[3] != 1 || vst[3] != 1 || l == 0 {
        return Ok(None);
    }
    let qd = &qd[ql.start_offset()..];
    let (k0, v0) = (kl.start_offset(), vl.start_offset());
    let mut out = vec![0f32; b * h * d];
    // One task per (row, K/V head) (rayon's pool, shared with candle's matmul).
    out.par_chunks_mut(g * d)
        .enumerate()
        .for_each(|(task, out_kv)| {
            let (row, kv) = (task / h_kv, task % h_kv);
            let qh = &qd[task * g * d..(task + 1) * g * d];
            let row_mask = mask.as_ref().map(|m| &m[row * l..(row + 1) * l]);
            let (kb, vb) = (
                k0 + row * kst[0] + kv * kst[1],
                v0 + row * vst[0] + kv * vst[1],
            );
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
                for j in 0..t {
                    let bias = row_mask.map_or(0.0, |m| m[t0 + j]);
                    let kr = &kd[kb + (t0 + j) * kst[2]..][..d];
                    for gi in 0..g {
                        scores[gi * DECODE_TILE + j] = if bias == f32::NEG_INFINITY {
                            f32::NEG_INFINITY
                        } else {
                            dot(&qh[gi * d..(gi + 1) * d], kr) * scale + bias
                        };
                    }
                }
                // Online softmax, a tile at a time: rescale what was accumulated when the
                // tile raises the running max, then weight the tile's values.
                for gi in 0..g {
                    let s = &mut scores[gi * DECODE_TILE..gi * DECODE_TILE + t];
                    let tile_max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
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
                    sum[gi] += s.iter().sum::<f32>();
                }
                for j in 0..t {
                    let vr = &vd[vb + (t0 + j) * vst[2]..][..d];
                    for gi in 0..g {
                        let p = scores[gi * DECODE_TILE + j];
                        if p != 0.0 {
                            out_kv[gi * d..(gi + 1) * d]
                                .iter_mut()
                                .zip(vr)
                                .for_each(|(a, x)| *a += p * x);
                        }
                    }
                }
            }
            for gi in 0..g {
                let inv = 1.0 / sum[gi];
                out_kv[gi * d..(gi + 1) * d]
                    .iter_mut()
                    .for_each(|x| *x *= inv);
            }
        });
    Ok(Some(Tensor::from_vec(out, (b, h, 1, d), q.device())?))
}

/// Query rows per task of [`band_attention_cpu`]: with the window's `W - 1` earlier keys each
/// block scores `W + 127` keys (W = 1024: 89% of them visible), and a 512-token chunk of three
/// heads makes twelve tasks for the pool.
const BAND_QUERY_BLOCK: usize = 128;

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
                        let max = s[seen.clone()]
                            .iter()
                            .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
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

/// Additive mask `(C, L)` with 0 where query `i` may see key `j` and -inf elsewhere, for queries
/// and keys numbered by absolute position: query `i` sits at `q_start + i`, key `j` at
/// `k_start + j`, and a query sees keys in `(pos - window, pos]` (`window = None`: all earlier keys).
pub(crate) fn causal_mask(
    c: usize,
    l: usize,
    q_start: usize,
    k_start: usize,
    window: Option<usize>,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let mut data = Vec::with_capacity(c * l);
    for i in 0..c {
        let p = q_start + i;
        for j in 0..l {
            let kp = k_start + j;
            let visible = kp <= p && window.is_none_or(|w| p - kp < w);
            data.push(if visible { 0f32 } else { f32::NEG_INFINITY });
        }
    }
    Ok(Tensor::from_vec(data, (c, l), device)?)
}

/// Per-row additive mask `(B, 1, 1, 1, L)` for one decode step over a right-aligned cache of `L`
/// slots in which row `b`'s real entries are the last `visible[b]`.
pub(crate) fn right_aligned_mask(
    visible: &[usize],
    l: usize,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let mut data = Vec::with_capacity(visible.len() * l);
    for &n in visible {
        for j in 0..l {
            data.push(if j + n >= l { 0f32 } else { f32::NEG_INFINITY });
        }
    }
    Ok(Tensor::from_vec(data, (visible.len(), 1, 1, 1, l), device)?)
}

/// Textbook attention with K/V repeated per query head, the reference the fast paths are tested against.
#[cfg(test)]
pub(crate) fn naive_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    // Repeat K/V per query head: the textbook form the grouped version must equal.
    let (_, h, _, _) = q.dims4()?;
    let (_, h_kv, _, _) = k.dims4()?;
    let g = h / h_kv;
    let rep = |t: &Tensor| -> Result<Tensor> {
        let heads: Vec<Tensor> = (0..h)
            .map(|i| t.narrow(1, i / g, 1))
            .collect::<candle_core::Result<_>>()?;
        Ok(Tensor::cat(&heads, 1)?)
    };
    let (k, v) = (rep(k)?, rep(v)?);
    let mut scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
    if let Some(m) = mask {
        scores = scores.broadcast_add(m)?;
    }
    let probs = candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?;
    Ok(probs.matmul(&v.contiguous()?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn grouped_query_attention_equals_repeated_kv() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 6, 5, 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (2, 2, 9, 8), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (2, 2, 9, 8), &dev)?;
        let mask = causal_mask(5, 9, 4, 0, Some(3), &dev)?;
        let fast = attention(&q, &k, &v, Some(&mask), 0.3, true)?;
        let slow = naive_attention(&q, &k, &v, Some(&mask), 0.3)?;
        let diff = (fast - slow)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }

    #[test]
    fn fused_cpu_path_over_a_strided_cache_view_equals_repeated_kv() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 6, 1, 8), &dev)?;
        // A cache with slack: attend to a narrowed, non-contiguous view of it.
        let k_all = Tensor::randn(0f32, 1.0, (1, 2, 40, 8), &dev)?;
        let v_all = Tensor::randn(0f32, 1.0, (1, 2, 40, 8), &dev)?;
        let (k, v) = (k_all.narrow(2, 3, 29)?, v_all.narrow(2, 3, 29)?);
        let fast = attention(&q, &k, &v, None, 0.3, true)?;
        let slow = naive_attention(&q, &k, &v, None, 0.3)?;
        let diff = (fast - slow)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        // Several queries per head take the general path.
        let q2 = Tensor::randn(0f32, 1.0, (1, 6, 3, 8), &dev)?;
        let fast = attention(&q2, &k, &v, None, 0.3, true)?;
        let slow = naive_attention(&q2, &k, &v, None, 0.3)?;
        let diff = (fast - slow)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }

    #[test]
    fn the_cpu_kernel_over_ragged_rows_equals_each_row_alone() -> Result<()> {
        let dev = Device::Cpu;
        // Rows of a right-aligned batch over a cache view with slack: a short cache (one tile)
        // and a long one whose rows' real entries straddle tiles differently from the slots'.
        for (cap, l, visible) in [
            (40, 29, vec![29, 12, 1]),
            (
                2 * DECODE_TILE + 80,
                2 * DECODE_TILE + 50,
                vec![2 * DECODE_TILE + 50, DECODE_TILE + 20, DECODE_TILE, 1],
            ),
        ] {
            let n_rows = visible.len();
            let q = Tensor::randn(0f32, 1.0, (n_rows, 6, 1, 8), &dev)?;
            let k_all = Tensor::randn(0f32, 1.0, (n_rows, 2, cap, 8), &dev)?;
            let v_all = Tensor::randn(0f32, 1.0, (n_rows, 2, cap, 8), &dev)?;
            let (k, v) = (k_all.narrow(2, 3, l)?, v_all.narrow(2, 3, l)?);
            let mask = right_aligned_mask(&visible, l, &dev)?;
            let fast = attention(&q, &k, &v, Some(&mask), 0.3, true)?;
            let masked_slow =
                naive_attention(&q, &k, &v, Some(&mask.reshape((n_rows, 1, 1, l))?), 0.3)?;
            let diff = (&fast - masked_slow)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-5, "{diff}");
            for (r, &n) in visible.iter().enumerate() {
                // The row alone, over its own entries only: the same arithmetic, bit for bit.
                let row = |t: &Tensor| t.narrow(0, r, 1);
                let alone = attention(
                    &row(&q)?,
                    &row(&k)?.narrow(2, l - n, n)?,
                    &row(&v)?.narrow(2, l - n, n)?,
                    None,
                    0.3,
                    true,
                )?;
                let diff = (row(&fast)? - alone)?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f32>()?;
                assert_eq!(diff, 0.0, "row {r} of {l} slots");
            }
        }
        Ok(())
    }

    #[test]
    fn the_band_kernel_equals_masked_attention_over_a_strided_view() -> Result<()> {
        let dev = Device::Cpu;
        // More queries than one block, over a cache view with slack before and after, with and
        // without a window, grouped query heads.
        let (c, l) = (2 * BAND_QUERY_BLOCK + 45, 2 * BAND_QUERY_BLOCK + 95);
        let q = Tensor::randn(0f32, 1.0, (2, 6, c, 8), &dev)?;
        let k_all = Tensor::randn(0f32, 1.0, (2, 2, l + 30, 8), &dev)?;
        let v_all = Tensor::randn(0f32, 1.0, (2, 2, l + 30, 8), &dev)?;
        let (k, v) = (k_all.narrow(2, 10, l)?, v_all.narrow(2, 10, l)?);
        for window in [Some(1), Some(70), None] {
            let fast = band_attention_cpu(&q, &k, &v, window, 0.3)?
                .ok_or(crate::Error::Input("declined".into()))?;
            let mask = causal_mask(c, l, l - c, 0, window, &dev)?;
            let slow = naive_attention(&q, &k, &v, Some(&mask), 0.3)?;
            let diff = (fast - slow)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "window {window:?}: {diff}");
        }
        Ok(())
    }

    #[test]
    fn causal_window_mask_admits_exactly_window_keys() -> Result<()> {
        let m: Vec<Vec<f32>> = causal_mask(3, 6, 3, 0, Some(2), &Device::Cpu)?.to_vec2()?;
        // query at position 3 sees keys 2 and 3; position 5 sees 4 and 5.
        let seen: Vec<Vec<usize>> = m
            .iter()
            .map(|row| (0..6).filter(|&j| row[j] == 0.0).collect())
            .collect();
        assert_eq!(seen, vec![vec![2, 3], vec![3, 4], vec![4, 5]]);
        Ok(())
    }
}
