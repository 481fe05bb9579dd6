//! yoco (work in progress)
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![warn(missing_docs)]

pub mod attention;
pub mod cache;
pub mod config;
pub mod cross;
pub mod error;
pub mod ffn;
pub mod generation;
pub mod loading;
pub mod model;
pub mod norm;
pub mod retention;
pub mod rope;
pub mod sampling;
pub mod swa;
pub mod tokenizer;

pub use cache::Cache;
pub use config::{Config, SelfMixer};
pub use error::{Error, Result};
pub use generation::{Generation, GenerationConfig, StopReason};
pub use model::Model;
pub use sampling::Sampling;
pub use tokenizer::Tokenizer;
