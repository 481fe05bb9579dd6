//! Gated retention (gRet), the default self-decoder mixer.
//!
//! Per layer, with `H = n_self_heads` heads of size `d = dim / H`:
//!
//! ```text
//! q, k, v, g = x W_q, x W_k, x W_v, x W_g          (dim -> dim)
//! gt         = x W_gt                              (dim -> H)
//! q, k       = RoPE(q), RoPE(k) * d^-0.5           (no softmax anywhere)
//! lg_t       = logsigmoid(gt_t) / 16               (log of the decay gamma_t, per head and token)
//! o          = retention(q, k, v, lg)              (below)
//! o          = RMSNorm_noweight(o) per head        (eps 1e-5)
//! out        = out_proj(silu(g) * o)
//! ```
//!
//! Retention has three equivalent forms, all here and all tested against each other:
//! * parallel:  `o_n = sum_{m<=n} exp(G_n - G_m) (q_n . k_m) v_m`, `G = cumsum(lg)`;
//! * recurrent: `S_t = exp(lg_t) S_{t-1} + k_t^T v_t`, `o_t = q_t S_t` (`S` is `d x d` per head);
//! * chunkwise: the parallel form inside a chunk plus `(q_i * exp(G_i)) S_prev`, then
//!   `S = exp(G_last) S_prev + sum_j exp(G_last - G_j) k_j^T v_j`.
//!
//! The state `S` and all decay arithmetic are f32 whatever the weights' dtype.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};

use crate::checkpoint::catalogue::LinearSpec;
use crate::kernels::fused::{self, apply, apply_matmul, apply_scale_rows, Op};
use crate::layers::constants::{ConstKey, Constants};
use crate::layers::linear::Linear;
use crate::layers::norm::RmsNorm;
use crate::layers::rope::RopeTables;
use crate::layers::{merge_heads, Weights};
use crate::{Error, Result};

/// The reference's `gate_logit_normalizer`.
const GATE_LOGIT_NORMALIZER: f64 = 16.0;

/// Chunk length of the chunkwise form during prefill (the reference uses 256): the inner
/// parallel part costs `O(C^2 d)` per head, the state update `O(C d^2)`.
pub(crate) const RETENTION_CHUNK: usize = 256;

/// Weights of one gated-retention layer.
#[derive(Clone, Debug)]
pub(crate) struct GatedRetention {
    /// `q_proj`, `k_proj`, `v_proj`, `g_proj` and `gt_proj` fused, in that order.
    qkvg_gt: Linear,
    out_proj: Linear,
    n_heads: usize,
    head_dim: usize,
    /// Per-head output norm without weight.
    head_norm: RmsNorm,
    /// May the fused CPU kernels run (the decays and state scan of a prefill chunk, and a
    /// decode step's [`recurrent_step_cpu`])?
    native: bool,
}

/// The state of one gated-retention layer: `S: (B, H, d, d)`, always f32, constant in the
/// sequence length.
#[derive(Clone, Debug)]
pub(crate) struct RetentionState {
    pub(crate) s: Tensor,
    /// Set when `s` is a buffer a decode step made, which no tensor outside this state (and its
    /// clones) holds: a step writes it in place while no clone shares the token (copy on write,
    /// as the K/V buffers do). At 16 sequences of bench-160m that saves writing 75 MB of fresh
    /// buffers per step.
    own: Option<Arc<()>>,
}

impl RetentionState {
    /// The zero state of `batch` sequences.
    pub(crate) fn new(
        batch: usize,
        n_heads: usize,
        head_dim: usize,
        device: &Device,
    ) -> Result<Self> {
        Ok(RetentionState {
            s: Tensor::zeros((batch, n_heads, head_dim, head_dim), DType::F32, device)?,
            own: None,
        })
    }

    /// Bytes of state.
    pub(crate) fn bytes(&self) -> usize {
        self.s.elem_count() * self.s.dtype().size_in_bytes()
    }

    /// Back to the zero state.
    pub(crate) fn reset(&mut self) -> Result<()> {
        self.s = self.s.zeros_like()?;
        self.own = None;
        Ok(())
    }

    /// One batch of the rows of `parts`, in order.
    pub(crate) fn stack(parts: &[&RetentionState]) -> Result<Self> {
        // candle's `cat` of one tensor shares its storage: so does the copy-on-write token.
        if let [one] = parts {
            return Ok((*one).clone());
        }
        let states: Vec<&Tensor> = parts.iter().map(|p| &p.s).collect();
        Ok(RetentionState {
            s: Tensor::cat(&states, 0)?,
            own: None,
        })
    }

    /// The rows `rows`, in that order.
    pub(crate) fn select(&self, rows: &[usize]) -> Result<Self> {
        let index = Tensor::new(
            rows.iter()
                .map(|&r| r as u32)
                .collect::<Vec<_>>()
                .as_slice(),
            self.s.device(),
        )?;
        Ok(RetentionState {
            s: self.s.index_select(&index, 0)?,
            own: None,
        })
    }

    /// A state read back from a file, checked against `(batch, H, d, d)`.
    pub(crate) fn restore(
        s: &Tensor,
        (batch, n_heads, head_dim): (usize, usize, usize),
        device: &Device,
    ) -> Result<Self> {
        if s.dims() != [batch, n_heads, head_dim, head_dim] {
            return Err(Error::Input(format!(
                "retention state of shape {:?}, expected ({batch}, {n_heads}, {head_dim}, {head_dim})",
                s.dims()
            )));
        }
        Ok(RetentionState {
            s: s.to_dtype(DType::F32)?.to_device(device)?,
            own: None,
        })
    }
}

impl GatedRetention {
    /// The layer of `qkvg_gt` (fused `q, k, v, g, gt`) and `out`, with `n_heads` heads of
    /// size `head_dim`.
    pub(crate) fn load(
        w: &Weights,
        (qkvg_gt, out): (&LinearSpec, &LinearSpec),
        (n_heads, head_dim): (usize, usize),
        eps: f64,
    ) -> Result<Self> {
        Ok(GatedRetention {
            qkvg_gt: Linear::load(w, qkvg_gt)?,
            out_proj: Linear::load(w, out)?,
            n_heads,
            head_dim,
            head_norm: RmsNorm::without_weight(head_dim, eps, DType::F32, w.device())?,
            native: w.native_kernels,
        })
    }

    /// Mixes a chunk `x: (B, C, dim)` (already normalised) and advances `state`.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        state: &mut RetentionState,
        consts: &Constants,
    ) -> Result<Tensor> {
        let c = x.dim(1)?;
        let (h, d) = (self.n_heads, self.head_dim);
        // Pieces of the fused projection: q, k, v, g, gt.
        let p = self.qkvg_gt.project(x)?;
        let q = p.heads(0, h, Some(rope), None)?;
        let k = p.heads(1, h, Some(rope), Some((d as f64).powf(-0.5)))?;
        let v = p.heads(2, h, None, None)?;
        // The log-decays, (B, C, H) gate logits -> (B, H, C), f32: one pass over the fused
        // product where there is one.
        let fused_lg = match p.fused_band(4)? {
            Some((y, col)) => fused::log_decays(y, col, h, GATE_LOGIT_NORMALIZER as f32)?,
            None => None,
        };
        let lg = match fused_lg {
            Some(lg) => lg,
            None => {
                let gt = p
                    .rows(4)?
                    .to_dtype(DType::F32)?
                    .transpose(1, 2)?
                    .contiguous()?;
                (log_sigmoid(&gt)? / GATE_LOGIT_NORMALIZER)?
            }
        };

        let (q, k, v) = (
            q.to_dtype(DType::F32)?,
            k.to_dtype(DType::F32)?,
            v.to_dtype(DType::F32)?,
        );
        let fused = match self.native && c == 1 {
            true => recurrent_step_cpu(&q, &k, &v, &lg, state)?,
            false => None,
        };
        let o = match fused {
            Some(o) => o,
            None => {
                let (o, s) = if c == 1 {
                    recurrent_step(&q, &k, &v, &lg, &state.s)?
                } else {
                    let inputs = (&q, &k, &v, &lg);
                    chunkwise(inputs, &state.s, RETENTION_CHUNK, consts, self.native)?
                };
                state.s = s;
                state.own = None;
                o
            }
        };
        // Per-head norm, heads merged, gated by silu(g): one pass over the fused product's g
        // band where there is one.
        if let Some((gx, col)) = p.fused_band(3)? {
            if let Some(y) = fused::gated_head_norm(&o, gx, col, self.head_norm.eps())? {
                return self.out_proj.forward(&y);
            }
        }
        let o = self.head_norm.forward(&o)?.to_dtype(x.dtype())?;
        self.out_proj
            .forward(&(p.rows(3)?.silu()? * merge_heads(&o)?)?)
    }
}

/// `log(sigmoid(x)) = min(x, 0) - log(1 + exp(-|x|))`, stable for large `|x|`.
pub(crate) fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let neg_abs = x.abs()?.neg()?;
    let softplus = (neg_abs.exp()? + 1.0)?.log()?;
    Ok((x.minimum(0f32)? - softplus)?)
}

/// Parallel form over a whole sequence from a zero state (a reference for the other forms).
/// `q, k, v: (B, H, T, d)` f32 (k already scaled), `lg: (B, H, T)` f32; returns `(B, H, T, d)`.
#[cfg(test)]
pub(crate) fn parallel(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lg: &Tensor,
    consts: &Constants,
) -> Result<Tensor> {
    intra_chunk(q, k, v, &segment_sums(lg, consts)?, consts)
}

/// `S[.., n, m] = sum_{j=m+1..=n} lg_j = G_n - G_m` for `n >= m`, from `lg: (.., C)`:
/// `(.., C, C)`. Summed directly rather than as a difference of cumulative sums: over a long
/// chunk `G` reaches -100 and beyond, where `G_n - G_m` in f32 would lose the digits that matter.
fn segment_sums(lg: &Tensor, consts: &Constants) -> Result<Tensor> {
    let c = lg.dim(D::Minus1)?;
    let rank = lg.rank();
    // X[n, m] = lg_n where n > m, else 0; a cumulative sum down the columns gives S.
    let mask = consts.get(ConstKey::StrictlyLower(c), || {
        let strictly_lower: Vec<f32> = (0..c * c)
            .map(|i| if i / c > i % c { 1.0 } else { 0.0 })
            .collect();
        Ok(Tensor::from_vec(strictly_lower, (c, c), lg.device())?)
    })?;
    let mut shape = lg.dims().to_vec();
    shape.push(c);
    let x = lg
        .unsqueeze(rank)?
        .broadcast_as(shape)?
        .broadcast_mul(&mask)?;
    Ok(x.cumsum(rank - 1)?)
}

/// `exp` of the segment sums with 0 above the diagonal: the decay between every pair of tokens
/// of a chunk, `(.., C, C)` from `lg: (.., C)`.
fn decay_matrix(seg: &Tensor, consts: &Constants) -> Result<Tensor> {
    let c = seg.dim(D::Minus1)?;
    // -inf above the diagonal *before* the exp (there the sum is 0 or meaningless), so those
    // entries are exactly 0.
    let upper = consts.get(ConstKey::UpperNegInf(c), || {
        let data: Vec<f32> = (0..c * c)
            .map(|i| {
                if i % c > i / c {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        Ok(Tensor::from_vec(data, (c, c), seg.device())?)
    })?;
    Ok(seg.broadcast_add(&upper)?.exp()?)
}

/// The decays of `N` chunks `lg: (N, C)` (see [`fused::Decays`]): one CPU pass, or candle ops.
fn decays(lg: &Tensor, consts: &Constants, native: bool) -> Result<fused::Decays> {
    if native {
        if let Some(d) = fused::decays(lg)? {
            return Ok(d);
        }
    }
    let c = lg.dim(1)?;
    let seg = segment_sums(lg, consts)?; // (N, C, C)
    let g = lg.cumsum(1)?; // (N, C): G_i
    Ok(fused::Decays {
        decay: decay_matrix(&seg, consts)?,
        from_start: g.exp()?,
        to_end: seg.narrow(1, c - 1, 1)?.squeeze(1)?.exp()?,
        total: g.narrow(1, c - 1, 1)?.squeeze(1)?.exp()?,
    })
}

/// `sum_{m<=n} exp(S[n, m]) (q_n . k_m) v_m` for the segment sums `seg` of the log-decays.
#[cfg(test)]
fn intra_chunk(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seg: &Tensor,
    consts: &Constants,
) -> Result<Tensor> {
    let scores = (q.matmul(&k.t()?)? * decay_matrix(seg, consts)?)?;
    Ok(scores.matmul(v)?)
}

/// Chunkwise form: processes `T` tokens in chunks of `chunk`, starting from `state: (B, H, d, d)`.
/// Returns the outputs `(B, H, T, d)` and the state after the last token.
///
/// The chunks of equal length are batched: their intra-chunk parts and their contributions to
/// the state are each one batched product, and only the `d x d` state recurrence runs chunk after
/// chunk. `native` allows the fused CPU kernels for the decays and the recurrence.
pub(crate) fn chunkwise(
    (q, k, v, lg): (&Tensor, &Tensor, &Tensor, &Tensor),
    state: &Tensor,
    chunk: usize,
    consts: &Constants,
    native: bool,
) -> Result<(Tensor, Tensor)> {
    let t = q.dim(2)?;
    let chunk = chunk.max(1);
    let (full, tail) = (t / chunk, t % chunk);
    let mut state = state.clone();
    let mut outs = Vec::with_capacity(2);
    // Whole chunks first, then the shorter tail as a group of one.
    for (start, n, c) in [(0, full, chunk), (full * chunk, 1, tail)] {
        if n == 0 || c == 0 {
            continue;
        }
        let part = |x: &Tensor| x.narrow(2, start, n * c);
        let (o, s) = chunk_group(
            (&part(q)?, &part(k)?, &part(v)?, &part(lg)?),
            &state,
            (n, c),
            consts,
            native,
        )?;
        outs.push(o);
        state = s;
    }
    let out = match outs.as_slice() {
        [one] => one.clone(),
        _ => Tensor::cat(&outs, 2)?,
    };
    Ok((out, state))
}

/// `n` consecutive chunks of `c` tokens (`q, k, v: (B, H, n c, d)`, `lg: (B, H, n c)`) from
/// `state`.
fn chunk_group(
    (q, k, v, lg): (&Tensor, &Tensor, &Tensor, &Tensor),
    state: &Tensor,
    (n, c): (usize, usize),
    consts: &Constants,
    native: bool,
) -> Result<(Tensor, Tensor)> {
    let (b, h, _, d) = q.dims4()?;
    let rows = b * h;
    // (B, H, n c, d) -> (B H n, c, d): one matrix per chunk.
    let chunks = |x: &Tensor| -> Result<Tensor> { Ok(x.contiguous()?.reshape((rows * n, c, d))?) };
    let (qc, kc, vc) = (chunks(q)?, chunks(k)?, chunks(v)?);
    let dec = decays(&lg.contiguous()?.reshape((rows * n, c))?, consts, native)?;

    // Inside each chunk: the parallel form, one batched product for all chunks.
    let mm = |a: &Tensor, b: &Tensor| apply_matmul(a, b, native);
    let inner = mm(
        &apply(&mm(&qc, &kc.t()?)?, &dec.decay, Op::Mul, native)?,
        &vc,
    )?;
    // Each chunk's contribution to the state: sum_j exp(G_last - G_j) k_j^T v_j.
    let update =
        mm(&apply_scale_rows(&kc, &dec.to_end, native)?.t()?, &vc)?.reshape((rows, n, d * d))?;
    // The d x d recurrence, chunk after chunk: S = exp(G_last) S_prev + update.
    let total = dec.total.reshape((rows, n))?;
    let state = state.reshape((rows, d * d))?;
    let (before, last) = scan_states(&state, &update, &total, native)?;
    // What each chunk reads from the state before it: (q_i * exp(G_i)) S_prev.
    let outer = mm(
        &apply_scale_rows(&qc, &dec.from_start, native)?,
        &before.reshape((rows * n, d, d))?,
    )?;
    let out = apply(&inner, &outer, Op::Add, native)?.reshape((b, h, n * c, d))?;
    Ok((out, last.reshape((b, h, d, d))?))
}

/// The state before each of `n` chunks and after the last: one CPU pass, or candle ops.
fn scan_states(
    state: &Tensor,
    update: &Tensor,
    total: &Tensor,
    native: bool,
) -> Result<(Tensor, Tensor)> {
    if native {
        if let Some(r) = fused::scan_states(state, update, total)? {
            return Ok(r);
        }
    }
    let n = update.dim(1)?;
    let mut s = state.clone();
    let mut before = Vec::with_capacity(n);
    for i in 0..n {
        before.push(s.clone());
        let g = total.narrow(1, i, 1)?;
        s = (s.broadcast_mul(&g)? + update.narrow(1, i, 1)?.squeeze(1)?)?;
    }
    Ok((Tensor::stack(&before, 1)?, s))
}

/// One token of the recurrent form: `q, k, v: (B, H, 1, d)`, `lg: (B, H, 1)`.
pub(crate) fn recurrent_step(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lg: &Tensor,
    state: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let decay = lg.exp()?.unsqueeze(3)?; // (B, H, 1, 1)
    let kv = k.t()?.matmul(v)?; // (B, H, d, d): outer product k^T v
    let state = (state.broadcast_mul(&decay)? + kv)?;
    let o = q.matmul(&state)?;
    Ok((o, state))
}

/// [`recurrent_step`] on the CPU in one pass over the state: each head's new `S` is written once
/// and `o = q S` is accumulated as it is written. A decode step of a batch otherwise walks every
/// row's `(H, d, d)` state about seven times (scale, outer product, add, product), which
/// dominates the state's cost at large batches. The new state goes over the old one when the
/// state owns its buffer ([`RetentionState::own`]), else into a new buffer, which it then owns.
/// Returns `o`; `None` when the tensors are not f32 on the CPU (the caller falls back).
fn recurrent_step_cpu(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lg: &Tensor,
    state: &mut RetentionState,
) -> Result<Option<Tensor>> {
    use candle_core::Storage;
    let (b, h, d, _) = state.s.dims4()?;
    let all_f32 = [q, k, v, lg, &state.s]
        .iter()
        .all(|t| t.dtype() == DType::F32);
    if !state.s.device().is_cpu() || !all_f32 || q.dims4()? != (b, h, 1, d) {
        return Ok(None);
    }
    let (q, k, v, lg) = (
        q.contiguous()?,
        k.contiguous()?,
        v.contiguous()?,
        lg.contiguous()?,
    );
    let slices = [&q, &k, &v, &lg].map(|t| t.storage_and_layout());
    let mut data: Vec<&[f32]> = Vec::with_capacity(4);
    for (storage, layout) in &slices {
        let Storage::Cpu(cpu) = &**storage else {
            return Ok(None);
        };
        data.push(&cpu.as_slice::<f32>()?[layout.start_offset()..]);
    }
    let [qd, kd, vd, lgd] = data[..] else {
        return Ok(None);
    };
    let step = HeadSteps {
        qkv: (qd, kd, vd),
        lg: lgd,
        d,
        heads: b * h,
        isa: crate::kernels::isa::Isa::active(),
    };
    let device = state.s.device().clone();
    let owned = state
        .own
        .as_mut()
        .is_some_and(|t| Arc::get_mut(t).is_some());
    let mut out = None;
    if owned {
        let op = InPlaceStep {
            step: &step,
            out: std::sync::OnceLock::new(),
        };
        state.s.inplace_op1(&op)?;
        out = op.out.into_inner();
    }
    let out = match out {
        Some(out) => out,
        None => {
            let s = state.s.contiguous()?;
            let (storage, layout) = s.storage_and_layout();
            let Storage::Cpu(cpu) = &*storage else {
                return Ok(None);
            };
            let s_old = &cpu.as_slice::<f32>()?[layout.start_offset()..];
            let (out, s_new) = step.to_new_buffer(s_old);
            drop(storage);
            state.s = Tensor::from_vec(s_new, (b, h, d, d), &device)?;
            state.own = Some(Arc::new(()));
            out
        }
    };
    drop(slices);
    Ok(Some(Tensor::from_vec(out, (b, h, 1, d), &device)?))
}

/// One decode step's inputs for every (row, head) of a retention layer: `q`, `k` and `v` rows
/// of `d`, one log-decay each.
struct HeadSteps<'a> {
    qkv: (&'a [f32], &'a [f32], &'a [f32]),
    lg: &'a [f32],
    d: usize,
    heads: usize,
    isa: crate::kernels::isa::Isa,
}

impl HeadSteps<'_> {
    /// Head `bh`'s `q`, `k` and `v`.
    fn at(&self, bh: usize) -> (&[f32], &[f32], &[f32]) {
        let (q, k, v) = self.qkv;
        let d = self.d;
        (&q[bh * d..][..d], &k[bh * d..][..d], &v[bh * d..][..d])
    }

    /// Steps the states `s` (`heads` of `d * d`) in place; returns `o`.
    fn in_place(&self, s: &mut [f32]) -> Vec<f32> {
        use rayon::prelude::*;
        let d = self.d;
        let mut out = vec![0f32; self.heads * d];
        s.par_chunks_mut(d * d)
            .zip(out.par_chunks_mut(d))
            .enumerate()
            .for_each(|(bh, (s, o))| {
                let state = fused::StateStep::InPlace(s);
                fused::decayed_state_step(self.isa, state, self.lg[bh].exp(), self.at(bh), o);
            });
        out
    }

    /// Steps the states `s_old` (at least `heads` of `d * d`) into a new buffer; returns `o`
    /// and the new states.
    fn to_new_buffer(&self, s_old: &[f32]) -> (Vec<f32>, Vec<f32>) {
        use rayon::prelude::*;
        let d = self.d;
        let mut out = vec![0f32; self.heads * d];
        // The new state is written whole below, so it is not zeroed first: at 16 sequences of
        // bench-160m that was 75 MB of stores (and fresh pages) per step for nothing.
        let mut s_new = Box::<[f32]>::new_uninit_slice(self.heads * d * d);
        s_new
            .par_chunks_mut(d * d)
            .zip(out.par_chunks_mut(d))
            .enumerate()
            .for_each(|(bh, (s_new, o))| {
                let state = fused::StateStep::Into(&s_old[bh * d * d..][..d * d], s_new);
                fused::decayed_state_step(self.isa, state, self.lg[bh].exp(), self.at(bh), o);
            });
        // SAFETY: the chunks of `d * d` cover `s_new` exactly (its length is `heads` of them),
        // and `decayed_state_step` writes every element of a chunk given `d * d` old values and
        // `d` of each of q, k and v.
        let s_new = unsafe { s_new.assume_init() }.into_vec();
        (out, s_new)
    }
}

/// [`HeadSteps::in_place`] as candle's in-place operation on the state's own storage; `out`
/// receives `o`, and stays empty when the storage is not what it expects (nothing written).
struct InPlaceStep<'a> {
    step: &'a HeadSteps<'a>,
    out: std::sync::OnceLock<Vec<f32>>,
}

impl candle_core::InplaceOp1 for InPlaceStep<'_> {
    fn name(&self) -> &'static str {
        "retention-step-in-place"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let n = self.step.heads * self.step.d * self.step.d;
        let candle_core::CpuStorage::F32(data) = storage else {
            return Ok(());
        };
        let start = layout.start_offset();
        if !layout.is_contiguous() || layout.shape().elem_count() != n {
            return Ok(());
        }
        if let Some(s) = data.get_mut(start..start + n) {
            // Set once, here: the caller reads it after this call.
            let _ = self.out.set(self.step.in_place(s));
        }
        Ok(())
    }
}

/// Recurrent form over a whole sequence, token by token (the reference for the other two).
#[cfg(test)]
pub(crate) fn recurrent(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lg: &Tensor,
    state: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let t = q.dim(2)?;
    let mut state = state.clone();
    let mut outs = Vec::with_capacity(t);
    for i in 0..t {
        let (o, s) = recurrent_step(
            &q.narrow(2, i, 1)?.contiguous()?,
            &k.narrow(2, i, 1)?.contiguous()?,
            &v.narrow(2, i, 1)?.contiguous()?,
            &lg.narrow(2, i, 1)?.contiguous()?,
            &state,
        )?;
        outs.push(o);
        state = s;
    }
    Ok((Tensor::cat(&outs, 2)?, state))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f32>())
            .unwrap_or(f32::INFINITY)
    }

    /// Normal samples from a seeded generator (candle's CPU RNG cannot be seeded): the same
    /// inputs on every run.
    fn normal(rng: &mut crate::kernels::TestRng, shape: &[usize], std: f32) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| {
                let (u1, u2) = (rng.next_f32().max(1e-7), rng.next_f32());
                std * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
            })
            .collect();
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
    }

    fn inputs(b: usize, h: usize, t: usize, d: usize) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
        let rng = &mut crate::kernels::TestRng::new((b * 1000 + h * 100 + t + d) as u64);
        let q = normal(rng, &[b, h, t, d], 1.0)?;
        let k = (normal(rng, &[b, h, t, d], 1.0)? * (d as f64).powf(-0.5))?;
        let v = normal(rng, &[b, h, t, d], 1.0)?;
        // Gate logits spread over [-8, 8] so that decays range from ~0.6 to ~1.
        let gt = normal(rng, &[b, h, t], 4.0)?.clamp(-8f32, 8f32)?;
        let lg = (log_sigmoid(&gt)? / GATE_LOGIT_NORMALIZER)?;
        Ok((q, k, v, lg))
    }

    #[test]
    fn log_sigmoid_matches_the_definition_and_is_finite_far_out() -> Result<()> {
        let x = Tensor::new(&[-100f32, -3.0, 0.0, 2.5, 100.0], &Device::Cpu)?;
        let got: Vec<f32> = log_sigmoid(&x)?.to_vec1()?;
        for (xi, yi) in [-100f64, -3.0, 0.0, 2.5, 100.0].iter().zip(got) {
            let want = -(1.0 + (-xi).exp()).ln();
            assert!(
                (want - yi as f64).abs() < 1e-5 * want.abs().max(1.0),
                "{xi}: {yi} vs {want}"
            );
        }
        Ok(())
    }

    #[test]
    fn three_forms_agree_for_all_chunk_sizes() -> Result<()> {
        let (b, h, t, d) = (2, 3, 300, 8);
        let (q, k, v, lg) = inputs(b, h, t, d)?;
        let zero = Tensor::zeros((b, h, d, d), DType::F32, &Device::Cpu)?;
        let consts = Constants::default();
        let par = parallel(&q, &k, &v, &lg, &consts)?;
        let (rec, rec_state) = recurrent(&q, &k, &v, &lg, &zero)?;
        assert!(
            max_diff(&par, &rec) <= 1e-5,
            "parallel vs recurrent {}",
            max_diff(&par, &rec)
        );
        // Both the fused CPU kernels and the portable ops, every chunk size.
        for native in [true, false] {
            for chunk in [1, 7, 64, 256] {
                let (out, state) = chunkwise((&q, &k, &v, &lg), &zero, chunk, &consts, native)?;
                assert!(
                    max_diff(&out, &rec) <= 1e-5,
                    "chunk {chunk} native {native}: {}",
                    max_diff(&out, &rec)
                );
                assert!(
                    max_diff(&state, &rec_state) <= 1e-5,
                    "chunk {chunk} native {native} state"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn the_fused_cpu_step_equals_the_tensor_step() -> Result<()> {
        let (b, h, t, d) = (3, 2, 20, 8);
        let (q, k, v, lg) = inputs(b, h, t, d)?;
        let mut a = Tensor::zeros((b, h, d, d), DType::F32, &Device::Cpu)?;
        // The first step writes a new buffer, the others over it.
        let mut f = RetentionState::new(b, h, d, &Device::Cpu)?;
        for i in 0..t {
            let at = |x: &Tensor| x.narrow(2, i, 1);
            let (oa, sa) = recurrent_step(&at(&q)?, &at(&k)?, &at(&v)?, &at(&lg)?, &a)?;
            let fused = recurrent_step_cpu(&at(&q)?, &at(&k)?, &at(&v)?, &at(&lg)?, &mut f)?;
            // f32 on the CPU always takes the kernel.
            let of = fused.ok_or_else(|| Error::Input("the kernel declined".into()))?;
            let sf = f.s.copy()?;
            assert!(
                max_diff(&oa, &of) <= 1e-5,
                "step {i}: {}",
                max_diff(&oa, &of)
            );
            // The state is the same sums, term by term.
            assert!(
                max_diff(&sa, &sf) <= 1e-6,
                "step {i}: {}",
                max_diff(&sa, &sf)
            );
            a = sa;
        }
        Ok(())
    }

    /// A clone of a state that is stepped in place keeps its values (the step copies first),
    /// and the two go on from the same point to the same bits.
    #[test]
    fn a_clone_of_a_state_stepped_in_place_is_left_alone() -> Result<()> {
        let (b, h, t, d) = (2, 2, 6, 8);
        let (q, k, v, lg) = inputs(b, h, t, d)?;
        let at = |x: &Tensor, i: usize| x.narrow(2, i, 1);
        let step = |s: &mut RetentionState, i: usize| -> Result<Tensor> {
            recurrent_step_cpu(&at(&q, i)?, &at(&k, i)?, &at(&v, i)?, &at(&lg, i)?, s)?
                .ok_or_else(|| Error::Input("the kernel declined".into()))
        };
        let mut s = RetentionState::new(b, h, d, &Device::Cpu)?;
        for i in 0..3 {
            step(&mut s, i)?;
        }
        let mut snapshot = s.clone();
        let kept = snapshot.s.flatten_all()?.to_vec1::<f32>()?;
        for i in 3..t {
            step(&mut s, i)?;
        }
        assert_eq!(snapshot.s.flatten_all()?.to_vec1::<f32>()?, kept);
        for i in 3..t {
            step(&mut snapshot, i)?;
        }
        let bits = |x: &RetentionState| -> Result<Vec<u32>> {
            let v = x.s.flatten_all()?.to_vec1::<f32>()?;
            Ok(v.iter().map(|x| x.to_bits()).collect())
        };
        assert_eq!(bits(&snapshot)?, bits(&s)?);
        // A batch of one shares the state's buffer (candle's `cat` of one tensor): stepping
        // the state must leave the batch alone too.
        let batch = RetentionState::stack(&[&s])?;
        let kept = bits(&batch)?;
        step(&mut s, 0)?;
        assert_eq!(bits(&batch)?, kept);
        Ok(())
    }

    #[test]
    fn chunkwise_continues_from_a_nonzero_state() -> Result<()> {
        let (q, k, v, lg) = inputs(1, 2, 50, 4)?;
        let consts = Constants::default();
        let zero = Tensor::zeros((1, 2, 4, 4), DType::F32, &Device::Cpu)?;
        let (_, mid) = chunkwise(
            (
                &q.narrow(2, 0, 20)?,
                &k.narrow(2, 0, 20)?,
                &v.narrow(2, 0, 20)?,
                &lg.narrow(2, 0, 20)?,
            ),
            &zero,
            256,
            &consts,
            true,
        )?;
        let (tail, _) = chunkwise(
            (
                &q.narrow(2, 20, 30)?,
                &k.narrow(2, 20, 30)?,
                &v.narrow(2, 20, 30)?,
                &lg.narrow(2, 20, 30)?,
            ),
            &mid,
            9,
            &consts,
            false,
        )?;
        let (all, _) = recurrent(&q, &k, &v, &lg, &zero)?;
        assert!(max_diff(&tail, &all.narrow(2, 20, 30)?) <= 1e-5);
        Ok(())
    }

    #[test]
    fn a_saved_retention_state_loads_back_exactly_and_only_in_its_shape() -> Result<()> {
        let s = normal(&mut crate::kernels::TestRng::new(9), &[2, 3, 5, 5], 1.0)?;
        let state = RetentionState {
            s: s.clone(),
            own: None,
        };
        let back = RetentionState::restore(&state.s, (2, 3, 5), &Device::Cpu)?;
        assert_eq!(max_diff(&back.s, &s), 0.0);
        assert!(RetentionState::restore(&state.s, (2, 3, 4), &Device::Cpu).is_err());
        // Rows can be taken apart and put back together.
        let rows = [state.select(&[1])?, state.select(&[0])?];
        let swapped = RetentionState::stack(&[&rows[1], &rows[0]])?;
        assert_eq!(max_diff(&swapped.s, &s), 0.0);
        Ok(())
    }
}
