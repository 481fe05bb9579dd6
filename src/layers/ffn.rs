//! The SwiGLU feed-forward network: `fc2(silu(fc1 x) * gate x)`, the two branches as two fused
//! pieces (YOCO) or as the two halves of one weight (Phi-4-mini-flash's `fc1`).
//!
//! Trap: in the reference `fc1` is the *activated* branch and the module called `gate` is the
//! *linear* one (the reverse of the usual naming).

use candle_core::Tensor;

use crate::kernels::fused;
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
        let p = self.fc1_gate.project(x)?;
        // `fc1 | gate` as one product: one pass for the activation and the product.
        if let Some((y, 0)) = p.fused_band(0)? {
            if let Some(h) = fused::swiglu(y)? {
                return self.fc2.forward(&h);
            }
        }
        let (gate, up) = if self.fc1_gate.n_parts() == 2 {
            (p.rows(0)?, p.rows(1)?)
        } else {
            // One weight whose first half is the activated branch (Phi-4-mini-flash's `fc1`).
            let y = p.rows(0)?;
            let f = y.dim(candle_core::D::Minus1)? / 2;
            (
                y.narrow(candle_core::D::Minus1, 0, f)?,
                y.narrow(candle_core::D::Minus1, f, f)?,
            )
        };
        self.fc2.forward(&(gate.silu()? * up)?)
    }
}
