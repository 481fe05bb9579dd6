//! Model hyper-parameters, read from the reference's `params.json`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The largest position yoco accepts by default: RoPE angles are computed as `pos as f32 * inv_freq`
/// (as the reference does), and `f32` represents every integer exactly only up to 2^24.
pub const DEFAULT_MAX_POSITIONS: usize = 1 << 24;

/// Sanity bounds on sizes read from a file, checked before anything is allocated from them.
const MAX_DIM: usize = 1 << 16;
const MAX_HIDDEN: usize = 1 << 18;
const MAX_LAYERS: usize = 1 << 10;
const MAX_VOCAB: usize = 1 << 22;
const MAX_WINDOW: usize = 1 << 24;

/// Hyper-parameters of a YOCO model, field for field the reference's `params.json`
/// (`YOCOArgs` in the reference code).
///
/// Build one by hand or with [`Config::from_file`] / [`Config::from_json`], then call
/// [`Config::validate`] (the loaders do it for you).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Width of the residual stream.
    pub dim: usize,
    /// Total number of layers: `n_layers / 2` self-decoder layers, then as many cross-decoder layers.
    pub n_layers: usize,
    /// Inner width of the SwiGLU feed-forward networks.
    pub hidden_dim: usize,
    /// Heads of the self-decoder mixer (gated retention or sliding-window attention).
    pub n_self_heads: usize,
    /// Query heads of the cross-decoder.
    pub n_attn_heads: usize,
    /// Key/value heads of the global KV cache (grouped-query attention).
    pub n_attn_kv_heads: usize,
    /// Rows of the embedding and output projection.
    pub vocab_size: usize,
    /// RoPE base (`theta`).
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// Window of the sliding-window self-decoder; absent means gated retention.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Largest number of positions (prompt plus generated tokens) a sequence may reach.
    /// Not a reference field: defaults to [`DEFAULT_MAX_POSITIONS`].
    #[serde(default = "default_max_positions")]
    pub max_positions: usize,

    // Fields the reference trainer writes that do not affect inference.
    #[doc(hidden)]
    #[serde(default, skip_serializing)]
    pub max_batch_size: Option<i64>,
    #[doc(hidden)]
    #[serde(default, skip_serializing)]
    pub max_seq_len: Option<i64>,
    #[doc(hidden)]
    #[serde(default, skip_serializing)]
    pub model_parallel_size: Option<i64>,
    #[doc(hidden)]
    #[serde(default, skip_serializing)]
    pub load_checkpoint: Option<bool>,
}

fn default_rope_theta() -> f64 {
    10000.0
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_max_positions() -> usize {
    DEFAULT_MAX_POSITIONS
}

/// serde's message for a value of the wrong type (`invalid value: integer `-2`, expected usize`)
/// does not say which field holds it: find the field by trying each one in a valid config.
fn describe_json_error(text: &str, e: serde_json::Error) -> String {
    let message = e.to_string();
    let (Ok(serde_json::Value::Object(fields)), Ok(serde_json::Value::Object(valid))) = (
        serde_json::from_str::<serde_json::Value>(text),
        serde_json::to_value(Config::new(2, 2, 2, 1, 1, 1, 2)),
    ) else {
        return message;
    };
    for (name, value) in fields {
        let mut probe = valid.clone();
        probe.insert(name.clone(), value);
        if serde_json::from_value::<Config>(serde_json::Value::Object(probe)).is_err() {
            return format!("field `{name}`: {message}");
        }
    }
    message
}

/// Which efficient self-attention the self-decoder uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelfMixer {
    /// Gated retention (gRet), the reference default: a `(H, d, d)` state per layer.
    GatedRetention,
    /// Sliding-window attention over the last `window` tokens.
    SlidingWindow {
        /// Number of keys each query sees, itself included.
        window: usize,
    },
}

impl Config {
    /// A config with the reference's defaults for the optional fields.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dim: usize,
        n_layers: usize,
        hidden_dim: usize,
        n_self_heads: usize,
        n_attn_heads: usize,
        n_attn_kv_heads: usize,
        vocab_size: usize,
    ) -> Self {
        Config {
            dim,
            n_layers,
            hidden_dim,
            n_self_heads,
            n_attn_heads,
            n_attn_kv_heads,
            vocab_size,
            rope_theta: default_rope_theta(),
            norm_eps: default_norm_eps(),
            sliding_window: None,
            max_positions: DEFAULT_MAX_POSITIONS,
            max_batch_size: None,
            max_seq_len: None,
            model_parallel_size: None,
            load_checkpoint: None,
        }
    }

    /// Parses and validates a `params.json` text.
    pub fn from_json(text: &str) -> Result<Self> {
        Self::parse(text, Path::new("params.json"))
    }

    /// Reads and validates a `params.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        // A params.json is a few hundred bytes; refuse to slurp something huge.
        if meta.len() > 1 << 20 {
            return Err(Error::Json {
                path: path.into(),
                message: format!("file is {} bytes, too large for a params.json", meta.len()),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, path)
    }

    fn parse(text: &str, path: &Path) -> Result<Self> {
        let cfg: Config = serde_json::from_str(text).map_err(|e| Error::Json {
            path: path.into(),
            message: describe_json_error(text, e),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Serialises to `params.json` form.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).map_err(|e| Error::Config(e.to_string()))
    }

    /// Checks that the shapes are possible. The reference accepts some impossible configs
    /// silently (an odd `n_layers` drops a layer); yoco refuses them.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        let positive = [
            ("dim", self.dim, MAX_DIM),
            ("n_layers", self.n_layers, MAX_LAYERS),
            ("hidden_dim", self.hidden_dim, MAX_HIDDEN),
            ("n_self_heads", self.n_self_heads, MAX_DIM),
            ("n_attn_heads", self.n_attn_heads, MAX_DIM),
            ("n_attn_kv_heads", self.n_attn_kv_heads, MAX_DIM),
            ("vocab_size", self.vocab_size, MAX_VOCAB),
        ];
        for (name, value, max) in positive {
            if value == 0 {
                return bad(format!("{name} must be positive, got 0"));
            }
            if value > max {
                return bad(format!(
                    "{name} = {value} is larger than the supported {max}"
                ));
            }
        }
        if !self.n_layers.is_multiple_of(2) {
            return bad(format!(
                "n_layers must be even (half self-decoder, half cross-decoder), got {}",
                self.n_layers
            ));
        }
        if !self.dim.is_multiple_of(self.n_self_heads) {
            return bad(format!(
                "dim {} is not divisible by n_self_heads {}",
                self.dim, self.n_self_heads
            ));
        }
        if !self.dim.is_multiple_of(self.n_attn_heads) {
            return bad(format!(
                "dim {} is not divisible by n_attn_heads {}",
                self.dim, self.n_attn_heads
            ));
        }
        if !self.n_attn_heads.is_multiple_of(self.n_attn_kv_heads) {
            return bad(format!(
                "n_attn_heads {} is not a multiple of n_attn_kv_heads {}",
                self.n_attn_heads, self.n_attn_kv_heads
            ));
        }
        if !self.self_head_dim().is_multiple_of(2) {
            return bad(format!(
                "self-decoder head size dim/n_self_heads = {} is odd; RoPE rotates pairs",
                self.self_head_dim()
            ));
        }
        if !self.attn_head_dim().is_multiple_of(2) {
            return bad(format!(
                "cross-decoder head size dim/n_attn_heads = {} is odd; RoPE rotates pairs",
                self.attn_head_dim()
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return bad(format!(
                "rope_theta must be finite and > 1, got {}",
                self.rope_theta
            ));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0 && self.norm_eps < 1.0) {
            return bad(format!("norm_eps must be in (0, 1), got {}", self.norm_eps));
        }
        match self.sliding_window {
            Some(0) => return bad("sliding_window must be at least 1, got 0".into()),
            Some(w) if w > MAX_WINDOW => {
                return bad(format!(
                    "sliding_window {w} is larger than the supported {MAX_WINDOW}"
                ))
            }
            _ => {}
        }
        if self.max_positions == 0 || self.max_positions > DEFAULT_MAX_POSITIONS {
            return bad(format!(
                "max_positions must be in 1..={DEFAULT_MAX_POSITIONS}, got {}",
                self.max_positions
            ));
        }
        Ok(())
    }

    /// The self-decoder's mixer.
    pub fn self_mixer(&self) -> SelfMixer {
        match self.sliding_window {
            Some(window) => SelfMixer::SlidingWindow { window },
            None => SelfMixer::GatedRetention,
        }
    }

    /// Number of self-decoder layers (= number of cross-decoder layers).
    pub fn n_half_layers(&self) -> usize {
        self.n_layers / 2
    }

    /// Head size of the self-decoder mixer, `dim / n_self_heads`.
    pub fn self_head_dim(&self) -> usize {
        self.dim / self.n_self_heads
    }

    /// Head size of the cross-decoder and global KV, `dim / n_attn_heads`.
    pub fn attn_head_dim(&self) -> usize {
        self.dim / self.n_attn_heads
    }

    /// Width of the global K (and V) projection, `n_attn_kv_heads * attn_head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.n_attn_kv_heads * self.attn_head_dim()
    }

    /// Bytes of cache one token adds, for `bytes_per_value` (4 for f32, 2 for bf16/f16):
    /// YOCO stores one global K/V; the self-decoder state does not grow.
    pub fn cache_bytes_per_token(&self, bytes_per_value: usize) -> usize {
        2 * self.kv_dim() * bytes_per_value
    }

    /// What a standard Transformer of the same shape (`n_layers` layers, each with its own
    /// K/V of `n_attn_kv_heads` heads) would store per token.
    pub fn transformer_cache_bytes_per_token(&self, bytes_per_value: usize) -> usize {
        self.n_layers * self.cache_bytes_per_token(bytes_per_value)
    }

    /// Bytes of self-decoder state per sequence, independent of its length: `(H, d, d)` f32
    /// per gated-retention layer, or a window of `W` keys and values per sliding-window layer.
    pub fn self_state_bytes(&self, bytes_per_value: usize) -> usize {
        let d = self.self_head_dim();
        let per_layer = match self.self_mixer() {
            SelfMixer::GatedRetention => self.n_self_heads * d * d * 4,
            SelfMixer::SlidingWindow { window } => 2 * window * self.dim * bytes_per_value,
        };
        self.n_half_layers() * per_layer
    }
}
