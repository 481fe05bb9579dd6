//! The CPU decode kernel of quantized projections: a few input rows times weights held in
//! candle's GGML block formats.
//!
//! Decode is bound by reading the weights, so it runs as [`super::gemv::gemv_cpu`] does for
//! f32: rayon threads take bands of output features and stream their weight rows once. A weight
//! row is a run of blocks (a scale and 32 or 256 small integers); the input is quantized once per
//! call to the block format's dot-product partner (`Q8_0` for the 32-blocks, `Q8_K` for the
//! K-quants), and each block's integer dot product is scaled and summed in f32, as candle and
//! llama.cpp do.
//!
//! **Interleaved rows.** Where the CPU has AVX2, FMA and F16C, a model's Q8_0, Q4_0 and Q4_K
//! weights are held with each eight rows interleaved ([`QWeight`], [`interleave`]): block by
//! block, the eight rows' scales, then each four bytes of the eight rows side by side (the same
//! bytes, moved once at load; the last group padded with rows of zeros). One input row then
//! dots a group's eight rows, one per 32-bit lane, with one load and one `vpdpbusd` per four
//! bytes (AVX-512 VNNI or AVX-VNNI; with AVX2 alone `maddubs` and `madd`), where candle's layout
//! puts one row's block in a register and needs the eight rows transposed (24 shuffles a block)
//! or each row's lanes summed across: on a 2-core AMD EPYC (30-50 GB/s) one row read Q8_0
//! weights at 20-24 GB/s that way and reads them at 28-31 GB/s interleaved, Q4_0 17.5 -> 26-29,
//! Q4_K 22 -> 23-29 (from the cache 27 -> 44-51).
//!
//! * Q8_0 and Q4_0 ([`x86`]'s `group_rows`): Q4_0's four bytes hold two runs of four weights,
//!   the low and the high nibbles, stored as `w + 8` (the unsigned operand as they are, each
//!   block's lanes starting from -8 times its input bytes' sum); Q8_0's weights are biased to
//!   `w + 128` (its lanes starting from -128 times the sum).
//! * Q4_K (`q4k_group`): the 12 bytes of packed 6-bit scales and mins are interleaved too, so
//!   that a dozen vector operations unpack eight rows' at once; each sub-block's exact sum is
//!   multiplied by its rows' scales in one `vpmulld`, the mins by the input's sub-block sums in
//!   `madd` pairs.
//!
//! Every form sums each block's products exactly into one i32 per (input row, weight row),
//! converts it and adds it by one multiply-add with the product of the scales (Q4_K: two, `d`
//! and `-dmin`), block after block: a row gets the same bits alone, in any batch and on every
//! instruction set. candle's order (eight f32 lanes a block and row, summed at the end) differs
//! from it by float rounding; the tests hold every form to the definition, bit for bit.
//!
//! Batches of Q4_0 and Q4_K take the same forms a few input rows at a time, each group in the
//! nearest cache meanwhile; batches of Q8_0 put their input rows in the lanes (8 or 16 to a
//! register with `vpdpbusd`, `q8x8_lanes16`; with AVX2 alone as i16 pairs, `q8x8_lanes_avx2`).
//! Prompt chunks of interleaved weights take the kernel too where the CPU has `vpdpbusd`
//! ([`prefill_product_cpu`]); other weights are dequantized into a reused buffer and take the
//! float gemm.
//!
//! Rows in candle's layout (other formats, other devices, [`crate::Kernels::Portable`]) take
//! candle's dot products (`GgmlType::vec_dot_4`). Which instructions run is decided by
//! [`super::isa::Isa`]: the CPU's best unless `YOCO_CPU_ISA` lowers it.

use std::sync::Arc;

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8_0, GgmlType,
};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

use super::gemv::{slice, GEMV_MAX_ROWS};
use super::isa::Isa;
use crate::Result;

/// A quantized weight `(n, k)` as the CPU kernels read it. Either candle's tensor (its blocks
/// row after row, on any device), or, for Q8_0 and Q4_0 on a CPU with AVX2, the same blocks with
/// eight rows interleaved ([`QWeight::prepared`]): a decode step's one input row then dots eight
/// weight rows per instruction with no shuffles, where candle's order puts one row's block in a
/// register and asks for eight lane sums to be gathered per block (on a 2-core AMD EPYC that
/// read Q8_0 weights at 20 GB/s of 30-50 and Q4_0 at 18; interleaved rows stream at 29). The
/// interleaved bytes are the same bytes, moved: nothing is held twice.
#[derive(Debug)]
pub(crate) enum QWeight {
    /// candle's blocks, as loaded.
    Blocks(Arc<QTensor>),
    /// Q8_0, Q4_0 or Q4_K rows interleaved in groups of eight ([`interleave`]); on the CPU.
    Interleaved {
        /// Q8_0, Q4_0 or Q4_K.
        format: GgmlDType,
        /// Rows (the bytes hold them padded to a multiple of eight).
        n: usize,
        /// Columns (a multiple of 32).
        k: usize,
        bytes: Vec<u8>,
    },
}

impl QWeight {
    /// `q` as the kernels of `isa` read it best: Q8_0, Q4_0 and Q4_K on the CPU with AVX2
    /// interleaved (the rows padded to a multiple of eight); anything else as it is.
    pub(crate) fn prepared(q: Arc<QTensor>, isa: Isa) -> Result<QWeight> {
        let (n, k) = q.shape().dims2()?;
        let format = q.dtype();
        let interleaves = layout(format).is_some_and(|l| k.is_multiple_of(l.weights))
            && q.device().is_cpu()
            && n > 0;
        #[cfg(target_arch = "x86_64")]
        if interleaves && x86::interleaves(isa) {
            if let Some(bytes) = interleave(format, &q.data()?, n, k) {
                return Ok(QWeight::Interleaved {
                    format,
                    n,
                    k,
                    bytes,
                });
            }
        }
        let _ = (interleaves, isa);
        Ok(QWeight::Blocks(q))
    }

    /// `(n, k)`.
    pub(crate) fn dims(&self) -> Result<(usize, usize)> {
        match self {
            QWeight::Blocks(q) => Ok(q.shape().dims2()?),
            QWeight::Interleaved { n, k, .. } => Ok((*n, *k)),
        }
    }

    /// The block format.
    pub(crate) fn dtype(&self) -> GgmlDType {
        match self {
            QWeight::Blocks(q) => q.dtype(),
            QWeight::Interleaved { format, .. } => *format,
        }
    }

    /// Whether the blocks are in the CPU's memory.
    pub(crate) fn is_cpu(&self) -> bool {
        match self {
            QWeight::Blocks(q) => q.device().is_cpu(),
            QWeight::Interleaved { .. } => true,
        }
    }

    /// candle's tensor, where the blocks are still in its layout (candle's own ops need it).
    pub(crate) fn tensor(&self) -> Option<&Arc<QTensor>> {
        match self {
            QWeight::Blocks(q) => Some(q),
            QWeight::Interleaved { .. } => None,
        }
    }

    /// The bytes, in this weight's layout (borrowed on the CPU).
    fn bytes(&self) -> Result<std::borrow::Cow<'_, [u8]>> {
        match self {
            QWeight::Blocks(q) => Ok(q.data()?),
            QWeight::Interleaved { bytes, .. } => Ok(std::borrow::Cow::Borrowed(bytes)),
        }
    }

    /// Whether the rows are interleaved.
    fn interleaved(&self) -> bool {
        matches!(self, QWeight::Interleaved { .. })
    }

    /// The whole weight as f32 `(n, k)` on `device`.
    pub(crate) fn dequantize(&self, device: &Device) -> Result<Tensor> {
        match self {
            QWeight::Blocks(q) if !q.device().is_cpu() => Ok(q.dequantize(device)?),
            _ => Ok(dequantize_cpu(self)?.to_device(device)?),
        }
    }
}

/// Whether prompt chunks of interleaved weights take the decode kernel on `isa` (see
/// [`prefill_product_cpu`]).
fn integer_prompts(isa: Isa) -> bool {
    #[cfg(target_arch = "x86_64")]
    return x86::integer_prompts(isa);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        false
    }
}

/// How a block format is held interleaved ([`interleave`]).
#[derive(Clone, Copy)]
struct Layout {
    /// Weights per block.
    weights: usize,
    /// Bytes of a block (interleaved, a group of eight rows' blocks is eight times this).
    bytes: usize,
}

/// The layout of `format` where it can be interleaved: Q8_0 (an f16 scale, 32 i8), Q4_0 (an
/// f16 scale, 16 bytes of nibbles) and Q4_K (f16 `d` and `dmin`, 12 bytes of packed 6-bit
/// scales and mins, 128 bytes of nibbles).
fn layout(format: GgmlDType) -> Option<Layout> {
    let (weights, bytes) = match format {
        GgmlDType::Q8_0 => (32, 34),
        GgmlDType::Q4_0 => (32, 18),
        GgmlDType::Q4K => (256, 144),
        _ => return None,
    };
    Some(Layout { weights, bytes })
}

/// Bytes of eight Q8_0 blocks interleaved: the eight f16 scales, then for each four bytes `g`
/// of a block the eight rows' bytes `4g..4g + 4` side by side (row `m` at `16 + 32g + 4m`).
const Q8X8_BYTES: usize = 8 * 34;

/// Bytes of eight Q4_0 blocks interleaved as Q8_0's are ([`Q8X8_BYTES`]): the scales, then
/// each four bytes `g` of the eight rows side by side, their low nibbles weights `4g..4g + 4`
/// and their high nibbles weights `16 + 4g..16 + 4g + 4`.
const Q4X8_BYTES: usize = 8 * 18;

/// Bytes of eight Q4_K blocks interleaved: the eight `d` (f16) at 0, the eight `dmin` at 16,
/// then for each four bytes `w` of the 12 of packed scales and mins the eight rows' four side
/// by side at `32 + 32w + 4m`, then for each four bytes `g` of the 128 of nibbles likewise at
/// `128 + 32g + 4m` (low nibbles: sub-block `2(g / 8)`'s weights `4(g % 8)..`, high: sub-block
/// `2(g / 8) + 1`'s).
const Q4KX8_BYTES: usize = 8 * 144;

/// Where row `m`'s block of `format` goes in its group block ([`interleave`]): `(from, to,
/// len)`, bytes `from..from + len` of the block at `to..` of the group block; its scales, then
/// four bytes at a time.
fn placements(format: GgmlDType, m: usize) -> Vec<(usize, usize, usize)> {
    let (block, scales, body) = match format {
        // `d` and `dmin`, then the packed scales and the nibbles from 32 on.
        GgmlDType::Q4K => (144, vec![(0, 2 * m, 2), (2, 16 + 2 * m, 2)], (4, 32)),
        GgmlDType::Q4_0 => (18, vec![(0, 2 * m, 2)], (2, 16)),
        _ => (34, vec![(0, 2 * m, 2)], (2, 16)),
    };
    let (from, to) = body;
    let fours = (0..(block - from) / 4).map(|g| (from + 4 * g, to + 32 * g + 4 * m, 4));
    scales.into_iter().chain(fours).collect()
}

/// candle's blocks of `format` (Q8_0, Q4_0 or Q4_K, [`layout`]) of `(n, k)` with each eight
/// rows interleaved, block by block: group `G`'s block `b` is the eight rows' blocks at
/// `(G kb + b) 8 held` bytes, their scales first, then for each four bytes `g` of their weights
/// the eight rows' four side by side (row `m` at `16 + 32g + 4m` for Q8_0 and Q4_0; Q4_K:
/// [`Q4KX8_BYTES`]). The last group is padded with rows of zeros (scales of zero: products of
/// zero, never read back). `None` if the bytes are not `n` rows of `k / weights` blocks.
fn interleave(format: GgmlDType, bytes: &[u8], n: usize, k: usize) -> Option<Vec<u8>> {
    let l = layout(format)?;
    let kb = k / l.weights;
    if !k.is_multiple_of(l.weights) || bytes.len() != n * kb * l.bytes {
        return None;
    }
    let mut out = vec![0u8; n.next_multiple_of(8) * kb * l.bytes];
    out.par_chunks_mut(kb * 8 * l.bytes)
        .zip(bytes.par_chunks(8 * kb * l.bytes))
        .for_each(|(group, rows)| {
            for (m, row) in rows.chunks_exact(kb * l.bytes).enumerate() {
                let places = placements(format, m);
                for (b, block) in row.chunks_exact(l.bytes).enumerate() {
                    let at = b * 8 * l.bytes;
                    for &(from, to, len) in &places {
                        group[at + to..at + to + len].copy_from_slice(&block[from..from + len]);
                    }
                }
            }
        });
    Some(out)
}

/// Rows `first..first + rows` of interleaved blocks of `format` ([`interleave`], rows of `kb`
/// blocks) in candle's layout, into `out` (`rows kb` blocks). False if they are not there.
fn deinterleave(format: GgmlDType, bytes: &[u8], kb: usize, first: usize, out: &mut [u8]) -> bool {
    let Some(l) = layout(format) else {
        return false;
    };
    let rows = out.len() / (kb * l.bytes).max(1);
    if kb == 0
        || out.len() != rows * kb * l.bytes
        || (first + rows).div_ceil(8) * 8 * kb * l.bytes > bytes.len()
    {
        return false;
    }
    for (r, row) in out.chunks_exact_mut(kb * l.bytes).enumerate() {
        let (group, m) = ((first + r) / 8, (first + r) % 8);
        let base = group * kb * 8 * l.bytes;
        let places = placements(format, m);
        for (b, one) in row.chunks_exact_mut(l.bytes).enumerate() {
            let at = base + b * 8 * l.bytes;
            for &(from, to, len) in &places {
                one[from..from + len].copy_from_slice(&bytes[at + to..at + to + len]);
            }
        }
    }
    true
}

/// At most this many rows of a prompt chunk take the quantized decode kernel here. The kernel
/// quantizes its input to 8 bits (as every decode step does); larger chunks take
/// [`prefill_product_cpu`] (which sends interleaved Q8_0 weights back to the kernel).
const PROMPT_MAX_ROWS: usize = 8;

/// `x W^T` on CPU for f32 `x: (..., k)` and quantized CPU pieces `W_i: (n_i, k)`, fused: the
/// output is `(..., sum n_i)`, pieces in order. Each thread takes bands of output features (never
/// across a piece) and streams their weight rows once. Takes a decode step of up to
/// [`GEMV_MAX_ROWS`] sequences (`x: (B, 1, k)`) and other inputs of up to [`PROMPT_MAX_ROWS`]
/// rows. `None` when the case is not this one (device, dtype, rows, a format without a kernel).
pub(crate) fn qgemv_cpu(x: &Tensor, pieces: &[Arc<QWeight>]) -> Result<Option<Tensor>> {
    let dims = x.dims();
    let rows = dims
        .split_last()
        .map_or(0, |(_, lead)| lead.iter().product());
    let one_per_sequence = dims.len() >= 3 && dims[dims.len() - 2] == 1;
    let most = if one_per_sequence {
        GEMV_MAX_ROWS
    } else {
        PROMPT_MAX_ROWS
    };
    if rows > most {
        return Ok(None);
    }
    qgemv_with(Isa::active(), x, pieces)
}

/// [`qgemv_cpu`] on the instruction set `isa`, for any number of rows (tests run every set the
/// CPU has).
fn qgemv_with(isa: Isa, x: &Tensor, pieces: &[Arc<QWeight>]) -> Result<Option<Tensor>> {
    if !matches!(x.device(), Device::Cpu)
        || x.dtype() != DType::F32
        || pieces.iter().any(|q| !q.is_cpu())
    {
        return Ok(None);
    }
    let dims = x.dims();
    let Some((&k, lead)) = dims.split_last() else {
        return Ok(None);
    };
    let rows: usize = lead.iter().product();
    if rows == 0 || k == 0 {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let (xs, xl) = x.storage_and_layout();
    let Storage::Cpu(xs) = &*xs else {
        return Ok(None);
    };
    let xd = slice(xs.as_slice::<f32>()?, xl.start_offset(), rows * k)?;
    let Some(out) = qgemv_rows(isa, xd, rows, k, pieces)? else {
        return Ok(None);
    };
    let mut out_dims = lead.to_vec();
    out_dims.push(out.len() / rows);
    Ok(Some(Tensor::from_vec(out, out_dims, x.device())?))
}

/// [`qgemv_with`] on `rows` contiguous rows `xd` of `k`: `(rows, sum n_i)`, row after row.
fn qgemv_rows(
    isa: Isa,
    xd: &[f32],
    rows: usize,
    k: usize,
    pieces: &[Arc<QWeight>],
) -> Result<Option<Vec<f32>>> {
    if rows == 0 || k == 0 || xd.len() != rows * k {
        return Ok(None);
    }
    let mut widths = Vec::with_capacity(pieces.len());
    for q in pieces {
        let (n, qk) = q.dims()?;
        if qk != k || n == 0 || !q.is_cpu() {
            return Ok(None);
        }
        widths.push(n);
    }
    // Borrowed views of the blocks (no copy on the CPU), alive across the parallel region.
    let data = pieces
        .iter()
        .map(|q| q.bytes())
        .collect::<Result<Vec<_>>>()?;
    let mut kernels: Vec<Box<dyn BandKernel + '_>> = Vec::with_capacity(pieces.len());
    for ((q, bytes), &n) in pieces.iter().zip(&data).zip(&widths) {
        match band_kernel(isa, q.dtype(), q.interleaved(), bytes, n, k, xd, rows) {
            Some(kernel) => kernels.push(kernel),
            None => return Ok(None),
        }
    }

    let total: usize = widths.iter().sum();
    // Bands as in `gemv_cpu` (a few per thread, never tiny), counted in weights rather than
    // bytes, and a multiple of the eight weight rows the kernels take at a time (and that a
    // group of interleaved rows holds).
    let threads = rayon::current_num_threads().max(1);
    let band = total
        .div_ceil(threads * 4)
        .max(16384 / k)
        .max(1)
        .next_multiple_of(8);
    // (kernel, first weight row, rows of it): the pieces' bands, in output column order.
    let mut spans: Vec<(&dyn BandKernel, usize, usize)> = Vec::new();
    for (kernel, &n) in kernels.iter().zip(&widths) {
        for first in (0..n).step_by(band) {
            spans.push((kernel.as_ref(), first, band.min(n - first)));
        }
    }
    let mut out = vec![0f32; total * rows];
    if rows == 1 {
        let mut rest: &mut [f32] = &mut out;
        let mut tasks = Vec::with_capacity(spans.len());
        for &(kernel, first, len) in &spans {
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut(len);
            tasks.push((kernel, first, mine));
            rest = tail;
        }
        tasks
            .into_par_iter()
            .for_each(|(kernel, first, out)| kernel.run(first, out));
    } else {
        // Each band's columns of every output row: a band fills its feature-major buffer (in
        // its core's cache) and puts it in place itself. One thread reordering the whole
        // product afterwards, a scattered store per value, took 3% of a 16-row decode step.
        let mut segments: Vec<Vec<&mut [f32]>> =
            spans.iter().map(|_| Vec::with_capacity(rows)).collect();
        for row in out.chunks_mut(total) {
            let mut rest = row;
            for (segs, &(_, _, len)) in segments.iter_mut().zip(&spans) {
                let (seg, tail) = std::mem::take(&mut rest).split_at_mut(len);
                segs.push(seg);
                rest = tail;
            }
        }
        spans
            .into_par_iter()
            .zip(segments)
            .for_each(|((kernel, first, len), mut segs)| {
                let mut by_feature = vec![0f32; len * rows];
                kernel.run(first, &mut by_feature);
                for (r, seg) in segs.iter_mut().enumerate() {
                    for (j, y) in seg.iter_mut().enumerate() {
                        *y = by_feature[j * rows + r];
                    }
                }
            });
    }
    drop(kernels);
    drop(data);
    Ok(Some(out))
}

/// A quantized CPU weight `(n, k)` as f32, its rows dequantized in parallel. candle's
/// `QTensor::dequantize` runs on one thread.
pub(crate) fn dequantize_cpu(q: &QWeight) -> Result<Tensor> {
    let (n, k) = q.dims()?;
    let mut out = vec![0f32; n * k];
    if dequantize_into(
        Isa::active(),
        q.dtype(),
        q.interleaved(),
        &q.bytes()?,
        n,
        k,
        &mut out,
    ) {
        return Ok(Tensor::from_vec(out, (n, k), &Device::Cpu)?);
    }
    match q.tensor() {
        Some(q) => Ok(q.dequantize(&Device::Cpu)?),
        None => Err(crate::Error::Input(
            "an interleaved weight of another shape".into(),
        )),
    }
}

/// Largest weight (in floats) whose f32 rows a thread keeps for [`prefill_product_cpu`]: 256 MB,
/// the widest projection of the models served (Phi-4-mini-flash's fused `fc1`, 210 MB). A wider
/// weight (an output head multiplied by every position of a scored text) takes a fresh buffer.
const SCRATCH_MAX_FLOATS: usize = 64 << 20;

thread_local! {
    /// The f32 rows of the last weight [`prefill_product_cpu`] dequantized on this thread: reused
    /// by the next, so that its pages are not faulted in and zeroed anew for every projection of
    /// every prompt chunk (that cost as much as the dequantization itself).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `x W^T` for a prompt chunk on the CPU: f32 `x: (m, k)` (contiguous rows) times the quantized
/// CPU pieces `W_i: (n_i, k)` of a fused weight, as `(m, sum n_i)` f32, pieces in order.
///
/// Interleaved pieces ([`QWeight::prepared`]) take the decode kernel where the CPU has
/// `vpdpbusd`: integer products of four bytes per lane and instruction, where the float gemm
/// does one multiply-add per lane. Q8_0 puts the chunk's rows in the lanes (2.7x the dequantized
/// gemm's speed at 512 rows of 2560 x 10240, AMD EPYC with AVX-512 VNNI); Q4_0 takes its rows
/// form a few rows at a time. Each row gets the bits a decode step gives it (its input
/// quantized to 8 bits per block).
///
/// Other pieces are dequantized in parallel, one after another, into this thread's reused
/// buffer, then multiplied by the float gemm candle's matmul runs (with the same arguments, so
/// the same bits as dequantizing, concatenating and calling `matmul`): hundreds of rows reuse
/// every weight, which the float gemm does at f32's speed. `None` for a format this does not
/// read.
pub(crate) fn prefill_product_cpu(
    x: &[f32],
    m: usize,
    pieces: &[Arc<QWeight>],
) -> Result<Option<Vec<f32>>> {
    let mut shapes = Vec::with_capacity(pieces.len());
    for q in pieces {
        shapes.push(q.dims()?);
    }
    let Some(&(_, k)) = shapes.first() else {
        return Ok(None);
    };
    if shapes.iter().any(|&(_, qk)| qk != k) {
        return Ok(None);
    }
    let n: usize = shapes.iter().map(|&(n, _)| n).sum();
    if x.len() != m * k {
        return Err(crate::Error::Input(format!(
            "{} inputs for {m} rows of {k}",
            x.len()
        )));
    }
    // Interleaved rows with `vpdpbusd`: the chunk through the decode kernel (Q8_0 2.7x the
    // dequantized gemm's speed at 512 rows of 2560 x 10240); each row then gets the bits a
    // decode step gives it.
    if pieces.iter().all(|q| q.interleaved()) && integer_prompts(Isa::active()) {
        return qgemv_rows(Isa::active(), x, m, k, pieces);
    }
    let data = pieces
        .iter()
        .map(|q| q.bytes())
        .collect::<Result<Vec<_>>>()?;
    let multiply = |w: &mut [f32]| -> Result<Option<Vec<f32>>> {
        let mut rest = &mut w[..];
        for ((q, bytes), &(rows, _)) in pieces.iter().zip(&data).zip(&shapes) {
            let (mine, tail) = rest.split_at_mut(rows * k);
            let interleaved = q.interleaved();
            if !dequantize_into(Isa::active(), q.dtype(), interleaved, bytes, rows, k, mine) {
                return Ok(None);
            }
            rest = tail;
        }
        let mut y = vec![0f32; m * n];
        let threads = rayon::current_num_threads();
        let parallelism = match threads {
            0 | 1 => gemm::Parallelism::None,
            t => gemm::Parallelism::Rayon(t),
        };
        // SAFETY: `y` is `m x n` (row stride n), `x` is `m x k` (row stride k) and `w` holds
        // `n x k` floats, read as the `k x n` matrix `W^T` (column stride k); every index the
        // gemm touches lies inside these slices, which outlive the call.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                y.as_mut_ptr(),
                1,
                n as isize,
                false,
                x.as_ptr(),
                1,
                k as isize,
                w.as_ptr(),
                k as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            )
        };
        Ok(Some(y))
    };
    let floats = n * k;
    if floats <= SCRATCH_MAX_FLOATS {
        // A thread that is already inside (a rayon worker that took another chunk's task while
        // waiting) takes a fresh buffer instead.
        let reused = SCRATCH.with(|cell| {
            let mut buf = cell.try_borrow_mut().ok()?;
            if buf.len() < floats {
                buf.resize(floats, 0.0);
            }
            Some(multiply(&mut buf[..floats]))
        });
        if let Some(out) = reused {
            return out;
        }
    }
    multiply(&mut vec![0f32; floats])
}

/// Dequantizes the `(n, k)` blocks `bytes` of `format` (rows `interleaved` as
/// [`interleave`] lays them, or candle's) into `out` (`n * k` floats), rows in parallel;
/// false for a format this does not read. Q8_0, Q4_0 and Q4_K take [`x86`]'s
/// vectorised forms where `isa` allows (candle's `to_float` converts each block's f16 scale
/// through a function call and runs its loops in SSE2: the dequantization was a tenth of a
/// prompt chunk's product), with candle's arithmetic, so the same floats.
fn dequantize_into(
    isa: Isa,
    format: GgmlDType,
    interleaved: bool,
    bytes: &[u8],
    n: usize,
    k: usize,
    out: &mut [f32],
) -> bool {
    if interleaved {
        let Some(l) = layout(format) else {
            return false;
        };
        let kb = k / l.weights;
        if out.len() != n * k
            || !k.is_multiple_of(l.weights)
            || bytes.len() != n.next_multiple_of(8) * kb * l.bytes
        {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        if format == GgmlDType::Q8_0 && x86::dequantizes(isa, format).is_some() && n >= 8 {
            // Bands of 64 rows (whole groups); a last group short of eight rows as below.
            let whole = n / 8 * 8;
            let (groups, rest) = out.split_at_mut(whole * k);
            groups
                .par_chunks_mut(64 * k)
                .zip(bytes.par_chunks(64 * kb * 34))
                // SAFETY: the CPU has AVX2, FMA and F16C (`dequantizes`); each band is whole
                // groups of `kb` interleaved blocks, and its piece of `out` their rows.
                .for_each(|(ys, xs)| unsafe { x86::dequantize_interleaved(xs, kb, ys) });
            let mut blocks = vec![0u8; (n - whole) * kb * l.bytes];
            return rest.is_empty()
                || (deinterleave(format, bytes, kb, whole, &mut blocks)
                    && dequantize_into(isa, format, false, &blocks, n - whole, k, rest));
        }
        // Bands of 64 rows put back in candle's layout, then dequantized.
        return out.par_chunks_mut(64 * k).enumerate().all(|(band, ys)| {
            let mut blocks = vec![0u8; ys.len() / l.weights * l.bytes];
            deinterleave(format, bytes, kb, 64 * band, &mut blocks)
                && dequantize_into(isa, format, false, &blocks, ys.len() / k, k, ys)
        });
    }
    fn rows<T: GgmlType>(bytes: &[u8], n: usize, k: usize, out: &mut [f32]) -> bool {
        let kb = k / T::BLCK_SIZE;
        let Some(weight) =
            blocks::<T>(bytes).filter(|w| k.is_multiple_of(T::BLCK_SIZE) && w.len() == n * kb)
        else {
            return false;
        };
        if out.len() != n * k {
            return false;
        }
        // About 64K weights per task.
        let band = (65536 / k).max(1);
        out.par_chunks_mut(band * k)
            .zip(weight.par_chunks(band * kb))
            .for_each(|(ys, xs)| T::to_float(xs, ys));
        true
    }
    #[cfg(target_arch = "x86_64")]
    if let Some((block_bytes, block)) = x86::dequantizes(isa, format) {
        if !k.is_multiple_of(block) || bytes.len() != n * (k / block) * block_bytes {
            return false;
        }
        if out.len() != n * k {
            return false;
        }
        let band = (65536 / k).max(1);
        out.par_chunks_mut(band * k)
            .zip(bytes.par_chunks(band * (k / block) * block_bytes))
            // SAFETY: `dequantizes` said the CPU has the instructions for this format; each
            // piece of `bytes` is whole blocks and its piece of `out` their floats.
            .for_each(|(ys, xs)| unsafe { x86::dequantize(format, xs, ys) });
        return true;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    match format {
        GgmlDType::Q4_0 => rows::<BlockQ4_0>(bytes, n, k, out),
        GgmlDType::Q4_1 => rows::<BlockQ4_1>(bytes, n, k, out),
        GgmlDType::Q5_0 => rows::<BlockQ5_0>(bytes, n, k, out),
        GgmlDType::Q5_1 => rows::<BlockQ5_1>(bytes, n, k, out),
        GgmlDType::Q8_0 => rows::<BlockQ8_0>(bytes, n, k, out),
        GgmlDType::Q2K => rows::<BlockQ2K>(bytes, n, k, out),
        GgmlDType::Q3K => rows::<BlockQ3K>(bytes, n, k, out),
        GgmlDType::Q4K => rows::<BlockQ4K>(bytes, n, k, out),
        GgmlDType::Q5K => rows::<BlockQ5K>(bytes, n, k, out),
        GgmlDType::Q6K => rows::<BlockQ6K>(bytes, n, k, out),
        _ => false,
    }
}

/// Rows `ids` of a quantized CPU weight `(n, k)` as f32 `(ids.len(), k)`: an embedding read from
/// a quantized table (the tied head of a quantized model), one row dequantized per token.
/// `None` for a format this does not read (the caller keeps a float table); an id beyond `n` is
/// an error.
pub(crate) fn dequantize_rows_cpu(q: &QWeight, ids: &[u32]) -> Result<Option<Tensor>> {
    fn rows<T: GgmlType>(bytes: &[u8], n: usize, k: usize, ids: &[u32]) -> Option<Vec<f32>> {
        let kb = k / T::BLCK_SIZE;
        let weight =
            blocks::<T>(bytes).filter(|w| k.is_multiple_of(T::BLCK_SIZE) && w.len() == n * kb)?;
        let mut out = vec![0f32; ids.len() * k];
        for (y, &id) in out.chunks_mut(k).zip(ids) {
            let start = id as usize * kb;
            T::to_float(weight.get(start..start + kb)?, y);
        }
        Some(out)
    }
    let (n, k) = q.dims()?;
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= n) {
        return Err(crate::Error::Input(format!(
            "token id {bad} is beyond the {n} rows of the embedding"
        )));
    }
    let data = q.bytes()?;
    if q.interleaved() {
        // Each row put back in candle's layout, then candle's `to_float`.
        let format = q.dtype();
        let Some(l) = layout(format) else {
            return Ok(None);
        };
        let kb = k / l.weights;
        let mut out = vec![0f32; ids.len() * k];
        let mut row = vec![0u8; kb * l.bytes];
        for (y, &id) in out.chunks_mut(k).zip(ids) {
            let done = deinterleave(format, &data, kb, id as usize, &mut row)
                && dequantize_into(Isa::active(), format, false, &row, 1, k, y);
            if !done {
                return Ok(None);
            }
        }
        return Ok(Some(Tensor::from_vec(out, (ids.len(), k), &Device::Cpu)?));
    }
    let out = match q.dtype() {
        GgmlDType::Q4_0 => rows::<BlockQ4_0>(&data, n, k, ids),
        GgmlDType::Q4_1 => rows::<BlockQ4_1>(&data, n, k, ids),
        GgmlDType::Q5_0 => rows::<BlockQ5_0>(&data, n, k, ids),
        GgmlDType::Q5_1 => rows::<BlockQ5_1>(&data, n, k, ids),
        GgmlDType::Q8_0 => rows::<BlockQ8_0>(&data, n, k, ids),
        GgmlDType::Q2K => rows::<BlockQ2K>(&data, n, k, ids),
        GgmlDType::Q3K => rows::<BlockQ3K>(&data, n, k, ids),
        GgmlDType::Q4K => rows::<BlockQ4K>(&data, n, k, ids),
        GgmlDType::Q5K => rows::<BlockQ5K>(&data, n, k, ids),
        GgmlDType::Q6K => rows::<BlockQ6K>(&data, n, k, ids),
        _ => None,
    };
    Ok(match out {
        Some(out) => Some(Tensor::from_vec(out, (ids.len(), k), &Device::Cpu)?),
        None => None,
    })
}

/// One quantized piece ready for [`qgemv_cpu`]: its blocks and the input, quantized.
trait BandKernel: Sync {
    /// Fills `out` (feature-major: `rows` values per weight row) for the weight rows from
    /// `first` on.
    fn run(&self, first: usize, out: &mut [f32]);
}

/// The kernel of a piece stored as `bytes` in `format`, `(n, k)` (rows `interleaved` as
/// [`interleave`] lays them, or candle's), with the input `x` (`rows` rows of `k`)
/// quantized for it; `None` for a format without one or blocks that do not fit.
// One argument per fact about the piece; a struct would only be unpacked again.
#[allow(clippy::too_many_arguments)]
fn band_kernel<'a>(
    isa: Isa,
    format: GgmlDType,
    interleaved: bool,
    bytes: &'a [u8],
    n: usize,
    k: usize,
    x: &[f32],
    rows: usize,
) -> Option<Box<dyn BandKernel + 'a>> {
    #[cfg(target_arch = "x86_64")]
    if let Some(kernel) = x86::kernel(isa, format, interleaved, bytes, n, k, x, rows) {
        return Some(Box::new(kernel));
    }
    #[cfg(target_arch = "x86_64")]
    if format == GgmlDType::Q4K {
        if let Some(kernel) = x86::q4k_kernel(isa, interleaved, bytes, n, k, x, rows) {
            return Some(Box::new(kernel));
        }
    }
    if interleaved {
        return None;
    }
    if needs_even_blocks(format, k) {
        return match format {
            GgmlDType::Q4_1 => Dequantized::<BlockQ4_1>::boxed(isa, bytes, n, k, x, rows),
            GgmlDType::Q5_0 => Dequantized::<BlockQ5_0>::boxed(isa, bytes, n, k, x, rows),
            _ => Dequantized::<BlockQ5_1>::boxed(isa, bytes, n, k, x, rows),
        };
    }
    match format {
        GgmlDType::Q4_0 => Blocks::<BlockQ4_0>::boxed(bytes, n, k, x, rows),
        GgmlDType::Q4_1 => Blocks::<BlockQ4_1>::boxed(bytes, n, k, x, rows),
        GgmlDType::Q5_0 => Blocks::<BlockQ5_0>::boxed(bytes, n, k, x, rows),
        GgmlDType::Q5_1 => Blocks::<BlockQ5_1>::boxed(bytes, n, k, x, rows),
        GgmlDType::Q8_0 => Blocks::<BlockQ8_0>::boxed(bytes, n, k, x, rows),
        GgmlDType::Q2K => Blocks::<BlockQ2K>::boxed(bytes, n, k, x, rows),
        GgmlDType::Q3K => Blocks::<BlockQ3K>::boxed(bytes, n, k, x, rows),
        GgmlDType::Q4K => Blocks::<BlockQ4K>::boxed(bytes, n, k, x, rows),
        GgmlDType::Q5K => Blocks::<BlockQ5K>::boxed(bytes, n, k, x, rows),
        GgmlDType::Q6K => Blocks::<BlockQ6K>::boxed(bytes, n, k, x, rows),
        _ => None,
    }
}

/// Whether candle's dot product for this format would refuse rows of width `k`: for Q4_1, Q5_0
/// and Q5_1 it asserts (in builds with debug assertions) an even number of blocks per row, which
/// GGML's SIMD loops need and candle's portable code does not. Such rows are dequantized and
/// multiplied in f32 instead (here and in the many-row path).
pub(crate) fn needs_even_blocks(format: GgmlDType, k: usize) -> bool {
    matches!(format, GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1)
        && !(k / format.block_size()).is_multiple_of(2)
}

/// Weights dequantized a row at a time and dotted with the float input (for the rows
/// [`needs_even_blocks`] keeps from candle's dot products).
struct Dequantized<'a, T: GgmlType> {
    isa: Isa,
    weight: &'a [T],
    input: Vec<f32>,
    k: usize,
    rows: usize,
}

impl<'a, T: GgmlType + 'a> Dequantized<'a, T> {
    fn boxed(
        isa: Isa,
        bytes: &'a [u8],
        n: usize,
        k: usize,
        x: &[f32],
        rows: usize,
    ) -> Option<Box<dyn BandKernel + 'a>> {
        if !k.is_multiple_of(T::BLCK_SIZE) || x.len() != rows * k {
            return None;
        }
        let weight = blocks::<T>(bytes).filter(|w| w.len() == n * (k / T::BLCK_SIZE))?;
        Some(Box::new(Dequantized {
            isa,
            weight,
            input: x.to_vec(),
            k,
            rows,
        }))
    }
}

impl<T: GgmlType> BandKernel for Dequantized<'_, T> {
    fn run(&self, first: usize, out: &mut [f32]) {
        let kb = self.k / T::BLCK_SIZE;
        let mut row = vec![0f32; self.k];
        for (i, ys) in out.chunks_mut(self.rows).enumerate() {
            T::to_float(
                &self.weight[(first + i) * kb..(first + i + 1) * kb],
                &mut row,
            );
            for (r, y) in ys.iter_mut().enumerate() {
                *y = super::gemv::dot_with(
                    self.isa,
                    &row,
                    &self.input[r * self.k..(r + 1) * self.k],
                );
            }
        }
    }
}

/// Any block format, through candle's dot products.
struct Blocks<'a, T: GgmlType> {
    /// `(n, k / block)` blocks, row after row.
    weight: &'a [T],
    /// `(rows, k / block)` blocks of the dot-product partner format.
    input: Vec<T::VecDotType>,
    k: usize,
    rows: usize,
}

impl<'a, T: GgmlType + 'a> Blocks<'a, T> {
    fn boxed(
        bytes: &'a [u8],
        n: usize,
        k: usize,
        x: &[f32],
        rows: usize,
    ) -> Option<Box<dyn BandKernel + 'a>> {
        let block = T::BLCK_SIZE;
        if block != T::VecDotType::BLCK_SIZE || !k.is_multiple_of(block) || x.len() != rows * k {
            return None;
        }
        let kb = k / block;
        let weight = blocks::<T>(bytes).filter(|w| w.len() == n * kb)?;
        let mut input = vec![T::VecDotType::zeros(); rows * kb];
        for (xr, qr) in x.chunks_exact(k).zip(input.chunks_exact_mut(kb)) {
            T::VecDotType::from_float(xr, qr);
        }
        Some(Box::new(Blocks {
            weight,
            input,
            k,
            rows,
        }))
    }
}

impl<T: GgmlType> BandKernel for Blocks<'_, T> {
    fn run(&self, first: usize, out: &mut [f32]) {
        let kb = self.k / T::BLCK_SIZE;
        let row = |i: usize| &self.weight[(first + i) * kb..(first + i + 1) * kb];
        if self.rows == 1 {
            let x = self.input.as_slice();
            let done = out.len() - out.len() % 4;
            // The next four rows are fetched while these four are computed (35% more throughput
            // for Q4_K on one core, whose dot product is long enough to stall on every miss).
            let quad_bytes = 4 * kb * std::mem::size_of::<T>();
            for (q, ys) in out[..done].chunks_exact_mut(4).enumerate() {
                let i = 4 * q;
                prefetch(
                    row(i).as_ptr().cast::<u8>().wrapping_add(quad_bytes),
                    quad_bytes,
                );
                let (a, b, c, d) =
                    T::vec_dot_4(self.k, row(i), row(i + 1), row(i + 2), row(i + 3), x);
                ys.copy_from_slice(&[a, b, c, d]);
            }
            for (i, y) in out.iter_mut().enumerate().skip(done) {
                *y = T::vec_dot(self.k, row(i), x);
            }
        } else {
            let row_bytes = kb * std::mem::size_of::<T>();
            for (i, ys) in out.chunks_mut(self.rows).enumerate() {
                let w = row(i);
                prefetch(w.as_ptr().cast::<u8>().wrapping_add(row_bytes), row_bytes);
                for (r, y) in ys.iter_mut().enumerate() {
                    *y = T::vec_dot(self.k, w, &self.input[r * kb..(r + 1) * kb]);
                }
            }
        }
    }
}

/// Asks for `bytes` bytes at `at` to be loaded into the cache (a hint: never faults, does
/// nothing off x86-64). One prefetch per 128 bytes: the core's adjacent-line prefetcher brings
/// the pair (measured: faster than one per 64-byte line for Q4_K rows).
#[inline]
fn prefetch(at: *const u8, bytes: usize) {
    for line in 0..bytes.div_ceil(128) {
        super::prefetch_line(at.wrapping_add(128 * line));
    }
}

/// candle's CPU storage of a quantized tensor (`QTensor::data`) seen as its blocks; `None` if
/// the bytes are not a whole number of aligned blocks.
fn blocks<T: GgmlType>(bytes: &[u8]) -> Option<&[T]> {
    let size = std::mem::size_of::<T>();
    if size == 0
        || !bytes.len().is_multiple_of(size)
        || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
    {
        return None;
    }
    // SAFETY: `T` is one of candle's GGML block structs (`repr(C)`, only f16 and byte-array
    // fields, so every bit pattern is a valid value), and these bytes are exactly candle's
    // `Vec<T>` storage of such blocks; length and alignment are checked above, and the slice
    // borrows `bytes`.
    Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / size) })
}

/// Interleaved Q8_0 and Q4_0 weights against a Q8_0 input, and interleaved Q4_K weights against
/// a Q8_K input, with AVX2, FMA and F16C (and `vpdpbusd` where the CPU has it); the inputs'
/// quantization and the dequantization of candle's blocks, vectorised with candle's arithmetic.
///
/// Q8_0 and Q4_0 are blocks of 32 weights behind an f16 scale (Q8_0: 34 bytes, the weights as
/// i8; Q4_0: 18 bytes, the weights as nibbles `q + 8`, the first 16 in the low halves); Q4_K
/// blocks of 256 behind `d`, `dmin` and eight 6-bit scales and mins. Functions with target
/// features are inlined only where the compiler likes (a call per eight blocks cost the forms
/// 7-10%), so the helpers inside the forms are macros, and the forms take no closures (they
/// would not inherit the features).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use candle_core::quantized::k_quants::{BlockQ4K, BlockQ8K, BlockQ8_0, GgmlType};
    use candle_core::quantized::GgmlDType;

    use super::{BandKernel, Q4KX8_BYTES, Q4X8_BYTES, Q8X8_BYTES};
    use crate::kernels::isa::{Isa, Level};

    /// Whether `isa` has what the kernels use (AVX2, FMA and F16C): an `Isa` is never above
    /// what the CPU has.
    fn available(isa: Isa) -> bool {
        isa.level() >= Level::Avx2
    }

    /// `$call!(form, n)` for a run of `$take` input rows with the form of `$dots`: up to four
    /// rows with AVX-512 (32 registers), two without.
    macro_rules! by_runs {
        ($dots:expr, $take:expr, $call:ident, $evex:ident, $vex:ident, $avx2:ident) => {
            match ($dots, $take) {
                (Dots::Evex, 1) => $call!($evex, 1),
                (Dots::Evex, 2) => $call!($evex, 2),
                (Dots::Evex, 3) => $call!($evex, 3),
                (Dots::Evex, _) => $call!($evex, 4),
                (Dots::Vex, 1) => $call!($vex, 1),
                (Dots::Vex, _) => $call!($vex, 2),
                (Dots::Avx2, 1) => $call!($avx2, 1),
                (Dots::Avx2, _) => $call!($avx2, 2),
            }
        };
    }

    /// Bytes of a Q8_0 block: the f16 scale, then 32 i8.
    const Q8_0_BYTES: usize = 34;
    /// Bytes of a Q4_0 block: the f16 scale, then 16 bytes of nibbles.
    const Q4_0_BYTES: usize = 18;

    /// The Q8_0 and Q4_0 kernel: weight rows interleaved by eight ([`super::interleave`]),
    /// a group of eight at a time (`first` and every band start at a group), against the input
    /// rows quantized to Q8_0.
    pub(super) struct Kernel<'a> {
        weight: &'a [u8],
        /// Blocks per row.
        kb: usize,
        /// The input rows' Q8_0 scales as f32.
        input_scales: Vec<f32>,
        /// The byte dot product the forms use.
        dots: Dots,
        /// Q8_0 past [`row_form_most`] rows: the input rows in groups of `width`, as
        /// [`q8x8_lanes`], [`q8x8_lanes_vex`] and [`q8x8_lanes16`] (`32 width kb` bytes a
        /// group) or [`q8x8_lanes_avx2`] (`512 kb` bytes a group) read them ([`Lanes::q`];
        /// empty otherwise).
        lanes: Vec<u8>,
        /// With `lanes`: each group's block scales, `width` per block ([`Lanes::scales`]).
        lane_scales: Vec<f32>,
        /// Input rows per group of `lanes`: 8 (256-bit registers) for up to 8 rows or without
        /// AVX-512 VNNI, else 16; 1 for Q4_0 and for up to [`row_form_most`] rows of Q8_0,
        /// which take the rows forms instead ([`group_rows`], [`group_rows_vex`],
        /// [`group_rows_avx2`]).
        width: usize,
        /// With width 1: each input block's 32 bytes as they are (signed), and what the
        /// weights' bias adds to their products ([`RowInput::minus`]).
        signed: Vec<u8>,
        minus: Vec<i32>,
        /// Q4_0 rather than Q8_0.
        nibbles: bool,
        rows: usize,
    }

    /// Whether Q8_0, Q4_0 and Q4_K weights are interleaved for `isa`
    /// ([`super::QWeight::prepared`]): where the kernels have AVX2, whose forms for them
    /// ([`group_rows`] and the others) do without the transposition candle's layout needs.
    pub(super) fn interleaves(isa: Isa) -> bool {
        available(isa)
    }

    /// Whether prompt chunks of interleaved weights take the kernel on `isa`: with `vpdpbusd`
    /// (four byte products per lane and instruction, where the float gemm does one
    /// multiply-add); AVX2 alone multiplies pairs of i16, no faster than the gemm.
    pub(super) fn integer_prompts(isa: Isa) -> bool {
        available(isa) && Dots::of(isa) != Dots::Avx2
    }

    /// The kernel of interleaved Q8_0 or Q4_0 weights `bytes` of `(n, k)` (rows padded to a
    /// multiple of eight), with the input `x` (`rows` rows of `k`) quantized for it; `None`
    /// for another format, candle's layout, or blocks that do not fit.
    // One argument per fact about the piece; a struct would only be unpacked again.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn kernel<'a>(
        isa: Isa,
        format: GgmlDType,
        interleaved: bool,
        bytes: &'a [u8],
        n: usize,
        k: usize,
        x: &[f32],
        rows: usize,
    ) -> Option<Kernel<'a>> {
        let (nibbles, block_bytes) = match format {
            GgmlDType::Q8_0 => (false, Q8_0_BYTES),
            GgmlDType::Q4_0 => (true, Q4_0_BYTES),
            _ => return None,
        };
        if !available(isa)
            || !interleaved
            || std::mem::size_of::<BlockQ8_0>() != Q8_0_BYTES
            || !k.is_multiple_of(32)
            || x.len() != rows * k
        {
            return None;
        }
        let kb = k / 32;
        if bytes.len() != n.next_multiple_of(8) * kb * block_bytes {
            return None;
        }
        let mut input = vec![BlockQ8_0::zeros(); rows * kb];
        for (xr, qr) in x.chunks_exact(k).zip(input.chunks_exact_mut(kb)) {
            quantize_q8_0(xr, qr);
        }
        let input = as_bytes(&input);
        let input_scales: Vec<f32> = input
            .chunks_exact(Q8_0_BYTES)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect();
        let dots = Dots::of(isa);
        // `vpdpbusd`, on either encoding: the inputs laid out for it.
        let vnni = dots != Dots::Avx2;
        let width = match rows {
            _ if nibbles => 1,
            r if r <= row_form_most(dots) => 1,
            r if r <= 8 || dots != Dots::Evex => 8,
            _ => 16,
        };
        // Block `b` of input row `r`: its 32 bytes.
        let block = |r: usize, b: usize| {
            let at = (r * kb + b) * Q8_0_BYTES + 2;
            &input[at..at + 32]
        };
        let (mut lanes, mut lane_scales) = (Vec::new(), Vec::new());
        let (mut signed, mut minus) = (Vec::new(), Vec::new());
        let sum = |q: &[u8]| q.iter().map(|&v| i32::from(v as i8)).sum::<i32>();
        if width == 1 {
            for b in input.chunks_exact(Q8_0_BYTES) {
                signed.extend_from_slice(&b[2..]);
                if nibbles {
                    minus.push(-8 * sum(&b[2..]));
                } else if vnni {
                    minus.push(-128 * sum(&b[2..]));
                }
            }
        } else if !vnni {
            // Each pair of bytes `2p, 2p + 1` of every row's block b, widened to i16, side by
            // side (row m in lane m), eight rows to a group: 512 bytes a block.
            let groups = rows.div_ceil(8);
            lanes = vec![0u8; groups * kb * 512];
            lane_scales = vec![0f32; groups * kb * 8];
            for r in 0..rows {
                let (group, m) = (r / 8, r % 8);
                for b in 0..kb {
                    let at = (group * kb + b) * 512 + 4 * m;
                    for (p, two) in block(r, b).chunks_exact(2).enumerate() {
                        let at = at + 32 * p;
                        lanes[at..at + 2].copy_from_slice(&i16::from(two[0] as i8).to_le_bytes());
                        lanes[at + 2..at + 4]
                            .copy_from_slice(&i16::from(two[1] as i8).to_le_bytes());
                    }
                    lane_scales[(group * kb + b) * 8 + m] = input_scales[r * kb + b];
                }
            }
        } else {
            // Byte group g of every row's block b, biased to the unsigned operand (`x + 128`),
            // side by side, row m in lane m, `width` rows to a group; the lanes past the last
            // row stay zero and are never read back.
            let groups = rows.div_ceil(width);
            lanes = vec![0u8; groups * kb * 32 * width];
            lane_scales = vec![0f32; groups * kb * width];
            for r in 0..rows {
                let (group, m) = (r / width, r % width);
                for b in 0..kb {
                    let at = (group * kb + b) * 32 * width + 4 * m;
                    for (g, four) in block(r, b).chunks_exact(4).enumerate() {
                        let at = at + 4 * width * g;
                        for (to, &v) in lanes[at..at + 4].iter_mut().zip(four) {
                            *to = v ^ 0x80;
                        }
                    }
                    lane_scales[(group * kb + b) * width + m] = input_scales[r * kb + b];
                }
            }
        }
        Some(Kernel {
            weight: bytes,
            kb,
            input_scales,
            dots,
            lanes,
            lane_scales,
            width,
            signed,
            minus,
            nibbles,
            rows,
        })
    }

    /// The bytes of Q8_0 blocks (34 each, no padding: checked by the caller).
    fn as_bytes(blocks: &[BlockQ8_0]) -> &[u8] {
        // SAFETY: `BlockQ8_0` is `repr(C)` { f16, [i8; 32] } with no padding (its size, 34, is
        // checked before any is made), so its memory is initialised bytes; the view borrows
        // `blocks`.
        unsafe {
            std::slice::from_raw_parts(blocks.as_ptr().cast::<u8>(), std::mem::size_of_val(blocks))
        }
    }

    /// The bytes of Q8_0 blocks, to write (34 each, no padding: checked by the caller).
    fn as_bytes_mut(blocks: &mut [BlockQ8_0]) -> &mut [u8] {
        // SAFETY: as `as_bytes`, and any bytes are a valid `BlockQ8_0` (an f16 and i8s); the
        // view borrows `blocks` mutably.
        unsafe {
            std::slice::from_raw_parts_mut(
                blocks.as_mut_ptr().cast::<u8>(),
                std::mem::size_of_val(blocks),
            )
        }
    }

    /// candle's `BlockQ8_0::from_float`, eight floats at a time with AVX2 (the caller checked
    /// the CPU has it): per block of 32, the largest magnitude over 127 as the scale (its f16
    /// stored), each value times the scale's inverse rounded half away from zero, as
    /// `f32::round`. candle runs a scalar loop with a call of `roundf` per value: at 16 rows
    /// the input's quantization was 4% of a decode step, on one thread. The same bytes (a unit
    /// test compares them).
    pub(super) fn quantize_q8_0(xs: &[f32], ys: &mut [BlockQ8_0]) {
        if std::mem::size_of::<BlockQ8_0>() != Q8_0_BYTES || xs.len() != 32 * ys.len() {
            BlockQ8_0::from_float(xs, ys);
            return;
        }
        // SAFETY: `kernel` runs only where `available` (AVX2, FMA, F16C); 32 floats per block.
        unsafe { quantize_q8_0_avx2(xs, as_bytes_mut(ys)) }
    }

    /// [`quantize_q8_0`]'s body.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `out` is 34 bytes per 32 floats of `xs`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn quantize_q8_0_avx2(xs: &[f32], out: &mut [u8]) {
        let sign = _mm256_set1_ps(-0.0);
        let half = _mm256_set1_ps(0.5);
        let one = _mm256_set1_ps(1.0);
        for (x, b) in xs.chunks_exact(32).zip(out.chunks_exact_mut(Q8_0_BYTES)) {
            // SAFETY: 32 floats.
            let v: [__m256; 4] =
                std::array::from_fn(|c| unsafe { _mm256_loadu_ps(x.as_ptr().add(8 * c)) });
            // `f32::max` skips a NaN; `max_ps` returns its second operand when either is one.
            let mut m = _mm256_setzero_ps();
            for vc in v {
                m = _mm256_max_ps(_mm256_andnot_ps(sign, vc), m);
            }
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m = _mm_max_ps(_mm_movehl_ps(m, m), m);
            let amax = _mm_cvtss_f32(_mm_max_ss(_mm_movehdup_ps(m), m));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            b[..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
            let idv = _mm256_set1_ps(id);
            let q: [__m256i; 4] = std::array::from_fn(|c| {
                let y = _mm256_mul_ps(v[c], idv);
                // Half away from zero: the truncation, plus the sign where the dropped
                // fraction (exact) is at least one half.
                let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
                let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(y, t));
                let up = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(frac, half), one);
                let r = _mm256_add_ps(t, _mm256_or_ps(up, _mm256_and_ps(y, sign)));
                // `as i8` takes NaN to 0 and saturates (infinities too).
                let r = _mm256_and_ps(r, _mm256_cmp_ps::<_CMP_ORD_Q>(y, y));
                let r = _mm256_min_ps(
                    _mm256_max_ps(r, _mm256_set1_ps(-128.0)),
                    _mm256_set1_ps(127.0),
                );
                _mm256_cvttps_epi32(r)
            });
            // i32 -> i16 -> i8 with saturation, then the lanes back in order.
            let w = _mm256_packs_epi32(q[0], q[1]);
            let z = _mm256_packs_epi32(q[2], q[3]);
            let bytes = _mm256_packs_epi16(w, z);
            let bytes =
                _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            // SAFETY: bytes 2..34 of the block.
            unsafe { _mm256_storeu_si256(b.as_mut_ptr().add(2).cast(), bytes) };
        }
    }

    impl BandKernel for Kernel<'_> {
        /// Q4_0: runs of up to four input rows (two without AVX-512) against each group of eight
        /// weight rows ([`group_rows`] and the others). Q8_0: up to [`row_form_most`] input rows
        /// at once the same way, more with the input rows in the lanes, 8 or 16 to a register
        /// ([`q8x8_lanes`], [`q8x8_lanes_vex`] four weight rows a pass, [`q8x8_lanes16`],
        /// [`q8x8_lanes_avx2`]). Every form sums each block exactly and adds the sums alike, so a
        /// row gets the same bits alone, in any batch and on every instruction set.
        fn run(&self, first: usize, out: &mut [f32]) {
            let feats = out.len() / self.rows.max(1);
            let (width, kb) = (self.width, self.kb);
            if self.nibbles {
                // A few input rows at a time (what the registers hold: sixteen without
                // AVX-512).
                let most = if self.dots == Dots::Evex { 4 } else { 2 };
                let group_bytes = kb * Q4X8_BYTES;
                over_groups(
                    self.weight,
                    group_bytes,
                    first,
                    self.rows,
                    most,
                    out,
                    |group, r, take, buf| {
                        let input = |d: usize| RowInput {
                            q: &self.signed[32 * kb * (r + d)..32 * kb * (r + d + 1)],
                            minus: &self.minus[kb * (r + d)..kb * (r + d + 1)],
                            scales: &self.input_scales[kb * (r + d)..kb * (r + d + 1)],
                        };
                        macro_rules! call {
                            ($f:ident, $n:literal) => {
                                buf[..$n].copy_from_slice(&$f::<$n, true>(
                                    kb,
                                    group,
                                    std::array::from_fn(input),
                                ))
                            };
                        }
                        // SAFETY: the CPU has AVX2, FMA and F16C (`available`), AVX-512 VNNI and
                        // VL at `Dots::Evex` (`Isa::vnni`), AVX-VNNI at `Dots::Vex`
                        // (`Isa::avx_vnni`); `group` is `kb` interleaved Q4_0 blocks of eight rows,
                        // and `signed` holds `32 kb` bytes and `minus` and `input_scales` `kb`
                        // values a row.
                        unsafe {
                            by_runs!(
                                self.dots,
                                take,
                                call,
                                group_rows,
                                group_rows_vex,
                                group_rows_avx2
                            )
                        }
                    },
                );
                return;
            }
            let group_bytes = kb * Q8X8_BYTES;
            let mut i = 0;
            while i < feats {
                let at = (first + i) / 8 * group_bytes;
                let Some(group) = self.weight.get(at..at + group_bytes) else {
                    return;
                };
                let here = (feats - i).min(8);
                if width == 1 {
                    let input = |r: usize| RowInput {
                        q: &self.signed[32 * kb * r..32 * kb * (r + 1)],
                        // (Empty without `vpdpbusd`: the AVX2 form does not read it.)
                        minus: self.minus.get(kb * r..kb * (r + 1)).unwrap_or(&[]),
                        scales: &self.input_scales[kb * r..kb * (r + 1)],
                    };
                    let mut put = |dots: &[[f32; 8]]| {
                        for (r, d) in dots.iter().enumerate() {
                            for (j, v) in d.iter().enumerate().take(here) {
                                out[(i + j) * self.rows + r] = *v;
                            }
                        }
                    };
                    macro_rules! call {
                        ($f:ident, $n:literal) => {
                            put(&$f::<$n, false>(kb, group, std::array::from_fn(input)))
                        };
                    }
                    // SAFETY: the CPU has AVX2, FMA and F16C (`available`), AVX-512 VNNI and VL
                    // at `Dots::Evex` (`Isa::vnni`), AVX-VNNI at `Dots::Vex` (`Isa::avx_vnni`);
                    // `group` is `kb` interleaved blocks of eight rows, `signed` holds `32 kb`
                    // bytes and `minus` and `input_scales` `kb` values a row, for 1 to
                    // `row_form_most` rows.
                    unsafe {
                        match (self.dots, self.rows) {
                            (Dots::Evex, 1) => call!(group_rows, 1),
                            (Dots::Evex, 2) => call!(group_rows, 2),
                            (Dots::Evex, 3) => call!(group_rows, 3),
                            (Dots::Evex, _) => call!(group_rows, 4),
                            (Dots::Vex, 1) => call!(group_rows_vex, 1),
                            (Dots::Vex, 2) => call!(group_rows_vex, 2),
                            (Dots::Vex, 3) => call!(group_rows_vex, 3),
                            (Dots::Vex, _) => call!(group_rows_vex, 4),
                            (Dots::Avx2, 1) => call!(group_rows_avx2, 1),
                            (Dots::Avx2, 2) => call!(group_rows_avx2, 2),
                            (Dots::Avx2, 3) => call!(group_rows_avx2, 3),
                            (Dots::Avx2, 4) => call!(group_rows_avx2, 4),
                            (Dots::Avx2, _) => call!(group_rows_avx2, 5),
                        }
                    }
                    i += 8;
                    continue;
                }
                // 32 bytes a block and lane with `vpdpbusd`; without, 64 (i16).
                let lane_group = if self.dots == Dots::Avx2 {
                    512 * kb
                } else {
                    32 * width * kb
                };
                let groups = self.lanes.len() / lane_group;
                let lanes = |gi: usize| Lanes {
                    q: &self.lanes[lane_group * gi..lane_group * (gi + 1)],
                    scales: &self.lane_scales[width * kb * gi..width * kb * (gi + 1)],
                };
                let mut put = |gi: usize, from: usize, dots: &[[f32; 16]]| {
                    let rows_here = (self.rows - width * gi).min(width);
                    for (j, d) in dots.iter().enumerate() {
                        if from + j >= here {
                            break;
                        }
                        let at = (i + from + j) * self.rows + width * gi;
                        out[at..at + rows_here].copy_from_slice(&d[..rows_here]);
                    }
                };
                let mut gi = 0;
                while gi < groups {
                    // (Without VNNI, one group of 8 input rows against the eight rows: two groups
                    // sharing each broadcast, four rows a pass, measured slower here.)
                    // SAFETY: as above; `lanes` holds `lane_group` bytes and `lane_scales`
                    // `width kb` scales a group (width 16 only at `Dots::Evex`).
                    unsafe {
                        match (self.dots, width) {
                            (Dots::Evex, 16) => {
                                put(gi, 0, &q8x8_lanes16::<8>(kb, group, 0, lanes(gi)))
                            }
                            (Dots::Evex, _) => {
                                put(gi, 0, &q8x8_lanes::<8>(kb, group, 0, lanes(gi)))
                            }
                            (Dots::Vex, _) => {
                                put(gi, 0, &q8x8_lanes_vex::<4>(kb, group, 0, lanes(gi)));
                                put(gi, 4, &q8x8_lanes_vex::<4>(kb, group, 4, lanes(gi)));
                            }
                            (Dots::Avx2, _) => {
                                let [a] = q8x8_lanes_avx2::<8, 1, 0>(kb, group, [lanes(gi)]);
                                put(gi, 0, &a);
                            }
                        }
                    }
                    gi += 1;
                }
                i += 8;
            }
        }
    }

    /// Runs `dots` over a band of weight rows interleaved by eight, from `first` (a group's
    /// start; groups of `group_bytes`), against `rows` input rows, up to `most` at a time:
    /// `dots(group, r, take, buf)` fills `buf[..take]` with input rows `r..r + take`' dots with
    /// the group's eight rows, which go to `out` (feature-major, `rows` values per weight row).
    /// Each group stays in the nearest cache across its runs of input rows.
    fn over_groups(
        weight: &[u8],
        group_bytes: usize,
        first: usize,
        rows: usize,
        most: usize,
        out: &mut [f32],
        mut dots: impl FnMut(&[u8], usize, usize, &mut [[f32; 8]; 4]),
    ) {
        let feats = out.len() / rows.max(1);
        let mut buf = [[0f32; 8]; 4];
        let mut i = 0;
        while i < feats {
            let at = (first + i) / 8 * group_bytes;
            let Some(group) = weight.get(at..at + group_bytes) else {
                return;
            };
            let here = (feats - i).min(8);
            let mut r = 0;
            while r < rows {
                let take = (rows - r).min(most).min(4);
                dots(group, r, take, &mut buf);
                for (dr, d) in buf.iter().enumerate().take(take) {
                    for (j, v) in d.iter().enumerate().take(here) {
                        out[(i + j) * rows + r + dr] = *v;
                    }
                }
                r += take;
            }
            i += 8;
        }
    }

    /// `-128` times the sums of each of the eight interleaved rows' block at `at` (row `m` in
    /// lane `m`), with `$dpbusd`: what the biased input (`x + 128`) adds to their products.
    /// Unsafe: the CPU has `$dpbusd`; [`Q8X8_BYTES`] bytes are readable at `$at`.
    macro_rules! group_starts {
        ($at:expr, $dpbusd:ident) => {{
            let bias = _mm256_set1_epi8(-128);
            let zero = _mm256_setzero_si256();
            let (mut t0, mut t1) = (zero, zero);
            for g in (0..8).step_by(2) {
                t0 = $dpbusd(t0, bias, _mm256_loadu_si256($at.add(16 + 32 * g).cast()));
                t1 = $dpbusd(t1, bias, _mm256_loadu_si256($at.add(48 + 32 * g).cast()));
            }
            let mut starts = [0i32; 8];
            _mm256_storeu_si256(
                starts.as_mut_ptr().cast(),
                _mm256_sub_epi32(zero, _mm256_add_epi32(t0, t1)),
            );
            starts
        }};
    }

    /// How far ahead the interleaved forms prefetch, in blocks of a group (a group's blocks
    /// are one run of memory).
    const Q8X8_AHEAD: usize = 4;

    /// Asks for the interleaved block [`Q8X8_AHEAD`] blocks (of `$bytes`) after the one at
    /// `$at`: the hardware's prefetcher alone left the 16-row form 12% slower than candle's
    /// layout, whose forms prefetch their four rows.
    macro_rules! prefetch_blocks_ahead {
        ($at:expr, $bytes:expr) => {
            let ahead = $at.wrapping_add(Q8X8_AHEAD * $bytes);
            for line in 0..$bytes.div_ceil(64) {
                crate::kernels::prefetch_line(ahead.wrapping_add(64 * line));
            }
        };
    }

    /// Makes, with `$features` and `$dpbusd`, `$lanes`: `P` of a group's eight interleaved
    /// Q8_0 rows ([`super::interleave`]) from `lane0` dotted with up to 8 input rows in the
    /// lanes ([`Lanes`], `W` = 8): per block and weight row, its four bytes broadcast and one
    /// `$dpbusd` per four bytes of the input rows (biased, `x + 128`; the lanes starting from
    /// -128 times the weights' sums), each block's 32 products summed exactly, converted, and
    /// added by one multiply-add with the product of the scales: the rows forms' bits.
    macro_rules! interleaved_forms {
        ($features:literal, $dpbusd:ident, $lanes:ident) => {
            /// See `interleaved_forms`.
            ///
            /// # Safety
            /// The CPU has `$features`; `group` is `kb` interleaved blocks of eight rows,
            /// `lane0 + P <= 8`, `x.q` holds `256 kb` bytes and `x.scales` `8 kb` floats.
            #[target_feature(enable = $features)]
            unsafe fn $lanes<const P: usize>(
                kb: usize,
                group: &[u8],
                lane0: usize,
                x: Lanes,
            ) -> [[f32; 16]; P] {
                let mut acc = [_mm256_setzero_ps(); P];
                let base = group.as_ptr();
                for b in 0..kb {
                    // SAFETY (all pointer arithmetic below): block `b < kb` of the group;
                    // input block `b` is 256 bytes of `x.q` and 8 floats of `x.scales`.
                    let at = unsafe { base.add(Q8X8_BYTES * b) };
                    prefetch_blocks_ahead!(at, Q8X8_BYTES);
                    let starts = unsafe { group_starts!(at, $dpbusd) };
                    let mut ws = [0f32; 8];
                    unsafe {
                        _mm256_storeu_ps(
                            ws.as_mut_ptr(),
                            _mm256_cvtph_ps(_mm_loadu_si128(at.cast())),
                        )
                    };
                    let xb = unsafe { x.q.as_ptr().add(256 * b) };
                    let mut xv = [_mm256_setzero_si256(); 8];
                    for (g, v) in xv.iter_mut().enumerate() {
                        *v = unsafe { _mm256_loadu_si256(xb.add(32 * g).cast()) };
                    }
                    let xs = unsafe { _mm256_loadu_ps(x.scales.as_ptr().add(8 * b)) };
                    for (p, acc) in acc.iter_mut().enumerate() {
                        let m = lane0 + p;
                        let mut sum = _mm256_set1_epi32(starts[m]);
                        for (g, xg) in xv.iter().enumerate() {
                            let four = unsafe {
                                std::ptr::read_unaligned(at.add(16 + 32 * g + 4 * m).cast::<i32>())
                            };
                            sum = $dpbusd(sum, *xg, _mm256_set1_epi32(four));
                        }
                        let d = _mm256_mul_ps(_mm256_set1_ps(ws[m]), xs);
                        *acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sum), *acc);
                    }
                }
                let mut dots = [[0f32; 16]; P];
                for (d, a) in dots.iter_mut().zip(&acc) {
                    // SAFETY: eight floats.
                    unsafe { _mm256_storeu_ps(d.as_mut_ptr(), *a) };
                }
                dots
            }
        };
    }

    interleaved_forms!(
        "avx512f,avx512vnni,avx512vl,avx2,fma,f16c",
        _mm256_dpbusd_epi32,
        q8x8_lanes
    );
    interleaved_forms!(
        "avxvnni,avx2,fma,f16c",
        _mm256_dpbusd_avx_epi32,
        q8x8_lanes_vex
    );

    /// `$acc` plus, in each 32-bit lane, the four products of the unsigned bytes `$u` and the
    /// signed bytes `$s`: one `$dpbusd` (`$vnni`), else `maddubs` and `madd` (the pairs must
    /// not saturate i16). Unsafe: the CPU has `$dpbusd`, or AVX2.
    macro_rules! byte_dot {
        ($vnni:literal, $dpbusd:ident, $acc:expr, $u:expr, $s:expr) => {
            if $vnni {
                $dpbusd($acc, $u, $s)
            } else {
                let pairs = _mm256_maddubs_epi16($u, $s);
                _mm256_add_epi32($acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
            }
        };
    }

    /// Makes `$name`, with `$features`: a group's eight interleaved weight rows
    /// ([`super::interleave`], one row per lane) dotted with `R` input rows, Q8_0 or
    /// (`NIBBLES`) Q4_0. Per four bytes of a block, one load of the eight rows' bytes, made
    /// once for the `R` rows into the unsigned operand, and per input row its four bytes
    /// broadcast and one `$dpbusd` (`$vnni`), else `maddubs` and `madd`:
    ///
    /// * Q8_0 with `vpdpbusd`: the weights biased (`w + 128`), each block's lanes starting from
    ///   `-128` times its input bytes' sum; with AVX2 alone `|w|`, and the input bytes take
    ///   `w`'s signs (at most `2 * 128 * 127` a pair).
    /// * Q4_0: the load's low nibbles are weights `4g..4g + 4` and its high nibbles
    ///   `16 + 4g..16 + 4g + 4`, each as stored (`w + 8`, at most `2 * 15 * 128` a pair), each
    ///   block's lanes starting from `-8` times its input bytes' sum.
    ///
    /// Each block's 32 products are summed exactly, row `m` in lane `m`, converted, and added by
    /// one multiply-add with the product of the scales: a row gets the same bits alone, in any
    /// batch and on every instruction set. Where candle's layout needs eight rows' blocks
    /// transposed (24 shuffles a block) or each row's lanes summed across, these bytes are in
    /// place.
    ///
    /// # Safety
    /// The CPU has `$features`; `group` is `kb` interleaved blocks of eight rows of the
    /// format, each `x[r].q` `32 kb` bytes, its `scales` `kb` values and, but for Q8_0 without
    /// `$vnni`, its `minus` `kb` values.
    macro_rules! group_rows_form {
        ($name:ident, $features:literal, $vnni:literal, $dpbusd:ident) => {
            // `r` indexes several arrays of accumulators at once.
            #[allow(clippy::needless_range_loop)]
            #[target_feature(enable = $features)]
            unsafe fn $name<const R: usize, const NIBBLES: bool>(
                kb: usize,
                group: &[u8],
                x: [RowInput; R],
            ) -> [[f32; 8]; R] {
                let flip = _mm256_set1_epi8(-128);
                let low = _mm256_set1_epi8(0x0F);
                let zero = _mm256_setzero_si256();
                let bytes = if NIBBLES { Q4X8_BYTES } else { Q8X8_BYTES };
                let mut acc = [_mm256_setzero_ps(); R];
                let base = group.as_ptr();
                for b in 0..kb {
                    // SAFETY (all pointer arithmetic below): block `b < kb` of the group is
                    // `bytes` bytes from `bytes b`; input block `b` is 32 bytes of `x[r].q`.
                    let at = unsafe { base.add(bytes * b) };
                    prefetch_blocks_ahead!(at, bytes);
                    let ws = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(at.cast()) });
                    // Two chains of sums per row, so that one waits less on the other.
                    let mut even = [zero; R];
                    let mut odd = [zero; R];
                    if NIBBLES || $vnni {
                        for r in 0..R {
                            even[r] = _mm256_set1_epi32(x[r].minus[b]);
                        }
                    }
                    for g in 0..(if NIBBLES { 4 } else { 8 }) {
                        let raw = unsafe { _mm256_loadu_si256(at.add(16 + 32 * g).cast()) };
                        // The unsigned operands: Q4_0's two halves; Q8_0's biased weights or
                        // magnitudes (and, without VNNI, the signs the input takes).
                        let (first, second) = if NIBBLES {
                            let high = _mm256_srli_epi16(raw, 4);
                            (_mm256_and_si256(raw, low), _mm256_and_si256(high, low))
                        } else if $vnni {
                            (_mm256_xor_si256(raw, flip), raw)
                        } else {
                            (_mm256_sign_epi8(raw, raw), raw)
                        };
                        for r in 0..R {
                            let xq = unsafe { x[r].q.as_ptr().add(32 * b + 4 * g) };
                            let four = _mm256_set1_epi32(unsafe {
                                std::ptr::read_unaligned(xq.cast::<i32>())
                            });
                            if NIBBLES {
                                let upper = _mm256_set1_epi32(unsafe {
                                    std::ptr::read_unaligned(xq.add(16).cast::<i32>())
                                });
                                even[r] = byte_dot!($vnni, $dpbusd, even[r], first, four);
                                odd[r] = byte_dot!($vnni, $dpbusd, odd[r], second, upper);
                            } else {
                                let four = if $vnni {
                                    four
                                } else {
                                    _mm256_sign_epi8(four, second)
                                };
                                if g % 2 == 0 {
                                    even[r] = byte_dot!($vnni, $dpbusd, even[r], first, four);
                                } else {
                                    odd[r] = byte_dot!($vnni, $dpbusd, odd[r], first, four);
                                }
                            }
                        }
                    }
                    for r in 0..R {
                        let sum = _mm256_add_epi32(even[r], odd[r]);
                        let d = _mm256_mul_ps(ws, _mm256_set1_ps(x[r].scales[b]));
                        acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sum), acc[r]);
                    }
                }
                let mut dots = [[0f32; 8]; R];
                for (d, a) in dots.iter_mut().zip(&acc) {
                    // SAFETY: eight floats.
                    unsafe { _mm256_storeu_ps(d.as_mut_ptr(), *a) };
                }
                dots
            }
        };
    }

    group_rows_form!(
        group_rows,
        "avx512f,avx512vnni,avx512vl,avx2,fma,f16c",
        true,
        _mm256_dpbusd_epi32
    );
    group_rows_form!(
        group_rows_vex,
        "avxvnni,avx2,fma,f16c",
        true,
        _mm256_dpbusd_avx_epi32
    );
    // (The AVX2 form never takes its `$dpbusd`: `$vnni` is false.)
    group_rows_form!(
        group_rows_avx2,
        "avx2,fma,f16c",
        false,
        _mm256_dpbusd_avx_epi32
    );

    /// `interleaved_forms`' lanes form on 512-bit registers: a group's eight rows dotted with
    /// up to 16 input rows in the lanes ([`Lanes`], `W` = 16).
    ///
    /// # Safety
    /// The CPU has AVX-512F, AVX-512 VNNI and VL, AVX2, FMA and F16C; `group` is `kb`
    /// interleaved blocks of eight rows, `x.q` holds `512 kb` bytes and `x.scales` `16 kb`
    /// floats.
    #[target_feature(enable = "avx512f,avx512vnni,avx512vl,avx2,fma,f16c")]
    unsafe fn q8x8_lanes16<const P: usize>(
        kb: usize,
        group: &[u8],
        lane0: usize,
        x: Lanes,
    ) -> [[f32; 16]; P] {
        let mut acc = [_mm512_setzero_ps(); P];
        let base = group.as_ptr();
        for b in 0..kb {
            // SAFETY (all pointer arithmetic below): block `b < kb` of the group; input block
            // `b` is 512 bytes of `x.q` and 16 floats of `x.scales`.
            let at = unsafe { base.add(Q8X8_BYTES * b) };
            prefetch_blocks_ahead!(at, Q8X8_BYTES);
            let starts = unsafe { group_starts!(at, _mm256_dpbusd_epi32) };
            // Broadcast from memory (a load), not from the register the sums are in (two
            // shuffles each, on the ports the products need).
            let starts = std::hint::black_box(starts);
            let mut ws = [0f32; 8];
            unsafe {
                _mm256_storeu_ps(ws.as_mut_ptr(), _mm256_cvtph_ps(_mm_loadu_si128(at.cast())))
            };
            let xb = unsafe { x.q.as_ptr().add(512 * b) };
            let mut xv = [_mm512_setzero_si512(); 8];
            for (g, v) in xv.iter_mut().enumerate() {
                *v = unsafe { _mm512_loadu_si512(xb.add(64 * g).cast()) };
            }
            let xs = unsafe { _mm512_loadu_ps(x.scales.as_ptr().add(16 * b)) };
            for (p, acc) in acc.iter_mut().enumerate() {
                let m = lane0 + p;
                let mut sum = _mm512_set1_epi32(starts[m]);
                for (g, xg) in xv.iter().enumerate() {
                    let four = unsafe {
                        std::ptr::read_unaligned(at.add(16 + 32 * g + 4 * m).cast::<i32>())
                    };
                    sum = _mm512_dpbusd_epi32(sum, *xg, _mm512_set1_epi32(four));
                }
                let d = _mm512_mul_ps(_mm512_set1_ps(ws[m]), xs);
                *acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sum), *acc);
            }
        }
        let mut dots = [[0f32; 16]; P];
        for (d, a) in dots.iter_mut().zip(&acc) {
            // SAFETY: sixteen floats.
            unsafe { _mm512_storeu_ps(d.as_mut_ptr(), *a) };
        }
        dots
    }

    /// The lanes form with AVX2 alone: `P` of a group's rows from `L` dotted with `G` groups of
    /// up to 8 input rows in the lanes as i16 pairs ([`Lanes`]), one `madd` and one add per
    /// pair of bytes; each block's rows widened to i16 pairs a four rows' conversion at a time
    /// (their bytes `4g..4g + 4` are side by side). The rows forms' bits. Taken as all eight
    /// rows against one group (two groups of four rows sharing each broadcast, as the form over
    /// candle's layout did, measured 0.82x of that).
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `group` is `kb` interleaved blocks of eight rows,
    /// `L + P <= 8`, each `x.q` holds `512 kb` bytes and `x.scales` `8 kb` floats.
    // `g`, `q` and `gg` index groups, rows and input groups of several arrays at once.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8x8_lanes_avx2<const P: usize, const G: usize, const L: usize>(
        kb: usize,
        group: &[u8],
        x: [Lanes; G],
    ) -> [[[f32; 16]; P]; G] {
        let lane0 = L;
        let mut acc = [[_mm256_setzero_ps(); P]; G];
        let base = group.as_ptr();
        for b in 0..kb {
            // SAFETY (all pointer arithmetic below): block `b < kb` of the group; input block
            // `b` is 512 bytes of `x[gg].q` and 8 floats of `x[gg].scales`.
            let at = unsafe { base.add(Q8X8_BYTES * b) };
            // (The group's second pass reads what the first brought.)
            if lane0 == 0 {
                prefetch_blocks_ahead!(at, Q8X8_BYTES);
            }
            let mut ws = [0f32; 8];
            unsafe {
                _mm256_storeu_ps(ws.as_mut_ptr(), _mm256_cvtph_ps(_mm_loadu_si128(at.cast())))
            };
            let ws = std::hint::black_box(ws);
            // wide[g][2m + h]: row m's pair h of its bytes 4g..4g + 4, as two i16 (the rows
            // of this pass only).
            let mut wide = [[0i32; 16]; 8];
            for (g, pairs) in wide.iter_mut().enumerate() {
                for half in (lane0 / 4)..(lane0 + P).div_ceil(4) {
                    let four_rows =
                        unsafe { _mm_loadu_si128(at.add(16 + 32 * g + 16 * half).cast()) };
                    // SAFETY: eight i32.
                    unsafe {
                        _mm256_storeu_si256(
                            pairs.as_mut_ptr().add(8 * half).cast(),
                            _mm256_cvtepi8_epi16(four_rows),
                        )
                    };
                }
            }
            // Each pair is broadcast from memory (a load, no arithmetic): left in registers,
            // the compiler broadcast them with shuffles, on the port the products need.
            let wp: *const [[i32; 16]; 8] = std::hint::black_box(&wide);
            let mut sums = [[_mm256_setzero_si256(); P]; G];
            for p in 0..16 {
                let mut xv = [_mm256_setzero_si256(); G];
                for (gg, v) in xv.iter_mut().enumerate() {
                    *v = unsafe {
                        _mm256_loadu_si256(x[gg].q.as_ptr().add(512 * b + 32 * p).cast())
                    };
                }
                for q in 0..P {
                    // SAFETY: `wp` points at `wide`, alive and unchanged.
                    let pair = _mm256_set1_epi32(unsafe { (*wp)[p / 2][2 * (lane0 + q) + p % 2] });
                    for gg in 0..G {
                        sums[gg][q] =
                            _mm256_add_epi32(sums[gg][q], _mm256_madd_epi16(xv[gg], pair));
                    }
                }
            }
            for gg in 0..G {
                let xs = unsafe { _mm256_loadu_ps(x[gg].scales.as_ptr().add(8 * b)) };
                for q in 0..P {
                    let d = _mm256_mul_ps(_mm256_set1_ps(ws[lane0 + q]), xs);
                    acc[gg][q] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sums[gg][q]), acc[gg][q]);
                }
            }
        }
        let mut dots = [[[0f32; 16]; P]; G];
        for (dg, ag) in dots.iter_mut().zip(&acc) {
            for (d, a) in dg.iter_mut().zip(ag) {
                // SAFETY: eight floats.
                unsafe { _mm256_storeu_ps(d.as_mut_ptr(), *a) };
            }
        }
        dots
    }

    /// Most Q8_0 input rows that take the rows form ([`group_rows`]): it spends eight
    /// `vpdpbusd` per block and input row for eight weight rows, where the lanes forms spend
    /// eight per weight row for up to 8 or 16 input rows at once; with AVX2 alone three
    /// operations per four bytes against [`q8x8_lanes_avx2`]'s 32 per block for up to 8 rows
    /// (measured on candle's layout, where at six rows the accumulators no longer fit the
    /// sixteen registers).
    fn row_form_most(dots: Dots) -> usize {
        match dots {
            Dots::Avx2 => 5,
            Dots::Vex | Dots::Evex => 4,
        }
    }

    /// The byte dot product an [`Isa`] gives the Q8_0 and Q4_0 kernels.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum Dots {
        /// AVX2 alone: `maddubs` and `madd`.
        Avx2,
        /// AVX-VNNI (AVX2 CPUs since Alder Lake): `vpdpbusd` on 256-bit registers, VEX
        /// encoded, sixteen registers.
        Vex,
        /// AVX-512 VNNI and VL: `vpdpbusd` on 256- and 512-bit registers, thirty-two of them.
        Evex,
    }

    impl Dots {
        fn of(isa: Isa) -> Dots {
            if isa.vnni() {
                Dots::Evex
            } else if isa.avx_vnni() {
                Dots::Vex
            } else {
                Dots::Avx2
            }
        }
    }

    /// One input row of Q8_0 blocks as [`group_rows`] reads it.
    #[derive(Clone, Copy)]
    struct RowInput<'a> {
        /// `kb` blocks of 32 signed bytes.
        q: &'a [u8],
        /// Per block, what the weights' bias adds to the products, taken back: `-128` times
        /// the sum of its bytes for Q8_0 with `vpdpbusd` (empty without), `-8` times for Q4_0.
        minus: &'a [i32],
        /// The blocks' scales.
        scales: &'a [f32],
    }

    /// Up to `W` (8 or 16) input rows of Q8_0 blocks as [`q8x8_lanes`] (`W` = 8) and
    /// [`q8x8_lanes16`] read them, or up to 8 as [`q8x8_lanes_avx2`] does.
    #[derive(Clone, Copy)]
    struct Lanes<'a> {
        /// With `vpdpbusd`, `kb` blocks of `32 W` bytes: for each four bytes `g` of a block,
        /// the rows' bytes `4g..4g + 4` side by side (row `m` in 32-bit lane `m`), biased to
        /// the unsigned operand (`x + 128`). For [`q8x8_lanes_avx2`], `kb` blocks
        /// of 512 bytes: for each pair of bytes `p`, the rows' bytes `2p, 2p + 1` as two i16,
        /// side by side.
        q: &'a [u8],
        /// The rows' block scales, `W` per block.
        scales: &'a [f32],
    }

    /// `(bytes per block, weights per block)` of `format` where [`dequantize`] reads it on
    /// `isa`.
    pub(super) fn dequantizes(isa: Isa, format: GgmlDType) -> Option<(usize, usize)> {
        if !available(isa) {
            return None;
        }
        match format {
            GgmlDType::Q8_0 => Some((Q8_0_BYTES, 32)),
            GgmlDType::Q4_0 => Some((Q4_0_BYTES, 32)),
            GgmlDType::Q4K if std::mem::size_of::<BlockQ4K>() == Q4K_BYTES => {
                Some((Q4K_BYTES, 256))
            }
            _ => None,
        }
    }

    /// The eight 6-bit scales, then the eight 6-bit mins, of a Q4_K block, one per byte, from
    /// its 12 packed bytes: bytes 0-3 hold scales 0-3 and bytes 4-7 mins 0-3 in their low six
    /// bits, and the top two bits of scales and mins 4-7 in their high two; bytes 8-11 hold the
    /// low four bits of scales 4-7 (low halves) and of mins 4-7 (high halves).
    #[inline]
    fn scales_and_mins(packed: &[u8]) -> [u8; 16] {
        const LOW6: u32 = 0x3f3f_3f3f;
        const LOW4: u32 = 0x0f0f_0f0f;
        const LOW2: u32 = 0x0303_0303;
        let word = |i: usize| {
            u32::from_le_bytes([
                packed[4 * i],
                packed[4 * i + 1],
                packed[4 * i + 2],
                packed[4 * i + 3],
            ])
        };
        let (a, b, c) = (word(0), word(1), word(2));
        let parts = [
            a & LOW6,
            (c & LOW4) | (((a >> 6) & LOW2) << 4),
            b & LOW6,
            ((c >> 4) & LOW4) | (((b >> 6) & LOW2) << 4),
        ];
        let mut out = [0u8; 16];
        for (o, p) in out.chunks_exact_mut(4).zip(parts) {
            o.copy_from_slice(&p.to_le_bytes());
        }
        out
    }

    /// candle's `to_float` for Q8_0, Q4_0 or Q4_K blocks `bytes` into `out`, with the same
    /// operations on each weight (an f32 product, and for Q4_K a difference), eight at a time.
    ///
    /// # Safety
    /// [`dequantizes`] gave `Some` for `format` on this CPU; `bytes` is whole blocks of it and
    /// `out` holds their weights.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dequantize(format: GgmlDType, bytes: &[u8], out: &mut [f32]) {
        /// An f16's bits as f32 (exact).
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn widen(lo: u8, hi: u8) -> f32 {
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(
                u16::from_le_bytes([lo, hi]),
            ))))
        }
        /// The low eight bytes of `q` as f32, times `d`, less `m` when given.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn eight(q: __m128i, d: __m256, m: Option<__m256>, out: &mut [f32]) {
            let f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
            let y = _mm256_mul_ps(d, f);
            let y = match m {
                Some(m) => _mm256_sub_ps(y, m),
                None => y,
            };
            // SAFETY: the callers pass eight floats.
            unsafe { _mm256_storeu_ps(out[..8].as_mut_ptr(), y) };
        }
        let low = _mm_set1_epi8(0x0F);
        match format {
            GgmlDType::Q8_0 => {
                for (b, y) in bytes.chunks_exact(Q8_0_BYTES).zip(out.chunks_exact_mut(32)) {
                    let d = _mm256_set1_ps(widen(b[0], b[1]));
                    for (c, y) in y.chunks_exact_mut(8).enumerate() {
                        // SAFETY: bytes 2 + 8c .. 10 + 8c of the 34-byte block.
                        let q = unsafe { _mm_loadl_epi64(b.as_ptr().add(2 + 8 * c).cast()) };
                        eight(q, d, None, y);
                    }
                }
            }
            GgmlDType::Q4_0 => {
                let eights = _mm_set1_epi8(8);
                for (b, y) in bytes.chunks_exact(Q4_0_BYTES).zip(out.chunks_exact_mut(32)) {
                    let d = _mm256_set1_ps(widen(b[0], b[1]));
                    // SAFETY: bytes 2..18 of the 18-byte block.
                    let packed = unsafe { _mm_loadu_si128(b.as_ptr().add(2).cast()) };
                    // The first 16 weights in the low halves, the last 16 in the high; each
                    // less 8, as an i8.
                    let lo = _mm_sub_epi8(_mm_and_si128(packed, low), eights);
                    let hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(packed, 4), low), eights);
                    let (y0, y1) = y.split_at_mut(16);
                    for (q, y) in [(lo, y0), (hi, y1)] {
                        eight(q, d, None, &mut y[..8]);
                        eight(_mm_srli_si128(q, 8), d, None, &mut y[8..]);
                    }
                }
            }
            GgmlDType::Q4K => {
                for (b, y) in bytes.chunks_exact(Q4K_BYTES).zip(out.chunks_exact_mut(256)) {
                    let (d, dmin) = (widen(b[0], b[1]), widen(b[2], b[3]));
                    let sm = scales_and_mins(&b[4..16]);
                    for (j, y) in y.chunks_exact_mut(64).enumerate() {
                        // Sub-block 2j in the low halves of the 32 bytes, 2j + 1 in the high.
                        for (half, y) in y.chunks_exact_mut(32).enumerate() {
                            let s = 2 * j + half;
                            let dv = _mm256_set1_ps(d * f32::from(sm[s]));
                            let mv = _mm256_set1_ps(dmin * f32::from(sm[8 + s]));
                            for (c, y) in y.chunks_exact_mut(16).enumerate() {
                                let at = 16 + 32 * j + 16 * c;
                                // SAFETY: bytes `at..at + 16` of the 144-byte block.
                                let packed = unsafe { _mm_loadu_si128(b.as_ptr().add(at).cast()) };
                                let q = if half == 0 {
                                    _mm_and_si128(packed, low)
                                } else {
                                    _mm_and_si128(_mm_srli_epi16(packed, 4), low)
                                };
                                eight(q, dv, Some(mv), &mut y[..8]);
                                eight(_mm_srli_si128(q, 8), dv, Some(mv), &mut y[8..]);
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// candle's Q8_0 `to_float` (each byte times its block's scale, in f32) for rows interleaved
    /// by eight ([`super::interleave`]): each four bytes of two rows widened and scaled
    /// at once, then stored to their rows.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `bytes` is whole groups of `kb` interleaved blocks and
    /// `out` their eight rows of `32 kb` floats each.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dequantize_interleaved(bytes: &[u8], kb: usize, out: &mut [f32]) {
        let k = 32 * kb;
        for (group, ys) in bytes
            .chunks_exact(kb * Q8X8_BYTES)
            .zip(out.chunks_exact_mut(8 * k))
        {
            for b in 0..kb {
                // SAFETY (all pointer arithmetic below): block `b` of the group, its scales in
                // its first 16 bytes and its rows' bytes `4g..4g + 4` at `16 + 32g + 4m`; row
                // `m`'s floats `32b + 4g..32b + 4g + 4` of `ys`.
                let at = unsafe { group.as_ptr().add(Q8X8_BYTES * b) };
                let mut ws = [0f32; 8];
                unsafe {
                    _mm256_storeu_ps(ws.as_mut_ptr(), _mm256_cvtph_ps(_mm_loadu_si128(at.cast())))
                };
                for pair in 0..4 {
                    let (m, d) = (2 * pair, 2 * pair + 1);
                    let scale = _mm256_set_m128(_mm_set1_ps(ws[d]), _mm_set1_ps(ws[m]));
                    for g in 0..8 {
                        let q = unsafe { _mm_loadl_epi64(at.add(16 + 32 * g + 8 * pair).cast()) };
                        let y = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), scale);
                        let at_m = m * k + 32 * b + 4 * g;
                        let at_d = d * k + 32 * b + 4 * g;
                        unsafe {
                            _mm_storeu_ps(
                                ys[at_m..at_m + 4].as_mut_ptr(),
                                _mm256_castps256_ps128(y),
                            );
                            _mm_storeu_ps(
                                ys[at_d..at_d + 4].as_mut_ptr(),
                                _mm256_extractf128_ps::<1>(y),
                            );
                        }
                    }
                }
            }
        }
    }

    /// Bytes of a Q4_K block: f16 `d`, f16 `dmin`, 12 bytes of packed 6-bit scales and mins for
    /// its eight sub-blocks of 32, then 128 bytes of nibbles (sub-block `2j` in the low halves of
    /// bytes `32j..32j + 32`, sub-block `2j + 1` in their high halves).
    const Q4K_BYTES: usize = 144;
    /// Bytes of a Q8_K block: f32 `d`, 256 i8, then 16 i16 sums of 16 of them.
    const Q8K_BYTES: usize = 292;
    /// Where a Q8_K block's i16 sums begin.
    const Q8K_SUMS: usize = 260;

    /// Q4_K weights, rows interleaved by eight ([`super::interleave`]), against a Q8_K input:
    /// a group of eight rows at a time against a few input rows ([`q4k_group`] and the others).
    /// The input's scales and sums per sub-block are made once per call.
    pub(super) struct Q4kKernel<'a> {
        weight: &'a [u8],
        /// Blocks per row.
        kb: usize,
        /// The input rows as Q8_K blocks.
        input: Vec<BlockQ8K>,
        /// Each input block's scale.
        input_scales: Vec<f32>,
        /// Each input block's sums per sub-block of 32: its sums of 16 added in pairs, as i16
        /// (as candle's `hadd` pairs them; at most 32 * 128 in magnitude, so no wrapping).
        input_sums: Vec<[i16; 8]>,
        /// The byte dot product the forms use.
        dots: Dots,
        rows: usize,
    }

    /// The Q4_K kernel for `n` rows of width `k` stored as `bytes`, interleaved (rows padded to
    /// a multiple of eight), with the input `x` (`rows` rows of `k`) quantized to Q8_K; `None`
    /// if the CPU lacks the instructions, for candle's layout, or blocks that do not fit.
    pub(super) fn q4k_kernel<'a>(
        isa: Isa,
        interleaved: bool,
        bytes: &'a [u8],
        n: usize,
        k: usize,
        x: &[f32],
        rows: usize,
    ) -> Option<Q4kKernel<'a>> {
        if !available(isa)
            || !interleaved
            || std::mem::size_of::<BlockQ4K>() != Q4K_BYTES
            || std::mem::size_of::<BlockQ8K>() != Q8K_BYTES
            || !k.is_multiple_of(256)
            || x.len() != rows * k
        {
            return None;
        }
        let kb = k / 256;
        if bytes.len() != n.next_multiple_of(8) * kb * Q4K_BYTES {
            return None;
        }
        let mut input = vec![BlockQ8K::zeros(); rows * kb];
        for (xr, qr) in x.chunks_exact(k).zip(input.chunks_exact_mut(kb)) {
            BlockQ8K::from_float(xr, qr);
        }
        let blocks = q8k_bytes(&input);
        let input_scales = blocks
            .chunks_exact(Q8K_BYTES)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let input_sums = blocks
            .chunks_exact(Q8K_BYTES)
            .map(|b| {
                let sum =
                    |i: usize| i16::from_le_bytes([b[Q8K_SUMS + 2 * i], b[Q8K_SUMS + 2 * i + 1]]);
                std::array::from_fn(|s| sum(2 * s).wrapping_add(sum(2 * s + 1)))
            })
            .collect();
        Some(Q4kKernel {
            weight: bytes,
            kb,
            input,
            input_scales,
            input_sums,
            dots: Dots::of(isa),
            rows,
        })
    }

    /// The bytes of Q8_K blocks (292 each, no padding: checked by the caller).
    fn q8k_bytes(blocks: &[BlockQ8K]) -> &[u8] {
        // SAFETY: `BlockQ8K` is `repr(C)` { f32, [i8; 256], [i16; 16] } with no padding (its
        // size, 292, is checked before any is made), so its memory is initialised bytes; the
        // view borrows `blocks`.
        unsafe {
            std::slice::from_raw_parts(blocks.as_ptr().cast::<u8>(), std::mem::size_of_val(blocks))
        }
    }

    /// One input row as [`q4k_group`] reads it.
    #[derive(Clone, Copy)]
    struct Q8kRow<'a> {
        /// `kb` Q8_K blocks.
        q: &'a [u8],
        /// Their scales.
        d: &'a [f32],
        /// Their sums per sub-block of 32 (see [`Q4kKernel`]).
        sums: &'a [[i16; 8]],
    }

    impl BandKernel for Q4kKernel<'_> {
        /// A group of eight rows at a time (`first` and every band start at a group) against
        /// every input row, a few at a time ([`q4k_group`], [`q4k_group_vex`],
        /// [`q4k_group_avx2`]; the group stays in the nearest cache meanwhile).
        fn run(&self, first: usize, out: &mut [f32]) {
            let x = q8k_bytes(&self.input);
            let kb = self.kb;
            let x_row = kb * Q8K_BYTES;
            // What the registers hold: sixteen without AVX-512.
            let most = if self.dots == Dots::Evex { 4 } else { 2 };
            let group_bytes = kb * Q4KX8_BYTES;
            over_groups(
                self.weight,
                group_bytes,
                first,
                self.rows,
                most,
                out,
                |group, r, take, buf| {
                    let input = |d: usize| Q8kRow {
                        q: &x[(r + d) * x_row..(r + d + 1) * x_row],
                        d: &self.input_scales[(r + d) * kb..(r + d + 1) * kb],
                        sums: &self.input_sums[(r + d) * kb..(r + d + 1) * kb],
                    };
                    macro_rules! call {
                        ($f:ident, $n:literal) => {
                            buf[..$n].copy_from_slice(&$f::<$n>(
                                kb,
                                group,
                                std::array::from_fn(input),
                            ))
                        };
                    }
                    // SAFETY: the CPU has AVX2, FMA and F16C (`available`), AVX-512 VNNI and VL at
                    // `Dots::Evex` (`Isa::vnni`), AVX-VNNI at `Dots::Vex` (`Isa::avx_vnni`);
                    // `group` is `kb` interleaved Q4_K blocks of eight rows, and every input row
                    // `kb` Q8_K blocks with `kb` scales and `kb` sums (lengths checked by
                    // `q4k_kernel`).
                    unsafe {
                        by_runs!(
                            self.dots,
                            take,
                            call,
                            q4k_group,
                            q4k_group_vex,
                            q4k_group_avx2
                        )
                    }
                },
            );
        }
    }

    /// Makes `$name`, with `$features`: a group's eight interleaved Q4_K weight rows
    /// ([`super::Q4KX8_BYTES`], one row per lane) dotted with `R` Q8_K input rows. Per four
    /// bytes `g` of the nibbles, one load of the eight rows' bytes, split once for the `R` rows
    /// into the low nibbles (sub-block `2j`, `j = g / 8`) and the high (sub-block `2j + 1`); per
    /// input row and half its four bytes broadcast and one `$dpbusd` (`$vnni`), else `maddubs`
    /// and `madd` (at most `2 * 15 * 128` a pair). Each sub-block's 32 products are summed
    /// exactly, multiplied by its row's 6-bit scale (`vpmulld`) and added, its mins times the
    /// input's sums per sub-block likewise (`madd` on pairs of them), and each block's two i32
    /// totals converted and added by two multiply-adds, `d` and `-dmin` times the input's scale:
    /// a row gets the same bits alone, in any batch and on every instruction set. candle's
    /// order (eight f32 lanes a block) differs from it by float rounding.
    ///
    /// # Safety
    /// The CPU has `$features`; `group` is `kb` interleaved Q4_K blocks of eight rows, each
    /// `x[r]` `kb` Q8_K blocks with `kb` scales and `kb` sums.
    macro_rules! q4k_group_form {
        ($name:ident, $features:literal, $vnni:literal, $dpbusd:ident) => {
            // `r` indexes several arrays of accumulators at once.
            #[allow(clippy::needless_range_loop)]
            #[target_feature(enable = $features)]
            unsafe fn $name<const R: usize>(
                kb: usize,
                group: &[u8],
                x: [Q8kRow; R],
            ) -> [[f32; 8]; R] {
                let low = _mm256_set1_epi8(0x0F);
                let zero = _mm256_setzero_si256();
                let (low6, low4, low2) = (
                    _mm256_set1_epi8(0x3F),
                    _mm256_set1_epi8(0x0F),
                    _mm256_set1_epi8(0x03),
                );
                // Byte `t` of each 32-bit lane, zero-extended (`0x80`: a zero byte).
                let byte: [__m256i; 4] = std::array::from_fn(|t| {
                    let lane = |l: i32| (0x8080_8000_u32 as i32) | (4 * l + t as i32);
                    _mm256_setr_epi32(
                        lane(0),
                        lane(1),
                        lane(2),
                        lane(3),
                        lane(0),
                        lane(1),
                        lane(2),
                        lane(3),
                    )
                });
                // Bytes `2q` and `2q + 1` of each 32-bit lane, as two i16.
                let pair: [__m256i; 2] = std::array::from_fn(|q| {
                    let lane = |l: i32| {
                        let at = 4 * l + 2 * q as i32;
                        at | (0x80 << 8) | ((at + 1) << 16) | (0x80_u32 << 24) as i32
                    };
                    _mm256_setr_epi32(
                        lane(0),
                        lane(1),
                        lane(2),
                        lane(3),
                        lane(0),
                        lane(1),
                        lane(2),
                        lane(3),
                    )
                });
                let mut acc = [_mm256_setzero_ps(); R];
                let base = group.as_ptr();
                for b in 0..kb {
                    // SAFETY (all pointer arithmetic below): block `b < kb` of the group is
                    // `Q4KX8_BYTES` bytes from `Q4KX8_BYTES b` (offsets as
                    // `super::Q4KX8_BYTES` lays them out); input block `b` of each row is
                    // `Q8K_BYTES` bytes, its 256 i8 from 4 on, and its scale and sums are
                    // entry `b`.
                    let at = unsafe { base.add(Q4KX8_BYTES * b) };
                    prefetch_blocks_ahead!(at, Q4KX8_BYTES);
                    let wd = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(at.cast()) });
                    let wm = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(at.add(16).cast()) });
                    // The eight rows' 6-bit scales and mins, row `m` in lane `m` (ggml's
                    // `get_scale_min_k4` on the three words of each): scales 0-3 and 4-7, mins
                    // 0-3 and 4-7, a byte each.
                    let word = |w: usize| unsafe { _mm256_loadu_si256(at.add(32 + 32 * w).cast()) };
                    let (a, bw, c) = (word(0), word(1), word(2));
                    let top = |v: __m256i| {
                        _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(v, 6), low2), 4)
                    };
                    let scales = [
                        _mm256_and_si256(a, low6),
                        _mm256_or_si256(_mm256_and_si256(c, low4), top(a)),
                    ];
                    let mins = [
                        _mm256_and_si256(bw, low6),
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(c, 4), low4), top(bw)),
                    ];
                    let mut sums = [zero; R];
                    for j in 0..4 {
                        let mut lows = [zero; R];
                        let mut highs = [zero; R];
                        for t in 0..8 {
                            let raw = unsafe {
                                _mm256_loadu_si256(at.add(128 + 32 * (8 * j + t)).cast())
                            };
                            let lo = _mm256_and_si256(raw, low);
                            let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
                            for r in 0..R {
                                let xq = unsafe {
                                    x[r].q.as_ptr().add(Q8K_BYTES * b + 4 + 64 * j + 4 * t)
                                };
                                let xl = _mm256_set1_epi32(unsafe {
                                    std::ptr::read_unaligned(xq.cast::<i32>())
                                });
                                let xh = _mm256_set1_epi32(unsafe {
                                    std::ptr::read_unaligned(xq.add(32).cast::<i32>())
                                });
                                lows[r] = byte_dot!($vnni, $dpbusd, lows[r], lo, xl);
                                highs[r] = byte_dot!($vnni, $dpbusd, highs[r], hi, xh);
                            }
                        }
                        let scale = |s: usize| _mm256_shuffle_epi8(scales[s / 4], byte[s % 4]);
                        let (sl, sh) = (scale(2 * j), scale(2 * j + 1));
                        for r in 0..R {
                            let both = _mm256_add_epi32(
                                _mm256_mullo_epi32(lows[r], sl),
                                _mm256_mullo_epi32(highs[r], sh),
                            );
                            sums[r] = _mm256_add_epi32(sums[r], both);
                        }
                    }
                    let mut total = [zero; R];
                    for p in 0..4 {
                        // Mins 2p and 2p + 1 of each row, as two i16.
                        let m = _mm256_shuffle_epi8(mins[p / 2], pair[p % 2]);
                        for r in 0..R {
                            // Sub-blocks 2p and 2p + 1's input sums, as two i16.
                            let two = _mm256_set1_epi32(unsafe {
                                std::ptr::read_unaligned(
                                    x[r].sums[b].as_ptr().add(2 * p).cast::<i32>(),
                                )
                            });
                            total[r] = _mm256_add_epi32(total[r], _mm256_madd_epi16(m, two));
                        }
                    }
                    for r in 0..R {
                        let xd = _mm256_set1_ps(x[r].d[b]);
                        let (d, dm) = (_mm256_mul_ps(wd, xd), _mm256_mul_ps(wm, xd));
                        acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sums[r]), acc[r]);
                        acc[r] = _mm256_fnmadd_ps(dm, _mm256_cvtepi32_ps(total[r]), acc[r]);
                    }
                }
                let mut dots = [[0f32; 8]; R];
                for (d, a) in dots.iter_mut().zip(&acc) {
                    // SAFETY: eight floats.
                    unsafe { _mm256_storeu_ps(d.as_mut_ptr(), *a) };
                }
                dots
            }
        };
    }

    q4k_group_form!(
        q4k_group,
        "avx512f,avx512vnni,avx512vl,avx2,fma,f16c",
        true,
        _mm256_dpbusd_epi32
    );
    q4k_group_form!(
        q4k_group_vex,
        "avxvnni,avx2,fma,f16c",
        true,
        _mm256_dpbusd_avx_epi32
    );
    // (The AVX2 form never takes its `$dpbusd`: `$vnni` is false.)
    q4k_group_form!(
        q4k_group_avx2,
        "avx2,fma,f16c",
        false,
        _mm256_dpbusd_avx_epi32
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::isa::Level;
    use candle_core::quantized::k_quants;

    fn seeded(shape: &[usize], seed: u64) -> Result<Tensor> {
        crate::kernels::testing::uniform(shape, seed, 1.0)
    }

    /// candle's own quantized matmul over the same blocks (its generic path, which never takes
    /// the kernels here): the same products.
    fn candle_matmul<T: GgmlType>(x: &[f32], q: &QTensor, rows: usize) -> Result<Vec<f32>> {
        let (n, k) = q.shape().dims2()?;
        let data = q.data()?;
        let w = blocks::<T>(&data).ok_or_else(|| crate::Error::Input("blocks".into()))?;
        let mut out = vec![0f32; rows * n];
        k_quants::matmul((rows, k, n), x, w, &mut out)?;
        Ok(out)
    }

    /// Q8_0 or Q4_0 with exact block sums, written as the definition: each input row
    /// quantized to Q8_0 blocks as candle does, each block's 32 products summed in i32,
    /// converted, and added in f32 by one multiply-add with the product of the two scales,
    /// block after block.
    fn exact_sums_reference(x: &[f32], q: &QTensor, rows: usize) -> Result<Vec<f32>> {
        let (n, k) = q.shape().dims2()?;
        let kb = k / 32;
        let input = Tensor::from_vec(x[..rows * k].to_vec(), (rows, k), &Device::Cpu)?;
        let input = QTensor::quantize(&input, GgmlDType::Q8_0)?.data()?.to_vec();
        let weight = q.data()?;
        // Block `b` of row `r` as its scale and 32 weights: Q8_0's 34 bytes (an f16 scale, 32
        // i8), or Q4_0's 18 (an f16 scale, then byte `i` holds weight `i` in its low nibble and
        // weight `16 + i` in its high one, each plus 8).
        let block = |bytes: &[u8], size: usize, r: usize, b: usize| {
            let at = (r * kb + b) * size;
            let d = half::f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32();
            let body = &bytes[at + 2..at + size];
            let w: Vec<i32> = if size == 34 {
                body.iter().map(|&v| i32::from(v as i8)).collect()
            } else {
                let low = body.iter().map(|&v| i32::from(v & 15) - 8);
                low.chain(body.iter().map(|&v| i32::from(v >> 4) - 8))
                    .collect()
            };
            (d, w)
        };
        let size = if q.dtype() == GgmlDType::Q4_0 { 18 } else { 34 };
        let mut out = vec![0f32; rows * n];
        for r in 0..rows {
            for j in 0..n {
                let mut acc = 0f32;
                for b in 0..kb {
                    let (wd, wq) = block(&weight, size, j, b);
                    let (xd, xq) = block(&input, 34, r, b);
                    let sum: i32 = wq.iter().zip(&xq).map(|(&a, &c)| a * c).sum();
                    acc = (wd * xd).mul_add(sum as f32, acc);
                }
                out[r * n + j] = acc;
            }
        }
        Ok(out)
    }

    /// A Q4_K block's eight 6-bit scales and eight 6-bit mins from its 12 packed bytes (ggml's
    /// `get_scale_min_k4`).
    fn unpack_scales_mins(q: &[u8]) -> ([u8; 8], [u8; 8]) {
        let mut scales = [0u8; 8];
        let mut mins = [0u8; 8];
        for j in 0..4 {
            scales[j] = q[j] & 63;
            mins[j] = q[j + 4] & 63;
            scales[j + 4] = (q[j + 8] & 15) | ((q[j] >> 6) << 4);
            mins[j + 4] = (q[j + 8] >> 4) | ((q[j + 4] >> 6) << 4);
        }
        (scales, mins)
    }

    /// Q4_K with exact block sums, written as the definition: each input row quantized to
    /// Q8_K blocks as candle does; per block, each sub-block of 32's products of nibble and
    /// input summed in i32 and times its 6-bit scale, its mins times the sub-block's input sum,
    /// the two totals converted and added in f32 by a multiply-add each, `d` then `-dmin`
    /// times the input's scale, block after block.
    fn q4k_exact_reference(x: &[f32], q: &QTensor, rows: usize) -> Result<Vec<f32>> {
        let (n, k) = q.shape().dims2()?;
        let kb = k / 256;
        let input = Tensor::from_vec(x[..rows * k].to_vec(), (rows, k), &Device::Cpu)?;
        let input = QTensor::quantize(&input, GgmlDType::Q8K)?.data()?.to_vec();
        let weight = q.data()?;
        let f16 = |b: &[u8], at: usize| half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
        let mut out = vec![0f32; rows * n];
        for r in 0..rows {
            for j in 0..n {
                let mut acc = 0f32;
                for b in 0..kb {
                    let w = &weight[(j * kb + b) * 144..(j * kb + b + 1) * 144];
                    let xb = &input[(r * kb + b) * 292..(r * kb + b + 1) * 292];
                    let xd = f32::from_le_bytes([xb[0], xb[1], xb[2], xb[3]]);
                    let (scales, mins) = unpack_scales_mins(&w[4..16]);
                    let (mut sums, mut mins_total) = (0i32, 0i32);
                    for sub in 0..8 {
                        let (pair, high) = (sub / 2, sub % 2 == 1);
                        let mut dot = 0i32;
                        let mut xsum = 0i32;
                        for l in 0..32 {
                            let byte = w[16 + 32 * pair + l];
                            let nib = if high { byte >> 4 } else { byte & 15 };
                            let xv = i32::from(xb[4 + 32 * sub + l] as i8);
                            dot += i32::from(nib) * xv;
                            xsum += xv;
                        }
                        sums += i32::from(scales[sub]) * dot;
                        mins_total += i32::from(mins[sub]) * xsum;
                    }
                    acc = (f16(w, 0) * xd).mul_add(sums as f32, acc);
                    acc = (-(f16(w, 2) * xd)).mul_add(mins_total as f32, acc);
                }
                out[r * n + j] = acc;
            }
        }
        Ok(out)
    }

    /// The reference for rows of width `k` of `format`: candle's matmul, or nothing where the
    /// kernel dequantizes rows (candle's dot would assert).
    fn candle_reference(
        format: GgmlDType,
        xs: &[f32],
        q: &QTensor,
        rows: usize,
    ) -> Result<Vec<f32>> {
        let k = q.shape().dims2()?.1;
        match format {
            GgmlDType::Q8_0 => candle_matmul::<BlockQ8_0>(xs, q, rows),
            GgmlDType::Q4_0 => candle_matmul::<BlockQ4_0>(xs, q, rows),
            GgmlDType::Q5_0 if needs_even_blocks(format, k) => Ok(Vec::new()),
            GgmlDType::Q5_0 => candle_matmul::<BlockQ5_0>(xs, q, rows),
            _ => candle_matmul::<BlockQ4K>(xs, q, rows),
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|f| f.to_bits()).collect()
    }

    /// Checks `got` (`rows` rows of the fused pieces' outputs, `held` as the kernels read
    /// them) against candle's matmul and against the dequantized weights times the float input
    /// in f64.
    fn check_against_references(
        format: GgmlDType,
        isa: Isa,
        xs: &[f32],
        pieces: &[Arc<QTensor>],
        held: &[Arc<QWeight>],
        rows: usize,
        got: &[f32],
    ) -> Result<()> {
        let total: usize = pieces.iter().map(|q| q.shape().dims()[0]).sum();
        let mut offset = 0;
        for (q, held) in pieces.iter().zip(held) {
            let (n, k) = q.shape().dims2()?;
            let want = candle_reference(format, xs, q, rows)?;
            // Interleaved rows sum each block exactly: the definition's bits. (Rows in
            // candle's layout take candle's dot products.)
            let exact_sums = isa.level() != Level::Portable && held.interleaved();
            let definition = match (exact_sums, format) {
                (false, _) => Vec::new(),
                (true, GgmlDType::Q4K) => q4k_exact_reference(xs, q, rows)?,
                (true, _) => exact_sums_reference(xs, q, rows)?,
            };
            // The input's own quantization (8 bits per block) is all that separates the kernel
            // from the dequantized product.
            let w: Vec<f32> = q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?;
            for r in 0..rows {
                for j in 0..n {
                    let g = got[r * total + offset + j];
                    let exact: f64 = (0..k)
                        .map(|t| w[j * k + t] as f64 * xs[r * k + t] as f64)
                        .sum();
                    let scale: f64 = (0..k).map(|t| (w[j * k + t] as f64).abs()).sum();
                    if want.is_empty() {
                        assert!((g as f64 - exact).abs() <= 1e-5 * scale + 1e-6);
                        continue;
                    }
                    let c = want[r * n + j];
                    if exact_sums {
                        let e = definition[r * n + j];
                        assert_eq!(
                            g.to_bits(),
                            e.to_bits(),
                            "{isa:?} {format:?} k {k}: {g} {e}"
                        );
                    }
                    if format == GgmlDType::Q4K && !exact_sums {
                        // No tolerance: the same integer sums, converted, scaled and added by
                        // the same f32 operations in the same order as candle's (its own dot
                        // product on the portable path).
                        assert_eq!(
                            g.to_bits(),
                            c.to_bits(),
                            "{isa:?} {format:?} k {k}: {g} {c}"
                        );
                    }
                    assert!(
                        (g - c).abs() <= 1e-5 * (1.0 + c.abs()),
                        "{isa:?} {format:?} k {k}: {g} {c}"
                    );
                    assert!(
                        (g as f64 - exact).abs() <= 0.01 * scale + 1e-6,
                        "{isa:?} {format:?} k {k}: {g} {exact}"
                    );
                }
            }
            offset += n;
        }
        Ok(())
    }

    fn quantized_pieces(
        format: GgmlDType,
        k: usize,
        widths: &[usize],
    ) -> Result<Vec<Arc<QTensor>>> {
        widths
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let w = (seeded(&[n, k], (7 * n + i + k) as u64)? * 0.05)?;
                Ok(Arc::new(QTensor::quantize(&w, format)?))
            })
            .collect()
    }

    /// `pieces` as a layer holds them for the kernels of `isa`: as loaded, and (where that
    /// differs: Q8_0 and Q4_0 pieces of rows divisible by eight, with AVX2) as
    /// [`QWeight::prepared`] lays them out.
    fn forms(pieces: &[Arc<QTensor>], isa: Isa) -> Result<Vec<Vec<Arc<QWeight>>>> {
        let loaded: Vec<_> = pieces
            .iter()
            .map(|q| Arc::new(QWeight::Blocks(q.clone())))
            .collect();
        let prepared = pieces
            .iter()
            .map(|q| QWeight::prepared(q.clone(), isa).map(Arc::new))
            .collect::<Result<Vec<_>>>()?;
        Ok(if prepared.iter().any(|q| q.interleaved()) {
            vec![loaded, prepared]
        } else {
            vec![loaded]
        })
    }

    /// Rows interleaved by eight come back as they were, and a band of them from its start;
    /// other formats and shapes decline.
    #[test]
    fn interleaved_rows_are_the_same_bytes() -> Result<()> {
        for (format, size, k) in [
            (GgmlDType::Q8_0, 34, 96),
            (GgmlDType::Q4_0, 18, 96),
            (GgmlDType::Q4K, 144, 768),
        ] {
            let q = QTensor::quantize(&seeded(&[24, k], 3)?, format)?;
            let bytes = q.data()?;
            let mixed = interleave(format, &bytes, 24, k)
                .ok_or_else(|| crate::Error::Input("24 rows of 3 blocks interleave".into()))?;
            assert_eq!(mixed.len(), bytes.len());
            assert_ne!(mixed[..], bytes[..]);
            let mut back = vec![0u8; bytes.len()];
            assert!(deinterleave(format, &mixed, 3, 0, &mut back));
            assert_eq!(back[..], bytes[..]);
            let mut band = vec![0u8; 5 * 3 * size];
            assert!(deinterleave(format, &mixed, 3, 11, &mut band));
            assert_eq!(band[..], bytes[11 * 3 * size..16 * 3 * size]);
            assert!(!deinterleave(format, &mixed, 3, 20, &mut band));
            assert!(interleave(format, &bytes, 24, 2 * k).is_none());
            assert!(interleave(format, &bytes[1..], 24, k).is_none());
            // Twenty rows: the last group padded with zeros.
            let twenty = &bytes[..20 * 3 * size];
            let padded = interleave(format, twenty, 20, k)
                .ok_or_else(|| crate::Error::Input("20 rows interleave".into()))?;
            assert_eq!(padded.len(), 24 * 3 * size);
            let mut back = vec![0u8; twenty.len()];
            assert!(deinterleave(format, &padded, 3, 0, &mut back));
            assert_eq!(back[..], twenty[..]);
            let mut pad = vec![1u8; 4 * 3 * size];
            assert!(deinterleave(format, &padded, 3, 20, &mut pad));
            assert!(pad.iter().all(|&b| b == 0));
        }
        let q = QTensor::quantize(&seeded(&[8, 256], 3)?, GgmlDType::Q6K)?;
        assert!(interleave(GgmlDType::Q6K, &q.data()?, 8, 256).is_none());
        Ok(())
    }

    /// The tests' reading of Q4_K's packed scales and mins is candle's: a sub-block whose
    /// nibbles are all 1 dequantizes to `d sc - dmin m`.
    #[test]
    fn q4_k_scales_and_mins_unpack_as_candle_reads_them() -> Result<()> {
        // Sub-block `s` of a block whose nibbles are all 1 dequantizes to `d sc_s - dmin m_s`.
        let q = QTensor::quantize(&seeded(&[1, 256], 4)?, GgmlDType::Q4K)?;
        let mut bytes = q.data()?.to_vec();
        bytes[16..144].fill(0x11);
        let (scales, mins) = unpack_scales_mins(&bytes[4..16]);
        let f16 = |at: usize| half::f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32();
        let mut got = vec![0f32; 256];
        assert!(dequantize_into(
            Isa::cpu().at_most(Level::Portable),
            GgmlDType::Q4K,
            false,
            &bytes,
            1,
            256,
            &mut got
        ));
        for s in 0..8 {
            let want = f16(0) * f32::from(scales[s]) - f16(2) * f32::from(mins[s]);
            assert!(
                (got[32 * s + 5] - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "{s}"
            );
        }
        Ok(())
    }

    #[test]
    fn every_instruction_set_equals_candle_and_the_dequantized_product_alone_and_batched(
    ) -> Result<()> {
        for (format, k) in [
            // Widths that are not multiples of 256 (odd numbers of blocks too), and that are.
            (GgmlDType::Q8_0, 96),
            (GgmlDType::Q8_0, 2080),
            (GgmlDType::Q8_0, 512),
            (GgmlDType::Q4_0, 32),
            (GgmlDType::Q4_0, 320),
            (GgmlDType::Q4_0, 2560),
            (GgmlDType::Q5_0, 64),
            // An odd number of blocks: dequantized rows (candle's dot would assert).
            (GgmlDType::Q5_0, 96),
            // One to eight blocks of 256 per row (768: the bench shape's three).
            (GgmlDType::Q4K, 256),
            (GgmlDType::Q4K, 512),
            (GgmlDType::Q4K, 768),
            (GgmlDType::Q4K, 2048),
        ] {
            // Three pieces fused: widths that are not multiples of the four rows a kernel takes
            // at a time, and one of eight-row groups (interleaved with `vpdpbusd`).
            let pieces = quantized_pieces(format, k, &[37, 16, 6])?;
            let x = seeded(&[9, k], (k + 3) as u64)?;
            let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
            // By layout: candle's, and interleaved (Q4_0's sums differ between them).
            let mut simd_outputs = [Vec::new(), Vec::new()];
            for isa in Isa::supported() {
                for (layout, held) in forms(&pieces, isa)?.into_iter().enumerate() {
                    let run = |x: &Tensor| -> Result<Vec<f32>> {
                        let y = qgemv_with(isa, x, &held)?
                            .ok_or_else(|| crate::Error::Input("the kernel must apply".into()))?;
                        assert_eq!(y.dims(), &[x.dims()[0], 59]);
                        Ok(y.flatten_all()?.to_vec1()?)
                    };
                    let alone = (0..9)
                        .map(|r| run(&x.narrow(0, r, 1)?))
                        .collect::<Result<Vec<_>>>()?;
                    // One to nine input rows: every row gets its bits alone.
                    for rows in 1..=9 {
                        let got = run(&x.narrow(0, 0, rows)?)?;
                        for (r, alone) in alone.iter().enumerate().take(rows) {
                            let mine = &got[r * 59..(r + 1) * 59];
                            assert_eq!(bits(mine), bits(alone), "{isa:?} {format:?} {rows} rows");
                        }
                    }
                    let all = alone.concat();
                    check_against_references(format, isa, &xs, &pieces, &held, 9, &all)?;
                    if isa.level() != Level::Portable {
                        simd_outputs[layout].push(bits(&all));
                    }
                }
            }
            // AVX2 and AVX-512 (with or without VNNI) sum the same i32 lanes exactly (Q8_0 and
            // interleaved Q4_0: whole blocks), then scale and add them alike: the same bits.
            for outputs in &simd_outputs {
                assert!(outputs.windows(2).all(|p| p[0] == p[1]), "{format:?} k {k}");
            }
        }
        Ok(())
    }

    /// Q8_0 and Q4_0 batches past one group of 16 lanes (and up to the 64 rows a decode step
    /// takes): every row gets its bits alone, and on every instruction set its reference's.
    #[test]
    fn batches_of_many_groups_give_each_row_its_bits_alone() -> Result<()> {
        for (format, width, k) in [
            (GgmlDType::Q8_0, 21, 288),
            (GgmlDType::Q8_0, 24, 288),
            (GgmlDType::Q4_0, 24, 288),
            (GgmlDType::Q4K, 24, 512),
        ] {
            let pieces = quantized_pieces(format, k, &[width])?;
            let x = seeded(&[64, k], 5)?;
            let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
            for isa in Isa::supported() {
                for held in forms(&pieces, isa)? {
                    let run = |x: &Tensor| -> Result<Vec<f32>> {
                        let y = qgemv_with(isa, x, &held)?
                            .ok_or_else(|| crate::Error::Input("the kernel must apply".into()))?;
                        Ok(y.flatten_all()?.to_vec1()?)
                    };
                    let all = run(&x)?;
                    for rows in [17, 33, 64] {
                        let got = run(&x.narrow(0, 0, rows)?)?;
                        assert_eq!(bits(&got), bits(&all[..rows * width]), "{isa:?} {rows}");
                    }
                    for r in [0, 15, 16, 40, 63] {
                        let alone = run(&x.narrow(0, r, 1)?)?;
                        assert_eq!(
                            bits(&alone),
                            bits(&all[r * width..(r + 1) * width]),
                            "{isa:?} row {r}"
                        );
                    }
                    check_against_references(format, isa, &xs, &pieces, &held, 64, &all)?;
                }
            }
        }
        Ok(())
    }

    #[test]
    fn many_bands_over_the_threads_equal_candle() -> Result<()> {
        // Widths of many bands (and not a multiple of four rows), one and three input rows.
        for (format, k) in [
            (GgmlDType::Q8_0, 256),
            (GgmlDType::Q4_0, 256),
            (GgmlDType::Q4K, 256),
        ] {
            let pieces = quantized_pieces(format, k, &[4097, 4096, 3])?;
            for isa in Isa::supported() {
                for held in forms(&pieces, isa)? {
                    for rows in [1, 3] {
                        let x = seeded(&[rows, k], rows as u64)?;
                        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
                        let y = qgemv_with(isa, &x, &held)?
                            .ok_or_else(|| crate::Error::Input("the kernel must apply".into()))?;
                        let got: Vec<f32> = y.flatten_all()?.to_vec1()?;
                        check_against_references(format, isa, &xs, &pieces, &held, rows, &got)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// A fixed amount of decode work for timing whole processes, old binary against new:
    /// `cargo test --release --lib decode_projection_throughput -- --ignored --nocapture`
    /// (`YOCO_CPU_ISA` picks the kernels, `YOCO_BENCH_FORMAT=q4_0` one format,
    /// `YOCO_BENCH_ROWS=16` a step of 16 sequences). Prints GB/s of weights read and the time
    /// per block and input row.
    #[test]
    #[ignore]
    fn decode_projection_throughput() -> Result<()> {
        let var = |name: &str, default: usize| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        // Rows, copies cycled through (1 GB by default: from memory) and calls.
        let (k, n) = (2560, var("YOCO_BENCH_N", 10240));
        let (copies, calls) = (var("YOCO_BENCH_COPIES", 40), var("YOCO_BENCH_CALLS", 300));
        let only = std::env::var("YOCO_BENCH_FORMAT").unwrap_or_default();
        for (name, format) in [
            ("q8_0", GgmlDType::Q8_0),
            ("q4_0", GgmlDType::Q4_0),
            ("q4_k", GgmlDType::Q4K),
        ] {
            if !only.is_empty() && only != name {
                continue;
            }
            let q = quantized_pieces(format, k, &[256])?.remove(0);
            let src = q.data()?;
            let copies = (0..copies)
                .map(|_| {
                    let mut bytes = Vec::with_capacity(src.len() * n / 256);
                    for _ in 0..n / 256 {
                        bytes.extend_from_slice(&src);
                    }
                    let storage = candle_core::quantized::QStorage::from_data(
                        std::borrow::Cow::Owned(bytes),
                        &Device::Cpu,
                        format,
                    )?;
                    let q = Arc::new(QTensor::new(storage, (n, k))?);
                    Ok(Arc::new(QWeight::prepared(q, Isa::active())?))
                })
                .collect::<Result<Vec<_>>>()?;
            // A decode step of `rows` sequences.
            let rows = var("YOCO_BENCH_ROWS", 1);
            let x = seeded(&[rows, 1, k], 1)?;
            let t0 = std::time::Instant::now();
            for c in 0..calls {
                qgemv_cpu(&x, std::slice::from_ref(&copies[c % copies.len()]))?;
            }
            let secs = t0.elapsed().as_secs_f64();
            let bytes = src.len() * n / 256 * calls;
            println!(
                "{format:?} {:?}, {rows} rows: {:.2} GB/s of weights, {:.2} ns per block and row",
                Isa::active(),
                bytes as f64 / secs / 1e9,
                secs * 1e9 / (calls * rows * n * k / format.block_size()) as f64
            );
        }
        Ok(())
    }

    /// A prompt chunk of Q8_0 or Q4_0 weights interleaved, with `vpdpbusd`, goes through the
    /// decode kernel: every row gets the bits it gets alone in a decode step, the definition's
    /// (exact block sums), whatever the chunk's length.
    #[test]
    fn a_prompt_chunk_of_interleaved_weights_gets_the_bits_of_a_decode_step() -> Result<()> {
        for (format, k) in [
            (GgmlDType::Q8_0, 320),
            (GgmlDType::Q4_0, 320),
            (GgmlDType::Q4K, 512),
        ] {
            a_prompt_chunk_gets_the_bits_of_a_decode_step(format, k)?;
        }
        Ok(())
    }

    fn a_prompt_chunk_gets_the_bits_of_a_decode_step(format: GgmlDType, k: usize) -> Result<()> {
        let isa = Isa::active();
        let m = 70;
        let pieces = quantized_pieces(format, k, &[48, 16])?;
        let held = pieces
            .iter()
            .map(|q| QWeight::prepared(q.clone(), isa).map(Arc::new))
            .collect::<Result<Vec<_>>>()?;
        if !held.iter().all(|q| q.interleaved()) || !integer_prompts(isa) {
            // No `vpdpbusd` here: prompts dequantize (the test above).
            return Ok(());
        }
        let x = seeded(&[m, k], 9)?;
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let got = prefill_product_cpu(&xs, m, &held)?
            .ok_or_else(|| crate::Error::Input("the interleaved chunk declined".into()))?;
        for r in [0, 1, 15, 16, 17, 69] {
            let alone = qgemv_with(isa, &x.narrow(0, r, 1)?, &held)?
                .ok_or_else(|| crate::Error::Input("the kernel must apply".into()))?;
            let alone: Vec<f32> = alone.flatten_all()?.to_vec1()?;
            assert_eq!(bits(&got[r * 64..(r + 1) * 64]), bits(&alone), "row {r}");
        }
        let shorter = prefill_product_cpu(&xs[..33 * k], 33, &held)?
            .ok_or_else(|| crate::Error::Input("the interleaved chunk declined".into()))?;
        assert_eq!(bits(&shorter), bits(&got[..33 * 64]));
        check_against_references(format, isa, &xs, &pieces, &held, m, &got)
    }

    /// The input's Q8_0 blocks are candle's `from_float`'s, byte for byte: values that round
    /// half away from zero, blocks of zeros, tiny values whose inverse scale overflows, and
    /// non-finite values.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_inputs_q8_0_blocks_equal_candles() -> Result<()> {
        use candle_core::quantized::k_quants::BlockQ8_0;
        if Isa::cpu().level() < crate::kernels::isa::Level::Avx2 {
            return Ok(());
        }
        let mut xs: Vec<f32> = seeded(&[1, 32 * 64], 5)?.flatten_all()?.to_vec1()?;
        // Block 1: the largest is 127, so the others are their own scaled values: halves.
        for (i, x) in xs[32..64].iter_mut().enumerate() {
            *x = if i == 0 { 127.0 } else { i as f32 - 15.5 };
        }
        xs[64..96].fill(0.0);
        xs[96..128].iter_mut().for_each(|x| *x *= 1e-38);
        xs[128] = f32::NAN;
        xs[160] = f32::INFINITY;
        xs[192] = f32::NEG_INFINITY;
        xs[200] = -0.0;
        let mut want = vec![BlockQ8_0::zeros(); 64];
        BlockQ8_0::from_float(&xs, &mut want);
        let mut got = vec![BlockQ8_0::zeros(); 64];
        x86::quantize_q8_0(&xs, &mut got);
        for (b, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(format!("{g:?}"), format!("{w:?}"), "block {b}");
        }
        Ok(())
    }

    /// The weights a prompt chunk multiplies are candle's `to_float`'s, bit for bit, on every
    /// instruction set (the vectorised forms of Q8_0, Q4_0 and Q4_K, candle's for the rest),
    /// over rows that span several of the parallel bands; blocks of the wrong length decline.
    #[test]
    fn dequantized_rows_equal_candles_on_every_instruction_set() -> Result<()> {
        for (format, n, k) in [
            (GgmlDType::Q8_0, 104, 32 * 70),
            (GgmlDType::Q4_0, 88, 32 * 75),
            (GgmlDType::Q4K, 80, 256 * 9),
            (GgmlDType::Q6K, 3, 256),
        ] {
            let q = QTensor::quantize(&seeded(&[n, k], k as u64)?, format)?;
            let want: Vec<f32> = q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?;
            let data = q.data()?;
            for isa in Isa::supported() {
                let mut got = vec![f32::NAN; n * k];
                assert!(dequantize_into(isa, format, false, &data, n, k, &mut got));
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{format:?} on {isa:?}");
                assert!(!dequantize_into(
                    isa,
                    format,
                    false,
                    &data[1..],
                    n,
                    k,
                    &mut got
                ));
                // Rows interleaved by eight, as the kernels with AVX2 hold Q8_0 and Q4_0.
                if let Some(mixed) = interleave(format, &data, n, k) {
                    let mut got = vec![f32::NAN; n * k];
                    assert!(dequantize_into(isa, format, true, &mixed, n, k, &mut got));
                    assert!(got == want, "interleaved on {isa:?}");
                }
            }
        }
        Ok(())
    }

    /// A prompt chunk's product gives what dequantizing the whole weight and calling candle's
    /// matmul gives, bit for bit, for every format, whatever the buffer the thread reuses held
    /// before (a larger weight, then a smaller one, then one of another width); fused pieces
    /// (of different formats) give the product with their dequantized rows stacked.
    #[test]
    fn the_prefill_product_equals_dequantizing_and_matmul() -> Result<()> {
        type Pieces<'a> = &'a [(GgmlDType, usize)];
        let cases: [(Pieces, usize, usize); 6] = [
            (&[(GgmlDType::Q8_0, 300)], 96, 17),
            (&[(GgmlDType::Q4_0, 40)], 64, 130),
            (&[(GgmlDType::Q4K, 70)], 512, 9),
            (&[(GgmlDType::Q5_0, 33)], 160, 64),
            (&[(GgmlDType::Q6K, 12)], 256, 1),
            (
                &[
                    (GgmlDType::Q8_0, 24),
                    (GgmlDType::Q4K, 9),
                    (GgmlDType::Q8_0, 5),
                ],
                256,
                33,
            ),
        ];
        for (pieces, k, m) in cases {
            let qs = pieces
                .iter()
                .enumerate()
                .map(|(i, &(format, n))| {
                    Ok(Arc::new(QTensor::quantize(
                        &seeded(&[n, k], (k + i) as u64)?,
                        format,
                    )?))
                })
                .collect::<Result<Vec<_>>>()?;
            let x = seeded(&[m, k], 7)?;
            let stacked = qs
                .iter()
                .map(|q| Ok(q.dequantize(&Device::Cpu)?))
                .collect::<Result<Vec<_>>>()?;
            let want = x.matmul(&Tensor::cat(&stacked, 0)?.t()?)?;
            let want: Vec<f32> = want.flatten_all()?.to_vec1()?;
            let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
            for held in forms(&qs, Isa::active())? {
                if held.iter().all(|q| q.interleaved()) && integer_prompts(Isa::active()) {
                    // The decode kernel's product (the test above).
                    continue;
                }
                let got = prefill_product_cpu(&xs, m, &held)?
                    .ok_or_else(|| crate::Error::Input(format!("{pieces:?} declined")))?;
                assert!(got == want, "{pieces:?} x {k}, {m} rows");
            }
        }
        let q = Arc::new(QWeight::Blocks(Arc::new(QTensor::quantize(
            &seeded(&[4, 32], 1)?,
            GgmlDType::Q8_0,
        )?)));
        assert!(prefill_product_cpu(&[0.0; 5], 1, std::slice::from_ref(&q)).is_err());
        // Pieces of different input widths are not one weight.
        let other = Arc::new(QWeight::Blocks(Arc::new(QTensor::quantize(
            &seeded(&[4, 64], 1)?,
            GgmlDType::Q8_0,
        )?)));
        assert!(prefill_product_cpu(&[0.0; 64], 1, &[q, other])?.is_none());
        Ok(())
    }

    #[test]
    fn other_cases_decline() -> Result<()> {
        let q = Arc::new(QTensor::quantize(&seeded(&[8, 64], 1)?, GgmlDType::Q8_0)?);
        let q = Arc::new(QWeight::prepared(q, Isa::active())?);
        // Too many rows, the wrong width, another dtype: the caller's general path.
        // A decode step of many sequences takes the kernel; a prompt chunk of as many rows
        // does not.
        let step = seeded(&[GEMV_MAX_ROWS, 1, 64], 2)?;
        assert!(qgemv_cpu(&step, std::slice::from_ref(&q))?.is_some());
        let too_many = seeded(&[GEMV_MAX_ROWS + 1, 1, 64], 2)?;
        assert!(qgemv_cpu(&too_many, std::slice::from_ref(&q))?.is_none());
        let prompt = seeded(&[1, PROMPT_MAX_ROWS + 1, 64], 2)?;
        assert!(qgemv_cpu(&prompt, std::slice::from_ref(&q))?.is_none());
        assert!(qgemv_cpu(&seeded(&[1, 32], 2)?, std::slice::from_ref(&q))?.is_none());
        let half = seeded(&[1, 64], 2)?.to_dtype(DType::F16)?;
        assert!(qgemv_cpu(&half, &[q])?.is_none());
        // The Q4_K kernel: taken for interleaved rows wherever the CPU has its instructions,
        // and declined for candle's layout and for blocks or inputs that do not fit (the
        // caller then takes candle's dot products).
        #[cfg(target_arch = "x86_64")]
        {
            let q = QTensor::quantize(&seeded(&[6, 512], 3)?, GgmlDType::Q4K)?;
            let bytes = q.data()?;
            let mixed = interleave(GgmlDType::Q4K, &bytes, 6, 512)
                .ok_or_else(|| crate::Error::Input("6 rows interleave".into()))?;
            let x: Vec<f32> = seeded(&[2, 512], 4)?.flatten_all()?.to_vec1()?;
            let cpu = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            let isa = Isa::cpu();
            let kernel = |isa, mixed, bytes: &[u8], n, k, x: &[f32], rows| {
                x86::q4k_kernel(isa, mixed, bytes, n, k, x, rows).is_some()
            };
            assert_eq!(kernel(isa, true, &mixed, 6, 512, &x, 2), cpu);
            assert!(!kernel(isa, false, &bytes, 6, 512, &x, 2));
            let portable = isa.at_most(crate::kernels::isa::Level::Portable);
            assert!(!kernel(portable, true, &mixed, 6, 512, &x, 2));
            assert!(!kernel(isa, true, &mixed, 9, 512, &x, 2));
            assert!(!kernel(isa, true, &mixed, 8, 384, &x[..768], 2));
            assert!(!kernel(isa, true, &mixed, 6, 512, &x[..500], 1));
            assert!(!kernel(isa, true, &mixed[1..], 6, 512, &x, 2));
        }
        Ok(())
    }
}
