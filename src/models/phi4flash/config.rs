//! Phi-4-mini-flash (SambaY) hyper-parameters, read from a Hugging Face `config.json`
//! (`model_type: phi4flash`), and the role every layer plays.
//!
//! The real file carries no `mamba_*` keys: the reference's config class fills them with its
//! defaults (d_state 16, d_conv 4, expand 2, dt_rank "auto" = ceil(hidden / 16)). The reference
//! reads `mamba_d_state`, `mamba_d_conv`, `mamba_expand` and `mb_per_layer` but always uses
//! dt_rank = ceil(hidden / 16) whatever `mamba_dt_rank` says, so a different value is refused
//! rather than silently followed.

use std::path::Path;

use serde::Deserialize;

use crate::{Error, Result};

const MAX_DIM: usize = 1 << 16;
const MAX_HIDDEN: usize = 1 << 18;
const MAX_LAYERS: usize = 1 << 10;
const MAX_VOCAB: usize = 1 << 22;
const MAX_STATE: usize = 1 << 10;

/// What one decoder layer of a SambaY model is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LayerRole {
    /// Mamba-1 mixer of the self-decoder (even layers below the midpoint).
    Mamba,
    /// Differential attention over a sliding window of `W` keys (odd layers below the midpoint).
    WindowAttention,
    /// The last Mamba layer (`L/2`): its scan output (before the z gate) is the GMU memory.
    MemoryMamba,
    /// Full causal differential attention (`L/2 + 1`): its K/V are the one shared cache.
    GlobalAttention,
    /// Gated memory unit of the cross-decoder (even layers from `L/2 + 2`).
    Gmu,
    /// Cross differential attention over the shared K/V (odd layers from `L/2 + 2`).
    CrossAttention,
}

impl LayerRole {
    /// Is this layer's mixer a differential attention?
    pub fn is_attention(self) -> bool {
        matches!(
            self,
            LayerRole::WindowAttention | LayerRole::GlobalAttention | LayerRole::CrossAttention
        )
    }

    /// Is this layer's mixer a Mamba-1 mixer?
    pub fn is_mamba(self) -> bool {
        matches!(self, LayerRole::Mamba | LayerRole::MemoryMamba)
    }
}

/// Hyper-parameters of a Phi-4-mini-flash (SambaY) model, as its `config.json` gives them.
#[derive(Clone, Debug, PartialEq)]
pub struct Phi4FlashConfig {
    /// Width of the residual stream (`hidden_size`).
    pub hidden_size: usize,
    /// Inner width of the MLP (`fc1` outputs twice this).
    pub intermediate_size: usize,
    /// Decoder layers, a multiple of 4.
    pub num_hidden_layers: usize,
    /// Query heads of every attention layer.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention), even: heads are split even/odd.
    pub num_key_value_heads: usize,
    /// Rows of the embedding (and of the tied head).
    pub vocab_size: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// `W`: keys a sliding-window query sees, itself included.
    pub sliding_window: usize,
    /// Mamba state size per channel (`mamba_d_state`).
    pub mamba_d_state: usize,
    /// Mamba convolution width (`mamba_d_conv`).
    pub mamba_d_conv: usize,
    /// Mamba inner width over `hidden_size` (`mamba_expand`).
    pub mamba_expand: usize,
    /// Largest number of positions a sequence may reach (`max_position_embeddings`; the model
    /// has no position embedding, so this is a limit of the cache, not of the weights).
    pub max_positions: usize,
    /// `tie_word_embeddings`.
    pub tie_word_embeddings: bool,
    /// Where generation stops: `eos_token_id` of the directory's `generation_config.json` (one
    /// id or a list), empty without one. `config.json`'s own `bos/eos/pad_token_id` are
    /// placeholders in the real model (0/1/2) and are not used.
    pub stop_token_ids: Vec<u32>,
}

/// The keys of `config.json` yoco reads; everything else is ignored, as the reference does.
#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    vocab_size: usize,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
    sliding_window: Option<serde_json::Value>,
    layer_types: Option<Vec<String>>,
    mb_per_layer: Option<usize>,
    mamba_d_state: Option<usize>,
    mamba_d_conv: Option<usize>,
    mamba_expand: Option<usize>,
    mamba_dt_rank: Option<serde_json::Value>,
    mamba_conv_bias: Option<bool>,
    mamba_proj_bias: Option<bool>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
}

fn default_eps() -> f64 {
    1e-5
}

/// `model_type` of the configs this module reads.
pub(crate) const MODEL_TYPE: &str = "phi4flash";

/// `eos_token_id` of a `generation_config.json` (a number or a list of numbers; absent: none).
pub(crate) fn stop_ids_from_generation_config(path: &Path) -> Result<Vec<u32>> {
    let text = read_limited(path)?;
    stop_ids_from_json(&text).map_err(|e| match e {
        Error::Config(message) => Error::Json {
            path: path.into(),
            message,
        },
        other => other,
    })
}

/// `eos_token_id` of the text of a `generation_config.json` (a `Config` error when it is not).
pub(crate) fn stop_ids_from_json(text: &str) -> Result<Vec<u32>> {
    let json: serde_json::Value =
        serde_json::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
    ids(&json.get("eos_token_id").cloned(), "eos_token_id")
}

/// A small JSON file's text (configs are kilobytes; a huge file is refused before it is read).
pub(crate) fn read_limited(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.len() > 1 << 20 {
        return Err(Error::Json {
            path: path.into(),
            message: format!("{} bytes is too large for a config", meta.len()),
        });
    }
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

/// Token ids written as a number or a list of numbers.
fn ids(v: &Option<serde_json::Value>, key: &str) -> Result<Vec<u32>> {
    let bad = || Error::Config(format!("`{key}` must be a token id or a list of token ids"));
    let one = |x: &serde_json::Value| x.as_u64().and_then(|x| u32::try_from(x).ok());
    match v {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(serde_json::Value::Array(items)) => {
            items.iter().map(|x| one(x).ok_or_else(bad)).collect()
        }
        Some(x) => Ok(vec![one(x).ok_or_else(bad)?]),
    }
}

impl Phi4FlashConfig {
    /// Reads `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = read_limited(path)?;
        Phi4FlashConfig::from_json(&text).map_err(|e| match e {
            Error::Config(message) => Error::Json {
                path: path.into(),
                message,
            },
            other => other,
        })
    }

    /// Parses the text of a `config.json` and validates it.
    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        if raw.model_type.as_deref() != Some(MODEL_TYPE) {
            return Err(Error::Config(format!(
                "model_type is {:?}, expected \"{MODEL_TYPE}\"",
                raw.model_type
            )));
        }
        let layers = raw.num_hidden_layers;
        let cfg = Phi4FlashConfig {
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads: raw.num_key_value_heads.unwrap_or(raw.num_attention_heads),
            vocab_size: raw.vocab_size,
            layer_norm_eps: raw.layer_norm_eps,
            sliding_window: window(&raw.sliding_window, layers)?,
            mamba_d_state: raw.mamba_d_state.unwrap_or(16),
            mamba_d_conv: raw.mamba_d_conv.unwrap_or(4),
            mamba_expand: raw.mamba_expand.unwrap_or(2),
            max_positions: raw.max_position_embeddings.unwrap_or(1 << 18),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(true),
            stop_token_ids: Vec::new(),
        };
        if let Some(mb) = raw.mb_per_layer {
            if mb != 2 {
                return Err(Error::Config(format!(
                    "mb_per_layer = {mb}: only Mamba on every other layer (2) is supported"
                )));
            }
        }
        if raw.mamba_conv_bias == Some(false) || raw.mamba_proj_bias == Some(true) {
            return Err(Error::Config(
                "mamba_conv_bias = false or mamba_proj_bias = true: the reference always builds \
                 the conv with a bias and the projections without"
                    .into(),
            ));
        }
        match &raw.mamba_dt_rank {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::String(s)) if s == "auto" => {}
            Some(v) if v.as_u64() == Some(cfg.dt_rank() as u64) => {}
            Some(v) => {
                return Err(Error::Config(format!(
                    "mamba_dt_rank = {v}: the reference always uses ceil(hidden_size / 16) = {}",
                    cfg.dt_rank()
                )))
            }
        }
        cfg.validate()?;
        if let Some(types) = &raw.layer_types {
            cfg.check_layer_types(types)?;
        }
        Ok(cfg)
    }

    /// Checks every size against the others and against sane bounds (before anything is
    /// allocated from them).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        let within = |name: &str, v: usize, max: usize| -> Result<()> {
            if v == 0 || v > max {
                return Err(Error::Config(format!("{name} = {v} is not in 1..={max}")));
            }
            Ok(())
        };
        within("hidden_size", self.hidden_size, MAX_DIM)?;
        within("intermediate_size", self.intermediate_size, MAX_HIDDEN)?;
        within("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS)?;
        within("num_attention_heads", self.num_attention_heads, MAX_DIM)?;
        within("num_key_value_heads", self.num_key_value_heads, MAX_DIM)?;
        within("vocab_size", self.vocab_size, MAX_VOCAB)?;
        within("sliding_window", self.sliding_window, 1 << 24)?;
        within("mamba_d_state", self.mamba_d_state, MAX_STATE)?;
        within("mamba_d_conv", self.mamba_d_conv, 64)?;
        within("mamba_expand", self.mamba_expand, 16)?;
        within("max_position_embeddings", self.max_positions, 1 << 30)?;
        if !self.num_hidden_layers.is_multiple_of(4) {
            return bad(format!(
                "num_hidden_layers = {} is not a multiple of 4",
                self.num_hidden_layers
            ));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        let (h, kv) = (self.num_attention_heads, self.num_key_value_heads);
        if !kv.is_multiple_of(2) || !h.is_multiple_of(kv) {
            return bad(format!(
                "{h} query heads over {kv} key/value heads: differential attention needs an \
                 even number of key/value heads that divides the query heads"
            ));
        }
        if !self.layer_norm_eps.is_finite() || self.layer_norm_eps <= 0.0 {
            return bad(format!("layer_norm_eps = {}", self.layer_norm_eps));
        }
        if !self.tie_word_embeddings {
            return bad("tie_word_embeddings = false: the reference always ties the head".into());
        }
        Ok(())
    }

    /// `layer_types`, when a config lists them, must give the roles the layer index implies.
    fn check_layer_types(&self, types: &[String]) -> Result<()> {
        if types.len() != self.num_hidden_layers {
            return Err(Error::Config(format!(
                "layer_types lists {} layers, num_hidden_layers is {}",
                types.len(),
                self.num_hidden_layers
            )));
        }
        for (i, t) in types.iter().enumerate() {
            let windowed = self.role(i) == LayerRole::WindowAttention;
            if (t == "sliding_attention") != windowed {
                return Err(Error::Config(format!(
                    "layer_types[{i}] = {t:?}, but layer {i} is {:?}",
                    self.role(i)
                )));
            }
        }
        Ok(())
    }

    /// Width of a head (`hidden_size / num_attention_heads`).
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// Inner width of the Mamba and GMU mixers (`mamba_expand * hidden_size`).
    pub fn d_inner(&self) -> usize {
        self.mamba_expand * self.hidden_size
    }

    /// Rank of the Mamba step-size projection: ceil(hidden_size / 16), as the reference.
    pub fn dt_rank(&self) -> usize {
        self.hidden_size.div_ceil(16)
    }

    /// The role of layer `i`.
    pub fn role(&self, i: usize) -> LayerRole {
        let half = self.num_hidden_layers / 2;
        match (i.is_multiple_of(2), i) {
            (true, i) if i < half => LayerRole::Mamba,
            (false, i) if i < half => LayerRole::WindowAttention,
            (true, i) if i == half => LayerRole::MemoryMamba,
            (false, i) if i == half + 1 => LayerRole::GlobalAttention,
            (true, _) => LayerRole::Gmu,
            (false, _) => LayerRole::CrossAttention,
        }
    }

    /// Layers that run for every token (the self-decoder, ending at the shared K/V): `L/2 + 2`.
    pub fn n_self_layers(&self) -> usize {
        self.num_hidden_layers / 2 + 2
    }

    /// The real Phi-4-mini-flash-reasoning's shape (its `config.json`), for benchmarks with
    /// random weights.
    pub fn phi4_mini_flash() -> Self {
        Phi4FlashConfig {
            hidden_size: 2560,
            intermediate_size: 10240,
            num_hidden_layers: 32,
            num_attention_heads: 40,
            num_key_value_heads: 20,
            vocab_size: 200064,
            layer_norm_eps: 1e-5,
            sliding_window: 512,
            mamba_d_state: 16,
            mamba_d_conv: 4,
            mamba_expand: 2,
            max_positions: 262144,
            tie_word_embeddings: true,
            stop_token_ids: Vec::new(),
        }
    }
}

/// `sliding_window` as a number, or the per-layer list the config class expands it into (the
/// same `W` on every windowed layer, null elsewhere).
fn window(v: &Option<serde_json::Value>, layers: usize) -> Result<usize> {
    let bad = |m: &str| Err(Error::Config(format!("sliding_window: {m}")));
    match v {
        Some(serde_json::Value::Number(n)) => match n.as_u64() {
            Some(w) => Ok(w as usize),
            None => bad("must be a positive integer"),
        },
        Some(serde_json::Value::Array(items)) => {
            if items.len() != layers {
                return bad("a per-layer list must have one entry per layer");
            }
            let mut w = None;
            for (i, item) in items.iter().enumerate() {
                let windowed = i < layers / 2 && i % 2 == 1;
                match (item.as_u64(), windowed) {
                    (None, false) if item.is_null() => {}
                    (Some(x), true) if w.is_none_or(|w| w == x) => w = Some(x),
                    _ => return bad(&format!("entry {i} ({item}) does not fit layer {i}'s role")),
                }
            }
            match w {
                Some(w) => Ok(w as usize),
                None => bad("no windowed layer"),
            }
        }
        _ => bad("missing (a number or a per-layer list)"),
    }
}
