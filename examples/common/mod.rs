//! What the examples share: argument parsers for clap, the benchmark shapes (bench-160m, YOCO-3B)
//! and their Llama twins, the bytes and FLOPs that bound each phase, prompts, memory readings and
//! timing. Each example includes it with `mod common;` and uses a part of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use candle_core::quantized::{ggml_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, IndexOp, Module, Tensor, D};
use candle_nn::kv_cache::KvCache;
use candle_nn::{RmsNorm, VarBuilder};
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

/// This process's peak resident memory so far (since the start, or the last
/// [`reset_peak_rss`]).
pub fn peak_rss_bytes() -> u64 {
    proc_status_bytes("VmHWM")
}

/// Starts the peak resident memory again from what is resident now (Linux: `5` into
/// `/proc/self/clear_refs`), so that a peak read later is the inference's, not that of drawing
/// and quantizing random weights (a transient no checkpoint load has). False where it cannot.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

// ---------------------------------------------------------------------------------------------
// candle-transformers' Phi-3 at Phi-4-mini's shape, with a cache that can be filled

/// Phi-4-mini's shape, llama.cpp's and candle's `phi3` architecture (3.84B parameters).
#[derive(Clone, Copy, Debug)]
pub struct Phi3Shape {
    pub dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    /// Rotated dimensions of each head (Phi-4-mini: `partial_rotary_factor` 0.75 of 128).
    pub rope_dims: usize,
    pub rms_eps: f64,
    pub rope_theta: f32,
}

/// microsoft/Phi-4-mini-instruct: dim 3072, 32 layers, 24 query heads over 8 KV heads of 128,
/// FFN 8192, vocab 200064, tied embedding.
pub const PHI4_MINI: Phi3Shape = Phi3Shape {
    dim: 3072,
    n_layers: 32,
    n_heads: 24,
    n_kv_heads: 8,
    head_dim: 128,
    ffn: 8192,
    vocab: 200064,
    rope_dims: 96,
    rms_eps: 1e-5,
    rope_theta: 10000.0,
};

/// candle-transformers 0.11.1's `models::quantized_phi3`, its forward op for op (fused QKV and
/// gate|up `QMatMul`s, `RmsNorm`, `candle_nn::kv_cache::KvCache` along the sequence, K/V in f32,
/// `utils::repeat_kv`, `matmul` + `softmax_last_dim` attention), at Phi-4-mini's shape with
/// random quantized weights. Why a twin and not that model itself:
/// * its K/V caches are private fields of private layers: nothing outside can fill them, and a
///   32K prompt takes hours at its prefill speed; the twin holds the same `KvCache` and fills it
///   through `KvCache::append` ([`Phi3Twin::fill_cache`]);
/// * it rotates every dimension of a head, so it rejects Phi-4-mini (96 of 128 rotated: rope's
///   shape check fails); the twin rotates the first `rope_dims` as `models::phi3` does;
/// * it needs an `output.weight` (Phi-4-mini ties its head to the embedding) and dequantizes the
///   embedding to a 2.46 GB f32 table; the twin holds the table once, quantized, as the head,
///   and dequantizes the rows it looks up (as llama.cpp and yoco do).
pub struct Phi3Twin {
    shape: Phi3Shape,
    /// The tied table `(vocab, dim)`: the head, and the embedding's rows.
    table: Arc<QTensor>,
    head: QMatMul,
    layers: Vec<Phi3Layer>,
    output_norm: RmsNorm,
    cos: Tensor,
    sin: Tensor,
    neg_inf: Tensor,
    masks: HashMap<(usize, usize), Tensor>,
}

struct Phi3Layer {
    attn_qkv: QMatMul,
    attn_output: QMatMul,
    attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    ffn_up: QMatMul,
    ffn_down: QMatMul,
    kv_cache: KvCache,
}

/// A random `(rows, cols)` weight (std 0.02) quantized to `format`, drawn and quantized a few
/// rows at a time so that no f32 copy of a large tensor (the 200064-row table) is ever held.
pub fn random_qtensor(
    rows: usize,
    cols: usize,
    format: GgmlDType,
    device: &Device,
) -> candle_core::Result<Arc<QTensor>> {
    let step = ((16 << 20) / cols).max(1);
    let mut bytes = Vec::new();
    for start in (0..rows).step_by(step) {
        let n = step.min(rows - start);
        let part = Tensor::randn(0f32, 0.02, (n, cols), device)?;
        bytes.extend_from_slice(&QTensor::quantize(&part, format)?.data()?);
    }
    Ok(Arc::new(ggml_file::qtensor_from_ggml(
        format,
        &bytes,
        vec![rows, cols],
        device,
    )?))
}

impl Phi3Twin {
    /// The twin of `shape` with random weights in `format` (norm gains 1), room for
    /// `max_positions` in each layer's cache (`quantized_phi3` sizes it from the GGUF's context
    /// length).
    pub fn random(
        shape: Phi3Shape,
        format: GgmlDType,
        max_positions: usize,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let (d, kv) = (shape.dim, shape.n_kv_heads * shape.head_dim);
        let q = |rows, cols| -> candle_core::Result<QMatMul> {
            QMatMul::from_arc(random_qtensor(rows, cols, format, device)?)
        };
        let norm = || -> candle_core::Result<RmsNorm> {
            Ok(RmsNorm::new(
                Tensor::ones(d, DType::F32, device)?,
                shape.rms_eps,
            ))
        };
        let layers = (0..shape.n_layers)
            .map(|_| {
                Ok(Phi3Layer {
                    attn_qkv: q(d + 2 * kv, d)?,
                    attn_output: q(d, d)?,
                    attn_norm: norm()?,
                    ffn_norm: norm()?,
                    ffn_up: q(2 * shape.ffn, d)?,
                    ffn_down: q(d, shape.ffn)?,
                    kv_cache: KvCache::new(2, max_positions),
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let table = random_qtensor(shape.vocab, d, format, device)?;
        // quantized_phi3's `precomput_freqs_cis`, over the rotated dimensions.
        let theta: Vec<f32> = (0..shape.rope_dims)
            .step_by(2)
            .map(|i| 1f32 / shape.rope_theta.powf(i as f32 / shape.rope_dims as f32))
            .collect();
        let theta = Tensor::new(theta.as_slice(), device)?;
        let freqs = Tensor::arange(0, max_positions as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((max_positions, 1))?
            .matmul(&theta.reshape((1, theta.elem_count()))?)?;
        Ok(Phi3Twin {
            shape,
            head: QMatMul::from_arc(table.clone())?,
            table,
            layers,
            output_norm: norm()?,
            cos: freqs.cos()?,
            sin: freqs.sin()?,
            neg_inf: Tensor::new(f32::NEG_INFINITY, device)?,
            masks: HashMap::new(),
        })
    }

    /// Bytes of the weights as held (quantized projections and table; f32 norm gains).
    pub fn weight_bytes(&self) -> usize {
        let s = self.shape;
        let (d, kv) = (s.dim, s.n_kv_heads * s.head_dim);
        let per_layer = [(d + 2 * kv, d), (d, d), (2 * s.ffn, d), (d, s.ffn)];
        let format = self.table.dtype();
        let q = |(r, c): (usize, usize)| r * c / format.block_size() * format.type_size();
        s.n_layers * (per_layer.iter().map(|&x| q(x)).sum::<usize>() + 2 * d * 4)
            + q((s.vocab, d))
            + d * 4
    }

    /// Bytes of K/V written so far (f32, every layer).
    pub fn cache_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                2 * l.kv_cache.current_seq_len() * self.shape.n_kv_heads * self.shape.head_dim * 4
            })
            .sum()
    }

    /// Fills every layer's cache with `len` positions of random keys and values (appended in
    /// chunks, as a prefill appends them), in place of a prompt of `len` tokens.
    pub fn fill_cache(&mut self, len: usize) -> candle_core::Result<()> {
        let (h, hd) = (self.shape.n_kv_heads, self.shape.head_dim);
        let device = self.cos.device().clone();
        for layer in &mut self.layers {
            let mut filled = 0;
            while filled < len {
                let c = 512.min(len - filled);
                let k = Tensor::randn(0f32, 1.0, (1, h, c, hd), &device)?;
                let v = Tensor::randn(0f32, 1.0, (1, h, c, hd), &device)?;
                layer.kv_cache.append(&k, &v)?;
                filled += c;
            }
        }
        Ok(())
    }

    /// The embedding of `ids: (B, T)`: rows of the quantized table, dequantized.
    fn embed(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let d = self.shape.dim;
        let format = self.table.dtype();
        let row_bytes = d / format.block_size() * format.type_size();
        let data = self.table.data()?;
        let device = self.cos.device();
        let rows = ids
            .flatten_all()?
            .to_vec1::<u32>()?
            .into_iter()
            .map(|id| {
                let start = id as usize * row_bytes;
                let bytes = data
                    .get(start..start + row_bytes)
                    .ok_or_else(|| candle_core::Error::Msg(format!("token {id} out of range")))?;
                ggml_file::qtensor_from_ggml(format, bytes, vec![1, d], device)?.dequantize(device)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&rows, 0)?.reshape((b, t, d))
    }

    /// `models::phi3`'s partial rotary embedding of `xs: (B, H, T, hd)` at `index_pos`.
    fn rope(&self, xs: &Tensor, index_pos: usize) -> candle_core::Result<Tensor> {
        let t = xs.dim(2)?;
        let cos = self.cos.narrow(0, index_pos, t)?;
        let sin = self.sin.narrow(0, index_pos, t)?;
        let dims = self.shape.rope_dims;
        if dims == xs.dim(3)? {
            // Every dimension rotated: quantized_phi3's own call.
            return candle_nn::rotary_emb::rope(&xs.contiguous()?, &cos, &sin);
        }
        let rot =
            candle_nn::rotary_emb::rope(&xs.i((.., .., .., ..dims))?.contiguous()?, &cos, &sin)?;
        Tensor::cat(&[&rot, &xs.i((.., .., .., dims..))?], D::Minus1)?.contiguous()
    }

    /// Writes the weights as a GGUF that `quantized_phi3::ModelWeights::from_gguf` reads (the
    /// tied table stored twice, as `token_embd` and `output`), with `context_length` positions:
    /// what shows that the twin computes what that model computes, at a shape it accepts.
    pub fn write_gguf(
        &self,
        path: &std::path::Path,
        context_length: usize,
    ) -> candle_core::Result<()> {
        use candle_core::quantized::gguf_file::Value;
        let s = self.shape;
        let device = self.cos.device();
        let q = |m: &QMatMul| match m {
            QMatMul::QTensor(t) => Ok(t.clone()),
            _ => Err(candle_core::Error::Msg("a float projection".into())),
        };
        let ones = Arc::new(QTensor::quantize(
            &Tensor::ones(s.dim, DType::F32, device)?,
            GgmlDType::F32,
        )?);
        let mut tensors: Vec<(String, Arc<QTensor>)> = vec![
            ("token_embd.weight".into(), self.table.clone()),
            ("output.weight".into(), self.table.clone()),
            ("output_norm.weight".into(), ones.clone()),
        ];
        for (i, l) in self.layers.iter().enumerate() {
            let b = format!("blk.{i}");
            tensors.push((format!("{b}.attn_qkv.weight"), q(&l.attn_qkv)?));
            tensors.push((format!("{b}.attn_output.weight"), q(&l.attn_output)?));
            tensors.push((format!("{b}.ffn_up.weight"), q(&l.ffn_up)?));
            tensors.push((format!("{b}.ffn_down.weight"), q(&l.ffn_down)?));
            tensors.push((format!("{b}.attn_norm.weight"), ones.clone()));
            tensors.push((format!("{b}.ffn_norm.weight"), ones.clone()));
        }
        let u = |x: usize| Value::U32(x as u32);
        let metadata = [
            ("phi3.attention.head_count", u(s.n_heads)),
            ("phi3.attention.head_count_kv", u(s.n_kv_heads)),
            ("phi3.block_count", u(s.n_layers)),
            ("phi3.embedding_length", u(s.dim)),
            ("phi3.context_length", u(context_length)),
            ("phi3.feed_forward_length", u(s.ffn)),
            ("phi3.rope.dimension_count", u(s.rope_dims)),
            (
                "phi3.attention.layer_norm_rms_epsilon",
                Value::F32(s.rms_eps as f32),
            ),
        ];
        let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        let tensors: Vec<(&str, &QTensor)> = tensors
            .iter()
            .map(|(k, t)| (k.as_str(), t.as_ref()))
            .collect();
        let mut file = std::fs::File::create(path)?;
        candle_core::quantized::gguf_file::write(&mut file, &metadata, &tensors)
    }

    /// Logits of the last position of `ids: (B, T)` at `index_pos`, as
    /// `quantized_phi3::ModelWeights::forward`.
    pub fn forward(&mut self, ids: &Tensor, index_pos: usize) -> candle_core::Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let s = self.shape;
        let mask = if t == 1 {
            None
        } else {
            let kv_len = index_pos + t;
            let device = ids.device().clone();
            let mask = match self.masks.get(&(t, kv_len)) {
                Some(m) => m.clone(),
                None => {
                    let m = candle_transformers::utils::build_causal_mask(t, index_pos, &device)?;
                    self.masks.insert((t, kv_len), m.clone());
                    m
                }
            };
            Some(mask)
        };
        let mut xs = self.embed(ids)?;
        for i in 0..self.layers.len() {
            let residual = &xs;
            let ys = xs.apply(&self.layers[i].attn_norm)?;
            let ys = self.attention(i, &ys, mask.as_ref(), index_pos)?;
            let ys = (ys + residual)?;
            let layer = &self.layers[i];
            let residual = &ys;
            let up = ys.apply(&layer.ffn_norm)?.apply(&layer.ffn_up)?;
            let gate = up.narrow(D::Minus1, 0, s.ffn)?;
            let up = (up.narrow(D::Minus1, s.ffn, s.ffn)? * gate.silu()?)?;
            xs = (up.apply(&layer.ffn_down)? + residual)?;
        }
        let xs = xs.apply(&self.output_norm)?.i((.., t - 1, ..))?;
        self.head.forward(&xs)
    }

    /// `quantized_phi3::LayerWeights::forward_attn` (without flash attention) of layer `i`.
    fn attention(
        &mut self,
        i: usize,
        x: &Tensor,
        mask: Option<&Tensor>,
        index_pos: usize,
    ) -> candle_core::Result<Tensor> {
        let s = self.shape;
        let (b, t, d) = x.dims3()?;
        let qkv = self.layers[i].attn_qkv.forward(x)?;
        let q_len = s.n_heads * s.head_dim;
        let kv_len = s.n_kv_heads * s.head_dim;
        let q = qkv.narrow(D::Minus1, 0, q_len)?;
        let k = qkv.narrow(D::Minus1, q_len, kv_len)?;
        let v = qkv.narrow(D::Minus1, q_len + kv_len, kv_len)?;
        let q = q.reshape((b, t, s.n_heads, s.head_dim))?.transpose(1, 2)?;
        let k = k
            .reshape((b, t, s.n_kv_heads, s.head_dim))?
            .transpose(1, 2)?;
        let v = v
            .reshape((b, t, s.n_kv_heads, s.head_dim))?
            .transpose(1, 2)?;
        let q = self.rope(&q, index_pos)?.contiguous()?;
        let k = self.rope(&k, index_pos)?;
        let layer = &mut self.layers[i];
        if index_pos == 0 {
            layer.kv_cache.reset();
        }
        let (k, v) = layer.kv_cache.append(&k.contiguous()?, &v.contiguous()?)?;
        let n_rep = s.n_heads / s.n_kv_heads;
        let k = candle_transformers::utils::repeat_kv(k, n_rep)?;
        let v = candle_transformers::utils::repeat_kv(v, n_rep)?;
        let att = (q.matmul(&k.t()?)? / (s.head_dim as f64).sqrt())?;
        let att = match mask {
            None => att,
            Some(mask) => {
                let mask = mask.broadcast_as(att.shape())?;
                mask.where_cond(&self.neg_inf.broadcast_as(mask.dims())?, &att)?
            }
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.matmul(&v)?;
        let y = y.transpose(1, 2)?.reshape(&[b, t, d])?;
        layer.attn_output.forward(&y)
    }
}
