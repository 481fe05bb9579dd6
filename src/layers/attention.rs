//! Softmax attention shared by the sliding-window self-decoder and the cross-decoder.
//!
//! Grouped-query attention without repeating K/V: the `G = H / H_kv` query heads that share a
//! key/value head are stacked into one matrix, so each K/V head is read once.

use std::ops::Range;

use candle_core::{DType, Tensor, D};

use crate::kernels::attention::decode_grouped_cpu;
use crate::kernels::fused;
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
/// result has `q`'s dtype (K/V kept in another are widened), shape `(B, H, C, d)`. One decode query per head on CPU in f32 takes
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
    // The kernel reads f32 queries over f32, f16 or bf16 keys and values (a global K/V kept in
    // half precision to halve what a long-context step reads).
    let cpu_f32 = q.device().is_cpu() && q.dtype() == DType::F32;
    // One query per row: the kernel, also for a batch of rows with one mask row each (rows of a
    // right-aligned batch, `(B, 1, 1, 1, L)`).
    let row_mask = mask.is_none_or(|m| m.dims() == [b, 1, 1, 1, l] && m.dtype() == DType::F32);
    if native && c == 1 && cpu_f32 && row_mask {
        if let Some(out) = decode_grouped_cpu(q, k, v, mask, scale as f32)? {
            return Ok(out);
        }
    }
    // Elsewhere K/V kept in another dtype than the queries' are widened (a prompt chunk's many
    // queries make the copy a small part of the work).
    let (k, v) = (&k.to_dtype(q.dtype())?, &v.to_dtype(q.dtype())?);
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
        // K/V kept in another dtype than the queries' are widened a block at a time.
        let (kb, vb) = (
            k.narrow(2, block.keys.start, n)?.to_dtype(q.dtype())?,
            v.narrow(2, block.keys.start, n)?.to_dtype(q.dtype())?,
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
        let pv = p.to_dtype(vb.dtype())?.matmul(&vb)?.to_dtype(DType::F32)?;
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
        .to_dtype(q.dtype())?
        .reshape((b, h, c, d))?)
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
    use crate::kernels::attention::{band_attention_cpu, BAND_QUERY_BLOCK, DECODE_TILE};
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

    /// K/V kept in f16 or bf16 give what their exact f32 widening gives: bit for bit through
    /// the decode kernel (which widens each row as it reads it), and through the general path
    /// (several queries, blocks of keys, the portable ops) within float rounding of the naive
    /// formula over the widened values.
    #[test]
    fn half_precision_kv_equals_its_f32_widening() -> Result<()> {
        let dev = Device::Cpu;
        let l = 2 * DECODE_TILE + 37;
        let q1 = Tensor::randn(0f32, 1.0, (2, 6, 1, 16), &dev)?;
        let q3 = Tensor::randn(0f32, 1.0, (2, 6, 3, 16), &dev)?;
        let k_all = Tensor::randn(0f32, 1.0, (2, 2, l + 9, 16), &dev)?;
        let v_all = Tensor::randn(0f32, 1.0, (2, 2, l + 9, 16), &dev)?;
        let mask = right_aligned_mask(&[l, l - 100], l, &dev)?;
        let max_diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?)
        };
        for dtype in [DType::F16, DType::BF16] {
            let half = |t: &Tensor| t.to_dtype(dtype)?.narrow(2, 5, l);
            let (k, v) = (half(&k_all)?, half(&v_all)?);
            let (kw, vw) = (k.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?);
            let got = attention(&q1, &k, &v, Some(&mask), 0.3, true)?;
            assert_eq!(got.dtype(), DType::F32);
            let want = attention(&q1, &kw, &vw, Some(&mask), 0.3, true)?;
            assert_eq!(max_diff(&got, &want)?, 0.0, "{dtype:?} decode kernel");
            let row_mask = mask.reshape((2, 1, 1, l))?;
            let naive = naive_attention(&q1, &kw, &vw, Some(&row_mask), 0.3)?;
            for native in [true, false] {
                let got = attention(&q1, &k, &v, Some(&mask), 0.3, native)?;
                assert!(max_diff(&got, &naive)? < 1e-5, "{dtype:?} native {native}");
            }
            let blocks = [
                KeyBlock {
                    keys: 100..l,
                    mask: None,
                },
                KeyBlock {
                    keys: 0..100,
                    mask: None,
                },
            ];
            let got = attention_over_blocks(&q3, &k, &v, &blocks, 0.3, true)?;
            let naive = naive_attention(&q3, &kw, &vw, None, 0.3)?;
            assert!(max_diff(&got, &naive)? < 1e-5, "{dtype:?} blocks");
        }
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
