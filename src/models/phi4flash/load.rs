//! Opening a downloaded Phi-4-mini-flash directory as it is: `config.json`,
//! `generation_config.json` when present, and `model.safetensors` or the shards of
//! `model.safetensors.index.json`; every tensor checked by `checkpoint` against this family's
//! catalogue, each read in its own dtype.

use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::checkpoint::{check_tensors, find_weights, headers, safetensors_vb, WeightFiles};
use crate::models::phi4flash::config::{stop_ids_from_generation_config, Phi4FlashConfig};
use crate::{Error, Result};

/// An opened Hugging Face Phi-4-mini-flash directory: its config, whether it stores
/// `lm_head.weight`, and a `VarBuilder` over its checked weights.
pub(crate) struct Opened {
    pub cfg: Phi4FlashConfig,
    pub lm_head: bool,
    pub vb: VarBuilder<'static>,
}

/// Opens a Phi-4-mini-flash directory: `config.json` plus `model.safetensors` or the shards of
/// `model.safetensors.index.json`, every tensor checked by name and shape against the catalogue
/// before any is read (each is converted from its own dtype as it loads).
pub(crate) fn open(dir: &Path, dtype: DType, device: &Device, streamed: bool) -> Result<Opened> {
    let mut cfg = Phi4FlashConfig::from_file(dir.join("config.json"))?;
    let generation = dir.join("generation_config.json");
    if generation.is_file() {
        cfg.stop_token_ids = stop_ids_from_generation_config(&generation)?;
    }
    let paths = match find_weights(dir)? {
        WeightFiles::Safetensors(paths) => paths,
        WeightFiles::Pth(p) | WeightFiles::Gguf(p) => {
            return Err(Error::Checkpoint(format!(
                "{}: a Phi-4-mini-flash directory keeps its weights in safetensors files",
                p.display()
            )))
        }
    };
    let found = headers(&paths)?;
    let lm_head = found.contains_key("lm_head.weight");
    let prefix = check_tensors(&cfg.parameters(lm_head), &found)?;
    if !prefix.is_empty() {
        return Err(Error::Checkpoint(format!(
            "tensor names carry the YOCO trainer prefix `{prefix}`; a Hugging Face checkpoint \
             does not"
        )));
    }
    Ok(Opened {
        cfg,
        lm_head,
        vb: safetensors_vb(&paths, dtype, device, streamed)?,
    })
}
