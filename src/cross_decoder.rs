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

use crate::checkpoint::catalogue::{Catalogue, CrossSpec};
use crate::checkpoint::config::Config;
use crate::layers::attention::{attention_over_blocks, causal_mask, right_aligned_mask, KeyBlock};
use crate::layers::constants::{ConstKey, Constants};
use crate::layers::kv_buffer::{get_entries, put_entries, KvBuffer};
use crate::layers::linear::Linear;
use crate::layers::norm::RmsNorm;
use crate::layers::rope::RopeTables;
use crate::layers::{merge_heads, Weights};
use crate::Result;

/// Builds the global K/V from the self-decoder's output.
#[derive(Clone, Debug)]
pub(crate) struct KvBuilder {
    kv_layer_norm: RmsNorm,
    /// `k_proj` and `v_proj` fused, in that order.
    kv_proj: Linear,
    n_kv_heads: usize,
}

/// The one K/V cache of the model, `(B, H_kv, T, hd)` keys and values: the only state that
/// grows with the sequence, and the one place that decides which of its rows a cross-decoder
/// query sees.
#[derive(Clone, Debug)]
pub(crate) struct GlobalKv {
    buf: KvBuffer,
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

/// What the cross-decoder's queries of one chunk read: views of the global keys and values, in
/// blocks of keys with their masks.
pub(crate) struct GlobalView {
    k: Tensor,
    v: Tensor,
    blocks: Vec<KeyBlock>,
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

impl GlobalKv {
    /// An empty global K/V for `batch` sequences, in `dtype`.
    pub(crate) fn new(cfg: &Config, batch: usize, dtype: DType, device: &Device) -> Result<Self> {
        GlobalKv::with_shape(
            (batch, cfg.n_attn_kv_heads, cfg.attn_head_dim()),
            dtype,
            device,
        )
    }

    /// An empty global K/V of `(batch, heads, head_dim)` entries, in `dtype`.
    pub(crate) fn with_shape(
        shape: (usize, usize, usize),
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Ok(GlobalKv {
            buf: KvBuffer::new(1, shape, 0, dtype, device)?,
        })
    }

    /// Tokens each row has seen: the global K/V holds exactly one entry per token.
    pub(crate) fn positions(&self) -> &[usize] {
        self.buf.filled()
    }

    /// Appends a chunk's `k, v: (B, H_kv, C, hd)` for every row.
    pub(crate) fn append(&mut self, (k, v): (Tensor, Tensor)) -> Result<()> {
        let pending = self.buf.begin(k.dim(2)?, None)?;
        self.buf.write(&pending, 0, &k, &v)?;
        self.buf.commit(pending);
        Ok(())
    }

    /// What the cross-decoder's `queries` of the last appended chunk of `c` tokens see: each
    /// query sees its own position and every earlier one. `queries` is `c` (every position) or 1
    /// (the last position of each row, whose rows may have different histories).
    pub(crate) fn view(&self, queries: usize, c: usize, consts: &Constants) -> Result<GlobalView> {
        let len = self.buf.len();
        let (k, v) = self.buf.last(0, len)?;
        let device = self.buf.device()?;
        let blocks = if queries > 1 {
            // Several queries per row need every row at the same position (checked by the
            // model). The chunk's own keys, causally (so every query sees one key of the first
            // block), then everything before it in unmasked blocks of the chunk's size: no mask
            // or score matrix is ever larger than a chunk's.
            let own = KeyBlock {
                keys: len - c..len,
                mask: Some(consts.get(ConstKey::causal(c), || {
                    causal_mask(c, c, 0, 0, None, &device)
                })?),
            };
            let earlier = (0..len - c).step_by(c.max(1)).map(|start| KeyBlock {
                keys: start..(start + c).min(len - c),
                mask: None,
            });
            std::iter::once(own).chain(earlier).collect()
        } else {
            let mask = if self.buf.is_uniform() {
                None
            } else {
                // Rows own different numbers of the trailing slots.
                Some(right_aligned_mask(self.buf.filled(), len, &device)?)
            };
            vec![KeyBlock { keys: 0..len, mask }]
        };
        Ok(GlobalView { k, v, blocks })
    }

    /// Makes room for `total` entries per row at once, so that a known-length generation never
    /// reallocates (and never over-allocates).
    pub(crate) fn reserve(&mut self, total_positions: usize) -> Result<()> {
        let shortest = self.positions().iter().copied().min().unwrap_or(0);
        let extra = total_positions.saturating_sub(shortest);
        self.buf.reserve(self.buf.len() + extra)
    }

    /// Bytes of the entries in use.
    pub(crate) fn bytes(&self) -> usize {
        self.buf.bytes_of(self.buf.len())
    }

    /// Bytes allocated, slack included.
    pub(crate) fn bytes_allocated(&self) -> usize {
        self.buf.bytes_allocated()
    }

    /// Forgets every entry (the allocation is kept).
    pub(crate) fn reset(&mut self) {
        self.buf.clear();
    }

    /// One batch of the rows of `parts`, right-aligned, keeping the largest slack among them (so
    /// that a reservation made for any part holds).
    pub(crate) fn stack(parts: &[&GlobalKv]) -> Result<Self> {
        let slack = parts.iter().map(|p| p.buf.slack()).max().unwrap_or(0);
        let bufs: Vec<&KvBuffer> = parts.iter().map(|p| &p.buf).collect();
        Ok(GlobalKv {
            buf: KvBuffer::stack(&bufs, slack)?,
        })
    }

    /// Gives back the slack (see [`KvBuffer::shrink_to_fit`]).
    pub(crate) fn shrink_to_fit(&mut self) -> Result<()> {
        self.buf.shrink_to_fit(None)
    }

    /// The rows `rows`, in that order.
    pub(crate) fn select(&self, rows: &[usize]) -> Result<Self> {
        Ok(GlobalKv {
            buf: self.buf.select(rows)?,
        })
    }

    /// Writes every entry as `global.{k,v,filled}`.
    pub(crate) fn save(&self, out: &mut HashMap<String, Tensor>) -> Result<()> {
        let (k, v, filled) = self.buf.snapshot(0, self.buf.len())?;
        put_entries(out, "global", k, v, &filled)
    }

    /// Reads what [`GlobalKv::save`] wrote for `batch` sequences of config `cfg`.
    pub(crate) fn load(
        file: &HashMap<String, Tensor>,
        cfg: &Config,
        batch: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let shape = (batch, cfg.n_attn_kv_heads, cfg.attn_head_dim());
        GlobalKv::load_shaped(file, shape, dtype, device)
    }

    /// [`GlobalKv::load`] for entries of `(batch, heads, head_dim)`.
    pub(crate) fn load_shaped(
        file: &HashMap<String, Tensor>,
        shape: (usize, usize, usize),
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (k, v, filled) = get_entries(file, "global", shape)?;
        Ok(GlobalKv {
            buf: KvBuffer::from_entries(vec![(k, v)], filled, dtype, device)?,
        })
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

impl GlobalView {
    /// Softmax attention of `q: (B, H, C, d)` (grouped-query) over the keys each query sees.
    pub(crate) fn attend(&self, q: &Tensor, scale: f64, native: bool) -> Result<Tensor> {
        attention_over_blocks(q, &self.k, &self.v, &self.blocks, scale, native)
    }
}
