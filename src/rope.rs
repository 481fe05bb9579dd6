//! Rotary position embedding, as the reference does it.
//!
//! Two departures from the usual (Llama) RoPE, both of which change logits by 1e-2..1e-1:
//! * frequencies `inv_freq[i] = theta^(-i / (d/2 - 1))` for `i in 0..d/2`, i.e.
//!   `theta ** -linspace(0, 1, d/2)`, not `theta^(-2i/d)`;
//! * **interleaved** pairs `(x[2i], x[2i+1])` (GPT-J style), not the half-split `(x[i], x[i+d/2])`.
//!
//! Angles are `pos as f32 * inv_freq[i]` in f32 for absolute positions, so there is no table
//! limit: tables are made for exactly the positions of each chunk.

use candle_core::{Device, Tensor};

use crate::Result;

/// Frequencies for one head size.
#[derive(Clone, Debug)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

/// `cos`/`sin` tables for the positions of one chunk, shape `(T, d/2)` (all rows of the batch at
/// the same positions) or `(B, T, d/2)` (rows at different positions).
#[derive(Clone, Debug)]
pub struct RopeTables {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Frequencies for heads of size `head_dim` (even) and base `theta`.
    pub fn new(head_dim: usize, theta: f64) -> Self {
        let half = head_dim / 2;
        let inv_freq = (0..half)
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
        Rope { inv_freq }
    }

    /// The frequencies, `theta ** -linspace(0, 1, d/2)`.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// Tables for `len` consecutive positions starting at `start[b]` for each row `b`.
    pub fn tables(
        &self,
        start: &[usize],
        len: usize,
        dtype: candle_core::DType,
        device: &Device,
    ) -> Result<RopeTables> {
        let half = self.inv_freq.len();
        let uniform = start.windows(2).all(|w| w[0] == w[1]);
        let rows: &[usize] = if uniform {
            &start[..start.len().min(1)]
        } else {
            start
        };
        let mut cos = Vec::with_capacity(rows.len() * len * half);
        let mut sin = Vec::with_capacity(rows.len() * len * half);
        for &s in rows {
            for p in s..s + len {
                let p = p as f32;
                for &f in &self.inv_freq {
                    let angle = p * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        let shape: Vec<usize> = if uniform {
            vec![len, half]
        } else {
            vec![rows.len(), len, half]
        };
        let cos = Tensor::from_vec(cos, shape.as_slice(), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, shape.as_slice(), device)?.to_dtype(dtype)?;
        Ok(RopeTables { cos, sin })
    }
}

impl RopeTables {
    /// Rotates `x` of shape `(B, H, T, d)` (made contiguous if needed).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        Ok(candle_nn::rotary_emb::rope_i(&x, &self.cos, &self.sin)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rotation written out pair by pair, independent of candle's kernel.
    #[test]
    fn rotates_interleaved_pairs_by_linspace_frequencies() -> Result<()> {
        let (h, t, d) = (2, 5, 8);
        let rope = Rope::new(d, 10000.0);
        let data: Vec<f32> = (0..h * t * d)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0)
            .collect();
        let x = Tensor::from_vec(data.clone(), (1, h, t, d), &Device::Cpu)?;
        let start = 123;
        let tables = rope.tables(&[start], t, candle_core::DType::F32, &Device::Cpu)?;
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
        let rope = Rope::new(4, 100.0);
        let x = Tensor::randn(0f32, 1.0, (2, 3, 2, 4), &Device::Cpu)?;
        let both = rope
            .tables(&[7, 40], 2, candle_core::DType::F32, &Device::Cpu)?
            .apply(&x)?;
        for (b, s) in [(0usize, 7usize), (1, 40)] {
            let one = rope
                .tables(&[s], 2, candle_core::DType::F32, &Device::Cpu)?
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
