//! Writing a YOCO model as GGUF: the config as `yoco.*` metadata, the tensors under their
//! official names (the embedding and norms in f32, projections quantized or f32). Reading it back
//! is `load`'s.

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::QTensor;
use candle_core::{DType, Device};

use crate::layers::Weights;
use crate::models::yoco::catalogue::Catalogue;
use crate::models::yoco::config::Config;
use crate::models::yoco::load::ARCHITECTURE;
use crate::{Error, Result};

/// Writes the YOCO checkpoint in `dir` to the GGUF file `out` (see [`crate::write_gguf`]).
pub(crate) fn write(
    dir: &Path,
    out: &Path,
    quant: Option<crate::Quant>,
) -> Result<Vec<crate::WeightInfo>> {
    let opened = super::load::open(dir, DType::F32, &Device::Cpu, true)?;
    let cfg = opened.cfg;
    let mut w = Weights::new(opened.vb, true)
        .quantized(quant)
        .with_bands(opened.bands);
    if let Some(gguf) = opened.gguf {
        w = w.with_gguf(gguf);
    }
    let tensors = w.gguf_tensors(&Catalogue::new(&cfg).groups())?;
    write_file(out, &cfg, &tensors)?;
    Ok(w.take_loaded())
}

/// Writes a YOCO GGUF: `cfg` as metadata, then `tensors` (official names) in order.
fn write_file(
    path: &Path,
    cfg: &Config,
    tensors: &[(String, std::sync::Arc<QTensor>)],
) -> Result<()> {
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
    crate::checkpoint::gguf::write(path, &metadata, tensors)
}
