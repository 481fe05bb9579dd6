//! Linear layers without bias (`y = x W^T`, `W: (out, in)`), as every projection of the
//! reference is, and their fused form.
//!
//! Two reasons for our own type rather than `candle_nn::Linear`:
//! * **Fusion.** Projections that read the same input (retention's q, k, v, g and gt; the FFN's
//!   fc1 and gate; the global k and v) are stored as one weight matrix and multiplied as one:
//!   a decode step streams them in one pass, and a prefill chunk makes one larger product whose
//!   column bands the fused kernels (`layers::fused`) read in place ([`Linear::project`]). The
//!   portable path (other devices) multiplies by each piece's band of rows, so that every piece
//!   is contiguous for the candle ops that follow.
//! * **Decode on CPU.** A decode step multiplies one row (or a few) by every weight matrix: that
//!   is bound by reading the weights, and candle's general matmul reaches well under the memory
//!   bandwidth for a single row. [`gemv_cpu`] streams each weight row once, over raw f32 slices,
//!   split across threads by output features; the rows of a batch (up to 64) are dotted with each
//!   weight row from registers, bit for bit as a row alone would be.
//!
//! A projection may also hold **quantized** weights (candle's GGML blocks, one tensor per fused
//! piece; see [`crate::Quant`]), laid out as the CPU kernels read them ([`QWeight`]: Q8_0, Q4_0
//! and Q4_K rows interleaved by eight where the CPU has AVX2). On the CPU, a few rows take
//! [`qgemv_cpu`], the same banded streaming over block dot products (the input quantized once
//! per call, as the block formats require); many rows (prefill) take the same kernel for
//! interleaved rows where the CPU has byte dot products, and otherwise dequantize the weight
//! and take the float matmul, which keeps a prompt at f32's speed (candle's quantized matmul is slower at 512 rows for Q8_0 and Q4_0,
//! and faster for Q4_K only with a second, repacked copy of the weight). Other devices (and
//! [`crate::Kernels::Portable`]) run candle's quantized matmul op, the one its CUDA kernels serve.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Tensor};

use crate::checkpoint::catalogue::LinearSpec;
use crate::kernels::fused;
use crate::kernels::gemv::gemv_cpu;
use crate::kernels::isa::Isa;
use crate::kernels::quantized::{qgemv_cpu, QWeight};
use crate::layers::rope::RopeTables;
use crate::layers::{split_heads, LinearWeights, Weights};
use crate::{Error, Result};

/// A linear layer, `y = x W^T (+ b)`, possibly several fused into one.
#[derive(Clone, Debug)]
pub(crate) struct Linear {
    weight: Weight,
    /// `(out,)` in the weight's float dtype, added after the product (YOCO has none; the
    /// Phi-4-mini-flash attention projections do).
    bias: Option<Tensor>,
    /// Output widths of the fused pieces, in order (one entry when not fused).
    parts: Vec<usize>,
    /// May a few rows on the CPU take [`gemv_cpu`] / [`qgemv_cpu`], and many rows the
    /// dequantized matmul?
    native: bool,
}

/// How a [`Linear`] holds its weight.
#[derive(Clone, Debug)]
enum Weight {
    /// `(out, in)`, contiguous, the pieces stacked along the output axis.
    Float(Tensor),
    /// One quantized `(out_i, in)` per piece (all the same input width), as the CPU kernels
    /// read it where they may (see [`QWeight::prepared`]).
    Quantized(Vec<Arc<QWeight>>),
}

impl Linear {
    /// The projections of `spec`, fused in that order, as [`Weights`] gives them (float, or
    /// quantized at load or in the file).
    pub(crate) fn load(w: &Weights, spec: &LinearSpec) -> Result<Self> {
        let linear = match w.linear(spec)? {
            LinearWeights::Float(weights) => match weights.as_slice() {
                [one] => Linear::new(one.clone())?,
                _ => Linear::fused(&weights)?,
            },
            LinearWeights::Quantized(pieces) => Linear::quantized(pieces, w.native_kernels)?,
        };
        Ok(Linear {
            native: w.native_kernels,
            ..linear
        })
    }

    /// One layer from a weight `(out, in)`.
    pub(crate) fn new(weight: Tensor) -> Result<Self> {
        let (out, _) = weight.dims2()?;
        Ok(Linear {
            weight: Weight::Float(weight.contiguous()?),
            bias: None,
            parts: vec![out],
            native: true,
        })
    }

    /// Quantized pieces `(out_i, in)` over the same input, fused in this order; laid out for
    /// the CPU kernels where they will run (`native`).
    pub(crate) fn quantized(pieces: Vec<Arc<QTensor>>, native: bool) -> Result<Self> {
        let mut parts = Vec::with_capacity(pieces.len());
        let mut width = None;
        for q in &pieces {
            let (out, k) = q.shape().dims2()?;
            if *width.get_or_insert(k) != k {
                return Err(Error::Config(format!(
                    "fused quantized pieces read different input widths ({width:?} and {k})"
                )));
            }
            parts.push(out);
        }
        if parts.is_empty() {
            return Err(Error::Config("a fused linear layer needs a weight".into()));
        }
        let pieces = pieces
            .into_iter()
            .map(|q| match native {
                true => QWeight::prepared(q, Isa::active()).map(Arc::new),
                false => Ok(Arc::new(QWeight::Blocks(q))),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Linear {
            weight: Weight::Quantized(pieces),
            bias: None,
            parts,
            native,
        })
    }

    /// Several layers over the same input, fused: their weights stacked along the output axis.
    /// [`Linear::project`] returns the pieces in the same order.
    pub(crate) fn fused(weights: &[Tensor]) -> Result<Self> {
        let parts = weights
            .iter()
            .map(|w| w.dims2().map(|(out, _)| out))
            .collect::<candle_core::Result<Vec<_>>>()?;
        if parts.is_empty() {
            return Err(Error::Config("a fused linear layer needs a weight".into()));
        }
        Ok(Linear {
            weight: Weight::Float(Tensor::cat(weights, 0)?.contiguous()?),
            bias: None,
            parts,
            native: true,
        })
    }

    /// The same layer, allowed the CPU kernels or not.
    pub(crate) fn native(self, native: bool) -> Self {
        Linear { native, ..self }
    }

    /// The quantized weight of a layer that is one quantized piece (a tied head whose rows can
    /// serve as the embedding); `None` otherwise.
    pub(crate) fn single_quantized(&self) -> Option<Arc<QWeight>> {
        match &self.weight {
            Weight::Quantized(pieces) if pieces.len() == 1 => pieces.first().cloned(),
            _ => None,
        }
    }

    /// Number of fused pieces.
    pub(crate) fn n_parts(&self) -> usize {
        self.parts.len()
    }

    /// The same layer with a bias `(out,)` added after the product.
    pub(crate) fn with_bias(self, bias: Tensor) -> Result<Self> {
        let out: usize = self.parts.iter().sum();
        if bias.dims1()? != out {
            return Err(Error::Config(format!(
                "a bias of {:?} for a layer of {out} outputs",
                bias.dims()
            )));
        }
        Ok(Linear {
            bias: Some(bias),
            ..self
        })
    }

    /// `x: (..., in) -> (..., out)` where `out` is the sum of the fused widths.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.product(x)?;
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(&b.to_dtype(y.dtype())?)?),
            None => Ok(y),
        }
    }

    /// `x W^T`, without the bias.
    fn product(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.gemv(x)? {
            return Ok(y);
        }
        match &self.weight {
            Weight::Float(w) => matmul(x, w),
            Weight::Quantized(pieces) => {
                if let Some(y) = self.dequantized_product(x, pieces)? {
                    return Ok(y);
                }
                let ys = pieces
                    .iter()
                    .map(|q| self.quantized_product(x, q))
                    .collect::<Result<Vec<_>>>()?;
                match ys.as_slice() {
                    [one] => Ok(one.clone()),
                    _ => Ok(Tensor::cat(&ys, x.rank().saturating_sub(1))?),
                }
            }
        }
    }

    /// The CPU decode kernel, where it applies and is allowed.
    fn gemv(&self, x: &Tensor) -> Result<Option<Tensor>> {
        if !self.native {
            return Ok(None);
        }
        match &self.weight {
            Weight::Float(w) => gemv_cpu(x, w),
            Weight::Quantized(pieces) => qgemv_cpu(x, pieces),
        }
    }

    /// `x W^T` for the quantized pieces of a fused weight, when the decode kernel did not apply,
    /// on the CPU with native kernels: the pieces dequantized one after another into a reused
    /// buffer and multiplied by the float gemm as one weight (prefill: hundreds of rows reuse
    /// every weight, which the float gemm does at f32's speed; one product over the fused width
    /// is faster than a product per piece and their concatenation, as for float weights).
    /// `None` where this does not apply.
    fn dequantized_product(&self, x: &Tensor, pieces: &[Arc<QWeight>]) -> Result<Option<Tensor>> {
        let width = x.dims().last().copied().unwrap_or(0);
        let rows = x.dims().iter().rev().skip(1).product::<usize>();
        let f32_cpu =
            x.device().is_cpu() && x.dtype() == DType::F32 && pieces.iter().all(|q| q.is_cpu());
        if !self.native || !f32_cpu || rows == 0 {
            return Ok(None);
        }
        let dims = x.dims();
        let x2 = x.contiguous()?;
        let (xs, xl) = x2.storage_and_layout();
        let candle_core::Storage::Cpu(xs) = &*xs else {
            return Ok(None);
        };
        let xd =
            crate::kernels::gemv::slice(xs.as_slice::<f32>()?, xl.start_offset(), rows * width)?;
        let Some(y) = crate::kernels::quantized::prefill_product_cpu(xd, rows, pieces)? else {
            return Ok(None);
        };
        let mut out_dims = dims[..dims.len().saturating_sub(1)].to_vec();
        out_dims.push(y.len() / rows);
        Ok(Some(Tensor::from_vec(y, out_dims, x.device())?))
    }

    /// `x q^T` for one quantized piece, when neither the decode kernel nor
    /// [`Linear::dequantized_product`] applied: on the CPU, the weight dequantized and
    /// multiplied in f32 (rows whose blocks candle's dot products refuse, see
    /// [`crate::kernels::quantized::needs_even_blocks`]); otherwise candle's quantized matmul op
    /// (CUDA's kernels; on the CPU, the portable path).
    fn quantized_product(&self, x: &Tensor, q: &QWeight) -> Result<Tensor> {
        let width = x.dims().last().copied().unwrap_or(0);
        let dequantized = x.device().is_cpu()
            && (self.native || crate::kernels::quantized::needs_even_blocks(q.dtype(), width));
        // Interleaved rows are only read by this crate's CPU code.
        let q = match q.tensor() {
            Some(q) if !dequantized => q,
            _ => {
                let w = crate::kernels::quantized::dequantize_cpu(q)?.to_device(x.device())?;
                let w = if x.dtype() == w.dtype() {
                    w
                } else {
                    w.to_dtype(x.dtype())?
                };
                return matmul(x, &w);
            }
        };
        let dims = x.dims();
        let (&k, lead) = dims
            .split_last()
            .ok_or_else(|| Error::Input("a linear layer needs at least one dimension".into()))?;
        let rows: usize = lead.iter().product();
        let x2 = x.reshape((rows, k))?.contiguous()?;
        let y = x2.apply_op1_no_bwd(q.as_ref())?;
        let y = if y.dtype() == x.dtype() {
            y
        } else {
            y.to_dtype(x.dtype())?
        };
        let mut out_dims = lead.to_vec();
        out_dims.push(q.shape().dims2()?.0);
        Ok(y.reshape(out_dims)?)
    }

    /// The fused pieces' outputs for `x: (B, C, in)`, taken the fastest way this layer may: on
    /// the CPU (native kernels) one product over the fused weight, whose pieces are then column
    /// bands that the fused kernels read in place; elsewhere one contiguous product per piece.
    pub(crate) fn project(&self, x: &Tensor) -> Result<Projected> {
        if self.native && x.device().is_cpu() && x.dtype() == DType::F32 {
            let y = self.forward(x)?.contiguous()?;
            let mut offsets = Vec::with_capacity(self.parts.len());
            let mut start = 0;
            for &width in &self.parts {
                offsets.push((start, width));
                start += width;
            }
            return Ok(Projected::Fused { y, offsets });
        }
        let mut parts = Vec::with_capacity(self.parts.len());
        let mut start = 0;
        for (i, &width) in self.parts.iter().enumerate() {
            let y = match &self.weight {
                Weight::Float(w) => matmul(x, &w.narrow(0, start, width)?)?,
                Weight::Quantized(pieces) => {
                    let q = pieces
                        .get(i)
                        .ok_or_else(|| Error::Config("fused piece count changed".into()))?;
                    self.quantized_product(x, q)?
                }
            };
            parts.push(match &self.bias {
                Some(b) => y.broadcast_add(&b.narrow(0, start, width)?.to_dtype(y.dtype())?)?,
                None => y,
            });
            start += width;
        }
        Ok(Projected::Parts(parts))
    }
}

/// The outputs of a fused projection's pieces (see [`Linear::project`]).
pub(crate) enum Projected {
    /// One contiguous `(B, C, sum of widths)` product; piece `i` is the column band
    /// `offsets[i] = (start, width)`.
    Fused {
        y: Tensor,
        offsets: Vec<(usize, usize)>,
    },
    /// One contiguous `(B, C, width)` tensor per piece.
    Parts(Vec<Tensor>),
}

impl Projected {
    fn band(&self, piece: usize) -> Result<(usize, usize)> {
        match self {
            Projected::Fused { offsets, .. } => offsets.get(piece).copied(),
            Projected::Parts(parts) => parts
                .get(piece)
                .and_then(|p| p.dims().last().map(|&w| (0, w))),
        }
        .ok_or_else(|| Error::Input(format!("no projection piece {piece}")))
    }

    /// Piece `piece` as `(B, C, width)` (a strided view of the fused product, or the part).
    pub(crate) fn rows(&self, piece: usize) -> Result<Tensor> {
        let (start, width) = self.band(piece)?;
        match self {
            Projected::Fused { y, .. } => Ok(y.narrow(2, start, width)?),
            Projected::Parts(parts) => Ok(parts[piece].clone()),
        }
    }

    /// Piece `piece` as `(B, H, C, d)` heads of size `width / n_heads`, rotated by `rope` and
    /// then multiplied by `scale`: in one pass over the fused product, or as candle ops.
    pub(crate) fn heads(
        &self,
        piece: usize,
        n_heads: usize,
        rope: Option<&RopeTables>,
        scale: Option<f64>,
    ) -> Result<Tensor> {
        let (start, width) = self.band(piece)?;
        if let Projected::Fused { y, .. } = self {
            let tables = rope.map(|r| (&r.cos, &r.sin));
            let d = width / n_heads.max(1);
            if let Some(h) = fused::heads(y, start, (n_heads, d), tables, scale.map(|s| s as f32))?
            {
                return Ok(h);
            }
        }
        let mut h = split_heads(&self.rows(piece)?.contiguous()?, n_heads)?;
        if let Some(rope) = rope {
            h = rope.apply(&h)?;
        }
        if let Some(scale) = scale {
            h = (h * scale)?;
        }
        Ok(h)
    }

    /// The fused product and piece `piece`'s first column, when the pieces share one product.
    pub(crate) fn fused_band(&self, piece: usize) -> Result<Option<(&Tensor, usize)>> {
        let (start, _) = self.band(piece)?;
        Ok(match self {
            Projected::Fused { y, .. } => Some((y, start)),
            Projected::Parts(_) => None,
        })
    }
}

/// `x W^T` through candle's matmul, for any leading dimensions of `x`.
fn matmul(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let (&k, lead) = dims
        .split_last()
        .ok_or_else(|| Error::Input("a linear layer needs at least one dimension".into()))?;
    let rows: usize = lead.iter().product();
    let y = x.reshape((rows, k))?.matmul(&weight.t()?)?;
    let mut out_dims = lead.to_vec();
    out_dims.push(weight.dim(0)?);
    Ok(y.reshape(out_dims)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gemv::GEMV_MAX_ROWS_F32;
    use candle_core::Device;

    fn seeded(shape: &[usize], seed: u64) -> Result<Tensor> {
        crate::kernels::testing::uniform(shape, seed, 1.0)
    }

    use crate::kernels::testing::naive_product as naive;

    use crate::kernels::testing::max_diff;

    #[test]
    fn gemv_kernel_and_matmul_path_equal_the_naive_product() -> Result<()> {
        // Widths that are and are not multiples of the 32 lanes and of the bands.
        for (rows, n, k) in [
            (1, 1, 1),
            (1, 37, 70),
            (3, 300, 96),
            (8, 129, 33),
            (9, 64, 40),
            (13, 37, 100),
            (64, 5, 64),
            (65, 9, 40),
        ] {
            let x = seeded(&[1, rows, k], (rows * 1000 + n + k) as u64)?;
            let w = seeded(&[n, k], (n * 7 + k) as u64)?;
            let lin = Linear::new(w.clone())?;
            let y = lin.forward(&x)?;
            assert_eq!(y.dims(), &[1, rows, n]);
            let got: Vec<f32> = y.flatten_all()?.to_vec1()?;
            let want = naive(&x, &w)?;
            let tol = 1e-5 * (k as f32).sqrt();
            assert!(max_diff(&got, &want) <= tol, "{rows}x{n}x{k}");
            // The kernel is taken exactly when the rows are few.
            assert_eq!(gemv_cpu(&x, &w)?.is_some(), rows <= GEMV_MAX_ROWS_F32);
        }
        Ok(())
    }

    #[test]
    fn fused_pieces_equal_separate_layers() -> Result<()> {
        let (a, b, c) = (
            seeded(&[16, 24], 1)?,
            seeded(&[5, 24], 2)?,
            seeded(&[16, 24], 3)?,
        );
        let fused = Linear::fused(&[a.clone(), b.clone(), c.clone()])?;
        let portable = Linear {
            native: false,
            ..fused.clone()
        };
        for rows in [1, 20] {
            let x = seeded(&[2, rows, 24], 4 + rows as u64)?;
            // One product read in bands (CPU) and one product per piece (portable).
            for layer in [&fused, &portable] {
                let p = layer.project(&x)?;
                assert!(p.rows(3).is_err());
                for (i, w) in [a.clone(), b.clone(), c.clone()].into_iter().enumerate() {
                    let want: Vec<f32> = Linear::new(w)?.forward(&x)?.flatten_all()?.to_vec1()?;
                    let got: Vec<f32> = p.rows(i)?.flatten_all()?.to_vec1()?;
                    assert!(max_diff(&got, &want) <= 1e-5);
                }
                assert_eq!(p.fused_band(1)?.is_some(), layer.native);
            }
        }
        Ok(())
    }

    #[test]
    fn strided_input_and_lower_precision_take_the_general_path() -> Result<()> {
        let w = seeded(&[12, 10], 5)?;
        let x = seeded(&[10, 2], 6)?.t()?; // (2, 10), not contiguous
        let got: Vec<f32> = Linear::new(w.clone())?
            .forward(&x)?
            .flatten_all()?
            .to_vec1()?;
        assert!(max_diff(&got, &naive(&x.contiguous()?, &w)?) <= 1e-5);
        let (x16, w16) = (x.to_dtype(DType::F16)?, w.to_dtype(DType::F16)?);
        assert!(gemv_cpu(&x16, &w16)?.is_none());
        let y16 = Linear::new(w16)?.forward(&x16)?.to_dtype(DType::F32)?;
        let got: Vec<f32> = y16.flatten_all()?.to_vec1()?;
        assert!(max_diff(&got, &naive(&x.contiguous()?, &w)?) <= 2e-2);
        Ok(())
    }

    fn some<T>(x: Option<T>) -> Result<T> {
        x.ok_or_else(|| Error::Input("kernel declined a CPU f32 input".into()))
    }

    fn max_diff_t(a: &Tensor, b: &Tensor) -> Result<f32> {
        Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
    }

    #[test]
    fn heads_equal_narrow_reshape_rope_and_scale() -> Result<()> {
        let (b, c, h, d) = (2, 37, 3, 8);
        let x = seeded(&[b, c, 5 * h * d], 1)?;
        let rope = crate::layers::rope::Rope::new(d, 10000.0, &Device::Cpu)?;
        for starts in [vec![5, 5], vec![3, 90]] {
            let tables = rope.tables(&starts, c, DType::F32)?;
            let got = some(crate::kernels::fused::heads(
                &x,
                h * d,
                (h, d),
                Some((&tables.cos, &tables.sin)),
                Some(0.25),
            )?)?;
            let piece = x.narrow(2, h * d, h * d)?.contiguous()?;
            let want = (tables.apply(&split_heads(&piece, h)?)? * 0.25)?;
            assert_eq!(max_diff_t(&got, &want)?, 0.0, "{starts:?}");
        }
        let plain = some(crate::kernels::fused::heads(&x, 0, (h, d), None, None)?)?;
        let want = split_heads(&x.narrow(2, 0, h * d)?.contiguous()?, h)?;
        assert_eq!(max_diff_t(&plain, &want)?, 0.0);
        Ok(())
    }
}
