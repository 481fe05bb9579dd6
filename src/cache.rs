//! Per-sequence state, kept apart from the (immutable, shared) weights.
//!
//! A [`Cache`] holds, for a batch of `B` sequences:
//! * per self-decoder layer, a constant-size state: the gated-retention matrix `S: (B, H, d, d)`
//!   (always f32), or the last `W - 1` keys and values of sliding-window attention;
//! * the one global K/V that every cross-decoder layer reads: `(B, H_kv, T, hd)` each, the only
//!   part that grows with the sequence;
//! * each sequence's position.
//!
//! Buffers are preallocated and written in place; they grow geometrically (or exactly, after
//! [`Cache::reserve`]) so that decoding never re-copies the whole cache per token.
//!
//! Rows may sit at different positions (after [`Cache::stack`]): every buffer is then
//! *right-aligned* — the newest entry of every row is in the same slot — and each row remembers
//! how many of the trailing slots are its own.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::config::{Config, SelfMixer};
use crate::{Error, Result};

/// A growable, right-aligned buffer of keys and values, `(B, H, capacity, d)` each.
#[derive(Clone, Debug)]
pub(crate) struct KvBuffer {
    k: Tensor,
    v: Tensor,
    /// Slots in use (the same for all rows).
    len: usize,
    /// Per row: how many of the last `len` slots hold that row's entries.
    filled: Vec<usize>,
    /// Copy-on-write token: clones share the tensors until one of them writes (see `append`).
    owner: Arc<()>,
}

impl KvBuffer {
    fn new(
        b: usize,
        h: usize,
        d: usize,
        capacity: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        // Never a zero-byte allocation: some CUDA drivers refuse those.
        let capacity = capacity.max(1);
        Ok(KvBuffer {
            k: Tensor::zeros((b, h, capacity, d), dtype, device)?,
            v: Tensor::zeros((b, h, capacity, d), dtype, device)?,
            len: 0,
            filled: vec![0; b],
            owner: Arc::new(()),
        })
    }

    fn capacity(&self) -> usize {
        self.k.dims()[2]
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

    /// Reallocates to `capacity` slots, keeping the last `keep` entries (moved to the front).
    fn reallocate(&mut self, capacity: usize, keep: usize) -> Result<()> {
        let (b, h, _, d) = self.k.dims4()?;
        let keep = keep.min(self.len);
        let k = Tensor::zeros((b, h, capacity, d), self.k.dtype(), self.k.device())?;
        let v = Tensor::zeros((b, h, capacity, d), self.v.dtype(), self.v.device())?;
        if keep > 0 {
            k.slice_set(
                &self.k.narrow(2, self.len - keep, keep)?.contiguous()?,
                2,
                0,
            )?;
            v.slice_set(
                &self.v.narrow(2, self.len - keep, keep)?.contiguous()?,
                2,
                0,
            )?;
        }
        self.k = k;
        self.v = v;
        self.owner = Arc::new(());
        self.len = keep;
        for f in &mut self.filled {
            *f = (*f).min(keep);
        }
        Ok(())
    }

    /// Makes room for `extra` more slots. With `window = Some(w)` only the last `w - 1` entries
    /// still matter, so old ones are dropped (compaction); otherwise the buffer grows by at
    /// least half its size.
    pub(crate) fn make_room(&mut self, extra: usize, window: Option<usize>) -> Result<()> {
        if self.len + extra <= self.capacity() {
            return Ok(());
        }
        match window {
            Some(w) => {
                let keep = self.len.min(w.saturating_sub(1));
                // Slack of at least one window, so that compaction happens at most once per
                // `w` tokens: amortised O(1) copying per token.
                let capacity = self.capacity().max(keep + extra).max(2 * w.max(1) + extra);
                if keep + extra <= self.capacity() {
                    // Shift in place (through a copy: source and destination overlap).
                    let cap = self.capacity();
                    self.reallocate(cap, keep)
                } else {
                    self.reallocate(capacity, keep)
                }
            }
            None => {
                let needed = self.len + extra;
                let capacity = needed.max(self.capacity() + self.capacity() / 2).max(16);
                self.reallocate(capacity, self.len)
            }
        }
    }

    /// Ensures capacity for `total` slots without dropping anything.
    pub(crate) fn reserve(&mut self, total: usize) -> Result<()> {
        if total > self.capacity() {
            self.reallocate(total, self.len)?;
        }
        Ok(())
    }

    /// Appends `k, v: (B, H, C, d)` for every row (call [`KvBuffer::make_room`] first).
    pub(crate) fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let c = k.dim(2)?;
        if self.len + c > self.capacity() {
            self.make_room(c, None)?;
        }
        if Arc::strong_count(&self.owner) > 1 {
            // A clone shares these tensors and `slice_set` writes in place: copy first.
            self.reallocate(self.capacity(), self.len)?;
        }
        self.k.slice_set(&k.contiguous()?, 2, self.len)?;
        self.v.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len += c;
        for f in &mut self.filled {
            *f += c;
        }
        Ok(())
    }

    /// Views of the last `n` slots: `(B, H, n, d)` each, no copy.
    pub(crate) fn last(&self, n: usize) -> Result<(Tensor, Tensor)> {
        let n = n.min(self.len);
        Ok((
            self.k.narrow(2, self.len - n, n)?,
            self.v.narrow(2, self.len - n, n)?,
        ))
    }

    fn bytes_used(&self) -> usize {
        self.bytes_of(self.len)
    }

    /// Bytes of `slots` slots of keys and values.
    fn bytes_of(&self, slots: usize) -> usize {
        let (b, h, _, d) = self.k.dims4().unwrap_or((0, 0, 0, 0));
        2 * b * h * slots * d * self.k.dtype().size_in_bytes()
    }

    fn bytes_allocated(&self) -> usize {
        2 * self.k.elem_count() * self.k.dtype().size_in_bytes()
    }
}

/// The constant-size state of one self-decoder layer.
#[derive(Clone, Debug)]
pub(crate) enum SelfState {
    /// Gated retention: `S: (B, H, d, d)`, f32.
    Retention(Tensor),
    /// Sliding window: the last `W - 1` keys and values (plus slack).
    Window(KvBuffer),
}

/// Per-sequence inference state for a batch of sequences. Create one with [`Cache::new`]
/// (or `Model::new_cache`), pass it `&mut` to the model's forward functions.
///
/// `Clone` is cheap and makes an independent cache: the copies share their buffers until one of
/// them writes (copy-on-write), so forking a long prompt into several continuations costs
/// nothing up front.
#[derive(Clone, Debug)]
pub struct Cache {
    pub(crate) layers: Vec<SelfState>,
    pub(crate) global: KvBuffer,
    pub(crate) positions: Vec<usize>,
    window: Option<usize>,
}

impl Cache {
    /// An empty cache for `batch` sequences of a model with config `cfg`, whose K/V are stored
    /// in `dtype` on `device` (retention state is always f32).
    pub fn new(cfg: &Config, batch: usize, dtype: DType, device: &Device) -> Result<Self> {
        if batch == 0 {
            return Err(Error::Input("batch size must be at least 1".into()));
        }
        let (h, d) = (cfg.n_self_heads, cfg.self_head_dim());
        let window = match cfg.self_mixer() {
            SelfMixer::SlidingWindow { window } => Some(window),
            SelfMixer::GatedRetention => None,
        };
        let layers = (0..cfg.n_half_layers())
            .map(|_| -> Result<SelfState> {
                Ok(match window {
                    None => {
                        SelfState::Retention(Tensor::zeros((batch, h, d, d), DType::F32, device)?)
                    }
                    Some(_) => SelfState::Window(KvBuffer::new(batch, h, d, 0, dtype, device)?),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let global = KvBuffer::new(
            batch,
            cfg.n_attn_kv_heads,
            cfg.attn_head_dim(),
            0,
            dtype,
            device,
        )?;
        Ok(Cache {
            layers,
            global,
            positions: vec![0; batch],
            window,
        })
    }

    /// Number of sequences.
    pub fn batch_size(&self) -> usize {
        self.positions.len()
    }

    /// Tokens seen so far by each sequence (its next token's position).
    pub fn positions(&self) -> &[usize] {
        &self.positions
    }

    /// The position of a batch whose rows are all at the same place, `None` otherwise.
    pub fn position(&self) -> Option<usize> {
        let first = *self.positions.first()?;
        self.positions.iter().all(|&p| p == first).then_some(first)
    }

    /// Makes room for `total_positions` tokens in the global K/V at once, so that a known-length
    /// generation never reallocates (and never over-allocates).
    pub fn reserve(&mut self, total_positions: usize) -> Result<()> {
        let extra =
            total_positions.saturating_sub(self.positions.iter().copied().min().unwrap_or(0));
        self.global.reserve(self.global.len() + extra)
    }

    /// Forgets every sequence: back to position 0, buffers kept for reuse.
    pub fn reset(&mut self) -> Result<()> {
        for layer in &mut self.layers {
            match layer {
                SelfState::Retention(s) => *s = s.zeros_like()?,
                SelfState::Window(buf) => {
                    buf.len = 0;
                    buf.filled.iter_mut().for_each(|f| *f = 0);
                }
            }
        }
        self.global.len = 0;
        self.global.filled.iter_mut().for_each(|f| *f = 0);
        self.positions.iter_mut().for_each(|p| *p = 0);
        Ok(())
    }

    /// Bytes of state in use: the global K/V rows written so far plus the self-decoder state.
    pub fn size_bytes(&self) -> usize {
        self.global.bytes_used() + self.self_state_bytes()
    }

    /// Bytes of the global K/V in use (grows with the sequence).
    pub fn global_kv_bytes(&self) -> usize {
        self.global.bytes_used()
    }

    /// Bytes of self-decoder state in use (constant in the sequence length: at most `W - 1`
    /// window entries per row, or the retention matrix).
    pub fn self_state_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match l {
                SelfState::Retention(s) => s.elem_count() * s.dtype().size_in_bytes(),
                // Slack beyond the last W - 1 entries is allocation, not state.
                SelfState::Window(buf) => {
                    buf.bytes_of(buf.len.min(self.window.unwrap_or(1).saturating_sub(1)))
                }
            })
            .sum()
    }

    /// Bytes allocated, slack included.
    pub fn allocated_bytes(&self) -> usize {
        self.global.bytes_allocated()
            + self
                .layers
                .iter()
                .map(|l| match l {
                    SelfState::Retention(s) => s.elem_count() * s.dtype().size_in_bytes(),
                    SelfState::Window(buf) => buf.bytes_allocated(),
                })
                .sum::<usize>()
    }

    pub(crate) fn window(&self) -> Option<usize> {
        self.window
    }

    /// Advances every row by `n` positions after a forward pass.
    pub(crate) fn advance(&mut self, n: usize) {
        self.positions.iter_mut().for_each(|p| *p += n);
    }
}

impl KvBuffer {
    /// Stacks single-row buffers into one batch, right-aligned: the newest entry of every row
    /// lands in the same slot, and shorter rows are padded at the front (masked by `filled`).
    fn stack(parts: &[&KvBuffer], slack: usize) -> Result<Self> {
        let len = parts.iter().map(|p| p.len).max().unwrap_or(0);
        let mut ks = Vec::with_capacity(parts.len());
        let mut vs = Vec::with_capacity(parts.len());
        let mut filled = Vec::with_capacity(parts.len());
        for part in parts {
            let (b, h, _, d) = part.k.dims4()?;
            if b != 1 {
                return Err(Error::Input(
                    "Cache::stack takes caches of one sequence each".into(),
                ));
            }
            let pad = len - part.len;
            let k = Tensor::zeros(
                (1, h, (len + slack).max(1), d),
                part.k.dtype(),
                part.k.device(),
            )?;
            let v = Tensor::zeros(
                (1, h, (len + slack).max(1), d),
                part.v.dtype(),
                part.v.device(),
            )?;
            if part.len > 0 {
                k.slice_set(&part.k.narrow(2, 0, part.len)?.contiguous()?, 2, pad)?;
                v.slice_set(&part.v.narrow(2, 0, part.len)?.contiguous()?, 2, pad)?;
            }
            ks.push(k);
            vs.push(v);
            filled.push(part.filled.first().copied().unwrap_or(0));
        }
        Ok(KvBuffer {
            k: Tensor::cat(&ks, 0)?,
            v: Tensor::cat(&vs, 0)?,
            len,
            filled,
            owner: Arc::new(()),
        })
    }
}

impl Cache {
    /// Joins caches of one sequence each (possibly at different positions) into one batch, for
    /// decoding them together with `Model::step`. Each row then behaves exactly as its cache
    /// would alone. `reserve` is honoured for the largest reservation among the parts.
    pub fn stack(caches: &[Cache]) -> Result<Self> {
        let first = caches
            .first()
            .ok_or_else(|| Error::Input("Cache::stack needs at least one cache".into()))?;
        if caches
            .iter()
            .any(|c| c.layers.len() != first.layers.len() || c.window != first.window)
        {
            return Err(Error::Input(
                "Cache::stack: caches come from different models".into(),
            ));
        }
        let slack = caches
            .iter()
            .map(|c| c.global.capacity().saturating_sub(c.global.len))
            .max()
            .unwrap_or(0);
        let globals: Vec<&KvBuffer> = caches.iter().map(|c| &c.global).collect();
        let global = KvBuffer::stack(&globals, slack)?;
        let mut layers = Vec::with_capacity(first.layers.len());
        for i in 0..first.layers.len() {
            let layer = match &first.layers[i] {
                SelfState::Retention(_) => {
                    let states = caches
                        .iter()
                        .map(|c| match &c.layers[i] {
                            SelfState::Retention(s) => Ok(s.clone()),
                            SelfState::Window(_) => Err(Error::Input("mixed cache kinds".into())),
                        })
                        .collect::<Result<Vec<_>>>()?;
                    SelfState::Retention(Tensor::cat(&states, 0)?)
                }
                SelfState::Window(_) => {
                    let parts = caches
                        .iter()
                        .map(|c| match &c.layers[i] {
                            SelfState::Window(buf) => Ok(buf),
                            SelfState::Retention(_) => {
                                Err(Error::Input("mixed cache kinds".into()))
                            }
                        })
                        .collect::<Result<Vec<_>>>()?;
                    SelfState::Window(KvBuffer::stack(&parts, 0)?)
                }
            };
            layers.push(layer);
        }
        Ok(Cache {
            layers,
            global,
            positions: caches
                .iter()
                .flat_map(|c| c.positions.iter().copied())
                .collect(),
            window: first.window,
        })
    }
}

/// Version of the on-disk cache layout written by [`Cache::save`].
const CACHE_FORMAT_VERSION: u32 = 1;

impl Cache {
    /// Saves the cache (every row's state, global K/V and positions) to a safetensors file.
    /// Only the slots in use are written, so the file is as small as the state itself.
    pub fn save(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        let path = path.as_ref();
        let dev = Device::Cpu;
        let u32s = |v: &[usize]| -> Result<Tensor> {
            let v: Vec<u32> = v.iter().map(|&x| x as u32).collect();
            Ok(Tensor::new(v.as_slice(), &dev)?)
        };
        let mut ts: std::collections::HashMap<String, Tensor> = std::collections::HashMap::new();
        ts.insert(
            "format_version".into(),
            Tensor::new(&[CACHE_FORMAT_VERSION], &dev)?,
        );
        ts.insert("positions".into(), u32s(&self.positions)?);
        // A window buffer may hold slack beyond the last W - 1 entries; only those matter.
        let keep = self.window.map(|w| w.saturating_sub(1));
        let put_buffer = |ts: &mut std::collections::HashMap<String, Tensor>,
                          name: &str,
                          buf: &KvBuffer,
                          keep: Option<usize>|
         -> Result<()> {
            let n = keep.map_or(buf.len, |k| k.min(buf.len));
            let (k, v) = buf.last(n)?;
            let filled: Vec<usize> = buf.filled.iter().map(|&f| f.min(n)).collect();
            ts.insert(format!("{name}.k"), k.contiguous()?);
            ts.insert(format!("{name}.v"), v.contiguous()?);
            ts.insert(format!("{name}.filled"), u32s(&filled)?);
            Ok(())
        };
        put_buffer(&mut ts, "global", &self.global, None)?;
        for (i, layer) in self.layers.iter().enumerate() {
            match layer {
                SelfState::Retention(state) => {
                    ts.insert(format!("layers.{i}.state"), state.clone());
                }
                SelfState::Window(buf) => put_buffer(&mut ts, &format!("layers.{i}"), buf, keep)?,
            }
        }
        candle_core::safetensors::save(&ts, path)
            .map_err(|e| Error::Checkpoint(format!("cannot save cache to {}: {e}", path.display())))
    }

    /// Restores a cache written by [`Cache::save`] for a model with config `cfg`, placing its
    /// K/V in `dtype` on `device`. Shapes are checked against the config.
    pub fn load(
        path: impl AsRef<std::path::Path>,
        cfg: &Config,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let path = path.as_ref();
        let bad = |m: String| Error::Checkpoint(format!("cache file {}: {m}", path.display()));
        let ts = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| bad(format!("cannot read: {e}")))?;
        let get = |name: &str| {
            ts.get(name)
                .ok_or_else(|| bad(format!("missing tensor `{name}`")))
        };
        let usizes = |name: &str| -> Result<Vec<usize>> {
            Ok(get(name)?
                .to_dtype(DType::U32)?
                .to_vec1::<u32>()?
                .into_iter()
                .map(|x| x as usize)
                .collect())
        };
        let version = usizes("format_version")?;
        if version != [CACHE_FORMAT_VERSION as usize] {
            return Err(bad(format!(
                "format version {version:?}, expected {CACHE_FORMAT_VERSION}"
            )));
        }
        let positions = usizes("positions")?;
        let b = positions.len();
        let mut cache = Cache::new(cfg, b, dtype, device)?;
        let read_buffer =
            |name: &str, h: usize, d: usize, window: Option<usize>| -> Result<KvBuffer> {
                let k = get(&format!("{name}.k"))?;
                let v = get(&format!("{name}.v"))?;
                let filled = usizes(&format!("{name}.filled"))?;
                let (kb, kh, len, kd) = k
                    .dims4()
                    .map_err(|_| bad(format!("`{name}.k` is not 4-D")))?;
                if (kb, kh, kd) != (b, h, d) || v.dims() != k.dims() || filled.len() != b {
                    return Err(bad(format!(
                        "`{name}` has shape {:?}, expected ({b}, {h}, T, {d})",
                        k.dims()
                    )));
                }
                if filled.iter().any(|&f| f > len) || window.is_some_and(|w| len > w) {
                    return Err(bad(format!("`{name}` has inconsistent fill counts")));
                }
                let mut buf = KvBuffer::new(b, h, d, len, dtype, device)?;
                if len > 0 {
                    buf.append(
                        &k.to_dtype(dtype)?.to_device(device)?,
                        &v.to_dtype(dtype)?.to_device(device)?,
                    )?;
                }
                buf.filled = filled;
                Ok(buf)
            };
        cache.global = read_buffer("global", cfg.n_attn_kv_heads, cfg.attn_head_dim(), None)?;
        let (h, d) = (cfg.n_self_heads, cfg.self_head_dim());
        for (i, layer) in cache.layers.iter_mut().enumerate() {
            match layer {
                SelfState::Retention(state) => {
                    let s = get(&format!("layers.{i}.state"))?;
                    if s.dims() != [b, h, d, d] {
                        return Err(bad(format!(
                            "`layers.{i}.state` has shape {:?}, expected ({b}, {h}, {d}, {d})",
                            s.dims()
                        )));
                    }
                    *state = s.to_dtype(DType::F32)?.to_device(device)?;
                }
                SelfState::Window(buf) => {
                    *buf = read_buffer(
                        &format!("layers.{i}"),
                        h,
                        d,
                        cache.window.map(|w| w.saturating_sub(1)),
                    )?;
                }
            }
        }
        if cache
            .global
            .filled
            .iter()
            .zip(&positions)
            .any(|(f, p)| f != p)
        {
            return Err(bad("positions do not match the global K/V".into()));
        }
        cache.positions = positions;
        Ok(cache)
    }
}
