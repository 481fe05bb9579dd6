//! YOCO against a standard Transformer on this machine, side by side, random weights.
//!
//! ```text
//! cargo run --release --example profile -- [--contexts 1024,2048,...] [--models yoco,yoco-swa,llama]
//!     [--decode-steps N] [--chunk N] [--quant none,q8_0,q4_0,q4_k] [--out DIR] [--limits]
//! cargo run --release --example profile -- --shape phi4-flash --quant q4_k --contexts 1024
//! cargo run --release --example profile -- --shape phi4-flash --models phi4-flash,phi3 \
//!     --quant q4_k --contexts 32k --fill --decode-steps 8 --repeat 2
//! ```
//!
//! Every (model, context) point runs in a fresh child process so that its peak RSS (`VmHWM`) is
//! its own; the peak is started again once the random weights are built (see
//! `common::reset_peak_rss`), so it is the inference's: the weights as held plus what prefill and
//! decode add. With `--repeat N` every point runs N times, the models alternating within each
//! context (so that each sees the same load on a busy machine), and a second table gives the
//! medians. The parent writes `DIR/profile.md` (a table) and `DIR/{memory,prefill,throughput}.svg`
//! (plots in the style of the paper's figures), and, with `--limits`, this machine's f32 matmul
//! throughput and memory bandwidth, so every speed can be read as a fraction of its bound.
//!
//! Shapes: "bench-160m" (the paper's smallest scaling size): dim 768, 12 layers, FFN 2048,
//! 3 retention heads, 12 attention heads, 4 KV heads, vocab 32000; the Llama twin: hidden 768,
//! 12 layers, 12 heads, 4 KV heads, FFN 2048, vocab 32000.
//!
//! `--shape phi4-flash`: Phi-4-mini-flash-reasoning (random weights, quantized layer by layer),
//! and with `--models phi4-flash,phi3` beside it the Transformer it was made to replace at the
//! same size, Phi-4-mini, as candle-transformers' quantized Phi-3 runs it (`common::Phi3Twin`,
//! same quantization). `--fill` decodes after a cache filled with random values of each
//! context's size instead of a prompt (a 32K prompt takes many minutes on a small CPU).

mod common;

use std::process::{Command, ExitCode};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use clap::{Parser, ValueEnum};
use yoco::Model;

use common::BENCH_160M;

/// YOCO (bench-160m shape, random f32 weights) against its Transformer twin on this machine:
/// prefill latency, decode speed and peak memory against context length. Each (model, context)
/// point runs in a child process of its own; the table and plots go to --out.
#[derive(Parser)]
#[command(name = "profile")]
struct Args {
    /// Context lengths (prompt tokens), comma-separated; 4k = 4096
    #[arg(long, value_name = "N,N,...", value_delimiter = ',', value_parser = common::tokens,
          default_value = "1024,2048,4096,8192,16384,32768,65536")]
    contexts: Vec<usize>,
    /// Models, comma-separated [default: yoco,yoco-swa,llama; with --shape phi4-flash:
    /// phi4-flash]
    #[arg(long, value_name = "M,M,...", value_delimiter = ',', value_enum)]
    models: Option<Vec<Arch>>,
    /// Decode steps after the prompt (the median step is reported)
    #[arg(long, value_name = "N", default_value_t = 16)]
    decode_steps: usize,
    /// YOCO's prefill chunk (prompt tokens per step)
    #[arg(long, value_name = "N", value_parser = common::tokens,
          default_value_t = yoco::GenerationConfig::default().prefill_chunk)]
    chunk: usize,
    /// Quantization of YOCO's projections, comma-separated to measure several side by side
    /// (each context runs every one in turn): none, q8_0, q4_0, q4_k
    #[arg(long, value_name = "Q,Q,...", value_delimiter = ',', value_parser = common::quant,
          default_value = "none")]
    quant: Vec<common::Quant>,
    /// Folder for profile.md, profile.json and the SVG plots
    #[arg(long, value_name = "DIR", default_value = "target/profile")]
    out: std::path::PathBuf,
    /// First measure this machine's f32 matmul rate and memory bandwidth, and give YOCO's speeds
    /// as fractions of them
    #[arg(long)]
    limits: bool,
    /// The official YOCO code's numbers on this machine, one JSON object per line with `ctx`,
    /// `sw` (null for gated retention, the window otherwise), `prefill_s` and `decode_tok_s`
    /// (what `tests/fixtures/official/harness/speed.py` prints): adds them and the ratios
    /// yoco / official to the table
    #[arg(long, value_name = "FILE.jsonl")]
    official: Option<std::path::PathBuf>,
    /// One measurement in this process, printed as one JSON line (what each child runs)
    #[arg(long, hide = true, value_enum, requires = "context")]
    single: Option<Arch>,
    /// The context of --single
    #[arg(long, hide = true, value_parser = common::tokens)]
    context: Option<usize>,
    /// A shape to measure instead of --models: `phi4-flash` is Phi-4-mini-flash-reasoning's
    /// (3.85B parameters, random weights; use --quant q4_k or q8_0 on a machine with less than
    /// 20 GB of memory)
    #[arg(long, value_name = "SHAPE")]
    shape: Option<Shape>,
    /// Fill each cache with random values of the context's size instead of prefilling a prompt
    /// (no prefill is timed): decode at long contexts in minutes (phi4-flash and phi3 only)
    #[arg(long)]
    fill: bool,
    /// Runs of every point; the models alternate within each context, and a second table gives
    /// the medians
    #[arg(long, value_name = "N", default_value_t = 1)]
    repeat: usize,
    /// Keep YOCO's and Phi-4-mini-flash's global K/V in this dtype (f16 or bf16: half the bytes
    /// a long-context step reads) [default: f32, the weights']
    #[arg(long, value_name = "DTYPE", value_parser = common::dtype)]
    kv_dtype: Option<DType>,
}

/// A shape measured on its own (`--shape`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Shape {
    /// Phi-4-mini-flash-reasoning (SambaY): 32 layers, hidden 2560, vocab 200064
    Phi4Flash,
}

/// A model `profile` measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Arch {
    /// YOCO, gated-retention self-decoder
    Yoco,
    /// YOCO, sliding-window (1024 tokens) self-decoder
    YocoSwa,
    /// candle-transformers' Llama of the same shape
    Llama,
    /// Phi-4-mini-flash-reasoning's shape (SambaY), random weights
    Phi4Flash,
    /// Phi-4-mini's shape (3.84B) as candle-transformers' quantized Phi-3 runs it, random weights
    /// (`common::Phi3Twin`; needs --quant)
    Phi3,
}

impl Arch {
    fn name(self) -> &'static str {
        match self {
            Arch::Yoco => "yoco",
            Arch::YocoSwa => "yoco-swa",
            Arch::Llama => "llama",
            Arch::Phi4Flash => "phi4-flash",
            Arch::Phi3 => "phi3",
        }
    }
}

/// One measurement in this process: prefill of `ctx` tokens (or, with `fill`, a cache filled
/// with random values of that size), then `steps` decode steps fed from the same pseudo-random
/// prompt; returns one JSON object.
fn single(
    arch: Arch,
    ctx: usize,
    steps: usize,
    chunk: usize,
    quant: Option<yoco::Quant>,
    fill: bool,
    kv_dtype: Option<DType>,
) -> yoco::Result<serde_json::Value> {
    let kv_bytes = kv_dtype.map_or(4, |d| d.size_in_bytes());
    let dev = Device::Cpu;
    let vocab = match arch {
        Arch::Phi4Flash => yoco::Phi4FlashConfig::phi4_mini_flash().vocab_size,
        Arch::Phi3 => common::PHI4_MINI.vocab,
        _ => BENCH_160M.vocab,
    };
    if fill && !matches!(arch, Arch::Phi4Flash | Arch::Phi3) {
        return Err(yoco::Error::Input(
            "--fill is for phi4-flash and phi3".into(),
        ));
    }
    let ids = common::random_ids(ctx + steps, vocab, 12345);
    let prompt = Tensor::new(&ids[..ctx], &dev)?.unsqueeze(0)?;
    let base_rss = common::peak_rss_bytes();
    let mut bounds = None;
    let mut decode = Vec::new();
    // Peak RSS of building the random weights (drawn in f32, then quantized), before the
    // inference's own peak starts from what is resident once they are built.
    let mut load_peak = 0;
    let mut built = || {
        load_peak = common::peak_rss_bytes();
        common::reset_peak_rss()
    };
    let (prefill_s, weights, cache_bytes) = match arch {
        Arch::Yoco | Arch::YocoSwa => {
            let cfg = BENCH_160M.yoco((arch == Arch::YocoSwa).then_some(1024));
            // Drawn layer by layer, quantized as it is built when `quant` is set.
            let options = yoco::LoadOptions {
                quant,
                kv_dtype,
                ..yoco::LoadOptions::default()
            };
            let m = Model::random_with(&cfg, &options)?;
            bounds = Some((
                common::yoco_prefill_flops(&cfg),
                common::model_decode_bytes(&m, ctx, kv_bytes),
            ));
            built();
            run(&m, &prompt, &ids[ctx..], chunk, &mut decode, false)?
        }
        Arch::Phi4Flash => {
            let cfg = yoco::Phi4FlashConfig {
                max_positions: ctx + steps,
                ..yoco::Phi4FlashConfig::phi4_mini_flash()
            };
            let options = yoco::LoadOptions {
                quant,
                kv_dtype,
                ..yoco::LoadOptions::default()
            };
            let m = Model::random_phi4flash(&cfg, &options)?;
            // Every projection's weights are used once per token: 2 FLOPs per weight.
            let linear: usize = m
                .weights()
                .iter()
                .filter(|w| w.shape.len() == 2 && w.part != yoco::Part::Embedding)
                .map(|w| w.shape.iter().product::<usize>())
                .sum();
            bounds = Some((
                2.0 * linear as f64,
                common::model_decode_bytes(&m, ctx, kv_bytes),
            ));
            built();
            run(&m, &prompt, &ids[ctx..], chunk, &mut decode, fill)?
        }
        Arch::Phi3 => {
            let format = quant
                .and_then(|q| q.fallbacks().first().copied())
                .ok_or_else(|| {
                    yoco::Error::Input("phi3 needs --quant (q8_0, q4_0 or q4_k)".into())
                })?;
            let mut m = common::Phi3Twin::random(common::PHI4_MINI, format, ctx + steps, &dev)?;
            built();
            let prefill_s = if fill {
                m.fill_cache(ctx)?;
                f64::NAN
            } else {
                common::timed(&dev, || m.forward(&prompt, 0))?.1
            };
            for (i, &tok) in ids[ctx..].iter().enumerate() {
                let x = Tensor::new(&[[tok]], &dev)?;
                decode.push(common::timed(&dev, || m.forward(&x, ctx + i))?.1);
            }
            (prefill_s, m.weight_bytes(), m.cache_bytes())
        }
        Arch::Llama => {
            use candle_transformers::models::llama::Cache;
            let cfg = BENCH_160M.llama(ctx + steps + 256);
            let m = common::random_llama(&cfg, DType::F32, &dev)?;
            built();
            let mut cache = Cache::new(true, DType::F32, &cfg, &dev)?;
            let (_, prefill_s) = common::timed(&dev, || m.forward(&prompt, 0, &mut cache))?;
            for (i, &tok) in ids[ctx..].iter().enumerate() {
                let x = Tensor::new(&[[tok]], &dev)?;
                decode.push(common::timed(&dev, || m.forward(&x, ctx + i, &mut cache))?.1);
            }
            let weights = common::n_params(&common::llama_tensors(&cfg)) * 4;
            (
                prefill_s,
                weights,
                common::llama_kv_bytes(&cfg, ctx + steps, 4),
            )
        }
    };
    let decode_s = common::median(decode);
    Ok(serde_json::json!({
        "model": label(arch, quant), "quant": common::quant_name(quant),
        "context": ctx, "filled": fill,
        "kv_dtype": kv_dtype.map(|d| d.as_str()),
        "prefill_s": (!fill).then_some(prefill_s),
        "prefill_tokens_per_s": (!fill).then_some(ctx as f64 / prefill_s),
        "decode_ms": decode_s * 1e3, "decode_tokens_per_s": 1.0 / decode_s,
        "decode_steps": steps,
        "peak_rss_bytes": common::peak_rss_bytes(), "base_rss_bytes": base_rss,
        "load_peak_rss_bytes": load_peak,
        "weight_bytes": weights, "cache_bytes": cache_bytes,
        "prefill_flops_per_token": bounds.map(|b| b.0),
        "decode_bytes_per_token": bounds.map(|b| b.1),
    }))
}

/// Prefill of `prompt` in chunks of `chunk` (or, with `fill`, a cache filled with random values
/// of its length: no prefill, NaN seconds), then one step per id of `steps` (each step's time
/// into `decode`): the prefill's seconds, the weights' bytes and the cache's bytes at the end.
fn run(
    m: &Model,
    prompt: &Tensor,
    steps: &[u32],
    chunk: usize,
    decode: &mut Vec<f64>,
    fill: bool,
) -> yoco::Result<(f64, usize, usize)> {
    let dev = m.device().clone();
    let mut cache = m.new_cache(1)?;
    cache.reserve(prompt.dim(1)? + steps.len())?;
    let prefill_s = if fill {
        yoco::bench_support::fill_phi4flash_cache(m, &mut cache, prompt.dim(1)?)?;
        f64::NAN
    } else {
        common::timed(&dev, || m.prefill_chunked(prompt, &mut cache, chunk))?.1
    };
    for &tok in steps {
        let x = Tensor::new(&[tok], &dev)?;
        decode.push(common::timed(&dev, || m.step(&x, &mut cache))?.1);
    }
    Ok((prefill_s, m.weight_bytes(), cache.size_bytes()))
}

/// One measured point as a table row, without its official columns and the line's end; the
/// prefill columns say `filled` for a cache filled with random values. The fractions of this
/// machine's bounds need `--limits` (and are given where the model has its bounds).
fn table_row(v: &serde_json::Value, bounds: Option<(f64, f64)>) -> String {
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let pct = |x: f64| {
        if x.is_finite() {
            format!("{:.0}%", 100.0 * x)
        } else {
            String::new()
        }
    };
    let (prefill_pct, decode_pct) = match bounds {
        Some((gflops, gbs)) => (
            pct(f("prefill_flops_per_token") * f("prefill_tokens_per_s") / (gflops * 1e9)),
            pct(f("decode_bytes_per_token") * f("decode_tokens_per_s") / (gbs * 1e9)),
        ),
        None => (String::new(), String::new()),
    };
    let prefill = if v["filled"].as_bool() == Some(true) {
        "filled |".to_string()
    } else {
        format!("{:.3} | {:.1}", f("prefill_s"), f("prefill_tokens_per_s"))
    };
    format!(
        "| {} | {} | {prefill} | {prefill_pct} | {:.3} | {decode_pct} | {:.0} | {:.0} | {:.1} |",
        v["model"].as_str().unwrap_or("?"),
        v["context"],
        f("decode_tokens_per_s"),
        f("peak_rss_bytes") / 1e6,
        f("weight_bytes") / 1e6,
        f("cache_bytes") / 1e6
    )
}

/// The median (the mean of the middle two of an even count); NaN for none.
fn middle(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => xs[n / 2],
        _ => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
    }
}

/// A second table: per model and context (in the order they first ran), the median of each
/// measurement over its runs.
fn medians(results: &[serde_json::Value], bounds: Option<(f64, f64)>, repeat: usize) -> String {
    let mut md = format!("\nMedians of up to {repeat} runs:\n\n| model | context | prefill (s) | prefill tok/s | prefill % of matmul bound | decode tok/s | decode % of bandwidth bound | peak RSS (MB) | weights (MB) | cache (MB) | runs |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
    let mut seen: Vec<(String, String)> = Vec::new();
    for r in results {
        let key = (r["model"].to_string(), r["context"].to_string());
        if seen.contains(&key) {
            continue;
        }
        let runs: Vec<&serde_json::Value> = results
            .iter()
            .filter(|x| (x["model"].to_string(), x["context"].to_string()) == key)
            .collect();
        let mut v = r.clone();
        for k in [
            "prefill_s",
            "decode_tokens_per_s",
            "peak_rss_bytes",
            "weight_bytes",
            "cache_bytes",
        ] {
            let xs: Vec<f64> = runs.iter().filter_map(|x| x[k].as_f64()).collect();
            v[k] = serde_json::json!(middle(xs));
        }
        let ctx = v["context"].as_f64().unwrap_or(f64::NAN);
        v["prefill_tokens_per_s"] =
            serde_json::json!(ctx / v["prefill_s"].as_f64().unwrap_or(f64::NAN));
        md.push_str(&format!("{} {} |\n", table_row(&v, bounds), runs.len()));
        seen.push(key);
    }
    md
}

/// A measured line's name: the model, and its quantization if any.
fn label(arch: Arch, quant: Option<yoco::Quant>) -> String {
    match quant {
        None => arch.name().to_string(),
        Some(q) => format!("{} {q}", arch.name()),
    }
}

/// This machine's bounds: candle f32 matmul GFLOP/s and memory read bandwidth (GB/s).
fn limits() -> candle_core::Result<(f64, f64)> {
    let dev = Device::Cpu;
    let n = 2048;
    let a = Tensor::randn(0f32, 1.0, (n, n), &dev)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), &dev)?;
    let mut times = Vec::new();
    for _ in 0..7 {
        let t0 = Instant::now();
        let _c = a.matmul(&b)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    let gflops = 2.0 * (n as f64).powi(3) / common::median(times) / 1e9;
    // Bandwidth: sum 512 MB of f32 on every core, as a decode step reads weights.
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let data: Vec<f32> = (0..128 << 20).map(|i| (i % 7) as f32).collect();
    let mut times = Vec::new();
    for _ in 0..5 {
        let t0 = Instant::now();
        let total: f32 = std::thread::scope(|s| {
            let hs: Vec<_> = data
                .chunks(data.len().div_ceil(threads))
                .map(|c| {
                    s.spawn(move || {
                        // 32 independent lanes: bound by memory, not by one chain of adds.
                        let mut acc = [0f32; 32];
                        for part in c.chunks_exact(32) {
                            for (a, x) in acc.iter_mut().zip(part) {
                                *a += x;
                            }
                        }
                        acc.iter().sum::<f32>()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
        });
        std::hint::black_box(total);
        times.push(t0.elapsed().as_secs_f64());
    }
    let gbs = (data.len() * 4) as f64 / common::median(times) / 1e9;
    Ok((gflops, gbs))
}

/// One point measured with the official code.
struct Official {
    ctx: usize,
    window: Option<u64>,
    prefill_s: f64,
    decode_tok_s: f64,
}

/// Reads the official code's JSON lines (blank lines and lines that are not JSON objects are
/// errors that name the line).
fn read_official(path: &std::path::Path) -> Result<Vec<Official>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let bad = |what: &str| format!("{} line {}: {what}", path.display(), i + 1);
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(&e.to_string()))?;
        let num = |k: &str| {
            v[k].as_f64()
                .ok_or_else(|| bad(&format!("no number `{k}`")))
        };
        out.push(Official {
            ctx: num("ctx")? as usize,
            window: v["sw"].as_u64(),
            prefill_s: num("prefill_s")?,
            decode_tok_s: num("decode_tok_s")?,
        });
    }
    Ok(out)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let official = match args.official.as_deref().map(read_official).transpose() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: --official {e}");
            return ExitCode::from(2);
        }
    };
    let (steps, chunk) = (args.decode_steps, args.chunk);
    if let (Some(arch), Some(ctx)) = (args.single, args.context) {
        let quant = args.quant.first().and_then(|q| q.0);
        return match single(arch, ctx, steps, chunk, quant, args.fill, args.kv_dtype) {
            Ok(v) => {
                println!("{v}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let out_dir = args.out;
    let _ = std::fs::create_dir_all(&out_dir);
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut md = String::new();
    let mut bounds = None;
    if args.limits {
        match limits() {
            Ok((gflops, gbs)) => {
                md.push_str(&format!(
                    "Machine bounds: f32 matmul {gflops:.1} GFLOP/s, memory read {gbs:.1} GB/s.\n\n"
                ));
                bounds = Some((gflops, gbs));
            }
            Err(e) => eprintln!("limits failed: {e}"),
        }
    }
    md.push_str("| model | context | prefill (s) | prefill tok/s | prefill % of matmul bound | decode tok/s | decode % of bandwidth bound | peak RSS (MB) | weights (MB) | cache (MB) |");
    if official.is_some() {
        md.push_str(
            " official prefill (s) | prefill speed-up | official decode tok/s | decode speed-up |",
        );
    }
    md.push_str("\n|---|---|---|---|---|---|---|---|---|---|");
    if official.is_some() {
        md.push_str("---|---|---|---|");
    }
    md.push('\n');
    let mut results: Vec<serde_json::Value> = Vec::new();
    let models = args.models.clone().unwrap_or_else(|| match args.shape {
        Some(Shape::Phi4Flash) => vec![Arch::Phi4Flash],
        None => vec![Arch::Yoco, Arch::YocoSwa, Arch::Llama],
    });
    // The order points run in: every run of every context and quantization, the models in turn
    // (so that on a busy machine each sees the same load). Quantization applies to every model
    // but the Llama twin, which runs once per context, in f32.
    let mut points: Vec<(Arch, usize, Option<yoco::Quant>)> = Vec::new();
    for _ in 0..args.repeat.max(1) {
        for &ctx in &args.contexts {
            for (qi, q) in args.quant.iter().enumerate() {
                for &arch in &models {
                    match arch {
                        Arch::Llama if qi == 0 => points.push((arch, ctx, None)),
                        Arch::Llama => {}
                        _ => points.push((arch, ctx, q.0)),
                    }
                }
            }
        }
    }
    // Models (with their quantization) that failed at some context: longer ones only get worse.
    let mut failed: Vec<String> = Vec::new();
    for (arch, ctx, quant) in points {
        let model = label(arch, quant);
        if failed.contains(&model) {
            continue;
        }
        eprintln!("{model} @ {ctx} ...");
        let mut child = Command::new(&exe);
        child.args([
            "--single",
            arch.name(),
            "--context",
            &ctx.to_string(),
            "--decode-steps",
            &steps.to_string(),
            "--chunk",
            &chunk.to_string(),
            "--quant",
            common::quant_name(quant),
        ]);
        if args.fill {
            child.arg("--fill");
        }
        if let Some(dtype) = args.kv_dtype {
            child.args(["--kv-dtype", dtype.as_str()]);
        }
        let row = match child.output() {
            Ok(o) if o.status.success() => {
                serde_json::from_slice::<serde_json::Value>(&o.stdout).ok()
            }
            Ok(o) => {
                eprintln!(
                    "  failed ({}): {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("  could not start: {e}");
                None
            }
        };
        let Some(v) = row else {
            md.push_str(&format!(
                "| {model} | {ctx} | failed (out of memory?) | | | | | | | |\n"
            ));
            failed.push(model);
            continue;
        };
        md.push_str(&table_row(&v, bounds));
        if let Some(official) = &official {
            // The official point of the same context and self-decoder.
            let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
            let window = (arch == Arch::YocoSwa).then_some(1024);
            let o = official.iter().find(|o| o.ctx == ctx && o.window == window);
            md.push_str(&match (arch, o) {
                (Arch::Llama | Arch::Phi3, _) | (_, None) => " | | | |".to_string(),
                (_, Some(o)) => format!(
                    " {:.3} | {:.2}x | {:.1} | {:.2}x |",
                    o.prefill_s,
                    o.prefill_s / f("prefill_s"),
                    o.decode_tok_s,
                    f("decode_tokens_per_s") / o.decode_tok_s
                ),
            });
        }
        md.push('\n');
        eprintln!("  {v}");
        results.push(v);
    }
    if args.repeat > 1 {
        md.push_str(&medians(&results, bounds, args.repeat));
    }
    print!("{md}");
    let _ = std::fs::write(out_dir.join("profile.md"), &md);
    let _ = std::fs::write(
        out_dir.join("profile.json"),
        serde_json::to_string_pretty(&results).unwrap_or_default(),
    );
    let mut names: Vec<String> = Vec::new();
    for r in &results {
        if let Some(m) = r["model"]
            .as_str()
            .filter(|m| !names.iter().any(|n| n == m))
        {
            names.push(m.to_string());
        }
    }
    for (file, key, scale, ylabel) in [
        ("memory.svg", "peak_rss_bytes", 1e-9, "peak memory (GB)"),
        ("prefill.svg", "prefill_s", 1.0, "prefill latency (s)"),
        (
            "throughput.svg",
            "decode_tokens_per_s",
            1.0,
            "decode throughput (tokens/s)",
        ),
    ] {
        let svg = plot(&results, &names, key, scale, ylabel);
        let _ = std::fs::write(out_dir.join(file), svg);
    }
    eprintln!("wrote {}", out_dir.display());
    ExitCode::SUCCESS
}

/// A line chart, log2 x axis (context length), one line per model.
fn plot(
    results: &[serde_json::Value],
    models: &[String],
    key: &str,
    scale: f64,
    ylabel: &str,
) -> String {
    let (w, h, left, bottom, top, right) = (640.0, 400.0, 70.0, 50.0, 20.0, 130.0);
    let pts: Vec<(String, f64, f64)> = results
        .iter()
        .filter_map(|r| {
            Some((
                r["model"].as_str()?.to_string(),
                r["context"].as_f64()?.log2(),
                r[key].as_f64()? * scale,
            ))
        })
        .collect();
    let (xmin, xmax) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let ymax = pts.iter().fold(0f64, |a, p| a.max(p.2)) * 1.1;
    let sx = |x: f64| left + (x - xmin) / (xmax - xmin).max(1e-9) * (w - left - right);
    let sy = |y: f64| h - bottom - y / ymax.max(1e-12) * (h - bottom - top);
    let colors = ["#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd"];
    let mut s = format!("<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\n<rect width='100%' height='100%' fill='white'/>\n");
    s += &format!(
        "<line x1='{left}' y1='{}' x2='{}' y2='{}' stroke='black'/>\n",
        h - bottom,
        w - right,
        h - bottom
    );
    s += &format!(
        "<line x1='{left}' y1='{top}' x2='{left}' y2='{}' stroke='black'/>\n",
        h - bottom
    );
    let mut x = xmin.ceil();
    while x <= xmax {
        let label = 2f64.powf(x);
        let label = if label >= 1024.0 {
            format!("{}K", label / 1024.0)
        } else {
            format!("{label}")
        };
        s += &format!(
            "<text x='{:.1}' y='{}' text-anchor='middle'>{label}</text>\n",
            sx(x),
            h - bottom + 18.0
        );
        x += 1.0;
    }
    for i in 0..=4 {
        let y = ymax * i as f64 / 4.0;
        s += &format!(
            "<text x='{}' y='{:.1}' text-anchor='end'>{:.3}</text>\n",
            left - 6.0,
            sy(y) + 4.0,
            y
        );
    }
    s += &format!(
        "<text x='{:.1}' y='{}' text-anchor='middle'>context length (tokens)</text>\n",
        (left + w - right) / 2.0,
        h - 10.0
    );
    s += &format!("<text x='15' y='{:.1}' transform='rotate(-90 15 {:.1})' text-anchor='middle'>{ylabel}</text>\n", (top + h - bottom) / 2.0, (top + h - bottom) / 2.0);
    for (i, m) in models.iter().enumerate() {
        let c = colors[i % colors.len()];
        let line: Vec<String> = pts
            .iter()
            .filter(|p| &p.0 == m)
            .map(|p| format!("{:.1},{:.1}", sx(p.1), sy(p.2)))
            .collect();
        if line.is_empty() {
            continue;
        }
        s += &format!(
            "<polyline fill='none' stroke='{c}' stroke-width='2' points='{}'/>\n",
            line.join(" ")
        );
        for p in pts.iter().filter(|p| &p.0 == m) {
            s += &format!(
                "<circle cx='{:.1}' cy='{:.1}' r='3' fill='{c}'/>\n",
                sx(p.1),
                sy(p.2)
            );
        }
        s += &format!(
            "<text x='{}' y='{}' fill='{c}'>{m}</text>\n",
            w - right + 10.0,
            top + 20.0 + 18.0 * i as f64
        );
    }
    s + "</svg>\n"
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{gguf_file, GgmlDType};
    use candle_core::{Device, Tensor};
    use candle_transformers::models::quantized_phi3;

    use super::common::{Phi3Shape, Phi3Twin};

    fn max_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// The twin is candle-transformers' quantized Phi-3: its weights, written as a GGUF and loaded
    /// by `quantized_phi3`, give the same logits for a prompt and for the steps after it (at a
    /// shape that model accepts: every dimension of a head rotated).
    #[test]
    fn the_phi3_twin_computes_what_candle_quantized_phi3_computes() -> candle_core::Result<()> {
        let shape = Phi3Shape {
            dim: 256,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 64,
            ffn: 512,
            vocab: 300,
            rope_dims: 64,
            rms_eps: 1e-5,
            rope_theta: 10000.0,
        };
        let dev = Device::Cpu;
        let mut twin = Phi3Twin::random(shape, GgmlDType::Q4K, 64, &dev)?;
        let path = std::env::temp_dir().join(format!("phi3-twin-{}.gguf", std::process::id()));
        twin.write_gguf(&path, 64)?;
        let mut file = std::fs::File::open(&path)?;
        let content = gguf_file::Content::read(&mut file)?;
        let theirs = quantized_phi3::ModelWeights::from_gguf(false, content, &mut file, &dev);
        std::fs::remove_file(&path)?;
        let mut theirs = theirs?;
        let prompt = Tensor::new(&[[5u32, 17, 200, 3, 99]], &dev)?;
        let d = max_diff(&twin.forward(&prompt, 0)?, &theirs.forward(&prompt, 0)?)?;
        assert!(d < 1e-5, "prompt: {d}");
        for (i, &tok) in [7u32, 250, 1].iter().enumerate() {
            let x = Tensor::new(&[[tok]], &dev)?;
            let d = max_diff(&twin.forward(&x, 5 + i)?, &theirs.forward(&x, 5 + i)?)?;
            assert!(d < 1e-5, "step {i}: {d}");
        }
        Ok(())
    }
}
