//! The Phi-4-mini-flash model (SambaY): immutable weights, and one chunk step that reads as the
//! architecture.
//!
//! ```text
//! x       = embed_tokens[ids]                 no scale, no position embedding
//! layers 0 .. L/2-1:  Mamba (even) | windowed differential attention (odd)
//! layer  L/2:         Mamba whose scan output y is the GMU memory m
//! layer  L/2+1:       full causal differential attention: its K/V are THE shared K/V
//!   -- prefill exits here: nothing below keeps state --
//! layers L/2+2 ..:    GMU out_proj(silu(in_proj(x)) * m) (even) | cross attention over the
//!                     shared K/V with its own queries (odd)
//! logits  = final_layernorm(x) embed_tokens^T  (tied head, or lm_head when stored)
//! ```
//!
//! Every layer is pre-norm with LayerNorm (with bias): `h = x + mixer(LN1(x))`,
//! `out = h + MLP(LN2(h))`. The residual stream is kept in f32 whatever the weights' dtype, as the
//! reference does from its first Mamba layer on.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::layers::constants::Constants;
use crate::layers::embedding::TokenEmbedding;
use crate::layers::ffn::SwiGlu;
use crate::layers::global_kv::GlobalKv;
use crate::layers::linear::Linear;
use crate::layers::norm::LayerNorm;
use crate::layers::window_kv::WindowState;
use crate::layers::Weights;
use crate::models::phi4flash::attention::DiffAttention;
use crate::models::phi4flash::catalogue::{Catalogue, HeadForm, MixerSpec};
use crate::models::phi4flash::config::{LayerRole, Phi4FlashConfig};
use crate::models::phi4flash::mamba::{Mamba, MambaState};
use crate::models::Logits;
use crate::{Error, Result};

/// Weights of a Phi-4-mini-flash model.
#[derive(Clone, Debug)]
pub(crate) struct Phi4Flash {
    cfg: Phi4FlashConfig,
    embed_tokens: TokenEmbedding,
    layers: Vec<Layer>,
    final_norm: LayerNorm,
    lm_head: Linear,
}

#[derive(Clone, Debug)]
struct Layer {
    role: LayerRole,
    input_norm: LayerNorm,
    mixer: Mixer,
    post_norm: LayerNorm,
    mlp: SwiGlu,
}

#[derive(Clone, Debug)]
enum Mixer {
    Mamba(Mamba),
    Attention(DiffAttention),
    Gmu(Gmu),
}

/// Gated memory unit: `out_proj(silu(in_proj(x)) * m)`, `m` the memory of layer `L/2`.
#[derive(Clone, Debug)]
struct Gmu {
    in_proj: Linear,
    out_proj: Linear,
}

/// The per-sequence state of the self-decoder: every Mamba layer's conv and SSM state, and the
/// last keys and values of every windowed attention layer (the shared K/V is the cache's global
/// K/V, as for YOCO).
#[derive(Clone, Debug)]
pub(crate) struct Phi4FlashState {
    pub(crate) mamba: Vec<MambaState>,
    pub(crate) window: WindowState,
}

/// What one forward pass leaves behind for inspection (tests against the reference).
#[derive(Default)]
pub(crate) struct Trace {
    /// The residual stream after every layer that ran.
    pub hidden: Vec<Tensor>,
    /// After the final norm.
    pub final_norm: Option<Tensor>,
    /// The GMU memory.
    pub memory: Option<Tensor>,
}

impl Gmu {
    fn forward(&self, x: &Tensor, memory: &Tensor) -> Result<Tensor> {
        let g = self.in_proj.forward(x)?.silu()?;
        let m = memory.to_dtype(g.dtype())?;
        self.out_proj.forward(&(g * m)?)
    }
}

impl Layer {
    /// `h = x + mixed`, `out = h + MLP(LN2(h))`, in the f32 residual stream.
    fn finish(&self, x: &Tensor, mixed: &Tensor) -> Result<Tensor> {
        let h = (x + mixed.to_dtype(DType::F32)?)?;
        let mlp = self.mlp.forward(&self.post_norm.forward(&h)?)?;
        Ok((h + mlp.to_dtype(DType::F32)?)?)
    }
}

impl Phi4Flash {
    /// Builds every layer of `cfg` from `w`, whose head is held as `head_form` says.
    pub(crate) fn build(cfg: Phi4FlashConfig, w: &Weights, head_form: HeadForm) -> Result<Self> {
        cfg.validate()?;
        let cat = Catalogue::new(&cfg, head_form);
        let eps = cfg.layer_norm_eps;
        let heads = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim(),
        );
        let layers = cat
            .layers
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let mixer = match &spec.mixer {
                    MixerSpec::Mamba(m) => Mixer::Mamba(Mamba::load(w, m)?),
                    MixerSpec::Attention(a) => Mixer::Attention(DiffAttention::load(
                        w,
                        a,
                        i,
                        heads,
                        spec.role != LayerRole::CrossAttention,
                    )?),
                    MixerSpec::Gmu(g) => Mixer::Gmu(Gmu {
                        in_proj: Linear::load(w, &g.in_proj)?,
                        out_proj: Linear::load(w, &g.out_proj)?,
                    }),
                };
                Ok(Layer {
                    role: spec.role,
                    input_norm: LayerNorm::load(
                        w,
                        &spec.input_norm.weight,
                        &spec.input_norm.bias,
                        eps,
                    )?,
                    mixer,
                    post_norm: LayerNorm::load(
                        w,
                        &spec.post_norm.weight,
                        &spec.post_norm.bias,
                        eps,
                    )?,
                    mlp: SwiGlu {
                        fc1_gate: Linear::load(w, &spec.fc1)?,
                        fc2: Linear::load(w, &spec.fc2)?,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_norm = LayerNorm::load(w, &cat.final_norm.weight, &cat.final_norm.bias, eps)?;
        // The head is the embedding (tied); a stored `lm_head.weight` is used as it is. A tied head
        // quantized at load also serves the embedding's rows (on the CPU), so the table is held
        // once, quantized, rather than once more in float.
        let (embed_tokens, lm_head) = match (&cat.lm_head, head_form) {
            (Some(spec), HeadForm::InHead) => {
                let head = Linear::load(w, spec)?;
                let embedding = match head.single_quantized() {
                    Some(q) => match TokenEmbedding::quantized(q.clone())? {
                        Some(e) => e,
                        // Another device: a float table made from the quantized one.
                        None => {
                            TokenEmbedding::float(q.dequantize(w.device())?.to_dtype(w.dtype())?)?
                        }
                    },
                    None => {
                        return Err(Error::Checkpoint(
                            "the checkpoint has no embedding and its lm_head.weight is not \
                             quantized"
                                .into(),
                        ))
                    }
                };
                (embedding, head)
            }
            (Some(spec), _) => (
                TokenEmbedding::float(w.get(&cat.embed_tokens)?)?,
                Linear::load(w, spec)?,
            ),
            (None, _) if w.quantizes() => {
                let head = Linear::load(w, &vec![cat.embed_tokens.clone()])?;
                let rows = match head.single_quantized() {
                    Some(q) => TokenEmbedding::quantized(q)?,
                    None => None,
                };
                let embedding = match rows {
                    Some(e) => e,
                    None => TokenEmbedding::float(w.get(&cat.embed_tokens)?)?,
                };
                (embedding, head)
            }
            (None, _) => {
                let table = w.get(&cat.embed_tokens)?;
                let head = Linear::new(table.clone())?.native(w.native_kernels);
                (TokenEmbedding::float(table)?, head)
            }
        };
        Ok(Phi4Flash {
            embed_tokens,
            layers,
            final_norm,
            lm_head,
            cfg,
        })
    }

    /// The hyper-parameters.
    pub(crate) fn config(&self) -> &Phi4FlashConfig {
        &self.cfg
    }

    /// The empty state of `batch` sequences, window K/V in `dtype` and the global K/V in
    /// `global_dtype`.
    pub(crate) fn new_state(
        &self,
        batch: usize,
        (dtype, global_dtype): (DType, DType),
        device: &Device,
    ) -> Result<(Phi4FlashState, GlobalKv)> {
        let mamba = self
            .layers
            .iter()
            .filter_map(|l| match &l.mixer {
                Mixer::Mamba(m) => Some(m.new_state(batch, device)),
                _ => None,
            })
            .collect::<Result<Vec<_>>>()?;
        let windowed = self
            .layers
            .iter()
            .filter(|l| l.role == LayerRole::WindowAttention)
            .count();
        let pairs = (
            batch,
            self.cfg.num_key_value_heads / 2,
            2 * self.cfg.head_dim(),
        );
        let window = WindowState::new(windowed, pairs, self.cfg.sliding_window, dtype, device)?;
        let global = GlobalKv::with_shape(pairs, global_dtype, device)?;
        Ok((Phi4FlashState { mamba, window }, global))
    }

    /// One chunk `ids: (B, C)` (checked) through the model, continuing `state` and `global`.
    pub(crate) fn forward_chunk(
        &self,
        ids: &Tensor,
        state: &mut Phi4FlashState,
        global: &mut GlobalKv,
        consts: &Constants,
        wanted: Logits,
        mut trace: Option<&mut Trace>,
    ) -> Result<Option<Tensor>> {
        let (_, c) = ids.dims2()?;
        let mismatch = || Error::Input("the cache was made for a different model".into());
        let mut x = self.embed_tokens.forward(ids)?.to_dtype(DType::F32)?;
        let n_self = self.cfg.n_self_layers();
        let (self_layers, cross_layers) = self.layers.split_at(n_self.min(self.layers.len()));

        // The self-decoder: every layer keeps its state; the last one fills the shared K/V.
        let chunk = state.window.begin(c, consts)?;
        let mut memory = None;
        let mut global_view = None;
        {
            let mut slots = state.window.slots(&chunk);
            let mut mamba = state.mamba.iter_mut();
            for layer in self_layers {
                let xn = layer.input_norm.forward(&x)?;
                let mixed = match (&layer.mixer, layer.role) {
                    (Mixer::Mamba(m), role) => {
                        let (out, y) = m.forward(&xn, mamba.next().ok_or_else(mismatch)?)?;
                        if role == LayerRole::MemoryMamba {
                            memory = Some(y);
                        }
                        out
                    }
                    (Mixer::Attention(a), LayerRole::WindowAttention) => {
                        let (q, kv) = a.project(&xn)?;
                        let (k, v) = kv.ok_or_else(mismatch)?;
                        let slot = slots.next().ok_or_else(mismatch)?;
                        a.output(&slot.attend(&q, &k, &v, a.scale(), a.native())?)?
                    }
                    (Mixer::Attention(a), _) => {
                        let (q, kv) = a.project(&xn)?;
                        global.append(kv.ok_or_else(mismatch)?)?;
                        let view = global.view(c, c, consts)?;
                        let o = a.output(&view.attend(&q, a.scale(), a.native())?)?;
                        global_view = Some(view);
                        o
                    }
                    (Mixer::Gmu(_), _) => return Err(mismatch()),
                };
                x = layer.finish(&x, &mixed)?;
                if let Some(t) = trace.as_deref_mut() {
                    t.hidden.push(x.clone());
                }
            }
        }
        state.window.commit(chunk);
        let memory = memory.ok_or_else(mismatch)?;
        if let Some(t) = trace.as_deref_mut() {
            t.memory = Some(memory.clone());
        }

        // Early exit: the cross-decoder keeps no state, so it runs only where logits are wanted.
        let (mut x, memory, view) = match wanted {
            Logits::None => return Ok(None),
            Logits::Last if c > 1 => (
                x.narrow(1, c - 1, 1)?,
                memory.narrow(1, c - 1, 1)?,
                global.view(1, c, consts)?,
            ),
            _ => (x, memory, global_view.ok_or_else(mismatch)?),
        };
        for layer in cross_layers {
            let xn = layer.input_norm.forward(&x)?;
            let mixed = match &layer.mixer {
                Mixer::Gmu(g) => g.forward(&xn, &memory)?,
                Mixer::Attention(a) => {
                    let (q, _) = a.project(&xn)?;
                    a.output(&view.attend(&q, a.scale(), a.native())?)?
                }
                Mixer::Mamba(_) => return Err(mismatch()),
            };
            x = layer.finish(&x, &mixed)?;
            if let Some(t) = trace.as_deref_mut() {
                t.hidden.push(x.clone());
            }
        }
        let xn = self.final_norm.forward(&x)?;
        if let Some(t) = trace {
            t.final_norm = Some(xn.to_dtype(DType::F32)?);
        }
        let logits = self.lm_head.forward(&xn)?.to_dtype(DType::F32)?;
        Ok(Some(match wanted {
            Logits::Last => logits.squeeze(1)?,
            _ => logits,
        }))
    }
}

impl Phi4FlashState {
    /// Bytes of state in use (constant in the sequence length).
    pub(crate) fn bytes(&self) -> usize {
        self.mamba.iter().map(MambaState::bytes).sum::<usize>() + self.window.bytes()
    }

    /// Bytes allocated, slack included.
    pub(crate) fn bytes_allocated(&self) -> usize {
        self.mamba.iter().map(MambaState::bytes).sum::<usize>() + self.window.bytes_allocated()
    }

    /// Back to the start of a sequence.
    pub(crate) fn reset(&mut self) -> Result<()> {
        for m in &mut self.mamba {
            m.reset()?;
        }
        self.window.reset();
        Ok(())
    }

    /// The rows of `parts`, in order.
    pub(crate) fn stack(parts: &[&Phi4FlashState]) -> Result<Self> {
        let layers = parts.first().map_or(0, |p| p.mamba.len());
        if parts.iter().any(|p| p.mamba.len() != layers) {
            return Err(Error::Input("caches of different models".into()));
        }
        let mamba = (0..layers)
            .map(|i| {
                let rows: Vec<&MambaState> = parts.iter().map(|p| &p.mamba[i]).collect();
                MambaState::stack(&rows)
            })
            .collect::<Result<Vec<_>>>()?;
        let windows: Vec<&WindowState> = parts.iter().map(|p| &p.window).collect();
        Ok(Phi4FlashState {
            mamba,
            window: WindowState::stack(&windows)?,
        })
    }

    /// Rows `rows`, in that order.
    pub(crate) fn select(&self, rows: &[usize]) -> Result<Self> {
        Ok(Phi4FlashState {
            mamba: self
                .mamba
                .iter()
                .map(|m| m.select(rows))
                .collect::<Result<_>>()?,
            window: self.window.select(rows)?,
        })
    }

    /// Gives back the window's slack.
    pub(crate) fn shrink_to_fit(&mut self) -> Result<()> {
        self.window.shrink_to_fit()
    }

    /// Writes every layer's state (`mamba.{i}.*`, `window.layers.{i}.*`).
    pub(crate) fn save(&self, out: &mut HashMap<String, Tensor>) -> Result<()> {
        for (i, m) in self.mamba.iter().enumerate() {
            m.save(&format!("mamba.{i}"), out)?;
        }
        let mut window = HashMap::new();
        self.window.save(&mut window)?;
        out.extend(window.into_iter().map(|(k, v)| (format!("window.{k}"), v)));
        Ok(())
    }

    /// Reads what [`Phi4FlashState::save`] wrote, shaped like `like` (an empty state of the
    /// same model and batch).
    pub(crate) fn load(
        file: &HashMap<String, Tensor>,
        like: &Phi4FlashState,
        window: (usize, (usize, usize, usize), usize),
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mamba = like
            .mamba
            .iter()
            .enumerate()
            .map(|(i, m)| MambaState::load(file, &format!("mamba.{i}"), m, device))
            .collect::<Result<Vec<_>>>()?;
        let inner: HashMap<String, Tensor> = file
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("window.")
                    .map(|k| (k.to_string(), v.clone()))
            })
            .collect();
        let (layers, shape, w) = window;
        Ok(Phi4FlashState {
            mamba,
            window: WindowState::load(&inner, layers, shape, w, dtype, device)?,
        })
    }
}
