//! Per-sequence state, kept apart from the (immutable, shared) weights.
//!
//! A [`Cache`] is a plain composition of what each part of the model keeps for a batch of
//! sequences:
//! * the self-decoder's state, one per layer, owned and defined by its mixer: the gated-retention
//!   matrix `S: (B, H, d, d)` (f32), or the last `W - 1` keys and values of the sliding window
//!   ([`crate::models::yoco::self_decoder`]); constant in the sequence length;
//! * the one global K/V every cross-decoder layer reads ([`crate::models::yoco::cross_decoder`]):
//!   `(B, H_kv, T, hd)` keys and values, the only part that grows with the sequence. It holds one
//!   entry per token, so it also tells each sequence's position.
//!
//! Rows may sit at different positions (after [`Cache::stack`]); each part then keeps its rows
//! right-aligned and decides itself what each row's query sees.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::layers::global_kv::GlobalKv;
use crate::models::phi4flash::model::Phi4FlashState;
use crate::models::yoco::config::Config;
use crate::models::yoco::cross_decoder::{load_global_kv, new_global_kv};
use crate::models::yoco::self_decoder::SelfDecoderState;
use crate::{Error, Result};

/// Per-sequence inference state for a batch of sequences. Create one with
/// [`crate::Model::new_cache`] (or [`Cache::new`]) and pass it `&mut` to the model's forward
/// functions; one [`crate::Model`] serves any number of caches.
///
/// `Clone` is cheap and makes an independent cache: the copies share their buffers until one of
/// them writes (copy-on-write), so forking a long prompt into several continuations costs
/// nothing up front.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use yoco::Model;
///
/// # fn main() -> yoco::Result<()> {
/// let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/models/shakespeare");
/// let model = Model::load(dir, &Device::Cpu, DType::F32)?;
/// let mut cache = model.new_cache(1)?;
/// model.prefill(&Tensor::new(&[[0u32, 40, 41, 42]], &Device::Cpu)?, &mut cache)?;
/// assert_eq!(cache.positions(), &[4]);
///
/// // Fork: both continuations start from the same prefilled prompt.
/// let mut fork = cache.clone();
/// model.step(&Tensor::new(&[7u32], &Device::Cpu)?, &mut fork)?;
/// assert_eq!((cache.positions(), fork.positions()), (&[4][..], &[5][..]));
///
/// // The self-decoder's state does not grow; only the global K/V does.
/// let state = cache.self_state_bytes();
/// model.step(&Tensor::new(&[9u32], &Device::Cpu)?, &mut cache)?;
/// assert_eq!(cache.self_state_bytes(), state);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Cache {
    pub(crate) state: FamilyState,
    pub(crate) global: GlobalKv,
}

/// The constant-size state of one family's self-decoder.
#[derive(Clone, Debug)]
pub(crate) enum FamilyState {
    /// YOCO: retention matrices or window K/V.
    Yoco(SelfDecoderState),
    /// Phi-4-mini-flash: Mamba conv and SSM states, window K/V.
    Phi4Flash(Phi4FlashState),
}

impl FamilyState {
    fn bytes(&self) -> usize {
        match self {
            FamilyState::Yoco(s) => s.bytes(),
            FamilyState::Phi4Flash(s) => s.bytes(),
        }
    }

    fn bytes_allocated(&self) -> usize {
        match self {
            FamilyState::Yoco(s) => s.bytes_allocated(),
            FamilyState::Phi4Flash(s) => s.bytes_allocated(),
        }
    }

    fn reset(&mut self) -> Result<()> {
        match self {
            FamilyState::Yoco(s) => s.reset(),
            FamilyState::Phi4Flash(s) => s.reset(),
        }
    }

    fn stack(parts: &[&FamilyState]) -> Result<Self> {
        let other = || Error::Input("caches of models of different families".into());
        match parts.first() {
            Some(FamilyState::Yoco(_)) => {
                let states = parts
                    .iter()
                    .map(|p| match p {
                        FamilyState::Yoco(s) => Ok(s),
                        FamilyState::Phi4Flash(_) => Err(other()),
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(FamilyState::Yoco(SelfDecoderState::stack(&states)?))
            }
            Some(FamilyState::Phi4Flash(_)) => {
                let states = parts
                    .iter()
                    .map(|p| match p {
                        FamilyState::Phi4Flash(s) => Ok(s),
                        FamilyState::Yoco(_) => Err(other()),
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(FamilyState::Phi4Flash(Phi4FlashState::stack(&states)?))
            }
            None => Err(Error::Input("Cache::stack needs at least one cache".into())),
        }
    }

    fn select(&self, rows: &[usize]) -> Result<Self> {
        Ok(match self {
            FamilyState::Yoco(s) => FamilyState::Yoco(s.select(rows)?),
            FamilyState::Phi4Flash(s) => FamilyState::Phi4Flash(s.select(rows)?),
        })
    }

    fn shrink_to_fit(&mut self) -> Result<()> {
        match self {
            FamilyState::Yoco(s) => s.shrink_to_fit(),
            FamilyState::Phi4Flash(s) => s.shrink_to_fit(),
        }
    }

    fn save(&self, out: &mut HashMap<String, Tensor>) -> Result<()> {
        match self {
            FamilyState::Yoco(s) => s.save(out),
            FamilyState::Phi4Flash(s) => s.save(out),
        }
    }
}

/// Version of the on-disk cache layout written by [`Cache::save`].
const CACHE_FORMAT_VERSION: u32 = 1;

impl Cache {
    /// An empty cache for `batch` sequences of a model with config `cfg`, whose K/V are stored
    /// in `dtype` on `device` (retention state is always f32).
    pub fn new(cfg: &Config, batch: usize, dtype: DType, device: &Device) -> Result<Self> {
        Cache::with_dtypes(cfg, batch, (dtype, dtype), device)
    }

    /// [`Cache::new`] with the global K/V in its own dtype: `(dtype, global_dtype)`.
    pub(crate) fn with_dtypes(
        cfg: &Config,
        batch: usize,
        (dtype, global_dtype): (DType, DType),
        device: &Device,
    ) -> Result<Self> {
        if batch == 0 {
            return Err(Error::Input("batch size must be at least 1".into()));
        }
        Ok(Cache {
            state: FamilyState::Yoco(SelfDecoderState::new(cfg, batch, dtype, device)?),
            global: new_global_kv(cfg, batch, global_dtype, device)?,
        })
    }

    /// Number of sequences.
    pub fn batch_size(&self) -> usize {
        self.positions().len()
    }

    /// Tokens seen so far by each sequence (its next token's position).
    pub fn positions(&self) -> &[usize] {
        self.global.positions()
    }

    /// The position of a batch whose rows are all at the same place, `None` otherwise.
    pub fn position(&self) -> Option<usize> {
        let first = *self.positions().first()?;
        self.positions()
            .iter()
            .all(|&p| p == first)
            .then_some(first)
    }

    /// Makes room for `total_positions` tokens in the global K/V at once, so that a known-length
    /// generation never reallocates (and never over-allocates).
    pub fn reserve(&mut self, total_positions: usize) -> Result<()> {
        self.global.reserve(total_positions)
    }

    /// Forgets every sequence: back to position 0, buffers kept for reuse.
    pub fn reset(&mut self) -> Result<()> {
        self.state.reset()?;
        self.global.reset();
        Ok(())
    }

    /// Bytes of state in use: the global K/V rows written so far plus the self-decoder state.
    pub fn size_bytes(&self) -> usize {
        self.global_kv_bytes() + self.self_state_bytes()
    }

    /// Bytes of the global K/V in use (grows with the sequence).
    pub fn global_kv_bytes(&self) -> usize {
        self.global.bytes()
    }

    /// Bytes of self-decoder state in use (constant in the sequence length: at most `W - 1`
    /// window entries per row, or the retention matrix).
    pub fn self_state_bytes(&self) -> usize {
        self.state.bytes()
    }

    /// Bytes allocated, slack included.
    pub fn allocated_bytes(&self) -> usize {
        self.global.bytes_allocated() + self.state.bytes_allocated()
    }

    /// Joins caches (possibly at different positions, of one or more sequences each) into one
    /// batch, for decoding them together with [`crate::Model::step`]: the rows of `caches[0]`
    /// first, then those of `caches[1]`, and so on. Each row then behaves exactly as its cache
    /// would alone, so a sequence can join a batch that is already decoding. `reserve` is honoured
    /// for the largest reservation among the parts.
    ///
    /// The rows are right-aligned: each part's global K/V is copied once into a buffer as long as
    /// the longest row, shorter rows padded at the front (and masked).
    pub fn stack(caches: &[Cache]) -> Result<Self> {
        if caches.is_empty() {
            return Err(Error::Input("Cache::stack needs at least one cache".into()));
        }
        let states: Vec<&FamilyState> = caches.iter().map(|c| &c.state).collect();
        let globals: Vec<&GlobalKv> = caches.iter().map(|c| &c.global).collect();
        Ok(Cache {
            state: FamilyState::stack(&states)?,
            global: GlobalKv::stack(&globals)?,
        })
    }

    /// The inverse of [`Cache::stack`]: one cache per sequence, each exactly what that row holds.
    pub fn split(&self) -> Result<Vec<Cache>> {
        (0..self.batch_size()).map(|r| self.select(&[r])).collect()
    }

    /// The rows `rows` (in that order) as a cache of their own.
    pub(crate) fn select(&self, rows: &[usize]) -> Result<Cache> {
        if rows.is_empty() {
            return Err(Error::Input("a cache needs at least one row".into()));
        }
        if rows.iter().copied().eq(0..self.batch_size()) {
            // Every row in order: a copy-on-write clone is the same cache.
            return Ok(self.clone());
        }
        Ok(Cache {
            state: self.state.select(rows)?,
            global: self.global.select(rows)?,
        })
    }

    /// Gives back the slack of every buffer (what `reserve` or growth allocated beyond the
    /// entries in use): the cache then owns exactly its state, copied once, shared with no clone.
    pub(crate) fn shrink_to_fit(&mut self) -> Result<()> {
        self.state.shrink_to_fit()?;
        self.global.shrink_to_fit()
    }

    /// Saves the cache (every row's state, global K/V and positions) to a safetensors file.
    /// Only the slots in use are written, so the file is as small as the state itself.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let mut out: HashMap<String, Tensor> = HashMap::new();
        let u32s = |v: &[usize]| -> Result<Tensor> {
            let v: Vec<u32> = v.iter().map(|&x| x as u32).collect();
            Ok(Tensor::new(v.as_slice(), &Device::Cpu)?)
        };
        out.insert(
            "format_version".into(),
            u32s(&[CACHE_FORMAT_VERSION as usize])?,
        );
        out.insert("positions".into(), u32s(self.positions())?);
        self.global.save(&mut out)?;
        self.state.save(&mut out)?;
        candle_core::safetensors::save(&out, path)
            .map_err(|e| Error::Checkpoint(format!("cannot save cache to {}: {e}", path.display())))
    }

    /// Restores a cache written by [`Cache::save`] for a YOCO model with config `cfg`, placing
    /// its K/V in `dtype` on `device`. Shapes are checked against the config.
    /// [`crate::Model::load_cache`] does the same for a model of any family.
    pub fn load(
        path: impl AsRef<Path>,
        cfg: &Config,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Cache::load_dtypes(path.as_ref(), cfg, (dtype, dtype), device)
    }

    /// [`Cache::load`] with the global K/V in its own dtype: `(dtype, global_dtype)`.
    pub(crate) fn load_dtypes(
        path: &Path,
        cfg: &Config,
        (dtype, global_dtype): (DType, DType),
        device: &Device,
    ) -> Result<Self> {
        Cache::load_with(path, |file, batch| {
            Ok((
                FamilyState::Yoco(SelfDecoderState::load(file, cfg, batch, dtype, device)?),
                load_global_kv(file, cfg, batch, global_dtype, device)?,
            ))
        })
    }

    /// Reads a saved cache: the file's version and positions here, the family's state and
    /// global K/V by `parts(file, batch)`.
    pub(crate) fn load_with(
        path: &Path,
        parts: impl FnOnce(&HashMap<String, Tensor>, usize) -> Result<(FamilyState, GlobalKv)>,
    ) -> Result<Self> {
        let bad = |m: String| Error::Checkpoint(format!("cache file {}: {m}", path.display()));
        let file = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| bad(format!("cannot read: {e}")))?;
        let usizes = |name: &str| -> Result<Vec<usize>> {
            let t = file
                .get(name)
                .ok_or_else(|| bad(format!("missing tensor `{name}`")))?;
            Ok(t.to_dtype(DType::U32)?
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
        let batch = positions.len();
        if batch == 0 {
            return Err(bad("no sequences".into()));
        }
        // Errors of the parts name the tensor; the file is named here.
        let (state, global) = parts(&file, batch).map_err(|e| match e {
            Error::Input(m) => bad(m),
            other => other,
        })?;
        let cache = Cache { state, global };
        if cache.positions() != positions.as_slice() {
            return Err(bad("positions do not match the global K/V".into()));
        }
        Ok(cache)
    }
}
