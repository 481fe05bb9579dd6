//! What the examples share: argument parsers for clap, the benchmark shapes (bench-160m, YOCO-3B)
//! and their Llama twins, the bytes and FLOPs that bound each phase, prompts, memory readings and
//! timing. Each example includes it with `mod common;` and uses a part of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::llama;
use yoco::Config;

// ---------------------------------------------------------------------------------------------
// Argument parsers (clap `value_parser` functions)

/// `cpu`, `cuda` or `cuda:N`, through the library's own parser.
pub fn device(name: &str) -> Result<Device, String> {
    yoco::device_by_name(name).map_err(|e| e.to_string())
}

/// `f32`, `bf16` or `f16`, through the library's own parser.
pub fn dtype(name: &str) -> Result<DType, String> {
    yoco::dtype_by_name(name).map_err(|e| e.to_string())
}

/// The projections' quantization at load time, as a flag gives it (`None` for `none`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quant(pub Option<yoco::Quant>);

/// `none`, `q8_0`, `q4_0` or `q4_k`.
pub fn quant(name: &str) -> Result<Quant, String> {
    match name {
        "none" => Ok(Quant(None)),
        _ => name
            .parse()
            .map(|q| Quant(Some(q)))
            .map_err(|e: yoco::Error| e.to_string()),
    }
}

/// The name of a quantization choice (`none` for float).
pub fn quant_name(q: Option<yoco::Quant>) -> &'static str {
    q.map_or("none", |q| q.name())
}

/// A token count of at least 1: `4096`, or with a `k` suffix (x 1024) `4k`, `128K`.
pub fn tokens(s: &str) -> Result<usize, String> {
    let t = s.trim().to_ascii_lowercase();
    let n = match t.strip_suffix('k') {
        Some(k) => k.parse::<usize>().ok().and_then(|k| k.checked_mul(1024)),
        None => t.parse::<usize>().ok(),
    };
    match n {
        Some(n) if n > 0 => Ok(n),
        Some(_) => Err("must be at least 1".into()),
        None => Err(format!("`{s}` is not a token count (e.g. 4096 or 4k)")),
    }
}

// ---------------------------------------------------------------------------------------------
// Shapes

/// A model shape that YOCO and its Transformer twin share.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub name: &'static str,
    pub dim: usize,
    pub n_layers: usize,
    pub hidden_dim: usize,
    /// Retention heads of the self-decoder.
    pub n_self_heads: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub vocab: usize,
}

/// The paper's smallest scaling size (random weights: what the CPU profile runs).
pub const BENCH_160M: Shape = Shape {
    name: "bench-160m",
    dim: 768,
    n_layers: 12,
    hidden_dim: 2048,
    n_self_heads: 3,
    n_heads: 12,
    n_kv_heads: 4,
    vocab: 32000,
};

/// YOCO-3B's shape (what the GPU bench runs).
pub const YOCO_3B: Shape = Shape {
    name: "3b",
    dim: 3072,
    n_layers: 26,
    hidden_dim: 8192,
    n_self_heads: 24,
    n_heads: 24,
    n_kv_heads: 8,
    vocab: 100288,
};

/// A toy shape for running a benchmark's code on a CPU in a moment.
pub const TINY: Shape = Shape {
    name: "tiny",
    dim: 256,
    n_layers: 4,
    hidden_dim: 512,
    n_self_heads: 4,
    n_heads: 4,
    n_kv_heads: 2,
    vocab: 1024,
};

impl Shape {
    /// The YOCO config: gated retention, or a sliding window of `window` tokens.
    pub fn yoco(&self, window: Option<usize>) -> Config {
        let mut cfg = Config::new(
            self.dim,
            self.n_layers,
            self.hidden_dim,
            self.n_self_heads,
            self.n_heads,
            self.n_kv_heads,
            self.vocab,
        );
        cfg.sliding_window = window;
        cfg
    }

    /// The Transformer twin: candle-transformers' Llama with the same width, depth, heads, FFN
    /// and vocabulary.
    pub fn llama(&self, max_positions: usize) -> llama::Config {
        llama::Config {
            hidden_size: self.dim,
            intermediate_size: self.hidden_dim,
            vocab_size: self.vocab,
            num_hidden_layers: self.n_layers,
            num_attention_heads: self.n_heads,
            num_key_value_heads: self.n_kv_heads,
            use_flash_attn: false,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            bos_token_id: None,
            eos_token_id: None,
            rope_scaling: None,
            max_position_embeddings: max_positions,
            tie_word_embeddings: false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Models with random weights

/// Llama's parameter names and shapes.
pub fn llama_tensors(cfg: &llama::Config) -> Vec<(String, Vec<usize>)> {
    let (d, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let kv = d / cfg.num_attention_heads * cfg.num_key_value_heads;
    let mut out = vec![
        ("model.embed_tokens.weight".to_string(), vec![v, d]),
        ("lm_head.weight".to_string(), vec![v, d]),
        ("model.norm.weight".to_string(), vec![d]),
    ];
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        out.push((format!("{p}.self_attn.q_proj.weight"), vec![d, d]));
        out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, d]));
        out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, d]));
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![d, d]));
        out.push((format!("{p}.mlp.gate_proj.weight"), vec![f, d]));
        out.push((format!("{p}.mlp.up_proj.weight"), vec![f, d]));
        out.push((format!("{p}.mlp.down_proj.weight"), vec![d, f]));
        out.push((format!("{p}.input_layernorm.weight"), vec![d]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
    }
    out
}

/// Parameters in a list of (name, shape).
pub fn n_params(tensors: &[(String, Vec<usize>)]) -> usize {
    tensors
        .iter()
        .map(|(_, shape)| shape.iter().product::<usize>())
        .sum()
}

/// The Llama twin with random weights drawn as `yoco::Model::random` draws its own (std 0.02,
/// norm weights 1), built directly on `device`.
pub fn random_llama(
    cfg: &llama::Config,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<llama::Llama> {
    let mut tensors = HashMap::new();
    for (name, shape) in llama_tensors(cfg) {
        let t = if shape.len() == 1 {
            Tensor::ones(shape.as_slice(), dtype, device)?
        } else {
            // Drawn in f32 (CUDA draws no half types), then converted.
            Tensor::randn(0f32, 0.02, shape.as_slice(), device)?.to_dtype(dtype)?
        };
        tensors.insert(name, t);
    }
    llama::Llama::load(VarBuilder::from_tensors(tensors, dtype, device), cfg)
}

/// Bytes of Llama's K/V for `positions` tokens (one K and one V per layer).
pub fn llama_kv_bytes(cfg: &llama::Config, positions: usize, bytes_per_value: usize) -> usize {
    let kv_dim = cfg.hidden_size / cfg.num_attention_heads * cfg.num_key_value_heads;
    cfg.num_hidden_layers * 2 * kv_dim * positions * bytes_per_value
}

// ---------------------------------------------------------------------------------------------
// What bounds each phase, per token

/// Bytes a YOCO decode step reads at context `ctx`: every weight but the embedding table (one
/// row of it is read), the global K/V once per cross-decoder layer, and the self-decoder state
/// (read and written).
pub fn yoco_decode_bytes(cfg: &Config, ctx: usize, bytes_per_value: usize) -> f64 {
    let counts = cfg.param_counts();
    let weights = (counts.total() - counts.embedding) * bytes_per_value;
    let kv = cfg.n_half_layers() * cfg.cache_bytes_per_token(bytes_per_value) * ctx;
    let state = 2 * cfg.self_state_bytes(bytes_per_value);
    (weights + kv + state) as f64
}

/// [`yoco_decode_bytes`] for a loaded model: its weights as they are held (quantized or float),
/// not `bytes_per_value` each; the K/V and the state as there.
pub fn model_decode_bytes(m: &yoco::Model, ctx: usize, bytes_per_value: usize) -> f64 {
    let weights: usize = m
        .weights()
        .iter()
        .filter(|w| w.part != yoco::Part::Embedding)
        .map(|w| w.bytes)
        .sum();
    match m.config() {
        yoco::ModelConfig::Phi4Flash(cfg) => {
            // The shared K/V is read by the global layer and every cross-attention layer; the
            // window K/V and the Mamba states are read and written each step.
            let readers = 1 + cfg.num_hidden_layers / 4 - 1;
            let kv = 2 * cfg.num_key_value_heads * cfg.head_dim() * bytes_per_value * ctx;
            let window = cfg.num_hidden_layers / 4
                * 2
                * cfg.num_key_value_heads
                * cfg.head_dim()
                * bytes_per_value
                * cfg.sliding_window.min(ctx);
            let mamba = (cfg.num_hidden_layers / 4 + 1)
                * cfg.d_inner()
                * (cfg.mamba_d_state + cfg.mamba_d_conv)
                * 4;
            (weights + readers * kv + window + 2 * mamba) as f64
        }
        cfg => {
            let Some(cfg) = cfg.as_yoco() else {
                return weights as f64;
            };
            let kv = cfg.n_half_layers() * cfg.cache_bytes_per_token(bytes_per_value) * ctx;
            let state = 2 * cfg.self_state_bytes(bytes_per_value);
            (weights + kv + state) as f64
        }
    }
}

/// Bytes a Llama decode step reads at context `ctx`: every weight but the embedding table, and
/// every layer's own K/V.
pub fn llama_decode_bytes(cfg: &llama::Config, ctx: usize, bytes_per_value: usize) -> f64 {
    let weights = n_params(&llama_tensors(cfg)) - cfg.vocab_size * cfg.hidden_size;
    (weights * bytes_per_value + llama_kv_bytes(cfg, ctx, bytes_per_value)) as f64
}

/// FLOPs of one YOCO prompt token: `2 x (self-decoder + global-K/V parameters)`; with early exit
/// a prompt token runs through nothing else (the cross-decoder sees only the last one).
pub fn yoco_prefill_flops(cfg: &Config) -> f64 {
    let counts = cfg.param_counts();
    let params = counts.self_decoder + counts.global_kv;
    2.0 * params as f64
}

// ---------------------------------------------------------------------------------------------
// Prompts, tokens, timing, memory

/// `n` deterministic pseudo-random token ids in `4..vocab` (clear of the special ids 0..3).
pub fn random_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let span = (vocab as u64).saturating_sub(4).max(1);
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (4 + (x >> 33) % span) as u32
        })
        .collect()
}

/// The greedy next token of logits `(1, vocab)` or `(vocab,)`, read back to the host (as a
/// sampler must).
pub fn next_token(logits: &Tensor) -> candle_core::Result<u32> {
    logits.flatten_all()?.argmax(D::Minus1)?.to_scalar::<u32>()
}

/// Whether every value of `t` is finite.
pub fn all_finite(t: &Tensor) -> candle_core::Result<bool> {
    let values: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(values.iter().all(|x| x.is_finite()))
}

/// Runs `f` and returns its value and its seconds, the device synchronised before the clock
/// starts and before it stops (CUDA queues work; on the CPU this costs nothing).
pub fn timed<T, E: From<candle_core::Error>>(
    device: &Device,
    f: impl FnOnce() -> Result<T, E>,
) -> Result<(T, f64), E> {
    device.synchronize()?;
    let t0 = Instant::now();
    let value = f()?;
    device.synchronize()?;
    Ok((value, t0.elapsed().as_secs_f64()))
}

/// The median (the upper one of an even count); NaN for none.
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

/// A `kB` field of `/proc/self/status` in bytes; 0 where there is no such file (not Linux).
fn proc_status_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// This process's resident memory now.
pub fn rss_bytes() -> u64 {
    proc_status_bytes("VmRSS")
}

/// This process's peak resident memory so far.
pub fn peak_rss_bytes() -> u64 {
    proc_status_bytes("VmHWM")
}
