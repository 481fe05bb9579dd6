//! Microsoft's Phi-4-mini-flash-reasoning (architecture SambaY, arXiv 2507.06607): a YOCO whose
//! self-decoder alternates Mamba-1 layers with sliding-window differential attention and ends in
//! one full-attention layer whose K/V every cross layer reuses; half of the cross-decoder's
//! layers are gated memory units that read the last Mamba layer's scan output.
//!
//! * `config`: `config.json` and the role of every layer;
//! * `catalogue`: every Hugging Face parameter name and shape;
//! * `load`, `gguf`: opening a downloaded directory (or a `model.gguf`), and writing one;
//! * `mamba`: the Mamba-1 mixer and its conv/SSM state;
//! * `attention`: differential attention (windowed, global, cross);
//! * `model`: the layers in order, the GMU, prefill with early exit.

pub(crate) mod attention;
pub(crate) mod catalogue;
pub(crate) mod config;
pub(crate) mod gguf;
pub(crate) mod load;
pub(crate) mod mamba;
pub(crate) mod model;

#[cfg(test)]
mod tests;
