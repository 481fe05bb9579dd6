//! Building blocks shared by both halves of the model: projections, RMSNorm, SwiGLU, the
//! reference's RoPE, softmax attention, the K/V buffers, constants built once, and the pre-norm
//! residual block that wraps every mixer.

pub(crate) mod attention;
pub(crate) mod constants;
pub(crate) mod ffn;
pub(crate) mod fused;
pub(crate) mod kv_buffer;
pub(crate) mod linear;
pub(crate) mod norm;
pub(crate) mod rope;

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::checkpoint::catalogue::{BlockSpec, Parameter};
use crate::Result;
use ffn::SwiGlu;
use linear::Linear;
use norm::RmsNorm;

/// Where the layers read their weights from, and how they are built.
pub(crate) struct Weights<'a> {
    vb: VarBuilder<'a>,
    /// May layers use the CPU-only kernels (decode projections and attention over raw slices)
    /// where the device is the CPU? When false, every layer runs only the portable tensor ops that
    /// every device has: the path CUDA takes, testable on a CPU.
    pub(crate) native_kernels: bool,
}

impl<'a> Weights<'a> {
    pub(crate) fn new(vb: VarBuilder<'a>, native_kernels: bool) -> Self {
        Weights { vb, native_kernels }
    }

    /// The tensor of parameter `p`, checked against its shape, in the model's dtype and device.
    pub(crate) fn get(&self, p: &Parameter) -> Result<Tensor> {
        Ok(self.vb.get(p.shape.as_slice(), &p.name)?)
    }

    /// The model's device.
    pub(crate) fn device(&self) -> &candle_core::Device {
        self.vb.device()
    }

    /// The model's dtype.
    pub(crate) fn dtype(&self) -> candle_core::DType {
        self.vb.dtype()
    }
}

/// `(B, C, H * d) -> (B, H, C, d)`, contiguous: one head per matrix for attention and retention.
pub(crate) fn split_heads(t: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, c, width) = t.dims3()?;
    let d = width / heads.max(1);
    Ok(t.reshape((b, c, heads, d))?.transpose(1, 2)?.contiguous()?)
}

/// `(B, H, C, d) -> (B, C, H * d)`, the inverse of [`split_heads`].
pub(crate) fn merge_heads(t: &Tensor) -> Result<Tensor> {
    let (b, h, c, d) = t.dims4()?;
    Ok(t.transpose(1, 2)?.reshape((b, c, h * d))?)
}

/// A pre-norm residual block, the shape of every layer of both halves:
/// `h = x + mixer(mixer_layer_norm(x))`, `out = h + ffn(final_layer_norm(h))`.
#[derive(Clone, Debug)]
pub(crate) struct Block<M> {
    mixer_layer_norm: RmsNorm,
    pub(crate) mixer: M,
    final_layer_norm: RmsNorm,
    ffn: SwiGlu,
    /// May the residual additions take the fused CPU kernel?
    native: bool,
}

impl<M> Block<M> {
    /// The block of `spec`, around the mixer that `mixer` builds from its part of the spec.
    pub(crate) fn load<S>(
        w: &Weights,
        spec: &BlockSpec<S>,
        eps: f64,
        mixer: impl FnOnce(&S) -> Result<M>,
    ) -> Result<Self> {
        Ok(Block {
            mixer_layer_norm: RmsNorm::load(w, &spec.mixer_layer_norm, eps)?,
            mixer: mixer(&spec.mixer)?,
            final_layer_norm: RmsNorm::load(w, &spec.final_layer_norm, eps)?,
            ffn: SwiGlu {
                fc1_gate: Linear::load(w, &spec.fc1_gate)?,
                fc2: Linear::load(w, &spec.fc2)?,
            },
            native: w.native_kernels,
        })
    }

    /// Runs the block on `x: (B, C, dim)`; `mix` applies the mixer to the normalised input.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        mix: impl FnOnce(&M, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let mixed = mix(&self.mixer, &self.mixer_layer_norm.forward(x)?)?;
        let h = fused::apply(x, &mixed, fused::Op::Add, self.native)?;
        let ffn = self.ffn.forward(&self.final_layer_norm.forward(&h)?)?;
        fused::apply(&h, &ffn, fused::Op::Add, self.native)
    }
}
