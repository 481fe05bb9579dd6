//! The keys and values of windowed attention layers, the one place that decides which keys a
//! windowed query sees: query `i` sees exactly the `W` keys `i-W+1 ..= i` (itself included).
//! Both families use it (YOCO's sliding-window self-decoder, Phi-4-mini-flash's windowed
//! differential attention).
//!
//! [`WindowState`] keeps, for every windowed layer, the last `W - 1` keys and values in
//! chronological order, with slack so that it is compacted once per window of tokens rather than
//! shifted every token. All layers share one fill record (they are written by the same chunks),
//! so what a chunk sees, and its mask, is decided once per chunk for all of them: a chunk of `C`
//! new tokens attends over the `W - 1` retained keys plus its own `C`.

use std::collections::HashMap;
use std::ops::Range;

use candle_core::{DType, Device, Tensor};

use crate::kernels::attention::band_attention_cpu;
use crate::layers::attention::{attention_over_blocks, causal_mask, right_aligned_mask, KeyBlock};
use crate::layers::constants::{ConstKey, Constants};
use crate::layers::kv_buffer::{get_entries, put_entries, KvBuffer, Pending};
use crate::{Error, Result};

/// The keys and values of every sliding-window layer of one batch of sequences.
#[derive(Clone, Debug)]
pub(crate) struct WindowState {
    /// One `(B, H, capacity, d)` pair per layer, one fill record.
    buf: KvBuffer,
    /// `W`: keys a query sees, itself included.
    window: usize,
}

/// One chunk being written: where its keys go and what its queries see (the same for every
/// layer).
pub(crate) struct WindowChunk {
    pending: Pending,
    /// Trailing slots the chunk's queries attend over, the chunk's own included.
    l: usize,
    /// The chunk's queries in blocks, each with the slots (of those `l`) it sees and its mask.
    blocks: Vec<QueryBlock>,
    /// `W`, for the CPU kernel that applies it without masks.
    window: usize,
}

/// Queries `queries` of a chunk see keys `keys.keys` of its view, through `keys.mask`: `(Q, K)`,
/// or `(B, 1, 1, 1, K)` for single queries of rows with different histories, or `None` when
/// every query sees every key.
struct QueryBlock {
    queries: Range<usize>,
    keys: KeyBlock,
}

/// Queries per block of a windowed prefill chunk. One block would score every query of the chunk
/// against all `W - 1 + C` keys, of which each sees only `W`; blocks of 128 queries score
/// `W + 127` keys each (for W = 1024 and C = 512: 1151 instead of 1535 per query).
const QUERY_BLOCK: usize = 128;

/// One layer's part of a [`WindowState`] during a chunk.
pub(crate) struct WindowSlot<'a> {
    buf: &'a KvBuffer,
    chunk: &'a WindowChunk,
    layer: usize,
}

impl WindowSlot<'_> {
    /// Writes this layer's keys and values of the chunk, `k, v: (B, H_kv, C, d)`, and attends
    /// the chunk's queries `q: (B, H, C, d)` over the keys each sees (the last `W`, its own
    /// included): `(B, H, C, d)`. `native`: the CPU kernels may run.
    pub(crate) fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
        native: bool,
    ) -> Result<Tensor> {
        let (keys, values) = self.write_and_view(k, v)?;
        if native && q.dim(2)? > 1 {
            let band =
                band_attention_cpu(q, &keys, &values, Some(self.chunk.window), scale as f32)?;
            if let Some(o) = band {
                return Ok(o);
            }
        }
        let outs = self
            .chunk
            .blocks
            .iter()
            .map(|block| {
                let q = q.narrow(2, block.queries.start, block.queries.len())?;
                attention_over_blocks(
                    &q,
                    &keys,
                    &values,
                    std::slice::from_ref(&block.keys),
                    scale,
                    native,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(match outs.as_slice() {
            [one] => one.clone(),
            _ => Tensor::cat(&outs, 2)?,
        })
    }

    /// Writes this layer's keys and values of the chunk, `(B, H, C, d)`, and returns views of
    /// the slots its queries attend over.
    fn write_and_view(&self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        self.buf.write(&self.chunk.pending, self.layer, k, v)?;
        self.buf.tail(&self.chunk.pending, self.layer, self.chunk.l)
    }
}

/// Name of layer `i`'s entries in a saved cache.
fn saved_name(i: usize) -> String {
    format!("layers.{i}")
}

impl WindowState {
    /// An empty state for `batch` sequences and `n_layers` layers of `n_heads` heads of size
    /// `head_dim`, keys and values in `dtype`.
    pub(crate) fn new(
        n_layers: usize,
        (batch, n_heads, head_dim): (usize, usize, usize),
        window: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Ok(WindowState {
            buf: KvBuffer::new(n_layers, (batch, n_heads, head_dim), 0, dtype, device)?,
            window,
        })
    }

    /// Number of layers.
    pub(crate) fn n_layers(&self) -> usize {
        self.buf.n_layers()
    }

    /// Entries that still matter: the last `W - 1` (the next query sees them and itself).
    fn kept(&self) -> usize {
        self.window - 1
    }

    /// Opens a chunk of `c` new tokens: makes room (compacting to the last `W - 1` entries when
    /// full) and decides what the chunk's queries see. A chunk of several tokens needs every row
    /// at the same place in its sequence (the model checks this); single tokens may come from
    /// rows with different histories.
    pub(crate) fn begin(&mut self, c: usize, consts: &Constants) -> Result<WindowChunk> {
        let w = self.window;
        let device = self.buf.device()?;
        let (l, blocks) = if c == 1 {
            // One query per row: its own key plus up to W - 1 earlier ones.
            let visible: Vec<usize> = self.buf.filled().iter().map(|f| (f + 1).min(w)).collect();
            let l = visible.iter().copied().max().unwrap_or(1);
            let mask = if visible.iter().all(|&n| n == l) {
                None
            } else {
                Some(right_aligned_mask(&visible, l, &device)?)
            };
            let keys = KeyBlock { keys: 0..l, mask };
            (
                l,
                vec![QueryBlock {
                    queries: 0..1,
                    keys,
                }],
            )
        } else {
            // The chunk's queries follow `retained` earlier keys; query i sees the W keys ending
            // at itself. A block of queries [a, b) sees keys [lo, retained + b) with
            // lo = retained + a + 1 - W (clipped at 0): a band that depends only on the block's
            // size, how many keys precede its first query, and W, so it is built once.
            let retained = self
                .buf
                .filled()
                .first()
                .copied()
                .unwrap_or(0)
                .min(self.kept());
            let l = retained + c;
            let blocks = (0..c)
                .step_by(QUERY_BLOCK)
                .map(|a| -> Result<QueryBlock> {
                    let b = (a + QUERY_BLOCK).min(c);
                    let lo = (retained + a + 1).saturating_sub(w);
                    let before = retained + a - lo;
                    let key = ConstKey::Window {
                        c: b - a,
                        retained: before,
                        window: w,
                    };
                    let mask = consts.get(key, || {
                        causal_mask(b - a, before + b - a, before, 0, Some(w), &device)
                    })?;
                    Ok(QueryBlock {
                        queries: a..b,
                        keys: KeyBlock {
                            keys: lo..retained + b,
                            mask: Some(mask),
                        },
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            (l, blocks)
        };
        let pending = self.buf.begin(c, Some(self.kept()))?;
        Ok(WindowChunk {
            pending,
            l,
            blocks,
            window: w,
        })
    }

    /// Each layer's slot of the chunk, in layer order.
    pub(crate) fn slots<'a>(
        &'a self,
        chunk: &'a WindowChunk,
    ) -> impl Iterator<Item = WindowSlot<'a>> {
        (0..self.buf.n_layers()).map(move |layer| WindowSlot {
            buf: &self.buf,
            chunk,
            layer,
        })
    }

    /// Records the chunk as written by every layer.
    pub(crate) fn commit(&mut self, chunk: WindowChunk) {
        self.buf.commit(chunk.pending);
    }

    /// Bytes of state: the last `W - 1` entries of every layer (slack is allocation, not state).
    pub(crate) fn bytes(&self) -> usize {
        self.buf.bytes_of(self.buf.len().min(self.kept()))
    }

    /// Bytes allocated, slack included.
    pub(crate) fn bytes_allocated(&self) -> usize {
        self.buf.bytes_allocated()
    }

    /// Forgets every entry (the allocation is kept).
    pub(crate) fn reset(&mut self) {
        self.buf.clear();
    }

    /// One batch of the rows of `parts`, right-aligned.
    pub(crate) fn stack(parts: &[&WindowState]) -> Result<Self> {
        let window = parts.first().map_or(1, |p| p.window);
        if parts.iter().any(|p| p.window != window) {
            return Err(Error::Input("caches of different windows".into()));
        }
        let bufs: Vec<&KvBuffer> = parts.iter().map(|p| &p.buf).collect();
        Ok(WindowState {
            buf: KvBuffer::stack(&bufs, 0)?,
            window,
        })
    }

    /// Gives back the slack: keeps exactly the `W - 1` entries that still matter.
    pub(crate) fn shrink_to_fit(&mut self) -> Result<()> {
        self.buf.shrink_to_fit(Some(self.kept()))
    }

    /// The rows `rows`, in that order.
    pub(crate) fn select(&self, rows: &[usize]) -> Result<Self> {
        Ok(WindowState {
            buf: self.buf.select(rows)?,
            window: self.window,
        })
    }

    /// Writes each layer's last `W - 1` entries as `layers.{i}.{k,v,filled}`.
    pub(crate) fn save(&self, out: &mut HashMap<String, Tensor>) -> Result<()> {
        for i in 0..self.buf.n_layers() {
            let (k, v, filled) = self.buf.snapshot(i, self.kept())?;
            put_entries(out, &saved_name(i), k, v, &filled)?;
        }
        Ok(())
    }

    /// Reads what [`WindowState::save`] wrote, for `n_layers` layers of `(batch, H, d)`.
    pub(crate) fn load(
        file: &HashMap<String, Tensor>,
        n_layers: usize,
        shape: (usize, usize, usize),
        window: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut entries = Vec::with_capacity(n_layers);
        let mut fills: Option<Vec<usize>> = None;
        for i in 0..n_layers {
            let (k, v, filled) = get_entries(file, &saved_name(i), shape)?;
            if k.dim(2)? > window.saturating_sub(1) {
                return Err(Error::Input(format!(
                    "`{}` holds more than the W - 1 = {} entries a window keeps",
                    saved_name(i),
                    window.saturating_sub(1)
                )));
            }
            // One fill record for all layers: they were written by the same chunks.
            if fills.as_ref().is_some_and(|f| *f != filled) {
                return Err(Error::Input(format!(
                    "`{}` has inconsistent fill counts",
                    saved_name(i)
                )));
            }
            fills = Some(filled);
            entries.push((k, v));
        }
        Ok(WindowState {
            buf: KvBuffer::from_entries(entries, fills.unwrap_or_default(), dtype, device)?,
            window,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(x: f32) -> Result<Tensor> {
        Ok(Tensor::full(x, (1, 1, 1, 1), &Device::Cpu)?)
    }

    /// Seven tokens through two layers of window 3: layer `i` writes `10 t + i` at token `t`.
    fn filled_state() -> Result<WindowState> {
        let consts = Constants::default();
        let mut state = WindowState::new(2, (1, 1, 1), 3, DType::F32, &Device::Cpu)?;
        for t in 0..7 {
            let chunk = state.begin(1, &consts)?;
            for (i, slot) in state.slots(&chunk).enumerate() {
                let x = value((10 * t + i) as f32)?;
                let (keys, _) = slot.write_and_view(&x, &x)?;
                // A query sees itself and at most W - 1 = 2 earlier keys, in order.
                let seen: Vec<f32> = keys.flatten_all()?.to_vec1()?;
                let want: Vec<f32> = (t.saturating_sub(2)..=t)
                    .map(|s| (10 * s + i) as f32)
                    .collect();
                assert_eq!(seen, want, "token {t} layer {i}");
            }
            state.commit(chunk);
        }
        Ok(state)
    }

    #[test]
    fn each_query_sees_itself_and_the_w_minus_1_keys_before_it() -> Result<()> {
        filled_state().map(|_| ())
    }

    #[test]
    fn a_saved_window_keeps_the_last_w_minus_1_entries_of_every_layer_and_loads_back() -> Result<()>
    {
        let state = filled_state()?;
        let mut file = HashMap::new();
        state.save(&mut file)?;
        for i in 0..2 {
            let k: Vec<f32> = file[&format!("layers.{i}.k")].flatten_all()?.to_vec1()?;
            assert_eq!(k, vec![(50 + i) as f32, (60 + i) as f32]);
        }
        let mut back = WindowState::load(&file, 2, (1, 1, 1), 3, DType::F32, &Device::Cpu)?;
        assert_eq!(back.bytes(), state.bytes());
        // The restored state continues exactly as the original would.
        let consts = Constants::default();
        let chunk = back.begin(1, &consts)?;
        let slot = back
            .slots(&chunk)
            .nth(1)
            .ok_or(Error::Input("no layer 1".into()))?;
        let (keys, _) = slot.write_and_view(&value(71.0)?, &value(71.0)?)?;
        assert_eq!(
            keys.flatten_all()?.to_vec1::<f32>()?,
            vec![51.0, 61.0, 71.0]
        );
        // A file that claims more than W - 1 entries is refused.
        file.insert(
            "layers.0.k".into(),
            Tensor::zeros((1, 1, 3, 1), DType::F32, &Device::Cpu)?,
        );
        assert!(WindowState::load(&file, 2, (1, 1, 1), 3, DType::F32, &Device::Cpu).is_err());
        Ok(())
    }
}
