//! The midpoint global K/V and the cross-decoder that reuses it.
//!
//! This is what makes YOCO a decoder-decoder: the self-decoder's output `X` is projected *once*
//! into keys and values (`KvBuilder`), and every cross-decoder layer attends to that same K/V
//! with its own queries (`CrossAttention` owns only `q_proj` and `out_proj`).
//!
//! * `K = RoPE(kv_layer_norm(X) k_proj)`, `V = kv_layer_norm(X) v_proj`: RoPE on K only;
//! * `q = RoPE(RMSNorm(x) q_proj)`, softmax attention with scale `1/sqrt(hd)`, grouped-query:
//!   query head `h` reads K/V head `h / (n_attn_heads / n_attn_kv_heads)`.

use candle_core::Tensor;

use crate::attention::attention;
use crate::cache::KvBuffer;
use crate::linear::Linear;
use crate::norm::RmsNorm;
use crate::rope::RopeTables;
use crate::Result;

/// Builds the global K/V from the self-decoder's output.
#[derive(Clone, Debug)]
pub struct KvBuilder {
    pub(crate) kv_layer_norm: RmsNorm,
    /// `k_proj` and `v_proj` fused, in that order.
    pub(crate) kv_proj: Linear,
    pub(crate) n_kv_heads: usize,
    pub(crate) head_dim: usize,
}

impl KvBuilder {
    /// Projects `x: (B, C, dim)` and appends the chunk's K/V to `global`.
    pub(crate) fn append(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        global: &mut KvBuffer,
    ) -> Result<()> {
        let (b, c, _) = x.dims3()?;
        let heads = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, c, self.n_kv_heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let xn = self.kv_layer_norm.forward(x)?;
        let [k, v] = self.kv_proj.forward_parts(&xn)?;
        let (k, v) = (rope.apply(&heads(k)?)?, heads(v)?);
        global.append(&k, &v)
    }
}

/// The attention of one cross-decoder layer.
#[derive(Clone, Debug)]
pub struct CrossAttention {
    pub(crate) q_proj: Linear,
    pub(crate) out_proj: Linear,
    pub(crate) n_heads: usize,
    pub(crate) head_dim: usize,
}

impl CrossAttention {
    /// Queries `x: (B, C, dim)` (already normalised) against the global `k, v: (B, H_kv, L, hd)`.
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, c, dim) = x.dims3()?;
        let q = self
            .q_proj
            .forward(x)?
            .reshape((b, c, self.n_heads, self.head_dim))?;
        let q = rope.apply(&q.transpose(1, 2)?.contiguous()?)?;
        let o = attention(&q, k, v, mask, 1.0 / (self.head_dim as f64).sqrt())?;
        let o = o.transpose(1, 2)?.reshape((b, c, dim))?;
        self.out_proj.forward(&o)
    }
}
