//! The selective scan of Mamba-1 and its depthwise causal convolution on the CPU.

use candle_core::Tensor;

use crate::Result;

/// `silu(conv(x) + bias)` of `x: (B, C, E)` f32 after `history: (B, K-1, E)`; also the new
/// history. `None` where the kernel does not apply.
pub(crate) fn conv_cpu(
    _x: &Tensor,
    _history: &Tensor,
    _taps: &Tensor,
    _bias: &Tensor,
) -> Result<Option<(Tensor, Tensor)>> {
    Ok(None)
}

/// The scan of a chunk: `y: (B, C, E)` and the final state `(B, E, N)`. `None` where the kernel
/// does not apply.
pub(crate) fn scan_cpu(
    _u: &Tensor,
    _delta: &Tensor,
    _a: &Tensor,
    _b: &Tensor,
    _c: &Tensor,
    _d: &Tensor,
    _h: &Tensor,
) -> Result<Option<(Tensor, Tensor)>> {
    Ok(None)
}
