//! Differential attention, the attention of every Phi-4-mini-flash attention layer: windowed in
//! the self-decoder, full causal in the layer whose K/V become the shared cache, and over that
//! shared K/V (queries only) in the cross-decoder.
//!
//! ```text
//! q, k, v = Wqkv(x)                     (with bias); heads split even/odd:
//! q1, q2  = Q heads 0,2,4.. / 1,3,5..   k1, k2 likewise over the K/V heads
//! V'      = V heads (2j, 2j+1) side by side: H_kv/2 value heads of width 2 hd
//! A1      = softmax(q1 k1^T / sqrt(hd)) V',   A2 = softmax(q2 k2^T / sqrt(hd)) V'
//! lambda  = exp(sum lq1*lk1) - exp(sum lq2*lk2) + lambda_init,  lambda_init = 0.8 - 0.6 exp(-0.3 i)
//! o       = RMSNorm_2hd(A1 - lambda A2) * (1 - lambda_init)    heads merged plainly, out_proj (bias)
//! ```
//!
//! yoco keeps the K/V of head pairs `(2j, 2j+1)` side by side, `(B, H_kv/2, T, 2 hd)`: that is the
//! projection's own layout, and it is V' already. Each query of `q1` becomes `[q1 | 0]` and each of
//! `q2` becomes `[0 | q2]`, so that a dot product with a key pair `[k1 | k2]` is `q1 k1` or
//! `q2 k2`: both softmaxes then come from ONE ordinary grouped-query attention over the pairs
//! (`2 H/H_kv` queries per pair), which every attention kernel of the crate already runs (the
//! window's band kernel, the decode kernel, the portable path), reading each key once.

use candle_core::{DType, Tensor};

use crate::layers::linear::Linear;
use crate::layers::norm::RmsNorm;
use crate::layers::{merge_heads, split_heads, Weights};
use crate::models::phi4flash::catalogue::AttentionSpec;
use crate::Result;

/// Weights of one differential attention layer.
#[derive(Clone, Debug)]
pub(crate) struct DiffAttention {
    /// `Wqkv` with its bias: Q, K, V rows (Q only in cross layers).
    wqkv: Linear,
    out_proj: Linear,
    /// `lambda`, from the layer's four lambda vectors (fixed weights: computed once).
    lambda: f64,
    /// `1 - lambda_init`.
    out_scale: f64,
    subln: RmsNorm,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    /// `(2 hd,)`: ones over the first half (`[q1 | 0]`), and over the second (`[0 | q2]`).
    halves: (Tensor, Tensor),
    /// Does `Wqkv` also give K and V (self and global layers)?
    has_kv: bool,
    native: bool,
}

/// `lambda_init` of model layer `layer` (its index among all layers, not among attention layers).
pub(crate) fn lambda_init(layer: usize) -> f64 {
    0.8 - 0.6 * (-0.3 * layer as f64).exp()
}

impl DiffAttention {
    /// Layer `layer`'s attention of `spec`, with `(H, H_kv, hd)` heads.
    pub(crate) fn load(
        w: &Weights,
        spec: &AttentionSpec,
        layer: usize,
        (n_heads, n_kv_heads, head_dim): (usize, usize, usize),
        has_kv: bool,
    ) -> Result<Self> {
        let [q1, k1, q2, k2] = &spec.lambdas;
        // In f32, as the reference computes it from its float32 parameters.
        let dot = |a, b| -> Result<f64> {
            let s = (w.get_f32(a)? * w.get_f32(b)?)?
                .sum_all()?
                .to_scalar::<f32>()?;
            Ok(f64::from(s.exp()))
        };
        let init = lambda_init(layer);
        let lambda = f64::from((dot(q1, k1)? - dot(q2, k2)? + init) as f32);
        let device = w.device();
        let dtype = w.dtype();
        let first: Vec<f32> = (0..2 * head_dim)
            .map(|i| if i < head_dim { 1.0 } else { 0.0 })
            .collect();
        let second: Vec<f32> = first.iter().map(|x| 1.0 - x).collect();
        let half = |v: Vec<f32>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, 2 * head_dim, device)?.to_dtype(dtype)?)
        };
        Ok(DiffAttention {
            wqkv: Linear::load(w, &spec.wqkv)?.with_bias(w.get(&spec.wqkv_bias)?)?,
            out_proj: Linear::load(w, &spec.out_proj)?.with_bias(w.get(&spec.out_bias)?)?,
            lambda,
            out_scale: 1.0 - init,
            subln: RmsNorm::load(w, &spec.subln, 1e-5)?,
            n_heads,
            n_kv_heads,
            head_dim,
            halves: (half(first)?, half(second)?),
            has_kv,
            native: w.native_kernels,
        })
    }

    /// The chunk's projections of `x: (B, C, dim)` (normalised): the queries as
    /// `(B, H, C, 2 hd)` zero-padded halves (see the module docs) and, for self and global
    /// layers, the K/V pairs `(B, H_kv/2, C, 2 hd)`.
    pub(crate) fn project(&self, x: &Tensor) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let p = self.wqkv.forward(x)?;
        let (h, kv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let q = p.narrow(2, 0, h * hd)?.contiguous()?;
        let q = self.padded_queries(&split_heads(&q, h / 2)?)?;
        if !self.has_kv {
            return Ok((q, None));
        }
        let pairs = |start: usize| -> Result<Tensor> {
            split_heads(&p.narrow(2, start, kv * hd)?.contiguous()?, kv / 2)
        };
        Ok((q, Some((pairs(h * hd)?, pairs((h + kv) * hd)?))))
    }

    /// `(B, H/2, C, 2 hd)` query pairs `[q1 | q2]` -> `(B, H, C, 2 hd)`: for each K/V pair, its
    /// `G = H/H_kv` queries of `q1` as `[q1 | 0]`, then its `G` queries of `q2` as `[0 | q2]`.
    fn padded_queries(&self, pairs: &Tensor) -> Result<Tensor> {
        let (b, _, c, w) = pairs.dims4()?;
        let (m, g) = (self.n_kv_heads / 2, self.n_heads / self.n_kv_heads);
        let q1 = pairs
            .broadcast_mul(&self.halves.0)?
            .reshape((b, m, g, c, w))?;
        let q2 = pairs
            .broadcast_mul(&self.halves.1)?
            .reshape((b, m, g, c, w))?;
        Ok(Tensor::stack(&[q1, q2], 2)?.reshape((b, self.n_heads, c, w))?)
    }

    /// The scale of the scores: `1/sqrt(hd)` of a single head (not of a padded pair).
    pub(crate) fn scale(&self) -> f64 {
        1.0 / (self.head_dim as f64).sqrt()
    }

    /// May the CPU attention kernels run?
    pub(crate) fn native(&self) -> bool {
        self.native
    }

    /// The layer's output from the attention of the padded queries, `o: (B, H, C, 2 hd)`:
    /// `out_proj(RMSNorm(A1 - lambda A2) (1 - lambda_init))`, `(B, C, dim)`.
    pub(crate) fn output(&self, o: &Tensor) -> Result<Tensor> {
        let (b, _, c, w) = o.dims4()?;
        let (m, g) = (self.n_kv_heads / 2, self.n_heads / self.n_kv_heads);
        let o = o.reshape((b, m, 2, g, c, w))?;
        let a1 = o.narrow(2, 0, 1)?.reshape((b, m * g, c, w))?;
        let a2 = o.narrow(2, 1, 1)?.reshape((b, m * g, c, w))?;
        let diff = (a1.to_dtype(DType::F32)? - (a2.to_dtype(DType::F32)? * self.lambda)?)?;
        let normed = self.subln.forward(&diff.to_dtype(o.dtype())?)?;
        let normed = (normed * self.out_scale)?;
        self.out_proj.forward(&merge_heads(&normed)?)
    }
}
