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

use std::cell::RefCell;
use std::sync::Arc;

use candle_core::quantized::k_quants::GgmlType;
use candle_core::quantized::{GgmlDType, QStorage, QTensor, QuantizedType};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::checkpoint::catalogue::{BlockSpec, Group, LinearSpec, Parameter};
use crate::checkpoint::gguf::GgufFile;
use crate::kernels::fused::Op;
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
            native_kernels,
            loaded: RefCell::new(Vec::new()),
        }
    }

    /// Quantize float projections to `quant` as they load (`None`: keep them float).
    pub(crate) fn quantized(self, quant: Option<Quant>) -> Self {
        Weights { quant, ..self }
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
                let t = f32_cpu.get(p.shape.as_slice(), &p.name)?;
                let q = quantize(&t, format, self.device())?;
                drop(t);
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

/// A float weight `(out, in)` quantized to `format` on `device`: the same bytes for the same
/// floats wherever it runs (quantize-at-load and the GGUF writer both call this). Rows are
/// quantized in parallel on the CPU (every block is quantized on its own, so the bytes are
/// candle's `QTensor::quantize`'s), then moved to `device`.
pub(crate) fn quantize(t: &Tensor, format: GgmlDType, device: &Device) -> Result<QTensor> {
    use candle_core::quantized::k_quants::{
        BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1,
        BlockQ6K, BlockQ8_0,
    };
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
    let blocks = match format {
        GgmlDType::Q4_0 => quantize_rows::<BlockQ4_0>(data, k),
        GgmlDType::Q4_1 => quantize_rows::<BlockQ4_1>(data, k),
        GgmlDType::Q5_0 => quantize_rows::<BlockQ5_0>(data, k),
        GgmlDType::Q5_1 => quantize_rows::<BlockQ5_1>(data, k),
        GgmlDType::Q8_0 => quantize_rows::<BlockQ8_0>(data, k),
        GgmlDType::Q2K => quantize_rows::<BlockQ2K>(data, k),
        GgmlDType::Q3K => quantize_rows::<BlockQ3K>(data, k),
        GgmlDType::Q4K => quantize_rows::<BlockQ4K>(data, k),
        GgmlDType::Q5K => quantize_rows::<BlockQ5K>(data, k),
        GgmlDType::Q6K => quantize_rows::<BlockQ6K>(data, k),
        _ => None,
    };
    drop(storage);
    let Some(blocks) = blocks else {
        return Err(Error::Config(format!(
            "cannot quantize a ({n}, {k}) weight to {}",
            crate::quant::ggml_name(format)
        )));
    };
    let q = QTensor::new(QStorage::Cpu(blocks), (n, k))?;
    if device.is_cpu() {
        return Ok(q);
    }
    let storage = QStorage::from_data(q.data()?, device, format)?;
    Ok(QTensor::new(storage, (n, k))?)
}

/// Rows of `k` floats quantized to blocks of `T`, a band of rows per task; `None` if `k` is not
/// whole blocks.
fn quantize_rows<T: GgmlType + Send + Sync + 'static>(
    data: &[f32],
    k: usize,
) -> Option<Box<dyn QuantizedType>> {
    use rayon::prelude::*;
    if k == 0 || !k.is_multiple_of(T::BLCK_SIZE) || !data.len().is_multiple_of(k) {
        return None;
    }
    let kb = k / T::BLCK_SIZE;
    let mut blocks = vec![T::zeros(); data.len() / k * kb];
    // About 64K weights per task: enough work to be worth a task, many tasks per weight.
    let rows = (65536 / k).max(1);
    blocks
        .par_chunks_mut(rows * kb)
        .zip(data.par_chunks(rows * k))
        .for_each(|(b, x)| T::from_float(x, b));
    Some(Box::new(blocks))
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
