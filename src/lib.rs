//! # yoco
//!
//! Run YOCO ("You Only Cache Once", Sun et al., NeurIPS 2024) language models on
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
//! ## Layout
//!
//! * [`config`]: `params.json`; [`loading`]: checkpoints (safetensors, shards, `checkpoint.pth`);
//! * [`norm`], [`ffn`], [`rope`]: RMSNorm, SwiGLU, the reference's RoPE;
//! * [`retention`] (gated retention, three forms) and [`swa`] (sliding window): the self-decoder;
//! * [`cross`]: the global K/V and the cross-decoder; [`attention`]: softmax attention (GQA);
//! * [`cache`]: per-sequence state; [`model`]: forward, prefill with early exit, step;
//! * [`sampling`], [`generation`], [`tokenizer`]: from logits to text.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![warn(missing_docs)]

pub mod attention;
pub mod cache;
pub mod config;
pub mod cross;
pub mod device;
pub mod error;
pub mod ffn;
pub mod generation;
pub mod linear;
pub mod loading;
pub mod model;
pub mod norm;
pub mod pth;
pub mod retention;
pub mod rope;
pub mod sampling;
pub mod swa;
pub mod tokenizer;

pub use cache::Cache;
pub use config::{Config, SelfMixer};
pub use device::{device_by_name, dtype_by_name};
pub use error::{Error, Result};
pub use generation::{Generation, GenerationConfig, StopReason};
pub use model::Model;
pub use sampling::Sampling;
pub use tokenizer::Tokenizer;
