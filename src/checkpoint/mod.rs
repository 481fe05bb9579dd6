//! Reading checkpoints in the official format: `params.json` plus weights, checked strictly
//! against the [weight catalogue](catalogue) before anything is loaded.
//!
//! A model directory holds `params.json` and one of:
//! * `model.safetensors`;
//! * `model.safetensors.index.json` plus the shards it names (`model-00001-of-00002.safetensors`, ...);
//! * `checkpoint.pth`, a torch zip pickle of the flat state dict;
//! * `model.gguf` (no `params.json` needed: the config is in its metadata), floats or candle's
//!   quantized blocks, as `examples/quantize` writes it.
//!
//! Tensor names are the official `state_dict()` names, optionally nested under the trainer's
//! `decoder.model.` prefix. Before any weight is read, the file headers are checked against the
//! names and shapes the config implies, so a missing, unexpected or misshapen tensor is an error
//! that names it, and a lying header never makes yoco allocate what it claims.

pub(crate) mod catalogue;
pub(crate) mod config;
pub(crate) mod gguf;
mod pth;
mod safetensors;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::{Error, Result};
use config::Config;

/// The prefix under which the reference trainer saves the model's parameters.
pub(crate) const TRAINER_PREFIX: &str = "decoder.model.";

/// A tensor as a checkpoint's header describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TensorEntry {
    pub dtype: DType,
    pub shape: Vec<usize>,
}

/// An opened model directory: its config, a `VarBuilder` over its checked weights (converting
/// to the dtype and device asked for, rooted at the names of the catalogue) and, for a GGUF
/// file, the file itself, whose quantized tensors are read as they are stored.
pub(crate) struct Opened {
    pub cfg: Config,
    pub vb: VarBuilder<'static>,
    pub gguf: Option<Arc<gguf::GgufFile>>,
}

/// Opens a model directory. `streamed`: read safetensors tensors one at a time from the files
/// instead of mapping them (what loading with quantization wants: see [`safetensors::Streamed`]).
pub(crate) fn open(dir: &Path, dtype: DType, device: &Device, streamed: bool) -> Result<Opened> {
    let weights = find_weights(dir);
    if let Ok(Weights::Gguf(path)) = &weights {
        return open_gguf(dir, path, dtype, device);
    }
    let cfg = Config::from_file(dir.join("params.json"))?;
    let vb = match weights? {
        Weights::Safetensors(paths) => {
            let found = headers(&paths)?;
            let prefix = check_tensors(&cfg.parameters(), &found)?;
            rooted(safetensors_vb(&paths, dtype, device, streamed)?, prefix)
        }
        Weights::Pth(path) => {
            // Parsed once, through the guard (candle's `from_pth` would parse it unguarded).
            let pth = pth::pth_tensors(&path)?;
            let found = pth
                .tensor_infos()
                .iter()
                .map(|(name, info)| {
                    let entry = TensorEntry {
                        dtype: info.dtype,
                        shape: info.layout.shape().dims().to_vec(),
                    };
                    (name.clone(), entry)
                })
                .collect();
            let prefix = check_tensors(&cfg.parameters(), &found)?;
            rooted(
                VarBuilder::from_backend(Box::new(pth), dtype, device.clone()),
                prefix,
            )
        }
        Weights::Gguf(path) => return open_gguf(dir, &path, dtype, device),
    };
    Ok(Opened {
        cfg,
        vb,
        gguf: None,
    })
}

/// The tensors the headers of safetensors files declare, each name once across the shards.
fn headers(paths: &[PathBuf]) -> Result<BTreeMap<String, TensorEntry>> {
    let mut found = BTreeMap::new();
    for path in paths {
        for (name, entry) in safetensors::header(path)? {
            if found.insert(name.clone(), entry).is_some() {
                return Err(Error::Checkpoint(format!(
                    "tensor `{name}` appears in more than one shard (again in {})",
                    path.display()
                )));
            }
        }
    }
    Ok(found)
}

/// A `VarBuilder` over safetensors files whose headers were checked: memory-mapped, or read
/// one tensor at a time when `streamed`.
fn safetensors_vb(
    paths: &[PathBuf],
    dtype: DType,
    device: &Device,
    streamed: bool,
) -> Result<VarBuilder<'static>> {
    if streamed {
        let backend = safetensors::Streamed::new(paths)?;
        return Ok(VarBuilder::from_backend(
            Box::new(backend),
            dtype,
            device.clone(),
        ));
    }
    // Opening re-parses the headers (candle's checks are stricter than ours, e.g. the tensors
    // must tile the data section): a failure here is a corrupt checkpoint.
    // SAFETY: the files are memory-mapped read-only; as with every mmap-based loader, they must
    // not be modified while the model loads (the tensors are copied out).
    unsafe { VarBuilder::from_mmaped_safetensors(paths, dtype, device) }.map_err(|e| {
        let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        Error::Checkpoint(format!("cannot open {}: {e}", names.join(", ")))
    })
}

/// Which model family a directory holds, told by its files: `params.json` (or a `model.gguf`
/// alone) is a YOCO checkpoint; a Hugging Face `config.json` with `model_type: phi4flash` is
/// Phi-4-mini-flash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Family {
    Yoco,
    Phi4Flash,
}

/// The family of the checkpoint in `dir` (see [`Family`]).
pub(crate) fn family(dir: &Path) -> Result<Family> {
    if dir.join("params.json").is_file() {
        return Ok(Family::Yoco);
    }
    let config = dir.join("config.json");
    if config.is_file() {
        let text = read_small(&config, 1 << 20)?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: config.clone(),
            message: e.to_string(),
        })?;
        return match json.get("model_type").and_then(|m| m.as_str()) {
            Some(crate::models::phi4flash::config::MODEL_TYPE) => Ok(Family::Phi4Flash),
            other => Err(Error::Json {
                path: config,
                message: format!(
                    "model_type {other:?} is not a family yoco runs (\"{}\"; YOCO checkpoints \
                     come with params.json)",
                    crate::models::phi4flash::config::MODEL_TYPE
                ),
            }),
        };
    }
    Ok(Family::Yoco)
}

/// An opened Hugging Face Phi-4-mini-flash directory: its config, whether it stores
/// `lm_head.weight`, and a `VarBuilder` over its checked weights.
pub(crate) struct OpenedPhi4Flash {
    pub cfg: crate::models::phi4flash::config::Phi4FlashConfig,
    pub lm_head: bool,
    pub vb: VarBuilder<'static>,
}

/// Opens a Phi-4-mini-flash directory: `config.json` plus `model.safetensors` or the shards of
/// `model.safetensors.index.json`, every tensor checked by name and shape against the catalogue
/// before any is read (each is converted from its own dtype as it loads).
pub(crate) fn open_phi4flash(
    dir: &Path,
    dtype: DType,
    device: &Device,
    streamed: bool,
) -> Result<OpenedPhi4Flash> {
    use crate::models::phi4flash::config::Phi4FlashConfig;
    let mut cfg = Phi4FlashConfig::from_file(dir.join("config.json"))?;
    let generation = dir.join("generation_config.json");
    if generation.is_file() {
        cfg.stop_token_ids =
            crate::models::phi4flash::config::stop_ids_from_generation_config(&generation)?;
    }
    let paths = match find_weights(dir)? {
        Weights::Safetensors(paths) => paths,
        Weights::Pth(p) | Weights::Gguf(p) => {
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
    Ok(OpenedPhi4Flash {
        cfg,
        lm_head,
        vb: safetensors_vb(&paths, dtype, device, streamed)?,
    })
}

/// A directory whose weights are `model.gguf`: the config from its metadata (a `params.json`
/// beside it must say the same), its tensors checked against the catalogue.
fn open_gguf(dir: &Path, path: &Path, dtype: DType, device: &Device) -> Result<Opened> {
    let mut file = gguf::GgufFile::open(path)?;
    let cfg = file.config()?;
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
    let backend = gguf::GgufBackend(file.clone());
    let vb = rooted(
        VarBuilder::from_backend(Box::new(backend), dtype, device.clone()),
        prefix,
    );
    Ok(Opened {
        cfg,
        vb,
        gguf: Some(file),
    })
}

fn rooted(mut vb: VarBuilder<'static>, prefix: &str) -> VarBuilder<'static> {
    for part in prefix.split('.').filter(|p| !p.is_empty()) {
        vb = vb.pp(part);
    }
    vb
}

/// Where a model directory keeps its weights.
enum Weights {
    /// One or more safetensors files (a single file, or the shards of an index).
    Safetensors(Vec<PathBuf>),
    /// A torch `checkpoint.pth` zip pickle.
    Pth(PathBuf),
    /// A `model.gguf`.
    Gguf(PathBuf),
}

/// Looks for weights in `dir`, in the order safetensors, sharded safetensors, pth, GGUF.
fn find_weights(dir: &Path) -> Result<Weights> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(Weights::Safetensors(vec![single]));
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        return Ok(Weights::Safetensors(shards_from_index(dir, &index)?));
    }
    let pth = dir.join("checkpoint.pth");
    if pth.is_file() {
        return Ok(Weights::Pth(pth));
    }
    let gguf = dir.join(gguf::FILE_NAME);
    if gguf.is_file() {
        return Ok(Weights::Gguf(gguf));
    }
    Err(Error::NoWeights(dir.to_path_buf()))
}

/// The shard files a `model.safetensors.index.json` names, each checked to exist.
fn shards_from_index(dir: &Path, index: &Path) -> Result<Vec<PathBuf>> {
    let text = read_small(index, 64 << 20)?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: index.into(),
        message: e.to_string(),
    })?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::Json {
            path: index.into(),
            message: "no `weight_map` object".into(),
        })?;
    let mut files: Vec<String> = Vec::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| Error::Json {
            path: index.into(),
            message: format!("weight_map entry for `{name}` is not a file name"),
        })?;
        // Shards live beside the index: refuse paths that would leave the directory.
        if file.contains('/') || file.contains('\\') || file == ".." {
            return Err(Error::Json {
                path: index.into(),
                message: format!("shard name `{file}` is not a plain file name"),
            });
        }
        if !files.iter().any(|f| f == file) {
            files.push(file.to_string());
        }
    }
    if files.is_empty() {
        return Err(Error::Json {
            path: index.into(),
            message: "weight_map is empty".into(),
        });
    }
    files.sort();
    let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
    for p in &paths {
        if !p.is_file() {
            return Err(Error::Checkpoint(format!(
                "shard {} is listed in {} but does not exist",
                p.display(),
                index.display()
            )));
        }
    }
    Ok(paths)
}

fn read_small(path: &Path, limit: u64) -> Result<String> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.len() > limit {
        return Err(Error::Json {
            path: path.into(),
            message: format!(
                "file is {} bytes, more than the {limit} accepted",
                meta.len()
            ),
        });
    }
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

/// Checks a checkpoint's tensors against a config, strictly. Returns the prefix the names
/// carry (`""` or [`TRAINER_PREFIX`]).
pub(crate) fn check_tensors(
    params: &[catalogue::Parameter],
    found: &BTreeMap<String, TensorEntry>,
) -> Result<&'static str> {
    let (prefixed, plain): (Vec<&String>, Vec<&String>) =
        found.keys().partition(|k| k.starts_with(TRAINER_PREFIX));
    if let (Some(p), Some(q)) = (prefixed.first(), plain.first()) {
        return Err(Error::Checkpoint(format!(
            "tensor names mix the trainer prefix `{TRAINER_PREFIX}` ({} names, e.g. `{p}`) with \
             unprefixed names ({}, e.g. `{q}`); all names must use one form",
            prefixed.len(),
            plain.len()
        )));
    }
    let prefix = if prefixed.is_empty() {
        ""
    } else {
        TRAINER_PREFIX
    };
    let mut remaining: BTreeMap<&str, &TensorEntry> = found
        .iter()
        .map(|(k, v)| (k.strip_prefix(prefix).unwrap_or(k), v))
        .collect();
    for catalogue::Parameter {
        name,
        shape: expected,
        ..
    } in params
    {
        match remaining.remove(name.as_str()) {
            None => {
                return Err(Error::MissingTensor {
                    name: format!("{prefix}{name}"),
                    expected: expected.clone(),
                })
            }
            Some(entry) => {
                if entry.shape != *expected {
                    return Err(Error::ShapeMismatch {
                        name: format!("{prefix}{name}"),
                        expected: expected.clone(),
                        actual: entry.shape.clone(),
                    });
                }
                if !matches!(
                    entry.dtype,
                    DType::F32 | DType::F16 | DType::BF16 | DType::F64
                ) {
                    return Err(Error::Checkpoint(format!(
                        "tensor `{prefix}{name}` has dtype {:?}; weights must be floating point",
                        entry.dtype
                    )));
                }
            }
        }
    }
    if !remaining.is_empty() {
        let mut names: Vec<&str> = remaining.keys().copied().take(8).collect();
        if remaining.len() > 8 {
            names.push("...");
        }
        return Err(Error::UnexpectedTensors(format!(
            "{} tensor(s) the config does not use: {}",
            remaining.len(),
            names.join(", ")
        )));
    }
    Ok(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

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
