//! Token embeddings: a float table, or the rows of a quantized one. A quantized model whose head
//! is tied to its embedding (Phi-4-mini-flash: 200064 x 2560, 2 GB in f32) then holds the table
//! once, quantized, and dequantizes one row per token instead of keeping a float copy.

use std::sync::Arc;

use candle_core::{DType, Module, Tensor};
use candle_nn::Embedding;

use crate::kernels::quantized::{dequantize_rows_cpu, QWeight};
use crate::{Error, Result};

/// A token embedding.
#[derive(Clone, Debug)]
pub(crate) enum TokenEmbedding {
    /// A float table `(V, D)` in the model's dtype.
    Float(Embedding),
    /// The rows of a quantized CPU table `(V, D)` (shared with the tied head).
    Quantized(Arc<QWeight>),
}

impl TokenEmbedding {
    /// A float table.
    pub(crate) fn float(table: Tensor) -> Result<Self> {
        let dim = table.dim(1)?;
        Ok(TokenEmbedding::Float(Embedding::new(table, dim)))
    }

    /// The rows of `table` when it is a CPU table of a format the row reader takes; `None`
    /// otherwise (the caller keeps a float table).
    pub(crate) fn quantized(table: Arc<QWeight>) -> Result<Option<Self>> {
        if !table.is_cpu() || dequantize_rows_cpu(&table, &[0])?.is_none() {
            return Ok(None);
        }
        Ok(Some(TokenEmbedding::Quantized(table)))
    }

    /// `ids: (B, C)` -> `(B, C, D)`: the model's dtype for a float table, f32 for a quantized
    /// one.
    pub(crate) fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            TokenEmbedding::Float(e) => Ok(e.forward(&ids.to_dtype(DType::U32)?)?),
            TokenEmbedding::Quantized(table) => {
                let (b, c) = ids.dims2()?;
                let flat: Vec<u32> = ids.to_dtype(DType::U32)?.flatten_all()?.to_vec1()?;
                let rows = dequantize_rows_cpu(table, &flat)?.ok_or_else(|| {
                    Error::Config("the quantized embedding became unreadable".into())
                })?;
                let d = rows.dim(1)?;
                Ok(rows.reshape((b, c, d))?.to_device(ids.device())?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::isa::Isa;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::Device;

    /// Rows read from a quantized table equal candle's dequantization of the whole table, for
    /// every format a head takes, as loaded and as the kernels of every instruction set lay it
    /// out (Q8_0, Q4_0 and Q4_K rows interleaved where they have AVX2), and ids beyond the table
    /// are errors.
    #[test]
    fn quantized_rows_equal_the_dequantized_table() -> Result<()> {
        let mut rng = crate::kernels::TestRng::new(5);
        for v in [37, 40] {
            let d = 256;
            let data: Vec<f32> = (0..v * d).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
            let table = Tensor::from_vec(data, (v, d), &Device::Cpu)?;
            let ids = Tensor::new(&[[0u32, 36, 5], [5, 17, 1]], &Device::Cpu)?;
            for format in [
                GgmlDType::Q8_0,
                GgmlDType::Q4_0,
                GgmlDType::Q4K,
                GgmlDType::Q6K,
            ] {
                let q = Arc::new(QTensor::quantize(&table, format)?);
                let want = TokenEmbedding::float(q.dequantize(&Device::Cpu)?)?.forward(&ids)?;
                let mut forms = vec![QWeight::Blocks(q.clone())];
                for isa in Isa::supported() {
                    forms.push(QWeight::prepared(q.clone(), isa)?);
                }
                for form in forms {
                    let rows = TokenEmbedding::quantized(Arc::new(form))?
                        .ok_or_else(|| Error::Input(format!("{format:?} declined")))?;
                    let got = rows.forward(&ids)?;
                    let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                    assert_eq!(diff, 0.0, "{format:?}");
                    assert!(rows
                        .forward(&Tensor::new(&[[v as u32]], &Device::Cpu)?)
                        .is_err());
                }
            }
        }
        Ok(())
    }
}
