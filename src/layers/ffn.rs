//! The SwiGLU feed-forward network: `fc2(silu(fc1 x) * gate x)`.
//!
//! Trap: in the reference `fc1` is the *activated* branch and the module called `gate` is the
//! *linear* one (the reverse of the usual naming).

use candle_core::Tensor;

use crate::layers::linear::Linear;
use crate::Result;

/// SwiGLU feed-forward network.
#[derive(Clone, Debug)]
pub(crate) struct SwiGlu {
    /// `fc1` (activated) and `gate` (linear) fused, in that order.
    pub(crate) fc1_gate: Linear,
    pub(crate) fc2: Linear,
}

impl SwiGlu {
    /// `(B, T, dim) -> (B, T, dim)`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [fc1, gate] = self.fc1_gate.forward_parts(x)?;
        self.fc2.forward(&(fc1.silu()? * gate)?)
    }
}
