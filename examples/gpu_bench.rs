//! YOCO-3B against its Transformer twin on one GPU, bf16, random weights (speed and memory do
//! not depend on the values): prefill time, decode tokens/s as a fraction of the HBM bound, and
//! peak device memory, at long contexts.
//!
//! ```text
//! cargo build --release --features cuda --example gpu_bench
//! gpu_bench [--contexts 4096,32768,131072] [--llama-contexts 4096,16384,32768] [--skip-llama]
//!           [--chunk 4096] [--llama-chunk 2048] [--decode-steps 32] [--bandwidth BYTES_PER_S]
//!           [--time-budget-s 240] [--dtype bf16|f16|f32] [--device cuda|cuda:N|cpu]
//!           [--shape 3b|tiny] [--json OUT.json] [--markdown OUT.md]
//! ```
//!
//! * YOCO: dim 3072, 26 layers (13 gated-retention + 13 cross-decoder), FFN 8192, 24 heads,
//!   8 KV heads, vocabulary 100288. Prefill is `Model::prefill_chunked` (early exit: the
//!   cross-decoder runs for the last token only) in chunks of `--chunk`.
//! * Transformer: `candle_transformers::models::llama` with the same dim, 26 layers, 24 heads,
//!   8 KV heads, FFN 8192 and vocabulary. It has no flash attention on this path: it keeps f32
//!   scores for every chunk of queries against all keys, so its prefill runs in chunks of
//!   `--llama-chunk`, halved until the scores fit in memory.
//! * Decode: `--decode-steps` greedy steps after two untimed ones, each token read back to the
//!   host as a sampler must. The bound is `bandwidth / bytes read per token` (weights but the
//!   embedding table, every K/V row each attention layer reads, the retention state).
//! * Memory: the high-water mark of the CUDA memory pool candle allocates from, reset before
//!   each run.
//!
//! A run is skipped when the time budget is spent (or, for the Transformer, when its predicted
//! time exceeds what is left, or its scores and K/V would not fit). The exit status is 1 when any
//! run failed (out of memory included) or produced non-finite logits, 2 when the device is
//! unavailable (a build without `cuda`: try `--device cpu --shape tiny`, a smoke test of the
//! bench itself). The JSON file is rewritten after every run, so a time-out keeps what was
//! measured.

mod common;

use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::llama;
use clap::{Parser, ValueEnum};
use serde_json::{json, Value};
use yoco::Model;

use common::Shape;

const GIB: f64 = (1u64 << 30) as f64;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// YOCO-3B against its Transformer twin on one GPU: prefill time, decode tokens/s against the
/// HBM bound, peak device memory.
#[derive(Parser)]
#[command(
    name = "gpu_bench",
    after_help = "Exit status: 0 when every run that was not skipped succeeded; 1 when one failed \
                  (out of memory included) or gave non-finite logits; 2 for a bad command line or \
                  an unavailable device (without a CUDA build: --device cpu --shape tiny)."
)]
struct Args {
    /// YOCO context lengths, comma-separated; 4k = 4096
    #[arg(long, value_name = "N,N,...", value_delimiter = ',', value_parser = common::tokens,
          default_value = "4096,32768,131072")]
    contexts: Vec<usize>,
    /// Transformer context lengths (its prefill grows with the square of the context)
    #[arg(long, value_name = "N,N,...", value_delimiter = ',', value_parser = common::tokens,
          default_value = "4096,16384,32768")]
    llama_contexts: Vec<usize>,
    /// YOCO only
    #[arg(long)]
    skip_llama: bool,
    /// YOCO's prefill chunk (prompt tokens per step)
    #[arg(long, value_name = "N", value_parser = common::tokens, default_value_t = 4096)]
    chunk: usize,
    /// The Transformer's prefill chunk, halved until its f32 scores fit in 40% of free memory
    #[arg(long, value_name = "N", value_parser = common::tokens, default_value_t = 2048)]
    llama_chunk: usize,
    /// Timed decode steps (after two untimed ones)
    #[arg(long, value_name = "N", default_value_t = 32,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    decode_steps: usize,
    /// HBM bandwidth in bytes/s for the decode bound [default: from the GPU's name]
    #[arg(long, value_name = "BYTES_PER_S", value_parser = positive)]
    bandwidth: Option<f64>,
    /// No run starts after this many seconds
    #[arg(long, value_name = "S", default_value_t = 240.0)]
    time_budget_s: f64,
    /// Weight dtype: bf16, f16 or f32
    #[arg(long, value_name = "DTYPE", default_value = "bf16", value_parser = common::dtype)]
    dtype: DType,
    /// cuda, cuda:N or cpu
    #[arg(long, value_name = "DEVICE", default_value = "cuda", value_parser = common::device)]
    device: Device,
    /// Model shape: YOCO-3B's, or a toy one for trying the bench on a CPU
    #[arg(long, value_enum, default_value = "3b")]
    shape: ShapeName,
    /// Write the results as JSON here (rewritten after every run)
    #[arg(long, value_name = "OUT.json")]
    json: Option<PathBuf>,
    /// Write the results table here
    #[arg(long, value_name = "OUT.md")]
    markdown: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum ShapeName {
    #[value(name = "3b")]
    Yoco3b,
    Tiny,
}

impl ShapeName {
    fn shape(self) -> Shape {
        match self {
            ShapeName::Yoco3b => common::YOCO_3B,
            ShapeName::Tiny => common::TINY,
        }
    }
}

fn positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err(format!("`{s}` is not a positive number")),
    }
}

// ---------------------------------------------------------------------------------------------
// The GPU: bandwidth and memory

/// The name of GPU 0, if nvidia-smi runs.
fn gpu_name() -> Option<String> {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name", "--format=csv,noheader", "-i", "0"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Some(text.lines().next()?.trim().to_string()).filter(|_| out.status.success())
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
/// Nothing on other devices.
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

    /// Free device memory (the driver's view).
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

#[derive(Default)]
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
            "hbm_bound_tok_s": self.bound_tok_s,
            "fraction_of_hbm_bound": self.fraction(),
            "peak_gib": gib(self.peak_bytes),
            "peak_over_start_gib": gib(self.peak_bytes.zip(self.start_bytes).map(|(p, s)| p.saturating_sub(s))),
            "cache_gib": gib(self.cache_bytes),
            "note": self.note,
        })
    }

    fn fraction(&self) -> Option<f64> {
        self.decode_tok_s.zip(self.bound_tok_s).map(|(a, b)| a / b)
    }
}

fn fmt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "-".into(), f)
}

const TABLE_HEAD: &str = "| model | context | prefill chunk | prefill s | prefill tok/s | decode tok/s | HBM bound tok/s | % of bound | peak GiB | cache GiB | note |\n\
                          |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n";

/// One run as a row of the table.
fn row(r: &Run) -> String {
    format!(
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
        r.model,
        r.context,
        r.chunk.map_or("-".into(), |c| c.to_string()),
        fmt(r.prefill_s, |x| format!("{x:.3}")),
        fmt(r.prefill_s.map(|x| r.context as f64 / x), |x| format!(
            "{x:.0}"
        )),
        fmt(r.decode_tok_s, |x| format!("{x:.1}")),
        fmt(r.bound_tok_s, |x| format!("{x:.0}")),
        fmt(r.fraction(), |x| format!("{:.0}%", 100.0 * x)),
        fmt(r.peak_bytes.map(|b| b as f64 / GIB), |x| format!("{x:.2}")),
        fmt(r.cache_bytes.map(|b| b as f64 / GIB), |x| format!("{x:.3}")),
        r.note.replace('|', "/"),
    )
}

/// The table of every run, then YOCO against the Transformer where both ran.
fn markdown(runs: &[Run]) -> String {
    let mut s = String::from(TABLE_HEAD);
    s.extend(runs.iter().map(row));
    let ratio =
        |a: Option<f64>, b: Option<f64>| fmt(a.zip(b).map(|(a, b)| a / b), |x| format!("{x:.2}x"));
    let mut cmp = String::new();
    for y in runs.iter().filter(|r| r.model == "yoco") {
        let twin = runs
            .iter()
            .find(|r| r.model == "llama" && r.context == y.context);
        if let Some(l) = twin.filter(|l| l.prefill_s.is_some()) {
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
    /// What failed, one line each: a failure makes the exit status 1.
    failures: Vec<String>,
    json: Option<PathBuf>,
}

impl Report {
    fn push(&mut self, run: Run) {
        print!("  -> {}", row(&run));
        self.runs.push(run);
        self.write();
    }

    fn fail(&mut self, what: String) {
        self.failures.push(what);
        self.write();
    }

    fn set(&mut self, key: &str, v: Value) {
        self.sections.insert(key.into(), v);
        self.write();
    }

    fn write(&self) {
        let Some(path) = &self.json else { return };
        let mut v = self.header.clone();
        if let Some(obj) = v.as_object_mut() {
            obj.extend(self.sections.clone());
            let runs = self.runs.iter().map(Run::to_json).collect();
            obj.insert("runs".into(), Value::Array(runs));
            obj.insert("failures".into(), json!(self.failures));
        }
        let text = serde_json::to_string_pretty(&v).unwrap_or_default();
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("cannot write {}: {e}", path.display());
        }
    }
}

/// Runs `f`, turning an error or a panic into a short note ("OOM" for out-of-memory).
fn guarded<T>(what: &str, f: impl FnOnce() -> Res<T>) -> Result<T, String> {
    let e = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => return Ok(v),
        Ok(Err(e)) => e.to_string(),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            format!("panic: {msg}")
        }
    };
    eprintln!("{what} failed: {e}");
    if e.contains("OUT_OF_MEMORY") || e.to_ascii_lowercase().contains("out of memory") {
        Err("OOM".into())
    } else {
        let short: String = e.chars().take(160).collect();
        Err(format!("error: {}", short.replace('\n', " ")))
    }
}

/// An error unless every logit is finite.
fn check_finite(logits: &Tensor, when: &str) -> Res<()> {
    if common::all_finite(logits)? {
        Ok(())
    } else {
        Err(format!("non-finite logits {when}").into())
    }
}

// ---------------------------------------------------------------------------------------------
// Measuring

struct Bench {
    device: Device,
    dtype: DType,
    mem: Memory,
    args: Args,
    start: Instant,
    bandwidth: f64,
}

impl Bench {
    /// Seconds left of the time budget.
    fn left(&self) -> f64 {
        self.args.time_budget_s - self.start.elapsed().as_secs_f64()
    }

    /// Times `prefill` (which returns the last position's logits), then decodes greedily with
    /// `step`: two untimed steps and `steps` timed ones. Returns (prefill s, decode tokens/s);
    /// an error when the prefill's or the last step's logits are not all finite.
    fn measure<S>(
        &self,
        state: &mut S,
        steps: usize,
        prefill: impl FnOnce(&mut S) -> Res<Tensor>,
        mut step: impl FnMut(&mut S, u32) -> Res<Tensor>,
    ) -> Res<(f64, f64)> {
        let (logits, prefill_s) = common::timed(&self.device, || prefill(state))?;
        check_finite(&logits, "after the prefill")?;
        let mut tok = common::next_token(&logits)?;
        for _ in 0..2 {
            tok = common::next_token(&step(state, tok)?)?;
        }
        let (last, decode_s) = common::timed(&self.device, || {
            let mut last = None;
            for _ in 0..steps {
                let logits = step(state, tok)?;
                tok = common::next_token(&logits)?;
                last = Some(logits);
            }
            Res::Ok(last)
        })?;
        if let Some(logits) = last {
            check_finite(&logits, "after decoding")?;
        }
        Ok((prefill_s, steps as f64 / decode_s))
    }

    /// YOCO: prefill of `ctx` tokens in chunks of `chunk`, then decode. Returns (prefill s,
    /// decode tokens/s, cache bytes).
    fn yoco_once(
        &self,
        model: &Model,
        ctx: usize,
        chunk: usize,
        steps: usize,
    ) -> Res<(f64, f64, u64)> {
        let ids = common::random_ids(ctx, model.config().vocab_size(), ctx as u64);
        let ids = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let mut cache = model.new_cache(1)?;
        cache.reserve(ctx + steps + 2)?;
        let (prefill_s, decode) = self.measure(
            &mut cache,
            steps,
            |cache| Ok(model.prefill_chunked(&ids, cache, chunk)?),
            |cache, tok| Ok(model.step(&Tensor::new(&[tok], &self.device)?, cache)?),
        )?;
        Ok((prefill_s, decode, cache.allocated_bytes() as u64))
    }

    /// The Transformer: prefill of `ctx` tokens in chunks of `chunk`, then decode.
    fn llama_once(
        &self,
        model: &llama::Llama,
        cfg: &llama::Config,
        ctx: usize,
        chunk: usize,
        steps: usize,
    ) -> Res<(f64, f64)> {
        let ids = common::random_ids(ctx, cfg.vocab_size, ctx as u64);
        let cache = llama::Cache::new(true, self.dtype, cfg, &self.device)?;
        self.measure(
            &mut (cache, ctx),
            steps,
            |(cache, _)| {
                let mut logits = None;
                for (i, part) in ids.chunks(chunk).enumerate() {
                    let x = Tensor::new(part, &self.device)?.unsqueeze(0)?;
                    logits = Some(model.forward(&x, i * chunk, cache)?);
                }
                Ok(logits.ok_or("empty prompt")?)
            },
            |(cache, pos), tok| {
                let x = Tensor::new(&[tok], &self.device)?.unsqueeze(0)?;
                *pos += 1;
                Ok(model.forward(&x, *pos - 1, cache)?)
            },
        )
    }

    /// Runs `f` as `run` and records it: memory before and at peak, times, or the failure.
    fn record(
        &self,
        report: &mut Report,
        mut run: Run,
        f: impl FnOnce() -> Res<(f64, f64, Option<u64>)>,
    ) {
        println!(
            "{} {}: running (chunk {})",
            run.model,
            run.context,
            run.chunk.unwrap_or(0)
        );
        self.mem.reset_peak();
        run.start_bytes = self.mem.used();
        match guarded(&format!("{} {}", run.model, run.context), f) {
            Ok((prefill_s, decode, cache)) => {
                run.prefill_s = Some(prefill_s);
                run.decode_tok_s = Some(decode);
                run.cache_bytes = cache.or(run.cache_bytes);
            }
            Err(note) => {
                report.fail(format!("{} {}: {note}", run.model, run.context));
                run.note = note;
            }
        }
        run.peak_bytes = self.mem.peak();
        report.push(run);
    }

    /// Builds the model `name` (`title`, `params` parameters) with `build`, timed, and warms it
    /// up with `warm` (the first use of each CUDA kernel compiles it). A failure is recorded;
    /// `None` then.
    fn prepare<M>(
        &self,
        report: &mut Report,
        (name, title, params): (&str, String, usize),
        build: impl FnOnce() -> Res<M>,
        warm: impl FnOnce(&M) -> Res<()>,
    ) -> Option<(M, Value)> {
        let weights = (params * self.dtype.size_in_bytes()) as f64 / GIB;
        let billions = params as f64 / 1e9;
        println!(
            "\n## {title}, {:?}: {billions:.3} B parameters, {weights:.2} GiB",
            self.dtype
        );
        let built = guarded(&format!("building {name}"), || {
            common::timed(&self.device, build)
        });
        let (model, load_s) = match built {
            Ok(m) => m,
            Err(note) => {
                report.fail(format!("{name} weights: {note}"));
                return None;
            }
        };
        let pool_after_load = self.mem.used();
        let t0 = Instant::now();
        if let Err(note) = guarded(&format!("{name} warm-up"), || warm(&model)) {
            report.fail(format!("{name} warm-up: {note}"));
        }
        let warm_s = t0.elapsed().as_secs_f64();
        println!("weights built in {load_s:.1} s, warm-up {warm_s:.1} s");
        let info = json!({
            "load_s": load_s,
            "warmup_s": warm_s,
            "pool_after_load_gib": gib(pool_after_load),
        });
        Some((model, info))
    }

    fn run_yoco(&self, report: &mut Report) {
        let cfg = self.args.shape.shape().yoco(None);
        let b = self.dtype.size_in_bytes();
        let params = cfg.n_params();
        let title = format!("YOCO ({} shape)", self.args.shape.shape().name);
        let Some((model, info)) = self.prepare(
            report,
            ("yoco", title, params),
            || Ok(Model::random(&cfg, self.dtype, &self.device)?),
            |m| self.yoco_once(m, 600, 512, 2).map(|_| ()),
        ) else {
            return;
        };
        let about = json!({
            "config": serde_json::to_value(&cfg).unwrap_or(Value::Null),
            "params": params,
            "weights_gib": (params * b) as f64 / GIB,
            "cache_bytes_per_token": cfg.cache_bytes_per_token(b),
            "self_state_bytes": cfg.self_state_bytes(b),
            "built": info,
        });
        report.set("yoco", about);
        let mut contexts = self.args.contexts.clone();
        contexts.sort_unstable();
        for ctx in contexts {
            let chunk = self.args.chunk.min(ctx);
            let run = Run {
                model: "yoco",
                context: ctx,
                chunk: Some(chunk),
                bound_tok_s: Some(self.bandwidth / common::yoco_decode_bytes(&cfg, ctx, b)),
                ..Run::default()
            };
            if self.left() < 0.0 {
                report.push(Run {
                    note: "skipped: time budget spent".into(),
                    ..run
                });
                continue;
            }
            self.record(report, run, || {
                let (p, d, c) = self.yoco_once(&model, ctx, chunk, self.args.decode_steps)?;
                Ok((p, d, Some(c)))
            });
        }
    }

    fn run_llama(&self, report: &mut Report) {
        let mut contexts = self.args.llama_contexts.clone();
        contexts.sort_unstable();
        let steps = self.args.decode_steps;
        let longest = contexts
            .iter()
            .chain(&self.args.contexts)
            .max()
            .copied()
            .unwrap_or(0);
        let cfg = self.args.shape.shape().llama(longest.max(1024) + steps + 8);
        let b = self.dtype.size_in_bytes();
        let params = common::n_params(&common::llama_tensors(&cfg));
        let title = "Transformer twin (candle-transformers llama)".to_string();
        let Some((model, info)) = self.prepare(
            report,
            ("llama", title, params),
            || Ok(common::random_llama(&cfg, self.dtype, &self.device)?),
            |m| self.llama_once(m, &cfg, 300, 256, 2).map(|_| ()),
        ) else {
            return;
        };
        let about = json!({
            "params": params,
            "weights_gib": (params * b) as f64 / GIB,
            "kv_bytes_per_token": common::llama_kv_bytes(&cfg, 1, b),
            "built": info,
        });
        report.set("llama", about);
        // Bytes of f32 attention scores kept alive for `c` queries against `l` keys (the scaled
        // scores, the masked copy and the softmax live together, plus the matmul output).
        let scores = |c: usize, l: usize| 4 * (cfg.num_attention_heads * c * l * 4) as u64;
        // (context, prefill s, decode tok/s) of the last run, to predict the next one.
        let mut last: Option<(usize, f64, f64)> = None;
        for &ctx in &contexts {
            let kv = common::llama_kv_bytes(&cfg, ctx, b) as u64;
            let free = self.mem.device_free().unwrap_or(u64::MAX);
            let mut chunk = self.args.llama_chunk.min(ctx);
            while chunk > 256 && scores(chunk, ctx) > free / 10 * 4 {
                chunk /= 2;
            }
            let mut run = Run {
                model: "llama",
                context: ctx,
                chunk: Some(chunk),
                bound_tok_s: Some(self.bandwidth / common::llama_decode_bytes(&cfg, ctx, b)),
                cache_bytes: Some(kv),
                ..Run::default()
            };
            // Attention makes the prefill grow with the square of the context, decode with it.
            let predicted = last.map_or(0.0, |(c0, p0, d0)| {
                let r = ctx as f64 / c0 as f64;
                p0 * r * r + (steps + 2) as f64 / d0.max(1e-3) * r
            });
            let need = scores(chunk, ctx) + kv;
            if need > free {
                run.note = format!(
                    "skipped: predicted OOM ({:.1} GiB of scores and K/V, {:.1} GiB free)",
                    need as f64 / GIB,
                    free as f64 / GIB
                );
            } else if predicted > self.left() || self.left() < 0.0 {
                run.note = format!(
                    "skipped: predicted {predicted:.0} s, {:.0} s of the time budget left",
                    self.left().max(0.0)
                );
            }
            if !run.note.is_empty() {
                report.push(run);
                continue;
            }
            self.record(report, run, || {
                let (p, d) = self.llama_once(&model, &cfg, ctx, chunk, steps)?;
                last = Some((ctx, p, d));
                Ok((p, d, None))
            });
        }
        // YOCO's contexts that the Transformer did not try: what they would need, and the bound.
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
                bound_tok_s: Some(self.bandwidth / common::llama_decode_bytes(&cfg, ctx, b)),
                cache_bytes: Some(common::llama_kv_bytes(&cfg, ctx, b) as u64),
                note: format!(
                    "not run: {:.0} GiB of f32 scores per {chunk}-token chunk, K/V re-copied every chunk and step (O(T^2)); add it to --llama-contexts to try",
                    scores(chunk, ctx) as f64 / GIB
                ),
                ..Run::default()
            });
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let device = args.device.clone();
    let _ = device.set_seed(299_792_458);
    let gpu = device.is_cuda().then(gpu_name).flatten();
    let (bandwidth, bw_source) = match (args.bandwidth, &gpu) {
        (Some(b), _) => (b, "--bandwidth"),
        (None, Some(name)) => bandwidth_for(name),
        (None, None) => (3.35e12, "GPU name unknown: assumed 3.35 TB/s"),
    };
    let header = json!({
        "device": format!("{device:?}"),
        "gpu": gpu,
        "dtype": format!("{:?}", args.dtype),
        "shape": args.shape.shape().name,
        "bandwidth_bytes_per_s": bandwidth,
        "bandwidth_source": bw_source,
        "decode_steps": args.decode_steps,
        "yoco_prefill_chunk": args.chunk,
        "time_budget_s": args.time_budget_s,
    });
    println!(
        "# gpu_bench\n{}",
        serde_json::to_string_pretty(&header).unwrap_or_default()
    );
    let mut report = Report {
        header,
        sections: serde_json::Map::new(),
        runs: Vec::new(),
        failures: Vec::new(),
        json: args.json.clone(),
    };
    report.write();
    let bench = Bench {
        mem: Memory {
            device: device.clone(),
        },
        dtype: args.dtype,
        device,
        args,
        start: Instant::now(),
        bandwidth,
    };
    bench.run_yoco(&mut report);
    if !bench.args.skip_llama {
        bench.run_llama(&mut report);
    }
    report.set("total_s", json!(bench.start.elapsed().as_secs_f64()));

    let table = markdown(&report.runs);
    println!("\n{table}");
    println!(
        "decode bound: {:.2} TB/s ({bw_source}); bytes per token = weights except the embedding \
         + K/V read by every attention layer + retention state",
        bandwidth / 1e12
    );
    if let Some(path) = &bench.args.markdown {
        if let Err(e) = std::fs::write(path, &table) {
            eprintln!("cannot write {}: {e}", path.display());
        }
    }
    let _ = std::io::stdout().flush();
    if report.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("{} failure(s):", report.failures.len());
        for f in &report.failures {
            eprintln!("  {f}");
        }
        ExitCode::FAILURE
    }
}
