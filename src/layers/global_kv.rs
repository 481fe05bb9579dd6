//! The one global K/V of a YOCO-family model: `(B, H_kv, T, hd)` keys and values, the only state
//! that grows with the sequence, written once per token (YOCO's midpoint projection, or
//! Phi-4-mini-flash's full-attention layer) and read by every cross-decoder layer. It is the one
//! place that decides which of its rows a query sees, and it tells each sequence's position.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::layers::attention::{attention_over_blocks, causal_mask, right_aligned_mask, KeyBlock};
use crate::layers::constants::{ConstKey, Constants};
use crate::layers::kv_buffer::{get_entries, put_entries, KvBuffer};
use crate::Result;

/// The one K/V cache of the model, `(B, H_kv, T, hd)` keys and values: the only state that
/// grows with the sequence, and the one place that decides which of its rows a cross-decoder
/// query sees.
#[derive(Clone, Debug)]
pub(crate) struct GlobalKv {
    buf: KvBuffer,
}

/// What the cross-decoder's queries of one chunk read: views of the global keys and values, in
/// blocks of keys with their masks.
pub(crate) struct GlobalView {
    k: Tensor,
    v: Tensor,
    blocks: Vec<KeyBlock>,
}

impl GlobalKv {
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

    /// The dtype its keys and values are kept in.
    pub(crate) fn dtype(&self) -> Result<DType> {
        Ok(self.buf.shape()?.1)
    }

    /// Tokens each row has seen: the global K/V holds exactly one entry per token.
    pub(crate) fn positions(&self) -> &[usize] {
        self.buf.filled()
    }

    /// Appends a chunk's `k, v: (B, H_kv, C, hd)` for every row.
    pub(crate) fn append(&mut self, (k, v): (Tensor, Tensor)) -> Result<()> {
        // Kept in the dtype it was made with, which may be narrower than the model's.
        let dtype = self.dtype()?;
        let (k, v) = (k.to_dtype(dtype)?, v.to_dtype(dtype)?);
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

    /// Reads what [`GlobalKv::save`] wrote, entries of `(batch, heads, head_dim)`.
    pub(crate) fn load(
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

impl GlobalView {
    /// Softmax attention of `q: (B, H, C, d)` (grouped-query) over the keys each query sees.
    pub(crate) fn attend(&self, q: &Tensor, scale: f64, native: bool) -> Result<Tensor> {
        attention_over_blocks(q, &self.k, &self.v, &self.blocks, scale, native)
    }
}
