//! `model.gguf`: a YOCO checkpoint in the GGUF format (the config as metadata, each tensor float or
//! in a GGML block format), read without trusting the file and written with candle's writer.
//!
//! candle's GGUF reader (0.11) checks most lengths against the file, but not all of it is safe
//! on hostile input: a `general.alignment` of 0 divides by zero, a metadata array of N one-byte
//! values allocates N values of 32 bytes, and tensor dimensions are multiplied unchecked. So yoco
//! parses the header itself ([`GgufFile::open`]): every count, length, dimension, offset and size
//! is checked against the bytes the file has, with checked arithmetic, before anything is
//! allocated from it; metadata arrays are walked, never stored. Tensor data are then read one
//! tensor at a time, from a byte range already checked, into candle's quantized tensors
//! (`ggml_file::qtensor_from_ggml`), with a panic in there turned into an error as a second net.
//!
//! Layout written (GGUF version 2, candle's `gguf_file::write`):
//! * `general.architecture = "yoco"` and `yoco.<field>` for every field of `params.json`;
//! * the tensors under their official `state_dict()` names, in the catalogue's order: the
//!   projections in their quantized format (or float where the format does not fit), the
//!   embedding and the norms in f32.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::{ggml_file, gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

use super::TensorEntry;
use crate::{Error, Result};

/// The file name [`crate::Model::load`] looks for.
pub(crate) const FILE_NAME: &str = "model.gguf";

/// Bounds on what a header may declare. A YOCO checkpoint has ~10 tensors per layer and a dozen
/// metadata entries; these are far above any real one and far below anything harmful.
const MAX_TENSORS: u64 = 1 << 16;
const MAX_METADATA: u64 = 1 << 16;
const MAX_STRING: u64 = 1 << 20;
const MAX_ARRAY_DEPTH: usize = 4;
const MAX_DIMS: u32 = 4;
const MAX_ALIGNMENT: u64 = 1 << 20;
/// GGUF's default alignment of the tensor data.
const DEFAULT_ALIGNMENT: u64 = 32;

/// One tensor as the header describes it, checked against the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct GgufTensor {
    pub format: GgmlDType,
    /// Shape in candle's order (`(out, in)` for a linear weight; GGUF stores it reversed).
    pub shape: Vec<usize>,
    /// Absolute byte offset of the data in the file.
    pub start: u64,
    /// Bytes of data.
    pub bytes: u64,
}

/// A metadata value yoco reads (scalars; arrays are only walked).
#[derive(Clone, Debug, PartialEq)]
enum Meta {
    Unsigned(u64),
    Signed(i64),
    Float(f64),
    Bool(bool),
    Text(String),
    /// An array of this many values (not kept).
    Array(u64),
}

/// A parsed, checked `model.gguf`.
#[derive(Debug)]
pub(crate) struct GgufFile {
    path: PathBuf,
    metadata: BTreeMap<String, Meta>,
    tensors: BTreeMap<String, GgufTensor>,
    /// The prefix the tensor names carry (`""` or the trainer's), set by [`GgufFile::set_prefix`].
    prefix: &'static str,
}

impl GgufFile {
    /// Parses and checks the header of `path`. Nothing is allocated from a size the file states
    /// before that size is checked against the bytes the file has.
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut r = Reader {
            inner: std::io::BufReader::new(file),
            pos: 0,
            len,
            path,
        };
        let magic = r.array::<4>("the magic number")?;
        if &magic != b"GGUF" {
            return Err(r.bad(format!("not a GGUF file (starts with {magic:02x?})")));
        }
        let version = r.u32("the version")?;
        if !matches!(version, 2 | 3) {
            return Err(r.bad(format!(
                "GGUF version {version} is not supported (2 and 3 are)"
            )));
        }
        let n_tensors = r.u64("the tensor count")?;
        let n_metadata = r.u64("the metadata count")?;
        if n_tensors > MAX_TENSORS || n_metadata > MAX_METADATA {
            return Err(r.bad(format!(
                "declares {n_tensors} tensors and {n_metadata} metadata entries; at most \
                 {MAX_TENSORS} and {MAX_METADATA} are accepted"
            )));
        }
        // Each entry takes some bytes at least (a length-prefixed name, a type, a value or the
        // dimensions and offset): the counts must fit in what the file has left.
        let least = n_metadata
            .saturating_mul(8 + 4 + 1)
            .saturating_add(n_tensors.saturating_mul(8 + 4 + 8 + 4 + 8));
        r.need(least, "the declared metadata and tensor entries")?;

        let mut metadata = BTreeMap::new();
        for _ in 0..n_metadata {
            let key = r.string("a metadata key")?;
            let kind = r.u32("a metadata type")?;
            let value = r.value(kind, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(r.bad(format!("metadata key `{key}` appears twice")));
            }
        }

        let mut infos = Vec::new();
        for _ in 0..n_tensors {
            let name = r.string("a tensor name")?;
            let n_dims = r.u32("a tensor's dimension count")?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(r.bad(format!(
                    "tensor `{name}` has {n_dims} dimensions (1 to {MAX_DIMS} accepted)"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64("a tensor dimension")?);
            }
            let kind = r.u32("a tensor type")?;
            let offset = r.u64("a tensor offset")?;
            infos.push((name, dims, kind, offset));
        }
        let header_end = r.pos;

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(Meta::Unsigned(a)) if a.is_power_of_two() && *a <= MAX_ALIGNMENT => *a,
            Some(other) => {
                return Err(r.bad(format!(
                    "general.alignment must be a power of two up to {MAX_ALIGNMENT}, got {other:?}"
                )))
            }
        };
        let data_start = header_end
            .checked_next_multiple_of(alignment)
            .filter(|&s| s <= len)
            .ok_or_else(|| r.bad("the tensor data would start past the end of the file".into()))?;

        let mut tensors = BTreeMap::new();
        for (name, dims, kind, offset) in infos {
            let tensor = check_tensor(&name, &dims, kind, offset, alignment, data_start, len)
                .map_err(|m| r.bad(m))?;
            if tensors.insert(name.clone(), tensor).is_some() {
                return Err(r.bad(format!("tensor `{name}` appears twice")));
            }
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            metadata,
            tensors,
            prefix: "",
        })
    }

    fn bad(&self, m: String) -> Error {
        Error::Checkpoint(format!("{}: {m}", self.path.display()))
    }

    /// `general.architecture`, when the file names one.
    pub(crate) fn architecture(&self) -> Option<&str> {
        match self.metadata.get("general.architecture") {
            Some(Meta::Text(a)) => Some(a),
            _ => None,
        }
    }

    /// The scalar metadata under `{prefix}.` as a JSON object, keys without the prefix (what a
    /// family parses its config from). An array there is an error.
    pub(crate) fn scalars(
        &self,
        prefix: &str,
    ) -> Result<serde_json::Map<String, serde_json::Value>> {
        let mut fields = serde_json::Map::new();
        let prefix = format!("{prefix}.");
        for (key, value) in &self.metadata {
            let Some(field) = key.strip_prefix(&prefix) else {
                continue;
            };
            let json = match value {
                Meta::Unsigned(v) => serde_json::Value::from(*v),
                Meta::Signed(v) => serde_json::Value::from(*v),
                Meta::Float(v) => serde_json::Number::from_f64(*v)
                    .map(serde_json::Value::Number)
                    .ok_or_else(|| self.bad(format!("{key} is not a finite number")))?,
                Meta::Bool(v) => serde_json::Value::from(*v),
                Meta::Text(v) => serde_json::Value::from(v.as_str()),
                Meta::Array(_) => {
                    return Err(self.bad(format!("{key} is an array; config fields are scalars")))
                }
            };
            fields.insert(field.to_string(), json);
        }
        Ok(fields)
    }

    /// The metadata string `key`, if the file has one.
    pub(crate) fn text(&self, key: &str) -> Option<&str> {
        match self.metadata.get(key) {
            Some(Meta::Text(t)) => Some(t),
            _ => None,
        }
    }

    /// An error about this file.
    pub(crate) fn error(&self, m: String) -> Error {
        self.bad(m)
    }

    /// The tensors as [`super::check_tensors`] checks them (names and shapes; the formats are
    /// checked here).
    pub(crate) fn entries(&self) -> BTreeMap<String, TensorEntry> {
        self.tensors
            .iter()
            .map(|(name, t)| {
                let entry = TensorEntry {
                    // Any format GGUF stores is one yoco reads (checked by `open`).
                    dtype: DType::F32,
                    shape: t.shape.clone(),
                };
                (name.clone(), entry)
            })
            .collect()
    }

    /// The prefix the tensor names carry, as [`super::check_tensors`] found it.
    pub(crate) fn set_prefix(&mut self, prefix: &'static str) {
        self.prefix = prefix;
    }

    fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.get(&format!("{}{name}", self.prefix))
    }

    /// The block format of tensor `name` when it is stored quantized (not float).
    pub(crate) fn quantized(&self, name: &str) -> Option<GgmlDType> {
        self.tensor(name)
            .map(|t| t.format)
            .filter(|f| !is_float(*f))
    }

    /// Tensor `name` as candle's quantized tensor (any format, float ones too) on `device`.
    pub(crate) fn read_quantized(&self, name: &str, device: &Device) -> Result<QTensor> {
        let t = self
            .tensor(name)
            .ok_or_else(|| self.bad(format!("no tensor `{name}`")))?;
        let bytes = usize::try_from(t.bytes)
            .map_err(|_| self.bad(format!("tensor `{name}` is too large for this machine")))?;
        // An 8-byte-aligned buffer: candle views the bytes as blocks or floats without copying.
        let mut words = vec![0u64; bytes.div_ceil(8)];
        {
            // SAFETY: any bytes are valid u64s; the view covers `bytes <= 8 * words.len()` bytes
            // of `words` and ends before `words` is used again.
            let buf =
                unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), bytes) };
            let mut file = std::fs::File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
            file.seek(SeekFrom::Start(t.start))
                .and_then(|_| file.read_exact(buf))
                .map_err(|e| Error::io(&self.path, e))?;
        }
        // SAFETY: as above, a read-only view of the bytes just read.
        let data = unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), bytes) };
        let (format, shape) = (t.format, t.shape.clone());
        // The sizes were checked against the format and shape; a panic in candle's reader
        // would still be a corrupt file, never a crash.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            ggml_file::qtensor_from_ggml(format, data, shape, device)
        }))
        .map_err(|_| self.bad(format!("tensor `{name}`: malformed data")))?
        .map_err(|e| self.bad(format!("tensor `{name}`: {e}")))
    }
}

/// A `VarBuilder` backend over a GGUF file: each tensor read when asked for, dequantized if it is
/// stored quantized, converted to the dtype and device asked for.
pub(crate) struct GgufBackend(pub std::sync::Arc<GgufFile>);

impl SimpleBackend for GgufBackend {
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
        let file = &self.0;
        let stripped = name.strip_prefix(file.prefix).unwrap_or(name);
        let q = file
            .read_quantized(stripped, &Device::Cpu)
            .map_err(candle_core::Error::wrap)?;
        q.dequantize(&Device::Cpu)?.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.tensors.contains_key(name)
    }
}

fn is_float(f: GgmlDType) -> bool {
    matches!(f, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

/// The formats yoco reads, by their GGUF type ids.
fn format_of(kind: u32) -> Option<GgmlDType> {
    Some(match kind {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// One tensor entry checked: a known format, a shape whose size does not overflow and whose rows
/// are whole blocks, an aligned offset, and data inside the file.
fn check_tensor(
    name: &str,
    dims: &[u64],
    kind: u32,
    offset: u64,
    alignment: u64,
    data_start: u64,
    file_len: u64,
) -> std::result::Result<GgufTensor, String> {
    let format = format_of(kind).ok_or_else(|| {
        format!("tensor `{name}` has tensor type {kind}, which yoco does not read")
    })?;
    let mut shape = Vec::with_capacity(dims.len());
    let mut elems: u64 = 1;
    // GGUF lists the innermost dimension first.
    for &d in dims.iter().rev() {
        let d_usize = usize::try_from(d).ok().filter(|&d| d > 0);
        elems = elems
            .checked_mul(d)
            .filter(|_| d_usize.is_some())
            .ok_or_else(|| format!("tensor `{name}` has impossible dimensions {dims:?}"))?;
        shape.push(d_usize.unwrap_or(0));
    }
    let block = format.block_size() as u64;
    if !dims[0].is_multiple_of(block) {
        return Err(format!(
            "tensor `{name}` ({}) has rows of {} values, not a multiple of its block of {block}",
            crate::quant::ggml_name(format),
            dims[0]
        ));
    }
    let bytes = (elems / block)
        .checked_mul(format.type_size() as u64)
        .ok_or_else(|| format!("tensor `{name}` has impossible dimensions {dims:?}"))?;
    if !offset.is_multiple_of(alignment) {
        return Err(format!(
            "tensor `{name}` starts at offset {offset}, not a multiple of the alignment {alignment}"
        ));
    }
    let start = data_start
        .checked_add(offset)
        .filter(|s| s.checked_add(bytes).is_some_and(|end| end <= file_len))
        .ok_or_else(|| {
            format!(
                "tensor `{name}` claims {bytes} bytes at offset {offset} of the data, past the \
                 end of the {file_len}-byte file"
            )
        })?;
    Ok(GgufTensor {
        format,
        shape,
        start,
        bytes,
    })
}

/// Reads the header, checking every length against the bytes left.
struct Reader<'p, R> {
    inner: R,
    pos: u64,
    len: u64,
    path: &'p Path,
}

impl<R: Read> Reader<'_, R> {
    fn bad(&self, m: String) -> Error {
        Error::Checkpoint(format!("{}: {m}", self.path.display()))
    }

    /// Fails unless `n` more bytes exist.
    fn need(&self, n: u64, what: &str) -> Result<()> {
        if n > self.len.saturating_sub(self.pos) {
            return Err(self.bad(format!(
                "truncated: {what} needs {n} bytes at offset {}, the file has {}",
                self.pos, self.len
            )));
        }
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        self.need(N as u64, what)?;
        let mut b = [0u8; N];
        self.inner
            .read_exact(&mut b)
            .map_err(|e| self.bad(format!("reading {what}: {e}")))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Skips `n` bytes that are known to exist.
    fn skip(&mut self, n: u64, what: &str) -> Result<()> {
        self.need(n, what)?;
        std::io::copy(&mut (&mut self.inner).take(n), &mut std::io::sink())
            .map_err(|e| self.bad(format!("reading {what}: {e}")))?;
        self.pos += n;
        Ok(())
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        if n > MAX_STRING {
            return Err(self.bad(format!(
                "{what} claims {n} bytes; at most {MAX_STRING} are accepted"
            )));
        }
        self.need(n, what)?;
        let mut b = vec![0u8; n as usize];
        self.inner
            .read_exact(&mut b)
            .map_err(|e| self.bad(format!("reading {what}: {e}")))?;
        self.pos += n;
        String::from_utf8(b).map_err(|_| self.bad(format!("{what} is not UTF-8")))
    }

    /// A metadata value of GGUF type `kind`; arrays are walked (checked) and not kept.
    fn value(&mut self, kind: u32, depth: usize) -> Result<Meta> {
        Ok(match kind {
            0 => Meta::Unsigned(u64::from(self.array::<1>("a u8")?[0])),
            1 => Meta::Signed(i64::from(i8::from_le_bytes(self.array("an i8")?))),
            2 => Meta::Unsigned(u64::from(u16::from_le_bytes(self.array("a u16")?))),
            3 => Meta::Signed(i64::from(i16::from_le_bytes(self.array("an i16")?))),
            4 => Meta::Unsigned(u64::from(self.u32("a u32")?)),
            5 => Meta::Signed(i64::from(i32::from_le_bytes(self.array("an i32")?))),
            6 => Meta::Float(f64::from(f32::from_le_bytes(self.array("an f32")?))),
            7 => match self.array::<1>("a bool")?[0] {
                0 => Meta::Bool(false),
                1 => Meta::Bool(true),
                b => return Err(self.bad(format!("a bool holds {b}"))),
            },
            8 => Meta::Text(self.string("a metadata string")?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.bad(format!(
                        "metadata arrays nested deeper than {MAX_ARRAY_DEPTH}"
                    )));
                }
                let inner = self.u32("an array's type")?;
                let n = self.u64("an array's length")?;
                let least = match inner {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    10..=12 => 8,
                    8 => 8,
                    9 => 12,
                    other => return Err(self.bad(format!("unknown metadata type {other}"))),
                };
                self.need(n.saturating_mul(least), "an array's values")?;
                match inner {
                    8 | 9 => {
                        for _ in 0..n {
                            self.value(inner, depth + 1)?;
                        }
                    }
                    _ => self.skip(n * least, "an array's values")?,
                }
                Meta::Array(n)
            }
            10 => Meta::Unsigned(self.u64("a u64")?),
            11 => Meta::Signed(i64::from_le_bytes(self.array("an i64")?)),
            12 => Meta::Float(f64::from_le_bytes(self.array("an f64")?)),
            other => return Err(self.bad(format!("unknown metadata type {other}"))),
        })
    }
}

/// Writes a GGUF file: `metadata` (`general.architecture` first), then `tensors` in order.
pub(crate) fn write(
    path: &Path,
    metadata: &[(String, gguf_file::Value)],
    tensors: &[(String, std::sync::Arc<QTensor>)],
) -> Result<()> {
    let bad = |m: String| Error::Checkpoint(format!("writing {}: {m}", path.display()));
    let metadata: Vec<(&str, &gguf_file::Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), &**t)).collect();
    let mut file =
        std::io::BufWriter::new(std::fs::File::create(path).map_err(|e| Error::io(path, e))?);
    gguf_file::write(&mut file, &metadata, &tensors).map_err(|e| bad(e.to_string()))?;
    std::io::Write::flush(&mut file).map_err(|e| Error::io(path, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_entries_are_checked_against_the_file() {
        // A Q8_0 (8, 64) tensor: 8 rows of 2 blocks of 34 bytes.
        let ok = check_tensor("w", &[64, 8], 8, 0, 32, 64, 64 + 8 * 2 * 34);
        assert_eq!(
            ok.map(|t| (t.shape, t.start, t.bytes)),
            Ok((vec![8, 64], 64, 544))
        );
        let cases: [(&[u64], u32, u64, u64); 6] = [
            (&[64, 8], 8, 0, 64 + 543),               // one byte short
            (&[48, 8], 8, 0, 10_000),                 // rows not whole blocks
            (&[64, 8], 99, 0, 10_000),                // unknown type
            (&[64, 8], 8, 16, 10_000),                // unaligned offset
            (&[64, u64::MAX / 2, 4], 8, 0, u64::MAX), // size overflows
            (&[64, 0], 8, 0, 10_000),                 // empty dimension
        ];
        for (dims, kind, offset, len) in cases {
            assert!(
                check_tensor("w", dims, kind, offset, 32, 64, len).is_err(),
                "{dims:?} {kind} {offset} {len}"
            );
        }
        // An offset so large that start + bytes wraps around.
        assert!(check_tensor("w", &[64, 8], 8, u64::MAX - 31, 32, 64, u64::MAX).is_err());
    }
}
