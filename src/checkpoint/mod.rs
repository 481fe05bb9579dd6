//! Reading checkpoint files, whatever the family: safetensors (single or sharded), torch
//! `checkpoint.pth` and GGUF, checked strictly against a family's [weight catalogue](catalogue)
//! before anything is loaded. The families' own loaders (`models/*/load.rs`) read their configs
//! and hand their catalogues here.
//!
//! A model directory holds its config and one of:
//! * `model.safetensors`;
//! * `model.safetensors.index.json` plus the shards it names (`model-00001-of-00002.safetensors`, ...);
//! * `checkpoint.pth`, a torch zip pickle of the flat state dict;
//! * `model.gguf` (no `params.json` needed: the config is in its metadata), floats or candle's
//!   quantized blocks, as `examples/quantize` writes it.
//!
//! Tensor names are the reference's `state_dict()` names (for YOCO optionally nested under the
//! trainer's `decoder.model.` prefix). Before any weight is read, the file headers are checked against the
//! names and shapes the config implies, so a missing, unexpected or misshapen tensor is an error
//! that names it, and a lying header never makes yoco allocate what it claims.

pub(crate) mod catalogue;
pub(crate) mod gguf;
mod pth;
mod safetensors;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::{Error, Result};

/// The prefix under which the reference trainer saves the model's parameters.
pub(crate) const TRAINER_PREFIX: &str = "decoder.model.";

/// A tensor as a checkpoint's header describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TensorEntry {
    pub dtype: DType,
    pub shape: Vec<usize>,
}

/// Opens the weights `files` (safetensors, single or sharded, or a torch `checkpoint.pth`),
/// checks every tensor against `params` (see [`check_tensors`]) and returns a `VarBuilder` over
/// them, converting to `dtype` on `device` and rooted at the prefix the names carry. `streamed`:
/// read safetensors tensors one at a time from the files instead of mapping them (what loading
/// with quantization wants: see [`safetensors::Streamed`]). A GGUF file is its family's to open.
pub(crate) fn open_checked(
    files: WeightFiles,
    params: &[catalogue::Parameter],
    dtype: DType,
    device: &Device,
    streamed: bool,
) -> Result<(VarBuilder<'static>, Option<Bands>)> {
    match files {
        WeightFiles::Safetensors(paths) => {
            let found = headers(&paths)?;
            let prefix = check_tensors(params, &found)?;
            let (vb, bands) = safetensors_vb(&paths, dtype, device, streamed)?;
            Ok((rooted(vb, prefix), bands.map(|b| b.rooted(prefix))))
        }
        WeightFiles::Pth(path) => {
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
            let prefix = check_tensors(params, &found)?;
            let vb = VarBuilder::from_backend(Box::new(pth), dtype, device.clone());
            Ok((rooted(vb, prefix), None))
        }
        WeightFiles::Gguf(path) => Err(Error::Checkpoint(format!(
            "{}: a GGUF file is opened with its config",
            path.display()
        ))),
    }
}

/// The tensors the headers of safetensors files declare, each name once across the shards.
pub(crate) fn headers(paths: &[PathBuf]) -> Result<BTreeMap<String, TensorEntry>> {
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
/// one tensor at a time when `streamed` (then with the same files' [`Bands`]).
pub(crate) fn safetensors_vb(
    paths: &[PathBuf],
    dtype: DType,
    device: &Device,
    streamed: bool,
) -> Result<(VarBuilder<'static>, Option<Bands>)> {
    if streamed {
        let backend = safetensors::Streamed::new(paths)?;
        let bands = Bands {
            files: backend.clone(),
            prefix: String::new(),
        };
        let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
        return Ok((vb, Some(bands)));
    }
    // Opening re-parses the headers (candle's checks are stricter than ours, e.g. the tensors
    // must tile the data section): a failure here is a corrupt checkpoint.
    // SAFETY: the files are memory-mapped read-only; as with every mmap-based loader, they must
    // not be modified while the model loads (the tensors are copied out).
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(paths, dtype, device) }.map_err(|e| {
        let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        Error::Checkpoint(format!("cannot open {}: {e}", names.join(", ")))
    })?;
    Ok((vb, None))
}

/// The float tensors of checked safetensors files, read a band of rows at a time by their
/// catalogue names: what quantize-at-load reads a large weight from, so that a 200064-row
/// embedding is never held whole in f32 (2 GB at Phi-4-mini-flash's shape) beside its
/// quantized copy.
#[derive(Clone)]
pub(crate) struct Bands {
    files: safetensors::Streamed,
    /// What the names in the files carry before the catalogue's names.
    prefix: String,
}

impl Bands {
    fn rooted(self, prefix: &str) -> Self {
        Bands {
            prefix: format!("{}{prefix}", self.prefix),
            ..self
        }
    }

    /// Rows `start..start + count` of parameter `name` in f32, `None` when the files do not
    /// hold them.
    pub(crate) fn rows_f32(
        &self,
        name: &str,
        start: usize,
        count: usize,
    ) -> Result<Option<Vec<f32>>> {
        self.files
            .rows_f32(&format!("{}{name}", self.prefix), start, count)
    }
}

pub(crate) fn rooted(mut vb: VarBuilder<'static>, prefix: &str) -> VarBuilder<'static> {
    for part in prefix.split('.').filter(|p| !p.is_empty()) {
        vb = vb.pp(part);
    }
    vb
}

/// Where a model directory keeps its weights.
pub(crate) enum WeightFiles {
    /// One or more safetensors files (a single file, or the shards of an index).
    Safetensors(Vec<PathBuf>),
    /// A torch `checkpoint.pth` zip pickle.
    Pth(PathBuf),
    /// A `model.gguf`.
    Gguf(PathBuf),
}

/// Looks for weights in `dir`, in the order safetensors, sharded safetensors, pth, GGUF.
pub(crate) fn find_weights(dir: &Path) -> Result<WeightFiles> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(WeightFiles::Safetensors(vec![single]));
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        return Ok(WeightFiles::Safetensors(shards_from_index(dir, &index)?));
    }
    let pth = dir.join("checkpoint.pth");
    if pth.is_file() {
        return Ok(WeightFiles::Pth(pth));
    }
    let gguf = dir.join(gguf::FILE_NAME);
    if gguf.is_file() {
        return Ok(WeightFiles::Gguf(gguf));
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

pub(crate) fn read_small(path: &Path, limit: u64) -> Result<String> {
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
