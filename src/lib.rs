//! # yoco
//!
//! Run YOCO ("You Only Cache Once", Sun et al., NeurIPS 2024) language models, and
//! Microsoft's Phi-4-mini-flash-reasoning (a YOCO of the SambaY architecture), on
//! [candle](https://github.com/huggingface/candle), on CPU or CUDA.
//!
//! YOCO is a decoder-decoder: a *self-decoder* (gated retention or sliding-window attention,
//! each with a constant-size cache) turns the tokens into one *global* key/value cache at the
//! midpoint, and a *cross-decoder* reuses that single cache in every layer. So a sequence keeps
//! one K/V instead of one per layer, and a prompt only needs the self-decoder except for its last
//! token (prefill early exit).
//!
//! ## Generate
//!
//! ```
//! use std::ops::ControlFlow;
//! use candle_core::{DType, Device};
//! use yoco::{GenerationConfig, Model, Tokenizer};
//!
//! # fn main() -> yoco::Result<()> {
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/models/shakespeare");
//! let model = Model::load(dir, &Device::Cpu, DType::F32)?;
//! let tokenizer = Tokenizer::from_model_dir(dir)?;
//! let cfg = GenerationConfig { max_new_tokens: 40, seed: 7, ..GenerationConfig::default() }
//!     .for_tokenizer(&tokenizer);
//!
//! // Stream: each new token as soon as it is chosen; Break stops early.
//! let prompt = tokenizer.encode("HAMLET.\n", true)?;
//! let mut text = tokenizer.stream(true);
//! let out = model.generate_stream(&prompt, &cfg, |id| {
//!     if let Ok(Some(piece)) = text.step(id) {
//!         print!("{piece}");
//!     }
//!     ControlFlow::Continue(())
//! })?;
//! println!("\n{} tokens at {:.1} tokens/s", out.tokens.len(), out.decode_tokens_per_s());
//! # Ok(()) }
//! ```
//!
//! ## Score
//!
//! ```
//! use candle_core::{DType, Device, Tensor, D};
//! use yoco::Model;
//!
//! # fn main() -> yoco::Result<()> {
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/gret");
//! let model = Model::load(dir, &Device::Cpu, DType::F32)?;
//! let ids = [1u32, 17, 42, 99, 7];
//! let mut cache = model.new_cache(1)?;
//! // Logits for every position, (batch, len, vocab), f32.
//! let logits = model.forward(&Tensor::new(&ids[..], &Device::Cpu)?.unsqueeze(0)?, &mut cache)?;
//! let logp = candle_nn::ops::log_softmax(&logits.squeeze(0)?, D::Minus1)?;
//! let mut nll = 0.0;
//! for t in 1..ids.len() {
//!     nll -= logp.get(t - 1)?.get(ids[t] as usize)?.to_scalar::<f32>()?;
//! }
//! println!("mean NLL {:.3}", nll / (ids.len() - 1) as f32);
//! # Ok(()) }
//! ```
//!
//! ## Phi-4-mini-flash
//!
//! A downloaded `microsoft/Phi-4-mini-flash-reasoning` directory (SambaY: Mamba-1 and
//! sliding-window differential attention in the self-decoder, gated memory units in the
//! cross-decoder) loads with the same [`Model::load`]; [`Model::config`] tells the family
//! ([`ModelConfig`]), and everything else is the same calls.
//!
//! ```
//! use candle_core::{DType, Device};
//! use yoco::{GenerationConfig, Model, ModelConfig};
//!
//! # fn main() -> yoco::Result<()> {
//! // A random-weight checkpoint in the real model's layout (the reference's fixture).
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/phi4flash/a_l8_w4");
//! let model = Model::load(dir, &Device::Cpu, DType::F32)?;
//! assert!(matches!(model.config(), ModelConfig::Phi4Flash(_)));
//! // The fixture has no generation_config.json: no stop id, just five tokens.
//! let cfg = GenerationConfig { stop_tokens: vec![], ..GenerationConfig::greedy(5) }.for_model(&model);
//! let out = model.generate(&[212, 142, 159, 206], &cfg)?;
//! assert_eq!(out.tokens.len(), 5);
//! # Ok(()) }
//! ```
//!
//! ## Layout
//!
//! The modules follow the architecture; each formula of either family lives in one place:
//!
//! * `models::yoco`: `params.json` ([`Config`]), the weight catalogue (every official parameter
//!   name and shape, [`Config::parameters`]), gated retention (three forms) and sliding-window
//!   attention, the midpoint's K/V projection and the cross-decoder;
//! * `models::phi4flash`: `config.json` ([`Phi4FlashConfig`]), its catalogue, Mamba-1,
//!   differential attention, the GMU;
//! * `layers`: what both families build from: projections (with or without bias, fused, float or
//!   quantized), RMSNorm, LayerNorm, SwiGLU, RoPE, softmax attention (GQA), the window and global
//!   K/V buffers, constants built once, the pre-norm residual block;
//! * `kernels`: hand-written CPU kernels over raw slices that know no model (decode projections,
//!   quantized dot products, decode and band attention, fused prefill pieces, the selective scan);
//! * `checkpoint`: safetensors, `checkpoint.pth` and GGUF reading, checked against a catalogue;
//! * [`Cache`]: the per-sequence state, a composition of the parts' own states;
//! * [`Model`]: loading either family, forward, prefill with early exit, step;
//! * `generation`: the decode loop, sampling ([`Sampling`], [`Sampler`]), text ([`Tokenizer`],
//!   stop strings) and the serving [`Engine`] (continuous batching, prefix reuse).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![deny(missing_docs)]

#[doc(hidden)]
pub mod bench_support;
mod cache;
mod checkpoint;
mod device;
mod error;
mod generation;
mod kernels;
mod layers;
mod model;
mod models;
mod quant;

pub use cache::Cache;
pub use checkpoint::catalogue::{ParamCounts, Parameter, Part};
pub use device::{device_by_name, dtype_by_name};
pub use error::{Error, Result};
pub use generation::chat::{ChatMessage, ChatPiece, ChatTemplate, ReasoningSplitter};
pub use generation::engine::{
    Canceller, Engine, EngineConfig, EngineStats, Event, Request, SequenceHandle,
};
pub use generation::sampling::{Rng, Sampler, Sampling, TokenLogprobs};
pub use generation::tokenizer::{TextStream, Tokenizer};
pub use generation::{
    Generation, GenerationConfig, StopReason, Token, REFERENCE_BOS, REFERENCE_EOS, REFERENCE_PAD,
};
pub use model::{write_gguf, Kernels, LoadOptions, Model, ModelConfig, DEFAULT_PREFILL_CHUNK};
pub use models::phi4flash::config::{LayerRole, Phi4FlashConfig};
pub use models::yoco::config::{Config, SelfMixer, DEFAULT_MAX_POSITIONS};
pub use quant::{Quant, WeightFormat, WeightInfo};
