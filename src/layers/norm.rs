//! RMSNorm: `y = x * rsqrt(mean(x^2) + eps) * weight`, accumulated in f32 whatever the dtype.

use candle_core::{DType, Tensor};

use crate::checkpoint::catalogue::Parameter;
use crate::layers::Weights;
use crate::Result;

/// RMS normalisation over the last dimension.
#[derive(Clone, Debug)]
pub(crate) struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    /// The norm whose `(dim,)` weight is `p`.
    pub(crate) fn load(w: &Weights, p: &Parameter, eps: f64) -> Result<Self> {
        Ok(RmsNorm::new(w.get(p)?, eps))
    }

    /// From a `(dim,)` weight.
    pub(crate) fn new(weight: Tensor, eps: f64) -> Self {
        RmsNorm {
            weight,
            eps: eps as f32,
        }
    }

    /// A norm without learned scale (the reference's per-head norm of retention outputs,
    /// `elementwise_affine=False`).
    pub(crate) fn without_weight(
        dim: usize,
        eps: f64,
        dtype: DType,
        device: &candle_core::Device,
    ) -> Result<Self> {
        Ok(RmsNorm::new(Tensor::ones(dim, dtype, device)?, eps))
    }

    /// The epsilon under the square root.
    pub(crate) fn eps(&self) -> f32 {
        self.eps
    }

    /// Normalises `x` over its last dimension.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // candle's fused kernel needs contiguous input; this is a no-op when it already is.
        let x = x.contiguous()?;
        let w = if self.weight.dtype() == x.dtype() {
            self.weight.clone()
        } else {
            self.weight.to_dtype(x.dtype())?
        };
        Ok(candle_nn::ops::rms_norm(&x, &w, self.eps)?)
    }
}

/// LayerNorm with a bias: `y = (x - mean(x)) * rsqrt(var(x) + eps) * weight + bias`, statistics
/// in f32 whatever the dtype (the Phi-4-mini-flash family normalises with it everywhere).
#[derive(Clone, Debug)]
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    /// The norm whose `(dim,)` weight and bias are `weight` and `bias`.
    pub(crate) fn load(
        w: &Weights,
        weight: &Parameter,
        bias: &Parameter,
        eps: f64,
    ) -> Result<Self> {
        Ok(LayerNorm {
            weight: w.get(weight)?,
            bias: w.get(bias)?,
            eps: eps as f32,
        })
    }

    /// Normalises `x` over its last dimension; the result has the weight's dtype (a float32
    /// residual stream is normalised into the model's dtype).
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(self.weight.dtype())?.contiguous()?;
        Ok(candle_nn::ops::layer_norm(
            &x,
            &self.weight,
            &self.bias,
            self.eps,
        )?)
    }
}
