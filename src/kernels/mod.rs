//! Hand-written CPU kernels over raw slices. They know no model: each takes tensors or slices
//! of documented shapes and returns `None` where its case does not apply (another device, another
//! dtype, a shape it does not serve), so the caller falls back to candle's portable ops.
//!
//! * `gemv`: decode projections over f32 weights, and the `dot` every kernel shares;
//! * `quantized`: the same over candle's quantized blocks, and dequantization;
//! * `attention`: decode attention in tiles, and the window's band attention for prefill;
//! * `fused`: element-wise prefill pieces fused into one pass (SwiGLU, head norms, scans of
//!   decays, scaled masked softmax, small batched products);
//! * `scan`: Mamba's selective scan and causal convolution.

pub(crate) mod attention;
pub(crate) mod fused;
pub(crate) mod gemv;
pub(crate) mod quantized;
pub(crate) mod scan;
