//! The self-decoder: `n_layers / 2` pre-norm layers of efficient self-attention, each with a
//! constant-size state, either gated retention ([`super::retention`]) or sliding-window attention
//! ([`super::window`]). Its output feeds the global K/V and the cross-decoder.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::layers::constants::Constants;
use crate::layers::rope::RopeTables;
use crate::layers::window_kv::WindowState;
use crate::layers::{Block, Weights};
use crate::models::yoco::catalogue::{Catalogue, SelfMixerSpec};
use crate::models::yoco::config::{Config, SelfMixer};
use crate::models::yoco::retention::{GatedRetention, RetentionState};
use crate::models::yoco::window::SlidingWindowAttention;
use crate::{Error, Result};

/// The self-decoder's layers, all of one kind.
#[derive(Clone, Debug)]
pub(crate) enum SelfDecoder {
    Retention(Vec<Block<GatedRetention>>),
    Window(Vec<Block<SlidingWindowAttention>>),
}

/// The self-decoder's state for a batch of sequences: one state per layer, of the layers' kind.
#[derive(Clone, Debug)]
pub(crate) enum SelfDecoderState {
    /// One `(B, H, d, d)` retention state per layer.
    Retention(Vec<RetentionState>),
    /// The window's keys and values of every layer (one fill record).
    Window(WindowState),
}

impl SelfDecoder {
    /// The layers of `catalogue`.
    pub(crate) fn load(w: &Weights, catalogue: &Catalogue, cfg: &Config) -> Result<Self> {
        let heads = (cfg.n_self_heads, cfg.self_head_dim());
        let eps = cfg.norm_eps;
        let specs = &catalogue.self_layers;
        // The catalogue's mixers are of the config's kind; a mismatch would be a bug in it.
        let wrong = || Error::Config("weight catalogue and config disagree on the mixer".into());
        Ok(match cfg.self_mixer() {
            SelfMixer::GatedRetention => SelfDecoder::Retention(
                specs
                    .iter()
                    .map(|spec| {
                        Block::load(w, spec, eps, |m| match m {
                            SelfMixerSpec::Retention { qkvg_gt, out } => {
                                GatedRetention::load(w, (qkvg_gt, out), heads, eps)
                            }
                            SelfMixerSpec::Window { .. } => Err(wrong()),
                        })
                    })
                    .collect::<Result<_>>()?,
            ),
            SelfMixer::SlidingWindow { .. } => SelfDecoder::Window(
                specs
                    .iter()
                    .map(|spec| {
                        Block::load(w, spec, eps, |m| match m {
                            SelfMixerSpec::Window { qkv, out } => {
                                SlidingWindowAttention::load(w, (qkv, out), heads)
                            }
                            SelfMixerSpec::Retention { .. } => Err(wrong()),
                        })
                    })
                    .collect::<Result<_>>()?,
            ),
        })
    }

    /// Runs a chunk `x: (B, C, dim)` through every layer, advancing each layer's own state.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        state: &mut SelfDecoderState,
        consts: &Constants,
    ) -> Result<Tensor> {
        let mut x = x.clone();
        match (self, state) {
            (SelfDecoder::Retention(layers), SelfDecoderState::Retention(states))
                if states.len() == layers.len() =>
            {
                for (layer, s) in layers.iter().zip(states.iter_mut()) {
                    x = layer.forward(&x, |m, xn| m.forward(xn, rope, s, consts))?;
                }
            }
            (SelfDecoder::Window(layers), SelfDecoderState::Window(state))
                if state.n_layers() == layers.len() =>
            {
                // What the chunk sees is decided once, for every layer.
                let chunk = state.begin(x.dim(1)?, consts)?;
                for (layer, slot) in layers.iter().zip(state.slots(&chunk)) {
                    x = layer.forward(&x, |m, xn| m.forward(xn, rope, &slot))?;
                }
                state.commit(chunk);
            }
            _ => {
                return Err(Error::Input(
                    "the cache was made for a different model".into(),
                ))
            }
        }
        Ok(x)
    }
}

impl SelfDecoderState {
    /// The empty state of `batch` sequences for a model with config `cfg` (window keys and
    /// values in `dtype`; retention state is always f32).
    pub(crate) fn new(cfg: &Config, batch: usize, dtype: DType, device: &Device) -> Result<Self> {
        let (n, h, d) = (cfg.n_half_layers(), cfg.n_self_heads, cfg.self_head_dim());
        Ok(match cfg.self_mixer() {
            SelfMixer::GatedRetention => SelfDecoderState::Retention(
                (0..n)
                    .map(|_| RetentionState::new(batch, h, d, device))
                    .collect::<Result<_>>()?,
            ),
            SelfMixer::SlidingWindow { window } => {
                SelfDecoderState::Window(WindowState::new(n, (batch, h, d), window, dtype, device)?)
            }
        })
    }

    /// Bytes of state in use (constant in the sequence length).
    pub(crate) fn bytes(&self) -> usize {
        match self {
            SelfDecoderState::Retention(states) => states.iter().map(RetentionState::bytes).sum(),
            SelfDecoderState::Window(w) => w.bytes(),
        }
    }

    /// Bytes allocated, slack included.
    pub(crate) fn bytes_allocated(&self) -> usize {
        match self {
            SelfDecoderState::Retention(_) => self.bytes(),
            SelfDecoderState::Window(w) => w.bytes_allocated(),
        }
    }

    /// Back to the empty state.
    pub(crate) fn reset(&mut self) -> Result<()> {
        match self {
            SelfDecoderState::Retention(states) => {
                states.iter_mut().try_for_each(RetentionState::reset)
            }
            SelfDecoderState::Window(w) => {
                w.reset();
                Ok(())
            }
        }
    }

    /// One batch of the rows of `parts` (states of one model), in order.
    pub(crate) fn stack(parts: &[&SelfDecoderState]) -> Result<Self> {
        let mixed = || Error::Input("Cache::stack: caches come from different models".into());
        match parts.first() {
            Some(SelfDecoderState::Retention(first)) => {
                let layers = (0..first.len())
                    .map(|i| {
                        let rows = parts
                            .iter()
                            .map(|p| match p {
                                SelfDecoderState::Retention(s) => s.get(i).ok_or_else(mixed),
                                SelfDecoderState::Window(_) => Err(mixed()),
                            })
                            .collect::<Result<Vec<_>>>()?;
                        RetentionState::stack(&rows)
                    })
                    .collect::<Result<Vec<_>>>()?;
                if parts.iter().any(|p| match p {
                    SelfDecoderState::Retention(s) => s.len() != layers.len(),
                    SelfDecoderState::Window(_) => true,
                }) {
                    return Err(mixed());
                }
                Ok(SelfDecoderState::Retention(layers))
            }
            Some(SelfDecoderState::Window(_)) => {
                let windows = parts
                    .iter()
                    .map(|p| match p {
                        SelfDecoderState::Window(w) => Ok(w),
                        SelfDecoderState::Retention(_) => Err(mixed()),
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(SelfDecoderState::Window(WindowState::stack(&windows)?))
            }
            None => Err(Error::Input("nothing to stack".into())),
        }
    }

    /// Gives back any slack (the window's; a retention state has none).
    pub(crate) fn shrink_to_fit(&mut self) -> Result<()> {
        match self {
            SelfDecoderState::Retention(_) => Ok(()),
            SelfDecoderState::Window(w) => w.shrink_to_fit(),
        }
    }

    /// The rows `rows`, in that order.
    pub(crate) fn select(&self, rows: &[usize]) -> Result<Self> {
        Ok(match self {
            SelfDecoderState::Retention(states) => SelfDecoderState::Retention(
                states
                    .iter()
                    .map(|s| s.select(rows))
                    .collect::<Result<_>>()?,
            ),
            SelfDecoderState::Window(w) => SelfDecoderState::Window(w.select(rows)?),
        })
    }

    /// Writes the state as `layers.{i}.*` tensors of a saved cache.
    pub(crate) fn save(&self, out: &mut HashMap<String, Tensor>) -> Result<()> {
        match self {
            SelfDecoderState::Retention(states) => {
                for (i, s) in states.iter().enumerate() {
                    out.insert(format!("layers.{i}.state"), s.s.clone());
                }
                Ok(())
            }
            SelfDecoderState::Window(w) => w.save(out),
        }
    }

    /// Reads what [`SelfDecoderState::save`] wrote, for `batch` sequences of config `cfg`.
    pub(crate) fn load(
        file: &HashMap<String, Tensor>,
        cfg: &Config,
        batch: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (n, h, d) = (cfg.n_half_layers(), cfg.n_self_heads, cfg.self_head_dim());
        Ok(match cfg.self_mixer() {
            SelfMixer::GatedRetention => SelfDecoderState::Retention(
                (0..n)
                    .map(|i| {
                        let name = format!("layers.{i}.state");
                        let s = file
                            .get(&name)
                            .ok_or_else(|| Error::Input(format!("missing tensor `{name}`")))?;
                        RetentionState::restore(s, (batch, h, d), device)
                            .map_err(|e| Error::Input(format!("`{name}`: {e}")))
                    })
                    .collect::<Result<_>>()?,
            ),
            SelfMixer::SlidingWindow { window } => SelfDecoderState::Window(WindowState::load(
                file,
                n,
                (batch, h, d),
                window,
                dtype,
                device,
            )?),
        })
    }
}
