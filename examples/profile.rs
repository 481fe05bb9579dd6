//! YOCO against a standard Transformer on this machine, side by side, random weights.
//!
//! ```text
//! cargo run --release --example profile -- [--contexts 1024,2048,...] [--models yoco,yoco-swa,llama]
//!     [--decode-steps N] [--chunk N] [--out DIR] [--limits]
//! ```
//!
//! Every (model, context) point runs in a fresh child process so that its peak RSS (`VmHWM`) is
//! its own. The parent writes `DIR/profile.md` (a table) and `DIR/{memory,prefill,throughput}.svg`
//! (plots in the style of the paper's figures), and, with `--limits`, this machine's f32 matmul
//! throughput and memory bandwidth, so every speed can be read as a fraction of its bound.
//!
//! Shapes: "bench-160m" (the paper's smallest scaling size): dim 768, 12 layers, FFN 2048,
//! 3 retention heads, 12 attention heads, 4 KV heads, vocab 32000; the Llama twin: hidden 768,
//! 12 layers, 12 heads, 4 KV heads, FFN 2048, vocab 32000.

use std::process::{Command, ExitCode};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use yoco::{Config, Model};

const VOCAB: usize = 32000;

fn bench_config(window: Option<usize>) -> Config {
    let mut cfg = Config::new(768, 12, 2048, 3, 12, 4, VOCAB);
    cfg.sliding_window = window;
    cfg
}

/// What bounds each phase of yoco, per token, for the "% of bound" columns:
/// * prefill FLOPs: `2 x (self-decoder + global-K/V parameters)`: with early exit a prompt
///   token runs through nothing else (the cross-decoder sees only the last one);
/// * decode bytes read: every weight except the embedding table (one row of it is read), the
///   global K/V once per cross-decoder layer, and the self-decoder state (read and written).
fn yoco_bounds(cfg: &Config, ctx: usize) -> (f64, f64) {
    let counts = cfg.param_counts();
    let prefill_params = counts.self_decoder + counts.global_kv;
    let weights = counts.total() - counts.embedding;
    // Every cross-decoder layer reads all of the global K/V, whatever the self-decoder is.
    let kv = ctx * cfg.cache_bytes_per_token(4) * cfg.n_half_layers();
    let state = 2 * cfg.self_state_bytes(4);
    (
        2.0 * prefill_params as f64,
        (weights * 4 + kv + state) as f64,
    )
}

fn llama_config(ctx: usize) -> candle_transformers::models::llama::Config {
    candle_transformers::models::llama::Config {
        hidden_size: 768,
        intermediate_size: 2048,
        vocab_size: VOCAB,
        num_hidden_layers: 12,
        num_attention_heads: 12,
        num_key_value_heads: 4,
        use_flash_attn: false,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        bos_token_id: None,
        eos_token_id: None,
        rope_scaling: None,
        max_position_embeddings: ctx + 256,
        tie_word_embeddings: false,
    }
}

fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

fn prompt(ctx: usize) -> Vec<u32> {
    // A fixed pseudo-random prompt (the weights are random anyway).
    let mut x = 12345u64;
    (0..ctx)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % VOCAB as u64) as u32
        })
        .collect()
}

/// One measurement in this process; prints one JSON line.
fn single(
    model: &str,
    ctx: usize,
    steps: usize,
    chunk: usize,
) -> candle_core::Result<serde_json::Value> {
    let dev = Device::Cpu;
    let ids = prompt(ctx + steps);
    let base_rss = peak_rss_bytes();
    let mut bounds = None;
    let (prefill_s, decode, weights, cache_bytes) = match model {
        "yoco" | "yoco-swa" => {
            let cfg = bench_config((model == "yoco-swa").then_some(1024));
            let m = Model::random(&cfg, DType::F32, &dev).map_err(candle_core::Error::wrap)?;
            let weights = cfg.n_params() * 4;
            bounds = Some(yoco_bounds(&cfg, ctx));
            let mut cache = m.new_cache(1).map_err(candle_core::Error::wrap)?;
            cache
                .reserve(ctx + steps)
                .map_err(candle_core::Error::wrap)?;
            let t = Tensor::new(&ids[..ctx], &dev)?.unsqueeze(0)?;
            let t0 = Instant::now();
            m.prefill_chunked(&t, &mut cache, chunk)
                .map_err(candle_core::Error::wrap)?;
            let prefill_s = t0.elapsed().as_secs_f64();
            let mut times = Vec::new();
            for &tok in &ids[ctx..ctx + steps] {
                let t0 = Instant::now();
                m.step(&Tensor::new(&[tok], &dev)?, &mut cache)
                    .map_err(candle_core::Error::wrap)?;
                times.push(t0.elapsed().as_secs_f64());
            }
            (prefill_s, times, weights, cache.size_bytes())
        }
        "llama" => {
            use candle_transformers::models::llama::{Cache, Llama};
            let cfg = llama_config(ctx + steps);
            let vm = candle_nn::VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
            let m = Llama::load(vb, &cfg)?;
            let weights: usize = vm.all_vars().iter().map(|v| v.elem_count() * 4).sum();
            let mut cache = Cache::new(true, DType::F32, &cfg, &dev)?;
            let t = Tensor::new(&ids[..ctx], &dev)?.unsqueeze(0)?;
            let t0 = Instant::now();
            m.forward(&t, 0, &mut cache)?;
            let prefill_s = t0.elapsed().as_secs_f64();
            let mut times = Vec::new();
            for (i, &tok) in ids[ctx..ctx + steps].iter().enumerate() {
                let t0 = Instant::now();
                m.forward(&Tensor::new(&[[tok]], &dev)?, ctx + i, &mut cache)?;
                times.push(t0.elapsed().as_secs_f64());
            }
            // One K and one V per layer: (1, kv_heads, T, head_dim) f32 each.
            let kv = 2
                * cfg.num_hidden_layers
                * (ctx + steps)
                * cfg.num_key_value_heads
                * (cfg.hidden_size / cfg.num_attention_heads)
                * 4;
            (prefill_s, times, weights, kv)
        }
        other => candle_core::bail!("unknown model {other}"),
    };
    let decode_s = median(decode);
    Ok(serde_json::json!({
        "model": model, "context": ctx, "prefill_s": prefill_s,
        "prefill_tokens_per_s": ctx as f64 / prefill_s,
        "decode_ms": decode_s * 1e3, "decode_tokens_per_s": 1.0 / decode_s,
        "peak_rss_bytes": peak_rss_bytes(), "base_rss_bytes": base_rss,
        "weight_bytes": weights, "cache_bytes": cache_bytes,
        "prefill_flops_per_token": bounds.map(|b| b.0),
        "decode_bytes_per_token": bounds.map(|b| b.1),
    }))
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
    let gflops = 2.0 * (n as f64).powi(3) / median(times) / 1e9;
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
    let gbs = (data.len() * 4) as f64 / median(times) / 1e9;
    Ok((gflops, gbs))
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    let get = |flag: &str| {
        argv.iter()
            .position(|a| a == flag)
            .and_then(|i| argv.get(i + 1))
            .cloned()
    };
    let steps: usize = get("--decode-steps")
        .and_then(|s| s.parse().ok())
        .unwrap_or(16);
    let chunk: usize = get("--chunk")
        .and_then(|s| s.parse().ok())
        .unwrap_or(yoco::DEFAULT_PREFILL_CHUNK);
    if let Some(i) = argv.iter().position(|a| a == "--single") {
        let (Some(model), Some(ctx)) = (
            argv.get(i + 1),
            argv.get(i + 2).and_then(|c| c.parse().ok()),
        ) else {
            eprintln!("--single MODEL CONTEXT");
            return ExitCode::from(2);
        };
        return match single(model, ctx, steps, chunk) {
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
    let contexts: Vec<usize> = get("--contexts")
        .unwrap_or_else(|| "1024,2048,4096,8192,16384,32768,65536".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let models: Vec<String> = get("--models")
        .unwrap_or_else(|| "yoco,yoco-swa,llama".into())
        .split(',')
        .map(String::from)
        .collect();
    let out_dir = std::path::PathBuf::from(get("--out").unwrap_or_else(|| "target/profile".into()));
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
    if argv.iter().any(|a| a == "--limits") {
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
    md.push_str("| model | context | prefill (s) | prefill tok/s | prefill % of matmul bound | decode tok/s | decode % of bandwidth bound | peak RSS (MB) | cache (MB) |\n|---|---|---|---|---|---|---|---|---|\n");
    let mut results: Vec<serde_json::Value> = Vec::new();
    for model in &models {
        for &ctx in &contexts {
            eprintln!("{model} @ {ctx} ...");
            let out = Command::new(&exe)
                .args([
                    "--single",
                    model,
                    &ctx.to_string(),
                    "--decode-steps",
                    &steps.to_string(),
                    "--chunk",
                    &chunk.to_string(),
                ])
                .output();
            let row = match out {
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
            match row {
                Some(v) => {
                    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
                    // Fractions of this machine's bounds (yoco only: see `yoco_bounds`).
                    let pct = |x: f64| {
                        if x.is_finite() {
                            format!("{:.0}%", 100.0 * x)
                        } else {
                            String::new()
                        }
                    };
                    let (prefill_pct, decode_pct) = match bounds {
                        Some((gflops, gbs)) => (
                            pct(f("prefill_flops_per_token") * f("prefill_tokens_per_s")
                                / (gflops * 1e9)),
                            pct(f("decode_bytes_per_token") * f("decode_tokens_per_s")
                                / (gbs * 1e9)),
                        ),
                        None => (String::new(), String::new()),
                    };
                    md.push_str(&format!(
                        "| {model} | {ctx} | {:.3} | {:.0} | {prefill_pct} | {:.1} | {decode_pct} | {:.0} | {:.1} |\n",
                        f("prefill_s"),
                        f("prefill_tokens_per_s"),
                        f("decode_tokens_per_s"),
                        f("peak_rss_bytes") / 1e6,
                        f("cache_bytes") / 1e6
                    ));
                    eprintln!("  {v}");
                    results.push(v);
                }
                None => {
                    md.push_str(&format!(
                        "| {model} | {ctx} | failed (out of memory?) | | | | | | |\n"
                    ));
                    // Longer contexts only get worse for a model that failed.
                    break;
                }
            }
        }
    }
    print!("{md}");
    let _ = std::fs::write(out_dir.join("profile.md"), &md);
    let _ = std::fs::write(
        out_dir.join("profile.json"),
        serde_json::to_string_pretty(&results).unwrap_or_default(),
    );
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
        let svg = plot(&results, &models, key, scale, ylabel);
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
