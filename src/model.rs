//! [`Model`], the one face of every family yoco runs: which family a directory holds (YOCO's
//! `params.json`, or a Phi-4-mini-flash `config.json`), loading, and the three ways to run the
//! weights (full forward, chunked prefill with early exit, one-token steps), each a loop over the
//! family's own chunk step (`models/yoco/model.rs`, `models/phi4flash/model.rs`). Every family is
//! a YOCO: constant-size state per self-decoder layer, one global K/V that grows, a cross-decoder
//! that keeps no state, so a prompt stops at the midpoint except for its last token.
//!
//! [`Model`] holds only immutable weights (it is `Send + Sync`; share it with an `Arc`). All
//! per-sequence state lives in a [`Cache`] that the caller owns.

use std::path::Path;

use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::cache::{Cache, FamilyState};
use crate::layers::constants::Constants;
use crate::layers::Weights;
use crate::models::phi4flash::catalogue::HeadForm;
use crate::models::phi4flash::config::Phi4FlashConfig;
use crate::models::phi4flash::model::Phi4Flash;
#[cfg(test)]
use crate::models::phi4flash::model::Trace;
use crate::models::yoco::config::Config;
use crate::models::yoco::model::Yoco;
use crate::models::Logits;
use crate::quant::{Quant, WeightInfo};
use crate::{Error, Result};

/// Default number of prompt tokens processed at once by [`Model::prefill`] and
/// [`Model::forward`]: working memory is bounded by the chunk, not the prompt.
pub const DEFAULT_PREFILL_CHUNK: usize = 512;

/// Which kernels the model may use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Kernels {
    /// The fastest for the device: on the CPU, raw-slice kernels for decode projections and
    /// decode attention where they apply.
    #[default]
    Native,
    /// Only tensor operations that every device runs: the path a GPU takes, for testing it on a
    /// CPU. Same results within float32 rounding, slower decode on the CPU.
    Portable,
}

/// How [`Model::load_with`] loads a checkpoint. Build it with struct update syntax:
/// `LoadOptions { dtype: DType::BF16, ..LoadOptions::default() }`.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Where the weights go. Default: the CPU.
    pub device: Device,
    /// The weights' dtype (`F32` on CPU, `BF16`/`F16` on CUDA). Default: `F32`.
    pub dtype: DType,
    /// Which kernels the model may use. Default: [`Kernels::Native`].
    pub kernels: Kernels,
    /// Quantize the projections to this format as they load, layer by layer (see [`Quant`]; a
    /// projection whose input width does not fit takes the format's fallback or stays float).
    /// Tensors a GGUF file already stores quantized are kept as they are. Default: `None`, the
    /// weights as the checkpoint stores them, converted to `dtype`.
    pub quant: Option<Quant>,
    /// The dtype the global K/V cache is kept in: `F16` or `BF16` halve what a long-context
    /// decode step reads (the one cache is most of what such a step reads beside the weights);
    /// attention still computes in the model's dtype (f32 on the CPU), widening each key and
    /// value as it reads it. Default: `None`, the weights' dtype.
    pub kv_dtype: Option<DType>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            device: Device::Cpu,
            dtype: DType::F32,
            kernels: Kernels::Native,
            quant: None,
            kv_dtype: None,
        }
    }
}

/// Which model family a directory holds, told by its files: `params.json` (or a `model.gguf`
/// alone) is a YOCO checkpoint; a Hugging Face `config.json` with `model_type: phi4flash` is
/// Phi-4-mini-flash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FamilyOnDisk {
    Yoco,
    Phi4Flash,
}

/// The family of the checkpoint in `dir` (see [`FamilyOnDisk`]).
fn family_on_disk(dir: &Path) -> Result<FamilyOnDisk> {
    if dir.join("params.json").is_file() {
        return Ok(FamilyOnDisk::Yoco);
    }
    let config = dir.join("config.json");
    if config.is_file() {
        let text = crate::checkpoint::read_small(&config, 1 << 20)?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: config.clone(),
            message: e.to_string(),
        })?;
        return match json.get("model_type").and_then(|m| m.as_str()) {
            Some(crate::models::phi4flash::config::MODEL_TYPE) => Ok(FamilyOnDisk::Phi4Flash),
            other => Err(Error::Json {
                path: config,
                message: format!(
                    "model_type {other:?} is not a family yoco runs (\"{}\"; YOCO checkpoints \
                     come with params.json)",
                    crate::models::phi4flash::config::MODEL_TYPE
                ),
            }),
        };
    }
    let gguf = dir.join(crate::checkpoint::gguf::FILE_NAME);
    if gguf.is_file() {
        let file = crate::checkpoint::gguf::GgufFile::open(&gguf)?;
        if file.architecture() == Some(crate::models::phi4flash::load::ARCHITECTURE) {
            return Ok(FamilyOnDisk::Phi4Flash);
        }
    }
    Ok(FamilyOnDisk::Yoco)
}

/// Random weights drawn when a layer asks for them: std 0.02 for matrices, ones for norms (what
/// [`Model::random`] draws, one tensor at a time).
struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        _: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if s.rank() == 1 {
            Tensor::ones(s, dtype, dev)
        } else {
            // Draw in f32 (CUDA draws no half types), then convert.
            Tensor::randn(0f32, 0.02, s, dev)?.to_dtype(dtype)
        }
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape (asked for `{name}` without one)")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// A language model of one of the families yoco runs (YOCO, or Phi-4-mini-flash): immutable
/// weights. Every family answers the same calls (forward, prefill with early exit, step, caches).
#[derive(Clone, Debug)]
pub struct Model {
    family: Family,
    /// The family's hyper-parameters.
    config: ModelConfig,
    /// Masks that depend only on a chunk's shape, built once.
    consts: Constants,
    dtype: DType,
    /// The dtype of the global K/V cache (see [`LoadOptions::kv_dtype`]).
    kv_dtype: DType,
    device: Device,
    /// Every weight tensor and the format it got.
    weights: Arc<[WeightInfo]>,
}

/// The hyper-parameters of a [`Model`], whichever its family.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ModelConfig {
    /// A YOCO model (`params.json`).
    Yoco(Config),
    /// A Phi-4-mini-flash (SambaY) model (Hugging Face `config.json`).
    Phi4Flash(Phi4FlashConfig),
}

impl ModelConfig {
    /// Rows of the embedding: token ids must be below it.
    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::Yoco(c) => c.vocab_size,
            ModelConfig::Phi4Flash(c) => c.vocab_size,
        }
    }

    /// Largest number of positions a sequence may reach.
    pub fn max_positions(&self) -> usize {
        match self {
            ModelConfig::Yoco(c) => c.max_positions,
            ModelConfig::Phi4Flash(c) => c.max_positions,
        }
    }

    /// Number of layers.
    pub fn n_layers(&self) -> usize {
        match self {
            ModelConfig::Yoco(c) => c.n_layers,
            ModelConfig::Phi4Flash(c) => c.num_hidden_layers,
        }
    }

    /// Width of the residual stream.
    pub fn dim(&self) -> usize {
        match self {
            ModelConfig::Yoco(c) => c.dim,
            ModelConfig::Phi4Flash(c) => c.hidden_size,
        }
    }

    /// The YOCO config, if this is a YOCO model.
    pub fn as_yoco(&self) -> Option<&Config> {
        match self {
            ModelConfig::Yoco(c) => Some(c),
            ModelConfig::Phi4Flash(_) => None,
        }
    }

    /// The Phi-4-mini-flash config, if this is one.
    pub fn as_phi4flash(&self) -> Option<&Phi4FlashConfig> {
        match self {
            ModelConfig::Phi4Flash(c) => Some(c),
            ModelConfig::Yoco(_) => None,
        }
    }

    /// The family's name: `"yoco"` or `"phi4flash"`.
    pub fn family(&self) -> &'static str {
        match self {
            ModelConfig::Yoco(_) => "yoco",
            ModelConfig::Phi4Flash(_) => "phi4flash",
        }
    }
}

/// The weights of one family.
#[derive(Clone, Debug)]
enum Family {
    Yoco(Box<Yoco>),
    Phi4Flash(Box<Phi4Flash>),
}

impl Model {
    /// Loads a model directory: `params.json` plus `model.safetensors`, a sharded
    /// `model.safetensors.index.json`, or `checkpoint.pth`, with the official code's parameter
    /// names; or a `model.gguf` (config in its metadata, quantized tensors kept as stored).
    /// Float weights are converted to `dtype` (use `F32` on CPU, `BF16`/`F16` on CUDA).
    ///
    /// Strict: every tensor's name and shape is checked against the config before loading.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use yoco::Model;
    ///
    /// # fn main() -> yoco::Result<()> {
    /// let model = Model::load(
    ///     concat!(env!("CARGO_MANIFEST_DIR"), "/models/shakespeare"),
    ///     &Device::Cpu,
    ///     DType::F32,
    /// )?;
    /// assert_eq!(model.config().n_layers(), 6);
    /// // A directory without weights is an error that says so, never a panic.
    /// assert!(Model::load(env!("CARGO_MANIFEST_DIR"), &Device::Cpu, DType::F32).is_err());
    /// # Ok(()) }
    /// ```
    pub fn load(dir: impl AsRef<Path>, device: &Device, dtype: DType) -> Result<Self> {
        let options = LoadOptions {
            device: device.clone(),
            dtype,
            ..LoadOptions::default()
        };
        Model::load_with(dir, &options)
    }

    /// [`Model::load`] with every option of [`LoadOptions`].
    ///
    /// With [`LoadOptions::quant`], each projection is read alone in f32, quantized and dropped
    /// before the next is read (safetensors tensors are read from the file one at a time rather
    /// than memory-mapped), so the float weights are never all in memory at once.
    ///
    /// ```
    /// use yoco::{LoadOptions, Model, Quant, WeightFormat};
    ///
    /// # fn main() -> yoco::Result<()> {
    /// let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/models/shakespeare");
    /// let options = LoadOptions { quant: Some(Quant::Q8_0), ..LoadOptions::default() };
    /// let model = Model::load_with(dir, &options)?;
    /// // The projections are quantized; the embedding and the norms stay float.
    /// for w in model.weights() {
    ///     assert_eq!(w.format.is_quantized(), w.shape.len() == 2 && !w.name.starts_with("embed"));
    /// }
    /// # Ok(()) }
    /// ```
    pub fn load_with(dir: impl AsRef<Path>, options: &LoadOptions) -> Result<Self> {
        let dir = dir.as_ref();
        let from_file = |e: Error| match e {
            Error::Candle(e) => {
                Error::Checkpoint(format!("reading weights from {}: {e}", dir.display()))
            }
            other => other,
        };
        if family_on_disk(dir)? == FamilyOnDisk::Phi4Flash {
            let opened = crate::models::phi4flash::load::open(
                dir,
                options.dtype,
                &options.device,
                options.quant.is_some(),
            )?;
            let mut w = Weights::new(opened.vb, options.kernels == Kernels::Native)
                .quantized(options.quant)
                .with_bands(opened.bands);
            if let Some(gguf) = opened.gguf {
                w = w.with_gguf(gguf);
            }
            return Model::build_phi4flash(opened.cfg, w, opened.head_form)
                .map_err(from_file)?
                .with_kv_dtype(options.kv_dtype);
        }
        let opened = crate::models::yoco::load::open(
            dir,
            options.dtype,
            &options.device,
            options.quant.is_some(),
        )?;
        let mut w = Weights::new(opened.vb, options.kernels == Kernels::Native)
            .quantized(options.quant)
            .with_bands(opened.bands);
        if let Some(gguf) = opened.gguf {
            w = w.with_gguf(gguf);
        }
        // The headers were checked; an error now comes from the tensor data itself.
        Model::build(opened.cfg, w)
            .map_err(from_file)?
            .with_kv_dtype(options.kv_dtype)
    }

    /// Builds a model from a config and a `VarBuilder` that yields the official parameter names
    /// ([`Config::parameters`]), for weights you bring yourself. The `VarBuilder`'s dtype and
    /// device are the model's.
    pub fn new(cfg: Config, vb: VarBuilder) -> Result<Self> {
        Model::build(cfg, Weights::new(vb, true))
    }

    fn build(cfg: Config, w: Weights) -> Result<Self> {
        let (dtype, device) = Model::checked_dtype(&w)?;
        let yoco = Yoco::build(cfg.clone(), &w)?;
        Ok(Model {
            family: Family::Yoco(Box::new(yoco)),
            config: ModelConfig::Yoco(cfg),
            weights: w.take_loaded().into(),
            consts: Constants::default(),
            dtype,
            kv_dtype: dtype,
            device,
        })
    }

    /// A Phi-4-mini-flash model of `cfg` from `w`, whose head is held as `head_form` says.
    fn build_phi4flash(cfg: Phi4FlashConfig, w: Weights, head_form: HeadForm) -> Result<Self> {
        let (dtype, device) = Model::checked_dtype(&w)?;
        let model = Phi4Flash::build(cfg.clone(), &w, head_form)?;
        Ok(Model {
            family: Family::Phi4Flash(Box::new(model)),
            config: ModelConfig::Phi4Flash(cfg),
            weights: w.take_loaded().into(),
            consts: Constants::default(),
            dtype,
            kv_dtype: dtype,
            device,
        })
    }

    /// The model with its global K/V kept in `kv_dtype` (`None`: the weights' dtype).
    fn with_kv_dtype(self, kv_dtype: Option<DType>) -> Result<Self> {
        let kv_dtype = kv_dtype.unwrap_or(self.dtype);
        if !matches!(kv_dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::Config(format!(
                "the global K/V's dtype must be f32, f16 or bf16, got {kv_dtype:?}"
            )));
        }
        Ok(Model { kv_dtype, ..self })
    }

    /// The weights' dtype and device; only float dtypes are accepted.
    fn checked_dtype(w: &Weights) -> Result<(DType, Device)> {
        let dtype = w.dtype();
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::Config(format!(
                "weights dtype must be f32, f16 or bf16, got {dtype:?}"
            )));
        }
        Ok((dtype, w.device().clone()))
    }

    /// A model with random weights (std 0.02, norm weights 1) of shape `cfg`, for benchmarks and
    /// experiments with shapes that have no checkpoint. Not seeded: candle's RNG cannot be.
    pub fn random(cfg: &Config, dtype: DType, device: &Device) -> Result<Self> {
        let mut tensors = std::collections::HashMap::new();
        for p in cfg.parameters() {
            let t = if p.shape.len() == 1 {
                Tensor::ones(p.shape.as_slice(), dtype, device)?
            } else {
                // Draw in f32 (CUDA draws no half types), then convert.
                Tensor::randn(0f32, 0.02, p.shape.as_slice(), device)?.to_dtype(dtype)?
            };
            tensors.insert(p.name, t);
        }
        Model::new(
            cfg.clone(),
            VarBuilder::from_tensors(tensors, dtype, device),
        )
    }

    /// [`Model::random`] with [`LoadOptions`]: the weights are drawn as each layer is built
    /// (never all at once in float), quantized to [`LoadOptions::quant`] if set.
    pub fn random_with(cfg: &Config, options: &LoadOptions) -> Result<Self> {
        let vb = VarBuilder::from_backend(
            Box::new(RandomWeights),
            options.dtype,
            options.device.clone(),
        );
        let w = Weights::new(vb, options.kernels == Kernels::Native).quantized(options.quant);
        Model::build(cfg.clone(), w)?.with_kv_dtype(options.kv_dtype)
    }

    /// A Phi-4-mini-flash model of shape `cfg` with random weights drawn as each layer is built
    /// (quantized to [`LoadOptions::quant`] if set), for benchmarks of shapes that have no
    /// checkpoint here (`Phi4FlashConfig::phi4_mini_flash()` is the real model's).
    pub fn random_phi4flash(cfg: &Phi4FlashConfig, options: &LoadOptions) -> Result<Self> {
        let vb = VarBuilder::from_backend(
            Box::new(RandomWeights),
            options.dtype,
            options.device.clone(),
        );
        let w = Weights::new(vb, options.kernels == Kernels::Native).quantized(options.quant);
        Model::build_phi4flash(cfg.clone(), w, HeadForm::Tied)?.with_kv_dtype(options.kv_dtype)
    }

    /// Every weight tensor of the model (official names, in the catalogue's order) and the
    /// format it is held in: what quantization gave each projection, with its fallbacks.
    pub fn weights(&self) -> &[WeightInfo] {
        &self.weights
    }

    /// Bytes of all weight tensors in memory (what [`Model::weights`] lists).
    pub fn weight_bytes(&self) -> usize {
        self.weights.iter().map(|w| w.bytes).sum()
    }

    /// The model's hyper-parameters (match on the family, or use the accessors every family
    /// has: [`ModelConfig::vocab_size`], [`ModelConfig::max_positions`], ...).
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The weights' dtype (also the dtype of the global K/V).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// An empty cache for `batch` sequences: its global K/V in [`LoadOptions::kv_dtype`] (the
    /// weights' dtype by default), the rest of the state in the weights' dtype (recurrent
    /// states in f32).
    pub fn new_cache(&self, batch: usize) -> Result<Cache> {
        match &self.family {
            Family::Yoco(m) => {
                Cache::with_dtypes(&m.cfg, batch, (self.dtype, self.kv_dtype), &self.device)
            }
            Family::Phi4Flash(m) => {
                if batch == 0 {
                    return Err(Error::Input("batch size must be at least 1".into()));
                }
                let dtypes = (self.dtype, self.kv_dtype);
                let (state, global) = m.new_state(batch, dtypes, &self.device)?;
                Ok(Cache {
                    state: FamilyState::Phi4Flash(state),
                    global,
                })
            }
        }
    }

    /// Restores a cache that [`Cache::save`] wrote for this model (any family), its state
    /// checked against the model's shapes.
    pub fn load_cache(&self, path: impl AsRef<Path>) -> Result<Cache> {
        match &self.family {
            Family::Yoco(m) => Cache::load_dtypes(
                path.as_ref(),
                &m.cfg,
                (self.dtype, self.kv_dtype),
                &self.device,
            ),
            Family::Phi4Flash(m) => {
                let cfg = m.config();
                let pairs = (cfg.num_key_value_heads / 2, 2 * cfg.head_dim());
                Cache::load_with(path.as_ref(), |file, batch| {
                    let dtypes = (self.dtype, self.kv_dtype);
                    let (like, _) = m.new_state(batch, dtypes, &self.device)?;
                    let window = (
                        like.window.n_layers(),
                        (batch, pairs.0, pairs.1),
                        cfg.sliding_window,
                    );
                    let state = crate::models::phi4flash::model::Phi4FlashState::load(
                        file,
                        &like,
                        window,
                        self.dtype,
                        &self.device,
                    )?;
                    let global = crate::layers::global_kv::GlobalKv::load(
                        file,
                        (batch, pairs.0, pairs.1),
                        self.kv_dtype,
                        &self.device,
                    )?;
                    Ok((FamilyState::Phi4Flash(state), global))
                })
            }
        }
    }

    /// Logits for every position of `ids: (B, T)` (u32), continuing from `cache`: `(B, T, vocab)`,
    /// f32. This is the full causal forward (for scoring); it runs in chunks of
    /// [`DEFAULT_PREFILL_CHUNK`] so that attention memory is bounded by the chunk.
    ///
    /// Memory beyond the output itself is one chunk's: each chunk's logits are written into the
    /// output as they come, and the cross-decoder attends over the global K/V in blocks of a
    /// chunk's keys.
    pub fn forward(&self, ids: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let t = self.check_ids(ids, cache)?;
        let b = ids.dim(0)?;
        let out = Tensor::zeros((b, t, self.config.vocab_size()), DType::F32, &self.device)?;
        let mut start = 0;
        while start < t {
            let c = DEFAULT_PREFILL_CHUNK.min(t - start);
            let logits = self
                .forward_chunk(&ids.narrow(1, start, c)?, cache, Logits::All)?
                .ok_or_else(|| Error::Input("no logits".into()))?;
            out.slice_set(&logits, 1, start)?;
            start += c;
        }
        Ok(out)
    }

    /// Processes a prompt `ids: (B, T)` with YOCO's early exit and returns the logits of its last
    /// position, `(B, vocab)` f32. Equivalent to [`Model::prefill_chunked`] with
    /// [`DEFAULT_PREFILL_CHUNK`].
    pub fn prefill(&self, ids: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        self.prefill_chunked(ids, cache, DEFAULT_PREFILL_CHUNK)
    }

    /// Prefill in chunks of `chunk` tokens: every chunk runs through the self-decoder and
    /// appends its global K/V; the cross-decoder runs only for the very last token (early exit),
    /// so a prompt costs about half a forward pass. The result equals the full forward's logits
    /// at the last position.
    pub fn prefill_chunked(&self, ids: &Tensor, cache: &mut Cache, chunk: usize) -> Result<Tensor> {
        let t = self.check_ids(ids, cache)?;
        if chunk == 0 {
            return Err(Error::Input("prefill chunk size must be at least 1".into()));
        }
        // The prompt's length is known: grow the global K/V once, to exactly what it needs.
        let end = cache.positions().iter().copied().max().unwrap_or(0) + t;
        cache.reserve(end)?;
        let mut start = 0;
        let mut last = None;
        while start < t {
            let c = chunk.min(t - start);
            let wanted = if start + c == t {
                Logits::Last
            } else {
                Logits::None
            };
            last = self.forward_chunk(&ids.narrow(1, start, c)?, cache, wanted)?;
            start += c;
        }
        last.ok_or_else(|| Error::Input("empty prompt".into()))
    }

    /// Decodes one token per sequence: `ids: (B,)` or `(B, 1)`, returns `(B, vocab)` f32 logits.
    /// Rows may be at different positions (a batch assembled with [`Cache::stack`]). On the CPU
    /// the step runs on rayon's global pool, the calling thread waiting for it (from one of the
    /// pool's own threads, it runs there).
    pub fn step(&self, ids: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let ids = match ids.rank() {
            1 => ids.unsqueeze(1)?,
            _ => ids.clone(),
        };
        let t = self.check_ids(&ids, cache)?;
        if t != 1 {
            return Err(Error::Input(format!(
                "step takes one token per sequence, got {t}"
            )));
        }
        self.last_logits(&ids, cache)
    }

    /// [`Model::step`] for ids held on the host: checked there, uploaded once, never read back.
    pub(crate) fn step_ids(&self, ids: &[u32], cache: &mut Cache) -> Result<Tensor> {
        self.check_host_ids(ids, (ids.len(), 1), cache)?;
        let ids = Tensor::new(ids, &self.device)?.unsqueeze(1)?;
        self.last_logits(&ids, cache)
    }

    /// One piece of a chunked prefill of ONE sequence, ids on the host: `ids` continue `cache`
    /// (checked like every input), and the logits of the last position are computed only when
    /// `last` (the others only fill the caches: early exit). A prompt prefilled piece by piece
    /// with the pieces of [`Model::prefill_chunked`] gives exactly its result.
    pub(crate) fn prefill_piece(
        &self,
        ids: &[u32],
        cache: &mut Cache,
        last: bool,
    ) -> Result<Option<Tensor>> {
        self.check_host_ids(ids, (1, ids.len()), cache)?;
        let ids = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let wanted = if last { Logits::Last } else { Logits::None };
        self.forward_chunk(&ids, cache, wanted)
    }

    fn last_logits(&self, ids: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        // The step runs on one of the pool's threads: each projection's bands are then pushed to
        // that thread's own queue, where the other threads, still awake from the last one, take
        // them. From outside the pool, every projection (~50 a step) was injected and the caller
        // parked until woken: one sequence's decode was 1.17x slower in Q8_0, 1.26x in Q4_K and
        // 1.04x in f32 (and no faster with a busy process beside it).
        rayon::scope(|_| self.forward_chunk(ids, cache, Logits::Last))?
            .ok_or_else(|| Error::Input("no logits".into()))
    }

    /// Validates `ids: (B, T)` (u32 or i64) against the vocabulary, the cache's batch and the
    /// position limit; returns `T`. Ids on a device are read back for the check: the generation
    /// loops check ids on the host before they upload them instead.
    fn check_ids(&self, ids: &Tensor, cache: &Cache) -> Result<usize> {
        let dims = ids.dims2().map_err(|_| {
            Error::Input(format!(
                "token ids must have shape (batch, len), got {:?}",
                ids.dims()
            ))
        })?;
        let values: Vec<u32> = match ids.dtype() {
            DType::U32 => ids.flatten_all()?.to_vec1()?,
            DType::I64 => ids
                .flatten_all()?
                .to_vec1::<i64>()?
                .into_iter()
                .map(|x| u32::try_from(x).unwrap_or(u32::MAX))
                .collect(),
            other => {
                return Err(Error::Input(format!(
                    "token ids must be u32 or i64, got {other:?}"
                )))
            }
        };
        self.check_host_ids(&values, dims, cache)?;
        Ok(dims.1)
    }

    /// The checks of [`Model::check_ids`] on ids of shape `(b, t)` held on the host.
    fn check_host_ids(&self, values: &[u32], (b, t): (usize, usize), cache: &Cache) -> Result<()> {
        if t == 0 {
            return Err(Error::Input("empty token sequence".into()));
        }
        if b != cache.batch_size() {
            return Err(Error::Input(format!(
                "ids have batch size {b} but the cache holds {} sequences",
                cache.batch_size()
            )));
        }
        let vocab = self.config.vocab_size();
        if let Some(&bad) = values.iter().find(|&&x| x as usize >= vocab) {
            return Err(Error::Input(format!(
                "token id {bad} is out of range for a vocabulary of {vocab}"
            )));
        }
        let furthest = cache.positions().iter().copied().max().unwrap_or(0);
        if furthest + t > self.config.max_positions() {
            return Err(Error::Input(format!(
                "sequence would reach {} positions, beyond the limit of {}",
                furthest + t,
                self.config.max_positions()
            )));
        }
        if t > 1 && cache.position().is_none() {
            return Err(Error::Input(
                "a multi-token chunk needs every row of the cache at the same position; \
                 rows at different positions can only step"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The logits of every position of one chunk of ONE sequence, ids on the host (checked like
    /// every input): `(C, vocab)` f32.
    pub(crate) fn all_logits_piece(&self, ids: &[u32], cache: &mut Cache) -> Result<Tensor> {
        self.check_host_ids(ids, (1, ids.len()), cache)?;
        let ids = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        self.forward_chunk(&ids, cache, Logits::All)?
            .ok_or_else(|| Error::Input("no logits".into()))?
            .squeeze(0)
            .map_err(Error::from)
    }

    /// One chunk `ids: (B, C)` through the model (ids already checked).
    fn forward_chunk(
        &self,
        ids: &Tensor,
        cache: &mut Cache,
        wanted: Logits,
    ) -> Result<Option<Tensor>> {
        match (&self.family, &mut cache.state) {
            (Family::Yoco(m), FamilyState::Yoco(state)) => {
                m.forward_chunk(ids, state, &mut cache.global, &self.consts, wanted)
            }
            (Family::Phi4Flash(m), FamilyState::Phi4Flash(state)) => {
                m.forward_chunk(ids, state, &mut cache.global, &self.consts, wanted, None)
            }
            _ => Err(Error::Input(
                "the cache was made for a model of another family".into(),
            )),
        }
    }

    /// A full forward of a Phi-4-mini-flash model over `ids: (1, T)` from an empty cache,
    /// keeping what the reference's fixtures hold (every layer's output, the final norm, the GMU
    /// memory) and the cache it leaves.
    #[cfg(test)]
    pub(crate) fn phi4flash_trace(&self, ids: &Tensor) -> Result<(Trace, Cache)> {
        let mut cache = self.new_cache(1)?;
        let mut trace = Trace::default();
        let (Family::Phi4Flash(m), FamilyState::Phi4Flash(state)) =
            (&self.family, &mut cache.state)
        else {
            return Err(Error::Input("not a Phi-4-mini-flash model".into()));
        };
        m.forward_chunk(
            ids,
            state,
            &mut cache.global,
            &self.consts,
            Logits::All,
            Some(&mut trace),
        )?;
        Ok((trace, cache))
    }
}

/// Writes `model.gguf`-format file `out` from the checkpoint in `dir` (any family and format
/// [`crate::Model::load`] reads): the config as metadata (a Phi-4-mini-flash file carries the
/// texts of `config.json` and `generation_config.json`, and its tied head as a quantized
/// `lm_head.weight`), the embedding and the norms in f32,
/// the projections quantized to `quant` (with the same fallbacks and the same bytes as
/// [`crate::LoadOptions::quant`] gives at load time) or in f32 without it. Tensors the checkpoint
/// already stores quantized (a GGUF) are copied as they are. Returns what each tensor got.
///
/// The checkpoint is read one projection at a time and quantized as it is read, so memory holds
/// the written tensors and at most one float projection beside them.
///
/// ```no_run
/// use yoco::{Model, Quant};
///
/// # fn main() -> yoco::Result<()> {
/// std::fs::create_dir_all("target/shakespeare-q8_0").ok();
/// yoco::write_gguf("models/shakespeare", "target/shakespeare-q8_0/model.gguf", Some(Quant::Q8_0))?;
/// let model = Model::load("target/shakespeare-q8_0", &candle_core::Device::Cpu, candle_core::DType::F32)?;
/// # Ok(()) }
/// ```
pub fn write_gguf(
    dir: impl AsRef<Path>,
    out: impl AsRef<Path>,
    quant: Option<Quant>,
) -> Result<Vec<WeightInfo>> {
    let (dir, out) = (dir.as_ref(), out.as_ref());
    match family_on_disk(dir)? {
        FamilyOnDisk::Yoco => crate::models::yoco::gguf::write(dir, out, quant),
        FamilyOnDisk::Phi4Flash => crate::models::phi4flash::gguf::write(dir, out, quant),
    }
}
