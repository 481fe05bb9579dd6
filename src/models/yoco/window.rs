//! Sliding-window attention, YOCO's alternative self-decoder mixer (`sliding_window` in
//! params.json): `H = n_self_heads` heads of size `d = dim / H`, no GQA, RoPE on q and k, softmax
//! with scale `1/sqrt(d)`, over the keys [`WindowState`](crate::layers::window_kv::WindowState) gives each query (the last `W`, itself
//! included).

use candle_core::Tensor;

use crate::checkpoint::catalogue::LinearSpec;
use crate::layers::linear::Linear;
use crate::layers::rope::RopeTables;
use crate::layers::window_kv::WindowSlot;
use crate::layers::{merge_heads, Weights};
use crate::Result;

/// Weights of one sliding-window attention layer.
#[derive(Clone, Debug)]
pub(crate) struct SlidingWindowAttention {
    /// `q_proj`, `k_proj` and `v_proj` fused, in that order.
    qkv: Linear,
    out_proj: Linear,
    n_heads: usize,
    head_dim: usize,
    /// May the CPU decode-attention kernel run?
    native: bool,
}

impl SlidingWindowAttention {
    /// The layer of `qkv` (fused `q, k, v`) and `out`, with `n_heads` heads of size `head_dim`.
    pub(crate) fn load(
        w: &Weights,
        (qkv, out): (&LinearSpec, &LinearSpec),
        (n_heads, head_dim): (usize, usize),
    ) -> Result<Self> {
        Ok(SlidingWindowAttention {
            qkv: Linear::load(w, qkv)?,
            out_proj: Linear::load(w, out)?,
            n_heads,
            head_dim,
            native: w.native_kernels,
        })
    }

    /// Mixes a chunk `x: (B, C, dim)` (already normalised): its keys and values go into `slot`,
    /// and its queries attend over what the slot's chunk sees.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        slot: &WindowSlot,
    ) -> Result<Tensor> {
        let h = self.n_heads;
        let p = self.qkv.project(x)?;
        let q = p.heads(0, h, Some(rope), None)?;
        let k = p.heads(1, h, Some(rope), None)?;
        let v = p.heads(2, h, None, None)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let o = slot.attend(&q, &k, &v, scale, self.native)?;
        self.out_proj.forward(&merge_heads(&o)?)
    }
}
