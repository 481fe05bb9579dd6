//! YOCO-3B against its Transformer twin on one GPU: prefill latency, decode speed against the
//! memory-bandwidth bound, and GPU memory, at long contexts. Random bf16 weights (speed and
//! memory do not depend on the values).
//!
//! ```text
//! cargo build --release --features cuda --example gpu_bench
//! gpu_bench [--contexts 4096,32768,131072] [--llama-contexts 4096,16384,32768] [--skip-llama]
//!           [--chunk N | --tune-chunks 2048,4096,8192,16384] [--tune-at 32768] [--llama-chunk 2048]
//!           [--decode-steps 32] [--bandwidth BYTES_PER_S] [--time-budget-s 240]
//!           [--dtype bf16|f16|f32] [--device cuda|cuda:N|cpu] [--shape 3b|tiny]
//!           [--json OUT.json] [--markdown OUT.md]
//! ```
//!
//! * YOCO: dim 3072, 26 layers (13 gated-retention + 13 cross-decoder), FFN 8192, 24 heads,
//!   8 KV heads, vocabulary 100288 (YOCO-3B's shape). Prefill is `Model::prefill_chunked` (early
//!   exit: the cross-decoder only runs for the last token) with a chunk tuned once at
//!   `--tune-at` tokens among `--tune-chunks` (or fixed with `--chunk`).
//! * Transformer: `candle_transformers::models::llama` with the same dim, 26 layers, 24 heads,
//!   8 KV heads, FFN 8192 and vocabulary. It has no flash attention on this path: it
//!   materialises f32 scores for every chunk of queries against all keys, so its prefill runs in
//!   chunks of `--llama-chunk` (halved until the scores fit in memory), and a context is
//!   skipped when the predicted time exceeds what is left of `--time-budget-s`.
//! * Decode: `--decode-steps` greedy steps after the prefill (two untimed first), the token read
//!   back to the host every step as a sampler would, the device synchronised before the clock
//!   stops. The bound is `bandwidth / bytes read per token`, where bytes = weights except the
//!   embedding table + every K/V row each attention layer reads (YOCO: 13 cross layers all read
//!   the one global K/V; Transformer: 26 layers each read their own) + retention state.
//! * Memory: the high-water mark of the CUDA memory pool candle allocates from (reset before
//!   each run), the pool's use after loading the weights, and `nvidia-smi`'s view of the device.
//!
//! Without a CUDA build (or GPU) it says so and exits with status 2; `--device cpu --shape tiny`
//! runs the same code on a toy shape (a smoke test of the bench itself).
//!
//! Every failure (out of memory included) is reported for that run and the bench goes on; the
//! JSON file is rewritten after every run, so a time-out keeps what was measured.

use std::collections::HashMap;
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::llama;
use serde_json::{json, Value};
use yoco::{Config, Model};

const USAGE: &str = "usage: gpu_bench [--contexts 4096,32768,131072] [--llama-contexts 4096,16384,32768] [--skip-llama]
                 [--chunk N | --tune-chunks 2048,4096,8192,16384] [--tune-at 32768] [--llama-chunk 2048]
                 [--decode-steps 32] [--bandwidth BYTES_PER_S] [--time-budget-s 240]
                 [--dtype bf16|f16|f32] [--device cuda|cuda:N|cpu] [--shape 3b|tiny]
                 [--json OUT.json] [--markdown OUT.md]";

const GIB: f64 = (1u64 << 30) as f64;

/// The model shape both architectures share.
#[derive(Clone, Copy, Debug)]
struct Shape {
    name: &'static str,
    dim: usize,
    n_layers: usize,
    hidden_dim: usize,
    n_heads: usize,
    n_kv_heads: usize,
    vocab: usize,
}

const YOCO_3B: Shape = Shape {
    name: "3b",
    dim: 3072,
    n_layers: 26,
    hidden_dim: 8192,
    n_heads: 24,
    n_kv_heads: 8,
    vocab: 100288,
};

/// A toy shape for checking the bench itself on a CPU.
const TINY: Shape = Shape {
    name: "tiny",
    dim: 256,
    n_layers: 4,
    hidden_dim: 512,
    n_heads: 4,
    n_kv_heads: 2,
    vocab: 1024,
};

struct Args {
    device: String,
    dtype: DType,
    shape: Shape,
    contexts: Vec<usize>,
    llama_contexts: Vec<usize>,
    skip_llama: bool,
    chunk: Option<usize>,
    tune_chunks: Vec<usize>,
    tune_at: usize,
    llama_chunk: usize,
    decode_steps: usize,
    bandwidth: Option<f64>,
    time_budget_s: f64,
    json: Option<PathBuf>,
    markdown: Option<PathBuf>,
}

fn parse_list(flag: &str, v: &str) -> Result<Vec<usize>, String> {
    v.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            let s = s.trim().to_ascii_lowercase();
            // Accept 4096, 4k, 128K.
            match s.strip_suffix('k') {
                Some(n) => n.parse::<usize>().map(|n| n * 1024),
                None => s.parse::<usize>(),
            }
            .map_err(|_| format!("{flag}: `{s}` is not a number"))
        })
        .collect()
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        device: "cuda".into(),
        dtype: DType::BF16,
        shape: YOCO_3B,
        contexts: vec![4096, 32768, 131072],
        llama_contexts: vec![4096, 16384, 32768],
        skip_llama: false,
        chunk: None,
        tune_chunks: vec![2048, 4096, 8192, 16384],
        tune_at: 32768,
        llama_chunk: 2048,
        decode_steps: 32,
        bandwidth: None,
        time_budget_s: 240.0,
        json: None,
        markdown: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        fn num<T: std::str::FromStr>(flag: &str, v: String) -> Result<T, String> {
            v.parse()
                .map_err(|_| format!("{flag}: `{v}` is not a valid number"))
        }
        match flag.as_str() {
            "--contexts" => a.contexts = parse_list(&flag, &value()?)?,
            "--llama-contexts" => a.llama_contexts = parse_list(&flag, &value()?)?,
            "--skip-llama" => a.skip_llama = true,
            "--chunk" => a.chunk = Some(num(&flag, value()?)?),
            "--tune-chunks" => a.tune_chunks = parse_list(&flag, &value()?)?,
            "--tune-at" => a.tune_at = num(&flag, value()?)?,
            "--llama-chunk" => a.llama_chunk = num(&flag, value()?)?,
            "--decode-steps" => a.decode_steps = num(&flag, value()?)?,
            "--bandwidth" => a.bandwidth = Some(num(&flag, value()?)?),
            "--time-budget-s" => a.time_budget_s = num(&flag, value()?)?,
            "--dtype" => a.dtype = yoco::dtype_by_name(&value()?).map_err(|e| e.to_string())?,
            "--device" => a.device = value()?,
            "--shape" => {
                a.shape = match value()?.as_str() {
                    "3b" => YOCO_3B,
                    "tiny" => TINY,
                    other => return Err(format!("--shape: `{other}` (use 3b or tiny)")),
                }
            }
            "--json" => a.json = Some(PathBuf::from(value()?)),
            "--markdown" => a.markdown = Some(PathBuf::from(value()?)),
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument `{other}`\n{USAGE}")),
        }
    }
    if a.contexts
        .iter()
        .chain(&a.llama_contexts)
        .chain(&a.tune_chunks)
        .any(|&c| c == 0)
        || a.chunk == Some(0)
        || a.llama_chunk == 0
    {
        return Err("contexts and chunks must be at least 1".into());
    }
    Ok(a)
}

// ---------------------------------------------------------------------------------------------
// GPU facts and memory

/// One field of `nvidia-smi --query-gpu` for GPU 0, if nvidia-smi runs.
fn nvidia_smi(field: &str) -> Option<String> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            &format!("--query-gpu={field}"),
            "--format=csv,noheader,nounits",
            "-i",
            "0",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Some(text.lines().next()?.trim().to_string())
}

/// Peak HBM bandwidth by GPU name (bytes/s), and where the figure comes from.
fn bandwidth_for(name: &str) -> (f64, &'static str) {
    let n = name.to_ascii_uppercase();
    if n.contains("H200") {
        (4.8e12, "H200 (HBM3e, 4.8 TB/s)")
    } else if n.contains("H100") && n.contains("PCIE") {
        (2.0e12, "H100 PCIe (HBM2e, 2.0 TB/s)")
    } else if n.contains("H100") && n.contains("NVL") {
        (3.9e12, "H100 NVL (HBM3, 3.9 TB/s)")
    } else if n.contains("H100") {
        (3.35e12, "H100 SXM (HBM3, 3.35 TB/s)")
    } else {
        (3.35e12, "unknown GPU: assumed 3.35 TB/s (pass --bandwidth)")
    }
}

/// Memory as candle's CUDA allocator sees it: cudarc allocates from the device's default
/// stream-ordered memory pool (`cuMemAllocAsync`), whose counters give exact use and peak.
struct Memory {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    device: Device,
}

#[cfg(feature = "cuda")]
mod cuda_mem {
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::Device;

    pub use sys::CUmemPool_attribute as Attr;

    fn pool(device: &Device) -> Option<sys::CUmemoryPool> {
        let Device::Cuda(d) = device else { return None };
        let stream = d.cuda_stream();
        let ctx = stream.context();
        ctx.bind_to_thread().ok()?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: a valid device handle and an out-pointer to a pool handle.
        let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
        (r == sys::CUresult::CUDA_SUCCESS && !pool.is_null()).then_some(pool)
    }

    pub fn get(device: &Device, attr: Attr) -> Option<u64> {
        let pool = pool(device)?;
        let mut v: u64 = 0;
        // SAFETY: the pool attributes queried here are all cuuint64_t.
        let r = unsafe {
            sys::cuMemPoolGetAttribute(pool, attr, &mut v as *mut u64 as *mut std::ffi::c_void)
        };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(v)
    }

    pub fn reset_peak(device: &Device) {
        if let Some(pool) = pool(device) {
            let mut zero: u64 = 0;
            // SAFETY: USED_MEM_HIGH may only be set to 0 (reset to the current use).
            let _ = unsafe {
                sys::cuMemPoolSetAttribute(
                    pool,
                    Attr::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    &mut zero as *mut u64 as *mut std::ffi::c_void,
                )
            };
        }
    }

    pub fn device_used(device: &Device) -> Option<u64> {
        let Device::Cuda(d) = device else { return None };
        let (free, total) = d.cuda_stream().context().mem_get_info().ok()?;
        Some((total - free) as u64)
    }

    pub fn device_free(device: &Device) -> Option<u64> {
        let Device::Cuda(d) = device else { return None };
        let (free, _) = d.cuda_stream().context().mem_get_info().ok()?;
        Some(free as u64)
    }
}

impl Memory {
    /// Bytes allocated right now.
    fn used(&self) -> Option<u64> {
        #[cfg(feature = "cuda")]
        {
            cuda_mem::get(
                &self.device,
                cuda_mem::Attr::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
            )
        }
        #[cfg(not(feature = "cuda"))]
        {
            None
        }
    }

    /// Most bytes allocated at once since the last [`Memory::reset_peak`].
    fn peak(&self) -> Option<u64> {
        #[cfg(feature = "cuda")]
        {
            cuda_mem::get(&self.device, cuda_mem::Attr::CU_MEMPOOL_ATTR_USED_MEM_HIGH)
        }
        #[cfg(not(feature = "cuda"))]
        {
            None
        }
    }

    fn reset_peak(&self) {
        #[cfg(feature = "cuda")]
        cuda_mem::reset_peak(&self.device);
    }

    /// Device-wide memory in use (driver's view: every context on the GPU, pool reserves
    /// included).
    fn device_used(&self) -> Option<u64> {
        #[cfg(feature = "cuda")]
        {
            cuda_mem::device_used(&self.device)
        }
        #[cfg(not(feature = "cuda"))]
        {
            None
        }
    }

    fn device_free(&self) -> Option<u64> {
        #[cfg(feature = "cuda")]
        {
            cuda_mem::device_free(&self.device)
        }
        #[cfg(not(feature = "cuda"))]
        {
            None
        }
    }
}

fn gib(b: Option<u64>) -> Value {
    b.map_or(Value::Null, |b| json!(b as f64 / GIB))
}

// ---------------------------------------------------------------------------------------------
// Results

#[derive(Clone, Debug, Default)]
struct Run {
    model: &'static str,
    context: usize,
    chunk: Option<usize>,
    prefill_s: Option<f64>,
    decode_tok_s: Option<f64>,
    bound_tok_s: Option<f64>,
    peak_bytes: Option<u64>,
    /// Pool use when the run started (the weights, mostly).
    start_bytes: Option<u64>,
    cache_bytes: Option<u64>,
    note: String,
}

impl Run {
    fn to_json(&self) -> Value {
        json!({
            "model": self.model,
            "context": self.context,
            "prefill_chunk": self.chunk,
            "prefill_s": self.prefill_s,
            "prefill_tok_s": self.prefill_s.map(|s| self.context as f64 / s),
            "decode_tok_s": self.decode_tok_s,
            "decode_ms_per_token": self.decode_tok_s.map(|t| 1e3 / t),
            "hbm_bound_tok_s": self.bound_tok_s,
            "fraction_of_hbm_bound": self.decode_tok_s.zip(self.bound_tok_s).map(|(a, b)| a / b),
            "peak_gib": gib(self.peak_bytes),
            "peak_over_start_gib": gib(self.peak_bytes.zip(self.start_bytes).map(|(p, s)| p.saturating_sub(s))),
            "cache_gib": gib(self.cache_bytes),
            "note": self.note,
        })
    }
}

fn fmt_opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "-".into(), f)
}

fn markdown(runs: &[Run]) -> String {
    let mut s = String::from(
        "| model | context | prefill chunk | prefill s | prefill tok/s | decode tok/s | HBM bound tok/s | % of bound | peak GiB | cache GiB | note |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in runs {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.model,
            r.context,
            r.chunk.map_or("-".into(), |c| c.to_string()),
            fmt_opt(r.prefill_s, |x| format!("{x:.3}")),
            fmt_opt(r.prefill_s.map(|x| r.context as f64 / x), |x| format!(
                "{x:.0}"
            )),
            fmt_opt(r.decode_tok_s, |x| format!("{x:.1}")),
            fmt_opt(r.bound_tok_s, |x| format!("{x:.0}")),
            fmt_opt(
                r.decode_tok_s
                    .zip(r.bound_tok_s)
                    .map(|(a, b)| 100.0 * a / b),
                |x| format!("{x:.0}%")
            ),
            fmt_opt(r.peak_bytes.map(|b| b as f64 / GIB), |x| format!("{x:.2}")),
            fmt_opt(r.cache_bytes.map(|b| b as f64 / GIB), |x| format!("{x:.3}")),
            r.note.replace('|', "/"),
        ));
    }
    // YOCO against the Transformer where both ran.
    let mut cmp = String::new();
    for y in runs.iter().filter(|r| r.model == "yoco") {
        if let Some(l) = runs
            .iter()
            .find(|r| r.model == "llama" && r.context == y.context)
        {
            let ratio = |a: Option<f64>, b: Option<f64>| {
                fmt_opt(a.zip(b).map(|(a, b)| a / b), |x| format!("{x:.2}x"))
            };
            cmp.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                y.context,
                ratio(l.prefill_s, y.prefill_s),
                ratio(y.decode_tok_s, l.decode_tok_s),
                ratio(
                    l.peak_bytes.map(|b| b as f64),
                    y.peak_bytes.map(|b| b as f64)
                ),
            ));
        }
    }
    if !cmp.is_empty() {
        s.push_str("\n| context | prefill speed-up (llama s / yoco s) | decode speed-up | peak memory ratio (llama / yoco) |\n|---:|---:|---:|---:|\n");
        s.push_str(&cmp);
    }
    s
}

struct Report {
    header: Value,
    sections: serde_json::Map<String, Value>,
    runs: Vec<Run>,
    json: Option<PathBuf>,
}

impl Report {
    fn push(&mut self, run: Run) {
        println!(
            "  -> {} {}: prefill {} s (chunk {}), decode {} tok/s (bound {}), peak {} GiB, cache {} GiB {}",
            run.model,
            run.context,
            fmt_opt(run.prefill_s, |x| format!("{x:.3}")),
            run.chunk.map_or("-".into(), |c| c.to_string()),
            fmt_opt(run.decode_tok_s, |x| format!("{x:.1}")),
            fmt_opt(run.bound_tok_s, |x| format!("{x:.0}")),
            fmt_opt(run.peak_bytes.map(|b| b as f64 / GIB), |x| format!("{x:.2}")),
            fmt_opt(run.cache_bytes.map(|b| b as f64 / GIB), |x| format!("{x:.3}")),
            run.note
        );
        self.runs.push(run);
        self.write();
    }

    fn set(&mut self, key: &str, v: Value) {
        self.sections.insert(key.into(), v);
        self.write();
    }

    fn to_json(&self) -> Value {
        let mut v = self.header.clone();
        if let Some(obj) = v.as_object_mut() {
            for (k, x) in &self.sections {
                obj.insert(k.clone(), x.clone());
            }
            obj.insert(
                "runs".into(),
                Value::Array(self.runs.iter().map(Run::to_json).collect()),
            );
        }
        v
    }

    fn write(&self) {
        if let Some(path) = &self.json {
            let text = serde_json::to_string_pretty(&self.to_json()).unwrap_or_default();
            if let Err(e) = std::fs::write(path, text) {
                eprintln!("cannot write {}: {e}", path.display());
            }
        }
    }
}

/// Runs `f`, turning an error or a panic into a short note ("OOM" for out-of-memory).
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(classify(what, &e)),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            Err(classify(what, &format!("panic: {msg}")))
        }
    }
}

fn classify(what: &str, e: &str) -> String {
    let oom = e.contains("OUT_OF_MEMORY") || e.to_ascii_lowercase().contains("out of memory");
    eprintln!("{what} failed: {e}");
    if oom {
        "OOM".into()
    } else {
        let short: String = e.chars().take(160).collect();
        format!("error: {}", short.replace('\n', " "))
    }
}

fn s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

// ---------------------------------------------------------------------------------------------
// Models

fn yoco_config(shape: &Shape) -> Config {
    Config::new(
        shape.dim,
        shape.n_layers,
        shape.hidden_dim,
        shape.n_heads,
        shape.n_heads,
        shape.n_kv_heads,
        shape.vocab,
    )
}

/// A random tensor of `shape` (std 0.02) in `dtype` on `device` (CUDA draws f32 only: convert).
fn random(shape: &[usize], dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
    Tensor::randn(0f32, 0.02, shape, device)?.to_dtype(dtype)
}

fn yoco_model(cfg: &Config, dtype: DType, device: &Device) -> Result<Model, String> {
    Model::random(cfg, dtype, device).map_err(s)
}

fn llama_config(shape: &Shape, max_positions: usize) -> llama::Config {
    llama::Config {
        hidden_size: shape.dim,
        intermediate_size: shape.hidden_dim,
        vocab_size: shape.vocab,
        num_hidden_layers: shape.n_layers,
        num_attention_heads: shape.n_heads,
        num_key_value_heads: shape.n_kv_heads,
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

/// Llama's parameter names and shapes.
fn llama_tensors(cfg: &llama::Config) -> Vec<(String, Vec<usize>)> {
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

fn llama_model(cfg: &llama::Config, dtype: DType, device: &Device) -> Result<llama::Llama, String> {
    let mut tensors = HashMap::new();
    for (name, shape) in llama_tensors(cfg) {
        let t = if shape.len() == 1 {
            Tensor::ones(shape.as_slice(), dtype, device)
        } else {
            random(&shape, dtype, device)
        };
        tensors.insert(name, t.map_err(s)?);
    }
    llama::Llama::load(VarBuilder::from_tensors(tensors, dtype, device), cfg).map_err(s)
}

fn n_params(tensors: &[(String, Vec<usize>)]) -> usize {
    tensors
        .iter()
        .map(|(_, sh)| sh.iter().product::<usize>())
        .sum()
}

/// Deterministic pseudo-random token ids in `4..vocab`.
fn random_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (4 + (x >> 33) % (vocab as u64 - 4)) as u32
        })
        .collect()
}

/// Greedy next token of `(1, vocab)` logits, read back to the host.
fn next_token(logits: &Tensor) -> candle_core::Result<u32> {
    logits.flatten_all()?.argmax(D::Minus1)?.to_scalar::<u32>()
}

struct Bench {
    device: Device,
    mem: Memory,
    args: Args,
    start: Instant,
    bandwidth: f64,
}

impl Bench {
    fn elapsed(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn left(&self) -> f64 {
        self.args.time_budget_s - self.elapsed()
    }

    fn sync(&self) -> Result<(), String> {
        self.device.synchronize().map_err(s)
    }

    /// YOCO prefill of `ctx` tokens with `chunk`, then decode: (prefill s, decode tok/s, cache bytes).
    fn yoco_once(
        &self,
        model: &Model,
        ctx: usize,
        chunk: usize,
        steps: usize,
    ) -> Result<(f64, f64, u64), String> {
        let ids = Tensor::new(
            random_ids(ctx, model.config().vocab_size, ctx as u64),
            &self.device,
        )
        .and_then(|t| t.unsqueeze(0))
        .map_err(s)?;
        let mut cache = model.new_cache(1).map_err(s)?;
        cache.reserve(ctx + steps + 2).map_err(s)?;
        self.sync()?;
        let t0 = Instant::now();
        let logits = model.prefill_chunked(&ids, &mut cache, chunk).map_err(s)?;
        self.sync()?;
        let prefill = t0.elapsed().as_secs_f64();
        let mut tok = next_token(&logits).map_err(s)?;
        let mut step = |tok: u32| -> Result<u32, String> {
            let logits = model
                .step(&Tensor::new(&[tok], &self.device).map_err(s)?, &mut cache)
                .map_err(s)?;
            next_token(&logits).map_err(s)
        };
        // Two untimed steps, then `steps` timed ones (each reads its token back to the host).
        for _ in 0..2.min(steps) {
            tok = step(tok)?;
        }
        self.sync()?;
        let t1 = Instant::now();
        for _ in 0..steps {
            tok = step(tok)?;
        }
        self.sync()?;
        let decode = if steps > 0 {
            steps as f64 / t1.elapsed().as_secs_f64()
        } else {
            0.0
        };
        Ok((prefill, decode, cache.allocated_bytes() as u64))
    }

    fn yoco_bound(&self, cfg: &Config, ctx: usize) -> f64 {
        let b = self.args.dtype.size_in_bytes();
        let weights = (cfg.n_params() - cfg.vocab_size * cfg.dim) * b;
        let kv = cfg.n_half_layers() * cfg.cache_bytes_per_token(b) * ctx;
        let state = 2 * cfg.self_state_bytes(b);
        self.bandwidth / (weights + kv + state) as f64
    }

    fn run_yoco(&self, report: &mut Report) {
        let cfg = yoco_config(&self.args.shape);
        let b = self.args.dtype.size_in_bytes();
        println!(
            "\n## YOCO ({} shape, {:?}): {:.3} B parameters",
            self.args.shape.name,
            self.args.dtype,
            cfg.n_params() as f64 / 1e9
        );
        let t0 = Instant::now();
        let model = match guarded("building YOCO", || {
            yoco_model(&cfg, self.args.dtype, &self.device)
        }) {
            Ok(m) => m,
            Err(note) => {
                report.push(Run {
                    model: "yoco",
                    note: format!("weights: {note}"),
                    ..Run::default()
                });
                return;
            }
        };
        let _ = self.sync();
        let load_s = t0.elapsed().as_secs_f64();
        let weights_used = self.mem.used();
        println!(
            "weights: {:.2} GiB in {load_s:.1} s (pool in use {})",
            (cfg.n_params() * b) as f64 / GIB,
            fmt_opt(weights_used.map(|x| x as f64 / GIB), |x| format!(
                "{x:.2} GiB"
            ))
        );

        // Warm-up: every kernel the runs use (the first CUDA use of a module JIT-compiles it).
        let t0 = Instant::now();
        let warm = guarded("YOCO warm-up", || self.yoco_once(&model, 600, 512, 2));
        let warm_s = t0.elapsed().as_secs_f64();
        println!(
            "warm-up (prefill 600 in chunks of 512, 4 steps): {warm_s:.1} s {}",
            warm.as_ref().err().map_or("", |e| e.as_str())
        );

        // Prefill chunk: fixed, or the fastest of the candidates at `tune_at` tokens.
        let mut tuning = Vec::new();
        let chunk = match self.args.chunk {
            Some(c) => c,
            None => {
                let max_ctx = self.args.contexts.iter().copied().max().unwrap_or(4096);
                let at = self.args.tune_at.min(max_ctx);
                let mut best: Option<(usize, f64)> = None;
                for &c in &self.args.tune_chunks {
                    let c = c.min(at);
                    if tuning
                        .iter()
                        .any(|(x, _): &(usize, Result<f64, String>)| *x == c)
                    {
                        continue;
                    }
                    let r = guarded("chunk tuning", || {
                        self.yoco_once(&model, at, c, 0).map(|(p, _, _)| p)
                    });
                    println!(
                        "tune: prefill {at} tokens in chunks of {c}: {}",
                        r.as_ref()
                            .map_or_else(|e| e.clone(), |p| format!("{p:.3} s"))
                    );
                    if let Ok(p) = r {
                        if best.is_none_or(|(_, bp)| p < bp) {
                            best = Some((c, p));
                        }
                    }
                    tuning.push((c, r));
                }
                let c = best.map_or(4096, |(c, _)| c);
                report.set(
                    "yoco_chunk_tuning",
                    json!({
                        "tokens": at,
                        "chosen": c,
                        "prefill_s": tuning.iter().map(|(c, r)| json!({"chunk": c, "prefill_s": r.as_ref().ok(), "note": r.as_ref().err()})).collect::<Vec<_>>(),
                    }),
                );
                c
            }
        };
        report.set(
            "yoco",
            json!({
                "config": serde_json::to_value(&cfg).unwrap_or(Value::Null),
                "params": cfg.n_params(),
                "weights_gib": (cfg.n_params() * b) as f64 / GIB,
                "pool_after_load_gib": gib(weights_used),
                "load_s": load_s,
                "warmup_s": warm_s,
                "prefill_chunk": chunk,
                "cache_bytes_per_token": cfg.cache_bytes_per_token(b),
                "self_state_bytes": cfg.self_state_bytes(b),
            }),
        );

        let mut contexts = self.args.contexts.clone();
        contexts.sort_unstable();
        for &ctx in &contexts {
            let mut run = Run {
                model: "yoco",
                context: ctx,
                chunk: Some(chunk.min(ctx)),
                bound_tok_s: Some(self.yoco_bound(&cfg, ctx)),
                ..Run::default()
            };
            if self.left() < 0.0 {
                run.note = "skipped: time budget spent".into();
                report.push(run);
                continue;
            }
            println!("yoco {ctx}: running");
            self.mem.reset_peak();
            run.start_bytes = self.mem.used();
            match guarded("YOCO run", || {
                self.yoco_once(&model, ctx, chunk, self.args.decode_steps)
            }) {
                Ok((p, d, c)) => {
                    run.prefill_s = Some(p);
                    run.decode_tok_s = (self.args.decode_steps > 0).then_some(d);
                    run.cache_bytes = Some(c);
                }
                Err(note) => run.note = note,
            }
            run.peak_bytes = self.mem.peak();
            report.push(run);
        }
    }

    fn llama_bound(&self, cfg: &llama::Config, ctx: usize) -> f64 {
        let b = self.args.dtype.size_in_bytes();
        let weights = (n_params(&llama_tensors(cfg)) - cfg.vocab_size * cfg.hidden_size) * b;
        let kv = self.llama_cache_bytes(cfg, ctx);
        self.bandwidth / (weights + kv) as f64
    }

    fn llama_cache_bytes(&self, cfg: &llama::Config, ctx: usize) -> usize {
        let kv_dim = cfg.hidden_size / cfg.num_attention_heads * cfg.num_key_value_heads;
        cfg.num_hidden_layers * 2 * kv_dim * ctx * self.args.dtype.size_in_bytes()
    }

    /// Bytes of f32 attention scores llama keeps alive for `c` queries against `l` keys (the
    /// scaled scores, the masked copy and the softmax live together, plus the matmul output).
    fn llama_scores_bytes(cfg: &llama::Config, c: usize, l: usize) -> u64 {
        4 * (cfg.num_attention_heads * c * l * 4) as u64
    }

    /// Llama prefill of `ctx` tokens in chunks of `chunk`, then decode.
    fn llama_once(
        &self,
        model: &llama::Llama,
        cfg: &llama::Config,
        ctx: usize,
        chunk: usize,
        steps: usize,
    ) -> Result<(f64, f64), String> {
        let ids = random_ids(ctx, cfg.vocab_size, ctx as u64);
        let mut cache = llama::Cache::new(true, self.args.dtype, cfg, &self.device).map_err(s)?;
        self.sync()?;
        let t0 = Instant::now();
        let mut logits = None;
        let mut start = 0;
        while start < ctx {
            let c = chunk.min(ctx - start);
            let x = Tensor::new(&ids[start..start + c], &self.device)
                .and_then(|t| t.unsqueeze(0))
                .map_err(s)?;
            logits = Some(model.forward(&x, start, &mut cache).map_err(s)?);
            start += c;
        }
        let logits = logits.ok_or("empty prompt")?;
        self.sync()?;
        let prefill = t0.elapsed().as_secs_f64();
        let mut tok = next_token(&logits).map_err(s)?;
        let mut pos = ctx;
        let mut step = |tok: u32| -> Result<u32, String> {
            let x = Tensor::new(&[tok], &self.device)
                .and_then(|t| t.unsqueeze(0))
                .map_err(s)?;
            let logits = model.forward(&x, pos, &mut cache).map_err(s)?;
            pos += 1;
            next_token(&logits).map_err(s)
        };
        for _ in 0..2.min(steps) {
            tok = step(tok)?;
        }
        self.sync()?;
        let t1 = Instant::now();
        for _ in 0..steps {
            tok = step(tok)?;
        }
        self.sync()?;
        let decode = if steps > 0 {
            steps as f64 / t1.elapsed().as_secs_f64()
        } else {
            0.0
        };
        Ok((prefill, decode))
    }

    fn run_llama(&self, report: &mut Report) {
        let mut contexts = self.args.llama_contexts.clone();
        contexts.sort_unstable();
        let max_pos =
            contexts.iter().copied().max().unwrap_or(4096).max(1024) + self.args.decode_steps + 8;
        let cfg = llama_config(&self.args.shape, max_pos);
        let b = self.args.dtype.size_in_bytes();
        let params = n_params(&llama_tensors(&cfg));
        println!(
            "\n## Transformer twin (candle-transformers llama, {:?}): {:.3} B parameters",
            self.args.dtype,
            params as f64 / 1e9
        );
        let t0 = Instant::now();
        let model = match guarded("building llama", || {
            llama_model(&cfg, self.args.dtype, &self.device)
        }) {
            Ok(m) => m,
            Err(note) => {
                report.push(Run {
                    model: "llama",
                    note: format!("weights: {note}"),
                    ..Run::default()
                });
                return;
            }
        };
        let _ = self.sync();
        let load_s = t0.elapsed().as_secs_f64();
        let weights_used = self.mem.used();
        let t0 = Instant::now();
        let warm = guarded("llama warm-up", || {
            self.llama_once(&model, &cfg, 300, 256, 2)
        });
        let warm_s = t0.elapsed().as_secs_f64();
        println!(
            "weights {:.2} GiB in {load_s:.1} s; warm-up {warm_s:.1} s {}",
            (params * b) as f64 / GIB,
            warm.as_ref().err().map_or("", |e| e.as_str())
        );
        report.set(
            "llama",
            json!({
                "params": params,
                "weights_gib": (params * b) as f64 / GIB,
                "pool_after_load_gib": gib(weights_used),
                "load_s": load_s,
                "warmup_s": warm_s,
                "kv_bytes_per_token": self.llama_cache_bytes(&cfg, 1),
                "attention": "candle-transformers llama without flash-attn: f32 scores (chunk x context) per layer, K/V re-concatenated every step",
            }),
        );

        // (context, prefill s) of the last successful run, to predict the next one.
        let mut last: Option<(usize, f64, f64)> = None;
        for &ctx in &contexts {
            let mut run = Run {
                model: "llama",
                context: ctx,
                bound_tok_s: Some(self.llama_bound(&cfg, ctx)),
                cache_bytes: Some(self.llama_cache_bytes(&cfg, ctx) as u64),
                ..Run::default()
            };
            // Chunk: halve until the scores fit in 40% of the free memory.
            let free = self.mem.device_free().unwrap_or(u64::MAX);
            let mut chunk = self.args.llama_chunk.min(ctx);
            while chunk > 256 && Self::llama_scores_bytes(&cfg, chunk, ctx) > free / 10 * 4 {
                chunk /= 2;
            }
            run.chunk = Some(chunk);
            let need = Self::llama_scores_bytes(&cfg, chunk, ctx)
                + self.llama_cache_bytes(&cfg, ctx) as u64;
            if need > free {
                run.note = format!(
                    "skipped: predicted OOM ({:.1} GiB of scores and K/V, {:.1} GiB free)",
                    need as f64 / GIB,
                    free as f64 / GIB
                );
                report.push(run);
                continue;
            }
            // Time: attention grows with the square of the context, decode with the context.
            if let Some((c0, p0, d0)) = last {
                let r = ctx as f64 / c0 as f64;
                let predicted = p0 * r * r + (self.args.decode_steps + 2) as f64 / d0.max(1e-3) * r;
                if predicted > self.left() {
                    run.note = format!(
                        "skipped: predicted {predicted:.0} s, {:.0} s of the time budget left",
                        self.left().max(0.0)
                    );
                    report.push(run);
                    continue;
                }
            } else if self.left() < 0.0 {
                run.note = "skipped: time budget spent".into();
                report.push(run);
                continue;
            }
            println!("llama {ctx}: running (chunk {chunk})");
            self.mem.reset_peak();
            run.start_bytes = self.mem.used();
            match guarded("llama run", || {
                self.llama_once(&model, &cfg, ctx, chunk, self.args.decode_steps)
            }) {
                Ok((p, d)) => {
                    run.prefill_s = Some(p);
                    run.decode_tok_s = (self.args.decode_steps > 0).then_some(d);
                    last = Some((ctx, p, d));
                }
                Err(note) => run.note = note,
            }
            run.peak_bytes = self.mem.peak();
            report.push(run);
        }
        // Contexts YOCO ran that llama did not try.
        let mut others: Vec<usize> = self
            .args
            .contexts
            .iter()
            .copied()
            .filter(|c| !contexts.contains(c))
            .collect();
        others.sort_unstable();
        for ctx in others {
            let chunk = self.args.llama_chunk.min(ctx);
            report.push(Run {
                model: "llama",
                context: ctx,
                bound_tok_s: Some(self.llama_bound(&cfg, ctx)),
                cache_bytes: Some(self.llama_cache_bytes(&cfg, ctx) as u64),
                note: format!(
                    "not run: candle's llama keeps {:.0} GiB of f32 scores per {chunk}-token chunk and re-copies its K/V every chunk and step (O(T^2)); add it to --llama-contexts to try",
                    Self::llama_scores_bytes(&cfg, chunk, ctx) as f64 / GIB
                ),
                ..Run::default()
            });
        }
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    let device = match yoco::device_by_name(&args.device) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("gpu_bench: {e}");
            eprintln!("gpu_bench measures a GPU: build it with `cargo build --release --features cuda --example gpu_bench` and run it on a machine with an NVIDIA GPU (or pass `--device cpu --shape tiny` for a smoke test)");
            return ExitCode::from(2);
        }
    };
    let _ = device.set_seed(299_792_458);
    let gpu_name = if device.is_cuda() {
        nvidia_smi("name")
    } else {
        None
    };
    let (bandwidth, bw_source) = match (args.bandwidth, &gpu_name) {
        (Some(b), _) => (b, "--bandwidth"),
        (None, Some(name)) => bandwidth_for(name),
        (None, None) => (3.35e12, "GPU name unknown: assumed 3.35 TB/s"),
    };
    let mem = Memory {
        device: device.clone(),
    };
    let header = json!({
        "device": format!("{device:?}"),
        "gpu": gpu_name,
        "gpu_memory_total_mib": if device.is_cuda() { nvidia_smi("memory.total") } else { None },
        "driver": if device.is_cuda() { nvidia_smi("driver_version") } else { None },
        "dtype": format!("{:?}", args.dtype),
        "shape": args.shape.name,
        "bandwidth_bytes_per_s": bandwidth,
        "bandwidth_source": bw_source,
        "decode_steps": args.decode_steps,
        "time_budget_s": args.time_budget_s,
        "device_used_at_start_gib": gib(mem.device_used()),
    });
    println!(
        "# gpu_bench\n{}",
        serde_json::to_string_pretty(&header).unwrap_or_default()
    );
    let mut report = Report {
        header,
        sections: serde_json::Map::new(),
        runs: Vec::new(),
        json: args.json.clone(),
    };
    report.write();
    let markdown_path = args.markdown.clone();
    let bench = Bench {
        device,
        mem,
        args,
        start: Instant::now(),
        bandwidth,
    };

    bench.run_yoco(&mut report);
    let _ = bench.sync();
    report.set("device_used_after_yoco_gib", gib(bench.mem.device_used()));
    report.set(
        "nvidia_smi_used_after_yoco_mib",
        json!(if bench.device.is_cuda() {
            nvidia_smi("memory.used")
        } else {
            None
        }),
    );
    if !bench.args.skip_llama {
        bench.run_llama(&mut report);
    }
    report.set("total_s", json!(bench.elapsed()));

    let table = markdown(&report.runs);
    println!("\n{table}");
    println!("decode bound: {:.2} TB/s ({bw_source}); bytes per token = weights except the embedding + K/V read by every attention layer + retention state", bandwidth / 1e12);
    if let Some(path) = markdown_path {
        if let Err(e) = std::fs::write(&path, &table) {
            eprintln!("cannot write {}: {e}", path.display());
        }
    }
    let _ = std::io::stdout().flush();
    let failed = report
        .runs
        .iter()
        .filter(|r| r.note.starts_with("error") || r.note.starts_with("weights"))
        .count();
    if failed > 0 {
        eprintln!("{failed} run(s) failed (see the notes)");
    }
    ExitCode::SUCCESS
}
