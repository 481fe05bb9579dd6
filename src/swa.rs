//! Sliding-window attention, the alternative self-decoder mixer (`sliding_window` in params.json).
//!
//! `H = n_self_heads` heads of size `d = dim / H`, no GQA, RoPE on q and k, softmax with scale
//! `1/sqrt(d)`. Query `i` sees exactly the `W` keys `i-W+1 ..= i` (itself included).
//!
//! The cache keeps the last `W - 1` keys and values in chronological order (with slack, so it is
//! compacted once per `W` tokens rather than shifted every token). A chunk of `C` new tokens
//! attends over those `W - 1` retained keys plus its own `C`.

use candle_core::Tensor;

use crate::attention::attention;
use crate::cache::KvBuffer;
use crate::linear::Linear;
use crate::rope::RopeTables;
use crate::Result;

/// Weights of one sliding-window attention layer.
#[derive(Clone, Debug)]
pub struct SlidingWindowAttention {
    /// `q_proj`, `k_proj` and `v_proj` fused, in that order.
    pub(crate) qkv: Linear,
    pub(crate) out_proj: Linear,
    pub(crate) n_heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) window: usize,
}

impl SlidingWindowAttention {
    /// Mixes a chunk `x: (B, C, dim)` (already normalised), appending its keys and values to
    /// `cache`. `mask` is the additive mask over the keys this chunk sees (`(C, L)` or per row
    /// `(B, 1, 1, C, L)`), built once per chunk by the model for all layers; `L` is the number
    /// of trailing cache slots attended to.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        cache: &mut KvBuffer,
        mask: Option<&Tensor>,
        l: usize,
    ) -> Result<Tensor> {
        let (b, c, dim) = x.dims3()?;
        let (h, d) = (self.n_heads, self.head_dim);
        let heads = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, c, h, d))?.transpose(1, 2)?.contiguous()?)
        };
        let [q, k, v] = self.qkv.forward_parts(x)?;
        let (q, k, v) = (rope.apply(&heads(q)?)?, rope.apply(&heads(k)?)?, heads(v)?);
        cache.make_room(c, Some(self.window))?;
        cache.append(&k, &v)?;
        let (keys, values) = cache.last(l)?;
        let o = attention(&q, &keys, &values, mask, 1.0 / (d as f64).sqrt())?;
        let o = o.transpose(1, 2)?.reshape((b, c, dim))?;
        self.out_proj.forward(&o)
    }
}
