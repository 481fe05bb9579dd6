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
//! Q4_K 21-22 -> 23-27 (from the cache 27 -> 44).
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

use std::mem::MaybeUninit;
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

/// Whether prompt chunks of interleaved weights of `format` take the decode kernel on `isa`
/// (see [`prefill_product_cpu`]).
fn integer_prompts(isa: Isa, format: GgmlDType) -> bool {
    #[cfg(target_arch = "x86_64")]
    return x86::integer_prompts(isa, format);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, format);
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
    if rows == 1 {
        let mut out = vec![0f32; total];
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
        return Ok(Some(out));
    }
    // Each band's columns of every output row: a band fills its feature-major buffer (in
    // its core's cache, reused from band to band) and puts it in place itself. One thread
    // reordering the whole product afterwards, a scattered store per value, took 3% of a
    // 16-row decode step; so did zeroing the output on one thread first, whose lines the
    // other threads' stores then had to take from that core's cache.
    let mut out: Vec<f32> = Vec::with_capacity(total * rows);
    let Some(slots) = out.spare_capacity_mut().get_mut(..total * rows) else {
        return Ok(None);
    };
    let mut segments: Vec<Vec<&mut [MaybeUninit<f32>]>> =
        spans.iter().map(|_| Vec::with_capacity(rows)).collect();
    for row in slots.chunks_mut(total) {
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
            BY_FEATURE.with_borrow_mut(|by_feature| {
                by_feature.resize(len * rows, 0.0);
                let by_feature = &mut by_feature[..len * rows];
                kernel.run(first, by_feature);
                for (r, seg) in segs.iter_mut().enumerate() {
                    let column = by_feature.iter().skip(r).step_by(rows);
                    for (y, &x) in seg.iter_mut().zip(column) {
                        y.write(x);
                    }
                }
            })
        });
    // SAFETY: the spans cover each piece's rows once, so the segments (each row's `len`
    // slots per span, `total` in all) cover the first `total * rows` slots, every one of
    // which the bands wrote above.
    unsafe { out.set_len(total * rows) };
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
    /// A band's feature-major products in [`qgemv_rows`] (every value written by the kernel
    /// before it is read), kept for the thread's next band.
    static BY_FEATURE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
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
    // Interleaved rows: the chunk through the decode kernel (with `vpdpbusd`, Q8_0 2.7x the
    // dequantized gemm's speed at 512 rows of 2560 x 10240); each row then gets the bits a
    // decode step gives it.
    let isa = Isa::active();
    if pieces
        .iter()
        .all(|q| q.interleaved() && integer_prompts(isa, q.dtype()))
    {
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

mod from_float;
pub(crate) use from_float::quantize_q4k;

#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
mod tests;
