//! Keys and values that one or more layers write together, chunk by chunk: the sliding window's
//! buffers (one pair per self-decoder layer) and the global K/V (one pair).
//!
//! Each layer's pair is preallocated as `(B, H, capacity, d)` and written in place; it grows
//! geometrically (or exactly, after [`KvBuffer::reserve`]), so a decode step never re-copies the
//! whole buffer. The layers of one buffer share ONE record of what is filled, so they hold the
//! same slots by construction and one mask serves them all.
//!
//! Rows may sit at different positions (after [`KvBuffer::stack`]): the buffer is then
//! *right-aligned* (the newest entry of every row is in the same slot) and each row records how
//! many of the trailing slots are its own.
//!
//! A chunk is written in three steps: [`KvBuffer::begin`] makes room for it, each layer
//! [`KvBuffer::write`]s its keys and values and reads [`KvBuffer::tail`], and
//! [`KvBuffer::commit`] records the chunk for every layer at once.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// Keys and values of one or more layers with one fill record.
#[derive(Clone, Debug)]
pub(crate) struct KvBuffer {
    /// Per layer, `(B, H, capacity, d)` each.
    layers: Vec<(Tensor, Tensor)>,
    capacity: usize,
    /// Slots in use (the same for all rows and layers).
    len: usize,
    /// Per row: how many of the last `len` slots hold that row's entries.
    filled: Vec<usize>,
    /// Copy-on-write token: clones share the tensors until one of them writes (see `begin`).
    owner: Arc<()>,
}

/// A chunk being written: its slots are `start..start + c`.
#[derive(Debug)]
pub(crate) struct Pending {
    start: usize,
    c: usize,
}

impl KvBuffer {
    /// An empty buffer of `n_layers` pairs for `b` rows of `h` heads of size `d`.
    pub(crate) fn new(
        n_layers: usize,
        (b, h, d): (usize, usize, usize),
        capacity: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        // Never a zero-byte allocation: some CUDA drivers refuse those.
        let capacity = capacity.max(1);
        let layers = (0..n_layers)
            .map(|_| -> Result<(Tensor, Tensor)> {
                Ok((
                    Tensor::zeros((b, h, capacity, d), dtype, device)?,
                    Tensor::zeros((b, h, capacity, d), dtype, device)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvBuffer {
            layers,
            capacity,
            len: 0,
            filled: vec![0; b],
            owner: Arc::new(()),
        })
    }

    /// The device the entries live on.
    pub(crate) fn device(&self) -> Result<Device> {
        Ok(self.shape()?.2)
    }

    /// Number of layers sharing the buffer.
    pub(crate) fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Slots in use.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Per-row count of real entries.
    pub(crate) fn filled(&self) -> &[usize] {
        &self.filled
    }

    /// True when every row owns every slot in use (no per-row mask needed).
    pub(crate) fn is_uniform(&self) -> bool {
        self.filled.iter().all(|&f| f == self.len)
    }

    /// `(B, H, d)` of the pairs and their dtype.
    pub(crate) fn shape(&self) -> Result<((usize, usize, usize), DType, Device)> {
        let (k, _) = self
            .layers
            .first()
            .ok_or_else(|| Error::Input("a K/V buffer without layers".into()))?;
        let (b, h, _, d) = k.dims4()?;
        Ok(((b, h, d), k.dtype(), k.device().clone()))
    }

    /// Reallocates every layer to `capacity` slots, keeping the last `keep` entries (moved to the
    /// front). Also what makes a shared buffer this clone's own.
    fn reallocate(&mut self, capacity: usize, keep: usize) -> Result<()> {
        let ((b, h, d), dtype, device) = self.shape()?;
        let keep = keep.min(self.len);
        let mut fresh = KvBuffer::new(self.layers.len(), (b, h, d), capacity, dtype, &device)?;
        if keep > 0 {
            for ((k, v), (nk, nv)) in self.layers.iter().zip(&fresh.layers) {
                nk.slice_set(&k.narrow(2, self.len - keep, keep)?.contiguous()?, 2, 0)?;
                nv.slice_set(&v.narrow(2, self.len - keep, keep)?.contiguous()?, 2, 0)?;
            }
        }
        fresh.len = keep;
        fresh.filled = self.filled.iter().map(|&f| f.min(keep)).collect();
        *self = fresh;
        Ok(())
    }

    /// Opens a chunk of `c` new slots. With `keep_last = Some(n)` only the last `n` entries
    /// still matter (a sliding window keeps `W - 1`), so when the buffer is full older ones are
    /// dropped (compaction); otherwise it grows by at least half its size. A buffer shared with a
    /// clone is copied first, since the writes are in place.
    pub(crate) fn begin(&mut self, c: usize, keep_last: Option<usize>) -> Result<Pending> {
        if self.len + c > self.capacity {
            match keep_last {
                Some(n) => {
                    let keep = self.len.min(n);
                    // Slack of at least one window, so that compaction happens at most once per
                    // window of tokens: amortised O(1) copying per token. Compacting moves the
                    // kept entries to the front of a new allocation (a slot range of a tensor
                    // cannot be moved within itself).
                    let capacity = if keep + c <= self.capacity {
                        self.capacity
                    } else {
                        self.capacity.max(keep + c).max(2 * (n + 1) + c)
                    };
                    self.reallocate(capacity, keep)?;
                }
                None => {
                    let capacity = (self.len + c)
                        .max(self.capacity + self.capacity / 2)
                        .max(16);
                    self.reallocate(capacity, self.len)?;
                }
            }
        } else if Arc::strong_count(&self.owner) > 1 {
            self.reallocate(self.capacity, self.len)?;
        }
        Ok(Pending { start: self.len, c })
    }

    /// Writes layer `layer`'s keys and values of the pending chunk, `k, v: (B, H, C, d)`.
    pub(crate) fn write(&self, p: &Pending, layer: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let (lk, lv) = self.layer(layer)?;
        lk.slice_set(&k.contiguous()?, 2, p.start)?;
        lv.slice_set(&v.contiguous()?, 2, p.start)?;
        Ok(())
    }

    /// Views of layer `layer`'s last `n` slots, the pending chunk included: `(B, H, n, d)`.
    pub(crate) fn tail(&self, p: &Pending, layer: usize, n: usize) -> Result<(Tensor, Tensor)> {
        let end = p.start + p.c;
        let n = n.min(end);
        let (k, v) = self.layer(layer)?;
        Ok((k.narrow(2, end - n, n)?, v.narrow(2, end - n, n)?))
    }

    /// Records the pending chunk as written by every layer.
    pub(crate) fn commit(&mut self, p: Pending) {
        self.len = p.start + p.c;
        self.filled.iter_mut().for_each(|f| *f += p.c);
    }

    /// Views of layer `layer`'s last `n` committed slots, `(B, H, n, d)`, no copy.
    pub(crate) fn last(&self, layer: usize, n: usize) -> Result<(Tensor, Tensor)> {
        let n = n.min(self.len);
        let (k, v) = self.layer(layer)?;
        Ok((k.narrow(2, self.len - n, n)?, v.narrow(2, self.len - n, n)?))
    }

    fn layer(&self, layer: usize) -> Result<&(Tensor, Tensor)> {
        self.layers.get(layer).ok_or_else(|| {
            Error::Input(format!(
                "K/V buffer has {} layers, asked for layer {layer}",
                self.layers.len()
            ))
        })
    }

    /// Ensures capacity for `total` slots without dropping anything.
    pub(crate) fn reserve(&mut self, total: usize) -> Result<()> {
        if total > self.capacity {
            self.reallocate(total, self.len)?;
        }
        Ok(())
    }

    /// Slack: slots allocated beyond those in use.
    pub(crate) fn slack(&self) -> usize {
        self.capacity - self.len
    }

    /// Forgets every entry; the allocation is kept for reuse.
    pub(crate) fn clear(&mut self) {
        self.len = 0;
        self.filled.iter_mut().for_each(|f| *f = 0);
    }

    /// Bytes of `slots` slots of keys and values, over all layers.
    pub(crate) fn bytes_of(&self, slots: usize) -> usize {
        let Ok(((b, h, d), dtype, _)) = self.shape() else {
            return 0;
        };
        2 * self.layers.len() * b * h * slots * d * dtype.size_in_bytes()
    }

    /// Bytes allocated, slack included.
    pub(crate) fn bytes_allocated(&self) -> usize {
        self.bytes_of(self.capacity)
    }

    /// Stacks buffers (of one or more rows each) into one batch, right-aligned: the newest entry
    /// of every row lands in the same slot, and shorter parts are padded at the front (masked by
    /// `filled`). `slack` free slots are added after the last.
    pub(crate) fn stack(parts: &[&KvBuffer], slack: usize) -> Result<Self> {
        let first = parts
            .first()
            .ok_or_else(|| Error::Input("nothing to stack".into()))?;
        let ((_, h, d), dtype, device) = first.shape()?;
        let len = parts.iter().map(|p| p.len).max().unwrap_or(0);
        let capacity = (len + slack).max(1);
        for part in parts {
            let ((_, ph, pd), _, _) = part.shape()?;
            if (ph, pd) != (h, d) || part.layers.len() != first.layers.len() {
                return Err(Error::Input(
                    "Cache::stack takes caches of one model".into(),
                ));
            }
        }
        // Per layer, each part padded to `capacity` slots with its entries ending at `len` (a
        // part's rows are already right-aligned among themselves).
        let padded = |part: &KvBuffer, t: &Tensor| -> Result<Tensor> {
            let rows = t.dim(0)?;
            let out = Tensor::zeros((rows, h, capacity, d), dtype, &device)?;
            if part.len > 0 {
                out.slice_set(&t.narrow(2, 0, part.len)?.contiguous()?, 2, len - part.len)?;
            }
            Ok(out)
        };
        let layers = (0..first.layers.len())
            .map(|l| -> Result<(Tensor, Tensor)> {
                let (mut ks, mut vs) = (Vec::new(), Vec::new());
                for part in parts {
                    let (k, v) = part.layer(l)?;
                    ks.push(padded(part, k)?);
                    vs.push(padded(part, v)?);
                }
                Ok((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvBuffer {
            layers,
            capacity,
            len,
            filled: parts
                .iter()
                .flat_map(|p| p.filled.iter().copied())
                .collect(),
            owner: Arc::new(()),
        })
    }

    /// Gives back the slack: reallocates to exactly the last `keep` entries (all of them with
    /// `None`), a copy this buffer then owns alone.
    pub(crate) fn shrink_to_fit(&mut self, keep: Option<usize>) -> Result<()> {
        let keep = keep.unwrap_or(self.len).min(self.len);
        self.reallocate(keep, keep)
    }

    /// The rows `rows` (in that order) as a buffer of their own, right-aligned with only as many
    /// slots as its longest row needs, plus this buffer's slack.
    pub(crate) fn select(&self, rows: &[usize]) -> Result<Self> {
        let ((b, h, d), dtype, device) = self.shape()?;
        if let Some(&bad) = rows.iter().find(|&&r| r >= b) {
            return Err(Error::Input(format!(
                "row {bad} of a batch of {b} does not exist"
            )));
        }
        let len = rows.iter().map(|&r| self.filled[r]).max().unwrap_or(0);
        let mut out = KvBuffer::new(
            self.layers.len(),
            (rows.len(), h, d),
            len + self.slack(),
            dtype,
            &device,
        )?;
        if len > 0 {
            for ((k, v), (ok, ov)) in self.layers.iter().zip(&out.layers) {
                // Each selected row's last `len` slots, stacked in order.
                let pick = |t: &Tensor| -> Result<Tensor> {
                    let parts = rows
                        .iter()
                        .map(|&r| t.narrow(0, r, 1)?.narrow(2, self.len - len, len))
                        .collect::<candle_core::Result<Vec<_>>>()?;
                    Ok(Tensor::cat(&parts, 0)?.contiguous()?)
                };
                ok.slice_set(&pick(k)?, 2, 0)?;
                ov.slice_set(&pick(v)?, 2, 0)?;
            }
        }
        out.len = len;
        out.filled = rows.iter().map(|&r| self.filled[r]).collect();
        Ok(out)
    }

    /// Layer `layer`'s last `n` entries (contiguous) and each row's fill capped at `n`: what a
    /// saved cache keeps.
    pub(crate) fn snapshot(&self, layer: usize, n: usize) -> Result<(Tensor, Tensor, Vec<usize>)> {
        let (k, v) = self.last(layer, n)?;
        let n = n.min(self.len);
        let filled = self.filled.iter().map(|&f| f.min(n)).collect();
        Ok((k.contiguous()?, v.contiguous()?, filled))
    }

    /// A buffer holding exactly the given entries: per layer `(B, H, len, d)` keys and values
    /// (converted to `dtype` on `device`), with per-row fills `filled`. The inverse of
    /// [`KvBuffer::snapshot`]; every shape is checked, so a saved file cannot make it
    /// inconsistent.
    pub(crate) fn from_entries(
        entries: Vec<(Tensor, Tensor)>,
        filled: Vec<usize>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let bad = |m: String| Err(Error::Input(m));
        let Some((k0, _)) = entries.first() else {
            return bad("a K/V buffer needs at least one layer".into());
        };
        let (b, h, len, d) = k0.dims4()?;
        let dims = [b, h, len, d];
        if entries
            .iter()
            .any(|(k, v)| k.dims() != dims || v.dims() != dims)
        {
            return bad(format!("K/V entries of different shapes (first {dims:?})"));
        }
        if filled.len() != b || filled.iter().any(|&f| f > len) {
            return bad(format!(
                "fill counts {filled:?} do not fit {b} rows of {len} entries"
            ));
        }
        let mut out = KvBuffer::new(entries.len(), (b, h, d), len, dtype, device)?;
        if len > 0 {
            for ((k, v), (ok, ov)) in entries.iter().zip(&out.layers) {
                ok.slice_set(&k.to_dtype(dtype)?.to_device(device)?, 2, 0)?;
                ov.slice_set(&v.to_dtype(dtype)?.to_device(device)?, 2, 0)?;
            }
        }
        out.len = len;
        out.filled = filled;
        Ok(out)
    }
}

/// `{name}.k`, `{name}.v` and `{name}.filled` (u32) into a file's tensors.
pub(crate) fn put_entries(
    out: &mut HashMap<String, Tensor>,
    name: &str,
    k: Tensor,
    v: Tensor,
    filled: &[usize],
) -> Result<()> {
    let filled: Vec<u32> = filled.iter().map(|&f| f as u32).collect();
    out.insert(format!("{name}.k"), k);
    out.insert(format!("{name}.v"), v);
    out.insert(
        format!("{name}.filled"),
        Tensor::new(filled.as_slice(), &Device::Cpu)?,
    );
    Ok(())
}

/// Reads what [`put_entries`] wrote, checked against `(batch, H, _, d)`.
pub(crate) fn get_entries(
    file: &HashMap<String, Tensor>,
    name: &str,
    (b, h, d): (usize, usize, usize),
) -> Result<(Tensor, Tensor, Vec<usize>)> {
    let get = |part: &str| {
        file.get(&format!("{name}.{part}"))
            .ok_or_else(|| Error::Input(format!("missing tensor `{name}.{part}`")))
    };
    let (k, v) = (get("k")?, get("v")?);
    let filled: Vec<usize> = get("filled")?
        .to_dtype(DType::U32)?
        .to_vec1::<u32>()?
        .into_iter()
        .map(|x| x as usize)
        .collect();
    let (kb, kh, _, kd) = k
        .dims4()
        .map_err(|_| Error::Input(format!("`{name}.k` is not 4-D")))?;
    if (kb, kh, kd) != (b, h, d) || v.dims() != k.dims() || filled.len() != b {
        return Err(Error::Input(format!(
            "`{name}` has shape {:?}, expected ({b}, {h}, T, {d})",
            k.dims()
        )));
    }
    Ok((k.clone(), v.clone(), filled))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-layer, one-head, one-dim buffer of `b` rows whose entries are their positions.
    fn filled_with(b: usize, values: &[f32], keep_last: Option<usize>) -> Result<KvBuffer> {
        let mut buf = KvBuffer::new(1, (b, 1, 1), 0, DType::F32, &Device::Cpu)?;
        for &x in values {
            let p = buf.begin(1, keep_last)?;
            let t = Tensor::full(x, (b, 1, 1, 1), &Device::Cpu)?;
            buf.write(&p, 0, &t, &t)?;
            buf.commit(p);
        }
        Ok(buf)
    }

    fn entries(buf: &KvBuffer, n: usize) -> Result<Vec<Vec<f32>>> {
        let (k, _) = buf.last(0, n)?;
        Ok(k.squeeze(3)?.squeeze(1)?.to_vec2()?)
    }

    #[test]
    fn a_window_buffer_compacts_to_its_last_entries_and_keeps_order() -> Result<()> {
        let values: Vec<f32> = (0..40).map(|i| i as f32).collect();
        let buf = filled_with(1, &values, Some(3))?;
        // Compaction happened (the buffer never grew to 40 slots) and the last 3 are in order.
        assert!(buf.capacity < 40, "capacity {}", buf.capacity);
        assert_eq!(entries(&buf, 3)?, vec![vec![37.0, 38.0, 39.0]]);
        assert!(buf.len() >= 3 && buf.filled() == [buf.len()]);
        Ok(())
    }

    #[test]
    fn a_growing_buffer_keeps_every_entry() -> Result<()> {
        let values: Vec<f32> = (0..100).map(|i| i as f32).collect();
        let buf = filled_with(2, &values, None)?;
        assert_eq!(buf.len(), 100);
        assert_eq!(entries(&buf, 100)?, vec![values.clone(), values]);
        Ok(())
    }

    #[test]
    fn stacked_ragged_rows_are_right_aligned_and_select_undoes_the_stack() -> Result<()> {
        let a = filled_with(1, &[1.0, 2.0, 3.0], None)?;
        let b = filled_with(1, &[7.0], None)?;
        let both = KvBuffer::stack(&[&a, &b], 4)?;
        assert_eq!((both.len(), both.filled()), (3, &[3, 1][..]));
        assert_eq!(
            entries(&both, 3)?,
            vec![vec![1.0, 2.0, 3.0], vec![0.0, 0.0, 7.0]]
        );
        assert!(!both.is_uniform());
        let back = both.select(&[1])?;
        assert_eq!((back.len(), back.filled()), (1, &[1][..]));
        assert_eq!(entries(&back, 1)?, vec![vec![7.0]]);
        assert_eq!(back.slack(), 4);
        Ok(())
    }

    #[test]
    fn a_row_joins_a_stacked_batch_as_if_all_were_stacked_at_once() -> Result<()> {
        let a = filled_with(1, &[1.0, 2.0, 3.0], None)?;
        let b = filled_with(1, &[7.0], None)?;
        let c = filled_with(1, &[4.0, 5.0, 6.0, 8.0, 9.0], None)?;
        let once = KvBuffer::stack(&[&a, &b, &c], 0)?;
        let ab = KvBuffer::stack(&[&a, &b], 0)?;
        let joined = KvBuffer::stack(&[&ab, &c], 2)?;
        assert_eq!((joined.len(), joined.filled()), (5, &[3, 1, 5][..]));
        assert_eq!(entries(&joined, 5)?, entries(&once, 5)?);
        assert_eq!(
            entries(&joined, 5)?,
            vec![
                vec![0.0, 0.0, 1.0, 2.0, 3.0],
                vec![0.0, 0.0, 0.0, 0.0, 7.0],
                vec![4.0, 5.0, 6.0, 8.0, 9.0]
            ]
        );
        assert_eq!(joined.slack(), 2);
        let mut shrunk = joined.select(&[0, 1])?;
        shrunk.shrink_to_fit(None)?;
        assert_eq!((shrunk.len(), shrunk.slack()), (3, 0));
        assert_eq!(
            entries(&shrunk, 3)?,
            vec![vec![1.0, 2.0, 3.0], vec![0.0, 0.0, 7.0]]
        );
        Ok(())
    }

    #[test]
    fn a_clone_is_copied_on_its_first_write_not_before() -> Result<()> {
        let parent = filled_with(1, &[1.0, 2.0], None)?;
        let mut child = parent.clone();
        // Shared until written.
        assert!(Arc::ptr_eq(&parent.owner, &child.owner));
        let p = child.begin(1, None)?;
        let t = Tensor::full(9f32, (1, 1, 1, 1), &Device::Cpu)?;
        child.write(&p, 0, &t, &t)?;
        child.commit(p);
        assert_eq!(entries(&child, 3)?, vec![vec![1.0, 2.0, 9.0]]);
        assert_eq!(entries(&parent, 2)?, vec![vec![1.0, 2.0]]);
        // The parent's slot after its last entry was not written through the shared storage.
        let (k, _) = parent.layer(0)?;
        if parent.capacity > 2 {
            let slot: f32 = k.narrow(2, 2, 1)?.flatten_all()?.to_vec1::<f32>()?[0];
            assert_eq!(slot, 0.0);
        }
        Ok(())
    }

    #[test]
    fn snapshot_and_from_entries_round_trip() -> Result<()> {
        let buf = filled_with(1, &[4.0, 5.0, 6.0, 7.0], None)?;
        let (k, v, filled) = buf.snapshot(0, 2)?;
        let back = KvBuffer::from_entries(vec![(k, v)], filled, DType::F32, &Device::Cpu)?;
        assert_eq!(entries(&back, 2)?, vec![vec![6.0, 7.0]]);
        assert_eq!(back.filled(), &[2]);
        // A lying fill count is refused.
        let (k, v, _) = buf.snapshot(0, 2)?;
        assert!(KvBuffer::from_entries(vec![(k, v)], vec![3], DType::F32, &Device::Cpu).is_err());
        Ok(())
    }
}
