//! The YOCO model: weights, and the three ways to run them (full forward, chunked prefill with
//! early exit, one-token steps).
//!
//! ```text
//! x0     = sqrt(dim) * embed_tokens[ids]
//! x      = self_decoder(x0)            n_layers/2 layers, constant-size state per layer
//! K, V   = global_kv(x)                once, at the midpoint: THE one KV cache of the model
//! x      = cross_decoder(x, K, V)      n_layers/2 layers, all reading the same K, V
//! logits = output_projection(RMSNorm(x))
//! ```
//!
//! Every layer is pre-norm with residuals: `h = x + mixer(norm(x))`, `out = h + ffn(norm(h))`.
//!
//! [`Model`] holds only immutable weights (it is `Send + Sync`; share it with an `Arc`). All
//! per-sequence state lives in a [`Cache`] that the caller owns.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};

use crate::attention::{causal_mask, right_aligned_mask};
use crate::cache::{Cache, SelfState};
use crate::config::{Config, SelfMixer};
use crate::cross::{CrossAttention, KvBuilder};
use crate::ffn::SwiGlu;
use crate::linear::Linear;
use crate::loading::WeightFiles;
use crate::norm::RmsNorm;
use crate::retention::GatedRetention;
use crate::rope::Rope;
use crate::swa::SlidingWindowAttention;
use crate::{Error, Result};

/// Default number of prompt tokens processed at once by [`Model::prefill`] and
/// [`Model::forward`]: working memory is bounded by the chunk, not the prompt.
pub const DEFAULT_PREFILL_CHUNK: usize = 512;

/// A pre-norm residual block: `h = x + mixer(mixer_layer_norm(x))`,
/// `out = h + ffn(final_layer_norm(h))`. Shared by both halves of the model.
#[derive(Clone, Debug)]
struct Block<M> {
    mixer_layer_norm: RmsNorm,
    mixer: M,
    final_layer_norm: RmsNorm,
    ffn: SwiGlu,
}

impl<M> Block<M> {
    fn forward(
        &self,
        x: &Tensor,
        mix: impl FnOnce(&M, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let h = (x + mix(&self.mixer, &self.mixer_layer_norm.forward(x)?)?)?;
        let out = (&h + self.ffn.forward(&self.final_layer_norm.forward(&h)?)?)?;
        Ok(out)
    }
}

/// The self-decoder's efficient attention, one of two kinds.
#[derive(Clone, Debug)]
enum SelfMixerLayer {
    Retention(GatedRetention),
    Window(SlidingWindowAttention),
}

/// Which positions of a chunk need logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Logits {
    /// None: the chunk only fills the caches (early exit: the cross-decoder never runs).
    None,
    /// The last position only (the end of a prompt, or a decode step).
    Last,
    /// Every position (scoring).
    All,
}

/// A YOCO language model: immutable weights.
#[derive(Clone, Debug)]
pub struct Model {
    cfg: Config,
    embed_tokens: Embedding,
    self_layers: Vec<Block<SelfMixerLayer>>,
    kv_builder: KvBuilder,
    cross_layers: Vec<Block<CrossAttention>>,
    layer_norm: RmsNorm,
    output_projection: Linear,
    self_rope: Rope,
    attn_rope: Rope,
    dtype: DType,
    device: Device,
}

fn linear(vb: &VarBuilder, out_dim: usize, in_dim: usize, name: &str) -> Result<Linear> {
    Linear::new(vb.get((out_dim, in_dim), &format!("{name}.weight"))?)
}

/// The layers `(name, out_dim)` over one input of width `in_dim`, fused in the order given.
fn fused(vb: &VarBuilder, in_dim: usize, layers: &[(&str, usize)]) -> Result<Linear> {
    let weights = layers
        .iter()
        .map(|(name, out_dim)| vb.get((*out_dim, in_dim), &format!("{name}.weight")))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Linear::fused(&weights)
}

fn norm(vb: &VarBuilder, dim: usize, name: &str, eps: f64) -> Result<RmsNorm> {
    Ok(RmsNorm::new(vb.get(dim, &format!("{name}.weight"))?, eps))
}

fn block<M>(vb: &VarBuilder, cfg: &Config, mixer: M) -> Result<Block<M>> {
    let (d, f) = (cfg.dim, cfg.hidden_dim);
    let ffn = vb.pp("ffn");
    Ok(Block {
        mixer_layer_norm: norm(vb, d, "mixer_layer_norm", cfg.norm_eps)?,
        mixer,
        final_layer_norm: norm(vb, d, "final_layer_norm", cfg.norm_eps)?,
        ffn: SwiGlu {
            fc1_gate: fused(&ffn, d, &[("fc1", f), ("gate", f)])?,
            fc2: linear(&ffn, d, f, "fc2")?,
        },
    })
}

impl Model {
    /// Loads a model directory: `params.json` plus `model.safetensors`, a sharded
    /// `model.safetensors.index.json`, or `checkpoint.pth`. Weights are converted to `dtype`
    /// (use `F32` on CPU, `BF16`/`F16` on CUDA).
    ///
    /// Strict: every tensor's name and shape is checked against the config before loading.
    pub fn load(dir: impl AsRef<Path>, device: &Device, dtype: DType) -> Result<Self> {
        let dir = dir.as_ref();
        let cfg = Config::from_file(dir.join("params.json"))?;
        let files = WeightFiles::find(dir)?;
        let prefix = crate::loading::check_tensors(&cfg, &files.tensors()?)?;
        let vb = files.var_builder(prefix, dtype, device)?;
        // The headers were checked; an error now comes from the tensor data itself.
        Model::new(cfg, vb).map_err(|e| match e {
            Error::Candle(e) => {
                Error::Checkpoint(format!("reading weights from {}: {e}", dir.display()))
            }
            other => other,
        })
    }

    /// Builds a model from a config and a `VarBuilder` that yields the reference's parameter
    /// names (for weights you bring yourself). The `VarBuilder`'s dtype and device are the model's.
    pub fn new(cfg: Config, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (d, v) = (cfg.dim, cfg.vocab_size);
        let dtype = vb.dtype();
        let device = vb.device().clone();
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::Config(format!(
                "weights dtype must be f32, f16 or bf16, got {dtype:?}"
            )));
        }
        let embed_tokens = Embedding::new(vb.get((v, d), "embed_tokens.weight")?, d);
        let output_projection = linear(&vb, v, d, "output_projection")?;

        let sd = vb.pp("self_decoder").pp("layers");
        let (hs, ds) = (cfg.n_self_heads, cfg.self_head_dim());
        let self_layers = (0..cfg.n_half_layers())
            .map(|l| -> Result<Block<SelfMixerLayer>> {
                let vb = sd.pp(l);
                let m = vb.pp("mixer");
                let mixer = match cfg.self_mixer() {
                    SelfMixer::GatedRetention => SelfMixerLayer::Retention(GatedRetention {
                        qkvg_gt: fused(
                            &m,
                            d,
                            &[
                                ("q_proj", d),
                                ("k_proj", d),
                                ("v_proj", d),
                                ("g_proj", d),
                                ("gt_proj", hs),
                            ],
                        )?,
                        out_proj: linear(&m, d, d, "out_proj")?,
                        n_heads: hs,
                        head_dim: ds,
                        head_norm: RmsNorm::without_weight(ds, cfg.norm_eps, DType::F32, &device)?,
                    }),
                    SelfMixer::SlidingWindow { window } => {
                        SelfMixerLayer::Window(SlidingWindowAttention {
                            qkv: fused(&m, d, &[("q_proj", d), ("k_proj", d), ("v_proj", d)])?,
                            out_proj: linear(&m, d, d, "out_proj")?,
                            n_heads: hs,
                            head_dim: ds,
                            window,
                        })
                    }
                };
                block(&vb, &cfg, mixer)
            })
            .collect::<Result<Vec<_>>>()?;

        let cd = vb.pp("cross_decoder");
        let kv_builder = KvBuilder {
            kv_layer_norm: norm(&cd, d, "kv_layer_norm", cfg.norm_eps)?,
            kv_proj: fused(
                &cd,
                d,
                &[("k_proj", cfg.kv_dim()), ("v_proj", cfg.kv_dim())],
            )?,
            n_kv_heads: cfg.n_attn_kv_heads,
            head_dim: cfg.attn_head_dim(),
        };
        let cross_layers = (0..cfg.n_half_layers())
            .map(|l| -> Result<Block<CrossAttention>> {
                let vb = cd.pp("layers").pp(l);
                let m = vb.pp("mixer");
                let mixer = CrossAttention {
                    q_proj: linear(&m, d, d, "q_proj")?,
                    out_proj: linear(&m, d, d, "out_proj")?,
                    n_heads: cfg.n_attn_heads,
                    head_dim: cfg.attn_head_dim(),
                };
                block(&vb, &cfg, mixer)
            })
            .collect::<Result<Vec<_>>>()?;
        let layer_norm = norm(&vb, d, "layer_norm", cfg.norm_eps)?;
        Ok(Model {
            self_rope: Rope::new(cfg.self_head_dim(), cfg.rope_theta),
            attn_rope: Rope::new(cfg.attn_head_dim(), cfg.rope_theta),
            cfg,
            embed_tokens,
            self_layers,
            kv_builder,
            cross_layers,
            layer_norm,
            output_projection,
            dtype,
            device,
        })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The weights' dtype (also the dtype of the global K/V).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// An empty cache for `batch` sequences.
    pub fn new_cache(&self, batch: usize) -> Result<Cache> {
        Cache::new(&self.cfg, batch, self.dtype, &self.device)
    }

    /// Logits for every position of `ids: (B, T)` (u32), continuing from `cache`: `(B, T, vocab)`,
    /// f32. This is the full causal forward (for scoring); it runs in chunks of
    /// [`DEFAULT_PREFILL_CHUNK`] so that attention memory is bounded by the chunk.
    pub fn forward(&self, ids: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let t = self.check_ids(ids, cache)?;
        let mut outs = Vec::with_capacity(t.div_ceil(DEFAULT_PREFILL_CHUNK));
        let mut start = 0;
        while start < t {
            let c = DEFAULT_PREFILL_CHUNK.min(t - start);
            if let Some(l) = self.forward_chunk(&ids.narrow(1, start, c)?, cache, Logits::All)? {
                outs.push(l);
            }
            start += c;
        }
        Ok(Tensor::cat(&outs, 1)?)
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
    /// Rows may be at different positions (a batch assembled with [`Cache::stack`]).
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
        self.forward_chunk(&ids, cache, Logits::Last)?
            .ok_or_else(|| Error::Input("no logits".into()))
    }

    /// Validates `ids: (B, T)` against the vocabulary, the cache's batch and the position limit;
    /// returns `T`.
    fn check_ids(&self, ids: &Tensor, cache: &Cache) -> Result<usize> {
        let (b, t) = ids.dims2().map_err(|_| {
            Error::Input(format!(
                "token ids must have shape (batch, len), got {:?}",
                ids.dims()
            ))
        })?;
        if t == 0 {
            return Err(Error::Input("empty token sequence".into()));
        }
        if b != cache.batch_size() {
            return Err(Error::Input(format!(
                "ids have batch size {b} but the cache holds {} sequences",
                cache.batch_size()
            )));
        }
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
        if let Some(&bad) = values.iter().find(|&&x| x as usize >= self.cfg.vocab_size) {
            return Err(Error::Input(format!(
                "token id {bad} is out of range for a vocabulary of {}",
                self.cfg.vocab_size
            )));
        }
        let furthest = cache.positions().iter().copied().max().unwrap_or(0);
        if furthest + t > self.cfg.max_positions {
            return Err(Error::Input(format!(
                "sequence would reach {} positions, beyond the limit of {}",
                furthest + t,
                self.cfg.max_positions
            )));
        }
        if t > 1 && cache.position().is_none() {
            return Err(Error::Input(
                "a multi-token chunk needs every row of the cache at the same position; \
                 rows at different positions can only step"
                    .into(),
            ));
        }
        Ok(t)
    }

    /// One chunk `ids: (B, C)` through the model (ids already checked).
    fn forward_chunk(
        &self,
        ids: &Tensor,
        cache: &mut Cache,
        wanted: Logits,
    ) -> Result<Option<Tensor>> {
        let (_, c) = ids.dims2()?;
        let ids = ids.to_dtype(DType::U32)?;
        let starts = cache.positions().to_vec();

        // Self-decoder.
        let x = self.embed_tokens.forward(&ids)?;
        let mut x = (x * (self.cfg.dim as f64).sqrt())?;
        let rope = self
            .self_rope
            .tables(&starts, c, self.dtype, &self.device)?;
        let window = self.window_mask(cache, &starts, c)?;
        for (layer, state) in self.self_layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(&x, |mixer, xn| match (mixer, state) {
                (SelfMixerLayer::Retention(m), SelfState::Retention(s)) => m.forward(xn, &rope, s),
                (SelfMixerLayer::Window(m), SelfState::Window(buf)) => {
                    let (mask, l) = &window;
                    m.forward(xn, &rope, buf, mask.as_ref(), *l)
                }
                _ => Err(Error::Input("cache was made for a different model".into())),
            })?;
        }

        // The midpoint: this chunk's rows of the one global K/V.
        let rope = self
            .attn_rope
            .tables(&starts, c, self.dtype, &self.device)?;
        self.kv_builder.append(&x, &rope, &mut cache.global)?;
        cache.advance(c);

        // Early exit: the cross-decoder runs only where logits are wanted.
        let (mut x, rope, mask) = match wanted {
            Logits::None => return Ok(None),
            Logits::All => {
                let mask = if c > 1 {
                    let l = cache.global.len();
                    Some(causal_mask(c, l, starts[0], 0, None, &self.device)?)
                } else {
                    self.ragged_mask(
                        cache.global.filled(),
                        cache.global.len(),
                        cache.global.is_uniform(),
                    )?
                };
                (x, rope, mask)
            }
            Logits::Last => {
                // A decode step's query sits where its K did: reuse that table.
                let rope = if c == 1 {
                    rope
                } else {
                    let last: Vec<usize> = starts.iter().map(|s| s + c - 1).collect();
                    self.attn_rope.tables(&last, 1, self.dtype, &self.device)?
                };
                let mask = self.ragged_mask(
                    cache.global.filled(),
                    cache.global.len(),
                    cache.global.is_uniform(),
                )?;
                (x.narrow(1, c - 1, 1)?, rope, mask)
            }
        };
        let (k, v) = cache.global.last(cache.global.len())?;
        for layer in &self.cross_layers {
            x = layer.forward(&x, |mixer, xn| {
                mixer.forward(xn, &rope, &k, &v, mask.as_ref())
            })?;
        }
        let logits = self
            .output_projection
            .forward(&self.layer_norm.forward(&x)?)?;
        let logits = logits.to_dtype(DType::F32)?;
        Ok(Some(match wanted {
            Logits::Last => logits.squeeze(1)?,
            _ => logits,
        }))
    }

    /// For a single-query step over right-aligned rows: a per-row mask when rows own different
    /// numbers of slots, none when every row sees every slot.
    fn ragged_mask(&self, filled: &[usize], len: usize, uniform: bool) -> Result<Option<Tensor>> {
        if uniform {
            return Ok(None);
        }
        Ok(Some(right_aligned_mask(filled, len, &self.device)?))
    }

    /// The sliding-window mask shared by all self-decoder layers for this chunk, and how many
    /// trailing cache slots the chunk attends to. Built once per chunk, not once per layer.
    fn window_mask(
        &self,
        cache: &Cache,
        starts: &[usize],
        c: usize,
    ) -> Result<(Option<Tensor>, usize)> {
        let (Some(w), Some(SelfState::Window(buf))) = (cache.window(), cache.layers.first()) else {
            return Ok((None, 0));
        };
        if c == 1 {
            // One query per row: it sees its own key plus up to W-1 earlier ones.
            let visible: Vec<usize> = buf.filled().iter().map(|f| (f + 1).min(w)).collect();
            let l = visible.iter().copied().max().unwrap_or(1);
            let mask = if visible.iter().all(|&n| n == l) {
                None
            } else {
                Some(right_aligned_mask(&visible, l, &self.device)?)
            };
            return Ok((mask, l));
        }
        let retained = buf.filled().first().copied().unwrap_or(0).min(w - 1);
        let l = retained + c;
        let p0 = starts.first().copied().unwrap_or(0);
        let mask = causal_mask(c, l, p0, p0 - retained, Some(w), &self.device)?;
        Ok((Some(mask), l))
    }
}

impl Model {
    /// A model with random weights (std 0.02, norm weights 1) of shape `cfg`, for benchmarks and
    /// experiments with shapes that have no checkpoint. Not seeded: candle's RNG cannot be.
    pub fn random(cfg: &Config, dtype: DType, device: &Device) -> Result<Self> {
        let mut tensors = std::collections::HashMap::new();
        for (name, shape) in crate::loading::expected_tensors(cfg) {
            let t = if shape.len() == 1 {
                Tensor::ones(shape.as_slice(), dtype, device)?
            } else {
                // Draw in f32 (CUDA draws no half types), then convert.
                Tensor::randn(0f32, 0.02, shape.as_slice(), device)?.to_dtype(dtype)?
            };
            tensors.insert(name, t);
        }
        Model::new(
            cfg.clone(),
            VarBuilder::from_tensors(tensors, dtype, device),
        )
    }
}
