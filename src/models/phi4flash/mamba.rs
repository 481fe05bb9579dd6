//! The Mamba-1 mixer (even self-decoder layers) and its state: the last `K - 1` raw inputs of
//! the causal convolution and the `(E, N)` SSM state per row, both constant in the sequence
//! length.
//!
//! ```text
//! x, z  = in_proj(x)                      (x first)
//! u     = silu(conv1d(x) + conv_bias)      depthwise, causal, K taps (tap K-1 = current input)
//! dt, B, C = x_proj(u)                     widths R, N, N
//! delta = softplus(dt_proj(dt) + dt_bias)  bias inside the softplus
//! h_t   = exp(delta_t A) h_{t-1} + delta_t u_t B_t,   A = -exp(A_log)
//! y_t   = h_t C_t + D u_t                  the GMU memory of layer L/2 (before the gate)
//! out   = out_proj(y * silu(z))
//! ```

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, D};

use crate::layers::linear::Linear;
use crate::layers::Weights;
use crate::models::phi4flash::catalogue::MambaSpec;
use crate::{Error, Result};

/// Weights of one Mamba-1 mixer.
#[derive(Clone, Debug)]
pub(crate) struct Mamba {
    in_proj: Linear,
    /// `(E, K)` f32: the taps of each channel, the last one multiplying the current input.
    conv_weight: Tensor,
    /// `(E,)` f32.
    conv_bias: Tensor,
    x_proj: Linear,
    /// With its bias, inside the softplus.
    dt_proj: Linear,
    /// `A = -exp(A_log)`, `(E, N)` f32, computed once.
    a: Tensor,
    /// `(E,)` f32.
    d: Tensor,
    out_proj: Linear,
    d_inner: usize,
    n_state: usize,
    dt_rank: usize,
    d_conv: usize,
    /// May the CPU scan and conv kernels run?
    native: bool,
}

/// One Mamba layer's state for a batch of rows.
#[derive(Clone, Debug)]
pub(crate) struct MambaState {
    /// `(B, K - 1, E)` f32: the last `K - 1` raw conv inputs, oldest first (zeros before the
    /// sequence starts).
    conv: Tensor,
    /// `(B, E, N)` f32.
    ssm: Tensor,
}

impl Mamba {
    /// The mixer of `spec`.
    pub(crate) fn load(w: &Weights, spec: &MambaSpec) -> Result<Self> {
        let conv_weight = w.get_f32(&spec.conv_weight)?;
        let (e, _, k) = conv_weight.dims3()?;
        let a_log = w.get_f32(&spec.a_log)?;
        let n_state = a_log.dim(1)?;
        let dt_rank = spec.dt_proj.first().and_then(|p| p.shape.get(1)).copied();
        let dt_rank = dt_rank.ok_or_else(|| Error::Config("dt_proj has no shape".into()))?;
        Ok(Mamba {
            in_proj: Linear::load(w, &spec.in_proj)?,
            conv_weight: conv_weight.reshape((e, k))?.contiguous()?,
            conv_bias: w.get_f32(&spec.conv_bias)?,
            x_proj: Linear::load(w, &spec.x_proj)?,
            dt_proj: Linear::load(w, &spec.dt_proj)?.with_bias(w.get_f32(&spec.dt_bias)?)?,
            a: a_log.exp()?.neg()?.contiguous()?,
            d: w.get_f32(&spec.d)?,
            out_proj: Linear::load(w, &spec.out_proj)?,
            d_inner: e,
            n_state,
            dt_rank,
            d_conv: k,
            native: w.native_kernels,
        })
    }

    /// The empty state of `batch` rows.
    pub(crate) fn new_state(&self, batch: usize, device: &Device) -> Result<MambaState> {
        MambaState::zeros(batch, self.d_conv, self.d_inner, self.n_state, device)
    }

    /// Mixes a chunk `x: (B, C, dim)` (already normalised), continuing `state`: the mixer's
    /// output `(B, C, dim)` and the scan output `y: (B, C, E)` f32 (the GMU memory).
    pub(crate) fn forward(&self, x: &Tensor, state: &mut MambaState) -> Result<(Tensor, Tensor)> {
        let e = self.d_inner;
        let xz = self.in_proj.forward(x)?.to_dtype(DType::F32)?;
        let x_in = xz.narrow(D::Minus1, 0, e)?;
        let z = xz.narrow(D::Minus1, e, e)?;
        let u = self.conv(&x_in, state)?;
        let p = self
            .x_proj
            .forward(&u.to_dtype(x.dtype())?)?
            .to_dtype(DType::F32)?;
        let (r, n) = (self.dt_rank, self.n_state);
        let dt = p.narrow(D::Minus1, 0, r)?;
        let b = p.narrow(D::Minus1, r, n)?.contiguous()?;
        let cm = p.narrow(D::Minus1, r + n, n)?.contiguous()?;
        let delta = softplus(
            &self
                .dt_proj
                .forward(&dt.to_dtype(x.dtype())?)?
                .to_dtype(DType::F32)?,
        )?;
        let y = self.scan(&u, &delta, &b, &cm, state)?;
        let gated = (&y * z.silu()?)?;
        let out = self.out_proj.forward(&gated.to_dtype(x.dtype())?)?;
        Ok((out, y))
    }

    /// `silu(conv(x) + bias)` of a chunk `x: (B, C, E)` f32 after the state's `K - 1` inputs;
    /// the state keeps the last `K - 1` inputs.
    fn conv(&self, x: &Tensor, state: &mut MambaState) -> Result<Tensor> {
        let (_, c, _) = x.dims3()?;
        let k = self.d_conv;
        if self.native {
            if let Some((u, history)) =
                crate::kernels::scan::conv_cpu(x, &state.conv, &self.conv_weight, &self.conv_bias)?
            {
                state.conv = history;
                return Ok(u);
            }
        }
        let xx = Tensor::cat(&[&state.conv, &x.contiguous()?], 1)?;
        let mut acc = self
            .conv_bias
            .reshape((1, 1, self.d_inner))?
            .broadcast_as(x.shape())?;
        for tap in 0..k {
            let w = self
                .conv_weight
                .narrow(1, tap, 1)?
                .reshape((1, 1, self.d_inner))?;
            acc = (acc + xx.narrow(1, tap, c)?.broadcast_mul(&w)?)?;
        }
        state.conv = xx.narrow(1, c, k - 1)?.contiguous()?;
        Ok(acc.silu()?)
    }

    /// The selective scan of a chunk from `state`'s SSM state (updated): `y: (B, C, E)`.
    fn scan(
        &self,
        u: &Tensor,
        delta: &Tensor,
        b: &Tensor,
        c: &Tensor,
        state: &mut MambaState,
    ) -> Result<Tensor> {
        if self.native {
            if let Some((y, h)) =
                crate::kernels::scan::scan_cpu(u, delta, &self.a, b, c, &self.d, &state.ssm)?
            {
                state.ssm = h;
                return Ok(y);
            }
        }
        // One time step at a time in tensor ops: the portable path (every device runs it).
        let (_, len, _) = u.dims3()?;
        let mut h = state.ssm.clone();
        let mut ys = Vec::with_capacity(len);
        for t in 0..len {
            let u_t = u.narrow(1, t, 1)?.squeeze(1)?; // (B, E)
            let dt = delta.narrow(1, t, 1)?.squeeze(1)?; // (B, E)
            let b_t = b.narrow(1, t, 1)?; // (B, 1, N)
            let c_t = c.narrow(1, t, 1)?; // (B, 1, N)
            let da = dt
                .unsqueeze(2)?
                .broadcast_mul(&self.a.unsqueeze(0)?)?
                .exp()?;
            let dbu = (&dt * &u_t)?.unsqueeze(2)?.broadcast_mul(&b_t)?;
            h = ((da * &h)? + dbu)?;
            let y = (h.broadcast_mul(&c_t)?.sum(2)? + u_t.broadcast_mul(&self.d.unsqueeze(0)?)?)?;
            ys.push(y);
        }
        state.ssm = h;
        Ok(Tensor::stack(&ys, 1)?)
    }
}

/// `log(1 + exp(x))` written as `max(x, 0) + log(1 + exp(-|x|))`: no overflow for large `x`.
fn softplus(x: &Tensor) -> Result<Tensor> {
    let tail = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok((x.relu()? + tail)?)
}

impl MambaState {
    fn zeros(batch: usize, k: usize, e: usize, n: usize, device: &Device) -> Result<Self> {
        Ok(MambaState {
            conv: Tensor::zeros((batch, k.saturating_sub(1), e), DType::F32, device)?,
            ssm: Tensor::zeros((batch, e, n), DType::F32, device)?,
        })
    }

    /// Back to the start of a sequence.
    pub(crate) fn reset(&mut self) -> Result<()> {
        self.conv = self.conv.zeros_like()?;
        self.ssm = self.ssm.zeros_like()?;
        Ok(())
    }

    /// Bytes of state.
    pub(crate) fn bytes(&self) -> usize {
        (self.conv.elem_count() + self.ssm.elem_count()) * 4
    }

    /// The rows of `parts`, in order.
    pub(crate) fn stack(parts: &[&MambaState]) -> Result<Self> {
        let conv: Vec<&Tensor> = parts.iter().map(|p| &p.conv).collect();
        let ssm: Vec<&Tensor> = parts.iter().map(|p| &p.ssm).collect();
        Ok(MambaState {
            conv: Tensor::cat(&conv, 0)?,
            ssm: Tensor::cat(&ssm, 0)?,
        })
    }

    /// Rows `rows`, in that order.
    pub(crate) fn select(&self, rows: &[usize]) -> Result<Self> {
        let device = self.conv.device();
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let idx = Tensor::new(idx.as_slice(), device)?;
        Ok(MambaState {
            conv: self.conv.index_select(&idx, 0)?,
            ssm: self.ssm.index_select(&idx, 0)?,
        })
    }

    /// The conv history `(B, K - 1, E)` and SSM state `(B, E, N)`, f32.
    #[cfg(test)]
    pub(crate) fn tensors(&self) -> (&Tensor, &Tensor) {
        (&self.conv, &self.ssm)
    }

    /// Writes the state as `{name}.conv` and `{name}.ssm`.
    pub(crate) fn save(&self, name: &str, out: &mut HashMap<String, Tensor>) -> Result<()> {
        out.insert(format!("{name}.conv"), self.conv.to_device(&Device::Cpu)?);
        out.insert(format!("{name}.ssm"), self.ssm.to_device(&Device::Cpu)?);
        Ok(())
    }

    /// Reads what [`MambaState::save`] wrote, checked against `like`'s shapes.
    pub(crate) fn load(
        file: &HashMap<String, Tensor>,
        name: &str,
        like: &MambaState,
        device: &Device,
    ) -> Result<Self> {
        let get = |part: &str, want: &Tensor| -> Result<Tensor> {
            let key = format!("{name}.{part}");
            let t = file
                .get(&key)
                .ok_or_else(|| Error::Input(format!("missing tensor `{key}`")))?;
            if t.dims() != want.dims() {
                return Err(Error::Input(format!(
                    "`{key}` has shape {:?}, expected {:?}",
                    t.dims(),
                    want.dims()
                )));
            }
            Ok(t.to_dtype(DType::F32)?.to_device(device)?)
        };
        Ok(MambaState {
            conv: get("conv", &like.conv)?,
            ssm: get("ssm", &like.ssm)?,
        })
    }
}
