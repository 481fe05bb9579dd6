//! Writing a Phi-4-mini-flash model as GGUF: the embedding, norms and Mamba parameters in f32,
//! the projections quantized (or f32), the tied head written once more as a quantized
//! `lm_head.weight` so that loading it back never keeps a second float copy of the embedding,
//! and the texts of `config.json` and `generation_config.json` as metadata.

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};

use crate::checkpoint::catalogue::Group;
use crate::layers::Weights;
use crate::models::phi4flash::catalogue::{Catalogue, HeadForm};
use crate::models::phi4flash::load::{open, ARCHITECTURE, CONFIG_KEY, GENERATION_KEY};
use crate::quant::{Quant, WeightInfo};
use crate::Result;

/// Writes the model in `dir` (safetensors, sharded, or GGUF) to the GGUF file `out`, the
/// projections quantized to `quant`; returns what each tensor got.
pub(crate) fn write(dir: &Path, out: &Path, quant: Option<Quant>) -> Result<Vec<WeightInfo>> {
    let opened = open(dir, DType::F32, &Device::Cpu, true)?;
    let cat = Catalogue::new(&opened.cfg, opened.head_form);
    let mut w = Weights::new(opened.vb, true)
        .quantized(quant)
        .with_bands(opened.bands);
    if let Some(gguf) = opened.gguf {
        w = w.with_gguf(gguf);
    }
    let mut tensors = Vec::new();
    let mut groups = cat.groups();
    if cat.head_form == HeadForm::Tied && w.quantizes() {
        // The tied head, quantized from the embedding as loading would; when it is quantized,
        // the embedding's rows are read from it and the float table is not written.
        let head = vec![cat.embed_tokens.clone()];
        let mut pieces = w.gguf_tensors(&[Group::Linear(&head)])?;
        if let Some((_, q)) = pieces.pop() {
            if q.dtype() != GgmlDType::F32 {
                tensors.push(("lm_head.weight".to_string(), q));
                groups.retain(|g| !matches!(g, Group::Plain(p) if p.name == cat.embed_tokens.name));
            }
        }
    }
    let mut body = w.gguf_tensors(&groups)?;
    body.append(&mut tensors);
    let tensors = body;
    let mut metadata = vec![
        (
            "general.architecture".to_string(),
            Value::String(ARCHITECTURE.into()),
        ),
        (CONFIG_KEY.to_string(), Value::String(opened.config_json)),
    ];
    if let Some(text) = opened.generation_json {
        metadata.push((GENERATION_KEY.to_string(), Value::String(text)));
    }
    crate::checkpoint::gguf::write(out, &metadata, &tensors)?;
    Ok(w.take_loaded())
}
