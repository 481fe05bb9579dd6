//! Opening a YOCO model directory as the official code saved it: `params.json` plus
//! `model.safetensors` (or the shards of `model.safetensors.index.json`, or `checkpoint.pth`), or
//! a `model.gguf` whose metadata holds the config (`yoco.*` keys). The files are read by `checkpoint`, checked
//! against this family's catalogue.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::checkpoint::gguf::{GgufBackend, GgufFile};
use crate::checkpoint::{check_tensors, find_weights, open_checked, rooted, Bands, WeightFiles};
use crate::models::yoco::config::Config;
use crate::{Error, Result};

/// The `general.architecture` of a YOCO GGUF, and the prefix of its config keys.
pub(crate) const ARCHITECTURE: &str = "yoco";

/// A YOCO model's config, from the `yoco.*` metadata of a GGUF file, validated as a
/// `params.json` is.
pub(crate) fn config_from_gguf(file: &GgufFile) -> Result<Config> {
    match file.architecture() {
        Some(a) if a == ARCHITECTURE => {}
        Some(a) => {
            return Err(file.error(format!(
                "general.architecture is `{a}`, not `{ARCHITECTURE}`: not a YOCO model"
            )))
        }
        None => {
            return Err(file.error("no general.architecture string: not a YOCO model file".into()))
        }
    }
    let fields = file.scalars(ARCHITECTURE)?;
    let cfg: Config = serde_json::from_value(serde_json::Value::Object(fields)).map_err(|e| {
        file.error(format!(
            "the {ARCHITECTURE}.* metadata is not a config: {e}"
        ))
    })?;
    cfg.validate()?;
    Ok(cfg)
}

/// An opened model directory: its config, a `VarBuilder` over its checked weights (converting
/// to the dtype and device asked for, rooted at the names of the catalogue) and, for a GGUF
/// file, the file itself, whose quantized tensors are read as they are stored.
pub(crate) struct Opened {
    pub cfg: Config,
    pub vb: VarBuilder<'static>,
    pub gguf: Option<Arc<GgufFile>>,
    /// The float weights by bands of rows, when they are streamed from safetensors files.
    pub bands: Option<Bands>,
}

/// Opens a model directory. `streamed`: read safetensors tensors one at a time from the files
/// instead of mapping them (what loading with quantization wants).
pub(crate) fn open(dir: &Path, dtype: DType, device: &Device, streamed: bool) -> Result<Opened> {
    let weights = find_weights(dir);
    if let Ok(WeightFiles::Gguf(path)) = &weights {
        return open_gguf(dir, path, dtype, device);
    }
    let cfg = Config::from_file(dir.join("params.json"))?;
    let (vb, bands) = open_checked(weights?, &cfg.parameters(), dtype, device, streamed)?;
    Ok(Opened {
        cfg,
        vb,
        gguf: None,
        bands,
    })
}

/// A directory whose weights are `model.gguf`: the config from its metadata (a `params.json`
/// beside it must say the same), its tensors checked against the catalogue.
fn open_gguf(dir: &Path, path: &Path, dtype: DType, device: &Device) -> Result<Opened> {
    let mut file = GgufFile::open(path)?;
    let cfg = config_from_gguf(&file)?;
    let params = dir.join("params.json");
    if params.is_file() {
        let beside = Config::from_file(&params)?;
        if serde_json::to_value(&beside).ok() != serde_json::to_value(&cfg).ok() {
            return Err(Error::Checkpoint(format!(
                "{} and the config in {} differ; remove one",
                params.display(),
                path.display()
            )));
        }
    }
    let prefix = check_tensors(&cfg.parameters(), &file.entries())?;
    file.set_prefix(prefix);
    let file = Arc::new(file);
    let backend = GgufBackend(file.clone());
    let vb = rooted(
        VarBuilder::from_backend(Box::new(backend), dtype, device.clone()),
        prefix,
    );
    Ok(Opened {
        cfg,
        vb,
        gguf: Some(file),
        bands: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use crate::checkpoint::{TensorEntry, TRAINER_PREFIX};

    fn entries(cfg: &Config) -> BTreeMap<String, TensorEntry> {
        cfg.parameters()
            .into_iter()
            .map(|p| {
                let entry = TensorEntry {
                    dtype: DType::F32,
                    shape: p.shape,
                };
                (p.name, entry)
            })
            .collect()
    }

    #[test]
    fn integer_dtypes_are_refused_by_name_for_every_weight_format() {
        // `check_tensors` also guards checkpoint.pth, whose dtypes come from the pickle.
        let cfg = Config::new(8, 2, 16, 2, 2, 1, 16);
        let mut found = entries(&cfg);
        assert_eq!(check_tensors(&cfg.parameters(), &found).ok(), Some(""));
        if let Some(e) = found.get_mut("layer_norm.weight") {
            e.dtype = DType::I64;
        }
        let msg = match check_tensors(&cfg.parameters(), &found) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        };
        assert!(
            msg.contains("layer_norm.weight") && msg.contains("I64"),
            "{msg}"
        );
    }

    #[test]
    fn the_trainer_prefix_is_recognised_and_never_mixed() {
        let cfg = Config::new(8, 2, 16, 2, 2, 1, 16);
        let prefixed: BTreeMap<String, TensorEntry> = entries(&cfg)
            .into_iter()
            .map(|(k, v)| (format!("{TRAINER_PREFIX}{k}"), v))
            .collect();
        assert_eq!(
            check_tensors(&cfg.parameters(), &prefixed).ok(),
            Some(TRAINER_PREFIX)
        );
        let mut mixed = prefixed;
        mixed.extend(entries(&cfg).into_iter().take(1));
        assert!(check_tensors(&cfg.parameters(), &mixed).is_err());
    }
}
