//! Guarding candle's reader of torch `checkpoint.pth` files against hostile input.
//!
//! A `.pth` is a zip archive whose `*/data.pkl` entry is a pickle describing the state dict.
//! candle's pickle reader (0.11) trusts the file in two ways that a hostile file can exploit:
//! * it allocates every string's length as read (`BINUNICODE`: up to 4 GiB) before reading it;
//! * it indexes argument tuples without checking their length, so a malformed tensor record is a
//!   panic, not an error.
//!
//! [`pth_tensors`] therefore first walks the pickle's opcodes (only those candle understands),
//! checking every length against the bytes that remain, and then calls candle with its panics
//! turned into [`Error::Checkpoint`].

use std::io::Read;
use std::path::Path;

use candle_core::pickle::PthTensors;

use crate::{Error, Result};

/// Largest `data.pkl` accepted: the pickle holds names and shapes, not weights (a few hundred
/// bytes per tensor), so even very large checkpoints stay far below this.
const MAX_PICKLE_BYTES: u64 = 64 << 20;

/// Opens a `.pth` for its tensor list, after [`check_pickles`]; a panic inside candle's reader
/// becomes an error.
pub(crate) fn pth_tensors(path: &Path) -> Result<PthTensors> {
    let bad = |m: String| Error::Checkpoint(format!("cannot read {}: {m}", path.display()));
    check_pickles(path)?;
    let opened = std::panic::catch_unwind(|| PthTensors::new(path, None));
    match opened {
        Ok(Ok(pth)) => Ok(pth),
        Ok(Err(e)) => Err(bad(e.to_string())),
        Err(_) => Err(bad(
            "malformed pickle (the tensor records are not torch's)".into()
        )),
    }
}

/// Checks every `data.pkl` of the archive with [`check_pickle`].
pub(crate) fn check_pickles(path: &Path) -> Result<()> {
    let bad = |m: String| Error::Checkpoint(format!("cannot read {}: {m}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| bad(format!("not a zip archive: {e}")))?;
    for i in 0..zip.len() {
        let mut entry = zip
            .by_index(i)
            .map_err(|e| bad(format!("zip entry {i}: {e}")))?;
        let name = entry
            .name()
            .map_err(|e| bad(format!("zip entry {i}: {e}")))?
            .into_owned();
        if !name.ends_with("data.pkl") {
            continue;
        }
        if entry.size() > MAX_PICKLE_BYTES {
            return Err(bad(format!(
                "{name} claims {} bytes; a state-dict pickle is far smaller",
                entry.size()
            )));
        }
        // Bounded read: the size in the zip directory may lie.
        let mut data = Vec::new();
        entry
            .by_ref()
            .take(MAX_PICKLE_BYTES + 1)
            .read_to_end(&mut data)
            .map_err(|e| bad(format!("reading {name}: {e}")))?;
        if data.len() as u64 > MAX_PICKLE_BYTES {
            return Err(bad(format!("{name} is larger than it claims")));
        }
        check_pickle(&data).map_err(|m| bad(format!("{name}: {m}")))?;
    }
    Ok(())
}

/// Walks a pickle's opcodes up to `STOP`, checking that every argument lies inside the data.
/// Stops quietly at an opcode candle does not know (candle then rejects it with its own error).
pub(crate) fn check_pickle(data: &[u8]) -> std::result::Result<(), String> {
    let mut pos = 0usize;
    // Bytes `pos..pos + n`, advancing, or an error naming the opcode that wanted them.
    let take = |pos: &mut usize, n: usize, op: u8| -> std::result::Result<&[u8], String> {
        let end = pos
            .checked_add(n)
            .filter(|&e| e <= data.len())
            .ok_or_else(|| {
                format!(
                    "opcode {op:#04x} at byte {} wants {n} bytes; {} remain",
                    *pos - 1,
                    data.len() - *pos
                )
            })?;
        let out = &data[*pos..end];
        *pos = end;
        Ok(out)
    };
    loop {
        let Some(&op) = data.get(pos) else {
            return Err("ends without STOP".into());
        };
        pos += 1;
        match op {
            b'.' => return Ok(()), // STOP
            // PROTO, BININT1, BINGET, BINPUT
            0x80 | b'K' | b'h' | b'q' => {
                take(&mut pos, 1, op)?;
            }
            b'M' => {
                take(&mut pos, 2, op)?; // BININT2
            }
            // BININT, LONG_BINGET, LONG_BINPUT
            b'J' | b'j' | b'r' => {
                take(&mut pos, 4, op)?;
            }
            b'G' => {
                take(&mut pos, 8, op)?; // BINFLOAT
            }
            0x8a => {
                // LONG1: a length byte, then that many bytes; candle shifts each into an i64.
                let n = take(&mut pos, 1, op)?[0] as usize;
                if n > 8 {
                    return Err(format!("LONG1 of {n} bytes does not fit 64 bits"));
                }
                take(&mut pos, n, op)?;
            }
            b'X' => {
                // BINUNICODE: u32 length, then the UTF-8 bytes (candle allocates the length).
                let len = take(&mut pos, 4, op)?;
                let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
                take(&mut pos, len, op)?;
            }
            b'c' => {
                // GLOBAL: module and name, each ended by a newline.
                for _ in 0..2 {
                    let rest = &data[pos..];
                    let nl = rest.iter().position(|&b| b == b'\n').ok_or_else(|| {
                        format!("GLOBAL at byte {} has no newline", pos.saturating_sub(1))
                    })?;
                    pos += nl + 1;
                }
            }
            // No argument: EMPTY_TUPLE, REDUCE, MARK, TUPLE, BINPERSID, NONE, TUPLE1..3,
            // NEWTRUE, NEWFALSE, SETITEM, SETITEMS, EMPTY_DICT, DICT, BUILD, NEWOBJ,
            // EMPTY_LIST, APPEND, APPENDS.
            b')' | b'R' | b'(' | b't' | b'Q' | b'N' | 0x85 | 0x86 | 0x87 | 0x88 | 0x89 | b's'
            | b'u' | b'}' | b'd' | b'b' | 0x81 | b']' | b'a' | b'e' => {}
            _ => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_formed_pickles_pass_and_lying_lengths_fail() {
        // PROTO 2, EMPTY_DICT, BINUNICODE "ab", BININT1 7, SETITEM, STOP
        let good = b"\x80\x02}X\x02\x00\x00\x00abK\x07s.";
        assert_eq!(check_pickle(good), Ok(()));
        // A string that claims 4 GiB in a 20-byte pickle.
        let huge = b"\x80\x02}X\xff\xff\xff\xffab.";
        assert!(check_pickle(huge)
            .err()
            .unwrap_or_default()
            .contains("wants 4294967295 bytes"));
        assert!(check_pickle(b"\x80\x02}")
            .err()
            .unwrap_or_default()
            .contains("STOP"));
        assert!(check_pickle(b"\x80").is_err());
        assert!(check_pickle(b"\x8a\x09123456789.")
            .err()
            .unwrap_or_default()
            .contains("64 bits"));
        assert!(check_pickle(b"ctorch\nFloatStorage").is_err());
        assert_eq!(check_pickle(b"ctorch\nFloatStorage\n."), Ok(()));
    }
}
