//! Rotary position embedding, as the reference does it.
//!
//! Two departures from the usual (Llama) RoPE; getting either wrong moves the logits of the test
//! fixtures by 2 to 10 (tests/fixtures/README.md), far beyond rounding:
//! * frequencies `inv_freq[i] = theta^(-i / (d/2 - 1))` for `i in 0..d/2`, i.e.
//!   `theta ** -linspace(0, 1, d/2)`, not `theta^(-2i/d)`;
//! * **interleaved** pairs `(x[2i], x[2i+1])` (GPT-J style), not the half-split `(x[i], x[i+d/2])`.
//!
//! Angles are `pos as f32 * inv_freq[i]` in f32 for absolute positions, so there is no table
//! limit: each chunk's tables are computed on the model's device for exactly its positions (the
//! positions are the only upload), once per chunk for all layers.

use candle_core::{DType, Device, Tensor};

use crate::Result;

/// Frequencies for one head size, on the model's device.
#[derive(Clone, Debug)]
pub(crate) struct Rope {
    /// `(d/2,)` f32: `theta ** -linspace(0, 1, d/2)`.
    inv_freq: Tensor,
}

/// `cos`/`sin` tables for the positions of one chunk, shape `(T, d/2)` (all rows of the batch at
/// the same positions) or `(B, T, d/2)` (rows at different positions).
#[derive(Clone, Debug)]
pub(crate) struct RopeTables {
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
}

impl Rope {
    /// Frequencies for heads of size `head_dim` (even) and base `theta`.
    pub(crate) fn new(head_dim: usize, theta: f64, device: &Device) -> Result<Self> {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                // linspace(0, 1, n) has a single point 0 when n == 1.
                let frac = if half > 1 {
                    i as f64 / (half - 1) as f64
                } else {
                    0.0
                };
                theta.powf(-frac) as f32
            })
            .collect();
        Ok(Rope {
            inv_freq: Tensor::from_vec(inv_freq, half, device)?,
        })
    }

    /// Tables for `len` consecutive positions starting at `start[b]` for each row `b`, in `dtype`.
    pub(crate) fn tables(&self, start: &[usize], len: usize, dtype: DType) -> Result<RopeTables> {
        let device = self.inv_freq.device();
        let uniform = start.windows(2).all(|w| w[0] == w[1]);
        // Positions as u32 (exact: positions stay below 2^24), then f32 on the device.
        let positions = match start {
            [s, ..] if uniform => Tensor::arange(*s as u32, (*s + len) as u32, device)?,
            _ => {
                let pos: Vec<u32> = start
                    .iter()
                    .flat_map(|&s| (s..s + len).map(|p| p as u32))
                    .collect();
                Tensor::from_vec(pos, (start.len(), len), device)?
            }
        };
        // angle = f32(pos) * inv_freq, the product the reference takes, then cos and sin in f32.
        let angles = positions
            .to_dtype(DType::F32)?
            .unsqueeze(positions.rank())?
            .broadcast_mul(&self.inv_freq)?;
        Ok(RopeTables {
            cos: angles.cos()?.to_dtype(dtype)?,
            sin: angles.sin()?.to_dtype(dtype)?,
        })
    }
}

impl RopeTables {
    /// Rotates `x` of shape `(B, H, T, d)` (made contiguous if needed).
    pub(crate) fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        Ok(candle_nn::rotary_emb::rope_i(&x, &self.cos, &self.sin)?)
    }

    /// The tables of the last position only.
    pub(crate) fn last(&self) -> Result<RopeTables> {
        let axis = self.cos.rank() - 2;
        let n = self.cos.dim(axis)?;
        Ok(RopeTables {
            cos: self.cos.narrow(axis, n - 1, 1)?,
            sin: self.sin.narrow(axis, n - 1, 1)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rotation written out pair by pair, independent of candle's kernel.
    #[test]
    fn rotates_interleaved_pairs_by_linspace_frequencies() -> Result<()> {
        let (h, t, d) = (2, 5, 8);
        let rope = Rope::new(d, 10000.0, &Device::Cpu)?;
        let data: Vec<f32> = (0..h * t * d)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0)
            .collect();
        let x = Tensor::from_vec(data.clone(), (1, h, t, d), &Device::Cpu)?;
        let start = 123;
        let tables = rope.tables(&[start], t, DType::F32)?;
        let y: Vec<f32> = tables.apply(&x)?.flatten_all()?.to_vec1()?;
        for hh in 0..h {
            for tt in 0..t {
                for i in 0..d / 2 {
                    let freq = 10000f64.powf(-(i as f64) / (d / 2 - 1) as f64) as f32;
                    let angle = (start + tt) as f32 * freq;
                    let (c, s) = (angle.cos(), angle.sin());
                    let base = (hh * t + tt) * d;
                    let (a, b) = (data[base + 2 * i], data[base + 2 * i + 1]);
                    assert!((y[base + 2 * i] - (a * c - b * s)).abs() < 1e-5);
                    assert!((y[base + 2 * i + 1] - (b * c + a * s)).abs() < 1e-5);
                }
            }
        }
        Ok(())
    }

    #[test]
    fn per_row_tables_match_uniform_tables_row_by_row() -> Result<()> {
        let rope = Rope::new(4, 100.0, &Device::Cpu)?;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 2, 4), &Device::Cpu)?;
        let both = rope.tables(&[7, 40], 2, DType::F32)?.apply(&x)?;
        for (b, s) in [(0usize, 7usize), (1, 40)] {
            let one = rope
                .tables(&[s], 2, DType::F32)?
                .apply(&x.narrow(0, b, 1)?)?;
            let diff = (one - both.narrow(0, b, 1)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-6);
        }
        Ok(())
    }
}
