//! Finding, checking and opening checkpoints in the reference's format.
//!
//! A model directory holds `params.json` and one of:
//! * `model.safetensors`;
//! * `model.safetensors.index.json` plus the shards it names (`model-00001-of-00002.safetensors`, ...);
//! * `checkpoint.pth`, a torch zip pickle of the flat state dict.
//!
//! Tensor names are the reference's (`self_decoder.layers.0.mixer.q_proj.weight`, ...), optionally
//! nested under the trainer's `decoder.model.` prefix. Loading is strict: before any weight is
//! read, the file headers are checked against the names and shapes the config implies, so a
//! missing, unexpected or misshapen tensor is an error that names it — and a lying header never
//! makes yoco allocate what it claims.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::config::{Config, SelfMixer};
use crate::{Error, Result};

/// The prefix under which the reference trainer saves the model's parameters.
pub const TRAINER_PREFIX: &str = "decoder.model.";

/// Largest safetensors header accepted (the format itself caps it at 100 MB).
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Every parameter a config implies, with its shape, in the reference's names.
pub fn expected_tensors(cfg: &Config) -> Vec<(String, Vec<usize>)> {
    let (d, f, v) = (cfg.dim, cfg.hidden_dim, cfg.vocab_size);
    let mut out = vec![
        ("embed_tokens.weight".to_string(), vec![v, d]),
        ("output_projection.weight".to_string(), vec![v, d]),
    ];
    let block = |out: &mut Vec<(String, Vec<usize>)>, p: &str| {
        out.push((format!("{p}.mixer_layer_norm.weight"), vec![d]));
        out.push((format!("{p}.final_layer_norm.weight"), vec![d]));
        out.push((format!("{p}.ffn.fc1.weight"), vec![f, d]));
        out.push((format!("{p}.ffn.gate.weight"), vec![f, d]));
        out.push((format!("{p}.ffn.fc2.weight"), vec![d, f]));
    };
    for l in 0..cfg.n_half_layers() {
        let p = format!("self_decoder.layers.{l}");
        block(&mut out, &p);
        for proj in ["q", "k", "v", "out"] {
            out.push((format!("{p}.mixer.{proj}_proj.weight"), vec![d, d]));
        }
        if cfg.self_mixer() == SelfMixer::GatedRetention {
            out.push((format!("{p}.mixer.g_proj.weight"), vec![d, d]));
            out.push((
                format!("{p}.mixer.gt_proj.weight"),
                vec![cfg.n_self_heads, d],
            ));
        }
    }
    out.push(("cross_decoder.k_proj.weight".into(), vec![cfg.kv_dim(), d]));
    out.push(("cross_decoder.v_proj.weight".into(), vec![cfg.kv_dim(), d]));
    out.push(("cross_decoder.kv_layer_norm.weight".into(), vec![d]));
    for l in 0..cfg.n_half_layers() {
        let p = format!("cross_decoder.layers.{l}");
        block(&mut out, &p);
        out.push((format!("{p}.mixer.q_proj.weight"), vec![d, d]));
        out.push((format!("{p}.mixer.out_proj.weight"), vec![d, d]));
    }
    // The final norm is the model's own (`YOCO.layer_norm` in the reference), at the top level.
    out.push(("layer_norm.weight".into(), vec![d]));
    out
}

/// Where a model directory keeps its weights.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WeightFiles {
    /// One or more safetensors files (a single file, or the shards of an index).
    Safetensors(Vec<PathBuf>),
    /// A torch `checkpoint.pth` zip pickle.
    Pth(PathBuf),
}

/// A tensor as a checkpoint's header describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorEntry {
    /// Storage dtype.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
}

impl WeightFiles {
    /// Looks for weights in `dir`, in the order safetensors, sharded safetensors, pth.
    pub fn find(dir: &Path) -> Result<Self> {
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
        Err(Error::NoWeights(dir.to_path_buf()))
    }

    /// Names, dtypes and shapes of every tensor, read from the headers only.
    pub fn tensors(&self) -> Result<BTreeMap<String, TensorEntry>> {
        match self {
            WeightFiles::Safetensors(paths) => {
                let mut all = BTreeMap::new();
                for path in paths {
                    for (name, entry) in safetensors_header(path)? {
                        if all.insert(name.clone(), entry).is_some() {
                            return Err(Error::Checkpoint(format!(
                                "tensor `{name}` appears in more than one shard (again in {})",
                                path.display()
                            )));
                        }
                    }
                }
                Ok(all)
            }
            WeightFiles::Pth(path) => {
                let pth = crate::pth::pth_tensors(path)?;
                Ok(pth
                    .tensor_infos()
                    .iter()
                    .map(|(name, info)| {
                        (
                            name.clone(),
                            TensorEntry {
                                dtype: info.dtype,
                                shape: info.layout.shape().dims().to_vec(),
                            },
                        )
                    })
                    .collect())
            }
        }
    }

    /// A `VarBuilder` over these files that converts to `dtype` on `device`, rooted at `prefix`.
    pub fn var_builder(
        &self,
        prefix: &str,
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>> {
        // Opening re-parses the headers (candle's checks are stricter than `safetensors_header`,
        // e.g. tensors must tile the data section): a failure here is a corrupt checkpoint.
        let vb = match self {
            WeightFiles::Safetensors(paths) => {
                // SAFETY: the files are memory-mapped read-only; as with every mmap-based loader,
                // they must not be modified while the model loads (the tensors are copied out).
                unsafe { VarBuilder::from_mmaped_safetensors(paths, dtype, device) }.map_err(
                    |e| {
                        let names: Vec<String> =
                            paths.iter().map(|p| p.display().to_string()).collect();
                        Error::Checkpoint(format!("cannot open {}: {e}", names.join(", ")))
                    },
                )?
            }
            // Through the same guard as `tensors` (candle's `from_pth` would parse unguarded).
            WeightFiles::Pth(path) => VarBuilder::from_backend(
                Box::new(crate::pth::pth_tensors(path)?),
                dtype,
                device.clone(),
            ),
        };
        let mut vb = vb;
        for part in prefix.split('.').filter(|p| !p.is_empty()) {
            vb = vb.pp(part);
        }
        Ok(vb)
    }
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

fn safetensors_dtype(name: &str) -> Option<DType> {
    Some(match name {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        _ => return None,
    })
}

/// Reads and checks a safetensors header: every entry's byte range must match its dtype and
/// shape and lie inside the file. Nothing is allocated from sizes the file claims.
pub fn safetensors_header(path: &Path) -> Result<BTreeMap<String, TensorEntry>> {
    let bad = |m: String| Error::Checkpoint(format!("{}: {m}", path.display()));
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes)
        .map_err(|_| bad("truncated: shorter than the 8-byte header length".into()))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES || header_len > file_len.saturating_sub(8) {
        return Err(bad(format!(
            "header length {header_len} is impossible for a file of {file_len} bytes"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|_| bad("truncated inside the header".into()))?;
    let json: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
    let data_len = file_len - 8 - header_len;
    let mut out = BTreeMap::new();
    for (name, entry) in json {
        if name == "__metadata__" {
            continue;
        }
        let dtype_name = entry.get("dtype").and_then(|d| d.as_str()).unwrap_or("?");
        let dtype = safetensors_dtype(dtype_name).ok_or_else(|| {
            bad(format!(
                "tensor `{name}` has dtype {dtype_name}; weights must be F32, F16, BF16 or F64"
            ))
        })?;
        let shape: Vec<usize> = entry
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect())
            .ok_or_else(|| bad(format!("tensor `{name}` has no valid shape")))?;
        let offsets: Vec<u64> = entry
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|x| x.as_u64()).collect())
            .filter(|v: &Vec<u64>| v.len() == 2)
            .ok_or_else(|| bad(format!("tensor `{name}` has no valid data_offsets")))?;
        let bytes = shape
            .iter()
            .try_fold(dtype.size_in_bytes() as u64, |acc, &d| {
                acc.checked_mul(d as u64)
            })
            .ok_or_else(|| {
                bad(format!(
                    "tensor `{name}` has an overflowing shape {shape:?}"
                ))
            })?;
        let (start, end) = (offsets[0], offsets[1]);
        if start > end || end > data_len || end - start != bytes {
            return Err(bad(format!(
                "tensor `{name}` ({dtype_name} {shape:?}, {bytes} bytes) claims bytes {start}..{end} of a {data_len}-byte data section"
            )));
        }
        out.insert(name, TensorEntry { dtype, shape });
    }
    Ok(out)
}

/// Checks a checkpoint's tensors against a config, strictly. Returns the prefix the names
/// carry (`""` or [`TRAINER_PREFIX`]).
pub fn check_tensors(cfg: &Config, found: &BTreeMap<String, TensorEntry>) -> Result<&'static str> {
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
    for (name, expected) in expected_tensors(cfg) {
        match remaining.remove(name.as_str()) {
            None => {
                return Err(Error::MissingTensor {
                    name: format!("{prefix}{name}"),
                    expected,
                })
            }
            Some(entry) => {
                if entry.shape != expected {
                    return Err(Error::ShapeMismatch {
                        name: format!("{prefix}{name}"),
                        expected,
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
