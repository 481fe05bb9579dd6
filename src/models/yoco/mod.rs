//! YOCO ("You Only Cache Once", Sun et al., NeurIPS 2024), as the official code
//! (microsoft/unilm `YOCO/`) defines it: a self-decoder of gated retention or sliding-window
//! attention, one global K/V built at the midpoint, and a cross-decoder that reuses it.
//!
//! * `config`: `params.json`;
//! * `catalogue`: every official parameter name and shape;
//! * `load`, `gguf`: opening a model directory, and YOCO's GGUF metadata and writer;
//! * `retention`, `window`, `self_decoder`: the self-decoder's mixers and their states;
//! * `cross_decoder`: the midpoint's K/V projection and the cross-decoder's attention;
//! * `model`: the layers in order, prefill with early exit.

pub(crate) mod catalogue;
pub(crate) mod config;
pub(crate) mod cross_decoder;
pub(crate) mod gguf;
pub(crate) mod load;
pub(crate) mod model;
pub(crate) mod retention;
pub(crate) mod self_decoder;
pub(crate) mod window;
