//! The midpoint's global K/V and the cross-decoder that reuses it.
//!
//! This is what makes YOCO a decoder-decoder: the self-decoder's output `X` is projected *once*
//! into keys and values ([`KvBuilder`]), kept in the one cache that grows with the sequence
//! ([`GlobalKv`]), and every cross-decoder layer attends to that same K/V with its own queries
//! ([`CrossAttention`] owns only `q_proj` and `out_proj`).
//!
//! * `K = RoPE(kv_layer_norm(X) k_proj)`, `V = kv_layer_norm(X) v_proj`: RoPE on K only;
//! * `q = RoPE(RMSNorm(x) q_proj)`, softmax attention with scale `1/sqrt(hd)`, grouped-query:
//!   query head `h` reads K/V head `h / (n_attn_heads / n_attn_kv_heads)`; causal over positions.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::layers::global_kv::{GlobalKv, GlobalView};
use crate::layers::linear::Linear;
use crate::layers::norm::RmsNorm;
use crate::layers::rope::RopeTables;
use crate::layers::{merge_heads, Weights};
use crate::models::yoco::catalogue::{Catalogue, CrossSpec};
use crate::models::yoco::config::Config;
use crate::Result;

/// Builds the global K/V from the self-decoder's output.
#[derive(Clone, Debug)]
pub(crate) struct KvBuilder {
    kv_layer_norm: RmsNorm,
    /// `k_proj` and `v_proj` fused, in that order.
    kv_proj: Linear,
    n_kv_heads: usize,
}

/// The attention of one cross-decoder layer.
#[derive(Clone, Debug)]
pub(crate) struct CrossAttention {
    q_proj: Linear,
    out_proj: Linear,
    n_heads: usize,
    head_dim: usize,
    /// May the CPU decode-attention kernel run?
    native: bool,
}

impl KvBuilder {
    /// The global K/V projection of `catalogue`.
    pub(crate) fn load(w: &Weights, catalogue: &Catalogue, cfg: &Config) -> Result<Self> {
        Ok(KvBuilder {
            kv_layer_norm: RmsNorm::load(w, &catalogue.kv_layer_norm, cfg.norm_eps)?,
            kv_proj: Linear::load(w, &catalogue.kv)?,
            n_kv_heads: cfg.n_attn_kv_heads,
        })
    }

    /// This chunk's keys and values from the self-decoder output `x: (B, C, dim)`:
    /// `(B, H_kv, C, hd)` each, RoPE on the keys.
    pub(crate) fn forward(&self, x: &Tensor, rope: &RopeTables) -> Result<(Tensor, Tensor)> {
        let xn = self.kv_layer_norm.forward(x)?;
        let p = self.kv_proj.project(&xn)?;
        let h = self.n_kv_heads;
        Ok((p.heads(0, h, Some(rope), None)?, p.heads(1, h, None, None)?))
    }
}

impl CrossAttention {
    /// The cross-decoder mixer of `spec`, with `n_heads` query heads of size `head_dim`.
    pub(crate) fn load(
        w: &Weights,
        spec: &CrossSpec,
        (n_heads, head_dim): (usize, usize),
    ) -> Result<Self> {
        Ok(CrossAttention {
            q_proj: Linear::load(w, &spec.q)?,
            out_proj: Linear::load(w, &spec.out)?,
            n_heads,
            head_dim,
            native: w.native_kernels,
        })
    }

    /// Queries `x: (B, C, dim)` (already normalised) against the global K/V.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        global: &GlobalView,
    ) -> Result<Tensor> {
        let q = self
            .q_proj
            .project(x)?
            .heads(0, self.n_heads, Some(rope), None)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let o = global.attend(&q, scale, self.native)?;
        self.out_proj.forward(&merge_heads(&o)?)
    }
}

/// An empty global K/V for `batch` sequences of a YOCO model of config `cfg`, in `dtype`.
pub(crate) fn new_global_kv(
    cfg: &Config,
    batch: usize,
    dtype: DType,
    device: &Device,
) -> Result<GlobalKv> {
    GlobalKv::with_shape(
        (batch, cfg.n_attn_kv_heads, cfg.attn_head_dim()),
        dtype,
        device,
    )
}

/// Reads what [`GlobalKv::save`] wrote for `batch` sequences of a YOCO model of config `cfg`.
pub(crate) fn load_global_kv(
    file: &HashMap<String, Tensor>,
    cfg: &Config,
    batch: usize,
    dtype: DType,
    device: &Device,
) -> Result<GlobalKv> {
    let shape = (batch, cfg.n_attn_kv_heads, cfg.attn_head_dim());
    GlobalKv::load(file, shape, dtype, device)
}
