//! Quantized weights: which formats yoco offers, how a projection falls back when its input width
//! does not fit a format's block, and what each tensor of a loaded model got.
//!
//! Quantization applies to the projections (the self-decoder mixers, the global K/V, the
//! cross-decoder's query and output, the feed-forward networks and the output projection): the
//! weights a decode step reads. The embedding (one row read per token), the norms and the
//! retention state stay in float.
//!
//! Formats are candle's (`candle_core::quantized`, the GGML block formats): a row of `in` weights
//! is cut into blocks of 32 (Q8_0, Q4_0, Q5_0) or 256 (K-quants) values, each with its own scale,
//! so a weight's input width must be a multiple of the block. A projection whose width is not
//! takes the next format of its [`Quant::fallbacks`] that fits, else stays in float; a fused
//! projection (q, k, v, g and gt; fc1 and gate; k and v) shares its input width, so all its pieces
//! get the same format. [`crate::Model::weights`] says what every tensor got.

use std::fmt;
use std::str::FromStr;

use candle_core::quantized::GgmlDType;
use candle_core::DType;

use crate::checkpoint::catalogue::Part;
use crate::{Error, Result};

/// A quantized format to give the projections at load time
/// ([`crate::LoadOptions::quant`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Quant {
    /// 8-bit integers with one f16 scale per block of 32: 8.5 bits per weight, 27% of f32.
    Q8_0,
    /// 4-bit integers with one f16 scale per block of 32: 4.5 bits per weight, 14% of f32.
    Q4_0,
    /// 4-bit K-quant: super-blocks of 256 in 8 sub-blocks, each with a 6-bit scale and minimum:
    /// 4.5 bits per weight, 14% of f32. Widths that are not a multiple of 256 take Q5_0, or
    /// Q8_0 where Q5_0 would have an odd number of blocks a row.
    Q4K,
}

impl Quant {
    /// Every format, in the order of their names.
    pub const ALL: [Quant; 3] = [Quant::Q8_0, Quant::Q4_0, Quant::Q4K];

    /// The name on the command line and in files: `q8_0`, `q4_0`, `q4_k`.
    pub fn name(self) -> &'static str {
        match self {
            Quant::Q8_0 => "q8_0",
            Quant::Q4_0 => "q4_0",
            Quant::Q4K => "q4_k",
        }
    }

    /// The formats tried, in order, for a projection: the first that takes the input width is
    /// taken (its block divides the width, and for Q5_0 the row has an even number of blocks);
    /// when none does, the projection stays in float.
    ///
    /// Q4_K falls back to Q5_0 (blocks of 32), as llama.cpp does: for the widths a K-quant
    /// cannot take, Q5_0 is the 32-block format closest to it in error (Q4_0, with no minimum and
    /// one scale per 32 weights, loses clearly more). Rows of an odd number of Q5_0 blocks (a
    /// width of 160: Phi-4-mini-flash's `dt_proj`) take Q8_0 instead: candle's Q5_0 dot products
    /// need pairs of blocks, and without them every decode step dequantized the weight (4% of
    /// Phi-4-mini-flash's Q4_K step on a 2-core CPU), where Q8_0 has the fast kernels, is more
    /// exact, and at that width costs a few megabytes.
    pub fn fallbacks(self) -> &'static [GgmlDType] {
        match self {
            Quant::Q8_0 => &[GgmlDType::Q8_0],
            Quant::Q4_0 => &[GgmlDType::Q4_0],
            Quant::Q4K => &[GgmlDType::Q4K, GgmlDType::Q5_0, GgmlDType::Q8_0],
        }
    }

    /// The format a projection of input width `in_width` gets, or `None` for float.
    pub fn format_for(self, in_width: usize) -> Option<GgmlDType> {
        self.fallbacks().iter().copied().find(|&t| {
            in_width > 0
                && in_width.is_multiple_of(t.block_size())
                && !crate::kernels::quantized::needs_even_blocks(t, in_width)
        })
    }
}

impl fmt::Display for Quant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Quant {
    type Err = Error;

    /// `q8_0`, `q4_0` or `q4_k` (case-insensitive; `q4k` is accepted too).
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "q8_0" => Ok(Quant::Q8_0),
            "q4_0" => Ok(Quant::Q4_0),
            "q4_k" | "q4k" => Ok(Quant::Q4K),
            _ => Err(Error::Config(format!(
                "unknown quantization `{s}` (use q8_0, q4_0 or q4_k)"
            ))),
        }
    }
}

/// How one weight tensor is held in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    /// Plain floats of this dtype.
    Float(DType),
    /// candle's quantized blocks of this format.
    Quantized(GgmlDType),
}

impl WeightFormat {
    /// A short name: `f32`, `bf16`, `q8_0`, `q4_k`, ...
    pub fn name(&self) -> String {
        match self {
            WeightFormat::Float(d) => d.as_str().to_string(),
            WeightFormat::Quantized(t) => ggml_name(*t).to_string(),
        }
    }

    /// Whether the format is quantized.
    pub fn is_quantized(&self) -> bool {
        matches!(self, WeightFormat::Quantized(_))
    }
}

impl fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// The GGML name of a format (`q4_k`, as llama.cpp and GGUF tools write it).
pub(crate) fn ggml_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::F32 => "f32",
        GgmlDType::F16 => "f16",
        GgmlDType::BF16 => "bf16",
        GgmlDType::Q4_0 => "q4_0",
        GgmlDType::Q4_1 => "q4_1",
        GgmlDType::Q5_0 => "q5_0",
        GgmlDType::Q5_1 => "q5_1",
        GgmlDType::Q8_0 => "q8_0",
        GgmlDType::Q8_1 => "q8_1",
        GgmlDType::Q2K => "q2_k",
        GgmlDType::Q3K => "q3_k",
        GgmlDType::Q4K => "q4_k",
        GgmlDType::Q5K => "q5_k",
        GgmlDType::Q6K => "q6_k",
        GgmlDType::Q8K => "q8_k",
    }
}

/// One weight tensor of a loaded model: its official name, its shape, its part of the
/// architecture, the format it is held in and the bytes that takes.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightInfo {
    /// Official state-dict name, e.g. `self_decoder.layers.0.mixer.q_proj.weight`.
    pub name: String,
    /// Shape; linear weights are `(out, in)`.
    pub shape: Vec<usize>,
    /// Where it belongs.
    pub part: Part,
    /// How it is held.
    pub format: WeightFormat,
    /// Bytes it takes in memory.
    pub bytes: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_fallbacks_fit_their_widths() {
        for q in Quant::ALL {
            assert_eq!(q.name().parse::<Quant>().ok(), Some(q));
            assert_eq!(q.to_string(), q.name());
            // The requested format itself whenever its block divides the width.
            let own = q.fallbacks()[0];
            assert_eq!(q.format_for(3 * own.block_size()), Some(own));
            for width in [1, 31, 33, 48, 96, 160, 192, 255, 320, 768] {
                match q.format_for(width) {
                    Some(t) => assert_eq!(width % t.block_size(), 0, "{q} {width}"),
                    None => assert!(
                        q.fallbacks().iter().all(|t| width % t.block_size() != 0),
                        "{q} {width}"
                    ),
                }
            }
            assert_eq!(q.format_for(0), None);
        }
        // The shipped model's width takes Q5_0 under q4_k, the 160M bench width Q4_K.
        assert_eq!(Quant::Q4K.format_for(192), Some(GgmlDType::Q5_0));
        // Phi-4-mini-flash's `dt_proj` (160 wide: five blocks of 32) takes Q8_0.
        assert_eq!(Quant::Q4K.format_for(160), Some(GgmlDType::Q8_0));
        assert_eq!(Quant::Q4K.format_for(96), Some(GgmlDType::Q8_0));
        assert_eq!(Quant::Q4K.format_for(64), Some(GgmlDType::Q5_0));
        assert_eq!(Quant::Q4K.format_for(768), Some(GgmlDType::Q4K));
        assert_eq!(Quant::Q8_0.format_for(48), None);
        assert!("q3".parse::<Quant>().is_err());
        assert_eq!("Q4K".parse::<Quant>().ok(), Some(Quant::Q4K));
    }
}
