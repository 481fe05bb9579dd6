//! Opening a downloaded Phi-4-mini-flash directory as it is: `config.json`,
//! `generation_config.json` when present, and `model.safetensors` or the shards of
//! `model.safetensors.index.json`; every tensor checked by `checkpoint` against this family's
//! catalogue, each read in its own dtype.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::checkpoint::gguf::{GgufBackend, GgufFile};
use crate::checkpoint::{check_tensors, find_weights, headers, safetensors_vb, Bands, WeightFiles};
use crate::models::phi4flash::catalogue::{Catalogue, HeadForm};
use crate::models::phi4flash::config::{
    read_limited, stop_ids_from_generation_config, stop_ids_from_json, Phi4FlashConfig,
};
use crate::{Error, Result};

/// The `general.architecture` of a Phi-4-mini-flash GGUF.
pub(crate) const ARCHITECTURE: &str = "phi4flash";
/// GGUF metadata keys holding the texts of `config.json` and `generation_config.json`, so that a
/// `model.gguf` alone is a model.
pub(crate) const CONFIG_KEY: &str = "phi4flash.config_json";
pub(crate) const GENERATION_KEY: &str = "phi4flash.generation_config_json";

/// An opened Phi-4-mini-flash directory: its config, how it holds the head, a
/// `VarBuilder` over its checked weights, for a GGUF file the file itself (its quantized tensors
/// are read as stored), and the texts its config came from.
pub(crate) struct Opened {
    pub cfg: Phi4FlashConfig,
    pub head_form: HeadForm,
    pub vb: VarBuilder<'static>,
    pub gguf: Option<Arc<GgufFile>>,
    /// The float weights by bands of rows, when they are streamed from safetensors files.
    pub bands: Option<Bands>,
    pub config_json: String,
    pub generation_json: Option<String>,
}

/// Opens a Phi-4-mini-flash directory: `config.json` (and `generation_config.json`) plus
/// `model.safetensors` or the shards of `model.safetensors.index.json`, or a `model.gguf`
/// (`examples/quantize`'s, whose metadata carries both configs when they are not beside it).
/// Every tensor is checked by name and shape against the catalogue before any is read (each is
/// converted from its own dtype as it loads).
pub(crate) fn open(dir: &Path, dtype: DType, device: &Device, streamed: bool) -> Result<Opened> {
    let weights = find_weights(dir)?;
    let gguf = match &weights {
        WeightFiles::Gguf(path) => {
            let file = GgufFile::open(path)?;
            if file.architecture() != Some(ARCHITECTURE) {
                return Err(file.error(format!(
                    "general.architecture is {:?}, not `{ARCHITECTURE}`",
                    file.architecture()
                )));
            }
            Some(file)
        }
        WeightFiles::Safetensors(_) => None,
        WeightFiles::Pth(p) => {
            return Err(Error::Checkpoint(format!(
                "{}: a Phi-4-mini-flash directory keeps its weights in safetensors or GGUF files",
                p.display()
            )))
        }
    };
    let (config, generation) = (dir.join("config.json"), dir.join("generation_config.json"));
    let (config_json, generation_json, mut cfg) = if config.is_file() {
        let cfg = Phi4FlashConfig::from_file(&config)?;
        let generation_json = match generation.is_file() {
            true => Some(read_limited(&generation)?),
            false => None,
        };
        (read_limited(&config)?, generation_json, cfg)
    } else if let Some(file) = &gguf {
        let text = file
            .text(CONFIG_KEY)
            .ok_or_else(|| file.error(format!("no config.json beside it and no {CONFIG_KEY}")))?;
        let cfg = Phi4FlashConfig::from_json(text)
            .map_err(|e| file.error(format!("{CONFIG_KEY}: {e}")))?;
        let generation_json = file.text(GENERATION_KEY).map(str::to_string);
        (text.to_string(), generation_json, cfg)
    } else {
        return Err(Error::io(&config, std::io::ErrorKind::NotFound.into()));
    };
    if generation.is_file() {
        cfg.stop_token_ids = stop_ids_from_generation_config(&generation)?;
    } else if let Some(text) = &generation_json {
        cfg.stop_token_ids = stop_ids_from_json(text)
            .map_err(|e| Error::Checkpoint(format!("{GENERATION_KEY}: {e}")))?;
    }
    let gguf = gguf.map(Arc::new);
    let (found, (vb, bands)) = match (weights, &gguf) {
        (_, Some(file)) => {
            let backend = GgufBackend(file.clone());
            let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
            (file.entries(), (vb, None))
        }
        (WeightFiles::Safetensors(paths), None) => (
            headers(&paths)?,
            safetensors_vb(&paths, dtype, device, streamed)?,
        ),
        (WeightFiles::Pth(p) | WeightFiles::Gguf(p), None) => {
            return Err(Error::Checkpoint(format!("{}: not opened", p.display())))
        }
    };
    let head_form = HeadForm::of(
        found.contains_key("model.embed_tokens.weight"),
        found.contains_key("lm_head.weight"),
    );
    let prefix = check_tensors(&Catalogue::new(&cfg, head_form).parameters(), &found)?;
    if !prefix.is_empty() {
        return Err(Error::Checkpoint(format!(
            "tensor names carry the YOCO trainer prefix `{prefix}`; a Hugging Face checkpoint \
             does not"
        )));
    }
    Ok(Opened {
        cfg,
        head_form,
        vb,
        gguf,
        bands,
        config_json,
        generation_json,
    })
}
