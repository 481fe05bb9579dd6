//! Reading a safetensors header without trusting it: every entry's byte range is checked against
//! its dtype, its shape and the file's length before anything is allocated from it.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

use super::TensorEntry;
use crate::{Error, Result};

/// Largest safetensors header accepted (the format itself caps it at 100 MB).
const MAX_HEADER_BYTES: u64 = 100 << 20;

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
pub(crate) fn header(path: &Path) -> Result<BTreeMap<String, TensorEntry>> {
    Ok(index(path)?
        .into_iter()
        .map(|(name, (entry, _))| (name, entry))
        .collect())
}

/// [`header`] with each tensor's absolute byte offset in the file.
pub(crate) fn index(path: &Path) -> Result<BTreeMap<String, (TensorEntry, u64)>> {
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
    let mut ranges = Vec::new();
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
        ranges.push((start, end, name.clone()));
        out.insert(name, (TensorEntry { dtype, shape }, 8 + header_len + start));
    }
    // The format's own rule (candle's parser enforces it too): the tensors tile the data
    // section, in order of their offsets, without gaps or overlaps.
    ranges.sort();
    let mut at = 0;
    for (start, end, name) in &ranges {
        if *start != at {
            return Err(bad(format!(
                "tensor `{name}` starts at byte {start} of the data section, but the tensors \
                 before it end at {at} (tensors must tile the data without gaps or overlaps)"
            )));
        }
        at = *end;
    }
    if at != data_len {
        return Err(bad(format!(
            "the tensors end at byte {at} of a {data_len}-byte data section"
        )));
    }
    Ok(out)
}

/// A `VarBuilder` backend over checked safetensors files that reads each tensor from its file
/// when asked for (one positioned read), instead of mapping the files: a model quantized as it
/// loads then never holds more than one float tensor beside what it keeps (mapped pages count in
/// the resident set until the whole load is over).
#[derive(Clone)]
pub(crate) struct Streamed {
    /// Tensor name -> (file, dtype and shape, absolute offset); shared by the clones.
    tensors: Arc<HashMap<String, (PathBuf, TensorEntry, u64)>>,
}

impl Streamed {
    /// The tensors of `paths`, every header checked by [`index`].
    pub(crate) fn new(paths: &[PathBuf]) -> Result<Self> {
        let mut tensors = HashMap::new();
        for path in paths {
            for (name, (entry, start)) in index(path)? {
                tensors.insert(name, (path.clone(), entry, start));
            }
        }
        Ok(Streamed {
            tensors: Arc::new(tensors),
        })
    }

    /// Rows `start..start + count` of tensor `name` (its first dimension is the row), in f32;
    /// `None` when there is no such tensor or the rows are not in it. One positioned read of
    /// just those rows: what lets a large tensor be quantized a band at a time.
    pub(crate) fn rows_f32(
        &self,
        name: &str,
        start: usize,
        count: usize,
    ) -> Result<Option<Vec<f32>>> {
        let Some((path, entry, offset)) = self.tensors.get(name) else {
            return Ok(None);
        };
        let Some((&rows, rest)) = entry.shape.split_first() else {
            return Ok(None);
        };
        if start.checked_add(count).is_none_or(|end| end > rows) {
            return Ok(None);
        }
        let size = entry.dtype.size_in_bytes();
        let row_bytes = rest.iter().product::<usize>() * size;
        let mut bytes = vec![0u8; count * row_bytes];
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        file.seek(SeekFrom::Start(offset + (start * row_bytes) as u64))
            .and_then(|_| file.read_exact(&mut bytes))
            .map_err(|e| Error::io(path, e))?;
        let words = bytes.chunks_exact(size);
        let values = match entry.dtype {
            DType::F32 => words
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            DType::BF16 => words
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            DType::F16 => words
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            DType::F64 => words
                .map(|b| {
                    f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
                })
                .collect(),
            _ => return Ok(None),
        };
        Ok(Some(values))
    }
}

impl SimpleBackend for Streamed {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            candle_core::bail!(
                "tensor `{name}` has shape {:?}, expected {:?}",
                t.dims(),
                s.dims()
            )
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some((path, entry, start)) = self.tensors.get(name) else {
            candle_core::bail!("no tensor `{name}`")
        };
        // The range was checked against the file by `index`.
        let len = entry.shape.iter().product::<usize>() * entry.dtype.size_in_bytes();
        let stored = {
            let mut bytes = vec![0u8; len];
            let mut file = std::fs::File::open(path)?;
            file.seek(SeekFrom::Start(*start))?;
            file.read_exact(&mut bytes)?;
            Tensor::from_raw_buffer(&bytes, entry.dtype, &entry.shape, &Device::Cpu)?
        };
        // The file's bytes are gone before the conversion makes its copy.
        stored.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}
