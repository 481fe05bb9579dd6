//! Reading a safetensors header without trusting it: every entry's byte range is checked against
//! its dtype, its shape and the file's length before anything is allocated from it.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;

use candle_core::DType;

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
