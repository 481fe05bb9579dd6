//! Building blocks both families use: projections (with or without bias, fused, float or
//! quantized), RMSNorm and LayerNorm, SwiGLU, RoPE, token embeddings, softmax attention, the K/V
//! buffers (the windows' and the one global K/V), constants built once, where layers read their
//! weights, and YOCO's pre-norm residual block.

pub(crate) mod attention;
pub(crate) mod constants;
pub(crate) mod embedding;
pub(crate) mod ffn;
pub(crate) mod global_kv;
pub(crate) mod kv_buffer;
pub(crate) mod linear;
pub(crate) mod norm;
pub(crate) mod rope;
pub(crate) mod window_kv;

use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::Arc;

use candle_core::quantized::k_quants::GgmlType;
use candle_core::quantized::{GgmlDType, QStorage, QTensor, QuantizedType};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::checkpoint::catalogue::{BlockSpec, Group, LinearSpec, Parameter};
use crate::checkpoint::gguf::GgufFile;
use crate::checkpoint::Bands;
use crate::kernels::fused::Op;
use crate::kernels::isa::Isa;
use crate::quant::{Quant, WeightFormat, WeightInfo};
use crate::{Error, Result};
use ffn::SwiGlu;
use linear::Linear;
use norm::RmsNorm;

/// Where the layers read their weights from, and how they are built.
pub(crate) struct Weights<'a> {
    vb: VarBuilder<'a>,
    /// A GGUF file's quantized tensors, read as stored (its float tensors come through `vb`).
    gguf: Option<Arc<GgufFile>>,
    /// Quantize float projections to this format (or its fallback) as they load.
    quant: Option<Quant>,
    /// The float weights by bands of rows (safetensors read as the model loads), so that a
    /// weight quantized at load is read and quantized a band at a time.
    bands: Option<Bands>,
    /// May layers use the CPU-only kernels (decode projections and attention over raw slices)
    /// where the device is the CPU? When false, every layer runs only the portable tensor ops that
    /// every device has: the path CUDA takes, testable on a CPU.
    pub(crate) native_kernels: bool,
    /// Every tensor handed out so far, with the format it got.
    loaded: RefCell<Vec<WeightInfo>>,
}

/// A projection's pieces as [`Weights::linear`] gives them.
pub(crate) enum LinearWeights {
    /// Float `(out_i, in)` in the model's dtype, on its device.
    Float(Vec<Tensor>),
    /// Quantized `(out_i, in)` on the model's device.
    Quantized(Vec<Arc<QTensor>>),
}

impl<'a> Weights<'a> {
    pub(crate) fn new(vb: VarBuilder<'a>, native_kernels: bool) -> Self {
        Weights {
            vb,
            gguf: None,
            quant: None,
            bands: None,
            native_kernels,
            loaded: RefCell::new(Vec::new()),
        }
    }

    /// Quantize float projections to `quant` as they load (`None`: keep them float).
    pub(crate) fn quantized(self, quant: Option<Quant>) -> Self {
        Weights { quant, ..self }
    }

    /// Read the weights to quantize at load from `bands` a band of rows at a time.
    pub(crate) fn with_bands(self, bands: Option<Bands>) -> Self {
        Weights { bands, ..self }
    }

    /// Read the quantized tensors of this GGUF file as they are stored.
    pub(crate) fn with_gguf(self, gguf: Arc<GgufFile>) -> Self {
        Weights {
            gguf: Some(gguf),
            ..self
        }
    }

    /// The tensor of parameter `p`, checked against its shape, in the model's dtype and device.
    pub(crate) fn get(&self, p: &Parameter) -> Result<Tensor> {
        let t = self.vb.get(p.shape.as_slice(), &p.name)?;
        let bytes = t.elem_count() * t.dtype().size_in_bytes();
        self.record(p, WeightFormat::Float(t.dtype()), bytes);
        Ok(t)
    }

    /// The tensor of parameter `p` in f32 whatever the model's dtype: parameters whose precision
    /// the reference keeps (Mamba's `A_log` and `D`, differential attention's lambdas).
    pub(crate) fn get_f32(&self, p: &Parameter) -> Result<Tensor> {
        let t = self.vb.get_with_hints_dtype(
            p.shape.as_slice(),
            &p.name,
            candle_nn::Init::Const(0.),
            DType::F32,
        )?;
        self.record(p, WeightFormat::Float(DType::F32), t.elem_count() * 4);
        Ok(t)
    }

    /// The pieces of a projection: quantized as a GGUF file stores them, quantized now (each
    /// piece read alone in f32 on the CPU, quantized, then dropped, so that the float weights are
    /// never all held at once), or float.
    pub(crate) fn linear(&self, spec: &LinearSpec) -> Result<LinearWeights> {
        if let Some(gguf) = &self.gguf {
            let stored: Vec<_> = spec.iter().map(|p| gguf.quantized(&p.name)).collect();
            if stored.iter().any(Option::is_some) {
                if let Some((p, _)) = spec.iter().zip(&stored).find(|(_, s)| s.is_none()) {
                    return Err(Error::Checkpoint(format!(
                        "`{}` is stored in float but the projections fused with it are \
                         quantized; a fused projection must be all float or all quantized",
                        p.name
                    )));
                }
                let pieces = spec
                    .iter()
                    .map(|p| {
                        let q = gguf.read_quantized(&p.name, self.device())?;
                        self.record(
                            p,
                            WeightFormat::Quantized(q.dtype()),
                            q.storage_size_in_bytes(),
                        );
                        Ok(Arc::new(q))
                    })
                    .collect::<Result<Vec<_>>>()?;
                return Ok(LinearWeights::Quantized(pieces));
            }
        }
        let width = spec.first().and_then(|p| p.shape.get(1)).copied();
        let format = self.quant.zip(width).and_then(|(q, k)| q.format_for(k));
        let Some(format) = format else {
            let pieces = spec.iter().map(|p| self.get(p)).collect::<Result<_>>()?;
            return Ok(LinearWeights::Float(pieces));
        };
        let f32_cpu = self
            .vb
            .clone()
            .set_device(Device::Cpu)
            .set_dtype(DType::F32);
        let pieces = spec
            .iter()
            .map(|p| {
                let q = match (&self.bands, p.shape.as_slice()) {
                    (Some(bands), &[n, k]) => {
                        // About 64 MB of f32 at a time.
                        let band = (FLOATS_PER_BAND / k.max(1)).clamp(1, n.max(1));
                        let read = |start: usize, rows: usize| {
                            let rows = bands.rows_f32(&p.name, start, rows)?;
                            rows.map(Cow::Owned).ok_or_else(|| {
                                Error::Checkpoint(format!("cannot read rows of `{}`", p.name))
                            })
                        };
                        quantize_bands(n, k, band, format, &read)?
                    }
                    _ => quantize_cpu(&f32_cpu.get(p.shape.as_slice(), &p.name)?, format)?,
                };
                let q = to_device(q, self.device())?;
                self.record(
                    p,
                    WeightFormat::Quantized(format),
                    q.storage_size_in_bytes(),
                );
                Ok(Arc::new(q))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(LinearWeights::Quantized(pieces))
    }

    /// Are float projections quantized as they load?
    pub(crate) fn quantizes(&self) -> bool {
        self.quant.is_some()
    }

    /// Every tensor of `groups` as GGUF stores it: plain parameters in f32, projections as
    /// [`Weights::linear`] gives them (quantized, or f32), each read, converted and kept in turn.
    pub(crate) fn gguf_tensors(&self, groups: &[Group]) -> Result<Vec<(String, Arc<QTensor>)>> {
        let float = |t: &Tensor| QTensor::quantize(&t.to_dtype(DType::F32)?, GgmlDType::F32);
        let mut out: Vec<(String, Arc<QTensor>)> = Vec::new();
        for group in groups {
            match group {
                Group::Plain(p) => out.push((p.name.clone(), float(&self.get(p)?)?.into())),
                Group::Linear(spec) => match self.linear(spec)? {
                    LinearWeights::Float(pieces) => {
                        for (p, t) in spec.iter().zip(&pieces) {
                            out.push((p.name.clone(), float(t)?.into()));
                        }
                    }
                    LinearWeights::Quantized(pieces) => {
                        for (p, q) in spec.iter().zip(pieces) {
                            out.push((p.name.clone(), q));
                        }
                    }
                },
            }
        }
        Ok(out)
    }

    /// The model's device.
    pub(crate) fn device(&self) -> &candle_core::Device {
        self.vb.device()
    }

    /// The model's dtype.
    pub(crate) fn dtype(&self) -> candle_core::DType {
        self.vb.dtype()
    }

    /// What every tensor handed out so far got, in the order they were loaded.
    pub(crate) fn take_loaded(&self) -> Vec<WeightInfo> {
        self.loaded.take()
    }

    fn record(&self, p: &Parameter, format: WeightFormat, bytes: usize) {
        self.loaded.borrow_mut().push(WeightInfo {
            name: p.name.clone(),
            shape: p.shape.clone(),
            part: p.part,
            format,
            bytes,
        });
    }
}

/// Floats read at a time when a weight is quantized by bands (64 MB of f32).
const FLOATS_PER_BAND: usize = 16 << 20;

/// A float weight `(out, in)` quantized to `format` on the CPU: the same bytes for the same
/// floats wherever the model runs (quantize-at-load and the GGUF writer both come here). Rows
/// are quantized in parallel (every block is quantized on its own, so the bytes are candle's
/// `QTensor::quantize`'s).
fn quantize_cpu(t: &Tensor, format: GgmlDType) -> Result<QTensor> {
    let (n, k) = t.dims2()?;
    let t = t
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Err(Error::Config(
            "a weight on the CPU is not in CPU memory".into(),
        ));
    };
    let data = crate::kernels::gemv::slice(cpu.as_slice::<f32>()?, layout.start_offset(), n * k)?;
    // One band: the whole weight is already in memory.
    let read = |start: usize, rows: usize| Ok(Cow::Borrowed(&data[start * k..(start + rows) * k]));
    quantize_bands(n, k, n.max(1), format, &read)
}

/// An `(n, k)` weight quantized to `format` on the CPU from bands of `band` rows that `read`
/// gives in f32 (`read(start, rows)`): only one band of floats is held at a time.
fn quantize_bands<'a>(
    n: usize,
    k: usize,
    band: usize,
    format: GgmlDType,
    read: &dyn Fn(usize, usize) -> Result<Cow<'a, [f32]>>,
) -> Result<QTensor> {
    use candle_core::quantized::k_quants::{
        BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1,
        BlockQ6K, BlockQ8_0,
    };
    let blocks = match format {
        GgmlDType::Q4_0 => quantize_rows::<BlockQ4_0>(n, k, band, read, &BlockQ4_0::from_float)?,
        GgmlDType::Q4_1 => quantize_rows::<BlockQ4_1>(n, k, band, read, &BlockQ4_1::from_float)?,
        GgmlDType::Q5_0 => quantize_rows::<BlockQ5_0>(n, k, band, read, &BlockQ5_0::from_float)?,
        GgmlDType::Q5_1 => quantize_rows::<BlockQ5_1>(n, k, band, read, &BlockQ5_1::from_float)?,
        GgmlDType::Q8_0 => quantize_rows::<BlockQ8_0>(n, k, band, read, &BlockQ8_0::from_float)?,
        GgmlDType::Q2K => quantize_rows::<BlockQ2K>(n, k, band, read, &BlockQ2K::from_float)?,
        GgmlDType::Q3K => quantize_rows::<BlockQ3K>(n, k, band, read, &BlockQ3K::from_float)?,
        GgmlDType::Q4K => quantize_rows::<BlockQ4K>(n, k, band, read, &|x, b| {
            crate::kernels::quantized::quantize_q4k(Isa::active(), x, b)
        })?,
        GgmlDType::Q5K => quantize_rows::<BlockQ5K>(n, k, band, read, &BlockQ5K::from_float)?,
        GgmlDType::Q6K => quantize_rows::<BlockQ6K>(n, k, band, read, &BlockQ6K::from_float)?,
        _ => None,
    };
    let Some(blocks) = blocks else {
        return Err(Error::Config(format!(
            "cannot quantize a ({n}, {k}) weight to {}",
            crate::quant::ggml_name(format)
        )));
    };
    Ok(QTensor::new(QStorage::Cpu(blocks), (n, k))?)
}

/// A CPU tensor moved to `device` (its bytes as they are).
fn to_device(q: QTensor, device: &Device) -> Result<QTensor> {
    if device.is_cpu() {
        return Ok(q);
    }
    let (format, shape) = (q.dtype(), q.shape().clone());
    let storage = QStorage::from_data(q.data()?, device, format)?;
    Ok(QTensor::new(storage, shape)?)
}

/// `n` rows of `k` floats quantized to blocks of `T` by `from_float` (candle's, or a faster
/// form of it that gives the same bytes), read a band of `band` rows at a time, the rows of a
/// band quantized in parallel; `None` if `k` is not whole blocks.
fn quantize_rows<'a, T: GgmlType + Send + Sync + 'static>(
    n: usize,
    k: usize,
    band: usize,
    read: &dyn Fn(usize, usize) -> Result<Cow<'a, [f32]>>,
    from_float: &(dyn Fn(&[f32], &mut [T]) + Sync),
) -> Result<Option<Box<dyn QuantizedType>>> {
    use rayon::prelude::*;
    if k == 0 || !k.is_multiple_of(T::BLCK_SIZE) {
        return Ok(None);
    }
    let kb = k / T::BLCK_SIZE;
    let mut blocks = vec![T::zeros(); n * kb];
    // About 64K weights per task: enough work to be worth a task, many tasks per weight.
    let rows = (65536 / k).max(1);
    for (i, out) in blocks.chunks_mut(band.max(1) * kb).enumerate() {
        let (start, count) = (i * band.max(1), out.len() / kb);
        let data = read(start, count)?;
        if data.len() != count * k {
            return Err(Error::Checkpoint(format!(
                "a band of {count} rows of {k} gave {} floats",
                data.len()
            )));
        }
        out.par_chunks_mut(rows * kb)
            .zip(data.par_chunks(rows * k))
            .for_each(|(b, x)| from_float(x, b));
    }
    Ok(Some(Box::new(blocks)))
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
        let h = crate::kernels::fused::apply(x, &mixed, Op::Add, self.native)?;
        let ffn = self.ffn.forward(&self.final_layer_norm.forward(&h)?)?;
        crate::kernels::fused::apply(&h, &ffn, Op::Add, self.native)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A weight quantized a few rows at a time (a last band shorter than the others) has
    /// candle's own quantization's bytes, in every format quantize-at-load uses.
    #[test]
    fn quantizing_by_bands_gives_candles_bytes() -> Result<()> {
        let (n, k) = (11, 512);
        let t = crate::kernels::testing::uniform(&[n, k], 9, 1.0)?;
        let x: Vec<f32> = t.flatten_all()?.to_vec1()?;
        for format in [
            GgmlDType::Q8_0,
            GgmlDType::Q4_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
        ] {
            let want = QTensor::quantize(&t, format)?.data()?.to_vec();
            for band in [1, 3, 4, n] {
                let read = |start: usize, rows: usize| {
                    Ok(Cow::Owned(x[start * k..(start + rows) * k].to_vec()))
                };
                let got = quantize_bands(n, k, band, format, &read)?;
                assert_eq!(got.shape().dims(), &[n, k]);
                assert!(
                    got.data()?.as_ref() == want.as_slice(),
                    "{format:?}, bands of {band}"
                );
            }
        }
        // Many rows (several parallel tasks) of widths that fit each format, whole.
        for (format, k) in [
            (GgmlDType::Q8_0, 96),
            (GgmlDType::Q4_0, 64),
            (GgmlDType::Q5_0, 160),
            (GgmlDType::Q4K, 512),
            (GgmlDType::Q6K, 256),
        ] {
            let w = crate::kernels::testing::uniform(&[300, k], k as u64, 1.0)?;
            let ours = quantize_cpu(&w, format)?;
            let candle = QTensor::quantize(&w, format)?;
            assert_eq!((ours.dtype(), ours.shape()), (format, candle.shape()));
            assert!(ours.data()? == candle.data()?, "{format:?}");
        }
        // A width that is not whole blocks is an error, not a panic.
        let odd = crate::kernels::testing::uniform(&[4, 48], 1, 1.0)?;
        assert!(quantize_cpu(&odd, GgmlDType::Q8_0).is_err());
        // A band that comes back short is an error, not a short tensor.
        let short = |_: usize, rows: usize| Ok(Cow::Owned(vec![0.5; rows * k - 1]));
        assert!(quantize_bands(n, k, 4, GgmlDType::Q8_0, &short).is_err());
        Ok(())
    }
}
