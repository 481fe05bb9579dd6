//! The SwiGLU feed-forward network: `fc2(silu(fc1 x) * gate x)`.
//!
//! Trap: in the reference `fc1` is the *activated* branch and the module called `gate` is the
//! *linear* one (the reverse of the usual naming).

use candle_core::{Module, Tensor};
use candle_nn::Linear;

use crate::Result;

/// SwiGLU feed-forward network.
#[derive(Clone, Debug)]
pub struct SwiGlu {
    pub(crate) fc1: Linear,
    pub(crate) gate: Linear,
    pub(crate) fc2: Linear,
}

impl SwiGlu {
    /// `(B, T, dim) -> (B, T, dim)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let activated = self.fc1.forward(x)?.silu()?;
        let linear = self.gate.forward(x)?;
        Ok(self.fc2.forward(&(activated * linear)?)?)
    }
}
