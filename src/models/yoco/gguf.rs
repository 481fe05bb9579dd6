//! Writing a YOCO model as GGUF: the config as `yoco.*` metadata, the tensors under their
//! official names (the embedding and norms in f32, projections quantized or f32). Reading it back
//! is `load`'s.

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::layers::{LinearWeights, Weights};
use crate::models::yoco::catalogue::{Catalogue, Group};
use crate::models::yoco::config::Config;
use crate::models::yoco::load::ARCHITECTURE;
use crate::{Error, Result};

/// Writes `model.gguf`-format file `out` from the checkpoint in `dir` (any format
/// [`crate::Model::load`] reads): the config as metadata, the embedding and the norms in f32,
/// the projections quantized to `quant` (with the same fallbacks and the same bytes as
/// [`crate::LoadOptions::quant`] gives at load time) or in f32 without it. Tensors the checkpoint
/// already stores quantized (a GGUF) are copied as they are. Returns what each tensor got.
///
/// The checkpoint is read one projection at a time and quantized as it is read, so memory holds
/// the written tensors and at most one float projection beside them.
///
/// ```no_run
/// use yoco::{Model, Quant};
///
/// # fn main() -> yoco::Result<()> {
/// std::fs::create_dir_all("target/shakespeare-q8_0").ok();
/// yoco::write_gguf("models/shakespeare", "target/shakespeare-q8_0/model.gguf", Some(Quant::Q8_0))?;
/// let model = Model::load("target/shakespeare-q8_0", &candle_core::Device::Cpu, candle_core::DType::F32)?;
/// # Ok(()) }
/// ```
pub fn write_gguf(
    dir: impl AsRef<Path>,
    out: impl AsRef<Path>,
    quant: Option<crate::Quant>,
) -> Result<Vec<crate::WeightInfo>> {
    let opened = super::load::open(dir.as_ref(), DType::F32, &Device::Cpu, true)?;
    let cfg = opened.cfg;
    let mut w = Weights::new(opened.vb, true).quantized(quant);
    if let Some(gguf) = opened.gguf {
        w = w.with_gguf(gguf);
    }
    let float = |t: &Tensor| QTensor::quantize(t, GgmlDType::F32);
    let mut tensors: Vec<(String, std::sync::Arc<QTensor>)> = Vec::new();
    for group in Catalogue::new(&cfg).groups() {
        match group {
            Group::Plain(p) => tensors.push((p.name.clone(), float(&w.get(p)?)?.into())),
            Group::Linear(spec) => match w.linear(spec)? {
                LinearWeights::Float(pieces) => {
                    for (p, t) in spec.iter().zip(&pieces) {
                        tensors.push((p.name.clone(), float(t)?.into()));
                    }
                }
                LinearWeights::Quantized(pieces) => {
                    for (p, q) in spec.iter().zip(pieces) {
                        tensors.push((p.name.clone(), q));
                    }
                }
            },
        }
    }
    write(out.as_ref(), &cfg, &tensors)?;
    Ok(w.take_loaded())
}

/// Writes a YOCO GGUF: `cfg` as metadata, then `tensors` (official names) in order.
fn write(path: &Path, cfg: &Config, tensors: &[(String, std::sync::Arc<QTensor>)]) -> Result<()> {
    let bad = |m: String| Error::Checkpoint(format!("writing {}: {m}", path.display()));
    let serde_json::Value::Object(fields) =
        serde_json::to_value(cfg).map_err(|e| bad(e.to_string()))?
    else {
        return Err(bad("the config is not a JSON object".into()));
    };
    let mut metadata = vec![(
        "general.architecture".to_string(),
        Value::String(ARCHITECTURE.into()),
    )];
    for (field, value) in fields {
        let value = match value {
            serde_json::Value::Bool(b) => Value::Bool(b),
            serde_json::Value::String(s) => Value::String(s),
            serde_json::Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
                (Some(u), _, _) => Value::U64(u),
                (None, Some(i), _) => Value::I64(i),
                (None, None, Some(f)) => Value::F64(f),
                _ => return Err(bad(format!("config field {field} = {n}"))),
            },
            serde_json::Value::Null => continue,
            other => return Err(bad(format!("config field {field} = {other}"))),
        };
        metadata.push((format!("{ARCHITECTURE}.{field}"), value));
    }
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), &**t)).collect();
    let mut file =
        std::io::BufWriter::new(std::fs::File::create(path).map_err(|e| Error::io(path, e))?);
    gguf_file::write(&mut file, &metadata, &tensors).map_err(|e| bad(e.to_string()))?;
    std::io::Write::flush(&mut file).map_err(|e| Error::io(path, e))?;
    Ok(())
}
